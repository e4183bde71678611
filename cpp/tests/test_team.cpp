// test_team.cpp — the host's thread team (backend/team.hpp): every rank of a
// region runs once on its own thread, the caller as rank 0; parallel_for and
// parallel_for_dynamic run every index once; a barrier holds every rank until
// all have come; a region inside a region runs on its caller alone; a smaller
// region after a larger one, a region after the workers went to sleep, and
// regions of several calling threads at once; an exception on any rank
// reaches the caller and the team goes on; a forked child gets a team of its
// own (where libgomp's region would hang). PAGEDRT_CPU_TEAM=omp runs the same
// checks on OpenMP's regions, the fork's aside. Built plain, with
// ThreadSanitizer and with ASan+UBSan (tests/test_cpp.py).
#include <sched.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "backend/team.hpp"
#include "check.hpp"

using namespace pagedrt;

namespace {

int processors() {
  cpu_set_t set;
  return sched_getaffinity(0, sizeof(set), &set) == 0 ? CPU_COUNT(&set) : 1;
}

// The team takes regions of up to the processors (more go to OpenMP).
int team_threads() { return std::min(4, processors()); }

void test_every_rank_runs_once_on_its_own_thread() {
  for (int threads = 2; threads <= team_threads(); ++threads) {
    for (int round = 0; round < 200; ++round) {
      std::vector<std::atomic<int>> runs(static_cast<size_t>(threads));
      std::vector<std::thread::id> ids(static_cast<size_t>(threads));
      std::vector<int> sizes(static_cast<size_t>(threads), 0);
      parallel(threads, [&](const Region& r) {
        runs[static_cast<size_t>(r.rank)].fetch_add(1);
        ids[static_cast<size_t>(r.rank)] = std::this_thread::get_id();
        sizes[static_cast<size_t>(r.rank)] = r.size;
      });
      bool once = true, sized = true;
      for (int i = 0; i < threads; ++i) {
        once = once && runs[static_cast<size_t>(i)].load() == 1;
        sized = sized && sizes[static_cast<size_t>(i)] == threads;
      }
      CHECK(once);
      CHECK(sized);
      CHECK(ids[0] == std::this_thread::get_id());
      CHECK(std::set<std::thread::id>(ids.begin(), ids.end()).size() == static_cast<size_t>(threads));
    }
  }
}

void test_every_index_runs_once() {
  for (int threads : {1, 2, team_threads(), processors() + 3}) {  // the last: OpenMP's, or the caller alone
    for (int64_t n : {0, 1, 2, 7, 1000}) {
      std::vector<std::atomic<int>> a(static_cast<size_t>(n)), b(static_cast<size_t>(n));
      parallel_for(n, threads, [&](int64_t i) { a[static_cast<size_t>(i)].fetch_add(1); });
      parallel_for_dynamic(n, threads, [&](int64_t i) { b[static_cast<size_t>(i)].fetch_add(1); });
      bool once = true;
      for (int64_t i = 0; i < n; ++i)
        once = once && a[static_cast<size_t>(i)].load() == 1 && b[static_cast<size_t>(i)].load() == 1;
      CHECK(once);
    }
  }
  // the static split: rank r has [n r / size, n (r + 1) / size)
  const Region r{1, 3, nullptr};
  CHECK(r.begin(10) == 3 && r.end(10) == 6);
}

void test_barrier_holds_every_rank() {
  const int threads = team_threads();
  if (threads < 2) return;
  std::vector<std::atomic<int>> phase(static_cast<size_t>(threads));
  std::atomic<int> early{0};
  parallel(threads, [&](const Region& r) {
    for (int round = 1; round <= 2000; ++round) {
      phase[static_cast<size_t>(r.rank)].store(round);
      r.barrier();
      for (int i = 0; i < r.size; ++i)
        if (phase[static_cast<size_t>(i)].load() < round) early.fetch_add(1);
      r.barrier();  // nobody writes the next round before all have read this one
    }
  });
  CHECK(early.load() == 0);
}

void test_a_region_inside_a_region_runs_on_its_caller() {
  const int threads = team_threads();
  std::atomic<int> wrong{0}, inner{0};
  parallel(threads, [&](const Region&) {
    const std::thread::id me = std::this_thread::get_id();
    parallel(threads, [&](const Region& r) {
      inner.fetch_add(1);
      if (r.rank != 0 || r.size != 1 || std::this_thread::get_id() != me) wrong.fetch_add(1);
    });
  });
  CHECK(wrong.load() == 0);
  CHECK(inner.load() == threads);
}

void test_smaller_regions_sleep_and_wake() {
  const int threads = team_threads();
  std::atomic<int> sum{0};
  for (int round = 0; round < 50; ++round) {
    for (int t : {threads, 2, threads}) parallel(t, [&](const Region& r) { sum.fetch_add(r.rank + 1); });
    if (round % 10 == 0) std::this_thread::sleep_for(std::chrono::milliseconds(5));  // past the spin: asleep
  }
  const int per = threads * (threads + 1) / 2;
  CHECK(sum.load() == 50 * (2 * per + 3));
}

void test_callers_at_once_have_teams_of_their_own() {
  const int threads = std::max(2, team_threads() / 2);
  std::atomic<int> wrong{0};
  std::vector<std::thread> callers;
  for (int c = 0; c < 2; ++c)
    callers.emplace_back([&] {
      for (int round = 0; round < 100; ++round) {
        std::vector<int> hit(1000, 0);
        parallel_for(1000, threads, [&](int64_t i) { hit[static_cast<size_t>(i)] += 1; });
        if (std::count(hit.begin(), hit.end(), 1) != 1000) wrong.fetch_add(1);
      }
    });
  for (std::thread& t : callers) t.join();
  CHECK(wrong.load() == 0);
}

void test_exceptions_reach_the_caller() {
  const int threads = team_threads();
  for (int thrower = 0; thrower < threads; ++thrower) {
    std::string what;
    try {
      parallel(threads, [&](const Region& r) {
        if (r.rank == thrower) throw std::runtime_error("rank " + std::to_string(r.rank));
      });
    } catch (const std::runtime_error& e) {
      what = e.what();
    }
    CHECK(what == "rank " + std::to_string(thrower));
    std::atomic<int> ran{0};  // and the team goes on
    parallel(threads, [&](const Region&) { ran.fetch_add(1); });
    CHECK(ran.load() == threads);
  }
}

void test_a_forked_child_has_a_team_of_its_own() {
#if defined(__SANITIZE_THREAD__) || defined(__SANITIZE_ADDRESS__)
  return;  // fork in a threaded process: the sanitizers' runtimes are not made for it
#else
  if (std::string(team_kind()) != "team") return;  // libgomp's threads do not come back in a forked child
  const int threads = team_threads();
  parallel(threads, [](const Region&) {});  // the parent's team exists
  const pid_t pid = fork();
  if (pid == 0) {
    std::atomic<int> ran{0};
    parallel(threads, [&](const Region&) { ran.fetch_add(1); });
    _exit(ran.load() == threads ? 0 : 1);
  }
  int status = -1;
  waitpid(pid, &status, 0);
  CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
#endif
}

}  // namespace

int main() {
  std::printf("team: %s, %d processors\n", team_kind(), processors());
  test_every_rank_runs_once_on_its_own_thread();
  test_every_index_runs_once();
  test_barrier_holds_every_rank();
  test_a_region_inside_a_region_runs_on_its_caller();
  test_smaller_regions_sleep_and_wake();
  test_callers_at_once_have_teams_of_their_own();
  test_exceptions_reach_the_caller();
  test_a_forked_child_has_a_team_of_its_own();
  return check::finish();
}
