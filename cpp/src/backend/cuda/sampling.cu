// backend/cuda/sampling.cu — temperature, top-k, top-p and min-p sampling on
// the GPU (Backend::sample; the semantics are SampleRow's, backend.hpp).
//
// One block of 1024 threads per draw, over its logits row (vocab fp32):
//   0. the row's edits (LogitEdit: bias, bans, penalties) are applied as it
//      is read: a bitmap of the edited tokens in shared memory, and for
//      those a binary search of the draw's sorted edited tokens, their
//      processed values computed once into shared memory (a draw with more
//      edits than fit searches its edits in global memory instead). That
//      read is written once to a processed copy of the row in global memory
//      (where the backend has room for one), which every later pass reads
//      as a plain row: a branch in the passes' loads costs their overlap.
//      A structured-output draw's mask (a token it does not allow is -inf)
//      is applied only there: such draws always get a copy (a mask check
//      in the passes cost even unmasked draws 30-70%);
//      The raw row is left as it is, for the logprobs and the row's other
//      draws;
//   1. the row's maximum and its first index (the fallback when every weight
//      is 0, and the token at temperature 0);
//   2. top-k: the k-th largest logit by radix select on order-preserving
//      32-bit keys (4 passes of 8 bits, a 256-bin count histogram each), then
//      which of the tied keys at that value are kept (the lower ids: a count
//      in id order);
//   3. top-p: the same select, with histograms of fixed-point weight instead
//      of counts, over the candidates step 2 kept, to the smallest most likely
//      prefix holding ceil(top_p * their weight);
//   4. the draw: u from Philox (key, counter), target floor(u * total), and
//      the running weight in id order to the token;
//   5. logprobs (SampleRow::logprobs >= 0), of the raw row: its log-sum-exp
//      (fixed reduction order), the token's, and the top k by the same radix
//      select, sorted (value descending, id ascending).
// Every sum is of integers, so the result does not depend on the order the
// threads add in: a draw is reproducible bit for bit.
//
// The candidate set after steps 2-3 is {t : key_t > cut_key} plus the tied
// keys == cut_key with id <= cut_id; min_p then drops weights below
// min_p * 2^31 (the most likely's weight is exactly 2^31).
//
//   grid (draws)   block 1024   shared: per-warp histograms (64 KB), the edit bitmap (vocab bits)
//   scans in id order: warp w owns ids [w seg, (w + 1) seg), 32 at a time
#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cstring>
#include <mutex>

#include "backend/cuda/cuda_backend.hpp"
#include "backend/cuda/cuda_check.hpp"
#include "backend/cuda/kernels.cuh"
#include "backend/cuda/launch.cuh"
#include "backend/philox.hpp"

namespace pagedrt::cuda {
namespace {

constexpr int kThreads = 1024;
constexpr float kOne = 2147483648.0f;  // weight of the most likely token: 2^31
constexpr float kLog2e = 1.4426950408889634f;

// Larger logit -> larger key; NaN sorts below -inf (and weighs 0); -0 is
// +0 (the host compares them equal and breaks the tie by id).
__device__ __forceinline__ uint32_t order_key(float x) {
  if (isnan(x)) return 0u;
  const uint32_t b = x == 0.0f ? 0u : __float_as_uint(x);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// A draw's view of its row: raw logits, and the edits that process them.
struct Row {
  const float* x;
  int64_t vocab;
  float max, scale;  // weight(t) = 2^31 * 2^((x_t - max) * scale)
  const LogitEdit* edits = nullptr;  // sorted by token
  int32_t num_edits = 0;
  const uint32_t* edited = nullptr;  // bit t: token t has an edit
  const int32_t* edit_token = nullptr;  // shared memory: the edited tokens and their processed values, or null
  const float* edit_value = nullptr;
  float rep = 1.0f, freq = 0.0f, pres = 0.0f;

  // The processed logit of token t.
  __device__ float value(int64_t t) const {
    const float v = x[t];
    if (num_edits == 0 || !((edited[t >> 5] >> (t & 31)) & 1u)) return v;
    int32_t lo = 0, hi = num_edits - 1;
    if (edit_token != nullptr) {
      while (lo < hi) {
        const int32_t mid = (lo + hi) / 2;
        if (edit_token[mid] < t) lo = mid + 1; else hi = mid;
      }
      return edit_value[lo];
    }
    while (lo < hi) {
      const int32_t mid = (lo + hi) / 2;
      if (edits[mid].token < t) lo = mid + 1; else hi = mid;
    }
    return processed(edits[lo], v);
  }
  // LogitEdit's order, each step rounded once.
  __device__ float processed(const LogitEdit& e, float v) const {
    if (e.flags & kEditBias) v = __fadd_rn(v, e.bias);
    if (e.flags & kEditBan) v = -INFINITY;
    if (e.flags & kEditSeen) v = v > 0.0f ? __fdiv_rn(v, rep) : __fmul_rn(v, rep);
    if (e.count > 0) v = __fsub_rn(v, __fmaf_rn(freq, static_cast<float>(e.count), pres));
    return v;
  }
  __device__ uint32_t weight(float v) const {
    if (!(v > -INFINITY)) return 0u;  // -inf and NaN
    return __float2uint_rz(exp2f((v - max) * scale) * kOne);
  }
};

// Which tokens are still candidates: key > cut_key, or key == cut_key and
// id <= cut_id (cut_key 0, cut_id = vocab: all).
struct Cut {
  uint32_t key;
  int64_t id;
  __device__ bool keeps(uint32_t k, int64_t t) const { return k > key || (k == key && t <= id); }
};

constexpr int kWarps = kThreads / 32, kBins = 256;

// Shared memory of a draw: per-warp histograms (no two warps' atomics meet;
// the first radix pass puts most of a row's keys in two or three bins), then
// their sum. A warp's bin is 64 bits held as two 32-bit words, the high one
// counting the low one's carries: shared memory has no native 64-bit atomic
// add (it is a compare-and-swap loop, which a bin that most of a warp's lanes
// hit turns into a retry storm).
struct Smem {
  uint32_t warp_lo[kWarps][kBins];  // 32 KB
  uint32_t warp_hi[kWarps][kBins];  // 32 KB
  uint64_t hist[kBins];
  uint64_t warp_sum[kWarps], warp_before[kWarps];
  uint64_t value;
  int64_t id;
  uint32_t digit;
  float warp_float[kWarps];
  int32_t top_n;
  int32_t top_id[kMaxLogprobs];
  float top_v[kMaxLogprobs];
};

template <typename V>
__device__ V warp_sum(V v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// The block's sum of v, in the same order every time (warps, then the warps'
// sums in warp order: a float sum is reproducible bit for bit); `per_warp`
// (kWarps) is free again on return.
template <typename V>
__device__ V block_sum(V v, V* per_warp) {
  v = warp_sum(v);
  if (threadIdx.x % 32 == 0) per_warp[threadIdx.x / 32] = v;
  __syncthreads();
  v = 0;
  for (int w = 0; w < kWarps; ++w) v += per_warp[w];
  __syncthreads();
  return v;
}

// The key value tau with above(tau) < need <= above(tau) + at(tau), where
// above/at count (or weigh: by_weight) the tokens that `cut` keeps, by radix
// select from the top; *left = need - above(tau).
template <bool by_weight>
__device__ uint32_t select_key(const Row& r, const Cut& cut, uint64_t need, Smem& sm, uint64_t* left) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  uint32_t prefix = 0, mask = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < kWarps * kBins; i += kThreads) (&sm.warp_lo[0][0])[i] = 0, (&sm.warp_hi[0][0])[i] = 0;
    __syncthreads();
    for (int64_t t = threadIdx.x; t < r.vocab; t += kThreads) {
      const float v = r.value(t);
      const uint32_t k = order_key(v);
      if ((k & mask) != prefix || !cut.keeps(k, t)) continue;
      const uint32_t bin = (k >> shift) & 255u;
      if (!by_weight) {
        atomicAdd(&sm.warp_lo[warp][bin], 1u);
      } else if (const uint32_t add = r.weight(v)) {
        const uint32_t old = atomicAdd(&sm.warp_lo[warp][bin], add);
        if (old + add < old) atomicAdd(&sm.warp_hi[warp][bin], 1u);  // the low word wrapped
      }
    }
    __syncthreads();
    for (int b = threadIdx.x; b < kBins; b += kThreads) {
      uint64_t h = 0;
      for (int w = 0; w < kWarps; ++w) h += (static_cast<uint64_t>(sm.warp_hi[w][b]) << 32) + sm.warp_lo[w][b];
      sm.hist[b] = h;
    }
    if (threadIdx.x == 0) sm.digit = 0, sm.value = need;
    __syncthreads();
    // Warp 0 finds the bin, from the top: lane l sums bins 255 - 8l .. 248 - 8l.
    if (warp == 0) {
      uint64_t mine = 0;
      for (int j = 0; j < 8; ++j) mine += sm.hist[255 - 8 * lane - j];
      uint64_t incl = mine;
      for (int o = 1; o < 32; o <<= 1) {
        const uint64_t up = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += up;
      }
      const uint64_t excl = incl - mine;
      if (excl < need && need <= incl) {
        uint64_t cum = excl;
        for (int j = 0; j < 8; ++j) {
          const int bin = 255 - 8 * lane - j;
          if (cum + sm.hist[bin] >= need) {
            sm.digit = static_cast<uint32_t>(bin);
            sm.value = need - cum;
            break;
          }
          cum += sm.hist[bin];
        }
      }
    }
    __syncthreads();
    prefix |= sm.digit << shift;
    need = sm.value;
    mask |= 255u << shift;
    __syncthreads();  // sm.digit and sm.value are written again next pass
  }
  *left = need;
  return prefix;
}

// Scans in id order: warp w owns ids [w seg, (w + 1) seg), its lanes reading
// 32 consecutive ids at a time (coalesced). sum_in_id_order() leaves each
// warp's sum of value(t) and the sum of the warps before it in `sm`, and
// returns the row's total; find_in_id_order() then returns the first id whose
// running sum (inclusive) exceeds `target` (< total).
__device__ int64_t id_segment(int64_t vocab) { return ((vocab + kWarps - 1) / kWarps + 31) / 32 * 32; }

template <typename F>
__device__ uint64_t sum_in_id_order(int64_t vocab, F value, Smem& sm) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t seg = id_segment(vocab), t0 = warp * seg, t1 = t0 + seg < vocab ? t0 + seg : vocab;
  uint64_t mine = 0;
  for (int64_t t = t0 + lane; t < t1; t += 32) mine += value(t);
  mine = warp_sum(mine);
  __syncthreads();
  if (lane == 0) sm.warp_sum[warp] = mine;
  __syncthreads();
  if (warp == 0) {
    const uint64_t v = sm.warp_sum[lane];
    uint64_t incl = v;
    for (int o = 1; o < 32; o <<= 1) {
      const uint64_t up = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += up;
    }
    sm.warp_before[lane] = incl - v;
  }
  __syncthreads();
  return sm.warp_before[kWarps - 1] + sm.warp_sum[kWarps - 1];
}

template <typename F>
__device__ int64_t find_in_id_order(int64_t vocab, uint64_t target, F value, Smem& sm, int64_t otherwise) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (threadIdx.x == 0) sm.id = otherwise;
  __syncthreads();
  const uint64_t before = sm.warp_before[warp];
  if (target >= before && target < before + sm.warp_sum[warp]) {  // one warp, uniformly
    const int64_t seg = id_segment(vocab), t0 = warp * seg, t1 = t0 + seg < vocab ? t0 + seg : vocab;
    uint64_t run = before;
    for (int64_t base = t0; base < t1; base += 32) {
      const int64_t t = base + lane;
      const uint64_t v = t < t1 ? value(t) : 0;
      uint64_t incl = v;
      for (int o = 1; o < 32; o <<= 1) {
        const uint64_t up = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += up;
      }
      const unsigned past = __ballot_sync(0xffffffffu, run + incl > target);
      if (past) {
        if (lane == __ffs(past) - 1) sm.id = t;
        break;
      }
      run += __shfl_sync(0xffffffffu, incl, 31);
    }
  }
  __syncthreads();
  return sm.id;
}

// The id of the `nth` (1-based) token, in id order, whose key is `key` and
// that `cut` keeps.
__device__ int64_t nth_tie(const Row& r, const Cut& cut, uint32_t key, uint64_t nth, Smem& sm) {
  auto tie = [&](int64_t t) -> uint64_t {
    const uint32_t k = order_key(r.value(t));
    return k == key && cut.keeps(k, t);
  };
  sum_in_id_order(r.vocab, tie, sm);
  return find_in_id_order(r.vocab, nth - 1, tie, sm, r.vocab - 1);
}

// The first index of the largest of value(t) (NaN never wins; every value
// NaN or -inf: the first -inf, else vocab), with the largest in *best.
template <typename F>
__device__ int64_t first_max(int64_t vocab, F value, float* best, Smem& sm) {
  __shared__ float best_v[kWarps];
  __shared__ int64_t best_i[kWarps];
  float bv = -INFINITY;
  int64_t bi = vocab;
  for (int64_t t = threadIdx.x; t < vocab; t += kThreads) {
    const float v = value(t);
    if (v > bv || (v == bv && t < bi)) bv = v, bi = t;
  }
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
    const int64_t oi = __shfl_xor_sync(0xffffffffu, bi, o);
    if (ov > bv || (ov == bv && oi < bi)) bv = ov, bi = oi;
  }
  __syncthreads();  // best_v / best_i may still be read from a previous call
  if (threadIdx.x % 32 == 0) best_v[threadIdx.x / 32] = bv, best_i[threadIdx.x / 32] = bi;
  __syncthreads();
  bv = -INFINITY;
  bi = vocab;
  for (int w = 0; w < kWarps; ++w)
    if (best_v[w] > bv || (best_v[w] == bv && best_i[w] < bi)) bv = best_v[w], bi = best_i[w];
  *best = bv;
  return bi;
}

// Steps 2-4 (temperature > 0, a finite maximum in r.max): the drawn token.
__device__ int64_t draw(Row& r, const SampleRow& sr, int64_t fallback, Smem& sm) {
  const int64_t vocab = r.vocab;
  Cut cut{0u, vocab};
  uint64_t left = 0;
  // 2. top-k
  if (sr.top_k > 0 && sr.top_k < vocab) {
    const uint32_t key = select_key<false>(r, cut, static_cast<uint64_t>(sr.top_k), sm, &left);
    cut = Cut{key, nth_tie(r, cut, key, left, sm)};
  }
  // 3. top-p over what top-k kept
  if (sr.top_p < 1.0f) {
    uint64_t mass = 0;
    for (int64_t t = threadIdx.x; t < vocab; t += kThreads) {
      const float v = r.value(t);
      if (cut.keeps(order_key(v), t)) mass += r.weight(v);
    }
    mass = block_sum(mass, sm.warp_sum);
    const double want = ceil(static_cast<double>(sr.top_p) * static_cast<double>(mass));
    const uint64_t need = want >= 1.0 ? static_cast<uint64_t>(want) : 1u;
    const uint32_t key = select_key<true>(r, cut, need, sm, &left);
    // the tied tokens at `key` weigh the same: how many of them reach `left`
    const uint32_t bits = (key & 0x80000000u) ? (key & 0x7fffffffu) : ~key;
    const uint32_t tw = r.weight(__uint_as_float(bits));
    const uint64_t w = tw > 0u ? tw : 1u;
    cut = Cut{key, nth_tie(r, cut, key, (left + w - 1) / w, sm)};
  }
  // 4. the draw, min_p last
  const uint32_t min_w = sr.min_p > 0.0f ? static_cast<uint32_t>(ceilf(fminf(sr.min_p, 1.0f) * kOne)) : 0u;
  auto kept_weight = [&](int64_t t) -> uint64_t {
    const float v = r.value(t);
    const uint32_t w = r.weight(v);
    return w >= min_w && cut.keeps(order_key(v), t) ? w : 0u;
  };
  const uint64_t total = sum_in_id_order(vocab, kept_weight, sm);
  const uint64_t target = total > 0 ? __umul64hi(philox_u64(sr.key, sr.counter), total) : 0;  // in [0, total)
  return total > 0 ? find_in_id_order(vocab, target, kept_weight, sm, fallback) : fallback;
}

// Step 5: the raw row's log-softmax at `token` and its top k (k <= kMaxLogprobs).
__device__ void logprobs_of(const float* x, int64_t vocab, int64_t token, int32_t k, Smem& sm, DrawLogprobs* out) {
  const Row raw{x, vocab, -INFINITY, 0.0f};
  float mx;
  first_max(vocab, [&](int64_t t) { return x[t]; }, &mx, sm);
  float sum = 0.0f;
  for (int64_t t = threadIdx.x; t < vocab; t += kThreads) {
    const float v = x[t];
    if (v > -INFINITY) sum += expf(v - mx);
  }
  sum = block_sum(sum, sm.warp_float);
  const float lse = mx + logf(sum);
  if (vocab < k) k = static_cast<int32_t>(vocab);
  if (k > 0) {
    const Cut all{0u, vocab};
    uint64_t left = 0;
    const uint32_t key = select_key<false>(raw, all, static_cast<uint64_t>(k), sm, &left);
    const Cut cut{key, nth_tie(raw, all, key, left, sm)};
    if (threadIdx.x == 0) sm.top_n = 0;
    __syncthreads();
    for (int64_t t = threadIdx.x; t < vocab; t += kThreads) {
      const float v = x[t];
      if (cut.keeps(order_key(v), t)) {
        const int32_t slot = atomicAdd(&sm.top_n, 1);
        if (slot < kMaxLogprobs) sm.top_id[slot] = static_cast<int32_t>(t), sm.top_v[slot] = v;
      }
    }
    __syncthreads();
  }
  if (threadIdx.x != 0) return;
  const int32_t n = k > 0 ? min(sm.top_n, k) : 0;
  for (int32_t i = 1; i < n; ++i)  // insertion sort: value descending, id ascending
    for (int32_t j = i; j > 0; --j) {
      const float a = sm.top_v[j - 1], b = sm.top_v[j];
      const int32_t ia = sm.top_id[j - 1], ib = sm.top_id[j];
      if (order_key(a) > order_key(b) || (order_key(a) == order_key(b) && ia < ib)) break;
      sm.top_v[j - 1] = b, sm.top_v[j] = a, sm.top_id[j - 1] = ib, sm.top_id[j] = ia;
    }
  out->logprob = x[token] - lse;
  out->count = n;
  for (int32_t i = 0; i < n; ++i) out->top_ids[i] = sm.top_id[i], out->top_logprobs[i] = sm.top_v[i] - lse;
}

constexpr uint32_t kNoScratch = 0xffffffffu;  // SampleRow::scratch: no processed-row buffer

// Dynamic shared memory: Smem, the edit bitmap, then up to `edit_slots`
// edited tokens and their processed values.
__host__ __device__ inline size_t bitmap_bytes(int64_t vocab) { return static_cast<size_t>((vocab + 127) / 128) * 16; }

__global__ void __launch_bounds__(kThreads, 1) sample_kernel(const float* logits, int64_t vocab, const SampleRow* rows,
                                                          const LogitEdit* edits, int32_t edit_slots,
                                                          const uint32_t* masks, float* processed, int32_t* out,
                                                          DrawLogprobs* logprobs) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Smem& sm = *reinterpret_cast<Smem*>(smem_raw);
  uint32_t* edited = reinterpret_cast<uint32_t*>(smem_raw + sizeof(Smem));  // (vocab + 31) / 32 words
  pdl_trigger();
  pdl_wait();
  const SampleRow sr = rows[blockIdx.x];
  Row r{logits + int64_t(sr.row) * vocab, vocab, -INFINITY, sr.temperature > 0.0f ? kLog2e / sr.temperature : 0.0f};
  const int64_t words = (vocab + 31) / 32;
  if (sr.num_edits > 0) {  // 0. the edited tokens' bitmap
    for (int64_t i = threadIdx.x; i < words; i += kThreads) edited[i] = 0u;
    __syncthreads();
    const LogitEdit* e = edits + sr.first_edit;
    for (int32_t i = threadIdx.x; i < sr.num_edits; i += kThreads) atomicOr(&edited[e[i].token >> 5], 1u << (e[i].token & 31));
    __syncthreads();
    r.edits = e, r.num_edits = sr.num_edits, r.edited = edited;
    r.rep = sr.repetition_penalty, r.freq = sr.frequency_penalty, r.pres = sr.presence_penalty;
    if (sr.num_edits <= edit_slots) {  // the processed values, once, where every pass finds them
      int32_t* tok = reinterpret_cast<int32_t*>(smem_raw + sizeof(Smem) + bitmap_bytes(vocab));
      float* val = reinterpret_cast<float*>(tok + edit_slots);
      for (int32_t i = threadIdx.x; i < sr.num_edits; i += kThreads) {
        const LogitEdit ei = e[i];
        tok[i] = ei.token;
        val[i] = r.processed(ei, r.x[ei.token]);
      }
      __syncthreads();
      r.edit_token = tok, r.edit_value = val;
    }
  }
  if ((sr.num_edits > 0 || sr.mask >= 0) && processed != nullptr && sr.scratch != kNoScratch) {
    float* y = processed + static_cast<int64_t>(sr.scratch) * vocab;  // the processed row, once
    if (sr.mask >= 0) {
      const uint32_t* allowed = masks + sr.mask * words;
      for (int64_t t = threadIdx.x; t < vocab; t += kThreads)
        y[t] = (allowed[t >> 5] >> (t & 31)) & 1u ? r.value(t) : -INFINITY;
    } else {
      for (int64_t t = threadIdx.x; t < vocab; t += kThreads) y[t] = r.value(t);
    }
    __syncthreads();  // the block's own global writes: visible to it past the barrier
    r.x = y;
    r.num_edits = 0;
  }
  // 1. maximum, first index of it
  const int64_t bi = first_max(vocab, [&](int64_t t) { return r.value(t); }, &r.max, sm);
  const int64_t fallback = bi < vocab ? bi : 0;
  // 2-4 (every logit -inf or NaN, or greedy: the first maximum)
  const int64_t token = sr.temperature > 0.0f && r.max > -INFINITY ? draw(r, sr, fallback, sm) : fallback;
  if (threadIdx.x == 0) out[blockIdx.x] = static_cast<int32_t>(token);
  if (sr.logprobs >= 0 && logprobs != nullptr)  // of the raw row
    logprobs_of(logits + int64_t(sr.row) * vocab, vocab, token, min(sr.logprobs, kMaxLogprobs), sm,
                logprobs + blockIdx.x);
}

}  // namespace

void sample_rows(const float* logits, int64_t vocab, const SampleRow* rows, int64_t n, const LogitEdit* edits,
                 int32_t edit_slots, const uint32_t* masks, float* processed, int32_t* out, DrawLogprobs* logprobs,
                 cudaStream_t s) {
  if (n == 0) return;
  // the attribute is per function: raised when a larger vocabulary's bitmap needs it
  // The attribute is per function and device; runtimes in several threads may get here together.
  constexpr int kDevices = 64;
  static std::atomic<size_t> configured[kDevices] = {};
  static std::mutex raising;
  int device = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  std::atomic<size_t>& mine = configured[device < kDevices ? device : kDevices - 1];
  const size_t bytes = sizeof(Smem) + bitmap_bytes(vocab) + static_cast<size_t>(edit_slots) * 8;
  if (bytes > mine.load() || device >= kDevices) {
    std::lock_guard<std::mutex> lk(raising);
    if (bytes > mine.load() || device >= kDevices) {  // only ever raised
      CUDA_CHECK(cudaFuncSetAttribute(sample_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
      mine.store(bytes);
    }
  }
  launch(sample_kernel, static_cast<unsigned>(n), kThreads, bytes, s, logits, vocab, rows, edits, edit_slots, masks,
         processed, out, logprobs);
}

void CudaBackend::sample(const Tensor& logits, const SampleRow* rows, int64_t n, const LogitEdit* edits,
                         int64_t num_edits, int32_t* out, DrawLogprobs* logprobs, const DrawMasks& masks) {
  require(logits.dtype == ScalarType::F32, "sample: fp32 logits");
  if (n == 0) return;
  const int64_t vocab = logits.dim(1);
  // a block's opt-in shared memory, less the kernel's static shared memory
  static const size_t kSmemLimit = [] {
    int device = 0, optin = 0;
    CUDA_CHECK(cudaGetDevice(&device));
    CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    cudaFuncAttributes attr{};
    CUDA_CHECK(cudaFuncGetAttributes(&attr, sample_kernel));
    return static_cast<size_t>(optin) - attr.sharedSizeBytes;
  }();
  if (sizeof(Smem) + bitmap_bytes(vocab) > kSmemLimit)
    require(false, "sample: a vocabulary of " + std::to_string(vocab) + " tokens is too large for the edit bitmap");
  bool any_logprobs = false;
  int32_t most_edits = 0, masked = 0, edited_only = 0;
  for (int64_t i = 0; i < n; ++i) {
    const SampleRow& d = rows[i];
    auto fail = [&](const std::string& what) { require(false, "sample: draw " + std::to_string(i) + ": " + what); };
    if (d.row < 0 || d.row >= logits.dim(0)) fail("row " + std::to_string(d.row) + " out of range");
    if (!(d.temperature >= 0.0f)) fail("temperature must be >= 0");
    if (d.logprobs > kMaxLogprobs) fail("at most " + std::to_string(kMaxLogprobs) + " logprobs");
    if (d.num_edits < 0 || d.first_edit < 0 || d.first_edit + int64_t(d.num_edits) > num_edits)
      fail("edit range out of range");
    if (d.mask < -1 || d.mask >= masks.num_masks || (d.mask >= 0 && masks.words == nullptr))
      fail("mask " + std::to_string(d.mask) + " out of range (" + std::to_string(masks.num_masks) + " masks)");
    for (int32_t j = 0; j < d.num_edits; ++j) {
      const int32_t t = edits[d.first_edit + j].token;
      if (t < 0 || t >= vocab || (j > 0 && edits[d.first_edit + j - 1].token >= t))
        fail("its edits must be distinct tokens of the vocabulary in increasing order");
    }
    any_logprobs = any_logprobs || d.logprobs >= 0;
    most_edits = std::max(most_edits, d.num_edits);
    masked += d.mask >= 0;
    edited_only += d.mask < 0 && d.num_edits > 0;
  }
  // a processed copy of each edited or masked draw's row, up to 256 MB (past
  // it, edited draws read through their edits); masked draws get theirs
  // whatever it takes (the kernel masks only as it writes a copy)
  const bool edited_copies =
      static_cast<size_t>(masked + edited_only) * static_cast<size_t>(vocab) * 4 <= (256u << 20);
  const int64_t copies_needed = masked + (edited_copies ? edited_only : 0);
  const bool copies = copies_needed > 0;
  if (copies && (processed_.data == nullptr || processed_.numel() < copies_needed * vocab))
    processed_ = empty({copies_needed, vocab}, ScalarType::F32);
  // shared memory for the largest draw's edits where they fit (else those draws search global memory)
  const int32_t edit_slots = static_cast<int32_t>(
      std::min<size_t>(static_cast<size_t>(most_edits), (kSmemLimit - sizeof(Smem) - bitmap_bytes(vocab)) / 8));
  require(!any_logprobs || logprobs != nullptr, "sample: a draw asks for logprobs and there is nowhere to put them");
  // up: the draws, the edits, the masks (gated ones are on the device already); down: their tokens, then the
  // logprobs (one staging buffer)
  const size_t mask_words =
      static_cast<size_t>(masks.words && !masks.gated ? masks.num_masks : 0) * static_cast<size_t>((vocab + 31) / 32);
  const size_t row_bytes = align16(static_cast<size_t>(n) * sizeof(SampleRow));
  const size_t edit_bytes = align16(static_cast<size_t>(num_edits) * sizeof(LogitEdit));
  const size_t up_bytes = row_bytes + edit_bytes + align16(mask_words * 4);
  const size_t tok_bytes = align16(static_cast<size_t>(n) * 4);
  const size_t lp_bytes = any_logprobs ? static_cast<size_t>(n) * sizeof(DrawLogprobs) : 0;
  Staging& samples = samples_[slot_];
  uint8_t* h = samples.host(up_bytes + tok_bytes + lp_bytes);  // waits for the previous use
  std::memcpy(h, rows, static_cast<size_t>(n) * sizeof(SampleRow));
  SampleRow* staged = reinterpret_cast<SampleRow*>(h);
  uint32_t next_copy = 0;
  for (int64_t i = 0; i < n; ++i)
    staged[i].scratch = staged[i].mask >= 0 || (edited_copies && staged[i].num_edits > 0) ? next_copy++ : kNoScratch;
  if (num_edits > 0) std::memcpy(h + row_bytes, edits, static_cast<size_t>(num_edits) * sizeof(LogitEdit));
  if (mask_words > 0) std::memcpy(h + row_bytes + edit_bytes, masks.words, mask_words * 4);
  samples.upload(up_bytes, stream_);
  uint8_t* d = samples.device();
  int32_t* dev_out = reinterpret_cast<int32_t*>(d + up_bytes);
  DrawLogprobs* dev_lp = any_logprobs ? reinterpret_cast<DrawLogprobs*>(d + up_bytes + tok_bytes) : nullptr;
  sample_rows(logits.as<float>(), vocab, reinterpret_cast<const SampleRow*>(d), n,
              reinterpret_cast<const LogitEdit*>(d + row_bytes), edit_slots,
              masks.gated  ? masks.words
              : mask_words > 0 ? reinterpret_cast<const uint32_t*>(d + row_bytes + edit_bytes)
                               : nullptr,
              copies ? processed_.as<float>() : nullptr, dev_out, dev_lp, stream_);
  draws_dev_[slot_] = dev_out;  // for a later step's feedback (async scheduling)
  CUDA_CHECK(cudaMemcpyAsync(h + up_bytes, dev_out, tok_bytes + lp_bytes, cudaMemcpyDeviceToHost, stream_));
  if (defer_) {
    pending_[slot_].push_back({h + up_bytes, out, static_cast<size_t>(n) * 4});
    if (any_logprobs)
      pending_[slot_].push_back({h + up_bytes + tok_bytes, logprobs, static_cast<size_t>(n) * sizeof(DrawLogprobs)});
    return;
  }
  CUDA_CHECK(cudaStreamSynchronize(stream_));
  std::memcpy(out, h + up_bytes, static_cast<size_t>(n) * 4);
  if (any_logprobs) std::memcpy(logprobs, h + up_bytes + tok_bytes, static_cast<size_t>(n) * sizeof(DrawLogprobs));
}

}  // namespace pagedrt::cuda
