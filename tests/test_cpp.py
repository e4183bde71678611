"""The C++ side, driven from pytest so that the README's test command runs it:

- the library installed with ``cmake --install`` and the example service
  (examples/cpp_service) built against it with ``find_package(pagedrt)``;
- the C++ unit tests (cpp/tests/) plain (through ctest), under ThreadSanitizer
  and under AddressSanitizer + UndefinedBehaviorSanitizer;
- the parser fuzz targets (cpp/fuzz/): the committed corpora in tests/fuzz/
  replayed under ASan+UBSan, and a time-bounded libFuzzer run with clang.

Each variant configures its own CMake tree (-O1 -g for the sanitizers) in a
temporary folder, or under $PAGEDRT_CPP_BUILD_DIR to keep the trees between
runs. $PAGEDRT_FUZZ_SECONDS (default 20) bounds each fuzzer; 0 skips that run.
A test skips, saying why, only when a tool it needs (cmake, a C++ compiler,
clang's libFuzzer) is not installed.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_tiny_llama

REPO = Path(__file__).resolve().parents[1]
FUZZ_CORPORA = REPO / "tests" / "fuzz"
CMAKE = shutil.which("cmake")
NINJA = shutil.which("ninja")
CXX = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
CLANG = shutil.which("clang++")

pytestmark = [
    pytest.mark.skipif(CMAKE is None, reason="cmake is not installed (pip install cmake)"),
    pytest.mark.skipif(CXX is None, reason="no C++ compiler (c++/g++) on PATH"),
]

SANITIZERS = {
    "tsan": "-fsanitize=thread",
    "asan": "-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined",
}
SAN_ENV = {
    "TSAN_OPTIONS": "halt_on_error=1 second_deadlock_stack=1",
    "ASAN_OPTIONS": "halt_on_error=1:detect_leaks=1:strict_string_checks=1",
    "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
}


def _run(cmd, *, env=None, timeout=900, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], env={**os.environ, **(env or {})}, cwd=cwd,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)


def _check(proc: subprocess.CompletedProcess, what: str) -> str:
    assert proc.returncode == 0, f"{what} failed (exit {proc.returncode}):\n{proc.stdout[-6000:]}"
    return proc.stdout


BUILD_OUTPUT: dict[Path, str] = {}  # the compiler output of each tree's last build


def cmake_build(src: Path, build: Path, targets: list[str], defines: dict[str, str]) -> Path:
    """Configures (once) and builds `targets` of the CMake project `src` in `build`."""
    gen = ["-G", "Ninja"] if NINJA else []
    args = [f"-D{k}={v}" for k, v in {"PAGEDRT_CUDA": "OFF", **defines}.items()]
    if not (build / "CMakeCache.txt").exists():
        _check(_run([CMAKE, "-S", src, "-B", build, *gen, *args]), f"configuring {build.name}")
    else:
        _check(_run([CMAKE, build, *args]), f"reconfiguring {build.name}")
    tgt = [a for t in targets for a in ("--target", t)]
    BUILD_OUTPUT[build] = _check(_run([CMAKE, "--build", build, "-j", "2", *tgt]), f"building {build.name}")
    return build


@pytest.fixture(scope="module")
def build_root(tmp_path_factory) -> Path:
    keep = os.environ.get("PAGEDRT_CPP_BUILD_DIR")
    root = Path(keep) if keep else tmp_path_factory.mktemp("cpp")
    root.mkdir(parents=True, exist_ok=True)
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path, _ = make_tiny_llama(tmp_path_factory.mktemp("cpp_model") / "tiny", head_dim=32)
    return path


def sanitizer_build(build_root: Path, kind: str, targets: list[str], **extra) -> Path:
    flags = SANITIZERS[kind]
    defines = {"CMAKE_BUILD_TYPE": "RelWithDebInfo", "CMAKE_CXX_FLAGS_RELWITHDEBINFO": "-O1 -g",
               "CMAKE_CXX_FLAGS": flags, "CMAKE_EXE_LINKER_FLAGS": flags.split(" -f")[0],
               "CMAKE_CXX_COMPILER": CXX, "PAGEDRT_BUILD_TESTS": "ON", "PAGEDRT_INSTALL": "OFF", **extra}
    if kind == "tsan":
        # libgomp is not built with TSan: its barriers look like races. The
        # engine's own threads and locks are what this build checks.
        defines["CMAKE_DISABLE_FIND_PACKAGE_OpenMP"] = "ON"
    return cmake_build(REPO, build_root / kind, targets, defines)


def run_sanitized(binary: Path, args=(), env=None, timeout=900) -> str:
    """Runs a sanitizer build; reruns under `setarch -R` (no ASLR) when TSan
    cannot map its shadow memory on a kernel with high mmap entropy."""
    env = {**SAN_ENV, **(env or {})}
    proc = _run([binary, *args], env=env, timeout=timeout)
    if proc.returncode != 0 and "unexpected memory mapping" in proc.stdout and shutil.which("setarch"):
        proc = _run(["setarch", os.uname().machine, "-R", binary, *args], env=env, timeout=timeout)
    out = _check(proc, binary.name)
    assert "WARNING: ThreadSanitizer" not in out and "ERROR: AddressSanitizer" not in out, out[-6000:]
    assert "runtime error:" not in out, out[-6000:]  # UBSan
    return out


# ---- the installed package and the example service --------------------------------------

def test_install_and_example_service(build_root, model_dir, tmp_path):
    build = cmake_build(REPO, build_root / "release", ["all"],
                        {"CMAKE_BUILD_TYPE": "Release", "PAGEDRT_BUILD_TESTS": "ON"})
    # Warning-free with the project's flags (-Wall -Wextra; an up-to-date tree prints nothing).
    assert "warning:" not in BUILD_OUTPUT[build], BUILD_OUTPUT[build][-6000:]
    # The plain unit tests, as a developer runs them: ctest in the build tree.
    out = _check(_run(["ctest", "--output-on-failure", "-E", "test_llguidance_masks"], cwd=build,
                      env={"PAGEDRT_TEST_MODEL": str(model_dir)}), "ctest")
    assert "100% tests passed" in out and "Skipped" not in out, out
    prefix = tmp_path / "prefix"
    _check(_run([CMAKE, "--install", build, "--prefix", prefix]), "cmake --install")
    assert (prefix / "include" / "pagedrt" / "runtime.hpp").is_file()
    assert list(prefix.glob("lib*/libpagedrt.a")), sorted(prefix.rglob("*"))
    assert list(prefix.glob("lib*/cmake/pagedrt/pagedrtConfig.cmake"))
    # A separate project: find_package(pagedrt) against the prefix only.
    svc = cmake_build(REPO / "examples" / "cpp_service", tmp_path / "svc", ["cpp_service"],
                      {"CMAKE_PREFIX_PATH": str(prefix), "CMAKE_BUILD_TYPE": "Release"})
    out = _check(_run([svc / "cpp_service", model_dir, "8", "12"], timeout=300), "cpp_service")
    m = re.search(r"(\d+) requests in .*?(\d+) completed, (\d+) cancelled, (\d+) lost", out)
    assert m and m.group(1) == "96" and m.group(4) == "0", out
    assert int(m.group(2)) + int(m.group(3)) == 96, out
    readme_program(prefix, tmp_path)


def readme_program(prefix: Path, tmp_path: Path):
    """The README's C++ program, built against the installed package as written:
    it prints a greedy answer's token ids, and a bad folder is a caught, named error."""
    code = re.search(r"```cpp\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S).group(1)
    src = tmp_path / "readme"
    src.mkdir()
    (src / "hello.cpp").write_text(code)
    (src / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.18)\nproject(hello LANGUAGES CXX)\nset(CMAKE_CXX_STANDARD 17)\n"
        "find_package(pagedrt REQUIRED)\nadd_executable(hello hello.cpp)\n"
        "target_link_libraries(hello PRIVATE pagedrt::pagedrt)\n")
    build = cmake_build(src, tmp_path / "readme-build", ["hello"],
                        {"CMAKE_PREFIX_PATH": str(prefix), "CMAKE_BUILD_TYPE": "Release"})
    model, _ = make_tiny_llama(tmp_path / "vocab3000", vocab_size=3000)   # the program's ids go up to 2936
    out = _check(_run([build / "hello", model], timeout=120), "README hello")
    assert 0 < len([int(t) for t in out.split()]) <= 16, out  # stops early at the eos id
    bad = _run([build / "hello", tmp_path / "no-such-folder"], timeout=60)
    assert bad.returncode == 1 and "hello: model path" in bad.stdout and "is not a folder" in bad.stdout, bad.stdout


# ---- structured output from C++ -------------------------------------------------------------

def llguidance_env() -> dict[str, str]:
    """Where cpp/tests/test_llguidance_masks.cpp finds llguidance's C API: the
    Python wheel's library, which needs libpython's symbols (a shared
    libpython, opened first). Empty when this Python has none."""
    import sysconfig

    import llguidance
    libpython = Path(sysconfig.get_config_var("LIBDIR") or "/") / (sysconfig.get_config_var("LDLIBRARY") or "-")
    if not (sysconfig.get_config_var("Py_ENABLE_SHARED") and libpython.is_file()):
        return {}
    return {"PAGEDRT_TEST_LLGUIDANCE": llguidance._lib.__file__, "PAGEDRT_TEST_LIBPYTHON": str(libpython)}


def test_structured_output_from_cpp(build_root, model_dir):
    """cpp/tests/test_llguidance_masks.cpp: a C++ Runtime with LlguidanceMasks."""
    env = llguidance_env()
    if not env:
        pytest.skip("this Python has no shared libpython: the wheel's llguidance library cannot be "
                    "loaded outside a Python process")
    build = cmake_build(REPO, build_root / "release", ["test_llguidance_masks"],
                        {"CMAKE_BUILD_TYPE": "Release", "PAGEDRT_BUILD_TESTS": "ON"})
    out = _check(_run([build / "test_llguidance_masks"], timeout=300,
                      env={"PAGEDRT_TEST_MODEL": str(model_dir), **env}), "test_llguidance_masks")
    assert "SKIPPED" not in out and re.search(r"\d+ passed, 0 failed", out), out


# ---- the C++ unit tests under sanitizers ----------------------------------------------------

@pytest.mark.parametrize("kind", ["tsan", "asan"])
def test_unit_tests_sanitized(build_root, model_dir, kind):
    build = sanitizer_build(build_root, kind, ["test_parsers", "test_runtime_threads", "test_speculation",
                                               "test_collectives", "test_helper_thread", "test_llguidance_masks",
                                               "test_rank_threads", "test_team"])
    for name in ["test_parsers", "test_speculation", "test_collectives", "test_helper_thread", "test_rank_threads",
                 "test_team"]:
        assert re.search(r" 0 failed", run_sanitized(build / name)), name
    out = run_sanitized(build / "test_runtime_threads", env={"PAGEDRT_TEST_MODEL": str(model_dir)})
    assert "SKIPPED" not in out and re.search(r"\d+ passed, 0 failed", out), out
    env = llguidance_env()
    if env:  # the mask pool's threads and locks (llguidance's own code is not instrumented)
        out = run_sanitized(build / "test_llguidance_masks", env={"PAGEDRT_TEST_MODEL": str(model_dir), **env})
        assert "SKIPPED" not in out and re.search(r"\d+ passed, 0 failed", out), out


# ---- fuzzing ------------------------------------------------------------------------------

TARGETS = {"fuzz_safetensors": FUZZ_CORPORA / "safetensors", "fuzz_config": FUZZ_CORPORA / "config"}


def test_fuzz_corpora_replay(build_root):
    """Every committed corpus file (seeds, inputs the fuzzer kept, crashers
    found and fixed) through the parsers under ASan+UBSan."""
    build = sanitizer_build(build_root, "asan", list(TARGETS), PAGEDRT_BUILD_FUZZERS="ON")
    for target, corpus in TARGETS.items():
        files = [p for p in corpus.iterdir() if p.is_file()]
        assert len(files) >= 5, corpus
        out = run_sanitized(build / target, [corpus])
        assert f"replayed {len(files)} inputs" in out, out


@pytest.mark.skipif(CLANG is None, reason="clang++ is not installed: no libFuzzer "
                                          "(apt-get install clang libclang-rt-14-dev; .ci/run does)")
@pytest.mark.parametrize("target", list(TARGETS))
def test_libfuzzer_bounded(build_root, tmp_path, target):
    seconds = int(os.environ.get("PAGEDRT_FUZZ_SECONDS", "20"))
    if seconds <= 0:
        pytest.skip("PAGEDRT_FUZZ_SECONDS=0")
    flags = "-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
    build = cmake_build(REPO, build_root / "libfuzzer", list(TARGETS), {
        "CMAKE_CXX_COMPILER": CLANG, "CMAKE_BUILD_TYPE": "RelWithDebInfo",
        "CMAKE_CXX_FLAGS_RELWITHDEBINFO": "-O1 -g", "CMAKE_CXX_FLAGS": flags,
        "CMAKE_EXE_LINKER_FLAGS": "-fsanitize=address,undefined", "PAGEDRT_BUILD_FUZZERS": "ON",
        "PAGEDRT_FUZZ_ENGINE": "libfuzzer", "PAGEDRT_INSTALL": "OFF",
        "CMAKE_DISABLE_FIND_PACKAGE_OpenMP": "ON"})
    work = tmp_path / "corpus"  # new inputs land here, not in the committed corpus
    work.mkdir()
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    proc = _run([build / target, work, TARGETS[target], f"-max_total_time={seconds}", "-max_len=4096",
                 "-timeout=10", "-rss_limit_mb=2048", "-print_final_stats=1",
                 f"-artifact_prefix={artifacts}/"], env=SAN_ENV, timeout=seconds + 300)
    crashers = sorted(artifacts.iterdir())
    assert proc.returncode == 0 and not crashers, (
        f"{target} found {[str(c) for c in crashers]}: fix the parser, then copy the input into "
        f"{TARGETS[target]} so that it stays a regression test\n{proc.stdout[-6000:]}")
    runs = re.search(r"stat::number_of_executed_units:\s*(\d+)", proc.stdout)
    assert runs and int(runs.group(1)) > 1000, proc.stdout[-3000:]
    print(f"{target}: {runs.group(1)} executions in {seconds} s, {len(list(work.iterdir()))} new inputs",
          file=sys.stderr)
