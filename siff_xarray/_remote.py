"""Timeouts and retries for remote files, set in one place.

fsspec's HTTP and S3 filesystems wait without a limit by default: an endpoint that
accepts a connection and never answers hangs a call forever. :func:`with_timeouts`
adds a connect and a read timeout (and, for S3, retries with backoff, room for
more requests at once, :data:`S3_CONNECTIONS`, and bodies sent checksummed but not
signed, as botocore sends them over https) to a URL's storage options, unless the
caller set their own. :func:`remote_error` turns the
errors of an unreachable or silent server into one :class:`RemoteAccessError` that
names the URL. :func:`pin_kind` and its helpers make every read of an open file
require the ETag the object had when it was opened; :func:`replaced_error` names a
read refused because the object was replaced since. :func:`filesystem`,
:func:`async_filesystem` (zarr's stores) and :func:`pinning_filesystem` (version-
pinned reads) give one filesystem per process, use and storage options, whatever
thread asks; :func:`tuned` sets up an s3fs filesystem's requests.

Import rule: the standard library only (aiohttp and fsspec lazily).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import io
import json
import os
import ssl
import threading
from collections.abc import Callable, Iterator
from typing import Any

from .errors import ConversionError, RemoteAccessError, SiffFormatError

__all__ = ["CONNECT_TIMEOUT_S", "READ_TIMEOUT_S", "RETRIES", "S3_CONNECTIONS", "UNPIN_HINT",
           "PinnedS3Kwargs", "async_filesystem", "filesystem", "naming_url", "pin_kind",
           "pinned_http_options", "pinning_filesystem", "reading_version", "remote_error",
           "replaced_error", "thread_pool", "tuned", "with_timeouts"]

#: seconds to establish a connection
CONNECT_TIMEOUT_S = 10.0
#: seconds without a byte from the server before a request fails
READ_TIMEOUT_S = 60.0
#: attempts per S3 request (botocore's standard retry mode, exponential backoff)
RETRIES = 4
#: S3 connections (requests at once) per client. botocore allows 10, and a process's
#: zarr stores share one client (``store.layout``): a conversion's two threads send
#: more than ten requests at once at the end of their batches (shards, OME levels,
#: counts, the owner check), and those past ten waited a round trip for a free
#: connection. The benchmark conversion S3 to S3 at 20 ms: 4.25-4.83 s against
#: 4.79-5.19 s with ten (4 calls each, alternated), 73-85 round trips to the
#: destination against 86-94.
S3_CONNECTIONS = 64


def with_timeouts(url: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """Return ``storage_options`` with this package's timeouts where the caller set none.

    Chained URLs (``simplecache::s3://bucket/run.siff``) get them for each HTTP or S3
    link, under the link's protocol as fsspec expects (``{"s3": {...}}``).
    """
    if "::" in url:
        opts = dict(storage_options or {})
        for link in url.split("::")[1:]:
            protocol = link.split("://", 1)[0].lower() if "://" in link else ""
            if protocol in ("http", "https", "s3", "s3a"):
                opts[protocol] = with_timeouts(link, opts.get(protocol))
        return opts
    opts = dict(storage_options or {})
    protocol = url.split("://", 1)[0].lower() if "://" in url else ""
    if protocol in ("http", "https"):
        client = dict(opts.get("client_kwargs") or {})
        if "timeout" not in client:
            import aiohttp

            client["timeout"] = aiohttp.ClientTimeout(total=None, connect=CONNECT_TIMEOUT_S,
                                                      sock_read=READ_TIMEOUT_S)
        opts["client_kwargs"] = client
    elif protocol in ("s3", "s3a"):
        config = dict(opts.get("config_kwargs") or {})
        config.setdefault("connect_timeout", CONNECT_TIMEOUT_S)
        config.setdefault("read_timeout", READ_TIMEOUT_S)
        config.setdefault("retries", {"max_attempts": RETRIES, "mode": "standard"})
        config.setdefault("max_pool_connections", S3_CONNECTIONS)
        # bodies are checksummed (CRC32, which S3 checks) and not also hashed into the
        # signature: botocore does both over http, SHA-256 on top of the CRC32, on
        # the event loop every write goes through (over https it sends them unsigned
        # already, the checksum in a trailer)
        s3 = dict(config.get("s3") or {})
        s3.setdefault("payload_signing_enabled", False)
        config["s3"] = s3
        opts["config_kwargs"] = config
    return opts


#: the filesystems this module made: (process, use, protocol, options) -> filesystem
_SHARED: dict[tuple[int, str, str, str], Any] = {}
_SHARED_LOCK = threading.Lock()


def _shared(use: str, url: str, options: dict[str, Any], make: Callable[[], Any]) -> Any:
    """Return the process's filesystem for ``use``, ``url``'s protocol and ``options``.

    ``make()`` makes it the first time (None: nothing to share, and nothing is
    kept). The options a URL itself carries (S3's ``?versionId=``) are part of the
    key, as they are of the instance.
    """
    import fsspec

    protocol = url.split("://", 1)[0].lower()
    from_url = fsspec.get_filesystem_class(protocol)._get_kwargs_from_urls(url)
    key = (os.getpid(), use, protocol,
           json.dumps([options, from_url], sort_keys=True, default=repr))
    with _SHARED_LOCK:
        fs = _SHARED.get(key)
    if fs is None:
        fs = make()  # (outside the lock: a first request may be on its way elsewhere)
        if fs is None:
            return None
        with _SHARED_LOCK:  # (two threads may make one each: the first kept serves both)
            fs = _SHARED.setdefault(key, fs)
    return fs


def filesystem(url: str, storage_options: dict[str, Any] | None) -> tuple[Any, str]:
    """Return ``(filesystem, path)`` for ``url``, with :func:`with_timeouts`' options.

    fsspec keeps one instance per thread, and a new instance makes its client and
    its connections again on first use (s3fs: 0.1 s of CPU to load botocore's
    models, then a TCP and TLS handshake per connection). A conversion asks from
    new threads all the time (each batch's, each check's), so this keeps one per
    process, storage options and protocol for filesystems with an asynchronous
    implementation: their synchronous calls all run on fsspec's one event loop,
    whatever thread makes them. Others (no asynchronous implementation), chained
    URLs and options asking to skip fsspec's instance cache go to fsspec as they
    are. S3 instances are :func:`tuned`.
    """
    import fsspec

    options = with_timeouts(url, storage_options)
    if "::" in url or "://" not in url or options.get("skip_instance_cache"):
        fs, path = fsspec.core.url_to_fs(url, **options)
        return tuned(fs), path

    made: list[tuple[Any, str]] = []  # (the instance a call made and did not keep)

    def make() -> Any:
        made.append(fsspec.core.url_to_fs(url, **options))
        fs = made[-1][0]
        return tuned(fs) if getattr(fs, "async_impl", False) else None

    fs = _shared("sync", url, options, make)
    if fs is None:  # (not shared: the instance made just now, fsspec's as it is)
        fs, path = made[-1]
        return tuned(fs), path
    return fs, type(fs)._strip_protocol(url)


def async_filesystem(url: str, storage_options: dict[str, Any] | None) -> Any:
    """Return the process's asynchronous filesystem for ``url`` (zarr's stores), or None.

    zarr runs every store operation on its own event loop thread, whatever thread
    asks, so one instance per process, protocol and storage options serves them all
    (fsspec would make one per thread, each making its client again). It is shared
    even where the options skip fsspec's instance cache: that asks for an instance
    apart from the caller's, which this one is. None for chained URLs, local paths
    and filesystems without an asynchronous implementation.
    """
    import fsspec

    if "::" in url or "://" not in url:
        return None
    options = with_timeouts(url, storage_options)

    def make() -> Any:
        fs = fsspec.core.url_to_fs(url, asynchronous=True, **options)[0]
        return tuned(fs) if fs.async_impl else None

    return _shared("async", url, options, make)


def pinning_filesystem(url: str, storage_options: dict[str, Any] | None) -> Any:
    """Return an S3 filesystem whose reads require the version :func:`reading_version` sets.

    One per process and storage options (made on first use, its client on first
    request): the version travels with each read, not with the filesystem. It is
    this module's own instance (``skip_instance_cache``), so the caller's s3fs
    instances never send a precondition.
    """
    import fsspec

    options = with_timeouts(url, storage_options)

    def make() -> Any:
        fs = fsspec.core.url_to_fs(url, **{**options, "skip_instance_cache": True})[0]
        fs.s3_additional_kwargs = PinnedS3Kwargs(fs.s3_additional_kwargs or {})
        return tuned(fs)

    return _shared("pinning", url, options, make)


#: the ETag the request running in this context requires (S3 reads of a pinned source)
_PIN: contextvars.ContextVar[str | None] = contextvars.ContextVar("siff_xarray_pin",
                                                                  default=None)


def pin_kind(url: str, etag: str | None) -> str | None:
    """How reads of ``url`` can require version ``etag``: "headers", "context" or None.

    Every read then carries the object's ETag as a precondition, so a server answers
    a read of an object replaced since it was opened with 412 instead of the new
    object's bytes at the old offsets (:func:`replaced_error` names that). HTTP(S)
    sends ``If-Match`` from the filesystem's headers (:func:`pinned_http_options`);
    S3 adds ``IfMatch`` to the requests made inside :func:`reading_version` on a
    filesystem whose extra arguments are :class:`PinnedS3Kwargs` (one per set of
    storage options: an S3 client takes ~0.25 s to make). None where it cannot be
    done: no ETag or a weak one (``W/...``, never equal under If-Match), a chained
    URL, or another protocol.
    """
    if not etag or etag.startswith("W/") or "::" in url or "://" not in url:
        return None
    protocol = url.split("://", 1)[0].lower()
    if protocol in ("http", "https"):
        return "headers"
    if protocol in ("s3", "s3a"):
        return "context"
    return None


def pinned_http_options(storage_options: dict[str, Any] | None, etag: str) -> dict[str, Any]:
    """HTTP storage options whose every request requires version ``etag`` (If-Match)."""
    opts = dict(storage_options or {})
    opts["headers"] = {**(opts.get("headers") or {}), "If-Match": etag}
    return opts


class PinnedS3Kwargs(dict):
    """s3fs's extra request arguments, plus ``IfMatch`` inside :func:`reading_version`.

    s3fs copies its ``s3_additional_kwargs`` for every request and keeps those the
    operation accepts (GetObject and HeadObject take IfMatch). The ETag comes from
    a context variable, which follows the request from the reading thread into
    fsspec's event loop, so one filesystem serves sources of many versions.
    """

    def copy(self) -> dict[str, Any]:  # type: ignore[override]
        out = dict(self)
        pin = _PIN.get()
        if pin is not None:
            out["IfMatch"] = pin
        return out


@contextlib.contextmanager
def reading_version(etag: str | None) -> Iterator[None]:
    """Within the block, S3 reads on a pinning filesystem require version ``etag``."""
    token = _PIN.set(etag)
    try:
        yield
    finally:
        _PIN.reset(token)


#: added to every "replaced" error: what else a changed ETag can mean, and the way out
UNPIN_HINT = ("; if it was not replaced, the server gives this object different ETags "
              "from one request to the next (as some load-balanced servers do): open it "
              "with pin_version=False (--no-pin-version)")


def replaced_error(url: str, exc: BaseException) -> SiffFormatError | None:
    """Return the error for a read refused because the object changed (412), else None."""
    seen = 0
    while exc is not None and seen < 10:
        # aiohttp's ClientResponseError has the status; botocore's ClientError names
        # the code in its message (s3fs re-raises it as an OSError from it)
        if getattr(exc, "status", None) == 412 or "PreconditionFailed" in str(exc):
            return SiffFormatError(url, "the object was replaced since it was opened (its "
                                   f"ETag no longer matches); open it again{UNPIN_HINT}")
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


def tuned(fs: Any) -> Any:
    """Tune an s3fs filesystem's requests (others are left as they are); return ``fs``.

    * Retries are left to botocore alone. s3fs repeats a timed-out request 5 times
      on top of botocore's own :data:`RETRIES` attempts, so a silent endpoint would
      take 5 x RETRIES x :data:`READ_TIMEOUT_S` (20 minutes) to fail; botocore's
      standard retry mode already retries timeouts, connection errors, throttling
      and 5xx with backoff. With this a silent endpoint fails after at most RETRIES
      x READ_TIMEOUT_S.
    * Bodies of PutObject and UploadPart go as the bytes they are given
      (:func:`_bytes_body`).
    """
    if type(fs).__name__ != "S3FileSystem":
        return fs
    fs.retries = 1
    if "set_session" not in vars(fs):  # (once per instance)
        make_client = fs.set_session

        async def set_session(*args: Any, **kwargs: Any) -> Any:
            client = await make_client(*args, **kwargs)
            for operation in ("PutObject", "UploadPart"):  # (unique ids: once per client)
                client.meta.events.register_last(
                    f"before-parameter-build.s3.{operation}", _bytes_body,
                    unique_id=f"siff-xarray-bytes-body-{operation}")
            return client

        fs.set_session = fs._connect = set_session
    return fs


def _bytes_body(params: dict[str, Any], **kwargs: Any) -> None:
    """Give botocore back the bytes it wrapped into a BytesIO (a request's parameters).

    botocore wraps a bytes body into ``io.BytesIO`` (for its synchronous HTTP
    client's sake), and aiohttp copies such a body whole (``getbuffer`` unshares
    it), then reads and sends it 64 KiB at a time, yielding to the event loop after
    each; botocore's checksum reads it 1 MiB at a time. As bytes it is checksummed
    and sent at once, without copies, which botocore and aiohttp both handle (and
    retry). ``getvalue`` of a BytesIO made from bytes returns those bytes. Many PUTs
    at once gain most: 200 of 1 MB sent together took 1.2-1.3 ms of CPU each
    against 2.0-2.1 ms, 30 of 4 MB 2.7-2.9 ms against 5.5-6.8 ms; the benchmark
    store's 140 objects (247 MB) put two at a time, 0.44-0.49 s against 0.47-0.48 s.
    """
    body = params.get("Body")
    if isinstance(body, io.BytesIO) and body.tell() == 0:
        params["Body"] = body.getvalue()


@contextlib.contextmanager
def naming_url(url: str) -> Iterator[None]:
    """Turn a network failure inside the block into a RemoteAccessError naming ``url``.

    Errors that already say what is wrong (``SiffFormatError``, ``ConversionError``,
    ``RemoteAccessError``) and local paths pass through unchanged.
    """
    try:
        yield
    except (ConversionError, RemoteAccessError, SiffFormatError):
        raise
    except Exception as exc:
        err = remote_error(url, exc) if "://" in url else None
        if err is None:
            raise
        raise err from exc


def remote_error(url: str, exc: BaseException) -> RemoteAccessError | None:
    """Return a RemoteAccessError naming ``url`` for a network failure, else None.

    The exception and its causes are examined (fsspec's HTTP filesystem reports a
    timeout as a FileNotFoundError raised from it).
    """
    seen = 0
    while exc is not None and seen < 10:
        err = _network_error(url, exc)
        if err is not None:
            return err
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


def _network_error(url: str, exc: BaseException) -> RemoteAccessError | None:
    if isinstance(exc, ssl.SSLCertVerificationError) or type(exc).__name__ == \
            "ClientConnectorCertificateError":
        cause = getattr(exc, "certificate_error", exc)  # aiohttp wraps ssl's error
        reason = getattr(cause, "verify_message", None) or cause
        return RemoteAccessError(url, f"the server's TLS certificate is not trusted "
                                 f"({reason}); for a server of your own, pass "
                                 "storage_options={'ssl': ssl.create_default_context("
                                 "cafile=...)}")
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return RemoteAccessError(url, "the server did not answer in time (timeout); check "
                                 "the URL and the network, or raise the timeout through "
                                 "storage_options")
    if isinstance(exc, ConnectionError) or type(exc).__name__ in (
            "ClientConnectorError", "ServerDisconnectedError", "ClientOSError",
            "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError",
            "ConnectionClosedError", "IncompleteRead", "BadStatusLine"):
        return RemoteAccessError(url, f"the server cannot be reached ({exc})")
    if type(exc).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
        return RemoteAccessError(url, "no credentials for this bucket; configure them or "
                                 "pass storage_options={'anon': True} for a public one")
    return None


_thread_pools: dict[tuple[int, str], Any] = {}  # (process id, name) -> pool (a fork: its own)
_thread_pools_lock = threading.Lock()


def thread_pool(name: str, workers: int) -> Any:
    """Return this process's pool of threads ``name`` (a ``ThreadPoolExecutor``), made once.

    For calls that wait on the network (ranged GETs, PUTs, a batch's last round
    trips); a forked process gets its own (the parent's threads are not in it).
    """
    from concurrent.futures import ThreadPoolExecutor

    key = (os.getpid(), name)
    with _thread_pools_lock:
        pool = _thread_pools.get(key)
        if pool is None:
            pool = _thread_pools[key] = ThreadPoolExecutor(workers, thread_name_prefix=name)
        return pool
