"""Deprecated alias of ``siff_xarray.registration.suite2p`` (old imports keep working)."""

from ._lazy import deprecated_getattr

__getattr__ = deprecated_getattr(__name__, ["siff_xarray.registration.suite2p"])
