"""lm-evaluation-harness with attribution: the `alignlens` lm-eval model and `alignlens harness-report`.

`alignlens harness run --model alignlens --model_args base_url=http://HOST:PORT/v1/completions,...
--tasks T --log_samples --output_path OUT` is lm-eval's own command line (lm_eval run) with one more
model type registered in lm-eval's model registry: `alignlens`, lm-eval's `local-completions`
client that also asks the server for attribution (`"alignlens": {"detail": ...}` on every request,
server/openai_api.py) and appends, per request, the attribution of the tokens that decide it to a
JSON-lines file (`attributions=PATH` in --model_args, default OUT/alignlens-attributions.jsonl
beside lm-eval's own output, or ./alignlens-attributions.jsonl):
- log-likelihood requests (multiple choice): the continuation's tokens, scored in the prompt
  (`echo`, `max_tokens = 0`: the server attributes prompt tokens by a teacher-forced replay);
- generate_until requests: the generated tokens.
Each line: {"kind", "context", "continuation", "tokens": [{"token_id", "text", "logprob",
"attribution"}]}, the attribution in the record layout (probe/record.py TokenAttribution).

`alignlens harness-report --samples OUT --attributions FILE` joins lm-eval's per-sample log
(--log_samples) with that file: for each sample, the tokens that decided it (a multiple-choice
sample: the continuation the model chose; a generation: the generated tokens), and summarises the
attribution by outcome (correct vs incorrect) per task: crystallization depth, family shares,
where the strongest (block, family) pair lies, and the host's log-probability, with bootstrap 95 %
intervals over samples; as a Markdown table and, with --png, a figure.
"""

from __future__ import annotations

import glob
import json
import os
import random
import statistics
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from alignlens.probe.names import FAMILIES
from alignlens.probe.record import TokenAttribution
from alignlens.service.server.convert import attribution_from_dict, family_shares, top_pair

DEFAULT_ATTRIBUTIONS = "alignlens-attributions.jsonl"


def register() -> None:
    """Register the `alignlens` model type in lm-eval's registry (needs the `harness` extra)."""
    from lm_eval.api.registry import MODEL_REGISTRY, register_model
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    if "alignlens" in MODEL_REGISTRY:
        return

    @register_model("alignlens")
    class AlignlensCompletions(LocalCompletionsAPI):
        """lm-eval's local-completions against alignlens's HTTP API, with attribution recorded."""

        def __init__(self, attributions: str = "", detail: str = "summary", **kwargs):
            kwargs.setdefault("tokenizer_backend", "huggingface")
            super().__init__(**kwargs)
            self.detail = detail
            path = Path(attributions or os.environ.get("ALIGNLENS_HARNESS_ATTRIBUTIONS", DEFAULT_ATTRIBUTIONS))
            path.parent.mkdir(parents=True, exist_ok=True)
            self.attributions_path = path
            self._sink = path.open("a", encoding="utf-8")
            self._lock = threading.Lock()

        def _create_payload(self, messages, generate=False, gen_kwargs=None, seed=1234, eos=None, **kwargs):
            payload = super()._create_payload(messages, generate=generate, gen_kwargs=gen_kwargs, seed=seed,
                                              eos=eos, **kwargs)
            payload["alignlens"] = {"detail": self.detail}
            payload["return_token_ids"] = True
            if not generate:
                payload["max_tokens"] = 0  # score the prompt only: nothing is generated (or attributed) after it
            return payload

        def _write(self, record: dict) -> None:
            with self._lock:
                self._sink.write(json.dumps(record) + "\n")
                self._sink.flush()

        def _text(self, ids) -> str:
            return self.tokenizer.decode(list(ids))

        def parse_logprobs(self, outputs, tokens=None, ctxlens=None, **kwargs):
            """(log-likelihood, greedy) per request, as lm-eval's own parser, from a score-only
            response (no generated token to drop); records each continuation's attribution."""
            results = []
            outputs = outputs if isinstance(outputs, list) else [outputs]
            requests = iter(zip(tokens, ctxlens, strict=True))
            for out in outputs:
                for choice in sorted(out["choices"], key=lambda c: c["index"]):
                    ids, ctxlen = next(requests)
                    lp = choice["logprobs"]
                    cont = slice(ctxlen, len(ids))
                    logprobs, tops = lp["token_logprobs"][cont], lp["top_logprobs"][cont]
                    greedy = all(t == max(top.values()) for t, top in zip(logprobs, tops, strict=True))
                    results.append((sum(logprobs), greedy))
                    self._write({"kind": "loglikelihood", "context": self._text(ids[:ctxlen]),
                                 "continuation": self._text(ids[ctxlen:]), "tokens": [
                                     {"token_id": tid, "text": text, "logprob": logprob, "attribution": attr}
                                     for tid, text, logprob, attr in zip(ids[cont], lp["tokens"][cont], logprobs,
                                                                         lp.get("alignlens", [None] * len(ids))[cont],
                                                                         strict=True)]})
            return results

        def parse_generations(self, outputs, **kwargs):
            texts = super().parse_generations(outputs, **kwargs)
            for out in outputs if isinstance(outputs, list) else [outputs]:
                for choice in out["choices"]:
                    lp = choice.get("logprobs") or {}
                    self._write({"kind": "generate", "context": self._text(choice.get("prompt_token_ids") or []),
                                 "continuation": choice["text"], "tokens": [
                                     {"token_id": tid, "text": text, "logprob": logprob, "attribution": attr}
                                     for tid, text, logprob, attr in zip(
                                         choice.get("token_ids") or [], lp.get("tokens", []),
                                         lp.get("token_logprobs", []), lp.get("alignlens", []), strict=False)]})
            return texts


def run(argv: list[str]) -> int:
    """`lm_eval run ARGV` with the `alignlens` model registered."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    register()
    if "--output_path" in argv and not os.environ.get("ALIGNLENS_HARNESS_ATTRIBUTIONS"):
        out = Path(argv[argv.index("--output_path") + 1])
        os.environ["ALIGNLENS_HARNESS_ATTRIBUTIONS"] = str(out / DEFAULT_ATTRIBUTIONS)
    sys.argv = ["lm_eval", *(argv if argv[:1] == ["run"] else ["run", *argv])]
    cli_evaluate()
    return 0


# -- the report --------------------------------------------------------------------------------------


def _key(context: str, continuation: str) -> str:
    return " ".join((context + continuation).split())  # whitespace-insensitive: decode vs lm-eval's strings


@dataclass
class Decided:
    """One sample with the tokens that decided it."""

    task: str
    doc_id: int
    correct: bool
    tokens: list[TokenAttribution] = field(default_factory=list)


def _outcome(sample: dict) -> bool | None:
    for metric in ("acc", "exact_match", "acc_norm"):
        if metric in sample:
            return float(sample[metric]) >= 0.5
    return None


def _deciding(sample: dict) -> tuple[str, str]:
    """(context, continuation) of the request that decided a sample: for a multiple-choice sample,
    the choice with the highest log-likelihood; for a generation, its context and generated text."""
    args = [sample["arguments"][k] for k in sorted(sample["arguments"], key=lambda k: int(k.rsplit("_", 1)[1]))]
    resps = sample.get("filtered_resps") or sample.get("resps")
    if isinstance(args[0].get("arg_1"), str):  # log-likelihood: (context, continuation) per choice
        scores = [r[0] if isinstance(r, list) else r for r in resps]
        scores = [s[0] if isinstance(s, list) else s for s in scores]
        best = max(range(len(args)), key=lambda i: float(scores[i]))
        return args[best]["arg_0"], args[best]["arg_1"]
    generated = resps[0] if isinstance(resps, list) else resps
    generated = generated[0] if isinstance(generated, list) else generated
    return args[0]["arg_0"], str(generated)


def join(samples_dir: str, attributions: str) -> tuple[list[Decided], int]:
    """Samples with their deciding tokens' attribution, and how many samples found none."""
    records: dict[str, list[dict]] = {}
    gen_records: dict[str, list[dict]] = {}
    for line in Path(attributions).read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if rec["kind"] == "loglikelihood":
            records[_key(rec["context"], rec["continuation"])] = rec["tokens"]
        else:
            gen_records[_key(rec["context"], "")] = rec["tokens"]
    decided, missing = [], 0
    files = sorted(glob.glob(os.path.join(samples_dir, "**", "samples_*.jsonl"), recursive=True))
    if not files:
        raise FileNotFoundError(f"no samples_*.jsonl under {samples_dir}: run lm-eval with --log_samples "
                                "--output_path")
    for path in files:
        task = Path(path).name[len("samples_"):].rsplit("_", 1)[0]
        for line in Path(path).read_text().splitlines():
            sample = json.loads(line)
            correct = _outcome(sample)
            if correct is None:
                continue
            context, continuation = _deciding(sample)
            is_gen = not isinstance(next(iter(sample["arguments"].values())).get("arg_1"), str)
            tokens = gen_records.get(_key(context, "")) if is_gen else records.get(_key(context, continuation))
            attrs = [attribution_from_dict(t["attribution"]) for t in tokens or [] if t.get("attribution")]
            if not attrs:
                missing += 1
                continue
            decided.append(Decided(task, int(sample["doc_id"]), correct, attrs))
    return decided, missing


def _sample_stats(d: Decided) -> dict[str, float]:
    """Per-sample means over its deciding tokens."""
    n_blocks = len(d.tokens[0].family_importance)
    out = {"crystallization_depth": statistics.fmean(a.crystallization_depth for a in d.tokens),
           "host_logprob": statistics.fmean(a.host_logprob for a in d.tokens),
           "top_pair_block": statistics.fmean((top_pair(a) or (0,))[0] for a in d.tokens) / n_blocks}
    shares = [family_shares(a) for a in d.tokens]
    for f in FAMILIES:
        out[f"share_{f}"] = statistics.fmean(s[f] for s in shares)
    return out


def _interval(values: list[float], rng: random.Random, n_boot: int = 1000) -> tuple[float, float, float]:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, mean, mean
    boots = sorted(statistics.fmean(rng.choices(values, k=len(values))) for _ in range(n_boot))
    return mean, boots[int(0.025 * n_boot)], boots[int(0.975 * n_boot) - 1]


COLUMNS = [("crystallization_depth", "crystallization depth"), ("share_qkv", "qkv share"),
           ("share_attn_out", "attn_out share"), ("share_mlp_in", "mlp_in share"),
           ("top_pair_block", "top pair block / L"), ("host_logprob", "host log p")]


def summarise(decided: list[Decided], seed: int = 0) -> dict:
    """{task: {"correct" | "incorrect": {"n", column: (mean, lo, hi)}}}."""
    rng = random.Random(seed)
    groups: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for d in decided:
        groups[d.task]["correct" if d.correct else "incorrect"].append(_sample_stats(d))
    summary: dict = {}
    for task, by in sorted(groups.items()):
        summary[task] = {}
        for outcome in ("correct", "incorrect"):
            rows = by.get(outcome, [])
            entry: dict = {"n": len(rows)}
            for key, _ in COLUMNS:
                if rows:
                    entry[key] = _interval([r[key] for r in rows], rng)
            summary[task][outcome] = entry
    return summary


def markdown(summary: dict, missing: int) -> str:
    lines = ["| task | outcome | samples | " + " | ".join(label for _, label in COLUMNS) + " |",
             "|---|---|---:|" + "---:|" * len(COLUMNS)]
    for task, by in summary.items():
        for outcome, entry in by.items():
            cells = [f"{entry[k][0]:.3f} [{entry[k][1]:.3f}, {entry[k][2]:.3f}]" if k in entry else "-"
                     for k, _ in COLUMNS]
            lines.append(f"| {task} | {outcome} | {entry['n']} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Means over samples of per-sample means over the deciding tokens, with bootstrap 95 % intervals "
                 "over samples. Family shares: each family's share of the decision (family_importance weighted "
                 "by depth_importance). Top pair block / L: where the (block, family) with the largest "
                 "family_attribution lies, as a fraction of the depth.")
    if missing:
        lines.append(f"{missing} samples had no attributed tokens in the attributions file and are left out.")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: str) -> None:
    """Per task: family shares (stacked) and crystallization depth, correct vs incorrect (Pillow)."""
    from PIL import Image, ImageDraw

    from alignlens.service.report import FAMILY_COLOURS

    tasks = list(summary)
    bar_w, gap, height, top, left = 60, 30, 220, 40, 70
    width = left + len(tasks) * (2 * bar_w + 3 * gap) * 2 + 40
    img = Image.new("RGB", (width, height + top + 70), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 10), "Attribution by outcome: family shares (left) and crystallization depth (right)", fill="black")
    x = left
    max_depth = max((e["crystallization_depth"][2] for by in summary.values() for e in by.values()
                     if "crystallization_depth" in e), default=1.0)
    for task in tasks:
        for panel in ("shares", "depth"):
            for outcome in ("correct", "incorrect"):
                entry = summary[task][outcome]
                base = top + height
                if "crystallization_depth" in entry:
                    if panel == "shares":
                        y = base
                        for f in FAMILIES:
                            h = entry[f"share_{f}"][0] * height
                            draw.rectangle([x, y - h, x + bar_w, y], fill=FAMILY_COLOURS[f])
                            y -= h
                    else:
                        mean, lo, hi = entry["crystallization_depth"]
                        h = mean / max_depth * height
                        draw.rectangle([x, base - h, x + bar_w, base], fill="#888888")
                        cx = x + bar_w // 2
                        draw.line([cx, base - lo / max_depth * height, cx, base - hi / max_depth * height],
                                  fill="black", width=2)
                        draw.text((x, base - h - 14), f"{mean:.1f}", fill="black")
                draw.text((x, base + 4), f"{outcome} ({entry['n']})", fill="black")
                x += bar_w + gap
            x += gap
        draw.text((x - 2 * (2 * bar_w + 3 * gap), top + height + 24), task, fill="black")
    lx = 10
    for f in FAMILIES:
        draw.rectangle([lx, top + height + 46, lx + 12, top + height + 58], fill=FAMILY_COLOURS[f])
        draw.text((lx + 16, top + height + 46), f, fill="black")
        lx += 90
    img.save(path)
