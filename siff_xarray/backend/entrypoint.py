"""The xarray backend entry point for ``.siff`` files: thin on purpose.

``engine="siff"`` is :class:`siff_xarray.engine.SiffEngine`, which hands ``.siff``
files to this class and converted stores to :mod:`siff_xarray.store`.

xarray imports every installed backend's entry point the first time it lists
engines, so this module imports nothing heavy (no Numba, Dask, Zarr or the
reader): :meth:`SiffBackendEntrypoint.open_dataset` imports
:mod:`siff_xarray.backend.open` on first use and delegates to
:func:`~siff_xarray.open_siff`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from xarray.backends import BackendEntrypoint

from .._options import OPEN_OPTION_NAMES
from .._paths import is_remote, local_path
from ..format.constants import looks_like_siff

__all__ = ["SiffBackendEntrypoint"]

_SUFFIXES = (".siff",)


class SiffBackendEntrypoint(BackendEntrypoint):
    """Open ScanImage-FLIM ``.siff`` and ScanImage ``.tif`` files as lazy Datasets.

    See :func:`siff_xarray.open_siff` for the parameters and the Dataset layout.
    """

    description = "Open ScanImage-FLIM .siff (and ScanImage TIFF) files with siff-xarray"
    url = "https://github.com/siff-xarray/siff-xarray"
    open_dataset_parameters = ("filename_or_obj", "drop_variables", *OPEN_OPTION_NAMES)

    def open_dataset(  # type: ignore[override]
        self,
        filename_or_obj: Any,
        *,
        drop_variables: str | Iterable[str] | None = None,
        **options: Any,
    ) -> Any:
        """Open a ``.siff`` file; see :func:`siff_xarray.open_siff`."""
        from .open import open_siff

        _refuse_converted_store(filename_or_obj)
        return open_siff(filename_or_obj, drop_variables=drop_variables, **options)

    def open_groups_as_dict(  # type: ignore[override]
        self,
        filename_or_obj: Any,
        *,
        drop_variables: str | Iterable[str] | None = None,
        **options: Any,
    ) -> dict[str, Any]:
        """Return the groups of a ``.siff``: the root holds the acquisition's Dataset.

        A ``.siff`` file is one acquisition (all channels, planes and timepoints of
        one frame grid), so it has one group, ``"/"``; ``xr.open_datatree`` and
        ``xr.open_groups`` give it as a DataTree or a dict.
        """
        return {"/": self.open_dataset(filename_or_obj, drop_variables=drop_variables,
                                       **options)}

    def open_datatree(  # type: ignore[override]
        self,
        filename_or_obj: Any,
        *,
        drop_variables: str | Iterable[str] | None = None,
        **options: Any,
    ) -> Any:
        """Open a ``.siff`` as a DataTree (see :meth:`open_groups_as_dict`)."""
        from xarray import DataTree

        groups = self.open_groups_as_dict(filename_or_obj, drop_variables=drop_variables,
                                          **options)
        tree = DataTree.from_dict(groups)
        tree.set_close(groups["/"].close)
        return tree

    def guess_can_open(self, filename_or_obj: Any) -> bool:
        """Recognise ScanImage (FLIM) files by magic bytes, or remote ``.siff`` by suffix.

        Never raises: anything unexpected means "not ours".
        """
        try:
            if isinstance(filename_or_obj, (str, os.PathLike)):
                path = os.fspath(filename_or_obj)
                if isinstance(path, bytes):
                    return False
                if is_remote(path):
                    return path.lower().endswith(_SUFFIXES)
                path = local_path(path)
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


def _refuse_converted_store(filename_or_obj: Any) -> None:
    """Raise a ValueError saying how to open a converted store given to the siff engine."""
    if not isinstance(filename_or_obj, (str, os.PathLike)):
        return
    path = os.fspath(filename_or_obj)
    if isinstance(path, str) and not is_remote(path) and \
            os.path.isfile(os.path.join(local_path(path), "photons", "zarr.json")):
        raise ValueError(f"{path}: is a converted siff-xarray store, not a .siff file; open "
                         "it with siff_xarray.open_converted(path) (every group: "
                         "siff_xarray.store.open_converted_tree(path)) or xr.open_zarr(path)")
