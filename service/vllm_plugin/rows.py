"""Row mapping: which rows of an engine step decide which tokens.

vLLM runs a step over a flat batch of rows (all requests' new tokens, concatenated). The row at
sequence position p decides the token at position p+1, so:
  - a generation request decides one token per step, from its last row, and only once its
    prompt is fully computed (a chunked-prefill piece that ends inside the prompt samples
    nothing); the token is known after sampling;
  - a teacher-forced replay (Audit) decides every completion token from the row before it; those
    rows may span several prefill chunks, and the tokens are known up front.
Pure bookkeeping on plain numbers: no tensors, no vLLM calls (the batch comes as a BatchView).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alignlens.probe.record import Detail
from alignlens.service.engine.wire import CaptureOptions, Kind
from alignlens.service.vllm_plugin.internals import BatchView


@dataclass
class Row:
    """One captured row: the decision of one token of one request."""

    batch_index: int  # position of the request in the input batch (sampler row)
    rid: str
    kind: Kind
    index: int  # output index (GEN) or completion index (REPLAY)
    token: int | None  # known for REPLAY; filled after sampling for GEN
    detail: Detail
    ship_resid: bool
    logits: torch.Tensor | None = None  # GEN: the host's logits [V] for this row, copied before sampling


def select_rows(batch: BatchView, options: list[CaptureOptions | None],
                prompt_ids: list[list[int] | None]) -> tuple[list[Row], list[int]]:
    """(rows, flat row indices) of one step. `options[i]` / `prompt_ids[i]`: request i's capture
    options (None: not captured) and, for replays, its prompt token ids (prompt + completion)."""
    rows: list[Row] = []
    index: list[int] = []
    for i, opts in enumerate(options):
        if opts is None or not opts.rows:
            continue
        start, end = int(batch.query_start[i]), int(batch.query_start[i + 1])
        pos0 = int(batch.computed[i])
        n_prompt = int(batch.n_prompt[i])
        if opts.replay_from is not None:
            ids = prompt_ids[i]
            # row at position p decides prompt token p+1; keep p+1 in [replay_from, n_prompt)
            lo = max(start, start + (opts.replay_from - 1 - pos0))
            hi = min(end, start + (n_prompt - 1 - pos0))
            for r in range(lo, hi):
                p = pos0 + (r - start)
                rows.append(Row(i, opts.rid, Kind.REPLAY, p + 1 - opts.replay_from, ids[p + 1], opts.detail,
                                opts.resid))
                index.append(r)
            continue
        out_index = pos0 + (end - start) - n_prompt  # (last position + 1) - prompt tokens
        if out_index >= 0:  # negative: a chunked-prefill piece that samples nothing
            rows.append(Row(i, opts.rid, Kind.GEN, out_index, None, opts.detail, opts.resid))
            index.append(end - 1)
    return rows, index


def join_sampled(rows: list[Row], sampled: list[int]) -> None:
    """Fill in the sampled token of each GEN row (-1 where the sampler produced none)."""
    for r in rows:
        if r.kind == Kind.GEN:
            r.token = int(sampled[r.batch_index]) if r.batch_index < len(sampled) else -1


def attributed_gen_rows(rows: list[Row], n_logit_rows: int) -> list[Row]:
    """GEN rows that asked for attribution and have a row in the sampler's logits."""
    return [r for r in rows if r.kind == Kind.GEN and r.detail > Detail.NONE and r.batch_index < n_logit_rows]
