"""Remote files: HTTP (local range server) and S3 (moto server) on 127.0.0.1 only."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import pickle
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st

from siff_xarray import SiffFile
from siff_xarray import store as zs
from siff_xarray.backend import open_acquisition
from siff_xarray.errors import ConversionError, SiffFormatError
from siff_xarray.reader.index_cache import forget
from siff_xarray.synthetic import write_siff

#: where each cell's photons are (the URL, not the local path): compared on their own
SOURCES = ["source_file", "source_frame"]


def _bare(ds: xr.Dataset) -> xr.Dataset:
    """The loaded Dataset without attributes and without where its photons are."""
    return ds.load().drop_attrs().drop_vars(SOURCES)


@pytest.fixture
def big_frames(tmp_path):
    """A file whose frames (~100 kB of photons each) dwarf its IFDs."""
    return write_siff(tmp_path / "big.siff", shape=(64, 64), channels=(1, 2), n_slices=2,
                      n_flyback=1, n_timepoints=5, photons_per_frame=12000, encoding="raw",
                      channel_brightness=(1.0, 0.8),
                      events={4: ("go", 0.2)}, seed=3)


def test_http_open_streams_the_chain_in_few_requests(http_server, big_frames):
    url = f"{http_server.url}/big.siff"
    size = os.path.getsize(big_frames.path)
    with xr.open_dataset(url, engine="siff") as ds:
        opened = http_server.bytes_sent
        # header, then the chain streamed in a few large windows that hold the IFDs and
        # the frame descriptions (timestamps): about one download, a handful of requests
        assert http_server.requests + http_server.heads <= 8, http_server.requests
        assert opened <= 1.05 * size + 65536, (opened, size)
        with xr.open_dataset(big_frames.path, engine="siff") as local:
            xr.testing.assert_identical(ds.drop_attrs().drop_vars(SOURCES),
                                        local.drop_attrs().drop_vars(SOURCES))
            xr.testing.assert_identical(ds.source_frame, local.source_frame)
            ok = ds.source_frame.values >= 0
            assert (ds.source_file.values[ok] == url).all()
            before = http_server.bytes_sent
            one = ds.intensity.isel(time=2, z=1, channel=0).values
            np.testing.assert_array_equal(one, local.intensity.isel(time=2, z=1,
                                                                    channel=0).values)
            # one frame of photons, not the file
            assert http_server.bytes_sent - before < 0.1 * size
            xr.testing.assert_identical(_bare(ds), _bare(local))
        assert ds.attrs["source_file"] == url


def test_cold_open_of_1400_frames_at_latency_costs_a_few_requests(http_server, tmp_path):
    # the issue's layout (2 channels, 6 planes + flyback, 100 volumes: 1400 frames);
    # fewer photons keep the test quick. Before: two dependent requests per frame (2,804).
    t = write_siff(tmp_path / "session.siff", shape=(64, 32), channels=(1, 2), n_slices=6,
                   n_flyback=1, n_timepoints=100, photons_per_frame=600, seed=2)
    http_server.latency = 0.005  # every request waits, as on an object store
    url = f"{http_server.url}/session.siff"
    size = os.path.getsize(t.path)
    with xr.open_dataset(t.path, engine="siff") as local:
        want = _bare(local)
    for cache in (False, tmp_path / "empty-cache"):  # no cache, and a cold one (written)
        req, heads, sent = http_server.requests, http_server.heads, http_server.bytes_sent
        with xr.open_dataset(url, engine="siff", index_cache=cache) as ds:
            n = http_server.requests - req + http_server.heads - heads
            assert n <= 100, n
            assert http_server.bytes_sent - sent <= 1.1 * size
            assert ds.sizes["time"] == 100
            xr.testing.assert_identical(_bare(ds), want)


def test_a_cold_walk_keeps_three_batches_of_windows_on_their_way(http_server, big_frames,
                                                                monkeypatch):
    """A cold open streams the chain with batches of up to eight windows, three of
    them on their way while one is walked (before: two), each received into one
    buffer."""
    from siff_xarray.reader import source as so

    # 16 KiB windows: the 2.2 MB file walks through about 140 of them
    monkeypatch.setattr(so.FsspecSource, "walk_window", 16 * 2**10)
    url = f"{http_server.url}/big.siff"
    size = os.path.getsize(big_frames.path)
    with SiffFile(big_frames.path) as local:
        want = local.timestamps().experiment_s
    http_server.latency = 0.02
    sent = http_server.bytes_sent
    with SiffFile(url, index_cache=False) as f:
        np.testing.assert_array_equal(f.timestamps().experiment_s, want)
    assert http_server.bytes_sent - sent <= 1.05 * size + 65536
    assert 2 * 8 < http_server.most_waiting <= 3 * 8 + 1, http_server.most_waiting


def test_a_walks_batch_is_read_where_it_was_received(http_server, big_frames, monkeypatch):
    from siff_xarray.reader import source as so

    made = []
    fresh = so._fresh
    monkeypatch.setattr(so, "_fresh", lambda n: made.append(fresh(n)) or made[-1])
    with so.open_source(f"{http_server.url}/big.siff") as src:
        got = src.fetch_consecutive(1000, 1000 + 3 * src.walk_window // 2)
        assert np.shares_memory(got, made[-1])  # not joined into a copy
        assert got.tobytes() == Path(big_frames.path).read_bytes()[1000:1000 + got.size]
        short = src.fetch_consecutive(src.size - 10, src.size + 100)
        assert short.size == 10  # the end of the file: fewer bytes, no error


def test_huge_frames_are_walked_ifd_by_ifd_not_downloaded(http_server, tmp_path):
    # 2 MiB TIFF pages: streaming them would move the whole file to read a few IFDs
    t = write_siff(tmp_path / "pages.tif", shape=(1024, 1040), n_slices=1, n_flyback=0,
                   n_timepoints=12, format="tiff", photons_per_frame=50, seed=1)
    url = f"{http_server.url}/pages.tif"
    size = os.path.getsize(t.path)
    with xr.open_dataset(url, engine="siff", index_cache=False) as ds:
        assert http_server.bytes_sent < 0.5 * size, (http_server.bytes_sent, size)
        with xr.open_dataset(t.path, engine="siff") as local:
            np.testing.assert_array_equal(ds.intensity.isel(time=7).values,
                                          local.intensity.isel(time=7).values)
            np.testing.assert_array_equal(ds.frame_time.values, local.frame_time.values)


def test_https_with_verified_certificate(https_server, big_frames):
    url = f"{https_server.url}/big.siff"
    assert url.startswith("https://")
    opts = {"ssl": https_server.client_ssl}
    with xr.open_dataset(url, engine="siff", storage_options=opts, index_cache=False) as ds, \
            xr.open_dataset(big_frames.path, engine="siff") as local:
        xr.testing.assert_identical(_bare(ds), _bare(local))


def test_http_cache_serves_repeated_reads(http_server, big_frames):
    url = f"{http_server.url}/big.siff"
    with SiffFile(url) as f:
        f.read_frames([3, 4])
        after_first = http_server.bytes_sent
        f.histograms([3, 4])
        assert http_server.bytes_sent == after_first  # from the range cache


def _put_on_s3(s3_server, path, key: str):
    """Upload ``path`` to ``bucket/name`` (``key``) on the moto server; return (fs, url)."""
    import fsspec

    fs = fsspec.filesystem("s3", **s3_server)
    bucket = key.split("/")[0]
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    fs.put_file(path, key)
    return fs, f"s3://{key}"


def test_s3_round_trip(s3_server, big_frames, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem(**s3_server)
    fs.mkdir("siff-bucket")
    fs.put(big_frames.path, "siff-bucket/runs/big.siff")
    url = "s3://siff-bucket/runs/big.siff"
    assert xr.backends.plugins.guess_engine(url) == "siff"
    with xr.open_dataset(url, engine="siff", storage_options=s3_server, flim=True) as ds, \
            xr.open_dataset(big_frames.path, engine="siff", flim=True) as local:
        xr.testing.assert_identical(_bare(ds), _bare(local))
        back = pickle.loads(pickle.dumps(ds))  # reopens from S3 with the same options
        np.testing.assert_array_equal(back.histogram.sum("tau").values,
                                      local.histogram.sum("tau").values)
    with xr.open_dataset(url, engine="siff", storage_options=s3_server, chunks={}) as ds, \
            xr.open_dataset(big_frames.path, engine="siff") as local:
        np.testing.assert_array_equal(ds.intensity.sum(("y", "x")).compute().values,
                                      local.intensity.values.sum(axis=(-2, -1)))
    # a store converted to S3 opens with the same engine, as a Dataset and as a tree
    zs.convert(url, "s3://siff-bucket/zarr/big.zarr", storage_options=s3_server,
               target_options=s3_server)
    store = "s3://siff-bucket/zarr/big.zarr"
    with xr.open_dataset(store, engine="siff", storage_options=s3_server, chunks={}) as ds, \
            xr.open_dataset(big_frames.path, engine="siff") as local:
        np.testing.assert_array_equal(ds.intensity.values, local.intensity.values)
    tree = xr.open_datatree(store, engine="siff", storage_options=s3_server)
    assert int(tree["/photons"].photon_count.sum()) == len(big_frames.arrival)
    tree.close()


def test_s3_open_acquisition_glob(s3_server, tmp_path):
    import s3fs

    kw = dict(shape=(8, 6), channels=(1, 2), n_slices=2, n_flyback=1, n_timepoints=4, seed=9)
    split = write_siff(tmp_path / "acq.siff", frames_per_file=5, **kw)
    whole = write_siff(tmp_path / "whole.siff", **kw)
    fs = s3fs.S3FileSystem(**s3_server)
    fs.mkdir("acq-bucket")
    for p in split.paths:
        fs.put(p, "acq-bucket/day1/" + p.rsplit("/", 1)[1])
    with open_acquisition("s3://acq-bucket/day1/acq_*.siff", storage_options=s3_server) as a, \
            xr.open_dataset(whole.path, engine="siff") as one:
        assert len(a.attrs["source_file"]) == len(split.paths)
        xr.testing.assert_equal(_bare(a), _bare(one))


def test_missing_remote_files_are_clear_errors(http_server):
    with pytest.raises(FileNotFoundError):
        xr.open_dataset(f"{http_server.url}/absent.siff", engine="siff")
    with pytest.raises(FileNotFoundError):
        xr.open_dataset("memory://nowhere/absent.siff", engine="siff")


# ------------------------------------------------------------------ frame-index cache


def test_index_cache_makes_the_second_remote_open_cheap(http_server, big_frames, tmp_path):
    url = f"{http_server.url}/big.siff"
    cache = tmp_path / "cache"
    with xr.open_dataset(url, engine="siff", index_cache=cache) as ds:
        first_open = http_server.bytes_sent
        want = ds.load()
    assert len(list(cache.glob("*.npz"))) == 1
    before, req = http_server.bytes_sent, http_server.requests
    with xr.open_dataset(url, engine="siff", index_cache=cache) as ds:
        # header + file tail (the key) + three spot-checked IFDs
        assert http_server.requests - req <= 8
        assert http_server.bytes_sent - before < first_open / 2
        xr.testing.assert_identical(ds.load(), want)


def _open_costs(server, url: str, cache, want: xr.Dataset) -> tuple[int, int, int]:
    """Open ``url`` as a fresh process would: (round trips, requests, bytes) it took.

    The Dataset it opened must equal ``want``.
    """
    forget()
    at, sent = len(server.arrivals), server.bytes_sent
    with xr.open_dataset(url, engine="siff", index_cache=cache) as ds:
        costs = (server.round_trips(at), len(server.arrivals) - at, server.bytes_sent - sent)
        xr.testing.assert_identical(ds.load(), want)
    return costs


def test_an_open_waits_for_few_round_trips(http_server, big_frames, tmp_path, monkeypatch):
    """At object-store latency an open costs its round trips, not its bytes."""
    from siff_xarray.reader.source import FsspecSource

    url = f"{http_server.url}/big.siff"
    cache = tmp_path / "cache"
    with xr.open_dataset(url, engine="siff", index_cache=cache) as ds:
        want = ds.load()
    http_server.latency = 0.1
    # the header, the file's tail (the key; its Content-Range gives the size, no HEAD),
    # and the IFDs the check of the cached index reads (the cache recorded which they
    # were), all at once
    assert _open_costs(http_server, url, cache, want)[:2] == (1, 4)
    with monkeypatch.context() as m:  # through fsspec: its info (HEAD) first
        m.setattr(FsspecSource, "direct_http", False)
        assert _open_costs(http_server, url, cache, want)[:2] == (2, 5)
    hints = list(cache.glob("*.ifds"))
    assert len(hints) == 1
    size = os.path.getsize(big_frames.path)
    for text in ("", "not json", "[[1, 2]]", '[["a", 3]]', "[[-5, 10], [10, 5]]",
                 f"[[70000, {size - 5000}]]"):
        hints[0].write_text(text)  # gone, unreadable or wrong: the check reads its own
        if not text:
            hints[0].unlink()
        trips, _, sent = _open_costs(http_server, url, cache, want)
        assert trips == 2, text  # header with tail; the spot-checked IFDs
        assert sent < 100_000  # a hint is no download (head, tail, IFDs: ~70 kB; file 2.2 MB)
    with SiffFile(big_frames.path) as f:
        f.write_sidecar()
    # header with tail; sidecar; the spot-checked middle IFD
    assert _open_costs(http_server, url, tmp_path / "empty", want)[0] == 3


def test_a_small_files_open_takes_one_round_trip_too(http_server, tmp_path):
    """In a small file the IFDs that check a cached index lie closer together than
    reads are coalesced: they come with the first request all the same, and the check
    reads them from there instead of fetching the stretch between them."""
    t = write_siff(tmp_path / "small.siff", shape=(32, 32), channels=(1, 2), n_slices=2,
                   n_timepoints=30, photons_per_frame=300, seed=4)
    url, cache = f"{http_server.url}/small.siff", tmp_path / "cache"
    with xr.open_dataset(url, engine="siff", index_cache=cache) as ds:
        want = ds.load()
    http_server.latency = 0.1
    trips, requests, sent = _open_costs(http_server, url, cache, want)
    assert (trips, requests) == (1, 4)
    assert sent < 80_000  # head, tail and three IFDs; the file is 247 kB
    assert os.path.getsize(t.path) > 200_000


def test_one_channel_of_a_remote_file_reads_in_few_requests(http_server, big_frames,
                                                            tmp_path):
    """Frames of the other channel between the ones read are fetched, not skipped:
    a request costs more than a frame's bytes."""
    url = f"{http_server.url}/big.siff"
    with xr.open_dataset(big_frames.path, engine="siff") as ds:
        want = ds.intensity.isel(channel=0).load()
    with xr.open_dataset(url, engine="siff", chunks={}, index_cache=tmp_path / "c") as ds:
        one = ds.intensity.isel(channel=0)
        tasks = one.data.npartitions
        req = http_server.requests
        got = one.load()
        # one request per Dask task, not one per frame (10 frames of channel 0)
        assert http_server.requests - req <= tasks < 10
    xr.testing.assert_identical(got.drop_attrs(), want.drop_attrs())


def _open_file(url: str) -> SiffFile:
    """The SiffFile xarray keeps open for ``url`` (its file manager's cache)."""
    from xarray.backends.file_manager import FILE_CACHE

    found = [f for f in list(FILE_CACHE.values())
             if isinstance(f, SiffFile) and f.name == url]
    assert len(found) == 1
    return found[0]


@pytest.fixture
def many_chunks(tmp_path):
    """A file of 24 Dask chunks of 2 volumes (3 planes, 2 channels, a flyback frame)."""
    return write_siff(tmp_path / "chunks.siff", shape=(32, 24), channels=(1, 2), n_slices=3,
                      n_flyback=1, n_timepoints=48, photons_per_frame=2000, seed=8)


def test_dask_chunks_of_a_remote_file_are_fetched_before_their_tasks_ask(
        http_server, many_chunks, tmp_path):
    """Each Dask task waited a round trip for its chunk; most now find it fetched.

    Chunks are read in Dask's order (runs, often backwards, with jumps between
    them); within a run, once three reads a constant stride apart confirm the
    stride, each read predicts the chunks that follow it.
    """
    url = f"{http_server.url}/chunks.siff"
    size = os.path.getsize(many_chunks.path)
    per_volume = 3 * 2 * 32 * 24 * 2  # bytes of one volume's intensity
    opts = dict(engine="siff", index_cache=tmp_path / "c", chunk_bytes=2 * per_volume)
    with xr.open_dataset(many_chunks.path, **{**opts, "index_cache": None}) as ds:
        want = ds.intensity.mean(("y", "x")).load()
    with xr.open_dataset(url, chunks={}, **opts) as ds:
        assert ds.intensity.data.npartitions == 24
        sent, req = http_server.bytes_sent, http_server.requests
        got = ds.intensity.mean(("y", "x")).compute(scheduler="threads", num_workers=2)
        src = _open_file(url)._source
        # the first reads of each run of Dask's order wait; most were predicted
        # (18 of 24 when written; none before)
        assert src.expected_read >= 24 // 2
        assert src.expected_fetched - src.expected_read <= SiffFile.predicted_reads
        # every byte once: a prediction is never fetched again by the read
        assert http_server.bytes_sent - sent <= 1.1 * size
        assert http_server.requests - req <= 24 + 2
    xr.testing.assert_identical(got.drop_attrs(), want.drop_attrs())


def test_reads_in_no_order_fetch_little_they_did_not_ask_for(http_server, many_chunks):
    from siff_xarray.reader.source import _PREDICTED

    url = f"{http_server.url}/chunks.siff"
    rng = np.random.default_rng(1)
    with SiffFile(many_chunks.path) as local, SiffFile(url) as remote:
        per_chunk = 2 * 7  # two volumes of 3 planes x 2 channels + a flyback frame
        frames = np.array([v * 7 + p for v in range(2) for p in range(6)])
        for k in rng.permutation(24)[:12]:
            f = frames + k * per_chunk
            np.testing.assert_array_equal(remote.read_frames(f), local.read_frames(f))
        # now and then three of them are a constant stride apart: a few predictions
        src = remote._source
        assert src.expected_fetched - src.expected_read <= 2 * SiffFile.predicted_reads
        # then in order: predicted, read from the predictions, and nothing held after
        for k in range(24):
            f = frames + k * per_chunk
            np.testing.assert_array_equal(remote.read_frames(f), local.read_frames(f))
        assert src.expected_read >= 12
    assert not any(s is src for s, *_ in _PREDICTED.spans)  # closing dropped them


@pytest.mark.parametrize("on_workers", [False, True])
def test_reads_on_a_distributed_worker_predict_nothing_unless_asked(
        http_server, many_chunks, monkeypatch, on_workers):
    """A worker's runs of chunks break where the scheduler gives the next to another."""
    from siff_xarray.reader import siff_file

    monkeypatch.setattr(siff_file, "_on_distributed_worker", lambda: True)
    monkeypatch.setattr(SiffFile, "predict_on_workers", on_workers)
    frames = np.array([v * 7 + p for v in range(2) for p in range(6)])
    with SiffFile(f"{http_server.url}/chunks.siff") as f:
        for k in range(6):
            f.read_frames(frames + k * 14)
        assert (f._source.expected_fetched > 0) == on_workers


def test_two_remote_files_combined_read_each_its_own_predicted_chunks(http_server, tmp_path):
    """Predicted spans belong to their file: a combined Dataset never gets another's photons.

    Both files have the same byte layout (same shape and photons per frame, other
    photons), so a span of one would fit the other's reads.
    """
    paths = [write_siff(tmp_path / f"m{i}.siff", shape=(32, 24), channels=(1, 2), n_slices=3,
                        n_flyback=1, n_timepoints=24, photons_per_frame=2000,
                        seed=20 + i).path for i in range(2)]
    per_volume = 3 * 2 * 32 * 24 * 2
    opts = dict(engine="siff", chunk_bytes=2 * per_volume, index_cache=tmp_path / "c")
    urls = [f"{http_server.url}/m{i}.siff" for i in range(2)]
    with xr.open_mfdataset(paths, combine="nested", concat_dim="time", **opts) as ds:
        want = ds.intensity.mean(("y", "x")).compute(scheduler="threads", num_workers=2)
    with xr.open_mfdataset(urls, combine="nested", concat_dim="time", **opts) as ds:
        got = ds.intensity.mean(("y", "x")).compute(scheduler="threads", num_workers=2)
        assert all(_open_file(u)._source.expected_read > 0 for u in urls)
    assert not np.array_equal(want.values[:24], want.values[24:])  # different photons
    np.testing.assert_array_equal(got.values, want.values)


def test_predicted_spans_of_every_file_share_one_budget(http_server, tmp_path, monkeypatch):
    """A Dataset of many remote files holds no more predicted bytes than one of one."""
    from siff_xarray.reader.source import _PREDICTED, FsspecSource

    files = [write_siff(tmp_path / f"f{i}.siff", shape=(32, 24), channels=(1, 2),
                        n_slices=3, n_flyback=1, n_timepoints=24, photons_per_frame=2000,
                        seed=i) for i in range(3)]
    chunk = os.path.getsize(files[0].path) // 12  # about one 2-volume chunk
    monkeypatch.setattr(FsspecSource, "expected_bytes", 5 * chunk)
    frames = np.array([v * 7 + p for v in range(2) for p in range(6)])
    opened = [SiffFile(f"{http_server.url}/f{i}.siff") for i in range(3)]
    try:
        for f in opened:
            for k in range(5):  # three reads confirm the stride; predicted ones widen it
                f.read_frames(frames + k * 14)
        assert all(f._source.expected_fetched >= 3 for f in opened)
        assert sum(e[2] - e[1] for e in _PREDICTED.spans) <= 5 * chunk
    finally:
        for f in opened:
            f.close()
    assert _PREDICTED.spans == []


def test_predicted_spans_nobody_reads_are_dropped_after_a_while(http_server, tmp_path,
                                                                 monkeypatch):
    """A Dataset left open after its computation does not keep chunks it never read."""
    from siff_xarray.reader import source

    _PREDICTED = source._Predicted()  # its own: no other test's spans or timer
    monkeypatch.setattr(source, "_PREDICTED", _PREDICTED)
    monkeypatch.setattr(_PREDICTED, "unread_s", 2.0)  # well past the reads, on a busy CI
    t = write_siff(tmp_path / "p.siff", shape=(32, 24), channels=(1, 2), n_slices=3,
                   n_flyback=1, n_timepoints=24, photons_per_frame=2000, seed=4)
    frames = np.array([v * 7 + p for v in range(2) for p in range(6)])
    with SiffFile(t.path) as local, SiffFile(f"{http_server.url}/p.siff") as remote:
        src = remote._source
        for k in range(4):  # three reads confirm the stride: the next chunks are fetched
            remote.read_frames(frames + k * 14)
        held = [e for e in _PREDICTED.spans if e[0] is src]
        assert held and src.expected_fetched >= 2
        for e in held:
            e[3].result()  # fetched, and not read
        assert [e for e in _PREDICTED.spans if e[0] is src]  # not yet
        deadline = time.monotonic() + 10
        while any(e[0] is src for e in _PREDICTED.spans) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(e[0] is src for e in _PREDICTED.spans)
        assert _PREDICTED._timer is None  # nothing held: no timer left running
        # a read of a chunk whose prediction was dropped fetches it itself
        f = frames + 4 * 14
        np.testing.assert_array_equal(remote.read_frames(f), local.read_frames(f))


def test_index_cache_local_and_invalidation(tmp_path):
    from siff_xarray.reader.index_cache import content_key

    cache = tmp_path / "cache"
    t = write_siff(tmp_path / "a.siff", shape=(8, 8), channels=(1, 2), n_timepoints=4,
                   events={1: ("x", 0.5), 3: ("y", None)})
    with SiffFile(t.path, index_cache=False) as f:
        want_ts = f.timestamps()
        want_idx = f.index
    assert not cache.exists()
    default_dir = Path(os.environ["SIFF_XARRAY_CACHE_DIR"])
    n_default = len(list(default_dir.glob("*.npz")))
    with SiffFile(t.path) as f:  # paths use the default cache directory
        pass
    assert len(list(default_dir.glob("*.npz"))) == n_default + 1
    with SiffFile(io.BytesIO(Path(t.path).read_bytes())) as f:  # file objects do not
        pass
    assert len(list(default_dir.glob("*.npz"))) == n_default + 1
    with SiffFile(t.path, index_cache=cache) as f:  # builds and stores
        key = content_key(f._source, f.header)
    entry = cache / f"{key}.npz"
    assert entry.is_file()
    with SiffFile(t.path, index_cache=cache) as f:  # loads
        assert f._all_timestamps is not None
        for name in ("ifd_offset", "strip_offset", "strip_bytes", "encoding", "n_photons"):
            np.testing.assert_array_equal(getattr(f.index, name), getattr(want_idx, name))
        ts = f.timestamps()
        np.testing.assert_array_equal(ts.epoch_laser_ns, want_ts.epoch_laser_ns)
        np.testing.assert_array_equal(ts.experiment_s, want_ts.experiment_s)
        assert [(e.frame, e.text) for e in ts.events] == [(e.frame, e.text)
                                                          for e in want_ts.events]
        assert np.isnan(ts.events[1].time_s)
        sub = f.timestamps([3, 0])
        assert [e.frame for e in sub.events] == [3]
        np.testing.assert_array_equal(sub.frames, [3, 0])
    # a corrupt entry is ignored and replaced
    entry.write_bytes(b"not an npz")
    with SiffFile(t.path, index_cache=cache) as f:
        np.testing.assert_array_equal(f.read_frames(), t.intensity())
    with np.load(entry) as z:
        assert "index_ifd_offset" in z
    # an entry that does not match the file (spot check fails) is ignored
    other = write_siff(tmp_path / "b.siff", shape=(8, 8), channels=(1, 2), n_timepoints=4,
                       seed=99)
    with SiffFile(other.path, index_cache=False) as f:
        other_key = content_key(f._source, f.header)
    bad = dict(np.load(entry))
    bad["index_strip_offset"] = bad["index_strip_offset"] + 8
    np.savez(cache / f"{other_key}.npz", **bad)
    with SiffFile(other.path, index_cache=cache) as f:
        np.testing.assert_array_equal(f.read_frames(), other.intensity())
    # rewriting the file in place (same size, same tail) changes the key
    data = bytearray(Path(t.path).read_bytes())
    with SiffFile(t.path, index_cache=False) as f:
        k = int(f.index.strip_offset[2])
    data[k : k + 2] = data[k + 2 : k + 4]
    time.sleep(0.01)
    Path(t.path).write_bytes(bytes(data))
    with SiffFile(t.path, index_cache=cache) as f:
        assert content_key(f._source, f.header) != key
    # an unwritable cache directory only means no cache
    ro = tmp_path / "file-not-dir"
    ro.write_text("x")
    with SiffFile(t.path, index_cache=ro / "sub") as f:
        np.testing.assert_array_equal(f.read_frames(), t.intensity())


def test_in_place_edits_with_the_mtime_restored_never_read_stale_cache(tmp_path):
    # same size, modification time put back: the cache must not serve the old values
    cache = tmp_path / "cache"
    # frames 2 and 4 lie far from the file's tail and are not among the spot-checked IFDs
    t = write_siff(tmp_path / "e.siff", shape=(8, 8), channels=(1,), n_timepoints=60,
                   photons_per_frame=400, encoding="raw", seed=3)
    with SiffFile(t.path, index_cache=cache) as f:
        ts0 = f.timestamps().experiment_s.copy()
        off, ln = int(f.index.desc_offset[2]), int(f.index.desc_length[2])
        n0 = f.index.n_photons.copy()
        ifd = int(f.index.ifd_offset[4])
    st = os.stat(t.path)
    data = bytearray(Path(t.path).read_bytes())
    desc = bytes(data[off:off + ln])
    key = b"frameTimestamps_sec = "
    at = desc.index(key) + len(key)
    assert desc[at:at + 1] != b"9"
    data[off + at] = ord("9")  # one digit of frame 2's timestamp
    Path(t.path).write_bytes(bytes(data))
    os.utime(t.path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with SiffFile(t.path, index_cache=cache) as f, \
            SiffFile(t.path, index_cache=False) as fresh:
        np.testing.assert_array_equal(f.timestamps().experiment_s,
                                      fresh.timestamps().experiment_s)
        assert f.timestamps().experiment_s[2] != ts0[2]
    # a StripByteCounts made 8 bytes (one raw photon) shorter in frame 4's IFD
    with SiffFile(t.path, index_cache=False) as f:
        row = f._source.read(ifd, 2048)
    n_tags = int.from_bytes(row[:8], "little")  # BigTIFF IFD
    for e in range(n_tags):
        p = 8 + 20 * e
        if int.from_bytes(row[p:p + 2], "little") == 279:
            val = int.from_bytes(row[p + 12:p + 20], "little")
            data[ifd + p + 12:ifd + p + 20] = (val - 8).to_bytes(8, "little")
    Path(t.path).write_bytes(bytes(data))
    os.utime(t.path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with SiffFile(t.path, index_cache=cache) as f:
        assert f.index.n_photons[4] == n0[4] - 1


@pytest.fixture
def silent_server():
    """A loopback server that accepts connections and never answers (bounded: 60 s)."""
    import socket
    import threading

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    srv.settimeout(0.2)
    held, stop = [], threading.Event()

    def accept():
        deadline = time.monotonic() + 60
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                held.append(srv.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.getsockname()[1]}"
    stop.set()
    thread.join(5)
    for c in held:
        c.close()
    srv.close()


def test_a_server_that_never_answers_is_a_clear_error_not_a_hang(silent_server,
                                                                   monkeypatch):
    from siff_xarray import _remote
    from siff_xarray.errors import RemoteAccessError

    monkeypatch.setattr(_remote, "READ_TIMEOUT_S", 1.0)  # the default is 60 s
    url = f"{silent_server}/run.siff"
    t0 = time.monotonic()
    with pytest.raises(RemoteAccessError, match=rf"{url}: the server did not answer in time"):
        xr.open_dataset(url, engine="siff", index_cache=False)
    assert time.monotonic() - t0 < 20


def test_a_refused_port_is_a_clear_error():
    import socket

    from siff_xarray.errors import RemoteAccessError

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    url = f"http://127.0.0.1:{port}/run.siff"
    with pytest.raises(RemoteAccessError, match=rf"{url}: the server cannot be reached"):
        SiffFile(url, index_cache=False)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 60), st.booleans(), st.booleans(),
                          st.integers(0, 40)), max_size=20))
def test_ranges_are_copied_as_each_alone_would_be(steps):
    """_copy_ranges merges ranges that follow each other in both buffers into one
    slice: the result must be that of one copy per range, contiguous or not."""
    from siff_xarray.reader.source import _copy_ranges

    src = np.random.default_rng(1).integers(0, 256, 4000, dtype=np.uint8)
    src_at, dst_at, lengths = [], [], []
    s_pos = d_pos = 0
    for n, next_in_src, next_in_dst, gap in steps:
        s_pos += 0 if next_in_src else gap  # right after the range before, or apart
        d_pos += 0 if next_in_dst else gap
        src_at.append(s_pos)
        dst_at.append(d_pos)
        lengths.append(n)
        s_pos, d_pos = s_pos + n, d_pos + n
    want = np.zeros(4000, dtype=np.uint8)
    for a, d, n in zip(src_at, dst_at, lengths, strict=True):
        want[d:d + n] = src[a:a + n]
    got = np.zeros(4000, dtype=np.uint8)
    _copy_ranges(src, np.array(src_at, dtype=np.int64), got, np.array(dst_at, dtype=np.int64),
                 np.array(lengths, dtype=np.int64))
    np.testing.assert_array_equal(got, want)


def test_descriptions_kept_by_a_walk_read_back_in_one_pass():
    """The walk keeps many ranges per window; reading them all back (timestamps)
    gives the file's bytes, whatever the windows' cuts."""
    from siff_xarray.reader.source import FileObjectSource

    rng = np.random.default_rng(3)
    data = rng.integers(0, 256, 50_000, dtype=np.uint8)
    src = FileObjectSource(io.BytesIO(data.tobytes()))
    starts = np.sort(rng.choice(np.arange(0, 49_000, 100), 300, replace=False))
    stops = starts + rng.integers(0, 100, starts.size)  # some empty, some back to back
    for w0 in range(0, 50_000, 7_000):  # windows of the walk: the ranges starting in each
        inside = (starts >= w0) & (starts < w0 + 7_000)
        src.keep(starts[inside], stops[inside], data[w0:], w0)
    src.read = lambda off, n: pytest.fail("kept bytes were read again")
    buf, base = src.read_ranges(starts, stops)
    for a, b, at in zip(starts, stops, base, strict=True):
        np.testing.assert_array_equal(buf[at:at + b - a], data[a:b])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3000), st.integers(0, 400)), min_size=1,
                max_size=12),
       st.lists(st.tuples(st.integers(0, 3000), st.integers(0, 400)), max_size=6))
def test_bytes_kept_from_the_walk_read_back_exactly(ranges, kept):
    from siff_xarray.reader.source import FileObjectSource

    data = np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8)
    src = FileObjectSource(io.BytesIO(data.tobytes()))
    reads = []
    src.read = lambda off, n: (reads.append(n), data[off:off + n].tobytes())[1]
    cuts = sorted({min(a + n, 4000) for a, n in kept} | {a for a, _ in kept})
    kept = [(a, b - a) for a, b in itertools.pairwise(cuts)][::2]  # disjoint, as walked
    for a, n in kept:  # ranges the walk kept, from a window that held them
        src.keep(np.array([a]), np.array([a + n]), data[a:], a)
    starts = np.array([a for a, _ in ranges])
    stops = np.minimum(starts + np.array([n for _, n in ranges]), 4000)
    buf, base = src.read_ranges(starts, stops)
    for a, b, at in zip(starts, stops, base, strict=True):
        np.testing.assert_array_equal(buf[at:at + b - a], data[a:b])
    inside = [any(ka <= a and b <= ka + kn for ka, kn in kept)
              for a, b in zip(starts, stops, strict=True)]
    if all(inside):
        assert reads == []  # served from memory
    src.forget_kept()
    reads.clear()
    src.read_ranges(starts, stops)
    assert (stops > starts).any() == (sum(reads) > 0)


def test_spans_fetched_ahead_serve_reads_inside_them_and_fail_when_read(http_server,
                                                                        tmp_path):
    from siff_xarray.errors import RemoteAccessError
    from siff_xarray.reader.source import FsspecSource

    data = np.random.default_rng(1).integers(0, 256, 3 * 2**20, dtype=np.uint8)
    (tmp_path / "blob.bin").write_bytes(data.tobytes())
    src = FsspecSource(f"{http_server.url}/blob.bin")
    src.span_window = 2**19  # the span comes in 512 KiB parts, concurrently
    src.ahead_spans = 3
    req = http_server.requests
    src.will_need(100_000, 2_100_000)
    src.will_need(200_000, 300_000)  # inside the held span: nothing more is fetched
    starts = np.array([150_000, 100_000, 1_999_000])
    stops = np.array([151_000, 100_010, 2_100_000])
    buf, base = src.read_ranges(starts, stops)
    for a, b, at in zip(starts, stops, base, strict=True):
        np.testing.assert_array_equal(buf[at : at + b - a], data[a:b])
    assert http_server.requests - req == 4  # the span's parts, no request per range
    with pytest.raises(ValueError, match="read-only"):  # it serves the next reads too
        buf[base[0]] ^= 1
    again, base2 = src.read_ranges(starts[:1], stops[:1])
    np.testing.assert_array_equal(again[base2[0] : base2[0] + 1000], data[150_000:151_000])
    src.read_ranges(np.array([2_500_000]), np.array([2_500_100]))  # outside: read
    assert http_server.requests - req == 5
    src.will_need(2_200_000, 2_400_000)
    src.will_need(2_400_000, 2_500_000)
    assert len(src._ahead) == src.ahead_spans == 3
    src.will_need(2_500_000, 2_600_000)  # a fourth: the oldest goes
    assert [a for a, _, _ in src._ahead] == [2_200_000, 2_400_000, 2_500_000]
    src.release()  # the part just decoded goes; the two fetched ahead of it stay
    assert [(a, b) for a, b, _ in src._ahead] == [(2_400_000, 2_500_000),
                                                  (2_500_000, 2_600_000)]
    # a span whose fetch failed raises when (and only when) its bytes are read
    http_server.ignore_ranges = True
    src.will_need(2_600_000, 2_700_000)
    with pytest.raises(RemoteAccessError, match="ignored a Range request"):
        src.read_ranges(np.array([2_650_000]), np.array([2_650_100]))
    http_server.ignore_ranges = False
    src.close()
    assert src._ahead == []


def test_span_memory_is_reused_once_nothing_refers_to_it(http_server, tmp_path):
    """A streamed read's spans reuse released memory, never memory still referred to.

    A new 32 MiB span is a fresh mapping the kernel zeroes page by page; reusing
    a released span's memory saves that. A span array someone still holds (a
    kernel's argument, a view) keeps its memory out of reuse.
    """
    from siff_xarray.reader.source import FsspecSource

    data = np.random.default_rng(2).integers(0, 256, 3 * 2**20, dtype=np.uint8)
    (tmp_path / "blob.bin").write_bytes(data.tobytes())
    src = FsspecSource(f"{http_server.url}/blob.bin")
    src.span_window = 2**17
    spans = [(a, a + 200_000 + 1000 * (a % 7)) for a in range(0, 2_800_000, 250_000)]

    def read(k):
        a, b = spans[k]
        buf, base = src.read_ranges(np.array([a]), np.array([b]))
        np.testing.assert_array_equal(buf[base[0] : base[0] + b - a], data[a:b])
        return buf

    kept = read(0)  # not a span: fetched directly
    src.will_need(*spans[0])
    kept = read(0)[10:5000]  # a view of the first span, held throughout
    kept_bytes = kept.copy()
    memory = []
    for k in range(1, len(spans)):
        src.release()
        src.will_need(*spans[k])
        if k + 1 < len(spans):
            src.will_need(*spans[k + 1])
        buf = read(k)
        memory.append(buf.base.obj)
        del buf
    np.testing.assert_array_equal(kept, kept_bytes)  # its memory was never reused
    assert all(m is not kept.base.base.obj for m in memory)
    distinct = {id(m) for m in memory}
    assert len(distinct) <= src.ahead_spans + src.spare_spans < len(memory)
    src.close()
    assert src._spare == []


def _two_versions(tmp_path):
    """Two files of the same layout and size with different pixels (TIFF frames), as bytes."""
    kw = dict(shape=(128, 128), channels=(1, 2), n_slices=2, n_timepoints=40,
              photons_per_frame=300, format="tiff")
    a = write_siff(tmp_path / "a.siff", seed=1, **kw).path
    b = write_siff(tmp_path / "b.siff", seed=2, **kw).path
    first, second = Path(a).read_bytes(), Path(b).read_bytes()
    assert len(first) == len(second) and first != second
    return first, second


@pytest.mark.parametrize("weak", [False, True])
@pytest.mark.parametrize("chunks", [None, {}])
def test_a_remote_object_replaced_under_an_open_dataset_is_an_error(http_server, tmp_path,
                                                                     chunks, weak):
    """Reads carry the object's ETag: a replaced object is refused, never decoded.

    Before, the new object's bytes were decoded at the old file's offsets: another
    file's photons (same layout and size here, so nothing looked wrong). A weak
    ETag cannot be required with If-Match: the reader compares each answer's.
    """
    from siff_xarray.errors import SiffFormatError

    http_server.weak_etags = weak
    first, second = _two_versions(tmp_path)
    served = tmp_path / "served"
    served.mkdir()
    (served / "run.siff").write_bytes(first)
    url = f"{http_server.url}/served/run.siff"
    with xr.open_dataset(url, engine="siff", chunks=chunks,
                         index_cache=tmp_path / "cache") as ds:
        want = ds.intensity.isel(time=0).values  # reads work while it is unchanged
        time.sleep(0.01)
        (served / "run.siff").write_bytes(second)  # same size, new photons, new ETag
        with pytest.raises(SiffFormatError, match=r"run\.siff.*replaced since it was opened"):
            ds.intensity.load()
        assert (http_server.refused == 0) if weak else (http_server.refused > 0)
    # opened again, it reads the new version
    with xr.open_dataset(url, engine="siff", index_cache=tmp_path / "cache") as ds, \
            xr.open_dataset(tmp_path / "b.siff", engine="siff") as local:
        np.testing.assert_array_equal(ds.intensity.values, local.intensity.values)
        assert not np.array_equal(want, local.intensity.isel(time=0).values)


def test_a_chained_urls_object_replaced_is_refused_where_the_dataset_is_opened_again(
        http_server, tmp_path):
    """A chained URL (``simplecache::``) reads through fsspec's cache: its reads
    cannot require a version. Its ETag is still taken at the open and carried to
    every later open of the Dataset's file (a Dask worker's, here the pickled
    Dataset's after its files were closed), which refuses another object. Before,
    such an open read the new object's photons at the old index's offsets."""
    from xarray.backends.file_manager import FILE_CACHE

    first, second = _two_versions(tmp_path)
    served = tmp_path / "served"
    served.mkdir()
    (served / "run.siff").write_bytes(first)
    url = f"simplecache::{http_server.url}/served/run.siff"

    def opts(cache: str) -> dict:  # (every "process" its own download cache)
        return {"simplecache": {"cache_storage": str(tmp_path / cache)}}

    with xr.open_dataset(tmp_path / "a.siff", engine="siff") as local:
        want = local.intensity.values
    with xr.open_dataset(url, engine="siff", chunks={}, chunk_bytes=1,
                         storage_options=opts("client"), index_cache=False) as ds:
        assert ds.intensity.data.npartitions > 1
        np.testing.assert_array_equal(ds.intensity.values, want)
        with SiffFile(url, storage_options=opts("worker")) as f:
            version = f.version
            assert version and not f._source.reads_pinned
        shipped = pickle.dumps(ds.intensity.data)  # as a Dask graph goes to a worker
        time.sleep(0.01)
        (served / "run.siff").write_bytes(second)  # same size, new photons, new ETag
        FILE_CACHE.clear()  # every file the Dataset opened is opened again
        with pytest.raises(SiffFormatError, match=r"run\.siff.*replaced since it was first"):
            pickle.loads(shipped).compute(scheduler="sync")
        with pytest.raises(SiffFormatError, match=r"run\.siff.*replaced since it was first"):
            SiffFile(url, storage_options=opts("another"), version=version)
    # opened again, it reads the new object
    with xr.open_dataset(url, engine="siff", storage_options=opts("fresh"),
                         index_cache=False) as ds, \
            xr.open_dataset(tmp_path / "b.siff", engine="siff") as local:
        np.testing.assert_array_equal(ds.intensity.values, local.intensity.values)


def test_an_object_replaced_after_fsspec_listed_it_opens_as_it_is_now(s3_server, tmp_path):
    """s3fs answers ``info`` from listings it cached: a stale ETag must not lock a file out.

    The first read, pinned to the listed (old) ETag, is refused; nothing was read
    yet, so the open takes the object as it is now. A caller that required the old
    version (a Dask worker) still gets the error.
    """
    import fsspec

    from siff_xarray._remote import with_timeouts

    first, second = _two_versions(tmp_path)
    url = "s3://relisted/run.siff"
    ours = fsspec.core.url_to_fs(url, **with_timeouts(url, s3_server))[0]  # as the reader's
    ours.mkdir("relisted")
    ours.pipe("relisted/run.siff", first)
    with SiffFile(url, storage_options=s3_server, index_cache=False) as f:
        old = f.version
    ours.ls("relisted")  # cached listing with the first ETag
    other = fsspec.filesystem("s3", skip_instance_cache=True, **s3_server)
    other.pipe("relisted/run.siff", second)
    assert ours.info("relisted/run.siff")["ETag"] == old  # stale
    with SiffFile(url, storage_options=s3_server, index_cache=False) as f, \
            SiffFile(tmp_path / "b.siff") as local:
        assert f.version != old
        np.testing.assert_array_equal(f.read_frames(), local.read_frames())
    ours.ls("relisted", refresh=True)
    other.pipe("relisted/run.siff", first)
    ours.ls("relisted")  # stale again, and the caller requires the version it listed
    with pytest.raises(SiffFormatError, match="replaced since it was"):
        SiffFile(url, storage_options=s3_server, index_cache=False,
                 version=ours.info("relisted/run.siff")["ETag"])


def test_pinned_reads_keep_no_filesystem_per_version(http_server, tmp_path):
    """Each open file pins its own filesystem, dropped with it (none kept per ETag)."""
    import gc
    import weakref

    from fsspec.implementations.http import HTTPFileSystem

    cached = len(HTTPFileSystem._cache)
    gone = []
    for k in range(4):
        t = write_siff(tmp_path / f"f{k}.siff", shape=(16, 16), n_timepoints=2, seed=k)
        with SiffFile(f"{http_server.url}/f{k}.siff", index_cache=False) as f:
            assert f.version and f.read_frames([0]).shape == (1, 16, 16)
            gone.append(weakref.ref(f._source._fs))
        del f, t
    gc.collect()
    assert len(HTTPFileSystem._cache) <= cached + 1  # the unpinned one, shared
    assert all(r() is None for r in gone)


def test_an_s3_object_replaced_under_an_open_dataset_is_an_error(s3_server, tmp_path):
    import s3fs

    from siff_xarray.errors import SiffFormatError

    first, second = _two_versions(tmp_path)
    fs = s3fs.S3FileSystem(**s3_server)
    fs.mkdir("replaced")
    fs.pipe("replaced/run.siff", first)
    url = "s3://replaced/run.siff"
    with xr.open_dataset(url, engine="siff", storage_options=s3_server,
                         index_cache=tmp_path / "cache") as ds:
        ds.intensity.isel(time=0).load()
        fs.pipe("replaced/run.siff", second)
        with pytest.raises(SiffFormatError, match=r"run\.siff.*replaced since it was opened"):
            ds.intensity.load()
    with xr.open_dataset(url, engine="siff", storage_options=s3_server,
                         index_cache=tmp_path / "cache") as ds, \
            xr.open_dataset(tmp_path / "b.siff", engine="siff") as local:
        np.testing.assert_array_equal(ds.intensity.values, local.intensity.values)


def test_a_span_dropped_by_another_read_before_it_ran_is_read_directly(http_server,
                                                                        tmp_path):
    """Two streamed reads share a source: one's end drops the other's pending spans.

    And a predicted span whose fetch failed is read directly.
    """
    from concurrent.futures import Future

    from siff_xarray.reader.source import FsspecSource

    data = np.random.default_rng(3).integers(0, 256, 2**20, dtype=np.uint8)
    (tmp_path / "blob.bin").write_bytes(data.tobytes())
    src = FsspecSource(f"{http_server.url}/blob.bin")
    dropped = Future()
    dropped.cancel()
    src._span_holding = lambda starts, stops: (100_000, dropped, False)
    buf, base = src.read_ranges(np.array([150_000]), np.array([160_000]))
    np.testing.assert_array_equal(buf[base[0] : base[0] + 10_000], data[150_000:160_000])
    # a predicted span that failed: nobody asked for it, the read tries for itself
    failed = Future()
    failed.set_exception(OSError("connection reset while predicting"))
    src._span_holding = lambda starts, stops: (100_000, failed, True)
    buf, base = src.read_ranges(np.array([150_000]), np.array([160_000]))
    np.testing.assert_array_equal(buf[base[0] : base[0] + 10_000], data[150_000:160_000])
    # one the read asked for (will_need): its failure is the read's
    src._span_holding = lambda starts, stops: (100_000, failed, False)
    with pytest.raises(OSError, match="while predicting"):
        src.read_ranges(np.array([150_000]), np.array([160_000]))
    src.close()


def test_a_weak_etag_is_checked_on_each_answer_and_on_a_workers_open(http_server, tmp_path):
    """A weak ETag (``W/...``) never matches If-Match: the reader sends none and compares
    the ETag of each answer instead, and an open given that version (a Dask worker's)
    compares it with the object's."""
    from siff_xarray.errors import SiffFormatError
    from siff_xarray.reader.source import FsspecSource, forget_probes

    http_server.weak_etags = True
    path = tmp_path / "blob.bin"
    data = np.random.default_rng(0).integers(0, 256, 2**20, dtype=np.uint8)
    path.write_bytes(data.tobytes())
    url = f"{http_server.url}/blob.bin"
    src = FsspecSource(url)
    assert src.version is not None and src.version.startswith("W/")
    worker = FsspecSource(url, version=src.version)  # unchanged: it opens and reads
    buf, base = worker.read_ranges(np.array([1000]), np.array([200_000]))
    np.testing.assert_array_equal(buf[base[0] : base[0] + 199_000], data[1000:200_000])
    assert http_server.refused == 0
    time.sleep(0.01)
    path.write_bytes(data[::-1].tobytes())  # same size, other bytes, another ETag
    # a reopen at that version in this process asks nothing (the probe was kept):
    # its first read refuses the new object, as reads of the open ones do
    again = FsspecSource(url, version=src.version)
    for reader in (src, worker, again):
        with pytest.raises(SiffFormatError, match=r"blob\.bin.*replaced since it was"):
            reader.read_ranges(np.array([300_000]), np.array([900_000]))
    forget_probes()  # as in a fresh process: the open compares the versions
    with pytest.raises(SiffFormatError, match=r"blob\.bin.*replaced since it was first"):
        FsspecSource(url, version=src.version)
    again.close()
    assert http_server.refused == 0  # the reader refused the answers, not the server
    src.close()
    worker.close()


@pytest.mark.parametrize("etags", [True, False])
def test_a_span_of_a_file_truncated_after_open_is_an_error(http_server, tmp_path, etags):
    """With ETags the server refuses the read (412); without, the short answer is caught."""
    from siff_xarray.errors import SiffFormatError
    from siff_xarray.reader.source import FsspecSource

    http_server.etags = etags
    path = tmp_path / "blob.bin"
    path.write_bytes(bytes(2**20))
    src = FsspecSource(f"{http_server.url}/blob.bin")
    src.span_window = 2**17
    src.read(0, 100)  # as an open reads the header first
    with open(path, "r+b") as fh:
        fh.truncate(600_000)
    src.will_need(500_000, 900_000)
    why = "was replaced since it was opened" if etags else "file ends inside"
    with pytest.raises(SiffFormatError, match=rf"blob\.bin.*{why}"):
        src.read_ranges(np.array([500_000]), np.array([900_000]))
    src.close()


@pytest.mark.parametrize("where", ["http", "file object"])
def test_a_file_truncated_before_its_walk_is_an_error_not_a_hang(http_server, tmp_path,
                                                                  where):
    """A server without ETags cannot refuse the new version: the walk gets short
    windows. Before, it asked for the same bytes again, forever."""
    import threading

    from siff_xarray.errors import SiffFormatError
    from siff_xarray.reader.source import FileObjectSource, FsspecSource

    http_server.etags = False
    t = write_siff(tmp_path / "s.siff", shape=(64, 64), channels=(1, 2), n_slices=2,
                   n_timepoints=5, photons_per_frame=12000, encoding="raw", seed=3)
    for cut in (30_000, 200_000):  # inside the header's 64 KiB, and after it
        path = tmp_path / f"cut{cut}.siff"
        path.write_bytes(Path(t.path).read_bytes())
        src = (FsspecSource(f"{http_server.url}/{path.name}") if where == "http"
               else FileObjectSource(open(path, "rb"), owns=True))  # noqa: SIM115
        os.truncate(path, cut)
        outcome = []

        def walk(src=src, outcome=outcome):
            try:
                with SiffFile(src, index_cache=False):
                    outcome.append(None)
            except Exception as exc:
                outcome.append(exc)

        job = threading.Thread(target=walk, daemon=True)
        job.start()
        job.join(60)
        assert not job.is_alive(), "the walk of a truncated file did not end"
        err = outcome[0]
        assert isinstance(err, SiffFormatError), err
        assert str(path.name) in str(err) and f"ends at byte {cut}" in str(err)
        src.close()


def _streamed_file(path, monkeypatch, parts):
    """A small file whose long reads stream in ``parts`` parts of spans in ~3 requests."""
    from siff_xarray.reader.source import FsspecSource

    t = write_siff(path, shape=(32, 24), channels=(1, 2), n_slices=3, n_flyback=1,
                   n_timepoints=12, photons_per_frame=900, seed=6)
    size = os.path.getsize(t.path)
    monkeypatch.setattr(SiffFile, "stream_part_bytes", size // parts)
    monkeypatch.setattr(FsspecSource, "span_window", size // (3 * parts))
    return t, size


def test_long_remote_reads_stream_in_parts_fetched_ahead(http_server, tmp_path, monkeypatch):
    """An eager read of many frames decodes part by part while the next part arrives.

    Before, it gathered every frame's bytes first (a 6 GB file: 6 GB in memory) and
    decoded only then.
    """
    from siff_xarray.reader.source import FsspecSource

    t, size = _streamed_file(tmp_path / "s.siff", monkeypatch, parts=7)
    held = []
    real = FsspecSource.release

    spans = []

    def release(self):
        held.append(sum(b - a for a, b, _ in self._ahead))
        spans.append(len(self._ahead))
        real(self)

    monkeypatch.setattr(FsspecSource, "release", release)
    rng = np.random.default_rng(0)
    with SiffFile(t.path) as local, SiffFile(f"{http_server.url}/s.siff") as remote:
        frames = np.arange(local.num_frames)
        shifts = rng.integers(-5, 6, (len(frames), 2))
        sent = http_server.bytes_sent
        got = remote.read_frames(frames, shifts=shifts)
        np.testing.assert_array_equal(got, local.read_frames(frames, shifts=shifts))
        assert len(held) >= 7  # part by part
        # the part decoding and the four fetched ahead of it, never the file
        ahead = SiffFile.read_ahead_parts
        assert ahead == FsspecSource.ahead_spans - 1 == 4
        assert max(held) <= (ahead + 2) * size // 7
        # while a part decodes, the next ones are on their way (latency hides behind them)
        assert spans[0] == ahead + 1 and max(spans) == ahead + 1
        assert http_server.bytes_sent - sent <= 1.05 * size
        # the file stays open, but nothing of the read stays held with it
        assert remote._source._ahead == [] and remote._source._spare == []
        some = rng.permutation(frames)[:40]  # any order: parts follow the request
        np.testing.assert_array_equal(remote.read_frames(some), local.read_frames(some))
        # a read that fails part-way holds nothing either
        monkeypatch.setattr(SiffFile, "_frame_args", _fail_on_third_part(SiffFile._frame_args))
        with pytest.raises(RuntimeError, match="third part"):
            remote.read_frames(frames)
        assert remote._source._ahead == [] and remote._source._spare == []


def test_a_far_link_keeps_twice_as_many_parts_on_their_way(http_server, tmp_path,
                                                            monkeypatch):
    """Where each request waits long for its first byte, four parts on their way no
    longer hide it behind the transfer of the parts before: twice as many go out."""
    from siff_xarray.reader import http_ranges
    from siff_xarray.reader.source import PARTS_AHEAD, FsspecSource

    t, size = _streamed_file(tmp_path / "far.siff", monkeypatch, parts=14)
    spans = []
    real = FsspecSource.release
    monkeypatch.setattr(FsspecSource, "release",
                        lambda self: (spans.append(len(self._ahead)), real(self))[1])
    with SiffFile(t.path) as local:
        want = local.read_frames(np.arange(local.num_frames))
    held = {}
    for name, first in (("near", 0.02), ("far", 0.05)):  # as measured, whatever happens
        monkeypatch.setattr(http_ranges.Link, "first_byte_s", property(lambda _, s=first: s))
        with SiffFile(f"{http_server.url}/far.siff") as remote:
            assert remote._source.parts_ahead() == PARTS_AHEAD * (1 + (name == "far"))
            spans.clear()
            sent = http_server.bytes_sent
            np.testing.assert_array_equal(remote.read_frames(np.arange(len(want))), want)
            held[name] = max(spans)
            assert http_server.bytes_sent - sent <= 1.05 * size  # nothing fetched twice
            assert remote._source._ahead == []
    # the part decoding and those on their way
    assert held == {"near": PARTS_AHEAD + 1, "far": 2 * PARTS_AHEAD + 1}, held


def _fail_on_third_part(frame_args):
    calls = []

    def wrapped(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("third part")
        return frame_args(self, *args, **kwargs)

    return wrapped


def _every_reduction(f, frames, shifts, masks) -> dict:
    """Every photon reduction of ``f`` on ``frames`` (in any order), with ``shifts``."""

    def decode_into():
        n = len(frames)
        h, w = f.frame_shape
        images, counts = np.zeros((n, h, w), np.uint16), np.zeros(n, np.uint32)
        hists = np.zeros((n, f.n_tau_bins), np.uint32)
        arrivals = np.zeros(int(f._n_photons(frames).sum()), np.uint16)
        hi = f.decode_into(frames, np.arange(n)[::-1].copy(), images, counts, hists, arrivals)
        return images, counts, hists, arrivals, hi

    return {
        "read_frames": lambda: f.read_frames(frames, shifts=shifts),
        "sum_masks": lambda: f.sum_masks(masks, frames, shifts=shifts),
        "histograms": lambda: f.histograms(frames, return_overflow=True),
        "masks_histograms": lambda: f.masks_histograms(masks, frames, shifts=shifts),
        "lifetime_images": lambda: f.lifetime_images(frames, shifts, return_intensity=True),
        "phasor_images": lambda: f.phasor_images(frames, shifts),
        "masks_flim_sums": lambda: f.masks_flim_sums(masks, frames, shifts, phasor=True),
        "photons_batch": lambda: f.photons_batch(frames),
        "decode_into": decode_into,
    }


@pytest.mark.parametrize("where", ["remote", "local without a read lease"])
def test_every_reduction_streams_in_parts(http_server, tmp_path, monkeypatch, where):
    """Remote files, and local ones whose map cannot be leased, decode part by part.

    Each part's bytes are copied (fetched, or read with pread), decoded and dropped,
    so memory holds a few parts, not the bytes of every frame asked for (a 6 GB
    file: 6 GB). Every reduction equals the one pass over the memory map.
    """
    from siff_xarray.reader import source
    from siff_xarray.reader.source import FsspecSource, LocalSource

    t = write_siff(tmp_path / "s.siff", shape=(32, 24), channels=(1, 2), n_slices=3,
                   n_flyback=1, n_timepoints=12, photons_per_frame=900, seed=6)
    size = os.path.getsize(t.path)
    rng = np.random.default_rng(3)
    with SiffFile(t.path) as local:
        frames = rng.permutation(local.num_frames)[:50]
        frames = frames[local.im_params.locate(frames)["flyback"] == 0]
        shifts = rng.integers(-5, 6, (len(frames), 2))
        masks = rng.random((3, 32, 24)) > 0.5
        want = {k: run() for k, run in _every_reduction(local, frames, shifts, masks).items()}
    monkeypatch.setattr(SiffFile, "stream_part_bytes", size // 9)
    parts = []
    kind = FsspecSource if where == "remote" else LocalSource
    real = kind.release

    def release(self):
        parts.append(1)
        real(self)

    monkeypatch.setattr(kind, "release", release)
    if where == "remote":
        path = f"{http_server.url}/s.siff"
    else:
        monkeypatch.setattr(source, "_LEASES", False)
        path = t.path
    with SiffFile(path) as f:
        for name, run in _every_reduction(f, frames, shifts, masks).items():
            before = len(parts)
            got = run()
            assert len(parts) - before >= 3, name  # part by part
            for a, b in zip(want[name] if isinstance(got, tuple) else (want[name],),
                            got if isinstance(got, tuple) else (got,), strict=True):
                np.testing.assert_array_equal(b, a, err_msg=name)


def test_sidecar_opens_in_a_few_requests_and_is_ignored_when_stale(http_server, tmp_path):
    from siff_xarray.reader.index_cache import SIDECAR_SUFFIX

    t = write_siff(tmp_path / "s.siff", shape=(32, 16), channels=(1, 2), n_slices=3,
                   n_flyback=1, n_timepoints=40, photons_per_frame=400, seed=5)
    with SiffFile(t.path) as f:
        written = f.write_sidecar()
    assert written == t.path + SIDECAR_SUFFIX and os.path.getsize(written) > 0
    url = f"{http_server.url}/s.siff"
    with xr.open_dataset(t.path, engine="siff") as local:
        want = _bare(local)
    http_server.latency = 0.005
    req, heads = http_server.requests, http_server.heads
    with xr.open_dataset(url, engine="siff", index_cache=tmp_path / "fresh-cache") as ds:
        # info, header, file tail (the key), sidecar, one spot-checked IFD
        assert http_server.requests - req + http_server.heads - heads <= 5
        xr.testing.assert_identical(_bare(ds), want)
    # another acquisition under the same name: the old sidecar must not be used
    write_siff(tmp_path / "other.siff", shape=(32, 16), channels=(1, 2), n_slices=3,
               n_flyback=1, n_timepoints=40, photons_per_frame=500, seed=6)
    sidecar = Path(written).read_bytes()
    os.replace(tmp_path / "other.siff", t.path)
    Path(written).write_bytes(sidecar)
    with xr.open_dataset(t.path, engine="siff", index_cache=False) as local:
        want = _bare(local)
    with xr.open_dataset(url, engine="siff", index_cache=tmp_path / "cache-2") as ds:
        xr.testing.assert_identical(_bare(ds), want)
    # a damaged sidecar is ignored too
    Path(written).write_bytes(sidecar[: len(sidecar) // 2])
    with xr.open_dataset(url, engine="siff", index_cache=tmp_path / "cache-3") as ds:
        xr.testing.assert_identical(_bare(ds), want)


def test_sidecar_cli_and_read_only_places(tmp_path, s3_server):
    from click.testing import CliRunner

    from siff_xarray.cli import cli

    t = write_siff(tmp_path / "c.siff", shape=(16, 8), n_timepoints=6, seed=1)
    res = CliRunner().invoke(cli, ["index", t.path])
    assert res.exit_code == 0, res.output
    assert os.path.isfile(t.path + ".siffidx") and "c.siff.siffidx" in res.output
    fs, _ = _put_on_s3(s3_server, t.path, "idx-bucket/c.siff")
    res = CliRunner().invoke(cli, ["index", "s3://idx-bucket/c.siff", "--storage-options",
                                    json.dumps(s3_server)])
    assert res.exit_code == 0, res.output
    assert fs.cat_file("idx-bucket/c.siff.siffidx") == Path(t.path + ".siffidx").read_bytes()
    with SiffFile(io.BytesIO(Path(t.path).read_bytes())) as f:
        assert f.write_sidecar() is None  # nowhere to put it: skipped


def test_a_sidecar_found_on_open_is_not_uploaded_again(s3_server, s3_latency, tmp_path,
                                                       monkeypatch):
    """A fresh process converting (or indexing) a file indexed earlier sends no PUT of
    its sidecar: the open found it and checked it against the file. A file changed
    under the same name gets its new sidecar."""
    from click.testing import CliRunner

    from siff_xarray.cli import cli

    proxy, opts = s3_latency
    t = write_siff(tmp_path / "s.siff", shape=(16, 8), n_timepoints=6, seed=3)
    fs, url = _put_on_s3(s3_server, t.path, "again-bucket/s.siff")
    res = CliRunner().invoke(cli, ["index", url, "--storage-options", json.dumps(opts)])
    assert res.exit_code == 0 and "wrote " in res.output, res.output
    forget()  # as a fresh machine: only the sidecar
    monkeypatch.setenv("SIFF_XARRAY_CACHE_DIR", str(tmp_path / "c0"))
    n0 = len(proxy.log)
    with SiffFile(url, storage_options=opts, index_cache=tmp_path / "c1") as f:
        assert f.sidecar_found == url + ".siffidx"
    forget()
    zs.convert(url, tmp_path / "s.zarr", storage_options=opts)
    forget()
    monkeypatch.setenv("SIFF_XARRAY_CACHE_DIR", str(tmp_path / "c3"))  # (not the convert's)
    res = CliRunner().invoke(cli, ["index", url, "--storage-options", json.dumps(opts)])
    assert res.exit_code == 0 and "up to date: " + url + ".siffidx" in res.output, res.output
    sent = [path for method, path in proxy.log[n0:] if method == "PUT"]
    assert not any(path.endswith(".siffidx") for path in sent), sent
    # another file under the same name: the old sidecar does not match, the new is written
    other = write_siff(tmp_path / "o.siff", shape=(16, 8), n_timepoints=7, seed=4)
    fs.put_file(other.path, "again-bucket/s.siff")
    forget()
    n1 = len(proxy.log)
    zs.convert(url, tmp_path / "o.zarr", storage_options=opts)
    sent = [path for method, path in proxy.log[n1:] if method == "PUT"]
    assert sum(path.endswith(".siffidx") for path in sent) == 1, sent
    with SiffFile(t.path) as f:  # a local open that walked writes it
        assert f.sidecar_found is None and f.write_sidecar() == t.path + ".siffidx"
    with SiffFile(t.path, index_cache=tmp_path / "c2") as f:
        assert f.sidecar_found == t.path + ".siffidx"


def test_an_index_from_memory_or_the_cache_reads_the_sidecar_before_writing_it(
        s3_server, s3_latency, tmp_path, monkeypatch):
    """An open whose index came from this process's memory or the local cache did not
    look at the sidecar, so ``index`` run twice (and every conversion after an open)
    uploaded it again. The sidecar is now read first and its key compared: one
    there for this content is left alone; a deleted one, or another content's, is
    written."""
    from click.testing import CliRunner

    from siff_xarray.cli import cli

    proxy, opts = s3_latency
    monkeypatch.setenv("SIFF_XARRAY_CACHE_DIR", str(tmp_path / "cache"))
    t = write_siff(tmp_path / "m.siff", shape=(16, 8), n_timepoints=6, seed=5)
    fs, url = _put_on_s3(s3_server, t.path, "memo-bucket/m.siff")
    sidecar = "memo-bucket/m.siff.siffidx"

    def index() -> tuple[str, list[str]]:
        n = len(proxy.log)
        res = CliRunner().invoke(cli, ["index", url, "--storage-options", json.dumps(opts)])
        assert res.exit_code == 0, res.output
        return res.output, [path for method, path in proxy.log[n:] if method == "PUT"]

    out, puts = index()  # (walked: written)
    assert "wrote " in out and puts == ["/" + sidecar]
    forget()  # a cold open finds it: one GET (s3fs asked a whole object's size first)
    n = len(proxy.log)
    with SiffFile(url, storage_options=opts, index_cache=tmp_path / "cold") as f:
        assert f.sidecar_found == url + ".siffidx"
    assert [m for m, path in proxy.log[n:] if path.endswith(".siffidx")] == ["GET"]
    assert "HEAD" not in [m for m, _ in proxy.log[n:]], proxy.log[n:]
    out, puts = index()  # the index from this process's memory
    assert "up to date: " + url + ".siffidx" in out and puts == [], (out, puts)
    forget()
    out, puts = index()  # from the local cache
    assert "up to date: " in out and puts == [], (out, puts)
    n = len(proxy.log)
    zs.convert(url, tmp_path / "m.zarr", storage_options=opts)
    assert not any(path.endswith(".siffidx") for method, path in proxy.log[n:]
                   if method == "PUT")
    fs.rm(sidecar)  # deleted meanwhile: written again
    out, puts = index()
    assert "wrote " in out and puts == ["/" + sidecar], (out, puts)
    other = write_siff(tmp_path / "o.siff", shape=(16, 8), n_timepoints=7, seed=6)
    with SiffFile(other.path, index_cache=False) as f:  # another file's sidecar there
        f.write_sidecar()
    fs.put_file(other.path + ".siffidx", sidecar)
    out, puts = index()
    assert "wrote " in out and puts == ["/" + sidecar], (out, puts)
    from siff_xarray.reader.index_cache import packed_key

    theirs = packed_key(Path(other.path + ".siffidx").read_bytes())
    assert packed_key(fs.cat(sidecar)) not in (None, theirs)
    assert packed_key(b"not a sidecar") is None and packed_key(None) is None


@contextlib.contextmanager
def _fresh_cluster(tmp_path, monkeypatch):
    """A client of two worker processes in another working directory, no usable cache.

    As fresh cluster nodes: their index cache is a file, not a directory.
    """
    distributed = pytest.importorskip("distributed")
    elsewhere = tmp_path / "worker-cwd"
    elsewhere.mkdir()
    (tmp_path / "no-cache").write_text("")
    monkeypatch.setenv("SIFF_XARRAY_CACHE_DIR", str(tmp_path / "no-cache"))
    monkeypatch.chdir(elsewhere)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        yield client


@pytest.mark.slow
def test_workers_with_empty_caches_do_not_walk_remote_files_again(http_server, tmp_path,
                                                                  monkeypatch):
    t = write_siff(tmp_path / "w.siff", shape=(32, 16), channels=(1, 2), n_slices=3,
                   n_flyback=1, n_timepoints=30, photons_per_frame=3000, seed=8,
                   encoding="raw")
    size = os.path.getsize(t.path)
    url = f"{http_server.url}/w.siff"
    masks = np.random.default_rng(1).random((2, 32, 16)) > 0.5
    with xr.open_dataset(t.path, engine="siff") as local:
        want_trace = local.intensity.sum(("y", "x")).values
        want_life = local.siff.lifetime(masks).values
    with _fresh_cluster(tmp_path, monkeypatch) as client, \
            xr.open_dataset(url, engine="siff", chunks={}, chunk_bytes=1) as ds:
        before, n_log = http_server.bytes_sent, len(http_server.log)
        trace = client.compute(ds.intensity.sum(("y", "x")).data, sync=True)
        # workers predict no chunks: the scheduler spreads each run over them
        from siff_xarray.reader.siff_file import _on_distributed_worker

        assert client.submit(_on_distributed_worker, pure=False).result() is True
        assert _on_distributed_worker() is False
        life = ds.siff.lifetime(masks).compute().values
        moved = http_server.bytes_sent - before
        ranges = http_server.log[n_log:]
        # a conversion on the same workers: each keeps its source between its batches
        # and closes it when the run ends
        summary = zs.convert(url, tmp_path / "dist.zarr", scheduler=client,
                             shard_bytes=2 * 4 * 2 * 32 * 16 * 2, chunk_bytes=1)
        kept = client.run(_kept_sources)
        assert zs.verify(t.path, tmp_path / "dist.zarr") == []
        # the object replaced under the open Dataset: workers that hold the file open
        # give what they read before (bytes they kept) or refuse it, and workers that
        # open it afresh refuse it (the shipped hint carries the ETag the Dataset was
        # opened with); none decodes the new object
        other = write_siff(tmp_path / "other.siff", shape=(32, 16), channels=(1, 2),
                           n_slices=3, n_flyback=1, n_timepoints=30,
                           photons_per_frame=3000, seed=9, encoding="raw")
        time.sleep(0.01)
        Path(t.path).write_bytes(Path(other.path).read_bytes())
        jobs = {"trace": (lambda: client.compute(ds.intensity.sum(("y", "x")).data,
                                                 sync=True), want_trace),
                "lifetime": (lambda: ds.siff.lifetime(masks).compute().values, want_life)}
        for fresh in (False, True):
            if fresh:
                client.run(_forget_open_files)
            for name, (job, want) in jobs.items():
                try:
                    got = job()
                except SiffFormatError as exc:
                    assert re.search(r"w\.siff.*replaced since it was", str(exc)), exc
                else:
                    assert not fresh, f"{name}: a fresh worker read the replaced object"
                    np.testing.assert_array_equal(got, want)
    assert summary.batches >= 10 and set(kept.values()) == {0}
    np.testing.assert_array_equal(trace, want_trace)
    np.testing.assert_array_equal(life, want_life)
    # every frame is read once for each of the two results (~2x the file); a worker
    # that walked the chain would stream the file again (windows of the whole file)
    assert moved < 2.2 * size, (moved, size)
    assert max(b - a for _, a, b in ranges) < size / 4


@pytest.mark.parametrize("where", ["http", "s3"])
def test_a_reopen_at_a_known_version_asks_the_server_nothing(http_server, s3_latency,
                                                             tmp_path, where):
    """What an open learnt of an object (size, ETag, head, tail, the IFDs that check
    the index) is kept per process: reopening that version (a Dask worker's next task
    after xarray closed the file, the photon reductions after the chunks' reads)
    makes no request before its first read. An open at no version, or unpinned,
    asks again."""
    t = write_siff(tmp_path / "k.siff", shape=(32, 16), channels=(1, 2), n_timepoints=6,
                   photons_per_frame=8000, seed=12)  # frame 10 lies past the head
    if where == "http":
        url, opts = f"{http_server.url}/k.siff", None

        def requests() -> int:
            return http_server.requests + http_server.heads
    else:
        proxy, opts = s3_latency
        _, url = _put_on_s3({k: v for k, v in opts.items() if k != "skip_instance_cache"},
                            t.path, "reopen-bucket/k.siff")

        def requests() -> int:
            return proxy.requests
    with SiffFile(t.path) as local:
        want = local.read_frames([10])
    with SiffFile(url, storage_options=opts) as f:
        version = f.version
        np.testing.assert_array_equal(f.read_frames([10]), want)
    assert version
    before = requests()
    # the first open walked the file; a reopen checks the index it found with a few
    # IFDs, which the first probe did not hold: it probes again, with them (one
    # round of concurrent ranges)
    with SiffFile(url, storage_options=opts, version=version) as g:
        assert requests() > before
    before = requests()
    with SiffFile(url, storage_options=opts, version=version) as g:
        assert requests() == before  # nothing asked
        np.testing.assert_array_equal(g.read_frames([10]), want)
        assert requests() > before  # the frame's bytes
    for again in ({}, {"pin_version": False}):
        before = requests()
        with SiffFile(url, storage_options=opts, **again) as h:
            assert requests() > before
            np.testing.assert_array_equal(h.read_frames([10]), want)


def test_index_hints_carry_the_version_and_the_index_to_workers():
    from siff_xarray.reader.index_cache import (
        IndexHint,
        forget,
        known,
        known_version,
        remember,
        remember_version,
    )

    url = "http://127.0.0.1:1/hint.siff"
    remember(url, b"packed")
    remember_version(url, '"v1"')
    hint = IndexHint(url, known_version(url))
    data = pickle.dumps(hint)
    forget(url)  # as on a fresh worker
    assert known(url) is None and known_version(url) is None
    back = pickle.loads(data)
    assert back == hint and back.version == '"v1"' and known(url) == b"packed"
    forget(url)


def _forget_open_files() -> None:
    """On a worker: drop the open files (xarray's and the reductions'), as on a fresh one."""
    from xarray.backends.file_manager import FILE_CACHE

    from siff_xarray.accessor import reductions
    from siff_xarray.reader.source import forget_probes

    FILE_CACHE.clear()
    reductions._OPEN.clear()
    forget_probes()


def _kept_sources() -> int:
    from siff_xarray.store import converter

    return len(converter._runs)


def test_errors_blame_the_server_or_the_url_not_the_file(http_server, s3_server, tmp_path):
    from siff_xarray.errors import RemoteAccessError, SiffFormatError

    write_siff(tmp_path / "r.siff", shape=(16, 8), n_timepoints=4, seed=1)
    http_server.ignore_ranges = True  # answers every range with the whole file
    with pytest.raises(RemoteAccessError, match=r"r\.siff.*ignored a Range request"):
        xr.open_dataset(f"{http_server.url}/r.siff", engine="siff", index_cache=False)
    http_server.ignore_ranges = False
    import fsspec

    fs = fsspec.filesystem("s3", **s3_server)
    if not fs.exists("idx-bucket"):
        fs.mkdir("idx-bucket")
    for url, opts in ((f"{http_server.url}/missing.siff", None),
                      ("s3://no-such-bucket-here/r.siff", s3_server),
                      ("s3://idx-bucket/no-such-object.siff", s3_server)):
        with pytest.raises(OSError) as err:
            xr.open_dataset(url, engine="siff", storage_options=opts)
        assert not isinstance(err.value, SiffFormatError)
        assert isinstance(err.value, (FileNotFoundError, RemoteAccessError)), err.value
        assert url.split("://", 1)[1].split("/", 1)[1] in str(err.value), str(err.value)


def test_s3_cold_open_and_sidecar_at_latency_count_requests(s3_server, s3_latency, tmp_path):
    proxy, opts = s3_latency
    t = write_siff(tmp_path / "session.siff", shape=(64, 32), channels=(1, 2), n_slices=6,
                   n_flyback=1, n_timepoints=100, photons_per_frame=600, seed=2)
    fs, _ = _put_on_s3(s3_server, t.path, "lat-bucket/session.siff")
    with xr.open_dataset(t.path, engine="siff") as local:
        want = _bare(local)
    proxy.latency = 0.005
    url = "s3://lat-bucket/session.siff"
    before = proxy.requests
    with xr.open_dataset(url, engine="siff", storage_options=opts,
                         index_cache=tmp_path / "cold") as ds:
        assert proxy.requests - before <= 100, proxy.counts
        xr.testing.assert_identical(_bare(ds), want)
    with SiffFile(t.path) as f:
        f.write_sidecar()
    fs.put_file(t.path + ".siffidx", "lat-bucket/session.siff.siffidx")
    from siff_xarray.reader.index_cache import forget

    forget()  # as a fresh machine: nothing known in this process
    before = proxy.requests
    with xr.open_dataset(url, engine="siff", storage_options=opts,
                         index_cache=tmp_path / "with-sidecar") as ds:
        assert proxy.requests - before <= 6, proxy.counts
        xr.testing.assert_identical(_bare(ds), want)


def test_an_s3_open_with_a_cached_index_takes_one_round_trip(s3_server, s3_latency, big_frames,
                                                            tmp_path, monkeypatch):
    """Size, ETag and modification time come with the first presigned ranges: no
    HeadObject before them, and the same index cache key as an open through s3fs."""
    import fsspec

    from siff_xarray.reader.source import FsspecSource

    proxy, opts = s3_latency
    _, url = _put_on_s3(s3_server, big_frames.path, "probe-bucket/big.siff")
    cache = tmp_path / "cache"
    with xr.open_dataset(big_frames.path, engine="siff") as local:
        want = _bare(local)
    with xr.open_dataset(url, engine="siff", storage_options=opts, index_cache=cache) as ds:
        xr.testing.assert_identical(_bare(ds), want)  # walked: the index is cached now
    proxy.latency = 0.1

    def open_once() -> tuple[int, int]:
        forget()  # as a fresh process: only the cache on disk
        at, heads = len(proxy.arrivals), proxy.counts.get("HEAD", 0)
        with xr.open_dataset(url, engine="siff", storage_options=opts,
                             index_cache=cache) as ds:
            costs = proxy.round_trips(at), proxy.counts.get("HEAD", 0) - heads
            xr.testing.assert_identical(_bare(ds), want)
        return costs

    assert open_once() == (1, 0)  # header, tail and the IFDs that check the index
    probed = FsspecSource(url, opts)
    with monkeypatch.context() as m:  # s3fs asks for the object's info (HeadObject) first
        m.setattr(FsspecSource, "direct_http", False)
        asked = FsspecSource(url, opts)
        assert open_once() == (2, 1)  # the same cache entry: no walk
    assert probed.fingerprint() == asked.fingerprint() != ""
    assert (probed.size, probed.version) == (asked.size, asked.version)
    probed.close()
    asked.close()
    # an S3-compatible server that sends no Last-Modified (or no ETag either): the
    # probe and s3fs still name the file alike, so either open finds the other's index
    for dropped in ({"last-modified"}, {"last-modified", "etag"}):
        proxy.drop_headers = dropped
        probed = FsspecSource(url, opts)
        with monkeypatch.context() as m:
            m.setattr(FsspecSource, "direct_http", False)
            fsspec.filesystem("s3", **opts).invalidate_cache()
            asked = FsspecSource(url, opts)
        assert probed.fingerprint() == asked.fingerprint(), dropped
        assert (probed.size, probed.version) == (asked.size, asked.version)
        probed.close()
        asked.close()
    proxy.drop_headers = set()
    proxy.refuse_signed = True  # a signature S3 does not accept: s3fs opens and reads it
    trips, heads = open_once()
    assert heads == 1 and trips >= 2


def test_store_destinations_and_chained_urls_time_out_with_a_clear_error(
        silent_server, tmp_path, monkeypatch):
    from siff_xarray import _remote
    from siff_xarray.errors import RemoteAccessError

    monkeypatch.setattr(_remote, "READ_TIMEOUT_S", 1.0)  # the default is 60 s
    monkeypatch.setattr(_remote, "RETRIES", 1)
    t = write_siff(tmp_path / "d.siff", shape=(8, 8), n_timepoints=3, photons_per_frame=50)
    # an S3 endpoint that accepts connections and never answers: they hung before
    s3 = {"endpoint_url": silent_server, "key": "k", "secret": "s"}
    dst = "s3://bucket/run.zarr"
    t0 = time.monotonic()
    with pytest.raises(RemoteAccessError, match=rf"{dst}: the server"):
        zs.convert(t.path, dst, target_options=s3)
    with pytest.raises(RemoteAccessError, match=rf"{dst}: the server"):
        zs.open_converted(dst, storage_options=s3)
    # a chained URL gets the timeouts of its HTTP link
    url = f"simplecache::{silent_server}/run.siff"
    assert "timeout" in _remote.with_timeouts(url, None)["http"]["client_kwargs"]
    with pytest.raises(RemoteAccessError, match="the server did not answer in time"):
        xr.open_dataset(url, engine="siff", index_cache=False)
    assert time.monotonic() - t0 < 30  # measured 7.6 s; s3fs's own 5 retries made it 30 s


def test_missing_s3_credentials_are_one_clear_line(tmp_path):
    import subprocess
    import sys

    # no credentials anywhere: no AWS_* variables, an empty home, no instance metadata
    # service (which botocore would otherwise ask at a non-loopback address)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(HOME=str(tmp_path), AWS_EC2_METADATA_DISABLED="true",
               AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"))
    opts = json.dumps({"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}})
    url = "s3://bucket/run.siff"
    r = subprocess.run([sys.executable, "-m", "siff_xarray.cli", "index", url,
                        "--storage-options", opts], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 2, r.stderr
    assert f"{url}: no credentials for this bucket" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    script = ("import json, sys\nfrom siff_xarray import store as zs\n"
              "from siff_xarray.errors import RemoteAccessError\n"
              f"opts = json.loads({opts!r})\n"
              "try:\n"
              f"    zs.open_converted('s3://bucket/run.zarr', storage_options=opts)\n"
              "except RemoteAccessError as e:\n"
              "    print(e)\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       env=env, timeout=120)
    assert "s3://bucket/run.zarr: no credentials for this bucket" in r.stdout, r.stderr


def test_conversion_from_http_reads_the_file_once_in_a_few_large_ranges(http_server,
                                                                        tmp_path):
    """A conversion reads each batch's frames, descriptions included, as a few spans.

    Before: each batch's checks of the source's ends read ahead a whole block at
    each end through a file object (5 MiB over HTTP, 50 MiB on S3: 4.4x this file's
    bytes with its index cached), and the frame descriptions were read with one
    request per frame at the start (497 requests for these 1,400 frames).
    """
    import siff_xarray.store as zs

    t = write_siff(tmp_path / "session.siff", shape=(64, 32), channels=(1, 2), n_slices=6,
                   n_flyback=1, n_timepoints=100, photons_per_frame=600, seed=2)
    url = f"{http_server.url}/session.siff"
    size = os.path.getsize(t.path)
    zs.convert(url, tmp_path / "first.zarr", progress=False)  # the index is cached now
    sent, req = http_server.bytes_sent, http_server.requests + http_server.heads
    zs.convert(url, tmp_path / "second.zarr", progress=False)
    assert http_server.bytes_sent - sent <= 1.3 * size, (http_server.bytes_sent - sent) / size
    assert http_server.requests + http_server.heads - req <= 40
    assert zs.verify(t.path, tmp_path / "second.zarr") == []  # descriptions included
    with xr.open_dataset(t.path, engine="siff", partial_volume="keep") as local:
        got = zs.open_converted(tmp_path / "second.zarr", partial_volume="keep")
        np.testing.assert_array_equal(got.intensity.values, local.intensity.values)


@pytest.mark.parametrize("direct", [True, False], ids=["ranges", "fsspec"])
@pytest.mark.parametrize("change", ["rewritten", "shorter", "longer"])
def test_a_remote_source_that_changes_stops_the_conversion(http_server, tmp_path, change,
                                                           direct, monkeypatch):
    """Each batch checks the source (size, ETag and both ends at once) before it
    decodes: through two range requests of its own, or through fsspec where the
    URL's reads are left to fsspec."""
    from siff_xarray.errors import ConversionError
    from siff_xarray.reader.source import FsspecSource

    monkeypatch.setattr(FsspecSource, "direct_http", direct)

    kw = {"shape": (12, 10), "channels": (1, 2), "n_slices": 2, "n_flyback": 1,
          "n_timepoints": 6, "photons_per_frame": 300}
    p = tmp_path / "c.siff"
    write_siff(p, seed=1, **kw)
    size = p.stat().st_size
    volume = 2 * 3 * 12 * 10 * 2

    def change_after_first_batch(progress):
        if progress.batches_done != 1:
            return
        if change == "rewritten":  # another acquisition of the same layout
            write_siff(p, seed=2, **kw)
        elif change == "shorter":
            os.truncate(p, size - 100)
        else:
            with open(p, "ab") as fh:
                fh.write(b"\0" * 100)

    with pytest.raises(ConversionError, match="changed since the conversion started"):
        zs.convert(f"{http_server.url}/c.siff", tmp_path / "c.zarr", scheduler="sync",
                   progress=change_after_first_batch, shard_bytes=2 * volume, chunk_bytes=1)


def test_a_remote_conversion_checks_its_source_with_two_ranges_and_no_head(
        http_server, s3_server, s3_latency, tmp_path):
    """The check of the source before and after every batch (and the start's
    fingerprint) asks for the file's first and last 64 KiB, whose answers carry its
    size and ETag: two requests, no HEAD (HeadObject from S3). Before: fsspec's
    info (a HEAD) and two GETs per check, on fsspec's event loop, which cost a
    conversion of the benchmark file about 0.4 s of CPU (18 checks)."""
    t = write_siff(tmp_path / "h.siff", shape=(16, 12), channels=(1, 2), n_slices=2,
                   n_flyback=1, n_timepoints=8, photons_per_frame=3000, seed=3)
    size = os.path.getsize(t.path)
    assert size > 2**17
    volume = 2 * 3 * 16 * 12 * 2
    kw = {"scheduler": "sync", "shard_bytes": volume, "chunk_bytes": 1}
    url = f"{http_server.url}/h.siff"
    zs.convert(url, tmp_path / "warm.zarr", **kw)  # (the index is cached now)
    heads, at = http_server.heads, len(http_server.log)
    summary = zs.convert(url, tmp_path / "h.zarr", **kw)
    assert summary.batches >= 8 and http_server.heads == heads
    tails = [r for r in http_server.log[at:] if r == ("/h.siff", size - 2**16, size)]
    assert len(tails) == 2 * summary.batches + 1, tails  # the start, before and after each
    assert zs.verify(t.path, tmp_path / "h.zarr") == []

    proxy, opts = s3_latency
    _, s3_url = _put_on_s3(s3_server, t.path, "check-bucket/h.siff")
    zs.convert(s3_url, tmp_path / "s3warm.zarr", storage_options=opts, **kw)
    before = dict(proxy.counts)
    summary = zs.convert(s3_url, tmp_path / "s3.zarr", storage_options=opts, **kw)
    assert proxy.counts.get("HEAD", 0) == before.get("HEAD", 0), (before, proxy.counts)
    gets = proxy.counts["GET"] - before["GET"]
    # the checks, a read of each batch's frames, the open's few
    assert gets <= 2 * (2 * summary.batches + 1) + summary.batches + 6, (gets, summary.batches)
    assert zs.verify(t.path, tmp_path / "s3.zarr") == []


def test_remote_conversion_opens_its_source_once_per_worker_thread(http_server, tmp_path,
                                                                   monkeypatch):
    """Opening a remote file costs a round trip (four requests); each batch checks the
    source's fingerprint anyway, so a worker thread keeps its source for the run's next
    batches and closes it when the run ends (or when a batch fails). The source the
    run's start opened (its checks and plan) is the first batch's."""
    from siff_xarray.reader.acquisition import Acquisition
    from siff_xarray.store import converter as conv

    t = write_siff(tmp_path / "k.siff", shape=(16, 12), channels=(1, 2), n_slices=2,
                   n_flyback=1, n_timepoints=8, photons_per_frame=300, seed=3)
    url = f"{http_server.url}/k.siff"
    opened, where = [], []
    real = Acquisition.open

    def opening(*a, **k):
        where.append(threading.current_thread().name)
        opened.append(real(*a, **k))
        return opened[-1]

    monkeypatch.setattr(Acquisition, "open", opening)
    volume = 2 * 3 * 16 * 12 * 2
    summary = zs.convert(url, tmp_path / "k.zarr", scheduler="sync", shard_bytes=volume,
                         chunk_bytes=1)
    assert summary.batches >= 8 and len(opened) == 1
    assert conv._runs == {} and all(f.files[0]._source.closed for f in opened)
    assert zs.verify(t.path, tmp_path / "k.zarr") == []
    opened.clear()
    where.clear()
    zs.convert(url, tmp_path / "t.zarr", scheduler="threads", num_workers=2,
               shard_bytes=volume, chunk_bytes=1)
    # the start's, and the other thread's, opened while the store was laid out: no
    # batch opened one (the second thread's first batch used to, and waited for it)
    assert len(opened) == 2 and conv._runs == {}
    assert where[0] == "MainThread" and where[1].startswith("siff-xarray-open"), where
    assert all(f.files[0]._source.closed for f in opened)
    assert zs.verify(t.path, tmp_path / "t.zarr") == []

    def fail_in_batch_3(p):  # a batch that fails closes its source at once
        if p.batches_done == 3:
            os.truncate(t.path, os.path.getsize(t.path) - 10)

    from siff_xarray.errors import ConversionError

    opened.clear()
    with pytest.raises(ConversionError, match="changed since"):
        zs.convert(url, tmp_path / "f.zarr", scheduler="sync", shard_bytes=volume,
                   chunk_bytes=1, progress=fail_in_batch_3)
    assert conv._runs == {} and all(f.files[0]._source.closed for f in opened)
    # two threads: the one still converting when the other failed closes its source
    # when its batch ends (the run is gone), and no source is left holding bytes
    t = write_siff(tmp_path / "k.siff", shape=(16, 12), channels=(1, 2), n_slices=2,
                   n_flyback=1, n_timepoints=8, photons_per_frame=300, seed=3)
    opened.clear()
    with pytest.raises(ConversionError, match="changed since"):
        zs.convert(url, tmp_path / "g.zarr", scheduler="threads", num_workers=2,
                   shard_bytes=volume, chunk_bytes=1, progress=fail_in_batch_3)
    deadline = time.monotonic() + 10
    while not all(f.files[0]._source.closed for f in opened) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert conv._runs == {} and opened and all(f.files[0]._source.closed for f in opened)


def test_a_remote_conversion_starts_its_first_batch_after_two_round_trips(
        http_server, tmp_path, monkeypatch):
    """The start of a remote conversion (its check for unread bytes, fingerprint, plan
    and the Dataset its metadata come from) opens the source once, asks for the
    fingerprint's ends (their answers carry size and ETag) at once, and lends the open
    source to the first batch, which is fetching its frames before it starts.

    Before: six rounds of requests before the first batch started (the check, the
    plan and the Dataset each opened the file, the fingerprint took three dependent
    requests), and the first batch then opened the file again. (A first version of
    the change built the Dataset on the open files, and Dask's tokenizing of its
    lazy arrays reopened the file six times: the template's arrays are named.)
    """
    from conftest import _chain

    from siff_xarray.reader.acquisition import Acquisition
    from siff_xarray.reader.source import FsspecSource
    from siff_xarray.store import converter as conv

    t = write_siff(tmp_path / "s.siff", shape=(32, 32), channels=(1, 2), n_slices=2,
                   n_flyback=1, n_timepoints=6, photons_per_frame=20000, seed=6)
    url = f"{http_server.url}/s.siff"
    with SiffFile(t.path) as f:
        first_frame = (int(f.index.data_start[0]), int(f.index.data_stop[0]))
    opened, real_open = [], Acquisition.open
    monkeypatch.setattr(Acquisition, "open",
                        lambda *a, **k: opened.append(real_open(*a, **k)) or opened[-1])
    # when the start ended (its source lent to the first batch), and the spans asked
    # for ahead by the time the first batch started
    started, spans, at_batch = [], [], []
    real_pass, real_need, real_batch = (conv._RunSources.pass_on, FsspecSource.will_need,
                                        conv._write_batch)

    def passing(run, f, plan):
        started.append(len(http_server.arrivals))
        return real_pass(run, f, plan)

    def recording(plan_json, b, run_id, tails=None):
        at_batch.append(len(spans))
        return real_batch(plan_json, b, run_id, tails)

    monkeypatch.setattr(conv._RunSources, "pass_on", passing)
    # (the other thread's source opens beside the start, its requests in rounds of their
    # own when they miss the fingerprint's: it is
    # test_remote_conversion_opens_its_source_once_per_worker_thread's; here the start's)
    monkeypatch.setattr(conv, "_open_spares", lambda *a, **k: [])
    monkeypatch.setattr(FsspecSource, "will_need",
                        lambda self, a, z: (spans.append((a, z)), real_need(self, a, z))[1])
    monkeypatch.setattr(conv, "_write_batch", recording)
    volume = 2 * 3 * 32 * 32 * 2
    zs.convert(url, tmp_path / "warm.zarr", scheduler="sync", shard_bytes=volume,
               chunk_bytes=1)  # (the index is cached now, as for every later open)
    http_server.latency = 0.05
    for scheduler in ("sync", "threads"):
        opened.clear()
        started.clear()
        spans.clear()
        at_batch.clear()
        at = len(http_server.arrivals)
        dst = tmp_path / f"{scheduler}.zarr"
        zs.convert(url, dst, scheduler=scheduler, num_workers=2, shard_bytes=volume,
                   chunk_bytes=1)
        # the open (header with tail and the checked IFDs), then the fingerprint
        assert _chain(http_server.spans[at:started[0]]) == 2, scheduler
        if scheduler == "sync":
            assert len(opened) == 1
        # the first frame was asked for before the first batch started
        assert any(a <= first_frame[0] and first_frame[1] <= z
                   for a, z in spans[:at_batch[0]]), (spans, at_batch)
        assert zs.verify(t.path, dst) == [] and conv._runs == {}


def test_an_s3_conversion_starts_its_first_batch_after_three_round_trips(
        s3_server, s3_latency, tmp_path, monkeypatch):
    """From S3 the start is the open (presigned ranges: header, tail, the checked
    IFDs), the fingerprint (both ends, whose answers carry size and ETag) and the sidecar's
    upload (while the plan is made), and its open is the first batch's (no other
    open before it). The fingerprint is taken while the store is claimed and the
    sidecar goes once the Dataset is built: where that takes less than a round trip
    they go together (two rounds), else one after the other (three)."""
    from conftest import _chain

    from siff_xarray.reader.acquisition import Acquisition
    from siff_xarray.store import converter as conv

    proxy, opts = s3_latency
    t = write_siff(tmp_path / "s3c.siff", shape=(32, 32), channels=(1, 2), n_slices=2,
                   n_flyback=1, n_timepoints=6, photons_per_frame=5000, seed=8)
    fs, url = _put_on_s3(s3_server, t.path, "conv-bucket/s3c.siff")
    opened, started = [], []
    real_open, real_pass = Acquisition.open, conv._RunSources.pass_on
    monkeypatch.setattr(Acquisition, "open",
                        lambda *a, **k: opened.append(real_open(*a, **k)) or opened[-1])

    def passing(run, f, plan):
        started.append(len(proxy.arrivals))
        return real_pass(run, f, plan)

    monkeypatch.setattr(conv._RunSources, "pass_on", passing)
    volume = 2 * 3 * 32 * 32 * 2
    zs.convert(url, tmp_path / "warm.zarr", scheduler="sync", shard_bytes=volume,
               chunk_bytes=1, storage_options=opts)  # (the index is cached now)
    proxy.latency = 0.05
    fs.rm("conv-bucket/s3c.siff.siffidx")  # (the open uses the index cache)
    opened.clear()
    started.clear()
    at = len(proxy.arrivals)
    zs.convert(url, tmp_path / "s3.zarr", scheduler="sync", shard_bytes=volume,
               chunk_bytes=1, storage_options=opts)
    assert 2 <= _chain(proxy.spans[at:started[0]]) <= 3
    assert len(opened) == 1 and fs.exists("conv-bucket/s3c.siff.siffidx")
    assert zs.verify(t.path, tmp_path / "s3.zarr") == [] and conv._runs == {}


def test_one_filesystem_per_process_and_options_whatever_the_thread(s3_server):
    """:func:`filesystem` shares instances with an asynchronous implementation across
    threads; other options, options a URL carries, ``skip_instance_cache`` and
    filesystems without one get their own."""
    from concurrent.futures import ThreadPoolExecutor

    from siff_xarray._remote import filesystem

    opts = {**s3_server, "config_kwargs": {"user_agent_extra": "shared-test"}}
    url = "s3://some-bucket/run.siff"
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda _: filesystem(url, opts), range(8)))
    assert len({id(fs) for fs, _ in got}) == 1 and {p for _, p in got} == {"some-bucket/run.siff"}
    fs = got[0][0]
    assert fs.retries == 1  # (tuned)
    assert fs.config_kwargs["connect_timeout"] > 0  # (with_timeouts)
    assert filesystem("s3://other/x.siff", opts)[0] is fs  # another object, same options
    assert filesystem(url, {**opts, "anon": True})[0] is not fs
    versioned, path = filesystem(url + "?versionId=abc", opts)
    assert versioned is not fs and versioned.version_aware and path.endswith("?versionId=abc")
    own = [filesystem(url, {**opts, "skip_instance_cache": True})[0] for _ in range(2)]
    assert own[0] is not own[1] and fs not in own
    local, path = filesystem("/tmp/x.siff", None)  # (no asynchronous implementation)
    assert type(local).__name__ == "LocalFileSystem" and path == "/tmp/x.siff"


def test_zarrs_and_the_pinned_reads_filesystems_are_shared_by_their_own_keys(s3_server):
    """zarr's stores (:func:`async_filesystem`) and version-pinned reads
    (:func:`pinning_filesystem`) have one instance each per process and options,
    apart from each other and from :func:`filesystem`'s; options a URL carries
    are part of the key; zarr's is shared even when the options skip fsspec's
    instance cache (the caller asked for an instance apart from its own)."""
    from concurrent.futures import ThreadPoolExecutor

    from siff_xarray._remote import (
        PinnedS3Kwargs,
        async_filesystem,
        filesystem,
        pinning_filesystem,
    )

    opts = {**s3_server, "config_kwargs": {"user_agent_extra": "shared-by-use"}}
    url = "s3://some-bucket/run.siff"
    for make in (async_filesystem, pinning_filesystem):
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda _, make=make: make(url, opts), range(8)))
        assert len({id(fs) for fs in got}) == 1
        fs = got[0]
        assert fs is not filesystem(url, opts)[0] and fs.retries == 1
        assert fs.config_kwargs["connect_timeout"] > 0
        assert make("s3://other/x.siff", opts) is fs
        assert make(url, {**opts, "anon": True}) is not fs
        versioned = make(url + "?versionId=abc", opts)
        assert versioned is not fs and versioned.version_aware
    zarrs = async_filesystem(url, opts)
    assert zarrs.asynchronous and zarrs is not pinning_filesystem(url, opts)
    skipping = {**opts, "skip_instance_cache": True}
    assert async_filesystem(url, skipping) is async_filesystem(url, skipping)
    assert isinstance(pinning_filesystem(url, opts).s3_additional_kwargs, PinnedS3Kwargs)
    assert not isinstance(filesystem(url, opts)[0].s3_additional_kwargs, PinnedS3Kwargs)
    assert async_filesystem("simplecache::" + url, opts) is None
    assert async_filesystem("/tmp/x.siff", None) is None


def test_a_filesystem_without_an_async_implementation_is_made_once_per_call(monkeypatch):
    """A protocol fsspec has no asynchronous implementation of is not shared: each
    call hands fsspec's own instance back, made once (it was made twice)."""
    import fsspec

    from siff_xarray import _remote

    real = fsspec.core.url_to_fs
    calls = []
    monkeypatch.setattr(fsspec.core, "url_to_fs",
                        lambda url, **kw: calls.append(url) or real(url, **kw))
    fs, path = _remote.filesystem("memory://bucket/one-call.siff", None)
    assert calls == ["memory://bucket/one-call.siff"]
    assert path == "/bucket/one-call.siff" and not getattr(fs, "async_impl", False)
    assert fs is real("memory://x")[0]  # (fsspec's instance, as it is)


def test_an_s3_conversion_makes_one_client_per_filesystem_whatever_the_threads(
        s3_server, tmp_path, monkeypatch):
    """fsspec keeps an S3 filesystem per thread, and each new one makes its botocore
    client (0.1 s of CPU: botocore's models) and its connections again. A
    conversion's batches and checks run in threads of their own: one client for its
    synchronous calls, one for the reads that require the source's version (moto
    answers ranges that s3fs reads) and one for zarr's, however many threads ask, and
    none more in the process's next conversion."""
    import aiobotocore.session

    t = write_siff(tmp_path / "clients.siff", shape=(32, 32), channels=(1, 2), n_slices=2,
                   n_flyback=1, n_timepoints=8, photons_per_frame=2000, seed=9)
    # options no other test uses: this test's filesystems are its own
    opts = {**s3_server, "config_kwargs": {"user_agent_extra": f"clients-{tmp_path.name}"}}
    _, url = _put_on_s3(s3_server, t.path, "clients-bucket/clients.siff")
    made = []
    real = aiobotocore.session.AioSession._create_client

    async def counted(self, *args, **kwargs):
        made.append(threading.current_thread().name)
        return await real(self, *args, **kwargs)

    monkeypatch.setattr(aiobotocore.session.AioSession, "_create_client", counted)
    volume = 2 * 3 * 32 * 32 * 2
    for k in range(2):
        zs.convert(url, "s3://clients-bucket/out.zarr", overwrite=True, scheduler="threads",
                   num_workers=2, shard_bytes=volume, storage_options=opts,
                   target_options=opts)
        assert zs.verify(t.path, "s3://clients-bucket/out.zarr", target_options=opts) == []
        if k == 0:
            assert len(made) == 3, made
            made.clear()
    assert made == []  # (verify's own reads included)


def test_an_s3_to_s3_conversion_overlaps_its_start_with_the_sources_round_trips(
        s3_server, s3_latency, tmp_path, monkeypatch):
    """From S3 to S3 the start's requests to the source run beside those to the store:
    the source opens while the store is listed, and its fingerprint is taken while
    the store is claimed. Both were in a row before: 11-12 round trips from the
    call to the first batch, then 9 (the listing also lists the bucket where the store is
    absent, as s3fs does), then 7: the metadata and the plan's record are written while
    the first batches decode; now 6: the store is listed with one request."""
    from conftest import _chain

    from siff_xarray.store import converter as conv

    proxy, opts = s3_latency
    t = write_siff(tmp_path / "both.siff", shape=(32, 32), channels=(1, 2), n_slices=2,
                   n_flyback=1, n_timepoints=6, photons_per_frame=5000, seed=8)
    _, url = _put_on_s3(s3_server, t.path, "both-bucket/both.siff")
    started = []
    real_pass = conv._RunSources.pass_on

    def passing(run, f, plan):
        started.append(len(proxy.arrivals))
        return real_pass(run, f, plan)

    monkeypatch.setattr(conv._RunSources, "pass_on", passing)
    volume = 2 * 3 * 32 * 32 * 2
    dst = "s3://both-bucket/out.zarr"
    kw = dict(scheduler="threads", num_workers=2, shard_bytes=volume, chunk_bytes=1,
              storage_options=opts, target_options=opts)
    zs.convert(url, dst, **kw)  # (the index is cached now, the sidecar written)
    fs = _put_on_s3(s3_server, t.path, "both-bucket/other.siff")[0]
    fs.rm("both-bucket/out.zarr", recursive=True)
    # (long, so that the CPU between one side's requests rarely moves them into a round
    # of their own: 6 where the two sides' requests go out together; at 50 ms a loaded
    # machine counted 2 more)
    proxy.latency = 0.2
    started.clear()
    at = len(proxy.arrivals)
    zs.convert(url, dst, **kw)
    assert _chain(proxy.spans[at:started[0]]) <= 7
    proxy.latency = 0.0
    assert zs.verify(t.path, dst, target_options=opts) == [] and conv._runs == {}
    # a store that refuses the run: the early open's error is not the one raised
    with pytest.raises(ConversionError, match="a finished store exists"):
        zs.convert("s3://both-bucket/missing.siff", dst, **kw)
    # a store that takes it: the open's error, and nothing written
    with pytest.raises(FileNotFoundError, match=re.escape("s3://both-bucket/missing.siff")):
        zs.convert("s3://both-bucket/missing.siff", "s3://both-bucket/new.zarr", **kw)
    assert not fs.exists("both-bucket/new.zarr")


def test_a_new_store_on_s3_is_listed_once_and_a_long_listing_is_read_in_pages(
        s3_server, s3_latency, tmp_path):
    """Where nothing is under a path, s3fs's ``ls`` lists its parent too: a new store's
    first listing took two round trips. The store's listing is one ListObjectsV2 per
    1,000 names, and gives what ``ls`` gives."""
    from siff_xarray.store.layout import Target

    proxy, opts = s3_latency
    t = write_siff(tmp_path / "l.siff", shape=(16, 16), n_timepoints=2, seed=4)
    fs, url = _put_on_s3(s3_server, t.path, "list-bucket/l.siff")
    zs.convert(url, "s3://list-bucket/warm.zarr", storage_options=opts, target_options=opts)
    at = len(proxy.log)
    zs.convert(url, "s3://list-bucket/new.zarr", storage_options=opts, target_options=opts)
    log = proxy.log[at:]
    claim = log.index(("GET", "/list-bucket/new.zarr/.siff-progress/owner.json"))
    listings = [p for _, p in log[:claim] if p.split("?")[0].rstrip("/") == "/list-bucket"]
    assert len(listings) == 1 and "prefix=new.zarr%2F" in listings[0], log[:claim]
    fs.pipe({f"list-bucket/many/k{i:04d}": b"x" for i in range(1003)})
    fs.pipe({"list-bucket/many/sub/a": b"y", "list-bucket/many/sub/b": b"y"})
    target = Target("s3://list-bucket/many", opts)
    at = len(proxy.log)
    got = target.listed()
    assert sum(p.split("?")[0] == "/list-bucket" for _, p in proxy.log[at:]) == 2  # pages
    fs.invalidate_cache()
    assert got == {n.rstrip("/")[len("list-bucket/many/"):] for n in
                   fs.ls("list-bucket/many", detail=False)}
    assert len(got) == 1004 and "sub" in got
    assert Target("s3://list-bucket/absent.zarr", opts).listed() == set()
    assert Target("s3://no-such-bucket-here/x.zarr", opts).listed() == set()


def test_remote_conversion_fetches_the_next_batch_while_writing(http_server, tmp_path,
                                                                 monkeypatch):
    """Under a threaded scheduler the batches run in order, and a batch that has read
    its bytes starts fetching the next batch's first bytes before it writes its
    results: no batch but the first waits a round trip for its first frames."""
    from siff_xarray.reader.source import FsspecSource
    from siff_xarray.store import converter as conv

    t = write_siff(tmp_path / "n.siff", shape=(32, 32), channels=(1, 2), n_slices=2,
                   n_flyback=1, n_timepoints=12, photons_per_frame=20000, seed=5)
    url = f"{http_server.url}/n.siff"
    with SiffFile(t.path) as f:
        offsets = f.index.data_stop - 1  # the last byte of each frame
    started, mark, spans = {}, {}, []
    real, real_need = conv._write_batch, FsspecSource.will_need
    # spans asked to be fetched ahead, when asked (the request may leave a little later)
    monkeypatch.setattr(FsspecSource, "will_need",
                        lambda self, a, z: (spans.append((a, z)), real_need(self, a, z))[1])

    def recording(plan_json, b, run_id, tails=None):
        f0 = conv.Plan.from_json(plan_json).batch_frames[b][0]
        mark.setdefault("first", len(spans))  # (what the open asked for does not count)
        started[b] = any(a <= offsets[f0] < z for a, z in spans[mark["first"]:])
        return real(plan_json, b, run_id, tails)

    monkeypatch.setattr(conv, "_write_batch", recording)
    volume = 2 * 3 * 32 * 32 * 2
    moved, threaded = {}, conv._THREADED
    for scheduler, workers, ordered in (("sync", None, False), ("sync", None, True),
                                        ("threads", 2, True)):
        monkeypatch.setattr(conv, "_THREADED", threaded if ordered else ())
        started.clear()
        mark.clear()
        spans.clear()
        dst = tmp_path / f"{scheduler}{ordered}.zarr"
        sent = http_server.bytes_sent
        summary = zs.convert(url, dst, scheduler=scheduler, num_workers=workers,
                             shard_bytes=volume, chunk_bytes=1)
        moved[scheduler, ordered] = http_server.bytes_sent - sent
        assert summary.batches >= 10 and sorted(started) == list(range(summary.batches))
        assert zs.verify(t.path, dst) == [] and conv._runs == {}
        ahead = [b for b, was in started.items() if was]
        if not ordered:  # batches in dask's order: most ask for their frames once started
            assert len(ahead) < summary.batches - 1, started  # (some, a neighbour's
            continue                                          # read-ahead before)
        # every batch but those the first threads started had its first frame asked for
        assert len(ahead) >= summary.batches - (workers or 1), (scheduler, started)
        # and no more bytes move than when each batch fetches its own (the source's
        # checks read both ends of the file: many times the frames of this small file)
        assert moved[scheduler, ordered] <= 1.02 * moved["sync", False], moved


@pytest.mark.slow
def test_a_distributed_conversion_fetches_each_chains_next_batch_ahead(
        http_server, tmp_path, monkeypatch):
    """On dask.distributed a worker's next batch is the scheduler's choice: a task of
    one batch asked for its first bytes only when it started (a round trip and the
    first sub-batch's transfer per batch). A task now converts a chain of
    consecutive batches, each fetching the next one's first bytes while it ends."""
    distributed = pytest.importorskip("distributed")
    from siff_xarray.reader.source import FsspecSource
    from siff_xarray.store import converter as conv

    t = write_siff(tmp_path / "d.siff", shape=(32, 32), channels=(1, 2), n_slices=2,
                   n_flyback=1, n_timepoints=16, photons_per_frame=20000, seed=6)
    url = f"{http_server.url}/d.siff"
    with SiffFile(t.path) as f:
        offsets = f.index.data_stop - 1  # the last byte of each frame
    started, spans, chains, mark = {}, [], [], [0]
    real, real_need, real_chains = conv._write_batch, FsspecSource.will_need, conv._chains
    monkeypatch.setattr(FsspecSource, "will_need",
                        lambda self, a, z: (spans.append((a, z)), real_need(self, a, z))[1])

    # (the worker's one thread: batches in turn)
    def recording(plan_json, b, run_id, tails=None):
        f0 = conv.Plan.from_json(plan_json).batch_frames[b][0]
        # asked for since the batch before started (that one's frames, and this one's
        # first ones if it fetched them ahead)
        started[b] = any(a <= offsets[f0] < z for a, z in spans[mark[0]:])
        mark[0] = len(spans)
        return real(plan_json, b, run_id, tails)

    monkeypatch.setattr(conv, "_write_batch", recording)
    monkeypatch.setattr(conv, "_chains", lambda *a: chains.extend(real_chains(*a)) or chains)
    volume = 2 * 3 * 32 * 32 * 2
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        summary = zs.convert(url, tmp_path / "d.zarr", scheduler=client,
                             shard_bytes=volume, chunk_bytes=1)
    assert summary.batches == 16 and sorted(started) == list(range(16))
    assert sorted(b for c in chains for b in c) == list(range(16))
    assert max(map(len, chains)) == conv.CHAIN_BATCHES  # (16 // (2 x 1 thread): 4)
    # every batch but a chain's first had its first frame asked for before it started
    later = [b for c in chains for b in c[1:]]
    assert all(started[b] for b in later), (chains, started)
    assert not any(started[c[0]] for c in chains), (chains, started)
    assert zs.verify(t.path, tmp_path / "d.zarr") == [] and conv._runs == {}


def test_a_remote_conversion_predicts_no_reads_and_moves_each_frame_once(
        http_server, tmp_path, monkeypatch):
    """A conversion asks for what its batches read next itself. The parts' stride
    predictor (for Dask chunks) took a thread's batches, same-shaped sub-batches a
    constant stride apart, for a run to follow and fetched the first bytes of
    batches far ahead, which the other thread's source then read again (at the
    walkthrough's size 128-336 MB moved twice in two of five conversions)."""
    from siff_xarray.reader.source import FsspecSource

    t = write_siff(tmp_path / "p.siff", shape=(32, 32), channels=(1, 2), n_slices=2,
                   n_flyback=1, n_timepoints=24, photons_per_frame=20000, seed=7)
    url = f"{http_server.url}/p.siff"
    predicted = []
    real = FsspecSource.expect
    monkeypatch.setattr(FsspecSource, "expect",
                        lambda self, a, z: (predicted.append((a, z)), real(self, a, z))[1])
    volume = 2 * 3 * 32 * 32 * 2
    zs.convert(url, tmp_path / "warm.zarr", scheduler="sync", shard_bytes=volume,
               chunk_bytes=1)  # (the index is cached now)
    for scheduler in ("sync", "threads"):
        predicted.clear()
        at = len(http_server.log)
        dst = tmp_path / f"{scheduler}.zarr"
        summary = zs.convert(url, dst, scheduler=scheduler, num_workers=2,
                             shard_bytes=volume, chunk_bytes=1)
        assert summary.batches >= 20 and predicted == [], (scheduler, len(predicted))
        # the frames' bytes move once: ranges of more than the checks' 64 KiB ends
        # never overlap (the open's and checks' small ranges may repeat)
        big = sorted((a, z) for _, a, z in http_server.log[at:] if z - a > 2**16 + 1)
        assert all(z <= a2 for (_, z), (a2, _) in itertools.pairwise(big)), scheduler
        assert zs.verify(t.path, dst) == []
    # Dask reads of the same file still predict (the predictor is the converter's to
    # turn off, not the file's)
    forget()
    with xr.open_dataset(url, engine="siff", chunks={}, chunk_bytes=2 * volume) as ds:
        ds.intensity.mean(("y", "x")).compute(scheduler="threads", num_workers=2)
    assert predicted


def test_run_sources_hand_a_reserved_batch_on_with_its_source():
    """A batch near its end reserves the next one (its source fetches that batch's
    first bytes); no other thread takes it meanwhile, one that finds nothing else
    waits (take gives None), and the batch goes with the source that fetched it;
    a failed batch gives its reservation back."""
    from siff_xarray.errors import ConversionError
    from siff_xarray.store.converter import _RunSources

    class Src:
        def prefetch(self, frames):
            pass

        frame_bytes = np.ones(10, dtype=np.int64)

        def parts_ahead(self):
            return 4

    class P:
        batch_frames = ((0, 2), (2, 4), (4, 6), (6, 8))

    a, b = Src(), Src()
    run = _RunSources([0, 1, 2, 3])
    assert run.take() == 0 and run.take() == 1
    assert run.reserve(a) == 2 and run.reserve(a) == 2  # (asked again: the same)
    assert run.reserve(b) == 3
    assert run.take() is None  # both left are reserved: wait for their sources
    run.unreserve(b)  # b's batch failed: batch 3 goes back
    assert run.take() == 3 and run.source(3) is None  # (no source holds its bytes)
    run.pass_on(a, P())  # a read its batch's last byte: batch 2 goes with it
    assert run.take() == 2 and run.source(2) is a
    with pytest.raises(ConversionError, match="no batch left"):
        run.take()


@pytest.mark.parametrize("per_batch", [3, 6, 12])
def test_a_remote_conversion_fetches_a_batch_ahead_and_more_on_a_far_link(
        http_server, tmp_path, monkeypatch, per_batch):
    """Sub-batches on their way while one decodes: PARTS_AHEAD, twice that on a far
    link, and at least a batch's (at most twice PARTS_AHEAD), across the batches:
    a batch near its end asks for the next one's first sub-batches. Before, the
    window ended with each batch (the next batch's asked for when it had read its
    last byte) and held PARTS_AHEAD whatever the batches' size, so the next
    batch's later sub-batches were asked for only when it decoded."""
    from siff_xarray.reader import http_ranges
    from siff_xarray.reader.acquisition import Acquisition
    from siff_xarray.reader.source import PARTS_AHEAD
    from siff_xarray.store import converter as conv

    t = write_siff(tmp_path / "c.siff", shape=(16, 16), n_timepoints=40,
                   photons_per_frame=300, seed=2)
    monkeypatch.setattr(conv, "SUB_BATCH_BYTES", 1)  # a frame each
    real_prefetch, real_decode = Acquisition.prefetch, Acquisition.decode_into
    events = []
    monkeypatch.setattr(Acquisition, "prefetch", lambda self, fr: (
        events.append(("ahead", int(fr[0]))), real_prefetch(self, fr))[1])
    monkeypatch.setattr(Acquisition, "decode_into", lambda self, fr, *a: (
        events.append(("decode", int(fr[0]))), real_decode(self, fr, *a))[1])
    most = {}
    for name, first in (("near", 0.02), ("far", 0.05)):
        monkeypatch.setattr(http_ranges.Link, "first_byte_s", property(lambda _, s=first: s))
        events.clear()
        summary = zs.convert(f"{http_server.url}/c.siff", tmp_path / f"{name}.zarr",
                             scheduler="sync", shard_bytes=per_batch * 16 * 16 * 2,
                             chunk_bytes=1)
        assert summary.batches >= 40 // per_batch
        assert zs.verify(t.path, tmp_path / f"{name}.zarr") == []
        # sub-batches asked for ahead of each one that decodes (distinct, still to come)
        ahead = [len({g for w, g in events[:k] if w == "ahead" and g > fr})
                 for k, (what, fr) in enumerate(events) if what == "decode"]
        most[name] = max(ahead)
        # as many in every batch but the last ones (fewer sub-batches left), near a
        # batch's end too; at least the next batch's where the window is longer
        body = ahead[:-2 * per_batch]
        assert body and min(body) >= min(most[name], per_batch), ahead
    window = {"near": max(PARTS_AHEAD, min(per_batch, 2 * PARTS_AHEAD)),
              "far": 2 * PARTS_AHEAD}
    # (the window runs into the next batch, not the one after it)
    assert most == {k: min(w, 2 * per_batch - 1) for k, w in window.items()}, most


def test_a_remote_split_acquisition_converts_in_order_across_its_parts(http_server,
                                                                        tmp_path):
    """Batches taken in order, each fetching the next one's first frames ahead, give
    the store of the whole file where batches and volumes straddle the part files."""
    from siff_xarray.store import converter as conv

    kw = dict(shape=(16, 12), channels=(1, 2), n_slices=2, n_flyback=1, n_timepoints=10,
              photons_per_frame=400, seed=13)
    whole = write_siff(tmp_path / "whole.siff", **kw)
    split = write_siff(tmp_path / "run.siff", frames_per_file=11, **kw)  # volumes straddle
    assert len(split.paths) >= 5
    urls = [f"{http_server.url}/{Path(p).name}" for p in split.paths]
    volume = 2 * 3 * 16 * 12 * 2
    summaries = zs.convert(urls, tmp_path / "out", scheduler="threads", num_workers=2,
                           shard_bytes=volume, chunk_bytes=1)
    [summary] = summaries  # the parts are one acquisition: one store
    assert summary.frames == whole.n_frames and summary.batches >= 8
    store = tmp_path / "out" / "run.zarr"
    assert zs.verify(split.paths, store) == [] and conv._runs == {}
    with zs.open_converted(store) as ds, xr.open_dataset(whole.path, engine="siff") as one:
        np.testing.assert_array_equal(ds.intensity.values, one.intensity.values)


def test_the_parts_of_a_remote_acquisition_open_at_once(http_server, tmp_path):
    """Each part's open waits a round trip or more, so the parts of a split
    acquisition open together (as a Dataset and for a conversion): the whole
    acquisition opens in one part's round trips. Before: one part after the other
    (six parts at 50 ms: six rounds). A missing part is named."""
    from siff_xarray.reader.acquisition import Acquisition

    kw = dict(shape=(16, 12), channels=(1, 2), n_slices=2, n_flyback=1, n_timepoints=10,
              photons_per_frame=400, seed=14)
    split = write_siff(tmp_path / "run.siff", frames_per_file=11, **kw)
    assert len(split.paths) >= 5
    urls = [f"{http_server.url}/{Path(p).name}" for p in split.paths]
    with open_acquisition(urls) as ds:  # each part walked once; their indexes cached
        want = ds.load()
    http_server.latency = 0.05

    def rounds(open_them, check=lambda got: None):
        forget()
        at = len(http_server.arrivals)
        with open_them() as got:
            trips = http_server.round_trips(at)
            check(got)
        return trips

    one = rounds(lambda: open_acquisition(urls[:1]))
    assert one >= 1
    assert rounds(lambda: open_acquisition(urls),
                  lambda got: xr.testing.assert_identical(got.load(), want)) == one

    def every_frame(got):
        assert got.num_frames == split.n_frames

    assert rounds(lambda: Acquisition.open(urls), every_frame) == one
    missing = [*urls[:2], f"{http_server.url}/gone.siff", *urls[2:]]
    with pytest.raises(FileNotFoundError, match=r"gone\.siff"):
        open_acquisition(missing)
    with pytest.raises(FileNotFoundError, match=r"gone\.siff"):
        Acquisition.open(missing)


def test_a_remote_conversion_that_needs_wide_arrival_times_runs_again(http_server,
                                                                       tmp_path):
    """Arrival times above 65535 show only while decoding: the run starts again with
    uint32 under the same run id, taking its batches in order again."""
    import zarr

    from siff_xarray.store import converter as conv

    t = write_siff(tmp_path / "w.siff", shape=(8, 8), n_timepoints=12, tau_bins=30000,
                   overflow_fraction=0.2, encoding="raw", photons_per_frame=300)
    assert t.arrival.max() > 65535
    dst = tmp_path / "w.zarr"
    summary = zs.convert(f"{http_server.url}/w.siff", dst, scheduler="threads",
                         num_workers=2, shard_bytes=2 * 8 * 8 * 2, chunk_bytes=1)
    assert summary.batches >= 4
    assert zarr.open_array(str(dst), path="photons/arrival_time").dtype == np.uint32
    assert zs.verify(t.path, dst) == [] and conv._runs == {}


def _plane_file(tmp_path):
    """140 frames of ~100 kB in 7 planes: one plane's frames lie ~600 kB apart."""
    return write_siff(tmp_path / "planes.siff", shape=(64, 64), n_slices=7, n_flyback=0,
                      n_timepoints=20, photons_per_frame=12000, encoding="raw", seed=4)


def _link_of(server):
    from urllib.parse import urlsplit

    from siff_xarray.reader import http_ranges

    return http_ranges.link("http", "127.0.0.1", urlsplit(server.url).port)


def test_one_planes_frames_are_read_through_their_gaps_only_on_a_fast_link(
        http_server, tmp_path, monkeypatch):
    """A request per frame of one plane costs more than the other planes' bytes
    where the server is fast and far; where it is slow, only the frames are read."""
    from siff_xarray.reader.source import FsspecSource

    t = _plane_file(tmp_path)
    url = f"{http_server.url}/planes.siff"
    with xr.open_dataset(t.path, engine="siff") as local:
        want = local.intensity.isel(z=3).values
        frames = local.frame_index.isel(z=3).values.ravel()
    with SiffFile(t.path) as f:
        asked = int((f.index.data_stop[frames] - f.index.ifd_offset[frames]).sum())
    link = _link_of(http_server)
    cache = tmp_path / "cache"
    moved = {}
    # (latency, rate) as measured: 20 ms and 50 MB/s (a home link), 20 ms and 2 GB/s
    for name, rate in (("slow", 50e6), ("fast", 2e9)):
        monkeypatch.setattr(link, "_first", [0.02] * link.KEEP)  # the reads' own samples
        monkeypatch.setattr(link, "_rate", [rate] * link.KEEP)   # do not outvote these
        with xr.open_dataset(url, engine="siff", index_cache=cache) as ds:
            req, sent = http_server.requests, http_server.bytes_sent
            np.testing.assert_array_equal(ds.intensity.isel(z=3).values, want)
            moved[name] = (http_server.requests - req, http_server.bytes_sent - sent)
    assert moved["slow"][0] >= 20 and moved["slow"][1] <= 1.1 * asked  # a GET per frame
    assert moved["fast"][0] <= 4  # the plane's stretch of the file, in 8 MiB parts
    assert asked * 5 < moved["fast"][1] <= asked * (1 + FsspecSource.coalesce_ratio)
    # a long read streams in parts of that many bytes of the file, not of the frames
    # (each part's gaps are held with it), fetched ahead as parts of all frames are
    spans = []
    real = FsspecSource.will_need
    monkeypatch.setattr(FsspecSource, "will_need",
                        lambda self, a, b: (spans.append(b - a), real(self, a, b)))
    monkeypatch.setattr(SiffFile, "stream_part_bytes", 2**20)
    with xr.open_dataset(url, engine="siff", index_cache=cache) as ds:
        np.testing.assert_array_equal(ds.intensity.isel(z=3).values, want)
    assert len(spans) >= 8 and max(spans) <= 2 * 2**20 + 2**18, spans
    monkeypatch.setattr(FsspecSource, "coalesce_ratio", 0)  # where transfer is billed
    with xr.open_dataset(url, engine="siff", index_cache=cache) as ds:
        req, sent = http_server.requests, http_server.bytes_sent
        np.testing.assert_array_equal(ds.intensity.isel(z=3).values, want)
        moved["off"] = (http_server.requests - req, http_server.bytes_sent - sent)
    assert moved["off"][0] >= 20 and moved["off"][1] <= 1.1 * asked


@pytest.mark.slow
def test_one_plane_on_fresh_cluster_workers_reads_the_planes_values(http_server, tmp_path,
                                                                    monkeypatch):
    """Workers have measured nothing of the link: each measures it with its own first
    reads (or reads only the frames), never walks the file, and gives the local values."""
    from siff_xarray.reader.source import FsspecSource

    t = write_siff(tmp_path / "planes.siff", shape=(64, 64), n_slices=7, n_flyback=0,
                   n_timepoints=60, photons_per_frame=12000, encoding="raw", seed=4)
    url = f"{http_server.url}/planes.siff"
    size = os.path.getsize(t.path)
    with xr.open_dataset(t.path, engine="siff") as local:
        want = local.intensity.isel(z=3).mean(("y", "x")).values
        frames = local.frame_index.isel(z=3).values.ravel()
    with SiffFile(t.path) as f:
        asked = int((f.index.data_stop[frames] - f.index.ifd_offset[frames]).sum())
    with _fresh_cluster(tmp_path, monkeypatch) as client, \
            xr.open_dataset(url, engine="siff", chunks={}, chunk_bytes=2**20) as ds:
        plane = ds.intensity.isel(z=3)
        assert plane.data.npartitions >= 4  # chunks of ~1.4 MB of frames ~630 kB apart
        n_log, sent = len(http_server.log), http_server.bytes_sent
        got = client.compute(plane.mean(("y", "x")).data, sync=True)
        ranges = http_server.log[n_log:]
        moved = http_server.bytes_sent - sent
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # each chunk: its frames, or its stretch of the file read through (within the
    # budget); no walk (a walk reads windows of the file from its start)
    assert asked <= moved <= (1 + FsspecSource.coalesce_ratio) * asked + size // 4, \
        (moved, asked, size)
    assert all(a >= 0 and b - a <= 8 * 2**20 for _, a, b in ranges)


def test_the_first_read_of_many_ranges_measures_the_servers_rate(http_server, tmp_path,
                                                                  monkeypatch):
    from siff_xarray.reader import http_ranges
    from siff_xarray.reader.source import FsspecSource

    t = _plane_file(tmp_path)
    url = f"{http_server.url}/planes.siff"
    with xr.open_dataset(t.path, engine="siff") as local:
        want = local.intensity.isel(z=2).values
        planes4 = local.intensity.isel(z=4).values
    with xr.open_dataset(url, engine="siff", index_cache=tmp_path / "cache"):
        pass  # the walk's windows measure the rate: the index is cached now
    monkeypatch.setattr(http_ranges, "_links", {})  # nothing measured in this process
    monkeypatch.setattr(FsspecSource, "rate_sample_bytes", 4 * 2**20)
    with xr.open_dataset(url, engine="siff", index_cache=tmp_path / "cache") as ds:
        link = _link_of(http_server)
        assert link.bytes_per_s is None  # the open made no read of many ranges
        req = len(http_server.log)
        np.testing.assert_array_equal(ds.intensity.isel(z=2).values, want)
        assert link.bytes_per_s is not None and link.first_byte_s is not None
        sampled = [b - a for _, a, b in http_server.log[req:] if b - a >= 2**18]
        assert len(sampled) >= 4 and sum(sampled) >= 2**21  # the sample, in parts
        # one sample far too low (taken while other reads shared the connections)
        # does not stick: reads sample again until three calls measured the rate
        monkeypatch.setattr(link, "_rate", [1e6])
        req = len(http_server.log)
        np.testing.assert_array_equal(ds.intensity.isel(z=4).values, planes4)
        sampled = [b - a for _, a, b in http_server.log[req:] if b - a >= 2**18]
        assert len(sampled) >= 4 and link.rate_samples >= 2 and link.bytes_per_s > 1e6


def test_a_link_measures_rates_from_large_requests_only():
    from siff_xarray.reader.http_ranges import Link

    link = Link()
    link.received(64 * 2**20, 1.0, 8, 1)
    assert link.bytes_per_s is None  # no latency measured yet
    link.answered(0.1)
    link.received(2**20, 0.2, 16, 1)  # 64 kB per request: their time is not the bytes'
    assert link.bytes_per_s is None
    link.received(64 * 2**20, 1.1, 8, 1)  # 1 s of moving after a 0.1 s round
    assert link.bytes_per_s == pytest.approx(64 * 2**20 / (1.0 - 8 * Link.REQUEST_CPU_S))
    fresh = Link()
    fresh.answered(0.1)
    fresh.received(8 * 2**20, 0.1, 8, 1)  # all latency: at least as fast as a quarter
    assert fresh.bytes_per_s == pytest.approx(8 * 2**20 / 0.025)


def test_one_planes_dask_chunks_are_predicted_only_where_reading_through_pays(
        http_server, tmp_path, monkeypatch):
    """A chunk of one plane spans the other planes' frames too: fetching it ahead
    reads them through, which a fast link makes worth it and a slow one does not."""
    t = _plane_file(tmp_path)
    url = f"{http_server.url}/planes.siff"
    with xr.open_dataset(t.path, engine="siff") as local:
        want = local.intensity.isel(z=5).mean(("y", "x")).values
    link = _link_of(http_server)
    per_frame = 64 * 64 * 2
    opts = dict(engine="siff", index_cache=tmp_path / "c", chunk_bytes=7 * 2 * per_frame)
    fetched = {}
    for name, rate in (("slow", 50e6), ("fast", 2e9)):
        monkeypatch.setattr(link, "_first", [0.02] * link.KEEP)
        monkeypatch.setattr(link, "_rate", [rate] * link.KEEP)
        forget()
        with xr.open_dataset(url, chunks={}, **opts) as ds:
            assert ds.intensity.data.npartitions == 10  # two volumes each
            got = ds.intensity.isel(z=5).mean(("y", "x")).compute(scheduler="threads",
                                                                   num_workers=1)
            np.testing.assert_array_equal(got.values, want)
            src = _open_file(url)._source
            fetched[name] = (src.expected_fetched, src.expected_read)
    assert fetched["slow"] == (0, 0)
    assert fetched["fast"][1] >= 5 and fetched["fast"][0] - fetched["fast"][1] <= 4


# --------------------------------------------------------------- ETags that differ per request


def _farm_file(tmp_path, http_server):
    """A file served by "two backends" that name it with different ETags, and its local read."""
    t = write_siff(tmp_path / "farm.siff", shape=(64, 32), channels=(1, 2), n_slices=2,
                   n_flyback=1, n_timepoints=24, photons_per_frame=2000, seed=13)
    http_server.etag_backends = 2
    masks = np.random.default_rng(2).random((2, 64, 32)) > 0.5
    with xr.open_dataset(t.path, engine="siff") as local:
        want = (local.intensity.values, local.siff.lifetime(masks).values)
    return t, f"{http_server.url}/farm.siff", masks, want


@pytest.mark.parametrize("chunks", [None, {}])
def test_a_server_whose_etags_differ_per_request_reads_with_pin_version_false(
        http_server, tmp_path, chunks):
    """Some load-balanced servers name one object with an ETag per backend.

    Pinned (the default), its reads are refused as of a replaced object; the error
    says what else that can mean and names the way out. Unpinned, no If-Match is
    sent and no answer's ETag compared: the Dataset and its photon reductions read
    the file (eagerly and with Dask) as the local read does.
    """
    _, url, masks, (want, want_life) = _farm_file(tmp_path, http_server)
    with pytest.raises(SiffFormatError, match=r"farm\.siff.*replaced.*pin_version=False"), \
            xr.open_dataset(url, engine="siff", chunks=chunks, index_cache=False) as ds:
        ds.intensity.load()
    refused = http_server.refused
    assert refused > 0
    with xr.open_dataset(url, engine="siff", chunks=chunks, index_cache=False,
                         pin_version=False) as ds:
        assert ds.encoding["pin_version"] is False
        np.testing.assert_array_equal(ds.intensity.values, want)
        np.testing.assert_array_equal(ds.siff.lifetime(masks).values, want_life)
    assert http_server.refused == refused  # nothing required a version
    # an open SiffFile given to open_siff: its Dataset's reductions reopen it unpinned
    from siff_xarray import open_siff

    with SiffFile(url, pin_version=False, index_cache=False) as f:
        assert f.version is None and f.options.pin_version is False
        ds = open_siff(f)
        assert ds.encoding["pin_version"] is False
        np.testing.assert_array_equal(ds.siff.lifetime(masks).values, want_life)
    with pytest.raises(TypeError, match="pin_version must be True or False"):
        xr.open_dataset(url, engine="siff", pin_version="no")


def test_a_conversion_from_a_server_whose_etags_differ_per_request(http_server, tmp_path,
                                                                  stop_after):
    """Pinned, its batches' reads and source checks fail as of a replaced source;
    unpinned, the source is recognised by its size and the digests of its ends, and
    the store holds every photon (also through the command line, and on resume)."""
    from click.testing import CliRunner

    from siff_xarray.cli import cli

    t, url, _, _ = _farm_file(tmp_path, http_server)
    h, w = t.shape
    shards = {"shard_bytes": 2 * t.n_slices * t.frames_per_slice * len(t.channels) * h * w * 2,
              "chunk_bytes": 1}
    dst = tmp_path / "farm.zarr"
    with pytest.raises(SiffFormatError, match=r"farm\.siff.*replaced.*pin_version=False"):
        zs.convert(url, dst, **shards)
    summary = zs.convert(url, dst, overwrite=True, pin_version=False, **shards)
    assert summary.batches >= 5
    assert zs.verify(t.path, dst) == []

    # interrupted after two batches, an unpinned conversion resumes unpinned (its plan
    # says so): from the command line, without the flag
    cli_dst = tmp_path / "cli.zarr"
    with pytest.raises(stop_after.error):
        zs.convert(url, cli_dst, pin_version=False, progress=stop_after(2), **shards)
    from siff_xarray.errors import IncompleteStoreError

    with pytest.raises(IncompleteStoreError, match="incomplete"):
        zs.verify(t.path, cli_dst)
    res = CliRunner().invoke(cli, ["convert", url, str(cli_dst), "--resume", "--quiet",
                                   "--storage-options", "{}"])
    assert res.exit_code == 0, res.output
    assert zs.verify(t.path, cli_dst) == []
    res = CliRunner().invoke(cli, ["convert", url, str(tmp_path / "c2.zarr"),
                                   "--no-pin-version"])
    assert res.exit_code == 0 and "farm.siff" in res.output, res.output
    assert zs.verify(t.path, tmp_path / "c2.zarr") == []
    # checked against the served file itself
    assert zs.verify(url, tmp_path / "c2.zarr", pin_version=False) == []
    res = CliRunner().invoke(cli, ["verify", url, str(tmp_path / "c2.zarr"), "--quiet",
                                   "--no-pin-version"])
    assert res.exit_code == 0 and res.output.startswith("OK"), res.output
    res = CliRunner().invoke(cli, ["verify", url, str(tmp_path / "c2.zarr"), "--quiet"])
    assert res.exit_code != 0 and "pin_version=False" in str(res.exception), res.output
    res = CliRunner().invoke(cli, ["convert", url, str(tmp_path / "bad.zarr"),
                                   "--storage-options", "[1, 2]"])
    assert res.exit_code == 2 and "--storage-options" in res.output
    assert "JSON object" in res.output


def test_two_farm_served_files_combined_unpinned(http_server, tmp_path):
    """``pin_version=False`` given to ``open_mfdataset`` reaches every file: the
    combined Dataset and its photon reductions (which reopen each file) read both
    files, each its own photons, eagerly and with Dask."""
    paths = [write_siff(tmp_path / f"farm{i}.siff", shape=(48, 32), channels=(1, 2),
                        n_slices=2, n_flyback=1, n_timepoints=12, photons_per_frame=1500,
                        seed=40 + i).path for i in range(2)]
    http_server.etag_backends = 2
    urls = [f"{http_server.url}/farm{i}.siff" for i in range(2)]
    masks = np.random.default_rng(4).random((2, 48, 32)) > 0.5
    combined = dict(engine="siff", combine="nested", concat_dim="time", index_cache=False)
    with xr.open_mfdataset(paths, **combined) as local:
        want, want_life = local.intensity.values, local.siff.lifetime(masks).values
    assert not np.array_equal(want[:12], want[12:])  # different photons
    with pytest.raises(SiffFormatError, match="pin_version=False"), \
            xr.open_mfdataset(urls, **combined) as ds:
        ds.intensity.load()
    refused = http_server.refused
    for chunks in (None, {}):
        with xr.open_mfdataset(urls, chunks=chunks, pin_version=False, **combined) as ds:
            np.testing.assert_array_equal(ds.intensity.values, want)
            np.testing.assert_array_equal(ds.siff.lifetime(masks).values, want_life)
    assert refused > 0 and http_server.refused == refused  # nothing required a version


@pytest.mark.slow
def test_workers_read_a_farm_served_file_unpinned(http_server, tmp_path, monkeypatch):
    """Workers with empty caches open the file as the Dataset was opened: unpinned."""
    _, url, masks, (want, want_life) = _farm_file(tmp_path, http_server)
    with _fresh_cluster(tmp_path, monkeypatch) as client, \
            xr.open_dataset(url, engine="siff", chunks={}, chunk_bytes=1,
                            pin_version=False) as ds:
        got = client.compute(ds.intensity.data, sync=True)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(ds.siff.lifetime(masks).compute().values, want_life)
        client.run(_forget_open_files)  # opened afresh by every worker
        np.testing.assert_array_equal(client.compute(ds.intensity.data, sync=True), want)
    assert http_server.refused == 0


# ------------------------------------------------------------------ URLs with a query string


@pytest.fixture
def signed_server(http_server):
    """The loopback server as a presigned URL is served: GETs only with the signature
    (the query), HEAD refused (a signature covers one method). Yields (server, log)."""
    handler = http_server.httpd.RequestHandlerClass
    get = handler.do_GET
    seen = []

    def signed_get(self):
        seen.append(("GET", self.path))
        if not self.path.endswith("?X-Signature=abc%3D"):
            self.send_error(403)
            return None
        return get(self)

    def no_head(self):
        seen.append(("HEAD", self.path))
        self.send_error(403)

    handler.do_GET, handler.do_HEAD = signed_get, no_head
    yield http_server, seen


def test_a_url_with_a_query_opens_converts_and_finds_its_sidecar(signed_server, tmp_path):
    """``?`` starts an http(s) URL's query, not a glob: a presigned URL converts (before:
    globbed into ``http://http://...``, "no such file"), opens as one acquisition, and
    its sidecar is looked for at ``run.siff.siffidx?<query>``."""
    from click.testing import CliRunner

    from siff_xarray.cli import cli

    server, seen = signed_server
    t = write_siff(tmp_path / "q.siff", shape=(64, 32), channels=(1, 2), n_slices=2,
                   n_timepoints=30, photons_per_frame=1500, seed=21)
    url = f"{server.url}/q.siff?X-Signature=abc%3D"
    with xr.open_dataset(t.path, engine="siff") as local:
        want = local.intensity.values
    for ds in (xr.open_dataset(url, engine="siff", index_cache=False),
               open_acquisition(url, index_cache=False)):
        with ds:
            np.testing.assert_array_equal(ds.intensity.values, want)
    assert seen and not [s for s in seen if s[0] == "HEAD"]
    summary = zs.convert(url, tmp_path / "q.zarr")
    assert summary.source == url and zs.verify(url, tmp_path / "q.zarr") == []
    res = CliRunner().invoke(cli, ["convert", url, str(tmp_path / "cli.zarr"), "--quiet"])
    assert res.exit_code == 0, res.output
    assert zs.verify(t.path, tmp_path / "cli.zarr") == []
    # a sidecar next to the file is found with the URL's query: a few small requests
    assert CliRunner().invoke(cli, ["index", t.path]).exit_code == 0
    forget(url)  # (this process knows the index from the opens above)
    seen.clear()
    with xr.open_dataset(url, engine="siff", index_cache=tmp_path / "empty") as ds:
        assert ds.sizes["time"] == 30
    assert ("GET", "/q.siff.siffidx?X-Signature=abc%3D") in seen and len(seen) <= 5, seen


def test_only_wildcards_before_an_http_query_are_globs():
    from siff_xarray._paths import expand, has_glob
    from siff_xarray.reader.source import sibling_url

    assert not has_glob("https://h/run.siff?X-Amz-Signature=a&b=[1]*")
    assert not has_glob("simplecache::http://h/run.siff?download=1")
    assert has_glob("https://h/2026-*/run.siff?x=1") and has_glob("http://h/run_[0-9].siff")
    assert has_glob("s3://bucket/run_0000?.siff") and has_glob("/data/run?.siff")
    assert expand("https://h/run.siff?sig=1") == ["https://h/run.siff?sig=1"]
    assert sibling_url("https://h/a/run.siff?sig=1&x=2", ".siffidx") == \
        "https://h/a/run.siff.siffidx?sig=1&x=2"
    assert sibling_url("s3://b/run?.siff", ".siffidx") == "s3://b/run?.siff.siffidx"


# ------------------------------------------------------------------------- redirects


def test_a_redirected_link_is_read_at_its_target_which_is_asked_again_when_it_expires(
        http_server, other_http_server, tmp_path):
    """A download link that redirects to a presigned URL on another server (as data
    archives and release downloads do).

    The open's probe follows the redirect and every read goes to the target
    directly: before, the first reads and the size went through fsspec, which
    followed the redirect for each request (16 requests for this small file's open
    and read, against 6). The link's Authorization header never reaches the other
    server (a presigned URL refuses a second kind of authentication). When the
    target's signature expires (403), the link is asked for a new one.
    """
    api, files = http_server, other_http_server
    t = write_siff(tmp_path / "r.siff", shape=(64, 32), channels=(1, 2), n_slices=2,
                   n_timepoints=30, photons_per_frame=1500, seed=31)
    url, opts, token, seen = _redirecting_link(api, files)
    with xr.open_dataset(t.path, engine="siff") as local:
        want = local.intensity.values
    with xr.open_dataset(url, engine="siff", index_cache=False, storage_options=opts) as ds:
        np.testing.assert_array_equal(ds.intensity.isel(time=slice(0, 10)).values,
                                      want[:10])
        # the probe's two ranges at the link, then everything at the target
        assert [w for w, _ in seen] == ["api"] * 2 + ["files"] * (len(seen) - 2), seen
        assert len(seen) <= 6
        token[0] = 2  # the signature expired
        seen.clear()
        np.testing.assert_array_equal(ds.intensity.values, want)
        assert ("api", "/download/r") in seen and ("files", "/r.siff?sig=2") in seen
        # asked once for the new place (one probe: its two ranges)
        assert seen.count(("api", "/download/r")) == 2, seen
    assert files.refused == 0


def _redirecting_link(api, files):
    """Make ``api`` answer ``/download/r`` (with its Authorization header) by redirecting
    to a presigned URL of ``r.siff`` on ``files``, which refuses other headers and old
    signatures. Returns the link, its storage options, the signature's number (a
    one-item list: raise it to expire the signature) and the requests seen."""
    token, seen = [1], []
    api_handler = api.httpd.RequestHandlerClass
    files_handler = files.httpd.RequestHandlerClass
    serve = files_handler.do_GET

    def redirect(self):
        seen.append(("api", self.path))
        if self.headers.get("Authorization") != "Bearer lab":
            self.send_error(401)
            return
        self.send_response(302)
        self.send_header("Location", f"{files.url}/r.siff?sig={token[0]}")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def signed(self):
        seen.append(("files", self.path))
        if "Authorization" in self.headers:  # as S3: one way to authenticate only
            self.send_error(400)
            return None
        if not self.path.endswith(f"?sig={token[0]}"):
            self.send_error(403)  # expired
            return None
        return serve(self)

    api_handler.do_GET = api_handler.do_HEAD = redirect
    files_handler.do_GET = signed
    files_handler.do_HEAD = lambda self: self.send_error(403)
    return f"{api.url}/download/r", {"headers": {"Authorization": "Bearer lab"}}, token, seen


@pytest.mark.slow
def _close_every_file() -> None:
    """Close the files xarray's managers and the photon reductions keep open here."""
    from xarray.backends.file_manager import FILE_CACHE

    from siff_xarray.accessor import reductions

    for f in list(FILE_CACHE.values()):
        f.close()
    FILE_CACHE.clear()
    reductions._close_open_sources()


def test_workers_follow_a_redirected_link_once_each_and_read_at_its_target(
        http_server, other_http_server, tmp_path, monkeypatch):
    """Fresh worker processes open the link as the Dataset was opened: each follows it
    once (its probe), reads at the target without the link's header, and asks the
    link again when the target's signature expires."""
    api, files = http_server, other_http_server
    t = write_siff(tmp_path / "r.siff", shape=(64, 32), channels=(1, 2), n_slices=2,
                   n_flyback=1, n_timepoints=30, photons_per_frame=1500, seed=32)
    url, opts, token, seen = _redirecting_link(api, files)
    masks = np.random.default_rng(3).random((2, 64, 32)) > 0.5
    with xr.open_dataset(t.path, engine="siff") as local:
        want, want_life = local.intensity.values, local.siff.lifetime(masks).values
    with _fresh_cluster(tmp_path, monkeypatch) as client, \
            xr.open_dataset(url, engine="siff", chunks={}, chunk_bytes=1,
                            storage_options=opts) as ds:
        seen.clear()
        np.testing.assert_array_equal(client.compute(ds.intensity.data, sync=True), want)
        at_link = [s for s in seen if s[0] == "api"]
        assert 0 < len(at_link) <= 2 * 2, seen  # one probe (two ranges) per worker
        assert len(seen) - len(at_link) >= ds.intensity.data.npartitions // 2
        seen.clear()
        # the photon reductions open the file on each worker again: the probe the
        # chunks' opens made there is kept, so the only request at the link is one
        # look here for a converted store (answered: the file). Before, each worker
        # probed again, twice when xarray closed the chunks' file between two tasks
        # (it closes it with the last unpickled copy of its manager): 9 requests
        np.testing.assert_array_equal(ds.siff.lifetime(masks).compute().values, want_life)
        assert sum(1 for s in seen if s[0] == "api") == 1, seen
        # a worker whose files were all closed reopens without asking the link again
        client.run(_close_every_file)
        seen.clear()
        np.testing.assert_array_equal(client.compute(ds.intensity.data, sync=True), want)
        assert not [s for s in seen if s[0] == "api"], seen
        token[0] = 2  # every worker's target expires
        seen.clear()
        np.testing.assert_array_equal(client.compute(ds.intensity.data, sync=True), want)
        assert ("files", "/r.siff?sig=2") in seen
        # at most two probes per worker, not one per chunk
        n_chunks = ds.intensity.data.npartitions
        assert 0 < sum(1 for s in seen if s[0] == "api") <= 2 * 2 * 2 < n_chunks, str(seen)
    assert files.refused == 0


def test_which_redirects_are_followed_and_with_which_headers():
    from siff_xarray.reader.http_ranges import DirectRanges

    d = DirectRanges("https://a.example/x?k=1", {"Authorization": "Bearer lab"}, None,
                     name="https://a.example/x?k=1")
    same = d.redirected("https://a.example/files/x.siff")
    other = d.redirected("https://bucket.s3.example/x.siff?X-Amz-Signature=z")
    assert same.headers == {"Authorization": "Bearer lab"} and other.headers == {}
    assert other.url == "https://a.example/x?k=1"  # messages name the link, not the signature
    assert d.redirected("http://a.example/x") is None  # no downgrade from https
    assert d.redirected("ftp://a.example/x") is None
    plain = DirectRanges("http://a.example:8080/x", {"H": "1"}, None)
    assert plain.redirected("http://a.example:8080/y").headers == {"H": "1"}
    assert plain.redirected("http://a.example:8081/y").headers == {}
    assert plain.redirected("https://a.example/y") is not None  # an upgrade is fine


def test_a_server_that_answers_every_path_is_not_taken_for_a_store(
        http_server, other_http_server, tmp_path):
    """A link that redirects every path under it to its file answers at
    ``<link>/photons/zarr.json`` too; before, that made it a converted store, and the
    photon reductions of its Dataset read the ``.siff`` as a plan (UnicodeDecodeError).
    A store is told by its group metadata, read (at most 64 KiB) in one request."""
    from siff_xarray.store import is_converted_store

    t = write_siff(tmp_path / "r.siff", shape=(32, 16), n_timepoints=4, seed=33)
    zs.convert(t.path, tmp_path / "s.zarr")
    assert is_converted_store(str(tmp_path / "s.zarr"))
    assert is_converted_store(f"{http_server.url}/s.zarr")
    (tmp_path / "bad.zarr" / "photons").mkdir(parents=True)
    for text in (b"", b"not json", b"[1, 2]", b'{"node_type": "array", "zarr_format": 3}',
                 (tmp_path / "r.siff").read_bytes()):
        (tmp_path / "bad.zarr" / "photons" / "zarr.json").write_bytes(text)
        assert not is_converted_store(str(tmp_path / "bad.zarr"))
        assert not is_converted_store(f"{http_server.url}/bad.zarr")
    assert not is_converted_store(str(tmp_path / "none.zarr"))
    assert not is_converted_store(f"{http_server.url}/none.zarr")
    url, opts, _, seen = _redirecting_link(http_server, other_http_server)
    assert not is_converted_store(url, opts)
    assert len(seen) == 2 and seen[0] == ("api", "/download/r/photons/zarr.json")
    assert not is_converted_store(url)  # refused (no credentials): not a store either


@pytest.mark.slow
def test_an_s3_to_s3_conversion_on_fresh_cluster_workers(s3_server, tmp_path, monkeypatch):
    """The issue's ``convert s3://... s3://...`` on worker processes with empty caches
    in another directory: each opens its source and the store once per run, writes
    its arrival-time shards behind its decoding and its OME level 0 by copying shards
    on the server; the store is the one a local conversion of the file makes."""
    import s3fs

    t = write_siff(tmp_path / "c.siff", shape=(32, 16), channels=(1, 2), n_slices=3,
                   n_flyback=1, n_timepoints=40, photons_per_frame=3000, seed=12)
    fs = s3fs.S3FileSystem(**s3_server)
    fs.mkdir("cluster-src")
    fs.mkdir("cluster-dst")
    fs.put(t.path, "cluster-src/c.siff")
    layout = {"shard_bytes": 2 * 3 * 2 * 32 * 16 * 2, "chunk_bytes": 1}
    zs.convert(t.path, tmp_path / "local.zarr", scheduler="sync", **layout)
    with _fresh_cluster(tmp_path, monkeypatch) as client:
        summary = zs.convert("s3://cluster-src/c.siff", "s3://cluster-dst/c.zarr",
                             scheduler=client, storage_options=s3_server,
                             target_options=s3_server, **layout)
        assert summary.batches >= 10
        assert not any(client.run(_kept_sources).values())  # closed when the run ended
    # every photon, against the file
    assert zs.verify(t.path, "s3://cluster-dst/c.zarr", target_options=s3_server) == []
    with zs.open_converted(tmp_path / "local.zarr") as local, \
            zs.open_converted("s3://cluster-dst/c.zarr", storage_options=s3_server) as ds:
        for name in ("intensity", "photon_count"):
            np.testing.assert_array_equal(ds[name].values, local[name].values)


def test_a_chain_leaves_no_reservation_behind_a_batch_that_never_asked(monkeypatch):
    """A batch of a chain that never asked for its next one (no frames to decode) must
    not leave that reservation to a later batch of the thread, which would fetch a
    batch already converted."""
    from siff_xarray.store import converter as conv

    plan = conv.Plan(sources=["http://127.0.0.1:1/x.siff"], source_options=None,
                     destination="/nowhere.zarr", destination_options=None, shard_t=1,
                     n_timepoints=3, batch_frames=[[0, 0], [0, 0], [0, 0]],
                     batch_base=[0, 0, 0], flyback_base=[0, 0, 0], batch_bytes=[0, 0, 0],
                     arrival_dtype="uint16", n_photons_total=0)
    left = []

    # (asks for nothing, as a batch of no frames)
    def batch(plan_json, b, run_id, tails=None):
        left.append(dict(conv._runs[run_id].chained))
        return b, 0, 0

    monkeypatch.setattr(conv, "_write_batch", batch)
    try:
        assert conv._write_chain(plan.to_json(), [0, 1, 2], "chain-run") == [
            (0, 0, 0), (1, 0, 0), (2, 0, 0)]
        assert [list(d.values()) for d in left] == [[1], [2], []]
        assert conv._runs["chain-run"].chained == {}
    finally:
        conv._forget_sources("chain-run")


@pytest.mark.slow
def test_a_multiprocessing_conversion_of_a_remote_file_runs_chains_of_batches(
        http_server, tmp_path, monkeypatch):
    """Dask's multiprocessing scheduler also hands out tasks itself: its tasks are
    chains of consecutive batches too, and the store is the file's."""
    from siff_xarray.store import converter as conv

    t = write_siff(tmp_path / "m.siff", shape=(32, 32), channels=(1, 2), n_slices=2,
                   n_flyback=1, n_timepoints=16, photons_per_frame=20000, seed=9)
    cuts, real = [], conv._chains
    monkeypatch.setattr(conv, "_chains", lambda *a: cuts.append(real(*a)) or cuts[-1])
    summary = zs.convert(f"{http_server.url}/m.siff", tmp_path / "m.zarr",
                         scheduler="processes", num_workers=2,
                         shard_bytes=2 * 3 * 32 * 32 * 2, chunk_bytes=1)
    assert summary.batches == 16 and len(cuts) == 1
    assert sorted(b for c in cuts[0] for b in c) == list(range(16))
    assert max(map(len, cuts[0])) == conv.CHAIN_BATCHES  # (16 // (2 x 2 processes))
    assert zs.verify(t.path, tmp_path / "m.zarr") == []
