"""Deprecated alias of ``siff_xarray.store`` (kept so that old imports keep working)."""

from ._lazy import deprecated_getattr

__getattr__ = deprecated_getattr(__name__, ["siff_xarray.store"])
