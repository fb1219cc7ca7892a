"""The ``ds.siff`` accessor: analysis on Datasets from ``engine="siff"`` or converted stores.

So far: rigid motion registration (:meth:`SiffAccessor.register`, native FFT
method), lazy application of shifts (:meth:`SiffAccessor.apply_shifts`), and ROI
sums (:meth:`SiffAccessor.sum_mask`, :meth:`SiffAccessor.sum_masks`), which on a
Dataset opened from a ``.siff`` decode each frame once for all masks in the reader's
Numba kernel, and otherwise reduce ``intensity`` with xarray (lazily under Dask).
Shift convention: the registered frame is
``numpy.roll(raw, (shift_y, shift_x), axis=(-2, -1))``, for any sign.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import numpy as np
import xarray as xr

__all__ = ["SiffAccessor", "calibrate_phasor"]

SHIFT_CONVENTION = "registered = numpy.roll(raw, (shift_y, shift_x), axis=(y, x))"


@xr.register_dataset_accessor("siff")
class SiffAccessor:
    """ScanImage-FLIM analysis on a Dataset with the siff-xarray layout."""

    def __init__(self, ds: xr.Dataset) -> None:
        self._ds = ds

    def _frame_dims(self) -> list[str]:
        dims = [d for d in self._ds.intensity.dims if d not in ("channel", "y", "x")]
        return dims  # time, z, [repeat]

    def register(
        self,
        channel: int | None = None,
        method: Literal["phase", "suite2p"] = "phase",
        reference: xr.DataArray | np.ndarray | None = None,
        *,
        max_shift: int | None = None,
        n_iter: int = 3,
        n_reference_frames: int = 300,
        smooth_sigma: float = 2.0,
        whiten: float = 0.0,
        regularize_sigma: float = 0.0,
        batch_frames: int = 512,
        device: Any = None,
        suite2p_settings: dict[str, Any] | None = None,
    ) -> xr.Dataset:
        """Estimate rigid shifts of every frame, plane by plane.

        Parameters
        ----------
        channel
            ScanImage channel number (a ``channel`` coordinate value) to align on;
            default: the first channel. The shifts apply to all channels.
        method
            ``"phase"``: FFT correlation against an iteratively refined reference
            per plane (:mod:`siff_xarray.registration`; numpy only).
            ``"suite2p"``: suite2p 1.x's rigid registration and reference
            (:mod:`siff_xarray.registration_suite2p`; needs the ``suite2p`` extra).
        reference
            ``(z, y, x)`` reference images to align to, instead of building them.
        max_shift
            Largest shift searched (pixels; default a quarter of the frame for
            ``"phase"``, suite2p's ``maxregshift`` for ``"suite2p"``).
        n_iter, n_reference_frames
            Reference refinement iterations (``"phase"``), and how many frames
            (evenly spaced in time) build the reference.
        smooth_sigma, whiten
            ``"phase"``: correlation smoothing (pixels) and spectral whitening (0 =
            plain cross-correlation, 1 = phase correlation).
        regularize_sigma
            ``"phase"``: pool the correlation of neighbouring planes of the same
            volume with Gaussian weights of this width (in planes) before taking
            each plane's peak (:func:`~siff_xarray.registration.regularize_planes`);
            0 (default) registers planes independently.
        batch_frames
            Frames decoded and registered at a time when the Dataset is not
            chunked (bounds memory). A Dask-backed Dataset is registered chunk by
            chunk in parallel, and the shifts stay lazy.
        device, suite2p_settings
            ``"suite2p"``: torch device (default CUDA if available, else CPU) and
            overrides of suite2p's registration settings.

        Returns
        -------
        xarray.Dataset
            ``shift_y``, ``shift_x`` (int64) and ``quality`` (correlation peak; 0
            for frames without photons, which get zero shifts) over
            ``(time, z, [repeat])``, and ``reference`` ``(z, y, x)``.

        """
        from functools import partial

        if method not in ("phase", "suite2p"):
            raise ValueError(f"unknown registration method {method!r}; "
                             "available: 'phase', 'suite2p'")
        if method == "suite2p" and regularize_sigma:
            raise ValueError("regularize_sigma applies to method='phase' only")
        ds = self._ds
        if channel is None:
            channel = int(ds.channel.values[0])
        if channel not in ds.channel.values:
            raise ValueError(f"channel {channel} is not in this Dataset (channels "
                             f"{ds.channel.values.tolist()})")
        img = ds.intensity.sel(channel=channel)
        other = [d for d in img.dims if d not in ("time", "z", "y", "x")]  # repeat
        img = img.transpose("time", *other, "z", "y", "x")
        nz, nt = img.sizes["z"], img.sizes["time"]
        h, w = img.sizes["y"], img.sizes["x"]
        opts: dict[str, Any] = (
            {"max_shift": max_shift, "smooth_sigma": smooth_sigma, "whiten": whiten}
            if method == "phase" else
            {"max_shift": max_shift, "device": device, "settings": suite2p_settings})
        if reference is not None:
            refs = np.asarray(reference, dtype=np.float64)
            if refs.shape != (nz, h, w):
                raise ValueError(f"reference of shape {refs.shape}; expected {(nz, h, w)}")
        else:
            pick = np.unique(np.linspace(0, nt - 1, min(nt, n_reference_frames)
                                         ).round().astype(int))
            sample = np.asarray(img.isel(time=pick).values).reshape(-1, nz, h, w)
            refs = _build_references(sample, method, n_iter, regularize_sigma, opts)
        align = partial(_align_block, refs=refs, method=method, opts=opts,
                        regularize_sigma=regularize_sigma)
        data = img.data
        if not isinstance(data, np.ndarray) and hasattr(data, "map_blocks"):  # dask
            data = data.rechunk({data.ndim - 3: -1, data.ndim - 2: -1, data.ndim - 1: -1})
            res = data.map_blocks(align, drop_axis=data.ndim - 1,
                                  chunks=(*data.chunks[:-2], (3,)), dtype=np.float64)
        else:
            frames_per_t = int(np.prod([img.sizes[d] for d in other], dtype=np.int64))
            step = max(1, batch_frames // max(1, frames_per_t * nz))
            res = np.concatenate([align(np.asarray(img.isel(time=slice(a, a + step)).values))
                                  for a in range(0, nt, step)]) if nt else \
                np.zeros((0, *[img.sizes[d] for d in other], nz, 3))
        dims = ("time", *other, "z")
        attrs = {"convention": SHIFT_CONVENTION, "units": "pixel", "channel": channel,
                 "method": method}
        out = xr.Dataset(
            {
                "shift_y": (dims, res[..., 0].astype(np.int64), attrs),
                "shift_x": (dims, res[..., 1].astype(np.int64), attrs),
                "quality": (dims, res[..., 2],
                            {"long_name": "correlation peak of the registration"}),
                "reference": (("z", "y", "x"), refs,
                              {"long_name": "registration reference", "channel": channel}),
            },
            coords={d: ds[d] for d in ("time", "z", "y", "x", *other) if d in ds.coords},
        )
        return out.transpose("time", "z", *other, "y", "x")

    # ------------------------------------------------------------------ masks

    def _normalise_masks(self, masks: Any, single: bool
                         ) -> tuple[np.ndarray, np.ndarray, bool]:
        """Return ``(stack (M, Zm, H, W) bool, roi labels, is_3d)``."""
        ds = self._ds
        h, w, nz = ds.sizes["y"], ds.sizes["x"], ds.sizes["z"]
        labels: np.ndarray | None = None
        if isinstance(masks, xr.DataArray):
            has_roi = "roi" in masks.dims
            order = [d for d in ("roi", "z", "y", "x") if d in masks.dims]
            if set(masks.dims) - set(order):
                raise ValueError(f"mask dims {masks.dims}: expected some of (roi, z, y, x)")
            if has_roi and "roi" in masks.coords:
                labels = np.asarray(masks["roi"].values)
            m = masks.transpose(*order).values
            if not has_roi:
                m = m[None]
            if "z" not in masks.dims:
                m = m[:, None]
        else:
            if isinstance(masks, (list, tuple)):
                m = np.stack([np.asarray(x) for x in masks])
                m = m[:, None] if m.ndim == 3 else m
            else:
                m = np.asarray(masks)
                is_label = m.dtype.kind in "iu" and m.size and m.max() > 1
                if is_label:  # integer label image: one ROI per non-zero label
                    labels = np.unique(m[m != 0])
                    img = m if m.ndim == 3 else m[None]
                    m = img[None] == labels[:, None, None, None]
                elif m.ndim == 2:
                    m = m[None, None]
                elif m.ndim == 3:
                    m = m[None] if single else m[:, None]
        if m.ndim != 4 or m.shape[-2:] != (h, w):
            raise ValueError(f"masks of shape {np.shape(masks)} do not fit frames of {h} x {w}")
        if m.shape[1] not in (1, nz):
            raise ValueError(f"3-D masks have {m.shape[1]} planes; the Dataset has {nz}")
        is_3d = m.shape[1] > 1
        if labels is None:
            labels = np.arange(m.shape[0])
        return m.astype(bool), labels, is_3d

    def _source_file(self) -> str | None:
        """Return the local ``.siff`` behind this Dataset, if its frames can be read from it.

        Not for converted stores, registered-in-place intensity, acquisitions of
        several files (``frame_index`` then counts frames across the parts), or URLs
        (the Dataset does not carry their storage options).
        """
        ds = self._ds
        src = ds.intensity.encoding.get("source")
        if (isinstance(src, str) and "://" not in src and os.path.isfile(src)
                and "frame_index" in ds and "registered" not in ds.intensity.attrs
                and "file_frame_offsets" not in ds.attrs):
            return src
        return None

    def sum_masks(self, masks: Any, *, channel: int | None = None,
                  method: Literal["auto", "kernel", "xarray"] = "auto") -> xr.DataArray:
        """Photons inside each mask, per frame, as a labelled ``(roi, time, ...)`` array.

        Parameters
        ----------
        masks
            A stack of 2-D masks ``(M, y, x)`` (each applied to every plane), a stack
            of 3-D masks ``(M, z, y, x)`` (one mask per plane; summed over planes), a
            list of either, an integer label image ``(y, x)`` or ``(z, y, x)`` (one
            ROI per non-zero label), or a DataArray with dims from (roi, z, y, x).
        channel
            ScanImage channel number to sum; default: every channel (kept as a dim).
        method
            ``"kernel"``: decode the source ``.siff`` once for all masks in the
            reader's Numba kernel (Datasets from ``engine="siff"``); ``"xarray"``:
            reduce ``intensity`` (lazy under Dask; converted stores); ``"auto"``
            picks the kernel when the source file is at hand.

        Returns
        -------
        xarray.DataArray
            ``int64`` photons, dims ``(roi, time, z, [repeat], [channel])`` for 2-D
            masks and ``(roi, time, [repeat], [channel])`` for 3-D masks. If the
            Dataset holds ``shift_y``/``shift_x``, masks apply to registered frames.

        """
        return self._sum(masks, channel, method, single=False)

    def sum_mask(self, mask: Any, *, channel: int | None = None,
                 method: Literal["auto", "kernel", "xarray"] = "auto") -> xr.DataArray:
        """Photons inside one mask (2-D for every plane, or 3-D ``(z, y, x)``) per frame.

        As :meth:`sum_masks` without the ``roi`` dimension.
        """
        return self._sum(mask, channel, method, single=True).isel(roi=0, drop=True)

    def _sum(self, masks: Any, channel: int | None, method: str, single: bool
             ) -> xr.DataArray:
        ds = self._ds
        m, labels, is_3d = self._normalise_masks(masks, single)
        if method not in ("auto", "kernel", "xarray"):
            raise ValueError(f"method must be 'auto', 'kernel' or 'xarray', got {method!r}")
        src = self._source_file()
        if method == "kernel" and src is None:
            raise ValueError("method='kernel' needs a Dataset opened from one local .siff "
                             "file (with frame_index and unregistered intensity)")
        sel = {} if channel is None else {"channel": channel}
        if method == "xarray" or (method == "auto" and src is None):
            data = ds.siff.apply_shifts() if "shift_y" in ds else ds
            inten = data.intensity.sel(sel)
            md = xr.DataArray(m.astype(np.int64), dims=("roi", "z", "y", "x"),
                              coords={"roi": labels})
            if not is_3d:
                md = md.isel(z=0, drop=True)
            out = xr.dot(inten.astype(np.int64), md, dim=["y", "x", *(["z"] if is_3d else [])])
        else:
            out = self._sum_kernel(src, m, labels, is_3d, sel)
        out.name = "photons_in_roi"
        out.attrs = {"long_name": "photons inside the mask", "units": "photons"}
        first = [d for d in ("roi", "time", "z", "repeat", "channel") if d in out.dims]
        return out.transpose(*first)

    def _frames(self, sel: dict[str, Any]) -> tuple[xr.DataArray, np.ndarray, np.ndarray,
                                                     np.ndarray | None]:
        """Frame map for the selection, its existing frames, and their shifts."""
        ds = self._ds
        fmap = ds.frame_index.sel(sel)
        frames = fmap.values.reshape(-1)
        ok = frames >= 0
        shifts = None
        if "shift_y" in ds:
            sy, sx = xr.broadcast(ds.shift_y, ds.shift_x, fmap)[:2]
            sy = sy.transpose(*fmap.dims).values.reshape(-1)
            sx = sx.transpose(*fmap.dims).values.reshape(-1)
            shifts = np.stack([sy, sx], axis=1)[ok]
        return fmap, frames[ok], ok, shifts

    @staticmethod
    def _place(values: np.ndarray, fmap: xr.DataArray, ok: np.ndarray, labels: np.ndarray,
               extra_dims: tuple[str, ...] = (), extra_coords: dict[str, Any] | None = None,
               fill: Any = 0) -> xr.DataArray:
        """Put ``(M, F_ok, *extra)`` results back on the ``(roi, *frame dims, *extra)`` grid."""
        m, extra = values.shape[0], values.shape[2:]
        out = np.full((m, ok.size, *extra), fill, dtype=values.dtype)
        out[:, ok] = values
        coords = {"roi": labels, **{k: v for k, v in fmap.coords.items()
                                    if set(v.dims) <= set(fmap.dims)}}
        coords.update(extra_coords or {})
        return xr.DataArray(out.reshape(m, *fmap.shape, *extra),
                            dims=("roi", *fmap.dims, *extra_dims), coords=coords)

    def _sum_kernel(self, src: str, m: np.ndarray, labels: np.ndarray, is_3d: bool,
                    sel: dict[str, Any]) -> xr.DataArray:
        from .reader.siff_file import SiffFile

        fmap, frames, ok, shifts = self._frames(sel)
        with SiffFile(src) as f:
            got = f.sum_masks(m, frames, shifts=shifts)  # (M, F): one decode per frame
        arr = self._place(got, fmap, ok, labels)
        return arr.sum("z") if is_3d else arr

    def _need_source(self, what: str) -> str:
        src = self._source_file()
        if src is None:
            raise ValueError(f"{what} reduces photons, which needs a Dataset opened from one "
                             "local .siff file (frame_index present, intensity not registered "
                             "in place); for a converted store use siff_xarray.read_photons")
        return src

    def histogram(self, mask: Any = None, *, channel: int | None = None,
                  mode: Literal["drop", "clip", "wrap", "corrosiff"] = "drop"
                  ) -> xr.DataArray:
        """Arrival-time histograms per frame, of the whole frame or of each ROI.

        Parameters
        ----------
        mask
            ``None`` (the Dataset's per-frame ``histogram``), or masks as in
            :meth:`sum_masks`: the photons inside each mask, from the source file in
            one decode per frame (registered when the Dataset holds shifts).
        channel
            ScanImage channel number; default every channel.
        mode
            Arrival times beyond the last bin, as in ``SiffFile.histograms``.

        Returns
        -------
        xarray.DataArray
            Counts with ``tau`` last (bin centres, ns) and ``attrs["frequency"]``, the
            laser frequency in MHz (phasorpy's conventions).

        """
        from .reader.siff_file import SiffFile

        ds = self._ds
        sel = {} if channel is None else {"channel": channel}
        if mask is None:
            out = ds.histogram.sel(sel)
        else:
            src = self._need_source("histogram(mask)")
            m, labels, is_3d = self._normalise_masks(mask, single=False)
            fmap, frames, ok, shifts = self._frames(sel)
            with SiffFile(src) as f:
                got = f.masks_histograms(m, frames, shifts=shifts, mode=mode,
                                         n_bins=ds.sizes.get("tau"))
            out = self._place(got, fmap, ok, labels, ("tau",), {"tau": ds["tau"]})
            if is_3d:
                out = out.sum("z")
        out = out.copy()
        out.name = "histogram"
        out.attrs = {"long_name": "photon arrival-time histogram", "units": "photons"}
        if "laser_period_ns" in ds.attrs:
            out.attrs["frequency"] = 1000.0 / float(ds.attrs["laser_period_ns"])
        return out.transpose(..., "tau")

    def lifetime(self, mask: Any = None, *, offset: float = 0.0, channel: int | None = None
                 ) -> xr.DataArray:
        """Empirical lifetime: mean photon arrival time minus ``offset``, in ns.

        With ``mask=None`` per pixel ``(time, z, ..., y, x)`` (NaN where no photon);
        with masks (as in :meth:`sum_masks`) per ROI and frame, pooling the ROI's
        photons. Computed from photons in the reader's Numba kernels (registered
        when the Dataset holds shifts); arrival times count from the start of their
        bin, as ``SiffFile.lifetime_images`` does.
        """
        from .reader.siff_file import SiffFile

        ds = self._ds
        sel = {} if channel is None else {"channel": channel}
        src = self._need_source("lifetime")
        fmap, frames, ok, shifts = self._frames(sel)
        with SiffFile(src) as f:
            bin_ns = f.im_params.picoseconds_per_bin / 1000.0
            if mask is None:
                img = f.lifetime_images(frames, shifts=shifts, units="ns", dtype=np.float32)
                out = self._place(img[None], fmap, ok, np.array([0]), ("y", "x"),
                                  {"y": ds["y"], "x": ds["x"]}, fill=np.nan)
                out = out.isel(roi=0, drop=True) - offset
            else:
                m, labels, is_3d = self._normalise_masks(mask, single=False)
                total, counts = f.sum_masks_flim(m, frames, shifts=shifts)
                s = self._place(total, fmap, ok, labels)
                c = self._place(counts, fmap, ok, labels)
                if is_3d:
                    s, c = s.sum("z"), c.sum("z")
                out = (s / c.where(c > 0)) * bin_ns - offset
        out.name = "lifetime"
        out.attrs = {"long_name": "mean photon arrival time minus offset", "units": "ns",
                     "offset_ns": offset}
        return out

    def phasor(self, mask: Any = None, *, harmonic: int = 1, channel: int | None = None,
               reference: tuple[Any, Any] | None = None,
               reference_lifetime: float | None = None) -> xr.Dataset:
        """Phasor coordinates ``(g, s)`` per pixel or per ROI and frame.

        Each photon contributes ``exp(2 pi i h t / P)`` (``t`` its arrival bin, ``P``
        the bins of one laser period), averaged over the pixel's or ROI's photons:
        the same numbers ``phasorpy.phasor.phasor_from_signal`` gives on the
        histograms. With a ``reference`` phasor (e.g. a dye of known lifetime,
        measured the same way) and its ``reference_lifetime`` (ns), the result is
        calibrated: rotated and scaled so that the reference lands on the
        single-exponential phasor of its lifetime (removing the IRF delay and width).

        Returns
        -------
        xarray.Dataset
            ``g``, ``s`` and ``photons`` (the photons averaged), with dims of
            :meth:`lifetime`.

        """
        from .reader.siff_file import SiffFile

        ds = self._ds
        sel = {} if channel is None else {"channel": channel}
        src = self._need_source("phasor")
        fmap, frames, ok, shifts = self._frames(sel)
        with SiffFile(src) as f:
            if mask is None:
                g, s_, n = f._pixel_flim(frames, shifts, "phasor", 0.0, harmonic, None,
                                         np.float64, counts=True)[1:]
                coords = {"y": ds["y"], "x": ds["x"]}
                parts = [self._place(a[None], fmap, ok, np.array([0]), ("y", "x"), coords,
                                     fill=fill).isel(roi=0, drop=True)
                         for a, fill in ((g, np.nan), (s_, np.nan), (n, 0))]
            else:
                m, labels, is_3d = self._normalise_masks(mask, single=False)
                cnt, _, gsum, ssum = f._mask_flim(m, frames, shifts, True, harmonic, None)
                sums = [self._place(a, fmap, ok, labels) for a in (gsum, ssum, cnt)]
                if is_3d:
                    sums = [a.sum("z") for a in sums]
                n = sums[2]
                parts = [sums[0] / n.where(n > 0), sums[1] / n.where(n > 0), n]
        g_da, s_da, n_da = parts
        attrs = {"harmonic": harmonic}
        if "laser_period_ns" in ds.attrs:
            attrs["frequency"] = 1000.0 / float(ds.attrs["laser_period_ns"])
        if reference is not None:
            if reference_lifetime is None or "frequency" not in attrs:
                raise ValueError("calibration needs reference_lifetime (ns) and a known "
                                 "laser period")
            g_da, s_da = calibrate_phasor(g_da, s_da, reference, reference_lifetime,
                                          attrs["frequency"], harmonic)
            attrs["calibrated_with_lifetime_ns"] = reference_lifetime
        return xr.Dataset({"g": g_da.assign_attrs(attrs), "s": s_da.assign_attrs(attrs),
                           "photons": n_da.astype(np.int64)})

    def apply_shifts(self, shifts: xr.Dataset | None = None) -> xr.Dataset:
        """Return the Dataset with ``intensity`` (and ``mean_arrival``) registered, lazily.

        ``shifts`` is the output of :meth:`register` (default: the ``shift_y`` and
        ``shift_x`` variables already in the Dataset). The shifts are stored in the
        result, so they travel with it (``to_zarr`` included), and registered
        variables carry a ``registered`` attribute so that shifts are never applied
        twice. Works on numpy- and dask-backed Datasets; nothing is decoded until
        the data are used.
        """
        from .registration import apply_shifts as roll_frames

        ds = self._ds
        src = ds if shifts is None else shifts
        if "shift_y" not in src or "shift_x" not in src:
            raise ValueError("no shifts: pass the Dataset returned by ds.siff.register()")
        sy, sx = src["shift_y"], src["shift_x"]

        def roll(frames: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
            return roll_frames(frames, np.stack([y, x], axis=-1))

        out = ds.assign(shift_y=sy, shift_x=sx)
        for name in ("intensity", "mean_arrival"):
            if name not in ds or "registered" in ds[name].attrs:
                continue  # absent, or registered already (e.g. saved after apply_shifts)
            var = ds[name]
            moved = xr.apply_ufunc(
                roll, var, sy, sx, input_core_dims=[["y", "x"], [], []],
                output_core_dims=[["y", "x"]], dask="parallelized",
                output_dtypes=[var.dtype], keep_attrs=True,
            ).transpose(*var.dims)
            moved.encoding = dict(var.encoding)
            moved.attrs["registered"] = SHIFT_CONVENTION + " with shift_y, shift_x"
            out[name] = moved
        return out


def calibrate_phasor(g: Any, s: Any, reference: tuple[Any, Any], reference_lifetime: float,
                     frequency_mhz: float, harmonic: int = 1) -> tuple[Any, Any]:
    """Rotate and scale phasors so that ``reference`` lands on its known lifetime.

    ``reference`` is the measured ``(g, s)`` of a single-exponential sample of
    lifetime ``reference_lifetime`` (ns) at ``frequency_mhz`` (arrays are averaged);
    its ideal phasor is ``(1, w t) / (1 + (w t)**2)`` with ``w = 2 pi h f``. The
    rotation and scale that move the measured reference there are applied to
    ``(g, s)``.
    """
    wt = 2 * np.pi * harmonic * frequency_mhz * 1e-3 * reference_lifetime
    g0, s0 = 1 / (1 + wt**2), wt / (1 + wt**2)
    gr, sr = (float(np.nanmean(np.asarray(v, dtype=float))) for v in reference)
    dphi = np.arctan2(s0, g0) - np.arctan2(sr, gr)
    scale = np.hypot(g0, s0) / np.hypot(gr, sr)
    c, si = scale * np.cos(dphi), scale * np.sin(dphi)
    return g * c - s * si, g * si + s * c


def _build_references(frames: np.ndarray, method: str, n_iter: int, regularize_sigma: float,
                      opts: dict[str, Any]) -> np.ndarray:
    """Build references ``(z, y, x)`` from sample volumes ``(N, z, y, x)``."""
    if method == "suite2p":
        from .registration_suite2p import suite2p_reference

        return np.stack([suite2p_reference(frames[:, k], **opts)
                         for k in range(frames.shape[1])])
    from .registration import register_planes

    return register_planes(frames, n_iter=n_iter, regularize_sigma=regularize_sigma,
                           **opts)[1]


def _align_block(block: np.ndarray, refs: np.ndarray, method: str, opts: dict[str, Any],
                 regularize_sigma: float) -> np.ndarray:
    """Shifts and quality of frames ``(..., z, y, x)`` against per-plane ``refs``.

    Returns ``float64 (..., z, 3)``: ``shift_y``, ``shift_x``, ``quality``. Frames
    without photons get zero shifts and quality 0.
    """
    nz, h, w = block.shape[-3:]
    lead = block.shape[:-3]
    flat = block.reshape(-1, nz, h, w)
    if method == "suite2p":
        from .registration_suite2p import suite2p_shifts

        parts = [suite2p_shifts(flat[:, k], refs[k], **opts) for k in range(nz)]
        shifts = np.stack([p[0] for p in parts])
        quality = np.stack([p[2] for p in parts])
    else:
        from .registration import register_planes

        shifts, _, quality = register_planes(flat, reference=refs,
                                             regularize_sigma=regularize_sigma, **opts)
        shifts, quality = shifts.transpose(1, 0, 2), quality.T  # (z, N, 2), (z, N)
    empty = ~flat.reshape(flat.shape[0], nz, -1).any(axis=2).T  # (z, N)
    shifts[empty] = 0
    quality = np.where(empty, 0.0, quality)
    out = np.concatenate([shifts.astype(np.float64), quality[..., None]], axis=-1)
    return out.transpose(1, 0, 2).reshape(*lead, nz, 3)
