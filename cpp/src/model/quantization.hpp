// model/quantization.hpp — pre-quantized checkpoints: config.json's
// quantization_config, and fp8 (e4m3) weights with their scales.
//
// Three Hugging Face layouts of fp8 Llama checkpoints load:
//   per tensor   "<name>_scale" of one element (compressed-tensors "tensor")
//   per channel  "<name>_scale" of (out) or (out, 1) (fbgemm_fp8, compressed-tensors "channel")
//   block-wise   "<name>_scale_inv" of (ceil(out / bo), ceil(in / bi)), bo x bi from
//                quantization_config.weight_block_size (transformers' "fp8")
// where <name> is the weight's name ("...q_proj.weight"). A weight's value is
// its e4m3 code's value times the scale that covers it. Until the backends
// have fp8 GEMMs (issue 21) the weights are dequantized to fp32 at load and
// then stored in the Runtime's weight dtype; activations are never
// quantized (a static input_scale is ignored).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace pagedrt {

class Checkpoint;
struct TensorView;
namespace json {
class Value;
}

struct QuantConfig {
  std::string method;                      // "" (none), "fp8", "fbgemm_fp8" or "compressed-tensors"
  int64_t block_rows = 0, block_cols = 0;  // weight_block_size; 0: no blocks
  bool any() const { return !method.empty(); }
};

// config.json's quantization_config (null or absent: none; compressed-tensors
// "dense": none). Throws Error(Unsupported) naming the method or format for
// anything but fp8 weights.
QuantConfig parse_quantization(const json::Value* q, const std::string& where);

// The fp32 values of the F8_E4M3 weight `w` (named `name` in `ckpt`): its
// codes times the scales (see above). Throws Error(InvalidModel) naming the
// file and tensor when the scale is missing, its shape fits no layout, a
// scale is not finite or a code is e4m3's NaN.
std::vector<float> dequantize_fp8(const Checkpoint& ckpt, const std::string& name, const TensorView& w,
                                  const QuantConfig& q);
// Where fp8 weight `w` has one scale per row (`<name>_scale`, per tensor or
// per channel): those scales, its codes checked as dequantize_fp8 checks them,
// so the codes can be kept as they are; empty for block scales.
std::vector<float> fp8_row_scales(const Checkpoint& ckpt, const std::string& name, const TensorView& w,
                                  const QuantConfig& q);

}  // namespace pagedrt
