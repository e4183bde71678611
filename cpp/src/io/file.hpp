// io/file.hpp — an open regular file (model files are read or mapped through it).
#pragma once

#include <cstdint>
#include <string>

namespace pagedrt {

class RegularFile {
 public:
  // Throws Error(InvalidModel) "<path>: cannot open / cannot stat / not a regular file".
  explicit RegularFile(const std::string& path);
  ~RegularFile();  // closes the descriptor
  RegularFile(const RegularFile&) = delete;
  RegularFile& operator=(const RegularFile&) = delete;

  int fd() const { return fd_; }
  uint64_t size() const { return size_; }
  // The whole content; throws Error(InvalidModel) "<path>: cannot read: ...".
  std::string read_all() const;

 private:
  std::string path_;
  int fd_ = -1;
  uint64_t size_ = 0;
};

}  // namespace pagedrt
