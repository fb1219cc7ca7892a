"""Draw the documentation's figures from synthetic data (run by the MkDocs hook).

``python docs/figures.py [OUTDIR]`` writes PNGs (default ``docs/figures/``): plane
mean images, registration before/after, ROI traces of intensity and lifetime, a
lifetime image, and a phasor plot, all from the built-in demo acquisition
(``siff_xarray.synthetic.make_demo``), through the public API only.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import xarray as xr

import siff_xarray  # noqa: F401 - registers ds.siff
from siff_xarray.synthetic import make_demo, write_siff

FIGURES = ["planes.png", "registration.png", "traces.png", "lifetime.png", "phasor.png"]


def _save(fig: plt.Figure, out: Path) -> None:
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def make_figures(outdir: str | Path) -> list[Path]:
    """Write every figure into ``outdir``; return their paths."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        truth = make_demo(Path(tmp) / "demo.siff")
        with xr.open_dataset(truth.path, engine="siff", chunks={}) as ds:
            ds = ds.isel(time=slice(0, 40))  # complete volumes only
            ch1 = ds.intensity.sel(channel=1)

            # 1. plane mean images
            means = ch1.mean("time").compute()
            fig, axes = plt.subplots(1, ds.sizes["z"], figsize=(8, 4.2))
            for k, ax in enumerate(axes):
                means.isel(z=k).plot.imshow(ax=ax, cmap="magma", add_colorbar=False,
                                           yincrease=False)
                ax.set_title(f"z = {float(ds.z[k]):g} um")
                ax.set_aspect("equal")
            fig.suptitle("mean photons per pixel, channel 1")
            _save(fig, outdir / "planes.png")

            # 2. registration: mean image before / after, shifts over time
            reg = ds.siff.register(channel=1, max_shift=6).compute()
            moved = ds.siff.apply_shifts(reg).intensity.sel(channel=1)
            fig, axes = plt.subplots(1, 3, figsize=(10, 4))
            ch1.isel(z=1).mean("time").plot.imshow(ax=axes[0], cmap="gray", yincrease=False,
                                                   add_colorbar=False)
            axes[0].set_title("raw mean, z plane 1")
            moved.isel(z=1).mean("time").plot.imshow(ax=axes[1], cmap="gray", yincrease=False,
                                                      add_colorbar=False)
            axes[1].set_title("registered mean")
            for a in axes[:2]:
                a.set_aspect("equal")
            reg.shift_y.isel(z=1).plot(ax=axes[2], label="shift_y")
            reg.shift_x.isel(z=1).plot(ax=axes[2], label="shift_x")
            axes[2].set_ylabel("pixels")
            axes[2].set_title("shifts found (plane 1)")
            axes[2].legend()
            _save(fig, outdir / "registration.png")

            # 3. ROI traces: three rectangles, intensity and empirical lifetime
            h, w = ds.sizes["y"], ds.sizes["x"]
            masks = np.zeros((3, h, w), bool)
            masks[0, 20:50, 10:30] = True
            masks[1, 60:90, 30:55] = True
            masks[2, 95:120, 5:25] = True
            reg_ds = ds.assign(shift_y=reg.shift_y, shift_x=reg.shift_x)
            inten = reg_ds.siff.sum_masks(masks, channel=1).sum("z").compute()
            life = reg_ds.siff.lifetime(masks, channel=1).mean("z").compute()
            fig, axes = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True)
            for r in range(3):
                inten.isel(roi=r).plot(ax=axes[0], label=f"ROI {r}")
                life.isel(roi=r).plot(ax=axes[1], label=f"ROI {r}")
            axes[0].set_ylabel("photons per volume")
            axes[0].set_title("ROI traces (registered)")
            axes[0].legend()
            axes[1].set_ylabel("mean arrival time (ns)")
            axes[1].set_title("")
            _save(fig, outdir / "traces.png")

            # 4. lifetime image: per-pixel mean arrival over time, brightness = photons
            per_px = reg_ds.siff.lifetime(channel=1).isel(z=1)
            photons = moved.isel(z=1).sum("time").compute()
            img = per_px.mean("time", skipna=True).compute()
            fig, ax = plt.subplots(figsize=(4.5, 6))
            shown = img.where(photons >= 20)
            shown.plot.imshow(ax=ax, cmap="viridis", cbar_kwargs={"label": "ns"},
                              yincrease=False)
            ax.set_aspect("equal")
            ax.set_title("mean arrival time, plane 1\n(pixels with >= 20 photons)")
            _save(fig, outdir / "lifetime.png")

            # 5. phasor plot of pixels, calibrated with a 4 ns single-exponential reference
            ref_path = write_siff(Path(tmp) / "ref.siff", shape=(32, 32), n_timepoints=20,
                                  photons_per_frame=20000, lifetimes_ns=(4.0,),
                                  fractions=(1.0,), seed=3).path
            with xr.open_dataset(ref_path, engine="siff") as ref_ds:
                ref = ref_ds.siff.phasor(np.ones((1, 32, 32), bool))
            ph = reg_ds.siff.phasor(channel=1, reference=(ref.g, ref.s),
                                    reference_lifetime=4.0).isel(z=1)
            g = ph.g.mean("time", skipna=True).compute().values.ravel()
            s = ph.s.mean("time", skipna=True).compute().values.ravel()
            ok = np.isfinite(g) & np.isfinite(s) & (photons.values.ravel() >= 20)
            fig, ax = plt.subplots(figsize=(5.5, 3.6))
            ax.hist2d(g[ok], s[ok], bins=60, range=[[0, 1], [0, 0.6]], cmap="Blues")
            phi = np.linspace(0, np.pi, 200)
            ax.plot(0.5 + 0.5 * np.cos(phi), 0.5 * np.sin(phi), "k-", lw=1)
            freq = float(ph.g.attrs["frequency"])
            for tau in (0.6, 2.8):  # the demo's two lifetime components
                wt = 2 * np.pi * freq * 1e-3 * tau
                ax.plot(1 / (1 + wt**2), wt / (1 + wt**2), "ro")
                ax.annotate(f"{tau} ns", (1 / (1 + wt**2), wt / (1 + wt**2)),
                            textcoords="offset points", xytext=(4, 4))
            ax.set_xlabel("g")
            ax.set_ylabel("s")
            ax.set_aspect("equal")
            ax.set_title("pixel phasors, plane 1, calibrated with a 4 ns reference")
            _save(fig, outdir / "phasor.png")
    return [outdir / name for name in FIGURES]


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "figures"
    for p in make_figures(out):
        print(p)
