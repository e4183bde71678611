// engine/output_processor.hpp — a step's logits become tokens, stop decisions
// and events.
//
// For every scheduled sequence, in order:
//   advance     num_computed moves on; newly full blocks join the prefix cache;
//               return_logits rows are kept for the next event
//   expand      n > 1: at its first sampling point the prompt's sequence is
//               forked n - 1 times (all share its blocks)
//   pick        sampling (engine/sampler.hpp), every row on its own random
//               stream, in parallel over the rows; a masked request's row
//               first loses every token its mask (StepMasks) does not allow
//   apply       in order: append the token, logprobs, stop rules (eos,
//               stop_token_ids, max_tokens, max_model_len), an event
//   beams       once every live beam of a request is at its sampling point,
//               the group picks the next beams (engine/beam_search.hpp)
//
// Ending a sequence or a request (freeing its blocks, its final event) is the
// engine's business: the processor hands its results to an OutputSink.
#pragma once

#include <climits>
#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include "engine/kv_cache_manager.hpp"
#include "engine/model_runner.hpp"
#include "engine/request.hpp"
#include "engine/scheduler.hpp"
#include "pagedrt/event.hpp"

namespace pagedrt {

// Where the processor's results go: the engine, which owns request lifetimes,
// the outbox and the stats.
class OutputSink {
 public:
  virtual ~OutputSink() = default;
  virtual void push_event(Event ev) = 0;
  virtual void count_generated(int64_t tokens) = 0;
  virtual void count_speculative(int64_t proposed, int64_t accepted) = 0;
  // Ends sequence `s` with its final event (`error`: with finish reason Error);
  // the request ends with its last sequence.
  virtual void finish_seq(Request& r, Sequence& s, FinishReason reason, const std::string& error) = 0;
  // A beam search is over: its live beams are freed and `finals` (the best
  // beams, request_finished on the last; empty: none completed) end the request.
  virtual void finish_beams(Request& r, std::vector<Event> finals) = 0;
};

struct OutputConfig {
  std::vector<int32_t> eos_token_ids;  // end a sequence unless ignore_eos
  int64_t max_model_len = 0;           // prompt + generated tokens at most
  int sampler_threads = 1;             // threads for the picks of one step
};

// The allowed tokens of a step's masked sampling rows (pagedrt/token_mask.hpp):
// (vocab + 31) / 32 words per row, bit t allowing token t. `error`: what the
// mask provider threw (its rows then allow nothing and end with it). The
// rows are `words` (count rows, one after another): a row's index is its
// offset there over words_per_row.
struct StepMasks {
  std::unordered_map<const Sequence*, const uint32_t*> by_seq;
  std::string error;                                           // the provider failed: every row allows nothing
  std::unordered_map<const Sequence*, std::string> row_errors;  // MaskRow::error of rows that set one
  const uint32_t* words = nullptr;
  int32_t count = 0;
  int64_t words_per_row = 0;

  // Why `seq`'s mask allows no token, as far as the provider said ("" if not).
  const std::string& error_of(const Sequence* seq) const {
    const auto e = row_errors.find(seq);
    return e != row_errors.end() ? e->second : error;
  }
  // The index of `seq`'s row in `words`, or -1 when it has none.
  int32_t index_of(const Sequence* seq) const {
    const auto m = by_seq.find(seq);
    return m == by_seq.end() ? -1 : static_cast<int32_t>((m->second - words) / words_per_row);
  }
};

class OutputProcessor {
 public:
  OutputProcessor(const OutputConfig& config, KvCacheManager& kv, OutputSink& sink);

  // Every scheduled sequence samples plain greedy (no processing, logprobs,
  // returned logits, beams or n > 1): the device may pick the tokens (a
  // structured-output row's with its mask; speculative rows' each).
  bool greedy_only(const SchedulerOutput& step) const;
  // Every scheduled sequence samples plain greedy as above or is drawn on the
  // device (Sampler::drawn_on_device): no logits row need leave the device.
  bool device_only(const SchedulerOutput& step) const;
  // Whether a sequence of the step samples plain greedy (as greedy_only
  // means it: its pick is the device argmax's, not a device draw).
  static bool any_greedy(const SchedulerOutput& step);
  // The step's device draws, for a backend that samples (Backend::has_sample):
  // every sampling row of a request drawn on the device, n of them for a
  // request about to fork its n samples, in the order process() takes their
  // tokens (ModelOutput::sampled), with the edits that process their rows
  // and the masks of structured-output rows (known by then: `masks`).
  DeviceDraws device_draws(const SchedulerOutput& step, const ModelOutput& out, const StepMasks& masks);
  // Applies one step's results (see above). Sequences ended since the step
  // was launched (Sequence::done) are skipped.
  void process(const SchedulerOutput& step, const ModelOutput& out, const StepMasks& masks);

  // Async scheduling (engine/engine.hpp). Whether a step may be launched
  // before the step ahead of it is processed and processed after the next
  // one is launched: every row picked or drawn on the device from what the
  // host knows at launch (no penalties, logit bias or min_tokens bans,
  // beams, n > 1 forks, speculation, returned logits or prompt logprobs),
  // and, unless `masked_ok`, no structured output (the engine then picks its
  // rows once their masks are filled, after the step ahead is processed).
  static bool pipelinable(const SchedulerOutput& step, bool masked_ok = false);
  // A pipelinable step just launched: its sequences advance (num_computed;
  // full blocks whose ids are known join the prefix cache) and each sampling
  // one gets a placeholder token (Sequence::pending), so that the next
  // schedule() sees the step done. Returns where each scheduled sequence's
  // token is in the step's results (TokenFeedback::source; kNoSource: none).
  std::vector<int32_t> launched(const SchedulerOutput& step, const ModelOutput& out);
  // Its results, once collected: each placeholder takes its token, then the
  // stop rules and events as process() (skipping sequences ended meanwhile);
  // a row whose mask (`masks`) allows no token ends its sequence with an error.
  void process_launched(const SchedulerOutput& step, const ModelOutput& out, const std::vector<int32_t>& sources,
                        const StepMasks& masks);
  static constexpr int32_t kNoSource = INT32_MIN;

  // An event carrying what `s` produced since its last event.
  static Event make_event(Request& r, Sequence& s, bool finished, bool request_finished, FinishReason reason,
                          const std::string& error);

 private:
  // One sampling decision: made by pick_all (in parallel), applied by apply (in order).
  struct Pick {
    Request* req = nullptr;
    Sequence* seq = nullptr;
    const float* row = nullptr;  // (vocab) raw logits; null: picked on the device
    const uint32_t* mask = nullptr;  // masked requests: the allowed tokens
    int32_t token = 0;           // -1: the mask allowed no token
    TokenLogprob logprob;
  };
  // The step's tokens of `sc` count as computed (num_computed, the pool's
  // fill) and its full blocks whose ids are known join the prefix cache.
  void count_computed(const ScheduledSeq& sc);
  void cache_known(Sequence& s);
  // Returns true when the sequence reached its sampling point.
  bool advance(const ScheduledSeq& s, const LogitsSlice& slice, const ModelOutput& out);
  std::vector<Sequence*> expand(Request& r, Sequence& s);
  void pick_all(std::vector<Pick>& picks, int64_t vocab);
  // Appends the picked token and ends the sequence if it must; true when it
  // ended (then `pick.seq`, and with the last sequence the request, are gone).
  bool apply(Pick& pick);
  // A sequence that verified its proposals this step (speculative decoding):
  // keeps the accepted ones and one more token, rolls the rest back.
  void verify(const ScheduledSeq& s, const LogitsSlice& slice, const ModelOutput& out);
  void beam_group_step(Request& r);

  OutputConfig config_;
  const StepMasks* masks_ = nullptr;  // this step's
  KvCacheManager& kv_;
  OutputSink& sink_;
};

}  // namespace pagedrt
