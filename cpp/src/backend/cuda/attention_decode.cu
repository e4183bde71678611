// backend/cuda/attention_decode.cu — paged decode attention on tensor cores
// (bf16), split-KV.
//
// One block = (token, kv head, split) of W warps (DecodeConfig: 2 unless
// told otherwise). The G <= 8 query heads that share the kv head are the rows
// of an mma.m16n8k16 A operand (rows G .. 15 zero), so S = Q K^T and
// O += P V run on tensor cores and every K/V row is read once for the whole
// group. The tensor cores have throughput to spare; what matters is bytes in
// flight: keys come in tiles of 16 W through an S-stage cp.async pipeline
// (3), each thread copying 16-byte chunks of the tile's K and V rows (found
// through the page table) straight into shared memory, S - 1 tiles ahead of
// the one being multiplied. Warp w takes keys 16w .. 16w+15 of every tile
// with its own online softmax (fp32, log2 domain); the warps merge in shared
// memory at the end, and a context's splits merge by log-sum-exp
// (attention_split.cuh): in a thread block cluster, or by the last split
// block of the (token, kv head) to finish. In steps of one query token per sequence the kernel
// also does rope_and_cache's work for its token (AttentionParamsT::rope_cos),
// one kernel less per layer.
//
//   grid (Hkv, items, splits) or (items, Hkv, splits) (DecodePlan::heads_first)   block 32 W
//   shared memory: S stages x (K, V) tiles of 16 W x D bf16, swizzled (mma.cuh);
//                  2 x 3 at D = 128: 48 KB, 4 blocks per SM
//
// An fp8 cache runs attention_decode_fp8.cu's kernel instead.
#include <algorithm>

#include "backend/cuda/attention_decode.cuh"
#include "backend/cuda/cuda_check.hpp"
#include "backend/cuda/elementwise.cuh"
#include "backend/cuda/kernels.cuh"
#include "backend/cuda/launch.cuh"

namespace pagedrt::cuda {
namespace {

// W warps of 16 keys each make a tile of 16 W keys; S stages of the pipeline.
template <int D, int W, int S>
struct DecodeSmem {
  static constexpr int kTile = 16 * W, kStages = S;
  static_assert(kDecodeTile % kTile == 0, "splits are whole tiles");
  static constexpr size_t stage = size_t(2) * kTile * D * 2;  // K then V tile, bf16
  static constexpr size_t kv = 0;                             // kStages stages
  static constexpr size_t own = kv + kStages * stage;         // (2, D) bf16: the token's rotated k, its v
  static constexpr size_t out = own + 2 * D * 2;              // (8, D) fp32: this split's result (clusters)
  static constexpr size_t lse = out + kMaxGroup * D * 4;      // (8) fp32
  static constexpr size_t bytes = lse + kMaxGroup * 4;
  // After the key loop the stages hold the warps' results and the in-block
  // merge's lse values (finish_decode).
  static_assert(DecodeEpilogueSmem<D, W>::need <= own, "the epilogue's results fit the stages");
};

// The token's own k (rotated at position pos, rounded to bf16 as
// rope_and_cache stores it) and v of kv head kvh, chunk c (< D / 16) of each
// half of the head: to the cache slot and to `own` (2, D) in shared memory.
template <int D>
__device__ void append_own_kv(const AttentionParams& p, const bf16* row, int kvh, int pos, int64_t slot, int c,
                              bf16* own) {
  const int H = p.num_heads, Hkv = p.kv.num_kv_heads;
  const bf16* kr = row + int64_t(H + kvh) * D;
  const bf16* vr = row + int64_t(H + Hkv + kvh) * D;
  uint4 k[2] = {*reinterpret_cast<const uint4*>(kr + c * 8), *reinterpret_cast<const uint4*>(kr + D / 2 + c * 8)};
  const uint4 v[2] = {*reinterpret_cast<const uint4*>(vr + c * 8),
                      *reinterpret_cast<const uint4*>(vr + D / 2 + c * 8)};
  const float* cs = p.rope_cos + int64_t(pos) * (D / 2) + c * 8;
  const float* sn = p.rope_sin + int64_t(pos) * (D / 2) + c * 8;
  uint32_t* lo = reinterpret_cast<uint32_t*>(&k[0]);
  uint32_t* hi = reinterpret_cast<uint32_t*>(&k[1]);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    float x1[2], x2[2], r1[2], r2[2];
    unpack_bf16x2(lo[j], x1[0], x1[1]);
    unpack_bf16x2(hi[j], x2[0], x2[1]);
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const float cv = __ldg(cs + 2 * j + e), sv = __ldg(sn + 2 * j + e);
      r1[e] = rope_lo(x1[e], x2[e], cv, sv);
      r2[e] = rope_hi(x1[e], x2[e], cv, sv);
    }
    lo[j] = pack_bf16x2(r1[0], r1[1]);
    hi[j] = pack_bf16x2(r2[0], r2[1]);
  }
  const int64_t off = p.kv.slot_offset(slot, kvh);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int e = h * (D / 2) + c * 8;
    *reinterpret_cast<uint4*>(p.kv.k + off + e) = k[h];
    *reinterpret_cast<uint4*>(p.kv.v + off + e) = v[h];
    *reinterpret_cast<uint4*>(own + e) = k[h];
    *reinterpret_cast<uint4*>(own + D + e) = v[h];
  }
}

// This lane's part of the A operand Q (rows = the group's query heads g =
// lane / 4 < G, zero beyond): for k-step s, q[s][0] = dims 16s + c .. +1 and
// q[s][1] = dims 16s + 8 + c .. +1 (c = (lane % 4) * 2). With rope_cos set the
// heads are rotated here at position pos (each rotate-half pair, dims d and
// d + D/2, is in k-steps s and s + D/32 of the same lane) and rounded to bf16
// as rope_and_cache would store them.
template <int D>
__device__ void load_q(const AttentionParams& p, const bf16* row, int kvh, int G, int pos, uint32_t (&q)[D / 16][2]) {
  constexpr int KS = D / 16;
  const int lane = threadIdx.x % 32, g = lane / 4, c = (lane % 4) * 2;
  if (g >= G) {
#pragma unroll
    for (int s = 0; s < KS; ++s) q[s][0] = q[s][1] = 0u;
    return;
  }
  const bf16* qh = row + int64_t(kvh * G + g) * D;
#pragma unroll
  for (int s = 0; s < KS; ++s)
#pragma unroll
    for (int h = 0; h < 2; ++h) q[s][h] = *reinterpret_cast<const uint32_t*>(qh + 16 * s + 8 * h + c);
  if (p.rope_cos == nullptr) return;
  const float* cs = p.rope_cos + int64_t(pos) * (D / 2);
  const float* sn = p.rope_sin + int64_t(pos) * (D / 2);
#pragma unroll
  for (int s = 0; s < KS / 2; ++s)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int i = 16 * s + 8 * h + c;  // the angle of dims i and i + D/2
      const float2 cv = __ldg(reinterpret_cast<const float2*>(cs + i));
      const float2 sv = __ldg(reinterpret_cast<const float2*>(sn + i));
      float x1[2], x2[2];
      unpack_bf16x2(q[s][h], x1[0], x1[1]);
      unpack_bf16x2(q[s + KS / 2][h], x2[0], x2[1]);
      q[s][h] = pack_bf16x2(rope_lo(x1[0], x2[0], cv.x, sv.x), rope_lo(x1[1], x2[1], cv.y, sv.y));
      q[s + KS / 2][h] = pack_bf16x2(rope_hi(x1[0], x2[0], cv.x, sv.x), rope_hi(x1[1], x2[1], cv.y, sv.y));
    }
}

template <int D, int W, int S>
__global__ void __launch_bounds__(32 * W) decode_kernel(AttentionParams p, DecodePlan d) {
  using L = DecodeSmem<D, W, S>;
  constexpr int kTile = L::kTile, kStages = S, kThreads = 32 * W;
  constexpr int CH = D / 8, KS = D / 16, ROWS = kThreads / CH;  // chunks per row, k-steps, rows per copy pass
  extern __shared__ __align__(128) unsigned char smem[];
  pdl_trigger();
  // Everything waits, even the plan and the page table, which the step's
  // uploads wrote before its first kernel (launch.cuh).
  pdl_wait();
  const int2 ik = decode_block(d);
  const int item = ik.x, kvh = ik.y, split = blockIdx.z;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const DecodeItem it = d.items[item];
  const int t = it.token, ctx = it.context;
  const int H = p.num_heads, Hkv = p.kv.num_kv_heads, G = H / Hkv;
  const int bs = p.kv.block_size, shift = p.kv.block_shift;  // registers, not loads in the loop
  const int start = split * d.chunk, end = min(ctx, start + d.chunk);
  const int ntiles = end > start ? (end - start + kTile - 1) / kTile : 0;
  const int32_t* pages = p.kv.page_indices + it.page_start;
  const bf16* row = p.qkv + int64_t(t) * (H + 2 * Hkv) * D;
  bf16* own = reinterpret_cast<bf16*>(smem + L::own);

  // Fused RoPE + append (p.rope_cos set): the split holding the token's own
  // key rotates it and appends it and its value to the cache, and its tile
  // takes both from shared memory (nothing reads back what this kernel writes).
  const bool own_new = p.rope_cos != nullptr && it.slot >= 0 && start < end && end == ctx;
  if (own_new) {
    if (tid < CH / 2) append_own_kv<D>(p, row, kvh, ctx - 1, it.slot, tid, own);
    __syncthreads();
  }

  // Tile `tile` of the split into stage `stage`: thread tid copies chunk
  // tid % CH of rows tid / CH + ROWS i; rows past `end` are zero-filled.
  auto load_tile = [&](int tile, int stage) {
    bf16* ks = reinterpret_cast<bf16*>(smem + L::kv + stage * L::stage);
    bf16* vs = ks + kTile * D;
    const int k0 = start + tile * kTile, c = tid % CH;
#pragma unroll
    for (int i = 0; i < kTile / ROWS; ++i) {
      const int r = tid / CH + i * ROWS, pos = k0 + r, e = swizzle<D>(r, c);
      if (own_new && pos == ctx - 1) {
        *reinterpret_cast<uint4*>(ks + e) = *reinterpret_cast<const uint4*>(own + c * 8);
        *reinterpret_cast<uint4*>(vs + e) = *reinterpret_cast<const uint4*>(own + D + c * 8);
        continue;
      }
      const bool valid = pos < end;
      const int64_t off = valid ? p.kv.slot_offset(kv_slot(pages, pos, bs, shift), kvh) + c * 8 : 0;
      cp_async16(ks + e, p.kv.k + off, valid ? 16 : 0);
      cp_async16(vs + e, p.kv.v + off, valid ? 16 : 0);
    }
  };
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < ntiles) load_tile(s, s);
    cp_async_commit();
  }

  uint32_t q[KS][2];
  load_q<D>(p, row, kvh, G, ctx - 1, q);
  const float qscale = p.scale * kLog2e;
  // This lane's rows: g = lane / 4 (o[n][0..1], dims 8n + c ..); o[n][2..3]
  // are the zero rows 8 .. 15.
  float o[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
  float m = -INFINITY, l = 0.0f;
  const int kr0 = warp * 16;  // this warp's keys in a tile

  for (int tile = 0; tile < ntiles; ++tile) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // tile `tile` landed; every warp is done with the stage refilled next
    if (tile + kStages - 1 < ntiles) load_tile(tile + kStages - 1, (tile + kStages - 1) % kStages);
    cp_async_commit();
    const bf16* ks = reinterpret_cast<const bf16*>(smem + L::kv + (tile % kStages) * L::stage);
    const bf16* vs = ks + kTile * D;

    float sc[2][4] = {};  // S: keys kr0 + 8n + c .. +1 (rows g)
#pragma unroll
    for (int s = 0; s < KS; s += 2)
#pragma unroll
      for (int n = 0; n < 2; ++n) {
        uint32_t b[4];  // k-steps s and s + 1 of keys kr0 + 8n ..
        ldmatrix_x4(b, ks + swizzle<D>(kr0 + 8 * n + (lane & 7), 2 * s + (lane >> 3)));
        const uint32_t a0[4] = {q[s][0], 0u, q[s][1], 0u}, a1[4] = {q[s + 1][0], 0u, q[s + 1][1], 0u};
        mma_16816(sc[n], a0, b[0], b[1]);
        mma_16816(sc[n], a1, b[2], b[3]);
      }

    // Online softmax over this warp's 16 keys; the 4 lanes of a row share m.
    const int key = start + tile * kTile + kr0 + (lane % 4) * 2;
    float sv[4] = {sc[0][0], sc[0][1], sc[1][0], sc[1][1]};
    float mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const bool valid = key + (j & 1) + 8 * (j >> 1) < end;
      sv[j] = valid ? sv[j] * qscale : -INFINITY;
      mx = fmaxf(mx, sv[j]);
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float m_new = fmaxf(m, mx);
    const float corr = m_new == -INFINITY ? 1.0f : exp2f(m - m_new);
    uint32_t pa[4] = {0u, 0u, 0u, 0u};  // P as the A operand: keys c .. +1 (a[0]) and 8 + c .. (a[2])
    float psum = 0.0f;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float p0 = m_new == -INFINITY ? 0.0f : exp2f(sv[2 * h] - m_new);
      const float p1 = m_new == -INFINITY ? 0.0f : exp2f(sv[2 * h + 1] - m_new);
      pa[2 * h] = pack_bf16x2(p0, p1);
      float r0, r1;  // the weights as the product sees them: numerator and l agree
      unpack_bf16x2(pa[2 * h], r0, r1);
      psum += r0 + r1;
    }
    l = l * corr + psum;
    m = m_new;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) o[n][0] *= corr, o[n][1] *= corr;

#pragma unroll
    for (int n = 0; n < D / 8; n += 2) {
      uint32_t b[4];  // V keys kr0 .. +15 of dims 8n .. 8n + 15, transposed
      ldmatrix_x4_trans(b, vs + swizzle<D>(kr0 + (lane & 7) + ((lane >> 3) & 1) * 8, n + (lane >> 4)));
      mma_16816(o[n], pa, b[0], b[1]);
      mma_16816(o[n + 1], pa, b[2], b[3]);
    }
  }
  finish_decode<D, W, 8, 1>(p, d, smem, reinterpret_cast<float*>(smem + L::out),
                            reinterpret_cast<float*>(smem + L::lse), item, kvh, t, split, o, m, l);
}

// grid (items, H), block D, S floats of shared memory:
// out = sum_s w_s o_s / sum_s w_s, w_s = 2^(lse_s - max lse). Every split
// wrote its o and lse (an empty one 0 and -inf). The lse values come in with
// one load per thread, and the o loop is unrolled so that its loads overlap.
template <typename T>
__global__ void merge_kernel(AttentionParamsT<T> p, DecodePlan d) {
  extern __shared__ float lse_s[];  // (S)
  pdl_trigger();
  const int item = blockIdx.x, h = blockIdx.y, dd = threadIdx.x;
  pdl_wait();
  const int t = d.items[item].token;
  const int H = p.num_heads, D = p.kv.head_dim, S = d.num_splits;
  const int64_t base = int64_t(item) * S;
  for (int s = dd; s < S; s += blockDim.x) lse_s[s] = d.lse_part[(base + s) * H + h];
  __syncthreads();
  const float v = merge_splits(S, [&](int r) { return lse_s[r]; },
                               [&](int r) { return d.o_part[((base + r) * H + h) * D + dd]; });
  store_f(p.out + int64_t(t) * H * D + int64_t(h) * D + dd, v);
}

// The kernel of a configuration, its shared memory set up once per process
// (the attribute is per function).
template <int D, int W, int S>
auto decode_kernel_ready() {
  static const bool configured = [] {
    CUDA_CHECK(cudaFuncSetAttribute(decode_kernel<D, W, S>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(DecodeSmem<D, W, S>::bytes)));
    return true;
  }();
  (void)configured;
  return decode_kernel<D, W, S>;
}

template <int D, int W, int S>
void launch_decode(const AttentionParams& p, const DecodePlan& d, dim3 grid, cudaStream_t s) {
  const unsigned cz = d.cluster ? static_cast<unsigned>(d.num_splits) : 1;
  launch_clusters(decode_kernel_ready<D, W, S>(), grid, 32 * W, DecodeSmem<D, W, S>::bytes, cz, s, p, d);
}

template <int D, int W, int S>
int blocks_per_sm() {
  int n = 0;
  CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, decode_kernel_ready<D, W, S>(), 32 * W,
                                                           DecodeSmem<D, W, S>::bytes));
  return n;
}

// The bf16 kernel or, on an fp8 cache (p.fp8.k set), attention_decode_fp8.cu's.
struct Launch {
  const AttentionParams& p;
  const DecodePlan& d;
  dim3 grid;
  cudaStream_t s;
  template <int D, int W, int S, bool F8>
  void operator()() const {
    if constexpr (F8)
      launch_decode_fp8<D, W, S>(p, d, grid, s);
    else
      launch_decode<D, W, S>(p, d, grid, s);
  }
};
struct Occupancy {
  template <int D, int W, int S, bool F8>
  int operator()() const {
    if constexpr (F8)
      return decode_fp8_blocks_per_sm<D, W, S>();
    else
      return blocks_per_sm<D, W, S>();
  }
};

// f.operator()<D, W, S, F8>() for head dim D and the configuration: W warps,
// 2 or 4; S stages, 2 to 4 for bf16 (more runs 4), 2, 3, 4, 6 or 8 on an fp8
// cache (5 and 7 run 4 and 6); the backend accepts no other W and S
// (cuda_backend.cu). 128 x 2 x 3 is the default branch.
template <bool F8, typename F>
auto with_config(int D, DecodeConfig c, F&& f) {
  const int st = F8 ? (c.stages == 5 || c.stages == 7 ? c.stages - 1 : c.stages) : std::min(c.stages, 4);
  const int key = (D == 128 ? 100 : 0) + c.warps * 10 + st;
  switch (key) {
    case 122: return f.template operator()<128, 2, 2, F8>();
    case 124: return f.template operator()<128, 2, 4, F8>();
    case 142: return f.template operator()<128, 4, 2, F8>();
    case 143: return f.template operator()<128, 4, 3, F8>();
    case 144: return f.template operator()<128, 4, 4, F8>();
    case 22: return f.template operator()<64, 2, 2, F8>();
    case 23: return f.template operator()<64, 2, 3, F8>();
    case 24: return f.template operator()<64, 2, 4, F8>();
    case 42: return f.template operator()<64, 4, 2, F8>();
    case 43: return f.template operator()<64, 4, 3, F8>();
    case 44: return f.template operator()<64, 4, 4, F8>();
    default: break;
  }
  if constexpr (F8) {
    switch (key) {
      case 126: return f.template operator()<128, 2, 6, F8>();
      case 128: return f.template operator()<128, 2, 8, F8>();
      case 146: return f.template operator()<128, 4, 6, F8>();
      case 148: return f.template operator()<128, 4, 8, F8>();
      case 26: return f.template operator()<64, 2, 6, F8>();
      case 28: return f.template operator()<64, 2, 8, F8>();
      case 46: return f.template operator()<64, 4, 6, F8>();
      case 48: return f.template operator()<64, 4, 8, F8>();
      default: break;
    }
  }
  return f.template operator()<128, 2, 3, F8>();
}

}  // namespace

int decode_blocks_per_sm(int head_dim, DecodeConfig c, bool fp8) {
  return fp8 ? with_config<true>(head_dim, c, Occupancy{}) : with_config<false>(head_dim, c, Occupancy{});
}

bool attention_supported(int head_dim, int group) {
  return (head_dim == 64 || head_dim == 128) && group >= 1 && group <= kMaxGroup;
}

template <typename T>
void merge_decode_splits(const AttentionParamsT<T>& p, const DecodePlan& d, cudaStream_t s) {
  launch(merge_kernel<T>, dim3(static_cast<unsigned>(d.num_items), static_cast<unsigned>(p.num_heads)),
         static_cast<unsigned>(p.kv.head_dim), d.num_splits * sizeof(float), s, p, d);
}
template void merge_decode_splits<bf16>(const AttentionParamsT<bf16>&, const DecodePlan&, cudaStream_t);
template void merge_decode_splits<float>(const AttentionParamsT<float>&, const DecodePlan&, cudaStream_t);

void decode_attention(const AttentionParams& p, const DecodePlan& d, cudaStream_t s) {
  if (d.cuda_cores) return decode_attention_cuda_cores(p, d, s);
  if (d.num_items == 0) return;
  const dim3 grid = decode_grid(d, p.kv.num_kv_heads);
  // merges its own splits
  if (p.fp8.k != nullptr)
    with_config<true>(p.kv.head_dim, d.config, Launch{p, d, grid, s});
  else
    with_config<false>(p.kv.head_dim, d.config, Launch{p, d, grid, s});
}

}  // namespace pagedrt::cuda
