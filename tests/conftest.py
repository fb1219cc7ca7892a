"""Shared fixtures: synthetic files of many shapes, written once per session."""

from __future__ import annotations

import os

import numpy as np
import pytest

from siff_xarray.synthetic import write_siff

try:
    import corrosiffpy
except ImportError:  # no wheel for this Python (e.g. 3.13): the ground-truth checks still run
    corrosiffpy = None


def open_corrosiff(path):
    """Open ``path`` with corrosiffpy for a cross-check, or skip the rest of the test."""
    if corrosiffpy is None:
        pytest.skip("corrosiffpy has no wheel for this Python; cross-check skipped")
    return corrosiffpy.open_file(str(path))

# name -> write_siff keyword arguments; every layout the reader must handle
CONFIGS = {
    "single_raw": dict(shape=(16, 12), encoding="raw", n_timepoints=6),
    "single_compressed": dict(shape=(16, 12), encoding="compressed", n_timepoints=6,
                              photons_per_frame=400),
    "two_chan_slices_flyback": dict(shape=(12, 10), channels=(1, 2), n_slices=3, n_flyback=1,
                                    n_timepoints=5, encoding="mixed", photons_per_frame=300,
                                    max_shift=2),
    "partial_volume": dict(shape=(10, 14), channels=(1, 2), n_slices=2, n_flyback=1,
                           n_timepoints=3, extra_frames=3, encoding="smallest",
                           photons_per_frame=600),
    "frames_per_slice": dict(shape=(8, 8), channels=(2, 3), n_slices=2, frames_per_slice=3,
                             n_flyback=2, n_timepoints=3, encoding="mixed"),
    "classic_tiff": dict(shape=(9, 11), channels=(1, 2), n_slices=2, n_timepoints=3,
                         bigtiff=False, encoding="mixed", photons_per_frame=200),
    "smallest_bright": dict(shape=(24, 20), n_timepoints=8, photons_per_frame=3000,
                            encoding="smallest", events={2: ("odour A", 0.05), 5: ("no time",
                                                                                 None)}),
}


@pytest.fixture(scope="session", autouse=True)
def _private_index_cache(tmp_path_factory):
    """Keep the frame-index cache of remote opens out of the user's home directory."""
    old = os.environ.get("SIFF_XARRAY_CACHE_DIR")
    os.environ["SIFF_XARRAY_CACHE_DIR"] = str(tmp_path_factory.mktemp("index-cache"))
    yield
    if old is None:
        os.environ.pop("SIFF_XARRAY_CACHE_DIR", None)
    else:
        os.environ["SIFF_XARRAY_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def siff_files(tmp_path_factory):
    """Mapping name -> SyntheticTruth for every configuration in CONFIGS."""
    d = tmp_path_factory.mktemp("siff")
    return {name: write_siff(d / f"{name}.siff", seed=i, **kw)
            for i, (name, kw) in enumerate(CONFIGS.items())}


@pytest.fixture(params=sorted(CONFIGS))
def truth(request, siff_files):
    """Each synthetic file in turn."""
    return siff_files[request.param]


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# ---------------------------------------------------------------- local servers (loopback only)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto in server mode) on 127.0.0.1, in a subprocess.

    Yields the fsspec ``storage_options`` that reach it.
    """
    import os
    import subprocess
    import sys
    import time
    import urllib.request

    pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    port = _free_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(url + "/moto-api/", timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the moto S3 server did not start") from None
                time.sleep(0.2)
        # s3fs's instance cache stays on, as for users: instances made with
        # skip_instance_cache are never closed and leave aiohttp sessions behind
        yield {"key": "testing", "secret": "testing",
               "client_kwargs": {"endpoint_url": url}}
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _no_nagle(connection) -> None:
    """Send what a handler writes at once (``TCP_NODELAY``), as real servers do.

    A handler writes a response's headers, then its body: with Nagle's algorithm a
    small body waits for the client's delayed ACK of the headers, 40 ms a request.
    """
    import socket

    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _RangeServer:
    """A static HTTP server on 127.0.0.1 that honours Range requests and counts bytes."""

    def __init__(self, root, tls_dir=None):
        import http.server
        import threading
        import time

        server = self
        self.root = root
        self.bytes_sent = 0
        self.requests = 0  # GET requests
        self.heads = 0  # HEAD requests
        self.refused = 0  # requests answered 412: their If-Match named another version
        #: name each file version with an ETag and honour If-Match (False: a server without)
        self.etags = True
        self.log = []  # (path, start, stop) of every GET
        #: answer every GET with the whole file (a server without Range support)
        self.ignore_ranges = False
        #: seconds added before answering each request (object-store first-byte latency)
        self.latency = 0.0
        #: bytes per second each connection sends at most (0: as fast as it can; plain
        #: HTTP only); object stores serve one connection at tens of MB/s, many at once
        self.rate = 0.0
        #: answer HTTP/1.1 and keep connections open between requests (as S3 does)
        self.keep_alive = False
        #: with keep_alive: close a connection, unannounced, after this many requests
        #: (as servers close idle connections); 0 keeps it open
        self.requests_per_connection = 0
        #: redirect every GET without a query string to the same path with "?moved"
        self.redirects = False
        #: answer this many GETs with 503 before serving again (a busy server)
        self.busy = 0
        #: send only half the body of this many GETs, then close (a connection lost)
        self.cut = 0
        #: connections accepted (with keep_alive, fewer than requests)
        self.connections = 0
        #: send weak ETags (``W/"..."``), which If-Match never matches (as servers
        #: that compress or generate what they serve do)
        self.weak_etags = False
        #: answer each request from one of this many "backends" in turn, each naming
        #: the same file with an ETag of its own (as some load-balanced servers do);
        #: 0 or 1: one ETag per file version
        self.etag_backends = 0
        self._answered = 0
        #: when each request arrived (``time.monotonic()``): see :meth:`round_trips`
        self.arrivals = []
        #: ``[arrival, answered]`` of every request, in order of arrival (see _chain)
        self.spans = []
        #: the most requests waiting out their latency at once (requests a client has
        #: on their way together; with ``latency`` set)
        self.most_waiting = 0
        self._waiting = 0
        self.lock = threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def setup(self):
                super().setup()
                _no_nagle(self.connection)
                self.served = 0
                with server.lock:
                    server.connections += 1

            def parse_request(self):
                self.protocol_version = "HTTP/1.1" if server.keep_alive else "HTTP/1.0"
                return super().parse_request()

            def handle_one_request(self):
                self._span = None
                try:
                    super().handle_one_request()
                finally:  # answered (or failed): when a client can send what depended on it
                    if self._span is not None:
                        self._span[1] = time.monotonic()

            def _file(self):
                p = os.path.join(server.root, self.path.lstrip("/").split("?")[0])
                return p if os.path.isfile(p) else None

            def _arrive(self):
                """Wait the injected latency; return the served file (None: answer sent).

                Like S3 and most HTTP servers, it names each version of a file with a
                strong ETag and refuses a request whose If-Match names another (412).
                """
                with server.lock:
                    server.arrivals.append(time.monotonic())
                    self._span = [server.arrivals[-1], None]
                    server.spans.append(self._span)
                    server._waiting += 1
                    server._answered += 1
                    self.backend = server._answered % max(server.etag_backends, 1)
                    server.most_waiting = max(server.most_waiting, server._waiting)
                try:
                    if server.latency:
                        time.sleep(server.latency)
                finally:
                    with server.lock:
                        server._waiting -= 1
                p = self._file()
                if p is None:
                    self.send_error(404)
                    return None
                want = self.headers.get("If-Match") if server.etags else None
                # (If-Match compares strongly: a weak ETag never matches)
                if want is not None and want != "*" and (want != self._etag(p)
                                                         or server.weak_etags):
                    with server.lock:
                        server.refused += 1
                    self.send_error(412)
                    return None
                return p

            def _etag(self, p):
                st = os.stat(p)
                farm = f"-b{self.backend}" if server.etag_backends > 1 else ""
                return (("W/" if server.weak_etags else "")
                        + f'"{st.st_mtime_ns:x}-{st.st_size:x}{farm}"')

            def do_HEAD(self):
                with server.lock:
                    server.heads += 1
                p = self._arrive()
                if p is None:
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(os.path.getsize(p)))
                self.send_header("Accept-Ranges", "bytes")
                if server.etags:
                    self.send_header("ETag", self._etag(p))
                self.end_headers()

            def do_GET(self):
                self.served += 1
                if (server.requests_per_connection
                        and self.served >= server.requests_per_connection):
                    self.close_connection = True  # after this answer, without saying so
                if server.redirects and "?" not in self.path:
                    self.send_response(307)
                    self.send_header("Location", self.path + "?moved")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                with server.lock:
                    busy, server.busy = server.busy > 0, max(server.busy - 1, 0)
                if busy:
                    self.send_error(503)
                    return
                p = self._arrive()
                if p is None:
                    return
                size = os.path.getsize(p)
                start, end = 0, size - 1
                rng = None if server.ignore_ranges else self.headers.get("Range")
                if rng and rng.startswith("bytes="):
                    a, _, b = rng[6:].partition("-")
                    start = int(a) if a else max(size - int(b), 0)
                    end = min(int(b), size - 1) if a and b else end
                n = max(end - start + 1, 0)
                # counted before sending: a client that has its bytes sees them counted
                with server.lock:
                    server.bytes_sent += n
                    server.requests += 1
                    server.log.append((self.path, start, end + 1))
                self.send_response(206 if rng else 200)
                self.send_header("Content-Length", str(n))
                self.send_header("Accept-Ranges", "bytes")
                if server.etags:
                    self.send_header("ETag", self._etag(p))
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
                self.end_headers()
                with server.lock:
                    cut, server.cut = server.cut > 0, max(server.cut - 1, 0)
                if cut:
                    self.close_connection = True
                    n = n // 2
                with open(p, "rb") as fh:
                    if server.tls:  # an SSL socket must encrypt what it sends
                        fh.seek(start)
                        self.wfile.write(fh.read(n))
                    else:  # the kernel copies file to socket: little CPU, no GIL
                        self.wfile.flush()
                        sent, t0 = 0, time.monotonic()
                        step = n if not server.rate else max(int(server.rate / 100), 1)
                        while sent < n:
                            sent += os.sendfile(self.connection.fileno(), fh.fileno(),
                                                start + sent, min(n - sent, step))
                            if server.rate:  # paced: never ahead of rate x time
                                time.sleep(max(t0 + sent / server.rate - time.monotonic(),
                                               0.0))

        class Server(http.server.ThreadingHTTPServer):
            request_queue_size = 256  # clients open many connections at once, as S3 allows
            daemon_threads = True

            def handle_error(self, request, client_address):
                import sys

                if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
                    super().handle_error(request, client_address)  # a client may hang up

        self.httpd = Server(("127.0.0.1", 0), Handler)
        scheme = "http"
        self.tls = tls_dir is not None
        self.client_ssl = None
        if tls_dir is not None:
            import ssl

            cert, key = _self_signed_cert(tls_dir)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(cert, key)
            self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
            self.client_ssl = ssl.create_default_context(cafile=cert)  # verifies the cert
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def round_trips(self, since: int = 0) -> int:
        """Round trips waited one after another since arrival ``since`` (:func:`_chain`)."""
        return _chain(self.spans[since:])

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _rounds(arrivals: list[float], latency: float) -> int:
    """How many rounds of requests arrived at these times (``latency`` s per request).

    Requests a client sends together arrive within a few milliseconds; one that
    waits for an answer arrives at least ``latency`` after the request before:
    a gap of more than half the latency starts a new round.
    """
    times = sorted(arrivals)
    return sum(1 for a, b in zip([None, *times], times, strict=False)
               if a is None or b - a > latency / 2)


def _chain(spans: list[list[float | None]]) -> int:
    """How many of these requests a client waited for one after another.

    ``spans`` are ``[arrival, answered]`` at the server (answered None: not yet).
    A request sent after an answer arrived at the server after that answer was
    sent; requests sent together each arrived before the others' answers (the
    injected latency holds every answer back). The longest run of requests each
    arriving after the one before was answered (the most that do not overlap,
    found by taking the earliest answered first) is the round trips waited.
    Unlike :func:`_rounds` (gaps between arrivals), requests sent together and
    spread out by a loaded machine are not counted as several rounds unless one
    arrived after another's answer, and waves held back by a pool of connections
    are not merged however their arrivals spread.
    """
    done = float("-inf")
    n = 0
    for a, b in sorted(((s[0], float("inf") if s[1] is None else s[1]) for s in spans),
                       key=lambda s: s[1]):
        if a >= done:
            n += 1
            done = b
    return n


class _CountingProxy:
    """An HTTP proxy on 127.0.0.1 in front of another loopback server (the moto S3
    server): adds ``latency`` seconds to every request and counts them by method."""

    def __init__(self, target: str):
        import http.client
        import http.server
        import re
        import threading
        import time
        import zlib
        from urllib.parse import urlsplit

        import google_crc32c

        proxy = self
        self.latency = 0.0
        self.counts: dict[str, int] = {}
        #: requests through a presigned URL (a signature in the query string)
        self.signed = 0
        #: answer those 403, as S3 does for a signature it does not accept
        self.refuse_signed = False
        self.bytes_sent = 0
        #: when each request arrived (``time.monotonic()``), before the latency
        self.arrivals: list[float] = []
        #: ``[arrival, answered]`` of every request, in order of arrival (see _chain)
        self.spans: list[list[float | None]] = []
        #: ``(method, path)`` of every request, in order of arrival (presigned
        #: ones without the query)
        self.log: list[tuple[str, str]] = []
        #: every PUT: its headers (lower case), the CRC32 and CRC32C of the body it
        #: brought, and its path (with the query)
        self.puts: list[tuple[dict[str, str], int, int, str]] = []
        #: answer this many of the next presigned PUTs 503 SlowDown, as a busy S3 does
        self.busy_puts = 0
        #: response headers left out (lower case): an S3-compatible server without them
        self.drop_headers: set[str] = set()
        #: refuse PUTs whose path matches this regular expression (403 AccessDenied,
        #: as a bucket policy or a full quota does)
        self.refuse_puts: str | None = None
        #: ``(regular expression, seconds)``: PUTs whose path matches wait that much more
        self.slow_puts: tuple[str, float] | None = None
        self.lock = threading.Lock()
        host, port = urlsplit(target).hostname, urlsplit(target).port
        assert host == "127.0.0.1"

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def setup(self):
                super().setup()
                _no_nagle(self.connection)

            def _forward(self):
                with proxy.lock:
                    proxy.arrivals.append(time.monotonic())
                    self._span = [proxy.arrivals[-1], None]
                    proxy.spans.append(self._span)
                    # (a presigned URL's query is its signature: logged without it)
                    proxy.log.append((self.command, self.path.split("?")[0]
                                      if "Signature=" in self.path else self.path))
                if proxy.latency:
                    time.sleep(proxy.latency)
                slow = proxy.slow_puts
                if self.command == "PUT" and slow and re.search(slow[0], self.path):
                    time.sleep(slow[1])
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.command == "PUT":
                    with proxy.lock:
                        proxy.puts.append(({k.lower(): v for k, v in self.headers.items()},
                                           zlib.crc32(body), google_crc32c.value(body),
                                           self.path))
                        busy = proxy.busy_puts > 0 and "Signature=" in self.path
                        proxy.busy_puts -= busy
                    if busy:
                        msg = b"<Error><Code>SlowDown</Code></Error>"
                        self.send_response(503)
                        self.send_header("Content-Length", str(len(msg)))
                        self.end_headers()
                        self.wfile.write(msg)
                        return
                if (self.command == "PUT" and proxy.refuse_puts
                        and re.search(proxy.refuse_puts, self.path)):
                    msg = (b"<Error><Code>AccessDenied</Code><Message>Access Denied"
                           b"</Message></Error>")
                    self.send_response(403)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
                    return
                if "Signature=" in self.path:  # moto does not check signatures
                    with proxy.lock:
                        proxy.signed += 1
                    if proxy.refuse_signed:
                        self.send_error(403)
                        return
                conn = http.client.HTTPConnection(host, port, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body,
                                 headers=dict(self.headers.items()))
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                # counted before sending: a client that has its answer sees it counted
                with proxy.lock:
                    proxy.counts[self.command] = proxy.counts.get(self.command, 0) + 1
                    proxy.bytes_sent += len(data) if self.command != "HEAD" else 0
                self.send_response(resp.status)
                head = self.command == "HEAD"  # its Content-Length is the object's size
                for k, v in resp.getheaders():
                    # (send_response wrote Server and Date: a second one is malformed)
                    if k.lower() not in ("transfer-encoding", "connection", "server", "date",
                                         *proxy.drop_headers) and (
                            head or k.lower() != "content-length"):
                        self.send_header(k, v)
                if not head:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def send_response(self, code, message=None):
                self._answer()  # (before the client can have it and ask again)
                super().send_response(code, message)

            def _answer(self):
                """Count the request answered: no longer in flight, its span ended."""
                if self._answered:
                    return
                self._answered = True
                with proxy.lock:
                    proxy.inflight -= 1
                    if self._span is not None:
                        self._span[1] = time.monotonic()

            def _counted_forward(self):
                with proxy.lock:
                    proxy.inflight += 1
                    proxy.most_inflight = max(proxy.most_inflight, proxy.inflight)
                self._span, self._answered = None, False
                try:
                    self._forward()
                    self.wfile.flush()
                finally:
                    self._answer()

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _counted_forward

        class Server(http.server.ThreadingHTTPServer):
            request_queue_size = 256
            daemon_threads = True

        #: requests being answered now, and the most at once (reset it to measure)
        self.inflight = self.most_inflight = 0
        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def requests(self) -> int:
        with self.lock:
            return sum(self.counts.values())

    def round_trips(self, since: int = 0) -> int:
        """Round trips waited one after another since arrival ``since`` (:func:`_chain`)."""
        with self.lock:
            return _chain(self.spans[since:])

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def s3_latency(s3_server):
    """The moto S3 server behind a counting proxy with per-request latency.

    Yields ``(proxy, storage_options)``; the options reach S3 through the proxy.
    """
    proxy = _CountingProxy(s3_server["client_kwargs"]["endpoint_url"])
    opts = {**s3_server, "client_kwargs": {"endpoint_url": proxy.url},
            "skip_instance_cache": True}
    yield proxy, opts
    proxy.close()


def _self_signed_cert(directory):
    """Write a self-signed certificate for 127.0.0.1; return (cert_path, key_path)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = os.path.join(directory, "cert.pem"), os.path.join(directory,
                                                                             "key.pem")
    with open(cert_path, "wb") as fh:
        fh.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as fh:
        fh.write(key.private_bytes(serialization.Encoding.PEM,
                                   serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture
def https_server(tmp_path, tmp_path_factory):
    """Serve ``tmp_path`` over HTTPS on 127.0.0.1 with a throwaway self-signed certificate.

    ``client_ssl`` is an SSL context trusting that certificate (pass it as the fsspec
    ``ssl`` storage option).
    """
    pytest.importorskip("aiohttp")
    pytest.importorskip("cryptography")
    srv = _RangeServer(str(tmp_path), tls_dir=str(tmp_path_factory.mktemp("tls")))
    yield srv
    srv.close()


def _served(root):
    pytest.importorskip("aiohttp")
    srv = _RangeServer(str(root))
    yield srv
    srv.close()


@pytest.fixture
def http_server(tmp_path):
    """Serve ``tmp_path`` over HTTP on 127.0.0.1 (Range requests, byte counting)."""
    yield from _served(tmp_path)


@pytest.fixture
def other_http_server(tmp_path):
    """A second server of ``tmp_path`` on another port: another origin than ``http_server``."""
    yield from _served(tmp_path)


class _StopConversion(Exception):
    """Raised by :func:`stop_after`'s progress callbacks (an interrupted conversion)."""


@pytest.fixture
def stop_after():
    """``stop_after(n)``: a progress callback that interrupts a conversion once ``n``
    batches are done, raising ``stop_after.error``."""
    def make(n: int):
        def progress(p):
            if p.batches_done >= n:
                raise _StopConversion
        return progress

    make.error = _StopConversion
    return make
