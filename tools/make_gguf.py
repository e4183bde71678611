#!/usr/bin/env python3
"""Re-encodes a GGUF model at F32, F16 or BF16 (every tensor dequantized, then
stored unquantized; metadata copied, file type updated) — so llama.cpp can run
the very weights pagedrt loads from its converted safetensors folder.

    python tools/make_gguf.py --type f16 --out smollm2-f16.gguf     # from the default model's GGUF
    python tools/make_gguf.py --src model.Q4_1.gguf --type bf16 --out model-bf16.gguf
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
from tqdm import tqdm

import gguf

TYPES = {"f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
         "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
         "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", default=None, help="source GGUF (default: the default model's)")
    p.add_argument("--type", choices=sorted(TYPES), default="f16")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    if a.src is None:
        from pagedrt.models import _default_gguf
        a.src = str(_default_gguf())
    qtype, ftype = TYPES[a.type]
    r = gguf.GGUFReader(a.src)
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(a.out, arch)
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        sub = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
    w.add_file_type(ftype)
    for t in tqdm(r.tensors, desc=f"{a.type} tensors", file=sys.stderr):
        x = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        shape = tuple(int(d) for d in reversed(t.shape))  # numpy order: slowest dimension first
        x = x.reshape(shape)
        keep32 = x.ndim == 1  # norms stay F32, as llama.cpp's converter does
        if keep32 or qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(t.name, x)
        elif qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(t.name, x.astype(np.float16))
        else:
            w.add_tensor(t.name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()
    print(f"wrote {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
