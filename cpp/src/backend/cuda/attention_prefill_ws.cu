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
//   block = 3 warpgroups (384 threads); grid = min(work items, SMs), work
//   item = (tile, kv head), the plan's last tiles (the most keys) first,
//   dealt a round at a time (item_of: in a snake for one prompt)
//   shared memory: Q (128 x 128) + Stages x (K, V) (128 x 128), bf16: 160 KB
//   at 2 stages, 224 KB at 3; the 128-byte-swizzled layout of wgmma.cuh
//
// K/V come by TMA a page (or 128 keys of a larger page) at a time: a box of
// (64 dims, 1 kv head, page tokens) of the cache seen as a 3-D tensor (D,
// Hkv, slots), so block sizes must be powers of two from 8 (smaller ones run
// attention_prefill_wgmma.cu). Boxes wholly past the last key read the
// tensor's out-of-bounds zeros; the last page's slots past the sequence are
// masked, and zeroed in V before P V reads them (a freed block holds
// whatever its last request left there).
#include <algorithm>
#include <string>

#include "backend/cuda/cuda_check.hpp"
#include "backend/cuda/kernels.cuh"
#include "backend/cuda/mma.cuh"
#include "backend/cuda/prefill_rows.cuh"
#include "backend/cuda/tensor_map.hpp"
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
constexpr int kQReady = 3;    // named barriers 3 and 4: consumer c's own (its rows' range, zeroed V rows)

// Byte offsets in the (1,024-aligned) shared memory; a 128-row tile is two
// halves of 64 columns, 16 KB each.
template <int Stages>
struct WsSmem {
  static constexpr uint32_t half = 128 * 128;
  static constexpr uint32_t q = 0;                      // consumer c's rows at q + c * 8 KB in each half
  static constexpr uint32_t k = 2 * half;               // stage s at k + s * 2 half
  static constexpr uint32_t v = k + Stages * 2 * half;  // stage s at v + s * 2 half
  static constexpr uint32_t bytes = v + Stages * 2 * half;
  static constexpr uint32_t alloc = bytes + 1024;  // slack to align the start to 1,024
};

// The barriers, 8 bytes each from `base`: per stage full K, full V, empty K,
// empty V; per consumer full Q, empty Q.
template <int S>
struct Bars {
  uint32_t base;
  __device__ uint32_t full_k(int st) const { return base + 8 * st; }
  __device__ uint32_t full_v(int st) const { return base + 8 * (S + st); }
  __device__ uint32_t empty_k(int st) const { return base + 8 * (2 * S + st); }
  __device__ uint32_t empty_v(int st) const { return base + 8 * (3 * S + st); }
  __device__ uint32_t full_q(int c) const { return base + 8 * (4 * S + c); }
  __device__ uint32_t empty_q(int c) const { return base + 8 * (4 * S + 2 + c); }
  static constexpr int count = 4 * S + 4;
};

// Work item w (0 .. tiles x Hkv - 1): the plan's tiles from the last (the
// most keys) on, each for every kv head.
struct Item {
  int seq, row0, kvh, q0, rows_total, kmax, ntiles;
  __device__ __forceinline__ Item(const AttentionParams& p, const PrefillPlan& f, int w) {
    const int Hkv = p.kv.num_kv_heads, G = p.num_heads / Hkv;
    const int2 tile = f.tiles[f.num_tiles - 1 - w / Hkv];
    seq = tile.x;
    row0 = tile.y;
    kvh = w % Hkv;
    q0 = p.query_start[seq];
    rows_total = (p.query_start[seq + 1] - q0) * G;
    const int last_row = min(row0 + BQ, rows_total) - 1;
    kmax = p.positions[q0 + last_row / G] + 1;  // keys 0 .. kmax-1 are seen by some row
    ntiles = (kmax + BK - 1) / BK;
  }
};

// The block's item of round k (PrefillPlan::snake): the rounds' items in
// block order, every other round reversed; -1 past the last.
__device__ __forceinline__ int item_of(const PrefillPlan& f, int k, int num_items) {
  const int b = f.snake && (k & 1) ? gridDim.x - 1 - blockIdx.x : blockIdx.x, w = k * gridDim.x + b;
  return w < num_items ? w : -1;
}

// A consumer warpgroup's per-tile work, straight-line: the products' issue,
// waits and barriers sit on no divergent path (ptxas would serialize wgmma).
// Key tiles are counted per item (t: which keys) and over the block's life
// (g: which stage, which phase).
template <int S>
struct Consumer {
  int c, lane, pos_lo, pos_hi;
  uint32_t q_desc, k0, v0;
  Bars<S> bars;
  float qscale;
  float m_lo, m_hi, l_lo, l_hi, c_lo, c_hi;

  __device__ __forceinline__ void reset() {
    m_lo = m_hi = -INFINITY;
    l_lo = l_hi = 0.0f;
    c_lo = c_hi = 1.0f;
  }
  // S = Q K^T of the tile in stage st: k-step k reads columns 16k .. 16k + 15.
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
  // O += P V of the tile in stage st: k-step j reads keys 16j .. 16j + 15 of V.
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
  // This warpgroup's turn to issue products; after issuing, the other's.
  __device__ __forceinline__ void turn_begin() const { named_bar_sync(kPingPong + c, 256); }
  __device__ __forceinline__ void turn_end() const { named_bar_arrive(kPingPong + (1 - c), 256); }

  // An item's first key tile (block tile g): S_0 and its softmax.
  template <bool kMask>
  __device__ __forceinline__ void first(float (&s)[64], uint32_t (&pa)[BK / 16][4], int g) {
    const int st = g % S;
    mbar_wait(bars.full_k(st), (g / S) & 1);
    turn_begin();
    wgmma_fence();
    issue_s(s, st);
    turn_end();
    wgmma_wait<0>();
    mbar_arrive_lane0(bars.empty_k(st), lane);
    wgmma_hold(s);
    softmax<kMask>(s, 0);
    pack_p<BK / 8>(s, pa);
  }
  // Key tile t >= 1 (block tile g): S_t, and P_{t-1} V_{t-1} behind it; S_t's
  // softmax while P V runs; P_t packed once P V has read P_{t-1}.
  template <bool kMask>
  __device__ __forceinline__ void step(float (&s)[64], float (&o)[64], uint32_t (&pa)[BK / 16][4], int t, int g) {
    const int st = g % S, pt = (g - 1) % S;
    mbar_wait(bars.full_k(st), (g / S) & 1);
    turn_begin();
    wgmma_fence();
    issue_s(s, st);
    rescale(o);  // to the max P_{t-1} was taken at
    mbar_wait(bars.full_v(pt), ((g - 1) / S) & 1);
    wgmma_hold(pa);
    wgmma_fence();
    issue_pv(o, pa, pt);
    turn_end();
    wgmma_wait<1>();
    mbar_arrive_lane0(bars.empty_k(st), lane);
    wgmma_hold(s);  // after the arrive: the softmax may not move above it (K freed early)
    softmax<kMask>(s, t * BK);
    wgmma_wait<0>();
    wgmma_hold(o);
    wgmma_hold(pa);
    mbar_arrive_lane0(bars.empty_v(pt), lane);
    pack_p<BK / 8>(s, pa);
  }
  // The item's last P V (its last key tile is block tile g; its rows from
  // `stale` on hold slots past the sequence, read with its last page).
  __device__ __forceinline__ void last(float (&o)[64], uint32_t (&pa)[BK / 16][4], int g, int stale, int box,
                                       unsigned char* smem, int ct) {
    const int st = g % S;
    rescale(o);
    mbar_wait(bars.full_v(st), (g / S) & 1);
    if (stale < BK) {
      // Zeros over those rows (up to the end of their page: later pages came
      // as the tensor's zeros): P is 0 there, but 0 x NaN is NaN, and a freed
      // block may hold anything a request left. Both warpgroups may write
      // the same zeros; each fences its own before its product reads them.
      const int end = min(BK, (stale + box - 1) / box * box);
      unsigned char* v = smem + (v0 - smem_addr(smem)) + st * 2 * 128 * 128;  // the stage's V, generic
      for (int i = ct % 128; i < (end - stale) * 16; i += 128) {
        const int r = stale + i / 16, ch = i % 16;
        *reinterpret_cast<uint4*>(v + tile_offset(r, ch, BK)) = make_uint4(0, 0, 0, 0);
      }
      fence_proxy_async();
      named_bar_sync(kQReady + c, 128);
    }
    wgmma_hold(pa);
    wgmma_fence();
    issue_pv(o, pa, st);
    wgmma_wait<0>();
    wgmma_hold(o);
    mbar_arrive_lane0(bars.empty_v(st), lane);
  }
  // A key tile past this warpgroup's rows: released as it lands (phases stay
  // in step), and the turn taken, so the other warpgroup is never left waiting.
  __device__ __forceinline__ void pass(int g) const {
    const int st = g % S;
    mbar_wait(bars.full_k(st), (g / S) & 1);
    turn_begin();
    turn_end();
    mbar_arrive_lane0(bars.empty_k(st), lane);
    mbar_wait(bars.full_v(st), (g / S) & 1);
    mbar_arrive_lane0(bars.empty_v(st), lane);
  }
};

// Persistent: a block an SM, each taking an item a round (item_of);
// the producer runs on into the next item's Q and K/V while the consumers
// finish one, and their tiles share one ring.
template <int Stages>
__global__ void __launch_bounds__(kThreads, 1)
    prefill_ws_kernel(const __grid_constant__ CUtensorMap qmap, const __grid_constant__ CUtensorMap kmap,
                      const __grid_constant__ CUtensorMap vmap, AttentionParams p, PrefillPlan f, int box) {
#if !defined(__CUDA_ARCH__) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using L = WsSmem<Stages>;
  constexpr int S = Stages;
  extern __shared__ unsigned char smem_raw[];
  __shared__ alignas(8) uint64_t bar_mem[Bars<S>::count];
  __shared__ int warp_pos[8][2];  // each consumer warp's rows' (min, max) position
  const uint32_t raw = smem_addr(smem_raw), base = (raw + 1023) & ~1023u;
  const Bars<S> bars{smem_addr(bar_mem)};
  const int G = p.num_heads / p.kv.num_kv_heads, num_items = f.num_tiles * p.kv.num_kv_heads;
  const int tid = threadIdx.x;

  if (tid == 0) {
#pragma unroll
    for (int s = 0; s < S; ++s) {
      mbar_init(bars.full_k(s), 1);  // the producer's arrival + the bytes
      mbar_init(bars.full_v(s), 1);
      mbar_init(bars.empty_k(s), 8);  // a lane of each consumer warp
      mbar_init(bars.empty_v(s), 8);
    }
    for (int c = 0; c < 2; ++c) {
      mbar_init(bars.full_q(c), 1);
      mbar_init(bars.empty_q(c), 4);  // a lane of each of the consumer's warps
    }
    mbar_fence_init();
  }
  __syncthreads();  // the last block-wide barrier: the producer's idle warps leave

  if (tid < 128) {  // the producer: its first warp, a box (page) a lane
    setmaxnreg_dec<24>();
    if (tid >= 32) return;
    const int lane = tid, bs = p.kv.block_size, shift = p.kv.block_shift, oob = int(p.kv.num_blocks) * bs;
    int g0 = 0;  // the block's key tiles so far
    for (int k = 0, w = item_of(f, 0, num_items); w >= 0; ++k, w = item_of(f, k, num_items)) {
      const Item it(p, f, w);
      const int32_t* pages = p.kv.pages(it.seq);
      // The lane's box of tile t: its slot, looked up one tile ahead so that
      // the page-table read is not waited for (all lanes' reads in flight at once).
      auto slot_of = [&](int t) {
        const int pos = t * BK + lane * box;
        return lane * box < BK && pos < it.kmax ? (pages[pos >> shift] << shift) + (pos & (bs - 1)) : oob;
      };
      int slot = slot_of(0);
      for (int t = 0; t < it.ntiles; ++t) {
        const int g = g0 + t, st = g % S, next = t + 1 < it.ntiles ? slot_of(t + 1) : oob;
        const uint32_t empty_parity = ((g / S) & 1) ^ 1;  // the phase tile g - S released
        for (int which = 0; which < 2; ++which) {         // K, then V
          const CUtensorMap* map = which ? &vmap : &kmap;
          const uint32_t full = which ? bars.full_v(st) : bars.full_k(st),
                         dst = base + (which ? L::v : L::k) + st * 2 * L::half + lane * box * 128;
          if (g >= S) mbar_wait(which ? bars.empty_v(st) : bars.empty_k(st), empty_parity);
          if (lane == 0) mbar_arrive_expect_tx(full, 2 * L::half);
          __syncwarp();  // the bytes announced before any of them land
          if (lane * box < BK) {
            tma_load_3d(dst, map, full, 0, it.kvh, slot);
            tma_load_3d(dst + L::half, map, full, 64, it.kvh, slot);
          }
          if (which == 1 && t == 0) {  // the item's Q, behind its first K/V tile
            for (int c = 0; c < 2; ++c) {   // rows 64c .. 64c + 63, once consumer c is done with the last item's
              if (k > 0) mbar_wait(bars.empty_q(c), (k & 1) ^ 1);
              if (lane == 0) mbar_arrive_expect_tx(bars.full_q(c), 2 * 64 * 128);
              __syncwarp();
              if (lane < 2)  // a half of D a lane
                tma_load_3d(base + L::q + lane * L::half + c * 64 * 128, &qmap, bars.full_q(c), lane * 64,
                            it.kvh * G, it.q0 + (it.row0 + 64 * c) / G);
            }
          }
        }
        slot = next;
      }
      g0 += it.ntiles;
    }
    return;
  }

  setmaxnreg_inc<240>();
  const int ct = tid - 128, c = ct / 128, warp = ct / 32, lane = ct % 32;
  unsigned char* smem = smem_raw + (base - raw);
  Consumer<S> w;
  w.c = c;
  w.lane = lane;
  w.q_desc = base + L::q + c * 64 * 128;
  w.k0 = base + L::k;
  w.v0 = base + L::v;
  w.bars = bars;
  w.qscale = p.scale * kLog2e;
  float s[64], o[64];  // accumulators: 8-column block j in [4j .. 4j + 3] (wgmma.cuh)
  uint32_t pa[BK / 16][4];
  if (c == 1) named_bar_arrive(kPingPong, 256);  // consumer 0 issues first
  int g0 = 0;
  for (int k = 0, wi = item_of(f, 0, num_items); wi >= 0; ++k, wi = item_of(f, k, num_items)) {
    const Item it(p, f, wi);
    // This thread's rows: lo = 16 warp + lane / 4 and hi = lo + 8 (position
    // -1: past the sequence); the warpgroup's range of positions decides how
    // many tiles it computes and from which one on it masks.
    const int r_lo = it.row0 + warp * 16 + lane / 4, r_hi = r_lo + 8;
    w.pos_lo = r_lo < it.rows_total ? p.positions[it.q0 + r_lo / G] : -1;
    w.pos_hi = r_hi < it.rows_total ? p.positions[it.q0 + r_hi / G] : -1;
    {
      int mn, mx;
      warp_position_range(w.pos_lo, w.pos_hi, mn, mx);
      if (lane == 0) warp_pos[warp][0] = mn, warp_pos[warp][1] = mx;
    }
    named_bar_sync(kQReady + c, 128);
    int wg_min = warp_pos[4 * c][0], wg_max = warp_pos[4 * c][1];
#pragma unroll
    for (int i = 1; i < 4; ++i)
      wg_min = min(wg_min, warp_pos[4 * c + i][0]), wg_max = max(wg_max, warp_pos[4 * c + i][1]);
    // Tiles 0 .. nt-1 hold keys some row of this warpgroup sees; from tile nm
    // on, some key is past a row's position (masked).
    const int nt = wg_max < 0 ? 0 : min(it.ntiles, wg_max / BK + 1);
    const int nm = min(nt, (wg_min + 1) / BK);

    w.reset();
#pragma unroll
    for (int i = 0; i < 64; ++i) o[i] = 0.0f;
    mbar_wait(bars.full_q(c), k & 1);
    if (nt > 0) {
      if (nm > 0)
        w.template first<false>(s, pa, g0);
      else
        w.template first<true>(s, pa, g0);
      for (int t = 1; t < nm; ++t) w.template step<false>(s, o, pa, t, g0 + t);
      for (int t = max(nm, 1); t < nt; ++t) w.template step<true>(s, o, pa, t, g0 + t);
    }
    mbar_arrive_lane0(bars.empty_q(c), lane);  // every product with this Q is done
    if (nt > 0) w.last(o, pa, g0 + nt - 1, nt == it.ntiles ? it.kmax - (nt - 1) * BK : BK, box, smem, ct);
    for (int t = nt; t < it.ntiles; ++t) w.pass(g0 + t);
    store_rows<D>(p, reinterpret_cast<const float(&)[D / 8][4]>(o), w.l_lo, w.l_hi, r_lo, r_hi, it.rows_total, it.q0,
                  it.kvh, lane);
    g0 += it.ntiles;
  }
  // Consumer 1 arrived once before its first turn and once after each: the
  // last of those, taken here, leaves no arrival pending at exit.
  if (c == 0) named_bar_sync(kPingPong, 256);
#else
  __trap();  // built without sm_90a: prefill_wgmma_built() is false and nothing launches this
#endif
}

// A 3-D bf16 tensor (D = 128, n1, n2) with byte strides stride1 and stride2,
// read in boxes of (64, b1, b2).
CUtensorMap tensor_map(const bf16* data, int64_t n1, int64_t n2, int64_t stride1, int64_t stride2, int b1, int b2,
                       const char* what) {
  const uint64_t dims[3] = {uint64_t(D), uint64_t(n1), uint64_t(n2)}, strides[2] = {uint64_t(stride1),
                                                                                    uint64_t(stride2)};
  const uint32_t box[3] = {64, uint32_t(b1), uint32_t(b2)};
  return tensor_map_bf16(data, 3, dims, strides, box, what);
}

int sm_count() {
  int dev = 0, n = 0;
  CUDA_CHECK(cudaGetDevice(&dev));
  CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
  return n;
}

template <int Stages>
void launch_ws(const AttentionParams& p, const PrefillPlan& f, int box, cudaStream_t s) {
  static const bool configured = [] {  // per process; the attribute is per function
    CUDA_CHECK(cudaFuncSetAttribute(prefill_ws_kernel<Stages>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(WsSmem<Stages>::alloc)));
    return true;
  }();
  (void)configured;
  static const int sms = sm_count();
  const int64_t H = p.num_heads, Hkv = p.kv.num_kv_heads, G = H / Hkv;
  const int64_t slots = p.kv.num_blocks * p.kv.block_size;
  // qkv (tokens, H + 2 Hkv heads, D): a consumer's 64 rows are 64 / G tokens
  // of the group's G heads, as (token, head) rows.
  const CUtensorMap qm =
      tensor_map(p.qkv, H + 2 * Hkv, f.num_tokens, D * 2, (H + 2 * Hkv) * D * 2, int(G), int(64 / G),
                 "the prefill kernel's queries");
  // The cache (num_blocks, block_size, Hkv, D) as (D, Hkv, slots): a box is a page of one kv head.
  const CUtensorMap km = tensor_map(p.kv.k, Hkv, slots, D * 2, Hkv * D * 2, 1, box, "the prefill kernel's K cache");
  const CUtensorMap vm = tensor_map(p.kv.v, Hkv, slots, D * 2, Hkv * D * 2, 1, box, "the prefill kernel's V cache");
  const int items = f.num_tiles * int(Hkv);
  prefill_ws_kernel<Stages><<<std::min(items, sms), kThreads, WsSmem<Stages>::alloc, s>>>(qm, km, vm, p, f, box);
  CUDA_CHECK_LAUNCH();
}

}  // namespace

bool prefill_ws_fits(const AttentionParams& p) {
  const int G = p.num_heads / p.kv.num_kv_heads;
  return p.kv.head_dim == D && 64 % G == 0 && p.kv.block_shift >= 3 &&
         p.kv.num_blocks * p.kv.block_size < (int64_t{1} << 31);
}

void prefill_attention_ws(const AttentionParams& p, const PrefillPlan& f, cudaStream_t s) {
  const int box = p.kv.block_size < BK ? p.kv.block_size : BK;  // keys a box: a page, or 128 of a larger one
  if (f.stages == 3)
    launch_ws<3>(p, f, box, s);
  else
    launch_ws<2>(p, f, box, s);
}

}  // namespace pagedrt::cuda
