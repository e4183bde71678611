#include "backend/backend.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>

#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <new>

#include "backend/fp8.hpp"

#include "pagedrt/error.hpp"

namespace pagedrt {

namespace {

// Columns [first, first + count) of each row of an F32 / F16 / BF16 view p
// (rows, k) as e4m3 codes (rows, count), with the whole row's scale.
void quantize_rows(const WeightView& p, int64_t first, int64_t count, uint8_t* codes, float* scale) {
  const int64_t n = p.shape[0], k = p.shape[1];
  auto value = [&](int64_t i) {
    return p.type == WeightView::Type::F32    ? static_cast<const float*>(p.data)[i]
           : p.type == WeightView::Type::BF16 ? bf16_to_f32(static_cast<const uint16_t*>(p.data)[i])
                                              : f16_to_f32(static_cast<const uint16_t*>(p.data)[i]);
  };
  // Rows are independent (the same codes whatever the thread count): an
  // 8B model's 7B projection weights take ~70 s on one core.
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < n; ++r) {
    float amax = 0.0f;
    for (int64_t c = 0; c < k; ++c) amax = std::max(amax, std::fabs(value(r * k + c)));
    scale[r] = e4m3_row_scale(amax);
    for (int64_t c = 0; c < count; ++c) codes[r * count + c] = float_to_e4m3(value(r * k + first + c) / scale[r]);
  }
}

}  // namespace

Tensor host_fp8_columns(const WeightView& w, int64_t first, int64_t count) {
  Tensor t = host_empty({w.shape[0], count}, ScalarType::F8E4M3);
  t.row_scale = std::make_shared<Tensor>(host_empty({w.shape[0]}, ScalarType::F32));
  quantize_rows(w, first, count, t.as<uint8_t>(), t.row_scale->as<float>());
  return t;
}

Tensor host_fp8_weight(const std::vector<WeightView>& parts) {
  int64_t rows = 0;
  for (const WeightView& p : parts) rows += p.shape[0];
  const int64_t k = parts[0].shape[1];
  Tensor t = host_empty({rows, k}, ScalarType::F8E4M3);
  t.row_scale = std::make_shared<Tensor>(host_empty({rows}, ScalarType::F32));
  uint8_t* codes = t.as<uint8_t>();
  float* scale = t.row_scale->as<float>();
  for (const WeightView& p : parts) {
    const int64_t n = p.shape[0];
    if (p.type == WeightView::Type::F8E4M3) {
      std::memcpy(codes, p.data, static_cast<size_t>(n * k));
      std::memcpy(scale, p.row_scale, static_cast<size_t>(n) * 4);
    } else {
      quantize_rows(p, 0, k, codes, scale);
    }
    codes += n * k;
    scale += n;
  }
  return t;
}

int64_t WeightView::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

void Backend::rope_cache_attention(Tensor& qkv, const RopeTable& rope, int64_t num_heads, int64_t num_kv_heads,
                                   int64_t head_dim, float scale, Tensor& k_cache, Tensor& v_cache, Tensor& out) {
  rope_and_cache(qkv, rope, num_heads, num_kv_heads, head_dim, k_cache, v_cache);
  paged_attention(qkv, k_cache, v_cache, num_heads, num_kv_heads, head_dim, scale, out);
}

void Backend::linear_silu_mul(const Tensor& x, const Tensor& gate_up_weight, int64_t n, Tensor& gate_up,
                              Tensor& out) {
  linear(x, gate_up_weight, n, gate_up);
  silu_mul(gate_up, n, out);
}

std::shared_ptr<void> Backend::host_alloc(size_t bytes) {
  return std::shared_ptr<void>(::operator new(bytes, std::align_val_t(64)),
                               [](void* p) { ::operator delete(p, std::align_val_t(64)); });
}

int32_t decode_bucket(int32_t tokens) {
  if (tokens <= 2 || tokens > 512) return tokens;
  if (tokens <= 8) return tokens <= 4 ? 4 : 8;
  const int32_t step = tokens <= 128 ? 8 : tokens <= 256 ? 16 : 32;
  return (tokens + step - 1) / step * step;
}

void Backend::set_decode_padding(bool on) {
  const char* v = std::getenv("PAGEDRT_DECODE_PAD");
  pad_decode_ = v ? std::strcmp(v, "0") != 0 : on;
}

int32_t Backend::padded_tokens(const BatchView& b) const {
  if (!pad_decode_ || b.num_tokens != b.num_seqs || b.num_logits != b.num_tokens) return b.num_tokens;
  return decode_bucket(b.num_tokens);
}

struct Backend::HostGate {
  std::mutex mu;
  std::condition_variable cv;
  uint64_t opened = 0;
  std::vector<uint32_t> words;
};

uint32_t* Backend::mask_gate(size_t words) {
  if (!gate_) gate_ = std::make_shared<HostGate>();
  if (gate_->words.size() < words) gate_->words.resize(words);
  return gate_->words.data();
}

const uint32_t* Backend::queue_gated_masks(uint64_t id, size_t words) {
  if (!gate_ || gate_->words.size() < words)
    throw Error(ErrorKind::Runtime, "queue_gated_masks: " + std::to_string(words) + " words past mask_gate()'s buffer");
  std::unique_lock<std::mutex> lock(gate_->mu);
  gate_->cv.wait(lock, [&] { return gate_->opened >= id; });
  return gate_->words.data();
}

void Backend::open_mask_gate(uint64_t id) {
  if (!gate_) return;
  {
    std::lock_guard<std::mutex> lock(gate_->mu);
    gate_->opened = std::max(gate_->opened, id);
  }
  gate_->cv.notify_all();
}

void Backend::argmax(const Tensor&, int64_t, int32_t*, const RowMasks&) {
  throw Error(ErrorKind::Unsupported, "this backend has no device argmax (check has_argmax())");
}

void Backend::sample(const Tensor&, const SampleRow*, int64_t, const LogitEdit*, int64_t, int32_t*, DrawLogprobs*,
                     const DrawMasks&) {
  throw Error(ErrorKind::Unsupported, "this backend has no device sampling (check has_sample())");
}

}  // namespace pagedrt
