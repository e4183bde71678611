// backend/team.hpp — the host's thread team for the kernels' parallel regions.
//
// A decode token of a small model opens ~150 short parallel regions (four
// GEMVs and attention a layer), each a few microseconds on 16 threads, so the
// cost of starting and joining a team is a visible share of the token. Each
// calling thread (an engine's, a tensor-parallel rank's, a test's) owns a team
// of threads - 1 workers, made at its first region and joined when the
// calling thread ends. A region is one store that the spinning workers see
// and a done flag each on its own cache line that the caller reads, the
// caller taking rank 0; a worker spins PAGEDRT_CPU_TEAM_SPIN_US (default 300)
// after its last region, then sleeps until a region takes it. A worker
// outside a region (a smaller team: cores lent to the structured-output
// masks) sleeps at once and leaves its core free.
//
// OpenMP (libgomp) runs the region instead where PAGEDRT_CPU_TEAM=omp, where
// more threads are asked for than the process may run on (spinning threads
// on shared cores wait for each other by whole time slices), and inside a
// region (a nested one runs on its caller alone). Who runs a task never
// changes its sums: every region splits rows, never a reduction.
#pragma once

#include <cstdint>

namespace pagedrt {

// What a region's body gets: its rank in [0, size).
struct Region {
  int rank = 0, size = 1;
  void* team = nullptr;  // the own team running it; null under OpenMP or alone
  // Every rank of the region waits here until all have come.
  void barrier() const;
  // Rank's contiguous share of [0, n): [n rank / size, n (rank + 1) / size).
  // (Always inlined: the per-ISA kernel files include this header with their
  // own flags, and an out-of-line copy from one of them could be the one the
  // linker keeps for every file.)
  [[gnu::always_inline]] int64_t begin(int64_t n) const { return n * rank / size; }
  [[gnu::always_inline]] int64_t end(int64_t n) const { return n * (rank + 1) / size; }
};

// The processors this process may run on: its affinity mask (a container's
// or taskset's cores, not the machine's), at most its cgroup's CPU quota
// (cgroup_cpu_limit: a container run with --cpus 2 on 64 cores gets 2). The
// default thread count of the CPU backend, of its tensor-parallel ranks
// together, and the line past which neither the team nor the ranks'
// collectives spin (threads spinning past a quota would spend it waiting).
int host_processors();

// The CPUs a cgroup quota gives the process, quota / period rounded up, the
// smallest over its cgroup and the cgroup's ancestors (v2: cpu.max; v1:
// cpu.cfs_quota_us and cpu.cfs_period_us under the hierarchy holding the
// cpu controller); 0 where none is set or nothing can be read. proc_cgroup:
// the /proc/self/cgroup file; root: where the hierarchies are mounted
// (/sys/fs/cgroup).
int cgroup_cpu_limit(const char* proc_cgroup, const char* root);

// Internal: runs fn(ctx, region) on ranks [0, threads): the calling thread's
// team, the caller as rank 0, or OpenMP's (above), or inside a region the
// caller alone. (Out of line, OpenMP's region too: the per-ISA kernel files
// include this header with their own flags, so no library code is inlined
// into them from here.)
void team_run(int threads, void (*fn)(void*, const Region&), void* ctx);

// body(const Region&) on `threads` threads (one: here, on the caller). An
// exception thrown on any rank is rethrown here once every rank is done (a
// body with barriers must not throw: the other ranks would wait at them).
template <typename Body>
inline void parallel(int threads, const Body& body) {
  if (threads <= 1) {
    body(Region{});
    return;
  }
  team_run(threads, [](void* ctx, const Region& r) { (*static_cast<const Body*>(ctx))(r); },
           const_cast<Body*>(&body));
}

// fn(i) for i in [0, n), each rank its contiguous share (OpenMP's static schedule).
// Both take all `threads` ranks even where n is smaller: a region of fewer
// puts the other workers to sleep (the team's, and libgomp's: on the H100
// host's Xeon, decode attention's 3 kv heads in regions of 3 among GEMVs of
// 16 made a token 15x slower), and the next region must wake them.
template <typename Fn>
inline void parallel_for(int64_t n, int threads, const Fn& fn) {
  if (n <= 1 || threads <= 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  parallel(threads, [&](const Region& r) {
    for (int64_t i = r.begin(n), e = r.end(n); i < e; ++i) fn(i);
  });
}

// fn(i) for i in [0, n), each rank claiming the next i when done with its last
// (OpenMP's dynamic schedule, chunks of one): for items of uneven cost.
template <typename Fn>
inline void parallel_for_dynamic(int64_t n, int threads, const Fn& fn) {
  if (n <= 1 || threads <= 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  alignas(64) int64_t next = 0;
  parallel(threads, [&](const Region&) {
    for (int64_t i; (i = __atomic_fetch_add(&next, 1, __ATOMIC_RELAXED)) < n;) fn(i);
  });
}

// Which runs the regions: "team" or "omp" (PAGEDRT_CPU_TEAM), for reports.
const char* team_kind();

}  // namespace pagedrt
