"""The decode kernels' calling convention, and a NumPy path that needs no Numba.

Every decode kernel (:mod:`.kernels`, compiled with Numba) takes the same leading
arguments (:data:`FRAME_ARGS`) and reports problems per frame in a ``status`` array
(``ST_*``). This module holds that convention and :func:`run`, through which the
reader calls every kernel. Importing it does not import Numba: the kernels module
is imported, and Numba with it (~0.15 s, and 0.3-0.5 s more for its first call in
a process), only when a compiled kernel runs. A process's first few small
intensity reads run :func:`intensity_few`, a vectorised NumPy copy of the
intensity kernel's semantics, so opening a file and looking at a frame or its
metadata (``siff-xarray info``) never loads Numba.

Import rule: numpy, ``format`` and :mod:`.kernels` (only inside :func:`run`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..format.constants import ENC_COMPRESSED, ENC_RAW, ENC_TIFF

__all__ = [
    "FEW_CALLS", "FEW_FRAMES", "FRAME_ARGS", "MODE_CLIP", "MODE_DROP", "MODE_WRAP",
    "ST_BAD_PIXEL", "ST_MISMATCH", "ST_OK", "ST_OUT_OF_BOUNDS", "ST_SATURATED", "in_bounds",
    "intensity_few", "run",
]

ST_OK = 0
ST_BAD_PIXEL = 1  #: a raw photon's (y, x) lies outside the frame
ST_MISMATCH = 2  #: compressed count image disagrees with the arrival-time block
ST_OUT_OF_BOUNDS = 3  #: frame data outside the buffer
ST_SATURATED = 4  #: a pixel holds more than 65535 photons (uint16 output saturated)

MODE_DROP, MODE_CLIP, MODE_WRAP = 0, 1, 2
#: every kernel's leading arguments: the byte buffer, then per frame its encoding, strip
#: offset, strip bytes, height, width and shift (y, x)
FRAME_ARGS = 8

#: at most this many frames' intensity is decoded by :func:`intensity_few` (NumPy)...
FEW_FRAMES = 4
#: ... in the first calls of a process, before any compiled kernel ran: from this many
#: small reads on, a process that reads many (Dask tasks of single frames, a viewer)
#: pays Numba's start-up once and gets the kernel, 2-9x faster per call
FEW_CALLS = 16
_few_calls_left = [FEW_CALLS]


def in_bounds(buf: np.ndarray, enc: int, off: int, nbytes: int, h: int, w: int) -> bool:
    """Return whether a frame's bytes lie inside ``buf`` (no sum can overflow int64).

    Plain Python that :mod:`.kernels` compiles for its kernels' prologue, so the
    check is written once for both paths. (Numba's on-disk cache of a kernel does not
    notice edits to a function in another file: after changing this one, the
    architecture test asks for a new ``kernels._FOREIGN_INPUTS``, whose edit makes
    Numba recompile.)
    """
    if h < 0 or w < 0 or h > 65535 or w > 65535 or nbytes < 0:
        return False
    image = 2 * h * w
    start = off - image if enc == ENC_COMPRESSED else off
    length = image if enc == ENC_TIFF else nbytes
    return start >= 0 and off <= buf.shape[0] and length <= buf.shape[0] - off


def intensity_few(buf: np.ndarray, enc: np.ndarray, off: np.ndarray, nb: np.ndarray,
                  hh: np.ndarray, ww: np.ndarray, sy: np.ndarray, sx: np.ndarray,
                  out: np.ndarray, status: np.ndarray) -> None:
    """NumPy twin of the intensity kernel for a few frames: no compiled code runs.

    A process's first call of any compiled kernel costs Numba's start-up (~0.3-0.5 s:
    its registries, and a ``scipy.linalg`` import to look for BLAS), which a first
    look at one frame need not pay: this vectorised copy of the kernel's semantics
    (the same bounds check, :func:`in_bounds`; the same status per frame; the same
    saturation at 65535 and the same partial counts before a bad record) serves
    intensity reads of up to :data:`FEW_FRAMES` frames until a compiled kernel has
    run or :data:`FEW_CALLS` such reads were made. A test compares it with the
    kernel on valid and damaged frames of every encoding.
    """
    for i in range(enc.shape[0]):
        e, o, n = int(enc[i]), int(off[i]), int(nb[i])
        h, w, dy, dx = int(hh[i]), int(ww[i]), int(sy[i]), int(sx[i])
        if not in_bounds(buf, e, o, n, h, w):
            status[i] = ST_OUT_OF_BOUNDS
            continue
        row = out[i]
        if e == ENC_RAW:
            rec = buf[o : o + 8 * (n // 8)].view(np.uint64)
            y = (rec >> np.uint64(48)).astype(np.int64)
            x = ((rec >> np.uint64(32)) & np.uint64(0xFFFF)).astype(np.int64)
            bad = np.flatnonzero((y >= h) | (x >= w))
            k = int(bad[0]) if bad.size else rec.shape[0]
            q = (y[:k] + dy) % h * w + (x[:k] + dx) % w
            counts = np.bincount(q, minlength=h * w)
            st = ST_BAD_PIXEL if bad.size else ST_OK
            if counts.size and counts.max() > 65535:
                np.minimum(counts, 65535, out=counts)
                st = st if bad.size else ST_SATURATED
            row[:] = counts
            status[i] = st
            continue
        start = o - 2 * h * w if e == ENC_COMPRESSED else o
        img = buf[start : start + 2 * h * w].view(np.uint16)
        if e == ENC_COMPRESSED and 2 * int(img.sum(dtype=np.int64)) != n:
            status[i] = ST_MISMATCH
            continue
        row[:] = np.roll(img.reshape(h, w), (dy, dx), axis=(0, 1)).reshape(-1)
        status[i] = ST_OK


def run(name: str, *args: Any) -> None:
    """Run decode kernel ``name`` with its arguments (see :mod:`.kernels`).

    A process's first few small intensity reads run :func:`intensity_few`; every
    other call runs the compiled kernel (importing Numba on the first).
    """
    if name == "intensity" and len(args[1]) <= FEW_FRAMES and _few_calls_left[0] > 0:
        _few_calls_left[0] -= 1
        intensity_few(*args)
        return
    _few_calls_left[0] = 0  # compiled code is loaded now: it is faster from here on
    from . import kernels

    kernels.run_compiled(name, *args)
