"""Backend benchmark: ``xr.open_dataset(engine="siff")`` vs corrosiffpy + numpy.

Run from the repository root (after the README's test set-up):

    .venv/bin/python benchmarks/bench_backend.py              # the ~0.8 GB session file
    .venv/bin/python benchmarks/bench_backend.py --volumes 50 # quick look

Uses the same session-like file as ``bench_reader.py`` (written once to
``benchmarks/_data/``). The job timed is what a user does first: open the file
and compute the mean intensity trace of every plane and channel,
``ds.intensity.sum(("y", "x"))``, eagerly and with Dask (threads), against
corrosiffpy ``get_frames`` on the same frames followed by a numpy reshape and
sum. Outputs are compared before timing; ratios are ours / corrosiffpy (< 1 means
we are faster), best of ``--repeats``, in this one process.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_reader import best, parse_args, print_ratio_table, session_file  # noqa: E402


def main() -> None:
    args = parse_args(__doc__)
    path = session_file(args.volumes, args.photons, args.path)

    import corrosiffpy
    import dask
    import xarray as xr

    with xr.open_dataset(path, engine="siff") as ds:
        fmap = ds.frame_index.values
        present = ds.frame_present.values
        want = ds.intensity.sum(("y", "x")).values
        mid = ds.sizes["time"] // 2
        shape = ds.intensity.shape
    assert present.all(), "the benchmark file has no partial volume"
    frames = fmap.ravel().tolist()
    c = corrosiffpy.open_file(str(path))

    def theirs_traces() -> np.ndarray:
        return c.get_frames(frames).reshape(shape).sum(axis=(-2, -1), dtype=np.uint64)

    def ours_traces(chunks: dict | None) -> np.ndarray:
        with xr.open_dataset(path, engine="siff", chunks=chunks) as ds:
            return ds.intensity.sum(("y", "x")).values

    def ours_timepoint() -> np.ndarray:
        with xr.open_dataset(path, engine="siff") as ds:
            return ds.intensity.isel(time=mid).values

    one = fmap[mid].ravel().tolist()

    def theirs_timepoint() -> np.ndarray:
        return corrosiffpy.open_file(str(path)).get_frames(one).reshape(shape[1:])

    def ours_open() -> None:
        xr.open_dataset(path, engine="siff").close()

    def ours_open_cold() -> None:
        xr.open_dataset(path, engine="siff", index_cache=False).close()

    # correctness first
    assert np.array_equal(theirs_traces(), want)
    assert np.array_equal(ours_traces({}), want)
    assert np.array_equal(ours_timepoint(), theirs_timepoint())

    r = args.repeats
    with dask.config.set(scheduler="threads"):
        rows = [
            ("open_dataset (index cache off) vs open_file", best(ours_open_cold, r),
             best(lambda: corrosiffpy.open_file(str(path)), r), None),
            ("open_dataset (index cache warm) vs open_file", best(ours_open, r),
             best(lambda: corrosiffpy.open_file(str(path)), r), 1.0),
            ("open + plane traces, eager", best(lambda: ours_traces(None), r),
             best(theirs_traces, r), 1.0),
            ("open + plane traces, dask chunks={}", best(lambda: ours_traces({}), r),
             best(theirs_traces, r), 1.0),
            ("open + one timepoint", best(ours_timepoint, r), best(theirs_timepoint, r), None),
        ]
    size = path.stat().st_size
    print(f"\nfile: {path.name}, {size / 1e9:.2f} GB, {len(frames)} frames in the Dataset, "
          f"{os.cpu_count()} CPU(s); best of {r}\n")
    print_ratio_table(rows, "corrosiffpy + numpy (s)")


if __name__ == "__main__":
    main()
