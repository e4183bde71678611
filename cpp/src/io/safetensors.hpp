// io/safetensors.hpp — memory-mapped, fully validated safetensors files.
//
// File layout:
//   [u64 little-endian N][N bytes JSON header][data section]
//   header: {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]},
//            ..., "__metadata__": {string: string}}
// Offsets are relative to the data section. Before any tensor is handed out,
// open() checks: N within the file and <= kMaxHeaderBytes; the JSON is valid;
// every dtype is known; prod(shape) * dtype size == end - begin (no overflow);
// 0 <= begin <= end <= data size; tensors do not overlap. Any failure throws
// pagedrt::Error(InvalidModel) whose message starts with the file path.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace pagedrt {

// All safetensors dtypes are parsed; the model loader accepts F32, F16, BF16.
enum class DType { F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL, F8_E4M3, F8_E5M2 };

size_t dtype_size(DType dtype);
const char* dtype_name(DType dtype);  // the safetensors spelling, e.g. "BF16"

struct TensorView {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;  // points into the mapping; valid while the file is open
  size_t nbytes = 0;
  std::string file;               // path of the file it lives in, for messages

  int64_t numel() const;
};

std::string shape_str(const std::vector<int64_t>& shape);  // "[3, 4]", for messages

constexpr uint64_t kMaxHeaderBytes = 100ull << 20;  // 100 MiB

// Parses and validates a whole safetensors image held in memory (what open()
// does to the mapped file); the views point into `bytes`. Throws as open(),
// naming `path`. The fuzz target cpp/fuzz/fuzz_safetensors.cpp drives this.
std::vector<TensorView> parse_safetensors(const uint8_t* bytes, uint64_t size, const std::string& path);

class SafetensorsFile {
 public:
  static std::unique_ptr<SafetensorsFile> open(const std::string& path);
  ~SafetensorsFile();  // unmaps
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  const std::vector<TensorView>& tensors() const { return tensors_; }
  const TensorView* find(const std::string& name) const;  // nullptr when absent

 private:
  SafetensorsFile() = default;
  std::string path_;
  void* map_ = nullptr;
  size_t map_size_ = 0;
  std::vector<TensorView> tensors_;
  std::map<std::string, size_t> index_;
};

// A model folder's weights: `model.safetensors`, or the shards listed in
// `model.safetensors.index.json` ({"weight_map": {tensor: shard file}}).
// Shard names must stay inside the folder; every tensor the index lists must
// be in the shard it names; a tensor name in two shards is an error.
class Checkpoint {
 public:
  static Checkpoint open(const std::string& model_dir);

  bool has(const std::string& name) const;
  // Throws InvalidModel "<dir>: tensor 'name' is missing" when absent.
  const TensorView& get(const std::string& name) const;
  std::vector<std::string> names() const;
  const std::string& dir() const { return dir_; }
  // Drops the mapped pages wholly inside every tensor whose name starts with
  // `prefix` from this process's memory (madvise MADV_DONTNEED; they stay in
  // the page cache, and a later read maps them again). A loader that has
  // copied a layer's weights calls it, so that loading holds about the model
  // once, not the copies and the whole mapped file together (SmolLM2: peak
  // RSS 595 -> 340 MB).
  void release(const std::string& prefix) const;

 private:
  std::string dir_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, const TensorView*> by_name_;
};

}  // namespace pagedrt
