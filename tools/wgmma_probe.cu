// tools/wgmma_probe.cu — checks the two wgmma forms the Hopper prefill kernel
// uses (cpp/src/backend/cuda/wgmma.cuh) against a host product: S = Q K^T
// (64 x 128, D = 128) with both operands K-major in shared memory, and O = P V
// with P from registers and V MN-major. Prints the largest errors.
//
//   nvcc -std=c++17 -arch=sm_90a -Icpp/src -o /tmp/wgmma_probe tools/wgmma_probe.cu && /tmp/wgmma_probe
#include <cstdio>
#include <cstdlib>
#include <cmath>
#include <cuda_bf16.h>
#include "backend/cuda/mma.cuh"
#include "backend/cuda/wgmma.cuh"
using namespace pagedrt::cuda;
__device__ uint32_t off(int r, int c, int rows) { return uint32_t((c >> 3) * rows * 128 + r * 128 + (((c & 7) ^ (r & 7)) << 4)); }
__global__ void probe(const __nv_bfloat16* Q, const __nv_bfloat16* K, const __nv_bfloat16* V, float* S, float* O) {
  extern __shared__ unsigned char raw[];
  uint32_t ra = smem_addr(raw), base = (ra + 1023) & ~1023u; unsigned char* sm = raw + (base - ra);
  int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  for (int idx = tid; idx < 64 * 16; idx += 128) { int r = idx / 16, c = idx % 16; *(uint4*)(sm + off(r, c, 64)) = *(const uint4*)(Q + r * 128 + c * 8); }
  for (int idx = tid; idx < 128 * 16; idx += 128) { int r = idx / 16, c = idx % 16;
    *(uint4*)(sm + 16384 + off(r, c, 128)) = *(const uint4*)(K + r * 128 + c * 8);
    *(uint4*)(sm + 16384 + 32768 + off(r, c, 128)) = *(const uint4*)(V + r * 128 + c * 8); }
  fence_proxy_async(); __syncthreads();
  float s[64], o[64]; for (int i = 0; i < 64; ++i) s[i] = o[i] = 0;
  wgmma_fence();
  for (int k = 0; k < 8; ++k)
    wgmma_m64n128_ss(s, gmma_desc(base + (k >> 2) * 8192 + (k & 3) * 32, 16, 1024), gmma_desc(base + 16384 + (k >> 2) * 16384 + (k & 3) * 32, 16, 1024), k > 0);
  wgmma_commit(); wgmma_wait<0>(); wgmma_hold(s);
  int g = lane / 4, c = (lane % 4) * 2;
  for (int j = 0; j < 16; ++j) for (int e = 0; e < 4; ++e) S[(16 * warp + g + 8 * (e >> 1)) * 128 + 8 * j + c + (e & 1)] = s[4 * j + e];
  // P = S scaled down, bf16
  uint32_t pa[8][4];
  for (int j = 0; j < 8; ++j) { pa[j][0] = pack_bf16x2(s[8*j]*0.01f, s[8*j+1]*0.01f); pa[j][1] = pack_bf16x2(s[8*j+2]*0.01f, s[8*j+3]*0.01f);
    pa[j][2] = pack_bf16x2(s[8*j+4]*0.01f, s[8*j+5]*0.01f); pa[j][3] = pack_bf16x2(s[8*j+6]*0.01f, s[8*j+7]*0.01f); }
  wgmma_fence();
  for (int j = 0; j < 8; ++j) wgmma_m64n128_rs_bmn(o, pa[j], gmma_desc(base + 49152 + j * 16 * 128, 16384, 1024));
  wgmma_commit(); wgmma_wait<0>(); wgmma_hold(o);
  for (int j = 0; j < 16; ++j) for (int e = 0; e < 4; ++e) O[(16 * warp + g + 8 * (e >> 1)) * 128 + 8 * j + c + (e & 1)] = o[4 * j + e];
}
int main() {
  const int n = 128 * 128; __nv_bfloat16 *hq = new __nv_bfloat16[n], *hk = new __nv_bfloat16[n], *hv = new __nv_bfloat16[n];
  float *fq = new float[n], *fk = new float[n], *fv = new float[n];
  srand(1); auto rnd = [] { return (rand() % 2001 - 1000) / 1000.0f; };
  for (int i = 0; i < n; ++i) { hq[i] = __float2bfloat16(rnd()); fq[i] = __bfloat162float(hq[i]); hk[i] = __float2bfloat16(rnd()); fk[i] = __bfloat162float(hk[i]); hv[i] = __float2bfloat16(rnd()); fv[i] = __bfloat162float(hv[i]); }
  __nv_bfloat16 *dq, *dk, *dv; float *dS, *dO; cudaMalloc(&dq, n * 2); cudaMalloc(&dk, n * 2); cudaMalloc(&dv, n * 2); cudaMalloc(&dS, 64 * 128 * 4); cudaMalloc(&dO, 64 * 128 * 4);
  cudaMemcpy(dq, hq, n * 2, cudaMemcpyHostToDevice); cudaMemcpy(dk, hk, n * 2, cudaMemcpyHostToDevice); cudaMemcpy(dv, hv, n * 2, cudaMemcpyHostToDevice);
  cudaFuncSetAttribute(probe, cudaFuncAttributeMaxDynamicSharedMemorySize, 90000);
  probe<<<1, 128, 90000>>>(dq, dk, dv, dS, dO); cudaError_t err = cudaDeviceSynchronize(); printf("kernel: %s\n", cudaGetErrorString(err));
  float *S = new float[64 * 128], *O = new float[64 * 128]; cudaMemcpy(S, dS, 64 * 128 * 4, cudaMemcpyDeviceToHost); cudaMemcpy(O, dO, 64 * 128 * 4, cudaMemcpyDeviceToHost);
  double es = 0, ms = 0, eo = 0, mo = 0;
  static float P[64 * 128];
  for (int i = 0; i < 64; ++i) for (int j = 0; j < 128; ++j) { double r = 0; for (int d = 0; d < 128; ++d) r += fq[i * 128 + d] * fk[j * 128 + d];
    es = fmax(es, fabs(r - S[i * 128 + j])); ms = fmax(ms, fabs(r)); P[i * 128 + j] = __bfloat162float(__float2bfloat16(S[i * 128 + j] * 0.01f)); }
  for (int i = 0; i < 64; ++i) for (int d = 0; d < 128; ++d) { double r = 0; for (int j = 0; j < 128; ++j) r += P[i * 128 + j] * fv[j * 128 + d];
    eo = fmax(eo, fabs(r - O[i * 128 + d])); mo = fmax(mo, fabs(r)); }
  printf("S max err %.3g (max |S| %.3g)  O max err %.3g (max |O| %.3g)\n", es, ms, eo, mo);
  printf("S[0][0..3] %f %f %f %f\n", S[0], S[1], S[2], S[3]);
  return 0;
}
