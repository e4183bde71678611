# third_party/threads.cmake — threads (required) and OpenMP (optional: the CPU
# kernels run single-threaded without it; TSan builds turn it off because
# libgomp is not instrumented).
find_package(Threads REQUIRED)
find_package(OpenMP)
