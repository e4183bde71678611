// bindings/module.cpp — pagedrt._core, the nanobind module of the public API.
//
// Public headers only (cpp/include); the test hooks are pagedrt._testing
// (bindings/testing.cpp). Every call that can wait (poll, close, the
// constructor that loads weights) releases the GIL.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/vector.h>

#include <cxxabi.h>

#include <chrono>
#include <cstring>
#include <thread>

#include "pagedrt/pagedrt.hpp"
#include "python_exit.hpp"

namespace nb = nanobind;
using namespace nb::literals;
using pagedrt::ErrorKind;

void bind_llguidance_masks(nb::module_& m);  // bindings/llguidance_masks.cpp

namespace {

// nb::gil_scoped_release, safe at interpreter exit. A daemon thread that comes
// back from a blocking call (poll) while the interpreter finalizes is ended by
// CPython < 3.14 with pthread_exit(); its forced unwind through this noexcept
// destructor called std::terminate ("terminate called without an active
// exception", the process aborted at exit). Such a thread is parked instead
// (python_exit.hpp): before asking for the GIL when finalization has begun,
// and, since it may begin between that check and the request (1 exit in ~15
// with a thread polling every 50 ms), by catching the unwind that
// pthread_exit() starts and never leaving the handler.

struct ReleaseGil {
  PyThreadState* state = PyEval_SaveThread();
  ReleaseGil() = default;
  ReleaseGil(const ReleaseGil&) = delete;
  ReleaseGil& operator=(const ReleaseGil&) = delete;
  ~ReleaseGil() {
    if (py_finalizing()) park_forever();
    try {
      PyEval_RestoreThread(state);
    } catch (abi::__forced_unwind&) {  // pthread_exit() inside take_gil: finalization began meanwhile
      park_forever();
    }
  }
};

// Read-only fields that also print: repr(obj) is "Type(a=1, b='x', ...)"
// over every field registered through it.
template <class T>
class Fields {
 public:
  Fields(nb::module_& m, const char* name) : cls_(m, name), name_(name) {}
  template <class V>
  Fields& ro(const char* field, V T::*member) {
    cls_.def_ro(field, member);
    names_.push_back(field);
    return *this;
  }
  template <class V>
  Fields& rw(const char* field, V T::*member) {
    cls_.def_rw(field, member);
    names_.push_back(field);
    return *this;
  }
  nb::class_<T>& cls() { return cls_; }
  template <class F>
  Fields& prop(const char* field, F&& getter) {
    cls_.def_prop_ro(field, std::forward<F>(getter));
    names_.push_back(field);
    return *this;
  }
  ~Fields() {
    cls_.def("__repr__", [type = name_, names = names_](nb::handle self) {
      std::string out = type + "(";
      for (size_t i = 0; i < names.size(); ++i) {
        if (i) out += ", ";
        out += names[i] + "=" + nb::repr(self.attr(names[i].c_str())).c_str();
      }
      return out + ")";
    });
  }

 private:
  nb::class_<T> cls_;
  std::string name_;
  std::vector<std::string> names_;
};

nb::object event_logits(const pagedrt::Event& ev) {
  if (ev.logit_rows == 0) return nb::none();
  auto* data = new std::vector<float>(ev.logits);
  nb::capsule owner(data, [](void* p) noexcept { delete static_cast<std::vector<float>*>(p); });
  const size_t rows = static_cast<size_t>(ev.logit_rows);
  const size_t shape[2] = {rows, data->size() / rows};
  return nb::cast(nb::ndarray<nb::numpy, float, nb::ndim<2>>(data->data(), 2, shape, owner));
}

nb::object finish_reason_str(pagedrt::FinishReason reason) {
  if (reason == pagedrt::FinishReason::None) return nb::none();
  static_assert(static_cast<int>(pagedrt::FinishReason::Error) == 4, "a name per FinishReason");
  static PyObject* names[5] = {};  // interned once and kept (the GIL held): no str made per event
  PyObject*& name = names[static_cast<int>(reason)];
  if (!name && !(name = PyUnicode_InternFromString(pagedrt::finish_reason_name(reason)))) throw nb::python_error();
  return nb::borrow(name);
}

nb::list int_list(const std::vector<int32_t>& values) {
  nb::list out = nb::steal<nb::list>(PyList_New(static_cast<Py_ssize_t>(values.size())));
  if (!out.is_valid()) throw nb::python_error();
  for (size_t i = 0; i < values.size(); ++i) {
    PyObject* v = PyLong_FromLong(values[i]);
    if (!v) throw nb::python_error();  // the list frees the items set so far
    PyList_SET_ITEM(out.ptr(), static_cast<Py_ssize_t>(i), v);
  }
  return out;
}

// A poll's events as plain tuples, for pagedrt.Runtime's conversion: one
// Python object an event, read by unpacking, instead of a wrapped Event whose
// every field read is a call (its whole conversion, detokenization included,
// took 3.5 us an event against 3.9, 512 events a poll, on the 2-core VM):
//
//   (request_id, index, token_ids: list, finished, request_finished,
//    finish_reason: str | None, error: str | None, num_preemptions, time,
//    cumulative_logprob, score, spec_proposed, spec_accepted, extra)
//
// extra is the Event itself (moved) when it carries logprobs, prompt logprobs
// or logits, else None. Called with the GIL held, after the poll returned.
nb::object event_row(pagedrt::Event&& ev) {
  nb::object extra = nb::none();
  const pagedrt::Event* e = &ev;
  if (!ev.logprobs.empty() || !ev.prompt_logprobs.empty() || ev.logit_rows > 0) {
    extra = nb::cast(std::move(ev));
    e = nb::inst_ptr<pagedrt::Event>(extra);  // the fields live on in the Python object
  }
  nb::object error = e->error.empty() ? nb::none() : nb::object(nb::str(e->error.data(), e->error.size()));
  nb::tuple row = nb::make_tuple(
      nb::str(e->request_id.data(), e->request_id.size()), e->index, int_list(e->token_ids), e->finished,
      e->request_finished, finish_reason_str(e->finish_reason), error, e->num_preemptions, e->time,
      e->cumulative_logprob, e->score, e->spec_proposed, e->spec_accepted, extra);
  // Out of the cycle collector's sight: nothing a row holds can refer back to
  // it (its one container, the fresh token list, is seen by nobody else yet),
  // so no cycle goes through it. A poll that returns thousands of events (a
  // host behind the engine) otherwise has the collector walk them again and
  // again: 1.35 us of collection an event against 0.97 in a poll of 32,768.
  PyObject_GC_UnTrack(row.ptr());
  return row;
}

nb::list event_rows(std::vector<pagedrt::Event>&& events) {
  nb::list rows;
  for (pagedrt::Event& ev : events) rows.append(event_row(std::move(ev)));
  return rows;
}

// A TokenMaskProvider made of two Python callables: fill(rows, vocab) and
// release(request_id). The engine calls them from its own threads: each call
// takes the GIL through with_gil (python_exit.hpp: a thread caught by the
// interpreter's exit is parked), and none is made once it is finalizing.
class PyMaskProvider final : public pagedrt::TokenMaskProvider {
 public:
  PyMaskProvider(nb::object fill, nb::object release, int threads, nb::object validate)
      : fill_(std::move(fill)), release_(std::move(release)), validate_(std::move(validate)),
        threads_(std::max(0, threads)) {}
  int threads() const override { return threads_; }
  bool validates() const override { return !validate_.get().is_none(); }
  // validate(rows, tokens) -> bytes-like of len(rows), nonzero where the token is allowed.
  void validate(std::vector<pagedrt::MaskRow>& rows, const int32_t* tokens, uint8_t* ok) override {
    if (py_finalizing()) throw std::runtime_error("the Python interpreter is exiting");
    with_gil([&] {
      try {
        nb::object res = validate_.get()(rows, std::vector<int32_t>(tokens, tokens + rows.size()));
        const nb::bytes b = nb::cast<nb::bytes>(res);
        if (b.size() != rows.size())
          throw std::runtime_error("validate returned " + std::to_string(b.size()) + " answers for " +
                                   std::to_string(rows.size()) + " rows");
        std::memcpy(ok, b.c_str(), rows.size());
      } catch (nb::python_error& e) {
        throw std::runtime_error(e.what());
      } catch (nb::cast_error&) {
        throw std::runtime_error("validate must return bytes (one a row)");
      }
    });
  }
  void fill(std::vector<pagedrt::MaskRow>& rows, int64_t vocab) override {
    if (py_finalizing()) throw std::runtime_error("the Python interpreter is exiting");
    with_gil([&] {
      try {
        const nb::list list = nb::cast<nb::list>(nb::cast(rows));  // copies (their masks point into the engine's)
        fill_.get()(list, vocab);
        for (size_t i = 0; i < rows.size(); ++i) rows[i].error = nb::cast<const pagedrt::MaskRow&>(list[i]).error;
      } catch (nb::python_error& e) {
        throw std::runtime_error(e.what());  // the message, without the Python exception (GIL-bound)
      }
    });
  }
  void release(const std::string& request_id) override {
    if (py_finalizing()) return;
    with_gil([&] {
      try {
        release_.get()(request_id);
      } catch (nb::python_error& e) {
        e.discard_as_unraisable("pagedrt token mask provider release");
      }
    });
  }

 private:
  PyRef fill_, release_, validate_;  // dropped with the GIL, or left at exit
  int threads_;
};

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
      .def_rw("prompt_logprobs", &SP::prompt_logprobs)
      .def_rw("masked", &SP::masked)
      .def_rw("logit_bias", &SP::logit_bias)
      .def_rw("beam_width", &SP::beam_width)
      .def_rw("length_penalty", &SP::length_penalty)
      .def_rw("early_stopping", &SP::early_stopping)
      .def_rw("return_logits", &SP::return_logits)
      .def_rw("speculative", &SP::speculative)
      .def_rw("num_speculative_tokens", &SP::num_speculative_tokens)
      .def_rw("ngram_min", &SP::ngram_min)
      .def_rw("ngram_max", &SP::ngram_max)
      .def("validate", [](const SP& p) { pagedrt::validate(p); },
           "Raises InvalidArgument naming the field for a value out of range.");

  nb::class_<pagedrt::MaskRow>(m, "MaskRow",
                                "One sampling row of a masked request (valid only during fill()).")
      .def_ro("request_id", &pagedrt::MaskRow::request_id)
      .def_ro("index", &pagedrt::MaskRow::index)
      .def_rw("error", &pagedrt::MaskRow::error,
              "why fill() leaves the row allowing no token: the sequence's error event says it")
      .def_prop_ro("generated",
                   [](const pagedrt::MaskRow& r) {
                     return std::vector<int32_t>(r.generated, r.generated + r.num_generated);
                   },
                   "the sequence's output tokens so far")
      .def_ro("num_proposed", &pagedrt::MaskRow::num_proposed,
              "of `generated`, the last ones are unverified speculative proposals (pagedrt/token_mask.hpp)")
      .def_prop_ro("mask_address",
                   [](const pagedrt::MaskRow& r) { return reinterpret_cast<uintptr_t>(r.mask); },
                   "address of the row's mask: (vocab + 31) // 32 uint32 words, zeroed; bit t allows token t")
      .def("mask", [](const pagedrt::MaskRow& r, int64_t vocab) {
             const size_t words = static_cast<size_t>((vocab + 31) / 32);
             return nb::ndarray<nb::numpy, uint32_t, nb::ndim<1>>(r.mask, {words}, nb::handle());
           }, "vocab"_a, nb::rv_policy::reference,
           "the mask as a uint32 numpy array viewing the engine's buffer (during fill() only)");

  Fields<pagedrt::TokenLogprob>(m, "TokenLogprob")
      .ro("token", &pagedrt::TokenLogprob::token)
      .ro("logprob", &pagedrt::TokenLogprob::logprob)
      .ro("top_ids", &pagedrt::TokenLogprob::top_ids)
      .ro("top_logprobs", &pagedrt::TokenLogprob::top_logprobs);

  Fields<pagedrt::Event>(m, "Event")
      .ro("request_id", &pagedrt::Event::request_id)
      .ro("index", &pagedrt::Event::index)
      .ro("token_ids", &pagedrt::Event::token_ids)
      .ro("finished", &pagedrt::Event::finished)
      .ro("request_finished", &pagedrt::Event::request_finished)
      .prop("finish_reason", [](const pagedrt::Event& e) -> nb::object {
        if (e.finish_reason == pagedrt::FinishReason::None) return nb::none();
        return nb::str(pagedrt::finish_reason_name(e.finish_reason));
      })
      .prop("error", [](const pagedrt::Event& e) -> nb::object {
        if (e.error.empty()) return nb::none();
        return nb::str(e.error.c_str());
      })
      .ro("num_preemptions", &pagedrt::Event::num_preemptions)
      .ro("time", &pagedrt::Event::time)
      .ro("logprobs", &pagedrt::Event::logprobs)
      .ro("prompt_logprobs", &pagedrt::Event::prompt_logprobs)
      .ro("cumulative_logprob", &pagedrt::Event::cumulative_logprob)
      .ro("spec_proposed", &pagedrt::Event::spec_proposed)
      .ro("spec_accepted", &pagedrt::Event::spec_accepted)
      .ro("score", &pagedrt::Event::score)
      .prop("logits", &event_logits);

  Fields<pagedrt::Stats>(m, "Stats")
      .ro("num_blocks", &pagedrt::Stats::num_blocks)
      .ro("block_size", &pagedrt::Stats::block_size)
      .ro("blocks_used", &pagedrt::Stats::blocks_used)
      .ro("blocks_free", &pagedrt::Stats::blocks_free)
      .ro("blocks_cached_free", &pagedrt::Stats::blocks_cached_free)
      .ro("slots_used", &pagedrt::Stats::slots_used)
      .ro("waste", &pagedrt::Stats::waste)
      .ro("peak_blocks_used", &pagedrt::Stats::peak_blocks_used)
      .ro("waste_at_peak", &pagedrt::Stats::waste_at_peak)
      .ro("blocks_logical", &pagedrt::Stats::blocks_logical)
      .ro("peak_blocks_logical", &pagedrt::Stats::peak_blocks_logical)
      .ro("prefix_queries", &pagedrt::Stats::prefix_queries)
      .ro("prefix_hits", &pagedrt::Stats::prefix_hits)
      .ro("num_copies", &pagedrt::Stats::num_copies)
      .ro("tokens_per_s", &pagedrt::Stats::tokens_per_s)
      .ro("kv_cache_bytes", &pagedrt::Stats::kv_cache_bytes)
      .ro("kv_mapped_bytes", &pagedrt::Stats::kv_mapped_bytes)
      .ro("num_waiting", &pagedrt::Stats::num_waiting)
      .ro("num_running", &pagedrt::Stats::num_running)
      .ro("num_preemptions", &pagedrt::Stats::num_preemptions)
      .ro("num_swapped_out", &pagedrt::Stats::num_swapped_out)
      .ro("num_swapped", &pagedrt::Stats::num_swapped)
      .ro("swap_space_bytes", &pagedrt::Stats::swap_space_bytes)
      .ro("swap_blocks_used", &pagedrt::Stats::swap_blocks_used)
      .ro("swap_out_blocks", &pagedrt::Stats::swap_out_blocks)
      .ro("swap_in_blocks", &pagedrt::Stats::swap_in_blocks)
      .ro("swap_seconds", &pagedrt::Stats::swap_seconds)
      .ro("num_steps", &pagedrt::Stats::num_steps)
      .ro("async_steps", &pagedrt::Stats::async_steps)
      .ro("padded_tokens", &pagedrt::Stats::padded_tokens)
      .ro("prompt_tokens", &pagedrt::Stats::prompt_tokens)
      .ro("generated_tokens", &pagedrt::Stats::generated_tokens)
      .ro("device_draws", &pagedrt::Stats::device_draws)
      .ro("spec_proposed", &pagedrt::Stats::spec_proposed)
      .ro("spec_accepted", &pagedrt::Stats::spec_accepted)
      .ro("forward_seconds", &pagedrt::Stats::forward_seconds)
      .ro("output_seconds", &pagedrt::Stats::output_seconds)
      .ro("launch_seconds", &pagedrt::Stats::launch_seconds)
      .ro("collect_wait_seconds", &pagedrt::Stats::collect_wait_seconds)
      .ro("mask_steps", &pagedrt::Stats::mask_steps)
      .ro("mask_rows", &pagedrt::Stats::mask_rows)
      .ro("gated_mask_steps", &pagedrt::Stats::gated_mask_steps)
      .ro("mask_seconds", &pagedrt::Stats::mask_seconds)
      .ro("mask_wait_seconds", &pagedrt::Stats::mask_wait_seconds)
      .ro("mask_rows_checked", &pagedrt::Stats::mask_rows_checked)
      .ro("mask_rows_refused", &pagedrt::Stats::mask_rows_refused)
      .ro("draft_kv_cache_bytes", &pagedrt::Stats::draft_kv_cache_bytes)
      .ro("draft_blocks_used", &pagedrt::Stats::draft_blocks_used);

  Fields<pagedrt::ModelInfo>(m, "ModelInfo")
      .ro("architecture", &pagedrt::ModelInfo::architecture)
      .ro("vocab_size", &pagedrt::ModelInfo::vocab_size)
      .ro("num_layers", &pagedrt::ModelInfo::num_layers)
      .ro("hidden_size", &pagedrt::ModelInfo::hidden_size)
      .ro("max_model_len", &pagedrt::ModelInfo::max_model_len)
      .ro("bos_token_id", &pagedrt::ModelInfo::bos_token_id)
      .ro("eos_token_ids", &pagedrt::ModelInfo::eos_token_ids)
      .ro("weight_dtype", &pagedrt::ModelInfo::weight_dtype)
      .ro("quantization", &pagedrt::ModelInfo::quantization)
      .ro("activation_dtype", &pagedrt::ModelInfo::activation_dtype)
      .ro("kv_cache_dtype", &pagedrt::ModelInfo::kv_cache_dtype)
      .ro("device", &pagedrt::ModelInfo::device)
      .ro("deterministic", &pagedrt::ModelInfo::deterministic)
      .ro("draft_model", &pagedrt::ModelInfo::draft_model)
      .ro("draft_num_layers", &pagedrt::ModelInfo::draft_num_layers)
      .ro("tensor_parallel_size", &pagedrt::ModelInfo::tensor_parallel_size)
      .ro("devices", &pagedrt::ModelInfo::devices);

  // The one source of RuntimeConfig's defaults: Python reads them from here.
  using RC = pagedrt::RuntimeConfig;
  Fields<RC> config(m, "RuntimeConfig");
  config.cls().def(nb::init<>());
  config.rw("model_path", &RC::model_path)
      .rw("device", &RC::device)
      .rw("dtype", &RC::dtype)
      .rw("activation_dtype", &RC::activation_dtype)
      .rw("kv_cache_dtype", &RC::kv_cache_dtype)
      .rw("quantization", &RC::quantization)
      .rw("kv_cache_bytes", &RC::kv_cache_bytes)
      .rw("gpu_memory_utilization", &RC::gpu_memory_utilization)
      .rw("elastic_kv", &RC::elastic_kv)
      .rw("kv_idle_release_s", &RC::kv_idle_release_s)
      .rw("async_scheduling", &RC::async_scheduling)
      .rw("block_size", &RC::block_size)
      .rw("max_num_seqs", &RC::max_num_seqs)
      .rw("max_num_batched_tokens", &RC::max_num_batched_tokens)
      .rw("max_model_len", &RC::max_model_len)
      .rw("enable_prefix_caching", &RC::enable_prefix_caching)
      .rw("preemption_mode", &RC::preemption_mode)
      .rw("swap_space_bytes", &RC::swap_space_bytes)
      .rw("kv_watermark", &RC::kv_watermark)
      .rw("num_threads", &RC::num_threads)
      .rw("deterministic", &RC::deterministic)
      .rw("draft_model", &RC::draft_model)
      .rw("tensor_parallel_size", &RC::tensor_parallel_size)
      .rw("devices", &RC::devices);

  nb::class_<pagedrt::Runtime>(m, "Runtime")
      .def("__init__",
           [](pagedrt::Runtime* self, const RC& config, nb::object on_load_progress) {
             RC c = config;
             if (!on_load_progress.is_none())  // borrowed: the Runtime drops it once constructed
               c.on_load_progress = [cb = on_load_progress.ptr()](int64_t done, int64_t total) {
                 nb::gil_scoped_acquire gil;  // the constructor runs without the GIL
                 nb::handle fn(cb);
                 fn(done, total);
               };
             nb::gil_scoped_release release;
             new (self) pagedrt::Runtime(c);
           },
           "config"_a, "on_load_progress"_a = nb::none())
      .def("submit",
           [](pagedrt::Runtime& rt, const std::vector<int32_t>& prompt, const pagedrt::SamplingParams& params,
              const std::string& request_id, bool by_id) {
             return rt.submit(prompt, params, request_id,
                              by_id ? pagedrt::Delivery::ById : pagedrt::Delivery::Any);
           },
           "prompt"_a, "params"_a, "request_id"_a = "", "by_id"_a = false, nb::call_guard<ReleaseGil>())
      .def("poll", nb::overload_cast<double>(&pagedrt::Runtime::poll), "timeout"_a = 0.0,
           nb::call_guard<ReleaseGil>())
      .def("poll_request", nb::overload_cast<const std::string&, double>(&pagedrt::Runtime::poll),
           "request_id"_a, "timeout"_a = 0.0, nb::call_guard<ReleaseGil>())
      .def("poll_requests", nb::overload_cast<const std::vector<std::string>&, double>(&pagedrt::Runtime::poll),
           "request_ids"_a, "timeout"_a = 0.0, nb::call_guard<ReleaseGil>())
      .def("poll_rows",
           [](pagedrt::Runtime& rt, std::optional<std::vector<std::string>> request_ids, double timeout) {
             std::vector<pagedrt::Event> events;
             {
               ReleaseGil unlocked;
               events = request_ids ? rt.poll(*request_ids, timeout) : rt.poll(timeout);
             }
             return event_rows(std::move(events));
           },
           "request_ids"_a.none(), "timeout"_a = 0.0,
           "poll() (request_ids None) or poll_requests(request_ids), each event as a tuple: (request_id, "
           "index, token_ids, finished, request_finished, finish_reason, error, num_preemptions, time, "
           "cumulative_logprob, score, spec_proposed, spec_accepted, extra), extra the Event when it "
           "carries logprobs, prompt_logprobs or logits, else None.")
      .def("abort", &pagedrt::Runtime::abort, "request_id"_a, nb::call_guard<ReleaseGil>())
      .def("stop_sequence", &pagedrt::Runtime::stop_sequence, "request_id"_a, "index"_a,
           nb::call_guard<ReleaseGil>())
      .def("release", &pagedrt::Runtime::release, "request_id"_a, nb::call_guard<ReleaseGil>())
      .def("set_token_mask_provider",
           [](pagedrt::Runtime& rt, nb::object fill, nb::object release, int threads, nb::object validate) {
             if (fill.is_none()) return rt.set_token_mask_provider(nullptr);  // drop the callables
             rt.set_token_mask_provider(std::make_shared<PyMaskProvider>(std::move(fill), std::move(release),
                                                                         threads, std::move(validate)));
           },
           "fill"_a.none(), "release"_a.none(), "threads"_a = 1, "validate"_a = nb::none(),
           "Masks for SamplingParams.masked requests: fill(rows: list[MaskRow], vocab) sets the allowed "
           "bits of each row's mask (called from an engine thread while the step's forward runs); "
           "release(request_id) when a masked request has ended. threads: the host threads fill keeps "
           "busy (a CPU forward leaves them that many cores while it runs; 0: none). validate(rows, "
           "tokens) -> bytes (optional): whether each row may take the token, for the checked picks of "
           "plain greedy rows (pagedrt/token_mask.hpp): a row whose unmasked pick it allows needs no mask.")
      .def("stats", &pagedrt::Runtime::stats)
      .def("model_info", &pagedrt::Runtime::model_info)
      .def("close", &pagedrt::Runtime::close, nb::call_guard<ReleaseGil>());

  bind_llguidance_masks(m);

  m.def("cpu_gemm_info", &pagedrt::cpu_gemm_info,
        "The CPU GEMM kernels this process runs and their decode prefetch hint, with how it was chosen.");
  m.def("cuda_built", &pagedrt::cuda_built, "Whether this build has the CUDA backend.");
  m.def("cuda_available", &pagedrt::cuda_available,
        "Whether this build has the CUDA backend and a GPU is visible.");
  m.def("cuda_device_count", &pagedrt::cuda_device_count,
        "The GPUs visible to this process (0 without the CUDA backend).");
}
