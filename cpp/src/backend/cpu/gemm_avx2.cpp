// The AVX2/FMA GEMM, built with -mavx2 -mfma (CMakeLists.txt) on x86-64 only;
// gemm.cpp calls it only when the processor has both.
#if defined(__x86_64__) && defined(__AVX2__) && defined(__FMA__)
#define PAGEDRT_GEMM_ISA 1
#define PAGEDRT_GEMM_NS avx2
#include "backend/cpu/gemm_kernel.inc"
#endif
