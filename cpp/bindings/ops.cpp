// bindings/ops.cpp — pagedrt._testing._Ops(device), a test hook: runs single
// backend ops on numpy arrays so tests can hold the CUDA backend against the
// CPU backend op by op. Not part of the public API.
//
// Inputs are float32 (int32/int64 for the batch); each is converted to the
// dtype the model would hand the op (activation_dtype(), fp32 for the
// residual, kv_dtype() for caches); outputs come back as float32. With
// kv_cache_dtype "fp8" the caches are uint8 arrays of paged_kv.hpp's Fp8Kv
// blocks, (num_blocks, block_size, row_bytes), in and out as they are.
#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include "backend/backend.hpp"
#include "backend/factory.hpp"
#include "pagedrt/error.hpp"

namespace nb = nanobind;
using namespace nb::literals;
using pagedrt::ScalarType;
using pagedrt::Tensor;

namespace {

using F32In = nb::ndarray<const float, nb::c_contig, nb::device::cpu>;
using I32In = nb::ndarray<const int32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using I64In = nb::ndarray<const int64_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using U32In2 = nb::ndarray<const uint32_t, nb::ndim<2>, nb::c_contig, nb::device::cpu>;
using U64In = nb::ndarray<const uint64_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using F32In1 = nb::ndarray<const float, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using F32Out = nb::ndarray<nb::numpy, float>;
using CacheIn = nb::ndarray<nb::c_contig, nb::device::cpu>;  // float32, or uint8 fp8 blocks
using U8Out = nb::ndarray<nb::numpy, uint8_t>;

std::vector<int64_t> shape_of(const F32In& a) {
  std::vector<int64_t> s;
  for (size_t i = 0; i < a.ndim(); ++i) s.push_back(static_cast<int64_t>(a.shape(i)));
  return s;
}

F32Out make_out(std::vector<float>&& v, const std::vector<int64_t>& shape) {
  auto* data = new std::vector<float>(std::move(v));
  nb::capsule owner(data, [](void* p) noexcept { delete static_cast<std::vector<float>*>(p); });
  std::vector<size_t> sh(shape.begin(), shape.end());
  return F32Out(data->data(), sh.size(), sh.data(), owner);
}

ScalarType parse_dtype(const std::string& s) {
  if (s == "float32") return ScalarType::F32;
  if (s == "bfloat16") return ScalarType::BF16;
  if (s == "fp8") return ScalarType::F8E4M3;  // weights: quantized per row (backend.hpp's host_fp8_weight)
  throw pagedrt::Error(pagedrt::ErrorKind::InvalidArgument, "dtype must be float32, bfloat16 or fp8, got " + s);
}

ScalarType activation_type(const std::string& device, const std::string& activation) {
  if (activation.empty()) return device == "cuda" ? ScalarType::BF16 : ScalarType::F32;
  if (activation == "bfloat16") return ScalarType::BF16;
  if (activation == "float32") return ScalarType::F32;
  throw pagedrt::Error(pagedrt::ErrorKind::InvalidArgument,
                       "_Ops: activation must be bfloat16 or float32, not '" + activation + "'");
}

class Ops {
 public:
  // activation: "" for the device's default (bf16 on CUDA, fp32 on the CPU), or "bfloat16" / "float32".
  // deterministic: the batch-invariant kernels (make_backend); unset, the
  // Runtime's default for the device (the CPU's on, CUDA's off).
  // kv_cache_dtype: "" (the activations') or "fp8".
  explicit Ops(const std::string& device, const std::string& activation = "",
               std::optional<bool> deterministic = std::nullopt, const std::string& kv_cache_dtype = "")
      : b_(pagedrt::make_backend(device, 0, activation_type(device, activation),
                                 deterministic.value_or(device != "cuda"))) {
    if (!kv_cache_dtype.empty() && kv_cache_dtype != "fp8")
      throw pagedrt::Error(pagedrt::ErrorKind::InvalidArgument, "_Ops: kv_cache_dtype must be '' or 'fp8'");
    b_->use_fp8_kv(kv_cache_dtype == "fp8");
  }

  std::string activation_dtype() const { return pagedrt::scalar_name(b_->activation_dtype()); }
  void lend_threads(int n) { b_->lend_threads(n); }
  void share_host(int ranks) { b_->share_host(ranks); }
  int host_threads() const { return b_->host_threads(); }

  void set_batch(I32In token_ids, I32In positions, I64In slots, I32In query_start, I32In seq_lens,
                 I32In page_indptr, I32In page_indices, I32In logits_indices) {
    auto cp = [](auto& dst, const auto& a) { dst.assign(a.data(), a.data() + a.shape(0)); };
    cp(tok_, token_ids); cp(pos_, positions); cp(slot_, slots); cp(qs_, query_start);
    cp(lens_, seq_lens); cp(indptr_, page_indptr); cp(pages_, page_indices); cp(logit_rows_, logits_indices);
    if (pos_.size() != tok_.size() || slot_.size() != tok_.size() || qs_.size() != lens_.size() + 1 ||
        indptr_.size() != qs_.size() || qs_.back() != static_cast<int32_t>(tok_.size()) ||
        indptr_.back() != static_cast<int32_t>(pages_.size()))
      throw pagedrt::Error(pagedrt::ErrorKind::InvalidArgument, "set_batch: inconsistent batch arrays");
    pagedrt::BatchView v;
    v.num_tokens = static_cast<int32_t>(tok_.size());
    v.token_ids = tok_.data(); v.positions = pos_.data(); v.slot_mapping = slot_.data();
    v.num_seqs = static_cast<int32_t>(lens_.size());
    v.query_start = qs_.data(); v.seq_lens = lens_.data();
    v.page_indptr = indptr_.data(); v.page_indices = pages_.data();
    v.num_logits = static_cast<int32_t>(logit_rows_.size()); v.logits_indices = logit_rows_.data();
    b_->begin_step(v);
  }

  F32Out embedding(F32In table, const std::string& wdtype, int64_t first_id) {
    Tensor t = weight(table, parse_dtype(wdtype));
    Tensor out = b_->empty({static_cast<int64_t>(tok_.size()), t.dim(1)}, ScalarType::F32);
    b_->embedding(t, first_id, out);
    return back(out);
  }
  F32Out rms_norm(F32In x, F32In w, float eps) {
    Tensor xt = put(x, ScalarType::F32), wt = weight(w, ScalarType::F32);
    Tensor out = b_->empty(xt.shape, act());
    b_->rms_norm(xt, wt, eps, xt.dim(0), out);
    return back(out);
  }
  std::pair<F32Out, F32Out> add_rms_norm(F32In residual, F32In x, F32In w, float eps) {
    Tensor r = put(residual, ScalarType::F32), xt = put(x, act()), wt = weight(w, ScalarType::F32);
    Tensor out = b_->empty(r.shape, act());
    b_->add_rms_norm(r, xt, wt, eps, r.dim(0), out);
    return {back(r), back(out)};
  }
  F32Out add(F32In residual, F32In x) {
    Tensor r = put(residual, ScalarType::F32), xt = put(x, act());
    b_->add(r, xt, r.dim(0));
    return back(r);
  }
  F32Out linear(F32In x, F32In w, const std::string& wdtype, bool out_f32) {
    Tensor xt = put(x, act()), wt = weight(w, parse_dtype(wdtype));
    Tensor out = b_->empty({xt.dim(0), wt.dim(0)}, out_f32 ? ScalarType::F32 : act());
    b_->linear(xt, wt, xt.dim(0), out);
    return back(out);
  }
  // residual += x @ w^T in one GEMM where the backend takes it (Backend::linear_into_residual):
  // (taken, the residual after; unchanged where not taken).
  std::pair<bool, F32Out> linear_into_residual(F32In residual, F32In x, F32In w) {
    Tensor r = put(residual, ScalarType::F32), xt = put(x, act()), wt = weight(w, act());
    const bool taken = b_->linear_into_residual(xt, wt, xt.dim(0), r);
    return {taken, back(r)};
  }
  // Backend::warm_linear_into_residual for up to max_rows rows: (whether it warmed, the heuristic's count after).
  std::pair<bool, int64_t> warm_linear_into_residual(F32In w, int64_t max_rows) {
    Tensor wt = weight(w, act());
    const bool warmed = b_->warm_linear_into_residual(wt, max_rows);
    return {warmed, b_->gemm_picks_asked()};
  }
  // Backend::warm_linear for linear(x, w) of up to max_rows rows; the heuristic's count after.
  int64_t warm_linear(F32In w, const std::string& wdtype, int64_t max_rows, bool out_f32) {
    Tensor wt = weight(w, parse_dtype(wdtype));
    b_->warm_linear(wt, max_rows, out_f32 ? ScalarType::F32 : act());
    return b_->gemm_picks_asked();
  }
  int64_t gemm_picks_asked() const { return b_->gemm_picks_asked(); }
  // Backend::warm_linear_silu_mul for up to max_rows rows; the heuristic's count after.
  int64_t warm_linear_silu_mul(F32In w, int64_t max_rows) {
    Tensor wt = weight(w, act());
    b_->warm_linear_silu_mul(wt, max_rows);
    return b_->gemm_picks_asked();
  }
  int64_t glu_min_rows() const { return b_->glu_min_rows(); }
  // linear(rms_norm(x) * norm_w, w) as a forward runs them: both outputs
  // allocated first, so nothing comes between the two ops (with fp8 weights
  // on CUDA the linear takes the codes the norm wrote).
  F32Out norm_linear(F32In x, F32In norm_w, float eps, F32In w, const std::string& wdtype) {
    Tensor xt = put(x, ScalarType::F32), gt = weight(norm_w, ScalarType::F32), wt = weight(w, parse_dtype(wdtype));
    Tensor normed = b_->empty(xt.shape, act());
    Tensor out = b_->empty({xt.dim(0), wt.dim(0)}, act());
    b_->rms_norm(xt, gt, eps, xt.dim(0), normed);
    b_->linear(normed, wt, xt.dim(0), out);
    return back(out);
  }
  int64_t fp8_codes_taken() const { return b_->fp8_codes_taken(); }
  int64_t fp8_x_quantized_in_gemv() const { return b_->fp8_x_quantized_in_gemv(); }
  std::vector<int64_t> decode_plan(int64_t H, int64_t Hkv, int64_t D) { return b_->decode_plan(H, Hkv, D); }
  std::vector<int64_t> prefill_plan(int64_t H, int64_t Hkv, int64_t D) { return b_->prefill_plan(H, Hkv, D); }
  F32Out silu_mul(F32In gate_up) {
    Tensor g = put(gate_up, act());
    Tensor out = b_->empty({g.dim(0), g.dim(1) / 2}, act());
    b_->silu_mul(g, g.dim(0), out);
    return back(out);
  }
  // silu(gate) * up of x @ [gate; up]^T, the fused op (w: (2 I, k), loaded as
  // wdtype: "" for the activations' dtype, or "fp8")
  F32Out linear_silu_mul(F32In x, F32In w, const std::string& wdtype) {
    Tensor xt = put(x, act()), wt = weight(w, wdtype.empty() ? act() : parse_dtype(wdtype));
    Tensor gate_up = b_->empty({xt.dim(0), wt.dim(0)}, act());
    Tensor out = b_->empty({xt.dim(0), wt.dim(0) / 2}, act());
    b_->linear_silu_mul(xt, wt, xt.dim(0), gate_up, out);
    return back(out);
  }
  // down(silu(gate) * up) of x, the two ops as a forward runs them (outputs
  // allocated first: with fp8 weights on CUDA, down takes the codes silu_mul
  // wrote); wgu (2 I, k), wd (k_out, I), both loaded as wdtype.
  F32Out mlp(F32In x, F32In wgu, F32In wd, const std::string& wdtype) {
    Tensor xt = put(x, act()), gu = weight(wgu, parse_dtype(wdtype)), dt = weight(wd, parse_dtype(wdtype));
    Tensor gate_up = b_->empty({xt.dim(0), gu.dim(0)}, act());
    Tensor mid = b_->empty({xt.dim(0), gu.dim(0) / 2}, act());
    Tensor out = b_->empty({xt.dim(0), dt.dim(0)}, act());
    b_->linear_silu_mul(xt, gu, xt.dim(0), gate_up, mid);
    b_->linear(mid, dt, xt.dim(0), out);
    return back(out);
  }
  F32Out gather_rows(F32In x) {
    Tensor xt = put(x, ScalarType::F32);
    Tensor out = b_->empty({static_cast<int64_t>(logit_rows_.size()), xt.dim(1)}, ScalarType::F32);
    b_->gather_rows(xt, out);
    return back(out);
  }
  std::tuple<F32Out, nb::object, nb::object> rope_and_cache(F32In qkv, F32In cos, F32In sin, int64_t H, int64_t Hkv,
                                                            int64_t D, CacheIn k_cache, CacheIn v_cache) {
    Tensor q = put(qkv, act());
    pagedrt::RopeTable rope{put(cos, ScalarType::F32), put(sin, ScalarType::F32)};
    Tensor k = put_cache(k_cache), v = put_cache(v_cache);
    b_->rope_and_cache(q, rope, H, Hkv, D, k, v);
    return {back(q), back_cache(k), back_cache(v)};
  }
  // rope_and_cache + paged_attention, the fused op: (out, k_cache, v_cache).
  // logit_rows_only: Backend::rope_cache_attention_logit_rows, out's rows NaN before it.
  std::tuple<F32Out, nb::object, nb::object> rope_cache_attention(F32In qkv, F32In cos, F32In sin, int64_t H,
                                                                  int64_t Hkv, int64_t D, float scale,
                                                                  CacheIn k_cache, CacheIn v_cache,
                                                                  bool logit_rows_only) {
    Tensor q = put(qkv, act());
    pagedrt::RopeTable rope{put(cos, ScalarType::F32), put(sin, ScalarType::F32)};
    Tensor k = put_cache(k_cache), v = put_cache(v_cache);
    if (!logit_rows_only) {
      Tensor out = b_->empty({q.dim(0), H * D}, act());
      b_->rope_cache_attention(q, rope, H, Hkv, D, scale, k, v, out);
      return {back(out), back_cache(k), back_cache(v)};
    }
    const std::vector<float> nan(static_cast<size_t>(q.dim(0) * H * D), std::numeric_limits<float>::quiet_NaN());
    Tensor out = put(nan.data(), {q.dim(0), H * D}, act());
    b_->rope_cache_attention_logit_rows(q, rope, H, Hkv, D, scale, k, v, out);
    return {back(out), back_cache(k), back_cache(v)};
  }
  F32Out paged_attention(F32In qkv, CacheIn k_cache, CacheIn v_cache, int64_t H, int64_t Hkv, int64_t D,
                         float scale) {
    Tensor q = put(qkv, act()), k = put_cache(k_cache), v = put_cache(v_cache);
    Tensor out = b_->empty({q.dim(0), H * D}, act());
    b_->paged_attention(q, k, v, H, Hkv, D, scale, out);
    return back(out);
  }
  // The backend's greedy pick per row of fp32 logits (backends with has_argmax()).
  // With masks (num_masks, (vocab + 31) / 32) uint32 and mask_of_row (rows; -1: none): the masked pick.
  std::vector<int32_t> argmax(F32In logits, std::optional<U32In2> masks, std::optional<I32In> mask_of_row) {
    if (!b_->has_argmax())
      throw pagedrt::Error(pagedrt::ErrorKind::Unsupported, "argmax: this backend picks on the host");
    Tensor l = put(logits, ScalarType::F32);
    std::vector<int32_t> out(static_cast<size_t>(l.dim(0)));
    pagedrt::RowMasks rm;
    if (masks && mask_of_row) {
      rm.mask_of_row = mask_of_row->data();
      rm.words = masks->data();
      rm.num_masks = static_cast<int32_t>(masks->shape(0));
      rm.words_per_row = static_cast<int64_t>(masks->shape(1));
    }
    b_->argmax(l, l.dim(0), out.data(), rm);
    return out;
  }
  // The backend's sampled token per draw i (backends with has_sample()):
  // from row rows[i] of fp32 logits with the i-th temperature, top_k, top_p,
  // min_p, and Philox key and counter (SampleRow). Processing: draw i's
  // edits are edit_*[first_edit[i] .. + num_edits[i]) (LogitEdit: token,
  // flags, bias, count) under penalties[i] (repetition, frequency,
  // presence). Structured output: draw i keeps only the tokens of
  // masks[mask[i]] (masks (num_masks, (vocab + 31) / 32) uint32; -1: none).
  // With `logprobs` (k per draw, -1: none) it returns (tokens,
  // [(logprob, top ids, top logprobs) or None per draw]).
  nb::object sample(F32In logits, I32In rows, F32In1 temperature, I32In top_k, F32In1 top_p, F32In1 min_p,
                    U64In key, U64In counter, std::optional<I32In> logprobs, std::optional<I32In> edit_token,
                    std::optional<I32In> edit_flags, std::optional<F32In1> edit_bias,
                    std::optional<I32In> edit_count, std::optional<I32In> first_edit,
                    std::optional<I32In> num_edits, std::optional<F32In> penalties, std::optional<U32In2> masks,
                    std::optional<I32In> mask) {
    if (!b_->has_sample()) throw pagedrt::Error(pagedrt::ErrorKind::Unsupported, "sample: this backend samples on the host");
    const size_t n = rows.shape(0);
    auto bad = [](const std::string& what) { return pagedrt::Error(pagedrt::ErrorKind::InvalidArgument, "sample: " + what); };
    if (temperature.shape(0) != n || top_k.shape(0) != n || top_p.shape(0) != n || min_p.shape(0) != n ||
        key.shape(0) != n || counter.shape(0) != n || (logprobs && logprobs->shape(0) != n) ||
        (mask && mask->shape(0) != n))
      throw bad("every per-draw array needs one entry a draw");
    if (mask.has_value() != masks.has_value()) throw bad("masks and mask go together");
    const bool edited = edit_token.has_value();
    if (edited != (edit_flags && edit_bias && edit_count && first_edit && num_edits && penalties))
      throw bad("edits need edit_token, edit_flags, edit_bias, edit_count, first_edit, num_edits and penalties");
    std::vector<pagedrt::LogitEdit> edits;
    if (edited) {
      const size_t m = edit_token->shape(0);
      if (edit_flags->shape(0) != m || edit_bias->shape(0) != m || edit_count->shape(0) != m)
        throw bad("every edit array needs one entry an edit");
      if (first_edit->shape(0) != n || num_edits->shape(0) != n || penalties->ndim() != 2 ||
          penalties->shape(0) != n || penalties->shape(1) != 3)
        throw bad("first_edit and num_edits need one entry a draw, penalties (draws, 3)");
      for (size_t j = 0; j < m; ++j)
        edits.push_back(pagedrt::LogitEdit{edit_token->data()[j], static_cast<uint32_t>(edit_flags->data()[j]),
                                           edit_bias->data()[j], edit_count->data()[j]});
    }
    Tensor l = put(logits, ScalarType::F32);
    std::vector<pagedrt::SampleRow> draws(n);
    for (size_t i = 0; i < n; ++i) {
      draws[i].row = rows.data()[i];
      draws[i].temperature = temperature.data()[i];
      draws[i].top_k = top_k.data()[i];
      draws[i].top_p = top_p.data()[i];
      draws[i].min_p = min_p.data()[i];
      draws[i].key = key.data()[i];
      draws[i].counter = counter.data()[i];
      if (logprobs) draws[i].logprobs = logprobs->data()[i];
      if (mask) draws[i].mask = mask->data()[i];
      if (edited) {
        draws[i].first_edit = first_edit->data()[i];
        draws[i].num_edits = num_edits->data()[i];
        draws[i].repetition_penalty = penalties->data()[3 * i];
        draws[i].frequency_penalty = penalties->data()[3 * i + 1];
        draws[i].presence_penalty = penalties->data()[3 * i + 2];
      }
    }
    std::vector<int32_t> out(n);
    std::vector<pagedrt::DrawLogprobs> lp(logprobs ? n : 0);
    pagedrt::DrawMasks dm;
    if (masks) {
      if (static_cast<int64_t>(masks->shape(1)) != (l.dim(1) + 31) / 32) throw bad("masks need (vocab + 31) / 32 words a row");
      dm.words = masks->data();
      dm.num_masks = static_cast<int32_t>(masks->shape(0));
    }
    b_->sample(l, draws.data(), static_cast<int64_t>(n), edits.data(), static_cast<int64_t>(edits.size()), out.data(),
               logprobs ? lp.data() : nullptr, dm);
    if (!logprobs) return nb::cast(out);
    nb::list per_draw;
    for (size_t i = 0; i < n; ++i) {
      if (draws[i].logprobs < 0) {
        per_draw.append(nb::none());
        continue;
      }
      const pagedrt::DrawLogprobs& d = lp[i];
      per_draw.append(nb::make_tuple(d.logprob, std::vector<int32_t>(d.top_ids, d.top_ids + d.count),
                                     std::vector<float>(d.top_logprobs, d.top_logprobs + d.count)));
    }
    return nb::make_tuple(out, per_draw);
  }
  // Seconds per sample call of `n` draws over rows of `vocab` random logits
  // (device-resident; the draws' parameters as given for each), `iters` calls
  // back to back after a warm-up; `edits` distinct tokens of each row seen
  // once in the output (repetition 1.2, frequency 0.5, presence 0.5), and
  // `logprobs` (-1: none). Benchmark hook for tools/bench_cuda.py sampling.
  double bench_sample(int64_t n, int64_t vocab, float temperature, int32_t top_k, float top_p, float min_p,
                      int iters, int32_t edits, int32_t logprobs) {
    std::vector<float> host(static_cast<size_t>(n * vocab));
    uint64_t z = 88172645463325252ull;
    for (float& v : host) {  // xorshift normals-ish: sums of uniforms, spread like real logits
      float acc = 0.0f;
      for (int j = 0; j < 4; ++j) {
        z ^= z << 13, z ^= z >> 7, z ^= z << 17;
        acc += static_cast<float>(z >> 40) / 16777216.0f;
      }
      v = 4.0f * (acc - 2.0f);
    }
    Tensor h = pagedrt::host_empty({n, vocab}, ScalarType::F32);
    std::memcpy(h.data, host.data(), host.size() * 4);
    Tensor l = b_->from_host(h);
    std::vector<pagedrt::SampleRow> draws(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
      draws[i].row = static_cast<int32_t>(i);
      draws[i].temperature = temperature, draws[i].top_k = top_k, draws[i].top_p = top_p, draws[i].min_p = min_p;
      draws[i].key = 1234 + i, draws[i].counter = 7;
      draws[i].logprobs = logprobs;
    }
    std::vector<pagedrt::LogitEdit> ed;
    if (edits > 0) {
      const int64_t stride = std::max<int64_t>(1, vocab / edits);
      for (int64_t i = 0; i < n; ++i) {
        draws[i].first_edit = static_cast<int32_t>(ed.size());
        draws[i].num_edits = static_cast<int32_t>(std::min<int64_t>(edits, vocab));
        draws[i].repetition_penalty = 1.2f, draws[i].frequency_penalty = 0.5f, draws[i].presence_penalty = 0.5f;
        for (int32_t j = 0; j < draws[i].num_edits; ++j)
          ed.push_back(pagedrt::LogitEdit{static_cast<int32_t>((j * stride + i) % vocab), pagedrt::kEditSeen, 0.0f, 1});
        std::sort(ed.begin() + draws[i].first_edit, ed.end(),
                  [](const pagedrt::LogitEdit& a, const pagedrt::LogitEdit& b) { return a.token < b.token; });
      }
    }
    std::vector<int32_t> out(static_cast<size_t>(n));
    std::vector<pagedrt::DrawLogprobs> lp(static_cast<size_t>(n));
    const int64_t m = static_cast<int64_t>(ed.size());
    nb::gil_scoped_release release;
    for (int i = 0; i < 3; ++i) b_->sample(l, draws.data(), n, ed.data(), m, out.data(), lp.data());
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < iters; ++i) b_->sample(l, draws.data(), n, ed.data(), m, out.data(), lp.data());
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / iters;
  }
  // Seconds per paged_attention call: `iters` calls queued back to back, after a warm-up.
  double bench_paged_attention(F32In qkv, CacheIn k_cache, CacheIn v_cache, int64_t H, int64_t Hkv, int64_t D,
                               float scale, int iters) {
    Tensor q = put(qkv, act()), k = put_cache(k_cache), v = put_cache(v_cache);
    Tensor out = b_->empty({q.dim(0), H * D}, act());
    nb::gil_scoped_release release;
    for (int i = 0; i < 3; ++i) b_->paged_attention(q, k, v, H, Hkv, D, scale, out);
    b_->synchronize();
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < iters; ++i) b_->paged_attention(q, k, v, H, Hkv, D, scale, out);
    b_->synchronize();
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / iters;
  }
  // Median microseconds of one bf16 linear y (n, m) = x (n, k) @ W (m, k)^T
  // on the GPU, on device-resident random inputs: `iters` timed batches of
  // calls back to back (host clock around each batch, after a warm-up), W
  // rotating through copies that together exceed 512 MiB so that no call finds
  // it in L2. impl: "engine" (the backend as the engine makes it: the own
  // small-M kernel, then cuBLASLt), "search" (cuBLASLt only, its algorithm
  // searched: PAGEDRT_CUDA_GEMV=0 PAGEDRT_GEMM_SEARCH=1) or "heuristic"
  // (cuBLASLt's first pick: PAGEDRT_CUDA_GEMV=0 PAGEDRT_GEMM_SEARCH=0), or
  // "fp8" (the engine's path with W quantized per row to e4m3 at load: x
  // quantized per token, then the own kernel or cuBLASLt's fp8 GEMM), or
  // "invariant" (deterministic=True's: InvariantGemm, invariant_gemm.hpp);
  // or linear_silu_mul's y (n, m / 2) = silu(x @ gate^T) * (x @ up^T) with W
  // = [gate; up]: "glu" (the GEMM with the SiLU·mul epilogue from 1 row:
  // PAGEDRT_GLU_GEMM=1, glu_gemm.hpp; "glu_c1" the same without clusters)
  // or "glu_off" (cuBLASLt's first pick, then silu_mul: PAGEDRT_GLU_GEMM=0).
  // Benchmark hook for tools/bench_cuda.py gemv, gemm and glu; CUDA only.
  double time_linear(int64_t n, int64_t m, int64_t k, bool out_f32, int iters, const std::string& impl) {
    if (n < 1 || m < 1 || k < 1 || iters < 1)
      throw pagedrt::Error(pagedrt::ErrorKind::InvalidArgument, "time_linear: n, m, k and iters must be positive");
    const int which = impl == "engine"      ? 0
                      : impl == "search"    ? 1
                      : impl == "heuristic" ? 2
                      : impl == "fp8"       ? 3
                      : impl == "invariant" ? 4
                      : impl == "glu"       ? 5
                      : impl == "glu_off"   ? 6
                      : impl == "glu_c1"    ? 7
                                            : -1;
    if (which < 0)
      throw pagedrt::Error(pagedrt::ErrorKind::InvalidArgument,
                           "time_linear: impl must be 'engine', 'search', 'heuristic', 'fp8', 'invariant', 'glu', "
                           "'glu_c1' or 'glu_off', not '" + impl + "'");
    const bool glu = which >= 5;
    if (glu && (m % 2 != 0 || out_f32))
      throw pagedrt::Error(pagedrt::ErrorKind::InvalidArgument, "time_linear: 'glu' needs an even m and bf16 output");
    nb::gil_scoped_release release;  // no Python objects below; filling W takes a while
    LinearBench& lb = linear_bench_[which];
    if (!lb.backend)
      lb.backend = cuda_backend_with_env({{"PAGEDRT_CUDA_GEMV", which == 0 || which == 3 || glu ? "1" : "0"},
                                          {"PAGEDRT_GEMM_SEARCH", which == 1 ? "1" : "0"},
                                          {"PAGEDRT_GLU_GEMM", which == 5 || which == 7 ? "1" : "0"},
                                          {"PAGEDRT_GLU_CLUSTER", which == 7 ? "1" : "2"}},
                                         which == 4);
    pagedrt::Backend& b = *lb.backend;
    if (lb.m != m || lb.k != k) {
      lb.w.clear();  // before the new copies: the old ones may be large
      const int64_t bytes = m * k * (which == 3 ? 1 : 2);
      const int64_t copies = std::max<int64_t>(2, ((int64_t(512) << 20) + bytes - 1) / bytes);
      Tensor hw = random_bf16({m, k}, 2);
      pagedrt::WeightView v;
      v.type = pagedrt::WeightView::Type::BF16;
      v.shape = {m, k};
      v.data = hw.data;
      for (int64_t i = 0; i < copies; ++i)
        lb.w.push_back(which == 3 ? b.load_weight({v}, ScalarType::F8E4M3) : b.from_host(hw));
      lb.m = m;
      lb.k = k;
      lb.rows = 0;
    }
    if (lb.rows < n) {
      lb.rows = std::max<int64_t>(n, 8);
      lb.x = b.from_host(random_bf16({lb.rows, k}, 1));
    }
    Tensor x = lb.x;
    x.shape = {n, k};  // the first n rows
    Tensor y = b.empty({n, glu ? m / 2 : m}, out_f32 ? ScalarType::F32 : ScalarType::BF16);
    Tensor gate_up = glu ? b.empty({n, m}, ScalarType::BF16) : Tensor();
    size_t next = 0;
    auto batch_us = [&](int calls) {
      const auto t0 = std::chrono::steady_clock::now();
      for (int i = 0; i < calls; ++i) {
        const Tensor& w = lb.w[next++ % lb.w.size()];
        glu ? b.linear_silu_mul(x, w, n, gate_up, y) : b.linear(x, w, n, y);
      }
      b.synchronize();
      return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() / calls;
    };
    batch_us(3);  // warm-up
    const int calls = static_cast<int>(std::clamp(2000.0 / batch_us(5), 3.0, 2000.0));  // ~2 ms a batch
    std::vector<double> t;
    for (int i = 0; i < iters; ++i) t.push_back(batch_us(calls));
    std::nth_element(t.begin(), t.begin() + t.size() / 2, t.end());
    return t[t.size() / 2];
  }
  nb::object copy_blocks(CacheIn cache, const std::vector<std::pair<int32_t, int32_t>>& pairs) {
    Tensor c = put_cache(cache);
    std::vector<pagedrt::BlockCopy> copies;
    for (auto& p : pairs) {
      if (p.first < 0 || p.second < 0 || p.first >= c.dim(0) || p.second >= c.dim(0))
        throw pagedrt::Error(pagedrt::ErrorKind::InvalidArgument, "copy_blocks: block id out of range");
      copies.push_back({p.first, p.second});
    }
    b_->copy_blocks(c, copies);
    return back_cache(c);
  }

 private:
  ScalarType act() const { return b_->activation_dtype(); }

  // A host tensor of `dtype` holding the float32 array, then on the device.
  Tensor put(const F32In& a, ScalarType dtype) { return put(a.data(), shape_of(a), dtype); }
  Tensor put(const float* a, std::vector<int64_t> shape, ScalarType dtype) {
    Tensor h = pagedrt::host_empty(std::move(shape), dtype);
    const int64_t n = h.numel();
    if (dtype == ScalarType::F32) {
      std::memcpy(h.data, a, n * 4);
    } else {
      uint16_t* d = h.as<uint16_t>();
      for (int64_t i = 0; i < n; ++i) d[i] = pagedrt::f32_to_bf16(a[i]);
    }
    return b_->from_host(h);
  }
  // A KV cache: float32 values in kv_dtype(), or with fp8 KV the uint8 blocks as they are.
  Tensor put_cache(const CacheIn& a) {
    std::vector<int64_t> shape;
    for (size_t i = 0; i < a.ndim(); ++i) shape.push_back(static_cast<int64_t>(a.shape(i)));
    const bool fp8 = b_->kv_dtype() == ScalarType::F8E4M3;
    if (fp8 != (a.dtype() == nb::dtype<uint8_t>()) || (!fp8 && a.dtype() != nb::dtype<float>()))
      throw pagedrt::Error(pagedrt::ErrorKind::InvalidArgument,
                           fp8 ? "_Ops: an fp8 cache is a uint8 array" : "_Ops: a cache is a float32 array");
    if (!fp8) return put(static_cast<const float*>(a.data()), shape, b_->kv_dtype());
    Tensor h = pagedrt::host_empty(shape, ScalarType::F8E4M3);
    std::memcpy(h.data, a.data(), h.nbytes());
    return b_->from_host(h);
  }
  nb::object back_cache(const Tensor& t) {
    if (t.dtype != ScalarType::F8E4M3) return nb::cast(back(t));
    auto* raw = new std::vector<uint8_t>(t.nbytes());
    b_->download(t, raw->data());
    nb::capsule owner(raw, [](void* p) noexcept { delete static_cast<std::vector<uint8_t>*>(p); });
    std::vector<size_t> sh(t.shape.begin(), t.shape.end());
    return nb::cast(U8Out(raw->data(), sh.size(), sh.data(), owner));
  }
  // Through load_weight, as the model loads a checkpoint tensor.
  Tensor weight(const F32In& a, ScalarType dtype) {
    pagedrt::WeightView v;
    v.type = pagedrt::WeightView::Type::F32;
    v.shape = shape_of(a);
    v.data = a.data();
    return b_->load_weight({v}, dtype);
  }
  F32Out back(const Tensor& t) {
    std::vector<uint8_t> raw(t.nbytes());
    b_->download(t, raw.data());
    std::vector<float> out(static_cast<size_t>(t.numel()));
    if (t.dtype == ScalarType::F32) {
      std::memcpy(out.data(), raw.data(), raw.size());
    } else {
      const uint16_t* s = reinterpret_cast<const uint16_t*>(raw.data());
      for (size_t i = 0; i < out.size(); ++i) out[i] = pagedrt::bf16_to_f32(s[i]);
    }
    return make_out(std::move(out), t.shape);
  }

  // bf16 host tensor of uniform values in [-1, 1) (xorshift, fixed seed).
  static Tensor random_bf16(std::vector<int64_t> shape, uint64_t seed) {
    Tensor h = pagedrt::host_empty(std::move(shape), ScalarType::BF16);
    uint64_t s = 0x9E3779B97F4A7C15ull * seed;
    uint16_t* d = h.as<uint16_t>();
    for (int64_t i = 0, n = h.numel(); i < n; ++i) {
      s ^= s << 13, s ^= s >> 7, s ^= s << 17;
      d[i] = pagedrt::f32_to_bf16(static_cast<float>(s >> 40) * (2.0f / 16777216.0f) - 1.0f);
    }
    return h;
  }
  // A CUDA backend made with `vars` set in the environment (the GEMM switches
  // are read when the backend is made; the old values come back after);
  // deterministic: the batch-invariant mode.
  static std::unique_ptr<pagedrt::Backend> cuda_backend_with_env(
      const std::vector<std::pair<std::string, std::string>>& vars, bool deterministic = false) {
    std::vector<std::pair<std::string, std::optional<std::string>>> saved;
    for (auto& [name, value] : vars) {
      const char* old = std::getenv(name.c_str());
      saved.emplace_back(name, old ? std::optional<std::string>(old) : std::nullopt);
      setenv(name.c_str(), value.c_str(), 1);
    }
    auto restore = [&] {
      for (auto& [name, old] : saved) old ? setenv(name.c_str(), old->c_str(), 1) : unsetenv(name.c_str());
    };
    try {
      auto b = pagedrt::make_backend("cuda", 0, ScalarType::BF16, deterministic);
      restore();
      return b;
    } catch (...) {
      restore();
      throw;
    }
  }

  struct LinearBench {
    std::unique_ptr<pagedrt::Backend> backend;
    int64_t m = -1, k = -1, rows = 0;
    Tensor x;               // (rows, k) bf16
    std::vector<Tensor> w;  // copies of (m, k) bf16 (fp8: e4m3 with row scales)
  };

  std::unique_ptr<pagedrt::Backend> b_;
  LinearBench linear_bench_[8];  // engine, search, heuristic, fp8, invariant (deterministic=True's), glu, glu_off, glu_c1
  std::vector<int32_t> tok_, pos_, qs_, lens_, indptr_, pages_, logit_rows_;
  std::vector<int64_t> slot_;
};

}  // namespace

void register_ops(nb::module_& m) {
  nb::class_<Ops>(m, "_Ops")
      .def(nb::init<const std::string&, const std::string&, std::optional<bool>, const std::string&>(), "device"_a,
           "activation"_a = "", "deterministic"_a = nb::none(), "kv_cache_dtype"_a = "")
      .def_prop_ro("activation_dtype", &Ops::activation_dtype)
      .def("lend_threads", &Ops::lend_threads, "n"_a)  // Backend::lend_threads
      .def("share_host", &Ops::share_host, "ranks"_a)  // Backend::share_host
      .def("host_threads", &Ops::host_threads)          // the threads the next host op runs on
      .def("set_batch", &Ops::set_batch, "token_ids"_a, "positions"_a, "slot_mapping"_a, "query_start"_a,
           "seq_lens"_a, "page_indptr"_a, "page_indices"_a, "logits_indices"_a)
      .def("embedding", &Ops::embedding, "table"_a, "weight_dtype"_a, "first_id"_a = 0)
      .def("rms_norm", &Ops::rms_norm, "x"_a, "weight"_a, "eps"_a)
      .def("add_rms_norm", &Ops::add_rms_norm, "residual"_a, "x"_a, "weight"_a, "eps"_a)
      .def("add", &Ops::add, "residual"_a, "x"_a)
      .def("linear", &Ops::linear, "x"_a, "weight"_a, "weight_dtype"_a, "out_f32"_a)
      .def("warm_linear", &Ops::warm_linear, "weight"_a, "weight_dtype"_a, "max_rows"_a, "out_f32"_a)
      .def("linear_into_residual", &Ops::linear_into_residual, "residual"_a, "x"_a, "weight"_a)
      .def("warm_linear_into_residual", &Ops::warm_linear_into_residual, "weight"_a, "max_rows"_a)
      .def("gemm_picks_asked", &Ops::gemm_picks_asked)  // Backend::gemm_picks_asked
      .def("warm_linear_silu_mul", &Ops::warm_linear_silu_mul, "weight"_a, "max_rows"_a)
      .def("glu_min_rows", &Ops::glu_min_rows)  // Backend::glu_min_rows
      .def("norm_linear", &Ops::norm_linear, "x"_a, "norm_weight"_a, "eps"_a, "weight"_a, "weight_dtype"_a)
      .def("fp8_codes_taken", &Ops::fp8_codes_taken)
      .def("fp8_x_quantized_in_gemv", &Ops::fp8_x_quantized_in_gemv)
      .def("decode_plan", &Ops::decode_plan, "num_heads"_a, "num_kv_heads"_a, "head_dim"_a)
      .def("prefill_plan", &Ops::prefill_plan, "num_heads"_a, "num_kv_heads"_a, "head_dim"_a)
      .def("silu_mul", &Ops::silu_mul, "gate_up"_a)
      .def("linear_silu_mul", &Ops::linear_silu_mul, "x"_a, "weight"_a, "weight_dtype"_a = "")
      .def("mlp", &Ops::mlp, "x"_a, "gate_up"_a, "down"_a, "weight_dtype"_a)
      .def("gather_rows", &Ops::gather_rows, "x"_a)
      .def("rope_and_cache", &Ops::rope_and_cache, "qkv"_a, "cos"_a, "sin"_a, "num_heads"_a, "num_kv_heads"_a,
           "head_dim"_a, "k_cache"_a, "v_cache"_a)
      .def("rope_cache_attention", &Ops::rope_cache_attention, "qkv"_a, "cos"_a, "sin"_a, "num_heads"_a,
           "num_kv_heads"_a, "head_dim"_a, "scale"_a, "k_cache"_a, "v_cache"_a, "logit_rows_only"_a = false)
      .def("paged_attention", &Ops::paged_attention, "qkv"_a, "k_cache"_a, "v_cache"_a, "num_heads"_a,
           "num_kv_heads"_a, "head_dim"_a, "scale"_a)
      .def("bench_paged_attention", &Ops::bench_paged_attention, "qkv"_a, "k_cache"_a, "v_cache"_a,
           "num_heads"_a, "num_kv_heads"_a, "head_dim"_a, "scale"_a, "iters"_a)
      .def("time_linear", &Ops::time_linear, "n"_a, "m"_a, "k"_a, "out_f32"_a, "iters"_a, "impl"_a)
      .def("copy_blocks", &Ops::copy_blocks, "cache"_a, "pairs"_a)
      .def("argmax", &Ops::argmax, "logits"_a, "masks"_a = nb::none(), "mask_of_row"_a = nb::none())
      .def("sample", &Ops::sample, "logits"_a, "rows"_a, "temperature"_a, "top_k"_a, "top_p"_a, "min_p"_a, "key"_a,
           "counter"_a, "logprobs"_a = nb::none(), "edit_token"_a = nb::none(), "edit_flags"_a = nb::none(),
           "edit_bias"_a = nb::none(), "edit_count"_a = nb::none(), "first_edit"_a = nb::none(),
           "num_edits"_a = nb::none(), "penalties"_a = nb::none(), "masks"_a = nb::none(), "mask"_a = nb::none())
      .def("bench_sample", &Ops::bench_sample, "n"_a, "vocab"_a, "temperature"_a, "top_k"_a, "top_p"_a, "min_p"_a,
           "iters"_a, "edits"_a = 0, "logprobs"_a = -1);
}
