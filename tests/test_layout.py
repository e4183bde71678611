"""The source layout keeps its rules (docs/architecture.md, "Layers"):

- in cpp/src, includes only point down: runtime, structured (structured
  output's mask provider, plugged in at the public API) -> engine -> model ->
  backend -> io; the public headers (cpp/include/pagedrt) are the ground
  floor anyone may include;
- the backend interface does not know its implementations: only
  backend/factory.cpp includes backend/cpu/ or backend/cuda/, and neither
  implementation includes the other;
- the shipped API module (pagedrt._core: cpp/bindings/module.cpp and
  llguidance_masks.cpp) includes public headers only, and the bindings' own;
  the test hooks live in pagedrt._testing.
"""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "cpp" / "src"
RANK = {"io": 0, "backend": 1, "model": 2, "engine": 3, "structured": 4, "runtime": 4}
INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)


def layer(rel: str) -> str | None:
    """The layer of a path under cpp/src (or an include spelled from there)."""
    if rel.startswith("pagedrt/"):
        return None  # public: the ground floor
    head = rel.split("/", 1)[0]
    return head if "/" in rel and head in RANK else "runtime"


def violations(files: dict[str, str]) -> list[str]:
    """files: path under cpp/src -> text. Returns one line per broken rule."""
    bad = []
    for rel, text in sorted(files.items()):
        src = layer(rel)
        for inc in INCLUDE.findall(text):
            dst = layer(inc)
            if dst is None:
                continue
            if RANK[dst] > RANK[src]:
                bad.append(f"{rel}: includes {inc} ({src} -> {dst}: points up)")
            impl = re.match(r"backend/(cpu|cuda)/", inc)
            if impl and rel.startswith("backend/") and rel.count("/") == 1 and rel != "backend/factory.cpp":
                bad.append(f"{rel}: includes {inc} (only backend/factory.cpp knows the implementations)")
            if impl and rel.startswith("backend/") and rel.count("/") == 2 and not rel.startswith(impl.group(0)):
                bad.append(f"{rel}: includes {inc} (one backend includes the other)")
    return bad


def sources(root: Path) -> dict[str, str]:
    exts = {".cpp", ".hpp", ".inc", ".cu", ".cuh"}
    return {p.relative_to(root).as_posix(): p.read_text() for p in root.rglob("*") if p.suffix in exts}


def test_includes_point_down():
    files = sources(SRC)
    assert len(files) > 40
    assert violations(files) == []


def test_the_checker_catches_each_kind_of_break():
    assert violations({"model/llama.hpp": '#include "engine/kv_cache.hpp"\n'}) == [
        "model/llama.hpp: includes engine/kv_cache.hpp (model -> engine: points up)"]
    assert violations({"io/json.cpp": '#include "runtime_thing.hpp"\n'}) == [
        "io/json.cpp: includes runtime_thing.hpp (io -> runtime: points up)"]
    assert len(violations({"backend/backend.cpp": '#include "backend/cpu/cpu_backend.hpp"\n'})) == 1
    assert len(violations({"backend/cpu/x.cpp": '#include "backend/cuda/gemm.hpp"\n'})) == 1
    assert violations({"backend/factory.cpp": '#include "backend/cuda/cuda_factory.hpp"\n',
                       "engine/engine.hpp": '#include "model/llama.hpp"\n#include "pagedrt/stats.hpp"\n'}) == []


def test_the_api_module_includes_public_headers_only():
    bindings = REPO / "cpp" / "bindings"
    for name in ("module.cpp", "llguidance_masks.cpp"):
        private = [inc for inc in INCLUDE.findall((bindings / name).read_text())
                   if not inc.startswith("pagedrt/") and not (bindings / inc).is_file()]
        assert private == [], name
