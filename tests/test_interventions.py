"""Interventions in the engine's forward equal the same projection on the transformers replica, touch
only their own request, and scale 1 is no intervention (real engine, in-process, eager; tiny random
Llama and GPT-2, whose attention output has a bias)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from alignlens.probe.host import Host
from alignlens.probe.intervene import Spec, greedy
from alignlens.probe.svd import load_or_compute
from tests.support.capture_check import load_replica

MAX_TOKENS = 8
PROMPTS = ["The capital of France is", "def add(a, b):", "Question: what is two plus two?", "Lists: apples,"]
# prompt index -> interventions (block, family, directions, scale, start, end): an ablation of a whole
# family from the first position, and a composition of two on another prompt, from a later position
SPECS = {0: [(2, 2, (), 0.0, 0, None)],
         2: [(1, 1, (0, 1, 2), 3.0, 3, None), (3, 0, (0,), -1.0, 0, 9), (1, 1, (1,), 0.5, 5, None)]}

ENGINE_SCRIPT = r"""
import json, sys
from vllm import SamplingParams
from transformers import AutoTokenizer
from alignlens.service.engine.config import EngineConfig
from alignlens.service.engine.inproc_engine import InprocCaptureEngine
from alignlens.service.engine.wire import Intervention

model, specs, max_tokens = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
prompts = json.loads(sys.argv[4])
if __name__ == "__main__":
    engine = InprocCaptureEngine(EngineConfig(model=model, max_model_len=256, enforce_eager=True,
                                              max_num_batched_tokens=32))
    tok = AutoTokenizer.from_pretrained(model)
    ids = [tok(p)["input_ids"] for p in prompts]
    def run(plan):
        params = [SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=0) for _ in ids]
        ivs = [tuple(Intervention(block=b, family=f, directions=tuple(d), scale=s, start=st, end=e)
                     for b, f, d, s, st, e in plan.get(str(i), [])) for i in range(len(ids))]
        outs = engine.generate(ids, params, interventions=ivs)
        return [{"tokens": list(o.outputs[0].token_ids),
                 "logprobs": [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]}
                for o, _ in outs]
    result = {"ids": ids, "intervened": run(specs), "plain": run({}),
              "scale_one": run({"0": [[2, 2, [], 1.0, 0, None]]}), "stats": engine.stats()}
    print(json.dumps(result))
    engine.shutdown()
"""


@pytest.fixture(scope="module", params=["tiny_llama", "tiny_gpt2"])
def checkpoint(request):
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def engine_runs(checkpoint):
    proc = subprocess.run([sys.executable, "-c", ENGINE_SCRIPT, str(checkpoint), json.dumps(SPECS), str(MAX_TOKENS),
                           json.dumps(PROMPTS)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_intervened_generation_equals_the_replica(engine_runs, checkpoint):
    model = load_replica(checkpoint)
    host = Host.from_checkpoint(checkpoint)
    basis = load_or_compute(host).basis
    assert engine_runs["stats"]["intervention_k"] == basis.shape[2] and engine_runs["stats"]["intervened_steps"] > 0
    for i, plan in SPECS.items():
        specs = [Spec(b, f, tuple(d), s, st, e) for b, f, d, s, st, e in plan]
        tokens, logprobs = greedy(model, engine_runs["ids"][i], MAX_TOKENS, specs, basis, host.attn_out_bias)
        got = engine_runs["intervened"][i]
        assert got["tokens"] == tokens, (i, got["tokens"], tokens)
        assert max(abs(a - b) for a, b in zip(got["logprobs"], logprobs)) <= 1e-3
        # the intervention changed this request's forward (else the check above proves nothing)
        plain = engine_runs["plain"][i]
        assert plain["tokens"] != got["tokens"] or max(
            abs(a - b) for a, b in zip(plain["logprobs"], got["logprobs"])) > 1e-2, i


def test_other_requests_in_the_batch_are_untouched(engine_runs, checkpoint):
    model = load_replica(checkpoint)
    for i in range(len(PROMPTS)):
        tokens, logprobs = greedy(model, engine_runs["ids"][i], MAX_TOKENS)
        assert engine_runs["plain"][i]["tokens"] == tokens
        if i not in SPECS:  # batched beside intervened requests: identical to running without any
            _same(engine_runs["intervened"][i], engine_runs["plain"][i])


def test_scale_one_is_no_intervention(engine_runs):
    for got, plain in zip(engine_runs["scale_one"], engine_runs["plain"]):
        _same(got, plain)


def _same(a: dict, b: dict) -> None:
    # tokens exactly; log-probabilities to float32 rounding (the prefix cache can change which rows a
    # step computes, hence its matmul shapes)
    assert a["tokens"] == b["tokens"]
    assert max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"])) <= 1e-5


def test_bad_interventions_name_the_field_and_the_limit():
    """validation.interventions: every out-of-range field is INVALID_ARGUMENT naming it and its limit."""
    from alignlens.service.client import intervention, pb2
    from alignlens.service.server.errors import FailedPrecondition, InvalidArgument
    from alignlens.service.server.validation import MAX_INTERVENTIONS, ModelLimits, interventions

    limits = ModelLimits(tokenizer=None, max_model_len=256, vocab_size=100, probe_loaded=False, n_blocks=4,
                         intervention_k=8)
    good = intervention(2, "mlp_in", [0, 7], 0.5, 3, 10)
    [iv] = interventions([good], limits)
    assert (iv.block, iv.family, iv.directions, iv.scale, iv.start, iv.end) == (2, 2, (0, 7), 0.5, 3, 10)
    cases = [
        (intervention(0, "qkv"), "interventions[0].block", "1..4"),
        (intervention(5, "qkv"), "interventions[0].block", "1..4"),
        (pb2.Intervention(block=1), "interventions[0].family", "FAMILY_QKV"),
        (intervention(1, "qkv", [8]), "interventions[0].directions[0]", "< 8"),
        (intervention(1, "qkv", [1, 1]), "interventions[0].directions", "twice"),
        (intervention(1, "qkv", scale=float("nan")), "interventions[0].scale", "finite"),
        (intervention(1, "qkv", scale=101.0), "interventions[0].scale", "100"),
        (intervention(1, "qkv", start_position=256), "interventions[0].start_position", "256"),
        (intervention(1, "qkv", start_position=5, end_position=5), "interventions[0].end_position", "6..256"),
        (intervention(1, "qkv", end_position=257), "interventions[0].end_position", "1..256"),
    ]
    for msg, field, limit in cases:
        with pytest.raises(InvalidArgument) as err:
            interventions([msg], limits)
        assert err.value.field == field and limit in str(err.value), (field, str(err.value))
    with pytest.raises(InvalidArgument) as err:
        interventions([good] * (MAX_INTERVENTIONS + 1), limits)
    assert err.value.field == "interventions" and str(MAX_INTERVENTIONS) in str(err.value)
    limits.intervention_k = 0
    with pytest.raises(FailedPrecondition):
        interventions([good], limits)


def test_cli_intervention_spec():
    from alignlens.service.client import parse_intervention, pb2

    iv = parse_intervention("24:mlp_in:0,3:0.5:10:12")
    assert (iv.block, iv.family, list(iv.directions), iv.scale, iv.start_position, iv.end_position) == \
        (24, pb2.FAMILY_MLP_IN, [0, 3], 0.5, 10, 12)
    iv = parse_intervention("3:attn_out")
    assert list(iv.directions) == [] and iv.scale == 0.0 and not iv.HasField("end_position")
    for bad in ("3", "x:qkv", "3:qkv:a", "3:bogus"):
        with pytest.raises(ValueError):
            parse_intervention(bad)
