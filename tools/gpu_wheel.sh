#!/usr/bin/env bash
# tools/gpu_wheel.sh — builds pagedrt's CUDA wheel here, for the GPU host's Python, so that a GPU call
# installs it in seconds instead of compiling (100-300 s of device time on a fresh machine; ~2.5 min
# on this 2-core VM, which has nvcc but no GPU). Run from the repo root after changing any source:
#
#   bash tools/gpu_wheel.sh          # -> .devcarry_c/pagedrt-*-cp312-*.whl and .devcarry_c/wheel.sources
#
# The GPU host runs Python 3.12 (/opt/torch/.venv, KINDS.md), so the wheel is built with a local 3.12
# ($PY312, default pyenv's), against cuBLASLt from PyPI's nvidia-cublas 13.0 (this machine's CUDA 13.0
# toolkit has nvcc and no cuBLAS; the wheel loads the host's libcublasLt.so.13: gpu_check.sh puts the
# toolkit's lib folder on LD_LIBRARY_PATH). wheel.sources lists the sources it was built from with
# their sha256 and how many files cpp/, third_party/ and python/ hold (__pycache__ aside): gpu_check.sh's build stage installs the
# wheel only where every listed file is unchanged and none was added, else it compiles as before.
# Its C++ is built for the GPU hosts' Xeons (-march=sapphirerapids, $WHEEL_MARCH; AVX-512 BF16 and AMX,
# as a build there with -march=native has them), not for this machine: a host whose processor cannot
# run it fails the build stage's import check, and the stage compiles there.
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/wheel_sources.sh
PY312=${PY312:-$(ls -d /root/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null | tail -1)}
[ -x "$PY312" ] || { echo "no Python 3.12 here (set PY312): the GPU host's is 3.12" >&2; exit 1; }
$PY312 -m pip install -q nanobind scikit-build-core cmake ninja "nvidia-cublas==13.0.*" 2>&1 | grep -v WARNING || true
rm -rf build/gpu_wheel .devcarry_c/pagedrt-*.whl
mkdir -p .devcarry_c
echo "building the CUDA wheel with $PY312 (sm_90a; a few minutes on 2 cores)..."
time $PY312 -m pip wheel . -q --no-build-isolation --no-deps -w .devcarry_c \
  -Ccmake.define.PAGEDRT_CUDA=ON -Ccmake.define.PAGEDRT_NATIVE=OFF \
  -Ccmake.define.CMAKE_CXX_FLAGS="-march=${WHEEL_MARCH:-sapphirerapids}" -Cbuild-dir=build/gpu_wheel
{
  wheel_sources_count
  git ls-files -co --exclude-standard cpp python third_party CMakeLists.txt pyproject.toml | sort | xargs sha256sum
} > .devcarry_c/wheel.sources
ls -la .devcarry_c/pagedrt-*.whl
git check-ignore -q .devcarry_c || { echo ".devcarry_c is not git-ignored" >&2; exit 1; }
