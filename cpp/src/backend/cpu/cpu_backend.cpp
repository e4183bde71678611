#include "backend/cpu/cpu_backend.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "backend/cpu/argmax.hpp"
#include "backend/cpu/gemm.hpp"
#include "backend/cpu/vec_math.hpp"
#include "backend/team.hpp"
#include "pagedrt/error.hpp"

namespace pagedrt::cpu {
namespace {

// Converts a checkpoint tensor into fp32 or bf16.
void convert(const WeightView& src, ScalarType dtype, void* dst) {
  const int64_t n = src.numel();
  if (dtype == ScalarType::F32) {
    float* out = static_cast<float*>(dst);
    switch (src.type) {
      case WeightView::Type::F32: std::memcpy(out, src.data, n * 4); return;
      case WeightView::Type::BF16: {
        const uint16_t* in = reinterpret_cast<const uint16_t*>(src.data);
        for (int64_t i = 0; i < n; ++i) out[i] = bf16_to_f32(in[i]);
        return;
      }
      case WeightView::Type::F16: {
        const uint16_t* in = reinterpret_cast<const uint16_t*>(src.data);
        for (int64_t i = 0; i < n; ++i) out[i] = f16_to_f32(in[i]);
        return;
      }
      case WeightView::Type::F8E4M3: break;  // fp8 codes load only as fp8 (host_fp8_weight)
    }
  } else if (dtype == ScalarType::BF16) {
    uint16_t* out = static_cast<uint16_t*>(dst);
    switch (src.type) {
      case WeightView::Type::BF16: std::memcpy(out, src.data, n * 2); return;
      case WeightView::Type::F32: {
        const float* in = reinterpret_cast<const float*>(src.data);
        for (int64_t i = 0; i < n; ++i) out[i] = f32_to_bf16(in[i]);
        return;
      }
      case WeightView::Type::F16: {
        const uint16_t* in = reinterpret_cast<const uint16_t*>(src.data);
        for (int64_t i = 0; i < n; ++i) out[i] = f32_to_bf16(f16_to_f32(in[i]));
        return;
      }
      case WeightView::Type::F8E4M3: break;
    }
  }
  throw Error(ErrorKind::InvalidArgument, std::string("weights load as float32 or bfloat16, not ") + scalar_name(dtype));
}

}  // namespace

CpuBackend::CpuBackend(int num_threads, ScalarType activation_dtype, bool deterministic)
    : threads_(num_threads), deterministic_(deterministic), act_(activation_dtype) {
  if (act_ != ScalarType::F32 && act_ != ScalarType::BF16)
    throw Error(ErrorKind::InvalidArgument, std::string("CPU activation dtype must be float32 or bfloat16, got ") +
                                                scalar_name(act_));
  cores_ = all_cores_ = host_processors();
  if (threads_ <= 0) threads_ = cores_;
  set_decode_padding(false);  // nothing to share a recording: PAGEDRT_DECODE_PAD=1 only (tests)
  cpu::calibrate_prefetch(threads_);  // the decode GEMV's prefetch hint, once per process (gemm.hpp)
}

Tensor CpuBackend::load_weight(const std::vector<WeightView>& parts, ScalarType dtype) {
  if (dtype == ScalarType::F8E4M3) return host_fp8_weight(parts);
  int64_t rows = 0;
  std::vector<int64_t> shape = parts[0].shape;
  for (const WeightView& p : parts) rows += p.shape[0];
  shape[0] = rows;
  Tensor t = host_empty(shape, dtype);
  uint8_t* dst = static_cast<uint8_t*>(t.data);
  for (const WeightView& p : parts) {
    convert(p, dtype, dst);
    dst += p.numel() * scalar_size(dtype);
  }
  return t;
}

// bf16 weights of bf16 activations in the packed order where the kernel takes
// it (cpu::packs_bf16_rows), rearranged in place (a task's rows at a time).
Tensor CpuBackend::load_linear_weight(const std::vector<WeightView>& parts, ScalarType dtype) {
  Tensor t = load_weight(parts, dtype);
  if (dtype != ScalarType::BF16 || act_ != ScalarType::BF16 || t.shape.size() != 2 || !packs_bf16_rows(t.dim(1)))
    return t;
  pack_bf16_rows(t.as<uint16_t>(), t.dim(0), t.dim(1), t.as<uint16_t>());
  t.packed = true;
  return t;
}

Tensor CpuBackend::empty(std::vector<int64_t> shape, ScalarType dtype) {
  return host_empty(std::move(shape), dtype);
}

namespace {

// Activations are float, or uint16_t holding bf16 bits; math is fp32 and a
// bf16 value is rounded to nearest even where it is stored (to_f32 and
// store_f32, backend/tensor.hpp).

// Calls f with the typed data pointer of `t` (float* or uint16_t*).
template <typename F>
void with_act(const Tensor& t, F&& f) {
  if (t.dtype == ScalarType::BF16)
    f(static_cast<uint16_t*>(t.data));
  else
    f(static_cast<float*>(t.data));
}

// sum of x[i]^2, i < d
inline float sum_squares(const float* x, int64_t d) {
  int64_t i = 0;
  float ss = 0.0f;
#ifdef PAGEDRT_VEC512
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  for (; i + 32 <= d; i += 32) {
    const __m512 x0 = _mm512_loadu_ps(x + i), x1 = _mm512_loadu_ps(x + i + 16);
    a0 = _mm512_fmadd_ps(x0, x0, a0);
    a1 = _mm512_fmadd_ps(x1, x1, a1);
  }
  if (i + 16 <= d) {
    const __m512 x0 = _mm512_loadu_ps(x + i);
    a0 = _mm512_fmadd_ps(x0, x0, a0);
    i += 16;
  }
  ss = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#endif
  for (; i < d; ++i) ss += x[i] * x[i];
  return ss;
}

// out = x / sqrt(mean(x^2) + eps) * w, as transformers' LlamaRMSNorm in fp32
// (w * (x * inv), in that order).
template <typename T>
inline void rms_row(const float* x, const float* w, float eps, int64_t d, T* out) {
  const float inv = 1.0f / std::sqrt(sum_squares(x, d) / static_cast<float>(d) + eps);
  int64_t i = 0;
#ifdef PAGEDRT_VEC512
  const __m512 iv = _mm512_set1_ps(inv);
  for (; i + 16 <= d; i += 16)
    store16(out + i, _mm512_mul_ps(_mm512_loadu_ps(w + i), _mm512_mul_ps(_mm512_loadu_ps(x + i), iv)));
#endif
  for (; i < d; ++i) store_f32(out + i, w[i] * (x[i] * inv));
}

// r (n) += x (n), x fp32 or bf16
template <typename T>
inline void add_row(float* r, const T* x, int64_t n) {
  int64_t i = 0;
#ifdef PAGEDRT_VEC512
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(r + i, _mm512_add_ps(_mm512_loadu_ps(r + i), load16(x + i)));
#endif
  for (; i < n; ++i) r[i] += to_f32(x[i]);
}

// Rows are split over threads only from this many elements on (29 rows of
// SmolLM2's 576, 11 of its 1,536): below it a step's rows are a few
// microseconds of work, less than an OpenMP fork and join. Session 35 (2-core
// Zen 4 VM, alternating processes): 2^14 against 2^16, where a 32-row decode
// step's norms, SiLU·mul and most narrowing ran on one thread while the
// other spun, batched 32 x 128 563 against 551 tok/s (5 of 6 pairs), and
// structured output's JSON / plain ratio 0.974 against 0.963 (its helper
// thread shares the cores).
constexpr int64_t kParallelElements = int64_t{1} << 14;

// dst (n) = fp32 of bf16 src (n): exact
inline void widen(const uint16_t* src, int64_t n, float* dst) {
  int64_t i = 0;
#ifdef PAGEDRT_VEC512
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, widen16(src + i));
#endif
  for (; i < n; ++i) dst[i] = bf16_to_f32(src[i]);
}

// dst (n) = bf16 of fp32 src (n), round to nearest even, NaN kept quiet
// (bit-for-bit f32_to_bf16, so the same as the GPU's __float2bfloat16_rn)
inline void narrow(const float* src, int64_t n, uint16_t* dst) {
  int64_t i = 0;
#ifdef PAGEDRT_VEC512
  for (; i + 16 <= n; i += 16) store16(dst + i, _mm512_loadu_ps(src + i));
#endif
  for (; i < n; ++i) dst[i] = f32_to_bf16(src[i]);
}

// out (n) = silu(g) * u = g / (1 + e^-g) * u
template <typename T>
inline void silu_mul_row(const T* g, const T* u, int64_t n, T* out) {
  int64_t i = 0;
#ifdef PAGEDRT_VEC512
  const __m512 one = _mm512_set1_ps(1.0f);
  for (; i < n; i += 16) {
    const __mmask16 m = first_lanes(n - i);
    const __m512 gv = load16(g + i, m);
    const __m512 s = _mm512_div_ps(gv, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
    store16(out + i, _mm512_mul_ps(s, load16(u + i, m)), m);
  }
#endif
  for (; i < n; ++i) {
    const float gi = to_f32(g[i]);
    store_f32(out + i, gi / (1.0f + std::exp(-gi)) * to_f32(u[i]));
  }
}

// narrow() over rows of a GEMM's output, split over threads for prefill-sized outputs.
void narrow_rows(const float* src, int64_t n, int64_t m, uint16_t* dst, int threads) {
  parallel_for(n, n * m >= kParallelElements ? threads : 1, [&](int64_t t) { narrow(src + t * m, m, dst + t * m); });
}

// Staging that only grows: resize() zero-fills what it adds, and the
// projections of a layer alternate between sizes (a 32-row SmolLM2 decode
// step refilled ~11 MB a step, 1.7% of its time, by shrinking and growing).
void grow(std::vector<float>& v, int64_t n) {
  if (v.size() < static_cast<size_t>(n)) v.resize(static_cast<size_t>(n));
}

}  // namespace

void CpuBackend::embedding(const Tensor& table, int64_t first_id, Tensor& out) {
  const int64_t rows = table.dim(0), hidden = table.dim(1);
  float* y = out.as<float>();
  for (int32_t t = 0; t < batch_.num_tokens; ++t) {
    const int64_t id = batch_.token_ids[t] - first_id;
    float* dst = y + t * hidden;
    if (id < 0 || id >= rows) {  // another rank's row (vocabulary-parallel)
      std::fill(dst, dst + hidden, 0.0f);
    } else if (table.dtype == ScalarType::F32) {
      std::memcpy(dst, table.as<float>() + id * hidden, hidden * 4);
    } else if (table.packed) {  // a tied lm head's table (load_linear_weight): kPackLanes at a time
      for (int64_t i = 0; i < hidden; i += kPackLanes) {
        const uint16_t* src = table.as<uint16_t>() + packed_bf16_at(rows, hidden, id, i);
        for (int64_t j = 0; j < kPackLanes; ++j) dst[i + j] = bf16_to_f32(src[j]);
      }
    } else {
      const uint16_t* src = table.as<uint16_t>() + id * hidden;
      for (int64_t i = 0; i < hidden; ++i) dst[i] = bf16_to_f32(src[i]);
    }
  }
}

void CpuBackend::rms_norm(const Tensor& x, const Tensor& weight, float eps, int64_t n, Tensor& out) {
  const int64_t d = weight.numel();
  with_act(out, [&](auto* y) {
    parallel_for(n, n * d >= kParallelElements ? team() : 1,
                 [&](int64_t t) { rms_row(x.as<float>() + t * d, weight.as<float>(), eps, d, y + t * d); });
  });
}

// residual += x, then out = rms_norm(residual), row by row while the row is in L1
void CpuBackend::add_rms_norm(Tensor& residual, const Tensor& x, const Tensor& weight, float eps, int64_t n,
                              Tensor& out) {
  const int64_t d = weight.numel();
  float* r = residual.as<float>();
  with_act(x, [&](const auto* xi) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(xi)>>;
    T* y = out.as<T>();
    parallel_for(n, n * d >= kParallelElements ? team() : 1, [&](int64_t t) {
      add_row(r + t * d, xi + t * d, d);
      rms_row(r + t * d, weight.as<float>(), eps, d, y + t * d);
    });
  });
}

void CpuBackend::linear(const Tensor& x, const Tensor& weight, int64_t n, Tensor& out) {
  const int64_t m = weight.dim(0), k = weight.dim(1);
  float* yf = out.as<float>();
  if (out.dtype == ScalarType::BF16) {
    grow(y32_, n * m);
    yf = y32_.data();
  }
  if (weight.dtype == ScalarType::F8E4M3) {  // codes dequantized per task of rows (gemm.hpp)
    const bool xb = x.dtype == ScalarType::BF16;
    gemm_f8(xb ? nullptr : x.as<float>(), xb ? x.as<uint16_t>() : nullptr, weight.as<uint8_t>(),
            weight.row_scale->as<float>(), yf, n, m, k, team(), !deterministic_);
    if (out.dtype == ScalarType::BF16) narrow_rows(yf, n, m, out.as<uint16_t>(), team());
    return;
  }
  if (weight.packed && x.dtype != ScalarType::BF16)
    throw Error(ErrorKind::Runtime, "linear: packed bf16 weights take bf16 activations, not " +
                                        std::string(scalar_name(x.dtype)));
  if (x.dtype == ScalarType::BF16 && weight.dtype == ScalarType::BF16) {
    // bf16 x bf16 with fp32 accumulation (VDPBF16PS where the processor has
    // it; with deterministic=False, AMX tiles for larger steps where it has
    // those; packed weights, load_linear_weight's: the avx512bf16 kernel's bits)
    if (weight.packed)
      gemm_bf16_bf16_packed(x.as<uint16_t>(), weight.as<uint16_t>(), yf, n, m, k, team());
    else if (deterministic_)
      gemm_bf16_bf16(x.as<uint16_t>(), weight.as<uint16_t>(), yf, n, m, k, team());
    else
      gemm_bf16_bf16_any_order(x.as<uint16_t>(), weight.as<uint16_t>(), yf, n, m, k, team());
    if (out.dtype == ScalarType::BF16) narrow_rows(yf, n, m, out.as<uint16_t>(), team());
    return;
  }
  // bf16 activations with fp32 weights: widened to fp32 (exact)
  const float* xf = x.as<float>();
  if (x.dtype == ScalarType::BF16) {
    grow(x32_, n * k);
    widen(x.as<uint16_t>(), n * k, x32_.data());
    xf = x32_.data();
  }
  if (weight.dtype == ScalarType::F32)
    gemm_f32(xf, weight.as<float>(), yf, n, m, k, team());
  else
    gemm_bf16(xf, weight.as<uint16_t>(), yf, n, m, k, team());
  if (out.dtype == ScalarType::BF16) narrow_rows(yf, n, m, out.as<uint16_t>(), team());
}

void CpuBackend::add(Tensor& residual, const Tensor& x, int64_t n) {
  with_act(x, [&](const auto* xi) { add_row(residual.as<float>(), xi, n * residual.dim(1)); });
}

void CpuBackend::rope_and_cache(Tensor& qkv, const RopeTable& rope, int64_t num_heads,
                                int64_t num_kv_heads, int64_t head_dim, Tensor& k_cache,
                                Tensor& v_cache) {
  with_act(qkv, [&](auto* q) {
    using T = std::remove_pointer_t<decltype(q)>;
    if (k_cache.dtype == ScalarType::F8E4M3) {
      const Fp8Kv kv = fp8_paged_kv(k_cache.as<uint8_t>(), v_cache.as<uint8_t>(), k_cache.dim(0), k_cache.dim(1),
                                    num_kv_heads, head_dim, batch_.page_indptr, batch_.page_indices);
      return cpu::rope_and_cache<T>(batch_, q, rope.cos.as<float>(), rope.sin.as<float>(), num_heads, kv, team());
    }
    const PagedKv<T> kv = nhd_paged_kv(k_cache.as<T>(), v_cache.as<T>(), k_cache.dim(1), num_kv_heads, head_dim,
                                       batch_.page_indptr, batch_.page_indices);
    cpu::rope_and_cache<T>(batch_, q, rope.cos.as<float>(), rope.sin.as<float>(), num_heads, kv, team());
  });
}

void CpuBackend::paged_attention(const Tensor& qkv, const Tensor& k_cache, const Tensor& v_cache,
                                 int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                                 float scale, Tensor& out) {
  attend(qkv, k_cache, v_cache, num_heads, num_kv_heads, head_dim, scale, out, /*logit_rows_only=*/false);
}

void CpuBackend::rope_cache_attention_logit_rows(Tensor& qkv, const RopeTable& rope, int64_t num_heads,
                                                 int64_t num_kv_heads, int64_t head_dim, float scale,
                                                 Tensor& k_cache, Tensor& v_cache, Tensor& out) {
  rope_and_cache(qkv, rope, num_heads, num_kv_heads, head_dim, k_cache, v_cache);
  attend(qkv, k_cache, v_cache, num_heads, num_kv_heads, head_dim, scale, out, /*logit_rows_only=*/true);
}

void CpuBackend::attend(const Tensor& qkv, const Tensor& k_cache, const Tensor& v_cache, int64_t num_heads,
                        int64_t num_kv_heads, int64_t head_dim, float scale, Tensor& out, bool logit_rows_only) {
  with_act(qkv, [&](const auto* q) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(q)>>;
    if (k_cache.dtype == ScalarType::F8E4M3) {
      const Fp8Kv kv = fp8_paged_kv(const_cast<uint8_t*>(k_cache.as<uint8_t>()),
                                    const_cast<uint8_t*>(v_cache.as<uint8_t>()), k_cache.dim(0), k_cache.dim(1),
                                    num_kv_heads, head_dim, batch_.page_indptr, batch_.page_indices);
      return cpu::paged_attention<T>(batch_, q, num_heads, kv, scale, out.as<T>(), team(), deterministic_,
                                     logit_rows_only);
    }
    const PagedKv<const T> kv = nhd_paged_kv(k_cache.as<T>(), v_cache.as<T>(), k_cache.dim(1), num_kv_heads,
                                             head_dim, batch_.page_indptr, batch_.page_indices);
    cpu::paged_attention<T>(batch_, q, num_heads, kv, scale, out.as<T>(), team(), deterministic_, logit_rows_only);
  });
}

void CpuBackend::silu_mul(const Tensor& gate_up, int64_t n, Tensor& out) {
  const int64_t inter = out.dim(1);
  with_act(gate_up, [&](const auto* gu) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(gu)>>;
    T* y = out.as<T>();
    parallel_for(n, n * inter >= kParallelElements ? team() : 1, [&](int64_t t) {
      silu_mul_row(gu + t * 2 * inter, gu + t * 2 * inter + inter, inter, y + t * inter);
    });
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

void CpuBackend::swap_blocks(Tensor& cache, const std::vector<BlockCopy>& pairs, void* host, bool to_host) {
  for_each_swap(cache, pairs, host, to_host, [](void* dst, const void* src, size_t n) { std::memcpy(dst, src, n); });
}

void CpuBackend::to_host(const Tensor& src, int64_t numel, float* dst) {
  std::memcpy(dst, src.data, numel * 4);
}

void CpuBackend::download(const Tensor& src, void* dst) { std::memcpy(dst, src.data, src.nbytes()); }

void CpuBackend::argmax(const Tensor& logits, int64_t rows, int32_t* out, const RowMasks& masks) {
  if (logits.dtype != ScalarType::F32 || rows > logits.dim(0))
    throw Error(ErrorKind::Runtime, "argmax: fp32 logits rows");
  const int64_t vocab = logits.dim(1);
  const float* x = logits.as<float>();
  parallel_for(rows, rows * vocab > (1 << 18) ? team() : 1, [&](int64_t r) {
    const int32_t m = masks.mask_of_row != nullptr ? masks.mask_of_row[r] : -1;
    const uint32_t* allowed = m >= 0 ? masks.words + m * masks.words_per_row : nullptr;
    out[r] = static_cast<int32_t>(first_argmax(x + r * vocab, vocab, allowed));
  });
}

}  // namespace pagedrt::cpu
