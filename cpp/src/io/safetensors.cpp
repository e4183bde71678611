// io/safetensors.cpp — mapping and validating safetensors files (see safetensors.hpp).
//
//   byte 0        8            8 + N                                  file size
//   | N (u64 LE)  | JSON header | data section: tensors at [begin, end) |
//
// Every number that sizes or places bytes (N, shape, data_offsets) is read as
// an exact integer and checked for overflow before any pointer is formed, so
// a hostile file yields an Error, never an out-of-bounds view.
#include "io/safetensors.hpp"

#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstring>

#include "io/file.hpp"
#include "io/json.hpp"
#include "pagedrt/error.hpp"

namespace pagedrt {
namespace {

[[noreturn]] void fail(const std::string& msg) { throw Error(ErrorKind::InvalidModel, msg); }

struct DTypeInfo {
  DType dtype;
  const char* name;
  size_t size;
};

constexpr DTypeInfo kDTypes[] = {
    {DType::F64, "F64", 8},    {DType::F32, "F32", 4},         {DType::F16, "F16", 2},
    {DType::BF16, "BF16", 2},  {DType::I64, "I64", 8},         {DType::I32, "I32", 4},
    {DType::I16, "I16", 2},    {DType::I8, "I8", 1},           {DType::U8, "U8", 1},
    {DType::BOOL, "BOOL", 1},  {DType::F8_E4M3, "F8_E4M3", 1}, {DType::F8_E5M2, "F8_E5M2", 1},
};

const DTypeInfo* find_dtype(const std::string& name) {
  for (const DTypeInfo& d : kDTypes)
    if (name == d.name) return &d;
  return nullptr;
}

std::string list_str(const std::vector<int64_t>& v) {
  std::string r = "[";
  for (size_t i = 0; i < v.size(); ++i) r += (i ? ", " : "") + std::to_string(v[i]);
  return r + "]";
}

// A JSON number that must be an exact integer in [0, 2^63): digits only, no
// sign, fraction or exponent (doubles would round offsets beyond 2^53).
int64_t exact_index(const json::Value& v, const std::string& what) {
  if (!v.is_number()) fail(what + " must be a non-negative integer, got a non-number");
  const std::string& t = v.number_text();
  if (t.empty() || t.find_first_not_of("0123456789") != std::string::npos)
    fail(what + " must be a non-negative integer, got " + t);
  int64_t out = 0;
  auto [end, ec] = std::from_chars(t.data(), t.data() + t.size(), out);
  if (ec != std::errc() || end != t.data() + t.size()) fail(what + " is too large (>= 2^63): " + t);
  return out;
}

// Raw placement of one tensor, before the data pointer is formed.
struct Entry {
  TensorView view;
  int64_t begin = 0, end = 0;
};

Entry parse_entry(const std::string& path, const std::string& name, const json::Value& v,
                  uint64_t data_size) {
  const std::string what = path + ": tensor '" + name + "'";
  const auto& fields = v.as_object(what);
  for (const auto& f : fields)
    if (f.first != "dtype" && f.first != "shape" && f.first != "data_offsets")
      fail(what + ": unexpected field '" + f.first + "' (expected dtype, shape, data_offsets)");
  auto field = [&](const char* key) -> const json::Value& {
    const json::Value* f = v.find(key);
    if (f == nullptr) fail(what + ": missing field '" + key + "'");
    return *f;
  };
  Entry e;
  e.view.name = name;
  e.view.file = path;

  const std::string& dtype = field("dtype").as_string(what + ": field 'dtype'");
  const DTypeInfo* info = find_dtype(dtype);
  if (info == nullptr)
    fail(what + ": unknown dtype '" + dtype + "' (supported: F64, F32, F16, BF16, I64, I32, I16, I8, U8, "
                "BOOL, F8_E4M3, F8_E5M2)");
  e.view.dtype = info->dtype;

  const auto& dims = field("shape").as_array(what + ": field 'shape'");
  bool has_zero = false;
  for (size_t i = 0; i < dims.size(); ++i) {
    e.view.shape.push_back(exact_index(dims[i], what + ": shape[" + std::to_string(i) + "]"));
    has_zero = has_zero || e.view.shape.back() == 0;
  }
  // nbytes = prod(shape) * size; a zero dimension makes it 0 whatever the others are.
  uint64_t nbytes = has_zero ? 0 : info->size;
  for (int64_t d : e.view.shape)
    if (!has_zero && __builtin_mul_overflow(nbytes, static_cast<uint64_t>(d), &nbytes))
      fail(what + ": shape " + list_str(e.view.shape) + " of " + dtype + " overflows 64-bit byte count");

  const auto& offs = field("data_offsets").as_array(what + ": field 'data_offsets'");
  if (offs.size() != 2)
    fail(what + ": data_offsets must be [begin, end], got " + std::to_string(offs.size()) + " numbers");
  e.begin = exact_index(offs[0], what + ": data_offsets[0]");
  e.end = exact_index(offs[1], what + ": data_offsets[1]");
  const std::string offs_str = "data_offsets " + list_str({e.begin, e.end});
  if (e.begin > e.end) fail(what + ": " + offs_str + " end before begin");
  if (static_cast<uint64_t>(e.end - e.begin) != nbytes)
    fail(what + ": " + offs_str + " do not match dtype " + dtype + " and shape " + list_str(e.view.shape) +
         " (" + std::to_string(nbytes) + " bytes)");
  if (static_cast<uint64_t>(e.end) > data_size)
    fail(what + ": " + offs_str + " run past the end of the data section (" + std::to_string(data_size) +
         " bytes)");
  e.view.nbytes = static_cast<size_t>(nbytes);
  return e;
}

void check_metadata(const std::string& path, const json::Value& v) {
  const std::string what = path + ": __metadata__";
  for (const auto& m : v.as_object(what))
    m.second.as_string(what + " field '" + m.first + "'");
}

// Non-empty tensors sorted by begin must not overlap; empty ones hold no bytes.
void check_overlaps(const std::string& path, const std::vector<Entry>& entries) {
  std::vector<const Entry*> order;
  for (const Entry& e : entries)
    if (e.begin != e.end) order.push_back(&e);
  std::sort(order.begin(), order.end(), [](const Entry* a, const Entry* b) { return a->begin < b->begin; });
  for (size_t i = 1; i < order.size(); ++i) {
    const Entry& a = *order[i - 1];
    const Entry& b = *order[i];
    if (b.begin < a.end)
      fail(path + ": tensors '" + a.view.name + "' " + list_str({a.begin, a.end}) + " and '" + b.view.name +
           "' " + list_str({b.begin, b.end}) + " overlap");
  }
}

std::string join(const std::string& dir, const std::string& name) {
  return (!dir.empty() && dir.back() == '/') ? dir + name : dir + "/" + name;
}

bool is_file(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

}  // namespace

size_t dtype_size(DType dtype) {
  for (const DTypeInfo& d : kDTypes)
    if (d.dtype == dtype) return d.size;
  return 0;
}

const char* dtype_name(DType dtype) {
  for (const DTypeInfo& d : kDTypes)
    if (d.dtype == dtype) return d.name;
  return "?";
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string r = "[";
  for (size_t i = 0; i < shape.size(); ++i) r += (i ? ", " : "") + std::to_string(shape[i]);
  return r + "]";
}

int64_t TensorView::numel() const {
  // A zero dimension first: [2^62, 2^62, 0] is a valid empty tensor whose
  // other dimensions overflow. Otherwise numel <= nbytes < 2^63 (checked in open).
  for (int64_t d : shape)
    if (d == 0) return 0;
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::vector<TensorView> parse_safetensors(const uint8_t* base, uint64_t size, const std::string& path) {
  if (size < 8)
    fail(path + ": file too short (" + std::to_string(size) + " bytes; needs at least the 8-byte header length)");

  uint64_t n = 0;  // little-endian, byte by byte: no alignment or host-order assumptions
  for (int i = 7; i >= 0; --i) n = (n << 8) | base[i];
  if (n > kMaxHeaderBytes)
    fail(path + ": header length " + std::to_string(n) + " exceeds the limit of " +
         std::to_string(kMaxHeaderBytes) + " bytes");
  if (n > size - 8)
    fail(path + ": header length " + std::to_string(n) + " runs past the end of the file (" +
         std::to_string(size) + " bytes)");
  const uint64_t data_size = size - 8 - n;
  const uint8_t* data = base + 8 + n;

  const json::Value header =
      json::parse(std::string_view(reinterpret_cast<const char*>(base + 8), n), path + ": header");
  if (!header.is_object()) fail(path + ": header is not a JSON object");

  std::vector<Entry> entries;
  for (const auto& m : header.as_object(path + ": header")) {
    if (m.first == "__metadata__") check_metadata(path, m.second);
    else entries.push_back(parse_entry(path, m.first, m.second, data_size));
  }
  check_overlaps(path, entries);

  std::vector<TensorView> tensors;
  tensors.reserve(entries.size());
  for (Entry& e : entries) {
    e.view.data = data + e.begin;  // begin <= end <= data_size, checked above
    tensors.push_back(std::move(e.view));
  }
  return tensors;
}

std::unique_ptr<SafetensorsFile> SafetensorsFile::open(const std::string& path) {
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());  // unmaps on any throw below
  file->path_ = path;

  const RegularFile f(path);
  const uint64_t size = f.size();
  if (size < 8)
    fail(path + ": file too short (" + std::to_string(size) + " bytes; needs at least the 8-byte header length)");
  void* map = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, f.fd(), 0);  // outlives the descriptor
  if (map == MAP_FAILED) fail(path + ": mmap failed: " + std::strerror(errno));
  file->map_ = map;
  file->map_size_ = size;
  file->tensors_ = parse_safetensors(static_cast<const uint8_t*>(map), size, path);
  for (size_t i = 0; i < file->tensors_.size(); ++i) file->index_.emplace(file->tensors_[i].name, i);
  return file;
}

SafetensorsFile::~SafetensorsFile() {
  if (map_ != nullptr) ::munmap(map_, map_size_);
}

const TensorView* SafetensorsFile::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

namespace {

// A shard name from the index must name a file directly inside the model folder.
bool plain_file_name(const std::string& s) {
  return !s.empty() && s != "." && s != ".." && s.find('/') == std::string::npos &&
         s.find('\0') == std::string::npos;
}

}  // namespace

Checkpoint Checkpoint::open(const std::string& model_dir) {
  Checkpoint ckpt;
  ckpt.dir_ = model_dir;
  const std::string index_path = join(model_dir, "model.safetensors.index.json");
  const std::string single_path = join(model_dir, "model.safetensors");

  if (!is_file(index_path)) {
    if (!is_file(single_path)) fail(model_dir + ": no model.safetensors or model.safetensors.index.json");
    ckpt.files_.push_back(SafetensorsFile::open(single_path));
    for (const TensorView& t : ckpt.files_[0]->tensors()) ckpt.by_name_[t.name] = &t;
    return ckpt;
  }

  const json::Value index = json::parse_file(index_path);
  index.as_object(index_path);
  const json::Value* map = index.find("weight_map");
  if (map == nullptr) fail(index_path + ": missing field 'weight_map'");
  const auto& entries = map->as_object(index_path + ": field 'weight_map'");
  if (entries.empty()) fail(index_path + ": weight_map is empty");

  // Open each distinct shard once, in name order.
  std::map<std::string, const SafetensorsFile*> shards;
  for (const auto& e : entries) {
    const std::string& shard = e.second.as_string(index_path + ": weight_map entry '" + e.first + "'");
    if (!plain_file_name(shard))
      fail(index_path + ": weight_map entry '" + e.first + "' names shard '" + shard +
           "', which is not a plain file name inside the model folder");
    shards.emplace(shard, nullptr);
  }
  for (auto& [shard, file] : shards) {
    ckpt.files_.push_back(SafetensorsFile::open(join(model_dir, shard)));
    file = ckpt.files_.back().get();
  }

  // Index every tensor of every shard; a name in two shards is ambiguous.
  for (const auto& file : ckpt.files_)
    for (const TensorView& t : file->tensors()) {
      auto [it, inserted] = ckpt.by_name_.emplace(t.name, &t);
      if (!inserted)
        fail(model_dir + ": tensor '" + t.name + "' is in both " + it->second->file + " and " + t.file);
    }
  for (const auto& e : entries) {
    const SafetensorsFile* file = shards.at(e.second.as_string(index_path));
    if (file->find(e.first) == nullptr)
      fail(index_path + ": tensor '" + e.first + "' is listed in shard '" + e.second.as_string(index_path) +
           "' but " + file->path() + " does not contain it");
  }
  return ckpt;
}

bool Checkpoint::has(const std::string& name) const { return by_name_.count(name) != 0; }

const TensorView& Checkpoint::get(const std::string& name) const {
  auto it = by_name_.find(name);
  if (it == by_name_.end()) fail(dir_ + ": tensor '" + name + "' is missing");
  return *it->second;
}

void Checkpoint::release(const std::string& prefix) const {
  static const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  for (auto it = by_name_.lower_bound(prefix); it != by_name_.end() && it->first.compare(0, prefix.size(), prefix) == 0;
       ++it) {
    const uintptr_t begin = (reinterpret_cast<uintptr_t>(it->second->data) + page - 1) / page * page;
    const uintptr_t end = (reinterpret_cast<uintptr_t>(it->second->data) + it->second->nbytes) / page * page;
    if (end > begin) ::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_DONTNEED);  // advice: failure is harmless
  }
}

std::vector<std::string> Checkpoint::names() const {
  std::vector<std::string> out;
  out.reserve(by_name_.size());
  for (const auto& kv : by_name_) out.push_back(kv.first);
  return out;
}

}  // namespace pagedrt
