"""Numba kernels that decode frames and reduce photons.

Every kernel takes the same frame description: a ``uint8`` buffer (the file's
memory map, or bytes gathered from a remote file) plus, per requested frame, its
encoding, strip offset, strip length, height, width and shift ``(sy, sx)``
(already reduced to ``0 <= sy < H``, ``0 <= sx < W``). A photon at ``(y, x)``
lands at ``((y + sy) mod H, (x + sx) mod W)``: exactly ``numpy.roll``.

Two decode helpers do all the byte-level work:

* :func:`_decode_intensity` fills a per-pixel count image (no arrival times read);
* :func:`_decode_photons` fills ``pix`` / ``tau`` arrays, one entry per photon.

The public kernels loop over frames (in parallel chunks, each chunk owning its
scratch buffers) and reduce the decoded frame. They never read or write out of
bounds: every offset is checked and problems are reported per frame in a
``status`` array (see ``ST_*``) that the Python layer turns into errors.

Each kernel is compiled twice from the same source, parallel and serial; the
:func:`run` helper uses the parallel build when no other thread is inside one
(Numba's default ``workqueue`` threading layer must not be entered from two
threads at once), so calls from dask worker threads are always safe.
"""

from __future__ import annotations

import threading

import numba
import numpy as np
from numba import prange

__all__ = [
    "MODE_CLIP", "MODE_DROP", "MODE_WRAP", "ST_BAD_PIXEL", "ST_MISMATCH", "ST_OK",
    "ST_OUT_OF_BOUNDS", "ST_SATURATED", "run",
]

ST_OK = 0
ST_BAD_PIXEL = 1  #: a raw photon's (y, x) lies outside the frame
ST_MISMATCH = 2  #: compressed count image disagrees with the arrival-time block
ST_OUT_OF_BOUNDS = 3  #: frame data outside the buffer
ST_SATURATED = 4  #: a pixel holds more than 65535 photons (uint16 output saturated)

ENC_RAW, ENC_COMPRESSED, ENC_TIFF = 0, 1, 2
MODE_DROP, MODE_CLIP, MODE_WRAP = 0, 1, 2

_JIT = {"cache": True, "nogil": True}


@numba.njit(**_JIT)
def _u16(buf, p):
    return np.int64(buf[p]) | (np.int64(buf[p + 1]) << 8)


@numba.njit(**_JIT)
def _u32(buf, p):
    return (np.int64(buf[p]) | (np.int64(buf[p + 1]) << 8) | (np.int64(buf[p + 2]) << 16)
            | (np.int64(buf[p + 3]) << 24))


@numba.njit(**_JIT)
def _in_bounds(buf, enc, off, nbytes, h, w):
    start = off - 2 * h * w if enc == ENC_COMPRESSED else off
    stop = off + nbytes
    if enc == ENC_TIFF:
        stop = off + 2 * h * w
    return start >= 0 and nbytes >= 0 and stop <= buf.shape[0]


@numba.njit(**_JIT)
def _decode_intensity(buf, enc, off, nbytes, h, w, sy, sx, img):
    """Fill ``img`` (int64, h*w, row-major) with photon counts; return a status."""
    img[: h * w] = 0
    if not _in_bounds(buf, enc, off, nbytes, h, w):
        return ST_OUT_OF_BOUNDS
    if enc == ENC_RAW:
        for k in range(nbytes // 8):
            p = off + 8 * k
            x = _u16(buf, p + 4)
            y = _u16(buf, p + 6)
            if y >= h or x >= w:
                return ST_BAD_PIXEL
            y += sy
            if y >= h:
                y -= h
            x += sx
            if x >= w:
                x -= w
            img[y * w + x] += 1
        return ST_OK
    # compressed count image and TIFF pages: a dense u16 image
    base = off - 2 * h * w if enc == ENC_COMPRESSED else off
    total = 0
    for y in range(h):
        yy = y + sy
        if yy >= h:
            yy -= h
        row = base + 2 * y * w
        for x in range(w):
            c = _u16(buf, row + 2 * x)
            total += c
            xx = x + sx
            if xx >= w:
                xx -= w
            img[yy * w + xx] = c
    if enc == ENC_COMPRESSED and 2 * total != nbytes:
        return ST_MISMATCH
    return ST_OK


@numba.njit(**_JIT)
def _decode_photons(buf, enc, off, nbytes, h, w, sy, sx, pix, tau):
    """Fill ``pix``/``tau`` (int64) with each photon's (shifted) pixel and arrival bin.

    Returns ``(n_photons, status)``. Compressed frames come out in pixel order of
    the *unshifted* frame; raw frames in file order.
    """
    if not _in_bounds(buf, enc, off, nbytes, h, w):
        return 0, ST_OUT_OF_BOUNDS
    if enc == ENC_RAW:
        n = nbytes // 8
        for k in range(n):
            p = off + 8 * k
            x = _u16(buf, p + 4)
            y = _u16(buf, p + 6)
            if y >= h or x >= w:
                return k, ST_BAD_PIXEL
            y += sy
            if y >= h:
                y -= h
            x += sx
            if x >= w:
                x -= w
            pix[k] = y * w + x
            tau[k] = _u32(buf, p)
        return n, ST_OK
    if enc == ENC_COMPRESSED:
        n = nbytes // 2
        base = off - 2 * h * w
        k = 0
        for y in range(h):
            yy = y + sy
            if yy >= h:
                yy -= h
            row = base + 2 * y * w
            for x in range(w):
                c = _u16(buf, row + 2 * x)
                if k + c > n:
                    return k, ST_MISMATCH
                xx = x + sx
                if xx >= w:
                    xx -= w
                q = yy * w + xx
                for _ in range(c):
                    pix[k] = q
                    tau[k] = _u16(buf, off + 2 * k)
                    k += 1
        if k != n:
            return k, ST_MISMATCH
        return n, ST_OK
    return 0, ST_OK  # TIFF pages carry no photons


@numba.njit(**_JIT)
def _chunk(c, nchunks, n):
    return c * n // nchunks, (c + 1) * n // nchunks


def _nchunks(n: int) -> int:
    return max(1, min(n, 4 * numba.get_num_threads()))


# --------------------------------------------------------------------------- kernels


def _intensity(buf, enc, off, nb, hh, ww, sy, sx, nchunks, out, status):
    """Photon-count images; ``out`` is ``(F, H*W)`` uint16 (a view of (F, H, W))."""
    n = enc.shape[0]
    npx = out.shape[1]
    for c in prange(nchunks):
        img = np.empty(npx, dtype=np.int64)
        lo, hi = _chunk(c, nchunks, n)
        for i in range(lo, hi):
            st = _decode_intensity(buf, enc[i], off[i], nb[i], hh[i], ww[i], sy[i], sx[i], img)
            row = out[i]
            for p in range(npx):
                v = img[p]
                if v > 65535:
                    v = 65535
                    if st == ST_OK:
                        st = ST_SATURATED
                row[p] = v
            status[i] = st


def _sum_masks(buf, enc, off, nb, hh, ww, sy, sx, nchunks, plane, mem_ptr, mem_idx, out,
               status):
    n = enc.shape[0]
    hw = hh.max() * ww.max() if n else 0
    for c in prange(nchunks):
        img = np.empty(max(hw, 1), dtype=np.int64)
        lo, hi = _chunk(c, nchunks, n)
        for i in range(lo, hi):
            st = _decode_intensity(buf, enc[i], off[i], nb[i], hh[i], ww[i], sy[i], sx[i], img)
            status[i] = st
            if st != ST_OK:
                continue
            base = plane[i] * hh[i] * ww[i]
            for p in range(hh[i] * ww[i]):
                v = img[p]
                if v == 0:
                    continue
                for k in range(mem_ptr[base + p], mem_ptr[base + p + 1]):
                    out[mem_idx[k], i] += v


def _histograms(buf, enc, off, nb, hh, ww, sy, sx, nchunks, maxn, mode, out, overflow, status):
    """Arrival histograms; reads only the arrival times (pixels are not needed)."""
    n = enc.shape[0]
    nbins = out.shape[1]
    for c in prange(nchunks):
        lo, hi = _chunk(c, nchunks, n)
        for i in range(lo, hi):
            if not _in_bounds(buf, enc[i], off[i], nb[i], hh[i], ww[i]):
                status[i] = ST_OUT_OF_BOUNDS
                continue
            status[i] = ST_OK
            if enc[i] == ENC_COMPRESSED:  # the count image must account for every arrival
                base = off[i] - 2 * hh[i] * ww[i]
                total = 0
                for p in range(hh[i] * ww[i]):
                    total += _u16(buf, base + 2 * p)
                if 2 * total != nb[i]:
                    status[i] = ST_MISMATCH
                    continue
            raw = enc[i] == ENC_RAW
            m = nb[i] // 8 if raw else (nb[i] // 2 if enc[i] == ENC_COMPRESSED else 0)
            for k in range(m):
                t = _u32(buf, off[i] + 8 * k) if raw else _u16(buf, off[i] + 2 * k)
                if t >= nbins:
                    if mode == MODE_DROP:
                        overflow[i] += 1
                        continue
                    elif mode == MODE_CLIP:
                        overflow[i] += 1
                        t = nbins - 1
                    else:
                        t = t % nbins
                out[i, t] += 1


def _pixel_flim(buf, enc, off, nb, hh, ww, sy, sx, nchunks, maxn, cos_lut, sin_lut, offset,
                out_mean, out_g, out_s, out_count, status):
    """Per-pixel images of each frame.

    Mean arrival (bins, minus ``offset``; NaN where empty), phasor ``g``/``s`` and
    photon count. Outputs are (F, H*W); pass an array with zero rows to skip one.
    """
    n = enc.shape[0]
    period = cos_lut.shape[0]
    want_mean = out_mean.shape[0] > 0
    want_phasor = out_g.shape[0] > 0
    want_count = out_count.shape[0] > 0
    hw = hh.max() * ww.max() if n else 0
    for c in prange(nchunks):
        pix = np.empty(maxn, dtype=np.int64)
        tau = np.empty(maxn, dtype=np.int64)
        cnt = np.empty(max(hw, 1), dtype=np.int64)
        tsum = np.empty(max(hw, 1), dtype=np.int64)
        gsum = np.empty(max(hw, 1), dtype=np.float64)
        ssum = np.empty(max(hw, 1), dtype=np.float64)
        lo, hi = _chunk(c, nchunks, n)
        for i in range(lo, hi):
            m, st = _decode_photons(buf, enc[i], off[i], nb[i], hh[i], ww[i], sy[i], sx[i],
                                    pix, tau)
            status[i] = st
            if st != ST_OK:
                continue
            npx = hh[i] * ww[i]
            cnt[:npx] = 0
            tsum[:npx] = 0
            gsum[:npx] = 0.0
            ssum[:npx] = 0.0
            for k in range(m):
                q = pix[k]
                cnt[q] += 1
                tsum[q] += tau[k]
                if want_phasor:
                    b = tau[k] % period
                    gsum[q] += cos_lut[b]
                    ssum[q] += sin_lut[b]
            for q in range(npx):
                nq = cnt[q]
                if want_count:
                    out_count[i, q] = nq
                if want_mean:
                    out_mean[i, q] = tsum[q] / nq - offset if nq > 0 else np.nan
                if want_phasor:
                    out_g[i, q] = gsum[q] / nq if nq > 0 else np.nan
                    out_s[i, q] = ssum[q] / nq if nq > 0 else np.nan


def _mask_flim(buf, enc, off, nb, hh, ww, sy, sx, nchunks, maxn, plane, mem_ptr, mem_idx,
               cos_lut, sin_lut, out_count, out_sum, out_cos, out_sin, status):
    """Per-mask photon count, arrival sum and phasor sums for each frame (outputs (M, F))."""
    n = enc.shape[0]
    period = cos_lut.shape[0]
    phasor = out_cos.shape[0] > 0
    for c in prange(nchunks):
        pix = np.empty(maxn, dtype=np.int64)
        tau = np.empty(maxn, dtype=np.int64)
        lo, hi = _chunk(c, nchunks, n)
        for i in range(lo, hi):
            m, st = _decode_photons(buf, enc[i], off[i], nb[i], hh[i], ww[i], sy[i], sx[i],
                                    pix, tau)
            status[i] = st
            if st != ST_OK:
                continue
            base = plane[i] * hh[i] * ww[i]
            for k in range(m):
                q = base + pix[k]
                lo_m, hi_m = mem_ptr[q], mem_ptr[q + 1]
                if lo_m == hi_m:
                    continue
                t = tau[k]
                cs, sn = 0.0, 0.0
                if phasor:
                    b = t % period
                    cs, sn = cos_lut[b], sin_lut[b]
                for j in range(lo_m, hi_m):
                    r = mem_idx[j]
                    out_count[r, i] += 1
                    out_sum[r, i] += t
                    if phasor:
                        out_cos[r, i] += cs
                        out_sin[r, i] += sn


def _photons(buf, enc, off, nb, hh, ww, sy, sx, nchunks, maxn, starts, out_pix, out_tau,
             status):
    """Photons of each frame, sorted by pixel (stable), written at ``starts[i]``."""
    n = enc.shape[0]
    hw = hh.max() * ww.max() if n else 0
    for c in prange(nchunks):
        pix = np.empty(maxn, dtype=np.int64)
        tau = np.empty(maxn, dtype=np.int64)
        hist = np.empty(hw + 1, dtype=np.int64)
        lo, hi = _chunk(c, nchunks, n)
        for i in range(lo, hi):
            m, st = _decode_photons(buf, enc[i], off[i], nb[i], hh[i], ww[i], sy[i], sx[i],
                                    pix, tau)
            status[i] = st
            if st != ST_OK or m != starts[i + 1] - starts[i]:
                if st == ST_OK:
                    status[i] = ST_MISMATCH
                continue
            npx = hh[i] * ww[i]
            hist[: npx + 1] = 0
            for k in range(m):
                hist[pix[k] + 1] += 1
            for p in range(npx):
                hist[p + 1] += hist[p]
            s0 = starts[i]
            for k in range(m):
                d = s0 + hist[pix[k]]
                hist[pix[k]] += 1
                out_pix[d] = pix[k]
                out_tau[d] = tau[k]


_KERNELS = {
    f.__name__.lstrip("_"): (numba.njit(parallel=True, **_JIT)(f), numba.njit(**_JIT)(f))
    for f in (_intensity, _sum_masks, _histograms, _pixel_flim, _mask_flim, _photons)
}
_PARALLEL_LOCK = threading.Lock()


def run(name: str, *args) -> None:
    """Run kernel ``name``; parallel if no other thread is in a parallel kernel.

    The ``nchunks`` argument is filled in here, after the seven per-frame arrays.
    """
    n = len(args[1])
    args = (*args[:8], _nchunks(n), *args[8:])
    par, ser = _KERNELS[name]
    if _PARALLEL_LOCK.acquire(blocking=False):
        try:
            par(*args)
        finally:
            _PARALLEL_LOCK.release()
    else:
        ser(*args)
