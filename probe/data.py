"""Training data: `alignlens trace` files in, tensors the probe trains on out.

Trace format (one safetensors file; what `alignlens trace` and probe.collect_replica write), per
prompt i:
    i.prompt_token_ids [P]          int64
    i.token_ids        [T]          int64, emitted tokens
    i.resid            [T, L+1, d]  row t = activations at the position whose decision is token t
    i.resid_mid        [T, L, d]
Host-gradient labels (probe.collect_replica.label_gradients, every row) in `<trace>.gradients.safetensors`:
    i.gamma            [T, L, 3, k] float32, d log p(y)/d (family vector), projected on each basis
Ablation labels (probe.collect_replica.label_trace, a sample of rows) in `<trace>.labels.safetensors`:
    i.rows             [n]          int64, which rows t of prompt i were ablated
    i.drop             [n, L, 3]    float32 nats, log p(y) clean - ablated (probe.fast_ablation)
    i.base_logprob     [n]          float32 nats, clean host log p(y) on the replica

`build_dataset` turns these into one `TokenSet` in memory (features and host targets computed
here, once, so training epochs only run the probe).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from alignlens.probe.dla import direct_logit_attribution, pair_dla
from alignlens.probe.features import alignment_features, output_gradient_on_bases
from alignlens.probe.host import Host
from alignlens.probe.model import candidate_set, vocab_logsumexp
from alignlens.probe.names import FAMILY_INDEX, RESID, RESID_MID
from alignlens.probe.svd import READERS, SvdFactors

log = logging.getLogger(__name__)


@dataclass
class TokenSet:
    """N decision positions with everything training and evaluation need."""

    resid: Tensor  # [N, L+1, d] float32, h_0..h_L
    alpha: Tensor  # [N, L, 3, k] float32
    g_out: Tensor  # [N, L, 3, k] float32, output gradient on each basis (probe.features.output_gradient_on_bases)
    token_ids: Tensor  # [N] int64, emitted token y
    cand_ids: Tensor  # [N, K] int64, host top-K tokens (descending)
    cand_logits: Tensor  # [N, K] float32, host logits of those tokens
    host_logprob: Tensor  # [N] float32, host log p(y) over the full vocabulary
    prompt_index: Tensor  # [N] int64, which trace prompt the row came from
    dla: Tensor | None = None  # [N, L, 3] signed direct logit attribution per pair (probe.dla.pair_dla)
    lin: Tensor | None = None  # [N, L, 3] nats, host linearized ablation effect gamma . comp (NaN where absent)
    drop: Tensor | None = None  # [N, L, 3] ablation labels (NaN where a row was not ablated)

    def __len__(self) -> int:
        return self.token_ids.shape[0]

    def subset(self, idx: Tensor) -> "TokenSet":
        return TokenSet(**{name: (None if v is None else v[idx]) for name, v in vars(self).items()})

    @property
    def labeled(self) -> Tensor:
        """[N] bool, rows that carry ablation labels."""
        if self.drop is None:
            return torch.zeros(len(self), dtype=torch.bool)
        return ~torch.isnan(self.drop).any(dim=(1, 2))

    @property
    def has_lin(self) -> Tensor:
        """[N] bool, rows that carry host-gradient (linearized-effect) labels."""
        if self.lin is None:
            return torch.zeros(len(self), dtype=torch.bool)
        return ~torch.isnan(self.lin).any(dim=(1, 2))


def write_trace(results: list[dict[str, Tensor]], path: str | Path, metadata: dict) -> Path:
    """Write per-prompt dicts {prompt_token_ids, token_ids, resid, resid_mid} in the trace format."""
    tensors = {f"{i}.{name}": t.contiguous() for i, r in enumerate(results) for name, t in r.items()}
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata=meta)
    return out


def labels_path(trace_path: str | Path) -> Path:
    p = Path(trace_path)
    return p.with_name(p.name.removesuffix(".safetensors") + ".labels.safetensors")


def gradients_path(trace_path: str | Path) -> Path:
    p = Path(trace_path)
    return p.with_name(p.name.removesuffix(".safetensors") + ".gradients.safetensors")


def prompt_indices(trace_path: str | Path) -> list[int]:
    """The prompt indices i present in a trace file, sorted."""
    with safe_open(str(trace_path), "pt") as f:
        return sorted({int(k.split(".", 1)[0]) for k in f.keys() if k.endswith(".token_ids")})


def read_prompt(trace_path: str | Path, i: int) -> dict[str, Tensor]:
    """The four tensors of prompt i of a trace file."""
    with safe_open(str(trace_path), "pt") as f:
        return {name: f.get_tensor(f"{i}.{name}")
                for name in ("prompt_token_ids", "token_ids", RESID, RESID_MID)}


def decision_inputs(rec: dict[str, Tensor], rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """For token rows `rows` [R] of one trace prompt: (the full sequence prompt + tokens [P+T], the
    positions deciding those tokens [R] (the one before each: P - 1 + row), their token ids [R])."""
    P = rec["prompt_token_ids"].shape[0]
    seq = torch.cat([rec["prompt_token_ids"], rec["token_ids"]])
    return seq, P - 1 + rows, rec["token_ids"][rows]


def trace_metadata(trace_path: str | Path) -> dict:
    with safe_open(str(trace_path), "pt") as f:
        return dict(f.metadata() or {})


@torch.no_grad()
def host_targets(host: Host, h_last: Tensor, token_ids: Tensor, top_k: int) -> tuple[Tensor, Tensor, Tensor]:
    """From h_L [N, d]: host top-K ids [N, K], their logits [N, K] and log p(y) [N] (full vocab)."""
    logits = host.logits(h_last)  # [N, vocab]
    cand_logits, cand_ids = logits.topk(top_k, dim=-1)
    logp_y = logits.gather(1, token_ids[:, None]).squeeze(1) - vocab_logsumexp(logits)
    return cand_ids, cand_logits, logp_y


def component_scale(factors: SvdFactors) -> Tensor:
    """[L, 3, k]: comp = alpha / scale is the family vector's coordinate in its basis (sigma for
    the readers, whose alpha carries sigma; 1 for attn_out)."""
    scale = torch.ones_like(factors.sigma)
    readers = [FAMILY_INDEX[f] for f in READERS]
    scale[:, readers] = factors.sigma[:, readers]
    return scale


def _load_all(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        return {}
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@torch.no_grad()
def build_dataset(host: Host, factors: SvdFactors, trace_paths: list[str | Path], top_k: int = 32,
                  max_tokens: int | None = None, chunk: int = 256) -> TokenSet:
    """Read trace files (and their labels / gradients files when present) into one TokenSet.

    top_k must be the probe's K: it defines the candidate set and the softmax expectation inside
    g_out. Features and host targets are computed in chunks of `chunk` rows.
    """
    names = (RESID, "alpha", "g_out", "token_ids", "cand_ids", "cand_logits", "host_logprob", "prompt_index",
             "lin", "drop", "dla")
    parts: dict[str, list[Tensor]] = {n: [] for n in names}
    total, offset = 0, 0
    L = host.n_layers
    comp_scale = component_scale(factors)
    for path in trace_paths:
        labels, grads = _load_all(labels_path(path)), _load_all(gradients_path(path))
        indices = prompt_indices(path)
        for i in indices:
            rec = read_prompt(path, i)
            T = rec["token_ids"].shape[0]
            if max_tokens is not None and total + T > max_tokens:
                T = max_tokens - total
            if T <= 0:
                break
            resid, mid, ys = rec[RESID][:T].float(), rec[RESID_MID][:T].float(), rec["token_ids"][:T]
            for s in range(0, T, chunk):
                sl = slice(s, s + chunk)
                alpha = alignment_features(host, factors.proj, resid[sl], mid[sl])
                c_ids, c_logits, lp_y = host_targets(host, resid[sl, L], ys[sl], top_k)
                parts["alpha"].append(alpha)
                parts["g_out"].append(output_gradient_on_bases(host, factors.basis, resid[sl, L], ys[sl], c_ids,
                                                               c_logits))
                parts["cand_ids"].append(c_ids)
                parts["cand_logits"].append(c_logits)
                parts["host_logprob"].append(lp_y)
                ids, valid = candidate_set(c_ids, ys[sl], top_k)
                d = direct_logit_attribution(host, resid[sl], mid[sl], ys[sl], ids, valid)
                parts["dla"].append(pair_dla(d["dla_attn"], d["dla_mlp"]))
            parts[RESID].append(resid)
            parts["token_ids"].append(ys)
            parts["prompt_index"].append(torch.full((T,), offset + i, dtype=torch.long))
            drop = torch.full((T, L, 3), float("nan"))
            if f"{i}.rows" in labels:
                rows = labels[f"{i}.rows"]
                keep = rows < T
                drop[rows[keep]] = labels[f"{i}.drop"][keep].float()
            parts["drop"].append(drop)
            if f"{i}.gamma" in grads:
                comp = torch.cat(parts["alpha"][-((T + chunk - 1) // chunk):]) / comp_scale
                parts["lin"].append((grads[f"{i}.gamma"][:T].float() * comp).sum(-1))
            else:
                parts["lin"].append(torch.full((T, L, 3), float("nan")))
            total += T
        offset += (max(indices) + 1) if indices else 0
        if max_tokens is not None and total >= max_tokens:
            break
    if total == 0:
        raise ValueError(f"no tokens found in {', '.join(map(str, trace_paths))}")
    ds = TokenSet(**{n: torch.cat(v) for n, v in parts.items()})
    if not ds.labeled.any():
        ds.drop = None
    if not ds.has_lin.any():
        ds.lin = None
    log.info("data: %d tokens from %d prompts (%d with gradient labels, %d with ablation labels)", len(ds),
             int(ds.prompt_index.unique().numel()), int(ds.has_lin.sum()), int(ds.labeled.sum()))
    return ds
