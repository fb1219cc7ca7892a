"""Rigid motion registration of frame stacks (numpy in, numpy out).

Modules
-------
phase    the native method: FFT correlation against iteratively refined references
suite2p  an adapter to suite2p 1.x's rigid registration (optional extra)
blocks   references and block-wise alignment as ``ds.siff.register`` runs them

Convention (everywhere in siff-xarray): a frame is registered by
``numpy.roll(raw, (shift_y, shift_x), axis=(-2, -1))``, for shifts of any sign.

Import rule: numpy and scipy (suite2p/torch lazily, in :mod:`.suite2p`); never
the reader, backend, store or accessor.
"""

from .phase import (
    apply_shifts,
    correlation_windows,
    peak_shifts,
    phase_shifts,
    register_frames,
    register_planes,
    regularize_planes,
)

__all__ = [
    "apply_shifts", "correlation_windows", "peak_shifts", "phase_shifts", "register_frames",
    "register_planes", "regularize_planes",
]
