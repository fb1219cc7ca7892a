"""Byte ranges of one HTTP(S) object, read straight into the caller's memory.

fsspec's HTTP filesystem receives every byte on its one event-loop thread
(aiohttp) and returns ``bytes`` that the reader then copies into its span: a long
remote read spent about as much CPU moving bytes as decoding them. For the large
reads of a file (the walk's windows, the spans a streamed read fetches ahead), a
:class:`~siff_xarray.reader.source.FsspecSource` of a plain ``http(s)://`` URL uses
:class:`DirectRanges` instead: blocking :mod:`http.client` connections, one per
worker thread and kept alive, each receiving its range into the caller's buffer
while the GIL is released (on Linux a plain-HTTP body in one ``recv_into`` with
``MSG_WAITALL``, else with ``readinto``). On the loopback benchmark server this
halves the CPU of a download (see docs/performance.md). An open's first ranges
(:meth:`DirectRanges.probe`) also tell the object's size and ETag, so it needs no
HEAD request.

S3 objects are read the same way through a presigned GET URL that s3fs signs
(:func:`s3_settings` says which storage options allow it): the request carries no
credentials, only the signature, which expires and is renewed by the source.
The converter's shards go to S3 the other way on the same connections, one
presigned PUT each (:meth:`DirectRanges.put`, used by ``store.s3_puts``).

It sends the GET fsspec would send (the source's headers, its If-Match pin and a
Range) with this package's timeouts, and answers as the source's other reads do:
a 412 carries ``status`` for :func:`~siff_xarray._remote.replaced_error`, a
missing object is a FileNotFoundError naming the URL, a server that ignores Range
a RemoteAccessError. It steps aside (:class:`StepAside`) for what it does not
handle, a redirect (for S3 also a refused signature), so the source falls back to
fsspec. Storage options it does
not understand (authentication, proxies, other client settings) keep the source
on fsspec from the start (:func:`direct_ranges`).

Import rule: the standard library, ``errors`` and ``_remote``.
"""

from __future__ import annotations

import atexit
import http.client
import os
import socket
import ssl
import struct
import sys
import threading
import time
import urllib.parse
import weakref
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, NamedTuple

from .. import _remote
from ..errors import RemoteAccessError

__all__ = ["MAX_REDIRECTS", "DirectRanges", "HTTPStatusError", "Link", "Probe", "Redirected",
           "S3Settings", "StepAside", "direct_ranges", "s3_settings"]

#: storage options of fsspec's HTTP filesystem that do not change what a GET sends
_HARMLESS = frozenset({"headers", "ssl", "client_kwargs", "skip_instance_cache",
                       "use_listings_cache", "listings_expiry_time", "block_size",
                       "simple_links", "same_scheme", "size_policy", "cache_type",
                       "cache_options"})
#: requests in flight at once (one connection each), shared by all sources of a process
MAX_CONNECTIONS = 32
#: servers a thread keeps a connection to (the oldest is closed beyond)
_KEPT_SERVERS = 8
#: statuses answered again after a pause (the server is busy or restarting)
_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
#: s3fs storage options that do not change what a GetObject sends
_S3_HARMLESS = frozenset({"key", "secret", "token", "anon", "profile", "endpoint_url",
                          "client_kwargs", "config_kwargs", "skip_instance_cache",
                          "use_listings_cache", "listings_expiry_time", "version_aware",
                          "default_block_size", "default_fill_cache", "default_cache_type"})
#: statuses of a presigned S3 GET left to s3fs: a redirect to another region, and a
#: signature or policy the server refuses (s3fs then reports what is wrong)
S3_STEP_ASIDE = frozenset({301, 302, 307, 308, 400, 403})


#: redirect statuses
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
#: redirects a probe follows to find an object (a download link to a presigned URL
#: takes one)
MAX_REDIRECTS = 5


class StepAside(Exception):
    """The server answered in a way left to fsspec (a redirect, a refused signature)."""


class Redirected(StepAside):
    """A probe was redirected; ``location`` is the absolute URL the server named."""

    def __init__(self, location: str) -> None:
        self.location = location
        super().__init__("redirected")


class HTTPStatusError(RemoteAccessError):
    """An HTTP error status; ``status`` holds it (a 412 means the object was replaced)."""

    def __init__(self, url: str, status: int, reason: str) -> None:
        self.status, self.reason = status, reason
        super().__init__(url, f"the server answered HTTP {status} {reason}")

    def __reduce__(self):  # keep the fields through pickling (dask workers)
        return (type(self), (self.url, self.status, self.reason))


class Probe(NamedTuple):
    """What :meth:`DirectRanges.probe` learnt in one round trip."""

    size: int  #: the object's length (from ``Content-Range``)
    etag: str | None  #: its ETag, if the server sent one
    modified: str | None  #: its ``Last-Modified`` header, if the server sent one
    head: bytes  #: its first bytes
    tail: bytes  #: its last bytes
    #: ``(start, bytes)`` of the extra ranges the server answered
    blocks: list[tuple[int, bytes]]


class S3Settings(NamedTuple):
    """How presigned GETs of an S3 object connect: TLS context and timeouts (s)."""

    context: ssl.SSLContext | None
    connect: float
    read: float


def _options_within(url: str, storage_options: dict[str, Any] | None,
                    schemes: tuple[str, ...], allowed: frozenset[str]
                    ) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """Return ``(options, client_kwargs copy)`` with this package's timeouts.

    None for a chained URL, another scheme or host-less URL, or options that set a
    key outside ``allowed``.
    """
    parts = urllib.parse.urlsplit(url)
    if "::" in url or parts.scheme.lower() not in schemes or not parts.netloc:
        return None
    opts = _remote.with_timeouts(url, storage_options)
    if not set(opts) <= allowed:
        return None
    return opts, dict(opts.get("client_kwargs") or {})


def _unverified() -> ssl.SSLContext:
    """Return a TLS context that checks no certificate (the caller asked for none)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def s3_settings(url: str, storage_options: dict[str, Any] | None) -> S3Settings | None:
    """Return how to read ``url`` (``s3://``) through presigned GETs, or None if not.

    None where the storage options change the request beyond its signature
    (requester pays, server-side encryption keys and other extra arguments,
    client settings other than endpoint, region and certificate checking), so
    s3fs keeps reading it.
    """
    given = _options_within(url, storage_options, ("s3", "s3a"), _S3_HARMLESS)
    if given is None:
        return None
    opts, client = given
    verify = client.pop("verify", None)
    client.pop("endpoint_url", None)
    client.pop("region_name", None)
    if client:
        return None
    config = opts.get("config_kwargs") or {}
    if not set(config) <= {"connect_timeout", "read_timeout", "retries", "region_name",
                           "signature_version", "max_pool_connections", "s3"}:
        return None
    # (how bodies are signed: a presigned GET sends none)
    if not set(config.get("s3") or {}) <= {"payload_signing_enabled"}:
        return None
    endpoint = str(opts.get("endpoint_url") or
                   (opts.get("client_kwargs") or {}).get("endpoint_url") or "https://")
    context = None
    if endpoint.lower().startswith("https") or "://" not in endpoint:
        if verify is False:
            context = _unverified()
        elif isinstance(verify, str):
            context = ssl.create_default_context(cafile=verify)
        else:  # botocore trusts certifi's bundle where it is installed
            try:
                import certifi

                context = ssl.create_default_context(cafile=certifi.where())
            except ImportError:
                context = ssl.create_default_context()
    return S3Settings(context, float(config.get("connect_timeout", _remote.CONNECT_TIMEOUT_S)),
                      float(config.get("read_timeout", _remote.READ_TIMEOUT_S)))


def direct_ranges(url: str, storage_options: dict[str, Any] | None) -> DirectRanges | None:
    """Return a :class:`DirectRanges` for ``url``, or None where fsspec must read it.

    Only plain ``http://`` and ``https://`` URLs whose storage options set nothing
    but headers, the ``ssl`` argument and aiohttp timeouts: anything else (basic
    auth, a custom session, a chained URL) may change the request in ways this
    module does not reproduce. The timeouts are those of
    :func:`~siff_xarray._remote.with_timeouts` unless the options set their own.
    """
    given = _options_within(url, storage_options, ("http", "https"), _HARMLESS)
    if given is None:
        return None
    opts, client = given
    parts = urllib.parse.urlsplit(url)
    timeout = client.pop("timeout", None)
    if client:
        return None
    connect = getattr(timeout, "connect", None) or _remote.CONNECT_TIMEOUT_S
    read = getattr(timeout, "sock_read", None) or _remote.READ_TIMEOUT_S
    headers = opts.get("headers") or {}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
        return None
    context = None
    if parts.scheme == "https":
        given = opts.get("ssl", True)
        if isinstance(given, ssl.SSLContext):
            context = given
        elif given is False:  # aiohttp's "do not verify"
            context = _unverified()
        elif given in (True, None):
            context = ssl.create_default_context()
        else:  # a fingerprint or another aiohttp object
            return None
    return DirectRanges(url, dict(headers), context, float(connect), float(read))


class Link:
    """What requests to one server cost, as this process's requests to it measured.

    ``first_byte_s`` is the time from sending a GET to its answer's headers (the
    server's latency, the round trip and a connection's set-up when one is made);
    ``bytes_per_s`` the rate at which a call of several ranges received its bytes
    once they came (all its connections together). Both are taken from the last
    :attr:`KEEP` samples, None until measured. Shared by every
    :class:`DirectRanges` of the server (``scheme://host:port``).
    """

    #: samples each estimate is taken from
    KEEP = 32
    #: CPU a request costs this process beyond its bytes (http.client, the pool's
    #: hand-over): 705 ranged GETs of 118 kB each from a loopback server in another
    #: process took 0.25-0.39 CPU s on this project's benchmark machine
    REQUEST_CPU_S = 0.0005
    #: receiving is taken to have lasted at least this share of a call's time: a
    #: call that was nearly all latency tells only a lower bound of the rate
    MIN_TRANSFER_SHARE = 0.25
    #: and only calls of at least this many bytes per request (many small requests
    #: take their time in the server and the client's CPU, not in moving bytes)
    MIN_SAMPLE_BYTES = 2**19

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._first: list[float] = []
        self._rate: list[float] = []

    @staticmethod
    def _quantile(xs: list[float], q: float) -> float | None:
        if not xs:
            return None
        ys = sorted(xs)
        return ys[min(int(q * len(ys)), len(ys) - 1)]

    @property
    def first_byte_s(self) -> float | None:
        """Median seconds a GET waited for its answer's headers (None: not measured)."""
        with self._lock:
            return self._quantile(self._first, 0.5)

    @property
    def bytes_per_s(self) -> float | None:
        """Upper quartile of the rates calls received at (None: not measured).

        Not the median: a call that shares the connections and the CPU with other
        reads of the process (Dask's threads) receives at part of the rate they
        receive at together, so most samples fall short of the server's rate.
        """
        with self._lock:
            return self._quantile(self._rate, 0.75)

    @property
    def rate_samples(self) -> int:
        """How many calls the rate was measured on (the last :attr:`KEEP`)."""
        with self._lock:
            return len(self._rate)

    def answered(self, seconds: float) -> None:
        """Record the time a GET waited for its answer's headers."""
        with self._lock:
            self._first.append(seconds)
            del self._first[: -self.KEEP]

    def received(self, nbytes: int, seconds: float, requests: int, rounds: int) -> None:
        """Record a call that received ``nbytes`` in ``seconds`` with ``requests`` in ``rounds``."""
        first = self.first_byte_s
        if first is None or nbytes < self.MIN_SAMPLE_BYTES * requests:
            return
        moving = seconds - rounds * first - requests * self.REQUEST_CPU_S
        # a transfer too short to measure against the latency is at least this fast
        moving = max(moving, self.MIN_TRANSFER_SHARE * seconds)
        with self._lock:
            self._rate.append(nbytes / moving)
            del self._rate[: -self.KEEP]


_links: dict[tuple[str, str, int], Link] = {}
_links_lock = threading.Lock()


def link(scheme: str, host: str, port: int) -> Link:
    """Return the process's :class:`Link` of a server."""
    with _links_lock:
        return _links.setdefault((scheme, host, port), Link())


class DirectRanges:
    """Concurrent byte-range GETs of one URL into memory the caller owns.

    Parameters
    ----------
    url
        The object's ``http(s)://`` URL (query string kept, fragment dropped).
    headers
        Headers sent with every request (the caller adds If-Match per call).
    context
        TLS context for ``https`` (None for ``http``).
    connect_timeout, read_timeout
        Seconds to connect, and without a byte from the server, before failing.
    name
        What error messages call the object (default ``url``; a presigned URL's
        signature must not end up in messages and logs).
    step_aside
        Statuses that raise :class:`StepAside` (default: redirects).

    """

    def __init__(self, url: str, headers: dict[str, str], context: ssl.SSLContext | None,
                 connect_timeout: float = _remote.CONNECT_TIMEOUT_S,
                 read_timeout: float = _remote.READ_TIMEOUT_S, name: str | None = None,
                 step_aside: frozenset[int] = frozenset({301, 302, 303, 307, 308})) -> None:
        parts = urllib.parse.urlsplit(url)
        self.url = name or url
        self._address = url  # where the requests go (``url`` may be a signed one)
        self._step_aside = step_aside
        self.headers = headers
        self._scheme, self._host = parts.scheme, parts.hostname or ""
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._context = context
        self._connect_timeout, self._read_timeout = connect_timeout, read_timeout
        self._key = (self._scheme, self._host, self._port, id(context))
        #: what requests to this server cost (shared with its other objects)
        self.link = link(self._scheme, self._host, self._port)

    def fetch_into(self, out: memoryview, starts: list[int], stops: list[int],
                   at: list[int], headers: dict[str, str] | None = None,
                   etag: str | None = None) -> list[int]:
        """Read bytes ``starts[i]:stops[i]`` into ``out[at[i]:]``, concurrently.

        Returns the number of bytes each range received: fewer than asked where
        the object ends before the range does. Every request has finished when
        this returns or raises, so ``out`` is no longer written to. With ``etag``,
        an answer that carries another ETag (weakly compared, so a weak ETag, which
        If-Match cannot require, is checked too) is refused as a 412.
        """
        extra = headers or {}
        if len(starts) == 1:
            return [self._get(out, starts[0], stops[0], at[0], extra, etag)]
        t0 = time.monotonic()
        jobs = [_pool().submit(self._get, out, a, b, o, extra, etag)
                for a, b, o in zip(starts, stops, at, strict=True)]
        wait(jobs)  # all of them, failed or not: none may write into `out` later
        for job in jobs:
            exc = job.exception()
            if exc is not None:
                raise exc
        got = [job.result() for job in jobs]
        self.link.received(sum(got), time.monotonic() - t0, len(starts),
                           -(-len(starts) // MAX_CONNECTIONS))
        return got

    def redirected(self, location: str) -> DirectRanges | None:
        """Return direct reads of ``location``, where a probe of this URL was redirected.

        Messages still name this object. The headers go along to the same scheme,
        host and port only (credentials meant for one server never reach another,
        and a presigned URL refuses a second kind of authentication); None for a
        redirect from https to http or to another scheme (fsspec decides).
        """
        parts = urllib.parse.urlsplit(location)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or (self._scheme == "https" and scheme == "http"):
            return None
        port = parts.port or (443 if scheme == "https" else 80)
        same = (scheme, parts.hostname or "", port) == (self._scheme, self._host, self._port)
        context = self._context if scheme == "https" else None
        if scheme == "https" and context is None:
            context = ssl.create_default_context()
        return DirectRanges(location, dict(self.headers) if same else {}, context,
                            self._connect_timeout, self._read_timeout, name=self.url)

    def probe(self, head: int, tail: int, starts: list[int], stops: list[int],
              headers: dict[str, str] | None = None, versions: bool = True
              ) -> Probe | None:
        """Fetch the object's first ``head`` and last ``tail`` bytes and small ranges at once.

        One round trip instead of two for an open, which needs the object's size and
        ETag (an ``info``, a HEAD request) before it can ask for the tail: a suffix
        range (``bytes=-tail``) needs no size, and every 206 answer carries the size
        in ``Content-Range`` and the ETag. Returns None where the server answers
        anything but 206 for the head or tail (a missing object, a redirect, an
        ignored Range, a refused precondition, an empty object): the caller then
        asks fsspec, whose answer and errors are the reference. A timeout raises
        (asking again would wait as long again); other network errors return None
        as well. Extra ranges the server does not answer with 206 are left out. A
        redirect of the head's request raises :class:`Redirected` (the caller may
        follow it with :meth:`redirected`).
        ``versions=False`` takes answers of one size as one object whatever their
        ETags and modification times (and returns neither): for a caller that
        ignores the server's versions.
        """
        extra = headers or {}
        ranges = [f"bytes=0-{head - 1}", f"bytes=-{tail}"]
        ranges += [f"bytes={a}-{b - 1}" for a, b in zip(starts, stops, strict=True)]
        jobs = [_pool().submit(self._small_get, r, extra) for r in ranges]
        wait(jobs)
        got = []
        for job in jobs:
            exc = job.exception()
            if isinstance(exc, TimeoutError):
                raise exc
            if isinstance(exc, Redirected) and job is jobs[0]:
                raise exc
            answer = None if exc is not None else job.result()
            if answer is not None and not versions:
                answer = (answer[0], answer[1], None, None, answer[4])
            got.append(answer)
        first, last = got[0], got[1]
        if first is None or last is None or first[1:4] != last[1:4]:
            return None  # not answered, or two versions of the object: fsspec decides
        size, etag, modified = first[1:4]
        blocks = [(a, g[4]) for a, g in zip(starts, got[2:], strict=True)
                  if g is not None and g[0] == a and g[1:4] == first[1:4] and g[4]]
        return Probe(size, etag, modified, first[4], last[4], blocks)

    #: largest body :meth:`_small_get` reads (a probe's ranges are a few KiB each)
    _SMALL = 2**20

    def _small_get(self, range_value: str, extra: dict[str, str]
                   ) -> tuple[int, int, str | None, str | None, bytes] | None:
        """GET one small range, or None if not answered with 206.

        Returns ``(first byte, object size, ETag, Last-Modified, body)``.

        A kept-alive connection the server closed while idle is replaced once.
        """
        headers = {**self.headers, **extra, "Range": range_value,
                   "Accept-Encoding": "identity"}
        resp, _ = self._send(headers)
        try:
            location = resp.getheader("Location")
            if resp.status in _REDIRECTS and location:
                self._finish(resp, small=True)
                raise Redirected(urllib.parse.urljoin(self._address, location))
            total = _content_size(resp.getheader("Content-Range", ""))
            if resp.status != 206 or total < 0 or (resp.length or 0) > self._SMALL:
                self._finish(resp, small=False)
                return None
            first, _ = _content_range(resp.getheader("Content-Range", ""))
            body = resp.read()
            self._finish(resp, small=True)
            return first, total, resp.getheader("ETag"), resp.getheader("Last-Modified"), body
        except BaseException:
            self._drop()
            raise

    def put(self, body: bytes, headers: dict[str, str] | None = None) -> str | None:
        """PUT ``body`` as the whole object from this thread; return the answer's ETag.

        For the converter's shards on object storage (``store.s3_puts``): the
        body goes out on this thread's kept-alive connection to the server, the
        one its reads use, while the GIL is released. A lost connection or a busy
        server (429, 5xx) is tried again after a pause, up to
        :data:`~siff_xarray._remote.RETRIES` attempts (a PUT replaces the whole
        object, so sending it again is safe); a timeout is not. The statuses
        this object steps aside for raise :class:`StepAside`, other errors
        :class:`HTTPStatusError` (404 a FileNotFoundError).
        """
        headers = {**self.headers, **(headers or {}), "Content-Length": str(len(body))}
        attempt = 0
        while True:
            try:
                resp, _ = self._send(headers, "PUT", body)
                status, etag = resp.status, resp.getheader("ETag")
                self._finish(resp, small=True)
            except (ConnectionError, http.client.HTTPException) as exc:
                attempt = self._lost(exc, attempt)
                continue
            except BaseException:
                self._drop()
                raise
            if 200 <= status < 300:
                return etag
            attempt = self._refused(status, resp.reason, attempt, "no such bucket")

    def _send(self, headers: dict[str, str], method: str = "GET", body: bytes | None = None
              ) -> tuple[http.client.HTTPResponse, Any]:
        """Send a request for this object on this thread's connection (a GET by default).

        Returns the response and its socket.

        A kept-alive connection the server closed while idle is replaced at once
        (once: a new connection that fails is a failure); a failure drops the
        connection and raises. The socket is returned because the connection lets
        go of it when the server announces that it will close.
        """
        while True:
            conn, reused = self._connection()
            try:
                conn.request(method, self._target, body=body, headers=headers)
                sock = conn.sock
                return conn.getresponse(), sock
            except (ConnectionError, http.client.HTTPException):
                self._drop()
                if not reused:
                    raise
            except BaseException:
                self._drop()
                raise

    def _connection(self) -> tuple[http.client.HTTPConnection, bool]:
        """Return this thread's kept-alive connection to the server, and whether it is reused."""
        conns = _local_connections()
        conn = conns.get(self._key)
        if conn is not None:
            return conn, True
        if self._scheme == "https":
            conn = http.client.HTTPSConnection(self._host, self._port,
                                               timeout=self._connect_timeout,
                                               context=self._context)
        else:
            conn = http.client.HTTPConnection(self._host, self._port,
                                              timeout=self._connect_timeout)
        conn.connect()
        conn.sock.settimeout(self._read_timeout)
        conns[self._key] = conn
        _every_connection.add(conn)
        while len(conns) > _KEPT_SERVERS:  # dicts keep insertion order: oldest first
            conns.pop(next(iter(conns))).close()
        return conn, False

    def _drop(self) -> None:
        conn = _local_connections().pop(self._key, None)
        if conn is not None:
            conn.close()

    def _get(self, out: memoryview, start: int, stop: int, at: int,
             extra: dict[str, str], etag: str | None = None) -> int:
        """GET one range into ``out[at:]``; return its length (short where the object ends).

        A kept-alive connection the server closed meanwhile is replaced at once; a
        connection lost otherwise, or a busy server (429, 5xx), is tried again after
        a pause, up to :data:`~siff_xarray._remote.RETRIES` attempts. A timeout is not
        retried: the caller hears of a silent server after one read timeout.
        """
        headers = {**self.headers, **extra, "Range": f"bytes={start}-{stop - 1}",
                   "Accept-Encoding": "identity"}
        attempt = 0
        while True:
            try:
                t0 = time.monotonic()
                resp, sock = self._send(headers)
                self.link.answered(time.monotonic() - t0)
                status = resp.status
                if status == 206 or (status == 200 and start == 0
                                     and resp.length == stop - start):
                    self._check_version(resp, etag)
                    return self._receive(resp, sock, out, start, stop, at)
                self._finish(resp, small=status != 200)
            except (ConnectionError, http.client.HTTPException) as exc:
                attempt = self._lost(exc, attempt)
                continue
            except BaseException:
                self._drop()
                raise
            if status == 416:  # the range starts at or past the end of the object
                return 0
            if status == 200:
                raise RemoteAccessError(
                    self.url, f"the server ignored a Range request (it answered bytes "
                    f"{start}-{stop - 1} with the whole object); siff-xarray reads byte "
                    "ranges, so serve the file from a server that supports them (S3, GCS "
                    "and most HTTP servers do) or download it first")
            attempt = self._refused(status, resp.reason, attempt, "no such file")

    def _lost(self, exc: BaseException, attempt: int) -> int:
        """Drop a lost connection; pause and return the next attempt, or raise ``exc``.

        A refused connection, or the last of :data:`~siff_xarray._remote.RETRIES`
        attempts, raises.
        """
        self._drop()
        attempt += 1
        if attempt >= _remote.RETRIES or isinstance(exc, ConnectionRefusedError):
            raise exc
        time.sleep(0.1 * 2**attempt)
        return attempt

    def _refused(self, status: int, reason: str, attempt: int, missing: str) -> int:
        """Answer an error status: pause and return the next attempt, or raise.

        A busy server (429, 5xx) is asked again until the last attempt. Statuses
        this object steps aside for raise :class:`StepAside`, 404 and 410 a
        FileNotFoundError saying ``missing``, others :class:`HTTPStatusError`.
        """
        if status in self._step_aside:
            raise StepAside(f"HTTP {status}")
        if status in (404, 410):
            raise FileNotFoundError(f"{self.url}: {missing} (HTTP {status})")
        attempt += 1
        if status in _RETRY_STATUS and attempt < _remote.RETRIES:
            time.sleep(0.1 * 2**attempt)
            return attempt
        raise HTTPStatusError(self.url, status, reason)

    def _check_version(self, resp: http.client.HTTPResponse, etag: str | None) -> None:
        """Refuse an answer from another version of the object than ``etag`` (if any).

        Raised as the server's own refusal would be (412), so the caller reports
        the object as replaced. An answer without an ETag is taken as it is.
        """
        tag = resp.getheader("ETag")
        if etag and tag and _opaque(tag) != _opaque(etag):
            resp.close()
            raise HTTPStatusError(self.url, 412, f"the object's ETag is now {tag}, not {etag}")

    def _receive(self, resp: http.client.HTTPResponse, sock: Any, out: memoryview,
                 start: int, stop: int, at: int) -> int:
        """Receive a range's body into ``out``; return its length (short at the end).

        A body that stops before its announced length is a lost connection
        (``IncompleteRead``), not a short object: the object's end shows in the
        ``Content-Range`` the server announced. On a plain (not TLS) connection
        the body is received by :func:`_receive_whole`.
        """
        if resp.status == 206:
            first, last = _content_range(resp.getheader("Content-Range", ""))
            if first != start or last >= stop:
                raise RemoteAccessError(
                    self.url, f"the server answered bytes {start}-{stop - 1} with bytes "
                    f"{first}-{last}; siff-xarray reads byte ranges, so serve the file "
                    "from a server that honours them or download it first")
        want = resp.length if resp.length is not None else stop - start
        view = out[at : at + min(want, stop - start)]
        got = 0
        if WAIT_ALL and resp.length is not None and not isinstance(sock, ssl.SSLSocket):
            got = _receive_whole(resp, sock, view, self._read_timeout)
        while got < len(view):
            n = resp.readinto(view[got:])
            if not n:
                raise http.client.IncompleteRead(b"", len(view) - got)
            got += n
        self._finish(resp, small=True)
        return got

    def _finish(self, resp: http.client.HTTPResponse, small: bool) -> None:
        """Leave the connection ready for the next request, or drop it."""
        if resp.will_close or not small or (resp.length or 0) > 2**16:
            resp.close()
            self._drop()
        else:
            resp.read()  # an error page or an empty remainder: keep the connection


#: receive the body of a plain-HTTP range with one blocking ``recv_into(MSG_WAITALL)``
#: (Linux), not one ``readinto`` per segment the kernel hands over. On the loopback
#: benchmark server, a download of the benchmark file in 36 MiB spans, three ahead:
#: 0.66-0.76 CPU s against 0.79-0.83 (medians of 5, 4 processes each), 0.52-0.58 s
#: against 0.56-0.60 s; eager plane traces at 50 ms 1.24-1.36 s against 1.40-1.44 s
WAIT_ALL = sys.platform.startswith("linux") and hasattr(socket, "MSG_WAITALL")


def _receive_whole(resp: http.client.HTTPResponse, sock: socket.socket, view: memoryview,
                   timeout: float) -> int:
    """Receive up to ``len(view)`` bytes of ``resp``'s body into ``view``; return how many.

    ``readinto`` returns each segment as the kernel hands it over (tens of KiB on
    loopback), taking the GIL back for every one, so the threads receiving ranges
    and the thread decoding them hand the GIL back and forth thousands of times per
    file. Here the socket is blocking while the body arrives and the kernel fills
    ``view`` in one call (``MSG_WAITALL``); ``SO_RCVTIMEO`` keeps the read timeout:
    a call that waits ``timeout`` seconds for a byte raises ``TimeoutError`` as a
    timed-out ``readinto`` does. The bytes ``http.client`` already buffered with the
    headers are taken first, and the response is told how much of its body is
    left, so it finishes as if it had read the body itself. Fewer bytes than asked
    mean the server closed the connection (the caller raises ``IncompleteRead``).
    """
    left = resp.length or 0
    held = resp.fp.peek(1)[: min(len(view), left)] if left else b""  # no raw read if held
    got = len(held)
    view[:got] = held
    resp.fp.read(got)
    before = sock.gettimeout()
    sock.settimeout(None)  # blocking: MSG_WAITALL waits for every byte
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                    struct.pack("ll", int(timeout), int(timeout % 1 * 1e6)))
    try:
        while got < len(view):
            try:
                n = sock.recv_into(view[got:], len(view) - got, socket.MSG_WAITALL)
            except BlockingIOError:  # SO_RCVTIMEO expired without a byte
                raise TimeoutError("timed out") from None
            if not n:
                break
            got += n
    finally:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 0))
        sock.settimeout(before)
        resp.length = left - got  # the body the response itself has left to read
    return got


def _opaque(etag: str) -> str:
    """Return an ETag without its weakness mark (weak comparison, RFC 9110 8.8.3.2)."""
    return etag[2:] if etag.startswith("W/") else etag


def _content_size(value: str) -> int:
    """Return the size in ``Content-Range: bytes first-last/size`` (-1 if absent or ``*``)."""
    try:
        return int(value.split("/")[1])
    except (IndexError, ValueError):
        return -1


def _content_range(value: str) -> tuple[int, int]:
    """``(first, last)`` byte of a ``Content-Range: bytes first-last/size`` (-1s if absent)."""
    try:
        first, last = value.split()[1].split("/")[0].split("-")
        return int(first), int(last)
    except (IndexError, ValueError):
        return -1, -1


_state = threading.local()
#: every connection a thread keeps, closed when the interpreter exits
_every_connection: weakref.WeakSet[http.client.HTTPConnection] = weakref.WeakSet()


@atexit.register
def _close_connections() -> None:
    for conn in list(_every_connection):
        conn.close()


def _local_connections() -> dict[tuple[Any, ...], http.client.HTTPConnection]:
    conns = getattr(_state, "conns", None)
    if conns is None or getattr(_state, "pid", None) != os.getpid():
        conns = _state.conns = {}
        _state.pid = os.getpid()
    return conns


def _pool() -> ThreadPoolExecutor:
    return _remote.thread_pool("siff-http", MAX_CONNECTIONS)
