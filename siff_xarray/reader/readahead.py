"""Predicting the next reads of a run of same-shaped reads (the chunks of a Dask graph).

Dask reads a chunked Dataset one chunk per task, and each task asks for the frames of
the one before it shifted by a constant number of frames, the chunk's stride, in
either direction (Dask's order often walks the chunks of a reduction backwards). At
object-store latency each such read waits a round trip before its bytes come; once
the stride is known, the reads that follow can be fetched while earlier ones decode.

A read predicts others only when its stride is confirmed: with two of the three
reads of its frame pattern just before it, it makes three reads a constant stride
apart (two threads taking chunks in turn still do), or it was itself predicted. A
confirmed run predicts one read ahead; each read that was predicted doubles that, up
to ``depth`` (as an operating system's read-ahead window grows): a run that breaks
early, as where a Dask cluster spreads a run's chunks over several workers, leaves
few predictions unread. No read is predicted while a prediction of it waits or once
it was read in this pass over the file (Dask's runs often end at chunks read long
before); a read of a chunk read before starts a new pass (a second computation over
a Dataset), whose reads are predicted again. At most ``2 * depth`` predictions of a
pattern wait unread at any time: reads in no order, which now and then happen to
make such a run of three, cannot fetch much they do not read.

Dask's order is a series of such runs: one ends and the next starts elsewhere in
the array, going the same way. The first read after such a jump resumes the stride
the last run was confirmed with and predicts two reads at once, instead of waiting
for three reads of the new run. A resumed stride is used once: only when one of
those two is read does the run count as confirmed (and the next jump resume again),
so reads in no order after a run fetch at most two chunks they do not read.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict

import numpy as np

__all__ = ["StridePredictor"]

_Key = tuple[int, int, int]  # (frames per read, hash of their pattern, first frame)


class StridePredictor:
    """Remembers recent reads of one file and predicts the reads that follow them.

    Thread-safe: the tasks of a Dask graph read the same file from several threads.

    Parameters
    ----------
    depth
        How many reads ahead of a confirmed read are predicted.
    memory
        How many reads (and pending predictions) are remembered: a pass over more
        chunks than this may fetch one of its first chunks again.

    """

    def __init__(self, depth: int, memory: int = 4096) -> None:
        if depth < 1 or memory < 3:
            raise ValueError("depth must be >= 1 and memory >= 3")
        self.depth = depth
        self.memory = memory
        self._lock = threading.Lock()
        self._seen: OrderedDict[_Key, None] = OrderedDict()
        self._predicted: OrderedDict[_Key, int] = OrderedDict()  # key -> its stride
        #: pattern -> reads predicted ahead now: 1 when a run is confirmed, doubled
        #: (up to ``depth``) by each read that was predicted
        self._window: dict[tuple[int, int], int] = {}
        #: pattern -> the stride of its last confirmed run in this pass, until a
        #: read that is neither predicted nor confirmed resumes it
        self._resumable: dict[tuple[int, int], int] = {}

    def after(self, frames: np.ndarray, n_frames: int) -> list[np.ndarray]:
        """Record a read of ``frames``; return the reads predicted to follow it.

        Each prediction is ``frames + j * stride`` (``j = 1 .. window``) without the
        frames outside ``[0, n_frames)``, left out where that read is predicted
        already, was read in this pass, or would hold no frame.
        """
        f = np.asarray(frames, dtype=np.int64)
        if f.size < 2:
            return []
        first = int(f[0])
        pattern = (int(f.size), hash((f - first).tobytes()))
        key = (*pattern, first)
        with self._lock:
            if key in self._seen:  # read again: a new pass, whose reads are all to come
                for k in [k for k in self._seen if k[:2] == pattern]:
                    del self._seen[k]
                self._resumable.pop(pattern, None)
            stride = self._predicted.pop(key, None)
            if stride is not None:  # predicted right: look further ahead
                window = min(self.depth, 2 * self._window.get(pattern, 1))
            else:
                stride, window = self._confirmed(pattern, first), 1
            if stride is not None:
                self._resumable[pattern] = stride
            else:  # the first read after a jump: the last run's stride, once
                stride, window = self._resumable.pop(pattern, None), min(self.depth, 2)
            self._remember(self._seen, key, None)
            if stride is None:
                return []
            self._window[pattern] = window
            waiting = sum(1 for k in self._predicted if k[:2] == pattern)
            out = []
            for j in range(1, window + 1):
                nxt = (*pattern, first + j * stride)
                if nxt in self._seen or nxt in self._predicted:
                    continue
                if waiting >= 2 * self.depth:
                    break
                g = f + j * stride
                g = g[(g >= 0) & (g < n_frames)]
                if g.size == 0:
                    break
                self._remember(self._predicted, nxt, stride)
                waiting += 1
                out.append(g)
            return out

    def _confirmed(self, pattern: tuple[int, int], first: int) -> int | None:
        """Return the smallest stride ``s`` with recent reads at ``first - s, - 2s``.

        Recent: among the three reads of this pattern before this one.
        """
        recent = (k[2] for k in reversed(self._seen) if k[:2] == pattern and k[2] != first)
        firsts = set(itertools.islice(recent, 3))
        for s in sorted((first - a for a in firsts), key=abs):
            if first - 2 * s in firsts:
                return s
        return None

    def _remember(self, table: OrderedDict, key: _Key, value: int | None) -> None:
        table[key] = value
        table.move_to_end(key)
        while len(table) > self.memory:
            table.popitem(last=False)
