"""Per-request interventions inside the model's forward (METHOD.md sections 6.2 and 7).

Every block of a capture model carries an `InterventionHooks` module with two buffers:
    basis [3, K, d]        the (block, family)'s top-K singular directions as orthonormal rows
                           (probe.svd.SvdFactors.basis: V_k^T for qkv / mlp_in, U_k^T for attn_out),
                           loaded once at attach (zeros until then: no effect)
    coef  [3, T, K]        per flat row of the step and direction: scale - 1 (0 = untouched),
                           T = the engine's token budget per step
and the block's forward applies, for every row at once,
    readers (qkv, mlp_in):  x <- x + ((x B^T) * coef) B                 x: the normed input the family reads
    writer (attn_out):      y <- y + (((y - b) B^T) * coef) B           y: the sublayer output, b its bias
which for a row whose coef is (s - 1) on directions D and 0 elsewhere is exactly x + (s - 1) B_D^T B_D x.
Rows of requests without interventions have coef 0 and are unchanged, so requests in one batch
never affect each other. The buffers keep their storage for the engine's life, so the compiled
graph (and CUDA graphs) read the values written before each step; the price when no request
intervenes is 4 K d multiply-adds per row per family (about 1 % of a SmolLM2-135M step), paid to
keep one compiled graph. `ALIGNLENS_INTERVENTIONS=0` builds the model without the hooks.

Before each forward, `prepare_step` writes this step's coefficients from the requests' options
(wire.Intervention: block, family, directions, scale, positions) and clears the last step's.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from alignlens.probe.names import DEFAULT_K
from alignlens.service.engine.wire import CaptureOptions
from alignlens.service.vllm_plugin.internals import BatchView

ENV = "ALIGNLENS_INTERVENTIONS"
QKV, ATTN_OUT, MLP_IN = 0, 1, 2  # probe.names.FAMILIES order
BASIS_K = DEFAULT_K  # directions per (block, family) the hooks hold; a smaller served k leaves rows 0


def enabled() -> bool:
    """Whether capture models are built with intervention hooks (ALIGNLENS_INTERVENTIONS, default on)."""
    return os.environ.get(ENV, "1") != "0"


class InterventionHooks(nn.Module):
    """One block's intervention buffers and the two operations its forward applies."""

    def __init__(self, d_model: int, max_tokens: int, k: int = BASIS_K):
        super().__init__()
        self.register_buffer("basis", torch.zeros(3, k, d_model), persistent=False)
        self.register_buffer("coef", torch.zeros(3, max_tokens, k), persistent=False)
        self.register_buffer("out_bias", torch.zeros(d_model), persistent=False)

    def read(self, x: torch.Tensor, family: int) -> torch.Tensor:
        """x [n, d], the normed input family `family` (QKV or MLP_IN) reads -> the intervened x."""
        basis = self.basis[family].to(x.dtype)
        return x + ((x @ basis.T) * self.coef[family, : x.shape[0]].to(x.dtype)) @ basis

    def write(self, y: torch.Tensor) -> torch.Tensor:
        """y [n, d], the attention sublayer's output (with its bias) -> the intervened y."""
        basis = self.basis[ATTN_OUT].to(y.dtype)
        v = y - self.out_bias.to(y.dtype)
        return y + ((v @ basis.T) * self.coef[ATTN_OUT, : y.shape[0]].to(y.dtype)) @ basis


def attach_hooks(layers, d_model: int, max_tokens: int) -> None:
    """Give every block in `layers` its hooks (model construction, before compilation)."""
    for layer in layers:
        layer.alignlens_iv = InterventionHooks(d_model, max_tokens)


def find_hooks(model: nn.Module) -> list[InterventionHooks]:
    """The model's hooks in block order (empty when built without them)."""
    return [m for m in model.modules() if isinstance(m, InterventionHooks)]


@torch.no_grad()
def load_bases(hooks: list[InterventionHooks], basis: torch.Tensor, out_bias: torch.Tensor | None) -> int:
    """Copy basis [L, 3, k, d] (and the attn_out bias [L, d]) into the hooks; returns the k served."""
    if len(hooks) != basis.shape[0]:
        raise ValueError(f"{len(hooks)} blocks with hooks, basis for {basis.shape[0]}")
    k = min(basis.shape[2], hooks[0].basis.shape[1])
    for i, h in enumerate(hooks):
        h.basis.zero_()
        h.basis[:, :k].copy_(basis[i, :, :k].to(h.basis.device, h.basis.dtype))
        if out_bias is not None:
            h.out_bias.copy_(out_bias[i].to(h.out_bias.device, h.out_bias.dtype))
    return k


class StepCoefficients:
    """Writes each step's coefficients into the hooks and clears what the previous step wrote."""

    def __init__(self, hooks: list[InterventionHooks]):
        self.hooks = hooks
        self._dirty: list[tuple[int, int, int]] = []  # (block index, family, rows) written last step

    @torch.no_grad()
    def prepare(self, batch: BatchView | None, options: list[CaptureOptions | None]) -> bool:
        """Coefficients for this step's rows; True when any request intervenes."""
        for i, f, n in self._dirty:
            self.hooks[i].coef[f, :n].zero_()
        self._dirty = []
        if batch is None or not any(o is not None and o.interventions for o in options):
            return False
        n_rows = int(batch.query_start[len(options)])
        factors: dict[tuple[int, int], torch.Tensor] = {}
        k = self.hooks[0].basis.shape[1]
        for i, opts in enumerate(options):
            if opts is None or not opts.interventions:
                continue
            start, end = int(batch.query_start[i]), int(batch.query_start[i + 1])
            pos0 = int(batch.computed[i])  # sequence position of row `start`
            for iv in opts.interventions:
                lo = start + max(0, iv.start - pos0)
                hi = end if iv.end is None else min(end, start + max(0, iv.end - pos0))
                if lo >= hi:
                    continue
                factor = factors.get((iv.block - 1, iv.family))
                if factor is None:
                    factor = factors[(iv.block - 1, iv.family)] = torch.ones(n_rows, k)
                dirs = list(iv.directions) if iv.directions else slice(None)
                factor[lo:hi, dirs] *= iv.scale
        for (b, f), factor in factors.items():
            coef = self.hooks[b].coef
            coef[f, :n_rows].copy_((factor - 1.0).to(coef.device))
            self._dirty.append((b, f, n_rows))
        return bool(factors)
