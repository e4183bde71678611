"""Structured output (SamplingParams json_schema / json_object / regex / choice /
grammar, enforced by llguidance masks in the engine's sampler) on the default
model, and the engine's token-mask hook itself on a tiny model."""
from __future__ import annotations

# SmolLM2 runs with deterministic=True here: its tests compare tokens across
# batch compositions, and on a processor with AMX the bf16 default is False
# (a row's bits then depend on its step's size: docs/determinism.md).

import json
import re

import jsonschema
import numpy as np
import pytest

import pagedrt
from pagedrt import _core
from pagedrt.structured import allowed_tokens
from conftest import finished_events

ASK = [{"role": "user", "content": "Describe a fictional person as JSON."}]

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0,
                                                                             "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]},
                                               "minItems": 1, "maxItems": 3}},
     "required": ["tags"], "additionalProperties": False},
    {"type": "object", "properties": {"score": {"type": "number", "minimum": -1, "maximum": 1},
                                      "ok": {"type": "boolean"}, "note": {"type": "string", "maxLength": 12}},
     "required": ["score", "ok"], "additionalProperties": False},
    {"$defs": {"pt": {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
                      "required": ["x", "y"], "additionalProperties": False}},
     "type": "object", "properties": {"from": {"$ref": "#/$defs/pt"}, "to": {"$ref": "#/$defs/pt"}},
     "required": ["from", "to"], "additionalProperties": False},
]


@pytest.fixture(scope="module")
def rt(smol):
    with pagedrt.Runtime(smol, device="cpu", deterministic=True) as r:
        yield r


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_json_schemas_validate(rt, temperature):
    """Every answer that ends with "stop" parses and validates against its schema
    (greedy and sampled; all four schemas in one batch)."""
    outs = [rt.generate(ASK, max_tokens=120, temperature=temperature, seed=s, json_schema=schema)
            for s, schema in enumerate(SCHEMAS)]
    stopped = 0
    for schema, c in zip(SCHEMAS, outs):
        c = c[0]
        if c.finish_reason == "stop":
            jsonschema.validate(json.loads(c.text), schema)
            stopped += 1
    assert stopped >= 2, [c[0].text for c in outs]  # (bounded schemas: most answers end)


def test_json_object_regex_choice_grammar(rt):
    c = rt.generate([{"role": "user", "content": "Reply with a JSON object with one key, ok, set to true."}],
                    max_tokens=200, temperature=0, json_object=True)[0]
    assert c.text.lstrip().startswith("{")
    if c.finish_reason == "stop":
        assert isinstance(json.loads(c.text), dict)
    for pattern in (r"[0-9]{4}", r"(yes|no), because [a-z ]{3,20}\.", r"[A-Z][a-z]+ [0-9]{1,2}"):
        c = rt.generate([{"role": "user", "content": "Answer briefly."}], max_tokens=40, temperature=0.7, seed=3,
                        regex=pattern)[0]
        assert c.finish_reason == "length" or re.fullmatch(pattern, c.text), (pattern, c.text)
    labels = ["positive", "negative", "neutral"]
    for text in ("I love it!", "This is awful.", "It is a chair."):
        c = rt.generate([{"role": "user", "content": f"Sentiment of: {text}"}], max_tokens=10, temperature=0,
                        choice=labels)[0]
        assert c.text in labels and c.finish_reason == "stop"
    c = rt.generate(ASK, max_tokens=20, temperature=0, grammar='start: "x=" NUM\nNUM: /[0-9]{1,3}/')[0]
    assert re.fullmatch(r"x=[0-9]{1,3}", c.text), c.text
    c = rt.generate(ASK, max_tokens=20, temperature=0, grammar='root ::= "id-" [0-9] [0-9]')[0]  # GBNF
    assert re.fullmatch(r"id-[0-9]{2}", c.text), c.text


def test_n_samples_each_follow_the_constraint(rt):
    c = rt.generate(ASK, max_tokens=12, temperature=1.0, seed=5, n=3, regex=r"[a-z]{2,6}( [a-z]{2,6})?")[0]
    assert len(c.outputs) == 3
    for o in c.outputs:
        assert o.finish_reason == "length" or re.fullmatch(r"[a-z]{2,6}( [a-z]{2,6})?", o.text), o.text


def test_unconstrained_neighbours_are_unaffected(rt):
    """Greedy requests give bitwise the same tokens alone and in a batch with
    constrained requests."""
    plain = [[{"role": "user", "content": q}] for q in ("Name a colour.", "Count to five.", "Say hello.")]
    alone = [c.token_ids for c in rt.generate(plain, max_tokens=16, temperature=0)]
    ids = [rt.submit(p, max_tokens=16, temperature=0, by_id=True) for p in plain]
    cons = [rt.submit(ASK, max_tokens=40, temperature=0.7, seed=i, json_schema=SCHEMAS[i], by_id=True)
            for i in range(3)]
    got = {rid: [] for rid in ids + cons}
    for ev in finished_events(rt, got):
        got[ev.request_id] += ev.token_ids
    assert [got[r] for r in ids] == alone


@pytest.mark.parametrize("kw,where", [
    (dict(regex="[0-9"), "regex"), (dict(json_schema={"type": "nope"}), "json_schema"),
    (dict(json_schema="{not json"), "json_schema"), (dict(choice=[]), "choice"), (dict(choice=["a", 3]), "choice"),
    (dict(grammar="start: undefined_rule"), "grammar"), (dict(regex="a", choice=["b"]), "at most one"),
    (dict(regex="a", beam_width=2), "beam"),
])
def test_invalid_constraints_are_clear_errors(rt, kw, where):
    with pytest.raises(pagedrt.InvalidArgument, match=where):
        rt.submit("hi", max_tokens=4, **kw)
    assert rt.generate("hi", max_tokens=2)[0].token_ids  # and it goes on


@pytest.mark.parametrize("async_scheduling", ["off", "on"])
def test_the_sampler_picks_only_masked_tokens(tiny_sp, async_scheduling):
    """The engine's hook: with a provider that allows a random set of tokens at
    each step (also a single token, and the whole vocabulary), every picked
    token is in its step's set, greedy and sampled, over several sequences.
    With async scheduling the greedy rows' steps are launched ahead: a row
    must still see only known tokens (no placeholder)."""
    rt = pagedrt.Runtime(tiny_sp, device="cpu", async_scheduling=async_scheduling)
    vocab = rt.model_info.vocab_size
    rng = np.random.default_rng(0)
    allowed: dict[tuple[str, int, int], set] = {}

    def fill(rows, v):
        assert v == vocab
        for row in rows:
            assert all(t >= 0 for t in row.generated), list(row.generated)
            k = int(rng.integers(1, 6)) if rng.random() < 0.8 else vocab
            toks = rng.choice(vocab, size=k, replace=False)
            mask = row.mask(vocab)
            for t in toks:
                mask[t >> 5] |= np.uint32(1 << (int(t) & 31))
            assert sorted(allowed_tokens(mask, vocab)) == sorted(int(t) for t in toks)
            allowed[(row.request_id, row.index, len(row.generated))] = set(int(t) for t in toks)

    released = []
    rt._rt.set_token_mask_provider(fill, released.append)
    ids = []
    for i, temp in enumerate((0.0, 1.0, 0.7)):
        p = _core.SamplingParams()
        p.max_tokens, p.temperature, p.ignore_eos, p.masked = 12, temp, True, True
        p.n = 2 if i == 2 else 1
        ids.append(rt._rt.submit([5, 6, 7, 8 + i], p, f"m{i}", True))
    outs: dict[tuple[str, int], list] = {}
    for ev in finished_events(rt._rt, ids):
        outs.setdefault((ev.request_id, ev.index), []).extend(ev.token_ids)
    assert len(outs) == 4, {k: len(v) for k, v in outs.items()}
    for (rid, index), toks in outs.items():
        assert len(toks) == 12, {k: len(v) for k, v in outs.items()}
        for j, t in enumerate(toks):
            key = (rid, index, j) if (rid, index, j) in allowed else (rid, 0, j)  # n > 1: the first pick is the parent's
            assert t in allowed[key], (rid, index, j, t)
    assert sorted(released) == sorted(ids)
    rt.close()


@pytest.mark.parametrize("async_scheduling", ["off", "on"])
def test_a_mask_without_tokens_or_a_failing_provider_ends_the_request_with_an_error(tiny_sp, async_scheduling):
    """A row left allowing nothing ends its sequence with an error, carrying the
    row's reason where the provider gave one (MaskRow.error); a provider that
    raises ends the rows' requests with its message. With async scheduling
    the step after such a row is already launched (its token fed as 0)."""
    rt = pagedrt.Runtime(tiny_sp, device="cpu", async_scheduling=async_scheduling)

    def fill(rows, vocab):
        if any(r.request_id == "boom" for r in rows):
            raise ValueError("matcher exploded")
        for r in rows:
            if r.request_id == "why":
                r.error = "the grammar is stuck"
            elif r.request_id == "empty" and len(r.generated) < 2:  # two tokens, then none allowed
                r.mask(vocab)[0] = np.uint32(1 << 9)

    rt._rt.set_token_mask_provider(fill, lambda rid: None)
    p = _core.SamplingParams()
    p.max_tokens, p.masked = 4, True
    for rid, want in (("empty", "the token mask allows no token"), ("why", "token mask: the grammar is stuck"),
                      ("boom", "matcher exploded")):
        rt._rt.submit([5, 6, 7], p, rid, True)
        evs = []
        while not (evs and evs[-1].request_finished):
            evs += rt._rt.poll_requests([rid], 1.0)
        assert evs[-1].finish_reason == "error" and want in evs[-1].error, evs[-1].error
        assert [t for ev in evs for t in ev.token_ids] == ([9, 9] if rid == "empty" else [])
    assert rt.generate([5, 6, 7], max_tokens=3)[0].token_ids  # the engine goes on
    rt.close()


def _constrained_mix(r, sampled):
    """Greedy requests under a regex, a choice and a JSON schema beside plain
    greedy ones (and, with `sampled`, seeded sampled constrained ones, which
    the CPU draws on the host), all at once: (token ids, finish reason) each."""
    jobs = [dict(regex=r"x=[0-9]{1,3};"), dict(choice=["hello world", "bye"]),
            dict(json_schema={"type": "object", "properties": {"n": {"type": "integer"}},
                              "required": ["n"], "additionalProperties": False}),
            dict(regex=r"the (quick|slow) [a-z]{2,8}"), dict(), dict(ignore_eos=True)]
    params = [pagedrt.SamplingParams(max_tokens=24 + 3 * i, temperature=0.0, **kw) for i, kw in enumerate(jobs)]
    if sampled:
        params += [pagedrt.SamplingParams(max_tokens=20, temperature=1.0, seed=i, regex=r"[ab]{1,9}")
                   for i in range(2)]
    ids = [r.submit(f"the quick {i}", sp, by_id=True) for i, sp in enumerate(params)]
    got = {rid: ([], [None]) for rid in ids}
    for ev in finished_events(r, ids, timeout=5.0):
        got[ev.request_id][0].extend(ev.token_ids)
        if ev.request_finished:
            got[ev.request_id][1][0] = ev.finish_reason
    return [(toks, reason[0]) for toks, reason in (got[rid] for rid in ids)]


@pytest.mark.parametrize("sampled", [False, True])
def test_structured_steps_pipelined_give_the_synchronous_tokens(tiny_sp, sampled, monkeypatch):
    """Async scheduling takes steps with structured output: each masked row's
    mask is filled once the step ahead is processed and its pick queued after
    the forward, behind the gate the fill opens (Backend::queue_gated_masks;
    PAGEDRT_GATED_MASKS=0: after waiting for the fill). Every token and
    finish reason equals the synchronous run's (CPU: exact whatever the
    batch), gated or not, and with only greedy requests nearly every step is
    launched ahead. Seeded sampled constrained requests (drawn on the host:
    their steps are not pipelined), let in as greedy ones end, make the greedy
    rows' masks follow a launched step's placeholder: filled after it is
    processed."""
    runs = []
    for mode, gated in (("off", "1"), ("on", "1"), ("on", "0")):
        monkeypatch.setenv("PAGEDRT_GATED_MASKS", gated)  # read when the engine starts
        # sampled: at most 4 running, so that a sampled request comes in as a greedy one ends
        with pagedrt.Runtime(tiny_sp, device="cpu", block_size=4, async_scheduling=mode,
                             max_num_seqs=4 if sampled else 256) as r:
            runs.append((_constrained_mix(r, sampled), r.stats()))
    (want, st_off), (got, st_on), (got_ungated, st_ungated) = runs
    assert got == want and got_ungated == want
    assert sum(1 for toks, reason in want[:4] if reason == "stop") >= 2, want  # the constraints ended answers
    # pipelined, a sequence's last step also fills the row after it (its end is not yet known): one row more at most
    assert st_off.async_steps == 0 and 0 < st_off.mask_rows <= st_on.mask_rows <= st_off.mask_rows + len(want)
    assert st_off.gated_mask_steps == 0 and st_ungated.gated_mask_steps == 0
    assert 0 < st_on.gated_mask_steps <= st_on.async_steps
    if sampled:
        assert 0 < st_on.async_steps < st_on.num_steps
    else:
        assert st_on.async_steps >= 0.9 * st_on.num_steps, (st_on.async_steps, st_on.num_steps)
        assert st_on.gated_mask_steps >= 0.8 * st_on.mask_steps, (st_on.gated_mask_steps, st_on.mask_steps)


def test_step_trace_orders_each_steps_events(tiny_sp, tmp_path, monkeypatch):
    """PAGEDRT_STEP_TRACE=FILE (diagnostics, tools/step_trace.py): each engine
    appends its steps' host events at shutdown. On pipelined structured steps
    behind the gate: every step is scheduled, launched and processed once, in
    that order; a step's masks are filled after the step ahead's results are
    collected and before its gate opens; gates opened = gated steps counted in
    stats(). Without the variable nothing is written."""
    import pathlib
    import sys
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tools"))
    import step_trace

    path = tmp_path / "trace.txt"
    monkeypatch.setenv("PAGEDRT_GATED_MASKS", "1")
    monkeypatch.setenv("PAGEDRT_STEP_TRACE", str(path))
    with pagedrt.Runtime(tiny_sp, device="cpu", block_size=4, async_scheduling="on") as r:
        _constrained_mix(r, False)
        st = r.stats()
    engines = step_trace.sections(path.read_text().splitlines())
    assert len(engines) == 1
    at: dict[int, dict[str, list[float]]] = {}
    for t, what, step in engines[0]:
        at.setdefault(step, {}).setdefault(what, []).append(t)
    assert sorted(at) == list(range(1, st.num_steps + 1))
    for s, ev in at.items():
        one = {k: v[0] for k, v in ev.items()}
        assert all(len(ev[k]) == 1 for k in ("scheduled", "launch", "launched", "processed")), (s, ev)
        assert one["scheduled"] <= one["launch"] <= one["launched"] <= one["processed"], (s, one)
        if "fill_start" in one:
            assert one["fill_start"] <= one["fill_end"] <= one.get("gate_open", one["fill_end"]), (s, one)
            ahead = at.get(s - 1, {}).get("collected")
            assert ahead is None or ahead[0] <= one["fill_start"], (s, one)
    assert sum("gate_open" in ev for ev in at.values()) == st.gated_mask_steps > 0
    res, steps = step_trace.intervals(engines[0])
    assert steps == st.num_steps and len(res["fill"]) > 0 and min(res["launch (host)"]) >= 0
    kinds = step_trace.by_kind(engines[0])
    filled = sum("fill_start" in ev for ev in at.values())
    assert kinds["masked"]["steps"] == filled and kinds["plain"]["steps"] == st.num_steps - filled
    assert sum(b["steps"] for b in kinds["masked_by_fill"]) == kinds["masked"]["period_steps"] > 0
    assert step_trace.main([str(path)]) == 0

    monkeypatch.delenv("PAGEDRT_STEP_TRACE")
    path.unlink()
    with pagedrt.Runtime(tiny_sp, device="cpu", block_size=4) as r:
        r.generate(["the quick"], max_tokens=4)
    assert not path.exists()


def test_chat_set_takes_structured_fields(tmp_path):
    """pagedrt-chat's /set: json_schema and grammar from a file (or inline),
    choice as a comma list, "off" to undo; a second constraint or one that does
    not compile is refused."""
    from pagedrt.chat import _set_param
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps(SCHEMAS[0]))
    p = _set_param(pagedrt.SamplingParams(), f"json_schema {schema}")
    assert json.loads(p.json_schema) == SCHEMAS[0]
    with pytest.raises(pagedrt.InvalidArgument, match="at most one"):
        _set_param(p, "regex [0-9]+")
    p = _set_param(p, "json_schema off")
    assert p.json_schema is None and _set_param(p, "choice yes, no").choice == ["yes", "no"]
    with pytest.raises(pagedrt.InvalidArgument, match="regex"):
        _set_param(p, "regex [0-9")
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "object"')
    with pytest.raises(pagedrt.InvalidArgument, match=f"^json_schema from {bad}: Expecting ','"):
        _set_param(p, f"json_schema {bad}")  # the file named, the message once
    with pytest.raises(pagedrt.InvalidArgument, match="neither a file nor an inline JSON object"):
        _set_param(p, f"json_schema {tmp_path / 'missing.json'}")


def test_parallel_masks_equal_sequential(smol):
    """Masks on a pool of threads (the GPU's way, and a many-core CPU's) give
    the same greedy answers as masks one after another on the helper thread,
    several rows per step; the CPU forward runs on the one core the pool
    leaves it here (2 threads lent)."""
    from pagedrt.structured import Constraints
    asks = [[{"role": "user", "content": f"Describe person {i} as JSON."}] for i in range(4)]
    answers = []
    for threads in (0, 2):
        with pagedrt.Runtime(smol, device="cpu", deterministic=True) as r:
            info = r.model_info
            r._structured = Constraints(r.model_path, info.vocab_size, info.eos_token_ids[0], threads=threads)
            r._structured.install(r._rt)
            answers.append([c.text for c in r.generate(asks, max_tokens=40, temperature=0, json_schema=SCHEMAS[0])])
    assert answers[0] == answers[1]


def test_a_sentencepiece_model_follows_constraints(tiny_sp):
    """A tokenizer.model-only model (sentencepiece: U+2581 spaces, byte pieces,
    a dummy prefix that llguidance's encoder must not see) obeys regexes,
    choices and JSON, sampled with several seeds on a random model."""
    with pagedrt.Runtime(tiny_sp, device="cpu") as r:
        for seed in range(6):
            for pattern in (r"[ab]{1,5}", r"the (quick|slow) [a-z]{2,8}", r"x=[0-9]{1,3};"):
                c = r.generate("the quick", max_tokens=40, temperature=1.0, seed=seed, regex=pattern)[0]
                assert c.finish_reason == "stop" and re.fullmatch(pattern, c.text), (pattern, c.text)
            c = r.generate("the quick", max_tokens=40, temperature=1.0, seed=seed, choice=["hello world", "bye"])[0]
            assert c.text in ("hello world", "bye") and c.finish_reason == "stop", c.text
            c = r.generate("the quick", max_tokens=60, temperature=1.0, seed=seed,
                           json_schema={"type": "object", "properties": {"n": {"type": "integer"}},
                                        "required": ["n"], "additionalProperties": False})[0]
            if c.finish_reason == "stop":
                assert set(json.loads(c.text)) == {"n"}, c.text


# ---- checked picks (pagedrt/token_mask.hpp: plain greedy rows picked without a mask, the pick validated) ----

def _json_run(r, validate, asks, schema, **kw):
    """Greedy answers to `asks` under one JSON schema, all at once, with the
    Runtime's constraints as the provider validating with `validate` (None:
    every row masked before its pick); and the stats' checked / refused rows."""
    cons = r._constraints()
    r._rt.set_token_mask_provider(cons.fill, cons.release, cons.busy_threads, validate)
    before = r.stats()
    outs = [c.outputs[0].token_ids for c in r.generate(asks, max_tokens=48, temperature=0, json_schema=schema, **kw)]
    after = r.stats()
    return outs, after.mask_rows_checked - before.mask_rows_checked, after.mask_rows_refused - before.mask_rows_refused


def test_checked_picks_give_the_masked_picks(smol):
    """12 greedy JSON requests at once: the tokens with checked picks equal, one
    for one, those with a mask before every pick; most picks were checked and
    kept, some refused (both paths ran). A validator that refuses everything,
    and one that raises, give the same tokens too (every row falls back to its
    mask)."""
    asks = [[{"role": "user", "content": f"Invent person number {i} and describe them as JSON."}] for i in range(12)]
    with pagedrt.Runtime(smol, device="cpu", deterministic=True) as r:
        cons = r._constraints()
        masked, checked0, _ = _json_run(r, None, asks, SCHEMAS[0])
        assert checked0 == 0
        checked, n_checked, n_refused = _json_run(r, cons.validate, asks, SCHEMAS[0])
        assert checked == masked
        assert n_checked > 100 and 0 < n_refused < n_checked / 2, (n_checked, n_refused)

        def boom(rows, tokens):
            raise RuntimeError("validator exploded")

        for validate in (lambda rows, tokens: bytes(len(rows)), boom):
            again, n, refused = _json_run(r, validate, asks, SCHEMAS[0])
            assert again == masked and n > 0 and refused == n


def test_checked_picks_beside_other_requests_and_constraints(smol):
    """Checked rows in one batch with regex, choice and unconstrained requests:
    each answer equals the one it gives with a mask before every pick."""
    kinds = [dict(json_schema=SCHEMAS[1]), dict(regex=r"[0-9]{3}-[a-z]{2,4}"),
             dict(choice=["red", "green", "blue"]), dict(), dict(json_schema=SCHEMAS[3])]
    asks = [[{"role": "user", "content": f"Answer question {i}."}] for i in range(len(kinds))]
    results = []
    with pagedrt.Runtime(smol, device="cpu", deterministic=True) as r:
        cons = r._constraints()
        for validate in (None, cons.validate):
            r._rt.set_token_mask_provider(cons.fill, cons.release, cons.busy_threads, validate)
            ids = [r.submit(a, by_id=True, max_tokens=32, temperature=0, **k) for a, k in zip(asks, kinds)]
            toks = {rid: [] for rid in ids}
            for ev in finished_events(r, ids):
                toks[ev.request_id] += ev.token_ids
            results.append([toks[i] for i in ids])
        assert r.stats().mask_rows_checked > 0
    assert results[0] == results[1]


def test_a_validator_that_allows_everything_lets_invalid_picks_through(tiny_sp):
    """The check is what keeps a pick in the grammar: on a random tiny model, a
    validator that says yes to every token lets answers leave the regex (the
    comparison above can fail)."""
    with pagedrt.Runtime(tiny_sp, device="cpu") as r:
        cons = r._constraints()
        outs = {}
        for name, validate in (("checked", cons.validate), ("yes", lambda rows, tokens: bytes([1]) * len(rows))):
            r._rt.set_token_mask_provider(cons.fill, cons.release, cons.busy_threads, validate)
            outs[name] = [c.text for c in r.generate(["a b c"] * 4, max_tokens=12, temperature=0,
                                                     regex=r"(yes|no)( maybe)*")]
    assert all(re.fullmatch(r"(yes|no)( maybe)*", t) for t in outs["checked"]), outs["checked"]
    assert not all(re.fullmatch(r"(yes|no)( maybe)*", t) for t in outs["yes"]), outs["yes"]


def test_constrained_answers_survive_preemption(smol):
    """12 greedy JSON requests in a pool small enough to preempt (recompute):
    the same tokens as in a roomy pool, with checked picks and masking first
    alike (a resumed sequence's matcher has its tokens already; the engine
    feeds it only what came since), and with speculative n-grams (verify rows
    masked, rejected proposals rolled back in the matchers and the pool)."""
    asks = [[{"role": "user", "content": f"Invent person number {i} and describe them as JSON."}] for i in range(12)]
    block_bytes = 30 * 2 * 3 * 64 * 16 * 2  # SmolLM2's bf16 KV block
    with pagedrt.Runtime(smol, device="cpu", deterministic=True) as r:
        roomy, _, _ = _json_run(r, r._constraints().validate, asks, SCHEMAS[0])
    for checked, spec in ((True, None), (False, None), (True, "ngram")):
        with pagedrt.Runtime(smol, device="cpu", deterministic=True, kv_cache_bytes=24 * block_bytes, enable_prefix_caching=False) as r:
            tight, n, _ = _json_run(r, r._constraints().validate if checked else None, asks, SCHEMAS[0],
                                    speculative=spec)
            stats = r.stats()
            assert stats.num_preemptions > 0, "the pool was meant to force preemptions"
            assert stats.blocks_used == 0
        assert tight == roomy, (checked, spec)
        assert (n > 0) == checked
        assert (stats.spec_proposed > 0) == (spec is not None)


RECORD = ("Order 4471 was placed on 12 March 2024 by Maria Lindqvist, Storgatan 14, 411 38 Gothenburg, Sweden, "
          "for two blue ceramic teapots at 349 SEK each, paid by card.")
ORDER = {"type": "object", "properties": {"order": {"type": "integer"}, "customer": {"type": "string"},
                                          "street": {"type": "string"}, "city": {"type": "string"}},
         "required": ["order", "customer", "street", "city"], "additionalProperties": False}


@pytest.mark.parametrize("spec", ["ngram", "draft"])
def test_speculative_structured_output_equals_plain(smol, spec):
    """Speculative decoding under a JSON schema and a regex (each verify row
    masked with the grammar's state after the proposals before it): greedy
    answers equal, token for token, those without speculation; proposals were
    accepted; refused ones were not (the answers validate). Sampled answers
    (n = 2, seeded) validate too, and repeat with the same seed."""
    ask = [{"role": "user", "content": "Copy the order number, customer, street and city from this text "
                                       "into JSON.\n\n" + RECORD}]
    regex = r"Order [0-9]+ by [A-Z][a-z]+ [A-Z][a-z]+, [A-Za-z0-9 ]+\."
    ask_re = [{"role": "user", "content": "Summarise in one sentence who placed which order.\n\n" + RECORD}]
    draft = dict(draft_model=smol) if spec == "draft" else {}
    with pagedrt.Runtime(smol, device="cpu", deterministic=True, **draft) as r:
        for prompt, kw in ((ask, dict(json_schema=ORDER)), (ask_re, dict(regex=regex))):
            plain = r.generate(prompt, max_tokens=64, temperature=0, **kw)[0].outputs[0]
            fast = r.generate(prompt, max_tokens=64, temperature=0, speculative=spec, **kw)[0].outputs[0]
            assert fast.token_ids == plain.token_ids, (kw, fast.text, plain.text)
            assert fast.spec_accepted > 0, (kw, fast.spec_proposed)
            assert fast.finish_reason == "stop", fast
            if "json_schema" in kw:
                jsonschema.validate(json.loads(fast.text), ORDER)
            else:
                assert re.fullmatch(regex, fast.text), fast.text
        sampled = [r.generate(ask, max_tokens=64, temperature=0.8, seed=7, n=2, speculative=spec,
                              json_schema=ORDER)[0] for _ in range(2)]
        assert [o.token_ids for o in sampled[0].outputs] == [o.token_ids for o in sampled[1].outputs]
        for o in sampled[0].outputs:
            if o.finish_reason == "stop":
                jsonschema.validate(json.loads(o.text), ORDER)
        assert sum(o.spec_proposed for o in sampled[0].outputs) > 0
        stats = r.stats()
        assert stats.blocks_used == 0 and stats.draft_blocks_used == 0
