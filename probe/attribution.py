"""Per-token attribution for one engine step: captured activations in, TokenAttribution records out.

`Attributor.__call__(resid [N, L+1, d], resid_mid [N, L, d], token_ids [N], detail)` runs, batched
over the N decisions of a step (no Python loop over tokens in the math):
1. features   alpha [N, L, 3, k] (probe.features);
2. host       full-vocabulary logits final_norm(h_L) @ W_U^T -> host_logprob of y, top-K candidates,
              and the output gradient d log p(y)/d h_L projected on every basis (g_out);
3. probe      trunk over depth, readout of y over C = top-K + y at every depth (probe.model):
              depth_gain, depth_importance, crystallization_depth, readout_prob, readout_top1
              (the readout at depth L-1);
   dla        direct logit attribution of y over C (probe.dla): exact, per component;
4. pairs      the importance head's amortized ablation (probe.model): per (block, family) the
              predicted |change of the host's log p(y)| when that family's top-k singular
              directions are ablated -> family_attribution (nats) and family_importance (its
              per-block shares);
5. directions (Detail.FULL only) gradient x input of the top pair's predicted importance with
              respect to that pair's k alignment features (one backward through the small head).

Cost per token (multiply-adds, SmolLM2-135M, defaults): features 1.7M + host logits V*d = 28.3M +
output gradient on every basis 1.7M + probe ~19M (see probe.model) = ~51M, about 38% of the host's
own forward (134M); direct logit attribution adds ~0.06M (probe.dla). Detail.FULL adds ~2M for the
head's backward, 0.6M for DLA along attn_out's directions and ~10M for DLA per head (L*d*H*head_dim).
The host logits dominate; the engine hands over its own logits for generated tokens (`logits=`), so
only replayed (audit) rows pay for them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from alignlens.probe.artifact import FingerprintMismatch, load_artifact
from alignlens.probe.dla import attention_splits, direct_logit_attribution, pair_dla
from alignlens.probe.features import alignment_features, output_gradient_on_bases
from alignlens.probe.fingerprint import host_fingerprint
from alignlens.probe.host import Host
from alignlens.probe.model import ProbeModel, candidate_set, readout_logits, token_features, vocab_logsumexp
from alignlens.probe.names import FAMILIES, FAMILY_INDEX
from alignlens.probe.record import Detail, Direction, TokenAttribution
from alignlens.probe.svd import SvdFactors, load_or_compute

FULL_DIRECTIONS = 8  # directions reported for the top pair at Detail.FULL
# Rows per pass of `compute`. A whole 512-token audit step at once streams ~100 MB intermediates
# ([N, V] logits, [N, L, 3, d] family vectors) through memory; 64-row chunks stay in the 32 MB
# L3 and still give the [rows, d] x [d, V] product a full GEMM. Measured on the 2-core machine,
# one thread, SmolLM2-135M, 512 replay rows: 1534 ms whole, 1458 (256), 1187 (128), 1073 (64),
# 1201 (32).
CHUNK_ROWS = 64


class Attributor:
    """A loaded probe bound to its host. Build with `load` (checkpoint folder) or `from_host`."""

    def __init__(self, host: Host, factors: SvdFactors, model: ProbeModel, metadata: dict):
        if factors.fingerprint != metadata["host_fingerprint"]:
            raise FingerprintMismatch("<in memory>", metadata["host_fingerprint"], factors.fingerprint)
        self.host, self.factors, self.model, self.metadata = host, factors, model.eval(), metadata
        self.proj, self.basis = factors.proj, factors.basis
        self.L = host.n_layers
        self.top_k = model.cfg.top_k

    @classmethod
    def load(cls, artifact_path: str | Path, checkpoint_dir: str | Path) -> "Attributor":
        """Load a probe artifact for the host checkpoint at `checkpoint_dir`.

        Raises probe.artifact.FingerprintMismatch when the checkpoint is not the host the probe was
        trained on.
        """
        return cls.from_host(artifact_path, Host.from_checkpoint(checkpoint_dir), checkpoint_dir)

    @classmethod
    def from_host(cls, artifact_path: str | Path, host: Host, where: str | Path | None = None) -> "Attributor":
        model, meta = load_artifact(artifact_path, host_fingerprint(host), where)
        return cls(host, load_or_compute(host, int(meta["k"])), model, meta)

    def to(self, device: torch.device | str) -> "Attributor":
        self.host.to(device)
        self.proj, self.basis = self.proj.to(device), self.basis.to(device)
        self.model.to(device)
        return self

    # ---- batched math -------------------------------------------------------------------------
    @torch.no_grad()
    def compute(self, resid: Tensor, resid_mid: Tensor, token_ids: Tensor,
                logits: Tensor | None = None) -> dict[str, Tensor]:
        """`compute_chunk` over row chunks of CHUNK_ROWS, concatenated (same keys and shapes)."""
        n = token_ids.shape[0]
        if n <= CHUNK_ROWS:
            return self.compute_chunk(resid, resid_mid, token_ids, logits)
        parts = [self.compute_chunk(resid[s:s + CHUNK_ROWS], resid_mid[s:s + CHUNK_ROWS], token_ids[s:s + CHUNK_ROWS],
                                    None if logits is None else logits[s:s + CHUNK_ROWS])
                 for s in range(0, n, CHUNK_ROWS)]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    @torch.no_grad()
    def compute_chunk(self, resid: Tensor, resid_mid: Tensor, token_ids: Tensor,
                      logits: Tensor | None = None) -> dict[str, Tensor]:
        """All per-token quantities as tensors (N tokens, L blocks, C = K+1 candidates):
        alpha [N,L,3,k], host_logprob [N], host_top1 [N], cand_ids [N,C], cand_valid [N,C],
        logp_y [N,L+1], top1 [N,L+1] bool, depth_gain [N,L+1], depth_importance [N,L+1],
        crystallization_depth [N], family_attribution [N,L,3] (nats), family_importance [N,L,3],
        readout_prob [N], readout_top1 [N] bool (depth L-1), dla_embed [N], dla_attn [N,L], dla_mlp [N,L],
        dla_total [N], token_ids [N], and g_out, states for direction_scores."""
        h, m, K = self.host, self.model, self.top_k
        resid = resid.float()
        token_ids = token_ids.long()
        alpha = alignment_features(h, self.proj, resid, resid_mid)
        logits = h.logits(resid[:, -1]) if logits is None else logits.float()  # [N, V]
        host_logprob = logits.gather(1, token_ids[:, None]).squeeze(1) - vocab_logsumexp(logits)
        top_logits, top_ids = logits.topk(K, dim=-1)
        cand_ids, valid = candidate_set(top_ids, token_ids, K)
        g_out = output_gradient_on_bases(h, self.basis, resid[:, -1], token_ids, top_ids, top_logits)

        a = m.standardize(alpha)
        states = m.trunk(resid, a)
        r = m.corrected_resid(resid, states)
        ro = readout_logits(h.final_norm, r, h.W_U[cand_ids]).masked_fill(~valid[:, None], float("-inf"))
        logp = torch.log_softmax(ro, dim=-1)  # [N, L+1, C]
        y_pos = torch.where(valid[:, -1], K, (top_ids == token_ids[:, None]).float().argmax(1))
        logp_y = logp.gather(2, y_pos[:, None, None].expand(-1, self.L + 1, 1)).squeeze(2)
        top1 = ro.argmax(-1) == y_pos[:, None]  # [N, L+1]

        n_cand = valid.sum(1).float()
        prev = torch.cat([-torch.log(n_cand)[:, None], logp_y[:, :-1]], dim=1)
        gain = logp_y - prev
        pos_gain = gain.clamp_min(0)
        importance = pos_gain / pos_gain.sum(1, keepdim=True).clamp_min(1e-12)
        # smallest l with top1 at every depth >= l: count the trailing run of True
        trailing = torch.flip(torch.cumprod(torch.flip(top1, [1]).long(), dim=1), [1]).sum(1)
        crystal = (self.L + 1) - trailing  # = L+1 when not top-1 at the last depth

        tok = token_features(host_logprob, top_logits)
        dla = direct_logit_attribution(h, resid, resid_mid, token_ids, cand_ids, valid)
        pdla = pair_dla(dla["dla_attn"], dla["dla_mlp"])
        u = m.importance(states, m.pair_features(alpha, g_out, tok, pdla), h.W_U[token_ids])[..., 0]  # [N, L, 3]
        attribution = m.attribution(u)  # predicted |change of log p(y)| per pair, nats
        fam_imp = attribution / attribution.sum(2, keepdim=True).clamp_min(1e-12)
        return {**dla, "pair_dla": pdla, "alpha": alpha, "g_out": g_out, "token_feats": tok, "states": states,
                "host_logprob": host_logprob,
                "host_top1": top_ids[:, 0], "cand_ids": cand_ids, "cand_valid": valid, "logp_y": logp_y,
                "top1": top1, "depth_gain": gain, "depth_importance": importance, "crystallization_depth": crystal,
                "family_attribution": attribution, "family_importance": fam_imp,
                "readout_prob": logp_y[:, -2].exp(), "readout_top1": top1[:, -2], "token_ids": token_ids}

    def direction_scores(self, out: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Gradient x input of each token's top pair's log-importance u w.r.t. that pair's alpha.

        Returns (top pair flat index [N] into L*3, scores [N, k]); input = alpha minus its training
        mean, so a direction at its usual value scores 0. One backward pass through the importance
        head only (trunk states held fixed); autograd is re-enabled locally, so this also works
        inside an engine's inference_mode.
        """
        m, N = self.model, out["alpha"].shape[0]
        top = out["family_attribution"].flatten(1).argmax(1)
        with torch.inference_mode(False), torch.enable_grad():
            alpha = out["alpha"].clone().requires_grad_(True)
            u = m.importance(out["states"].clone(), m.pair_features(alpha, out["g_out"].clone(), out["token_feats"].clone(),
                                                                    out["pair_dla"].clone()),
                             self.host.W_U[out["token_ids"].clone()])[..., 0].flatten(1)
            u.gather(1, top[:, None].clone()).sum().backward()
            scores = (alpha.grad * (alpha.detach() - m.alpha_mean)).flatten(1, 2)  # [N, L*3, k]
        return top, scores[torch.arange(N), top]

    # ---- records ------------------------------------------------------------------------------
    def __call__(self, resid: Tensor, resid_mid: Tensor, token_ids: Tensor, detail: Detail = Detail.SUMMARY,
                 logits: Tensor | None = None, heads: Tensor | None = None) -> list[TokenAttribution]:
        """TokenAttribution for each of the N decisions: resid [N, L+1, d], resid_mid [N, L, d],
        token_ids [N] (the emitted tokens). Detail.FULL adds top_directions and dla_attn_out_directions.

        logits [N, V]: the host's own final logits for these rows when the engine already computed
        them (the sampler's input, before temperature or penalties); the probe then skips its own
        unembedding pass, the largest part of its cost (V*d multiply-adds and all of W_U read per call).

        heads [N, L, H * head_dim]: the heads' outputs (o_proj inputs) captured by the engine; at
        Detail.FULL they add dla_heads.
        """
        if detail not in (Detail.SUMMARY, Detail.FULL):
            raise ValueError(f"detail must be Detail.SUMMARY or Detail.FULL, got {detail!r}")
        if resid.shape[0] != token_ids.shape[0] or resid_mid.shape[0] != token_ids.shape[0]:
            raise ValueError(f"resid {tuple(resid.shape)}, resid_mid {tuple(resid_mid.shape)} and token_ids "
                             f"{tuple(token_ids.shape)} must have the same number of rows")
        V = self.host.W_U.shape[0]
        if logits is not None and tuple(logits.shape) != (token_ids.shape[0], V):
            raise ValueError(f"logits must be [{token_ids.shape[0]}, {V}] (rows, host vocabulary), "
                             f"got {tuple(logits.shape)}")
        N = token_ids.shape[0]
        if N == 0:
            return []
        out = self.compute(resid, resid_mid, token_ids, logits)
        directions: list[list[Direction]] = [[] for _ in range(N)]
        dirs_dla: list[list[list[float]]] = [[] for _ in range(N)]
        heads_dla: list[list[list[float]]] = [[] for _ in range(N)]
        if detail == Detail.FULL:
            # the summary DLA (and its readout direction v) is in `out` already: only the splits
            full = attention_splits(self.host, out["dla_v"], resid_mid.float() - resid[:, :-1].float(),
                                    self.basis[:, FAMILY_INDEX["attn_out"]], heads)
            dirs_dla = full["dla_attn_out_directions"].cpu().tolist()
            if "dla_heads" in full:
                heads_dla = full["dla_heads"].cpu().tolist()
            top, scores = self.direction_scores(out)
            idx = scores.abs().topk(min(FULL_DIRECTIONS, scores.shape[1]), dim=1).indices
            vals = scores.gather(1, idx)
            for t, (p, ids, vs) in enumerate(zip(top.tolist(), idx.tolist(), vals.tolist())):
                directions[t] = [Direction(block=p // 3 + 1, family=FAMILIES[p % 3], index=i, score=v)
                                 for i, v in zip(ids, vs)]
        cols = {k: out[k].cpu().tolist() for k in ("token_ids", "depth_gain", "depth_importance",
                                                    "crystallization_depth", "family_importance", "readout_prob",
                                                    "readout_top1", "host_logprob", "family_attribution",
                                                    "dla_embed", "dla_attn", "dla_mlp", "dla_total")}
        return [TokenAttribution(
            token_id=cols["token_ids"][t], depth_gain=cols["depth_gain"][t],
            depth_importance=cols["depth_importance"][t], crystallization_depth=cols["crystallization_depth"][t],
            family_importance=cols["family_importance"][t], top_directions=directions[t],
            readout_prob=cols["readout_prob"][t], readout_top1=cols["readout_top1"][t],
            host_logprob=cols["host_logprob"][t], family_attribution=cols["family_attribution"][t],
            dla_embed=cols["dla_embed"][t], dla_attn=cols["dla_attn"][t], dla_mlp=cols["dla_mlp"][t],
            dla_total=cols["dla_total"][t], dla_attn_out_directions=dirs_dla[t], dla_heads=heads_dla[t])
            for t in range(N)]
