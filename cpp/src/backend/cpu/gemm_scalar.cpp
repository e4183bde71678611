// The portable GEMM: plain C++ (the compiler may still vectorise it).
#define PAGEDRT_GEMM_AVX2 0
#define PAGEDRT_GEMM_NS scalar
#include "backend/cpu/gemm_kernel.inc"
