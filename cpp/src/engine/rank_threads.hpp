// engine/rank_threads.hpp — a team of threads that run one job at once: a
// thread for each rank of a tensor-parallel model (model/tp_plan.hpp) but the
// first, which runs on the caller's own thread; or the structured-output mask
// pool (structured/llguidance_masks.cpp), each thread taking rows.
//
// Every rank's forward must run at once: each waits for the others inside
// the collectives (backend/collectives.hpp).
#pragma once

#include <condition_variable>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace pagedrt {

class RankThreads {
 public:
  explicit RankThreads(int size);  // starts size - 1 threads
  ~RankThreads();                  // joins them
  RankThreads(const RankThreads&) = delete;
  RankThreads& operator=(const RankThreads&) = delete;

  int size() const { return static_cast<int>(threads_.size()) + 1; }
  // Runs job(r) for every rank r at once (rank 0 on the calling thread) and
  // returns when all have returned. A rank that throws calls on_error() at
  // once (so that the others stop waiting for it in a collective); the first
  // exception thrown (the others' follow from it) is rethrown.
  void run(const std::function<void(int)>& job, const std::function<void()>& on_error);

 private:
  void work(int rank);
  void run_rank(int rank);

  std::mutex mu_;
  std::condition_variable wake_, done_;
  const std::function<void(int)>* job_ = nullptr;
  const std::function<void()>* on_error_ = nullptr;
  unsigned long long round_ = 0;  // bumped for every run()
  int pending_ = 0;               // worker ranks still running this round
  bool stop_ = false;
  std::exception_ptr error_;
  std::vector<std::thread> threads_;
};

}  // namespace pagedrt
