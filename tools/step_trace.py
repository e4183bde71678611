#!/usr/bin/env python3
"""Reads a step trace (PAGEDRT_STEP_TRACE=FILE: each engine of the process
appends the host's events of its steps at shutdown) and prints, per engine,
the medians of the intervals between a step's events: where a step's time
goes on the host, and for structured-output steps pipelined behind the mask
gate (docs/architecture.md, "Async scheduling") how the fill, the gate and
the results line up. Then masked steps against plain ones: their periods, the
host launches past 0.5 ms (a step shape run first or recorded as a CUDA
graph), and the masked steps' period by the length of their fill.

    PAGEDRT_STEP_TRACE=/tmp/trace.txt python my_script.py
    python tools/step_trace.py /tmp/trace.txt [--json OUT.json]

Events (each "seconds event step"; step is the step's id, counted from 1):
  scheduled    the engine began scheduling the step
  launch       its forward is being launched (run) ... launched: done
  picks_queue  its masked picks queued (gated: before its masks exist)
  settle_wait  the engine waits for its gated fill ... settled: the fill is done
  job_start    the helper thread's job for its masks begins
  collected    its results collected (by the helper, for the next step's masks)
  fill_start   its masks being filled ... fill_end: filled
  gate_open    its gate opened (the device may read its masks)
  finish_wait  the engine waits for its results ... finish_got: they are in
  processed    its outputs processed (tokens out, requests advanced)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

# (name, from event of step s (or s - 1 with "prev:"), to event of step s)
INTERVALS = [
    ("schedule", "scheduled", "launch"),
    ("launch (host)", "launch", "launched"),
    ("step period (processed to processed)", "prev:processed", "processed"),
    ("fill", "fill_start", "fill_end"),
    ("fill end to gate open", "fill_end", "gate_open"),
    ("gate open to results in", "gate_open", "collected"),
    ("results in (step ahead) to fill start", "prev:collected", "fill_start"),
    ("helper job start to step ahead's results", "job_start", "prev:collected"),
    ("engine waits for the fill", "settle_wait", "settled"),
    ("engine waits for results", "finish_wait", "finish_got"),
    ("process outputs", "finish_got", "processed"),
    ("launched to processed", "launched", "processed"),
]


def sections(lines):
    """The trace's engines: lists of (seconds, event, step)."""
    out, cur = [], None
    for line in lines:
        line = line.strip()
        if not line:
            continue
        if line.startswith("#"):
            cur = []
            out.append(cur)
            continue
        if cur is None:  # a file without headers: one engine
            cur = []
            out.append(cur)
        t, what, step = line.split()
        cur.append((float(t), what, int(step)))
    return out


def by_step(events):
    """{step: {event: seconds}}: the first time of each (a step's event happens once)."""
    at: dict[int, dict[str, float]] = {}
    for t, what, step in events:
        at.setdefault(step, {}).setdefault(what, t)
    return at


def intervals(events):
    """{interval name: [ms per step]} of one engine's events."""
    at = by_step(events)
    def when(s, e):  # event e of step s ("prev:" e: of step s - 1)
        return at.get(s - 1, {}).get(e[5:]) if e.startswith("prev:") else at[s].get(e)

    res: dict[str, list[float]] = {}
    for s in at:
        for name, a, b in INTERVALS:
            ta, tb = when(s, a), when(s, b)
            if ta is not None and tb is not None:
                res.setdefault(name, []).append(1e3 * (tb - ta))
    return res, len(at)


FILL_BANDS_MS = (0.0, 0.4, 0.8, 1.2, float("inf"))
SLOW_LAUNCH_MS = 0.5


def by_kind(events):
    """Masked steps (a fill) against the others: the step period of those whose
    step ahead is of the same kind, the host launches past SLOW_LAUNCH_MS (a
    step shape run first or recorded as a CUDA graph), and the masked steps'
    period by the length of their fill (where the fill, not the GPU, sets it)."""
    at = by_step(events)
    masked = {s for s, ev in at.items() if "fill_start" in ev and "fill_end" in ev}

    def period(s):  # ms from the step ahead's outputs processed to this one's, or None
        a, b = at.get(s - 1, {}).get("processed"), at[s].get("processed")
        return None if a is None or b is None else 1e3 * (b - a)

    out = {}
    for kind, mine in (("masked", True), ("plain", False)):
        steps = [s for s in at if (s in masked) == mine]
        period_ms = [p for s in steps if ((s - 1) in masked) == mine and (p := period(s)) is not None]
        launches = [1e3 * (at[s]["launched"] - at[s]["launch"]) for s in steps
                    if "launch" in at[s] and "launched" in at[s]]
        slow = [v for v in launches if v > SLOW_LAUNCH_MS]
        out[kind] = {"steps": len(steps), "period_steps": len(period_ms),
                     "period_mean_ms": statistics.fmean(period_ms) if period_ms else None,
                     "period_median_ms": statistics.median(period_ms) if period_ms else None,
                     "slow_launches": len(slow), "slow_launch_ms": sum(slow)}
    bands = []
    for lo, hi in zip(FILL_BANDS_MS, FILL_BANDS_MS[1:]):
        v = [p for s in masked if s - 1 in masked and (p := period(s)) is not None
             and lo <= 1e3 * (at[s]["fill_end"] - at[s]["fill_start"]) < hi]
        bands.append({"fill_from_ms": lo, "fill_to_ms": hi, "steps": len(v),
                      "period_median_ms": statistics.median(v) if v else None,
                      "period_mean_ms": statistics.fmean(v) if v else None})
    out["masked_by_fill"] = bands
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trace")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    with open(args.trace) as f:
        engines = sections(f)
    report = []
    for i, events in enumerate(engines):
        res, steps = intervals(events)
        print(f"engine {i + 1}: {steps} steps, {len(events)} events")
        rows = {}
        for name, _, _ in INTERVALS:
            v = sorted(res.get(name, []))
            if not v:
                continue
            rows[name] = {"steps": len(v), "median_ms": statistics.median(v), "p10_ms": v[len(v) // 10],
                          "p90_ms": v[len(v) * 9 // 10]}
            r = rows[name]
            print(f"  {name:42s} {r['steps']:6d} steps  median {r['median_ms']:8.3f} ms  "
                  f"p10 {r['p10_ms']:8.3f}  p90 {r['p90_ms']:8.3f}")
        kinds = by_kind(events)
        for kind in ("masked", "plain"):
            k = kinds[kind]
            if k["period_steps"]:
                print(f"  {kind} steps: {k['steps']}, period mean {k['period_mean_ms']:.3f} ms, median "
                      f"{k['period_median_ms']:.3f}; {k['slow_launches']} launches over {SLOW_LAUNCH_MS} ms "
                      f"({k['slow_launch_ms']:.1f} ms in all)")
        for b in kinds["masked_by_fill"]:
            if b["steps"]:
                print(f"  masked steps filled in {b['fill_from_ms']:.1f}-{b['fill_to_ms']:.1f} ms: {b['steps']:4d}, "
                      f"period median {b['period_median_ms']:.3f} ms, mean {b['period_mean_ms']:.3f}")
        report.append({"steps": steps, "events": len(events), "intervals": rows, "by_kind": kinds})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
