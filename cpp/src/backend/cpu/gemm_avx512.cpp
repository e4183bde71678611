// The AVX-512F GEMM, built with -mavx512f -mfma (CMakeLists.txt) on x86-64 only;
// gemm.cpp calls it only when the processor has AVX-512F.
#if defined(__x86_64__) && defined(__AVX512F__)
#define PAGEDRT_GEMM_ISA 2
#define PAGEDRT_GEMM_NS avx512
#include "backend/cpu/gemm_kernel.inc"
#endif
