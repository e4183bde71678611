// backend/cuda/tensor_map.hpp — TMA descriptors (CUtensorMap) for the kernels
// that copy tiles with the tensor memory accelerator (tma.cuh): bf16 tensors
// read in boxes with the 128-byte swizzle of wgmma's operands (wgmma.cuh).
#pragma once

#include <cuda.h>

#include <cstdint>

namespace pagedrt::cuda {

// A bf16 tensor of `rank` (2 or 3) dimensions, innermost first: dims[0]
// elements of 2 bytes contiguous (a box's first side must be 64: one 128-byte
// swizzled row), strides[i] the bytes from one index of dimension i + 1 to the
// next (multiples of 16). Boxes past the bounds read as zeros. Throws
// pagedrt::Error naming `what` and the shape when the driver refuses it.
CUtensorMap tensor_map_bf16(const void* data, int rank, const uint64_t* dims, const uint64_t* strides,
                            const uint32_t* box, const char* what);

}  // namespace pagedrt::cuda
