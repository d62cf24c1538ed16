"""Causal ablation of singular directions on the transformers replica (METHOD.md section 6.4).

For one decision position p of a token sequence and each (block i, family f), project the top-k
singular directions of W_{i,f} out of the vector the family reads at p (qkv: input_norm output;
mlp_in: the MLP's input-norm output) or out of what it writes (attn_out: y - b -> the part of y - b
outside span U_k), rerun position p, and record

    drop[i, f] = log p_host(y | clean) - log p_host(y | ablated)        (nats; positive = support for y)

Only position p is changed; positions < p come from the clean prefix KV cache, which is computed
once per sequence and reused. All 3L ablations (plus one clean row) of a position run as one batch
of single-token queries against the shared prefix, so the cost per evaluated token is about
(3L+1) single-position forwards of the host: ~0.3-0.8 s for SmolLM2-135M on 2 CPU cores.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from alignlens.probe.replica import decoder_layers, sublayers


def full_cache() -> DynamicCache:
    """A cache that keeps every position's keys/values in every layer: built from a config,
    transformers' cache keeps only the last window of a sliding-window layer (Gemma 3), and the
    ablations index the prefix by position. The sliding-window masks still come from the config."""
    return DynamicCache()


class DecisionAblator:
    """Batched decision-position ablations on a transformers causal LM.

    basis: [L, 3, k, d] orthonormal rows per (block, family) (probe.svd.SvdFactors.basis).
    attn_out_bias: [L, d] bias of the attention output projection (zeros when none).
    """

    def __init__(self, model: nn.Module, basis: Tensor, attn_out_bias: Tensor):
        self.model = model.eval()
        self.layers, self.arch = decoder_layers(model)
        self.basis = basis.float()
        self.bias = attn_out_bias.float()
        self.L = len(self.layers)
        self._active = False

    def _project_out(self, x: Tensor, row: int, i: int, j: int, bias: Tensor | None = None) -> Tensor:
        B = self.basis[i, j]  # [k, d]
        v = x[row] if bias is None else x[row] - bias
        x = x.clone()
        x[row] = x[row] - (v @ B.T) @ B
        return x

    def _hooks(self) -> list:
        handles = []
        for i, layer in enumerate(self.layers):
            in_norm, mid_norm, attn = sublayers(layer, self.arch)

            def qkv(_m, _a, out, i=i):  # row 1 + 3i
                return self._project_out(out, 1 + 3 * i, i, 0) if self._active else out

            def mlp(_m, _a, out, i=i):  # row 3 + 3i
                return self._project_out(out, 3 + 3 * i, i, 2) if self._active else out

            def writer(_m, _a, out, i=i):  # row 2 + 3i
                if not self._active:
                    return out
                y = self._project_out(out[0], 2 + 3 * i, i, 1, bias=self.bias[i])
                return (y,) + tuple(out[1:])

            handles += [in_norm.register_forward_hook(qkv), mid_norm.register_forward_hook(mlp),
                        attn.register_forward_hook(writer)]
        return handles

    @torch.no_grad()
    def drops(self, input_ids: Tensor, positions: Tensor, token_ids: Tensor) -> tuple[Tensor, Tensor]:
        """Ablation drops at several decision positions of one sequence.

        input_ids [S] the sequence; positions [n] decision positions (row p decides token p+1);
        token_ids [n] the decided tokens. Returns (clean log p(y) [n], drop [n, L, 3]) in nats.
        """
        L = self.L
        B = 3 * L + 1  # row 0 clean, row 1 + 3i + j ablates (block i, family j)
        prefix = self.model(input_ids=input_ids.view(1, -1), past_key_values=full_cache(), use_cache=True)
        kv = [(layer.keys, layer.values) for layer in prefix.past_key_values.layers]
        base, drop = [], []
        handles = self._hooks()
        self._active = True
        try:
            for p, y in zip(positions.tolist(), token_ids.tolist()):
                cache = DynamicCache(ddp_cache_data=[(k[:, :, :p].expand(B, -1, -1, -1),
                                                      v[:, :, :p].expand(B, -1, -1, -1)) for k, v in kv])
                out = self.model(input_ids=input_ids[p].view(1, 1).expand(B, 1),
                                 position_ids=torch.full((B, 1), p, dtype=torch.long),
                                 past_key_values=cache, use_cache=True)
                logp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)[:, y]  # [B]
                base.append(logp[0])
                drop.append((logp[0] - logp[1:]).view(L, 3))
        finally:
            self._active = False
            for h in handles:
                h.remove()
        return torch.stack(base), torch.stack(drop)
