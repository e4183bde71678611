// backend/cuda/cuda_ops.cu — the CUDA backend's ops: checks, then launches.
#include "backend/cuda/cuda_backend.hpp"

#include <algorithm>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include <cuda.h>
#include <cudaTypedefs.h>

#include <atomic>

#include "backend/cuda/cuda_check.hpp"
#include "backend/cuda/launch.cuh"

namespace pagedrt::cuda {

// ---- ops ---------------------------------------------------------------------------
//
// Every activation and the KV cache are act_ (bf16, or fp32 in the validation
// mode); the residual stream is fp32 in both.

void CudaBackend::embedding(const Tensor& table, int64_t first_id, Tensor& out) {
  require(table.dtype == act_ && out.dtype == ScalarType::F32, "embedding: table of the activation dtype, fp32 out");
  if (act_ == ScalarType::BF16)
    cuda::embedding(table.as<bf16>(), table.dim(0), table.dim(1), first_id, dev_.token_ids, host_.num_tokens,
                    out.as<float>(), stream_);
  else
    cuda::embedding(table.as<float>(), table.dim(0), table.dim(1), first_id, dev_.token_ids, host_.num_tokens,
                    out.as<float>(), stream_);
}

// With fp8 weights a norm's bf16 output also goes out as the codes the next
// fp8 linear takes (fp8_norm_out, fp8_pending_): one quantizing kernel fewer
// before qkv and before gate/up in every layer.
void CudaBackend::rms_norm(const Tensor& x, const Tensor& weight, float eps, int64_t n, Tensor& out) {
  require(weight.dtype == ScalarType::F32, "rms_norm: fp32 weight");
  const int64_t d = weight.numel();
  const Fp8Out f8 = fp8_norm_out(out, n, d);
  bool coded = false;
  if (x.dtype == ScalarType::F32 && out.dtype == ScalarType::BF16)
    coded = cuda::rms_norm(x.as<float>(), weight.as<float>(), eps, n, d, out.as<bf16>(), stream_, f8);
  else if (x.dtype == ScalarType::F32 && out.dtype == ScalarType::F32)
    cuda::rms_norm(x.as<float>(), weight.as<float>(), eps, n, d, out.as<float>(), stream_);
  else if (x.dtype == ScalarType::BF16 && out.dtype == ScalarType::BF16)
    coded = cuda::rms_norm(x.as<bf16>(), weight.as<float>(), eps, n, d, out.as<bf16>(), stream_, f8);
  else
    require(false, std::string("rms_norm: ") + scalar_name(x.dtype) + " -> " + scalar_name(out.dtype));
  fp8_pending_ = coded ? Fp8Pending{out.data, n, d} : Fp8Pending{};
}

void CudaBackend::add_rms_norm(Tensor& residual, const Tensor& x, const Tensor& weight, float eps, int64_t n,
                               Tensor& out) {
  require(residual.dtype == ScalarType::F32 && x.dtype == act_ && out.dtype == act_,
          "add_rms_norm: fp32 residual, x and out of the activation dtype");
  const int64_t d = weight.numel();
  bool coded = false;
  if (act_ == ScalarType::BF16)
    coded = cuda::add_rms_norm(residual.as<float>(), x.as<bf16>(), weight.as<float>(), eps, n, d, out.as<bf16>(),
                               stream_, fp8_norm_out(out, n, d));
  else
    cuda::add_rms_norm(residual.as<float>(), x.as<float>(), weight.as<float>(), eps, n, d, out.as<float>(), stream_);
  fp8_pending_ = coded ? Fp8Pending{out.data, n, d} : Fp8Pending{};
}

void CudaBackend::linear(const Tensor& x, const Tensor& weight, int64_t n, Tensor& out) {
  require(out.dtype == act_ || out.dtype == ScalarType::F32, "linear: out of the activation dtype or fp32");
  if (weight.dtype == ScalarType::F8E4M3) {  // x quantized per token, then e4m3 x e4m3 (W8A8)
    const int64_t m = weight.dim(0), k = weight.dim(1);
    // Without a norm's codes for x, a GEMV of up to 2 rows quantizes x itself
    // (Gemv::run_f8_quant_x: batch-1 decode's o_proj and down); else
    // quantize_act takes a norm's pending codes or quantizes x.
    if (gemv_quant_x_ && !fp8_codes_pending(x, n, k) && x.dtype == ScalarType::BF16 && x.dim(1) == k &&
        gemm_->run_f8_quant_x(x.data, weight.data, weight.row_scale->as<float>(), out.data, n, m, k,
                              out.dtype == ScalarType::F32)) {
      fp8_pending_ = {};
      ++fp8_gemv_quantized_;
      // The scratch is still sized as quantize_act would size it: the norms
      // write their codes only where it holds them (fp8_norm_out).
      ensure_fp8_act(n, k);
      return;
    }
    const float* xs = nullptr;
    const uint8_t* xq = quantize_act(x, n, k, &xs);
    gemm_->run_f8(xq, xs, weight.data, weight.row_scale->as<float>(), out.data, n, m, k,
                  out.dtype == ScalarType::F32);
    return;
  }
  fp8_pending_ = {};
  require(x.dtype == act_ && weight.dtype == act_, "linear: x and weight of the activation dtype");
  gemm_->run(x.data, weight.data, out.data, n, weight.dim(0), weight.dim(1), out.dtype == ScalarType::F32,
             act_ == ScalarType::F32);
}

bool CudaBackend::linear_into_residual(const Tensor& x, const Tensor& weight, int64_t n, Tensor& residual) {
  if (act_ != ScalarType::BF16 || weight.dtype != ScalarType::BF16 || x.dtype != ScalarType::BF16 ||
      residual.dtype != ScalarType::F32)
    return false;
  require(residual.dim(1) == weight.dim(0) && x.dim(1) == weight.dim(1) && residual.dim(0) >= n && x.dim(0) >= n,
          "linear_into_residual: residual (n, m) += x (n, k) @ weight (m, k)^T");
  if (!gemm_->run_accumulate(x.data, weight.data, residual.as<float>(), n, weight.dim(0), weight.dim(1)))
    return false;
  fp8_pending_ = {};
  return true;
}

bool CudaBackend::warm_linear_into_residual(const Tensor& weight, int64_t max_rows) {
  const int64_t min_rows = gemm_->residual_min_rows();
  if (weight.shape.size() != 2 || weight.dtype != ScalarType::BF16 || act_ != ScalarType::BF16 || min_rows == 0)
    return false;
  const int64_t m = weight.dim(0), k = weight.dim(1);
  // Fewer rows than min_rows: linear()'s bf16-output bands; from min_rows: run_accumulate's fp32-output plan.
  gemm_->warm(weight.data, m, k, /*out_f32=*/false, false, false, nullptr, std::min(max_rows, min_rows - 1));
  if (max_rows >= min_rows) gemm_->warm(weight.data, m, k, /*out_f32=*/true, false, false, nullptr, max_rows, min_rows);
  return true;
}

void CudaBackend::add(Tensor& residual, const Tensor& x, int64_t n) {
  require(residual.dtype == ScalarType::F32 && x.dtype == act_, "add: fp32 residual, x of the activation dtype");
  const int64_t numel = n * residual.dim(1);
  if (act_ == ScalarType::BF16)
    cuda::add(residual.as<float>(), x.as<bf16>(), numel, stream_);
  else
    cuda::add(residual.as<float>(), x.as<float>(), numel, stream_);
}

namespace {
template <typename T, typename Arrays>
void rope_and_cache_t(Tensor& qkv, const RopeTable& rope, const Arrays& b, int64_t n, int H, int Hkv, int D,
                      Tensor& k_cache, Tensor& v_cache, cudaStream_t s) {
  cuda::rope_and_cache(qkv.as<T>(), rope.cos.as<float>(), rope.sin.as<float>(), b.positions, b.slot_mapping, n, H,
                       Hkv, D, k_cache.as<T>(), v_cache.as<T>(), s);
}
}  // namespace

namespace {
// The fp8 view of byte caches (num_blocks, block_size, row_bytes) with the step's page table.
Fp8Kv fp8_view(const Tensor& k_cache, const Tensor& v_cache, int64_t Hkv, int64_t D, const int32_t* indptr,
               const int32_t* indices) {
  require(k_cache.shape.size() == 3 && k_cache.shape == v_cache.shape && k_cache.dim(1) % 4 == 0 &&
              k_cache.dim(2) == fp8_row_bytes(k_cache.dim(1), Hkv, D) && (D == 64 || D == 128),
          "fp8 KV caches (num_blocks, block_size % 4 == 0, fp8_row_bytes) and head_dim 64 or 128");
  return fp8_paged_kv(const_cast<uint8_t*>(k_cache.as<uint8_t>()), const_cast<uint8_t*>(v_cache.as<uint8_t>()),
                      k_cache.dim(0), k_cache.dim(1), Hkv, D, indptr, indices);
}
}  // namespace

void CudaBackend::rope_and_cache(Tensor& qkv, const RopeTable& rope, int64_t num_heads, int64_t num_kv_heads,
                                 int64_t head_dim, Tensor& k_cache, Tensor& v_cache) {
  const int H = static_cast<int>(num_heads), Hkv = static_cast<int>(num_kv_heads), D = static_cast<int>(head_dim);
  if (k_cache.dtype == ScalarType::F8E4M3) {  // rotate in place, then quantize k and v into the slots
    require(qkv.dtype == act_ && act_ == ScalarType::BF16, "rope_and_cache: an fp8 cache with bf16 activations");
    cuda::rope_and_cache<bf16>(qkv.as<bf16>(), rope.cos.as<float>(), rope.sin.as<float>(), dev_.positions,
                               dev_.slot_mapping, host_.num_tokens, H, Hkv, D, nullptr, nullptr, stream_);
    cuda::quantize_kv(qkv.as<bf16>(), dev_.slot_mapping, host_.num_tokens, H,
                      fp8_view(k_cache, v_cache, Hkv, D, dev_.page_indptr, dev_.page_indices), stream_);
    return;
  }
  require(qkv.dtype == act_ && k_cache.dtype == act_, "rope_and_cache: qkv and cache of the activation dtype");
  if (act_ == ScalarType::BF16)
    rope_and_cache_t<bf16>(qkv, rope, dev_, host_.num_tokens, H, Hkv, D, k_cache, v_cache, stream_);
  else
    rope_and_cache_t<float>(qkv, rope, dev_, host_.num_tokens, H, Hkv, D, k_cache, v_cache, stream_);
}

template <typename T>
AttentionParamsT<T> CudaBackend::attention_params(const Tensor& qkv, const Tensor& k_cache, const Tensor& v_cache,
                                                  int64_t H, int64_t Hkv, int64_t D, float scale, Tensor& out) const {
  AttentionParamsT<T> p;
  p.qkv = qkv.as<T>();
  // The kernels write the caches only with rope_cos set, which only
  // rope_cache_attention sets, on caches it holds writable.
  p.kv = nhd_paged_kv(const_cast<T*>(k_cache.as<T>()), const_cast<T*>(v_cache.as<T>()), k_cache.dim(1), Hkv, D,
                      dev_.page_indptr, dev_.page_indices);
  p.kv.num_blocks = k_cache.dim(0);
  if (k_cache.dtype == ScalarType::F8E4M3) {  // kv keeps the shape and page table; the codes are p.fp8's
    p.fp8 = fp8_view(k_cache, v_cache, Hkv, D, dev_.page_indptr, dev_.page_indices);
    p.kv.k = p.kv.v = nullptr;
  }
  p.out = out.as<T>();
  p.positions = dev_.positions;
  p.query_start = dev_.query_start;
  p.num_heads = static_cast<int>(H);
  p.scale = scale;
  return p;
}

void CudaBackend::paged_attention(const Tensor& qkv, const Tensor& k_cache, const Tensor& v_cache,
                                  int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, float scale,
                                  Tensor& out) {
  attend(qkv, k_cache, v_cache, num_heads, num_kv_heads, head_dim, scale, out, /*logit_rows_only=*/false);
}

void CudaBackend::rope_cache_attention_logit_rows(Tensor& qkv, const RopeTable& rope, int64_t num_heads,
                                                  int64_t num_kv_heads, int64_t head_dim, float scale,
                                                  Tensor& k_cache, Tensor& v_cache, Tensor& out) {
  check_attention(num_heads, num_kv_heads, head_dim);
  plan_attention(num_heads, num_kv_heads, head_dim);
  if (plan_info_.logit_prefill.num_tiles == plan_info_.prefill.num_tiles)  // every tile (or a recordable step)
    return rope_cache_attention(qkv, rope, num_heads, num_kv_heads, head_dim, scale, k_cache, v_cache, out);
  rope_and_cache(qkv, rope, num_heads, num_kv_heads, head_dim, k_cache, v_cache);
  attend(qkv, k_cache, v_cache, num_heads, num_kv_heads, head_dim, scale, out, /*logit_rows_only=*/true);
}

void CudaBackend::attend(const Tensor& qkv, const Tensor& k_cache, const Tensor& v_cache, int64_t num_heads,
                         int64_t num_kv_heads, int64_t head_dim, float scale, Tensor& out, bool logit_rows_only) {
  check_attention(num_heads, num_kv_heads, head_dim);
  plan_attention(num_heads, num_kv_heads, head_dim);
  const PrefillPlan& f = logit_rows_only ? plan_info_.logit_prefill : plan_info_.prefill;
  if (k_cache.dtype == ScalarType::F8E4M3)
    return paged_attention_fp8(qkv, k_cache, v_cache, num_heads, num_kv_heads, head_dim, scale, out, f);
  require(qkv.dtype == act_ && out.dtype == act_ && k_cache.dtype == act_,
          "paged_attention: qkv, cache and out of the activation dtype");
  if (act_ == ScalarType::BF16) {
    const AttentionParams p =
        attention_params<bf16>(qkv, k_cache, v_cache, num_heads, num_kv_heads, head_dim, scale, out);
    prefill_attention(p, f, stream_);
    decode_attention(p, plan_info_.decode, stream_);
  } else {  // every token is a decode item (plan_attention)
    decode_attention(attention_params<float>(qkv, k_cache, v_cache, num_heads, num_kv_heads, head_dim, scale, out),
                     plan_info_.decode, stream_);
  }
}

// fp8 KV: decode items read the fp8 blocks (attention_decode.cu's F8 form);
// prefill tiles read their sequences' blocks dequantized to bf16 in
// fp8_scratch_ through the renumbered page table (plan_attention), with the
// bf16 prefill kernels unchanged.
void CudaBackend::paged_attention_fp8(const Tensor& qkv, const Tensor& k_cache, const Tensor& v_cache,
                                      int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, float scale,
                                      Tensor& out, const PrefillPlan& f) {
  require(qkv.dtype == ScalarType::BF16 && out.dtype == ScalarType::BF16 && v_cache.dtype == ScalarType::F8E4M3,
          "paged_attention: an fp8 cache with bf16 activations");
  const AttentionPlan& plan = plan_info_;
  // Decode reads p.fp8; prefill's kv is replaced below by the scratch.
  const AttentionParams p =
      attention_params<bf16>(qkv, k_cache, v_cache, num_heads, num_kv_heads, head_dim, scale, out);
  if (f.num_tiles > 0) {
    const int64_t block_elems = k_cache.dim(1) * num_kv_heads * head_dim;
    const size_t need = static_cast<size_t>(2 * plan.num_fp8_pages * block_elems) * sizeof(bf16);
    if (need > fp8_scratch_bytes_) {
      if (fp8_scratch_) CUDA_CHECK(cudaFree(fp8_scratch_));  // waits for the GPU
      fp8_scratch_ = nullptr;
      fp8_scratch_bytes_ = 0;
      CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&fp8_scratch_), need + need / 2));
      fp8_scratch_bytes_ = need + need / 2;
    }
    bf16* ks = fp8_scratch_;
    bf16* vs = fp8_scratch_ + plan.num_fp8_pages * block_elems;
    cuda::dequantize_kv_blocks(p.fp8, plan.fp8_src, plan.num_fp8_pages, ks, vs, stream_);
    AttentionParams pf = p;
    pf.fp8 = Fp8Kv{};
    pf.kv = nhd_paged_kv(ks, vs, k_cache.dim(1), num_kv_heads, head_dim, dev_.page_indptr, plan.fp8_pages);
    pf.kv.num_blocks = plan.num_fp8_pages;
    prefill_attention(pf, f, stream_);
  }
  decode_attention(p, plan.decode, stream_);
}

void CudaBackend::silu_mul(const Tensor& gate_up, int64_t n, Tensor& out) {
  require(gate_up.dtype == act_ && out.dtype == act_, "silu_mul: in and out of the activation dtype");
  if (act_ == ScalarType::BF16)
    cuda::silu_mul(gate_up.as<bf16>(), n, out.dim(1), out.as<bf16>(), stream_);
  else
    cuda::silu_mul(gate_up.as<float>(), n, out.dim(1), out.as<float>(), stream_);
}

void CudaBackend::rope_cache_attention(Tensor& qkv, const RopeTable& rope, int64_t num_heads, int64_t num_kv_heads,
                                       int64_t head_dim, float scale, Tensor& k_cache, Tensor& v_cache, Tensor& out) {
  check_attention(num_heads, num_kv_heads, head_dim);
  plan_attention(num_heads, num_kv_heads, head_dim);
  // Only where every token is its sequence's only query token: a prefill
  // token reads the keys of the tokens before it in the same step, which
  // must be in the cache first. On an fp8 cache only up to a block an SM
  // (where the plan runs the CUDA-core kernel): the append delays the split's
  // first load, which costs more than two small kernels in bigger grids
  // (H200, 8B shape with fp8 weights and KV, on the tensor-core kernel:
  // batch-1 TPOT 3.36 ms fused against 3.45 unfused, 512 x 1,024/1,024
  // 14,558 tok/s fused against 15,069, 2026-12-04).
  const bool fp8 = k_cache.dtype == ScalarType::F8E4M3;
  if (!fuse_ || deterministic_ || host_.num_tokens != host_.num_seqs || plan_info_.prefill.num_tiles != 0 ||
      !plan_info_.slots_fit ||
      (fp8 && !plan_info_.decode_one_wave)) {
    rope_and_cache(qkv, rope, num_heads, num_kv_heads, head_dim, k_cache, v_cache);
    paged_attention(qkv, k_cache, v_cache, num_heads, num_kv_heads, head_dim, scale, out);
    return;
  }
  if (fp8)  // the fp8 kernels rotate, quantize and append (attention_decode_fp8.cu, attention_decode_cc.cu)
    require(act_ == ScalarType::BF16 && qkv.dtype == act_ && out.dtype == act_ &&
                v_cache.dtype == ScalarType::F8E4M3,
            "rope_cache_attention: an fp8 cache with bf16 activations");
  else
    require(qkv.dtype == act_ && out.dtype == act_ && k_cache.dtype == act_ && v_cache.dtype == act_,
            "rope_cache_attention: qkv, caches and out of the activation dtype");
  auto fused = [&](auto p) {
    p.rope_cos = rope.cos.as<float>();
    p.rope_sin = rope.sin.as<float>();
    decode_attention(p, plan_info_.decode, stream_);
  };
  if (act_ == ScalarType::BF16)
    fused(attention_params<bf16>(qkv, k_cache, v_cache, num_heads, num_kv_heads, head_dim, scale, out));
  else
    fused(attention_params<float>(qkv, k_cache, v_cache, num_heads, num_kv_heads, head_dim, scale, out));
}

void CudaBackend::warm_linear(const Tensor& weight, int64_t max_rows, ScalarType out_dtype) {
  if (weight.shape.size() != 2) return;
  const bool f8 = weight.dtype == ScalarType::F8E4M3;
  gemm_->warm(weight.data, weight.dim(0), weight.dim(1), out_dtype == ScalarType::F32, act_ == ScalarType::F32, f8,
              f8 ? weight.row_scale->as<float>() : nullptr, max_rows);
}

int64_t CudaBackend::gemm_picks_asked() const { return gemm_->picks_asked(); }

int64_t CudaBackend::glu_min_rows() const { return fuse_ && act_ == ScalarType::BF16 ? gemm_->glu_min_rows() : 0; }

void CudaBackend::warm_linear_silu_mul(const Tensor& gate_up_weight, int64_t max_rows) {
  const int64_t min_rows = gate_up_weight.dtype == ScalarType::BF16 ? glu_min_rows() : 0;
  warm_linear(gate_up_weight, min_rows > 0 ? std::min(max_rows, min_rows - 1) : max_rows, act_);
}

void CudaBackend::linear_silu_mul(const Tensor& x, const Tensor& gate_up_weight, int64_t n, Tensor& gate_up,
                                  Tensor& out) {
  const int64_t inter = gate_up_weight.dim(0) / 2;
  require(out.dim(1) == inter && gate_up_weight.dim(0) == 2 * inter, "linear_silu_mul: (2 I, k) weight, (n, I) out");
  if (gate_up_weight.dtype == ScalarType::F8E4M3) {
    const int64_t k = gate_up_weight.dim(1);
    const float* xs = nullptr;
    const uint8_t* xq = quantize_act(x, n, k, &xs);
    const float* ws = gate_up_weight.row_scale->as<float>();
    if (fuse_ && gemm_->run_silu_mul_f8(xq, xs, gate_up_weight.data, ws, out.data, n, inter, k)) return;
    gemm_->run_f8(xq, xs, gate_up_weight.data, ws, gate_up.data, n, 2 * inter, k, false);
    // cuBLASLt's rows (n > 8): silu_mul also writes out's codes for down
    // (H200, 8B shape, 256 x 1,024/128 with fp8 weights and KV: silu_mul and
    // quantizing its rows were 3.8% and ~6% of GPU time, 2026-12-04).
    const bool coded = act_ == ScalarType::BF16 && gate_up.dtype == act_ && out.dtype == act_ &&
                       cuda::silu_mul_codes(gate_up.as<bf16>(), n, inter, out.as<bf16>(), stream_,
                                            fp8_norm_out(out, n, inter));
    if (!coded) silu_mul(gate_up, n, out);
    fp8_pending_ = coded ? Fp8Pending{out.data, n, inter} : Fp8Pending{};
    return;
  }
  fp8_pending_ = {};
  if (fuse_ && act_ == ScalarType::BF16 && x.dtype == act_ && gate_up_weight.dtype == act_ && out.dtype == act_ &&
      gemm_->run_silu_mul(x.data, gate_up_weight.data, out.data, n, inter, gate_up_weight.dim(1)))
    return;
  linear(x, gate_up_weight, n, gate_up);
  silu_mul(gate_up, n, out);
}

void CudaBackend::gather_rows(const Tensor& x, Tensor& out) {
  require(x.dtype == out.dtype, "gather_rows: same dtype in and out");
  cuda::gather_rows(x.data, x.dim(1) * static_cast<int64_t>(scalar_size(x.dtype)), dev_.logits_indices,
                    host_.num_logits, out.data, stream_);
}

void CudaBackend::copy_blocks(Tensor& cache, const std::vector<BlockCopy>& copies) {
  if (copies.empty()) return;
  const int64_t block_bytes = static_cast<int64_t>(cache.nbytes()) / cache.dim(0);
  uint8_t* base = static_cast<uint8_t*>(cache.data);
  // A destination that is also a source makes the order matter: copy one by one.
  bool chained = block_bytes % 16 != 0;
  for (const BlockCopy& a : copies)
    for (const BlockCopy& c : copies) chained = chained || a.dst == c.src;
  if (chained) {
    for (const BlockCopy& c : copies)
      CUDA_CHECK(cudaMemcpyAsync(base + c.dst * block_bytes, base + c.src * block_bytes, block_bytes,
                                 cudaMemcpyDeviceToDevice, stream_));
    return;
  }
  const bool same = copies.size() == last_copies_.size() &&
                    std::equal(copies.begin(), copies.end(), last_copies_.begin(),
                               [](const BlockCopy& a, const BlockCopy& b) { return a.src == b.src && a.dst == b.dst; });
  if (!same) {
    int2* h = reinterpret_cast<int2*>(copies_.host(copies.size() * sizeof(int2)));
    for (size_t i = 0; i < copies.size(); ++i) h[i] = make_int2(copies[i].src, copies[i].dst);
    copies_.upload(copies.size() * sizeof(int2), stream_);
    last_copies_ = copies;
  }
  cuda::copy_blocks(base, block_bytes, reinterpret_cast<const int2*>(copies_.device()),
                    static_cast<int>(copies.size()), stream_);
}

std::shared_ptr<void> CudaBackend::host_alloc(size_t bytes) {
  void* p = nullptr;
  CUDA_CHECK(cudaHostAlloc(&p, bytes, cudaHostAllocMapped));  // swap_blocks' kernel reaches it (unified addressing)
  return std::shared_ptr<void>(p, [](void* q) { cudaFreeHost(q); });
}

// One kernel a cache tensor: a cudaMemcpyAsync a block and tensor made a swap
// of 2,308 blocks of the 8B shape 148K copies of 32 KB each way (~2 GB/s on
// the H200). The step's pairs go up once per direction (the 2 x layers calls
// share them).
void CudaBackend::swap_blocks(Tensor& cache, const std::vector<BlockCopy>& pairs, void* host, bool to_host) {
  if (pairs.empty()) return;
  const int64_t block_bytes = static_cast<int64_t>(cache.nbytes()) / cache.dim(0);
  static const bool unified = [] {
    int device = 0, on = 0;
    CUDA_CHECK(cudaGetDevice(&device));
    CUDA_CHECK(cudaDeviceGetAttribute(&on, cudaDevAttrUnifiedAddressing, device));
    return on != 0;
  }();
  if (block_bytes % 16 != 0 || !unified) {  // a copy a block
    const cudaMemcpyKind kind = to_host ? cudaMemcpyDeviceToHost : cudaMemcpyHostToDevice;
    for_each_swap(cache, pairs, host, to_host, [&](void* dst, const void* src, size_t n) {
      CUDA_CHECK(cudaMemcpyAsync(dst, src, n, kind, stream_));
    });
    return;
  }
  Staging& stage = swaps_[to_host ? 1 : 0];
  std::vector<BlockCopy>& last = last_swaps_[to_host ? 1 : 0];
  const bool same = pairs.size() == last.size() &&
                    std::equal(pairs.begin(), pairs.end(), last.begin(),
                               [](const BlockCopy& a, const BlockCopy& b) { return a.src == b.src && a.dst == b.dst; });
  if (!same) {
    int2* h = reinterpret_cast<int2*>(stage.host(pairs.size() * sizeof(int2)));
    for (size_t i = 0; i < pairs.size(); ++i) h[i] = make_int2(pairs[i].src, pairs[i].dst);
    stage.upload(pairs.size() * sizeof(int2), stream_);
    last = pairs;
  }
  cuda::swap_blocks(static_cast<uint8_t*>(cache.data), static_cast<uint8_t*>(host), block_bytes,
                    reinterpret_cast<const int2*>(stage.device()), static_cast<int>(pairs.size()), to_host, stream_);
}

void CudaBackend::to_host(const Tensor& src, int64_t numel, float* dst) {
  require(src.dtype == ScalarType::F32, "to_host: fp32 source");
  if (numel > 0)
    CUDA_CHECK(cudaMemcpyAsync(dst, src.data, static_cast<size_t>(numel) * 4, cudaMemcpyDeviceToHost, stream_));
  CUDA_CHECK(cudaStreamSynchronize(stream_));
}

void CudaBackend::argmax(const Tensor& logits, int64_t rows, int32_t* out, const RowMasks& masks) {
  require(logits.dtype == ScalarType::F32 && rows <= logits.dim(0), "argmax: fp32 logits rows");
  if (rows == 0) return;
  const int64_t vocab = logits.dim(1);
  // Masks (structured output): each row's mask index, then the masks' words,
  // up in one copy (32 JSON rows of a 49K vocabulary: 200 KB against the
  // 6.3 MB of logits the host sampler would need).
  // Gated masks (queue_gated_masks) are on the device already: only the index goes up.
  const int32_t* mask_of_row = nullptr;
  const uint32_t* mask_words = nullptr;
  if (masks.mask_of_row != nullptr && masks.num_masks > 0) {
    require(masks.words_per_row == (vocab + 31) / 32, "argmax: masks of (vocab + 31) / 32 words a row");
    const size_t index_bytes = align16(static_cast<size_t>(rows) * 4),
                 word_bytes = masks.gated ? 0 : static_cast<size_t>(masks.num_masks) * masks.words_per_row * 4;
    uint8_t* h = masks_.host(index_bytes + word_bytes);
    std::memcpy(h, masks.mask_of_row, static_cast<size_t>(rows) * 4);
    if (word_bytes) std::memcpy(h + index_bytes, masks.words, word_bytes);
    masks_.upload(index_bytes + word_bytes, stream_);
    mask_of_row = reinterpret_cast<const int32_t*>(masks_.device());
    mask_words = masks.gated ? masks.words : reinterpret_cast<const uint32_t*>(masks_.device() + index_bytes);
  }
  const size_t bytes = static_cast<size_t>(rows) * 4, scratch = static_cast<size_t>(rows) * kArgmaxParts * 8;
  // device: the picks, then the kernel's scratch; only the picks come back
  Staging& picks = picks_[slot_];
  int32_t* h = reinterpret_cast<int32_t*>(picks.host(align16(bytes) + scratch));
  argmax_rows(logits.as<float>(), rows, vocab, reinterpret_cast<int32_t*>(picks.device()),
              picks.device() + align16(bytes), stream_, mask_of_row, mask_words, masks.words_per_row);
  CUDA_CHECK(cudaMemcpyAsync(h, picks.device(), bytes, cudaMemcpyDeviceToHost, stream_));
  if (defer_) return pending_[slot_].push_back({h, out, bytes});
  CUDA_CHECK(cudaStreamSynchronize(stream_));
  std::memcpy(out, h, bytes);
}

// ---- gated masks (async scheduling's structured steps) ----------------------------------

uint32_t* CudaBackend::mask_gate(size_t words) {
  CUDA_CHECK(cudaSetDevice(device_));
  if (gate_flag_ == nullptr) {
    void* flag = nullptr;
    CUDA_CHECK(cudaHostAlloc(&flag, 64, cudaHostAllocMapped));
    gate_flag_ = static_cast<volatile uint32_t*>(flag);
    *gate_flag_ = 0;
    CUDA_CHECK(cudaHostGetDevicePointer(&gate_flag_dev_, flag, 0));
    CUDA_CHECK(cudaEventCreateWithFlags(&gate_copied_, cudaEventDisableTiming));
  }
  if (words > gate_cap_) {
    // The last gated copy must be done with the old buffers (it waits for its
    // gate). With chained fills the step ahead's fill may still be running
    // and write the old host buffer before it opens that gate: the copy, and
    // so this wait, come after that write.
    CUDA_CHECK(cudaEventSynchronize(gate_copied_));
    if (gate_host_) CUDA_CHECK(cudaFreeHost(gate_host_));
    if (gate_dev_) CUDA_CHECK(cudaFree(gate_dev_));
    gate_host_ = gate_dev_ = nullptr;
    const size_t cap = std::max<size_t>(2 * words, 4096);
    CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&gate_host_), cap * 4, cudaHostAllocDefault));
    CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&gate_dev_), cap * 4));
    gate_cap_ = cap;
  }
  return gate_host_;
}

const uint32_t* CudaBackend::queue_gated_masks(uint64_t id, size_t words) {
  require(gate_flag_ != nullptr && words <= gate_cap_,
          "queue_gated_masks: " + std::to_string(words) + " words past mask_gate()'s buffer");
  static const auto wait_value =
      driver_function<PFN_cuStreamWaitValue32_v11070>("cuStreamWaitValue32", "gated structured-output masks");
  CUDA_CHECK(cudaSetDevice(device_));
  // GEQ compares (int32_t)(flag - id) >= 0: ids wrap at 2^32 without harm
  gate_queued_ = static_cast<uint32_t>(id);
  size_t slot = 0;
  if (gate_timing_) {
    if (gate_events_.empty()) {
      gate_events_.resize(8);
      for (auto& e : gate_events_)
        for (auto& v : e) CUDA_CHECK(cudaEventCreate(&v));
    }
    slot = gate_event_next_++ % gate_events_.size();
    if (gate_event_next_ > gate_events_.size()) time_gates(slot);
    CUDA_CHECK(cudaEventRecord(gate_events_[slot][0], stream_));
  }
  const CUresult r = wait_value(reinterpret_cast<CUstream>(stream_), reinterpret_cast<CUdeviceptr>(gate_flag_dev_),
                                gate_queued_, CU_STREAM_WAIT_VALUE_GEQ);
  if (r != CUDA_SUCCESS)
    throw Error(ErrorKind::Runtime, "cuStreamWaitValue32 failed (CUresult " + std::to_string(static_cast<int>(r)) + ")");
  if (words > 0) CUDA_CHECK(cudaMemcpyAsync(gate_dev_, gate_host_, words * 4, cudaMemcpyHostToDevice, stream_));
  CUDA_CHECK(cudaEventRecord(gate_copied_, stream_));
  if (gate_timing_) {
    CUDA_CHECK(cudaEventRecord(gate_events_[slot][1], stream_));
    gate_pending_timing_ = true;
  }
  return gate_dev_;
}

void CudaBackend::time_gates(size_t slot) {
  // `slot`, about to be reused, holds the oldest gated step of the ring; the
  // next slot the one after it, whose forward ran from the oldest's results
  // to its own wait. Both are a ring's length old: done long ago (or not
  // yet, or never recorded: skipped).
  const size_t next = (slot + 1) % gate_events_.size();
  float fwd = 0.0f, stall = 0.0f, picks = 0.0f;
  if (cudaEventElapsedTime(&fwd, gate_events_[slot][2], gate_events_[next][0]) != cudaSuccess ||
      cudaEventElapsedTime(&stall, gate_events_[next][0], gate_events_[next][1]) != cudaSuccess ||
      cudaEventElapsedTime(&picks, gate_events_[next][1], gate_events_[next][2]) != cudaSuccess) {
    (void)cudaGetLastError();
    return;
  }
  if (fwd >= 0.0f && picks >= 0.0f) gate_ms_.push_back({fwd, stall, picks});
}

void CudaBackend::open_mask_gate(uint64_t id) {
  if (gate_flag_ == nullptr) return;
  std::atomic_thread_fence(std::memory_order_release);  // the buffer's words before the flag
  const uint32_t v = static_cast<uint32_t>(id);
  if (static_cast<int32_t>(v - *gate_flag_) > 0) *gate_flag_ = v;
}

// ---- deferred results (async scheduling) ----------------------------------------------

void CudaBackend::begin_results(bool defer) {
  slot_ ^= 1;
  pending_[slot_].clear();  // a step whose results nobody collected (its forward failed)
  defer_ = defer;
}

int32_t CudaBackend::end_results() {
  if (results_done_[slot_] == nullptr) CUDA_CHECK(cudaEventCreateWithFlags(&results_done_[slot_], cudaEventDisableTiming));
  CUDA_CHECK(cudaEventRecord(results_done_[slot_], stream_));
  if (gate_pending_timing_) {
    CUDA_CHECK(cudaEventRecord(gate_events_[(gate_event_next_ - 1) % gate_events_.size()][2], stream_));
    gate_pending_timing_ = false;
  }
  defer_ = false;
  return slot_;
}

void CudaBackend::collect(int32_t ticket) {
  require(ticket == 0 || ticket == 1, "collect: ticket " + std::to_string(ticket) + " is not end_results()'s");
  std::vector<HostCopy>& copies = pending_[ticket];
  if (copies.empty()) return;
  CUDA_CHECK(cudaEventSynchronize(results_done_[ticket]));
  for (const HostCopy& c : copies) std::memcpy(c.dst, c.src, c.bytes);
  copies.clear();
}

void CudaBackend::download(const Tensor& src, void* dst) {
  CUDA_CHECK(cudaMemcpyAsync(dst, src.data, src.nbytes(), cudaMemcpyDeviceToHost, stream_));
  CUDA_CHECK(cudaStreamSynchronize(stream_));
}

}  // namespace pagedrt::cuda
