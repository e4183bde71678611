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


class Constraints:
    """The llguidance matchers of one Runtime's constrained requests: its
    TokenMaskProvider (fill/release are called by the engine)."""

    def __init__(self, model_dir, vocab: int, eos_token: int, parallel: bool = False):
        import llguidance
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise Unsupported(f"{model_dir}: structured output needs a tokenizer.json (Hugging Face tokenizers) "
                              "model; this one has only a sentencepiece tokenizer.model")
        self.tokenizer = llguidance.LLTokenizer(path.read_text(), n_vocab=vocab, eos_token=eos_token)
        self.words = (vocab + 31) // 32
        self._grammars: dict[str, str] = {}
        self._matchers: dict[tuple[str, int], list] = {}  # (request, index) -> [matcher, tokens consumed]
        self._lock = threading.Lock()
        self.fill_seconds, self.fill_calls, self.fill_rows = 0.0, 0, 0  # for tools/bench_structured.py
        # parallel: a step's masks on llguidance's own threads, for the GPU, whose
        # forward leaves the host's cores free. With the CPU backend the forward
        # has every core: masks in this one thread, beside it (2-core VM, 32 JSON
        # rows: 7.7 ms a step this way, 10 ms on the pool).
        self._executor = llguidance.LLExecutor() if parallel else None

    def add(self, request_id: str, grammar: str) -> None:
        with self._lock:
            self._grammars[request_id] = grammar

    def fill(self, rows, vocab: int) -> None:
        """Feeds each row's matcher its new tokens, then computes every mask at once
        on llguidance's threads (the engine's rows are one contiguous block, in
        order; their addresses are checked)."""
        import llguidance
        t0 = time.perf_counter()
        batch: list[tuple] = []
        for i, row in enumerate(rows):
            key = (row.request_id, row.index)
            with self._lock:
                state = self._matchers.get(key)
                if state is None:
                    grammar = self._grammars.get(row.request_id)
                    if grammar is None:
                        continue  # released meanwhile: its mask stays empty
                    state = self._matchers[key] = [llguidance.LLMatcher(self.tokenizer, grammar), 0]
            matcher, done = state
            generated = row.generated
            if len(generated) > done:
                matcher.consume_tokens(generated[done:])
                state[1] = len(generated)
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


def allowed_tokens(mask: np.ndarray, vocab: int) -> np.ndarray:
    """The token ids a (words,) uint32 mask allows (tests, tools)."""
    bits = np.unpackbits(mask.view(np.uint8), bitorder="little")[:vocab]
    return np.flatnonzero(bits)
