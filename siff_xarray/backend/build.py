"""Building the Dataset: variables, coordinates and attributes of one acquisition.

Layout (see ``docs/dataset.md``)::

    intensity     (time, z, [repeat], channel, y, x)  uint16   lazy (int16: signed TIFFs)
    photon_count  (time, z, [repeat], channel)        uint32   lazy (cheap: from the IFDs)
    histogram     (time, z, [repeat], channel, tau)   uint32   lazy (files with photons)
    mean_arrival  (time, z, [repeat], channel, y, x)  float32  lazy, ``flim=True`` only
    frame_index   (time, z, [repeat], channel)        int64    file frame, -1 if never written
    frame_present (time, z, [repeat], channel)        bool
    source_file   (time, z, [repeat], channel)        <U       path/URL of the frame's file
    source_frame  (time, z, [repeat], channel)        int64    frame (IFD) index in that file
    event_*       (event,)                            appended text events
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Hashable
from typing import Any

import numpy as np
import xarray as xr
from xarray.core import indexing

from .._options import OpenOptions, histogram_length
from .._version import __version__
from ..errors import SiffWarning, user_stacklevel
from ..format.constants import ENC_TIFF
from ..format.imparams import ImParams
from ..reader.acquisition import Acquisition
from ..reader.siff_file import SiffFile
from .array import FrameReader, SiffBackendArray, chunks_in_time

__all__ = ["build_dataset"]

#: the encoding dtype of text variables (see :func:`_text`); None with NumPy 1.x
_VARIABLE_LENGTH_TEXT = getattr(np.dtypes, "StringDType", lambda: None)()


def _text(values: list[str]) -> np.ndarray:
    """Fixed-width unicode (not object): Dask sizes it, so ``chunks="auto"`` works.

    Their encoding asks writers for variable-length strings (``build_dataset``):
    zarr-python writes fixed-width unicode as ``FixedLengthUTF32``, which has no Zarr
    v3 specification (other readers may not read it; it warns on every write), and
    variable-length UTF-8 strings, which have one, from NumPy's ``StringDType``
    (``dtype=object`` would do it too, but makes xarray load Dask-backed text to find
    a type, with a warning). NumPy 1.x has no ``StringDType``: text is then written
    as it is.
    """
    return np.array(values, dtype=str) if values else np.zeros(0, dtype="<U1")


def _plain(v: Any) -> Any:
    """Make an attribute value netCDF/Zarr-writable (no None, no bool, no dicts)."""
    if isinstance(v, (bool, np.bool_)):
        return int(v)
    if isinstance(v, np.ndarray):
        return v.ravel().tolist() if v.dtype.kind in "iuf" else str(v.tolist())
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def _number(v: Any) -> float | None:
    if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool):
        return float(v)
    return None


def _attrs(first: SiffFile, ip: ImParams, names: list[str], opts: OpenOptions
           ) -> dict[str, Any]:
    md = first.metadata
    attrs: dict[str, Any] = {
        "title": f"ScanImage-FLIM acquisition {os.path.basename(names[0])}",
        "source_file": names[0] if len(names) == 1 else names,
        "scanimage_tiff_version": first.header.scanimage_version,
        "bigtiff": int(first.header.bigtiff),
        "num_frames_in_file": ip.num_frames,
        "num_slices": ip.num_slices,
        "frames_per_slice": ip.frames_per_slice,
        "num_flyback_frames": ip.num_discard_flyback_frames,
        "channels_saved": list(ip.color_list),
        "histogram_mode": opts.histogram_mode,
        "base_resolution_ps": opts.file.base_resolution_ps,
        "siff_xarray_version": __version__,
        "scanimage_header": first.header.nvfd_text,
        "roi_json": first.header.roi_text,
    }
    ver = [md.get_path(f"SI.VERSION_{p}") for p in ("MAJOR", "MINOR", "UPDATE")]
    if all(_number(v) is not None for v in ver):
        attrs["scanimage_version"] = ".".join(str(int(v)) for v in ver)
    if ip.num_bins is not None:
        attrs["n_tau_bins"] = int(ip.num_bins)
    if ip.picoseconds_per_bin is not None:
        attrs["tau_bin_ps"] = float(ip.picoseconds_per_bin)
        if ip.num_bins is not None:
            attrs["laser_period_ns"] = ip.num_bins * ip.picoseconds_per_bin / 1000.0
    for key, value in (("frame_rate_hz", md.get_path("SI.hRoiManager.scanFrameRate")),
                       ("volume_rate_hz", md.get_path("SI.hRoiManager.scanVolumeRate")),
                       ("frame_period_s", ip.dt_frame), ("volume_period_s", ip.dt_volume),
                       ("zoom", ip.zoom)):
        if _number(value) is not None:
            attrs[key] = float(value)
    if ip.imaging_fov is not None:
        attrs["fov_um"] = _plain(ip.imaging_fov)
    if ip.pixel_size_um is not None:
        attrs["pixel_size_um"] = list(ip.pixel_size_um)
    return attrs


def _yx_coords(ip: ImParams) -> dict[str, xr.Variable]:
    h, w = ip.shape
    px = ip.pixel_size_um
    fov = ip.imaging_fov
    if px is None or fov is None:
        return {"y": xr.Variable("y", np.arange(h), {"units": "pixel", "long_name": "row"}),
                "x": xr.Variable("x", np.arange(w), {"units": "pixel", "long_name": "column"})}
    y0, x0 = float(fov[:, 1].min()), float(fov[:, 0].min())
    return {
        "y": xr.Variable("y", y0 + (np.arange(h) + 0.5) * px[0],
                         {"units": "um", "long_name": "y (pixel centre, field of view)"}),
        "x": xr.Variable("x", x0 + (np.arange(w) + 0.5) * px[1],
                         {"units": "um", "long_name": "x (pixel centre, field of view)"}),
    }


def _warn_if_continuation(f: SiffFile, ip: ImParams) -> None:
    """Warn when a file starts mid-volume (a later part of a split acquisition)."""
    first = f.frame_metadata([0])[0].get("frameNumbers")
    if isinstance(first, int) and first > 0 and first % ip.file_frames_per_volume:
        warnings.warn(
            f"{f.name}: its first frame is frame {first} of the acquisition, in the middle of "
            "a volume, so this part of a split acquisition cannot be arranged into volumes on "
            "its own; open all parts with siff_xarray.open_acquisition([...])",
            SiffWarning, stacklevel=user_stacklevel())


def _location(f: SiffFile) -> str:
    """Where ``f`` can be opened again (absolute path or URL); ``""`` for file objects."""
    path = f.path
    return os.fspath(path) if isinstance(path, (str, os.PathLike)) else ""


def _source_variables(files: list[SiffFile], offsets: np.ndarray, fmap: np.ndarray,
                      frame_dims: tuple[str, ...]) -> dict[Hashable, xr.Variable]:
    """``source_file`` and ``source_frame``: the file and frame holding each cell's photons.

    Per cell, so they follow every cell through ``isel``, ``concat`` and
    ``open_mfdataset``: photon reductions on combined Datasets find each frame's
    own file (fixed-width strings, so ``chunks="auto"`` works).
    """
    part = np.clip(np.searchsorted(offsets, fmap, side="right") - 1, 0, len(files) - 1)
    present = fmap >= 0
    names = np.array([_location(f) for f in files])
    # filled in place: a session's ~80,000 cells of path strings are ~15 MB, and
    # np.where over them took 50-60 ms of every open
    src_file = np.empty(fmap.shape, dtype=names.dtype)
    if len(files) == 1:
        src_file[...] = names[0]
    else:
        np.take(names, part, out=src_file)
    src_file[~present] = ""
    src_frame = np.where(present, fmap - offsets[part], -1).astype(np.int64)
    return {
        "source_file": xr.Variable(frame_dims, src_file, {
            "long_name": "file holding the frame's photons (absolute path or URL)",
            "description": "empty where the frame was never written or the file was opened "
                           "from a file object"}),
        "source_frame": xr.Variable(frame_dims, src_frame, {
            "long_name": "frame (IFD) index within source_file, -1 where never written"}),
    }


def build_dataset(files: list[SiffFile], managers: list[Any], opts: OpenOptions,
                  drop: set[str]) -> xr.Dataset:
    """Build the lazy Dataset of ``files`` (one file, or the parts of one acquisition).

    ``managers`` are the files' managers (the lazy arrays hold those, not the open
    files); ``drop`` names the variables to leave out.
    """
    first = files[0]
    names = [f.name for f in files]
    acq = Acquisition(files)  # checks that the parts belong together; numbers their frames
    offsets = acq.offsets
    counts = np.diff(offsets)
    shape = acq.frame_shape
    ip = acq.im_params(tau_bins=opts.file.tau_bins, bin_width_ps=opts.file.bin_width_ps,
                       base_resolution_ps=opts.file.base_resolution_ps)
    if len(files) == 1:
        _warn_if_continuation(first, ip)
    reader = FrameReader(managers, offsets[:-1], opts)

    fmap = ip.frame_indices(include_partial=opts.partial_volume == "keep")  # (T, Z, R, C)
    if fmap.shape[0] == 0 and ip.num_partial_frames:
        warnings.warn(
            f"{names[0]}: holds {ip.num_partial_frames} frame(s), fewer than one volume "
            f"({ip.file_frames_per_volume} frames: {ip.num_slices} slice(s) x "
            f"{ip.frames_per_slice} frame(s) per slice x {ip.num_colors} channel(s) + "
            "flyback): the Dataset has no timepoint; partial_volume='keep' reads them",
            SiffWarning, stacklevel=user_stacklevel())
    repeat = ip.frames_per_slice > 1
    if not repeat:
        fmap = fmap[:, :, 0, :]
    frame_dims = ("time", "z", "repeat", "channel") if repeat else ("time", "z", "channel")
    present = fmap >= 0

    # per-frame timing from the frame descriptions (all files, in order)
    ts = acq.timestamps()
    acq.release()  # reading every description mapped most of the file into the RSS
    exp_s, laser = ts.experiment_s, ts.epoch_laser_ns
    safe = np.where(present, fmap, 0)
    frame_time = np.where(present, exp_s[safe], np.nan)
    epoch = np.where(present, laser[safe], np.iinfo(np.int64).min)
    epoch_attrs = {"long_name": "laser-clock epoch of the frame"}
    if opts.decode_times:
        epoch = epoch.view("datetime64[ns]")
    else:
        epoch_attrs.update(units="ns since 1970-01-01",
                           description="int64 nanoseconds; the int64 minimum marks a missing "
                                       "frame")
    t_first = frame_time.reshape(fmap.shape[0], int(np.prod(fmap.shape[1:])))[:, 0]
    if np.isnan(t_first).any():  # no timestamps: fall back to the nominal volume period
        dt = ip.dt_volume if ip.dt_volume is not None else 1.0
        t_first = np.where(np.isnan(t_first), np.arange(fmap.shape[0]) * dt, t_first)

    h, w = shape
    src = names[0]
    data_vars: dict[Hashable, xr.Variable] = {}

    def lazy(name: str, kind: str, trailing_dims: tuple[str, ...], trailing: tuple[int, ...],
             dtype: Any, attrs: dict[str, Any], fill: Any = 0) -> None:
        if name in drop:
            return
        arr = SiffBackendArray(reader, kind, fmap, trailing, dtype, fill)
        dims = frame_dims + trailing_dims
        enc = {"preferred_chunks": chunks_in_time(frame_dims, fmap, trailing_dims, trailing,
                                                   np.dtype(dtype).itemsize, opts.chunk_bytes),
               "source": src, "dtype": np.dtype(dtype)}
        data_vars[name] = xr.Variable(dims, indexing.LazilyIndexedArray(arr), attrs,
                                      encoding=enc)

    # ScanImage TIFFs of signed samples (offset-subtracted) read as int16, as SiffFile does
    signed = bool(acq.num_frames and (acq.encoding == ENC_TIFF).all() and acq.signed.all())
    lazy("intensity", "intensity", ("y", "x"), (h, w), np.int16 if signed else np.uint16,
         {"long_name": "photon count per pixel", "units": "photons"})
    lazy("photon_count", "photon_count", (), (), np.uint32,
         {"long_name": "photons in the frame", "units": "photons"})
    has_flim = first.has_photons and ip.num_bins is not None
    n_hist = histogram_length(ip.num_bins, opts.histogram_mode) if has_flim else 0
    if has_flim:
        lazy("histogram", "histogram", ("tau",), (n_hist,), np.uint32,
             {"long_name": "photon arrival-time histogram of the frame", "units": "photons",
              "histogram_mode": opts.histogram_mode})
        if opts.flim:
            lazy("mean_arrival", "mean_arrival", ("y", "x"), (h, w), np.float32,
                 {"long_name": "mean photon arrival time (empirical lifetime)", "units": "ns"},
                 fill=np.nan)
    if "frame_index" not in drop:
        data_vars["frame_index"] = xr.Variable(frame_dims, fmap, {
            "long_name": "frame (IFD) index in the acquisition, -1 where never written",
            "description": "with several files: index into the concatenated frames; see "
                           "attrs['file_frame_offsets']"})
    if "frame_present" not in drop:
        data_vars["frame_present"] = xr.Variable(frame_dims, present,
                                                 {"long_name": "frame was written"})
    if not {"source_file", "source_frame"} & drop:
        data_vars.update(_source_variables(files, offsets, fmap, frame_dims))

    events = ts.events  # frames already numbered across the parts
    if events and not {"event_time", "event_frame", "event_text"} <= drop:
        ev_frame = np.array([e.frame for e in events], dtype=np.int64)
        ev = {
            "event_time": xr.Variable("event", np.array([e.time_s for e in events], float),
                                      {"long_name": "appended text timestamp", "units": "s"}),
            "event_frame": xr.Variable("event", ev_frame,
                                       {"long_name": "frame the text was appended to"}),
            "event_text": xr.Variable("event", _text([e.text for e in events]),
                                      {"long_name": "appended text"}),
        }
        data_vars.update({k: v for k, v in ev.items() if k not in drop})

    if opts.time_coordinate == "epoch":  # absolute: files of a session combine by time
        vol_epoch = epoch.reshape(fmap.shape[0], -1)[:, 0]
        time_var = xr.Variable("time", vol_epoch, {
            "long_name": "laser-clock epoch of the volume's first frame",
            **({} if opts.decode_times else {"units": "ns since 1970-01-01"})})
    else:
        time_var = xr.Variable("time", t_first, {
            "long_name": "experiment time of the volume's first frame", "units": "s"})
    coords: dict[Hashable, xr.Variable] = {
        "time": time_var,
        "z": xr.Variable("z", ip.z_positions, {"long_name": "slice z position (relative)",
                                               "units": "um"}),
        "channel": xr.Variable("channel", np.asarray(ip.color_list, dtype=np.int64),
                               {"long_name": "ScanImage channel number"}),
        "channel_name": xr.Variable("channel", _text(list(ip.channel_names))),
        **_yx_coords(ip),
        "frame_time": xr.Variable(frame_dims, frame_time, {
            "long_name": "experiment time of the frame", "units": "s"}),
        "epoch": xr.Variable(frame_dims, epoch, epoch_attrs),
    }
    if repeat:
        coords["repeat"] = xr.Variable("repeat", np.arange(ip.frames_per_slice),
                                       {"long_name": "frame repeat within a slice"})
    if has_flim:
        ps = ip.picoseconds_per_bin
        centres = (np.arange(n_hist) + 0.5) * ps / 1000.0 if ps is not None else \
            np.arange(n_hist, dtype=float)
        coords["tau"] = xr.Variable("tau", centres, {
            "long_name": "arrival-time bin centre", "units": "ns" if ps is not None else "bin"})
    coords = {k: v for k, v in coords.items() if k not in drop}

    attrs = _attrs(first, ip, names, opts)
    if len(files) > 1:
        attrs["file_frame_offsets"] = offsets[:-1].tolist()
        attrs["num_frames_in_file"] = counts.tolist()
    ds = xr.Dataset(data_vars, coords=coords, attrs=attrs)
    if _VARIABLE_LENGTH_TEXT is not None:
        for var in ds.variables.values():
            if var.dtype.kind == "U":  # written as variable-length strings (see _text)
                var.encoding["dtype"] = _VARIABLE_LENGTH_TEXT
    # photon reductions reopen remote files with the options they were opened with
    # (an open SiffFile given to open_siff: its own)
    storage = opts.file.storage or first.options.storage
    if storage:
        ds.encoding["storage_options"] = storage
    if not (opts.file.pin_version and all(f.options.pin_version for f in files)):
        ds.encoding["pin_version"] = False  # ... and unpinned, as the Dataset was read
    ds.set_close(reader.close)
    return ds
