// bindings/kernels.cpp — CPU kernel test hooks: every GEMM variant on numpy inputs.
//   _core._gemm_variants() -> ["scalar", "avx2", ...]; _core._gemm_variant() -> the one in use
//   _core._gemm(x (n, k) f32, w (m, k) f32 or uint16 bf16 bits, variant, threads) -> (n, m) f32
// Not part of the public API.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "backend/cpu/gemm.hpp"
#include "pagedrt/error.hpp"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

using Mat = nb::ndarray<nb::c_contig, nb::device::cpu, nb::ndim<2>>;

nb::ndarray<nb::numpy, float, nb::ndim<2>> gemm(Mat x, Mat w, const std::string& variant, int threads) {
  if (x.dtype() != nb::dtype<float>()) throw pagedrt::Error(pagedrt::ErrorKind::InvalidArgument, "x must be float32");
  const bool bf16 = w.dtype() == nb::dtype<uint16_t>();
  if (!bf16 && w.dtype() != nb::dtype<float>())
    throw pagedrt::Error(pagedrt::ErrorKind::InvalidArgument, "w must be float32 or uint16 (bf16 bits)");
  const int64_t n = x.shape(0), k = x.shape(1), m = w.shape(0);
  if (static_cast<int64_t>(w.shape(1)) != k) throw pagedrt::Error(pagedrt::ErrorKind::InvalidArgument, "k mismatch");
  auto* y = new float[static_cast<size_t>(n * m)];
  nb::capsule owner(y, [](void* p) noexcept { delete[] static_cast<float*>(p); });
  {
    nb::gil_scoped_release release;
    pagedrt::cpu::gemm_with(variant, static_cast<const float*>(x.data()), w.data(), bf16, y, n, m, k, threads);
  }
  const size_t shape[2] = {static_cast<size_t>(n), static_cast<size_t>(m)};
  return nb::ndarray<nb::numpy, float, nb::ndim<2>>(y, 2, shape, owner);
}

}  // namespace

void register_kernels(nb::module_& m) {
  m.def("_gemm_variants", &pagedrt::cpu::gemm_variants);
  m.def("_gemm_variant", &pagedrt::cpu::gemm_variant);
  m.def("_gemm", &gemm, "x"_a, "w"_a, "variant"_a, "threads"_a = 1);
}
