#!/usr/bin/env python3
"""The torch.compile peer's decode step, kernel by kernel (issue 17: where a
batch-256 step of ../shared/peers/torch_compile_llama.py spends its GPU time,
beside cuda_profile.py's table of pagedrt's own step at the same shape).

    peer_profile.py OUT.json PEER_SCRIPT [BATCH [PROMPT [STEPS]]]

Builds the peer's model at BATCH (default 256) with PROMPT tokens of prompt
(default 128), compiles its decode step and runs one greedy generation
unprofiled (compile and capture), then prefills again and profiles STEPS
decode steps (default 64) under torch.profiler: the kernel table (name,
calls, ms, share) and the timeline's idle gaps, as cuda_profile.py prints
them, and the step's GPU time. Writes the same to OUT.json.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cuda_profile import kernel_table, show, timeline  # noqa: E402


def main():
    out_path, script = sys.argv[1], sys.argv[2]
    bs = int(sys.argv[3]) if len(sys.argv) > 3 else 256
    prompt_len = int(sys.argv[4]) if len(sys.argv) > 4 else 128
    steps = int(sys.argv[5]) if len(sys.argv) > 5 else 64
    os.environ["PEER_PROMPT"], os.environ["PEER_NEW"] = str(prompt_len), str(steps + 1)
    spec = importlib.util.spec_from_file_location("peer", script)
    peer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peer)  # reads PEER_PROMPT / PEER_NEW at import
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    m = peer.Model(bs)
    decode = torch.compile(m.forward, mode="reduce-overhead", fullgraph=True)
    prompt = torch.randint(0, peer.V, (bs, prompt_len), device="cuda")

    def run(profiled: bool):
        tok = m.forward(prompt, torch.arange(prompt_len, device="cuda")).argmax(-1, keepdim=True)
        torch.cuda.synchronize()
        positions = [torch.tensor([p], device="cuda") for p in range(prompt_len, prompt_len + steps)]
        ctx = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) if profiled else None
        if ctx:
            ctx.__enter__()
        t0 = time.perf_counter()
        with record_function("generate"):
            for pos in positions:
                tok = decode(tok, pos).argmax(-1, keepdim=True)
            torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t0) * 1e3
        if ctx:
            ctx.__exit__(None, None, None)
        return ctx, wall_ms

    with torch.inference_mode():
        print(f"peer: batch {bs}, {prompt_len} in, {steps} decode steps; compiling", flush=True)
        run(False)
        run(False)
        prof, wall_ms = run(True)
    title = f"torch.compile peer, batch-{bs} decode ({prompt_len} in, {steps} steps)"
    table, total = kernel_table(prof, top=20)
    show(title, table, total, wall_ms)
    print(f"  a step: {wall_ms / steps:.3f} ms wall, {total / steps:.3f} ms of GPU time")
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "title": title,
           "wall_ms": wall_ms, "gpu_busy_ms": total, "steps": steps,
           "kernels": [{"name": k, "calls": c, "ms": ms} for k, c, ms in table], "timeline": timeline(prof)}
    with open(out_path, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
