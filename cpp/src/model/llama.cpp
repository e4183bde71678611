#include "model/llama.hpp"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <deque>

#include "io/safetensors.hpp"
#include "pagedrt/error.hpp"

namespace pagedrt {
namespace {

// The tensor `name`, checked against the expected shape and dtype, as the
// backends take it. An fp8 weight is dequantized into `keep` (which must
// outlive the view) and given as fp32; with `codes`, where it has a scale
// per row, it is given as it is with those scales (kept in `keep`).
WeightView expect(const Checkpoint& ckpt, const std::string& name, std::vector<int64_t> shape,
                  const QuantConfig& quant = {}, std::deque<std::vector<float>>* keep = nullptr,
                  bool codes = false) {
  const TensorView& t = ckpt.get(name);
  if (t.shape != shape)
    throw Error(ErrorKind::InvalidModel, t.file + ": tensor '" + name + "' has shape " + shape_str(t.shape) +
                                             ", config.json implies " + shape_str(shape));
  WeightView w;
  switch (t.dtype) {
    case DType::F32: w.type = WeightView::Type::F32; break;
    case DType::F16: w.type = WeightView::Type::F16; break;
    case DType::BF16: w.type = WeightView::Type::BF16; break;
    case DType::F8_E4M3:
      if (keep != nullptr && codes) {
        std::vector<float> scales = fp8_row_scales(ckpt, name, t, quant);
        if (!scales.empty()) {
          keep->push_back(std::move(scales));
          w.type = WeightView::Type::F8E4M3;
          w.shape = t.shape;
          w.data = t.data;
          w.row_scale = keep->back().data();
          return w;
        }
      }
      if (keep != nullptr) {
        keep->push_back(dequantize_fp8(ckpt, name, t, quant));
        w.type = WeightView::Type::F32;
        w.shape = t.shape;
        w.data = keep->back().data();
        return w;
      }
      [[fallthrough]];
    default:
      throw Error(ErrorKind::InvalidModel, t.file + ": tensor '" + name + "' has dtype " + dtype_name(t.dtype) +
                                               "; supported: F32, F16, BF16, and F8_E4M3 for the projection "
                                               "weights (with their scales)");
  }
  w.shape = t.shape;
  w.data = t.data;
  return w;
}

// A tensor-parallel rank's part of a 2-D weight (model/tp_plan.hpp): rows
// or columns [first, first + count); dim -1: all of it.
struct Slice {
  int dim = -1;
  int64_t first = 0, count = 0;
};

// `w` cut to `slice`: rows are a view of the same bytes (an fp8 view's
// scales follow); columns are copied into `keep`, which must outlive the view.
WeightView cut(WeightView w, const Slice& slice, std::deque<std::vector<uint8_t>>& keep) {
  if (slice.dim < 0) return w;
  const size_t es = w.element_size();
  const int64_t rows = w.shape[0], cols = w.shape[1];
  const uint8_t* src = static_cast<const uint8_t*>(w.data);
  if (slice.dim == 0) {
    w.data = src + static_cast<size_t>(slice.first * cols) * es;
    if (w.row_scale != nullptr) w.row_scale += slice.first;
    w.shape[0] = slice.count;
    return w;
  }
  keep.emplace_back(static_cast<size_t>(rows * slice.count) * es);
  uint8_t* dst = keep.back().data();
  for (int64_t r = 0; r < rows; ++r)
    std::memcpy(dst + static_cast<size_t>(r * slice.count) * es, src + static_cast<size_t>(r * cols + slice.first) * es,
                static_cast<size_t>(slice.count) * es);
  w.data = dst;
  w.shape[1] = slice.count;
  return w;
}

// A rank's rows of the embedding or the lm head (vocab, hidden): plan.vocab_rows
// of them from plan.vocab_first(), zero rows past the vocabulary (copied into
// `keep` then).
WeightView vocab_rows(WeightView w, const TpPlan& plan, std::deque<std::vector<uint8_t>>& keep) {
  if (!plan.sharded()) return w;
  const int64_t have = std::max<int64_t>(0, std::min(plan.vocab_rows, w.shape[0] - plan.vocab_first()));
  if (have == plan.vocab_rows) return cut(w, {0, plan.vocab_first(), have}, keep);
  const size_t row_bytes = static_cast<size_t>(w.shape[1]) * w.element_size();
  keep.emplace_back(static_cast<size_t>(plan.vocab_rows) * row_bytes, uint8_t{0});
  if (have > 0)
    std::memcpy(keep.back().data(), static_cast<const uint8_t*>(w.data) + plan.vocab_first() * row_bytes,
                static_cast<size_t>(have) * row_bytes);
  w.data = keep.back().data();
  w.shape[0] = plan.vocab_rows;
  return w;
}

RopeTable make_rope(Backend& backend, const LlamaConfig& cfg, int64_t max_positions) {
  const std::vector<double> inv = cfg.rope_inv_freq();
  const int64_t half = cfg.head_dim / 2;
  Tensor cos = host_empty({max_positions, half}, ScalarType::F32);
  Tensor sin = host_empty({max_positions, half}, ScalarType::F32);
  for (int64_t p = 0; p < max_positions; ++p)
    for (int64_t i = 0; i < half; ++i) {
      // fp32 angle, as transformers computes it
      const float angle = static_cast<float>(p) * static_cast<float>(inv[i]);
      cos.as<float>()[p * half + i] = static_cast<float>(std::cos(static_cast<double>(angle)));
      sin.as<float>()[p * half + i] = static_cast<float>(std::sin(static_cast<double>(angle)));
    }
  return {backend.from_host(cos), backend.from_host(sin)};
}

}  // namespace

LlamaModel::LlamaModel(const LlamaConfig& config, const std::string& model_dir, Backend& backend,
                       ScalarType weight_dtype, int64_t max_positions,
                       const std::function<void(int64_t, int64_t)>& progress, Fp8Projections fp8, const TpPlan& plan,
                       Collectives* comm)
    : plan_(plan.size > 1 ? plan : TpPlan::make(config, 0, 1)),
      comm_(plan_.sharded() ? comm : nullptr),
      backend_(backend),
      weight_dtype_(weight_dtype) {
  if (plan_.sharded() && comm == nullptr)
    throw Error(ErrorKind::Runtime, "LlamaModel: a tensor-parallel rank without collectives");
  cfg_ = plan_.local(config);
  // PAGEDRT_LAST_LAYER=all: the last layer on every row, as before session 44 (A/B runs)
  if (const char* v = std::getenv("PAGEDRT_LAST_LAYER")) logit_rows_only_ = std::string(v) != "all";
  backend.check_attention(cfg_.num_heads, cfg_.num_kv_heads, cfg_.head_dim);
  const Checkpoint ckpt = Checkpoint::open(model_dir);
  // The whole model's shapes (the checkpoint's), and this rank's slices of them.
  const int64_t hidden = config.hidden_size, inter = config.intermediate_size, D = config.head_dim;
  const int64_t q_dim = config.num_heads * D, kv_dim = config.num_kv_heads * D;
  const int r = plan_.rank;
  auto slice = [&](int dim, int64_t first, int64_t count) { return plan_.sharded() ? Slice{dim, first, count} : Slice{}; };
  const Slice q_rows = slice(0, r * plan_.q_heads * D, plan_.q_heads * D);
  const Slice kv_rows = slice(0, r * plan_.kv_heads * D, plan_.kv_heads * D);
  const Slice q_cols = slice(1, r * plan_.q_heads * D, plan_.q_heads * D);
  const Slice mlp_rows = slice(0, r * plan_.inter, plan_.inter), mlp_cols = slice(1, r * plan_.inter, plan_.inter);
  auto norm = [&](const std::string& name) {
    return backend.load_weight({expect(ckpt, name, {hidden})}, ScalarType::F32);
  };
  const int64_t parts = cfg_.num_layers + 2;
  auto loaded = [&](int64_t done) {
    if (progress) progress(done, parts);
  };
  {
    std::deque<std::vector<uint8_t>> bytes;  // a rank's padded rows
    // Tied, it is the lm head's weight too: loaded as a linear's, in the layout
    // the backend's GEMM reads (its embedding() reads that layout as well).
    std::vector<WeightView> table = {
        vocab_rows(expect(ckpt, "model.embed_tokens.weight", {cfg_.vocab_size, hidden}), plan_, bytes)};
    embed_ = cfg_.tie_word_embeddings ? backend.load_linear_weight(table, weight_dtype)
                                      : backend.load_weight(table, weight_dtype);
  }
  ckpt.release("model.embed_tokens.weight");  // copied: its mapped pages go (Checkpoint::release)
  loaded(1);
  for (int64_t l = 0; l < cfg_.num_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    std::deque<std::vector<float>> keep;     // this layer's fp8 weights' scales, or their dequantized values
    std::deque<std::vector<uint8_t>> bytes;  // this rank's columns of a row-parallel weight
    std::deque<Tensor> fp8_columns;          // or their fp8 codes (host_fp8_columns)
    struct Part {
      std::string name;
      std::vector<int64_t> shape;  // in the checkpoint
      Slice slice;                 // this rank's
    };
    // A fused group of projections: fp8 where `fp8` says, else the weight dtype.
    auto group = [&](const std::vector<Part>& parts) {
      auto views_of = [&](bool codes) {
        std::vector<WeightView> views;
        for (const Part& part : parts) {
          const WeightView v = expect(ckpt, part.name, part.shape, cfg_.quant, &keep, codes);
          if (fp8 == Fp8Projections::All && codes && part.slice.dim == 1 && v.type != WeightView::Type::F8E4M3) {
            // quantized with the whole row's scale, so the ranks' partial products add up to the unsharded one
            const Tensor& q = fp8_columns.emplace_back(host_fp8_columns(v, part.slice.first, part.slice.count));
            WeightView w;
            w.type = WeightView::Type::F8E4M3;
            w.shape = q.shape;
            w.data = q.data;
            w.row_scale = q.row_scale->as<float>();
            views.push_back(w);
          } else {
            views.push_back(cut(v, part.slice, bytes));
          }
        }
        return views;
      };
      std::vector<WeightView> views = views_of(fp8 != Fp8Projections::None);
      bool all_fp8 = true;
      int64_t rows = 0;
      for (const WeightView& v : views) all_fp8 = all_fp8 && v.type == WeightView::Type::F8E4M3, rows += v.shape[0];
      // A checkpoint's codes stay where the backend's fp8 GEMMs take the group's shape.
      const bool keep_codes = all_fp8 && backend.fp8_shape_ok(rows, views[0].shape[1]);
      if (fp8 == Fp8Projections::All || (fp8 == Fp8Projections::Checkpoint && keep_codes))
        return backend.load_weight(views, ScalarType::F8E4M3);
      if (fp8 != Fp8Projections::None && !keep_codes)  // fp8 parts of a mixed or odd-shaped group: dequantized
        views = views_of(false);
      return backend.load_linear_weight(views, weight_dtype);
    };
    Layer layer;
    layer.input_norm = norm(p + "input_layernorm.weight");
    layer.post_norm = norm(p + "post_attention_layernorm.weight");
    layer.qkv = group({{p + "self_attn.q_proj.weight", {q_dim, hidden}, q_rows},
                       {p + "self_attn.k_proj.weight", {kv_dim, hidden}, kv_rows},
                       {p + "self_attn.v_proj.weight", {kv_dim, hidden}, kv_rows}});
    layer.o = group({{p + "self_attn.o_proj.weight", {hidden, q_dim}, q_cols}});
    layer.gate_up = group({{p + "mlp.gate_proj.weight", {inter, hidden}, mlp_rows},
                           {p + "mlp.up_proj.weight", {inter, hidden}, mlp_rows}});
    layer.down = group({{p + "mlp.down_proj.weight", {hidden, inter}, mlp_cols}});
    layers_.push_back(std::move(layer));
    ckpt.release(p);
    loaded(l + 2);
  }
  final_norm_ = norm("model.norm.weight");
  if (cfg_.tie_word_embeddings) {
    lm_head_ = embed_;
  } else {
    std::deque<std::vector<float>> keep;  // an fp8 lm head, dequantized
    std::deque<std::vector<uint8_t>> bytes;
    lm_head_ = backend.load_linear_weight(
        {vocab_rows(expect(ckpt, "lm_head.weight", {cfg_.vocab_size, hidden}, cfg_.quant, &keep), plan_, bytes)},
        weight_dtype);
    ckpt.release("lm_head.weight");
  }
  rope_ = make_rope(backend, cfg_, max_positions);
  loaded(parts);
}

namespace {

// The rows a workspace grown for `need` rows gets: `need` rounded up to a
// power of two, at least 16. Growing to the exact count reallocated the
// activations (cudaFree waits for the device) and made every recorded step
// shape record again (the workspace's generation is part of its key) at each
// step longer than any before (16 times in bench_cuda.py new_shapes' 1,000 ...
// 1,015-token prefills); by powers of two it grows at most once per doubling,
// to under twice the need.
int64_t workspace_rows(int64_t need) {
  int64_t rows = 16;
  while (rows < need) rows <<= 1;
  return rows;
}

}  // namespace

void LlamaModel::warm_up(int64_t max_tokens, int64_t max_logit_rows) {
  const ScalarType act = backend_.activation_dtype();
  for (const Layer& L : layers_) {  // alike in every layer (the backend asks once per shape)
    backend_.warm_linear(L.qkv, max_tokens, act);
    backend_.warm_linear_silu_mul(L.gate_up, max_tokens);
    for (const Tensor* w : {&L.o, &L.down})  // queue_step's project_into: the residual GEMM where it takes the rows
      if (comm_ != nullptr || !backend_.warm_linear_into_residual(*w, max_tokens))
        backend_.warm_linear(*w, max_tokens, act);
  }
  backend_.warm_linear(lm_head_, max_logit_rows, ScalarType::F32);
}

void LlamaModel::ensure_workspace(int64_t tokens, int64_t logit_rows) {
  const ScalarType act = backend_.activation_dtype();
  if (tokens > ws_.tokens) {
    ++ws_.generation;
    const int64_t hidden = cfg_.hidden_size, D = cfg_.head_dim;
    const int64_t H = cfg_.num_heads, Hkv = cfg_.num_kv_heads, inter = cfg_.intermediate_size;
    tokens = workspace_rows(tokens);
    ws_.tokens = tokens;
    ws_.residual = backend_.empty({tokens, hidden}, ScalarType::F32);
    ws_.normed = backend_.empty({tokens, hidden}, act);
    ws_.qkv = backend_.empty({tokens, (H + 2 * Hkv) * D}, act);
    ws_.attn = backend_.empty({tokens, H * D}, act);
    ws_.proj = backend_.empty({tokens, hidden}, act);
    ws_.gate_up = backend_.empty({tokens, 2 * inter}, act);
    ws_.act = backend_.empty({tokens, inter}, act);
  }
  if (logit_rows > ws_.logit_rows) {
    ++ws_.generation;
    logit_rows = workspace_rows(logit_rows);
    ws_.logit_rows = logit_rows;
    ws_.last_res = backend_.empty({logit_rows, cfg_.hidden_size}, ScalarType::F32);
    ws_.last_attn = backend_.empty({logit_rows, cfg_.num_heads * cfg_.head_dim}, act);
    ws_.last = backend_.empty({logit_rows, cfg_.hidden_size}, act);
    if (plan_.rank == 0) ws_.logits = backend_.empty({logit_rows, cfg_.vocab_size}, ScalarType::F32);
    if (plan_.sharded()) {
      ws_.part_logits = backend_.empty({logit_rows, plan_.vocab_rows}, ScalarType::F32);
      if (const int64_t n = comm_->gather_scratch(logit_rows, plan_.vocab_rows); n > 0)
        ws_.gathered = backend_.empty({n}, ScalarType::F32);
    }
  }
}

// Every op of one step, from the embedding to the logits (device memory).
void LlamaModel::queue_step(KvCache& kv, int64_t n, int64_t num_logits) {
  const int64_t H = cfg_.num_heads, Hkv = cfg_.num_kv_heads, D = cfg_.head_dim;
  const float eps = static_cast<float>(cfg_.rms_norm_eps);
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const int64_t hidden = cfg_.hidden_size;
  // Tensor parallelism: the sum over the ranks of the partial rows each computed.
  auto all_reduce = [&](Tensor& x, int64_t rows) {
    if (comm_ != nullptr) comm_->all_reduce_sum(x, rows * hidden);
  };
  // In the last layer only the rows whose logits are read matter, once
  // every token's K and V are cached: where a step reads fewer (a prompt's
  // prefill, a chunk of it without any), that layer's attention runs for
  // those rows (rope_cache_attention_logit_rows: the tiles that hold them),
  // and its o_proj, norm and MLP on those rows alone, gathered; a chunk
  // that reads none only caches its K and V there.
  const bool narrow = logit_rows_only_ && num_logits < n;
  // o_proj and down add into the residual inside their GEMM where the
  // backend can (linear_into_residual: CUDA from 64 rows); the norm
  // after them then reads the residual alone. Not with tensor parallelism,
  // whose partial products are summed over the ranks before the add.
  auto project_into = [&](const Tensor& x, const Tensor& w, int64_t rows, Tensor& residual) {
    if (comm_ == nullptr && backend_.linear_into_residual(x, w, rows, residual)) return true;
    backend_.linear(x, w, rows, ws_.proj);  // (rows, hidden), added by the caller
    all_reduce(ws_.proj, rows);
    return false;
  };
  bool proj_pending = false;  // ws_.proj holds the last down projection, not yet in the residual
  backend_.embedding(embed_, plan_.vocab_first(), ws_.residual);  // residual (n, hidden)
  all_reduce(ws_.residual, n);  // one rank holds each token's row, the others add zeros
  for (size_t l = 0; l < layers_.size(); ++l) {
    Layer& L = layers_[l];
    if (proj_pending)  // the previous layer's MLP output joins the residual here
      backend_.add_rms_norm(ws_.residual, ws_.proj, L.input_norm, eps, n, ws_.normed);
    else
      backend_.rms_norm(ws_.residual, L.input_norm, eps, n, ws_.normed);
    backend_.linear(ws_.normed, L.qkv, n, ws_.qkv);  // (n, (H + 2Hkv) D)
    Tensor* residual = &ws_.residual;
    const Tensor* attn = &ws_.attn;
    int64_t rows = n;
    if (!narrow || l + 1 < layers_.size()) {
      backend_.rope_cache_attention(ws_.qkv, rope_, H, Hkv, D, scale, kv.k[l], kv.v[l], ws_.attn);  // (n, H D)
    } else {
      if (num_logits == 0) {
        backend_.rope_and_cache(ws_.qkv, rope_, H, Hkv, D, kv.k[l], kv.v[l]);
        return;
      }
      backend_.rope_cache_attention_logit_rows(ws_.qkv, rope_, H, Hkv, D, scale, kv.k[l], kv.v[l], ws_.attn);
      backend_.gather_rows(ws_.attn, ws_.last_attn);     // (num_logits, H D)
      backend_.gather_rows(ws_.residual, ws_.last_res);  // (num_logits, hidden)
      residual = &ws_.last_res, attn = &ws_.last_attn, rows = num_logits;
    }
    if (project_into(*attn, L.o, rows, *residual))  // o_proj: (rows, hidden)
      backend_.rms_norm(*residual, L.post_norm, eps, rows, ws_.normed);
    else
      backend_.add_rms_norm(*residual, ws_.proj, L.post_norm, eps, rows, ws_.normed);
    backend_.linear_silu_mul(ws_.normed, L.gate_up, rows, ws_.gate_up, ws_.act);  // (rows, I), via (rows, 2I)
    proj_pending = !project_into(ws_.act, L.down, rows, *residual);               // down: (rows, hidden)
  }
  if (num_logits == 0) return;
  if (narrow) {
    if (proj_pending) backend_.add(ws_.last_res, ws_.proj, num_logits);
  } else {
    if (proj_pending) backend_.add(ws_.residual, ws_.proj, n);
    backend_.gather_rows(ws_.residual, ws_.last_res);  // (num_logits, hidden)
  }
  backend_.rms_norm(ws_.last_res, final_norm_, eps, num_logits, ws_.last);  // final norm, gathered rows only
  if (comm_ == nullptr) {
    backend_.linear(ws_.last, lm_head_, num_logits, ws_.logits);  // (num_logits, vocab)
    return;
  }
  backend_.linear(ws_.last, lm_head_, num_logits, ws_.part_logits);  // (num_logits, vocab_rows)
  comm_->gather_columns(ws_.part_logits, num_logits, plan_.vocab_rows, ws_.logits, cfg_.vocab_size,
                        ws_.gathered);  // rank 0's
}

void LlamaModel::forward(const BatchView& batch, KvCache& kv, float* logits, int32_t* argmax) {
  const int64_t n = batch.num_tokens;
  ensure_workspace(n, batch.num_logits);
  backend_.begin_step(batch);

  // The same workspace, KV cache, token count and logit count queue the same
  // ops on the same tensors: the key of a recorded step (Backend::run_step).
  uint64_t key = 0;
  for (uint64_t part : {ws_.generation, static_cast<uint64_t>(n), static_cast<uint64_t>(batch.num_logits),
                        static_cast<uint64_t>(reinterpret_cast<uintptr_t>(kv.k.empty() ? nullptr : kv.k[0].data))})
    key = (key ^ part) * 0x100000001b3ull + 0x9e3779b97f4a7c15ull;
  backend_.run_step(key, [&] { queue_step(kv, n, batch.num_logits); });
  if (batch.num_logits > 0) read_logits(batch.num_logits, logits, argmax);
}

void LlamaModel::read_logits(int64_t rows, float* logits, int32_t* argmax) {
  if (argmax != nullptr)
    backend_.argmax(ws_.logits, rows, argmax);
  else if (logits != nullptr)
    backend_.to_host(ws_.logits, rows * cfg_.vocab_size, logits);
}

void LlamaModel::pick(int64_t rows, int32_t* out, const RowMasks& masks) {
  if (rows > 0) backend_.argmax(ws_.logits, rows, out, masks);
}

void LlamaModel::sample(const std::vector<SampleRow>& draws, const std::vector<LogitEdit>& edits,
                        const DrawMasks& masks, int32_t* out, DrawLogprobs* logprobs) {
  if (!draws.empty())
    backend_.sample(ws_.logits, draws.data(), static_cast<int64_t>(draws.size()), edits.data(),
                    static_cast<int64_t>(edits.size()), out, logprobs, masks);
}

}  // namespace pagedrt
