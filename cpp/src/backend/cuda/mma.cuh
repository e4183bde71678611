// backend/cuda/mma.cuh — the tensor-core and asynchronous-copy instructions
// the attention kernels are written in (sm_80+ PTX: cp.async, ldmatrix,
// mma.sync m16n8k16 bf16 -> fp32), and the swizzled tile layout they share.
//
// Fragments of mma.m16n8k16 (lane = threadIdx.x % 32, r = lane / 4, c = (lane % 4) * 2):
//   A (16 x 16, row-major)  a[0]: (r, c..c+1)  a[1]: (r+8, c..c+1)  a[2]: (r, c+8..)  a[3]: (r+8, c+8..)
//   B (16 x 8, "col")       b[0]: (k = c..c+1, n = r)                b[1]: (k = c+8.., n = r)
//   C (16 x 8, fp32)        c[0..1]: (r, c..c+1)                     c[2..3]: (r+8, c..c+1)
// Two bf16 of a register: the lower column in the low half.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace pagedrt::cuda {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared without registers; src_bytes 0 writes zeros
// (and reads nothing).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Four 8 x 8 bf16 matrices from shared memory: lanes 8j .. 8j+7 give the
// addresses of matrix j's rows (16 bytes each); r[j] is this lane's part of
// matrix j (row lane / 4, columns (lane % 4) * 2 ..; .trans: transposed).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row)));
}

// d += a b (m16n8k16, fp32 accumulators): bf16 inputs, or fp16 with kF16.
#define PAGEDRT_MMA_16816(T)                                                                              \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." T "." T ".f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, " \
               "{%8, %9}, {%0, %1, %2, %3};\n"                                                           \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                           \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1))
template <bool kF16 = false>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (kF16)
    PAGEDRT_MMA_16816("f16");
  else
    PAGEDRT_MMA_16816("bf16");
}
#undef PAGEDRT_MMA_16816
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  mma_16816(d, a, b0, b1);
}
// The same with A's four registers given one by one, as plain asm (ptxas may
// move it among other work): the GEMV's instruction (gemv.cu) and
// InvariantGemm's, which must sum alike (invariant_gemm.hpp).
__device__ __forceinline__ void mma_bf16(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// An 8 x 8 matrix of 16-bit values held as ldmatrix and the C fragments hold
// it (lane / 4's row, columns (lane % 4) * 2 ..): this lane's part of its
// transpose, in the same layout (sm_75+).
__device__ __forceinline__ uint32_t movmatrix_trans(uint32_t x) {
  uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}

constexpr float kLog2e = 1.4426950408889634f;

// 2^x in one MUFU.EX2, subnormal results flushed to zero (exp2f keeps them, at
// extra instructions an element); -inf -> 0.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Two floats as the fp16 pair of one register (lo in the low half).
__device__ __forceinline__ uint32_t pack_f16x2(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// Two floats as the bf16 pair of one register (lo in the low half).
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// A tile of rows of D bf16 in shared memory, swizzled: 16-byte chunk c of
// row r sits at chunk c ^ (r % 8), so that the 8 rows an ldmatrix reads at
// one column (and the rows cp.async fills) fall in 8 different bank groups.
// Element offset of chunk c of row r:
template <int D>
__device__ __forceinline__ int swizzle(int r, int c) {
  return r * D + ((c ^ (r & 7)) << 3);
}

}  // namespace pagedrt::cuda
