"""The benchmark harness in its tiny mode (a tiny random model, pagedrt only), so it cannot rot."""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

TOOLS = pathlib.Path(__file__).resolve().parents[1] / "tools"


def test_bench_tiny_mode_writes_its_schema(tmp_path):
    out = tmp_path / "bench.json"
    res = subprocess.run([sys.executable, str(TOOLS / "bench.py"), "--tiny", "--json", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert {(r["engine"], r["workload"]) for r in rows} == {
        (f"pagedrt {d}", w) for d in ("bfloat16", "float32") for w in ("latency", "batched")}
    for r in rows:
        assert r["output_tok_s"] > 0 and r["peak_rss_mb"] > 0
        if r["workload"] == "latency":
            assert r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 and r["ttft_ms"] > 0
    assert "Runtime() to first token" in res.stdout and "batched tok/s" in res.stdout
