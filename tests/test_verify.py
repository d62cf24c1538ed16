"""Online faithfulness (--verify-fraction): deterministic selection, the Spearman used, and a real
server verifying live tokens in the background against the engine's exact ablations."""

from __future__ import annotations

import math
import time
import urllib.request

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from alignlens.probe.evaluate import spearman as torch_spearman
from alignlens.service.client import AttributionClient
from alignlens.service.server.verify import Verifier, token_spearman
from tests.support.tiny import make_probe_artifact
from tools.serve_process import ServeProcess


def test_selection_is_every_nth_token_across_requests():
    v = Verifier(0.25, state=None, n_blocks=4)
    picked = [v.select(3), v.select(3), v.select(6)]
    assert picked == [[], [0], [1, 5]]  # the 4th, 8th and 12th attributed tokens of the stream
    assert sum(map(len, picked)) == 12 * 0.25


def test_token_spearman_is_the_evaluations_over_abs_drops():
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        a, b = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
        b[0] = b[1, 0]  # ties
        want = float(torch_spearman(a.flatten()[None], b.abs().flatten()[None])[0])
        assert token_spearman(a.tolist(), b.tolist()) == pytest.approx(want, abs=1e-6)
    assert token_spearman([[1.0, 2.0, 3.0]], [[-1.0, -2.0, -3.0]]) == pytest.approx(1.0)  # |drop| ranks
    assert math.isnan(token_spearman([[1.0, 1.0, 1.0]], [[1.0, 2.0, 3.0]]))


def _metrics(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples if not s.labels
            or "le" not in s.labels}


def test_server_verifies_a_fraction_of_live_tokens(tiny_llama, tmp_path):
    probe = make_probe_artifact(tiny_llama, tmp_path / "probe.safetensors")
    args = ["--model", str(tiny_llama), "--probe", str(probe), "--enforce-eager", "--max-model-len", "256",
            "--verify-fraction", "0.5"]
    with ServeProcess(args, tmp_path / "server.log") as server, AttributionClient(server.target, timeout_s=60) as c:
        tokens = list(c.generate("The capital of France is", max_tokens=8, temperature=0.0, ignore_eos=True,
                                 detail="summary"))
        assert len(tokens) == 8
        deadline = time.monotonic() + 120
        while (m := _metrics(server.metrics_url))["alignlens_attribution_verified_tokens_total"] < 4 \
                and time.monotonic() < deadline:
            time.sleep(0.5)
        assert m["alignlens_attribution_verified_tokens_total"] == 4
        assert m["alignlens_attribution_faithfulness_count"] == 4
        assert -4 <= m["alignlens_attribution_faithfulness_sum"] <= 4  # the mean the recording rule takes
        assert c.health() == "SERVING"
