"""Reading a converted store back: the Dataset, one frame's photons, and photon reductions.

:func:`open_converted` opens the root Dataset (``xr.open_zarr`` with checks).
:class:`StorePhotons` gives a store :class:`~siff_xarray.SiffFile`'s photon
reductions: a converted store keeps each frame's count image (``intensity``, or
``photons/flyback_intensity``) and its arrival times in pixel order
(``photons/arrival_time``), exactly a compressed ``.siff`` frame split in two, so
the requested frames are reassembled into that layout in memory (vectorised, one
covering read of ``arrival_time`` per run of frames) and handed to the same
Numba kernels through :class:`~siff_xarray.reader.reductions.PhotonReductions`.
Histograms, lifetimes, phasors, mask sums and photon lists of a store therefore
equal the source's, frame for frame. Stores whose arrival times need ``uint32``
are reassembled as raw photon records; stores of intensity-only TIFFs as TIFF
pages (intensity and mask sums work; photon reductions raise, as on the TIFF).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from .._paths import normalize
from .._remote import naming_url
from ..errors import IncompleteStoreError, SiffFormatError
from ..format.constants import ENC_COMPRESSED, ENC_RAW, ENC_TIFF
from ..reader.reductions import PhotonReductions, Shifts
from .layout import PLAN_KEY, STARTED_KEY, Plan, Target, quiet_text_dtype

__all__ = ["StorePhotons", "cell_values", "checked", "count_images", "describe_store",
           "frame_positions", "is_converted_store", "open_converted", "open_converted_groups",
           "open_converted_tree", "read_photons"]


def frame_positions(fmap: np.ndarray, n_frames: int) -> np.ndarray:
    """Invert a Dataset's ``frame_index``: the ``(n_frames, ndim)`` cell of each file frame.

    Frames that no cell holds (flyback frames, frames beyond the map) get -1.
    """
    pos = np.full((n_frames, fmap.ndim), -1, dtype=np.int64)
    ok = (fmap >= 0) & (fmap < n_frames)
    pos[fmap[ok]] = np.argwhere(ok)
    return pos


def open_converted(store: str | os.PathLike[str], *,
                   storage_options: dict[str, Any] | None = None,
                   partial_volume: str = "drop", missing_chunks: str = "raise",
                   **kwargs: Any) -> Any:
    """Open a converted store as an xarray Dataset (``xr.open_zarr`` with checks).

    The store keeps every frame, a partial last volume included; as for
    ``xr.open_dataset(..., engine="siff")``, ``partial_volume="drop"`` (default)
    leaves an incomplete last volume out of the Dataset and ``"keep"`` keeps it
    (its missing frames read as 0; ``frame_present`` says which exist).

    A converted store holds every chunk of every array, so a chunk that is not
    there was deleted or lost: with ``missing_chunks="raise"`` (default) reading
    it raises :class:`~siff_xarray.errors.MissingChunkError` naming the
    store and chunk, where plain ``xr.open_zarr`` reads zeros; ``"zeros"`` reads
    as zarr does (``verify`` uses it to list every damage at once). Stores
    written before version 0.2 do not say that they hold every chunk and read as
    zarr does.

    Raises
    ------
    IncompleteStoreError
        If the store is the partial result of an interrupted conversion.

    """
    with naming_url(os.fspath(store)):  # a store that times out or cannot be reached
        # absolute: workers reopen it
        return _open_target(Target(normalize(store), storage_options), partial_volume,
                            missing_chunks, **kwargs)


def _open_target(target: Target, partial_volume: str, missing_chunks: str,
                 **kwargs: Any) -> Any:
    """:func:`open_converted` of a :class:`Target` (callers reuse it for other groups)."""
    import xarray as xr

    from ..backend import drop_partial_volume

    storage_options = target.storage_options
    if target.interrupted() or not target.exists("zarr.json"):
        if target.exists(PLAN_KEY):
            done = len(target.done_batches())
            plan = Plan.from_json(target.read_text(PLAN_KEY))
            raise IncompleteStoreError(
                f"{target.destination}: conversion from {plan.sources[0]} is incomplete "
                f"({done} of {plan.n_batches} batches); run convert(..., resume=True) "
                "(siff-xarray convert --resume) to finish it")
        if target.exists(STARTED_KEY):
            sources = json.loads(target.read_text(STARTED_KEY))["sources"]
            raise IncompleteStoreError(
                f"{target.destination}: conversion from {sources[0]} was interrupted before "
                "its first batch; run convert(..., resume=True) (siff-xarray convert "
                "--resume) to start it again")
        raise FileNotFoundError(f"{target.destination}: not a converted siff-xarray store")
    # stores of this version hold consolidated metadata; older ones fall back (warning)
    kwargs.setdefault("consolidated", None)
    with quiet_text_dtype():
        ds = checked(lambda: xr.open_zarr(target.reader(missing_chunks), **kwargs),
                     target.destination, "a coordinate read at open", array=False)
    ds = drop_partial_volume(ds, partial_volume)
    # where the photons are, for ds.siff's photon reductions (the store may have moved)
    ds.encoding["source"] = target.destination
    if "source_file" in ds and "source_frame" in ds:
        here = np.where(np.asarray(ds.source_frame.values) >= 0,
                        normalize(target.destination), "")
        ds["source_file"] = ds.source_file.copy(data=here)
    if storage_options:
        ds.encoding["storage_options"] = storage_options
    return ds


def open_converted_groups(store: str | os.PathLike[str], *,
                          storage_options: dict[str, Any] | None = None,
                          partial_volume: str = "drop", **kwargs: Any) -> dict[str, Any]:
    """Every group of a converted store as Datasets: ``{"/": ..., "/photons": ..., ...}``.

    ``"/"`` is :func:`open_converted`'s Dataset, ``"/photons"`` the photons group
    and ``"/ome/0"``, ``"/ome/1"``... the OME pyramid levels. A level's ``y``/``x``
    are named ``y_k``/``x_k`` (``k`` its level): NGFF requires the stored names
    ``y``/``x``, and a DataTree would not align a half-size ``y`` with the root's.
    Keyword arguments go to ``xr.open_zarr`` (``chunks=`` ...).
    """
    import xarray as xr

    target = Target(normalize(store), storage_options)
    with naming_url(target.destination):
        root = _open_target(target, partial_volume, "raise", **kwargs)
    zstore = target.reader()
    kwargs = {"consolidated": None, **kwargs}
    groups: dict[str, Any] = {"/": root}
    with quiet_text_dtype():
        groups["/photons"] = xr.open_zarr(zstore, group="photons", **kwargs)
        if target.exists("ome/zarr.json"):
            import dask.array as da
            import zarr

            ome = zarr.open_group(zstore, path="ome", mode="r")
            groups["/ome"] = xr.Dataset(attrs=dict(ome.attrs))  # the NGFF metadata
            for k in sorted(ome.array_keys(), key=int):
                arr = ome[k]
                dims = [f"{d}_{k}" if d in ("y", "x") else d
                        for d in (arr.metadata.dimension_names or ("t", "c", "z", "y", "x"))]
                data = (_lazy_level(arr) if "chunks" in kwargs and kwargs["chunks"] is None
                        else da.from_array(arr, chunks=arr.chunks, lock=False, asarray=True))
                groups[f"/ome/{k}"] = xr.Dataset({"intensity": (dims, data)},
                                                 attrs={"level": int(k)})
    return groups


def _lazy_level(arr: Any) -> Any:
    """Wrap a zarr array as xarray's lazily indexed array (``chunks=None``: no Dask)."""
    from xarray.backends import BackendArray
    from xarray.core import indexing

    class Level(BackendArray):
        def __init__(self) -> None:
            self.shape, self.dtype = arr.shape, arr.dtype

        def __getitem__(self, key: Any) -> np.ndarray:
            return indexing.explicit_indexing_adapter(
                key, self.shape, indexing.IndexingSupport.BASIC,
                lambda k: np.asarray(arr[k]))

    return indexing.LazilyIndexedArray(Level())


def open_converted_tree(store: str | os.PathLike[str], **kwargs: Any) -> Any:
    """Open a converted store as an ``xarray.DataTree`` (see :func:`open_converted_groups`)."""
    from xarray import DataTree

    groups = open_converted_groups(store, **kwargs)
    tree = DataTree.from_dict(groups)
    tree.set_close(lambda: [ds.close() for ds in groups.values()])
    return tree


def read_photons(source: Any, frame: int, *, storage_options: dict[str, Any] | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """``(pixel_index, arrival_time)`` of one file frame, pixel-sorted, from either form.

    ``source`` is a ``.siff`` path/URL, a :class:`~siff_xarray.SiffFile`, or a
    converted store (path/URL ending in ``.zarr`` or holding ``photons/``). Both give
    identical arrays (``uint32``) for the same frame.
    """
    from ..reader.siff_file import SiffFile

    if isinstance(source, SiffFile):
        return source.photons(frame)
    path = os.fspath(source)
    target = Target(path, storage_options)
    if not target.exists("photons/zarr.json"):
        with SiffFile(path, storage_options=storage_options) as f:
            return f.photons(frame)
    with StorePhotons(path, storage_options=storage_options) as p:
        return p.photons(frame)


def checked(read: Any, store: str, what: str, *, array: bool = True) -> Any:
    """Run ``read()`` (a read of store data) and name the store when a chunk is damaged.

    Returns the result as a numpy array (``array=False``: as it is).

    Every chunk carries a CRC32C checksum; zarr reports a mismatch as a bare
    ValueError, which becomes a :class:`SiffFormatError` naming the store and array.
    """
    try:
        return np.asarray(read()) if array else read()
    except ValueError as e:
        if "checksum" not in str(e) or isinstance(e, SiffFormatError):
            raise
        raise SiffFormatError(store, f"{what}: a chunk is damaged (its checksum does not "
                              "match; siff-xarray verify lists every damaged chunk); restore "
                              "the store from a copy or convert the source again") from e


def count_images(ds: Any, grp: Any, fr: np.ndarray, pos: np.ndarray, fly: np.ndarray,
                  shape: tuple[int, int], keep: list[tuple[int, np.ndarray]] | None = None
                  ) -> np.ndarray:
    """Count images of file frames ``fr`` from a store (imaging and flyback frames).

    ``keep``: a list that receives ``(t0, block)``, the whole timepoints of
    ``intensity`` read for the imaging frames (from time index ``t0``), for a
    caller that checks them too.
    """
    out = np.zeros((len(fr), *shape), dtype=ds.intensity.dtype)
    k = np.searchsorted(fly, fr)
    is_fly = (k < fly.size) & (fly[np.minimum(k, max(fly.size - 1, 0))] == fr) if fly.size \
        else np.zeros(len(fr), bool)
    if is_fly.any():
        rows = k[is_fly]
        block = checked(lambda: grp["flyback_intensity"][int(rows.min()) : int(rows.max()) + 1],
                        str(ds.encoding.get("source", "store")), "photons/flyback_intensity")
        out[is_fly] = block[rows - rows.min()]
    img = ~is_fly
    if img.any():
        out[img] = cell_values(ds, "intensity", pos[fr[img]], keep)
    return out


def cell_values(ds: Any, name: str, cells: np.ndarray,
                keep: list[tuple[int, np.ndarray]] | None = None) -> np.ndarray:
    """Values of variable ``name`` at Dataset cells ``(n, ndim)`` (time first).

    Reads the time range the cells span once (a damaged chunk named, as
    :func:`checked` does) and picks the cells from it; ``keep`` receives
    ``(first time index, that block)``.
    """
    t0, t1 = int(cells[:, 0].min()), int(cells[:, 0].max()) + 1
    block = checked(lambda: ds[name].isel(time=slice(t0, t1)).values,
                    str(ds.encoding.get("source", "store")), name)
    if keep is not None:
        keep.append((t0, block))
    at = cells.copy()
    at[:, 0] -= t0
    return block[tuple(at.T)]


_GAP = 1 << 20  # arrival times skipped rather than split into another read


#: bytes of ``photons/zarr.json`` read to tell a store (the metadata is a few hundred)
_STORE_MARK_BYTES = 1 << 16


def describe_store(store: str | os.PathLike[str],
                   storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Summarize a finished converted store (what ``siff-xarray info STORE`` prints).

    Parameters
    ----------
    store
        Path or fsspec URL of a store written by :func:`siff_xarray.convert`.
    storage_options
        fsspec options for a store URL.

    Returns
    -------
    dict
        ``store``, ``source_file``, ``frames`` and ``photons`` (every file frame's,
        flyback included), ``sizes`` of the Dataset's dimensions, ``variables``,
        ``ome_levels`` and ``siff_zarr_version``.

    Raises
    ------
    IncompleteStoreError
        If the store is an unfinished conversion (it says how far it got and how
        to finish it), as :func:`open_converted` does.
    FileNotFoundError
        If there is no converted store at ``store``.

    """
    import zarr

    target = Target(normalize(os.fspath(store)), storage_options)
    with open_converted(store, storage_options=storage_options) as ds:
        root = zarr.open_group(target.reader(), mode="r")
        grp = root["photons"]
        counts = checked(lambda: np.asarray(grp["photon_count"][...]), target.destination,
                         "photons/photon_count")
        return {
            "store": target.destination,
            "source_file": ds.attrs.get("source_file"),
            "frames": int(counts.size),
            "photons": int(counts.sum(dtype=np.int64)),
            "sizes": {str(k): int(v) for k, v in ds.sizes.items()},
            "variables": sorted(str(v) for v in ds.data_vars),
            "ome_levels": len(list(root["ome"].array_keys())) if "ome" in root else 0,
            "siff_zarr_version": grp.attrs.get("siff_zarr_version"),
        }


def is_converted_store(path: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Tell whether ``path`` (local or URL) is a converted store with a ``photons`` group.

    Its ``photons/zarr.json`` (at most the first 64 KiB) must be a Zarr v3 group's
    metadata: that something answers at that path is not enough, as web servers
    that answer every path (a download link that redirects each path under it to
    its file, an application's catch-all page) would make any URL a store. One
    request on a remote store, as an existence check was.
    """
    try:
        meta = json.loads(Target(path, storage_options).read_head("photons/zarr.json",
                                                                  _STORE_MARK_BYTES))
    except Exception:  # none, refused, not JSON... (aiohttp's errors are not OSErrors)
        return False
    return isinstance(meta, dict) and meta.get("node_type") == "group" \
        and meta.get("zarr_format") == 3


class StorePhotons(PhotonReductions):
    """The photons of a converted store, with :class:`SiffFile`'s reduction methods.

    Parameters
    ----------
    store
        Path or fsspec URL of a store written by :func:`siff_xarray.convert`.
    storage_options
        fsspec options for URLs.

    Examples
    --------
    >>> with StorePhotons("run.zarr") as p:                 # doctest: +SKIP
    ...     hist = p.masks_histograms(masks, frames=range(100))

    """

    def __init__(self, store: str | os.PathLike[str], *,
                 storage_options: dict[str, Any] | None = None) -> None:
        import zarr

        self._target = Target(normalize(store), storage_options)
        self.name = self._target.destination
        with naming_url(self.name):  # one Target: the store's metadata are read once
            self._ds = _open_target(self._target, "keep", "raise", chunks=None)
        try:
            grp = zarr.open_group(self._target.reader(), path="photons", mode="r")
        except (FileNotFoundError, KeyError, ValueError) as exc:
            self._ds.close()
            raise FileNotFoundError(f"{self.name}: no photons group (not a converted "
                                    "siff-xarray store?)") from exc
        self._grp = grp
        self._arrivals = grp["arrival_time"]
        self._start = np.asarray(grp["photon_start"][...]).astype(np.int64)
        self._count = np.asarray(grp["photon_count"][...]).astype(np.int64)
        self._fly = np.asarray(grp["flyback_frame"][...]).astype(np.int64)
        self._enc = np.asarray(grp["encoding"][...]).astype(np.int64)
        self._signed_pages = (np.asarray(grp["signed"][...]).astype(bool) if "signed" in grp
                              else np.zeros(self._enc.size, dtype=bool))
        self.num_frames = int(self._count.size)
        self._fmap_dims = self._ds.frame_index.dims
        self._pos = frame_positions(self._ds.frame_index.values, self.num_frames)
        self._shape = (int(self._ds.sizes["y"]), int(self._ds.sizes["x"]))
        self._wide = np.dtype(self._arrivals.dtype).itemsize > 2

    def close(self) -> None:
        """Release the store."""
        self._ds.close()

    # ------------------------------------------------------------------ hooks

    def _default_n_bins(self) -> int | None:
        v = self._ds.attrs.get("n_tau_bins")
        return None if v is None else int(v)

    def _picoseconds_per_bin(self) -> float | None:
        v = self._ds.attrs.get("tau_bin_ps")
        return None if v is None else float(v)

    def _n_photons(self, f: np.ndarray) -> np.ndarray:
        return self._count[f]

    def _signed(self, f: np.ndarray) -> bool:
        return bool((self._enc[f] == ENC_TIFF).all() and self._signed_pages[f].all())

    def _frame_planes(self, f: np.ndarray, n_planes: int) -> np.ndarray:
        nz = int(self._ds.sizes["z"])
        if n_planes != nz:
            raise ValueError(f"3-D masks have {n_planes} planes but the store has {nz}")
        z = self._pos[f, self._fmap_dims.index("z")]
        if (z < 0).any():
            bad = int(f[np.flatnonzero(z < 0)[0]])
            raise ValueError(f"frame {bad} is a flyback frame: it has no z plane for a "
                             "3-D mask")
        return z

    def _count_images(self, f: np.ndarray) -> np.ndarray:
        return count_images(self._ds, self._grp, f, self._pos, self._fly, self._shape)

    def _read_arrivals(self, starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Arrival times of frames (given their first photon and count), concatenated."""
        total = int(counts.sum())
        out = np.empty(total, dtype=self._arrivals.dtype)
        if total == 0:
            return out
        keep = counts > 0
        s, c = starts[keep], counts[keep]
        order = np.argsort(s, kind="stable")
        lo, hi = s[order], (s + c)[order]
        # merge overlapping or nearby intervals into covering reads
        reach = np.maximum.accumulate(hi)
        new = np.r_[True, lo[1:] > reach[:-1] + _GAP]
        run = np.cumsum(new) - 1
        r_lo = lo[new]
        r_hi = np.zeros(r_lo.size, dtype=np.int64)
        np.maximum.at(r_hi, run, hi)
        blocks = [checked(lambda a=a, b=b: self._arrivals[int(a) : int(b)], self.name,
                          "photons/arrival_time") for a, b in zip(r_lo, r_hi, strict=True)]
        base = np.zeros(len(blocks) + 1, dtype=np.int64)
        np.cumsum([b.size for b in blocks], out=base[1:])
        flat = np.concatenate(blocks)
        # photon j of frame i (in request order) sits at global index starts[i] + j
        first = np.zeros(c.size + 1, dtype=np.int64)
        np.cumsum(counts[keep], out=first[1:])
        inv = np.empty_like(order)
        inv[order] = np.arange(order.size)
        frame_run = run[inv]  # the covering read of each frame
        glob = np.repeat(s, c) + (np.arange(first[-1]) - np.repeat(first[:-1], c))
        out[:] = flat[glob - np.repeat(r_lo[frame_run] - base[frame_run], c)]
        return out

    def _frame_args(self, f: np.ndarray, shifts: Shifts = None, photons: bool = False
                    ) -> tuple[tuple, tuple[int, int], int]:
        h, w = self._shape
        hw = h * w
        tiff = self._enc[f] == ENC_TIFF
        if photons and tiff.any():
            raise SiffFormatError(self.name, "frame is a plain TIFF page without photon "
                                  "arrival times", frame=int(f[np.flatnonzero(tiff)[0]]))
        sy, sx = self._shifts(shifts, f, self._shape)
        n = self._count[f]
        imgs = self._count_images(f).reshape(len(f), hw)
        if imgs.dtype != np.uint16:  # signed TIFF samples: the kernels read raw 16 bits
            imgs = imgs.view(np.uint16)
        have = imgs.sum(axis=1, dtype=np.int64)
        bad = np.flatnonzero((have != n) & ~tiff)
        if bad.size:
            i = int(bad[0])
            raise SiffFormatError(self.name, f"the count image holds {int(have[i])} photons "
                                  f"but photon_count says {int(n[i])}", None, int(f[i]))
        tau = self._read_arrivals(self._start[f], n)
        first = np.zeros(len(f) + 1, dtype=np.int64)
        np.cumsum(n, out=first[1:])
        within = np.arange(first[-1]) - np.repeat(first[:-1], n)
        ones = np.ones(len(f), dtype=np.int64)
        if not self._wide:  # compressed layout: count image then arrival times (u16)
            words = np.zeros(len(f) + 1, dtype=np.int64)
            np.cumsum(hw + n, out=words[1:])
            buf16 = np.empty(int(words[-1]), dtype=np.uint16)
            buf16[(words[:-1, None] + np.arange(hw)[None]).ravel()] = imgs.ravel()
            buf16[np.repeat(words[:-1] + hw, n) + within] = tau
            buf = buf16.view(np.uint8)
            enc, off, nbytes = ENC_COMPRESSED * ones, 2 * (words[:-1] + hw), 2 * n
            # TIFF pages: the image alone, read where it starts
            enc, off = np.where(tiff, ENC_TIFF, enc), np.where(tiff, 2 * words[:-1], off)
        else:  # raw photon records: y << 48 | x << 32 | arrival
            pix = np.repeat(np.tile(np.arange(hw, dtype=np.uint64), len(f)), imgs.ravel())
            rec = ((pix // np.uint64(w)) << np.uint64(48)) | \
                ((pix % np.uint64(w)) << np.uint64(32)) | tau.astype(np.uint64)
            buf = rec.view(np.uint8)
            enc, off, nbytes = ENC_RAW * ones, 8 * first[:-1], 8 * n
        args = (buf, enc, off, nbytes, h * ones, w * ones, sy, sx)
        return args, (h, w), max(int(n.max()) if len(f) else 0, 1)
