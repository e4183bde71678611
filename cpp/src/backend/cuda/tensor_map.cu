#include "backend/cuda/tensor_map.hpp"

#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled

#include <string>

#include "backend/cuda/cuda_check.hpp"
#include "pagedrt/error.hpp"

namespace pagedrt::cuda {
namespace {

// cuTensorMapEncodeTiled from the driver (through the runtime: no -lcuda).
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const auto fn = driver_function<PFN_cuTensorMapEncodeTiled_v12000>("cuTensorMapEncodeTiled", "TMA");
  return fn;
}

}  // namespace

CUtensorMap tensor_map_bf16(const void* data, int rank, const uint64_t* dims, const uint64_t* strides,
                            const uint32_t* box, const char* what) {
  CUtensorMap m;
  cuuint64_t d[3], s[2];
  cuuint32_t b[3], steps[3] = {1, 1, 1};
  for (int i = 0; i < rank; ++i) d[i] = dims[i], b[i] = box[i];
  for (int i = 0; i + 1 < rank; ++i) s[i] = strides[i];
  const CUresult r = tensor_map_encoder()(&m, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, rank, const_cast<void*>(data), d, s, b,
                                          steps, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                          CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    std::string shape, boxes;
    for (int i = 0; i < rank; ++i)
      shape += (i ? " x " : "") + std::to_string(dims[i]), boxes += (i ? " x " : "") + std::to_string(box[i]);
    throw Error(ErrorKind::Runtime, "cuTensorMapEncodeTiled failed (" + std::to_string(int(r)) + ") for " + what +
                                        " (" + shape + ", box " + boxes + ")");
  }
  return m;
}

}  // namespace pagedrt::cuda
