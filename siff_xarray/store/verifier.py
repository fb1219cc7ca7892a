"""Checking a converted store against its source, frame by frame (:func:`verify`)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from .._progress import ProgressArg, Reporter, short_name
from ..reader.acquisition import Acquisition
from .layout import ALL_CHUNKS_STORED, Target, frames_per_batch, quiet_text_dtype
from .ome import downsample2, ome_repeats, to_ome_order
from .read import cell_values, checked, count_images, frame_positions, open_converted

__all__ = ["verify"]


def verify(source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
           store: str | os.PathLike[str], *,
           storage_options: dict[str, Any] | None = None,
           target_options: dict[str, Any] | None = None,
           batch_frames: int = 256, progress: ProgressArg = None,
           pin_version: bool = True) -> list[str]:
    """Compare a converted store with its source, frame by frame; return the differences.

    Checks every frame's photon count, its pixel-sorted (pixel, arrival time) pairs
    (equal multisets), its timestamps and description text, and the header texts;
    every attribute and coordinate of the root Dataset; and what the store derives
    from the photons: ``photon_count`` and ``histogram`` from the stored photons, each
    OME level from the stored intensity.
    An empty list means the store holds exactly what the source holds. ``source``
    may be the ordered parts of a split acquisition converted into one store.
    ``progress``: a bar over the frames compared (``None``: when someone watches
    and it takes over a second; ``True``/``False``; or a callable taking a
    :class:`~siff_xarray.Step`), see :func:`siff_xarray.set_progress`.
    ``pin_version``: for remote sources, as for :class:`~siff_xarray.SiffFile`.
    """
    srcs = ([os.fspath(source)] if isinstance(source, (str, os.PathLike))
            else [os.fspath(x) for x in source])
    target = Target(os.fspath(store), target_options)
    try:
        problems = _compare(srcs, store, target, storage_options, target_options,
                            batch_frames, progress, pin_version)
        return _other_source(target, srcs) + problems if problems else problems
    except ValueError as exc:  # a checksum mismatch (SiffFormatError is a ValueError too)
        if "checksum" not in str(exc):
            raise
        damaged = _damaged_chunks(target) or [f"a chunk is damaged: {exc}"]
        return damaged + _missing_beside_damage(target)


def _other_source(target: Target, srcs: list[str]) -> list[str]:
    """Return a note where the store names another source file than ``srcs[0]``.

    By file name; given before the differences (a store compared with the wrong file
    differs everywhere). Empty where the names agree or the store names none.
    """
    import zarr

    try:
        recorded = zarr.open_group(target.zarr(), mode="r").attrs.get("source_file")
    except Exception:  # (the differences are the answer; this is only a hint)
        return []
    if not isinstance(recorded, str) or not recorded:
        return []
    if short_name(recorded) == short_name(srcs[0]):
        return []
    return [f"the store was converted from {recorded}, not {srcs[0]}: is SOURCE the "
            "store's source?"]


def _missing_beside_damage(target: Target) -> list[str]:
    """Return the missing chunks of a store in which some are damaged (:func:`_missing_chunks`).

    Nothing where the arrays that locate the photons are among the damaged ones: the
    damage is reported, and the store is to be restored or converted again anyway.
    """
    import zarr

    try:
        return _missing_chunks(target, zarr.open_group(target.zarr(), path="photons", mode="r"))
    except ValueError as exc:
        if "checksum" not in str(exc):
            raise
        return []


def _compare(srcs: list[str], store: str | os.PathLike[str], target: Target,
             storage_options: dict[str, Any] | None, target_options: dict[str, Any] | None,
             batch_frames: int, progress: ProgressArg = None,
             pin_version: bool = True) -> list[str]:
    """Return the differences between the store and its sources (see :func:`verify`)."""
    import zarr

    problems: list[str] = []
    # missing chunks read as zeros here: they are counted and reported with the rest.
    # Not Dask-backed: each block is one zarr read that decodes its chunks at once (a
    # Dask graph per block of one task per 2-timepoint chunk cost 5 of 17 s)
    ds = open_converted(store, storage_options=target_options, partial_volume="keep",
                        missing_chunks="zeros", chunks=None)
    try:
        zstore = target.zarr()
        grp = zarr.open_group(zstore, path="photons", mode="r")
        with Acquisition.open(srcs, storage_options, pin_version) as f, \
                contextlib.ExitStack() as stack:
            n = f.num_frames
            if grp["photon_count"].shape[0] != n:
                return [f"frame count differs: source {n}, store {grp['photon_count'].shape[0]}"]
            shape = (ds.sizes["y"], ds.sizes["x"])
            if tuple(f.frame_shape) != shape:  # (its frames could not be compared)
                return [f"frame shape differs: source {tuple(f.frame_shape)}, store {shape}"]
            root = zarr.open_group(zstore, mode="r")
            with quiet_text_dtype():  # as written, not as open_converted relocates it
                raw_files = root["source_file"][...] if "source_file" in root else None
            problems.extend(_dataset_differences(ds, srcs, storage_options, raw_files,
                                                 pin_version))
            problems.extend(_missing_chunks(target, grp))
            if ds.attrs.get("scanimage_header") != f.header.nvfd_text:
                problems.append("ScanImage header text differs")
            if ds.attrs.get("roi_json") != f.header.roi_text:
                problems.append("ROI JSON text differs")
            counts = np.asarray(grp["photon_count"][...]).astype(np.int64)
            if not np.array_equal(counts, f.n_photons):
                bad = np.flatnonzero(counts != f.n_photons)
                problems.append(f"photon counts differ in {bad.size} frames (first {bad[0]})")
            ts = f.timestamps()
            for name, want in (("experiment_s", ts.experiment_s),
                               ("epoch_laser_ns", ts.epoch_laser_ns),
                               ("epoch_system_ns", ts.epoch_system_ns)):
                got = np.asarray(grp[name][...])
                if not np.array_equal(got, want, equal_nan=want.dtype.kind == "f"):
                    problems.append(f"{name} differs")
            src_desc, src_len = f.description_bytes()
            if not (np.array_equal(np.asarray(grp["description"][...]), src_desc)
                    and np.array_equal(np.asarray(grp["description_length"][...]), src_len)):
                problems.append("frame descriptions differ")
            if not np.array_equal(np.asarray(grp["encoding"][...]), f.encoding):
                problems.append("frame encodings differ")
            intensity_only = grp.attrs.get("layout") == "intensity-only"
            if intensity_only and not np.array_equal(np.asarray(grp["signed"][...]), f.signed):
                problems.append("TIFF sample formats differ")
            # photons and count images, a batch of frames at a time, without per-frame loops
            starts_z = np.asarray(grp["photon_start"][...]).astype(np.int64)
            arr = grp["arrival_time"]
            fly = np.asarray(grp["flyback_frame"][...]).astype(np.int64)
            pos = frame_positions(ds.frame_index.values, n)
            has_hist = "histogram" in ds
            h, w = ds.sizes["y"], ds.sizes["x"]
            batch_frames = frames_per_batch(batch_frames, h * w)
            bar = stack.enter_context(Reporter(f"verify {short_name(target.destination)}",
                                               n, "frames", progress))

            levels = _ome_levels(root)
            covered = np.zeros(ds.sizes["time"], dtype=bool)  # timepoints checked for derived
            derived: dict[str, int] = {}
            # each timepoint's derived values are checked by the batch holding its first
            # frame (a timepoint that spans two batches is read by both, checked once)
            first_frame = np.full(ds.sizes["time"], n, dtype=np.int64)
            held = pos[:, 0] >= 0
            np.minimum.at(first_frame, pos[held, 0], np.flatnonzero(held))

            def check(a: int) -> tuple[list[str], dict[str, int], tuple[int, int] | None]:
                """Differences in the batch of frames from ``a`` (runs in a worker thread).

                Also checks what the store derives from the intensity on the whole
                timepoints read for the batch's count images (read once for both).
                """
                fr = np.arange(a, min(a + batch_frames, n), dtype=np.int64)
                imgs = f.read_frames(fr)
                kept: list[tuple[int, np.ndarray]] = []
                imgs_z = count_images(ds, grp, fr, pos, fly, imgs.shape[1:], keep=kept)
                found, span = {}, None
                if kept:  # the whole timepoints of the batch's imaging frames
                    t0, block = kept[0]
                    first = first_frame[t0 : t0 + block.shape[0]]
                    own = np.flatnonzero((first >= fr[0]) & (first <= fr[-1]))
                    if own.size:  # consecutive: timepoints start in frame order
                        o0, o1 = int(own[0]), int(own[-1]) + 1
                        found = _derived_block(ds, levels, block[o0:o1], t0 + o0,
                                               target.destination)
                        span = (t0 + o0, t0 + o1)
                return differences(a, fr, imgs, imgs_z), found, span

            def differences(a: int, fr: np.ndarray, imgs: np.ndarray, imgs_z: np.ndarray
                            ) -> list[str]:
                out = []
                bad = np.flatnonzero((imgs_z != imgs).reshape(len(fr), -1).any(axis=1))
                if bad.size:
                    out.append(f"count images differ in {bad.size} frames (first "
                               f"{int(fr[bad[0]])})")
                if intensity_only:  # TIFF pages: the count images are everything
                    return out
                s_src, pix_src, tau_src = f.photons_batch(fr)
                c = counts[fr]
                lo, hi = int(starts_z[fr].min()), int((starts_z[fr] + c).max())
                block = (checked(lambda lo=lo, hi=hi: arr[lo:hi], target.destination,
                                 "photons/arrival_time") if hi > lo
                         else np.zeros(0, arr.dtype))
                first = np.concatenate([[0], np.cumsum(c)[:-1]])
                idx = np.arange(int(c.sum())) + np.repeat(starts_z[fr] - lo - first, c)
                tau_z = block[idx].astype(np.uint32)
                hw = imgs.shape[1] * imgs.shape[2]
                if not np.array_equal(imgs_z.reshape(len(fr), hw).sum(axis=1, dtype=np.int64),
                                      c):  # the store contradicts itself
                    return [*out, f"photons/photon_count disagrees with the count images in "
                                  f"frames {a}-{a + len(fr) - 1}"]
                frame_z = np.repeat(np.arange(len(fr)), c)
                if has_hist and not _histograms_agree(ds, fr, pos, frame_z, tau_z):
                    out.append(f"histogram differs from the photons in frames "
                               f"{a}-{a + len(fr) - 1}")
                # the store's photons lie in (frame, pixel) order, imgs_z[j, i] of them at
                # pixel i of frame j: the source's must be in that order with those counts
                key = np.repeat(np.arange(len(fr), dtype=np.int64) * hw,
                                np.diff(s_src)) + pix_src
                if (key.size != int(c.sum()) or (key.size and (np.diff(key) < 0).any())
                        or not np.array_equal(np.bincount(key, minlength=len(fr) * hw),
                                              imgs_z.reshape(-1))):
                    return [*out, f"photon pixels differ in frames {a}-{a + len(fr) - 1}"]
                # equal multisets of arrival times within each (frame, pixel): both sides
                # sort a frame's photons by pixel, stably, so they are almost always in
                # the same order too (one comparison); only otherwise sort them
                if not np.array_equal(tau_z, tau_src):
                    oz = np.lexsort((tau_z, key))
                    diff = np.flatnonzero(tau_z[oz] != tau_src[np.lexsort((tau_src, key))])
                    if diff.size:
                        out.append(f"arrival times differ (first in frame "
                                   f"{int(fr[frame_z[oz][diff[0]]])})")
                return out

            # two batches at once: while one thread waits for the store's chunks (zarr
            # decompresses on its own threads) the other decodes and compares (Numba
            # and numpy release the GIL); results are taken in order
            for a, (found, bad, span) in _in_order(check, range(0, n, batch_frames), stack):
                problems.extend(found)
                for name, t0 in bad.items():  # batches come in frame order
                    derived.setdefault(name, t0)
                if span is not None:
                    covered[span[0]:span[1]] = True
                bar.advance(min(batch_frames, n - a))
                if len(problems) > 50:
                    problems.append("... (stopped after 50 differences)")
                    break
                f.release()
            if len(problems) <= 50:
                problems.extend(_derived_differences(ds, levels, target.destination,
                                                     batch_frames, derived, covered))
    finally:
        ds.close()
    return problems


#: batches of a verification compared at once (each holds its frames' photons twice)
VERIFY_THREADS = 2


def _in_order(fn: Any, items: range, stack: contextlib.ExitStack) -> Any:
    """Yield ``(item, fn(item))`` in order, up to :data:`VERIFY_THREADS` calls at once.

    A consumer that stops early leaves at most that many calls submitted; when
    ``stack`` closes, those not started are cancelled and the running ones awaited.
    """
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(VERIFY_THREADS, thread_name_prefix="siff-verify")
    stack.callback(pool.shutdown, wait=True, cancel_futures=True)
    ahead: deque[Any] = deque()
    for item in items:
        ahead.append((item, pool.submit(fn, item)))
        if len(ahead) >= VERIFY_THREADS:
            done, job = ahead.popleft()
            yield done, job.result()
    while ahead:
        done, job = ahead.popleft()
        yield done, job.result()


def _histograms_agree(ds: Any, fr: np.ndarray, pos: np.ndarray, frame_z: np.ndarray,
                      tau_z: np.ndarray) -> bool:
    """Tell whether the stored ``histogram`` of frames ``fr`` counts their stored photons.

    ``frame_z``/``tau_z``: each stored photon's frame (index in ``fr``) and arrival
    time; arrival times beyond the histogram's bins are left out, as the converter
    does. Flyback frames have no histogram cell.
    """
    img = pos[fr][:, 0] >= 0
    if not img.any():
        return True
    nb = ds.sizes["tau"]
    keep = tau_z < nb
    want = np.bincount(frame_z[keep] * nb + tau_z[keep].astype(np.int64),
                       minlength=len(fr) * nb).reshape(len(fr), nb)[img]
    return bool(np.array_equal(cell_values(ds, "histogram", pos[fr[img]]), want))


def _ome_levels(root: Any) -> list[tuple[str, Any]]:
    """Return the store's OME levels ``(name, array)``, finest first (none without one)."""
    if "ome" not in root:
        return []
    ome = root["ome"]
    return [(k, ome[k]) for k in sorted(ome.array_keys(), key=int)]


def _derived_block(ds: Any, levels: list[tuple[str, Any]], block: np.ndarray, t0: int,
                   where: str) -> dict[str, int]:
    """Check what the store derives from the intensity on whole timepoints ``block``.

    The root's ``photon_count`` is each cell's intensity summed over y and x, and
    each OME level is the intensity in NGFF order (the partial last volume left
    out), halved level by level. Returns ``{name: t0}`` for each that differs.
    """
    bad: dict[str, int] = {}
    t1 = t0 + block.shape[0]
    if "photon_count" in ds:
        want = block.reshape(*block.shape[:-2], -1).sum(axis=-1, dtype=np.int64)
        got = np.asarray(ds.photon_count.isel(time=slice(t0, t1)).values)
        if not np.array_equal(got, want.astype(got.dtype)):
            bad["photon_count"] = t0
    reps, level = ome_repeats(block), block
    for k, arr in levels:
        if int(k):
            level = downsample2(level)
        r0, r1 = t0 * reps, min(t1 * reps, arr.shape[0])
        if r1 > r0:
            stored = checked(lambda arr=arr, r0=r0, r1=r1: arr[r0:r1], where, f"ome/{k}")
            if not np.array_equal(stored, to_ome_order(level)[: r1 - r0]):
                bad[f"ome/{k}"] = t0
    return bad


def _derived_differences(ds: Any, levels: list[tuple[str, Any]], where: str,
                         batch_frames: int, bad: dict[str, int],
                         covered: np.ndarray) -> list[str]:
    """Report the derived variables that differ (see :func:`_derived_block`).

    ``bad`` holds what the batches found on the timepoints they read
    (``covered``); timepoints no batch read are checked here, about
    ``batch_frames`` frames at a time.
    """
    n_t = ds.sizes["time"]
    frames_per_t = int(np.prod([ds.sizes[d] for d in ds.intensity.dims[1:-2]]))
    step = max(1, batch_frames // max(frames_per_t, 1))
    for t0 in range(0, n_t, step):
        t1 = min(n_t, t0 + step)
        if covered[t0:t1].all():
            continue
        block = checked(lambda t0=t0, t1=t1: ds.intensity.isel(time=slice(t0, t1)).values,
                        where, "intensity")
        for name, t in _derived_block(ds, levels, block, t0, where).items():
            bad[name] = min(bad.get(name, t), t)
    out = []
    for name, t0 in bad.items():
        what = ("the intensity summed over y and x" if name == "photon_count"
                else "the stored intensity")
        out.append(f"{name} differs from {what} (first in the block from time index {t0})")
    return out


#: attributes that name the source file: a moved or renamed source differs there only
_NAMING_ATTRS = ("source_file", "title")
#: eager variables of the Dataset (the lazy ones are compared frame by frame)
_EAGER = ("frame_index", "frame_present", "event_time", "event_frame", "event_text")


def _plain(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def _same_values(a: Any, b: Any) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return False
    if a.dtype.kind == "M" and b.dtype.kind == "M":
        return bool(np.array_equal(a.view(np.int64), b.view(np.int64)))
    if a.dtype.kind == "f" and b.dtype.kind == "f":
        return bool(np.array_equal(a, b, equal_nan=True))
    return bool(np.array_equal(a, b))


def _dataset_differences(store_ds: Any, srcs: list[str],
                         storage_options: dict[str, Any] | None,
                         raw_files: np.ndarray | None = None,
                         pin_version: bool = True) -> list[str]:
    """Differences between the store's root Dataset and the source's, beyond the photons.

    Every attribute (but the ones naming the source file), every coordinate (values,
    dims, attributes) and the eager variables: a changed ``tau_bin_ps`` or ``z``
    would change every lifetime or position computed from the store.
    """
    from ..backend import open_acquisition, open_siff

    opts = {"storage_options": storage_options, "partial_volume": "keep",
            "pin_version": pin_version}
    src = open_siff(srcs[0], **opts) if len(srcs) == 1 else open_acquisition(srcs, **opts)
    out = []
    with src:
        for k in sorted(set(src.attrs) | set(store_ds.attrs)):
            if k in _NAMING_ATTRS:
                continue
            want, got = _plain(src.attrs.get(k)), _plain(store_ds.attrs.get(k))
            if want != got:
                out.append(f"attribute {k} differs: source {want!r:.60}, store {got!r:.60}")
        names = sorted(set(src.coords) | {v for v in _EAGER if v in src})
        for name in names:
            kind = "coordinate" if name in src.coords else "variable"
            if name not in store_ds.variables:
                out.append(f"{kind} {name} is missing from the store")
                continue
            a, b = src[name], store_ds[name]
            if a.dims != b.dims or not _same_values(a.values, b.values):
                out.append(f"{kind} {name} differs")
            elif _plain(dict(a.attrs)) != _plain(dict(b.attrs)):
                out.append(f"{kind} {name}: attributes differ")
        # where photon reductions look for each cell's photons: this store, its frames
        if "source_frame" in store_ds and "frame_index" in store_ds:
            fidx = np.asarray(store_ds.frame_index.values)
            if not np.array_equal(np.asarray(store_ds.source_frame.values), fidx):
                out.append("variable source_frame differs from frame_index (the store's "
                           "frames)")
            if raw_files is not None:
                names = np.asarray(raw_files).astype(str)
                if (names[fidx >= 0] == "").any() or (names[fidx < 0] != "").any():
                    out.append("variable source_file does not name the store for every "
                               "written frame")
    return out


def _grid(a: Any) -> list[int]:
    """Return how many stored objects (shards, else chunks) ``a`` has along each axis."""
    return [-(-n // c) for n, c in zip(a.shape, a.shards or a.chunks, strict=True)]


def _arrays(root: Any) -> list[tuple[str, Any]]:
    """Every array of a store, with its path (root, ``ome/`` and ``photons/``)."""
    with quiet_text_dtype():
        out = sorted(root.arrays(), key=lambda kv: kv[0])
        for group in ("ome", "photons"):
            if group in root:
                out += [(f"{group}/{k}", a) for k, a in sorted(root[group].arrays())]
    return out


def _damaged_chunks(target: Target) -> list[str]:
    """Read every stored chunk (or shard) of every array; name those whose checksum fails."""
    import zarr

    root = zarr.open_group(target.zarr(), mode="r")
    out = []
    for path, a in _arrays(root):
        outer = a.shards or a.chunks
        for idx in np.ndindex(*_grid(a)):
            sel = tuple(slice(i * c, min((i + 1) * c, n))
                        for i, c, n in zip(idx, outer, a.shape, strict=True))
            try:
                with quiet_text_dtype():
                    a[sel]
            except ValueError as exc:
                if "checksum" not in str(exc):
                    raise
                key = "c/" + "/".join(map(str, idx)) if idx else "c"
                out.append(f"{path}: chunk {key} is damaged (its checksum does not match); "
                           "restore the store from a copy or convert the source again")
    return out


def _stored(target: Target, path: str) -> int:
    """Count the chunk (or shard) objects stored for array ``path``."""
    target.fs.invalidate_cache()
    try:
        return len(target.fs.find(target.key(f"{path}/c")))
    except FileNotFoundError:  # pragma: no cover - find returns [] on most filesystems
        return 0


def _missing_chunks(target: Target, grp: Any) -> list[str]:
    """Chunks that the layout says exist but the store lacks (zarr would read them as 0).

    Stores marked ``all_chunks_stored`` hold every chunk of every array; older ones
    every chunk of the frame arrays and the OME levels and the flyback rows. In
    both, every ``arrival_time`` shard that holds photons is stored. A missing one
    was deleted or lost.
    """
    import zarr

    zstore = target.zarr()
    out = []

    def check(path: str, expected: int) -> None:
        have = _stored(target, path)
        if have < expected:
            out.append(f"{path}: {expected - have} of {expected} stored chunks are missing "
                       "(deleted or lost; zarr would read them as zeros); convert again")

    def outer_grid(a: Any) -> int:
        return int(np.prod(_grid(a)))

    root = zarr.open_group(zstore, mode="r")
    if grp.attrs.get(ALL_CHUNKS_STORED):
        for path, a in _arrays(root):
            if a.size and path != "photons/arrival_time":  # its shards: below
                check(path, outer_grid(a))
    else:
        for path in ("intensity", "photon_count", "histogram"):
            if path in root:
                check(path, outer_grid(root[path]))
        if "ome" in root:
            for level in sorted(root["ome"].array_keys()):
                check(f"ome/{level}", outer_grid(root["ome"][level]))
        fly = grp["flyback_intensity"]
        if fly.shape[0]:
            check("photons/flyback_intensity", outer_grid(fly))
    counts = np.asarray(grp["photon_count"][...]).astype(np.int64)
    starts = np.asarray(grp["photon_start"][...]).astype(np.int64)
    arr = grp["arrival_time"]
    size = (arr.shards or arr.chunks)[0]
    has = counts > 0
    if has.any() and grp.attrs.get("layout") != "intensity-only":
        n_outer = -(-arr.shape[0] // size)
        mark = np.zeros(n_outer + 1, dtype=np.int64)
        np.add.at(mark, starts[has] // size, 1)
        np.add.at(mark, (starts[has] + counts[has] - 1) // size + 1, -1)
        check("photons/arrival_time", int((np.cumsum(mark)[:n_outer] > 0).sum()))
    return out
