"""Presigned PUTs of a conversion's writes to S3 (``store.s3_puts``), apart from zarr.

The conversions that use them are tested in ``test_zarr.py`` against moto behind
the counting proxy (every write presigned and checksummed, a busy server, a refused
signature); here: which stores take them, and a silent server.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

pytest.importorskip("s3fs")

from siff_xarray.errors import RemoteAccessError
from siff_xarray.store.s3_puts import ByteRoom, DirectPuts, WritesBehind


def _s3(endpoint: str = "http://127.0.0.1:9", **options):
    import s3fs

    options = {"client_kwargs": {"endpoint_url": endpoint}, **options}
    return s3fs.S3FileSystem(key="testing", secret="testing", skip_instance_cache=True,
                             **options)


def test_which_s3_stores_take_presigned_puts():
    assert DirectPuts.of(_s3(), "bkt/run.zarr") is not None
    timeouts = {"config_kwargs": {"read_timeout": 5, "connect_timeout": 2,
                                  "s3": {"payload_signing_enabled": False}}}
    assert DirectPuts.of(_s3(**timeouts), "bkt/run.zarr") is not None
    # what a presigned PUT would not send, or signed bodies asked for: s3fs's
    for options in ({"s3_additional_kwargs": {"ServerSideEncryption": "aws:kms"}},
                    {"requester_pays": True},
                    {"config_kwargs": {"s3": {"payload_signing_enabled": True}}},
                    {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9",
                                       "aws_session_token": "x"}}):
        assert DirectPuts.of(_s3(**options), "bkt/run.zarr") is None, options
    # zarr's asynchronous instance: only with a way to run its coroutines
    fs = _s3(asynchronous=True)
    assert DirectPuts.of(fs, "bkt/run.zarr") is None
    assert DirectPuts.of(fs, "bkt/run.zarr", run=lambda coro: None) is not None
    assert DirectPuts.of(object(), "bkt/run.zarr") is None


def test_a_silent_server_fails_a_put_after_one_read_timeout_naming_the_key():
    srv = socket.socket()  # accepts connections (the kernel's backlog), never answers
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    try:
        fs = _s3(f"http://127.0.0.1:{srv.getsockname()[1]}",
                 config_kwargs={"read_timeout": 0.5, "connect_timeout": 1})
        puts = DirectPuts.of(fs, "bkt/run.zarr")
        assert puts is not None
        t0 = time.monotonic()
        with pytest.raises(RemoteAccessError, match=r"s3://bkt/run\.zarr/c/0: the server "
                           r"did not answer a write within 0\.5 s"):
            puts.put("bkt/run.zarr/c/0", b"x" * 1000)
        assert time.monotonic() - t0 < 5
        assert not puts.refused  # (a timeout is no refusal: it is raised, not left to s3fs)
    finally:
        srv.close()


def test_a_put_with_nothing_to_sign_is_left_to_s3fs_for_a_while(monkeypatch):
    """A bucket where a presigned PUT failed has its writes left to s3fs, without
    trying again, for REFUSED_FOR_S seconds; then a PUT is tried presigned again."""
    from siff_xarray.store import s3_puts

    tried = []

    def cannot_sign(path: str, **kwargs) -> str:
        tried.append(path)
        raise PermissionError("no credentials")

    from siff_xarray.reader.http_ranges import s3_settings

    puts = DirectPuts(_s3("http://127.0.0.1:19"), s3_settings("s3://nosign/x", {}),
                      cannot_sign, "nosign")
    assert puts.put("nosign/x/c/0", b"abc") is False
    assert puts.refused
    assert puts.put_many({"nosign/x/c/1": b"d", "nosign/x/c/2": b"e"}) == {
        "nosign/x/c/1": b"d", "nosign/x/c/2": b"e"}
    assert tried == ["nosign/x/c/0"]  # (the others went to s3fs without trying)
    now = time.monotonic()
    monkeypatch.setattr(s3_puts.time, "monotonic", lambda: now + s3_puts.REFUSED_FOR_S + 1)
    assert not puts.refused
    assert puts.put("nosign/x/c/3", b"f") is False  # (tried, refused again)
    assert tried == ["nosign/x/c/0", "nosign/x/c/3"] and puts.refused


def test_writes_behind_hold_at_most_their_limit_and_store_each_key_in_order():
    behind = WritesBehind(ByteRoom(100))
    release, stored = threading.Event(), []

    def slow(tag):
        def write():
            release.wait(10)
            stored.append(tag)
        return write

    first = behind.submit("k", 60, slow("k1"))
    second = behind.submit("k", 30, lambda: stored.append("k2"))  # (90 bytes: room)
    assert behind.of_key("k") is second and not first.done()
    # 60 more bytes would hold 150: the writer waits until the first ones are stored
    waiting = threading.Thread(target=lambda: behind.submit("j", 60, lambda: None))
    waiting.start()
    waiting.join(0.3)
    assert waiting.is_alive()
    release.set()
    waiting.join(10)
    assert not waiting.is_alive()
    behind.settle()
    assert stored == ["k1", "k2"]  # (the later write of a key after the earlier one)
    assert behind.pending() == [] and behind.of_key("k") is None
    # one write larger than the limit goes alone; an error stays in its future
    def refused():
        raise PermissionError("refused")

    failed = behind.submit("big", 500, refused)
    behind.settle()
    assert isinstance(failed.exception(), PermissionError)
    # a failed write stays reported: a batch that asks after it failed still sees it
    assert behind.pending() == [failed] and behind.of_key("big") is None
    ok = behind.submit("big", 10, lambda: None)
    behind.settle()
    assert ok.result() is None and behind.pending() == [failed]
    # a write that could not start holds no room (the next one does not wait for it)
    import siff_xarray.store.s3_puts as s3_puts

    class Closed:
        def submit(self, *a):
            raise RuntimeError("cannot schedule new futures after shutdown")

    real_pool = s3_puts.thread_pool
    s3_puts.thread_pool = lambda *a: Closed()
    try:
        with pytest.raises(RuntimeError, match="shutdown"):
            behind.submit("late", 90, lambda: None)
    finally:
        s3_puts.thread_pool = real_pool
    got = []
    after = threading.Thread(target=lambda: got.append(behind.submit("after", 90, lambda: None)),
                             daemon=True)
    after.start()
    after.join(10)
    assert not after.is_alive() and got[0].result(10) is None


def test_the_writes_behind_of_all_stores_of_a_process_share_one_byte_limit():
    # a worker converting several runs at once holds no more than one run would
    assert WritesBehind().room is WritesBehind().room
    room = ByteRoom(100)
    one, other = WritesBehind(room), WritesBehind(room)
    release, stored = threading.Event(), []
    first = one.submit("k", 60, lambda: (release.wait(10), stored.append("one")))
    waiting = threading.Thread(target=lambda: other.submit("k", 60, lambda: stored.append("other")))
    waiting.start()
    waiting.join(0.3)
    assert waiting.is_alive() and room.held == 60  # (the other store waits for room)
    assert other.pending() == [] and one.of_key("k") is first
    release.set()
    waiting.join(10)
    assert not waiting.is_alive()
    one.settle()
    other.settle()
    assert stored == ["one", "other"] and room.held == 0
