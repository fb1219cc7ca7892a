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

import sys
import threading

import numba
import numpy as np
from numba import prange

from ..format.constants import ENC_COMPRESSED, ENC_RAW, ENC_TIFF

__all__ = [
    "MODE_CLIP", "MODE_DROP", "MODE_WRAP", "ST_BAD_PIXEL", "ST_MISMATCH", "ST_OK",
    "ST_OUT_OF_BOUNDS", "ST_SATURATED", "run",
]

ST_OK = 0
ST_BAD_PIXEL = 1  #: a raw photon's (y, x) lies outside the frame
ST_MISMATCH = 2  #: compressed count image disagrees with the arrival-time block
ST_OUT_OF_BOUNDS = 3  #: frame data outside the buffer
ST_SATURATED = 4  #: a pixel holds more than 65535 photons (uint16 output saturated)

MODE_DROP, MODE_CLIP, MODE_WRAP = 0, 1, 2

_JIT = {"cache": True, "nogil": True}

if sys.byteorder != "little":  # pragma: no cover - every supported platform is
    raise ImportError("siff-xarray decodes little-endian data with native views and needs a "
                      "little-endian CPU")


@numba.njit(**_JIT)
def _u16s(buf, start, n):
    """``n`` little-endian u16 values at ``start`` (a view; unaligned is fine)."""
    return buf[start : start + 2 * n].view(np.uint16)


@numba.njit(**_JIT)
def _u64s(buf, start, n):
    """``n`` little-endian u64 values at ``start`` (a view)."""
    return buf[start : start + 8 * n].view(np.uint64)


@numba.njit(**_JIT)
def _wrap(v, n):
    return v - n if v >= n else v


@numba.njit(**_JIT)
def _in_bounds(buf, enc, off, nbytes, h, w):
    """Return whether the frame's bytes lie inside ``buf`` (no sum can overflow int64)."""
    if h < 0 or w < 0 or h > 65535 or w > 65535 or nbytes < 0:
        return False
    image = 2 * h * w
    start = off - image if enc == ENC_COMPRESSED else off
    length = image if enc == ENC_TIFF else nbytes
    return start >= 0 and off <= buf.shape[0] and length <= buf.shape[0] - off


@numba.njit(**_JIT)
def _image_u16(buf, enc, off, h, w):
    """Return the dense u16 image of a compressed frame (its count image) or TIFF page."""
    return _u16s(buf, off - 2 * h * w if enc == ENC_COMPRESSED else off, h * w)


@numba.njit(**_JIT)
def _consistent(cnt, nbytes):
    """Check that a compressed frame's counts account for every stored arrival time."""
    total = 0
    for p in range(cnt.shape[0]):
        total += np.int64(cnt[p])
    return 2 * total == nbytes


@numba.njit(**_JIT)
def _compressed(buf, off, nbytes, h, w):
    """Count image and arrival times of a compressed frame, and whether they agree."""
    img = _u16s(buf, off - 2 * h * w, h * w)
    return img, _u16s(buf, off, nbytes // 2), _consistent(img, nbytes)


@numba.njit(**_JIT)
def _raw_pixel(rec, h, w, sy, sx):
    """Shifted pixel index of a raw photon record, or -1 if outside the frame."""
    y = np.int64(rec >> np.uint64(48))
    x = np.int64((rec >> np.uint64(32)) & np.uint64(0xFFFF))
    if y >= h or x >= w:
        return -1
    return _wrap(y + sy, h) * w + _wrap(x + sx, w)


@numba.njit(**_JIT)
def _raw_tau(rec):
    """Arrival-time bin of a raw photon record (its low 32 bits)."""
    return np.int64(rec & np.uint64(0xFFFFFFFF))


@numba.njit(**_JIT)
def _run_sums(arr, k, nq, phasor, cos_lut, sin_lut):
    """Sum of the arrival bins ``arr[k:k+nq]`` (one pixel's run) and of their phasors."""
    period = cos_lut.shape[0]
    ts = 0
    gs = 0.0
    ss = 0.0
    for j in range(k, k + nq):
        t = np.int64(arr[j])
        ts += t
        if phasor:
            b = t % period
            gs += cos_lut[b]
            ss += sin_lut[b]
    return ts, gs, ss


@numba.njit(**_JIT)
def _chunk(c, nchunks, n):
    return c * n // nchunks, (c + 1) * n // nchunks


def _nchunks(n: int) -> int:
    return max(1, min(n, 4 * numba.get_num_threads()))


# --------------------------------------------------------------------------- kernels


def _intensity(buf, enc, off, nb, hh, ww, sy, sx, nchunks, out, status):
    """Photon-count images; ``out`` is ``(F, H*W)`` uint16 (a view of (F, H, W))."""
    n = enc.shape[0]
    for c in prange(nchunks):
        lo, hi = _chunk(c, nchunks, n)
        for i in range(lo, hi):
            h, w, dy, dx = hh[i], ww[i], sy[i], sx[i]
            row = out[i]
            if not _in_bounds(buf, enc[i], off[i], nb[i], h, w):
                status[i] = ST_OUT_OF_BOUNDS
                continue
            st = ST_OK
            if enc[i] == ENC_RAW:
                row[:] = 0
                rec = _u64s(buf, off[i], nb[i] // 8)
                for k in range(rec.shape[0]):
                    q = _raw_pixel(rec[k], h, w, dy, dx)
                    if q < 0:
                        st = ST_BAD_PIXEL
                        break
                    if row[q] == 65535:
                        st = ST_SATURATED
                    else:
                        row[q] += 1
            else:
                img = _image_u16(buf, enc[i], off[i], h, w)
                if enc[i] == ENC_COMPRESSED and not _consistent(img, nb[i]):
                    st = ST_MISMATCH
                elif dy == 0 and dx == 0:
                    row[:] = img
                else:
                    for y in range(h):
                        src = y * w
                        dst = _wrap(y + dy, h) * w
                        row[dst + dx : dst + w] = img[src : src + w - dx]
                        row[dst : dst + dx] = img[src + w - dx : src + w]
            status[i] = st


def _sum_masks(buf, enc, off, nb, hh, ww, sy, sx, nchunks, plane, setid, set_ptr, set_idx,
               out, status):
    """Photon counts per mask: each pixel maps to the set of masks that contain it.

    ``setid[plane * H*W + pixel]`` is the pixel's mask-set; ``set_ptr``/``set_idx``
    list each set's masks. A photon costs one add whatever the number of masks.
    """
    n = enc.shape[0]
    n_sets = set_ptr.shape[0] - 1
    for c in prange(nchunks):
        acc = np.zeros(n_sets, dtype=np.int64)
        lo, hi = _chunk(c, nchunks, n)
        for i in range(lo, hi):
            h, w, dy, dx = hh[i], ww[i], sy[i], sx[i]
            if not _in_bounds(buf, enc[i], off[i], nb[i], h, w):
                status[i] = ST_OUT_OF_BOUNDS
                continue
            st = ST_OK
            base = plane[i] * h * w
            acc[:] = 0
            if enc[i] == ENC_RAW:
                rec = _u64s(buf, off[i], nb[i] // 8)
                for k in range(rec.shape[0]):
                    q = _raw_pixel(rec[k], h, w, dy, dx)
                    if q < 0:
                        st = ST_BAD_PIXEL
                        break
                    acc[setid[base + q]] += 1
            else:
                img = _image_u16(buf, enc[i], off[i], h, w)
                total = 0
                if dy == 0 and dx == 0:
                    for p in range(h * w):
                        v = np.int64(img[p])
                        total += v
                        acc[setid[base + p]] += v
                else:
                    for y in range(h):
                        dst = base + _wrap(y + dy, h) * w
                        src = y * w
                        for x in range(w):
                            v = np.int64(img[src + x])
                            total += v
                            acc[setid[dst + _wrap(x + dx, w)]] += v
                if enc[i] == ENC_COMPRESSED and 2 * total != nb[i]:
                    st = ST_MISMATCH
            status[i] = st
            if st != ST_OK:
                continue
            for s in range(n_sets):
                v = acc[s]
                if v:
                    for j in range(set_ptr[s], set_ptr[s + 1]):
                        out[set_idx[j], i] += v


@numba.njit(**_JIT)
def _bin(t, nbins, mode):
    """Histogram bin of arrival ``t``, or -1 when ``mode`` drops it."""
    if t < nbins:
        return t
    if mode == MODE_WRAP:
        return t % nbins
    return -1 if mode == MODE_DROP else nbins - 1


def _histograms(buf, enc, off, nb, hh, ww, sy, sx, nchunks, mode, out, overflow, status):
    """Arrival histograms; reads only the arrival times (pixels are not needed).

    Photons are counted into four interleaved copies of the histogram so that
    consecutive photons in one bin do not serialise on a single counter.
    """
    n = enc.shape[0]
    nbins = out.shape[1]
    for c in prange(nchunks):
        sub = np.zeros(4 * nbins, dtype=np.int64)
        lo, hi = _chunk(c, nchunks, n)
        for i in range(lo, hi):
            if not _in_bounds(buf, enc[i], off[i], nb[i], hh[i], ww[i]):
                status[i] = ST_OUT_OF_BOUNDS
                continue
            status[i] = ST_OK
            over = 0
            if enc[i] == ENC_RAW:
                rec = _u64s(buf, off[i], nb[i] // 8)
                for k in range(rec.shape[0]):
                    t = _raw_tau(rec[k])
                    if t >= nbins:
                        over += 1
                        t = _bin(t, nbins, mode)
                        if t < 0:
                            continue
                    sub[(k & 3) * nbins + t] += 1
            elif enc[i] == ENC_COMPRESSED:
                _, arr, ok = _compressed(buf, off[i], nb[i], hh[i], ww[i])
                if not ok:
                    status[i] = ST_MISMATCH
                    continue
                for k in range(arr.shape[0]):
                    t = np.int64(arr[k])
                    if t >= nbins:
                        over += 1
                        t = _bin(t, nbins, mode)
                        if t < 0:
                            continue
                    sub[(k & 3) * nbins + t] += 1
            overflow[i] = 0 if mode == MODE_WRAP else over
            for b in range(nbins):
                out[i, b] = sub[b] + sub[nbins + b] + sub[2 * nbins + b] + sub[3 * nbins + b]
            sub[:] = 0


def _pixel_flim(buf, enc, off, nb, hh, ww, sy, sx, nchunks, cos_lut, sin_lut, offset,
                out_mean, out_g, out_s, out_count, status):
    """Per-pixel images of each frame.

    Mean arrival (bins, minus ``offset``; NaN where empty), phasor ``g``/``s`` and
    photon count. Outputs are (F, H*W); pass an array with zero rows to skip one.

    Compiled with NumPy's error model, so ``0 / 0`` is NaN and the per-pixel
    loops need no branch for empty pixels. Compressed frames are reduced in one
    pass over the count image: without phasors, through a running sum of the
    arrival block (a pixel's sum is the difference of two entries), with
    phasors, run by run. Raw frames scatter into float scratch arrays that are
    reset while the outputs are written.
    """
    n = enc.shape[0]
    period = cos_lut.shape[0]
    want_mean = out_mean.shape[0] > 0
    want_phasor = out_g.shape[0] > 0
    want_count = out_count.shape[0] > 0
    hw = hh.max() * ww.max() if n else 0
    for c in prange(nchunks):
        cnt = np.zeros(max(hw, 1), dtype=np.float64)
        tsum = np.zeros(max(hw, 1), dtype=np.float64)
        gsum = np.zeros(max(hw, 1) if want_phasor else 1, dtype=np.float64)
        ssum = np.zeros(max(hw, 1) if want_phasor else 1, dtype=np.float64)
        csum = np.empty(1, dtype=np.int64)  # running arrival sums, grown on demand
        lo, hi = _chunk(c, nchunks, n)
        for i in range(lo, hi):
            h, w, dy, dx = hh[i], ww[i], sy[i], sx[i]
            if not _in_bounds(buf, enc[i], off[i], nb[i], h, w):
                status[i] = ST_OUT_OF_BOUNDS
                continue
            st = ST_OK
            if enc[i] == ENC_COMPRESSED:
                img, arr, ok = _compressed(buf, off[i], nb[i], h, w)
                if not ok:
                    status[i] = ST_MISMATCH
                    continue
                if not want_phasor:
                    m = arr.shape[0]
                    if m >= csum.shape[0]:
                        csum = np.empty(max(m + 1, 2 * csum.shape[0]), dtype=np.int64)
                    acc = 0
                    csum[0] = 0
                    for j in range(m):
                        acc += np.int64(arr[j])
                        csum[j + 1] = acc
                k = 0
                for y in range(h):
                    row = _wrap(y + dy, h) * w
                    src = y * w
                    if not want_phasor and want_mean and not want_count:
                        # the common case as plain loops: x < w - dx, then the wrapped rest
                        for x in range(w - dx):
                            e = k + np.int64(img[src + x])
                            out_mean[i, row + x + dx] = (csum[e] - csum[k]) / (e - k) - offset
                            k = e
                        for x in range(w - dx, w):
                            e = k + np.int64(img[src + x])
                            out_mean[i, row + x + dx - w] = (csum[e] - csum[k]) / (e - k) - offset
                            k = e
                        continue
                    for x in range(w):
                        q = row + _wrap(x + dx, w)
                        nq = np.int64(img[src + x])
                        if want_phasor:
                            ts, gs, ss = _run_sums(arr, k, nq, True, cos_lut, sin_lut)
                        else:
                            ts, gs, ss = csum[k + nq] - csum[k], 0.0, 0.0
                        k += nq
                        if want_count:
                            out_count[i, q] = nq
                        if want_mean:
                            out_mean[i, q] = ts / nq - offset
                        if want_phasor:
                            out_g[i, q] = gs / nq
                            out_s[i, q] = ss / nq
            else:  # raw (TIFF pages were rejected before)
                rec = _u64s(buf, off[i], nb[i] // 8)
                for k in range(rec.shape[0]):
                    q = _raw_pixel(rec[k], h, w, dy, dx)
                    if q < 0:
                        st = ST_BAD_PIXEL
                        break
                    t = _raw_tau(rec[k])
                    cnt[q] += 1.0
                    tsum[q] += t
                    if want_phasor:
                        b = t % period
                        gsum[q] += cos_lut[b]
                        ssum[q] += sin_lut[b]
                if want_mean and not want_phasor and not want_count:
                    for q in range(h * w):  # the common case, as one plain loop
                        out_mean[i, q] = tsum[q] / cnt[q] - offset
                        cnt[q] = 0.0
                        tsum[q] = 0.0
                    status[i] = st
                    continue
                for q in range(h * w):  # write outputs and reset the scratch
                    nq = cnt[q]
                    if want_count:
                        out_count[i, q] = np.int32(nq)
                    if want_mean:
                        out_mean[i, q] = tsum[q] / nq - offset
                    if want_phasor:
                        out_g[i, q] = gsum[q] / nq
                        out_s[i, q] = ssum[q] / nq
                        gsum[q] = 0.0
                        ssum[q] = 0.0
                    cnt[q] = 0.0
                    tsum[q] = 0.0
            status[i] = st


def _mask_flim(buf, enc, off, nb, hh, ww, sy, sx, nchunks, plane, setid, set_ptr, set_idx,
               cos_lut, sin_lut, out_count, out_sum, out_cos, out_sin, status):
    """Per-mask photon count, arrival sum and phasor sums for each frame (outputs (M, F)).

    Photons accumulate per mask-set (see :func:`_sum_masks`), then per mask.
    """
    n = enc.shape[0]
    n_sets = set_ptr.shape[0] - 1
    period = cos_lut.shape[0]
    phasor = out_cos.shape[0] > 0
    for c in prange(nchunks):
        a_cnt = np.zeros(n_sets, dtype=np.int64)
        a_sum = np.zeros(n_sets, dtype=np.int64)
        a_cos = np.zeros(n_sets, dtype=np.float64)
        a_sin = np.zeros(n_sets, dtype=np.float64)
        lo, hi = _chunk(c, nchunks, n)
        for i in range(lo, hi):
            h, w, dy, dx = hh[i], ww[i], sy[i], sx[i]
            if not _in_bounds(buf, enc[i], off[i], nb[i], h, w):
                status[i] = ST_OUT_OF_BOUNDS
                continue
            st = ST_OK
            base = plane[i] * h * w
            a_cnt[:] = 0
            a_sum[:] = 0
            a_cos[:] = 0.0
            a_sin[:] = 0.0
            if enc[i] == ENC_COMPRESSED:
                img, arr, ok = _compressed(buf, off[i], nb[i], h, w)
                if not ok:
                    status[i] = ST_MISMATCH
                    continue
                k = 0
                for y in range(h):
                    dst = base + _wrap(y + dy, h) * w
                    for x in range(w):
                        nq = np.int64(img[y * w + x])
                        if nq == 0:
                            continue
                        s = setid[dst + _wrap(x + dx, w)]
                        if phasor:
                            ts, gs, ss = _run_sums(arr, k, nq, True, cos_lut, sin_lut)
                        else:  # a plain sum, written out (see _pixel_flim)
                            ts, gs, ss = 0, 0.0, 0.0
                            for j in range(k, k + nq):
                                ts += np.int64(arr[j])
                        a_cnt[s] += nq
                        a_sum[s] += ts
                        a_cos[s] += gs
                        a_sin[s] += ss
                        k += nq
            else:
                rec = _u64s(buf, off[i], nb[i] // 8)
                for k in range(rec.shape[0]):
                    q = _raw_pixel(rec[k], h, w, dy, dx)
                    if q < 0:
                        st = ST_BAD_PIXEL
                        break
                    s = setid[base + q]
                    t = _raw_tau(rec[k])
                    a_cnt[s] += 1
                    a_sum[s] += t
                    if phasor:
                        b = t % period
                        a_cos[s] += cos_lut[b]
                        a_sin[s] += sin_lut[b]
            status[i] = st
            if st != ST_OK:
                continue
            for s in range(n_sets):
                if a_cnt[s] == 0:
                    continue
                for j in range(set_ptr[s], set_ptr[s + 1]):
                    r = set_idx[j]
                    out_count[r, i] += a_cnt[s]
                    out_sum[r, i] += a_sum[s]
                    if phasor:
                        out_cos[r, i] += a_cos[s]
                        out_sin[r, i] += a_sin[s]


def _mask_histograms(buf, enc, off, nb, hh, ww, sy, sx, nchunks, plane, setid, set_ptr,
                     set_idx, mode, out, status):
    """Arrival histograms of the photons inside each mask, per frame: out (M, F, bins).

    Photons accumulate per mask-set and bin (see :func:`_sum_masks`), then per mask,
    so a photon costs one add whatever the number of masks.
    """
    n = enc.shape[0]
    n_sets = set_ptr.shape[0] - 1
    nbins = out.shape[2]
    for c in prange(nchunks):
        acc = np.zeros((n_sets, nbins), dtype=np.int64)
        used = np.zeros(n_sets, dtype=np.int64)
        lo, hi = _chunk(c, nchunks, n)
        for i in range(lo, hi):
            h, w, dy, dx = hh[i], ww[i], sy[i], sx[i]
            if not _in_bounds(buf, enc[i], off[i], nb[i], h, w):
                status[i] = ST_OUT_OF_BOUNDS
                continue
            st = ST_OK
            base = plane[i] * h * w
            if enc[i] == ENC_COMPRESSED:
                img, arr, ok = _compressed(buf, off[i], nb[i], h, w)
                if not ok:
                    status[i] = ST_MISMATCH
                    continue
                k = 0
                for y in range(h):
                    dst = base + _wrap(y + dy, h) * w
                    for x in range(w):
                        nq = np.int64(img[y * w + x])
                        if nq == 0:
                            continue
                        s = setid[dst + _wrap(x + dx, w)]
                        used[s] += nq
                        for j in range(k, k + nq):
                            b = _bin(np.int64(arr[j]), nbins, mode)
                            if b >= 0:
                                acc[s, b] += 1
                        k += nq
            else:
                rec = _u64s(buf, off[i], nb[i] // 8)
                for k in range(rec.shape[0]):
                    q = _raw_pixel(rec[k], h, w, dy, dx)
                    if q < 0:
                        st = ST_BAD_PIXEL
                        break
                    s = setid[base + q]
                    used[s] += 1
                    b = _bin(_raw_tau(rec[k]), nbins, mode)
                    if b >= 0:
                        acc[s, b] += 1
            status[i] = st
            for s in range(n_sets):
                if used[s] == 0:
                    continue
                if st == ST_OK:
                    for j in range(set_ptr[s], set_ptr[s + 1]):
                        r = set_idx[j]
                        for b in range(nbins):
                            out[r, i, b] += acc[s, b]
                acc[s, :] = 0
                used[s] = 0


@numba.njit(**_JIT)
def _decode_photons(buf, enc, off, nbytes, h, w, pix, tau):
    """Fill ``pix``/``tau`` with each photon's pixel and arrival bin; return (n, status).

    Compressed frames come out in pixel order; raw frames in file order.
    """
    if enc == ENC_RAW:
        rec = _u64s(buf, off, nbytes // 8)
        for k in range(rec.shape[0]):
            q = _raw_pixel(rec[k], h, w, 0, 0)
            if q < 0:
                return k, ST_BAD_PIXEL
            pix[k] = q
            tau[k] = _raw_tau(rec[k])
        return rec.shape[0], ST_OK
    img, arr, ok = _compressed(buf, off, nbytes, h, w)
    if not ok:
        return 0, ST_MISMATCH
    k = 0
    for q in range(h * w):
        for _ in range(img[q]):
            pix[k] = q
            tau[k] = arr[k]
            k += 1
    return k, ST_OK


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
            if not _in_bounds(buf, enc[i], off[i], nb[i], hh[i], ww[i]):
                status[i] = ST_OUT_OF_BOUNDS
                continue
            m, st = _decode_photons(buf, enc[i], off[i], nb[i], hh[i], ww[i], pix, tau)
            if st == ST_OK and m != starts[i + 1] - starts[i]:
                st = ST_MISMATCH
            status[i] = st
            if st != ST_OK:
                continue
            s0 = starts[i]
            if enc[i] == ENC_COMPRESSED:  # already in pixel order
                for k in range(m):
                    out_pix[s0 + k] = pix[k]
                    out_tau[s0 + k] = tau[k]
                continue
            npx = hh[i] * ww[i]
            hist[: npx + 1] = 0
            for k in range(m):
                hist[pix[k] + 1] += 1
            for p in range(npx):
                hist[p + 1] += hist[p]
            for k in range(m):
                d = s0 + hist[pix[k]]
                hist[pix[k]] += 1
                out_pix[d] = pix[k]
                out_tau[d] = tau[k]


#: kernels whose per-pixel divisions rely on ``0 / 0 -> NaN`` (no ZeroDivisionError)
_NUMPY_ERRORS = {"_pixel_flim"}
_KERNELS = {
    f.__name__.lstrip("_"): tuple(
        numba.njit(parallel=par, **_JIT,
                   **({"error_model": "numpy"} if f.__name__ in _NUMPY_ERRORS else {}))(f)
        for par in (True, False))
    for f in (_intensity, _sum_masks, _histograms, _pixel_flim, _mask_flim, _photons,
              _mask_histograms)
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
