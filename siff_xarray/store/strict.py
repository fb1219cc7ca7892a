"""A zarr store wrapper that makes a missing chunk an error instead of zeros.

Zarr reads a chunk that is not in the store as its fill value. In a converted
store every chunk of every array is written (empty ones too; the ``photons``
group says so with ``all_chunks_stored``), so a missing chunk was deleted or
lost, and reading it as zeros would give wrong photons and intensities without
a word. The marker is read from the root metadata only when a chunk is missing
(never on the way of a normal read); stores written before it existed read as
zarr reads them. :class:`StrictStore` wraps the store that :func:`~siff_xarray.store.
open_converted` and :class:`~siff_xarray.store.StorePhotons` read through and
raises :class:`~siff_xarray.errors.MissingChunkError` naming the store and the key.

Import rule: zarr, this package's ``errors`` and ``layout``.
"""

from __future__ import annotations

import json
from typing import Any

from zarr.storage import WrapperStore

from ..errors import MissingChunkError
from .layout import ALL_CHUNKS_STORED

__all__ = ["StrictStore", "is_chunk_key"]


def is_chunk_key(key: str) -> bool:
    """Tell whether ``key`` names a chunk (``<array>/c/<i>/<j>...``), not metadata."""
    parts = key.split("/")
    for i, part in enumerate(parts):
        if part == "c" and all(p.isdigit() for p in parts[i + 1 :]):
            return True
    return False


class StrictStore(WrapperStore[Any]):
    """Delegate to ``store``; a chunk that is not there raises ``MissingChunkError``.

    Parameters
    ----------
    store
        The zarr store to read (``LocalStore``, ``FsspecStore``...).
    name
        How errors name the store (its path or URL).

    """

    def __init__(self, store: Any, name: str = "") -> None:
        super().__init__(store)
        self.name = name or str(store)
        self._complete: bool | None = None  # does the store hold every chunk? (read lazily)

    def _with_store(self, store: Any) -> StrictStore:
        return type(self)(store, self.name)

    def __getstate__(self) -> dict[str, Any]:
        return {"_store": self._store, "name": self.name, "_complete": self._complete}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._store = state["_store"]
        self.name = state["name"]
        self._complete = state.get("_complete")

    async def _holds_every_chunk(self, prototype: Any) -> bool:
        """Read (once) whether the root metadata say that every chunk is stored."""
        if self._complete is None:
            raw = await self._store.get("zarr.json", prototype)
            try:
                meta = json.loads(raw.to_bytes()) if raw is not None else {}
                photons = meta["consolidated_metadata"]["metadata"]["photons"]
                self._complete = bool(photons["attributes"].get(ALL_CHUNKS_STORED))
            except (ValueError, KeyError, TypeError):
                self._complete = False
        return self._complete

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StrictStore) and self._store == other._store

    def __hash__(self) -> int:
        return hash((type(self), self.name))

    def _missing(self, key: str) -> MissingChunkError:
        array = key.split("/c/")[0] if "/c/" in key else key
        return MissingChunkError(
            self.name, f"{array}: chunk {key!r} is missing (deleted or lost); zarr would "
            "read it as zeros. Run siff-xarray verify, and restore the store from a copy or "
            "convert the source again")

    async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
        """Return the bytes of ``key``; raise if it is a chunk that is not stored."""
        out = await self._store.get(key, prototype, byte_range)
        if out is None and is_chunk_key(key) and await self._holds_every_chunk(prototype):
            raise self._missing(key)
        return out

    async def get_partial_values(self, prototype: Any, key_ranges: Any) -> list[Any]:
        """Read byte ranges of several keys; raise for a chunk that is not stored."""
        key_ranges = list(key_ranges)
        out = await self._store.get_partial_values(prototype, key_ranges)
        for (key, _), value in zip(key_ranges, out, strict=True):
            if value is None and is_chunk_key(key) and await self._holds_every_chunk(prototype):
                raise self._missing(key)
        return out
