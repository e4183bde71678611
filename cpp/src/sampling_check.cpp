// sampling_check.cpp — every SamplingParams field checked, the field named.
#include "sampling_check.hpp"

#include <algorithm>
#include <climits>
#include <cmath>
#include <string>

#include "pagedrt/error.hpp"

namespace pagedrt {
namespace {

bool finite(float x) { return std::isfinite(x); }

}  // namespace

// Every field of SamplingParams, with the field named in the message.
void check_sampling_params(const SamplingParams& p, int64_t vocab, int32_t max_num_seqs, const std::string& where) {
  auto fail = [&](const std::string& msg) { throw Error(ErrorKind::InvalidArgument, where + msg); };
  if (p.n < 1) fail("n must be >= 1, got " + std::to_string(p.n));
  if (!finite(p.temperature) || p.temperature < 0) fail("temperature must be >= 0, got " + std::to_string(p.temperature));
  if (p.top_k < -1) fail("top_k must be -1, 0 (off) or positive, got " + std::to_string(p.top_k));
  if (!finite(p.top_p) || p.top_p <= 0 || p.top_p > 1) fail("top_p must be in (0, 1], got " + std::to_string(p.top_p));
  if (!finite(p.min_p) || p.min_p < 0 || p.min_p > 1) fail("min_p must be in [0, 1], got " + std::to_string(p.min_p));
  if (!finite(p.repetition_penalty) || p.repetition_penalty <= 0)
    fail("repetition_penalty must be > 0, got " + std::to_string(p.repetition_penalty));
  if (!finite(p.presence_penalty) || p.presence_penalty < -2 || p.presence_penalty > 2)
    fail("presence_penalty must be in [-2, 2], got " + std::to_string(p.presence_penalty));
  if (!finite(p.frequency_penalty) || p.frequency_penalty < -2 || p.frequency_penalty > 2)
    fail("frequency_penalty must be in [-2, 2], got " + std::to_string(p.frequency_penalty));
  if (p.max_tokens < 1) fail("max_tokens must be >= 1, got " + std::to_string(p.max_tokens));
  if (p.min_tokens < 0 || p.min_tokens > p.max_tokens)
    fail("min_tokens must be in [0, max_tokens], got " + std::to_string(p.min_tokens));
  if (p.logprobs && (*p.logprobs < 0 || *p.logprobs > 20))
    fail("logprobs must be in [0, 20] (or unset), got " + std::to_string(*p.logprobs));
  if (p.prompt_logprobs && (*p.prompt_logprobs < 0 || *p.prompt_logprobs > 20))
    fail("prompt_logprobs must be in [0, 20] (or unset), got " + std::to_string(*p.prompt_logprobs));
  for (int32_t t : p.stop_token_ids)
    if (t < 0 || t >= vocab) fail("stop_token_ids has " + std::to_string(t) + ", outside the vocabulary");
  for (const auto& [t, b] : p.logit_bias) {
    if (t < 0 || t >= vocab) fail("logit_bias has token " + std::to_string(t) + ", outside the vocabulary");
    if (!finite(b) || b < -100 || b > 100) fail("logit_bias for token " + std::to_string(t) + " must be in [-100, 100]");
  }
  {
    std::vector<int32_t> ids;
    for (const auto& [t, b] : p.logit_bias) ids.push_back(t);
    std::sort(ids.begin(), ids.end());
    const auto twice = std::adjacent_find(ids.begin(), ids.end());
    if (twice != ids.end()) fail("logit_bias has token " + std::to_string(*twice) + " twice");
  }
  if (p.beam_width < 1) fail("beam_width must be >= 1, got " + std::to_string(p.beam_width));
  if (p.is_beam_search()) {
    if (p.n > p.beam_width) fail("n (" + std::to_string(p.n) + ") must be <= beam_width (" + std::to_string(p.beam_width) + ")");
    if (!finite(p.length_penalty)) fail("length_penalty must be finite");
    if (p.early_stopping < 0 || p.early_stopping > 2) fail("early_stopping must be false, true or \"never\"");
    if (p.return_logits) fail("return_logits is not supported with beam search");
    if (p.prompt_logprobs) fail("prompt_logprobs is not supported with beam search");
    if (p.masked) fail("constrained decoding (masked) is not supported with beam search");
  }
  if (!p.speculative.empty()) {
    if (p.speculative != "ngram" && p.speculative != "draft")
      fail("speculative must be \"ngram\" or \"draft\" (or empty: off), got \"" + p.speculative + "\"");
    if (p.num_speculative_tokens < 1 || p.num_speculative_tokens > 16)
      fail("num_speculative_tokens must be in [1, 16], got " + std::to_string(p.num_speculative_tokens));
    if (p.ngram_min < 1 || p.ngram_max < p.ngram_min || p.ngram_max > 16)
      fail("ngram_min and ngram_max must satisfy 1 <= ngram_min <= ngram_max <= 16, got " +
           std::to_string(p.ngram_min) + " and " + std::to_string(p.ngram_max));
    auto unsupported = [&](const char* what) {
      throw Error(ErrorKind::Unsupported, where + "speculative decoding is not supported with " + what);
    };
    if (p.is_beam_search()) unsupported("beam search");
    if (p.return_logits) unsupported("return_logits");
    if (p.prompt_logprobs) unsupported("prompt_logprobs");
  }
  const int32_t width = std::max(p.n, p.beam_width);
  if (width > max_num_seqs)
    fail("needs " + std::to_string(width) + " sequences at once, max_num_seqs is " + std::to_string(max_num_seqs));
}

void validate(const SamplingParams& params) { check_sampling_params(params, INT32_MAX, INT32_MAX, ""); }

}  // namespace pagedrt
