"""Lossless, parallel, resumable conversion of ``.siff`` files to Zarr v3 stores.

Conversion runs in batches of whole intensity shards (a time range); each batch's
photons start at an ``arrival_time`` shard boundary, so no two batches ever write
the same chunk or shard and batches may run in any order, on any Dask scheduler.
The root group's metadata (``zarr.json``) is written last: until then the store
cannot be opened as a Zarr group, and :func:`~siff_xarray.store.open_converted`
says the conversion is incomplete. Finished batches are recorded under
``.siff-progress/`` so that ``resume=True`` redoes only the missing ones.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._allocator import raise_thresholds, restore_thresholds
from .._paths import any_remote, expand, has_glob, is_remote, local_path, normalize
from .._progress import Reporter, short_name
from .._remote import filesystem, naming_url, thread_pool
from ..errors import ConversionError
from ..format.constants import ENC_TIFF
from ..reader.acquisition import Acquisition
from ..reader.siff_file import SiffFile
from ..reader.source import PARTS_AHEAD, probe_ends
from . import owner
from .layout import (
    ALL_CHUNKS_STORED,
    NODES_KEY,
    PHOTON_CHUNK,
    PHOTON_SHARD,
    PLAN_KEY,
    PROGRESS,
    ROOT_KEY,
    SIFF_ZARR_VERSION,
    STARTED_KEY,
    Plan,
    Target,
    chunking,
    compressors,
    group_acquisitions,
    quiet_text_dtype,
    roundup,
    store_name,
)
from .ome import (
    create_ome,
    downsample2,
    merge_tallies,
    ome_repeats,
    pyramid_levels,
    set_rendering,
    shared_shards,
    tallies,
    to_ome_order,
    window_rows,
    windows_of,
    with_windows,
)
from .shards import write_along

__all__ = ["ConversionSummary", "Progress", "convert", "convert_file"]

log = logging.getLogger("siff_xarray.store")

class _NeedsWideArrivals(Exception):
    """A batch found an arrival time above 65535: arrival_time must be uint32."""


@dataclass
class ConversionSummary:
    """What :func:`convert` did (also printed by the CLI)."""

    source: str
    destination: str
    frames: int
    photons: int
    source_bytes: int
    store_bytes: int
    seconds: float
    batches: int
    batches_skipped: int
    already_complete: bool = False  #: ``resume`` found the store finished: nothing done

    @property
    def compression_ratio(self) -> float:
        """Source size / store size."""
        return self.source_bytes / self.store_bytes if self.store_bytes else float("nan")


@dataclass
class Progress:
    """State of a running conversion, passed to the ``progress`` callback after each batch."""

    batches_done: int
    batches_total: int
    frames_done: int
    frames_total: int
    bytes_done: int
    bytes_total: int
    photons_done: int
    elapsed_s: float

    @property
    def mb_per_s(self) -> float:
        """Source megabytes converted per second so far (this run)."""
        return self.bytes_done / 1e6 / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def eta_s(self) -> float:
        """Estimated seconds left (NaN before the first batch of this run)."""
        rate = self.bytes_done / self.elapsed_s if self.elapsed_s > 0 else 0.0
        return (self.bytes_total - self.bytes_done) / rate if rate > 0 else float("nan")


#: seconds between heartbeats of a conversion to object storage (a record is stale
#: after :data:`~.owner.STALE_AFTER_S`; every batch checks the store is still its own)
HEARTBEAT_S = 10.0


class _Tracker:
    """Accumulates batch results into :class:`Progress` and reports them."""

    def __init__(self, plan: Plan, done: set[int],
                 callback: Callable[[Progress], None] | bool | None,
                 heartbeat: Callable[[], None] | None = None,
                 heartbeat_every_s: float = 0.0) -> None:
        self.plan = plan
        self.callback = callback if callable(callback) else None
        self.heartbeat = heartbeat
        self.heartbeat_every_s = heartbeat_every_s
        self._last_beat = time.monotonic()
        self.t0 = time.perf_counter()
        self.p = Progress(
            batches_done=len(done), batches_total=plan.n_batches,
            frames_done=sum(plan.batch_frames[b][1] - plan.batch_frames[b][0] for b in done),
            frames_total=plan.batch_frames[-1][1] if plan.batch_frames else 0,
            bytes_done=0, bytes_total=sum(plan.batch_bytes[b] for b in range(plan.n_batches)
                                          if b not in done),
            photons_done=0, elapsed_s=0.0)
        # no callable: the package's progress bar (None: when someone watches)
        self.bar = None if callable(callback) else Reporter(
            f"convert {short_name(plan.destination)}", self.p.frames_total, "frames", callback,
            done=self.p.frames_done)

    def close(self) -> None:
        """Finish the progress bar, if any."""
        if self.bar is not None:
            self.bar.close()

    def __call__(self, result: tuple[int, int, int]) -> None:
        b, frames, photons = result
        p = self.p
        p.batches_done += 1
        p.frames_done += frames
        p.photons_done += photons
        p.bytes_done += self.plan.batch_bytes[b]
        p.elapsed_s = time.perf_counter() - self.t0
        log.debug("batch %d of %d done (%d frames, %d photons)", b + 1, p.batches_total,
                  frames, photons)
        # the store is still ours, and we are alive (on object storage at most every
        # HEARTBEAT_S: two round trips in the thread that hands out the next batches)
        now = time.monotonic()
        if self.heartbeat is not None and now - self._last_beat >= self.heartbeat_every_s:
            self._last_beat = now
            self.heartbeat()
        if self.bar is not None:
            self.bar.advance(frames)
        if self.callback is not None:
            self.callback(p)


def _open_source(plan: Plan) -> Acquisition:
    return _streaming(Acquisition.open(plan.sources, plan.source_options, plan.pin_version),
                      plan)


def _streaming(f: Acquisition, plan: Plan) -> Acquisition:
    """Set ``f`` up for the plan's batches: no predicted reads; remote: a batch ahead.

    A batch decodes its 16 MiB sub-batches faster than one arrives (a few tens of
    ms each, where an object store serves one connection at 50-100 MB/s), then
    writes its results for about twice as long. With :data:`PARTS_AHEAD` on
    their way, the next batch's later sub-batches were asked for only when it
    decoded, and waited; a remote source keeps the plan's largest batch's
    sub-batches on their way instead (at most twice as many; memory: that many
    16 MiB spans per thread). The benchmark conversion at 20 ms with connections
    paced to 50 MB/s: 1.10 / 1.12 / 1.15x local against 1.27 / 1.30 / 1.27x
    before (three processes each, medians of three calls alternated with local
    ones); unpaced within noise.
    """
    _fetching_itself(f)
    if any_remote(plan.sources):
        most = max((len(_sub_batches(f, *fr)) for fr in plan.batch_frames), default=0)
        f.keep_parts_ahead(min(most, 2 * PARTS_AHEAD))
    return f


def _fetching_itself(f: Acquisition) -> Acquisition:
    """Turn off the parts' prediction of reads: a batch asks for what it reads next.

    A thread's batches read sub-batches of the same shapes a constant stride apart
    (every other batch), which the parts' stride predictor took for a run to follow:
    it fetched the first bytes of batches ten ahead, which the other thread's source
    then read (4 % of an 8 GB file's bytes moved twice in one conversion).
    """
    for part in f.files:
        part.predicted_reads = 0
    return f


class _RunSources:
    """Remote sources of one run kept open in this process, and its batches to take in order.

    Opening a remote file costs a round trip or more (its header, its tail and the
    IFDs that check its cached index), and every batch checks the source's
    fingerprint anyway, so a source is kept between the batches this process
    converts and closed when the run ends; the first is the one the run's start
    opened (:func:`_open_lead`). Under a threaded scheduler the batches are also taken in order from
    :attr:`order`: a batch whose last sub-batches are being read reserves the next
    batch not yet taken (:meth:`reserve`) and fetches that batch's first bytes
    through its own source, keeping as many bytes on their way as inside a batch;
    when it has read its last byte it leaves its source, holding them, for
    whichever thread takes that batch (:meth:`pass_on`): its bytes arrive while this
    batch decodes its last frames and writes its results, not a round trip after
    the next batch started.
    """

    def __init__(self, order: list[int] | None = None) -> None:
        self.order = None if order is None else list(reversed(order))  # next at the end
        self.idle: list[Acquisition] = []
        self.ready: dict[int, Acquisition] = {}  # batch -> source fetching its first bytes
        self.taken: dict[int, Acquisition] = {}  # such a batch, taken by a thread
        self.reserved: dict[int, int] = {}  # id(source still read) -> its next batch
        #: thread id -> the batch it converts next (a chain of batches, _write_chain)
        self.chained: dict[int, int] = {}

    def take(self) -> int | None:
        """Take the next batch: one whose first bytes are on their way first (lock held).

        None when the only batches left are reserved by batches still reading
        (the run's last ones): the caller waits for their sources to be passed on.
        """
        if self.ready:
            b = min(self.ready)
            self.taken[b] = self.ready.pop(b)
            return b
        if self.order:
            return self.order.pop()
        if self.reserved:
            return None
        raise ConversionError("no batch left to convert: more tasks than batches")

    def reserve(self, f: Acquisition) -> int | None:
        """Return the batch ``f`` serves next, reserving the next one not yet taken (lock held).

        None where no batch is left (or batches are not taken in order).
        """
        if id(f) not in self.reserved:
            nxt = self.chained.pop(threading.get_ident(), None)
            if nxt is None:
                if not self.order:
                    return None
                nxt = self.order.pop()
            self.reserved[id(f)] = nxt
        return self.reserved[id(f)]

    def unreserve(self, f: Acquisition) -> None:
        """Give the batch ``f`` reserved back to the order (``f`` failed; lock held)."""
        b = self.reserved.pop(id(f), None)
        if b is not None and self.order is not None:
            self.order.append(b)

    def source(self, b: int) -> Acquisition | None:
        """Give a kept source for batch ``b``, the one with its first bytes if any (lock held)."""
        return (self.taken.pop(b, None) or self.ready.pop(b, None)
                or (self.idle.pop() if self.idle else None))

    def sources(self) -> list[Acquisition]:
        return [*self.idle, *self.ready.values(), *self.taken.values()]

    def pass_on(self, f: Acquisition, plan: Plan) -> None:
        """Keep ``f`` for the next batch not yet taken, fetching its first bytes (lock held).

        That batch is the one ``f`` reserved, if any (its first bytes are then on
        their way already). Without such a batch ``f`` waits, idle, for any batch
        that needs a source.
        """
        after = self.reserved.pop(id(f), None)
        if after is None:
            if not self.order:
                self.idle.append(f)
                return
            after = self.order.pop()
        self.ready[after] = f
        with contextlib.suppress(Exception):  # a hint: that batch's reads report errors
            for first in _sub_batches(f, *plan.batch_frames[after])[:f.parts_ahead()]:
                f.prefetch(np.arange(*first, dtype=np.int64))


#: per run id, this process's kept sources (remote sources only)
_runs: dict[str, _RunSources] = {}
#: runs that ended in this process: a batch still running keeps nothing for them,
#: and none starts. (A run id is never used again: a run that converts again with
#: wider arrival times takes a new one.)
_ended: set[str] = set()
#: per run id, this process's batches still running (with their tails): the run's
#: end here waits for them (:func:`_forget_sources`), so that none writes after it
_active: dict[str, int] = {}
_runs_lock = threading.Lock()
#: notified when a kept source is passed on or a reservation given back, and when a
#: run ends (a thread waiting for a reserved batch, :func:`_next_batch`)
_runs_changed = threading.Condition(_runs_lock)


def _checking(plan: Plan, context: str, owned: tuple[Target, str] | None = None) -> Any:
    """Start checking the plan's sources in another thread; ``.result()`` raises if changed.

    With ``owned`` (the target and run id), the check also makes sure the run
    still owns the store (:func:`.owner.check`): on object storage each is a round
    trip, and both run while the batch's first frames decode.
    """
    def fingerprint() -> None:
        _check_fingerprint(plan.sources, plan.source_options, plan.fingerprint, context,
                           plan.pin_version)

    def owned_still() -> None:
        _await_layout(owned[1])  # (the store laid out behind the first decoding)
        owner.check(*owned)

    def check() -> None:
        if owned is None:
            fingerprint()
            return
        _concurrently(owned[0], [owned_still, fingerprint])  # (their round trips at once)

    pool = ThreadPoolExecutor(1)
    job = pool.submit(check)
    pool.shutdown(wait=False)
    return job


def _sub_batches(f: Acquisition, f0: int, f1: int) -> list[tuple[int, int]]:
    """Frames ``f0:f1`` cut into runs of about :data:`SUB_BATCH_BYTES` of source data."""
    sizes = f.frame_bytes[f0:f1]
    cut = np.searchsorted(np.cumsum(sizes), np.arange(1, int(sizes.sum()) //
                          SUB_BATCH_BYTES + 1) * SUB_BATCH_BYTES) + f0
    edges = np.unique(np.concatenate([[f0], cut, [f1]]).clip(f0, f1))
    return list(zip(edges[:-1].tolist(), edges[1:].tolist(), strict=True))


@contextlib.contextmanager
def _batch_source(plan: Plan, run_id: str, b: int) -> Iterator[Acquisition]:
    """Open the plan's sources for batch ``b`` (local: closed after it; remote: kept).

    A remote source is taken from the run's kept sources (the one that fetched the
    batch's first bytes ahead, if any) and returned when the batch has read its
    bytes; a batch that fails closes it.
    """
    if not any_remote(plan.sources):
        with _open_source(plan) as f:
            yield f
        return
    with _runs_lock:
        run = _kept_run(run_id) or _RunSources()  # (None: a failed run's late batch)
        f = run.source(b)
    if f is None:
        f = _open_source(plan)
    try:
        yield f
    except BaseException:
        with _runs_changed:
            run.unreserve(f)
            _runs_changed.notify_all()
        f.close()  # a failed batch leaves nothing open behind it
        raise
    with _runs_changed:
        if run_id in _ended:  # the run ended (another batch failed): nothing is kept
            f.close()
            return
        run.pass_on(f, plan)  # the next batch's first bytes come while this one writes
        _runs_changed.notify_all()


def _kept_run(run_id: str) -> _RunSources | None:
    """Return this process's kept sources of run ``run_id``, made if new (lock held).

    None for a run that ended here (a batch of a failed run, started before it
    ended): nothing is kept for it.
    """
    if run_id in _ended:
        return None
    return _runs.setdefault(run_id, _RunSources())


def _following(plan: Plan, run_id: str, f: Acquisition) -> Callable[[], list[tuple[int, int]]]:
    """Return a call giving the sub-batches of the batch source ``f`` serves next.

    The first call reserves that batch (:meth:`_RunSources.reserve`): batches taken
    in order only (threaded schedulers, remote sources); elsewhere it gives none.
    """
    got: list[list[tuple[int, int]]] = []

    def following() -> list[tuple[int, int]]:
        if not got:
            with _runs_lock:
                run = None if run_id in _ended else _runs.get(run_id)
                after = None if run is None else run.reserve(f)
            got.append([] if after is None else _sub_batches(f, *plan.batch_frames[after]))
        return got[0]

    return following


def _next_batch(plan_json: str, run_id: str, b: int | None = None) -> tuple[int, int, int]:
    """Convert the next batch of run ``run_id`` in order (threaded schedulers only).

    Where the batches left are reserved by batches still reading, waits until one
    is passed on with its first bytes (or given back). With ``b``, batch ``b``
    (a local run's chain). The batch's last round trips are left behind, for
    :func:`_run` to wait for (:data:`_tails`).
    """
    with _runs_changed:
        while b is None:
            run = _runs.get(run_id)
            if run is None or run_id in _ended:  # another batch failed: start nothing more
                raise ConversionError(f"conversion run {run_id} has ended")
            b = run.take()
            if b is not None:
                break
            _runs_changed.wait(1.0)  # (the timeout: a check of the run, whatever happens)
    with _runs_lock:
        if run_id in _ended:  # (a chain's next batch: no tails kept for an ended run)
            raise ConversionError(f"conversion run {run_id} has ended")
        tails = _tails.setdefault(run_id, [])
        failed = next((t for t in tails if t.done() and t.exception() is not None), None)
    if failed is not None:  # an earlier batch's tail failed: start nothing more
        failed.result()
    return _write_batch(plan_json, b, run_id, tails)


#: futures of the batch tails (:func:`_write_batch`) a run's threads left behind, by
#: run (threaded schedulers; a chain waits for its own)
_tails: dict[str, list[Future[None]]] = {}


def _tail_pool() -> ThreadPoolExecutor:
    return thread_pool("siff-batch-tail", 8)


def _run_tails(run_id: str) -> list[Future[None]]:
    """Take the tails run ``run_id``'s threads left behind (:data:`_tails`)."""
    with _runs_lock:
        return _tails.pop(run_id, [])


def _await_tails(tails: list[Future[None]], raising: bool = True) -> None:
    """Wait for batch tails; with ``raising``, raise the first one's error."""
    wait(tails)
    for t in tails if raising else []:
        t.result()


#: batches a task of a distributed (or multiprocessing) conversion of remote sources
#: converts one after another (:func:`_write_chain`)
CHAIN_BATCHES = 4


def _chains(todo: list[int], slots: int, remote: bool) -> list[list[int]]:
    """Cut ``todo`` into runs of consecutive batches, one task each.

    Remote sources only: a chain's next batch has its first bytes fetched while
    the one before decodes its last frames and writes, as a threaded run's
    batches taken in order do; a task of one batch waited a round trip (and the
    first sub-batch's transfer) for its first bytes. Chains stay short enough for
    every one of ``slots`` threads to have about two.
    """
    k = max(1, min(CHAIN_BATCHES, len(todo) // max(2 * slots, 1))) if remote else 1
    return [todo[i : i + k] for i in range(0, len(todo), k)]


def _write_chain(plan_json: str, batches: list[int], run_id: str, in_run: bool = False
                 ) -> list[tuple[int, int, int]]:
    """Convert ``batches`` one after another in this thread; return each one's result.

    Each batch's source serves the next (remote sources): the batch reserves it
    (:meth:`_RunSources.reserve`), fetches its first sub-batches while it ends,
    and passes the source on with them (:meth:`_RunSources.pass_on`). Each batch's
    last round trips go on behind the next one (:func:`_write_batch`'s ``tails``):
    the task waits for them before it returns, or, ``in_run`` (a local scheduler,
    in the process of :func:`_run`), the run does.
    """
    if in_run:
        return [_next_batch(plan_json, run_id, b) for b in batches]
    plan = Plan.from_json(plan_json)
    me = threading.get_ident()
    out: list[tuple[int, int, int]] = []
    tails: list[Future[None]] = []  # (each batch's last round trips, behind the next)
    try:
        for i, b in enumerate(batches):
            run = None
            if i + 1 < len(batches) and any_remote(plan.sources):
                with _runs_lock:
                    run = _kept_run(run_id)
                    if run is not None:
                        run.chained[me] = batches[i + 1]
            try:
                out.append(_write_batch(plan_json, b, run_id, tails))
            finally:  # (a batch of no frames never asked for its next one)
                if run is not None:
                    with _runs_lock:
                        run.chained.pop(me, None)
    except BaseException:
        _await_tails(tails, raising=False)  # (nothing written behind the task's end)
        raise
    _await_tails(tails)  # the task is done when every batch's record is
    return out


#: seconds the end of a run waits for this process's batches still running (each
#: stops at its next sub-batch; one waiting on the network, at most its timeouts)
END_WAIT_S = 300.0


def _begin_batch(run_id: str, context: str) -> None:
    """Count a batch of run ``run_id`` as running here; refuse one of a run that ended."""
    with _runs_lock:
        if run_id in _ended:  # (a task that started after its run failed)
            raise ConversionError(f"{context}: the conversion run ended before this batch "
                                  "started; not converted (resume converts it)")
        _active[run_id] = _active.get(run_id, 0) + 1


def _refuse_if_ended(run_id: str, context: str) -> None:
    """Raise ConversionError if run ``run_id`` ended in this process (a batch stops)."""
    with _runs_lock:
        ended = run_id in _ended
    if ended:
        raise ConversionError(f"{context}: the run ended in this process before the "
                              "batch did; not recorded (resume converts it again)")


def _end_batch(run_id: str) -> None:
    """Count a batch of :func:`_begin_batch` done (its tail too)."""
    with _runs_changed:
        left = _active.pop(run_id, 1) - 1
        if left:
            _active[run_id] = left
        _runs_changed.notify_all()


def _forget_sources(run_id: str) -> None:
    """End run ``run_id`` in this process: stop and await its batches, close its sources.

    The sources kept for it are closed and its malloc settings restored. A batch
    still running (another thread's, when one failed: dask returns the error
    without waiting for it) stops at its next sub-batch and records
    nothing; the run gives the store up only once every write of such a batch is
    done, so none lands in a store that a resume already took over.
    """
    deadline = time.monotonic() + END_WAIT_S
    with _runs_changed:
        run = _runs.pop(run_id, None)
        _ended.add(run_id)
        _runs_changed.notify_all()
        while _active.get(run_id) and time.monotonic() < deadline:
            _runs_changed.wait(0.25)
        if _active.get(run_id):
            log.warning("conversion run %s: %d batch(es) still running after %.0f s; "
                        "the run ends without them", run_id, _active[run_id], END_WAIT_S)
        # tails a thread kept after the run took them (its batch started as the run
        # failed, then was refused): none can be added now that the run has ended
        left = _tails.pop(run_id, [])
    _await_tails(left, raising=False)
    with _run_arrays_lock:
        stores = [_run_arrays.pop(k)[0] for k in [k for k in _run_arrays if k[0] == run_id]]
    _settle(stores)  # (nothing written behind the run's end)
    restore_thresholds(run_id)  # this process's memory settings back, if the run raised them
    for f in run.sources() if run is not None else []:
        f.close()


class _ShardWriter:
    """Streams values into a 1-D sharded array from a shard-aligned ``base``.

    Only whole shards are written until :meth:`close` writes the remainder, so each
    shard is written exactly once and at most one shard is buffered.

    ``behind``: each shard is written by a thread of its own while the values of
    the next one arrive (object stores: a write waits its round trips and the
    upload, which the decoding of the next frames then hides), one at a time, so
    one more shard at most is held. The next write, or :meth:`close`, waits for it
    and raises its error. After an error elsewhere a shard on its way is simply
    finished: each shard has one content, which a retry writes again.

    ``ready``: a future each write waits for first, raising its error (a batch's
    checks of its source and of the store's owner): nothing is stored before they
    passed, while the values of the next shard go on arriving.
    """

    def __init__(self, arr: Any, base: int, dtype: str, behind: bool = False,
                 ready: Future[None] | None = None) -> None:
        self._arr = arr  # (or a call that opens it: when first written)
        #: the check a write waits for first (and raises the error of)
        self.ready = ready
        self.pos = base
        self.dtype = dtype
        self.parts: list[np.ndarray] = []
        self.buffered = 0
        self.behind = behind
        #: the shard being written behind: its thread, and the error it met
        self._writing: tuple[threading.Thread, list[BaseException]] | None = None

    @property
    def arr(self) -> Any:
        """The array written (opened by the first write when given as a call)."""
        if callable(self._arr):
            self._arr = self._arr()
        return self._arr

    def _write(self, at: int, values: np.ndarray) -> None:
        def write() -> None:
            if self.ready is not None:  # (the array is opened after it too: the store
                self.ready.result()  # may still be being laid out)
            write_along(self.arr, at, values)

        if not self.behind:
            write()
            return
        self._wait()  # (one shard on its way at a time)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                write()
            except BaseException as exc:  # raised by the next write or close
                errors.append(exc)

        thread = threading.Thread(target=run, name="siff-xarray-shard", daemon=True)
        thread.start()
        self._writing = (thread, errors)

    def _wait(self) -> None:
        if self._writing is not None:
            (thread, errors), self._writing = self._writing, None
            thread.join()
            if errors:
                raise errors[0]

    def abandon(self) -> None:
        """Wait for the shard on its way, if any, ignoring its error (the batch failed)."""
        with contextlib.suppress(BaseException):
            self._wait()

    def append(self, values: np.ndarray) -> None:
        self.parts.append(values.astype(self.dtype, copy=False))
        self.buffered += values.size
        if self.buffered >= PHOTON_SHARD:
            data = np.concatenate(self.parts)
            whole = data.size // PHOTON_SHARD * PHOTON_SHARD
            self._write(self.pos, data[:whole])
            self.pos += whole
            self.parts = [data[whole:]]
            self.buffered = data.size - whole

    def close(self) -> None:
        """Write what is buffered; return when every shard is written."""
        if self.buffered:
            data = np.concatenate(self.parts)
            self._write(self.pos, data)
            self.pos += data.size
        self.parts, self.buffered = [], 0
        self._wait()


#: source bytes decoded at a time inside a batch (bounds a worker's memory)
SUB_BATCH_BYTES = 16 * 2**20


def _open_for_batch(store: Any, path: str) -> Any:
    """Open array ``path`` for a batch's writes, storing chunks even when they hold only zeros.

    Every chunk the layout says exists is then in the store, so :func:`verify` can
    tell a deleted chunk (which zarr would read as zeros) from an empty one.
    """
    import zarr

    return zarr.open_array(store, path=path, mode="r+", zarr_format=3).with_config(
        {"write_empty_chunks": True})


#: per (run id, destination): the zarr store and the arrays this process opened for
#: the run's batches; its later batches write through them (an open reads the
#: array's metadata: a round trip or two on object storage). Dropped when the run
#: ends here (:func:`_forget_sources`).
_run_arrays: dict[tuple[str, str], tuple[Any, dict[str, Any]]] = {}
_run_arrays_lock = threading.Lock()


def _batch_store(target: Target, run_id: str) -> tuple[Any, dict[str, Any]]:
    """Return the zarr store the run's batches write through here, and its open arrays."""
    key = (run_id, target.destination)
    with _run_arrays_lock:
        if key not in _run_arrays:
            store = target.zarr(batch_writes=True)
            behind = getattr(store, "write_behind", None)
            if behind is not None:  # (S3: a batch's PUTs go on behind its next frames)
                behind()
            _run_arrays[key] = (store, {})
        return _run_arrays[key]


def _batch_array(target: Target, run_id: str, path: str) -> Any:
    """Return array ``path`` of the run's store, opened once per process and run."""
    store, arrays = _batch_store(target, run_id)
    with _run_arrays_lock:
        arr = arrays.get(path)
    if arr is None:  # (two threads may both open it: the same array either way)
        arr = _open_for_batch(store, path)
        with _run_arrays_lock:
            arrays[path] = arr
    return arr


#: arrays only some stores have (no arrival-time histogram for intensity-only pages,
#: no flyback rows without flyback frames)
_OPTIONAL_ARRAYS = ("histogram", "photons/flyback_intensity")


def _run_store(target: Target, run_id: str) -> list[Any]:
    """Return the zarr store this process's batches of the run write through (none yet: [])."""
    with _run_arrays_lock:
        got = _run_arrays.get((run_id, target.destination))
    return [got[0]] if got is not None else []


def _writes_behind(target: Target, run_id: str) -> list[Future[None]]:
    """Return the run's writes still on their way from this process (see :func:`_write_batch`)."""
    return [job for store in _run_store(target, run_id)
            for job in getattr(store, "writes_behind", list)()]


def _settle(stores: Iterable[Any]) -> None:
    """Wait until the writes behind of ``stores`` are done (a batch or run that failed)."""
    for store in stores:
        settle = getattr(store, "settle", None)
        if settle is not None:
            settle()


def _open_batch_arrays(target: Target, run_id: str, plan: Plan,
                       optional: Iterable[str] = (),
                       known: dict[str, bytes] | None = None) -> None:
    """Open the arrays a batch writes at once (object stores; a process's first batch).

    Each open reads the array's metadata: a round trip on object storage, waited
    one after another where a batch opens its arrays as it comes to them, and by
    each thread that comes to an array not yet open. ``optional`` names the arrays
    of :data:`_OPTIONAL_ARRAYS` this store has. ``known``: the metadata the caller
    wrote (keys relative to the store's root), read from there instead (the
    process that laid the store out: no request, and no need to wait until they
    are stored).
    """
    if not target.object_store:
        return
    if known:
        know = getattr(_batch_store(target, run_id)[0], "know", None)
        if know is not None:
            know({k: v for k, v in known.items() if k.endswith("zarr.json")})
    paths = ["intensity", "photons/arrival_time", "photon_count"]
    if plan.ome:
        paths += [f"ome/{k}" for k in range(plan.ome_levels)]
    present = set(optional)
    paths += [p for p in _OPTIONAL_ARRAYS if p in present]
    with _run_arrays_lock:
        opened = _run_arrays.get((run_id, target.destination), (None, {}))[1]
        paths = [p for p in paths if p not in opened]
    if len(paths) > 1:
        with ThreadPoolExecutor(len(paths)) as pool:
            list(pool.map(lambda p: _batch_array(target, run_id, p), paths))


def _concurrently(target: Target, calls: list[Callable[[], Any]]) -> list[Any]:
    """Run independent calls, at once on object stores, else in order; return their results.

    On object storage each call waits its requests' round trips, and the arrays a
    batch writes (intensity, OME levels, counts, histogram, flyback), or the steps
    of a run's finish, do not depend on each other; locally they are bound by
    compression or the disk and run in order.
    """
    if not target.object_store or len(calls) < 2:
        return [call() for call in calls]
    with ThreadPoolExecutor(len(calls)) as pool:
        jobs = [pool.submit(call) for call in calls]
    return [job.result() for job in jobs]


def _decode_batch(f: Acquisition, bounds: list[tuple[int, int]], rows: np.ndarray,
                  photons: np.ndarray, f0: int, arrival_dtype: np.dtype,
                  out: tuple[np.ndarray, np.ndarray, np.ndarray], writer: _ShardWriter,
                  descriptions: list[np.ndarray],
                  following: Callable[[], list[tuple[int, int]]] = list,
                  going_on: Callable[[], None] = lambda: None) -> int:
    """Decode a batch's frames, sub-batch by sub-batch ``bounds``; return its photons.

    Images, counts and histograms land in ``out`` at ``rows``; arrival times stream
    into ``writer`` (which stores nothing before the batch's checks passed, its
    ``ready``); each sub-batch's raw descriptions are appended to ``descriptions``.

    The sub-batches on their way while one decodes run on into those
    ``following()`` gives (the next batch this source serves; none by default), so
    as many are on their way near the batch's end as inside it. ``going_on()`` is
    called before each sub-batch and raises where the batch is to stop (its run
    ended in this process).
    """
    images, counts, hists = out
    n = 0

    def fetch_ahead(i: int) -> None:  # sub-batch i, counted on into the next batch
        if i >= len(bounds):
            nxt, i = following(), i - len(bounds)
            if i >= len(nxt):
                return
            f.prefetch(np.arange(*nxt[i], dtype=np.int64))
        else:
            f.prefetch(np.arange(*bounds[i], dtype=np.int64))

    ahead = f.parts_ahead()  # four, eight on a far link, or a batch's (_streaming)
    for i in range(ahead):  # (those of a batch passed on with its source: on their way)
        fetch_ahead(i)
    for k, (s0, s1) in enumerate(bounds):
        going_on()
        frames = np.arange(s0, s1, dtype=np.int64)
        fetch_ahead(k + ahead)  # read during this one and the next
        tau = np.empty(int(photons[s0 - f0 : s1 - f0].sum()), dtype=arrival_dtype)
        hi = f.decode_into(frames, rows[s0 - f0 : s1 - f0], images, counts, hists, tau)
        if hi > np.iinfo(arrival_dtype).max:
            raise _NeedsWideArrivals
        writer.append(tau)
        n += int(tau.size)
        # from the same bytes as the frames (remote: the span fetched ahead)
        descriptions.append(f.description_bytes(frames)[0])
        f.release()  # keep the memory map's pages out of the RSS between sub-batches
    return n


def _write_batch(plan_json: str, b: int, run_id: str, tails: list[Future[None]] | None = None
                 ) -> tuple[int, int, int]:
    """Convert batch ``b`` for run ``run_id``; returns ``(b, frames, photons)``. Runs on any worker.

    The batch's frames are decoded in sub-batches of about :data:`SUB_BATCH_BYTES`
    of source data; photons stream into whole ``arrival_time`` shards, so memory
    stays bounded by the intensity shard plus a few tens of MB, whatever the file size.

    On S3 the batch's PUTs go on in threads of their own once its shards are encoded
    (:meth:`~.layout.Target.zarr`'s ``write_behind``). Its last steps wait for them
    and then only wait round trips (its frame descriptions, the copies of its
    intensity shards to OME level 0, the ownership and source checks, its record).
    ``tails`` (object stores): those steps go to a thread of their own, whose
    future is appended; the caller waits for them before it reports the run done
    (:func:`_await_tails`), and this thread decodes the next batch meanwhile.
    Without ``tails`` they are taken before this returns. A batch that fails
    waits for its writes on their way: nothing is written behind its error.
    """
    plan = Plan.from_json(plan_json)
    _begin_batch(run_id, f"{plan.destination}: batch {b}")
    counted_here = True  # (else by the tail, which goes on behind)
    try:
        # (where a dask worker's environment fixed glibc's: see _allocator; restored
        # at the run's end here)
        raise_thresholds(run_id)
        target = Target(plan.destination, plan.destination_options)
        try:
            result, tail = _convert_batch(plan, target, b, run_id)
        except BaseException:
            _settle(_run_store(target, run_id))
            raise
        if tails is not None and target.object_store:
            tails.append(_tail_pool().submit(_counted_tail, tail, run_id))
            counted_here = False
        else:
            tail()
    finally:
        if counted_here:
            _end_batch(run_id)
    return result


def _counted_tail(tail: Callable[[], None], run_id: str) -> None:
    """Take a batch's last steps (:func:`_write_batch`), then count the batch done."""
    try:
        tail()
    finally:
        _end_batch(run_id)


def _convert_batch(plan: Plan, target: Target, b: int, run_id: str
                   ) -> tuple[tuple[int, int, int], Callable[[], None]]:
    """Decode batch ``b`` and send its data; return its result and its last steps.

    See :func:`_write_batch`, which takes those steps (``tail``).
    """
    context = f"{plan.destination}: batch {b}"
    # the source is checked while the store and the source open and the frames
    # decode (the check is a few round trips on object storage); nothing is written
    # before it passed (the arrival times' writer waits for it), and an error while
    # decoding is reported as the change when the source changed
    # ... and a conversion that lost the store writes nothing more
    checked = _checking(plan, context, (target, run_id))
    f0, f1 = plan.batch_frames[b]
    t0, t1 = b * plan.shard_t, min((b + 1) * plan.shard_t, plan.n_timepoints)
    if plan.intensity_shape is None:  # (a plan of an earlier version)
        plan.intensity_shape = list(_batch_array(target, run_id, "intensity").shape)
    shape = (t1 - t0, *plan.intensity_shape[1:])
    lead = shape[:-2]
    n_rows = int(np.prod(lead))
    # the arrays are opened (from the store's metadata) when first written, after the
    # check: the store may still be being laid out while the first frames decode
    # (_start's ``behind``)
    writer = _ShardWriter(lambda: _batch_array(target, run_id, "photons/arrival_time"),
                          plan.batch_base[b], plan.arrival_dtype, behind=target.object_store,
                          ready=checked)
    with _batch_source(plan, run_id, b) as f:
        ip = f.im_params()
        loc_all = ip.locate(np.arange(f0, f1, dtype=np.int64))
        fly = loc_all["flyback"]
        n_fly = int(fly.sum())
        # every frame's decoded values land in its stored place: the intensity block's
        # rows first, then the batch's flyback frames (one buffer, no reordering copy)
        images = np.zeros((n_rows + n_fly, *shape[-2:]), dtype=np.uint16)
        counts = np.zeros(n_rows + n_fly, dtype=np.uint32)
        nbins = ip.num_bins if f.has_photons and ip.num_bins is not None else 0
        hists = np.zeros((n_rows + n_fly if nbins else 0, max(nbins, 1)), dtype=np.uint32)
        rows = np.empty(f1 - f0, dtype=np.int64)
        idx = [loc_all["timepoint"][~fly] - t0, loc_all["slice"][~fly]]
        if len(lead) == 4:  # (time, slice, repeat, channel)
            idx.append(loc_all["repeat"][~fly])
        idx.append(loc_all["channel"][~fly])
        rows[~fly] = np.ravel_multi_index(tuple(idx), lead)
        rows[fly] = n_rows + np.arange(n_fly)
        photons = f.n_photons[f0:f1].astype(np.int64)
        arrival_dtype = np.dtype(plan.arrival_dtype)
        bounds = _sub_batches(f, f0, f1)  # one decode call per ~SUB_BATCH_BYTES
        descriptions = []
        try:
            n = _decode_batch(f, bounds, rows, photons, f0, arrival_dtype,
                              (images, counts, hists), writer, descriptions,
                              _following(plan, run_id, f),
                              functools.partial(_refuse_if_ended, run_id, context))
            checked.result()  # (before the batch's other writes)
        except Exception:
            writer.abandon()  # (its shard on its way is stored before the batch fails)
            checked.result()  # a source that changed is the error, not what decoding met
            raise
    # every byte is read: check the source again while the results are written
    checked = _checking(plan, context)
    hblock = hists[:n_rows].reshape(*lead, nbins) if nbins else None
    fly_rows = images[n_rows:].view(plan.intensity_dtype)  # (signed samples: same bits)
    _open_batch_arrays(target, run_id, plan, [p for p, some in zip(
        _OPTIONAL_ARRAYS, (hblock is not None, len(fly_rows)), strict=True) if some])
    inten = _batch_array(target, run_id, "intensity")
    block = images[:n_rows].reshape(shape)
    pc = counts[:n_rows].reshape(lead)
    if np.dtype(plan.intensity_dtype) != np.uint16:  # signed TIFF samples: same bits
        block = block.view(plan.intensity_dtype)
        # their "photon count" is the signed sum, as the siff engine reports it
        pc = block.reshape(*lead, -1).sum(axis=-1, dtype=np.int64).astype(np.uint32)

    def array(path: str) -> Any:
        return _batch_array(target, run_id, path)

    # level 0's shards that hold the intensity's bytes: copied, not compressed again,
    # by the batch's tail (each once its intensity shard is stored)
    copies: list[tuple[str, str]] = []

    def ome_level(k: int, level: np.ndarray) -> None:
        arr = array(f"ome/{k}")
        r0, r1 = t0 * ome_repeats(block), t1 * ome_repeats(block)
        end = min(r1, arr.shape[0])  # the OME image leaves a partial last volume out
        shared = shared_shards(inten, arr, t0, t1) if k == 0 else []
        copies.extend(shared)
        if end > r0 and not shared:
            write_along(arr, r0, to_ome_order(level)[: end - r0])

    def intensity() -> None:
        write_along(inten, t0, block)
        if plan.ome:  # (level 0: written, or its copies of these shards noted for the tail)
            ome_level(0, block)

    def assign(path: str, at: int, values: np.ndarray) -> Callable[[], None]:
        def write() -> None:
            array(path)[at : at + len(values)] = values
        return write

    writes = [intensity, writer.close]  # (the last photons, after the shard on its way)
    # the batch's other keys, stored by its tail while its data are on their way
    late: list[Callable[[], Any]] = []
    if plan.ome:
        level = block  # halved in the block's own (contiguous) order, then reordered
        for k in range(1, plan.ome_levels):  # the same time range: a whole shard per level
            level = downsample2(level)
            writes.append(functools.partial(ome_level, k, level))
    if plan.ome and plan.window_rows is not None and plan.window_rows[b]:
        # the contrast windows' sample of this batch's timepoints, tallied (_finish)
        rows = np.asarray(plan.window_rows[b], dtype=np.int64) - t0 * ome_repeats(block)
        counted = tallies(to_ome_order(block)[rows])
        window = [[v.tolist(), n.tolist()] for v, n in counted]
        text_w = json.dumps(window)
        late.append(lambda: target.write_text(_window_key(b), text_w))
    else:
        window = None
    writes.append(assign("photon_count", t0, pc))
    if hblock is not None:
        writes.append(assign("histogram", t0, hblock))
    if len(fly_rows):
        writes.append(assign("photons/flyback_intensity", plan.flyback_base[b], fly_rows))
    # the batch's frame descriptions, joined into photons/description by _finish (a
    # batch is done only when its record, written last, is there too)
    text = b"".join(d.tobytes() for d in descriptions)
    late.append(lambda: target.write_bytes(_description_key(b), text))
    # whether the store is still this run's (a round trip on object storage), asked
    # while its data are stored: a run that lost it records nothing more
    late.append(lambda: owner.check(target, run_id))
    _concurrently(target, writes)
    # (S3: the PUTs still on their way; this thread decodes its next batch meanwhile)
    sent = _writes_behind(target, run_id)
    record = json.dumps({"frames": f1 - f0, "photons": n})
    stores = _run_store(target, run_id)

    def copy(src: str, dst: str) -> None:  # once its intensity shard is stored
        for store in stores:
            getattr(store, "stored", lambda key: None)(src)
        target.copy(src, dst)

    def tail() -> None:  # (the batch is done only when its record, written last, is there)
        # its data, its level-0 copies and its other keys stored, each waiting only
        # its own round trips (a copy: its shard's PUT first)
        _concurrently(target, [functools.partial(_await_tails, sent),
                               *(functools.partial(copy, src, dst) for src, dst in copies),
                               *late])  # (its data's error first, where both failed)
        checked.result()
        _refuse_if_ended(run_id, context)  # (the run failed here while this batch went on)
        target.write_text(f"{PROGRESS}/batch-{b:06d}", record)
        _keep(run_id, b, text, window)

    return (b, f1 - f0, n), tail


def _prepare(sources: list[str], target: Target, build: Any,
             source_options: dict[str, Any] | None, shard_bytes: int, chunk_bytes: int,
             arrival_dtype: str, ome: bool, ome_levels: int | None, lead: Acquisition) -> Plan:
    """Create every array (metadata and the small per-frame arrays) in zarr store ``build``.

    ``lead`` holds the sources, open (see :func:`_open_lead`). Returns the plan of
    the conversion into ``target``.
    """
    from ..backend import open_acquisition, open_siff

    # lossless: the frames of a partial last volume are converted too; the Dataset is
    # built on the open files (not closed here: closing it would close them)
    ds = (open_siff(lead.files[0], partial_volume="keep") if len(lead.files) == 1 else
          open_acquisition(lead.files, partial_volume="keep"))
    f = lead
    # later opens anywhere skip the walk (read-only places: skipped). On object
    # storage an upload waits a round trip or two (a sidecar not looked for by the
    # open is read first): the sidecars go behind the plan and the first batches,
    # and the sources close only once they are done (Acquisition.aside)
    for part in f.files:
        f.aside(functools.partial(_upload_sidecar, part))
    return _plan(sources, target, build, source_options, shard_bytes, chunk_bytes,
                 arrival_dtype, ome, ome_levels, f, ds)


def _upload_sidecar(part: SiffFile) -> None:
    """Write ``part``'s sidecar (read-only places: skipped); an error is only logged."""
    try:
        part.write_sidecar()
    except Exception as exc:  # (the sidecar only speeds later opens up)
        log.warning("%s: its sidecar was not written (%s)", part.name, exc)


def _plan(sources: list[str], target: Target, build: Any,
          source_options: dict[str, Any] | None, shard_bytes: int, chunk_bytes: int,
          arrival_dtype: str, ome: bool, ome_levels: int | None, f: Acquisition,
          ds: Any) -> Plan:
    """Create the arrays of :func:`_prepare` and return the plan (``f``: the sources)."""
    import zarr

    tiff = f.encoding == ENC_TIFF
    if tiff.any() and not tiff.all():
        raise ConversionError(
            f"{sources[0]}: mixes intensity-only TIFF pages with photon frames; "
            "convert files of one kind at a time")
    intensity_only = bool(tiff.all()) and tiff.size > 0
    signed = f.signed.astype(np.int8)
    ip = f.im_params()
    n_frames = f.num_frames
    fmap = ds.frame_index.values
    n_t = fmap.shape[0]
    vol_shape = ds.intensity.shape[1:]
    ct, st = chunking(vol_shape, n_t, shard_bytes, chunk_bytes)
    n_batches = -(-n_t // st)
    # batch b: timepoints [b*st, (b+1)*st) = file frames [b*st*P, (b+1)*st*P)
    p = ip.file_frames_per_volume
    bounds = [min(b * st * p, n_frames) for b in range(n_batches)] + [n_frames]
    batch_frames = [[bounds[b], bounds[b + 1]] for b in range(n_batches)]
    counts = f.n_photons.astype(np.int64)
    starts = np.zeros(n_frames, dtype=np.int64)
    batch_base = []
    end = 0
    for f0, f1 in batch_frames:  # one iteration per batch (shard), not per frame
        base = roundup(end, PHOTON_SHARD)
        batch_base.append(base)
        c = counts[f0:f1]
        starts[f0:f1] = base + np.concatenate([[0], np.cumsum(c)[:-1]]) if len(c) \
            else starts[f0:f1]
        end = base + int(c.sum())
    loc = ip.locate(np.arange(n_frames))
    fly_frames = np.flatnonzero(loc["flyback"])
    flyback_base = [int(np.searchsorted(fly_frames, f0)) for f0, _ in batch_frames]
    batch_bytes = [int(f.frame_bytes[f0:f1].sum()) for f0, f1 in batch_frames]
    ts = f.timestamps()
    dlen = f.description_lengths  # the bytes come from the batches (_finish)
    encoding = f.encoding.astype(np.int8)
    h, w = f.frame_shape
    source_bytes = int(f.file_size)
    total_len = max(end, 1)
    inten_dtype = str(ds.intensity.dtype)

    # --- the root Dataset: metadata now, data by the batches
    enc_inten = {"chunks": (ct, *vol_shape), "shards": (st, *vol_shape),
                 "compressors": compressors()}
    template = ds.drop_vars([v for v in ("mean_arrival",) if v in ds])
    if "source_file" in template:  # the store holds these photons, at store frames
        sf = template.source_file
        template["source_file"] = sf.copy(data=np.where(
            fmap >= 0, normalize(target.destination), "").reshape(sf.shape))
        template["source_frame"] = template.source_frame.copy(data=fmap.copy())
    lazy = [v for v in ("intensity", "photon_count", "histogram") if v in template]
    for v in lazy:  # (named by the store: tokenizing would pickle, reopening, the files)
        template[v] = template[v].chunk({"time": st}, token=f"{target.destination}/{v}")
    encoding_all: dict[str, dict[str, Any]] = {"intensity": enc_inten}
    for v in ("photon_count", "histogram"):
        if v in template:
            encoding_all[v] = {"chunks": (st, *template[v].shape[1:]),
                               "compressors": compressors()}
    for v in template.variables:  # coordinates and eager variables: checksummed too
        encoding_all.setdefault(str(v), {"compressors": compressors()})
    store = build
    with quiet_text_dtype():
        template.to_zarr(store, mode="w-", compute=False, encoding=encoding_all,
                         consolidated=False, zarr_format=3, write_empty_chunks=True)
    levels = pyramid_levels(ds.sizes["y"], ds.sizes["x"], ome_levels)
    sampled = None
    if ome:
        create_ome(store, ds, ct, st, levels)
        if np.dtype(inten_dtype) in (np.uint16, np.int16):  # (tallies: 16-bit counts)
            # the batches tally the timepoints the contrast windows are taken from,
            # as they write them; the finish then reads no image data back
            level0 = zarr.open_array(store, path="ome/0", mode="r", zarr_format=3)
            sampled = [[] for _ in range(n_batches)]
            for r in window_rows(level0.shape[0], level0.chunks[0]).tolist():
                sampled[r // level0.shards[0]].append(r)  # (a batch: a shard of each level)

    # --- the photons group
    grp = zarr.open_group(store, path="photons", mode="a")
    grp.attrs.update({
        "siff_zarr_version": SIFF_ZARR_VERSION,
        "source_bytes": source_bytes,
        "layout": "intensity-only" if intensity_only else "pixel-sorted",
        "description": "every photon of every file frame; within a frame in pixel order; "
                       "a photon's pixel follows from the frame's count image",
        "tau_bin_ps": ip.picoseconds_per_bin if ip.picoseconds_per_bin is not None else -1.0,
        "n_tau_bins": ip.num_bins if ip.num_bins is not None else -1,
        # every chunk of every array is written, empty ones too: a missing one is an error
        ALL_CHUNKS_STORED: True,
    })
    every_chunk = {"write_empty_chunks": True}
    arr = grp.create_array("arrival_time", shape=(total_len,), dtype=arrival_dtype,
                           chunks=(PHOTON_CHUNK,), shards=(PHOTON_SHARD,),
                           compressors=compressors(), fill_value=0,
                           dimension_names=("photon",), config=every_chunk)
    if end == 0:  # no photons: no batch writes the one shard, so it is written here
        arr[...] = 0

    def small(name: str, data: np.ndarray, dims: tuple[str, ...]) -> None:
        a = grp.create_array(name, shape=data.shape, dtype=data.dtype,
                             chunks=data.shape if data.size else (1,) * data.ndim,
                             compressors=compressors(), dimension_names=dims,
                             config=every_chunk)
        if data.size:
            a[...] = data

    small("photon_start", starts.astype(np.uint64), ("frame",))
    small("photon_count", counts.astype(np.uint32), ("frame",))
    small("encoding", encoding, ("frame",))
    small("experiment_s", ts.experiment_s, ("frame",))
    small("epoch_laser_ns", ts.epoch_laser_ns, ("frame",))
    small("epoch_system_ns", ts.epoch_system_ns, ("frame",))
    dstart = np.concatenate([[0], np.cumsum(dlen, dtype=np.uint64)[:-1]]).astype(np.uint64)
    n_desc = int(dlen.sum())
    grp.create_array("description", shape=(n_desc,), dtype=np.uint8,
                     chunks=(max(n_desc, 1),), compressors=compressors(),
                     dimension_names=("byte",), config=every_chunk)
    small("description_start", dstart, ("frame",))
    small("description_length", dlen.astype(np.uint32), ("frame",))
    small("flyback_frame", fly_frames.astype(np.int64), ("flyback",))
    per_batch_fly = max([np.searchsorted(fly_frames, f1) - np.searchsorted(fly_frames, f0)
                         for f0, f1 in batch_frames] + [1])
    if intensity_only:
        small("signed", signed, ("frame",))
    grp.create_array("flyback_intensity", shape=(len(fly_frames), h, w), dtype=inten_dtype,
                     chunks=(int(per_batch_fly), h, w), compressors=compressors(),
                     fill_value=0, dimension_names=("flyback", "y", "x"))
    # flyback rows of one batch must share no chunk with another batch's rows
    if len(fly_frames) and any(fb % per_batch_fly for fb in flyback_base):
        raise ConversionError("internal: flyback rows are not chunk-aligned")  # pragma: no cover

    return Plan(sources=list(sources), source_options=source_options,
                 destination=target.destination, destination_options=target.storage_options,
                 shard_t=st, n_timepoints=n_t, batch_frames=batch_frames,
                 batch_base=batch_base, flyback_base=flyback_base, batch_bytes=batch_bytes,
                 arrival_dtype=arrival_dtype, n_photons_total=int(counts.sum()), ome=ome,
                 ome_levels=levels, intensity_only=intensity_only,
                 intensity_dtype=inten_dtype, window_rows=sampled,
                 intensity_shape=[int(n_t), *(int(n) for n in vol_shape)])


def _description_key(b: int) -> str:
    return f"{PROGRESS}/description-{b:06d}"


def _read_each(target: Target, items: list[Any], read: Callable[[Any], Any]) -> list[Any]:
    """Return ``read(item)`` of each item: at once on object stores, else in order.

    (On object storage each read waits a round trip.)
    """
    if not target.object_store or len(items) < 2:
        return [read(x) for x in items]
    with ThreadPoolExecutor(min(len(items), 32)) as pool:
        return list(pool.map(read, items))


def _window_key(b: int) -> str:
    return f"{PROGRESS}/window-{b:06d}.json"


def _batch_windows(target: Target, plan: Plan, kept: _Kept | None = None
                   ) -> list[dict[str, float]] | None:
    """Return the contrast windows of the batches' tallies, or None where one is missing.

    Those ``kept`` in this process are not read. (A store started by an earlier
    version has none: its windows are read from the data, :func:`set_rendering`.)
    """
    if plan.window_rows is None or not plan.ome:
        return None
    batches = [b for b, rows in enumerate(plan.window_rows) if rows]
    known = kept.windows if kept is not None else {}

    def read(b: int) -> Any:
        try:
            return json.loads(target.read_text(_window_key(b)))
        except FileNotFoundError:
            return None

    unread = [b for b in batches if b not in known]
    got = dict(zip(unread, _read_each(target, unread, read), strict=True))
    parts = [known[b] if b in known else got[b] for b in batches]
    if any(p is None for p in parts):
        return None
    return windows_of(merge_tallies(parts)) if parts else None


def _write_descriptions(target: Target, plan: Plan, kept: _Kept | None = None) -> None:
    """Join the batches' frame descriptions into ``photons/description``.

    Each batch stored its frames' descriptions, read from the bytes it fetched
    for the frames (on object storage a per-frame read of the descriptions
    costs one request per frame). Those ``kept`` in this process are not read,
    and where the array's metadata are kept too, its chunk is encoded here and
    written with one request (no read of its metadata first).
    """
    known = kept.descriptions if kept is not None else {}
    meta = kept.nodes.get("photons/description") if kept is not None else None
    unread = [b for b in range(plan.n_batches) if b not in known]

    def parts() -> list[bytes]:  # (fs.cat would ask each object's size first)
        return _read_each(target, [_description_key(b) for b in unread], target.read_bytes)

    def array() -> Any:  # (written whole, once: the batches' store need not look first)
        if meta is not None:
            return None
        return _open_for_batch(target.zarr(batch_writes=True), "photons/description")

    read, arr = _concurrently(target, [parts, array])
    got = dict(zip(unread, read, strict=True))
    data = np.frombuffer(b"".join(known[b] if b in known else got[b]
                                  for b in range(plan.n_batches)), dtype=np.uint8)
    size = arr.shape[0] if arr is not None else int(meta["shape"][0])
    if data.size != size:
        raise ConversionError(f"{target.destination}: the batches hold {data.size} bytes of "
                              f"frame descriptions, the source's IFDs {size}")
    if arr is not None:
        if data.size:
            arr[...] = data
    elif data.size:
        target.write_many({target.key(k): v for k, v in
                           _encoded("photons/description", meta, data).items()})
    _phase("descriptions")


def _encoded(path: str, meta: dict[str, Any], data: np.ndarray) -> dict[str, bytes]:
    """Return the store keys and bytes of array ``path`` (metadata ``meta``) holding ``data``.

    As zarr writes them, every chunk stored (also empty ones), built in memory.
    """
    from zarr.buffer import default_buffer_prototype
    from zarr.storage import MemoryStore

    meta_key = f"{path}/zarr.json"
    held = {meta_key: default_buffer_prototype().buffer.from_bytes(json.dumps(meta).encode())}
    _open_for_batch(MemoryStore(held), path)[...] = data
    return {k: v.to_bytes() for k, v in held.items() if k != meta_key}


def _finish(target: Target, run_id: str, plan: Plan) -> tuple[dict[str, Any], int]:
    """Publish the store: write the root metadata, with every node's consolidated.

    The listing that tells every batch finished, the check that the store is
    still this run's, the frame descriptions, the root's metadata and the other
    nodes' (after the contrast windows are written into ``ome``'s) are
    independent: on object storage they are done at once, each waiting its own
    round trips (the ownership is checked two round trips before the root is
    written, against a stale limit of minutes). The progress records that listing
    found are then deleted without listing them again. Returns the root's
    metadata as written and the bytes the published store holds (listed while the
    progress records are removed).
    """
    with _kept_lock:  # (what this process stored for the run: not read back)
        kept = _kept.get(run_id)

    def recorded() -> dict[str, Any] | None:
        if kept is not None:
            return json.loads(json.dumps(kept.nodes))  # (a copy: changed below)
        try:  # as the start wrote them (one GET)
            return json.loads(target.read_text(NODES_KEY))
        except FileNotFoundError:  # (a store started by an earlier version)
            return None

    def nodes() -> dict[str, Any]:
        # contrast windows from the batches' tallies (else from the data, for viewers),
        # while the nodes are read
        calls: list[Callable[[], Any]] = [recorded]
        if plan.ome:
            calls.append(lambda: _batch_windows(target, plan, kept))
        known, *found = _concurrently(target, calls)
        if found and found[0] is not None and known is not None and "ome" in known:
            # ome's zarr.json as the start wrote it, with its windows (one PUT)
            known["ome"] = {**known["ome"], "attributes": {
                **known["ome"].get("attributes", {}),
                "ome": with_windows(known["ome"]["attributes"]["ome"], found[0])}}
            target.write_text("ome/zarr.json", json.dumps(known["ome"], indent=2))
            return _consolidate(known)
        rendered = set_rendering(target.zarr()) if plan.ome else None
        if known is None:  # (after the windows: ome's zarr.json as they left it)
            return _consolidated(target, _node_keys(target))
        if rendered is not None:  # ome's gets its contrast windows
            known["ome"] = {**known["ome"], "attributes": {  # (the one attribute changed)
                **known["ome"].get("attributes", {}), "ome": rendered}}
        return _consolidate(known)

    progress: set[str] = set()

    def all_done() -> None:  # every batch recorded: one listing, kept for the cleanup
        names = target.listed(PROGRESS)
        progress.update(names)
        missing = set(range(plan.n_batches)) - target.done_batches(names)
        if missing:
            raise ConversionError(f"{target.destination}: batches {sorted(missing)[:5]} "
                                  "did not finish")

    # (the listing first: a batch that did not finish is the error, not the missing
    # description its join met)
    *_, meta, consolidated = _concurrently(target, [
        all_done,
        lambda: owner.check(target, run_id),  # only the store's owner publishes it
        lambda: _write_descriptions(target, plan, kept),
        lambda: json.loads(kept.root if kept is not None else target.read_text(ROOT_KEY)),
        nodes])
    meta["consolidated_metadata"] = consolidated
    _phase("finishing")
    # atomically: a full disk leaves a temporary key, never a truncated root; until the
    # progress records are gone the store still counts as unfinished (resume redoes this)
    target.write_text("zarr.json", json.dumps(meta, indent=2), atomic=True)
    _phase("published")

    def cleanup() -> None:  # (object stores: the keys listed, deleted without a listing)
        if target.object_store:
            target.remove(sorted(progress))
        else:
            target.fs.rm(target.key(PROGRESS), recursive=True)

    _, store_bytes = _concurrently(target, [cleanup,
                                            lambda: _store_bytes(target, but=PROGRESS)])
    return meta, store_bytes


def _node_keys(target: Target) -> list[str]:
    """Keys of the store's nodes below the root (those with a ``zarr.json``), sorted."""
    target.fs.invalidate_cache()
    names = sorted(p for p in target.fs.find(target.root) if p.endswith("/zarr.json"))
    keys = [n[len(target.root) + 1 : -len("/zarr.json")] for n in names]
    return [k for k in keys if k and not k.startswith(PROGRESS)]


def _consolidated(target: Target, keys: list[str]) -> dict[str, Any]:
    """Return the metadata of nodes ``keys`` (:func:`_node_keys`) as zarr consolidates it.

    Built here rather than by ``zarr.consolidate_metadata`` so that the root
    ``zarr.json`` is written once, last, already consolidated: ``xr.open_zarr``
    then opens the store with one metadata read and no fallback warning, and an
    interruption never leaves a half-rewritten root. (Consolidated metadata is a
    zarr-python convention, not yet part of the Zarr v3 specification; readers
    that do not know it ignore it: ``must_understand`` is false.)
    """
    texts = target.fs.cat([target.key(f"{k}/zarr.json") for k in keys])
    return _consolidate({k: json.loads(texts[target.key(f"{k}/zarr.json")]) for k in keys})


def _consolidate(nodes: dict[str, Any]) -> dict[str, Any]:
    """Return the root's ``consolidated_metadata`` of ``{node: its zarr.json}``."""
    metadata = {}
    for k in sorted(nodes):
        node = dict(nodes[k])
        if node.get("node_type") == "group":
            node["consolidated_metadata"] = {"kind": "inline", "must_understand": False,
                                             "metadata": {}}
        metadata[k] = node
    return {"kind": "inline", "must_understand": False, "metadata": metadata}


def _store_bytes(target: Target, but: str | None = None) -> int:
    """Return the bytes of the store's keys (those under ``but`` left out; 0 if unknown)."""
    try:
        if but is None:
            return int(target.fs.du(target.root))
        skip = target.key(but).rstrip("/") + "/"
        target.fs.invalidate_cache()  # (a listing cached during the run is stale)
        sizes = target.fs.du(target.root, total=False)
        return int(sum(n for k, n in sizes.items() if not _under(k, skip)))
    except Exception:  # pragma: no cover - some filesystems cannot du
        return 0


def _under(path: str, prefix: str) -> bool:
    """Tell whether ``path`` (as a filesystem lists it) is under ``prefix`` (a key)."""
    return path.split("://", 1)[-1].startswith(prefix.split("://", 1)[-1])


def _expand_sources(sources: str | os.PathLike[str] | Sequence[Any],
                    storage_options: dict[str, Any] | None) -> list[str] | None:
    """Return the sources as a list, or None when ``sources`` names one file (no glob)."""
    if isinstance(sources, (str, os.PathLike)):
        text = os.fspath(sources)
        if not has_glob(text):
            return None
        return [os.fspath(p) for p in expand(text, storage_options)]
    return [os.fspath(p) for p in sources]


def convert(
    source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    destination: str | os.PathLike[str],
    **kwargs: Any,
) -> ConversionSummary | list[ConversionSummary]:
    """Convert ``.siff`` files to Zarr v3 stores, one store per acquisition.

    With one file (a path or URL without wildcards), ``destination`` is the store and
    one :class:`ConversionSummary` is returned. With a list or a glob pattern, the
    files are grouped into acquisitions (:func:`group_acquisitions`: the numbered
    parts ``name_00001.siff``, ``name_00002.siff``... of a split acquisition become
    one store), ``destination`` is a directory (or URL prefix) receiving one store per
    acquisition named by :func:`store_name`, and a list of summaries is returned.
    Keyword arguments are those of :func:`convert_file`.
    """
    many = _expand_sources(source, kwargs.get("storage_options"))
    if many is None:
        return convert_file(source, destination, **kwargs)  # type: ignore[arg-type]
    if not many:
        raise ConversionError("no source files given")
    groups = group_acquisitions(many)
    names = [store_name(g[0]) for g in groups]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ConversionError(f"several sources would become the same store {sorted(dup)[0]}")
    dst = os.fspath(destination).rstrip("/")
    return [convert_file(g if len(g) > 1 else g[0], f"{dst}/{n}", **kwargs)
            for g, n in zip(groups, names, strict=True)]


def convert_file(
    source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    destination: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    resume: bool = False,
    scheduler: Any = "threads",
    num_workers: int | None = None,
    storage_options: dict[str, Any] | None = None,
    target_options: dict[str, Any] | None = None,
    shard_bytes: int = 64 * 2**20,
    chunk_bytes: int = 2 * 2**20,
    ome: bool = True,
    ome_levels: int | None = None,
    progress: Callable[[Progress], None] | bool | None = None,
    allow_truncated: bool = False,
    pin_version: bool = True,
) -> ConversionSummary:
    """Convert one ``.siff`` file (or one split acquisition) to a Zarr v3 store, losslessly.

    Parameters
    ----------
    source
        Local path or fsspec URL of the ``.siff`` file (opened read-only), or the
        ordered parts of one acquisition (``name_00001.siff``, ...), which become one
        store with frames numbered across the parts (as :func:`open_acquisition`).
    destination
        Local path or fsspec URL of the store to create (e.g. ``s3://bucket/run.zarr``).
    overwrite
        Replace an existing store (a finished store is never replaced without it).
    resume
        Finish an interrupted conversion into ``destination``, redoing only the batches
        that were not recorded as finished.
    scheduler
        Dask scheduler: ``"threads"`` (default), ``"processes"``, ``"sync"``, or a
        ``dask.distributed.Client`` (or its address).
    num_workers
        Threads/processes for the local schedulers.
    storage_options, target_options
        fsspec options for the source and for the destination.
    shard_bytes, chunk_bytes
        Target sizes of an ``intensity`` shard (one batch) and chunk.
    ome
        Also write ``ome/``: an OME-Zarr (NGFF 0.5) image of the intensity in NGFF's
        ``(t, c, z, y, x)`` axis order, for napari and other OME-Zarr viewers (it
        doubles the space the intensity takes; the photons are unaffected).
    ome_levels
        Levels of its multiscale pyramid (each halves y and x by 2 x 2 means); default:
        halve while both sides stay at least 32 pixels (256 x 128 frames: 3 levels).
    allow_truncated
        Convert the complete frames of a source that has bytes after its last frame
        (an acquisition cut off mid-write, or a damaged IFD chain that hides frames);
        by default such a source is refused, so that a store is never mistaken for
        the whole file (``SiffFile.unread_bytes`` tells how much is left out).
    pin_version
        Remote sources: every read, and the check of the source before each batch,
        requires the version (ETag) the conversion started from (default; a
        replaced source stops the conversion). ``False`` for servers that give one
        object different ETags from one request to the next (as some load-balanced
        ones do): the source is then recognised by its size and the digest of its
        first and last 64 KiB only (see :class:`~siff_xarray.SiffFile`).
    progress
        A callable is called with a :class:`Progress` after each batch. Otherwise a
        progress bar over the frames: ``None`` (default) when someone watches (a
        terminal or a notebook) and the conversion takes over a second, ``True``
        always, ``False`` never (see :func:`siff_xarray.set_progress`). Progress is
        also logged at DEBUG level on the ``siff_xarray.store`` logger.

    Returns
    -------
    ConversionSummary

    Raises
    ------
    ConversionError
        If the destination holds a store and neither ``overwrite`` nor ``resume`` is
        given, or ``resume`` finds no interrupted conversion of this source.

    """
    with naming_url(os.fspath(destination)):  # a destination that times out or is gone
        return _convert(source, destination, overwrite, resume, scheduler, num_workers,
                        storage_options, target_options, shard_bytes, chunk_bytes, ome,
                        ome_levels, progress, allow_truncated, pin_version)


def _check_settings(scheduler: Any, num_workers: int | None, shard_bytes: int,
                    chunk_bytes: int) -> None:
    """Refuse settings a conversion cannot run with, before it writes anything.

    A scheduler name dask does not know failed only once the store was laid out,
    leaving an interrupted conversion that the next call refused to replace.
    """
    if isinstance(scheduler, str) and scheduler.lower() not in SCHEDULERS \
            and not is_remote(scheduler):
        raise ValueError(f"scheduler {scheduler!r}: not one of {', '.join(SCHEDULERS)}, "
                         "nor a dask.distributed scheduler's address (tcp://host:port)")
    if num_workers is not None and int(num_workers) < 1:
        raise ValueError(f"num_workers (--workers) must be at least 1, not {num_workers}")
    for name, value in (("shard_bytes (--shard-mb)", shard_bytes),
                        ("chunk_bytes", chunk_bytes)):
        if not value > 0:
            raise ValueError(f"{name} must be positive, not {value}")


def _convert(source: Any, destination: Any, overwrite: bool, resume: bool, scheduler: Any,
             num_workers: int | None, storage_options: dict[str, Any] | None,
             target_options: dict[str, Any] | None, shard_bytes: int, chunk_bytes: int,
             ome: bool, ome_levels: int | None,
             progress: Callable[[Progress], None] | bool | None,
             allow_truncated: bool, pin_version: bool = True) -> ConversionSummary:
    """Convert as :func:`convert_file` says (which maps network failures to clear errors)."""
    t_start = time.perf_counter()
    srcs = ([os.fspath(source)] if isinstance(source, (str, os.PathLike))
            else [os.fspath(x) for x in source])
    if not srcs:
        raise ConversionError("no source files given")
    _check_settings(scheduler, num_workers, shard_bytes, chunk_bytes)  # (before any write)
    if isinstance(scheduler, str) and not is_remote(scheduler):
        scheduler = scheduler.lower()  # (as dask takes the names)
    src = srcs[0] if len(srcs) == 1 else f"{srcs[0]} (+{len(srcs) - 1} more parts)"
    target = Target(os.fspath(destination), target_options)
    run_id = owner.new_run_id()
    # on object stores one listing of the root tells whether anything is there, and
    # what (each check on its own lists again: twice where nothing is, as s3fs then
    # lists the parent too); a new run opens its sources meanwhile (an error of the
    # open is raised where the open was, after the store's own errors)
    fresh = overwrite or not resume
    spares: list[Future[Acquisition]] = []  # (see _convert_with)
    early: Acquisition | BaseException | None = None
    if target.object_store:
        pool = ThreadPoolExecutor(1)
        listing = pool.submit(target.listed)
        pool.shutdown(wait=False)
        if fresh:
            try:
                early = _open_lead(srcs, storage_options, allow_truncated, pin_version)
            except Exception as exc:
                early = exc
        try:
            top = listing.result()
        except BaseException:
            if isinstance(early, Acquisition):
                early.close()
            raise
    else:
        top = None
    try:
        return _convert_with(srcs, src, target, run_id, top, early, overwrite, resume,
                             scheduler, num_workers, storage_options, shard_bytes,
                             chunk_bytes, ome, ome_levels, progress, allow_truncated,
                             pin_version, t_start, spares)
    finally:  # (an open made early and not used: the store refused the run)
        if isinstance(early, Acquisition):
            early.close()
        for f in _spares_opened(spares):
            f.close()


def _convert_with(srcs: list[str], src: str, target: Target, run_id: str,
                  top: set[str] | None, early: Acquisition | BaseException | None,
                  overwrite: bool, resume: bool, scheduler: Any, num_workers: int | None,
                  storage_options: dict[str, Any] | None, shard_bytes: int, chunk_bytes: int,
                  ome: bool, ome_levels: int | None,
                  progress: Callable[[Progress], None] | bool | None, allow_truncated: bool,
                  pin_version: bool, t_start: float,
                  spares: list[Future[Acquisition]] | None = None) -> ConversionSummary:
    """:func:`_convert` once the store is listed (``top``; None: not an object store).

    ``early``: the sources of a new run, opened while the store was listed (or the
    error that open raised), used by the run's start in place of its own open.
    ``spares``: the sources opened for the run's other threads (:func:`_open_spares`).
    """
    interrupted = (top is None or PROGRESS in top) and target.interrupted()
    if interrupted:  # never resume, delete or mix a store that another run is writing
        owner.refuse_if_owned(target)
    finished = not interrupted and ("zarr.json" in top if top is not None
                                    else target.exists("zarr.json"))
    if finished and not overwrite:
        if resume:  # idempotent: a batch job can simply be run again
            return _already_complete(srcs, src, target, storage_options, t_start)
        raise ConversionError(f"{target.destination}: a finished store exists; pass "
                              "overwrite=True (--overwrite) to replace it")
    lead: Acquisition | None = None  # the sources opened for a run's start (_open_lead)
    try:
        if resume and not overwrite:
            if not interrupted:
                raise ConversionError(f"{target.destination}: no interrupted conversion to resume")
            if target.exists(PLAN_KEY):
                plan = Plan.from_json(target.read_text(PLAN_KEY))
                _same_sources(target, plan.sources, srcs)
                # unpinned if either run was: a pinned run's stamps are not compared
                plan.pin_version = plan.pin_version and pin_version
                _check_fingerprint(plan.sources, plan.source_options, plan.fingerprint,
                                   f"{target.destination}: cannot resume", plan.pin_version)
                owner.claim(target, run_id)  # takes over from the dead run
            else:  # interrupted before the first batch: nothing to keep, start again
                started = json.loads(target.read_text(STARTED_KEY))
                _same_sources(target, started["sources"], srcs)
                log.info("%s: interrupted before its first batch; starting again", src)
                target.fs.rm(target.root, recursive=True)
                lead = _open_lead(srcs, storage_options, True, pin_version)
                plan = _start(srcs, target, storage_options, run_id=run_id, lead=lead,
                              **started["layout"])
        else:
            if interrupted and not overwrite:
                raise ConversionError(f"{target.destination}: holds an interrupted conversion; "
                                      "pass resume=True (--resume) to finish it or overwrite=True "
                                      "(--overwrite) to start again")
            # (on object stores the listing says both: a store is its keys)
            there = bool(top) if top is not None else target.fs.exists(target.root)
            if there:
                if not overwrite and (target.object_store or target.fs.ls(target.root)):
                    raise ConversionError(f"{target.destination}: exists and is not empty; pass "
                                          "overwrite=True (--overwrite) to replace it")
                target.fs.rm(target.root, recursive=True)
            if isinstance(early, BaseException):
                raise early
            lead = early if early is not None else _open_lead(srcs, storage_options,
                                                              allow_truncated, pin_version)
            # a remote source is opened for each other thread of the run too, now:
            # its round trips pass while the store is laid out, and that thread's
            # first batch finds it (its first bytes on their way) instead of opening
            # its own. (Not for a source cut off mid-write: each open would warn.)
            if spares is not None and not any(f.unread_bytes for f in lead.files):
                spares.extend(_open_spares(srcs, storage_options, pin_version,
                                           _threads(scheduler, num_workers) - 1))
            # (object stores, batches in this process: laid out behind the first ones)
            behind = target.object_store and isinstance(scheduler, str) and \
                scheduler in _THREADED
            plan = _start(srcs, target, storage_options, shard_bytes, chunk_bytes, "uint16", ome,
                          ome_levels, run_id=run_id, lead=lead, behind=behind)
        try:
            skipped = _run(plan, target, run_id, scheduler, num_workers, progress, lead,
                           spares)
        except _NeedsWideArrivals:
            log.info("%s: arrival times above 65535; converting again with uint32", src)
            owner.check(target, run_id)
            # (every batch of the run has stopped, here and on the workers: _run's end)
            target.fs.rm(target.root, recursive=True)
            # the new layout is another run's: a batch of the first one (a task that
            # starts late on a worker) is refused there and fails its ownership check
            with _kept_lock:
                _kept.pop(run_id, None)
            _await_layout(run_id, raising=False, forget=True)
            run_id = owner.new_run_id()
            lead = _open_lead(srcs, storage_options, True, plan.pin_version)
            plan = _start(srcs, target, storage_options, shard_bytes, chunk_bytes, "uint32",
                          plan.ome, plan.ome_levels, run_id=run_id, lead=lead)
            skipped = _run(plan, target, run_id, scheduler, num_workers, progress, lead)
        meta, store_bytes = _finish(target, run_id, plan)
    except BaseException:  # an error or an interrupt: resume may take the store at once
        _await_layout(run_id, raising=False, forget=True)  # (nothing more written behind)
        _forget_sources(run_id)  # (arrays the start opened for the batches)
        owner.release(target, run_id)
        raise
    finally:  # (closing twice is harmless: a run may have closed it)
        if lead is not None:
            lead.close()
        with _kept_lock:
            _kept.pop(run_id, None)
    # (the photons' node as published: no request)
    photons_meta = meta["consolidated_metadata"]["metadata"]["photons"]
    src_bytes = int(photons_meta["attributes"]["source_bytes"])
    return ConversionSummary(source=src, destination=target.destination,
                             frames=sum(b - a for a, b in plan.batch_frames),
                             photons=plan.n_photons_total, source_bytes=src_bytes,
                             store_bytes=store_bytes,
                             seconds=time.perf_counter() - t_start, batches=plan.n_batches,
                             batches_skipped=skipped)


def _open_lead(srcs: list[str], storage_options: dict[str, Any] | None,
               allow_truncated: bool, pin_version: bool = True) -> Acquisition:
    """Open the sources once for the start of a run: its checks, its plan, its first batch.

    A remote open costs a round trip (each part of a split acquisition one); the
    sources opened here serve the check for unread bytes, the fingerprint, the plan
    and then the run's first batch (:meth:`_RunSources.pass_on`). Unless
    ``allow_truncated``, a source with bytes after its last frame is refused
    (ConversionError); the open's warnings are shown only once the sources pass.
    ``pin_version``: as for :func:`convert_file`.
    """
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        lead = _fetching_itself(Acquisition.open([normalize(s) for s in srcs],
                                                 storage_options, pin_version))
    try:
        if not allow_truncated:
            _refuse_unread_bytes(lead)
    except BaseException:
        lead.close()
        raise
    for w in seen:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return lead


def _refuse_unread_bytes(lead: Acquisition) -> None:
    """Raise ConversionError for a source with bytes after the last frame it indexes."""
    for f in lead.files:
        tail, n = f.unread_bytes, f.num_frames
        if tail:
            raise ConversionError(
                f"{f.name}: {tail} bytes after its last complete frame (frame {n - 1}) would "
                "not be converted: the acquisition was cut off mid-write, or the file is "
                "damaged. Pass allow_truncated=True (--allow-truncated) to convert the "
                f"{n} complete frames")


def _start(srcs: list[str], target: Target, storage_options: dict[str, Any] | None,
           shard_bytes: int, chunk_bytes: int, arrival_dtype: str, ome: bool,
           ome_levels: int | None = None, *, run_id: str, lead: Acquisition,
           behind: bool = False) -> Plan:
    """Lay out a new store: owner, marker, metadata and small arrays, plan (written in order).

    The metadata are built in memory and then copied in, the
    root ``zarr.json`` under ``.siff-progress/``: the store is never a readable Zarr
    group before :func:`_finish`, and from its first byte on it is marked as an
    unfinished conversion (``open_converted`` and ``verify`` say so; ``resume``
    finishes or restarts it), whatever moment a kill or a full disk strikes.
    ``lead``: the sources, open (:func:`_open_lead`).

    ``behind`` (object stores, batches in this process): once the store is claimed
    and the plan made, the plan is returned and the rest (the ownership check, the
    metadata, the plan's record: three round trips) is written by a thread of its
    own while the first batches decode; a batch writes nothing before it is done
    (:func:`_checking`), and :func:`_run` waits for it (:func:`_await_layout`).
    """
    from zarr.storage import MemoryStore

    pinned = all(p.options.pin_version for p in lead.files)
    layout = {"shard_bytes": shard_bytes, "chunk_bytes": chunk_bytes,
              "arrival_dtype": arrival_dtype, "ome": ome, "ome_levels": ome_levels}
    # the metadata are built in memory (from the open sources: no request to the
    # store; a local directory cost zarr a file write per key, each handed to a
    # thread) while the owner record and the marker are written: on object storage
    # their four round trips overlap the building's CPU; the sources' fingerprint
    # (remote: a round trip; the sizes known from the open let it ask for all it
    # needs at once) is taken meanwhile. (A refused claim waits for both as the
    # pool closes, and raises its own error.)
    built: dict[str, Any] = {}
    _import_dask_threaded()  # before the thread: _prepare imports dask
    with ThreadPoolExecutor(2) as pool:
        printing = pool.submit(_fingerprint, srcs, storage_options,
                               [p.header.file_size for p in lead.files], pinned)
        preparing = pool.submit(_prepare, srcs, target, MemoryStore(built), storage_options,
                                shard_bytes, chunk_bytes, arrival_dtype, ome, ome_levels, lead)
        owner.claim(target, run_id)
        fingerprint = printing.result()
        target.write_text(STARTED_KEY, json.dumps({
            "sources": srcs, "fingerprint": fingerprint, "layout": layout}))
        _phase("started")
        plan = preparing.result()
    _phase("prepared")
    files, nodes, known = {}, {}, {}
    for key in sorted(built):
        data = built[key].to_bytes()
        files[target.key(ROOT_KEY if key == "zarr.json" else key)] = data
        if key.endswith("/zarr.json"):  # (not the root: stored elsewhere until the finish)
            nodes[key[: -len("/zarr.json")]] = json.loads(data)
            known[key] = data
    files[target.key(NODES_KEY)] = json.dumps(nodes).encode()
    plan.fingerprint, plan.pin_version = fingerprint, pinned
    with _kept_lock:  # (what the finish then need not read back: a new layout, or again)
        _kept[run_id] = _Kept(files[target.key(ROOT_KEY)], nodes, {}, {})
    recorded = plan.to_json()

    def write() -> None:
        owner.check(target, run_id)
        target.write_many(files)
        _phase("metadata")
        target.write_text(PLAN_KEY, recorded)  # (after the metadata: resume trusts it)

    def lay_out() -> None:
        # (object stores: the arrays every batch writes are opened from the metadata
        # built here, while those round trips pass, not by the first batch)
        _concurrently(target, [write, lambda: _open_batch_arrays(
            target, run_id, plan, nodes, known)])
        _phase("planned")

    if not behind:
        lay_out()
        return plan
    pool = ThreadPoolExecutor(1, thread_name_prefix="siff-xarray-layout")
    with _layouts_lock:
        _layouts[run_id] = pool.submit(lay_out)
    pool.shutdown(wait=False)
    return plan


@dataclass
class _Kept:
    """What this process stored for a run that its finish would otherwise read back.

    The start's root and node metadata, and each batch's frame descriptions and
    contrast-window tallies once they are stored (a batch converted in another
    process, or by an earlier run that this one resumes, is read from the store).
    """

    root: bytes
    nodes: dict[str, Any]
    descriptions: dict[int, bytes]
    windows: dict[int, Any]


#: per run id started in this process: what :func:`_finish` need not read (:class:`_Kept`)
_kept: dict[str, _Kept] = {}
_kept_lock = threading.Lock()


def _keep(run_id: str, b: int, description: bytes, window: Any) -> None:
    """Note batch ``b``'s stored descriptions and tallies for the run's finish, if it is here."""
    with _kept_lock:
        kept = _kept.get(run_id)
        if kept is not None:
            kept.descriptions[b] = description
            if window is not None:
                kept.windows[b] = window


#: per run id, the store being laid out behind the first batches (_start's ``behind``)
_layouts: dict[str, Future[None]] = {}
_layouts_lock = threading.Lock()


def _await_layout(run_id: str, *, raising: bool = True, forget: bool = False) -> None:
    """Wait until run ``run_id``'s store is laid out, if it is being; raise its error.

    ``raising=False``: only wait; ``forget``: the run is done with it.
    """
    with _layouts_lock:
        job = _layouts.pop(run_id, None) if forget else _layouts.get(run_id)
    if job is None:
        return
    if raising:
        job.result()
    else:
        wait([job])


def _phase(name: str) -> None:
    """Mark a phase of a conversion (a no-op; the fault tests kill the process here)."""


def _same_sources(target: Target, recorded: list[str], srcs: list[str]) -> None:
    if [normalize(s) for s in recorded] != [normalize(s) for s in srcs]:
        raise ConversionError(f"{target.destination}: was being converted from {recorded}, "
                              f"not {srcs}")


#: bytes read from each end of a source for its fingerprint
_FINGERPRINT_BYTES = 1 << 16


def _fingerprint(sources: list[str], options: dict[str, Any] | None,
                 sizes: list[int] | None = None, pinned: bool = True) -> list[dict[str, Any]]:
    """Identity of each source: size, modification stamp, digest of its first and last 64 KiB.

    The stamp is the ETag or modification time, and for local files also the inode
    change time, which a same-size edit in the middle of the file changes even when
    the modification time is set back.

    A conversion records it in its plan and checks it before every batch (and on
    resume), so a source that is replaced, grows or is rewritten while being
    converted stops the conversion instead of mixing two files in one store.

    A remote file's size, ETag and ends come from two range requests sent at once
    where its URL allows (:func:`~siff_xarray.reader.source.probe_ends`), else from
    fsspec, where ``sizes`` (a check: the sizes recorded before) lets its ends be
    requested together with its info, in one round trip instead of three.

    Unpinned (``pinned=False``, see ``pin_version``), a remote file's stamp is
    empty: its server's ETags and modification times are not used.
    """
    out = []
    for k, src in enumerate(sources):
        got = probe_ends(src, options, _FINGERPRINT_BYTES, pinned) if is_remote(src) else None
        if got is not None:  # no HEAD, and none of fsspec's event-loop CPU
            info, *ends = got
        else:
            info, ends = _fsspec_identity(src, options, None if sizes is None else sizes[k])
        stamp = next((str(info[k]) for k in ("ETag", "etag", "mtime", "LastModified",
                                              "last_modified") if info.get(k) is not None), "")
        if is_remote(src) and not pinned:
            stamp = ""
        if not is_remote(src):  # the inode change time: os.utime cannot set it back
            stamp += f"/ctime {os.stat(local_path(src)).st_ctime_ns}"
        digest = hashlib.sha256(ends[0])
        digest.update(ends[1])
        out.append({"source": src, "size": int(info["size"]), "stamp": stamp,
                    "sha256": digest.hexdigest()})
    return out


def _fsspec_identity(src: str, options: dict[str, Any] | None, size: int | None
                     ) -> tuple[dict[str, Any], list[bytes]]:
    """Return fsspec's ``info`` of ``src`` and its first and last 64 KiB.

    With ``size`` (the size recorded before) a remote file's ends are requested
    together with its info.
    """
    fs, path = filesystem(src, options)

    # two exact ranges: a file object would read ahead a whole block (5 MiB over
    # HTTP, 50 MiB on S3) at each end, before and after every batch
    def ends(n: int) -> list[tuple[int, int]]:
        return [(0, min(n, _FINGERPRINT_BYTES)), (max(0, n - _FINGERPRINT_BYTES), n)]

    if size is not None and is_remote(src):
        with ThreadPoolExecutor(3) as pool:
            info_job = pool.submit(fs.info, path)
            parts = [pool.submit(fs.cat_file, path, start=a, end=b) for a, b in ends(size)]
            info = info_job.result()
            if int(info["size"]) == size:  # else: a shorter file, whose size tells
                with contextlib.suppress(Exception):
                    return info, [p.result() for p in parts]
    else:
        info = fs.info(path)
    return info, [fs.cat_file(path, start=a, end=b) for a, b in ends(int(info["size"]))]


def _check_fingerprint(sources: list[str], options: dict[str, Any] | None,
                       recorded: list[dict[str, Any]] | None, context: str,
                       pinned: bool = True) -> None:
    """Raise ConversionError if a source is no longer the file the conversion started from.

    Unpinned, the stamps (ETags, modification times) of remote sources are not compared.
    """
    if recorded is None:  # a plan written before fingerprints existed
        return
    sizes = [int(r.get("size", -1)) for r in recorded]
    for was, now in zip(recorded, _fingerprint(sources, options, sizes, pinned), strict=True):
        keys = ("size", "stamp", "sha256") if pinned or not is_remote(now["source"]) else \
            ("size", "sha256")
        changed = [k for k in keys if was.get(k) != now[k]]
        if changed:
            what = ", ".join(f"{k} {was.get(k)} -> {now[k]}" if k != "sha256" else
                             "content" for k in changed)
            raise ConversionError(f"{context}: {now['source']} changed since the conversion "
                                  f"started ({what}); the store would mix two files. Convert "
                                  "it again with overwrite=True (--overwrite)")


def _already_complete(srcs: list[str], src: str, target: Target,
                      storage_options: dict[str, Any] | None, t_start: float
                      ) -> ConversionSummary:
    """Summary of a finished store of ``srcs`` (``resume`` on a complete store)."""
    import zarr

    root = json.loads(target.read_text("zarr.json"))
    recorded = root.get("attributes", {}).get("source_file")
    recorded = recorded if isinstance(recorded, list) else [recorded]
    _same_sources(target, [str(r) for r in recorded], srcs)
    grp = zarr.open_group(target.zarr(), path="photons", mode="r")
    sizes = sum(f["size"] for f in _fingerprint(srcs, storage_options))
    if int(grp.attrs["source_bytes"]) != sizes:
        raise ConversionError(f"{target.destination}: a finished store of {src} exists, but "
                              f"of {grp.attrs['source_bytes']} bytes; the source now has "
                              f"{sizes}. Pass overwrite=True (--overwrite) to convert again")
    counts = np.asarray(grp["photon_count"][...])
    log.info("%s: already complete", target.destination)
    return ConversionSummary(source=src, destination=target.destination,
                             frames=int(counts.size), photons=int(counts.sum()),
                             source_bytes=sizes, store_bytes=_store_bytes(target),
                             seconds=time.perf_counter() - t_start, batches=0,
                             batches_skipped=0, already_complete=True)


#: local schedulers whose tasks share one process (and its kept sources)
_THREADED = ("threads", "threading", "sync", "synchronous", "single-threaded")
#: names of dask's schedulers a conversion takes (besides a client or its address)
SCHEDULERS = (*_THREADED, "processes", "multiprocessing", "distributed")


def _run(plan: Plan, target: Target, run_id: str, scheduler: Any, num_workers: int | None,
         progress: Callable[[Progress], None] | bool | None,
         lead: Acquisition | None = None,
         spares: list[Future[Acquisition]] | None = None) -> int:
    """Run the batches not yet recorded as done; return how many were skipped.

    ``lead`` (the sources the run's start opened) is lent to the first batch where
    this process's threads convert a remote source, else closed. A run given it
    has just laid the store out: no batch can be done, and nothing is listed.
    ``spares`` (:func:`_open_spares`), taken from the list, serve the next batches
    in order alongside ``lead``; where ``lead`` is not lent they are closed.
    """
    import dask

    done = set() if lead is not None else target.done_batches()
    todo = [b for b in range(plan.n_batches) if b not in done]
    tracker = _Tracker(plan, done, progress, lambda: owner.heartbeat(target, run_id),
                       heartbeat_every_s=HEARTBEAT_S if target.object_store else 0.0)
    plan_json = plan.to_json()
    # one process: its threads take the batches in order (see _RunSources)
    in_order = scheduler in _THREADED and any_remote(plan.sources)
    if lead is not None and not (todo and in_order):  # the batches open their sources
        lead.close()
        lead = None
    if todo:
        with _runs_lock:
            if in_order:
                run = _runs[run_id] = _RunSources(todo)
                if lead is not None:  # the first batches' bytes are asked for now
                    run.pass_on(_streaming(lead, plan), plan)
                    for f in _spares_opened(spares):
                        run.pass_on(_streaming(f, plan), plan)
        def chained(slots: int, in_run: bool = False) -> list[Any]:
            return [dask.delayed(_write_chain, pure=False)(plan_json, chain, run_id, in_run)
                    for chain in _chains(todo, slots, any_remote(plan.sources))]

        if not (isinstance(scheduler, str) and scheduler in _THREADED):
            _await_layout(run_id)  # (other processes open the arrays from the store)
        try:
            if isinstance(scheduler, str) and is_remote(scheduler):
                from dask.distributed import Client

                with Client(scheduler) as client:
                    _compute_distributed(chained(_slots(client)), client, tracker, run_id)
            elif not isinstance(scheduler, str):
                _compute_distributed(chained(_slots(scheduler)), scheduler, tracker, run_id)
            elif in_order:
                _compute_local([dask.delayed(_next_batch, pure=False)(plan_json, run_id)
                                for _ in todo], scheduler, num_workers, tracker)
            else:
                in_run = scheduler in _THREADED  # (else processes: each waits its own)
                _compute_local(chained(_pool_size(scheduler, num_workers) or _cpu_count(),
                                       in_run), scheduler, num_workers, tracker)
        except BaseException:
            _await_tails(_run_tails(run_id), raising=False)  # (nothing written behind
            raise  # the run's end)
        else:
            _await_tails(_run_tails(run_id))  # every batch's record before the finish
        finally:
            tracker.close()
            _forget_sources(run_id)  # this process's threads (local schedulers)
            _await_layout(run_id, raising=False)  # (nothing written behind the run's end)
    _await_layout(run_id, forget=True)  # (its error, where no batch met it)
    return len(done)  # (that every batch finished is checked by _finish)


def _threads(scheduler: Any, num_workers: int | None) -> int:
    """Threads of this process that convert batches at once under ``scheduler`` (1: unknown)."""
    if not isinstance(scheduler, str) or scheduler not in ("threads", "threading"):
        return 1
    return max(int(_pool_size(scheduler, num_workers) or 1), 1)


def _pool_size(scheduler: str, num_workers: int | None) -> int | None:
    """Return the ``num_workers`` a local scheduler is given (None: dask's ``pool`` decides).

    The threaded scheduler gets one thread per core unless told otherwise (its
    ``num_workers`` or dask's ``num_workers`` or ``pool`` settings): dask itself
    gives that only where it was imported first (:func:`_import_dask_threaded`).
    """
    import dask

    if (num_workers is None and scheduler in ("threads", "threading")
            and dask.config.get("pool", None) is None):
        return dask.config.get("num_workers", None) or _cpu_count()
    return num_workers


def _open_spares(srcs: list[str], storage_options: dict[str, Any] | None,
                 pin_version: bool, n: int) -> list[Future[Acquisition]]:
    """Start opening remote sources ``srcs`` ``n`` times in the background (none if local).

    A remote open waits a round trip or more; each thread's first batch otherwise
    opened its own source when it started, and its first bytes came that much later.
    """
    if n < 1 or not any_remote(srcs):
        return []
    pool = ThreadPoolExecutor(n, thread_name_prefix="siff-xarray-open")
    spares = [pool.submit(Acquisition.open, [normalize(s) for s in srcs], storage_options,
                          pin_version) for _ in range(n)]
    pool.shutdown(wait=False)
    return spares


def _spares_opened(spares: list[Future[Acquisition]] | None) -> list[Acquisition]:
    """Take the spares out of ``spares``: those that opened (an open that failed is left out).

    The run's batches open their own sources where a spare is missing, and meet
    the error themselves if it was the source's.
    """
    out = []
    while spares:
        job = spares.pop()
        with contextlib.suppress(Exception):
            out.append(_fetching_itself(job.result()))
    return out


def _import_dask_threaded() -> None:
    """Import ``dask.threaded`` in this thread, if nobody has yet.

    dask takes the thread that first imports ``dask.threaded`` for the main thread:
    only there does a computation without ``num_workers`` get the pool of one thread
    per core. Imported first in one of our helper threads (the start's metadata are
    built in one, and building them imports dask), every later computation of the
    process, the user's included, got a new pool of Python's default size instead
    (six threads on two cores): a conversion then ran six batches at once and, from
    a remote source, held the whole 826 MB benchmark file in memory.
    """
    import dask.threaded  # noqa: F401


def _cpu_count() -> int:
    from dask.system import CPU_COUNT

    return int(CPU_COUNT)


def _compute_local(tasks: list[Any], scheduler: str, num_workers: int | None,
                   tracker: _Tracker) -> None:
    """Compute ``tasks`` on a local scheduler, reporting each batch to ``tracker``.

    The threaded scheduler's threads: :func:`_pool_size`.
    """
    import dask
    from dask.callbacks import Callback

    num_workers = _pool_size(scheduler, num_workers)
    kwargs: dict[str, Any] = {} if num_workers is None else {"num_workers": num_workers}
    names = {t.key for t in tasks}

    def posttask(key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
        if key in names:
            for one in _results(result):
                tracker(one)

    with Callback(posttask=posttask):
        dask.compute(*tasks, scheduler=_local_scheduler(scheduler), **kwargs)


def _local_scheduler(name: str) -> Any:
    """Return dask's function for the local scheduler ``name`` (others: ``name``).

    Given a name, dask imports ``dask.distributed`` (0.1 s, once per process) to look
    for a running client first, which a local scheduler never uses.
    """
    name = name.lower()
    if name in ("threads", "threading"):
        import dask.threaded

        return dask.threaded.get
    if name in ("sync", "synchronous", "single-threaded"):
        import dask.local

        return dask.local.get_sync
    if name in ("processes", "multiprocessing"):
        import dask.multiprocessing

        return dask.multiprocessing.get
    return name


def _results(result: Any) -> list[tuple[int, int, int]]:
    """Return a task's batch results: one batch's (:func:`_next_batch`) or a chain's."""
    return [result] if isinstance(result, tuple) else list(result)


def _slots(client: Any) -> int:
    """Threads of a dask.distributed client's workers (1 where it cannot tell)."""
    try:
        return max(sum(client.nthreads().values()), 1)
    except Exception:  # (a client not connected yet, or another kind of scheduler)
        return 1


def _compute_distributed(tasks: list[Any], client: Any, tracker: _Tracker,
                         run_id: str) -> None:
    from dask.distributed import as_completed

    futures = client.compute(tasks)
    try:
        for fut in as_completed(futures):
            for result in _results(fut.result()):
                tracker(result)
    except BaseException:
        with contextlib.suppress(Exception):  # (a task not started: never starts)
            client.cancel(futures)
        raise
    finally:  # the workers end the run: each waits for its batches still running
        with contextlib.suppress(Exception):
            client.run(_end_on_worker, run_id)


async def _end_on_worker(run_id: str) -> None:
    """:func:`_forget_sources` on a dask worker, off its event loop (it may wait a batch)."""
    import asyncio

    await asyncio.to_thread(_forget_sources, run_id)
