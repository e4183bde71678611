// bindings/kernels.cpp — CPU kernel test hooks: every GEMM variant on numpy inputs.
//   _testing._gemm_variants() -> ["scalar", "avx2", ...]; _testing._gemm_variant() -> the one in use
//   _testing._gemm(x (n, k), w (m, k), variant, threads) -> (n, m) f32, with x f32 and w f32 or
//   uint16 bf16 bits (gemm_f32, gemm_bf16), or both uint16 (gemm_bf16_bf16)
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
  using pagedrt::cpu::GemmOperands;
  const bool x_bf16 = x.dtype() == nb::dtype<uint16_t>(), w_bf16 = w.dtype() == nb::dtype<uint16_t>();
  if (!x_bf16 && x.dtype() != nb::dtype<float>())
    throw pagedrt::Error(pagedrt::ErrorKind::InvalidArgument, "x must be float32 or uint16 (bf16 bits)");
  if (!w_bf16 && w.dtype() != nb::dtype<float>())
    throw pagedrt::Error(pagedrt::ErrorKind::InvalidArgument, "w must be float32 or uint16 (bf16 bits)");
  if (x_bf16 && !w_bf16)
    throw pagedrt::Error(pagedrt::ErrorKind::InvalidArgument, "bf16 x needs bf16 w (uint16)");
  const GemmOperands operands =
      x_bf16 ? GemmOperands::Bf16xBf16 : (w_bf16 ? GemmOperands::F32xBf16 : GemmOperands::F32xF32);
  const int64_t n = x.shape(0), k = x.shape(1), m = w.shape(0);
  if (static_cast<int64_t>(w.shape(1)) != k) throw pagedrt::Error(pagedrt::ErrorKind::InvalidArgument, "k mismatch");
  auto* y = new float[static_cast<size_t>(n * m)];
  nb::capsule owner(y, [](void* p) noexcept { delete[] static_cast<float*>(p); });
  {
    nb::gil_scoped_release release;
    pagedrt::cpu::gemm_with(variant, operands, x.data(), w.data(), y, n, m, k, threads);
  }
  const size_t shape[2] = {static_cast<size_t>(n), static_cast<size_t>(m)};
  return nb::ndarray<nb::numpy, float, nb::ndim<2>>(y, 2, shape, owner);
}

}  // namespace

void register_kernels(nb::module_& m) {
  m.def("_gemm_variants", &pagedrt::cpu::gemm_variants);
  m.def("_gemm_variant", &pagedrt::cpu::gemm_variant);
  m.def("_gemm_prefetch", &pagedrt::cpu::gemm_prefetch_name);  // the decode kernels' prefetch hint and how it was chosen
  m.def("_calibrate_prefetch", &pagedrt::cpu::calibrate_prefetch, "threads"_a);
  m.def("_set_prefetch", [](const std::string& to) {  // this module's copy of the kernels only
    if (to != "l1" && to != "l2") throw nb::value_error("prefetch: l1 or l2");
    pagedrt::cpu::g_prefetch = to == "l2" ? pagedrt::cpu::PrefetchTo::L2 : pagedrt::cpu::PrefetchTo::L1;
  });
  m.def("_gemm", &gemm, "x"_a, "w"_a, "variant"_a, "threads"_a = 1);
}
