"""The README's Python examples run as written, and the package ships its stubs."""
from __future__ import annotations

import pathlib
import re

import pytest

import pagedrt

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.parametrize("i", range(len(python_blocks())))
def test_readme_example_runs(i, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PAGEDRT_CACHE", str(tmp_path / "cache"))
    exec(compile(python_blocks()[i], f"README.md python block {i}", "exec"), {})
    out = capsys.readouterr().out
    assert out.strip()                       # the example printed its results
    if "capital of France" in python_blocks()[i]:
        assert "Paris" in out


def test_type_stubs_are_installed():
    core = pathlib.Path(pagedrt._core.__file__)
    stub = core.parent / "_core.pyi"
    assert stub.is_file() and (core.parent / "py.typed").is_file()
    text = stub.read_text()
    for name in ("class Runtime", "def submit", "def poll", "class SamplingParams", "class Event", "class Stats"):
        assert name in text
