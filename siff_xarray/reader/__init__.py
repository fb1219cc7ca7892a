"""The reader core: header, metadata, frame index, Numba kernels and ``SiffFile``.

Modules
-------
source      byte sources (memory map, file objects, fsspec range requests)
header      TIFF/BigTIFF + ScanImage header
ifd         IFD-chain walk and the per-frame index
metadata    MATLAB-literal parser, ScanImage settings, ROI JSON
frame_meta  per-frame descriptions: timestamps and events
imparams    frame bookkeeping (SiffPy-compatible frame lists)
kernels     Numba decode/reduction kernels
siff_file   the ``SiffFile`` class tying them together
index_cache persistent cache of frame indices and timestamps
acquisition the parts of a split acquisition as one frame sequence
"""

from ..format.imparams import ImParams
from .siff_file import SiffFile

__all__ = ["ImParams", "SiffFile"]
