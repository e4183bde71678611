// fuzz_config.cpp — config.json parsing (the JSON reader and LlamaConfig) on
// arbitrary bytes.
//
// Property: LlamaConfig::from_json_text either returns a config whose sizes
// are the validated ones (and whose RoPE frequencies can be computed), or
// throws pagedrt::Error(InvalidModel) naming the file.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#include "model/llama_config.hpp"
#include "pagedrt/error.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  try {
    const pagedrt::LlamaConfig cfg = pagedrt::LlamaConfig::from_json_text(text, "config.json");
    if (cfg.hidden_size <= 0 || cfg.num_heads <= 0 || cfg.num_kv_heads <= 0 || cfg.vocab_size <= 0 ||
        cfg.head_dim <= 0 || cfg.head_dim % 2 != 0 || cfg.num_heads % cfg.num_kv_heads != 0)
      std::abort();
    for (int32_t id : cfg.eos_token_ids)
      if (id < 0 || id >= cfg.vocab_size) std::abort();
    if (cfg.rope_inv_freq().size() != static_cast<size_t>(cfg.head_dim / 2)) std::abort();
  } catch (const pagedrt::Error& e) {
    if (e.kind() != pagedrt::ErrorKind::InvalidModel || std::strncmp(e.what(), "config.json", 11) != 0)
      std::abort();
  }
  return 0;
}
