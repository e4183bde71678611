#include "engine/helper_thread.hpp"

#include <utility>

namespace pagedrt {

HelperThread::~HelperThread() {
  if (!thread_.joinable()) return;
  {
    std::unique_lock<std::mutex> lock(mu_);
    done_.wait(lock, [&] { return finished_ >= started_; });
    errors_.clear();  // jobs nobody waited for: their errors go with them
    stop_ = true;
  }
  wake_.notify_one();
  thread_.join();
}

uint64_t HelperThread::start(std::function<void()> job) {
  if (!thread_.joinable()) thread_ = std::thread([this] { work(); });
  {
    std::lock_guard<std::mutex> lock(mu_);
    jobs_.push_back(std::move(job));
  }
  wake_.notify_one();
  return ++started_;
}

void HelperThread::wait(uint64_t ticket) {
  if (ticket <= waited_ || ticket > started_ || waited_past_.count(ticket) > 0) return;  // waited already, or never given
  std::exception_ptr error;
  {
    std::unique_lock<std::mutex> lock(mu_);
    done_.wait(lock, [&] { return finished_ >= ticket; });
    const auto it = errors_.find(ticket);
    if (it != errors_.end()) {
      error = std::move(it->second);
      errors_.erase(it);
    }
  }
  waited_past_.insert(ticket);
  while (!waited_past_.empty() && *waited_past_.begin() == waited_ + 1) {
    waited_past_.erase(waited_past_.begin());
    ++waited_;
  }
  if (error) std::rethrow_exception(error);
}

void HelperThread::wait() {
  std::exception_ptr first;
  {
    std::unique_lock<std::mutex> lock(mu_);
    done_.wait(lock, [&] { return finished_ >= started_; });
    if (!errors_.empty()) first = std::move(errors_.begin()->second);
    errors_.clear();
  }
  waited_ = started_;
  waited_past_.clear();
  if (first) std::rethrow_exception(first);
}

void HelperThread::work() {
  for (;;) {
    std::function<void()> job;
    {
      std::unique_lock<std::mutex> lock(mu_);
      wake_.wait(lock, [&] { return stop_ || !jobs_.empty(); });
      if (stop_ && jobs_.empty()) return;
      job = std::move(jobs_.front());
      jobs_.pop_front();
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
      const uint64_t ticket = ++finished_;
      // Moved, not copied: this thread keeps no reference to the exception,
      // so the last one (and the exception's destruction) is the waiter's,
      // after the lock (TSan saw this thread's delete race the waiter's read).
      if (error) errors_.emplace(ticket, std::move(error));
    }
    done_.notify_all();
  }
}

}  // namespace pagedrt
