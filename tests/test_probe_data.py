"""Replica collection -> trace file -> labels -> TokenSet, on a tiny random model."""

from __future__ import annotations

import torch

from alignlens.probe.collect_replica import collect, label_gradients, label_trace
from alignlens.probe.data import build_dataset, gradients_path, labels_path, read_prompt
from alignlens.probe.host import Host
from alignlens.probe.svd import compute_factors
from tests.support.tiny import tiny_llama

K = 8


def test_collect_label_build(tmp_path):
    model = tiny_llama()
    host = Host.from_model(model)
    fac = compute_factors(host, K)
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13], [20]]
    path = collect(model, prompts, max_tokens=6, temperature=1.0, out_path=tmp_path / "t.safetensors",
                   seed=0, progress=False)
    rec = read_prompt(path, 1)
    assert rec["token_ids"].shape == (6,) and rec["resid"].shape == (6, host.n_layers + 1, host.d_model)
    # row t decides token t: the host's logits at that row are the ones the token was sampled from
    seq = torch.tensor(prompts[1] + rec["token_ids"].tolist())
    with torch.no_grad():
        logits = model(input_ids=seq.view(1, -1)).logits[0, len(prompts[1]) - 1:-1]
    torch.testing.assert_close(host.logits(rec["resid"][:, -1]), logits, rtol=1e-4, atol=1e-4)

    label_trace(model, fac.basis, host.attn_out_bias, path, rows_per_prompt=2, progress=False)
    label_gradients(model, fac.basis, host.attn_out_bias, path, progress=False, max_rows=4)
    assert labels_path(path).is_file() and gradients_path(path).is_file()
    ds = build_dataset(host, fac, [path], top_k=5)
    assert len(ds) == 18 and ds.alpha.shape == (18, host.n_layers, 3, K)
    assert ds.cand_ids.shape == (18, 5) and int(ds.labeled.sum()) == 6 and bool(ds.has_lin.all())
    assert ds.lin.shape == (18, host.n_layers, 3) and ds.alpha.shape == ds.g_out.shape
    torch.testing.assert_close(ds.host_logprob[6:12],
                               torch.log_softmax(logits, -1).gather(1, rec["token_ids"][:, None]).squeeze(1),
                               rtol=1e-4, atol=1e-4)


def test_labels_top_up_to_more_rows_per_prompt(tmp_path):
    """Rerunning label_trace with more rows per prompt keeps the rows labelled before and ablates
    only the missing ones; the result equals labelling the larger set from scratch."""
    from safetensors.torch import load_file

    model = tiny_llama()
    host = Host.from_model(model)
    fac = compute_factors(host, K)
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
    path = collect(model, prompts, max_tokens=6, temperature=1.0, out_path=tmp_path / "t.safetensors",
                   seed=0, progress=False)
    label_trace(model, fac.basis, host.attn_out_bias, path, rows_per_prompt=2, progress=False)
    small = load_file(str(labels_path(path)))
    label_trace(model, fac.basis, host.attn_out_bias, path, rows_per_prompt=4, progress=False)
    topped = load_file(str(labels_path(path)))
    labels_path(path).unlink()
    label_trace(model, fac.basis, host.attn_out_bias, path, rows_per_prompt=4, progress=False)
    fresh = load_file(str(labels_path(path)))
    for i in (0, 1):
        assert topped[f"{i}.rows"].tolist() == sorted(topped[f"{i}.rows"].tolist()) and topped[f"{i}.rows"].numel() == 4
        assert set(small[f"{i}.rows"].tolist()) <= set(topped[f"{i}.rows"].tolist())
        kept = torch.isin(topped[f"{i}.rows"], small[f"{i}.rows"])
        assert torch.equal(topped[f"{i}.drop"][kept], small[f"{i}.drop"])  # not recomputed
        assert torch.equal(topped[f"{i}.rows"], fresh[f"{i}.rows"])
        torch.testing.assert_close(topped[f"{i}.drop"], fresh[f"{i}.drop"], rtol=1e-4, atol=1e-5)  # batch rounding
    assert int(build_dataset(host, fac, [path], top_k=5).labeled.sum()) == 8
