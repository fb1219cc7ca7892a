"""S3 benchmark: conversions to and from S3-compatible endpoints at object-store latency.

Run from the repository root (after the README's test set-up):

    .venv/bin/python benchmarks/bench_s3.py                  # 0.83 GB file
    .venv/bin/python benchmarks/bench_s3.py --volumes 100    # quick look
    # the walkthrough's size (bench_scale.py --write), the object store elsewhere only:
    .venv/bin/python benchmarks/bench_s3.py --path benchmarks/_data/scale_6736v.siff \
        --elsewhere-only --latencies 20 --processes 3

Two S3 endpoints (``s3_endpoint.py``) run in child processes on 127.0.0.1, each adding
0, 20 or 50 ms to every request (S3's first-byte latency is typically 10-50 ms; its
PUTs take longer) and counting them: the source, which serves the benchmark file of
``bench_reader.py`` as ``s3://bench-src/run.siff`` from disk, and the destination,
which keeps what is written in memory. They answer what s3fs asks during a
conversion and spend little CPU per byte, as a real object store spends its own
elsewhere. (moto, which the tests use for S3's semantics, cannot stand in: on these
two cores its CPU per byte stored made a conversion to it 2.65x a local one at 0 ms,
and it reads the whole object for every ranged GET.)

Per latency, four conversions run three times each, alternated: the local file to a
local store (the reference), the local file to S3, the S3 object to a local store,
and the issue's ``convert s3://.../run.siff s3://.../run.zarr``. Each conversion from
S3 finds the object's frame index in this process's cache (a first conversion on a
fresh machine also walks the file once: ``bench_remote.py``'s cold open). Reported per
job: the median call's seconds, the requests it sent to each endpoint and the round
trips they waited there (requests sent together count once), its CPU seconds (this
process's and both endpoints'), its ratio to the local conversion of the same round,
and its ratio to the same job at 0 ms: what the latency costs. At 0 ms the CPU of the
transfers alone is measured too (:func:`_transfer_cpu`), to tell what the S3
conversions spend from what they wait. One conversion to S3 is checked with
``verify`` against the file.

Last, the object store elsewhere (:func:`_store_elsewhere`): the endpoints on a core
of their own and the conversions (local -> local and S3 -> S3, at ``--latencies``,
0 and 20 ms unless given) on the others, as where the object store's CPU is not the
client's, in ``--processes`` fresh processes (``--elsewhere-only``: nothing else).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_reader import parse_args, session_file  # noqa: E402

#: calls per job and latency (the median call is reported)
REPEAT = 3


@contextlib.contextmanager
def endpoint(root: Path, latency_s: float, cores: set[int] | None = None
             ) -> Iterator[tuple[str, str]]:
    """An S3 endpoint over ``root`` in a child process; yield its URL and its counts' page.

    ``cores``: the CPUs the endpoint runs on (default: those of this process).
    """
    proc = subprocess.Popen([sys.executable, str(HERE / "s3_endpoint.py"), str(root),
                             str(latency_s)], stdout=subprocess.PIPE, text=True)
    if cores is not None:
        os.sched_setaffinity(proc.pid, cores)
    try:
        urls = proc.stdout.readline().split()
        if len(urls) != 2:
            raise RuntimeError("the S3 endpoint did not start")
        yield urls[0], urls[1]
    finally:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def _buckets(src: Path) -> Iterator[tuple[Path, Path, Path]]:
    """Yield the endpoints' roots (the source's bucket serving ``src``, an empty one)
    and a local store's path, all in a temporary directory."""
    with tempfile.TemporaryDirectory(dir=HERE / "_data") as tmp:
        served, empty = Path(tmp) / "served", Path(tmp) / "empty"
        (served / "bench-src").mkdir(parents=True)
        (empty / "bench-dst").mkdir(parents=True)
        os.symlink(src.resolve(), served / "bench-src" / "run.siff")
        yield served, empty, Path(tmp) / "local.zarr"


def _stats(page: str, since: tuple[int, int] = (0, 0)) -> dict[str, int]:
    with urllib.request.urlopen(f"{page}/{since[0]}/{since[1]}", timeout=10) as r:
        return json.loads(r.read())


@contextlib.contextmanager
def _counted(src_page: str, dst_page: str) -> Iterator[list]:
    """Measure the block; fill the yielded list with its seconds, requests and CPU.

    As ``[seconds, source requests, destination requests, source round trips,
    destination round trips, CPU seconds of this process and both endpoints]``.
    """
    before = [_stats(page) for page in (src_page, dst_page)]
    out: list = []
    c0, t0 = time.process_time(), time.perf_counter()
    yield out
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    got = [_stats(page, (b["requests"], b["arrivals"]))
           for page, b in zip((src_page, dst_page), before, strict=True)]
    out.extend([dt, *[g["requests"] - b["requests"] for g, b in zip(got, before, strict=True)],
                *[g["rounds"] for g in got],
                cpu + sum(g["cpu_s"] - b["cpu_s"] for g, b in zip(got, before, strict=True))])


def _transfer_cpu(src: Path, remote: str, source_options: dict, target_options: dict,
                  local_dst: Path, src_page: str, dst_page: str, repeat: int
                  ) -> tuple[float, float]:
    """CPU seconds of the S3 -> S3 conversion's two transfers alone: ``(read, write)``.

    Reading every byte of the source object as the conversion does (16 MiB ranges
    through the package's own reader, two threads), and writing the objects of the
    store it makes (the local store's files, put through s3fs as the conversion's
    writes are, two threads). Each includes the endpoints' CPU; medians of
    ``repeat`` calls each. With a local conversion's CPU (its decoding and
    compression) they bound what an S3 -> S3 conversion can take on these cores.
    """
    from concurrent.futures import ThreadPoolExecutor

    import siff_xarray
    from siff_xarray.reader.source import open_source
    from siff_xarray.store.layout import Target

    siff_xarray.convert(src, local_dst, overwrite=True)
    files = {p.relative_to(local_dst).as_posix(): p.read_bytes()
             for p in sorted(local_dst.rglob("*")) if p.is_file()}
    shutil.rmtree(local_dst)
    size, piece = src.stat().st_size, 16 * 2**20

    def read() -> None:
        source = open_source(remote, source_options)
        try:
            with ThreadPoolExecutor(2) as pool:
                for _ in pool.map(lambda a: source.fetch_consecutive(a, min(a + piece, size)),
                                  range(0, size, piece)):
                    pass
        finally:
            source.close()

    target = Target("s3://bench-dst/copy.zarr", target_options)

    def write() -> None:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda kv: target.write_bytes(*kv), files.items()))

    def remove() -> None:  # (not counted: the conversion deletes nothing)
        target.fs.rm(target.root, recursive=True)
        target.fs.invalidate_cache()

    cpu = {}
    for name, job, after in (("read", read, None), ("write", write, remove)):
        calls = []
        for _ in range(repeat):
            with _counted(src_page, dst_page) as got:
                job()
            calls.append(got[-1])
            if after is not None:
                after()
        cpu[name] = sorted(calls)[len(calls) // 2]
    return cpu["read"], cpu["write"]


def _store_elsewhere(src: Path, repeat: int, latencies_ms: list[float], processes: int
                     ) -> list[list[tuple]]:
    """Local and S3 -> S3 conversions with the endpoints on a core of their own.

    On one machine the endpoints spend their CPU (the kernel's copies through the
    loopback, the parsing of requests) on the cores the conversion uses; a real
    object store spends it elsewhere. Here the endpoints run on the last core and
    both conversions, alternated, in a child process on the others (pinned from its
    start: threads keep the cores they were started on). Per process (``processes``
    of them, one after the other, each with its own caches) and latency: the median
    call's seconds and the child's CPU seconds, and the multiple of the local
    conversion. Empty on a single core.
    """
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return []
    mine = set(cores[:-1])
    out = []
    for _ in range(processes):
        done = subprocess.run(
            [sys.executable, __file__, "--path", str(src), "--repeats", str(repeat),
             "--latencies", ",".join(f"{ms:g}" for ms in latencies_ms), "--elsewhere"],
            capture_output=True, text=True, check=True,
            env={**os.environ, "SIFF_BENCH_ENDPOINT_CORES": str(cores[-1])},
            preexec_fn=lambda: os.sched_setaffinity(0, mine))
        out.append([tuple(row) for row in json.loads(done.stdout.strip().splitlines()[-1])])
    return out


def _elsewhere_child(src: Path, repeat: int, latencies_ms: list[float]) -> None:
    """The child of :func:`_store_elsewhere`: print its rows as JSON (last line)."""
    import s3fs

    import siff_xarray

    theirs = {int(c) for c in os.environ["SIFF_BENCH_ENDPOINT_CORES"].split(",")}
    rows = []
    with _buckets(src) as (served, empty, local_dst):
        for latency in (ms / 1000 for ms in latencies_ms):
            with endpoint(served, latency, theirs) as (source, _), \
                    endpoint(empty, latency, theirs) as (destination, _):
                s3 = [{"key": "testing", "secret": "testing",
                       "client_kwargs": {"endpoint_url": url}} for url in (source, destination)]
                dst_fs = s3fs.S3FileSystem(**s3[1], skip_instance_cache=True)

                def local() -> None:
                    siff_xarray.convert(src, local_dst, overwrite=True)
                    shutil.rmtree(local_dst)

                def remote(dst_fs: Any = dst_fs, s3: list = s3) -> None:
                    siff_xarray.convert("s3://bench-src/run.siff", "s3://bench-dst/run.zarr",
                                        overwrite=True, storage_options=s3[0],
                                        target_options=s3[1])
                    dst_fs.rm("bench-dst/run.zarr", recursive=True)
                    dst_fs.invalidate_cache()

                jobs = {"local -> local": local, "S3 -> S3": remote}
                for job in jobs.values():  # (warm: Numba, this process's clients, the index,
                    job()  # the page cache)
                runs: dict[str, list[tuple[float, float, float]]] = {k: [] for k in jobs}
                for _ in range(repeat):
                    for name, job in jobs.items():
                        c0, t0 = os.times(), time.perf_counter()
                        job()
                        c1 = os.times()
                        runs[name].append((time.perf_counter() - t0,
                                           c1.user + c1.system - c0.user - c0.system,
                                           c1.system - c0.system))
                med = {k: sorted(v)[len(v) // 2] for k, v in runs.items()}
                for name, (dt, cpu, system) in med.items():
                    rows.append((f"{latency * 1000:.0f} ms", name, dt, cpu,
                                 dt / med["local -> local"][0], system))
    print(json.dumps(rows))


def _print_elsewhere(per_process: list[list[tuple]], repeat: int, size_mb: float) -> None:
    """Print :func:`_store_elsewhere`'s rows: per process, and the median multiple."""
    cores = sorted(os.sched_getaffinity(0))
    print(f"\nThe object store elsewhere: the endpoints on core {cores[-1]}, the "
          f"conversions on {len(cores) - 1} other core(s), in {len(per_process)} fresh "
          f"process(es) one after the other (in each, the median of {repeat} calls, "
          "alternated; CPU: that process's)\n")
    print("| latency | job | seconds, per process | MB/s of the source, per process | "
          "CPU seconds (of them in the kernel), per process | x local, per process | "
          "median x local |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for i, (lat, name, *_) in enumerate(per_process[0]):
        got = [rows[i] for rows in per_process]
        ratios = sorted(r[4] for r in got)
        print(f"| {lat} | {name} | {' / '.join(f'{r[2]:.2f}' for r in got)} | "
              f"{' / '.join(f'{size_mb / r[2]:.0f}' for r in got)} | "
              f"{' / '.join(f'{r[3]:.2f} ({r[5]:.2f})' for r in got)} | "
              f"{' / '.join(f'{r[4]:.2f}' for r in got)} | {ratios[len(ratios) // 2]:.2f} |")


def main() -> None:
    args = parse_args(__doc__, {
        "--elsewhere": "(internal) the child of _store_elsewhere",
        "--elsewhere-only": "only the conversions with the object store elsewhere"}, {
        "--latencies": (str, "0,20", "with the object store elsewhere: milliseconds per "
                        "request, comma-separated"),
        "--processes": (int, 1, "with the object store elsewhere: fresh processes, one "
                        "after the other")})
    repeat = args.repeats if "--repeats" in sys.argv else REPEAT
    src = session_file(args.volumes, args.photons, args.path)
    latencies_ms = [float(ms) for ms in args.latencies.split(",")]
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    warnings.simplefilter("ignore")
    if args.elsewhere:
        _elsewhere_child(src, repeat, latencies_ms)
        return
    size_mb = src.stat().st_size / 1e6
    if args.elsewhere_only:
        _print_elsewhere(_store_elsewhere(src, repeat, latencies_ms, args.processes),
                         repeat, size_mb)
        return
    import s3fs

    import siff_xarray

    rows, checked = [], None
    with _buckets(src) as (served, empty, local_dst):
        siff_xarray.convert(src, local_dst, overwrite=True)  # warm-up: Numba, page cache
        shutil.rmtree(local_dst)
        zero: dict[str, float] = {}
        remote = "s3://bench-src/run.siff"
        for latency in (0.0, 0.02, 0.05):
            with endpoint(served, latency) as (source, src_page), \
                    endpoint(empty, latency) as (destination, dst_page):
                def s3(url: str) -> dict:  # (as users pass them: fsspec keeps the
                    # filesystem for the next call; a new one takes 0.1 s to make)
                    return {"key": "testing", "secret": "testing",
                            "client_kwargs": {"endpoint_url": url}}

                dst_fs = s3fs.S3FileSystem(**s3(destination), skip_instance_cache=True)

                def convert(source_path: str, to_s3: bool, dst_fs: Any = dst_fs) -> None:
                    target = "s3://bench-dst/run.zarr" if to_s3 else local_dst
                    siff_xarray.convert(source_path, target, overwrite=True,
                                        storage_options=s3(source),
                                        target_options=s3(destination))
                    if to_s3:
                        dst_fs.rm("bench-dst/run.zarr", recursive=True)
                        dst_fs.invalidate_cache()
                    else:
                        shutil.rmtree(local_dst)

                jobs = {"local -> local": lambda: convert(str(src), False),
                        "local -> S3": lambda: convert(str(src), True),
                        "S3 -> local": lambda: convert(remote, False),
                        "S3 -> S3": lambda: convert(remote, True)}
                convert(remote, False)  # this process's frame index of the S3 object
                if checked is None:  # the endpoint keeps what a conversion writes
                    siff_xarray.convert(remote, "s3://bench-dst/run.zarr",
                                        storage_options=s3(source),
                                        target_options=s3(destination))
                    checked = siff_xarray.verify(src, "s3://bench-dst/run.zarr",
                                                 target_options=s3(destination))
                    dst_fs.rm("bench-dst/run.zarr", recursive=True)
                runs: dict[str, list[tuple]] = {k: [] for k in jobs}
                for _ in range(repeat):
                    for name, job in jobs.items():
                        with _counted(src_page, dst_page) as got:
                            job()
                        runs[name].append(got)
                med = {k: sorted(v)[len(v) // 2] for k, v in runs.items()}
                ref = med["local -> local"][0]
                for name, (dt, src_req, dst_req, src_rounds, dst_rounds, cpu) in med.items():
                    if latency == 0.0:
                        zero[name] = dt
                    rows.append((f"{latency * 1000:.0f} ms", name, dt, src_req, src_rounds,
                                 dst_req, dst_rounds, cpu, dt / ref, dt / zero[name]))
                if latency == 0.0:
                    local_cpu = med["local -> local"][-1]
                    read_cpu, write_cpu = _transfer_cpu(src, remote, s3(source),
                                                        s3(destination), local_dst,
                                                        src_page, dst_page, repeat)
    elsewhere = _store_elsewhere(src, repeat, latencies_ms, args.processes)
    print(f"\nConversions of {src.name} ({size_mb:.0f} MB); median of {repeat} calls, "
          "alternated\n")
    print("| latency | job | seconds | source requests (round trips) | destination requests "
          "(round trips) | CPU seconds | x local | x same job at 0 ms |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for lat, name, dt, sq, sr, dq, dr, cpu, x_local, x_zero in rows:
        print(f"| {lat} | {name} | {dt:.2f} | {sq} ({sr}) | {dq} ({dr}) | {cpu:.2f} | "
              f"{x_local:.2f} | {x_zero:.2f} |")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    s3_cpu = next(cpu for lat, name, *_, cpu, _x, _z in rows
                  if lat == "0 ms" and name == "S3 -> S3")
    least = max(zero["local -> local"], (local_cpu + read_cpu + write_cpu) / cores)
    print(f"\nCPU seconds at 0 ms (this process and both endpoints; medians of {repeat}): "
          f"the local conversion {local_cpu:.2f}, the S3 -> S3 conversion {s3_cpu:.2f}; "
          f"reading the object alone {read_cpu:.2f}, writing the store's objects alone "
          f"{write_cpu:.2f}. The S3 -> S3 conversion spends "
          f"{s3_cpu - local_cpu - read_cpu - write_cpu:+.2f} s of CPU beyond the local "
          f"conversion and the two transfers. On {cores} cores it could take as little as "
          f"{least:.2f} s (the local conversion's time, or the three's CPU over the cores "
          f"where more); its own CPU over the cores is {s3_cpu / cores:.2f} s, "
          f"{s3_cpu / cores / zero['local -> local']:.2f}x the local conversion's time: the "
          "least it takes here however well its work overlaps.")
    print(f"\nverify of the S3 -> S3 store against the file: {checked or 'no problems'}")
    if elsewhere:
        _print_elsewhere(elsewhere, repeat, size_mb)

if __name__ == "__main__":
    main()
