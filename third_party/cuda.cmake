# third_party/cuda.cmake — the CUDA toolkit and cuBLASLt, from the system or PyPI.
#
# In:  PAGEDRT_CUDA (AUTO, ON, OFF), PAGEDRT_CUBLAS_ROOT (optional folder with
#      include/cublasLt.h and lib/libcublasLt.so*).
# Out: PAGEDRT_WITH_CUDA (ON when nvcc and cuBLASLt were found), PAGEDRT_CUDA_SOURCES,
#      PAGEDRT_CUBLASLT_INCLUDE, PAGEDRT_CUBLASLT_LIB.
#
# cuBLASLt is looked for in the toolkit, then in PAGEDRT_CUBLAS_ROOT, then in
# the pip wheel nvidia-cublas of the Python doing the build. Without them the
# core is CPU-only and device="cuda" says so; PAGEDRT_CUDA=ON makes that an error.
set(PAGEDRT_WITH_CUDA OFF)
set(PAGEDRT_CUBLAS_ROOT "" CACHE PATH "A folder with include/cublasLt.h and lib/libcublasLt.so*")
if(NOT PAGEDRT_CUDA STREQUAL "OFF")
  file(GLOB PAGEDRT_CUDA_SOURCES CONFIGURE_DEPENDS cpp/src/backend/cuda/*.cu cpp/src/backend/cuda/*.cpp)
  include(CheckLanguage)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER AND PAGEDRT_CUDA_SOURCES)
    find_package(CUDAToolkit)
    set(_cublas_hints ${PAGEDRT_CUBLAS_ROOT})
    set(_py "${Python_EXECUTABLE}")
    if(NOT _py)
      find_program(_py NAMES python3 python)
    endif()
    if(_py)
      execute_process(COMMAND "${_py}" -c
        "import importlib.util as u, os; s = u.find_spec('nvidia'); print(';'.join(os.path.join(p, d) for p in (s.submodule_search_locations if s else []) for d in ('cu13', 'cublas')))"
        OUTPUT_VARIABLE _pip_cublas OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
      list(APPEND _cublas_hints ${_pip_cublas})
    endif()
    find_path(PAGEDRT_CUBLASLT_INCLUDE cublasLt.h
      HINTS ${CUDAToolkit_INCLUDE_DIRS} ${_cublas_hints} PATH_SUFFIXES include)
    find_library(PAGEDRT_CUBLASLT_LIB NAMES cublasLt libcublasLt.so.13 libcublasLt.so.12
      HINTS ${CUDAToolkit_LIBRARY_DIR} ${_cublas_hints} PATH_SUFFIXES lib lib64)
    if(CUDAToolkit_FOUND AND PAGEDRT_CUBLASLT_INCLUDE AND PAGEDRT_CUBLASLT_LIB)
      set(PAGEDRT_WITH_CUDA ON)
    endif()
  endif()
  if(PAGEDRT_CUDA STREQUAL "ON" AND NOT PAGEDRT_WITH_CUDA)
    message(FATAL_ERROR "PAGEDRT_CUDA=ON but nvcc (${CMAKE_CUDA_COMPILER}) or cuBLASLt "
                        "(${PAGEDRT_CUBLASLT_INCLUDE}, ${PAGEDRT_CUBLASLT_LIB}) was not found")
  endif()
endif()
