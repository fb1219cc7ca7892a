"""The ``engine="siff"`` entry point: ``.siff`` files and converted stores alike.

``xr.open_dataset``, ``xr.open_datatree`` and ``xr.open_groups`` with ``engine="siff"``
open a ``.siff`` (or ScanImage ``.tif``) file through
:class:`siff_xarray.backend.entrypoint.SiffBackendEntrypoint`, and a store written by
:func:`siff_xarray.convert` (a directory holding ``photons/zarr.json``, or a URL
ending in ``.zarr``) through :mod:`siff_xarray.store`: the same Dataset as
:func:`~siff_xarray.store.open_converted`, and as a DataTree the root Dataset,
``photons`` and each OME level as its own group
(:func:`~siff_xarray.store.open_converted_groups`). Plain ``engine="zarr"`` cannot
open the tree: NGFF requires every level's dimensions to be named ``y``/``x``, and
one group cannot hold two sizes of ``y``.

xarray imports every installed entry point when it lists engines, so this module
imports nothing heavy; the store layer is imported on first use.

Import rule: may import ``backend`` (its entry point), ``store`` (inside functions)
and ``_options``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from ._options import CF_NO_OP_KEYWORDS
from ._paths import is_remote, local_path
from .backend.entrypoint import SiffBackendEntrypoint

__all__ = ["SiffEngine"]

#: keywords of a ``.siff`` open that also apply to a converted store
_STORE_OPTIONS = ("storage_options", "partial_volume")


def converted_store(filename_or_obj: Any) -> str | None:
    """Return the path or URL of a converted store, or ``None`` for anything else.

    Local: a directory holding ``photons/zarr.json``. URLs: a name ending in
    ``.zarr`` (checking would cost a request on every remote ``.siff`` open).
    """
    if not isinstance(filename_or_obj, (str, os.PathLike)):
        return None
    path = os.fspath(filename_or_obj)
    if not isinstance(path, str):
        return None
    if is_remote(path):
        return path if path.rstrip("/").lower().endswith(".zarr") else None
    found = os.path.isfile(os.path.join(local_path(path), "photons", "zarr.json"))
    return path if found else None


def _store_kwargs(path: str, options: dict[str, Any]) -> dict[str, Any]:
    """Return the keywords of an open that a converted store takes; refuse the others."""
    other = sorted(k for k in options if k not in _STORE_OPTIONS and k not in CF_NO_OP_KEYWORDS)
    if other:
        raise TypeError(f"{path}: is a converted store; {', '.join(other)} appl"
                        f"{'ies' if len(other) == 1 else 'y'} to .siff files only (a store "
                        f"takes {', '.join(_STORE_OPTIONS)})")
    kwargs = {k: v for k, v in options.items() if k in _STORE_OPTIONS}
    # CF keywords go to xarray's Zarr reader; lazy arrays, which xarray then chunks
    kwargs.update({k: v for k, v in options.items() if k in CF_NO_OP_KEYWORDS})
    return {**kwargs, "chunks": None}


class SiffEngine(SiffBackendEntrypoint):
    """``engine="siff"``: ``.siff`` files (:func:`siff_xarray.open_siff`) and converted stores."""

    description = ("Open ScanImage-FLIM .siff files (and ScanImage TIFF) and their converted "
                   "Zarr stores with siff-xarray")

    def open_dataset(  # type: ignore[override]
        self,
        filename_or_obj: Any,
        *,
        drop_variables: str | Iterable[str] | None = None,
        **options: Any,
    ) -> Any:
        """Open a ``.siff`` file or a converted store as a Dataset."""
        store = converted_store(filename_or_obj)
        if store is None:
            return super().open_dataset(filename_or_obj, drop_variables=drop_variables,
                                        **options)
        from .store import open_converted

        ds = open_converted(store, **_store_kwargs(store, options))
        return _closing(ds.drop_vars(_names(drop_variables), errors="ignore"), ds)

    def open_groups_as_dict(  # type: ignore[override]
        self,
        filename_or_obj: Any,
        *,
        drop_variables: str | Iterable[str] | None = None,
        **options: Any,
    ) -> dict[str, Any]:
        """Return the groups: ``"/"`` for a ``.siff``; root, photons and OME levels for a store."""
        store = converted_store(filename_or_obj)
        if store is None:
            return super().open_groups_as_dict(filename_or_obj,
                                               drop_variables=drop_variables, **options)
        from .store import open_converted_groups

        groups = open_converted_groups(store, **_store_kwargs(store, options))
        drop = _names(drop_variables)
        return {k: _closing(ds.drop_vars(drop, errors="ignore"), ds) for k, ds in groups.items()}

    def guess_can_open(self, filename_or_obj: Any) -> bool:
        """Recognise ``.siff``/ScanImage files and local converted stores. Never raises."""
        try:
            if converted_store(filename_or_obj) is not None and \
                    not is_remote(os.fspath(filename_or_obj)):
                return True
        except Exception:
            return False
        return super().guess_can_open(filename_or_obj)


def _closing(ds: Any, opened: Any) -> Any:
    """``ds`` (derived from ``opened``) closing what ``opened`` holds (open_mfdataset calls it)."""
    ds.set_close(opened.close)
    return ds


def _names(drop_variables: str | Iterable[str] | None) -> list[str]:
    if drop_variables is None:
        return []
    return [drop_variables] if isinstance(drop_variables, str) else list(drop_variables)
