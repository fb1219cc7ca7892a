"""Layout of a converted store: its keys, chunking, naming, and where it lives.

A converted store (see ``docs/zarr-layout.md`` and :mod:`siff_xarray.store`) is
reached through a :class:`Target` (an fsspec filesystem and root path, plus the
zarr store object); a conversion is described by a :class:`Plan` of plain JSON
values that every batch (on any Dask worker) reads back.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import wait
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._paths import is_remote, local_path
from .._remote import async_filesystem, filesystem, tuned, with_timeouts

__all__ = [
    "ALL_CHUNKS_STORED",
    "BATCH_PIXELS",
    "NODES_KEY",
    "PHOTON_CHUNK",
    "PHOTON_SHARD",
    "PLAN_KEY",
    "PROGRESS",
    "ROOT_KEY",
    "SIFF_ZARR_VERSION",
    "STARTED_KEY",
    "Plan",
    "Target",
    "chunking",
    "compressors",
    "frames_per_batch",
    "group_acquisitions",
    "quiet_text_dtype",
    "roundup",
    "store_name",
]

SIFF_ZARR_VERSION = 1
PROGRESS = ".siff-progress"
PLAN_KEY = f"{PROGRESS}/plan.json"
ROOT_KEY = f"{PROGRESS}/root-zarr.json"
#: every node's metadata as the start wrote it (``{node: zarr.json}``): the finish
#: consolidates them without reading each node's ``zarr.json`` back
NODES_KEY = f"{PROGRESS}/nodes.json"
#: written before anything else: the store is an unfinished conversion from then on
STARTED_KEY = f"{PROGRESS}/started.json"
#: ``photons`` attribute of stores that hold every chunk of every array (empty ones too)
ALL_CHUNKS_STORED = "all_chunks_stored"
#: elements per ``arrival_time`` chunk and shard
PHOTON_CHUNK = 1 << 20
PHOTON_SHARD = 1 << 23


#: pixels (frames x frame size) handled at a time when a store is checked or written back:
#: bounds memory by the data, whatever the frame size (4096 x 4096 frames: one frame)
BATCH_PIXELS = 1 << 24


def frames_per_batch(batch_frames: int, frame_pixels: int) -> int:
    """At most ``batch_frames`` frames, and no more than :data:`BATCH_PIXELS` pixels."""
    return max(1, min(batch_frames, BATCH_PIXELS // max(frame_pixels, 1)))


@contextlib.contextmanager
def quiet_text_dtype() -> Iterator[None]:
    """Silence zarr-python's warning that fixed-width strings lack a v3 specification.

    Text variables (channel names, events, ``source_file``) are fixed-width
    unicode so that Dask can size them (``chunks="auto"``); zarr-python stores
    them as ``FixedLengthUTF32`` and warns on every write and open that this data
    type's v3 specification is pending (see docs/zarr-layout.md).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"The data type \(FixedLengthUTF32")
        yield


def compressors() -> tuple[Any, ...]:
    """Return the bytes codecs of every chunk: Blosc zstd 1 + bit shuffle, then CRC32C.

    The checksum makes a damaged chunk an error when it is read instead of wrong
    values (sharded arrays also checksum their shard index).
    """
    from zarr.codecs import BloscCodec, Crc32cCodec

    return BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle"), Crc32cCodec()


def _fs_and_root(destination: str | os.PathLike[str],
                 storage_options: dict[str, Any] | None) -> tuple[Any, str]:
    fs, root = filesystem(os.fspath(destination), storage_options)
    return fs, root.rstrip("/")


def _zarr_store(destination: str | os.PathLike[str],
                storage_options: dict[str, Any] | None, batch_writes: bool = False) -> Any:
    import fsspec
    from zarr.storage import FsspecStore, LocalStore

    dst = os.fspath(destination)
    if not is_remote(dst):
        return LocalStore(local_path(dst))
    s3 = dst.split("://", 1)[0].lower() in ("s3", "s3a")  # (not a chained URL)
    cls = _store_class(s3, batch_writes) if s3 or batch_writes else FsspecStore
    options = with_timeouts(dst, storage_options)
    fs = async_filesystem(dst, options)
    if fs is None:  # (chained URLs, filesystems without an asynchronous implementation)
        store = cls.from_url(dst, storage_options=options)
    else:
        store = cls(fs=fs, path=fsspec.core.strip_protocol(dst))
    tuned(store.fs)
    return store


@functools.cache
def _store_class(s3: bool, batch_writes: bool) -> type:
    """Return zarr's FsspecStore with fewer round trips for S3 or for a conversion's batches.

    ``s3``: a whole object is read with one request. s3fs asks for an object's
    size (a HEAD) before it reads all of it, so every whole-object read (zarr's
    metadata, its look for a shard before writing it) waited two round trips,
    three for a missing one (the HEAD, then a listing). Asked from byte 0 on
    (``bytes=0-``) it is one GET; an empty object answers that 416, which zarr
    already reads as empty.

    ``batch_writes``: for the arrays a conversion's batches write (and the frame
    descriptions, which its finish writes whole). zarr reads a
    shard before it writes any part of it, to keep what it does not overwrite; a
    batch writes every shard it touches whole, once (the layout gives each batch
    shards of its own: ``intensity`` and the OME levels a time range of whole
    shards, ``arrival_time`` from a shard-aligned base, each shard once), so
    there is nothing to keep and the read of a chunk key not yet written through
    this store answers "none" without a request. A retried batch writes the same
    shards whole again. Metadata (``zarr.json``) is read as usual.
    """
    from zarr.abc.store import OffsetByteRequest
    from zarr.storage import FsspecStore

    class SiffFsspecStore(FsspecStore):
        async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
            known = self.__dict__.get("known")
            if known and byte_range is None and key in known:  # (see :meth:`know`)
                return prototype.buffer.from_bytes(known[key])
            behind = self.__dict__.get("behind")
            writing = behind.of_key(key) if behind is not None else None
            if writing is not None:  # (read what that write stores, once it is there)
                import asyncio

                await asyncio.wrap_future(writing)
            if (batch_writes and not key.endswith("zarr.json")
                    and key not in self.__dict__.get("written", ())):
                return None
            if s3 and byte_range is None:
                byte_range = OffsetByteRequest(0)
            return await super().get(key, prototype, byte_range)

        async def set(self, key: str, value: Any) -> None:
            if s3 and not self.read_only and self._direct_puts() is not None:
                import asyncio

                from .s3_puts import put_pool

                data = value.to_bytes()  # (zarr's own set sends these bytes)
                loop = asyncio.get_running_loop()
                if await loop.run_in_executor(put_pool(), self.put_whole, key, data):
                    return
            await self._s3fs_set(key, value)

        async def _s3fs_set(self, key: str, value: Any) -> None:
            try:
                await super().set(key, value)
            except PermissionError as exc:  # s3fs's says "Access Denied", naming nothing
                raise _refused("write", self.fs.unstrip_protocol(f"{self.path}/{key}"),
                               exc) from exc
            if batch_writes:  # (keys written through this store are read as usual)
                self.__dict__.setdefault("written", set()).add(key)

        def put_whole(self, key: str, data: bytes) -> bool:
            """Store ``data`` at ``key`` with one PUT from this thread; False: use :meth:`set`.

            On S3 through a presigned URL (:class:`~.s3_puts.DirectPuts`), where
            the storage options allow it; elsewhere, or where that way fails, the
            caller stores it through :meth:`set` (s3fs), as zarr would.

            After :meth:`write_behind`, True once the PUT is on its way (a PUT this
            way fails: s3fs sends it, in that thread); :meth:`writes_behind` gives
            the writes not yet stored.
            """
            puts = self._direct_puts() if s3 and not self.read_only else None
            if puts is None or puts.refused:
                return False
            behind = self.__dict__.get("behind")
            if behind is not None:
                behind.submit(key, len(data), functools.partial(self._put, key, data, puts))
            elif not puts.put(f"{self.path}/{key}", data):
                return False
            if batch_writes:
                self.__dict__.setdefault("written", set()).add(key)
            return True

        def _put(self, key: str, data: bytes, puts: Any) -> None:
            """Store ``data`` at ``key`` now: presigned, else through s3fs (a write behind)."""
            if not puts.put(f"{self.path}/{key}", data):
                from zarr.buffer import default_buffer_prototype

                from .shards import zarr_sync

                value = default_buffer_prototype().buffer.from_bytes(data)
                zarr_sync()(self._s3fs_set(key, value))  # (set: :meth:`put_whole` again)

        def write_behind(self) -> None:
            """Let :meth:`put_whole` (and so :meth:`set`) return once a PUT is on its way.

            For a conversion's batches, which wait for :meth:`writes_behind` before
            they record themselves done. Only where PUTs go presigned (S3).
            """
            if s3 and not self.read_only and self._direct_puts() is not None:
                from .s3_puts import WritesBehind

                self.__dict__.setdefault("behind", WritesBehind())

        def writes_behind(self) -> list[Any]:
            """Return the futures of the writes on their way now and of those that failed.

            See :meth:`write_behind` and :meth:`.s3_puts.WritesBehind.pending`.
            """
            behind = self.__dict__.get("behind")
            return behind.pending() if behind is not None else []

        def stored(self, key: str) -> None:
            """Wait until the write behind of ``key`` on its way, if any, is done.

            Its error stays in its future (:meth:`writes_behind` reports it).
            """
            behind = self.__dict__.get("behind")
            writing = behind.of_key(key) if behind is not None else None
            if writing is not None:
                wait([writing])

        def settle(self) -> None:
            """Wait until every write behind is done (their errors stay in their futures)."""
            behind = self.__dict__.get("behind")
            if behind is not None:
                behind.settle()

        def know(self, metadata: dict[str, bytes]) -> None:
            """Answer reads of these metadata keys (``zarr.json``) with these bytes.

            For the process that wrote them (a conversion's layout): its arrays then
            open without a round trip each. In this process only (not pickled).
            """
            if not all(k.endswith("zarr.json") for k in metadata):
                raise ValueError("only metadata (zarr.json) keys can be known")
            self.__dict__.setdefault("known", {}).update(metadata)

        def __getstate__(self) -> dict[str, Any]:  # (the PUTs' signer stays in-process)
            return {k: v for k, v in self.__dict__.items()
                    if k not in ("puts", "behind", "known")}

        def _direct_puts(self) -> Any:
            if "puts" not in self.__dict__:
                from .s3_puts import DirectPuts
                from .shards import zarr_sync

                self.__dict__["puts"] = DirectPuts.of(self.fs, self.path, zarr_sync())
            return self.__dict__["puts"]

    return SiffFsspecStore


def _refused(what: str, path: str, exc: BaseException) -> PermissionError:
    """Return a PermissionError naming the key the store refused to ``what``."""
    return PermissionError(f"{path}: the store refused the {what} ({exc}); check the "
                           "credentials and the bucket's policy or quota")


#: fsspec protocols of object stores: keys, no directories; one PUT is atomic
OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl"})


@dataclass
class Target:
    """Where a store lives: an fsspec filesystem + root path, and the zarr store.

    On object stores (:data:`OBJECT_STORES`) every operation is as few requests as
    it can be, since each waits a round trip: no directories are made, a key's
    existence is one listing, a text is one GET, an atomic write one PUT.
    """

    destination: str
    storage_options: dict[str, Any] | None

    def __post_init__(self) -> None:
        self.fs, self.root = _fs_and_root(self.destination, self.storage_options)
        protocols = self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else \
            (self.fs.protocol,)
        #: keys without directories, each read and written by one request
        self.object_store = bool(OBJECT_STORES.intersection(protocols))
        #: an S3 bucket (s3fs): keys are copied with one request (:meth:`copy`)
        self.s3 = bool({"s3", "s3a"}.intersection(protocols)) and hasattr(self.fs, "call_s3")

    def key(self, k: str) -> str:
        """Full filesystem path of store key ``k``."""
        return f"{self.root}/{k}"

    def exists(self, k: str) -> bool:
        """Tell whether key ``k`` exists (listing caches are bypassed).

        On object stores one listing of its parent (a HEAD of a missing key is
        followed by a listing anyway, to tell a "directory").
        """
        if self.object_store:
            k = k.rstrip("/")
            return k in self.listed(k.rsplit("/", 1)[0] if "/" in k else "")
        self.fs.invalidate_cache()  # listings may be cached; we need the truth
        return bool(self.fs.exists(self.key(k)))

    def read_text(self, k: str) -> str:
        """Return the text stored at key ``k``."""
        return self.read_bytes(k).decode()

    def read_bytes(self, k: str) -> bytes:
        """Return the bytes stored at key ``k`` (FileNotFoundError if there are none).

        On object stores one ranged GET of the whole object: s3fs asks for the
        size first (a HEAD) when asked for a whole object.
        """
        path = self.key(k)
        if self.object_store:
            try:
                return bytes(self.fs.cat_file(path, start=0))
            except OSError as exc:  # an empty object refuses a range (416): ask for all
                if not re.search(r"416|[Rr]ange|satisfiable", str(exc)):
                    raise  # (missing, refused, timed out: asking again would not help)
        return bytes(self.fs.cat_file(path))

    def read_head(self, k: str, length: int) -> bytes:
        """Return at most the first ``length`` bytes stored at key ``k`` (one request).

        FileNotFoundError if there are none; an empty object may raise another
        OSError (a range of nothing is refused).
        """
        return bytes(self.fs.cat_file(self.key(k), start=0, end=length))

    def makedirs(self, path: str) -> None:
        """Make directory ``path`` and its parents (nothing to do on object stores)."""
        if not self.object_store:
            self.fs.makedirs(path, exist_ok=True)

    def write_text(self, k: str, text: str, *, atomic: bool = False) -> None:
        """Store ``text`` at key ``k``.

        ``atomic``: write a temporary key first and move it into place, so that
        readers see the old content or the new one, never a part (a disk that
        fills up leaves the temporary key, not a truncated ``k``).
        """
        self.write_bytes(k, text.encode(), atomic=atomic)

    def write_bytes(self, k: str, data: bytes, *, atomic: bool = False) -> None:
        """Store ``data`` at key ``k`` (``atomic`` as for :meth:`write_text`)."""
        path = self.key(k)
        self.makedirs(path.rsplit("/", 1)[0])
        if not atomic or self.object_store:  # (an object is replaced whole by one PUT)
            puts = self.direct_puts
            if puts is not None and puts.put(path, data):
                return
            try:
                self.fs.pipe_file(path, data)
            except PermissionError as exc:
                raise _refused("write", self.fs.unstrip_protocol(path), exc) from exc
            return
        tmp = f"{path}.partial"
        self.fs.pipe_file(tmp, data)
        self.fs.mv(tmp, path)

    @functools.cached_property
    def direct_puts(self) -> Any:
        """S3 writes from the calling thread (:class:`~.s3_puts.DirectPuts`), or None."""
        from .s3_puts import DirectPuts

        return DirectPuts.of(self.fs, self.root) if self.s3 else None

    def write_many(self, files: dict[str, bytes]) -> None:
        """Store ``files`` (full paths: data) at once (on S3 one PUT each, concurrent)."""
        for parent in sorted({p.rsplit("/", 1)[0] for p in files}):
            self.makedirs(parent)
        puts = self.direct_puts
        left = files if puts is None else puts.put_many(files)
        if left:
            try:
                self.fs.pipe(left)
            except PermissionError as exc:
                raise _refused("write", self.fs.unstrip_protocol(next(iter(left))),
                               exc) from exc

    def remove(self, keys: Iterable[str]) -> None:
        """Delete keys ``keys`` (no listing: on object stores one bulk delete per 1000)."""
        paths = [self.key(k) for k in keys]
        if paths:
            self.fs.rm(paths)
            self.fs.invalidate_cache()

    def copy(self, src: str, dst: str) -> None:
        """Copy key ``src`` to ``dst`` (on object stores a server-side copy, no download).

        One file, not a pattern: ``fs.copy`` lists both places first (two more
        round trips on object storage).
        """
        path = self.key(dst)
        self.makedirs(path.rsplit("/", 1)[0])
        try:
            if not (self.s3 and self._copy_object(self.key(src), path)):
                self.fs.cp_file(self.key(src), path)
        except PermissionError as exc:
            raise _refused("copy", self.fs.unstrip_protocol(path), exc) from exc

    def _copy_object(self, src: str, dst: str) -> bool:
        """Copy S3 object ``src`` to ``dst`` with one request; False if it is too large.

        s3fs's ``cp_file`` asks the size first (a HEAD), to copy 5 GB and more in parts.
        """
        try:
            (b1, k1, _), (b2, k2, _) = (self.fs.split_path(p) for p in (src, dst))
            self.fs.call_s3("copy_object", Bucket=b2, Key=k2,
                            CopySource={"Bucket": b1, "Key": k1})
        except PermissionError:
            raise
        except OSError as exc:  # too large for one request: cp_file copies it in parts
            if not re.search(r"InvalidRequest|[Ll]arger|[Ss]ize", str(exc)):
                raise
            return False
        self.fs.invalidate_cache(dst)
        return True

    def interrupted(self) -> bool:
        """Tell whether the store is an unfinished (or interrupted) conversion."""
        if self.object_store:  # both keys are in one listing
            return bool({STARTED_KEY, PLAN_KEY} & self.listed(PROGRESS))
        return self.exists(STARTED_KEY) or self.exists(PLAN_KEY)

    def listed(self, k: str = "") -> set[str]:
        """Keys (relative to the root) of the files and "directories" right under ``k``.

        Empty where there is nothing (one listing on object stores; caches bypassed).
        """
        self.fs.invalidate_cache()
        where = self.key(k).rstrip("/") if k else self.root
        try:
            names = self._s3_listed(where) if self.s3 else self.fs.ls(where, detail=False)
        except FileNotFoundError:
            return set()
        return {n.rstrip("/")[len(self.root) + 1 :] for n in names
                if n.rstrip("/").startswith(self.root + "/")}

    def _s3_listed(self, where: str) -> list[str]:
        """Names right under ``where`` (``bucket/key``): one ListObjectsV2 per 1,000.

        s3fs's ``ls`` lists the parent too where nothing is under a path (to tell an
        object from nothing): a second round trip at the start of every new store.
        """
        bucket, key, _ = self.fs.split_path(where)
        names: list[str] = []
        ask: dict[str, Any] = {"Bucket": bucket, "Delimiter": "/",
                               "Prefix": f"{key}/" if key else ""}
        while True:
            got = self.fs.call_s3("list_objects_v2", **ask)
            names += [f"{bucket}/{o['Key']}" for o in got.get("Contents", [])]
            names += [f"{bucket}/{p['Prefix']}" for p in got.get("CommonPrefixes", [])]
            token = got.get("NextContinuationToken")
            if not (got.get("IsTruncated") and token):
                return names
            ask["ContinuationToken"] = token

    def finished(self) -> bool:
        """Tell whether the store is a finished conversion."""
        return self.exists("zarr.json") and not self.interrupted()

    def done_batches(self, names: Iterable[str] | None = None) -> set[int]:
        """Batches of a running conversion recorded as finished.

        A batch is finished when its record (``batch-N``, written last) and its
        frame descriptions (``description-N``) are both there. ``names``: the
        progress records' keys as :meth:`listed` gave them (else listed here).
        """
        if names is None:
            self.fs.invalidate_cache()
            try:
                names = self.fs.ls(self.key(PROGRESS), detail=False)
            except FileNotFoundError:
                return set()
        found: dict[str, set[int]] = {"batch": set(), "description": set()}
        for n in names:
            kind, _, number = n.rsplit("/", 1)[-1].partition("-")
            if kind in found and number.isdigit():
                found[kind].add(int(number))
        return found["batch"] & found["description"]

    def zarr(self, batch_writes: bool = False) -> Any:
        """Return the zarr store object (``LocalStore`` or ``FsspecStore``).

        ``batch_writes``: the store a conversion's batches write whole shards
        through, each once (on object stores it does not look for a shard before
        writing it; see :func:`_store_class`).
        """
        return _zarr_store(self.destination, self.storage_options,
                           batch_writes and self.object_store)

    def reader(self, missing_chunks: str = "raise") -> Any:
        """Return the zarr store to read from.

        ``missing_chunks="raise"``: a chunk missing from a store that holds every
        chunk (photons attribute :data:`ALL_CHUNKS_STORED`) raises
        :class:`~siff_xarray.errors.MissingChunkError` (zarr would read it as zeros);
        ``"zeros"``: zarr's own behaviour (``verify`` counts them).
        """
        if missing_chunks not in ("raise", "zeros"):
            raise ValueError(f"missing_chunks must be 'raise' or 'zeros', not {missing_chunks!r}")
        store = self.zarr()
        if missing_chunks == "zeros":
            return store
        from .strict import StrictStore

        return StrictStore(store, self.destination)


@dataclass
class Plan:
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
    fingerprint: list[dict[str, Any]] | None = None  # of the sources (see converter)
    pin_version: bool = True          # remote reads require the version (ETag) first seen
    #: per batch, the OME level-0 timepoints it tallies for the contrast windows
    #: (store.ome.window_rows); None: the finish reads them from the store
    window_rows: list[list[int]] | None = None
    #: the intensity's shape (None: a batch reads it from the store)
    intensity_shape: list[int] | None = None

    @property
    def n_batches(self) -> int:
        """Number of batches."""
        return len(self.batch_frames)

    def to_json(self) -> str:
        """Return the plan as JSON (shipped to workers, kept for ``resume``)."""
        return json.dumps(self.__dict__, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """Read a plan written by :meth:`to_json`."""
        return cls(**json.loads(text))


def roundup(x: int, m: int) -> int:
    """``x`` rounded up to a multiple of ``m``."""
    return -(-x // m) * m


def chunking(vol_shape: tuple[int, ...], n_t: int, shard_bytes: int, chunk_bytes: int
             ) -> tuple[int, int]:
    """Timepoints per intensity chunk and per shard (a multiple of the chunk)."""
    vol_bytes = int(np.prod(vol_shape, dtype=np.int64)) * 2
    ct = max(1, min(n_t, chunk_bytes // max(vol_bytes, 1)))
    st = max(ct, (shard_bytes // max(vol_bytes, 1)) // ct * ct)
    st = min(st, roundup(n_t, ct))
    return ct, st


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
