"""Top-k singular factors of every (block, family) weight matrix, cached by host fingerprint.

For block i and family f with full matrix W = U S V^T (probe.host.Host.family_matrix, [out, in]):
    readers (qkv, mlp_in):  basis[i, f] = V_k^T [k, d],  proj[i, f] = diag(sigma_k) V_k^T
    writer  (attn_out):     basis[i, f] = U_k^T [k, d],  proj[i, f] = U_k^T
so that alpha_{i,f} = proj[i, f] @ x for the vector x the family reads or writes (METHOD.md section 3).
`basis` rows are orthonormal; ablation projects them out (x - basis^T basis x).

The SVD is taken in float64 of the full, unsharded matrix (via its Gram matrix, see
_top_singular) and cast to float32. Signs of singular
vectors are arbitrary; we fix each basis row so that its largest-magnitude entry is positive, which
makes factors reproducible across LAPACK builds.

Cache: $ALIGNLENS_HOME/svd/<fingerprint>-k<k>.safetensors (ALIGNLENS_HOME defaults to
~/.cache/alignlens) holding proj [L, 3, k, d], basis [L, 3, k, d], sigma [L, 3, k].
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from alignlens.probe.fingerprint import host_fingerprint
from alignlens.probe.host import Host
from alignlens.probe.names import DEFAULT_K, FAMILIES, FAMILY_INDEX
from alignlens.probe.paths import alignlens_home

log = logging.getLogger(__name__)

READERS = ("qkv", "mlp_in")


@dataclass
class SvdFactors:
    """Top-k factors of all families of all blocks. L blocks, 3 families (probe.names.FAMILIES)."""

    proj: Tensor  # [L, 3, k, d] float32: sigma*V^T for readers, U^T for attn_out
    basis: Tensor  # [L, 3, k, d] float32: orthonormal rows, V^T for readers, U^T for attn_out
    sigma: Tensor  # [L, 3, k] float32: singular values, descending
    fingerprint: str  # host fingerprint the factors belong to

    @property
    def k(self) -> int:
        return self.proj.shape[2]


def _fix_signs(rows: Tensor) -> Tensor:
    """Flip each row [k, d] so its largest-|.| entry is positive; returns the sign vector [k]."""
    idx = rows.abs().argmax(dim=1)
    sign = torch.sign(rows.gather(1, idx[:, None]).squeeze(1))
    sign[sign == 0] = 1
    return sign


def _top_singular(W: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k singular values [k] and right singular vectors as rows [k, in] of W [out, in], float64.

    Through the eigen-decomposition of the Gram matrix W^T W [in, in]: 20-50x faster on CPU than a
    full SVD of a [3072, 576] matrix, and in float64 accurate far beyond float32 for the top of the
    spectrum (errors ~ 1e-16 * sigma_1^2 / gap). For the writer we pass W^T, whose right singular
    vectors are W's left ones.
    """
    evals, evecs = torch.linalg.eigh(W.T @ W)  # ascending
    S = evals.flip(0)[:k].clamp_min(0).sqrt()
    return S, evecs.flip(1)[:, :k].T.contiguous()


def compute_factors(host: Host, k: int = DEFAULT_K) -> SvdFactors:
    """SVD of every family matrix of `host` in float64; keep the top k. Seconds for a 135M model."""
    # MKL's threaded eigensolver is 10-20x slower than the single-threaded one for these small
    # matrices on a busy 2-core machine (measured: 1.8 s vs 0.1 s per 576x576 eigh).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _compute_factors(host, k)
    finally:
        torch.set_num_threads(threads)


def _compute_factors(host: Host, k: int) -> SvdFactors:
    L, d = host.n_layers, host.d_model
    proj = torch.empty(L, 3, k, d)
    basis = torch.empty(L, 3, k, d)
    sigma = torch.empty(L, 3, k)
    for i in range(L):
        for f in FAMILIES:
            W = host.family_matrix(i, f).double()
            if k > min(W.shape):
                raise ValueError(f"k={k} exceeds the rank bound {min(W.shape)} of block {i} {f} {tuple(W.shape)}")
            S, rows = _top_singular(W if f in READERS else W.T, k)  # rows [k, d]
            rows = rows * _fix_signs(rows)[:, None]
            j = FAMILY_INDEX[f]
            basis[i, j] = rows.float()
            sigma[i, j] = S[:k].float()
            proj[i, j] = (S[:k, None] * rows).float() if f in READERS else rows.float()
    return SvdFactors(proj=proj, basis=basis, sigma=sigma, fingerprint=host_fingerprint(host))


def cache_path(fingerprint: str, k: int) -> Path:
    return alignlens_home() / "svd" / f"{fingerprint}-k{k}.safetensors"


def load_or_compute(host: Host, k: int = DEFAULT_K, cache: bool = True) -> SvdFactors:
    """Factors for `host` from the on-disk cache (ms), computing and storing them on a miss (s)."""
    fp = host_fingerprint(host)
    path = cache_path(fp, k)
    if cache and path.is_file():
        t = load_file(str(path))
        return SvdFactors(proj=t["proj"], basis=t["basis"], sigma=t["sigma"], fingerprint=fp)
    start = time.perf_counter()
    factors = compute_factors(host, k)
    log.info("svd: computed top-%d factors for %d blocks x 3 families in %.2f s",
             k, host.n_layers, time.perf_counter() - start)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file({"proj": factors.proj.contiguous(), "basis": factors.basis.contiguous(),
                   "sigma": factors.sigma.contiguous()}, str(tmp), metadata={"fingerprint": fp, "k": str(k)})
        os.replace(tmp, path)
    return factors
