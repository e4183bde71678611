"""Structured output: the constraint fields of SamplingParams (json_schema,
json_object, regex, choice, grammar) as llguidance grammars, and the token-mask
provider that enforces them in the engine's sampler.

A constrained request is submitted with the C++ flag ``masked``; at each step
the engine asks the provider (C++, pagedrt/llguidance_masks.hpp, calling
llguidance's C API in the wheel's own library) for the allowed tokens of its
sampling rows, on host threads while the forward runs, and the sampler drops
every other token before any other processing. Each sequence has its own
llguidance matcher, fed the tokens the sequence has produced since the last
mask (n > 1 samples start from a fresh one and catch up). When the grammar is
complete only the end-of-sequence token is allowed, so the answer ends with
"stop". Grammars are compiled once per distinct constraint (the last 64 kept,
here as text and in C++ as matchers).
"""
from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from typing import Optional

import numpy as np

from .errors import InvalidArgument, Unsupported

FIELDS = ("json_schema", "json_object", "regex", "choice", "grammar")


def constraint_of(params) -> Optional[tuple[str, object]]:
    """(field, value) of the request's constraint, None without one; more than
    one is an InvalidArgument."""
    given = [(f, getattr(params, f)) for f in FIELDS if getattr(params, f) not in (None, False)]
    if len(given) > 1:
        raise InvalidArgument(f"at most one of {', '.join(FIELDS)} per request, got {', '.join(f for f, _ in given)}")
    return given[0] if given else None


_GRAMMARS: OrderedDict = OrderedDict()  # (field, value) as JSON -> grammar: the last 64 distinct
_GRAMMARS_LOCK = threading.Lock()


def grammar_of(field: str, value) -> str:
    """The llguidance grammar of a constraint; InvalidArgument with the
    library's message (naming the field) when it does not compile. A
    constraint seen before is not compiled again."""
    try:
        key = json.dumps([field, value], sort_keys=True)
    except (TypeError, ValueError):  # not JSON (a bad value): compiled, to say why
        key = None
    with _GRAMMARS_LOCK:
        if key in _GRAMMARS:
            _GRAMMARS.move_to_end(key)
            return _GRAMMARS[key]
    grammar = _compile(field, value)
    if key is not None:
        with _GRAMMARS_LOCK:
            _GRAMMARS[key] = grammar
            if len(_GRAMMARS) > 64:
                _GRAMMARS.popitem(last=False)
    return grammar


def _compile(field: str, value) -> str:
    import llguidance
    M = llguidance.LLMatcher
    try:
        if field == "json_schema":
            schema = json.loads(value) if isinstance(value, str) else value
            if not isinstance(schema, dict):
                raise InvalidArgument(f"json_schema must be a JSON object (a dict or its text), got {value!r}"[:300])
            grammar = M.grammar_from_json_schema(schema)
        elif field == "json_object":
            grammar = M.grammar_from_json_schema({"type": "object"})
        elif field == "regex":
            if not isinstance(value, str) or not value:
                raise InvalidArgument(f"regex must be a non-empty string, got {value!r}")
            grammar = M.grammar_from_regex(value)
        elif field == "choice":
            if (not isinstance(value, (list, tuple)) or not value
                    or not all(isinstance(c, str) and c for c in value)):
                raise InvalidArgument(f"choice must be a non-empty list of non-empty strings, got {value!r}"[:300])
            grammar = M.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in value))
        else:
            if not isinstance(value, str) or not value.strip():
                raise InvalidArgument(f"grammar must be a non-empty Lark (or GBNF) grammar, got {value!r}"[:300])
            from llguidance.gbnf_to_lark import gbnf_to_lark
            text = gbnf_to_lark(value) if "::=" in value else value
            grammar = M.grammar_from_lark(text)
    except InvalidArgument:
        raise
    except Exception as e:  # the library's parse errors (ValueError, GbnfToLarkError, ...)
        raise InvalidArgument(f"{field}: {e}") from None
    error = M.validate_grammar(grammar)
    if error:
        raise InvalidArgument(f"{field}: {error.strip()}")
    return grammar


def mask_threads(device: str, forward_threads: int = 0) -> Optional[int]:
    """Constraints' `threads` for a Runtime on `device` whose CPU forward runs
    `forward_threads` threads (0: every core): PAGEDRT_MASK_THREADS when set.
    On the GPU the forward leaves the host's cores free: a pool of 80% of
    them (None). On the CPU the forward lends the masks cores
    while they are filled (TokenMaskProvider::threads): one, serially on the
    helper thread, up to 7 cores; from 8 cores on a pool of one in eight
    (16-core Xeon, 32 JSON rows: 194 us a row serially, 113 on 2 threads)."""
    if os.environ.get("PAGEDRT_MASK_THREADS"):
        value = os.environ["PAGEDRT_MASK_THREADS"]
        if not value.isdigit():
            raise InvalidArgument(f"PAGEDRT_MASK_THREADS={value!r}: a count of threads (0: one after another "
                                  "on the helper thread)")
        return int(value)
    if device == "cuda":
        return None
    cores = forward_threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                else os.cpu_count() or 1)
    return 0 if cores < 8 else cores // 8


class Constraints:
    """The llguidance matchers of one Runtime's constrained requests, held in
    C++ (pagedrt/llguidance_masks.hpp: the engine asks them for masks and
    checks without Python). fill/validate/release are also callable from
    Python, for a provider that wraps them (tests)."""

    def __init__(self, model_dir, vocab: int, eos_token: int, threads: Optional[int] = 0, tokenizer=None):
        import llguidance
        from . import _core
        path = model_dir / "tokenizer.json"
        if path.is_file():
            self.tokenizer = llguidance.LLTokenizer(path.read_text(), n_vocab=vocab, eos_token=eos_token)
        elif tokenizer is not None and tokenizer._kind == "sentencepiece":
            self.tokenizer = llguidance.LLTokenizer(
                llguidance.TokenizerWrapper(_SentencePieceTokens(tokenizer, vocab, eos_token)), n_vocab=vocab)
        else:
            raise Unsupported(f"{model_dir}: structured output needs the model's tokenizer "
                              "(tokenizer.json or tokenizer.model)")
        self.words = (vocab + 31) // 32
        # threads (mask_threads): 0 computes a step's masks one after another on
        # the engine's helper thread; k > 0 on k threads, None on 80% of the cores.
        if threads is None:
            threads = max(1, (os.cpu_count() or 1) * 4 // 5)
        #: the host threads a fill keeps busy (a CPU forward leaves them that many cores meanwhile).
        self.busy_threads = max(1, threads)
        # The C++ side builds its own llguidance tokenizer from the token bytes of
        # this one: the same token trie, whatever the tokenizer's kind.
        self.masks = _core.LlguidanceMasks(llguidance._lib.__file__, vocab, eos_token,
                                           token_bytes(self.tokenizer, vocab), threads=threads,
                                           tokenize=self.tokenizer.tokenize_bytes, slices=trie_slices())

    def install(self, runtime_core, threads: int = -1, checked: bool = True) -> None:
        """Gives `runtime_core` (a _core.Runtime) these masks. threads: the cores
        a CPU forward leaves them while they are filled (-1: busy_threads);
        checked: plain greedy picks checked instead of masked first."""
        from . import _core
        _core.set_llguidance_masks(runtime_core, self.masks, threads, checked)

    def add(self, request_id: str, grammar: str) -> None:
        """The request's matcher (a copy of its grammar's, compiled once per
        distinct grammar); InvalidArgument when llguidance refuses it."""
        self.masks.add(request_id, "llguidance", grammar)

    def validate(self, rows, tokens) -> bytes:
        """The engine's checked picks (pagedrt/token_mask.hpp): one byte a row,
        1 where its matcher may take the token next."""
        return self.masks.validate(rows, list(tokens))

    def fill(self, rows, vocab: int) -> None:
        self.masks.fill(rows, vocab)

    def release(self, request_id: str) -> None:
        self.masks.release(request_id)

    def counters(self) -> dict:
        """Seconds inside fill(), validate() and prepare() and their rows; constraints
        compiled and found compiled; the tokenizer's calls and misses."""
        return self.masks.counters()


# String characters: what llguidance's own slices are made of (any but a quote,
# a backslash or a control character).
_STRING_CHAR = r'[^"\\\x00-\x1F\x7F]'


def trie_slices() -> list[str]:
    """llguidance's default slices and, beside them, strings of at most 1-8,
    12, 16, 20 and 24 characters. A mask takes a slice whole where the lexer
    allows all of it and walks the other tokens one by one: inside a string
    with k characters left (a JSON schema's maxLength) the defaults (at most
    10, at most 30, any) leave most of the vocabulary to walk once k < 30, and
    all of it once k < 10. The same masks; replaying 32 SmolLM2 JSON answers
    on a Zen 4 core (2026-12-06, best of 4): a step's longest row 276 -> 238
    us, its rows together 2.63 -> 2.06 ms; the tokenizer takes ~0.15 s more
    to make, once a Runtime. PAGEDRT_MASK_SLICES=default: the library's own
    (for A/B runs)."""
    import llguidance
    if os.environ.get("PAGEDRT_MASK_SLICES") == "default":
        return []
    return llguidance.LLTokenizer.general_slices() + [
        _STRING_CHAR + "{1,%d}" % k for k in (1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 20, 24)]


def token_bytes(tokenizer, vocab: int) -> list[bytes]:
    """Each id's bytes in an llguidance tokenizer's trie: a special token's are
    0xFF and its name, an id without any is empty."""
    out = []
    for i in range(vocab):
        b = tokenizer.decode_bytes([i])
        if tokenizer.is_special_token(i):
            out.append(b"\xff" + b)
        elif b == b"<[%d]>" % i:  # decode's stand-in for an id without bytes
            out.append(b"")
        else:
            out.append(b)
    return out


class _SentencePieceTokens:
    """A sentencepiece tokenizer as llguidance's TokenizerWrapper reads one: each
    id's bytes (U+2581 is a space, <0xHH> a byte; control and unknown pieces
    are special, without bytes) and an encoder of text as it stands. That
    encoder must not add sentencepiece's dummy prefix: llguidance encodes
    grammar-forced text mid-answer ("ye" after "b"), where a leading U+2581
    piece would force a space."""

    def __init__(self, tokenizer, vocab: int, eos_token: int):
        sp = self._sp = tokenizer._backend
        self._tokenizer = tokenizer
        self.eos_token_id, self.bos_token_id = eos_token, tokenizer.bos_token_id
        self.tokens, self.special_token_ids = [], []
        for i in range(vocab):
            if i >= sp.get_piece_size() or sp.is_control(i) or sp.is_unknown(i):
                self.tokens.append(b"")
                self.special_token_ids.append(i)
            elif sp.is_byte(i):
                self.tokens.append(bytes([int(sp.id_to_piece(i)[3:5], 16)]))
            else:
                self.tokens.append(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))

    def __call__(self, s: str) -> list[int]:
        sp = self._sp
        ids = self._tokenizer.encode(s, add_special_tokens=False)
        # Only when the pieces spell s with one extra leading space is that
        # space the dummy prefix (normalization may have changed s otherwise).
        if not ids or b"".join(self.tokens[i] for i in ids) != b" " + s.encode("utf-8"):
            return ids
        rest = sp.id_to_piece(ids[0])[1:]  # the first piece without its space
        if not rest:
            return ids[1:]
        rid = sp.piece_to_id(rest)
        if not sp.is_unknown(rid):
            return [rid] + ids[1:]
        return [sp.piece_to_id(f"<0x{b:02X}>") for b in rest.encode("utf-8")] + ids[1:]


def allowed_tokens(mask: np.ndarray, vocab: int) -> np.ndarray:
    """The token ids a (words,) uint32 mask allows (tests, tools)."""
    bits = np.unpackbits(mask.view(np.uint8), bitorder="little")[:vocab]
    return np.flatnonzero(bits)
