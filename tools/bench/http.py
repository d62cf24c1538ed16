"""`python -m tools.bench.http`: what users would run instead, side by side, one run, alternating.

The same OpenAI client (the `openai` SDK, one thread per stream, streaming completions, ignore_eos
so every stream makes exactly --max-tokens tokens, temperature 0) against:
  - `vllm`       stock vLLM's own OpenAI server, `python -m vllm.entrypoints.openai.api_server`
                 with its default settings, the same dtype and alignlens's KV cache size (vLLM's
                 CPU default takes 22 of this machine's 24 GiB: the two could not both run);
  - `http-off`   alignlens's HTTP API (`alignlens serve --http-port`, its default settings), no
                 attribution (the request runs as stock vLLM inside alignlens);
  - `http-on`    the same with `"alignlens": {"detail": "summary"}`;
and, through the same alignlens server's gRPC port (tools.bench.service.run_streams), `grpc-on` and
`grpc-off`, for HTTP vs gRPC. Both servers are up for the whole run; for each stream count the
modes alternate, repetition by repetition, so drift hits all alike. tokens/s = all tokens / wall
time of the batch (first request sent to last token received); medians with min and max.
Progress is logged as each measurement finishes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from tools.bench.engines import BENCH_PROMPTS
from tools.bench.service import run_streams
from tools.serve_process import ServeProcess, free_port

log = logging.getLogger("tools.bench.http")


def run_http_streams(base_url: str, model: str, n: int, max_tokens: int, prompts: list[str],
                     attribution: bool) -> dict:
    """n concurrent streaming completions through the openai SDK; one thread per stream."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
    tokens = [0] * n
    ttft: list[float] = []
    errors: list[BaseException] = []
    extra = {"ignore_eos": True, **({"alignlens": {"detail": "summary"}} if attribution else {})}

    def one(i: int, t0: float) -> None:
        try:
            first = None
            stream = client.completions.create(model=model, prompt=prompts[i % len(prompts)], max_tokens=max_tokens,
                                               temperature=0.0, stream=True, stream_options={"include_usage": True},
                                               logprobs=0 if attribution else None, extra_body=extra)
            for chunk in stream:
                if chunk.choices and chunk.choices[0].text and first is None:
                    first = time.perf_counter() - t0
                    ttft.append(first)
                if chunk.usage is not None:
                    tokens[i] = chunk.usage.completion_tokens
                if attribution and chunk.choices and chunk.choices[0].logprobs is not None:
                    marks = chunk.choices[0].logprobs.model_extra.get("alignlens") or []
                    if any(m is None for m in marks):
                        raise RuntimeError("a token came without attribution")
        except BaseException as exc:  # noqa: BLE001 - reported after the join
            errors.append(exc)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i, t0)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    client.close()
    if errors:
        raise errors[0]
    return {"streams": n, "tokens": sum(tokens), "seconds": seconds, "tokens_per_second": sum(tokens) / seconds,
            "ttft_p50_seconds": statistics.median(ttft) if ttft else None}


def served_model_id(base_url: str) -> str:
    """The id of the one model an OpenAI-compatible server at `base_url` (ending in /v1) serves."""
    with urllib.request.urlopen(f"{base_url}/models", timeout=10) as r:
        return json.loads(r.read())["data"][0]["id"]


# ratios reported repetition by repetition: the two modes of a pair ran minutes apart at most, in
# the same repetition, so a drift of the shared machine cancels (the medians of each mode alone
# need not come from the same repetition)
PAIRS = (("http-on", "vllm"), ("http-off", "vllm"), ("http-on", "http-off"), ("http-on", "grpc-on"),
         ("http-off", "grpc-off"))


def paired_ratio(a: list[dict], b: list[dict]) -> dict:
    """Median [min, max] over repetitions of a_i / b_i (tokens/s, the same repetition i)."""
    r = [x["tokens_per_second"] / y["tokens_per_second"] for x, y in zip(a, b, strict=True)]
    return {"median": statistics.median(r), "min": min(r), "max": max(r), "per_repetition": r}


class StockVLLM:
    """`python -m vllm.entrypoints.openai.api_server` with its defaults (dtype aside) on loopback."""

    def __init__(self, model_path: Path, dtype: str, log_path: Path, kv_cache_gib: int):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.log = log_path.open("w")
        # The one setting that is not vLLM's default: on CPU vLLM's default KV cache takes most of the
        # machine's memory (22 GiB of 24 here, measured), so the two servers could not both be
        # resident; it gets alignlens's (EngineConfig.kv_cache_gib).
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib)}
        self.proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
                                      str(model_path), "--dtype", dtype, "--host", "127.0.0.1", "--port",
                                      str(self.port)], stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True, env=env)

    def wait_ready(self, timeout_s: float = 900) -> float:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"stock vLLM exited with {self.proc.returncode}; see {self.log.name}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return time.perf_counter() - t0
            except OSError:
                time.sleep(1)
        raise TimeoutError("stock vLLM did not become healthy")

    def model_id(self) -> str:
        return served_model_id(self.base_url)

    def stop(self) -> None:
        import signal

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


def bench(model: str, streams: list[int], grpc_streams: list[int], max_tokens: int, repetitions: int,
          dtype: str) -> dict:
    from alignlens.service.modelstore import resolve_model

    model_path = resolve_model(model)
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    from alignlens.service.engine.config import EngineConfig

    stock = StockVLLM(model_path, dtype, tmp / f"alignlens-bench-vllm-{os.getpid()}.log", EngineConfig.kv_cache_gib)
    http_port = free_port()
    ours = ServeProcess(["--model", str(model_path), "--dtype", dtype, "--http-port", str(http_port)],
                        tmp / f"alignlens-bench-http-{os.getpid()}.log")
    try:
        log.info("serve: stock vLLM ready after %.1f s", stock.wait_ready())
        ours.start()
        ours.wait_serving()
        log.info("serve: alignlens SERVING after %.1f s", ours.start_seconds)
        ours_url = f"http://127.0.0.1:{http_port}/v1"
        ours_model = served_model_id(ours_url)
        stock_model = stock.model_id()
        prompts = list(BENCH_PROMPTS)
        modes = {
            "vllm": lambda n: run_http_streams(stock.base_url, stock_model, n, max_tokens, prompts, False),
            "http-off": lambda n: run_http_streams(ours_url, ours_model, n, max_tokens, prompts, False),
            "http-on": lambda n: run_http_streams(ours_url, ours_model, n, max_tokens, prompts, True),
            "grpc-off": lambda n: run_streams(ours.target, n, max_tokens, prompts, detail="none"),
            "grpc-on": lambda n: run_streams(ours.target, n, max_tokens, prompts, detail="summary"),
        }
        for name, fn in modes.items():  # warm-up: first requests pay one-off costs
            fn(2)
            log.info("warm-up: %s", name)
        results: dict = {}
        for n in sorted(set(streams) | set(grpc_streams)):
            names = [m for m in modes if (m.startswith("grpc") and n in grpc_streams) or
                     (not m.startswith("grpc") and n in streams)]
            runs: dict[str, list[dict]] = {m: [] for m in names}
            for rep in range(repetitions):
                order = names if rep % 2 == 0 else names[::-1]
                for m in order:
                    r = modes[m](n)
                    runs[m].append(r)
                    log.info("measure: rep %d streams %d %-8s %.1f tokens/s", rep, n, m, r["tokens_per_second"])
            results[str(n)] = {m: {"tokens_per_second": statistics.median(x["tokens_per_second"] for x in rs),
                                   "min": min(x["tokens_per_second"] for x in rs),
                                   "max": max(x["tokens_per_second"] for x in rs),
                                   "ttft_p50_seconds": statistics.median(x["ttft_p50_seconds"] for x in rs),
                                   "per_repetition": [x["tokens_per_second"] for x in rs],
                                   "repetitions": len(rs)} for m, rs in runs.items()}
            results[str(n)]["paired"] = {f"{a}/{b}": paired_ratio(runs[a], runs[b]) for a, b in PAIRS
                                         if a in runs and b in runs}
        return {"model": model_path.name, "dtype": dtype, "max_tokens": max_tokens, "streams": results}
    finally:
        ours.stop()
        stock.stop()


def markdown(report: dict) -> str:
    lines = [f"Model {report['model']}, {report['dtype']}, {report['max_tokens']} tokens per stream (ignore_eos), "
             "greedy; tokens/s median [min, max] over the repetitions.", "",
             "| streams | stock vLLM server | alignlens HTTP, off | alignlens HTTP, attribution on | on / stock "
             "| off / stock | gRPC on | HTTP on / gRPC on | gRPC off | HTTP off / gRPC off |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def cell(row, m):
        if m not in row:
            return "-"
        r = row[m]
        return f"{r['tokens_per_second']:.1f} [{r['min']:.1f}, {r['max']:.1f}]"

    def span(p):
        return f"{p['median']:.3f} [{p['min']:.3f}, {p['max']:.3f}]"

    def ratio(row, a, b):
        return f"{row[a]['tokens_per_second'] / row[b]['tokens_per_second']:.3f}" if a in row and b in row else "-"

    for n, row in sorted(report["streams"].items(), key=lambda kv: int(kv[0])):
        lines.append(f"| {n} | {cell(row, 'vllm')} | {cell(row, 'http-off')} | {cell(row, 'http-on')} | "
                     f"{ratio(row, 'http-on', 'vllm')} | {ratio(row, 'http-off', 'vllm')} | {cell(row, 'grpc-on')} | "
                     f"{ratio(row, 'http-on', 'grpc-on')} | {cell(row, 'grpc-off')} | "
                     f"{ratio(row, 'http-off', 'grpc-off')} |")
    lines += ["", "Paired by repetition (each repetition's ratio; median [min, max]):", "",
              "| streams | " + " | ".join(f"{a} / {b}" for a, b in PAIRS) + " |",
              "|---:|" + "---:|" * len(PAIRS)]
    for n, row in sorted(report["streams"].items(), key=lambda kv: int(kv[0])):
        paired = row.get("paired", {})
        cells = [span(paired[f"{a}/{b}"]) if f"{a}/{b}" in paired else "-" for a, b in PAIRS]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="python -m tools.bench.http", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--streams", default="1,8,32", help="concurrent streams, HTTP (stock vLLM and alignlens)")
    p.add_argument("--grpc-streams", default="1,8", help="concurrent streams through the gRPC port as well")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repetitions", type=int, default=5)
    p.add_argument("--dtype", default="float32", help="both servers (alignlens's default)")
    p.add_argument("--json", action="store_true", help="print the JSON report as the last line")
    p.add_argument("--out", help="write the Markdown table here")
    args = p.parse_args(argv)
    report = bench(args.model, [int(x) for x in args.streams.split(",")],
                   [int(x) for x in args.grpc_streams.split(",") if x], args.max_tokens, args.repetitions, args.dtype)
    from tools.bench.__main__ import emit

    return emit(markdown(report), report, args.out, args.json)


if __name__ == "__main__":
    sys.exit(main())
