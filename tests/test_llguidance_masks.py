"""Structured output's C++ mask provider (pagedrt/llguidance_masks.hpp, which
calls llguidance's C API in the wheel's own library): its masks against
llguidance's Python matchers, its compiled-constraint cache, its tokenizer's
kept answers, and its errors."""
from __future__ import annotations

# SmolLM2 runs with deterministic=True here: its tests compare tokens across
# batch compositions, and on a processor with AMX the bf16 default is False
# (a row's bits then depend on its step's size: docs/determinism.md).

import random
import re

import llguidance
import numpy as np
import pytest

import pagedrt
from pagedrt import _core
from pagedrt.structured import allowed_tokens, grammar_of
from conftest import finished_events

from test_structured import SCHEMAS

CONSTRAINTS = [("json_schema", s) for s in SCHEMAS] + [
    ("regex", r"[0-9]{3}-[a-z]{2,4}( [A-Z]+)?"), ("choice", ["red", "green", "blue", "dark green"]),
    ("json_object", True), ("grammar", 'start: "a" b* c\nb: " x" | " y"\nc: "!" | "?"'),
]


def _walks_agree(cons, vocab, walks=3, steps=40, seed=0):
    """Random walks through each constraint's allowed tokens: at every step the
    C++ mask of sequence `walk` (fed the walk's tokens so far) is bitwise
    llguidance's Python matcher's. Returns the masks compared."""
    rng = random.Random(seed)
    words = (vocab + 31) // 32
    compared = 0
    for ci, (field, value) in enumerate(CONSTRAINTS):
        grammar = grammar_of(field, value)
        cons.add(f"w{ci}", grammar)
        for walk in range(walks):
            py = llguidance.LLMatcher(cons.tokenizer, grammar)
            generated = []
            for _ in range(steps):
                want = np.frombuffer(py.compute_bitmask(), dtype=np.uint32)[:words]
                got = cons.masks.mask(f"w{ci}", walk, generated, vocab)
                assert np.array_equal(got, want), (field, value, walk, generated)
                compared += 1
                allowed = allowed_tokens(want, vocab)
                if py.is_stopped() or len(allowed) == 0:
                    break
                token = int(rng.choice(list(allowed)))
                assert py.consume_token(token)
                generated.append(token)
        cons.release(f"w{ci}")
    return compared


def test_masks_equal_llguidance_python_on_smollm2(smol):
    """SmolLM2's byte-level BPE (tokenizer.json): the C++ masks are llguidance's
    Python ones at every step of random walks through nine constraints, forced
    text (JSON keys) included: the model's tokenizer is what makes those agree
    (without it llguidance allows any tokens that spell the forced text)."""
    with pagedrt.Runtime(smol, device="cpu", deterministic=True) as r:
        cons = r._constraints()
        assert _walks_agree(cons, r.model_info.vocab_size) > 200
        c = cons.counters()
        assert c["tokenize_calls"] > 0 and c["tokenize_misses"] <= c["tokenize_calls"]


def test_masks_equal_llguidance_python_on_sentencepiece(tiny_sp):
    """A sentencepiece model (U+2581 spaces, byte pieces, control pieces as
    special tokens): the token bytes handed to C++ rebuild the same trie."""
    with pagedrt.Runtime(tiny_sp, device="cpu") as r:
        cons = r._constraints()
        assert _walks_agree(cons, r.model_info.vocab_size, steps=25) > 100


def test_without_the_models_tokenizer_forced_text_may_come_in_any_tokens(smol):
    """The comparison above can fail: with no tokenizer (llguidance's greedy
    stand-in), a JSON key's first token is any prefix of it, not only the
    model's own token for it."""
    with pagedrt.Runtime(smol, device="cpu", deterministic=True) as r:
        info = r.model_info
        cons = r._constraints()
        bare = _core.LlguidanceMasks(llguidance._lib.__file__, info.vocab_size, info.eos_token_ids[0],
                                     pagedrt.structured.token_bytes(cons.tokenizer, info.vocab_size))
        grammar = grammar_of("json_schema", SCHEMAS[0])
        for masks in (cons.masks, bare):
            masks.add("k", "llguidance", grammar)
        brace = cons.tokenizer.tokenize_str('{"')
        tight = allowed_tokens(cons.masks.mask("k", 0, brace, info.vocab_size), info.vocab_size)
        loose = allowed_tokens(bare.mask("k", 0, brace, info.vocab_size), info.vocab_size)
        assert len(tight) == 1 and set(tight) < set(loose), (tight, loose)


def test_a_constraint_is_compiled_once(smol):
    """Three requests with one schema and one with another: two compiles, two
    found compiled; and the same answers as each alone."""
    with pagedrt.Runtime(smol, device="cpu", deterministic=True) as r:
        r.generate("hi", max_tokens=1, json_schema=SCHEMAS[2])  # the provider exists
        before = r._constraints().counters()
        ask = [{"role": "user", "content": "Describe a point as JSON."}]
        outs = r.generate([ask] * 3, max_tokens=24, temperature=0, json_schema=SCHEMAS[3])
        outs += r.generate(ask, max_tokens=24, temperature=0, json_schema=SCHEMAS[1])
        after = r._constraints().counters()
        assert after["compiles"] - before["compiles"] == 2
        assert after["compile_hits"] - before["compile_hits"] == 2
        assert len({tuple(o.outputs[0].token_ids) for o in outs[:3]}) == 1
        # the fills' row timing: a row within its fill, the longest within the rows' sum,
        # which the pool's threads can at most multiply
        d = {k: after[k] - before[k] for k in after}
        threads = r._constraints().masks.threads
        assert d["fill_calls"] > 0 and 0 < d["fill_longest_row_seconds"] <= d["fill_row_seconds"]
        assert d["fill_longest_row_seconds"] <= d["fill_seconds"]
        assert d["fill_row_seconds"] <= threads * d["fill_seconds"]
        assert 0 <= d["fill_first_rows_start_seconds"] <= d["fill_seconds"]


def test_a_finished_request_id_takes_a_new_constraint_at_once(tiny_sp):
    """The engine drops a request's matchers before its final event: a host that
    read it resubmits the id with another constraint, which is the one obeyed."""
    with pagedrt.Runtime(tiny_sp, device="cpu") as r:
        for pattern in (r"[ab]{2,4}", r"x=[0-9]{1,3};", r"(yes|no)!"):
            rid = r.submit("the quick", request_id="same", max_tokens=20, temperature=1.0, seed=1, regex=pattern)
            text = [ev.text for ev in finished_events(r, [rid])]
            assert re.fullmatch(pattern, "".join(text)), (pattern, text)


def test_a_running_request_id_cannot_be_constrained_twice(tiny_sp):
    with pagedrt.Runtime(tiny_sp, device="cpu") as r:
        r.submit("the quick", request_id="dup", max_tokens=200, ignore_eos=True, regex="[a-z ]+")
        with pytest.raises(pagedrt.InvalidArgument, match="'dup'"):
            r.submit("the quick", request_id="dup", max_tokens=4, regex="[0-9]+")
        r.abort("dup")
        assert r.generate("the quick", max_tokens=8, temperature=0, regex="[0-9]{2}")[0].text.isdigit()


def test_errors_name_the_library_and_the_tokenizer(tmp_path):
    bad = tmp_path / "libnot_llguidance.so"
    bad.write_bytes(b"not a library")
    with pytest.raises(pagedrt.Unsupported, match="libnot_llguidance.so"):
        _core.LlguidanceMasks(str(bad), 8, 0, [b"a"] * 8)
    lib = llguidance._lib.__file__
    with pytest.raises(pagedrt.InvalidArgument, match="3 token strings for a vocabulary of 8"):
        _core.LlguidanceMasks(lib, 8, 0, [b"a", b"b", b"c"])
    with pytest.raises(pagedrt.InvalidArgument, match="eos token 9"):
        _core.LlguidanceMasks(lib, 8, 9, [b"a"] * 8)
    masks = _core.LlguidanceMasks(lib, 4, 0, [b"\xff<eos>", b"a", b"b", b"ab"])
    with pytest.raises(pagedrt.InvalidArgument, match="regex"):
        masks.add("r", "regex", "[0-9")
    masks.add("r", "regex", "(ab)+")
    assert list(allowed_tokens(masks.mask("r", 0, [], 4), 4)) == [1, 3]  # "a" or "ab"
    assert list(allowed_tokens(masks.mask("r", 0, [3], 4), 4)) == [0, 1, 3]  # done, or more
    assert masks.mask("gone", 0, [], 4).sum() == 0  # never added (or released): no token


def test_the_tries_slices_change_no_mask_and_a_bad_one_is_refused(smol, monkeypatch):
    """pagedrt cuts llguidance's token trie into more slices than the library
    (structured.trie_slices: strings of at most 1-8 ... 24 characters); a
    mask must not depend on them. Along SmolLM2 JSON walks inside bounded
    strings, the masks with pagedrt's slices, with none at all and with the
    library's defaults are the same words; PAGEDRT_MASK_SLICES=default asks
    for the defaults; a slice that is not a regex is refused, naming it."""
    with pagedrt.Runtime(smol, device="cpu") as r:
        info, cons = r.model_info, r._constraints()
        V = info.vocab_size
        tokens = pagedrt.structured.token_bytes(cons.tokenizer, V)
        lib = llguidance._lib.__file__
        kinds = {"pagedrt's": pagedrt.structured.trie_slices(), "none": ["x{1000}"], "defaults": []}
        masks = {k: _core.LlguidanceMasks(lib, V, info.eos_token_ids[0], tokens, slices=v) for k, v in kinds.items()}
        schema = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 7},
                                                   "b": {"type": "string", "maxLength": 19}},
                  "required": ["a", "b"], "additionalProperties": False}
        for m in masks.values():
            m.add("s", "llguidance", grammar_of("json_schema", schema))
        rng = np.random.default_rng(3)
        text = cons.tokenizer.tokenize_str('{"a": "')
        compared = 0
        for _ in range(40):  # random allowed tokens from inside "a"'s string on
            got = {k: m.mask("s", 0, text, V) for k, m in masks.items()}
            assert all(np.array_equal(got["defaults"], g) for g in got.values()), len(text)
            allowed = allowed_tokens(got["defaults"], V)
            if len(allowed) == 0:
                break
            text = text + [int(rng.choice(allowed))]
            compared += 1
        assert compared >= 10
    monkeypatch.setenv("PAGEDRT_MASK_SLICES", "default")
    assert pagedrt.structured.trie_slices() == []
    with pytest.raises(pagedrt.InvalidArgument, match="(?s)refused the tokenizer.*unclosed"):
        _core.LlguidanceMasks(llguidance._lib.__file__, 4, 0, [b"\xff<eos>", b"a", b"b", b"ab"], slices=["[0-9"])


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the failure, reported once
def test_a_failing_tokenizer_leaves_masks_valid(smol):
    """A tokenizer that raises: forced text is spelled by C++ (the longest
    tokens first) and the answer still follows its schema. Without that
    stand-in, llguidance took the empty spelling for the model's and stopped
    the answer with a parser error."""
    import json
    import jsonschema

    with pagedrt.Runtime(smol, device="cpu", deterministic=True) as r:
        info = r.model_info
        cons = r._constraints()

        def boom(b):
            raise RuntimeError("tokenizer exploded")

        cons.masks = _core.LlguidanceMasks(llguidance._lib.__file__, info.vocab_size, info.eos_token_ids[0],
                                           pagedrt.structured.token_bytes(cons.tokenizer, info.vocab_size),
                                           tokenize=boom)
        cons.install(r._rt)
        ask = [{"role": "user", "content": "Describe a fictional person as JSON."}]
        c = r.generate(ask, max_tokens=80, temperature=0, json_schema=SCHEMAS[0])[0]
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(c.text), SCHEMAS[0])


def test_a_broken_matcher_ends_its_sequence_with_llguidances_reason(tiny_sp):
    """A pick the grammar forbids, let through by a validator that allows its
    first check and refuses every one after, leaves the sequence's matcher in
    its error state: the next (refused) row's mask allows nothing, and the
    sequence ends with an error carrying llguidance's reason (MaskRow.error),
    not only "allows no token"."""
    with pagedrt.Runtime(tiny_sp, device="cpu") as r:
        cons = r._constraints()
        checks = []

        def validate(rows, tokens):
            checks.append(len(rows))
            return bytes([1 if len(checks) == 1 else 0]) * len(rows)

        r._rt.set_token_mask_provider(cons.fill, cons.release, cons.busy_threads, validate)
        c = r.generate("a b c", max_tokens=12, temperature=0, regex=r"(yes|no)( maybe)*")[0]
        assert c.finish_reason == "error", c.text
        assert c.error.startswith("token mask: llguidance: "), c.error


def test_rows_with_proposals_take_only_what_the_constraint_allows(smol):
    """Speculative verify rows (pagedrt/token_mask.hpp): the row after i
    proposals has the mask llguidance's Python matcher gives after the same
    tokens; a proposal the constraint refuses is not taken (the rows after it,
    which are never used, allow every token without a mask computed, and the
    matcher does not break); the next step's rows, which drop the rejected
    proposals, roll the matcher back."""
    with pagedrt.Runtime(smol, device="cpu", deterministic=True) as r:
        vocab = r.model_info.vocab_size
        words = (vocab + 31) // 32
        cons = r._constraints()
        grammar = grammar_of("json_schema", SCHEMAS[0])
        tok = cons.tokenizer

        def python_mask(tokens):
            m = llguidance.LLMatcher(tok, grammar)
            assert m.consume_tokens(tokens), tokens
            return np.frombuffer(m.compute_bitmask(), dtype=np.uint32)[:words]

        cons.masks.add("p", "llguidance", grammar)
        verified = tok.tokenize_str('{"name": "Ad')
        good = tok.tokenize_str('a", "age": 3')
        for i in range(len(good) + 1):  # one step: rows after 0 .. k proposals, all allowed
            got = cons.masks.mask("p", 0, verified + good[:i], vocab, num_proposed=i)
            assert np.array_equal(got, python_mask(verified + good[:i])), i
        # A refused proposal (an opening brace where the string has ended) in the middle: the rows
        # after it allow everything, and the matcher still serves the sequence.
        everything = np.full(words, 0xFFFFFFFF, dtype=np.uint32)
        if vocab % 32:
            everything[-1] = (1 << (vocab % 32)) - 1
        brace = tok.tokenize_str("{")
        at = next(j for j in range(1, len(good) + 1)
                  if llguidance.LLMatcher(tok, grammar).validate_tokens(verified + good[:j] + brace)
                  == len(verified) + j)
        bad = good[:at] + brace + good[at:]
        for i in range(len(bad) + 1):
            got = cons.masks.mask("p", 0, verified + bad[:i], vocab, num_proposed=i)
            assert np.array_equal(got, python_mask(verified + bad[:i]) if i <= at else everything), i
        # The next step: `at` proposals were kept and another token picked (a space), then new proposals.
        picked = verified + good[:at] + tok.tokenize_str(" ")
        after = tok.tokenize_str('"age"')
        for i in range(len(after) + 1):
            got = cons.masks.mask("p", 0, picked + after[:i], vocab, num_proposed=i)
            assert np.array_equal(got, python_mask(picked + after[:i])), i
        # A verified token the constraint refuses still breaks the matcher: the mask is empty and says why.
        broken = cons.masks.mask("p", 0, picked + tok.tokenize_str("{"), vocab, num_proposed=0)
        assert not broken.any()
        cons.masks.release("p")
