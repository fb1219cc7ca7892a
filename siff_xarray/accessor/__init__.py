"""The ``ds.siff`` accessor: analysis on Datasets from ``engine="siff"`` or converted stores.

Modules
-------
api         :class:`SiffAccessor` (registered as ``ds.siff``) and ``calibrate_phasor``
reductions  the table of photon reductions and the (Dask) blocks that run them

Import rule: numpy, xarray and the leaves at import (importing the package only
registers the accessor); the reader, store and registration packages lazily,
inside the methods that need them; never the backend's internals.
"""

from .api import SiffAccessor, calibrate_phasor

__all__ = ["SiffAccessor", "calibrate_phasor"]
