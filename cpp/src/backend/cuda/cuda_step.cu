// backend/cuda/cuda_step.cu — the CUDA backend's step: the plan uploaded once
// per step (begin_step, plan_attention) and steps recorded as CUDA graphs.
#include "backend/cuda/cuda_backend.hpp"

#include <algorithm>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "backend/cuda/cuda_check.hpp"
#include "backend/cuda/launch.cuh"

namespace pagedrt::cuda {

// ---- the step -----------------------------------------------------------------------

void CudaBackend::begin_step(const BatchView& b) {
  if (graph_log_) begin_start_ = std::chrono::steady_clock::now();
  CUDA_CHECK(cudaSetDevice(device_));
  host_ = b;
  ++step_;
  const size_t n = b.num_tokens, s = b.num_seqs, np = b.num_seqs ? b.page_indptr[b.num_seqs] : 0;
  // page_indices, then the fed-back tokens (async scheduling), last: with the
  // same token, sequence and logit counts every other array keeps its device
  // address from step to step (recorded steps).
  const size_t nf = static_cast<size_t>(b.num_feedback);
  const size_t sizes[] = {n * 4, n * 4, n * 8, (s + 1) * 4, (s + 1) * 4, size_t(b.num_logits) * 4, n * 4, np * 4, nf * 8};
  size_t off[9], total = 0;
  for (int i = 0; i < 9; ++i) {
    off[i] = total;
    total += align16(sizes[i]);
  }
  uint8_t* h = batch_.host(total);
  std::memcpy(h + off[0], b.token_ids, sizes[0]);
  std::memcpy(h + off[1], b.positions, sizes[1]);
  std::memcpy(h + off[2], b.slot_mapping, sizes[2]);
  std::memcpy(h + off[3], b.query_start, sizes[3]);
  std::memcpy(h + off[4], b.page_indptr, sizes[4]);
  if (b.num_logits) std::memcpy(h + off[5], b.logits_indices, sizes[5]);
  int32_t* seq = reinterpret_cast<int32_t*>(h + off[6]);
  for (int32_t i = 0; i < b.num_seqs; ++i)
    for (int32_t t = b.query_start[i]; t < b.query_start[i + 1]; ++t) seq[t] = i;
  if (np) std::memcpy(h + off[7], b.page_indices, sizes[7]);
  if (nf) std::memcpy(h + off[8], b.feedback, sizes[8]);
  batch_.upload(total, stream_);
  uint8_t* d = batch_.device();
  static_assert(sizeof(TokenFeedback) == sizeof(int2), "TokenFeedback is read as int2");
  if (nf) {  // before anything reads the ids (a recorded step reads them at the same address)
    const int t = b.feedback_ticket;
    require(t == 0 || t == 1, "begin_step: feedback ticket " + std::to_string(t) + " is not end_results()'s");
    feed_tokens(reinterpret_cast<int32_t*>(d + off[0]), reinterpret_cast<const int2*>(d + off[8]), static_cast<int>(nf),
                reinterpret_cast<const int32_t*>(picks_[t].device()), draws_dev_[t], stream_);
  }
  dev_.token_ids = reinterpret_cast<const int32_t*>(d + off[0]);
  dev_.positions = reinterpret_cast<const int32_t*>(d + off[1]);
  dev_.slot_mapping = reinterpret_cast<const int64_t*>(d + off[2]);
  dev_.query_start = reinterpret_cast<const int32_t*>(d + off[3]);
  dev_.page_indptr = reinterpret_cast<const int32_t*>(d + off[4]);
  dev_.logits_indices = reinterpret_cast<const int32_t*>(d + off[5]);
  dev_.token_seq = reinterpret_cast<const int32_t*>(d + off[6]);
  dev_.page_indices = reinterpret_cast<const int32_t*>(d + off[7]);
  // The attention plan needs only the batch and the model's head counts
  // (known from the previous step): made here, it stays out of a recording.
  if (plan_info_.num_heads > 0) plan_attention(plan_info_.num_heads, plan_info_.num_kv_heads, plan_info_.head_dim);
  // fp8 weights: x's codes for this step's tokens, grown here (outside a recording)
  if (fp8_max_k_ > 0) ensure_fp8_act(b.num_tokens, fp8_max_k_);
  fp8_pending_ = {};
}

// Decode items: the token of every sequence with one query token (in the
// fp32 mode every token: the prefill kernel is bf16 only). Prefill tiles: 64
// or 128 (token, head) rows (prefill_rows; PAGEDRT_PREFILL_ROWS for A/B runs)
// of every other sequence. Splits: below.
//
// The batch-invariant mode (deterministic_) plans so that a token's
// attention is the same arithmetic in every step: bf16, every sequence's
// tokens as prefill tiles, a decode token too (its G rows in a tile of its
// own). A tile's row sums its scores over 16 dims a k-step, walks the keys
// in tiles of the kernel's fixed BK (64; 128 in the wgmma kernels) from key
// 0 with one online softmax, and its result
// depends on its own q, keys and position only: the other rows of the tile
// are other rows of the same mma, keys past a row's position add exactly
// zero (exp2 of -inf) and rescale by exactly one, and the kernel (mma,
// wgmma, or the warp-specialized one) is fixed by the model and pool, not the
// batch. fp32: every token a decode item, one split (the CUDA-core kernel
// walks the whole context from key 0 in an order set by the head dim).
void CudaBackend::plan_attention(int64_t H, int64_t Hkv, int64_t D) {
  if (plan_info_.step == step_ && plan_info_.num_heads == H && plan_info_.num_kv_heads == Hkv &&
      plan_info_.head_dim == D)
    return;
  const BatchView& b = host_;
  const int64_t G = H / Hkv;
  const int tile_rows = prefill_rows_ ? prefill_rows_ : prefill_rows(static_cast<int>(D));
  std::vector<DecodeItem> dec;
  std::vector<int2> tiles;
  int64_t max_ctx = 1;
  bool slots_fit = true;
  for (int32_t i = 0; i < b.num_seqs; ++i) {
    const int32_t q0 = b.query_start[i], qn = b.query_start[i + 1] - q0;
    if (act_ == ScalarType::F32 || (qn == 1 && !deterministic_)) {
      for (int32_t t = q0; t < q0 + qn; ++t) {
        // A slot past int32 (2^31 cached tokens) does not fit the item: such
        // steps run rope_and_cache (rope_cache_attention).
        const int64_t slot = b.slot_mapping[t];
        slots_fit = slots_fit && slot <= INT32_MAX;
        dec.push_back({t, b.positions[t] + 1, b.page_indptr[i], slot <= INT32_MAX ? static_cast<int32_t>(slot) : -1});
        max_ctx = std::max<int64_t>(max_ctx, b.positions[t] + 1);
      }
    } else {
      for (int64_t r = 0; r < qn * G; r += tile_rows) tiles.push_back(make_int2(i, static_cast<int>(r)));
    }
  }
  // Splits: the count that takes the fewest waves of blocks times the keys
  // each block walks, plus a fixed cost per block (its start and its merge,
  // about two tiles). A batch that fills the GPU runs unsplit; batch 1 splits
  // until one wave of blocks is full or every split is one tile; 16 x 8,192
  // runs 2 splits (256 blocks of 264 slots on an H200) rather than 3 (384
  // blocks, two waves). Chunks are whole tiles.
  const int64_t items = static_cast<int64_t>(dec.size());
  const int64_t base = std::max<int64_t>(1, items * Hkv);
  constexpr int64_t kBlockCostKeys = 128, kMaxSplits = kMaxDecodeSplits;
  auto chunk_of = [&](int64_t s, int64_t tile) { return ((max_ctx + s - 1) / s + tile - 1) / tile * tile; };
  // The chunk of the fewest-cost split count for the kernel of shape c.
  auto plan_chunk = [&](DecodeConfig c) {
    const int64_t tile = act_ == ScalarType::BF16 ? 16 * c.warps : D == 128 ? 32 : 64;
    const int64_t slots = decode_slots(D, c);
    if (decode_splits_ > 0) return chunk_of(decode_splits_, tile);
    int64_t chunk = chunk_of(1, tile), best = INT64_MAX;
    for (int64_t s = 1; s <= kMaxSplits && (s == 1 || chunk_of(s - 1, tile) > tile); ++s) {
      const int64_t ch = chunk_of(s, tile), used = (max_ctx + ch - 1) / ch;  // splits that get keys
      const int64_t waves = (base * used + slots - 1) / slots, cost = waves * (ch + kBlockCostKeys);
      if (cost < best) best = cost, chunk = ch;
    }
    return chunk;
  };
  const bool fp8 = kv_dtype() == ScalarType::F8E4M3;
  DecodeConfig config = fp8 && decode_kernel_ == DecodeKernel::Auto ? kFp8DecodeConfig : decode_config_;
  // bf16 at head dim 64 where the unsplit batch is under 5 blocks an SM: 4
  // warps (64-key tiles, 8 KB of K a stage where 2 warps' 32-key tiles move
  // 4 KB). Past that, 2 x 3's more blocks an SM win. H200, bench_cuda.py
  // d64_sweep (2026-12-06), us as each plans, 4 x 3 against 2 x 3: 32/8 heads
  // 64 x 2,048 67.0 (96% of copy) against 73.6, 16 x 8,192 70.7 against 73.8,
  // 4 x 8,192 23.7 against 25.7; 9/3 heads 64 x 2,048 35.9 against 40.7,
  // 8 x 4,096 13.7 against 16.8; but 256 x 1,024 (2,048 blocks) 136.0 against
  // 131.9, 512 x 512 140.0 against 136.1, 9/3 256 x 1,024 (768) 64.4 against
  // 60.2.
  if (!fp8 && act_ == ScalarType::BF16 && D == 64 && decode_kernel_ == DecodeKernel::Auto &&
      base < 5 * static_cast<int64_t>(num_sms_))
    config = DecodeConfig{4, 3};
  int64_t chunk = plan_chunk(config);
  // The fp8 kernel with 6 stages a warp where its own plan gives each block
  // at least 2,048 keys: the deeper pipeline wins on long chunks, the
  // shallower one's more blocks an SM on short ones. H200 (bench_cuda.py
  // attention_fp8, 2026-12-04), 2 x 6 against 2 x 4 as each plans: 64 x 2,048
  // 76.3 against 88.0 us (2,048 keys a block against 3 splits of 704),
  // 16 x 8,192 81.0 against 86.5; 256 x 1,024 (1,024 keys) 153.7 against
  // 152.1 and 512 x 512 166.3 against 155.1 keep 2 x 4.
  if (fp8 && decode_kernel_ == DecodeKernel::Auto && decode_splits_ == 0) {
    const int64_t deep = plan_chunk(kFp8DeepDecodeConfig);
    if (deep >= 2048) config = kFp8DeepDecodeConfig, chunk = deep;
  }
  // Where the default shape would cut contexts into more than 32 splits
  // (batch 1 at 32K keys: 64), merging them costs more than the 4-warp
  // kernel's fewer blocks lose: 1 x 32,768 on an H200 took 43.1 us with 4 x 3
  // in 32 splits against 46.7 with 2 x 3 in 64 (same call; 4 x 16,384, 2 x 3
  // in 16 splits: 72.2 us, 4 x 3 in 8: 75.8). The fp8 cache's kernel the
  // same with its stages: 1 x 32,768 took 30.8 us with 4 x 4 against 42.2
  // with 2 x 4 (H200, 2026-12-04, bench_cuda.py attention_fp8).
  if (act_ == ScalarType::BF16 && decode_kernel_ == DecodeKernel::Auto && decode_splits_ == 0 &&
      (max_ctx + chunk - 1) / chunk > 32) {
    config = DecodeConfig{4, fp8 ? kFp8DecodeConfig.stages : 3};
    chunk = plan_chunk(config);
  }
  int64_t splits = std::max<int64_t>(1, (max_ctx + chunk - 1) / chunk);
  if (deterministic_) {
    require(act_ == ScalarType::F32 || dec.empty(), "plan_attention: a decode item in the batch-invariant bf16 plan");
    require(kv_dtype() != ScalarType::F8E4M3, "plan_attention: the batch-invariant mode has no fp8 KV cache");
    // One split; a chunk longer than any context (each block walks its token's
    // from key 0) and the same in every step, so that recorded fp32 decode
    // steps keep their key as contexts grow.
    splits = 1;
    chunk = int64_t{1} << 30;
  }
  // A recorded step replays with its split count: round it up to a power of
  // two (splits past the context are empty and merge as nothing), so that a
  // growing context needs a new recording only every doubling.
  // An unsplit one takes a chunk past any context, so that its key does not
  // change with every tile the longest context grows (the kernels walk keys
  // [split * chunk, min(context, (split + 1) * chunk))).
  if (recordable() && splits > 1) {
    int64_t up = 1;
    while (up < splits) up *= 2;
    splits = up;
  } else if (recordable()) {
    chunk = int64_t{1} << 30;
  }

  // The tiles that hold a logit row (the last layer's: logit_prefill), where
  // fewer than all and the step is not recorded.
  const bool narrowed = !tiles.empty() && b.num_logits < b.num_tokens && !recordable();
  std::vector<int2> logit_tiles;
  if (narrowed) {
    std::vector<char> logit_row(b.num_tokens, 0);  // (num_tokens) whether token t is a logit row
    for (int32_t j = 0; j < b.num_logits; ++j) logit_row[b.logits_indices[j]] = 1;
    for (const int2 tile : tiles) {  // its rows tile.y .. + tile_rows - 1 are tokens (row / G) of sequence tile.x
      const int32_t q0 = b.query_start[tile.x], qn = b.query_start[tile.x + 1] - q0;
      const int32_t t0 = q0 + static_cast<int32_t>(tile.y / G);
      const int32_t t1 = q0 + static_cast<int32_t>((std::min<int64_t>(tile.y + tile_rows, qn * G) - 1) / G);
      if (std::any_of(&logit_row[t0], &logit_row[t1] + 1, [](char c) { return c; })) logit_tiles.push_back(tile);
    }
  }

  // fp8 KV: the blocks of the sequences with prefill tiles, in page-table
  // order, and the page table with their entries renumbered (fp8 prefill).
  std::vector<int32_t> fp8_src, fp8_pages;
  if (kv_dtype() == ScalarType::F8E4M3 && !tiles.empty()) {
    const int32_t np = b.page_indptr[b.num_seqs];
    fp8_pages.assign(b.page_indices, b.page_indices + np);
    for (int32_t i = 0; i < b.num_seqs; ++i)
      if (b.query_start[i + 1] - b.query_start[i] > 1)
        for (int32_t j = b.page_indptr[i]; j < b.page_indptr[i + 1]; ++j) {
          fp8_pages[j] = static_cast<int32_t>(fp8_src.size());
          fp8_src.push_back(b.page_indices[j]);
        }
  }
  // Uploaded as: decode items | tiles | fp8 blocks | fp8 page table | logit tiles.
  const size_t dec_bytes = align16(dec.size() * sizeof(DecodeItem)), tile_bytes = align16(tiles.size() * sizeof(int2));
  const size_t src_bytes = align16(fp8_src.size() * 4), pages_bytes = align16(fp8_pages.size() * 4);
  const size_t logit_bytes = logit_tiles.size() * sizeof(int2);
  uint8_t* h = plan_.host(dec_bytes + tile_bytes + src_bytes + pages_bytes + logit_bytes);
  if (!dec.empty()) std::memcpy(h, dec.data(), dec.size() * sizeof(DecodeItem));
  if (!tiles.empty()) std::memcpy(h + dec_bytes, tiles.data(), tiles.size() * sizeof(int2));
  if (!fp8_src.empty()) {
    std::memcpy(h + dec_bytes + tile_bytes, fp8_src.data(), fp8_src.size() * 4);
    std::memcpy(h + dec_bytes + tile_bytes + src_bytes, fp8_pages.data(), fp8_pages.size() * 4);
  }
  if (!logit_tiles.empty())
    std::memcpy(h + dec_bytes + tile_bytes + src_bytes + pages_bytes, logit_tiles.data(), logit_bytes);
  plan_.upload(dec_bytes + tile_bytes + src_bytes + pages_bytes + logit_bytes, stream_);

  // The merge tickets ((items, Hkv) ints: zero, and left zero by every
  // launch), then the partials (o, then lse), in one buffer that grows to
  // twice what a step needs; the tickets' region keeps its place until then.
  if (splits > 1) {
    const size_t tickets = align16(static_cast<size_t>(items * Hkv) * sizeof(int));
    const size_t partial_bytes = static_cast<size_t>(items * splits * H) * (D + 1) * sizeof(float);
    if (tickets > tickets_bytes_ || tickets_bytes_ + partial_bytes > partials_bytes_) {
      if (partials_) CUDA_CHECK(cudaFree(partials_));  // waits for the GPU
      partials_ = nullptr;
      partials_bytes_ = tickets_bytes_ = 0;
      // A new buffer at the old address would match the keys of split steps
      // (their partials' offsets differ): those go. Unsplit steps never touch
      // the buffer and key without it (run_step), so their recordings stay.
      clear_graphs(/*split_steps_only=*/true);
      CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&partials_), 2 * (tickets + partial_bytes)));
      CUDA_CHECK(cudaMemset(partials_, 0, 2 * tickets));
      partials_bytes_ = 2 * (tickets + partial_bytes);
      tickets_bytes_ = 2 * tickets;
    }
  }
  AttentionPlan& p = plan_info_;
  p.step = step_;
  p.num_heads = H;
  p.num_kv_heads = Hkv;
  p.head_dim = D;
  p.decode.items = reinterpret_cast<const DecodeItem*>(plan_.device());
  p.slots_fit = slots_fit;
  p.decode.num_items = static_cast<int>(items);
  p.decode.num_splits = static_cast<int>(splits);
  p.decode.chunk = static_cast<int>(chunk);
  // Clusters only while every block fits the GPU at once: a cluster's blocks
  // wait for each other at its barrier, holding their SM slots, so with more
  // blocks than slots the wait costs whole waves (batch 64 x 2048 in 4
  // splits: 306 us in clusters against 216 with the merge kernel, H100).
  // A cluster must also fit one GPC: on an H200, 16 x 8,192 in 4 splits (512
  // blocks, 4 per SM) took 253 us in clusters, 64 x 2,048 unsplit (the same
  // blocks and keys) 130: clusters only up to one block per SM.
  p.decode.cluster = clusters_ && splits >= 2 && splits <= kMaxClusterSplits &&
                     items * Hkv * splits <= std::min<int64_t>(decode_slots(D, config), num_sms_);
  p.decode.config = config;
  p.decode.heads_first = decode_heads_first_ && items <= 65535;  // the grid's y holds 65,535
  // Steps of at most one block per SM (batch-1 decode) are latency, not
  // bandwidth: there the CUDA-core kernel's shorter chain before its first
  // key load wins, on bf16 and fp8 caches alike (H200, 8B shape with fp8
  // weights and KV, fused RoPE + append: batch-1 TPOT 2.99 ms against 3.35
  // on the fp8 tensor-core kernel, 2026-12-04).
  p.decode_one_wave = items * Hkv * splits <= num_sms_;
  p.decode.cuda_cores = decode_kernel_ == DecodeKernel::CudaCores ||
                        (decode_kernel_ == DecodeKernel::Auto && p.decode_one_wave);
  p.decode.counters = reinterpret_cast<int*>(partials_);
  p.decode.o_part = partials_ ? reinterpret_cast<float*>(reinterpret_cast<uint8_t*>(partials_) + tickets_bytes_) : nullptr;
  p.decode.lse_part = partials_ ? p.decode.o_part + items * splits * H * D : nullptr;
  p.fp8_src = reinterpret_cast<const int32_t*>(plan_.device() + dec_bytes + tile_bytes);
  p.fp8_pages = reinterpret_cast<const int32_t*>(plan_.device() + dec_bytes + tile_bytes + src_bytes);
  p.num_fp8_pages = static_cast<int64_t>(fp8_src.size());
  p.prefill.tiles = reinterpret_cast<const int2*>(plan_.device() + dec_bytes);
  p.prefill.num_tiles = static_cast<int>(tiles.size());
  p.prefill.rows = tile_rows;
  p.prefill.wgmma = prefill_wgmma_ && D == 128 && tile_rows == 128;
  p.prefill.ws = prefill_ws_;
  p.prefill.stages = prefill_stages_;
  // A step whose tiles are one prompt's (the time to its first token) deals
  // them in a snake: a sequence's tiles come with their keys growing, so a
  // round-robin deal hands the same blocks the longest of every round. Where
  // tiles of several sequences share a step, round-robin: sorted by keys, 8
  // x 2,048 took 0.632 ms against 0.602 (an H100; rounds that mixed 8
  // sequences' K/V outran L2), so that order was not kept.
  p.prefill.snake = prefill_snake_ && (tiles.empty() || tiles.front().x == tiles.back().x);
  p.prefill.num_tokens = b.num_tokens;
  p.logit_prefill = p.prefill;
  if (narrowed) {
    p.logit_prefill.tiles =
        reinterpret_cast<const int2*>(plan_.device() + dec_bytes + tile_bytes + src_bytes + pages_bytes);
    p.logit_prefill.num_tiles = static_cast<int>(logit_tiles.size());
  }
}

std::vector<int64_t> CudaBackend::prefill_plan(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim) {
  plan_attention(num_heads, num_kv_heads, head_dim);
  const PrefillPlan& f = plan_info_.prefill;
  std::vector<int2> tiles(f.num_tiles);
  if (f.num_tiles > 0) {  // behind the plan's upload on the stream
    CUDA_CHECK(cudaMemcpyAsync(tiles.data(), f.tiles, f.num_tiles * sizeof(int2), cudaMemcpyDeviceToHost, stream_));
    CUDA_CHECK(cudaStreamSynchronize(stream_));
  }
  std::vector<int64_t> out{f.snake ? 1 : 0};
  for (int i = f.num_tiles - 1; i >= 0; --i) out.insert(out.end(), {tiles[i].x, tiles[i].y});
  return out;
}

std::vector<int64_t> CudaBackend::decode_plan(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim) {
  plan_attention(num_heads, num_kv_heads, head_dim);
  const DecodePlan& d = plan_info_.decode;
  return {d.config.warps, d.config.stages, d.num_splits, d.chunk, d.cuda_cores ? 1 : 0};
}

int64_t CudaBackend::decode_slots(int64_t head_dim, DecodeConfig config) {
  if (act_ != ScalarType::BF16) return 2 * static_cast<int64_t>(num_sms_);  // the fp32 kernel: about 2 per SM
  const bool fp8 = kv_dtype() == ScalarType::F8E4M3;
  int& n = decode_slots_[{static_cast<int>(head_dim), (fp8 ? 100 : 0) + config.warps * 10 + config.stages}];
  if (n == 0) n = std::max(1, decode_blocks_per_sm(static_cast<int>(head_dim), config, fp8)) * num_sms_;
  return n;
}

// ---- recorded steps (CUDA graphs) -----------------------------------------------------
//
// A decode step of a few sequences is ~10 small kernels and 4 GEMMs per layer:
// launched one by one, the gaps between them cost ~10% of a batch-1 step (on
// a small model, half of it). Such steps, decode steps of up to 512
// sequences (past 64, padded to decode_bucket's sizes: Batch::pad), and
// speculative verify steps of up to 64 tokens (a sequence's last token and
// its proposals: prefill tiles of a few rows), are recorded once into a CUDA
// graph per key and replayed with one launch. The key is the model's (its tensors, token and logit counts) plus
// everything of this backend a recording captures by value: the device
// addresses of the step's arrays and the attention plan's sizes.

bool CudaBackend::recordable() const {
  if (!graphs_enabled_ || host_.num_tokens <= 0) return false;
  if (host_.num_tokens == host_.num_seqs) return host_.num_tokens <= kMaxRecordedDecodeTokens;  // decode
  if (kv_dtype() == ScalarType::F8E4M3) return false;  // its prefill scratch may be reallocated
  if (host_.num_tokens > kMaxRecordedTokens) return false;
  for (int32_t i = 0; i < host_.num_seqs; ++i)
    if (host_.query_start[i + 1] - host_.query_start[i] > kMaxRecordedQuery) return false;
  return true;
}

void CudaBackend::run_step(uint64_t key, const std::function<void()>& body) {
  // PAGEDRT_GRAPH_LOG=1: each step's host time, begin_step's and this
  // function's (its kernels queued directly, recorded and launched, or a
  // recording replayed), where it was not a replay or took over 0.5 ms.
  struct Timed {
    const CudaBackend& b;
    const char* kind = "replayed";
    std::chrono::steady_clock::time_point start =  // no clock read on a step without the log
        b.graph_log_ ? std::chrono::steady_clock::now() : std::chrono::steady_clock::time_point{};
    ~Timed() {
      if (!b.graph_log_) return;
      const auto end = std::chrono::steady_clock::now();
      const double begin_ms = std::chrono::duration<double, std::milli>(start - b.begin_start_).count();
      const double run_ms = std::chrono::duration<double, std::milli>(end - start).count();
      if (std::strcmp(kind, "replayed") == 0 && run_ms < 0.5) return;
      std::fprintf(stderr, "pagedrt step: step %llu %s tokens %d seqs %d tiles %d: begin_step %.3f ms, run %.3f ms\n",
                   static_cast<unsigned long long>(b.step_), kind, b.host_.num_tokens, b.host_.num_seqs,
                   b.plan_info_.prefill.num_tiles, begin_ms, run_ms);
    }
  } timed{*this};
  // Only once this step's plan exists (made in begin_step from the previous
  // step's head counts) can a recording hold it.
  if (!recordable() || plan_info_.step != step_) {
    timed.kind = !graphs_enabled_ ? "direct (graphs off)" : !recordable() ? "direct (not recordable)" : "direct (no plan yet)";
    return body();
  }
  const GraphKey k{key,
                   batch_.device(),
                   plan_.device(),
                   plan_info_.decode.num_splits > 1 ? partials_ : nullptr,  // only split steps use them
                   plan_info_.decode.num_items,
                   // the split count and the kernel shape (4 x 3 for splits that 2 x 3 would cut finer)
                   plan_info_.decode.num_splits * 100 + plan_info_.decode.config.warps * 10 +
                       plan_info_.decode.config.stages,
                   plan_info_.decode.chunk,
                   host_.num_seqs,  // with the two below: which of the fused and unfused attention paths
                   plan_info_.prefill.num_tiles};
  auto it = graphs_.find(k);
  if (it == graphs_.end()) {
    // A step shape seen for the first time runs directly: recording and
    // instantiating ~300 kernels takes ~7-10 ms of host time with the GPU
    // idle, more than a one-off step saves (the tail of a batched run, where
    // the batch shrinks through sizes that each last one step). It is
    // recorded when it comes again within record_window_ steps: a shape that
    // recurs only now and then (a batch's first steps, once per batch of
    // requests) keeps running directly (~1-2 ms of launches) rather than
    // being recorded once for nothing.
    auto seen = seen_at_.find(k);
    const bool record =
        seen != seen_at_.end() && (record_window_ == 0 || step_ - seen->second <= record_window_);
    if (graph_log_) {
      std::fprintf(stderr, "pagedrt graph: step %llu %s key %016llx batch %p plan %p partials %p items %d "
                           "splits/shape %d chunk %d seqs %d tiles %d (%zu recorded)\n",
                   static_cast<unsigned long long>(step_),
                   record ? "record" : seen == seen_at_.end() ? "first" : "again", static_cast<unsigned long long>(key),
                   std::get<1>(k), std::get<2>(k), std::get<3>(k), std::get<4>(k), std::get<5>(k), std::get<6>(k),
                   std::get<7>(k), std::get<8>(k), graphs_.size());
    }
    if (!record) {
      if (seen == seen_at_.end() && seen_at_.size() >= 4 * kMaxGraphs) seen_at_.clear();
      seen_at_[k] = step_;
      timed.kind = "direct";
      return body();
    }
    seen_at_.erase(seen);
    timed.kind = "recorded";
    if (graphs_.size() >= kMaxGraphs) clear_graphs();
    CUDA_CHECK(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
    try {
      body();
    } catch (...) {
      cudaGraph_t g = nullptr;
      cudaStreamEndCapture(stream_, &g);
      if (g) cudaGraphDestroy(g);
      cudaGetLastError();
      throw;
    }
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    cudaError_t err = cudaStreamEndCapture(stream_, &graph);
    if (err == cudaSuccess) err = cudaGraphInstantiate(&exec, graph, 0);
    if (graph) cudaGraphDestroy(graph);
    if (err != cudaSuccess) {  // nothing ran: run the step directly, and stop recording
      cudaGetLastError();
      std::fprintf(stderr, "pagedrt: recording a decode step as a CUDA graph failed (%s); "
                           "running steps without graphs from now on\n", cudaGetErrorString(err));
      graphs_enabled_ = false;
      return body();
    }
    it = graphs_.emplace(k, exec).first;
  }
  CUDA_CHECK(cudaGraphLaunch(it->second, stream_));
}

void CudaBackend::clear_graphs(bool split_steps_only) {
  for (auto it = graphs_.begin(); it != graphs_.end();) {
    if (split_steps_only && std::get<3>(it->first) == nullptr) {  // keyed without partials: unsplit
      ++it;
      continue;
    }
    cudaGraphExecDestroy(it->second);
    it = graphs_.erase(it);
  }
}

}  // namespace pagedrt::cuda
