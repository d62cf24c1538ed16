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
from alignlens.probe.model import ProbeConfig, ProbeModel, candidate_set, token_features
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
    assert _rho(model, host, test_ds) > _rho(null, host, test_ds) + 0.15


def _rho(m: ProbeModel, host: Host, ds) -> float:
    """Per-token Spearman of the head's predicted |drop| with the host's |linearized effect|."""
    with torch.no_grad():
        _, pred = m(ds.resid, ds.alpha, ds.g_out, host.W_U[ds.token_ids],
                    token_features(ds.host_logprob, ds.cand_logits))
    return float(spearman(m.attribution(pred[..., 0]).flatten(1), ds.lin.abs().flatten(1)).mean())


def _kl_at(host: Host, r: torch.Tensor, ds, depth: int) -> float:
    """Mean full-vocabulary KL(host || readout of r at `depth`)."""
    host_lp = torch.log_softmax(host.logits(ds.resid[:, -1]), -1)
    lp = torch.log_softmax(host.logits(r[:, depth]), -1)
    return float((host_lp.exp() * (host_lp - lp)).sum(-1).mean())


def test_tuned_lens_beats_the_logit_lens_and_the_levers_train(tiny_setup, tmp_path):
    """The tuned-lens baseline (probe.tuned_lens) learns; the probe variants the evaluation compares
    (activation-only; tuned-lens readout with DLA inputs) train, save, load and serve."""
    _, host, fac, train_ds, test_ds, _ = tiny_setup
    from alignlens.probe.tuned_lens import TunedLensConfig, train_tuned_lens

    lens, summary = train_tuned_lens(host, train_ds, TunedLensConfig(steps=150, batch_size=32, lr=3e-3,
                                                                      negatives=64), top_k=8)
    assert summary["tokens"] == len(train_ds)
    L = host.n_layers
    with torch.no_grad():
        r = lens(test_ds.resid)
    torch.testing.assert_close(r[:, L], test_ds.resid[:, L])  # the last depth is the host
    tuned = sum(_kl_at(host, r, test_ds, d) for d in range(1, L))
    logit_lens = sum(_kl_at(host, test_ds.resid, test_ds, d) for d in range(1, L))
    assert tuned < 0.8 * logit_lens, (tuned, logit_lens)

    tc = TrainConfig(steps=20, batch_size=16, negatives=32)
    act_only, _ = train(host, train_ds, fac, dataclasses.replace(_cfg(host), alignment_features=False), tc,
                        progress=False)
    with torch.no_grad():  # the trunk ignores alpha
        a = act_only.trunk(test_ds.resid, act_only.standardize(test_ds.alpha))
        b = act_only.trunk(test_ds.resid, act_only.standardize(test_ds.alpha * 0 + 3))
    torch.testing.assert_close(a, b)
    lever_cfg = dataclasses.replace(_cfg(host), tuned_lens=True, dla_inputs=True)
    lever, fit = train(host, train_ds, fac, lever_cfg, tc, progress=False)
    assert fit["tuned_lens_init"]["tokens"] == len(train_ds)
    path = save_artifact(tmp_path / "lever.safetensors", lever, {"host_fingerprint": host_fingerprint(host), "k": K})
    loaded, _ = load_artifact(path, host_fingerprint(host))
    att = Attributor(host, fac, loaded, {"host_fingerprint": host_fingerprint(host), "k": K})
    cap = capture(tiny_setup[0], [5, 6, 7], [8, 9, 10])
    records = att(cap["resid"], cap["resid_mid"], cap["token_ids"], detail=Detail.FULL)
    assert len(records) == 3 and all(len(x.family_attribution) == L for x in records)
    assert test_ds.dla is not None and test_ds.dla.shape == (len(test_ds), L, 3)


def test_centred_ablation_loss_scores_the_profile_shape_only():
    """The centred term ignores a per-token offset of the log-magnitudes (the token's overall
    scale) and penalises a change of the profile's shape."""
    from alignlens.probe.train import ablation_loss

    t = torch.randn(4, 5, 3)
    shifted = t + torch.randn(4, 1, 1)  # same shapes, other scales
    plain = ablation_loss(shifted, t, 0.0, 0.5)
    assert ablation_loss(shifted, t, 0.0, 0.5, centred_weight=2.0) == pytest.approx(plain.item(), abs=1e-6)
    reshaped = t + 0.3 * torch.randn(4, 5, 3)
    assert ablation_loss(reshaped, t, 0.0, 0.5, centred_weight=2.0) > ablation_loss(reshaped, t, 0.0, 0.5) + 1e-3


def test_head_retrain_keeps_the_readout_and_learns_the_drops(tiny_setup):
    """`probe train --head-of`: only the importance head changes (so the depth evaluation can be
    reused), and the fresh head learns the ablation labels: it ranks the test tokens' pairs like
    the host's own effect sizes, which the untrained head it restarts from does not."""
    from alignlens.probe.train import readout_state_equal, retrain_head

    _, host, fac, train_ds, test_ds, _ = tiny_setup
    base, _ = train(host, train_ds, fac, _cfg(host), TrainConfig(steps=30, batch_size=16, negatives=32),
                    progress=False)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    import copy

    model, fit = retrain_head(host, train_ds, copy.deepcopy(base), TrainConfig(steps=300, lr=3e-3), progress=False)
    assert fit["head_only"] and fit["steps_done"] == 300
    assert readout_state_equal(model, base)
    assert any(not torch.equal(model.state_dict()[k], before[k]) for k in before if k.startswith("i_"))
    other = ProbeModel(_cfg(host))
    assert not readout_state_equal(other, base)
    untrained = copy.deepcopy(base)
    with torch.no_grad():
        fresh = ProbeModel(_cfg(host))
        for name, p in untrained.named_parameters():
            if name.startswith("i_"):
                p.copy_(fresh.get_parameter(name))
    assert _rho(model, host, test_ds) > _rho(untrained, host, test_ds) + 0.15


def test_readout_retrain_starts_at_the_tuned_lens_and_keeps_the_attributions(tiny_setup, tmp_path):
    """`probe train --readout-of`: the probe gets a frozen tuned lens and a retrained per-depth Out
    on top of it; the trunk, head and statistics stay bit-identical (so the family attributions do
    not move), the lens is the one the evaluation's baseline recipe fits on the same tokens, on test
    tokens the readout is closer to the host than that lens alone (KL summed over depths < L), and
    the artifact round trip keeps everything (the lens as float16 on disk)."""
    import copy

    from alignlens.probe.train import faithfulness_state_equal, retrain_readout
    from alignlens.probe.tuned_lens import TunedLensConfig, train_tuned_lens

    _, host, fac, train_ds, test_ds, _ = tiny_setup
    base, _ = train(host, train_ds, fac, _cfg(host), TrainConfig(steps=200, batch_size=32, lr=3e-3, negatives=64),
                    progress=False)
    lens_cfg = TunedLensConfig(steps=60, batch_size=32, lr=3e-3, negatives=64)
    model, fit = retrain_readout(host, train_ds, copy.deepcopy(base), lens_cfg,
                                 TrainConfig(steps=300, batch_size=32, lr=3e-3, negatives=64), progress=False)
    assert model.cfg.tuned_lens and model.cfg.depth_out and fit["readout_only"] and fit["steps_done"] == 300
    assert len(fit["depth_weights"]) == host.n_layers and abs(sum(fit["depth_weights"]) / host.n_layers - 1) < 1e-3
    assert faithfulness_state_equal(model, base) and not faithfulness_state_equal(model, ProbeModel(_cfg(host)))
    lens, _ = train_tuned_lens(host, train_ds, lens_cfg, top_k=8)  # the baseline, fitted apart: the same lens
    torch.testing.assert_close(model.lens.weight, lens.weight)
    val = fit["validation"]
    assert val["tokens"] > 0 and len(val["subset_kl_probe"]) == host.n_layers
    L = host.n_layers
    with torch.no_grad():
        r_lens = lens(test_ds.resid)
        r, pred = model(test_ds.resid, test_ds.alpha, test_ds.g_out, host.W_U[test_ds.token_ids],
                        token_features(test_ds.host_logprob, test_ds.cand_logits))
        _, pred_base = base(test_ds.resid, test_ds.alpha, test_ds.g_out, host.W_U[test_ds.token_ids],
                            token_features(test_ds.host_logprob, test_ds.cand_logits))
    torch.testing.assert_close(pred, pred_base, rtol=0, atol=0)  # attributions unchanged
    assert sum(_kl_at(host, r, test_ds, d) for d in range(L)) < sum(_kl_at(host, r_lens, test_ds, d) for d in range(L))

    path = save_artifact(tmp_path / "readout.safetensors", model, {"host_fingerprint": host_fingerprint(host), "k": K})
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        assert f.get_tensor("lens.weight").dtype == torch.float16 and f.get_tensor("out.weight").dtype == torch.float32
    loaded, _ = load_artifact(path, host_fingerprint(host))
    assert loaded.cfg.depth_out and loaded.lens.weight.dtype == torch.float32
    torch.testing.assert_close(loaded.lens.weight, model.lens.weight, rtol=1e-3, atol=1e-4)
    assert faithfulness_state_equal(loaded, model)
    assert torch.equal(loaded.out.weight, model.out.weight)

    shared, fit_shared = retrain_readout(host, train_ds, copy.deepcopy(base), lens_cfg, TrainConfig(steps=5),
                                         lens=model.lens, depth_out=False, balance_depths=False, progress=False)
    assert not shared.cfg.depth_out and fit_shared["depth_weights"] is None and shared.out.weight.shape == (
        host.d_model, _cfg(host).width)
    one_prompt = train_ds.subset(torch.nonzero(train_ds.prompt_index == 0).squeeze(1))
    with pytest.raises(ValueError, match="validation prompt"):
        retrain_readout(host, one_prompt, copy.deepcopy(base), lens_cfg, TrainConfig(steps=5), lens=model.lens,
                        progress=False)


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
        assert 0 < r.readout_prob <= 1 and r.host_logprob <= 0
        assert (len(r.top_directions) > 0) == (detail == Detail.FULL)
        for d in r.top_directions:
            assert 1 <= d.block <= L and d.family in FAMILIES and 0 <= d.index < K
    logits = host.logits(cap["resid"][:, -1])
    lp = torch.log_softmax(logits, -1).gather(1, cap["token_ids"][:, None]).squeeze(1)
    torch.testing.assert_close(torch.tensor([r.host_logprob for r in records]), lp, rtol=1e-4, atol=1e-4)
    # readout_* are the probe's depth L-1 (untrained here: the logit lens on h_{L-1} over C)
    ids, valid = candidate_set(logits.topk(8).indices, cap["token_ids"], 8)
    lens = torch.einsum("nd,ncd->nc", host.final_norm(cap["resid"][:, -2]), host.W_U[ids]).masked_fill(~valid, -1e9)
    is_y = (ids == cap["token_ids"][:, None]) & valid
    assert [r.readout_top1 for r in records] == is_y.gather(1, lens.argmax(1, keepdim=True)).squeeze(1).tolist()
    p_lens = (torch.softmax(lens, -1) * is_y).sum(1)
    torch.testing.assert_close(torch.tensor([r.readout_prob for r in records]), p_lens, rtol=1e-4, atol=1e-5)
    # gains telescope: sum = log p_L(y) over C + log |C|
    host_c = torch.log_softmax(torch.einsum("nd,ncd->nc", host.final_norm(cap["resid"][:, -1]),
                                            host.W_U[ids]).masked_fill(~valid, -1e9), -1)
    for t, r in enumerate(records):
        expect = (host_c[t] * is_y[t]).sum() + torch.log(valid[t].sum().float())
        assert abs(sum(r.depth_gain) - expect.item()) < 1e-3
    # direct logit attribution: exact split of logit_y - mean candidate logit (probe/dla.py)
    for t, r in enumerate(records):
        assert len(r.dla_attn) == L and len(r.dla_mlp) == L
        assert abs(r.dla_embed + sum(r.dla_attn) + sum(r.dla_mlp) - r.dla_total) < 1e-4
        full = logits[t][ids[t][valid[t]]]
        assert r.dla_total == pytest.approx((logits[t, cap["token_ids"][t]] - full.mean()).item(), abs=1e-4)
        assert (len(r.dla_attn_out_directions) == L) == (detail == Detail.FULL)
        if detail == Detail.FULL:  # the top-k part of each block's attention write
            assert all(len(row) == K for row in r.dla_attn_out_directions)


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
        assert a.crystallization_depth == b.crystallization_depth and a.readout_top1 == b.readout_top1
        assert b.host_logprob == pytest.approx(a.host_logprob, abs=1e-4)
        torch.testing.assert_close(torch.tensor(b.family_attribution), torch.tensor(a.family_attribution),
                                   rtol=1e-3, atol=1e-5)
    with pytest.raises(ValueError, match=r"logits must be \[7, "):
        att(cap["resid"], cap["resid_mid"], cap["token_ids"], logits=logits[:, :-1])


def test_spearman_average_ranks_ties_and_constant_rows():
    """probe.stats.spearman (evaluation and online verification) against a direct definition."""
    def reference(x: list[float], y: list[float]) -> float:
        def ranks(v: list[float]) -> torch.Tensor:
            return torch.tensor([sum(w < t for w in v) + (sum(w == t for w in v) - 1) / 2 for t in v],
                                dtype=torch.float64)
        ra, rb = ranks(x), ranks(y)
        ra, rb = ra - ra.mean(), rb - rb.mean()
        return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-12))

    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (20, 30), generator=g).float()  # many ties
    b = torch.randn(20, 30, generator=g)
    b[:, :8] = 1.0
    want = torch.tensor([reference(a[i].tolist(), b[i].tolist()) for i in range(20)])
    torch.testing.assert_close(spearman(a, b), want.float(), rtol=0, atol=1e-6)
    assert spearman(torch.ones(2, 5), torch.randn(2, 5)).tolist() == [0.0, 0.0]
