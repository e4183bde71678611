// replay_main.cpp — a main for the fuzz targets without libFuzzer: runs
// LLVMFuzzerTestOneInput on every file named on the command line (and every
// file in a named folder), so the committed corpora in tests/fuzz/ are
// regression tests under any compiler and sanitizer.
#include <dirent.h>
#include <sys/stat.h>

#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);

namespace {

int run_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    std::fprintf(stderr, "replay: cannot read %s\n", path.c_str());
    return 1;
  }
  const std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  LLVMFuzzerTestOneInput(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  int files = 0, errors = 0;
  for (int i = 1; i < argc; ++i) {
    struct stat st {};
    if (::stat(argv[i], &st) == 0 && S_ISDIR(st.st_mode)) {
      DIR* dir = ::opendir(argv[i]);
      if (dir == nullptr) { ++errors; continue; }
      while (dirent* e = ::readdir(dir)) {
        const std::string name = e->d_name;
        if (name == "." || name == "..") continue;
        errors += run_file(std::string(argv[i]) + "/" + name);
        ++files;
      }
      ::closedir(dir);
    } else {
      errors += run_file(argv[i]);
      ++files;
    }
  }
  std::printf("replayed %d inputs\n", files);
  return errors == 0 && files > 0 ? 0 : 1;
}
