"""Structured output: the constraint fields of SamplingParams (json_schema,
json_object, regex, choice, grammar) as llguidance grammars, and the token-mask
provider that enforces them in the engine's sampler.

A constrained request is submitted with the C++ flag ``masked``; at each step
the engine asks this provider for the allowed tokens of its sampling rows (on
an engine thread, while the forward runs) and the sampler drops every other
token before any other processing. Each sequence has its own llguidance
matcher, fed the tokens the sequence has produced since the last mask (n > 1
samples start from a fresh one and catch up). When the grammar is complete
only the end-of-sequence token is allowed, so the answer ends with "stop".
"""
from __future__ import annotations

import json
import os
import threading
import time
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


def grammar_of(field: str, value) -> str:
    """The llguidance grammar of a constraint; InvalidArgument with the
    library's message (naming the field) when it does not compile."""
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
    On the GPU the forward leaves the host's cores free: llguidance's pool at
    its default size (None). On the CPU the forward lends the masks cores
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
    """The llguidance matchers of one Runtime's constrained requests: its
    TokenMaskProvider (fill/release are called by the engine)."""

    def __init__(self, model_dir, vocab: int, eos_token: int, threads: Optional[int] = 0, tokenizer=None):
        import llguidance
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
        self._grammars: dict[str, str] = {}
        self._matchers: dict[tuple[str, int], list] = {}  # (request, index) -> [matcher, tokens consumed]
        self._lock = threading.Lock()
        self.fill_seconds, self.fill_calls, self.fill_rows = 0.0, 0, 0  # for tools/bench_structured.py
        self.validate_seconds, self.validate_rows = 0.0, 0
        # threads (mask_threads): 0 computes a step's masks one after another on
        # the engine's helper thread; k > 0 on an llguidance executor of k
        # threads, None of llguidance's default size (80% of the cores).
        self._executor = None if threads == 0 else llguidance.LLExecutor(num_threads=threads)
        #: the host threads a fill keeps busy (Runtime.set_token_mask_provider's
        #: `threads`: a CPU forward leaves them that many cores meanwhile).
        self.busy_threads = 1 if threads == 0 else threads or max(1, (os.cpu_count() or 1) * 4 // 5)

    def add(self, request_id: str, grammar: str) -> None:
        with self._lock:
            self._grammars[request_id] = grammar

    def _matcher(self, row):
        """The row's matcher, made on first use and fed the tokens the row has
        generated since; None once the request was released."""
        import llguidance
        key = (row.request_id, row.index)
        with self._lock:
            state = self._matchers.get(key)
            if state is None:
                grammar = self._grammars.get(row.request_id)
                if grammar is None:
                    return None
                state = self._matchers[key] = [llguidance.LLMatcher(self.tokenizer, grammar), 0]
        matcher, done = state
        generated = row.generated
        if len(generated) > done:
            matcher.consume_tokens(generated[done:])
            state[1] = len(generated)
        return matcher

    def validate(self, rows, tokens) -> bytes:
        """The engine's checked picks (pagedrt/token_mask.hpp): one byte a row,
        1 where its matcher may take the token next (a plain greedy row's pick
        made without a mask), 0 where not (the row then gets its mask)."""
        t0 = time.perf_counter()
        ok = bytearray(len(rows))
        for i, (row, token) in enumerate(zip(rows, tokens)):
            matcher = self._matcher(row)
            if matcher is not None and not matcher.is_error() and matcher.validate_tokens([token]) == 1:
                ok[i] = 1
        self.validate_seconds += time.perf_counter() - t0
        self.validate_rows += len(rows)
        return bytes(ok)

    def fill(self, rows, vocab: int) -> None:
        """Feeds each row's matcher its new tokens, then computes every mask at once
        on llguidance's threads (the engine's rows are one contiguous block, in
        order; their addresses are checked)."""
        t0 = time.perf_counter()
        batch: list[tuple] = []
        for i, row in enumerate(rows):
            matcher = self._matcher(row)
            if matcher is None:
                continue  # released meanwhile: its mask stays empty
            if not matcher.is_error():
                batch.append((matcher, i))
        if batch:
            base, stride = rows[0].mask_address, self.words * 4
            if self._executor is not None and all(r.mask_address == base + i * stride
                                                  for i, r in enumerate(rows)):
                self._executor.unsafe_compute_mask_ptr(batch, base, stride, len(rows))
            else:
                for matcher, i in batch:
                    matcher.unsafe_compute_mask_ptr(rows[i].mask_address, stride)
        self.fill_seconds += time.perf_counter() - t0
        self.fill_calls += 1
        self.fill_rows += len(rows)

    def release(self, request_id: str) -> None:
        with self._lock:
            self._grammars.pop(request_id, None)
            for key in [k for k in self._matchers if k[0] == request_id]:
                del self._matchers[key]


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
