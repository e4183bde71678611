#include "model/llama_config.hpp"

#include <cmath>

#include "io/json.hpp"
#include "pagedrt/error.hpp"

namespace pagedrt {
namespace {

[[noreturn]] void fail(const std::string& where, const std::string& msg) {
  throw Error(ErrorKind::InvalidModel, where + ": " + msg);
}

std::string field(const std::string& where, const std::string& name) {
  return where + ": field '" + name + "'";
}

const json::Value& require(const json::Value& obj, const std::string& where, const char* name) {
  const json::Value* v = obj.find(name);
  if (v == nullptr || v->is_null()) fail(where, std::string("missing required field '") + name + "'");
  return *v;
}

int64_t positive_int(const json::Value& obj, const std::string& where, const char* name) {
  int64_t v = require(obj, where, name).as_int(field(where, name));
  if (v <= 0) fail(where, std::string("field '") + name + "' must be positive, got " + std::to_string(v));
  return v;
}

int64_t optional_int(const json::Value& obj, const std::string& where, const char* name, int64_t dflt) {
  const json::Value* v = obj.find(name);
  return (v == nullptr || v->is_null()) ? dflt : v->as_int(field(where, name));
}

double optional_number(const json::Value& obj, const std::string& where, const char* name, double dflt) {
  const json::Value* v = obj.find(name);
  return (v == nullptr || v->is_null()) ? dflt : v->as_number(field(where, name));
}

bool optional_bool(const json::Value& obj, const std::string& where, const char* name, bool dflt) {
  const json::Value* v = obj.find(name);
  return (v == nullptr || v->is_null()) ? dflt : v->as_bool(field(where, name));
}

// rope_scaling (transformers 4.x) or rope_parameters (transformers 5.x): a
// dict with "rope_type" (or the older "type"), "factor", and for llama3 the
// frequency band fields. rope_parameters also carries rope_theta.
void parse_rope(const json::Value& root, const std::string& where, LlamaConfig& cfg) {
  cfg.rope_theta = optional_number(root, where, "rope_theta", cfg.rope_theta);
  const char* key = "rope_scaling";
  const json::Value* rope = root.find(key);
  if (rope == nullptr || rope->is_null()) {
    key = "rope_parameters";
    rope = root.find(key);
  }
  if (rope == nullptr || rope->is_null()) return;
  const std::string what = field(where, key);
  rope->as_object(what);
  cfg.rope_theta = optional_number(*rope, what, "rope_theta", cfg.rope_theta);
  const json::Value* type = rope->find("rope_type");
  if (type == nullptr) type = rope->find("type");
  std::string name = type == nullptr ? "default" : type->as_string(what + ".rope_type");
  if (name == "default") return;
  RopeScaling& s = cfg.rope_scaling;
  s.factor = require(*rope, what, "factor").as_number(what + ".factor");
  if (!(s.factor > 0.0)) fail(where, key + std::string(".factor must be positive"));
  if (name == "linear") {
    s.type = RopeScaling::Type::Linear;
  } else if (name == "llama3") {
    s.type = RopeScaling::Type::Llama3;
    s.low_freq_factor = require(*rope, what, "low_freq_factor").as_number(what + ".low_freq_factor");
    s.high_freq_factor = require(*rope, what, "high_freq_factor").as_number(what + ".high_freq_factor");
    s.original_max_position_embeddings = optional_int(
        *rope, what, "original_max_position_embeddings", cfg.max_position_embeddings);
    if (!(s.high_freq_factor > s.low_freq_factor) || !(s.low_freq_factor > 0.0))
      fail(where, key + std::string(": llama3 needs 0 < low_freq_factor < high_freq_factor"));
    if (s.original_max_position_embeddings <= 0)
      fail(where, key + std::string(".original_max_position_embeddings must be positive"));
  } else {
    fail(where, key + std::string(".rope_type '") + name +
                    "' is not supported (supported: default, linear, llama3)");
  }
}

std::vector<int32_t> token_ids(const json::Value* v, const std::string& what) {
  std::vector<int32_t> out;
  if (v == nullptr || v->is_null()) return out;
  auto one = [&](const json::Value& x) {
    int64_t id = x.as_int(what);
    if (id < 0 || id > INT32_MAX) throw Error(ErrorKind::InvalidModel, what + ": token id out of range");
    out.push_back(static_cast<int32_t>(id));
  };
  if (v->is_array()) {
    for (const json::Value& x : v->as_array(what)) one(x);
  } else {
    one(*v);
  }
  return out;
}

LlamaConfig from_value(const json::Value& root, const std::string& where) {
  LlamaConfig cfg;
  root.as_object(where);

  const json::Value* archs = root.find("architectures");
  if (archs == nullptr || archs->is_null() || archs->as_array(field(where, "architectures")).empty()) {
    const json::Value* mt = root.find("model_type");
    std::string model_type = mt ? mt->as_string(field(where, "model_type")) : "";
    if (model_type == "llama") cfg.architecture = "LlamaForCausalLM";
    else if (model_type == "mistral") cfg.architecture = "MistralForCausalLM";
    else fail(where, "missing field 'architectures' (and no model_type llama/mistral)");
  } else {
    cfg.architecture = archs->as_array("")[0].as_string(field(where, "architectures"));
  }
  if (cfg.architecture != "LlamaForCausalLM" && cfg.architecture != "MistralForCausalLM")
    fail(where, "architecture '" + cfg.architecture +
                    "' is not supported (supported: LlamaForCausalLM, MistralForCausalLM)");

  cfg.hidden_size = positive_int(root, where, "hidden_size");
  cfg.intermediate_size = positive_int(root, where, "intermediate_size");
  cfg.num_layers = positive_int(root, where, "num_hidden_layers");
  cfg.num_heads = positive_int(root, where, "num_attention_heads");
  cfg.num_kv_heads = optional_int(root, where, "num_key_value_heads", cfg.num_heads);
  cfg.vocab_size = positive_int(root, where, "vocab_size");
  cfg.max_position_embeddings = optional_int(root, where, "max_position_embeddings", 2048);
  cfg.rms_norm_eps = optional_number(root, where, "rms_norm_eps", 1e-6);
  cfg.tie_word_embeddings = optional_bool(root, where, "tie_word_embeddings", false);

  if (cfg.num_kv_heads <= 0 || cfg.num_heads % cfg.num_kv_heads != 0)
    fail(where, "num_attention_heads (" + std::to_string(cfg.num_heads) +
                    ") must be a multiple of num_key_value_heads (" + std::to_string(cfg.num_kv_heads) + ")");
  cfg.head_dim = optional_int(root, where, "head_dim", 0);
  if (cfg.head_dim == 0) {
    if (cfg.hidden_size % cfg.num_heads != 0)
      fail(where, "hidden_size is not a multiple of num_attention_heads and no head_dim is given");
    cfg.head_dim = cfg.hidden_size / cfg.num_heads;
  }
  if (cfg.head_dim <= 0 || cfg.head_dim % 2 != 0 || cfg.head_dim > 1024)
    fail(where, "head_dim must be even and in (0, 1024], got " + std::to_string(cfg.head_dim));
  if (cfg.max_position_embeddings <= 0) fail(where, "max_position_embeddings must be positive");
  if (!(cfg.rms_norm_eps > 0.0)) fail(where, "rms_norm_eps must be positive");
  // Sizes far beyond any released model are a broken file, not a big model.
  if (cfg.hidden_size > (1 << 20) || cfg.intermediate_size > (1 << 22) || cfg.num_layers > 4096 ||
      cfg.num_heads > 4096 || cfg.vocab_size > (1 << 26))
    fail(where, "a size field is implausibly large");

  if (optional_bool(root, where, "attention_bias", false))
    fail(where, "attention_bias=true is not supported yet");
  if (optional_bool(root, where, "mlp_bias", false)) fail(where, "mlp_bias=true is not supported yet");
  const json::Value* act = root.find("hidden_act");
  if (act != nullptr && !act->is_null() && act->as_string(field(where, "hidden_act")) != "silu")
    fail(where, "hidden_act '" + act->as_string("") + "' is not supported (only silu)");

  parse_rope(root, where, cfg);
  if (!(cfg.rope_theta > 0.0)) fail(where, "rope_theta must be positive");

  std::vector<int32_t> bos = token_ids(root.find("bos_token_id"), field(where, "bos_token_id"));
  cfg.bos_token_id = bos.empty() ? -1 : bos[0];
  cfg.eos_token_ids = token_ids(root.find("eos_token_id"), field(where, "eos_token_id"));
  for (int32_t id : cfg.eos_token_ids)
    if (id >= cfg.vocab_size) fail(where, "eos_token_id " + std::to_string(id) + " is outside the vocabulary");
  if (cfg.bos_token_id >= cfg.vocab_size) cfg.bos_token_id = -1;
  const json::Value* dt = root.find("torch_dtype");
  if (dt == nullptr || dt->is_null()) dt = root.find("dtype");
  if (dt != nullptr && dt->is_string()) cfg.torch_dtype = dt->as_string("");
  cfg.quant = parse_quantization(root.find("quantization_config"), where);
  return cfg;
}

}  // namespace

LlamaConfig LlamaConfig::from_file(const std::string& path) {
  return from_value(json::parse_file(path), path);
}

LlamaConfig LlamaConfig::from_json_text(const std::string& text, const std::string& where) {
  return from_value(json::parse(text, where), where);
}

// Same arithmetic as transformers (fp32 inverse frequencies), so that RoPE
// angles agree to the last bit for the positions tests use.
std::vector<double> LlamaConfig::rope_inv_freq() const {
  const int64_t half = head_dim / 2;
  std::vector<double> inv(half);
  for (int64_t i = 0; i < half; ++i) {
    float exponent = static_cast<float>(2 * i) / static_cast<float>(head_dim);
    float f = 1.0f / static_cast<float>(std::pow(rope_theta, static_cast<double>(exponent)));
    inv[i] = f;
  }
  const RopeScaling& s = rope_scaling;
  if (s.type == RopeScaling::Type::Linear) {
    for (double& f : inv) f = static_cast<float>(f / s.factor);
  } else if (s.type == RopeScaling::Type::Llama3) {
    const double old_len = static_cast<double>(s.original_max_position_embeddings);
    const double low_wavelen = old_len / s.low_freq_factor;
    const double high_wavelen = old_len / s.high_freq_factor;
    for (double& f : inv) {
      const double wavelen = 2.0 * M_PI / f;
      double g = wavelen > low_wavelen ? f / s.factor : f;
      if (!(wavelen < high_wavelen) && !(wavelen > low_wavelen)) {
        const double smooth = (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
        g = (1.0 - smooth) * g / s.factor + smooth * g;
      }
      f = static_cast<float>(g);
    }
  }
  return inv;
}

}  // namespace pagedrt
