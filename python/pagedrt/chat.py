"""pagedrt-chat — chat with a local model in the terminal.

    pagedrt-chat                      # the default model (SmolLM2-135M-Instruct)
    pagedrt-chat --model DIR --system "You are terse." --max-tokens 256

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
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: all cores)")
    p.add_argument("--prompt", default=None,
                   help="answer this one message and exit (no interactive loop)")
    return p.parse_args(argv)


class _Streamer:
    """Prints the text of a growing token list, never half a UTF-8 character."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.printed = ""

    def push(self, ids):
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for more
            return
        sys.stdout.write(text[len(self.printed):])
        sys.stdout.flush()
        self.printed = text


def _style(code: str, text: str) -> str:
    """ANSI styling on a terminal, plain text elsewhere (pipes, logs)."""
    return f"\x1b[{code}m{text}\x1b[0m" if sys.stdout.isatty() else text


def _answer(rt, messages, max_tokens):
    from .sampling_params import SamplingParams

    start = time.perf_counter()
    rid = rt.submit(messages, SamplingParams(max_tokens=max_tokens))
    streamer, first, reason = _Streamer(rt.tokenizer), None, None
    try:
        while reason is None:
            for ev in rt.poll(rid, timeout=0.1):
                if ev.token_ids and first is None:
                    first = time.perf_counter()
                streamer.push(ev.token_ids)
                if ev.finished:
                    reason = ev.error or ev.finish_reason
    except KeyboardInterrupt:
        rt.abort(rid)  # the engine ends it at the next step; collect its final event
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and not any(e.finished for e in rt.poll(rid, timeout=0.5)):
            pass
        raise
    end = time.perf_counter()
    n = len(streamer.ids)
    rate = (n - 1) / (end - first) if first and n > 1 and end > first else 0.0
    ttft = (first - start) * 1000 if first else 0.0
    print("\n" + _style("2", f"[{n} tokens, {rate:.1f} tok/s, TTFT {ttft:.0f} ms, {reason}]"))
    return rt.tokenizer.decode(streamer.ids)


def main(argv=None) -> int:
    args = _parse_args(argv)
    from . import Runtime
    from .models import ModelNotFoundError

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
            _answer(rt, messages, args.max_tokens)
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
                reply = _answer(rt, messages, args.max_tokens)
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
