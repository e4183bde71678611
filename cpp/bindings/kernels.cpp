// bindings/kernels.cpp — CPU kernel test hooks: every GEMM variant on numpy inputs.
//   _testing._gemm_variants() -> ["scalar", "avx2", ...]; _testing._gemm_variant() -> the one in use
//   _testing._gemm(x (n, k), w (m, k), variant, threads) -> (n, m) f32, with x f32 and w f32 or
//   uint16 bf16 bits (gemm_f32, gemm_bf16), or both uint16 (gemm_bf16_bf16; variant "any_order":
//   deterministic=False's, gemm_bf16_bf16_any_order; "packed": W packed first, pack_bf16_rows, then
//   gemm_bf16_bf16_packed); _testing._gemm_amx_for_large_steps() -> whether it tiles;
//   _testing._packs_bf16_rows(k) -> whether linear weights of k columns are packed at load
//   _testing._e4m3_encode(x f32 (n,)) -> (n,) uint8; _testing._e4m3_decode(codes) -> (n,) f32
// Not part of the public API.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "backend/cpu/attention.hpp"
#include "backend/cpu/gemm.hpp"
#include "backend/fp8.hpp"
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
  const bool packed = variant == "packed";
  if (packed && (operands != GemmOperands::Bf16xBf16 || !pagedrt::cpu::packs_bf16_rows(k)))
    throw pagedrt::Error(pagedrt::ErrorKind::Unsupported,
                         "packed: bf16 x and w, k a multiple of 32, and a processor whose kernel packs");
  auto* y = new float[static_cast<size_t>(n * m)];
  nb::capsule owner(y, [](void* p) noexcept { delete[] static_cast<float*>(p); });
  {
    nb::gil_scoped_release release;
    if (packed) {
      std::vector<uint16_t> wp(static_cast<const uint16_t*>(w.data()), static_cast<const uint16_t*>(w.data()) + m * k);
      pagedrt::cpu::pack_bf16_rows(wp.data(), m, k, wp.data());  // in place, as CpuBackend::load_linear_weight
      pagedrt::cpu::gemm_bf16_bf16_packed(static_cast<const uint16_t*>(x.data()), wp.data(), y, n, m, k, threads);
    } else {
      pagedrt::cpu::gemm_with(variant, operands, x.data(), w.data(), y, n, m, k, threads);
    }
  }
  const size_t shape[2] = {static_cast<size_t>(n), static_cast<size_t>(m)};
  return nb::ndarray<nb::numpy, float, nb::ndim<2>>(y, 2, shape, owner);
}

// f applied to each of a 1-D array's values: the fp8 e4m3 codec (backend/fp8.hpp) both ways.
template <typename In, typename Out, typename F>
nb::ndarray<nb::numpy, Out, nb::ndim<1>> map1d(nb::ndarray<In, nb::c_contig, nb::device::cpu, nb::ndim<1>> x, F f) {
  const size_t n = x.shape(0);
  auto* y = new Out[n];
  nb::capsule owner(y, [](void* p) noexcept { delete[] static_cast<Out*>(p); });
  for (size_t i = 0; i < n; ++i) y[i] = f(x.data()[i]);
  const size_t shape[1] = {n};
  return nb::ndarray<nb::numpy, Out, nb::ndim<1>>(y, 1, shape, owner);
}

}  // namespace

void register_kernels(nb::module_& m) {
  m.def("_gemm_variants", &pagedrt::cpu::gemm_variants);
  m.def("_gemm_variant", &pagedrt::cpu::gemm_variant);
  m.def("_gemm_amx_for_large_steps", &pagedrt::cpu::gemm_amx_for_large_steps);
  m.def("_packs_bf16_rows", &pagedrt::cpu::packs_bf16_rows, "k"_a);
  m.def("_attention_amx_tiles", &pagedrt::cpu::attention_amx_tiles);  // prefill tiles the AMX attention took
  m.def("_attention_split_tokens", &pagedrt::cpu::attention_split_tokens);  // decode tokens split across threads
  m.def("_attention_split_built", &pagedrt::cpu::attention_split_built, "bf16"_a);
  m.def("_attention_split_rule", &pagedrt::cpu::attention_split_rule);
  m.def("_set_attention_split_rule", &pagedrt::cpu::set_attention_split_rule, "rule"_a);
  m.def("_gemm_prefetch", &pagedrt::cpu::gemm_prefetch_name);  // the decode kernels' prefetch hint and how it was chosen
  m.def("_calibrate_prefetch", &pagedrt::cpu::calibrate_prefetch, "threads"_a);
  m.def("_set_prefetch", [](const std::string& to) {  // this module's copy of the kernels only
    if (to != "l1" && to != "l2") throw nb::value_error("prefetch: l1 or l2");
    pagedrt::cpu::g_prefetch = to == "l2" ? pagedrt::cpu::PrefetchTo::L2 : pagedrt::cpu::PrefetchTo::L1;
  });
  m.def("_gemm", &gemm, "x"_a, "w"_a, "variant"_a, "threads"_a = 1);
  m.def("_e4m3_encode", [](nb::ndarray<float, nb::c_contig, nb::device::cpu, nb::ndim<1>> x) {
          return map1d<float, uint8_t>(x, [](float v) { return pagedrt::float_to_e4m3(v); });
        }, "x"_a, "fp8 e4m3 codes (uint8) of 1-D float32 values: nearest, ties to even, "
        "saturating at 448");
  m.def("_e4m3_decode", [](nb::ndarray<uint8_t, nb::c_contig, nb::device::cpu, nb::ndim<1>> x) {
          return map1d<uint8_t, float>(x, [](uint8_t c) { return pagedrt::e4m3_to_float(c); });
        }, "codes"_a, "the float32 values of 1-D e4m3 codes (uint8)");
}
