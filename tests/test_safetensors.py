"""Checkpoint reading (cpp/src/io/safetensors.cpp, json.cpp) through
pagedrt._testing.inspect_checkpoint: valid fp32/fp16/bf16 files, a 2-shard index,
and one broken file per check, each asserting the file and the reason appear
in the ModelError message.

File layout, rebuilt by `write_raw` so each broken case is explicit:
    [u64 little-endian N][N bytes JSON header][data section]
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import pagedrt
from pagedrt import _testing


def write_raw(path: Path, header: bytes, data: bytes = b"") -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def write_st(path: Path, header: dict, data: bytes = b"") -> Path:
    """A safetensors file from a header dict and the data section bytes."""
    return write_raw(path, json.dumps(header).encode(), data)


def entry(dtype: str, shape: list, offsets: list) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


def inspect(model_dir: Path) -> list[dict]:
    return _testing.inspect_checkpoint(str(model_dir))


def model_error(model_dir: Path) -> str:
    with pytest.raises(pagedrt.ModelError) as info:
        inspect(model_dir)
    assert isinstance(info.value, ValueError)
    return str(info.value)


def bf16_bytes(x: np.ndarray) -> bytes:
    """bfloat16 = the high 16 bits of float32 (truncation is fine for a layout test)."""
    return (np.asarray(x, np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()


# --- valid files -------------------------------------------------------------

def test_fp32_fp16_single_file(tmp_path):
    save_file({"b.weight": np.ones((3, 4), np.float32), "a.norm": np.zeros(5, np.float16),
               "c.empty": np.zeros((0, 2), np.float32)}, str(tmp_path / "model.safetensors"))
    rows = inspect(tmp_path)
    assert [r["name"] for r in rows] == ["a.norm", "b.weight", "c.empty"]
    assert [(r["dtype"], r["shape"]) for r in rows] == [("F16", [5]), ("F32", [3, 4]), ("F32", [0, 2])]
    assert all(Path(r["file"]).name == "model.safetensors" for r in rows)


def test_bf16_and_metadata(tmp_path):
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    write_st(tmp_path / "model.safetensors",
             {"__metadata__": {"format": "pt"}, "w": entry("BF16", [2, 3], [0, 12])}, bf16_bytes(x))
    assert inspect(tmp_path) == [
        {"name": "w", "dtype": "BF16", "shape": [2, 3], "file": str(tmp_path / "model.safetensors")}]


def test_gaps_and_zero_size_tensors_are_allowed(tmp_path):
    write_st(tmp_path / "model.safetensors",
             {"a": entry("F32", [1], [8, 12]), "e": entry("F32", [0], [4, 4]), "b": entry("F32", [1], [0, 4])},
             b"\0" * 12)
    assert [(r["name"], r["shape"]) for r in inspect(tmp_path)] == [("a", [1]), ("b", [1]), ("e", [0])]


def make_two_shards(d: Path, weight_map: dict, second: dict | None = None) -> Path:
    save_file({"a": np.ones(2, np.float32), "b": np.ones((2, 2), np.float16)}, str(d / "m-1.safetensors"))
    save_file(second if second is not None else {"c": np.ones(3, np.float32)}, str(d / "m-2.safetensors"))
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d


WEIGHT_MAP = {"a": "m-1.safetensors", "b": "m-1.safetensors", "c": "m-2.safetensors"}


def test_two_shard_index(tmp_path):
    rows = inspect(make_two_shards(tmp_path, WEIGHT_MAP))
    assert [(r["name"], r["dtype"], r["shape"], Path(r["file"]).name) for r in rows] == [
        ("a", "F32", [2], "m-1.safetensors"), ("b", "F16", [2, 2], "m-1.safetensors"),
        ("c", "F32", [3], "m-2.safetensors")]


# --- broken single files: (header, data, phrase in the message) ----------------

BROKEN = {
    "bad dtype": ({"t": entry("Q7", [3], [0, 12])}, 12, "unknown dtype 'Q7'"),
    "size mismatch": ({"t": entry("F32", [3], [0, 10])}, 12,
                      "tensor 't': data_offsets [0, 10] do not match dtype F32 and shape [3] (12 bytes)"),
    "past the end": ({"t": entry("F32", [3], [4, 16])}, 12, "run past the end of the data section"),
    "end before begin": ({"t": entry("F32", [0], [8, 4])}, 12, "end before begin"),
    "overlap": ({"a": entry("F32", [3], [0, 12]), "b": entry("F32", [3], [8, 20])}, 20,
                "tensors 'a' [0, 12] and 'b' [8, 20] overlap"),
    "fractional offset": ({"t": entry("F32", [3], [0.0, 12])}, 12, "data_offsets[0] must be a non-negative integer"),
    "negative offset": ({"t": entry("F32", [3], [-12, 0])}, 12, "data_offsets[0] must be a non-negative integer"),
    "offset >= 2^63": ({"t": entry("F32", [3], [2**63, 2**63 + 12])}, 12, "data_offsets[0] is too large"),
    "three offsets": ({"t": entry("F32", [3], [0, 12, 12])}, 12, "data_offsets must be [begin, end]"),
    "negative dim": ({"t": entry("F32", [-3], [0, 12])}, 12, "shape[0] must be a non-negative integer"),
    "shape overflow": ({"t": entry("F32", [2**62, 4], [0, 0])}, 0, "overflows"),
    "missing field": ({"t": {"dtype": "F32", "shape": [3]}}, 12, "missing field 'data_offsets'"),
    "extra field": ({"t": {**entry("F32", [3], [0, 12]), "foo": 1}}, 12, "unexpected field 'foo'"),
    "dtype not a string": ({"t": entry(7, [3], [0, 12])}, 12, "field 'dtype' must be a string"),
    "entry not an object": ({"t": [0, 12]}, 0, "tensor 't' must be an object"),
    "metadata not strings": ({"__metadata__": {"k": 1}, "t": entry("F32", [1], [0, 4])}, 4,
                             "__metadata__ field 'k' must be a string"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_header(tmp_path, case):
    header, nbytes, phrase = BROKEN[case]
    path = write_st(tmp_path / "model.safetensors", header, b"\0" * nbytes)
    msg = model_error(tmp_path)
    assert msg.startswith(str(path)), msg
    assert phrase in msg, msg


RAW = {
    "empty file": (b"", "file too short"),
    "3-byte file": (b"\1\0\0", "file too short"),
    "huge header length": (struct.pack("<Q", 2**64 - 1) + b"{}", "exceeds the limit"),
    "header length past the end": (struct.pack("<Q", 1000) + b"{}", "runs past the end of the file"),
    "invalid JSON": (struct.pack("<Q", 10) + b'{"t": 1,, ', "invalid JSON at byte"),
    "header not an object": (struct.pack("<Q", 5) + b"[1,2]", "header is not a JSON object"),
    "duplicate tensor": (struct.pack("<Q", 15) + b'{"t": 1,"t": 2}', "duplicate key 't'"),
}


@pytest.mark.parametrize("case", list(RAW))
def test_broken_bytes(tmp_path, case):
    content, phrase = RAW[case]
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    msg = model_error(tmp_path)
    assert msg.startswith(str(path)), msg
    assert phrase in msg, msg


def test_truncated_data_section(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"w": np.ones(4, np.float32)}, str(path))
    path.write_bytes(path.read_bytes()[:-1])
    msg = model_error(tmp_path)
    assert str(path) in msg and "tensor 'w'" in msg and "past the end" in msg, msg


def test_empty_folder(tmp_path):
    assert model_error(tmp_path) == f"{tmp_path}: no model.safetensors or model.safetensors.index.json"


# --- broken sharded checkpoints ------------------------------------------------

def test_shard_escaping_the_folder(tmp_path):
    make_two_shards(tmp_path, {**WEIGHT_MAP, "c": "../m-2.safetensors"})
    msg = model_error(tmp_path)
    assert "model.safetensors.index.json" in msg and "'c'" in msg and "'../m-2.safetensors'" in msg, msg


def test_tensor_missing_from_its_shard(tmp_path):
    make_two_shards(tmp_path, {**WEIGHT_MAP, "d": "m-2.safetensors"})
    msg = model_error(tmp_path)
    assert "tensor 'd' is listed in shard 'm-2.safetensors'" in msg and "does not contain it" in msg, msg


def test_tensor_in_two_shards(tmp_path):
    make_two_shards(tmp_path, WEIGHT_MAP, second={"c": np.ones(3, np.float32), "a": np.ones(2, np.float32)})
    msg = model_error(tmp_path)
    assert "tensor 'a' is in both" in msg and "m-1.safetensors" in msg and "m-2.safetensors" in msg, msg


def test_missing_shard_file(tmp_path):
    make_two_shards(tmp_path, {**WEIGHT_MAP, "c": "m-3.safetensors"})
    msg = model_error(tmp_path)
    assert str(tmp_path / "m-3.safetensors") in msg and "cannot open" in msg, msg


def test_index_without_weight_map(tmp_path):
    make_two_shards(tmp_path, WEIGHT_MAP)
    (tmp_path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    msg = model_error(tmp_path)
    assert "model.safetensors.index.json: missing field 'weight_map'" in msg, msg


def test_loading_holds_the_weights_about_once(tmp_path):
    """Checkpoint::release: the loader drops each layer's mapped pages once it has copied them,
    so the process's peak RSS while loading a bf16 model into bf16 weights grows by about the
    weights' size, not by the copies and the whole mapped file together (twice it before)."""
    import subprocess
    import sys

    from conftest import make_tiny_llama
    path, _ = make_tiny_llama(tmp_path / "m", dtype="bfloat16", vocab_size=2048, hidden_size=512,
                              intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                              num_key_value_heads=8)
    weights = (path / "model.safetensors").stat().st_size
    code = (
        "import re, pathlib, pagedrt\n"
        "status = lambda key: int(re.search(key + r':\\s+(\\d+)', pathlib.Path('/proc/self/status').read_text())[1])\n"
        "before = status('VmRSS')\n"
        f"rt = pagedrt.Runtime({str(path)!r}, device='cpu', dtype='bfloat16', kv_cache_bytes=1 << 20)\n"
        "print(status('VmHWM') - before)\n")
    grew = int(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                              timeout=120).stdout.split()[-1]) * 1024
    assert weights > 50 << 20
    assert grew < 1.4 * weights, f"peak RSS grew by {grew / 2**20:.1f} MiB loading {weights / 2**20:.1f} MiB of weights"
