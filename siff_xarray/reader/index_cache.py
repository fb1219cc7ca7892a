"""A persistent cache of frame indices (and frame timestamps), keyed by file content.

Opening a ``.siff`` file means walking its IFD chain: one small read per frame.
That costs one page fault per frame on a local disk and one round trip per frame
on object storage (thousands of requests). The first open of a file therefore
stores the
:class:`~siff_xarray.reader.ifd.FrameIndex` and the per-frame timestamps in an
``.npz`` file; later opens load it and only *spot-check* it against the file
(the first, middle and last IFDs are re-read and must match).

The key is a hash of the file's content (size, header block, first IFD offset
and its last 4 KiB) and version (local files: device, inode, modification and
change time, which no ``os.utime`` can set back; remote files: ETag /
modification time where the filesystem reports them), not of its name. A file
edited in place gets a new key, even with its size and modification time
restored. Any problem with a cache file (corrupt, stale, not writable) only means
the index is rebuilt from the file: a cache never changes what is read.

Two more ways to skip the walk work on machines that never opened the file:

* a **sidecar**, ``<file>.siffidx`` next to the file (local or on object storage),
  written by ``siff-xarray index`` and ``convert``: the same arrays under a
  *portable* key (size, header, first IFD offset and last 4 KiB; no modification
  time or ETag, which change when a file is copied or uploaded), checked against
  the file and by re-reading its middle IFD before use;
* a **token** shipped with pickled Datasets to Dask workers (:class:`IndexHint`):
  the index the client already has, checked the same way on the worker.

Location: ``$SIFF_XARRAY_CACHE_DIR``, else ``$XDG_CACHE_HOME/siff-xarray/index``,
else ``~/.cache/siff-xarray/index``. An entry takes about 100 bytes per frame; the
oldest entries beyond :data:`MAX_ENTRIES` are deleted when one is added. Next to
them, per remote URL, the byte ranges the last check of its index read
(:func:`checks_for`), so that an open requests them with the file's head.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import struct
import tempfile
import threading
from collections import OrderedDict
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SiffFormatError
from ..format.constants import TAG_STRIP_BYTE_COUNTS, TAG_STRIP_OFFSETS, TIFF_TYPE_SIZES
from ..format.header import FileHeader
from .frame_meta import Event, FrameTimestamps
from .ifd import _TYPE_SIZE as TYPE_SIZE
from .ifd import C_IFD, C_NEXT, C_STRIP_BYTES, C_STRIP_OFF, N_COLS, FrameIndex
from .source import ByteSource

__all__ = ["SIDECAR_SUFFIX", "IndexHint", "check_packed", "check_ranges", "checks_for",
           "default_cache_dir", "forget", "known", "known_version", "load_index",
           "note_checks", "pack", "portable_key", "remember", "remember_version",
           "save_index", "unpack"]

FORMAT = 1  #: bump when the cached layout changes
TAIL = ByteSource.tail_bytes
SIDECAR_SUFFIX = ".siffidx"
IFD_PEEK = 2 * 2**10  #: bytes read at a cached IFD to check it (an IFD is a few hundred)
#: how many shipped/known indexes a process keeps (by URL)
MAX_KNOWN = 64
MAX_ENTRIES = 1000  #: the oldest entries beyond this many are deleted when one is added


def default_cache_dir() -> Path:
    """Directory of the index cache (see the module docstring)."""
    env = os.environ.get("SIFF_XARRAY_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "siff-xarray" / "index"


def _key(source: ByteSource, header: FileHeader, version: str) -> str:
    h = hashlib.sha256()
    h.update(f"{FORMAT}|{source.size}|{header.first_ifd}|{int(header.bigtiff)}|"
             f"{version}|".encode())
    h.update(header.nvfd_text.encode("latin-1", errors="replace"))
    h.update(header.roi_text.encode("latin-1", errors="replace"))
    h.update(source.tail(TAIL))
    return h.hexdigest()[:40]


def content_key(source: ByteSource, header: FileHeader) -> str:
    """Hash identifying this version of the file (content and modification time/ETag)."""
    return _key(source, header, source.fingerprint())


def portable_key(source: ByteSource, header: FileHeader) -> str:
    """Hash of the file's content only: the same for a copy or an upload of the file."""
    return _key(source, header, "portable")


def _strips_and_next(raw: bytes, bigtiff: bool) -> tuple[int, int, int] | None:
    """StripOffsets, StripByteCounts and the next-IFD offset of the IFD at ``raw[0]``.

    A plain-Python reading of one IFD for :func:`_spot_check`, so that opening a file
    whose index is cached needs no compiled code (Numba's first use in a process
    costs ~0.5 s). Returns None when the IFD is not what a frame's IFD looks like
    here (not a single strip, or cut off): the caller then re-reads it with the walk,
    so this can only ever cost a second look, never accept a wrong index.
    """
    cnt_fmt, ent_sz, off_fmt = ("<Q", 20, "<Q") if bigtiff else ("<H", 12, "<I")
    cnt_sz, osz = struct.calcsize(cnt_fmt), struct.calcsize(off_fmt)
    if len(raw) < cnt_sz:
        return None
    (n,) = struct.unpack_from(cnt_fmt, raw, 0)
    if n <= 0 or len(raw) < cnt_sz + n * ent_sz + osz:
        return None
    found: dict[int, int] = {}
    for e in range(cnt_sz, cnt_sz + n * ent_sz, ent_sz):
        tag, typ = struct.unpack_from("<HH", raw, e)
        if tag not in (TAG_STRIP_OFFSETS, TAG_STRIP_BYTE_COUNTS):
            continue
        (tcount,) = struct.unpack_from(off_fmt, raw, e + 4)
        size = TIFF_TYPE_SIZES.get(typ, 0)
        if tcount != 1 or size == 0 or size > osz:
            return None
        found[tag] = int.from_bytes(raw[e + 4 + osz : e + 4 + osz + size], "little")
    if len(found) != 2:
        return None
    (nxt,) = struct.unpack_from(off_fmt, raw, cnt_sz + n * ent_sz)
    return found[TAG_STRIP_OFFSETS], found[TAG_STRIP_BYTE_COUNTS], int(nxt)


def _walk_one(source: ByteSource, header: FileHeader, pos: int) -> tuple[int, int, int] | None:
    """StripOffsets, StripByteCounts and next-IFD offset of the IFD at ``pos``, by the walk."""
    from .ifd_walk import walk

    data = np.frombuffer(source.read(pos, IFD_PEEK), dtype=np.uint8)
    out = np.empty((1, N_COLS), dtype=np.int64)
    _, _, count, _, _ = walk(data, pos, header.file_size, pos, 0, out, header.bigtiff,
                             header.header_end, True, TYPE_SIZE)
    if count != 1 or out[0, C_IFD] != pos:
        return None
    return int(out[0, C_STRIP_OFF]), int(out[0, C_STRIP_BYTES]), int(out[0, C_NEXT])


def check_ranges(index: FrameIndex, size: int, frames: list[int] | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Bytes a check of ``index`` reads: ``IFD_PEEK`` at the IFDs of ``frames``.

    ``frames`` defaults to every frame a thorough check reads (first, middle, last).
    """
    n = len(index)
    if frames is None:
        frames = sorted({0, n // 2, n - 1}) if n else []
    pos = index.ifd_offset[frames].astype(np.int64)
    return pos, np.minimum(pos + IFD_PEEK, size)


def _spot_check(source: ByteSource, header: FileHeader, index: FrameIndex,
                thorough: bool = True) -> bool:
    """Re-read a few IFDs (first, middle, last; only the middle one if not ``thorough``)."""
    n = len(index)
    if n == 0:
        return header.first_ifd == 0
    if int(index.ifd_offset[0]) != header.first_ifd:
        return False
    checked = sorted({0, n // 2, n - 1} if thorough else {n // 2})
    pos_all, stop_all = check_ranges(index, source.size, checked)
    if (pos_all < 0).any() or (pos_all >= source.size).any():
        return False
    try:  # together: one round trip for a remote file
        buf, base = source.read_ranges(pos_all, stop_all)
    except SiffFormatError:  # shorter than it says: not the file the index describes
        return False
    for k, pos, stop, at in zip(checked, pos_all.tolist(), stop_all.tolist(), base.tolist(),
                                strict=True):
        got = _strips_and_next(buf[at : at + stop - pos].tobytes(), header.bigtiff)
        if got is None:  # not a plain single-strip IFD: ask the walk
            got = _walk_one(source, header, pos)
        if got is None:
            return False
        strip_off, strip_bytes, nxt = got
        if strip_off != index.strip_offset[k] or strip_bytes != index.strip_bytes[k]:
            return False
        if k + 1 < n and nxt != index.ifd_offset[k + 1]:
            return False
    return True


def _arrays(key: str, index: FrameIndex, timestamps: FrameTimestamps | None
            ) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {"format": np.array(FORMAT), "key": np.array(key)}
    for f in fields(FrameIndex):
        arrays[f"index_{f.name}"] = getattr(index, f.name)
    if timestamps is not None:
        arrays["ts_experiment_s"] = timestamps.experiment_s
        arrays["ts_epoch_laser_ns"] = timestamps.epoch_laser_ns
        arrays["ts_epoch_system_ns"] = timestamps.epoch_system_ns
        arrays["ts_events"] = np.array(json.dumps(
            [[e.frame, e.text, None if np.isnan(e.time_s) else e.time_s]
             for e in timestamps.events]))
    return arrays


def pack(key: str, index: FrameIndex, timestamps: FrameTimestamps | None) -> bytes:
    """Serialise an index (and timestamps) under ``key``: a compressed ``.npz``.

    The layout is documented in docs/remote.md ("Sidecar format"): ``format``
    (int), ``key`` (str), ``index_<field>`` for every :class:`FrameIndex` field,
    and optionally ``ts_experiment_s``, ``ts_epoch_laser_ns``,
    ``ts_epoch_system_ns`` and ``ts_events`` (JSON ``[[frame, text, time_s], ...]``).
    """
    buf = io.BytesIO()
    np.savez_compressed(buf, **_arrays(key, index, timestamps))
    return buf.getvalue()


def unpack(data: bytes | str | os.PathLike[str]
           ) -> tuple[str, FrameIndex, FrameTimestamps | None] | None:
    """Read what :func:`pack` wrote (bytes or a path); ``None`` if unusable."""
    try:
        src = io.BytesIO(data) if isinstance(data, bytes) else data
        with np.load(src, allow_pickle=False) as z:
            if int(z["format"]) != FORMAT:
                return None
            key = str(z["key"]) if "key" in z else ""
            index = FrameIndex(**{f.name: z[f"index_{f.name}"] for f in fields(FrameIndex)})
            n = len(index)
            if any(len(getattr(index, f.name)) != n for f in fields(FrameIndex)):
                return None
            ts = None
            if "ts_experiment_s" in z:
                ev = json.loads(str(z["ts_events"]))
                ts = FrameTimestamps(np.arange(n, dtype=np.int64),
                                     z["ts_experiment_s"], z["ts_epoch_laser_ns"],
                                     z["ts_epoch_system_ns"],
                                     [Event(int(f), str(t), np.nan if s is None else float(s))
                                      for f, t, s in ev])
                if len(ts.experiment_s) != n:
                    return None
    except Exception:  # unreadable, truncated or foreign data: not used
        return None
    return key, index, ts


def packed_key(data: bytes | None) -> str | None:
    """Return the content key of a packed index (a sidecar), reading nothing else.

    ``None`` for no data, another format or unreadable data. Only the two small
    members are decompressed: a sidecar of a long session holds megabytes.
    """
    if not data:
        return None
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            if int(z["format"]) != FORMAT or "key" not in z:
                return None
            return str(z["key"])
    except Exception:  # unreadable, truncated or foreign data
        return None


def check_packed(data: bytes | None, source: ByteSource, header: FileHeader
                 ) -> tuple[FrameIndex, FrameTimestamps | None] | None:
    """Use a packed index (sidecar or token) if it belongs to this file's content."""
    if not data:
        return None
    got = unpack(data)
    if got is None:
        return None
    key, index, ts = got
    if key != portable_key(source, header) or not _spot_check(source, header, index,
                                                              thorough=False):
        return None
    return index, ts


def load_index(directory: Path, source: ByteSource, header: FileHeader
               ) -> tuple[str, FrameIndex | None, FrameTimestamps | None]:
    """Return ``(key, index, timestamps)`` from the cache; ``None``s when absent or stale."""
    key = content_key(source, header)
    path = Path(directory) / f"{key}.npz"
    if not path.is_file():
        return key, None, None
    got = unpack(path)
    if got is None or not _spot_check(source, header, got[1]):
        return key, None, None
    return key, got[1], got[2]


_CHECKED: OrderedDict[str, tuple[list[int], list[int]]] = OrderedDict()
HINT_SUFFIX = ".ifds"


def _hint_path(directory: Path, name: str) -> Path:
    return Path(directory) / (hashlib.sha256(name.encode()).hexdigest()[:40] + HINT_SUFFIX)


def checks_for(name: str, directory: Path | None) -> tuple[list[int], list[int]] | None:
    """Return the byte ranges the last check of the index of ``name`` (a URL) read.

    From this process (:func:`note_checks`), else from a small file in the cache
    ``directory`` named by a hash of ``name``. An open requests them with the
    file's head (``with_head`` of :func:`~.source.open_source`), so checking a cached
    index costs no round trip of its own. Only a hint: the check compares what
    it reads with the index whatever the ranges were, and a wrong or stale hint
    costs a few KiB read for nothing. None when nothing is recorded.
    """
    with _KNOWN_LOCK:
        got = _CHECKED.get(name)
    if got is not None or directory is None:
        return got
    try:
        ranges = json.loads(_hint_path(directory, name).read_text())
        starts, stops = [int(a) for a, _ in ranges], [int(b) for _, b in ranges]
    except (OSError, ValueError, TypeError):
        return None
    return starts, stops


def note_checks(name: str, directory: Path | None, index: FrameIndex, size: int
                ) -> tuple[list[int], list[int]]:
    """Record the ranges a thorough check of ``index`` reads, for :func:`checks_for`.

    Kept in this process and, where ``directory`` is given and writable, in a file
    there (written atomically; failures are ignored: it is only a hint). Returns
    the ranges (starts, stops).
    """
    starts, stops = (a.tolist() for a in check_ranges(index, size))
    if checks_for(name, directory) == (starts, stops):
        return starts, stops
    _record(_CHECKED, name, (starts, stops))
    if directory is not None:
        text = json.dumps([[a, b] for a, b in zip(starts, stops, strict=True)]).encode()
        _write_entry(Path(directory), _hint_path(directory, name).name,
                     lambda fh: fh.write(text), "*" + HINT_SUFFIX)
    return starts, stops


def save_index(directory: Path, key: str, index: FrameIndex,
               timestamps: FrameTimestamps | None) -> bool:
    """Write the cache entry atomically; return False (and change nothing) on failure."""
    arrays = _arrays(key, index, timestamps)
    return _write_entry(Path(directory), f"{key}.npz", lambda fh: np.savez(fh, **arrays),
                        "*.npz")


def _write_entry(directory: Path, name: str, write: Any, kind: str) -> bool:
    """Write file ``name`` in ``directory`` atomically with ``write(binary file)``.

    Then prunes the oldest files matching ``kind`` there. Returns False (and changes
    nothing) when the directory cannot be written.
    """
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                write(fh)
            os.replace(tmp, directory / name)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        _prune(directory, pattern=kind)
    except OSError:
        return False
    return True


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return 0.0


def _prune(directory: Path, keep: int = MAX_ENTRIES, pattern: str = "*.npz") -> None:
    """Delete the least recently written entries (or hints) beyond ``keep``."""
    entries = list(directory.glob(pattern))
    if len(entries) <= keep:
        return
    for old in sorted(entries, key=_mtime)[: len(entries) - keep]:
        with contextlib.suppress(OSError):
            old.unlink()


# ---------------------------------------------------------------- indexes known to this process

_KNOWN: OrderedDict[str, bytes] = OrderedDict()
_VERSIONS: OrderedDict[str, str] = OrderedDict()
_KNOWN_LOCK = threading.Lock()


def _record(table: OrderedDict[str, Any], name: str, value: Any) -> None:
    """Put ``name`` last in ``table``, keeping its newest :data:`MAX_KNOWN` entries."""
    with _KNOWN_LOCK:
        table[name] = value
        table.move_to_end(name)
        while len(table) > MAX_KNOWN:
            table.popitem(last=False)


def remember(name: str, data: bytes) -> None:
    """Record the packed index of the file at ``name`` (a URL) for this process."""
    _record(_KNOWN, name, data)


def remember_version(name: str, version: str) -> None:
    """Record the ETag the file at ``name`` (a URL) had when this process last opened it."""
    _record(_VERSIONS, name, version)


def known_version(name: str) -> str | None:
    """Return the ETag recorded for ``name`` (:func:`remember_version`), if any."""
    with _KNOWN_LOCK:
        return _VERSIONS.get(name)


def forget(name: str | None = None) -> None:
    """Drop the packed index and version recorded for ``name`` (every one if ``None``)."""
    with _KNOWN_LOCK:
        if name is None:
            _KNOWN.clear()
            _VERSIONS.clear()
            _CHECKED.clear()
        else:
            _KNOWN.pop(name, None)
            _VERSIONS.pop(name, None)
            _CHECKED.pop(name, None)


def known(name: str) -> bytes | None:
    """Return the packed index recorded for ``name``, if any."""
    with _KNOWN_LOCK:
        return _KNOWN.get(name)


class IndexHint:
    """A picklable pointer to the frame index of the remote file ``name``.

    Pickled (into a Dask graph), it carries the packed index this process knows
    for the file; unpickled (on a worker), it records it there, so that the
    worker's open skips the walk after checking the index against the file (the
    portable key and the middle IFD: a few small requests). Equality and hash
    use the name only, so file managers keyed by their arguments are unaffected.
    """

    def __init__(self, name: str, version: str | None = None) -> None:
        self.name = name
        #: the ETag of the object when this process first opened it (set by the opener):
        #: a worker's open requires it, so it never reads a newer object
        self.version = version

    def __reduce__(self) -> tuple[Any, tuple[str, bytes | None, str | None]]:
        return (_restore_hint, (self.name, known(self.name), self.version))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IndexHint) and other.name == self.name

    def __hash__(self) -> int:
        return hash(("IndexHint", self.name))

    def __repr__(self) -> str:
        return f"IndexHint({self.name!r}, version={self.version!r})"


def _restore_hint(name: str, data: bytes | None, version: str | None = None) -> IndexHint:
    if data is not None and known(name) is None:
        remember(name, data)
    return IndexHint(name, version)
