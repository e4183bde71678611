// bindings/llguidance_masks.cpp — pagedrt._core.LlguidanceMasks, structured
// output's C++ mask provider (pagedrt/llguidance_masks.hpp), and the call that
// gives it to a Runtime's engine, which then asks it for masks without Python.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <algorithm>
#include <functional>
#include <memory>

#include "pagedrt/pagedrt.hpp"
#include "python_exit.hpp"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

// Python's handle: the engine shares the provider, so it may outlive this object.
struct MasksHandle {
  std::shared_ptr<pagedrt::LlguidanceMasks> masks;
};

struct PyCallable {
  PyRef fn;
  bool failed = false;  // reported once (the GIL guards it)
  explicit PyCallable(nb::object f) : fn(std::move(f)) {}
};

// The model's tokenizer as a Python callable (bytes -> list[int]), for llguidance's mask threads.
std::function<std::vector<int32_t>(const std::string&)> tokenize_in_python(nb::object fn) {
  auto callable = std::make_shared<PyCallable>(std::move(fn));
  return [callable](const std::string& bytes) {
    if (py_finalizing()) throw std::runtime_error("the Python interpreter is exiting");
    return with_gil([&] {
      try {
        return nb::cast<std::vector<int32_t>>(callable->fn.get()(nb::bytes(bytes.data(), bytes.size())));
      } catch (nb::python_error& e) {  // C++ spells the text instead (LlguidanceMasks)
        if (!callable->failed) e.discard_as_unraisable("pagedrt structured output's tokenize (reported once)");
        callable->failed = true;
        throw std::runtime_error("tokenize failed");
      } catch (nb::cast_error&) {
        throw std::runtime_error("tokenize must return a list of token ids");
      }
    });
  };
}

// The provider as the engine sees it, with a benchmark's or a test's choices:
// the cores a CPU forward leaves it (threads < 0: its own count) and whether
// plain greedy picks are checked instead of masked first.
class Configured final : public pagedrt::TokenMaskProvider {
 public:
  Configured(std::shared_ptr<pagedrt::LlguidanceMasks> masks, int threads, bool checked)
      : masks_(std::move(masks)), threads_(threads), checked_(checked) {}
  void fill(std::vector<pagedrt::MaskRow>& rows, int64_t vocab) override { masks_->fill(rows, vocab); }
  void release(const std::string& request_id) override { masks_->release(request_id); }
  int threads() const override { return threads_ >= 0 ? threads_ : masks_->threads(); }
  bool validates() const override { return checked_; }
  void validate(std::vector<pagedrt::MaskRow>& rows, const int32_t* tokens, uint8_t* ok) override {
    masks_->validate(rows, tokens, ok);
  }
  void prepare(std::vector<pagedrt::MaskRow>& rows) override { masks_->prepare(rows); }

 private:
  std::shared_ptr<pagedrt::LlguidanceMasks> masks_;
  int threads_;
  bool checked_;
};

}  // namespace

void bind_llguidance_masks(nb::module_& m) {
  using pagedrt::LlguidanceMasks;
  nb::class_<MasksHandle>(m, "LlguidanceMasks",
                          "Structured output's token masks, computed by llguidance's C API in C++ "
                          "(pagedrt/llguidance_masks.hpp).")
      .def("__init__",
           [](MasksHandle* self, const std::string& library, int64_t vocab, int32_t eos, nb::list tokens,
              const std::string& tokenizer_json, int threads, nb::object tokenize,
              std::vector<std::string> slices) {
             pagedrt::LlguidanceTokenizer tok;
             tok.slices = std::move(slices);
             if (!tokenize.is_none()) tok.tokenize = tokenize_in_python(std::move(tokenize));
             tok.vocab = vocab;
             tok.eos = eos;
             tok.tokenizer_json = tokenizer_json;
             tok.tokens.reserve(nb::len(tokens));
             for (nb::handle t : tokens) {
               const nb::bytes b = nb::cast<nb::bytes>(t);
               tok.tokens.emplace_back(b.c_str(), b.size());
             }
             nb::gil_scoped_release release;
             new (self) MasksHandle{std::make_shared<LlguidanceMasks>(library, tok, threads)};
           },
           "library"_a, "vocab"_a, "eos"_a, "tokens"_a, "tokenizer_json"_a = "", "threads"_a = 0,
           "tokenize"_a = nb::none(), "slices"_a = std::vector<std::string>{},
           "library: llguidance's shared object (the wheel's llguidance/_lib.abi3.so); tokens: each id's "
           "bytes (a special token's: 0xFF and its name), or [] with tokenizer_json; threads: 0 computes "
           "a step's masks one after another, k > 0 on k threads; tokenize: the model's tokenizer, "
           "bytes -> list[int] (LlguidanceTokenizer::tokenize), or None; slices: the token trie's slices "
           "for llguidance's slicer (regexes; [] for the library's defaults).")
      .def("add",
           [](MasksHandle& h, const std::string& request_id, const std::string& kind, const std::string& data) {
             h.masks->add(request_id, kind, data);
           },
           "request_id"_a, "kind"_a, "data"_a, nb::call_guard<nb::gil_scoped_release>(),
           "Constrains the request submitted next with this id; InvalidArgument when it does not compile.")
      .def("release", [](MasksHandle& h, const std::string& request_id) { h.masks->release(request_id); },
           "request_id"_a, nb::call_guard<nb::gil_scoped_release>())
      .def("fill",
           [](MasksHandle& h, nb::list rows, int64_t vocab) {
             std::vector<pagedrt::MaskRow> v;
             for (nb::handle r : rows) v.push_back(nb::cast<const pagedrt::MaskRow&>(r));
             {
               nb::gil_scoped_release release;
               h.masks->fill(v, vocab);
             }
             for (size_t i = 0; i < v.size(); ++i) nb::cast<pagedrt::MaskRow&>(rows[i]).error = v[i].error;
           },
           "rows"_a, "vocab"_a,
           "TokenMaskProvider::fill, for a Python provider that wraps this one (each row's error set where "
           "its mask allows nothing).")
      .def("validate",
           [](MasksHandle& h, std::vector<pagedrt::MaskRow> rows, const std::vector<int32_t>& tokens) {
             if (tokens.size() != rows.size())
               throw pagedrt::Error(pagedrt::ErrorKind::InvalidArgument, std::to_string(tokens.size()) +
                                                                          " tokens for " +
                                                                          std::to_string(rows.size()) + " rows");
             std::string ok(rows.size(), '\0');
             {
               nb::gil_scoped_release release;
               h.masks->validate(rows, tokens.data(), reinterpret_cast<uint8_t*>(ok.data()));
             }
             return nb::bytes(ok.data(), ok.size());
           },
           "rows"_a, "tokens"_a, "TokenMaskProvider::validate: one byte a row, 1 where the row may take its token.")
      .def("mask",
           [](MasksHandle& h, const std::string& request_id, int32_t index, const std::vector<int32_t>& generated,
              int64_t vocab, int64_t num_proposed) {
             auto* words = new std::vector<uint32_t>(static_cast<size_t>((vocab + 31) / 32), 0u);
             nb::capsule owner(words, [](void* p) noexcept { delete static_cast<std::vector<uint32_t>*>(p); });
             std::vector<pagedrt::MaskRow> rows(1);
             rows[0].request_id = request_id;
             rows[0].index = index;
             rows[0].generated = generated.data();
             rows[0].num_generated = static_cast<int64_t>(generated.size());
             rows[0].num_proposed = std::clamp<int64_t>(num_proposed, 0, rows[0].num_generated);
             rows[0].mask = words->data();
             {
               nb::gil_scoped_release release;
               h.masks->fill(rows, vocab);
             }
             return nb::ndarray<nb::numpy, uint32_t, nb::ndim<1>>(words->data(), {words->size()}, owner);
           },
           "request_id"_a, "index"_a, "generated"_a, "vocab"_a, "num_proposed"_a = 0,
           "The mask fill() gives sequence `index` of the request after `generated`, whose last "
           "`num_proposed` are speculative proposals (tests, tools): (vocab + 31) // 32 uint32 words, bit t "
           "allowing token t.")
      .def_prop_ro("threads", [](const MasksHandle& h) { return h.masks->threads(); })
      .def_prop_ro("version", [](const MasksHandle& h) { return h.masks->version(); })
      .def("counters", [](const MasksHandle& h) {
        const LlguidanceMasks::Counters c = h.masks->counters();
        nb::dict d;
        d["fill_seconds"] = c.fill_seconds;
        d["fill_calls"] = c.fill_calls;
        d["fill_rows"] = c.fill_rows;
        d["fill_row_seconds"] = c.fill_row_seconds;
        d["fill_longest_row_seconds"] = c.fill_longest_row_seconds;
        d["fill_first_rows_start_seconds"] = c.fill_first_rows_start_seconds;
        d["validate_seconds"] = c.validate_seconds;
        d["prepare_seconds"] = c.prepare_seconds;
        d["validate_rows"] = c.validate_rows;
        d["compiles"] = c.compiles;
        d["compile_hits"] = c.compile_hits;
        d["tokenize_calls"] = c.tokenize_calls;
        d["tokenize_misses"] = c.tokenize_misses;
        return d;
      }, "Time inside fill(), validate() and prepare(), their rows, the constraints compiled or found "
         "compiled, and the tokenizer's calls and misses; of fill()'s rows, their times summed, the longest "
         "of each fill and the latest start of its first rows (each summed over fills).");

  m.def("set_llguidance_masks",
        [](pagedrt::Runtime& rt, MasksHandle& h, int threads, bool checked) {
          rt.set_token_mask_provider(std::make_shared<Configured>(h.masks, threads, checked));
        },
        "runtime"_a, "masks"_a, "threads"_a = -1, "checked"_a = true, nb::call_guard<nb::gil_scoped_release>(),
        "Gives the runtime's engine these masks (it asks for them without Python). threads: the cores a "
        "CPU forward leaves them while they are filled (-1: their own count); checked: plain greedy "
        "picks are checked against the grammar instead of masked first (pagedrt/token_mask.hpp).");
}
