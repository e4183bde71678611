"""pagedrt-chat, the console script, on the default model."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = dict(os.environ, PAGEDRT_CACHE=str(tmp_path_factory.mktemp("cache")))
    return e


def test_one_shot_answer(env):
    exe = shutil.which("pagedrt-chat")
    cmd = [exe] if exe else [sys.executable, "-m", "pagedrt.chat"]
    out = subprocess.run(cmd + ["--prompt", "What is the capital of France?", "--max-tokens", "24",
                                "--system", "Answer in one short sentence.", "--temperature", "0"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
    assert "tok/s" in out.stdout and "TTFT" in out.stdout


def test_interactive_session(env):
    """Two turns through stdin, history kept, then /quit."""
    cmd = [sys.executable, "-m", "pagedrt.chat", "--max-tokens", "16", "--seed", "1"]
    out = subprocess.run(cmd, input="Say hello.\n/reset\nWhat is 2+2?\n/quit\n", env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("tok/s") == 2


def test_bad_model_path_is_a_clear_error(env, tmp_path):
    out = subprocess.run([sys.executable, "-m", "pagedrt.chat", "--model", str(tmp_path / "nope")],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "nope" in out.stderr and "Traceback" not in out.stderr


def test_bad_sampling_flag_is_a_clear_error(env):
    out = subprocess.run([sys.executable, "-m", "pagedrt.chat", "--top-p", "0"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "top_p" in out.stderr and "Traceback" not in out.stderr
