"""Photon reductions behind ``ds.siff``: a table of reductions and the blocks that run them.

Each :class:`Reduction` says what one photon reduction returns (how many parts,
its trailing dimensions, dtype and fill value for frames never acquired) and how
to compute it on a photon source (:class:`~siff_xarray.SiffFile` or
:class:`~siff_xarray.store.StorePhotons`, whose public methods do the work in
the reader's Numba kernels). :func:`reduce_photons` lays the Dataset's frames
out in blocks along ``time`` (one Dask task per ``time`` chunk of a Dask-backed
Dataset) and :func:`reduce_block` runs one block; it opens the source itself,
so it runs on any Dask worker.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr

from .._progress import Reporter

if TYPE_CHECKING:  # the reader (and Numba) load when a reduction runs, not on import
    from ..reader.index_cache import IndexHint

__all__ = ["EAGER_BLOCK_FRAMES", "REDUCTIONS", "PhotonSource", "Reduction", "bin_ns",
           "reduce_block", "reduce_photons"]


#: frames reduced at a time on an eager Dataset (bounds memory; the progress steps)
EAGER_BLOCK_FRAMES = 4096


@dataclass(frozen=True)
class PhotonSource:
    """Where a Dataset's photons are: one local ``.siff`` or a converted store."""

    kind: str  # "siff" or "store"
    path: str
    storage_options: dict[str, Any] | None = None
    #: remote ``.siff``: carries the frame index this process knows to Dask workers
    hint: IndexHint | None = None
    #: remote ``.siff``: whether reads require the version the Dataset was opened at
    pin_version: bool = True

    def _create(self) -> Any:
        if self.kind == "siff":
            from ..reader.siff_file import SiffFile

            return SiffFile(self.path, storage_options=self.storage_options,
                            version=self.hint.version if self.hint else None,
                            pin_version=self.pin_version)
        from ..store.read import StorePhotons

        return StorePhotons(self.path, storage_options=self.storage_options)

    def open(self) -> contextlib.AbstractContextManager[Any]:
        """Return the open source as a context manager (with the photon reductions).

        Sources stay open between blocks in this process (the last
        :data:`MAX_OPEN`), as xarray's file managers keep files open: a Dask worker
        running many blocks of one file opens it once. A local file replaced or
        modified since it was opened is opened again. A source dropped from the
        cache (by a newer one, or because its file changed) is closed only when the
        last block using it is done, never under a running read.
        """
        key = (self.kind, self.path, json.dumps(self.storage_options, sort_keys=True,
                                                default=repr), self.pin_version)
        stamp = _local_stamp(self.path)
        with _OPEN_LOCK:
            held = _OPEN.get(key)
            if held is not None and held.stamp == stamp:
                _OPEN.move_to_end(key)
                held.users += 1
                return _using(held)
        created = _Held(self._create(), stamp)
        with _OPEN_LOCK:
            held = _OPEN.get(key)
            if held is not None and held.stamp == stamp:
                # another thread opened it meanwhile and may be reading it: use that one
                # and close ours (closing theirs broke their read: bad file descriptor)
                _OPEN.move_to_end(key)
                retired = [created]
            else:
                old = _OPEN.pop(key, None)
                _OPEN[key] = held = created
                retired = [old] if old is not None else []
                while len(_OPEN) > MAX_OPEN:
                    retired.append(_OPEN.popitem(last=False)[1])
            held.users += 1
            to_close = [r.obj for r in retired if r.retire()]
        for obj in to_close:
            with contextlib.suppress(Exception):
                obj.close()
        return _using(held)


class _Held:
    """An open source in the cache: how many blocks use it, and whether it was dropped."""

    def __init__(self, obj: Any, stamp: tuple[int, ...] | None) -> None:
        self.obj = obj
        self.stamp = stamp
        self.users = 0
        self.retired = False

    def retire(self) -> bool:
        """Mark it dropped from the cache (lock held); True if nobody uses it now."""
        self.retired = True
        return self.users == 0


@contextlib.contextmanager
def _using(held: _Held) -> Iterator[Any]:
    """Yield the source of ``held`` (whose use the caller counted); close it last if dropped."""
    try:
        yield held.obj
    finally:
        with _OPEN_LOCK:
            held.users -= 1
            close = held.retired and held.users == 0
        if close:
            with contextlib.suppress(Exception):
                held.obj.close()


#: photon sources kept open per process (see :meth:`PhotonSource.open`)
MAX_OPEN = 16
_OPEN: OrderedDict[tuple[str, str, str], _Held] = OrderedDict()
_OPEN_LOCK = threading.Lock()


@atexit.register
def _close_open_sources() -> None:
    """Close the sources still kept open when the interpreter exits (no unclosed files)."""
    with _OPEN_LOCK:
        held = list(_OPEN.values())
        _OPEN.clear()
    for h in held:
        if h.retire():
            with contextlib.suppress(Exception):
                h.obj.close()


def _local_stamp(path: str) -> tuple[int, ...] | None:
    """Identity of a local file or store directory (device, inode, size, mtime)."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


Runner = Callable[[Any, Any, np.ndarray, Any, dict[str, Any]], list[np.ndarray]]


@dataclass(frozen=True)
class Reduction:
    """One photon reduction: its result layout and how to compute it on a source.

    ``run(source, masks, frames, shifts, kw)`` returns a list of ``parts(kw)``
    arrays, each ``(roi, frames, *extra)`` (``roi`` of length 1 without masks).
    """

    run: Runner
    parts: Callable[[dict[str, Any]], int]
    extra_dims: tuple[str, ...]
    dtype: np.dtype
    fill: float = 0.0

    def extra_shape(self, kw: dict[str, Any], ds: xr.Dataset) -> tuple[int, ...]:
        """Sizes of the trailing dimensions for ``kw`` on ``ds``."""
        return tuple(int(kw["n_bins"]) if d == "tau" else int(ds.sizes[d])
                     for d in self.extra_dims)


def _sum_masks(src: Any, masks: Any, f: np.ndarray, sh: Any, kw: dict[str, Any]
               ) -> list[np.ndarray]:
    return [src.sum_masks(masks, f, shifts=sh)]


def _histograms(src: Any, masks: Any, f: np.ndarray, sh: Any, kw: dict[str, Any]
                ) -> list[np.ndarray]:
    return [src.masks_histograms(masks, f, shifts=sh, mode=kw["mode"], n_bins=kw["n_bins"])]


def _mask_flim(src: Any, masks: Any, f: np.ndarray, sh: Any, kw: dict[str, Any]
               ) -> list[np.ndarray]:
    cnt, tsum, g, s = src.masks_flim_sums(masks, f, sh, phasor=kw["phasor"],
                                          harmonic=kw.get("harmonic", 1))
    return [cnt, tsum, g, s] if kw["phasor"] else [cnt, tsum]


def _pixel_mean(src: Any, masks: Any, f: np.ndarray, sh: Any, kw: dict[str, Any]
                ) -> list[np.ndarray]:
    return [src.lifetime_images(f, shifts=sh, units="ns", dtype=np.float32)[None]]


def _pixel_phasor(src: Any, masks: Any, f: np.ndarray, sh: Any, kw: dict[str, Any]
                  ) -> list[np.ndarray]:
    g, s, n = src.phasor_images(f, shifts=sh, harmonic=kw["harmonic"], return_intensity=True)
    return [g[None], s[None], n[None]]


#: every photon reduction ``ds.siff`` runs, by name. Parts: ``sum_masks`` photons;
#: ``histograms`` counts per bin; ``mask_flim`` photons, arrival sum (bins) [, cos sum,
#: sin sum]; ``pixel_mean`` mean arrival (ns); ``pixel_phasor`` g, s, photons.
REDUCTIONS: dict[str, Reduction] = {
    "sum_masks": Reduction(_sum_masks, lambda kw: 1, (), np.dtype(np.int64)),
    "histograms": Reduction(_histograms, lambda kw: 1, ("tau",), np.dtype(np.int64)),
    "mask_flim": Reduction(_mask_flim, lambda kw: 4 if kw["phasor"] else 2, (),
                           np.dtype(np.float64)),
    "pixel_mean": Reduction(_pixel_mean, lambda kw: 1, ("y", "x"), np.dtype(np.float32),
                            np.nan),
    "pixel_phasor": Reduction(_pixel_phasor, lambda kw: 3, ("y", "x"), np.dtype(np.float64),
                              np.nan),
}


def bin_ns(ds: xr.Dataset) -> float:
    """Width of one arrival-time bin in ns, from the attributes or the ``tau`` axis."""
    if "tau_bin_ps" in ds.attrs:
        return float(ds.attrs["tau_bin_ps"]) / 1000.0
    if "tau" in ds.coords and ds.sizes["tau"] > 1:
        return float(ds["tau"].values[1] - ds["tau"].values[0])
    raise ValueError("the arrival-time bin width is unknown: the Dataset has neither a "
                     "tau_bin_ps attribute nor a tau coordinate")


def reduce_block(sources: tuple[PhotonSource, ...], op: str, fmap: np.ndarray,
                 which: np.ndarray, shifts: np.ndarray | None, masks: np.ndarray | None,
                 kw: dict[str, Any], extra: tuple[int, ...]) -> np.ndarray:
    """Reduce the photons of the frames ``fmap`` of the files ``sources[which]``.

    ``fmap`` holds each cell's frame within its source (-1 = never acquired) and
    ``which`` the index of that source in ``sources``. Each source is opened once.
    Returns ``(part, roi, *fmap.shape, *extra)``; missing cells hold the
    reduction's fill value (a pixel phasor's photon count: 0).
    """
    red = REDUCTIONS[op]
    n_parts = red.parts(kw)
    frames = fmap.reshape(-1)
    src_of = which.reshape(-1)
    ok = (frames >= 0) & (src_of >= 0)
    n_roi = 1 if masks is None else masks.shape[0]
    out = np.full((n_parts, n_roi, frames.size, *extra), red.fill, dtype=red.dtype)
    sh_all = None if shifts is None else shifts.reshape(-1, 2)
    for k in np.unique(src_of[ok]):
        cells = ok & (src_of == k)
        sh = None if sh_all is None else sh_all[cells]
        with sources[int(k)].open() as src:
            parts = red.run(src, masks, frames[cells], sh, kw)
        for j, part in enumerate(parts):
            out[j][:, cells] = part
    if op == "pixel_phasor":
        out[2][:, ~ok] = 0
    return out.reshape(n_parts, n_roi, *fmap.shape, *extra)


def reduce_photons(ds: xr.Dataset, sources: tuple[PhotonSource, ...], which: np.ndarray,
                   op: str, fmap: xr.DataArray, shifts: np.ndarray | None,
                   masks: np.ndarray | None = None, **kw: Any) -> xr.DataArray:
    """Run reduction ``op`` over the frames of ``fmap``, eagerly or lazily with Dask.

    ``fmap`` holds each cell's frame within its source, ``which`` (same shape) the
    index of that source in ``sources`` (-1 where never acquired). Returns
    ``(part, roi, *fmap.dims, *extra dims)``. A Dask-backed ``ds`` gives a
    Dask-backed result with one task per ``time`` chunk of ``intensity``;
    otherwise frames are reduced in blocks of about 4096 frames (bounded memory).
    """
    import dask
    import dask.array as da

    red = REDUCTIONS[op]
    n_parts = red.parts(kw)
    extra = red.extra_shape(kw, ds)
    fm = np.asarray(fmap.values)
    n_roi = 1 if masks is None else masks.shape[0]
    had_time = "time" in fmap.dims
    which = np.asarray(which)
    if not had_time:  # e.g. after isel(time=0): one block
        fm, fmap, which = fm[None], fmap.expand_dims("time"), which[None]
        shifts = None if shifts is None else shifts[None]
    t_axis = fmap.dims.index("time")
    chunks = ds.intensity.chunks if "time" in ds.intensity.dims else None
    per_t = max(1, fm.size // max(1, fm.shape[t_axis]))  # cells per timepoint
    if chunks is not None:
        bounds = np.cumsum((0, *chunks[ds.intensity.dims.index("time")]))
    else:
        bounds = np.r_[np.arange(0, fm.shape[t_axis], max(1, EAGER_BLOCK_FRAMES // per_t)),
                       fm.shape[t_axis]]
    # the sources (with their index hints) are one key of the graph, sent to a worker
    # once, not copied into every task
    shared = dask.delayed(sources, pure=True, traverse=False) if chunks is not None else None

    def _block(a: int, b: int) -> Any:
        """Reduce (eager) or schedule (Dask) the cells of timepoints ``[a, b)``."""
        idx = [slice(None)] * fm.ndim
        idx[t_axis] = slice(int(a), int(b))
        fb, wb = fm[tuple(idx)], which[tuple(idx)]
        sb = None if shifts is None else shifts[tuple(idx)]
        if chunks is None:
            return reduce_block(sources, op, fb, wb, sb, masks, kw, extra)
        task = dask.delayed(reduce_block, pure=True)(shared, op, fb, wb, sb, masks, kw, extra)
        return da.from_delayed(task, shape=(n_parts, n_roi, *fb.shape, *extra),
                               dtype=red.dtype)

    # eager: a progress bar over the frames (the default of siff_xarray.set_progress)
    with Reporter(f"ds.siff {op}", fm.size, "frames",
                  False if chunks is not None else None) as bar:
        blocks = [_block(a, b) for a, b in bar.track(itertools.pairwise(bounds),
                                                     lambda ab: (ab[1] - ab[0]) * per_t)]
    if blocks:
        data = (np.concatenate if chunks is None else da.concatenate)(blocks, axis=2 + t_axis)
    else:
        data = np.zeros((n_parts, n_roi, *fm.shape, *extra), dtype=red.dtype)
    coords = {k: v for k, v in fmap.coords.items() if set(v.dims) <= set(fmap.dims)}
    for d in red.extra_dims:
        coords[d] = ds[d]
    out = xr.DataArray(data, dims=("part", "roi", *fmap.dims, *red.extra_dims), coords=coords)
    return out if had_time else out.isel(time=0)
