"""The description scan compiled with Numba (see :mod:`.frame_meta` for what it finds).

Kept apart from :mod:`.frame_meta` so that opening a file whose timestamps are
cached does not import Numba; :mod:`.frame_meta` imports this module when it first
parses descriptions.

Import rule: numba and numpy.
"""

from __future__ import annotations

import numba
import numpy as np

#: what the compiled code takes from other modules (docs/architecture.md, Rules)
_FOREIGN_INPUTS = "e3b0c44298fc1c14"

__all__ = ["convert", "pack", "scan_descriptions"]


@numba.njit(cache=True, nogil=True)
def _parse_int(buf, s, e):
    """Exact int64 of bytes [s, e); returns (ok, value)."""
    neg = False
    if s < e and (buf[s] == 45 or buf[s] == 43):
        neg = buf[s] == 45
        s += 1
    if s >= e or e - s > 19:
        return False, 0
    v = np.int64(0)
    limit = np.int64(9223372036854775807)
    for p in range(s, e):
        d = np.int64(buf[p]) - 48
        if d < 0 or d > 9:
            return False, 0
        if v > (limit - d) // 10:
            return False, 0  # beyond int64: the general path reports it
        v = v * 10 + d
    return True, -v if neg else v


@numba.njit(cache=True, nogil=True)
def _parse_decimal(buf, s, e, p10):
    """Correctly rounded double of a plain decimal in bytes [s, e); returns (ok, value)."""
    neg = False
    if s < e and (buf[s] == 45 or buf[s] == 43):
        neg = buf[s] == 45
        s += 1
    mant = np.int64(0)
    digits = 0
    frac = 0
    seen_dot = False
    seen_digit = False
    for p in range(s, e):
        c = buf[p]
        if c == 46 and not seen_dot:
            seen_dot = True
            continue
        d = np.int64(c) - 48
        if d < 0 or d > 9:
            return False, 0.0
        seen_digit = True
        if mant == 0 and d == 0:
            if seen_dot:
                frac += 1
            continue
        digits += 1
        if digits > 15:
            return False, 0.0
        mant = mant * 10 + d
        if seen_dot:
            frac += 1
    if not seen_digit or frac > 22:
        return False, 0.0
    v = mant / p10[frac]
    return True, -v if neg else v


@numba.njit(cache=True, nogil=True)
def scan_descriptions(buf, desc_off, desc_len, keys, key_len, fvals, ivals, spans, flags):
    """One pass per description over its lines; fill values, spans and flags.

    For key ``k``: ``spans[i, k] = (start, stop)`` of the value (-1 if absent);
    ``fvals``/``ivals[i, k]`` the converted number; ``flags[i, k]`` = 1 when the
    value is present and non-empty but needs the general conversion path.
    """
    nk = keys.shape[0]
    for i in range(desc_off.shape[0]):
        for k in range(nk):
            spans[i, k, 0] = -1
            spans[i, k, 1] = -1
            flags[i, k] = 0
            fvals[i, k] = np.nan
            ivals[i, k] = -9223372036854775807 - 1
        lo = desc_off[i]
        hi = lo + desc_len[i]
        if lo < 0 or hi > buf.shape[0]:
            continue
        p = lo
        while p < hi:
            for k in range(nk):
                m = key_len[k]
                if spans[i, k, 0] >= 0 or p + m > hi:
                    continue
                ok = True
                for q in range(m):
                    if buf[p + q] != keys[k, q]:
                        ok = False
                        break
                if not ok:
                    continue
                s = p + m
                e = s
                while e < hi and buf[e] != 10 and buf[e] != 0:
                    e += 1
                while s < e and (buf[s] == 32 or buf[s] == 9):
                    s += 1
                while e > s and (buf[e - 1] == 32 or buf[e - 1] == 13 or buf[e - 1] == 9):
                    e -= 1
                spans[i, k, 0] = s
                spans[i, k, 1] = e
                break
            while p < hi and buf[p] != 10:
                p += 1
            p += 1
    return 0


@numba.njit(cache=True, nogil=True)
def convert(buf, spans, is_float, p10, fvals, ivals, flags):
    """Convert the numeric spans found by :func:`scan_descriptions` (fast exact path)."""
    for i in range(spans.shape[0]):
        for k in range(is_float.shape[0]):
            s = spans[i, k, 0]
            e = spans[i, k, 1]
            if s < 0 or e <= s:
                continue
            if is_float[k]:
                ok, v = _parse_decimal(buf, s, e, p10)
                if ok:
                    fvals[i, k] = v
                else:
                    flags[i, k] = 1
            else:
                ok, iv = _parse_int(buf, s, e)
                if ok:
                    ivals[i, k] = iv
                else:
                    flags[i, k] = 1


@numba.njit(cache=True, nogil=True)
def pack(buf, starts, stops, width, out):
    """Copy each span ``buf[starts[i]:stops[i]]`` (at most ``width`` bytes) into ``out[i]``."""
    for i in range(starts.shape[0]):
        n = stops[i] - starts[i]
        for k in range(min(n, width)):
            out[i, k] = buf[starts[i] + k]
