"""Per-token attribution record: the compact result that leaves the worker, typed once.

Field names follow METHOD.md section 4 and are mirrored one-to-one by the `TokenAttribution`
message of protos/alignlens/v1 (alignlens.service.server.convert checks it at import). These are
`msgspec.Struct`s: the vLLM worker encodes them to msgpack as they are and the server decodes
them back into the same types (alignlens.service.engine.wire), with no dict layer in between.

Depths and blocks are named apart (probe/names.py): per-depth fields (`depth_*`) have L+1
entries, depths 0..L; per-block fields have L entries, entry i is block i+1.
"""

from __future__ import annotations

import enum

import msgspec


class Detail(enum.IntEnum):
    """How much attribution a request asks for: the one encoding used by the worker, the engine
    options, validation and the client (the proto's AttributionDetail maps onto it in
    alignlens.service.server.convert)."""

    NONE = 0  # no capture at all: the request is served as stock vLLM
    SUMMARY = 1  # depth profile, family shares and attributions, agreement, host log-prob
    FULL = 2  # SUMMARY plus top_directions
    CAUSAL = 3  # Audit only: FULL plus family_drop and family_refined, exact ablations computed by the engine


class Direction(msgspec.Struct, frozen=True):
    """One singular direction of one weight matrix, with its attribution score."""

    block: int  # block 1..L whose weights the direction belongs to
    family: str  # one of probe.names.FAMILIES
    index: int  # singular-direction index 0..k-1 (0 = largest singular value)
    score: float  # signed gradient x input of the pair's predicted log-importance w.r.t. alpha_{l,f,index}


class TokenAttribution(msgspec.Struct):
    """Why token y was emitted at one position. L = number of host blocks."""

    token_id: int
    depth_gain: list[float]  # [L+1] nats, log p_d(y) - log p_{d-1}(y); d=0 vs uniform over candidates
    depth_importance: list[float]  # [L+1] positive gains normalized to sum 1
    crystallization_depth: int  # smallest d with y top candidate at every depth >= d; L+1 if not top at depth L
    family_importance: list[list[float]]  # [L][3] share of qkv, attn_out, mlp_in per block
    #                                       (family_attribution normalized per block)
    top_directions: list[Direction] = []
    # The probe's readout at depth L-1, the last depth it predicts (depth L is the host's own
    # readout, so agreement there would be true by construction): p(y) over the candidate set, and
    # whether y is its top candidate (the probe anticipates the decision one block early).
    readout_prob: float = 0.0
    readout_top1: bool = False
    host_logprob: float = 0.0  # host log p(y) over the full vocabulary (nats)
    # [L][3] nats, per (block, family): the probe's prediction of |change of the host's log p(y)|
    # when that family's top-k singular directions are ablated at this position (amortized ablation,
    # probe/model.py). The unnormalized pair importance behind family_importance; top_directions
    # explain this array's largest pair.
    family_attribution: list[list[float]] = []
    # [L][3] nats, only at Detail.CAUSAL for the selected tokens: the exact log p(y | clean) -
    # log p(y | (block, family) top-k ablated at this position), computed by the engine.
    family_drop: list[list[float]] = []
    # [L][3] nats, where family_drop is set: |family_drop| on the pairs the engine ablated (the k of
    # largest family_attribution when the Audit's causal_pairs = k < 3L; the others' family_drop is
    # NaN), family_attribution elsewhere (probe/refine.py).
    family_refined: list[list[float]] = []
    # Direct logit attribution (probe/dla.py), logit nats: y's logit minus the mean candidate
    # logit, split exactly over the stream's components with the final norm's scale frozen;
    # dla_embed + sum(dla_attn) + sum(dla_mlp) == dla_total up to float32 rounding.
    dla_embed: float = 0.0  # h_0 (and a LayerNorm host's final-norm bias)
    dla_attn: list[float] = []  # [L] attention writes, block 1..L
    dla_mlp: list[float] = []  # [L] MLP writes, block 1..L
    dla_total: float = 0.0  # logit_y - mean over the candidate set, from h_L
    # [L][k] Detail.FULL and above: dla_attn along o_proj's top-k left singular directions
    dla_attn_out_directions: list[list[float]] = []
    # [L][H] Detail.FULL and above, when the engine captured the heads' outputs: each attention
    # head's write read out; per block they sum to dla_attn minus the o_proj bias's term
    dla_heads: list[list[float]] = []

    def to_dict(self) -> dict:
        """Plain dict of plain lists (JSON-ready), the layout `from_dict` reads."""
        return msgspec.to_builtins(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TokenAttribution":
        return msgspec.convert(d, cls)
