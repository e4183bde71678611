// backend/cuda/kernels.cu — the small memory-bound kernels: conversions,
// embedding, RMSNorm (fused with the residual add), SiLU·mul, RoPE + KV
// append, row gathers and block copies. fp32 math everywhere.
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <type_traits>

#include "backend/cuda/block_reduce.cuh"
#include "backend/cuda/cuda_check.hpp"
#include "backend/cuda/elementwise.cuh"
#include "backend/cuda/fp8_rows.cuh"
#include "backend/cuda/kernels.cuh"
#include "backend/cuda/launch.cuh"
#include "backend/fp8.hpp"

namespace pagedrt::cuda {

namespace {
bool g_pdl = true;
}  // namespace
void set_pdl(bool on) { g_pdl = on; }
bool pdl_enabled() { return g_pdl; }

namespace {

int norm_threads(int64_t d) { return d >= 2048 ? 512 : d >= 512 ? 256 : 128; }
int blocks_for(int64_t n, int threads) {
  int64_t b = (n + threads - 1) / threads;
  return static_cast<int>(b > 65536 * 8 ? 65536 * 8 : (b < 1 ? 1 : b));
}

__global__ void convert_kernel(const void* src, int sk, void* dst, int dk, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    float v;
    if (sk == 0) v = static_cast<const float*>(src)[i];
    else if (sk == 1) v = __half2float(static_cast<const __half*>(src)[i]);
    else v = __bfloat162float(static_cast<const bf16*>(src)[i]);
    if (dk == 0) static_cast<float*>(dst)[i] = v;
    else if (dk == 1) static_cast<__half*>(dst)[i] = __float2half_rn(v);
    else static_cast<bf16*>(dst)[i] = __float2bfloat16_rn(v);
  }
}

// out (n, hidden) fp32 = table[ids - first]; zero rows for ids outside the
// table's `rows` (a vocabulary-parallel shard, model/tp_plan.hpp).
template <typename T>
__global__ void embedding_kernel(const T* table, int64_t hidden, int64_t first, int64_t rows, const int32_t* ids,
                                 float* out) {
  pdl_trigger();
  pdl_wait();
  const int64_t t = blockIdx.x;
  const int64_t id = int64_t(ids[t]) - first;
  float* dst = out + t * hidden;
  if (id < 0 || id >= rows) {
    for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) dst[i] = 0.0f;
    return;
  }
  const T* src = table + id * hidden;
  for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) dst[i] = to_f(src[i]);
}

template <typename Tin, typename Tout>
__global__ void rms_norm_kernel(const Tin* x, const float* w, float eps, int64_t d, Tout* out) {
  pdl_trigger();
  pdl_wait();
  const Tin* xr = x + blockIdx.x * d;
  Tout* o = out + blockIdx.x * d;
  float ss = 0.0f;
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
    const float v = to_f(xr[i]);
    ss += v * v;
  }
  ss = block_sum(ss);
  const float inv = 1.0f / sqrtf(ss / static_cast<float>(d) + eps);
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) o[i] = from_f<Tout>(w[i] * (to_f(xr[i]) * inv));
}

template <typename T>
__global__ void add_rms_norm_kernel(float* residual, const T* x, const float* w, float eps, int64_t d, T* out) {
  pdl_trigger();
  pdl_wait();
  float* r = residual + blockIdx.x * d;
  const T* xr = x + blockIdx.x * d;
  T* o = out + blockIdx.x * d;
  float ss = 0.0f;
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
    const float v = r[i] + to_f(xr[i]);
    r[i] = v;
    ss += v * v;
  }
  ss = block_sum(ss);
  const float inv = 1.0f / sqrtf(ss / static_cast<float>(d) + eps);
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) o[i] = from_f<T>(w[i] * (r[i] * inv));
}

// 4 consecutive elements as fp32: one 16-byte load of fp32, one 8-byte load of bf16.
__device__ __forceinline__ float4 load4(const float* p) { return *reinterpret_cast<const float4*>(p); }
__device__ __forceinline__ float4 load4(const bf16* p) {
  const uint2 u = *reinterpret_cast<const uint2*>(p);
  const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u.x));
  const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u.y));
  return make_float4(a.x, a.y, b.x, b.y);
}
__device__ __forceinline__ void store4(float* p, float4 v) { *reinterpret_cast<float4*>(p) = v; }
__device__ __forceinline__ void store4(bf16* p, float4 v) {
  const __nv_bfloat162 a = __floats2bfloat162_rn(v.x, v.y), b = __floats2bfloat162_rn(v.z, v.w);
  uint2 u;
  u.x = *reinterpret_cast<const uint32_t*>(&a);
  u.y = *reinterpret_cast<const uint32_t*>(&b);
  *reinterpret_cast<uint2*>(p) = u;
}

// v as bf16 stores it, back in fp32.
__device__ __forceinline__ float4 as_stored_bf16(float4 v) {
  return make_float4(__bfloat162float(__float2bfloat16_rn(v.x)), __bfloat162float(__float2bfloat16_rn(v.y)),
                     __bfloat162float(__float2bfloat16_rn(v.z)), __bfloat162float(__float2bfloat16_rn(v.w)));
}

// RMSNorm for d % 4 == 0 and d <= 4 * kVecs * blockDim, fused with the
// residual add when kAdd (residual += x, then the residual is normalized;
// Tin = Tout = T) or of x alone (residual unused). Each thread keeps its kVecs
// 4-element pieces of the row in registers, so every input is read once, in
// one round trip (batch-1 decode: ~2x faster than the strided kernels above,
// which read the row twice). kQuant (Tout bf16): the row's bf16 values also
// as e4m3 codes with the row's scale, as quantize_act_rows makes them from
// the stored row (the same max, the same quotients), one kernel fewer before
// an fp8 GEMM.
template <typename Tin, typename Tout, int kVecs, bool kAdd, bool kQuant>
__global__ void norm_vec_kernel(float* residual, const Tin* x, const float* w, float eps, int d, Tout* out,
                                Fp8Out f8) {
  pdl_trigger();
  const int64_t base = int64_t(blockIdx.x) * d;
  const int n4 = d / 4;
  float4 v[kVecs], g[kVecs];
#pragma unroll
  for (int k = 0; k < kVecs; ++k) {  // the weights depend on no kernel: loaded before the wait
    const int i = threadIdx.x + k * blockDim.x;
    if (i < n4) g[k] = load4(w + 4 * i);
  }
  pdl_wait();
  float ss = 0.0f;
#pragma unroll
  for (int k = 0; k < kVecs; ++k) {
    const int i = threadIdx.x + k * blockDim.x;
    if (i < n4) {
      float4 a = load4(x + base + 4 * i);
      if constexpr (kAdd) {
        const float4 r = load4(residual + base + 4 * i);
        a.x += r.x, a.y += r.y, a.z += r.z, a.w += r.w;
        store4(residual + base + 4 * i, a);
      }
      v[k] = a;
      ss += a.x * a.x + a.y * a.y + a.z * a.z + a.w * a.w;
    }
  }
  ss = block_sum(ss);
  const float inv = 1.0f / sqrtf(ss / static_cast<float>(d) + eps);
  float amax = 0.0f;
#pragma unroll
  for (int k = 0; k < kVecs; ++k) {
    const int i = threadIdx.x + k * blockDim.x;
    if (i < n4) {
      const float4 y = make_float4(g[k].x * (v[k].x * inv), g[k].y * (v[k].y * inv), g[k].z * (v[k].z * inv),
                                   g[k].w * (v[k].w * inv));
      store4(out + base + 4 * i, y);
      if constexpr (kQuant) {  // the values as stored
        const float4 r = as_stored_bf16(y);
        v[k] = r;
        amax = fmaxf(amax, fmaxf(fmaxf(fabsf(r.x), fabsf(r.y)), fmaxf(fabsf(r.z), fabsf(r.w))));
      }
    }
  }
  if constexpr (kQuant) {
    const float sc = e4m3_row_scale(block_max(amax));
    if (threadIdx.x == 0) f8.scale[blockIdx.x] = sc;
#pragma unroll
    for (int k = 0; k < kVecs; ++k) {
      const int i = threadIdx.x + k * blockDim.x;
      if (i < n4) *reinterpret_cast<uint32_t*>(f8.q + base + 4 * i) = codes4(v[k].x, v[k].y, v[k].z, v[k].w, sc);
    }
  }
}

// Launches norm_vec_kernel where it applies (one block per row); false where
// not. With f8.q set (and Tout bf16) the codes too.
template <typename Tin, typename Tout, bool kAdd>
bool launch_norm_vec(float* residual, const Tin* x, const float* w, float eps, int64_t n, int64_t d, Tout* out,
                     cudaStream_t s, Fp8Out f8) {
  const int64_t n4 = d / 4;
  if (d % 4 != 0 || n4 > 4 * 1024) return false;
  const int vecs = n4 <= 1024 ? 1 : n4 <= 2048 ? 2 : 4;
  const int threads = static_cast<int>(((n4 + vecs - 1) / vecs + 31) / 32 * 32);
  const dim3 grid(static_cast<unsigned>(n));
  auto go = [&](auto vecs_c, auto quant_c) {
    launch(norm_vec_kernel<Tin, Tout, decltype(vecs_c)::value, kAdd, decltype(quant_c)::value>, grid, threads, 0, s,
           residual, x, w, eps, int(d), out, f8);
  };
  auto with_vecs = [&](auto quant_c) {
    if (vecs == 1) go(std::integral_constant<int, 1>{}, quant_c);
    else if (vecs == 2) go(std::integral_constant<int, 2>{}, quant_c);
    else go(std::integral_constant<int, 4>{}, quant_c);
  };
  if constexpr (std::is_same_v<Tout, bf16>) {
    if (f8.q != nullptr) {
      with_vecs(std::true_type{});
      return true;
    }
  }
  with_vecs(std::false_type{});
  return true;
}

// embedding_kernel's, 4 elements a thread (hidden % 4 == 0).
template <typename T>
__global__ void embedding_vec_kernel(const T* table, int hidden, int64_t first, int64_t rows, const int32_t* ids,
                                     float* out) {
  pdl_trigger();
  pdl_wait();
  const int64_t t = blockIdx.y;
  const int i = (blockIdx.x * blockDim.x + threadIdx.x) * 4;
  if (i >= hidden) return;
  const int64_t id = int64_t(ids[t]) - first;
  if (id < 0 || id >= rows)
    store4(out + t * hidden + i, make_float4(0.0f, 0.0f, 0.0f, 0.0f));
  else
    store4(out + t * hidden + i, load4(table + id * hidden + i));
}

template <typename T>
__global__ void add_kernel(float* residual, const T* x, int64_t n) {
  pdl_trigger();
  pdl_wait();
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    residual[i] += to_f(x[i]);
}

template <typename T>
__global__ void silu_mul_kernel(const T* gate_up, int64_t n, int64_t inter, T* out) {
  pdl_trigger();
  pdl_wait();
  for (int64_t row = blockIdx.y; row < n; row += gridDim.y) {
    const T* g = gate_up + row * 2 * inter;
    const T* u = g + inter;
    T* o = out + row * inter;
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < inter; i += int64_t(gridDim.x) * blockDim.x) {
      const float gv = to_f(g[i]);
      o[i] = from_f<T>(silu(gv) * to_f(u[i]));
    }
  }
}

// 16 bytes of T as floats and back (bf16: 8 elements, fp32: 4).
template <typename T>
constexpr int kVec16 = 16 / int(sizeof(T));
__device__ __forceinline__ void load16(const float* p, float (&v)[4]) {
  const float4 a = *reinterpret_cast<const float4*>(p);
  v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w;
}
__device__ __forceinline__ void load16(const bf16* p, float (&v)[8]) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w[i]));
    v[2 * i] = f.x, v[2 * i + 1] = f.y;
  }
}
__device__ __forceinline__ void store16(float* p, const float (&v)[4]) {
  *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
}
__device__ __forceinline__ void store16(bf16* p, const float (&v)[8]) {
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
    w[i] = *reinterpret_cast<const uint32_t*>(&h);
  }
  *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
}

// The same for inter % kVec16<T> == 0: 16 bytes of gate, of up and of the
// output a thread. grid (inter / kVec16 / 256 rounded up, min(n, 65535)),
// rows striding by gridDim.y: no index division. The grid-stride form before
// it (8-byte pieces, a 64-bit division per piece) moved 82% of the copy rate
// in the 8B shape's 8,000-token prefill (6.7 ms of 210, H200).
template <typename T>
__global__ void silu_mul_vec_kernel(const T* gate_up, int64_t n, int inter, T* out) {
  constexpr int E = kVec16<T>;
  pdl_trigger();
  pdl_wait();
  const int i = (blockIdx.x * blockDim.x + threadIdx.x) * E;
  if (i >= inter) return;
  for (int64_t row = blockIdx.y; row < n; row += gridDim.y) {
    const T* g = gate_up + row * 2 * inter + i;
    float a[E], b[E];
    load16(g, a);
    load16(g + inter, b);
#pragma unroll
    for (int e = 0; e < E; ++e) a[e] = silu(a[e]) * b[e];
    store16(out + row * inter + i, a);
  }
}

// silu_mul_vec_kernel's row with its e4m3 codes (silu_mul_codes): one block a
// row, each thread keeping its kVecs pieces of 8 (as stored in bf16) in
// registers for the row's scale, so the products are read by nobody again
// (against silu_mul then quantize_act_rows: 7 bytes moved an element instead
// of 9, and one kernel fewer before down in prefill and batched decode).
template <int kVecs>
__global__ void __launch_bounds__(512) silu_mul_codes_kernel(const bf16* gate_up, int inter, bf16* out, Fp8Out f8) {
  pdl_trigger();
  pdl_wait();
  const int64_t row = blockIdx.x;
  const bf16* g = gate_up + row * 2 * inter;
  const int n8 = inter / 8;
  float v[kVecs][8];
  float amax = 0.0f;
#pragma unroll
  for (int k = 0; k < kVecs; ++k) {
    const int i = threadIdx.x + k * blockDim.x;
    if (i < n8) {
      float b[8];
      load16(g + 8 * i, v[k]);
      load16(g + inter + 8 * i, b);
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        v[k][e] = round_to<bf16>(silu(v[k][e]) * b[e]);  // as stored
        amax = fmaxf(amax, fabsf(v[k][e]));
      }
      store16(out + row * inter + 8 * i, v[k]);
    }
  }
  const float sc = e4m3_row_scale(block_max(amax));
  if (threadIdx.x == 0) f8.scale[row] = sc;
#pragma unroll
  for (int k = 0; k < kVecs; ++k) {
    const int i = threadIdx.x + k * blockDim.x;
    if (i < n8) {
      const float* x = v[k];
      *reinterpret_cast<uint2*>(f8.q + row * inter + 8 * i) =
          make_uint2(codes4(x[0], x[1], x[2], x[3], sc), codes4(x[4], x[5], x[6], x[7], sc));
    }
  }
}

__global__ void gather_rows_kernel(const uint8_t* x, int64_t row_bytes, const int32_t* idx, uint8_t* out) {
  pdl_trigger();
  pdl_wait();
  const uint8_t* src = x + int64_t(idx[blockIdx.x]) * row_bytes;
  uint8_t* dst = out + int64_t(blockIdx.x) * row_bytes;
  if (row_bytes % 16 == 0) {
    for (int64_t i = threadIdx.x; i < row_bytes / 16; i += blockDim.x)
      reinterpret_cast<uint4*>(dst)[i] = reinterpret_cast<const uint4*>(src)[i];
  } else {
    for (int64_t i = threadIdx.x; i < row_bytes; i += blockDim.x) dst[i] = src[i];
  }
}

// grid (n, rot_blocks + v_blocks), block 256. The first rot_blocks blocks of a
// token rotate kW (head, i) pairs per thread over its H + Hkv q and k heads
// (k also goes to the cache); the rest copy its v row to the cache, 16 bytes
// per thread. Spread over many blocks so that a batch-1 step is not one
// block looping over every head. kW = 4 (D % 8 == 0: 8-byte bf16 and 16-byte
// cos/sin loads) or 1; one pair a thread in 2-byte loads reached 40% of copy
// bandwidth in an 8,000-token prefill (4.0 ms of 207 on the 8B shape, H200).
template <typename T, int kW>
__global__ void rope_and_cache_kernel(T* qkv, const float* cos, const float* sin, const int32_t* positions,
                                      const int64_t* slots, int H, int Hkv, int D, int rot_blocks, T* k_cache,
                                      T* v_cache) {
  pdl_trigger();
  pdl_wait();
  const int64_t t = blockIdx.x;
  const int half = D / 2;
  T* row = qkv + t * int64_t(H + 2 * Hkv) * D;
  const int64_t slot = slots[t];
  if (int(blockIdx.y) < rot_blocks) {
    const int pieces = half / kW;  // a head's pieces of kW pairs
    const int j = blockIdx.y * blockDim.x + threadIdx.x;
    if (j >= (H + Hkv) * pieces) return;
    const int head = j / pieces, i = (j % pieces) * kW;
    const int64_t at = int64_t(positions[t]) * half + i;
    T* x = row + head * D;
    T* kc = head >= H && slot >= 0 && k_cache ? k_cache + slot * Hkv * D + (head - H) * D : nullptr;
    if constexpr (kW == 4) {
      const float4 a = load4(x + i), b = load4(x + i + half), c = load4(cos + at), sn = load4(sin + at);
      const float4 lo = make_float4(rope_lo(a.x, b.x, c.x, sn.x), rope_lo(a.y, b.y, c.y, sn.y),
                                    rope_lo(a.z, b.z, c.z, sn.z), rope_lo(a.w, b.w, c.w, sn.w));
      const float4 hi = make_float4(rope_hi(a.x, b.x, c.x, sn.x), rope_hi(a.y, b.y, c.y, sn.y),
                                    rope_hi(a.z, b.z, c.z, sn.z), rope_hi(a.w, b.w, c.w, sn.w));
      store4(x + i, lo);
      store4(x + i + half, hi);
      if (kc) store4(kc + i, lo), store4(kc + i + half, hi);
    } else {
      const float c = cos[at], sn = sin[at];
      const float x1 = to_f(x[i]), x2 = to_f(x[i + half]);
      const T y1 = from_f<T>(rope_lo(x1, x2, c, sn));
      const T y2 = from_f<T>(rope_hi(x1, x2, c, sn));
      x[i] = y1;
      x[i + half] = y2;
      if (kc) kc[i] = y1, kc[i + half] = y2;
    }
    return;
  }
  if (slot < 0) return;
  const int e = (blockIdx.y - rot_blocks) * blockDim.x + threadIdx.x;  // 16-byte piece of the v row
  if (e >= Hkv * D * int(sizeof(T)) / 16) return;
  reinterpret_cast<uint4*>(v_cache + slot * Hkv * D)[e] =
      reinterpret_cast<const uint4*>(row + int64_t(H + Hkv) * D)[e];
}

// (value, index) order of argmax: larger value first, then lower index; NaN last.
__device__ __forceinline__ bool better(float v, int i, float bv, int bi) {
  if (isnan(v)) return false;
  if (isnan(bv)) return true;
  return v > bv || (v == bv && i < bi);
}

// The (value, index) winner of a block: warp shuffles, then the warps' winners
// (blockDim.x a multiple of 32); thread 0 gets it.
__device__ void block_best(float& bv, int& bi) {
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
    const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
    if (better(ov, oi, bv, bi)) bv = ov, bi = oi;
  }
  __shared__ float sv[32];
  __shared__ int si[32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) sv[warp] = bv, si[warp] = bi;
  __syncthreads();
  if (warp == 0) {
    const int nw = blockDim.x / 32;
    bv = lane < nw ? sv[lane] : __int_as_float(0x7fffffff);
    bi = lane < nw ? si[lane] : 0;
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
      const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
      if (better(ov, oi, bv, bi)) bv = ov, bi = oi;
    }
  }
}

// grid (kArgmaxParts, rows): block (p, r) finds the winner of part p of row r
// (a strided scan) and writes it to part_v/part_i[r * kArgmaxParts + p]. A
// vocabulary row is spread over many SMs (one block per row took 33 us for
// 128K logits; the step's lm head takes 350).
__global__ void argmax_parts_kernel(const float* x, int64_t cols, float* part_v, int* part_i,
                                    const int32_t* mask_of_row, const uint32_t* mask_words, int64_t words_per_row) {
  pdl_trigger();
  pdl_wait();
  const float* row = x + int64_t(blockIdx.y) * cols;
  const int m = mask_of_row != nullptr ? mask_of_row[blockIdx.y] : -1;
  const uint32_t* allowed = m >= 0 ? mask_words + int64_t(m) * words_per_row : nullptr;
  const int64_t per = (cols + gridDim.x - 1) / gridDim.x;
  const int64_t begin = blockIdx.x * per, end = min(cols, begin + per);
  float bv = __int_as_float(0x7fffffff);  // NaN: loses to any number
  int bi = 0;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const float v = allowed != nullptr && !((allowed[i >> 5] >> (i & 31)) & 1u) ? -INFINITY : row[i];
    if (better(v, static_cast<int>(i), bv, bi)) bv = v, bi = static_cast<int>(i);
  }
  block_best(bv, bi);
  if (threadIdx.x == 0) {
    part_v[int64_t(blockIdx.y) * gridDim.x + blockIdx.x] = bv;
    part_i[int64_t(blockIdx.y) * gridDim.x + blockIdx.x] = bi;
  }
}

// One warp per row: the winner of its parts, in order.
__global__ void argmax_merge_kernel(const float* part_v, const int* part_i, int parts, int32_t* out) {
  pdl_trigger();
  pdl_wait();
  float bv = __int_as_float(0x7fffffff);
  int bi = 0;
  for (int p = threadIdx.x; p < parts; p += 32) {
    const float v = part_v[int64_t(blockIdx.x) * parts + p];
    const int i = part_i[int64_t(blockIdx.x) * parts + p];
    if (better(v, i, bv, bi)) bv = v, bi = i;
  }
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
    const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
    if (better(ov, oi, bv, bi)) bv = ov, bi = oi;
  }
  if (threadIdx.x == 0) out[blockIdx.x] = bi;
}

__global__ void copy_blocks_kernel(uint8_t* base, int64_t block_bytes, const int2* pairs) {
  const int2 pr = pairs[blockIdx.y];
  const uint4* src = reinterpret_cast<const uint4*>(base + int64_t(pr.x) * block_bytes);
  uint4* dst = reinterpret_cast<uint4*>(base + int64_t(pr.y) * block_bytes);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < block_bytes / 16; i += int64_t(gridDim.x) * blockDim.x)
    dst[i] = src[i];
}

// One block of threads a pair: 16 bytes a thread a step, the host side
// through the bus (posted writes out; reads in, many in flight).
__global__ void swap_blocks_kernel(uint8_t* base, uint8_t* host, int64_t block_bytes, const int2* pairs, bool to_host) {
  const int2 pr = pairs[blockIdx.x];
  const uint4* src = reinterpret_cast<const uint4*>(to_host ? base + int64_t(pr.x) * block_bytes
                                                            : host + int64_t(pr.x) * block_bytes);
  uint4* dst = reinterpret_cast<uint4*>(to_host ? host + int64_t(pr.y) * block_bytes : base + int64_t(pr.y) * block_bytes);
  for (int64_t i = threadIdx.x; i < block_bytes / 16; i += blockDim.x) dst[i] = src[i];
}

__global__ void feed_tokens_kernel(int32_t* tokens, const int2* fb, int n, const int32_t* picks, const int32_t* draws) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int32_t t = fb[i].y >= 0 ? picks[fb[i].y] : draws[-1 - fb[i].y];
  tokens[fb[i].x] = t < 0 ? 0 : t;  // none (a mask that allowed nothing): its sequence ends, this row unread
}

}  // namespace

void feed_tokens(int32_t* tokens, const int2* fb, int n, const int32_t* picks, const int32_t* draws, cudaStream_t s) {
  if (n > 0) feed_tokens_kernel<<<(n + 255) / 256, 256, 0, s>>>(tokens, fb, n, picks, draws);
}

void swap_blocks(uint8_t* base, uint8_t* host, int64_t block_bytes, const int2* pairs, int n, bool to_host,
                 cudaStream_t s) {
  if (n > 0) launch(swap_blocks_kernel, static_cast<unsigned>(n), 256, 0, s, base, host, block_bytes, pairs, to_host);
}

void convert(const void* src, Elem src_kind, void* dst, Elem dst_kind, int64_t n, cudaStream_t s) {
  if (n == 0) return;
  convert_kernel<<<blocks_for(n, 256), 256, 0, s>>>(src, int(src_kind), dst, int(dst_kind), n);
  CUDA_CHECK_LAUNCH();
}

template <typename T>
void embedding(const T* table, int64_t rows, int64_t hidden, int64_t first, const int32_t* ids, int64_t n, float* out,
               cudaStream_t s) {
  if (n == 0) return;
  if (hidden % 4 == 0 && hidden < (int64_t(1) << 30))
    launch(embedding_vec_kernel<T>, dim3(static_cast<unsigned>((hidden / 4 + 255) / 256), static_cast<unsigned>(n)),
           256, 0, s, table, int(hidden), first, rows, ids, out);
  else
    launch(embedding_kernel<T>, static_cast<unsigned>(n), 256, 0, s, table, hidden, first, rows, ids, out);
}

template <typename Tin, typename Tout>
bool rms_norm(const Tin* x, const float* w, float eps, int64_t n, int64_t d, Tout* out, cudaStream_t s, Fp8Out f8) {
  if (n == 0) return false;
  if (launch_norm_vec<Tin, Tout, false>(nullptr, x, w, eps, n, d, out, s, f8))
    return std::is_same_v<Tout, bf16> && f8.q != nullptr;
  launch(rms_norm_kernel<Tin, Tout>, static_cast<unsigned>(n), norm_threads(d), 0, s, x, w, eps, d, out);
  return false;
}
template bool rms_norm<float, bf16>(const float*, const float*, float, int64_t, int64_t, bf16*, cudaStream_t, Fp8Out);
template bool rms_norm<float, float>(const float*, const float*, float, int64_t, int64_t, float*, cudaStream_t,
                                     Fp8Out);
template bool rms_norm<bf16, bf16>(const bf16*, const float*, float, int64_t, int64_t, bf16*, cudaStream_t, Fp8Out);

template <typename T>
bool add_rms_norm(float* residual, const T* x, const float* w, float eps, int64_t n, int64_t d, T* out,
                  cudaStream_t s, Fp8Out f8) {
  if (n == 0) return false;
  if (launch_norm_vec<T, T, true>(residual, x, w, eps, n, d, out, s, f8)) return std::is_same_v<T, bf16> && f8.q != nullptr;
  launch(add_rms_norm_kernel<T>, static_cast<unsigned>(n), norm_threads(d), 0, s, residual, x, w, eps, d, out);
  return false;
}

template <typename T>
void add(float* residual, const T* x, int64_t numel, cudaStream_t s) {
  if (numel == 0) return;
  launch(add_kernel<T>, blocks_for(numel, 256), 256, 0, s, residual, x, numel);
}

template <typename T>
void silu_mul(const T* gate_up, int64_t n, int64_t inter, T* out, cudaStream_t s) {
  if (n == 0) return;
  if (inter % kVec16<T> == 0 && inter < (int64_t(1) << 30)) {
    const dim3 grid(static_cast<unsigned>((inter / kVec16<T> + 255) / 256),
                    static_cast<unsigned>(std::min<int64_t>(n, 65535)));
    launch(silu_mul_vec_kernel<T>, grid, 256, 0, s, gate_up, n, int(inter), out);
    return;
  }
  const dim3 grid(static_cast<unsigned>((inter + 255) / 256 > 64 ? 64 : (inter + 255) / 256),
                  static_cast<unsigned>(n > 65535 ? 65535 : n));
  launch(silu_mul_kernel<T>, grid, 256, 0, s, gate_up, n, inter, out);
}

bool silu_mul_codes(const bf16* gate_up, int64_t n, int64_t inter, bf16* out, cudaStream_t s, Fp8Out f8) {
  const int64_t n8 = inter / 8;
  if (inter % 8 != 0 || n8 > 8 * 512 || f8.q == nullptr) return false;
  if (n == 0) return true;
  const int vecs = n8 <= 512 ? 1 : n8 <= 1024 ? 2 : n8 <= 2048 ? 4 : 8;  // at most 512 threads
  const int threads = static_cast<int>(((n8 + vecs - 1) / vecs + 31) / 32 * 32);
  const dim3 grid(static_cast<unsigned>(n));
  auto go = [&](auto kernel) { launch(kernel, grid, threads, 0, s, gate_up, int(inter), out, f8); };
  if (vecs == 1) go(silu_mul_codes_kernel<1>);
  else if (vecs == 2) go(silu_mul_codes_kernel<2>);
  else if (vecs == 4) go(silu_mul_codes_kernel<4>);
  else go(silu_mul_codes_kernel<8>);
  return true;
}

void gather_rows(const void* x, int64_t row_bytes, const int32_t* idx, int64_t n, void* out, cudaStream_t s) {
  if (n == 0) return;
  launch(gather_rows_kernel, static_cast<unsigned>(n), 256, 0, s, static_cast<const uint8_t*>(x), row_bytes, idx,
         static_cast<uint8_t*>(out));
}

template <typename T>
void rope_and_cache(T* qkv, const float* cos, const float* sin, const int32_t* positions, const int64_t* slots,
                    int64_t n, int H, int Hkv, int D, T* k_cache, T* v_cache, cudaStream_t s) {
  if (n == 0) return;
  const int w = D % 8 == 0 ? 4 : 1;  // pairs a thread
  const int rot_blocks = ((H + Hkv) * (D / 2 / w) + 255) / 256;
  const int v_blocks = v_cache ? (Hkv * D * int(sizeof(T)) / 16 + 255) / 256 : 0;  // D 64 or 128: whole 16-byte pieces
  const dim3 grid(static_cast<unsigned>(n), rot_blocks + v_blocks);
  if (w == 4)
    launch(rope_and_cache_kernel<T, 4>, grid, 256, 0, s, qkv, cos, sin, positions, slots, H, Hkv, D, rot_blocks,
           k_cache, v_cache);
  else
    launch(rope_and_cache_kernel<T, 1>, grid, 256, 0, s, qkv, cos, sin, positions, slots, H, Hkv, D, rot_blocks,
           k_cache, v_cache);
}

void argmax_rows(const float* x, int64_t rows, int64_t cols, int32_t* out, void* scratch, cudaStream_t s,
                 const int32_t* mask_of_row, const uint32_t* mask_words, int64_t words_per_row) {
  if (rows == 0) return;
  float* part_v = static_cast<float*>(scratch);
  int* part_i = reinterpret_cast<int*>(part_v + rows * kArgmaxParts);
  launch(argmax_parts_kernel, dim3(kArgmaxParts, static_cast<unsigned>(rows)), 256, 0, s, x, cols, part_v, part_i,
         mask_of_row, mask_words, words_per_row);
  launch(argmax_merge_kernel, static_cast<unsigned>(rows), 32, 0, s, part_v, part_i, kArgmaxParts, out);
}

void copy_blocks(uint8_t* base, int64_t block_bytes, const int2* pairs, int n, cudaStream_t s) {
  if (n == 0) return;
  const int64_t vecs = block_bytes / 16;
  const dim3 grid(static_cast<unsigned>((vecs + 255) / 256 > 32 ? 32 : (vecs + 255) / 256), static_cast<unsigned>(n));
  copy_blocks_kernel<<<grid, 256, 0, s>>>(base, block_bytes, pairs);
  CUDA_CHECK_LAUNCH();
}

#define PAGEDRT_INSTANTIATE(T)                                                                               \
  template void embedding<T>(const T*, int64_t, int64_t, int64_t, const int32_t*, int64_t, float*, cudaStream_t); \
  template bool add_rms_norm<T>(float*, const T*, const float*, float, int64_t, int64_t, T*, cudaStream_t,    \
                                Fp8Out);                                                                      \
  template void add<T>(float*, const T*, int64_t, cudaStream_t);                                             \
  template void silu_mul<T>(const T*, int64_t, int64_t, T*, cudaStream_t);                                   \
  template void rope_and_cache<T>(T*, const float*, const float*, const int32_t*, const int64_t*, int64_t, int, \
                                  int, int, T*, T*, cudaStream_t);
PAGEDRT_INSTANTIATE(bf16)
PAGEDRT_INSTANTIATE(float)
#undef PAGEDRT_INSTANTIATE

}  // namespace pagedrt::cuda
