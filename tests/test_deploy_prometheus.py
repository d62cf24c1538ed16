"""A real Prometheus scrapes a real `alignlens serve` while it serves (issue 6, item 5).

The server runs a tiny random Llama (tests/tests.support.tiny.py) with an untrained probe artifact made
for that checkpoint, eager and with multiprocessing as in production. Prometheus (Debian's
package) runs on loopback with deploy/prometheus's recording and alert rules and a 1 s scrape
interval. The test sends a few Generate calls, one invalid one and one GetModelInfo, then checks
through Prometheus's HTTP query API that every alignlens_ series arrived and agrees with what the
client saw: request counts per rpc/code, token counts, histogram counts, queue gauges, attribution
counters, the 0 -> 1 engine-health transition, the recording rules, and that no alert fires.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.prometheus_harness import PrometheusServer
from tests.support.tiny import make_probe_artifact
from tests.test_deploy import METRICS, RULE_FILES
from tools.serve_process import REPO, ServeProcess, ServeProcessError

pytestmark = pytest.mark.slow

N_GENERATE = 3
MAX_TOKENS = 8
MAX_QUEUE = 8
START_TIMEOUT_S = 300


def _require_server() -> None:
    import shutil

    if shutil.which("prometheus") is None:
        pytest.skip("prometheus not installed (run deploy/scripts/install-tools.sh)")
    try:
        import alignlens.service.cli.serve
        import alignlens.service.server.app  # noqa: F401
    except ModuleNotFoundError as exc:
        pytest.skip(f"`alignlens serve` cannot be imported yet: module {exc.name} is missing")
    pytest.importorskip("vllm", reason="vLLM is not installed")


def _traffic(address: str) -> dict:
    """The client's own account of what it sent and received."""
    import grpc

    from alignlens.service.protos import load

    pb2, pb2_grpc = load()
    seen = {"tokens": 0, "prompt_tokens": 0, "streams": 0}
    with grpc.insecure_channel(address) as channel:
        stub = pb2_grpc.AttributionServiceStub(channel)
        for i in range(N_GENERATE):
            request = pb2.GenerateRequest(prompt=pb2.Prompt(text=f"The capital of France is {i}"),
                                          sampling=pb2.SamplingParameters(max_tokens=MAX_TOKENS, temperature=0.0,
                                                                          ignore_eos=True),
                                          request_id=f"deploy-test-{i}")
            for message in stub.Generate(request, timeout=120):
                if message.HasField("token"):
                    seen["tokens"] += 1
                else:
                    seen["prompt_tokens"] += message.finished.prompt_tokens
            seen["streams"] += 1
        bad = pb2.GenerateRequest(prompt=pb2.Prompt(text="x"), sampling=pb2.SamplingParameters(temperature=5.0))
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(bad, timeout=30))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        info = stub.GetModelInfo(pb2.GetModelInfoRequest(), timeout=30)
        assert info.probe.loaded, info.probe.unavailable_reason
    return seen


def _bubblewrap() -> str | None:
    """bwrap, if it can make a user namespace with a read-only root here."""
    import shutil

    bwrap = shutil.which("bwrap")
    if bwrap and subprocess.run([bwrap, "--unshare-user", "--ro-bind", "/", "/", "true"],
                                capture_output=True, timeout=30, check=False).returncode == 0:
        return bwrap
    return None


def _like_the_image(tmp_path: Path, read_only: list[Path]) -> tuple[list[str], dict, bool]:
    """(command prefix, environment, sandboxed): the server as the CPU image and Deployment run it,
    as far as this machine allows. With bubblewrap: the image's ENV; the root file system read-only
    with tmpfs only where the Deployment mounts emptyDirs (/tmp, /var/cache), so any write elsewhere
    fails the start; HOME read-only; uid/gid 10001 in a user namespace (mapped to the test's own
    user outside, so this shows no need for uid 0 inside, not real isolation). Without it: no
    prefix, the same flags with scratch folders under tmp_path."""
    from tests.test_deploy import _image_env

    env = dict(os.environ, ALIGNLENS_METRICS_HOST="127.0.0.1", PYTHONDONTWRITEBYTECODE="1")
    bwrap = _bubblewrap()
    if bwrap is None:
        env.update(ALIGNLENS_HOME=str(tmp_path / "home"), ALIGNLENS_RUNTIME_DIR=str(tmp_path / "runtime"))
        return [], env, False
    env.update(_image_env("cpu"), HOME="/root")
    prefix = [bwrap, "--unshare-user", "--uid", "10001", "--gid", "10001", "--die-with-parent",
              "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp", "--tmpfs", "/var/cache"]
    # what lives under the host's /tmp would be hidden by the tmpfs: the test inputs, and the checkout
    # and its virtualenv when CI clones into /tmp
    for path in {*map(str, read_only), str(REPO), sys.prefix}:
        prefix += ["--ro-bind", path, path]
    return [*prefix, "--"], env, True


def test_prometheus_scrapes_a_serving_alignlens(tiny_llama, tmp_path):
    _require_server()
    probe_path = make_probe_artifact(tiny_llama, tmp_path / "probe" / "tiny.safetensors")
    prefix, env, sandboxed = _like_the_image(tmp_path, [tiny_llama, probe_path.parent])
    server = ServeProcess(["--model", str(tiny_llama), "--probe", str(probe_path), "--max-queue", str(MAX_QUEUE),
                           "--kv-cache-gib", "1", "--enforce-eager", "--max-model-len", "256"],
                          tmp_path / "serve.log", env=env, wrap=lambda cmd: [*prefix, *cmd])
    target = {"targets": [f"127.0.0.1:{server.metrics_port}"]}
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
              "scrape_configs": [{"job_name": "alignlens", "static_configs": [target]}]}
    server.start()
    try:
        with PrometheusServer(tmp_path / "prometheus", config, RULE_FILES) as prom:
            try:
                server.wait_serving(START_TIMEOUT_S)
            except ServeProcessError as exc:
                pytest.fail(str(exc))
            seen = _traffic(server.target)
            _check_series(prom, seen)
        # bwrap does not forward signals: send SIGTERM to the server itself, its only child.
        pid = server.proc.pid
        server_pid = int(Path(f"/proc/{pid}/task/{pid}/children").read_text().split()[0]) if sandboxed else pid
        assert server.stop(pid=server_pid) == 0, server.log_tail(80)
    finally:
        server.stop(grace_s=5)
    print(f"server ran {'read-only, as uid 10001, with the image ENV (bubblewrap)' if sandboxed else 'unsandboxed'}")


def _wait_for(prom: PrometheusServer, expr: str, want: float, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if prom.value(expr) == want:
            return
        time.sleep(0.5)
    pytest.fail(f"{expr} = {prom.value(expr)} after {timeout_s} s, wanted {want}")


def _declared_buckets(name: str, n_layers: int) -> list[float]:
    """The bucket bounds service/metrics.py declares for histogram `name` (with +Inf)."""
    from alignlens.service.server.metrics import ServiceMetrics

    registry = ServiceMetrics(n_layers=n_layers, max_queue=MAX_QUEUE).registry
    return sorted(float(s.labels["le"]) for m in registry.collect() if m.name == name
                  for s in m.samples if s.name == name + "_bucket")


def _check_series(prom: PrometheusServer, seen: dict) -> None:
    job = '{job="alignlens"}'
    # Wait for the scrape after the last request, then for one rule evaluation after that.
    _wait_for(prom, 'sum(alignlens_requests_total{rpc="GetModelInfo", code="OK"})', 1)
    time.sleep(2.5)
    value = prom.value

    assert value(f"up{job}") == 1
    names = {r["metric"]["__name__"] for r in prom.query('{__name__=~"alignlens_.+", job="alignlens"}')}
    for name, kind in METRICS.items():
        expected = {"histogram": name + "_count", "counter": name + "_total", "gauge": name}[kind]
        assert expected in names, f"{expected} never arrived"

    # Engine health: 0 while the engine started, 1 since.
    assert value(f"alignlens_engine_healthy{job}") == 1
    assert value(f"min_over_time(alignlens_engine_healthy{job}[10m])") == 0

    # Requests, by rpc and code, as the client saw them.
    assert value('alignlens_requests_total{rpc="Generate", code="OK"}') == N_GENERATE
    assert value('alignlens_requests_total{rpc="Generate", code="INVALID_ARGUMENT"}') == 1
    assert value('alignlens_requests_total{rpc="GetModelInfo", code="OK"}') == 1
    assert seen["tokens"] == N_GENERATE * MAX_TOKENS  # ignore_eos: every stream runs to max_tokens
    assert value(f"alignlens_generation_tokens_total{job}") == seen["tokens"]
    assert value(f"alignlens_prompt_tokens_total{job}") == seen["prompt_tokens"] > 0

    # Latency histograms: one observation per successful stream, plausible values.
    for name in ("time_to_first_token", "e2e_request_latency"):
        assert value(f"alignlens_{name}_seconds_count{job}") == N_GENERATE, name
        p50 = value(f'histogram_quantile(0.5, sum by (le) (alignlens_{name}_seconds_bucket{job}))')
        assert 0 < p50 < 60, f"{name} p50 {p50}"
    assert value(f"alignlens_queue_time_seconds_count{job}") >= N_GENERATE
    assert 0 < value(f"alignlens_inter_token_latency_seconds_count{job}") <= seen["tokens"]
    assert value(f"alignlens_e2e_request_latency_seconds_sum{job}") >= value(
        f"alignlens_time_to_first_token_seconds_sum{job}")

    # Queue: idle again, capacity = --max-queue.
    assert value(f"alignlens_queue_capacity{job}") == MAX_QUEUE
    assert value(f"alignlens_requests_running{job}") == 0
    assert value(f"alignlens_requests_waiting{job}") == 0

    # Attribution: every live token attributed; one crystallization bucket per depth 0..L.
    attributed = value(f"alignlens_attributed_tokens_total{job}")
    assert attributed == seen["tokens"]
    assert 0 <= value(f"alignlens_readout_top1_total{job}") <= attributed
    assert value(f"alignlens_crystallization_depth_count{job}") == attributed
    buckets = sorted(float(b["metric"]["le"]) for b in prom.query(f"alignlens_crystallization_depth_bucket{job}"))
    assert buckets == _declared_buckets("alignlens_crystallization_depth", n_layers=4)  # tiny model: L = 4
    assert 0 <= value(f"alignlens_crystallization_depth_sum{job}") <= buckets[-2] * attributed
    families = {r["metric"]["family"]: float(r["value"][1])
                for r in prom.query(f"alignlens_family_importance_share_total{job}")}
    assert set(families) == {"qkv", "attn_out", "mlp_in"}
    assert sum(families.values()) == pytest.approx(attributed, rel=1e-3)  # shares sum to 1 per token
    assert value(f"alignlens_attribution_step_seconds_count{job}") >= 1

    # The recording rules evaluate on real series; no alert fires on a healthy server.
    # (alignlens_requests_total{rpc,code} series are born at their first request, so rate() cannot
    # see that first increment: the rate exists but may be 0 here; the unlabelled counters start at 0.)
    assert value("alignlens:requests:rate5m") is not None
    assert value("alignlens:attributed_tokens:rate1h") > 0
    assert 0 <= value("alignlens:readout_agreement:ratio_rate1h") <= 1
    shares = prom.query("alignlens:family_importance_share:mean_rate1h")
    assert sum(float(r["value"][1]) for r in shares) == pytest.approx(1, rel=1e-3)
    assert prom.query('ALERTS{alertstate="firing"}') == []
