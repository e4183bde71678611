#include "backend/tensor.hpp"

#include <cstdlib>
#include <cstring>
#include <new>

#include "pagedrt/error.hpp"

namespace pagedrt {

size_t scalar_size(ScalarType t) {
  switch (t) {
    case ScalarType::F32: return 4;
    case ScalarType::BF16: return 2;
    case ScalarType::I32: return 4;
    case ScalarType::I64: return 8;
    case ScalarType::F8E4M3: return 1;
  }
  return 0;
}

const char* scalar_name(ScalarType t) {
  switch (t) {
    case ScalarType::F32: return "float32";
    case ScalarType::BF16: return "bfloat16";
    case ScalarType::I32: return "int32";
    case ScalarType::I64: return "int64";
    case ScalarType::F8E4M3: return "float8_e4m3fn";
  }
  return "?";
}

int64_t Tensor::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string Tensor::shape_str() const {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + ")";
}

Tensor host_empty(std::vector<int64_t> shape, ScalarType dtype) {
  Tensor t;
  t.shape = std::move(shape);
  t.dtype = dtype;
  t.device = Device::CPU;
  size_t bytes = t.nbytes();
  size_t rounded = (bytes + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, rounded == 0 ? 64 : rounded);
  if (p == nullptr)
    throw Error(ErrorKind::Runtime, "out of host memory allocating " + std::to_string(bytes) + " bytes");
  t.storage = std::shared_ptr<void>(p, [](void* q) { std::free(q); });
  t.data = p;
  return t;
}

float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t u;
  if (exp == 0) {
    if (mant == 0) {
      u = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while ((mant & 0x400u) == 0) { mant <<= 1; --exp; }
      mant &= 0x3ffu;
      u = sign | (exp << 23) | (mant << 13);
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (mant << 13);
  } else {
    u = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

}  // namespace pagedrt
