// tools/fork_join_probe.cpp — what a thread team's fork and join cost on this machine (issue 20):
// a libgomp parallel-for region (what the CPU kernels opened until session 42), an orphaned `omp
// for` inside one persistent region (a barrier a call), and pagedrt's own team (backend/team.cpp,
// what they open now: PAGEDRT_CPU_TEAM=omp makes it libgomp's), a region alone and with a barrier
// inside, each timed over N empty calls at T threads. A decode token of SmolLM2 runs ~150 regions,
// so at 16 threads a few microseconds each is a visible share of a 3 ms token.
//
//   g++ -O2 -march=native -fopenmp -Icpp/src tools/fork_join_probe.cpp cpp/src/backend/team.cpp \
//       -o /tmp/fork_join_probe -lpthread
//   /tmp/fork_join_probe T [N]        (gpu_check.sh's context stage runs it at $CONTEXT_THREADS)
//
// The 2-core AMD VM (session 41): libgomp region 0.75 us, barrier 0.31 at T = 2. The H100 host's
// 16-core Xeon (session 42): 6.83 / 1.98 us at T = 16, 2.77 / 0.97 at T = 8 (a spinning pool with
// one shared join counter, this probe's third column then: 3.67 and 1.49).
#include <omp.h>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>

#include "backend/team.hpp"
// Each way timed after the others' threads have gone to sleep (libgomp's spin for a while after a
// region, and would share the cores with the next way's).
template <typename Calls>
static double timed(int N, void (*rest)(), const Calls& calls) {
  rest();
  const auto a = std::chrono::steady_clock::now();
  for (int i = 0; i < N; ++i) calls();
  return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - a).count() / N;
}

int main(int argc, char** argv) {
  const int T = argc > 1 ? atoi(argv[1]) : omp_get_max_threads();
  const int N = argc > 2 ? atoi(argv[2]) : 100000;
  volatile int sink = 0;
  auto rest = [] { std::this_thread::sleep_for(std::chrono::milliseconds(200)); };
  for (int rep = 0; rep < 3; ++rep) {
    const double region = timed(N, rest, [&] {
#pragma omp parallel for schedule(static) num_threads(T)
      for (int j = 0; j < T; ++j) sink = sink + j;
    });
    // one region of N work-shared loops: a barrier each
    const double barrier = timed(1, rest, [&] {
#pragma omp parallel num_threads(T)
      for (int i = 0; i < N; ++i) {
#pragma omp for schedule(static)
        for (int j = 0; j < T; ++j) sink = sink + j;
      }
    }) / N;
    const double team = timed(N, rest, [&] {
      pagedrt::parallel(T, [&](const pagedrt::Region& r) {
        if (r.rank == 0) sink = sink + 1;
      });
    });
    const double team_barrier = timed(N, rest, [&] {
      pagedrt::parallel(T, [&](const pagedrt::Region& r) {
        if (r.rank == 0) sink = sink + 1;
        r.barrier();
      });
    });
    printf("T=%2d omp region %.3f us, omp-for barrier %.3f us, pagedrt team region (%s) %.3f us, + a barrier %.3f us\n",
           T, region, barrier, pagedrt::team_kind(), team, team_barrier);
  }
}
