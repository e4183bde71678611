// model/llama_config.hpp — the fields of a Llama-family config.json we use.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "model/quantization.hpp"

namespace pagedrt {

struct RopeScaling {
  enum class Type { None, Linear, Llama3 };
  Type type = Type::None;
  double factor = 1.0;
  double low_freq_factor = 1.0;                 // llama3 only
  double high_freq_factor = 4.0;                // llama3 only
  int64_t original_max_position_embeddings = 0; // llama3 only
};

struct LlamaConfig {
  std::string architecture;     // "LlamaForCausalLM" or "MistralForCausalLM"
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_layers = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;     // GQA: num_heads % num_kv_heads == 0
  int64_t head_dim = 0;         // given, or hidden_size / num_heads
  int64_t vocab_size = 0;
  int64_t max_position_embeddings = 0;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  bool tie_word_embeddings = false;
  int32_t bos_token_id = -1;    // -1: none
  std::vector<int32_t> eos_token_ids;
  std::string torch_dtype;      // as written, may be empty
  QuantConfig quant;            // quantization_config (fp8 weights), none when absent

  // Parses and validates `path` (config.json). Throws Error(InvalidModel)
  // naming the file and the field for anything missing, mistyped, out of
  // range or unsupported.
  static LlamaConfig from_file(const std::string& path);
  static LlamaConfig from_json_text(const std::string& text, const std::string& where);

  // RoPE inverse frequencies after scaling: head_dim / 2 values.
  std::vector<double> rope_inv_freq() const;
};

}  // namespace pagedrt
