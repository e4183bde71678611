// fuzz_safetensors.cpp — the safetensors parser on arbitrary bytes.
//
// Property: parse_safetensors either returns views that lie inside the input
// and match their dtype and shape, or throws pagedrt::Error(InvalidModel).
// Anything else (a crash, a sanitizer report, another exception) is a bug.
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "io/safetensors.hpp"
#include "pagedrt/error.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  // A private copy, so that reads past `size` hit the sanitizer's redzone.
  uint8_t* bytes = static_cast<uint8_t*>(std::malloc(size ? size : 1));
  if (size) std::memcpy(bytes, data, size);
  try {
    const auto tensors = pagedrt::parse_safetensors(bytes, size, "fuzz.safetensors");
    for (const pagedrt::TensorView& t : tensors) {
      if (t.data < bytes || t.data + t.nbytes > bytes + size) std::abort();
      if (static_cast<uint64_t>(t.numel()) * pagedrt::dtype_size(t.dtype) != t.nbytes) std::abort();
      volatile uint8_t sink = 0;  // touch the first and last byte of every view
      if (t.nbytes) sink = static_cast<uint8_t>(t.data[0] ^ t.data[t.nbytes - 1]);
      (void)sink;
    }
  } catch (const pagedrt::Error& e) {
    if (e.kind() != pagedrt::ErrorKind::InvalidModel || std::strncmp(e.what(), "fuzz.safetensors", 16) != 0)
      std::abort();  // every error names the file
  }
  std::free(bytes);
  return 0;
}
