"""The OME-Zarr (NGFF 0.5) image of a converted store: axis order, pyramid, metadata.

The ``ome`` group holds the intensity in NGFF's ``(t, c, z, y, x)`` order at
several resolutions (each level 2 x 2 means of the one before), for napari and
other OME-Zarr viewers. Conversion batches write whole shards of every level.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numba
import numpy as np

from .layout import compressors

#: what the compiled code takes from other modules (docs/architecture.md, Rules)
_FOREIGN_INPUTS = "97b4776af36ffb14"

__all__ = ["CHANNEL_COLORS", "INTENSITY_ORDER", "create_ome", "downsample2", "merge_tallies",
           "ome_repeats", "pyramid_levels", "set_rendering", "shared_shards", "tallies",
           "to_ome_order", "window_rows", "windows", "windows_of", "with_windows"]

#: display colour of each channel, in file order (green, magenta, then more)
CHANNEL_COLORS = ("00FF00", "FF00FF", "00FFFF", "FFFF00", "FF8000", "0080FF", "FFFFFF")
#: timepoints sampled (whole chunks of them, evenly spaced) to choose contrast windows
WINDOW_SAMPLE = 32
#: level 0's chunks are stored in the intensity's ``(time, z, channel, y, x)`` order:
#: the ``transpose`` codec's order from NGFF's ``(t, c, z, y, x)``
INTENSITY_ORDER = (0, 2, 1, 3, 4)


def ome_repeats(block: np.ndarray) -> int:
    """Repeats per slice folded into the OME time axis (1 without a ``repeat`` dim)."""
    return block.shape[2] if block.ndim == 6 else 1


def to_ome_order(block: np.ndarray) -> np.ndarray:
    """``(time, z, [repeat], channel, y, x)`` -> NGFF ``(t, c, z, y, x)``.

    Repeats of a slice become consecutive OME timepoints (they are taken one after
    the other), so nothing is summed or dropped.
    """
    if block.ndim == 6:  # (t, z, r, c, y, x) -> (t, r, c, z, y, x) -> (t*r, c, z, y, x)
        t, z, r, c, y, x = block.shape
        return block.transpose(0, 2, 3, 1, 4, 5).reshape(t * r, c, z, y, x)
    return block.transpose(0, 2, 1, 3, 4)


@numba.njit(cache=True, nogil=True)
def _halve(src, out):
    """2 x 2 means of each ``(h, w)`` frame of ``src`` into ``out`` (see :func:`downsample2`)."""
    n, h, w = src.shape
    for i in range(n):
        for y in range(out.shape[1]):
            y0, y1 = 2 * y, min(2 * y + 1, h - 1)  # an odd last row pairs with itself
            for x in range(out.shape[2]):
                x0, x1 = 2 * x, min(2 * x + 1, w - 1)
                s = (np.int64(src[i, y0, x0]) + np.int64(src[i, y0, x1])
                     + np.int64(src[i, y1, x0]) + np.int64(src[i, y1, x1]))
                q, r = s >> 2, s & 3  # floor and remainder, for negative sums too
                if r == 3 or (r == 2 and q & 1 == 1):  # round half to even, as numpy.rint
                    q += 1
                out[i, y, x] = q


def downsample2(block: np.ndarray) -> np.ndarray:
    """Halve the last two axes by 2 x 2 means (edges repeated for odd sizes), same dtype.

    The mean is rounded half to even, as ``numpy.rint`` of the float mean would be.
    """
    h, w = block.shape[-2:]
    out = np.empty((*block.shape[:-2], (h + 1) // 2, (w + 1) // 2), dtype=block.dtype)
    if out.size:
        _halve(np.ascontiguousarray(block).reshape(-1, h, w), out.reshape(-1, *out.shape[-2:]))
    return out


def pyramid_levels(h: int, w: int, requested: int | None = None, smallest: int = 32) -> int:
    """Return the OME pyramid's level count.

    ``requested`` if given, else halve until a side would drop below ``smallest``
    pixels (at most 6 levels, at least 1).
    """
    if requested is not None:
        if requested < 1:
            raise ValueError(f"ome_levels must be at least 1, got {requested}")
        return int(requested)
    levels = 1
    while levels < 6 and min(h, w) // 2**levels >= smallest:
        levels += 1
    return levels


def _ome_metadata(ds: Any, name: str, levels: int = 1) -> dict[str, Any]:
    """NGFF 0.5 ``multiscales`` (and ``omero`` channel labels) for the ``ome`` group."""
    reps = ds.sizes.get("repeat", 1)
    t = ds["time"].values
    dt = float(np.median(np.diff(t))) / reps if t.size > 1 else 1.0
    z = ds["z"].values
    dz = float(np.median(np.diff(z))) if z.size > 1 and np.all(np.diff(z) != 0) else 1.0
    um = ds["y"].attrs.get("units") == "um"
    dy = float(ds["y"].values[1] - ds["y"].values[0]) if ds.sizes["y"] > 1 else 1.0
    dx = float(ds["x"].values[1] - ds["x"].values[0]) if ds.sizes["x"] > 1 else 1.0
    space = {"type": "space", **({"unit": "micrometer"} if um else {})}
    axes = [{"name": "t", "type": "time", "unit": "second"}, {"name": "c", "type": "channel"},
            {"name": "z", **space}, {"name": "y", **space}, {"name": "x", **space}]
    scale = [dt if dt > 0 else 1.0, 1.0, abs(dz), abs(dy), abs(dx)]
    translation = [float(t[0]) if t.size else 0.0, 0.0, float(z[0]) if z.size else 0.0,
                   float(ds["y"].values[0]), float(ds["x"].values[0])]
    names = [str(n) for n in ds["channel_name"].values]
    return {"ome": {
        "version": "0.5",
        "multiscales": [{
            "name": name, "axes": axes,
            "datasets": [{"path": str(k), "coordinateTransformations": [
                {"type": "scale", "scale": [*scale[:3], scale[3] * 2**k, scale[4] * 2**k]},
                {"type": "translation", "translation": [
                    *translation[:3], translation[3] + (2**k - 1) / 2 * dy,
                    translation[4] + (2**k - 1) / 2 * dx]}]} for k in range(levels)],
            "type": "mean",
            "metadata": {"description": "each level halves y and x by 2 x 2 means of the "
                                        "level before (rounded)"},
        }],
        "omero": {"channels": [
            {"label": n, "active": True, "color": CHANNEL_COLORS[i % len(CHANNEL_COLORS)],
             "window": {"min": 0, "max": 65535, "start": 0, "end": 10}}
            for i, n in enumerate(names)]},
    }}


def create_ome(store: Any, ds: Any, ct: int, st: int, levels: int) -> None:
    """Create the NGFF 0.5 image group ``ome``: arrays ``0``, ``1``, ... (t, c, z, y, x).

    Level 0 is the intensity; level ``k`` halves y and x ``k`` times. Every level
    shards time like the intensity, so each conversion batch writes whole shards.
    A partial last volume is left out (viewers would show its never-acquired
    planes as black; the store's root and ``photons`` keep it).
    """
    import zarr

    from ..backend import drop_partial_volume

    reps = ds.sizes.get("repeat", 1)
    h, w = ds.sizes["y"], ds.sizes["x"]
    ds = drop_partial_volume(ds)  # the Datasets' own rule for a partial last volume
    from zarr.codecs import TransposeCodec

    grp = zarr.open_group(store, path="ome", mode="w", attributes=_ome_metadata(
        ds, str(ds.attrs.get("title", "intensity")), levels))
    for k in range(levels):
        shape = (ds.sizes["time"] * reps, ds.sizes["channel"], ds.sizes["z"], h, w)
        # level 0 keeps the intensity's memory order (a transpose codec; readers see
        # t, c, z, y, x): its shards are then the intensity's, byte for byte, and a
        # conversion copies them instead of compressing the image twice (see
        # shared_shards). Repeats fold into t, which no transpose can express.
        order = {"filters": [TransposeCodec(order=INTENSITY_ORDER)]} if k == 0 and reps == 1 \
            else {}
        grp.create_array(str(k), shape=shape, dtype=ds.intensity.dtype,
                         chunks=(ct * reps, *shape[1:]),
                         shards=(st * reps, *shape[1:]), compressors=compressors(),
                         fill_value=0, dimension_names=("t", "c", "z", "y", "x"), **order)
        h, w = -(-h // 2), -(-w // 2)


def _permuted(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(shape[i] for i in INTENSITY_ORDER)


def _same_bytes_layout(intensity: Any, level0: Any) -> bool:
    """Tell whether ``level0`` encodes chunks as ``intensity`` does, after a transpose."""
    try:
        (si,), (so,) = intensity.metadata.codecs, level0.metadata.codecs
        inner_i = [c.to_dict() for c in si.codecs]
        inner_o = [c.to_dict() for c in so.codecs]
        index_i = ([c.to_dict() for c in si.index_codecs], str(si.index_location))
        index_o = ([c.to_dict() for c in so.index_codecs], str(so.index_location))
    except (AttributeError, ValueError):  # not one sharding codec
        return False
    first = inner_o[0] if inner_o else {}
    transposed = first.get("name") == "transpose" and \
        tuple(first.get("configuration", {}).get("order", ())) == INTENSITY_ORDER
    return (intensity.ndim == level0.ndim == 5 and transposed and inner_o[1:] == inner_i
            and index_i == index_o
            and tuple(si.chunk_shape) == _permuted(tuple(so.chunk_shape))
            and tuple(intensity.shards) == _permuted(tuple(level0.shards))
            and tuple(intensity.shape[1:]) == _permuted(tuple(level0.shape))[1:]
            and intensity.dtype == level0.dtype
            and intensity.metadata.fill_value == level0.metadata.fill_value)


def shared_shards(intensity: Any, level0: Any, t0: int, t1: int) -> list[tuple[str, str]]:
    """Shard keys ``(intensity's, level 0's)`` of time ``t0:t1`` whose bytes are the same.

    They are when level 0 was created with the intensity's memory order
    (:func:`create_ome`, no repeats) and codecs, and a shard covers the same
    timepoints in both (the last one differs when a partial last volume is in the
    intensity and not in the image). Returns every shard of ``t0:t1`` (which must
    start on a shard boundary), or ``[]`` when any of them differs: the caller then
    writes level 0 itself.
    """
    if not _same_bytes_layout(intensity, level0):
        return []
    st, n_i, n_o = intensity.shards[0], intensity.shape[0], level0.shape[0]
    if t0 % st:
        return []
    keys = []
    for s in range(t0 // st, -(-t1 // st)):
        stop = (s + 1) * st
        if min(stop, n_i) != min(stop, n_o) or min(stop, n_i) > t1:
            return []
        coords = (s, 0, 0, 0, 0)
        keys.append((f"{intensity.path}/{intensity.metadata.encode_chunk_key(coords)}",
                     f"{level0.path}/{level0.metadata.encode_chunk_key(coords)}"))
    return keys


def windows(sample: np.ndarray) -> list[dict[str, float]]:
    """Contrast windows per channel of ``(t, c, z, y, x)`` counts: 0.5th to 99.8th percentile.

    ``min``/``max`` are the sample's range; the window is at least one count wide,
    so that a dim channel is stretched to be seen rather than shown black.
    """
    counted = tallies(sample)
    if counted is not None:
        return windows_of(counted)
    out = []
    for c in range(sample.shape[1]):
        v = np.asarray(sample[:, c]).ravel().astype(np.float64)
        if v.size == 0:
            out.append(dict(_NO_WINDOW))
            continue
        lo, hi = (float(x) for x in np.percentile(v, (0.5, 99.8)))
        out.append(_window(float(v.min()), float(v.max()), lo, hi))
    return out


def tallies(sample: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """Per channel of ``(t, c, z, y, x)`` counts: its distinct values and how often each occurs.

    For counts of at most 16 bits (every image a conversion stores), in one pass
    (``np.bincount``); tallies of parts of a sample add up to the whole's
    (:func:`merge_tallies`), and :func:`windows_of` reads the windows off them.
    None for other dtypes.
    """
    if sample.dtype.kind not in "ui" or sample.dtype.itemsize > 2:
        return None
    base = int(np.iinfo(sample.dtype).min)  # 0, or -32768 for signed samples
    out = []
    for c in range(sample.shape[1]):
        v = np.asarray(sample[:, c]).ravel()
        tally = np.bincount((v.astype(np.int32) - base) if base else v)
        values = np.flatnonzero(tally)
        out.append((values + base, tally[values]))
    return out


def merge_tallies(parts: list[list[tuple[np.ndarray, np.ndarray]]]
                  ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Add up per-channel tallies (:func:`tallies`) of parts of one sample."""
    out = []
    for channel in zip(*parts, strict=True):
        values = np.concatenate([np.asarray(v, dtype=np.int64) for v, _ in channel])
        counts = np.concatenate([np.asarray(n, dtype=np.int64) for _, n in channel])
        distinct, where = np.unique(values, return_inverse=True)
        out.append((distinct, np.bincount(where, weights=counts,
                                          minlength=distinct.size).astype(np.int64)))
    return out


def _percentiles_of(values: np.ndarray, counts: np.ndarray, qs: tuple[float, ...]
                    ) -> list[float]:
    """``np.percentile`` (its linear method) of the sample that ``counts`` of ``values`` make.

    The order statistics are read off the tally: the same values as sorting, where
    ``np.percentile`` partitions a float copy once per call (the contrast windows of
    the benchmark file's conversion took 0.15-0.35 s of its single-threaded finish
    that way).
    """
    cum = np.cumsum(counts)
    n = int(cum[-1])

    def order(k: int) -> float:  # the k-th smallest value (0-based)
        return float(values[int(np.searchsorted(cum, k, side="right"))])

    out = []
    for q in qs:  # numpy's linear method: h = (n - 1) q, between x[floor h] and the next
        h = (n - 1) * (q / 100.0)
        i = int(np.floor(h))
        t = h - i
        a, b = order(i), order(min(i + 1, n - 1))
        # numpy's lerp: from the nearer end, so that t = 1 gives b exactly
        out.append(b - (b - a) * (1 - t) if t >= 0.5 else a + (b - a) * t)
    return out


def _window(vmin: float, vmax: float, lo: float, hi: float) -> dict[str, float]:
    hi = max(hi, lo + 1.0)  # at least one count wide
    return {"min": vmin, "max": max(vmax, hi), "start": lo, "end": hi}


#: a channel with no sample
_NO_WINDOW = {"min": 0.0, "max": 1.0, "start": 0.0, "end": 1.0}


def windows_of(counted: list[tuple[np.ndarray, np.ndarray]]) -> list[dict[str, float]]:
    """:func:`windows` of the sample whose per-channel :func:`tallies` are ``counted``."""
    out = []
    for values, counts in counted:
        if not np.asarray(counts).sum():
            out.append(dict(_NO_WINDOW))
            continue
        values, counts = np.asarray(values), np.asarray(counts)
        keep = counts > 0
        values, counts = values[keep], counts[keep]
        lo, hi = _percentiles_of(values, counts, (0.5, 99.8))
        out.append(_window(float(values[0]), float(values[-1]), lo, hi))
    return out


def window_rows(n_t: int, ct: int) -> np.ndarray:
    """Timepoints of level 0 the contrast windows are taken from (``ct`` per chunk).

    About :data:`WINDOW_SAMPLE` of them: whole chunks (a chunk holds one or a few
    timepoints; a read of one timepoint fetches and decodes its whole chunk), at
    least four, evenly spaced from the first chunk to the last, so that long chunks
    still sample the whole recording.
    """
    if not n_t:
        return np.zeros(0, dtype=np.int64)
    ct = max(int(ct), 1)
    n_chunks = -(-n_t // ct)
    want = min(n_chunks, max(-(-WINDOW_SAMPLE // ct), 4))
    pick = np.unique(np.linspace(0, max(n_chunks - 1, 0), want).round()).astype(np.int64)
    return np.concatenate([np.arange(c * ct, min((c + 1) * ct, n_t)) for c in pick]
                          ).astype(np.int64)


def set_rendering(store: Any) -> dict[str, Any]:
    """Write each channel's contrast window (from the data) into the ``ome`` group's ``omero``.

    Returns the group's ``ome`` attribute as written.

    Reads about :data:`WINDOW_SAMPLE` timepoints of level 0: whole chunks of them,
    at least four, evenly spaced (a chunk holds one or a few timepoints; each read
    of a single timepoint fetched and decoded its whole chunk, and on object
    storage each read waits its shard index and its chunk). The colours were
    written with the group (:data:`CHANNEL_COLORS`).
    """
    import zarr

    # the group and its level 0 open at once (each reads its metadata: a round trip
    # on object storage), and the chunks are read at once (one after another, each
    # waited its round trips; one orthogonal selection decoded whole shards)
    with ThreadPoolExecutor(WINDOW_SAMPLE) as pool:
        opening = pool.submit(zarr.open_array, store, path="ome/0", mode="r", zarr_format=3)
        grp = zarr.open_group(store, path="ome", mode="r+", zarr_format=3)
        arr = opening.result()
        ct = max(int(arr.chunks[0]), 1)
        rows = window_rows(arr.shape[0], ct)
        got = list(pool.map(lambda c: np.asarray(arr[int(c) * ct : int(c + 1) * ct]),
                            np.unique(rows // ct)))
    sample = np.concatenate(got) if got else np.zeros((0, *arr.shape[1:]), dtype=arr.dtype)
    attrs = dict(grp.attrs)
    ome = with_windows(attrs["ome"], windows(sample))
    grp.attrs.update({"ome": ome})
    return ome


def with_windows(ome: dict[str, Any], found: list[dict[str, float]]) -> dict[str, Any]:
    """Return the ``ome`` attribute ``ome`` with the channels' contrast windows ``found``."""
    channels = [{**ch, "window": window}
                for ch, window in zip(ome["omero"]["channels"], found, strict=True)]
    return {**ome, "omero": {**ome["omero"], "channels": channels}}
