"""``SiffFile``: the low-level reader of ``.siff`` and ScanImage TIFF files.

It ties the pieces together: a byte source (memory map or byte ranges), the
header, the frame index, the parsed metadata, :class:`ImParams`, and the Numba
kernels. Every data method takes a list of file frame indices (IFD order,
flyback included, negative indices count from the end) and returns numpy arrays
in request order.

Arrival-time conventions (see ``docs/format.md``):

* arrival times are integer bins; the bin width is ``picoseconds_per_bin``;
* ``histograms`` have ``Tau_bins`` bins by default; an arrival time
  ``>= Tau_bins`` is dropped (``mode="drop"``, counted in the overflow),
  clipped into the last bin (``"clip"``), or handled as corrosiff does
  (``"corrosiff"``: ``Tau_bins + 2`` bins, arrival modulo that length);
* mean arrival times (empirical lifetimes) use every photon's raw bin;
* phasors use ``exp(2*pi*i*h*tau/P)`` with ``P = Tau_bins`` (one laser period)
  unless ``period_bins`` is given.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
import warnings
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import IO, Any

import numpy as np

from .._options import FileOptions
from .._paths import is_remote
from ..errors import SiffFormatError, SiffWarning, user_stacklevel
from ..format.constants import (
    ENC_COMPRESSED,
    ENC_TIFF,
    ENCODING_NAMES,
    MULTIHARP_BASE_RESOLUTION_PS,
)
from ..format.header import FileHeader, read_header
from ..format.imparams import ImParams
from ..format.metadata import RoiGroup, ScanImageMetadata, parse_nvfd, parse_roi_groups
from . import decode as K
from .frame_meta import FrameTimestamps, parse_description, parse_timestamps
from .ifd import FrameIndex, build_frame_index, pread_ranges, unread_bytes
from .index_cache import (
    SIDECAR_SUFFIX,
    check_packed,
    checks_for,
    default_cache_dir,
    known,
    load_index,
    note_checks,
    pack,
    packed_key,
    portable_key,
    remember,
    remember_version,
    save_index,
)
from .readahead import StridePredictor
from .reductions import FrameSelection, PhotonReductions, Shifts, shifts_for_frames
from .source import ByteSource, FsspecSource, LocalSource, open_source

__all__ = ["SiffFile", "shifts_for_frames"]
_DESC_CHUNK = 2048  # frames whose descriptions are parsed between page releases


class SiffFile(PhotonReductions):
    """A ScanImage-FLIM ``.siff`` (or ScanImage ``.tif``) file, open for reading.

    Parameters
    ----------
    path_or_fileobj
        Local path, fsspec URL, or an open binary file object.
    storage_options
        fsspec options for URLs.
    tau_bins
        Override the number of arrival-time bins per laser period (``Tau_bins``).
    bin_width_ps
        Override the arrival-time bin width in picoseconds.
    base_resolution_ps
        TCSPC base resolution used with ``binResolution`` (5 ps for MultiHarp with
        MHLib >= 3, 20 ps before; the file does not record which).
    index_cache
        Keep the frame index and timestamps in a persistent cache so the next open
        skips the IFD walk (see :mod:`siff_xarray.reader.index_cache`). ``None``
        (default): for files opened by path or URL, in the default directory (not
        for file objects); ``True``: always; a path: always, in that directory;
        ``False``: never.
    version
        For URLs: the ETag the object must still have, as :attr:`version` reported
        when it was first opened; a replaced object is a ``SiffFormatError``. Dask
        workers reopen a Dataset's file this way, so they never read a newer object
        than the one the Dataset describes. Reads of an open file are pinned to its
        version anyway (where the server names versions with strong ETags).
    pin_version
        For URLs: require every read to be of the version (ETag) the open saw
        (default). ``False`` ignores the server's ETags and modification times:
        for servers that give one object different ETags from one request to the
        next (some load-balanced ones), whose reads would otherwise be refused as
        of a replaced object. An object replaced by another of the same size is
        then not detected.

    Examples
    --------
    >>> with SiffFile("run.siff") as f:                     # doctest: +SKIP
    ...     frames = f.read_frames(f.im_params.flatten_by_timepoints())

    """

    def __init__(
        self,
        path_or_fileobj: str | os.PathLike[str] | IO[bytes] | ByteSource,
        *,
        storage_options: dict[str, Any] | None = None,
        tau_bins: int | None = None,
        bin_width_ps: float | None = None,
        base_resolution_ps: float = MULTIHARP_BASE_RESOLUTION_PS,
        index_cache: bool | str | os.PathLike[str] | None = None,
        version: str | None = None,
        pin_version: bool = True,
    ) -> None:
        self.options = FileOptions(storage_options=storage_options, tau_bins=tau_bins,
                                   bin_width_ps=bin_width_ps,
                                   base_resolution_ps=base_resolution_ps, index_cache=index_cache,
                                   pin_version=pin_version)
        self._path_or_fileobj = path_or_fileobj
        hint = None
        if isinstance(path_or_fileobj, str) and is_remote(path_or_fileobj) \
                and index_cache is not False:
            # the IFDs that checking the cached index will read come with the head
            hint = checks_for(path_or_fileobj, _cache_dir(index_cache))
        self._source = open_source(path_or_fileobj, storage_options, version=version,
                                   with_head=hint, pin=pin_version)
        if self.version:  # the object a reduction's workers read
            remember_version(self._source.name, self.version)
        self._all_timestamps: FrameTimestamps | None = None
        #: where this open found a sidecar that matches the file (else None)
        self.sidecar_found: str | None = None
        #: whether this open looked for the sidecar (not where the index came from
        #: this process's memory or the local cache): see :meth:`write_sidecar`
        self._sidecar_looked = False
        self._predictor: StridePredictor | None = None  # made by the first read in one part
        try:
            self.header: FileHeader = read_header(self._source)
            self.index: FrameIndex = self._load_index(index_cache)
            self._warn_unread()
            self.metadata: ScanImageMetadata = parse_nvfd(self.header.nvfd_text)
            self.roi_groups: dict[str, RoiGroup] = parse_roi_groups(self.header.roi_text,
                                                                     self._source.name)
        except BaseException:
            self._source.close()
            raise

    @property
    def version(self) -> str | None:
        """The ETag of a remote file when it was opened (None: local, none sent, or unpinned).

        Every read requires it for plain HTTP(S) URLs and S3 objects; for chained
        URLs and other protocols it is compared when the file is opened again with
        it (by Dask workers), not at each read.
        """
        return getattr(self._source, "version", None)

    @property
    def unread_bytes(self) -> int:
        """Bytes after the last frame the IFD chain reaches (0 for a whole file).

        A frame cut off mid-write (the acquisition stopped), or, when it is more than
        a couple of frames, frames that a damaged IFD chain does not reach.
        """
        return unread_bytes(self.index, self.header.file_size)

    def _warn_unread(self) -> None:
        tail = self.unread_bytes
        if not tail:
            return
        n = self.num_frames
        idx = self.index
        # a frame cut off mid-write leaves less than one frame; more is a damaged chain
        span = max(int((idx.strip_offset + idx.strip_bytes - idx.ifd_offset).max()), 1)
        plural = "s" if n != 1 else ""
        if tail > 2 * span + 4096:
            msg = (f"the IFD chain stops after frame {n - 1} with {tail} bytes (about "
                   f"{tail // span} frames) left in the file: it looks damaged rather than "
                   f"cut off mid-write; recovered {n} complete frame{plural}, the rest is not "
                   "read")
        else:
            msg = (f"the file ends inside a frame (acquisition cut off mid-write?); "
                   f"recovered {n} complete frame{plural}")
        warnings.warn(f"{self.name}: {msg}", SiffWarning, stacklevel=user_stacklevel())

    @classmethod
    def from_options(cls, path_or_fileobj: str | os.PathLike[str] | IO[bytes] | ByteSource,
                     options: FileOptions, version: str | None = None) -> SiffFile:
        """Open a file with the options of an open call (see :class:`FileOptions`)."""
        return cls(path_or_fileobj, storage_options=options.storage,
                   tau_bins=options.tau_bins, bin_width_ps=options.bin_width_ps,
                   base_resolution_ps=options.base_resolution_ps,
                   index_cache=options.index_cache, version=version,
                   pin_version=options.pin_version)

    def _load_index(self, index_cache: bool | str | os.PathLike[str] | None) -> FrameIndex:
        """Find the frame index without walking the file where possible.

        In order: an index shipped with a Dask graph or known from an earlier open
        in this process (remote files), the local cache, the sidecar next to the
        file (``<file>.siffidx``), and else the walk (then cached). Each is checked
        against the file before use (:mod:`siff_xarray.reader.index_cache`).
        """
        if index_cache is None:
            index_cache = isinstance(self._source, (FsspecSource, LocalSource))
        if index_cache is False:
            return build_frame_index(self._source, self.header)
        src, hdr = self._source, self.header
        remote = isinstance(src, FsspecSource)
        got = check_packed(known(src.name), src, hdr) if remote else None
        directory = _cache_dir(index_cache)
        key, index, ts = load_index(directory, src, hdr) if got is None else ("", *got)
        if index is None:
            self._sidecar_looked = True
            got = check_packed(src.read_sibling(SIDECAR_SUFFIX), src, hdr)
            if got is not None:
                index, ts = got
                self.sidecar_found = src.sibling_name(SIDECAR_SUFFIX)
            else:
                index = build_frame_index(src, hdr)
                self.index = index
                ts = self._parse_timestamps(np.arange(len(index), dtype=np.int64))
                src.forget_kept()  # the descriptions kept from the walk are parsed
            save_index(directory, key, index, ts)
        self._all_timestamps = ts
        if remote:
            # for the next open; and what this one read of them, for reopens here
            src.keep_for_reopen(*note_checks(src.name, directory, index, src.size))
            if known(src.name) is None:  # for Dask workers (IndexHint)
                remember(src.name, pack(portable_key(src, hdr), index, ts))
        return index

    def write_sidecar(self) -> str | None:
        """Write ``<file>.siffidx`` next to the file, so that any machine opens it fast.

        Returns where it was written, or ``None`` when it cannot be (a file object,
        a read-only directory or bucket). See docs/remote.md for the format. Where
        a sidecar that belongs to the file's content is there already, nothing is
        written again (:attr:`sidecar_found` then says where): a conversion of a
        file indexed earlier does not upload it once more. This open may have met
        it; where its index came from this process's memory or the local cache
        instead, the sidecar is read now (one request) and its key compared. (A
        process does not assume a sidecar it met earlier is still there.)
        """
        if self.sidecar_found is not None:
            return self.sidecar_found
        key = portable_key(self._source, self.header)
        # (absent, unreadable or foreign: None, and written)
        if not self._sidecar_looked and packed_key(
                self._source.read_sibling(SIDECAR_SUFFIX)) == key:
            self.sidecar_found = self._source.sibling_name(SIDECAR_SUFFIX)
            return self.sidecar_found
        data = pack(key, self.index, self.timestamps())
        try:
            return self._source.write_sibling(SIDECAR_SUFFIX, data)
        except Exception:  # read-only: opening simply walks the chain
            return None

    # ------------------------------------------------------------------ basics

    @property
    def path(self) -> str | os.PathLike[str] | IO[bytes] | ByteSource:
        """What the file was opened from: a path, URL or file object."""
        return self._path_or_fileobj

    @property
    def name(self) -> str:
        """The file's path, URL or file-object name (used in error messages)."""
        return self._source.name

    @property
    def num_frames(self) -> int:
        """Number of frames (IFDs), flyback frames included."""
        return len(self.index)

    @property
    def frame_shape(self) -> tuple[int, int]:
        """``(height, width)`` shared by all frames.

        Raises
        ------
        SiffFormatError
            If the file holds no frames, or frames of different shapes (then ask per
            frame via ``index``).

        """
        if self.num_frames == 0:
            raise SiffFormatError(self.name, "the file holds no frames")
        h, w = self.index.height, self.index.width
        if (h != h[0]).any() or (w != w[0]).any():
            raise SiffFormatError(self.name, "frames have different shapes; request frames "
                                  "of one shape at a time")
        return int(h[0]), int(w[0])

    @property
    def frame_encodings(self) -> np.ndarray:
        """Encoding of each frame: ``"raw"``, ``"compressed"`` or ``"tiff"``."""
        names = np.array([ENCODING_NAMES[k] for k in sorted(ENCODING_NAMES)])
        return names[self.index.encoding]

    @property
    def has_photons(self) -> bool:
        """True if any frame stores photons (``.siff``); False for intensity-only TIFFs."""
        return bool((self.index.encoding != ENC_TIFF).any())

    @cached_property
    def im_params(self) -> ImParams:
        """Frame bookkeeping (channels, slices, flyback, frame lists)."""
        shape = None
        if self.num_frames:
            try:
                shape = self.frame_shape
            except ValueError:
                shape = (int(self.index.height[0]), int(self.index.width[0]))
        return ImParams(self.metadata, self.num_frames, shape, self.roi_groups,
                        tau_bins=self.options.tau_bins, bin_width_ps=self.options.bin_width_ps,
                        base_resolution_ps=self.options.base_resolution_ps, name=self.name)

    def release(self) -> None:
        """Drop the memory map's pages read so far from this process's RSS.

        Pages of a memory-mapped file count in the resident set size once touched;
        long streaming jobs (the Zarr converter) call this between batches so their
        RSS stays bounded. Data are re-read from the page cache when needed. No-op
        for remote files and file objects.
        """
        self._source.release()

    def close(self) -> None:
        """Release the file (arrays returned earlier stay valid: they are copies)."""
        self._source.close()

    def __reduce__(self):
        path = self._path_or_fileobj
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError("a SiffFile opened from a file object cannot be pickled")
        return (_reopen, (path, self.options))

    # ------------------------------------------------------------------ selection helpers

    def _shape_of(self, f: np.ndarray) -> tuple[int, int]:
        if f.size == 0:
            return self.frame_shape if self.num_frames else (0, 0)
        h, w = self.index.height[f], self.index.width[f]
        if (h != h[0]).any() or (w != w[0]).any():
            raise SiffFormatError(self.name, "the requested frames have different shapes")
        return int(h[0]), int(w[0])

    def prefetch(self, frames: np.ndarray) -> None:
        """Hint that ``frames`` (their IFDs, descriptions and data) are read next.

        When the frames lie close together, the span of their bytes is handed to
        the source: a memory-mapped file asks the OS to read it into the page
        cache, a remote file starts fetching it in the background
        (:meth:`FsspecSource.will_need`); a file object ignores the hint. Local
        decoding calls it; the converter also calls it for the next frames while
        it decodes the current ones.
        """
        self._will_need(np.asarray(frames, dtype=np.int64))

    def _will_need(self, f: np.ndarray, through: int = 0) -> None:
        """Hand the span of frames ``f`` to the source to fetch ahead (see :meth:`_span_of`)."""
        span = self._span_of(f, through)
        if span is not None:
            self._source.will_need(*span)

    def _span_of(self, f: np.ndarray, through: int = 0) -> tuple[int, int] | None:
        """Return the bytes of frames ``f`` (IFDs, descriptions, data) as one span, or None.

        None where ``f`` is empty, the file is closed, or the frames lie so far
        apart that the span would be more than twice their bytes, unless the span
        is at most ``through`` bytes and the source reads such gaps through
        (:meth:`~.source.ByteSource.reads_gaps`: a remote file on a fast link)
        within what it allows a read to add (``through_budget``).
        """
        if f.size == 0 or self._source.closed:
            return None
        idx = self.index
        has_desc = idx.desc_length[f] > 0
        start = int(idx.ifd_offset[f].min())
        if has_desc.any():
            start = min(start, int(idx.desc_offset[f][has_desc].min()))
        stop = int(max(idx.data_stop[f].max(), (idx.desc_offset[f] + idx.desc_length[f]).max()))
        asked = int((idx.data_stop[f] - idx.ifd_offset[f]).sum())
        if stop - start <= 2 * asked:
            return start, stop
        if (stop - start <= through and self._source.reads_gaps(self._widest_gap(f))
                and stop - start - asked <= self._source.through_budget(asked)):
            return start, stop
        return None

    def _widest_gap(self, f: np.ndarray) -> int:
        """Return the longest stretch of the file between frames ``f`` (in file order)."""
        fs = np.sort(f)
        idx = self.index
        return int((idx.ifd_offset[fs[1:]] - idx.data_stop[fs[:-1]]).max(initial=0))

    #: reads a fetched file predicts ahead of a read in one part whose stride is
    #: known (:class:`.readahead.StridePredictor`): the Dask chunks that follow.
    #: 0 predicts nothing: for a reader that fetches what it reads next itself (the
    #: converter), whose reads would otherwise be taken for a stride to follow
    predicted_reads = 4
    #: predict on dask.distributed workers too. Off: the scheduler spreads each run
    #: of chunks over the workers, so a worker's reads break off where another's go
    #: on (two single-thread workers over the benchmark file at 20 ms: 921-1,119 MB
    #: moved instead of 822, and no faster)
    predict_on_workers = False

    def _read_in_one(self, f: np.ndarray) -> None:
        if self.is_local or len(f) < 2 or self.predicted_reads < 1:
            return  # local files: the OS reads ahead
        if not self.predict_on_workers and _on_distributed_worker():
            return
        if self._predictor is None:
            self._predictor = StridePredictor(self.predicted_reads)
        for g in self._predictor.after(f, self.num_frames):
            span = self._span_of(g, through=self._source.size)  # (expect bounds it)
            if span is not None:
                self._source.expect(*span)

    #: bytes of a part of a long read of a fetched (not mapped) file: see ``_streamed``
    stream_part_bytes = 24 * 2**20

    def _streamed(self, f: np.ndarray) -> list[slice]:
        if len(f) < 2 or (self.is_local and self._source.maps_safely()):
            return [slice(0, len(f))]  # the kernels read the map in place
        idx = self.index
        ends = np.cumsum(idx.data_stop[f] - idx.ifd_offset[f])
        if (np.all(f[1:] > f[:-1]) and self._span_of(f) is None
                and self._source.reads_gaps(self._widest_gap(f))):
            # frames apart whose gaps are read through: parts of that many bytes of the
            # file, not of the frames (a part holds its gaps as well)
            ends = idx.data_stop[f] - idx.ifd_offset[f[0]]
        cuts = np.searchsorted(ends, np.arange(1, int(ends[-1]) // self.stream_part_bytes + 1)
                               * self.stream_part_bytes, side="right")
        edges = np.unique(np.concatenate([[0], cuts, [len(f)]]).clip(0, len(f)))
        return [slice(a, b) for a, b in itertools.pairwise(edges.tolist())]

    def keep_parts_ahead(self, n: int) -> None:
        """Have at least ``n`` parts of a long read on their way, held by the source.

        For a reader that fetches its next parts itself (:meth:`prefetch`) in bursts
        longer than the usual :data:`~.source.PARTS_AHEAD`: the converter fetches a
        whole batch while it writes the one before. The source holds that many
        parts (and the one decoding) instead of dropping the oldest. Set it before
        a read starts (it is fixed while parts are held).
        """
        self._source.least_parts_ahead = int(n)

    def _parts_ahead(self) -> int:
        # more on a far link (FsspecSource.parts_ahead), never fewer than asked for
        return max(self.read_ahead_parts, self._source.parts_ahead())

    def _read_ahead(self, f: np.ndarray) -> None:
        # a part's span: its frames' bytes, or about that many of the file where its
        # gaps are read through (see _streamed)
        self._will_need(np.asarray(f, dtype=np.int64), through=2 * self.stream_part_bytes)

    @contextlib.contextmanager
    def _reading(self, args: tuple) -> Iterator[tuple]:
        # a leased local file cannot shrink under the kernel; an unleased map is not
        # read in place (a truncation would kill the process): its frames are copied
        with self._source.holding() as mapped:
            if mapped or not self.is_local or args[0] is not self._source.buffer():
                yield args
                return
            _, enc, strip, nbytes, h, w, sy, sx = args
            buf, off = self._copy_frames(enc, strip, nbytes, h, w)
            self._source.check_unchanged()  # not rewritten while it was copied
            yield buf, enc, off, nbytes, h, w, sy, sx

    def _read_done(self) -> None:
        self._source.release()

    def _stream_done(self) -> None:
        self._source.drop_ahead()

    def _gather(self, f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Buffer and strip offsets (in that buffer) for frames ``f``."""
        if self._source.closed:
            raise ValueError(f"{self.name}: the file is closed")
        idx = self.index
        buf = self._source.buffer()
        if buf is not None:  # read in place (or copied in _reading if it cannot be held)
            self.prefetch(f)
            return buf, idx.strip_offset[f]
        return self._copy_frames(idx.encoding[f], idx.strip_offset[f], idx.strip_bytes[f],
                                 idx.height[f], idx.width[f])

    def _copy_frames(self, enc: np.ndarray, strip: np.ndarray, nbytes: np.ndarray,
                     h: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Read the bytes the kernels decode for frames (count image + strip) into memory.

        Returns the buffer and each strip's offset in it.
        """
        image = 2 * h * w
        start = strip - np.where(enc == ENC_COMPRESSED, image, 0)
        stop = strip + np.where(enc == ENC_TIFF, image, nbytes)
        gathered, base = self._source.read_ranges(start, stop)
        return gathered, base + (strip - start)

    def _frame_args(self, f: np.ndarray, shifts: Shifts = None, photons: bool = False
                    ) -> tuple[tuple, tuple[int, int], int]:
        """Arguments common to all kernels (buffer + 7 per-frame arrays)."""
        shape = self._shape_of(f)
        if photons:
            tiff = f[self.index.encoding[f] == ENC_TIFF]
            if tiff.size:
                raise SiffFormatError(self.name, "frame is a plain TIFF page without photon "
                                      "arrival times", frame=int(tiff[0]))
        sy, sx = self._shifts(shifts, f, shape)
        buf, off = self._gather(f)
        idx = self.index
        args = (buf, idx.encoding[f].astype(np.int64), off, idx.strip_bytes[f],
                idx.height[f], idx.width[f], sy, sx)
        maxn = int(idx.n_photons[f].max()) if f.size else 0
        return args, shape, max(maxn, 1)

    # ------------------------------------------------------------------ reduction hooks

    def _frame_planes(self, f: np.ndarray, n_planes: int) -> np.ndarray:
        ip = self.im_params
        if n_planes != ip.num_slices:
            raise ValueError(f"3-D masks have {n_planes} planes but the file has "
                             f"{ip.num_slices} slices")
        pos = ip.locate(f)
        if pos["flyback"].any():
            bad = int(f[np.flatnonzero(pos["flyback"])[0]])
            raise ValueError(f"frame {bad} is a flyback frame: it has no z plane for a "
                             "3-D mask")
        return pos["slice"].astype(np.int64)

    def _default_n_bins(self) -> int | None:
        return self.im_params.num_bins

    def _picoseconds_per_bin(self) -> float | None:
        return self.im_params.picoseconds_per_bin

    def _n_photons(self, f: np.ndarray) -> np.ndarray:
        return self.index.n_photons[f]

    def _signed(self, f: np.ndarray) -> bool:
        return bool((self.index.encoding[f] == ENC_TIFF).all() and self.index.signed[f].all())

    def _failure(self, frame: int, code: int) -> tuple[str, int | None]:
        what, _ = super()._failure(frame, code)
        if code == K.ST_MISMATCH:
            what += f" ({int(self.index.strip_bytes[frame])} bytes)"
        elif code == K.ST_OUT_OF_BOUNDS:
            what = "frame data lies outside the file"
        return what, int(self.index.strip_offset[frame])

    # ------------------------------------------------------------------ metadata per frame

    def _descriptions(self, f: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        idx = self.index
        off, ln = idx.desc_offset[f], idx.desc_length[f]
        fd = self._source.fileno() if os.name == "posix" else None
        if fd is not None:  # one pread per description: no page faults, nothing mapped
            buf, base, failed = pread_ranges(fd, off, ln)
            if failed >= 0:
                raise SiffFormatError(self.name, "frame description lies outside the file",
                                      int(off[failed]), int(f[failed]))
            return buf, base, ln
        buf = self._source.buffer()
        if buf is not None:
            return buf, off, ln
        gathered, base = self._source.read_ranges(off, off + ln)
        return gathered, base, ln

    def _parse_timestamps(self, f: np.ndarray) -> FrameTimestamps:
        if not self.is_local or len(f) <= _DESC_CHUNK:
            buf, off, ln = self._descriptions(f)
            return parse_timestamps(buf, off, ln, f, self.name)
        # one description per frame maps ~64 KiB of the file each (fault-around): parse
        # in chunks and drop the pages in between so the RSS does not grow with the file
        parts = []
        for a in range(0, len(f), _DESC_CHUNK):
            sub = f[a : a + _DESC_CHUNK]
            buf, off, ln = self._descriptions(sub)
            parts.append(parse_timestamps(buf, off, ln, sub, self.name))
            self._source.release()
        return FrameTimestamps(f, np.concatenate([p.experiment_s for p in parts]),
                               np.concatenate([p.epoch_laser_ns for p in parts]),
                               np.concatenate([p.epoch_system_ns for p in parts]),
                               [e for p in parts for e in p.events])

    def timestamps(self, frames: FrameSelection = None) -> FrameTimestamps:
        """Experiment time (s), laser and system epochs (int64 ns) and events of frames."""
        f = self._frames(frames)
        ts = self._all_timestamps
        if ts is None:
            return self._parse_timestamps(f)
        rank = np.full(self.num_frames, -1, dtype=np.int64)
        rank[f[::-1]] = np.arange(len(f))[::-1]  # first position of each frame in f
        events = sorted((e for e in ts.events if rank[e.frame] >= 0),
                        key=lambda e: rank[e.frame])
        return FrameTimestamps(f, ts.experiment_s[f], ts.epoch_laser_ns[f],
                               ts.epoch_system_ns[f], events)

    def events(self) -> list:
        """All appended-text events in the file (frame, text, experiment time)."""
        return self.timestamps().events

    def description_bytes(self, frames: FrameSelection = None
                          ) -> tuple[np.ndarray, np.ndarray]:
        """Raw description bytes of ``frames`` (default all), concatenated, and their lengths.

        Read in chunks of frames, releasing mapped pages in between (see
        :meth:`release`), so the RSS does not grow with the file. Lengths are int64.
        """
        f = self._frames(frames)
        parts, lens = [], []
        for a in range(0, len(f), _DESC_CHUNK):
            buf, off, ln = self._descriptions(f[a : a + _DESC_CHUNK])
            ln = np.asarray(ln, dtype=np.int64)
            first = np.concatenate([[0], np.cumsum(ln)[:-1]]).astype(np.int64)
            idx = np.arange(int(ln.sum()), dtype=np.int64) + np.repeat(
                np.asarray(off) - first, ln)
            parts.append(np.asarray(buf)[idx].copy())
            lens.append(ln)
            self.release()
        if not parts:
            return np.zeros(0, np.uint8), np.zeros(0, np.int64)
        return np.concatenate(parts), np.concatenate(lens)

    def frame_descriptions(self, frames: FrameSelection = None) -> list[str]:
        """Raw description text of each frame (UTF-8, undecodable bytes replaced)."""
        f = self._frames(frames)
        buf, off, ln = self._descriptions(f)
        return [bytes(buf[o : o + n]).decode("utf-8", errors="replace").rstrip("\x00")
                for o, n in zip(off.tolist(), ln.tolist(), strict=True)]

    def frame_metadata(self, frames: FrameSelection = None) -> list[dict[str, object]]:
        """Return the parsed description of each frame (known numeric values converted)."""
        return [parse_description(t) for t in self.frame_descriptions(frames)]

    @property
    def is_local(self) -> bool:
        """True when the file is memory-mapped from local disk."""
        return isinstance(self._source, LocalSource)


def _cache_dir(index_cache: bool | str | os.PathLike[str] | None) -> Path:
    """Return the index cache directory an ``index_cache`` argument means (not False)."""
    return default_cache_dir() if index_cache in (None, True) else Path(index_cache)


def _on_distributed_worker() -> bool:
    """Whether this thread runs a dask.distributed task (never imports distributed)."""
    distributed = sys.modules.get("distributed")
    if distributed is None:
        return False
    try:
        distributed.get_worker()
    except ValueError:
        return False
    return True


def _reopen(path: Any, options: FileOptions) -> SiffFile:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SiffWarning)
        return SiffFile.from_options(path, options)
