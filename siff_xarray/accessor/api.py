"""The ``ds.siff`` accessor (:class:`SiffAccessor`): the user-facing analysis methods.

Rigid motion registration (:meth:`SiffAccessor.register`, native or suite2p),
lazy application of shifts (:meth:`SiffAccessor.apply_shifts`), ROI sums
(:meth:`SiffAccessor.sum_masks`), and photon reductions per pixel or ROI
(:meth:`SiffAccessor.histogram`, :meth:`SiffAccessor.lifetime`,
:meth:`SiffAccessor.phasor`, :meth:`SiffAccessor.arrival_times`) computed from the
source ``.siff`` or a converted store's photons through
:mod:`siff_xarray.accessor.reductions`. Shift convention: the registered frame is
``numpy.roll(raw, (shift_y, shift_x), axis=(-2, -1))``, for any sign.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import numpy as np
import xarray as xr

from .._paths import is_remote
from .._progress import ProgressArg, Reporter
from .reductions import PhotonSource, bin_ns, reduce_photons

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
        method: Literal["likelihood", "phase", "suite2p"] = "likelihood",
        reference: xr.DataArray | np.ndarray | None = None,
        *,
        max_shift: int | None = None,
        motion: Literal["frame", "volume"] = "frame",
        step_cost: float = 0.0,
        n_iter: int = 3,
        n_reference_frames: int | None = None,
        smooth_sigma: float = 2.0,
        whiten: float = 0.0,
        regularize_sigma: float = 0.0,
        batch_frames: int = 512,
        device: Any = None,
        suite2p_settings: dict[str, Any] | None = None,
        progress: ProgressArg = None,
    ) -> xr.Dataset:
        """Estimate rigid shifts of every frame, plane by plane.

        Parameters
        ----------
        channel
            ScanImage channel number (a ``channel`` coordinate value) to align on;
            default: the first channel. The shifts apply to all channels.
        method
            ``"likelihood"`` (default): the shift of maximum likelihood of each
            frame's photon counts under a reference canvas per plane, refined by
            coarse-to-fine EM over the sample frames
            (:mod:`siff_xarray.registration.likelihood`).
            ``"phase"``: FFT correlation against an iteratively refined reference
            per plane (:mod:`siff_xarray.registration.phase`; numpy only).
            ``"suite2p"``: suite2p 1.x's rigid registration and reference
            (:mod:`siff_xarray.registration.suite2p`; needs the ``suite2p`` extra).
        reference
            ``(z, y, x)`` reference images to align to, instead of building them
            (for ``"likelihood"`` also a canvas ``(z, y + 2m, x + 2m)``; a plain
            reference is padded by repeating its edges).
        max_shift
            Largest shift searched (pixels; default a quarter of the frame for
            ``"likelihood"`` and ``"phase"``, suite2p's ``maxregshift`` for
            ``"suite2p"``).
        motion
            ``"frame"`` (default): every frame has its own shift. ``"volume"``: the
            planes of one volume share one shift (fast volumetric scans, where the
            brain does not move between planes); their evidence is added
            (``"likelihood"``, ``"phase"``).
        step_cost
            ``"likelihood"``: a prior of motion smooth in time, in nats per pixel
            moved between consecutive frames of a plane (jointly most likely path,
            Viterbi, within each block of frames); 0 (default) treats frames
            independently. Measured in docs/performance.md; helps only when frames
            carry little information and motion is slow.
        n_iter, n_reference_frames
            Reference refinement iterations (``"phase"``; for ``"likelihood"`` the
            most rounds per coarse-to-fine level), and how many volumes (evenly
            spaced in time) build the reference: default 100 for
            ``"likelihood"`` (its cross-fitted EM reaches the oracle with 100 on
            the benchmark files; more only cost time), 300 otherwise. The
            reference volumes keep the EM's fit; with ``step_cost`` the prior
            applies within the EM only when they are all the volumes, so then the
            default is every volume (up to 1000).
        smooth_sigma, whiten
            ``"phase"``: correlation smoothing (pixels) and spectral whitening (0 =
            plain cross-correlation, 1 = phase correlation).
        regularize_sigma
            ``"likelihood"``, ``"phase"``: pool the evidence of neighbouring planes
            of the same volume with Gaussian weights of this width (in planes)
            before taking each plane's shift
            (:func:`~siff_xarray.registration.plane_weights`); 0 (default)
            registers planes independently. ``motion="volume"`` is the limit of
            infinite width.
        batch_frames
            Frames decoded and registered at a time when the Dataset is not
            chunked (bounds memory). A Dask-backed Dataset is registered chunk by
            chunk in parallel, and the shifts stay lazy.
        device, suite2p_settings
            ``"suite2p"``: torch device (default CUDA if available, else CPU) and
            overrides of suite2p's registration settings.
        progress
            Progress bars of the reference (levels or planes) and of the alignment
            (volumes): ``None`` (default) when someone watches (a terminal or a
            notebook) and a step takes over a second, ``True`` always, ``False``
            never, or a callable taking a :class:`~siff_xarray.Step` (see
            :func:`siff_xarray.set_progress`). A Dask-backed Dataset's alignment is
            lazy: use Dask's progress bars when computing it.

        Returns
        -------
        xarray.Dataset
            ``shift_y``, ``shift_x`` (int64) and ``quality`` over ``(time, z,
            [repeat])``, and ``reference`` ``(z, y, x)``. ``quality`` is, for
            ``"likelihood"``, the log-likelihood margin (nats) of the chosen shift
            over the next best (low: the frame cannot tell shifts apart; negative:
            the motion prior overruled the frame), for ``"phase"`` the
            correlation peak, for ``"suite2p"`` its peak correlation; 0 for frames
            without photons, which get zero shifts.

        """
        from functools import partial

        from ..registration.blocks import (
            METHODS,
            align_block,
            build_references,
            crop_reference,
        )

        if method not in METHODS:
            raise ValueError(f"unknown registration method {method!r}; "
                             f"available: {', '.join(map(repr, METHODS))}")
        if motion not in ("frame", "volume"):
            raise ValueError(f"motion must be 'frame' or 'volume', got {motion!r}")
        if method == "suite2p" and (regularize_sigma or motion != "frame"):
            raise ValueError("regularize_sigma and motion='volume' apply to "
                             "method='likelihood' or 'phase' only")
        if step_cost and method != "likelihood":
            raise ValueError("step_cost applies to method='likelihood' only")
        if step_cost < 0 or not np.isfinite(step_cost):
            raise ValueError(f"step_cost must be a finite number >= 0, got {step_cost}")
        if motion == "volume":
            regularize_sigma = np.inf
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
        opts: dict[str, Any] = {
            "likelihood": {"max_shift": max_shift, "step_cost": step_cost},
            "phase": {"max_shift": max_shift, "smooth_sigma": smooth_sigma, "whiten": whiten},
            "suite2p": {"max_shift": max_shift, "device": device,
                        "settings": suite2p_settings},
        }[method]
        fitted = None
        if reference is not None:
            refs = np.asarray(reference, dtype=np.float64)
            margin = ((refs.shape[-2] - h) // 2, (refs.shape[-1] - w) // 2) if refs.ndim == 3 \
                else (-1, -1)
            if refs.shape != (nz, h, w) and not (
                    method == "likelihood" and min(margin) >= 0
                    and refs.shape == (nz, h + 2 * margin[0], w + 2 * margin[1])):
                raise ValueError(f"reference of shape {refs.shape}; expected {(nz, h, w)}")
        else:
            if n_reference_frames is None:  # a motion prior needs consecutive volumes
                n_reference_frames = (nt if step_cost and nt <= 1000 else 100) \
                    if method == "likelihood" else 300
            pick = np.unique(np.linspace(0, nt - 1, min(nt, max(1, n_reference_frames))
                                         ).round().astype(int))
            sample = np.asarray(img.isel(time=pick).values)
            refs, fitted = build_references(sample.reshape(-1, nz, h, w), method, n_iter,
                                            regularize_sigma, opts,
                                            consecutive=len(pick) == nt, progress=progress)
        align = partial(align_block, refs=refs, method=method, opts=opts,
                        regularize_sigma=regularize_sigma)
        if img.chunks is not None:  # dask (``.data`` of a lazy file variable would load it all)
            data = img.data
            data = data.rechunk({data.ndim - 3: -1, data.ndim - 2: -1, data.ndim - 1: -1})
            res = data.map_blocks(align, drop_axis=data.ndim - 1,
                                  chunks=(*data.chunks[:-2], (3,)), dtype=np.float64)
        else:
            frames_per_t = int(np.prod([img.sizes[d] for d in other], dtype=np.int64))
            step = max(1, batch_frames // max(1, frames_per_t * nz))
            res = np.zeros((nt, *[img.sizes[d] for d in other], nz, 3))
            # the EM fitted its sample frames already; a motion prior needs unbroken runs
            todo = np.setdiff1d(np.arange(nt), pick) if fitted is not None and not step_cost \
                else np.arange(nt)
            with Reporter(f"registration ({method})", len(todo), "volumes",
                          progress) as bar:
                for a in bar.track(range(0, len(todo), step),
                                   lambda a: min(step, len(todo) - a)):
                    sel = todo[a: a + step]
                    res[sel] = align(np.asarray(img.isel(time=sel).values))
        if fitted is not None:  # the sample frames keep their unbiased (cross-fitted) fit
            overlay = np.full(res.shape, np.nan)
            overlay[pick] = fitted.reshape(len(pick), *res.shape[1:])
            if isinstance(res, np.ndarray):
                res[pick] = overlay[pick]
            else:
                import dask.array as da

                over = da.from_array(overlay, chunks=res.chunks)
                res = da.where(da.isnan(over), res, over)
        dims = ("time", *other, "z")
        attrs = {"convention": SHIFT_CONVENTION, "units": "pixel", "channel": channel,
                 "method": method, "motion": motion}
        quality_attrs = {
            "likelihood": {"long_name": "log-likelihood margin of the chosen shift over the "
                                        "next best", "units": "nat"},
            "phase": {"long_name": "correlation peak of the registration"},
            "suite2p": {"long_name": "suite2p peak correlation of the registration"},
        }[method]
        out = xr.Dataset(
            {
                "shift_y": (dims, res[..., 0].astype(np.int64), attrs),
                "shift_x": (dims, res[..., 1].astype(np.int64), attrs),
                "quality": (dims, res[..., 2], quality_attrs),
                "reference": (("z", "y", "x"), crop_reference(refs, (h, w)),
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

    def _all_siff(self) -> bool:
        """Tell whether every frame's photons are in ``.siff`` files (not stores)."""
        try:
            _, _, sources = self._photon_cells("sum_masks", {})
        except (ValueError, OSError):
            return False
        return bool(sources) and all(p.kind == "siff" for p in sources)

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
            ``"kernel"``: one pass over each frame's photons for all masks in the
            reader's Numba kernel (the source ``.siff``, or a converted store's
            photons); ``"xarray"``: reduce ``intensity``; ``"auto"`` picks the
            kernel for ``.siff`` sources and ``"xarray"`` otherwise (a store's
            compressed intensity is cheaper to read than its photons). Both are
            lazy on a Dask-backed Dataset.

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
        sel = {} if channel is None else {"channel": channel}
        if method == "xarray" or (method == "auto" and not self._all_siff()):
            data = ds.siff.apply_shifts() if "shift_y" in ds else ds
            inten = data.intensity.sel(sel)
            md = xr.DataArray(m.astype(np.int64), dims=("roi", "z", "y", "x"),
                              coords={"roi": labels})
            if not is_3d:
                md = md.isel(z=0, drop=True)
            out = xr.dot(inten.astype(np.int64), md, dim=["y", "x", *(["z"] if is_3d else [])])
        else:
            out = self._sum_kernel(m, labels, is_3d, sel)
        out.name = "photons_in_roi"
        out.attrs = {"long_name": "photons inside the mask", "units": "photons"}
        first = [d for d in ("roi", "time", "z", "repeat", "channel") if d in out.dims]
        return out.transpose(*first, ...)

    def _resolve(self, what: str, location: str, only: bool) -> PhotonSource:
        """Return the photon source at ``location`` (a ``source_file`` value)."""
        from ..store.read import is_converted_store

        ds = self._ds
        opts = ds.encoding.get("storage_options")
        if is_remote(location):
            if is_converted_store(location, opts):
                return PhotonSource("store", location, opts)
            from ..reader.index_cache import IndexHint, known_version

            # the object this process opened: workers read it or fail, never a newer one
            return PhotonSource("siff", location, opts,
                                IndexHint(location, known_version(location)),
                                pin_version=ds.encoding.get("pin_version", True))
        if os.path.isfile(location):
            return PhotonSource("siff", location)
        if os.path.isdir(location) and is_converted_store(location):
            return PhotonSource("store", location)
        # a store opened with xr.open_zarr after it was moved: the Dataset's own source
        here = ds.encoding.get("source")
        if only and isinstance(here, str) and is_converted_store(here, opts):
            return PhotonSource("store", here, opts)
        raise FileNotFoundError(
            f"{what}: the photons of some frames are in {location}, which does not exist "
            "(moved or deleted); open moved stores with siff_xarray.open_converted, which "
            "records where they are now")

    def _photon_cells(self, what: str, sel: dict[str, Any]
                      ) -> tuple[xr.DataArray, np.ndarray, tuple[PhotonSource, ...]]:
        """Each cell's frame in its source, the index of that source, and the sources.

        From the per-cell ``source_file`` / ``source_frame`` variables, which follow
        each cell through ``isel``, ``concat``, ``merge`` and ``open_mfdataset``:
        every part of a combined Dataset reduces its own file's photons.
        """
        ds = self._ds
        frame_dims = set(ds.intensity.dims) - {"y", "x"}
        if "source_file" in ds and "source_frame" in ds:
            missing = frame_dims - set(ds.source_frame.dims)
            if missing:
                raise ValueError(
                    f"{what}: intensity varies along {sorted(missing)} but source_frame does "
                    "not (the Dataset was combined without concatenating it, e.g. "
                    "data_vars='minimal'), so the frames cannot be traced to their photons; "
                    "combine with data_vars='all'")
            fmap = ds.source_frame.sel(sel)
            files = ds.source_file.sel(sel).broadcast_like(fmap).transpose(*fmap.dims)
            fm = np.asarray(fmap.values)
            names = np.asarray(files.values).astype(str)
            if ((fm >= 0) & (names == "")).any():
                raise ValueError(f"{what} reduces photons, but some frames come from a file "
                                 "opened as a file object, which cannot be opened again; "
                                 "open the file by its path or URL")
            present = fm >= 0  # only files that hold written frames are opened
            uniq, inv = np.unique(names[present], return_inverse=True)
            which = np.full(fm.shape, -1, dtype=np.int64)
            which[present] = inv
            sources = tuple(self._resolve(what, str(u), only=uniq.size == 1) for u in uniq)
            return fmap, which, sources
        # Datasets written before source_file existed: one source, if it can be told
        from ..store.read import is_converted_store

        fidx = np.asarray(ds.frame_index.values) if "frame_index" in ds else None
        store = ds.encoding.get("source")
        opts = ds.encoding.get("storage_options")
        if fidx is not None and isinstance(store, str) and is_converted_store(store, opts):
            ok = fidx[fidx >= 0]
            if np.unique(ok).size != ok.size:
                raise ValueError(f"{what}: this Dataset repeats frames (combined from several "
                                 "stores written before source_file existed), so its frames "
                                 "cannot be traced to their photons; open each store "
                                 "separately, or convert again")
            fmap = ds.frame_index.sel(sel)
            which = np.where(np.asarray(fmap.values) >= 0, 0, -1)
            return fmap, which, (PhotonSource("store", store, opts),)
        raise ValueError(f"{what} reduces photons, which needs a Dataset opened from .siff "
                         "files or converted stores (with source_file and source_frame); "
                         "this Dataset has neither")

    def _frame_grid(self, what: str, sel: dict[str, Any]
                    ) -> tuple[xr.DataArray, np.ndarray, tuple[PhotonSource, ...],
                               np.ndarray | None]:
        """Per cell: frame in its source, source index, the sources, shift ``(..., 2)``."""
        ds = self._ds
        fmap, which, sources = self._photon_cells(what, sel)
        shifts = None
        if "shift_y" in ds:
            sy, sx = xr.broadcast(ds.shift_y, ds.shift_x, fmap)[:2]
            shifts = np.stack([np.asarray(sy.transpose(*fmap.dims).values),
                               np.asarray(sx.transpose(*fmap.dims).values)], axis=-1)
        return fmap, which, sources, shifts

    def _photon_reduce(self, what: str, op: str, sel: dict[str, Any], masks: Any = None,
                       **kw: Any) -> xr.DataArray:
        """Run photon reduction ``op`` (see :data:`REDUCTIONS`) over the frames of ``sel``."""
        fmap, which, sources, shifts = self._frame_grid(what, sel)
        return reduce_photons(self._ds, sources, which, op, fmap, shifts, masks, **kw)

    def _sum_kernel(self, m: np.ndarray, labels: np.ndarray, is_3d: bool,
                    sel: dict[str, Any]) -> xr.DataArray:
        arr = self._photon_reduce("sum_masks", "sum_masks", sel, m).isel(part=0, drop=True)
        arr = arr.assign_coords(roi=labels)
        return arr.sum("z") if is_3d else arr

    def histogram(self, mask: Any = None, *, channel: int | None = None,
                  mode: Literal["drop", "clip", "wrap", "corrosiff"] = "drop"
                  ) -> xr.DataArray:
        """Arrival-time histograms per frame, of the whole frame or of each ROI.

        Parameters
        ----------
        mask
            ``None`` (the Dataset's per-frame ``histogram``), or masks as in
            :meth:`sum_masks`: the photons inside each mask, from the source
            ``.siff`` or the converted store, in one pass over each frame's photons
            for all masks (registered when the Dataset holds shifts). Lazy when the
            Dataset is Dask-backed.
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
        ds = self._ds
        sel = {} if channel is None else {"channel": channel}
        if mask is None:
            out = ds.histogram.sel(sel)
        else:
            m, labels, is_3d = self._normalise_masks(mask, single=False)
            out = self._photon_reduce("histogram(mask)", "histograms", sel, m, mode=mode,
                                      n_bins=ds.sizes.get("tau"))
            out = out.isel(part=0, drop=True).assign_coords(roi=labels)
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
        photons. Computed from photons (of the source ``.siff`` or the converted
        store) in the reader's Numba kernels, registered when the Dataset holds
        shifts, lazily when it is Dask-backed; arrival times count from the start of
        their bin, as ``SiffFile.lifetime_images`` does.
        """
        ds = self._ds
        sel = {} if channel is None else {"channel": channel}
        if mask is None:
            out = self._photon_reduce("lifetime", "pixel_mean", sel).isel(
                part=0, roi=0, drop=True) - offset
        else:
            m, labels, is_3d = self._normalise_masks(mask, single=False)
            parts = self._photon_reduce("lifetime", "mask_flim", sel, m, phasor=False)
            parts = parts.assign_coords(roi=labels)
            if is_3d:
                parts = parts.sum("z")
            c, s = parts.isel(part=0, drop=True), parts.isel(part=1, drop=True)
            out = (s / c.where(c > 0)) * bin_ns(ds) - offset
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
        Works on ``.siff`` Datasets and converted stores, lazily under Dask.

        Returns
        -------
        xarray.Dataset
            ``g``, ``s`` and ``photons`` (the photons averaged), with dims of
            :meth:`lifetime`.

        """
        ds = self._ds
        sel = {} if channel is None else {"channel": channel}
        if mask is None:
            parts = self._photon_reduce("phasor", "pixel_phasor", sel,
                                        harmonic=harmonic).isel(roi=0, drop=True)
            g_da, s_da, n_da = (parts.isel(part=k, drop=True) for k in range(3))
        else:
            m, labels, is_3d = self._normalise_masks(mask, single=False)
            parts = self._photon_reduce("phasor", "mask_flim", sel, m, phasor=True,
                                        harmonic=harmonic).assign_coords(roi=labels)
            if is_3d:
                parts = parts.sum("z")
            n_da = parts.isel(part=0, drop=True)
            nz = n_da.where(n_da > 0)
            g_da, s_da = parts.isel(part=2, drop=True) / nz, parts.isel(part=3, drop=True) / nz
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

    def arrival_times(self, frame: int | None = None, **indexers: Any) -> xr.Dataset:
        """One frame's photons: pixel and arrival time of each, from the ``.siff`` or store.

        Parameters
        ----------
        frame
            A file frame index (flyback frames included), or ``None`` to pick the
            frame with ``indexers``.
        **indexers
            Positional indexers (``time=``, ``z=``, ``channel=``, ``repeat=``) that
            select exactly one frame of the Dataset, as for ``isel``.

        Returns
        -------
        xarray.Dataset
            Along ``photon``, in pixel order: ``y``, ``x`` (pixel indices, registered
            when the Dataset holds shifts: a photon moves with its pixel),
            ``arrival_bin`` and ``arrival_time`` (ns, from the start of the bin), and
            ``frame`` as an attribute. The same for a ``.siff`` and its converted store.

        """
        ds = self._ds
        shift = (0, 0)
        if frame is None:
            fmap, which, sources = self._photon_cells("arrival_times", {})
            cells = fmap.copy(data=np.arange(fmap.size).reshape(fmap.shape)).isel(indexers)
            if cells.size != 1:
                raise ValueError(f"indexers {indexers} select {cells.size} frames, not one")
            cell = int(cells.values.reshape(-1)[0])
            frame = int(np.asarray(fmap.values).reshape(-1)[cell])
            if frame < 0:
                raise ValueError(f"indexers {indexers} select a frame that was never acquired")
            source = sources[int(which.reshape(-1)[cell])]
            if "shift_y" in ds:
                sel = {k: v for k, v in indexers.items() if k in ds.shift_y.dims}
                shift = (int(ds.shift_y.isel(sel).values.reshape(-1)[0]),
                         int(ds.shift_x.isel(sel).values.reshape(-1)[0]))
        elif indexers:
            raise ValueError("give a file frame index or indexers, not both")
        else:
            _, _, sources = self._photon_cells("arrival_times", {})
            if len(sources) != 1:
                raise ValueError(f"this Dataset combines {len(sources)} files, so a frame "
                                 "number is ambiguous; select the frame with indexers "
                                 "(time=, z=, channel=, ...)")
            source = sources[0]
        with source.open() as src:
            pix, tau = src.photons(int(frame))
        h, w = ds.sizes["y"], ds.sizes["x"]
        y = (pix.astype(np.int64) // w + shift[0]) % h
        x = (pix.astype(np.int64) % w + shift[1]) % w
        width = bin_ns(ds)
        return xr.Dataset(
            {"y": ("photon", y), "x": ("photon", x),
             "arrival_bin": ("photon", tau),
             "arrival_time": ("photon", tau * width,
                              {"units": "ns", "long_name": "arrival time from the bin start"})},
            attrs={"frame": int(frame), "shift": list(shift)})

    def apply_shifts(self, shifts: xr.Dataset | None = None) -> xr.Dataset:
        """Return the Dataset with ``intensity`` (and ``mean_arrival``) registered, lazily.

        ``shifts`` is the output of :meth:`register` (default: the ``shift_y`` and
        ``shift_x`` variables already in the Dataset). The shifts are stored in the
        result, so they travel with it (``to_zarr`` included), and registered
        variables carry a ``registered`` attribute so that shifts are never applied
        twice. Works on numpy- and dask-backed Datasets; nothing is decoded until
        the data are used.
        """
        from ..registration import apply_shifts as roll_frames

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
