// backend/cuda/attention_prefill_ws.cu — paged prefill attention on Hopper,
// warp-specialized (FlashAttention-3's schedule): one warpgroup loads K/V
// tiles by TMA, two compute on wgmma; head dim 128, sm_90a.
//
// The same work and results as attention_prefill_wgmma.cu (tiles of 128 rows,
// a row = (query token, head of the kv head's group), causal by position,
// which covers chunked prefill and mixed steps). That kernel's warpgroups
// copied each tile themselves and met at a block barrier every tile, so the
// tensor cores idled through every softmax (270 TFLOP/s on an H200's 8 x
// 2,048). Here:
//   - warpgroup 0 (its first warp) copies K and V tiles with TMA, a page a
//     box and a lane, into a ring of `Stages` stages, each with "full" and
//     "empty" mbarriers for K and for V (tma.cuh); it keeps 24 registers;
//   - warpgroups 1 and 2 own rows 0-63 and 64-127 of the tile, at 240
//     registers; per key tile t each issues S_t = Q K_t^T and, behind it,
//     O += P_{t-1} V_{t-1}, then runs the softmax of S_t while P V runs;
//   - the two take turns to issue (named barriers 1 and 2, "ping-pong"), so
//     one's softmax overlaps the other's products.
//
//   block = 3 warpgroups (384 threads), grid (tiles, Hkv), the last tiles
//   first (they have the most keys)
//   shared memory: Q (128 x 128) + Stages x (K, V) (128 x 128), bf16: 160 KB
//   at 2 stages, 224 KB at 3; the 128-byte-swizzled layout of wgmma.cuh
//
// K/V come by TMA a page (or 128 keys of a larger page) at a time: a box of
// (64 dims, 1 kv head, page tokens) of the cache seen as a 3-D tensor (D,
// Hkv, slots), so block sizes must be powers of two from 8 (smaller ones run
// attention_prefill_wgmma.cu). Boxes wholly past the last key read the
// tensor's out-of-bounds zeros; the last page's slots past the sequence are
// read as they are (the pool starts zeroed, KvCache::allocate) and masked.
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled

#include <cstdlib>
#include <string>

#include "backend/cuda/cuda_check.hpp"
#include "backend/cuda/kernels.cuh"
#include "backend/cuda/mma.cuh"
#include "backend/cuda/prefill_rows.cuh"
#include "backend/cuda/tma.cuh"
#include "backend/cuda/wgmma.cuh"
#include "pagedrt/error.hpp"

// The compilation passes without sm_90a see an empty kernel body, and would
// warn that its constants and helpers go unused.
#pragma nv_diag_suppress 177

namespace pagedrt::cuda {
namespace {

constexpr int D = 128, BQ = 128, BK = 128, kThreads = 384;
constexpr int kPingPong = 1;  // named barriers 1 and 2: consumer c waits on 1 + c
constexpr int kQReady = 3;    // named barriers 3 and 4: consumer c's Q has landed

// Byte offsets in the (1,024-aligned) shared memory; a 128-row tile is two
// halves of 64 columns, 16 KB each.
template <int Stages>
struct WsSmem {
  static constexpr uint32_t half = 128 * 128;
  static constexpr uint32_t q = 0;
  static constexpr uint32_t k = 2 * half;               // stage s at k + s * 2 half
  static constexpr uint32_t v = k + Stages * 2 * half;  // stage s at v + s * 2 half
  static constexpr uint32_t bytes = v + Stages * 2 * half;
  static constexpr uint32_t alloc = bytes + 1024;  // slack to align the start to 1,024
};

// A consumer warpgroup's per-tile work, straight-line: the products' issue,
// waits and barriers sit on no divergent path (ptxas would serialize wgmma).
struct Consumer {
  int c, lane, pos_lo, pos_hi;
  uint32_t q_desc, k0, v0, bars;
  float qscale;
  float m_lo = -INFINITY, m_hi = -INFINITY, l_lo = 0.0f, l_hi = 0.0f, c_lo = 1.0f, c_hi = 1.0f;

  __device__ uint32_t full_k(int s) const { return bars + 8 * s; }
  __device__ uint32_t full_v(int s, int S) const { return bars + 8 * (S + s); }
  __device__ uint32_t empty_k(int s, int S) const { return bars + 8 * (2 * S + s); }
  __device__ uint32_t empty_v(int s, int S) const { return bars + 8 * (3 * S + s); }

  // S = Q K^T of the tile in stage s: k-step k reads columns 16k .. 16k + 15.
  __device__ __forceinline__ void issue_s(float (&s)[64], int st) const {
    const uint32_t kb = k0 + st * 2 * 128 * 128;
#pragma unroll
    for (int k = 0; k < D / 16; ++k) {
      const uint32_t col = (k & 3) * 32;
      wgmma_m64n128_ss(s, gmma_desc(q_desc + (k >> 2) * 128 * 128 + col, 16, 1024),
                       gmma_desc(kb + (k >> 2) * 128 * 128 + col, 16, 1024), k > 0);
    }
    wgmma_commit();
  }
  // O += P V of the tile in stage s: k-step j reads keys 16j .. 16j + 15 of V.
  __device__ __forceinline__ void issue_pv(float (&o)[64], const uint32_t (&pa)[BK / 16][4], int st) const {
    const uint32_t vb = v0 + st * 2 * 128 * 128;
#pragma unroll
    for (int j = 0; j < BK / 16; ++j) wgmma_m64n128_rs_bmn(o, pa[j], gmma_desc(vb + j * 16 * 128, 128 * 128, 1024));
    wgmma_commit();
  }
  template <bool kMask>
  __device__ __forceinline__ void softmax(float (&s)[64], int kb) {
    online_softmax(reinterpret_cast<float(&)[BK / 8][4]>(s), kb, kMask, lane, pos_lo, pos_hi, qscale, m_lo, m_hi,
                   l_lo, l_hi, c_lo, c_hi);
  }
  __device__ __forceinline__ void rescale(float (&o)[64]) const {
#pragma unroll
    for (int j = 0; j < D / 8; ++j) o[4 * j] *= c_lo, o[4 * j + 1] *= c_lo, o[4 * j + 2] *= c_hi, o[4 * j + 3] *= c_hi;
  }
  // P (exp of the scores, bf16) as the A operand of k-step j: blocks 2j, 2j + 1.
  __device__ __forceinline__ static void pack(const float (&s)[64], uint32_t (&pa)[BK / 16][4]) {
#pragma unroll
    for (int j = 0; j < BK / 16; ++j) {
      pa[j][0] = pack_bf16x2(s[8 * j + 0], s[8 * j + 1]);
      pa[j][1] = pack_bf16x2(s[8 * j + 2], s[8 * j + 3]);
      pa[j][2] = pack_bf16x2(s[8 * j + 4], s[8 * j + 5]);
      pa[j][3] = pack_bf16x2(s[8 * j + 6], s[8 * j + 7]);
    }
  }
  // This warpgroup's turn to issue products; after issuing, the other's.
  __device__ __forceinline__ void turn_begin() const { named_bar_sync(kPingPong + c, 256); }
  __device__ __forceinline__ void turn_end() const { named_bar_arrive(kPingPong + (1 - c), 256); }

  // Key tile t (t >= 1): S_t, and P_{t-1} V_{t-1} behind it; S_t's softmax
  // while P V runs; P_t packed once P V has read P_{t-1}.
  template <bool kMask, int S>
  __device__ __forceinline__ void step(float (&s)[64], float (&o)[64], uint32_t (&pa)[BK / 16][4], int t) {
    const int st = t % S, pt = (t - 1) % S;
    mbar_wait(full_k(st), (t / S) & 1);
    turn_begin();
    wgmma_fence();
    issue_s(s, st);
    rescale(o);  // to the max P_{t-1} was taken at
    mbar_wait(full_v(pt, S), ((t - 1) / S) & 1);
    wgmma_fence();
    issue_pv(o, pa, pt);
    turn_end();
    wgmma_wait<1>();
    wgmma_hold(s);
    mbar_arrive_lane0(empty_k(st, S), lane);
    softmax<kMask>(s, t * BK);
    wgmma_wait<0>();
    wgmma_hold(o);
    mbar_arrive_lane0(empty_v(pt, S), lane);
    pack(s, pa);
  }
};

template <int Stages>
__global__ void __launch_bounds__(kThreads, 1)
    prefill_ws_kernel(const __grid_constant__ CUtensorMap kmap, const __grid_constant__ CUtensorMap vmap,
                      AttentionParams p, PrefillPlan f, int box) {
#if !defined(__CUDA_ARCH__) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using L = WsSmem<Stages>;
  constexpr int S = Stages;
  extern __shared__ unsigned char smem_raw[];
  __shared__ alignas(8) uint64_t bars[4 * S];  // full K, full V, empty K, empty V; a stage each
  __shared__ int warp_pos[8][2];               // each consumer warp's rows' (min, max) position
  const uint32_t raw = smem_addr(smem_raw), base = (raw + 1023) & ~1023u, bar0 = smem_addr(bars);

  const int2 tile = f.tiles[f.num_tiles - 1 - blockIdx.x];
  const int seq = tile.x, row0 = tile.y, kvh = blockIdx.y;
  const int H = p.num_heads, Hkv = p.kv.num_kv_heads, G = H / Hkv;
  const int q0 = p.query_start[seq];
  const int rows_total = (p.query_start[seq + 1] - q0) * G;
  const int last_row = min(row0 + BQ, rows_total) - 1;
  const int kmax = p.positions[q0 + last_row / G] + 1;  // keys 0 .. kmax-1 are seen by some row
  const int ntiles = (kmax + BK - 1) / BK;
  const int tid = threadIdx.x;

  if (tid == 0) {
#pragma unroll
    for (int s = 0; s < S; ++s) {
      mbar_init(bar0 + 8 * s, 1);            // full K: the producer's arrival + the bytes
      mbar_init(bar0 + 8 * (S + s), 1);      // full V
      mbar_init(bar0 + 8 * (2 * S + s), 8);  // empty K: a lane of each consumer warp
      mbar_init(bar0 + 8 * (3 * S + s), 8);  // empty V
    }
    mbar_fence_init();
  }
  __syncthreads();  // the last block-wide barrier: the producer's idle warps leave

  if (tid < 128) {  // the producer: its first warp, a box (page) a lane
    setmaxnreg_dec<24>();
    if (tid >= 32) return;
    const int lane = tid, bs = p.kv.block_size, shift = p.kv.block_shift, oob = int(p.kv.num_blocks) * bs;
    const int32_t* pages = p.kv.pages(seq);
    // The lane's box of tile t: its slot, looked up one tile ahead so that
    // the page-table read is not waited for (all lanes' reads in flight at once).
    auto slot_of = [&](int t) {
      const int pos = t * BK + lane * box;
      return lane * box < BK && pos < kmax ? (pages[pos >> shift] << shift) + (pos & (bs - 1)) : oob;
    };
    int slot = slot_of(0);
    for (int t = 0; t < ntiles; ++t) {
      const int st = t % S, next = t + 1 < ntiles ? slot_of(t + 1) : oob;
      const uint32_t empty_parity = ((t / S) & 1) ^ 1;  // the phase tile t - S released
      for (int which = 0; which < 2; ++which) {         // K, then V
        const CUtensorMap* map = which ? &vmap : &kmap;
        const uint32_t full = bar0 + 8 * (which * S + st),
                       dst = base + (which ? L::v : L::k) + st * 2 * L::half + lane * box * 128;
        if (t >= S) mbar_wait(bar0 + 8 * ((2 + which) * S + st), empty_parity);
        if (lane == 0) mbar_arrive_expect_tx(full, 2 * L::half);
        __syncwarp();  // the bytes announced before any of them land
        if (lane * box < BK) {
          tma_load_3d(dst, map, full, 0, kvh, slot);
          tma_load_3d(dst + L::half, map, full, 64, kvh, slot);
        }
      }
      slot = next;
    }
    return;
  }

  setmaxnreg_inc<240>();
  const int ct = tid - 128, c = ct / 128, warp = ct / 32, lane = ct % 32;
  const int64_t row_stride = int64_t(H + 2 * Hkv) * D;
  unsigned char* smem = smem_raw + (base - raw);
  // This warpgroup's 64 rows of Q (zeros past the sequence).
#pragma unroll
  for (int i = 0; i < 64 * 16 / 128; ++i) {
    const int idx = ct % 128 + i * 128, r = 64 * c + idx / 16, ch = idx % 16, R = row0 + r;
    const bool valid = R < rows_total;
    const bf16* src = valid ? p.qkv + (q0 + R / G) * row_stride + int64_t(kvh * G + R % G) * D + ch * 8 : p.qkv;
    cp_async16(smem + L::q + tile_offset(r, ch, BQ), src, valid ? 16 : 0);
  }
  cp_async_commit();

  // This thread's rows: lo = 16 warp + lane / 4 and hi = lo + 8 (position -1:
  // past the sequence); the warpgroup's range of positions decides how many
  // tiles it computes and from which one on it masks.
  const int r_lo = row0 + warp * 16 + lane / 4, r_hi = r_lo + 8;
  Consumer w;
  w.c = c;
  w.lane = lane;
  w.pos_lo = r_lo < rows_total ? p.positions[q0 + r_lo / G] : -1;
  w.pos_hi = r_hi < rows_total ? p.positions[q0 + r_hi / G] : -1;
  w.q_desc = base + L::q + c * 64 * 128;
  w.k0 = base + L::k;
  w.v0 = base + L::v;
  w.bars = bar0;
  w.qscale = p.scale * kLog2e;
  {
    int mn, mx;
    warp_position_range(w.pos_lo, w.pos_hi, mn, mx);
    if (lane == 0) warp_pos[warp][0] = mn, warp_pos[warp][1] = mx;
  }
  cp_async_wait<0>();
  fence_proxy_async();  // this thread's Q copies, visible to wgmma after the barrier
  named_bar_sync(kQReady + c, 128);
  int wg_min = warp_pos[4 * c][0], wg_max = warp_pos[4 * c][1];
#pragma unroll
  for (int i = 1; i < 4; ++i) wg_min = min(wg_min, warp_pos[4 * c + i][0]), wg_max = max(wg_max, warp_pos[4 * c + i][1]);
  // Tiles 0 .. nt-1 hold keys some row of this warpgroup sees; from tile nm
  // on, some key is past a row's position (masked).
  const int nt = wg_max < 0 ? 0 : min(ntiles, wg_max / BK + 1);
  const int nm = min(nt, (wg_min + 1) / BK);

  float s[64], o[64];  // accumulators: 8-column block j in [4j .. 4j + 3] (wgmma.cuh)
  uint32_t pa[BK / 16][4];
#pragma unroll
  for (int i = 0; i < 64; ++i) o[i] = 0.0f;
  if (c == 1) named_bar_arrive(kPingPong, 256);  // consumer 0 issues first
  if (nt > 0) {
    mbar_wait(w.full_k(0), 0);
    w.turn_begin();
    wgmma_fence();
    w.issue_s(s, 0);
    w.turn_end();
    wgmma_wait<0>();
    wgmma_hold(s);
    mbar_arrive_lane0(w.empty_k(0, S), lane);
    if (nm > 0)
      w.softmax<false>(s, 0);
    else
      w.softmax<true>(s, 0);
    Consumer::pack(s, pa);
    for (int t = 1; t < nm; ++t) w.step<false, S>(s, o, pa, t);
    for (int t = max(nm, 1); t < nt; ++t) w.step<true, S>(s, o, pa, t);
    // The last tile's P V.
    const int pt = (nt - 1) % S;
    w.rescale(o);
    mbar_wait(w.full_v(pt, S), ((nt - 1) / S) & 1);
    wgmma_fence();
    w.issue_pv(o, pa, pt);
    wgmma_wait<0>();
    wgmma_hold(o);
    mbar_arrive_lane0(w.empty_v(pt, S), lane);
  }
  // Tiles past this warpgroup's rows: released as they land (phases stay in
  // step), and the turns taken, so the other warpgroup is never left waiting.
  for (int t = nt; t < ntiles; ++t) {
    const int st = t % S;
    mbar_wait(w.full_k(st), (t / S) & 1);
    w.turn_begin();
    w.turn_end();
    mbar_arrive_lane0(w.empty_k(st, S), lane);
    mbar_wait(w.full_v(st, S), (t / S) & 1);
    mbar_arrive_lane0(w.empty_v(st, S), lane);
  }
  // Consumer 1 arrived once before its first turn and once after each: the
  // last of those, taken here, leaves no arrival pending at exit.
  if (c == 0) named_bar_sync(kPingPong, 256);
  store_rows<D>(p, reinterpret_cast<const float(&)[D / 8][4]>(o), w.l_lo, w.l_hi, r_lo, r_hi, rows_total, q0, kvh,
                lane);
#else
  __trap();  // built without sm_90a: prefill_wgmma_built() is false and nothing launches this
#endif
}

// cuTensorMapEncodeTiled from the driver (through the runtime: no -lcuda).
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult found{};
    CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &found));
    if (found != cudaDriverEntryPointSuccess || f == nullptr)
      throw Error(ErrorKind::Runtime, "the CUDA driver has no cuTensorMapEncodeTiled (the prefill kernel's TMA)");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

// One layer's K or V cache (num_blocks, block_size, Hkv, D = 128) as a 3-D
// tensor (D, Hkv, slots) read in boxes of (64, 1, box) with the 128-byte swizzle.
CUtensorMap cache_map(const bf16* cache, int64_t slots, int hkv, int box) {
  CUtensorMap m;
  const cuuint64_t dims[3] = {cuuint64_t(D), cuuint64_t(hkv), cuuint64_t(slots)};
  const cuuint64_t strides[2] = {cuuint64_t(D) * 2, cuuint64_t(hkv) * D * 2};  // bytes, of dims 1 and 2
  const cuuint32_t boxes[3] = {64, 1, cuuint32_t(box)}, steps[3] = {1, 1, 1};
  const CUresult r = tensor_map_encoder()(&m, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 3, const_cast<bf16*>(cache), dims,
                                          strides, boxes, steps, CU_TENSOR_MAP_INTERLEAVE_NONE,
                                          CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                                          CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS)
    throw Error(ErrorKind::Runtime, "cuTensorMapEncodeTiled failed (" + std::to_string(int(r)) + ") for a KV cache of " +
                                        std::to_string(slots) + " slots, " + std::to_string(hkv) + " kv heads");
  return m;
}

template <int Stages>
void launch_ws(const AttentionParams& p, const PrefillPlan& f, int box, cudaStream_t s) {
  static const bool configured = [] {  // per process; the attribute is per function
    CUDA_CHECK(cudaFuncSetAttribute(prefill_ws_kernel<Stages>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(WsSmem<Stages>::alloc)));
    return true;
  }();
  (void)configured;
  const int64_t slots = p.kv.num_blocks * p.kv.block_size;
  const CUtensorMap km = cache_map(p.kv.k, slots, p.kv.num_kv_heads, box);
  const CUtensorMap vm = cache_map(p.kv.v, slots, p.kv.num_kv_heads, box);
  const dim3 grid(static_cast<unsigned>(f.num_tiles), static_cast<unsigned>(p.kv.num_kv_heads));
  prefill_ws_kernel<Stages><<<grid, kThreads, WsSmem<Stages>::alloc, s>>>(km, vm, p, f, box);
  CUDA_CHECK_LAUNCH();
}

}  // namespace

bool prefill_ws_fits(const AttentionParams& p) {
  const int bs = p.kv.block_size;
  return p.kv.head_dim == D && p.kv.block_shift >= 3 && p.kv.num_blocks * bs < (int64_t{1} << 31);
}

void prefill_attention_ws(const AttentionParams& p, const PrefillPlan& f, cudaStream_t s) {
  const int box = p.kv.block_size < BK ? p.kv.block_size : BK;  // keys a box: a page, or 128 of a larger one
  if (f.stages == 3)
    launch_ws<3>(p, f, box, s);
  else
    launch_ws<2>(p, f, box, s);
}

}  // namespace pagedrt::cuda
