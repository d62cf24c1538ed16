"""The worker's capture state: one per worker process, shared by the step phases and the emitter."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from alignlens.service.engine.channel import CaptureSender
    from alignlens.service.vllm_plugin.emitter import BackgroundEmitter
    from alignlens.service.vllm_plugin.rows import Row


@dataclass
class CaptureState:
    runner: Any = None
    sender: "CaptureSender | None" = None
    attributor: Any = None  # alignlens.probe.attribution.Attributor, or None
    in_step: bool = False
    step: int = 0
    rows: "list[Row]" = field(default_factory=list)
    tensors: torch.Tensor | None = None  # [rows, 2L+1, d]
    heads: torch.Tensor | None = None  # [rows, L, H * head_dim], the heads' outputs (heads.py), or None
    head_buffers: list = field(default_factory=list)  # the model's per-block head buffers (heads.find)
    active: dict[str, str] = field(default_factory=dict)  # internal id -> external id
    forward_calls: int = 0
    rows_sent: int = 0
    error_records: int = 0  # records sent with an error instead of an attribution
    emitter: "BackgroundEmitter | None" = None
    step_ended_at: float = 0.0  # time.monotonic() at the end of the last execute_model
    engine_logits_rows: int = 0  # GEN rows attributed from the engine's own logits (keep_logits)
    idle_wait_polls: bool = False  # the worker's between-step wait sleeps instead of spinning
    # this step's batch and per-request options (before_forward reads them once for the step)
    step_batch: Any = None  # internals.BatchView
    step_options: list = field(default_factory=list)
    coefficients: Any = None  # interventions.StepCoefficients, when the model has hooks and bases are loaded
    intervention_k: int = 0  # directions per (block, family) interventions can address
    intervened_steps: int = 0  # steps in which some request intervened
    # Fault injection for tests (ALIGNLENS_TEST_FAIL_PROBE_TOKEN): the probe raises for any work item
    # that attributes this token id, so a test can watch the error travel to the client.
    fail_probe_token: int | None = None

    def stats(self) -> dict:
        # rows the probe process (probe_process.py) sent are counted there
        rows_sent, error_records = (self.emitter.counters() if hasattr(self.emitter, "counters") else (0, 0))
        return {
            "attached": self.runner is not None,
            "steps": self.step,
            "forward_calls": self.forward_calls,
            "rows_sent": self.rows_sent + rows_sent,
            "error_records": self.error_records + error_records,
            "probe_process": getattr(self.emitter, "pid", None),
            "pending_rows": len(self.rows) + (self.emitter.backlog if self.emitter else 0),
            "tracked_requests": len(self.active),
            "probe_loaded": self.attributor is not None,
            "engine_logits_rows": self.engine_logits_rows,
            "idle_helper": bool(self.emitter and self.emitter.helper),
            "idle_wait_polls": self.idle_wait_polls,
            "intervention_k": self.intervention_k,
            "intervened_steps": self.intervened_steps,
        }


STATE = CaptureState()
