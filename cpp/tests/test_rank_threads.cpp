// test_rank_threads.cpp — the team of engine/rank_threads.hpp, sleeping
// between jobs (spin 0) and watching for them (spin > 0): every rank runs
// every job once, at once (a job whose ranks wait for each other finishes),
// with the caller as rank 0; a rank's exception reaches run()'s caller and the
// team serves the next job; jobs that come while the threads spin, and after
// they went to sleep, both run; the destructor stops spinning threads. Built
// plain, with ThreadSanitizer and with ASan+UBSan (tests/test_cpp.py).
#include <atomic>
#include <chrono>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "check.hpp"
#include "engine/rank_threads.hpp"

using namespace pagedrt;

namespace {

// rounds jobs on a team of `size`, a pause of `pause_us` before every 8th
// (longer than the spin: the threads sleep), the rest back to back.
void test_every_rank_runs_every_job(int size, double spin_seconds, int pause_us) {
  RankThreads team(size, spin_seconds);
  CHECK(team.size() == size);
  std::vector<std::atomic<int>> runs(size);
  std::atomic<int> caller_rank{-1};
  const std::thread::id me = std::this_thread::get_id();
  const std::function<void()> on_error = [] {};
  for (int round = 0; round < 400; ++round) {
    if (round % 8 == 0) std::this_thread::sleep_for(std::chrono::microseconds(pause_us));
    std::atomic<int> arrived{0};
    const std::function<void(int)> job = [&](int rank) {
      if (std::this_thread::get_id() == me) caller_rank = rank;
      runs[rank].fetch_add(1);
      arrived.fetch_add(1);
      while (arrived.load() < size) std::this_thread::yield();  // all ranks at once, or this never ends
    };
    team.run(job, on_error);
    CHECK(arrived.load() == size);
  }
  CHECK(caller_rank.load() == 0);
  for (int r = 0; r < size; ++r) CHECK(runs[r].load() == 400);
}

void test_a_ranks_exception_reaches_the_caller(double spin_seconds) {
  RankThreads team(3, spin_seconds);
  std::atomic<int> errors{0};
  const std::function<void()> on_error = [&] { errors.fetch_add(1); };
  const std::function<void(int)> bad = [](int rank) {
    if (rank == 2) throw std::runtime_error("rank 2 failed");
  };
  bool thrown = false;
  try {
    team.run(bad, on_error);
  } catch (const std::runtime_error& e) {
    thrown = std::string(e.what()) == "rank 2 failed";
  }
  CHECK(thrown && errors.load() == 1);
  std::atomic<int> ok{0};
  const std::function<void(int)> good = [&](int) { ok.fetch_add(1); };
  team.run(good, on_error);  // the team serves the next job, with no stale error
  CHECK(ok.load() == 3);
}

void test_destructor_stops_spinning_threads() {
  for (int i = 0; i < 20; ++i) {
    RankThreads team(3, 10.0);  // they would spin for 10 s: the destructor must not wait for that
    std::atomic<int> ran{0};
    team.run([&](int) { ran.fetch_add(1); }, [] {});
    CHECK(ran.load() == 3);
  }
}

}  // namespace

int main() {
  for (double spin : {0.0, 200e-6, 10e-3}) {
    test_every_rank_runs_every_job(2, spin, 500);
    test_every_rank_runs_every_job(3, spin, 500);
    test_a_ranks_exception_reaches_the_caller(spin);
  }
  test_destructor_stops_spinning_threads();
  return check::finish();
}
