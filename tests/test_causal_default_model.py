"""On the real default model (SmolLM2-135M-Instruct, shipped probe): an intervention changes the
engine's greedy output exactly as on the transformers replica, a CAUSAL Audit's family_drop
equals probe.ablation's exact drops within 1e-3 nats (all 3L pairs, and the probe's 30 largest with
causal_pairs = 30), the served direct logit attribution splits the
replica's logit exactly, and ProbeInfo reports the shipped artifact's evaluation."""

from __future__ import annotations

import pytest
import torch

from alignlens.probe.ablation import DecisionAblator
from alignlens.probe.attribution import Attributor
from alignlens.probe.intervene import Spec, greedy
from alignlens.probe.refine import select_pairs
from alignlens.service.client import AttributionClient, intervention
from alignlens.service.server.convert import per_family_rows
from tests.support.capture_check import load_replica
from tools.serve_process import ServeProcess

PROMPT = "The capital of France is"


@pytest.mark.slow
def test_default_model_interventions_and_family_drop(default_model, tmp_path):
    from alignlens.probe.artifact import default_artifact_path

    att = Attributor.load(default_artifact_path(default_model), default_model)
    basis, bias = att.factors.basis, att.host.attn_out_bias
    model = load_replica(default_model)
    args = ["--model", str(default_model), "--enforce-eager", "--max-model-len", "512"]
    with ServeProcess(args, tmp_path / "server.log") as server, AttributionClient(server.target, timeout_s=600) as c:
        stream = c.generate(PROMPT, max_tokens=6, temperature=0.0, ignore_eos=True, detail="summary")
        tokens = [t.token_id for t in stream]
        prompt = list(stream.finished.prompt_token_ids)
        # the block whose mlp_in the probe attributes most for the first token, ablated from the start
        rows = stream.tokens[0].attribution.family_attribution
        block = max(range(len(rows)), key=lambda i: rows[i].mlp_in) + 1
        ablated = [t.token_id for t in c.generate(prompt, max_tokens=6, temperature=0.0, ignore_eos=True,
                                                   detail="none", interventions=[intervention(block, "mlp_in")])]
        want, _ = greedy(model, prompt, 6, [Spec(block, 2)], basis, bias)
        assert ablated == want
        assert greedy(model, prompt, 6)[0] == tokens
        audit = c.audit(prompt, tokens, detail="causal", causal_indices=[0, 1])
        budget = c.audit(prompt, tokens, detail="causal", causal_indices=[0, 1], causal_pairs=30)
        info = c.model_info().probe
    # ProbeInfo carries the shipped artifact's evaluation (probe/artifacts/*.eval.json)
    import json

    ev = json.loads(default_artifact_path(default_model).with_suffix(".eval.json").read_text())
    assert info.loaded and info.readout_top1_agreement == pytest.approx(ev["readout_top1_agreement"], abs=1e-6)
    assert info.faithfulness_spearman == pytest.approx(ev["faithfulness_spearman"], abs=1e-6)
    assert list(info.depth_kl) == pytest.approx(ev["depth_kl"], abs=1e-6)
    assert "tuned_lens_kl" in info.metadata["evaluation"] and "headline" in info.metadata["evaluation"]
    assert list(info.tuned_lens_kl) == pytest.approx(ev["tuned_lens_kl"], abs=1e-6)
    head = ev["headline"]["faithfulness"]
    assert info.mean_profile_faithfulness_spearman == pytest.approx(
        head["mean_profile"]["per_token_spearman"]["value"], abs=1e-6)
    assert info.top_pair_hit == pytest.approx(head["family_attribution"]["top_pair_hit"]["value"], abs=1e-6)
    refined = info.metadata["evaluation"]["refinement"]["30"]["family_attribution"]
    assert refined["per_token_spearman"] == pytest.approx(
        ev["refinement"]["30"]["family_attribution"]["per_token_spearman"], abs=1e-6)
    # direct logit attribution on the engine: the parts sum to the total, and the total is the
    # replica's logit of y minus the mean logit over the candidate set (host top-32 plus y)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1]
    for j, tok in enumerate(stream.tokens):
        a = tok.attribution
        assert abs(a.dla_embed + sum(a.dla_attn) + sum(a.dla_mlp) - a.dla_total) < 1e-4
        cand = set(logits[j].topk(32).indices.tolist()) | {tokens[j]}
        want = (logits[j, tokens[j]] - logits[j, sorted(cand)].mean()).item()
        assert a.dla_total == pytest.approx(want, abs=2e-3), (j, a.dla_total, want)
    ablator = DecisionAblator(model, basis, bias)
    idx = torch.tensor([0, 1])
    _base, drop = ablator.drops(torch.tensor(prompt + tokens), len(prompt) - 1 + idx, torch.tensor(tokens)[idx])
    for j in range(2):
        got = torch.tensor(per_family_rows(audit.tokens[j].attribution.family_drop))
        assert (got - drop[j]).abs().max() <= 1e-3, (got - drop[j]).abs().max()
        # probe-guided refinement: the probe's 30 largest pairs ablated (the same drops), the rest NaN
        a = budget.tokens[j].attribution
        part = torch.tensor(per_family_rows(a.family_drop)).flatten()
        top = select_pairs(torch.tensor(per_family_rows(a.family_attribution)), 30)
        assert (~part.isnan()).sum() == 30 and not part[top].isnan().any()
        assert (part[top] - drop[j].flatten()[top]).abs().max() <= 1e-3
