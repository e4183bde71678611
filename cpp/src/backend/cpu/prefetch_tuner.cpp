#include "backend/cpu/prefetch_tuner.hpp"

#include <algorithm>

namespace pagedrt::cpu {

PrefetchTuner::PrefetchTuner(PrefetchTo start, int64_t window, int64_t explore, double margin)
    : window_(std::max<int64_t>(1, window)), explore_(std::max<int64_t>(1, explore)), margin_(margin),
      best_(start) {}

void PrefetchTuner::record(PrefetchTo ran, double bytes, double seconds) {
  if (ran != hint() || seconds <= 0.0) return;
  bytes_ += bytes;
  seconds_ += seconds;
  if (++calls_ < window_) return;
  const double rate = bytes_ / seconds_;
  calls_ = 0;
  bytes_ = seconds_ = 0.0;
  ++windows_;
  if (trying_) {
    trying_ = false;
    if (best_rate_ > 0.0 && rate > best_rate_ * (1.0 + margin_)) {
      best_ = other(best_);
      ++switches_;
      best_rate_ = rate;
    }
    return;
  }
  best_rate_ = rate;
  if (++since_try_ >= explore_) {
    since_try_ = 0;
    trying_ = true;
  }
}

}  // namespace pagedrt::cpu
