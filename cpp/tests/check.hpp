// tests/check.hpp — the few assertions the C++ unit tests need (no framework).
//
//   CHECK(cond)                 fails the test (message, file, line), goes on
//   CHECK_THROWS(expr, kind, s) expr must throw pagedrt::Error of `kind` whose
//                               message contains `s`
//   return check::finish();     0 when every check passed, 1 otherwise
//   return check::skip(why);    77: ctest's SKIP_RETURN_CODE (pytest reads it too)
#pragma once

#include <atomic>
#include <cstdio>
#include <string>

#include "pagedrt/error.hpp"

namespace check {

inline std::atomic<int> failures{0};
inline std::atomic<int> passed{0};

inline void fail(const char* file, int line, const std::string& what) {
  ++failures;
  std::fprintf(stderr, "%s:%d: FAILED: %s\n", file, line, what.c_str());
}

inline int finish() {
  std::printf("%d passed, %d failed\n", passed.load(), failures.load());
  return failures.load() == 0 ? 0 : 1;
}

inline int skip(const char* why) {
  std::printf("SKIPPED: %s\n", why);
  return 77;
}

}  // namespace check

#define CHECK(cond)                                           \
  do {                                                        \
    if (cond) ++check::passed;                                \
    else check::fail(__FILE__, __LINE__, "CHECK(" #cond ")"); \
  } while (0)

#define CHECK_THROWS(expr, error_kind, substring)                                                  \
  do {                                                                                             \
    try {                                                                                          \
      (void)(expr);                                                                                \
      check::fail(__FILE__, __LINE__, "no exception from " #expr);                                 \
    } catch (const pagedrt::Error& e_) {                                                           \
      const std::string msg_ = e_.what();                                                          \
      if (e_.kind() != (error_kind)) check::fail(__FILE__, __LINE__, "wrong kind: " + msg_);       \
      else if (msg_.find(substring) == std::string::npos)                                          \
        check::fail(__FILE__, __LINE__, std::string("message lacks '") + (substring) + "': " + msg_); \
      else ++check::passed;                                                                        \
    } catch (const std::exception& e_) {                                                           \
      check::fail(__FILE__, __LINE__, std::string("not a pagedrt::Error: ") + e_.what());          \
    }                                                                                              \
  } while (0)
