// bindings/python_exit.hpp — whether the interpreter is exiting, for code that
// would take the GIL from a thread of the engine's (it must not, then).
#pragma once

#include <Python.h>

inline bool py_finalizing() {
#if PY_VERSION_HEX >= 0x030D0000
  return Py_IsFinalizing() != 0;
#else
  return _Py_IsFinalizing() != 0;
#endif
}
