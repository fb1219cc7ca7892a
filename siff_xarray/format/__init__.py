"""The ``.siff`` format, without Numba: constants, header, metadata, frame bookkeeping, writer.

Modules
-------
constants   tag numbers, magic number, frame encodings, file sniffing
header      TIFF/BigTIFF preamble + ScanImage header block
metadata    MATLAB-literal parser, ScanImage settings, ROI-group JSON
imparams    frame bookkeeping (SiffPy-compatible frame lists and shapes)
writer      ``SiffWriter``: writes ``.siff`` and ScanImage TIFF files

Import rule: this package imports only the standard library, numpy and
:mod:`siff_xarray.errors`; it never imports the reader, Numba, xarray or Zarr.
"""
