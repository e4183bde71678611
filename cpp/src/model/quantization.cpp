#include "model/quantization.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "backend/fp8.hpp"
#include "backend/tensor.hpp"
#include "io/json.hpp"
#include "io/safetensors.hpp"
#include "pagedrt/error.hpp"

namespace pagedrt {
namespace {

// A scale tensor's values as fp32 (F32, BF16 or F16 in the file).
std::vector<float> scale_values(const TensorView& s) {
  if (s.dtype != DType::F32 && s.dtype != DType::BF16 && s.dtype != DType::F16)
    throw Error(ErrorKind::InvalidModel, s.file + ": scale tensor '" + s.name + "' has dtype " +
                                             dtype_name(s.dtype) + "; supported: F32, BF16, F16");
  std::vector<float> out(static_cast<size_t>(s.numel()));
  for (size_t i = 0; i < out.size(); ++i) {
    uint16_t h;
    if (s.dtype == DType::F32) {
      std::memcpy(&out[i], s.data + 4 * i, 4);
      continue;
    }
    std::memcpy(&h, s.data + 2 * i, 2);
    out[i] = s.dtype == DType::BF16 ? bf16_to_f32(h) : f16_to_f32(h);
  }
  return out;
}

}  // namespace

QuantConfig parse_quantization(const json::Value* q, const std::string& where) {
  QuantConfig c;
  if (q == nullptr || q->is_null()) return c;
  const std::string at = where + ": field 'quantization_config'";
  q->as_object(at);
  const json::Value* m = q->find("quant_method");
  if (m == nullptr || !m->is_string())
    throw Error(ErrorKind::InvalidModel, at + " has no quant_method string");
  c.method = m->as_string(at + ".quant_method");
  if (c.method != "fp8" && c.method != "fbgemm_fp8" && c.method != "compressed-tensors")
    throw Error(ErrorKind::Unsupported, at + ": quant_method '" + c.method +
                                            "' is not supported (fp8 checkpoints load: fp8, fbgemm_fp8, "
                                            "compressed-tensors with fp8 weights)");
  if (c.method == "compressed-tensors") {
    // "dense": no quantization (sparsity metadata only); integer packings are
    // not fp8. Any other format (absent, "mixed", per group) is checked per
    // tensor: an F8_E4M3 weight needs its scale, other dtypes are refused by name.
    const json::Value* f = q->find("format");
    const std::string format = f != nullptr && f->is_string() ? f->as_string("") : "";
    if (format == "dense") return QuantConfig{};
    if (format == "pack-quantized" || format == "int-quantized" || format == "marlin-24" ||
        format == "nvfp4-pack-quantized")
      throw Error(ErrorKind::Unsupported, at + ": compressed-tensors format '" + format +
                                              "' is not supported (fp8 weights: float-quantized, naive-quantized)");
  }
  const json::Value* b = q->find("weight_block_size");
  if (b != nullptr && !b->is_null()) {
    const std::vector<json::Value>& v = b->as_array(at + ".weight_block_size");
    if (v.size() != 2) throw Error(ErrorKind::InvalidModel, at + ".weight_block_size must be [rows, cols]");
    c.block_rows = v[0].as_int(at + ".weight_block_size");
    c.block_cols = v[1].as_int(at + ".weight_block_size");
    if (c.block_rows <= 0 || c.block_cols <= 0 || c.block_rows > (1 << 20) || c.block_cols > (1 << 20))
      throw Error(ErrorKind::InvalidModel, at + ".weight_block_size must be in [1, 2^20]");
  }
  return c;
}

namespace {

// The scales of fp8 weight `w` as a grid: s[(r / br) * ((cols - 1) / bc + 1) + c / bc] covers (r, c).
struct ScaleGrid {
  std::vector<float> s;
  int64_t br = 0, bc = 0;
};

ScaleGrid scale_grid(const Checkpoint& ckpt, const std::string& name, const TensorView& w, const QuantConfig& q) {
  const std::string what = w.file + ": fp8 tensor '" + name + "'";
  if (w.shape.size() != 2) throw Error(ErrorKind::InvalidModel, what + " is not a matrix");
  const int64_t rows = w.shape[0], cols = w.shape[1];
  const std::string per = name + "_scale", block = name + "_scale_inv";
  std::vector<float> s;
  int64_t br = 0, bc = 0;
  if (ckpt.has(per)) {
    const TensorView& t = ckpt.get(per);
    s = scale_values(t);
    const int64_t n = t.numel();
    const bool channel = n == rows && (t.shape.size() == 1 || (t.shape.size() == 2 && t.shape[1] == 1));
    if (n == 1) {
      br = rows, bc = cols;  // one block: the tensor
    } else if (channel) {
      br = 1, bc = cols;
    } else {
      throw Error(ErrorKind::InvalidModel, t.file + ": scale '" + per + "' has shape " + shape_str(t.shape) +
                                               "; for a " + shape_str(w.shape) + " weight it must be one value (per "
                                               "tensor) or [" + std::to_string(rows) + "] / [" +
                                               std::to_string(rows) + ", 1] (per channel)");
    }
  } else if (ckpt.has(block)) {
    const TensorView& t = ckpt.get(block);
    if (q.block_rows == 0)
      throw Error(ErrorKind::InvalidModel, t.file + ": block scale '" + block +
                                               "' but config.json's quantization_config has no weight_block_size");
    br = q.block_rows, bc = q.block_cols;
    const std::vector<int64_t> want = {(rows - 1) / br + 1, (cols - 1) / bc + 1};
    if (t.shape != want)
      throw Error(ErrorKind::InvalidModel, t.file + ": block scale '" + block + "' has shape " + shape_str(t.shape) +
                                               ", weight_block_size " + std::to_string(br) + " x " +
                                               std::to_string(bc) + " implies " + shape_str(want));
    s = scale_values(t);
  } else {
    throw Error(ErrorKind::InvalidModel, what + " has no scale ('" + per + "' or '" + block + "')");
  }
  for (size_t i = 0; i < s.size(); ++i)
    if (!std::isfinite(s[i]))
      throw Error(ErrorKind::InvalidModel, what + ": scale " + std::to_string(i) + " is " + std::to_string(s[i]));
  return {std::move(s), br, bc};
}

// Throws Error(InvalidModel) naming the first e4m3 NaN code of `w`.
void check_codes(const TensorView& w, const std::string& name) {
  const int64_t cols = w.shape[1];
  for (int64_t i = 0, n = w.numel(); i < n; ++i)
    if ((w.data[i] & 0x7Fu) == 0x7Fu)
      throw Error(ErrorKind::InvalidModel, w.file + ": fp8 tensor '" + name + "': element (" +
                                               std::to_string(i / cols) + ", " + std::to_string(i % cols) +
                                               ") is an e4m3 NaN");
}

}  // namespace

std::vector<float> fp8_row_scales(const Checkpoint& ckpt, const std::string& name, const TensorView& w,
                                  const QuantConfig& q) {
  const ScaleGrid g = scale_grid(ckpt, name, w, q);
  const int64_t rows = w.shape[0], cols = w.shape[1];
  if (g.bc < cols) return {};  // column blocks: no scale per row
  check_codes(w, name);
  std::vector<float> out(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) out[r] = g.s[r / g.br];
  return out;
}

std::vector<float> dequantize_fp8(const Checkpoint& ckpt, const std::string& name, const TensorView& w,
                                  const QuantConfig& q) {
  const ScaleGrid g = scale_grid(ckpt, name, w, q);
  check_codes(w, name);
  const int64_t rows = w.shape[0], cols = w.shape[1], grid_cols = (cols - 1) / g.bc + 1;
  std::vector<float> out(static_cast<size_t>(rows * cols));
  float lut[256];
  for (int i = 0; i < 256; ++i) lut[i] = e4m3_to_float(static_cast<uint8_t>(i));
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* code = w.data + r * cols;
    float* o = out.data() + r * cols;
    const float* srow = g.s.data() + (r / g.br) * grid_cols;
    for (int64_t c0 = 0; c0 < cols; c0 += g.bc) {  // a block of columns shares its scale
      const float sc = srow[c0 / g.bc];
      for (int64_t c = c0; c < std::min(cols, c0 + g.bc); ++c) o[c] = lut[code[c]] * sc;
    }
  }
  return out;
}

}  // namespace pagedrt
