"""A persistent cache of frame indices (and frame timestamps), keyed by file content.

Opening a ``.siff`` file means walking its IFD chain: one small read per frame.
That costs one page fault per frame on a local disk and one round trip per frame
on object storage (thousands of requests). The first open of a file therefore
stores the
:class:`~siff_xarray.reader.ifd.FrameIndex` and the per-frame timestamps in an
``.npz`` file; later opens load it and only *spot-check* it against the file
(the first, middle and last IFDs are re-read and must match).

The key is a hash of the file's content (size, header block, first IFD offset
and its last 4 KiB) and version (local files: device, inode and modification
time; remote files: ETag / modification time where the filesystem reports them),
not of its name. A file rewritten in place gets a new key. Any problem with a
cache file (corrupt, stale, not writable) only means the index is rebuilt from
the file: a cache never changes what is read.

Location: ``$SIFF_XARRAY_CACHE_DIR``, else ``$XDG_CACHE_HOME/siff-xarray/index``,
else ``~/.cache/siff-xarray/index``. An entry takes about 100 bytes per frame; the
oldest entries beyond :data:`MAX_ENTRIES` are deleted when one is added.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from dataclasses import fields
from pathlib import Path

import numpy as np

from ..format.header import FileHeader
from .frame_meta import Event, FrameTimestamps
from .ifd import _TYPE_SIZE as TYPE_SIZE
from .ifd import C_IFD, C_NEXT, C_STRIP_BYTES, C_STRIP_OFF, N_COLS, FrameIndex, _walk
from .source import ByteSource

__all__ = ["default_cache_dir", "load_index", "save_index"]

FORMAT = 1  #: bump when the cached layout changes
TAIL = 4096
MAX_ENTRIES = 1000  #: the oldest entries beyond this many are deleted when one is added


def default_cache_dir() -> Path:
    """Directory of the index cache (see the module docstring)."""
    env = os.environ.get("SIFF_XARRAY_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "siff-xarray" / "index"


def content_key(source: ByteSource, header: FileHeader) -> str:
    """Hash identifying the file's content (independent of its name)."""
    h = hashlib.sha256()
    h.update(f"{FORMAT}|{source.size}|{header.first_ifd}|{int(header.bigtiff)}|"
             f"{source.fingerprint()}|".encode())
    h.update(header.nvfd_text.encode("latin-1", errors="replace"))
    h.update(header.roi_text.encode("latin-1", errors="replace"))
    h.update(source.read(max(0, source.size - TAIL), TAIL))
    return h.hexdigest()[:40]


def _spot_check(source: ByteSource, header: FileHeader, index: FrameIndex) -> bool:
    """Re-read a few IFDs and compare them with the cached index."""
    n = len(index)
    if n == 0:
        return header.first_ifd == 0
    if int(index.ifd_offset[0]) != header.first_ifd:
        return False
    for k in sorted({0, n // 2, n - 1}):
        pos = int(index.ifd_offset[k])
        data = np.frombuffer(source.read(pos, 2 * 2**10), dtype=np.uint8)
        out = np.empty((1, N_COLS), dtype=np.int64)
        _, _, count, _, _ = _walk(data, pos, header.file_size, pos, 0, out, header.bigtiff,
                                  header.header_end, True, TYPE_SIZE)
        if count != 1:
            return False
        row = out[0]
        if (row[C_IFD] != pos or row[C_STRIP_OFF] != index.strip_offset[k]
                or row[C_STRIP_BYTES] != index.strip_bytes[k]):
            return False
        if k + 1 < n and row[C_NEXT] != index.ifd_offset[k + 1]:
            return False
    return True


def load_index(directory: Path, source: ByteSource, header: FileHeader
               ) -> tuple[str, FrameIndex | None, FrameTimestamps | None]:
    """Return ``(key, index, timestamps)`` from the cache; ``None``s when absent or stale."""
    key = content_key(source, header)
    path = Path(directory) / f"{key}.npz"
    if not path.is_file():
        return key, None, None
    try:
        with np.load(path, allow_pickle=False) as z:
            if int(z["format"]) != FORMAT:
                return key, None, None
            index = FrameIndex(**{f.name: z[f"index_{f.name}"] for f in fields(FrameIndex)})
            ts = None
            if "ts_experiment_s" in z:
                ev = json.loads(str(z["ts_events"]))
                ts = FrameTimestamps(np.arange(len(index), dtype=np.int64),
                                     z["ts_experiment_s"], z["ts_epoch_laser_ns"],
                                     z["ts_epoch_system_ns"],
                                     [Event(int(f), str(t), np.nan if s is None else float(s))
                                      for f, t, s in ev])
    except Exception:  # unreadable or foreign file: rebuild
        return key, None, None
    if not _spot_check(source, header, index):
        return key, None, None
    return key, index, ts


def save_index(directory: Path, key: str, index: FrameIndex,
               timestamps: FrameTimestamps | None) -> bool:
    """Write the cache entry atomically; return False (and change nothing) on failure."""
    arrays: dict[str, np.ndarray] = {"format": np.array(FORMAT)}
    for f in fields(FrameIndex):
        arrays[f"index_{f.name}"] = getattr(index, f.name)
    if timestamps is not None:
        arrays["ts_experiment_s"] = timestamps.experiment_s
        arrays["ts_epoch_laser_ns"] = timestamps.epoch_laser_ns
        arrays["ts_epoch_system_ns"] = timestamps.epoch_system_ns
        arrays["ts_events"] = np.array(json.dumps(
            [[e.frame, e.text, None if np.isnan(e.time_s) else e.time_s]
             for e in timestamps.events]))
    try:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, **arrays)
            os.replace(tmp, directory / f"{key}.npz")
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        _prune(directory)
    except OSError:
        return False
    return True


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return 0.0


def _prune(directory: Path, keep: int = MAX_ENTRIES) -> None:
    """Delete the least recently written entries beyond ``keep``."""
    entries = list(directory.glob("*.npz"))
    if len(entries) <= keep:
        return
    for old in sorted(entries, key=_mtime)[: len(entries) - keep]:
        with contextlib.suppress(OSError):
            old.unlink()
