// backend/cuda/attention_decode_cc.cu — paged decode attention on CUDA cores,
// split-KV: the fp32 mode's kernel, and the bf16 kernel of steps with few
// blocks (batch-1 decode), where a block's latency, not bandwidth, is the
// step's cost (the plan chooses: DecodePlan::cuda_cores). The tensor-core
// kernels are attention_decode.cu and attention_decode_fp8.cu.
//
// One block = (token, kv head, split). The G query heads of the kv head's
// group are all handled by the block, so each K/V row is read once for the
// group (GQA). A key row (D elements, bf16 or fp32) is read by D/8 threads,
// 8 elements each (one 16-byte load in bf16, two in fp32; on an fp8 cache,
// F8, 8 codes, an 8-byte load, and the row's exponent byte, widened exactly
// and scaled by it);
// the block's 128 threads hold 128 / (D/8) such key groups, each running its
// own fp32 online softmax over every NG-th run of U keys; the groups merge in
// shared memory at the end. Long contexts are cut into splits (more blocks
// for small batches) whose partial results merge by log-sum-exp. In steps of
// one query token per sequence the kernel also does rope_and_cache's work for
// its token (AttentionParamsT::rope_cos), one kernel less per layer.
//
//   grid (Hkv, items, splits) or (items, Hkv, splits) (DecodePlan::heads_first)   block 128
//   thread: lane = tid % (D/8) -> dims [lane*8, lane*8+8); group = tid / (D/8)
#include <cooperative_groups.h>

#include <cfloat>
#include <type_traits>

#include "backend/cuda/attention_split.cuh"
#include "backend/cuda/cuda_check.hpp"
#include "backend/cuda/elementwise.cuh"
#include "backend/cuda/kernels.cuh"
#include "backend/cuda/kv_fp8.cuh"
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

// f (values already exact in T) as 8 elements of T.
__device__ __forceinline__ Raw8<bf16> pack8(const float* f, bf16) {
  Raw8<bf16> r;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&r.v[0]);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
  return r;
}

__device__ __forceinline__ Raw8<float> pack8(const float* f, float) {
  Raw8<float> r;
  float* x = reinterpret_cast<float*>(&r.v[0]);
#pragma unroll
  for (int i = 0; i < 8; ++i) x[i] = f[i];
  return r;
}

template <typename T>
__device__ __forceinline__ void store8(T* p, const Raw8<T>& r) {
#pragma unroll
  for (int i = 0; i < Raw8<T>::kVecs; ++i) reinterpret_cast<uint4*>(p)[i] = r.v[i];
}

// 8 dims of a row of an fp8 cache (paged_kv.hpp's Fp8Kv): their e4m3 codes
// and the row's exponent byte, as loaded.
struct F8Raw8 {
  uint2 codes;
  int8_t exp;
};

// codes * 2^exp, exactly: each code widened to fp16 (exact), the exponent
// clamped to the quantizer's range as the other fp8 kernels clamp a byte no
// kernel wrote (a masked row's).
__device__ __forceinline__ void unpack8(const F8Raw8& r, float* f) {
  const int e = r.exp < kKvExpMin ? kKvExpMin : r.exp > kKvExpMax ? kKvExpMax : r.exp;
  const float sc = exp2_int(e);
  const uint2 a = e4m3_x4_f16(r.codes.x), b = e4m3_x4_f16(r.codes.y);
  const uint32_t h[4] = {a.x, a.y, b.x, b.y};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 x = __half22float2(*reinterpret_cast<const __half2*>(&h[i]));
    f[2 * i] = x.x * sc;
    f[2 * i + 1] = x.y * sc;
  }
}

// A row of D values held 8 a lane by the TPK lanes of a key group, quantized
// as store_kv_row (kv_fp8.cuh) would (kv_row_codes; every lane of the warp
// must call it).
template <int TPK>
__device__ __forceinline__ F8Raw8 quantize8(const float (&x)[8]) {
  uint8_t c[8];
  const int e = kv_row_codes<8, TPK>(x, c);
  uint32_t w[2] = {0u, 0u};
#pragma unroll
  for (int j = 0; j < 8; ++j) w[j / 4] |= uint32_t(c[j]) << (8 * (j % 4));
  return {make_uint2(w[0], w[1]), static_cast<int8_t>(e)};
}

// A key's K or V row of the cache (F8: p.fp8's k or v; else p.kv's) at the
// flat slot `slot`, lane's 8 dims.
template <typename T, bool F8>
using KvRaw8 = std::conditional_t<F8, F8Raw8, Raw8<T>>;
template <typename T, bool F8>
__device__ __forceinline__ KvRaw8<T, F8> load_kv8(const AttentionParamsT<T>& p, bool is_v, int64_t slot, int kvh,
                                                   int lane) {
  if constexpr (F8) {
    const Fp8Kv& f = p.fp8;
    const uint8_t* base = is_v ? f.v : f.k;
    return {__ldg(reinterpret_cast<const uint2*>(base + f.slot_code_offset(slot, kvh) + lane * 8)),
            static_cast<int8_t>(__ldg(base + f.slot_exp_offset(slot, kvh)))};
  } else {
    return load8((is_v ? p.kv.v : p.kv.k) + p.kv.slot_offset(slot, kvh) + lane * 8);
  }
}
template <typename T, bool F8>
__device__ __forceinline__ KvRaw8<T, F8> zero_kv8() {
  if constexpr (F8) return {make_uint2(0u, 0u), 0};
  else return zero8<T>();
}

// Rotate-half RoPE of a head's dims lane * 8 .. lane * 8 + 7, held by the D / 8
// lanes of a key group (lane < TPK / 2: the first half, paired with lane +
// TPK / 2), at the angles c, s of those dims; rounded to T as rope_and_cache
// would store them. Every lane of the warp must call it.
template <typename T, int TPK>
__device__ __forceinline__ void rope8(float (&x)[8], int lane, const float (&c)[8], const float (&s)[8]) {
  const bool lo = lane < TPK / 2;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const float other = __shfl_xor_sync(0xffffffffu, x[j], TPK / 2);
    x[j] = round_to<T>(lo ? rope_lo(x[j], other, c[j], s[j]) : rope_hi(other, x[j], c[j], s[j]));
  }
}

// F8: the cache is p.fp8's (bf16 activations): keys and values widened from
// their codes; the fused append quantizes the token's own k and v.
template <typename T, bool F8, int D, int GMAX>
__global__ void __launch_bounds__(128) decode_kernel(AttentionParamsT<T> p, DecodePlan d) {
  pdl_trigger();
  // Everything waits, even the plan and the page table, which the step's
  // uploads wrote before its first kernel: read ahead of the wait, replays
  // of recorded steps saw the previous step's (wrong attention, every time;
  // direct launches did not).
  pdl_wait();
  constexpr int TPK = D / 8;       // threads per key row
  constexpr int NG = 128 / TPK;    // key groups per block
  constexpr int U = GMAX >= 8 ? 2 : 4;  // keys per group per iteration
  const int2 ik = decode_block(d);
  const int item = ik.x, kvh = ik.y, split = blockIdx.z;
  const DecodeItem it = d.items[item];
  const int t = it.token, ctx = it.context;
  const int H = p.num_heads, Hkv = p.kv.num_kv_heads, G = H / Hkv, bs = p.kv.block_size;
  const int shift = p.kv.block_shift;
  const int start = split * d.chunk;
  const int end = min(ctx, start + d.chunk);
  const int lane = threadIdx.x % TPK, grp = threadIdx.x / TPK;
  const int32_t* pages = p.kv.page_indices + it.page_start;

  // Fused RoPE + append (p.rope_cos set): the split holding the token's own
  // key rotates it, appends it and its value to the cache, and takes both
  // from shared memory in the loop (so nothing reads back what this kernel
  // writes).
  const bool fused = p.rope_cos != nullptr;
  const bool own_new = fused && it.slot >= 0 && start < end && end == ctx;
  using Row = KvRaw8<T, F8>;
  __shared__ Row sm_new[2][TPK];  // (k or v, lane): F8, the codes the cache gets

  // The KV slots of key group grp's U keys from k0 on: -1 past `end` and for
  // the token's own key (fused: it comes from shared memory). The U page
  // lookups all go out before any is used (one after the other, each key's
  // slot arithmetic would wait for its lookup: U round trips), and the first
  // keys' before the queries (a batch-1 step is all latency).
  auto slots_of = [&](int k0, int64_t (&sl)[U]) {
    int32_t page[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int pos = k0 + u;
      page[u] = pos < end ? pages[shift >= 0 ? pos >> shift : pos / bs] : 0;
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int pos = k0 + u, off = shift >= 0 ? pos & (bs - 1) : pos % bs;
      sl[u] = pos < end && !(own_new && pos == ctx - 1) ? int64_t(page[u]) * bs + off : -1;
    }
  };
  int64_t sl[U];
  slots_of(start + grp * U, sl);

  // This lane's 8 RoPE angles at the token's position (fused), the group's
  // queries and (fused) the token's own k and v: all loads out before any is
  // used.
  float rc[8], rs[8];
  if (fused) {
    const int64_t a0 = int64_t(ctx - 1) * (D / 2) + (lane % (TPK / 2)) * 8;
#pragma unroll
    for (int j = 0; j < 8; ++j) rc[j] = __ldg(p.rope_cos + a0 + j), rs[j] = __ldg(p.rope_sin + a0 + j);
  }
  const T* row = p.qkv + int64_t(t) * (H + 2 * Hkv) * D;
  const T* qrow = row + int64_t(kvh) * G * D + lane * 8;
  Raw8<T> qr[GMAX];
#pragma unroll
  for (int g = 0; g < GMAX; ++g) qr[g] = g < G ? load8(qrow + g * D) : zero8<T>();
  const T* krow = row + int64_t(H + kvh) * D + lane * 8;
  Raw8<T> kn, vn;
  if (own_new) kn = load8(krow), vn = load8(krow + int64_t(Hkv) * D);

  float q[GMAX][8];
  const float qscale = p.scale * kLog2e;
#pragma unroll
  for (int g = 0; g < GMAX; ++g) {
    unpack8(qr[g], q[g]);
    if (fused && g < G) rope8<T, TPK>(q[g], lane, rc, rs);
#pragma unroll
    for (int j = 0; j < 8; ++j) q[g][j] *= qscale;
  }

  if (own_new) {
    float kf[8];
    unpack8(kn, kf);
    rope8<T, TPK>(kf, lane, rc, rs);
    if constexpr (F8) {  // quantized as quantize_kv would; the loop takes these codes from sm_new
      float vf[8];
      unpack8(vn, vf);
      const F8Raw8 kq = quantize8<TPK>(kf), vq = quantize8<TPK>(vf);
      if (grp == 0) {
        sm_new[0][lane] = kq;
        sm_new[1][lane] = vq;
        const Fp8Kv& f = p.fp8;
        const int64_t codes = f.slot_code_offset(it.slot, kvh) + lane * 8;
        const int64_t exp = f.slot_exp_offset(it.slot, kvh);
        *reinterpret_cast<uint2*>(f.k + codes) = kq.codes;
        *reinterpret_cast<uint2*>(f.v + codes) = vq.codes;
        if (lane == 0) {
          f.k[exp] = static_cast<uint8_t>(kq.exp);
          f.v[exp] = static_cast<uint8_t>(vq.exp);
        }
      }
    } else {
      kn = pack8(kf, T());
      if (grp == 0) {
        sm_new[0][lane] = kn;
        sm_new[1][lane] = vn;
        const int64_t off = p.kv.slot_offset(it.slot, kvh) + lane * 8;
        store8(p.kv.k + off, kn);
        store8(p.kv.v + off, vn);
      }
    }
    __syncthreads();
  }
  float m[GMAX], l[GMAX], acc[GMAX][8];
#pragma unroll
  for (int g = 0; g < GMAX; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.0f;
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[g][j] = 0.0f;
  }

  // The trip count is the same for the whole block (shuffles need every lane);
  // a group whose keys run past `end` masks them.
  for (int base = start; base < end; base += NG * U) {
    const int k0 = base + grp * U;
    if (base != start) slots_of(k0, sl);
    Row kr[U], vr[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (own_new && k0 + u == ctx - 1) {
        kr[u] = sm_new[0][lane];
        vr[u] = sm_new[1][lane];
      } else if (sl[u] >= 0) {
        kr[u] = load_kv8<T, F8>(p, false, sl[u], kvh, lane);
        vr[u] = load_kv8<T, F8>(p, true, sl[u], kvh, lane);
      } else {
        kr[u] = zero_kv8<T, F8>();
        vr[u] = zero_kv8<T, F8>();
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
  __shared__ float sm_o[GMAX][D], sm_lse[GMAX];  // this split's result (cluster merge)
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
    } else if (d.cluster) {
      sm_o[g][dd] = L > 0.0f ? O / L : 0.0f;
      if (dd == 0) sm_lse[g] = L > 0.0f ? M + log2f(L) : -INFINITY;
    } else {
      const int64_t part = int64_t(item) * S + split;
      d.o_part[(part * H + h) * D + dd] = L > 0.0f ? O / L : 0.0f;
      if (dd == 0) d.lse_part[part * H + h] = L > 0.0f ? M + log2f(L) : -INFINITY;
    }
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // A cluster of the S split blocks of (item, kv head): each block merges a
  // slice of the G x D outputs from every block's shared memory, then all
  // wait until every slice is read before their shared memory goes away.
  if (S > 1 && d.cluster) {
    namespace cg = cooperative_groups;
    cg::cluster_group cluster = cg::this_cluster();
    cluster.sync();
    for (int idx = split * blockDim.x + threadIdx.x; idx < G * D; idx += S * blockDim.x) {
      const int g = idx / D, dd = idx % D;
      const float v = merge_splits(
          S, [&](int r) { return *cluster.map_shared_rank(&sm_lse[g], r); },
          [&](int r) { return *cluster.map_shared_rank(&sm_o[g][dd], r); });
      store_f(p.out + int64_t(t) * H * D + int64_t(kvh * G + g) * D + dd, v);
    }
    cluster.sync();
  }
#endif
}

template <typename T, bool F8, int D>
void launch_d(const AttentionParamsT<T>& p, const DecodePlan& d, dim3 grid, cudaStream_t s) {
  const int G = p.num_heads / p.kv.num_kv_heads;
  const unsigned cz = d.cluster ? static_cast<unsigned>(d.num_splits) : 1;
  if (G == 1) launch_clusters(decode_kernel<T, F8, D, 1>, grid, 128, 0, cz, s, p, d);
  else if (G == 2) launch_clusters(decode_kernel<T, F8, D, 2>, grid, 128, 0, cz, s, p, d);
  else if (G <= 4) launch_clusters(decode_kernel<T, F8, D, 4>, grid, 128, 0, cz, s, p, d);
  else launch_clusters(decode_kernel<T, F8, D, 8>, grid, 128, 0, cz, s, p, d);
}

}  // namespace

template <typename T>
void decode_cuda_cores(const AttentionParamsT<T>& p, const DecodePlan& d, cudaStream_t s) {
  if (d.num_items == 0) return;
  const dim3 grid = decode_grid(d, p.kv.num_kv_heads);
  if constexpr (std::is_same_v<T, bf16>) {
    if (p.fp8.k != nullptr) {  // an fp8 cache (bf16 activations only)
      if (p.kv.head_dim == 128) launch_d<T, true, 128>(p, d, grid, s);
      else launch_d<T, true, 64>(p, d, grid, s);
      if (d.num_splits > 1 && !d.cluster) merge_decode_splits(p, d, s);
      return;
    }
  }
  if (p.kv.head_dim == 128) launch_d<T, false, 128>(p, d, grid, s);
  else launch_d<T, false, 64>(p, d, grid, s);
  if (d.num_splits > 1 && !d.cluster) merge_decode_splits(p, d, s);
}

void decode_attention(const AttentionParamsT<float>& p, const DecodePlan& d, cudaStream_t s) {
  decode_cuda_cores(p, d, s);
}

void decode_attention_cuda_cores(const AttentionParamsT<bf16>& p, const DecodePlan& d, cudaStream_t s) {
  decode_cuda_cores(p, d, s);
}

}  // namespace pagedrt::cuda
