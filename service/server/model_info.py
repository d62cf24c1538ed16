"""What the server hosts: the model's facts, the probe it chose, and GetModelInfo's answer.

Start-up phases, in order (all before the engine starts, so a wrong probe fails in seconds
rather than after a minute of compilation):
  1. read the checkpoint's architecture (probe.host.Host) and fingerprint it (probe.fingerprint);
  2. choose the probe: `auto` takes the shipped artifact under probe/artifacts/ trained for this
     fingerprint (none if there is none), `none` serves without attribution, a path must match;
  3. a probe whose fingerprint differs, or that this build cannot load, stops start-up
     (probe.artifact.FingerprintMismatch and friends).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from alignlens.probe.artifact import SHIPPED_ARTIFACTS, ArtifactError, FingerprintMismatch, load_artifact, read_metadata
from alignlens.probe.fingerprint import host_fingerprint
from alignlens.probe.host import Host, UnsupportedHost
from alignlens.probe.names import DEFAULT_K, FAMILIES
from alignlens.service.protos import load

pb2, _ = load()
log = logging.getLogger(__name__)

class StartupError(RuntimeError):
    """The server cannot start as configured; the message says why and what to do."""


@dataclass
class ProbeChoice:
    """The artifact to load (path None: serve without attribution, `reason` says why)."""

    path: Path | None
    reason: str = ""
    metadata: dict = field(default_factory=dict)


@dataclass
class HostFacts:
    """Architecture numbers of the served checkpoint."""

    name: str
    path: Path
    fingerprint: str
    n_layers: int
    d_model: int
    vocab_size: int
    probe_unsupported: str = ""  # why probe/ cannot read this architecture (then no probe loads)


def host_facts(model_path: Path) -> HostFacts:
    """Phase 1: architecture and fingerprint (reads every weight once: ~1 s per 500 MB).

    An architecture the engine captures but probe/ cannot read yet (e.g. Gemma 3) is still served,
    without attribution: its facts come from config.json and its fingerprint is a sha256 over the
    checkpoint's config and weight files ("checkpoint-v1:" prefix, never equal to a host fingerprint).
    """
    try:
        host = Host.from_checkpoint(model_path)
    except UnsupportedHost as exc:
        import hashlib
        import json

        cfg = json.loads((model_path / "config.json").read_text())
        cfg = cfg.get("text_config", cfg)
        digest = hashlib.sha256()
        for f in sorted(model_path.glob("*.safetensors")) + [model_path / "config.json"]:
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 22):
                    digest.update(chunk)
        return HostFacts(name=model_path.name, path=model_path, fingerprint="checkpoint-v1:" + digest.hexdigest(),
                         n_layers=int(cfg["num_hidden_layers"]), d_model=int(cfg["hidden_size"]),
                         vocab_size=int(cfg["vocab_size"]), probe_unsupported=str(exc))
    spec = host.spec
    return HostFacts(name=model_path.name, path=model_path, fingerprint=host_fingerprint(host),
                     n_layers=spec.n_layers, d_model=spec.d_model, vocab_size=spec.vocab_size)


def choose_probe(setting: str, host: HostFacts) -> ProbeChoice:
    """Phases 2-3 for `--probe auto|none|PATH`. Raises StartupError on a bad or mismatched path."""
    if setting == "none":
        return ProbeChoice(None, "the server was started with --probe none")
    if host.probe_unsupported:
        if setting == "auto":
            return ProbeChoice(None, f"the probe cannot read this architecture yet ({host.probe_unsupported}); "
                                     "served without attribution")
        raise StartupError(f"--probe {setting}: the probe cannot read model {host.name}: {host.probe_unsupported}")
    if setting == "auto":
        for candidate in sorted(SHIPPED_ARTIFACTS.glob("*.safetensors")):
            try:
                meta = read_metadata(candidate)
            except ArtifactError as exc:
                log.warning("ignoring %s: %s", candidate, exc)
                continue
            if meta.get("host_fingerprint") == host.fingerprint:
                _check_loadable(candidate, host)
                return ProbeChoice(candidate, metadata=meta)
        return ProbeChoice(None, f"no shipped probe in {SHIPPED_ARTIFACTS} was trained for model {host.name} "
                                 f"(fingerprint {host.fingerprint[:16]}...); train one with `alignlens probe "
                                 f"train` and start the server with --probe PATH")
    path = Path(setting).expanduser()
    if not path.is_file():
        raise StartupError(f"--probe {setting}: no such file (use 'auto', 'none' or an artifact path)")
    try:
        meta = read_metadata(path)
        if meta.get("host_fingerprint") != host.fingerprint:
            raise FingerprintMismatch(path, meta.get("host_fingerprint", "?"), host.fingerprint, host.path)
    except ArtifactError as exc:
        raise StartupError(f"--probe {setting}: {exc}") from exc
    _check_loadable(path, host)
    return ProbeChoice(path, metadata=meta)


def _check_loadable(path: Path, host: HostFacts) -> None:
    """Build the probe once here (a few MB): an artifact this build cannot read fails in seconds,
    not after the engine's start-up when the worker loads it."""
    try:
        load_artifact(path, host.fingerprint, host.path)
    except Exception as exc:  # noqa: BLE001 - any reason the worker would fail the same way
        raise StartupError(f"probe {path} cannot be loaded by this build: {type(exc).__name__}: {exc}") from exc


def probe_info(choice: ProbeChoice, loaded: bool) -> "pb2.ProbeInfo":
    """ProbeInfo with the artifact's headline evaluation numbers and its whole metadata."""
    if not loaded:
        return pb2.ProbeInfo(loaded=False, unavailable_reason=choice.reason or "the probe did not load")
    meta = choice.metadata
    ev = meta.get("evaluation") or {}
    top1 = ev.get("depth_top1") or []
    readout_top1 = ev.get("readout_top1_agreement", top1[-2] if len(top1) >= 2 else None)  # depth L-1
    info = pb2.ProbeInfo(
        loaded=True, path=str(choice.path), fingerprint=meta.get("host_fingerprint", ""),
        depth_kl=ev.get("depth_kl") or [], logit_lens_kl=ev.get("logit_lens_kl") or [],
        eval_tokens=int(ev.get("tokens") or 0),
        **({} if readout_top1 is None else {"readout_top1_agreement": float(readout_top1)}),
        **{k: float(ev[k]) for k in ("faithfulness_spearman", "faithfulness_top_vs_random",
                                     "null_faithfulness_spearman", "null_faithfulness_top_vs_random")
           if ev.get(k) is not None})
    f = (ev.get("headline") or {}).get("faithfulness") or {}
    fa, mp = f.get("family_attribution") or {}, f.get("mean_profile") or {}
    for name, src, metric in (("mean_profile_faithfulness_spearman", mp, "per_token_spearman"),
                              ("share_centered_spearman", fa, "share_centered_spearman"),
                              ("top_pair_hit", fa, "top_pair_hit"), ("mean_profile_top_pair_hit", mp, "top_pair_hit")):
        if metric in src:
            setattr(info, name, float(src[metric]["value"]))
    info.tuned_lens_kl.extend(ev.get("tuned_lens_kl") or [])
    info.metadata.update(meta)
    return info


def model_info(host: HostFacts, choice: ProbeChoice, probe_loaded: bool, max_model_len: int,
               dtype: str) -> "pb2.ModelInfo":
    """The GetModelInfo answer (fixed for the server's lifetime)."""
    import vllm

    return pb2.ModelInfo(
        name=host.name, fingerprint=host.fingerprint, n_layers=host.n_layers, d_model=host.d_model,
        vocab_size=host.vocab_size, families=list(FAMILIES), k=int(choice.metadata.get("k", DEFAULT_K)),
        max_model_len=max_model_len, dtype=dtype, vllm_version=vllm.__version__,
        probe=probe_info(choice, probe_loaded))
