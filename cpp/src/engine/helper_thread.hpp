// engine/helper_thread.hpp — one thread the engine thread hands jobs to and
// waits for later (structured output's masks, filled while the forward runs).
//
// The thread is started at the first job and kept: a thread started per step
// (std::async) cost the engine thread 8-10 us before each forward on a 2-core
// VM, against ~3 us to wake a waiting one.
//
// Jobs run in the order started, one at a time. A job may be started while
// the one before still runs: it is queued and the thread takes it as soon as
// that one returns, without a round trip through the caller (async
// scheduling's structured steps: the next step's fill, which begins by
// collecting the step ahead's results, follows the current fill at once).
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <map>
#include <mutex>
#include <set>
#include <thread>

namespace pagedrt {

class HelperThread {
 public:
  HelperThread() = default;
  ~HelperThread();  // waits for every job started, then joins (errors nobody waited for are dropped)
  HelperThread(const HelperThread&) = delete;
  HelperThread& operator=(const HelperThread&) = delete;

  // Queues job on the helper thread and returns at once: its ticket, for
  // wait(). Throws std::system_error where the thread cannot be started.
  uint64_t start(std::function<void()> job);
  // Returns when job `ticket` has returned (at once when it was waited for
  // already) and rethrows what it threw, once. Jobs before it need not have
  // been waited for: their errors stay for their own wait().
  void wait(uint64_t ticket);
  // Waits for every job started and rethrows the first error among them.
  void wait();
  bool pending() const { return waited_ < started_; }  // the caller's thread only: a job not yet waited for

 private:
  void work();

  std::mutex mu_;
  std::condition_variable wake_, done_;
  std::deque<std::function<void()>> jobs_;      // queued, not yet taken by the thread
  uint64_t finished_ = 0;                       // tickets up to this one have returned
  std::map<uint64_t, std::exception_ptr> errors_;  // by ticket, until waited for
  bool stop_ = false;
  uint64_t started_ = 0;  // the caller's: the last ticket given
  uint64_t waited_ = 0;   // the caller's: every ticket up to this one waited for
  std::set<uint64_t> waited_past_;  // the caller's: tickets past waited_ + 1 waited for already
  std::thread thread_;
};

}  // namespace pagedrt
