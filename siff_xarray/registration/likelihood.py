"""Rigid registration by the likelihood of photon counts (numpy in, numpy out).

A frame of photon counts ``c`` taken at displacement ``d`` of a scene with rate ``R``
holds, given its total, a multinomial sample of ``R`` seen through the frame's
window at ``d``. The log-likelihood of ``d`` is

    ``LL(d) = sum_y c(y) log R(y + d) - N log sum_y R(y + d)``

(``N`` the frame's photons): a correlation of the counts with ``log R`` plus the
window's total, both computed for every ``d`` at once (an FFT and an integral
image). Its maximum is the maximum-likelihood rigid shift for Poisson counts.
Phase correlation and spectral whitening instead weigh every spatial frequency
alike, and the high frequencies of sparse frames are mostly shot noise.

``R`` is a *canvas*: the scene on a grid larger than the frame by the largest
shift on every side, so that pixels that move in from outside the reference
window are scored against what the other frames saw there, not against the
opposite edge. It is estimated from the frames themselves by alternating
alignment and re-estimation over all frames (hard EM), coarse to fine: the first
canvases are smoothed by a Gaussian of several pixels and the smoothing shrinks
level by level. A sharp reference built from a poor first alignment is a trap:
frames that were put one pixel apart blend into a reference with a seam that
then holds them apart (the failure of a reference built from a few similar
frames); the coarse start places frames by the large structures, where a one
pixel error costs little, before the fine levels resolve single pixels.

Optional priors: planes of one volume that share their motion (their
log-likelihood maps are added, see ``pool``), and motion that is smooth in time
(``step_cost``: a Viterbi pass over the shift grid with a cost per pixel moved
between consecutive frames).

Convention (everywhere in siff-xarray): ``numpy.roll(raw, (shift_y, shift_x))``
registers a frame. A frame seen at displacement ``d`` of the reference (``frame(y)
= reference(y + d)``) has ``shift = d``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numba
import numpy as np
import scipy.fft as sfft
from scipy.ndimage import distance_transform_edt

#: what the compiled code takes from other modules (docs/architecture.md, Rules)
_FOREIGN_INPUTS = "e3b0c44298fc1c14"

__all__ = [
    "align_planes", "canvas_margin", "decode_maps", "default_schedule", "estimate_canvas",
    "frame_spectra", "likelihood_maps", "register_likelihood", "to_canvas",
]

_JIT = {"cache": True, "nogil": True}

#: Pixels beyond the largest coarse shift that the full-resolution levels search.
SLACK = 4

#: Bytes of frame spectra :func:`register_likelihood` keeps between iterations (at
#: one resolution at a time: the binned levels' spectra are dropped before the
#: full-resolution ones are computed).
SPECTRA_BUDGET = 1 << 30


def default_schedule(frame_shape: tuple[int, int]) -> tuple[float, ...]:
    """Return the canvas smoothing (pixels) of each coarse-to-fine level for a frame size.

    The first level is smoothed by a twentieth of the smaller side (at least 2
    pixels), each next by two thirds of the one before while above 2 pixels, and
    the last by 1 pixel: a canvas of a hundred sparse frames is noisy, and its
    noise costs more exact shifts than the blur does. Starting finer (4 pixels on
    256 x 128 frames) let a one-pixel seam form on one plane of a benchmark file;
    starting as coarse on 64 x 48 frames blurred away what places them (both
    measured on the files of docs/performance.md and tests/test_registration.py).
    """
    levels = [max(2.0, min(frame_shape) / 20.0)]
    while levels[-1] * 2 / 3 >= 2.0:
        levels.append(levels[-1] * 2 / 3)
    return (*levels, 1.0)


def canvas_margin(frame_shape: tuple[int, int], max_shift: int | None) -> tuple[int, int]:
    """Return the search range ``(My, Mx)`` for frames of ``frame_shape``.

    ``max_shift`` (default a quarter of the smaller side), at most half a frame
    less one pixel.
    """
    h, w = frame_shape
    m = min(h, w) // 4 if max_shift is None else int(max_shift)
    if m < 0:
        raise ValueError(f"max_shift must be >= 0, got {max_shift}")
    return min(m, max(h // 2 - 1, 0)), min(m, max(w // 2 - 1, 0))


def to_canvas(reference: np.ndarray, frame_shape: tuple[int, int],
              margin: tuple[int, int]) -> np.ndarray:
    """Return a reference ``(..., h + 2k, w + 2l)`` as a canvas of ``margin`` per side.

    A larger margin is cropped; a smaller one (a plain ``(h, w)`` reference has
    none) is padded by repeating the edge pixels (the mean would be a poor guess
    where the edges are background, and biases shifts toward the centre). The
    result is strictly positive (floored at a millionth of the mean), as its
    logarithm is taken.
    """
    ref = np.asarray(reference, dtype=np.float64)
    h, w = frame_shape
    ky, kx = ref.shape[-2] - h, ref.shape[-1] - w
    if ky < 0 or kx < 0 or ky % 2 or kx % 2:
        raise ValueError(f"reference of shape {ref.shape[-2:]} does not fit frames of shape "
                         f"{(h, w)} (it must be the frame shape plus an equal margin per side)")
    (my, mx), (ky, kx) = margin, (ky // 2, kx // 2)
    ref = ref[..., max(ky - my, 0): ref.shape[-2] - max(ky - my, 0),
              max(kx - mx, 0): ref.shape[-1] - max(kx - mx, 0)]
    mean = ref.mean(axis=(-2, -1), keepdims=True)
    py, px = max(my - ky, 0), max(mx - kx, 0)
    if py or px:
        ref = np.pad(ref, [(0, 0)] * (ref.ndim - 2) + [(py, py), (px, px)], mode="edge")
    floor = 1e-6 * np.maximum(mean, 1e-300)
    return np.maximum(ref, floor)


def _check_fit(frame_shape: tuple[int, int], canvas_shape: tuple[int, ...]) -> tuple[int, int]:
    (h, w), (hh, ww) = frame_shape, canvas_shape
    if hh < h or ww < w or (hh - h) % 2 or (ww - w) % 2:
        raise ValueError(f"canvas {tuple(canvas_shape)} does not fit frames of shape {(h, w)}")
    return (hh - h) // 2, (ww - w) // 2


def frame_spectra(frames: np.ndarray, canvas_shape: tuple[int, int], *, workers: int = -1
                  ) -> np.ndarray:
    """Return the conjugated complex64 spectra ``(N, H, W // 2 + 1)`` of frames.

    Frames ``(N, h, w)`` are zero-padded to ``canvas_shape (H, W)``: what
    :func:`likelihood_maps` correlates with the canvas.

    The rows beyond the frame are zeros, so the transform along ``x`` runs on the
    frame's rows only. ``workers``: threads of each transform (``scipy.fft``).
    """
    hh, ww = canvas_shape
    frames = np.asarray(frames, dtype=np.float32)
    f = np.zeros((*frames.shape[:-2], hh, ww // 2 + 1), dtype=np.complex64)
    f[..., : frames.shape[-2], :] = sfft.rfft(frames, n=ww, axis=-1, workers=workers)
    f = sfft.fft(f, axis=-2, workers=workers, overwrite_x=True)
    return np.conjugate(f, out=f)


def likelihood_maps(frames: np.ndarray, canvas: np.ndarray, *, batch: int = 128,
                    spectra: np.ndarray | None = None, totals: np.ndarray | None = None,
                    workers: int = -1) -> np.ndarray:
    """Log-likelihood of every shift of every frame under ``canvas``.

    Parameters
    ----------
    frames
        ``(N, h, w)`` photon counts.
    canvas
        ``(h + 2 My, w + 2 Mx)`` positive rates (see :func:`to_canvas`).
    batch
        Frames transformed at a time (bounds memory).
    spectra
        The frames' :func:`frame_spectra` for this canvas shape, when already
        computed (iterations over the same frames reuse them).
    totals
        The frames' photon counts, when already known.
    workers
        Threads of each transform (``scipy.fft``; -1: every core).

    Returns
    -------
    numpy.ndarray
        float64 ``(N, 2 My + 1, 2 Mx + 1)``: entry ``[n, i, j]`` is the
        log-likelihood (nats, up to a constant per frame) of shift ``(i - My, j - Mx)``.

    """
    frames = np.asarray(frames)
    n, h, w = frames.shape
    hh, ww = canvas.shape
    my, mx = _check_fit((h, w), canvas.shape)
    log_r = np.log(canvas)
    log_r -= log_r.mean()  # a constant per frame; keeps float32 sums small
    f_log = sfft.rfft2(log_r.astype(np.float32), workers=workers)
    log_box = np.log(_window_totals(canvas, (h, w)))
    if totals is None:
        totals = frames.reshape(n, -1).sum(axis=1, dtype=np.float64)
    out = np.empty((n, 2 * my + 1, 2 * mx + 1))
    for a in range(0, n, batch):
        f = (frame_spectra(frames[a: a + batch], (hh, ww), workers=workers) if spectra is None
             else spectra[a: a + batch] * f_log)
        if spectra is None:
            f *= f_log
        # corr[o] = sum_y c(y) log R(y + o), needed at offsets o = M + d in [0, 2M] only:
        # invert along y, keep those rows, then invert along x
        rows = sfft.ifft(f, axis=-2, workers=workers, overwrite_x=True)[:, : 2 * my + 1]
        corr = sfft.irfft(rows, n=ww, axis=-1, workers=workers)
        out[a: a + batch] = corr[:, :, : 2 * mx + 1]
        out[a: a + batch] -= totals[a: a + batch, None, None] * log_box
    return out


def _sliding_sums(a: np.ndarray, n: int, axis: int) -> np.ndarray:
    """Return the sums of ``n`` consecutive entries along ``axis``, for every start."""
    a = np.moveaxis(np.asarray(a, dtype=np.float64), axis, 0)
    out = np.empty((a.shape[0] - n + 1, *a.shape[1:]))
    out[0] = a[:n].sum(axis=0)
    out[1:] = a[n:] - a[: a.shape[0] - n]  # what enters minus what leaves
    np.cumsum(out, axis=0, out=out)
    return np.moveaxis(out, 0, axis)


def _window_totals(canvas: np.ndarray, frame_shape: tuple[int, int]) -> np.ndarray:
    """Total of ``canvas`` under a frame's window at every offset ``(2 My + 1, 2 Mx + 1)``.

    Separable running sums: the full frame's rows are added once, then only the
    rows and columns that enter and leave the window as it moves.
    """
    h, w = frame_shape
    return _sliding_sums(_sliding_sums(canvas, h, 0), w, 1)


@numba.njit(**_JIT)
def _accumulate_kernel(frames: np.ndarray, offsets: np.ndarray, group: np.ndarray,
                       bright: np.ndarray, acc: np.ndarray,
                       exposure: np.ndarray) -> None:  # pragma: no cover - jitted
    """Add each frame ``n`` at ``offsets[n]`` into ``acc[group[n]]``.

    Its brightness goes over its window into ``exposure[group[n]]``: the corners of
    a difference array ``(G, H + 1, W + 1)``, summed up at the end (the running
    sums along both axes, in place).
    """
    n, h, w = frames.shape
    n_groups, hh, ww = acc.shape
    for i in range(n):
        g, oy, ox = group[i], offsets[i, 0], offsets[i, 1]
        if g < 0 or g >= n_groups or oy < 0 or ox < 0 or oy + h > hh or ox + w > ww:
            continue  # the caller clips offsets; never write outside the canvas
        for y in range(h):
            for x in range(w):
                acc[g, oy + y, ox + x] += frames[i, y, x]
        exposure[g, oy, ox] += bright[i]
        exposure[g, oy, ox + w] -= bright[i]
        exposure[g, oy + h, ox] -= bright[i]
        exposure[g, oy + h, ox + w] += bright[i]
    for g in range(exposure.shape[0]):
        for y in range(exposure.shape[1]):
            for x in range(1, exposure.shape[2]):
                exposure[g, y, x] += exposure[g, y, x - 1]
            if y:
                for x in range(exposure.shape[2]):
                    exposure[g, y, x] += exposure[g, y - 1, x]


def _accumulate(frames: np.ndarray, shifts: np.ndarray, margin: tuple[int, int],
                totals: np.ndarray, mean_total: float, group: np.ndarray | None = None,
                n_groups: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Sum photons and brightness-weighted exposure per canvas pixel, per group.

    ``totals`` are the frames' photons and ``mean_total`` what brightness is
    relative to; ``group`` (default all 0) sorts frames into ``n_groups`` sums.
    Returns float64 ``(n_groups, H, W)`` photons and exposure: the sufficient
    statistics of :func:`estimate_canvas`.
    """
    n, h, w = frames.shape
    my, mx = margin
    hh, ww = h + 2 * my, w + 2 * mx
    acc = np.zeros((n_groups, hh, ww))
    diff = np.zeros((n_groups, hh + 1, ww + 1))
    if n and mean_total > 0:
        offsets = np.clip(np.asarray(shifts, dtype=np.int64).reshape(n, 2)
                          + np.array([my, mx]), 0, np.array([2 * my, 2 * mx]))
        group = np.zeros(n, dtype=np.int64) if group is None else \
            np.asarray(group, dtype=np.int64)
        _accumulate_kernel(np.ascontiguousarray(frames), offsets, group,
                           np.asarray(totals, dtype=np.float64) / mean_total, acc, diff)
    return acc, diff[:, :hh, :ww]


#: The covered masks seen last and their nearest-pixel maps (a few per plane).
_NEAREST: dict[bytes, tuple[np.ndarray, ...]] = {}


def _nearest(covered: np.ndarray) -> tuple[np.ndarray, ...]:
    """Return the indices of every pixel's nearest covered pixel (memoised by mask)."""
    key = np.packbits(covered).tobytes() + repr(covered.shape).encode()
    found = _NEAREST.get(key)  # planes run in threads: one lookup, then a local
    if found is None:
        if len(_NEAREST) > 64:
            _NEAREST.clear()
        found = _NEAREST[key] = tuple(distance_transform_edt(
            ~covered, return_distances=False, return_indices=True))
    return found


@numba.njit(**_JIT)
def _gauss_kernel(img: np.ndarray, weights: np.ndarray,
                  out: np.ndarray) -> None:  # pragma: no cover - jitted
    """Correlate ``img (H, W)`` with ``weights`` along y, then x; edges repeat.

    float64 sums, float32 between the passes and out: what
    ``scipy.ndimage.gaussian_filter(img.astype(float32), mode="nearest")`` computes,
    with the taps as the outer loop so that the inner one runs along a row.
    """
    hh, ww = img.shape
    r = (weights.shape[0] - 1) // 2
    tmp = np.empty((hh, ww), dtype=np.float32)
    acc = np.empty(ww, dtype=np.float64)
    for y in range(hh):
        acc[:] = 0.0
        for t in range(2 * r + 1):
            src = min(max(y + t - r, 0), hh - 1)
            wt = weights[t]
            for x in range(ww):
                acc[x] += wt * img[src, x]
        for x in range(ww):
            tmp[y, x] = acc[x]
    buf = np.empty(ww + 2 * r, dtype=np.float32)
    for y in range(hh):
        for x in range(ww + 2 * r):
            buf[x] = tmp[y, min(max(x - r, 0), ww - 1)]
        acc[:] = 0.0
        for t in range(2 * r + 1):
            wt = weights[t]
            for x in range(ww):
                acc[x] += wt * buf[x + t]
        for x in range(ww):
            out[y, x] = acc[x]


def _smooth(img: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing (``truncate=3``, edges repeated) of a 2-D image, as float64.

    The same weights and order as ``scipy.ndimage.gaussian_filter`` on float32, in a
    compiled loop that releases the GIL (about twice as fast on canvases). ``sigma``
    of 0 or less leaves the image as it is, as scipy does.
    """
    if not sigma > 0:
        return np.array(img, dtype=np.float64)
    r = int(3.0 * float(sigma) + 0.5)
    x = np.arange(-r, r + 1, dtype=np.float64)
    weights = np.exp(-0.5 / float(sigma) ** 2 * x * x)
    weights /= weights.sum()
    src = np.ascontiguousarray(img, dtype=np.float32)
    out = np.empty(src.shape, dtype=np.float32)
    _gauss_kernel(src, weights, out)
    return out.astype(np.float64)


def _local_rate(acc: np.ndarray, exposure: np.ndarray, rate: float) -> np.ndarray:
    """Return the local rate a canvas is shrunk toward.

    A 2-pixel Gaussian average of photons over exposure, carried from the nearest
    covered pixel into pixels no frame covered (the global mean would be a poor
    guess at background edges and pull shifts toward the centre).
    """
    local_exp = _smooth(exposure, 2.0)
    covered = local_exp > 1e-3 * max(float(local_exp.max()), 1e-300)
    if not covered.any():
        return np.full_like(acc, rate)
    local = np.where(covered, _smooth(acc, 2.0) / np.where(covered, local_exp, 1.0), 0.0)
    if not covered.all():
        local = local[_nearest(covered)]
    return local


def _canvas(acc: np.ndarray, exposure: np.ndarray, local: np.ndarray, rate: float,
            prior: float, sigma: float) -> np.ndarray:
    """Photons over exposure, shrunk by ``prior`` frames toward ``local``."""
    canvas = (acc + prior * local) / (exposure + prior)
    if sigma > 0:
        canvas = _smooth(canvas, sigma)
    return np.maximum(canvas, 1e-6 * rate)


def estimate_canvas(frames: np.ndarray, shifts: np.ndarray, margin: tuple[int, int], *,
                    prior: float = 1.0, sigma: float = 0.0) -> np.ndarray:
    """Estimate the maximum-likelihood canvas of frames ``(N, h, w)`` at their shifts.

    Each pixel of the canvas is the photons that landed on it divided by the
    exposure there (the frames that covered it, weighted by their brightness,
    so that activity does not bias the scene), with ``prior`` frames' worth of
    the local rate added (pixels no frame covered take the nearest covered
    rate). ``sigma > 0`` smooths the
    result with a Gaussian (coarse levels of :func:`register_likelihood`).
    """
    frames = np.asarray(frames)
    n, h, w = frames.shape
    totals = frames.reshape(n, -1).sum(axis=1, dtype=np.float64)
    mean_total = float(totals.mean()) if n else 0.0
    acc, exposure = _accumulate(frames, shifts, margin, totals, mean_total)
    rate = mean_total / (h * w) if mean_total > 0 else 1.0
    return _canvas(acc[0], exposure[0], _local_rate(acc[0], exposure[0], rate), rate, prior,
                   sigma)


@numba.njit(**_JIT)
def _viterbi(maps: np.ndarray, cost: float) -> np.ndarray:  # pragma: no cover - jitted
    """Best path (flat indices) through ``maps (T, A, B)``, ``cost`` per L1 pixel moved.

    The max-plus convolution of the running score with ``-cost * |step|_1`` is
    separable: a forward and a backward sweep along each axis, carrying where
    each value came from.
    """
    t_len, a_len, b_len = maps.shape
    back_y = np.zeros((t_len, a_len, b_len), dtype=np.int32)
    back_x = np.zeros((t_len, a_len, b_len), dtype=np.int32)
    score = maps[0].astype(np.float64).copy()
    row = np.empty((a_len, b_len), dtype=np.float64)
    src_x = np.empty((a_len, b_len), dtype=np.int32)
    col = np.empty((a_len, b_len), dtype=np.float64)
    src_y = np.empty((a_len, b_len), dtype=np.int32)
    for t in range(1, t_len):
        for i in range(a_len):  # along x
            for j in range(b_len):
                row[i, j] = score[i, j]
                src_x[i, j] = j
            for j in range(1, b_len):
                if row[i, j - 1] - cost > row[i, j]:
                    row[i, j] = row[i, j - 1] - cost
                    src_x[i, j] = src_x[i, j - 1]
            for j in range(b_len - 2, -1, -1):
                if row[i, j + 1] - cost > row[i, j]:
                    row[i, j] = row[i, j + 1] - cost
                    src_x[i, j] = src_x[i, j + 1]
        for j in range(b_len):  # then along y
            for i in range(a_len):
                col[i, j] = row[i, j]
                src_y[i, j] = i
            for i in range(1, a_len):
                if col[i - 1, j] - cost > col[i, j]:
                    col[i, j] = col[i - 1, j] - cost
                    src_y[i, j] = src_y[i - 1, j]
            for i in range(a_len - 2, -1, -1):
                if col[i + 1, j] - cost > col[i, j]:
                    col[i, j] = col[i + 1, j] - cost
                    src_y[i, j] = src_y[i + 1, j]
        for i in range(a_len):
            for j in range(b_len):
                py = src_y[i, j]
                back_y[t, i, j] = py
                back_x[t, i, j] = src_x[py, j]
                score[i, j] = col[i, j] + maps[t, i, j]
    path = np.zeros(t_len, dtype=np.int64)  # flat index i * B + j of each step
    best = np.argmax(score)
    i, j = best // b_len, best % b_len
    for t in range(t_len - 1, -1, -1):
        path[t] = i * b_len + j
        if t:
            i, j = back_y[t, i, j], back_x[t, i, j]
    return path


def decode_maps(maps: np.ndarray, *, step_cost: float = 0.0
                ) -> tuple[np.ndarray, np.ndarray]:
    """Shifts and their log-likelihood margins from maps ``(..., T, 2 My + 1, 2 Mx + 1)``.

    Without ``step_cost`` each frame takes its most likely shift. With
    ``step_cost > 0`` (nats per pixel moved between consecutive frames along
    ``T``), each sequence takes the jointly most likely path (Viterbi).

    Returns ``shifts`` (int64 ``(..., T, 2)``) and ``margin`` (``(..., T)``): the
    log-likelihood of the chosen shift minus that of the best other shift, in
    nats. It grows with the photons and the contrast of a frame; near 0 the
    frame cannot tell two shifts apart; negative when the motion prior overruled
    the frame's own evidence.
    """
    maps = np.asarray(maps, dtype=np.float64)
    *lead, t_len, a_len, b_len = maps.shape
    my, mx = (a_len - 1) // 2, (b_len - 1) // 2
    flat = maps.reshape(-1, t_len, a_len * b_len)
    if step_cost > 0 and t_len > 1:
        idx = np.stack([_viterbi(seq.reshape(t_len, a_len, b_len), float(step_cost))
                        for seq in flat])
    else:
        idx = flat.argmax(axis=2) if flat.size else np.zeros(flat.shape[:2], dtype=np.int64)
    chosen = np.take_along_axis(flat, idx[..., None], axis=2)[..., 0]
    others = flat.copy()
    np.put_along_axis(others, idx[..., None], -np.inf, axis=2)
    second = others.max(axis=2) if a_len * b_len > 1 else chosen
    margin = np.where(np.isfinite(second), chosen - second, 0.0)
    shifts = np.stack([idx // b_len - my, idx % b_len - mx], axis=-1).astype(np.int64)
    return shifts.reshape(*lead, t_len, 2), margin.reshape(*lead, t_len)


def _pool(maps: np.ndarray, pool: np.ndarray | None) -> np.ndarray:
    """Mix plane maps ``(Z, N, A, B)`` with weights ``pool (Z, Z)`` (None: unchanged)."""
    return maps if pool is None else np.tensordot(pool, maps, axes=(1, 0))


def align_planes(frames: np.ndarray, canvases: np.ndarray, *, pool: np.ndarray | None = None,
                 step_cost: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Shifts ``(N, Z, 2)`` and margins ``(N, Z)`` of volumes ``(N, Z, h, w)``.

    ``canvases (Z, h + 2 My, w + 2 Mx)``; ``pool (Z, Z)`` mixes the planes'
    log-likelihood maps (planes that move together); ``step_cost`` as in
    :func:`decode_maps`, along ``N`` (frames in time order).
    """
    frames = np.asarray(frames)
    maps = np.stack(_per_plane(lambda z, workers: likelihood_maps(
        frames[:, z], canvases[z], workers=workers), frames.shape[1]))
    shifts, margin = decode_maps(_pool(maps, pool), step_cost=step_cost)
    return shifts.transpose(1, 0, 2), margin.T


def _per_plane(fn: Callable[[int, int], Any], nz: int) -> list[Any]:
    """Return ``[fn(z, workers) for z in range(nz)]``, planes in threads on several cores.

    Planes are independent, and much of their work (smoothing, integral images,
    element-wise products) runs on one core: one plane per thread keeps every core
    busy, each transform then on one thread (``workers=1``); one plane or one core
    runs in this thread with every core for its transforms.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        os.cpu_count() or 1  # the cores this process may use (a cluster job's share)
    threads = min(nz, cores)
    if threads <= 1:
        return [fn(z, -1) for z in range(nz)]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda z: fn(z, 1), range(nz)))


def _peak_offsets(maps: np.ndarray, at: np.ndarray, margin: tuple[int, int]) -> np.ndarray:
    """Sub-pixel offsets ``(N, Z, 2)`` in ``[-0.5, 0.5]`` of the peaks of ``maps (Z, N, A, B)``.

    A parabola through each frame's chosen shift ``at (N, Z, 2)`` and its two
    neighbours, per axis (0 where a neighbour lies outside the map or the three
    values do not curve down).
    """
    nz, n, a_len, b_len = maps.shape
    out = np.zeros((n, nz, 2))
    if not maps.size:
        return out
    iy = at[..., 0].T + margin[0]  # (Z, N)
    ix = at[..., 1].T + margin[1]
    zz, nn = np.meshgrid(np.arange(nz), np.arange(n), indexing="ij")
    for axis, (i, length) in enumerate(((iy, a_len), (ix, b_len))):
        inside = (i > 0) & (i < length - 1)
        lo, hi = np.clip(i - 1, 0, length - 1), np.clip(i + 1, 0, length - 1)
        if axis == 0:
            v0, v1, v2 = maps[zz, nn, lo, ix], maps[zz, nn, i, ix], maps[zz, nn, hi, ix]
        else:
            v0, v1, v2 = maps[zz, nn, iy, lo], maps[zz, nn, iy, i], maps[zz, nn, iy, hi]
        curve = v0 - 2 * v1 + v2
        ok = inside & (curve < 0)
        off = np.where(ok, 0.5 * (v0 - v2) / np.where(ok, curve, -1.0), 0.0)
        out[..., axis] = np.clip(off, -0.5, 0.5).T
    return out


def _search_margin(frame_shape: tuple[int, int], limit: tuple[int, int],
                   need: np.ndarray) -> tuple[int, int]:
    """Return the smallest margin per axis ``>= need`` (at most ``limit``).

    Among those, the first whose canvas side has only small prime factors (fast
    transforms).
    """
    out = []
    for d, lim, m in zip(frame_shape, limit, need.tolist(), strict=True):
        m = min(int(m), lim)
        while m < lim and sfft.next_fast_len(d + 2 * m, real=True) != d + 2 * m:
            m += 1
        out.append(m)
    return out[0], out[1]


def _bin(frames: np.ndarray, b: int) -> np.ndarray:
    """Sum ``b x b`` blocks of the last two axes (a remainder row/column is dropped).

    One strided add per position in the block (float32): a reduction over two
    axes of a reshaped view, with the cast, is ten times slower.
    """
    h, w = frames.shape[-2] // b * b, frames.shape[-1] // b * b
    out = frames[..., 0:h:b, 0:w:b].astype(np.float32)
    for i in range(b):
        for j in range(b):
            if i or j:
                out += frames[..., i:h:b, j:w:b]
    return out


class _Stack:
    """Frames of every plane at one resolution, with what each EM round reuses."""

    def __init__(self, planes: list[np.ndarray], margin: tuple[int, int]) -> None:
        self.planes, self.margin = planes, margin
        n, h, w = planes[0].shape
        self.shape = (h, w)
        canvas = (h + 2 * margin[0], w + 2 * margin[1])
        # the frames' spectra serve every round, unless they would not fit the budget
        fits = n * len(planes) * canvas[0] * (canvas[1] // 2 + 1) * 8 <= SPECTRA_BUDGET
        self.spectra = _per_plane(lambda z, workers: frame_spectra(
            planes[z], canvas, workers=workers), len(planes)) if fits else None
        self.totals = [p.reshape(n, -1).sum(axis=1, dtype=np.float64) for p in planes]
        self.mean_totals = [float(t.mean()) if n else 0.0 for t in self.totals]

    def maps(self, at: np.ndarray, idx: np.ndarray, fit: np.ndarray, sigma: float,
             folds: int, prior: float) -> np.ndarray:
        """Map frames ``idx`` against canvases of frames ``fit`` outside their fold.

        ``at (N, Z, 2)`` holds the current shifts; returns ``(Z, len(idx), A, B)``.
        """
        (h, w), margin = self.shape, self.margin
        k = folds if len(fit) >= 2 * folds else 2 if len(fit) >= 2 else 1
        out = np.empty((len(self.planes), len(idx), 2 * margin[0] + 1, 2 * margin[1] + 1))
        # idx and fit are sorted and unique: a leading run of frames is a view (and
        # so is every k-th frame of it); other sets have to be gathered
        lead_idx = bool(len(idx)) and idx[-1] == len(idx) - 1
        fit = slice(0, len(fit)) if len(fit) and fit[-1] == len(fit) - 1 else fit
        group = np.arange(len(self.totals[0]))[fit] % k

        def plane(z: int, workers: int) -> None:
            frames = self.planes[z]
            mean_total = self.mean_totals[z]
            rate = mean_total / (h * w) if mean_total > 0 else 1.0
            fold_acc, fold_exp = _accumulate(frames[fit], at[fit, z], margin,
                                             self.totals[z][fit], mean_total, group, k)
            acc, exposure = fold_acc.sum(axis=0), fold_exp.sum(axis=0)
            local = _local_rate(acc, exposure, rate)
            for f in range(k):
                sel = slice(f, len(idx), k) if lead_idx else \
                    idx[idx % k == f] if k > 1 else idx
                rows = sel if lead_idx else np.isin(idx, sel)
                if not len(frames[sel]):
                    continue
                own = (fold_acc[f], fold_exp[f]) if k > 1 else (0.0, 0.0)
                canvas = _canvas(acc - own[0], exposure - own[1], local, rate, prior, sigma)
                out[z, rows] = likelihood_maps(
                    frames[sel], canvas,
                    spectra=None if self.spectra is None else self.spectra[z][sel],
                    totals=self.totals[z][sel], workers=workers)

        _per_plane(plane, len(self.planes))
        return out


def register_likelihood(frames: np.ndarray, *, max_shift: int | None = None,
                        schedule: Sequence[float] | None = None, n_iter: int = 4,
                        pool: np.ndarray | None = None, prior: float = 1.0,
                        coarse_frames: int = 64, folds: int = 4, step_cost: float = 0.0,
                        on_level: Callable[[], Any] | None = None
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Canvases and shifts of volumes ``(N, Z, h, w)`` by coarse-to-fine hard EM.

    At each level of ``schedule`` (the canvas smoothing in pixels; default
    :func:`default_schedule`), up to
    ``n_iter`` rounds of estimating the canvases from the current shifts
    (:func:`estimate_canvas`) and re-aligning the frames to them, until no
    shift changes. The first canvas is the mean of the unaligned frames. Levels
    smoothed by 2 pixels or more use ``coarse_frames`` evenly spaced volumes
    (they only place frames roughly); the first finer level aligns every frame
    to their canvas, then refines with all.

    Levels smoothed by 4 pixels or more run on frames binned 2 x 2 and end by
    placing every frame on their canvas; the full-resolution levels start from
    twice those shifts plus the sub-pixel peak of the coarse map, and search only
    as far as the largest of them plus :data:`SLACK` pixels (smaller transforms),
    never beyond ``max_shift``.

    Cross-fitting: frames fall into ``folds`` interleaved groups, and each frame
    is aligned to the canvas of the *other* groups. A frame inside its own
    reference favours wherever it was last put (at 0.7 photons per pixel and
    100 frames its own photons add about as many nats to its current shift as
    the data separate neighbouring shifts by), which would freeze early errors.

    ``step_cost`` (see :func:`decode_maps`) applies at the levels that use every
    frame; pass it only when the frames are consecutive in time.

    ``on_level`` is called after each level of the schedule (progress).

    Finally the shifts are centred so that the median shift is zero (over all
    planes when ``pool`` ties them, so that their canvases stay mutually
    aligned).

    Returns
    -------
    canvases, shifts, margins
        ``(Z, h + 2 My, w + 2 Mx)`` from all frames, int64 ``(N, Z, 2)``, and the
        log-likelihood margins ``(N, Z)`` of the last alignment (cross-fitted).

    """
    frames = np.asarray(frames)
    n, nz, h, w = frames.shape
    margin = canvas_margin((h, w), max_shift)
    # the coarse levels' volumes (evenly spaced) go first, so that they and every
    # fold of them are views; shifts and quality are put back in time order at the end
    first = np.unique(np.linspace(0, n - 1, min(n, max(coarse_frames, 1))).round()
                      ).astype(np.int64)
    perm = np.concatenate([first, np.setdiff1d(np.arange(n), first)])
    in_time = np.argsort(perm)
    subset, everything = np.arange(len(first)), np.arange(n)
    shifts = np.zeros((n, nz, 2), dtype=np.int64)
    quality = np.zeros((n, nz))
    planes = [np.ascontiguousarray(frames[perm, z]) for z in range(nz)]
    settle = 4 * max(n_iter, 3)  # the coarse levels see few frames: let them converge
    last_maps: list[np.ndarray] = [np.zeros(0)]

    def align(stack: _Stack, at: np.ndarray, idx: np.ndarray, fit: np.ndarray,
              sigma: float) -> bool:
        """Re-align frames ``idx``; False once (almost) none moved.

        At most 1 % may move: a few frames that the data cannot place flip
        between two shifts forever.
        """
        maps = _pool(stack.maps(at, idx, fit, sigma, folds, prior), pool)
        last_maps[0] = maps
        if step_cost and len(idx) == n:  # the prior links frames in time order
            new, margins = decode_maps(maps[:, in_time], step_cost=step_cost)
            new, margins = new[:, perm], margins[:, perm]
        else:
            new, margins = decode_maps(maps)
        moved = int((new.transpose(1, 0, 2) != at[idx]).any(axis=2).sum())
        at[idx] = new.transpose(1, 0, 2)
        if stack.shape == (h, w):
            quality[idx] = margins.T
        return moved > 0.01 * len(idx) * nz

    if schedule is None:
        schedule = default_schedule((h, w))
    levels = list(schedule)
    # the coarsest levels place the subset on frames binned 2 x 2 (a quarter of the
    # work; a canvas smoothed by 4 pixels or more loses nothing to 2-pixel bins)
    binned = [sg for sg in levels if sg >= 4] if min(h, w) >= 64 else []
    search = margin
    if binned and len(subset):
        coarse = _Stack([_bin(p, 2) for p in planes],
                        tuple(min(-(-m // 2), max(d // 4 - 1, 0))
                              for m, d in zip(margin, (h, w), strict=True)))
        at = np.zeros((n, nz, 2), dtype=np.int64)
        for sigma in binned:
            for _ in range(settle):
                if not align(coarse, at, subset, subset, sigma / 2):
                    break
            if on_level is not None:
                on_level()
        if n > len(subset):  # a rough place for every frame, and so a search range
            align(coarse, at, everything, subset, binned[-1] / 2)
        start = 2 * (at + _peak_offsets(last_maps[0], at, coarse.margin))
        shifts = np.clip(np.round(start).astype(np.int64), -np.array(margin),
                         np.array(margin))
        search = _search_margin((h, w), margin, np.abs(shifts).max(axis=(0, 1)) + SLACK)
        levels = [sg for sg in levels if sg < 4]
        del coarse  # its spectra go before the full-resolution ones are made
        last_maps[0] = np.zeros(0)
    full = _Stack(planes, search)
    used = subset
    for sigma in levels:
        idx = subset if sigma >= 2 else everything
        if len(idx) > len(used):  # place the frames the coarse levels did not see
            align(full, shifts, idx, used, sigma)
        used = idx
        for _ in range(max(n_iter, 1) if len(idx) == n and n > len(subset) else settle):
            if not align(full, shifts, idx, idx, sigma):
                break
        if on_level is not None:
            on_level()
    if n:
        tied = pool is not None and nz > 1
        centre = np.round(np.median(shifts.reshape(-1, 2) if tied else shifts, axis=0)
                          ).astype(np.int64)
        shifts = np.clip(shifts - np.broadcast_to(centre, (nz, 2)), -np.array(margin),
                         np.array(margin))
    last = float(schedule[-1]) if len(schedule) else 0.0
    canvases = np.stack([estimate_canvas(planes[z], shifts[:, z], margin, prior=prior,
                                         sigma=last) for z in range(nz)])
    return canvases, shifts[in_time], quality[in_time]
