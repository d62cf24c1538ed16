"""`python -m tools.bench.threads`: where the CPU goes while alignlens serves HTTP streams.

One alignlens server (`alignlens serve --http-port`, its defaults plus any `--env K=V`), the
bench's openai client (tools.bench.http.run_http_streams), attribution on and off alternating.
For each batch it reads /proc before and after: how busy each core was, and the CPU time of
every thread of every process on the machine, per generated token. This is how the cost of
attribution was split between the worker's forward, the probe's threads, the engine core, the
server and the client (docs/benchmarks/http-vs-vllm.md); a slower forward with the same step
count shows as more worker milliseconds per token.
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import statistics
import sys
from pathlib import Path

from tools.bench.engines import BENCH_PROMPTS
from tools.bench.http import run_http_streams, served_model_id
from tools.serve_process import ServeProcess, free_port

log = logging.getLogger("tools.bench.threads")
HZ = os.sysconf("SC_CLK_TCK")


def core_ticks() -> dict[str, tuple[int, int]]:
    """cpuN -> (busy ticks, all ticks) from /proc/stat (idle and iowait are not busy)."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                name, *values = line.split()
                v = [int(x) for x in values]
                out[name] = (sum(v) - v[3] - v[4], sum(v))
    return out


def thread_ticks(names: dict[str, str] | None = None) -> dict[tuple[str, str], tuple[str, str, int]]:
    """(pid, tid) -> (process name, thread name, user+system ticks) for every thread readable;
    `names` renames processes by pid (the server and this client are both "python")."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/comm") as f:
                proc = (names or {}).get(pid) or f.read().strip()
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    stat = f.read()
                fields = stat[stat.rindex(")") + 2:].split()
                out[(pid, tid)] = (proc, stat[stat.index("(") + 1:stat.rindex(")")], int(fields[11]) + int(fields[12]))
        except OSError:  # the thread or process ended meanwhile
            continue
    return out


def measure(fn, names: dict[str, str] | None = None) -> dict:
    """Run fn() (a run_http_streams call) and report cores' busy share and threads' CPU per token."""
    c0, t0 = core_ticks(), thread_ticks(names)
    result = fn()
    c1, t1 = core_ticks(), thread_ticks(names)
    per_thread: collections.Counter = collections.Counter()
    for key, (proc, thread, ticks) in t1.items():
        if key in t0 and ticks > t0[key][2]:
            per_thread[f"{proc}/{thread}"] += (ticks - t0[key][2]) / HZ
    tokens = result["tokens"]
    return {"tokens_per_second": result["tokens_per_second"],
            "core_busy": {k: (c1[k][0] - c0[k][0]) / max(1, c1[k][1] - c0[k][1]) for k in sorted(c1)},
            "ms_per_token": {k: 1000 * s / tokens for k, s in per_thread.most_common(12)}}


def markdown(report: dict) -> str:
    """Per-thread CPU ms per token, median over repetitions, attribution on beside off."""
    runs = report["runs"]
    lines = [f"{report['streams']} streams x {report['max_tokens']} tokens, {len(runs['on'])} repetitions per "
             "mode; CPU ms per generated token, median over repetitions", "", "| thread | attribution on | off |",
             "|---|---:|---:|"]

    def med(mode, name):
        return statistics.median(row["ms_per_token"].get(name, 0.0) for row in runs[mode])

    threads = {k for rows in runs.values() for row in rows for k in row["ms_per_token"]}
    for name in sorted(threads, key=lambda n: -med("on", n)):
        if max(med("on", name), med("off", name)) >= 0.05:
            lines.append(f"| {name} | {med('on', name):.2f} | {med('off', name):.2f} |")
    tps = {m: statistics.median(r["tokens_per_second"] for r in rows) for m, rows in runs.items()}
    lines += ["", f"tokens/s: on {tps['on']:.1f}, off {tps['off']:.1f} (on / off {tps['on'] / tps['off']:.3f})"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="python -m tools.bench.threads", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repetitions", type=int, default=3)
    p.add_argument("--env", action="append", default=[], help="K=V for the server's environment (repeatable)")
    p.add_argument("--json", action="store_true", help="print the JSON report as the last line")
    p.add_argument("--out", help="write the Markdown table here")
    args = p.parse_args(argv)
    from alignlens.service.modelstore import resolve_model

    model_path = resolve_model(args.model)
    env = dict(os.environ, **dict(kv.split("=", 1) for kv in args.env))
    port = free_port()
    server = ServeProcess(["--model", str(model_path), "--dtype", "float32", "--http-port", str(port)],
                          Path(os.environ.get("TMPDIR", "/tmp")) / f"alignlens-bench-threads-{os.getpid()}.log", env=env)
    runs: dict[str, list[dict]] = {"on": [], "off": []}
    try:
        server.start()
        server.wait_serving()
        url = f"http://127.0.0.1:{port}/v1"
        model_id = served_model_id(url)
        for attribution in (True, False):  # warm-up
            run_http_streams(url, model_id, 2, 16, list(BENCH_PROMPTS), attribution)
        names = {str(server.proc.pid): "alignlens-server", str(os.getpid()): "openai-client"}
        for rep in range(args.repetitions):
            for mode in (("on", "off") if rep % 2 == 0 else ("off", "on")):
                row = measure(lambda: run_http_streams(url, model_id, args.streams, args.max_tokens,
                                                       list(BENCH_PROMPTS), mode == "on"), names)
                runs[mode].append(row)
                log.info("rep %d %-3s %.1f tokens/s, cores %s", rep, mode, row["tokens_per_second"],
                         " ".join(f"{k}={v:.2f}" for k, v in row["core_busy"].items()))
    finally:
        server.stop()
    report = {"streams": args.streams, "max_tokens": args.max_tokens, "env": args.env, "runs": runs}
    from tools.bench.__main__ import emit

    return emit(markdown(report), report, args.out, args.json)


if __name__ == "__main__":
    sys.exit(main())
