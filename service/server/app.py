"""`alignlens serve`: the gRPC server process (grpc.aio) hosting the capture engine.

Life of the process, in order:
  1. facts: model checkpoint, tokenizer, fingerprint, probe choice (service/model_info.py);
     a probe for another host stops here, before any engine time is spent;
  2. metrics: /metrics on its own HTTP port (alignlens_engine_healthy = 0 while starting);
  3. gRPC: AttributionService, grpc.health.v1 (NOT_SERVING while starting) and reflection,
     bound and answering, so orchestrators can probe health during the engine's start-up; TLS,
     mTLS and bearer tokens (server/security.py) guard all but health;
  4. engine: CaptureEngine (AsyncLLM, multiprocessing, compiled unless --enforce-eager, the
     capture plugin, the probe in the worker), warmed up with one request; then health SERVING;
  5. watch: a dead engine turns health NOT_SERVING, the gauge 0 and RPCs UNAVAILABLE, and the
     process exits with status 3 two seconds later, for its supervisor to restart it;
  6. drain on SIGTERM/SIGINT: health NOT_SERVING, new requests refused (UNAVAILABLE), requests
     in flight get `grace_period_seconds` to finish, then the server, engine and metrics stop
     and the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from alignlens.probe.record import Detail
from alignlens.service.engine import runtime
from alignlens.service.engine.async_engine import CaptureEngine
from alignlens.service.engine.config import EngineConfig, runtime_dir
from alignlens.service.engine.wire import CaptureOptions
from alignlens.service.protos import MAX_MESSAGE_BYTES, load
from alignlens.service.server import model_info as facts
from alignlens.service.server import security
from alignlens.service.server.admission import Admission
from alignlens.service.server.metrics import ServiceMetrics
from alignlens.service.server.servicer import AttributionServicer, ServerState
from alignlens.service.server.validation import ModelLimits
from alignlens.service.server.verify import Verifier

pb2, pb2_grpc = load()
log = logging.getLogger(__name__)

# A dead engine never comes back: the server says NOT_SERVING for this long (clients and probes see
# why), then exits with EXIT_ENGINE_DIED so that its supervisor (Kubernetes, systemd) restarts it.
ENGINE_DEATH_EXIT_DELAY_S = 2.0
EXIT_ENGINE_DIED = 3

SERVICE_NAME = pb2.DESCRIPTOR.services_by_name["AttributionService"].full_name


@dataclass
class ServeConfig:
    """The server around the engine (the engine's own settings are EngineConfig)."""

    probe: str = field(default="auto", metadata={"help": "probe artifact: 'auto' (the shipped one trained for "
                                                         "this model, if any), 'none', or a path"})
    host: str = field(default="0.0.0.0", metadata={"help": "gRPC listen address"})
    port: int = field(default=50051, metadata={"help": "gRPC port"})
    metrics_host: str = field(default="0.0.0.0", metadata={"help": "Prometheus /metrics listen address"})
    metrics_port: int = field(default=9400, metadata={"help": "Prometheus /metrics port"})
    max_queue: int = field(default=64, metadata={"help": "requests that may wait for an engine slot; more are "
                                                         "refused with RESOURCE_EXHAUSTED"})
    grace_period_seconds: float = field(default=30.0, metadata={"help": "on SIGTERM, how long requests in "
                                                                        "flight may take to finish"})
    health_poll_seconds: float = field(default=1.0, metadata={"help": "how often the engine's liveness is checked"})
    tls_cert: str = field(default="", metadata={"help": "PEM certificate chain: the gRPC port speaks TLS only"})
    tls_key: str = field(default="", metadata={"help": "PEM private key of --tls-cert"})
    tls_client_ca: str = field(default="", metadata={"help": "PEM CA bundle: clients must present a certificate it "
                                                             "signed (mutual TLS; needs --tls-cert)"})
    auth_token_file: str = field(default="", metadata={"help": "file of bearer tokens, one per line `TOKEN [limit=N] "
                                                               "[name=NAME]`; calls must send `authorization: Bearer "
                                                               "TOKEN` (tokens may also come from ALIGNLENS_AUTH_TOKENS; "
                                                               "never from a flag)"})
    health_port: int = field(default=0, metadata={"help": "also serve grpc.health.v1 alone, in plaintext, on this port "
                                                          "(for Kubernetes probes when the main port needs TLS; 0 = off)"})
    http_port: int = field(default=0, metadata={"help": "also serve the OpenAI-compatible HTTP API (/v1/models, "
                                                        "/v1/completions, /v1/chat/completions) on this port, with the "
                                                        "same engine, queue, tokens and TLS settings (0 = off)"})
    verify_fraction: float = field(default=0.0, metadata={"help": "fraction of live attributed tokens whose exact "
                                                                  "family_drop the engine computes in the background "
                                                                  "to measure faithfulness (0 = off; 0..1)"})


class Server:
    """One serving process. `await Server(serve_cfg, engine_cfg).run()` returns the exit code."""

    def __init__(self, config: ServeConfig, engine_config: EngineConfig):
        self.config = config
        self.engine_config = engine_config
        self.health = health.aio.HealthServicer()
        self.stop_requested = asyncio.Event()

    async def _set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)
        self.state.metrics.engine_healthy.set(1 if serving else 0)

    def _prepare(self) -> tuple[facts.HostFacts, facts.ProbeChoice]:
        """Phase 1 (blocking; runs before the event loop serves anything)."""
        from transformers import AutoTokenizer

        from alignlens.service.modelstore import resolve_model

        model_path = resolve_model(self.engine_config.model)
        host = facts.host_facts(model_path)
        choice = facts.choose_probe(self.config.probe, host)
        if choice.path is None:
            log.warning("serving without attribution: %s", choice.reason)
        else:
            log.info("probe %s (trained for fingerprint %s...)", choice.path, host.fingerprint[:16])
        tokenizer = AutoTokenizer.from_pretrained(str(model_path))
        self.limits = ModelLimits(tokenizer=tokenizer, max_model_len=self.engine_config.max_model_len,
                                  vocab_size=min(host.vocab_size, len(tokenizer)), n_blocks=host.n_layers,
                                  probe_loaded=choice.path is not None, probe_missing_reason=choice.reason)
        return host, choice

    def _security(self) -> tuple[grpc.ServerCredentials | None, list[security.Token]]:
        """TLS credentials and bearer tokens (security.SecurityConfigError names what is wrong)."""
        cfg = self.config
        return (security.server_credentials(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca),
                security.load_tokens(cfg.auth_token_file))

    async def _start_grpc(self, credentials, tokens) -> list[grpc.aio.Server]:
        """The main server (and the plaintext health-only one with --health-port), started."""
        options = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
        self.gate = security.Gate(tokens, self.state.metrics)
        server = grpc.aio.server(options=options, interceptors=[self.gate])
        pb2_grpc.add_AttributionServiceServicer_to_server(AttributionServicer(self.state), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        address = f"{self.config.host}:{self.config.port}"
        if credentials is None:
            server.add_insecure_port(address)
        else:
            server.add_secure_port(address, credentials)
        servers = [server]
        if self.config.health_port:
            health_only = grpc.aio.server()
            health_pb2_grpc.add_HealthServicer_to_server(self.health, health_only)
            health_only.add_insecure_port(f"{self.config.host}:{self.config.health_port}")
            servers.append(health_only)
        for s in servers:
            await s.start()
        mode = "plaintext" if credentials is None else "TLS" + (" with client certificates" if
                                                                self.config.tls_client_ca else "")
        log.info("gRPC listening on %s (%s, %s; health NOT_SERVING until the engine is ready)%s", address, mode,
                 f"{len(tokens)} bearer tokens" if tokens else "no token required",
                 f"; health alone on {self.config.host}:{self.config.health_port}" if self.config.health_port else "")
        return servers

    async def _start_http(self, host: facts.HostFacts):
        """The OpenAI-compatible HTTP API (server/openai_api.py) on the same state, tokens and TLS."""
        from alignlens.service.server.openai_api import HTTPServer, OpenAIFrontEnd, build_app

        names = tuple(dict.fromkeys((host.name, self.engine_config.model, str(host.path))))
        front = OpenAIFrontEnd(self.state, names, self.gate)
        cfg = self.config
        http = HTTPServer(build_app(front), cfg.host, cfg.http_port, cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca)
        await http.start()
        log.info("OpenAI-compatible HTTP API on %s://%s:%d/v1 (model id %r)", "https" if cfg.tls_cert else "http",
                 cfg.host, cfg.http_port, front.model_id)
        return http

    async def _watch_engine(self) -> None:
        """Phase 5: poll the engine's liveness (a dead engine never comes back) and its buffers.

        Liveness is a local flag. Buffer counts need a call into the worker, and every call keeps
        the worker's shared-memory reader busy-spinning for a second (vLLM's SpinCondition), so
        an idle server polling them would burn a core: they are read only while requests run,
        and until one reading after the last request shows everything freed.
        """
        engine, admission = self.state.engine, self.state.admission
        seen_admitted, dirty = admission.admitted_total, False
        while True:
            await asyncio.sleep(self.config.health_poll_seconds)
            if not self.state.engine_alive():
                log.error("the inference engine died: health NOT_SERVING, RPCs UNAVAILABLE")
                await self._set_health(False)
                return
            if not (dirty or admission.running or admission.admitted_total != seen_admitted):
                continue
            seen_admitted = admission.admitted_total
            try:
                stats = await asyncio.wait_for(engine.stats(), 10.0)
            except Exception as exc:  # noqa: BLE001 - a busy or dying engine; liveness decides next round
                log.debug("capture stats unavailable: %s", exc)
                continue
            self.state.metrics.observe_capture(stats)
            dirty = any(stats["server"].get(k) for k in ("open_requests", "buffered_records")) or bool(
                stats["worker"].get("tracked_requests"))

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop_requested.set)
        try:
            credentials, tokens = self._security()
            host, choice = self._prepare()
        except (facts.StartupError, security.SecurityConfigError) as exc:
            log.error("cannot start: %s", exc)
            return 2
        if not 0.0 <= self.config.verify_fraction <= 1.0:
            log.error("cannot start: --verify-fraction %s must be in [0, 1]", self.config.verify_fraction)
            return 2
        private_dir = runtime.claim(runtime_dir())
        metrics = ServiceMetrics(host.n_layers, self.config.max_queue)
        metrics.serve_http(self.config.metrics_port, self.config.metrics_host)
        log.info("metrics on http://%s:%d/metrics", self.config.metrics_host, self.config.metrics_port)
        admission = Admission(self.engine_config.max_num_seqs, self.config.max_queue, metrics)
        info = facts.model_info(host, choice, False, self.engine_config.max_model_len, self.engine_config.dtype)
        self.state = ServerState(self.limits, info, metrics, admission)
        if self.config.verify_fraction > 0:
            self.state.verifier = Verifier(self.config.verify_fraction, self.state, host.n_layers)
        await self._set_health(False)
        servers = await self._start_grpc(credentials, tokens)
        http = None
        watcher = None
        try:
            if self.config.http_port:
                http = await self._start_http(host)
            if not await self._start_engine(choice, host):
                return 0 if self.stop_requested.is_set() else 1
            watcher = asyncio.create_task(self._watch_engine(), name="engine-watch")
            if self.state.verifier is not None:
                self.state.verifier.start()
            stop = asyncio.create_task(self.stop_requested.wait())
            await asyncio.wait({stop, watcher}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            if watcher.done():  # the engine died: NOT_SERVING is already up; exit so it is restarted
                await asyncio.sleep(ENGINE_DEATH_EXIT_DELAY_S)
                log.error("exiting with status %d: the engine died", EXIT_ENGINE_DIED)
                return EXIT_ENGINE_DIED
            await self._drain()
            return 0
        finally:
            if watcher is not None:
                watcher.cancel()
            if self.state.verifier is not None:
                self.state.verifier.stop()
            if http is not None:
                await http.stop()
            for server in servers:
                await server.stop(1.0)
            if self.state.engine is not None:
                self.state.engine.shutdown()
            runtime.release(private_dir)
            metrics.shutdown()
            log.info("stopped")

    async def _start_engine(self, choice: facts.ProbeChoice, host: facts.HostFacts) -> bool:
        """Phase 4; False if start-up failed or a stop signal came first."""
        probe_path = str(choice.path) if choice.path is not None else None
        start = asyncio.create_task(CaptureEngine.start(self.engine_config, probe_path=probe_path,
                                                        on_step=self.state.metrics.on_step))
        stop = asyncio.create_task(self.stop_requested.wait())
        await asyncio.wait({start, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not start.done():
            # The engine's processes are being spawned in a thread that cannot be interrupted;
            # let it finish so they can be shut down rather than orphaned.
            log.info("stop requested during engine start-up: shutting down once it is up")
        try:
            engine = await start
        except Exception:  # noqa: BLE001 - reported, then the process exits non-zero
            log.exception("the engine failed to start")
            return False
        if self.stop_requested.is_set():
            engine.shutdown()
            return False
        loaded = bool(engine.attach_info.get("probe_loaded"))
        if probe_path and not loaded:
            engine.shutdown()
            log.error("the worker did not load probe %s", probe_path)
            return False
        self.state.info = facts.model_info(host, choice, loaded, self.engine_config.max_model_len,
                                           self.engine_config.dtype)
        # directions per (block, family) interventions can address (0: the engine has no hooks)
        self.limits.intervention_k = int(engine.attach_info.get("intervention_k", 0))
        await self._warm_up(engine, loaded)
        self.state.engine = engine
        await self._set_health(True)
        log.info("serving %s on %s:%d (engine ready in %.1f s, attribution %s)", host.name, self.config.host,
                 self.config.port, engine.start_seconds, "on" if loaded else "off")
        return True

    async def _warm_up(self, engine: CaptureEngine, attribution: bool) -> None:
        """One short generation and one replay before SERVING: the first request through a fresh
        engine pays one-off costs (kernel selection, allocator growth; seconds on CPU) that
        should not land on a user's time to first token."""
        from vllm import SamplingParams

        t0 = time.perf_counter()
        prompt = list(range(1, 33))  # ids 1..32 exist in every vocabulary we serve
        plans = [("warmup", None)]  # the stock path (detail NONE), then the attributed one
        if attribution:
            plans.append(("warmup-attr", CaptureOptions(rid="", detail=Detail.SUMMARY)))  # rid: set by the engine
        for rid, options in plans:
            async for _out, _new in engine.generate(f"{rid}-gen", prompt, SamplingParams(
                    max_tokens=4, temperature=0.0, logprobs=0, ignore_eos=True), options):
                pass
            await engine.replay(f"{rid}-replay", prompt[:16], prompt[16:], options)
        log.info("warm-up done in %.1f s", time.perf_counter() - t0)

    async def _drain(self) -> None:
        """Phase 6: refuse new work, give work in flight the grace period."""
        self.state.draining = True
        await self.health.enter_graceful_shutdown()
        self.state.metrics.engine_healthy.set(0)
        busy = self.state.admission.running + self.state.admission.waiting
        log.info("stop requested: draining %d requests (grace %.0f s)", busy, self.config.grace_period_seconds)
        if not await self.state.admission.wait_idle(self.config.grace_period_seconds):
            log.warning("grace period over with %d requests in flight; cancelling them",
                        self.state.admission.running + self.state.admission.waiting)


def serve(config: ServeConfig, engine_config: EngineConfig) -> int:
    """Run a server until SIGTERM/SIGINT; returns the process exit code."""
    engine_config.multiprocessing = True  # AsyncLLM always runs its engine core in its own process
    engine_config.capture = True

    async def main() -> int:  # the server's asyncio objects must be made inside the loop
        return await Server(config, engine_config).run()

    return asyncio.run(main())
