#!/usr/bin/env python3
"""Server overhead: the same workload through pagedrt-serve (concurrent streaming
clients, the official openai client) and in-process (Runtime.generate), on one
machine, one after the other.

    bench_serve.py [--model DIR|FILE.gguf] [--device cpu] [--clients 64] [--prompt-len 128]
                   [--max-tokens 128] [--rounds 2] [--client raw|openai] [--json OUT.json]

Each client streams one /v1/completions request (random token-id prompt, greedy,
ignore_eos) at once; output tok/s = all output tokens / wall time from the first
request to the last [DONE]. In-process: the same prompts through
Runtime.generate. Prints output tok/s of both and their ratio, and the server's
p50/p99 time to first token and inter-token latency (per stream chunk).
Rounds alternate server and in-process; each round's pair gives a ratio (a
busy or noisy machine moves whole rounds), and the median ratio is the figure.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(xs, q):
    return float(np.percentile(np.array(xs), q)) if xs else float("nan")


async def _raw_stream(port, body: bytes, on_chunk) -> int:
    """One streaming POST /v1/completions over a plain asyncio connection (a light
    client: on a small machine the client's own CPU time is taken from the
    engine); calls on_chunk() per SSE event with text, returns the usage's
    completion tokens."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                 b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    await writer.drain()
    tokens = 0
    while line := await reader.readline():
        if line.startswith(b"data: {"):
            if b'"usage": {' in line:
                tokens = json.loads(line[6:])["usage"]["completion_tokens"]
            elif b'"text": ""' not in line or b'"token_logprobs": [' in line:  # a token's chunk
                on_chunk()
    writer.close()
    return tokens


async def through_server(url, name, prompts, max_tokens, client="raw", logprobs=False):
    ttft, itl, tokens = [], [], 0

    async def one_raw(p):
        nonlocal tokens
        t0, last = time.perf_counter(), [None]

        def on_chunk():
            now = time.perf_counter()
            (ttft.append(now - t0) if last[0] is None else itl.append(now - last[0]))
            last[0] = now
        body = json.dumps({"model": name, "prompt": p, "max_tokens": max_tokens, "temperature": 0,
                           "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
                           **({"logprobs": 0} if logprobs else {})}).encode()
        n = await _raw_stream(int(url.rsplit(":", 1)[1]), body, on_chunk)
        tokens += n  # not `tokens += await ...`: that reads tokens before the wait

    async def one_openai(oc, p):
        nonlocal tokens
        t0, last = time.perf_counter(), None
        stream = await oc.completions.create(model=name, prompt=p, max_tokens=max_tokens, temperature=0,
                                             stream=True, extra_body={"ignore_eos": True},
                                             stream_options={"include_usage": True})
        async for c in stream:
            now = time.perf_counter()
            if c.usage is not None:
                tokens += c.usage.completion_tokens
            if c.choices and c.choices[0].text:
                (ttft.append(now - t0) if last is None else itl.append(now - last))
                last = now

    t0 = time.perf_counter()
    if client == "openai":
        import openai
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600) as oc:
            await asyncio.gather(*(one_openai(oc, p) for p in prompts))
    else:
        await asyncio.gather(*(one_raw(p) for p in prompts))
    wall = time.perf_counter() - t0
    return {"client": client, "tok_per_s": tokens / wall, "tokens": tokens, "wall_s": wall,
            "ttft_p50_ms": 1e3 * percentile(ttft, 50), "ttft_p99_ms": 1e3 * percentile(ttft, 99),
            "itl_p50_ms": 1e3 * percentile(itl, 50), "itl_p99_ms": 1e3 * percentile(itl, 99)}


def in_process(rt, prompts, max_tokens, logprobs=False):
    t0 = time.perf_counter()
    outs = rt.generate(prompts, max_tokens=max_tokens, temperature=0, ignore_eos=True,
                       logprobs=0 if logprobs else None)
    wall = time.perf_counter() - t0
    tokens = sum(len(o.token_ids) for o in outs)
    return {"tok_per_s": tokens / wall, "tokens": tokens, "wall_s": wall}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--client", default="raw", choices=["raw", "openai"],
                    help="raw: a plain asyncio HTTP client; openai: the official client (heavier per chunk)")
    ap.add_argument("--kv-cache-bytes", type=int, default=None,
                    help="KV pool of the server and of the in-process Runtime each (both live at once; "
                         "default: the engine's on the CPU, 8 GiB on a GPU)")
    ap.add_argument("--threads", type=int, default=None,
                    help="engine threads on the CPU, for the server and the in-process Runtime alike "
                         "(default: what pagedrt-serve takes by default, all cores but one from 8 cores)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.kv_cache_bytes is None:
        args.kv_cache_bytes = 8 << 30 if args.device == "cuda" else 0
    import pagedrt

    model = str(pagedrt.resolve_model(args.model))
    # A model without a tokenizer streams no text, so no chunk would mark a
    # token's arrival: then both sides ask for logprobs=0 (a chunk per token,
    # carrying the token's logprob), and the comparison stays like for like.
    logprobs = not any((Path(model) / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))
    from pagedrt.serve.cli import engine_threads
    threads = engine_threads(args.threads or 0, args.device)  # the same engine on both sides
    opts = ["--max-num-seqs", str(max(64, args.clients)), "--kv-cache-bytes", str(args.kv_cache_bytes),
            "--threads", str(threads)]
    rng = np.random.default_rng(0)
    port = free_port()
    print(f"server: pagedrt-serve --model {model} --device {args.device} {' '.join(opts)} (port {port})", flush=True)
    proc = subprocess.Popen([sys.executable, "-m", "pagedrt.serve", "--model", model, "--device", args.device,
                             "--port", str(port), "--log-level", "warning", *opts])
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(url + "/health", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        name = json.load(urllib.request.urlopen(url + "/v1/models"))["data"][0]["id"]
        res = {"model": model, "device": args.device, "threads": threads, "clients": args.clients,
               "prompt_len": args.prompt_len,
               "max_tokens": args.max_tokens, "server": [], "in_process": []}
        for r in range(args.rounds):
            prompts = [rng.integers(100, 40000, size=args.prompt_len).tolist() for _ in range(args.clients)]
            s = asyncio.run(through_server(url, name, prompts, args.max_tokens, args.client, logprobs))
            res["server"].append(s)
            lat = (f"TTFT p50/p99 {s['ttft_p50_ms']:.0f}/{s['ttft_p99_ms']:.0f} ms  ITL p50/p99 "
                   f"{s['itl_p50_ms']:.1f}/{s['itl_p99_ms']:.1f} ms" if s["ttft_p50_ms"] == s["ttft_p50_ms"] else
                   "TTFT/ITL n/a (no chunks)")
            print(f"round {r + 1} server:     {s['tok_per_s']:8.1f} tok/s  {lat}", flush=True)
            # the in-process run needs the machine to itself: the server idles (no requests) meanwhile
            with pagedrt.Runtime(model, device=args.device, max_num_seqs=max(64, args.clients),
                                 kv_cache_bytes=args.kv_cache_bytes, num_threads=threads, progress=False) as rt:
                prompts = [rng.integers(100, 40000, size=args.prompt_len).tolist() for _ in range(args.clients)]
                p = in_process(rt, prompts, args.max_tokens, logprobs)
            res["in_process"].append(p)
            print(f"round {r + 1} in-process: {p['tok_per_s']:8.1f} tok/s", flush=True)
        ratios = [a["tok_per_s"] / b["tok_per_s"] for a, b in zip(res["server"], res["in_process"])]
        res["server_over_in_process"] = ratios
        res["median_ratio"] = statistics.median(ratios)
        print("server / in-process output tok/s, round by round: " + ", ".join(f"{x:.3f}" for x in ratios)
              + f"; median {res['median_ratio']:.3f}", flush=True)
        if args.json:
            json.dump(res, open(args.json, "w"), indent=1)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


if __name__ == "__main__":
    main()
