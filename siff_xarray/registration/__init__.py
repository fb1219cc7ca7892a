"""Rigid motion registration of frame stacks (numpy in, numpy out).

Modules
-------
likelihood  the native default: maximum-likelihood shifts of photon counts against
            canvases refined by coarse-to-fine EM, optional motion priors
phase    FFT correlation against iteratively refined references
suite2p  an adapter to suite2p 1.x's rigid registration (optional extra)
blocks   references and block-wise alignment as ``ds.siff.register`` runs them

Convention (everywhere in siff-xarray): a frame is registered by
``numpy.roll(raw, (shift_y, shift_x), axis=(-2, -1))``, for shifts of any sign.

Import rule: numpy, scipy, numba and the leaves (suite2p/torch lazily, in
:mod:`.suite2p`); never the reader, backend, store or accessor.
"""

from .likelihood import (
    align_planes,
    decode_maps,
    estimate_canvas,
    likelihood_maps,
    register_likelihood,
    to_canvas,
)
from .phase import (
    apply_shifts,
    correlation_windows,
    peak_shifts,
    phase_shifts,
    plane_weights,
    register_frames,
    register_planes,
    regularize_planes,
)

__all__ = [
    "align_planes", "apply_shifts", "correlation_windows", "decode_maps", "estimate_canvas",
    "likelihood_maps", "peak_shifts", "phase_shifts", "plane_weights", "register_frames",
    "register_likelihood", "register_planes", "regularize_planes", "to_canvas",
]
