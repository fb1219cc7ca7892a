"""Direct HTTP range reads (reader.http_ranges) against the loopback range server.

A remote file's large reads bypass fsspec's event loop; these tests hold them to what
fsspec's reads give (the same bytes, the same requests) and to what servers do that
fsspec handled for us: keep-alive connections closed while idle, redirects, busy
servers, bodies cut off, objects deleted, silence.
"""

from __future__ import annotations

import os
import socket
import ssl
import time

import numpy as np
import pytest
import xarray as xr

from siff_xarray import _remote
from siff_xarray.errors import RemoteAccessError, SiffFormatError
from siff_xarray.reader import http_ranges
from siff_xarray.reader.http_ranges import (
    DirectRanges,
    HTTPStatusError,
    Redirected,
    direct_ranges,
)
from siff_xarray.reader.source import FsspecSource, probe_following
from siff_xarray.synthetic import write_siff


@pytest.fixture
def blob(http_server, tmp_path):
    """Six MiB of random bytes served as ``blob.bin``: (url, bytes)."""
    data = np.random.default_rng(7).integers(0, 256, 6 * 2**20, dtype=np.uint8).tobytes()
    (tmp_path / "blob.bin").write_bytes(data)
    return f"{http_server.url}/blob.bin", data


def _ranges(seed: int, size: int, n: int = 40) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    starts = np.sort(rng.integers(0, size - 300_000, n))
    return starts, starts + rng.integers(1, 300_000, n)


def _check(src: FsspecSource, data: bytes, starts: np.ndarray, stops: np.ndarray) -> None:
    buf, base = src.read_ranges(starts, stops)
    for a, b, at in zip(starts, stops, base, strict=True):
        assert bytes(buf[at : at + b - a]) == data[a:b]


def test_direct_reads_give_fsspecs_bytes_with_the_same_requests(http_server, tmp_path,
                                                                monkeypatch):
    t = write_siff(tmp_path / "r.siff", shape=(64, 32), channels=(1, 2), n_slices=3,
                   n_flyback=1, n_timepoints=6, photons_per_frame=4000, seed=5)
    url = f"{http_server.url}/r.siff"
    with xr.open_dataset(t.path, engine="siff", flim=True) as local:
        want = local.load().drop_attrs().drop_vars(["source_file", "source_frame"])
    counts, direct_gets = {}, []
    get = DirectRanges._get
    monkeypatch.setattr(DirectRanges, "_get",
                        lambda self, *a: direct_gets.append(a[1]) or get(self, *a))
    for direct in (True, False):
        monkeypatch.setattr(FsspecSource, "direct_http", direct)
        direct_gets.clear()
        before = http_server.requests + http_server.heads
        with xr.open_dataset(url, engine="siff", flim=True, index_cache=False) as ds:
            got = ds.load().drop_attrs().drop_vars(["source_file", "source_frame"])
            xr.testing.assert_identical(got, want)
            trace = ds.intensity.mean(("y", "x")).values
        np.testing.assert_array_equal(trace, want.intensity.mean(("y", "x")).values)
        counts[direct] = http_server.requests + http_server.heads - before
        assert bool(direct_gets) == direct  # reads went direct (turned off: none did)
    # the same reads; the direct open learns size and ETag from its first ranges
    # (Content-Range), where fsspec asks with a HEAD first
    assert counts[True] == counts[False] - 1, counts


def test_spans_fetched_ahead_are_received_into_their_buffers(http_server, blob):
    url, data = blob
    with FsspecSource(url) as src:
        assert src._direct is not None
        sent, fetched = http_server.bytes_sent, src.bytes_fetched
        src.will_need(0, len(data))
        starts, stops = _ranges(1, len(data))
        _check(src, data, starts, stops)
        assert http_server.bytes_sent - sent == len(data)  # the span once, nothing more
        assert src.bytes_fetched - fetched == len(data)


def test_a_probe_learns_size_and_etag_with_head_tail_and_ranges_in_one_round_trip(
        http_server, blob):
    url, data = blob
    direct = direct_ranges(url, None)
    http_server.latency = 0.05
    at = len(http_server.arrivals)
    got = direct.probe(65536, 4096, [3_000_000, len(data) - 10, len(data) + 5],
                       [3_002_048, len(data) + 2000, len(data) + 100])
    assert http_server.round_trips(at) == 1 and len(http_server.arrivals) - at == 5
    assert got.size == len(data) and got.etag and got.etag.startswith('"')
    assert got.head == data[:65536] and got.tail == data[-4096:]
    # a range past the end is left out; one that runs over it comes short
    assert got.blocks == [(3_000_000, data[3_000_000:3_002_048]),
                          (len(data) - 10, data[-10:])]
    # another version required: the server refuses (412), and fsspec is to answer
    assert direct.probe(65536, 4096, [], [], {"If-Match": '"other"'}) is None
    with FsspecSource(url, version=got.etag) as src:  # the version it has: one round trip
        assert src.size == len(data) and src.version == got.etag
    http_server.redirects = True  # the caller may follow it (probe_following)
    with pytest.raises(Redirected) as moved:
        direct.probe(65536, 4096, [], [])
    assert moved.value.location == url + "?moved"
    got, there = probe_following(direct, True, 65536, 4096, [], [])
    assert got.size == len(data) and there is not direct and there.url == url
    assert probe_following(direct, False, 65536, 4096, [], []) == (None, direct)
    http_server.redirects = False
    small = direct_ranges(url.replace("blob.bin", "small.bin"), None)
    with open(http_server.root + "/small.bin", "wb") as fh:
        fh.write(data[:1000])
    got = small.probe(65536, 4096, [], [])
    assert (got.size, got.head, got.tail) == (1000, data[:1000], data[:1000])


def test_a_server_closing_idle_connections_is_answered_with_a_new_one(http_server, blob):
    url, data = blob
    http_server.keep_alive = True
    with FsspecSource(url) as src:
        requests, connections = http_server.requests, http_server.connections
        starts, stops = _ranges(2, len(data), n=30)
        src.coalesce_gap = 0
        src.held_ranges = 0  # no range served from bytes kept from an earlier one
        for a, b in zip(starts, stops, strict=True):  # one request at a time: one thread
            _check(src, data, np.array([a]), np.array([b]))
        assert http_server.requests - requests == 30
        assert http_server.connections - connections == 1  # kept alive: one for all
        connections = http_server.connections
        # the server now closes each connection after two requests without saying so:
        # the third request on it finds it closed and goes out on a new one
        http_server.requests_per_connection = 2
        starts, stops = _ranges(22, len(data), n=30)  # not in the source's cache
        for a, b in zip(starts, stops, strict=True):
            _check(src, data, np.array([a]), np.array([b]))
        assert http_server.requests - requests == 60  # no request served twice
        assert http_server.connections - connections == 15  # a new one every 2 requests


def test_a_redirect_at_open_is_followed_and_a_later_one_left_to_fsspec(http_server, blob):
    url, data = blob
    http_server.redirects = True
    with FsspecSource(url) as src:  # the open's probe follows it: reads go to the target
        assert src._direct is not None and src._direct._address == url + "?moved"
        requests = http_server.requests
        _check(src, data, *_ranges(3, len(data)))
        assert src._direct is not None
        assert all("?moved" in p for p, *_ in http_server.log[requests:])
    http_server.redirects = False
    with FsspecSource(url) as src:
        http_server.redirects = True  # a redirect the open did not see
        _check(src, data, *_ranges(3, len(data)))
        assert src._direct is None  # fsspec followed the redirect; the source stays there
        _check(src, data, *_ranges(4, len(data)))


def test_a_busy_server_is_asked_again_and_then_blamed(http_server, blob, monkeypatch):
    url, data = blob
    with FsspecSource(url) as src:
        http_server.busy = 2  # two 503s, then the bytes
        _check(src, data, np.array([1000]), np.array([500_000]))
        monkeypatch.setattr(_remote, "RETRIES", 2)
        http_server.busy = 5
        with pytest.raises(RemoteAccessError, match=r"blob\.bin: the server answered HTTP 503"):
            src.read_ranges(np.array([600_000]), np.array([900_000]))


def test_a_body_cut_off_is_read_again_not_taken_for_the_end_of_the_file(http_server, blob):
    url, data = blob
    with FsspecSource(url) as src:
        http_server.cut = 1
        requests = http_server.requests
        src.will_need(0, 2 * 2**20)
        _check(src, data, np.array([0]), np.array([2 * 2**20]))
        assert http_server.requests - requests == 2  # the cut one and its repeat
        http_server.cut = 100  # every answer cut: the connection is blamed, not the file
        with pytest.raises(RemoteAccessError, match=r"blob\.bin: the server cannot be "):
            src.read_ranges(np.array([3_000_000]), np.array([3_500_000]))


def test_an_object_deleted_after_open_names_the_url(http_server, blob, tmp_path):
    url, _ = blob
    with FsspecSource(url) as src:
        os.remove(tmp_path / "blob.bin")
        with pytest.raises(FileNotFoundError, match=r"blob\.bin: no such file \(HTTP 404\)"):
            src.read_ranges(np.array([0]), np.array([100_000]))


def test_a_truncated_object_is_a_short_read_not_a_connection_error(http_server, blob,
                                                                   tmp_path):
    url, _ = blob
    with FsspecSource(url) as src:  # pinned to its ETag: the server refuses the new version
        with open(tmp_path / "blob.bin", "r+b") as fh:
            fh.truncate(5 * 2**20)
        with pytest.raises(SiffFormatError, match="object was replaced since it was opened"):
            src.read_ranges(np.array([5 * 2**20 - 10]), np.array([5 * 2**20 + 10]))
    http_server.etags = False  # a server without ETags: the read comes up short
    with FsspecSource(url) as src:
        with open(tmp_path / "blob.bin", "r+b") as fh:
            fh.truncate(4 * 2**20)
        with pytest.raises(SiffFormatError, match="file ends inside"):
            src.read_ranges(np.array([4 * 2**20 - 10]), np.array([4 * 2**20 + 10]))


def test_a_silent_server_times_out_after_one_read_timeout():
    srv = socket.socket()  # accepts connections (the kernel's backlog), never answers
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    try:
        url = f"http://127.0.0.1:{srv.getsockname()[1]}/run.siff"
        direct = DirectRanges(url, {}, None, connect_timeout=1.0, read_timeout=0.5)
        t0 = time.monotonic()
        with pytest.raises(TimeoutError) as err:
            direct.fetch_into(memoryview(bytearray(100)), [0, 50], [50, 100], [0, 50])
        assert time.monotonic() - t0 < 5
        assert "did not answer in time" in str(_remote.remote_error(url, err.value))
    finally:
        srv.close()


class _Dribbler:
    """A one-connection server that answers each range GET with the right bytes,
    sent in ``pieces`` parts ``pause`` seconds apart, then (``stall``) nothing."""

    def __init__(self, data: bytes, pieces: int, pause: float, stall: bool = False) -> None:
        import threading

        self.data, self.pieces, self.pause, self.stall = data, pieces, pause, stall
        self.srv = socket.socket()
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(8)
        self.url = f"http://127.0.0.1:{self.srv.getsockname()[1]}/blob.bin"
        self.done = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.srv.accept()
        with conn:
            while True:
                head = b""
                while b"\r\n\r\n" not in head:
                    got = conn.recv(4096)
                    if not got:
                        return
                    head += got
                rng = [ln for ln in head.decode().split("\r\n") if ln.lower().startswith("range")]
                a, b = (int(v) for v in rng[0].split("=")[1].split("-"))
                body = self.data[a : b + 1]
                cut = len(body) - 1000 if self.stall else len(body)
                conn.sendall(f"HTTP/1.1 206 Partial Content\r\nContent-Length: {len(body)}\r\n"
                             f"Content-Range: bytes {a}-{b}/{len(self.data)}\r\n\r\n".encode()
                             + body[:100])  # the first bytes come with the headers
                step = -(-(cut - 100) // self.pieces)
                for k in range(100, cut, step):
                    time.sleep(self.pause)
                    conn.sendall(body[k : min(k + step, cut)])
                if self.stall:
                    self.done.wait(10)
                    return

    def close(self) -> None:
        self.done.set()
        self.srv.close()


@pytest.mark.parametrize("wait_all", [True, False])
def test_a_body_sent_in_pieces_arrives_whole_and_the_connection_is_reused(monkeypatch,
                                                                          wait_all):
    # MSG_WAITALL or readinto: every byte, the bytes http.client buffered with the
    # headers first, and the response finished so the next GET reuses the connection
    monkeypatch.setattr(http_ranges, "WAIT_ALL", wait_all and http_ranges.WAIT_ALL)
    data = np.random.default_rng(3).integers(0, 256, 3 * 2**20, dtype=np.uint8).tobytes()
    srv = _Dribbler(data, pieces=7, pause=0.05)
    try:
        direct = DirectRanges(srv.url, {}, None, connect_timeout=1.0, read_timeout=1.0)
        out = memoryview(bytearray(2 * 2**20 + 50))
        assert direct.fetch_into(out, [5], [2**20 + 5], [0]) == [2**20]
        assert direct.fetch_into(out, [2**20], [2 * 2**20 + 50], [2**20]) == [2**20 + 50]
        assert bytes(out[: 2**20]) == data[5 : 2**20 + 5]
        assert bytes(out[2**20 :]) == data[2**20 : 2 * 2**20 + 50]
    finally:
        srv.close()


@pytest.mark.parametrize("wait_all", [True, False])
def test_a_body_that_stops_coming_times_out_after_one_read_timeout(monkeypatch, wait_all):
    monkeypatch.setattr(http_ranges, "WAIT_ALL", wait_all and http_ranges.WAIT_ALL)
    data = bytes(range(256)) * 4096
    srv = _Dribbler(data, pieces=3, pause=0.1, stall=True)
    try:
        direct = DirectRanges(srv.url, {}, None, connect_timeout=1.0, read_timeout=0.5)
        t0 = time.monotonic()
        with pytest.raises(TimeoutError) as err:  # pieces 0.1 s apart are not a timeout
            direct.fetch_into(memoryview(bytearray(2**20)), [0], [2**20], [0])
        assert 0.7 < time.monotonic() - t0 < 5
        assert "did not answer in time" in str(_remote.remote_error(srv.url, err.value))
    finally:
        srv.close()


def test_which_urls_and_options_are_read_directly():
    url = "http://127.0.0.1:1/run.siff"
    assert direct_ranges(url, None) is not None
    got = direct_ranges(url, {"headers": {"Authorization": "Bearer x"}})
    assert got is not None and got.headers == {"Authorization": "Bearer x"}
    aiohttp = pytest.importorskip("aiohttp")
    got = direct_ranges(url, {"client_kwargs": {"timeout": aiohttp.ClientTimeout(
        connect=2.0, sock_read=3.0)}})
    assert (got._connect_timeout, got._read_timeout) == (2.0, 3.0)
    assert direct_ranges(url, None)._read_timeout == _remote.READ_TIMEOUT_S
    # what this module does not reproduce stays with fsspec
    assert direct_ranges(url, {"client_kwargs": {"trust_env": True}}) is None  # proxies
    assert direct_ranges(url, {"auth": ("user", "password")}) is None
    assert direct_ranges("https://127.0.0.1:1/r", {"ssl": b"fingerprint"}) is None
    assert direct_ranges("s3://bucket/run.siff", None) is None
    assert direct_ranges(f"simplecache::{url}", None) is None
    assert direct_ranges("memory://run.siff", None) is None
    # https: the given context, aiohttp's "do not verify", or the system's trust
    ctx = ssl.create_default_context()
    assert direct_ranges("https://127.0.0.1:1/r", {"ssl": ctx})._context is ctx
    unverified = direct_ranges("https://127.0.0.1:1/r", {"ssl": False})._context
    assert unverified.verify_mode == ssl.CERT_NONE
    assert direct_ranges("https://127.0.0.1:1/r", None)._context.verify_mode == \
        ssl.CERT_REQUIRED


def test_https_spans_are_received_directly(https_server, tmp_path):
    data = np.random.default_rng(9).integers(0, 256, 3 * 2**20, dtype=np.uint8).tobytes()
    (tmp_path / "blob.bin").write_bytes(data)
    url = f"{https_server.url}/blob.bin"
    with FsspecSource(url, {"ssl": https_server.client_ssl}) as src:
        assert src._direct is not None
        src.will_need(0, len(data))
        _check(src, data, *_ranges(5, len(data), n=10))
    # a certificate the client does not trust is named, at open and on a direct read
    with pytest.raises(RemoteAccessError, match=r"blob\.bin: the server's TLS certificate "
                       r"is not trusted \(self-signed certificate\)"):
        FsspecSource(url)
    direct = direct_ranges(url, None)
    with pytest.raises(ssl.SSLCertVerificationError) as err:
        direct.fetch_into(memoryview(bytearray(10)), [0], [10], [0])
    assert "not trusted" in str(_remote.remote_error(url, err.value))


def test_the_http_status_error_pickles_with_its_status():
    import pickle

    err = pickle.loads(pickle.dumps(HTTPStatusError("http://h/r.siff", 412, "Precondition")))
    assert (err.status, err.url) == (412, "http://h/r.siff")
    assert _remote.replaced_error(err.url, err) is not None


def test_each_thread_keeps_connections_to_few_servers(http_server, blob):
    url, _ = blob
    conns = http_ranges._local_connections()
    for port in range(1, 12):  # servers that refuse: each attempt opens and fails
        direct = DirectRanges(f"http://127.0.0.1:{port}/x", {}, None, 0.5, 0.5)
        with pytest.raises(OSError):
            direct.fetch_into(memoryview(bytearray(4)), [0], [4], [0])
    for k in range(12):  # a dozen servers that answer
        DirectRanges(url + f"?{k}", {}, None).fetch_into(memoryview(bytearray(4)), [0], [4],
                                                         [0])
    assert len(conns) <= http_ranges._KEPT_SERVERS


# --- S3 objects, through URLs s3fs presigns -------------------------------------------


@pytest.fixture
def s3_blob(s3_latency, tmp_path):
    """A session-like file on the moto server behind the counting proxy: (url, opts, path)."""
    import s3fs

    _, opts = s3_latency
    t = write_siff(tmp_path / "r.siff", shape=(64, 32), channels=(1, 2), n_slices=3,
                   n_flyback=1, n_timepoints=6, photons_per_frame=4000, seed=6)
    fs = s3fs.S3FileSystem(**opts)
    if not fs.exists("direct-bucket"):
        fs.mkdir("direct-bucket")
    fs.put_file(t.path, "direct-bucket/r.siff")
    return "s3://direct-bucket/r.siff", opts, t.path


def test_s3_reads_go_through_presigned_urls_with_the_same_requests(s3_latency, s3_blob,
                                                                   monkeypatch):
    from siff_xarray import SiffFile

    proxy, _ = s3_latency
    url, opts, path = s3_blob
    with xr.open_dataset(path, engine="siff", flim=True) as local:
        want = local.load().drop_attrs().drop_vars(["source_file", "source_frame"])
    counts, signed = {}, {}
    for direct in (True, False):
        monkeypatch.setattr(FsspecSource, "direct_http", direct)
        before, signed_before = proxy.requests, proxy.signed
        with xr.open_dataset(url, engine="siff", flim=True, storage_options=opts,
                             index_cache=False) as ds:
            got = ds.load().drop_attrs().drop_vars(["source_file", "source_frame"])
        xr.testing.assert_identical(got, want)
        counts[direct] = proxy.requests - before
        signed[direct] = proxy.signed - signed_before
    # the same GETs; s3fs's HeadObject is left out: size, ETag and modification time
    # come with the first ranges
    assert counts[True] == counts[False] - 1, counts
    assert signed[False] == 0 and signed[True] > 0, signed
    monkeypatch.setattr(FsspecSource, "direct_http", True)
    with SiffFile(url, storage_options=opts) as f:
        direct = f._source._direct
        assert direct is not None and direct.url == url  # messages name the s3:// URL
        assert "Signature=" in direct._target


def test_a_refused_signature_leaves_the_object_to_s3fs(s3_latency, s3_blob):
    proxy, _ = s3_latency
    url, opts, path = s3_blob
    with FsspecSource(url, opts) as src, open(path, "rb") as fh:
        data = fh.read()
        assert src._direct is not None
        proxy.refuse_signed = True  # a bucket policy or clock skew the signature fails
        _check(src, data, np.array([0, 40_000]), np.array([30_000, len(data)]))
        assert src._direct is None and src._s3 is None
        signed = proxy.signed
        _check(src, data, np.array([10]), np.array([90_000]))
        assert proxy.signed == signed  # s3fs reads it from now on


def test_presigned_urls_are_renewed_before_they_expire(s3_blob, monkeypatch):
    url, opts, path = s3_blob
    monkeypatch.setattr(FsspecSource, "signed_for_s", 2)  # renewed after 1 s
    with FsspecSource(url, opts) as src, open(path, "rb") as fh:
        data = fh.read()
        first = src._direct
        mid = len(data) // 3  # past the head, which the open fetched
        _check(src, data, np.array([mid]), np.array([mid + 20_000]))
        assert src._direct is first
        time.sleep(1.1)
        _check(src, data, np.array([mid + 20_000]), np.array([mid + 60_000]))
        assert src._direct is not None and src._direct is not first
        assert src._direct._target != first._target


def test_which_s3_options_are_read_through_presigned_urls():
    from siff_xarray.reader.http_ranges import s3_settings

    url = "s3://bucket/run.siff"
    plain = s3_settings(url, {"key": "k", "secret": "s"})
    assert plain is not None and plain.context.verify_mode == ssl.CERT_REQUIRED
    assert (plain.connect, plain.read) == (_remote.CONNECT_TIMEOUT_S, _remote.READ_TIMEOUT_S)
    local = s3_settings(url, {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"},
                              "config_kwargs": {"read_timeout": 5}})
    assert local is not None and local.context is None and local.read == 5
    assert s3_settings(url, {"client_kwargs": {"verify": False}}).context.verify_mode == \
        ssl.CERT_NONE
    # how bodies are signed does not touch a GET (with_timeouts sets it)
    for signing in (True, False):
        assert s3_settings(url, {"config_kwargs": {"s3": {"payload_signing_enabled": signing}}})
    # what changes the request beyond its signature stays with s3fs
    assert s3_settings(url, {"requester_pays": True}) is None
    assert s3_settings(url, {"s3_additional_kwargs": {"SSECustomerKey": "x"}}) is None
    assert s3_settings(url, {"client_kwargs": {"aws_session_token": "t", "proxies": {}}}) \
        is None
    assert s3_settings(url, {"config_kwargs": {"s3": {"addressing_style": "path"}}}) is None
    assert s3_settings(f"simplecache::{url}", None) is None
    assert s3_settings("http://127.0.0.1/run.siff", None) is None


def test_two_remote_files_combined_each_give_their_own_photons(http_server, tmp_path):
    """open_mfdataset over two URLs on one server: direct reads share its connections."""
    kw = dict(shape=(16, 8), channels=(1, 2), n_slices=2, n_flyback=1, n_timepoints=4,
              photons_per_frame=900)
    a = write_siff(tmp_path / "run_a.siff", seed=21, **kw)
    b = write_siff(tmp_path / "run_b.siff", seed=22, lifetimes_ns=(1.5, 4.0), **kw)
    urls = [f"{http_server.url}/run_a.siff", f"{http_server.url}/run_b.siff"]
    masks = np.random.default_rng(1).random((2, 16, 8)) > 0.5
    want = []
    for t in (a, b):
        with xr.open_dataset(t.path, engine="siff") as local:
            want.append((local.intensity.values, local.siff.histogram(masks)))
    assert not np.array_equal(want[0][0], want[1][0])
    with xr.open_mfdataset(urls, engine="siff", combine="nested", concat_dim="run",
                           data_vars="all", coords="different", compat="equals",
                           join="override", index_cache=False) as mf:
        for k in range(2):
            part = mf.isel(run=k)
            np.testing.assert_array_equal(part.intensity.values, want[k][0])
            np.testing.assert_array_equal(part.siff.histogram(masks), want[k][1])
