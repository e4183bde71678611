// backend/cuda/attention_prefill.cu — paged prefill attention on tensor cores
// (FlashAttention-2 style: mma.sync, S, P and O in registers).
//
// One block = (tile of BQ = 64 or 128 rows, kv head); a row is (query token,
// query head of the group), so the G heads sharing a kv head share every K/V
// tile read. Each of the BQ / 16 warps owns 16 rows: their Q as mma A fragments, their S = Q K^T
// and O += P V as fp32 accumulators, their online softmax (log2 domain) done
// by the 4 lanes that hold a row. Keys come in tiles of 64 gathered through
// the page table by cp.async into a double buffer (the next tile loads while
// this one is multiplied), swizzled for ldmatrix (mma.cuh).
//
// Causal: row r sees keys 0 .. pos(r), which covers chunked prefill (the
// earlier chunks are already in the cache) and mixed batches. A warp skips
// the tiles past its last row's position and masks only the tiles that cross
// a position of its rows.
//
//   grid (tiles, Hkv), the last tiles first (they have the most keys)   block 2 BQ threads
//   shared memory: Q (BQ x D) + 2 x (K, V) (64 x D), bf16 = 96 KB at BQ = 128, D = 128
//
// BQ = 128 at D = 128: every K/V tile a block reads from L2 serves 128 rows.
// With 64 rows (4 warps) a tile brought 64 FLOP per byte, and 8 x 2,048
// causal ran at 185 TFLOP/s = 2.9 TB/s of tiles out of L2 (H200): the L2
// read rate, not the tensor cores, set the pace. At 235 registers a thread
// either way, an SM holds 8 warps: two blocks of 64 rows or one of 128.
#include "backend/cuda/cuda_check.hpp"
#include "backend/cuda/kernels.cuh"
#include "backend/cuda/mma.cuh"
#include "backend/cuda/prefill_rows.cuh"

namespace pagedrt::cuda {
namespace {

constexpr int BK = 64, kStages = 2;

template <int D, int BQ>
struct PrefillSmem {
  static constexpr size_t q = 0;                             // (BQ, D) bf16
  static constexpr size_t stage = size_t(2) * BK * D * 2;    // K then V (BK, D) bf16
  static constexpr size_t kv = q + size_t(BQ) * D * 2;       // kStages stages
  static constexpr size_t bytes = kv + kStages * stage;
};

template <int D, int BQ>
__global__ void __launch_bounds__(2 * BQ) prefill_kernel(AttentionParams p, PrefillPlan f) {
  using L = PrefillSmem<D, BQ>;
  constexpr int kThreads = 2 * BQ;  // BQ / 16 warps
  constexpr int CH = D / 8, KS = D / 16, ROWS = kThreads / CH;  // chunks per row, k-steps, rows per copy pass
  extern __shared__ __align__(128) unsigned char smem[];
  bf16* Qs = reinterpret_cast<bf16*>(smem + L::q);

  const int2 tile = f.tiles[f.num_tiles - 1 - blockIdx.x];
  const int seq = tile.x, row0 = tile.y, kvh = blockIdx.y;
  const int H = p.num_heads, Hkv = p.kv.num_kv_heads, G = H / Hkv;
  const int bs = p.kv.block_size, shift = p.kv.block_shift;  // registers, not loads in the loop
  const int q0 = p.query_start[seq];
  const int rows_total = (p.query_start[seq + 1] - q0) * G;
  const int64_t row_stride = int64_t(H + 2 * Hkv) * D;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int32_t* pages = p.kv.pages(seq);

  // Q rows (zeros past the sequence), in the first copy group with K/V tile 0.
  for (int idx = tid; idx < BQ * CH; idx += kThreads) {
    const int r = idx / CH, c = idx % CH, R = row0 + r;
    const bool valid = R < rows_total;
    const bf16* src = valid ? p.qkv + (q0 + R / G) * row_stride + int64_t(kvh * G + R % G) * D + c * 8 : p.qkv;
    cp_async16(Qs + swizzle<D>(r, c), src, valid ? 16 : 0);
  }
  const int last_row = min(row0 + BQ, rows_total) - 1;
  const int kmax = p.positions[q0 + last_row / G] + 1;  // keys 0 .. kmax-1 are seen by some row
  const int ntiles = (kmax + BK - 1) / BK;

  auto load_tile = [&](int t, int stage) {
    bf16* ks = reinterpret_cast<bf16*>(smem + L::kv + stage * L::stage);
    bf16* vs = ks + BK * D;
    const int c = tid % CH;
#pragma unroll
    for (int i = 0; i < BK / ROWS; ++i) {
      const int r = tid / CH + i * ROWS, pos = t * BK + r, e = swizzle<D>(r, c);
      const bool valid = pos < kmax;
      const int64_t off = valid ? p.kv.slot_offset(kv_slot(pages, pos, bs, shift), kvh) + c * 8 : 0;
      cp_async16(ks + e, p.kv.k + off, valid ? 16 : 0);
      cp_async16(vs + e, p.kv.v + off, valid ? 16 : 0);
    }
  };
  load_tile(0, 0);
  cp_async_commit();

  // This lane's rows: lo = warp * 16 + lane / 4 and hi = lo + 8 (position -1: past the sequence).
  const int r_lo = row0 + warp * 16 + lane / 4, r_hi = r_lo + 8;
  const int pos_lo = r_lo < rows_total ? p.positions[q0 + r_lo / G] : -1;
  const int pos_hi = r_hi < rows_total ? p.positions[q0 + r_hi / G] : -1;
  int warp_min, warp_max;
  warp_position_range(pos_lo, pos_hi, warp_min, warp_max);
  const float qscale = p.scale * kLog2e;

  uint32_t qa[KS][4];
  float o[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
  float m_lo = -INFINITY, m_hi = -INFINITY, l_lo = 0.0f, l_hi = 0.0f;

  for (int t = 0; t < ntiles; ++t) {
    cp_async_wait<0>();
    __syncthreads();  // tile t (and Q) landed; every warp is done with the stage refilled next
    if (t + 1 < ntiles) load_tile(t + 1, (t + 1) % kStages);
    cp_async_commit();
    if (t == 0) {
#pragma unroll
      for (int s = 0; s < KS; ++s)
        ldmatrix_x4(qa[s], Qs + swizzle<D>(warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, 2 * s + (lane >> 4)));
    }
    const int kb = t * BK;
    if (kb > warp_max) continue;  // every key of the tile is past this warp's rows
    const bf16* ks = reinterpret_cast<const bf16*>(smem + L::kv + (t % kStages) * L::stage);
    const bf16* vs = ks + BK * D;

    float sc[BK / 8][4];  // S: n-tile n = keys kb + 8n + (lane % 4) * 2 .. +1, rows lo ([0..1]) and hi ([2..3])
#pragma unroll
    for (int n = 0; n < BK / 8; ++n) sc[n][0] = sc[n][1] = sc[n][2] = sc[n][3] = 0.0f;
#pragma unroll
    for (int s = 0; s < KS; s += 2)
#pragma unroll
      for (int n = 0; n < BK / 8; ++n) {
        uint32_t b[4];  // k-steps s and s + 1 of keys 8n ..
        ldmatrix_x4(b, ks + swizzle<D>(8 * n + (lane & 7), 2 * s + (lane >> 3)));
        mma_bf16(sc[n], qa[s], b[0], b[1]);
        mma_bf16(sc[n], qa[s + 1], b[2], b[3]);
      }

    float c_lo, c_hi;
    online_softmax(sc, kb, kb + BK - 1 > warp_min, lane, pos_lo, pos_hi, qscale, m_lo, m_hi, l_lo, l_hi, c_lo, c_hi);
#pragma unroll
    for (int n = 0; n < D / 8; ++n) o[n][0] *= c_lo, o[n][1] *= c_lo, o[n][2] *= c_hi, o[n][3] *= c_hi;

#pragma unroll
    for (int j = 0; j < BK / 16; ++j) {  // keys 16j .. 16j + 15: P as the A operand
      const uint32_t pa[4] = {pack_bf16x2(sc[2 * j][0], sc[2 * j][1]), pack_bf16x2(sc[2 * j][2], sc[2 * j][3]),
                              pack_bf16x2(sc[2 * j + 1][0], sc[2 * j + 1][1]),
                              pack_bf16x2(sc[2 * j + 1][2], sc[2 * j + 1][3])};
#pragma unroll
      for (int n = 0; n < D / 8; n += 2) {
        uint32_t b[4];  // V keys 16j .. +15 of dims 8n .. 8n + 15, transposed
        ldmatrix_x4_trans(b, vs + swizzle<D>(16 * j + (lane & 7) + ((lane >> 3) & 1) * 8, n + (lane >> 4)));
        mma_bf16(o[n], pa, b[0], b[1]);
        mma_bf16(o[n + 1], pa, b[2], b[3]);
      }
    }
  }
  cp_async_wait<0>();
  store_rows<D>(p, o, l_lo, l_hi, r_lo, r_hi, rows_total, q0, kvh, lane);
}

template <int D, int BQ>
void launch_p(const AttentionParams& p, const PrefillPlan& f, cudaStream_t s) {
  using L = PrefillSmem<D, BQ>;
  static const bool configured = [] {  // per process; the attribute is per function
    CUDA_CHECK(cudaFuncSetAttribute(prefill_kernel<D, BQ>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(L::bytes)));
    return true;
  }();
  (void)configured;
  const dim3 grid(static_cast<unsigned>(f.num_tiles), static_cast<unsigned>(p.kv.num_kv_heads));
  prefill_kernel<D, BQ><<<grid, 2 * BQ, L::bytes, s>>>(p, f);
  CUDA_CHECK_LAUNCH();
}

}  // namespace

void prefill_attention(const AttentionParams& p, const PrefillPlan& f, cudaStream_t s) {
  if (f.num_tiles == 0) return;
  if (f.wgmma && f.ws && prefill_ws_fits(p)) return prefill_attention_ws(p, f, s);
  if (f.wgmma) return prefill_attention_wgmma(p, f, s);
  if (p.kv.head_dim == 128)
    f.rows == 128 ? launch_p<128, 128>(p, f, s) : launch_p<128, 64>(p, f, s);
  else
    f.rows == 128 ? launch_p<64, 128>(p, f, s) : launch_p<64, 64>(p, f, s);
}

}  // namespace pagedrt::cuda
