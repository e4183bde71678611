"""Every Runtime method from any thread, for a while, with no lost event.

16 threads and an asyncio loop share one Runtime for >= 10 s: generate(),
stream() (some left early), submit(by_id=True) + poll(rid), plain submit() +
poll() without an id (one such reader: it takes every unowned request's
events), abort() of random requests at random times, stats().
Every request must get exactly one final event, seen by the caller that
submitted it and by no one else; the tokens every caller sees must equal what
the same request gives alone (greedy or seeded sampling), or be a prefix of
them when it was aborted or left; every call must return within its bound; and
no KV block may be in use at the end.
"""
from __future__ import annotations

import asyncio
import random
import threading
import time

import pytest

import pagedrt

DURATION_S = 10.0
CALL_BOUND_S = 60.0   # a generate() of 3 short requests on a tiny model: well under a second alone


def runtime(path):
    # fp32 activations: the reference run and the crowded run round alike.
    return pagedrt.Runtime(path, device="cpu", activation_dtype="float32", num_threads=2,
                           kv_cache_bytes=2 << 20, max_num_seqs=16)


def make_requests(n=48, seed=0):
    """(prompt ids, params) pairs: greedy and seeded sampling, n = 1 and 2."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = [rng.randrange(3, 400) for _ in range(rng.randrange(2, 40))]
        kw = dict(max_tokens=rng.randrange(1, 24), ignore_eos=True)
        if i % 3 == 0:
            kw.update(temperature=0.0)
        else:
            kw.update(temperature=0.9, top_k=40, seed=1000 + i, n=1 + (i % 4 == 1))
        out.append((prompt, pagedrt.SamplingParams(**kw)))
    return out


def alone(path, requests):
    """Each request's tokens per sample index, run one at a time."""
    with runtime(path) as rt:
        return [{o.index: o.token_ids for o in rt.generate([p], sp)[0].outputs} for p, sp in requests]


class Ledger:
    """What the callers saw, checked at the end."""

    def __init__(self):
        self.lock = threading.Lock()
        self.errors: list[str] = []
        self.checked = 0
        self.slowest = 0.0
        self.kinds: dict[str, int] = {}

    def fail(self, msg):
        with self.lock:
            self.errors.append(msg)

    def timed(self, what, fn, *args, **kw):
        t0 = time.monotonic()
        out = fn(*args, **kw)
        dt = time.monotonic() - t0
        with self.lock:
            self.slowest = max(self.slowest, dt)
        if dt > CALL_BOUND_S:
            self.fail(f"{what} took {dt:.1f} s")
        return out

    def check(self, kind, k, tokens: dict[int, list[int]], reasons: dict[int, str], want, partial_ok):
        """tokens/reasons per sample index, against the alone run `want`."""
        with self.lock:
            self.checked += 1
            self.kinds[kind] = self.kinds.get(kind, 0) + 1
        for i, toks in tokens.items():
            ref = want.get(i)
            if ref is None:
                self.fail(f"{kind} request {k}: sample {i} does not exist alone")
            elif reasons.get(i) == "length" and toks != ref:
                self.fail(f"{kind} request {k} sample {i}: {toks} != alone {ref}")
            elif toks != ref[:len(toks)]:
                self.fail(f"{kind} request {k} sample {i}: {toks} is not a prefix of alone {ref}")
            elif reasons.get(i) not in ("length", "abort") and not (partial_ok and reasons.get(i) is None):
                self.fail(f"{kind} request {k} sample {i}: finish reason {reasons.get(i)!r}")


def test_sixteen_threads_and_an_event_loop_lose_nothing(tiny_sp):
    tiny = tiny_sp
    requests = make_requests()
    want = alone(tiny, requests)
    ledger = Ledger()
    live_ids: list[str] = []          # for the aborters
    ids_lock = threading.Lock()
    deadline = time.monotonic() + DURATION_S

    def note(rid):
        with ids_lock:
            live_ids.append(rid)
            del live_ids[:-64]

    with runtime(tiny) as rt:
        def by_generate(t):
            rng = random.Random(t)
            while time.monotonic() < deadline:
                ks = rng.sample(range(len(requests)), 3)
                # one params object for a generate() call: pick requests sharing the first one's
                sp = requests[ks[0]][1]
                ks = [k for k in ks if requests[k][1] == sp] or ks[:1]
                outs = ledger.timed("generate", rt.generate, [requests[k][0] for k in ks], sp)
                for k, c in zip(ks, outs):
                    ledger.check("generate", k, {o.index: o.token_ids for o in c.outputs},
                                 {o.index: o.finish_reason for o in c.outputs}, want[k], False)

        def by_stream(t):
            rng = random.Random(t)
            while time.monotonic() < deadline:
                k = rng.randrange(len(requests))
                p, sp = requests[k]
                leave_after = rng.choice([None, None, 1, 3])
                toks, reasons = {}, {}
                for n, ev in enumerate(rt.stream(p, sp)):
                    toks.setdefault(ev.index, []).extend(ev.token_ids)
                    if ev.finished:
                        reasons[ev.index] = ev.finish_reason
                    note(ev.request_id)
                    if leave_after is not None and n + 1 >= leave_after:
                        break
                ledger.check("stream", k, toks, reasons, want[k], leave_after is not None)

        def poll_loop(kind, rt_poll, mine: dict):
            """Reads events until every request in `mine` (id -> request index) has its
            final event, then checks what came against the alone runs."""
            seen = {rid: ({}, {}, 0) for rid in mine}
            bound = time.monotonic() + CALL_BOUND_S
            while any(seen[r][2] == 0 for r in mine) and time.monotonic() < bound:
                for ev in ledger.timed(kind, rt_poll):
                    if ev.request_id not in mine:
                        ledger.fail(f"event of someone else's request {ev.request_id}")
                        continue
                    toks, reasons, finals = seen[ev.request_id]
                    if finals:
                        ledger.fail(f"event after the final one for {ev.request_id}")
                    toks.setdefault(ev.index, []).extend(ev.token_ids)
                    if ev.finished:
                        reasons[ev.index] = ev.finish_reason
                    seen[ev.request_id] = (toks, reasons, finals + ev.request_finished)
            for rid, (toks, reasons, finals) in seen.items():
                if finals != 1:
                    ledger.fail(f"{kind} {rid}: {finals} final events within {CALL_BOUND_S} s")
                ledger.check(kind, mine[rid], toks, reasons, want[mine[rid]], False)

        def submit_some(rng, most, **kw):
            mine = {}
            for _ in range(rng.randrange(1, most + 1)):
                k = rng.randrange(len(requests))
                rid = rt.submit(requests[k][0], requests[k][1], **kw)
                mine[rid] = k
                note(rid)
            return mine

        def by_id(t):
            rng = random.Random(t)
            while time.monotonic() < deadline:
                mine = submit_some(rng, 3, by_id=True)
                for rid in mine:
                    if rng.random() < 0.2 and not isinstance(rt.abort(rid), bool):
                        ledger.fail("abort() did not answer a bool")
                for rid in mine:  # one request at a time, as a service handler would
                    poll_loop("poll(rid)", lambda: rt.poll(rid, timeout=0.02), {rid: mine[rid]})
                try:
                    rt.poll(next(iter(mine)))
                    ledger.fail("poll() of a request whose final event was read did not raise")
                except pagedrt.InvalidArgument:
                    pass

        def by_poll_any(t):
            rng = random.Random(t)
            while time.monotonic() < deadline:
                poll_loop("poll()", lambda: rt.poll(timeout=0.02), submit_some(rng, 4))

        def aborter(t):
            rng = random.Random(t)
            while time.monotonic() < deadline:
                time.sleep(rng.uniform(0.005, 0.05))
                with ids_lock:
                    rid = rng.choice(live_ids) if live_ids else None
                if rid is not None and not isinstance(rt.abort(rid), bool):
                    ledger.fail("abort() did not answer a bool")
                if not isinstance(rt.stats().blocks_used, int):
                    ledger.fail("stats()")

        def event_loop(t):
            async def one(k):
                p, sp = requests[k]
                if k % 2:
                    c = await rt.agenerate(p, sp)
                    ledger.check("agenerate", k, {o.index: o.token_ids for o in c.outputs},
                                 {o.index: o.finish_reason for o in c.outputs}, want[k], False)
                else:
                    toks, reasons = {}, {}
                    async for ev in rt.astream(p, sp):
                        toks.setdefault(ev.index, []).extend(ev.token_ids)
                        if ev.finished:
                            reasons[ev.index] = ev.finish_reason
                    ledger.check("astream", k, toks, reasons, want[k], False)

            async def main():
                rng = random.Random(t)
                while time.monotonic() < deadline:
                    await asyncio.wait_for(asyncio.gather(*(one(rng.randrange(len(requests))) for _ in range(6))),
                                           CALL_BOUND_S)
            asyncio.run(main())

        # One poll() thread: poll() without an id hands out the events of every request
        # nobody owns, so two such readers would share one stream between them.
        roles = [by_generate] * 4 + [by_stream] * 4 + [by_id] * 5 + [by_poll_any] + [aborter] * 2
        assert len(roles) == 16

        def guarded(fn, t):
            try:
                fn(t)
            except Exception as e:  # noqa: BLE001 (reported below)
                ledger.fail(f"{fn.__name__}[{t}] raised {type(e).__name__}: {e}")

        threads = [threading.Thread(target=guarded, args=(fn, t)) for t, fn in enumerate(roles)]
        threads.append(threading.Thread(target=guarded, args=(event_loop, 99)))
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=DURATION_S + 3 * CALL_BOUND_S)
        assert not any(th.is_alive() for th in threads), "a caller never returned"
        # Everything that ran has been read or released: the pool is whole again.
        end = time.monotonic() + 10
        while (rt.stats().blocks_used or rt.stats().num_running) and time.monotonic() < end:
            time.sleep(0.05)
        stats = rt.stats()

    assert not ledger.errors, "\n".join(ledger.errors[:20])
    assert stats.blocks_used == 0 and stats.num_running == 0 and stats.num_waiting == 0, stats
    # Every kind of caller ran, and many requests were checked.
    assert set(ledger.kinds) == {"generate", "stream", "poll(rid)", "poll()", "agenerate", "astream"}, ledger.kinds
    assert ledger.checked > 100, ledger.kinds
