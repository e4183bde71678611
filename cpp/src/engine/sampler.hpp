// engine/sampler.hpp — from a logits row to the next token (see the order of
// operations in pagedrt/sampling_params.hpp), plus log-probabilities.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

#include "backend/backend.hpp"
#include "pagedrt/event.hpp"
#include "pagedrt/sampling_params.hpp"

namespace pagedrt {

// A sequence's random stream: seeded from (seed, sample index) when the
// request has a seed, so its draws do not depend on anything else in the batch.
using Rng = std::mt19937_64;

// A sequence's distinct tokens, sorted, with their counts in the output: what
// the penalties of device processing need (Sampler::device_edits), kept up to
// date as tokens are appended (extend: O(new tokens x distinct) moves at
// worst, no sort), so that a step costs a copy of it, not a pass over the
// whole sequence. Tokens before `len` are in it.
struct TokenHistory {
  std::vector<int32_t> token;  // sorted, distinct
  std::vector<int32_t> count;  // occurrences at positions >= prompt_len
  int64_t len = 0;
  void extend(const std::vector<int32_t>& prompt_and_output, int64_t prompt_len);
};
Rng make_rng(const SamplingParams& params, int32_t index);
// Device sampling's streams (Backend::sample, Philox): a request's base is
// its seed, or 64 random bits when it has none (Request::sample_base);
// sample `index` draws under key sample_key(base, index) (the value make_rng
// seeds a seeded stream with), at counter = its token count.
uint64_t sample_base(const SamplingParams& params);
uint64_t sample_key(uint64_t base, int32_t index);

class Sampler {
 public:
  // Steps 1-3: logit_bias, min_tokens, penalties, in place on logits (vocab).
  // `output` are the tokens generated so far, `prompt` the prompt.
  static void process(float* logits, int64_t vocab, const SamplingParams& params,
                      const std::vector<int32_t>& prompt_and_output, int64_t prompt_len,
                      const std::vector<int32_t>& eos_ids);

  // Whether process() would change anything for a sequence with `generated`
  // tokens (if not, the raw row can be sampled without a copy).
  static bool needs_processing(const SamplingParams& params, int64_t generated);
  // Every token `mask` ((vocab + 31) / 32 words, bit t: token t allowed) does
  // not allow gets logit -inf; false when it allows none.
  static bool apply_mask(float* logits, int64_t vocab, const uint32_t* mask);
  // Whether `mask` allows any token of the vocabulary.
  static bool mask_allows_any(const uint32_t* mask, int64_t vocab);

  // Step 4 on processed logits. `scratch` is reused between calls.
  static int32_t pick(const float* logits, int64_t vocab, const SamplingParams& params, Rng& rng,
                      std::vector<double>& scratch, std::vector<int32_t>& order);

  // Speculative decoding: the token for a position where `draft` was
  // proposed: pick()'s token, from the same draw of `rng` (one uniform when
  // sampling), and `accepted` when it equals the draft. For a proposal that is
  // one token for certain this is rejection sampling (kept with probability
  // p(draft), else a token of p without the draft, renormalised), and a
  // seeded sequence's tokens do not depend on what was proposed.
  static int32_t verify_draft(const float* logits, int64_t vocab, const SamplingParams& params, Rng& rng,
                              int32_t draft, bool& accepted, std::vector<double>& scratch,
                              std::vector<int32_t>& order);

  // Whether a row of `params` (with `generated` tokens so far) is drawn on
  // the device where the backend samples (Backend::sample): a sampled row
  // (temperature > 0) whatever it asks of processing and logprobs, a greedy
  // one when it needs processing or logprobs (a plain greedy row is the
  // device argmax's), structured output's rows too (their masks go to the
  // device), never a row of beams, speculation, returned logits or prompt
  // logprobs. For sampled rows a property of the
  // request, never of the step: a seeded request draws the same tokens
  // whatever shares its steps.
  static bool drawn_on_device(const SamplingParams& params, int64_t generated);

  // The edits (backend.hpp's LogitEdit) with which the device processes a
  // row as process() does: appended to `edits`, sorted by token, and d's
  // first_edit, num_edits and penalties set. `history`: the sequence's,
  // extended to every token of prompt_and_output first.
  static void device_edits(const SamplingParams& params, const std::vector<int32_t>& prompt_and_output,
                           int64_t prompt_len, const std::vector<int32_t>& eos_ids, TokenHistory& history,
                           std::vector<LogitEdit>& edits, SampleRow& d);

  // The greedy token: the first index of the largest logit (NaN never chosen
  // over a number), as the device argmax picks it.
  static int32_t greedy(const float* logits, int64_t vocab);

  // log-softmax of `logits` into `out` (vocab).
  static void log_softmax(const float* logits, int64_t vocab, std::vector<float>& out);

  // The chosen token's logprob and the top k (from log-softmaxed `logprobs`).
  static TokenLogprob token_logprob(const std::vector<float>& logprobs, int32_t token, int32_t k);
};

}  // namespace pagedrt
