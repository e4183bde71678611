#include "backend/cpu/cpu_backend.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "backend/cpu/gemm.hpp"
#include "pagedrt/error.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace pagedrt::cpu {
namespace {

// Converts `n` elements of a checkpoint tensor into fp32 or bf16.
void convert(const TensorView& src, ScalarType dtype, void* dst) {
  const int64_t n = src.numel();
  if (dtype == ScalarType::F32) {
    float* out = static_cast<float*>(dst);
    switch (src.dtype) {
      case DType::F32: std::memcpy(out, src.data, n * 4); return;
      case DType::BF16: {
        const uint16_t* in = reinterpret_cast<const uint16_t*>(src.data);
        for (int64_t i = 0; i < n; ++i) out[i] = bf16_to_f32(in[i]);
        return;
      }
      case DType::F16: {
        const uint16_t* in = reinterpret_cast<const uint16_t*>(src.data);
        for (int64_t i = 0; i < n; ++i) out[i] = f16_to_f32(in[i]);
        return;
      }
      default: break;
    }
  } else if (dtype == ScalarType::BF16) {
    uint16_t* out = static_cast<uint16_t*>(dst);
    switch (src.dtype) {
      case DType::BF16: std::memcpy(out, src.data, n * 2); return;
      case DType::F32: {
        const float* in = reinterpret_cast<const float*>(src.data);
        for (int64_t i = 0; i < n; ++i) out[i] = f32_to_bf16(in[i]);
        return;
      }
      case DType::F16: {
        const uint16_t* in = reinterpret_cast<const uint16_t*>(src.data);
        for (int64_t i = 0; i < n; ++i) out[i] = f32_to_bf16(f16_to_f32(in[i]));
        return;
      }
      default: break;
    }
  }
  throw Error(ErrorKind::InvalidModel, src.file + ": tensor '" + src.name + "' has dtype " +
                                           dtype_name(src.dtype) + "; supported: F32, F16, BF16");
}

}  // namespace

CpuBackend::CpuBackend(int num_threads, ScalarType activation_dtype)
    : threads_(num_threads), act_(activation_dtype) {
  if (act_ != ScalarType::F32 && act_ != ScalarType::BF16)
    throw Error(ErrorKind::InvalidArgument, std::string("CPU activation dtype must be float32 or bfloat16, got ") +
                                                scalar_name(act_));
  if (threads_ <= 0) {
#ifdef _OPENMP
    threads_ = omp_get_num_procs();
#else
    threads_ = 1;
#endif
  }
}

Tensor CpuBackend::load_weight(const std::vector<const TensorView*>& parts, ScalarType dtype) {
  int64_t rows = 0;
  std::vector<int64_t> shape = parts[0]->shape;
  for (const TensorView* p : parts) rows += p->shape[0];
  shape[0] = rows;
  Tensor t = host_empty(shape, dtype);
  uint8_t* dst = static_cast<uint8_t*>(t.data);
  for (const TensorView* p : parts) {
    convert(*p, dtype, dst);
    dst += p->numel() * scalar_size(dtype);
  }
  return t;
}

Tensor CpuBackend::empty(std::vector<int64_t> shape, ScalarType dtype) {
  return host_empty(std::move(shape), dtype);
}

namespace {

// Activations are float, or uint16_t holding bf16 bits; math is fp32 and a
// bf16 value is rounded to nearest even where it is stored.
inline float to_f32(float x) { return x; }
inline float to_f32(uint16_t x) { return bf16_to_f32(x); }
inline void store(float* p, float v) { *p = v; }
inline void store(uint16_t* p, float v) { *p = f32_to_bf16(v); }

// Calls f with the typed data pointer of `t` (float* or uint16_t*).
template <typename F>
void with_act(const Tensor& t, F&& f) {
  if (t.dtype == ScalarType::BF16)
    f(static_cast<uint16_t*>(t.data));
  else
    f(static_cast<float*>(t.data));
}

// out = x / sqrt(mean(x^2) + eps) * w, as transformers' LlamaRMSNorm in fp32.
template <typename T>
inline void rms_row(const float* x, const float* w, float eps, int64_t d, T* out) {
  float ss = 0.0f;
  for (int64_t i = 0; i < d; ++i) ss += x[i] * x[i];
  const float inv = 1.0f / std::sqrt(ss / static_cast<float>(d) + eps);
  for (int64_t i = 0; i < d; ++i) store(out + i, w[i] * (x[i] * inv));
}

// dst (n) = fp32 of bf16 src (n): exact
inline void widen(const uint16_t* src, int64_t n, float* dst) {
  int64_t i = 0;
#ifdef __AVX512F__
  for (; i + 16 <= n; i += 16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    _mm512_storeu_ps(dst + i, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
  }
#endif
  for (; i < n; ++i) dst[i] = bf16_to_f32(src[i]);
}

// dst (n) = bf16 of fp32 src (n), round to nearest even, NaN kept quiet
// (bit-for-bit f32_to_bf16, so the same as the GPU's __float2bfloat16_rn)
inline void narrow(const float* src, int64_t n, uint16_t* dst) {
  int64_t i = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
  const __m512i bias = _mm512_set1_epi32(0x7fff), one = _mm512_set1_epi32(1), quiet = _mm512_set1_epi32(0x40);
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(src + i);
    const __m512i u = _mm512_castps_si512(v);
    const __m512i hi = _mm512_srli_epi32(u, 16);
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(bias, _mm512_and_si512(hi, one))), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_or_si512(hi, quiet));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), _mm512_cvtepi32_epi16(r));
  }
#endif
  for (; i < n; ++i) dst[i] = f32_to_bf16(src[i]);
}

}  // namespace

void CpuBackend::embedding(const Tensor& table, Tensor& out) {
  const int64_t hidden = table.dim(1);
  float* y = out.as<float>();
  for (int32_t t = 0; t < batch_.num_tokens; ++t) {
    const int64_t id = batch_.token_ids[t];
    float* dst = y + t * hidden;
    if (table.dtype == ScalarType::F32) {
      std::memcpy(dst, table.as<float>() + id * hidden, hidden * 4);
    } else {
      const uint16_t* src = table.as<uint16_t>() + id * hidden;
      for (int64_t i = 0; i < hidden; ++i) dst[i] = bf16_to_f32(src[i]);
    }
  }
}

void CpuBackend::rms_norm(const Tensor& x, const Tensor& weight, float eps, int64_t n, Tensor& out) {
  const int64_t d = weight.numel();
  with_act(out, [&](auto* y) {
    for (int64_t t = 0; t < n; ++t) rms_row(x.as<float>() + t * d, weight.as<float>(), eps, d, y + t * d);
  });
}

void CpuBackend::add_rms_norm(Tensor& residual, const Tensor& x, const Tensor& weight, float eps,
                              Tensor& out) {
  add(residual, x);
  rms_norm(residual, weight, eps, batch_.num_tokens, out);
}

void CpuBackend::linear(const Tensor& x, const Tensor& weight, int64_t n, Tensor& out) {
  const int64_t m = weight.dim(0), k = weight.dim(1);
  float* yf = out.as<float>();
  if (out.dtype == ScalarType::BF16) {
    y32_.resize(static_cast<size_t>(n * m));
    yf = y32_.data();
  }
  if (x.dtype == ScalarType::BF16 && weight.dtype == ScalarType::BF16) {
    // bf16 x bf16 with fp32 accumulation (VDPBF16PS where the processor has it)
    gemm_bf16_bf16(x.as<uint16_t>(), weight.as<uint16_t>(), yf, n, m, k, threads_);
    if (out.dtype == ScalarType::BF16) narrow(yf, n * m, out.as<uint16_t>());
    return;
  }
  // bf16 activations with fp32 weights: widened to fp32 (exact)
  const float* xf = x.as<float>();
  if (x.dtype == ScalarType::BF16) {
    x32_.resize(static_cast<size_t>(n * k));
    widen(x.as<uint16_t>(), n * k, x32_.data());
    xf = x32_.data();
  }
  if (weight.dtype == ScalarType::F32)
    gemm_f32(xf, weight.as<float>(), yf, n, m, k, threads_);
  else
    gemm_bf16(xf, weight.as<uint16_t>(), yf, n, m, k, threads_);
  if (out.dtype == ScalarType::BF16) narrow(yf, n * m, out.as<uint16_t>());
}

void CpuBackend::add(Tensor& residual, const Tensor& x) {
  const int64_t n = static_cast<int64_t>(batch_.num_tokens) * residual.dim(1);
  float* r = residual.as<float>();
  with_act(x, [&](const auto* xi) {
    for (int64_t i = 0; i < n; ++i) r[i] += to_f32(xi[i]);
  });
}

void CpuBackend::rope_and_cache(Tensor& qkv, const RopeTable& rope, int64_t num_heads,
                                int64_t num_kv_heads, int64_t head_dim, Tensor& k_cache,
                                Tensor& v_cache) {
  AttentionShape s{num_heads, num_kv_heads, head_dim, k_cache.dim(1)};
  with_act(qkv, [&](auto* q) {
    using T = std::remove_pointer_t<decltype(q)>;
    cpu::rope_and_cache<T>(batch_, q, rope.cos.as<float>(), rope.sin.as<float>(), s, k_cache.as<T>(),
                           v_cache.as<T>(), threads_);
  });
}

void CpuBackend::paged_attention(const Tensor& qkv, const Tensor& k_cache, const Tensor& v_cache,
                                 int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                                 float scale, Tensor& out) {
  AttentionShape s{num_heads, num_kv_heads, head_dim, k_cache.dim(1)};
  with_act(qkv, [&](const auto* q) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(q)>>;
    cpu::paged_attention<T>(batch_, q, k_cache.as<T>(), v_cache.as<T>(), s, scale, out.as<T>(), threads_);
  });
}

void CpuBackend::silu_mul(const Tensor& gate_up, int64_t n, Tensor& out) {
  const int64_t inter = out.dim(1);
  with_act(gate_up, [&](const auto* gu) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(gu)>>;
    T* y = out.as<T>();
#pragma omp parallel for schedule(static) num_threads(threads_) if (n * inter > 65536)
    for (int64_t t = 0; t < n; ++t) {
      const T* g = gu + t * 2 * inter;
      const T* u = g + inter;
      T* o = y + t * inter;
      for (int64_t i = 0; i < inter; ++i) {
        const float gi = to_f32(g[i]);
        store(o + i, gi / (1.0f + std::exp(-gi)) * to_f32(u[i]));
      }
    }
  });
}

void CpuBackend::gather_rows(const Tensor& x, Tensor& out) {
  const size_t row_bytes = static_cast<size_t>(x.dim(1)) * scalar_size(x.dtype);
  const uint8_t* src = static_cast<const uint8_t*>(x.data);
  uint8_t* dst = static_cast<uint8_t*>(out.data);
  for (int32_t i = 0; i < batch_.num_logits; ++i)
    std::memcpy(dst + i * row_bytes, src + static_cast<size_t>(batch_.logits_indices[i]) * row_bytes, row_bytes);
}

void CpuBackend::copy_blocks(Tensor& cache, const std::vector<BlockCopy>& copies) {
  const size_t block_bytes = cache.nbytes() / static_cast<size_t>(cache.dim(0));
  uint8_t* base = static_cast<uint8_t*>(cache.data);
  for (const BlockCopy& c : copies)
    std::memcpy(base + c.dst * block_bytes, base + c.src * block_bytes, block_bytes);
}

void CpuBackend::to_host(const Tensor& src, int64_t numel, float* dst) {
  std::memcpy(dst, src.data, numel * 4);
}

void CpuBackend::download(const Tensor& src, void* dst) { std::memcpy(dst, src.data, src.nbytes()); }

}  // namespace pagedrt::cpu
