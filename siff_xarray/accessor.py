"""The ``ds.siff`` accessor: analysis on Datasets from ``engine="siff"`` or converted stores.

So far: rigid motion registration (:meth:`SiffAccessor.register`, native FFT
method) and lazy application of shifts (:meth:`SiffAccessor.apply_shifts`).
Shift convention: the registered frame is
``numpy.roll(raw, (shift_y, shift_x), axis=(-2, -1))``, for any sign.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

__all__ = ["SiffAccessor"]

SHIFT_CONVENTION = "registered = numpy.roll(raw, (shift_y, shift_x), axis=(y, x))"


@xr.register_dataset_accessor("siff")
class SiffAccessor:
    """ScanImage-FLIM analysis on a Dataset with the siff-xarray layout."""

    def __init__(self, ds: xr.Dataset) -> None:
        self._ds = ds

    def _frame_dims(self) -> list[str]:
        dims = [d for d in self._ds.intensity.dims if d not in ("channel", "y", "x")]
        return dims  # time, z, [repeat]

    def register(
        self,
        channel: int | None = None,
        method: str = "phase",
        reference: xr.DataArray | np.ndarray | None = None,
        *,
        max_shift: int | None = None,
        n_iter: int = 3,
        n_reference_frames: int = 300,
        smooth_sigma: float = 2.0,
        whiten: float = 0.0,
        batch_frames: int = 512,
    ) -> xr.Dataset:
        """Estimate rigid shifts of every frame, plane by plane.

        Parameters
        ----------
        channel
            ScanImage channel number (a ``channel`` coordinate value) to align on;
            default: the first channel. The shifts apply to all channels.
        method
            ``"phase"``: FFT correlation against an iteratively refined reference
            per plane (:func:`siff_xarray.registration.register_frames`).
        reference
            ``(z, y, x)`` reference images to align to, instead of building them.
        max_shift
            Largest shift searched (pixels; default a quarter of the frame).
        n_iter, n_reference_frames
            Reference refinement iterations, and how many frames (evenly spaced in
            time) build the reference.
        smooth_sigma, whiten
            Correlation smoothing (pixels) and spectral whitening (0 = plain
            cross-correlation, 1 = phase correlation).
        batch_frames
            Frames decoded and registered at a time (bounds memory).

        Returns
        -------
        xarray.Dataset
            ``shift_y``, ``shift_x`` (int64) and ``quality`` (correlation peak) over
            ``(time, z, [repeat])``, and ``reference`` ``(z, y, x)``.

        """
        from .registration import phase_shifts, register_frames

        if method != "phase":
            raise ValueError(f"unknown registration method {method!r}; available: 'phase'")
        ds = self._ds
        if channel is None:
            channel = int(ds.channel.values[0])
        if channel not in ds.channel.values:
            raise ValueError(f"channel {channel} is not in this Dataset (channels "
                             f"{ds.channel.values.tolist()})")
        img = ds.intensity.sel(channel=channel)
        other = [d for d in img.dims if d not in ("time", "z", "y", "x")]  # repeat
        img = img.transpose("z", "time", *other, "y", "x")
        nz, nt = img.sizes["z"], img.sizes["time"]
        frames_per_t = int(np.prod([img.sizes[d] for d in other], dtype=np.int64))
        n = nt * frames_per_t
        h, w = img.sizes["y"], img.sizes["x"]
        shifts = np.zeros((nz, n, 2), dtype=np.int64)
        quality = np.zeros((nz, n))
        refs = np.zeros((nz, h, w))
        for k in range(nz):  # one pass per plane; frames are processed in batches
            plane = img.isel(z=k)
            if reference is not None:
                refs[k] = np.asarray(reference)[k]
            else:
                pick = np.unique(np.linspace(0, nt - 1, min(nt, n_reference_frames)
                                             ).round().astype(int))
                sample = plane.isel(time=pick).values.reshape(-1, h, w)
                _, refs[k], _ = register_frames(sample, n_iter=n_iter, max_shift=max_shift,
                                                smooth_sigma=smooth_sigma)
            step = max(1, batch_frames // frames_per_t)
            for a in range(0, nt, step):
                block = plane.isel(time=slice(a, a + step)).values.reshape(-1, h, w)
                s, q = phase_shifts(block, refs[k], max_shift=max_shift,
                                    smooth_sigma=smooth_sigma, whiten=whiten)
                shifts[k, a * frames_per_t : a * frames_per_t + len(s)] = s
                quality[k, a * frames_per_t : a * frames_per_t + len(s)] = q
        shape = (nz, nt, *[img.sizes[d] for d in other])
        dims = ("z", "time", *other)
        attrs = {"convention": SHIFT_CONVENTION, "units": "pixel", "channel": channel,
                 "method": method}
        out = xr.Dataset(
            {
                "shift_y": (dims, shifts[..., 0].reshape(shape), attrs),
                "shift_x": (dims, shifts[..., 1].reshape(shape), attrs),
                "quality": (dims, quality.reshape(shape),
                            {"long_name": "correlation peak of the registration"}),
                "reference": (("z", "y", "x"), refs,
                              {"long_name": "registration reference", "channel": channel}),
            },
            coords={d: ds[d] for d in ("time", "z", "y", "x", *other) if d in ds.coords},
        )
        return out.transpose("time", "z", *other, "y", "x")

    def apply_shifts(self, shifts: xr.Dataset | None = None) -> xr.Dataset:
        """Return the Dataset with ``intensity`` (and ``mean_arrival``) registered, lazily.

        ``shifts`` is the output of :meth:`register` (default: the ``shift_y`` and
        ``shift_x`` variables already in the Dataset). The shifts are stored in the
        result, so they travel with it (``to_zarr`` included), and registered
        variables carry a ``registered`` attribute so that shifts are never applied
        twice. Works on numpy- and dask-backed Datasets; nothing is decoded until
        the data are used.
        """
        from .registration import apply_shifts as roll_frames

        ds = self._ds
        src = ds if shifts is None else shifts
        if "shift_y" not in src or "shift_x" not in src:
            raise ValueError("no shifts: pass the Dataset returned by ds.siff.register()")
        sy, sx = src["shift_y"], src["shift_x"]

        def roll(frames: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
            return roll_frames(frames, np.stack([y, x], axis=-1))

        out = ds.assign(shift_y=sy, shift_x=sx)
        for name in ("intensity", "mean_arrival"):
            if name not in ds or "registered" in ds[name].attrs:
                continue  # absent, or registered already (e.g. saved after apply_shifts)
            var = ds[name]
            moved = xr.apply_ufunc(
                roll, var, sy, sx, input_core_dims=[["y", "x"], [], []],
                output_core_dims=[["y", "x"]], dask="parallelized",
                output_dtypes=[var.dtype], keep_attrs=True,
            ).transpose(*var.dims)
            moved.encoding = dict(var.encoding)
            moved.attrs["registered"] = SHIFT_CONVENTION + " with shift_y, shift_x"
            out[name] = moved
        return out
