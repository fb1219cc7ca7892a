"""Byte sources: where the reader gets its bytes from.

Three implementations share one small interface:

* :class:`LocalSource` memory-maps a local file read-only. Its :meth:`buffer`
  is the whole file as a ``uint8`` array, so Numba kernels decode frames in
  place with absolute offsets and no copies.
* :class:`FileObjectSource` wraps any seekable binary file object (an open
  file, ``io.BytesIO``, ...). It has no whole-file buffer; the reader asks it
  for the byte ranges of the frames it needs (:meth:`read_ranges`) and runs the
  same kernels on the gathered bytes.
* :class:`FsspecSource` reads fsspec URLs (``s3://``, ``https://``,
  ``memory://`` ...) with stateless range requests (``cat_file`` /
  ``cat_ranges``, concurrent on async filesystems; the large ranges of
  http(s) and S3 objects received by :mod:`.http_ranges` straight into their
  buffers), the IFD walk streamed through large windows received in place
  (IFD by IFD where frames lie far apart, so that opening does not fetch
  their photons), and an LRU cache of the data blocks read recently.

None ever writes to the file.
"""

from __future__ import annotations

import contextlib
import email.utils
import errno
import itertools
import json
import mmap
import os
import signal
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import CancelledError
from typing import IO, Any

import numpy as np

from .._paths import is_remote, local_path
from .._remote import (
    UNPIN_HINT,
    filesystem,
    pin_kind,
    pinned_http_options,
    pinning_filesystem,
    reading_version,
    remote_error,
    replaced_error,
    tuned,
    with_timeouts,
)
from ..errors import RemoteAccessError, SiffFormatError
from .http_ranges import (
    MAX_CONNECTIONS,
    MAX_REDIRECTS,
    S3_STEP_ASIDE,
    DirectRanges,
    HTTPStatusError,
    Probe,
    Redirected,
    S3Settings,
    StepAside,
    direct_ranges,
    s3_settings,
)

try:
    import fcntl

    _LEASES = hasattr(fcntl, "F_SETLEASE") and hasattr(signal, "SIGURG")
except ImportError:  # pragma: no cover - Windows
    _LEASES = False
#: whether another process can truncate a file this one has mapped (Windows refuses)
_SHRINKS_UNDER_MAP = os.name != "nt"

__all__ = ["ByteSource", "FileObjectSource", "FsspecSource", "LocalSource", "forget_probes",
           "not_a_file", "open_source", "probe_ends", "probe_following", "sibling_url"]


#: parts of a long read (or sub-batches of a conversion) fetched while one decodes:
#: with several on their way, a round trip's latency hides behind the transfer of
#: the parts before. ``PhotonReductions.read_ahead_parts``, the converter's
#: sub-batches ahead and :attr:`FsspecSource.ahead_spans` (one more: the part
#: decoding) follow it. Four 24 MiB parts rather than three of 32 (the same bytes
#: on their way): eager plane traces of the benchmark file at 50 ms 1.05-1.24 s
#: against 1.28-1.52 s, at 0 ms 0.85-0.89 s against 0.93-0.99 s (medians of 7
#: calls, 3 processes each; docs/performance.md)
PARTS_AHEAD = 4


class ByteSource:
    """Interface of a read-only byte source (see module docstring)."""

    name: str
    size: int
    _closed = False

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    def read(self, offset: int, length: int) -> bytes:
        """Return up to ``length`` bytes at ``offset`` (fewer only at end of file)."""
        raise NotImplementedError

    def buffer(self) -> np.ndarray | None:
        """Return the whole file as a ``uint8`` array, or ``None`` if not mapped."""
        return None

    #: Ranges closer than this are fetched with one read (frames sit back to back on disk).
    coalesce_gap = 64 * 2**10
    #: Bytes read at a time while walking the IFD chain (without a whole-file buffer).
    ifd_window = 64 * 2**10
    #: Streaming walk (0: off): the chain is read through consecutive windows of this
    #: many bytes, up to :attr:`walk_inflight` of them requested at once, so a cold
    #: open costs about ``file size / bandwidth``, not one round trip per frame.
    walk_window = 4 * 2**20
    walk_inflight = 1
    #: batches of up to :attr:`walk_inflight` windows requested while one is walked
    walk_depth = 2
    #: frames more than this many bytes apart are walked IFD by IFD even when streaming
    walk_stride_limit = 2 * 2**20
    #: byte ranges kept from the walk's windows (frame descriptions): ``(starts, stops,
    #: base, buf)``, sorted by start; read_ranges serves ranges inside them from memory
    _kept: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None
    _kept_parts: list[tuple[np.ndarray, np.ndarray, bytes]] | None = None

    def fingerprint(self) -> str:
        """Cheap identity of this version of the file (modification time, ETag...), or ''."""
        return ""

    def fileno(self) -> int | None:
        """Return the OS file descriptor of a local file (for ``pread``), or ``None``."""
        return None

    def release(self) -> None:
        """Drop this process's hold on pages read so far, and bytes kept from the walk."""
        self.forget_kept()

    def will_need(self, start: int, stop: int) -> None:
        """Hint that bytes ``start:stop`` are read soon (a memory map reads them ahead)."""

    def drop_ahead(self) -> None:
        """Forget bytes fetched ahead (:meth:`will_need`) and buffers kept for them."""

    def expect(self, start: int, stop: int) -> None:
        """Hint that bytes ``start:stop`` are predicted to be read (default: nothing).

        Unlike :meth:`will_need`, nobody asked for them yet: a remote file fetches
        them in the background and holds them until they are read or newer
        predictions push them out (see :class:`.readahead.StridePredictor`).
        """

    def holding(self) -> contextlib.AbstractContextManager[bool]:
        """Hold the file against truncation while its :meth:`buffer` is read.

        The context yields whether :meth:`buffer` may be read in place until it
        ends; if not, read copies (:meth:`read_ranges`) instead. The default holds
        nothing and yields True: a source without a memory map has nothing that
        can vanish under a read.
        """
        return contextlib.nullcontext(True)

    _tail: bytes | None = None

    def keep_for_reopen(self, starts: list[int], stops: list[int]) -> None:
        """Let reopens of this file in this process take these ranges' bytes.

        Only a remote file keeps anything (:meth:`FsspecSource.keep_for_reopen`): a
        local file or a file object is opened without a request to spare.
        """

    def read_sibling(self, suffix: str) -> bytes | None:
        """Return the file ``name + suffix`` next to this one, or ``None`` if absent."""
        return None

    def sibling_name(self, suffix: str) -> str | None:
        """Return where ``name + suffix`` is (None: a file object has no such place)."""
        return None

    def write_sibling(self, suffix: str, data: bytes) -> str:
        """Write ``name + suffix`` next to this file (atomically where possible).

        Raises OSError (or the filesystem's error) when that is not possible.
        """
        raise OSError(f"{self.name}: a file object has no place for a sidecar")

    #: bytes at the end of the file that, with its header, identify its content (the
    #: index cache's key reads them on every open)
    tail_bytes = 4096

    def tail(self, length: int | None = None) -> bytes:
        """Return the file's last ``length`` bytes (read once per source, then kept).

        ``length`` defaults to :attr:`tail_bytes`.
        """
        length = self.tail_bytes if length is None else length
        if self._tail is None or len(self._tail) < min(length, self.size):
            self._tail = self.read(max(0, self.size - length), length)
        return self._tail[len(self._tail) - min(length, self.size):]

    def fetch_windows(self, starts: list[int], stops: list[int]) -> list[bytes]:
        """Read consecutive windows of the walk (concurrently where the source can)."""
        return self._read_blocks(starts, stops)

    def fetch_consecutive(self, start: int, stop: int) -> np.ndarray:
        """Return bytes ``start:stop`` for the walk (fewer only at the end of the file).

        Read in :attr:`walk_window` windows with :meth:`fetch_windows`.
        """
        edges = [*range(start, stop, self.walk_window), stop]
        data = b"".join(self.fetch_windows(edges[:-1], edges[1:]))
        return np.frombuffer(data, dtype=np.uint8)

    def keep(self, starts: np.ndarray, stops: np.ndarray, buf: np.ndarray,
             buf_start: int) -> None:
        """Keep bytes ``starts[i]:stops[i]`` of ``buf`` (file bytes from ``buf_start``).

        The walk keeps the frame descriptions it passes over, so that reading the
        timestamps afterwards needs no request per frame.
        """
        keep = np.asarray(stops) > np.asarray(starts)
        starts, stops = np.asarray(starts)[keep], np.asarray(stops)[keep]
        if len(starts) == 0:
            return
        starts, stops = starts.astype(np.int64), stops.astype(np.int64)
        lengths = stops - starts
        out = np.empty(int(lengths.sum()), dtype=np.uint8)
        _copy_ranges(buf, starts - buf_start, out, np.cumsum(lengths) - lengths, lengths)
        data = out.tobytes()
        if self._kept_parts is None:
            self._kept_parts = []
        self._kept_parts.append((starts, stops, data))
        self._kept = None

    def forget_kept(self) -> None:
        """Drop the bytes kept from the walk."""
        self._kept_parts = None
        self._kept = None

    def _kept_table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
        if self._kept is None and self._kept_parts:
            starts = np.concatenate([p[0] for p in self._kept_parts])
            stops = np.concatenate([p[1] for p in self._kept_parts])
            buf = np.frombuffer(b"".join(p[2] for p in self._kept_parts), dtype=np.uint8)
            base = np.zeros(starts.size, dtype=np.int64)
            np.cumsum((stops - starts)[:-1], out=base[1:])
            order = np.lexsort((stops, starts))  # equal starts: the longest last
            self._kept = (starts[order], stops[order], base[order], buf)
        return self._kept

    def read_ranges(self, starts: np.ndarray, stops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Gather byte ranges into one buffer, with one read per run of nearby ranges.

        Returns ``(buf, base)`` where ``buf[base[i]:base[i] + stops[i] - starts[i]]``
        holds bytes ``starts[i]:stops[i]`` of the file. Ranges inside bytes kept
        from the walk (:meth:`keep`) are served from memory.
        """
        starts = np.asarray(starts, dtype=np.int64)
        stops = np.asarray(stops, dtype=np.int64)
        kept = self._kept_table()
        if kept is None or starts.size == 0:
            return self._read_ranges(starts, stops)
        k_start, k_stop, k_base, k_buf = kept
        j = np.searchsorted(k_start, starts, side="right") - 1
        jj = np.maximum(j, 0)
        hit = (j >= 0) & (starts >= k_start[jj]) & (stops <= k_stop[jj])
        if not hit.any():
            return self._read_ranges(starts, stops)
        lengths = np.maximum(stops - starts, 0)
        base = np.zeros(starts.size, dtype=np.int64)
        np.cumsum(lengths[:-1], out=base[1:])
        out = np.empty(int(lengths.sum()), dtype=np.uint8)
        src = k_base[jj] + (starts - k_start[jj])  # where each hit starts in k_buf
        _copy_ranges(k_buf, src[hit], out, base[hit], lengths[hit])
        miss = np.flatnonzero(~hit)
        if miss.size:
            got, gbase = self._read_ranges(starts[miss], stops[miss])
            for i, g in zip(miss.tolist(), gbase.tolist(), strict=True):
                out[base[i] : base[i] + lengths[i]] = got[g : g + lengths[i]]
        return out, base

    def _read_blocks(self, starts: list[int], stops: list[int]) -> list[bytes]:
        """Read several byte ranges (one read each by default)."""
        return [self.read(a, b - a) for a, b in zip(starts, stops, strict=True)]

    def _block(self, chunk: Any, start: int, stop: int) -> np.ndarray:
        """Return the bytes read for block ``start:stop`` as an array over them.

        Raises SiffFormatError where fewer came: the file ends inside the block.
        """
        if len(chunk) != stop - start:
            raise SiffFormatError(self.name, f"file ends inside a {stop - start}-byte data "
                                  "block", start)
        return np.frombuffer(chunk, dtype=np.uint8)

    def _gap_for(self, starts: np.ndarray, stops: np.ndarray) -> int:
        """Gaps up to this many bytes between ranges (in file order) are read through."""
        return self.coalesce_gap

    #: parts a long read keeps on their way at least, where a reader asks for more
    #: than :data:`PARTS_AHEAD` (:meth:`SiffFile.keep_parts_ahead`)
    least_parts_ahead = 0

    def parts_ahead(self) -> int:
        """Parts of a long read to have on their way while one decodes (:data:`PARTS_AHEAD`)."""
        return max(PARTS_AHEAD, self.least_parts_ahead)

    def reads_gaps(self, widest_gap: int) -> bool:
        """Whether gaps of up to ``widest_gap`` bytes between ranges are best read through.

        True for a remote file where such a gap costs less than a request (see
        :meth:`FsspecSource._gap_for`); False here.
        """
        return False

    def through_budget(self, asked: int) -> int:
        """Return the bytes a read of ``asked`` bytes may add by reading gaps through."""
        return 0

    def _read_ranges(self, starts: np.ndarray, stops: np.ndarray, gap: int | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`read_ranges` from the file itself (gaps up to ``gap`` read through)."""
        if len(starts) == 0:
            return np.empty(0, dtype=np.uint8), np.zeros(0, dtype=np.int64)
        empty = stops <= starts
        if empty.any():  # they need no bytes: never read the stretch between them
            buf, some = self._read_ranges(starts[~empty], stops[~empty], gap)
            base = np.zeros(len(starts), dtype=np.int64)
            base[~empty] = some
            return buf, base
        # merge ranges (in file order) whose gaps are small into read blocks
        order = np.argsort(starts, kind="stable")
        s_sorted, e_sorted = starts[order], np.maximum.accumulate(stops[order])
        if gap is None:
            gap = self._gap_for(s_sorted, e_sorted)
        new_block = np.ones(len(order), dtype=bool)
        new_block[1:] = s_sorted[1:] > e_sorted[:-1] + gap
        block_of = np.cumsum(new_block) - 1
        first = np.flatnonzero(new_block)
        block_start = s_sorted[first]
        block_stop = np.maximum.reduceat(e_sorted, first)
        block_base = np.zeros(len(first), dtype=np.int64)
        block_base[1:] = np.cumsum(block_stop - block_start)[:-1]
        chunks = self._read_blocks(block_start.tolist(), block_stop.tolist())
        if (len(chunks) == 1 and isinstance(chunks[0], memoryview)
                and not chunks[0].readonly):
            # one block received into new memory (gaps read through): no copy of it
            buf = self._block(chunks[0], int(block_start[0]), int(block_stop[0]))
        else:
            buf = np.empty(int((block_stop - block_start).sum()), dtype=np.uint8)
            for b0, b1, at, chunk in zip(block_start.tolist(), block_stop.tolist(),
                                         block_base.tolist(), chunks, strict=True):
                buf[at : at + b1 - b0] = self._block(chunk, b0, b1)
        base = np.empty(len(starts), dtype=np.int64)
        base[order] = block_base[block_of] + (s_sorted - block_start[block_of])
        return buf, base

    def close(self) -> None:
        """Release the underlying file."""
        self._closed = True

    def __enter__(self) -> ByteSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LocalSource(ByteSource):
    """A local file, memory-mapped read-only."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.name = os.fspath(path)
        self._lease_lock = threading.Lock()
        self._lease_users = 0
        self._leased = False
        self._lease_works: bool | None = None  # unknown until the first read
        self._lease_patient = True
        try:
            self._file = open(self.name, "rb")  # noqa: SIM115 - closed in close()
        except IsADirectoryError:
            try:  # (what it holds only makes the message more helpful)
                names = os.listdir(self.name)
            except OSError:
                names = []
            raise not_a_file(self.name, bool({"zarr.json", ".siff-progress"} & set(names)),
                             any(n.endswith(".siff") for n in names)) from None
        try:
            st = os.fstat(self._file.fileno())
            self.size = st.st_size
            self._mtime_ns = st.st_mtime_ns
            if self.size:
                self._mmap: mmap.mmap | None = mmap.mmap(
                    self._file.fileno(), 0, access=mmap.ACCESS_READ
                )
                self._array = np.frombuffer(self._mmap, dtype=np.uint8)
            else:
                self._mmap = None
                self._array = np.empty(0, dtype=np.uint8)
        except BaseException:
            self._file.close()
            raise

    def read(self, offset: int, length: int) -> bytes:
        """Return up to ``length`` bytes at ``offset`` (fewer only at end of file).

        Bytes come from the memory map while a lease holds the file; otherwise
        through ``pread``, which returns short (never SIGBUS) on a file that shrank.
        A short read of bytes that were there at open raises SiffFormatError.
        """
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        with self.holding() as mapped:
            if mapped:
                return self._array[offset : offset + length].tobytes()
            want = max(0, min(length, self.size - offset))
            parts, got = [], 0
            while got < want:
                part = os.pread(self._file.fileno(), want - got, offset + got)
                if not part:
                    self.check_unchanged()  # names the truncation
                    raise SiffFormatError(self.name, f"the file ends at byte {offset + got}, "
                                          f"before {offset + want}", offset + got)
                parts.append(part)
                got += len(part)
            return b"".join(parts)

    #: how long a read waits for another process's pending truncation or open for
    #: writing to go through before it reads without a lease (seconds)
    lease_wait = 0.5

    @contextlib.contextmanager
    def holding(self) -> Iterator[bool]:
        """Hold the file against truncation while the memory map is read (Linux).

        A file that shrinks under a memory map kills the reading process (SIGBUS) as
        soon as a page past the new end is touched, whatever the code does. So while
        any thread reads the map, this source holds a read lease on the file
        (``F_SETLEASE``): another process's ``truncate`` or open for writing then
        waits until the read is done (at most the kernel's ``lease-break-time``,
        45 s by default), and the next read sees the change
        (:meth:`check_unchanged`) and raises SiffFormatError. The lease break is
        signalled with SIGURG, which is ignored by default (SIGIO would end the
        process). Where leases are not available (other systems, files of another
        user without CAP_LEASE, some network filesystems, a file open for writing,
        as during an acquisition), the context yields False and readers copy the
        bytes with ``pread`` instead of reading the map (:meth:`read`,
        ``SiffFile``'s kernels): a truncation then gives a short read, which is an
        error, never a SIGBUS. On Windows a mapped file cannot be truncated, so
        the map is always safe there.
        """
        with self._lease_lock:
            if self._lease_users == 0:
                self._take_lease()
            self._lease_users += 1
        try:
            self.check_unchanged()
            yield self._leased or not _SHRINKS_UNDER_MAP
        finally:
            with self._lease_lock:
                self._lease_users -= 1
                if self._lease_users == 0 and self._leased:
                    self._leased = False
                    with contextlib.suppress(OSError, ValueError):
                        fcntl.fcntl(self._file.fileno(), fcntl.F_SETLEASE, fcntl.F_UNLCK)

    def maps_safely(self) -> bool:
        """Tell whether reads of the memory map are guarded now (a lease can be taken)."""
        if not _SHRINKS_UNDER_MAP:
            return True
        if not _LEASES or self._lease_works is False:
            return False
        with self.holding() as mapped:  # a writer may hold the file now: ask (~12 us)
            return mapped

    def _take_lease(self) -> None:
        if not _LEASES or self._lease_works is False or self._closed:
            return
        fd = self._file.fileno()
        # a file held open for writing (an acquisition still running) makes every
        # attempt fail: after one wait in vain, later reads try once and go on
        deadline = time.monotonic() + (self.lease_wait if self._lease_patient else 0.0)
        while True:
            try:
                # break notices come as SIGURG; set each time (giving a lease up resets it)
                fcntl.fcntl(fd, fcntl.F_SETSIG, signal.SIGURG)
                fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
            except OSError as exc:
                # EAGAIN: the file is open for writing, or a truncation waits for a lease
                # given up just now; let it through, then read (the check sees it)
                if exc.errno in (errno.EAGAIN, errno.EBUSY) and time.monotonic() < deadline:
                    time.sleep(0.005)
                    continue
                if exc.errno in (errno.EAGAIN, errno.EBUSY):
                    self._lease_patient = False
                else:
                    self._lease_works = False  # EINVAL, EACCES...: not here
                return
            self._lease_works = self._lease_patient = self._leased = True
            return

    def check_unchanged(self) -> None:
        """Raise SiffFormatError if the file shrank or was rewritten since it was opened.

        Reading a memory map past the end of a file that shrank kills the process
        (SIGBUS), so every access to the map checks first (one ``fstat``). A file
        that only grew (an acquisition still being written) is fine: the frames
        indexed at open are unchanged. During a read, :meth:`holding` keeps the file
        from shrinking where file leases work.
        """
        if self._closed:
            raise ValueError(f"{self.name}: the file is closed")
        st = os.fstat(self._file.fileno())
        if st.st_size < self.size:
            raise SiffFormatError(self.name, f"the file shrank from {self.size} to "
                                  f"{st.st_size} bytes since it was opened (truncated or "
                                  "rewritten while open); open it again")
        if st.st_size == self.size and st.st_mtime_ns != self._mtime_ns:
            raise SiffFormatError(self.name, "the file was modified in place since it was "
                                  "opened; open it again")

    def release(self) -> None:
        """Unmap the pages touched so far from this process (``MADV_DONTNEED``).

        Touching even one byte per frame maps ~64 KiB around it (the kernel's
        fault-around), so walking the IFDs of a 2 GB file puts most of it in the
        process's RSS although nothing was copied. Releasing keeps the RSS honest;
        the pages stay in the page cache, so reading them again costs a page fault,
        not a disk read.
        """
        if self._mmap is not None and hasattr(mmap, "MADV_DONTNEED"):
            with contextlib.suppress(OSError, ValueError):
                self._mmap.madvise(mmap.MADV_DONTNEED)

    def will_need(self, start: int, stop: int) -> None:
        """Start reading ``start:stop`` into the page cache (``MADV_WILLNEED``), if mapped.

        Decoding from the map of a file that is not in the page cache otherwise
        reads it page fault by page fault (64 KiB at a time), several times slower
        than the disk streams it.
        """
        if self._mmap is None or not hasattr(mmap, "MADV_WILLNEED"):
            return
        start = max(0, min(int(start), self.size)) // mmap.PAGESIZE * mmap.PAGESIZE
        stop = max(start, min(int(stop), self.size))
        if stop > start:
            with contextlib.suppress(OSError, ValueError):
                self._mmap.madvise(mmap.MADV_WILLNEED, start, stop - start)

    def fileno(self) -> int | None:
        """Return the open file's descriptor."""
        if self._closed:
            raise ValueError(f"{self.name}: the file is closed")
        return self._file.fileno()

    def read_sibling(self, suffix: str) -> bytes | None:
        """Return the local file ``name + suffix``, or ``None``."""
        try:
            with open(self.name + suffix, "rb") as fh:
                return fh.read()
        except OSError:
            return None

    def sibling_name(self, suffix: str) -> str:
        """Return the path ``name + suffix``."""
        return self.name + suffix

    def write_sibling(self, suffix: str, data: bytes) -> str:
        """Write ``name + suffix`` atomically (temporary file, then rename)."""
        import tempfile

        target = self.sibling_name(suffix)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target) or ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return target

    def fingerprint(self) -> str:
        """Device, inode, modification and change time: any in-place rewrite changes it.

        The change time (``st_ctime``) cannot be set back by ``os.utime`` or
        ``touch -d``: an edit that keeps the size and restores the modification time
        still changes it.
        """
        st = os.fstat(self._file.fileno())
        return f"{st.st_dev}:{st.st_ino}:{st.st_mtime_ns}:{st.st_ctime_ns}"

    def buffer(self) -> np.ndarray:
        """Return the memory map as a read-only ``uint8`` array (after :meth:`check_unchanged`).

        Read it inside :meth:`holding`, which keeps the file from shrinking meanwhile.
        """
        self.check_unchanged()
        return self._array

    def close(self) -> None:
        """Unmap and close (arrays handed out earlier must not be used afterwards)."""
        self._closed = True
        self._array = np.empty(0, dtype=np.uint8)
        if self._mmap is not None:
            # BufferError: a view is still exported (e.g. a caller kept a slice); the
            # map is then released when that view is garbage collected.
            with contextlib.suppress(BufferError):
                self._mmap.close()
            self._mmap = None
        self._file.close()


class FileObjectSource(ByteSource):
    """A seekable binary file object (local, in-memory or remote through fsspec).

    Reads are serialised with a lock because file objects share one position.
    """

    def __init__(self, fileobj: IO[bytes], name: str | None = None, owns: bool = False) -> None:
        if not (hasattr(fileobj, "read") and hasattr(fileobj, "seek")):
            raise TypeError("expected a path, URL or a seekable binary file object")
        self._f = fileobj
        self._owns = owns
        self._lock = threading.Lock()
        self.name = name or str(getattr(fileobj, "path", None) or getattr(fileobj, "name", None)
                                or repr(fileobj))
        with self._lock:
            size = getattr(fileobj, "size", None)
            if not isinstance(size, int):
                pos = fileobj.tell()
                size = fileobj.seek(0, os.SEEK_END)
                fileobj.seek(pos)
        self.size = int(size)

    def read(self, offset: int, length: int) -> bytes:
        """Return up to ``length`` bytes at ``offset``."""
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        if offset >= self.size or length == 0:
            return b""
        with self._lock:
            self._f.seek(offset)
            out = self._f.read(min(length, self.size - offset))
        if isinstance(out, str):
            raise TypeError(f"{self.name}: file object is in text mode; open it with 'rb'")
        return bytes(out)

    def close(self) -> None:
        """Close the file object if this source opened it."""
        self._closed = True
        if self._owns:
            self._f.close()


#: the keys of fsspec's ``info`` that tell versions of an object apart
_VERSION_KEYS = ("ETag", "etag", "LastModified", "mtime", "created")


class FsspecSource(ByteSource):
    """A file reached through fsspec, read with stateless byte-range requests.

    No shared file position, hence no lock: ``cat_file``/``cat_ranges`` may run
    from many threads. Recently read data blocks are kept in an LRU cache of
    ``cache_bytes`` (reads of the same frames for several variables hit it).
    Large ranges of http(s) URLs and S3 objects are received with
    :mod:`.http_ranges` where the storage options allow (:attr:`direct_http`).
    """

    ifd_window = 2 * 2**10  # an IFD is a few hundred bytes: do not fetch photons
    #: the walk streams the file: 8 MiB windows, batches of up to 8, three batches on
    #: their way (192 MiB) while one is walked. Cold opens of the benchmark file over
    #: the loopback server, one process, alternated (medians of 5): 0.53 / 0.80 s at
    #: 20 / 50 ms against 0.78 / 1.26 s with 4 MiB windows and two batches, 0.62 s
    #: (20 ms) with 8 MiB and two; at 0 ms within noise (docs/performance.md)
    walk_window = 8 * 2**20
    walk_inflight = 8
    walk_depth = 3
    #: ranges less than this apart are read with one request. A request costs far
    #: more than moving 256 KiB (on the loopback server, plane traces of one channel
    #: of the benchmark file with Dask: 4,203 requests and 6.5 s with a 4 KiB gap,
    #: 37 requests and 1.0 s with this one, both channels' bytes read)
    coalesce_gap = 256 * 2**10
    #: bytes a read may move beyond those it asked for by reading gaps through
    #: (:meth:`_gap_for`); they are held in memory until the read is decoded
    coalesce_budget = 256 * 2**20
    #: ... and at most this many times the bytes it asked for
    coalesce_ratio = 8
    #: read the large ranges of plain http(s) URLs and S3 objects with
    #: :mod:`.http_ranges` (False: always through fsspec, as benchmarks compare)
    direct_http = True
    #: seconds a presigned S3 URL is valid; it is renewed after half of that
    signed_for_s = 3600

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None,
                 cache_bytes: int = 64 * 2**20, version: str | None = None,
                 with_head: tuple[list[int], list[int]] | None = None,
                 pin: bool = True) -> None:

        self.name = url
        #: whether reads require the version the open saw (False: the server's ETags
        #: are not used at all, as for a server that sends none; see ``pin_version``)
        self.pinned = pin
        if not pin:
            version = None
        if with_head is not None:
            self._with_head = self._hinted(*with_head)
        probe = None
        try:
            self._fs, self._path = filesystem(url, storage_options)
            #: siblings (sidecars) are other objects: read and written without the pin
            self._fs_any = self._fs
            #: S3 objects are read through URLs s3fs presigns (None: through s3fs)
            self._s3 = s3_settings(url, storage_options) if self.direct_http else None
            self._signed_until = 0.0  # when the presigned S3 URL is to be renewed
            if self._s3 is not None:
                direct = self._presigned()
            else:
                direct = direct_ranges(url, storage_options) if self.direct_http else None
            #: the direct reads as first made (a redirect's target expires: asked again)
            self._origin = direct
            probe, direct = self._probe(direct, version, storage_options)
            info = self._fs.info(self._path) if probe is None else _probed_info(
                probe, s3=self._s3 is not None)
        except Exception as exc:
            err = remote_error(url, exc)  # a timeout may come as a FileNotFoundError
            if err is not None:
                raise err from exc
            if isinstance(exc, FileNotFoundError):  # s3fs's message names no bucket or key
                detail = str(exc) if str(exc) and str(exc) != self._path else "no such file"
                raise FileNotFoundError(f"{url}: {detail}") from exc
            raise
        if info.get("type") == "directory":
            raise not_a_file(url, url.rstrip("/").endswith(".zarr"))
        etag = self._adopt(info)
        if version is not None and etag and etag != version:
            raise SiffFormatError(url, f"the object was replaced since it was first opened "
                                  f"(ETag {version}, now {etag}); open it again{UNPIN_HINT}")
        kind = pin_kind(url, etag)
        #: the ETag the open saw (None: the server sent none, or ``pin=False``). Every
        #: read of the file's bytes requires it where reads can (:attr:`reads_pinned`):
        #: a server refuses a read of another version (412, ``If-Match``); a weak ETag
        #: (never equal under If-Match) is compared with each direct read's answer
        #: instead. Where they cannot (a chained URL, another protocol) it is compared
        #: at each open given it (a Dask worker's), not at each read.
        self.version: str | None = etag
        #: whether every read requires :attr:`version`
        self.reads_pinned = bool(etag and (kind or direct is not None))
        self._pin: str | None = None  # set for S3: the reads' context carries it
        self._repinned = False  # whether a refused first read took a new version
        self._required, self._options = version, storage_options
        if kind == "headers":
            self._fs = self._pinned_http(etag)
        elif kind == "context":
            self._fs, self._pin = pinning_filesystem(url, storage_options), etag
        #: the walk's windows and the spans fetched ahead, received straight into
        #: their buffers where the URL allows (None: through fsspec)
        self._direct: DirectRanges | None = direct
        self._cache: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._cache_bytes = cache_bytes
        self._cached = 0
        self._lock = threading.Lock()  # guards the caches only
        #: spans fetched ahead (:meth:`will_need`): ``(start, stop, future)``, oldest first
        self._ahead: list[tuple[int, int, Any]] = []
        #: predicted spans fetched, and those a read was served from (tests, benchmarks)
        self.expected_fetched = 0
        self.expected_read = 0
        #: memory of spans no longer held, reused for new ones (:meth:`_span_buffer`):
        #: ``(memory, weak reference to the array last made over it)``
        self._spare: list[tuple[np.ndarray, Any]] = []
        #: bytes requested from the filesystem so far (for tests and benchmarks)
        self.bytes_fetched = 0
        if probe is not None:  # the head, the tail and the hinted ranges came with the size
            self._head = probe.head
            if len(probe.tail) == min(self.tail_bytes, self.size):
                self._tail = probe.tail
            for a, data in probe.blocks:
                self._remember((a, a + len(data)), data)
            self._with_head = ()
            if not self._probe_kept:  # a kept probe's bytes were fetched by an earlier open
                self.bytes_fetched += len(probe.head) + len(probe.tail) + sum(
                    len(d) for _, d in probe.blocks)

    def _probe(self, direct: DirectRanges | None, version: str | None,
               storage_options: dict[str, Any] | None = None
               ) -> tuple[Probe | None, DirectRanges | None]:
        """Learn size and ETag with the head, tail and hinted ranges: one round trip.

        None at all where this process already probed the object at ``version``
        (pinned reads only): see :func:`_probed`.

        Through ``direct``: plain http(s) URLs (:func:`.http_ranges.direct_ranges`)
        and S3 objects (a presigned URL). Returns the probe and the direct reads that
        answered it: a plain URL's redirects are followed (a download link to a
        presigned URL), one round trip each, and the reads then go to the target.
        The probe is None without ``direct``, and where the server's answer is left
        to fsspec's ``info`` (whose errors name what is wrong: a missing bucket or
        key, refused credentials). A timeout raises.
        """
        if direct is None:
            return None, None
        self._probe_key = _probe_key(self.name, storage_options) if self.pinned else None
        if version is not None and self._probe_key is not None:
            got = _probed(self._probe_key, version)
            if got is not None:  # the target a link led to, or these reads themselves
                self._probe_kept = True
                return got[0], got[1] if got[1] is not None and self._s3 is None else direct
        starts, stops = [a for a, _ in self._with_head], [b for _, b in self._with_head]
        try:
            probe, answered = probe_following(
                direct, self._s3 is None, self.head_bytes, self.tail_bytes, starts, stops,
                self._if_match(version), versions=self.pinned)
        except TimeoutError:
            raise
        except Exception:  # fsspec asks again and reports
            return None, direct
        if probe is not None and probe.etag and self._probe_key is not None:
            _remember_probe(self._probe_key, probe, None if answered is direct else answered)
        return probe, answered

    def _if_match(self, etag: str | None) -> dict[str, str] | None:
        """Return the ``If-Match`` header requiring ``etag``, where a server can be asked to.

        None for no ETag or a weak one (If-Match compares strongly: it would refuse
        every read); direct reads compare a weak one with each answer instead.
        """
        return {"If-Match": etag} if etag and pin_kind(self.name, etag) else None

    def _network(self, call: Any) -> Any:
        """Run a request; a timeout or unreachable server becomes a RemoteAccessError.

        A read refused because the object was replaced since it was opened (the
        version pin of ``__init__``) becomes a SiffFormatError saying so.
        """
        try:
            with reading_version(self._pin):
                return call()
        except Exception as exc:
            replaced = replaced_error(self.name, exc)
            if (replaced is not None and self.bytes_fetched == 0 and not self._repinned
                    and self._repin()):
                return self._network(call)  # the version came from a stale listing
            err = replaced or remote_error(self.name, exc)
            if err is None:
                raise
            raise err from exc

    def _repin(self) -> bool:
        """Pin reads to the object's current version; return whether it changed.

        Called when the first read of the file was refused: the ETag came from a
        listing fsspec cached before the object was replaced (s3fs keeps listings
        until told otherwise), not from the object. Nothing was read yet, so the
        file is taken as it is now, unless the caller required the old version.
        Only once: a server whose ETags differ from one request to the next would
        otherwise be asked again and again.
        """
        self._repinned = True
        self._fs_any.invalidate_cache(self._path)
        info = self._fs_any.info(self._path)
        etag = info.get("ETag") or info.get("etag")
        if not etag or etag == self.version or self._required not in (None, etag):
            return False
        self._adopt(info)
        self.version = etag
        if self._pin is not None:
            self._pin = etag
        elif self._if_match(etag):
            self._fs = self._pinned_http(etag)
        return True

    def _adopt(self, info: dict[str, Any]) -> str | None:
        """Take size and fingerprint from fsspec's ``info`` of the file; return its ETag.

        Unpinned (``pin=False``), the server's ETag and modification time are
        ignored: the fingerprint is empty and no ETag is returned.
        """
        size = info.get("size")
        self.size = int(size) if size is not None else int(self._fs_any.size(self._path))
        if not self.pinned:
            self._fingerprint = ""
            return None
        self._fingerprint = "|".join(str(info[k]) for k in _VERSION_KEYS if k in info)
        return info.get("ETag") or info.get("etag")

    def _pinned_http(self, etag: str) -> Any:
        """Return an HTTP filesystem of its own whose every request requires ``etag``.

        Its own instance, dropped with this source: fsspec's instance cache would
        keep one filesystem (and its connection pool) per version ever opened.
        """
        import fsspec

        opts = with_timeouts(self.name, pinned_http_options(self._options, etag))
        opts["skip_instance_cache"] = True
        return tuned(fsspec.core.url_to_fs(self.name, **opts)[0])

    #: bytes fetched by the first read near the start of the file and kept: the
    #: header, the first IFD and description come in one request, not three
    head_bytes = 64 * 2**10
    _head: bytes | None = None
    #: the probe's record of this object, and whether the open took it from there
    _probe_key: str | None = None
    _probe_kept = False

    def keep_for_reopen(self, starts: list[int], stops: list[int]) -> None:
        """Let reopens of this version in this process take these ranges' bytes.

        The ranges (an index check's IFDs) join the probe kept for the object,
        where this source read them: a reopen (:func:`_probed`) checks its index
        without a request.
        """
        if self._probe_key is None or self.version is None:
            return
        keys = [(int(a), min(int(b), self.size)) for a, b in zip(starts, stops, strict=True)]
        with self._lock:
            blocks = [(k[0], self._cache[k]) for k in keys if k in self._cache]
        if blocks:
            _add_to_probe(self._probe_key, self.version, blocks)

    def _presigned(self) -> DirectRanges | None:
        """Return direct reads of this S3 object through a URL s3fs presigns (None: s3fs).

        The URL carries a signature valid for :attr:`signed_for_s` seconds, not the
        credentials; messages name the ``s3://`` URL, never the signed one.
        """
        if self._s3 is None:
            return None
        direct = _presigned_ranges(self._fs, self._path, self.name, self._s3, self.signed_for_s)
        if direct is None:  # nothing to sign with (anonymous access...): s3fs reads it
            self._s3 = None
            return None
        self._signed_until = time.monotonic() + self.signed_for_s / 2
        return direct

    def _sampling(self, starts: np.ndarray, stops: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray] | None:
        """Read ranges measuring the server's rate first, or None where that is not needed.

        Needed where the rate is measured on fewer than :attr:`rate_samples` calls
        (one sample taken while other reads share the connections can be far too
        low, and reads of one frame per request measure nothing to correct it) and
        the read asks for at least :attr:`rate_sample_asked` bytes in at least
        :attr:`rate_sample_ranges` requests: the ranges in the first
        :attr:`rate_sample_bytes` of the read
        are then read as one block, in 8 parts at once (the rate of several
        connections, as a read through gaps has and as the walk's windows measure
        it), and the rest as :meth:`_gap_for` then says. A few times per server
        and process, at the cost of up to that many bytes more each.
        """
        direct = self._direct
        if (direct is None or direct.link.rate_samples >= self.rate_samples
                or self.coalesce_ratio <= 0):
            return None
        if int(np.maximum(stops - starts, 0).sum()) < self.rate_sample_asked:
            return None  # a small read (IFDs...): the sample would cost more than it saves
        lo = int(starts.min())
        order = np.argsort(starts)
        gaps = starts[order][1:] - np.maximum.accumulate(stops[order])[:-1]
        if int((gaps > self.coalesce_gap).sum()) < self.rate_sample_ranges:
            return None  # few requests: little to save
        first = stops <= lo + self.rate_sample_bytes
        if not first.any():
            return None
        hi = int(stops[first].max())
        region = self._direct_blocks([lo], [hi], part=max(-(-(hi - lo) // 8), 2**20))
        if region is None:
            return None
        buf1 = self._block(region[0], lo, hi)
        base1 = starts[first] - lo
        if first.all():
            return buf1, base1
        buf2, base2 = super()._read_ranges(starts[~first], stops[~first])
        base = np.empty(len(starts), dtype=np.int64)
        base[first], base[~first] = base1, base2 + len(buf1)
        return np.concatenate([buf1, buf2]), base

    def _gap_for(self, starts: np.ndarray, stops: np.ndarray) -> int:
        """Read gaps through where that is faster than another request (direct reads).

        A request more costs its share of a round trip (:data:`MAX_CONNECTIONS`
        are in flight at once) and its CPU (``Link.REQUEST_CPU_S``); reading a gap through
        costs its bytes at the rate the server delivers. Both are measured on this
        process's requests to the server (:class:`~.http_ranges.Link`): until they
        are, and where reading through is no faster, :attr:`coalesce_gap` holds.
        The gaps read through beyond that (smallest first) add at most
        :attr:`coalesce_ratio` times the bytes asked for, and at most
        :attr:`coalesce_budget` bytes, to the read. One plane of seven of the
        benchmark file at 20 ms on the loopback server: 705 requests before, 104
        now (docs/performance.md).
        """
        gap = self.coalesce_gap
        even = self._even_gap()
        if len(starts) < 2 or even <= gap:
            return gap
        gaps = starts[1:] - stops[:-1]
        gaps = np.sort(gaps[(gaps > gap) & (gaps <= even)])
        budget = self.through_budget(int(np.maximum(stops - starts, 0).sum()))
        fit = int(np.searchsorted(np.cumsum(gaps), budget, side="right"))
        if fit < len(gaps):  # gaps as long as the first left out are left out too
            fit = int(np.searchsorted(gaps, gaps[fit], side="left"))
        return int(gaps[fit - 1]) if fit else gap

    def _even_gap(self) -> int:
        """Return the gap whose bytes cost as much as a request (0: unmeasured, or fsspec)."""
        direct = self._direct
        if direct is None or self.coalesce_ratio <= 0:  # (0: read only what is asked)
            return 0
        first, rate = direct.link.first_byte_s, direct.link.bytes_per_s
        if first is None or rate is None:
            return 0
        return int(rate * (first / MAX_CONNECTIONS + direct.link.REQUEST_CPU_S))

    def reads_gaps(self, widest_gap: int) -> bool:
        """Whether gaps of up to ``widest_gap`` bytes cost less than a request here."""
        return widest_gap <= self._even_gap()

    def through_budget(self, asked: int) -> int:
        """Return the bytes a read of ``asked`` bytes may add by reading gaps through."""
        return min(self.coalesce_ratio * asked, self.coalesce_budget)

    def _direct_blocks(self, starts: list[int], stops: list[int], part: int | None = None
                       ) -> list[memoryview] | None:
        """Return ranges received without fsspec into one new buffer, or None.

        Ranges longer than ``part`` (default :attr:`span_window`; gaps read
        through) are requested in parts of that size, all at once, as spans are.
        None where the source reads through fsspec (see :meth:`_fetch_direct`).
        """
        if self._direct is None:
            return None
        lengths = [b - a for a, b in zip(starts, stops, strict=True)]
        at = np.concatenate([[0], np.cumsum(lengths)[:-1]]).tolist()
        mem = memoryview(_fresh(sum(lengths)))
        step = part or self.span_window
        parts = [(x, min(x + step, b), o + x - a, i)
                 for i, (a, b, o) in enumerate(zip(starts, stops, at, strict=True))
                 for x in range(a, max(b, a + 1), step)]
        got = self._fetch_direct(mem, [p[0] for p in parts], [p[1] for p in parts],
                                 [p[2] for p in parts])
        if got is None:
            return None
        n = [0] * len(starts)
        for (_, _, _, i), g in zip(parts, got, strict=True):
            n[i] += g
        return [mem[o : o + k] for o, k in zip(at, n, strict=True)]

    def _exact(self, data: Any, start: int, stop: int) -> bytes:
        """Check that a range request returned that range (some servers ignore Range)."""
        if isinstance(data, BaseException):
            raise data
        data = bytes(data)
        if len(data) > stop - start:
            raise RemoteAccessError(
                self.name, f"the server ignored a Range request (it sent {len(data)} bytes "
                f"for bytes {start}-{stop - 1}); siff-xarray reads byte ranges, so serve the "
                "file from a server that supports them (S3, GCS and most HTTP servers do) or "
                "download it first")
        self.bytes_fetched += len(data)
        return data

    def _from_head(self, offset: int, end: int) -> bytes | None:
        """Bytes ``offset:end`` from the kept head of the file (fetched on first use).

        The head and the file's last :attr:`tail_bytes` (the content key's) are
        requested together: every open needs both, and at object-store latency
        a round trip costs more than the 4 KiB.
        """
        if end > self.head_bytes:
            return None
        if self._head is None:
            stop = min(self.head_bytes, self.size)
            starts, stops = [0], [stop]
            if self._tail is None and self.size > stop:
                starts.append(max(stop, self.size - self.tail_bytes))
                stops.append(self.size)
            tail_start = starts[-1] if len(starts) > 1 else self.size
            for a, b in self._with_head:  # kept in the block cache by _read_blocks
                if b <= tail_start:
                    starts.append(a)
                    stops.append(b)
            self._with_head = ()
            got = self._read_blocks(starts, stops)
            self._head = bytes(got[0])
            tail = len(got) > 1 and tail_start < self.size
            if tail and len(got[1]) == stops[1] - starts[1]:  # else read again
                self._tail = bytes(got[1])
        return self._head[offset:end] if end <= len(self._head) else None

    #: ranges asked for with the head (the ``with_head`` argument), not yet fetched
    _with_head: tuple[tuple[int, int], ...] = ()

    #: at most this many ranges of at most :attr:`ifd_window` bytes each come with the
    #: head (``with_head`` is a hint, which must not turn an open into a download)
    with_head_ranges = 8

    def _hinted(self, starts: list[int], stops: list[int]) -> tuple[tuple[int, int], ...]:
        """Return the ranges of a ``with_head`` hint kept: a few small ones past the head."""
        return tuple((int(a), int(b)) for a, b in zip(starts, stops, strict=True)
                     if int(a) >= self.head_bytes and 0 < int(b) - int(a) <= self.ifd_window
                     )[: self.with_head_ranges]

    def read(self, offset: int, length: int) -> bytes:
        """Return up to ``length`` bytes at ``offset``."""
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        head = self._from_head(offset, end)
        if head is not None:
            return head
        return self._exact(self._network(
            lambda: self._fs.cat_file(self._path, start=offset, end=end)), offset, end)

    def fingerprint(self) -> str:
        """ETag / modification time as the filesystem reports them ('' if none)."""
        return self._fingerprint

    #: largest span :meth:`will_need` fetches ahead, and how many spans it holds
    ahead_limit = 256 * 2**20
    ahead_spans = PARTS_AHEAD + 1  # the part decoding and those fetched ahead
    #: a span fetched ahead comes in requests of this many bytes, all at once: at
    #: 20-50 ms per request, 8 MiB requests with three 32 MiB parts on their way read
    #: the benchmark file 20-25 % faster than 4 MiB with two (docs/performance.md)
    span_window = 8 * 2**20

    #: a link whose requests wait at least this long for their first byte (median,
    #: measured: ``http_ranges.Link``) is far: a long read keeps twice as many parts on
    #: their way. Eager plane traces of the benchmark file at 50 ms, 4 calls in each
    #: of two processes: 0.63-0.94 s with eight parts ahead against 0.78-1.02 s with
    #: four; at 0 and 20 ms within noise, so there the memory is not spent
    far_first_byte_s = 0.03
    _parts_now = 0  # parts_ahead's answer while spans are held

    def parts_ahead(self) -> int:
        """Parts of a long read to have on their way while one decodes.

        ``ahead_spans - 1`` (:data:`PARTS_AHEAD`), twice that on a far link (see
        :attr:`far_first_byte_s`; the latency of each part's requests is then
        longer than the transfer of the parts before it), or
        :attr:`least_parts_ahead` where more. Decided when no span is held, so a
        read keeps one answer: were it to fall while parts are on their way, they
        would be dropped and fetched again.
        """
        direct = self._direct
        with self._lock:  # fixed while spans are held: a read's parts stay on their way
            if not (self._ahead and self._parts_now):
                first = None if direct is None else direct.link.first_byte_s
                far = first is not None and first >= self.far_first_byte_s
                self._parts_now = max((self.ahead_spans - 1) * (2 if far else 1),
                                      self.least_parts_ahead)
            return self._parts_now

    def will_need(self, start: int, stop: int) -> None:
        """Start fetching bytes ``start:stop`` in the background, to be read soon.

        The span is requested in :attr:`span_window` parts at once (object stores
        serve parallel ranges faster than one stream) while the caller decodes
        what it fetched before; :meth:`read_ranges` then serves every range inside
        the span from it. The newest :meth:`parts_ahead` + 1 spans are held (the
        part decoding and those on their way); a span larger than
        :attr:`ahead_limit` is not fetched ahead. A failed fetch raises when its
        bytes are read, as the read itself would.
        """
        start, stop = max(0, int(start)), min(int(stop), self.size)
        if not 0 < stop - start <= self.ahead_limit or self._closed:
            return
        held = self.parts_ahead() + 1
        with self._lock:
            if self._fetching(start, stop):
                return
            self._ahead.append((start, stop, self._submit_span(start, stop)))
            while len(self._ahead) > held:
                old = self._ahead.pop(0)[2]
                old.cancel()
                self._keep_spare(old)

    #: bytes of predicted spans (:meth:`expect`) held at most, by every remote file
    #: of the process together: each is about a Dask chunk's bytes (24 MB for the
    #: benchmark file's 16 MiB chunks), and Dask reads some chunks predicted at the
    #: end of one run of its order only after the next run
    expected_bytes = 256 * 2**20

    def expect(self, start: int, stop: int) -> None:
        """Fetch bytes ``start:stop`` in the background: a read of them is predicted.

        Held apart from the spans a read asked for (:meth:`will_need`), so neither
        pushes out the other, until a read is served from it (it then belongs to
        that read) or newer predictions of any file push it out: the process holds
        at most :attr:`expected_bytes` of them. A span larger than a quarter of that
        is not fetched. Counted in :attr:`expected_fetched` and, once read from,
        :attr:`expected_read`.
        """
        start, stop = max(0, int(start)), min(int(stop), self.size)
        if not 0 < stop - start <= self.expected_bytes // 4 or self._closed:
            return
        with self._lock:
            if self._fetching(start, stop):
                return
        if _PREDICTED.add(self, start, stop, self.expected_bytes):
            with self._lock:  # several threads predict
                self.expected_fetched += 1

    def _fetching(self, start: int, stop: int) -> bool:
        """Whether a span asked for or predicted holds bytes ``start:stop`` (lock held)."""
        return (any(a <= start and stop <= b for a, b, _ in self._ahead)
                or _PREDICTED.holds(self, start, stop))

    def _submit_span(self, start: int, stop: int) -> Any:
        """Start fetching a span in :attr:`span_window` requests; return its job."""
        parts = list(range(start, stop, self.span_window))
        return _background().submit(self._fetch_span, parts, [*parts[1:], stop])

    def _fetch_span(self, starts: list[int], stops: list[int]) -> np.ndarray:
        """Fetch consecutive ranges concurrently into one buffer (see :meth:`_span_buffer`)."""
        out = self._span_buffer(stops[-1] - starts[0])
        got = self._fetch_direct(memoryview(out), starts, stops,
                                 [a - starts[0] for a in starts])
        if got is None:
            windows = self.fetch_windows(starts, stops)
            got = [len(data) for data in windows]
            for a, b, data in zip(starts, stops, windows, strict=True):
                n = min(len(data), b - a)
                out[a - starts[0] : a - starts[0] + n] = np.frombuffer(data, np.uint8)[:n]
        for a, b, n in zip(starts, stops, got, strict=True):
            if n != b - a:  # the object is shorter than its listed size
                raise SiffFormatError(self.name, f"file ends inside a {b - a}-byte data "
                                      "block", a)
        # the file's bytes, read-only as a local file's memory map gives them: a span
        # serves every read inside it, none may change it for the others; and the
        # decode kernels were compiled for read-only buffers (a writable span made
        # Numba load a second build of each, in a process that read local files too)
        out.flags.writeable = False
        return out

    def _fetch_direct(self, out: memoryview, starts: list[int], stops: list[int],
                      at: list[int]) -> list[int] | None:
        """Receive bytes ``starts[i]:stops[i]`` into ``out[at[i]:]`` without fsspec.

        Returns each range's length as received, or None where this source reads
        through fsspec (not a plain http(s) URL or an S3 object it could presign, or
        the server redirected, or refused the signature).
        """
        if self._s3 is not None and time.monotonic() > self._signed_until:
            self._direct = self._presigned()
        direct = self._direct
        if direct is None:
            return None
        def fetch(direct: DirectRanges) -> list[int]:
            return self._network(lambda: direct.fetch_into(
                out, starts, stops, at, self._if_match(self.version), etag=self.version))

        try:
            try:
                got = fetch(direct)
            except (HTTPStatusError, FileNotFoundError) as exc:
                # a redirect's target refused: a presigned URL expires, the link
                # that redirected to it gives a new one
                if (self._s3 is not None or direct is self._origin
                        or getattr(exc, "status", 404) not in _EXPIRED):
                    raise
                self._direct = direct = self._follow_again(exc)
                if self._probe_key is not None and self.version is not None:
                    _retarget_probe(self._probe_key, self.version, direct)
                got = fetch(direct)
        except StepAside:
            self._direct = self._s3 = None
            return None
        self.bytes_fetched += sum(got)
        return got

    def _follow_again(self, refused: Exception) -> DirectRanges:
        """Ask the redirecting URL for the object's place again (the old one expired).

        Raises ``refused`` where it no longer redirects to an object of this size
        and version.
        """
        probe, direct = probe_following(self._origin, True, 1, 1, [], [],
                                        self._if_match(self.version), versions=self.pinned)
        if (direct is None or direct is self._origin or probe is None or probe.size != self.size
                or (self.version is not None and probe.etag != self.version)):
            raise refused
        return direct

    #: buffers of released spans kept for the next ones (at most this many)
    spare_spans = 2

    def _span_buffer(self, n: int) -> np.ndarray:
        """Return an ``n``-byte array for a span, over a released span's memory if one is free.

        A streamed read fetches a span of about 24 MiB per part. New memory of
        that size is a fresh mapping whose every page the kernel zeroes and maps
        on first touch; memory reused is already mapped. New memory comes from
        :func:`_fresh`. The array handed out does not own its memory (it is made
        over a ``memoryview``), so every view of it (a kernel's argument, a slice)
        refers to it: the memory is free for reuse only once that array is gone,
        which a weak reference tells without guessing.
        """
        mem = None
        with self._lock:
            for i, (spare, last) in enumerate(self._spare):
                if len(spare) >= n and last() is None:
                    mem = self._spare.pop(i)[0]
                    break
        if mem is None:
            step = self.walk_window  # room for the next span, which is about as long
            mem = _fresh(-(-n // step) * step)
        return np.frombuffer(memoryview(mem), dtype=np.uint8, count=n)

    def _keep_spare(self, job: Any) -> None:
        """Keep the memory of a dropped span's fetch for :meth:`_span_buffer` (lock held)."""
        if not job.done() or job.cancelled() or job.exception() is not None:
            return
        out = job.result()
        mem = out.base.obj if isinstance(out.base, memoryview) else None
        if isinstance(mem, np.ndarray):
            self._spare.append((mem, weakref.ref(out)))
            del self._spare[: max(len(self._spare) - self.spare_spans, 0)]

    def _span_holding(self, starts: np.ndarray, stops: np.ndarray
                      ) -> tuple[int, Any, bool] | None:
        """Return the span fetched ahead or predicted holding every range, or None.

        As ``(start, job, predicted)``. A predicted span is handed to this read:
        the source no longer holds it.
        """
        if starts.size == 0:
            return None
        lo, hi = int(starts.min()), int(stops.max())
        with self._lock:
            for a, b, job in reversed(self._ahead):
                if a <= lo and hi <= b:
                    return a, job, False
        taken = _PREDICTED.take(self, lo, hi)
        if taken is None:
            return None
        with self._lock:
            self.expected_read += 1
        return taken[0], taken[1], True

    #: bytes read through at the start of a read of many ranges to measure the
    #: server's rate, when no read has measured it yet (see :meth:`_gap_for`)
    rate_sample_bytes = 32 * 2**20
    #: ... in a read of at least this many bytes in this many requests
    rate_sample_asked = 2**20
    rate_sample_ranges = 8
    #: ... until this many calls measured the rate
    rate_samples = 3

    def _read_ranges(self, starts: np.ndarray, stops: np.ndarray, gap: int | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
        held = self._span_holding(starts, stops)
        if held is None:
            return (self._held_blocks(starts, stops) or self._sampling(starts, stops)
                    or super()._read_ranges(starts, stops, gap))
        a, job, predicted = held
        try:
            span = job.result()
            if predicted:  # its memory serves a new span once this read lets go of it
                with self._lock:
                    self._keep_spare(job)
            return span, starts - a  # the span itself: no copy per range
        except CancelledError:  # another read dropped it before it ran: read directly
            return super()._read_ranges(starts, stops)
        except Exception:
            if not predicted:  # the read asked for it: its failure is the read's
                raise
            # nobody asked for a predicted span: the read tries itself, and fails
            # with its own error if the cause lasts
            return super()._read_ranges(starts, stops)

    def release(self) -> None:
        """Drop bytes kept from the walk and the oldest span fetched ahead.

        The newest :meth:`parts_ahead` spans stay: the parts a streamed read
        requested ahead of the one it just finished.
        """
        super().release()
        keep = self.parts_ahead()
        with self._lock:
            drop = max(len(self._ahead) - keep, 0)
            for _, _, job in self._ahead[:drop]:
                self._keep_spare(job)
            del self._ahead[:drop]

    def drop_ahead(self) -> None:
        """Forget every span fetched ahead and the memory kept for new ones.

        A streamed read calls it when it ends: the parts it held, and the spare
        memory for its next parts (up to :meth:`parts_ahead` + 1 + :attr:`spare_spans`
        buffers of a part's size), must not stay with a file that is kept open.
        """
        with self._lock:
            for _, _, job in self._ahead:
                job.cancel()
            self._ahead.clear()
            self._spare.clear()

    def drop_expected(self) -> None:
        """Forget every span predicted for this file (:meth:`expect`)."""
        _PREDICTED.drop(self)

    def _read_blocks(self, starts: list[int], stops: list[int]) -> list[bytes]:
        keys = [(a, min(b, self.size)) for a, b in zip(starts, stops, strict=True)]
        with self._lock:
            found = {k: self._cache[k] for k in keys if k in self._cache}
            for k in found:
                self._cache.move_to_end(k)
        if self._head is not None:  # bytes near the start: the header read kept them
            for k in keys:
                if k not in found and k[1] <= len(self._head):
                    found[k] = self._head[k[0]:k[1]]
        todo = [k for k in dict.fromkeys(keys) if k not in found]
        if todo:
            a, b = [a for a, _ in todo], [b for _, b in todo]
            got = self._direct_blocks(a, b)
            if got is None:
                got = [self._exact(data, *k) for k, data in zip(todo, self._network(
                    lambda: self._fs.cat_ranges([self._path] * len(todo), a, b,
                                                on_error="raise")), strict=True)]
            for k, data in zip(todo, got, strict=True):
                found[k] = data
                self._remember(k, data)
        return [found[k] for k in keys]

    def read_sibling(self, suffix: str) -> bytes | None:
        """Return the object ``name + suffix`` (one request), or ``None`` if absent.

        In an http(s) URL the suffix goes before the query (:func:`sibling_url`).
        """
        try:  # (from byte 0: s3fs asks a whole object's size first, a round trip more)
            data = self._fs_any.cat_file(sibling_url(self._path, suffix), start=0)
        except Exception:  # absent, forbidden or unreachable: the walk will do
            return None
        self.bytes_fetched += len(data)
        return bytes(data)

    def sibling_name(self, suffix: str) -> str:
        """Return the URL of the object ``name + suffix`` (:func:`sibling_url`)."""
        return sibling_url(self.name, suffix)

    def write_sibling(self, suffix: str, data: bytes) -> str:
        """Upload ``name + suffix`` (one object: readers see all of it or none)."""
        self._network(lambda: self._fs_any.pipe_file(sibling_url(self._path, suffix), data))
        return self.sibling_name(suffix)

    def fetch_consecutive(self, start: int, stop: int) -> np.ndarray:
        """Return bytes ``start:stop`` for the walk, received where they are kept.

        Where the source reads without fsspec the windows land in one buffer, which
        is returned as it is: the walk's 64 MiB batches are not copied again.
        """
        got = self._direct_blocks([start], [stop], self.walk_window)
        if got is None:
            return super().fetch_consecutive(start, stop)
        return np.frombuffer(got[0], dtype=np.uint8)

    def fetch_windows(self, starts: list[int], stops: list[int]
                      ) -> list[bytes] | list[memoryview]:
        """Read the walk's windows concurrently, past the data cache (read once)."""
        got = self._direct_blocks(starts, stops)
        if got is not None:
            return got
        got = self._network(lambda: self._fs.cat_ranges(
            [self._path] * len(starts), starts, stops, on_error="raise"))
        return [self._exact(data, a, b) for data, a, b in zip(got, starts, stops, strict=True)]

    #: a read of at most this many ranges is served from the kept blocks if each lies
    #: in one (larger reads are the frames' data, which coalescing reads in blocks)
    held_ranges = 16
    #: how many of the newest kept blocks such a read looks in
    held_blocks = 64

    def _held_blocks(self, starts: np.ndarray, stops: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray] | None:
        """Serve a few ranges from the head and the blocks kept, or None if one is not held.

        An open fetches the header and the IFDs that check a cached index as small
        separate blocks with its first request. In a small file those IFDs lie
        closer together than :attr:`coalesce_gap`, so read as one coalesced block
        they would be fetched again: each range is looked up on its own here.
        """
        if not 0 < len(starts) <= self.held_ranges:
            return None
        with self._lock:  # the newest blocks only: a walk by IFD keeps thousands
            blocks = [(0, self._head)] if self._head is not None else []
            blocks += [(a, data) for (a, _), data in
                       itertools.islice(reversed(self._cache.items()), self.held_blocks)]
        parts = []
        for a, b in zip(starts.tolist(), stops.tolist(), strict=True):
            hit = next((data[a - k : b - k] for k, data in blocks
                        if k <= a and b <= k + len(data)), None)
            if hit is None:
                return None
            parts.append(np.frombuffer(hit, dtype=np.uint8))
        lengths = [len(p) for p in parts]
        base = np.zeros(len(parts), dtype=np.int64)
        base[1:] = np.cumsum(lengths)[:-1]
        return np.concatenate(parts), base

    def _remember(self, key: tuple[int, int], data: bytes) -> None:
        if len(data) > self._cache_bytes:
            return
        with self._lock:
            if key in self._cache:
                return
            self._cache[key] = data
            self._cached += len(data)
            while self._cached > self._cache_bytes:
                _, old = self._cache.popitem(last=False)
                self._cached -= len(old)

    def close(self) -> None:
        """Drop the caches (fsspec filesystems need no closing)."""
        self._closed = True
        self.forget_kept()
        self.drop_ahead()
        self.drop_expected()
        with self._lock:
            self._cache.clear()
            self._cached = 0


def _presigned_ranges(fs: Any, path: str, url: str, settings: S3Settings, seconds: float
                      ) -> DirectRanges | None:
    """Return direct reads of S3 object ``url`` through a URL s3fs presigns, or None.

    None where s3fs has nothing to sign with (anonymous access...). Messages name
    ``url``, never the signed URL, whose signature expires after ``seconds``.
    """
    try:
        signed = fs.sign(path, expiration=seconds)
    except Exception:
        return None
    return DirectRanges(signed, {}, settings.context, settings.connect, settings.read,
                        name=url, step_aside=S3_STEP_ASIDE)


#: statuses of a redirect's target that may mean its (presigned) URL expired
_EXPIRED = frozenset({400, 401, 403, 404, 410})


#: what pinned opens in this process learnt of each object (:func:`_probed`), newest last
_PROBES: OrderedDict[tuple[str, str], tuple[Probe, DirectRanges | None]] = OrderedDict()
_PROBES_LOCK = threading.Lock()
#: objects whose probe is kept (each a few tens of KiB: the head, tail and hinted ranges)
MAX_PROBES = 32


def _probe_key(url: str, storage_options: dict[str, Any] | None) -> str:
    """Name the object a probe was of: its URL and storage options (as JSON text)."""
    return json.dumps([url, storage_options], sort_keys=True, default=repr)


def _probed(key: str, version: str) -> tuple[Probe, DirectRanges | None] | None:
    """Return what an open in this process learnt of ``key`` at ``version``, if it did.

    The probe (size, ETag, head, tail, hinted ranges) and, for a link that
    redirected, the reads of its target. A reopen at a known version asks the
    server nothing: every read of it requires that version (If-Match), so a
    replaced object is refused at the first read as it would be at the probe.
    This is what keeps a Dask worker from probing a file again on each task when
    xarray closed it between two (its file managers close a file with the last
    copy of the manager in the process), and the photon reductions from probing
    a file the chunks' reads opened.
    """
    with _PROBES_LOCK:
        got = _PROBES.get((key, version))
        if got is not None:
            _PROBES.move_to_end((key, version))
        return got


def _remember_probe(key: str, probe: Probe, target: DirectRanges | None) -> None:
    """Keep ``probe`` (its hinted ranges only when small) for reopens of its version."""
    if sum(len(d) for _, d in probe.blocks) > 2**20:
        probe = probe._replace(blocks=[])
    with _PROBES_LOCK:
        _PROBES[(key, str(probe.etag))] = (probe, target)
        _PROBES.move_to_end((key, str(probe.etag)))
        while len(_PROBES) > MAX_PROBES:
            _PROBES.popitem(last=False)


def _add_to_probe(key: str, version: str, blocks: list[tuple[int, bytes]]) -> None:
    """Add ``blocks`` (``(start, bytes)``) to the probe kept of ``key`` at ``version``."""
    with _PROBES_LOCK:
        got = _PROBES.get((key, version))
        if got is None:
            return
        have = dict(got[0].blocks)
        for a, data in blocks:
            if a not in have and sum(map(len, have.values())) + len(data) <= 2**20:
                have[a] = data
        _PROBES[(key, version)] = (got[0]._replace(blocks=sorted(have.items())), got[1])


def _retarget_probe(key: str, version: str, target: DirectRanges) -> None:
    """Record the new target of a link whose old one expired (reopens go there)."""
    with _PROBES_LOCK:
        got = _PROBES.get((key, version))
        if got is not None:
            _PROBES[(key, version)] = (got[0], target)


def forget_probes() -> None:
    """Drop every probe this process keeps (the next open of each object asks again)."""
    with _PROBES_LOCK:
        _PROBES.clear()


def probe_following(direct: DirectRanges, follow: bool, *args: Any, **kwargs: Any
                    ) -> tuple[Probe | None, DirectRanges]:
    """:meth:`DirectRanges.probe`, following redirects where ``follow``.

    Returns the probe (None: left to fsspec) and the direct reads that answered it:
    ``direct`` itself, or those of the URL it redirected to (at most
    :data:`~.http_ranges.MAX_REDIRECTS` hops). A redirect not followed (``follow``
    False, a downgrade from https, too many hops) gives None and ``direct``.
    """
    here = direct
    for _ in range(MAX_REDIRECTS + 1):
        try:
            return here.probe(*args, **kwargs), here
        except Redirected as moved:
            there = here.redirected(moved.location) if follow else None
            if there is None:
                return None, direct
            here = there
    return None, direct


def sibling_url(url: str, suffix: str) -> str:
    """Return the URL of the object ``suffix`` names next to ``url`` (a sidecar).

    In an http(s) URL the suffix is added to the path, before the query
    (``https://host/run.siff?download=1`` -> ``https://host/run.siff.siffidx?download=1``);
    elsewhere (``s3://``, paths, where ``?`` may be part of a key) to the end.
    """
    if url.lower().startswith(("http://", "https://")) and "?" in url:
        path, query = url.split("?", 1)
        return f"{path}{suffix}?{query}"
    return url + suffix


def probe_ends(url: str, storage_options: dict[str, Any] | None, nbytes: int,
               pin: bool = True) -> tuple[dict[str, Any], bytes, bytes] | None:
    """Return a remote file's ``info`` with its first and last ``nbytes``: one round trip.

    The ``info`` has the keys and values fsspec's would have for what a file's
    identity is made of (size, ETag, for S3 ``LastModified``). Two range requests
    sent at once through :mod:`.http_ranges` (a plain http(s) URL, or an S3 object
    through a presigned URL), none through fsspec: checking a file this way costs a
    fraction of the CPU of fsspec's HEAD and two GETs on its event loop. None where
    the URL or its storage options are left to fsspec, or the server answers
    anything but the two ranges of one version of the object (the caller then asks
    fsspec, whose answers and errors are the reference), and where
    :attr:`FsspecSource.direct_http` is off. A timeout or an
    unreachable server raises a RemoteAccessError naming ``url``. ``pin=False``
    ignores the server's ETags and modification times (none are returned).
    """
    if not FsspecSource.direct_http:
        return None
    settings = s3_settings(url, storage_options)
    if settings is not None:
        fs, path = filesystem(url, storage_options)
        direct = _presigned_ranges(fs, path, url, settings, FsspecSource.signed_for_s)
    else:
        direct = direct_ranges(url, storage_options)
    if direct is None:
        return None
    try:
        probe, _ = probe_following(direct, settings is None, nbytes, nbytes, [], [],
                                   versions=pin)
    except Exception as exc:
        err = remote_error(url, exc)
        if err is None:
            raise
        raise err from exc
    if probe is None or not len(probe.head) == len(probe.tail) == min(nbytes, probe.size):
        return None
    return _probed_info(probe, s3=settings is not None), probe.head, probe.tail


def _probed_info(probe: Probe, s3: bool) -> dict[str, Any]:
    """Return fsspec's ``info`` of a file, as far as :meth:`FsspecSource._adopt` uses it.

    For S3 the keys and values are those s3fs gives (``LastModified`` a UTC
    datetime, from the same ``Last-Modified`` header its HeadObject reads), so the
    file's fingerprint, and with it its index cache key, does not depend on
    whether the open probed or asked s3fs.
    """
    info: dict[str, Any] = {"size": probe.size, "type": "file"}
    if s3:  # s3fs gives both keys, empty where the server sent no such header
        info["ETag"], info["LastModified"] = probe.etag or "", ""
        if probe.modified:
            with contextlib.suppress(TypeError, ValueError):
                info["LastModified"] = email.utils.parsedate_to_datetime(probe.modified)
    elif probe.etag:
        info["ETag"] = probe.etag
    return info


def _copy_ranges(src: np.ndarray, src_at: np.ndarray, dst: np.ndarray, dst_at: np.ndarray,
                 lengths: np.ndarray) -> None:
    """Copy ``src[src_at[i]:][:lengths[i]]`` to ``dst[dst_at[i]:]`` for every ``i``.

    Ranges that follow each other in both buffers are copied as one slice (the
    frame descriptions a walk kept, read back in the order kept: a few slices
    for the whole file); the others one slice each. An index array of every byte
    (the vectorised alternative) took 0.84 s and 0.5 GB for the 31 MB of
    descriptions of a 94,306-frame file. Even for scattered ranges (one per frame:
    a walk's batch keeps about 750 descriptions of 330 bytes from 64 MiB) the
    slices are faster: 0.27 ms per batch against 1.8 ms (median of 200 calls).
    """
    if lengths.size == 0:
        return
    src_at, dst_at = src_at.astype(np.int64), dst_at.astype(np.int64)
    lengths = lengths.astype(np.int64)
    ends = np.cumsum(lengths)
    apart = np.flatnonzero((src_at[1:] != src_at[:-1] + lengths[:-1])
                           | (dst_at[1:] != dst_at[:-1] + lengths[:-1])) + 1
    first = np.concatenate([[0], apart])
    last = np.concatenate([apart, [lengths.size]]) - 1
    size = ends[last] - ends[first] + lengths[first]
    for a, d, n in zip(src_at[first].tolist(), dst_at[first].tolist(), size.tolist(),
                       strict=True):
        dst[d : d + n] = src[a : a + n]


def _fresh(n: int) -> np.ndarray:
    """Return ``n`` bytes of new memory to receive into, not filled with anything.

    A ``bytearray`` is zero-filled first, and its pages are mapped one 4 KiB page
    at a time as they are first touched. A numpy array is not filled, and numpy
    asks Linux for transparent huge pages for arrays of 4 MiB and more (in the
    default ``madvise`` mode the kernel then maps 2 MiB per fault): on this
    project's benchmark VM, 256 MiB of new memory written once took 140 ms as a
    ``bytearray`` and 35 ms as a numpy array (medians of 6).
    """
    return np.empty(n, dtype=np.uint8)


class _Predicted:
    """The spans fetched for predicted reads (:meth:`FsspecSource.expect`) of every file.

    One budget for the process: a Dataset of many remote files holds no more
    predicted bytes than a Dataset of one. Oldest first; a read takes its span out.
    A span nobody read for :attr:`unread_s` seconds is dropped: a prediction is
    read within moments or not at all (the run of reads stopped), and a Dataset
    left open after its computation must not keep the bytes of chunks it never read.
    """

    #: seconds a predicted span stays unread before it is dropped (checked by a timer
    #: that runs only while spans are held)
    unread_s = 20.0

    def __init__(self) -> None:
        self.lock = threading.Lock()
        #: ``(source, start, stop, job, monotonic time added)``, oldest first
        self.spans: list[tuple[FsspecSource, int, int, Any, float]] = []
        self._timer: threading.Timer | None = None

    def _newest(self, source: FsspecSource, start: int, stop: int) -> int | None:
        """Index of the newest span of ``source`` holding bytes ``start:stop`` (lock held)."""
        for i in range(len(self.spans) - 1, -1, -1):
            s, a, b, _, _ = self.spans[i]
            if s is source and a <= start and stop <= b:
                return i
        return None

    def _arm(self) -> None:
        """Run :meth:`_expire` when the oldest span turns stale (lock held; one timer)."""
        if self._timer is None and self.spans:
            due = self.spans[0][4] + self.unread_s - time.monotonic()
            self._timer = threading.Timer(max(due, 0.0) + 0.01, self._expire)
            self._timer.daemon = True
            self._timer.start()

    def _disarm_if_empty(self) -> None:
        """Stop the timer once no span is held (lock held)."""
        if not self.spans and self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        """Drop the spans added more than :attr:`unread_s` ago, and wait for the next."""
        with self.lock:
            self._timer = None
            old = time.monotonic() - self.unread_s
            for _, _, _, job, added in self.spans:
                if added <= old:
                    job.cancel()
            self.spans = [e for e in self.spans if e[4] > old]
            self._arm()

    def holds(self, source: FsspecSource, start: int, stop: int) -> bool:
        with self.lock:
            return self._newest(source, start, stop) is not None

    def add(self, source: FsspecSource, start: int, stop: int, budget: int) -> bool:
        """Start fetching a span unless one holds it; push out the oldest over ``budget``."""
        with self.lock:
            if self._newest(source, start, stop) is not None:
                return False
            self.spans.append((source, start, stop, source._submit_span(start, stop),
                               time.monotonic()))
            total = sum(e[2] - e[1] for e in self.spans)
            while total > budget:
                _, a, b, job, _ = self.spans.pop(0)
                job.cancel()
                total -= b - a
            self._arm()
            return True

    def take(self, source: FsspecSource, lo: int, hi: int) -> tuple[int, Any] | None:
        """Hand over (and forget) the newest span of ``source`` holding bytes ``lo:hi``."""
        with self.lock:
            i = self._newest(source, lo, hi)
            if i is None:
                return None
            _, a, _, job, _ = self.spans.pop(i)
            self._disarm_if_empty()
            return a, job

    def drop(self, source: FsspecSource) -> None:
        with self.lock:
            for s, _, _, job, _ in self.spans:
                if s is source:
                    job.cancel()
            self.spans = [e for e in self.spans if e[0] is not source]
            self._disarm_if_empty()


_PREDICTED = _Predicted()

_pool: Any = None
_pool_lock = threading.Lock()


def _background() -> Any:
    """Return the thread pool that fetches spans ahead (created on first use)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            from concurrent.futures import ThreadPoolExecutor

            # each waits for its span's requests (no CPU): enough for two readers
            # (the converter's workers) with every part they ask for on its way,
            # twice as many on a far link (FsspecSource.parts_ahead)
            _pool = ThreadPoolExecutor(4 * (FsspecSource.ahead_spans - 1),
                                       thread_name_prefix="siff-xarray-ahead")
        return _pool


def _forget_pool() -> None:  # a forked child has the pool object but not its threads
    global _pool, _PREDICTED
    _pool = None
    _PREDICTED = _Predicted()  # nor the fetches of its predicted spans


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def not_a_file(name: str, store: bool, holds_siff: bool = False) -> IsADirectoryError:
    """Return the error for a directory ``name`` read as a ``.siff`` or TIFF file.

    ``store``: it is a converted Zarr store (the error says what reads those);
    ``holds_siff``: it holds ``.siff`` files (the error suggests a glob).
    """
    hint = ""
    if store:
        hint = ("; it is a converted Zarr store: open it with siff_xarray.open_converted "
                "(siff-xarray info, verify and register read stores)")
    elif holds_siff:
        glob = name.rstrip("/") + "/*.siff"
        hint = f"; for the .siff files in it, give a glob: '{glob}'"
    return IsADirectoryError(f"{name}: is a directory, not a .siff or TIFF file{hint}")


def open_source(
    path_or_fileobj: str | os.PathLike[str] | IO[bytes] | ByteSource,
    storage_options: dict[str, Any] | None = None,
    cache_bytes: int = 64 * 2**20,
    version: str | None = None,
    with_head: tuple[list[int], list[int]] | None = None,
    pin: bool = True,
) -> ByteSource:
    """Open a :class:`ByteSource` for a local path, an fsspec URL or a file object.

    Parameters
    ----------
    path_or_fileobj
        Local path, fsspec URL (``s3://``, ``https://``, ``memory://``, ``file://``),
        an open binary file object, or an existing :class:`ByteSource`.
    storage_options
        Passed to fsspec for URLs.
    cache_bytes
        Size of the LRU cache of data blocks for URLs.
    version
        For URLs: the ETag the object must still have (a replaced object is a
        :class:`~siff_xarray.errors.SiffFormatError`); ``None``: the current one.
    with_head
        For URLs: ``(starts, stops)`` of small ranges to fetch in the same round trip
        as the file's head and tail, which every open reads first, kept for the read
        that asks for exactly those ranges (an open checking a cached index at the
        IFDs it checked before). Only a hint: at most eight ranges of 2 KiB, past
        the head; ranges in the tail are left out.
    pin
        For URLs: require every read to be of the version (ETag) the open saw
        (default). False ignores the server's ETags and modification times, for
        servers whose ETags differ between requests to one object.

    """
    if isinstance(path_or_fileobj, ByteSource):
        return path_or_fileobj
    if isinstance(path_or_fileobj, (str, os.PathLike)):
        path = os.fspath(path_or_fileobj)
        if is_remote(path):
            return FsspecSource(path, storage_options, cache_bytes, version, with_head, pin)
        return LocalSource(local_path(path))
    return FileObjectSource(path_or_fileobj)

