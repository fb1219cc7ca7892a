"""Opening files as Datasets: :func:`open_siff` and :func:`open_acquisition`.

Both turn their keyword arguments into one :class:`~siff_xarray._options.OpenOptions`
(checked once), open the files through xarray file managers (local paths made
absolute) and hand them to :func:`~siff_xarray.backend.build.build_dataset`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import xarray as xr

from .._options import OpenOptions
from .._paths import any_remote, expand
from ..reader.acquisition import open_all
from .array import file_manager
from .build import build_dataset

__all__ = ["drop_partial_volume", "open_acquisition", "open_siff"]


def drop_set(drop_variables: str | Iterable[str] | None) -> set[str]:
    """``drop_variables`` as a set of names."""
    if drop_variables is None:
        return set()
    if isinstance(drop_variables, str):
        return {drop_variables}
    return set(drop_variables)


def open_files(sources: Sequence[Any], options: OpenOptions,
               drop_variables: str | Iterable[str] | None = None) -> xr.Dataset:
    """Open ``sources`` (one file, or the parts of one acquisition) and build the Dataset.

    The parts of a remote acquisition are opened at once (each open waits at least
    a round trip; :func:`~siff_xarray.reader.acquisition.open_all`).
    """
    managers = []
    try:
        for s in sources:
            managers.append(file_manager(s, options.file))
        files = open_all([m.acquire for m in managers], any_remote(sources))
        return build_dataset(files, managers, options, drop_set(drop_variables))
    except BaseException:
        for m in managers:
            m.close()
        raise


def open_siff(
    filename_or_obj: str | os.PathLike[str] | Any,
    *,
    drop_variables: str | Iterable[str] | None = None,
    **options: Any,
) -> xr.Dataset:
    """Open a ``.siff`` (or ScanImage ``.tif``) file as a lazy, labelled Dataset.

    Same as ``xr.open_dataset(filename_or_obj, engine="siff", ...)``; pass
    ``chunks={}`` there (or call ``.chunk()``) for Dask arrays in whole-frame chunks.

    Parameters
    ----------
    filename_or_obj
        Local path, fsspec URL (``s3://``, ``https://``, ``memory://``, ``file://``),
        open binary file object, or a :class:`~siff_xarray.SiffFile`.
    drop_variables
        Variables (or coordinates) to leave out; dropped lazy variables are never read.

    **options
        The options below (one :class:`~siff_xarray._options.OpenOptions`); unknown
        names raise TypeError, values outside an option's choices ValueError.

    Other Parameters
    ----------------
    decode_times : bool
        ``True`` (default): ``epoch`` is ``datetime64[ns]``; ``False`` (also implied
        by ``decode_cf=False``): ``int64`` nanoseconds since 1970-01-01 (same values).
    flim : bool
        Also provide ``mean_arrival`` (per-pixel mean arrival time, ns), lazily.
    partial_volume : {"drop", "keep"}
        ``"drop"`` (default): an incomplete last volume is left out, so that means,
        traces and plots never include frames that were never acquired (as SiffPy's
        ``ImParams.array_shape``). ``"keep"``: it is a timepoint whose missing frames
        read as 0 (``frame_present`` says which exist); conversion keeps it.
    time_coordinate : {"experiment", "epoch"}
        ``"experiment"`` (default): ``time`` is the experiment time of each volume's
        first frame (s, from 0 in every file). ``"epoch"``: its laser-clock epoch
        (``datetime64[ns]``), so that the files of a session combine by their times
        (``xr.open_mfdataset(..., combine="by_coords")``).
    histogram_mode : {"drop", "clip", "wrap", "corrosiff"}
        How ``histogram`` treats arrival times ``>= Tau_bins``: ``"drop"`` (default),
        ``"clip"``, ``"wrap"``, or ``"corrosiff"`` (``Tau_bins + 2`` bins, modulo).
    tau_bins, bin_width_ps, base_resolution_ps : int or None, float or None, float
        Overrides of the arrival-time axis (see :class:`~siff_xarray.SiffFile`).
    storage_options : dict or None
        fsspec options for URLs (e.g. ``{"anon": True}`` or an S3 ``endpoint_url``).
    lock : lock-like or None
        Optional lock held while decoding (reads are thread-safe without one).
    chunk_bytes : int
        Target size of the preferred (Dask) chunks; chunks hold whole frames.
    index_cache : bool, str, os.PathLike or None
        Persistent frame-index cache: ``None`` (default) for paths and URLs (not file
        objects), a directory to use that one, ``False`` never (see
        :class:`~siff_xarray.SiffFile`).
    pin_version : bool
        For URLs: every read (also on Dask workers) requires the version (ETag) the
        open saw (default). ``False`` for servers that give one object different
        ETags from one request to the next (see :class:`~siff_xarray.SiffFile`).

    Returns
    -------
    xarray.Dataset
        Layout: :mod:`siff_xarray.backend.build` and ``docs/dataset.md``.

    """
    opts = OpenOptions.from_kwargs("open_siff", **options)
    return open_files([filename_or_obj], opts, drop_variables)


def drop_partial_volume(ds: xr.Dataset, partial_volume: str = "drop") -> xr.Dataset:
    """Leave an incomplete last volume out of a Dataset that holds one.

    For Datasets read another way than ``open_siff`` (a converted store, virtual
    references): with ``partial_volume="drop"`` (the default, as for
    ``open_siff``) a last timepoint whose ``frame_present`` is not all true is
    removed; ``"keep"`` returns ``ds`` unchanged.
    """
    if partial_volume not in ("drop", "keep"):
        raise ValueError(f"partial_volume must be 'keep' or 'drop', got {partial_volume!r}")
    if (partial_volume == "drop" and "frame_present" in ds and ds.sizes.get("time", 0)
            and not bool(np.asarray(ds.frame_present.isel(time=-1).values).all())):
        return ds.isel(time=slice(0, -1))
    return ds


def open_acquisition(
    paths_or_glob: str | os.PathLike[str] | Sequence[Any],
    *,
    drop_variables: str | Iterable[str] | None = None,
    **options: Any,
) -> xr.Dataset:
    """Open the numbered files of one acquisition (``name_00001.siff``, ...) as one Dataset.

    ScanImage splits long acquisitions into files of a fixed number of frames; a
    volume may start in one file and end in the next. The files are joined frame by
    frame (in the order given; a glob is sorted by name), so volumes, timing and
    events continue across files. ``frame_index`` then counts frames of the whole
    acquisition; ``attrs["file_frame_offsets"]`` gives each file's first frame.

    Parameters
    ----------
    paths_or_glob
        A glob pattern (local or fsspec URL) or a sequence of paths/URLs.
    drop_variables, **options
        As for :func:`open_siff`.

    Raises
    ------
    ValueError
        If the files' ScanImage headers or frame shapes differ (not one acquisition).

    """
    opts = OpenOptions.from_kwargs("open_acquisition", **options)
    return open_files(expand(paths_or_glob, opts.file.storage), opts, drop_variables)
