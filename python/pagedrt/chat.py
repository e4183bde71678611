"""pagedrt-chat — chat with a local model in the terminal.

    pagedrt-chat                      # the default model (SmolLM2-135M-Instruct)
    pagedrt-chat --model DIR --system "You are terse." --max-tokens 256 --temperature 0

Type a message and press Enter; /reset clears the history, /quit (or Ctrl-D) leaves.
"""
from __future__ import annotations

import argparse
import sys
import time


def _parse_args(argv):
    p = argparse.ArgumentParser(prog="pagedrt-chat", description="Chat with a local model.")
    p.add_argument("--model", default=None,
                   help="model folder or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--max-tokens", type=int, default=512, help="tokens per answer at most")
    p.add_argument("--temperature", type=float, default=0.7, help="0: greedy")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=0, help="0: off")
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="make the answers reproducible")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: all cores)")
    p.add_argument("--prompt", default=None,
                   help="answer this one message and exit (no interactive loop)")
    return p.parse_args(argv)


def _style(code: str, text: str) -> str:
    """ANSI styling on a terminal, plain text elsewhere (pipes, logs)."""
    return f"\x1b[{code}m{text}\x1b[0m" if sys.stdout.isatty() else text


def _answer(rt, messages, params):
    start = time.perf_counter()
    rid = rt.submit(messages, params)
    first, n, reason, text = None, 0, None, []
    try:
        while reason is None:
            for ev in rt.poll(rid, timeout=0.1):
                if ev.token_ids and first is None:
                    first = time.perf_counter()
                n += len(ev.token_ids)
                sys.stdout.write(ev.text)
                sys.stdout.flush()
                text.append(ev.text)
                if ev.request_finished:
                    reason = ev.error or ev.finish_reason
    except KeyboardInterrupt:
        rt.abort(rid)  # the engine ends it at the next step; collect its final event
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and not any(e.request_finished for e in rt.poll(rid, timeout=0.5)):
            pass
        raise
    end = time.perf_counter()
    rate = (n - 1) / (end - first) if first and n > 1 and end > first else 0.0
    ttft = (first - start) * 1000 if first else 0.0
    print("\n" + _style("2", f"[{n} tokens, {rate:.1f} tok/s, TTFT {ttft:.0f} ms, {reason}]"))
    return "".join(text)


def main(argv=None) -> int:
    args = _parse_args(argv)
    from . import Runtime, SamplingParams
    from .errors import InvalidArgument
    from .models import ModelNotFoundError

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                            seed=args.seed)
    try:
        params._to_core()
    except InvalidArgument as e:
        print(f"pagedrt-chat: {e}", file=sys.stderr)
        return 2

    try:
        t0 = time.perf_counter()
        rt = Runtime(args.model, device=args.device, dtype=args.dtype, num_threads=args.threads)
    except (ModelNotFoundError, FileNotFoundError, ValueError) as e:
        print(f"pagedrt-chat: {e}", file=sys.stderr)
        return 1
    info = rt.model_info
    print(f"pagedrt-chat: {rt.model_path.name} ({info.weight_dtype}, {info.device}) "
          f"loaded in {time.perf_counter() - t0:.2f} s. /reset clears, /quit leaves.")
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    with rt:
        if args.prompt is not None:
            messages.append({"role": "user", "content": args.prompt})
            _answer(rt, messages, params)
            return 0
        while True:
            try:
                line = input(_style("1", "> "))
            except (EOFError, KeyboardInterrupt):
                print()
                return 0
            if line.strip() in ("/quit", "/exit"):
                return 0
            if line.strip() == "/reset":
                messages = list(system)
                continue
            if not line.strip():
                continue
            messages.append({"role": "user", "content": line})
            try:
                reply = _answer(rt, messages, params)
            except KeyboardInterrupt:
                print("\n[interrupted]")
                messages.pop()
                continue
            except ValueError as e:
                print(f"error: {e}")
                messages.pop()
                continue
            messages.append({"role": "assistant", "content": reply})


if __name__ == "__main__":
    sys.exit(main())
