// backend/collectives.hpp — what the ranks of a tensor-parallel model
// exchange (model/tp_plan.hpp): an all-reduce after o_proj and down and of
// the embedding's rows, and a gather of the logits' columns.
//
// Each rank's forward runs on a thread of its own (engine/rank_threads.hpp)
// and calls the same collectives in the same order, with tensors on its own
// backend. HostGroup does them in memory for ranks on the CPU backend (the
// tests' reference for the sharding, and ranks on the sockets of one host).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "backend/tensor.hpp"

namespace pagedrt {

class Collectives {
 public:
  virtual ~Collectives() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // x's first `numel` elements (F32 or BF16) := their sum over the ranks, on
  // every rank the same bits.
  virtual void all_reduce_sum(Tensor& x, int64_t numel) = 0;
  // Rank 0's out (rows, out_cols) fp32 := the ranks' part (rows, cols) fp32
  // side by side, rank r's at columns [r * cols, min(out_cols, (r + 1) * cols));
  // the other ranks' out is not touched. `scratch`: gather_scratch(rows,
  // cols) fp32 elements on every rank's device (an empty tensor for 0).
  virtual void gather_columns(const Tensor& part, int64_t rows, int64_t cols, Tensor& out, int64_t out_cols,
                              Tensor& scratch) = 0;
  virtual int64_t gather_scratch(int64_t rows, int64_t cols) const { return 0; }
  // A rank that failed mid-step: every rank waiting in a collective, and every
  // later collective, throws Error(Runtime) instead of waiting for it, until
  // recover() (called when no rank is inside a step).
  virtual void abort() = 0;
  virtual void recover() = 0;
  // An error the group met on its own, outside any call (NCCL's asynchronous
  // errors), or "" (none; the host group never has one).
  virtual std::string async_error() const { return {}; }
};

// The collectives of `size` ranks whose tensors are host memory (CPU
// backends), done by the ranks' own threads. Sums are taken in rank order in
// fp32 and rounded once to the tensor's dtype, so every rank gets the same
// bits whatever the timing.
class HostGroup {
 public:
  explicit HostGroup(int size);
  // The collectives of rank r; the group must outlive them.
  std::unique_ptr<Collectives> rank(int r);

 private:
  friend class HostCollectives;
  // Waits until every rank has arrived (a barrier); throws once aborted. A
  // rank spins for a while (a layer's other ranks are usually microseconds
  // behind: two barriers a collective, two collectives a layer), then sleeps.
  void arrive_and_wait();
  void abort();
  void recover();

  const int size_;
  const bool spin_;  // the ranks have a core each
  std::mutex mu_;  // the sleepers' (with cv_)
  std::condition_variable cv_;
  std::atomic<int> arrived_{0};
  std::atomic<uint64_t> generation_{0};  // barriers passed
  std::atomic<bool> aborted_{false};
  std::vector<const void*> shared_;  // per rank: the tensor it offers in the current collective
};

}  // namespace pagedrt
