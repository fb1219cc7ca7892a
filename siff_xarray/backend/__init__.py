"""The xarray layer: ``.siff`` files as lazy, labelled ``xarray.Dataset`` objects.

Modules
-------
entrypoint  ``engine="siff"`` for ``xr.open_dataset`` (imports nothing heavy)
array       file managers, the frame reader and the lazy ``SiffBackendArray``
build       the Dataset's variables, coordinates and attributes
open        :func:`open_siff` and :func:`open_acquisition`

Import rule: may import :mod:`siff_xarray.reader`, :mod:`siff_xarray.format`,
xarray and the top-level helpers (``_options``, ``_paths``, ``_version``,
``errors``); never the store, accessor or registration packages. This
``__init__`` imports its submodules lazily, because xarray imports the entry
point (and so this package) whenever it lists engines.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_getattr

__all__ = ["SiffBackendArray", "drop_partial_volume", "open_acquisition", "open_siff"]

_LAZY = {"SiffBackendArray": ".array", "drop_partial_volume": ".open",
         "open_acquisition": ".open", "open_siff": ".open"}

if TYPE_CHECKING:  # pragma: no cover
    from .array import SiffBackendArray
    from .open import drop_partial_volume, open_acquisition, open_siff


__getattr__ = lazy_getattr(__name__, _LAZY, globals())
