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

from typing import TYPE_CHECKING

from ._lazy import after_import, lazy_getattr
from ._progress import Step, set_progress
from ._version import __version__
from .errors import (
    ConversionError,
    IncompleteStoreError,
    MissingChunkError,
    SiffFormatError,
    SiffWarning,
)

__all__ = [
    "ConversionError", "ImParams", "IncompleteStoreError", "MissingChunkError", "SiffFile",
    "SiffFormatError", "SiffWarning", "Step", "__version__", "convert", "convert_file",
    "open_acquisition", "open_converted", "open_siff", "read_photons", "set_progress",
    "synthetic", "to_siff", "to_tiff", "verify",
]

_LAZY = {
    "SiffFile": ".reader.siff_file",
    "ImParams": ".format.imparams",
    "synthetic": ".synthetic:",
    "open_siff": ".backend.open",
    "open_acquisition": ".backend.open",
    "convert": ".store.converter",
    "convert_file": ".store.converter",
    "open_converted": ".store.read",
    "read_photons": ".store.read",
    "verify": ".store.verifier",
    "to_siff": ".store.export",
    "to_tiff": ".store.export",
}

if TYPE_CHECKING:  # pragma: no cover
    from . import synthetic
    from .backend.open import open_acquisition, open_siff
    from .format.imparams import ImParams
    from .reader.siff_file import SiffFile
    from .store.converter import convert, convert_file
    from .store.export import to_siff, to_tiff
    from .store.read import open_converted, read_photons
    from .store.verifier import verify

__getattr__ = lazy_getattr(__name__, _LAZY, globals())


def __dir__() -> list[str]:
    return sorted(__all__)


def _register_accessor() -> None:
    from . import accessor  # noqa: F401 - registers ``ds.siff`` (imports numpy, xarray)


# ``ds.siff`` exists as soon as xarray does: registered now if xarray is imported
# already, otherwise right after its import, so that importing this package (the
# command line does) does not import xarray
after_import("xarray", _register_accessor)
