// tools/mma_order_probe.cu — does Hopper's wgmma sum a bf16 product into fp32
// bit for bit as mma.sync does? (Issue 22: a batch-invariant GEMM on wgmma
// could then share its order of sums with the mma.sync GEMV.)
//
// S (64 x 128) = Q (64 x 128) K (128 x 128)^T, k = 128 as 8 steps of 16,
// three ways: one wgmma m64n128k16 chain (both operands K-major in shared
// memory, 128-byte swizzle, as wgmma_probe.cu and the prefill kernels lay
// them out); mma.sync m16n8k16 chains over the same k16 steps in the same
// order (4 warps of 16 rows, 16 tiles of 8 columns); and a float64 host
// product. Prints how many of the 8,192 values differ between the two GPU
// forms (0: the same bits) and each form's largest error.
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

__global__ void probe(const __nv_bfloat16* Q, const __nv_bfloat16* K, float* S_wgmma, float* S_mma) {
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

  // mma.sync: warp w's rows 16w .., column tile j, the same k16 steps in order.
  for (int j = 0; j < 16; ++j) {
    float d[4] = {0.f, 0.f, 0.f, 0.f};
    const __nv_bfloat16* qa = Q + (16 * warp + g) * 128;
    const __nv_bfloat16* qb = qa + 8 * 128;
    const __nv_bfloat16* kb = K + (8 * j + g) * 128;
    for (int k = 0; k < 8; ++k) {
      const int c = 16 * k + 2 * t;
      const uint32_t a[4] = {pair(qa + c), pair(qb + c), pair(qa + c + 8), pair(qb + c + 8)};
      mma_bf16(d, a, pair(kb + c), pair(kb + c + 8));
    }
    for (int e = 0; e < 4; ++e) S_mma[(16 * warp + g + 8 * (e >> 1)) * 128 + 8 * j + 2 * t + (e & 1)] = d[e];
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
  float *dw, *dm;
  cudaMalloc(&dq, n * 2);
  cudaMalloc(&dk, n * 2);
  cudaMalloc(&dw, 64 * 128 * 4);
  cudaMalloc(&dm, 64 * 128 * 4);
  cudaMemcpy(dq, hq, n * 2, cudaMemcpyHostToDevice);
  cudaMemcpy(dk, hk, n * 2, cudaMemcpyHostToDevice);
  cudaFuncSetAttribute(probe, cudaFuncAttributeMaxDynamicSharedMemorySize, 60000);
  probe<<<1, 128, 60000>>>(dq, dk, dw, dm);
  const cudaError_t err = cudaDeviceSynchronize();
  printf("kernel: %s\n", cudaGetErrorString(err));
  static float W[64 * 128], M[64 * 128];
  cudaMemcpy(W, dw, sizeof W, cudaMemcpyDeviceToHost);
  cudaMemcpy(M, dm, sizeof M, cudaMemcpyDeviceToHost);
  int differ = 0;
  double ew = 0, em = 0, most = 0;
  for (int i = 0; i < 64; ++i)
    for (int j = 0; j < 128; ++j) {
      double r = 0;
      for (int d = 0; d < 128; ++d) r += double(fq[i * 128 + d]) * fk[j * 128 + d];
      ew = fmax(ew, fabs(r - W[i * 128 + j]));
      em = fmax(em, fabs(r - M[i * 128 + j]));
      most = fmax(most, fabs(r));
      differ += std::memcmp(&W[i * 128 + j], &M[i * 128 + j], 4) != 0;
    }
  printf("wgmma vs mma.sync: %d of %d values differ; largest error wgmma %.3g, mma.sync %.3g (max |S| %.3g)\n",
         differ, 64 * 128, ew, em, most);
  return 0;
}
