// backend/tensor.hpp — an owned, typed, shaped buffer on one device.
//
// Deliberately small: the model and the engine pass Tensors to backend ops,
// which trust their shapes (checked where tensors are made, at load time).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace pagedrt {

enum class Device { CPU, CUDA };
enum class ScalarType { F32, BF16, I32, I64, F8E4M3 };  // F8E4M3: fp8 KV blocks (paged_kv.hpp's Fp8Kv)

size_t scalar_size(ScalarType t);
const char* scalar_name(ScalarType t);  // "float32", "bfloat16", ...

struct Tensor {
  std::shared_ptr<void> storage;  // keeps the memory alive; data points into it
  void* data = nullptr;
  ScalarType dtype = ScalarType::F32;
  Device device = Device::CPU;
  std::vector<int64_t> shape;
  // fp8 weights (dtype F8E4M3, (rows, k)): (rows) fp32 on the same device;
  // row r's values are e4m3_to_float(code) * row_scale[r]. Null otherwise.
  std::shared_ptr<Tensor> row_scale;
  // CPU bf16 linear weights (rows, k) in cpu::pack_bf16_rows' order (each
  // task's rows k chunk by k chunk): CpuBackend::linear reads them, and
  // CpuBackend::embedding a tied embedding's table.
  bool packed = false;

  int64_t numel() const;
  int64_t dim(int i) const { return shape[i < 0 ? shape.size() + i : i]; }
  size_t nbytes() const { return static_cast<size_t>(numel()) * scalar_size(dtype); }
  bool defined() const { return data != nullptr; }
  std::string shape_str() const;  // "(3, 4)"

  template <typename T> T* as() { return static_cast<T*>(data); }
  template <typename T> const T* as() const { return static_cast<const T*>(data); }
};

// 64-byte aligned host memory, not touched (untouched pages cost nothing).
Tensor host_empty(std::vector<int64_t> shape, ScalarType dtype);

// bf16 <-> fp32 and fp16 -> fp32, bit exact (round to nearest even).
inline float bf16_to_f32(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

float f16_to_f32(uint16_t h);

// An element of an activation buffer (float, or uint16_t holding bf16 bits)
// as fp32, and an fp32 value stored into one (bf16 rounds to nearest even).
inline float to_f32(float x) { return x; }
inline float to_f32(uint16_t x) { return bf16_to_f32(x); }
inline void store_f32(float* p, float v) { *p = v; }
inline void store_f32(uint16_t* p, float v) { *p = f32_to_bf16(v); }

}  // namespace pagedrt
