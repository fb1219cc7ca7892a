"""siff-xarray: ScanImage-FLIM ``.siff`` photon data for xarray, Zarr and Dask.

Importing the package is cheap: the reader (and with it Numba) is imported on
first use of :class:`SiffFile` and friends, because xarray imports every
installed backend's entry point when it lists engines.

Public API
----------
SiffFile
    Low-level reader of ``.siff`` and ScanImage TIFF files (frames, histograms,
    masks, lifetimes, phasors, photons, timestamps).
ImParams
    Frame bookkeeping (channels, slices, flyback, SiffPy-style frame lists).
SiffFormatError, SiffWarning
    Errors and warnings about file content.
open_siff, open_acquisition
    One file, or the numbered files of one acquisition, as a lazy xarray Dataset
    (``xr.open_dataset(path, engine="siff")`` is ``open_siff``).
convert, verify, open_converted, read_photons
    Lossless, parallel, resumable conversion to Zarr v3, its check, and reading
    the result (``read_photons`` reads one frame's photons from either form).
synthetic
    Writer of synthetic ScanImage-FLIM files with ground truth.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from . import accessor  # noqa: F401 - registers ``ds.siff`` (imports only numpy, xarray)
from .errors import ConversionError, IncompleteStoreError, SiffFormatError, SiffWarning

__version__ = "0.1.0.dev0"

__all__ = [
    "ConversionError", "ImParams", "IncompleteStoreError", "SiffFile", "SiffFormatError",
    "SiffWarning", "__version__", "convert", "open_acquisition", "open_converted", "open_siff",
    "read_photons", "synthetic", "verify",
]

_LAZY = {
    "SiffFile": ("siff_xarray.reader.siff_file", "SiffFile"),
    "ImParams": ("siff_xarray.reader.imparams", "ImParams"),
    "synthetic": ("siff_xarray.synthetic", None),
    "open_siff": ("siff_xarray.backend", "open_siff"),
    "open_acquisition": ("siff_xarray.backend", "open_acquisition"),
    "convert": ("siff_xarray.zarr_store", "convert"),
    "open_converted": ("siff_xarray.zarr_store", "open_converted"),
    "read_photons": ("siff_xarray.zarr_store", "read_photons"),
    "verify": ("siff_xarray.zarr_store", "verify"),
}

if TYPE_CHECKING:  # pragma: no cover
    from . import synthetic
    from .backend import open_acquisition, open_siff
    from .reader.imparams import ImParams
    from .reader.siff_file import SiffFile
    from .zarr_store import convert, open_converted, read_photons, verify


def __getattr__(name: str) -> Any:
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'siff_xarray' has no attribute {name!r}") from None
    mod = import_module(module)
    value = mod if attr is None else getattr(mod, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
