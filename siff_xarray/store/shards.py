"""Whole shards of a conversion's sharded arrays, encoded here and stored one write each.

For every inner chunk of a shard it writes, zarr-python fills a new chunk-sized
buffer with the fill value and copies the chunk's values into it before encoding
(zarr-python issue 2038), and it runs each chunk's codecs as a task of its one event
loop, which also carries every request to an object store. A conversion's batches
write whole shards only (the layout gives each batch shards of its own), with the
codecs of :func:`~.layout.compressors`, so :func:`write_along` encodes them in
the batch's own thread, as the Zarr v3 sharding codec specifies (``index_location``
end): each inner chunk's values (little-endian, C order) compressed by Blosc and
followed by their CRC32C, the chunks one after another, then the index (offset and
length of every chunk, in C order of the chunks; 2^64-1 twice for a chunk wholly
outside the array) and its CRC32C. zarr reads it as its own. Writes that are not whole
shards of such an array are left to zarr. A store that can take a whole object
from the calling thread (``put_whole``: the layout's S3 stores, through
:mod:`.s3_puts`) is given each shard that way.

Import rule: numpy, numcodecs, google_crc32c and zarr (lazily).
"""

from __future__ import annotations

import struct
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["ShardEncoder", "write_along", "zarr_sync"]

#: an index entry's offset and length for a chunk that is not in the shard
_MISSING = 2**64 - 1
#: Blosc's shuffle modes by zarr's names (numcodecs' NOSHUFFLE, SHUFFLE, BITSHUFFLE)
_SHUFFLE = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}


def _name(setting: Any) -> Any:
    """Return a codec setting by name: zarr 3.1 gives enums (``Endian.little``), 3.4 strings."""
    return getattr(setting, "value", setting)


def _crc32c(data: Any) -> bytes:
    import google_crc32c

    return struct.pack("<I", google_crc32c.value(data))


@dataclass(frozen=True)
class ShardEncoder:
    """Encodes the shards of one array whose codecs are the layout's (:meth:`of`)."""

    shard: tuple[int, ...]
    chunk: tuple[int, ...]
    dtype: np.dtype
    fill: Any
    blosc: Any  # numcodecs.Blosc

    @classmethod
    def of(cls, arr: Any) -> ShardEncoder | None:
        """Return the encoder of zarr array ``arr``; None for other codecs or other arrays.

        The layout's: sharding (index at the end, bytes and CRC32C) of inner chunks
        encoded as little-endian bytes, Blosc and CRC32C, on a little-endian machine.
        """
        from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec

        meta = getattr(arr, "metadata", None)  # (None: not a zarr array)
        if getattr(meta, "zarr_format", None) != 3 or len(meta.codecs) != 1:
            return None
        sharding = meta.codecs[0]
        if not isinstance(sharding, ShardingCodec) or sys.byteorder != "little":
            return None
        inner, index = sharding.codecs, sharding.index_codecs
        if not (len(inner) == 3 and isinstance(inner[0], BytesCodec)
                and isinstance(inner[1], BloscCodec) and isinstance(inner[2], Crc32cCodec)
                and len(index) == 2 and isinstance(index[0], BytesCodec)
                and isinstance(index[1], Crc32cCodec)
                and _name(sharding.index_location) == "end"):
            return None
        dtype = np.dtype(arr.dtype)
        little = all(_name(c.endian) in ("little", None) for c in (inner[0], index[0]))
        if not little or dtype.kind not in "uifb" or dtype.byteorder == ">":
            return None
        codec = inner[1]
        from numcodecs import Blosc

        config = {"cname": _name(codec.cname), "clevel": codec.clevel,
                  "shuffle": _SHUFFLE[_name(codec.shuffle)], "blocksize": codec.blocksize}
        try:  # (numcodecs 0.16 and newer take the type size, as zarr passes it)
            blosc = Blosc.from_config({**config, "typesize": codec.typesize})
        except TypeError:
            blosc = Blosc.from_config(config)
        return cls(tuple(meta.chunk_grid.chunk_shape), tuple(sharding.chunk_shape), dtype,
                   np.asarray(meta.fill_value, dtype=dtype), blosc)

    def encode(self, values: np.ndarray) -> bytes:
        """Return the bytes of the shard holding ``values`` from its first element on.

        ``values`` is the shard's part of the array: its shape is the shard's, or
        smaller at the array's end, where the chunks it does not reach are left out
        and those it reaches in part are filled out with the fill value, as zarr does.
        """
        per = tuple(s // c for s, c in zip(self.shard, self.chunk, strict=True))
        index = np.full((*per, 2), _MISSING, dtype="<u8")
        parts: list[Any] = []
        offset = 0
        for coords in np.ndindex(*per):
            lo = [k * c for k, c in zip(coords, self.chunk, strict=True)]
            if any(first >= n for first, n in zip(lo, values.shape, strict=True)):
                continue
            piece = values[tuple(slice(first, first + c)
                                 for first, c in zip(lo, self.chunk, strict=True))]
            if piece.shape != self.chunk:
                whole = np.full(self.chunk, self.fill, dtype=self.dtype)
                whole[tuple(slice(0, n) for n in piece.shape)] = piece
                piece = whole
            data = self.blosc.encode(np.ascontiguousarray(piece, dtype=self.dtype))
            parts += [data, _crc32c(data)]
            index[coords] = (offset, len(data) + 4)
            offset += len(data) + 4
        table = index.tobytes()
        parts += [table, _crc32c(table)]
        return b"".join(parts)


def zarr_sync() -> Any:
    """Return zarr's function that runs a coroutine on its event loop, or None.

    zarr-python has no public name for it (``zarr.core.sync.sync``, which its own
    synchronous API calls); a release that moves it makes the shards zarr's to
    write again, more slowly, rather than failing.
    """
    try:
        from zarr.core.sync import sync
    except ImportError:
        return None
    return sync


def write_along(arr: Any, at: int, values: np.ndarray) -> None:
    """``arr[at : at + len(values)] = values``, as whole shards encoded here where it can.

    Here where ``arr`` has the layout's codecs (:meth:`ShardEncoder.of`), shards
    split only its first axis, and the write starts on a shard and ends on one or
    at the array's end; otherwise zarr writes it. Each shard is one write to the
    store: from this thread where the store takes it (``put_whole``), else on
    zarr's event loop as its own are.
    """
    values = np.asarray(values)
    n = len(values)
    enc = ShardEncoder.of(arr) if n else None
    step = enc.shard[0] if enc is not None else 0
    if (enc is None or tuple(values.shape[1:]) != tuple(arr.shape[1:])
            or tuple(enc.shard[1:]) != tuple(arr.shape[1:]) or at % step
            or at < 0 or at + n > arr.shape[0]  # (past the end: as zarr does it)
            or (n % step and at + n != arr.shape[0])):
        arr[at : at + n] = values
        return
    sync = zarr_sync()
    if sync is None:  # (a zarr without it: zarr writes the shards)
        arr[at : at + n] = values
        return
    from zarr.buffer import default_buffer_prototype

    store, prefix = arr.store_path.store, arr.store_path.path
    encode_key = arr.metadata.encode_chunk_key
    buffer = default_buffer_prototype().buffer
    rest = (0,) * (arr.ndim - 1)
    put = getattr(store, "put_whole", None)  # (S3: one PUT from this thread)
    for first in range(0, n, step):
        key = encode_key((at // step + first // step, *rest))
        key = f"{prefix}/{key}" if prefix else key
        data = enc.encode(values[first : first + step])
        if put is None or not put(key, data):
            sync(store.set(key, buffer.from_bytes(data)))
