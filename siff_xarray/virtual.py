"""A virtual Zarr view of ``.siff`` files: intensity without copying a byte.

Compressed ``.siff`` frames store their photon-count image as a plain little-endian
``uint16`` array right before the arrival times. Each such image can therefore
serve, unchanged, as one chunk of a Zarr array. :func:`references` builds
kerchunk-style references (version 1: Zarr v2 metadata inline, one
``[path, offset, length]`` entry per frame) for the Dataset's ``intensity`` and inline
copies of its small variables and coordinates; :func:`open_virtual` opens them with
fsspec's ``ReferenceFileSystem`` and xarray, reading the count images straight from
the ``.siff`` (local or remote). No extra package is needed; the JSON also works with
kerchunk and VirtualiZarr tooling.

Only files whose imaging frames are all compressed can be exposed this way (raw
frames hold photon records, not images); ``histogram`` and ``mean_arrival`` need
decoding and are left out.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any

import numpy as np

from .errors import SiffFormatError

__all__ = ["CHUNKS_SUFFIX", "open_virtual", "references", "write_references"]


def _inline(value: bytes) -> str:
    try:
        return value.decode("ascii")
    except UnicodeDecodeError:
        return "base64:" + base64.b64encode(value).decode("ascii")


def _uninline(value: str) -> bytes:
    """Return the bytes that :func:`_inline` wrote as ``value``."""
    if value.startswith("base64:"):
        return base64.b64decode(value[len("base64:"):])
    return value.encode("ascii")


def references(source: str | os.PathLike[str], *,
               storage_options: dict[str, Any] | None = None,
               pin_version: bool = True) -> dict[str, Any]:
    """Kerchunk (version 1) references exposing a ``.siff`` file's Dataset as Zarr.

    Parameters
    ----------
    source
        Local path or fsspec URL of a ``.siff`` file whose imaging frames are all
        compressed.
    storage_options
        fsspec options to read the source (used here only; pass them again to
        :func:`open_virtual`).
    pin_version
        For a URL: as for :class:`~siff_xarray.SiffFile` (reading the source here).

    Returns
    -------
    dict
        ``{"version": 1, "refs": {...}}``: JSON-serialisable.

    Raises
    ------
    SiffFormatError
        If an imaging frame is raw-encoded (it has no count image to reference).

    """
    from zarr.storage import MemoryStore

    from .backend import open_siff
    from .format.constants import ENC_COMPRESSED
    from .reader.siff_file import SiffFile

    path = os.fspath(source)
    if "://" not in path:
        path = os.path.abspath(path)
    ds = open_siff(path, storage_options=storage_options, pin_version=pin_version,
                   drop_variables=["histogram"],
                   partial_volume="keep")
    try:
        with SiffFile(path, storage_options=storage_options, pin_version=pin_version) as f:
            fmap = ds.frame_index.values
            frames = fmap[fmap >= 0]
            raw = frames[f.index.encoding[frames] != ENC_COMPRESSED]
            if raw.size:
                raise SiffFormatError(
                    path, f"{raw.size} imaging frame(s) are not compressed (first: frame "
                    f"{int(raw[0])}); only compressed frames hold a count image that a "
                    "virtual Zarr can point to", None, int(raw[0]))
            starts = f.index.data_start
        h, w = ds.sizes["y"], ds.sizes["x"]
        template = ds.copy()
        template["photon_count"] = template["photon_count"].load()
        frame_dims = ds.frame_index.dims
        template["intensity"] = template["intensity"].chunk({d: 1 for d in frame_dims})
        store = MemoryStore()
        # nothing compressed: the small variables are inline anyway, and a Zarr v2
        # compressor is read as a list by VirtualiZarr's kerchunk parser (2.5), which
        # then fails on ours
        plain: dict[str, dict[str, Any]] = {str(v): {"compressors": None, "filters": None}
                                            for v in template.variables}
        plain["intensity"]["chunks"] = (1,) * len(frame_dims) + (h, w)
        template.to_zarr(store, zarr_format=2, compute=False, consolidated=False,
                         encoding=plain)
        refs: dict[str, Any] = {k: _inline(v.to_bytes())
                                for k, v in sorted(store._store_dict.items())}
    finally:
        ds.close()
    for idx in np.argwhere(fmap >= 0):  # one reference per existing imaging frame
        frame = int(fmap[tuple(idx)])
        key = "intensity/" + ".".join(str(int(i)) for i in idx) + ".0.0"
        refs[key] = [path, int(starts[frame]), 2 * h * w]
    return {"version": 1, "refs": refs}


#: suffix of the file beside a reference JSON that holds its small arrays' chunks
CHUNKS_SUFFIX = ".chunks"


def _is_metadata(key: str) -> bool:
    return key.rsplit("/", 1)[-1] in (".zarray", ".zattrs", ".zgroup", ".zmetadata")


def write_references(source: str | os.PathLike[str], out: str | os.PathLike[str], *,
                     storage_options: dict[str, Any] | None = None,
                     inline: bool = True, pin_version: bool = True) -> None:
    """Write :func:`references` of ``source`` to the JSON file ``out``.

    With ``inline=False``, the chunks of the small variables and coordinates are
    written to ``out + ".chunks"`` and referenced there by byte range, like the
    intensity in the ``.siff``, instead of being inlined in the JSON: every array is
    then a plain reference, as VirtualiZarr's kerchunk parser needs (2.5 reads no
    inlined data). The chunk file is referenced by its absolute local path.
    """
    refs = references(source, storage_options=storage_options, pin_version=pin_version)
    if not inline:
        chunks_path = os.path.abspath(os.fspath(out)) + CHUNKS_SUFFIX
        pos = 0
        with open(chunks_path, "wb") as fh:
            for key, value in refs["refs"].items():
                if isinstance(value, list) or _is_metadata(key):
                    continue
                data = _uninline(value)
                fh.write(data)
                refs["refs"][key] = [chunks_path, pos, len(data)]
                pos += len(data)
    with open(out, "w", encoding="ascii") as fh:
        json.dump(refs, fh)


def open_virtual(refs: dict[str, Any] | str | os.PathLike[str], *,
                 storage_options: dict[str, Any] | None = None,
                 partial_volume: str = "drop", **kwargs: Any) -> Any:
    """Open references (a dict or a JSON file) as an xarray Dataset, lazily.

    Parameters
    ----------
    refs
        The output of :func:`references`, or the path of a JSON file holding it.
    storage_options
        fsspec options for reading the referenced ``.siff`` (e.g. S3 credentials).
    partial_volume
        ``"drop"`` (default, as ``open_siff``) leaves an incomplete last volume out;
        ``"keep"`` keeps it (the references always cover it).
    **kwargs
        Passed to ``xarray.open_zarr``.

    """
    import fsspec
    import xarray as xr
    from zarr.storage import FsspecStore

    if not isinstance(refs, dict):
        with open(refs, encoding="ascii") as fh:
            refs = json.load(fh)
    targets = [v[0] for v in refs["refs"].values() if isinstance(v, list)]
    protocol = "file"
    if targets and "://" in targets[0]:
        protocol = targets[0].split("://", 1)[0]
    remote = dict(storage_options or {})
    if protocol != "file":  # zarr reads through asyncio: the target must be async too
        remote["asynchronous"] = True
    fs = fsspec.filesystem("reference", fo=refs, remote_protocol=protocol,
                           remote_options=remote, asynchronous=True)
    from .backend import drop_partial_volume

    kwargs.setdefault("consolidated", False)
    ds = xr.open_zarr(FsspecStore(fs, read_only=True, path=""), zarr_format=2, **kwargs)
    return drop_partial_volume(ds, partial_volume)
