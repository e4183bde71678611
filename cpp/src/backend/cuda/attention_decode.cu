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
//   grid (items, Hkv, splits)   block 32 W
//   shared memory: S stages x (K, V) tiles of 16 W x D bf16, swizzled (mma.cuh);
//                  2 x 3 at D = 128: 48 KB, 4 blocks per SM
//
// On an fp8 cache (F8, paged_kv.hpp's Fp8Kv) the stages hold the tiles' raw
// codes and their rows' exponents (16 W x D bytes each, 4 exponents a
// cp.async), and each tile, once landed, is converted by all threads into
// one fp16 tile of the codes' values (exact, one instruction a pair:
// kv_fp8.cuh) that the tensor-core code reads with fp16 products. The
// exponents stay out of the tiles: a key's K exponent scales its score, its
// V exponent its weight in P V (relative to the largest so far, so P stays
// within fp16; o carries that largest as a power of two), and q goes to
// fp16 with a power-of-two scale per row. The own-token fusion (rope_cos)
// is not used there.
#include <cooperative_groups.h>

#include "backend/cuda/attention_split.cuh"
#include "backend/cuda/cuda_check.hpp"
#include "backend/cuda/elementwise.cuh"
#include "backend/cuda/kernels.cuh"
#include "backend/cuda/kv_fp8.cuh"
#include "backend/cuda/launch.cuh"
#include "backend/cuda/mma.cuh"

namespace pagedrt::cuda {
namespace {

constexpr int kMaxGroup = 8;

// W warps of 16 keys each make a tile of 16 W keys; S stages of the pipeline.
template <int D, int W, int S, bool F8 = false>
struct DecodeSmem {
  static constexpr int kTile = 16 * W, kStages = S, kWarps = W;
  static_assert(kDecodeTile % kTile == 0, "splits are whole tiles");
  // K then V tile, bf16; fp8: K then V codes, then K and V exponents (kTile each)
  static constexpr size_t stage = F8 ? size_t(2) * kTile * D + 2 * kTile : size_t(2) * kTile * D * 2;
  static constexpr size_t kv = 0;                                  // kStages stages
  static constexpr size_t work = (kv + kStages * stage + 127) / 128 * 128;  // fp8: the converted K, V tile (fp16)
  static constexpr size_t own = F8 ? work + size_t(2) * kTile * D * 2 : kv + kStages * stage;  // (2, D) bf16: the token's rotated k, its v
  static constexpr size_t out = own + 2 * D * 2;                  // (8, D) fp32: this split's result (clusters)
  static constexpr size_t lse = out + kMaxGroup * D * 4;          // (8) fp32
  static constexpr size_t bytes = lse + kMaxGroup * 4;
  // After the key loop the stages hold the warps' results:
  static constexpr size_t warp_o = kv;                                   // (4, 8, D) fp32
  static constexpr size_t warp_m = warp_o + kWarps * kMaxGroup * D * 4;  // (4, 8)
  static constexpr size_t warp_l = warp_m + kWarps * kMaxGroup * 4;      // (4, 8)
  static_assert(warp_l + kWarps * kMaxGroup * 4 <= own, "the warps' results fit the stages");
  // The in-block merge of the splits: (kMaxSplits, 8) lse values over the stages.
  static_assert(kMaxDecodeSplits * kMaxGroup * 4 <= own, "the splits' lse values fit the stages");
};

// 4 bytes global -> shared (src_bytes 0: zeros).
__device__ __forceinline__ void cp_async4(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void unpack_bf16x2(uint32_t r, float& lo, float& hi) {
  const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&r));
  lo = f.x;
  hi = f.y;
}

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

// fp8: a V exponent byte as an int in the quantizer's range (a byte never
// written, of a masked key, stays finite); kNoExp: no key yet.
constexpr int kNoExp = -100000;
__device__ __forceinline__ int kv_exp(uint8_t b) {
  const int e = static_cast<int8_t>(b);
  return e < kKvExpMin ? kKvExpMin : e > kKvExpMax ? kKvExpMax : e;
}
// 2^d for d <= 127 in a few integer instructions (fp8.hpp's exp2_int); below
// the normal range 0 (a weight under 2^-126 of the largest adds nothing an
// fp16 product can hold).
__device__ __forceinline__ float pow2(int d) { return d < -126 ? 0.0f : exp2_int(d); }

// fp8: the A operand q (bf16) as fp16 for the fp16 products, each row scaled
// by 2^-e so that its largest magnitude falls in [2^8, 2^9) (exact: bf16's
// 8 bits fit fp16's 11, and the range keeps them normal); returns this
// lane's row's 2^e, which the scores take back.
template <int D>
__device__ float q_to_f16(uint32_t (&q)[D / 16][2]) {
  float mx = 0.0f, v[D / 16][2][2];
#pragma unroll
  for (int s = 0; s < D / 16; ++s)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      unpack_bf16x2(q[s][h], v[s][h][0], v[s][h][1]);
      mx = fmaxf(mx, fmaxf(fabsf(v[s][h][0]), fabsf(v[s][h][1])));
    }
  mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
  mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
  int e = static_cast<int>((__float_as_uint(mx) >> 23) & 0xFF) - 127 - 8;
  e = e < -100 ? -100 : e > 100 ? 100 : e;
  const float inv = ldexpf(1.0f, -e);
#pragma unroll
  for (int s = 0; s < D / 16; ++s)
#pragma unroll
    for (int h = 0; h < 2; ++h) q[s][h] = pack_f16x2(v[s][h][0] * inv, v[s][h][1] * inv);
  return ldexpf(1.0f, e);
}

template <int D, int W, int S, bool F8>
__global__ void __launch_bounds__(32 * W) decode_kernel(AttentionParams p, DecodePlan d) {
  using L = DecodeSmem<D, W, S, F8>;
  constexpr int kTile = L::kTile, kStages = S, kWarps = W, kThreads = 32 * W;
  constexpr int CH = D / 8, KS = D / 16, ROWS = kThreads / CH;  // chunks per row, k-steps, rows per copy pass
  extern __shared__ __align__(128) unsigned char smem[];
  pdl_trigger();
  // Everything waits, even the plan and the page table, which the step's
  // uploads wrote before its first kernel (launch.cuh).
  pdl_wait();
  const int item = blockIdx.x, kvh = blockIdx.y, split = blockIdx.z;
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
  const bool own_new = !F8 && p.rope_cos != nullptr && it.slot >= 0 && start < end && end == ctx;
  if (own_new) {
    if (tid < CH / 2) append_own_kv<D>(p, row, kvh, ctx - 1, it.slot, tid, own);
    __syncthreads();
  }

  // Tile `tile` of the split into stage `stage`: thread tid copies chunk
  // tid % CH of rows tid / CH + ROWS i; rows past `end` are zero-filled.
  auto load_tile = [&](int tile, int stage) {
    if constexpr (F8) {  // codes in 16-byte chunks of 16; exponents 4 rows a thread (block_size % 4 == 0)
      constexpr int CB = D / 16, RB = kThreads / CB;
      uint8_t* kc = smem + L::kv + stage * L::stage;
      uint8_t* vc = kc + kTile * D;
      uint8_t* ke = vc + kTile * D;
      const Fp8Kv& f = p.fp8;
      const int k0 = start + tile * kTile, c = tid % CB;
      auto block = [&](int pos) { return pages[shift >= 0 ? pos >> shift : pos / bs]; };
      auto offset = [&](int pos) { return shift >= 0 ? pos & (bs - 1) : pos % bs; };
#pragma unroll
      for (int i = 0; i < kTile / RB; ++i) {
        const int r = tid / CB + i * RB, pos = k0 + r;
        const bool valid = pos < end;
        const int64_t off = valid ? f.code_offset(block(pos), offset(pos), kvh) + c * 16 : 0;
        cp_async16(kc + r * D + c * 16, f.k + off, valid ? 16 : 0);
        cp_async16(vc + r * D + c * 16, f.v + off, valid ? 16 : 0);
      }
      if (tid < kTile / 4) {
        const int pos = k0 + 4 * tid;
        const bool valid = pos < end;
        const int64_t off = valid ? f.exp_offset(block(pos), offset(pos), kvh) : 0;
        cp_async4(ke + 4 * tid, f.k + off, valid ? 4 : 0);
        cp_async4(ke + kTile + 4 * tid, f.v + off, valid ? 4 : 0);
      }
      return;
    }
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
  float qscale = p.scale * kLog2e;
  if constexpr (F8) qscale *= q_to_f16<D>(q);
  int vexp = kNoExp;  // fp8: o holds the output times 2^-vexp (the largest V exponent so far)
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
    const uint8_t* kexp = nullptr;  // fp8: the tile's K exponents, then V's
    if constexpr (F8) {  // the landed codes to fp16 tiles (unscaled, exact), 8 a thread a pass
      const uint8_t* kc = smem + L::kv + (tile % kStages) * L::stage;
      bf16* kw = reinterpret_cast<bf16*>(smem + L::work);
#pragma unroll
      for (int i = tid; i < 2 * kTile * (D / 8); i += kThreads) {
        const int which = i / (kTile * (D / 8)), r = (i / (D / 8)) % kTile, c = i % (D / 8);
        const uint2 codes = *reinterpret_cast<const uint2*>(kc + which * kTile * D + r * D + c * 8);
        const uint2 lo = e4m3_x4_f16(codes.x), hi = e4m3_x4_f16(codes.y);
        *reinterpret_cast<uint4*>(kw + which * kTile * D + swizzle<D>(r, c)) = make_uint4(lo.x, lo.y, hi.x, hi.y);
      }
      __syncthreads();
      ks = kw;
      kexp = kc + 2 * kTile * D;
    }
    const bf16* vs = ks + kTile * D;

    float sc[2][4] = {};  // S: keys kr0 + 8n + c .. +1 (rows g)
#pragma unroll
    for (int s = 0; s < KS; s += 2)
#pragma unroll
      for (int n = 0; n < 2; ++n) {
        uint32_t b[4];  // k-steps s and s + 1 of keys kr0 + 8n ..
        ldmatrix_x4(b, ks + swizzle<D>(kr0 + 8 * n + (lane & 7), 2 * s + (lane >> 3)));
        const uint32_t a0[4] = {q[s][0], 0u, q[s][1], 0u}, a1[4] = {q[s + 1][0], 0u, q[s + 1][1], 0u};
        mma_16816<F8>(sc[n], a0, b[0], b[1]);  // fp8: fp16 tiles and q
        mma_16816<F8>(sc[n], a1, b[2], b[3]);
      }

    // Online softmax over this warp's 16 keys; the 4 lanes of a row share m.
    const int key = start + tile * kTile + kr0 + (lane % 4) * 2;
    float sv[4] = {sc[0][0], sc[0][1], sc[1][0], sc[1][1]};
    float mx = -INFINITY;
    int ve[4] = {kNoExp, kNoExp, kNoExp, kNoExp}, vmax = kNoExp;  // fp8: the keys' V exponents
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int r = kr0 + (lane % 4) * 2 + (j & 1) + 8 * (j >> 1);
      const bool valid = key + (j & 1) + 8 * (j >> 1) < end;
      float f = qscale;
      if constexpr (F8) {  // each key's own scale: 2^e on its score, and its V exponent
        if (valid) f *= exp2_int(kv_exp(kexp[r])), ve[j] = kv_exp(kexp[kTile + r]);
        vmax = max(vmax, ve[j]);
      }
      sv[j] = valid ? sv[j] * f : -INFINITY;
      mx = fmaxf(mx, sv[j]);
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float m_new = fmaxf(m, mx);
    const float corr = m_new == -INFINITY ? 1.0f : exp2f(m - m_new);
    float ocorr = corr;  // o's: fp8 adds the change of its V exponent
    uint32_t pa[4] = {0u, 0u, 0u, 0u};  // P as the A operand: keys c .. +1 (a[0]) and 8 + c .. (a[2])
    float psum = 0.0f;
    if constexpr (F8) {
      // P V in fp16: each key's weight times 2^(its V exponent - the largest so
      // far), at most 1, so nothing overflows fp16; o follows the largest. l
      // takes the weights themselves: a key whose V is far below the largest
      // (a zero row: 2^-110) vanishes from P V, as its product would, but not
      // from the softmax's denominator.
      vmax = max(vmax, __shfl_xor_sync(0xffffffffu, vmax, 1));
      vmax = max(vmax, __shfl_xor_sync(0xffffffffu, vmax, 2));
      const int vnew = max(vexp, vmax);
      if (vexp != kNoExp) ocorr *= pow2(vexp - vnew);
      vexp = vnew;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float w[2];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float pj = m_new == -INFINITY ? 0.0f : exp2f(sv[2 * h + e] - m_new);  // 0 for a masked key
          w[e] = ve[2 * h + e] == kNoExp ? 0.0f : pj * pow2(ve[2 * h + e] - vnew);
          psum += pj;
        }
        pa[2 * h] = pack_f16x2(w[0], w[1]);
      }
    } else {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float p0 = m_new == -INFINITY ? 0.0f : exp2f(sv[2 * h] - m_new);
        const float p1 = m_new == -INFINITY ? 0.0f : exp2f(sv[2 * h + 1] - m_new);
        pa[2 * h] = pack_bf16x2(p0, p1);
        float r0, r1;  // the weights as the product sees them: numerator and l agree
        unpack_bf16x2(pa[2 * h], r0, r1);
        psum += r0 + r1;
      }
    }
    l = l * corr + psum;
    m = m_new;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) o[n][0] *= ocorr, o[n][1] *= ocorr;

#pragma unroll
    for (int n = 0; n < D / 8; n += 2) {
      uint32_t b[4];  // V keys kr0 .. +15 of dims 8n .. 8n + 15, transposed
      ldmatrix_x4_trans(b, vs + swizzle<D>(kr0 + (lane & 7) + ((lane >> 3) & 1) * 8, n + (lane >> 4)));
      mma_16816<F8>(o[n], pa, b[0], b[1]);
      mma_16816<F8>(o[n + 1], pa, b[2], b[3]);
    }
  }
  if constexpr (F8) {  // o to the output's own scale
    const float f = vexp == kNoExp ? 0.0f : exp2_int(vexp);
#pragma unroll
    for (int n = 0; n < D / 8; ++n) o[n][0] *= f, o[n][1] *= f;
  }

  // Merge the 4 warps (their results over the stages, now free).
  cp_async_wait<0>();
  __syncthreads();
  l += __shfl_xor_sync(0xffffffffu, l, 1);
  l += __shfl_xor_sync(0xffffffffu, l, 2);
  float* wo = reinterpret_cast<float*>(smem + L::warp_o);
  float* wm = reinterpret_cast<float*>(smem + L::warp_m);
  float* wl = reinterpret_cast<float*>(smem + L::warp_l);
  const int g = lane / 4;
  if (g < G) {
    float* dst = wo + (warp * kMaxGroup + g) * D + (lane % 4) * 2;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) *reinterpret_cast<float2*>(dst + 8 * n) = make_float2(o[n][0], o[n][1]);
    if (lane % 4 == 0) wm[warp * kMaxGroup + g] = m, wl[warp * kMaxGroup + g] = l;
  }
  __syncthreads();
  float* sm_o = reinterpret_cast<float*>(smem + L::out);
  float* sm_lse = reinterpret_cast<float*>(smem + L::lse);
  const int NS = d.num_splits;
  for (int idx = tid; idx < G * D; idx += blockDim.x) {
    const int gg = idx / D, dd = idx % D;
    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) M = fmaxf(M, wm[w * kMaxGroup + gg]);
    float Lsum = 0.0f, O = 0.0f;
    if (M != -INFINITY) {
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const float wgt = exp2f(wm[w * kMaxGroup + gg] - M);
        Lsum += wl[w * kMaxGroup + gg] * wgt;
        O += wo[(w * kMaxGroup + gg) * D + dd] * wgt;
      }
    }
    const int h = kvh * G + gg;
    const float val = Lsum > 0.0f ? O / Lsum : 0.0f, lse = Lsum > 0.0f ? M + log2f(Lsum) : -INFINITY;
    if (NS == 1) {
      store_f(p.out + int64_t(t) * H * D + int64_t(h) * D + dd, val);
    } else if (d.cluster) {
      sm_o[gg * D + dd] = val;
      if (dd == 0) sm_lse[gg] = lse;
    } else {
      const int64_t part = int64_t(item) * NS + split;
      d.o_part[(part * H + h) * D + dd] = val;
      if (dd == 0) d.lse_part[part * H + h] = lse;
    }
  }
  // Splits in global memory: the last block of (item, kv head) to finish
  // merges them (the G x S lse values over the free stages).
  if (NS > 1 && !d.cluster) {
    if (last_split(d.counters + int64_t(item) * Hkv + kvh, NS))
      merge_splits_in_block(p, d, item, kvh, t, reinterpret_cast<float*>(smem + L::kv));
    return;
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // A cluster of the S split blocks of (item, kv head): each block merges a
  // slice of the G x D outputs from every block's shared memory, then all
  // wait until every slice is read before their shared memory goes away.
  if (NS > 1 && d.cluster) {
    namespace cg = cooperative_groups;
    cg::cluster_group cluster = cg::this_cluster();
    cluster.sync();
    for (int idx = split * blockDim.x + tid; idx < G * D; idx += NS * blockDim.x) {
      const int gg = idx / D, dd = idx % D;
      const float v = merge_splits(
          NS, [&](int r) { return *cluster.map_shared_rank(&sm_lse[gg], r); },
          [&](int r) { return *cluster.map_shared_rank(&sm_o[gg * D + dd], r); });
      store_f(p.out + int64_t(t) * H * D + int64_t(kvh * G + gg) * D + dd, v);
    }
    cluster.sync();
  }
#endif
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
template <int D, int W, int S, bool F8>
auto decode_kernel_ready() {
  static const bool configured = [] {
    CUDA_CHECK(cudaFuncSetAttribute(decode_kernel<D, W, S, F8>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(DecodeSmem<D, W, S, F8>::bytes)));
    return true;
  }();
  (void)configured;
  return decode_kernel<D, W, S, F8>;
}

template <int D, int W, int S, bool F8>
void launch_decode(const AttentionParams& p, const DecodePlan& d, dim3 grid, cudaStream_t s) {
  const unsigned cz = d.cluster ? static_cast<unsigned>(d.num_splits) : 1;
  launch_clusters(decode_kernel_ready<D, W, S, F8>(), grid, 32 * W, DecodeSmem<D, W, S, F8>::bytes, cz, s, p, d);
}

template <int D, int W, int S, bool F8>
int blocks_per_sm() {
  int n = 0;
  CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, decode_kernel_ready<D, W, S, F8>(), 32 * W,
                                                           DecodeSmem<D, W, S, F8>::bytes));
  return n;
}

// An fp8 cache runs the 2- or 4-warp kernel of 3 stages (the shapes the
// plan picks by default); other forced shapes take the nearest of those.
struct Launch {
  const AttentionParams& p;
  const DecodePlan& d;
  dim3 grid;
  cudaStream_t s;
  template <int D, int W, int S>
  void operator()() const {
    if (p.fp8.k == nullptr) return launch_decode<D, W, S, false>(p, d, grid, s);
    launch_decode<D, W == 4 ? 4 : 2, 3, true>(p, d, grid, s);
  }
};
struct Occupancy {
  bool fp8;
  template <int D, int W, int S>
  int operator()() const { return fp8 ? blocks_per_sm<D, W == 4 ? 4 : 2, 3, true>() : blocks_per_sm<D, W, S, false>(); }
};

// f.operator()<D, W, S>() for head dim D and the configuration (W warps, 2
// or 4; S stages, 2 to 4: the backend accepts no other; 128 x 2 x 3 is the
// default branch).
template <typename F>
auto with_config(int D, DecodeConfig c, F&& f) {
  const int key = (D == 128 ? 100 : 0) + c.warps * 10 + c.stages;
  switch (key) {
    case 122: return f.template operator()<128, 2, 2>();
    case 124: return f.template operator()<128, 2, 4>();
    case 142: return f.template operator()<128, 4, 2>();
    case 143: return f.template operator()<128, 4, 3>();
    case 144: return f.template operator()<128, 4, 4>();
    case 22: return f.template operator()<64, 2, 2>();
    case 23: return f.template operator()<64, 2, 3>();
    case 24: return f.template operator()<64, 2, 4>();
    case 42: return f.template operator()<64, 4, 2>();
    case 43: return f.template operator()<64, 4, 3>();
    case 44: return f.template operator()<64, 4, 4>();
    default: return f.template operator()<128, 2, 3>();
  }
}

}  // namespace

int decode_blocks_per_sm(int head_dim, DecodeConfig c, bool fp8) {
  return with_config(head_dim, c, Occupancy{fp8});
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
  const dim3 grid(static_cast<unsigned>(d.num_items), static_cast<unsigned>(p.kv.num_kv_heads),
                  static_cast<unsigned>(d.num_splits));
  with_config(p.kv.head_dim, d.config, Launch{p, d, grid, s});  // merges its own splits
}

}  // namespace pagedrt::cuda
