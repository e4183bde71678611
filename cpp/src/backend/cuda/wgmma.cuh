// backend/cuda/wgmma.cuh — Hopper's warpgroup tensor-core instructions
// (sm_90a PTX: wgmma.mma_async) and the shared-memory layout they read.
//
// A warpgroup is 4 consecutive warps (128 threads) that issue one wgmma
// together; it multiplies a 64-row A (shared memory or registers) by an
// N-column B (shared memory) into fp32 accumulators held by the 128 threads,
// asynchronously: fence, issue, commit, then wait before reading the result.
//
// Accumulator of m64nNk16 (warp w of the group, lane = threadIdx.x % 32,
// g = lane / 4, c = (lane % 4) * 2), per 8-column block j = 0 .. N/8 - 1:
//   d[4j + 0..1]: row 16w + g,     columns 8j + c .. c+1
//   d[4j + 2..3]: row 16w + g + 8, columns 8j + c .. c+1
// i.e. the C fragment of mma.sync m16n8 (mma.cuh) per warp and n-block. The
// A operand from registers is mma.sync's A fragment of the warp's 16 rows:
// so an accumulator's 16-column pair (blocks 2j, 2j + 1), packed to bf16, is
// the A operand of a k-step (FlashAttention's P fed to P V).
//
// Shared-memory operands, bf16, 128-byte swizzle: a tile is stored as
// "atoms" of 8 rows of 128 bytes (64 elements), 1,024-byte aligned, and the
// 16-byte chunk c of row r of an atom sits at chunk c ^ (r % 8).
//   K-major (the contiguous 64 elements run along k: Q and K of Q K^T): rows
//     are m or n, atoms stacked along them every 1,024 bytes (SBO); a k-step
//     of 16 starts 32 bytes further into the same rows.
//   MN-major (the contiguous elements run along n: V of P V, stored as
//     [key][dim]): rows are k, 8 of them an atom (SBO = 1,024 bytes to the
//     next 8 keys); the next 64 columns of n are LBO bytes further.
#pragma once

#include <cstdint>

namespace pagedrt::cuda {

// A shared-memory matrix descriptor: start address, leading and stride byte
// offsets (all >> 4), 128-byte swizzle (mode 1 in bits 62-63).
__device__ __forceinline__ uint64_t gmma_desc(uint32_t smem_byte_addr, uint32_t lbo, uint32_t sbo) {
  return uint64_t((smem_byte_addr >> 4) & 0x3FFF) | (uint64_t((lbo >> 4) & 0x3FFF) << 16) |
         (uint64_t((sbo >> 4) & 0x3FFF) << 32) | (uint64_t(1) << 62);
}

// Byte offset of 16-byte chunk c (0 .. 15) of row r in a tile of D = 128
// bf16 columns and `rows` rows stored as two halves of 64 columns (k 0-63,
// then 64-127), each `rows` 128-byte rows in swizzle atoms.
__device__ __forceinline__ uint32_t tile_offset(int r, int c, int rows) {
  return uint32_t((c >> 3) * rows * 128 + r * 128 + (((c & 7) ^ (r & 7)) << 4));
}

// The instructions exist on sm_90a only: elsewhere (other architectures, and
// nvcc's host pass) these bodies are empty, and a kernel using them must guard
// its own body with __CUDA_ARCH_FEAT_SM90_ALL (attention_prefill_wgmma.cu).
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define PAGEDRT_SM90A_ASM(...) asm volatile(__VA_ARGS__)
#else
#define PAGEDRT_SM90A_ASM(...) (void)0
#endif

__device__ __forceinline__ void wgmma_fence() { PAGEDRT_SM90A_ASM("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { PAGEDRT_SM90A_ASM("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
// Waits until at most N of the warpgroup's committed groups are in flight.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  PAGEDRT_SM90A_ASM("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Shared memory written by ordinary stores or cp.async, made visible to the
// async proxy that wgmma reads through (then a barrier).
__device__ __forceinline__ void fence_proxy_async() { PAGEDRT_SM90A_ASM("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// Keeps the compiler from moving accesses of an accumulator across the
// asynchronous instructions that own it.
template <int N>
__device__ __forceinline__ void wgmma_hold(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
// The same for an A operand in registers (it is read until the wait).
template <int N>
__device__ __forceinline__ void wgmma_hold(uint32_t (&a)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i)
    asm volatile("" : "+r"(a[i][0]), "+r"(a[i][1]), "+r"(a[i][2]), "+r"(a[i][3])::"memory");
}

// The 64 fp32 accumulators of an m64n128 product as asm operands %0 .. %63.
#define PAGEDRT_WGMMA_D64_REGS \
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define PAGEDRT_WGMMA_D64(d) \
        "+f"((d)[0]), "+f"((d)[1]), "+f"((d)[2]), "+f"((d)[3]), "+f"((d)[4]), "+f"((d)[5]), "+f"((d)[6]), "+f"((d)[7]), \
        "+f"((d)[8]), "+f"((d)[9]), "+f"((d)[10]), "+f"((d)[11]), "+f"((d)[12]), "+f"((d)[13]), "+f"((d)[14]), "+f"((d)[15]), \
        "+f"((d)[16]), "+f"((d)[17]), "+f"((d)[18]), "+f"((d)[19]), "+f"((d)[20]), "+f"((d)[21]), "+f"((d)[22]), "+f"((d)[23]), \
        "+f"((d)[24]), "+f"((d)[25]), "+f"((d)[26]), "+f"((d)[27]), "+f"((d)[28]), "+f"((d)[29]), "+f"((d)[30]), "+f"((d)[31]), \
        "+f"((d)[32]), "+f"((d)[33]), "+f"((d)[34]), "+f"((d)[35]), "+f"((d)[36]), "+f"((d)[37]), "+f"((d)[38]), "+f"((d)[39]), \
        "+f"((d)[40]), "+f"((d)[41]), "+f"((d)[42]), "+f"((d)[43]), "+f"((d)[44]), "+f"((d)[45]), "+f"((d)[46]), "+f"((d)[47]), \
        "+f"((d)[48]), "+f"((d)[49]), "+f"((d)[50]), "+f"((d)[51]), "+f"((d)[52]), "+f"((d)[53]), "+f"((d)[54]), "+f"((d)[55]), \
        "+f"((d)[56]), "+f"((d)[57]), "+f"((d)[58]), "+f"((d)[59]), "+f"((d)[60]), "+f"((d)[61]), "+f"((d)[62]), "+f"((d)[63])

// d (+)= A B, m64n128k16: A (64 x 16) and B (16 x 128) from shared memory,
// both K-major; d is overwritten when accumulate == 0.
__device__ __forceinline__ void wgmma_m64n128_ss(float (&d)[64], uint64_t a, uint64_t b, int accumulate) {
  PAGEDRT_SM90A_ASM(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
      PAGEDRT_WGMMA_D64_REGS
      "}, %64, %65, p, 1, 1, 0, 0;\n}\n"
      : PAGEDRT_WGMMA_D64(d)
      : "l"(a), "l"(b), "r"(accumulate));
}

// The 128 fp32 accumulators of an m64n256 product as asm operands %0 .. %127.
#define PAGEDRT_WGMMA_D128_REGS \
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, " \
      "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, " \
      "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, " \
      "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, " \
      "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"

// d (+)= A B, m64n256k16: A (64 x 16) and B (16 x 256) from shared memory,
// both K-major; d is overwritten when accumulate == 0.
__device__ __forceinline__ void wgmma_m64n256_ss(float (&d)[128], uint64_t a, uint64_t b, int accumulate) {
  PAGEDRT_SM90A_ASM(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {"
      PAGEDRT_WGMMA_D128_REGS
      "}, %128, %129, p, 1, 1, 0, 0;\n}\n"
      : PAGEDRT_WGMMA_D64(d), PAGEDRT_WGMMA_D64((d) + 64)
      : "l"(a), "l"(b), "r"(accumulate));
}

// d += A B, m64n128k16: A (64 x 16) from registers (mma.sync's A fragment of
// each warp's 16 rows), B (16 x 128) from shared memory, MN-major.
__device__ __forceinline__ void wgmma_m64n128_rs_bmn(float (&d)[64], const uint32_t (&a)[4], uint64_t b) {
  PAGEDRT_SM90A_ASM(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
      PAGEDRT_WGMMA_D64_REGS
      "}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
      : PAGEDRT_WGMMA_D64(d)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
}

#undef PAGEDRT_SM90A_ASM
#undef PAGEDRT_WGMMA_D64_REGS
#undef PAGEDRT_WGMMA_D128_REGS
#undef PAGEDRT_WGMMA_D64

}  // namespace pagedrt::cuda
