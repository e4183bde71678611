// runtime.cpp — the public Runtime: checks at the boundary, then the engine.
#include "pagedrt/runtime.hpp"

#include <sys/stat.h>

#include <algorithm>
#include <limits>
#include <sstream>
#include <cmath>
#include <atomic>

#include "backend/collectives.hpp"
#include "backend/factory.hpp"
#include "backend/team.hpp"
#include "engine/engine.hpp"
#include "engine/rank_threads.hpp"
#include "model/tp_plan.hpp"
#include "io/json.hpp"
#include "sampling_check.hpp"

namespace pagedrt {
namespace {

constexpr int64_t kDefaultCpuKvBytes = 512ll << 20;

[[noreturn]] void bad_arg(const std::string& msg) { throw Error(ErrorKind::InvalidArgument, msg); }

bool file_exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

// `path` (RuntimeConfig field `what`) is a folder with a config.json.
void check_model_folder(const std::string& path, const std::string& what) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) bad_arg(what + " '" + path + "' is not a folder");
  if (!file_exists(path + "/config.json")) throw Error(ErrorKind::InvalidModel, path + ": config.json is missing");
}

std::string shortest(double v) {  // 0.5, not std::to_string's 0.500000
  std::ostringstream os;
  os << v;
  return os.str();
}

void check_config(const RuntimeConfig& c) {
  if (c.model_path.empty()) bad_arg("model_path is empty");
  check_model_folder(c.model_path, "model path");
  if (c.block_size < 1 || c.block_size > 1024) bad_arg("block_size must be in [1, 1024], got " + std::to_string(c.block_size));
  if (c.max_num_seqs < 1) bad_arg("max_num_seqs must be >= 1, got " + std::to_string(c.max_num_seqs));
  if (c.max_num_batched_tokens < 1)
    bad_arg("max_num_batched_tokens must be >= 1, got " + std::to_string(c.max_num_batched_tokens));
  if (c.max_model_len < 0) bad_arg("max_model_len must be >= 0, got " + std::to_string(c.max_model_len));
  if (c.kv_cache_bytes < 0) bad_arg("kv_cache_bytes must be >= 0, got " + std::to_string(c.kv_cache_bytes));
  if (!(c.gpu_memory_utilization > 0.0 && c.gpu_memory_utilization <= 1.0))
    bad_arg("gpu_memory_utilization must be in (0, 1], got " + std::to_string(c.gpu_memory_utilization));
  if (c.num_threads < 0) bad_arg("num_threads must be >= 0, got " + std::to_string(c.num_threads));
  if (!preemption_mode_of(c.preemption_mode))
    bad_arg("preemption_mode '" + c.preemption_mode + "' is not known (use \"recompute\", \"swap\" or \"auto\")");
  if (!(c.kv_idle_release_s >= 0.0 && c.kv_idle_release_s <= 1e6))  // NaN and inf too
    bad_arg("kv_idle_release_s must be in [0, 1e6] (seconds; 0: never give KV memory back), got " +
            shortest(c.kv_idle_release_s));
  if (c.async_scheduling != "auto" && c.async_scheduling != "on" && c.async_scheduling != "off")
    bad_arg("async_scheduling '" + c.async_scheduling + "' is not known (use \"auto\", \"on\" or \"off\")");
  if (c.swap_space_bytes < 0) bad_arg("swap_space_bytes must be >= 0, got " + std::to_string(c.swap_space_bytes));
  if (!(c.kv_watermark >= 0.0 && c.kv_watermark < 0.5))  // NaN too
    bad_arg("kv_watermark must be in [0, 0.5) (a fraction of the KV pool's blocks), got " +
            shortest(c.kv_watermark));
  if (c.dtype != "auto" && c.dtype != "float32" && c.dtype != "bfloat16")
    bad_arg("dtype '" + c.dtype + "' is not known (use \"auto\", \"float32\" or \"bfloat16\")");
  if (c.activation_dtype != "auto" && c.activation_dtype != "float32" && c.activation_dtype != "bfloat16")
    bad_arg("activation_dtype '" + c.activation_dtype +
            "' is not known (use \"auto\", \"float32\" or \"bfloat16\")");
  if (!c.quantization.empty() && c.quantization != "fp8")
    bad_arg("quantization '" + c.quantization + "' is not known (use \"\" for none or \"fp8\")");
  if (c.kv_cache_dtype == "fp8_e5m2")
    throw Error(ErrorKind::Unsupported,
                "kv_cache_dtype 'fp8_e5m2': pagedrt stores fp8 KV as e4m3 with a scale per token and kv head "
                "(use \"fp8\")");
  if (c.kv_cache_dtype != "auto" && c.kv_cache_dtype != "fp8" && c.kv_cache_dtype != "fp8_e4m3")
    bad_arg("kv_cache_dtype '" + c.kv_cache_dtype + "' is not known (use \"auto\" or \"fp8\")");
  if (c.tensor_parallel_size != 1 && c.tensor_parallel_size != 2 && c.tensor_parallel_size != 4 &&
      c.tensor_parallel_size != 8)
    bad_arg("tensor_parallel_size must be 1, 2, 4 or 8, got " + std::to_string(c.tensor_parallel_size));
  if (c.kv_cache_dtype != "auto" && !fp8_block_size_ok(c.block_size))
    bad_arg("kv_cache_dtype '" + c.kv_cache_dtype + "' needs a block_size that is a power of two or a multiple of "
            "16, got " + std::to_string(c.block_size));
}

// The KV pool: kv_cache_bytes when given; on a GPU, gpu_memory_utilization of
// the memory free after the weights, less a reserve for the activations
// (1 MiB per batched token: activations and a logits row of a large vocabulary).
int64_t kv_budget(const RuntimeConfig& c, const Backend& backend) {
  if (c.kv_cache_bytes > 0) return c.kv_cache_bytes;
  const int64_t free = backend.memory_free();
  if (free < 0) return kDefaultCpuKvBytes;
  const int64_t reserve = (256ll << 20) + static_cast<int64_t>(c.max_num_batched_tokens) * (1ll << 20);
  const int64_t budget = static_cast<int64_t>(static_cast<double>(free) * c.gpu_memory_utilization) - reserve;
  if (budget <= 0)
    throw Error(ErrorKind::InvalidArgument,
                "no GPU memory left for the KV cache after the weights (" + std::to_string(free >> 20) +
                    " MiB free, gpu_memory_utilization " + std::to_string(c.gpu_memory_utilization) + ")");
  return budget;
}

std::string resolve_device(const std::string& device) {
  if (device == "auto") return cuda_available() ? "cuda" : "cpu";
  return device;
}

// config.json's torch_dtype decides "auto": fp32 checkpoints stay fp32, the rest run bf16
// (fp8 checkpoints too: their weights are dequantized at load, model/quantization.hpp).
ScalarType resolve_dtype(const std::string& dtype, const LlamaConfig& cfg) {
  if (dtype == "float32") return ScalarType::F32;
  if (dtype == "bfloat16") return ScalarType::BF16;
  if (cfg.quant.any()) return ScalarType::BF16;
  return (cfg.torch_dtype == "float32" || cfg.torch_dtype.empty()) ? ScalarType::F32 : ScalarType::BF16;
}

// eos ids of config.json, plus those of generation_config.json when present.
std::vector<int32_t> eos_ids(const LlamaConfig& cfg, const std::string& model_path) {
  std::vector<int32_t> ids = cfg.eos_token_ids;
  const std::string gen = model_path + "/generation_config.json";
  if (!file_exists(gen)) return ids;
  json::Value root = json::parse_file(gen);
  const json::Value* eos = root.find("eos_token_id");
  if (eos == nullptr || eos->is_null()) return ids;
  std::vector<json::Value> items = eos->is_array() ? eos->as_array(gen) : std::vector<json::Value>{*eos};
  for (const json::Value& v : items) {
    int64_t id = v.as_int(gen + ": field 'eos_token_id'");
    if (id < 0 || id >= cfg.vocab_size)
      throw Error(ErrorKind::InvalidModel, gen + ": eos_token_id " + std::to_string(id) + " is outside the vocabulary");
    if (std::find(ids.begin(), ids.end(), id) == ids.end()) ids.push_back(static_cast<int32_t>(id));
  }
  return ids;
}

// The draft model's config.json, checked against the model's: the same
// vocabulary (a draft proposes token ids the model verifies).
LlamaConfig draft_config(const std::string& dir, const LlamaConfig& target) {
  check_model_folder(dir, "draft_model");
  LlamaConfig d = LlamaConfig::from_file(dir + "/config.json");
  if (d.vocab_size != target.vocab_size)
    bad_arg("draft_model '" + dir + "': vocab_size " + std::to_string(d.vocab_size) + " differs from the model's " +
            std::to_string(target.vocab_size) + "; a draft model must share the model's tokenizer");
  return d;
}

}  // namespace

const char* finish_reason_name(FinishReason reason) {
  switch (reason) {
    case FinishReason::None: return "";
    case FinishReason::Stop: return "stop";
    case FinishReason::Length: return "length";
    case FinishReason::Abort: return "abort";
    case FinishReason::Error: return "error";
  }
  return "";
}

struct Runtime::Impl {
  RuntimeConfig config;
  ModelInfo info;
  std::unique_ptr<Engine> engine;
  std::atomic<uint64_t> next_id{0};
};

Runtime::Runtime(const RuntimeConfig& config) : impl_(std::make_unique<Impl>()) {
  check_config(config);
  Impl& m = *impl_;
  m.config = config;
  m.config.on_load_progress = nullptr;  // used only while constructing
  const std::string device = resolve_device(config.device);
  const LlamaConfig cfg = LlamaConfig::from_file(config.model_path + "/config.json");
  ScalarType wdtype = resolve_dtype(config.dtype, cfg);
  ScalarType act = config.activation_dtype == "float32"    ? ScalarType::F32
                   : config.activation_dtype == "bfloat16" ? ScalarType::BF16
                                                           : auto_activation_dtype(device, wdtype);
  if (device == "cuda") {
    // The CUDA kernels run bf16 weights with bf16 activations (auto, also for
    // fp32 checkpoints), or fp32 throughout (dtype "float32": validation).
    wdtype = config.dtype == "float32" ? ScalarType::F32 : ScalarType::BF16;
    if (config.activation_dtype != "auto" && act != wdtype)
      throw Error(ErrorKind::Unsupported,
                  "activation_dtype '" + config.activation_dtype + "' with " + scalar_name(wdtype) +
                      " weights on device 'cuda': the CUDA backend runs bf16 weights with bf16 activations, or "
                      "fp32 throughout (dtype=\"float32\")");
    act = wdtype;
  }
  const bool deterministic = config.deterministic.value_or(
      auto_deterministic(device, wdtype, act, config.quantization == "fp8" || cfg.quant.any()));
  const int tp = config.tensor_parallel_size;
  // CUDA's batch-invariant mode (CudaBackend) covers bf16 and fp32 weights
  // and caches on one GPU: fp8 GEMMs have no pinned algorithm, the fp8
  // cache's decode kernels no tile-for-tile twin of prefill, and NCCL picks
  // its all-reduce's order by message size, i.e. by the batch.
  auto refuse_deterministic = [&](const std::string& what, const std::string& why) {
    throw Error(ErrorKind::Unsupported, "deterministic=True with " + what + " on device 'cuda': " + why +
                                            " (docs/determinism.md)");
  };
  if (deterministic && device == "cuda") {
    if (config.quantization == "fp8")
      refuse_deterministic("quantization 'fp8'", "fp8 GEMMs have no batch-invariant algorithm");
    if (config.kv_cache_dtype != "auto")
      refuse_deterministic("kv_cache_dtype '" + config.kv_cache_dtype + "'",
                           "the fp8 cache's decode kernels sum in another order than its prefill");
    if (tp > 1)
      refuse_deterministic("tensor_parallel_size " + std::to_string(tp),
                           "NCCL chooses its all-reduce's summation order by message size, i.e. by the batch");
  }
  if (!config.devices.empty() && device != "cuda")
    bad_arg("devices names GPUs (the ranks' on device 'cuda'); device is '" + device + "'");
  if (!config.devices.empty() && static_cast<int>(config.devices.size()) != tp)
    bad_arg("devices has " + std::to_string(config.devices.size()) + " GPUs for tensor_parallel_size " +
            std::to_string(tp) + ": one a rank");
  if (device == "cuda" && cuda_built()) {
    const int visible = cuda_device_count();
    if (config.devices.empty() && tp > 1 && tp > visible)
      bad_arg("tensor_parallel_size " + std::to_string(tp) + " needs " + std::to_string(tp) + " GPUs; " +
              std::to_string(visible) + " visible (CUDA_VISIBLE_DEVICES)");
    for (size_t r = 0; r < config.devices.size(); ++r) {
      const int d = config.devices[r];
      if (d < 0 || d >= visible)
        bad_arg("devices[" + std::to_string(r) + "] is GPU " + std::to_string(d) + "; " + std::to_string(visible) +
                " visible (CUDA_VISIBLE_DEVICES): 0 to " + std::to_string(visible - 1));
      for (size_t q = 0; q < r; ++q)
        if (config.devices[q] == d) bad_arg("devices names GPU " + std::to_string(d) + " twice: one rank a GPU");
    }
  }
  if (tp > 1 && device == "cuda" && config.async_scheduling == "on")
    throw Error(ErrorKind::Unsupported, "async_scheduling 'on' with tensor_parallel_size " + std::to_string(tp) +
                                            " on CUDA: the ranks take each step's tokens from the host");
  if (tp > 1 && !config.draft_model.empty())
    throw Error(ErrorKind::Unsupported, "draft_model with tensor_parallel_size " + std::to_string(tp) +
                                            ": a draft model runs on one device; use speculative=\"ngram\"");
  const TpPlan plan = TpPlan::make(cfg, 0, tp);  // throws naming the config field tp does not divide
  // Each rank's backend: on the CPU a share of the threads, on CUDA a GPU
  // (rank r: the r-th visible).
  const int cores = host_processors();
  const int rank_threads = tp == 1 || device != "cpu"
                               ? config.num_threads
                               : std::max(1, (config.num_threads > 0 ? config.num_threads : cores) / tp);
  // the GPU of rank r: devices[r], or the r-th visible (one rank: the current GPU)
  auto gpu_of = [&](int r) { return !config.devices.empty() ? config.devices[static_cast<size_t>(r)] : tp > 1 ? r : -1; };
  auto rank_backend = [&](int r) {
    std::unique_ptr<Backend> b = make_backend(device, rank_threads, act, deterministic, gpu_of(r));
    b->use_fp8_kv(config.kv_cache_dtype != "auto");
    b->share_host(tp);
    return b;
  };
  std::unique_ptr<Backend> backend = rank_backend(0);
  if (config.quantization == "fp8" && !backend->has_fp8_weights())
    throw Error(ErrorKind::Unsupported, "quantization 'fp8' on device '" + device +
                                            "': its fp8 GEMMs need bfloat16 activations on an sm_89 or newer GPU (the CPU runs fp8 weights "
                                            "with either activation dtype)");
  // fp8 projections: asked for, or an fp8 checkpoint's (scales per tensor or per channel) on a backend that runs them
  auto fp8_projections = [&](const LlamaConfig& c) {
    if (config.quantization == "fp8") return Fp8Projections::All;
    return c.quant.any() && c.quant.block_rows == 0 && backend->has_fp8_weights() ? Fp8Projections::Checkpoint
                                                                                : Fp8Projections::None;
  };
  if (deterministic && device == "cuda" && fp8_projections(cfg) != Fp8Projections::None)
    refuse_deterministic("the fp8 checkpoint '" + config.model_path + "'",
                         "fp8 GEMMs have no batch-invariant algorithm, and CUDA runs an fp8 checkpoint's "
                         "projections in fp8");
  if (config.kv_cache_dtype != "auto" && device == "cuda" && (act != ScalarType::BF16 || config.block_size % 4 != 0))
    throw Error(ErrorKind::Unsupported,
                "kv_cache_dtype '" + config.kv_cache_dtype + "' on device 'cuda' needs bf16 activations and a "
                "block_size that is a multiple of 4 (got " + scalar_name(act) + ", " +
                std::to_string(config.block_size) + ")");
  int64_t max_len = cfg.max_position_embeddings;
  if (config.max_model_len > 0) {
    if (config.max_model_len > cfg.max_position_embeddings)
      bad_arg("max_model_len " + std::to_string(config.max_model_len) +
              " exceeds the model's max_position_embeddings " + std::to_string(cfg.max_position_embeddings));
    max_len = config.max_model_len;
  }
  std::unique_ptr<LlamaModel> model;
  TensorParallel ranks;
  if (tp == 1) {
    model = std::make_unique<LlamaModel>(cfg, config.model_path, *backend, wdtype, max_len, config.on_load_progress,
                                         fp8_projections(cfg));
    model->warm_up(config.max_num_batched_tokens, config.max_num_seqs);
  } else {  // every rank loads its shard at once, on a thread of its own
    ranks.peers.resize(static_cast<size_t>(tp - 1));
    std::vector<Backend*> all{backend.get()};
    for (int r = 1; r < tp; ++r) {
      ranks.peers[static_cast<size_t>(r - 1)].backend = rank_backend(r);
      all.push_back(ranks.peers[static_cast<size_t>(r - 1)].backend.get());
    }
    ranks.comms = make_collectives(device, all, ranks.group);
    std::vector<std::unique_ptr<LlamaModel>> models(static_cast<size_t>(tp));
    RankThreads(tp).run(
        [&](int r) {
          Backend& b = *all[static_cast<size_t>(r)];
          b.make_current();
          models[static_cast<size_t>(r)] = std::make_unique<LlamaModel>(
              cfg, config.model_path, b, wdtype, max_len,
              r == 0 ? config.on_load_progress : std::function<void(int64_t, int64_t)>{}, fp8_projections(cfg),
              TpPlan::make(cfg, r, tp), ranks.comms[static_cast<size_t>(r)].get());
          models[static_cast<size_t>(r)]->warm_up(config.max_num_batched_tokens, config.max_num_seqs);
        },
        [] {});
    model = std::move(models[0]);
    for (int r = 1; r < tp; ++r) ranks.peers[static_cast<size_t>(r - 1)].model = std::move(models[static_cast<size_t>(r)]);
    backend->make_current();  // the rest of the set-up is rank 0's, unless it says otherwise
  }
  DraftModel draft;
  LlamaConfig dcfg;
  if (!config.draft_model.empty()) {
    dcfg = draft_config(config.draft_model, cfg);
    draft.max_len = std::min<int64_t>(dcfg.max_position_embeddings, max_len);
    draft.model = std::make_unique<LlamaModel>(dcfg, config.draft_model, *backend, wdtype, draft.max_len,
                                               std::function<void(int64_t, int64_t)>{}, fp8_projections(dcfg));
    draft.model->warm_up(config.max_num_batched_tokens, config.max_num_seqs);
  }
  // One pool size for both caches: the draft's holds whatever the model's
  // holds. Tensor parallelism: each rank holds its kv heads' share of every
  // block: a 1/tp share of kv_cache_bytes, or on GPUs the budget of the one
  // with the least memory free.
  int64_t kv_bytes = kv_budget(config, *backend);
  if (tp > 1 && config.kv_cache_bytes == 0 && backend->memory_free() >= 0) {
    for (ModelRank& p : ranks.peers) {
      p.backend->make_current();
      kv_bytes = std::min(kv_bytes, kv_budget(config, *p.backend));
    }
    backend->make_current();
  } else {
    kv_bytes /= tp;
  }
  const LlamaConfig rank_cfg = plan.local(cfg);
  const int64_t block = KvCache::block_bytes(*backend, rank_cfg, config.block_size);
  const int64_t draft_block = draft.model ? KvCache::block_bytes(*backend, dcfg, config.block_size) : 0;
  const int64_t num_blocks = kv_bytes / (block + draft_block);
  KvCache kv = KvCache::allocate(*backend, rank_cfg, config.block_size, draft.model ? num_blocks * block : kv_bytes,
                                 config.elastic_kv);
  if (draft.model) draft.kv = KvCache::allocate(*backend, dcfg, config.block_size, kv.num_blocks * draft_block);
  for (ModelRank& p : ranks.peers) {  // as many blocks as rank 0's, in chunks alike
    p.backend->make_current();
    p.kv = KvCache::allocate(*p.backend, rank_cfg, config.block_size, kv.num_blocks * block,
                             config.elastic_kv && kv.memory != nullptr);  // chunks are mapped as rank 0's are
  }
  backend->make_current();
  const int64_t block_bytes = kv.bytes_per_block * tp;  // every rank's share of a block

  m.info.architecture = cfg.architecture;
  m.info.vocab_size = cfg.vocab_size;
  m.info.num_layers = cfg.num_layers;
  m.info.hidden_size = cfg.hidden_size;
  m.info.max_model_len = max_len;
  m.info.bos_token_id = cfg.bos_token_id;
  m.info.eos_token_ids = eos_ids(cfg, config.model_path);
  m.info.weight_dtype = fp8_projections(cfg) != Fp8Projections::None ? scalar_name(ScalarType::F8E4M3) : scalar_name(wdtype);
  m.info.quantization = cfg.quant.any() ? cfg.quant.method : config.quantization;
  m.info.activation_dtype = scalar_name(act);
  m.info.kv_cache_dtype = scalar_name(backend->kv_dtype());
  m.info.device = device;
  m.info.deterministic = deterministic;
  m.info.draft_model = config.draft_model;
  m.info.draft_num_layers = draft.model ? dcfg.num_layers : 0;
  m.info.tensor_parallel_size = tp;
  if (backend->device_index() >= 0) {
    m.info.devices.push_back(backend->device_index());
    for (const ModelRank& p : ranks.peers) m.info.devices.push_back(p.backend->device_index());
  }

  EngineConfig ec;
  ec.scheduler.max_num_seqs = config.max_num_seqs;
  ec.scheduler.max_num_batched_tokens = config.max_num_batched_tokens;
  ec.scheduler.max_model_len = max_len;
  ec.output.max_model_len = max_len;
  ec.output.eos_token_ids = m.info.eos_token_ids;
  // The host sampler's threads. On CUDA at most 4 by default: the sampler's
  // team spins between steps, and with every core in it llguidance's mask
  // threads got a fifth of their speed (8B shape, 32 JSON rows on 16 cores:
  // 67 us a row against 33; the team of 4 samples 32 rows in 0.7 ms). On
  // the CPU the kernels' own count (a tensor-parallel rank's share of the
  // cores): the engine thread's team then keeps one size, and a region of
  // another size would leave workers to sleep and wake each step.
  ec.output.sampler_threads = device == "cpu"          ? backend->host_threads()
                              : config.num_threads > 0 ? config.num_threads
                                                       : std::min(4, cores);
  ec.enable_prefix_caching = config.enable_prefix_caching;
  ec.kv_idle_release_s = config.kv_idle_release_s;
  // Tensor parallelism on CUDA: the ranks' steps take their tokens from the
  // host (a deferred step's would be on rank 0's GPU only).
  ec.async_scheduling = config.async_scheduling == "on" ||
                        (config.async_scheduling == "auto" && backend->defers_results() && tp == 1);
  ec.scheduler.watermark_blocks = watermark_blocks(config.kv_watermark, kv.num_blocks);
  const PreemptionMode preemption = *preemption_mode_of(config.preemption_mode);  // checked by check_config
  if (preemption != PreemptionMode::Recompute) {
    const int64_t space = config.swap_space_bytes > 0
                              ? config.swap_space_bytes
                              : std::min<int64_t>(kv.num_blocks * block_bytes, int64_t(4) << 30);
    const int64_t slots = space / block_bytes;
    if (slots < 1)
      bad_arg("swap_space_bytes " + std::to_string(space) + " holds no KV block (a block is " +
              std::to_string(block_bytes) + " bytes: every layer's K and V of block_size tokens)");
    ec.scheduler.swap_slots = static_cast<int32_t>(std::min<int64_t>(slots, std::numeric_limits<int32_t>::max()));
    ec.scheduler.preemption = preemption;
  }
  m.engine = std::make_unique<Engine>(std::move(backend), std::move(model), std::move(kv), ec, std::move(draft),
                                      std::move(ranks));
}

Runtime::~Runtime() { close(); }

std::string Runtime::submit(const std::vector<int32_t>& prompt, const SamplingParams& params,
                            const std::string& request_id, Delivery delivery) {
  Impl& m = *impl_;
  const std::string id = request_id.empty() ? std::to_string(m.next_id++) : request_id;
  const std::string where = "request '" + id + "': ";
  if (prompt.empty()) bad_arg(where + "the prompt is empty");
  for (size_t i = 0; i < prompt.size(); ++i)
    if (prompt[i] < 0 || prompt[i] >= m.info.vocab_size)
      bad_arg(where + "prompt token " + std::to_string(prompt[i]) + " at index " + std::to_string(i) +
              " is outside the vocabulary [0, " + std::to_string(m.info.vocab_size) + ")");
  check_sampling_params(params, m.info.vocab_size, m.config.max_num_seqs, where);
  if (params.speculative == "draft" && !m.engine->has_draft_model())
    bad_arg(where + "speculative=\"draft\" needs a draft model: start the Runtime with draft_model=DIR");
  if (params.masked && !m.engine->has_mask_provider())
    bad_arg(where + "masked (constrained) decoding needs a TokenMaskProvider (Runtime::set_token_mask_provider)");
  const int64_t len = static_cast<int64_t>(prompt.size());
  if (len + params.max_tokens > m.info.max_model_len)
    bad_arg(where + "prompt (" + std::to_string(len) + " tokens) + max_tokens (" +
            std::to_string(params.max_tokens) + ") = " + std::to_string(len + params.max_tokens) +
            " is more than max_model_len " + std::to_string(m.info.max_model_len) +
            "; shorten the prompt or lower max_tokens");
  const int64_t width = std::max(params.n, params.beam_width);
  const int64_t blocks = m.engine->kv_manager().worst_case_blocks(len, params.max_tokens, width);
  const Stats st = m.engine->stats();
  if (blocks > st.num_blocks)
    bad_arg(where + "needs " + std::to_string(blocks) + " KV blocks (prompt " + std::to_string(len) +
            " + max_tokens " + std::to_string(params.max_tokens) +
            (width > 1 ? " for " + std::to_string(width) + " sequences" : std::string()) + "), the pool has " +
            std::to_string(st.num_blocks) + "; raise kv_cache_bytes or lower max_tokens");

  auto req = std::make_unique<Request>();
  req->id = id;
  req->params = params;
  req->prompt_len = len;
  req->sample_base = sample_base(params);
  auto seq = std::make_unique<Sequence>();
  seq->tokens = prompt;
  seq->rng = make_rng(params, 0);
  req->seqs.push_back(std::move(seq));
  m.engine->submit(std::move(req), delivery == Delivery::ById);
  return id;
}

std::vector<Event> Runtime::poll(double timeout_s) { return impl_->engine->poll(timeout_s); }

std::vector<Event> Runtime::poll(const std::string& request_id, double timeout_s) {
  return impl_->engine->poll(std::vector<std::string>{request_id}, timeout_s);
}

std::vector<Event> Runtime::poll(const std::vector<std::string>& request_ids, double timeout_s) {
  return impl_->engine->poll(request_ids, timeout_s);
}

bool Runtime::abort(const std::string& request_id) { return impl_->engine->abort(request_id, -1); }

bool Runtime::stop_sequence(const std::string& request_id, int32_t index) {
  if (index < 0) bad_arg("request '" + request_id + "': sequence index must be >= 0");
  return impl_->engine->abort(request_id, index);
}

bool Runtime::release(const std::string& request_id) { return impl_->engine->release(request_id); }

void Runtime::set_token_mask_provider(std::shared_ptr<TokenMaskProvider> provider) {
  impl_->engine->set_mask_provider(std::move(provider));
}

Stats Runtime::stats() const { return impl_->engine->stats(); }

ModelInfo Runtime::model_info() const { return impl_->info; }

void Runtime::close() {
  if (impl_ && impl_->engine) impl_->engine->stop();
}

}  // namespace pagedrt
