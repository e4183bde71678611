// engine/rank_threads.hpp — a team of threads that run one job at once: a
// thread for each rank of a tensor-parallel model (model/tp_plan.hpp) but the
// first, which runs on the caller's own thread; or the structured-output mask
// pool (structured/llguidance_masks.cpp), each thread taking rows.
//
// Every rank's forward must run at once: each waits for the others inside
// the collectives (backend/collectives.hpp).
//
// Waiting: with spin_seconds > 0 a thread that finished a job watches for the
// next for that long before it sleeps on the condition variable, and run()
// watches for the last rank as long before it sleeps: a job that comes within
// that time starts without a futex wake-up for each thread (which came one
// after another through the mutex: the last of 12 began ~40 us after run() on
// an H100's Xeon host). For a pool whose jobs come every step and whose cores
// nothing else needs meanwhile (the GPU's mask pool); 0 (the default) never
// spins.
#pragma once

#include <atomic>
#include <condition_variable>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace pagedrt {

class RankThreads {
 public:
  explicit RankThreads(int size, double spin_seconds = 0.0);  // starts size - 1 threads
  ~RankThreads();                                             // joins them
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
  // Whether ready() held within spin_s_ (checked at once when spin_s_ is 0).
  template <typename Ready>
  bool spin_until(const Ready& ready) const;

  const double spin_s_;
  std::mutex mu_;
  std::condition_variable wake_, done_;
  const std::function<void(int)>* job_ = nullptr;  // written under mu_ before round_ moves
  const std::function<void()>* on_error_ = nullptr;
  std::atomic<unsigned long long> round_{0};  // bumped for every run()
  std::atomic<int> pending_{0};               // worker ranks still running this round
  std::atomic<bool> stop_{false};
  std::exception_ptr error_;  // under mu_
  std::vector<std::thread> threads_;
};

}  // namespace pagedrt
