// pagedrt/token_mask.hpp — allowed-token masks for constrained decoding.
//
// A request submitted with SamplingParams::masked = true takes, at every
// token it samples, the set of tokens it may pick from the Runtime's
// TokenMaskProvider (Runtime::set_token_mask_provider). The engine asks for the
// masks of a step's sampling rows on a helper thread while the step's forward
// runs, and the sampler removes every token outside the mask before any other
// processing (penalties, temperature, top-k/p). A grammar engine (Python:
// llguidance) implements the provider.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace pagedrt {

// One sampling row of a masked request.
struct MaskRow {
  std::string request_id;
  int32_t index = 0;                   // the sequence (sample) index
  const int32_t* generated = nullptr;  // its output tokens so far
  int64_t num_generated = 0;
  uint32_t* mask = nullptr;            // (vocab + 31) / 32 words, zeroed: set bit t to allow token t
};

class TokenMaskProvider {
 public:
  virtual ~TokenMaskProvider() = default;
  // Fills every row's mask (bit t of word t / 32 allows token t). Runs on an
  // engine helper thread; an exception ends the rows' requests with an error
  // event carrying its message, and a row left without any allowed token ends
  // its sequence with an error.
  virtual void fill(std::vector<MaskRow>& rows, int64_t vocab) = 0;
  // A masked request ended (whatever the reason): its state may go.
  virtual void release(const std::string& request_id) = 0;
  // The host threads fill() keeps busy. While it runs, a CPU backend's
  // forward leaves that many of its cores to it (the rest of the step gets
  // them back as soon as the masks are done).
  virtual int threads() const { return 1; }
};

}  // namespace pagedrt
