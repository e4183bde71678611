// backend/cuda/tma.cuh — Hopper's tensor memory accelerator (TMA: tiles of a
// global tensor copied into shared memory by one instruction), the
// shared-memory barriers that count its bytes (mbarrier), named barriers and
// register reallocation between warpgroups (sm_90 / sm_90a PTX).
//
// The pattern (attention_prefill_ws.cu): a producer thread waits until a
// stage of shared memory is free (its "empty" barrier), tells the stage's
// "full" barrier how many bytes are coming (arrive.expect_tx) and issues the
// TMA copies, which count their bytes down on that barrier; consumers wait on
// "full", read the stage, and arrive on "empty". A barrier completes a phase
// when its arrivals and bytes are all in; waits name the phase by its parity.
#pragma once

#include <cuda.h>  // CUtensorMap (a 128-byte opaque descriptor, made on the host)

#include <cstdint>

namespace pagedrt::cuda {

// The instructions exist on sm_90 (setmaxnreg on sm_90a): elsewhere (other
// architectures and nvcc's host pass) the bodies are empty, and a kernel
// using them guards its own body with __CUDA_ARCH_FEAT_SM90_ALL.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define PAGEDRT_TMA_ASM(...) asm volatile(__VA_ARGS__)
#else
#define PAGEDRT_TMA_ASM(...) (void)0
#endif

// An mbarrier (8 bytes of shared memory at `bar`) expecting `count` arrivals a phase.
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  PAGEDRT_TMA_ASM("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// Makes initialized barriers visible to the TMA unit (then a block barrier
// makes them visible to the other threads).
__device__ __forceinline__ void mbar_fence_init() {
  PAGEDRT_TMA_ASM("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
// One arrival, from the threads where `lane` == 0 (a predicate, not a branch:
// the callers have wgmma in flight, which a divergent path would serialize).
__device__ __forceinline__ void mbar_arrive_lane0(uint32_t bar, int lane) {
  PAGEDRT_TMA_ASM(
      "{\n.reg .pred p;\n.reg .b64 state;\nsetp.eq.s32 p, %1, 0;\n"
      "@p mbarrier.arrive.shared::cta.b64 state, [%0];\n}\n" ::"r"(bar),
      "r"(lane)
      : "memory");
}
// One arrival that also announces `bytes` of TMA copies to come this phase.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  PAGEDRT_TMA_ASM("{\n.reg .b64 state;\nmbarrier.arrive.expect_tx.shared::cta.b64 state, [%0], %1;\n}\n" ::"r"(bar),
                  "r"(bytes)
                  : "memory");
}
// Waits until the phase of parity `parity` (0, 1, 0, ... from the start) is complete.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  PAGEDRT_TMA_ASM(
      "{\n.reg .pred done;\n"
      "WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT;\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}

// A 3-D box of `map`'s tensor at coordinates (c0, c1, c2) (innermost first)
// into shared memory at dst (1,024-aligned for the 128-byte swizzle), its
// bytes counted down on barrier `bar`. Boxes past the tensor's bounds read as
// zeros, and their bytes count all the same.
__device__ __forceinline__ void tma_load_3d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0, int c1,
                                            int c2) {
  PAGEDRT_TMA_ASM(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5}], "
      "[%2];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1), "r"(c2)
      : "memory");
}

// A 2-D box at coordinates (c0, c1) (innermost first), as tma_load_3d.
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0, int c1) {
  PAGEDRT_TMA_ASM(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];\n" ::"r"(
          dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1)
      : "memory");
}

// The same box copied into the shared memory of every block of the cluster
// in cta_mask (bit r: rank r), at the same offset dst, each block's bytes
// counted down on its own barrier at offset bar.
__device__ __forceinline__ void tma_load_2d_multicast(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0, int c1,
                                                      uint16_t cta_mask) {
  PAGEDRT_TMA_ASM(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster [%0], [%1, {%3, "
      "%4}], [%2], %5;\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1), "h"(cta_mask)
      : "memory");
}

// Thread block clusters: this block's rank, a barrier of all the cluster's
// threads (release / acquire: shared-memory writes before it, barrier
// initializations included, are seen by every block after it), and one
// arrival on the barrier at offset `bar` in block `cta`'s shared memory from
// the threads where `lane` == 0 (predicated, as mbar_arrive_lane0).
__device__ __forceinline__ uint32_t cluster_rank() {
  uint32_t r = 0;
  PAGEDRT_TMA_ASM("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  return r;
}
__device__ __forceinline__ void cluster_sync() {
  PAGEDRT_TMA_ASM("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void mbar_arrive_cluster_lane0(uint32_t bar, uint32_t cta, int lane) {
  PAGEDRT_TMA_ASM(
      "{\n.reg .pred p;\n.reg .b32 remote;\nsetp.eq.s32 p, %2, 0;\n"
      "mapa.shared::cluster.u32 remote, %0, %1;\n"
      "@p mbarrier.arrive.release.cluster.shared::cluster.b64 _, [remote];\n}\n" ::"r"(bar),
      "r"(cta), "r"(lane)
      : "memory");
}

// Named barrier `id` (1 .. 15; 0 is __syncthreads) of `threads` threads (a
// multiple of 32): sync waits for all of them, arrive counts without waiting.
__device__ __forceinline__ void named_bar_sync(int id, int threads) {
  PAGEDRT_TMA_ASM("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_bar_arrive(int id, int threads) {
  PAGEDRT_TMA_ASM("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// A warpgroup gives registers back to the SM's pool (dec) or takes them
// (inc), so that a loading warpgroup can run lean beside computing ones.
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
  PAGEDRT_TMA_ASM("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
  PAGEDRT_TMA_ASM("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}

#undef PAGEDRT_TMA_ASM

}  // namespace pagedrt::cuda
