// bindings/testing.cpp — pagedrt._testing: hooks into the core's insides for
// the tests and the benchmarks (block manager, scheduler, sampler, CPU GEMM, single
// backend ops, the safetensors reader). Not part of the public API: it is
// built against the private headers (cpp/src) and may change at any time.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "backend/team.hpp"
#include "io/safetensors.hpp"
#include "pagedrt/error.hpp"

namespace nb = nanobind;
using namespace nb::literals;

void register_block_manager(nb::module_& m);  // block_manager.cpp
void register_scheduler(nb::module_& m);      // scheduler.cpp
void register_sampler(nb::module_& m);        // sampler.cpp
void register_kernels(nb::module_& m);        // kernels.cpp
void register_ops(nb::module_& m);            // ops.cpp

namespace {

nb::list inspect_checkpoint(const std::string& dir) {
  pagedrt::Checkpoint ckpt = pagedrt::Checkpoint::open(dir);
  nb::list out;
  for (const std::string& name : ckpt.names()) {
    const pagedrt::TensorView& t = ckpt.get(name);
    nb::dict d;
    d["name"] = name;
    d["dtype"] = pagedrt::dtype_name(t.dtype);
    d["shape"] = t.shape;
    d["file"] = t.file;
    out.append(d);
  }
  return out;
}

}  // namespace

NB_MODULE(_testing, m) {
  m.doc() = "pagedrt test hooks: the core's insides, for tests and benchmarks (not a public API)";
  // pagedrt::Error from these hooks raises the same Python classes as the API does.
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const pagedrt::Error& e) {
      const char* name = e.kind() == pagedrt::ErrorKind::InvalidModel      ? "ModelError"
                         : e.kind() == pagedrt::ErrorKind::InvalidArgument ? "InvalidArgument"
                         : e.kind() == pagedrt::ErrorKind::Unsupported     ? "Unsupported"
                                                                           : "Error";
      nb::object cls = nb::module_::import_("pagedrt.errors").attr(name);
      PyErr_SetString(cls.ptr(), e.what());
    }
  });
  register_block_manager(m);
  register_scheduler(m);
  register_sampler(m);
  register_kernels(m);
  register_ops(m);
  m.def(
      "cgroup_cpu_limit",
      [](const std::string& proc_cgroup, const std::string& root) {
        return pagedrt::cgroup_cpu_limit(proc_cgroup.c_str(), root.c_str());
      },
      "proc_cgroup"_a, "root"_a, "The CPUs a cgroup quota gives (0: none), read from a /proc/self/cgroup file and a mount root.");
  m.def("host_processors", &pagedrt::host_processors, "The processors the CPU backend counts as this process's.");
  m.def("inspect_checkpoint", &inspect_checkpoint, "model_dir"_a,
        "List the tensors of a model folder's safetensors checkpoint (validates every file).");
}
