"""Faster decision-position ablations: the same numbers as probe.ablation, 3-5x cheaper.

probe.ablation.DecisionAblator runs every ablation through all L blocks as a batch of single-token
queries with hooks, copying the prefix KV cache for each. Here, for one sequence:
1. prefix   — one teacher-forced forward with the cache and all hidden states: clean h_0..h_L and
              log p(y) at every position, and every block's keys/values (post-rotary);
2. spawn    — an ablation of block i at position p starts from the clean h_i at p (blocks below i
              are unaffected by it), so block j processes only the rows ablating blocks <= j:
              3L(L+1)/2 row-blocks per position instead of 3L * L;
3. attend   — each row attends to the shared, un-copied prefix keys/values of positions < p (a mask
              per row) plus its own freshly computed key/value, so rows of all decision positions of
              the sequence run as one batch;
4. readout  — final norm and unembedding, full-vocabulary log p(y).
The block arithmetic calls the transformers modules themselves (projections, norms, MLP, rotary
embedding), so it stays the replica; tests check it against DecisionAblator.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from alignlens.probe.ablation import DecisionAblator, full_cache


class FastAblator(DecisionAblator):
    """Batched decision-position ablations (see module docstring); DecisionAblator's interface and
    set-up, with `drops` re-implemented on cached keys/values, and `linearized`.

    basis [L, 3, k, d] orthonormal rows (probe.svd), attn_out_bias [L, d].
    """

    def __init__(self, model: nn.Module, basis: Tensor, attn_out_bias: Tensor, max_rows: int = 1024):
        super().__init__(model, basis, attn_out_bias)
        self.max_rows = max_rows
        cfg = model.config
        self.scale = [None] * self.L  # attention logit scale per block (None: 1/sqrt(head_dim))
        self.window = [None] * self.L  # sliding-window length per block (None: full attention)
        if self.arch == "gemma":
            self.n_heads = cfg.num_attention_heads
            self.n_kv = cfg.num_key_value_heads or self.n_heads
            self.head_dim = cfg.head_dim
            self.rotary = model.model.rotary_emb
            self.final_norm = model.model.norm
            self.layer_types = list(cfg.layer_types)
            self.scale = [layer.self_attn.scaling for layer in self.layers]
            self.window = [layer.self_attn.sliding_window for layer in self.layers]
            if getattr(cfg, "attn_logit_softcapping", None) or getattr(cfg, "final_logit_softcapping", None):
                raise NotImplementedError("logit soft-capping is not supported by FastAblator")
        elif self.arch == "llama":
            if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
                raise NotImplementedError("sliding-window attention is not supported by FastAblator")
            self.n_heads = cfg.num_attention_heads
            self.n_kv = cfg.num_key_value_heads or self.n_heads
            self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
            self.rotary = model.model.rotary_emb
            self.final_norm = model.model.norm
        else:
            self.n_heads = self.n_kv = cfg.n_head
            self.head_dim = cfg.n_embd // cfg.n_head
            self.final_norm = model.transformer.ln_f
            if getattr(cfg, "scale_attn_by_inverse_layer_idx", False) or getattr(cfg, "reorder_and_upcast_attn", False):
                raise NotImplementedError("GPT-2 attention variants are not supported by FastAblator")
        self.lm_head = model.get_output_embeddings()

    def _project_out(self, x: Tensor, rows: Tensor, i: int, j: int, bias: Tensor | None = None) -> Tensor:
        if rows.numel() == 0:
            return x
        B = self.basis[i, j]
        v = x[rows] if bias is None else x[rows] - bias
        x = x.clone()
        x[rows] = x[rows] - (v @ B.T) @ B
        return x

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, K: Tensor, V: Tensor, pos: Tensor, scale: float | None = None,
                window: int | None = None) -> Tensor:
        """q [R, H, hd], own k/v [R, Hkv, hd], prefix K/V [Hkv, S, hd], pos [R] -> [R, H*hd]; `window`:
        a sliding window of that many positions (the row's own included), as transformers masks it."""
        R, H, hd = q.shape
        G = H // self.n_kv
        qg = q.view(R, self.n_kv, G, hd)
        scale = 1.0 / math.sqrt(hd) if scale is None else scale
        s_prefix = torch.einsum("rkgd,ksd->rkgs", qg, K) * scale  # [R, Hkv, G, S]
        keys = torch.arange(K.shape[1])[None, :]
        keep = keys < pos[:, None]  # keys strictly before p
        if window is not None:
            keep &= keys > pos[:, None] - window
        s_prefix = s_prefix.masked_fill(~keep[:, None, None, :], float("-inf"))
        s_self = torch.einsum("rkgd,rkd->rkg", qg, k)[..., None] * scale  # [R, Hkv, G, 1]
        w = torch.softmax(torch.cat([s_prefix, s_self], dim=-1), dim=-1)
        out = torch.einsum("rkgs,ksd->rkgd", w[..., :-1], V) + w[..., -1:] * v[:, :, None]
        return out.reshape(R, H * hd)

    def _block(self, j: int, X: Tensor, pos: Tensor, fam: Tensor, new: Tensor, K: Tensor, V: Tensor,
               taps: list[Tensor] | None = None) -> Tensor:
        """Block j on rows X [R, d] at positions pos [R]; rows with new & fam==f ablate family f here.
        With `taps`, the three family vectors (qkv input, attention output, MLP input) are appended
        with retained gradients."""
        layer = self.layers[j]
        R = X.shape[0]
        rows = [torch.nonzero(new & (fam == f)).squeeze(1) for f in range(3)]

        def tap(t: Tensor) -> Tensor:
            if taps is not None:
                t.retain_grad()
                taps.append(t)
            return t

        if self.arch == "gemma":  # q/k norms, per-type rotary, sliding windows, sandwich norms
            attn = layer.self_attn
            x = tap(self._project_out(layer.input_layernorm(X), rows[0], j, 0))
            q = attn.q_norm(attn.q_proj(x).view(R, self.n_heads, self.head_dim))
            k = attn.k_norm(attn.k_proj(x).view(R, self.n_kv, self.head_dim))
            v = attn.v_proj(x).view(R, self.n_kv, self.head_dim)
            cos, sin = self.rotary(x[None], pos[None], self.layer_types[j])
            cos, sin = cos[0][:, None], sin[0][:, None]
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            out = self._attend(q, k, v, K, V, pos, self.scale[j], self.window[j])
            y = tap(self._project_out(attn.o_proj(out), rows[1], j, 1, bias=self.bias[j]))
            m = X + layer.post_attention_layernorm(y)
            x2 = tap(self._project_out(layer.pre_feedforward_layernorm(m), rows[2], j, 2))
            return m + layer.post_feedforward_layernorm(layer.mlp(x2))
        if self.arch == "llama":
            attn = layer.self_attn
            x = tap(self._project_out(layer.input_layernorm(X), rows[0], j, 0))
            q = attn.q_proj(x).view(R, self.n_heads, self.head_dim)
            k = attn.k_proj(x).view(R, self.n_kv, self.head_dim)
            v = attn.v_proj(x).view(R, self.n_kv, self.head_dim)
            cos, sin = self.rotary(x[None], pos[None])  # [1, R, hd]
            cos, sin = cos[0][:, None], sin[0][:, None]
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            y = tap(self._project_out(attn.o_proj(self._attend(q, k, v, K, V, pos)), rows[1], j, 1, bias=self.bias[j]))
            m = X + y
            x2 = tap(self._project_out(layer.post_attention_layernorm(m), rows[2], j, 2))
            return m + layer.mlp(x2)
        attn = layer.attn
        x = tap(self._project_out(layer.ln_1(X), rows[0], j, 0))
        q, k, v = attn.c_attn(x).split(attn.split_size, dim=-1)
        q, k, v = (t.reshape(R, self.n_heads, self.head_dim) for t in (q, k, v))
        y = tap(self._project_out(attn.c_proj(self._attend(q, k, v, K, V, pos)), rows[1], j, 1, bias=self.bias[j]))
        m = X + y
        x2 = tap(self._project_out(layer.ln_2(m), rows[2], j, 2))
        return m + layer.mlp(x2)

    @torch.no_grad()
    def drops(self, input_ids: Tensor, positions: Tensor, token_ids: Tensor) -> tuple[Tensor, Tensor]:
        """Same contract as DecisionAblator.drops: (clean log p(y) [n], drop [n, L, 3]) in nats."""
        L = self.L
        out = self.model(input_ids=input_ids.view(1, -1), past_key_values=full_cache(), use_cache=True,
                             output_hidden_states=True)
        hidden = [h[0] for h in out.hidden_states]  # L+1 x [S, d]; the last one is after the final norm
        kv = [(layer.keys[0], layer.values[0]) for layer in out.past_key_values.layers]
        base = torch.log_softmax(out.logits[0, positions].float(), -1).gather(1, token_ids[:, None]).squeeze(1)
        n = positions.shape[0]
        per_row_positions = max(1, self.max_rows // (3 * L))
        drop = torch.empty(n, L, 3)
        for s in range(0, n, per_row_positions):
            pos_chunk, y_chunk = positions[s:s + per_row_positions], token_ids[s:s + per_row_positions]
            logp = self._run(hidden, kv, pos_chunk, y_chunk)  # [c, L, 3]
            drop[s:s + per_row_positions] = base[s:s + per_row_positions, None, None] - logp
        return base, drop

    def linearized(self, input_ids: Tensor, positions: Tensor, token_ids: Tensor) -> tuple[Tensor, Tensor]:
        """First-order (attribution-patching) version of `drops`, one backward pass per sequence.

        Returns (linearized drop [n, L, 3] nats, gamma [n, L, 3, k]) where gamma = B_if g_if is the
        gradient of log p(y) w.r.t. each family's vector at the decision position (prefix frozen)
        projected on that family's basis, and drop_lin = gamma . (B_if x_if) (x minus bias for attn_out).
        """
        L = self.L
        with torch.no_grad():
            out = self.model(input_ids=input_ids.view(1, -1), past_key_values=full_cache(), use_cache=True,
                             output_hidden_states=True)
        kv = [(layer.keys[0], layer.values[0]) for layer in out.past_key_values.layers]
        n = positions.shape[0]
        with torch.enable_grad():
            X = out.hidden_states[0][0, positions].detach().clone()
            none = torch.zeros(n, dtype=torch.bool)
            taps: list[Tensor] = []
            for j in range(L):
                X = self._block(j, X, positions, torch.zeros(n, dtype=torch.long), none, *kv[j], taps=taps)
            logp = torch.log_softmax(self.lm_head(self.final_norm(X)).float(), -1)
            logp.gather(1, token_ids[:, None]).sum().backward()
        vec = torch.stack([t.detach() for t in taps], 1).view(n, L, 3, -1)  # [n, L, 3, d]
        grad = torch.stack([t.grad for t in taps], 1).view(n, L, 3, -1)
        vec = vec.clone()
        vec[:, :, 1] -= self.bias
        gamma = torch.einsum("lfkd,nlfd->nlfk", self.basis, grad)
        comp = torch.einsum("lfkd,nlfd->nlfk", self.basis, vec)
        return (gamma * comp).sum(-1), gamma

    def _run(self, hidden: list[Tensor], kv: list[tuple[Tensor, Tensor]], positions: Tensor,
             token_ids: Tensor) -> Tensor:
        L, c = self.L, positions.shape[0]
        d = hidden[0].shape[-1]
        X = torch.empty(0, d)
        pos = torch.empty(0, dtype=torch.long)
        fam = torch.empty(0, dtype=torch.long)
        blk = torch.empty(0, dtype=torch.long)
        who = torch.empty(0, dtype=torch.long)  # which position of the chunk
        for j in range(L):
            # spawn the 3 ablations of block j at every position, from the clean h_j
            X = torch.cat([X, hidden[j][positions].repeat_interleave(3, dim=0)])
            pos = torch.cat([pos, positions.repeat_interleave(3)])
            fam = torch.cat([fam, torch.arange(3).repeat(c)])
            blk = torch.cat([blk, torch.full((3 * c,), j)])
            who = torch.cat([who, torch.arange(c).repeat_interleave(3)])
            X = self._block(j, X, pos, fam, blk == j, *kv[j])
        logits = self.lm_head(self.final_norm(X)).float()
        logp = torch.log_softmax(logits, -1).gather(1, token_ids[who][:, None]).squeeze(1)
        result = torch.empty(c, L, 3)
        result[who, blk, fam] = logp
        return result


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)
