"""Accessor benchmark: ``ds.siff`` reductions vs corrosiffpy, native registration vs suite2p.

Run from the repository root (after the README's test set-up):

    .venv/bin/python benchmarks/bench_accessor.py               # the ~0.8 GB session file
    .venv/bin/python benchmarks/bench_accessor.py --volumes 50  # quick look

On the session-like file of ``bench_reader.py``, for the bright channel (all
slices, every timepoint):

* ``ds.siff.sum_masks`` with 10 masks (eager, and Dask-backed) against corrosiffpy
  ``sum_rois`` on the same frames;
* lifetime traces of 10 ROIs, ``ds.siff.lifetime(masks)``, against corrosiffpy
  ``sum_rois_flim`` (both empirical lifetimes; outputs compared first);
* registration throughput in frames/s: ``ds.siff.register()`` (native, likelihood)
  against ``method="suite2p"`` (suite2p 1.x rigid, torch on the CPU) on the same
  timepoints (``--reg-volumes N``, default all), references included, with the
  accuracy of both on a 100-volume file of the same layout with known motion.

Ratios are ours / theirs (< 1: we are faster), best of ``--repeats`` in this process.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_reader import best, parse_args, print_ratio_table, session_file  # noqa: E402


def main() -> None:
    sys.argv, reg_volumes = _reg_volumes(sys.argv)
    args = parse_args(__doc__)
    path = session_file(args.volumes, args.photons, args.path)

    import corrosiffpy
    import dask
    import xarray as xr

    import siff_xarray  # noqa: F401 - registers ds.siff

    channel = 1
    with xr.open_dataset(path, engine="siff") as ds:
        h, w = ds.sizes["y"], ds.sizes["x"]
        fmap = ds.frame_index.sel(channel=channel).values  # (time, z)
        bin_ns = float(ds.attrs["tau_bin_ps"]) / 1000.0
    rng = np.random.default_rng(0)
    masks = np.zeros((10, h, w), bool)
    for i in range(10):
        masks[i, :, i * w // 10 : (i + 1) * w // 10] = True
    masks |= rng.random((10, h, w)) > 0.9
    frames = fmap.ravel().tolist()
    c = corrosiffpy.open_file(str(path))

    def ours_sums(chunks: dict | None) -> np.ndarray:
        with xr.open_dataset(path, engine="siff", chunks=chunks) as ds:
            return ds.siff.sum_masks(masks, channel=channel).values

    def theirs_sums() -> np.ndarray:
        return c.sum_rois(masks, frames=frames).reshape(10, *fmap.shape)

    def ours_lifetimes() -> np.ndarray:
        with xr.open_dataset(path, engine="siff") as ds:
            return ds.siff.lifetime(masks, channel=channel).values

    def theirs_lifetimes() -> np.ndarray:
        life, _, _ = c.sum_rois_flim(masks, None, frames=frames)
        return life.reshape(10, *fmap.shape)

    # correctness first: the timings compare equal outputs
    assert np.array_equal(ours_sums(None), theirs_sums())
    assert np.array_equal(ours_sums({}), theirs_sums())
    np.testing.assert_allclose(ours_lifetimes() / bin_ns, theirs_lifetimes(), rtol=1e-9)

    r = args.repeats
    with dask.config.set(scheduler="threads"):
        rows = [
            ("ds.siff.sum_masks, 10 masks, eager", best(lambda: ours_sums(None), r),
             best(theirs_sums, r), 1.0),
            ("ds.siff.sum_masks, 10 masks, dask chunks={}", best(lambda: ours_sums({}), r),
             best(theirs_sums, r), 1.0),
            ("ds.siff.lifetime, 10 ROIs (sum_rois_flim)", best(ours_lifetimes, r),
             best(theirs_lifetimes, r), 1.0),
        ]
    size = path.stat().st_size
    print(f"\nfile: {path.name}, {size / 1e9:.2f} GB, channel {channel}: {len(frames)} frames, "
          f"best of {r}\n")
    print_ratio_table(rows, "corrosiffpy (s)")

    # registration: native vs suite2p on the same timepoints, references included
    with xr.open_dataset(path, engine="siff") as ds:
        sub = ds.isel(time=slice(0, reg_volumes or None))
        sub.intensity.load()  # decoding is not what is compared here
        n = sub.sizes["time"] * sub.sizes["z"]
        t = time.perf_counter()
        sub.siff.register(channel=channel)
        t_native = time.perf_counter() - t
        try:
            t = time.perf_counter()
            sub.siff.register(channel=channel, method="suite2p", device="cpu")
            t_s2p = time.perf_counter() - t
        except ImportError as exc:
            print(f"\nsuite2p not installed ({exc}); registration comparison skipped")
            return
    acc = _accuracy_on_known_motion(args.photons)
    print(f"\nregistration of {n} frames ({sub.sizes['time']} volumes x {sub.sizes['z']} planes, "
          f"{h} x {w}), references included, one run:\n")
    print("| method | s | frames/s | speed-up vs suite2p | target | exact shifts (known motion) |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| native (likelihood) | {t_native:.2f} | {n / t_native:.0f} | "
          f"{t_s2p / t_native:.1f}x | >= 5x | {acc['likelihood']:.0%} |")
    print(f"| suite2p 1.x rigid (cpu) | {t_s2p:.2f} | {n / t_s2p:.0f} | 1.0x | | "
          f"{acc['suite2p']:.0%} |")
    print("\nexact shifts: fraction of frames whose shift equals the truth up to one constant "
          "per plane, on a 100-volume file with the same layout and photon rate and known "
          "motion (default settings of both methods)")


def _accuracy_on_known_motion(photons: float) -> dict[str, float]:
    """Exact-shift fraction of both methods on a file with the session layout and truth."""
    import xarray as xr

    from siff_xarray.synthetic import write_siff

    path = HERE / "_data" / f"motion_100v_{photons:g}p.siff"
    truth_file = path.with_suffix(".shifts.npy")
    if not truth_file.exists():
        t = write_siff(path, shape=(256, 128), channels=(1,), n_slices=6, n_flyback=1,
                       n_timepoints=100, photons_per_frame=photons, max_shift=4,
                       encoding="compressed", seed=11)
        np.save(truth_file, t.shifts)
    truth = np.load(truth_file)
    out = {}
    with xr.open_dataset(path, engine="siff") as ds:
        fmap = ds.frame_index.isel(channel=0).values
        for method in ("likelihood", "suite2p"):
            reg = ds.siff.register(method=method, **({"device": "cpu"} if method == "suite2p"
                                                     else {}))
            est = np.stack([reg.shift_y.values, reg.shift_x.values], axis=-1)
            fr = []
            for k in range(fmap.shape[1]):
                _, counts = np.unique(est[:, k] - truth[fmap[:, k]], axis=0,
                                      return_counts=True)
                fr.append(counts.max() / fmap.shape[0])
            out[method] = float(np.mean(fr))
    return out


def _reg_volumes(argv: list[str]) -> tuple[list[str], int]:
    """Take ``--reg-volumes N`` out of ``argv`` (the shared parser does not know it)."""
    argv = list(argv)
    if "--reg-volumes" in argv:
        i = argv.index("--reg-volumes")
        n = int(argv[i + 1])
        del argv[i : i + 2]
        return argv, n
    return argv, 0  # 0: every timepoint


if __name__ == "__main__":
    main()
