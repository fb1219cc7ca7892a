"""Remote benchmark: open, traces and conversion of a ``.siff`` served over HTTP at latency.

Run from the repository root (after the README's test set-up):

    .venv/bin/python benchmarks/bench_remote.py                 # 0.83 GB file
    .venv/bin/python benchmarks/bench_remote.py --volumes 100   # quick look
    .venv/bin/python benchmarks/bench_remote.py --fsspec-only   # every byte through fsspec

The session-like file of ``bench_reader.py`` is served by the tests' loopback range
server (127.0.0.1 only) with 0, 20 and 50 ms added to every request (S3's
first-byte latency is typically 10-50 ms), keeping connections open between
requests as S3 does. Per latency, each job runs in this process
(imports and Numba warm; the traces, the conversion and the local references three
times, reporting the median call; the others once): a plain sequential download of the file through
fsspec (the floor any reader of every byte pays), a cold open (empty index cache, no
sidecar), an open with a sidecar, all plane traces (``intensity.mean(("y", "x"))``)
eagerly and with Dask, the traces of one plane of seven (``intensity.isel(z=0)``:
its frames lie apart in the file, so they are read through their gaps only where
the server is measured to be fast enough), and a conversion to a local store. Reported: seconds,
requests (GET + HEAD), MB transferred, and ratios against the download (opens) or
the same job on the local file (traces, conversion), the issue's targets. The
conversion runs three times alternated with the local conversion, and is compared
with the median of those local calls (the machine's speed drifts over a run). It
runs again with each connection paced to 50 MB/s, as object stores serve
a single connection: there the transfer, not the CPU of moving bytes on this
machine, is what a conversion waits for (three calls as well, alternated with three
more local ones, which that row is compared with).

Large ranges of http(s) files are received with ``reader.http_ranges`` (plain
sockets, into the reader's buffers) rather than through fsspec's event loop, so a
second download row reads the file that way, as fast as the reader can: in 8 MiB
ranges (the parts it asks spans in), all of them on their way at once over as many
connections as it keeps (32).
``--fsspec-only`` turns that off (every read through fsspec, as before).

The last column compares each job with its physical floor on this machine, measured
in the same run: the fsspec download for opens (the issue's reference), for traces
(they need every byte once) the longer of the reader's own download and the CPU
floor below, and for the conversion
a local conversion that runs while the file is downloaded in the conversion's
pattern (4 MiB ranges, four at a time, as the reader moves them) in another thread.
The server runs in this process and the client's HTTP stack is Python, so moving the
bytes costs CPU on the same two cores the conversion keeps busy; that floor measures it.

"CPU s" is the process's user + system time during a job: the client's and the
server's (sending the file is system time). However well a remote read overlaps the
transfer with decoding, it needs the CPU of both, so (the reader's download CPU + the
local job's CPU) / CPUs is a floor on its time on this machine, printed per latency
for the traces with its ratio to the local run: where that ratio is above 3, the
issue's "<= 3x local" cannot be met on this machine by a reader that moves the bytes
that way.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from bench_reader import parse_args, session_file  # noqa: E402
from conftest import _RangeServer  # noqa: E402

Measured = tuple[float, int, float, float]


def median_call(runs: list[Measured]) -> Measured:
    """The call of median seconds among ``runs`` (of :func:`measure`)."""
    return sorted(runs, key=lambda r: r[0])[len(runs) // 2]


def measure(server: _RangeServer | None, fn, repeat: int = 1) -> Measured:
    """Run ``fn``; return (seconds, requests, MB sent by the server, CPU seconds).

    CPU seconds are this process's user + system time: the client's, and the
    server's too (it runs in this process; sending the file is system time).
    With ``repeat``, ``fn`` runs that many times and the call of median seconds
    is returned (the same call on this machine varies by 30 % and more).
    """
    if repeat > 1:
        return median_call([measure(server, fn) for _ in range(repeat)])
    r0 = 0 if server is None else server.requests + server.heads
    b0 = 0 if server is None else server.bytes_sent
    c0 = os.times()
    t = time.perf_counter()
    fn()
    dt = time.perf_counter() - t
    c1 = os.times()
    cpu = c1.user - c0.user + c1.system - c0.system
    if server is None:
        return dt, 0, 0.0, cpu
    return dt, server.requests + server.heads - r0, (server.bytes_sent - b0) / 1e6, cpu


def measure_alternating(server: _RangeServer, remote, local, repeat: int
                        ) -> tuple[Measured, Measured]:
    """Run ``remote`` and ``local`` in turn, ``repeat`` times each; the median call of each.

    The ratio of the two then compares calls made under the same conditions: this
    machine's speed drifts by 10-30 % over a run, more than a conversion's ratio
    to local moves with a change.
    """
    runs: tuple[list, list] = ([], [])
    for _ in range(repeat):
        runs[0].append(measure(server, remote))
        runs[1].append(measure(None, local))
    return median_call(runs[0]), median_call(runs[1])


#: bytes per request of the reader's fastest download (the parts spans are asked in)
PART = 8 * 2**20
#: calls per local reference and per remote traces job (the median call is reported)
REPEAT = 3
#: bytes per second per connection of the paced conversion row (S3 serves a single
#: connection at roughly 50-100 MB/s; here the CPU of moving bytes no longer bounds it)
PACED_RATE = 50e6


def download(fs, url: str, direct, size: int, inflight: int, step: int = 4 * 2**20,
             mem: memoryview | None = None) -> None:
    """Read the file in ``step``-byte ranges, ``inflight`` at once, as the reader does.

    With ``direct`` (a :class:`~siff_xarray.reader.http_ranges.DirectRanges`) into
    one reused buffer (``mem``, at least ``inflight * step`` bytes: made here if not
    given), else through fsspec's ``cat_ranges``.
    """
    starts = list(range(0, size, step))
    if mem is None:
        mem = memoryview(bytearray(inflight * step))
    for k in range(0, len(starts), inflight):
        part = starts[k : k + inflight]
        stops = [min(a + step, size) for a in part]
        if direct is None:
            fs.cat_ranges([url] * len(part), part, stops)
        else:
            direct.fetch_into(mem, part, stops, [i * step for i in range(len(part))])


def served_copy(src: Path, tmp: Path) -> str:
    """Put ``src`` in a new ``tmp/served`` directory as ``run.siff`` (a hard link where
    it can be); return its path. The server serves that directory."""
    served = tmp / "served"
    served.mkdir()
    os.link(src, served / "run.siff") if src.stat().st_dev == served.stat().st_dev \
        else shutil.copy(src, served / "run.siff")
    return str(served / "run.siff")


#: the child process of :func:`served_in_child`: serve a directory, print its URL, wait
CHILD_SERVER = """
import sys, time
sys.path.insert(0, {tests!r})
from conftest import _RangeServer
s = _RangeServer(sys.argv[1]); s.latency = float(sys.argv[2]); s.keep_alive = True
print(s.url, flush=True)
while True:
    time.sleep(3600)
"""


@contextlib.contextmanager
def served_in_child(directory: str | Path, latency_s: float
                    ) -> Iterator[tuple[subprocess.Popen, str]]:
    """Serve ``directory`` with the tests' loopback range server in a child process.

    127.0.0.1 only, ``latency_s`` added to every request, connections kept open as
    S3 does. Yields the process (its CPU and memory are its own) and the server's
    base URL; the process is killed on exit.
    """
    code = CHILD_SERVER.format(tests=str(HERE.parent / "tests"))
    proc = subprocess.Popen([sys.executable, "-c", code, str(directory), str(latency_s)],
                            stdout=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()
        if not url:
            raise RuntimeError("the loopback server did not start")
        yield proc, url
    finally:
        proc.kill()
        proc.wait()


def cores() -> int:
    """CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        os.cpu_count() or 1


def main() -> None:
    import fsspec
    import xarray as xr

    import siff_xarray
    from siff_xarray import SiffFile
    from siff_xarray.reader.http_ranges import MAX_CONNECTIONS, direct_ranges
    from siff_xarray.reader.index_cache import forget
    from siff_xarray.reader.source import FsspecSource

    args = parse_args(__doc__, {"--fsspec-only": "read every byte through fsspec"})
    if args.fsspec_only:
        FsspecSource.direct_http = False
    src = session_file(args.volumes, args.photons, args.path)
    size_mb = src.stat().st_size / 1e6
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory(dir=HERE / "_data") as tmp:
        tmp = Path(tmp)
        local = served_copy(src, tmp)
        served = Path(local).parent

        def traces(path: str, chunks, plane: int | None = None) -> None:
            with xr.open_dataset(path, engine="siff", chunks=chunks,
                                 index_cache=tmp / "cache-traces") as ds:
                data = ds.intensity if plane is None else ds.intensity.isel(z=plane)
                data.mean(("y", "x")).compute()

        def convert(path: str, name: str) -> None:
            siff_xarray.convert(path, tmp / name, overwrite=True)
            shutil.rmtree(tmp / name)
            side = Path(local + ".siffidx")  # the conversion writes it; later jobs must not
            side.unlink(missing_ok=True)     # find it unless they ask for it

        # local references (warm-up first: Numba cache, page cache)
        traces(local, None)
        local_runs = {
            "traces (eager)": measure(None, lambda: traces(local, None), REPEAT),
            "traces (Dask)": measure(None, lambda: traces(local, {}), REPEAT),
            "one plane (eager)": measure(None, lambda: traces(local, None, 0), REPEAT),
            "one plane (Dask)": measure(None, lambda: traces(local, {}, 0), REPEAT),
            "convert": measure(None, lambda: convert(local, "local.zarr"), REPEAT),
        }
        ref = {k: v[0] for k, v in local_runs.items()}
        print(f"file: {src.name}, {size_mb:.0f} MB; local: "
              + ", ".join(f"{k} {v[0]:.2f} s ({v[3]:.2f} CPU s)"
                          for k, v in local_runs.items()) + f"; {cores()} CPUs")
        print()
        print("| latency | job | seconds | CPU s | requests | MB read | ratio | against "
              "| target | x floor |")
        print("|---:|---|---:|---:|---:|---:|---:|---|---:|---:|")
        landing = memoryview(bytearray(MAX_CONNECTIONS * PART))
        for latency in (0.0, 0.02, 0.05):
            server = _RangeServer(str(served))
            server.latency = latency
            server.keep_alive = True  # as S3 does
            url = f"{server.url}/run.siff"
            try:
                fs = fsspec.filesystem("http")
                dl = measure(server, lambda: fs.cat_file(url))  # noqa: B023
                direct = direct_ranges(url, None) if FsspecSource.direct_http else None
                size = int(src.stat().st_size)
                # the fastest the reader moves the file: every range on its way at
                # once, as many as it keeps connections, in the parts spans are asked in
                # (into memory made and touched before: the reader reuses its buffers)
                reader_dl = measure(server, lambda: download(
                    fs, url, direct, size, MAX_CONNECTIONS, PART, landing))  # noqa: B023

                def download_in_parts() -> None:
                    download(fs, url, direct, size, 4)  # noqa: B023

                def convert_while_downloading() -> None:
                    job = threading.Thread(target=download_in_parts)
                    job.start()
                    convert(local, "floor.zarr")
                    job.join()

                floor_convert = measure(server, convert_while_downloading)[0]
                how = "fsspec" if direct is None else "direct"
                rows = [("plain download (fsspec)", dl, None, "", None, None),
                        (f"download in {PART >> 20} MiB ranges, {MAX_CONNECTIONS} at once "
                         f"({how})", reader_dl, None, "", None, None),
                        ("local convert while downloading", (floor_convert, 0, 0.0, 0.0),
                         None, "", None, None)]
                # however well a remote read overlaps transfer and decoding, it needs
                # the CPU of both: spread over every core, that is a floor on its time
                cpu_floor = {k: (reader_dl[3] + v[3]) / cores()
                             for k, v in local_runs.items()}
                for k in ("traces (eager)", "traces (Dask)"):
                    rows.append((f"CPU floor of {k}: (download + local) CPU / {cores()}",
                                 (cpu_floor[k], 0, 0.0, 0.0), ref[k], "local", None, None))

                def cold() -> None:
                    forget()  # nothing known in this process: as a fresh machine
                    cache = tmp / f"cold-{time.monotonic_ns()}"
                    with SiffFile(url, index_cache=cache) as f:  # noqa: B023
                        f.timestamps()

                rows.append(("cold open", measure(server, cold), dl[0], "download", 2, dl[0]))
                with SiffFile(local) as f:
                    f.write_sidecar()
                rows.append(("open with sidecar", measure(server, cold), dl[0], "download",
                             None, None))
                for chunks, name in ((None, "traces (eager)"), ({}, "traces (Dask)")):
                    forget()
                    res = measure(server, lambda c=chunks: traces(url, c),  # noqa: B023
                                  REPEAT)
                    # floor: the download, or the CPU it and the local job need together
                    rows.append((name, res, ref[name], "local", 3,
                                 max(reader_dl[0], cpu_floor[name])))
                for chunks, name in ((None, "one plane (eager)"), ({}, "one plane (Dask)")):
                    res = measure(server, lambda c=chunks: traces(url, c, 0),  # noqa: B023
                                  REPEAT)
                    rows.append((name, res, ref[name], "local", None, None))
                Path(local + ".siffidx").unlink(missing_ok=True)
                res, here = measure_alternating(
                    server, lambda: convert(url, "remote.zarr"),  # noqa: B023
                    lambda: convert(local, "local.zarr"), REPEAT)
                rows.append(("local convert, alternated with the next row", here, None, "",
                             None, None))
                rows.append(("convert", res, here[0], "local", 3, floor_convert))
                # as object stores serve one connection: tens of MB/s, many at once

                def paced() -> None:
                    server.rate = PACED_RATE  # noqa: B023
                    try:
                        convert(url, "paced.zarr")  # noqa: B023
                    finally:
                        server.rate = 0.0  # noqa: B023

                res, here = measure_alternating(
                    server, paced, lambda: convert(local, "local.zarr"), REPEAT)
                rows.append((f"convert, {PACED_RATE / 1e6:.0f} MB/s per connection", res,
                             here[0], "local", None, None))
            finally:
                server.close()
            for name, (sec, req, mb, cpu), against, what, target, floor in rows:
                ratio = f"{sec / against:.2f}" if against else ""
                tgt = f"<= {target}" if target else ""
                over = f"{sec / floor:.2f}" if floor else ""
                used = f"{cpu:.2f}" if cpu else ""
                print(f"| {latency * 1000:.0f} ms | {name} | {sec:.2f} | {used} | {req} | "
                      f"{mb:.0f} | {ratio} | {what} | {tgt} | {over} |")


if __name__ == "__main__":
    main()
