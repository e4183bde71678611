// sampling_check.hpp — validation of SamplingParams at the API boundary.
#pragma once

#include <cstdint>
#include <string>

#include "pagedrt/sampling_params.hpp"

namespace pagedrt {

// Throws Error(InvalidArgument) "<where><field> must ..." for the first bad
// field. `vocab` bounds token ids; `max_num_seqs` bounds n and beam_width.
void check_sampling_params(const SamplingParams& p, int64_t vocab, int32_t max_num_seqs, const std::string& where);

}  // namespace pagedrt
