"""Pictures of attributed tokens for auditors: one self-contained HTML page, or a PNG figure.

`render_html(sections)` writes a page that needs nothing at view time: inline CSS and inline SVG,
no script, no fonts or images fetched. Every number is on hover (`title`). Each section is one
generation (a prompt and its attributed tokens, as `server.convert.token_to_dict` gives them):
- the text, each token coloured by its crystallization depth (early = blue, late = red);
- a token x depth heatmap of `depth_importance` (depths 0..L), crystallization marked;
- each token's family shares (qkv / attn_out / mlp_in over the whole decision, `family_shares`);
- the direct logit attribution: a token x component heatmap (embed, attn 1..L, mlp 1..L) in logit
  nats, diverging colours, with `dla_total`;
- for tokens of a CAUSAL Audit, the probe's family_attribution beside the engine's exact
  family_drop (grey where causal_pairs left a pair unmeasured) and their rank correlation.
`render_png(section, path)` draws the depth heatmap with crystallization and the family shares
with Pillow, for reports that take a static figure.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field

import torch

from alignlens.probe.names import FAMILIES
from alignlens.probe.record import TokenAttribution
from alignlens.probe.stats import spearman
from alignlens.service.server.convert import attribution_from_dict, family_shares, top_dla, top_pair

FAMILY_COLOURS = {"qkv": "#4c78a8", "attn_out": "#f58518", "mlp_in": "#54a24b"}
CELL_W, CELL_H = 22, 9


@dataclass
class Section:
    """One generation to draw: its prompt text and tokens (token_to_dict dicts)."""

    title: str
    prompt: str
    tokens: list[dict] = field(default_factory=list)

    @property
    def attributed(self) -> list[tuple[dict, TokenAttribution]]:
        return [(t, attribution_from_dict(t["attribution"])) for t in self.tokens if t.get("attribution")]


def _depth_colour(depth: int, n_depths: int) -> str:
    """Blue (early) to red (late) for a crystallization depth in 0..n_depths (n_depths: never)."""
    x = min(max(depth / max(n_depths - 1, 1), 0.0), 1.0)
    r, g, b = int(40 + 200 * x), int(90 + 60 * (1 - abs(2 * x - 1))), int(220 - 190 * x)
    return f"rgb({r},{g},{b})"


def _heat(value: float, vmax: float) -> str:
    """White to dark blue for value in [0, vmax]."""
    x = min(max(value / vmax, 0.0), 1.0) if vmax > 0 else 0.0
    return f"rgb({int(255 - 215 * x)},{int(255 - 175 * x)},{int(255 - 80 * x)})"


def _diverging(value: float, vmax: float) -> str:
    """Red (negative) - white - green (positive) for value in [-vmax, vmax]."""
    x = min(max(value / vmax, -1.0), 1.0) if vmax > 0 else 0.0
    if x >= 0:
        return f"rgb({int(255 - 200 * x)},{int(255 - 90 * x)},{int(255 - 200 * x)})"
    return f"rgb({int(255 + 40 * x)},{int(255 + 200 * x)},{int(255 + 200 * x)})"


def _esc(text: str) -> str:
    return html.escape(text, quote=True)


def _token_title(t: dict, a: TokenAttribution) -> str:
    pair, dla = top_pair(a), top_dla(a)
    lines = [f"token {t['index']} id {t['token_id']} {t['text']!r}",
             f"logprob {t['logprob']:.3f}" if t.get("logprob") is not None else "logprob -",
             f"crystallization depth {a.crystallization_depth}",
             "shares " + ", ".join(f"{f} {v:.2f}" for f, v in family_shares(a).items())]
    if pair:
        lines.append(f"top (block, family): block {pair[0]} {pair[1]} {pair[2]:.3f} nats")
    if dla:
        lines.append(f"top direct logit: {dla[0]} {dla[1]:+.3f} (total {a.dla_total:+.3f})")
    return "\n".join(lines)


def _text_spans(section: Section, n_depths: int) -> str:
    spans = []
    for t, a in section.attributed:
        spans.append(f'<span class="tok" style="background:{_depth_colour(a.crystallization_depth, n_depths)}" '
                     f'title="{_esc(_token_title(t, a))}">{_esc(t["text"]) or "&#8203;"}</span>')
    return "".join(spans)


def _depth_heatmap(section: Section, n_depths: int) -> str:
    rows = section.attributed
    w, h = 90 + n_depths * CELL_W // 2, 14 + len(rows) * (CELL_H + 2)
    vmax = max((max(a.depth_importance) for _, a in rows), default=1.0)
    out = [f'<svg id="depth-heatmap-svg" width="{w}" height="{h}" xmlns="http://www.w3.org/2000/svg">']
    for d in range(0, n_depths, 5):
        out.append(f'<text x="{90 + d * CELL_W // 2}" y="10" class="axis">{d}</text>')
    for r, (t, a) in enumerate(rows):
        y = 14 + r * (CELL_H + 2)
        out.append(f'<text x="0" y="{y + CELL_H - 1}" class="label">{_esc(t["text"][:12])}</text>')
        for d, v in enumerate(a.depth_importance):
            out.append(f'<rect x="{90 + d * CELL_W // 2}" y="{y}" width="{CELL_W // 2 - 1}" height="{CELL_H}" '
                       f'fill="{_heat(v, vmax)}"><title>token {t["index"]} depth {d}: importance {v:.3f}, '
                       f'gain {a.depth_gain[d]:+.3f} nats</title></rect>')
        c = a.crystallization_depth
        if c < n_depths:
            out.append(f'<rect x="{90 + c * CELL_W // 2}" y="{y - 1}" width="{CELL_W // 2 - 1}" height="{CELL_H + 2}" '
                       f'fill="none" stroke="#d62728" stroke-width="1.5"><title>crystallized at depth {c}</title></rect>')
    out.append("</svg>")
    return "".join(out)


def _family_bars(section: Section) -> str:
    rows = section.attributed
    width = 300
    out = [f'<svg id="family-shares-svg" width="{90 + width}" height="{14 + len(rows) * (CELL_H + 2)}" '
           'xmlns="http://www.w3.org/2000/svg">']
    for r, (t, a) in enumerate(rows):
        y = 14 + r * (CELL_H + 2)
        out.append(f'<text x="0" y="{y + CELL_H - 1}" class="label">{_esc(t["text"][:12])}</text>')
        x = 90.0
        for f, v in family_shares(a).items():
            out.append(f'<rect x="{x:.1f}" y="{y}" width="{v * width:.1f}" height="{CELL_H}" '
                       f'fill="{FAMILY_COLOURS[f]}"><title>token {t["index"]} {f}: {v:.3f}</title></rect>')
            x += v * width
    out.append("</svg>")
    return "".join(out)


def _dla_heatmap(section: Section, n_blocks: int) -> str:
    rows = [(t, a) for t, a in section.attributed if a.dla_attn]
    if not rows:
        return '<p class="note">no direct logit attribution in these records</p>'
    names = ["embed"] + [f"attn {i}" for i in range(1, n_blocks + 1)] + [f"mlp {i}" for i in range(1, n_blocks + 1)]
    cw = 7
    vmax = max(max(abs(a.dla_embed), *map(abs, a.dla_attn), *map(abs, a.dla_mlp)) for _, a in rows)
    out = [f'<svg id="dla-svg" width="{150 + len(names) * cw}" height="{24 + len(rows) * (CELL_H + 2)}" '
           'xmlns="http://www.w3.org/2000/svg">',
           '<text x="90" y="10" class="axis">embed | attn 1..L</text>',
           f'<text x="{90 + (1 + n_blocks) * cw}" y="10" class="axis">| mlp 1..L</text>']
    for r, (t, a) in enumerate(rows):
        y = 24 + r * (CELL_H + 2)
        out.append(f'<text x="0" y="{y + CELL_H - 1}" class="label">{_esc(t["text"][:12])}</text>')
        for c, (name, v) in enumerate(zip(names, [a.dla_embed, *a.dla_attn, *a.dla_mlp], strict=True)):
            out.append(f'<rect x="{90 + c * cw}" y="{y}" width="{cw - 1}" height="{CELL_H}" fill="{_diverging(v, vmax)}">'
                       f'<title>token {t["index"]} {name}: {v:+.3f} logit nats</title></rect>')
        out.append(f'<text x="{96 + len(names) * cw}" y="{y + CELL_H - 1}" class="label">'
                   f'{a.dla_total:+.2f}<title>dla_total (logit minus mean candidate logit)</title></text>')
    out.append("</svg>")
    return "".join(out)


def _rank_correlation(x: list[float], y: list[float]) -> float | None:
    """probe.stats.spearman of two lists (the evaluation's and the verifier's correlation); None when
    n < 3 or either list is constant."""
    if len(x) < 3 or len(set(x)) == 1 or len(set(y)) == 1:
        return None
    return float(spearman(torch.tensor([x]), torch.tensor([y]))[0])


def _causal_heatmap(section: Section, n_blocks: int) -> str:
    """For each token with family_drop (a CAUSAL Audit): the probe's family_attribution (predicted
    |drop|, nats) above the engine's exact family_drop (signed; grey: not measured, causal_pairs < 3L),
    columns qkv 1..L | attn_out 1..L | mlp_in 1..L, and their rank correlation over the measured pairs."""
    rows = [(t, a) for t, a in section.attributed if a.family_drop]
    if not rows:
        return ""
    cw = 7
    cols = [(f, b) for f in range(len(FAMILIES)) for b in range(n_blocks)]
    vmax = max(max(a.family_attribution[b][f], abs(a.family_drop[b][f]) if math.isfinite(a.family_drop[b][f]) else 0.0)
               for _, a in rows for f, b in cols)
    height = 24 + len(rows) * (2 * (CELL_H + 2) + 4)
    out = [f'<svg id="causal-svg" width="{290 + len(cols) * cw}" height="{height}" xmlns="http://www.w3.org/2000/svg">']
    for f, name in enumerate(FAMILIES):
        out.append(f'<text x="{110 + f * n_blocks * cw}" y="10" class="axis">{name} 1..L</text>')
    y = 16
    for t, a in rows:
        pred = [a.family_attribution[b][f] for f, b in cols]
        drop = [a.family_drop[b][f] for f, b in cols]
        measured = [i for i, d in enumerate(drop) if math.isfinite(d)]  # NaN: not ablated
        rho = _rank_correlation([pred[i] for i in measured], [abs(drop[i]) for i in measured])
        for kind, values in (("predicted", pred), ("exact", drop)):
            label = f'{t["text"][:10]} {"pred" if kind == "predicted" else "exact"}'
            out.append(f'<text x="0" y="{y + CELL_H - 1}" class="label">{_esc(label)}</text>')
            for c, ((f, b), v) in enumerate(zip(cols, values, strict=True)):
                where = f"token {t['index']} block {b + 1} {FAMILIES[f]}"
                if not math.isfinite(v):
                    out.append(f'<rect class="unmeasured" x="{110 + c * cw}" y="{y}" width="{cw - 1}" '
                               f'height="{CELL_H}" fill="#ddd"><title>{where}: not ablated (causal_pairs)'
                               '</title></rect>')
                else:
                    fill = _heat(v, vmax) if kind == "predicted" else _diverging(v, vmax)
                    out.append(f'<rect x="{110 + c * cw}" y="{y}" width="{cw - 1}" height="{CELL_H}" fill="{fill}">'
                               f'<title>{where}: {kind} {v:+.3f} nats</title></rect>')
            y += CELL_H + 2
        note = "-" if rho is None else f"{rho:+.2f}"
        out.append(f'<text x="{116 + len(cols) * cw}" y="{y - CELL_H - 3}" class="label">rank corr. {note} '
                   f'({len(measured)} pairs)<title>Spearman of predicted and |exact| over the measured pairs'
                   '</title></text>')
        y += 4
    out.append("</svg>")
    return "".join(out)


CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:20px} h2{font-size:16px;margin-top:28px} h3{font-size:14px;margin:14px 0 6px}
.prompt{color:#555;white-space:pre-wrap} .text{line-height:1.9;white-space:pre-wrap}
.tok{padding:1px 0;border-radius:2px;color:#fff;cursor:help}
.axis{font-size:9px;fill:#666} .label{font-size:9px;fill:#333;font-family:monospace}
.legend span{display:inline-block;padding:0 6px;margin-right:4px;color:#fff;border-radius:2px;font-size:12px}
.note{color:#888;font-size:13px} table{border-collapse:collapse;font-size:13px} td{padding:2px 8px}
"""


def render_html(sections: list[Section], *, title: str, model: str = "", n_layers: int | None = None) -> str:
    """The self-contained page for `sections` (see the module docstring)."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{_esc(title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{_esc(title)}</h1>"]
    if model:
        parts.append(f'<p class="note">model {_esc(model)}; hover any token or cell for its numbers</p>')
    for n, section in enumerate(sections):
        rows = section.attributed
        L = n_layers or (len(rows[0][1].depth_importance) - 1 if rows else 0)
        parts.append(f'<section class="generation" id="generation-{n}"><h2>{_esc(section.title)}</h2>'
                     f'<p class="prompt">{_esc(section.prompt)}</p>')
        if not rows:
            parts.append('<p class="note">no attribution in these tokens (the server has no probe, or detail NONE)</p>'
                         f'<div class="text">{_esc("".join(t["text"] for t in section.tokens))}</div></section>')
            continue
        legend = "".join(f'<span style="background:{_depth_colour(d, L + 1)}">{d}</span>'
                         for d in range(0, L + 2, max(1, (L + 1) // 6)))
        mean_c = sum(a.crystallization_depth for _, a in rows) / len(rows)
        parts += [f'<h3>Text, coloured by crystallization depth</h3><p class="legend">{legend}</p>',
                  f'<div class="text" id="text-{n}">{_text_spans(section, L + 1)}</div>',
                  f'<table><tr><td>tokens</td><td>{len(section.tokens)}</td><td>attributed</td><td>{len(rows)}</td>'
                  f'<td>mean crystallization depth</td><td>{mean_c:.1f} of {L}</td></tr></table>',
                  '<h3>Layer importance per token (token x depth 0..L; red box: crystallization)</h3>',
                  f'<div class="depth-heatmap">{_depth_heatmap(section, L + 1)}</div>',
                  '<h3>Family shares per token</h3><p class="legend">' + "".join(
                      f'<span style="background:{FAMILY_COLOURS[f]}">{f}</span>' for f in FAMILIES) + "</p>",
                  f'<div class="family-shares">{_family_bars(section)}</div>',
                  '<h3>Direct logit attribution (logit nats; green raises the token, red lowers it)</h3>',
                  f'<div class="dla">{_dla_heatmap(section, L)}</div>']
        causal = _causal_heatmap(section, L)
        if causal:
            parts += ['<h3>Checked on the engine (CAUSAL Audit): predicted |drop| above the exact drop, nats; '
                      'green: the family supported the token; grey: not ablated</h3>', f'<div class="causal">{causal}</div>']
        parts.append("</section>")
    parts.append("</body></html>")
    return "".join(parts)


def render_png(section: Section, path: str, scale: int = 2) -> None:
    """A static figure: the token x depth importance heatmap with crystallization marked, and each
    token's family shares beside it (Pillow; no fonts needed)."""
    from PIL import Image, ImageDraw

    rows = section.attributed
    if not rows:
        raise ValueError("no attributed tokens to draw")
    n_depths = len(rows[0][1].depth_importance)
    cw, ch, gap, bar = 6 * scale, 6 * scale, 10 * scale, 60 * scale
    img = Image.new("RGB", (gap * 3 + n_depths * cw + bar, gap * 2 + len(rows) * ch), "white")
    draw = ImageDraw.Draw(img)
    vmax = max(max(a.depth_importance) for _, a in rows)

    def rgb(css: str) -> tuple[int, ...]:
        return tuple(int(v) for v in css[4:-1].split(","))

    for r, (_t, a) in enumerate(rows):
        y = gap + r * ch
        for d, v in enumerate(a.depth_importance):
            draw.rectangle([gap + d * cw, y, gap + (d + 1) * cw - 1, y + ch - 2], fill=rgb(_heat(v, vmax)))
        c = a.crystallization_depth
        if c < n_depths:
            draw.rectangle([gap + c * cw, y, gap + (c + 1) * cw - 1, y + ch - 2], outline=(214, 39, 40), width=scale)
        x = gap * 2 + n_depths * cw
        for f, v in family_shares(a).items():
            draw.rectangle([x, y, x + v * bar, y + ch - 2], fill=FAMILY_COLOURS[f])
            x += v * bar
    img.save(path)
