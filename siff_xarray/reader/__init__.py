"""The reader core: header, metadata, frame index, Numba kernels and ``SiffFile``.

Modules
-------
source      byte sources (memory map, file objects / fsspec byte ranges)
header      TIFF/BigTIFF + ScanImage header
ifd         IFD-chain walk and the per-frame index
metadata    MATLAB-literal parser, ScanImage settings, ROI JSON
frame_meta  per-frame descriptions: timestamps and events
imparams    frame bookkeeping (SiffPy-compatible frame lists)
kernels     Numba decode/reduction kernels
siff_file   the ``SiffFile`` class tying them together
"""

from .imparams import ImParams
from .siff_file import SiffFile

__all__ = ["ImParams", "SiffFile"]
