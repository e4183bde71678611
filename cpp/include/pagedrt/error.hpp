// pagedrt/error.hpp — the one exception type the C++ API throws.
//
// Every error that reaches a host names what is wrong and where (file, field,
// request). Nothing in pagedrt calls abort() or exit().
#pragma once

#include <stdexcept>
#include <string>

namespace pagedrt {

enum class ErrorKind {
  InvalidArgument,  // a caller passed a bad value (parameter, prompt, config field)
  InvalidModel,     // a model file is broken or unsupported (names the file)
  Unsupported,      // a valid request this build cannot serve (e.g. no CUDA)
  Runtime,          // anything else that went wrong while serving
};

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& message)
      : std::runtime_error(message), kind_(kind) {}
  ErrorKind kind() const noexcept { return kind_; }

 private:
  ErrorKind kind_;
};

}  // namespace pagedrt
