// test_parsers.cpp — the file parsers on bad input: JSON, safetensors,
// config.json and model folders. Every malformed input must end in
// pagedrt::Error(InvalidModel) naming the file and the problem; never a crash.
#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include "check.hpp"
#include "io/json.hpp"
#include "io/safetensors.hpp"
#include "model/llama_config.hpp"

using pagedrt::ErrorKind;

namespace {

constexpr ErrorKind kModel = ErrorKind::InvalidModel;

// [u64 LE header length][header][data]
std::string safetensors_image(const std::string& header, const std::string& data) {
  std::string out(8, '\0');
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return out + header + data;
}

std::vector<pagedrt::TensorView> parse(const std::string& image) {
  return pagedrt::parse_safetensors(reinterpret_cast<const uint8_t*>(image.data()), image.size(), "t.safetensors");
}

void write_file(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary) << bytes;
}

void test_json() {
  using pagedrt::json::parse;
  CHECK(parse(" {\"a\": [1, 2.5, \"x\", null, true]} ", "j").find("a")->as_array("a").size() == 5);
  CHECK_THROWS(parse("", "cfg.json"), kModel, "cfg.json: invalid JSON at byte 0");
  CHECK_THROWS(parse("{\"a\": 1,}", "j"), kModel, "expected a string key");
  CHECK_THROWS(parse("{\"a\": 1, \"a\": 2}", "j"), kModel, "duplicate key 'a'");
  CHECK_THROWS(parse("[1] x", "j"), kModel, "after the document");
  CHECK_THROWS(parse("\"\xff\"", "j"), kModel, "invalid UTF-8");
  CHECK_THROWS(parse("\"\xc0\xaf\"", "j"), kModel, "UTF-8");  // overlong '/'
  CHECK_THROWS(parse("\"\\ud800\"", "j"), kModel, "surrogate");
  CHECK_THROWS(parse("\"abc", "j"), kModel, "unterminated string");
  CHECK_THROWS(parse("1e999", "j"), kModel, "too large");
  CHECK(parse("1e-999", "j").as_number("n") == 0.0);
  CHECK_THROWS(parse("01", "j"), kModel, "leading zero");
  CHECK_THROWS(parse("tru", "j"), kModel, "invalid literal");
  CHECK_THROWS(parse(std::string("\"a\0b\"", 5), "j"), kModel, "control character");
  // Deep nesting is an error, not a stack overflow (100k levels would crash a naive parser).
  CHECK_THROWS(parse(std::string(100000, '['), "j"), kModel, "nesting deeper than");
  CHECK_THROWS(parse(std::string(100000, '{'), "j"), kModel, "");
  CHECK_THROWS(parse("9223372036854775808", "j").as_int("n"), kModel, "fits in 64 bits");
  CHECK(parse("2048.0", "j").as_int("n") == 2048);
  CHECK_THROWS(parse("\"x\"", "j").as_int("field 'n'"), kModel, "field 'n' must be an integer");
  CHECK_THROWS(pagedrt::json::parse_file("/nonexistent/config.json"), kModel, "/nonexistent/config.json: cannot open");
  CHECK_THROWS(pagedrt::json::parse_file("/"), kModel, "not a regular file");
}

void test_safetensors() {
  const std::string data(8, '\x01');
  const auto ok = parse(safetensors_image(
      "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},\"__metadata__\":{\"k\":\"v\"}}", data));
  CHECK(ok.size() == 1 && ok[0].nbytes == 8 && ok[0].numel() == 2);
  CHECK_THROWS(parse("1234567"), kModel, "t.safetensors: file too short");
  CHECK_THROWS(parse(std::string("\xff\xff\xff\xff\xff\xff\xff\xff", 8) + "{}"), kModel, "exceeds the limit");
  CHECK_THROWS(parse(std::string("\x10\0\0\0\0\0\0\0{}", 10)), kModel, "runs past the end of the file");
  CHECK_THROWS(parse(safetensors_image("[]", "")), kModel, "not a JSON object");
  CHECK_THROWS(parse(safetensors_image("{\"a\":{\"dtype\":\"F33\",\"shape\":[1],\"data_offsets\":[0,4]}}", data)),
               kModel, "unknown dtype 'F33'");
  CHECK_THROWS(parse(safetensors_image("{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", data)),
               kModel, "do not match dtype F32");
  CHECK_THROWS(parse(safetensors_image("{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}", data)),
               kModel, "run past the end of the data section");
  CHECK_THROWS(parse(safetensors_image("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,4]}}", data)),
               kModel, "end before begin");
  CHECK_THROWS(parse(safetensors_image("{\"a\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}", data)),
               kModel, "non-negative integer");
  CHECK_THROWS(parse(safetensors_image("{\"a\":{\"dtype\":\"F32\",\"shape\":[1.5],\"data_offsets\":[0,4]}}", data)),
               kModel, "non-negative integer");
  CHECK_THROWS(parse(safetensors_image("{\"a\":{\"dtype\":\"U8\",\"shape\":[4294967296,4294967296,2],"
                                       "\"data_offsets\":[0,8]}}", data)),
               kModel, "overflows");
  CHECK_THROWS(parse(safetensors_image("{\"a\":{\"dtype\":\"U8\",\"shape\":[1],"
                                       "\"data_offsets\":[0,99999999999999999999]}}", data)),
               kModel, "too large");
  CHECK_THROWS(parse(safetensors_image("{\"a\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4]},"
                                       "\"b\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[2,6]}}", data)),
               kModel, "overlap");
  CHECK_THROWS(parse(safetensors_image("{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1],\"x\":1}}", data)),
               kModel, "unexpected field 'x'");
  CHECK_THROWS(parse(safetensors_image("{\"a\":{\"shape\":[1],\"data_offsets\":[0,1]}}", data)), kModel,
               "missing field 'dtype'");
  CHECK_THROWS(parse(safetensors_image("{\"__metadata__\":{\"k\":1}}", "")), kModel, "__metadata__");
  // Empty tensors hold no bytes and may sit anywhere inside the data section.
  CHECK(parse(safetensors_image("{\"a\":{\"dtype\":\"F32\",\"shape\":[4611686018427387904,0],"
                                "\"data_offsets\":[8,8]}}", data))[0].numel() == 0);
}

void test_config() {
  using pagedrt::LlamaConfig;
  const std::string base =
      "\"architectures\":[\"LlamaForCausalLM\"],\"hidden_size\":64,\"intermediate_size\":128,"
      "\"num_hidden_layers\":2,\"num_attention_heads\":4,\"vocab_size\":100";
  auto cfg = [&](const std::string& extra) { return LlamaConfig::from_json_text("{" + base + extra + "}", "config.json"); };
  CHECK(cfg("").head_dim == 16);
  CHECK(cfg(",\"eos_token_id\":[1,2]").eos_token_ids.size() == 2);
  CHECK_THROWS(LlamaConfig::from_json_text("{", "config.json"), kModel, "config.json: invalid JSON");
  CHECK_THROWS(LlamaConfig::from_json_text("[]", "config.json"), kModel, "must be an object");
  CHECK_THROWS(LlamaConfig::from_json_text("{\"hidden_size\":64}", "config.json"), kModel, "architectures");
  CHECK_THROWS(LlamaConfig::from_json_text("{\"architectures\":[\"GPT2\"]}", "config.json"), kModel,
               "architecture 'GPT2' is not supported");
  CHECK_THROWS(LlamaConfig::from_json_text("{\"architectures\":[1]}", "config.json"), kModel, "must be a string");
  CHECK_THROWS(cfg(",\"num_key_value_heads\":3"), kModel, "multiple of num_key_value_heads");
  CHECK_THROWS(cfg(",\"num_key_value_heads\":0"), kModel, "num_key_value_heads");
  CHECK_THROWS(cfg(",\"head_dim\":7"), kModel, "head_dim must be even");
  CHECK_THROWS(cfg(",\"max_position_embeddings\":-1"), kModel, "max_position_embeddings");
  CHECK_THROWS(cfg(",\"rms_norm_eps\":-1"), kModel, "rms_norm_eps");
  CHECK_THROWS(cfg(",\"rope_theta\":0"), kModel, "rope_theta");
  CHECK_THROWS(cfg(",\"eos_token_id\":100"), kModel, "outside the vocabulary");
  CHECK_THROWS(cfg(",\"eos_token_id\":-1"), kModel, "out of range");
  CHECK_THROWS(cfg(",\"hidden_act\":\"gelu\""), kModel, "hidden_act 'gelu'");
  CHECK_THROWS(cfg(",\"rope_scaling\":{\"rope_type\":\"yarn\",\"factor\":2}"), kModel, "'yarn' is not supported");
  CHECK_THROWS(cfg(",\"rope_scaling\":{\"rope_type\":\"llama3\",\"factor\":8,\"low_freq_factor\":4,"
                   "\"high_freq_factor\":1}"), kModel, "low_freq_factor < high_freq_factor");
  CHECK_THROWS(cfg(",\"rope_scaling\":{\"rope_type\":\"linear\",\"factor\":-2}"), kModel, "factor must be positive");
  CHECK_THROWS(cfg(",\"rope_scaling\":[1]"), kModel, "must be an object");
  CHECK_THROWS(cfg(",\"max_position_embeddings\":1e300"), kModel, "must be an integer");
  std::string huge = "{" + base + "}";
  huge.replace(huge.find("\"vocab_size\":100"), 16, "\"vocab_size\":1000000000");
  CHECK_THROWS(LlamaConfig::from_json_text(huge, "config.json"), kModel, "implausibly large");
}

// Model folders: a missing file is named; shard names stay inside the folder.
void test_checkpoint_folders() {
  char tmpl[] = "/tmp/pagedrt_parsers_XXXXXX";
  const std::string dir = ::mkdtemp(tmpl);
  CHECK_THROWS(pagedrt::Checkpoint::open(dir), kModel, "no model.safetensors or model.safetensors.index.json");
  write_file(dir + "/model.safetensors.index.json", "{\"weight_map\":{\"a\":\"model-00001.safetensors\"}}");
  CHECK_THROWS(pagedrt::Checkpoint::open(dir), kModel, dir + "/model-00001.safetensors: cannot open");
  write_file(dir + "/model.safetensors.index.json", "{\"weight_map\":{\"a\":\"../etc/passwd\"}}");
  CHECK_THROWS(pagedrt::Checkpoint::open(dir), kModel, "not a plain file name inside the model folder");
  write_file(dir + "/model.safetensors.index.json", "{\"weight_map\":{\"a\":\"/etc/passwd\"}}");
  CHECK_THROWS(pagedrt::Checkpoint::open(dir), kModel, "not a plain file name");
  ::mkdir((dir + "/shard.safetensors").c_str(), 0700);
  write_file(dir + "/model.safetensors.index.json", "{\"weight_map\":{\"a\":\"shard.safetensors\"}}");
  CHECK_THROWS(pagedrt::Checkpoint::open(dir), kModel, "not a regular file");
  ::rmdir((dir + "/shard.safetensors").c_str());
  write_file(dir + "/shard.safetensors",
             safetensors_image("{\"b\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}", "x"));
  CHECK_THROWS(pagedrt::Checkpoint::open(dir), kModel, "does not contain it");
  write_file(dir + "/model.safetensors.index.json", "{\"weight_map\":{\"b\":\"shard.safetensors\"}}");
  CHECK(pagedrt::Checkpoint::open(dir).get("b").nbytes == 1);
  CHECK_THROWS(pagedrt::Checkpoint::open(dir).get("zz"), kModel, "tensor 'zz' is missing");
  for (const char* f : {"/model.safetensors.index.json", "/shard.safetensors"}) ::unlink((dir + f).c_str());
  ::rmdir(dir.c_str());
}

}  // namespace

int main() {
  test_json();
  test_safetensors();
  test_config();
  test_checkpoint_folders();
  return check::finish();
}
