#include "backend/collectives.hpp"

#include <algorithm>
#include <chrono>
#include <cstring>

#include "backend/team.hpp"
#include "pagedrt/error.hpp"

namespace pagedrt {

class HostCollectives final : public Collectives {
 public:
  HostCollectives(HostGroup& group, int rank) : group_(group), rank_(rank) {}
  int rank() const override { return rank_; }
  int size() const override { return group_.size_; }

  void all_reduce_sum(Tensor& x, int64_t numel) override {
    if (x.dtype != ScalarType::F32 && x.dtype != ScalarType::BF16)
      throw Error(ErrorKind::Runtime, std::string("all_reduce_sum: dtype ") + scalar_name(x.dtype) +
                                          " (F32 or BF16 only)");
    offer(x.data);
    sum_.resize(static_cast<size_t>(numel));
    // every rank reads every rank's values (none writes until all have read)
    if (x.dtype == ScalarType::F32)
      reduce<float>(numel);
    else
      reduce<uint16_t>(numel);
    group_.arrive_and_wait();
    if (x.dtype == ScalarType::F32)
      std::memcpy(x.data, sum_.data(), static_cast<size_t>(numel) * 4);
    else
      for (int64_t i = 0; i < numel; ++i) store_f32(x.as<uint16_t>() + i, sum_[static_cast<size_t>(i)]);
  }

  void gather_columns(const Tensor& part, int64_t rows, int64_t cols, Tensor& out, int64_t out_cols,
                      Tensor&) override {
    offer(part.data);
    if (rank_ == 0)
      for (int r = 0; r < group_.size_; ++r) {
        const float* src = static_cast<const float*>(group_.shared_[static_cast<size_t>(r)]);
        const int64_t first = r * cols, width = std::min(out_cols, first + cols) - first;
        if (width <= 0) continue;
        for (int64_t i = 0; i < rows; ++i)
          std::memcpy(out.as<float>() + i * out_cols + first, src + i * cols, static_cast<size_t>(width) * 4);
      }
    group_.arrive_and_wait();  // the parts stay as they are until rank 0 has them
  }

  void abort() override { group_.abort(); }
  void recover() override { group_.recover(); }

 private:
  // Publishes this rank's tensor and waits for every rank's (the barrier's
  // atomics order the write before the others' reads).
  void offer(const void* data) {
    group_.shared_[static_cast<size_t>(rank_)] = data;
    group_.arrive_and_wait();
  }
  // sum_ = the ranks' first numel elements summed in rank order (fp32)
  template <typename T>
  void reduce(int64_t numel) {
    for (int r = 0; r < group_.size_; ++r) {
      const T* src = static_cast<const T*>(group_.shared_[static_cast<size_t>(r)]);
      if (r == 0)
        for (int64_t i = 0; i < numel; ++i) sum_[static_cast<size_t>(i)] = to_f32(src[i]);
      else
        for (int64_t i = 0; i < numel; ++i) sum_[static_cast<size_t>(i)] += to_f32(src[i]);
    }
  }

  HostGroup& group_;
  const int rank_;
  std::vector<float> sum_;
};

HostGroup::HostGroup(int size)
    : size_(size), spin_(size <= host_processors()),
      shared_(static_cast<size_t>(size), nullptr) {}

std::unique_ptr<Collectives> HostGroup::rank(int r) { return std::make_unique<HostCollectives>(*this, r); }

namespace {

Error aborted_error() {
  return Error(ErrorKind::Runtime, "tensor-parallel step aborted: another rank failed (its error is reported)");
}

}  // namespace

void HostGroup::arrive_and_wait() {
  if (aborted_.load(std::memory_order_acquire)) throw aborted_error();
  // The generation cannot move before this rank arrives: read it first.
  const uint64_t gen = generation_.load(std::memory_order_acquire);
  if (arrived_.fetch_add(1, std::memory_order_acq_rel) + 1 == size_) {
    arrived_.store(0, std::memory_order_relaxed);  // before the release below: the next round counts from 0
    {
      std::lock_guard<std::mutex> lock(mu_);
      generation_.store(gen + 1, std::memory_order_release);
    }
    cv_.notify_all();
    return;
  }
  auto passed = [&] { return generation_.load(std::memory_order_acquire) != gen; };
  // ~50 us of spinning before sleeping: a condition variable's wake-up costs
  // tens of microseconds, a layer's collectives come every few hundred. Not
  // where the ranks outnumber the cores: the spinners would take the late
  // rank's.
  const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(spin_ ? 50 : 0);
  for (int i = 0; spin_; ++i) {
    if (passed()) return;
    if (aborted_.load(std::memory_order_acquire)) throw aborted_error();
    if ((i & 63) == 63 && std::chrono::steady_clock::now() > until) break;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
  }
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [&] { return passed() || aborted_.load(std::memory_order_acquire); });
  if (!passed()) throw aborted_error();
}

void HostGroup::abort() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    aborted_.store(true, std::memory_order_release);
  }
  cv_.notify_all();
}

void HostGroup::recover() {
  std::lock_guard<std::mutex> lock(mu_);
  aborted_.store(false, std::memory_order_release);
  arrived_.store(0, std::memory_order_relaxed);
  generation_.fetch_add(1, std::memory_order_acq_rel);
}

}  // namespace pagedrt
