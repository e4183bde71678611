#include "engine/rank_threads.hpp"

#include <chrono>

namespace pagedrt {

namespace {
inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#else
  std::this_thread::yield();
#endif
}
}  // namespace

RankThreads::RankThreads(int size, double spin_seconds) : spin_s_(spin_seconds > 0.0 ? spin_seconds : 0.0) {
  for (int r = 1; r < size; ++r) threads_.emplace_back([this, r] { work(r); });
}

RankThreads::~RankThreads() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_.store(true, std::memory_order_release);
  }
  wake_.notify_all();
  for (std::thread& t : threads_) t.join();
}

template <typename Ready>
bool RankThreads::spin_until(const Ready& ready) const {
  if (ready()) return true;
  if (spin_s_ <= 0.0) return false;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(spin_s_);
  for (;;) {
    for (int i = 0; i < 64; ++i) {
      cpu_relax();
      if (ready()) return true;
    }
    if (std::chrono::steady_clock::now() >= deadline) return ready();
  }
}

void RankThreads::run_rank(int rank) {
  try {
    (*job_)(rank);
  } catch (...) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!error_) error_ = std::current_exception();
    }
    (*on_error_)();
  }
}

void RankThreads::work(int rank) {
  unsigned long long seen = 0;
  const auto next = [&] {
    return stop_.load(std::memory_order_acquire) || round_.load(std::memory_order_acquire) != seen;
  };
  for (;;) {
    if (!spin_until(next)) {
      std::unique_lock<std::mutex> lock(mu_);
      wake_.wait(lock, next);
    }
    if (stop_.load(std::memory_order_acquire)) return;
    seen = round_.load(std::memory_order_acquire);  // job_ and on_error_ were written before it moved
    run_rank(rank);
    if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
      // Under the lock: run() checks pending_ under it before it sleeps, so
      // the notification cannot fall between its check and its wait.
      std::lock_guard<std::mutex> lock(mu_);
      done_.notify_one();
    }
  }
}

void RankThreads::run(const std::function<void(int)>& job, const std::function<void()>& on_error) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    error_ = nullptr;
    job_ = &job;
    on_error_ = &on_error;
    pending_.store(static_cast<int>(threads_.size()), std::memory_order_relaxed);
    round_.fetch_add(1, std::memory_order_release);
  }
  wake_.notify_all();  // the sleeping ones (spinning ones see round_ move)
  run_rank(0);
  const auto all_done = [&] { return pending_.load(std::memory_order_acquire) == 0; };
  if (!spin_until(all_done)) {
    std::unique_lock<std::mutex> lock(mu_);
    done_.wait(lock, all_done);
  }
  std::lock_guard<std::mutex> lock(mu_);
  if (error_) std::rethrow_exception(error_);
}

}  // namespace pagedrt
