"""`python -m tools.bench` end to end on a tiny model: every mode, the service part, the JSON contract."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support.tiny import make_probe_artifact
from tools.serve_process import REPO


@pytest.mark.slow
def test_bench_json_contract(tiny_llama, tmp_path):
    probe = make_probe_artifact(tiny_llama, tmp_path / "probe.safetensors")
    md = tmp_path / "bench.md"
    proc = subprocess.run(
        [sys.executable, "-m", "tools.bench", "--model", str(tiny_llama), "--probe", str(probe),
         "--batch-sizes", "1,4", "--repetitions", "2", "--max-tokens", "8", "--enforce-eager",
         "--max-model-len", "512", "--service", "--streams", "1,2", "--audit-lengths", "16",
         "--causal-tokens", "1,2", "--causal-pairs", "0,2", "--verify-fraction", "0.5",
         "--json", "--out", str(md)],
        capture_output=True, text=True, timeout=1200, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for batch in ("1", "4"):
        row = report["batches"][batch]
        for key in ("stock_tokens_per_second", "attributed_tokens_per_second", "attributed_over_stock"):
            assert row[key] > 0, (batch, key, row)
        assert row["capture"]["repetitions"] == 2
        assert row["attributed"]["itl_p99_seconds"] >= row["attributed"]["itl_p50_seconds"] > 0
    cost = report["cost_model"]
    # the engine's logits spare generated tokens the V*d unembedding; audited tokens pay for it
    assert 0 < cost["attribution_flops_per_token"] < cost["attribution_flops_per_audit_token"]
    assert report["peak_rss_bytes"]["stock"] > 0 and report["peak_rss_bytes"]["capture"] > 0
    assert report["service"]["streams"]["2"]["tokens_per_second"] > 0
    # detail NONE through the server (stock serving) beside engine-direct stock
    assert report["service"]["streams"]["2"]["none_tokens_per_second"] > 0
    assert report["service"]["none_over_engine_stock"]["1"] > 0
    audit = report["service"]["audit"]["16"]
    assert audit["tokens_per_second"] > 0 and audit["generate_tokens_per_second"] > 0
    assert audit["no_attribution_tokens_per_second"] > 0
    assert audit["over_generate_same_length"] == pytest.approx(
        audit["tokens_per_second"] / audit["generate_tokens_per_second"])
    # streams 1 and batch 1 were both measured: the service/engine-direct ratio is reported
    assert report["service"]["over_engine_direct"]["1"] > 0 and report["service"]["over_engine_direct"]["2"] is None
    assert set(report["cost_model"]["probe_seconds_per_token"]) == {"1", "16", "512"}
    assert all(v > 0 for v in report["cost_model"]["probe_seconds_per_token"].values())
    assert "| 4 | attributed |" in md.read_text()
    # CAUSAL Audit rate and the cost of online verification
    causal = report["service"]["causal"]
    assert set(causal) == {"1", "2", "1/2", "2/2"}  # every pair, and the probe's 2 largest per token
    assert causal["1"]["pairs"] == 3 * 4 and causal["1/2"]["pairs"] == 2  # the tiny Llama has L = 4 blocks
    assert all(row["tokens_per_second"] > 0 for row in causal.values())
    verify = report["service"]["verify"]
    assert verify["streams"] == 2 and verify["tokens_per_second"] > 0 and verify["over_without"] > 0
    assert verify["verified_tokens"] >= 1


def test_http_bench_pairs_ratios_by_repetition():
    """tools.bench.http reports on/stock repetition by repetition (a drift of the shared machine
    cancels within a pair), and the table shows them beside the per-mode medians."""
    from tools.bench.http import markdown, paired_ratio

    on = [{"tokens_per_second": v} for v in (40.0, 50.0, 44.0)]
    stock = [{"tokens_per_second": v} for v in (42.0, 50.0, 46.0)]
    p = paired_ratio(on, stock)
    assert p["per_repetition"] == pytest.approx([40 / 42, 1.0, 44 / 46])
    assert p["median"] == pytest.approx(44 / 46) and p["min"] == pytest.approx(40 / 42) and p["max"] == 1.0
    with pytest.raises(ValueError):  # a missing repetition is an error, not a shorter pairing
        paired_ratio(on, stock[:2])
    row = {m: {"tokens_per_second": 45.0, "min": 40.0, "max": 50.0} for m in ("vllm", "http-on")}
    row["paired"] = {"http-on/vllm": p}
    table = markdown({"model": "m", "dtype": "float32", "max_tokens": 64, "streams": {"8": row}})
    assert "| 8 | 0.957 [0.952, 1.000] | - |" in table, table
