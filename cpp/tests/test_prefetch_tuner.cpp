// test_prefetch_tuner.cpp — the CPU decode kernels' prefetch hint re-decided
// while they run (backend/cpu/prefetch_tuner.hpp), on simulated machines whose
// rate for each hint is given: it moves to the faster hint within one
// exploration period, stays there, moves back when the rates swap, and keeps
// its hint where the two are within the margin. Run by ctest
// (tests/test_cpp.py).
#include <string>
#include <vector>

#include "backend/cpu/prefetch_tuner.hpp"
#include "check.hpp"

using namespace pagedrt::cpu;

namespace {

// Runs `calls` decode calls of 1 byte on a machine streaming l1 / l2 bytes a
// second under each hint; returns the hint of each call.
std::vector<PrefetchTo> run(PrefetchTuner& t, int64_t calls, double l1, double l2) {
  std::vector<PrefetchTo> ran;
  for (int64_t i = 0; i < calls; ++i) {
    const PrefetchTo h = t.hint();
    ran.push_back(h);
    t.record(h, 1.0, 1.0 / (h == PrefetchTo::L1 ? l1 : l2));
  }
  return ran;
}

int64_t count(const std::vector<PrefetchTo>& ran, PrefetchTo h, size_t from = 0) {
  int64_t n = 0;
  for (size_t i = from; i < ran.size(); ++i) n += ran[i] == h;
  return n;
}

void test_moves_to_the_faster_hint_and_stays() {
  constexpr int64_t kWindow = 10, kExplore = 4;
  PrefetchTuner t(PrefetchTo::L1, kWindow, kExplore, 0.05);
  // L2 1.5x faster: the first try (after kExplore windows on L1) switches.
  const std::vector<PrefetchTo> ran = run(t, (kExplore + 1) * kWindow, 20.0, 30.0);
  CHECK(count(ran, PrefetchTo::L1) == kExplore * kWindow);  // exact: windows of kWindow calls
  CHECK(count(ran, PrefetchTo::L2) == kWindow);
  CHECK(t.best() == PrefetchTo::L2 && t.switches() == 1);
  // Then L2, with one window in kExplore + 1 trying L1 again (which loses).
  const std::vector<PrefetchTo> later = run(t, 50 * (kExplore + 1) * kWindow, 20.0, 30.0);
  CHECK(count(later, PrefetchTo::L1) == 50 * kWindow);
  CHECK(t.best() == PrefetchTo::L2 && t.switches() == 1);
}

void test_follows_the_rates_when_they_swap() {
  constexpr int64_t kWindow = 8, kExplore = 6, kPeriod = (kExplore + 1) * kWindow;
  PrefetchTuner t(PrefetchTo::L2, kWindow, kExplore, 0.05);
  run(t, 5 * kPeriod, 10.0, 30.0);
  CHECK(t.best() == PrefetchTo::L2 && t.switches() == 0);
  // The VM's state changes: L1 now 3x faster. The next try (the period's
  // last window) takes it; then every period is L1 but its one try of L2.
  const std::vector<PrefetchTo> ran = run(t, 3 * kPeriod, 30.0, 10.0);
  CHECK(t.best() == PrefetchTo::L1 && t.switches() == 1);
  CHECK(count(ran, PrefetchTo::L1) == kWindow + 2 * (kPeriod - kWindow));
  CHECK(count(ran, PrefetchTo::L1, kPeriod) == 2 * (kPeriod - kWindow));
}

void test_keeps_its_hint_within_the_margin() {
  PrefetchTuner t(PrefetchTo::L1, 16, 2, 0.05);
  run(t, 10000, 20.0, 20.8);  // L2 4% faster: not enough
  CHECK(t.best() == PrefetchTo::L1 && t.switches() == 0);
  run(t, 200, 20.0, 21.5);  // 7.5% faster: taken
  CHECK(t.best() == PrefetchTo::L2 && t.switches() == 1);
}

void test_leaves_out_calls_under_the_other_hint() {
  // A call begun before a switch (another engine's thread) records under the
  // hint it ran with: left out, the window not advanced.
  PrefetchTuner t(PrefetchTo::L1, 4, 1, 0.05);
  for (int i = 0; i < 100; ++i) t.record(PrefetchTo::L2, 1.0, 0.001);
  CHECK(t.windows() == 0 && t.best() == PrefetchTo::L1 && t.hint() == PrefetchTo::L1);
  t.record(PrefetchTo::L1, 1.0, 0.0);  // an untimed call: left out too
  CHECK(t.windows() == 0);
}

}  // namespace

int main() {
  test_moves_to_the_faster_hint_and_stays();
  test_follows_the_rates_when_they_swap();
  test_keeps_its_hint_within_the_margin();
  test_leaves_out_calls_under_the_other_hint();
  return check::finish();
}
