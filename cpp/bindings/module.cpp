// bindings/module.cpp — pagedrt._core, the nanobind module.
//
// Only public headers, plus the safetensors reader for inspect_checkpoint().
// Every call that can wait (poll, close, the constructor that loads weights)
// releases the GIL.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/vector.h>

#include <chrono>
#include <thread>

#include "io/safetensors.hpp"
#include "pagedrt/pagedrt.hpp"

namespace nb = nanobind;
using namespace nb::literals;
using pagedrt::ErrorKind;

void register_block_manager(nb::module_& m);  // block_manager.cpp
void register_sampler(nb::module_& m);        // sampler.cpp
void register_kernels(nb::module_& m);        // kernels.cpp
void register_ops(nb::module_& m);            // ops.cpp

namespace {

bool py_finalizing() {
#if PY_VERSION_HEX >= 0x030D0000
  return Py_IsFinalizing() != 0;
#else
  return _Py_IsFinalizing() != 0;
#endif
}

// nb::gil_scoped_release, safe at interpreter exit. A daemon thread that comes
// back from a blocking call (poll) while the interpreter finalizes is ended by
// CPython < 3.14 with pthread_exit(); its forced unwind through this noexcept
// destructor called std::terminate ("terminate called without an active
// exception", the process aborted at exit). Such a thread is parked instead,
// as CPython 3.14 itself does, until the process ends.
struct ReleaseGil {
  PyThreadState* state = PyEval_SaveThread();
  ReleaseGil() = default;
  ReleaseGil(const ReleaseGil&) = delete;
  ReleaseGil& operator=(const ReleaseGil&) = delete;
  ~ReleaseGil() {
    while (py_finalizing()) std::this_thread::sleep_for(std::chrono::seconds(1));
    PyEval_RestoreThread(state);
  }
};

nb::object event_logits(const pagedrt::Event& ev) {
  if (ev.logit_rows == 0) return nb::none();
  auto* data = new std::vector<float>(ev.logits);
  nb::capsule owner(data, [](void* p) noexcept { delete static_cast<std::vector<float>*>(p); });
  const size_t rows = static_cast<size_t>(ev.logit_rows);
  const size_t shape[2] = {rows, data->size() / rows};
  return nb::cast(nb::ndarray<nb::numpy, float, nb::ndim<2>>(data->data(), 2, shape, owner));
}

nb::list inspect_checkpoint(const std::string& dir) {
  pagedrt::Checkpoint ckpt = pagedrt::Checkpoint::open(dir);
  nb::list out;
  for (const std::string& name : ckpt.names()) {
    const pagedrt::TensorView& t = ckpt.get(name);
    nb::dict d;
    d["name"] = name;
    d["dtype"] = pagedrt::dtype_name(t.dtype);
    d["shape"] = t.shape;
    d["file"] = t.file;
    out.append(d);
  }
  return out;
}

}  // namespace

NB_MODULE(_core, m) {
  m.doc() = "pagedrt core: the C++ engine (block pool, scheduler, kernels) behind pagedrt.Runtime";

  static nb::object error = nb::exception<pagedrt::Error>(m, "Error", PyExc_RuntimeError);
  // The subclasses are created in Python (pagedrt/errors.py) and registered here,
  // so that they can also derive from ValueError.
  static nb::object model_error, invalid_argument, unsupported;
  m.def("_register_errors", [](nb::object me, nb::object ia, nb::object un) {
    model_error = me; invalid_argument = ia; unsupported = un;
  });
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const pagedrt::Error& e) {
      nb::object cls = error;
      if (e.kind() == ErrorKind::InvalidModel && model_error.is_valid()) cls = model_error;
      if (e.kind() == ErrorKind::InvalidArgument && invalid_argument.is_valid()) cls = invalid_argument;
      if (e.kind() == ErrorKind::Unsupported && unsupported.is_valid()) cls = unsupported;
      PyErr_SetString(cls.ptr(), e.what());
    }
  });

  using SP = pagedrt::SamplingParams;
  nb::class_<SP>(m, "SamplingParams")
      .def(nb::init<>())
      .def_rw("n", &SP::n)
      .def_rw("temperature", &SP::temperature)
      .def_rw("top_k", &SP::top_k)
      .def_rw("top_p", &SP::top_p)
      .def_rw("min_p", &SP::min_p)
      .def_rw("repetition_penalty", &SP::repetition_penalty)
      .def_rw("presence_penalty", &SP::presence_penalty)
      .def_rw("frequency_penalty", &SP::frequency_penalty)
      .def_rw("has_seed", &SP::has_seed)
      .def_rw("seed", &SP::seed)
      .def_rw("max_tokens", &SP::max_tokens)
      .def_rw("min_tokens", &SP::min_tokens)
      .def_rw("ignore_eos", &SP::ignore_eos)
      .def_rw("stop_token_ids", &SP::stop_token_ids)
      .def_rw("logprobs", &SP::logprobs)
      .def_rw("logit_bias", &SP::logit_bias)
      .def_rw("beam_width", &SP::beam_width)
      .def_rw("length_penalty", &SP::length_penalty)
      .def_rw("early_stopping", &SP::early_stopping)
      .def_rw("return_logits", &SP::return_logits);

  nb::class_<pagedrt::TokenLogprob>(m, "TokenLogprob")
      .def_ro("token", &pagedrt::TokenLogprob::token)
      .def_ro("logprob", &pagedrt::TokenLogprob::logprob)
      .def_ro("top_ids", &pagedrt::TokenLogprob::top_ids)
      .def_ro("top_logprobs", &pagedrt::TokenLogprob::top_logprobs);

  nb::class_<pagedrt::Event>(m, "Event")
      .def_ro("request_id", &pagedrt::Event::request_id)
      .def_ro("index", &pagedrt::Event::index)
      .def_ro("token_ids", &pagedrt::Event::token_ids)
      .def_ro("finished", &pagedrt::Event::finished)
      .def_ro("request_finished", &pagedrt::Event::request_finished)
      .def_ro("logprobs", &pagedrt::Event::logprobs)
      .def_ro("cumulative_logprob", &pagedrt::Event::cumulative_logprob)
      .def_ro("score", &pagedrt::Event::score)
      .def_prop_ro("finish_reason", [](const pagedrt::Event& e) -> nb::object {
        if (e.finish_reason == pagedrt::FinishReason::None) return nb::none();
        return nb::str(pagedrt::finish_reason_name(e.finish_reason));
      })
      .def_prop_ro("error", [](const pagedrt::Event& e) -> nb::object {
        if (e.error.empty()) return nb::none();
        return nb::str(e.error.c_str());
      })
      .def_ro("num_preemptions", &pagedrt::Event::num_preemptions)
      .def_ro("time", &pagedrt::Event::time)
      .def_prop_ro("logits", &event_logits);

  nb::class_<pagedrt::Stats>(m, "Stats")
      .def_ro("num_blocks", &pagedrt::Stats::num_blocks)
      .def_ro("block_size", &pagedrt::Stats::block_size)
      .def_ro("blocks_used", &pagedrt::Stats::blocks_used)
      .def_ro("blocks_free", &pagedrt::Stats::blocks_free)
      .def_ro("blocks_cached_free", &pagedrt::Stats::blocks_cached_free)
      .def_ro("slots_used", &pagedrt::Stats::slots_used)
      .def_ro("waste", &pagedrt::Stats::waste)
      .def_ro("peak_blocks_used", &pagedrt::Stats::peak_blocks_used)
      .def_ro("waste_at_peak", &pagedrt::Stats::waste_at_peak)
      .def_ro("blocks_logical", &pagedrt::Stats::blocks_logical)
      .def_ro("peak_blocks_logical", &pagedrt::Stats::peak_blocks_logical)
      .def_ro("prefix_queries", &pagedrt::Stats::prefix_queries)
      .def_ro("prefix_hits", &pagedrt::Stats::prefix_hits)
      .def_ro("num_copies", &pagedrt::Stats::num_copies)
      .def_ro("tokens_per_s", &pagedrt::Stats::tokens_per_s)
      .def_ro("kv_cache_bytes", &pagedrt::Stats::kv_cache_bytes)
      .def_ro("num_waiting", &pagedrt::Stats::num_waiting)
      .def_ro("num_running", &pagedrt::Stats::num_running)
      .def_ro("num_preemptions", &pagedrt::Stats::num_preemptions)
      .def_ro("num_steps", &pagedrt::Stats::num_steps)
      .def_ro("prompt_tokens", &pagedrt::Stats::prompt_tokens)
      .def_ro("generated_tokens", &pagedrt::Stats::generated_tokens);

  nb::class_<pagedrt::ModelInfo>(m, "ModelInfo")
      .def_ro("architecture", &pagedrt::ModelInfo::architecture)
      .def_ro("vocab_size", &pagedrt::ModelInfo::vocab_size)
      .def_ro("num_layers", &pagedrt::ModelInfo::num_layers)
      .def_ro("hidden_size", &pagedrt::ModelInfo::hidden_size)
      .def_ro("max_model_len", &pagedrt::ModelInfo::max_model_len)
      .def_ro("bos_token_id", &pagedrt::ModelInfo::bos_token_id)
      .def_ro("eos_token_ids", &pagedrt::ModelInfo::eos_token_ids)
      .def_ro("weight_dtype", &pagedrt::ModelInfo::weight_dtype)
      .def_ro("activation_dtype", &pagedrt::ModelInfo::activation_dtype)
      .def_ro("device", &pagedrt::ModelInfo::device);

  nb::class_<pagedrt::Runtime>(m, "Runtime")
      .def("__init__",
           [](pagedrt::Runtime* self, const std::string& model_path, const std::string& device,
              const std::string& dtype, int64_t kv_cache_bytes, int32_t block_size, int32_t max_num_seqs,
              int32_t max_num_batched_tokens, int32_t max_model_len, bool enable_prefix_caching,
              int32_t num_threads, double gpu_memory_utilization, const std::string& activation_dtype) {
             pagedrt::RuntimeConfig c;
             c.activation_dtype = activation_dtype;
             c.gpu_memory_utilization = gpu_memory_utilization;
             c.model_path = model_path;
             c.device = device;
             c.dtype = dtype;
             c.kv_cache_bytes = kv_cache_bytes;
             c.block_size = block_size;
             c.max_num_seqs = max_num_seqs;
             c.max_num_batched_tokens = max_num_batched_tokens;
             c.max_model_len = max_model_len;
             c.enable_prefix_caching = enable_prefix_caching;
             c.num_threads = num_threads;
             nb::gil_scoped_release release;
             new (self) pagedrt::Runtime(c);
           },
           "model_path"_a, "device"_a = "auto", "dtype"_a = "auto", "kv_cache_bytes"_a = 0,
           "block_size"_a = 16, "max_num_seqs"_a = 64, "max_num_batched_tokens"_a = 2048,
           "max_model_len"_a = 0, "enable_prefix_caching"_a = true, "num_threads"_a = 0,
           "gpu_memory_utilization"_a = 0.9, "activation_dtype"_a = "auto")
      .def("submit", &pagedrt::Runtime::submit, "prompt"_a, "params"_a, "request_id"_a = "",
           nb::call_guard<ReleaseGil>())
      .def("poll", nb::overload_cast<double>(&pagedrt::Runtime::poll), "timeout"_a = 0.0,
           nb::call_guard<ReleaseGil>())
      .def("poll_request", nb::overload_cast<const std::string&, double>(&pagedrt::Runtime::poll),
           "request_id"_a, "timeout"_a = 0.0, nb::call_guard<ReleaseGil>())
      .def("abort", &pagedrt::Runtime::abort, "request_id"_a, nb::call_guard<ReleaseGil>())
      .def("stop_sequence", &pagedrt::Runtime::stop_sequence, "request_id"_a, "index"_a,
           nb::call_guard<ReleaseGil>())
      .def("stats", &pagedrt::Runtime::stats)
      .def("model_info", &pagedrt::Runtime::model_info)
      .def("close", &pagedrt::Runtime::close, nb::call_guard<ReleaseGil>());

  register_block_manager(m);
  register_sampler(m);
  register_kernels(m);
  register_ops(m);

  m.def("inspect_checkpoint", &inspect_checkpoint, "model_dir"_a,
        "List the tensors of a model folder's safetensors checkpoint (validates every file).");
}
