"""`python -m tools.soak`: the server under load, then under a long mixed load; prints numbers.

Two phases against one `alignlens serve` (started here on loopback unless `--target` names one):

1. **cancel storm**: `--streams` (64) concurrent Generate streams at once, half of them cancelled at
   a random token; the other half must finish without an error, and afterwards the server's
   `alignlens_requests_running`, `alignlens_capture_open_requests`,
   `alignlens_capture_buffered_records` and the worker's `alignlens_capture_worker_requests` must
   all be back to 0.
2. **soak**: `--duration` seconds of arrivals at a fixed `--rate` per second (Poisson), each drawn
   from the mix: Generate (detail summary), Audit of a logged completion, a bad request (must be
   INVALID_ARGUMENT), and a Generate cancelled after a few tokens. Reported: p50 / p99 latency per
   kind, outcomes by gRPC code per kind, and the resident memory of the server and of its engine
   processes at the start and the end (sampled every 30 s).

Everything is printed as a table and, with `--json`, as one JSON line; `--out FILE` writes the
Markdown. The exit status is 1 when a phase saw an unexpected outcome (an error on a stream that
was not cancelled, a bad request not INVALID_ARGUMENT, a gauge not back to 0).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from alignlens.service.client import AttributionClient, pb2

log = logging.getLogger("soak")

PROMPTS = ["The capital of France is", "def add(a, b):", "Once upon a time", "List three colours:",
           "Question: what is two plus two? Answer:", "The quick brown fox", "import numpy as np\n",
           "Dear team,"]
GAUGES = ("alignlens_requests_running", "alignlens_capture_open_requests", "alignlens_capture_buffered_records",
          "alignlens_capture_worker_requests")


def _metrics(url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}


def wait_gauges_zero(metrics_url: str, timeout_s: float = 30.0) -> dict[str, float]:
    """The gauges once all are 0, or their last values after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        values = {k: _metrics(metrics_url).get(k, float("nan")) for k in GAUGES}
        if all(v == 0 for v in values.values()) or time.monotonic() > deadline:
            return values
        time.sleep(0.25)


def rss_mib(pid: int) -> dict[str, float]:
    """Resident memory of the server process and of all its descendants (the engine), MiB."""
    import psutil

    proc = psutil.Process(pid)
    children = proc.children(recursive=True)
    engine = 0
    for c in children:
        try:
            engine += c.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return {"server": proc.memory_info().rss / 2**20, "engine": engine / 2**20}


def cancel_storm(client: AttributionClient, streams: int, max_tokens: int, seed: int = 0) -> dict:
    """`streams` concurrent Generate streams, half cancelled at a random token."""
    rng = random.Random(seed)
    plan = [rng.randint(1, max_tokens - 2) if i % 2 else None for i in range(streams)]
    outcomes: list[tuple[bool, str, int]] = [None] * streams  # (cancelled?, code, tokens)
    start = threading.Barrier(streams)

    def run(i: int) -> None:
        cut = plan[i]
        start.wait()
        stream = client.generate(PROMPTS[i % len(PROMPTS)], max_tokens=max_tokens, ignore_eos=True,
                                 temperature=0.8, seed=i, detail="summary")
        n = 0
        try:
            for _token in stream:
                n += 1
                if cut is not None and n == cut:
                    stream.cancel()
                    break
            code = "CANCELLED" if cut is not None else ("OK" if stream.finished is not None else "NO_FINISHED")
        except grpc.RpcError as err:
            code = err.code().name
        outcomes[i] = (cut is not None, code, n)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        list(pool.map(run, range(streams)))
    kept = [o for o in outcomes if not o[0]]
    return {"streams": streams, "cancelled": sum(o[0] for o in outcomes), "seconds": time.perf_counter() - t0,
            "kept_outcomes": dict(Counter(o[1] for o in kept)),
            "kept_complete": sum(o[1] == "OK" and o[2] == max_tokens for o in kept),
            "cancelled_outcomes": dict(Counter(o[1] for o in outcomes if o[0]))}


def _bad_request(rng: random.Random) -> pb2.GenerateRequest:
    return rng.choice([
        pb2.GenerateRequest(),  # no prompt
        pb2.GenerateRequest(prompt=pb2.Prompt(text="Hi"), sampling=pb2.SamplingParameters(max_tokens=10**6)),
        pb2.GenerateRequest(prompt=pb2.Prompt(text="Hi"), sampling=pb2.SamplingParameters(temperature=-1)),
        pb2.GenerateRequest(prompt=pb2.Prompt(token_ids=pb2.TokenIds(ids=[2**31]))),
    ])


def soak(client: AttributionClient, pid: int | None, duration_s: float, rate: float, max_tokens: int,
         seed: int = 0) -> dict:
    """Poisson arrivals at `rate`/s for `duration_s`, mixed kinds; latency, codes, memory."""
    rng = random.Random(seed)
    mix = [("generate", 0.5), ("audit", 0.2), ("bad_input", 0.15), ("cancel", 0.15)]
    logged = list(client.generate(PROMPTS[0], max_tokens=48, temperature=0, detail="none"))
    audit_ids = [t.token_id for t in logged]
    latency: dict[str, list[float]] = defaultdict(list)
    codes: dict[str, Counter] = defaultdict(Counter)
    lock = threading.Lock()
    memory: list[tuple[float, dict]] = []

    def one(kind: str, i: int) -> None:
        t0 = time.perf_counter()
        try:
            if kind == "generate":
                list(client.generate(PROMPTS[i % len(PROMPTS)], max_tokens=max_tokens, temperature=0.8, seed=i,
                                     ignore_eos=True, detail="summary"))
            elif kind == "audit":
                client.audit(PROMPTS[0], audit_ids, detail="summary")
            elif kind == "bad_input":
                list(client.stub.Generate(_bad_request(random.Random(i)), timeout=60, metadata=client.metadata))
            else:
                stream = client.generate(PROMPTS[i % len(PROMPTS)], max_tokens=max_tokens, ignore_eos=True,
                                         detail="summary")
                for n, _token in enumerate(stream):
                    if n == 2:
                        stream.cancel()
                        break
            code = "CANCELLED" if kind == "cancel" else "OK"
        except grpc.RpcError as err:
            code = err.code().name
        with lock:
            latency[kind].append(time.perf_counter() - t0)
            codes[kind][code] += 1

    if pid is not None:
        memory.append((0.0, rss_mib(pid)))
    t_start = time.monotonic()
    next_sample = 30.0
    i = 0
    with ThreadPoolExecutor(256) as pool:
        t_next = t_start
        while (now := time.monotonic()) - t_start < duration_s:
            if now < t_next:
                time.sleep(min(t_next - now, 0.5))
                continue
            kind = rng.choices([k for k, _ in mix], [w for _, w in mix])[0]
            pool.submit(one, kind, i)
            i += 1
            t_next += rng.expovariate(rate)
            if pid is not None and now - t_start >= next_sample:
                memory.append((now - t_start, rss_mib(pid)))
                next_sample += 30.0
    if pid is not None:
        memory.append((time.monotonic() - t_start, rss_mib(pid)))

    def pct(values: list[float], q: float) -> float:
        return statistics.quantiles(values, n=100)[q - 1] if len(values) >= 2 else (values[0] if values else 0.0)

    return {"duration_s": duration_s, "rate_per_s": rate, "requests": i, "max_tokens": max_tokens,
            "by_kind": {k: {"n": len(v), "p50_s": pct(v, 50), "p99_s": pct(v, 99), "codes": dict(codes[k])}
                        for k, v in sorted(latency.items())},
            "memory_mib": [{"t_s": t, **m} for t, m in memory]}


def storm_unexpected(storm: dict) -> list[str]:
    """What the cancel storm saw that it must not have."""
    if set(storm["kept_outcomes"]) != {"OK"} or storm["kept_complete"] != storm["streams"] - storm["cancelled"]:
        return [f"streams not cancelled ended with {storm['kept_outcomes']}"]
    return []


def soak_unexpected(soaked: dict) -> list[str]:
    """Outcomes of the soak that its kind of request must not have."""
    expected = {"generate": {"OK"}, "audit": {"OK"}, "bad_input": {"INVALID_ARGUMENT"}, "cancel": {"CANCELLED"}}
    return [f"{kind}: {row['codes']}" for kind, row in soaked["by_kind"].items() if set(row["codes"]) - expected[kind]]


def gauges_unexpected(gauges: dict) -> list[str]:
    return [f"gauges not back to 0: {gauges}"] if any(v != 0 for v in gauges.values()) else []


def markdown(report: dict) -> str:
    storm = report["cancel_storm"]
    lines = ["| phase | measure | value |", "|---|---|---|",
             f"| cancel storm | streams / cancelled at a random token | {storm['streams']} / {storm['cancelled']} |",
             f"| cancel storm | outcomes of the streams not cancelled | {storm['kept_outcomes']} "
             f"({storm['kept_complete']} complete) |",
             f"| cancel storm | gauges afterwards | {report['gauges_after_storm']} |"]
    soaked = report.get("soak")
    if soaked:
        lines.append(f"| soak | duration, rate, requests | {soaked['duration_s']:.0f} s, {soaked['rate_per_s']}/s, "
                     f"{soaked['requests']} |")
        for kind, row in soaked["by_kind"].items():
            lines.append(f"| soak | {kind}: n, p50, p99, codes | {row['n']}, {row['p50_s']:.2f} s, "
                         f"{row['p99_s']:.2f} s, {row['codes']} |")
        mem = soaked["memory_mib"]
        if mem:
            lines.append(f"| soak | RSS server, engine at start (MiB) | {mem[0]['server']:.0f}, {mem[0]['engine']:.0f} |")
            lines.append(f"| soak | RSS server, engine at end (MiB) | {mem[-1]['server']:.0f}, {mem[-1]['engine']:.0f} |")
        lines.append(f"| soak | gauges afterwards | {report['gauges_after_soak']} |")
    lines.append(f"| result | unexpected outcomes | {report['unexpected'] or 'none'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--target", help="an already running server (default: start one here)")
    p.add_argument("--metrics-url", help="its /metrics (with --target)")
    p.add_argument("--model", default="default", help="model of the server started here")
    p.add_argument("--serve-arg", action="append", default=[], help="extra `alignlens serve` flag (repeatable)")
    p.add_argument("--streams", type=int, default=64, help="concurrent streams of the cancel storm")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per Generate")
    p.add_argument("--duration", type=float, default=600.0, help="soak seconds (0: no soak)")
    p.add_argument("--rate", type=float, default=2.0, help="soak arrivals per second")
    p.add_argument("--json", action="store_true")
    p.add_argument("--out", help="write the Markdown table here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)

    server = None
    if args.target:
        target, metrics_url, pid = args.target, args.metrics_url, None
    else:
        from tools.serve_process import ServeProcess

        log_path = Path(tempfile.mkdtemp(prefix="alignlens-soak-")) / "server.log"
        server = ServeProcess(["--model", args.model, "--max-queue", str(max(64, args.streams)), *args.serve_arg],
                              log_path)
        server.start()
        log.info("starting alignlens serve (log %s) ...", log_path)
        server.wait_serving()
        target, metrics_url, pid = server.target, server.metrics_url, server.proc.pid
    try:
        with AttributionClient(target, timeout_s=600) as client:
            log.info("cancel storm: %d streams of %d tokens, half cancelled", args.streams, args.max_tokens)
            storm = cancel_storm(client, args.streams, args.max_tokens)
            report = {"target": target, "cancel_storm": storm,
                      "gauges_after_storm": wait_gauges_zero(metrics_url) if metrics_url else {}}
            log.info("cancel storm: %s", storm)
            soaked = None
            if args.duration > 0:
                log.info("soak: %.0f s at %.1f requests/s", args.duration, args.rate)
                soaked = soak(client, pid, args.duration, args.rate, args.max_tokens)
                report["soak"] = soaked
                report["gauges_after_soak"] = wait_gauges_zero(metrics_url) if metrics_url else {}
            gauges = {**report["gauges_after_storm"], **{k + " (soak)": v for k, v in
                                                         report.get("gauges_after_soak", {}).items()}}
            report["unexpected"] = (storm_unexpected(storm) + (soak_unexpected(soaked) if soaked else [])
                                    + gauges_unexpected(gauges))
    finally:
        if server is not None:
            server.stop()
    table = markdown(report)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    if args.json:
        print(json.dumps(report))
    return 1 if report["unexpected"] else 0


if __name__ == "__main__":
    sys.exit(main())
