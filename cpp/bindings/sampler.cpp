// bindings/sampler.cpp — test hooks over the engine's Sampler:
//   _testing._process_logits(logits, params, tokens, prompt_len, eos_ids) -> processed logits
//   _testing._sample_counts(logits, params, draws, seed) -> counts per token
//   _testing._device_edits(params, snapshots, prompt_len, eos_ids) -> the device's edits per snapshot
// Not part of the public API.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/vector.h>

#include "engine/sampler.hpp"
#include "pagedrt/error.hpp"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

using Row = nb::ndarray<const float, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

std::vector<float> process_logits(Row logits, const pagedrt::SamplingParams& params,
                                  const std::vector<int32_t>& tokens, int64_t prompt_len,
                                  const std::vector<int32_t>& eos_ids) {
  const int64_t vocab = static_cast<int64_t>(logits.shape(0));
  for (int32_t t : tokens)
    if (t < 0 || t >= vocab) throw pagedrt::Error(pagedrt::ErrorKind::InvalidArgument, "token outside the vocabulary");
  std::vector<float> row(logits.data(), logits.data() + vocab);
  pagedrt::Sampler::process(row.data(), vocab, params, tokens, prompt_len, eos_ids);
  return row;
}

std::vector<int64_t> sample_counts(Row logits, const pagedrt::SamplingParams& params, int64_t draws) {
  const int64_t vocab = static_cast<int64_t>(logits.shape(0));
  std::vector<int64_t> counts(static_cast<size_t>(vocab), 0);
  pagedrt::Rng rng = pagedrt::make_rng(params, 0);
  std::vector<double> probs;
  std::vector<int32_t> order;
  nb::gil_scoped_release release;
  for (int64_t i = 0; i < draws; ++i)
    ++counts[pagedrt::Sampler::pick(logits.data(), vocab, params, rng, probs, order)];
  return counts;
}

// Sampler::device_edits for each of `snapshots` (one sequence's tokens as it
// grows: each extends the one before), through one TokenHistory: per
// snapshot (tokens, flags, bias, count) of its edits and (repetition,
// frequency, presence).
nb::list device_edits(const pagedrt::SamplingParams& params, const std::vector<std::vector<int32_t>>& snapshots,
                      int64_t prompt_len, const std::vector<int32_t>& eos_ids) {
  pagedrt::TokenHistory history;
  nb::list out;
  for (const std::vector<int32_t>& tokens : snapshots) {
    std::vector<pagedrt::LogitEdit> edits;
    pagedrt::SampleRow d;
    pagedrt::Sampler::device_edits(params, tokens, prompt_len, eos_ids, history, edits, d);
    std::vector<int32_t> tok, flags, count;
    std::vector<float> bias;
    for (const pagedrt::LogitEdit& e : edits) {
      tok.push_back(e.token), flags.push_back(static_cast<int32_t>(e.flags)), bias.push_back(e.bias);
      count.push_back(e.count);
    }
    out.append(nb::make_tuple(tok, flags, bias, count,
                              nb::make_tuple(d.repetition_penalty, d.frequency_penalty, d.presence_penalty)));
  }
  return out;
}

}  // namespace

void register_sampler(nb::module_& m) {
  m.def("_process_logits", &process_logits, "logits"_a, "params"_a, "tokens"_a, "prompt_len"_a, "eos_ids"_a);
  m.def("_sample_counts", &sample_counts, "logits"_a, "params"_a, "draws"_a);
  m.def("_device_edits", &device_edits, "params"_a, "snapshots"_a, "prompt_len"_a, "eos_ids"_a);
}
