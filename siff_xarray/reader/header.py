"""Deprecated alias of :mod:`siff_xarray.format.header` (old imports keep working)."""

from .._lazy import deprecated_getattr

__getattr__ = deprecated_getattr(__name__, ["siff_xarray.format.header"])
