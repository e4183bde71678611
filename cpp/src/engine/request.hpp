// engine/request.hpp — a request (a group of sequences) inside the engine.
//
// There are no prefill/decode modes: a sequence is num_computed chasing
// tokens.size(). While num_computed < tokens.size() - 1 its step is a
// (possibly chunked) prefill; when a step computes its last known token it
// yields logits and the sequence is "at its sampling point" until a token is
// appended.
//
//   n > 1:     one sequence prefills the prompt; at its sampling point it is
//              forked n - 1 times (all share the prompt's blocks) and each
//              sequence draws its own first token.
//   beams:     every step, once all live beams are at their sampling point,
//              the group picks the next beams (see engine/beam_search.hpp);
//              a new beam forks its parent's blocks, dropped beams free theirs.
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "engine/kv_cache_manager.hpp"
#include "engine/sampler.hpp"
#include "pagedrt/event.hpp"
#include "pagedrt/sampling_params.hpp"

namespace pagedrt {

struct Sequence {
  int32_t index = 0;                 // sample index (n > 1)
  std::vector<int32_t> tokens;       // prompt then generated tokens
  int64_t num_computed = 0;          // tokens whose K/V are in the cache
  SeqBlocks blocks;                  // block table and prefix-cache uids
  std::vector<int32_t> host_table;   // swapped out: logical block -> host slot (else empty)
  Rng rng;
  TokenHistory history;              // device processing's penalties (Sampler::device_edits), built as it goes
  double cum_logprob = 0.0;          // sum of generated tokens' logprobs (when tracked)
  std::vector<float> beam_logprobs;  // beams: log-softmax row held until the group step
  int64_t logits_reported = 0;       // positions whose logits went out (return_logits, prompt_logprobs)

  // Speculative decoding (params.speculative): the proposals appended to
  // `tokens` for this step (verified, then kept or dropped, by the output
  // processor), the current proposal length (adapts to the acceptance), the
  // steps in a row in which nothing was accepted (at kMaxSpecMisses the
  // sequence pauses: it proposes nothing for its next spec_pause steps) and
  // the pauses since a proposal was last accepted (each twice as long).
  int32_t num_draft = 0;
  std::vector<int32_t> proposal;     // speculative "draft": the draft model's tokens for the next step (engine/drafter.hpp)
  int32_t spec_len = 0;              // 0 until the first proposal: num_speculative_tokens
  int32_t spec_misses = 0;
  int32_t spec_pause = 0;
  int32_t spec_pauses = 0;
  int64_t spec_proposed = 0;         // proposals verified, since submit
  int64_t spec_accepted = 0;         // of those, kept
  // Structured output's checked picks (pagedrt/token_mask.hpp): steps left in
  // which this sequence's mask comes before its pick (after a refused pick),
  // and its checks refused in a row (each doubles the eager steps that follow).
  int32_t mask_eager = 0;
  int32_t mask_refusals = 0;

  // What the next event carries.
  std::vector<int32_t> new_tokens;
  std::vector<TokenLogprob> new_logprobs;
  std::vector<TokenLogprob> new_prompt_logprobs;  // prompt_logprobs: since the last event
  std::vector<float> new_logits;     // (rows, vocab), only with params.return_logits
  int32_t new_logit_rows = 0;

  // Async scheduling (engine/engine.hpp): the last `pending` entries of
  // `tokens` are placeholders (-1) for ids that launched steps picked or drew
  // on the device and the host has not read yet (at most 2: the step being
  // processed and the one launched after it); `pending_source` is where the
  // newest comes from in its step (TokenFeedback::source); `ends_pending`:
  // that token ends the sequence by length (max_tokens, max_model_len), so
  // it is not scheduled again. `done`: the sequence ended; a launched step's
  // record of it is skipped.
  int32_t pending = 0;
  int32_t pending_source = 0;
  bool ends_pending = false;
  bool done = false;

  int64_t num_tokens() const { return static_cast<int64_t>(tokens.size()); }
  int64_t num_known() const { return num_tokens() - pending; }  // tokens whose ids the host has
  bool at_sampling_point() const { return num_computed == num_tokens(); }
};

struct BeamHypothesis {
  std::vector<int32_t> tokens;  // generated tokens
  double cum_logprob = 0.0;
  double score = -1e9;
};

struct Request {
  std::string id;
  SamplingParams params;
  int64_t prompt_len = 0;
  uint64_t arrival = 0;              // submission order
  int32_t num_preemptions = 0;
  bool swapped = false;              // preempted by swap: its K/V in host slots, waiting to come back
  std::vector<std::unique_ptr<Sequence>> seqs;  // live sequences
  bool expanded = false;             // n > 1: the prompt's sequence has been forked
  uint64_t sample_base = 0;          // device draws' streams: sample_key(sample_base, index)
  bool done = false;                 // ended (async scheduling: a launched step may still name it)

  // beam search state (transformers' semantics)
  std::vector<BeamHypothesis> beam_done;  // best finished, at most beam_width, best first
  bool beam_improvable = true;            // the early-stop heuristic is not yet met
  int64_t beam_len = 0;                   // tokens generated by every live beam

  int64_t num_generated(const Sequence& s) const { return s.num_tokens() - prompt_len; }
};

// Speculative decoding: how many proposals sequence `s` of `r` may take in
// its next step, 0 for none. It must be at its decode point (one token to
// compute, no proposals yet), forked if it is to be (n > 1) and not pausing;
// proposals never reach past max_tokens or max_model_len (0: no limit). The
// first call sets s.spec_len.
inline int64_t proposal_room(const Request& r, Sequence& s, int64_t max_model_len) {
  if (r.params.speculative.empty() || s.spec_pause > 0 || s.num_draft > 0) return 0;
  // n > 1 before its fork: the prompt's sequence is forked where its first
  // token is sampled (OutputProcessor::expand), which a verify step would
  // skip. A running prompt reaches its decode point unforked when its last
  // prefill chunk is a single token, or when it comes back from swap there.
  if (r.params.n > 1 && !r.expanded) return 0;
  if (s.num_tokens() - s.num_computed != 1) return 0;
  if (s.spec_len == 0) s.spec_len = r.params.num_speculative_tokens;
  int64_t k = std::min<int64_t>(s.spec_len, r.params.max_tokens - r.num_generated(s) - 1);
  if (max_model_len > 0) k = std::min<int64_t>(k, max_model_len - s.num_tokens() - 1);
  return std::max<int64_t>(k, 0);
}

// After a step that verified `proposed` proposals of `s` and kept `accepted`:
// the next proposal length follows the acceptance, one more after a full
// acceptance (up to max_len), half after none. kMaxSpecMisses steps in a row
// with nothing kept and the sequence pauses (proposes nothing) for its next
// kSpecPauseSteps decode steps; after a pause one more miss pauses it again,
// twice as long (up to 64x). A kept proposal ends the doubling. (A permanent
// stop lost every later copy: SmolLM2's edit_code answers open with new text.)
constexpr int32_t kMaxSpecMisses = 8;
constexpr int32_t kSpecPauseSteps = 16;
inline void adapt_proposals(Sequence& s, int32_t proposed, int32_t accepted, int32_t max_len) {
  if (accepted > 0) {
    if (accepted == proposed) s.spec_len = std::min(s.spec_len + 1, max_len);
    s.spec_misses = 0;
    s.spec_pauses = 0;
    return;
  }
  s.spec_len = std::max(1, s.spec_len / 2);
  if (++s.spec_misses < kMaxSpecMisses) return;
  s.spec_pause = kSpecPauseSteps << std::min(s.spec_pauses, 6);
  ++s.spec_pauses;
  s.spec_misses = kMaxSpecMisses - 1;
}

// `s` takes a decode step without proposals: a pause has one step less to run.
inline void count_pause(Sequence& s) {
  if (s.spec_pause > 0) --s.spec_pause;
}

}  // namespace pagedrt
