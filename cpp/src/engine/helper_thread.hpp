// engine/helper_thread.hpp — one thread the engine thread hands a job to and
// waits for later in the same step (structured output's masks, filled while
// the forward runs).
//
// The thread is started at the first job and kept: a thread started per step
// (std::async) cost the engine thread 8-10 us before each forward on a 2-core
// VM, against ~3 us to wake a waiting one.
#pragma once

#include <condition_variable>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>

namespace pagedrt {

class HelperThread {
 public:
  HelperThread() = default;
  ~HelperThread();  // waits for a job still running, then joins
  HelperThread(const HelperThread&) = delete;
  HelperThread& operator=(const HelperThread&) = delete;

  // Runs job on the helper thread and returns at once. One job at a time:
  // the one before must have been waited for (std::logic_error otherwise).
  // Throws std::system_error where the thread cannot be started.
  void start(std::function<void()> job);
  // Returns when the job started last has returned (at once when none is
  // pending) and rethrows what it threw.
  void wait();
  bool pending() const { return pending_; }  // the caller's thread only

 private:
  void work();

  std::mutex mu_;
  std::condition_variable wake_, done_;
  std::function<void()> job_;  // set by start(), taken by the thread
  bool queued_ = false;        // job_ waits for the thread
  bool finished_ = false;      // the job has returned (or thrown: error_)
  bool stop_ = false;
  std::exception_ptr error_;
  bool pending_ = false;       // started and not yet waited for (the caller's)
  std::thread thread_;
};

}  // namespace pagedrt
