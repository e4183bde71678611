// test_rank_threads.cpp — the team of engine/rank_threads.hpp: every rank
// runs every job once, at once (a job whose ranks wait for each other
// finishes), with the caller as rank 0, whether jobs come back to back or
// after a pause; a rank's exception reaches run()'s caller and the team serves
// the next job; teams made and dropped at once join cleanly. Built plain, with
// ThreadSanitizer and with ASan+UBSan (tests/test_cpp.py).
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

// 400 jobs on a team of `size`, a pause of `pause_us` before every 8th (the
// threads asleep when it comes), the rest back to back.
void test_every_rank_runs_every_job(int size, int pause_us) {
  RankThreads team(size);
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

void test_a_ranks_exception_reaches_the_caller() {
  RankThreads team(3);
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

void test_destructor_joins_right_after_a_job() {
  for (int i = 0; i < 20; ++i) {
    RankThreads team(3);
    std::atomic<int> ran{0};
    team.run([&](int) { ran.fetch_add(1); }, [] {});
    CHECK(ran.load() == 3);
  }
}

}  // namespace

int main() {
  test_every_rank_runs_every_job(2, 500);
  test_every_rank_runs_every_job(3, 500);
  test_a_ranks_exception_reaches_the_caller();
  test_destructor_joins_right_after_a_job();
  return check::finish();
}
