"""Reliability at the edges of a host process:

- shutdown: a Python process that exits with requests in flight and never
  calls close() (plain exit, an uncaught exception, a thread still polling,
  sys.exit from a worker's request) neither hangs nor crashes;
- loading never executes code from the model folder: no pickle, no
  auto_map/remote code, chat templates in a sandbox;
- paths: shard names from the index stay inside the folder; symlinked files
  are followed (the Hugging Face cache links every file into ../../blobs) but
  must end in a regular file; a folder missing a file says which.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap

import pytest

import pagedrt
from pagedrt import _core, _testing


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from conftest import make_tiny_llama
    path, _ = make_tiny_llama(tmp_path_factory.mktemp("rel") / "m", hidden_size=64, intermediate_size=128,
                              num_attention_heads=4, num_key_value_heads=2)
    return path


def copy_model(model, dest):
    shutil.copytree(model, dest)
    return dest


# ---- shutdown at interpreter exit ---------------------------------------------------------

EXIT_SCRIPTS = {
    "plain-exit": "",
    "uncaught-exception": "raise SystemExit('leaving with requests in flight')",
    "thread-still-polling": """
        t = threading.Thread(target=lambda: [rt.poll(timeout=0.05) for _ in range(10**9)], daemon=True)
        t.start(); time.sleep(0.1)
    """,
    "runtime-in-a-cycle": """
        class Holder: pass
        h = Holder(); h.rt = rt; h.me = h; del rt
    """,
    "core-runtime-only": """
        core = rt._rt; del rt
        core.submit([1, 2, 3], pagedrt.SamplingParams(max_tokens=500, ignore_eos=True)._to_core(), "")
    """,
}


@pytest.mark.parametrize("case", list(EXIT_SCRIPTS))
def test_exit_with_requests_in_flight(model, case):
    body = textwrap.dedent(EXIT_SCRIPTS[case])
    script = textwrap.dedent(f"""
        import threading, time, pagedrt
        rt = pagedrt.Runtime({str(model)!r}, device="cpu", num_threads=2)
        ids = [rt.submit([1 + i, 2, 3] * 4, max_tokens=500, ignore_eos=True) for i in range(12)]
        rt.poll(timeout=0.05)
        print("submitted", len(ids), flush=True)
    """) + body
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "submitted 12" in proc.stdout, proc.stderr[-3000:]
    assert proc.returncode in (0, 1), (proc.returncode, proc.stderr[-3000:])  # 1: the SystemExit message
    for bad in ("Fatal Python error", "Segmentation fault", "terminate called", "Aborted"):
        assert bad not in proc.stderr, proc.stderr[-3000:]


# ---- no code from the model folder ----------------------------------------------------------

MARKER_ENV = "PAGEDRT_TEST_MARKER"


class _Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant_code(folder, marker):
    """Everything a loader that runs code would trip on."""
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    (folder / "training_args.bin").write_bytes(pickle.dumps(_Payload(marker)))
    (folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    (folder / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "modeling_evil.C", "AutoModelForCausalLM": "modeling_evil.M"}
    (folder / "config.json").write_text(json.dumps(cfg))


def test_loading_never_runs_code_from_the_folder(model, tmp_path):
    folder = copy_model(model, tmp_path / "m")
    marker = tmp_path / "code-ran"
    plant_code(folder, marker)
    with pagedrt.Runtime(folder, device="cpu") as rt:
        assert rt.generate([5, 6, 7], max_tokens=3, temperature=0)[0].outputs[0].token_ids
    _testing.inspect_checkpoint(str(folder))
    assert not marker.exists()


def test_a_pickle_only_folder_is_refused(model, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copy(model / "config.json", folder)
    marker = tmp_path / "code-ran"
    plant_code(folder, marker)
    with pytest.raises(FileNotFoundError, match="not a model folder: no model.safetensors"):
        pagedrt.Runtime(folder, device="cpu")
    with pytest.raises(pagedrt.ModelError, match="no model.safetensors or model.safetensors.index.json"):
        _testing.inspect_checkpoint(str(folder))  # the C++ loader refuses it too
    assert not marker.exists()


def test_chat_template_runs_in_a_sandbox(tmp_path):
    from conftest import train_sentencepiece
    from pagedrt.tokenizer import Tokenizer
    folder = train_sentencepiece(tmp_path / "tok")
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = ("{{ ''.__class__.__mro__[1].__subclasses__() }}"
                            "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = Tokenizer.from_model_dir(folder)
    with pytest.raises(Exception) as err:  # jinja2's SecurityError, or pagedrt's wrapper of it
        tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert "unsafe" in str(err.value).lower() or "security" in type(err.value).__name__.lower(), err.value


# ---- paths and missing files ---------------------------------------------------------------------

def sharded(model, dest):
    """The model as a one-shard checkpoint with an index."""
    folder = copy_model(model, dest)
    names = [t["name"] for t in _testing.inspect_checkpoint(str(folder))]
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: "model-00001-of-00001.safetensors" for n in names}}))
    return folder


def test_symlinked_files_are_followed_like_the_hf_cache(model, tmp_path):
    # snapshots/<rev>/<file> -> ../../blobs/<hash>: links that leave the folder.
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    snap = tmp_path / "snapshots" / "rev"
    snap.mkdir(parents=True)
    for f in model.iterdir():
        shutil.copy(f, blobs / f.name)
        (snap / f.name).symlink_to(os.path.relpath(blobs / f.name, snap))
    with pagedrt.Runtime(snap, device="cpu") as rt:
        assert rt.generate([5, 6, 7], max_tokens=2, temperature=0)[0].outputs[0].token_ids


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/x.safetensors", "..", ""])
def test_index_shard_names_stay_in_the_folder(model, tmp_path, shard):
    folder = sharded(model, tmp_path / "m")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = shard
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(pagedrt.ModelError, match="not a plain file name inside the model folder"):
        pagedrt.Runtime(folder, device="cpu")


@pytest.mark.parametrize("target", ["/dev/zero", "dir", "loop", "dangling"])
def test_a_shard_link_must_end_in_a_regular_file(model, tmp_path, target):
    folder = sharded(model, tmp_path / "m")
    link = folder / "model-00001-of-00001.safetensors"
    link.unlink()
    if target == "dir":
        (tmp_path / "d").mkdir()
        link.symlink_to(tmp_path / "d")
    elif target == "loop":
        link.symlink_to(link)
    elif target == "dangling":
        link.symlink_to(tmp_path / "nothing-here")
    else:
        link.symlink_to(target)
    with pytest.raises(pagedrt.ModelError, match="model-00001-of-00001.safetensors"):
        pagedrt.Runtime(folder, device="cpu")


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors", "shard"])
def test_a_missing_file_is_named(model, tmp_path, missing):
    folder = sharded(model, tmp_path / "m") if missing == "shard" else copy_model(model, tmp_path / "m")
    if missing == "shard":
        (folder / "model-00001-of-00001.safetensors").unlink()
        expect = "model-00001-of-00001.safetensors: cannot open"
    else:
        (folder / missing).unlink()
        expect = f"not a model folder: no {missing}"
    with pytest.raises((pagedrt.ModelError, FileNotFoundError), match=expect):
        pagedrt.Runtime(folder, device="cpu")
