"""Worker extension: named methods the server calls with `collective_rpc`.

Named methods need no insecure serialization; results are plain dicts.
Only tensor-parallel rank 0 ships records (the residual stream is replicated across
ranks at block boundaries, VLLM_NOTES.md).
"""

from __future__ import annotations

import logging
import os

from alignlens.service.engine.channel import CaptureSender
from alignlens.service.vllm_plugin import capture, internals, probe_process
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
        bases = _intervention_bases(model, attributor, checkpoint_dir)
        # On CPU the background emitter runs in its own process (no GIL shared with the forward)
        # unless ALIGNLENS_PROBE_PROCESS=0. See probe_process.py.
        use_process = (background and attributor is not None and runner.device.type == "cpu"
                      and probe_process.enabled())
        capture.attach(runner, sender, attributor, background=background, idle_helper=idle_helper, bases=bases,
                       probe_process=(address, probe_path, checkpoint_dir) if use_process else None)
        return {"rank": rank, "model_class": type(model).__name__, "probe_loaded": attributor is not None,
                "intervention_k": STATE.intervention_k}

    def alignlens_stats(self) -> dict:
        return STATE.stats()


def _intervention_bases(model, attributor, checkpoint_dir: str | None):
    """(basis [L, 3, k, d], attn_out bias [L, d]) for the model's intervention hooks: the probe's own
    SVD factors when a probe is loaded (so direction indices mean the same in attributions and
    interventions), else the host's top-DEFAULT_K factors (cached by fingerprint). None when the
    model has no hooks (ALIGNLENS_INTERVENTIONS=0), no checkpoint is known, or probe/ cannot read the
    architecture yet (then requests with interventions are refused: intervention_k 0)."""
    from alignlens.service.vllm_plugin.interventions import find_hooks

    if not find_hooks(model):
        return None
    if attributor is not None:
        return attributor.factors.basis, attributor.host.attn_out_bias
    if not checkpoint_dir:
        return None
    from alignlens.probe.host import Host, UnsupportedHost
    from alignlens.probe.svd import load_or_compute

    try:
        host = Host.from_checkpoint(checkpoint_dir)
    except UnsupportedHost as exc:
        log.warning("no interventions for this model: %s", exc)
        return None
    return load_or_compute(host).basis, host.attn_out_bias
