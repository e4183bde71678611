// tools/fork_join_probe.cpp — what a thread team's fork and join cost on this machine (issue 20):
// a libgomp parallel-for region (what each CPU kernel call opens), an orphaned `omp for` inside one
// persistent region (a barrier a call), and a pool of spinning threads (one store to start them, a
// counter to join), each timed over N empty calls at T threads. A decode token of SmolLM2 runs ~150
// regions, so at 16 threads a few microseconds each is a visible share of a 3 ms token.
//
//   g++ -O2 -march=native -fopenmp tools/fork_join_probe.cpp -o /tmp/fork_join_probe -lpthread
//   /tmp/fork_join_probe T [N]        (gpu_check.sh's context stage runs it at $CONTEXT_THREADS)
//
// The 2-core AMD VM (session 41): 0.75 / 0.31 / 0.33 us at T = 2.
#include <omp.h>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>
#include <immintrin.h>
struct alignas(64) Pad { std::atomic<uint64_t> v{0}; };
struct Pool {
  int T; std::vector<std::thread> th; Pad epoch; Pad done; std::atomic<bool> stop{false};
  void (*fn)(void*, int) = nullptr; void* arg = nullptr;
  explicit Pool(int t): T(t) {
    for (int i = 1; i < T; ++i) th.emplace_back([this, i] {
      uint64_t seen = 0;
      for (;;) {
        uint64_t e;
        while ((e = epoch.v.load(std::memory_order_acquire)) == seen) { if (stop) return; _mm_pause(); }
        seen = e; fn(arg, i); done.v.fetch_add(1, std::memory_order_acq_rel);
      }
    });
  }
  template <class F> void run(F& f) {
    fn = [](void* a, int i) { (*static_cast<F*>(a))(i); }; arg = &f;
    done.v.store(0, std::memory_order_relaxed);
    epoch.v.fetch_add(1, std::memory_order_release);
    f(0);
    while (done.v.load(std::memory_order_acquire) != (uint64_t)(T - 1)) _mm_pause();
  }
  ~Pool() { stop = true; epoch.v.fetch_add(1); for (auto& t : th) t.join(); }
};
int main(int argc, char** argv) {
  int T = argc > 1 ? atoi(argv[1]) : omp_get_max_threads();
  const int N = argc > 2 ? atoi(argv[2]) : 100000;
  volatile int sink = 0;
  auto us = [&](auto a, auto b) { return std::chrono::duration<double, std::micro>(b - a).count() / N; };
  for (int rep = 0; rep < 3; ++rep) {
    auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < N; ++i) {
#pragma omp parallel for schedule(static) num_threads(T)
      for (int j = 0; j < T; ++j) sink += j;
    }
    auto t1 = std::chrono::steady_clock::now();
#pragma omp parallel num_threads(T)
    for (int i = 0; i < N; ++i) {
#pragma omp for schedule(static)
      for (int j = 0; j < T; ++j) sink += j;
    }
    auto t2 = std::chrono::steady_clock::now();
    double pool_us;
    {
      Pool p(T);
      auto f = [&](int i) { sink += i; };
      auto a = std::chrono::steady_clock::now();
      for (int i = 0; i < N; ++i) p.run(f);
      pool_us = us(a, std::chrono::steady_clock::now());
    }
    printf("T=%2d omp region %.3f us, omp-for barrier %.3f us, spin pool %.3f us\n", T, us(t0, t1), us(t1, t2), pool_us);
  }
}
