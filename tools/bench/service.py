"""Service-level benchmark: the same question through the gRPC server.

Phases (logged under the same names):
  1. serve    start `alignlens serve` as a subprocess on loopback, wait for SERVING
  2. streams  N concurrent Generate streams (N = 1, 8, 32 by default), detail SUMMARY and,
              alternating with it, detail NONE (served as stock vLLM: no capture, no records);
              ignore_eos so every stream makes exactly max_tokens tokens; tokens/s = all
              tokens / wall time of the batch; TTFT per stream
  4. causal   (--causal-tokens) CAUSAL Audits of the first n tokens: tokens explained per second
  5. verify   (--verify-fraction) the largest stream count again through a second server verifying
              that fraction of live tokens in the background
  3. audit    Audit of logged completions of 64 and 512 tokens, one request at a time:
              completion tokens per second of wall time; the same Audit with detail NONE (the
              teacher-forced prefill alone, the bound attribution works against); Generate making a completion
              of the same length (one stream, same prompt, ignore_eos, detail SUMMARY: the
              per-token cost of the same attribution produced live), and against the
              1-stream figure of phase 2
"""

from __future__ import annotations

import logging
import os
import statistics
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from tools.serve_process import ServeProcess

log = logging.getLogger(__name__)

AUDIT_PROMPT = "Summarize the following passage."
# Any logged text will do for throughput; this one is tokenized and cut to the lengths asked for.
AUDIT_TEXT = (
    "The printing press changed how knowledge moved through Europe. Before it, books were copied "
    "by hand, slowly and with errors; after it, a workshop could make hundreds of identical copies "
    "in the time a scribe made one. Prices fell, literacy rose, and ideas travelled faster than "
    "the authorities who wished to stop them. Scientists could check each other's tables, and "
    "merchants could rely on printed rates and maps. "
) * 40


def run_streams(target: str, n: int, max_tokens: int, prompts: list[str], detail: str = "summary") -> dict:
    """n concurrent Generate streams; one thread per stream (blocking client)."""
    from alignlens.service.client import AttributionClient

    ttft: list[float] = []
    tokens = [0] * n
    errors: list[BaseException] = []

    def one(i: int, client: AttributionClient, t0: float) -> None:
        try:
            first = None
            for token in client.generate(prompts[i % len(prompts)], max_tokens=max_tokens, temperature=0.0,
                                         ignore_eos=True, detail=detail):
                if first is None:
                    first = time.perf_counter() - t0
                    ttft.append(first)
                if token.HasField("attribution") != (detail != "none"):
                    raise RuntimeError(f"detail {detail} stream returned a token with attribution "
                                       f"{token.HasField('attribution')}")
                tokens[i] += 1
        except BaseException as exc:  # noqa: BLE001 - reported after the join
            errors.append(exc)

    with AttributionClient(target) as client:
        t0 = time.perf_counter()
        threads = [threading.Thread(target=one, args=(i, client, t0)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return {"streams": n, "tokens": sum(tokens), "seconds": seconds, "tokens_per_second": sum(tokens) / seconds,
            "ttft_p50_seconds": statistics.median(ttft)}


def run_audit(target: str, lengths: list[int], repetitions: int, model_path: Path) -> dict:
    from transformers import AutoTokenizer

    from alignlens.service.client import AttributionClient

    ids = AutoTokenizer.from_pretrained(str(model_path))(AUDIT_TEXT)["input_ids"]
    out = {}
    with AttributionClient(target) as client:
        for n in lengths:
            if len(ids) < n:
                raise ValueError(f"audit text has {len(ids)} tokens, fewer than {n}")
            rates, live, bare = [], [], []
            for rep in range(repetitions):  # alternate Audit, Audit without attribution, same-length Generate
                t0 = time.perf_counter()
                # detail NONE is stock vLLM, prefix cache included: a prompt of its own per repetition
                # keeps this the full prefill (the bound attribution works against), not a cache hit
                client.audit(f"[{n}.{rep}] {AUDIT_PROMPT}", ids[:n], detail="none")
                bare.append(n / (time.perf_counter() - t0))
                t0 = time.perf_counter()
                resp = client.audit(AUDIT_PROMPT, ids[:n], detail="summary")
                seconds = time.perf_counter() - t0
                if len(resp.tokens) != n or not all(t.HasField("attribution") for t in resp.tokens):
                    raise RuntimeError(f"Audit of {n} tokens returned {len(resp.tokens)} tokens or lacked attribution")
                rates.append(n / seconds)
                t0 = time.perf_counter()
                made = sum(1 for t in client.generate(AUDIT_PROMPT, max_tokens=n, temperature=0.0, ignore_eos=True,
                                                      detail="summary") if t.HasField("attribution"))
                seconds = time.perf_counter() - t0
                if made != n:
                    raise RuntimeError(f"Generate of {n} tokens returned {made} attributed tokens")
                live.append(n / seconds)
            out[str(n)] = {"tokens_per_second": statistics.median(rates), "min": min(rates), "max": max(rates),
                           "repetitions": repetitions, "generate_tokens_per_second": statistics.median(live),
                           "over_generate_same_length": statistics.median(rates) / statistics.median(live),
                           "no_attribution_tokens_per_second": statistics.median(bare)}
    return out


def run_causal(target: str, counts: Sequence[int], model_path: Path, budgets: Sequence[int] = (0,)) -> dict:
    """CAUSAL Audits of the first n tokens of a logged completion: tokens explained per second
    (each token is 3L + 1 engine requests, or causal_pairs + 1 with a budget; engine/causal.py).
    Keys: "n" for all 3L pairs, "n/k" for a budget of k pairs per token."""
    import math

    from transformers import AutoTokenizer

    from alignlens.service.client import AttributionClient
    from alignlens.service.server.convert import per_family_rows

    ids = AutoTokenizer.from_pretrained(str(model_path))(AUDIT_TEXT)["input_ids"][:max(counts)]
    out = {}
    with AttributionClient(target, timeout_s=3600) as client:
        for k in budgets:
            for n in counts:
                t0 = time.perf_counter()
                resp = client.audit(f"[causal {n}/{k}] {AUDIT_PROMPT}", ids, detail="causal",
                                    causal_indices=list(range(n)), causal_pairs=k)
                seconds = time.perf_counter() - t0
                measured = [sum(not math.isnan(v) for row in per_family_rows(resp.tokens[t].attribution.family_drop)
                                for v in row) for t in range(n)]
                if not all(m == (k or 3 * len(resp.tokens[t].attribution.family_drop)) and m
                           for t, m in enumerate(measured)):
                    raise RuntimeError(f"CAUSAL Audit of {n} tokens ({k} pairs) measured {measured} pairs per token")
                out[f"{n}/{k}" if k else str(n)] = {"tokens": n, "pairs": k or measured[0], "seconds": seconds,
                                                    "tokens_per_second": n / seconds}
                log.info("causal: %d tokens explained in %.1f s (%d pairs each)", n, seconds, k or measured[0])
    return out


def verify_cost(model: str, probe: str | None, n: int, max_tokens: int, repetitions: int, prompts: list[str],
                serve_args: list[str], fraction: float) -> dict:
    """`n` concurrent Generate streams through a server with --verify-fraction `fraction` (started
    after the main one, same settings): tokens/s while it verifies in the background."""
    import urllib.request

    from alignlens.service.modelstore import resolve_model

    model_path = resolve_model(model)
    args = ["--model", str(model_path), *serve_args, *(["--probe", probe] if probe else []),
            "--verify-fraction", str(fraction)]
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"alignlens-bench-verify-{os.getpid()}.log"
    with ServeProcess(args, log_path) as server:
        log.info("verify: server with --verify-fraction %s SERVING after %.1f s", fraction, server.start_seconds)
        run_streams(server.target, 2, 8, prompts)  # warm-up
        tps = [run_streams(server.target, n, max_tokens, prompts)["tokens_per_second"] for _ in range(repetitions)]

        def verified_total() -> float:
            text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
            return next(float(line.split()[-1]) for line in text.splitlines()
                        if line.startswith("alignlens_attribution_verified_tokens_total"))

        deadline = time.monotonic() + 60  # the backlog drains after the streams (not timed)
        while verified_total() < 1 and time.monotonic() < deadline:
            time.sleep(0.5)
        verified = verified_total()
    log.info("verify: %d streams -> %.1f tokens/s, %d tokens verified", n, statistics.median(tps), verified)
    return {"streams": n, "fraction": fraction, "tokens_per_second": statistics.median(tps), "min": min(tps),
            "max": max(tps), "repetitions": repetitions, "verified_tokens": verified}


def bench_service(model: str, probe: str | None, streams: list[int], max_tokens: int, audit_lengths: list[int],
                  repetitions: int, prompts: list[str], serve_args: list[str] | None = None,
                  causal_tokens: Sequence[int] = (), causal_pairs: Sequence[int] = (0,)) -> dict:
    from alignlens.service.modelstore import resolve_model

    model_path = resolve_model(model)
    args = ["--model", str(model_path), *(serve_args or []), *(["--probe", probe] if probe else [])]
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"alignlens-bench-serve-{os.getpid()}.log"
    with ServeProcess(args, log_path) as server:
        log.info("serve: SERVING after %.1f s (log %s)", server.start_seconds, log_path)
        run_streams(server.target, 2, 8, prompts)  # warm-up
        stream_results = {}
        run_streams(server.target, 2, 8, prompts, detail="none")
        for n in streams:
            runs, none_runs = [], []
            for _ in range(repetitions):  # alternating, so drift hits both alike
                runs.append(run_streams(server.target, n, max_tokens, prompts))
                none_runs.append(run_streams(server.target, n, max_tokens, prompts, detail="none"))
            tps = [r["tokens_per_second"] for r in runs]
            none_tps = [r["tokens_per_second"] for r in none_runs]
            stream_results[str(n)] = {"tokens_per_second": statistics.median(tps), "min": min(tps), "max": max(tps),
                                      "ttft_p50_seconds": statistics.median(r["ttft_p50_seconds"] for r in runs),
                                      "none_tokens_per_second": statistics.median(none_tps), "none_min": min(none_tps),
                                      "none_max": max(none_tps),
                                      "none_ttft_p50_seconds": statistics.median(r["ttft_p50_seconds"]
                                                                                 for r in none_runs),
                                      "repetitions": repetitions}
            log.info("streams: %d concurrent -> %.1f tokens/s attributed, %.1f at detail NONE", n,
                     stream_results[str(n)]["tokens_per_second"], stream_results[str(n)]["none_tokens_per_second"])
        audit = run_audit(server.target, audit_lengths, repetitions, model_path)
        for n, row in audit.items():
            log.info("audit: %s tokens -> %.1f tokens/s", n, row["tokens_per_second"])
        causal = run_causal(server.target, causal_tokens, model_path, causal_pairs) if causal_tokens else None
        single = stream_results.get("1", {}).get("tokens_per_second")
        for row in audit.values():
            row["over_generate_per_stream"] = row["tokens_per_second"] / single if single else None
        out = {"server_start_seconds": server.start_seconds, "streams": stream_results, "audit": audit}
        if causal is not None:
            out["causal"] = causal
        return out
