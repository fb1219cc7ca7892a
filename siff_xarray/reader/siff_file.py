"""``SiffFile``: the low-level reader of ``.siff`` and ScanImage TIFF files.

It ties the pieces together: a byte source (memory map or byte ranges), the
header, the frame index, the parsed metadata, :class:`ImParams`, and the Numba
kernels. Every data method takes a list of file frame indices (IFD order,
flyback included, negative indices count from the end) and returns numpy arrays
in request order.

Arrival-time conventions (see ``docs/format.md``):

* arrival times are integer bins; the bin width is ``picoseconds_per_bin``;
* ``histograms`` have ``Tau_bins`` bins by default; an arrival time
  ``>= Tau_bins`` is dropped (``mode="drop"``, counted in the overflow),
  clipped into the last bin (``"clip"``), or handled as corrosiff does
  (``"corrosiff"``: ``Tau_bins + 2`` bins, arrival modulo that length);
* mean arrival times (empirical lifetimes) use every photon's raw bin;
* phasors use ``exp(2*pi*i*h*tau/P)`` with ``P = Tau_bins`` (one laser period)
  unless ``period_bins`` is given.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np

from ..errors import SiffFormatError, SiffWarning
from . import kernels as K
from .frame_meta import FrameTimestamps, parse_description, parse_timestamps
from .header import FileHeader, read_header
from .ifd import ENC_TIFF, ENCODING_NAMES, FrameIndex, build_frame_index
from .imparams import MULTIHARP_BASE_RESOLUTION_PS, ImParams
from .index_cache import default_cache_dir, load_index, save_index
from .metadata import RoiGroup, ScanImageMetadata, parse_nvfd, parse_roi_groups
from .source import ByteSource, FsspecSource, LocalSource, open_source

__all__ = ["SiffFile"]

FrameSelection = Sequence[int] | np.ndarray | slice | int | None
Shifts = Mapping[int, tuple[int, int]] | np.ndarray | None
HistogramMode = Literal["drop", "clip", "corrosiff", "wrap"]
_DESC_CHUNK = 2048  # frames whose descriptions are parsed between page releases


class SiffFile:
    """A ScanImage-FLIM ``.siff`` (or ScanImage ``.tif``) file, open for reading.

    Parameters
    ----------
    path_or_fileobj
        Local path, fsspec URL, or an open binary file object.
    storage_options
        fsspec options for URLs.
    tau_bins
        Override the number of arrival-time bins per laser period (``Tau_bins``).
    bin_width_ps
        Override the arrival-time bin width in picoseconds.
    base_resolution_ps
        TCSPC base resolution used with ``binResolution`` (5 ps for MultiHarp with
        MHLib >= 3, 20 ps before; the file does not record which).
    index_cache
        Keep the frame index and timestamps in a persistent cache so the next open
        skips the IFD walk (see :mod:`siff_xarray.reader.index_cache`). ``None``
        (default): for files opened by path or URL, in the default directory (not
        for file objects); ``True``: always; a path: always, in that directory;
        ``False``: never.

    Examples
    --------
    >>> with SiffFile("run.siff") as f:                     # doctest: +SKIP
    ...     frames = f.read_frames(f.im_params.flatten_by_timepoints())

    """

    def __init__(
        self,
        path_or_fileobj: str | os.PathLike[str] | IO[bytes] | ByteSource,
        *,
        storage_options: dict[str, Any] | None = None,
        tau_bins: int | None = None,
        bin_width_ps: float | None = None,
        base_resolution_ps: float = MULTIHARP_BASE_RESOLUTION_PS,
        index_cache: bool | str | os.PathLike[str] | None = None,
    ) -> None:
        self._open_args = (path_or_fileobj, storage_options, tau_bins, bin_width_ps,
                           base_resolution_ps, index_cache)
        self._source = open_source(path_or_fileobj, storage_options)
        self._all_timestamps: FrameTimestamps | None = None
        try:
            self.header: FileHeader = read_header(self._source)
            self.index: FrameIndex = self._load_index(index_cache)
            self.metadata: ScanImageMetadata = parse_nvfd(self.header.nvfd_text)
            self.roi_groups: dict[str, RoiGroup] = parse_roi_groups(self.header.roi_text,
                                                                     self._source.name)
        except BaseException:
            self._source.close()
            raise
        self._tau_bins = tau_bins
        self._bin_width_ps = bin_width_ps
        self._base_resolution_ps = base_resolution_ps

    def _load_index(self, index_cache: bool | str | os.PathLike[str] | None) -> FrameIndex:
        if index_cache is None:
            index_cache = isinstance(self._source, (FsspecSource, LocalSource))
        if index_cache is False:
            return build_frame_index(self._source, self.header)
        directory = default_cache_dir() if index_cache is True else Path(index_cache)
        key, index, ts = load_index(directory, self._source, self.header)
        if index is None:
            index = build_frame_index(self._source, self.header)
            self.index = index
            ts = self._parse_timestamps(np.arange(len(index), dtype=np.int64))
            save_index(directory, key, index, ts)
        self._all_timestamps = ts
        return index

    # ------------------------------------------------------------------ basics

    @property
    def name(self) -> str:
        """The file's path, URL or file-object name (used in error messages)."""
        return self._source.name

    @property
    def num_frames(self) -> int:
        """Number of frames (IFDs), flyback frames included."""
        return len(self.index)

    @property
    def frame_shape(self) -> tuple[int, int]:
        """``(height, width)`` shared by all frames.

        Raises
        ------
        ValueError
            If frames of different shapes are stored (then ask per frame via ``index``).

        """
        if self.num_frames == 0:
            raise ValueError(f"{self.name}: the file holds no frames")
        h, w = self.index.height, self.index.width
        if (h != h[0]).any() or (w != w[0]).any():
            raise SiffFormatError(self.name, "frames have different shapes; request frames "
                                  "of one shape at a time")
        return int(h[0]), int(w[0])

    @property
    def frame_encodings(self) -> np.ndarray:
        """Encoding of each frame: ``"raw"``, ``"compressed"`` or ``"tiff"``."""
        names = np.array([ENCODING_NAMES[k] for k in sorted(ENCODING_NAMES)])
        return names[self.index.encoding]

    @property
    def has_photons(self) -> bool:
        """True if any frame stores photons (``.siff``); False for intensity-only TIFFs."""
        return bool((self.index.encoding != ENC_TIFF).any())

    @cached_property
    def im_params(self) -> ImParams:
        """Frame bookkeeping (channels, slices, flyback, frame lists)."""
        shape = None
        if self.num_frames:
            try:
                shape = self.frame_shape
            except ValueError:
                shape = (int(self.index.height[0]), int(self.index.width[0]))
        return ImParams(self.metadata, self.num_frames, shape, self.roi_groups,
                        tau_bins=self._tau_bins, bin_width_ps=self._bin_width_ps,
                        base_resolution_ps=self._base_resolution_ps, name=self.name)

    def release(self) -> None:
        """Drop the memory map's pages read so far from this process's RSS.

        Pages of a memory-mapped file count in the resident set size once touched;
        long streaming jobs (the Zarr converter) call this between batches so their
        RSS stays bounded. Data are re-read from the page cache when needed. No-op
        for remote files and file objects.
        """
        self._source.release()

    def close(self) -> None:
        """Release the file (arrays returned earlier stay valid: they are copies)."""
        self._source.close()

    def __enter__(self) -> SiffFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<SiffFile {self.name!r}: {self.num_frames} frames>"

    def __reduce__(self):
        path = self._open_args[0]
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError("a SiffFile opened from a file object cannot be pickled")
        return (_reopen, self._open_args)

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

    def _shape_of(self, f: np.ndarray) -> tuple[int, int]:
        if f.size == 0:
            return self.frame_shape if self.num_frames else (0, 0)
        h, w = self.index.height[f], self.index.width[f]
        if (h != h[0]).any() or (w != w[0]).any():
            raise SiffFormatError(self.name, "the requested frames have different shapes")
        return int(h[0]), int(w[0])

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

    def _gather(self, f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Buffer and strip offsets (in that buffer) for frames ``f``."""
        idx = self.index
        buf = self._source.buffer()
        if buf is not None:
            return buf, idx.strip_offset[f]
        start, stop = idx.data_start[f], idx.data_stop[f]
        stop = np.where(idx.encoding[f] == ENC_TIFF,
                        idx.strip_offset[f] + 2 * idx.height[f] * idx.width[f], stop)
        gathered, base = self._source.read_ranges(start, stop)
        return gathered, base + (idx.strip_offset[f] - start)

    def _frame_args(self, f: np.ndarray, shifts: Shifts = None, photons: bool = False
                    ) -> tuple[tuple, tuple[int, int], int]:
        """Arguments common to all kernels (buffer + 7 per-frame arrays)."""
        shape = self._shape_of(f)
        if photons:
            tiff = f[self.index.encoding[f] == ENC_TIFF]
            if tiff.size:
                raise SiffFormatError(self.name, "frame is a plain TIFF page without photon "
                                      "arrival times", frame=int(tiff[0]))
        sy, sx = self._shifts(shifts, f, shape)
        buf, off = self._gather(f)
        idx = self.index
        args = (buf, idx.encoding[f].astype(np.int64), off, idx.strip_bytes[f],
                idx.height[f], idx.width[f], sy, sx)
        maxn = int(idx.n_photons[f].max()) if f.size else 0
        return args, shape, max(maxn, 1)

    def _check(self, status: np.ndarray, f: np.ndarray) -> None:
        bad = np.flatnonzero((status != K.ST_OK) & (status != K.ST_SATURATED))
        if bad.size:
            i = int(bad[0])
            frame, code = int(f[i]), int(status[i])
            what = {
                K.ST_BAD_PIXEL: "a photon's pixel coordinates lie outside the frame",
                K.ST_MISMATCH: "the count image is inconsistent with the photon block "
                               f"({int(self.index.strip_bytes[frame])} bytes)",
                K.ST_OUT_OF_BOUNDS: "frame data lies outside the file",
            }.get(code, f"decoder status {code}")
            raise SiffFormatError(self.name, what, int(self.index.strip_offset[frame]), frame)
        sat = np.flatnonzero(status == K.ST_SATURATED)
        if sat.size:
            warnings.warn(f"{self.name}: {sat.size} frame(s) have pixels with more than 65535 "
                          f"photons (first: frame {int(f[sat[0]])}); uint16 values saturate",
                          SiffWarning, stacklevel=3)

    # ------------------------------------------------------------------ intensity

    def read_frames(self, frames: FrameSelection = None, shifts: Shifts = None) -> np.ndarray:
        """Photon-count (intensity) images.

        Parameters
        ----------
        frames
            File frame indices (default: all frames, flyback included).
        shifts
            Registration: mapping ``frame -> (dy, dx)`` covering every requested
            frame, or an integer array of shape ``(F, 2)``. Each frame is returned
            as ``numpy.roll(frame, (dy, dx), axis=(0, 1))``, for any sign and size.

        Returns
        -------
        numpy.ndarray
            ``uint16`` of shape ``(F, H, W)`` (``int16`` for TIFF files storing
            signed samples).

        """
        f = self._frames(frames)
        args, (h, w), _ = self._frame_args(f, shifts)
        out = np.empty((len(f), h, w), dtype=np.uint16)
        status = np.zeros(len(f), dtype=np.int8)
        if len(f):
            K.run("intensity", *args, out.reshape(len(f), h * w), status)
        self._check(status, f)
        if len(f) and (self.index.encoding[f] == ENC_TIFF).all() and self.index.signed[f].all():
            return out.view(np.int16)
        return out

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
        if zm == 1:
            plane = np.zeros(len(f), dtype=np.int64)
        else:
            ip = self.im_params
            if zm != ip.num_slices:
                raise ValueError(f"3-D masks have {zm} planes but the file has "
                                 f"{ip.num_slices} slices")
            pos = ip.locate(f)
            if pos["flyback"].any():
                bad = int(f[np.flatnonzero(pos["flyback"])[0]])
                raise ValueError(f"frame {bad} is a flyback frame: it has no z plane for a "
                                 "3-D mask")
            plane = pos["slice"].astype(np.int64)
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
        f = self._frames(frames)
        args, shape, _ = self._frame_args(f, shifts)
        encoded, n_masks = self._masks(masks, f, shape, stack=True)
        out = np.zeros((n_masks, len(f)), dtype=np.int64)
        status = np.zeros(len(f), dtype=np.int8)
        if len(f):
            K.run("sum_masks", *args, *encoded, out, status)
        self._check(status, f)
        return out

    def sum_mask(self, mask: Any, frames: FrameSelection = None, shifts: Shifts = None
                 ) -> np.ndarray:
        """Photon counts inside one mask per frame, ``(F,)``.

        ``mask`` is ``(H, W)`` or a 3-D ``(Z, H, W)`` volume mask whose plane is
        chosen by each frame's slice.
        """
        f = self._frames(frames)
        args, shape, _ = self._frame_args(f, shifts)
        encoded, _ = self._masks(mask, f, shape, stack=False)
        out = np.zeros((1, len(f)), dtype=np.int64)
        status = np.zeros(len(f), dtype=np.int8)
        if len(f):
            K.run("sum_masks", *args, *encoded, out, status)
        self._check(status, f)
        return out[0]

    # ------------------------------------------------------------------ FLIM

    def _n_bins(self, n_bins: int | None) -> int:
        if n_bins is not None:
            return int(n_bins)
        nb = self.im_params.num_bins
        if nb is None or nb <= 0:
            raise SiffFormatError(self.name, "the header has no usable Tau_bins; pass "
                                  "n_bins= (or tau_bins= when opening)")
        return nb

    def _hist_mode(self, mode: str, n_bins: int | None) -> tuple[int, int]:
        """Kernel mode code and bin count for a histogram ``mode``."""
        modes = {"drop": K.MODE_DROP, "clip": K.MODE_CLIP, "wrap": K.MODE_WRAP,
                 "corrosiff": K.MODE_WRAP}
        if mode not in modes:
            raise ValueError(f"mode must be one of {sorted(modes)}, got {mode!r}")
        nb = self._n_bins(n_bins)
        if mode == "corrosiff" and n_bins is None:
            nb += 2
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
        args, _, _ = self._frame_args(f, photons=True)
        out = np.zeros((len(f), nb), dtype=np.int64)
        overflow = np.zeros(len(f), dtype=np.int64)
        status = np.zeros(len(f), dtype=np.int8)
        if len(f):
            K.run("histograms", *args, kmode, out, overflow, status)
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
        args, shape, _ = self._frame_args(f, shifts, photons=True)
        encoded, n_masks = self._masks(masks, f, shape, stack=True)
        out = np.zeros((n_masks, len(f), nb), dtype=np.int64)
        status = np.zeros(len(f), dtype=np.int8)
        if len(f):
            K.run("mask_histograms", *args, *encoded, kmode, out, status)
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
        ps = self.im_params.picoseconds_per_bin
        if ps is None:
            raise SiffFormatError(self.name, "the header has no binResolution; pass "
                                  "bin_width_ps= when opening, or use units='bins'")
        bins *= ps / 1000.0
        return bins

    def _pixel_flim(self, frames: FrameSelection, shifts: Shifts, want: str, offset: float,
                    harmonic: float, period_bins: int | None, dtype: type,
                    counts: bool = False) -> tuple[np.ndarray | None, ...]:
        f = self._frames(frames)
        args, (h, w), _ = self._frame_args(f, shifts, photons=True)
        n = len(f)
        none = np.zeros((0, 0), dtype=dtype)
        mean = np.empty((n, h * w), dtype=dtype) if want == "mean" else none
        g = np.empty((n, h * w), dtype=dtype) if want == "phasor" else none
        s = np.empty((n, h * w), dtype=dtype) if want == "phasor" else none
        cnt = np.empty((n, h * w) if counts else (0, 0), dtype=np.int32)
        cos, sin = self._lut(harmonic, period_bins) if want == "phasor" else (np.ones(1),
                                                                             np.zeros(1))
        status = np.zeros(n, dtype=np.int8)
        if n:
            K.run("pixel_flim", *args, cos, sin, float(offset), mean, g, s, cnt, status)
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
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per-pixel phasor ``(g, s)``: mean of ``cos``/``sin`` of ``2 pi h tau / P``.

        ``P`` is ``period_bins`` (default ``Tau_bins``: one laser period). NaN
        where a pixel has no photon. No calibration is applied.
        """
        _, g, s, _ = self._pixel_flim(frames, shifts, "phasor", 0.0, harmonic, period_bins,
                                      dtype)
        return g, s

    def _mask_flim(self, masks: Any, frames: FrameSelection, shifts: Shifts, phasor: bool,
                   harmonic: float, period_bins: int | None) -> tuple[np.ndarray, ...]:
        f = self._frames(frames)
        args, shape, _ = self._frame_args(f, shifts, photons=True)
        encoded, n_masks = self._masks(masks, f, shape, stack=True)
        n = len(f)
        cnt = np.zeros((n_masks, n), dtype=np.int64)
        tsum = np.zeros((n_masks, n), dtype=np.int64)
        shp = (n_masks, n) if phasor else (0, 0)
        gsum, ssum = np.zeros(shp), np.zeros(shp)
        cos, sin = self._lut(harmonic, period_bins) if phasor else (np.ones(1), np.zeros(1))
        status = np.zeros(n, dtype=np.int8)
        if n:
            K.run("mask_flim", *args, *encoded, cos, sin, cnt, tsum, gsum, ssum, status)
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
        cnt, tsum, _, _ = self._mask_flim(masks, frames, shifts, False, 1.0, None)
        return tsum, cnt

    def masks_phasor(self, masks: Any, frames: FrameSelection = None, shifts: Shifts = None,
                     *, harmonic: float = 1.0, period_bins: int | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Phasor ``(g, s)`` of the photons inside each mask, and their count, ``(M, F)``."""
        cnt, _, gsum, ssum = self._mask_flim(masks, frames, shifts, True, harmonic, period_bins)
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
        args, _, maxn = self._frame_args(f, photons=True)
        starts = np.zeros(len(f) + 1, dtype=np.int64)
        np.cumsum(self.index.n_photons[f], out=starts[1:])
        pix = np.empty(int(starts[-1]), dtype=np.uint32)
        tau = np.empty(int(starts[-1]), dtype=np.uint32)
        status = np.zeros(len(f), dtype=np.int8)
        if len(f):
            K.run("photons", *args, maxn, starts, pix, tau, status)
        self._check(status, f)
        return starts, pix, tau

    def photons(self, frame: int) -> tuple[np.ndarray, np.ndarray]:
        """``(pixel_index, arrival)`` of one frame's photons, sorted by pixel (``uint32``)."""
        _, pix, tau = self.photons_batch([frame])
        return pix, tau

    # ------------------------------------------------------------------ metadata per frame

    def _descriptions(self, f: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        idx = self.index
        buf = self._source.buffer()
        off, ln = idx.desc_offset[f], idx.desc_length[f]
        if buf is not None:
            return buf, off, ln
        gathered, base = self._source.read_ranges(off, off + ln)
        return gathered, base, ln

    def _parse_timestamps(self, f: np.ndarray) -> FrameTimestamps:
        if not self.is_local or len(f) <= _DESC_CHUNK:
            buf, off, ln = self._descriptions(f)
            return parse_timestamps(buf, off, ln, f, self.name)
        # one description per frame maps ~64 KiB of the file each (fault-around): parse
        # in chunks and drop the pages in between so the RSS does not grow with the file
        parts = []
        for a in range(0, len(f), _DESC_CHUNK):
            sub = f[a : a + _DESC_CHUNK]
            buf, off, ln = self._descriptions(sub)
            parts.append(parse_timestamps(buf, off, ln, sub, self.name))
            self._source.release()
        return FrameTimestamps(f, np.concatenate([p.experiment_s for p in parts]),
                               np.concatenate([p.epoch_laser_ns for p in parts]),
                               np.concatenate([p.epoch_system_ns for p in parts]),
                               [e for p in parts for e in p.events])

    def timestamps(self, frames: FrameSelection = None) -> FrameTimestamps:
        """Experiment time (s), laser and system epochs (int64 ns) and events of frames."""
        f = self._frames(frames)
        ts = self._all_timestamps
        if ts is None:
            return self._parse_timestamps(f)
        rank = np.full(self.num_frames, -1, dtype=np.int64)
        rank[f[::-1]] = np.arange(len(f))[::-1]  # first position of each frame in f
        events = sorted((e for e in ts.events if rank[e.frame] >= 0),
                        key=lambda e: rank[e.frame])
        return FrameTimestamps(f, ts.experiment_s[f], ts.epoch_laser_ns[f],
                               ts.epoch_system_ns[f], events)

    def events(self) -> list:
        """All appended-text events in the file (frame, text, experiment time)."""
        return self.timestamps().events

    def description_bytes(self) -> tuple[np.ndarray, np.ndarray]:
        """Every frame's raw description bytes, concatenated, and their lengths (int64).

        Read in chunks of frames, releasing mapped pages in between (see
        :meth:`release`), so the RSS does not grow with the file.
        """
        parts, lens = [], []
        for a in range(0, self.num_frames, _DESC_CHUNK):
            buf, off, ln = self._descriptions(np.arange(a, min(a + _DESC_CHUNK,
                                                                self.num_frames)))
            ln = np.asarray(ln, dtype=np.int64)
            first = np.concatenate([[0], np.cumsum(ln)[:-1]]).astype(np.int64)
            idx = np.arange(int(ln.sum()), dtype=np.int64) + np.repeat(
                np.asarray(off) - first, ln)
            parts.append(np.asarray(buf)[idx].copy())
            lens.append(ln)
            self.release()
        if not parts:
            return np.zeros(0, np.uint8), np.zeros(0, np.int64)
        return np.concatenate(parts), np.concatenate(lens)

    def frame_descriptions(self, frames: FrameSelection = None) -> list[str]:
        """Raw description text of each frame (UTF-8, undecodable bytes replaced)."""
        f = self._frames(frames)
        buf, off, ln = self._descriptions(f)
        return [bytes(buf[o : o + n]).decode("utf-8", errors="replace").rstrip("\x00")
                for o, n in zip(off.tolist(), ln.tolist(), strict=True)]

    def frame_metadata(self, frames: FrameSelection = None) -> list[dict[str, object]]:
        """Return the parsed description of each frame (known numeric values converted)."""
        return [parse_description(t) for t in self.frame_descriptions(frames)]

    @property
    def is_local(self) -> bool:
        """True when the file is memory-mapped from local disk."""
        return isinstance(self._source, LocalSource)


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
    ``set_idx[set_ptr[s]:set_ptr[s+1]]``.
    """
    n_masks = m.shape[0]
    n_px = int(np.prod(m.shape[1:]))
    if n_masks == 0:
        return np.zeros(n_px, np.int64), np.zeros(2, np.int64), np.zeros(0, np.int64)
    flat = np.ascontiguousarray(m.reshape(n_masks, n_px).T)
    packed = np.ascontiguousarray(np.packbits(flat, axis=1))
    keys = packed.view(np.dtype((np.void, packed.shape[1]))).ravel()
    uniq, setid = np.unique(keys, return_inverse=True)
    members = np.unpackbits(uniq.view(np.uint8).reshape(len(uniq), -1), axis=1,
                            count=n_masks).astype(bool)
    rows, cols = np.nonzero(members)
    set_ptr = np.zeros(len(uniq) + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=len(uniq)), out=set_ptr[1:])
    return setid.reshape(-1).astype(np.int64), set_ptr, cols.astype(np.int64)


def _reopen(path: Any, storage_options: Any, tau_bins: Any, bin_width_ps: Any,
            base_resolution_ps: Any, index_cache: Any = None) -> SiffFile:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SiffWarning)
        return SiffFile(path, storage_options=storage_options, tau_bins=tau_bins,
                        bin_width_ps=bin_width_ps, base_resolution_ps=base_resolution_ps,
                        index_cache=index_cache)
