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


def test_sampling_defaults_are_the_models_then_the_flags(env, tmp_path):
    """The model's generation_config.json settings, the chat's own where it has none (the default
    model), a flag over either; the line under the banner says which."""
    from types import SimpleNamespace

    from pagedrt.chat import _FALLBACK, _flags, _sampling

    exe = shutil.which("pagedrt-chat")
    cmd = [exe] if exe else [sys.executable, "-m", "pagedrt.chat"]
    out = subprocess.run(cmd + ["--prompt", "Hi.", "--max-tokens", "4", "--seed", "1"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "sampling: temperature 0.7, top_p 0.9 (pagedrt-chat's defaults;" in out.stdout
    assert out.stdout.startswith("pagedrt-chat: SmolLM2-135M-Instruct (")  # the cache folder's hash left out

    args = lambda **kw: SimpleNamespace(**{k: kw.get(k) for k in  # noqa: E731
                                           ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")})
    (tmp_path / "generation_config.json").write_text('{"temperature": 0.3, "top_k": 40, "eos_token_id": 2}')
    assert _sampling(_flags(args()), tmp_path) == ({**_FALLBACK, "temperature": 0.3, "top_k": 40},
                                           "the model's generation_config.json")
    assert _sampling(_flags(args(temperature=0.0, min_p=0.1)), tmp_path)[0] == {
        **_FALLBACK, "temperature": 0.0, "top_k": 40, "min_p": 0.1}
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": 2}')
    assert _sampling(_flags(args()), tmp_path) == (_FALLBACK, "pagedrt-chat's defaults")
    assert _sampling(_flags(args(top_p=0.5)), tmp_path) == ({**_FALLBACK, "top_p": 0.5}, "pagedrt-chat's defaults and flags")


def test_draft_model_gives_the_same_answer(env, smol):
    """--draft-model (the model itself here): the same greedy answer as without
    it, and the speed line says how many proposals were accepted."""
    base = [sys.executable, "-m", "pagedrt.chat", "--model", str(smol), "--prompt", "Name three fruits.",
            "--max-tokens", "24", "--temperature", "0"]
    plain = subprocess.run(base, env=env, capture_output=True, text=True, timeout=300)
    spec = subprocess.run(base + ["--draft-model", str(smol)], env=env, capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0 and spec.returncode == 0, spec.stderr
    answer = lambda out: out.stdout.split("[")[0].split("/set changes them)")[-1]  # noqa: E731  (after the banner)
    assert answer(spec) == answer(plain) and answer(plain).strip()
    assert "proposals accepted" in spec.stdout and "proposals accepted" not in plain.stdout
    bad = subprocess.run(base + ["--speculative", "draft"], env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "--draft-model" in bad.stderr and "Traceback" not in bad.stderr


def test_interactive_session(env):
    """Two turns through stdin, history kept, then /quit."""
    cmd = [sys.executable, "-m", "pagedrt.chat", "--max-tokens", "16", "--seed", "1"]
    out = subprocess.run(cmd, input="Say hello.\n/reset\nWhat is 2+2?\n/quit\n", env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("tok/s") == 2


def test_fp8_weights_and_kv_cache(env):
    """--quantization fp8 --kv-cache-dtype fp8: the banner names the fp8 weights and
    the answer is still right."""
    out = subprocess.run([sys.executable, "-m", "pagedrt.chat", "--quantization", "fp8", "--kv-cache-dtype", "fp8",
                          "--device", "cpu", "--prompt", "What is the capital of France?", "--max-tokens", "24",
                          "--system", "Answer in one short sentence.", "--temperature", "0"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "float8_e4m3fn" in out.stdout and "Paris" in out.stdout


def test_tensor_parallel_flag(env):
    """--tensor-parallel-size reaches the Runtime: SmolLM2's 9 heads do not
    divide by 2, which is a one-line error naming the field."""
    out = subprocess.run([sys.executable, "-m", "pagedrt.chat", "--device", "cpu", "--tensor-parallel-size", "2",
                          "--prompt", "Hi", "--max-tokens", "4"], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "tensor_parallel_size 2 does not divide the model's num_attention_heads (9)" in out.stderr


def test_bad_model_path_is_a_clear_error(env, tmp_path):
    out = subprocess.run([sys.executable, "-m", "pagedrt.chat", "--model", str(tmp_path / "nope")],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "nope" in out.stderr and "Traceback" not in out.stderr


def test_bad_sampling_flag_is_a_clear_error(env):
    out = subprocess.run([sys.executable, "-m", "pagedrt.chat", "--top-p", "0"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "top_p" in out.stderr and "Traceback" not in out.stderr


def spawn(env, *args):
    import pexpect
    child = pexpect.spawn(sys.executable, ["-m", "pagedrt.chat", *args], env=env, encoding="utf-8",
                          timeout=120, dimensions=(40, 200))
    child.expect("/help lists commands")
    return child


def test_driven_like_a_person(env):
    """Start, ask, watch the answer stream, /stats, Ctrl-C in the middle of an
    answer, /reset, quit — through a real pseudo-terminal."""
    child = spawn(env, "--temperature", "0", "--max-tokens", "48")
    child.expect("> ")
    child.sendline("What is the capital of France?")
    child.expect("Paris")
    child.expect(r"\[(\d+) tokens, [\d.]+ tok/s, TTFT \d+ ms, (stop|length)\]")
    child.expect("> ")
    child.sendline("/stats")
    child.expect(r"KV blocks \d+ used / \d+ free")
    child.expect("preemptions 0")
    child.expect("> ")
    child.sendline("/set max_tokens 2000")
    child.expect(r"\[max_tokens = 2000\]")
    child.expect("> ")
    child.sendline("Write a very long story about a dragon and a knight, with many chapters.")
    child.expect("chapters.\r\n")           # the echo of what was typed
    child.expect(r"\w+ \w+ \w+ \w+")       # the answer has started streaming
    child.sendintr()                      # Ctrl-C
    child.expect(r"interrupted\]")
    child.expect("> ")
    child.sendline("/stats")
    child.expect(r"KV blocks 0 used")     # the interrupted request released its blocks
    child.expect("> ")
    child.sendline("/reset")
    child.expect(r"\[conversation reset\]")
    child.expect("> ")
    child.sendline("/nonsense")
    child.expect("unknown command /nonsense")
    child.expect("> ")
    child.sendline("/quit")
    child.expect(pexpect_eof())
    child.close()
    assert child.exitstatus == 0


def pexpect_eof():
    import pexpect
    return pexpect.EOF


def test_multiline_and_context_overflow(env):
    """A continued line is one message; when the history outgrows the context the
    oldest turns are dropped, with a notice, instead of failing."""
    child = spawn(env, "--temperature", "0", "--max-tokens", "40", "--max-model-len", "160")
    for i in range(4):
        child.expect("> ")
        child.sendline(f"Tell me about the number {i} in two sentences,\\")
        child.expect(r"\.\.\. ")
        child.sendline("and mention one fact about it.")
        child.expect(r"tok/s")
    child.expect("> ")
    child.sendline("One more?")
    child.expect(r"dropped the \d+ oldest message")
    child.expect(r"tok/s")
    child.expect("> ")
    child.sendeof()                       # Ctrl-D
    child.expect(pexpect_eof())
    child.close()
    assert child.exitstatus == 0
