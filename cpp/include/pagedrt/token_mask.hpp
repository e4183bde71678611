// pagedrt/token_mask.hpp — allowed-token masks for constrained decoding.
//
// A request submitted with SamplingParams::masked = true takes, at every
// token it samples, the set of tokens it may pick from the Runtime's
// TokenMaskProvider (Runtime::set_token_mask_provider). The engine asks for the
// masks of a step's sampling rows on a helper thread while the step's forward
// runs, and the sampler removes every token outside the mask before any other
// processing (penalties, temperature, top-k/p). A grammar engine implements
// the provider: pagedrt::LlguidanceMasks (pagedrt/llguidance_masks.hpp).
//
// Checked picks: a provider that can say whether one token is allowed
// (validates(); llguidance does it ~50x faster than a mask) lets the engine
// skip the mask of a plain greedy row: the row is picked without a mask,
// and the pick is kept where the provider allows it (the argmax over every
// token is then the argmax over the allowed ones, ties included). A row
// whose pick is refused gets its mask at once and is picked again, and its
// sequence's next steps are masked before the pick, as without checks
// (Engine: kEagerMaskSteps). The tokens are those a masked pick gives.
//
// Speculative decoding: a verify step of k proposals asks for k + 1 rows of a
// sequence, the i-th after the sequence's tokens and its first i proposals
// (MaskRow::num_proposed = i). A proposal the constraint refuses is never
// accepted (the row before it does not allow it), so the rows after it are
// never used: a provider may give them any mask, and must not take the
// refused proposal as the sequence's. The next step's rows may drop
// proposals the last step's rows took (the rejected ones).
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
  int64_t num_proposed = 0;            // of those, the last ones are unverified proposals (speculative decoding)
  uint32_t* mask = nullptr;            // (vocab + 31) / 32 words, zeroed: set bit t to allow token t
  std::string error;                   // fill() may say why it allows no token: the sequence's error event says it
};

class TokenMaskProvider {
 public:
  virtual ~TokenMaskProvider() = default;
  // Fills every row's mask (bit t of word t / 32 allows token t). Runs on an
  // engine helper thread; an exception ends the rows' requests with an error
  // event carrying its message, and a row left without any allowed token ends
  // its sequence with an error (carrying the row's `error` where set). Under
  // async scheduling a row may follow a token that ends its sequence (the
  // engine does not know yet; release() may come meanwhile, from the
  // engine's thread): whatever its mask, it is not read.
  virtual void fill(std::vector<MaskRow>& rows, int64_t vocab) = 0;
  // A masked request ended (whatever the reason): its state may go.
  virtual void release(const std::string& request_id) = 0;
  // The host threads fill() keeps busy. While it runs, a CPU backend's
  // forward leaves that many of its cores to it (the rest of the step gets
  // them back as soon as the masks are done).
  virtual int threads() const { return 1; }
  // Checked picks (above): whether validate() is implemented.
  virtual bool validates() const { return false; }
  // ok[i] = 1 where rows[i]'s next token may be tokens[i] (after its
  // generated tokens), else 0. Runs on the engine's thread, after the
  // forward; an exception counts every row as refused (their masks decide).
  virtual void validate(std::vector<MaskRow>& rows, const int32_t* tokens, uint8_t* ok) {
    (void)rows, (void)tokens, (void)ok;
  }
  // Checked picks: the rows validate() will be asked about after this step's
  // forward, given on the helper thread while the forward runs (before
  // fill() of the step's masked rows): a provider may bring their state up
  // to date meanwhile (llguidance: feed each matcher the tokens since its
  // last row), leaving validate() only the check. The rows' masks are not
  // laid out (mask is null). An exception is ignored.
  virtual void prepare(std::vector<MaskRow>& rows) { (void)rows; }
};

}  // namespace pagedrt
