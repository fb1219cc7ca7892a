"""Photon reductions shared by every photon source: a ``.siff`` file or a converted store.

:class:`PhotonReductions` holds the public reduction methods (intensity images,
multi-mask sums, arrival-time histograms, per-pixel and per-mask lifetimes and
phasors, photon lists). They run the Numba kernels of :mod:`.kernels` on a frame
description (a byte buffer and per-frame encoding, offset, length, shape and
shift) that the concrete source provides through a few hooks:

* ``name`` and ``num_frames``;
* ``_frame_args(frames, shifts, photons)``: the kernel arguments for frames;
* ``_frame_planes(frames, n_planes)``: each frame's z plane (for 3-D masks);
* ``_default_n_bins()``, ``_picoseconds_per_bin()``: the arrival-time axis;
* ``_n_photons(frames)``, ``_signed(frames)``, ``_failure(frame, status)``.

:class:`~siff_xarray.reader.siff_file.SiffFile` provides them from the file's
frame index; :class:`~siff_xarray.store.StorePhotons` rebuilds compressed
frames from a converted Zarr store, so both give identical results.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal, Self

import numpy as np

from .._options import HistogramMode, histogram_length
from ..errors import SiffFormatError, SiffWarning, user_stacklevel
from . import decode as K
from .source import PARTS_AHEAD

__all__ = ["FrameSelection", "PhotonReductions", "Shifts", "shifts_for_frames"]

FrameSelection = Sequence[int] | np.ndarray | slice | int | None
Shifts = Mapping[int, tuple[int, int]] | np.ndarray | None


class PhotonReductions:
    """Reductions over the photons of frames; see the module docstring for the hooks."""

    name: str
    num_frames: int

    def close(self) -> None:
        """Release what the source holds open."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}: {self.num_frames} frames>"

    # ------------------------------------------------------------------ hooks

    def _frame_args(self, f: np.ndarray, shifts: Shifts = None, photons: bool = False
                    ) -> tuple[tuple, tuple[int, int], int]:
        """Return kernel arguments (buffer + 7 per-frame arrays), frame shape, max photons."""
        raise NotImplementedError

    def _reading(self, args: tuple) -> contextlib.AbstractContextManager[tuple]:
        """Context in which a kernel reads the bytes ``_frame_args`` handed it.

        It yields the arguments to run the kernel with: ``args``, or the same
        frames with their bytes copied where reading them in place is not safe.
        """
        return contextlib.nullcontext(args)

    def _run(self, kernel: str, *args: Any) -> None:
        """Run a decode kernel (:func:`decode.run`) while its bytes are held."""
        with self._reading(args[:K.FRAME_ARGS]) as held:
            K.run(kernel, *held, *args[K.FRAME_ARGS:])

    def _streamed(self, f: np.ndarray) -> list[slice]:
        """Consecutive parts of ``f`` to decode one after another (default: one part).

        A source whose bytes are fetched (not mapped) cuts a long read into parts
        of bounded size, so the next part arrives while one decodes and memory
        holds a few parts, not every frame's bytes.
        """
        return [slice(0, len(f))]

    #: parts of a streamed read that are being fetched while one decodes
    #: (:data:`.source.PARTS_AHEAD`)
    read_ahead_parts = PARTS_AHEAD

    def _parts_ahead(self) -> int:
        """Parts of a streamed read to have on their way (default :attr:`read_ahead_parts`)."""
        return self.read_ahead_parts

    def _read_ahead(self, f: np.ndarray) -> None:
        """Start fetching the bytes of frames ``f``, decoded next (default: nothing)."""

    def _read_done(self) -> None:
        """Drop the bytes of the part just decoded (default: nothing)."""

    def _read_in_one(self, f: np.ndarray) -> None:
        """Note that a read of frames ``f`` in one part starts (default: nothing).

        A fetched file predicts from it the reads that follow (the next chunks of
        a Dask graph) and starts fetching them.
        """

    def _stream_done(self) -> None:
        """Drop every byte a streamed read fetched or kept for its parts (default: nothing)."""

    def _parts(self, f: np.ndarray, shifts: Shifts = None, photons: bool = False
               ) -> Iterator[tuple[slice, tuple, tuple[int, int], int]]:
        """Kernel arguments of consecutive parts of frames ``f`` (see :meth:`_streamed`).

        Yields ``(part, args, shape, max_photons)`` per part, at least one (an
        empty ``f`` gives one empty part): ``part`` slices ``f`` and every per-frame
        array, and ``args`` are :meth:`_frame_args` of ``f[part]``. While one part
        decodes, the next :meth:`_parts_ahead` are fetched; its bytes are
        dropped once it is done, and all of them when the read ends (also when
        it fails or its consumer stops early). A source read in place gives one part.
        """
        parts = self._streamed(f)
        streamed = len(parts) > 1
        ahead = self._parts_ahead() if streamed else 0
        if streamed:
            if shifts is not None:  # resolved once, then cut with the frames
                shifts = np.stack(self._shifts(shifts, f, self._shape_of(f)), axis=1)
            for first in parts[:ahead]:
                self._read_ahead(f[first])
        else:
            self._read_in_one(f)
        try:
            for k, part in enumerate(parts):
                if streamed and k + ahead < len(parts):  # while this decodes
                    self._read_ahead(f[parts[k + ahead]])
                sh = shifts[part] if streamed and shifts is not None else shifts
                args, shape, maxn = self._frame_args(f[part], sh, photons)
                yield part, args, shape, maxn
                if streamed:
                    self._read_done()
        finally:
            if streamed:  # done, failed or abandoned: hold no part's bytes after the read
                self._stream_done()

    def _shape_of(self, f: np.ndarray) -> tuple[int, int]:
        """Return the frame shape shared by frames ``f`` (sources that stream provide it)."""
        raise NotImplementedError

    def _frame_planes(self, f: np.ndarray, n_planes: int) -> np.ndarray:
        """Return the z plane (slice index) of each frame, for masks of ``n_planes`` planes."""
        raise NotImplementedError

    def _default_n_bins(self) -> int | None:
        """Arrival-time bins per laser period (``Tau_bins``), if known."""
        raise NotImplementedError

    def _picoseconds_per_bin(self) -> float | None:
        """Width of one arrival-time bin, if known."""
        raise NotImplementedError

    def _n_photons(self, f: np.ndarray) -> np.ndarray:
        """Photons stored in each frame."""
        raise NotImplementedError

    def _signed(self, f: np.ndarray) -> bool:
        """Tell whether the frames hold signed 16-bit samples (some ScanImage TIFFs)."""
        return False

    def _failure(self, frame: int, code: int) -> tuple[str, int | None]:
        """Message and byte offset for a kernel failure status on ``frame``."""
        return {
            K.ST_BAD_PIXEL: "a photon's pixel coordinates lie outside the frame",
            K.ST_MISMATCH: "the count image is inconsistent with the photon block",
            K.ST_OUT_OF_BOUNDS: "frame data lies outside the buffer",
        }.get(code, f"decoder status {code}"), None

    # ------------------------------------------------------------------ selection helpers

    def _frames(self, frames: FrameSelection) -> np.ndarray:
        n = self.num_frames
        if frames is None:
            return np.arange(n, dtype=np.int64)
        if isinstance(frames, slice):
            return np.arange(n, dtype=np.int64)[frames]
        f = np.asarray(frames)
        if f.dtype.kind not in "iu" and not (f.size == 0):
            raise TypeError(f"frame indices must be integers, got {f.dtype}")
        f = f.astype(np.int64).reshape(-1)
        f = np.where(f < 0, f + n, f)
        bad = f[(f < 0) | (f >= n)]
        if bad.size:
            raise IndexError(f"{self.name}: frame {int(bad[0])} out of range "
                             f"(the file has {n} frames)")
        return f

    def _shifts(self, shifts: Shifts, f: np.ndarray, shape: tuple[int, int]
                ) -> tuple[np.ndarray, np.ndarray]:
        n = len(f)
        if shifts is None or (isinstance(shifts, Mapping) and len(shifts) == 0):
            z = np.zeros(n, dtype=np.int64)
            return z, z.copy()
        if isinstance(shifts, Mapping):
            arr, found = shifts_for_frames(shifts, f)
            if not found.all():
                missing = f[~found][:10].tolist()
                raise ValueError(f"{self.name}: no shift given for frame(s) {missing}"
                                 f"{' ...' if (~found).sum() > 10 else ''}")
        else:
            arr = np.asarray(shifts)
            if arr.dtype.kind not in "iu" or arr.shape != (n, 2):
                raise ValueError(f"shifts must be a mapping frame -> (dy, dx) or an integer "
                                 f"array of shape ({n}, 2), got {arr.dtype} {arr.shape}")
            arr = arr.astype(np.int64)
        return arr[:, 0] % shape[0], arr[:, 1] % shape[1]

    def _check(self, status: np.ndarray, f: np.ndarray) -> None:
        bad = np.flatnonzero((status != K.ST_OK) & (status != K.ST_SATURATED))
        if bad.size:
            i = int(bad[0])
            frame, code = int(f[i]), int(status[i])
            what, offset = self._failure(frame, code)
            raise SiffFormatError(self.name, what, offset, frame)
        sat = np.flatnonzero(status == K.ST_SATURATED)
        if sat.size:
            warnings.warn(f"{self.name}: {sat.size} frame(s) have pixels with more than 65535 "
                          f"photons (first: frame {int(f[sat[0]])}); uint16 values saturate",
                          SiffWarning, stacklevel=user_stacklevel())

    # ------------------------------------------------------------------ intensity

    def read_frames(self, frames: FrameSelection = None, shifts: Shifts = None,
                    out: np.ndarray | None = None) -> np.ndarray:
        """Photon-count (intensity) images.

        Parameters
        ----------
        frames
            File frame indices (default: all frames, flyback included).
        shifts
            Registration: mapping ``frame -> (dy, dx)`` covering every requested
            frame, or an integer array of shape ``(F, 2)``. Each frame is returned
            as ``numpy.roll(frame, (dy, dx), axis=(0, 1))``, for any sign and size.
        out
            Decode into this C-contiguous ``(F, H, W)`` 16-bit array (no new array).

        Returns
        -------
        numpy.ndarray
            ``uint16`` of shape ``(F, H, W)`` (``int16`` for TIFF files storing
            signed samples); ``out`` if given.

        """
        f = self._frames(frames)
        status = np.zeros(len(f), dtype=np.int8)
        for part, args, (h, w), _ in self._parts(f, shifts):
            if part.start == 0:
                if out is None:
                    out = np.empty((len(f), h, w), dtype=np.uint16)
                elif (out.shape != (len(f), h, w) or out.dtype.itemsize != 2
                      or out.dtype.kind not in "iu" or not out.flags.c_contiguous):
                    raise ValueError(f"{self.name}: out must be a C-contiguous 16-bit array "
                                     f"of shape {(len(f), h, w)}, got {out.dtype} {out.shape}")
                flat = out.view(np.uint16).reshape(len(f), h * w)
            if len(f):
                self._run("intensity", *args, flat[part], status[part])
        self._check(status, f)
        return out.view(np.int16) if len(f) and self._signed(f) else out

    def _masks(self, masks: Any, f: np.ndarray, shape: tuple[int, int], stack: bool
               ) -> tuple[tuple[np.ndarray, ...], int]:
        """Normalise masks to (M, Z, H, W) and encode them for the kernels.

        Returns ``((plane, setid, set_ptr, set_idx), n_masks)``: the mask plane of
        each frame, the mask-set id of every (plane, pixel), and the masks of each set.
        """
        if isinstance(masks, (list, tuple)):
            m = np.stack([np.asarray(x) for x in masks]) if len(masks) else np.zeros((0, *shape))
            if m.ndim == 3:
                m = m[:, None]
        else:
            m = np.asarray(masks)
            if m.ndim == 2:
                m = m[None, None]
            elif m.ndim == 3:
                m = m[:, None] if stack else m[None]
            elif m.ndim != 4 or not stack:
                raise ValueError(f"masks must be 2-D or 3-D (or a stack of them), got shape "
                                 f"{m.shape}")
        if m.ndim != 4 or m.shape[-2:] != shape:
            raise ValueError(f"mask shape {m.shape[-2:]} does not match the frame shape {shape}")
        m = m.astype(bool, copy=False)
        n_masks, zm = m.shape[0], m.shape[1]
        plane = np.zeros(len(f), dtype=np.int64) if zm == 1 else self._frame_planes(f, zm)
        return (plane, *_mask_sets(m)), n_masks

    def sum_masks(self, masks: Any, frames: FrameSelection = None, shifts: Shifts = None
                  ) -> np.ndarray:
        """Photon counts inside each mask, per frame, reading each frame once.

        Parameters
        ----------
        masks
            A stack of masks with the mask axis first: ``(M, H, W)`` 2-D masks
            (applied to every frame) or ``(M, Z, H, W)`` 3-D masks (plane chosen by
            each frame's slice); a single ``(H, W)`` mask; or a list of 2-D or 3-D
            masks. Non-zero means inside.
        frames, shifts
            As in :meth:`read_frames`; masks apply to the registered frames.

        Returns
        -------
        numpy.ndarray
            ``int64`` of shape ``(M, F)``.

        """
        return self._sum_masks(masks, frames, shifts, stack=True)

    def sum_mask(self, mask: Any, frames: FrameSelection = None, shifts: Shifts = None
                 ) -> np.ndarray:
        """Photon counts inside one mask per frame, ``(F,)``.

        ``mask`` is ``(H, W)`` or a 3-D ``(Z, H, W)`` volume mask whose plane is
        chosen by each frame's slice.
        """
        return self._sum_masks(mask, frames, shifts, stack=False)[0]

    def _sum_masks(self, masks: Any, frames: FrameSelection, shifts: Shifts, stack: bool
                   ) -> np.ndarray:
        f = self._frames(frames)
        if len(f) and self._signed(f):  # the kernels read unsigned samples
            dense = self.read_frames(f, shifts)
            encoded, n_masks = self._masks(masks, f, dense.shape[1:], stack=stack)
            return _dense_set_sums(dense, *encoded, n_masks)
        status = np.zeros(len(f), dtype=np.int8)
        for part, args, shape, _ in self._parts(f, shifts):
            if part.start == 0:
                (plane, *sets), n_masks = self._masks(masks, f, shape, stack=stack)
                out = np.zeros((n_masks, len(f)), dtype=np.int64)
            if len(f):
                with _by_frame(out, part) as o:
                    self._run("sum_masks", *args, plane[part], *sets, o, status[part])
        self._check(status, f)
        return out

    # ------------------------------------------------------------------ FLIM

    def _n_bins(self, n_bins: int | None) -> int:
        if n_bins is not None:
            return int(n_bins)
        nb = self._default_n_bins()
        if nb is None or nb <= 0:
            raise SiffFormatError(self.name, "the header has no usable Tau_bins; pass "
                                  "n_bins= (or tau_bins= when opening)")
        return nb

    @property
    def n_tau_bins(self) -> int:
        """Arrival-time bins per laser period (``Tau_bins``, or the override given at open).

        Raises
        ------
        SiffFormatError
            If the header has no usable ``Tau_bins`` and none was given.

        """
        return self._n_bins(None)

    def _hist_mode(self, mode: str, n_bins: int | None) -> tuple[int, int]:
        """Kernel mode code and bin count for a histogram ``mode``."""
        modes = {"drop": K.MODE_DROP, "clip": K.MODE_CLIP, "wrap": K.MODE_WRAP,
                 "corrosiff": K.MODE_WRAP}
        if mode not in modes:
            raise ValueError(f"mode must be one of {sorted(modes)}, got {mode!r}")
        nb = self._n_bins(n_bins)
        if n_bins is None:
            nb = histogram_length(nb, mode)
        return modes[mode], nb

    def histograms(
        self,
        frames: FrameSelection = None,
        *,
        mode: HistogramMode = "drop",
        n_bins: int | None = None,
        return_overflow: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Arrival-time histogram of each frame.

        Parameters
        ----------
        frames
            File frame indices (default: all).
        mode
            Treatment of arrival times ``>= n_bins``: ``"drop"`` (default; not
            binned, counted in the overflow), ``"clip"`` (into the last bin, also
            counted), ``"wrap"`` (modulo ``n_bins``), or ``"corrosiff"``
            (``n_bins = Tau_bins + 2`` and modulo, bin for bin what corrosiffpy
            returns).
        n_bins
            Number of bins (default ``Tau_bins`` from the header).
        return_overflow
            Also return the per-frame count of arrival times ``>= n_bins``.

        Returns
        -------
        numpy.ndarray
            ``int64`` ``(F, n_bins)``; with ``return_overflow`` also ``(F,)``.

        """
        kmode, nb = self._hist_mode(mode, n_bins)
        f = self._frames(frames)
        out = np.zeros((len(f), nb), dtype=np.int64)
        overflow = np.zeros(len(f), dtype=np.int64)
        status = np.zeros(len(f), dtype=np.int8)
        for part, args, _, _ in self._parts(f, photons=True):
            if len(f):
                self._run("histograms", *args, kmode, out[part], overflow[part], status[part])
        self._check(status, f)
        return (out, overflow) if return_overflow else out

    def masks_histograms(
        self,
        masks: Any,
        frames: FrameSelection = None,
        shifts: Shifts = None,
        *,
        mode: HistogramMode = "drop",
        n_bins: int | None = None,
    ) -> np.ndarray:
        """Arrival-time histogram of the photons inside each mask, per frame.

        Parameters
        ----------
        masks, frames, shifts
            As in :meth:`sum_masks` (masks apply to the registered frames).
        mode, n_bins
            As in :meth:`histograms`.

        Returns
        -------
        numpy.ndarray
            ``int64`` ``(M, F, n_bins)``; each frame is decoded once for all masks.

        """
        kmode, nb = self._hist_mode(mode, n_bins)
        f = self._frames(frames)
        status = np.zeros(len(f), dtype=np.int8)
        for part, args, shape, _ in self._parts(f, shifts, photons=True):
            if part.start == 0:
                (plane, *sets), n_masks = self._masks(masks, f, shape, stack=True)
                out = np.zeros((n_masks, len(f), nb), dtype=np.int64)
            if len(f):
                with _by_frame(out, part) as o:
                    self._run("mask_histograms", *args, plane[part], *sets, kmode, o,
                              status[part])
        self._check(status, f)
        return out

    def _lut(self, harmonic: float, period_bins: int | None) -> tuple[np.ndarray, np.ndarray]:
        period = self._n_bins(period_bins)
        angle = 2 * np.pi * harmonic * np.arange(period) / period
        return np.cos(angle), np.sin(angle)

    def _to_units(self, bins: np.ndarray, units: str) -> np.ndarray:
        if units == "bins":
            return bins
        if units != "ns":
            raise ValueError(f"units must be 'ns' or 'bins', got {units!r}")
        ps = self._picoseconds_per_bin()
        if ps is None:
            raise SiffFormatError(self.name, "the header has no binResolution; pass "
                                  "bin_width_ps= when opening, or use units='bins'")
        bins *= ps / 1000.0
        return bins

    def _pixel_flim(self, frames: FrameSelection, shifts: Shifts, want: str, offset: float,
                    harmonic: float, period_bins: int | None, dtype: type,
                    counts: bool = False) -> tuple[np.ndarray | None, ...]:
        f = self._frames(frames)
        n = len(f)
        cos, sin = self._lut(harmonic, period_bins) if want == "phasor" else (np.ones(1),
                                                                             np.zeros(1))
        status = np.zeros(n, dtype=np.int8)
        for part, args, (h, w), _ in self._parts(f, shifts, photons=True):
            if part.start == 0:
                none = np.zeros((0, 0), dtype=dtype)
                mean = np.empty((n, h * w), dtype=dtype) if want == "mean" else none
                g = np.empty((n, h * w), dtype=dtype) if want == "phasor" else none
                s = np.empty((n, h * w), dtype=dtype) if want == "phasor" else none
                cnt = np.empty((n, h * w) if counts else (0, 0), dtype=np.int32)
            if n:
                self._run("pixel_flim", *args, cos, sin, float(offset),
                          *(a[part] if a.size else a for a in (mean, g, s, cnt)), status[part])
        self._check(status, f)
        shape = (n, h, w)
        return mean.reshape(shape) if want == "mean" else None, \
            g.reshape(shape) if want == "phasor" else None, \
            s.reshape(shape) if want == "phasor" else None, \
            cnt.reshape(shape) if counts else None

    def lifetime_images(
        self,
        frames: FrameSelection = None,
        shifts: Shifts = None,
        *,
        units: Literal["ns", "bins"] = "ns",
        offset_bins: float = 0.0,
        dtype: type = np.float64,
        return_intensity: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Per-pixel empirical lifetime: mean photon arrival time, NaN where empty.

        Parameters
        ----------
        frames, shifts
            As in :meth:`read_frames`.
        units
            ``"ns"`` (default) or ``"bins"``.
        offset_bins
            Subtracted from the mean arrival (e.g. the IRF offset), in bins.
        dtype
            ``float64`` (default) or ``float32``.
        return_intensity
            Also return the photon counts ``(F, H, W)`` ``int32``.

        """
        mean, _, _, cnt = self._pixel_flim(frames, shifts, "mean", offset_bins, 1.0, None, dtype,
                                           counts=return_intensity)
        mean = self._to_units(mean, units)
        return (mean, cnt) if return_intensity else mean

    def phasor_images(
        self,
        frames: FrameSelection = None,
        shifts: Shifts = None,
        *,
        harmonic: float = 1.0,
        period_bins: int | None = None,
        dtype: type = np.float64,
        return_intensity: bool = False,
    ) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-pixel phasor ``(g, s)``: mean of ``cos``/``sin`` of ``2 pi h tau / P``.

        ``P`` is ``period_bins`` (default ``Tau_bins``: one laser period). NaN
        where a pixel has no photon. No calibration is applied. With
        ``return_intensity``, also the photon counts ``(F, H, W)`` ``int32``.
        """
        _, g, s, cnt = self._pixel_flim(frames, shifts, "phasor", 0.0, harmonic, period_bins,
                                        dtype, counts=return_intensity)
        return (g, s, cnt) if return_intensity else (g, s)

    def masks_flim_sums(self, masks: Any, frames: FrameSelection = None, shifts: Shifts = None,
                        *, phasor: bool = False, harmonic: float = 1.0,
                        period_bins: int | None = None
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Photon count, arrival sum (bins) and phasor sums inside each mask, per frame.

        The raw sums every per-mask lifetime and phasor is made from; they add up
        across frames and files (a pooled lifetime is ``sum(arrival_sum) /
        sum(counts)``). Masks as in :meth:`sum_masks`.

        Returns
        -------
        counts, arrival_sum, cos_sum, sin_sum
            ``(M, F)`` arrays (``int64``, ``int64``, ``float64``, ``float64``); the
            phasor sums are empty ``(0, 0)`` arrays unless ``phasor`` is true.

        """
        f = self._frames(frames)
        n = len(f)
        cos, sin = self._lut(harmonic, period_bins) if phasor else (np.ones(1), np.zeros(1))
        status = np.zeros(n, dtype=np.int8)
        for part, args, shape, _ in self._parts(f, shifts, photons=True):
            if part.start == 0:
                (plane, *sets), n_masks = self._masks(masks, f, shape, stack=True)
                cnt = np.zeros((n_masks, n), dtype=np.int64)
                tsum = np.zeros((n_masks, n), dtype=np.int64)
                shp = (n_masks, n) if phasor else (0, 0)
                gsum, ssum = np.zeros(shp), np.zeros(shp)
            if n:
                with _by_frame(cnt, part) as c, _by_frame(tsum, part) as t, \
                        _by_frame(gsum, part) as g, _by_frame(ssum, part) as s:
                    self._run("mask_flim", *args, plane[part], *sets, cos, sin, c, t, g, s,
                              status[part])
        self._check(status, f)
        return cnt, tsum, gsum, ssum

    def sum_masks_flim(self, masks: Any, frames: FrameSelection = None, shifts: Shifts = None
                       ) -> tuple[np.ndarray, np.ndarray]:
        """Sum of arrival times (bins) and photon count inside each mask, per frame.

        The empirical lifetime of mask ``m`` in frame ``i`` is
        ``arrival_sum[m, i] / counts[m, i]`` bins. Masks as in :meth:`sum_masks`.

        Returns
        -------
        arrival_sum, counts
            ``int64`` arrays of shape ``(M, F)``.

        """
        cnt, tsum, _, _ = self.masks_flim_sums(masks, frames, shifts)
        return tsum, cnt

    def masks_phasor(self, masks: Any, frames: FrameSelection = None, shifts: Shifts = None,
                     *, harmonic: float = 1.0, period_bins: int | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Phasor ``(g, s)`` of the photons inside each mask, and their count, ``(M, F)``."""
        cnt, _, gsum, ssum = self.masks_flim_sums(masks, frames, shifts, phasor=True,
                                                  harmonic=harmonic, period_bins=period_bins)
        with np.errstate(invalid="ignore", divide="ignore"):
            return gsum / cnt, ssum / cnt, cnt

    # ------------------------------------------------------------------ photons

    def photons_batch(self, frames: FrameSelection = None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Photons of several frames, each frame's photons sorted by pixel.

        Returns
        -------
        starts
            ``int64`` ``(F + 1,)``: frame ``i``'s photons are ``starts[i]:starts[i+1]``.
        pixel_index
            ``uint32``: ``y * W + x`` of each photon.
        arrival
            ``uint32``: arrival-time bin of each photon.

        """
        f = self._frames(frames)
        starts = np.zeros(len(f) + 1, dtype=np.int64)
        np.cumsum(self._n_photons(f), out=starts[1:])
        pix = np.empty(int(starts[-1]), dtype=np.uint32)
        tau = np.empty(int(starts[-1]), dtype=np.uint32)
        status = np.zeros(len(f), dtype=np.int8)
        for part, args, _, maxn in self._parts(f, photons=True):
            if len(f):  # starts are absolute: each part writes its frames' photons in place
                self._run("photons", *args, maxn, starts[part.start : part.stop + 1], pix, tau,
                          status[part])
        self._check(status, f)
        return starts, pix, tau

    def decode_into(self, frames: FrameSelection, rows: np.ndarray, images: np.ndarray,
                    counts: np.ndarray, histograms: np.ndarray, arrivals: np.ndarray
                    ) -> int:
        """Decode frames once into the buffers a converted store is written from.

        Parameters
        ----------
        frames
            File frame indices.
        rows
            For each frame, its row in ``images``, ``counts`` and ``histograms`` (so
            frames land straight where they are stored, in any order).
        images
            ``(R, H, W)`` uint16 (C-contiguous): each frame's count image.
        counts
            ``(R,)``: each frame's photon count.
        histograms
            ``(R, bins)``: each frame's arrival histogram is added (times ``>= bins``
            are left out); an array with no rows skips histograms.
        arrivals
            Every frame's arrival times, sorted by pixel within a frame, in frame
            order (the frames' photon counts, concatenated), in this array's dtype.

        Returns
        -------
        int
            The largest arrival time (0 without photons), so a caller storing them
            in uint16 can tell when they do not fit.

        Raises
        ------
        SiffFormatError
            On a damaged frame, or a pixel with more than 65535 photons in one frame
            (its count image would saturate, so the photons could not be located).

        """
        f = self._frames(frames)
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        if rows.shape != f.shape or (f.size and (rows.min() < 0 or rows.max() >= len(images))):
            raise ValueError(f"{self.name}: need one row in [0, {len(images)}) per frame")
        starts = np.zeros(len(f) + 1, dtype=np.int64)
        np.cumsum(self._n_photons(f), out=starts[1:])
        if arrivals.shape != (int(starts[-1]),):
            raise ValueError(f"{self.name}: the frames hold {int(starts[-1])} photons, "
                             f"arrivals has shape {arrivals.shape}")
        status = np.zeros(len(f), dtype=np.int8)
        tmax = np.zeros(len(f), dtype=np.int64)
        for part, args, (h, w), _ in self._parts(f):  # TIFF pages too: their image is all
            if images.shape[1:] != (h, w) or not images.flags.c_contiguous:
                raise ValueError(f"{self.name}: images must be C-contiguous (R, {h}, {w})")
            if len(f):
                self._run("store_frames", *args, rows[part], starts[part.start : part.stop + 1],
                          images.reshape(len(images), h * w), counts, arrivals, histograms,
                          tmax[part], status[part])
        sat = np.flatnonzero(status == K.ST_SATURATED)
        if sat.size:
            raise SiffFormatError(self.name, "a pixel holds more than 65535 photons in one "
                                  "frame; its uint16 count image cannot locate them", None,
                                  int(f[sat[0]]))
        self._check(status, f)
        return int(tmax.max()) if tmax.size else 0

    def photons(self, frame: int) -> tuple[np.ndarray, np.ndarray]:
        """``(pixel_index, arrival)`` of one frame's photons, sorted by pixel (``uint32``)."""
        _, pix, tau = self.photons_batch([frame])
        return pix, tau


@contextlib.contextmanager
def _by_frame(out: np.ndarray, part: slice) -> Iterator[np.ndarray]:
    """``out[:, part]`` (frames on axis 1) as a C-contiguous array for a kernel.

    The whole of ``out`` when ``part`` covers it (or it is an empty placeholder);
    otherwise a zeroed array whose values are copied into ``out`` afterwards.
    """
    if out.size == 0 or (part.start == 0 and part.stop == out.shape[1]):
        yield out
        return
    tmp = np.zeros((out.shape[0], part.stop - part.start, *out.shape[2:]), dtype=out.dtype)
    yield tmp
    out[:, part] = tmp


def shifts_for_frames(shifts: Mapping[int, tuple[int, int]], frames: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Look up ``{frame: (dy, dx)}`` for many frames at once (no Python loop per frame).

    Returns ``(shifts (F, 2) int64, found (F,) bool)``; missing frames get ``(0, 0)``.
    """
    f = np.asarray(frames, dtype=np.int64).reshape(-1)
    out = np.zeros((f.size, 2), dtype=np.int64)
    if not len(shifts):
        return out, np.zeros(f.size, dtype=bool)
    keys = np.fromiter(shifts.keys(), dtype=np.int64, count=len(shifts))
    vals = np.asarray(list(shifts.values()), dtype=np.int64).reshape(-1, 2)
    order = np.argsort(keys, kind="stable")
    keys, vals = keys[order], vals[order]
    pos = np.minimum(np.searchsorted(keys, f), keys.size - 1)
    found = keys[pos] == f
    out[found] = vals[pos[found]]
    return out, found


def _mask_sets(m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Encode boolean masks ``(M, Z, H, W)`` as mask sets for the kernels.

    Every (plane, pixel) gets the id of the combination of masks containing it
    (``setid``, length ``Z*H*W``); set ``s`` holds masks
    ``set_idx[set_ptr[s]:set_ptr[s+1]]``. ``setid`` is ``uint16`` whenever the
    sets allow it (almost always): a quarter of the cache footprint of ``int64``
    makes mask sums of sparse frames about 20 % faster.
    """
    n_masks = m.shape[0]
    n_px = int(np.prod(m.shape[1:]))
    if n_masks == 0:
        return np.zeros(n_px, np.uint16), np.zeros(2, np.int64), np.zeros(0, np.int64)
    flat = np.ascontiguousarray(m.reshape(n_masks, n_px).T)
    packed = np.ascontiguousarray(np.packbits(flat, axis=1))
    keys = packed.view(np.dtype((np.void, packed.shape[1]))).ravel()
    uniq, setid = np.unique(keys, return_inverse=True)
    members = np.unpackbits(uniq.view(np.uint8).reshape(len(uniq), -1), axis=1,
                            count=n_masks).astype(bool)
    rows, cols = np.nonzero(members)
    set_ptr = np.zeros(len(uniq) + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=len(uniq)), out=set_ptr[1:])
    id_type = np.uint16 if len(uniq) <= 1 << 16 else np.uint32
    return setid.reshape(-1).astype(id_type), set_ptr, cols.astype(np.int64)


def _dense_set_sums(frames: np.ndarray, plane: np.ndarray, setid: np.ndarray,
                    set_ptr: np.ndarray, set_idx: np.ndarray, n_masks: int) -> np.ndarray:
    """Mask sums ``(M, F)`` of dense (e.g. signed) frames ``(F, H, W)``, vectorised.

    Pixels are summed per mask-set (as the kernels do), then sets per mask.
    """
    n, hw = frames.shape[0], frames.shape[1] * frames.shape[2]
    n_sets = set_ptr.size - 1
    ids = setid[plane[:, None] * hw + np.arange(hw)[None, :]]
    key = (np.arange(n)[:, None] * n_sets + ids).ravel()
    per_set = np.bincount(key, weights=frames.reshape(n, hw).ravel().astype(np.float64),
                          minlength=n * n_sets).reshape(n, n_sets)
    member = np.zeros((n_sets, n_masks))
    member[np.repeat(np.arange(n_sets), np.diff(set_ptr)), set_idx] = 1.0
    return np.rint(per_set @ member).T.astype(np.int64)
