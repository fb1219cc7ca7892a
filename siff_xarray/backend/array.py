"""Lazy frame-sized arrays: file managers, the frame reader and ``SiffBackendArray``.

A :class:`SiffBackendArray` holds a :class:`FrameReader` (file *managers*, never
open handles), the map from each element of its leading axes to an acquisition
frame, and the kind of decode to run. Indexing one decodes only the frames the
index selects, straight into request order. Everything pickles: the managers
reopen the files in another process with the same :class:`FileOptions`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from xarray.backends import BackendArray, CachingFileManager, DummyFileManager
from xarray.core import indexing

from .._options import FileOptions, OpenOptions
from .._paths import is_remote, normalize
from ..format.constants import ENC_TIFF
from ..reader.index_cache import IndexHint
from ..reader.siff_file import SiffFile

__all__ = ["FrameReader", "SiffBackendArray", "chunks_in_time", "file_manager"]


def _open_siff_file(path: str, options: FileOptions, hint: IndexHint | None = None,
                    mode: str = "r") -> SiffFile:
    """Open a file for the file managers (module level so that it pickles).

    ``hint`` travels with the pickled manager: unpickling it records the shipped
    index for the open, and it carries the ETag of the object when it was first
    opened, so a reopen here or on a Dask worker reads that object or fails, never
    a newer one. ``mode`` is always ``"r"``: it is passed explicitly because
    xarray's "no mode" sentinel does not survive pickling.
    """
    if mode != "r":
        raise ValueError(f"{path}: siff-xarray opens files read-only (mode={mode!r})")
    f = SiffFile.from_options(path, options, version=hint.version if hint else None)
    if hint is not None and hint.version is None:
        hint.version = f.version
    return f


def file_manager(source: Any, options: FileOptions) -> Any:
    """Return a CachingFileManager for paths and URLs, a DummyFileManager for file objects.

    Local paths are made absolute first, so workers in another directory open the
    same file.
    """
    if isinstance(source, (str, os.PathLike)):
        path = normalize(source)
        # remote files: pickled managers carry the index this process knows, so Dask
        # workers open the file without walking it again
        hint = IndexHint(path) if is_remote(path) else None
        return CachingFileManager(_open_siff_file, path, options, hint, mode="r")
    if isinstance(source, SiffFile):
        return DummyFileManager(source)
    return DummyFileManager(SiffFile.from_options(source, options))

# ---------------------------------------------------------------------- decoding per kind
#
# Each kind decodes frames into ``out`` (``(F, *trailing)``, C-contiguous) when given,
# so an eager read lands in the final array; without it, into a new array.


def _into(out: np.ndarray | None, values: np.ndarray) -> np.ndarray:
    if out is None:
        return values
    out[...] = values
    return out


def _read_intensity(f: SiffFile, frames: np.ndarray, opts: OpenOptions,
                    out: np.ndarray | None = None) -> np.ndarray:
    return f.read_frames(frames, out=out)


def _read_photon_count(f: SiffFile, frames: np.ndarray, opts: OpenOptions,
                       out: np.ndarray | None = None) -> np.ndarray:
    n = f.index.n_photons[frames].astype(np.uint32)
    tiff = f.index.encoding[frames] == ENC_TIFF
    if tiff.any():  # intensity-only pages: the photon count is the image sum
        n[tiff] = f.read_frames(frames[tiff]).sum(axis=(1, 2), dtype=np.uint64)
    return _into(out, n)


def _read_histogram(f: SiffFile, frames: np.ndarray, opts: OpenOptions,
                    out: np.ndarray | None = None) -> np.ndarray:
    return _into(out, f.histograms(frames, mode=opts.histogram_mode).astype(np.uint32))


def _read_mean_arrival(f: SiffFile, frames: np.ndarray, opts: OpenOptions,
                       out: np.ndarray | None = None) -> np.ndarray:
    return _into(out, f.lifetime_images(frames, units="ns", dtype=np.float32))


def _run_of(mask: np.ndarray) -> slice | None:
    """Return the slice covering the True entries of ``mask`` if they are one run, else None."""
    idx = np.flatnonzero(mask)
    if idx.size and int(idx[-1]) - int(idx[0]) + 1 == idx.size:
        return slice(int(idx[0]), int(idx[-1]) + 1)
    return None


_Kind = Callable[..., np.ndarray]
_KINDS: dict[str, _Kind] = {
    "intensity": _read_intensity,
    "photon_count": _read_photon_count,
    "histogram": _read_histogram,
    "mean_arrival": _read_mean_arrival,
}


class FrameReader:
    """Reads per-frame results from one or more files, addressed by acquisition frame.

    Acquisition frame ``g`` lives in file ``k`` with ``offsets[k] <= g < offsets[k+1]``
    at local frame ``g - offsets[k]``. Holds file managers only, so it pickles.
    """

    def __init__(self, managers: Sequence[Any], offsets: np.ndarray, opts: OpenOptions
                 ) -> None:
        self.managers = list(managers)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.opts = opts

    def read(self, kind: str, frames: np.ndarray, trailing: tuple[int, ...],
             dtype: np.dtype, out: np.ndarray | None = None) -> np.ndarray:
        """Decode ``kind`` for acquisition frames ``frames``; shape ``(F, *trailing)``.

        With ``out`` (C-contiguous, that shape and ``dtype``) the frames are decoded
        into it and it is returned: each file's frames straight into their rows when
        they are one run (they are in time order), otherwise through a copy.
        """
        if len(frames) == 0:
            return np.empty((0, *trailing), dtype=dtype) if out is None else out
        fn = _KINDS[kind]
        if len(self.managers) == 1:  # one file: no gathering copy
            return self._read_one(0, fn, frames, out)
        if out is None:
            out = np.empty((len(frames), *trailing), dtype=dtype)
        file_of = np.searchsorted(self.offsets, frames, side="right") - 1
        for k in np.unique(file_of).tolist():
            sel = file_of == k
            run = _run_of(sel)
            if run is not None:
                self._read_one(k, fn, frames[run] - self.offsets[k], out[run])
            else:
                out[sel] = self._read_one(k, fn, frames[sel] - self.offsets[k])
        return out

    def _read_one(self, k: int, fn: _Kind, local: np.ndarray,
                  out: np.ndarray | None = None) -> np.ndarray:
        with self.managers[k].acquire_context() as f:
            if self.opts.lock:
                with self.opts.lock:
                    return fn(f, local, self.opts, out)
            return fn(f, local, self.opts, out)

    def close(self) -> None:
        """Close every file (they reopen if data is read again)."""
        for m in self.managers:
            m.close()


def outer_take(a: np.ndarray, key: tuple[Any, ...], first_axis: int = 0) -> np.ndarray:
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

    def __init__(self, reader: FrameReader, kind: str, frame_map: np.ndarray,
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

    async def async_getitem(self, key: indexing.ExplicitIndexer) -> np.ndarray:
        """``__getitem__`` for ``Dataset.load_async``: decoding runs in a worker thread.

        The Numba decoders release the GIL, so several variables or Datasets loaded
        concurrently with ``asyncio.gather`` decode in parallel.
        """
        import asyncio

        return await asyncio.to_thread(self.__getitem__, key)

    def _getitem(self, key: tuple[Any, ...]) -> np.ndarray:
        nlead = self.frame_map.ndim
        sub = outer_take(self.frame_map, key[:nlead])
        frames = sub.reshape(-1)
        present = frames >= 0
        trailing_key = key[nlead:]
        if present.all():  # the common case: decode straight into request order
            data = self.reader.read(self.kind, frames, self.trailing, self.dtype)
            data = outer_take(data, trailing_key, first_axis=1)
            return data.reshape(sub.shape + data.shape[1:])
        run = _run_of(present)
        if run is not None and all(k == slice(None) for k in trailing_key):
            # frames missing at one end (a partial last volume): decode in place
            out = np.full((frames.size, *self.trailing), self.fill, dtype=self.dtype)
            self.reader.read(self.kind, frames[run], self.trailing, self.dtype, out[run])
            return out.reshape(sub.shape + self.trailing)
        data = self.reader.read(self.kind, frames[present], self.trailing, self.dtype)
        data = outer_take(data, trailing_key, first_axis=1)
        out = np.full((frames.size, *data.shape[1:]), self.fill, dtype=self.dtype)
        out[present] = data
        return out.reshape(sub.shape + data.shape[1:])


def chunks_in_time(frame_dims: tuple[str, ...], frame_map: np.ndarray, trailing: tuple[str, ...],
                    trailing_shape: tuple[int, ...], itemsize: int, chunk_bytes: int
                    ) -> dict[str, int]:
    """Preferred chunks: whole frames, ``~chunk_bytes`` per chunk.

    Chunks hold whole volumes and split the time axis; a volume bigger than
    ``chunk_bytes`` (many planes or channels, or big frames) is split into blocks of
    whole frames along its innermost frame axes, so that the number of chunks
    follows the data's size, never the header's frame counts alone.
    """
    per_frame = int(np.prod(trailing_shape, dtype=np.int64)) * itemsize
    shape = frame_map.shape
    per_volume = max(1, int(np.prod(shape[1:], dtype=np.int64)) * per_frame)
    chunks = dict(zip(frame_dims, shape, strict=True))
    chunks.update(zip(trailing, trailing_shape, strict=True))
    if per_volume <= chunk_bytes:
        chunks["time"] = max(1, min(shape[0], chunk_bytes // per_volume))
    else:  # a volume is too big for one chunk: whole frames, ~chunk_bytes per chunk
        room = max(1, chunk_bytes // max(per_frame, 1))  # frames per chunk
        chunks["time"] = 1
        for d, n in zip(frame_dims[:0:-1], shape[:0:-1], strict=True):  # innermost first
            chunks[d] = max(1, min(n, room))
            room = max(1, room // n)
    return chunks
