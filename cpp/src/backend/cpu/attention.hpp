// backend/cpu/attention.hpp — RoPE + KV-cache write, and paged attention.
//
// Element type T of the activations and the cache: float, or uint16_t holding
// bf16 bits (the CPU backend's bfloat16 mode). Arithmetic is fp32 either way;
// bf16 values are rounded (to nearest even) only where they are stored.
#pragma once

#include <cstdint>

#include "backend/backend.hpp"
#include "backend/paged_kv.hpp"

namespace pagedrt::cpu {

// qkv: (num_tokens, (H + 2 Hkv) D); cos/sin: (max_positions, D / 2). Rotates
// q and k in place and writes each token's k and v at its slot
// (b.slot_mapping) of `kv`.
template <typename T>
void rope_and_cache(const BatchView& b, T* qkv, const float* cos, const float* sin, int64_t num_heads,
                    const PagedKv<T>& kv, int threads);

// out: (num_tokens, H D). Token t of sequence i attends to positions
// 0 .. positions[t] of sequence i, read through kv's page table. The work is
// split over `threads` as (tile of a sequence's query tokens, kv head) items.
// invariant: every token's output has the same bits whatever tile it is in
// (decode-sized or prefill-sized, any neighbours; see qk_rows); false lets
// prefill-sized tiles sum each score in a shorter chain (the pre-issue-22
// order, kept for the deterministic=False comparison).
// logit_rows_only: only the tiles that hold one of the step's logit rows
// (b.logits_indices) run, each as it would among all (the same bits); the
// other rows of out are left as they were.
template <typename T>
void paged_attention(const BatchView& b, const T* qkv, int64_t num_heads, const PagedKv<const T>& kv, float scale,
                     T* out, int threads, bool invariant = true, bool logit_rows_only = false);

// The same on an fp8 cache (paged_kv.hpp's Fp8Kv): each token's k and v rows
// quantized with their own exponents; attention reads the rows of a work
// item dequantized (exactly) to T, so its results are those of the T
// kernel on the dequantized cache, bit for bit.
template <typename T>
void rope_and_cache(const BatchView& b, T* qkv, const float* cos, const float* sin, int64_t num_heads,
                    const Fp8Kv& kv, int threads);
template <typename T>
void paged_attention(const BatchView& b, const T* qkv, int64_t num_heads, const Fp8Kv& kv, float scale, T* out,
                     int threads, bool invariant = true, bool logit_rows_only = false);

// Prefill tiles taken by the AMX path since start (every thread; the tests
// check that the path they hold to its reference is the one that ran).
int64_t attention_amx_tiles();
// Decode tokens whose attention was split across the team (a thread a run of keys,
// then of output columns; the same bits as one thread's), every thread since start.
int64_t attention_split_tokens();
// Whether this build has that path for bf16 (true) or fp32 activations: AVX-512
// (and AVX-512 BF16 for bf16) where attention.cpp was compiled.
bool attention_split_built(bool bf16);
// When a decode step takes that path: -1 where its (token, kv head) items fill
// at most half the team (the default), 0 never, 1 also wherever fewer than
// twice the team's items do not divide among it. PAGEDRT_CPU_SPLIT_DECODE=0/1
// sets it at start; set_attention_split_rule for tests (this module's kernels).
int attention_split_rule();
void set_attention_split_rule(int rule);

// A prefill tile's Q K^T and P V on AMX tiles (attention_amx.cpp; built
// where the compiler has AMX, called where gemm_amx_for_large_steps(), for
// bf16, D % 32 == 0, D <= 256), between tiles_begin() and tiles_end() on the
// calling thread.
namespace amx {
void tiles_begin();
void tiles_end();
// Q's R rows (D bf16 at q + qoff[r]) as (R rounded up to 16, D), zeros past
// R, in the calling thread's buffer (valid until its next call)
const uint16_t* gather_q(const uint16_t* q, const int64_t* qoff, int64_t R, int64_t D);
// s[r][0 .. 16) (row stride lds) = scale * q_r . key j, r < R, for the 16 keys
// of kt ((D / 2, 16) words: pairs of D of each key, attention's transpose_keys)
void qk_chunk(const uint16_t* qb, int64_t R, int64_t D, const float* kt, float scale, float* s, int64_t lds);
// out row r (D bf16 at out + ooff[r]) = inv[r] * sum over keys p < nk of
// bf16(P[r][p]) * V_p (D bf16 at v + off[p]); P (R, ldp) fp32, zero past each row's end
void pv_bf16(const float* P, int64_t R, int64_t ldp, int64_t nk, const uint16_t* v, const int64_t* off, int64_t D,
             const float* inv, uint16_t* out, const int64_t* ooff);
}

}  // namespace pagedrt::cpu
