#!/usr/bin/env python3
"""Write an fp8 (e4m3) copy of a Llama checkpoint, the way Hugging Face fp8
checkpoints are laid out, for pagedrt's fp8 loading, its tests and benchmarks.

    make_fp8_checkpoint.py SRC_DIR OUT_DIR [--scheme channel|tensor|block] [--block 128]

The seven projection weights of every layer (q, k, v, o, gate, up, down)
become F8_E4M3 codes with an fp32 scale: per output channel ("<name>_scale",
(out, 1): fbgemm_fp8's layout, the default), per tensor ("<name>_scale", one
value: compressed-tensors' "tensor" strategy), or per 128 x 128 block
("<name>_scale_inv": transformers' "fp8" with weight_block_size). A scale is
the covered values' largest magnitude / 448, so that nothing saturates.
Embeddings, norms and the LM head are copied as they are. config.json gets
the matching quantization_config; the tokenizer files are copied.
Codes are rounded to nearest, ties to even (pagedrt._testing._e4m3_encode:
the same function the CUDA kernels will use).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import struct
import sys

import numpy as np

from pagedrt.convert import to_bfloat16_bits

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
E4M3_MAX = 448.0


STORAGE = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "F8_E4M3": "u1"}  # safetensors dtype -> numpy storage


def read_safetensors(path: pathlib.Path) -> dict[str, tuple[str, np.ndarray]]:
    """Every tensor of one file: name -> (safetensors dtype, array of its stored bits), in file order."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        if t["dtype"] not in STORAGE:
            sys.exit(f"{path}: tensor {name} has dtype {t['dtype']}; this tool reads {', '.join(STORAGE)}")
        a, b = t["data_offsets"]
        out[name] = (t["dtype"], np.frombuffer(raw[8 + n + a:8 + n + b], STORAGE[t["dtype"]]).reshape(t["shape"]))
    return out


def as_float32(dtype: str, bits: np.ndarray) -> np.ndarray:
    if dtype == "BF16":
        return (bits.astype(np.uint32) << 16).view(np.float32)
    if dtype in ("F32", "F16"):
        return bits.astype(np.float32)
    sys.exit(f"a {dtype} tensor is already quantized")


def write_safetensors(path: pathlib.Path, tensors: dict[str, tuple[str, np.ndarray]]) -> None:
    """tensors: name -> (safetensors dtype, array of its bytes' numpy type)."""
    header, offset, blobs = {"__metadata__": {"format": "pt"}}, 0, []
    for name, (dtype, arr) in tensors.items():
        data = np.ascontiguousarray(arr).tobytes()
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)


def quantize(w: np.ndarray, scheme: str, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(e4m3 codes (out, in) uint8, fp32 scales) of a (out, in) weight."""
    from pagedrt._testing import _e4m3_encode
    rows, cols = w.shape
    a = np.abs(w)
    if scheme == "tensor":
        scale = np.array(max(float(a.max()), 1e-12) / E4M3_MAX, np.float32)
        full = np.broadcast_to(scale, w.shape)
    elif scheme == "channel":
        scale = (np.maximum(a.max(axis=1), 1e-12) / E4M3_MAX).astype(np.float32).reshape(rows, 1)
        full = np.broadcast_to(scale, w.shape)
    else:
        gr, gc = -(-rows // block), -(-cols // block)
        pad = np.zeros((gr * block, gc * block), np.float32)
        pad[:rows, :cols] = a
        amax = pad.reshape(gr, block, gc, block).max(axis=(1, 3))
        scale = (np.maximum(amax, 1e-12) / E4M3_MAX).astype(np.float32)
        full = np.repeat(np.repeat(scale, block, 0), block, 1)[:rows, :cols]
    codes = _e4m3_encode(np.ascontiguousarray((w / full).astype(np.float32).ravel())).reshape(rows, cols)
    return codes, scale


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=pathlib.Path)
    ap.add_argument("out", type=pathlib.Path)
    ap.add_argument("--scheme", default="channel", choices=("channel", "tensor", "block"))
    ap.add_argument("--block", type=int, default=128)
    a = ap.parse_args(argv)
    files = sorted(a.src.glob("*.safetensors"))
    if not files:
        sys.exit(f"{a.src}: no *.safetensors")
    a.out.mkdir(parents=True, exist_ok=True)
    suffix = "_scale_inv" if a.scheme == "block" else "_scale"
    weight_map = {}
    for i, path in enumerate(files):
        out_name = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        out: dict[str, tuple[str, np.ndarray]] = {}
        tensors = read_safetensors(path)
        for j, (name, (dtype, bits)) in enumerate(tensors.items()):
            w = as_float32(dtype, bits)
            if any(f".{p}.weight" in name for p in PROJ):
                codes, scale = quantize(w, a.scheme, a.block)
                out[name] = ("F8_E4M3", codes)
                out[name + suffix] = ("F32", scale)
            else:
                out[name] = ("BF16", to_bfloat16_bits(w))
            print(f"\r{path.name}: {j + 1}/{len(tensors)} tensors", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        write_safetensors(a.out / out_name, out)
        weight_map.update({n: out_name for n in out})
    (a.out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    config = json.loads((a.src / "config.json").read_text())
    config["torch_dtype"] = "bfloat16"
    if a.scheme == "block":
        q = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
             "weight_block_size": [a.block, a.block]}
    elif a.scheme == "channel":
        q = {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0, "modules_to_not_convert": ["lm_head"]}
    else:
        q = {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
             "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                 "num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True, "dynamic": False}}},
             "ignore": ["lm_head"]}
    config["quantization_config"] = q
    (a.out / "config.json").write_text(json.dumps(config, indent=2))
    for f in a.src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name not in (
                "config.json", "model.safetensors.index.json"):
            shutil.copy2(f, a.out / f.name)
    size = sum(f.stat().st_size for f in a.out.glob("*.safetensors"))
    print(f"wrote {a.out} ({a.scheme} scales, {size / 1e6:.1f} MB of safetensors)", file=sys.stderr)


if __name__ == "__main__":
    main()
