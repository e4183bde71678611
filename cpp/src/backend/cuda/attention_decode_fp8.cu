// backend/cuda/attention_decode_fp8.cu — paged decode attention on an fp8 KV
// cache (paged_kv.hpp's Fp8Kv: e4m3 codes, one power-of-two exponent a row),
// on tensor cores with fp16 products.
//
// A block is a (token, kv head, split) of W warps, as in the bf16 kernel
// (attention_decode.cu), but each warp runs its own pipeline: warp w takes
// keys 16 (W j + w) .. + 15 of the split (j = 0, 1, ..) through S stages of
// its own, so warps wait only for their own copies (a __syncwarp a tile, no
// block barrier in the key loop). The codes stay codes in shared memory:
// every lane reads the bytes of its fragments and widens them in registers
// (cvt.rn.f16x2.e4m3x2: exact), with no conversion pass over the tile.
//
// The products run transposed, S^T = K q^T and O^T = V^T P^T, so that the
// group's G <= 8 query heads are the 8-wide N of both (no zero rows in a
// 16-row operand: half the mma of Q K^T's form, half the accumulators;
// H200, 256 x 1,024: 147 us against 158).
//
//   K, A(m = key, k = dim): the sum over dims may take them in any order, so
//     lane (g = lane / 4, c = lane % 4) reads D / 4 adjacent bytes of each of
//     its two keys (M rows g and g + 8: tile rows r0 = 4 (g / 2) + g % 2 and
//     r0 + 2), and k-step s takes bytes 4s .. 4s + 3 of them as k = 2c,
//     2c + 1, 2c + 8, 2c + 9; q, the B operand, is loaded in that order too
//     (load_q_fp8). The scores' C fragment holds keys r0, r0 + 2 of heads 2c,
//     2c + 1; each head's softmax reduces over the 8 lanes of a c.
//   P^T's two 8 x 8 halves, transposed by movmatrix, are the B operand of
//     O^T = V^T P^T, k = the keys 4c .. 4c + 3 of a lane.
//   V^T, A(m = dim, k = key): m-tile t's M row g is dim (D / 8) g + 2t, row
//     g + 8 dim (D / 8) g + 2t + 1, so a lane reads D / 8 adjacent bytes of
//     its rows 4c .. 4c + 3 (16-byte loads at D = 128) and pairs them by key
//     with byte permutes.
//
// Tiles of codes are swizzled by 16-byte chunk (code_chunk) so that both
// reads are free of bank conflicts at D = 128. The exponents stay out of the
// products: a key's K exponent scales its score, its V exponent its weight
// in P V (relative to the largest so far, so that P stays within fp16; o
// carries that largest as a power of two), and q goes to fp16 with a
// power-of-two scale per head.
//
// In steps of one query token per sequence (AttentionParams::rope_cos set,
// rope_cache_attention) the kernel also does rope_and_cache's work: every
// block rotates q as it loads it, and the split holding the token's own key
// quantizes the rotated k and the v into their slot before its loads, so no
// rope or quantize kernel runs between the qkv projection and attention.
//
//   grid (Hkv, items, splits) or (items, Hkv, splits) (DecodePlan::heads_first)   block 32 W
//   shared memory: W x S tiles of (K codes, V codes: 16 x D bytes each; 16 K
//                  and 16 V exponents): 2 x 4 at D = 128, 33 KB
#include "backend/cuda/attention_decode.cuh"
#include "backend/cuda/cuda_check.hpp"
#include "backend/cuda/elementwise.cuh"
#include "backend/cuda/kv_fp8.cuh"
#include "backend/cuda/launch.cuh"

namespace pagedrt::cuda {
namespace {

template <int D, int W, int S>
struct Fp8DecodeSmem {
  static constexpr size_t codes = size_t(16) * D;      // one tile's K (or V) codes
  static constexpr size_t tile = 2 * codes + 2 * 16;   // K codes, V codes, K exponents, V exponents
  static constexpr size_t stages = size_t(W) * S * tile;  // warp w's stage s: tile (w S + s)
  static constexpr size_t need = DecodeEpilogueSmem<D, W>::need;
  static constexpr size_t out = ((stages > need ? stages : need) + 15) / 16 * 16;  // (8, D) fp32
  static constexpr size_t lse = out + kMaxGroup * D * 4;                            // (8) fp32
  static constexpr size_t bytes = lse + kMaxGroup * 4;
  static_assert(tile % 16 == 0, "tiles of 16-byte chunks");
};

// Byte offset of 16-byte chunk `c` of row `r` in a tile of codes: the chunk
// index XOR bits of the row, so that K's reads (rows 4q + {0, 1} or
// 4q + {2, 3}, chunks of all four c) and V's (rows 4c + i of all four c,
// chunks g) of a quarter warp fall in 8 different bank groups. At D = 64 two
// rows share a 128-byte line and V's 8-byte reads conflict 2-way.
template <int D>
__device__ __forceinline__ int code_chunk(int r, int c) {
  if constexpr (D == 128) return r * 128 + ((c ^ ((((r >> 2) & 3) << 1) | (r & 1))) << 4);
  return r * 64 + ((c ^ ((r >> 2) & 3)) << 4);
}

// A V exponent byte as an int in the quantizer's range (a byte never
// written, of a masked key, stays finite); kNoExp: no key yet.
constexpr int kNoExp = -100000;
__device__ __forceinline__ int kv_exp(uint32_t b) {
  const int e = static_cast<int8_t>(b & 0xFFu);
  return e < kKvExpMin ? kKvExpMin : e > kKvExpMax ? kKvExpMax : e;
}
// 2^d for d <= 127 in a few integer instructions (fp8.hpp's exp2_int); below
// the normal range 0 (a weight under 2^-126 of the largest adds nothing an
// fp16 product can hold).
__device__ __forceinline__ float pow2(int d) { return d < -126 ? 0.0f : exp2_int(d); }

// This lane's B operand q of S^T = K q^T in K's dim order: k-step s holds
// dims c D/4 + 4s .. + 3 (c = lane % 4) of head g = lane / 4 (zero for
// g >= G), q[s][0] the first two and q[s][1] the next, as fp16 scaled by
// 2^-e so that the head's largest magnitude falls in [2^8, 2^9) (exact:
// bf16's 8 bits fit fp16's 11, and the range keeps them normal). With cs and
// sn (the position's rope_cos and rope_sin rows) the head is rotated first,
// each dim with its rotate-half partner (dim +- D/2, read here too), and
// rounded to bf16 as rope_and_cache stores it. Returns the head's 2^e, which
// the scores take back.
template <int D>
__device__ float load_q_fp8(const bf16* row, int kvh, int G, const float* cs, const float* sn,
                            uint32_t (&q)[D / 16][2]) {
  constexpr int KS = D / 16;
  const int lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
  const bf16* qh = row + int64_t(kvh * G + g) * D;
  const bool lo = c < 2;  // this lane's dims are in the first half
  float v[KS][4];
#pragma unroll
  for (int s = 0; s < KS; ++s) {
    const int i = c * (D / 4) + 4 * s;
    uint2 w = make_uint2(0u, 0u);
    if (g < G) w = *reinterpret_cast<const uint2*>(qh + i);
    unpack_bf16x2(w.x, v[s][0], v[s][1]);
    unpack_bf16x2(w.y, v[s][2], v[s][3]);
    if (cs != nullptr && g < G) {
      const int j = lo ? i : i - D / 2;  // the angle's index
      const uint2 pw = *reinterpret_cast<const uint2*>(qh + (lo ? i + D / 2 : i - D / 2));
      float x[4];
      unpack_bf16x2(pw.x, x[0], x[1]);
      unpack_bf16x2(pw.y, x[2], x[3]);
      const float4 cv = __ldg(reinterpret_cast<const float4*>(cs + j));
      const float4 sv = __ldg(reinterpret_cast<const float4*>(sn + j));
      const float cc[4] = {cv.x, cv.y, cv.z, cv.w}, ss[4] = {sv.x, sv.y, sv.z, sv.w};
#pragma unroll
      for (int e = 0; e < 4; ++e)
        v[s][e] = round_to<bf16>(lo ? rope_lo(v[s][e], x[e], cc[e], ss[e]) : rope_hi(x[e], v[s][e], cc[e], ss[e]));
    }
  }
  float mx = 0.0f;
#pragma unroll
  for (int s = 0; s < KS; ++s)
#pragma unroll
    for (int e = 0; e < 4; ++e) mx = fmaxf(mx, fabsf(v[s][e]));
  mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
  mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
  int e = static_cast<int>((__float_as_uint(mx) >> 23) & 0xFF) - 127 - 8;
  e = e < -100 ? -100 : e > 100 ? 100 : e;
  const float inv = ldexpf(1.0f, -e);
#pragma unroll
  for (int s = 0; s < KS; ++s) {
    q[s][0] = pack_f16x2(v[s][0] * inv, v[s][1] * inv);
    q[s][1] = pack_f16x2(v[s][2] * inv, v[s][3] * inv);
  }
  return ldexpf(1.0f, e);
}

// The token's own k of kv head kvh (rotated at position pos and rounded to
// bf16, as rope_and_cache stores it), or its v (is_v), quantized into its
// slot as quantize_kv would (store_kv_row) by one warp: lane l takes dims
// l D/32 .. + D/32 - 1 and their rotate-half partners.
template <int D>
__device__ void append_own_fp8(const AttentionParams& p, const bf16* row, int kvh, int pos, int64_t slot, bool is_v,
                               int lane) {
  constexpr int kPer = D / 32;
  const Fp8Kv& f = p.fp8;
  const bf16* x = row + int64_t(p.num_heads + (is_v ? f.num_kv_heads : 0) + kvh) * D;
  const int i0 = lane * kPer;
  float v[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) v[i] = to_f(x[i0 + i]);
  if (!is_v) {
    const bool lo = i0 < D / 2;
    const int j0 = lo ? i0 : i0 - D / 2, partner = lo ? i0 + D / 2 : i0 - D / 2;
    const float* cs = p.rope_cos + int64_t(pos) * (D / 2) + j0;
    const float* sn = p.rope_sin + int64_t(pos) * (D / 2) + j0;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const float y = to_f(x[partner + i]), cv = __ldg(cs + i), sv = __ldg(sn + i);
      v[i] = round_to<bf16>(lo ? rope_lo(v[i], y, cv, sv) : rope_hi(y, v[i], cv, sv));
    }
  }
  store_kv_row<D>(v, lane, f, is_v ? f.v : f.k, slot, kvh);
}

// A warp's tile of keys k0 .. k0 + 15 into `st` (a stage of
// Fp8DecodeSmem): lane copies chunk lane % CB of rows lane / CB + RP i (rows
// past `end` zero-filled); lanes 0-3 K's exponents of rows 4 lane ..
// (block_size % 4 == 0: one block), lanes 4-7 V's. kWhole (block_size a
// multiple of 16, so the tile lies in one block): one page-table read and a
// row stride, the common case; else each row finds its own.
template <int D, int W, int S, bool kWhole>
struct Fp8TileLoader {
  static constexpr int CB = D / 16, RP = 32 / CB;  // a lane's chunk of a row; rows a pass
  using L = Fp8DecodeSmem<D, W, S>;
  const Fp8Kv& f;
  const int32_t* pages;
  int end, kvh, lane, cc;
  int64_t row_stride, lane_code;  // kWhole: the lane's first code from the tile's

  __device__ Fp8TileLoader(const Fp8Kv& f_, const int32_t* pages_, int end_, int kvh_, int lane_)
      : f(f_), pages(pages_), end(end_), kvh(kvh_), lane(lane_), cc(lane_ % CB) {
    row_stride = int64_t(f.num_kv_heads) * D;
    lane_code = (lane / CB) * row_stride + cc * 16;
  }
  __device__ int64_t block(int pos) const {
    return pages[f.block_shift >= 0 ? pos >> f.block_shift : pos / f.block_size];
  }
  __device__ int offset(int pos) const {
    return f.block_shift >= 0 ? pos & (f.block_size - 1) : pos % f.block_size;
  }
  __device__ void operator()(int k0, unsigned char* st) const {
    if constexpr (kWhole) {
      if (k0 >= end) {  // a warp's tile past the split's end: zeros, no page to look up
#pragma unroll
        for (int i = 0; i < 16 / RP; ++i) {
          const int at = code_chunk<D>(lane / CB + i * RP, cc);
          cp_async16(st + at, f.k, 0);
          cp_async16(st + L::codes + at, f.v, 0);
        }
        return;
      }
      const int64_t blk = block(k0), o0 = offset(k0);
      const int64_t tile0 = blk * f.block_bytes + (o0 * f.num_kv_heads + kvh) * D;
      const uint8_t* kp = f.k + tile0 + lane_code;
      const uint8_t* vp = f.v + tile0 + lane_code;
#pragma unroll
      for (int i = 0; i < 16 / RP; ++i) {
        const int r = lane / CB + i * RP;
        const int n = k0 + r < end ? 16 : 0;
        const int at = code_chunk<D>(r, cc);
        cp_async16(st + at, n ? kp + i * RP * row_stride : f.k, n);
        cp_async16(st + L::codes + at, n ? vp + i * RP * row_stride : f.v, n);
      }
      if (lane < 8) {
        const int r = 4 * (lane & 3);
        const bool valid = k0 + r < end;
        const int64_t off = valid ? blk * f.block_bytes + f.exp_start + int64_t(kvh) * f.block_size + o0 + r : 0;
        cp_async4(st + 2 * L::codes + (lane >> 2) * 16 + r, (lane < 4 ? f.k : f.v) + off, valid ? 4 : 0);
      }
    } else {
#pragma unroll
      for (int i = 0; i < 16 / RP; ++i) {
        const int r = lane / CB + i * RP, pos = k0 + r;
        const bool valid = pos < end;
        const int64_t off = valid ? f.code_offset(block(pos), offset(pos), kvh) + cc * 16 : 0;
        const int at = code_chunk<D>(r, cc);
        cp_async16(st + at, f.k + off, valid ? 16 : 0);
        cp_async16(st + L::codes + at, f.v + off, valid ? 16 : 0);
      }
      if (lane < 8) {
        const int r = 4 * (lane & 3), pos = k0 + r;
        const bool valid = pos < end;
        const int64_t off = valid ? f.exp_offset(block(pos), offset(pos), kvh) : 0;
        cp_async4(st + 2 * L::codes + (lane >> 2) * 16 + r, (lane < 4 ? f.k : f.v) + off, valid ? 4 : 0);
      }
    }
  }
};

// What the kernel knows of its block and warp: its (item, kv head, split),
// the split's keys start .. end, this warp's share of them (tiles j of keys
// tile_start(j) ..) and its ring of S stages, filled by `load`.
template <int D, int W, int S, bool kWhole>
struct Fp8DecodeWarp {
  using L = Fp8DecodeSmem<D, W, S>;
  const int item, kvh, split = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
  const DecodeItem it;
  const int start, end;
  const int ntiles;  // each warp's
  unsigned char* const ring;
  const Fp8TileLoader<D, W, S, kWhole> load;

  __device__ Fp8DecodeWarp(const AttentionParams& p, const DecodePlan& d, unsigned char* smem)
      : item(decode_block(d).x),
        kvh(decode_block(d).y),
        it(d.items[item]),
        start(split * d.chunk),
        end(min(it.context, start + d.chunk)),
        ntiles(end > start ? (end - start + 16 * W - 1) / (16 * W) : 0),
        ring(smem + size_t(warp) * S * L::tile),
        load(p.fp8, p.kv.page_indices + it.page_start, end, kvh, lane) {}

  __device__ int tile_start(int j) const { return start + 16 * (W * j + warp); }
  // The first S - 1 tiles into their stages.
  __device__ void prefetch() const {
#pragma unroll
    for (int s = 0; s < S - 1; ++s) {
      if (s < ntiles) load(tile_start(s), ring + s * L::tile);
      cp_async_commit();
    }
  }
  // Tile j's stage once it has landed for every lane, tile j + S - 1 on its
  // way into the stage every lane is done with.
  __device__ const unsigned char* stage(int j) const {
    cp_async_wait<S - 2>();
    __syncwarp();
    if (j + S - 1 < ntiles) load(tile_start(j + S - 1), ring + ((j + S - 1) % S) * L::tile);
    cp_async_commit();
    return ring + (j % S) * L::tile;
  }
  // The token's row of qkv.
  __device__ const bf16* q_row(const AttentionParams& p) const {
    return p.qkv + int64_t(it.token) * (p.num_heads + 2 * p.kv.num_kv_heads) * D;
  }
};

// Word w of a lane's four V rows (load_v_rows) paired by key and widened:
// bytes b of rows (0, 1) and of rows (2, 3) side by side, as fp16 pairs
// (keys k = 2c, 2c + 1 and 2c + 8, 2c + 9): .x of lo the byte 0 pairs, .y
// byte 1's; hi bytes 2 and 3.
struct VPairs {
  uint2 lo01, lo23, hi01, hi23;
};
template <int VW>
__device__ __forceinline__ VPairs v_pairs(const uint32_t (&vw)[4][VW], int w) {
  return {e4m3_x4_f16(__byte_perm(vw[0][w], vw[1][w], 0x5140)), e4m3_x4_f16(__byte_perm(vw[2][w], vw[3][w], 0x5140)),
          e4m3_x4_f16(__byte_perm(vw[0][w], vw[1][w], 0x7362)), e4m3_x4_f16(__byte_perm(vw[2][w], vw[3][w], 0x7362))};
}

// A lane's V bytes of a tile (V's codes `v`): rows 4c .. 4c + 3, D / 8 bytes
// from (D / 8) g of each, as words.
template <int D>
__device__ __forceinline__ void load_v_rows(const unsigned char* v, int c, int g, uint32_t (&vw)[4][D / 32]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (D == 128) {
      const uint4 x = *reinterpret_cast<const uint4*>(v + code_chunk<D>(4 * c + i, g));
      vw[i][0] = x.x, vw[i][1] = x.y, vw[i][2] = x.z, vw[i][3] = x.w;
    } else {
      const uint2 x = *reinterpret_cast<const uint2*>(v + code_chunk<D>(4 * c + i, g >> 1) + (g & 1) * 8);
      vw[i][0] = x.x, vw[i][1] = x.y;
    }
  }
}

// kWhole: block_size is a multiple of 16, so a warp's tile of 16 keys lies in
// one block. The layout of the operands: the file's head.
template <int D, int W, int S, bool kWhole>
__global__ void __launch_bounds__(32 * W) decode_fp8_kernel(AttentionParams p, DecodePlan d) {
  using L = Fp8DecodeSmem<D, W, S>;
  using E = DecodeEpilogueSmem<D, W>;
  constexpr int KS = D / 16, MT = D / 16, VW = D / 32;  // k-steps of q k, m-tiles of P V, V words a row a lane
  extern __shared__ __align__(128) unsigned char smem[];
  pdl_trigger();
  pdl_wait();  // everything, the plan and the page table too, comes from the step (launch.cuh)
  const Fp8DecodeWarp<D, W, S, kWhole> b(p, d, smem);
  const int g = b.g, c = b.c, end = b.end, G = p.num_heads / p.kv.num_kv_heads;
  const bf16* row = b.q_row(p);
  const float *cs = nullptr, *sn = nullptr;
  if (p.rope_cos != nullptr) {  // fused RoPE + append: the file's head
    cs = p.rope_cos + int64_t(b.it.context - 1) * (D / 2);
    sn = p.rope_sin + int64_t(b.it.context - 1) * (D / 2);
    // The split holding the token's own key writes it (warp 0) and its v
    // (warp 1) into the slot; the barrier makes them every warp's to load.
    if (b.it.slot >= 0 && b.start < end && end == b.it.context) {
      if (b.warp < 2) append_own_fp8<D>(p, row, b.kvh, b.it.context - 1, b.it.slot, b.warp == 1, b.lane);
      __syncthreads();
    }
  }
  b.prefetch();

  uint32_t q[KS][2];  // head g's B operand
  const float qrow = load_q_fp8<D>(row, b.kvh, G, cs, sn, q);
  float qs[2];  // the scale of this lane's score columns, heads 2c and 2c + 1 (lanes 8c and 8c + 4 hold them)
  qs[0] = p.scale * kLog2e * __shfl_sync(0xffffffffu, qrow, 8 * c);
  qs[1] = p.scale * kLog2e * __shfl_sync(0xffffffffu, qrow, 8 * c + 4);
  int vexp = kNoExp;  // o holds the output times 2^-vexp (the largest V exponent so far)
  // o[t]: O^T's m-tile t: [0], [1] dim (D / 8) g + 2t of heads 2c, 2c + 1; [2], [3] the next dim
  float o[MT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};  // heads 2c, 2c + 1
  const int r0 = 4 * (g >> 1) + (g & 1);  // this lane's K rows: r0 (M row g), r0 + 2 (M row g + 8)

  for (int j = 0; j < b.ntiles; ++j) {
    const unsigned char* st = b.stage(j);

    // S^T: keys r0, r0 + 2 of heads 2c, 2c + 1; even and odd k-steps apart
    float sc[2][4] = {};
    {
      uint32_t ka[KS], kb[KS];  // bytes c D/4 .. of rows r0 and r0 + 2
#pragma unroll
      for (int h = 0; h < D / 64; ++h) {
        const uint4 va = *reinterpret_cast<const uint4*>(st + code_chunk<D>(r0, (D / 64) * c + h));
        const uint4 vb = *reinterpret_cast<const uint4*>(st + code_chunk<D>(r0 + 2, (D / 64) * c + h));
        ka[4 * h] = va.x, ka[4 * h + 1] = va.y, ka[4 * h + 2] = va.z, ka[4 * h + 3] = va.w;
        kb[4 * h] = vb.x, kb[4 * h + 1] = vb.y, kb[4 * h + 2] = vb.z, kb[4 * h + 3] = vb.w;
      }
#pragma unroll
      for (int s = 0; s < KS; ++s) {
        const uint2 x = e4m3_x4_f16(ka[s]), y = e4m3_x4_f16(kb[s]);
        const uint32_t a[4] = {x.x, y.x, x.y, y.y};
        mma_16816<true>(sc[s & 1], a, q[s][0], q[s][1]);
      }
    }
    float sv[2][2] = {{sc[0][0] + sc[1][0], sc[0][1] + sc[1][1]},   // key r0: heads 2c, 2c + 1
                      {sc[0][2] + sc[1][2], sc[0][3] + sc[1][3]}};  // key r0 + 2

    // Online softmax per head over the tile's 16 keys (the 8 lanes of a c).
    const uint32_t kx = *reinterpret_cast<const uint32_t*>(st + 2 * L::codes + 4 * (g >> 1));
    const uint32_t vx = *reinterpret_cast<const uint32_t*>(st + 2 * L::codes + 16 + 4 * (g >> 1));
    const int key0 = b.tile_start(j) + r0;
    int ve[2];
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const bool valid = key0 + 2 * i < end;
      const int byte = 8 * ((g & 1) + 2 * i);
      ve[i] = valid ? kv_exp(vx >> byte) : kNoExp;
      const float ks = exp2_int(kv_exp(kx >> byte));
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        sv[i][e] = valid ? sv[i][e] * (qs[e] * ks) : -INFINITY;
        mx[e] = fmaxf(mx[e], sv[i][e]);
      }
    }
    int vmax = max(ve[0], ve[1]);
#pragma unroll
    for (int off = 4; off < 32; off <<= 1) {
      mx[0] = fmaxf(mx[0], __shfl_xor_sync(0xffffffffu, mx[0], off));
      mx[1] = fmaxf(mx[1], __shfl_xor_sync(0xffffffffu, mx[1], off));
      vmax = max(vmax, __shfl_xor_sync(0xffffffffu, vmax, off));
    }
    // P V in fp16 relative to the largest V exponent so far, as above.
    const int vnew = max(vexp, vmax);
    const float vcorr = vexp == kNoExp ? 1.0f : pow2(vexp - vnew);
    vexp = vnew;
    float w[2][2], ocorr[2];  // w[key][head]
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const float m_new = fmaxf(m[e], mx[e]);
      const float corr = m_new == -INFINITY ? 1.0f : fast_exp2(m[e] - m_new);
      float psum = 0.0f;
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const float pj = m_new == -INFINITY ? 0.0f : fast_exp2(sv[i][e] - m_new);  // 0 for a masked key
        w[i][e] = ve[i] == kNoExp ? 0.0f : pj * pow2(ve[i] - vnew);
        psum += pj;
      }
      l[e] = l[e] * corr + psum;
      m[e] = m_new;
      ocorr[e] = corr * vcorr;
    }
    if (__any_sync(0xffffffffu, ocorr[0] != 1.0f || ocorr[1] != 1.0f)) {
#pragma unroll
      for (int i = 0; i < MT; ++i) o[i][0] *= ocorr[0], o[i][1] *= ocorr[1], o[i][2] *= ocorr[0], o[i][3] *= ocorr[1];
    }
    // P^T's halves (M rows 0-7, 8-15 by heads), transposed: the B operand, k = 2c, 2c + 1 and 2c + 8, 2c + 9
    const uint32_t pb0 = movmatrix_trans(pack_f16x2(w[0][0], w[0][1]));
    const uint32_t pb1 = movmatrix_trans(pack_f16x2(w[1][0], w[1][1]));

    // V^T: rows 4c .. 4c + 3 (k = 2c, 2c + 1, 2c + 8, 2c + 9), bytes (D / 8) g .. of each;
    // byte b of word w is M row g (b even) or g + 8 (b odd) of m-tile 2w + b / 2.
    uint32_t vw[4][VW];
    load_v_rows<D>(st + L::codes, c, g, vw);
#pragma unroll
    for (int wd = 0; wd < VW; ++wd) {
      const VPairs v = v_pairs(vw, wd);
      const uint32_t a0[4] = {v.lo01.x, v.lo01.y, v.lo23.x, v.lo23.y}, a1[4] = {v.hi01.x, v.hi01.y, v.hi23.x, v.hi23.y};
      mma_16816<true>(o[2 * wd], a0, pb0, pb1);
      mma_16816<true>(o[2 * wd + 1], a1, pb0, pb1);
    }
  }
  {  // o to the output's own scale
    const float sc = vexp == kNoExp ? 0.0f : exp2_int(vexp);
#pragma unroll
    for (int i = 0; i < MT; ++i) o[i][0] *= sc, o[i][1] *= sc, o[i][2] *= sc, o[i][3] *= sc;
  }
#pragma unroll
  for (int off = 4; off < 32; off <<= 1) {
    l[0] += __shfl_xor_sync(0xffffffffu, l[0], off);
    l[1] += __shfl_xor_sync(0xffffffffu, l[1], off);
  }
  cp_async_wait<0>();
  __syncthreads();  // every warp is done with the stages, where the warps' results go
  float* wo = reinterpret_cast<float*>(smem + E::warp_o);
  float* wm = reinterpret_cast<float*>(smem + E::warp_m);
  float* wl = reinterpret_cast<float*>(smem + E::warp_l);
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    const int h = 2 * c + e;
    if (h < G) {
      float* dst = wo + (b.warp * kMaxGroup + h) * D + (D / 8) * g;
#pragma unroll
      for (int i = 0; i < MT; ++i) dst[2 * i] = o[i][e], dst[2 * i + 1] = o[i][2 + e];
      if (g == 0) wm[b.warp * kMaxGroup + h] = m[e], wl[b.warp * kMaxGroup + h] = l[e];
    }
  }
  merge_decode_block<D, W>(p, d, smem, reinterpret_cast<float*>(smem + L::out),
                           reinterpret_cast<float*>(smem + L::lse), b.item, b.kvh, b.it.token, b.split);
}

// The kernel of a configuration, its shared memory set up once per process.
template <int D, int W, int S, bool kWhole>
auto decode_fp8_ready() {
  constexpr auto kernel = decode_fp8_kernel<D, W, S, kWhole>;
  static const bool configured = [] {
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(Fp8DecodeSmem<D, W, S>::bytes)));
    return true;
  }();
  (void)configured;
  return kernel;
}

}  // namespace

template <int D, int W, int S>
void launch_decode_fp8(const AttentionParams& p, const DecodePlan& d, dim3 grid, cudaStream_t s) {
  const unsigned cz = d.cluster ? static_cast<unsigned>(d.num_splits) : 1;
  const size_t smem = Fp8DecodeSmem<D, W, S>::bytes;
  if (p.fp8.block_size % 16 == 0)
    launch_clusters(decode_fp8_ready<D, W, S, true>(), grid, 32 * W, smem, cz, s, p, d);
  else
    launch_clusters(decode_fp8_ready<D, W, S, false>(), grid, 32 * W, smem, cz, s, p, d);
}

// (alike for every kernel of a configuration: the same shared memory, which limits them)
template <int D, int W, int S>
int decode_fp8_blocks_per_sm() {
  int n = 0;
  const size_t smem = Fp8DecodeSmem<D, W, S>::bytes;
  CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, decode_fp8_ready<D, W, S, true>(), 32 * W, smem));
  return n;
}

#define PAGEDRT_DECODE_FP8(D, W, S)                                                                       \
  template void launch_decode_fp8<D, W, S>(const AttentionParams&, const DecodePlan&, dim3, cudaStream_t); \
  template int decode_fp8_blocks_per_sm<D, W, S>();
#define PAGEDRT_DECODE_FP8_S(D, W) \
  PAGEDRT_DECODE_FP8(D, W, 2)      \
  PAGEDRT_DECODE_FP8(D, W, 3)      \
  PAGEDRT_DECODE_FP8(D, W, 4)      \
  PAGEDRT_DECODE_FP8(D, W, 6)      \
  PAGEDRT_DECODE_FP8(D, W, 8)
PAGEDRT_DECODE_FP8_S(64, 2)
PAGEDRT_DECODE_FP8_S(64, 4)
PAGEDRT_DECODE_FP8_S(128, 2)
PAGEDRT_DECODE_FP8_S(128, 4)
#undef PAGEDRT_DECODE_FP8_S
#undef PAGEDRT_DECODE_FP8

}  // namespace pagedrt::cuda
