"""napari plugin: ``.siff`` files and converted stores open as FLIM images.

``viewer.open("run.siff")`` or ``viewer.open("run.zarr")`` (the store root) gives,
for every channel,

* its intensity (photon counts per pixel), lazily, one volume decoded per
  displayed timepoint, with the physical scale of the ScanImage metadata
  (seconds, micrometres), a colour per channel (as in the store's OME
  ``omero`` metadata), contrast from the data's percentiles and additive
  blending, so that a dim channel is seen next to a bright one;
* its *lifetime image*, the usual FLIM view: hue from each pixel's mean photon
  arrival time (red short, blue long, over the 5th-95th percentile of a sample of
  frames) and brightness from its photon count, computed lazily from the photons
  (of the ``.siff`` or of the store) as napari displays each timepoint.

The manifest (``napari.yaml``) registers :func:`get_reader` for ``*.siff`` files and
directories holding a converted store; install with the ``napari`` extra
(``pip install "siff-xarray[napari]"``). Nothing here imports napari: the reader
returns plain layer data.

Import rule: the top of the stack (like ``cli``): the backend, store and accessor
packages' public names.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from ._progress import short_name

__all__ = ["flim_rgb", "get_reader", "layers", "read"]

LayerData = tuple[Any, dict[str, Any], str]

#: napari colormap of each OME colour (store.ome.CHANNEL_COLORS)
_COLORMAPS = {"00FF00": "green", "FF00FF": "magenta", "00FFFF": "cyan", "FFFF00": "yellow",
              "FF8000": "orange", "0080FF": "blue", "FFFFFF": "gray"}
#: timepoints sampled (evenly spaced) for contrast limits and the lifetime range
_SAMPLE = 8


def get_reader(path: str | list[str]) -> Callable[[Any], list[LayerData]] | None:
    """Return :func:`read` if ``path`` is a ``.siff`` file or a converted store, else None."""
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    p = os.fspath(path)
    if p.lower().endswith(".siff") and os.path.isfile(p):
        return read
    from .store import is_converted_store

    if os.path.isdir(p) and is_converted_store(p):
        return read
    return None


def read(path: str | list[str]) -> list[LayerData]:
    """Open ``path`` (a ``.siff`` or a converted store) as napari layer data."""
    import xarray as xr

    from .store import is_converted_store, open_converted

    p = os.fspath(path[0] if isinstance(path, (list, tuple)) else path)
    with warnings.catch_warnings():
        # one timepoint per chunk on purpose: a viewer shows one at a time, and
        # decoding the neighbours sharing a file's or store's chunk would slow each step
        warnings.filterwarnings("ignore", message="The specified chunks separate",
                                category=UserWarning)
        ds = (open_converted(p, chunks={"time": 1}) if is_converted_store(p)
              else xr.open_dataset(p, engine="siff", chunks={"time": 1}))
    return layers(ds, name=short_name(p))


def _spacing(ds: Any, dim: str) -> float:
    v = np.asarray(ds[dim].values, dtype=np.float64) if dim in ds.coords else np.zeros(0)
    if v.size < 2:
        return 1.0
    d = float(np.median(np.abs(np.diff(v))))
    return d if np.isfinite(d) and d > 0 else 1.0


def _geometry(ds: Any, dims: tuple[str, ...]) -> dict[str, Any]:
    """Return the layer ``scale``, ``translate``, ``axis_labels`` and ``units`` of ``dims``."""
    units = {"time": "s", "z": "um"}
    for d in ("y", "x"):
        units[d] = "um" if ds[d].attrs.get("units") == "um" else "pixel"
    first = {d: float(ds[d].values[0]) if d in ds.coords and ds.sizes[d] and
             np.issubdtype(ds[d].dtype, np.number) else 0.0 for d in dims}
    return {"scale": [_spacing(ds, d) for d in dims],
            "translate": [first[d] if d in ("z", "y", "x") else 0.0 for d in dims],
            "axis_labels": list(dims), "units": [units.get(d, "pixel") for d in dims]}


def flim_rgb(tau: np.ndarray, counts: np.ndarray, tau_range: tuple[float, float],
             count_max: float) -> np.ndarray:
    """Colour lifetimes by hue and brightness by photon count: ``uint8 (..., 3)``.

    Hue runs from red (``tau_range[0]`` or shorter) to blue (``tau_range[1]`` or
    longer); value is ``counts / count_max`` (clipped); pixels without photons are
    black.
    """
    lo, hi = tau_range
    t = np.clip((np.nan_to_num(np.asarray(tau, dtype=np.float64), nan=lo) - lo)
                / max(hi - lo, 1e-9), 0.0, 1.0)
    hue6 = t * (2.0 / 3.0) * 6.0  # 0 (red) .. 4 (blue) in sixths of the colour circle
    value = np.clip(np.asarray(counts, dtype=np.float64) / max(count_max, 1e-9), 0.0, 1.0)
    out = np.empty((*t.shape, 3), dtype=np.uint8)
    for i, n in enumerate((5.0, 3.0, 1.0)):  # HSV with full saturation, per channel
        k = (n + hue6) % 6.0
        out[..., i] = np.rint(255 * value * (1 - np.clip(np.minimum(k, 4 - k), 0, 1)))
    return out


def layers(ds: Any, *, name: str = "", lifetime: bool = True) -> list[LayerData]:
    """Layer data of a Dataset (``.siff`` or converted store; Dask-backed or not).

    One intensity image per channel and, with ``lifetime``, one lifetime image per
    channel (the first visible, the others hidden); see the module docstring.
    """
    import dask.array as da

    from .store.ome import CHANNEL_COLORS, windows

    dims = tuple(d for d in ds.intensity.dims if d != "channel")
    geometry = _geometry(ds, dims)
    n_t = ds.sizes.get("time", 0)
    pick = np.unique(np.linspace(0, max(n_t - 1, 0), min(n_t, _SAMPLE)).round()).astype(int)
    names = [str(n) for n in ds["channel_name"].values] if "channel_name" in ds \
        else [f"channel {c}" for c in ds.channel.values]
    out: list[LayerData] = []
    flim: list[LayerData] = []
    for i, ch in enumerate(ds.channel.values):
        inten = ds.intensity.sel(channel=ch).transpose(*dims)
        sample = np.asarray(inten.isel(time=pick).values) if n_t else np.zeros((0,))
        win = windows(sample.reshape(len(pick), 1, -1)) if n_t else \
            [{"start": 0.0, "end": 1.0}]
        label = f"{name} {names[i]}".strip()
        color = CHANNEL_COLORS[i % len(CHANNEL_COLORS)]
        out.append((inten.data, {
            "name": label, "colormap": _COLORMAPS.get(color, "gray"), "blending": "additive",
            "contrast_limits": [win[0]["start"], win[0]["end"]], **geometry,
            "metadata": {"channel": int(ch), "source": name}}, "image"))
        if not lifetime or ds.attrs.get("n_tau_bins") in (None, -1) or not n_t:
            continue
        tau = ds.siff.lifetime(channel=int(ch))
        tau = tau.transpose(*dims) if set(tau.dims) == set(dims) else tau
        tau_sample = np.asarray(tau.isel(time=pick).values, dtype=np.float64)
        finite = tau_sample[np.isfinite(tau_sample)]
        if finite.size == 0:
            continue
        lo, hi = (float(v) for v in np.percentile(finite, [5, 95]))
        tau_data = tau.data if isinstance(tau.data, da.Array) else da.from_array(tau.data)
        cnt_data = inten.data if isinstance(inten.data, da.Array) else \
            da.from_array(inten.data)
        cnt_data = cnt_data.rechunk(tau_data.chunks)
        rgb = da.map_blocks(flim_rgb, tau_data, cnt_data, (lo, hi), win[0]["end"],
                            dtype=np.uint8, new_axis=tau_data.ndim,
                            chunks=(*tau_data.chunks, (3,)))
        flim.append((rgb, {
            "name": f"{label} lifetime", "rgb": True, "visible": not flim, **geometry,
            "metadata": {"channel": int(ch), "lifetime_range_ns": [lo, hi],
                         "description": "hue: mean photon arrival time (red short, blue "
                                        "long; IRF offset included); brightness: photons"}},
                     "image"))
    return out + flim
