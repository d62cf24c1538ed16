"""Probe artifacts: one safetensors file of weights with the JSON metadata in its header.

Metadata (METHOD.md section 5), stored as a JSON string under the header key "alignlens_probe"
and mirrored, for people, into `<artifact>.json` beside the file:
    format_version     "alignlens-probe-v1"
    host_fingerprint   sha256 of the host (probe.fingerprint)
    host_spec          the hashed architecture numbers (probe.host.HostSpec)
    family_map         which checkpoint tensors form qkv / attn_out / mlp_in
    k                  singular directions per (block, family)
    probe_config       probe.model.ProbeConfig
    train_config       probe.train.TrainConfig
    data               training-data summary (traces, prompts, tokens, labelled tokens)
    training_seconds   wall time of `alignlens probe train`
    evaluation         METHOD.md section 6 numbers (filled in by `alignlens probe eval --write`)
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from alignlens.probe.model import ProbeConfig, ProbeModel

FORMAT_VERSION = "alignlens-probe-v1"
HEADER_KEY = "alignlens_probe"


class ArtifactError(ValueError):
    """The file is not a probe artifact this version can read."""


class FingerprintMismatch(ArtifactError):
    """The probe was trained on another host than the one it is being loaded against."""

    def __init__(self, artifact: str | Path, expected: str, actual: str, checkpoint: str | Path | None = None):
        self.expected, self.actual = expected, actual
        where = f" at {checkpoint}" if checkpoint else ""
        super().__init__(
            f"probe {artifact} was trained on host fingerprint {expected[:16]}..., but the host{where} has "
            f"fingerprint {actual[:16]}...: a probe only explains the exact weights it was trained on; "
            f"train one for this host with `alignlens probe collect` and `alignlens probe train`")


# Stored as float16 (loaded into the float32 model): the tuned lens's L d x d translators, 39.8 MB in
# float32 for SmolLM2, 19.9 MB rounded (at most 6e-5 absolute change on weights up to 0.21). Every
# evaluation reads the stored, rounded weights; Out is trained on the unrounded lens when the lens is
# fitted in the same run (probe.train.retrain_readout).
HALF_PREFIXES = ("lens.",)


def sidecar_path(path: str | Path) -> Path:
    p = Path(path)
    return p.with_name(p.name.removesuffix(".safetensors") + ".json")


def save_artifact(path: str | Path, model: ProbeModel, metadata: dict) -> Path:
    """Write weights + metadata (format_version and probe_config are filled in here)."""
    meta = dict(metadata)
    meta["format_version"] = FORMAT_VERSION
    meta["probe_config"] = model.cfg.to_dict()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: (v.detach().half() if k.startswith(HALF_PREFIXES) else v.detach().float()).contiguous()
             for k, v in model.state_dict().items()}
    save_file(state, str(out), metadata={HEADER_KEY: json.dumps(meta, sort_keys=True)})
    sidecar_path(out).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return out


def read_metadata(path: str | Path) -> dict:
    """The metadata dict of an artifact, without loading weights."""
    try:
        with safe_open(str(path), "pt") as f:
            header = (f.metadata() or {}).get(HEADER_KEY)
    except Exception as exc:  # safetensors raises several types for non-safetensors input
        raise ArtifactError(f"{path} is not a safetensors file: {exc}") from exc
    if header is None:
        raise ArtifactError(f"{path} has no '{HEADER_KEY}' metadata: not a probe artifact")
    meta = json.loads(header)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: format_version {meta.get('format_version')!r}, this build reads "
                            f"{FORMAT_VERSION!r}")
    return meta


def load_artifact(path: str | Path, expected_fingerprint: str | None = None,
                  checkpoint: str | Path | None = None) -> tuple[ProbeModel, dict]:
    """(model in eval mode, metadata); raises FingerprintMismatch when the host differs."""
    meta = read_metadata(path)
    if expected_fingerprint is not None and meta["host_fingerprint"] != expected_fingerprint:
        raise FingerprintMismatch(path, meta["host_fingerprint"], expected_fingerprint, checkpoint)
    model = ProbeModel(ProbeConfig(**meta["probe_config"]))
    model.load_state_dict(load_file(str(path)))
    return model.eval(), meta


def update_metadata(path: str | Path, **fields) -> dict:
    """Rewrite an artifact with some metadata fields replaced (e.g. evaluation=...)."""
    meta = read_metadata(path)
    meta.update(fields)
    state = load_file(str(path))
    save_file(state, str(path), metadata={HEADER_KEY: json.dumps(meta, sort_keys=True)})
    sidecar_path(path).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return meta


SHIPPED_ARTIFACTS = Path(__file__).resolve().parent / "artifacts"  # probes shipped in the package


def default_artifact_path(checkpoint_dir: str | Path) -> Path:
    """Where the shipped probe for a host lives: probe/artifacts/<checkpoint folder name>.safetensors."""
    return SHIPPED_ARTIFACTS / f"{Path(checkpoint_dir).name}.safetensors"
