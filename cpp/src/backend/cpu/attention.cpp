// Paged attention on the CPU, by tiles.
//
// A work item is one kv head of a tile: up to kTileRows / G consecutive query
// tokens of one sequence, each with its G query heads, as rows
//
//   row r = j * G + g:  token t0 + j, query head kvh * G + g,  r < R = n * G
//
// so every K and V row read from the cache serves all R rows (prefill), or
// the G heads of one token (decode, n = 1). Per item, two passes over the
// context, both reading the page table block by block:
//
//   S (R, ctx) = scale * Q K^T   16 keys at a time: the chunk of K is
//                                transposed (kt, 16 keys per vector) so each
//                                query word is one broadcast multiply-add
//                                (VDPBF16PS on bf16 pairs, FMA on fp32); for
//                                R <= 4 (decode) K is read in place instead
//                                (qk_units)
//   P = exp(S - rowmax), 0 past each row's causal end (positions[t] + 1)
//   O (R, D) = (P V) / rowsum    V rows widened to fp32, P stays fp32
//
// With deterministic=False on a processor with AMX, a tile of more than 4
// rows of a bf16 cache (D % 32 == 0) takes Q K^T and P V on AMX tiles, P in
// bf16 (attend_amx, attention_amx.cpp): 2.2-2.4x the attention rate of a
// 2-core Xeon VM's prefill.
//
// A decode step whose (token, kv head) items would leave more than half the
// threads idle (batch 1 on many cores) splits each token across the team
// instead (attend_token_split, attention_avx512.inc): Q K^T by runs of keys,
// the softmax by rows, P V by cache lines of output columns; the same bits.
//
// S stays whole in per-thread scratch (R x ctx fp32: 768 KiB for 48 rows at
// 4096 keys). Without AVX-512, or for a head dim that is not a multiple of 16,
// attend_rows does the same one row at a time.
#include "backend/cpu/attention.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "backend/cpu/gemm.hpp"
#include "backend/cpu/kv_fp8.hpp"
#include "backend/cpu/vec_math.hpp"
#include "backend/team.hpp"

#if defined(__AVX2__) && defined(__FMA__)
#include "backend/cpu/simd.hpp"
#define PAGEDRT_AVX2 1
#endif
#if defined(PAGEDRT_VEC512) && defined(__AVX512BF16__)
#define PAGEDRT_DPBF16 1
#endif

namespace pagedrt::cpu {
namespace {


// Rows (tokens x G) of a prefill tile: each chunk of K is transposed once per
// tile. Measured on Zen 4 (32 prompts of 64-200 tokens, G = 3): 16 rows 4.6 ms
// a layer, 24 rows 4.3, 48 rows 4.0, 96 rows 4.0.
constexpr int64_t kTileRows = 48;
constexpr int64_t kChunk = 16;        // keys per QK step: one vector of scores
constexpr int64_t kMaxVecDim = 256;   // head dims the vector path takes (and D % 16 == 0)

struct Tile {
  int32_t seq;  // sequence index
  int32_t t0;   // first token (batch row)
  int32_t n;    // tokens
};

template <typename T>
struct Args {
  const BatchView* b;
  const T* qkv;           // (num_tokens, (H + 2 Hkv) D)
  PagedKv<const T> kv;    // the layer's K and V and the step's page table
  const T* k;             // kv.k, kv.v
  const T* v;
  T* out;                 // (num_tokens, H D)
  int64_t H, Hkv, D, G;
  float scale;
  bool invariant;         // scores in the order of the decode path (qk_rows)
  const Fp8Kv* fp8;       // set: the cache is fp8 (kv is unused), its rows dequantized per item
  bool logit_rows_only = false;  // only the tiles holding a logit row (paged_attention)
};

// One thread's buffers, grown as needed and kept between calls.
struct Scratch {
  std::vector<int64_t> off;   // (ctx) element offset of each position's K/V row (head kvh)
  std::vector<int64_t> ctx;   // (R) keys each row attends to
  std::vector<int64_t> qoff;  // (R) element offset of each row's query in qkv
  std::vector<int64_t> ooff;  // (R) element offset of each row's output in out
  std::vector<float> s;       // (R, ldp) scores, then unnormalized probabilities
  std::vector<float> qf;      // (R, D) fp32 queries, where the kernel needs them
  std::vector<int64_t> qfoff; // (R) offset of each row in qf
  std::vector<float> acc;     // (D) one output row (portable path)
  std::vector<float> inv;     // (R) 1 / softmax denominator
  std::vector<float> kd, vd;  // (ctx, D) an fp8 item's K and V rows, dequantized (as T)
};
Scratch& scratch() {
  static thread_local Scratch s;
  return s;
}

// off[p], p < ctx: where position p's row of kv head kvh starts, walking the
// sequence's blocks; within a block consecutive positions are Hkv * D apart.
template <typename T>
void row_offsets(const PagedKv<T>& kv, const int32_t* pages, int64_t ctx, int64_t kvh, int64_t* off) {
  const int64_t bs = kv.block_size;
  for (int64_t p = 0, blk = 0; p < ctx; ++blk) {
    const int64_t base = kv.slot_offset(static_cast<int64_t>(pages[blk]) * bs, kvh);
    const int64_t end = std::min(ctx, p + bs);
    for (int64_t o = base; p < end; ++p, o += kv.token_stride) off[p] = o;
  }
}

// ---- portable path (no AVX-512, or a head dim the vector path does not take) ----

#ifdef PAGEDRT_AVX2
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
#endif

// dot(a, b), a fp32, b fp32 or bf16
template <typename T>
inline float dot(const float* a, const T* b, int64_t n) {
  int64_t i = 0;
  float s = 0.0f;
#ifdef PAGEDRT_AVX2
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), load8(b + i + 8), acc1);
  }
  for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), acc0);
  __m256 v = _mm256_add_ps(acc0, acc1);
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
  s = _mm_cvtss_f32(h);
#endif
  for (; i < n; ++i) s += a[i] * to_f32(b[i]);
  return s;
}

// y += a * x, x fp32 or bf16
template <typename T>
inline void axpy(float a, const T* x, float* y, int64_t n) {
  int64_t i = 0;
#ifdef PAGEDRT_AVX2
  __m256 av = _mm256_set1_ps(a);
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, load8(x + i), _mm256_loadu_ps(y + i)));
#endif
  for (; i < n; ++i) y[i] += a * to_f32(x[i]);
}

// The tile row by row: scores, softmax, P V, one row at a time.
template <typename T>
void attend_rows(const Args<T>& a, int64_t R, Scratch& sc) {
  const int64_t D = a.D;
  sc.qf.resize(D);
  sc.acc.resize(D);
  for (int64_t r = 0; r < R; ++r) {
    const T* q = a.qkv + sc.qoff[r];
    for (int64_t i = 0; i < D; ++i) sc.qf[i] = to_f32(q[i]);
    const int64_t ctx = sc.ctx[r];
    float* s = sc.s.data();
    float mx = -INFINITY;
    for (int64_t p = 0; p < ctx; ++p) mx = std::max(mx, s[p] = dot(sc.qf.data(), a.k + sc.off[p], D) * a.scale);
    float sum = 0.0f;
    for (int64_t p = 0; p < ctx; ++p) sum += (s[p] = std::exp(s[p] - mx));
    std::fill(sc.acc.begin(), sc.acc.end(), 0.0f);
    for (int64_t p = 0; p < ctx; ++p) axpy(s[p], a.v + sc.off[p], sc.acc.data(), D);
    const float inv = 1.0f / sum;
    T* o = a.out + sc.ooff[r];
    for (int64_t i = 0; i < D; ++i) store_f32(o + i, sc.acc[i] * inv);
  }
}

std::atomic<int64_t> g_amx_tiles{0};    // attention_amx_tiles()
std::atomic<int64_t> g_split_tokens{0};  // attention_split_tokens()

// attention_split_rule(): -1 the default, 0 never, 1 wider (run_tiles); -2 not read yet.
std::atomic<int> g_split_rule{-2};

// Keys from which a decode token with too few items for the team is split
// across it (attend_token_split). The 16-core Xeon of the GPU host, SmolLM2's
// widths, 16 threads, batch-1 TPOT against the items path (tools/bench_context.py,
// 2026-12-06): 8,000 keys 5.1 against 11.0-12.0 ms, 4,000 3.7 against 5.7,
// 2,000 3.5 and 4.7 against 3.6 and 5.9 (two runs); 256 to 1,024 within the
// shared host's noise.
constexpr int64_t kSplitMinKeys = 512;

// ---- AVX-512 path (attention_avx512.inc: attend_vec) -------------------------------

#ifdef PAGEDRT_VEC512
#include "backend/cpu/attention_avx512.inc"
#endif


// An fp8 cache's K and V rows of kv head kvh, positions 0 .. ctx of sequence
// `seq`, dequantized into sc.kd / sc.vd as T (exact), and the Args that read
// them there: off[p] = p D.
template <typename T>
Args<T> dequantize_rows(const Args<T>& a, int32_t seq, int64_t ctx, int64_t kvh, Scratch& sc) {
  const Fp8Kv& kv = *a.fp8;
  const int64_t D = a.D, bs = kv.block_size;
  const size_t floats = (static_cast<size_t>(ctx * D) * sizeof(T) + sizeof(float) - 1) / sizeof(float);
  if (sc.kd.size() < floats) sc.kd.resize(floats), sc.vd.resize(floats);
  T* kd = reinterpret_cast<T*>(sc.kd.data());
  T* vd = reinterpret_cast<T*>(sc.vd.data());
  const int32_t* pages = kv.pages(seq);
  for (int64_t p = 0, blk = 0; p < ctx; ++blk) {  // block by block, as row_offsets walks them
    const int64_t block = pages[blk], end = std::min(ctx, p + bs);
    for (int64_t o = 0; p < end; ++p, ++o) {
      const int64_t c = kv.code_offset(block, o, kvh), e = kv.exp_offset(block, o, kvh);
      dequantize_kv_row(kv.k + c, static_cast<int8_t>(kv.k[e]), D, kd + p * D);
      dequantize_kv_row(kv.v + c, static_cast<int8_t>(kv.v[e]), D, vd + p * D);
      sc.off[p] = p * D;
    }
  }
  Args<T> b = a;
  b.k = kd;
  b.v = vd;
  return b;
}

// One work item: the rows of `tile` under kv head kvh.
template <typename T>
void attend(const Args<T>& a0, const Tile& tile, int64_t kvh) {
  Scratch& sc = scratch();
  const int64_t G = a0.G, D = a0.D, R = tile.n * G;
  const int64_t row = (a0.H + 2 * a0.Hkv) * D;
  sc.ctx.resize(R);
  sc.qoff.resize(R);
  sc.ooff.resize(R);
  int64_t ctx = 0;
  for (int64_t j = 0, r = 0; j < tile.n; ++j) {
    const int64_t t = tile.t0 + j, c = static_cast<int64_t>(a0.b->positions[t]) + 1;
    ctx = std::max(ctx, c);
    for (int64_t g = 0; g < G; ++g, ++r) {
      sc.ctx[r] = c;
      sc.qoff[r] = t * row + (kvh * G + g) * D;
      sc.ooff[r] = t * a0.H * D + (kvh * G + g) * D;
    }
  }
  sc.off.resize(ctx);
  if (a0.fp8 == nullptr) row_offsets(a0.kv, a0.kv.pages(tile.seq), ctx, kvh, sc.off.data());
  const Args<T> a = a0.fp8 != nullptr ? dequantize_rows(a0, tile.seq, ctx, kvh, sc) : a0;
#ifdef PAGEDRT_VEC512
  if (D % 16 == 0 && D <= kMaxVecDim) return attend_vec(a, R, ctx, sc);
#endif
  sc.s.resize(ctx);
  attend_rows(a, R, sc);
}

#ifdef PAGEDRT_VEC512
// A decode token's every kv head as one item (attend_heads).
template <typename T>
void attend_token(const Args<T>& a, const Tile& tile) {
  Scratch& sc = scratch();
  const int64_t D = a.D, R = a.Hkv * a.G, t = tile.t0, row = (a.H + 2 * a.Hkv) * D;
  const int64_t ctx = static_cast<int64_t>(a.b->positions[t]) + 1;
  sc.qoff.resize(R);
  sc.ooff.resize(R);
  for (int64_t r = 0; r < R; ++r) {  // query head r = kvh G + g
    sc.qoff[r] = t * row + r * D;
    sc.ooff[r] = t * a.H * D + r * D;
  }
  sc.off.resize(ctx);
  row_offsets(a.kv, a.kv.pages(tile.seq), ctx, 0, sc.off.data());
  attend_heads(a, ctx, sc);
}
#endif

// x (2 half) := (x1 c - x2 s, x2 c + x1 s), x1 = x[0 .. half), x2 = x[half .. 2 half):
// the rotate-half RoPE of transformers' Llama, in fp32
template <typename T>
inline void rotate_half(T* x, const float* c, const float* s, int64_t half) {
  int64_t i = 0;
#ifdef PAGEDRT_VEC512
  for (; i + 16 <= half; i += 16) {
    const __m512 x1 = load16(x + i), x2 = load16(x + i + half);
    const __m512 cv = _mm512_loadu_ps(c + i), sv = _mm512_loadu_ps(s + i);
    store16(x + i, _mm512_sub_ps(_mm512_mul_ps(x1, cv), _mm512_mul_ps(x2, sv)));
    store16(x + i + half, _mm512_add_ps(_mm512_mul_ps(x2, cv), _mm512_mul_ps(x1, sv)));
  }
#endif
  for (; i < half; ++i) {
    const float x1 = to_f32(x[i]), x2 = to_f32(x[i + half]);
    store_f32(x + i, x1 * c[i] - x2 * s[i]);
    store_f32(x + i + half, x2 * c[i] + x1 * s[i]);
  }
}

}  // namespace

int64_t attention_amx_tiles() { return g_amx_tiles.load(std::memory_order_relaxed); }
int64_t attention_split_tokens() { return g_split_tokens.load(std::memory_order_relaxed); }

int attention_split_rule() {
  int rule = g_split_rule.load(std::memory_order_relaxed);
  if (rule == -2) {
    const char* e = std::getenv("PAGEDRT_CPU_SPLIT_DECODE");
    rule = e == nullptr ? -1 : std::atoi(e) == 0 ? 0 : 1;
    g_split_rule.store(rule, std::memory_order_relaxed);
  }
  return rule;
}

void set_attention_split_rule(int rule) { g_split_rule.store(rule < 0 ? -1 : rule == 0 ? 0 : 1); }

bool attention_split_built(bool bf16) {
#ifdef PAGEDRT_VEC512
  return bf16 ? heads_in_one_item<uint16_t>(64, 1) : heads_in_one_item<float>(64, 1);
#else
  return false;
#endif
}

template <typename T>
void rope_and_cache(const BatchView& b, T* qkv, const float* cos, const float* sin, int64_t num_heads,
                    const PagedKv<T>& kv, int threads) {
  const int64_t H = num_heads, Hkv = kv.num_kv_heads, D = kv.head_dim, half = D / 2;
  const int64_t row = (H + 2 * Hkv) * D;
  parallel_for(b.num_tokens, b.num_tokens > 8 ? threads : 1, [&](int64_t t) {
    T* q = qkv + t * row;  // (H + Hkv, D) rotated: the q heads then the k heads
    const float* c = cos + static_cast<int64_t>(b.positions[t]) * half;
    const float* sn = sin + static_cast<int64_t>(b.positions[t]) * half;
    for (int64_t h = 0; h < H + Hkv; ++h) rotate_half(q + h * D, c, sn, half);
    const int64_t slot = b.slot_mapping[t];  // flat (block, offset) index; -1: a padding token, no slot
    for (int64_t h = 0; h < Hkv && slot >= 0; ++h) {
      std::copy(q + (H + h) * D, q + (H + h + 1) * D, kv.k + kv.slot_offset(slot, h));
      std::copy(q + (H + Hkv + h) * D, q + (H + Hkv + h + 1) * D, kv.v + kv.slot_offset(slot, h));
    }
  });
}

namespace {

template <typename T>
void run_tiles(const Args<T>& a, int threads) {
  const BatchView& b = *a.b;
  const int64_t Hkv = a.Hkv, G = a.G;
  const int32_t per_tile = static_cast<int32_t>(std::max<int64_t>(1, kTileRows / G));
  std::vector<Tile> tiles;
  std::vector<char> logit_row;  // (num_tokens) with logit_rows_only: whether token t is a logit row
  if (a.logit_rows_only) {
    logit_row.assign(b.num_tokens, 0);
    for (int32_t j = 0; j < b.num_logits; ++j) logit_row[b.logits_indices[j]] = 1;
  }
  for (int32_t i = 0; i < b.num_seqs; ++i)
    for (int32_t t0 = b.query_start[i]; t0 < b.query_start[i + 1]; t0 += per_tile) {
      const Tile tile{i, t0, std::min(per_tile, b.query_start[i + 1] - t0)};
      // logit_rows_only: the tiles (as cut among all) that hold a logit row
      if (!a.logit_rows_only || std::any_of(&logit_row[t0], &logit_row[t0] + tile.n, [](char c) { return c; }))
        tiles.push_back(tile);
    }
  // longest context first, so the dynamic schedule ends on short items
  std::stable_sort(tiles.begin(), tiles.end(), [&](const Tile& x, const Tile& y) {
    return b.positions[x.t0 + x.n - 1] > b.positions[y.t0 + y.n - 1];
  });
  const int64_t items = static_cast<int64_t>(tiles.size()) * Hkv;
#ifdef PAGEDRT_VEC512
  // Decode tokens (one query row each) whose kv heads the AVX-512 kernels
  // can take as one unit: the two decode paths below.
  const bool whole_tokens = a.fp8 == nullptr && heads_in_one_item<T>(a.D, G) &&
                            std::all_of(tiles.begin(), tiles.end(), [](const Tile& t) { return t.n == 1; });
  // Decode tokens, where there are enough for every thread: all kv heads of
  // a token in one item (attend_heads; Zen 4, 32 sequences x ~200 keys,
  // SmolLM2: an item per kv head spent a quarter of the batched decode step
  // waiting on its strided K and V reads). PAGEDRT_CPU_DECODE_HEADS=0: an
  // item per kv head (A/B runs).
  static const bool heads_together = [] {
    const char* e = std::getenv("PAGEDRT_CPU_DECODE_HEADS");
    return e == nullptr || std::strcmp(e, "0") != 0;
  }();
  if (heads_together && whole_tokens && static_cast<int64_t>(tiles.size()) >= 2 * threads) {
    const int64_t n = static_cast<int64_t>(tiles.size());
    parallel_for_dynamic(n, threads, [&](int64_t i) { attend_token(a, tiles[i]); });
    return;
  }
  // Decode tokens whose (token, kv head) items leave more than half the team
  // idle (batch 1: SmolLM2's 3 kv heads on 16 threads, a Llama-3-8B's 8):
  // a token at a time on every thread, where its context is long enough
  // (tiles are longest first). Not where the items nearly fill the team: on a
  // 2-core Zen 4 VM, 3 kv heads on 2 threads, split tokens made batch-1 TPOT
  // at 8,000 tokens of context ~5-10% slower (docs/benchmarks.md, session
  // 38). attention_split_rule(): PAGEDRT_CPU_SPLIT_DECODE=0 never; =1 also
  // wherever items < 2 x threads do not divide evenly (A/B runs).
  const int split_rule = attention_split_rule();
  const bool few = split_rule == 1 ? items < 2 * threads && items % threads != 0 : 2 * items <= threads;
  if (split_rule != 0 && few && threads > 1 && whole_tokens && !tiles.empty() &&
      b.positions[tiles[0].t0] + 1 >= kSplitMinKeys) {
    for (const Tile& t : tiles) attend_token_split(a, t, threads, scratch());
    g_split_tokens.fetch_add(static_cast<int64_t>(tiles.size()), std::memory_order_relaxed);
    return;
  }
#endif
  parallel_for_dynamic(items, threads, [&](int64_t item) { attend(a, tiles[item / Hkv], item % Hkv); });
}

}  // namespace

template <typename T>
void paged_attention(const BatchView& b, const T* qkv, int64_t num_heads, const PagedKv<const T>& kv, float scale,
                     T* out, int threads, bool invariant, bool logit_rows_only) {
  const int64_t Hkv = kv.num_kv_heads, G = num_heads / Hkv;  // query heads per kv head
  run_tiles(Args<T>{&b, qkv, kv, kv.k, kv.v, out, num_heads, Hkv, kv.head_dim, G, scale, invariant, nullptr,
                    logit_rows_only},
            threads);
}

template <typename T>
void paged_attention(const BatchView& b, const T* qkv, int64_t num_heads, const Fp8Kv& kv, float scale, T* out,
                     int threads, bool invariant, bool logit_rows_only) {
  const int64_t Hkv = kv.num_kv_heads, G = num_heads / Hkv;
  run_tiles(Args<T>{&b, qkv, PagedKv<const T>{}, nullptr, nullptr, out, num_heads, Hkv, kv.head_dim, G, scale,
                    invariant, &kv, logit_rows_only},
            threads);
}

template <typename T>
void rope_and_cache(const BatchView& b, T* qkv, const float* cos, const float* sin, int64_t num_heads,
                    const Fp8Kv& kv, int threads) {
  const int64_t H = num_heads, Hkv = kv.num_kv_heads, D = kv.head_dim, half = D / 2;
  const int64_t row = (H + 2 * Hkv) * D;
  parallel_for(b.num_tokens, b.num_tokens > 8 ? threads : 1, [&](int64_t t) {
    T* q = qkv + t * row;
    const float* c = cos + static_cast<int64_t>(b.positions[t]) * half;
    const float* sn = sin + static_cast<int64_t>(b.positions[t]) * half;
    for (int64_t h = 0; h < H + Hkv; ++h) rotate_half(q + h * D, c, sn, half);
    const int64_t slot = b.slot_mapping[t];
    if (slot < 0) return;
    for (int64_t h = 0; h < Hkv; ++h) {
      const int64_t code = kv.slot_code_offset(slot, h), e = kv.slot_exp_offset(slot, h);
      kv.k[e] = static_cast<uint8_t>(quantize_kv_row(q + (H + h) * D, D, kv.k + code));
      kv.v[e] = static_cast<uint8_t>(quantize_kv_row(q + (H + Hkv + h) * D, D, kv.v + code));
    }
  });
}

template void rope_and_cache<float>(const BatchView&, float*, const float*, const float*, int64_t,
                                    const PagedKv<float>&, int);
template void rope_and_cache<uint16_t>(const BatchView&, uint16_t*, const float*, const float*, int64_t,
                                       const PagedKv<uint16_t>&, int);
template void paged_attention<float>(const BatchView&, const float*, int64_t, const PagedKv<const float>&, float,
                                     float*, int, bool, bool);
template void paged_attention<uint16_t>(const BatchView&, const uint16_t*, int64_t, const PagedKv<const uint16_t>&,
                                        float, uint16_t*, int, bool, bool);
template void paged_attention<float>(const BatchView&, const float*, int64_t, const Fp8Kv&, float, float*, int, bool,
                                     bool);
template void paged_attention<uint16_t>(const BatchView&, const uint16_t*, int64_t, const Fp8Kv&, float, uint16_t*,
                                        int, bool, bool);
template void rope_and_cache<float>(const BatchView&, float*, const float*, const float*, int64_t, const Fp8Kv&, int);
template void rope_and_cache<uint16_t>(const BatchView&, uint16_t*, const float*, const float*, int64_t, const Fp8Kv&,
                                       int);

}  // namespace pagedrt::cpu
