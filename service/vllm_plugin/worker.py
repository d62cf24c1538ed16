"""Worker extension: named methods the server calls with `collective_rpc`.

Named methods need no insecure serialization; results are plain dicts.
Only tensor-parallel rank 0 ships records (the residual stream is replicated across
ranks at block boundaries, VLLM_NOTES.md).
"""

from __future__ import annotations

import logging
import os

from alignlens.service.engine.channel import CaptureSender
from alignlens.service.vllm_plugin import capture, internals
from alignlens.service.vllm_plugin.state import STATE

log = logging.getLogger(__name__)


class AlignlensWorkerExtension:
    """Mixed into vLLM's Worker class by `worker_extension_cls`."""

    def alignlens_attach(self, address: str, probe_path: str | None = None,
                         checkpoint_dir: str | None = None) -> dict:
        """Connect the side channel at `address`; load the probe if a path is given."""
        rank = internals.tensor_parallel_rank()
        runner = self.model_runner
        model = runner.get_model()
        if not type(model).__name__.startswith("Capture"):
            raise RuntimeError(f"model class {type(model).__name__} has no alignlens capture: "
                               "is the alignlens vLLM plugin loaded (VLLM_PLUGINS)?")
        attributor = None
        if probe_path and rank == 0:
            from alignlens.probe.attribution import Attributor

            attributor = Attributor.load(probe_path, checkpoint_dir).to(runner.device)
        sender = CaptureSender(address) if rank == 0 else None
        # Attribution off the critical path unless ALIGNLENS_BACKGROUND_ATTRIBUTION=0 (bench, debugging);
        # the idle-core helper (CPU only) unless ALIGNLENS_IDLE_HELPER=0. See emitter.BackgroundEmitter.
        background = os.environ.get("ALIGNLENS_BACKGROUND_ATTRIBUTION", "1") != "0"
        idle_helper = runner.device.type == "cpu" and os.environ.get("ALIGNLENS_IDLE_HELPER", "1") != "0"
        capture.attach(runner, sender, attributor, background=background, idle_helper=idle_helper)
        return {"rank": rank, "model_class": type(model).__name__, "probe_loaded": attributor is not None}

    def alignlens_stats(self) -> dict:
        return STATE.stats()
