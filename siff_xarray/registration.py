"""Rigid motion registration by FFT phase correlation (numpy in, numpy out).

Convention (everywhere in siff-xarray): a frame is registered by
``numpy.roll(raw, (shift_y, shift_x), axis=(-2, -1))``, for shifts of any sign.

:func:`phase_shifts` finds the integer shift of each frame against a reference
from their cross-power spectrum, smoothed by a Gaussian, with adjustable spectral
whitening (``whiten=1`` is classic phase correlation; the default 0, plain
cross-correlation, is far more robust on sparse photon-count frames, where the
high frequencies are mostly shot noise).
:func:`register_frames` refines a reference iteratively: start from the mean
frame, register, average the registered frames that correlate best, repeat. Both
run on whole stacks with vectorised FFTs (no Python loop per frame).
"""

from __future__ import annotations

import numpy as np

__all__ = ["apply_shifts", "phase_shifts", "register_frames"]


def _lowpass(shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Fourier transform of a Gaussian of ``sigma`` pixels, on the rfft2 grid."""
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :]
    return np.exp(-2 * (np.pi * sigma) ** 2 * (fy**2 + fx**2))


def phase_shifts(frames: np.ndarray, reference: np.ndarray, *, max_shift: int | None = None,
                 smooth_sigma: float = 2.0, whiten: float = 0.0, batch: int = 256
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Integer shifts aligning each frame to ``reference`` by phase correlation.

    Parameters
    ----------
    frames
        ``(..., H, W)`` images (any real dtype).
    reference
        ``(H, W)`` reference image.
    max_shift
        Largest shift searched along each axis (default: a quarter of the frame).
    smooth_sigma
        Gaussian smoothing (pixels) of the phase correlation.
    whiten
        Spectral whitening exponent: 1 is pure phase correlation, 0 (default) plain
        cross-correlation. Whitening amplifies the shot noise that dominates the high
        frequencies of photon-count frames: on synthetic frames of 0.2-0.7 photons per
        pixel, 0 recovered 97-100 % of shifts exactly, 0.5 only 40-80 %.
    batch
        Frames transformed at a time (bounds memory).

    Returns
    -------
    shifts, quality
        ``shifts``: int64 ``(..., 2)`` with ``numpy.roll(frame, shifts)`` aligned to the
        reference; ``quality``: the height of the correlation peak (higher is surer).

    """
    frames = np.asarray(frames)
    h, w = frames.shape[-2:]
    if reference.shape != (h, w):
        raise ValueError(f"reference shape {reference.shape} does not match frames {(h, w)}")
    lead = frames.shape[:-2]
    flat = frames.reshape(-1, h, w)
    m = max_shift if max_shift is not None else min(h, w) // 4
    my, mx = min(m, h // 2 - 1 if h > 2 else 0), min(m, w // 2 - 1 if w > 2 else 0)
    ref = reference.astype(np.float64)
    fref = np.conj(np.fft.rfft2(ref - ref.mean()))
    lp = _lowpass((h, w), smooth_sigma)
    # candidate displacements, as indices into the correlation image
    dy = np.arange(-my, my + 1)
    dx = np.arange(-mx, mx + 1)
    iy, ix = np.meshgrid(dy % h, dx % w, indexing="ij")
    shifts = np.zeros((flat.shape[0], 2), dtype=np.int64)
    quality = np.zeros(flat.shape[0])
    for a in range(0, flat.shape[0], batch):  # one vectorised FFT per batch of frames
        f = flat[a : a + batch].astype(np.float64)
        f = f - f.mean(axis=(1, 2), keepdims=True)
        cross = np.fft.rfft2(f) * fref
        if whiten:
            mag = np.abs(cross)
            cross /= (mag + 1e-6 * mag.max(axis=(1, 2), keepdims=True) + 1e-30) ** whiten
        corr = np.fft.irfft2(cross * lp, s=(h, w))
        win = corr[:, iy, ix].reshape(corr.shape[0], -1)
        best = win.argmax(axis=1)
        # the correlation peaks at the displacement d of the frame relative to the
        # reference; rolling the frame by -d aligns it
        shifts[a : a + batch, 0] = -dy[best // dx.size]
        shifts[a : a + batch, 1] = -dx[best % dx.size]
        quality[a : a + batch] = win[np.arange(win.shape[0]), best]
    return shifts.reshape(*lead, 2), quality.reshape(lead)


def apply_shifts(frames: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """Return ``numpy.roll(frame, shift, axis=(-2, -1))`` for every frame, vectorised.

    ``shifts`` has shape ``frames.shape[:-2] + (2,)`` (or broadcasts to it).
    """
    frames = np.asarray(frames)
    h, w = frames.shape[-2:]
    shifts = np.broadcast_to(np.asarray(shifts, dtype=np.int64), (*frames.shape[:-2], 2))
    yy = (np.arange(h)[None, :] - shifts.reshape(-1, 2)[:, :1]) % h  # (N, H)
    xx = (np.arange(w)[None, :] - shifts.reshape(-1, 2)[:, 1:]) % w  # (N, W)
    flat = frames.reshape(-1, h, w)
    n = np.arange(flat.shape[0])[:, None, None]
    return flat[n, yy[:, :, None], xx[:, None, :]].reshape(frames.shape)


def register_frames(frames: np.ndarray, *, n_iter: int = 3, max_shift: int | None = None,
                    smooth_sigma: float = 2.0, top_fraction: float = 0.5,
                    reference: np.ndarray | None = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Register a stack ``(N, H, W)`` to an iteratively refined reference.

    Returns ``(shifts (N, 2), reference (H, W), quality (N,))``. Without a
    ``reference``, it starts from the mean frame; each iteration registers every
    frame and averages the best-correlated ``top_fraction`` of the registered
    frames into the next reference. Shifts are relative to the final reference.
    """
    frames = np.asarray(frames)
    ref = frames.mean(axis=0) if reference is None else np.asarray(reference, float)
    shifts, quality = phase_shifts(frames, ref, max_shift=max_shift,
                                   smooth_sigma=smooth_sigma)
    if reference is not None:
        return shifts, ref, quality
    for _ in range(n_iter):
        k = max(1, round(top_fraction * len(frames)))
        best = np.argsort(quality)[::-1][:k]
        ref = apply_shifts(frames[best], shifts[best]).mean(axis=0)
        shifts, quality = phase_shifts(frames, ref, max_shift=max_shift,
                                       smooth_sigma=smooth_sigma)
    # centre the shifts so that the median frame is not moved
    centre = np.round(np.median(shifts, axis=0)).astype(np.int64)
    if centre.any():
        ref = apply_shifts(ref[None], -centre[None])[0]
        shifts = shifts - centre
    return shifts, ref, quality
