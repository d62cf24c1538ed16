"""Capture inside vLLM's forward equals the transformers replica (issue 2).

Fast configuration (multiprocessing off, eager) through the `alignlens trace` CLI for
both architectures, with chunked prefill forced by a small token budget and prompts
of different lengths batched together; the default configuration (torch.compile on,
multiprocessing on, AsyncLLM) once, with concurrency, replay and abort.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from alignlens.service.engine.wire import Intervention
from tests.support.capture_check import check_rows, greedy_from_final, load_replica

# the long prompt's intervention starts inside its second prefill chunk (64-token budget)
INTERVENTIONS = (Intervention(block=2, family=2, scale=0.0, start=70),
                 Intervention(block=1, family=1, directions=(0, 1), scale=2.0, start=0))
PROMPTS = [
    "The capital of France is",
    "def add(a, b):\n    return",
    # long enough to be split over several chunked-prefill steps with a 64-token budget
    " ".join(["1, 2, 3, 4, 5, 6, 7, 8, 9, 10."] * 12),
    "Question: what is two plus two? Answer:",
]


def run_trace(model, out, *extra) -> dict:
    cmd = [sys.executable, "-m", "alignlens.service.cli", "trace", "--model", str(model), "--out", str(out),
           "--max-tokens", "12", *extra]
    for p in PROMPTS:
        cmd += ["--prompt", p]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().splitlines()[-1] == str(out)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return {"meta": meta, "tensors": tensors}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_trace_inproc_matches_replica(arch, tiny_llama, tiny_gpt2, tmp_path):
    model_dir = tiny_llama if arch == "llama" else tiny_gpt2
    result = run_trace(model_dir, tmp_path / "t.safetensors", "--no-multiprocessing", "--enforce-eager",
                       "--max-num-batched-tokens", "64", "--max-model-len", "512")
    meta, t = result["meta"], result["tensors"]
    assert meta["vllm_version"] == "0.32.0" and meta["dtype"] == "float32" and meta["model"] == str(model_dir)
    model = load_replica(model_dir)
    L = model.config.num_hidden_layers
    for i in range(len(PROMPTS)):
        prompt, tokens = t[f"{i}.prompt_token_ids"], t[f"{i}.token_ids"]
        resid, mid = t[f"{i}.resid"], t[f"{i}.resid_mid"]
        assert resid.shape == (len(tokens), L + 1, model.config.hidden_size)
        assert mid.shape == (len(tokens), L, model.config.hidden_size)
        check_rows(model, prompt, tokens, resid, mid)
        assert torch.equal(greedy_from_final(model, resid), tokens)
    assert len(t["2.prompt_token_ids"]) > 64, "the long prompt must span several prefill chunks"


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "mistral", "gemma3"])
def test_other_families_capture_matches_replica(arch, tiny_family, tmp_path):
    """Qwen2 (q/k/v biases), Qwen3 (q/k norms), Mistral, Gemma 3 (sandwich norms, sliding window
    shorter than the prompts): capture in the family's own vLLM model class equals the transformers
    forward, eager in-process, prefill in several chunks."""
    model_dir = tiny_family(arch)
    result = run_trace(model_dir, tmp_path / "t.safetensors", "--no-multiprocessing", "--enforce-eager",
                       "--max-num-batched-tokens", "64", "--max-model-len", "512")
    t = result["tensors"]
    model = load_replica(model_dir)
    for i in range(len(PROMPTS)):
        prompt, tokens = t[f"{i}.prompt_token_ids"], t[f"{i}.token_ids"]
        check_rows(model, prompt, tokens, t[f"{i}.resid"], t[f"{i}.resid_mid"])
        assert torch.equal(greedy_from_final(model, t[f"{i}.resid"]), tokens)


async def _default_config_session(model_dir):
    from vllm import SamplingParams

    from alignlens.probe.record import Detail
    from alignlens.service.engine.async_engine import CaptureEngine
    from alignlens.service.engine.config import EngineConfig
    from alignlens.service.engine.trace import trace_with_engine
    from alignlens.service.engine.wire import CaptureOptions
    from tests.support.tiny import make_probe_artifact

    probe = make_probe_artifact(model_dir, Path(model_dir).parent / "compiled-session-probe.safetensors")
    engine = await CaptureEngine.start(EngineConfig(model=str(model_dir), max_model_len=512,
                                                    max_num_batched_tokens=64), probe_path=str(probe))
    try:
        assert engine.attach_info["model_class"] == "CaptureLlamaForCausalLM"
        ids = [engine_tokenize(model_dir, p) for p in PROMPTS]
        results = await trace_with_engine(engine, ids, max_tokens=12)
        # teacher-forced replay of the same text, in one pass (the audit path)
        replay = await engine.replay("replay-0", ids[2], results[2]["token_ids"].tolist(),
                                     CaptureOptions(rid="replay-0", resid=True))
        replay_resid = torch.stack([torch.from_numpy(t.message.tensors(t.record)["resid"]) for t in replay])
        # a consumer that stops after two tokens aborts its request
        agen = engine.generate("abort-me", ids[0], SamplingParams(max_tokens=200, ignore_eos=True),
                               CaptureOptions(rid="abort-me", resid=True))
        seen = 0
        async for _out, joined in agen:
            seen += len(joined)
            if seen >= 2:
                break
        await agen.aclose()
        # an intervened request beside a plain one, the long prompt spanning several prefill chunks:
        # the intervention starts inside the second chunk (positions are sequence positions)
        params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=0)
        iv_opts = CaptureOptions(rid="", rows=False, interventions=INTERVENTIONS)

        async def tokens_of(rid, prompt, opts):
            out = None
            async for out, _new in engine.generate(rid, prompt, params.clone(), opts):
                pass
            c = out.outputs[0]
            return list(c.token_ids), [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)]

        intervened, beside = await asyncio.gather(tokens_of("iv-long", ids[2], iv_opts),
                                                  tokens_of("iv-plain", ids[0], None))
        # a seeded, sampled request whose prompt spans several prefill chunks: vLLM rewinds its
        # generator after each discarded chunk, which CPU generators cannot do (internals.wrap_step
        # restores their state instead); the engine survives and the seed reproduces the tokens
        async def seeded(rid):
            out = None
            async for out, _new in engine.generate(rid, ids[2], SamplingParams(max_tokens=5, temperature=1.0, seed=7,
                                                                                ignore_eos=True), None):
                pass
            return list(out.outputs[0].token_ids)

        first = await seeded("seeded-1")
        assert await seeded("seeded-2") == first and len(first) == 5
        # detail FULL in the compiled forward: the heads' outputs (copied inside the graph into the
        # o_proj's buffer, vllm_plugin/heads.py) give per-head DLA that sums to each block's
        # attention term, computed independently from resid / resid_mid
        full = []
        async for _out, joined in engine.generate("heads", ids[2], SamplingParams(max_tokens=4, ignore_eos=True),
                                                  CaptureOptions(rid="heads", detail=Detail.FULL)):
            full += [t.attr for t in joined]
        assert len(full) == 4
        for a in full:
            assert len(a.dla_heads) == len(a.dla_attn) and a.dla_heads[0]
            for per_head, attn in zip(a.dla_heads, a.dla_attn, strict=True):
                assert abs(sum(per_head) - attn) < 1e-4 + 1e-4 * abs(attn), (per_head, attn)
        # one more request so the worker sees the abort in its next step
        await trace_with_engine(engine, [ids[1]], max_tokens=2)
        await asyncio.sleep(0.2)
        stats = await engine.stats()
        return results, replay_resid, stats, ids, intervened, beside
    finally:
        engine.shutdown()


def engine_tokenize(model_dir, text):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))(text)["input_ids"]


def test_default_config_compiled_multiprocessing(tiny_llama):
    """torch.compile + multiprocessing + AsyncLLM: values, concurrency, replay, abort."""
    results, replay_resid, stats, ids, intervened, beside = asyncio.run(_default_config_session(tiny_llama))
    model = load_replica(tiny_llama)
    # interventions in the compiled forward, across prefill chunks, equal the replica's
    from alignlens.probe.host import Host
    from alignlens.probe.intervene import Spec, greedy
    from alignlens.probe.svd import load_or_compute

    host = Host.from_checkpoint(tiny_llama)
    specs = [Spec(iv.block, iv.family, iv.directions, iv.scale, iv.start, iv.end) for iv in INTERVENTIONS]
    # "all directions" means the served k: the probe's (the engine runs with a tiny probe, k = 8)
    k = stats["worker"]["intervention_k"]
    tokens, logprobs = greedy(model, ids[2], 6, specs, load_or_compute(host, k).basis, host.attn_out_bias)
    assert intervened[0] == tokens and max(abs(a - b) for a, b in zip(intervened[1], logprobs)) <= 1e-3
    plain_tokens, plain_logprobs = greedy(model, ids[0], 6)
    assert beside[0] == plain_tokens and max(abs(a - b) for a, b in zip(beside[1], plain_logprobs)) <= 1e-3
    assert stats["worker"]["intervened_steps"] > 0
    for r in results:
        check_rows(model, r["prompt_token_ids"], r["token_ids"], r["resid"], r["resid_mid"])
        assert torch.equal(greedy_from_final(model, r["resid"]), r["token_ids"])
    rel = ((replay_resid - results[2]["resid"]).norm() / results[2]["resid"].norm()).item()
    assert rel <= 1e-4, f"replay differs from live capture: {rel:.2e}"
    print(json.dumps(stats))
    assert stats["worker"]["forward_calls"] > 0 and stats["worker"]["rows_sent"] > 0
    assert stats["worker"]["pending_rows"] == 0
    assert stats["worker"]["tracked_requests"] == 0, "aborted request still tracked in the worker"
    assert stats["server"]["open_requests"] == 0 and stats["server"]["buffered_records"] == 0
    # on a multi-core CPU the idle-core helper runs, and the worker's wait between steps no longer
    # spins on its core (internals.yield_core_while_waiting: fails if vLLM's queue loses the hook)
    if len(os.sched_getaffinity(0)) > 1:
        assert stats["worker"]["idle_helper"] and stats["worker"]["idle_wait_polls"], stats["worker"]
    assert stats["worker"]["probe_process"], "the probe did not run in its own process"


@pytest.mark.slow
def test_default_model_trace_matches_transformers(default_model, tmp_path):
    result = run_trace(default_model, tmp_path / "smol.safetensors", "--no-multiprocessing", "--enforce-eager")
    t = result["tensors"]
    model = load_replica(default_model)
    for i in range(len(PROMPTS)):
        check_rows(model, t[f"{i}.prompt_token_ids"], t[f"{i}.token_ids"], t[f"{i}.resid"], t[f"{i}.resid_mid"])
        assert torch.equal(greedy_from_final(model, t[f"{i}.resid"]), t[f"{i}.token_ids"])


@pytest.fixture(scope="module")
def gemma3_270m():
    from alignlens.service.modelstore import fetch_model

    return fetch_model("gemma3-270m", progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["eager-inproc", "compiled-multiprocessing"])
def test_gemma3_270m_capture_matches_transformers(config, gemma3_270m, tmp_path):
    """The real Gemma 3 270M: capture equals a teacher-forced transformers forward (fp32, 1e-4)
    and every greedy token is reproduced from the captured h_L, in both engine configurations,
    with chunked prefill (64-token budget)."""
    extra = ["--no-multiprocessing", "--enforce-eager"] if config == "eager-inproc" else []
    result = run_trace(gemma3_270m, tmp_path / "gemma.safetensors", "--max-num-batched-tokens", "64",
                       "--max-model-len", "1024", *extra)
    t = result["tensors"]
    model = load_replica(gemma3_270m)
    errors = []
    for i in range(len(PROMPTS)):
        errors.append(check_rows(model, t[f"{i}.prompt_token_ids"], t[f"{i}.token_ids"], t[f"{i}.resid"],
                                 t[f"{i}.resid_mid"]))
        assert torch.equal(greedy_from_final(model, t[f"{i}.resid"]), t[f"{i}.token_ids"])
    print(json.dumps({"config": config, "errors": errors}))


ENGINE_LOGITS_SCRIPT = r"""
import json, sys
from vllm import SamplingParams
from alignlens.probe.record import Detail
from alignlens.service.engine.config import EngineConfig
from alignlens.service.engine.inproc_engine import InprocCaptureEngine
from transformers import AutoTokenizer

model, probe = sys.argv[1], sys.argv[2]
if __name__ == "__main__":
    engine = InprocCaptureEngine(EngineConfig(model=model, max_model_len=256, enforce_eager=True), probe_path=probe)
    ids = AutoTokenizer.from_pretrained(model)("The capital of France is")["input_ids"]
    # temperature 0.8: the sampler divides its input in place; the probe must get the logits from before
    params = SamplingParams(max_tokens=8, temperature=0.8, seed=3, ignore_eos=True)
    [(out, tokens)] = engine.generate([ids], [params], detail=Detail.SUMMARY)
    print(json.dumps({"prompt": ids, "tokens": list(out.outputs[0].token_ids),
                      "host_logprob": [t.attr.host_logprob for t in tokens],
                      "stats": engine.stats()}))
    engine.shutdown()
"""


def test_generated_tokens_are_attributed_from_the_engines_logits(tiny_llama, tmp_path):
    """The worker hands vLLM's own logits (copied before sampling) to the probe for generated
    tokens: every such row used them, and host_logprob equals the replica's log-softmax."""
    from tests.support.tiny import make_probe_artifact

    probe = make_probe_artifact(tiny_llama, tmp_path / "probe.safetensors")
    proc = subprocess.run([sys.executable, "-c", ENGINE_LOGITS_SCRIPT, str(tiny_llama), str(probe)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["stats"]["engine_logits_rows"] == 8 == len(got["host_logprob"])
    model = load_replica(tiny_llama)
    seq = torch.tensor(got["prompt"] + got["tokens"])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=seq[None]).logits[0].float(), -1)
    P = len(got["prompt"])
    want = logp[P - 1:-1].gather(1, seq[P:, None]).squeeze(1)
    torch.testing.assert_close(torch.tensor(got["host_logprob"]), want, rtol=1e-4, atol=1e-4)
