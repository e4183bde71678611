// engine/engine.hpp — the engine thread and the requests' lifetimes.
//
// One step (Engine::step):
//
//   Scheduler::schedule()          which sequences compute how many tokens; blocks
//        │ SchedulerOutput
//   ModelRunner::run()             batch → copy-on-write → forward
//        │ ModelOutput
//   OutputProcessor::process()     tokens, stop rules, beams, events
//        │ OutputSink (this)
//   finish_seq / finish_beams      free blocks, final events, forget the request
//
// Async scheduling (EngineConfig::async_scheduling): a step whose rows are
// all picked or drawn on the device (OutputProcessor::pipelinable) is
// launched with its results deferred, counted done at once (placeholder
// tokens, Sequence::pending) and processed in the next iteration, after the
// next step is scheduled and launched; that step's placeholder tokens take
// their ids on the device (BatchView::feedback). So the host schedules,
// builds and launches step n + 1 while the device runs step n:
//
//   host:    sched n+1 | launch n+1 | wait n, process n | sched n+2 | launch n+2 | wait n+1 ...
//   device:  ........ step n ..........|........ step n+1 ...........|.... step n+2
//
// A sequence that ends in step n has had step n + 1 compute one row for it,
// which nobody reads; an ended request stays in memory until every step
// launched before its end is processed (retired_*).
// Host threads talk to it through the inbox (new requests, aborts; in_mu_)
// and the outbox (events routed to their readers, engine/outbox.hpp). Nothing
// a host thread calls waits for a step to finish.
//
// Locks: in_mu_ guards the inbox and stopping_; the outbox and the stats
// keeper each have their own; join_mu_ lets one of several stop() callers
// join. No code path holds two of them at once.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <unordered_map>
#include <utility>
#include <vector>

#include "engine/block_pool.hpp"
#include "engine/drafter.hpp"
#include "engine/helper_thread.hpp"
#include "engine/kv_cache_manager.hpp"
#include "engine/model_runner.hpp"
#include "engine/outbox.hpp"
#include "engine/output_processor.hpp"
#include "engine/request.hpp"
#include "engine/scheduler.hpp"
#include "engine/stats_keeper.hpp"
#include "pagedrt/event.hpp"
#include "pagedrt/stats.hpp"
#include "pagedrt/token_mask.hpp"

namespace pagedrt {

struct EngineConfig {
  SchedulerConfig scheduler;
  OutputConfig output;
  bool enable_prefix_caching = true;
  double kv_idle_release_s = 10.0;  // an elastic pool's unused chunks go back after this long without work (0: never)
  bool async_scheduling = false;    // launch step n + 1 before reading step n's tokens (where the step allows)
};

// A draft model for speculative decoding (engine/drafter.hpp): its weights,
// loaded on the target's backend, and its KV storage (as many blocks as the
// target's). No model: requests with speculative "draft" are refused at submit.
struct DraftModel {
  std::unique_ptr<LlamaModel> model;
  KvCache kv;
  int64_t max_len = 0;  // positions its RoPE table covers
};

class Engine final : private OutputSink {
 public:
  // `backend`, `model` and `kv` are rank 0's under tensor parallelism (`tp`:
  // ModelRunner's).
  Engine(std::shared_ptr<Backend> backend, std::unique_ptr<LlamaModel> model, KvCache kv,
         const EngineConfig& config, DraftModel draft = {}, TensorParallel tp = {});
  ~Engine() override;  // stops the thread

  // Queues a validated request; `owned`: only poll(id) reads its events.
  // Throws Error(InvalidArgument) for an id in use or after stop().
  void submit(std::unique_ptr<Request> req, bool owned);
  // index < 0: the whole request (Abort); else that sequence only (Stop).
  // True when it was running; false when it had ended (or the engine is
  // stopping); throws Error(InvalidArgument) for an unknown id.
  bool abort(const std::string& id, int32_t index);
  // The reader is gone: ends the request if it is running and drops its
  // events. Same answers as abort().
  bool release(const std::string& id);
  // Events of requests nobody owns.
  std::vector<Event> poll(double timeout_s) { return outbox_.poll_any(timeout_s); }
  // Events of the requests `ids` (owned from now on).
  std::vector<Event> poll(const std::vector<std::string>& ids, double timeout_s) {
    return outbox_.poll(ids, timeout_s);
  }
  Stats stats() const { return stats_.get(); }
  // The source of masks for SamplingParams::masked requests (any thread).
  void set_mask_provider(std::shared_ptr<TokenMaskProvider> provider) {
    std::lock_guard<std::mutex> lk(mask_mu_);
    mask_provider_ = std::move(provider);
  }
  bool has_mask_provider() const { return mask_provider() != nullptr; }
  bool has_draft_model() const { return drafter_ != nullptr; }
  // Host threads may call only worst_case_blocks() on it (it reads nothing that changes).
  const KvCacheManager& kv_manager() const { return kv_manager_; }
  // Ends the thread; every live request gets a final Abort event. Then frees
  // the model, the KV cache and the backend (their memory goes at once).
  void stop();

 private:
  void loop();
  void step();
  void drain_inbox();
  void shutdown();
  // A failed forward ends the step's requests with an error event.
  void fail_step(const SchedulerOutput& step, const std::string& what);
  // Draft-model proposals for the running requests that ask for them; a
  // failed draft forward ends those requests with an error event.
  void propose_drafts();
  // The step's swaps (preemption by swap), timed: Auto's cost estimate.
  void swap(const SchedulerOutput& step);
  // OutputSink
  void push_event(Event ev) override;
  void count_generated(int64_t tokens) override { stats_.count_generated(tokens); }
  void count_speculative(int64_t proposed, int64_t accepted) override { stats_.count_speculative(proposed, accepted); }
  void finish_seq(Request& r, Sequence& s, FinishReason reason, const std::string& error) override;
  // The rows of this step's masked sampling sequences, laid out (zeroed),
  // not filled yet. checked: the step's picks are plain greedy on the device
  // and the provider validates: rows of sequences not in their eager steps
  // (nor at their first token, nor drafting) are left to check_picks()
  // (pm.later) instead.
  struct PendingMasks;
  void plan_masks(const SchedulerOutput& step, PendingMasks& pm, bool checked);
  // Starts filling the planned masks on a helper thread (the forward runs
  // meanwhile; pm.later go to the provider's prepare()); wait() before the
  // outputs use them.
  void start_masks(PendingMasks& pm);
  // Runs `job` (a fill) on the helper thread, the CPU forward lending it
  // `lend` cores meanwhile (TokenMaskProvider::threads); pm.wait() waits.
  void on_helper(PendingMasks& pm, int lend, std::function<void()> job);
  // Masks whose rows follow a launched step's tokens (a pipelined step's,
  // or any step's after one). plan_ahead, before the step's launch: the
  // rows' known tokens are copied, and where the launched step's picks will
  // be. fill_ahead, after it (once the launched step's own fill is done:
  // settle_launch): on the helper thread, which first collects the launched
  // step's results (finish_launched waits for that instead of collecting),
  // then fills, while this engine thread processes the step ahead and
  // schedules and launches the next. `gate`: the step's picks will be queued
  // before the fill is done (complete_launch), gated on it: the fill ends by
  // copying the masks into the backend's gate buffer and opening the gate.
  void plan_ahead(PendingMasks& pm);
  void fill_ahead(PendingMasks& pm, bool gate);
  // Greedy picks on the device for a step whose forward left its logits there
  // (ModelRunner::run with defer_picks), its masked rows masked: by pm's
  // masks, or by `words` where given (gated: Backend::queue_gated_masks's).
  void pick_masked(const SchedulerOutput& step, ModelOutput& out, const PendingMasks& pm,
                   const uint32_t* words = nullptr, bool gated = false);
  // The checked picks of pm.later: the provider validates each row's unmasked
  // pick; refused rows get their masks now (appended to pm's) and the step is
  // picked again. A sequence whose check was refused is masked before its
  // pick (eagerly, while the forward runs) for its next 1, 2, 4 ... up to
  // kMaxEagerMaskSteps steps, doubling with each refusal in a row: a model
  // that follows its grammar is checked nearly every step, one that does
  // not (a random one) is masked nearly every step, as without checks.
  void check_picks(const SchedulerOutput& step, ModelOutput& out, PendingMasks& pm);
  static constexpr int32_t kMaxEagerMaskSteps = 64;
  bool checked_picks_ = true;  // PAGEDRT_CHECKED_PICKS=0: every masked row's mask before its pick (A/B runs)
  // Async scheduling takes steps with structured output too (their masks
  // before every pick: a checked pick refused would change a token already
  // fed to the next step); PAGEDRT_PIPELINED_MASKS=0 leaves them synchronous (A/B runs).
  bool pipeline_masks_ = true;
  // Their picks and draws queued behind a gate the fill opens (Backend::
  // queue_gated_masks), so that the next step is launched without waiting
  // for the masks; PAGEDRT_GATED_MASKS=0 waits for them first (A/B runs).
  bool gate_masks_ = true;
  // A gated step's fill queued on the helper thread behind the launched
  // step's (HelperThread runs them in order), so that the helper collects
  // the launched step's results as soon as its gate is open;
  // PAGEDRT_CHAINED_FILLS=0 settles the launched step's fill first (A/B runs).
  bool chain_fills_ = true;
  uint64_t last_gate_ = 0;  // the last gate id given to a fill
  void finish_beams(Request& r, std::vector<Event> finals) override;
  // Ends every live sequence of a request (abort, error, shutdown).
  void finish_request(Request& r, FinishReason reason, const std::string& error = "");
  void drop_request(Request& r);  // before its last event: free, publish
  void forget(Request& r);        // after its last event: destroys r
  void publish_stats() { stats_.publish(pool_, kv_manager_, scheduler_, drafter_.get()); }

  // Async scheduling: the launched step whose results are not read yet.
  struct Launched;
  std::unique_ptr<Launched> launched_;
  PendingMasks* collecting_ = nullptr;  // its helper collects launched_'s results (fill_ahead)
  // Collects and processes it (nothing when there is none).
  void finish_launched();
  // A launched step with structured output (its masks filling since the step
  // ahead was processed): queues its picks and draws, once the engine has
  // scheduled the next step meanwhile; behind the fill's gate where it has
  // one, else after waiting for the masks. False when that failed (the
  // step's requests end with the error).
  bool complete_launch();
  // After complete_launch: waits for a gated fill and keeps the masks with
  // the launched step (its outputs read them).
  void settle_launch();
  // Waits for a launched step's fill (ahead of its step), counting its masks.
  void wait_fill(PendingMasks& pm);
  // Moves an ended request or sequence out of the way until the steps
  // launched so far are processed (a launched step may still name it).
  void retire(std::unique_ptr<Request> r) { retired_requests_.emplace_back(steps_launched_, std::move(r)); }
  void retire(std::unique_ptr<Sequence> s) { retired_seqs_.emplace_back(steps_launched_, std::move(s)); }
  void release_retired();
  bool async_ = false;  // EngineConfig::async_scheduling
  uint64_t steps_launched_ = 0, steps_processed_ = 0;  // step ids: the last launched, the last processed
  double last_collect_ = 0.0;  // when the last launched step's results came in
  std::deque<std::pair<uint64_t, std::unique_ptr<Request>>> retired_requests_;
  std::deque<std::pair<uint64_t, std::unique_ptr<Sequence>>> retired_seqs_;

  ModelRunner runner_;
  std::unique_ptr<Drafter> drafter_;  // null without a draft model
  BlockPool pool_;
  KvCacheManager kv_manager_;
  Scheduler scheduler_;
  OutputProcessor outputs_;
  StatsKeeper stats_;
  double kv_idle_release_s_ = 10.0;  // EngineConfig's
  // An elastic pool's plain free blocks mapped ahead after each launch (a
  // full step's: max_num_batched_tokens / block_size; BlockPool::map_ahead);
  // PAGEDRT_KV_MAP_AHEAD=0: none, chunks mapped only as a step needs them (A/B runs).
  int32_t map_ahead_blocks_ = 0;
  // PreemptionMode::Auto's estimates (moving averages; 0 until measured):
  // seconds a token of a prefill step took, seconds to copy a block out and back.
  bool auto_preemption_ = false;
  double recompute_s_per_token_ = 0.0, swap_s_per_block_ = 0.0;
  std::unordered_map<std::string, std::unique_ptr<Request>> requests_;  // engine thread only

  // inbox
  std::mutex in_mu_;
  std::condition_variable in_cv_;
  std::deque<std::unique_ptr<Request>> new_requests_;
  std::vector<std::pair<std::string, int32_t>> aborts_;  // (request id, sequence index or -1)
  bool stopping_ = false;
  uint64_t next_arrival_ = 0;

  Outbox outbox_;  // events, routed to their readers; also the registry of request ids

  mutable std::mutex mask_mu_;  // guards mask_provider_ (set by a host thread, read by the engine)
  std::shared_ptr<TokenMaskProvider> mask_provider_;
  std::shared_ptr<TokenMaskProvider> mask_provider() const {
    std::lock_guard<std::mutex> lk(mask_mu_);
    return mask_provider_;
  }
  HelperThread mask_helper_;  // fills a step's masks while its forward runs (start_masks)
  // PAGEDRT_STEP_TRACE=FILE (diagnostics): the host's events of each step
  // (scheduled, launched, masks filled, gate opened, results collected,
  // processed) as "seconds event step" lines, appended to FILE at stop();
  // tools/step_trace.py reads them
  void trace(const char* what, uint64_t step, double t = 0.0);  // t 0: now
  std::string trace_path_;
  std::mutex trace_mu_;
  std::vector<std::tuple<const char*, uint64_t, double>> trace_;  // (event, step, seconds)
  static constexpr size_t kMaxTraceEvents = size_t{1} << 22;        // ~100 MB; later ones counted
  int64_t trace_dropped_ = 0;

  std::mutex join_mu_;  // stop() may run on several threads at once: one joins, the others wait
  std::thread thread_;
};

}  // namespace pagedrt
