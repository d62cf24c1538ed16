"""Compare captured rows with a teacher-forced transformers forward of the same tokens."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from alignlens.probe.replica import capture_replica, decoder_layers


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def load_replica(path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def final_head(model):
    _layers, arch = decoder_layers(model)
    norm = model.transformer.ln_f if arch == "gpt2" else model.model.norm
    return lambda h: model.lm_head(norm(h))


@torch.no_grad()
def check_rows(model, prompt_ids, token_ids, resid, resid_mid, tol=1e-4) -> dict:
    """Assert captured rows equal the replica's; returns the errors for reporting.

    resid [T, L+1, d] / resid_mid [T, L, d]: row t decides token_ids[t].
    """
    ids = torch.cat([torch.as_tensor(prompt_ids), torch.as_tensor(token_ids)]).long()
    ref_resid, ref_mid = capture_replica(model, ids)
    rows = torch.arange(len(prompt_ids) - 1, len(prompt_ids) - 1 + len(token_ids))
    e_resid = rel_err(resid, ref_resid[rows])
    e_mid = rel_err(resid_mid, ref_mid[rows])
    assert resid.shape == ref_resid[rows].shape and resid_mid.shape == ref_mid[rows].shape
    assert resid.abs().sum() > 0 and resid_mid.abs().sum() > 0, "captured nothing"
    assert e_resid <= tol, f"resid relative error {e_resid:.2e} > {tol}"
    assert e_mid <= tol, f"resid_mid relative error {e_mid:.2e} > {tol}"
    return {"resid": e_resid, "resid_mid": e_mid}


@torch.no_grad()
def greedy_from_final(model, resid: torch.Tensor) -> torch.Tensor:
    """Tokens the host would choose from the captured final residual h_L."""
    return final_head(model)(resid[:, -1].float()).argmax(-1)
