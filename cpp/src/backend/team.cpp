// backend/team.cpp — the host's thread team (team.hpp).
#include "backend/team.hpp"

#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <fstream>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define PAGEDRT_PAUSE() _mm_pause()
#else
#define PAGEDRT_PAUSE() std::this_thread::yield()
#endif

namespace pagedrt {
namespace {

using Clock = std::chrono::steady_clock;

bool own_team_on() {
  static const bool on = [] {
    const char* e = std::getenv("PAGEDRT_CPU_TEAM");
    return e == nullptr || std::strcmp(e, "omp") != 0;
  }();
  return on;
}

std::chrono::microseconds spin_time() {
  static const std::chrono::microseconds t = [] {
    const char* e = std::getenv("PAGEDRT_CPU_TEAM_SPIN_US");
    return std::chrono::microseconds(e != nullptr ? std::max(0L, std::atol(e)) : 300);
  }();
  return t;
}

// Waits, pausing, until done() holds; yields the core after the first few
// thousand pauses, so that a thread that shares it (another process, a
// machine's other guest) can finish the work this one waits for.
template <typename Done>
void spin_until(const Done& done) {
  for (int i = 0; !done(); ++i) {
    if (i < 4096)
      PAGEDRT_PAUSE();
    else
      std::this_thread::yield();
  }
}

// Bumped in a forked child: the parent's teams have no threads there.
std::atomic<uint64_t> g_fork_generation{0};

struct alignas(64) Line {
  std::atomic<uint64_t> v{0};
};

class Team {
 public:
  explicit Team(int workers) : done_(static_cast<size_t>(workers) + 1), generation_(g_fork_generation.load()) {
    threads_.reserve(static_cast<size_t>(workers));
    for (int r = 1; r <= workers; ++r) threads_.emplace_back([this, r] { work(r); });
  }
  ~Team() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_.store(true);
      wake_.notify_all();
    }
    for (std::thread& t : threads_) t.join();
  }
  int workers() const { return static_cast<int>(threads_.size()); }
  uint64_t generation() const { return generation_; }

  void run(int size, void (*fn)(void*, const Region&), void* ctx) {
    fn_ = fn;
    ctx_ = ctx;
    const uint64_t e = (word_.v.load(std::memory_order_relaxed) >> 16) + 1;  // only this thread stores word_
    word_.v.store(e << 16 | static_cast<uint64_t>(size), std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lock(mutex_);
      wake_.notify_all();
    }
    std::exception_ptr error;
    try {
      fn(ctx, Region{0, size, this});
    } catch (...) {
      error = std::current_exception();
    }
    for (int r = 1; r < size; ++r) {  // the workers use the caller's frame until they are done
      const Line& d = done_[static_cast<size_t>(r)];
      spin_until([&] { return d.v.load(std::memory_order_acquire) == e; });
    }
    // (read before it is written: the line stays shared with the spinning workers)
    if (error == nullptr && worker_error_ != nullptr) error = std::exchange(worker_error_, nullptr);
    if (error != nullptr) std::rethrow_exception(error);
  }

  // A centralized barrier: the last rank to come starts the next generation.
  void barrier(int size) {
    const uint64_t gen = bar_gen_.v.load(std::memory_order_acquire);
    if (bar_count_.v.fetch_add(1, std::memory_order_acq_rel) + 1 == static_cast<uint64_t>(size)) {
      bar_count_.v.store(0, std::memory_order_relaxed);
      bar_gen_.v.store(gen + 1, std::memory_order_release);
    } else {
      spin_until([&] { return bar_gen_.v.load(std::memory_order_acquire) != gen; });
    }
  }

 private:
  static int size_of(uint64_t word) { return static_cast<int>(word & 0xffff); }

  void work(int rank) {
    t_in_team = true;
    uint64_t seen = 0;  // word_ as made: a region stored before this thread starts is still new to it
    for (;;) {
      // Spin while this worker was in the last region and none is asked for.
      Clock::time_point start = Clock::now();
      uint64_t w = word_.v.load(std::memory_order_acquire);
      for (int i = 0; w == seen; ++i) {
        PAGEDRT_PAUSE();
        if ((i & 255) == 255 && (stop_.load(std::memory_order_relaxed) || Clock::now() - start > spin_time())) break;
        w = word_.v.load(std::memory_order_acquire);
      }
      if (w == seen || rank >= size_of(w)) {  // asleep until a region takes this worker
        std::unique_lock<std::mutex> lock(mutex_);
        sleepers_.fetch_add(1, std::memory_order_seq_cst);
        wake_.wait(lock, [&] {
          w = word_.v.load(std::memory_order_seq_cst);
          return stop_.load() || (w != seen && rank < size_of(w));
        });
        sleepers_.fetch_sub(1, std::memory_order_relaxed);
      }
      if (stop_.load()) return;
      seen = w;
      try {
        fn_(ctx_, Region{rank, size_of(w), this});
      } catch (...) {  // the caller rethrows the first
        std::lock_guard<std::mutex> lock(mutex_);
        if (worker_error_ == nullptr) worker_error_ = std::current_exception();
      }
      done_[static_cast<size_t>(rank)].v.store(w >> 16, std::memory_order_release);
    }
  }

  Line word_;  // the current region: its number << 16 | its size
  void (*fn_)(void*, const Region&) = nullptr;  // the current region's, written before word_
  void* ctx_ = nullptr;
  std::vector<Line> done_;  // done_[rank]: the last region number rank finished
  Line bar_count_, bar_gen_;
  std::mutex mutex_;  // guards the sleep and worker_error_
  std::condition_variable wake_;
  std::exception_ptr worker_error_;
  std::atomic<int> sleepers_{0};
  std::atomic<bool> stop_{false};
  uint64_t generation_;
  std::vector<std::thread> threads_;

 public:
  static thread_local bool t_in_team;  // this thread runs a region of a team (a worker, or a caller in one)
};

thread_local bool Team::t_in_team = false;
thread_local std::unique_ptr<Team> t_team;  // the calling thread's

void forked_child() { g_fork_generation.fetch_add(1); }

// OpenMP's region; an exception may not leave it, so the first is rethrown after.
void omp_run(int threads, void (*fn)(void*, const Region&), void* ctx) {
  std::exception_ptr error;
#pragma omp parallel num_threads(threads)
  {
    try {
#ifdef _OPENMP
      fn(ctx, Region{omp_get_thread_num(), omp_get_num_threads(), nullptr});
#else
      fn(ctx, Region{});
#endif
    } catch (...) {
#pragma omp critical(pagedrt_region_error)
      if (error == nullptr) error = std::current_exception();
    }
  }
  if (error != nullptr) std::rethrow_exception(error);
}

}  // namespace

int cgroup_cpu_limit(const char* proc_cgroup, const char* root) {
  // The smaller of two limits, 0 being none.
  auto smaller = [](int a, int b) { return a > 0 && b > 0 ? std::min(a, b) : std::max(a, b); };
  // The CPUs of one cgroup folder's quota, or 0: v2 "max 100000" / "200000
  // 100000"; v1 a quota of -1 is none.
  auto folder_limit = [](const std::string& dir, bool v2) -> int {
    double quota = -1.0, period = 0.0;
    if (v2) {
      std::ifstream f(dir + "/cpu.max");
      std::string q;
      if (!(f >> q >> period) || q == "max") return 0;
      quota = std::atof(q.c_str());
    } else {
      std::ifstream fq(dir + "/cpu.cfs_quota_us"), fp(dir + "/cpu.cfs_period_us");
      if (!(fq >> quota) || !(fp >> period)) return 0;
    }
    if (quota <= 0.0 || period <= 0.0) return 0;
    return std::max(1, static_cast<int>(std::ceil(quota / period - 1e-9)));
  };
  // The smallest limit of `path` and its ancestors under `mount`.
  auto walk = [&](const std::string& mount, std::string path, bool v2) {
    int limit = 0;
    for (;;) {
      limit = smaller(limit, folder_limit(mount + (path == "/" ? "" : path), v2));
      if (path.empty() || path == "/") return limit;
      const size_t slash = path.find_last_of('/');
      path = slash == 0 || slash == std::string::npos ? "/" : path.substr(0, slash);
    }
  };
  std::ifstream in(proc_cgroup);
  std::string line;
  int limit = 0;
  while (std::getline(in, line)) {  // "hierarchy:controllers:path"
    const size_t a = line.find(':'), b = a == std::string::npos ? a : line.find(':', a + 1);
    if (b == std::string::npos) continue;
    const std::string controllers = line.substr(a + 1, b - a - 1), path = line.substr(b + 1);
    if (line.compare(0, a, "0") == 0 && controllers.empty()) {  // v2
      limit = smaller(limit, walk(root, path, true));
      continue;
    }
    bool cpu = false;  // v1: the hierarchy holding the cpu controller ("cpu,cpuacct", "cpu")
    for (size_t i = 0; i <= controllers.size();) {
      const size_t j = std::min(controllers.find(',', i), controllers.size());
      cpu = cpu || controllers.compare(i, j - i, "cpu") == 0;
      i = j + 1;
    }
    if (!cpu) continue;
    limit = smaller(limit, walk(std::string(root) + "/" + controllers, path, false));
    if (controllers != "cpu")  // also where the hierarchy is mounted as "cpu" (a link, or the cpu controller alone)
      limit = smaller(limit, walk(std::string(root) + "/cpu", path, false));
  }
  return limit;
}

int host_processors() {
  cpu_set_t set;
  int n = sched_getaffinity(0, sizeof(set), &set) == 0 ? CPU_COUNT(&set)
                                                      : static_cast<int>(std::thread::hardware_concurrency());
  if (const int quota = cgroup_cpu_limit("/proc/self/cgroup", "/sys/fs/cgroup"); quota > 0) n = std::min(n, quota);
  return std::max(1, n);
}

void team_run(int threads, void (*fn)(void*, const Region&), void* ctx) {
  static const int procs = [] {
    pthread_atfork(nullptr, nullptr, forked_child);
    return host_processors();
  }();
  bool nested = Team::t_in_team;
#ifdef _OPENMP
  nested = nested || omp_in_parallel();
#endif
  if (nested) return fn(ctx, Region{});  // inside a region: this thread alone
  if (!own_team_on() || threads > procs || threads > 0xffff) return omp_run(threads, fn, ctx);
  if (t_team != nullptr && t_team->generation() != g_fork_generation.load())
    (void)t_team.release();  // a forked child: the workers are the parent's; the team is left unjoined
  if (t_team == nullptr || t_team->workers() < threads - 1) {
    t_team.reset();
    t_team = std::make_unique<Team>(threads - 1);
  }
  struct InRegion {
    InRegion() { Team::t_in_team = true; }
    ~InRegion() { Team::t_in_team = false; }
  } in_region;
  t_team->run(threads, fn, ctx);
}

void Region::barrier() const {
  if (size <= 1) return;
  if (team != nullptr) {
    static_cast<Team*>(team)->barrier(size);
    return;
  }
#pragma omp barrier
}

const char* team_kind() { return own_team_on() ? "team" : "omp"; }

}  // namespace pagedrt
