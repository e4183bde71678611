#include "engine/rank_threads.hpp"

namespace pagedrt {

RankThreads::RankThreads(int size) {
  for (int r = 1; r < size; ++r) threads_.emplace_back([this, r] { work(r); });
}

RankThreads::~RankThreads() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  wake_.notify_all();
  for (std::thread& t : threads_) t.join();
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
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      wake_.wait(lock, [&] { return stop_ || round_ != seen; });
      if (stop_) return;
      seen = round_;
    }
    run_rank(rank);
    std::lock_guard<std::mutex> lock(mu_);
    if (--pending_ == 0) done_.notify_one();
  }
}

void RankThreads::run(const std::function<void(int)>& job, const std::function<void()>& on_error) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    error_ = nullptr;
    job_ = &job;
    on_error_ = &on_error;
    pending_ = static_cast<int>(threads_.size());
    ++round_;
  }
  wake_.notify_all();
  run_rank(0);
  std::unique_lock<std::mutex> lock(mu_);
  done_.wait(lock, [&] { return pending_ == 0; });
  if (error_) std::rethrow_exception(error_);
}

}  // namespace pagedrt
