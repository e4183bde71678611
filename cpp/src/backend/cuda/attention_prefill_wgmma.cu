// backend/cuda/attention_prefill_wgmma.cu — paged prefill attention on
// Hopper's warpgroup tensor cores (wgmma, sm_90a), head dim 128.
//
// The same work as attention_prefill.cu's kernel (tiles of 128 rows, a row =
// (query token, head of the kv head's group); causal by position, which covers
// chunked prefill and mixed steps), with the products issued a warpgroup at a
// time: S = Q K^T reads Q and K straight from shared memory, O += P V takes P
// from the registers S left it in and V from shared memory. mma.sync kept Q,
// the K/V fragments and the softmax in one warp's instruction stream at 235
// registers a thread and reached 210-257 TFLOP/s on an H200; wgmma streams
// its operands from shared memory itself and runs while the other
// warpgroup's softmax runs.
//
//   block = 2 warpgroups (256 threads); warpgroup w owns rows 64w .. 64w + 63
//   of the tile; keys in tiles of 128 gathered through the page table by
//   cp.async into a double buffer, in the 128-byte-swizzled layout of wgmma.cuh
//   grid (tiles, Hkv), the last tiles first (they have the most keys)
//   shared memory: Q (128 x 128) + 2 x (K, V) (128 x 128), bf16 = 160 KB
//
// Per tile and warpgroup: S (64 x 128 fp32, 64 registers a thread) = 8 wgmma
// k-steps over D; the online softmax in the log2 domain (attention_prefill.cu);
// P packed to bf16 as 8 A fragments; O (64 x 128 fp32) += 8 wgmma k-steps
// over the keys. A warpgroup skips the tiles past its last row's position
// and masks only the tiles crossing one of its rows' positions.
#include "backend/cuda/cuda_check.hpp"
#include "backend/cuda/kernels.cuh"
#include "backend/cuda/mma.cuh"
#include "backend/cuda/prefill_rows.cuh"
#include "backend/cuda/wgmma.cuh"

// The compilation passes without sm_90a see an empty kernel body, and would
// warn that its constants and helpers go unused.
#pragma nv_diag_suppress 177

namespace pagedrt::cuda {
namespace {

constexpr int D = 128, BQ = 128, BK = 128, kStages = 2, kThreads = 256;

// Byte offsets in the (1,024-aligned) shared memory. A tile of `rows` rows of
// D = 128 is two halves of 64 columns (k 0-63, then 64-127), each `rows`
// 128-byte rows in swizzle atoms (wgmma.cuh).
struct WgmmaSmem {
  static constexpr uint32_t q_half = BQ * 128;      // 16 KB
  static constexpr uint32_t kv_half = BK * 128;     // 16 KB
  static constexpr uint32_t q = 0;                  // Q: 2 halves
  static constexpr uint32_t kv = 2 * q_half;        // stages of K (2 halves) then V (2 halves)
  static constexpr uint32_t stage = 4 * kv_half;    // 64 KB
  static constexpr uint32_t bytes = kv + kStages * stage;
  static constexpr uint32_t alloc = bytes + 1024;   // slack to align the start to 1,024
};

__global__ void __launch_bounds__(kThreads, 1) prefill_wgmma_kernel(AttentionParams p, PrefillPlan f) {
#if !defined(__CUDA_ARCH__) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using L = WgmmaSmem;
  extern __shared__ unsigned char smem_raw[];
  __shared__ int warp_pos[kThreads / 32][2];  // each warp's rows' (min, max) position
  const uint32_t raw = smem_addr(smem_raw), base = (raw + 1023) & ~1023u;
  unsigned char* smem = smem_raw + (base - raw);

  const int2 tile = f.tiles[f.num_tiles - 1 - blockIdx.x];
  const int seq = tile.x, row0 = tile.y, kvh = blockIdx.y;
  const int H = p.num_heads, Hkv = p.kv.num_kv_heads, G = H / Hkv;
  const int bs = p.kv.block_size, shift = p.kv.block_shift;
  const int q0 = p.query_start[seq];
  const int rows_total = (p.query_start[seq + 1] - q0) * G;
  const int64_t row_stride = int64_t(H + 2 * Hkv) * D;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, wg = warp / 4;
  const int32_t* pages = p.kv.pages(seq);

  // Q rows (zeros past the sequence), in the first copy group with K/V tile 0.
#pragma unroll
  for (int i = 0; i < BQ * 16 / kThreads; ++i) {
    const int idx = tid + i * kThreads, r = idx / 16, c = idx % 16, R = row0 + r;
    const bool valid = R < rows_total;
    const bf16* src = valid ? p.qkv + (q0 + R / G) * row_stride + int64_t(kvh * G + R % G) * D + c * 8 : p.qkv;
    cp_async16(smem + L::q + tile_offset(r, c, BQ), src, valid ? 16 : 0);
  }
  const int last_row = min(row0 + BQ, rows_total) - 1;
  const int kmax = p.positions[q0 + last_row / G] + 1;  // keys 0 .. kmax-1 are seen by some row
  const int ntiles = (kmax + BK - 1) / BK;

  auto load_tile = [&](int t, int stage) {
    unsigned char* ks = smem + L::kv + stage * L::stage;
    unsigned char* vs = ks + 2 * L::kv_half;
    const int c = tid % 16;
#pragma unroll
    for (int i = 0; i < BK * 16 / kThreads; ++i) {
      const int r = tid / 16 + i * (kThreads / 16), pos = t * BK + r;
      const bool valid = pos < kmax;  // zeros past it: masked scores, and P = 0 never meets a NaN
      const int64_t off = valid ? p.kv.slot_offset(kv_slot(pages, pos, bs, shift), kvh) + c * 8 : 0;
      const uint32_t e = tile_offset(r, c, BK);
      cp_async16(ks + e, p.kv.k + off, valid ? 16 : 0);
      cp_async16(vs + e, p.kv.v + off, valid ? 16 : 0);
    }
  };
  load_tile(0, 0);
  cp_async_commit();

  // This thread's rows: lo = 64 wg + 16 (warp % 4) + lane / 4 and hi = lo + 8
  // (position -1: past the sequence); the warpgroup's range of positions
  // decides which tiles it skips and masks (uniform over its 128 threads, as
  // wgmma needs).
  const int r_lo = row0 + warp * 16 + lane / 4, r_hi = r_lo + 8;
  const int pos_lo = r_lo < rows_total ? p.positions[q0 + r_lo / G] : -1;
  const int pos_hi = r_hi < rows_total ? p.positions[q0 + r_hi / G] : -1;
  {
    int mn, mx;
    warp_position_range(pos_lo, pos_hi, mn, mx);
    if (lane == 0) warp_pos[warp][0] = mn, warp_pos[warp][1] = mx;
  }
  __syncthreads();
  int wg_min = warp_pos[4 * wg][0], wg_max = warp_pos[4 * wg][1];
#pragma unroll
  for (int w = 1; w < 4; ++w) wg_min = min(wg_min, warp_pos[4 * wg + w][0]), wg_max = max(wg_max, warp_pos[4 * wg + w][1]);
  const float qscale = p.scale * kLog2e;

  float s[64], o[64];  // accumulators: 8-column block j in [4j .. 4j + 3] (wgmma.cuh)
#pragma unroll
  for (int i = 0; i < 64; ++i) s[i] = o[i] = 0.0f;
  float m_lo = -INFINITY, m_hi = -INFINITY, l_lo = 0.0f, l_hi = 0.0f;
  const uint32_t q_desc_base = base + L::q + wg * 64 * 128;

  for (int t = 0; t < ntiles; ++t) {
    cp_async_wait<0>();
    fence_proxy_async();  // this thread's copies, visible to wgmma after the barrier
    __syncthreads();      // tile t (and Q) landed; both warpgroups are done with the stage refilled next
    if (t + 1 < ntiles) load_tile(t + 1, (t + 1) % kStages);
    cp_async_commit();
    const int kb = t * BK;
    if (kb > wg_max) continue;  // every key of the tile is past this warpgroup's rows
    const uint32_t k_base = base + L::kv + (t % kStages) * L::stage, v_base = k_base + 2 * L::kv_half;

    // S = Q K^T: k-step k reads columns 16k .. 16k + 15 of Q's and K's rows.
    wgmma_fence();
#pragma unroll
    for (int k = 0; k < D / 16; ++k) {
      const uint32_t col = (k & 3) * 32;
      wgmma_m64n128_ss(s, gmma_desc(q_desc_base + (k >> 2) * L::q_half + col, 16, 1024),
                       gmma_desc(k_base + (k >> 2) * L::kv_half + col, 16, 1024), k > 0);
    }
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_hold(s);

    float c_lo, c_hi;  // the accumulator as 8-column blocks, as prefill_rows.cuh reads it
    online_softmax(reinterpret_cast<float(&)[BK / 8][4]>(s), kb, kb + BK - 1 > wg_min, lane, pos_lo, pos_hi, qscale,
                   m_lo, m_hi, l_lo, l_hi, c_lo, c_hi);

    // P as the A operand of k-step j (keys 16j .. 16j + 15).
    uint32_t pa[BK / 16][4];
    pack_p<BK / 8>(s, pa);
#pragma unroll
    for (int j = 0; j < D / 8; ++j) o[4 * j] *= c_lo, o[4 * j + 1] *= c_lo, o[4 * j + 2] *= c_hi, o[4 * j + 3] *= c_hi;

    // O += P V: k-step j reads keys 16j .. 16j + 15 of V (rows of 128 bytes
    // per half; the second half of D is L::kv_half further).
    wgmma_fence();
#pragma unroll
    for (int j = 0; j < BK / 16; ++j)
      wgmma_m64n128_rs_bmn(o, pa[j], gmma_desc(v_base + j * 16 * 128, L::kv_half, 1024));
    wgmma_commit();
    wgmma_wait<0>();  // before the barrier that lets this stage be refilled
    wgmma_hold(o);
  }
  cp_async_wait<0>();
  store_rows<D>(p, reinterpret_cast<const float(&)[D / 8][4]>(o), l_lo, l_hi, r_lo, r_hi, rows_total, q0, kvh, lane);
#else
  __trap();  // built without sm_90a: prefill_wgmma_built() is false and nothing launches this
#endif
}

}  // namespace

bool prefill_wgmma_built() {
#if defined(PAGEDRT_CUDA_SM90A)
  return true;
#else
  return false;
#endif
}

void prefill_attention_wgmma(const AttentionParams& p, const PrefillPlan& f, cudaStream_t s) {
  static const bool configured = [] {  // per process; the attribute is per function
    CUDA_CHECK(cudaFuncSetAttribute(prefill_wgmma_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(WgmmaSmem::alloc)));
    return true;
  }();
  (void)configured;
  const dim3 grid(static_cast<unsigned>(f.num_tiles), static_cast<unsigned>(p.kv.num_kv_heads));
  prefill_wgmma_kernel<<<grid, kThreads, WgmmaSmem::alloc, s>>>(p, f);
  CUDA_CHECK_LAUNCH();
}

}  // namespace pagedrt::cuda
