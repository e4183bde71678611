// backend/cuda/cuda_backend.cu — the CUDA backend: the factory, staging
// buffers, device memory and weights. The step's plan and recorded steps are
// in cuda_step.cu, the ops in cuda_ops.cu.
#include "backend/cuda/cuda_backend.hpp"

#include <algorithm>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "backend/cuda/cuda_check.hpp"
#include "backend/cuda/cuda_factory.hpp"
#include "backend/cuda/nccl.hpp"
#include "backend/cuda/fp8_rows.hpp"
#include "backend/cuda/launch.cuh"

namespace pagedrt::cuda {
namespace {

constexpr size_t kLoadChunk = 16u << 20;  // weight upload chunk (bytes)

// A switch that is on unless the environment sets it to "0" (A/B runs).
bool env_on(const char* name) {
  const char* v = std::getenv(name);
  return !(v && std::strcmp(v, "0") == 0);
}

int elem_kind(WeightView::Type t) {
  switch (t) {
    case WeightView::Type::F32: return static_cast<int>(Elem::F32);
    case WeightView::Type::F16: return static_cast<int>(Elem::F16);
    case WeightView::Type::BF16: return static_cast<int>(Elem::BF16);
    case WeightView::Type::F8E4M3: break;  // no fp8 weights here (has_fp8_weights() is false)
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

std::unique_ptr<Backend> make_backend(ScalarType activation_dtype, int device_index, bool deterministic) {
  const int gpus = device_count();
  if (gpus == 0)
    throw Error(ErrorKind::Unsupported, "device 'cuda': no CUDA GPU is visible to this process");
  if (device_index >= gpus)
    throw Error(ErrorKind::InvalidArgument, "device 'cuda': no GPU " + std::to_string(device_index) + " (" +
                                                std::to_string(gpus) + " visible)");
  if (activation_dtype != ScalarType::BF16 && activation_dtype != ScalarType::F32)
    throw Error(ErrorKind::Unsupported, std::string("device 'cuda': activation dtype ") +
                                            scalar_name(activation_dtype) + " (supported: bfloat16, float32)");
  return std::make_unique<CudaBackend>(activation_dtype, device_index, deterministic);
}

std::vector<std::unique_ptr<Collectives>> make_collectives(const std::vector<Backend*>& ranks) {
  std::vector<CudaBackend*> cuda;
  for (Backend* b : ranks) {
    auto* c = dynamic_cast<CudaBackend*>(b);
    if (c == nullptr) throw Error(ErrorKind::Runtime, "make_collectives: a rank that is not on a CUDA backend");
    cuda.push_back(c);
  }
  return nccl_collectives(cuda);
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

CudaBackend::CudaBackend(ScalarType activation_dtype, int device_index, bool deterministic)
    : deterministic_(deterministic), act_(activation_dtype) {
  if (device_index >= 0) CUDA_CHECK(cudaSetDevice(device_index));
  CUDA_CHECK(cudaGetDevice(&device_));
  cudaDeviceProp prop;
  CUDA_CHECK(cudaGetDeviceProperties(&prop, device_));
  if (prop.major < 8)
    throw Error(ErrorKind::Unsupported, std::string("device 'cuda': ") + prop.name + " has compute capability " +
                                            std::to_string(prop.major) + "." + std::to_string(prop.minor) +
                                            "; this build runs on sm_90 (Hopper)");
  num_sms_ = prop.multiProcessorCount;
  fp8_weights_ = act_ == ScalarType::BF16 && (prop.major > 8 || (prop.major == 8 && prop.minor >= 9));
  graphs_enabled_ = env_on("PAGEDRT_CUDA_GRAPHS");
  if (const char* g = std::getenv("PAGEDRT_GRAPH_LOG")) graph_log_ = std::string(g) == "1";
  if (const char* w = std::getenv("PAGEDRT_GRAPH_RECORD_WINDOW")) {
    char* end = nullptr;
    const long long v = std::strtoll(w, &end, 10);
    if (end == w || *end != '\0' || v < 0)
      throw Error(ErrorKind::InvalidArgument,
                  std::string("PAGEDRT_GRAPH_RECORD_WINDOW='") + w + "': a number of steps, 0 or more");
    record_window_ = static_cast<uint64_t>(v);
  }
  // Padded decode steps whether or not they are recorded: graphs on and off
  // then run the same GEMM shapes and stay bitwise alike.
  set_decode_padding(true);
  clusters_ = prop.major >= 9 && env_on("PAGEDRT_DECODE_CLUSTERS");
  fuse_ = env_on("PAGEDRT_CUDA_FUSE");
  gemv_quant_x_ = fuse_ && env_on("PAGEDRT_FP8_GEMV_QUANT");
  sample_ = env_on("PAGEDRT_CUDA_SAMPLE");
  if (const char* k = std::getenv("PAGEDRT_DECODE_KERNEL")) {  // "cc", or "WxS": warps x stages
    int w = 0, st = 0;
    if (std::string(k) == "cc") {
      decode_kernel_ = DecodeKernel::CudaCores;
    } else if (std::sscanf(k, "%dx%d", &w, &st) == 2 && (w == 2 || w == 4) && st >= 2 && st <= 8) {
      decode_config_ = DecodeConfig{w, st};
      decode_kernel_ = DecodeKernel::TensorCores;
    } else {
      std::fprintf(stderr, "pagedrt: PAGEDRT_DECODE_KERNEL=%s is neither cc nor WxS (W 2 or 4, S 2 to 8); "
                           "choosing per step\n", k);
    }
  }
  if (const char* g = std::getenv("PAGEDRT_GATE_TIMING")) gate_timing_ = std::string(g) == "1";
  if (const char* n = std::getenv("PAGEDRT_DECODE_SPLITS")) {  // splits of every decode context (benchmarks)
    const int v = std::atoi(n);
    if (v >= 1 && v <= 256)
      decode_splits_ = v;
    else
      std::fprintf(stderr, "pagedrt: PAGEDRT_DECODE_SPLITS=%s is not a count from 1 to 256; choosing per step\n", n);
  }
  if (const char* g = std::getenv("PAGEDRT_DECODE_GRID")) {  // the decode grid's order (A/B runs)
    if (std::string(g) == "items" || std::string(g) == "heads")
      decode_heads_first_ = std::string(g) == "heads";
    else
      std::fprintf(stderr, "pagedrt: PAGEDRT_DECODE_GRID=%s is neither heads nor items; kv heads innermost\n", g);
  }
  if (const char* o = std::getenv("PAGEDRT_PREFILL_DEAL")) {  // a prompt's prefill tiles' deal (A/B runs)
    if (std::string(o) == "rounds" || std::string(o) == "snake")
      prefill_snake_ = std::string(o) == "snake";
    else
      std::fprintf(stderr, "pagedrt: PAGEDRT_PREFILL_DEAL=%s is neither snake nor rounds; a snake\n", o);
  }
  if (const char* r = std::getenv("PAGEDRT_PREFILL_ROWS")) {
    if (std::string(r) == "64" || std::string(r) == "128")
      prefill_rows_ = std::atoi(r);
    else
      std::fprintf(stderr, "pagedrt: PAGEDRT_PREFILL_ROWS=%s is neither 64 nor 128; choosing by head dim\n", r);
  }
  prefill_wgmma_ = prop.major == 9 && prop.minor == 0 && prefill_wgmma_built();
  if (const char* k = std::getenv("PAGEDRT_PREFILL_KERNEL")) {
    const std::string kernel = k;
    if (kernel == "mma")
      prefill_wgmma_ = false;
    else if (kernel != "wgmma" && kernel != "ws")
      std::fprintf(stderr, "pagedrt: PAGEDRT_PREFILL_KERNEL=%s is none of mma, wgmma, ws; choosing by device\n", k);
    else if (!prefill_wgmma_)
      std::fprintf(stderr, "pagedrt: PAGEDRT_PREFILL_KERNEL=%s needs an sm_90 GPU and a build for 90a; using mma\n",
                   k);
    prefill_ws_ = kernel != "wgmma";
  }
  if (const char* st = std::getenv("PAGEDRT_PREFILL_STAGES")) {
    if (std::string(st) == "2" || std::string(st) == "3")
      prefill_stages_ = std::atoi(st);
    else
      std::fprintf(stderr, "pagedrt: PAGEDRT_PREFILL_STAGES=%s is neither 2 nor 3; using 2\n", st);
  }
  set_pdl(env_on("PAGEDRT_CUDA_PDL"));
  CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  gemm_ = std::make_unique<Gemm>(stream_, deterministic_);
  CUDA_CHECK(cudaEventCreateWithFlags(&step_end_, cudaEventDisableTiming));
  for (int i = 0; i < 2; ++i) {
    CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&load_host_[i]), kLoadChunk, cudaHostAllocDefault));
    CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&load_dev_[i]), kLoadChunk));
    CUDA_CHECK(cudaEventCreateWithFlags(&load_done_[i], cudaEventDisableTiming));
  }
}

CudaBackend::~CudaBackend() {
  int current = device_;
  cudaGetDevice(&current);
  cudaSetDevice(device_);  // a tensor-parallel rank's may be destroyed on another rank's thread
  if (gate_flag_) *gate_flag_ = gate_queued_;  // a gated copy nobody will open (the engine is gone) passes
  if (stream_) cudaStreamSynchronize(stream_);
  if (!gate_ms_.empty()) {
    for (int k = 0; k < 3; ++k) {
      std::vector<float> v;
      for (const auto& g : gate_ms_) v.push_back(g[k]);
      std::sort(v.begin(), v.end());
      std::fprintf(stderr, "pagedrt: gated steps %zu, %s median %.3f ms (p10 %.3f, p90 %.3f)\n", v.size(),
                   k == 0 ? "forward (results to wait)" : k == 1 ? "stall (wait and copy)" : "picks (copy to results)",
                   v[v.size() / 2], v[v.size() / 10], v[v.size() * 9 / 10]);
    }
  }
  for (auto& e : gate_events_)
    for (auto& v : e) cudaEventDestroy(v);
  clear_graphs();
  for (int i = 0; i < 2; ++i) {
    if (load_done_[i]) cudaEventDestroy(load_done_[i]);
    if (load_host_[i]) cudaFreeHost(load_host_[i]);
    if (load_dev_[i]) cudaFree(load_dev_[i]);
    if (results_done_[i]) cudaEventDestroy(results_done_[i]);
  }
  if (step_end_) cudaEventDestroy(step_end_);
  if (gate_copied_) cudaEventDestroy(gate_copied_);
  if (gate_host_) cudaFreeHost(gate_host_);
  if (gate_dev_) cudaFree(gate_dev_);
  if (gate_flag_) cudaFreeHost(const_cast<uint32_t*>(gate_flag_));
  if (partials_) cudaFree(partials_);
  if (fp8_scratch_) cudaFree(fp8_scratch_);
  if (fp8_act_) cudaFree(fp8_act_);
  gemm_.reset();
  if (stream_) cudaStreamDestroy(stream_);
  cudaSetDevice(current);  // the caller's, as it was
}

void CudaBackend::mark_step_end() { CUDA_CHECK(cudaEventRecord(step_end_, stream_)); }

bool CudaBackend::step_finished() {
  const cudaError_t e = cudaEventQuery(step_end_);  // an event of another GPU than the current is fine
  if (e == cudaSuccess) return true;
  if (e == cudaErrorNotReady) return false;
  cudaGetLastError();
  throw Error(ErrorKind::Runtime, "GPU " + std::to_string(device_) + ": " + cudaGetErrorString(e));
}

int64_t CudaBackend::memory_free() const {
  size_t free = 0, total = 0;
  CUDA_CHECK(cudaMemGetInfo(&free, &total));
  return static_cast<int64_t>(free);
}

void CudaBackend::synchronize() { CUDA_CHECK(cudaStreamSynchronize(stream_)); }

void CudaBackend::make_current() { CUDA_CHECK(cudaSetDevice(device_)); }

void CudaBackend::forget_steps() {
  int current = device_;
  cudaGetDevice(&current);
  cudaSetDevice(device_);
  clear_graphs();
  cudaSetDevice(current);
}

void CudaBackend::check_attention(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim) const {
  const int64_t group = num_heads / num_kv_heads;
  if (!attention_supported(static_cast<int>(head_dim), static_cast<int>(group)))
    throw Error(ErrorKind::Unsupported,
                "device 'cuda': attention with head_dim " + std::to_string(head_dim) + " and " +
                    std::to_string(group) + " query heads per kv head has no CUDA kernel (supported: "
                    "head_dim 64 or 128, 1 to 8 query heads per kv head); use device=\"cpu\"");
}

Tensor CudaBackend::empty(std::vector<int64_t> shape, ScalarType dtype) {
  // A new tensor may take a freed one's address: a norm's codes pending for
  // that address would be taken for its contents (op-level callers allocate
  // between ops; a step's forward allocates nothing).
  fp8_pending_ = {};
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
  if (dtype == ScalarType::F8E4M3) return load_fp8_weight(parts);
  require(dtype == ScalarType::BF16 || dtype == ScalarType::F32, "weights load as bf16, fp32 or fp8");
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
  if (deterministic_ && shape.size() == 2) gemm_->pin(shape[0], shape[1], dtype == ScalarType::F32);
  return t;
}

// Codes of fp8 parts are copied with their scales; the others go up as fp32
// (a part at a time) and are quantized per row there, as the CPU would.
Tensor CudaBackend::load_fp8_weight(const std::vector<WeightView>& parts) {
  require(fp8_weights_, "load_weight: fp8 weights need bf16 activations on an sm_89+ GPU");
  int64_t rows = 0;
  for (const WeightView& p : parts) rows += p.shape[0];
  const int64_t k = parts[0].shape[1];
  if (!fp8_shape_ok(rows, k))  // 16-byte rows of codes; cuBLASLt's fp8 layouts
    throw Error(ErrorKind::Unsupported, "device 'cuda': fp8 weights need both dimensions a multiple of 16 elements; "
                                        "a weight of shape (" + std::to_string(rows) + ", " + std::to_string(k) +
                                        ") is not (use quantization=\"\" or device=\"cpu\")");
  Tensor t = empty({rows, k}, ScalarType::F8E4M3);
  t.row_scale = std::make_shared<Tensor>(empty({rows}, ScalarType::F32));
  uint8_t* codes = t.as<uint8_t>();
  float* scale = t.row_scale->as<float>();
  for (const WeightView& p : parts) {
    const int64_t n = p.shape[0];
    if (p.type == WeightView::Type::F8E4M3) {
      upload_chunked(static_cast<const uint8_t*>(p.data), static_cast<size_t>(n * k), codes, -1, -1, 1);
      CUDA_CHECK(cudaMemcpyAsync(scale, p.row_scale, static_cast<size_t>(n) * 4, cudaMemcpyHostToDevice, stream_));
    } else {
      Tensor values = empty({n, k}, ScalarType::F32);
      upload_chunked(static_cast<const uint8_t*>(p.data), p.nbytes(), values.as<uint8_t>(), elem_kind(p.type),
                     static_cast<int>(Elem::F32), p.element_size());
      quantize_weight_rows(values.as<float>(), codes, scale, n, k, stream_);
      CUDA_CHECK(cudaStreamSynchronize(stream_));  // before `values` is freed
    }
    codes += n * k;
    scale += n;
  }
  CUDA_CHECK(cudaStreamSynchronize(stream_));  // the mapping may close after this returns
  fp8_max_k_ = std::max(fp8_max_k_, k);
  return t;
}

void CudaBackend::ensure_fp8_act(int64_t n, int64_t k) {
  const size_t need = fp8_act_size(n, k);
  if (need <= fp8_act_bytes_) return;
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  CUDA_CHECK(cudaStreamIsCapturing(stream_, &capture));
  require(capture == cudaStreamCaptureStatusNone, "fp8 linear: the activation scratch outgrew a recorded step");
  if (fp8_act_) CUDA_CHECK(cudaFree(fp8_act_));  // waits for the GPU
  fp8_act_ = nullptr;
  fp8_act_bytes_ = 0;
  clear_graphs();  // a new buffer at the old address would match their keys
  CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&fp8_act_), need + need / 2));
  fp8_act_bytes_ = need + need / 2;
}

const uint8_t* CudaBackend::quantize_act(const Tensor& x, int64_t n, int64_t k, const float** scale) {
  require(x.dtype == ScalarType::BF16 && x.dim(1) == k, "linear: fp8 weights take bf16 x of their k columns");
  const bool ready = fp8_codes_pending(x, n, k);
  fp8_pending_ = {};
  const uint8_t* before = fp8_act_;
  ensure_fp8_act(n, k);
  require(!ready || fp8_act_ == before, "fp8 linear: the activation scratch moved under a norm's codes");
  float* s = reinterpret_cast<float*>(fp8_act_ + fp8_act_scale_offset(n, k));
  if (ready)
    ++fp8_codes_taken_;  // the norm or silu_mul wrote them
  else
    quantize_act_rows(x.as<bf16>(), fp8_act_, s, n, k, stream_);
  *scale = s;
  return fp8_act_;
}

Fp8Out CudaBackend::fp8_norm_out(const Tensor& out, int64_t n, int64_t d) const {
  if (!fuse_ || fp8_max_k_ == 0 || out.dtype != ScalarType::BF16 || fp8_act_ == nullptr ||
      fp8_act_size(n, d) > fp8_act_bytes_)
    return {};
  return Fp8Out{fp8_act_, reinterpret_cast<float*>(fp8_act_ + fp8_act_scale_offset(n, d))};
}

}  // namespace pagedrt::cuda
