"""Conversion benchmark: throughput, store size and peak memory of ``siff_xarray.convert``.

Run from the repository root (after the README's test set-up):

    .venv/bin/python benchmarks/bench_convert.py               # 0.83 GB and 1.65 GB files
    .venv/bin/python benchmarks/bench_convert.py --volumes 50  # quick look (+ 100 volumes)

Uses the session-like files of ``bench_reader.py`` (written once to
``benchmarks/_data/``): the default one and one with twice as many volumes. Every
job runs in a fresh process (peak RSS from ``wait4``), after one warm-up conversion
so that Numba's cache is filled. Reported per job: seconds, MB/s of ``.siff`` read,
store size and compression ratio, peak RSS. Baselines in the same run: a plain file
copy, and the naive ``xr.open_dataset(engine="siff", chunks={}).intensity.to_zarr``
(intensity only, no photons).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_reader import parse_args, session_file  # noqa: E402


def run(code: str) -> tuple[float, float]:
    """Run ``code`` in a fresh interpreter; return (wall seconds, peak RSS in MB)."""
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code])
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    if status != 0:
        raise RuntimeError(f"benchmark job failed ({status}): {code}")
    return wall, usage.ru_maxrss / 1024


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    args = parse_args(__doc__)
    files = [session_file(v, args.photons) for v in (args.volumes, 2 * args.volumes)]

    rows = []
    with tempfile.TemporaryDirectory(dir=HERE / "_data") as tmp:
        tmp = Path(tmp)
        # warm-up: compile/load the Numba kernels once
        run(f"from siff_xarray import convert; convert({str(files[0])!r}, "
            f"{str(tmp / 'warm.zarr')!r}, overwrite=True)")
        for src in files:
            size = src.stat().st_size
            t = time.perf_counter()
            shutil.copyfile(src, tmp / "copy.siff")
            copy_s = time.perf_counter() - t
            (tmp / "copy.siff").unlink()
            rows.append((src.name, "plain file copy", copy_s, size / 1e6 / copy_s, size,
                         None))
            for workers in (1, 2):
                dst = tmp / f"w{workers}.zarr"
                wall, rss = run(f"from siff_xarray import convert; convert({str(src)!r}, "
                                f"{str(dst)!r}, num_workers={workers}, overwrite=True)")
                rows.append((src.name, f"convert, {workers} worker(s)", wall,
                             size / 1e6 / wall, du(dst), rss))
            dst = tmp / "naive.zarr"
            wall, rss = run(
                "import xarray as xr; ds = xr.open_dataset("
                f"{str(src)!r}, engine='siff', chunks={{}}); "
                f"ds[['intensity']].to_zarr({str(dst)!r}, mode='w', consolidated=False)")
            rows.append((src.name, "naive open_dataset(...).intensity.to_zarr", wall,
                         size / 1e6 / wall, du(dst), rss))
            shutil.rmtree(dst, ignore_errors=True)
            for workers in (1, 2):
                shutil.rmtree(tmp / f"w{workers}.zarr", ignore_errors=True)

    print(f"\n{os.cpu_count()} CPU(s); sizes in MB; ratio = .siff size / output size\n")
    print("| file | job | s | MB/s of .siff | output MB | ratio | peak RSS MB |")
    print("|---|---|---:|---:|---:|---:|---:|")
    sizes = {f.name: f.stat().st_size for f in files}
    for name, job, s, rate, out, rss in rows:
        ratio = sizes[name] / out if out else float("nan")
        rss_txt = "" if rss is None else f"{rss:.0f}"
        print(f"| {name} | {job} | {s:.1f} | {rate:.0f} | {out / 1e6:.0f} | {ratio:.2f} | "
              f"{rss_txt} |")


if __name__ == "__main__":
    main()
