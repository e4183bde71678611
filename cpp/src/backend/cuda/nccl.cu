#include "backend/cuda/nccl.hpp"

#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <string>

#include "backend/cuda/cuda_backend.hpp"
#include "backend/cuda/cuda_check.hpp"
#include "pagedrt/error.hpp"

namespace pagedrt::cuda {
namespace {

// NCCL's C ABI (nccl.h): results, data types and the reduction are ints.
using NcclComm = struct ncclComm*;
using NcclResult = int;
constexpr int kNcclFloat32 = 7, kNcclBfloat16 = 9, kNcclSum = 0;
constexpr NcclResult kNcclInProgress = 7;

struct NcclLib {
  NcclResult (*comm_init_all)(NcclComm*, int, const int*) = nullptr;
  NcclResult (*all_reduce)(const void*, void*, size_t, int, int, NcclComm, cudaStream_t) = nullptr;
  NcclResult (*all_gather)(const void*, void*, size_t, int, NcclComm, cudaStream_t) = nullptr;
  NcclResult (*comm_abort)(NcclComm) = nullptr;
  NcclResult (*comm_destroy)(NcclComm) = nullptr;
  const char* (*error_string)(NcclResult) = nullptr;
  NcclResult (*get_version)(int*) = nullptr;
  NcclResult (*async_error)(NcclComm, NcclResult*) = nullptr;  // ncclCommGetAsyncError
  std::string error;  // why it could not be loaded; empty when it was
};

const NcclLib& nccl() {
  static NcclLib lib;
  static std::once_flag once;
  std::call_once(once, [] {
    const char* env = std::getenv("PAGEDRT_NCCL_LIBRARY");
    const std::string path = env != nullptr && *env != '\0' ? env : "libnccl.so.2";
    void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (h == nullptr) {
      const char* why = dlerror();
      lib.error = "cannot load NCCL from '" + path + "' (" + (why ? why : "?") +
                  "): install the nvidia-nccl wheel of your CUDA (pip install nvidia-nccl-cu13) or set "
                  "PAGEDRT_NCCL_LIBRARY to libnccl.so.2";
      return;
    }
    auto sym = [&](const char* name) {
      void* p = dlsym(h, name);
      if (p == nullptr && lib.error.empty()) lib.error = path + " has no symbol " + name;
      return p;
    };
    lib.comm_init_all = reinterpret_cast<decltype(lib.comm_init_all)>(sym("ncclCommInitAll"));
    lib.all_reduce = reinterpret_cast<decltype(lib.all_reduce)>(sym("ncclAllReduce"));
    lib.all_gather = reinterpret_cast<decltype(lib.all_gather)>(sym("ncclAllGather"));
    lib.comm_abort = reinterpret_cast<decltype(lib.comm_abort)>(sym("ncclCommAbort"));
    lib.comm_destroy = reinterpret_cast<decltype(lib.comm_destroy)>(sym("ncclCommDestroy"));
    lib.error_string = reinterpret_cast<decltype(lib.error_string)>(sym("ncclGetErrorString"));
    lib.get_version = reinterpret_cast<decltype(lib.get_version)>(sym("ncclGetVersion"));
    lib.async_error = reinterpret_cast<decltype(lib.async_error)>(sym("ncclCommGetAsyncError"));
    int version = 0;
    if (lib.error.empty() && (lib.get_version(&version) != 0 || version < 21000))  // bf16 came in 2.10
      lib.error = path + " is NCCL " + std::to_string(version) + "; pagedrt needs 2.10 or newer (bf16)";
  });
  if (!lib.error.empty()) throw Error(ErrorKind::Unsupported, "tensor_parallel_size > 1 on CUDA: " + lib.error);
  return lib;
}

void check(NcclResult r, const std::string& what) {
  if (r != 0) throw Error(ErrorKind::Runtime, "NCCL " + what + ": " + nccl().error_string(r));
}

// The communicators of every rank, from one ncclCommInitAll. A rank that
// fails only marks the group aborted: the other ranks may be inside an NCCL
// call at that moment, and NCCL waits, to free a communicator, for the CUDA
// graphs that captured it. The communicators go when the group does, after
// every rank's recordings (ModelRunner::release): destroyed, or aborted (which
// also ends the collectives the failed rank never joined) after a failure.
struct NcclGroup {
  std::vector<NcclComm> comms;
  std::atomic<bool> aborted{false};

  ~NcclGroup() {
    for (NcclComm c : comms) aborted.load() ? nccl().comm_abort(c) : nccl().comm_destroy(c);
  }
};

class NcclCollectives final : public Collectives {
 public:
  NcclCollectives(std::shared_ptr<NcclGroup> group, int rank, cudaStream_t stream)
      : group_(std::move(group)), rank_(rank), stream_(stream) {}
  int rank() const override { return rank_; }
  int size() const override { return static_cast<int>(group_->comms.size()); }

  void all_reduce_sum(Tensor& x, int64_t numel) override {
    if (x.dtype != ScalarType::F32 && x.dtype != ScalarType::BF16)
      throw Error(ErrorKind::Runtime, std::string("all_reduce_sum: dtype ") + scalar_name(x.dtype) +
                                          " (F32 or BF16 only)");
    check_live();
    check(nccl().all_reduce(x.data, x.data, static_cast<size_t>(numel),
                            x.dtype == ScalarType::F32 ? kNcclFloat32 : kNcclBfloat16, kNcclSum, comm(), stream_),
          "all-reduce (rank " + std::to_string(rank_) + ")");
  }

  int64_t gather_scratch(int64_t rows, int64_t cols) const override { return size() * rows * cols; }

  // Every rank's part into every rank's scratch (NCCL has no gather), then
  // rank 0 lays them side by side.
  void gather_columns(const Tensor& part, int64_t rows, int64_t cols, Tensor& out, int64_t out_cols,
                      Tensor& scratch) override {
    check_live();
    check(nccl().all_gather(part.data, scratch.data, static_cast<size_t>(rows * cols), kNcclFloat32, comm(), stream_),
          "all-gather (rank " + std::to_string(rank_) + ")");
    if (rank_ != 0 || rows == 0) return;
    for (int r = 0; r < size(); ++r) {
      const int64_t first = r * cols, width = std::min(out_cols, first + cols) - first;
      if (width <= 0) continue;
      CUDA_CHECK(cudaMemcpy2DAsync(out.as<float>() + first, static_cast<size_t>(out_cols) * 4,
                                   scratch.as<float>() + r * rows * cols, static_cast<size_t>(cols) * 4,
                                   static_cast<size_t>(width) * 4, static_cast<size_t>(rows),
                                   cudaMemcpyDeviceToDevice, stream_));
    }
  }

  void abort() override { group_->aborted = true; }
  std::string async_error() const override {
    NcclResult r = 0;
    if (group_->aborted.load() || nccl().async_error(comm(), &r) != 0 || r == 0 || r == kNcclInProgress) return {};
    return std::string("NCCL (rank ") + std::to_string(rank_) + "): " + nccl().error_string(r);
  }
  // An aborted NCCL group cannot be brought back (its communicators are
  // gone, and recorded steps hold them): every later step fails.
  void recover() override { check_live(); }

 private:
  NcclComm comm() const { return group_->comms[static_cast<size_t>(rank_)]; }
  void check_live() const {
    if (group_->aborted.load())
      throw Error(ErrorKind::Runtime,
                  "tensor-parallel step aborted: a rank failed (its error was reported) and the NCCL group is gone; "
                  "create the Runtime again");
  }

  std::shared_ptr<NcclGroup> group_;
  const int rank_;
  cudaStream_t stream_;
};

}  // namespace

std::vector<std::unique_ptr<Collectives>> nccl_collectives(const std::vector<CudaBackend*>& ranks) {
  const NcclLib& lib = nccl();
  auto group = std::make_shared<NcclGroup>();
  std::vector<int> devices;
  for (const CudaBackend* b : ranks) devices.push_back(b->device_index());
  group->comms.resize(ranks.size());
  const NcclResult r = lib.comm_init_all(group->comms.data(), static_cast<int>(ranks.size()), devices.data());
  if (r != 0) group->comms.clear();  // nothing to destroy
  check(r, "set-up of " + std::to_string(ranks.size()) + " ranks (ncclCommInitAll)");
  std::vector<std::unique_ptr<Collectives>> out;
  for (size_t r = 0; r < ranks.size(); ++r)
    out.push_back(std::make_unique<NcclCollectives>(group, static_cast<int>(r), ranks[r]->stream()));
  return out;
}

}  // namespace pagedrt::cuda
