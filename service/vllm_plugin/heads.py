"""Per-head capture: what each attention head wrote, for direct logit attribution per head.

The attention output projection (o_proj / GPT-2's attn.c_proj) reads the heads' outputs side by side,
z = [z_1 | ... | z_H] [tokens, H * head_dim], so head h's write to the stream is W_O[:, h] z_h and
`probe.dla.head_attribution` splits the attention write's direct logit attribution over heads.

Capture without rewriting each architecture's attention forward: at construction the projection
module's class is swapped for a subclass whose forward first copies its input into a buffer the
module owns ([max rows, H * head_dim], kept for the engine's life, so compiled graphs and CUDA
graphs write to the same storage every step), then runs the stock projection. Parameter names do
not change, so vLLM loads the weights as usual. After the forward, `capture.on_forward` reads each
block's buffer at the rows that decide tokens, like the stream.

With an attn_out intervention the heads' outputs are taken before it (the intervention acts on
the projection's output). `ALIGNLENS_HEADS=0` builds the model without this capture.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
from torch import nn

ENV = "ALIGNLENS_HEADS"
BUFFER = "alignlens_heads"


def enabled() -> bool:
    """Whether capture models record the heads' outputs (ALIGNLENS_HEADS, default on)."""
    return os.environ.get(ENV, "1") != "0"


def _capturing(cls: type) -> type:
    """A subclass of the projection class whose forward records its input first (cached per class)."""
    cached = _CLASSES.get(cls)
    if cached is None:
        def forward(self, x, *args, **kwargs):
            getattr(self, BUFFER)[: x.shape[0]].copy_(x)
            return cls.forward(self, x, *args, **kwargs)

        cached = type(f"HeadCapturing{cls.__name__}", (cls,), {"forward": forward})
        _CLASSES[cls] = cached
    return cached


_CLASSES: dict[type, type] = {}


def attach(projections: Iterable[nn.Module], max_rows: int) -> list[nn.Module]:
    """Give each attention output projection a [max_rows, its input width] input buffer and the
    recording forward; returns them in block order."""
    out = []
    for proj in projections:
        weight = proj.weight
        width = getattr(proj, "input_size_per_partition", None) or weight.shape[1]
        proj.register_buffer(BUFFER, torch.zeros(max_rows, width, dtype=weight.dtype, device=weight.device),
                             persistent=False)
        proj.__class__ = _capturing(type(proj))
        out.append(proj)
    return out


def find(model: nn.Module) -> list[torch.Tensor]:
    """The head buffers of a built model, in block order (empty when it was built without them)."""
    return [m.get_buffer(BUFFER) for m in model.modules() if hasattr(m, BUFFER)]


def rows(buffers: list[torch.Tensor], index: torch.Tensor) -> torch.Tensor | None:
    """The captured heads' outputs at flat rows `index`: [rows, L, H * head_dim], or None."""
    if not buffers:
        return None
    return torch.stack([b.index_select(0, index) for b in buffers], dim=1)
