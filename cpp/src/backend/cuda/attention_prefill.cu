// backend/cuda/attention_prefill.cu — paged prefill attention on tensor cores.
//
// One block = (tile of 64 rows, kv head); a row is (query token, query head of
// the group), so the G heads sharing a kv head share every K/V tile read.
// Keys come in tiles of 64 gathered through the page table; S = Q K^T and
// O += P V run as bf16 WMMA with fp32 accumulation; the online softmax is in
// fp32. Each of the 4 warps owns 16 rows of S, P and O, so between its own
// steps a warp needs only __syncwarp(); O lives in shared memory (fp32) so
// that its rows can be rescaled.
//
// Causal: row r sees keys 0 .. pos(r), which covers chunked prefill (the
// earlier chunks are already in the cache) and mixed batches.
//
// shared memory (D = 128):  Q, K, V (64 x 136 bf16 each)   S (64 x 68 fp32)
//                           P (64 x 72 bf16)   O (64 x 132 fp32)   m, l, pos (64 each)
#include <mma.h>

#include "backend/cuda/cuda_check.hpp"
#include "backend/cuda/kernels.cuh"

namespace pagedrt::cuda {
namespace {

using namespace nvcuda;

constexpr int BQ = kPrefillRows, BK = 64;
constexpr float kLog2e = 1.4426950408889634f;

template <int D>
struct Smem {
  static constexpr int LDQ = D + 8, LDS = BK + 4, LDP = BK + 8, LDO = D + 4;
  static constexpr size_t q = 0;
  static constexpr size_t k = q + size_t(BQ) * LDQ * 2;
  static constexpr size_t v = k + size_t(BK) * LDQ * 2;
  static constexpr size_t s = v + size_t(BK) * LDQ * 2;
  static constexpr size_t p = s + size_t(BQ) * LDS * 4;
  static constexpr size_t o = p + size_t(BQ) * LDP * 2;
  static constexpr size_t m = o + size_t(BQ) * LDO * 4;
  static constexpr size_t l = m + BQ * 4;
  static constexpr size_t pos = l + BQ * 4;
  static constexpr size_t bytes = pos + BQ * 4;
  static_assert(k % 128 == 0 && s % 128 == 0 && p % 128 == 0 && o % 128 == 0 && m % 128 == 0,
                "WMMA tiles need aligned shared memory");
};

template <int D>
__global__ void __launch_bounds__(128) prefill_kernel(AttentionParams p, PrefillPlan f) {
  using L = Smem<D>;
  extern __shared__ __align__(128) unsigned char smem[];
  bf16* Qs = reinterpret_cast<bf16*>(smem + L::q);
  bf16* Ks = reinterpret_cast<bf16*>(smem + L::k);
  bf16* Vs = reinterpret_cast<bf16*>(smem + L::v);
  float* Ss = reinterpret_cast<float*>(smem + L::s);
  bf16* Ps = reinterpret_cast<bf16*>(smem + L::p);
  float* Os = reinterpret_cast<float*>(smem + L::o);
  float* row_m = reinterpret_cast<float*>(smem + L::m);
  float* row_l = reinterpret_cast<float*>(smem + L::l);
  int* row_pos = reinterpret_cast<int*>(smem + L::pos);

  const int2 tile = f.tiles[blockIdx.x];
  const int seq = tile.x, row0 = tile.y, kvh = blockIdx.y;
  const int H = p.num_heads, Hkv = p.num_kv_heads, G = H / Hkv, bs = p.block_size;
  const int q0 = p.query_start[seq];
  const int rows_total = (p.query_start[seq + 1] - q0) * G;
  const int64_t row_stride = int64_t(H + 2 * Hkv) * D;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  constexpr int V8 = D / 8;  // 16-byte vectors per row

  for (int idx = tid; idx < BQ * V8; idx += blockDim.x) {
    const int r = idx / V8, c = idx % V8, R = row0 + r;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (R < rows_total) {
      const int64_t tok = q0 + R / G;
      v = *reinterpret_cast<const uint4*>(p.qkv + tok * row_stride + int64_t(kvh * G + R % G) * D + c * 8);
    }
    *reinterpret_cast<uint4*>(Qs + r * L::LDQ + c * 8) = v;
  }
  for (int r = tid; r < BQ; r += blockDim.x) {
    const int R = row0 + r;
    row_pos[r] = R < rows_total ? p.positions[q0 + R / G] : -1;
    row_m[r] = -INFINITY;
    row_l[r] = 0.0f;
  }
  for (int idx = tid; idx < BQ * L::LDO; idx += blockDim.x) Os[idx] = 0.0f;
  __syncthreads();

  const int last_row = min(row0 + BQ, rows_total) - 1;
  const int kmax = p.positions[q0 + last_row / G] + 1;  // keys 0 .. kmax-1 are seen by some row
  const int32_t* pages = p.page_indices + p.page_indptr[seq];
  const float qscale = p.scale * kLog2e;

  for (int kb = 0; kb < kmax; kb += BK) {
    for (int idx = tid; idx < BK * V8; idx += blockDim.x) {
      const int j = idx / V8, c = idx % V8, pos = kb + j;
      uint4 kv = make_uint4(0, 0, 0, 0), vv = make_uint4(0, 0, 0, 0);
      if (pos < kmax) {
        const int64_t slot = kv_slot(pages, pos, bs, p.block_shift);
        const int64_t off = (slot * Hkv + kvh) * D + c * 8;
        kv = __ldg(reinterpret_cast<const uint4*>(p.k_cache + off));
        vv = __ldg(reinterpret_cast<const uint4*>(p.v_cache + off));
      }
      *reinterpret_cast<uint4*>(Ks + j * L::LDQ + c * 8) = kv;
      *reinterpret_cast<uint4*>(Vs + j * L::LDQ + c * 8) = vv;
    }
    __syncthreads();

    {  // S (this warp's 16 rows x 64 keys) = Q K^T
      wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> a;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> b;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> c[BK / 16];
#pragma unroll
      for (int n = 0; n < BK / 16; ++n) wmma::fill_fragment(c[n], 0.0f);
#pragma unroll
      for (int kk = 0; kk < D; kk += 16) {
        wmma::load_matrix_sync(a, Qs + warp * 16 * L::LDQ + kk, L::LDQ);
#pragma unroll
        for (int n = 0; n < BK / 16; ++n) {
          wmma::load_matrix_sync(b, Ks + n * 16 * L::LDQ + kk, L::LDQ);
          wmma::mma_sync(c[n], a, b, c[n]);
        }
      }
#pragma unroll
      for (int n = 0; n < BK / 16; ++n)
        wmma::store_matrix_sync(Ss + warp * 16 * L::LDS + n * 16, c[n], L::LDS, wmma::mem_row_major);
    }
    __syncwarp();

    for (int rr = 0; rr < 16; ++rr) {  // online softmax, one row at a time, lanes over keys
      const int r = warp * 16 + rr, pos_r = row_pos[r];
      float s0 = Ss[r * L::LDS + lane] * qscale, s1 = Ss[r * L::LDS + lane + 32] * qscale;
      if (kb + lane > pos_r) s0 = -INFINITY;
      if (kb + lane + 32 > pos_r) s1 = -INFINITY;
      float mx = fmaxf(s0, s1);
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
      const float m_old = row_m[r], m_new = fmaxf(m_old, mx);
      float corr = 1.0f, p0 = 0.0f, p1 = 0.0f;
      if (m_new != -INFINITY) {
        corr = exp2f(m_old - m_new);
        p0 = exp2f(s0 - m_new);
        p1 = exp2f(s1 - m_new);
      }
      float sum = p0 + p1;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
      Ps[r * L::LDP + lane] = __float2bfloat16_rn(p0);
      Ps[r * L::LDP + lane + 32] = __float2bfloat16_rn(p1);
      for (int dd = lane; dd < D; dd += 32) Os[r * L::LDO + dd] *= corr;
      __syncwarp();
      if (lane == 0) {
        row_m[r] = m_new;
        row_l[r] = row_l[r] * corr + sum;
      }
    }
    __syncwarp();

    {  // O (16 rows x D) += P (16 x 64) V (64 x D)
      wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> a[BK / 16];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> b;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> o;
#pragma unroll
      for (int kk = 0; kk < BK / 16; ++kk) wmma::load_matrix_sync(a[kk], Ps + warp * 16 * L::LDP + kk * 16, L::LDP);
#pragma unroll
      for (int n = 0; n < D / 16; ++n) {
        float* dst = Os + warp * 16 * L::LDO + n * 16;
        wmma::load_matrix_sync(o, dst, L::LDO, wmma::mem_row_major);
#pragma unroll
        for (int kk = 0; kk < BK / 16; ++kk) {
          wmma::load_matrix_sync(b, Vs + kk * 16 * L::LDQ + n * 16, L::LDQ);
          wmma::mma_sync(o, a[kk], b, o);
        }
        wmma::store_matrix_sync(dst, o, L::LDO, wmma::mem_row_major);
      }
    }
    __syncthreads();  // Ks/Vs are overwritten next
  }

  for (int idx = tid; idx < BQ * D; idx += blockDim.x) {
    const int r = idx / D, dd = idx % D, R = row0 + r;
    if (R >= rows_total) continue;
    const int64_t tok = q0 + R / G;
    const float l = row_l[r];
    p.out[tok * H * D + int64_t(kvh * G + R % G) * D + dd] = __float2bfloat16_rn(l > 0.0f ? Os[r * L::LDO + dd] / l : 0.0f);
  }
}

template <int D>
void launch_p(const AttentionParams& p, const PrefillPlan& f, cudaStream_t s) {
  static bool configured = false;  // per process; the attribute is per function
  if (!configured) {
    CUDA_CHECK(cudaFuncSetAttribute(prefill_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(Smem<D>::bytes)));
    configured = true;
  }
  const dim3 grid(static_cast<unsigned>(f.num_tiles), static_cast<unsigned>(p.num_kv_heads));
  prefill_kernel<D><<<grid, 128, Smem<D>::bytes, s>>>(p, f);
  CUDA_CHECK_LAUNCH();
}

}  // namespace

void prefill_attention(const AttentionParams& p, const PrefillPlan& f, cudaStream_t s) {
  if (f.num_tiles == 0) return;
  if (p.head_dim == 128) launch_p<128>(p, f, s);
  else launch_p<64>(p, f, s);
}

}  // namespace pagedrt::cuda
