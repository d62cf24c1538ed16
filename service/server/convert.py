"""Wire records <-> proto messages, detail levels, and derived per-token views.

The worker's record (probe/record.py `TokenAttribution`, a msgspec Struct) and the proto's
`TokenAttribution` have the same field names; this module is the only place that converts
between them, in both directions (server: record -> proto; client: proto -> record), and the
only place the proto's AttributionDetail meets the one `Detail` enum. A field added to one side
and not the other fails at import, loudly.

Derived views used by metrics and the CLI: `top_pair(attr)` (the largest family_attribution's
block and family), `top_dla(attr)` (the largest direct-logit component), and `family_shares(attr)`: one share per family for
the whole decision, the per-block family shares averaged with the depth importance of each
block's output as weights (blocks that did not move the decision do not dilute it):
    raw_f = sum_l depth_importance[l] * family_importance[l-1][f]   over blocks l = 1..L
    share_f = raw_f / sum_f raw_f
(equal weights when no block gained). Shares sum to 1, or are all 0 if every block's family
importance is 0.
"""

from __future__ import annotations

import math

import msgspec

from alignlens.probe.names import FAMILIES
from alignlens.probe.record import Detail, Direction, TokenAttribution
from alignlens.service.protos import load

pb2, _ = load()

_FAMILY_ENUM = {name: pb2.Family.Value(f"FAMILY_{name.upper()}") for name in FAMILIES}
_FAMILY_NAME = {v: k for k, v in _FAMILY_ENUM.items()}
FAMILY_FROM_PROTO = {_FAMILY_ENUM[name]: i for i, name in enumerate(FAMILIES)}  # proto Family -> FAMILIES index
_SCALARS = ("token_id", "crystallization_depth", "readout_prob", "readout_top1", "host_logprob", "dla_embed",
            "dla_total")
_LISTS = ("depth_gain", "depth_importance", "dla_attn", "dla_mlp")

# The record and the contract carry the same fields (never one dropped silently on the way).
assert set(TokenAttribution.__struct_fields__) == {f.name for f in pb2.TokenAttribution.DESCRIPTOR.fields}, \
    "probe.record.TokenAttribution fields != proto TokenAttribution fields"
assert set(Direction.__struct_fields__) == {f.name for f in pb2.Direction.DESCRIPTOR.fields}, \
    "probe.record.Direction fields != proto Direction fields"

# proto AttributionDetail <-> Detail. UNSPECIFIED (0) is resolved by validation (best available).
DETAIL_FROM_PROTO = {pb2.ATTRIBUTION_DETAIL_NONE: Detail.NONE, pb2.ATTRIBUTION_DETAIL_SUMMARY: Detail.SUMMARY,
                     pb2.ATTRIBUTION_DETAIL_FULL: Detail.FULL, pb2.ATTRIBUTION_DETAIL_CAUSAL: Detail.CAUSAL}
DETAIL_TO_PROTO = {v: k for k, v in DETAIL_FROM_PROTO.items()}
DETAIL_BY_NAME = {"unspecified": pb2.ATTRIBUTION_DETAIL_UNSPECIFIED,
                  **{d.name.lower(): DETAIL_TO_PROTO[d] for d in Detail}}  # client and CLI spelling


# PerFamily's fields are the families, in order; _add_per_family relies on it.
assert tuple(f.name for f in pb2.PerFamily.DESCRIPTOR.fields) == FAMILIES, "PerFamily fields != probe.names.FAMILIES"


def _add_per_family(field, rows) -> None:
    """Append [L][3] floats to a repeated PerFamily field. `field.add` with positional unpacking is
    4-5x faster than building PerFamily messages from keyword dicts (upb): a 512-token Audit
    converts 30k of them."""
    for qkv, attn_out, mlp_in in rows:
        field.add(qkv=qkv, attn_out=attn_out, mlp_in=mlp_in)


def per_family_rows(msgs) -> list[list[float]]:
    """[L] PerFamily messages -> [L][3] floats (qkv, attn_out, mlp_in)."""
    return [[getattr(m, f) for f in FAMILIES] for m in msgs]


def attribution_to_proto(attr: TokenAttribution) -> "pb2.TokenAttribution":
    """A TokenAttribution record ([L+1] gains, [L][3] family shares and nats, ...) -> proto message."""
    msg = pb2.TokenAttribution(
        top_directions=[pb2.Direction(block=d.block, family=_FAMILY_ENUM[d.family], index=d.index, score=d.score)
                        for d in attr.top_directions],
        **{k: getattr(attr, k) for k in _SCALARS + _LISTS})
    for row in attr.dla_attn_out_directions:
        msg.dla_attn_out_directions.add(values=row)
    for row in attr.dla_heads:
        msg.dla_heads.add(values=row)
    _add_per_family(msg.family_importance, attr.family_importance)
    _add_per_family(msg.family_attribution, attr.family_attribution)
    _add_per_family(msg.family_drop, attr.family_drop)
    _add_per_family(msg.family_refined, attr.family_refined)
    return msg


def add_family_drop(msg: "pb2.TokenAttribution", drop: list[list[float]], refined: list[list[float]]) -> None:
    """Set a built message's family_drop ([L][3] nats, engine/causal.py; NaN where not measured) and
    family_refined ([L][3] nats, probe/refine.py)."""
    del msg.family_drop[:]
    del msg.family_refined[:]
    _add_per_family(msg.family_drop, drop)
    _add_per_family(msg.family_refined, refined)


def attribution_from_proto(msg: "pb2.TokenAttribution") -> TokenAttribution:
    """Proto message -> the same record the worker produced."""
    return TokenAttribution(
        family_importance=per_family_rows(msg.family_importance),
        family_attribution=per_family_rows(msg.family_attribution),
        family_drop=per_family_rows(msg.family_drop), family_refined=per_family_rows(msg.family_refined),
        top_directions=[Direction(block=d.block, family=_FAMILY_NAME[d.family], index=d.index, score=d.score)
                        for d in msg.top_directions],
        dla_attn_out_directions=[list(b.values) for b in msg.dla_attn_out_directions],
        dla_heads=[list(b.values) for b in msg.dla_heads],
        **{k: getattr(msg, k) for k in _SCALARS}, **{k: list(getattr(msg, k)) for k in _LISTS})


def family_shares(attr: TokenAttribution) -> dict[str, float]:
    """Per-family share of the whole decision (module docstring): sums to 1, or all 0 when no
    block's families supported the token."""
    weights = attr.depth_importance[1:]  # depth 0 (embeddings) has no weight families
    rows = attr.family_importance
    if sum(weights) <= 0:
        weights = [1.0] * len(rows)
    raw = [sum(w * row[i] for w, row in zip(weights, rows, strict=True)) for i in range(len(FAMILIES))]
    total = sum(raw)
    return {f: (x / total if total > 0 else 0.0) for f, x in zip(FAMILIES, raw, strict=True)}


def dominant_family(attr: TokenAttribution) -> tuple[str, float]:
    """(family, share) with the largest share of the decision."""
    shares = family_shares(attr)
    family = max(shares, key=shares.get)
    return family, shares[family]


def top_pair(attr: TokenAttribution) -> tuple[int, str, float] | None:
    """(block 1..L, family, nats) of the largest family_attribution: the (block, family) whose
    ablation the probe predicts would change log p(token) most; None without one."""
    best = None
    for i, row in enumerate(attr.family_attribution):
        for f, value in zip(FAMILIES, row, strict=True):
            if best is None or value > best[2]:
                best = (i + 1, f, value)
    return best


def top_dla(attr: TokenAttribution) -> tuple[str, float] | None:
    """The component with the largest |direct logit attribution|: ("embed" | "attn L" | "mlp L",
    logit nats); None when the record has no DLA."""
    if not attr.dla_attn:
        return None
    parts = [("embed", attr.dla_embed)] + [(f"attn {i + 1}", v) for i, v in enumerate(attr.dla_attn)] + \
        [(f"mlp {i + 1}", v) for i, v in enumerate(attr.dla_mlp)]
    return max(parts, key=lambda p: abs(p[1]))


def token_to_dict(token: "pb2.Token") -> dict:
    """A streamed/audited Token as JSON-ready dict (attribution in record layout, or None). A
    family_drop pair the engine did not ablate (NaN: Audit causal_pairs < 3L) is null, so that the
    output is standard JSON; attribution_from_dict reads it back."""
    attribution = None
    if token.HasField("attribution"):
        attribution = msgspec.to_builtins(attribution_from_proto(token.attribution))
        attribution["family_drop"] = [[None if math.isnan(v) else v for v in row] for row in attribution["family_drop"]]
    return {"index": token.index, "token_id": token.token_id, "text": token.text,
            "logprob": token.logprob if token.HasField("logprob") else None, "attribution": attribution}


def attribution_from_dict(d: dict) -> TokenAttribution:
    """token_to_dict's "attribution" (or a JSON line of `alignlens audit --out`) -> the record, with
    the unmeasured family_drop pairs (null) as NaN again."""
    d = {**d, "family_drop": [[math.nan if v is None else v for v in row] for row in d.get("family_drop", [])]}
    return TokenAttribution.from_dict(d)
