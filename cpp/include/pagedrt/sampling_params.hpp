// pagedrt/sampling_params.hpp — per-request decoding parameters.
//
// Names and meanings follow vLLM's SamplingParams. Runtime::submit checks
// every value and throws pagedrt::Error(InvalidArgument) naming the field.
//
// How a token is picked (sampling), in this order:
//   1. logit_bias is added;
//   2. while fewer than min_tokens are generated, eos and stop_token_ids are banned;
//   3. repetition_penalty (every token of prompt and output: logit > 0 ? logit / p
//      : logit * p), then frequency_penalty (minus f x count in the output) and
//      presence_penalty (minus p if in the output);
//   4. temperature == 0: the largest logit (ties: lowest id); otherwise logits /
//      temperature, softmax, keep the top_k most likely, then the smallest set
//      whose probability reaches top_p, then those with probability >= min_p x
//      the largest; renormalise and draw.
// Beam search (beam_width > 1) follows transformers' generate(num_beams=...):
// log-softmax of the raw logits, length_penalty and early_stopping as there.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace pagedrt {

struct SamplingParams {
  int32_t n = 1;                        // independent samples (or beams returned)
  float temperature = 1.0f;             // 0: greedy
  int32_t top_k = 0;                    // 0 or -1: off
  float top_p = 1.0f;                   // (0, 1]
  float min_p = 0.0f;                   // [0, 1]
  float repetition_penalty = 1.0f;      // > 0; 1: off
  float presence_penalty = 0.0f;        // [-2, 2]
  float frequency_penalty = 0.0f;       // [-2, 2]
  bool has_seed = false;                // with a seed, the tokens do not depend
  uint64_t seed = 0;                    // on the batch the request runs in
  int32_t max_tokens = 16;              // generated tokens at most per sequence (>= 1)
  int32_t min_tokens = 0;               // eos / stop tokens banned before this many
  bool ignore_eos = false;              // keep going past the model's eos ids
  std::vector<int32_t> stop_token_ids;  // extra token ids that end a sequence (kept)
  std::optional<int32_t> logprobs;      // set (0..20): the chosen token's logprob and the top k
  // set (0..20): the logprob of every prompt token after the first, and the
  // top k at its position (Event::prompt_logprobs). Such a request computes
  // its whole prompt: it reuses no cached prefix.
  std::optional<int32_t> prompt_logprobs;
  // Each sampled token is limited to the tokens the Runtime's TokenMaskProvider
  // allows (pagedrt/token_mask.hpp; structured output). Not with beam search.
  bool masked = false;
  std::vector<std::pair<int32_t, float>> logit_bias;  // token id -> added to its logit

  // Speculative decoding (docs/speculative.md). "ngram": prompt lookup — the
  // continuation of the longest recent n-gram (ngram_max down to ngram_min
  // tokens) that occurred earlier in the prompt or output is proposed, up to
  // num_speculative_tokens tokens, and verified in one forward: greedy keeps
  // the longest prefix equal to the model's own picks, sampling keeps a
  // proposal when it is the token plain sampling draws there (rejection
  // sampling: the output distribution is the model's, and on the CPU a
  // seeded request draws the same tokens with or without speculation). "draft":
  // the Runtime's draft model (RuntimeConfig::draft_model) proposes them by
  // greedy steps of its own. "" : off.
  // Not with beam search, return_logits or prompt_logprobs.
  std::string speculative;
  int32_t num_speculative_tokens = 8;   // 1 .. 16: proposals a step at most (docs/speculative.md: why 8)
  int32_t ngram_min = 2;                // 1 .. ngram_max (docs/speculative.md: why 2)
  int32_t ngram_max = 4;                // .. 16

  int32_t beam_width = 1;               // > 1: beam search (greedy; temperature ignored)
  float length_penalty = 1.0f;          // beam score = sum logprob / length ** length_penalty
  int32_t early_stopping = 0;           // 0: false (heuristic), 1: true, 2: "never"

  // Experimental, for tests and tools: attach the raw fp32 logits of every
  // position the engine computes for this request to its events.
  bool return_logits = false;

  bool is_beam_search() const { return beam_width > 1; }
};

// Throws Error(InvalidArgument) naming the field for a value out of its range.
// Runtime::submit checks this too, and what depends on the model: token ids
// against the vocabulary, n and beam_width against max_num_seqs.
void validate(const SamplingParams& params);

}  // namespace pagedrt
