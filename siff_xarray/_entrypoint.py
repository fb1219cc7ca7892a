"""The xarray backend entry point (``engine="siff"``): thin on purpose.

xarray imports every installed backend's entry point the first time it lists
engines, so this module imports nothing heavy (no Numba, Dask, Zarr or the
reader): :meth:`SiffBackendEntrypoint.open_dataset` imports
:mod:`siff_xarray.backend` on first use and delegates to
:func:`siff_xarray.backend.open_siff`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from xarray.backends import BackendEntrypoint

__all__ = ["SiffBackendEntrypoint", "looks_like_siff"]

_SUFFIXES = (".siff",)
_SCANIMAGE_MAGIC = (117637889).to_bytes(4, "little")


def looks_like_siff(head: bytes) -> bool:
    """Tell whether ``head`` (the first 20 bytes of a file) starts a ScanImage (FLIM) TIFF.

    Little-endian BigTIFF (``II+``) or classic TIFF (``II*``) whose bytes after
    the first-IFD offset carry ScanImage's header magic number.
    """
    if head[:4] == b"II+\x00":
        return head[16:20] == _SCANIMAGE_MAGIC
    if head[:4] == b"II*\x00":
        return head[8:12] == _SCANIMAGE_MAGIC
    return False


def _is_remote(path: str) -> bool:
    return "://" in path or "::" in path


class SiffBackendEntrypoint(BackendEntrypoint):
    """Open ScanImage-FLIM ``.siff`` and ScanImage ``.tif`` files as lazy Datasets.

    See :func:`siff_xarray.open_siff` for the parameters and the Dataset layout.
    """

    description = "Open ScanImage-FLIM .siff (and ScanImage TIFF) files with siff-xarray"
    url = "https://github.com/siff-xarray/siff-xarray"
    open_dataset_parameters = (
        "filename_or_obj", "drop_variables", "decode_times", "flim", "partial_volume",
        "histogram_mode", "tau_bins", "bin_width_ps", "base_resolution_ps", "storage_options",
        "lock", "chunk_bytes", "index_cache",
    )

    def open_dataset(  # type: ignore[override]
        self,
        filename_or_obj: Any,
        *,
        drop_variables: str | Iterable[str] | None = None,
        decode_times: bool = True,
        flim: bool = False,
        partial_volume: str = "keep",
        histogram_mode: str = "drop",
        tau_bins: int | None = None,
        bin_width_ps: float | None = None,
        base_resolution_ps: float = 5.0,
        storage_options: dict[str, Any] | None = None,
        lock: Any = None,
        chunk_bytes: int = 16 * 2**20,
        index_cache: Any = None,
    ) -> Any:
        """Open a ``.siff`` file; see :func:`siff_xarray.open_siff`."""
        from .backend import open_siff

        return open_siff(
            filename_or_obj, drop_variables=drop_variables, decode_times=decode_times,
            flim=flim,
            partial_volume=partial_volume, histogram_mode=histogram_mode, tau_bins=tau_bins,
            bin_width_ps=bin_width_ps, base_resolution_ps=base_resolution_ps,
            storage_options=storage_options, lock=lock, chunk_bytes=chunk_bytes,
            index_cache=index_cache,
        )

    def guess_can_open(self, filename_or_obj: Any) -> bool:
        """Recognise ScanImage (FLIM) files by magic bytes, or remote ``.siff`` by suffix.

        Never raises: anything unexpected means "not ours".
        """
        try:
            if isinstance(filename_or_obj, (str, os.PathLike)):
                path = os.fspath(filename_or_obj)
                if isinstance(path, bytes):
                    return False
                lower = path.lower()
                if _is_remote(path) and not lower.startswith("file://"):
                    return lower.endswith(_SUFFIXES)
                if lower.startswith("file://"):
                    path = path[len("file://"):]
                if not os.path.isfile(path):
                    return False
                with open(path, "rb") as fh:
                    return looks_like_siff(fh.read(20))
            read, seek, tell = (getattr(filename_or_obj, k, None) for k in ("read", "seek",
                                                                            "tell"))
            if read is None or seek is None or tell is None:
                return False
            pos = tell()
            try:
                seek(0)
                head = read(20)
            finally:
                seek(pos)
            return isinstance(head, bytes) and looks_like_siff(head)
        except Exception:
            return False
