// model/llama.hpp — the Llama forward, written only against Backend ops.
//
//   embed → [RMSNorm → QKV → RoPE + write K/V to slots → paged attention → O
//            → residual → RMSNorm → gate/up → SiLU·mul → down → residual] × L
//         → norm → lm_head (only the rows the batch asks logits for)
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "backend/backend.hpp"
#include "backend/collectives.hpp"
#include "model/kv_cache.hpp"
#include "model/llama_config.hpp"
#include "model/tp_plan.hpp"

namespace pagedrt {

// Which projection weights load as fp8 (F8E4M3, a scale per row; needs
// backend.has_fp8_weights()). Checkpoint: a fused group (QKV, gate and up,
// o, down) whose every part is fp8 with a scale per tensor or per channel
// keeps its codes; other groups load at the weight dtype. All: every
// projection, quantized per row where it is not such fp8 already
// (RuntimeConfig::quantization "fp8").
enum class Fp8Projections { None, Checkpoint, All };

class LlamaModel {
 public:
  // Reads the safetensors weights of `model_dir` (whose config.json gave
  // `config`); weights are converted to `weight_dtype` (F32 or BF16) on
  // `backend`, each layer's projections to fp8 as `fp8` says. Every missing
  // or mis-shaped tensor throws
  // Error(InvalidModel) naming the file and tensor.
  // `progress` (may be empty) hears (parts loaded, parts in all) after the
  // embedding, each layer and the head.
  // A rank of a tensor-parallel model (plan.size > 1) loads only its shard
  // of each tensor (model/tp_plan.hpp) and exchanges partial results through
  // `comm` in its forward, which every rank runs at once on its own thread;
  // rank 0 ends with the whole logits.
  LlamaModel(const LlamaConfig& config, const std::string& model_dir, Backend& backend, ScalarType weight_dtype,
             int64_t max_positions, const std::function<void(int64_t, int64_t)>& progress = {},
             Fp8Projections fp8 = Fp8Projections::None, const TpPlan& plan = {}, Collectives* comm = nullptr);

  // The rank's config: its heads and MLP share (TpPlan::local); the whole
  // model's without tensor parallelism.
  const LlamaConfig& config() const { return cfg_; }
  const TpPlan& plan() const { return plan_; }
  ScalarType weight_dtype() const { return weight_dtype_; }

  // Prepares the backend for steps of up to max_tokens tokens and
  // max_logit_rows logits rows (Backend::warm_linear for each projection and
  // the head), so that the first steps of new sizes do not wait for it.
  void warm_up(int64_t max_tokens, int64_t max_logit_rows);

  // Runs one step and writes (batch.num_logits, vocab) fp32 logits to
  // `logits` (host memory); or, with `argmax` (needs backend.has_argmax()),
  // only each row's greedy token to argmax[batch.num_logits] (host memory);
  // with neither, the logits stay on the device for pick().
  void forward(const BatchView& batch, KvCache& kv, float* logits, int32_t* argmax = nullptr);
  // What forward() writes to `logits` or `argmax`, for the last forward's
  // first `rows` logits rows, after one that kept them on the device (a
  // tensor-parallel step reads rank 0's once every rank has queued its work).
  void read_logits(int64_t rows, float* logits, int32_t* argmax);
  // The greedy tokens of the last forward's `rows` logits rows, masked by
  // `masks` (Backend::argmax), into out[rows] (host memory).
  void pick(int64_t rows, int32_t* out, const RowMasks& masks);
  // Device draws (Backend::sample) from the last forward's logits rows, their
  // rows processed by `edits` and masked by `masks`: the token of draws[i]
  // into out[i], its logprobs into logprobs[i] where asked (host memory).
  void sample(const std::vector<SampleRow>& draws, const std::vector<LogitEdit>& edits, const DrawMasks& masks,
              int32_t* out, DrawLogprobs* logprobs);

 private:
  struct Layer {
    Tensor input_norm;  // (hidden) fp32
    Tensor qkv;         // ((H + 2 Hkv) D, hidden)
    Tensor o;           // (hidden, H D)
    Tensor post_norm;   // (hidden) fp32
    Tensor gate_up;     // (2 I, hidden)
    Tensor down;        // (hidden, I)
  };
  // Activations for up to `tokens` tokens; grown on demand (by powers of
  // two: workspace_rows in llama.cpp), never shrunk.
  // The residual stream is fp32 on every backend; the rest is the backend's
  // activation_dtype() (fp32 on the CPU, bf16 on CUDA); logits are fp32.
  struct Workspace {
    int64_t tokens = 0;
    int64_t logit_rows = 0;
    uint64_t generation = 0;  // bumped whenever a tensor below is reallocated
    Tensor residual;  // (tokens, hidden) fp32
    Tensor normed;    // (tokens, hidden)
    Tensor qkv;       // (tokens, (H + 2 Hkv) D)
    Tensor attn;      // (tokens, H D)
    Tensor proj;      // (tokens, hidden)
    Tensor gate_up;   // (tokens, 2 I)
    Tensor act;       // (tokens, I)
    Tensor last_res;  // (logit_rows, hidden) fp32: residual rows whose logits are needed
    Tensor last_attn; // (logit_rows, H D): the last layer's attention rows of those (queue_step)
    Tensor last;      // (logit_rows, hidden) their final norm
    Tensor logits;    // (logit_rows, vocab) fp32; under tensor parallelism rank 0's only
    Tensor part_logits;  // (logit_rows, plan_.vocab_rows) fp32: a rank's columns (tensor parallelism)
    Tensor gathered;     // Collectives::gather_scratch's, where the collectives need one
  };
  void ensure_workspace(int64_t tokens, int64_t logit_rows);
  bool logit_rows_only_ = true;  // the last layer past attention on the logit rows alone (queue_step)
  // Queues one step's ops, embedding to logits, for n tokens (their ids and
  // positions: the backend's current step) and num_logits logit rows.
  void queue_step(KvCache& kv, int64_t n, int64_t num_logits);

  LlamaConfig cfg_;
  TpPlan plan_;
  Collectives* comm_;  // null without tensor parallelism
  Backend& backend_;
  ScalarType weight_dtype_;
  Tensor embed_;    // (vocab, hidden); a rank's (plan_.vocab_rows, hidden)
  Tensor lm_head_;  // as embed_; shares embed_'s storage when tied
  Tensor final_norm_;
  std::vector<Layer> layers_;
  RopeTable rope_;
  Workspace ws_;
};

}  // namespace pagedrt
