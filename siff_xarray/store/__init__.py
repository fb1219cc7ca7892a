"""The Zarr layer: converted stores of ``.siff`` files, lossless, in parallel, resumable.

Layout of a converted store (see ``docs/zarr-layout.md``)::

    /                    the Dataset of ``xr.open_dataset(src, engine="siff")``
      intensity            (time, z, [repeat], channel, y, x) uint16, sharded, Blosc zstd
      photon_count, histogram, frame_index, frame_present, event_*, coordinates, attrs
    /photons             every photon of every file frame (flyback included);
                         attrs: siff_zarr_version (1), source_bytes, layout, tau axis
      arrival_time         (photon,) uint16 (uint32 if any arrival time needs it)
      photon_start         (frame,) uint64   first photon of each file frame
      photon_count         (frame,) uint32   photons of each file frame
      encoding             (frame,) int8     0 raw, 1 compressed (as in the source)
      description          (byte,) uint8     every frame's description text, concatenated
      description_start    (frame,) uint64   and where each starts
      description_length   (frame,) uint32
      experiment_s, epoch_laser_ns, epoch_system_ns   (frame,) timestamps
      flyback_intensity    (flyback, y, x) uint16   count images of flyback frames
      flyback_frame        (flyback,) int64         their file frame indices
    /ome                 OME-Zarr (NGFF 0.5) image of the intensity, multiscale

Within a frame, photons are stored in pixel order (as compressed ``.siff`` frames
are), so a photon's pixel follows from the frame's count image: 2 bytes per
photon. Only the order of photons *within* one pixel of a raw-encoded frame is
not kept (it carries no information: every photon keeps its arrival time).

Modules
-------
layout     keys, chunking, naming, ``Target`` (where a store lives) and ``Plan``
ome        the OME-Zarr image (axis order, pyramid, NGFF metadata)
owner      which conversion owns a store being written (one writer at a time)
shards     whole shards of a conversion's arrays, encoded and stored one write each
converter  :func:`convert`, :func:`convert_file` (batches on any Dask scheduler)
read       :func:`open_converted` (and ``_groups``/``_tree``), :func:`read_photons`,
           :func:`describe_store`,
           :class:`StorePhotons`
strict     a zarr store wrapper: a missing chunk is an error, not zeros
verifier   :func:`verify`
export     :func:`to_siff` (a store back to ``.siff``), :func:`to_tiff`

Import rule: may import the reader, format and backend packages (public names)
and zarr, fsspec, dask; never the accessor or registration. This ``__init__``
imports its modules lazily (importing Numba is not free).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_getattr

__all__ = [
    "SIFF_ZARR_VERSION", "ConversionSummary", "Progress", "StorePhotons", "convert",
    "convert_file", "describe_store", "downsample2", "group_acquisitions", "is_converted_store",
    "open_converted", "open_converted_groups", "open_converted_tree", "pyramid_levels",
    "read_photons", "store_name", "to_ome_order", "to_siff", "to_tiff", "verify",
]

_LAZY = {
    "SIFF_ZARR_VERSION": ".layout", "group_acquisitions": ".layout", "store_name": ".layout",
    "downsample2": ".ome", "pyramid_levels": ".ome", "to_ome_order": ".ome",
    "ConversionSummary": ".converter", "Progress": ".converter", "convert": ".converter",
    "convert_file": ".converter",
    "StorePhotons": ".read", "describe_store": ".read", "is_converted_store": ".read",
    "open_converted": ".read",
    "open_converted_groups": ".read", "open_converted_tree": ".read",
    "read_photons": ".read",
    "verify": ".verifier", "to_siff": ".export", "to_tiff": ".export",
}

if TYPE_CHECKING:  # pragma: no cover
    from .converter import ConversionSummary, Progress, convert, convert_file
    from .export import to_siff, to_tiff
    from .layout import SIFF_ZARR_VERSION, group_acquisitions, store_name
    from .ome import downsample2, pyramid_levels, to_ome_order
    from .read import (
        StorePhotons,
        describe_store,
        is_converted_store,
        open_converted,
        open_converted_groups,
        open_converted_tree,
        read_photons,
    )
    from .verifier import verify


__getattr__ = lazy_getattr(__name__, _LAZY, globals())


def __dir__() -> list[str]:
    return sorted(__all__)
