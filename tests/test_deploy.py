"""deploy/ checked with the real tools (issue 6): hadolint on the Dockerfiles, a real gRPC health
server against the image's health check, `kubectl kustomize` + kubernetes-validate on every overlay,
promtool on the Prometheus configuration and rules (with unit tests for every alert), and a real
Prometheus parsing every dashboard query. Each test skips, naming the missing tool, where that
tool is not installed (deploy/scripts/install-tools.sh installs them all). Seconds in total.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from tests.support.prometheus_harness import PrometheusServer, PromQLError, free_port

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
DOCKER = DEPLOY / "docker"
K8S = DEPLOY / "k8s"
PROM = DEPLOY / "prometheus"
RULE_FILES = sorted((PROM / "rules").glob("*.yml"))
RULE_TESTS = sorted((PROM / "tests").glob("*.yml"))
DASHBOARD = DEPLOY / "grafana" / "alignlens-dashboard.json"
OVERLAYS = ("cpu", "gpu")
# Oldest Kubernetes the manifests target (native gRPC probes GA in 1.27, preStop `sleep` on by
# default from 1.30) and the newest kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")

# The metric contract with service/metrics.py (its docstring lists the same names).
METRICS = {
    "alignlens_time_to_first_token_seconds": "histogram",
    "alignlens_inter_token_latency_seconds": "histogram",
    "alignlens_e2e_request_latency_seconds": "histogram",
    "alignlens_queue_time_seconds": "histogram",
    "alignlens_requests": "counter",
    "alignlens_prompt_tokens": "counter",
    "alignlens_generation_tokens": "counter",
    "alignlens_requests_running": "gauge",
    "alignlens_requests_waiting": "gauge",
    "alignlens_queue_capacity": "gauge",
    "alignlens_engine_healthy": "gauge",
    "alignlens_attribution_step_seconds": "histogram",
    "alignlens_attributed_tokens": "counter",
    "alignlens_readout_top1": "counter",
    "alignlens_crystallization_depth": "histogram",
    "alignlens_family_importance_share": "counter",
    "alignlens_capture_records": "counter",
    "alignlens_attribution_errors": "counter",
    "alignlens_attribution_faithfulness": "histogram",
    "alignlens_attribution_verified_tokens": "counter",
    "alignlens_attribution_verify_skipped": "counter",
}
_SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "counter": ("_total",), "gauge": ("",)}
SERIES_NAMES = {name + s for name, kind in METRICS.items() for s in _SUFFIXES[kind]}
# `alignlens serve` flags (env ALIGNLENS_<FLAG>) and the env-only settings of the model store/engine.
SERVE_FLAGS = {"model", "probe", "host", "port", "metrics_port", "max_queue", "grace_period_seconds", "dtype",
               "kv_cache_gib"}
ENV_ONLY = {"ALIGNLENS_HOME", "ALIGNLENS_RUNTIME_DIR"}


def _tool(name: str) -> str:
    """Path of `name` in this interpreter's venv (where install-tools.sh puts PyPI tools), else on
    PATH; skips the test when absent."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if not found:
        pytest.skip(f"{name} not installed (run deploy/scripts/install-tools.sh)")
    return found


def _run(*cmd: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


# ---------------------------------------------------------------- images


@pytest.mark.parametrize("variant", ["cpu", "cuda"])
def test_dockerfile_passes_hadolint(variant):
    hadolint = _tool("hadolint")
    if _run(hadolint, "--version").returncode != 0:
        pytest.skip("hadolint is installed but cannot run on this machine")
    proc = _run(hadolint, "--config", str(DOCKER / ".hadolint.yaml"), str(DOCKER / f"Dockerfile.{variant}"))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("variant", ["cpu", "cuda"])
def test_dockerfile_runs_serve_as_non_root_with_grpc_health_check(variant):
    ins = _instructions(DOCKER / f"Dockerfile.{variant}")
    final_stage = ins[max(i for i, (w, _) in enumerate(ins) if w == "FROM"):]
    users = [a for w, a in final_stage if w == "USER"]
    assert users, "the final stage must switch to a non-root user"
    uid = dict(ARG.split("=", 1) for w, ARG in final_stage if w == "ARG" and "=" in ARG).get("UID")
    user = users[-1].replace("${UID}", uid or "")
    assert re.fullmatch(r"[1-9]\d*:[1-9]\d*", user), f"USER must be a numeric non-root uid:gid, got {users[-1]}"
    entry = [json.loads(a) for w, a in final_stage if w == "ENTRYPOINT"][-1]
    assert entry[-2:] == ["alignlens", "serve"]
    health = [a for w, a in final_stage if w == "HEALTHCHECK"][-1]
    assert "grpc_health_check.py" in health and "--start-period" in health
    args = {a.split("=")[0] for w, a in ins if w == "ARG"}
    assert "BAKE_MODEL" in args, "the model must be bakeable by a documented build argument"
    # Everything the build COPYs from the context must survive the context allow-list.
    ignore = (DOCKER / f"Dockerfile.{variant}.dockerignore").read_text().splitlines()
    for w, a in ins:
        if w == "COPY" and "--from" not in a and a.split()[0] != ".":
            assert f"!{a.split()[0]}" in ignore, f"{a.split()[0]} is excluded from the build context"
    pyproject = (REPO / "pyproject.toml").read_text()
    readme = re.search(r'^readme\s*=\s*"([^"]+)"', pyproject, re.MULTILINE)
    if readme:
        assert f"!{readme.group(1)}" in ignore, "pyproject's readme must be in the build context"


def test_cpu_image_uses_cpu_torch_and_drops_mismatched_vision_packages():
    text = (DOCKER / "Dockerfile.cpu").read_text()
    assert "https://download.pytorch.org/whl/cpu" in text and '"/src[cpu]"' in text
    assert re.search(r"pip uninstall -y torchvision torchaudio torchcodec", text)
    assert "ALIGNLENS_KV_CACHE_GIB" in text  # alignlens sets VLLM_CPU_KVCACHE_SPACE from it
    assert '"/src[cuda]"' in (DOCKER / "Dockerfile.cuda").read_text()


def _dockerignore_patterns(path: Path) -> list[tuple[bool, str]]:
    """(re-include?, pattern) per line, in order."""
    lines = [line.strip() for line in path.read_text().splitlines()]
    return [(line.startswith("!"), line.lstrip("!").rstrip("/")) for line in lines if line and not line.startswith("#")]


def _ignored(rel: str, patterns: list[tuple[bool, str]]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""
    parts = rel.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for include, pattern in patterns:
        alternatives = {pattern, pattern.removeprefix("**/")}  # `**/` also matches zero folders
        if any(fnmatch.fnmatchcase(c, p) for c in candidates for p in alternatives):
            ignored = not include
    return ignored


def _build_context(dockerignore: Path, dest: Path) -> list[str]:
    """Copy what `docker build` would send with this .dockerignore; returns the relative paths."""
    patterns = _dockerignore_patterns(dockerignore)
    keep_dirs = {"/".join(p.split("/")[:i]) for include, p in patterns if include for i in range(1, p.count("/") + 1)}
    copied = []
    for root, dirs, files in os.walk(REPO):
        rel_root = Path(root).relative_to(REPO).as_posix()
        rel_root = "" if rel_root == "." else rel_root + "/"
        dirs[:] = [d for d in dirs if not (_ignored(rel_root + d, patterns) and (rel_root + d) not in keep_dirs)]
        for name in files:
            rel = rel_root + name
            if not _ignored(rel, patterns):
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / rel, dest / rel)
                copied.append(rel)
    return copied


def test_build_context_makes_a_wheel_with_generated_grpc_code_and_the_probe(tmp_path):
    """The images' install step without Docker: the context the .dockerignore lets through (without
    the generated alignlens/v1), built into a wheel; what an installed alignlens needs must be in it, under
    the one `alignlens` namespace."""
    pytest.importorskip("grpc_tools", reason="grpcio-tools not installed")
    pytest.importorskip("setuptools", reason="setuptools not installed")
    # BuildKit reads <Dockerfile>.dockerignore: two files, one allow-list.
    assert (DOCKER / "Dockerfile.cpu.dockerignore").read_text() == (DOCKER / "Dockerfile.cuda.dockerignore").read_text()
    context = tmp_path / "context"
    copied = _build_context(DOCKER / "Dockerfile.cpu.dockerignore", context)
    assert "deploy/docker/grpc_health_check.py" in copied and "pyproject.toml" in copied
    assert not any(p.startswith(("tests/", ".venv/", ".git/", "alignlens/v1/", "tools/")) or "__pycache__" in p for p in copied)
    proc = _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                "-w", str(tmp_path / "dist"), str(context))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = (tmp_path / "dist").glob("alignlens-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry_points = next(zf.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    for needed in ("alignlens/__init__.py", "alignlens/service/cli/main.py", "alignlens/service/server/app.py",
                   "alignlens/probe/__init__.py", "alignlens/v1/attribution_pb2.py",
                   "alignlens/v1/attribution_pb2_grpc.py"):
        assert needed in names, needed
    # one namespace: nothing installs as a top-level `service` or `probe` package
    top_level = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith((".dist-info", ".data"))}
    assert top_level == {"alignlens"}, top_level
    assert "alignlens = alignlens.service.cli.main:main" in entry_points and "vllm.general_plugins" in entry_points
    shipped = {f"alignlens/probe/artifacts/{p.name}" for p in (REPO / "probe" / "artifacts").glob("*")}
    assert shipped <= names, "the probe artifacts must ship inside the package"
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)


@pytest.fixture
def health_server():
    """A real grpc.health.v1 server on loopback; yields (address, HealthServicer)."""
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(grace=None)


def _health_check(*args: str) -> subprocess.CompletedProcess:
    return _run(sys.executable, str(DOCKER / "grpc_health_check.py"), "--timeout-seconds", "2", *args)


def test_health_check_script_against_real_grpc_health_server(health_server):
    from grpc_health.v1 import health_pb2

    address, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    ok = _health_check("--address", address)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "SERVING" in ok.stdout
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert _health_check("--address", address).returncode == 1
    unknown = _health_check("--address", address, "--service", "no.such.Service")
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stdout


def test_health_check_script_fails_without_a_server():
    proc = _health_check("--address", f"127.0.0.1:{free_port()}")
    assert proc.returncode == 1 and "UNAVAILABLE" in proc.stdout


# ---------------------------------------------------------------- Kubernetes


def _kustomize(path: Path) -> list[dict]:
    kubectl = _tool("kubectl")
    proc = _run(kubectl, "kustomize", str(path))
    if proc.returncode != 0 and "unknown command" in proc.stderr:
        pytest.skip("this kubectl has no `kustomize` subcommand")
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {overlay: _kustomize(K8S / "overlays" / overlay) for overlay in OVERLAYS}


def _one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_manifests_validate_against_kubernetes_schemas(rendered, overlay, version):
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate not installed")
    docs = rendered[overlay]
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["Deployment", "PodDisruptionBudget", "Service", "Service", "ServiceMonitor"]
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: no schema in kubernetes-validate; see test_servicemonitor_*
        kv.validate(doc, version, strict=True)  # raises ValidationError naming the field


def test_validation_is_strict_enough_to_catch_a_misspelt_field(rendered):
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate not installed")
    deployment = json.loads(json.dumps(_one(rendered["cpu"], "Deployment")))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grcp"] = {"port": 50051}
    with pytest.raises(kv.ValidationError, match="grcp"):
        kv.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


# The fields of ServiceMonitor (monitoring.coreos.com/v1) this deployment uses, with their types
# from the Prometheus Operator CRD; anything else is a typo here.
_SM_SPEC = {"selector": dict, "endpoints": list, "namespaceSelector": dict, "jobLabel": str}
_SM_ENDPOINT = {"port": str, "path": str, "interval": str, "scrapeTimeout": str, "scheme": str,
                "honorLabels": bool, "relabelings": list, "metricRelabelings": list}
_DURATION = re.compile(r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_servicemonitor_selects_the_metrics_port_of_exactly_one_service(rendered, overlay):
    docs = rendered[overlay]
    sm = _one(docs, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(sm) == {"apiVersion", "kind", "metadata", "spec"}
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", sm["metadata"]["name"])
    for key, value in sm["spec"].items():
        assert isinstance(value, _SM_SPEC[key]), f"spec.{key}"
    assert set(sm["spec"]["selector"]) <= {"matchLabels", "matchExpressions"}
    selected = [s for s in docs if s["kind"] == "Service"
                and _matches(sm["spec"]["selector"]["matchLabels"], s["metadata"].get("labels", {}))]
    assert [s["metadata"]["name"] for s in selected] == ["alignlens"], "scrape each pod once, via one Service"
    port_names = {p["name"] for p in selected[0]["spec"]["ports"]}
    assert sm["spec"]["endpoints"]
    for endpoint in sm["spec"]["endpoints"]:
        for key, value in endpoint.items():
            assert isinstance(value, _SM_ENDPOINT[key]), f"endpoints[].{key}"
        assert endpoint["port"] in port_names
        for key in ("interval", "scrapeTimeout"):
            assert _DURATION.match(endpoint.get(key, "0")), f"{key} {endpoint.get(key)!r} is not a duration"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployment_probes_security_and_volumes(rendered, overlay):
    docs = rendered[overlay]
    deployment = _one(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert _matches(deployment["spec"]["selector"]["matchLabels"], labels)
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert set(ports) == {"grpc", "metrics"}

    # Native gRPC probes on the gRPC port; the startup probe covers model load + compilation.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == ports["grpc"], probe
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    assert pod["terminationGracePeriodSeconds"] > container["lifecycle"]["preStop"]["sleep"]["seconds"]

    # Non-root, read-only root file system, nothing extra.
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert pod["enableServiceLinks"] is False, "service links would set ALIGNLENS_PORT=tcp://..."
    assert "limits" in container["resources"] and "requests" in container["resources"]

    # Writable emptyDirs where the image writes; /dev/shm in memory.
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    for path in ("/tmp", "/var/cache/alignlens", "/dev/shm"):
        assert "emptyDir" in mounts[path], path
    assert mounts["/dev/shm"]["emptyDir"]["medium"] == "Memory"

    # Services point at the named container ports; the PDB covers the pods.
    for service in (d for d in docs if d["kind"] == "Service"):
        assert _matches(service["spec"]["selector"], labels)
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports and port["name"] == port["targetPort"]
    main = _one(docs, "Service", "alignlens")
    assert {p["name"] for p in main["spec"]["ports"]} == {"grpc", "metrics"}
    assert _one(docs, "Service", "alignlens-headless")["spec"]["clusterIP"] == "None"
    assert _matches(_one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"], labels)


def _env(docs: list[dict]) -> dict[str, str]:
    (container,) = _one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def _image_env(variant: str) -> dict[str, str]:
    """ENV of the Dockerfile's final stage."""
    ins = _instructions(DOCKER / f"Dockerfile.{variant}")
    final_stage = ins[max(i for i, (w, _) in enumerate(ins) if w == "FROM"):]
    return dict(pair.split("=", 1) for w, a in final_stage if w == "ENV" for pair in a.split())


# Where the image points every writer (caches, the model store, the side channel, temp files).
_WRITABLE_ENV = ("ALIGNLENS_HOME", "ALIGNLENS_RUNTIME_DIR", "VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR",
                 "XDG_CACHE_HOME", "TRITON_CACHE_DIR", "NUMBA_CACHE_DIR", "TMPDIR")


@pytest.mark.parametrize(("variant", "overlay"), [("cpu", "cpu"), ("cuda", "gpu")])
def test_image_writes_only_where_the_pod_mounts_writable_volumes(rendered, variant, overlay):
    """With a read-only root file system, every path the image writes to must be an emptyDir."""
    from alignlens.service.modelstore import DEFAULT_MODEL_NAME

    env = _image_env(variant)
    pod = _one(rendered[overlay], "Deployment")["spec"]["template"]["spec"]
    empty_dirs = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    writable = [m["mountPath"] for m in pod["containers"][0]["volumeMounts"] if m["name"] in empty_dirs]
    for name in _WRITABLE_ENV:
        assert any(Path(env[name]).is_relative_to(w) for w in writable), f"{name}={env[name]} is read-only"
    # The baked model is named by path (ALIGNLENS_HOME is scratch space), outside every volume.
    model = Path(env["ALIGNLENS_MODEL"])
    assert model == Path("/opt/alignlens/models") / DEFAULT_MODEL_NAME
    assert not any(model.is_relative_to(w) for w in writable)


def test_overlays_size_cpu_and_gpu_pods(rendered):
    cpu = _one(rendered["cpu"], "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert cpu["image"].endswith(":cpu")
    kv_cache_gib = int(_env(rendered["cpu"])["ALIGNLENS_KV_CACHE_GIB"])
    assert int(cpu["resources"]["limits"]["memory"].removesuffix("Gi")) >= kv_cache_gib + 4
    gpu_pod = _one(rendered["gpu"], "Deployment")["spec"]["template"]["spec"]
    gpu = gpu_pod["containers"][0]
    assert gpu["image"].endswith(":cuda")
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == gpu["resources"]["requests"]["nvidia.com/gpu"]
    assert "ALIGNLENS_KV_CACHE_GIB" not in _env(rendered["gpu"])
    assert any(t["key"] == "nvidia.com/gpu" for t in gpu_pod["tolerations"])


def _with_component(tmp_path: Path, base: str, component: str) -> list[dict]:
    """Render overlay `base` plus `component` as a user's own overlay would, validated strictly."""
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        # kustomize refuses absolute paths to other kustomizations
        "resources": [os.path.relpath(K8S / "overlays" / base, overlay)],
        "components": [os.path.relpath(K8S / "components" / component, overlay)]}))
    docs = _kustomize(overlay)
    try:
        import kubernetes_validate as kv
    except ModuleNotFoundError:
        return docs  # schema validation is skipped where it is not installed (make test installs it)
    for doc in docs:
        if doc["kind"] != "ServiceMonitor":
            kv.validate(doc, KUBERNETES_VERSIONS[-1], strict=True)
    return docs


def test_model_volume_component_renders_and_validates(tmp_path):
    docs = _with_component(tmp_path, "gpu", "model-volume")
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/models")
    assert mount["readOnly"] is True
    claim = next(v for v in pod["volumes"] if v["name"] == mount["name"])["persistentVolumeClaim"]["claimName"]
    assert _one(docs, "PersistentVolumeClaim", claim)
    assert _env(docs)["ALIGNLENS_MODEL"].startswith("/models/")


def test_tls_auth_component_mounts_secrets_and_probes_the_health_port(tmp_path):
    docs = _with_component(tmp_path, "cpu", "tls-auth")
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = _env(docs)
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for name in ("ALIGNLENS_TLS_CERT", "ALIGNLENS_TLS_KEY", "ALIGNLENS_AUTH_TOKEN_FILE"):
        folder = os.path.dirname(env[name])
        assert mounts[folder]["readOnly"] is True, name
        assert "secret" in volumes[mounts[folder]["name"]], name  # the credentials come from Secrets
    port = int(env["ALIGNLENS_HEALTH_PORT"])
    assert port != int(env["ALIGNLENS_PORT"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == port, probe
    assert any(p["containerPort"] == port for p in container["ports"])
    assert not any("TOKEN" in k and "FILE" not in k for k in env), "a token in the pod spec"
    flags = _serve_flags()
    assert all(k.removeprefix("ALIGNLENS_").lower() in flags for k in env if k.startswith("ALIGNLENS_"))


def _serve_flags() -> set[str]:
    """Flags of `alignlens serve` from its own parser where it exists, else the contract above."""
    import argparse

    try:
        import alignlens.service.cli.serve  # noqa: F401
    except ModuleNotFoundError:
        return SERVE_FLAGS
    from alignlens.service.cli.main import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    found = {o[2:].replace("-", "_") for a in sub.choices["serve"]._actions for o in a.option_strings
             if o.startswith("--")}
    assert SERVE_FLAGS <= found, f"serve lacks {SERVE_FLAGS - found}"
    return found


def test_alignlens_env_names_are_serve_flags(rendered):
    flags = _serve_flags()
    names = set()
    for overlay in OVERLAYS:
        names |= set(_env(rendered[overlay]))
    for variant in ("cpu", "cuda"):
        names |= set(re.findall(r"\b(ALIGNLENS_[A-Z_]+)=", (DOCKER / f"Dockerfile.{variant}").read_text()))
    names |= {"ALIGNLENS_MODEL"}  # components/model-volume
    for name in sorted(n for n in names if n.startswith("ALIGNLENS_") and n not in ENV_ONLY):
        assert name.removeprefix("ALIGNLENS_").lower() in flags, f"{name} is no `alignlens serve` flag"


# ---------------------------------------------------------------- Prometheus


def test_promtool_checks_config_and_rules():
    promtool = _tool("promtool")
    proc = _run(promtool, "check", "config", str(PROM / "prometheus.yml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = _run(promtool, "check", "rules", *map(str, RULE_FILES))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_checks_kubernetes_scrape_config(tmp_path):
    """prometheus-kubernetes.yml; Debian's promtool is built without Kubernetes service discovery,
    so there its relabelling is checked with the discovery block swapped for a static one."""
    promtool = _tool("promtool")
    proc = _run(promtool, "check", "config", str(PROM / "prometheus-kubernetes.yml"))
    if proc.returncode != 0 and "kubernetes_sd_configs not found" in proc.stdout + proc.stderr:
        config = yaml.safe_load((PROM / "prometheus-kubernetes.yml").read_text())
        for job in config["scrape_configs"]:
            assert job.pop("kubernetes_sd_configs") == [{"role": "endpoints"}]
            job["static_configs"] = [{"targets": ["127.0.0.1:9400"]}]
        config["rule_files"] = [str(PROM / r) for r in config["rule_files"]]
        (tmp_path / "k8s.yml").write_text(yaml.safe_dump(config))
        proc = _run(promtool, "check", "config", str(tmp_path / "k8s.yml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_unit_tests_pass():
    promtool = _tool("promtool")
    proc = _run(promtool, "test", "rules", *map(str, RULE_TESTS))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("SUCCESS") == len(RULE_TESTS)


def _rules() -> list[dict]:
    return [r for f in RULE_FILES for g in yaml.safe_load(f.read_text())["groups"] for r in g["rules"]]


def test_every_alert_has_a_firing_and_a_quiet_unit_test():
    alerts = {r["alert"] for r in _rules() if "alert" in r}
    assert len(alerts) >= 5
    fires, quiet = set(), set()
    for path in RULE_TESTS:
        for test in yaml.safe_load(path.read_text())["tests"]:
            for case in test.get("alert_rule_test", []):
                (fires if case.get("exp_alerts") else quiet).add(case["alertname"])
    assert alerts - fires == set(), "alerts with no test where they fire"
    assert alerts - quiet == set(), "alerts with no test where they stay quiet"
    assert (fires | quiet) <= alerts, "tests of alerts that do not exist"


_IDENT = re.compile(r"(?<![\w:\"'])(alignlens[_:][A-Za-z0-9_:]*)")


def _referenced(expr: str) -> set[str]:
    return set(_IDENT.findall(re.sub(r'"[^"]*"', '""', expr)))


def _recorded() -> set[str]:
    return {r["record"] for r in _rules() if "record" in r}


def _dashboard_exprs(dashboard: dict) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return exprs


def test_rules_and_dashboard_reference_only_known_metrics():
    recorded = _recorded()
    assert all(name.startswith("alignlens:") for name in recorded)
    exprs = [r["expr"] for r in _rules()] + _dashboard_exprs(json.loads(DASHBOARD.read_text()))
    for expr in exprs:
        for name in _referenced(expr):
            assert name in SERIES_NAMES or name in recorded, f"unknown metric {name} in {expr!r}"


def test_metric_contract_matches_the_service():
    """Every metric deploy/ relies on is exported by service/metrics.py, with the same type."""
    metrics = pytest.importorskip("alignlens.service.server.metrics", reason="service/metrics.py not built yet")
    registry = metrics.ServiceMetrics(n_layers=30, max_queue=8).registry
    exported = {m.name: m.type for m in registry.collect()}
    assert {name: exported.get(name) for name in METRICS} == METRICS
    depths = sorted(float(s.labels["le"]) for m in registry.collect() if m.name == "alignlens_crystallization_depth"
                    for s in m.samples if s.name.endswith("_bucket"))
    assert depths[:31] == [float(d) for d in range(31)], "one bucket per depth 0..L (L = 30 here)"


# ---------------------------------------------------------------- Grafana


def test_dashboard_is_valid_and_covers_serving_and_attribution():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0
        if panel["type"] != "row":
            assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}"
            assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "job", "instance"} <= variables
    exprs = "\n".join(_dashboard_exprs(dashboard))
    for needed in ("alignlens_time_to_first_token_seconds_bucket", "alignlens_generation_tokens_total",
                   "alignlens_requests_waiting", "alignlens_queue_capacity", "alignlens_readout_top1_total",
                   "alignlens_family_importance_share_total", "alignlens_crystallization_depth_bucket"):
        assert needed in exprs, needed
    heatmaps = [p for p in dashboard["panels"] if p["type"] == "heatmap"]
    assert any("alignlens_crystallization_depth_bucket" in t["expr"] and t.get("format") == "heatmap"
               for p in heatmaps for t in p["targets"])


def _substitute(expr: str) -> str:
    """Grafana's variables as Grafana would send them."""
    return (expr.replace("$__rate_interval", "1m").replace("$job", "alignlens")
            .replace("$instance", ".*").replace("${datasource}", "prometheus"))


def test_dashboard_queries_parse_in_a_real_prometheus(tmp_path):
    _tool("prometheus")
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    with PrometheusServer(tmp_path, {"global": {"scrape_interval": "15s"}, "scrape_configs": []}) as prom:
        for expr in exprs:
            try:
                prom.query(_substitute(expr))
            except PromQLError as err:
                pytest.fail(f"{expr!r}: {err}")
        for variable in dashboard["templating"]["list"]:
            if variable["type"] == "query":  # label_values(metric{...}, label) -> the series API
                match = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["query"]["query"])
                prom.api("series", **{"match[]": _substitute(match.group(1))})
