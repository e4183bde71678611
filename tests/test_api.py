"""The Python API under use: threads, the GIL, asyncio, closing, bad input."""
from __future__ import annotations

import asyncio
import threading
import os
import time

import numpy as np
import pytest

import pagedrt
from pagedrt.detokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from conftest import make_tiny_llama, train_sentencepiece
    path, _ = make_tiny_llama(tmp_path_factory.mktemp("api") / "m", vocab_size=400, num_key_value_heads=2)
    train_sentencepiece(path)
    return path


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
    stats() keeps its last figures."""
    mapped = lambda: int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    before = mapped()
    rt = pagedrt.Runtime(tiny, device="cpu", kv_cache_bytes=512 << 20)
    during = mapped()
    assert during - before > 480 << 20
    assert len(rt.generate("the quick", max_tokens=3, temperature=0)[0].token_ids) == 3
    rt.close()
    assert during - mapped() > 480 << 20
    assert rt.stats().num_blocks > 0 and rt.stats().kv_cache_bytes > 480 << 20


def test_bad_input_is_a_clear_error_and_serving_goes_on(tiny):
    with pagedrt.Runtime(tiny, device="cpu", max_model_len=64) as rt:
        with pytest.raises(pagedrt.InvalidArgument, match="empty"):
            rt.submit([])
        with pytest.raises(pagedrt.InvalidArgument, match="max_model_len is 64"):
            rt.submit(list(range(3, 100)))
        with pytest.raises(pagedrt.InvalidArgument, match="unknown or finished request id 'nope'"):
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
