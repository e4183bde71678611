// pagedrt/llguidance_masks.hpp — structured output's token masks, computed by
// llguidance in C++ (a TokenMaskProvider, pagedrt/token_mask.hpp).
//
// Each constrained request is added with its constraint before it is
// submitted; each of its sequences gets its own matcher (a copy of the
// request's), fed the tokens the sequence has produced since it was last
// asked. A mask is computed straight into the engine's buffer, on a pool of
// `threads` host threads, without Python or its GIL. Compiled constraints are
// kept (the last 64 distinct ones), so a constraint seen before costs a copy
// (microseconds) instead of a compile (milliseconds).
//
// llguidance is loaded at run time from `library` (pagedrt does not link it):
// libllguidance.so built from its Rust crate, or, in a Python process, the
// PyPI wheel's llguidance/_lib.abi3.so, which exports the same C API
// (llguidance 1.7.4 or newer).
//
//   auto masks = std::make_shared<pagedrt::LlguidanceMasks>(lib, tokenizer, 4);
//   rt.set_token_mask_provider(masks);
//   masks->add("r1", "json_schema", R"({"type": "object"})");  // InvalidArgument if it does not compile
//   SamplingParams p; p.masked = true;
//   rt.submit(prompt, p, "r1");
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "pagedrt/token_mask.hpp"

namespace pagedrt {

// The model's tokens as llguidance sees them: either a HuggingFace
// tokenizer.json, or each id's bytes (a special token's start with the byte
// 0xFF followed by its name, as in llguidance's token tries).
struct LlguidanceTokenizer {
  int64_t vocab = 0;            // the model's vocabulary: the rows of its logits, the bits of a mask
  int32_t eos = 0;              // the end-of-sequence token a finished grammar allows
  std::string tokenizer_json;   // the file's text, or empty
  std::vector<std::string> tokens;  // (vocab,) when tokenizer_json is empty
  // The model's own tokenizer (bytes -> ids, any bytes, no BOS; called from
  // the mask threads, its answers kept): text the grammar forces (a JSON key)
  // is then allowed only in the tokens the model would have seen for it, as
  // llguidance does with a canonical tokenizer. Empty: forced text may come
  // in any tokens that spell it (llguidance's greedy stand-in tokenizer).
  std::function<std::vector<int32_t>(const std::string& bytes)> tokenize;
  // The regexes that cut the token trie into slices for llguidance's slicer
  // (a mask takes a slice whole where the lexer allows all of it, and walks
  // the rest token by token); empty: the library's defaults. Masks are the
  // same whatever the slices, only their cost differs.
  std::vector<std::string> slices;
};

class LlguidanceMasks final : public TokenMaskProvider {
 public:
  // threads: 0 computes a step's masks one after another on the thread that
  // asks; k > 0 on k threads (the asking one and k - 1 of this object's).
  // Error (Unsupported) when the library cannot be loaded, (InvalidArgument)
  // when the tokenizer is refused.
  LlguidanceMasks(const std::string& library, const LlguidanceTokenizer& tokenizer, int threads);
  ~LlguidanceMasks() override;
  LlguidanceMasks(const LlguidanceMasks&) = delete;
  LlguidanceMasks& operator=(const LlguidanceMasks&) = delete;

  // Constrains request `request_id` (submitted after this, with masked = true):
  // kind is "json_schema", "json_object", "regex", "lark" or "llguidance"
  // (llguidance's grammar text or JSON, as its Python API writes them). An
  // Error (InvalidArgument) with the library's message when it does not compile.
  void add(const std::string& request_id, const std::string& kind, const std::string& data);

  // TokenMaskProvider
  void fill(std::vector<MaskRow>& rows, int64_t vocab) override;
  void release(const std::string& request_id) override;
  int threads() const override;
  bool validates() const override { return true; }
  void validate(std::vector<MaskRow>& rows, const int32_t* tokens, uint8_t* ok) override;
  void prepare(std::vector<MaskRow>& rows) override;

  // Time spent inside fill(), validate() and prepare(), their rows, the
  // constraints compiled or found compiled, and the tokenizer's use (benchmarks).
  struct Counters {
    double fill_seconds = 0.0, validate_seconds = 0.0, prepare_seconds = 0.0;
    // A fill's rows on the pool: their times summed, its longest row, and when
    // its first rows began (the latest of the first `threads` rows' starts:
    // the pool's wake-up), each summed over fills.
    double fill_row_seconds = 0.0, fill_longest_row_seconds = 0.0, fill_first_rows_start_seconds = 0.0;
    int64_t fill_calls = 0, fill_rows = 0, validate_rows = 0, compiles = 0, compile_hits = 0;
    int64_t tokenize_calls = 0, tokenize_misses = 0;  // LlguidanceTokenizer::tokenize: asked, not yet kept
  };
  Counters counters() const;
  // The llguidance version string (llg_get_version).
  std::string version() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace pagedrt
