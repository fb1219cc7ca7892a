"""Registration of frame blocks as the accessor runs it: references, then block by block.

:func:`build_references` makes one reference per plane from sample volumes;
:func:`align_block` aligns a block of volumes to them (the unit a Dask task
runs). Both dispatch to the native method (:mod:`.phase`) or suite2p
(:mod:`.suite2p`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["align_block", "build_references"]


def build_references(frames: np.ndarray, method: str, n_iter: int, regularize_sigma: float,
                     opts: dict[str, Any]) -> np.ndarray:
    """Build references ``(z, y, x)`` from sample volumes ``(N, z, y, x)``."""
    if method == "suite2p":
        from .suite2p import suite2p_reference

        return np.stack([suite2p_reference(frames[:, k], **opts)
                         for k in range(frames.shape[1])])
    from .phase import register_planes

    return register_planes(frames, n_iter=n_iter, regularize_sigma=regularize_sigma,
                           return_shifts=False, **opts)[1]


def align_block(block: np.ndarray, refs: np.ndarray, method: str, opts: dict[str, Any],
                regularize_sigma: float) -> np.ndarray:
    """Shifts and quality of frames ``(..., z, y, x)`` against per-plane ``refs``.

    Returns ``float64 (..., z, 3)``: ``shift_y``, ``shift_x``, ``quality``. Frames
    without photons get zero shifts and quality 0.
    """
    nz, h, w = block.shape[-3:]
    lead = block.shape[:-3]
    flat = block.reshape(-1, nz, h, w)
    if method == "suite2p":
        from .suite2p import suite2p_shifts

        parts = [suite2p_shifts(flat[:, k], refs[k], **opts) for k in range(nz)]
        shifts = np.stack([p[0] for p in parts])
        quality = np.stack([p[2] for p in parts])
    else:
        from .phase import register_planes

        shifts, _, quality = register_planes(flat, reference=refs,
                                             regularize_sigma=regularize_sigma, **opts)
        shifts, quality = shifts.transpose(1, 0, 2), quality.T  # (z, N, 2), (z, N)
    empty = ~flat.reshape(flat.shape[0], nz, -1).any(axis=2).T  # (z, N)
    shifts[empty] = 0
    quality = np.where(empty, 0.0, quality)
    out = np.concatenate([shifts.astype(np.float64), quality[..., None]], axis=-1)
    return out.transpose(1, 0, 2).reshape(*lead, nz, 3)
