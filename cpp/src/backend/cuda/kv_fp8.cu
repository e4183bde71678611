// backend/cuda/kv_fp8.cu — the fp8 KV cache's own kernels (paged_kv.hpp's
// Fp8Kv): quantizing the step's new k and v rows into their slots, and
// dequantizing whole blocks to bf16 for the prefill kernels.
#include "backend/cuda/elementwise.cuh"
#include "backend/cuda/kernels.cuh"
#include "backend/cuda/kv_fp8.cuh"
#include "backend/cuda/launch.cuh"

#include <algorithm>

namespace pagedrt::cuda {
namespace {

// Row w of the token's [k heads | v heads] into its slot (store_kv_row).
template <typename T, int D>
__device__ void quantize_row(const T* qkv, int64_t t, int64_t slot, int H, int w, int lane, const Fp8Kv& kv) {
  const int Hkv = kv.num_kv_heads;
  const bool is_v = w >= Hkv;
  const T* x = qkv + t * int64_t(H + 2 * Hkv) * D + int64_t(H + w) * D;
  float v[D / 32];
#pragma unroll
  for (int i = 0; i < D / 32; ++i) v[i] = to_f(x[lane * (D / 32) + i]);
  store_kv_row<D>(v, lane, kv, is_v ? kv.v : kv.k, slot, is_v ? w - Hkv : w);
}

// grid (n tokens), block 32 x min(2 Hkv, 32): warp w quantizes rows w, w +
// warps, ... of the token's [k heads | v heads] (rotated already) into its
// slot.
template <typename T, int D>
__global__ void quantize_kv_kernel(const T* qkv, const int64_t* slots, int H, Fp8Kv kv) {
  pdl_trigger();
  pdl_wait();
  const int64_t t = blockIdx.x, slot = slots[t];
  if (slot < 0) return;
  const int Hkv = kv.num_kv_heads, lane = threadIdx.x % 32;
  for (int w = threadIdx.x / 32; w < 2 * Hkv; w += blockDim.x / 32) quantize_row<T, D>(qkv, t, slot, H, w, lane, kv);
}

// grid (P, 2), block 256: block src[s] of the K (y = 0) or V cache to block s
// of out (P, block_size, Hkv, D) bf16, 8 elements a thread.
template <int D>
__global__ void dequantize_blocks_kernel(Fp8Kv kv, const int32_t* src, bf16* k_out, bf16* v_out) {
  pdl_trigger();
  pdl_wait();
  const int64_t s = blockIdx.x, b = src[s];
  const uint8_t* base = blockIdx.y == 0 ? kv.k : kv.v;
  bf16* out = (blockIdx.y == 0 ? k_out : v_out) + s * int64_t(kv.block_size) * kv.num_kv_heads * D;
  const int rows = kv.block_size * kv.num_kv_heads;  // (o, h) rows of D
  for (int i = threadIdx.x; i < rows * (D / 8); i += blockDim.x) {
    const int r = i / (D / 8), c = i % (D / 8), o = r / kv.num_kv_heads, h = r % kv.num_kv_heads;
    const uint2 codes = *reinterpret_cast<const uint2*>(base + kv.code_offset(b, o, h) + c * 8);
    const float scale = kv_row_scale(static_cast<int8_t>(base[kv.exp_offset(b, o, h)]));
    reinterpret_cast<uint4*>(out + int64_t(r) * D)[c] = e4m3_x8(codes, scale);
  }
}

}  // namespace

template <typename T>
void quantize_kv(const T* qkv, const int64_t* slots, int64_t n, int H, const Fp8Kv& kv, cudaStream_t s) {
  if (n == 0) return;
  const unsigned threads = 32u * static_cast<unsigned>(std::min(2 * kv.num_kv_heads, 32));
  if (kv.head_dim == 128)
    launch(quantize_kv_kernel<T, 128>, dim3(static_cast<unsigned>(n)), threads, 0, s, qkv, slots, H, kv);
  else
    launch(quantize_kv_kernel<T, 64>, dim3(static_cast<unsigned>(n)), threads, 0, s, qkv, slots, H, kv);
}
template void quantize_kv<bf16>(const bf16*, const int64_t*, int64_t, int, const Fp8Kv&, cudaStream_t);
template void quantize_kv<float>(const float*, const int64_t*, int64_t, int, const Fp8Kv&, cudaStream_t);

void dequantize_kv_blocks(const Fp8Kv& kv, const int32_t* src, int64_t num, bf16* k_out, bf16* v_out,
                          cudaStream_t s) {
  if (num == 0) return;
  const dim3 grid(static_cast<unsigned>(num), 2);
  if (kv.head_dim == 128)
    launch(dequantize_blocks_kernel<128>, grid, 256, 0, s, kv, src, k_out, v_out);
  else
    launch(dequantize_blocks_kernel<64>, grid, 256, 0, s, kv, src, k_out, v_out);
}

}  // namespace pagedrt::cuda
