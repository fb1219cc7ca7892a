"""Remote conversion with the loopback server in a process of its own: whose CPU is it?

Run from the repository root (after the README's test set-up):

    .venv/bin/python benchmarks/bench_remote_split.py                # 0.83 GB file, 20 ms
    .venv/bin/python benchmarks/bench_remote_split.py --latency 50 --repeats 5

``bench_remote.py`` runs the server in the benchmark's process, where the server's
CPU (sending the file) and the client's (receiving it) add up and share one GIL. Here
the tests' loopback range server (127.0.0.1 only, connections kept open as S3
does) runs in a child process; the conversion of the benchmark file from it runs
``--repeats`` times, alternated with two local conversions of the same file (the
machine's speed drifts over a run): one with the file in the page cache, as every
other local reference in these benchmarks, and one "cold", with the file's pages
dropped from the cache first (``posix_fadvise(POSIX_FADV_DONTNEED)``), as a file
read for the first time after it was copied or recorded. Printed: the medians of
wall time, of this process's CPU (user + system) and of the server process's CPU
over the same calls, and the ratios of the remote median to the local ones.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_reader import session_file  # noqa: E402
from bench_remote import served_copy, served_in_child  # noqa: E402


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux ``/proc``)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def evict(path: str) -> None:
    """Drop the clean pages of ``path`` from the page cache (Linux; no root needed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def main() -> None:
    import numpy as np

    import siff_xarray

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--volumes", type=int, default=700)
    ap.add_argument("--photons", type=float, default=24000)
    ap.add_argument("--latency", type=float, default=20.0, help="ms added per request")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    src = session_file(args.volumes, args.photons, None)
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory(dir=HERE / "_data") as tmp_name:
        tmp = Path(tmp_name)
        local = served_copy(src, tmp)
        served = Path(local).parent
        with served_in_child(served, args.latency / 1000) as (server, base):
            url = base + "/run.siff"

            def convert(path: str) -> None:
                siff_xarray.convert(path, tmp / "out.zarr", overwrite=True)
                shutil.rmtree(tmp / "out.zarr")
                Path(local + ".siffidx").unlink(missing_ok=True)

            def measure(path: str, cold: bool = False) -> tuple[float, float, float]:
                if cold:
                    evict(local)
                s0, c0, t0 = process_cpu(server.pid), os.times(), time.perf_counter()
                convert(path)
                dt, c1 = time.perf_counter() - t0, os.times()
                return (dt, c1.user - c0.user + c1.system - c0.system,
                        process_cpu(server.pid) - s0)

            convert(local)  # warm-up: Numba cache, page cache, connections
            convert(url)
            runs: dict[str, list] = {"remote": [], "local": [], "cold local": []}
            for _ in range(args.repeats):
                runs["remote"].append(measure(url))
                runs["local"].append(measure(local))
                runs["cold local"].append(measure(local, cold=True))
    print(f"file: {src.name}, {src.stat().st_size / 1e6:.0f} MB; {args.latency:g} ms per "
          f"request; medians of {args.repeats} calls each, alternated")
    print("| job | seconds | client CPU s | server CPU s |")
    print("|---|---:|---:|---:|")
    for name, rows in runs.items():
        wall, client, served_cpu = np.median(np.array(rows), axis=0)
        print(f"| {name} convert | {wall:.2f} | {client:.2f} | {served_cpu:.2f} |")
    remote = np.median([r[0] for r in runs["remote"]])
    for name in ("local", "cold local"):
        print(f"remote / {name}: {remote / np.median([r[0] for r in runs[name]]):.2f}x")


if __name__ == "__main__":
    main()
