"""S3 benchmark: conversions to and from an S3-compatible server at object-store latency.

Run from the repository root (after the README's test set-up):

    .venv/bin/python benchmarks/bench_s3.py                  # 0.83 GB file
    .venv/bin/python benchmarks/bench_s3.py --volumes 100    # quick look

moto's S3 server runs in a child process on 127.0.0.1, and in front of it, in another
child process, the tests' counting proxy adds 0, 20 or 50 ms to every request (S3's
first-byte latency is typically 10-50 ms; its PUTs take longer) and counts them. The
benchmark file of ``bench_reader.py`` is uploaded once. Per latency, two conversions
run three times each, alternated: the local file to a local store (the reference) and
the local file to a store on S3. Reported per job: the median call's seconds, the
requests it sent (through the proxy) and the round trips they waited (requests sent
together count once), its ratio to the local conversion of the same round, and its
ratio to the same job at 0 ms: what the latency costs. moto runs on the same two
cores as the conversion and spends CPU of its own on every byte stored (which a real
object store spends elsewhere), and the proxy copies every byte in Python, so the
ratio to local includes their work; the ratio to 0 ms does not.

The issue's ``convert s3://.../run.siff s3://.../run.zarr`` runs once per latency
too, but moto cannot measure it: it reads the whole object for every ranged GET
(the script measures one 1 MiB GET of the benchmark object against one of a 16 MiB
object and prints both), so that row shows moto's cost, not the reader's. The
reader's cost for a remote source is measured by ``bench_remote.py`` (HTTP).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_reader import parse_args, session_file  # noqa: E402

#: calls per job and latency (the median call is reported)
REPEAT = 3

#: the proxy child: the tests' counting proxy, plus a loopback page with its counts
CHILD_PROXY = """
import http.server, json, sys, threading, time
sys.path.insert(0, {tests!r})
from conftest import _CountingProxy, _rounds
p = _CountingProxy(sys.argv[1]); p.latency = float(sys.argv[2])
class Stats(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_GET(self):
        since = int(self.path.strip("/") or 0)
        with p.lock:
            body = json.dumps({{"requests": len(p.log),
                               "rounds": _rounds(p.arrivals[since:], p.latency)}}).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body)))
        self.end_headers(); self.wfile.write(body)
stats = http.server.HTTPServer(("127.0.0.1", 0), Stats)
threading.Thread(target=stats.serve_forever, daemon=True).start()
print(p.url, f"http://127.0.0.1:{{stats.server_address[1]}}", flush=True)
while True:
    time.sleep(3600)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_in_child() -> Iterator[str]:
    """Run moto's S3 server in a child process on 127.0.0.1; yield its URL."""
    port = _free_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                with urllib.request.urlopen(url + "/moto-api/", timeout=1):
                    break
            except OSError:
                time.sleep(0.2)
        else:
            raise RuntimeError("the moto S3 server did not start")
        yield url
    finally:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def proxy_in_child(target: str, latency_s: float) -> Iterator[tuple[str, str]]:
    """The counting proxy in front of ``target``; yield its URL and its counts' page."""
    code = CHILD_PROXY.format(tests=str(HERE.parent / "tests"))
    proc = subprocess.Popen([sys.executable, "-c", code, target, str(latency_s)],
                            stdout=subprocess.PIPE, text=True)
    try:
        urls = proc.stdout.readline().split()
        if len(urls) != 2:
            raise RuntimeError("the latency proxy did not start")
        yield urls[0], urls[1]
    finally:
        proc.kill()
        proc.wait()


def _stats(page: str, since: int = 0) -> dict[str, int]:
    with urllib.request.urlopen(f"{page}/{since}", timeout=10) as r:
        return json.loads(r.read())


def main() -> None:
    args = parse_args(__doc__)
    repeat = args.repeats if "--repeats" in sys.argv else REPEAT
    src = session_file(args.volumes, args.photons, args.path)
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    warnings.simplefilter("ignore")
    import s3fs

    import siff_xarray

    size_mb = src.stat().st_size / 1e6
    rows = []
    with moto_in_child() as moto, \
            tempfile.TemporaryDirectory(dir=HERE / "_data") as tmp:
        direct = {"key": "testing", "secret": "testing",
                  "client_kwargs": {"endpoint_url": moto}}
        fs = s3fs.S3FileSystem(**direct, skip_instance_cache=True)
        fs.mkdir("bench-src")
        fs.mkdir("bench-dst")
        fs.put(str(src), "bench-src/run.siff")
        local_dst = Path(tmp) / "local.zarr"
        siff_xarray.convert(src, local_dst, overwrite=True)  # warm-up: Numba, page cache
        shutil.rmtree(local_dst)
        zero: dict[str, float] = {}
        for latency in (0.0, 0.02, 0.05):
            with proxy_in_child(moto, latency) as (proxy, page):
                opts = {**direct, "client_kwargs": {"endpoint_url": proxy},
                        "skip_instance_cache": True}

                def local() -> None:
                    siff_xarray.convert(src, local_dst, overwrite=True)
                    shutil.rmtree(local_dst)

                def to_s3(source: str, opts=opts) -> None:
                    siff_xarray.convert(source, "s3://bench-dst/run.zarr", overwrite=True,
                                        storage_options=opts, target_options=opts)
                    fs.rm("bench-dst/run.zarr", recursive=True)
                    fs.invalidate_cache()

                jobs = {"local -> local": local,
                        "local -> S3": lambda: to_s3(str(src)),
                        "S3 -> S3": lambda: to_s3("s3://bench-src/run.siff")}
                runs: dict[str, list[tuple[float, int, int]]] = {k: [] for k in jobs}
                for i in range(repeat):
                    for name, job in jobs.items():
                        if name == "S3 -> S3" and i:  # (once: moto's time, see above)
                            continue
                        before = _stats(page)["requests"]
                        t0 = time.perf_counter()
                        job()
                        dt = time.perf_counter() - t0
                        got = _stats(page, before)
                        runs[name].append((dt, got["requests"] - before, got["rounds"]))
                med = {k: sorted(v)[len(v) // 2] for k, v in runs.items()}
                ref = med["local -> local"][0]
                for name, (dt, requests, rounds) in med.items():
                    if latency == 0.0:
                        zero[name] = dt
                    remote = name != "local -> local"
                    rows.append((f"{latency * 1000:.0f} ms", name, dt,
                                 requests if remote else 0, rounds if remote else 0,
                                 dt / ref, dt / zero[name]))
        fs.pipe("bench-src/small", os.urandom(16 * 2**20))
        per_get = {}
        for name in ("run.siff", "small"):
            t0 = time.perf_counter()
            for i in range(5):
                fs.cat_file(f"bench-src/{name}", start=i * 2**20, end=(i + 1) * 2**20)
            per_get[name] = (time.perf_counter() - t0) / 5
    print(f"\nConversions of {src.name} ({size_mb:.0f} MB); median of {repeat} calls, "
          "alternated (S3 -> S3: one call)\n")
    print("| latency | job | seconds | requests | round trips | x local | x same job at 0 ms |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for lat, name, dt, requests, rounds, x_local, x_zero in rows:
        print(f"| {lat} | {name} | {dt:.2f} | {requests} | {rounds} | {x_local:.2f} | "
              f"{x_zero:.2f} |")
    print(f"\nmoto, one ranged GET of 1 MiB: {per_get['run.siff'] * 1000:.0f} ms from the "
          f"{size_mb:.0f} MB object, {per_get['small'] * 1000:.0f} ms from a 16 MiB one")


if __name__ == "__main__":
    main()
