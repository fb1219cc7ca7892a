"""Whole shards encoded by siff_xarray.store.shards, read back by zarr."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from siff_xarray.store.layout import compressors
from siff_xarray.store.shards import ShardEncoder, write_along


def _array(path, shape, shard, chunk, dtype, **kwargs):
    kwargs.setdefault("compressors", compressors())
    return zarr.create_array(str(path), shape=shape, dtype=dtype, shards=shard, chunks=chunk,
                             fill_value=0, config={"write_empty_chunks": True}, **kwargs)


def _encoded_shapes(monkeypatch) -> list:
    """Record the shape of every shard :class:`ShardEncoder` encodes (the list returned)."""
    encoded = []
    real = ShardEncoder.encode
    monkeypatch.setattr(ShardEncoder, "encode",
                        lambda self, v: encoded.append(v.shape) or real(self, v))
    return encoded


@st.composite
def layouts(draw):
    ndim = draw(st.integers(1, 3))
    chunk = [draw(st.integers(1, 4)) for _ in range(ndim)]
    per = draw(st.integers(1, 4))
    shard = [chunk[0] * per, *chunk[1:]]  # (shards split the first axis, as the layout's)
    trailing = chunk[1:]
    n = draw(st.integers(1, 3 * shard[0] + 2))
    dtype = draw(st.sampled_from(["uint8", "uint16", "int16", "uint32", "int64"]))
    return (n, *trailing), tuple(shard), tuple(chunk), dtype


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layout=layouts(), seed=st.integers(0, 2**16))
def test_shards_encoded_here_read_back_as_zarrs_own(tmp_path_factory, layout, seed):
    """Whole shards, and a last one cut by the array's end (its chunks filled out
    or left out as zarr does), read back through zarr as the values written, and
    as zarr's own writes of them."""
    shape, shard, chunk, dtype = layout
    values = np.random.default_rng(seed).integers(0, 100, size=shape).astype(dtype)
    root = tmp_path_factory.mktemp("shards")
    own, theirs = (_array(root / name, shape, shard, chunk, dtype) for name in ("own", "zarr"))
    assert ShardEncoder.of(own) is not None
    for at in range(0, shape[0], shard[0]):
        write_along(own, at, values[at : at + shard[0]])
        theirs[at : at + shard[0]] = values[at : at + shard[0]]
    np.testing.assert_array_equal(zarr.open_array(str(root / "own"), mode="r")[:], values)
    keys = sorted(p.relative_to(root / "own").as_posix() for p in (root / "own").rglob("c/*"))
    assert keys == sorted(p.relative_to(root / "zarr").as_posix()
                          for p in (root / "zarr").rglob("c/*"))


def test_the_conversions_arrays_write_their_shards_here_and_others_go_to_zarr(tmp_path,
                                                                              monkeypatch):
    """The layout's codecs are encoded here, one store write per shard; arrays with
    other codecs, writes that do not start on a shard or end on one (or at the
    array's end), and arrays sharded along other axes are written by zarr."""
    encoded = _encoded_shapes(monkeypatch)
    arr = _array(tmp_path / "a", (10, 3), (4, 3), (2, 3), "uint16")
    values = np.arange(30, dtype=np.uint16).reshape(10, 3)
    write_along(arr, 0, values[:8])  # two whole shards
    write_along(arr, 8, values[8:])  # the last, cut by the array's end
    assert encoded == [(4, 3), (4, 3), (2, 3)]
    np.testing.assert_array_equal(arr[:], values)
    encoded.clear()
    write_along(arr, 2, values[2:6] + 1)  # not on a shard: zarr merges it
    write_along(arr, 4, values[4:6] + 2)  # ends inside a shard
    assert encoded == []
    expect = values.copy()
    expect[2:6] += 1
    expect[4:6] = values[4:6] + 2
    np.testing.assert_array_equal(arr[:], expect)
    from zarr.codecs import GzipCodec

    other = _array(tmp_path / "gzip", (8,), (4,), (2,), "uint16", compressors=GzipCodec())
    across = _array(tmp_path / "across", (4, 6), (4, 3), (2, 3), "uint16")
    assert ShardEncoder.of(other) is None
    write_along(other, 0, np.arange(8, dtype=np.uint16))
    write_along(across, 0, np.ones((4, 6), np.uint16))
    assert encoded == []
    twin = _array(tmp_path / "twin", (10, 3), (4, 3), (2, 3), "uint16")
    past = np.full((4, 3), 7, np.uint16)
    write_along(arr, 8, past)  # past the array's end: whatever zarr makes of it
    twin[8:12] = past
    assert encoded == []
    np.testing.assert_array_equal(arr[8:], twin[8:])
    np.testing.assert_array_equal(other[:], np.arange(8))
    np.testing.assert_array_equal(across[:], 1)


def test_a_damaged_shard_written_here_is_an_error_when_read(tmp_path):
    """The chunks' and the index's CRC32C are zarr's: a flipped byte in either is
    an error when read, never other values."""
    arr = _array(tmp_path / "a", (8,), (8,), (4,), "uint16")
    write_along(arr, 0, np.arange(8, dtype=np.uint16) * 1000)
    shard = tmp_path / "a" / "c" / "0"
    good = shard.read_bytes()
    for at in (5, len(good) - 10):  # inside the first chunk; inside the index
        bad = bytearray(good)
        bad[at] ^= 0xFF
        shard.write_bytes(bytes(bad))
        with pytest.raises(Exception, match=r"(?i)checksum|crc"):
            zarr.open_array(str(tmp_path / "a"), mode="r")[:]
    shard.write_bytes(good)
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "a"), mode="r")[:],
                                  np.arange(8) * 1000)


def test_a_zarr_without_its_sync_function_writes_the_shards_itself(tmp_path, monkeypatch):
    """``zarr.core.sync.sync`` has no public name: should a zarr release move it,
    the conversion's shards are zarr's to write (the same values), not an error."""
    import sys

    from siff_xarray.store import shards

    encoded = _encoded_shapes(monkeypatch)
    arr = _array(tmp_path / "a", (10, 3), (4, 3), (2, 3), "uint16")
    values = np.arange(30, dtype=np.uint16).reshape(10, 3)
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "zarr.core.sync", None)  # its import fails
        assert shards.zarr_sync() is None
        write_along(arr, 0, values[:8])
        write_along(arr, 8, values[8:])
    assert encoded == []
    np.testing.assert_array_equal(arr[:], values)
    assert shards.zarr_sync() is not None
    write_along(arr, 0, values[:8] + 1)
    assert encoded == [(4, 3), (4, 3)]
    np.testing.assert_array_equal(arr[:8], values[:8] + 1)
