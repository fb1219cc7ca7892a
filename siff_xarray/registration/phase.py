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
import scipy.fft as sfft

__all__ = [
    "apply_shifts",
    "correlation_windows",
    "peak_shifts",
    "phase_shifts",
    "plane_weights",
    "register_frames",
    "register_planes",
    "regularize_planes",
]


def _lowpass(shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Fourier transform of a Gaussian of ``sigma`` pixels, on the rfft2 grid."""
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :]
    return np.exp(-2 * (np.pi * sigma) ** 2 * (fy**2 + fx**2))


def correlation_windows(frames: np.ndarray, reference: np.ndarray, *,
                        max_shift: int | None = None, smooth_sigma: float = 2.0,
                        whiten: float = 0.0, batch: int = 256
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Smoothed cross-correlation of each frame with ``reference`` near zero lag.

    Returns ``(windows, dy, dx)``: ``windows[..., i, j]`` is the correlation at the
    frame's displacement ``(dy[i], dx[j])`` relative to the reference (rolling the
    frame by ``(-dy[i], -dx[j])`` aligns it). Parameters as in :func:`phase_shifts`.
    """
    frames = np.asarray(frames)
    h, w = frames.shape[-2:]
    if reference.shape != (h, w):
        raise ValueError(f"reference shape {reference.shape} does not match frames {(h, w)}")
    lead = frames.shape[:-2]
    flat = frames.reshape(-1, h, w)
    m = max_shift if max_shift is not None else min(h, w) // 4
    my, mx = min(m, h // 2 - 1 if h > 2 else 0), min(m, w // 2 - 1 if w > 2 else 0)
    ref = np.asarray(reference, dtype=np.float32)
    fref = np.conj(sfft.rfft2(ref - ref.mean(), workers=-1))
    lp = _lowpass((h, w), smooth_sigma).astype(np.float32)
    dy = np.arange(-my, my + 1)
    dx = np.arange(-mx, mx + 1)
    iy, ix = np.meshgrid(dy % h, dx % w, indexing="ij")
    out = np.empty((flat.shape[0], dy.size, dx.size), dtype=np.float32)
    for a in range(0, flat.shape[0], batch):  # one vectorised FFT per batch of frames
        f = flat[a : a + batch].astype(np.float32)
        f -= f.mean(axis=(1, 2), keepdims=True)
        cross = sfft.rfft2(f, workers=-1)
        cross *= fref
        if whiten:
            mag = np.abs(cross)
            cross /= (mag + 1e-6 * mag.max(axis=(1, 2), keepdims=True) + 1e-30) ** whiten
        cross *= lp
        corr = sfft.irfft2(cross, s=(h, w), workers=-1)
        out[a : a + batch] = corr[:, iy, ix]
    return out.reshape(*lead, dy.size, dx.size), dy, dx


def peak_shifts(windows: np.ndarray, dy: np.ndarray, dx: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """Shifts (``int64 (..., 2)``) and peak heights of :func:`correlation_windows` output."""
    lead = windows.shape[:-2]
    win = windows.reshape(-1, dy.size * dx.size)
    best = win.argmax(axis=1) if win.shape[0] else np.zeros(0, dtype=np.int64)
    # the correlation peaks at the frame's displacement d; rolling by -d aligns it
    shifts = np.stack([-dy[best // dx.size], -dx[best % dx.size]], axis=1).astype(np.int64)
    quality = win[np.arange(win.shape[0]), best]
    return shifts.reshape(*lead, 2), quality.reshape(lead)


def plane_weights(nz: int, sigma: float) -> np.ndarray | None:
    """Return weights ``(Z, Z)`` that mix neighbouring planes' evidence.

    A Gaussian of ``sigma`` planes, rows summing to 1 (``inf`` weighs all planes
    alike, for planes that move as one); None when ``sigma <= 0`` or there is one
    plane.
    """
    if sigma <= 0 or nz < 2:
        return None
    z = np.arange(nz)
    wts = np.ones((nz, nz)) if np.isinf(sigma) else \
        np.exp(-((z[:, None] - z[None, :]) ** 2) / (2.0 * sigma**2))
    return wts / wts.sum(axis=1, keepdims=True)


def regularize_planes(windows: np.ndarray, sigma: float) -> np.ndarray:
    """Mix correlation windows ``(Z, ...)`` of neighbouring planes with Gaussian weights.

    Plane ``k`` gets ``sum_j exp(-(k - j)**2 / (2 sigma**2)) * windows[j]`` (weights
    normalised, :func:`plane_weights`): planes of one volume, imaged within
    milliseconds, move together, so pooling their evidence steadies planes with
    few photons. ``sigma`` is in planes; 0 leaves the windows unchanged.
    """
    wts = plane_weights(windows.shape[0], sigma)
    return windows if wts is None else np.tensordot(wts, windows, axes=(1, 0))


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
    win, dy, dx = correlation_windows(frames, reference, max_shift=max_shift,
                                      smooth_sigma=smooth_sigma, whiten=whiten, batch=batch)
    return peak_shifts(win, dy, dx)


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
    One plane of :func:`register_planes`.
    """
    frames = np.asarray(frames)
    ref = None if reference is None else np.asarray(reference, float)[None]
    shifts, refs, quality = register_planes(frames[:, None], n_iter=n_iter, max_shift=max_shift,
                                            smooth_sigma=smooth_sigma,
                                            top_fraction=top_fraction, reference=ref)
    return shifts[:, 0], refs[0], quality[:, 0]


def _initial_references(frames: np.ndarray, smooth_sigma: float, pooled: bool,
                        n_sample: int = 120, n_best: int = 20) -> np.ndarray:
    """Sharp starting references ``(Z, H, W)`` from frames ``(N, Z, H, W)``.

    The mean of all frames is blurred by the motion, and refinement from a blurred
    start can settle between two positions. Instead (as suite2p does), take the
    frame whose ``n_best`` most similar frames (correlation of smoothed frames, up
    to ``n_sample`` frames evenly spaced) are most similar, and average it with
    them: frames caught at nearly the same position. With ``pooled``, the
    similarities of all planes are added, so all planes start from the same frames.
    """
    n, nz, h, w = frames.shape
    pick = np.unique(np.linspace(0, n - 1, min(n, n_sample)).round().astype(int))
    lp = _lowpass((h, w), max(smooth_sigma, 1.0)).astype(np.float32)
    sm = sfft.irfft2(sfft.rfft2(frames[pick].astype(np.float32), workers=-1) * lp, s=(h, w),
                     workers=-1)
    sm = sm[..., ::2, ::2].reshape(len(pick), nz, -1)  # smooth, so subsampling loses little
    sm -= sm.mean(axis=2, keepdims=True)
    sm /= np.linalg.norm(sm, axis=2, keepdims=True) + 1e-12
    corr = np.einsum("izp,jzp->zij", sm, sm)  # (Z, n, n)
    k = min(n_best, len(pick))
    refs = np.empty((nz, h, w))
    groups = [corr.sum(axis=0)] if pooled else list(corr)
    for z in range(nz):
        c = groups[0 if pooled else z]
        top = np.argsort(-c, axis=1)[:, :k]  # each frame's k most similar (itself first)
        seed = int(np.argmax(np.take_along_axis(c, top, axis=1).sum(axis=1)))
        refs[z] = frames[pick[top[seed]], z].mean(axis=0)
    return refs


def register_planes(frames: np.ndarray, *, n_iter: int = 3, max_shift: int | None = None,
                    smooth_sigma: float = 2.0, whiten: float = 0.0,
                    regularize_sigma: float = 0.0, top_fraction: float = 0.5,
                    reference: np.ndarray | None = None, refine_frames: int = 100,
                    return_shifts: bool = True
                    ) -> tuple[np.ndarray | None, np.ndarray, np.ndarray | None]:
    """Register volumes ``(N, Z, H, W)`` plane by plane, with refined references.

    Each plane's reference starts from the frames most similar to each other
    (:func:`_initial_references`); every iteration registers the frames (pooling
    neighbouring planes' correlations when ``regularize_sigma > 0``, see
    :func:`regularize_planes`) and averages each plane's best-correlated
    ``top_fraction`` of registered frames into its next reference. The first
    ``n_iter - 1`` iterations use at most ``refine_frames`` evenly spaced frames; the
    last uses them all. Pooling during the refinement keeps the planes' references
    mutually aligned, which the pooled alignment relies on. Finally the shifts are
    centred so that the median frame of each plane (of all planes, when pooling) is
    not moved.

    Returns ``(shifts (N, Z, 2), references (Z, H, W), quality (N, Z))``; with
    ``return_shifts=False`` only the references (the final alignment of every frame
    is skipped: ``(None, references, None)``).
    """
    frames = np.asarray(frames)
    n, nz = frames.shape[:2]
    opts = {"max_shift": max_shift, "smooth_sigma": smooth_sigma, "whiten": whiten}

    def align(refs: np.ndarray, idx: np.ndarray | slice = slice(None)
              ) -> tuple[np.ndarray, np.ndarray]:
        got = [correlation_windows(frames[idx, k], refs[k], **opts) for k in range(nz)]
        wins = regularize_planes(np.stack([g[0] for g in got]), regularize_sigma)
        s, q = peak_shifts(wins, got[0][1], got[0][2])  # (Z, N, 2), (Z, N)
        return s.transpose(1, 0, 2), q.T

    def average(idx: np.ndarray, shifts: np.ndarray, quality: np.ndarray) -> np.ndarray:
        k = max(1, round(top_fraction * len(idx)))
        return np.stack([
            apply_shifts(frames[idx[best], z], shifts[best, z]).mean(axis=0)
            for z, best in enumerate(np.argsort(-quality, axis=0)[:k].T)])

    if reference is not None:
        refs = np.asarray(reference, float)
        shifts, quality = align(refs)
        return shifts, refs, quality
    sub = np.unique(np.linspace(0, n - 1, min(n, max(refine_frames, 1))).round().astype(int))
    refs = _initial_references(frames, smooth_sigma, regularize_sigma > 0)
    shifts, quality = align(refs, sub)
    for _ in range(max(n_iter - 1, 0)):  # refine on the subset
        refs = average(sub, shifts, quality)
        shifts, quality = align(refs, sub)
    if n_iter > 0:  # the last refinement uses every frame
        everything = np.arange(n)
        shifts, quality = align(refs) if len(sub) < n else (shifts, quality)
        refs = average(everything, shifts, quality)
    # centre on the median frame of each plane (of all planes together when pooling, so
    # that the references stay mutually aligned); the median of the last alignment
    pooled = regularize_sigma > 0 and nz > 1
    centre = np.round(np.median(shifts.reshape(-1, 2) if pooled else shifts, axis=0)
                      ).astype(np.int64)
    centre = np.broadcast_to(centre, (nz, 2))
    if centre.any():
        refs = apply_shifts(refs, -centre)
    if not return_shifts:
        return None, refs, None
    shifts, quality = align(refs)
    return shifts, refs, quality
