"""Whole objects PUT to S3 from the writing thread, through URLs s3fs presigns.

A conversion to S3 stores each shard with one PutObject. Through zarr and s3fs
that request is built, signed and checksummed by botocore and sent by aiohttp on
the one event loop all of a process's writes share: about 3.5 ms of CPU per PUT of
1 MiB on this project's benchmark machine, against about 1.3 ms for the same PUT
sent by :meth:`~siff_xarray.reader.http_ranges.DirectRanges.put` from the batch's
own thread to a URL s3fs presigns (see docs/performance.md). The URL carries the
body's CRC32C (``x-amz-checksum-crc32c``), which S3 checks against the bytes it
receives, as botocore's own checksum header is checked; the shard's chunks and
index carry their own CRC32C as well.

Only where the storage options change nothing a PutObject sends beyond its
signature (:func:`~siff_xarray.reader.http_ranges.s3_settings`: no server-side
encryption, ACLs, requester pays or other client settings), and not where the
caller asked botocore to sign bodies (``payload_signing_enabled``). Everything
else, and any PUT this way fails for a reason other than a timeout, is left to
s3fs, whose requests and errors are the reference: a refused presigned PUT is
sent again by s3fs, which then reports what is wrong, and the bucket's writes stay
with s3fs in that process for :data:`REFUSED_FOR_S` seconds.

Where a conversion's batches write (:meth:`WritesBehind`), a PUT goes from a thread of
its own: the batch decodes its next frames while its shards travel, and its record
waits for them (at most :data:`WRITE_BEHIND_BYTES` held on their way, all of the
process's stores together).

Import rule: the standard library, google_crc32c, ``reader.http_ranges``,
``_remote`` and ``errors``.
"""

from __future__ import annotations

import base64
import os
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

from .._remote import thread_pool
from ..errors import RemoteAccessError
from ..reader.http_ranges import S3_STEP_ASIDE, DirectRanges, s3_settings

__all__ = ["ByteRoom", "DirectPuts", "WritesBehind", "process_room", "put_pool"]

#: threads that send the PUTs zarr's own writes and :meth:`DirectPuts.put_many` ask for
#: (as many as the S3 client's default pool: :data:`~siff_xarray._remote.S3_CONNECTIONS`)
PUT_THREADS = 64
_slots_lock = threading.Lock()
#: ``(endpoint, bucket)`` where a PUT this way failed -> when (``time.monotonic()``):
#: its writes are left to s3fs for :data:`REFUSED_FOR_S` seconds after that
_REFUSED: dict[tuple[str, str], float] = {}
#: seconds a bucket's writes stay with s3fs after a presigned PUT to it failed (a
#: refused signature stays refused; a lost connection or an outage passes, and a
#: long-lived process, a cluster's worker, then sends presigned PUTs again)
REFUSED_FOR_S = 300.0
#: ``(process, endpoint, n)``: the PUTs in flight to an endpoint, at most n (the
#: storage options' ``max_pool_connections``, as s3fs's client allows)
_SLOTS: dict[tuple[int, str, int], threading.BoundedSemaphore] = {}


def _slots(endpoint: str, n: int) -> threading.BoundedSemaphore:
    with _slots_lock:  # (a fork gets its own: one held at the fork would stay held)
        return _SLOTS.setdefault((os.getpid(), endpoint, n),
                                 threading.BoundedSemaphore(max(n, 1)))


def put_pool() -> ThreadPoolExecutor:
    """Return this process's threads for PUTs that zarr's event loop waits for."""
    return thread_pool("siff-put", PUT_THREADS)


#: bytes the writes behind (:class:`WritesBehind`) of one process hold on their way at
#: most, all its stores together: a writer that would hold more waits until enough of
#: them are stored (on this project's benchmark file a batch stores about 40 MB; two
#: threads' worth). A worker converting several runs at once holds no more than one.
WRITE_BEHIND_BYTES = 128 * 2**20
#: threads that send the writes behind (the PUTs in flight are bounded anyway, by the
#: endpoint's slots and by :data:`WRITE_BEHIND_BYTES`)
BEHIND_THREADS = 32


class ByteRoom:
    """Bytes held on their way, at most ``limit`` (one write larger than that goes alone)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._room = threading.Condition()
        self._held = 0

    @property
    def held(self) -> int:
        """Bytes taken and not yet given back."""
        with self._room:
            return self._held

    def take(self, nbytes: int) -> None:
        """Wait until ``nbytes`` more fit (or nothing is held); hold them."""
        with self._room:
            while self._held and self._held + nbytes > self.limit:
                self._room.wait()
            self._held += nbytes

    def give(self, nbytes: int) -> None:
        """Give back ``nbytes`` taken earlier."""
        with self._room:
            self._held -= nbytes
            self._room.notify_all()


#: process -> the room its writes behind share (a fork gets its own: bytes held at the
#: fork would stay held in the child)
_ROOMS: dict[int, ByteRoom] = {}


def process_room() -> ByteRoom:
    """Return the room (:data:`WRITE_BEHIND_BYTES`) this process's writes behind share."""
    with _slots_lock:
        return _ROOMS.setdefault(os.getpid(), ByteRoom(WRITE_BEHIND_BYTES))


class WritesBehind:
    """Writes of whole objects that go on in threads of their own while the writer goes on.

    :meth:`submit` returns once the write is on its way; the writer later waits for
    the futures :meth:`pending` gives (a conversion's batch: before its record; a
    write that failed stays among them, so that no later record misses its error), and
    a read of a key being written waits for that write (:meth:`of_key`). Two writes
    of one key are stored in the order they were submitted. The bytes on their way
    are bounded by ``room``, by default the one all of a process's writes behind
    share (:func:`process_room`): :meth:`submit` waits until earlier writes, of any
    store, make room.
    """

    def __init__(self, room: ByteRoom | None = None) -> None:
        self.room = process_room() if room is None else room
        self._lock = threading.Lock()
        self._pending: dict[str, Future[None]] = {}
        self._failed: list[Future[None]] = []

    def submit(self, key: str, nbytes: int, write: Callable[[], None]) -> Future[None]:
        """Start ``write`` (storing ``nbytes`` at ``key``) in another thread; return its future."""
        self.room.take(nbytes)
        with self._lock:
            before = self._pending.get(key)

            def run() -> None:
                if before is not None:  # (submitted earlier: ahead in the queue)
                    wait([before])
                write()

            try:
                job = thread_pool("siff-put-behind", BEHIND_THREADS).submit(run)
            except BaseException:  # (a pool shut down: the interpreter is exiting)
                self.room.give(nbytes)
                raise
            self._pending[key] = job

        def done(_: Future[None]) -> None:
            with self._lock:  # (a write is in _pending or in _failed until then)
                if self._pending.get(key) is job:
                    del self._pending[key]
                if job.cancelled() or job.exception() is not None:
                    self._failed.append(job)
            self.room.give(nbytes)

        job.add_done_callback(done)
        return job

    def of_key(self, key: str) -> Future[None] | None:
        """Return the future of the write of ``key`` on its way, if any."""
        with self._lock:
            return self._pending.get(key)

    def pending(self) -> list[Future[None]]:
        """Return the futures of the writes on their way now, and of every one that failed.

        A failed write is reported to every caller from then on: a batch whose
        write failed before it asked (its PUT refused at once) must not record
        itself done, nor may any batch after it.
        """
        with self._lock:
            return [*self._pending.values(), *self._failed]

    def settle(self) -> None:
        """Wait until no write is on its way (their errors are left to their futures)."""
        while jobs := [job for job in self.pending() if not job.done()]:
            wait(jobs)


class DirectPuts:
    """PUTs of whole objects into the bucket of one s3fs filesystem (see :meth:`of`)."""

    #: seconds a presigned PUT URL stays valid (it is used at once)
    SIGNED_FOR_S = 900
    #: largest body sent this way; larger ones go to s3fs (S3 takes at most 5 GiB in
    #: one PUT, and s3fs uploads large bodies in parts)
    MAX_BYTES = 2**30

    def __init__(self, fs: Any, settings: Any, sign: Callable[..., str], bucket: str) -> None:
        self._fs = fs
        self._sign = sign  # (s3fs's ``url``: a presigned URL of a path)
        self._settings = settings
        options = getattr(fs, "storage_options", None) or {}
        endpoint = (options.get("endpoint_url")
                    or (options.get("client_kwargs") or {}).get("endpoint_url"))
        self._bucket = (str(endpoint), bucket)
        most = (options.get("config_kwargs") or {}).get("max_pool_connections")
        self._slots = _slots(str(endpoint), int(most or PUT_THREADS))

    @property
    def refused(self) -> bool:
        """Whether a PUT this way to the bucket failed here lately: s3fs writes meanwhile.

        Lately: in this process, in the last :data:`REFUSED_FOR_S` seconds.
        """
        when = _REFUSED.get(self._bucket)
        return when is not None and time.monotonic() - when < REFUSED_FOR_S

    def _refuse(self) -> None:
        _REFUSED[self._bucket] = time.monotonic()

    @classmethod
    def of(cls, fs: Any, root: str, run: Callable[[Any], Any] | None = None
           ) -> DirectPuts | None:
        """Return direct PUTs for s3fs filesystem ``fs`` under ``root``; None where not allowed.

        For an asynchronous ``fs`` (zarr's), ``run`` runs a coroutine on its event
        loop and returns the result (zarr's ``sync``). None for other filesystems,
        an asynchronous one without ``run``, and where the storage options change
        what a PutObject sends beyond its signature or ask for signed bodies.
        """
        if type(fs).__name__ != "S3FileSystem":
            return None
        if getattr(fs, "asynchronous", False):
            if run is None:
                return None

            def sign(path: str, **kwargs: Any) -> str:
                return run(fs._url(path, **kwargs))
        else:
            sign = fs.url
        options = dict(getattr(fs, "storage_options", None) or {})
        for how in ("asynchronous", "loop"):  # (how zarr runs it: not what a PUT sends)
            options.pop(how, None)
        config = options.get("config_kwargs") or {}
        if (config.get("s3") or {}).get("payload_signing_enabled"):
            return None
        settings = s3_settings(f"s3://{root}", options)
        if settings is None:
            return None
        return cls(fs, settings, sign, root.split("/", 1)[0])

    def put(self, path: str, data: bytes) -> bool:
        """Store ``data`` as object ``path`` (``bucket/key``); False: left to s3fs.

        True once the server answered the PUT with success. False where this way
        does not apply (a body over :attr:`MAX_BYTES`, nothing to sign with) or
        failed for a reason s3fs may report better: the caller then writes the
        object through s3fs. A timeout raises :class:`~siff_xarray.errors.RemoteAccessError`
        (sending it again would wait as long again).
        """
        if self.refused or len(data) > self.MAX_BYTES:
            return False
        url = f"s3://{path}"
        import google_crc32c

        crc = base64.b64encode(struct.pack(">I", google_crc32c.value(data))).decode()
        try:
            signed = self._sign(path, expires=self.SIGNED_FOR_S, client_method="put_object",
                                ChecksumCRC32C=crc)
        except Exception:  # (anonymous access, an s3fs that cannot presign PUTs)
            self._refuse()
            return False
        s = self._settings
        target = DirectRanges(signed, {}, s.context, s.connect, s.read, name=url,
                              step_aside=S3_STEP_ASIDE)
        try:
            with self._slots:  # (as many at once as the caller's client would send)
                target.put(data)
        except TimeoutError as exc:
            raise RemoteAccessError(url, f"the server did not answer a write within "
                                         f"{s.read:g} s") from exc
        except Exception:  # refused, a redirect, no bucket, lost: s3fs tries and says
            self._refuse()
            return False
        self._fs.invalidate_cache(path)  # (as s3fs does after its own writes)
        return True

    def put_many(self, files: dict[str, bytes]) -> dict[str, bytes]:
        """Store each ``path: data`` of ``files`` at once; return those left to s3fs."""
        paths = list(files)
        done = list(put_pool().map(lambda p: self.put(p, files[p]), paths))
        return {p: files[p] for p, ok in zip(paths, done, strict=True) if not ok}
