#include "backend/cuda/cuda_backend.hpp"

#include <algorithm>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "backend/cuda/cuda_check.hpp"
#include "backend/cuda/cuda_factory.hpp"
#include "backend/cuda/launch.cuh"

namespace pagedrt::cuda {
namespace {

constexpr size_t kLoadChunk = 16u << 20;  // weight upload chunk (bytes)

size_t align16(size_t n) { return (n + 15) / 16 * 16; }

void require(bool ok, const std::string& msg) {
  if (!ok) throw Error(ErrorKind::InvalidArgument, "cuda backend: " + msg);
}

int elem_kind(WeightView::Type t) {
  switch (t) {
    case WeightView::Type::F32: return static_cast<int>(Elem::F32);
    case WeightView::Type::F16: return static_cast<int>(Elem::F16);
    case WeightView::Type::BF16: return static_cast<int>(Elem::BF16);
  }
  return -1;
}

}  // namespace

// ---- factory ----------------------------------------------------------------------

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return 0;
  }
  return n;
}

std::unique_ptr<Backend> make_backend(ScalarType activation_dtype) {
  if (device_count() == 0)
    throw Error(ErrorKind::Unsupported, "device 'cuda': no CUDA GPU is visible to this process");
  if (activation_dtype != ScalarType::BF16 && activation_dtype != ScalarType::F32)
    throw Error(ErrorKind::Unsupported, std::string("device 'cuda': activation dtype ") +
                                            scalar_name(activation_dtype) + " (supported: bfloat16, float32)");
  return std::make_unique<CudaBackend>(activation_dtype);
}

// ---- Staging ----------------------------------------------------------------------

Staging::~Staging() {
  if (done_) cudaEventSynchronize(done_), cudaEventDestroy(done_);
  if (host_) cudaFreeHost(host_);
  if (dev_) cudaFree(dev_);
}

uint8_t* Staging::host(size_t bytes) {
  if (done_ == nullptr) CUDA_CHECK(cudaEventCreateWithFlags(&done_, cudaEventDisableTiming));
  CUDA_CHECK(cudaEventSynchronize(done_));
  if (bytes > cap_) {
    const size_t cap = std::max<size_t>(align16(bytes) * 2, 4096);
    if (host_) CUDA_CHECK(cudaFreeHost(host_));
    if (dev_) CUDA_CHECK(cudaFree(dev_));  // synchronizes: nothing reads the old buffer after this
    host_ = nullptr;
    dev_ = nullptr;
    CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&host_), cap, cudaHostAllocDefault));
    CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&dev_), cap));
    cap_ = cap;
  }
  return host_;
}

void Staging::upload(size_t bytes, cudaStream_t stream) {
  if (bytes > 0) CUDA_CHECK(cudaMemcpyAsync(dev_, host_, bytes, cudaMemcpyHostToDevice, stream));
  CUDA_CHECK(cudaEventRecord(done_, stream));
}

// ---- CudaBackend: memory ------------------------------------------------------------

CudaBackend::CudaBackend(ScalarType activation_dtype) : act_(activation_dtype) {
  CUDA_CHECK(cudaGetDevice(&device_));
  cudaDeviceProp prop;
  CUDA_CHECK(cudaGetDeviceProperties(&prop, device_));
  if (prop.major < 8)
    throw Error(ErrorKind::Unsupported, std::string("device 'cuda': ") + prop.name + " has compute capability " +
                                            std::to_string(prop.major) + "." + std::to_string(prop.minor) +
                                            "; this build runs on sm_90 (Hopper)");
  num_sms_ = prop.multiProcessorCount;
  const char* graphs = std::getenv("PAGEDRT_CUDA_GRAPHS");
  graphs_enabled_ = !(graphs && std::strcmp(graphs, "0") == 0);
  const char* clusters = std::getenv("PAGEDRT_DECODE_CLUSTERS");
  clusters_ = prop.major >= 9 && !(clusters && std::strcmp(clusters, "0") == 0);
  const char* fuse = std::getenv("PAGEDRT_CUDA_FUSE");
  fuse_ = !(fuse && std::strcmp(fuse, "0") == 0);
  if (const char* waves = std::getenv("PAGEDRT_DECODE_SPLIT_WAVES")) split_waves_ = std::max(1, std::atoi(waves));
  const char* pdl = std::getenv("PAGEDRT_CUDA_PDL");
  set_pdl(!(pdl && std::strcmp(pdl, "0") == 0));
  CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  gemm_ = std::make_unique<Gemm>(stream_);
  for (int i = 0; i < 2; ++i) {
    CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&load_host_[i]), kLoadChunk, cudaHostAllocDefault));
    CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&load_dev_[i]), kLoadChunk));
    CUDA_CHECK(cudaEventCreateWithFlags(&load_done_[i], cudaEventDisableTiming));
  }
}

CudaBackend::~CudaBackend() {
  if (stream_) cudaStreamSynchronize(stream_);
  clear_graphs();
  for (int i = 0; i < 2; ++i) {
    if (load_done_[i]) cudaEventDestroy(load_done_[i]);
    if (load_host_[i]) cudaFreeHost(load_host_[i]);
    if (load_dev_[i]) cudaFree(load_dev_[i]);
  }
  if (partials_) cudaFree(partials_);
  gemm_.reset();
  if (stream_) cudaStreamDestroy(stream_);
}

int64_t CudaBackend::memory_free() const {
  size_t free = 0, total = 0;
  CUDA_CHECK(cudaMemGetInfo(&free, &total));
  return static_cast<int64_t>(free);
}

void CudaBackend::synchronize() { CUDA_CHECK(cudaStreamSynchronize(stream_)); }

void CudaBackend::check_attention(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim) const {
  const int64_t group = num_heads / num_kv_heads;
  if (!attention_supported(static_cast<int>(head_dim), static_cast<int>(group)))
    throw Error(ErrorKind::Unsupported,
                "device 'cuda': attention with head_dim " + std::to_string(head_dim) + " and " +
                    std::to_string(group) + " query heads per kv head has no CUDA kernel (supported: "
                    "head_dim 64 or 128, 1 to 8 query heads per kv head); use device=\"cpu\"");
}

Tensor CudaBackend::empty(std::vector<int64_t> shape, ScalarType dtype) {
  Tensor t;
  t.shape = std::move(shape);
  t.dtype = dtype;
  t.device = Device::CUDA;
  const size_t bytes = std::max<size_t>(t.nbytes(), 256);
  void* p = nullptr;
  cudaError_t err = cudaMalloc(&p, bytes);
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw Error(ErrorKind::Runtime, "out of GPU memory allocating " + std::to_string(bytes) + " bytes for a " +
                                        scalar_name(dtype) + " tensor " + t.shape_str() + " (" +
                                        cudaGetErrorString(err) + ")");
  }
  t.storage = std::shared_ptr<void>(p, [](void* q) { cudaFree(q); });
  t.data = p;
  return t;
}

Tensor CudaBackend::from_host(const Tensor& host) {
  Tensor t = empty(host.shape, host.dtype);
  CUDA_CHECK(cudaMemcpyAsync(t.data, host.data, host.nbytes(), cudaMemcpyHostToDevice, stream_));
  CUDA_CHECK(cudaStreamSynchronize(stream_));
  return t;
}

// Streams `bytes` of host memory through two pinned chunks; converts on the
// device when the element kinds differ (src_kind -> dst_kind, `elem` source bytes).
void CudaBackend::upload_chunked(const uint8_t* src, size_t bytes, uint8_t* dst, int src_kind, int dst_kind,
                                 size_t elem) {
  const size_t dst_elem = dst_kind == static_cast<int>(Elem::F32) ? 4 : 2;
  for (size_t off = 0, i = 0; off < bytes; off += kLoadChunk, ++i) {
    const int slot = static_cast<int>(i % 2);
    const size_t n = std::min(kLoadChunk, bytes - off);
    CUDA_CHECK(cudaEventSynchronize(load_done_[slot]));
    std::memcpy(load_host_[slot], src + off, n);
    if (src_kind == dst_kind) {
      CUDA_CHECK(cudaMemcpyAsync(dst + off, load_host_[slot], n, cudaMemcpyHostToDevice, stream_));
    } else {
      CUDA_CHECK(cudaMemcpyAsync(load_dev_[slot], load_host_[slot], n, cudaMemcpyHostToDevice, stream_));
      convert(load_dev_[slot], static_cast<Elem>(src_kind), dst + off / elem * dst_elem, static_cast<Elem>(dst_kind),
              static_cast<int64_t>(n / elem), stream_);
    }
    CUDA_CHECK(cudaEventRecord(load_done_[slot], stream_));
  }
}

Tensor CudaBackend::load_weight(const std::vector<WeightView>& parts, ScalarType dtype) {
  require(dtype == ScalarType::BF16 || dtype == ScalarType::F32, "weights load as bf16 or fp32");
  int64_t rows = 0;
  std::vector<int64_t> shape = parts[0].shape;
  for (const WeightView& p : parts) rows += p.shape[0];
  shape[0] = rows;
  Tensor t = empty(shape, dtype);
  const int dst_kind = static_cast<int>(dtype == ScalarType::F32 ? Elem::F32 : Elem::BF16);
  uint8_t* dst = static_cast<uint8_t*>(t.data);
  for (const WeightView& p : parts) {
    upload_chunked(static_cast<const uint8_t*>(p.data), p.nbytes(), dst, elem_kind(p.type), dst_kind,
                   p.element_size());
    dst += p.numel() * scalar_size(dtype);
  }
  CUDA_CHECK(cudaStreamSynchronize(stream_));  // the mapping may close after this returns
  return t;
}

// ---- the step -----------------------------------------------------------------------

void CudaBackend::begin_step(const BatchView& b) {
  CUDA_CHECK(cudaSetDevice(device_));
  host_ = b;
  ++step_;
  const size_t n = b.num_tokens, s = b.num_seqs, np = b.num_seqs ? b.page_indptr[b.num_seqs] : 0;
  // page_indices last: with the same token, sequence and logit counts every
  // other array keeps its device address from step to step (recorded steps).
  const size_t sizes[] = {n * 4, n * 4, n * 8, (s + 1) * 4, (s + 1) * 4, size_t(b.num_logits) * 4, n * 4, np * 4};
  size_t off[8], total = 0;
  for (int i = 0; i < 8; ++i) {
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
  batch_.upload(total, stream_);
  uint8_t* d = batch_.device();
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
}

// Decode items: the token of every sequence with one query token (in the
// fp32 mode every token: the prefill kernel is bf16 WMMA). Prefill tiles: 64
// (token, head) rows of every other sequence. Splits: enough
// blocks to fill the GPU several times over (batch 1 with a long context is
// spread over the SMs; a full batch runs one split).
void CudaBackend::plan_attention(int64_t H, int64_t Hkv, int64_t D) {
  if (plan_info_.step == step_ && plan_info_.num_heads == H && plan_info_.num_kv_heads == Hkv &&
      plan_info_.head_dim == D)
    return;
  const BatchView& b = host_;
  const int64_t G = H / Hkv;
  std::vector<DecodeItem> dec;
  std::vector<int2> tiles;
  int64_t max_ctx = 1;
  for (int32_t i = 0; i < b.num_seqs; ++i) {
    const int32_t q0 = b.query_start[i], qn = b.query_start[i + 1] - q0;
    if (qn == 1 || act_ == ScalarType::F32) {
      for (int32_t t = q0; t < q0 + qn; ++t) {
        // A slot past int32 (2^31 cached tokens) is never written by the
        // fused append: such steps run rope_and_cache (rope_cache_attention).
        const int64_t slot = b.slot_mapping[t];
        dec.push_back({t, b.positions[t] + 1, b.page_indptr[i],
                       slot <= INT32_MAX ? static_cast<int32_t>(slot) : int32_t(-2)});
        max_ctx = std::max<int64_t>(max_ctx, b.positions[t] + 1);
      }
    } else {
      for (int64_t r = 0; r < qn * G; r += kPrefillRows) tiles.push_back(make_int2(i, static_cast<int>(r)));
    }
  }
  const int64_t keys_per_pass = D == 128 ? 32 : 64;  // key groups x unroll of the decode kernel
  const int64_t items = static_cast<int64_t>(dec.size());
  const int64_t base = std::max<int64_t>(1, items * Hkv);
  const int64_t target = split_waves_ * static_cast<int64_t>(num_sms_);
  int64_t chunk = max_ctx;
  if (base < target) {
    const int64_t want = (target + base - 1) / base;
    chunk = std::max<int64_t>(keys_per_pass, (max_ctx + want - 1) / want);
    chunk = (chunk + keys_per_pass - 1) / keys_per_pass * keys_per_pass;
  }
  int64_t splits = std::max<int64_t>(1, (max_ctx + chunk - 1) / chunk);
  // A recorded step replays with its split count: round it up to a power of
  // two (splits past the context are empty and merge as nothing), so that a
  // growing context needs a new recording only every doubling.
  if (recordable() && splits > 1) {
    int64_t up = 1;
    while (up < splits) up *= 2;
    splits = up;
  }

  const size_t dec_bytes = align16(dec.size() * sizeof(DecodeItem)), tile_bytes = tiles.size() * sizeof(int2);
  uint8_t* h = plan_.host(dec_bytes + tile_bytes);
  if (!dec.empty()) std::memcpy(h, dec.data(), dec.size() * sizeof(DecodeItem));
  if (!tiles.empty()) std::memcpy(h + dec_bytes, tiles.data(), tile_bytes);
  plan_.upload(dec_bytes + tile_bytes, stream_);

  if (splits > 1) {
    const size_t need = static_cast<size_t>(items * splits * H) * (D + 1) * sizeof(float);
    if (need > partials_bytes_) {
      if (partials_) CUDA_CHECK(cudaFree(partials_));
      partials_ = nullptr;
      partials_bytes_ = 0;
      CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&partials_), need * 2));
      partials_bytes_ = need * 2;
    }
  }
  AttentionPlan& p = plan_info_;
  p.step = step_;
  p.num_heads = H;
  p.num_kv_heads = Hkv;
  p.head_dim = D;
  p.decode.items = reinterpret_cast<const DecodeItem*>(plan_.device());
  p.slots_fit = std::all_of(dec.begin(), dec.end(), [](const DecodeItem& d) { return d.slot != -2; });
  p.decode.num_items = static_cast<int>(items);
  p.decode.num_splits = static_cast<int>(splits);
  p.decode.chunk = static_cast<int>(chunk);
  // Clusters only while every block fits the GPU at once (<= 2 per SM): a
  // cluster's blocks wait for each other at its barrier, holding their SM
  // slots, so with more blocks than slots the wait costs whole waves (batch
  // 64 x 2048 in 4 splits: 306 us in clusters against 216 with the merge kernel).
  p.decode.cluster = clusters_ && splits >= 2 && splits <= kMaxClusterSplits &&
                     items * Hkv * splits <= 2 * static_cast<int64_t>(num_sms_);
  p.decode.o_part = partials_;
  p.decode.lse_part = partials_ ? partials_ + items * splits * H * D : nullptr;
  p.prefill.tiles = reinterpret_cast<const int2*>(plan_.device() + dec_bytes);
  p.prefill.num_tiles = static_cast<int>(tiles.size());
}

// ---- recorded steps (CUDA graphs) -----------------------------------------------------
//
// A decode step of a few sequences is ~10 small kernels and 4 GEMMs per layer:
// launched one by one, the gaps between them cost ~10% of a batch-1 step. Such
// steps are recorded once into a CUDA graph per key and replayed with one
// launch. The key is the model's (its tensors, token and logit counts) plus
// everything of this backend a recording captures by value: the device
// addresses of the step's arrays and the attention plan's sizes.

bool CudaBackend::recordable() const {
  return graphs_enabled_ && host_.num_tokens > 0 && host_.num_tokens == host_.num_seqs &&
         host_.num_tokens <= kMaxRecordedTokens;
}

void CudaBackend::run_step(uint64_t key, const std::function<void()>& body) {
  // Only once this step's plan exists (made in begin_step from the previous
  // step's head counts) can a recording hold it.
  if (!recordable() || plan_info_.step != step_) return body();
  const GraphKey k{key,
                   batch_.device(),
                   plan_.device(),
                   partials_,
                   plan_info_.decode.num_items,
                   plan_info_.decode.num_splits,
                   plan_info_.decode.chunk};
  auto it = graphs_.find(k);
  if (it == graphs_.end()) {
    // A step shape seen for the first time runs directly: recording and
    // instantiating ~300 kernels takes ~10 ms of host time with the GPU idle,
    // more than a one-off step saves (the tail of a batched run, where the
    // batch shrinks through sizes that each last one step). The second time
    // it is recorded.
    if (seen_once_.insert(k).second) {
      if (seen_once_.size() > 4 * kMaxGraphs) seen_once_.clear();
      return body();
    }
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

void CudaBackend::clear_graphs() {
  for (auto& kv : graphs_) cudaGraphExecDestroy(kv.second);
  graphs_.clear();
}

// ---- ops ---------------------------------------------------------------------------
//
// Every activation and the KV cache are act_ (bf16, or fp32 in the validation
// mode); the residual stream is fp32 in both.

void CudaBackend::embedding(const Tensor& table, Tensor& out) {
  require(table.dtype == act_ && out.dtype == ScalarType::F32, "embedding: table of the activation dtype, fp32 out");
  if (act_ == ScalarType::BF16)
    cuda::embedding(table.as<bf16>(), table.dim(1), dev_.token_ids, host_.num_tokens, out.as<float>(), stream_);
  else
    cuda::embedding(table.as<float>(), table.dim(1), dev_.token_ids, host_.num_tokens, out.as<float>(), stream_);
}

void CudaBackend::rms_norm(const Tensor& x, const Tensor& weight, float eps, int64_t n, Tensor& out) {
  require(weight.dtype == ScalarType::F32, "rms_norm: fp32 weight");
  const int64_t d = weight.numel();
  if (x.dtype == ScalarType::F32 && out.dtype == ScalarType::BF16)
    cuda::rms_norm(x.as<float>(), weight.as<float>(), eps, n, d, out.as<bf16>(), stream_);
  else if (x.dtype == ScalarType::F32 && out.dtype == ScalarType::F32)
    cuda::rms_norm(x.as<float>(), weight.as<float>(), eps, n, d, out.as<float>(), stream_);
  else if (x.dtype == ScalarType::BF16 && out.dtype == ScalarType::BF16)
    cuda::rms_norm(x.as<bf16>(), weight.as<float>(), eps, n, d, out.as<bf16>(), stream_);
  else
    require(false, std::string("rms_norm: ") + scalar_name(x.dtype) + " -> " + scalar_name(out.dtype));
}

void CudaBackend::add_rms_norm(Tensor& residual, const Tensor& x, const Tensor& weight, float eps, Tensor& out) {
  require(residual.dtype == ScalarType::F32 && x.dtype == act_ && out.dtype == act_,
          "add_rms_norm: fp32 residual, x and out of the activation dtype");
  if (act_ == ScalarType::BF16)
    cuda::add_rms_norm(residual.as<float>(), x.as<bf16>(), weight.as<float>(), eps, host_.num_tokens,
                       weight.numel(), out.as<bf16>(), stream_);
  else
    cuda::add_rms_norm(residual.as<float>(), x.as<float>(), weight.as<float>(), eps, host_.num_tokens,
                       weight.numel(), out.as<float>(), stream_);
}

void CudaBackend::linear(const Tensor& x, const Tensor& weight, int64_t n, Tensor& out) {
  require(x.dtype == act_ && weight.dtype == act_, "linear: x and weight of the activation dtype");
  require(out.dtype == act_ || out.dtype == ScalarType::F32, "linear: out of the activation dtype or fp32");
  gemm_->run(x.data, weight.data, out.data, n, weight.dim(0), weight.dim(1), out.dtype == ScalarType::F32,
             act_ == ScalarType::F32);
}

void CudaBackend::add(Tensor& residual, const Tensor& x) {
  require(residual.dtype == ScalarType::F32 && x.dtype == act_, "add: fp32 residual, x of the activation dtype");
  const int64_t numel = int64_t(host_.num_tokens) * residual.dim(1);
  if (act_ == ScalarType::BF16)
    cuda::add(residual.as<float>(), x.as<bf16>(), numel, stream_);
  else
    cuda::add(residual.as<float>(), x.as<float>(), numel, stream_);
}

namespace {
template <typename T, typename Arrays>
void rope_and_cache_t(Tensor& qkv, const RopeTable& rope, const Arrays& b, int64_t n, int H, int Hkv, int D,
                      Tensor& k_cache, Tensor& v_cache, cudaStream_t s) {
  cuda::rope_and_cache(qkv.as<T>(), rope.cos.as<float>(), rope.sin.as<float>(), b.positions, b.slot_mapping, n, H,
                       Hkv, D, k_cache.as<T>(), v_cache.as<T>(), s);
}
}  // namespace

void CudaBackend::rope_and_cache(Tensor& qkv, const RopeTable& rope, int64_t num_heads, int64_t num_kv_heads,
                                 int64_t head_dim, Tensor& k_cache, Tensor& v_cache) {
  require(qkv.dtype == act_ && k_cache.dtype == act_, "rope_and_cache: qkv and cache of the activation dtype");
  const int H = static_cast<int>(num_heads), Hkv = static_cast<int>(num_kv_heads), D = static_cast<int>(head_dim);
  if (act_ == ScalarType::BF16)
    rope_and_cache_t<bf16>(qkv, rope, dev_, host_.num_tokens, H, Hkv, D, k_cache, v_cache, stream_);
  else
    rope_and_cache_t<float>(qkv, rope, dev_, host_.num_tokens, H, Hkv, D, k_cache, v_cache, stream_);
}

template <typename T>
AttentionParamsT<T> CudaBackend::attention_params(const Tensor& qkv, const Tensor& k_cache, const Tensor& v_cache,
                                                  int64_t H, int64_t Hkv, int64_t D, float scale, Tensor& out) const {
  AttentionParamsT<T> p;
  p.qkv = qkv.as<T>();
  p.k_cache = k_cache.as<T>();
  p.v_cache = v_cache.as<T>();
  p.out = out.as<T>();
  p.positions = dev_.positions;
  p.query_start = dev_.query_start;
  p.page_indptr = dev_.page_indptr;
  p.page_indices = dev_.page_indices;
  p.token_seq = dev_.token_seq;
  p.num_heads = static_cast<int>(H);
  p.num_kv_heads = static_cast<int>(Hkv);
  p.head_dim = static_cast<int>(D);
  p.block_size = static_cast<int>(k_cache.dim(1));
  p.block_shift = -1;
  for (int sh = 0; sh < 31; ++sh)
    if ((1 << sh) == p.block_size) p.block_shift = sh;
  p.scale = scale;
  return p;
}

void CudaBackend::paged_attention(const Tensor& qkv, const Tensor& k_cache, const Tensor& v_cache,
                                  int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, float scale,
                                  Tensor& out) {
  check_attention(num_heads, num_kv_heads, head_dim);
  require(qkv.dtype == act_ && out.dtype == act_ && k_cache.dtype == act_,
          "paged_attention: qkv, cache and out of the activation dtype");
  plan_attention(num_heads, num_kv_heads, head_dim);
  if (act_ == ScalarType::BF16) {
    const AttentionParams p =
        attention_params<bf16>(qkv, k_cache, v_cache, num_heads, num_kv_heads, head_dim, scale, out);
    prefill_attention(p, plan_info_.prefill, stream_);
    decode_attention(p, plan_info_.decode, stream_);
  } else {  // every token is a decode item (plan_attention)
    decode_attention(attention_params<float>(qkv, k_cache, v_cache, num_heads, num_kv_heads, head_dim, scale, out),
                     plan_info_.decode, stream_);
  }
}

void CudaBackend::silu_mul(const Tensor& gate_up, int64_t n, Tensor& out) {
  require(gate_up.dtype == act_ && out.dtype == act_, "silu_mul: in and out of the activation dtype");
  if (act_ == ScalarType::BF16)
    cuda::silu_mul(gate_up.as<bf16>(), n, out.dim(1), out.as<bf16>(), stream_);
  else
    cuda::silu_mul(gate_up.as<float>(), n, out.dim(1), out.as<float>(), stream_);
}

void CudaBackend::rope_cache_attention(Tensor& qkv, const RopeTable& rope, int64_t num_heads, int64_t num_kv_heads,
                                       int64_t head_dim, float scale, Tensor& k_cache, Tensor& v_cache, Tensor& out) {
  check_attention(num_heads, num_kv_heads, head_dim);
  plan_attention(num_heads, num_kv_heads, head_dim);
  // Only where every token is its sequence's only query token: a prefill
  // token reads the keys of the tokens before it in the same step, which
  // must be in the cache first.
  if (!fuse_ || host_.num_tokens != host_.num_seqs || plan_info_.prefill.num_tiles != 0 || !plan_info_.slots_fit) {
    rope_and_cache(qkv, rope, num_heads, num_kv_heads, head_dim, k_cache, v_cache);
    paged_attention(qkv, k_cache, v_cache, num_heads, num_kv_heads, head_dim, scale, out);
    return;
  }
  require(qkv.dtype == act_ && out.dtype == act_ && k_cache.dtype == act_ && v_cache.dtype == act_,
          "rope_cache_attention: qkv, caches and out of the activation dtype");
  auto fused = [&](auto p) {
    p.rope_cos = rope.cos.as<float>();
    p.rope_sin = rope.sin.as<float>();
    p.slot_mapping = dev_.slot_mapping;
    using T = std::remove_pointer_t<decltype(p.out)>;
    p.k_append = k_cache.as<T>();
    p.v_append = v_cache.as<T>();
    decode_attention(p, plan_info_.decode, stream_);
  };
  if (act_ == ScalarType::BF16)
    fused(attention_params<bf16>(qkv, k_cache, v_cache, num_heads, num_kv_heads, head_dim, scale, out));
  else
    fused(attention_params<float>(qkv, k_cache, v_cache, num_heads, num_kv_heads, head_dim, scale, out));
}

void CudaBackend::linear_silu_mul(const Tensor& x, const Tensor& gate_up_weight, int64_t n, Tensor& gate_up,
                                  Tensor& out) {
  const int64_t inter = gate_up_weight.dim(0) / 2;
  require(out.dim(1) == inter && gate_up_weight.dim(0) == 2 * inter, "linear_silu_mul: (2 I, k) weight, (n, I) out");
  if (fuse_ && act_ == ScalarType::BF16 && x.dtype == act_ && gate_up_weight.dtype == act_ && out.dtype == act_ &&
      gemm_->run_silu_mul(x.data, gate_up_weight.data, out.data, n, inter, gate_up_weight.dim(1)))
    return;
  linear(x, gate_up_weight, n, gate_up);
  silu_mul(gate_up, n, out);
}

void CudaBackend::gather_rows(const Tensor& x, Tensor& out) {
  require(x.dtype == out.dtype, "gather_rows: same dtype in and out");
  cuda::gather_rows(x.data, x.dim(1) * static_cast<int64_t>(scalar_size(x.dtype)), dev_.logits_indices,
                    host_.num_logits, out.data, stream_);
}

void CudaBackend::copy_blocks(Tensor& cache, const std::vector<BlockCopy>& copies) {
  if (copies.empty()) return;
  const int64_t block_bytes = static_cast<int64_t>(cache.nbytes()) / cache.dim(0);
  uint8_t* base = static_cast<uint8_t*>(cache.data);
  // A destination that is also a source makes the order matter: copy one by one.
  bool chained = block_bytes % 16 != 0;
  for (const BlockCopy& a : copies)
    for (const BlockCopy& c : copies) chained = chained || a.dst == c.src;
  if (chained) {
    for (const BlockCopy& c : copies)
      CUDA_CHECK(cudaMemcpyAsync(base + c.dst * block_bytes, base + c.src * block_bytes, block_bytes,
                                 cudaMemcpyDeviceToDevice, stream_));
    return;
  }
  const bool same = copies.size() == last_copies_.size() &&
                    std::equal(copies.begin(), copies.end(), last_copies_.begin(),
                               [](const BlockCopy& a, const BlockCopy& b) { return a.src == b.src && a.dst == b.dst; });
  if (!same) {
    int2* h = reinterpret_cast<int2*>(copies_.host(copies.size() * sizeof(int2)));
    for (size_t i = 0; i < copies.size(); ++i) h[i] = make_int2(copies[i].src, copies[i].dst);
    copies_.upload(copies.size() * sizeof(int2), stream_);
    last_copies_ = copies;
  }
  cuda::copy_blocks(base, block_bytes, reinterpret_cast<const int2*>(copies_.device()),
                    static_cast<int>(copies.size()), stream_);
}

void CudaBackend::to_host(const Tensor& src, int64_t numel, float* dst) {
  require(src.dtype == ScalarType::F32, "to_host: fp32 source");
  if (numel > 0)
    CUDA_CHECK(cudaMemcpyAsync(dst, src.data, static_cast<size_t>(numel) * 4, cudaMemcpyDeviceToHost, stream_));
  CUDA_CHECK(cudaStreamSynchronize(stream_));
}

void CudaBackend::argmax(const Tensor& logits, int64_t rows, int32_t* out) {
  require(logits.dtype == ScalarType::F32 && rows <= logits.dim(0), "argmax: fp32 logits rows");
  if (rows == 0) return;
  const size_t bytes = static_cast<size_t>(rows) * 4, scratch = static_cast<size_t>(rows) * kArgmaxParts * 8;
  // device: the picks, then the kernel's scratch; only the picks come back
  int32_t* h = reinterpret_cast<int32_t*>(picks_.host(align16(bytes) + scratch));  // waits for the previous use
  argmax_rows(logits.as<float>(), rows, logits.dim(1), reinterpret_cast<int32_t*>(picks_.device()),
              picks_.device() + align16(bytes), stream_);
  CUDA_CHECK(cudaMemcpyAsync(h, picks_.device(), bytes, cudaMemcpyDeviceToHost, stream_));
  CUDA_CHECK(cudaStreamSynchronize(stream_));
  std::memcpy(out, h, bytes);
}

void CudaBackend::download(const Tensor& src, void* dst) {
  CUDA_CHECK(cudaMemcpyAsync(dst, src.data, src.nbytes(), cudaMemcpyDeviceToHost, stream_));
  CUDA_CHECK(cudaStreamSynchronize(stream_));
}

}  // namespace pagedrt::cuda
