"""Attribution records <-> proto messages, and derived per-token views.

The worker's record (probe/record.py `TokenAttribution.to_dict()`) and the proto's
`TokenAttribution` have the same field names; this module is the only place that converts
between them, in both directions (server: dict -> proto; client: proto -> dict), so a field
added to one side and not the other fails here, loudly.

Derived view used by metrics and the CLI: `family_shares(attr)` — one share per family for
the whole decision, the per-block family shares averaged with the blocks' depth importance
as weights (blocks that did not move the decision do not dilute it):
    raw_f = sum_l layer_importance[l] * family_importance[l-1][f]   over blocks l = 1..L
    share_f = raw_f / sum_f raw_f
(equal weights when no block gained). Shares sum to 1, or are all 0 if every block's family
importance is 0.
"""

from __future__ import annotations

from probe.names import FAMILIES
from service.protos_build import load

pb2, _ = load()

_FAMILY_ENUM = {name: pb2.Family.Value(f"FAMILY_{name.upper()}") for name in FAMILIES}
_FAMILY_NAME = {v: k for k, v in _FAMILY_ENUM.items()}
_PROTO_FIELDS = {f.name for f in pb2.TokenAttribution.DESCRIPTOR.fields}
_SCALARS = ("token_id", "crystallization_layer", "probe_prob", "probe_top1", "host_logprob")


# PerFamily's fields are the families, in order; _add_per_family relies on it.
assert tuple(f.name for f in pb2.PerFamily.DESCRIPTOR.fields) == FAMILIES, "PerFamily fields != probe.names.FAMILIES"


def _add_per_family(field, rows) -> None:
    """Append [L][3] floats to a repeated PerFamily field. `field.add` with positional unpacking is
    4-5x faster than building PerFamily messages from keyword dicts (upb): a 512-token Audit
    converts 30k of them."""
    for qkv, attn_out, mlp_in in rows:
        field.add(qkv=qkv, attn_out=attn_out, mlp_in=mlp_in)


def _rows(msgs) -> list[list[float]]:
    """[L] PerFamily messages -> [L][3] floats."""
    return [[getattr(m, f) for f in FAMILIES] for m in msgs]


def attribution_to_proto(attr: dict) -> "pb2.TokenAttribution":
    """A TokenAttribution dict ([L+1] gains, [L][3] family shares and nats, ...) -> proto message."""
    unknown = attr.keys() - _PROTO_FIELDS
    if unknown:  # the record grew a field the contract does not carry: never drop it silently
        raise KeyError(f"TokenAttribution fields missing from the proto: {sorted(unknown)}")
    msg = pb2.TokenAttribution(
        layer_gain=attr["layer_gain"], layer_importance=attr["layer_importance"],
        top_directions=[pb2.Direction(layer=d["layer"], family=_FAMILY_ENUM[d["family"]], index=d["index"],
                                      score=d["score"]) for d in attr.get("top_directions") or ()],
        **{k: attr[k] for k in _SCALARS})
    _add_per_family(msg.family_importance, attr["family_importance"])
    _add_per_family(msg.family_attribution, attr.get("family_attribution") or ())
    return msg


def attribution_from_proto(msg: "pb2.TokenAttribution") -> dict:
    """Proto message -> the same dict layout as probe.record.TokenAttribution.to_dict()."""
    out = {k: getattr(msg, k) for k in _SCALARS}
    out.update(
        layer_gain=list(msg.layer_gain), layer_importance=list(msg.layer_importance),
        family_importance=_rows(msg.family_importance), family_attribution=_rows(msg.family_attribution),
        top_directions=[{"layer": d.layer, "family": _FAMILY_NAME[d.family], "index": d.index, "score": d.score}
                        for d in msg.top_directions])
    return out


def family_shares(attr: dict) -> dict[str, float]:
    """Per-family share of the whole decision (module docstring): sums to 1, or all 0 when no
    block's families supported the token."""
    weights = attr["layer_importance"][1:]  # depth 0 (embeddings) has no weight families
    rows = attr["family_importance"]
    if sum(weights) <= 0:
        weights = [1.0] * len(rows)
    raw = [sum(w * row[i] for w, row in zip(weights, rows, strict=True)) for i in range(len(FAMILIES))]
    total = sum(raw)
    return {f: (x / total if total > 0 else 0.0) for f, x in zip(FAMILIES, raw, strict=True)}


def dominant_family(attr: dict) -> tuple[str, float]:
    """(family, share) with the largest share of the decision."""
    shares = family_shares(attr)
    family = max(shares, key=shares.get)
    return family, shares[family]


def token_to_dict(token: "pb2.Token") -> dict:
    """A streamed/audited Token as JSON-ready dict (attribution in record layout, or None)."""
    return {"index": token.index, "token_id": token.token_id, "text": token.text,
            "logprob": token.logprob if token.HasField("logprob") else None,
            "attribution": attribution_from_proto(token.attribution) if token.HasField("attribution") else None}
