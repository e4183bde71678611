// bindings/sampler.cpp — test hooks over the engine's Sampler:
//   _testing._process_logits(logits, params, tokens, prompt_len, eos_ids) -> processed logits
//   _testing._sample_counts(logits, params, draws, seed) -> counts per token
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

}  // namespace

void register_sampler(nb::module_& m) {
  m.def("_process_logits", &process_logits, "logits"_a, "params"_a, "tokens"_a, "prompt_len"_a, "eos_ids"_a);
  m.def("_sample_counts", &sample_counts, "logits"_a, "params"_a, "draws"_a);
}
