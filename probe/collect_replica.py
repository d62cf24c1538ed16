"""Data collection on the transformers replica (no vLLM): generation, capture, ablation labels.

Phases:
1. generate — sample continuations with transformers `generate` (left-padded batches, fixed seed);
2. capture  — teacher-forced forward of prompt + continuation with probe.replica hooks; keep the rows
              whose decision is an emitted token (row t = position P-1+t);
3. write    — the trace format of probe.data (the same file `alignlens trace` writes);
4. label    — `label_trace`: for a sample of rows per prompt, the host's own ablation drop of every
              (block, family) (probe.fast_ablation, checked against probe.ablation in tests), written beside the trace as <trace>.labels.safetensors.

Phase 4 also runs on traces written by vLLM (`alignlens probe collect`), which is how the shipped
probe's labels are made: the ablations must run on the replica, which vLLM cannot do.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm import tqdm

from alignlens.probe.data import decision_inputs, gradients_path, labels_path, prompt_indices, read_prompt, write_trace
from alignlens.probe.fast_ablation import FastAblator
from alignlens.probe.names import RESID, RESID_MID
from alignlens.probe.replica import capture_replica

log = logging.getLogger(__name__)


@torch.no_grad()
def generate(model: nn.Module, prompt_ids: list[list[int]], max_tokens: int, temperature: float,
             seed: int = 0, batch_size: int = 8, eos_token_id: int | None = None,
             progress: bool = True) -> list[list[int]]:
    """Continuations (token ids, EOS included when emitted, nothing after it) of each prompt."""
    out: list[list[int]] = []
    pad = 0
    batches = range(0, len(prompt_ids), batch_size)
    for b in tqdm(batches, desc="generate", disable=not progress):
        chunk = prompt_ids[b:b + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        torch.manual_seed(seed + b)
        kwargs = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else \
            dict(do_sample=False)
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=1,
                             pad_token_id=pad, eos_token_id=eos_token_id, **kwargs)[:, width:]
        for row in gen.tolist():
            if eos_token_id is not None and eos_token_id in row:
                row = row[:row.index(eos_token_id) + 1]
            out.append(row)
    return out


@torch.no_grad()
def capture(model: nn.Module, prompt_ids: list[int], token_ids: list[int]) -> dict[str, Tensor]:
    """Trace record of one prompt: rows for the decisions of `token_ids` (see probe.data)."""
    seq = torch.tensor(prompt_ids + token_ids)
    resid, mid = capture_replica(model, seq)
    P, T = len(prompt_ids), len(token_ids)
    rows = slice(P - 1, P - 1 + T)
    return {"prompt_token_ids": torch.tensor(prompt_ids), "token_ids": torch.tensor(token_ids),
            RESID: resid[rows].contiguous(), RESID_MID: mid[rows].contiguous()}


def collect(model: nn.Module, prompt_ids: list[list[int]], max_tokens: int, temperature: float,
            out_path: str | Path, seed: int = 0, eos_token_id: int | None = None, batch_size: int = 8,
            metadata: dict | None = None, progress: bool = True) -> Path:
    """Generate, capture and write a trace file of all prompts (phases 1-3)."""
    start = time.perf_counter()
    continuations = generate(model, prompt_ids, max_tokens, temperature, seed, batch_size, eos_token_id, progress)
    records = [capture(model, p, c) for p, c in tqdm(list(zip(prompt_ids, continuations)), desc="capture",
                                                      disable=not progress)]
    meta = {"format": "alignlens-trace-v1", "source": "transformers-replica", "max_tokens": max_tokens,
            "temperature": temperature, "seed": seed, "prompts": len(prompt_ids),
            "seconds": round(time.perf_counter() - start, 2), **(metadata or {})}
    return write_trace(records, out_path, meta)


def label_trace(model: nn.Module, basis: Tensor, attn_out_bias: Tensor, trace_path: str | Path,
                rows_per_prompt: int, seed: int = 0, progress: bool = True,
                save_every: int = 20) -> Path:
    """Phase 4: ablation labels for `rows_per_prompt` random rows of every prompt of a trace.

    basis [L, 3, k, d] (probe.svd), attn_out_bias [L, d]. A prompt's rows are the first
    `rows_per_prompt` of one seeded permutation of its rows, so a larger `rows_per_prompt` is a
    superset of a smaller one with the same seed (a prompt with T <= rows_per_prompt rows is
    labelled whole). Resumable and extendable: rows already in an existing labels file are kept and
    not ablated again, only the missing ones are (so rerunning with more rows per prompt tops the
    labels up); the file is rewritten every `save_every` prompts.
    """
    labels = _LabelFile(labels_path(trace_path), trace_path, save_every)
    ablator = FastAblator(model, basis, attn_out_bias)
    gen = torch.Generator().manual_seed(seed)
    for i in tqdm(prompt_indices(trace_path), desc="ablation labels", disable=not progress):
        rec = read_prompt(trace_path, i)
        T = rec["token_ids"].shape[0]
        rows = torch.randperm(T, generator=gen)[:rows_per_prompt].sort().values  # drawn even if skipped
        have = labels.get(f"{i}.rows", torch.empty(0, dtype=torch.long))
        missing = rows[~torch.isin(rows, have)]
        if missing.numel() == 0:
            continue
        base, drop = ablator.drops(*decision_inputs(rec, missing))
        new = {"rows": missing, "drop": drop.float(), "base_logprob": base.float()}
        if have.numel():  # merge with the rows labelled before, in row order
            merged = {k: torch.cat([labels.get(f"{i}.{k}"), v]) for k, v in new.items()}
            order = merged["rows"].argsort()
            new = {k: v[order] for k, v in merged.items()}
        labels.add({f"{i}.{k}": v for k, v in new.items()})
    return labels.save()


class _LabelFile:
    """A resumable per-prompt labels file: entries already on disk are loaded, `add` rewrites the
    file every `save_every` prompts, `save` writes it and returns its path."""

    def __init__(self, path: Path, trace_path: str | Path, save_every: int):
        self.path, self.save_every, self.pending = path, save_every, 0
        self.metadata = {"trace": Path(trace_path).name}
        self.entries: dict[str, Tensor] = {}
        if path.is_file():
            from safetensors.torch import load_file
            self.entries = load_file(str(path))

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def get(self, key: str, default: Tensor | None = None) -> Tensor | None:
        """The entry `key` (e.g. "12.rows"), or `default` when it was never labelled."""
        return self.entries.get(key, default)

    def add(self, entries: dict[str, Tensor]) -> None:
        self.entries.update(entries)
        self.pending += 1
        if self.pending >= self.save_every:
            self.save()

    def save(self) -> Path:
        """Write atomically (a temporary file renamed over the old one): a reader, e.g. training
        on the trace while labelling continues, sees the previous file or the new one, never half."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        save_file(self.entries, str(tmp), metadata=self.metadata)
        tmp.replace(self.path)
        self.pending = 0
        return self.path


def label_gradients(model: nn.Module, basis: Tensor, attn_out_bias: Tensor, trace_path: str | Path,
                    progress: bool = True, save_every: int = 50, max_rows: int = 64) -> Path:
    """Phase 5: for EVERY row of a trace, the host's gradient of log p(y) w.r.t. each family's vector
    at the decision position, projected on its basis (gamma [T, L, 3, k], probe.fast_ablation
    .FastAblator.linearized), written to <trace>.gradients.safetensors. One backward pass per chunk
    of `max_rows` rows of a sequence, ~20x cheaper per row than the ablations. Resumable."""
    labels = _LabelFile(gradients_path(trace_path), trace_path, save_every)
    ablator = FastAblator(model, basis, attn_out_bias)
    for i in tqdm(prompt_indices(trace_path), desc="gradient labels", disable=not progress):
        if f"{i}.gamma" in labels:
            continue
        rec = read_prompt(trace_path, i)
        T = rec["token_ids"].shape[0]
        parts = []
        for s in range(0, T, max_rows):
            parts.append(ablator.linearized(*decision_inputs(rec, torch.arange(s, min(T, s + max_rows))))[1])
        labels.add({f"{i}.gamma": torch.cat(parts).float().contiguous()})
    return labels.save()
