// tools/mma_order_probe.cu — does Hopper's wgmma sum a bf16 product into fp32
// bit for bit as mma.sync does? (Issue 22: a batch-invariant GEMM on wgmma
// could then share its order of sums with the mma.sync GEMV.)
//
// S (64 x 128) = Q (64 x 128) K (128 x 128)^T, k = 128 as 8 steps of 16,
// five ways: one wgmma m64n128k16 chain (both operands K-major in shared
// memory, 128-byte swizzle, as wgmma_probe.cu and the prefill kernels lay
// them out); mma.sync m16n8k16 chains over the same k16 steps in the same
// order (4 warps of 16 rows, 16 tiles of 8 columns), each k at its natural
// place in the mma; mma.sync over the same k16 sets with the k placed in
// another order inside each mma ("permuted": lane t's registers take k
// 4t .. 4t + 3 of the step, where the natural form gives them 2t, 2t + 1,
// 2t + 8, 2t + 9), which is what a GEMV loading 8 bytes a lane per k16 would
// feed; the GEMV's grouping as invariant_gemm.hpp has it today ("gemv": a
// 32-k step's first mma takes k 8t .. 8t + 3 of every lane t, its second
// 8t + 4 .. 8t + 7); and a float64 host product. Prints how many of the 8,192
// values of each mma.sync form differ from wgmma's (0: the same bits) and
// each form's largest error. If "permuted" gives 0, a k16's sum does not
// depend on where its k sit inside the mma, and the GEMV can feed wgmma's
// k16 sets with two 8-byte loads a lane per 32 k (no exchange between
// lanes, the weights as stored).
//
//   nvcc -std=c++17 -arch=sm_90a -Icpp/src -o /tmp/mma_order_probe tools/mma_order_probe.cu && /tmp/mma_order_probe
#include <cuda_bf16.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "backend/cuda/mma.cuh"
#include "backend/cuda/wgmma.cuh"
using namespace pagedrt::cuda;

// Byte offset of (row r, 16-byte column c) in a K-major tile with the 128-byte swizzle (wgmma_probe.cu's).
__device__ uint32_t off(int r, int c, int rows) {
  return uint32_t((c >> 3) * rows * 128 + r * 128 + (((c & 7) ^ (r & 7)) << 4));
}

__device__ uint32_t pair(const __nv_bfloat16* p) { return *reinterpret_cast<const uint32_t*>(p); }

__global__ void probe(const __nv_bfloat16* Q, const __nv_bfloat16* K, float* S_wgmma, float* S_mma, float* S_perm,
                      float* S_gemv) {
  extern __shared__ unsigned char raw[];
  const uint32_t ra = smem_addr(raw), base = (ra + 1023) & ~1023u;
  unsigned char* sm = raw + (base - ra);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  for (int i = tid; i < 64 * 16; i += 128)
    *reinterpret_cast<uint4*>(sm + off(i / 16, i % 16, 64)) = *reinterpret_cast<const uint4*>(Q + (i / 16) * 128 + (i % 16) * 8);
  for (int i = tid; i < 128 * 16; i += 128)
    *reinterpret_cast<uint4*>(sm + 16384 + off(i / 16, i % 16, 128)) =
        *reinterpret_cast<const uint4*>(K + (i / 16) * 128 + (i % 16) * 8);
  fence_proxy_async();
  __syncthreads();

  float s[64];
  for (int i = 0; i < 64; ++i) s[i] = 0.f;
  wgmma_fence();
  for (int k = 0; k < 8; ++k)
    wgmma_m64n128_ss(s, gmma_desc(base + (k >> 2) * 8192 + (k & 3) * 32, 16, 1024),
                     gmma_desc(base + 16384 + (k >> 2) * 16384 + (k & 3) * 32, 16, 1024), 1);
  wgmma_commit();
  wgmma_wait<0>();
  wgmma_hold(s);
  for (int j = 0; j < 16; ++j)
    for (int e = 0; e < 4; ++e)
      S_wgmma[(16 * warp + g + 8 * (e >> 1)) * 128 + 8 * j + 2 * t + (e & 1)] = s[4 * j + e];

  // mma.sync: warp w's rows 16w .., column tile j, the same k16 steps in order,
  // each form's k as `at` places them: lane t's first register pair from k
  // at(step), its second from at(step) + second.
  for (int j = 0; j < 16; ++j) {
    const __nv_bfloat16* qa = Q + (16 * warp + g) * 128;
    const __nv_bfloat16* qb = qa + 8 * 128;
    const __nv_bfloat16* kb = K + (8 * j + g) * 128;
    auto chain = [&](auto at, int second, float* out) {
      float d[4] = {0.f, 0.f, 0.f, 0.f};
      for (int k = 0; k < 8; ++k) {
        const int c = at(k);
        const uint32_t a[4] = {pair(qa + c), pair(qb + c), pair(qa + c + second), pair(qb + c + second)};
        mma_bf16(d, a, pair(kb + c), pair(kb + c + second));
      }
      for (int e = 0; e < 4; ++e) out[(16 * warp + g + 8 * (e >> 1)) * 128 + 8 * j + 2 * t + (e & 1)] = d[e];
    };
    chain([&](int k) { return 16 * k + 2 * t; }, 8, S_mma);  // natural: k 2t, 2t + 1 and 2t + 8, 2t + 9
    chain([&](int k) { return 16 * k + 4 * t; }, 2, S_perm);  // the same k16 sets, k 4t .. 4t + 3 in lane t
    // The GEMV's sets: per 32 k, k 8t .. 8t + 3 of every lane, then 8t + 4 .. 8t + 7.
    chain([&](int k) { return 32 * (k / 2) + 8 * t + 4 * (k % 2); }, 2, S_gemv);
  }
}

int main() {
  const int n = 128 * 128;
  auto* hq = new __nv_bfloat16[n];
  auto* hk = new __nv_bfloat16[n];
  auto* fq = new float[n];
  auto* fk = new float[n];
  srand(1);
  // Values of mixed magnitude, so that rounding inside the sum matters.
  auto rnd = [] { return (rand() % 2001 - 1000) / 1000.0f * std::ldexp(1.0f, rand() % 9 - 4); };
  for (int i = 0; i < n; ++i) {
    hq[i] = __float2bfloat16(rnd()), fq[i] = __bfloat162float(hq[i]);
    hk[i] = __float2bfloat16(rnd()), fk[i] = __bfloat162float(hk[i]);
  }
  __nv_bfloat16 *dq, *dk;
  float* d[4];  // wgmma, mma.sync natural, permuted, the GEMV's sets
  cudaMalloc(&dq, n * 2);
  cudaMalloc(&dk, n * 2);
  for (float*& p : d) cudaMalloc(&p, 64 * 128 * 4);
  cudaMemcpy(dq, hq, n * 2, cudaMemcpyHostToDevice);
  cudaMemcpy(dk, hk, n * 2, cudaMemcpyHostToDevice);
  cudaFuncSetAttribute(probe, cudaFuncAttributeMaxDynamicSharedMemorySize, 60000);
  probe<<<1, 128, 60000>>>(dq, dk, d[0], d[1], d[2], d[3]);
  const cudaError_t err = cudaDeviceSynchronize();
  printf("kernel: %s\n", cudaGetErrorString(err));
  static float S[4][64 * 128];
  for (int f = 0; f < 4; ++f) cudaMemcpy(S[f], d[f], sizeof S[f], cudaMemcpyDeviceToHost);
  int differ[4] = {0, 0, 0, 0};
  double err_of[4] = {0, 0, 0, 0}, most = 0;
  for (int i = 0; i < 64; ++i)
    for (int j = 0; j < 128; ++j) {
      double r = 0;
      for (int e = 0; e < 128; ++e) r += double(fq[i * 128 + e]) * fk[j * 128 + e];
      most = fmax(most, fabs(r));
      for (int f = 0; f < 4; ++f) {
        err_of[f] = fmax(err_of[f], fabs(r - S[f][i * 128 + j]));
        differ[f] += std::memcmp(&S[0][i * 128 + j], &S[f][i * 128 + j], 4) != 0;
      }
    }
  const char* names[4] = {"wgmma", "mma.sync natural", "mma.sync permuted", "mma.sync gemv sets"};
  printf("max |S| %.3g; against wgmma, of %d values:\n", most, 64 * 128);
  for (int f = 0; f < 4; ++f) printf("  %-20s %5d differ, largest error %.3g\n", names[f], differ[f], err_of[f]);
  return 0;
}
