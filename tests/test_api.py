"""The Python API under use: threads, the GIL, asyncio, closing, bad input."""
from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import pagedrt
from pagedrt.detokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tiny(tiny_sp):
    return tiny_sp


def test_eight_threads_submit_and_poll_every_request_accounted_for(tiny):
    per_thread, results, errors = 12, {}, []
    with pagedrt.Runtime(tiny, device="cpu", kv_cache_bytes=1 << 20) as rt:
        def worker(t):
            try:
                rng = np.random.default_rng(t)
                mine = {}
                for i in range(per_thread):
                    p = rng.integers(3, 400, size=int(rng.integers(1, 30))).tolist()
                    m = int(rng.integers(1, 12))
                    mine[rt.submit(p, max_tokens=m, ignore_eos=True, temperature=0.8, seed=i)] = m
                    if i % 5 == 4:  # and abort some
                        rid = next(iter(mine))
                        try:
                            rt.abort(rid)
                        except pagedrt.InvalidArgument:
                            pass  # already finished and collected
                got = {r: 0 for r in mine}
                ended = {}
                while len(ended) < len(mine):
                    for r in list(set(mine) - set(ended)):
                        try:
                            evs = rt.poll(r, timeout=0.02)
                        except pagedrt.InvalidArgument:
                            continue
                        for ev in evs:
                            got[r] += len(ev.token_ids)
                            if ev.request_finished:
                                ended[r] = ev.finish_reason
                results[t] = (mine, got, ended)
            except Exception as e:  # surfaced below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=300)
        assert not errors, errors
        s = rt.stats()
    assert len(results) == 8
    for mine, got, ended in results.values():
        assert set(ended) == set(mine)                          # every request got its final event
        for r, m in mine.items():
            assert ended[r] in ("length", "abort")
            assert got[r] == m if ended[r] == "length" else got[r] <= m
    assert s.blocks_used == 0 and s.num_running == 0 and s.num_waiting == 0


def test_poll_releases_the_gil(tiny):
    with pagedrt.Runtime(tiny, device="cpu") as rt:
        count, stop = [0], threading.Event()

        def spin():
            while not stop.is_set():
                count[0] += 1

        th = threading.Thread(target=spin)
        th.start()
        start = count[0]
        t0 = time.perf_counter()
        assert rt.poll(timeout=0.5) == []                       # nothing to wait for
        waited = time.perf_counter() - t0
        progressed = count[0] - start
        stop.set()
        th.join()
    assert 0.45 <= waited < 2.0
    assert progressed > 10_000                                  # the other thread ran meanwhile


def test_asyncio_stream_and_generate(tiny):
    async def main(rt):
        texts = []
        async for ev in rt.astream("the quick brown", max_tokens=6, temperature=0, ignore_eos=True):
            texts.append(ev.text)
        both = await asyncio.gather(rt.agenerate("the lazy dog", max_tokens=5, temperature=0, ignore_eos=True),
                                    rt.agenerate("a model", max_tokens=7, temperature=0, ignore_eos=True))
        return texts, both

    with pagedrt.Runtime(tiny, device="cpu") as rt:
        texts, (a, b) = asyncio.run(main(rt))
        sync = rt.generate(["the lazy dog", "a model"], max_tokens=7, temperature=0, ignore_eos=True)
    assert len(a.token_ids) == 5 and len(b.token_ids) == 7
    assert a.token_ids == sync[0].token_ids[:5] and b.token_ids == sync[1].token_ids
    assert "".join(texts)


def test_leaving_a_stream_early_aborts_it(tiny):
    with pagedrt.Runtime(tiny, device="cpu") as rt:
        for ev in rt.stream("the quick", max_tokens=500, ignore_eos=True, temperature=0):
            break
        deadline = time.monotonic() + 5
        while rt.stats().num_running and time.monotonic() < deadline:
            rt.poll(timeout=0.05)
        assert rt.stats().blocks_used == 0


def test_close_with_requests_in_flight(tiny):
    rt = pagedrt.Runtime(tiny, device="cpu")
    ids = [rt.submit("the quick brown fox", max_tokens=300, ignore_eos=True) for _ in range(5)]
    time.sleep(0.05)
    closer = threading.Thread(target=rt.close)  # from another thread
    closer.start()
    closer.join(timeout=30)
    finals = {}
    for ev in rt.poll(timeout=1.0):
        if ev.request_finished:
            finals[ev.request_id] = ev.finish_reason
    assert set(finals) == set(ids) and set(finals.values()) <= {"abort", "length"}
    rt.close()  # idempotent


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads /proc/self/statm (Linux)")
def test_close_frees_the_weights_and_kv_cache(tiny):
    """close() frees the engine's memory at once, not when the object goes:
    the 512 MiB KV pool (four 128 MiB mappings, untouched, so measured as
    address space) is unmapped by close() while `rt` is still referenced, and
    stats() keeps its last figures. In a fresh interpreter, after a warm-up
    Runtime (the engine's threads and their malloc arenas exist by then):
    after other tests the allocator may serve part of the pool from address
    space it already holds (seen after the structured-output tests: 384 of
    the 512 MiB)."""
    code = f"""
import os, pagedrt
mapped = lambda: int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
with pagedrt.Runtime({str(tiny)!r}, device="cpu", kv_cache_bytes=16 << 20) as warm:  # threads and their arenas
    warm.generate("the quick", max_tokens=3, temperature=0)
before = mapped()
rt = pagedrt.Runtime({str(tiny)!r}, device="cpu", kv_cache_bytes=512 << 20)
during = mapped()
assert during - before > 480 << 20, (during - before) >> 20
assert len(rt.generate("the quick", max_tokens=3, temperature=0)[0].token_ids) == 3
rt.close()
assert during - mapped() > 480 << 20, (during - mapped()) >> 20
assert rt.stats().num_blocks > 0 and rt.stats().kv_cache_bytes > 480 << 20
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_bad_input_is_a_clear_error_and_serving_goes_on(tiny):
    with pagedrt.Runtime(tiny, device="cpu", max_model_len=64) as rt:
        with pytest.raises(pagedrt.InvalidArgument, match="empty"):
            rt.submit([])
        with pytest.raises(pagedrt.InvalidArgument, match="more than max_model_len 64"):
            rt.submit(list(range(3, 100)))
        with pytest.raises(pagedrt.InvalidArgument, match="unknown request id 'nope'"):
            rt.abort("nope")
        with pytest.raises(pagedrt.InvalidArgument, match="unknown or finished request id 'nope'"):
            rt.poll("nope")
        with pytest.raises(pagedrt.InvalidArgument, match="chat message 0 needs a string 'role'"):
            rt.submit([{"content": "hi"}])
        with pytest.raises(pagedrt.InvalidArgument, match="prompt must be"):
            rt.submit([1.5, 2])
        with pytest.raises(pagedrt.InvalidArgument, match="unknown sampling parameter"):
            rt.submit("hi", temprature=0)
        out = rt.generate("the quick", max_tokens=3, temperature=0, ignore_eos=True)[0]
        assert len(out.token_ids) == 3


@pytest.mark.parametrize("kind", ["byte-level BPE", "sentencepiece"])
def test_random_token_sequences_detokenize_to_the_full_decode(tiny, kind, smol):
    tok = pagedrt.Tokenizer.from_model_dir(tiny if kind == "sentencepiece" else smol)
    rng = np.random.default_rng(0)
    prompt = tok.encode("Some context:", add_special_tokens=False)
    for trial in range(30):
        ids = rng.integers(0, tok.vocab_size, size=int(rng.integers(1, 40))).tolist()
        d = IncrementalDetokenizer(tok, prompt)
        deltas = [d.push([t]) for t in ids] + [d.push([], final=True)]
        want = tok.decode(prompt + ids)[len(tok.decode(prompt)):]
        assert "".join(deltas) == want, (trial, ids)
        assert all("\ufffd" not in x for x in deltas[:-1]) or "\ufffd" in want


def test_poll_with_a_positional_timeout(tiny):
    with pagedrt.Runtime(tiny, device="cpu") as rt:
        rid = rt.submit("the quick", max_tokens=2, temperature=0, ignore_eos=True)
        seen = []
        while not any(e.request_finished for e in seen):
            seen += rt.poll(0.5)            # a number: the timeout, for any request
        assert {e.request_id for e in seen} == {rid}


def test_a_request_that_cannot_fit_is_rejected_naming_the_numbers(tiny):
    with pagedrt.Runtime(tiny, device="cpu", max_model_len=64) as rt:
        prompt = list(range(3, 13))                           # 10 tokens
        with pytest.raises(pagedrt.InvalidArgument,
                           match=r"prompt \(10 tokens\) \+ max_tokens \(55\) = 65 is more than max_model_len 64"):
            rt.submit(prompt, max_tokens=55)
        out = rt.generate(prompt, max_tokens=54, ignore_eos=True, temperature=0)[0]   # exactly fits
        assert len(out.token_ids) == 54 and out.finish_reason == "length"
        assert rt.stats().blocks_used == 0


def test_logprobs_range(tiny):
    with pagedrt.Runtime(tiny, device="cpu") as rt:
        for bad in (-1, 21):
            with pytest.raises(pagedrt.InvalidArgument, match=r"logprobs must be in \[0, 20\]"):
                rt.submit("the quick", logprobs=bad)
        for k in (0, 20):
            out = rt.generate("the quick", max_tokens=2, temperature=0, logprobs=k, ignore_eos=True)[0].outputs[0]
            assert len(out.logprobs) == 2 and all(len(lp.top_logprobs) == k for lp in out.logprobs)
        plain = rt.generate("the quick", max_tokens=2, temperature=0, ignore_eos=True)[0].outputs[0]
        assert plain.logprobs is None and plain.cumulative_logprob is None


def test_abort_answers_running_finished_and_unknown(tiny):
    with pagedrt.Runtime(tiny, device="cpu") as rt:
        long = rt.submit("the quick", max_tokens=400, ignore_eos=True)
        assert rt.abort(long) is True                         # running: its final event follows
        evs = []
        while not any(e.request_finished for e in evs):
            evs += rt.poll(long, timeout=1.0)
        assert evs[-1].finish_reason == "abort"
        assert rt.abort(long) is False                        # finished and read

        before = rt.stats().generated_tokens
        short = rt.submit("the quick", max_tokens=1, ignore_eos=True)
        deadline = time.monotonic() + 10
        while (rt.stats().generated_tokens == before or rt.stats().num_running) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)  # the final event is queued right after the stats show the request gone
        assert rt.abort(short) is False                       # finished, final event not yet read
        assert [e.finish_reason for e in rt.poll(short)] == ["length"]
        with pytest.raises(pagedrt.InvalidArgument, match="unknown request id 'never-was'"):
            rt.abort("never-was")
        with pytest.raises(pagedrt.InvalidArgument, match="unknown or finished request id"):
            rt.poll(short)                                    # its final event was read


def test_release_drops_the_events_and_frees_the_id(tiny):
    with pagedrt.Runtime(tiny, device="cpu") as rt:
        rid = rt.submit("the quick", max_tokens=400, ignore_eos=True, request_id="mine")
        assert rt.release(rid) is True
        with pytest.raises(pagedrt.InvalidArgument):
            rt.poll(rid)
        deadline = time.monotonic() + 10
        while rt.stats().blocks_used and time.monotonic() < deadline:
            time.sleep(0.01)
        assert rt.stats().blocks_used == 0 and rt.poll(timeout=0.05) == []   # no final event anywhere
        assert rt.abort("mine") is False
        # The id is free once the request has ended: its (dropped) final event
        # follows the blocks' release by a moment (CI once submitted in between).
        while True:
            try:
                again = rt.submit("the quick", max_tokens=2, request_id="mine", ignore_eos=True)
                break
            except pagedrt.InvalidArgument as e:
                assert "already in use" in str(e) and time.monotonic() < deadline, e
                time.sleep(0.01)
        assert len(rt.generate("the lazy", max_tokens=2, ignore_eos=True)[0].token_ids) == 2
        assert [e.request_id for e in rt.poll(again, timeout=5.0)][-1:] == ["mine"]


def test_poll_without_an_id_skips_requests_read_by_id(tiny):
    with pagedrt.Runtime(tiny, device="cpu") as rt:
        mine = rt.submit("the quick", max_tokens=3, ignore_eos=True, by_id=True)
        shared = rt.submit("the lazy", max_tokens=3, ignore_eos=True)
        got = []
        while not any(e.request_finished for e in got):
            got += rt.poll(timeout=1.0)
        assert {e.request_id for e in got} == {shared}
        mine_events = []
        while not any(e.request_finished for e in mine_events):
            mine_events += rt.poll(mine, timeout=1.0)
        assert sum(len(e.token_ids) for e in mine_events) == 3


def test_results_print_readably(tiny):
    with pagedrt.Runtime(tiny, device="cpu") as rt:
        c = rt.generate("the quick", max_tokens=2, temperature=0, ignore_eos=True)[0]
        ev = next(iter(rt.stream("the quick", max_tokens=1, ignore_eos=True)))
        shown = {"Stats": repr(rt.stats()), "ModelInfo": repr(rt.model_info),
                 "SamplingParams": repr(pagedrt.SamplingParams(max_tokens=3)),
                 "Event": repr(ev), "Completion": repr(c)}
    assert shown["Stats"].startswith("Stats(num_blocks=") and "blocks_used=0" in shown["Stats"]
    assert "tokens_per_s=" in shown["Stats"] and "at 0x" not in shown["Stats"]
    assert shown["ModelInfo"].startswith("ModelInfo(architecture='LlamaForCausalLM'") and "vocab_size=400" in shown["ModelInfo"]
    assert shown["SamplingParams"].startswith("SamplingParams(n=1") and "max_tokens=3" in shown["SamplingParams"]
    assert shown["Event"].startswith("Event(request_id=") and "finish_reason='length'" in shown["Event"]
    assert shown["Completion"].startswith("Completion(request_id=") and "CompletionOutput(index=0" in shown["Completion"]
    core = rt._rt.model_info()
    assert str(core) == repr(core)


def test_loading_reports_progress_part_by_part(tiny):
    seen = []
    config = pagedrt.RuntimeConfig()
    config.model_path, config.device = str(tiny), "cpu"
    rt = pagedrt._core.Runtime(config, on_load_progress=lambda done, total: seen.append((done, total)))
    layers = rt.model_info().num_layers
    rt.close()
    assert seen == [(k, layers + 2) for k in range(1, layers + 3)]   # embedding, each layer, head
    with pytest.raises(ZeroDivisionError):                         # an error in the callback propagates
        pagedrt._core.Runtime(config, on_load_progress=lambda done, total: 1 / 0)


def test_defaults_come_from_the_cpp_runtime_config(tiny):
    defaults = pagedrt.RuntimeConfig()
    assert (defaults.block_size, defaults.max_num_seqs, defaults.device) == (16, 64, "auto")
    assert repr(defaults).startswith("RuntimeConfig(model_path='', device='auto'")
    # The docstring's "[default]" for each option is RuntimeConfig's.
    shown = dict(re.findall(r"^\s+(\w+) \[(.+?)\]:", pagedrt.Runtime.__doc__, flags=re.M))  # devices [[]]
    assert set(shown) == set(pagedrt.runtime._OPTIONS)
    assert all(shown[k] == repr(getattr(defaults, k)).replace("'", '"') for k in shown), shown
    with pagedrt.Runtime(tiny, device="cpu", block_size=8, kv_cache_bytes=1 << 20) as rt:
        assert rt.stats().block_size == 8
    with pagedrt.Runtime(tiny, device="cpu", kv_cache_bytes=1 << 20) as rt:
        assert rt.stats().block_size == defaults.block_size
    with pytest.raises(pagedrt.InvalidArgument, match="unknown Runtime option.*blok_size"):
        pagedrt.Runtime(tiny, device="cpu", blok_size=8)
    with pytest.raises(pagedrt.InvalidArgument, match="block_size"):
        pagedrt.Runtime(tiny, device="cpu", block_size="big")


# ── the event path: the core's rows, batched polls ──

ROW_FIELDS = ("request_id", "index", "token_ids", "finished", "request_finished", "finish_reason", "error",
              "num_preemptions", "time", "cumulative_logprob", "score", "spec_proposed", "spec_accepted")


def mixed_params():
    P = pagedrt.SamplingParams
    return [P(max_tokens=6, temperature=0, ignore_eos=True),
            P(max_tokens=4, temperature=0, logprobs=2, ignore_eos=True),
            P(max_tokens=3, temperature=0, prompt_logprobs=1, return_logits=True, ignore_eos=True),
            P(max_tokens=5, n=2, temperature=1.0, seed=3, ignore_eos=True),
            P(max_tokens=4, beam_width=2, ignore_eos=True),
            P(max_tokens=7, temperature=0, ignore_eos=True, speculative="ngram", num_speculative_tokens=3)]


def core_events(rt, read):
    """The mixed requests submitted to the core (by id) and read with `read(ids)`
    (a list of (request_id, request_finished, item)) until each one's final
    event: each request's items, in submit order."""
    ids = [rt._rt.submit([5, 6, 7, 5, 6, 7, 8 + i], p._to_core(), "", True) for i, p in enumerate(mixed_params())]
    got, left = {i: [] for i in ids}, set(ids)
    while left:
        for rid, last, item in read(sorted(left)):
            got[rid].append(item)
            if last:
                left.discard(rid)
    return [got[i] for i in ids]


def lp_fields(lps):
    return [(lp.token, lp.logprob, list(lp.top_ids), list(lp.top_logprobs)) for lp in lps]


def test_poll_rows_carry_every_field_of_the_core_events(tiny):
    """_core.Runtime.poll_rows (what pagedrt.Runtime reads) gives, per event, the
    fields the core's Event objects give, and the Event itself where it carries
    logprobs, prompt logprobs or logits: the same greedy, seeded, beam and
    speculative requests run twice, read each way."""
    with pagedrt.Runtime(tiny, device="cpu") as rt:
        events = core_events(rt, lambda ids: [(e.request_id, e.request_finished, e)
                                              for e in rt._rt.poll_requests(ids, 0.1)])
        rows = core_events(rt, lambda ids: [(r[0], r[4], r) for r in rt._rt.poll_rows(ids, 0.1)])
        now = time.monotonic()
    assert [len(r) for r in rows] == [len(e) for e in events]
    for row, ev in zip((r for req in rows for r in req), (e for req in events for e in req)):
        assert len(row) == len(ROW_FIELDS) + 1
        for i, name in enumerate(ROW_FIELDS):
            if name not in ("request_id", "time"):                        # they differ between the runs
                assert row[i] == getattr(ev, name), name
        assert isinstance(row[2], list) and isinstance(row[8], float) and now - 60 < row[8] <= now
        extra = row[13]
        if extra is None:
            assert not ev.logprobs and not ev.prompt_logprobs and ev.logits is None
            continue
        assert lp_fields(extra.logprobs) == lp_fields(ev.logprobs)
        assert lp_fields(extra.prompt_logprobs) == lp_fields(ev.prompt_logprobs)
        assert (extra.logits is None) == (ev.logits is None)
        if ev.logits is not None:
            np.testing.assert_array_equal(extra.logits, ev.logits)
    assert {r[13] is None for req in rows for r in req} == {True, False}  # rows of both kinds came


def visible(ev):
    """An Event's fields but its request id and time (logits as a list)."""
    return (ev.index, ev.token_ids, ev.text, ev.finished, ev.finish_reason, ev.request_finished,
            ev.num_preemptions, ev.error, ev.logprobs, ev.cumulative_logprob, ev.prompt_logprobs, ev.score,
            None if ev.logits is None else ev.logits.tolist(), ev.spec_proposed, ev.spec_accepted)


def test_a_batched_poll_gives_the_events_of_polls_one_request_at_a_time(tiny):
    """poll([ids]) converts every request's events in one go: each request gets
    the events, text and stop-string endings it gets when polled alone."""
    prompts = ["the quick brown", "a lazy dog", "paged attention", "the model", "héllo naïve", "block cache"]
    kws = [dict(), dict(logprobs=1), dict(stop=[" the", "a"]), dict(n=2, temperature=1.0, seed=5, stop=["o"]),
           dict(prompt_logprobs=1, return_logits=True), dict(stop=["zzz"], include_stop_str_in_output=True)]

    def run(rt, read):
        ids = [rt.submit(p, by_id=True, **{"max_tokens": 12, "temperature": 0, "ignore_eos": True, **kw})
               for p, kw in zip(prompts, kws)]
        got, left = {i: [] for i in ids}, set(ids)
        while left:
            for ev in read(sorted(left)):
                got[ev.request_id].append(visible(ev))
                if ev.request_finished:
                    left.discard(ev.request_id)
        return [got[i] for i in ids]

    with pagedrt.Runtime(tiny, device="cpu") as rt:
        batched = run(rt, lambda ids: rt.poll(ids, timeout=0.1))
        alone = run(rt, lambda ids: [ev for rid in ids for ev in rt.poll(rid, timeout=0.01)])
        assert wait_idle(rt).blocks_used == 0          # the stop-string endings released their sequences
    assert batched == alone
    assert any(e[4] == "stop" for req in batched for e in req)


def wait_idle(rt, seconds=5.0):
    end = time.monotonic() + seconds
    while time.monotonic() < end and (rt.stats().num_running or rt.stats().num_waiting):
        time.sleep(0.02)
    return rt.stats()


def test_default_sampling_params_come_from_generation_config(tiny_llama, tmp_path):
    """Runtime.default_sampling_params(): the model's generation_config.json settings (as vLLM's
    get_default_sampling_params), the rest SamplingParams' defaults; a bad value names the file and field."""
    from pagedrt.errors import InvalidArgument
    from pagedrt.sampling_params import generation_settings

    path, _ = tiny_llama()
    gen = path / "generation_config.json"
    base = json.loads(gen.read_text()) if gen.is_file() else {}
    gen.write_text(json.dumps({**base, "temperature": 0.3, "top_k": 20, "top_p": None, "do_sample": True}))
    with pagedrt.Runtime(path, device="cpu", kv_cache_bytes=1 << 20) as rt:
        p = rt.default_sampling_params()
        assert (p.temperature, p.top_k, p.top_p, p.min_p) == (0.3, 20, 1.0, 0.0)  # null: not set
        assert rt.default_sampling_params(temperature=0.0, max_tokens=5).temperature == 0.0
        assert pagedrt.SamplingParams().temperature == 1.0  # the class's own defaults stay fixed
        gen.unlink()
        assert rt.default_sampling_params() == pagedrt.SamplingParams()  # no file: the defaults
    for body, field in (({"temperature": "hot"}, "temperature"), ({"top_p": 1.5}, "top_p"),
                        ({"top_k": 2.5}, "top_k"), ({"repetition_penalty": True}, "repetition_penalty")):
        f = tmp_path / "generation_config.json"
        f.write_text(json.dumps(body))
        with pytest.raises(InvalidArgument, match=re.escape(str(f)) + ".*" + field):
            generation_settings(f)
        with pytest.raises(InvalidArgument, match=re.escape(str(f)) + ".*" + field):
            generation_settings(tmp_path)  # a model folder: its generation_config.json
    f.write_text("{not json")
    with pytest.raises(InvalidArgument, match="not readable as JSON"):
        generation_settings(f)
