"""Probe training, artifact round trip, fingerprint refusal and the batched Attributor (tiny models)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from alignlens.probe.artifact import FingerprintMismatch, load_artifact, read_metadata, save_artifact
from alignlens.probe.attribution import Attributor
from alignlens.probe.collect_replica import capture, label_gradients, label_trace
from alignlens.probe.data import build_dataset, write_trace
from alignlens.probe.evaluate import spearman
from alignlens.probe.fingerprint import host_fingerprint
from alignlens.probe.host import Host
from alignlens.probe.model import ProbeConfig, ProbeModel, token_features
from alignlens.probe.names import FAMILIES
from alignlens.probe.record import Detail
from alignlens.probe.svd import load_or_compute
from alignlens.probe.train import TrainConfig, train
from tests.support.tiny import tiny_gpt2, tiny_llama

K = 8


def _cfg(host: Host) -> ProbeConfig:
    return ProbeConfig(n_layers=host.n_layers, d_model=host.d_model, k=K, width=32, n_encoder_layers=1,
                       n_heads=2, head_width=16, top_k=8)


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("probe")
    import os
    os.environ["ALIGNLENS_HOME"] = str(tmp / "home")
    model = tiny_llama(seed=3, layers=4)
    with torch.no_grad():  # a sharper next-token distribution than random init gives, so top-1 means something
        model.model.norm.weight.mul_(4.0)
    host = Host.from_model(model)
    fac = load_or_compute(host, K)
    # Teacher-forced random text is enough here (targets are the host's own distributions) and much
    # faster than sampling: 60 training and 20 test sequences of 24 decisions.
    g = torch.Generator().manual_seed(0)
    seqs = torch.randint(2, 96, (80, 28), generator=g).tolist()
    records = [capture(model, s[:4], s[4:]) for s in seqs]
    train_path = write_trace(records[:60], tmp / "train.safetensors", {})
    test_path = write_trace(records[60:], tmp / "test.safetensors", {})
    for path in (train_path, test_path):
        label_gradients(model, fac.basis, host.attn_out_bias, path, progress=False)
    label_trace(model, fac.basis, host.attn_out_bias, train_path, rows_per_prompt=4, progress=False)
    train_ds = build_dataset(host, fac, [train_path], top_k=8)
    test_ds = build_dataset(host, fac, [test_path], top_k=8)
    return model, host, fac, train_ds, test_ds, tmp


def _final_agreement_of_depth(model: ProbeModel, host: Host, ds, depth: int) -> float:
    """Top-1 agreement with the host over the full vocabulary of the readout at `depth`."""
    with torch.no_grad():
        r, _ = model(ds.resid, ds.alpha, ds.g_out, host.W_U[ds.token_ids], token_features(ds.host_logprob, ds.cand_logits))
        return (host.logits(r[:, depth]).argmax(-1) == ds.cand_ids[:, 0]).float().mean().item()


def test_trained_probe_beats_untrained_null(tiny_setup):
    _, host, fac, train_ds, test_ds, tmp = tiny_setup
    cfg = _cfg(host)
    torch.manual_seed(0)
    null = ProbeModel(cfg).eval()
    model, summary = train(host, train_ds, fac, cfg, TrainConfig(steps=300, batch_size=32, lr=3e-3, negatives=64),
                           progress=False)
    assert summary["importance_head_trained_on_ablations"] and summary["linearized_auxiliary"]
    for name, buf in model.named_buffers():
        null.get_buffer(name).copy_(buf)
    L = host.n_layers
    # final depth is the host by construction, for both
    assert _final_agreement_of_depth(model, host, test_ds, L) == 1.0
    # at intermediate depths the trained readout agrees with the host more than the null (= logit lens)
    trained = sum(_final_agreement_of_depth(model, host, test_ds, l) for l in range(1, L))
    untrained = sum(_final_agreement_of_depth(null, host, test_ds, l) for l in range(1, L))
    assert trained > untrained + 0.1, (trained, untrained)
    # the importance head ranks (block, family) pairs like the host's own effect sizes; the null does not
    target = test_ds.lin.abs().flatten(1)

    def rho(m: ProbeModel) -> float:
        with torch.no_grad():
            _, pred = m(test_ds.resid, test_ds.alpha, test_ds.g_out, host.W_U[test_ds.token_ids],
                        token_features(test_ds.host_logprob, test_ds.cand_logits))
        return float(spearman(m.attribution(pred[..., 0]).flatten(1), target).mean())

    assert rho(model) > rho(null) + 0.15, (rho(model), rho(null))


def test_artifact_round_trip_and_fingerprint_refusal(tiny_setup, tmp_path):
    _, host, fac, train_ds, test_ds, _ = tiny_setup
    model = ProbeModel(_cfg(host)).eval()
    meta = {"host_fingerprint": host_fingerprint(host), "k": K, "family_map": host.describe()}
    path = save_artifact(tmp_path / "p.safetensors", model, meta)
    loaded, meta2 = load_artifact(path, host_fingerprint(host))
    assert meta2["probe_config"] == dataclasses.asdict(model.cfg)
    assert read_metadata(path)["format_version"] == "alignlens-probe-v1"
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
    other = tiny_gpt2()
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(FingerprintMismatch, match="fingerprint"):
        Attributor.load(path, tmp_path / "other")


@pytest.mark.parametrize("detail", [Detail.SUMMARY, Detail.FULL])
def test_attributor_records(tiny_setup, tmp_path, detail):
    model, host, fac, train_ds, test_ds, _ = tiny_setup
    probe = ProbeModel(_cfg(host)).eval()
    path = save_artifact(tmp_path / "p.safetensors", probe, {"host_fingerprint": host_fingerprint(host), "k": K})
    model.save_pretrained(tmp_path / "host")
    att = Attributor.load(path, tmp_path / "host")
    n = 7
    cap = capture(model, [5, 6, 7], [8, 9, 10, 11, 12, 13, 14])
    with torch.inference_mode():  # as inside an engine worker
        records = att(cap["resid"], cap["resid_mid"], cap["token_ids"], detail=detail)
    assert len(records) == n
    L = host.n_layers
    for r in records:
        assert len(r.depth_gain) == L + 1 and len(r.depth_importance) == L + 1
        assert len(r.family_importance) == L and all(len(x) == 3 for x in r.family_importance)
        assert 0 <= r.crystallization_depth <= L + 1
        assert abs(sum(r.depth_importance) - 1) < 1e-4 or sum(r.depth_importance) == 0
        assert 0 < r.probe_prob <= 1 and r.host_logprob <= 0
        assert (len(r.top_directions) > 0) == (detail == Detail.FULL)
        for d in r.top_directions:
            assert 1 <= d.block <= L and d.family in FAMILIES and 0 <= d.index < K
    # the final-depth readout is the host restricted to candidates: probe_top1 <=> host argmax == y
    logits = host.logits(cap["resid"][:, -1])
    assert [r.probe_top1 for r in records] == (logits.argmax(-1) == cap["token_ids"]).tolist()
    lp = torch.log_softmax(logits, -1).gather(1, cap["token_ids"][:, None]).squeeze(1)
    torch.testing.assert_close(torch.tensor([r.host_logprob for r in records]), lp, rtol=1e-4, atol=1e-4)
    # gains telescope: sum = log p_L(y) + log |C|
    r = records[0]
    assert abs(sum(r.depth_gain) - (torch.log(torch.tensor(r.probe_prob)).item() + torch.log(
        torch.tensor(float(len(set(cap["token_ids"][:1].tolist()) | set(logits[0].topk(8).indices.tolist())))))
        .item())) < 1e-3


def test_attributor_with_engine_logits_matches_its_own(tiny_setup, tmp_path):
    """Handing over the host logits (what the worker does for generated tokens) changes nothing."""
    model, host, fac, train_ds, test_ds, _ = tiny_setup
    probe = ProbeModel(_cfg(host)).eval()
    path = save_artifact(tmp_path / "p.safetensors", probe, {"host_fingerprint": host_fingerprint(host), "k": K})
    model.save_pretrained(tmp_path / "host")
    att = Attributor.load(path, tmp_path / "host")
    cap = capture(model, [5, 6, 7], [8, 9, 10, 11, 12, 13, 14])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13]])).logits[0, 2:]  # rows deciding 8..14
    own = att(cap["resid"], cap["resid_mid"], cap["token_ids"])
    handed = att(cap["resid"], cap["resid_mid"], cap["token_ids"], logits=logits)
    for a, b in zip(own, handed):
        assert a.crystallization_depth == b.crystallization_depth and a.probe_top1 == b.probe_top1
        assert b.host_logprob == pytest.approx(a.host_logprob, abs=1e-4)
        torch.testing.assert_close(torch.tensor(b.family_attribution), torch.tensor(a.family_attribution),
                                   rtol=1e-3, atol=1e-5)
    with pytest.raises(ValueError, match=r"logits must be \[7, "):
        att(cap["resid"], cap["resid_mid"], cap["token_ids"], logits=logits[:, :-1])
