"""The xarray layer: one or more ``.siff`` files as a lazy, labelled ``xarray.Dataset``.

:func:`open_siff` (also ``xr.open_dataset(path, engine="siff")``) and
:func:`open_acquisition` build the Dataset. Its frame-sized variables are
:class:`SiffBackendArray` objects: a file handle *manager* (never an open handle),
the mapping from each array element to a file frame, and the kind of decode to
run. Indexing one decodes only the frames the index selects. Everything pickles
(the managers reopen the files in another process), so Dask graphs run on
``dask.distributed`` workers.

Layout (see ``docs/dataset.md``)::

    intensity     (time, z, [repeat], channel, y, x)  uint16   lazy (int16: signed TIFFs)
    photon_count  (time, z, [repeat], channel)        uint32   lazy (cheap: from the IFDs)
    histogram     (time, z, [repeat], channel, tau)   uint32   lazy (files with photons)
    mean_arrival  (time, z, [repeat], channel, y, x)  float32  lazy, ``flim=True`` only
    frame_index   (time, z, [repeat], channel)        int64    file frame, -1 if never written
    frame_present (time, z, [repeat], channel)        bool
    event_*       (event,)                            appended text events
"""

from __future__ import annotations

import glob
import json
import os
import warnings
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any, Literal

import numpy as np
import xarray as xr
from xarray.backends import BackendArray, CachingFileManager, DummyFileManager
from xarray.core import indexing

from . import __version__
from .errors import SiffWarning
from .reader.acquisition import Acquisition
from .reader.ifd import ENC_TIFF
from .reader.imparams import ImParams
from .reader.siff_file import SiffFile

#: variable-length strings, marked so that writers (to_zarr of a Dask-backed Dataset)
#: know the dtype without loading the values
_VLEN_STR = np.dtype(object, metadata={"element_type": str})

__all__ = ["SiffBackendArray", "open_acquisition", "open_siff"]

PartialVolume = Literal["keep", "drop"]
HistogramMode = Literal["drop", "clip", "wrap", "corrosiff"]


class _Frozen:
    """A hashable, picklable wrapper of a (nested) options dict for file-manager keys."""

    def __init__(self, value: dict[str, Any] | None) -> None:
        self.value = value
        self._key = json.dumps(value, sort_keys=True, default=repr)

    def __hash__(self) -> int:
        return hash(self._key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Frozen) and other._key == self._key

    def __repr__(self) -> str:  # shows up in xarray's cache-key reprs
        return f"_Frozen({self._key})"


def _open_siff_file(path: str, storage_options: _Frozen, tau_bins: int | None,
                    bin_width_ps: float | None, base_resolution_ps: float,
                    index_cache: bool | str | None, mode: str = "r") -> SiffFile:
    """Open a file for the file managers (module level so that it pickles).

    ``mode`` is always ``"r"``: it is passed explicitly because xarray's "no mode"
    sentinel does not survive pickling to another process.
    """
    if mode != "r":
        raise ValueError(f"{path}: siff-xarray opens files read-only (mode={mode!r})")
    return SiffFile(path, storage_options=storage_options.value, tau_bins=tau_bins,
                    bin_width_ps=bin_width_ps, base_resolution_ps=base_resolution_ps,
                    index_cache=index_cache)


def _manager(source: Any, storage_options: dict[str, Any] | None, tau_bins: int | None,
             bin_width_ps: float | None, base_resolution_ps: float,
             index_cache: bool | str | os.PathLike[str] | None) -> Any:
    """Return a CachingFileManager for paths and URLs, a DummyFileManager for file objects."""
    if isinstance(source, (str, os.PathLike)):
        cache = os.fspath(index_cache) if isinstance(index_cache, os.PathLike) else index_cache
        return CachingFileManager(_open_siff_file, os.fspath(source), _Frozen(storage_options),
                                  tau_bins, bin_width_ps, base_resolution_ps, cache, mode="r")
    if isinstance(source, SiffFile):
        return DummyFileManager(source)
    return DummyFileManager(SiffFile(source, storage_options=storage_options, tau_bins=tau_bins,
                                     bin_width_ps=bin_width_ps,
                                     base_resolution_ps=base_resolution_ps,
                                     index_cache=index_cache))


# ---------------------------------------------------------------------- decoding per kind

def _read_intensity(f: SiffFile, frames: np.ndarray, opts: dict[str, Any]) -> np.ndarray:
    return f.read_frames(frames)


def _read_photon_count(f: SiffFile, frames: np.ndarray, opts: dict[str, Any]) -> np.ndarray:
    n = f.index.n_photons[frames].astype(np.uint32)
    tiff = f.index.encoding[frames] == ENC_TIFF
    if tiff.any():  # intensity-only pages: the photon count is the image sum
        n[tiff] = f.read_frames(frames[tiff]).sum(axis=(1, 2), dtype=np.uint64)
    return n


def _read_histogram(f: SiffFile, frames: np.ndarray, opts: dict[str, Any]) -> np.ndarray:
    return f.histograms(frames, mode=opts["histogram_mode"]).astype(np.uint32)


def _read_mean_arrival(f: SiffFile, frames: np.ndarray, opts: dict[str, Any]) -> np.ndarray:
    return f.lifetime_images(frames, units="ns", dtype=np.float32)


_KINDS: dict[str, Callable[[SiffFile, np.ndarray, dict[str, Any]], np.ndarray]] = {
    "intensity": _read_intensity,
    "photon_count": _read_photon_count,
    "histogram": _read_histogram,
    "mean_arrival": _read_mean_arrival,
}


class _FrameReader:
    """Reads per-frame results from one or more files, addressed by acquisition frame.

    Acquisition frame ``g`` lives in file ``k`` with ``offsets[k] <= g < offsets[k+1]``
    at local frame ``g - offsets[k]``. Holds file managers only, so it pickles.
    """

    def __init__(self, managers: Sequence[Any], offsets: np.ndarray, lock: Any,
                 opts: dict[str, Any]) -> None:
        self.managers = list(managers)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.lock = lock
        self.opts = opts

    def read(self, kind: str, frames: np.ndarray, trailing: tuple[int, ...],
             dtype: np.dtype) -> np.ndarray:
        """Decode ``kind`` for acquisition frames ``frames``; shape ``(F, *trailing)``."""
        if len(frames) == 0:
            return np.empty((0, *trailing), dtype=dtype)
        fn = _KINDS[kind]
        if len(self.managers) == 1:  # one file: no gathering copy
            return self._read_one(0, fn, frames)
        out = np.empty((len(frames), *trailing), dtype=dtype)
        file_of = np.searchsorted(self.offsets, frames, side="right") - 1
        for k in np.unique(file_of).tolist():
            sel = file_of == k
            out[sel] = self._read_one(k, fn, frames[sel] - self.offsets[k])
        return out

    def _read_one(self, k: int, fn: Callable[[SiffFile, np.ndarray, dict[str, Any]],
                                             np.ndarray], local: np.ndarray) -> np.ndarray:
        with self.managers[k].acquire_context() as f:
            if self.lock:
                with self.lock:
                    return fn(f, local, self.opts)
            return fn(f, local, self.opts)

    def close(self) -> None:
        """Close every file (they reopen if data is read again)."""
        for m in self.managers:
            m.close()


def _outer_take(a: np.ndarray, key: tuple[Any, ...], first_axis: int = 0) -> np.ndarray:
    """Apply an outer-indexing key (ints, slices, 1-D int arrays) from ``first_axis`` on."""
    for axis in reversed(range(len(key))):  # last axis first: int keys drop axes
        k = key[axis]
        ax = first_axis + axis
        if isinstance(k, slice):
            if k != slice(None):
                a = a[(slice(None),) * ax + (k,)]
        elif isinstance(k, (int, np.integer)):
            a = np.take(a, int(k), axis=ax)
        else:
            a = np.take(a, np.asarray(k, dtype=np.int64), axis=ax)
    return a


class SiffBackendArray(BackendArray):
    """A lazily decoded frame-sized variable (``IndexingSupport.OUTER``).

    The leading axes are the frame axes (time, z, [repeat], channel), mapped to
    acquisition frames by ``frame_map`` (-1: never written, filled with ``fill``);
    the trailing axes (``y, x`` or ``tau``, or none) come from decoding. Whole
    frames are decoded straight into request order, then cut in numpy.
    """

    def __init__(self, reader: _FrameReader, kind: str, frame_map: np.ndarray,
                 trailing: tuple[int, ...], dtype: np.dtype | type, fill: Any = 0) -> None:
        self.reader = reader
        self.kind = kind
        self.frame_map = frame_map
        self.trailing = tuple(int(t) for t in trailing)
        self.dtype = np.dtype(dtype)
        self.shape = tuple(frame_map.shape) + self.trailing
        self.fill = fill

    def __getitem__(self, key: indexing.ExplicitIndexer) -> np.ndarray:
        return indexing.explicit_indexing_adapter(
            key, self.shape, indexing.IndexingSupport.OUTER, self._getitem)

    def _getitem(self, key: tuple[Any, ...]) -> np.ndarray:
        nlead = self.frame_map.ndim
        sub = _outer_take(self.frame_map, key[:nlead])
        frames = sub.reshape(-1)
        present = frames >= 0
        trailing_key = key[nlead:]
        if present.all():  # the common case: decode straight into request order
            data = self.reader.read(self.kind, frames, self.trailing, self.dtype)
            data = _outer_take(data, trailing_key, first_axis=1)
            return data.reshape(sub.shape + data.shape[1:])
        data = self.reader.read(self.kind, frames[present], self.trailing, self.dtype)
        data = _outer_take(data, trailing_key, first_axis=1)
        out = np.full((frames.size, *data.shape[1:]), self.fill, dtype=self.dtype)
        out[present] = data
        return out.reshape(sub.shape + data.shape[1:])


# ---------------------------------------------------------------------- building the Dataset

def _chunks_in_time(frame_dims: tuple[str, ...], frame_map: np.ndarray, trailing: tuple[str, ...],
                    trailing_shape: tuple[int, ...], itemsize: int, chunk_bytes: int
                    ) -> dict[str, int]:
    """Preferred chunks: whole frames, whole volumes, ``~chunk_bytes`` per chunk in time."""
    per_frame = int(np.prod(trailing_shape, dtype=np.int64)) * itemsize
    shape = frame_map.shape
    per_volume = max(1, int(np.prod(shape[1:], dtype=np.int64)) * per_frame)
    chunks = dict(zip(frame_dims, shape, strict=True))
    chunks.update(zip(trailing, trailing_shape, strict=True))
    if per_volume <= chunk_bytes:
        chunks["time"] = max(1, min(shape[0], chunk_bytes // per_volume))
    else:  # a volume is too big for one chunk: one frame per chunk
        chunks.update({d: 1 for d in frame_dims})
    return chunks


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


def _attrs(first: SiffFile, ip: ImParams, names: list[str], opts: dict[str, Any]
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
        "channels_saved": list(ip.colors),
        "histogram_mode": opts["histogram_mode"],
        "base_resolution_ps": opts["base_resolution_ps"],
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
            SiffWarning, stacklevel=4)


def _build(files: list[SiffFile], managers: list[Any], *, drop_variables: Iterable[str],
           decode_times: bool, flim: bool, partial_volume: PartialVolume,
           histogram_mode: HistogramMode, lock: Any, chunk_bytes: int,
           base_resolution_ps: float, tau_bins: int | None, bin_width_ps: float | None
           ) -> xr.Dataset:
    if partial_volume not in ("keep", "drop"):
        raise ValueError(f"partial_volume must be 'keep' or 'drop', got {partial_volume!r}")
    if histogram_mode not in ("drop", "clip", "wrap", "corrosiff"):
        raise ValueError("histogram_mode must be 'drop', 'clip', 'wrap' or 'corrosiff', got "
                         f"{histogram_mode!r}")
    first = files[0]
    names = [f.name for f in files]
    acq = Acquisition(files)  # checks that the parts belong together; numbers their frames
    offsets = acq.offsets
    counts = np.diff(offsets)
    shape = acq.frame_shape
    ip = acq.im_params(tau_bins=tau_bins, bin_width_ps=bin_width_ps,
                       base_resolution_ps=base_resolution_ps)
    if len(files) == 1:
        _warn_if_continuation(first, ip)
    drop = set(drop_variables)
    opts = {"histogram_mode": histogram_mode, "base_resolution_ps": base_resolution_ps}
    reader = _FrameReader(managers, offsets[:-1], lock, opts)

    fmap = ip.frame_indices(include_partial=partial_volume == "keep")  # (T, Z, R, C)
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
    if decode_times:
        epoch = epoch.view("datetime64[ns]")
    else:
        epoch_attrs.update(units="ns since 1970-01-01",
                           description="int64 nanoseconds; the int64 minimum marks a missing "
                                       "frame")
    t_first = frame_time.reshape(fmap.shape[0], -1)[:, 0]
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
        enc = {"preferred_chunks": _chunks_in_time(frame_dims, fmap, trailing_dims, trailing,
                                                   np.dtype(dtype).itemsize, chunk_bytes),
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
    n_hist = (ip.num_bins + 2 if histogram_mode == "corrosiff" else ip.num_bins) if has_flim \
        else 0
    if has_flim:
        lazy("histogram", "histogram", ("tau",), (n_hist,), np.uint32,
             {"long_name": "photon arrival-time histogram of the frame", "units": "photons",
              "histogram_mode": histogram_mode})
        if flim:
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

    events = ts.events  # frames already numbered across the parts
    if events and not {"event_time", "event_frame", "event_text"} <= drop:
        ev_frame = np.array([e.frame for e in events], dtype=np.int64)
        ev = {
            "event_time": xr.Variable("event", np.array([e.time_s for e in events], float),
                                      {"long_name": "appended text timestamp", "units": "s"}),
            "event_frame": xr.Variable("event", ev_frame,
                                       {"long_name": "frame the text was appended to"}),
            "event_text": xr.Variable("event", np.array([e.text for e in events],
                                                        dtype=_VLEN_STR),
                                      {"long_name": "appended text"}),
        }
        data_vars.update({k: v for k, v in ev.items() if k not in drop})

    coords: dict[Hashable, xr.Variable] = {
        "time": xr.Variable("time", t_first, {
            "long_name": "experiment time of the volume's first frame", "units": "s"}),
        "z": xr.Variable("z", ip.z_positions, {"long_name": "slice z position (relative)",
                                               "units": "um"}),
        "channel": xr.Variable("channel", np.asarray(ip.colors, dtype=np.int64),
                               {"long_name": "ScanImage channel number"}),
        "channel_name": xr.Variable("channel", np.array(ip.channel_names, dtype=_VLEN_STR)),
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
    ds.set_close(reader.close)
    return ds


def _drop_set(drop_variables: str | Iterable[str] | None) -> set[str]:
    if drop_variables is None:
        return set()
    if isinstance(drop_variables, str):
        return {drop_variables}
    return set(drop_variables)


def _open_files(sources: Sequence[Any], storage_options: dict[str, Any] | None,
                tau_bins: int | None, bin_width_ps: float | None, base_resolution_ps: float,
                index_cache: bool | str | os.PathLike[str] | None
                ) -> tuple[list[SiffFile], list[Any]]:
    managers, files = [], []
    try:
        for s in sources:
            m = _manager(s, storage_options, tau_bins, bin_width_ps, base_resolution_ps,
                         index_cache)
            managers.append(m)
            files.append(m.acquire())
    except BaseException:
        for m in managers:
            m.close()
        raise
    return files, managers


def open_siff(
    filename_or_obj: str | os.PathLike[str] | Any,
    *,
    drop_variables: str | Iterable[str] | None = None,
    decode_times: bool = True,
    flim: bool = False,
    partial_volume: PartialVolume = "keep",
    histogram_mode: HistogramMode = "drop",
    tau_bins: int | None = None,
    bin_width_ps: float | None = None,
    base_resolution_ps: float = 5.0,
    storage_options: dict[str, Any] | None = None,
    lock: Any = None,
    chunk_bytes: int = 16 * 2**20,
    index_cache: bool | str | os.PathLike[str] | None = None,
) -> xr.Dataset:
    """Open a ``.siff`` (or ScanImage ``.tif``) file as a lazy, labelled Dataset.

    Same as ``xr.open_dataset(filename_or_obj, engine="siff", ...)``; pass
    ``chunks={}`` there (or call ``.chunk()``) for Dask arrays in whole-frame chunks.

    Parameters
    ----------
    filename_or_obj
        Local path, fsspec URL (``s3://``, ``https://``, ``memory://``, ``file://``),
        open binary file object, or a :class:`~siff_xarray.SiffFile`.
    drop_variables
        Variables (or coordinates) to leave out; dropped lazy variables are never read.
    decode_times
        ``True`` (default): ``epoch`` is ``datetime64[ns]``; ``False`` (also implied
        by ``decode_cf=False``): ``int64`` nanoseconds since 1970-01-01 (same values).
    flim
        Also provide ``mean_arrival`` (per-pixel mean arrival time, ns), lazily.
    partial_volume
        ``"keep"`` (default): an incomplete last volume is a timepoint whose missing
        frames read as 0 (``frame_present`` says which exist); ``"drop"``: leave it out.
    histogram_mode
        How ``histogram`` treats arrival times ``>= Tau_bins``: ``"drop"`` (default),
        ``"clip"``, ``"wrap"``, or ``"corrosiff"`` (``Tau_bins + 2`` bins, modulo).
    tau_bins, bin_width_ps, base_resolution_ps
        Overrides of the arrival-time axis (see :class:`~siff_xarray.SiffFile`).
    storage_options
        fsspec options for URLs (e.g. ``{"anon": True}`` or an S3 ``endpoint_url``).
    lock
        Optional lock held while decoding (reads are thread-safe without one).
    chunk_bytes
        Target size of the preferred (Dask) chunks; chunks hold whole frames.
    index_cache
        Persistent frame-index cache: ``None`` (default) for paths and URLs (not file
        objects), a directory to use that one, ``False`` never (see
        :class:`~siff_xarray.SiffFile`).

    Returns
    -------
    xarray.Dataset
        See the module docstring and ``docs/dataset.md`` for the layout.

    """
    return _open([filename_or_obj], drop_variables=drop_variables, decode_times=decode_times,
                 flim=flim, partial_volume=partial_volume, histogram_mode=histogram_mode,
                 tau_bins=tau_bins, bin_width_ps=bin_width_ps,
                 base_resolution_ps=base_resolution_ps, storage_options=storage_options,
                 lock=lock, chunk_bytes=chunk_bytes, index_cache=index_cache)


def _open(sources: Sequence[Any], *, storage_options: dict[str, Any] | None,
          tau_bins: int | None, bin_width_ps: float | None, base_resolution_ps: float,
          index_cache: bool | str | os.PathLike[str] | None,
          drop_variables: str | Iterable[str] | None, **build: Any) -> xr.Dataset:
    """Open ``sources`` (one file, or the parts of one acquisition) and build the Dataset."""
    files, managers = _open_files(sources, storage_options, tau_bins, bin_width_ps,
                                  base_resolution_ps, index_cache)
    try:
        return _build(files, managers, drop_variables=_drop_set(drop_variables),
                      base_resolution_ps=base_resolution_ps, tau_bins=tau_bins,
                      bin_width_ps=bin_width_ps, **build)
    except BaseException:
        for m in managers:
            m.close()
        raise


def _expand(paths_or_glob: str | os.PathLike[str] | Sequence[Any],
            storage_options: dict[str, Any] | None) -> list[Any]:
    if isinstance(paths_or_glob, (str, os.PathLike)):
        pattern = os.fspath(paths_or_glob)
        if any(ch in pattern for ch in "*?["):
            if "://" in pattern and not pattern.startswith("file://"):
                import fsspec

                fs, _, found = fsspec.get_fs_token_paths(pattern,
                                                         storage_options=storage_options)
                protocol = fs.protocol[0] if isinstance(fs.protocol, tuple) else fs.protocol
                paths = sorted(f"{protocol}://{p}" for p in found)
            else:
                paths = sorted(glob.glob(pattern.removeprefix("file://")))
            if not paths:
                raise FileNotFoundError(f"no files match {pattern!r}")
            return paths
        return [pattern]
    paths = list(paths_or_glob)
    if not paths:
        raise ValueError("open_acquisition needs at least one file")
    return paths


def open_acquisition(
    paths_or_glob: str | os.PathLike[str] | Sequence[Any],
    *,
    drop_variables: str | Iterable[str] | None = None,
    decode_times: bool = True,
    flim: bool = False,
    partial_volume: PartialVolume = "keep",
    histogram_mode: HistogramMode = "drop",
    tau_bins: int | None = None,
    bin_width_ps: float | None = None,
    base_resolution_ps: float = 5.0,
    storage_options: dict[str, Any] | None = None,
    lock: Any = None,
    chunk_bytes: int = 16 * 2**20,
    index_cache: bool | str | os.PathLike[str] | None = None,
) -> xr.Dataset:
    """Open the numbered files of one acquisition (``name_00001.siff``, ...) as one Dataset.

    ScanImage splits long acquisitions into files of a fixed number of frames; a
    volume may start in one file and end in the next. The files are joined frame by
    frame (in the order given; a glob is sorted by name), so volumes, timing and
    events continue across files. ``frame_index`` then counts frames of the whole
    acquisition; ``attrs["file_frame_offsets"]`` gives each file's first frame.

    Parameters
    ----------
    paths_or_glob
        A glob pattern (local or fsspec URL) or a sequence of paths/URLs.
    drop_variables, decode_times, flim, partial_volume, histogram_mode
        As for :func:`open_siff`.
    tau_bins, bin_width_ps, base_resolution_ps, storage_options, lock, chunk_bytes
        As for :func:`open_siff`.
    index_cache
        As for :func:`open_siff`.

    Raises
    ------
    ValueError
        If the files' ScanImage headers or frame shapes differ (not one acquisition).

    """
    return _open(_expand(paths_or_glob, storage_options), drop_variables=drop_variables,
                 decode_times=decode_times, flim=flim, partial_volume=partial_volume,
                 histogram_mode=histogram_mode, tau_bins=tau_bins, bin_width_ps=bin_width_ps,
                 base_resolution_ps=base_resolution_ps, storage_options=storage_options,
                 lock=lock, chunk_bytes=chunk_bytes, index_cache=index_cache)
