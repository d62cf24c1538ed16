"""Prometheus metrics of the service, served on their own HTTP port at /metrics.

Names are a contract with deploy/ (alert rules, dashboards): prefix `alignlens_`, base units
(seconds, tokens), labels bounded (`rpc` x `code`, `family`); never a request id.

Serving (vLLM's names where it has them):
    alignlens_time_to_first_token_seconds  histogram  request arrival -> first token sent
    alignlens_inter_token_latency_seconds  histogram  gap between consecutive tokens of a stream
    alignlens_e2e_request_latency_seconds  histogram  arrival -> last message, successful requests
    alignlens_queue_time_seconds           histogram  arrival -> admission to the engine
    alignlens_requests_total{rpc,code}     counter    finished RPCs by gRPC status code name
    alignlens_prompt_tokens_total          counter    prompt tokens of admitted Generate requests
    alignlens_generation_tokens_total      counter    tokens streamed by Generate
    alignlens_requests_running             gauge      requests inside the engine
    alignlens_requests_waiting             gauge      requests waiting for an engine slot
    alignlens_queue_capacity               gauge      most requests that may wait (max_queue)
    alignlens_engine_healthy               gauge      1 while the engine is alive and serving
Capture buffers (refreshed every health poll while requests run and until they read 0 after;
all 0 when nothing is in flight, else a leak):
    alignlens_capture_open_requests        gauge      requests with a server-side record buffer
    alignlens_capture_buffered_records     gauge      records received but not yet streamed
    alignlens_capture_worker_requests      gauge      requests the worker still tracks
    alignlens_capture_records_total        counter    records received from the worker (0 for requests
                                                      at detail NONE: those are served as stock vLLM)
    alignlens_attribution_faithfulness       histogram  --verify-fraction: per-token Spearman of the served
                                                      family_attribution against the exact |family_drop|
    alignlens_attribution_verified_tokens_total  counter  tokens verified that way
    alignlens_attribution_verify_skipped_total   counter  tokens selected but skipped (verification backlog full)
    alignlens_attribution_errors_total     counter    records the worker sent with an error instead of an
                                                      attribution (the probe failed; the request got INTERNAL)
Attribution (the quality signals are counted over live Generate tokens only: audited text is
teacher-forced, so its tokens need not be the host's own choice):
    alignlens_attribution_step_seconds        histogram  probe time of one engine step (worker)
    alignlens_attributed_tokens_total         counter    tokens that carried an attribution
    alignlens_readout_top1_total              counter    ... that the probe's readout at depth L-1 already
                                                         ranked first (TokenAttribution.readout_top1);
                                                         probe/host agreement = this / attributed
    alignlens_crystallization_depth           histogram  one bucket per depth 0..L, and L+1 (never top)
    alignlens_family_importance_share_total{family}  counter  summed per-token family shares
                                                     (server.convert.family_shares); mean = / attributed
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from alignlens.probe.names import FAMILIES
from alignlens.probe.record import TokenAttribution
from alignlens.service.engine.wire import StepMessage
from alignlens.service.server.convert import family_shares

# Latency buckets (seconds): from a tiny model's sub-millisecond steps to a loaded 7B server.
_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
            10.0, 20.0, 40.0, 80.0)
_STEP = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class ServiceMetrics:
    """All metrics, on a private registry (several servers can live in one test process)."""

    def __init__(self, n_layers: int, max_queue: int):
        r = self.registry = CollectorRegistry()
        self.ttft = Histogram("alignlens_time_to_first_token_seconds",
                              "Seconds from request arrival to its first token leaving the server.",
                              buckets=_LATENCY, registry=r)
        self.itl = Histogram("alignlens_inter_token_latency_seconds",
                             "Seconds between consecutive tokens of a Generate stream.", buckets=_LATENCY, registry=r)
        self.e2e = Histogram("alignlens_e2e_request_latency_seconds",
                             "Seconds from request arrival to its last message (successful requests).",
                             buckets=_LATENCY, registry=r)
        self.queue_time = Histogram("alignlens_queue_time_seconds",
                                    "Seconds from request arrival to admission to the engine.",
                                    buckets=_LATENCY, registry=r)
        self.requests = Counter("alignlens_requests", "Finished RPCs by method and gRPC status code.",
                                ["rpc", "code"], registry=r)
        self.prompt_tokens = Counter("alignlens_prompt_tokens", "Prompt tokens of admitted Generate requests.",
                                     registry=r)
        self.generation_tokens = Counter("alignlens_generation_tokens", "Tokens streamed by Generate.",
                                         registry=r)
        self.running = Gauge("alignlens_requests_running", "Requests inside the engine.", registry=r)
        self.waiting = Gauge("alignlens_requests_waiting", "Requests waiting for an engine slot.", registry=r)
        self.queue_capacity = Gauge("alignlens_queue_capacity", "Most requests that may wait (max_queue).",
                                    registry=r)
        self.queue_capacity.set(max_queue)
        self.engine_healthy = Gauge("alignlens_engine_healthy", "1 while the engine is alive and serving, else 0.",
                                    registry=r)
        self.capture_open = Gauge("alignlens_capture_open_requests",
                                  "Requests holding a server-side capture record buffer.", registry=r)
        self.capture_buffered = Gauge("alignlens_capture_buffered_records",
                                      "Capture records received from the worker and not yet streamed.", registry=r)
        self.capture_worker = Gauge("alignlens_capture_worker_requests",
                                    "Requests the worker's capture state still tracks.", registry=r)
        self.capture_records = Counter("alignlens_capture_records", "Records received from the worker.",
                                       registry=r)
        self.attribution_errors = Counter("alignlens_attribution_errors",
                                          "Records the worker sent with an error instead of an attribution.",
                                          registry=r)
        self.faithfulness = Histogram("alignlens_attribution_faithfulness",
                                      "Per-token Spearman between served family_attribution and exact |family_drop| "
                                      "(live tokens verified with --verify-fraction).",
                                      # from 0: negative correlations all count in le="0.0" (no better than
                                      # chance); prometheus_client drops _sum, which the mean needs, for a
                                      # histogram whose first bucket is negative
                                      buckets=tuple(round(0.1 * i, 1) for i in range(11)), registry=r)
        self.verified_tokens = Counter("alignlens_attribution_verified_tokens",
                                       "Live tokens whose attribution was verified against exact ablations.",
                                       registry=r)
        self.verify_skipped = Counter("alignlens_attribution_verify_skipped",
                                      "Tokens selected for verification but skipped (backlog full).", registry=r)
        self.attribution_step = Histogram("alignlens_attribution_step_seconds",
                                          "Probe time of one engine step, measured in the worker.",
                                          buckets=_STEP, registry=r)
        self.attributed_tokens = Counter("alignlens_attributed_tokens",
                                         "Generated tokens that carried an attribution.", registry=r)
        self.readout_top1 = Counter("alignlens_readout_top1",
                                  "Attributed tokens the probe's readout at depth L-1 already ranked first "
                                  "(probe/host agreement = this / attributed tokens).", registry=r)
        self.crystallization = Histogram("alignlens_crystallization_depth",
                                         "Crystallization depth of attributed tokens (one bucket per depth; "
                                         "L+1: not the top candidate even at the last depth).",
                                         buckets=tuple(float(d) for d in range(n_layers + 2)), registry=r)
        self.family_share = Counter("alignlens_family_importance_share",
                                    "Summed per-token importance share of each weight family.", ["family"],
                                    registry=r)
        for family in FAMILIES:  # export zeros from the start so rate() has a baseline
            self.family_share.labels(family)
        self._server = None

    def serve_http(self, port: int, host: str = "0.0.0.0") -> None:
        """Expose /metrics on `host:port` (a daemon thread)."""
        self._server, _thread = start_http_server(port, addr=host, registry=self.registry)

    def shutdown(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def on_step(self, message: StepMessage) -> None:
        """Side-channel step callback: records, errors, and the attribution time of steps that
        attributed something."""
        self.capture_records.inc(len(message.records))
        errors = sum(1 for rec in message.records if rec.error is not None)
        if errors:
            self.attribution_errors.inc(errors)
        if any(rec.attr is not None for rec in message.records):
            self.attribution_step.observe(message.attr_seconds)

    def observe_capture(self, stats: dict) -> None:
        """CaptureEngine.stats() -> the capture buffer gauges."""
        self.capture_open.set(stats["server"].get("open_requests", 0))
        self.capture_buffered.set(stats["server"].get("buffered_records", 0))
        self.capture_worker.set(stats["worker"].get("tracked_requests", 0))

    def observe_attribution(self, attr: TokenAttribution) -> None:
        """Quality signals of one live token's attribution."""
        self.attributed_tokens.inc()
        if attr.readout_top1:
            self.readout_top1.inc()
        self.crystallization.observe(attr.crystallization_depth)
        for family, share in family_shares(attr).items():
            self.family_share.labels(family).inc(share)
