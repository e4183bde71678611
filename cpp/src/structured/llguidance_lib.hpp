// structured/llguidance_lib.hpp — llguidance's C API, loaded at run time.
//
// llguidance (the grammar engine behind structured output) is a Rust library
// with a C API. pagedrt does not link it: the library is opened with dlopen
// from a path the caller gives, either a libllguidance.so built from its Rust
// crate or, in a Python process, the PyPI wheel's llguidance/_lib.abi3.so,
// which exports the same llg_* functions. Only the calls pagedrt makes are
// declared here, with the types of the library's llguidance.h (1.7.4 or newer:
// llg_new_tokenizer_v2 came in 1.7.0, llg_get_version in 1.7.4).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace pagedrt::llg {

struct Tokenizer;  // LlgTokenizer: opaque
struct Matcher;    // LlgMatcher: opaque

// LlgTokenizerInitV2. The library reads struct_size bytes of it, so fields it
// added later are zero here.
struct TokenizerInit {
  size_t struct_size = sizeof(TokenizerInit);
  uint32_t vocab_size = 0;
  uint32_t tok_eos = 0;
  const uint32_t* token_lens = nullptr;    // (vocab_size,)
  const uint8_t* token_bytes = nullptr;    // (sum of token_lens,); a special token's bytes start with 0xFF
  const char* tokenizer_json = nullptr;    // a HuggingFace tokenizer.json instead of the two above
  bool tokenize_assumes_string = false;
  size_t (*tokenize_fn)(const void*, const uint8_t*, size_t, uint32_t*, size_t) = nullptr;
  bool use_approximate_greedy_tokenize_fn = false;
  const void* tokenize_user_data = nullptr;
  const char* const* slices = nullptr;     // null: the library's default partitions
  const uint32_t* tok_eos_extra = nullptr;
  uint32_t tok_eos_extra_count = 0;
};

// LlgConstraintInit is filled by the library (llg_constraint_init_set_defaults)
// and never read here: it lives in a zeroed buffer larger than any version of
// it, so a newer library's extra fields cannot overrun it.
struct ConstraintInit {
  alignas(8) unsigned char bytes[1024] = {};
};

// The functions, resolved once per library path.
struct Api {
  const char* (*get_version)() = nullptr;
  Tokenizer* (*new_tokenizer_v2)(const TokenizerInit*, char* error, size_t error_len) = nullptr;
  void (*free_tokenizer)(Tokenizer*) = nullptr;
  void (*constraint_init_set_defaults)(ConstraintInit*, const Tokenizer*) = nullptr;
  int32_t (*validate_grammar)(const ConstraintInit*, const char* type, const char* data, char* message,
                              size_t message_len) = nullptr;
  Matcher* (*new_matcher)(const ConstraintInit*, const char* type, const char* data) = nullptr;
  Matcher* (*clone_matcher)(const Matcher*) = nullptr;
  void (*free_matcher)(Matcher*) = nullptr;
  const char* (*matcher_get_error)(Matcher*) = nullptr;
  bool (*matcher_is_error)(const Matcher*) = nullptr;
  size_t (*matcher_get_mask_byte_size)(const Matcher*) = nullptr;
  int32_t (*matcher_compute_mask_into)(Matcher*, uint32_t* mask, size_t mask_byte_len) = nullptr;
  int32_t (*matcher_consume_tokens)(Matcher*, const uint32_t* tokens, size_t n) = nullptr;
  int32_t (*matcher_validate_tokens)(Matcher*, const uint32_t* tokens, size_t n) = nullptr;
  int32_t (*matcher_rollback)(Matcher*, size_t n) = nullptr;
  std::string path;
};

// The API of the library at `path` (opened once, kept open for the process);
// an Error (Unsupported) naming the path and the missing symbol otherwise.
const Api& load(const std::string& path);

}  // namespace pagedrt::llg
