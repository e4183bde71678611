// The portable GEMM: plain C++ (the compiler may still vectorise it).
#define PAGEDRT_GEMM_ISA 0
#define PAGEDRT_GEMM_NS scalar
#include "backend/cpu/gemm_kernel.inc"
