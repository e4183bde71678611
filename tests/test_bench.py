"""The benchmark harness in its tiny mode (a tiny random model, pagedrt only), so it cannot rot."""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

import pagedrt
from pagedrt import _testing

TOOLS = pathlib.Path(__file__).resolve().parents[1] / "tools"
WORKLOADS = ("latency", "batched", "mixed", "sharing", "prefix", "waste")


def run_tiny(tmp_path, script="bench.py", *args):
    out = tmp_path / "bench.json"
    res = subprocess.run([sys.executable, str(TOOLS / script), "--tiny", "--json", str(out), *args],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    return json.loads(out.read_text()), res.stdout


def test_bench_tiny_mode_runs_every_workload_and_writes_its_schema(tmp_path):
    data, stdout = run_tiny(tmp_path)
    rows = data["rows"]
    assert data["workloads"] == list(WORKLOADS) and data["size"] == "tiny" and not data["errors"]
    assert data["cpu_gemm"] in _testing._gemm_variants()  # which CPU kernel the figures came from
    # every dtype runs the throughput workloads; the KV workloads run with the first dtype only
    assert {(r["engine"], r["workload"]) for r in rows} == {
        *((f"pagedrt {d}", w) for d in ("bfloat16", "float32") for w in ("latency", "batched", "mixed")),
        *(("pagedrt bfloat16", w) for w in ("sharing", "prefix", "waste")), ("contiguous allocator", "waste")}
    for r in rows:
        assert r["peak_rss_mb"] > 0
        if r["workload"] != "waste":
            assert r["output_tok_s"] > 0 and r["kv_blocks_peak"] > 0 and 0 <= r["waste_at_peak"] < 1
        if r["workload"] == "latency":
            assert r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 and r["ttft_ms"] > 0
    batched = data["sizes"]["batched"]
    assert all(r["output_tokens"] == batched["count"] * batched["new"] for r in rows if r["workload"] == "batched")
    # the ratio column: pagedrt bfloat16 (the first engine) over each row
    for wl, key in (("latency", "decode_tok_s"), ("batched", "output_tok_s"), ("mixed", "output_tok_s")):
        first = next(r for r in rows if r["workload"] == wl)
        assert first["engine"] == "pagedrt bfloat16" and first["first_x"] == 1.0
        assert all(abs(r["first_x"] - first[key] / r[key]) < 1e-12 for r in rows if r["workload"] == wl)
    # the host's ceilings, measured in the run (tools/cpu_ceilings.py; torch is a test extra), and each
    # batch-1 decode rate as a fraction of one read of the weights at the measured bandwidth
    c = data["ceilings"]
    assert c["threads"] == 2 and c["read_GBps"] > 0 and c["read_1thread_GBps"] > 0 and c["gemm_GFLOPs"] > 0
    assert data["weight_params"] > 0
    # ... and at the weights' size in each format that ran (bf16, fp32), the floor's bandwidth
    assert set(c["read_at_GBps"]) == {str(data["weight_params"] * 2), str(data["weight_params"] * 4)}
    for r in rows:
        if r["workload"] == "latency":
            bpw = 4 if "float32" in r["engine"] else 2
            bw = max(c["read_GBps"], c["read_at_GBps"][str(data["weight_params"] * bpw)])
            floor = bw * 1e9 / (data["weight_params"] * bpw)
            assert abs(r["floor_tok_s"] - floor) < 1e-6 * floor and abs(r["of_floor"] - r["decode_tok_s"] / floor) < 1e-9
    assert "ceilings, measured in this run" in stdout and "read at the weights' size" in stdout and "of floor" in stdout
    # --throughput-runs (default 1): every run's seconds, the row's the median's
    assert all(r["runs_s"] == [r["seconds"]] for r in rows if r["workload"] == "batched")

    sharing = {r["variant"]: r for r in rows if r["workload"] == "sharing"}
    assert list(sharing) == ["n=1", "n=4, forked after the prompt", "n=4 as 4 requests, no prefix cache",
                             "beam width 4"]
    assert sharing["n=1"]["vs_n1"] == 1.0
    assert sharing["n=4 as 4 requests, no prefix cache"]["saving"] == 0.0
    for v in ("n=4, forked after the prompt", "beam width 4"):  # the prompt's blocks are shared
        assert sharing[v]["kv_blocks_peak"] < sharing[v]["kv_blocks_logical_peak"]

    prefix = {r["variant"]: r for r in rows if r["workload"] == "prefix"}
    assert prefix["cache on"]["hit_rate"] > 0 and prefix["cache off"]["hit_rate"] == 0
    assert prefix["cache on"]["prompt_tokens_computed"] < prefix["cache off"]["prompt_tokens_computed"]

    waste = {r["variant"]: r["waste_at_peak"] for r in rows if r["workload"] == "waste"}
    assert waste["paged, blocks on demand"] < next(w for v, w in waste.items() if v.startswith("max_model_len"))

    for wl in WORKLOADS:  # one table per workload
        assert f"\n{wl}: " in stdout
    assert "Runtime() to first token" in stdout and "decode tok/s" in stdout and "greedy = pagedrt float32" in stdout
    assert "pagedrt bfloat16 ×" in stdout


def test_bench_rounds_alternate_the_engines_and_take_medians_of_each_rounds_own_figures(tmp_path):
    data, stdout = run_tiny(tmp_path, "bench.py", "--workloads", "latency", "--rounds", "3")
    rows, params = data["rows"], data["weight_params"]
    assert len(data["ceilings_by_round"]) == 3 and all(c["read_GBps"] > 0 for c in data["ceilings_by_round"])
    assert data["ceilings"] == data["ceilings_by_round"][0]
    assert [r["engine"] for r in rows] == ["pagedrt bfloat16", "pagedrt float32"]
    for r in rows:
        assert len(r["rounds"]) == 3
        bpw = 4 if "float32" in r["engine"] else 2
        for x, c in zip(r["rounds"], data["ceilings_by_round"]):  # each round against its own probe
            bw = max(c["read_GBps"], c["read_at_GBps"][str(params * bpw)])
            assert abs(x["floor_tok_s"] - bw * 1e9 / (params * bpw)) < 1e-6 * x["floor_tok_s"]
            assert abs(x["of_floor"] - x["decode_tok_s"] / x["floor_tok_s"]) < 1e-9
        for key in ("decode_tok_s", "of_floor", "first_x"):  # the medians of the rounds' own figures
            assert r[key] == sorted(x[key] for x in r["rounds"])[1]
    # the ratio is taken within each round (engines seconds apart), not between the medians
    bf16, f32 = rows
    assert [x["first_x"] for x in f32["rounds"]] == [
        pytest.approx(a["decode_tok_s"] / b["decode_tok_s"], rel=1e-12) for a, b in zip(bf16["rounds"], f32["rounds"])]
    assert "ceilings, measured before round 3" in stdout and "latency, round by round (decode tok/s" in stdout


def test_bench_kv_shortcut_runs_only_the_workloads_asked(tmp_path):
    data, stdout = run_tiny(tmp_path, "bench_kv.py", "--workloads", "waste,prefix", "--dtypes", "float32")
    assert {(r["engine"], r["workload"]) for r in data["rows"]} == {
        ("pagedrt float32", "prefix"), ("pagedrt float32", "waste"), ("contiguous allocator", "waste")}
    assert "\nwaste: " in stdout and "\nmixed: " not in stdout


def test_bench_events_runs_its_three_modes_on_the_same_events(tmp_path):
    out = tmp_path / "events.json"
    res = subprocess.run([sys.executable, str(TOOLS / "bench_events.py"), "--requests", "8", "--max-tokens", "5",
                          "--rounds", "1", "--profile", "3", "--json", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    med = json.loads(out.read_text())["median"]
    assert set(med) == {"core", "generate", "stream"}
    assert {m["events"] for m in med.values()} == {8 * 5}        # every mode saw every token's event
    assert all(m["host_us_per_event"] > 0 and m["wall_s"] > 0 for m in med.values())
    assert "cProfile of one generate()" in res.stdout
