"""pagedrt-chat — chat with a local model in the terminal.

    pagedrt-chat                      # the default model (SmolLM2-135M-Instruct)
    pagedrt-chat --model DIR --system "You are terse." --max-tokens 256 --temperature 0

Type a message and press Enter. A line ending in a backslash continues on the
next line; a line of three double quotes starts and ends a multi-line block.
Commands: /help, /reset, /system TEXT, /set PARAM VALUE, /stats, /quit.
Ctrl-C stops the current answer; Ctrl-D or /quit leaves.
"""
from __future__ import annotations

import argparse
import pathlib
import signal
import sys
import time

HELP = """commands:
  /help               this list
  /reset              forget the conversation (keeps the system prompt)
  /system TEXT        set the system prompt (and reset)
  /set PARAM VALUE    change a sampling parameter, e.g. /set temperature 0.2, /set max_tokens 64;
                      structured answers: /set json_schema FILE, /set regex RE, /set choice a,b,c,
                      /set grammar FILE (Lark or GBNF), /set json_object on (PARAM off to undo)
  /stats              KV-cache blocks, waste, prefix-cache hits, preemptions, speed
  /quit               leave (or Ctrl-D)
input: end a line with \\ to continue it; a line with just \"\"\" starts/ends a block.
Ctrl-C stops an answer in the middle."""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The epilog as written (the command list), and every option's default."""

    def _get_help_string(self, action):
        if action.default is None or action.default is argparse.SUPPRESS or not action.option_strings:
            return action.help
        return f"{action.help} (default: {action.default})"


# The sampling for settings a model's generation_config.json does not recommend (the
# default model's recommends none); flags override both. Its card's example uses 0.2 / 0.9:
# on three factual questions, 100 draws each, that answered right 54, 38 and 52 times
# against 66, 53 and 64 at these (session 40), so these stay.
_FALLBACK = {"temperature": 0.7, "top_p": 0.9}


def _flags(args) -> dict:
    """The sampling flags given on the command line (those generation_config.json may also name)."""
    from .sampling_params import _GENERATION_KEYS
    return {k: getattr(args, k) for k in _GENERATION_KEYS if getattr(args, k) is not None}


def _sampling(flags: dict, model_path):
    """(settings, where from): the fallback, the model's generation_config.json over it, the flags
    (_flags) over both. A file the chat cannot take is said on stderr and left out."""
    from .errors import InvalidArgument
    from .sampling_params import generation_settings
    try:
        model = generation_settings(model_path)
    except InvalidArgument as e:
        print(f"pagedrt-chat: {e}; its sampling settings are not used", file=sys.stderr)
        model = {}
    settings = {**_FALLBACK, **model, **flags}
    source = "the model's generation_config.json" if model else "pagedrt-chat's defaults"
    return settings, source + (" and flags" if flags else "")


def _parser() -> argparse.ArgumentParser:
    from ._core import RuntimeConfig
    engine = RuntimeConfig()  # the engine's defaults, not restated here
    p = argparse.ArgumentParser(
        prog="pagedrt-chat", formatter_class=_HelpFormatter,
        description="Chat with a local model in the terminal. Each answer streams token by token,\n"
                    "then its speed and time to first token.",
        epilog="commands in the chat:\n" + "\n".join(HELP.splitlines()[1:]))
    p.add_argument("--model", default=None, metavar="DIR|FILE.gguf",
                   help="a Hugging Face model folder or a .gguf file (converted once); "
                        "without it, the default model SmolLM2-135M-Instruct")
    p.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"],
                   help=f"where to run (default: {engine.device}; auto: the GPU when one is visible)")
    p.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16"],
                   help=f"weight dtype (default: {engine.dtype}; auto: fp32 checkpoints stay fp32, others bf16)")
    p.add_argument("--quantization", default=None, choices=["fp8"],
                   help="quantize the projection weights at load: fp8 (e4m3, a scale per output channel: "
                        "half the memory of bf16; on the CPU faster decoding, slightly less accurate)")
    p.add_argument("--kv-cache-dtype", default=None, choices=["auto", "fp8"],
                   help=f"KV cache element type (default: {engine.kv_cache_dtype}; fp8: e4m3 with a scale per "
                        "token and kv head, about twice the tokens in the same memory)")
    p.add_argument("--system", default=None, metavar="TEXT", help="system prompt (none without it)")
    p.add_argument("--max-tokens", type=int, default=512, metavar="N", help="tokens per answer at most")
    model_s = " (default: the model's generation_config.json, else {})"
    p.add_argument("--temperature", type=float, default=None, metavar="T",
                   help="0: greedy" + model_s.format(_FALLBACK["temperature"]))
    p.add_argument("--top-p", type=float, default=None, metavar="P",
                   help="nucleus sampling" + model_s.format(_FALLBACK["top_p"]))
    p.add_argument("--top-k", type=int, default=None, metavar="K", help="0: off" + model_s.format("0"))
    p.add_argument("--min-p", type=float, default=None, metavar="P", help="0: off" + model_s.format("0"))
    p.add_argument("--repetition-penalty", type=float, default=None, metavar="R",
                   help="1: off" + model_s.format("1"))
    p.add_argument("--seed", type=int, default=None, metavar="S", help="make the answers reproducible (random without it)")
    p.add_argument("--max-model-len", type=int, default=None, metavar="N",
                   help=f"context length (default: {engine.max_model_len}, the model's)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help=f"CPU threads (default: {engine.num_threads}, all cores)")
    p.add_argument("--speculative", default=None, choices=["ngram", "draft"],
                   help="speculative decoding: ngram (prompt lookup) or draft (needs --draft-model); "
                        "the same answers, sooner (docs/speculative.md)")
    p.add_argument("--draft-model", default=None, metavar="DIR|FILE.gguf",
                   help="a smaller model with the same tokenizer that proposes tokens (implies --speculative draft)")
    p.add_argument("--tensor-parallel-size", type=int, default=None, metavar="N",
                   help="split the model over N ranks (1, 2, 4, 8; the model's heads must divide by it; "
                        "docs/tensor_parallel.md)")
    p.add_argument("--prompt", default=None, metavar="TEXT",
                   help="answer this one message and exit (no interactive loop)")
    return p


def _parse_args(argv):
    return _parser().parse_args(argv)


def _style(code: str, text: str) -> str:
    """ANSI styling on a terminal, plain text elsewhere (pipes, logs)."""
    return f"\x1b[{code}m{text}\x1b[0m" if sys.stdout.isatty() else text


def _read_message(prompt: str):
    """One user message: a line, continued lines (trailing backslash), or a \"\"\" block."""
    line = input(prompt)
    if line.strip() == '"""':
        lines = []
        while (nxt := input("... ")).strip() != '"""':
            lines.append(nxt)
        return "\n".join(lines)
    lines = [line]
    while lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        lines.append(input("... "))
    return "\n".join(lines)


def _fit_history(rt, messages, max_tokens):
    """Drops the oldest turns (never the system prompt or the newest message)
    until the prompt leaves room for an answer. Returns the number of messages dropped."""
    limit = rt.model_info.max_model_len
    dropped = 0
    while True:
        n = len(rt.encode_prompt(messages))
        if n + min(max_tokens, 16) <= limit:
            return dropped
        first = 1 if messages and messages[0]["role"] == "system" else 0
        if len(messages) - first <= 1:
            raise ValueError(f"the message alone is {n} tokens; the context holds {limit}")
        del messages[first]
        dropped += 1


def _answer(rt, messages, params):
    """Streams one answer; returns its text. Ctrl-C aborts it and returns what came."""
    limit = rt.model_info.max_model_len
    prompt_len = len(rt.encode_prompt(messages))
    params = params.replace(max_tokens=max(1, min(params.max_tokens, limit - prompt_len)))
    start = time.perf_counter()
    rid = rt.submit(messages, params)
    first, n, reason, text, spec = None, 0, None, [], (0, 0)
    try:
        while reason is None:
            for ev in rt.poll(rid, timeout=0.1):
                if ev.token_ids and first is None:
                    first = time.perf_counter()
                n += len(ev.token_ids)
                spec = (ev.spec_accepted, ev.spec_proposed)
                sys.stdout.write(ev.text)
                sys.stdout.flush()
                text.append(ev.text)
                if ev.request_finished:
                    reason = ev.error or ev.finish_reason
    except KeyboardInterrupt:
        rt.abort(rid)  # the engine ends it at the next step; collect its final event
        deadline = time.monotonic() + 5.0
        while reason is None and time.monotonic() < deadline:
            for ev in rt.poll(rid, timeout=0.2):
                text.append(ev.text)
                if ev.request_finished:
                    reason = "interrupted"
        if reason is None:
            rt.release(rid)  # its final event is late: nobody will read it
        reason = "interrupted"
    end = time.perf_counter()
    rate = (n - 1) / (end - first) if first and n > 1 and end > first else 0.0
    ttft = (first - start) * 1000 if first else 0.0
    accepted = f", {spec[0]} of {spec[1]} proposals accepted" if spec[1] else ""
    print("\n" + _style("2", f"[{n} tokens, {rate:.1f} tok/s, TTFT {ttft:.0f} ms{accepted}, {reason}]"))
    return "".join(text)


def _stats_line(rt) -> str:
    s = rt.stats()
    hit = 100 * s.prefix_hits / s.prefix_queries if s.prefix_queries else 0.0
    return (f"KV blocks {s.blocks_used} used / {s.blocks_free} free ({s.blocks_cached_free} cached) of "
            f"{s.num_blocks} x {s.block_size} tokens; waste {100 * s.waste:.1f}% (peak "
            f"{100 * s.waste_at_peak:.1f}%); prefix hits {hit:.0f}% of {s.prefix_queries} tokens; "
            f"preemptions {s.num_preemptions} ({s.num_swapped_out} by swap); {s.generated_tokens} tokens generated, "
            f"{s.tokens_per_s:.1f} tok/s recently")


def _set_param(params, arg: str):
    from .errors import InvalidArgument
    name, _, value = arg.partition(" ")
    name, value = name.strip().replace("-", "_"), value.strip()
    if not name or not value:
        raise InvalidArgument("usage: /set PARAM VALUE")
    current = getattr(params, name, None)
    source = name  # where the value came from: "json_schema from FILE" when read from a file
    if name not in params.__dataclass_fields__:
        raise InvalidArgument(f"unknown sampling parameter {name!r}")
    if value.lower() in ("none", "off") and name in ("seed", "logprobs", "stop", "json_schema", "regex", "choice",
                                                       "grammar"):
        parsed = None
    elif name in ("json_schema", "grammar"):  # a file, or the text itself
        path = pathlib.Path(value).expanduser()
        source = f"{name} from {path}" if path.exists() and not path.is_dir() else name
        if source == name and name == "json_schema" and not value.lstrip().startswith("{"):
            raise InvalidArgument(f"json_schema: {value!r} is neither a file nor an inline JSON object")
        try:
            parsed = path.read_text().strip() if source != name else value
        except OSError as e:
            raise InvalidArgument(f"{source}: {e.strerror or e}") from None
    elif name == "choice":
        parsed = [c.strip() for c in value.split(",") if c.strip()]
    elif isinstance(current, bool):
        parsed = value.lower() in ("1", "true", "yes", "on")
    elif name in ("seed", "logprobs") or isinstance(current, int):
        parsed = int(value)
    elif isinstance(current, float):
        parsed = float(value)
    else:
        parsed = value
    new = params.replace(**{name: parsed})
    from .structured import constraint_of, grammar_of
    try:
        new._to_core()  # checks the value, naming the field
        constraint = constraint_of(new)  # one constraint at most; it must compile
        if constraint is not None:
            grammar_of(*constraint)
    except InvalidArgument as e:
        if source != name:  # say which file it came from
            message = str(e)
            raise InvalidArgument(f"{source}: {message.removeprefix(name + ': ')}") from None
        raise
    return new


def main(argv=None) -> int:
    args = _parse_args(argv)
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    # Ctrl-C interrupts an answer, even where the parent left SIGINT ignored
    # (a process started in the background by a non-interactive shell inherits
    # that, and Python then never raises KeyboardInterrupt).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from . import Runtime, SamplingParams
    from .errors import InvalidArgument, Unsupported
    from .structured import constraint_of
    from .models import ModelNotFoundError, display_name

    flags = _flags(args)
    params = SamplingParams(max_tokens=args.max_tokens, seed=args.seed,
                            speculative=args.speculative or ("draft" if args.draft_model else None), **flags)
    try:
        params._to_core()
    except InvalidArgument as e:
        print(f"pagedrt-chat: {e}", file=sys.stderr)
        return 2
    try:
        t0 = time.perf_counter()
        if params.speculative == "draft" and not args.draft_model:
            raise InvalidArgument("--speculative draft needs --draft-model DIR|FILE.gguf")
        # kv_idle_release_s=0: the conversation's cached prefix stays while the user types
        # (an elastic pool's idle release evicts the cached blocks of the chunks it gives back).
        rt = Runtime(args.model, device=args.device, dtype=args.dtype, num_threads=args.threads,
                     kv_cache_dtype=args.kv_cache_dtype, quantization=args.quantization,
                     max_model_len=args.max_model_len, draft_model=args.draft_model, kv_idle_release_s=0,
                     tensor_parallel_size=args.tensor_parallel_size)
    except (ModelNotFoundError, FileNotFoundError, ValueError, InvalidArgument, Unsupported) as e:
        print(f"pagedrt-chat: {e}", file=sys.stderr)
        return 1
    if rt.tokenizer is None or rt.tokenizer.chat_template is None:
        print(f"pagedrt-chat: {rt.model_path} has no chat template (tokenizer_config.json)", file=sys.stderr)
        return 1
    settings, source = _sampling(flags, rt.model_path)
    params = params.replace(**settings)
    info = rt.model_info
    device = info.device if info.tensor_parallel_size == 1 else f"{info.device} x {info.tensor_parallel_size} ranks"
    print(f"pagedrt-chat: {display_name(rt.model_path)} ({info.weight_dtype}, {device}, context "
          f"{info.max_model_len}) loaded in {time.perf_counter() - t0:.2f} s. /help lists commands.")
    shown = ", ".join(f"{k} {v:g}" for k, v in settings.items())
    print(_style("2", f"sampling: {shown} ({source}; /set changes them)"))
    system = args.system
    messages = [{"role": "system", "content": system}] if system else []
    with rt:
        if args.prompt is not None:
            messages.append({"role": "user", "content": args.prompt})
            _answer(rt, messages, params)
            return 0
        while True:
            try:
                line = _read_message(_style("1", "> "))
            except EOFError:
                print()
                return 0
            except KeyboardInterrupt:
                print()
                continue
            cmd, _, rest = line.strip().partition(" ")
            if cmd in ("/quit", "/exit"):
                return 0
            if cmd == "/help":
                print(HELP)
                continue
            if cmd == "/reset" or cmd == "/system":
                if cmd == "/system":
                    system = rest.strip() or None
                messages = [{"role": "system", "content": system}] if system else []
                print(_style("2", "[conversation reset]"))
                continue
            if cmd == "/stats":
                print(_stats_line(rt))
                continue
            if cmd == "/set":
                try:
                    params = _set_param(params, rest)
                    if constraint_of(params) is not None:
                        rt._constraints()  # the grammar tokenizers (~0.5 s, once) now, not in the answer's TTFT
                    print(_style("2", f"[{rest.split()[0]} = {getattr(params, rest.split()[0].replace('-', '_'))}]"))
                except (InvalidArgument, ValueError) as e:
                    print(f"error: {e}")
                continue
            if cmd.startswith("/"):
                print(f"unknown command {cmd}; /help lists them")
                continue
            if not line.strip():
                continue
            messages.append({"role": "user", "content": line})
            try:
                dropped = _fit_history(rt, messages, params.max_tokens)
                if dropped:
                    print(_style("2", f"[the conversation outgrew the context: dropped the {dropped} oldest "
                                      "message(s)]"))
                reply = _answer(rt, messages, params)
            except ValueError as e:
                print(f"error: {e}")
                messages.pop()
                continue
            except KeyboardInterrupt:  # before the answer started
                print(_style("2", "\n[interrupted]"))
                messages.pop()
                continue
            messages.append({"role": "assistant", "content": reply})


if __name__ == "__main__":
    sys.exit(main())
