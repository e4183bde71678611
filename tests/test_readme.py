"""The README's examples run as written and print sensible answers, its
pagedrt-chat usage is the one --help prints, and the package ships its stubs.
(The C++ program in the README is built and run by tests/test_cpp.py.)"""
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
    block = python_blocks()[i]
    # Every question the block asks is answered in words; the factual ones correctly.
    questions = re.findall(r'"content": "([^"]+)"|ask\("([^"]+)"\)', block)
    assert questions, block
    assert len(out.split()) >= 8 * len(questions), out
    expect = {"capital of France": "Paris", "2 + 2": "4",
              "three colours": ("red", "blue", "green", "yellow")}
    for q, want in expect.items():
        if q in block:
            assert any(w.lower() in out.lower() for w in ([want] if isinstance(want, str) else want)), (q, out)
    if "rt.stats()" in block:
        assert "Stats(num_blocks=" in out and "blocks_used=0" in out, out


def test_chat_usage_is_what_help_prints(monkeypatch):
    from pagedrt.chat import _parser
    monkeypatch.setenv("COLUMNS", "100")
    usage = re.search(r"```\n(usage: pagedrt-chat.*?)```", README.read_text(), flags=re.S).group(1)
    assert usage.split() == _parser().format_usage().split()
    help_text = _parser().format_help()
    for default in ("(default: 512)", "generation_config.json, else 0.7)", "generation_config.json, else 0.9)",
                    "/set PARAM VALUE", "/stats", "/quit"):
        assert default in help_text


def test_type_stubs_are_installed():
    core = pathlib.Path(pagedrt._core.__file__)
    stub = core.parent / "_core.pyi"
    assert stub.is_file() and (core.parent / "py.typed").is_file()
    text = stub.read_text()
    for name in ("class Runtime", "def submit", "def poll", "class SamplingParams", "class Event", "class Stats"):
        assert name in text
