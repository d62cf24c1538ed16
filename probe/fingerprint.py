"""Host fingerprint: sha256 over the host's architecture spec and its weight tensors.

Order of what is hashed (version 1):
  1. b"alignlens-host-v1\\n"
  2. the HostSpec (probe.host) as JSON with sorted keys, then b"\\n". Only the numbers that define
     the computation are hashed, not the whole config.json, so that the same weights loaded from a
     folder or from an in-memory model (whose config dicts differ in bookkeeping keys such as
     transformers_version) get the same fingerprint.
  3. for every weight tensor, in sorted order of its canonical name (`model.*` / `transformer.*`;
     the tied `lm_head.weight` and GPT-2 causal-mask buffers excluded):
        name, b"\\0", dtype name, b"\\0", shape as comma-separated ints, b"\\0", raw little-endian bytes.
A host converted to another dtype is a different host (its numbers differ).
"""

from __future__ import annotations

import hashlib
import json

import torch

from alignlens.probe.host import Host

FINGERPRINT_VERSION = "alignlens-host-v1"


def host_fingerprint(host: Host) -> str:
    """Hex sha256 of `host` (see module docstring for the exact order). About 1 s per 500 MB."""
    cached = getattr(host, "_fingerprint", None)
    if cached is not None:
        return cached
    h = hashlib.sha256()
    h.update(FINGERPRINT_VERSION.encode() + b"\n")
    h.update(json.dumps(host.spec.to_dict(), sort_keys=True).encode() + b"\n")
    for name in sorted(host.tensors):
        t = host.tensors[name].detach().contiguous()
        h.update(name.encode() + b"\0" + str(t.dtype).removeprefix("torch.").encode() + b"\0")
        h.update(",".join(str(s) for s in t.shape).encode() + b"\0")
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    host._fingerprint = h.hexdigest()  # type: ignore[attr-defined]
    return host._fingerprint  # type: ignore[attr-defined]
