// bindings/python_exit.hpp — taking the GIL safely around interpreter exit,
// for code on threads of the engine's (an engine, mask or poll thread).
#pragma once

#include <nanobind/nanobind.h>
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

// A Python object kept by C++, which may drop it on a thread of its own: the
// reference goes with the GIL taken, or is left when the interpreter exits.
class PyRef {
 public:
  explicit PyRef(nanobind::object o) : p_(o.release().ptr()) {}
  PyRef(const PyRef&) = delete;
  PyRef& operator=(const PyRef&) = delete;
  ~PyRef() {
    if (py_finalizing()) return;
    with_gil([this] { Py_DECREF(p_); });
  }
  nanobind::handle get() const { return p_; }  // call with the GIL held

 private:
  PyObject* p_;
};
