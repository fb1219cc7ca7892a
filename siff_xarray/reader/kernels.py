"""Numba kernels that decode frames and reduce photons.

Every kernel takes the same frame description: a ``uint8`` buffer (the file's
memory map, or bytes gathered from a remote file) plus, per requested frame, its
encoding, strip offset, strip length, height, width and shift ``(sy, sx)``
(already reduced to ``0 <= sy < H``, ``0 <= sx < W``). A photon at ``(y, x)``
lands at ``((y + sy) mod H, (x + sx) mod W)``: exactly ``numpy.roll``.

The byte-level work is written once, in helpers each kernel calls per frame:

* :func:`_frame` bounds-checks a frame (every kernel's prologue);
* :func:`_raw_decode` is the one loop over a raw frame's photon records: it
  decodes them (pixel shifted and checked, arrival time) into scratch arrays
  that the kernels then reduce; :func:`_frame_photons` turns a frame of any
  encoding into that photon list (the mask-histogram, mask-lifetime and
  photon-list kernels are single loops over it);
* :func:`_dest_map` maps each pixel of a count image (a compressed frame's, or a
  TIFF page) to its shifted position, so the kernels walk images as flat arrays;
* :func:`_compressed`, :func:`_roll_copy`, :func:`_to_masks` (per-mask-set sums
  to masks) and the scalar :func:`_raw_pixel`, :func:`_bin`, :func:`_hist_bin`.

No helper that takes an array is called per photon or per pixel (such a call
costs reference-count updates that dwarf the work), so each kernel's inner
loop is its own short reduction over decoded photons or image pixels. The
kernels loop over frames in parallel chunks, each chunk owning its scratch
buffers. They never read or write out of bounds: every offset is checked and
problems are reported per frame in a ``status`` array (see ``ST_*`` in
:mod:`.decode`) that the Python layer turns into errors.

Each kernel is compiled twice from the same source, parallel and serial, each
with its own cache entry, when it is first used; :func:`run_compiled` uses the
parallel build when no other thread is inside one (Numba's default ``workqueue``
threading layer must not be entered from two threads at once), so calls from dask
worker threads are always safe. The reader calls kernels through
:func:`.decode.run`, which imports this module (and Numba) on first use.
"""

from __future__ import annotations

import sys
import threading
import types

import numba
import numpy as np
from numba import prange

from ..format.constants import ENC_COMPRESSED, ENC_RAW, ENC_TIFF
from .decode import (
    FRAME_ARGS,
    MODE_DROP,
    MODE_WRAP,
    ST_BAD_PIXEL,
    ST_MISMATCH,
    ST_OK,
    ST_OUT_OF_BOUNDS,
    ST_SATURATED,
    in_bounds,
)

#: what the compiled code takes from other modules (docs/architecture.md, Rules)
_FOREIGN_INPUTS = "6e442955aaad53a0"

__all__ = ["kernel", "run_compiled"]

_JIT = {"cache": True, "nogil": True}

if sys.byteorder != "little":  # pragma: no cover - every supported platform is
    raise ImportError("siff-xarray decodes little-endian data with native views and needs a "
                      "little-endian CPU")


# --------------------------------------------------------------------------- byte views


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


#: the bounds check every kernel's prologue makes (plain Python in :mod:`.decode`, which
#: the NumPy twin of the intensity kernel calls as it is)
_in_bounds = numba.njit(**_JIT)(in_bounds)


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


def _nchunks(n: int) -> int:
    return max(1, min(n, 4 * numba.get_num_threads()))


# --------------------------------------------------------------------------- one frame
#
# Helpers that take arrays are called once per frame (a call passing arrays costs
# reference-count updates, so nothing per photon or per pixel takes an array).


@numba.njit(**_JIT)
def _frame(buf, enc, off, nb, hh, ww, sy, sx, i, status):
    """Frame ``i``'s ``(ok, h, w, dy, dx)``; records ``ST_OUT_OF_BOUNDS`` when it is not ok."""
    h, w = hh[i], ww[i]
    ok = _in_bounds(buf, enc[i], off[i], nb[i], h, w)
    if not ok:
        status[i] = ST_OUT_OF_BOUNDS
    return ok, h, w, sy[i], sx[i]


@numba.njit(**_JIT)
def _workspace(hw):
    """Per-chunk scratch of the photon kernels: raw photons, destination map, its key."""
    return (np.empty(1, dtype=np.int64), np.empty(1, dtype=np.int64),
            np.empty(max(hw, 1), dtype=np.int64), np.full(4, -1, dtype=np.int64))


@numba.njit(**_JIT)
def _scratch(pix, tau, n):
    """Photon scratch arrays of at least ``n`` entries (``pix``/``tau`` or larger new ones)."""
    if n <= pix.shape[0]:
        return pix, tau
    m = max(n, 2 * pix.shape[0])
    return np.empty(m, dtype=np.int64), np.empty(m, dtype=np.int64)


@numba.njit(**_JIT)
def _raw_decode(buf, off, nb, h, w, dy, dx, pix, tau):
    """Decode a raw frame's records into ``pix`` (shifted pixel) and ``tau`` (arrival).

    The one loop over raw photon records: returns ``(m, status)``, ``m`` the photons
    decoded (in file order), ``ST_BAD_PIXEL`` at the first record outside the frame.
    """
    rec = _u64s(buf, off, nb // 8)
    for k in range(rec.shape[0]):
        q = _raw_pixel(rec[k], h, w, dy, dx)
        if q < 0:
            return k, ST_BAD_PIXEL
        pix[k] = q
        tau[k] = _raw_tau(rec[k])
    return rec.shape[0], ST_OK


@numba.njit(**_JIT)
def _raw_counts(buf, off, nb, h, w, dy, dx, row):
    """Count a raw frame's photons per (shifted) pixel into the zeroed uint16 ``row``.

    Returns ``ST_BAD_PIXEL`` at the first record outside the frame, else
    ``ST_SATURATED`` if a pixel reached 65535 photons, else ``ST_OK``.
    """
    rec = _u64s(buf, off, nb // 8)
    st = ST_OK
    for k in range(rec.shape[0]):
        q = _raw_pixel(rec[k], h, w, dy, dx)
        if q < 0:
            return ST_BAD_PIXEL
        if row[q] == 65535:
            st = ST_SATURATED
        else:
            row[q] += 1
    return st


@numba.njit(**_JIT)
def _raw_scatter(buf, off, nb, h, w, dy, dx, cnt, tsum, gsum, ssum, cos_lut, sin_lut, phasor):
    """Add a raw frame's photons to per-pixel count, arrival-sum [and phasor-sum] scratch.

    Scatters straight from the records: through :func:`_raw_decode` first, the
    per-pixel lifetime kernel's general path ran 2x slower. Returns
    ``ST_BAD_PIXEL`` at the first record outside the frame, else ``ST_OK``.
    """
    period = cos_lut.shape[0]
    rec = _u64s(buf, off, nb // 8)
    for k in range(rec.shape[0]):
        q = _raw_pixel(rec[k], h, w, dy, dx)
        if q < 0:
            return ST_BAD_PIXEL
        t = _raw_tau(rec[k])
        cnt[q] += 1.0
        tsum[q] += t
        if phasor:
            gsum[q] += cos_lut[t % period]
            ssum[q] += sin_lut[t % period]
    return ST_OK


@numba.njit(**_JIT)
def _dest_map(h, w, dy, dx, dmap, last):
    """Fill ``dmap[p]`` with where source pixel ``p`` lands after the shift ``(dy, dx)``.

    ``last`` remembers the ``(h, w, dy, dx)`` the map was built for, so runs of frames
    with one shift (unregistered reads) build it once.
    """
    if last[0] == h and last[1] == w and last[2] == dy and last[3] == dx:
        return
    for y in range(h):
        dst = _wrap(y + dy, h) * w
        for x in range(w):
            dmap[y * w + x] = dst + _wrap(x + dx, w)
    last[0], last[1], last[2], last[3] = h, w, dy, dx


@numba.njit(**_JIT)
def _compressed(buf, off, nb, h, w, dy, dx, dmap, last):
    """Count image and arrival block of a compressed frame, and whether they agree.

    Also makes ``dmap`` the frame's destination map (see :func:`_dest_map`).
    """
    img = _u16s(buf, off - 2 * h * w, h * w)
    _dest_map(h, w, dy, dx, dmap, last)
    return img, _u16s(buf, off, nb // 2), _consistent(img, nb)


@numba.njit(**_JIT)
def _frame_photons(frames, i, status, pix, tau, dmap, last):
    """Decode frame ``i``'s photons, whatever its encoding, into ``(pix, tau)``.

    The one place a frame becomes a photon list: shifted pixel and arrival bin of
    every photon (raw frames in file order, compressed frames in pixel order).
    Returns ``(m, pix, tau)``, the scratch grown as needed; ``m`` is -1 (and
    ``status[i]`` says why) when the frame is out of bounds, inconsistent or holds a
    photon outside the frame; a TIFF page has no photons (``m`` = 0). ``frames`` is
    the kernels' frame description ``(buf, enc, off, nb, hh, ww, sy, sx)``.
    """
    buf, enc, off, nb, hh, ww, sy, sx = frames
    ok, h, w, dy, dx = _frame(buf, enc, off, nb, hh, ww, sy, sx, i, status)
    if not ok:
        return -1, pix, tau
    if enc[i] == ENC_RAW:
        pix, tau = _scratch(pix, tau, nb[i] // 8)
        m, st = _raw_decode(buf, off[i], nb[i], h, w, dy, dx, pix, tau)
    elif enc[i] == ENC_COMPRESSED:
        pix, tau = _scratch(pix, tau, nb[i] // 2)
        img, arr, consistent = _compressed(buf, off[i], nb[i], h, w, dy, dx, dmap, last)
        m, st = (arr.shape[0], ST_OK) if consistent else (0, ST_MISMATCH)
        if consistent:
            k = 0
            for p in range(h * w):
                q = dmap[p]
                for _ in range(np.int64(img[p])):
                    pix[k] = q
                    tau[k] = arr[k]
                    k += 1
    else:
        m, st = 0, ST_OK
    status[i] = st
    return (m if st == ST_OK else -1), pix, tau


@numba.njit(**_JIT)
def _pixel_starts(pix, m, npx, hist):
    """``hist[p]``: where pixel ``p``'s photons start among the ``m`` photons sorted by pixel.

    ``hist`` (at least ``npx + 1`` long) gets ``npx + 1`` entries; ``hist[npx] == m``.
    """
    hist[: npx + 1] = 0
    for k in range(m):
        hist[pix[k] + 1] += 1
    for p in range(npx):
        hist[p + 1] += hist[p]


@numba.njit(**_JIT)
def _pixel_sort(pix, tau, m, hist, s0, out_pix, out_tau):
    """Write the ``m`` photons in pixel order (stable) at ``s0``, from :func:`_pixel_starts`.

    ``out_pix`` may have no entries: then only arrival times are written. Leaves
    ``hist[p]`` at the start of pixel ``p + 1``.
    """
    keep_pix = out_pix.shape[0] > 0
    for k in range(m):
        d = s0 + hist[pix[k]]
        hist[pix[k]] += 1
        if keep_pix:
            out_pix[d] = pix[k]
        out_tau[d] = tau[k]


@numba.njit(**_JIT)
def _roll_copy(img, row, h, w, dy, dx):
    """Copy image ``img`` into ``row`` (both flat ``h * w``), rolled by ``(dy, dx)``."""
    if dy == 0 and dx == 0:
        row[:] = img
        return
    for y in range(h):
        src = y * w
        dst = _wrap(y + dy, h) * w
        row[dst + dx : dst + w] = img[src : src + w - dx]
        row[dst : dst + dx] = img[src + w - dx : src + w]


@numba.njit(**_JIT)
def _to_masks(acc, set_ptr, set_idx, out, i):
    """Add per-mask-set sums ``acc[s, :]`` of frame ``i`` to ``out[mask, i, :]``.

    ``set_ptr``/``set_idx`` list the masks of each set (CSR), so a photon costs one
    add per set, whatever the number of masks. Sets that gathered nothing are
    skipped. (Scalar loops: there may be thousands of sets.)
    """
    nk = acc.shape[1]
    for s in range(acc.shape[0]):
        used = False
        for b in range(nk):
            if acc[s, b] != 0:
                used = True
                break
        if not used:
            continue
        for j in range(set_ptr[s], set_ptr[s + 1]):
            r = set_idx[j]
            for b in range(nk):
                out[r, i, b] += acc[s, b]


@numba.njit(**_JIT)
def _bin(t, nbins, mode):
    """Histogram bin of arrival ``t``, or -1 when ``mode`` drops it."""
    if t < nbins:
        return t
    if mode == MODE_WRAP:
        return t % nbins
    return -1 if mode == MODE_DROP else nbins - 1


# --------------------------------------------------------------------------- kernels


def _intensity(buf, enc, off, nb, hh, ww, sy, sx, nchunks, out, status):
    """Photon-count images; ``out`` is ``(F, H*W)`` uint16 (a view of (F, H, W))."""
    n = enc.shape[0]
    for c in prange(nchunks):
        for i in range(c * n // nchunks, (c + 1) * n // nchunks):
            ok, h, w, dy, dx = _frame(buf, enc, off, nb, hh, ww, sy, sx, i, status)
            if not ok:
                continue
            row = out[i]
            if enc[i] == ENC_RAW:
                row[:] = 0
                status[i] = _raw_counts(buf, off[i], nb[i], h, w, dy, dx, row)
                continue
            img = _image_u16(buf, enc[i], off[i], h, w)
            if enc[i] == ENC_COMPRESSED and not _consistent(img, nb[i]):
                status[i] = ST_MISMATCH
                continue
            _roll_copy(img, row, h, w, dy, dx)
            status[i] = ST_OK


def _sum_masks(buf, enc, off, nb, hh, ww, sy, sx, nchunks, plane, setid, set_ptr, set_idx,
               out, status):
    """Photon counts per mask: each pixel maps to the set of masks that contain it.

    ``setid[plane * H*W + pixel]`` is the pixel's mask-set; ``set_ptr``/``set_idx``
    list each set's masks. A photon costs one add whatever the number of masks.
    Compressed frames and TIFF pages are summed from their count image alone.
    """
    n = enc.shape[0]
    n_sets = set_ptr.shape[0] - 1
    hw = hh.max() * ww.max() if n else 0
    out3 = out.reshape(out.shape[0], out.shape[1], 1)
    for c in prange(nchunks):
        acc = np.zeros((n_sets, 1), dtype=np.int64)
        pix, tau, dmap, last = _workspace(hw)
        for i in range(c * n // nchunks, (c + 1) * n // nchunks):
            ok, h, w, dy, dx = _frame(buf, enc, off, nb, hh, ww, sy, sx, i, status)
            if not ok:
                continue
            base = plane[i] * h * w
            acc[:] = 0
            if enc[i] == ENC_RAW:
                pix, tau = _scratch(pix, tau, nb[i] // 8)
                m, st = _raw_decode(buf, off[i], nb[i], h, w, dy, dx, pix, tau)
                for k in range(m):
                    acc[setid[base + pix[k]], 0] += 1
            else:
                img = _image_u16(buf, enc[i], off[i], h, w)
                total = 0
                if dy == 0 and dx == 0:  # unregistered: no destination map needed
                    for p in range(h * w):
                        total += np.int64(img[p])
                        acc[setid[base + p], 0] += np.int64(img[p])
                else:
                    _dest_map(h, w, dy, dx, dmap, last)
                    for p in range(h * w):
                        total += np.int64(img[p])
                        acc[setid[base + dmap[p]], 0] += np.int64(img[p])
                st = ST_MISMATCH if enc[i] == ENC_COMPRESSED and 2 * total != nb[i] else ST_OK
            status[i] = st
            if st == ST_OK:
                _to_masks(acc, set_ptr, set_idx, out3, i)


@numba.njit(**_JIT)
def _hist_bin(t, nbins, mode):
    """``(bin, beyond)``: the bin of arrival ``t`` (-1: dropped) and 1 if ``t >= nbins``."""
    if t < nbins:
        return t, 0
    return _bin(t, nbins, mode), 1


def _histograms(buf, enc, off, nb, hh, ww, sy, sx, nchunks, mode, out, overflow, status):
    """Arrival histograms; reads only the arrival times (pixels are not needed).

    Photons are counted into four interleaved copies of the histogram so that
    consecutive photons in one bin do not serialise on a single counter.
    """
    n = enc.shape[0]
    nbins = out.shape[1]
    hw = hh.max() * ww.max() if n else 0
    for c in prange(nchunks):
        sub = np.zeros(4 * nbins, dtype=np.int64)
        _, _, dmap, last = _workspace(hw)
        for i in range(c * n // nchunks, (c + 1) * n // nchunks):
            ok, h, w, _, _ = _frame(buf, enc, off, nb, hh, ww, sy, sx, i, status)
            if not ok:
                continue
            over = 0
            if enc[i] == ENC_RAW:
                rec = _u64s(buf, off[i], nb[i] // 8)
                for k in range(rec.shape[0]):
                    b, beyond = _hist_bin(_raw_tau(rec[k]), nbins, mode)
                    over += beyond
                    if b >= 0:
                        sub[(k & 3) * nbins + b] += 1
            elif enc[i] == ENC_COMPRESSED:
                _, arr, consistent = _compressed(buf, off[i], nb[i], h, w, 0, 0, dmap, last)
                if not consistent:
                    status[i] = ST_MISMATCH
                    continue
                for k in range(arr.shape[0]):
                    b, beyond = _hist_bin(np.int64(arr[k]), nbins, mode)
                    over += beyond
                    if b >= 0:
                        sub[(k & 3) * nbins + b] += 1
            status[i] = ST_OK
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
    pass over the count image: a pixel's arrival sum is the difference of two
    entries of a running sum of the arrival block (phasors go run by run). Raw
    frames scatter into float scratch arrays that are reset while the outputs
    are written.
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
        _, _, dmap, last = _workspace(hw)
        for i in range(c * n // nchunks, (c + 1) * n // nchunks):
            ok, h, w, dy, dx = _frame(buf, enc, off, nb, hh, ww, sy, sx, i, status)
            if not ok:
                continue
            st = ST_OK
            if enc[i] == ENC_COMPRESSED:
                img, arr, consistent = _compressed(buf, off[i], nb[i], h, w, dy, dx, dmap, last)
                if not consistent:
                    status[i] = ST_MISMATCH
                    continue
                if arr.shape[0] >= csum.shape[0]:  # (np.empty: np.zeros here would be
                    # turned into a parfor and hoisted out of the frame loop)
                    csum = np.empty(max(arr.shape[0] + 1, 2 * csum.shape[0]), dtype=np.int64)
                csum[0] = 0
                for j in range(arr.shape[0]):
                    csum[j + 1] = csum[j] + np.int64(arr[j])
                k = 0
                if want_mean and not want_phasor and not want_count:  # the common case
                    for p in range(h * w):
                        e = k + np.int64(img[p])
                        out_mean[i, dmap[p]] = (csum[e] - csum[k]) / (e - k) - offset
                        k = e
                else:
                    for p in range(h * w):
                        q = dmap[p]
                        nq = np.int64(img[p])
                        if want_count:
                            out_count[i, q] = nq
                        if want_mean:
                            out_mean[i, q] = (csum[k + nq] - csum[k]) / nq - offset
                        if want_phasor:
                            gs, ss = 0.0, 0.0
                            for j in range(k, k + nq):
                                b = np.int64(arr[j]) % period
                                gs += cos_lut[b]
                                ss += sin_lut[b]
                            out_g[i, q] = gs / nq
                            out_s[i, q] = ss / nq
                        k += nq
            else:  # raw (TIFF pages were rejected before)
                st = _raw_scatter(buf, off[i], nb[i], h, w, dy, dx, cnt, tsum, gsum, ssum,
                                  cos_lut, sin_lut, want_phasor)
                if want_mean and not want_phasor and not want_count:  # the common case
                    for q in range(h * w):  # one plain (vectorised) loop
                        out_mean[i, q] = tsum[q] / cnt[q] - offset
                        cnt[q] = 0.0
                        tsum[q] = 0.0
                    status[i] = st
                    continue
                for q in range(h * w):  # write the outputs and reset the scratch
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
    frames = (buf, enc, off, nb, hh, ww, sy, sx)
    n = enc.shape[0]
    n_sets = set_ptr.shape[0] - 1
    period = cos_lut.shape[0]
    phasor = out_cos.shape[0] > 0
    hw = hh.max() * ww.max() if n else 0
    counts = out_count.reshape(out_count.shape[0], out_count.shape[1], 1)
    sums = out_sum.reshape(out_sum.shape[0], out_sum.shape[1], 1)
    coss = out_cos.reshape(out_cos.shape[0], out_cos.shape[1], 1)
    sins = out_sin.reshape(out_sin.shape[0], out_sin.shape[1], 1)
    for c in prange(nchunks):
        a_int = np.zeros((2, n_sets, 1), dtype=np.int64)  # photons, arrival sum
        a_phs = np.zeros((2, n_sets if phasor else 0, 1), dtype=np.float64)  # cos, sin
        pix, tau, dmap, last = _workspace(hw)
        for i in range(c * n // nchunks, (c + 1) * n // nchunks):
            m, pix, tau = _frame_photons(frames, i, status, pix, tau, dmap, last)
            if m < 0:
                continue
            a_int[:] = 0
            a_phs[:] = 0.0
            ids = setid[plane[i] * hh[i] * ww[i] :]
            for k in range(m):
                s, t = ids[pix[k]], tau[k]
                a_int[0, s, 0] += 1
                a_int[1, s, 0] += t
                if phasor:
                    a_phs[0, s, 0] += cos_lut[t % period]
                    a_phs[1, s, 0] += sin_lut[t % period]
            _to_masks(a_int[0], set_ptr, set_idx, counts, i)
            _to_masks(a_int[1], set_ptr, set_idx, sums, i)
            if phasor:
                _to_masks(a_phs[0], set_ptr, set_idx, coss, i)
                _to_masks(a_phs[1], set_ptr, set_idx, sins, i)


def _mask_histograms(buf, enc, off, nb, hh, ww, sy, sx, nchunks, plane, setid, set_ptr,
                     set_idx, mode, out, status):
    """Arrival histograms of the photons inside each mask, per frame: out (M, F, bins).

    Photons accumulate per mask-set and bin (see :func:`_sum_masks`), then per mask,
    so a photon costs one add whatever the number of masks.
    """
    frames = (buf, enc, off, nb, hh, ww, sy, sx)
    n = enc.shape[0]
    n_sets = set_ptr.shape[0] - 1
    nbins = out.shape[2]
    hw = hh.max() * ww.max() if n else 0
    for c in prange(nchunks):
        pix, tau, dmap, last = _workspace(hw)
        acc = np.zeros((n_sets, nbins), dtype=np.int64)
        for i in range(c * n // nchunks, (c + 1) * n // nchunks):
            m, pix, tau = _frame_photons(frames, i, status, pix, tau, dmap, last)
            if m < 0:
                continue
            acc[:] = 0
            ids = setid[plane[i] * hh[i] * ww[i] :]
            for k in range(m):
                b = _bin(tau[k], nbins, mode)
                if b >= 0:
                    acc[ids[pix[k]], b] += 1
            _to_masks(acc, set_ptr, set_idx, out, i)


def _photons(buf, enc, off, nb, hh, ww, sy, sx, nchunks, maxn, starts, out_pix, out_tau,
             status):
    """Photons of each frame, sorted by pixel (stable), written at ``starts[i]``.

    Compressed frames store their photons in pixel order already; raw frames are
    counting-sorted by pixel.
    """
    frames = (buf, enc, off, nb, hh, ww, sy, sx)
    n = enc.shape[0]
    hw = hh.max() * ww.max() if n else 0
    for c in prange(nchunks):
        hist = np.empty(hw + 1, dtype=np.int64)
        pix, tau, dmap, last = _workspace(hw)
        for i in range(c * n // nchunks, (c + 1) * n // nchunks):
            m, pix, tau = _frame_photons(frames, i, status, pix, tau, dmap, last)
            if m < 0:
                continue
            s0 = starts[i]
            if m != starts[i + 1] - s0:
                status[i] = ST_MISMATCH
                continue
            if enc[i] == ENC_COMPRESSED:  # already in pixel order
                out_pix[s0 : s0 + m] = pix[:m]
                out_tau[s0 : s0 + m] = tau[:m]
                continue
            _pixel_starts(pix, m, hh[i] * ww[i], hist)
            _pixel_sort(pix, tau, m, hist, s0, out_pix, out_tau)


@numba.njit(**_JIT)
def _arrival_stats(src, m, hist, r):
    """Add ``src[:m]`` to histogram row ``hist[r]`` (drop mode; no rows: none); return the max."""
    nbins = hist.shape[1]
    want = hist.shape[0] > 0
    hi = 0
    for k in range(m):
        t = np.int64(src[k])
        hi = max(hi, t)
        if want and t < nbins:
            hist[r, t] += 1
    return hi


def _store_frames(buf, enc, off, nb, hh, ww, sy, sx, nchunks, rows, starts, images, counts,
                  taus, hist, tmax, status):
    """Everything a converted store keeps of each frame, from one decode of it.

    Frame ``i`` goes to row ``rows[i]`` of ``images`` (its count image; ``(R, H*W)``
    uint16), ``counts`` (its photon count) and ``hist`` (its arrival histogram, times
    ``>= bins`` dropped; pass zero rows to skip); its arrival times, sorted by pixel
    (stable), to ``taus[starts[i]:starts[i + 1]]`` in the dtype of ``taus``, and its
    largest arrival time to ``tmax[i]`` (so a caller storing uint16 can tell when
    they do not fit). Raw frames are counting-sorted; a pixel above 65535 photons
    gives ``ST_SATURATED``. TIFF pages have no photons: their count is the image sum.
    Frames are stored unshifted (``sy = sx = 0``): as in :func:`_photons`, a
    compressed frame's arrival block is taken to be in pixel order as it stands.
    """
    frames = (buf, enc, off, nb, hh, ww, sy, sx)
    n = enc.shape[0]
    hw = hh.max() * ww.max() if n else 0
    no_pix = np.empty(0, dtype=np.int64)
    for c in prange(nchunks):
        first = np.empty(hw + 1, dtype=np.int64)
        pix, tau, dmap, last = _workspace(hw)
        for i in range(c * n // nchunks, (c + 1) * n // nchunks):
            ok, h, w, dy, dx = _frame(buf, enc, off, nb, hh, ww, sy, sx, i, status)
            if not ok:
                continue
            r, s0, npx = rows[i], starts[i], h * w
            row = images[r]
            tmax[i] = 0
            if enc[i] == ENC_TIFF:
                img = _image_u16(buf, enc[i], off[i], h, w)
                _roll_copy(img, row, h, w, dy, dx)
                total = 0
                for p in range(npx):
                    total += np.int64(img[p])
                counts[r] = total
                status[i] = ST_OK
                continue
            if enc[i] == ENC_COMPRESSED:
                img, arr, consistent = _compressed(buf, off[i], nb[i], h, w, dy, dx, dmap, last)
                m = arr.shape[0]
                if not consistent or m != starts[i + 1] - s0:
                    status[i] = ST_MISMATCH
                    continue
                _roll_copy(img, row, h, w, dy, dx)
                for k in range(m):  # already in pixel order
                    taus[s0 + k] = arr[k]
                tmax[i] = _arrival_stats(arr, m, hist, r)
                status[i] = ST_OK
            else:
                m, pix, tau = _frame_photons(frames, i, status, pix, tau, dmap, last)
                if m < 0:
                    continue
                if m != starts[i + 1] - s0:
                    status[i] = ST_MISMATCH
                    continue
                _pixel_starts(pix, m, npx, first)
                for p in range(npx):
                    v = first[p + 1] - first[p]
                    if v > 65535:
                        status[i] = ST_SATURATED
                        v = 65535
                    row[p] = v
                _pixel_sort(pix, tau, m, first, s0, no_pix, taus)
                tmax[i] = _arrival_stats(tau, m, hist, r)
            counts[r] = m


#: kernels whose per-pixel divisions rely on ``0 / 0 -> NaN`` (no ZeroDivisionError)
_NUMPY_ERRORS = {"_pixel_flim"}


def _compile(f, parallel: bool):
    """Compile kernel ``f``, parallel or serial, each with its own on-disk cache entry.

    Numba keys its cache by function name and bytecode, not by compile options, so
    the two builds of one function would load each other's cached code (a warm
    cache could hand the serial build the parallel code that must not be entered
    from two threads at once). A copy of the function under another qualified
    name gets its own cache file.
    """
    g = types.FunctionType(f.__code__, f.__globals__, f.__name__, f.__defaults__,
                           f.__closure__)
    g.__qualname__ = f"{f.__qualname__}_{'parallel' if parallel else 'serial'}"
    g.__doc__ = f.__doc__
    opts = {"error_model": "numpy"} if f.__name__ in _NUMPY_ERRORS else {}
    return numba.njit(parallel=parallel, **_JIT, **opts)(g)


_SOURCES = {f.__name__.lstrip("_"): f for f in (
    _intensity, _sum_masks, _histograms, _pixel_flim, _mask_flim, _photons, _mask_histograms,
    _store_frames)}
_BUILT: dict[str, tuple] = {}


def kernel(name: str) -> tuple:
    """Return the parallel and serial builds of kernel ``name``, made on first use."""
    built = _BUILT.get(name)
    if built is None:
        built = _BUILT.setdefault(name, (_compile(_SOURCES[name], True),
                                         _compile(_SOURCES[name], False)))
    return built


_PARALLEL_LOCK = threading.Lock()


def run_compiled(name: str, *args) -> None:
    """Run kernel ``name``; parallel if no other thread is in a parallel kernel.

    The ``nchunks`` argument is filled in here, after the :data:`FRAME_ARGS`.
    Callers go through :func:`.decode.run`.
    """
    n = len(args[1])
    args = (*args[:FRAME_ARGS], _nchunks(n), *args[FRAME_ARGS:])
    par, ser = kernel(name)
    if _PARALLEL_LOCK.acquire(blocking=False):
        try:
            par(*args)
        finally:
            _PARALLEL_LOCK.release()
    else:
        ser(*args)
