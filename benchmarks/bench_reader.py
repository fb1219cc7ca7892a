"""Reader benchmark: siff-xarray vs corrosiffpy on a session-like synthetic file.

Run from the repository root (after the README's test set-up):

    .venv/bin/python benchmarks/bench_reader.py            # ~1 GB file, a few minutes
    .venv/bin/python benchmarks/bench_reader.py --volumes 50   # quick look

It writes (once, then reuses) a file like a real session: 256 x 128 pixels, 2
channels (the second dim), 6 slices + 1 flyback frame per volume, ~24k photons per
bright frame, bright frames alternating raw/compressed and the rest stored as
the smaller encoding (about 0.8 GB with the defaults). Each operation is timed
``--repeats`` times for both readers in this one process (best time kept) and
reported as a ratio
ours/corrosiffpy (< 1 means we are faster), with the target from the issue.
Outputs are checked to be equal before timing.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def make_file(path: Path, volumes: int, photons: float, extra_frames: int = 0) -> None:
    from siff_xarray.synthetic import write_siff

    def encoding(frame: int, n: int) -> str:
        r = frame % 14
        if r < 12 and r % 2 == 0:  # bright channel: alternate encodings
            return "compressed" if (frame // 14) % 2 else "raw"
        return "compressed" if 2 * 256 * 128 + 2 * n < 8 * n else "raw"

    t = time.perf_counter()
    write_siff(path, shape=(256, 128), channels=(1, 2), n_slices=6, n_flyback=1,
               n_timepoints=volumes, extra_frames=extra_frames, photons_per_frame=photons,
               channel_brightness=(1.0, 0.1),
               flyback_brightness=1.0, encoding=encoding, max_shift=4, return_truth=False,
               seed=7)
    print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB) in "
          f"{time.perf_counter() - t:.0f} s", flush=True)


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def fresh_process(code: str) -> float:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    return float(out.stdout.strip().splitlines()[-1])


def session_file(volumes: int, photons: float, path: Path | None = None) -> Path:
    """The benchmark file for these settings, written on first use."""
    path = path or HERE / "_data" / f"session_{volumes}v_{photons:g}p.siff"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        make_file(path, volumes, photons)
    return path


def parse_args(doc: str, flags: dict[str, str] | None = None,
               options: dict[str, tuple[type, object, str]] | None = None
               ) -> argparse.Namespace:
    """Command-line options shared by the benchmark scripts.

    Plus ``flags`` (name -> help) and ``options`` (name -> (type, default, help)).
    """
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--volumes", type=int, default=700)
    ap.add_argument("--photons", type=float, default=24000)
    ap.add_argument("--path", type=Path, default=None)
    ap.add_argument("--repeats", type=int, default=5)
    for name, text in (flags or {}).items():
        ap.add_argument(name, action="store_true", help=text)
    for name, (kind, default, text) in (options or {}).items():
        ap.add_argument(name, type=kind, default=default, help=text)
    return ap.parse_args()


def print_ratio_table(rows: list[tuple], theirs: str) -> None:
    """Print ``(name, ours_s, theirs_s, target)`` rows as a markdown table with ratios."""
    print(f"| operation | siff-xarray (s) | {theirs} | ratio | target |")
    print("|---|---:|---:|---:|---:|")
    for name, ours_t, theirs_t, target in rows:
        tgt = "" if target is None else f"<= {target:g}"
        print(f"| {name} | {ours_t:.3f} | {theirs_t:.3f} | {ours_t / theirs_t:.2f} | {tgt} |")


def main() -> None:
    args = parse_args(__doc__)
    path = session_file(args.volumes, args.photons, args.path)

    import corrosiffpy

    from siff_xarray import SiffFile

    f = SiffFile(path)  # also fills the frame-index cache
    c = corrosiffpy.open_file(str(path))
    n = f.num_frames
    frames = list(range(n))
    h, w = f.frame_shape
    rng = np.random.default_rng(0)
    mask = np.zeros((h, w), bool)
    mask[: h // 2] = True
    masks = np.zeros((10, h, w), bool)
    for i in range(10):
        masks[i, :, i * w // 10 : (i + 1) * w // 10] = True
    masks |= rng.random((10, h, w)) > 0.9

    # correctness first: the timings compare equal outputs
    assert np.array_equal(f.read_frames(frames[:50]), c.get_frames(frames[:50]))
    assert np.array_equal(f.sum_masks(masks, frames[:50]), c.sum_rois(masks, frames=frames[:50]))
    assert np.array_equal(f.histograms(frames[:50], mode="corrosiff"),
                          c.get_histogram_by_frames(frames[:50]))
    ours = f.lifetime_images(frames[:20], units="bins")
    theirs = c.flim_map(None, frames[:20])[0]
    assert np.allclose(ours, theirs, equal_nan=True)

    def plain_read() -> None:
        with open(path, "rb") as fh:
            while fh.read(16 << 20):
                pass

    r = args.repeats
    rows = [
        ("open (IFD walk, index cache off)",
         best(lambda: SiffFile(path, index_cache=False).close(), r),
         best(lambda: corrosiffpy.open_file(str(path)), r), 1.0),
        ("open (frame-index cache warm, the default)", best(lambda: SiffFile(path).close(), r),
         best(lambda: corrosiffpy.open_file(str(path)), r), 1.0),
        ("all intensity frames", best(lambda: f.read_frames(), r),
         best(lambda: c.get_frames(frames), r), 0.5),
        ("one mask", best(lambda: f.sum_mask(mask), r),
         best(lambda: c.sum_roi(mask, frames=frames), r), None),
        ("10 masks", best(lambda: f.sum_masks(masks), r),
         best(lambda: c.sum_rois(masks, frames=frames), r), 0.1),
        ("per-frame histograms", best(lambda: f.histograms(mode="corrosiff"), r),
         best(lambda: c.get_histogram_by_frames(frames), r), 1.0),
        ("lifetime images, all frames", best(lambda: f.lifetime_images(units="bins"), r),
         best(lambda: c.flim_map(None, frames), r), 0.1),
    ]
    code_ours = ("import time; t=time.perf_counter(); from siff_xarray import SiffFile; "
                 f"f=SiffFile({str(path)!r}); f.read_frames([0, 1]); f.histograms([0]); "
                 "f.sum_masks(__import__('numpy').ones((1,256,128),bool), [0]); "
                 "f.lifetime_images([0]); print(time.perf_counter()-t)")
    code_theirs = ("import time; t=time.perf_counter(); import corrosiffpy, numpy; "
                   f"c=corrosiffpy.open_file({str(path)!r}); c.get_frames([0, 1]); "
                   "c.get_histogram_by_frames([0]); c.sum_rois(numpy.ones((1,256,128),bool), "
                   "frames=[0]); c.flim_map(None, [0]); print(time.perf_counter()-t)")
    fresh_process(code_ours)  # make sure the Numba cache is warm
    first_ours = min(fresh_process(code_ours) for _ in range(2))
    first_theirs = min(fresh_process(code_theirs) for _ in range(2))
    plain = best(plain_read, r)

    def floor() -> None:  # what any float64 (F, H, W) result costs to allocate and write
        np.empty((n, h, w)).fill(0.0)

    floor_t = best(floor, r)

    size = path.stat().st_size
    print(f"\nfile: {path.name}, {size / 1e9:.2f} GB, {n} frames, "
          f"{os.cpu_count()} CPU(s); best of {r}\n")
    print_ratio_table(rows, "corrosiffpy (s)")
    print(f"| first call in a fresh process (warm Numba cache) | {first_ours:.2f} | "
          f"{first_theirs:.2f} | {first_ours / first_theirs:.2f} | <= 2 s |")
    print(f"| plain read of the file ({size / plain / 1e9:.1f} GB/s) | {plain:.3f} | | | |")
    print(f"| memory floor of a float64 (frames, y, x) result: allocate + fill | {floor_t:.3f} "
          f"| | {floor_t / rows[-1][2]:.2f} | |")


if __name__ == "__main__":
    main()
