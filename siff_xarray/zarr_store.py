"""The Zarr layer: lossless, parallel, resumable conversion of ``.siff`` files to Zarr v3.

Layout of a converted store (see ``docs/zarr-layout.md``)::

    /                    the Dataset of ``xr.open_dataset(src, engine="siff")``
      intensity            (time, z, [repeat], channel, y, x) uint16, sharded, Blosc zstd
      photon_count, histogram, frame_index, frame_present, event_*, coordinates, attrs
    /photons             every photon of every file frame (flyback included);
                         attrs: siff_zarr_version (1), source_bytes, layout, tau axis
      arrival_time         (photon,) uint16 (uint32 if any arrival time needs it)
      photon_start         (frame,) uint64   first photon of each file frame
      photon_count         (frame,) uint32   photons of each file frame
      encoding             (frame,) int8     0 raw, 1 compressed (as in the source)
      description          (byte,) uint8     every frame's description text, concatenated
      description_start    (frame,) uint64   and where each starts
      description_length   (frame,) uint32
      experiment_s, epoch_laser_ns, epoch_system_ns   (frame,) timestamps
      flyback_intensity    (flyback, y, x) uint16   count images of flyback frames
      flyback_frame        (flyback,) int64         their file frame indices

Within a frame, photons are stored in pixel order (as compressed ``.siff`` frames
are), so a photon's pixel follows from the frame's count image (``intensity`` for
imaging frames, ``flyback_intensity`` for flyback frames): 2 bytes per photon.
Only the order of photons *within* one pixel of a raw-encoded frame is not kept
(it carries no information: every photon keeps its arrival time).

Conversion runs in batches of whole intensity shards (a time range); each batch's
photons start at an ``arrival_time`` shard boundary, so no two batches ever write
the same chunk or shard and batches may run in any order, on any Dask scheduler.
The root group's metadata (``zarr.json``) is written last: until then the store
cannot be opened as a Zarr group, and :func:`open_converted` says the conversion is
incomplete. Finished batches are recorded under ``.siff-progress/`` so that
``resume=True`` redoes only the missing ones.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConversionError, IncompleteStoreError
from .reader.acquisition import Acquisition
from .reader.ifd import ENC_TIFF

__all__ = [
    "SIFF_ZARR_VERSION",
    "ConversionError",
    "ConversionSummary",
    "IncompleteStoreError",
    "Progress",
    "convert",
    "convert_file",
    "group_acquisitions",
    "open_converted",
    "read_photons",
    "to_siff",
    "verify",
]

log = logging.getLogger(__name__)

SIFF_ZARR_VERSION = 1
PROGRESS = ".siff-progress"
PLAN_KEY = f"{PROGRESS}/plan.json"
ROOT_KEY = f"{PROGRESS}/root-zarr.json"

#: elements per ``arrival_time`` chunk and shard
PHOTON_CHUNK = 1 << 20
PHOTON_SHARD = 1 << 23


class _NeedsWideArrivals(Exception):
    """A batch found an arrival time above 65535: arrival_time must be uint32."""


def _compressor() -> Any:
    from zarr.codecs import BloscCodec

    return BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle")


# ---------------------------------------------------------------------- stores


def _fs_and_root(destination: str | os.PathLike[str],
                 storage_options: dict[str, Any] | None) -> tuple[Any, str]:
    import fsspec

    fs, root = fsspec.core.url_to_fs(os.fspath(destination), **(storage_options or {}))
    return fs, root.rstrip("/")


def _zarr_store(destination: str | os.PathLike[str],
                storage_options: dict[str, Any] | None) -> Any:
    from zarr.storage import FsspecStore, LocalStore

    dst = os.fspath(destination)
    if "://" not in dst or dst.startswith("file://"):
        return LocalStore(dst.removeprefix("file://"))
    return FsspecStore.from_url(dst, storage_options=storage_options or {})


@dataclass
class _Target:
    """Where a store lives: an fsspec filesystem + root path, and the zarr store."""

    destination: str
    storage_options: dict[str, Any] | None

    def __post_init__(self) -> None:
        self.fs, self.root = _fs_and_root(self.destination, self.storage_options)

    def key(self, k: str) -> str:
        return f"{self.root}/{k}"

    def exists(self, k: str) -> bool:
        self.fs.invalidate_cache()  # object stores cache listings; we need the truth
        return bool(self.fs.exists(self.key(k)))

    def read_text(self, k: str) -> str:
        return self.fs.cat_file(self.key(k)).decode()

    def write_text(self, k: str, text: str) -> None:
        path = self.key(k)
        parent = path.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        self.fs.pipe_file(path, text.encode())

    def done_batches(self) -> set[int]:
        self.fs.invalidate_cache()
        try:
            names = self.fs.ls(self.key(PROGRESS), detail=False)
        except FileNotFoundError:
            return set()
        return {int(n.rsplit("-", 1)[1]) for n in names if n.rsplit("/", 1)[-1].startswith(
            "batch-")}

    def zarr(self) -> Any:
        return _zarr_store(self.destination, self.storage_options)


# ---------------------------------------------------------------------- the plan


@dataclass
class _Plan:
    """Everything a batch needs, as plain JSON-able values (shipped to workers)."""

    sources: list[str]
    source_options: dict[str, Any] | None
    destination: str
    destination_options: dict[str, Any] | None
    shard_t: int                      # timepoints per batch (= intensity shard)
    n_timepoints: int
    batch_frames: list[list[int]]     # [first, stop) file frames of each batch
    batch_base: list[int]             # first arrival_time element of each batch
    flyback_base: list[int]           # first flyback_intensity row of each batch
    batch_bytes: list[int]            # source bytes each batch reads (for progress)
    arrival_dtype: str
    n_photons_total: int
    ome: bool = True
    ome_levels: int = 1               # OME pyramid levels (0 = full resolution)
    intensity_only: bool = False      # ScanImage intensity-only TIFF: pages, no photons
    intensity_dtype: str = "uint16"   # int16 for TIFF pages of signed samples

    @property
    def n_batches(self) -> int:
        return len(self.batch_frames)

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> _Plan:
        return cls(**json.loads(text))


def _roundup(x: int, m: int) -> int:
    return -(-x // m) * m


def _chunking(vol_shape: tuple[int, ...], n_t: int, shard_bytes: int, chunk_bytes: int
              ) -> tuple[int, int]:
    """Timepoints per intensity chunk and per shard (a multiple of the chunk)."""
    vol_bytes = int(np.prod(vol_shape, dtype=np.int64)) * 2
    ct = max(1, min(n_t, chunk_bytes // max(vol_bytes, 1)))
    st = max(ct, (shard_bytes // max(vol_bytes, 1)) // ct * ct)
    st = min(st, _roundup(n_t, ct))
    return ct, st


# ---------------------------------------------------------------------- conversion


@dataclass
class ConversionSummary:
    """What :func:`convert` did (also printed by the CLI)."""

    source: str
    destination: str
    frames: int
    photons: int
    source_bytes: int
    store_bytes: int
    seconds: float
    batches: int
    batches_skipped: int

    @property
    def compression_ratio(self) -> float:
        """Source size / store size."""
        return self.source_bytes / self.store_bytes if self.store_bytes else float("nan")


@dataclass
class Progress:
    """State of a running conversion, passed to the ``progress`` callback after each batch."""

    batches_done: int
    batches_total: int
    frames_done: int
    frames_total: int
    bytes_done: int
    bytes_total: int
    photons_done: int
    elapsed_s: float

    @property
    def mb_per_s(self) -> float:
        """Source megabytes converted per second so far (this run)."""
        return self.bytes_done / 1e6 / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def eta_s(self) -> float:
        """Estimated seconds left (NaN before the first batch of this run)."""
        rate = self.bytes_done / self.elapsed_s if self.elapsed_s > 0 else 0.0
        return (self.bytes_total - self.bytes_done) / rate if rate > 0 else float("nan")


class _Tracker:
    """Accumulates batch results into :class:`Progress` and reports them."""

    def __init__(self, plan: _Plan, done: set[int],
                 callback: Callable[[Progress], None] | None) -> None:
        self.plan = plan
        self.callback = callback
        self.t0 = time.perf_counter()
        self.p = Progress(
            batches_done=len(done), batches_total=plan.n_batches,
            frames_done=sum(plan.batch_frames[b][1] - plan.batch_frames[b][0] for b in done),
            frames_total=plan.batch_frames[-1][1] if plan.batch_frames else 0,
            bytes_done=0, bytes_total=sum(plan.batch_bytes[b] for b in range(plan.n_batches)
                                          if b not in done),
            photons_done=0, elapsed_s=0.0)

    def __call__(self, result: tuple[int, int, int]) -> None:
        b, frames, photons = result
        p = self.p
        p.batches_done += 1
        p.frames_done += frames
        p.photons_done += photons
        p.bytes_done += self.plan.batch_bytes[b]
        p.elapsed_s = time.perf_counter() - self.t0
        log.debug("batch %d of %d done (%d frames, %d photons)", b + 1, p.batches_total,
                  frames, photons)
        if self.callback is not None:
            self.callback(p)


def _open_source(plan: _Plan) -> Acquisition:
    return Acquisition.open(plan.sources, plan.source_options)


def ome_repeats(block: np.ndarray) -> int:
    """Repeats per slice folded into the OME time axis (1 without a ``repeat`` dim)."""
    return block.shape[2] if block.ndim == 6 else 1


def to_ome_order(block: np.ndarray) -> np.ndarray:
    """``(time, z, [repeat], channel, y, x)`` -> NGFF ``(t, c, z, y, x)``.

    Repeats of a slice become consecutive OME timepoints (they are taken one after
    the other), so nothing is summed or dropped.
    """
    if block.ndim == 6:  # (t, z, r, c, y, x) -> (t, r, c, z, y, x) -> (t*r, c, z, y, x)
        t, z, r, c, y, x = block.shape
        return block.transpose(0, 2, 3, 1, 4, 5).reshape(t * r, c, z, y, x)
    return block.transpose(0, 2, 1, 3, 4)


def downsample2(block: np.ndarray) -> np.ndarray:
    """Halve the last two axes by 2 x 2 means (edges repeated for odd sizes), same dtype."""
    h, w = block.shape[-2:]
    pad = [(0, 0)] * (block.ndim - 2) + [(0, h % 2), (0, w % 2)]
    b = np.pad(block, pad, mode="edge") if h % 2 or w % 2 else block
    b = b.reshape(*b.shape[:-2], b.shape[-2] // 2, 2, b.shape[-1] // 2, 2)
    return np.rint(b.mean(axis=(-3, -1))).astype(block.dtype)


def pyramid_levels(h: int, w: int, requested: int | None = None, smallest: int = 32) -> int:
    """Return the OME pyramid's level count.

    ``requested`` if given, else halve until a side would drop below ``smallest``
    pixels (at most 6 levels, at least 1).
    """
    if requested is not None:
        if requested < 1:
            raise ValueError(f"ome_levels must be at least 1, got {requested}")
        return int(requested)
    levels = 1
    while levels < 6 and min(h, w) // 2**levels >= smallest:
        levels += 1
    return levels


def _ome_metadata(ds: Any, name: str, levels: int = 1) -> dict[str, Any]:
    """NGFF 0.5 ``multiscales`` (and ``omero`` channel labels) for the ``ome`` group."""
    reps = ds.sizes.get("repeat", 1)
    t = ds["time"].values
    dt = float(np.median(np.diff(t))) / reps if t.size > 1 else 1.0
    z = ds["z"].values
    dz = float(np.median(np.diff(z))) if z.size > 1 and np.all(np.diff(z) != 0) else 1.0
    um = ds["y"].attrs.get("units") == "um"
    dy = float(ds["y"].values[1] - ds["y"].values[0]) if ds.sizes["y"] > 1 else 1.0
    dx = float(ds["x"].values[1] - ds["x"].values[0]) if ds.sizes["x"] > 1 else 1.0
    space = {"type": "space", **({"unit": "micrometer"} if um else {})}
    axes = [{"name": "t", "type": "time", "unit": "second"}, {"name": "c", "type": "channel"},
            {"name": "z", **space}, {"name": "y", **space}, {"name": "x", **space}]
    scale = [dt if dt > 0 else 1.0, 1.0, abs(dz), abs(dy), abs(dx)]
    translation = [float(t[0]) if t.size else 0.0, 0.0, float(z[0]) if z.size else 0.0,
                   float(ds["y"].values[0]), float(ds["x"].values[0])]
    names = [str(n) for n in ds["channel_name"].values]
    return {"ome": {
        "version": "0.5",
        "multiscales": [{
            "name": name, "axes": axes,
            "datasets": [{"path": str(k), "coordinateTransformations": [
                {"type": "scale", "scale": [*scale[:3], scale[3] * 2**k, scale[4] * 2**k]},
                {"type": "translation", "translation": [
                    *translation[:3], translation[3] + (2**k - 1) / 2 * dy,
                    translation[4] + (2**k - 1) / 2 * dx]}]} for k in range(levels)],
            "type": "mean",
            "metadata": {"description": "each level halves y and x by 2 x 2 means of the "
                                        "level before (rounded)"},
        }],
        "omero": {"channels": [
            {"label": n, "active": True, "color": "FFFFFF",
             "window": {"min": 0, "max": 65535, "start": 0, "end": 10}} for n in names]},
    }}


class _ShardWriter:
    """Streams values into a 1-D sharded array from a shard-aligned ``base``.

    Only whole shards are written until :meth:`close` writes the remainder, so each
    shard is written exactly once and at most one shard is buffered.
    """

    def __init__(self, arr: Any, base: int, dtype: str) -> None:
        self.arr = arr
        self.pos = base
        self.dtype = dtype
        self.parts: list[np.ndarray] = []
        self.buffered = 0

    def append(self, values: np.ndarray) -> None:
        self.parts.append(values.astype(self.dtype, copy=False))
        self.buffered += values.size
        if self.buffered >= PHOTON_SHARD:
            data = np.concatenate(self.parts)
            whole = data.size // PHOTON_SHARD * PHOTON_SHARD
            self.arr[self.pos : self.pos + whole] = data[:whole]
            self.pos += whole
            self.parts = [data[whole:]]
            self.buffered = data.size - whole

    def close(self) -> None:
        if self.buffered:
            data = np.concatenate(self.parts)
            self.arr[self.pos : self.pos + data.size] = data
            self.pos += data.size
        self.parts, self.buffered = [], 0


#: source bytes decoded at a time inside a batch (bounds a worker's memory)
SUB_BATCH_BYTES = 16 * 2**20


def _write_batch(plan_json: str, b: int) -> tuple[int, int, int]:
    """Convert batch ``b``; returns ``(b, frames, photons)``. Runs on any worker.

    The batch's frames are decoded in sub-batches of about :data:`SUB_BATCH_BYTES`
    of source data; photons stream into whole ``arrival_time`` shards, so memory
    stays bounded by the intensity shard plus a few tens of MB, whatever the file size.
    """
    import zarr

    plan = _Plan.from_json(plan_json)
    target = _Target(plan.destination, plan.destination_options)
    store = target.zarr()
    f0, f1 = plan.batch_frames[b]
    t0, t1 = b * plan.shard_t, min((b + 1) * plan.shard_t, plan.n_timepoints)
    inten = zarr.open_array(store, path="intensity", mode="r+")
    repeat = inten.ndim == 6
    shape = (t1 - t0, *inten.shape[1:])
    block = np.zeros(shape, dtype=plan.intensity_dtype)
    pc = np.zeros(shape[:-2], dtype=np.uint32)
    hblock = None
    fly_imgs: list[np.ndarray] = []
    writer = _ShardWriter(zarr.open_array(store, path="photons/arrival_time", mode="r+"),
                          plan.batch_base[b], plan.arrival_dtype)
    n = 0
    with _open_source(plan) as f:
        ip = f.im_params()
        sizes = f.frame_bytes[f0:f1]
        # sub-batch boundaries: one decode call per ~SUB_BATCH_BYTES, not per frame
        cut = np.searchsorted(np.cumsum(sizes), np.arange(1, int(sizes.sum()) //
                              SUB_BATCH_BYTES + 1) * SUB_BATCH_BYTES) + f0
        edges = np.unique(np.concatenate([[f0], cut, [f1]]).clip(f0, f1))
        for s0, s1 in zip(edges[:-1].tolist(), edges[1:].tolist(), strict=True):
            frames = np.arange(s0, s1, dtype=np.int64)
            counts_img = f.read_frames(frames)
            if plan.intensity_only:  # TIFF pages: the photon count is the image sum
                tau = np.zeros(0, dtype=np.uint32)
                cnt = counts_img.reshape(len(frames), -1).sum(axis=1, dtype=np.uint64)
            else:
                starts, _pix, tau = f.photons_batch(frames)
                cnt = np.diff(starts)
            if tau.size and int(tau.max()) > 65535 and plan.arrival_dtype == "uint16":
                raise _NeedsWideArrivals
            if not plan.intensity_only and (counts_img == np.iinfo(np.uint16).max).any() and (
                    cnt != counts_img.reshape(len(frames), -1).sum(axis=1, dtype=np.int64)
            ).any():
                raise ConversionError(
                    f"{plan.sources[0]}: a pixel holds more than 65535 photons in one frame; "
                    "its count does not fit the uint16 count image that locates photons")
            writer.append(tau)
            n += int(tau.size)
            loc = ip.locate(frames)
            fly = loc["flyback"]
            idx = (loc["timepoint"][~fly] - t0, loc["slice"][~fly])
            if repeat:
                idx = (*idx, loc["repeat"][~fly])
            idx = (*idx, loc["channel"][~fly])
            block[idx] = counts_img[~fly]
            pc[idx] = cnt[~fly]
            if f.has_photons and ip.num_bins is not None:
                hist = f.histograms(frames).astype(np.uint32)
                if hblock is None:
                    hblock = np.zeros((*shape[:-2], hist.shape[1]), dtype=np.uint32)
                hblock[idx] = hist[~fly]
            if fly.any():
                fly_imgs.append(counts_img[fly])
            f.release()  # keep the memory map's pages out of the RSS between sub-batches
    writer.close()
    inten[t0:t1] = block
    if plan.ome:
        level = to_ome_order(block)
        r0, r1 = t0 * ome_repeats(block), t1 * ome_repeats(block)
        for k in range(plan.ome_levels):  # the same time range, so a whole shard per level
            if k:
                level = downsample2(level)
            zarr.open_array(store, path=f"ome/{k}", mode="r+")[r0:r1] = level
    zarr.open_array(store, path="photon_count", mode="r+")[t0:t1] = pc
    if hblock is not None:
        zarr.open_array(store, path="histogram", mode="r+")[t0:t1] = hblock
    if fly_imgs:
        rows = np.concatenate(fly_imgs)
        r0 = plan.flyback_base[b]
        zarr.open_array(store, path="photons/flyback_intensity", mode="r+")[
            r0 : r0 + len(rows)] = rows
    target.write_text(f"{PROGRESS}/batch-{b:06d}", json.dumps({"frames": f1 - f0,
                                                               "photons": n}))
    return b, f1 - f0, n


def _create_ome(store: Any, ds: Any, ct: int, st: int, levels: int) -> None:
    """Create the NGFF 0.5 image group ``ome``: arrays ``0``, ``1``, ... (t, c, z, y, x).

    Level 0 is the intensity; level ``k`` halves y and x ``k`` times. Every level
    shards time like the intensity, so each conversion batch writes whole shards.
    """
    import zarr

    reps = ds.sizes.get("repeat", 1)
    h, w = ds.sizes["y"], ds.sizes["x"]
    grp = zarr.open_group(store, path="ome", mode="w", attributes=_ome_metadata(
        ds, str(ds.attrs.get("title", "intensity")), levels))
    for k in range(levels):
        shape = (ds.sizes["time"] * reps, ds.sizes["channel"], ds.sizes["z"], h, w)
        grp.create_array(str(k), shape=shape, dtype=ds.intensity.dtype,
                         chunks=(ct * reps, *shape[1:]),
                         shards=(st * reps, *shape[1:]), compressors=(_compressor(),),
                         fill_value=0, dimension_names=("t", "c", "z", "y", "x"))
        h, w = -(-h // 2), -(-w // 2)


def _prepare(sources: list[str], target: _Target, source_options: dict[str, Any] | None,
             shard_bytes: int, chunk_bytes: int, arrival_dtype: str, ome: bool = True,
             ome_levels: int | None = None) -> _Plan:
    """Create every array (metadata and the small per-frame arrays); return the plan."""
    import zarr

    from .backend import open_acquisition, open_siff

    ds = (open_siff(sources[0], storage_options=source_options) if len(sources) == 1
          else open_acquisition(sources, storage_options=source_options))
    try:
        with Acquisition.open(sources, source_options) as f:
            tiff = f.encoding == ENC_TIFF
            if tiff.any() and not tiff.all():
                raise ConversionError(
                    f"{sources[0]}: mixes intensity-only TIFF pages with photon frames; "
                    "convert files of one kind at a time")
            intensity_only = bool(tiff.all()) and tiff.size > 0
            signed = f.signed.astype(np.int8)
            ip = f.im_params()
            n_frames = f.num_frames
            fmap = ds.frame_index.values
            n_t = fmap.shape[0]
            vol_shape = ds.intensity.shape[1:]
            ct, st = _chunking(vol_shape, n_t, shard_bytes, chunk_bytes)
            n_batches = -(-n_t // st)
            # batch b: timepoints [b*st, (b+1)*st) = file frames [b*st*P, (b+1)*st*P)
            p = ip.file_frames_per_volume
            bounds = [min(b * st * p, n_frames) for b in range(n_batches)] + [n_frames]
            batch_frames = [[bounds[b], bounds[b + 1]] for b in range(n_batches)]
            counts = f.n_photons.astype(np.int64)
            starts = np.zeros(n_frames, dtype=np.int64)
            batch_base = []
            end = 0
            for f0, f1 in batch_frames:  # one iteration per batch (shard), not per frame
                base = _roundup(end, PHOTON_SHARD)
                batch_base.append(base)
                c = counts[f0:f1]
                starts[f0:f1] = base + np.concatenate([[0], np.cumsum(c)[:-1]]) if len(c) \
                    else starts[f0:f1]
                end = base + int(c.sum())
            loc = ip.locate(np.arange(n_frames))
            fly_frames = np.flatnonzero(loc["flyback"])
            flyback_base = [int(np.searchsorted(fly_frames, f0)) for f0, _ in batch_frames]
            batch_bytes = [int(f.frame_bytes[f0:f1].sum()) for f0, f1 in batch_frames]
            ts = f.timestamps()
            desc_bytes, dlen = f.description_bytes()
            f.release()
            encoding = f.encoding.astype(np.int8)
            h, w = f.frame_shape
            source_bytes = int(f.file_size)
        total_len = max(end, 1)
        inten_dtype = str(ds.intensity.dtype)

        # --- the root Dataset: metadata now, data by the batches
        enc_inten = {"chunks": (ct, *vol_shape), "shards": (st, *vol_shape),
                     "compressors": (_compressor(),)}
        template = ds.drop_vars([v for v in ("mean_arrival",) if v in ds])
        lazy = [v for v in ("intensity", "photon_count", "histogram") if v in template]
        for v in lazy:
            template[v] = template[v].chunk({"time": st})
        encoding_all: dict[str, dict[str, Any]] = {"intensity": enc_inten}
        for v in ("photon_count", "histogram"):
            if v in template:
                encoding_all[v] = {"chunks": (st, *template[v].shape[1:]),
                                   "compressors": (_compressor(),)}
        store = target.zarr()
        template.to_zarr(store, mode="w-", compute=False, encoding=encoding_all,
                         consolidated=False, zarr_format=3)
        levels = pyramid_levels(ds.sizes["y"], ds.sizes["x"], ome_levels)
        if ome:
            _create_ome(store, ds, ct, st, levels)
    finally:
        ds.close()

    # --- the photons group
    grp = zarr.open_group(store, path="photons", mode="a")
    grp.attrs.update({
        "siff_zarr_version": SIFF_ZARR_VERSION,
        "source_bytes": source_bytes,
        "layout": "intensity-only" if intensity_only else "pixel-sorted",
        "description": "every photon of every file frame; within a frame in pixel order; "
                       "a photon's pixel follows from the frame's count image",
        "tau_bin_ps": ip.picoseconds_per_bin if ip.picoseconds_per_bin is not None else -1.0,
        "n_tau_bins": ip.num_bins if ip.num_bins is not None else -1,
    })
    grp.create_array("arrival_time", shape=(total_len,), dtype=arrival_dtype,
                     chunks=(PHOTON_CHUNK,), shards=(PHOTON_SHARD,),
                     compressors=(_compressor(),), fill_value=0, dimension_names=("photon",))

    def small(name: str, data: np.ndarray, dims: tuple[str, ...]) -> None:
        a = grp.create_array(name, shape=data.shape, dtype=data.dtype,
                             chunks=data.shape if data.size else (1,) * data.ndim,
                             compressors=(_compressor(),), dimension_names=dims)
        if data.size:
            a[...] = data

    small("photon_start", starts.astype(np.uint64), ("frame",))
    small("photon_count", counts.astype(np.uint32), ("frame",))
    small("encoding", encoding, ("frame",))
    small("experiment_s", ts.experiment_s, ("frame",))
    small("epoch_laser_ns", ts.epoch_laser_ns, ("frame",))
    small("epoch_system_ns", ts.epoch_system_ns, ("frame",))
    dstart = np.concatenate([[0], np.cumsum(dlen, dtype=np.uint64)[:-1]]).astype(np.uint64)
    small("description", desc_bytes, ("byte",))
    small("description_start", dstart, ("frame",))
    small("description_length", dlen.astype(np.uint32), ("frame",))
    small("flyback_frame", fly_frames.astype(np.int64), ("flyback",))
    per_batch_fly = max([np.searchsorted(fly_frames, f1) - np.searchsorted(fly_frames, f0)
                         for f0, f1 in batch_frames] + [1])
    if intensity_only:
        small("signed", signed, ("frame",))
    grp.create_array("flyback_intensity", shape=(len(fly_frames), h, w), dtype=inten_dtype,
                     chunks=(int(per_batch_fly), h, w), compressors=(_compressor(),),
                     fill_value=0, dimension_names=("flyback", "y", "x"))
    # flyback rows of one batch must share no chunk with another batch's rows
    if len(fly_frames) and any(fb % per_batch_fly for fb in flyback_base):
        raise ConversionError("internal: flyback rows are not chunk-aligned")  # pragma: no cover

    return _Plan(sources=list(sources), source_options=source_options,
                 destination=target.destination, destination_options=target.storage_options,
                 shard_t=st, n_timepoints=n_t, batch_frames=batch_frames,
                 batch_base=batch_base, flyback_base=flyback_base, batch_bytes=batch_bytes,
                 arrival_dtype=arrival_dtype, n_photons_total=int(counts.sum()), ome=ome,
                 ome_levels=levels, intensity_only=intensity_only,
                 intensity_dtype=inten_dtype)


def _hide_root(target: _Target) -> None:
    """Move the root group metadata aside: the store is not a group until finished."""
    text = target.read_text("zarr.json")
    target.write_text(ROOT_KEY, text)
    target.fs.rm_file(target.key("zarr.json"))


def _finish(target: _Target) -> None:
    """Publish the store: write the root metadata, with every node's consolidated."""
    meta = json.loads(target.read_text(ROOT_KEY))
    meta["consolidated_metadata"] = _consolidated(target)
    target.write_text("zarr.json", json.dumps(meta, indent=2))
    target.fs.rm(target.key(PROGRESS), recursive=True)


def _consolidated(target: _Target) -> dict[str, Any]:
    """Every node's metadata under the root, as zarr-python consolidates it.

    Built here rather than by ``zarr.consolidate_metadata`` so that the root
    ``zarr.json`` is written once, last, already consolidated: ``xr.open_zarr``
    then opens the store with one metadata read and no fallback warning, and an
    interruption never leaves a half-rewritten root. (Consolidated metadata is a
    zarr-python convention, not yet part of the Zarr v3 specification; readers
    that do not know it ignore it: ``must_understand`` is false.)
    """
    target.fs.invalidate_cache()
    names = sorted(p for p in target.fs.find(target.root) if p.endswith("/zarr.json"))
    keys = [n[len(target.root) + 1 : -len("/zarr.json")] for n in names]
    keys = [k for k in keys if k and not k.startswith(PROGRESS)]
    texts = target.fs.cat([target.key(f"{k}/zarr.json") for k in keys])
    metadata = {}
    for k in keys:
        node = json.loads(texts[target.key(f"{k}/zarr.json")])
        if node.get("node_type") == "group":
            node["consolidated_metadata"] = {"kind": "inline", "must_understand": False,
                                             "metadata": {}}
        metadata[k] = node
    return {"kind": "inline", "must_understand": False, "metadata": metadata}


def _store_bytes(target: _Target) -> int:
    try:
        return int(target.fs.du(target.root))
    except Exception:  # pragma: no cover - some filesystems cannot du
        return 0


def _expand_sources(sources: str | os.PathLike[str] | Sequence[Any],
                    storage_options: dict[str, Any] | None) -> list[str] | None:
    """Return the sources as a list, or None when ``sources`` names one file (no glob)."""
    if isinstance(sources, (str, os.PathLike)):
        text = os.fspath(sources)
        if not any(ch in text for ch in "*?["):
            return None
        from .backend import _expand

        return [os.fspath(p) for p in _expand(text, storage_options)]
    return [os.fspath(p) for p in sources]


def store_name(source: str) -> str:
    """Default store name for a source file: its name with ``.zarr`` for the suffix.

    Parts of a split acquisition (``run_00002.siff``) are named after the acquisition
    (``run.zarr``).
    """
    base = source.rstrip("/").rsplit("/", 1)[-1]
    m = _PART.match(base)
    if m:
        return f"{m.group('stem')}.zarr"
    stem = base.rsplit(".", 1)[0] if "." in base else base
    return f"{stem}.zarr"


_PART = re.compile(r"^(?P<stem>.+)_(?P<num>\d{5})\.siff$", re.IGNORECASE)


def group_acquisitions(sources: Sequence[str]) -> list[list[str]]:
    """Group files into acquisitions: ``name_00001.siff``, ``name_00002.siff``... form one.

    Parts are ordered by their number; other files stand alone. Groups keep the order
    in which their first file appears.
    """
    groups: dict[str, list[str]] = {}
    for src in sources:
        head, _, base = src.rstrip("/").rpartition("/")
        m = _PART.match(base)
        key = f"{head}/{m.group('stem')}" if m else src
        groups.setdefault(key, []).append(src)
    out = []
    for members in groups.values():
        members = sorted(set(members), key=lambda p: (
            int(m.group("num")) if (m := _PART.match(p.rsplit("/", 1)[-1])) else 0, p))
        out.append(members)
    return out


def convert(
    source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    destination: str | os.PathLike[str],
    **kwargs: Any,
) -> ConversionSummary | list[ConversionSummary]:
    """Convert ``.siff`` files to Zarr v3 stores, one store per acquisition.

    With one file (a path or URL without wildcards), ``destination`` is the store and
    one :class:`ConversionSummary` is returned. With a list or a glob pattern, the
    files are grouped into acquisitions (:func:`group_acquisitions`: the numbered
    parts ``name_00001.siff``, ``name_00002.siff``... of a split acquisition become
    one store), ``destination`` is a directory (or URL prefix) receiving one store per
    acquisition named by :func:`store_name`, and a list of summaries is returned.
    Keyword arguments are those of :func:`convert_file`.
    """
    many = _expand_sources(source, kwargs.get("storage_options"))
    if many is None:
        return convert_file(source, destination, **kwargs)  # type: ignore[arg-type]
    if not many:
        raise ConversionError("no source files given")
    groups = group_acquisitions(many)
    names = [store_name(g[0]) for g in groups]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ConversionError(f"several sources would become the same store {sorted(dup)[0]}")
    dst = os.fspath(destination).rstrip("/")
    return [convert_file(g if len(g) > 1 else g[0], f"{dst}/{n}", **kwargs)
            for g, n in zip(groups, names, strict=True)]


def convert_file(
    source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    destination: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    resume: bool = False,
    scheduler: Any = "threads",
    num_workers: int | None = None,
    storage_options: dict[str, Any] | None = None,
    target_options: dict[str, Any] | None = None,
    shard_bytes: int = 64 * 2**20,
    chunk_bytes: int = 2 * 2**20,
    ome: bool = True,
    ome_levels: int | None = None,
    progress: Callable[[Progress], None] | None = None,
) -> ConversionSummary:
    """Convert one ``.siff`` file (or one split acquisition) to a Zarr v3 store, losslessly.

    Parameters
    ----------
    source
        Local path or fsspec URL of the ``.siff`` file (opened read-only), or the
        ordered parts of one acquisition (``name_00001.siff``, ...), which become one
        store with frames numbered across the parts (as :func:`open_acquisition`).
    destination
        Local path or fsspec URL of the store to create (e.g. ``s3://bucket/run.zarr``).
    overwrite
        Replace an existing store (a finished store is never replaced without it).
    resume
        Finish an interrupted conversion into ``destination``, redoing only the batches
        that were not recorded as finished.
    scheduler
        Dask scheduler: ``"threads"`` (default), ``"processes"``, ``"sync"``, or a
        ``dask.distributed.Client`` (or its address).
    num_workers
        Threads/processes for the local schedulers.
    storage_options, target_options
        fsspec options for the source and for the destination.
    shard_bytes, chunk_bytes
        Target sizes of an ``intensity`` shard (one batch) and chunk.
    ome
        Also write ``ome/``: an OME-Zarr (NGFF 0.5) image of the intensity in NGFF's
        ``(t, c, z, y, x)`` axis order, for napari and other OME-Zarr viewers (it
        doubles the space the intensity takes; the photons are unaffected).
    ome_levels
        Levels of its multiscale pyramid (each halves y and x by 2 x 2 means); default:
        halve while both sides stay at least 32 pixels (256 x 128 frames: 3 levels).
    progress
        Called with a :class:`Progress` after each batch (progress is also logged at
        DEBUG level on the ``siff_xarray.zarr_store`` logger).

    Returns
    -------
    ConversionSummary

    Raises
    ------
    ConversionError
        If the destination holds a store and neither ``overwrite`` nor ``resume`` is
        given, or ``resume`` finds no interrupted conversion of this source.

    """
    t_start = time.perf_counter()
    srcs = ([os.fspath(source)] if isinstance(source, (str, os.PathLike))
            else [os.fspath(x) for x in source])
    if not srcs:
        raise ConversionError("no source files given")
    src = srcs[0] if len(srcs) == 1 else f"{srcs[0]} (+{len(srcs) - 1} more parts)"
    target = _Target(os.fspath(destination), target_options)
    finished = target.exists("zarr.json")
    interrupted = target.exists(PLAN_KEY)
    if finished and not overwrite:
        raise ConversionError(f"{target.destination}: a finished store exists; pass "
                              "overwrite=True (--overwrite) to replace it")
    if resume and not overwrite:
        if not interrupted:
            raise ConversionError(f"{target.destination}: no interrupted conversion to resume")
        plan = _Plan.from_json(target.read_text(PLAN_KEY))
        if plan.sources != srcs:
            raise ConversionError(f"{target.destination}: was being converted from "
                                  f"{plan.sources}, not {srcs}")
    else:
        if interrupted and not overwrite:
            raise ConversionError(f"{target.destination}: holds an interrupted conversion; "
                                  "pass resume=True (--resume) to finish it or overwrite=True "
                                  "(--overwrite) to start again")
        if target.fs.exists(target.root):
            if not overwrite and target.fs.ls(target.root):
                raise ConversionError(f"{target.destination}: exists and is not empty; pass "
                                      "overwrite=True (--overwrite) to replace it")
            target.fs.rm(target.root, recursive=True)
        plan = _start(srcs, target, storage_options, shard_bytes, chunk_bytes, "uint16", ome,
                      ome_levels)
    try:
        skipped = _run(plan, target, scheduler, num_workers, progress)
    except _NeedsWideArrivals:
        log.info("%s: arrival times above 65535; converting again with uint32", src)
        target.fs.rm(target.root, recursive=True)
        plan = _start(srcs, target, storage_options, shard_bytes, chunk_bytes, "uint32",
                      plan.ome, plan.ome_levels)
        skipped = _run(plan, target, scheduler, num_workers, progress)
    _finish(target)
    src_bytes = int(json.loads(target.read_text("photons/zarr.json"))["attributes"]
                    ["source_bytes"])
    return ConversionSummary(source=src, destination=target.destination,
                             frames=sum(b - a for a, b in plan.batch_frames),
                             photons=plan.n_photons_total, source_bytes=src_bytes,
                             store_bytes=_store_bytes(target),
                             seconds=time.perf_counter() - t_start, batches=plan.n_batches,
                             batches_skipped=skipped)


def _start(srcs: list[str], target: _Target, storage_options: dict[str, Any] | None,
           shard_bytes: int, chunk_bytes: int, arrival_dtype: str, ome: bool,
           ome_levels: int | None = None) -> _Plan:
    plan = _prepare(srcs, target, storage_options, shard_bytes, chunk_bytes, arrival_dtype,
                    ome, ome_levels)
    _hide_root(target)
    target.write_text(PLAN_KEY, plan.to_json())
    return plan


def _run(plan: _Plan, target: _Target, scheduler: Any, num_workers: int | None,
         progress: Callable[[Progress], None] | None) -> int:
    """Run the batches not yet recorded as done; return how many were skipped."""
    import dask

    done = target.done_batches()
    todo = [b for b in range(plan.n_batches) if b not in done]
    tracker = _Tracker(plan, done, progress)
    plan_json = plan.to_json()
    if todo:
        tasks = [dask.delayed(_write_batch, pure=False)(plan_json, b) for b in todo]
        if isinstance(scheduler, str) and "://" in scheduler:
            from dask.distributed import Client

            with Client(scheduler) as client:
                _compute_distributed(tasks, client, tracker)
        elif not isinstance(scheduler, str):
            _compute_distributed(tasks, scheduler, tracker)
        else:
            _compute_local(tasks, scheduler, num_workers, tracker)
    missing = set(range(plan.n_batches)) - target.done_batches()
    if missing:
        raise ConversionError(f"{target.destination}: batches {sorted(missing)[:5]} did not "
                              "finish")
    return len(done)


def _compute_local(tasks: list[Any], scheduler: str, num_workers: int | None,
                   tracker: _Tracker) -> None:
    import dask
    from dask.callbacks import Callback

    kwargs: dict[str, Any] = {} if num_workers is None else {"num_workers": num_workers}
    names = {t.key for t in tasks}

    def posttask(key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
        if key in names:
            tracker(result)

    with Callback(posttask=posttask):
        dask.compute(*tasks, scheduler=scheduler, **kwargs)


def _compute_distributed(tasks: list[Any], client: Any, tracker: _Tracker) -> None:
    from dask.distributed import as_completed

    for fut in as_completed(client.compute(tasks)):
        tracker(fut.result())


# ---------------------------------------------------------------------- reading back


def open_converted(store: str | os.PathLike[str], *,
                   storage_options: dict[str, Any] | None = None, **kwargs: Any) -> Any:
    """Open a converted store as an xarray Dataset (``xr.open_zarr`` with checks).

    Raises
    ------
    IncompleteStoreError
        If the store is the partial result of an interrupted conversion.

    """
    import xarray as xr

    target = _Target(os.fspath(store), storage_options)
    if target.exists(PLAN_KEY) or not target.exists("zarr.json"):
        done = len(target.done_batches())
        if target.exists(PLAN_KEY):
            plan = _Plan.from_json(target.read_text(PLAN_KEY))
            raise IncompleteStoreError(
                f"{target.destination}: conversion from {plan.sources[0]} is incomplete "
                f"({done} of {plan.n_batches} batches); run convert(..., resume=True) "
                "(siff-xarray convert --resume) to finish it")
        raise FileNotFoundError(f"{target.destination}: not a converted siff-xarray store")
    # stores of this version hold consolidated metadata; older ones fall back (warning)
    kwargs.setdefault("consolidated", None)
    ds = xr.open_zarr(target.zarr(), **kwargs)
    # where the photons are, for ds.siff's photon reductions
    ds.encoding["source"] = target.destination
    if storage_options:
        ds.encoding["storage_options"] = storage_options
    return ds


def read_photons(source: Any, frame: int, *, storage_options: dict[str, Any] | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """``(pixel_index, arrival_time)`` of one file frame, pixel-sorted, from either form.

    ``source`` is a ``.siff`` path/URL, a :class:`~siff_xarray.SiffFile`, or a
    converted store (path/URL ending in ``.zarr`` or holding ``photons/``). Both give
    identical arrays (``uint32``) for the same frame.
    """
    from .reader.siff_file import SiffFile

    if isinstance(source, SiffFile):
        return source.photons(frame)
    path = os.fspath(source)
    target = _Target(path, storage_options)
    if not target.exists("photons/zarr.json"):
        with SiffFile(path, storage_options=storage_options) as f:
            return f.photons(frame)
    from .zarr_photons import StorePhotons

    with StorePhotons(path, storage_options=storage_options) as p:
        return p.photons(frame)


def _count_images(ds: Any, grp: Any, fr: np.ndarray, pos: np.ndarray, fly: np.ndarray,
                  shape: tuple[int, int]) -> np.ndarray:
    """Count images of file frames ``fr`` from a store (imaging and flyback frames)."""
    out = np.zeros((len(fr), *shape), dtype=ds.intensity.dtype)
    k = np.searchsorted(fly, fr)
    is_fly = (k < fly.size) & (fly[np.minimum(k, max(fly.size - 1, 0))] == fr) if fly.size \
        else np.zeros(len(fr), bool)
    if is_fly.any():
        rows = k[is_fly]
        block = np.asarray(grp["flyback_intensity"][int(rows.min()) : int(rows.max()) + 1])
        out[is_fly] = block[rows - rows.min()]
    img = ~is_fly
    if img.any():
        p = pos[fr[img]]
        t0, t1 = int(p[:, 0].min()), int(p[:, 0].max()) + 1
        block = ds.intensity.isel(time=slice(t0, t1)).values
        p = p.copy()
        p[:, 0] -= t0
        out[img] = block[tuple(p.T)]
    return out


def to_siff(store: str | os.PathLike[str], path: str | os.PathLike[str], *,
            storage_options: dict[str, Any] | None = None, overwrite: bool = False,
            batch_frames: int = 512) -> None:
    """Write a converted store back as a ``.siff`` file that reads like its source.

    Every frame gets its original description bytes and encoding (raw or compressed);
    the header texts are the source's. Reading the result gives the same frames,
    histograms, photons (as multisets within each pixel), timestamps and events.
    """
    import zarr

    from .synthetic import SiffWriter

    out = Path(os.fspath(path))
    if out.exists() and not overwrite:
        raise ConversionError(f"{out}: exists; pass overwrite=True to replace it")
    target = _Target(os.fspath(store), storage_options)
    ds = open_converted(store, storage_options=storage_options)
    try:
        zstore = target.zarr()
        grp = zarr.open_group(zstore, path="photons", mode="r")
        n = grp["photon_count"].shape[0]
        counts = np.asarray(grp["photon_count"][...]).astype(np.int64)
        starts_z = np.asarray(grp["photon_start"][...]).astype(np.int64)
        enc = np.asarray(grp["encoding"][...])
        desc = np.asarray(grp["description"][...])
        dstart = np.asarray(grp["description_start"][...]).astype(np.int64)
        dlen = np.asarray(grp["description_length"][...]).astype(np.int64)
        fly = np.asarray(grp["flyback_frame"][...]).astype(np.int64)
        signed = np.asarray(grp["signed"][...]) if "signed" in grp else np.zeros(n, np.int8)
        fmap = ds.frame_index.values
        pos = np.full((n, fmap.ndim), -1, dtype=np.int64)
        ok = fmap >= 0
        pos[fmap[ok]] = np.argwhere(ok)
        h, w = ds.sizes["y"], ds.sizes["x"]
        tmp = out.with_name(out.name + ".partial")
        with open(tmp, "wb") as fh:
            writer = SiffWriter(fh, ds.attrs["scanimage_header"], ds.attrs["roi_json"],
                                bigtiff=bool(ds.attrs.get("bigtiff", 1)))
            writer.set_shape(h, w)
            for a in range(0, n, batch_frames):
                fr = np.arange(a, min(a + batch_frames, n), dtype=np.int64)
                imgs = _count_images(ds, grp, fr, pos, fly, (h, w))
                c = counts[fr]
                lo, hi = int(starts_z[fr].min()), int((starts_z[fr] + c).max())
                block = np.asarray(grp["arrival_time"][lo:hi]) if hi > lo else np.zeros(0)
                for j, frame in enumerate(fr.tolist()):  # one IFD per frame must be written
                    s0 = int(starts_z[frame] - lo)
                    tau = block[s0 : s0 + int(c[j])]
                    d = desc[dstart[frame] : dstart[frame] + dlen[frame]].tobytes()
                    img = imgs[j]
                    if enc[frame] == ENC_TIFF:
                        writer.write_frame(d, image=img, signed=bool(signed[frame]))
                    elif enc[frame] == 1:
                        writer.write_frame(d, counts=img, arrivals=tau.astype(np.uint16))
                    else:
                        pix = np.repeat(np.arange(h * w, dtype=np.uint64), img.ravel())
                        rec = ((pix // w) << np.uint64(48)) | ((pix % w) << np.uint64(32)) | \
                            tau.astype(np.uint64)
                        writer.write_frame(d, photons=rec)
        os.replace(tmp, out)
    finally:
        ds.close()


def verify(source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
           store: str | os.PathLike[str], *,
           storage_options: dict[str, Any] | None = None,
           target_options: dict[str, Any] | None = None,
           batch_frames: int = 256) -> list[str]:
    """Compare a converted store with its source, frame by frame; return the differences.

    Checks every frame's photon count, its pixel-sorted (pixel, arrival time) pairs
    (equal multisets), its timestamps and description text, and the header texts.
    An empty list means the store holds exactly what the source holds. ``source``
    may be the ordered parts of a split acquisition converted into one store.
    """
    import zarr

    srcs = ([os.fspath(source)] if isinstance(source, (str, os.PathLike))
            else [os.fspath(x) for x in source])
    problems: list[str] = []
    target = _Target(os.fspath(store), target_options)
    ds = open_converted(store, storage_options=target_options)
    zstore = target.zarr()
    grp = zarr.open_group(zstore, path="photons", mode="r")
    with Acquisition.open(srcs, storage_options) as f:
        n = f.num_frames
        if grp["photon_count"].shape[0] != n:
            return [f"frame count differs: source {n}, store {grp['photon_count'].shape[0]}"]
        if ds.attrs.get("scanimage_header") != f.header.nvfd_text:
            problems.append("ScanImage header text differs")
        if ds.attrs.get("roi_json") != f.header.roi_text:
            problems.append("ROI JSON text differs")
        counts = np.asarray(grp["photon_count"][...]).astype(np.int64)
        if not np.array_equal(counts, f.n_photons):
            bad = np.flatnonzero(counts != f.n_photons)
            problems.append(f"photon counts differ in {bad.size} frames (first {bad[0]})")
        ts = f.timestamps()
        for name, want in (("experiment_s", ts.experiment_s),
                           ("epoch_laser_ns", ts.epoch_laser_ns),
                           ("epoch_system_ns", ts.epoch_system_ns)):
            got = np.asarray(grp[name][...])
            if not np.array_equal(got, want, equal_nan=want.dtype.kind == "f"):
                problems.append(f"{name} differs")
        src_desc, src_len = f.description_bytes()
        if not (np.array_equal(np.asarray(grp["description"][...]), src_desc)
                and np.array_equal(np.asarray(grp["description_length"][...]), src_len)):
            problems.append("frame descriptions differ")
        if not np.array_equal(np.asarray(grp["encoding"][...]), f.encoding):
            problems.append("frame encodings differ")
        intensity_only = grp.attrs.get("layout") == "intensity-only"
        if intensity_only and not np.array_equal(np.asarray(grp["signed"][...]), f.signed):
            problems.append("TIFF sample formats differ")
        # photons and count images, a batch of frames at a time, without per-frame loops
        starts_z = np.asarray(grp["photon_start"][...]).astype(np.int64)
        arr = grp["arrival_time"]
        fly = np.asarray(grp["flyback_frame"][...]).astype(np.int64)
        fmap = ds.frame_index.values
        pos = np.full((n, fmap.ndim), -1, dtype=np.int64)
        ok = fmap >= 0
        pos[fmap[ok]] = np.argwhere(ok)
        for a in range(0, n, batch_frames):
            fr = np.arange(a, min(a + batch_frames, n), dtype=np.int64)
            imgs = f.read_frames(fr)
            imgs_z = _count_images(ds, grp, fr, pos, fly, imgs.shape[1:])
            bad = np.flatnonzero((imgs_z != imgs).reshape(len(fr), -1).any(axis=1))
            if bad.size:
                problems.append(f"count images differ in {bad.size} frames (first "
                                f"{int(fr[bad[0]])})")
            if intensity_only:  # TIFF pages: the count images are everything
                continue
            s_src, pix_src, tau_src = f.photons_batch(fr)
            c = counts[fr]
            lo, hi = int(starts_z[fr].min()), int((starts_z[fr] + c).max())
            block = np.asarray(arr[lo:hi]) if hi > lo else np.zeros(0, arr.dtype)
            first = np.concatenate([[0], np.cumsum(c)[:-1]])
            idx = np.arange(int(c.sum())) + np.repeat(starts_z[fr] - lo - first, c)
            tau_z = block[idx].astype(np.uint32)
            hw = imgs.shape[1] * imgs.shape[2]
            pix_z = np.repeat(np.tile(np.arange(hw, dtype=np.uint32), len(fr)),
                              imgs_z.reshape(-1))
            frame_z = np.repeat(np.arange(len(fr)), c)
            frame_s = np.repeat(np.arange(len(fr)), np.diff(s_src))
            if pix_z.size != pix_src.size or not np.array_equal(pix_z, pix_src):
                problems.append(f"photon pixels differ in frames {a}-{a + len(fr) - 1}")
                continue
            # equal multisets of arrival times within each (frame, pixel)
            oz = np.lexsort((tau_z, pix_z, frame_z))
            osrc = np.lexsort((tau_src, pix_src, frame_s))
            if not np.array_equal(tau_z[oz], tau_src[osrc]):
                diff = np.flatnonzero(tau_z[oz] != tau_src[osrc])
                problems.append(f"arrival times differ (first in frame "
                                f"{int(fr[frame_z[oz][diff[0]]])})")
            if len(problems) > 50:
                problems.append("... (stopped after 50 differences)")
                break
            f.release()
    ds.close()
    return problems
