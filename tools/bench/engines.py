"""`alignlens bench`: what attribution costs, against stock vLLM, measured side by side.

Phases (logged under the same names):
  1. start   two engines in one client process, same model and vLLM settings: stock vLLM
             (plugin not loaded) and the capture engine (plugin + probe in the worker)
  2. measure for every repetition, batch size and mode in turn (modes alternate inside a
             repetition so drift hits all modes alike): generated tokens/s, time to first
             token and inter-token latency per request, all requests of a batch concurrent
  3. report  median and spread (min..max) per (mode, batch), ratio to stock, peak RSS of
             each engine's process tree; Markdown table and one JSON line

Modes: `stock` (stock engine), `capture` (rows captured and joined, no probe),
`attributed` (capture + alignment features + probe, detail=SUMMARY), `intervened` (attributed, and
every request ablates one (block, family): block i mod L + 1, family i mod 3, for request i).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import statistics
import time
from dataclasses import dataclass, field

import psutil

from alignlens.probe.record import Detail
from alignlens.service.engine.async_engine import CaptureEngine
from alignlens.service.engine.config import EngineConfig
from alignlens.service.engine.wire import CaptureOptions, Intervention

log = logging.getLogger(__name__)

BENCH_PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a hash map works, step by step.",
    "List ten facts about the planet Mars.",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "The history of the printing press begins",
    "Translate to French: The weather is nice today and we are going to the beach.",
]


@dataclass
class RunResult:
    tokens: int
    seconds: float
    ttft_seconds: list[float] = field(default_factory=list)
    itl_seconds: list[float] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds


def _tree_rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


async def _one_request(engine: CaptureEngine, mode: str, rid: str, ids: list[int], max_tokens: int,
                       t_submit: float, ttft: list, itl: list) -> int:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    detail = Detail.SUMMARY if mode in ("attributed", "intervened") else Detail.NONE
    # intervened: attributed, and every request ablates one (block, family) over its whole sequence
    interventions = ()
    if mode == "intervened":
        index = int(rid.rsplit("-", 1)[-1])
        interventions = (Intervention(block=index % _n_blocks(str(engine.model_path)) + 1, family=index % 3,
                                      scale=0.0),)

    async def token_counts():
        """Cumulative emitted tokens after each engine output of this request."""
        if mode == "stock":
            async for out in engine.llm.generate({"prompt_token_ids": ids}, params, rid):
                yield len(out.outputs[0].token_ids)
            return
        n = 0
        # capture: rows captured and joined, no probe; attributed: capture + probe
        options = CaptureOptions(rid=rid, detail=detail, interventions=interventions)
        async for _out, new in engine.generate(rid, ids, params, options):
            if detail and new and new[0].attr is None:
                raise RuntimeError("attributed mode returned no attribution: is a probe loaded?")
            n += len(new)
            yield n

    last = None
    n = 0
    async for total in token_counts():
        now = time.perf_counter()
        new, n = total - n, total
        if last is None:
            ttft.append(now - t_submit)
        elif new:
            itl.extend([(now - last) / new] * new)
        last = now
    return n


async def run_batch(engine: CaptureEngine, mode: str, prompts: list[list[int]], batch: int,
                    max_tokens: int, tag: str) -> RunResult:
    ttft: list[float] = []
    itl: list[float] = []
    t0 = time.perf_counter()
    counts = await asyncio.gather(*(
        _one_request(engine, mode, f"bench-{tag}-{i}", prompts[i % len(prompts)], max_tokens, t0, ttft, itl)
        for i in range(batch)))
    return RunResult(sum(counts), time.perf_counter() - t0, ttft, itl)


@functools.lru_cache
def _n_blocks(model_path: str) -> int:
    """L of the served model (the intervened mode's block choice)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_path)
    return getattr(cfg, "num_hidden_layers", None) or cfg.n_layer


def summarize(results: dict[tuple[str, int], list[RunResult]]) -> dict:
    out: dict = {}
    for (mode, batch), runs in results.items():
        tps = [r.tokens_per_second for r in runs]
        ttft = [x for r in runs for x in r.ttft_seconds]
        itl = [x for r in runs for x in r.itl_seconds]
        out.setdefault(str(batch), {})[mode] = {
            "tokens_per_second": statistics.median(tps), "tokens_per_second_min": min(tps),
            "tokens_per_second_max": max(tps), "repetitions": len(runs),
            "ttft_p50_seconds": _percentile(ttft, 0.5), "itl_p50_seconds": _percentile(itl, 0.5),
            "itl_p99_seconds": _percentile(itl, 0.99),
        }
    for batch, modes in out.items():
        stock = modes.get("stock", {}).get("tokens_per_second")
        for mode, row in modes.items():
            row["over_stock"] = row["tokens_per_second"] / stock if stock else None
        if "intervened" in modes and "attributed" in modes:
            modes["intervened_over_attributed"] = (modes["intervened"]["tokens_per_second"]
                                                   / modes["attributed"]["tokens_per_second"])
        if "attributed" in modes:
            modes["stock_tokens_per_second"] = stock
            modes["attributed_tokens_per_second"] = modes["attributed"]["tokens_per_second"]
            modes["attributed_over_stock"] = modes["attributed"]["over_stock"]
    return out


async def bench_engines(config: EngineConfig, probe_path: str | None, batch_sizes: list[int],
                        max_tokens: int, repetitions: int, modes: list[str]) -> dict:
    from transformers import AutoTokenizer

    me = psutil.Process()
    engines: dict[str, CaptureEngine] = {}
    pids: dict[str, list[int]] = {}
    start_seconds: dict[str, float] = {}
    for name, capture in (("stock", False), ("capture", True)):
        if name == "stock" and "stock" not in modes:
            continue
        if name == "capture" and not {"capture", "attributed", "intervened"} & set(modes):
            continue
        before = {p.pid for p in me.children(recursive=True)}
        cfg = EngineConfig(**{**config.__dict__, "capture": capture})
        log.info("start: %s engine", name)
        engines[name] = await CaptureEngine.start(cfg, probe_path=probe_path if capture else None)
        start_seconds[name] = engines[name].start_seconds
        pids[name] = [p.pid for p in me.children(recursive=True) if p.pid not in before]
    try:
        model_path = next(iter(engines.values())).model_path
        tok = AutoTokenizer.from_pretrained(str(model_path))
        prompts = [tok(p)["input_ids"] for p in BENCH_PROMPTS]
        results: dict[tuple[str, int], list[RunResult]] = {}
        peak_rss: dict[str, int] = {name: 0 for name in engines}
        for mode in modes:  # warm-up: first requests pay one-off costs
            await run_batch(engines["stock" if mode == "stock" else "capture"], mode, prompts, 2, 8, f"warm-{mode}")
        for rep in range(repetitions):
            for batch in batch_sizes:
                for mode in modes:
                    eng = "stock" if mode == "stock" else "capture"
                    r = await run_batch(engines[eng], mode, prompts, batch, max_tokens, f"{rep}-{batch}-{mode}")
                    results.setdefault((mode, batch), []).append(r)
                    peak_rss[eng] = max(peak_rss[eng], _tree_rss_bytes(pids[eng]))
                    log.info("measure: rep %d batch %d %-10s %.1f tokens/s", rep, batch, mode, r.tokens_per_second)
        summary = summarize(results)
        return {"model": str(model_path), "max_tokens": max_tokens, "repetitions": repetitions,
                "batches": summary, "engine_start_seconds": start_seconds,
                "peak_rss_bytes": peak_rss, "probe": probe_path}
    finally:
        for eng in engines.values():
            eng.shutdown()


def markdown_table(report: dict) -> str:
    lines = ["| batch | mode | tokens/s (median) | spread | ratio to stock | TTFT p50 ms | ITL p50 ms | ITL p99 ms |",
             "|---:|---|---:|---|---:|---:|---:|---:|"]
    for batch, modes in report["batches"].items():
        for mode, row in modes.items():
            if not isinstance(row, dict):
                continue
            ratio = f"{row['over_stock']:.3f}" if row.get("over_stock") else "-"
            lines.append(f"| {batch} | {mode} | {row['tokens_per_second']:.1f} | "
                         f"{row['tokens_per_second_min']:.1f}..{row['tokens_per_second_max']:.1f} "
                         f"(n={row['repetitions']}) | {ratio} | {row['ttft_p50_seconds'] * 1e3:.1f} | "
                         f"{row['itl_p50_seconds'] * 1e3:.2f} | {row['itl_p99_seconds'] * 1e3:.2f} |")
    ratios = [f"batch {b}: {m['intervened_over_attributed']:.3f}" for b, m in report["batches"].items()
              if m.get("intervened_over_attributed")]
    if ratios:
        lines += ["", "Intervened (every request ablating one (block, family)) over attributed: " + ", ".join(ratios)
                  + "."]
    rss = ", ".join(f"{k}: {v / 2**30:.2f} GiB" for k, v in report["peak_rss_bytes"].items())
    start = ", ".join(f"{k}: {v:.1f} s" for k, v in report["engine_start_seconds"].items())
    lines += ["", f"Peak RSS (engine process tree): {rss}. Engine start: {start}."]
    cost = report.get("cost_model")
    if cost and "attribution_flops_per_token" in cost:
        lines += ["", f"Cost model: host {cost['host_flops_per_token'] / 1e6:.0f} MFLOP/token "
                      f"(context {cost['context_tokens']}); features + probe "
                      f"{cost['attribution_flops_per_token'] / 1e6:.0f} MFLOP per generated token "
                      f"(engine logits reused) = {cost['attribution_over_host']:.2f} of the host, "
                      f"{cost['attribution_flops_per_audit_token'] / 1e6:.0f} MFLOP per audited token "
                      f"(own logits) = {cost['audit_attribution_over_host']:.2f}."]
        if "dla_flops_per_token" in cost:
            lines += ["", f"Direct logit attribution (inside the above): {cost['dla_flops_per_token'] / 1e6:.3f} MFLOP "
                          f"per token = {cost['dla_over_host'] * 100:.3f} % of the host; at FULL, with the split "
                          f"along attn_out's directions and per head, {cost['dla_full_flops_per_token'] / 1e6:.2f} "
                          f"MFLOP = {cost['dla_full_over_host'] * 100:.2f} %."]
        per_token = cost.get("probe_seconds_per_token")
        if per_token:
            lines += ["", "Probe wall time on one thread (the emitter's), per token: " + ", ".join(
                f"{n} rows per call {s * 1e3:.2f} ms" for n, s in per_token.items())
                + " (1 and 16 rows: generated tokens, engine logits reused; 512: an audit)."]
    service = report.get("service")
    if service:
        lines += ["", "| through the server | tokens/s (median) | spread | TTFT p50 ms |", "|---|---:|---|---:|"]
        for n, row in service["streams"].items():
            lines.append(f"| {n} concurrent Generate streams | {row['tokens_per_second']:.1f} | "
                         f"{row['min']:.1f}..{row['max']:.1f} (n={row['repetitions']}) | "
                         f"{row['ttft_p50_seconds'] * 1e3:.0f} |")
        for n, row in service["streams"].items():
            lines.append(f"| {n} concurrent Generate streams, detail NONE (served as stock) | "
                         f"{row['none_tokens_per_second']:.1f} | {row['none_min']:.1f}..{row['none_max']:.1f} "
                         f"(n={row['repetitions']}) | {row['none_ttft_p50_seconds'] * 1e3:.0f} |")
        for n, row in service["streams"].items():
            direct = service_over_engine(report, n)
            if direct is not None:
                lines.append(f"| ... attributed over engine-direct attributed at batch {n} | {direct:.3f} | | |")
            none = service_over_engine(report, n, "stock", "none_tokens_per_second")
            if none is not None:
                lines.append(f"| ... detail NONE over engine-direct stock vLLM at batch {n} | {none:.3f} | | |")
        lines += ["", "| Audit, logged completion | tokens/s (median) | spread | Generate, same length, tokens/s "
                      "| Audit over Generate | over the 1-stream row | Audit without attribution, tokens/s |",
                  "|---|---:|---|---:|---:|---:|---:|"]
        for n, row in service["audit"].items():
            per_stream = row.get("over_generate_per_stream")
            lines.append(f"| {n} tokens | {row['tokens_per_second']:.1f} | "
                         f"{row['min']:.1f}..{row['max']:.1f} (n={row['repetitions']}) | "
                         f"{row['generate_tokens_per_second']:.1f} | x{row['over_generate_same_length']:.1f} | "
                         f"{'x%.1f' % per_stream if per_stream else '-'} | "
                         f"{row['no_attribution_tokens_per_second']:.1f} |")
    causal = (service or {}).get("causal")
    if causal:
        lines += ["", "CAUSAL Audit (exact family_drop, pairs + 1 engine requests per token): " + ", ".join(
            f"{row.get('tokens', n)} tokens x {row.get('pairs', '3L')} pairs in {row['seconds']:.1f} s "
            f"({row['tokens_per_second']:.2f} tokens/s)" for n, row in causal.items()) + "."]
    verify = (service or {}).get("verify")
    if verify:
        over = verify.get("over_engine_stock")
        lines += ["", f"--verify-fraction {verify['fraction']}: {verify['streams']} streams at "
                      f"{verify['tokens_per_second']:.1f} tokens/s ({verify['min']:.1f}..{verify['max']:.1f}), "
                      f"{verify['over_without']:.3f} of the same streams without verification"
                      + (f", {over:.3f} of engine-direct stock" if over else "")
                      + f"; {verify['verified_tokens']:.0f} tokens verified."]
    return "\n".join(lines)


def service_over_engine(report: dict, streams: str, mode: str = "attributed",
                        key: str = "tokens_per_second") -> float | None:
    """Tokens/s through the server with `streams` concurrent streams (`key`: attributed, or
    none_tokens_per_second) over the engine-direct `mode` run at the same batch size (None when
    that batch or mode was not measured)."""
    engine = report.get("batches", {}).get(str(streams), {}).get(mode)
    service = report.get("service", {}).get("streams", {}).get(str(streams))
    if not isinstance(engine, dict) or not service or key not in service:
        return None
    return service[key] / engine["tokens_per_second"]


def cost_model(model_path: str, probe_path: str | None, context_tokens: int = 128) -> dict:
    """FLOPs per token: host (analytic) vs features + probe (counted).

    Host: 2 FLOPs per weight of every matrix a decode step multiplies (blocks + unembedding)
    plus attention over `context_tokens` cached positions (4 * L * context * d). Attribution:
    torch's FlopCounterMode over one Attributor call on one token (summary detail), which
    counts the matrix products of alignment features, probe trunk, heads and readout; for a
    generated token the engine hands over its logits (`attribution_flops_per_token`), for an
    audited (replayed) token the probe computes them itself (`..._per_audit_token`). Direct logit
    attribution is counted alone too (`dla_*`; matrix products only, as everywhere here).
    """
    import torch
    from safetensors import safe_open
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_path)
    matrix_weights = 0
    for f in sorted(__import__("pathlib").Path(model_path).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for name in st.keys():
                if name.endswith("weight") and len(st.get_slice(name).get_shape()) == 2 and "embed" not in name \
                        and "wte" not in name and "wpe" not in name:
                    shape = st.get_slice(name).get_shape()
                    matrix_weights += shape[0] * shape[1]
    d, L, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    if getattr(cfg, "tie_word_embeddings", False):
        matrix_weights += V * d  # the unembedding is the tied embedding
    host = 2 * matrix_weights + 4 * L * context_tokens * d
    out = {"host_flops_per_token": host, "context_tokens": context_tokens}
    if probe_path:
        from alignlens.probe.attribution import Attributor

        attributor = Attributor.load(probe_path, model_path)
        resid, mid = torch.randn(1, L + 1, d), torch.randn(1, L, d)
        for key, logits in (("attribution_flops_per_token", attributor.host.logits(resid[:, -1])),
                            ("attribution_flops_per_audit_token", None)):
            with FlopCounterMode(display=False) as counter:
                attributor(resid, mid, torch.tensor([1]), detail=Detail.SUMMARY, logits=logits)
            out[key] = counter.get_total_flops()
        out["attribution_over_host"] = out["attribution_flops_per_token"] / host
        # direct logit attribution alone (inside the counts above): summary, and FULL's per-direction split
        from alignlens.probe.dla import direct_logit_attribution
        from alignlens.probe.model import candidate_set
        from alignlens.probe.names import FAMILY_INDEX

        top = attributor.host.logits(resid[:, -1]).topk(attributor.top_k).indices
        ids, valid = candidate_set(top, torch.tensor([1]), attributor.top_k)
        spec = attributor.host.spec
        heads = torch.randn(1, L, spec.n_heads * spec.head_dim)
        for key, basis, z in (("dla_flops_per_token", None, None),
                              ("dla_full_flops_per_token", attributor.basis[:, FAMILY_INDEX["attn_out"]], heads)):
            with FlopCounterMode(display=False) as counter:
                direct_logit_attribution(attributor.host, resid, mid, torch.tensor([1]), ids, valid, basis, z)
            out[key] = counter.get_total_flops()
        out["dla_over_host"] = out["dla_flops_per_token"] / host
        out["dla_full_over_host"] = out["dla_full_flops_per_token"] / host
        out["audit_attribution_over_host"] = out["attribution_flops_per_audit_token"] / host
        out["probe_seconds_per_token"] = probe_seconds_per_token(attributor, L, d)
    return out


# (rows per call, engine logits handed over): a decode step of one stream and a batch-16 step
# (generated tokens), a 512-token audit (replayed rows: the probe computes the logits itself)
PROBE_TIMING_CASES = ((1, True), (16, True), (512, False))


def probe_seconds_per_token(attributor, L: int, d: int, cases: tuple[tuple[int, bool], ...] = PROBE_TIMING_CASES,
                            repetitions: int = 3) -> dict[str, float]:
    """Measured wall time of one Attributor call per row, on one thread as the worker's emitter
    runs it, keyed by rows per call (see PROBE_TIMING_CASES). Best of `repetitions`; inputs are
    random (the cost does not depend on the values)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = {}
        for n, engine_logits in cases:
            resid, mid = torch.randn(n, L + 1, d), torch.randn(n, L, d)
            tokens = torch.randint(0, attributor.host.W_U.shape[0], (n,))
            logits = attributor.host.logits(resid[:, -1]) if engine_logits else None
            best = float("inf")
            for _ in range(repetitions):
                t0 = time.perf_counter()
                attributor(resid, mid, tokens, detail=Detail.SUMMARY, logits=logits)
                best = min(best, time.perf_counter() - t0)
            out[str(n)] = best / n
        return out
    finally:
        torch.set_num_threads(threads)
