"""The IFD walk compiled with Numba (see :mod:`.ifd` for the table it fills).

Kept apart from :mod:`.ifd` so that opening a file whose frame index is cached, or
reading a few descriptions, does not import Numba; :mod:`.ifd` imports this module
when a walk runs.

Import rule: numba, numpy and :mod:`.ifd`'s constants.
"""

from __future__ import annotations

import os

import numba
import numpy as np
from numba import types

from ..format import constants as C
from .ifd import (
    C_BPS,
    C_COMPRESSION,
    C_DESC_COUNT,
    C_DESC_INLINE,
    C_DESC_OFF,
    C_HEIGHT,
    C_IFD,
    C_NEXT,
    C_SAMPLEFMT,
    C_SIFF,
    C_STRIP_BYTES,
    C_STRIP_COUNT,
    C_STRIP_OFF,
    C_WIDTH,
    MAX_ENTRIES,
    N_COLS,
    S_BAD_TYPE,
    S_CYCLE,
    S_END,
    S_FULL,
    S_INTO_HEADER,
    S_IO,
    S_MORE,
    S_TOO_MANY,
    S_TRUNC,
    S_ZERO_IFD,
)

#: what the compiled code takes from other modules (docs/architecture.md, Rules)
_FOREIGN_INPUTS = "945057ff9bef5dd1"

__all__ = ["pread_gather", "walk", "walk_fd"]


@numba.njit(cache=True, nogil=True)
def _uint(buf, pos, nbytes):
    """Little-endian unsigned integer of 1, 2, 4 or 8 bytes at ``pos`` (caller checks bounds).

    Values of 2**63 and more come out negative; callers treat those as invalid.
    """
    v = np.int64(buf[pos])
    if nbytes >= 2:
        v |= np.int64(buf[pos + 1]) << 8
    if nbytes >= 4:
        v |= (np.int64(buf[pos + 2]) << 16) | (np.int64(buf[pos + 3]) << 24)
    if nbytes == 8:
        v |= ((np.int64(buf[pos + 4]) << 32) | (np.int64(buf[pos + 5]) << 40)
              | (np.int64(buf[pos + 6]) << 48) | (np.int64(buf[pos + 7]) << 56))
    return v


@numba.njit(cache=True, nogil=True)
def walk(buf, buf_start, file_size, pos, count, out, bigtiff, header_end, monotonic, type_size):
    """Walk IFDs starting at file offset ``pos`` while they lie inside ``buf``.

    Returns ``(status, pos, count, monotonic, detail)``; ``out[:count]`` holds
    one row per frame (see the ``C_*`` columns).
    """
    osz = 8 if bigtiff else 4
    cnt_sz = 8 if bigtiff else 2
    ent_sz = 20 if bigtiff else 12
    buf_end = buf_start + buf.shape[0]
    while pos != 0:
        if pos < header_end:
            return S_INTO_HEADER, pos, count, monotonic, 0
        # comparisons are written so that no sum can overflow: pos may be up to 2**63 - 1
        if pos > file_size - cnt_sz:
            return S_TRUNC, pos, count, monotonic, 0
        if pos < buf_start or pos > buf_end - cnt_sz:
            return S_MORE, pos, count, monotonic, cnt_sz
        n = _uint(buf, pos - buf_start, cnt_sz)
        if n == 0:
            return S_ZERO_IFD, pos, count, monotonic, 0
        if n < 0 or n > MAX_ENTRIES:  # negative: an 8-byte count of 2**63 or more
            return S_TOO_MANY, pos, count, monotonic, n
        size = cnt_sz + n * ent_sz + osz
        if pos > file_size - size:
            return S_TRUNC, pos, count, monotonic, 0
        if pos > buf_end - size:
            return S_MORE, pos, count, monotonic, size
        # cycle check: offsets normally increase strictly; otherwise search earlier ones
        if count > 0 and pos <= out[count - 1, C_IFD]:
            if monotonic:
                lo, hi = 0, count
                while lo < hi:
                    mid = (lo + hi) // 2
                    if out[mid, C_IFD] < pos:
                        lo = mid + 1
                    else:
                        hi = mid
                if lo < count and out[lo, C_IFD] == pos:
                    return S_CYCLE, pos, count, monotonic, 0
                monotonic = False
            else:
                for k in range(count):
                    if out[k, C_IFD] == pos:
                        return S_CYCLE, pos, count, monotonic, 0
        elif not monotonic:
            for k in range(count):
                if out[k, C_IFD] == pos:
                    return S_CYCLE, pos, count, monotonic, 0
        if count >= out.shape[0]:
            return S_FULL, pos, count, monotonic, 0
        for col in range(N_COLS):
            out[count, col] = -1
        out[count, C_IFD] = pos
        out[count, C_STRIP_COUNT] = 0
        out[count, C_DESC_INLINE] = 0
        base = pos - buf_start + cnt_sz
        for e in range(n):
            ep = base + e * ent_sz
            tag = _uint(buf, ep, 2)
            typ = _uint(buf, ep + 2, 2)
            if typ >= type_size.shape[0] or type_size[typ] == 0:
                return S_BAD_TYPE, pos, count, monotonic, typ
            tcount = _uint(buf, ep + 4, osz)
            vpos = ep + 4 + osz
            tsz = type_size[typ]
            inline = tcount >= 0 and tcount <= osz // tsz
            value = _uint(buf, vpos, min(tsz, 8)) if inline else _uint(buf, vpos, osz)
            if tag == C.TAG_IMAGE_WIDTH:
                out[count, C_WIDTH] = value
            elif tag == C.TAG_IMAGE_LENGTH:
                out[count, C_HEIGHT] = value
            elif tag == C.TAG_BITS_PER_SAMPLE:
                out[count, C_BPS] = value if tcount == 1 else -2
            elif tag == C.TAG_COMPRESSION:
                out[count, C_COMPRESSION] = value
            elif tag == C.TAG_IMAGE_DESCRIPTION:
                out[count, C_DESC_COUNT] = tcount
                if typ == 2 and inline:
                    out[count, C_DESC_OFF] = vpos + buf_start
                    out[count, C_DESC_INLINE] = 1
                else:
                    out[count, C_DESC_OFF] = _uint(buf, vpos, osz)
            elif tag == C.TAG_STRIP_OFFSETS:
                out[count, C_STRIP_OFF] = value
                out[count, C_STRIP_COUNT] = tcount
            elif tag == C.TAG_STRIP_BYTE_COUNTS:
                out[count, C_STRIP_BYTES] = value
            elif tag == C.TAG_SAMPLE_FORMAT:
                out[count, C_SAMPLEFMT] = value
            elif tag == C.TAG_SIFF_COMPRESS:
                out[count, C_SIFF] = value
        nxt = _uint(buf, base + n * ent_sz, osz)
        out[count, C_NEXT] = nxt
        count += 1
        pos = nxt
    return S_END, pos, count, monotonic, 0


if os.name == "posix":
    # libc's pread, called by name from compiled code (so the kernel stays cacheable)
    _pread = types.ExternalFunction("pread", types.int64(types.intc, types.uintp, types.uintp,
                                                         types.int64))

    @numba.njit(cache=True, nogil=True)
    def walk_fd(fd, scratch, file_size, pos, count, out, bigtiff, header_end, monotonic,
                 type_size):
        """Walk IFDs reading each with ``pread`` into ``scratch`` (no memory map).

        Returns as :func:`walk`; ``S_MORE`` only when an IFD is larger than
        ``scratch`` (the caller grows it), ``S_IO`` when a read fails.
        """
        buf_start = 0
        n_buf = 0
        while True:
            status, pos, count, monotonic, detail = walk(
                scratch[:n_buf], buf_start, file_size, pos, count, out, bigtiff, header_end,
                monotonic, type_size)
            if status != S_MORE:
                return status, pos, count, monotonic, detail
            size = max(scratch.shape[0], detail)
            if size > scratch.shape[0]:
                return S_MORE, pos, count, monotonic, size
            want = min(size, file_size - pos)
            got = _pread(np.intc(fd), scratch.ctypes.data, want, pos)
            if got < 0:
                return S_IO, pos, count, monotonic, 0
            if got < want:  # the file shrank under us: walk what is there
                file_size = pos + got
            buf_start = pos
            n_buf = got


    @numba.njit(cache=True, nogil=True)
    def pread_gather(fd, starts, lengths, base, out):
        """Read ``lengths[i]`` bytes at ``starts[i]`` into ``out[base[i]:]``.

        Returns the index of the first short or failed read, or -1.
        """
        for i in range(starts.shape[0]):
            n = lengths[i]
            if n <= 0:
                continue
            got = _pread(np.intc(fd), out[base[i]:].ctypes.data, n, starts[i])
            if got != n:
                return i
        return -1
