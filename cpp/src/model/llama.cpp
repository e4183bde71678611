#include "model/llama.hpp"

#include <cmath>
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
                       const std::function<void(int64_t, int64_t)>& progress, Fp8Projections fp8)
    : cfg_(config),
      backend_(backend),
      weight_dtype_(weight_dtype) {
  backend.check_attention(cfg_.num_heads, cfg_.num_kv_heads, cfg_.head_dim);
  const Checkpoint ckpt = Checkpoint::open(model_dir);
  const int64_t hidden = cfg_.hidden_size, inter = cfg_.intermediate_size;
  const int64_t q_dim = cfg_.num_heads * cfg_.head_dim, kv_dim = cfg_.num_kv_heads * cfg_.head_dim;
  auto norm = [&](const std::string& name) {
    return backend.load_weight({expect(ckpt, name, {hidden})}, ScalarType::F32);
  };
  const int64_t parts = cfg_.num_layers + 2;
  auto loaded = [&](int64_t done) {
    if (progress) progress(done, parts);
  };
  embed_ = backend.load_weight({expect(ckpt, "model.embed_tokens.weight", {cfg_.vocab_size, hidden})},
                               weight_dtype);
  loaded(1);
  for (int64_t l = 0; l < cfg_.num_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    std::deque<std::vector<float>> keep;  // this layer's fp8 weights' scales, or their dequantized values
    // A fused group of projections (name, shape): fp8 where `fp8` says, else the weight dtype.
    auto group = [&](std::vector<std::pair<std::string, std::vector<int64_t>>> parts) {
      std::vector<WeightView> views;
      for (auto& [name, shape] : parts)
        views.push_back(expect(ckpt, name, shape, cfg_.quant, &keep, fp8 != Fp8Projections::None));
      bool all_fp8 = true;
      int64_t rows = 0;
      for (const WeightView& v : views) all_fp8 = all_fp8 && v.type == WeightView::Type::F8E4M3, rows += v.shape[0];
      // A checkpoint's codes stay where the backend's fp8 GEMMs take the group's shape.
      const bool keep_codes = all_fp8 && backend.fp8_shape_ok(rows, views[0].shape[1]);
      if (fp8 == Fp8Projections::All || (fp8 == Fp8Projections::Checkpoint && keep_codes))
        return backend.load_weight(views, ScalarType::F8E4M3);
      if (fp8 != Fp8Projections::None && !keep_codes) {  // fp8 parts of a mixed or odd-shaped group: dequantized
        views.clear();
        for (auto& [name, shape] : parts) views.push_back(expect(ckpt, name, shape, cfg_.quant, &keep));
      }
      return backend.load_weight(views, weight_dtype);
    };
    Layer layer;
    layer.input_norm = norm(p + "input_layernorm.weight");
    layer.post_norm = norm(p + "post_attention_layernorm.weight");
    layer.qkv = group({{p + "self_attn.q_proj.weight", {q_dim, hidden}},
                       {p + "self_attn.k_proj.weight", {kv_dim, hidden}},
                       {p + "self_attn.v_proj.weight", {kv_dim, hidden}}});
    layer.o = group({{p + "self_attn.o_proj.weight", {hidden, q_dim}}});
    layer.gate_up = group({{p + "mlp.gate_proj.weight", {inter, hidden}}, {p + "mlp.up_proj.weight", {inter, hidden}}});
    layer.down = group({{p + "mlp.down_proj.weight", {hidden, inter}}});
    layers_.push_back(std::move(layer));
    loaded(l + 2);
  }
  final_norm_ = norm("model.norm.weight");
  if (cfg_.tie_word_embeddings) {
    lm_head_ = embed_;
  } else {
    std::deque<std::vector<float>> keep;  // an fp8 lm head, dequantized
    lm_head_ = backend.load_weight({expect(ckpt, "lm_head.weight", {cfg_.vocab_size, hidden}, cfg_.quant, &keep)},
                                   weight_dtype);
  }
  rope_ = make_rope(backend, cfg_, max_positions);
  loaded(parts);
}

void LlamaModel::ensure_workspace(int64_t tokens, int64_t logit_rows) {
  const ScalarType act = backend_.activation_dtype();
  if (tokens > ws_.tokens) {
    ++ws_.generation;
    const int64_t hidden = cfg_.hidden_size, D = cfg_.head_dim;
    const int64_t H = cfg_.num_heads, Hkv = cfg_.num_kv_heads, inter = cfg_.intermediate_size;
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
    ws_.logit_rows = logit_rows;
    ws_.last_res = backend_.empty({logit_rows, cfg_.hidden_size}, ScalarType::F32);
    ws_.last = backend_.empty({logit_rows, cfg_.hidden_size}, act);
    ws_.logits = backend_.empty({logit_rows, cfg_.vocab_size}, ScalarType::F32);
  }
}

// Every op of one step, from the embedding to the logits (device memory).
void LlamaModel::queue_step(KvCache& kv, int64_t n, int64_t num_logits) {
  const int64_t H = cfg_.num_heads, Hkv = cfg_.num_kv_heads, D = cfg_.head_dim;
  const float eps = static_cast<float>(cfg_.rms_norm_eps);
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  backend_.embedding(embed_, ws_.residual);  // residual (n, hidden)
  for (size_t l = 0; l < layers_.size(); ++l) {
    Layer& L = layers_[l];
    if (l == 0)
      backend_.rms_norm(ws_.residual, L.input_norm, eps, n, ws_.normed);
    else  // the previous layer's MLP output joins the residual here
      backend_.add_rms_norm(ws_.residual, ws_.proj, L.input_norm, eps, ws_.normed);
    backend_.linear(ws_.normed, L.qkv, n, ws_.qkv);                          // (n, (H + 2Hkv) D)
    backend_.rope_cache_attention(ws_.qkv, rope_, H, Hkv, D, scale, kv.k[l], kv.v[l], ws_.attn);  // (n, H D)
    backend_.linear(ws_.attn, L.o, n, ws_.proj);                             // (n, hidden)
    backend_.add_rms_norm(ws_.residual, ws_.proj, L.post_norm, eps, ws_.normed);
    backend_.linear_silu_mul(ws_.normed, L.gate_up, n, ws_.gate_up, ws_.act);  // (n, I), via (n, 2I)
    backend_.linear(ws_.act, L.down, n, ws_.proj);                           // (n, hidden)
  }
  if (num_logits == 0) return;
  backend_.add(ws_.residual, ws_.proj);
  backend_.gather_rows(ws_.residual, ws_.last_res);  // (num_logits, hidden)
  backend_.rms_norm(ws_.last_res, final_norm_, eps, num_logits, ws_.last);  // final norm, gathered rows only
  backend_.linear(ws_.last, lm_head_, num_logits, ws_.logits);          // (num_logits, vocab)
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
  if (batch.num_logits == 0) return;
  if (argmax != nullptr)
    backend_.argmax(ws_.logits, batch.num_logits, argmax);
  else if (logits != nullptr)
    backend_.to_host(ws_.logits, batch.num_logits * cfg_.vocab_size, logits);
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
