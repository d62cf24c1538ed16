"""A probe failure in the worker reaches the client at once, as a clear status, and nothing else breaks.

The server runs with the test-only fault hook ALIGNLENS_TEST_FAIL_PROBE_TOKEN: the worker's probe
raises for any work item that attributes that token id. The token is chosen so that the server's
own warm-up never attributes it (greedy tokens computed on the transformers replica), and is the
greedy first token of the prompt this test generates from, so both Generate and Audit hit it.
"""

from __future__ import annotations

import time

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignlens.service.client import AttributionClient
from alignlens.service.vllm_plugin.capture import FAIL_PROBE_TOKEN_ENV
from tests.support.tiny import make_probe_artifact
from tools.serve_process import ServeProcess

WARMUP_PROMPT = list(range(1, 33))  # the server's warm-up (server/app.py): generates 4, replays 17..32
CANDIDATES = ["The capital of France is", "def add(a, b):", "Question: what is two plus two?", "Lists: apples,",
              "The quick brown fox", "1, 2, 3, 4, 5,"]


@torch.no_grad()
def _greedy(model, ids: list[int], n: int) -> list[int]:
    seq = list(ids)
    for _ in range(n):
        seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids):]


def _fault_plan(model_dir) -> tuple[list[int], int]:
    """(prompt ids, fault token): the prompt's greedy first token, never attributed by the warm-up."""
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    avoid = set(_greedy(model, WARMUP_PROMPT, 4)) | set(WARMUP_PROMPT[16:])
    for text in CANDIDATES:
        ids = tok(text)["input_ids"]
        first = _greedy(model, ids, 1)[0]
        if first not in avoid:
            return ids, first
    pytest.skip("every candidate prompt's first token is one the warm-up attributes")


def test_probe_failure_is_an_immediate_error_and_the_server_keeps_serving(tiny_llama, tmp_path):
    prompt, fault = _fault_plan(tiny_llama)
    probe = make_probe_artifact(tiny_llama, tmp_path / "probe.safetensors")
    import os

    env = {**os.environ, FAIL_PROBE_TOKEN_ENV: str(fault)}
    args = ["--model", str(tiny_llama), "--probe", str(probe), "--enforce-eager", "--max-model-len", "256"]
    with ServeProcess(args, tmp_path / "server.log", env=env) as server, \
            AttributionClient(server.target, timeout_s=60) as client:
        for name, call in (
                ("Generate", lambda: list(client.generate(prompt, max_tokens=4, temperature=0.0, detail="summary"))),
                ("Audit", lambda: client.audit(prompt, [fault, fault, 5], detail="summary"))):
            t0 = time.perf_counter()
            with pytest.raises(grpc.RpcError) as err:
                call()
            seconds = time.perf_counter() - t0
            assert err.value.code() == grpc.StatusCode.INTERNAL, (name, err.value)
            assert "injected probe failure" in err.value.details() and "retry, or send detail NONE" in \
                err.value.details(), err.value.details()
            assert seconds < 1.0, f"{name}: the error took {seconds:.2f} s to reach the client"
        # the same request at detail NONE is served (stock path), and attribution works for other tokens
        tokens = list(client.generate(prompt, max_tokens=4, temperature=0.0, detail="none"))
        assert tokens[0].token_id == fault
        audit = client.audit(prompt, [5, 6, 7], detail="summary")
        assert all(t.HasField("attribution") for t in audit.tokens)
        assert client.health() == "SERVING"
        import urllib.request

        text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
        errors = [line for line in text.splitlines() if line.startswith("alignlens_attribution_errors_total")]
        assert errors and float(errors[0].split()[-1]) >= 2, errors
