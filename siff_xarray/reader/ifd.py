"""Walking the IFD chain and building the frame index.

One IFD is one frame (one channel of one scan at one z position). The walk is a
Numba kernel (:mod:`.ifd_walk`, imported when a walk runs) over the file's bytes
(the memory map for local files, windows of bytes for file objects) that records,
per frame, the handful of tag values decoding needs. The result is a
:class:`FrameIndex`: plain numpy arrays, cheap to pickle, sliced per request, never
holding a file handle.

Validation happens here, once per file, so the decode kernels can trust the
offsets they are given (they still bounds-check). A frame whose bytes run past
the end of the file is accepted only as the *last* frame of the chain, where it
means the acquisition was cut off mid-write: it is dropped (``SiffFile`` warns about
every byte after the last frame it indexes; :func:`unread_bytes`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from ..errors import SiffFormatError
from ..format import constants as C
from ..format.constants import ENC_COMPRESSED, ENC_RAW, ENC_TIFF
from ..format.header import FileHeader
from .source import ByteSource

__all__ = ["FrameIndex", "build_frame_index", "unread_bytes"]


MAX_ENTRIES = 4096  # no sane TIFF page has more tags than this
MAP_WINDOW = 64 * 2**20  # bytes of a memory map walked between page releases
PREAD_WINDOW = 4096  # bytes read per IFD by the pread walk (one page: a whole IFD)
MAX_PIXELS = 1 << 24  # 4096 x 4096: larger frames are treated as corrupt

# columns of the raw walk table
(
    C_IFD, C_WIDTH, C_HEIGHT, C_DESC_OFF, C_DESC_COUNT, C_DESC_INLINE, C_STRIP_OFF,
    C_STRIP_BYTES, C_STRIP_COUNT, C_SIFF, C_BPS, C_SAMPLEFMT, C_COMPRESSION, C_NEXT,
) = range(14)
N_COLS = 14

# walk status codes
S_END, S_MORE, S_FULL, S_TRUNC, S_ZERO_IFD = 0, 1, 2, 3, 4
S_INTO_HEADER, S_TOO_MANY, S_BAD_TYPE, S_CYCLE = 10, 11, 12, 13
S_IO = 20  #: a read of the file failed (pread returned an error)

# byte size of each TIFF field type (0 = unknown type)
_TYPE_SIZE = np.zeros(32, dtype=np.int64)
for _t, _s in C.TIFF_TYPE_SIZES.items():
    _TYPE_SIZE[_t] = _s


def _compiled() -> Any:
    """Return the compiled walk (:mod:`.ifd_walk`), imported with Numba on first use."""
    from . import ifd_walk

    return ifd_walk


#: at most this many ranges are read with plain ``os.preadv`` calls (no Numba)
_FEW_RANGES = 64


def pread_ranges(fd: int, starts: np.ndarray, lengths: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, int]:
    """Read many byte ranges of a local file into one buffer with ``pread`` (POSIX).

    Returns ``(buf, base, failed)``: range ``i`` is ``buf[base[i]:base[i] + lengths[i]]``;
    ``failed`` is the first range that could not be read whole, or -1.
    """
    lengths = np.maximum(np.asarray(lengths, dtype=np.int64), 0)
    base = np.zeros(lengths.size, dtype=np.int64)
    if lengths.size:
        np.cumsum(lengths[:-1], out=base[1:])
    out = np.empty(int(lengths.sum()), dtype=np.uint8)
    starts = np.asarray(starts, dtype=np.int64)
    if lengths.size > _FEW_RANGES:
        return out, base, int(_compiled().pread_gather(fd, starts, lengths, base, out))
    # a few ranges (one frame's description when a Dataset opens): plain preads, so a
    # metadata-only open never starts Numba (its first use in a process costs ~0.4 s)
    view = memoryview(out)
    for i, (a, n, b) in enumerate(zip(starts.tolist(), lengths.tolist(), base.tolist(),
                                      strict=True)):
        if not n:
            continue
        try:
            got = os.preadv(fd, [view[b : b + n]], a) if a >= 0 else -1
        except OSError:
            got = -1
        if got != n:
            return out, base, i
    return out, base, -1


@dataclass(frozen=True)
class FrameIndex:
    """Per-frame byte layout of a file; every array has one entry per frame.

    Attributes
    ----------
    ifd_offset, strip_offset, strip_bytes, desc_offset, desc_length
        Byte offsets/lengths (int64). ``desc_length`` is 0 for frames without a
        description.
    encoding
        ``ENC_RAW``, ``ENC_COMPRESSED`` or ``ENC_TIFF`` (int8).
    height, width
        Frame shape (int64).
    n_photons
        Photons stored in each frame, known from the IFD alone (0 for TIFF pages).
    signed
        True for TIFF pages storing signed 16-bit samples (int8 0/1).

    """

    ifd_offset: np.ndarray
    strip_offset: np.ndarray
    strip_bytes: np.ndarray
    desc_offset: np.ndarray
    desc_length: np.ndarray
    encoding: np.ndarray
    height: np.ndarray
    width: np.ndarray
    n_photons: np.ndarray
    signed: np.ndarray

    def __len__(self) -> int:
        return int(self.ifd_offset.shape[0])

    def take(self, frames: np.ndarray) -> FrameIndex:
        """Return the index restricted to ``frames`` (in that order)."""
        return FrameIndex(**{f.name: getattr(self, f.name)[frames] for f in fields(self)})

    @property
    def data_start(self) -> np.ndarray:
        """First byte of each frame's pixel/photon data (count image for compressed)."""
        pre = np.where(self.encoding == ENC_COMPRESSED, 2 * self.height * self.width, 0)
        return self.strip_offset - pre

    @property
    def data_stop(self) -> np.ndarray:
        """One past the last byte of each frame's photon data."""
        return self.strip_offset + self.strip_bytes


def _walk_table(source: ByteSource, header: FileHeader) -> tuple[np.ndarray, int, int, int]:
    """Run the walker over the whole chain; return (table, status, pos, detail)."""
    whole = source.buffer()
    cap = 1024 if whole is None else max(16, min(source.size // 256 + 16, 1 << 22))
    out = np.empty((cap, N_COLS), dtype=np.int64)
    pos, count, monotonic = header.first_ifd, 0, True
    fd = source.fileno() if os.name == "posix" else None
    if fd is not None:
        # local files: one pread per IFD, as a C reader would; walking the memory map
        # instead costs a page fault (and a mapped page to release) per IFD
        scratch = np.empty(PREAD_WINDOW, dtype=np.uint8)
        while True:
            status, pos, count, monotonic, detail = _compiled().walk_fd(
                fd, scratch, header.file_size, pos, count, out, header.bigtiff,
                header.header_end, monotonic, _TYPE_SIZE)
            if status == S_FULL:
                out = np.concatenate([out, np.empty_like(out)])
            elif status == S_MORE:
                scratch = np.empty(int(detail), dtype=np.uint8)
            elif status == S_IO:
                raise OSError(f"{source.name}: reading the IFD at byte {pos} failed")
            else:
                return out[:count].copy(), int(status), int(pos), int(detail)
    buf, buf_start = np.empty(0, dtype=np.uint8), 0
    streamed = whole is None and source.walk_window > 0
    n_windows = 1  # windows per request batch: doubles up to source.walk_inflight
    with _Streamer(source, header.file_size) as streamer:
        while True:
            before = count
            status, pos, count, monotonic, detail = _compiled().walk(
                buf, buf_start, header.file_size, pos, count, out, header.bigtiff,
                header.header_end, monotonic, _TYPE_SIZE,
            )
            if streamed and count > before:  # keep the descriptions passed over
                d_start, d_stop = _description_ranges(out[before:count])
                inside = (d_stop > d_start) & (d_start >= buf_start) & \
                    (d_stop <= buf_start + buf.shape[0])
                source.keep(d_start[inside], d_stop[inside], buf, buf_start)
                if count >= 2:
                    # frames so large that streaming moves more bytes than round trips cost
                    # time (big TIFF pages): read IFD by IFD from here on
                    stride = (out[count - 1, C_IFD] - out[0, C_IFD]) / (count - 1)
                    streamed = stride <= source.walk_stride_limit
                    if not streamed:
                        streamer.cancel()
            if status == S_FULL:
                out = np.concatenate([out, np.empty_like(out)])
                continue
            if status == S_MORE:
                if whole is not None:
                    # a memory map is walked through windows (views, no copies), dropping the
                    # pages of each finished window so the RSS stays bounded on huge files
                    source.release()
                    size = max(MAP_WINDOW, int(detail))
                    buf, buf_start = whole[pos : pos + size], pos
                elif streamed:
                    # prefetch once the frame spacing is known to suit streaming
                    buf, buf_start, n_windows = streamer.advance(
                        buf, buf_start, pos, int(detail), n_windows, prefetch=count >= 2)
                else:
                    size = max(source.ifd_window, int(detail))
                    buf = np.frombuffer(source.read(pos, size), dtype=np.uint8)
                    buf_start = pos
                continue
            return out[:count].copy(), int(status), int(pos), int(detail)


class _Streamer:
    """Consecutive windows of a remote file for the walk, the next batches in flight.

    While the walk decodes one batch of windows, the next ``source.walk_depth``
    batches (each up to ``source.walk_inflight`` windows, growing from one) are
    already being fetched, so round trips overlap with transfer instead of adding
    up. A batch arrives as one array (``source.fetch_consecutive``), which the walk
    reads in place.
    """

    def __init__(self, source: ByteSource, file_size: int) -> None:
        self.source = source
        self.file_size = file_size
        self.pending: list[tuple[int, int, Any]] = []  # (start, stop, future), in order
        self.pool: Any = None

    def __enter__(self) -> _Streamer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()
        if self.pool is not None:
            self.pool.shutdown(wait=True)

    def cancel(self) -> None:
        """Forget the batches in flight (their bytes are not needed)."""
        for p in self.pending:
            p[2].cancel()
        self.pending = []

    def _fetch(self, start: int, stop: int) -> np.ndarray:
        data = self.source.fetch_consecutive(start, stop)
        if len(data) < stop - start:  # asking again would get no more: not a retry
            end = start + len(data)
            raise SiffFormatError(self.source.name, f"the file ends at byte {end}, before "
                                  f"the {self.file_size} bytes it had when opened: it was "
                                  "truncated or replaced while being read", end)
        return data

    def advance(self, buf: np.ndarray, buf_start: int, pos: int, need: int, n: int,
                prefetch: bool = True) -> tuple[np.ndarray, int, int]:
        """Return ``(buf, buf_start, n)``: bytes from ``pos`` holding at least ``need``.

        With ``prefetch``, the batches after it are requested at once.
        """
        w = self.source.walk_window
        buf_stop = buf_start + buf.shape[0]
        p = self.pending[0] if self.pending else None
        if p is not None and p[0] == buf_stop and buf_start <= pos < p[1]:
            self.pending.pop(0)
            data = p[2].result()
            if pos >= p[0]:
                new = data[pos - p[0]:]
            else:  # the IFD straddles the two batches
                new = np.concatenate([buf[pos - buf_start:], data])
            nxt = self.pending[-1][1] if self.pending else p[1]
        else:  # first batch, or the chain jumped: fetch synchronously
            self.cancel()
            stop = min(max(pos + n * w, pos + need), self.file_size)
            new = self._fetch(pos, stop)
            nxt = stop
        if new.shape[0] < need and pos + new.shape[0] < self.file_size:
            self.cancel()  # an IFD larger than the batch: rare, fetch the rest now
            more = self._fetch(pos + new.shape[0], min(pos + need, self.file_size))
            new = np.concatenate([new, more])
            nxt = pos + new.shape[0]
        depth = self.source.walk_depth
        while prefetch and len(self.pending) < depth and nxt < self.file_size:
            n = min(2 * n, self.source.walk_inflight)
            if self.pool is None:
                from concurrent.futures import ThreadPoolExecutor

                self.pool = ThreadPoolExecutor(depth, thread_name_prefix="siff-walk")
            stop = min(nxt + n * w, self.file_size)
            self.pending.append((nxt, stop, self.pool.submit(self._fetch, nxt, stop)))
            nxt = stop
        return new, pos, n


def _description_ranges(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Byte range ``[start, stop)`` of each walked frame's description (empty if none).

    A TIFF page's or an inline description's length is its tag count; a ``.siff``
    description runs up to the frame's data (its count image, when compressed).
    """
    desc_off = table[:, C_DESC_OFF]
    has_desc = desc_off >= 0
    tiff = table[:, C_SIFF] == -1
    image = np.where(table[:, C_SIFF] == 1, 2 * table[:, C_WIDTH] * table[:, C_HEIGHT], 0)
    data_start = table[:, C_STRIP_OFF] - image
    length = np.where(tiff | (table[:, C_DESC_INLINE] == 1), table[:, C_DESC_COUNT],
                      data_start - desc_off)
    start = np.where(has_desc, desc_off, 0)
    return start, start + np.where(has_desc, length, 0)


def _unread_tail(ifd: np.ndarray, data_start: np.ndarray, data_end: np.ndarray,
                 desc_end: np.ndarray, file_size: int) -> int:
    """Bytes of the file after the last byte any indexed frame uses (0: nothing unread)."""
    if ifd.size == 0:
        return 0
    end = max(int(data_end.max()), int(desc_end.max()), int(ifd.max()), int(data_start.max()))
    return max(0, int(file_size) - end)


def unread_bytes(index: FrameIndex, file_size: int) -> int:
    """Count the bytes after the last frame of ``index`` (0 for a whole file).

    They are a frame cut off mid-write, or frames that a broken IFD chain does not
    reach.
    """
    image = np.where(index.encoding == ENC_COMPRESSED, 2 * index.height * index.width, 0)
    return _unread_tail(index.ifd_offset, index.strip_offset - image,
                        index.strip_offset + index.strip_bytes,
                        index.desc_offset + index.desc_length, file_size)


def build_frame_index(source: ByteSource, header: FileHeader) -> FrameIndex:
    """Walk the IFD chain of ``source`` and validate every frame's layout.

    Raises
    ------
    SiffFormatError
        For out-of-range or cyclic IFD offsets, unknown tag types, missing
        required tags, invalid compression flags and data blocks that do not
        fit the file. A cut-off last frame is dropped (see :func:`unread_bytes`).

    """
    name = source.name
    table, status, pos, detail = _walk_table(source, header)
    if status == S_INTO_HEADER:
        raise SiffFormatError(name, "IFD offset points into the file header", pos, len(table))
    if status == S_TOO_MANY:
        raise SiffFormatError(name, f"IFD claims {detail % 2**64} entries; file is corrupt", pos,
                              len(table))
    if status == S_BAD_TYPE:
        raise SiffFormatError(name, f"IFD entry has unknown TIFF field type {detail}", pos,
                              len(table))
    if status == S_CYCLE:
        raise SiffFormatError(name, "IFD chain loops back to an earlier IFD", pos, len(table))
    truncated = status in (S_TRUNC, S_ZERO_IFD)
    if truncated and len(table) == 0:
        raise SiffFormatError(
            name, "no complete frame: the file ends (or holds only zeros) where the first IFD "
            "should be", pos)

    n = len(table)
    width, height = table[:, C_WIDTH], table[:, C_HEIGHT]
    strip_off, strip_bytes = table[:, C_STRIP_OFF], table[:, C_STRIP_BYTES]
    siff = table[:, C_SIFF]
    for col, tag in ((C_WIDTH, "ImageWidth (256)"), (C_HEIGHT, "ImageLength (257)"),
                     (C_STRIP_OFF, "StripOffsets (273)"), (C_STRIP_BYTES, "StripByteCounts (279)")):
        bad = np.flatnonzero(table[:, col] < 0)
        if bad.size:
            i = int(bad[0])
            raise SiffFormatError(name, f"IFD lacks the required tag {tag} (or it is invalid)",
                                  int(table[i, C_IFD]), i)
    bad = np.flatnonzero((width <= 0) | (height <= 0) | (width > 65535) | (height > 65535)
                         | (width * height > MAX_PIXELS))
    if bad.size:
        i = int(bad[0])
        raise SiffFormatError(name, f"invalid frame size {height[i]} x {width[i]}",
                              int(table[i, C_IFD]), i)
    bad = np.flatnonzero((siff != -1) & (siff != 0) & (siff != 1))
    if bad.size:
        i = int(bad[0])
        raise SiffFormatError(name, f"invalid SiffCompress flag (tag 907) value {siff[i]}; "
                              "expected 0 or 1", int(table[i, C_IFD]), i)
    encoding = np.where(siff == 1, ENC_COMPRESSED, np.where(siff == 0, ENC_RAW, ENC_TIFF))
    encoding = encoding.astype(np.int8)
    image_bytes = 2 * width * height
    data_start = np.where(encoding == ENC_COMPRESSED, strip_off - image_bytes, strip_off)

    # TIFF pages: only what ScanImage writes (one uncompressed strip of 16-bit samples)
    tiff = encoding == ENC_TIFF
    for cond, what in (
        (tiff & (table[:, C_STRIP_COUNT] != 1), "multi-strip TIFF pages are not supported"),
        (tiff & (table[:, C_COMPRESSION] > 1), "compressed TIFF pages are not supported"),
        (tiff & (table[:, C_BPS] != 16) & (table[:, C_BPS] != -1),
         "only 16-bit TIFF pages are supported"),
        (tiff & (strip_bytes < image_bytes), "TIFF page holds fewer bytes than its image"),
        (~tiff & (table[:, C_STRIP_COUNT] != 1), "photon data must be a single strip"),
        ((encoding == ENC_RAW) & (strip_bytes % 8 != 0),
         "raw photon block length is not a multiple of 8 bytes"),
        ((encoding == ENC_COMPRESSED) & (strip_bytes % 2 != 0),
         "compressed arrival-time block length is odd"),
        (data_start < header.header_end, "frame data overlaps the file header"),
    ):
        bad = np.flatnonzero(cond)
        if bad.size:
            i = int(bad[0])
            raise SiffFormatError(name, what, int(table[i, C_IFD]), i)

    # descriptions: length implied by the data that follows them (.siff) or the count (TIFF)
    has_desc = table[:, C_DESC_OFF] >= 0
    desc_off, desc_stop = _description_ranges(table)
    desc_len = desc_stop - desc_off
    bad = np.flatnonzero(has_desc & ((desc_len < 0) | (desc_off < header.header_end)))
    if bad.size:
        i = int(bad[0])
        raise SiffFormatError(name, "frame description (tag 270) lies after the frame data or "
                              "inside the header", int(table[i, C_IFD]), i)

    # data past the end of the file: allowed only for the last frame (cut-off acquisition)
    # (written without sums: offsets and lengths may each be up to 2**63 - 1)
    size = header.file_size
    past = ((strip_off > size) | (strip_bytes > size - strip_off)
            | (desc_off > size) | (desc_len > size - desc_off))
    bad = np.flatnonzero(past)
    if bad.size:
        i = int(bad[0])
        if i != n - 1:
            raise SiffFormatError(name, f"frame data runs past the end of the file "
                                  f"({header.file_size} bytes)", int(strip_off[i]), i)
        n -= 1
    sl = slice(0, n)
    n_photons = np.where(encoding == ENC_RAW, strip_bytes // 8,
                         np.where(encoding == ENC_COMPRESSED, strip_bytes // 2, 0))
    return FrameIndex(
        ifd_offset=table[sl, C_IFD].copy(),
        strip_offset=strip_off[sl].copy(),
        strip_bytes=strip_bytes[sl].copy(),
        desc_offset=desc_off[sl].copy(),
        desc_length=desc_len[sl].copy(),
        encoding=encoding[sl].copy(),
        height=height[sl].copy(),
        width=width[sl].copy(),
        n_photons=n_photons[sl].astype(np.int64),
        signed=(tiff & (table[:, C_SAMPLEFMT] == 2)).astype(np.int8)[sl].copy(),
    )
