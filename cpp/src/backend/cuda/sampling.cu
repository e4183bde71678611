// backend/cuda/sampling.cu — temperature, top-k, top-p and min-p sampling on
// the GPU (Backend::sample; the semantics are SampleRow's, backend.hpp).
//
// One block of 1024 threads per draw, over its logits row (vocab fp32):
//   1. the row's maximum and its first index (the fallback when every weight
//      is 0);
//   2. top-k: the k-th largest logit by radix select on order-preserving
//      32-bit keys (4 passes of 8 bits, a 256-bin count histogram each), then
//      which of the tied keys at that value are kept (the lower ids: a count
//      in id order);
//   3. top-p: the same select, with histograms of fixed-point weight instead
//      of counts, over the candidates step 2 kept, to the smallest most likely
//      prefix holding ceil(top_p * their weight);
//   4. the draw: u from Philox (key, counter), target floor(u * total), and
//      the running weight in id order to the token.
// Every sum is of integers, so the result does not depend on the order the
// threads add in: a draw is reproducible bit for bit.
//
// The candidate set after steps 2-3 is {t : key_t > cut_key} plus the tied
// keys == cut_key with id <= cut_id; min_p then drops weights below
// min_p * 2^31 (the most likely's weight is exactly 2^31).
//
//   grid (draws)   block 1024   shared: per-warp histograms (64 KB)
//   scans in id order: warp w owns ids [w seg, (w + 1) seg), 32 at a time
#include <cfloat>
#include <cstring>

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

// Larger logit -> larger key; NaN sorts below -inf (and weighs 0).
__device__ __forceinline__ uint32_t order_key(float x) {
  if (isnan(x)) return 0u;
  const uint32_t b = __float_as_uint(x);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

struct Row {
  const float* x;
  int64_t vocab;
  float max, scale;  // weight(t) = 2^31 * 2^((x_t - max) * scale)
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
// their sum.
struct Smem {
  uint64_t warp_hist[kWarps][kBins];  // 64 KB
  uint64_t hist[kBins];
  uint64_t warp_sum[kWarps], warp_before[kWarps];
  uint64_t value;
  int64_t id;
  uint32_t digit;
};

template <typename V>
__device__ V warp_sum(V v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
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
    for (int i = threadIdx.x; i < kWarps * kBins; i += kThreads) (&sm.warp_hist[0][0])[i] = 0;
    __syncthreads();
    for (int64_t t = threadIdx.x; t < r.vocab; t += kThreads) {
      const float v = r.x[t];
      const uint32_t k = order_key(v);
      if ((k & mask) != prefix || !cut.keeps(k, t)) continue;
      const uint64_t add = by_weight ? r.weight(v) : 1u;
      if (add) atomicAdd(reinterpret_cast<unsigned long long*>(&sm.warp_hist[warp][(k >> shift) & 255u]), add);
    }
    __syncthreads();
    for (int b = threadIdx.x; b < kBins; b += kThreads) {
      uint64_t h = 0;
      for (int w = 0; w < kWarps; ++w) h += sm.warp_hist[w][b];
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
    const uint32_t k = order_key(r.x[t]);
    return k == key && cut.keeps(k, t);
  };
  sum_in_id_order(r.vocab, tie, sm);
  return find_in_id_order(r.vocab, nth - 1, tie, sm, r.vocab - 1);
}

__global__ void __launch_bounds__(kThreads, 1) sample_kernel(const float* logits, int64_t vocab, const SampleRow* rows,
                                                          int32_t* out) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Smem& sm = *reinterpret_cast<Smem*>(smem_raw);
  __shared__ float best_v[kWarps];
  __shared__ int64_t best_i[kWarps];
  pdl_trigger();
  pdl_wait();
  const SampleRow sr = rows[blockIdx.x];
  Row r{logits + int64_t(sr.row) * vocab, vocab, -INFINITY, kLog2e / sr.temperature};

  // 1. maximum, first index of it (NaN never wins)
  float bv = -INFINITY;
  int64_t bi = vocab;
  for (int64_t t = threadIdx.x; t < vocab; t += kThreads) {
    const float v = r.x[t];
    if (v > bv || (v == bv && t < bi)) bv = v, bi = t;
  }
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
    const int64_t oi = __shfl_xor_sync(0xffffffffu, bi, o);
    if (ov > bv || (ov == bv && oi < bi)) bv = ov, bi = oi;
  }
  if (threadIdx.x % 32 == 0) best_v[threadIdx.x / 32] = bv, best_i[threadIdx.x / 32] = bi;
  __syncthreads();
  bv = -INFINITY;
  bi = vocab;
  for (int w = 0; w < kWarps; ++w)
    if (best_v[w] > bv || (best_v[w] == bv && best_i[w] < bi)) bv = best_v[w], bi = best_i[w];
  r.max = bv;
  const int32_t fallback = bi < vocab ? static_cast<int32_t>(bi) : 0;
  if (!(bv > -INFINITY)) {  // every logit -inf or NaN
    if (threadIdx.x == 0) out[blockIdx.x] = fallback;
    return;
  }

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
      const float v = r.x[t];
      if (cut.keeps(order_key(v), t)) mass += r.weight(v);
    }
    mass = warp_sum(mass);
    if (threadIdx.x % 32 == 0) sm.warp_sum[threadIdx.x / 32] = mass;
    __syncthreads();
    mass = 0;
    for (int w = 0; w < kWarps; ++w) mass += sm.warp_sum[w];
    __syncthreads();
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
    const float v = r.x[t];
    const uint32_t w = r.weight(v);
    return w >= min_w && cut.keeps(order_key(v), t) ? w : 0u;
  };
  const uint64_t total = sum_in_id_order(vocab, kept_weight, sm);
  const uint64_t target = total > 0 ? __umul64hi(philox_u64(sr.key, sr.counter), total) : 0;  // in [0, total)
  const int64_t token = total > 0 ? find_in_id_order(vocab, target, kept_weight, sm, fallback) : fallback;
  if (threadIdx.x == 0) out[blockIdx.x] = static_cast<int32_t>(token);
}

}  // namespace

void sample_rows(const float* logits, int64_t vocab, const SampleRow* rows, int64_t n, int32_t* out, cudaStream_t s) {
  static const bool configured = [] {  // the attribute is per function: once per process
    CUDA_CHECK(cudaFuncSetAttribute(sample_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(sizeof(Smem))));
    return true;
  }();
  (void)configured;
  if (n > 0) launch(sample_kernel, static_cast<unsigned>(n), kThreads, sizeof(Smem), s, logits, vocab, rows, out);
}

void CudaBackend::sample(const Tensor& logits, const SampleRow* rows, int64_t n, int32_t* out) {
  require(logits.dtype == ScalarType::F32, "sample: fp32 logits");
  if (n == 0) return;
  const int64_t vocab = logits.dim(1);
  for (int64_t i = 0; i < n; ++i) {
    require(rows[i].row >= 0 && rows[i].row < logits.dim(0), "sample: row out of range");
    require(rows[i].temperature > 0.0f, "sample: temperature must be > 0 (greedy rows go to argmax)");
  }
  // up: the draws; down: their tokens (after the draws, in one staging buffer)
  const size_t row_bytes = align16(static_cast<size_t>(n) * sizeof(SampleRow)), tok_bytes = static_cast<size_t>(n) * 4;
  uint8_t* h = samples_.host(row_bytes + tok_bytes);  // waits for the previous use
  std::memcpy(h, rows, static_cast<size_t>(n) * sizeof(SampleRow));
  samples_.upload(row_bytes, stream_);
  int32_t* dev_out = reinterpret_cast<int32_t*>(samples_.device() + row_bytes);
  sample_rows(logits.as<float>(), vocab, reinterpret_cast<const SampleRow*>(samples_.device()), n, dev_out, stream_);
  CUDA_CHECK(cudaMemcpyAsync(h + row_bytes, dev_out, tok_bytes, cudaMemcpyDeviceToHost, stream_));
  CUDA_CHECK(cudaStreamSynchronize(stream_));
  std::memcpy(out, h + row_bytes, tok_bytes);
}

}  // namespace pagedrt::cuda
