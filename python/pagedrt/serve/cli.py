"""pagedrt-serve: an OpenAI-compatible HTTP server on one Runtime.

    pagedrt-serve                                   # the default model, 127.0.0.1:8000
    pagedrt-serve --model DIR|FILE.gguf --port 8080 --api-key "$KEY"

Every Runtime option is a flag (--max-num-seqs, --kv-cache-bytes, ...; the
defaults are the engine's RuntimeConfig). Ctrl-C or SIGTERM stops taking
connections, lets the requests in flight finish, and exits.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys

from ..runtime import _OPTIONS

_HELP = {
    "dtype": "weight dtype: auto, float32 or bfloat16",
    "activation_dtype": "activation and KV-cache dtype: auto, float32 or bfloat16",
    "quantization": "weight quantization at load: \"\" (none) or fp8 (each projection to e4m3 with a scale per "
                    "output channel; CPU only so far)",
    "kv_cache_dtype": "KV cache element type: auto (the activations') or fp8 (e4m3 with a scale per token and "
                      "kv head: about twice the tokens in the same memory)",
    "kv_cache_bytes": "KV pool cap in bytes (0: 512 MiB on the CPU, else gpu_memory_utilization)",
    "gpu_memory_utilization": "fraction of free GPU memory for the KV pool",
    "elastic_kv": "map the KV pool's memory in chunks as blocks are needed, giving unused ones back when idle "
                  "(--no-elastic-kv: take the whole pool at start)",
    "kv_idle_release_s": "seconds without work after which an elastic KV pool gives unused chunks back (0: never)",
    "async_scheduling": "launch the next engine step while the device runs the current one: auto (on CUDA), on or off",
    "block_size": "tokens per KV block",
    "max_num_seqs": "sequences per engine step at most",
    "max_num_batched_tokens": "tokens per engine step at most",
    "max_model_len": "prompt plus output tokens at most (0: the model's limit)",
    "enable_prefix_caching": "share identical prompt prefixes between requests",
    "preemption_mode": "how a request gives up its KV blocks to a running one: recompute, swap (to host "
                       "memory and back) or auto (swap for n > 1 and beams, else the cheaper)",
    "swap_space_bytes": "host memory for swapped-out KV blocks (0: as much as the KV pool, at most 4 GiB)",
    "kv_watermark": "fraction of the KV pool's blocks admission leaves free, in [0, 0.5), so that running "
                    "requests can grow without preempting each other (0: none)",
    "num_threads": "CPU threads (0: all cores, but on a CPU of 8 or more cores one is left to the HTTP layer)",
    "deterministic": "batch-invariant results (default: on for the CPU, off for CUDA; docs/determinism.md)",
    "draft_model": "a smaller model (folder or .gguf) with the same tokenizer, for requests with "
                   "speculative=\"draft\" (docs/speculative.md)",
    "tensor_parallel_size": "split the model over 1, 2, 4 or 8 ranks (its heads must divide by it; "
                            "docs/tensor_parallel.md)",
    "devices": "CUDA: the GPU of each rank, comma-separated indices among those visible (default: the first ones)",
}


def parser() -> argparse.ArgumentParser:
    from .._core import RuntimeConfig
    engine = RuntimeConfig()  # the engine's defaults, not restated here
    p = argparse.ArgumentParser(prog="pagedrt-serve", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="An OpenAI-compatible HTTP server (chat and text completions, "
                                            "streaming, /metrics) on a local model.")
    p.add_argument("--model", default=None, metavar="DIR|FILE.gguf",
                   help="a Hugging Face model folder or a .gguf file; without it, SmolLM2-135M-Instruct")
    p.add_argument("--device", default=engine.device, choices=["auto", "cpu", "cuda"], help="where to run")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; 0.0.0.0 exposes the server to the network (use --api-key)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1/*, /tokenize and /detokenize")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model's name in the API (default: the model folder's name)")
    p.add_argument("--max-queue", type=int, default=1024, metavar="N",
                   help="answer 503 with Retry-After while this many requests wait for the engine")
    p.add_argument("--max-body-bytes", type=int, default=8 << 20, metavar="N", help="larger bodies get 413")
    p.add_argument("--speculative", default=None, choices=["ngram", "draft"],
                   help="speculative decoding for every request that does not set its own 'speculative' field "
                        "and can use it (not structured output or echo with logprobs); draft needs --draft-model")
    p.add_argument("--generation-config", default="auto", choices=["auto", "none"],
                   help="auto: a request's omitted temperature, top_p, top_k, min_p and repetition_penalty come "
                        "from the model's generation_config.json, as vLLM's server takes them; none: "
                        "SamplingParams' fixed defaults (temperature 1.0, ...)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    for name in _OPTIONS:
        if name == "device":
            continue
        default = getattr(engine, name)
        flag = "--" + name.replace("_", "-").replace("num-threads", "threads")
        if isinstance(default, bool) or default is None:  # None: the engine decides (deterministic)
            p.add_argument(flag, dest=name, default=default, action=argparse.BooleanOptionalAction, help=_HELP[name])
        elif isinstance(default, list):  # devices: "0,1"
            p.add_argument(flag, dest=name, default=default, metavar="I,J,...", help=_HELP[name],
                           type=lambda text: [int(x) for x in text.split(",") if x.strip()])
        else:
            p.add_argument(flag, dest=name, type=type(default), default=default, help=_HELP[name])
    return p


def engine_threads(num_threads: int, device: str) -> int:
    """--threads 0 on a CPU of 8 or more cores: all but one. The server's
    Python (uvicorn's event loop, the dispatcher, every stream's chunks) then
    has a core of its own instead of preempting an engine thread, which stalls
    the whole team at its next barrier (docs/benchmarks.md, server overhead).
    On a GPU the engine's host threads are few (sampling), and below 8 cores
    one core is too large a share."""
    from .._core import cuda_available
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if num_threads != 0 or cores < 8 or device == "cuda" or (device == "auto" and cuda_available()):
        return num_threads
    return cores - 1


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        import uvicorn

        from .app import build_app
    except ImportError as e:
        print(f"pagedrt-serve needs the serve extra: pip install 'pagedrt[serve]' ({e})", file=sys.stderr)
        return 2
    from .. import Runtime
    from ..errors import Error
    from ..models import display_name
    options = {name: getattr(args, name) for name in _OPTIONS if name != "device"}
    if args.speculative == "draft" and not args.draft_model:
        print("pagedrt-serve: --speculative draft needs --draft-model DIR|FILE.gguf", file=sys.stderr)
        return 2
    options["num_threads"] = engine_threads(args.num_threads, args.device)
    try:
        rt = Runtime(args.model, device=args.device, **options)
    except (Error, OSError, ValueError) as e:
        print(f"pagedrt-serve: {e}", file=sys.stderr)
        return 1
    defaults = {}
    if args.generation_config == "auto":
        from ..sampling_params import generation_settings
        try:
            defaults = generation_settings(rt.model_path)
        except Error as e:
            rt.close()
            print(f"pagedrt-serve: {e} (--generation-config none serves without it)", file=sys.stderr)
            return 1
    name = args.served_model_name or display_name(rt.model_path)
    app = build_app(rt, model_name=name, api_key=args.api_key, max_queue=args.max_queue,
                    max_body_bytes=args.max_body_bytes, speculative=args.speculative, sampling_defaults=defaults)
    said = ", ".join(f"{k} {v:g}" for k, v in defaults.items())
    print(f"pagedrt-serve: {name} on {rt.model_info.device}, http://{args.host}:{args.port}/v1"
          + (f"; a request's omitted sampling fields from its generation_config.json: {said}" if said else ""),
          file=sys.stderr, flush=True)
    # uvicorn drains on SIGINT/SIGTERM, then raises the signal again with the
    # handlers it found: these make that a return, so the engine closes and
    # the exit status is 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    try:
        uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level)).run()
    finally:
        rt.close()
    print("pagedrt-serve: stopped", file=sys.stderr)
    return 0
