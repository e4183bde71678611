// bindings/python_exit.hpp — taking the GIL safely around interpreter exit,
// for code on threads of the engine's (an engine, mask or poll thread).
#pragma once

#include <Python.h>
#include <cxxabi.h>

#include <chrono>
#include <thread>

inline bool py_finalizing() {
#if PY_VERSION_HEX >= 0x030D0000
  return Py_IsFinalizing() != 0;
#else
  return _Py_IsFinalizing() != 0;
#endif
}

// A thread that asks for the GIL while the interpreter finalizes is ended by
// CPython < 3.14 with pthread_exit(); its forced unwind through a noexcept
// frame (a destructor, a C callback) would call std::terminate. Such a thread
// is parked instead, as CPython 3.14 itself does, until the process ends.
[[noreturn]] inline void park_forever() {
  for (;;) std::this_thread::sleep_for(std::chrono::seconds(1));
}

// Runs fn() with the GIL taken; parks the thread where finalization began
// between the caller's py_finalizing() check and the GIL (the forced unwind
// of pthread_exit() is caught, and the handler is never left).
template <class Fn>
auto with_gil(Fn&& fn) {
  PyGILState_STATE state;
  try {
    state = PyGILState_Ensure();
  } catch (abi::__forced_unwind&) {
    park_forever();
  }
  struct Release {
    PyGILState_STATE state;
    ~Release() { PyGILState_Release(state); }
  } release{state};
  return fn();
}
