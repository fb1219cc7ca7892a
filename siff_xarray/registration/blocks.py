"""Registration of frame blocks as the accessor runs it: references, then block by block.

:func:`build_references` makes one reference per plane from sample volumes;
:func:`align_block` aligns a block of volumes to them (the unit a Dask task
runs). Both dispatch to the native methods (:mod:`.likelihood`, :mod:`.phase`)
or suite2p (:mod:`.suite2p`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._progress import ProgressArg, Reporter
from .phase import plane_weights

__all__ = ["METHODS", "align_block", "build_references", "crop_reference"]

#: Registration methods, the default first.
METHODS = ("likelihood", "phase", "suite2p")


def crop_reference(refs: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Return the centre ``shape`` of references ``(z, H, W)`` (a canvas has a margin)."""
    h, w = shape
    ky, kx = (refs.shape[-2] - h) // 2, (refs.shape[-1] - w) // 2
    return refs[..., ky: ky + h, kx: kx + w]


def build_references(frames: np.ndarray, method: str, n_iter: int, regularize_sigma: float,
                     opts: dict[str, Any], consecutive: bool = False,
                     progress: ProgressArg = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Build references from sample volumes ``(N, z, y, x)``.

    Returns ``(references, fitted)``. ``"likelihood"`` returns canvases
    (references with a margin of the largest shift on every side) and, as
    ``fitted`` ``float64 (N, z, 3)``, the sample frames' own shifts and quality from
    the cross-fitted EM (aligned against the final canvas, which holds their own
    photons, they would be biased toward where they already are). ``consecutive``
    says the sample frames follow each other in time (the motion prior
    ``opts["step_cost"]`` then applies within the EM). Other methods: ``fitted``
    is None. ``progress`` reports the planes (suite2p) or the coarse-to-fine levels
    (likelihood) done.
    """
    task = f"registration reference from {frames.shape[0]} volumes"
    if method == "suite2p":
        from .suite2p import suite2p_reference

        with Reporter(task, frames.shape[1], "planes", progress) as bar:
            return np.stack([suite2p_reference(frames[:, k], **opts)
                             for k in bar.track(range(frames.shape[1]))]), None
    if method == "likelihood":
        from .likelihood import default_schedule, register_likelihood

        levels = len(default_schedule(frames.shape[-2:]))
        with Reporter(task, levels, "levels", progress) as bar:
            canvases, shifts, quality = register_likelihood(
                frames, max_shift=opts.get("max_shift"), n_iter=n_iter,
                pool=plane_weights(frames.shape[1], regularize_sigma),
                step_cost=opts.get("step_cost", 0.0) if consecutive else 0.0,
                on_level=bar.advance)
        empty = ~frames.reshape(*frames.shape[:2], -1).any(axis=2)
        shifts[empty] = 0
        quality[empty] = 0.0
        return canvases, np.concatenate([shifts.astype(np.float64), quality[..., None]], axis=-1)
    from .phase import register_planes

    return register_planes(frames, n_iter=n_iter, regularize_sigma=regularize_sigma,
                           return_shifts=False, **opts)[1], None


def align_block(block: np.ndarray, refs: np.ndarray, method: str, opts: dict[str, Any],
                regularize_sigma: float) -> np.ndarray:
    """Shifts and quality of frames ``(..., z, y, x)`` against per-plane ``refs``.

    Returns ``float64 (..., z, 3)``: ``shift_y``, ``shift_x``, ``quality``. Frames
    without photons get zero shifts and quality 0. With ``"likelihood"``, frames
    follow each other in time along the leading axes (``opts["step_cost"]``
    links consecutive frames of a plane within the block).
    """
    nz, h, w = block.shape[-3:]
    lead = block.shape[:-3]
    flat = block.reshape(-1, nz, h, w)
    if method == "suite2p":
        from .suite2p import suite2p_shifts

        parts = [suite2p_shifts(flat[:, k], refs[k], **opts) for k in range(nz)]
        shifts = np.stack([p[0] for p in parts])
        quality = np.stack([p[2] for p in parts])
    elif method == "likelihood":
        from .likelihood import align_planes, canvas_margin, to_canvas

        canvases = to_canvas(refs, (h, w), canvas_margin((h, w), opts.get("max_shift")))
        shifts, quality = align_planes(flat, canvases, pool=plane_weights(nz, regularize_sigma),
                                       step_cost=opts.get("step_cost", 0.0))
        shifts, quality = shifts.transpose(1, 0, 2), quality.T
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
