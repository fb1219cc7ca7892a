"""glibc's mmap threshold in worker processes whose environment fixed it.

glibc serves a block of at least the *mmap threshold* with a fresh mapping of its
own, which the kernel zeroes and maps page by page on first touch and which goes
back to the system when freed. The threshold starts at 128 KiB and rises (up to
32 MiB) as the process frees such blocks, so a process that keeps allocating
buffers of a few MiB soon reuses its heap instead. Setting any of
``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_`` or ``MALLOC_MMAP_MAX_`` (or their
``GLIBC_TUNABLES``) turns that adjustment off and leaves the threshold at 128 KiB,
and dask.distributed's nanny starts every worker with
``MALLOC_TRIM_THRESHOLD_=65536``, to hand freed memory back sooner.

A conversion allocates and frees buffers of a few hundred KiB to a few MiB all
the time (zarr's chunks and their compressed bytes, the decoder's arrays): with
the threshold fixed, the benchmark file's conversion took 1.33 million page faults
and 5.5 s instead of 18 thousand and 2.6 s (threads in one process; on a
``LocalCluster`` worker 5.3 s against 2.7 s with the threaded scheduler). Raising
the mmap threshold alone left 3.0-3.5 s and about 180 thousand faults: the
64 KiB trim threshold then hands the heap's top back after every large free.

So while a conversion runs in such a process (:func:`raise_thresholds`, by each batch), both
are set as glibc's dynamic adjustment would grow them (mmap threshold 32 MiB, trim
threshold 64 MiB), and when the process's last conversion ends (:func:`restore_thresholds`)
the environment's values come back and ``malloc_trim(0)`` hands the free memory
back, as the worker's settings meant. An environment that sets
``MALLOC_MMAP_THRESHOLD_`` (or ``glibc.malloc.mmap_threshold``) chose its
threshold: it is left alone.

Import rule: the standard library only.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading
from collections.abc import Mapping
from typing import Any

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "fixed_mmap_threshold", "raise_thresholds",
           "restore_thresholds"]

log = logging.getLogger("siff_xarray")

#: thresholds while a conversion runs: glibc's largest dynamic ones on 64-bit systems
MMAP_THRESHOLD = 32 * 2**20
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
_DEFAULT = 128 * 2**10  # glibc's starting mmap threshold and its default trim threshold
#: variables (and tunables) that turn glibc's dynamic threshold off
_FIXING = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
_FIXING_TUNABLES = ("glibc.malloc.trim_threshold", "glibc.malloc.top_pad",
                    "glibc.malloc.mmap_max")

_lock = threading.Lock()
_holders: set[str] = set()
#: whether the thresholds are raised now, and how often they were (tests)
tuned = False
times_tuned = 0


def fixed_mmap_threshold(environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``environ`` (default: this process's) fixed glibc's threshold at 128 KiB.

    True where it sets a variable that turns the dynamic threshold off and does
    not set the threshold itself.
    """
    env = os.environ if environ is None else environ
    tunables = env.get("GLIBC_TUNABLES", "")
    if "MALLOC_MMAP_THRESHOLD_" in env or "glibc.malloc.mmap_threshold" in tunables:
        return False
    return any(k in env for k in _FIXING) or any(t in tunables for t in _FIXING_TUNABLES)


def _trim_threshold(environ: Mapping[str, str]) -> int:
    """Return the trim threshold ``environ`` sets (glibc's default where it sets none)."""
    given = environ.get("MALLOC_TRIM_THRESHOLD_")
    for item in environ.get("GLIBC_TUNABLES", "").split(":"):
        name, _, value = item.partition("=")
        if name == "glibc.malloc.trim_threshold" and given is None:
            given = value
    try:
        return int(given, 0) if given is not None else _DEFAULT
    except ValueError:
        return _DEFAULT


def _libc() -> Any | None:
    """Return the C library with glibc's ``mallopt`` and ``malloc_trim`` (None if not glibc)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (AttributeError, OSError):
        return None
    return libc


def raise_thresholds(key: str) -> bool:
    """Raise the thresholds while ``key`` (a conversion run) runs, where the environment fixed them.

    Returns whether they are raised. Holding a key held already changes nothing.
    """
    global tuned, times_tuned
    with _lock:
        _holders.add(key)
        if not tuned and fixed_mmap_threshold():
            libc = _libc()
            if libc is not None and libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1:
                libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
                tuned, times_tuned = True, times_tuned + 1
                log.debug("process %d: glibc's mmap and trim thresholds raised while "
                          "conversions run", os.getpid())
        return tuned


def restore_thresholds(key: str) -> None:
    """``key`` ended; after the last one, restore the environment's thresholds and trim."""
    global tuned
    with _lock:
        _holders.discard(key)
        if tuned and not _holders:
            libc = _libc()
            if libc is not None:
                libc.mallopt(_M_MMAP_THRESHOLD, _DEFAULT)
                libc.mallopt(_M_TRIM_THRESHOLD, _trim_threshold(os.environ))
                libc.malloc_trim(0)
            tuned = False
