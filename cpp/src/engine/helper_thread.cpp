#include "engine/helper_thread.hpp"

#include <stdexcept>
#include <utility>

namespace pagedrt {

HelperThread::~HelperThread() {
  if (!thread_.joinable()) return;
  try {
    wait();
  } catch (...) {  // a job nobody waited for: its error goes with it
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  wake_.notify_one();
  thread_.join();
}

void HelperThread::start(std::function<void()> job) {
  if (pending_) throw std::logic_error("HelperThread::start: the job before was not waited for");
  if (!thread_.joinable()) thread_ = std::thread([this] { work(); });
  {
    std::lock_guard<std::mutex> lock(mu_);
    job_ = std::move(job);
    queued_ = true;
    finished_ = false;
    error_ = nullptr;
  }
  pending_ = true;
  wake_.notify_one();
}

void HelperThread::wait() {
  if (!pending_) return;
  std::exception_ptr error;
  {
    std::unique_lock<std::mutex> lock(mu_);
    done_.wait(lock, [&] { return finished_; });
    error = std::exchange(error_, nullptr);
  }
  pending_ = false;
  if (error) std::rethrow_exception(error);
}

void HelperThread::work() {
  for (;;) {
    std::function<void()> job;
    {
      std::unique_lock<std::mutex> lock(mu_);
      wake_.wait(lock, [&] { return stop_ || queued_; });
      if (stop_) return;
      job = std::move(job_);
      job_ = nullptr;
      queued_ = false;
    }
    std::exception_ptr error;
    try {
      job();
    } catch (...) {
      error = std::current_exception();
    }
    job = nullptr;  // what it holds goes before the caller hears it returned
    {
      std::lock_guard<std::mutex> lock(mu_);
      // Moved, not copied: this thread keeps no reference to the exception,
      // so the last one (and the exception's destruction) is the waiter's,
      // after the lock (TSan saw this thread's delete race the waiter's read).
      error_ = std::move(error);
      finished_ = true;
    }
    done_.notify_one();
  }
}

}  // namespace pagedrt
