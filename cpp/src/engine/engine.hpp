// engine/engine.hpp — the engine thread: schedule → batch → forward → sample
// → update → emit, over and over.
//
// Host threads talk to it through the inbox (new requests, aborts; one
// mutex) and the outbox (events routed to their readers: engine/outbox.hpp).
// Nothing a host thread calls waits for a step to finish.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <unordered_map>
#include <vector>

#include "engine/batch.hpp"
#include "engine/beam_search.hpp"
#include "engine/block_pool.hpp"
#include "engine/kv_cache.hpp"
#include "engine/kv_cache_manager.hpp"
#include "engine/outbox.hpp"
#include "engine/sampler.hpp"
#include "engine/scheduler.hpp"
#include "model/llama.hpp"
#include "pagedrt/event.hpp"
#include "pagedrt/runtime.hpp"

namespace pagedrt {

class Engine {
 public:
  Engine(std::unique_ptr<Backend> backend, std::unique_ptr<LlamaModel> model, KvCache kv,
         const SchedulerConfig& sched, bool enable_prefix_caching, int sampler_threads);
  ~Engine();  // stops the thread

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
  Stats stats() const;
  // Ends the thread; every live request gets a final Abort event. Then frees
  // the model, the KV cache and the backend (their memory goes at once).
  void stop();

 private:
  void loop();
  void step();
  void drain_inbox();
  void publish_stats();
  // Per scheduled sequence after the forward: progress, cache, logits rows.
  // Returns true when the sequence reached its sampling point.
  bool advance(const ScheduledSeq& s, const LogitsSlice& slice, const float* logits);
  // One sampling decision: made by pick_all (in parallel), applied by apply (in order).
  struct Pick {
    Request* req = nullptr;
    Sequence* seq = nullptr;
    const float* row = nullptr;  // (vocab) raw logits
    int32_t token = 0;
    TokenLogprob logprob;
  };
  // n > 1: forks the prompt's sequence at its first sampling point; the
  // sequences that sample from this row.
  std::vector<Sequence*> expand(Request& r, Sequence& s);
  void pick_all(std::vector<Pick>& picks);
  // Every scheduled sequence samples plain greedy (no processing, logprobs,
  // returned logits, beams or n > 1): the device may pick.
  bool greedy_only(const SchedulerOutput& out) const;
  void apply(Pick& pick);
  void beam_group_step(Request& r);
  // Ends one sequence (its final event); ends the request with its last one.
  void finish_seq(Request& r, Sequence& s, FinishReason reason, const std::string& error = "");
  // Ends every live sequence of a request (abort, error).
  void finish_request(Request& r, FinishReason reason, const std::string& error = "");
  void emit(Request& r, Sequence& s, bool finished, bool request_finished, FinishReason reason,
            const std::string& error);
  // Queues an event; pollers are woken once per engine iteration by
  // wake_pollers() (a wake-up per event cost ~1 ms of host time a step at
  // batch 256, with the GPU idle).
  void push_event(Event ev);
  void wake_pollers();
  void drop_request(Request& r);  // after its last event: free, forget

  std::unique_ptr<Backend> backend_;
  std::unique_ptr<LlamaModel> model_;
  KvCache kv_;
  BlockPool pool_;
  KvCacheManager kv_manager_;
  Scheduler scheduler_;
  SchedulerConfig sched_config_;
  Sampler sampler_;
  Batch batch_;
  std::vector<float> logits_;  // (num_logits, vocab) of the current step
  std::vector<int32_t> argmax_;  // (num_logits) greedy tokens picked on the device
  std::vector<int32_t> filled_;  // (num_blocks) scratch for publish_stats
  int sampler_threads_ = 1;      // threads for pick_all
  std::unordered_map<std::string, std::unique_ptr<Request>> requests_;  // engine thread only

  // inbox
  mutable std::mutex in_mu_;
  std::condition_variable in_cv_;
  std::deque<std::unique_ptr<Request>> new_requests_;
  std::vector<std::pair<std::string, int32_t>> aborts_;  // (request id, sequence index or -1)
  bool stopping_ = false;

  Outbox outbox_;  // events, routed to their readers; also the registry of request ids

  mutable std::mutex stats_mu_;
  Stats stats_;
  std::deque<std::pair<double, int64_t>> rate_window_;  // (seconds, generated tokens) per step
  uint64_t next_arrival_ = 0;

  std::mutex join_mu_;  // stop() may run on several threads at once: one joins, the others wait
  std::thread thread_;
};

}  // namespace pagedrt
