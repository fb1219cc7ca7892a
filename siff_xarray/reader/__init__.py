"""The reader core: header, metadata, frame index, Numba kernels and ``SiffFile``.

Importing it does not import Numba: the modules that hold compiled code (``ifd_walk``,
``frame_meta_scan``, ``kernels``) are imported the first time one of their functions
runs, so opening a file whose index is cached, its metadata and a first frame cost no
Numba start-up.

Modules
-------
source      byte sources (memory map, file objects, fsspec range requests)
header      TIFF/BigTIFF + ScanImage header
ifd         the per-frame index and the walk's driver (no Numba)
ifd_walk    the IFD-chain walk, compiled with Numba (imported when a walk runs)
metadata    MATLAB-literal parser, ScanImage settings, ROI JSON
frame_meta  per-frame descriptions: timestamps and events (no Numba)
frame_meta_scan  the compiled scan of many descriptions (imported when one runs)
imparams    frame bookkeeping (SiffPy-compatible frame lists)
decode      the kernels' calling convention and statuses, ``run``, and the NumPy
            path of a process's first small intensity reads (no Numba)
kernels     Numba decode/reduction kernels (imported when a compiled kernel runs)
siff_file   the ``SiffFile`` class tying them together
index_cache persistent cache of frame indices and timestamps
acquisition the parts of a split acquisition as one frame sequence
"""

from ..format.imparams import ImParams
from .siff_file import SiffFile

__all__ = ["ImParams", "SiffFile"]
