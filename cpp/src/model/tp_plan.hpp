// model/tp_plan.hpp — which rows and columns of each tensor a rank of a
// tensor-parallel model holds (Megatron-style; RuntimeConfig::tensor_parallel_size).
//
//   q, k, v, gate, up   column-parallel: rank r holds its heads' / its slice's rows
//   o_proj, down        row-parallel: rank r holds the matching columns; the
//                       ranks' partial outputs are summed (all-reduce)
//   embedding, lm head  vocabulary-parallel: rank r holds rows
//                       [r * vocab_rows, (r + 1) * vocab_rows), zero rows past
//                       the vocabulary; the embedding's rows are summed, the
//                       logits' columns gathered
//   norms               whole on every rank (the residual stream is replicated)
//
// A rank runs the plain Llama forward on its local config (its heads and its
// share of the MLP) with collectives at those three places (model/llama.hpp).
#pragma once

#include <cstdint>

#include "model/llama_config.hpp"

namespace pagedrt {

struct TpPlan {
  int rank = 0;
  int size = 1;
  int64_t q_heads = 0;     // query heads a rank holds: num_heads / size
  int64_t kv_heads = 0;    // kv heads a rank holds: num_kv_heads / size
  int64_t inter = 0;       // intermediate columns a rank holds: intermediate_size / size
  int64_t vocab_rows = 0;  // embedding / lm head rows a rank holds: ceil(vocab_size / size)

  // The plan of `rank` of `size` for `cfg`. Throws Error(InvalidArgument)
  // naming the config field that `size` does not divide (num_attention_heads,
  // num_key_value_heads, intermediate_size) or a size outside 1, 2, 4, 8.
  static TpPlan make(const LlamaConfig& cfg, int rank, int size);

  bool sharded() const { return size > 1; }
  // The first vocabulary id of this rank's embedding / lm head rows.
  int64_t vocab_first() const { return rank * vocab_rows; }
  // What this rank's forward sees: its heads and MLP share (hidden size,
  // head_dim, layers, vocabulary and everything else as in `cfg`).
  LlamaConfig local(const LlamaConfig& cfg) const;
};

}  // namespace pagedrt
