// backend/cpu/prefetch_tuner.hpp — which prefetch hint the CPU decode kernels
// use, re-decided while they run.
//
// The decode kernels (one to four tokens) ask for the next task's weight rows
// while the current ones stream, into L1 or into L2 (gemm.hpp). Which is
// faster depends on the machine and, on a VM, on the minute: the rate of each
// hint swapped between processes minutes apart (a 2-core Zen 5 VM, session
// 29; the wrong one costs a third of the decode speed). The start-up
// calibration picks one; this tuner keeps checking it. It measures the decode
// calls in windows of `window` calls: after every `explore` windows on the
// chosen hint it runs one window on the other, and takes the other where that
// window streamed at least `margin` faster than the window just before it (the
// two windows are adjacent in time, so a VM's slow drift does not decide).
// The cost: 1 window in explore + 1 on a hint that may be slower.
#pragma once

#include <cstdint>

namespace pagedrt::cpu {

enum class PrefetchTo { L1, L2 };

class PrefetchTuner {
 public:
  PrefetchTuner(PrefetchTo start, int64_t window, int64_t explore, double margin);

  // The hint for the next decode call.
  PrefetchTo hint() const { return trying_ ? other(best_) : best_; }
  // A decode call that moved `bytes` of weights in `seconds` under `ran`
  // (calls that ran under another hint than hint(), e.g. begun before a
  // switch, are left out).
  void record(PrefetchTo ran, double bytes, double seconds);

  PrefetchTo best() const { return best_; }
  int64_t switches() const { return switches_; }
  int64_t windows() const { return windows_; }

  static PrefetchTo other(PrefetchTo p) { return p == PrefetchTo::L1 ? PrefetchTo::L2 : PrefetchTo::L1; }

 private:
  const int64_t window_, explore_;
  const double margin_;
  PrefetchTo best_;
  bool trying_ = false;
  int64_t calls_ = 0;       // in the current window
  double bytes_ = 0.0, seconds_ = 0.0;
  double best_rate_ = 0.0;  // bytes / s of the last whole window on best_
  int64_t since_try_ = 0;   // windows on best_ since the last try
  int64_t windows_ = 0, switches_ = 0;
};

}  // namespace pagedrt::cpu
