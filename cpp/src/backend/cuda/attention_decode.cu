// backend/cuda/attention_decode.cu — paged decode attention, split-KV.
//
// One block = (token, kv head, split). The G query heads of the kv head's
// group are all handled by the block, so each K/V row is read once for the
// group (GQA). A key row (D elements, bf16 or fp32) is read by D/8 threads,
// 8 elements each (one 16-byte load in bf16, two in fp32);
// the block's 128 threads hold 128 / (D/8) such key groups, each running its
// own fp32 online softmax over every NG-th run of U keys; the groups merge in
// shared memory at the end. Long contexts are cut into splits (more blocks
// for small batches) whose partial results merge by log-sum-exp.
//
//   grid (items, Hkv, splits)            block 128
//   thread: lane = tid % (D/8) -> dims [lane*8, lane*8+8); group = tid / (D/8)
#include <cfloat>

#include "backend/cuda/cuda_check.hpp"
#include "backend/cuda/kernels.cuh"
#include "backend/cuda/launch.cuh"

namespace pagedrt::cuda {
namespace {

constexpr float kLog2e = 1.4426950408889634f;

// 8 consecutive elements of T, as loaded: one uint4 of bf16, two of fp32.
template <typename T>
struct Raw8 {
  static constexpr int kVecs = sizeof(T) * 8 / 16;
  uint4 v[kVecs];
};

template <typename T>
__device__ __forceinline__ Raw8<T> load8(const T* p) {
  Raw8<T> r;
#pragma unroll
  for (int i = 0; i < Raw8<T>::kVecs; ++i) r.v[i] = __ldg(reinterpret_cast<const uint4*>(p) + i);
  return r;
}

template <typename T>
__device__ __forceinline__ Raw8<T> zero8() {
  Raw8<T> r;
#pragma unroll
  for (int i = 0; i < Raw8<T>::kVecs; ++i) r.v[i] = make_uint4(0, 0, 0, 0);
  return r;
}

__device__ __forceinline__ void unpack8(const Raw8<bf16>& r, float* f) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&r.v[0]);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 x = __bfloat1622float2(h[i]);
    f[2 * i] = x.x;
    f[2 * i + 1] = x.y;
  }
}

__device__ __forceinline__ void unpack8(const Raw8<float>& r, float* f) {
  const float* x = reinterpret_cast<const float*>(&r.v[0]);
#pragma unroll
  for (int i = 0; i < 8; ++i) f[i] = x[i];
}

__device__ __forceinline__ void store_f(bf16* p, float v) { *p = __float2bfloat16_rn(v); }
__device__ __forceinline__ void store_f(float* p, float v) { *p = v; }

template <typename T, int D, int GMAX>
__global__ void __launch_bounds__(128) decode_kernel(AttentionParamsT<T> p, DecodePlan d) {
  pdl_trigger();
  pdl_wait();
  constexpr int TPK = D / 8;       // threads per key row
  constexpr int NG = 128 / TPK;    // key groups per block
  constexpr int U = GMAX >= 8 ? 2 : 4;  // keys per group per iteration
  const int item = blockIdx.x, kvh = blockIdx.y, split = blockIdx.z;
  const int t = d.tokens[item];
  const int seq = p.token_seq[t];
  const int H = p.num_heads, Hkv = p.num_kv_heads, G = H / Hkv, bs = p.block_size;
  const int ctx = p.positions[t] + 1;
  const int start = split * d.chunk;
  const int end = min(ctx, start + d.chunk);
  const int lane = threadIdx.x % TPK, grp = threadIdx.x / TPK;

  float q[GMAX][8];
  const T* qrow = p.qkv + int64_t(t) * (H + 2 * Hkv) * D + int64_t(kvh) * G * D + lane * 8;
  const float qscale = p.scale * kLog2e;
#pragma unroll
  for (int g = 0; g < GMAX; ++g) {
    if (g < G) {
      unpack8(load8(qrow + g * D), q[g]);
#pragma unroll
      for (int j = 0; j < 8; ++j) q[g][j] *= qscale;
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) q[g][j] = 0.0f;
    }
  }
  float m[GMAX], l[GMAX], acc[GMAX][8];
#pragma unroll
  for (int g = 0; g < GMAX; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.0f;
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[g][j] = 0.0f;
  }

  const int32_t* pages = p.page_indices + p.page_indptr[seq];
  // The trip count is the same for the whole block (shuffles need every lane);
  // a group whose keys run past `end` masks them.
  for (int base = start; base < end; base += NG * U) {
    const int k0 = base + grp * U;
    Raw8<T> kr[U], vr[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int pos = k0 + u;
      if (pos < end) {
        const int64_t slot = kv_slot(pages, pos, bs, p.block_shift);
        const int64_t off = (slot * Hkv + kvh) * D + lane * 8;
        kr[u] = load8(p.k_cache + off);
        vr[u] = load8(p.v_cache + off);
      } else {
        kr[u] = zero8<T>();
        vr[u] = zero8<T>();
      }
    }
    float s[U][GMAX];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float kf[8];
      unpack8(kr[u], kf);
#pragma unroll
      for (int g = 0; g < GMAX; ++g) {
        float acc_s = 0.0f;
#pragma unroll
        for (int j = 0; j < 8; ++j) acc_s = fmaf(q[g][j], kf[j], acc_s);
#pragma unroll
        for (int o = TPK / 2; o > 0; o >>= 1) acc_s += __shfl_xor_sync(0xffffffffu, acc_s, o);
        s[u][g] = (k0 + u < end) ? acc_s : -INFINITY;
      }
    }
#pragma unroll
    for (int g = 0; g < GMAX; ++g) {
      float mx = s[0][g];
#pragma unroll
      for (int u = 1; u < U; ++u) mx = fmaxf(mx, s[u][g]);
      const float m_new = fmaxf(m[g], mx);
      const float corr = m_new == -INFINITY ? 1.0f : exp2f(m[g] - m_new);
      l[g] *= corr;
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[g][j] *= corr;
      m[g] = m_new;
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float vf[8];
      unpack8(vr[u], vf);
#pragma unroll
      for (int g = 0; g < GMAX; ++g) {
        const float pw = s[u][g] == -INFINITY ? 0.0f : exp2f(s[u][g] - m[g]);
        l[g] += pw;
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[g][j] = fmaf(pw, vf[j], acc[g][j]);
      }
    }
  }

  // Merge the NG key groups of the block.
  __shared__ float sm_m[NG][GMAX], sm_l[NG][GMAX];
  __shared__ float sm_acc[NG][GMAX][D];
#pragma unroll
  for (int g = 0; g < GMAX; ++g) {
    if (lane == 0) {
      sm_m[grp][g] = m[g];
      sm_l[grp][g] = l[g];
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) sm_acc[grp][g][lane * 8 + j] = acc[g][j];
  }
  __syncthreads();
  const int S = d.num_splits;
  for (int idx = threadIdx.x; idx < G * D; idx += blockDim.x) {
    const int g = idx / D, dd = idx % D;
    float M = -INFINITY;
    for (int k = 0; k < NG; ++k) M = fmaxf(M, sm_m[k][g]);
    float L = 0.0f, O = 0.0f;
    if (M != -INFINITY) {
      for (int k = 0; k < NG; ++k) {
        const float w = exp2f(sm_m[k][g] - M);
        L += sm_l[k][g] * w;
        O += sm_acc[k][g][dd] * w;
      }
    }
    const int h = kvh * G + g;
    if (S == 1) {
      store_f(p.out + int64_t(t) * H * D + int64_t(h) * D + dd, L > 0.0f ? O / L : 0.0f);
    } else {
      const int64_t part = int64_t(item) * S + split;
      d.o_part[(part * H + h) * D + dd] = L > 0.0f ? O / L : 0.0f;
      if (dd == 0) d.lse_part[part * H + h] = L > 0.0f ? M + log2f(L) : -INFINITY;
    }
  }
}

// grid (items, H), block D: out = sum_s w_s o_s / sum_s w_s, w_s = 2^(lse_s - max lse)
template <typename T>
__global__ void merge_kernel(AttentionParamsT<T> p, DecodePlan d) {
  pdl_trigger();
  pdl_wait();
  const int item = blockIdx.x, h = blockIdx.y, dd = threadIdx.x;
  const int t = d.tokens[item];
  const int H = p.num_heads, D = p.head_dim, S = d.num_splits;
  const int64_t base = int64_t(item) * S;
  float M = -INFINITY;
  for (int s = 0; s < S; ++s) M = fmaxf(M, d.lse_part[(base + s) * H + h]);
  float W = 0.0f, O = 0.0f;
  if (M != -INFINITY) {
    for (int s = 0; s < S; ++s) {
      const float lse = d.lse_part[(base + s) * H + h];
      if (lse == -INFINITY) continue;
      const float w = exp2f(lse - M);
      W += w;
      O += w * d.o_part[((base + s) * H + h) * D + dd];
    }
  }
  store_f(p.out + int64_t(t) * H * D + int64_t(h) * D + dd, W > 0.0f ? O / W : 0.0f);
}

template <typename T, int D>
void launch_d(const AttentionParamsT<T>& p, const DecodePlan& d, dim3 grid, cudaStream_t s) {
  const int G = p.num_heads / p.num_kv_heads;
  if (G == 1) launch(decode_kernel<T, D, 1>, grid, 128, 0, s, p, d);
  else if (G == 2) launch(decode_kernel<T, D, 2>, grid, 128, 0, s, p, d);
  else if (G <= 4) launch(decode_kernel<T, D, 4>, grid, 128, 0, s, p, d);
  else launch(decode_kernel<T, D, 8>, grid, 128, 0, s, p, d);
}

}  // namespace

bool attention_supported(int head_dim, int group) {
  return (head_dim == 64 || head_dim == 128) && group >= 1 && group <= 8;
}

template <typename T>
void decode_attention(const AttentionParamsT<T>& p, const DecodePlan& d, cudaStream_t s) {
  if (d.num_items == 0) return;
  const dim3 grid(static_cast<unsigned>(d.num_items), static_cast<unsigned>(p.num_kv_heads),
                  static_cast<unsigned>(d.num_splits));
  if (p.head_dim == 128) launch_d<T, 128>(p, d, grid, s);
  else launch_d<T, 64>(p, d, grid, s);
  if (d.num_splits > 1)
    launch(merge_kernel<T>, dim3(static_cast<unsigned>(d.num_items), static_cast<unsigned>(p.num_heads)),
           static_cast<unsigned>(p.head_dim), 0, s, p, d);
}

template void decode_attention<bf16>(const AttentionParamsT<bf16>&, const DecodePlan&, cudaStream_t);
template void decode_attention<float>(const AttentionParamsT<float>&, const DecodePlan&, cudaStream_t);

}  // namespace pagedrt::cuda
