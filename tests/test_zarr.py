"""Zarr conversion: lossless layout, parallel byte-identical output, interruption and resume."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from siff_xarray import SiffFile
from siff_xarray import store as zs
from siff_xarray.errors import ConversionError, IncompleteStoreError, SiffFormatError
from siff_xarray.synthetic import write_siff

#: where each cell's photons are: differs between a store and its source by design
SOURCES = ["source_file", "source_frame"]


def _tree(root) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``root``.

    ``source_file`` records where the store is (each cell's photons are in it), so
    stores differ there by destination: it is checked to name ``root`` and left
    out of the hashes.
    """
    import zarr

    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if rel.startswith("source_file"):
                continue
            data = p.read_bytes()
            if rel == "zarr.json":
                meta = json.loads(data)
                meta.get("consolidated_metadata", {}).get("metadata", {}).pop("source_file",
                                                                              None)
                data = json.dumps(meta, sort_keys=True).encode()
            out[rel] = hashlib.sha256(data).hexdigest()
    if (Path(root) / "source_file").exists():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            here = zarr.open_array(str(root), path="source_file", mode="r")[...]
            fmap = zarr.open_array(str(root), path="source_frame", mode="r")[...]
        assert (here[fmap >= 0] == os.path.abspath(root)).all()
        assert (here[fmap < 0] == "").all()
    return out


def _check_ome(dst, ds):
    """``ome/`` is a valid NGFF 0.5 image holding the intensity in (t, c, z, y, x) order."""
    import zarr

    from siff_xarray.backend import drop_partial_volume

    ds = drop_partial_volume(ds)  # the OME image leaves a partial last volume out
    grp = zarr.open_group(str(dst), path="ome", mode="r")
    level = zs.to_ome_order(ds.intensity.values)
    np.testing.assert_array_equal(grp["0"][...], level)
    ms = grp.attrs["ome"]["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["t", "c", "z", "y", "x"]
    for k, d in enumerate(ms["datasets"]):  # the pyramid: 2 x 2 means of the level before
        assert d["path"] == str(k)
        if k:
            level = zs.downsample2(level)
        np.testing.assert_array_equal(grp[str(k)][...], level)
        scale = d["coordinateTransformations"][0]["scale"]
        assert scale[3:] == [s * 2**k for s in ms["datasets"][0][
            "coordinateTransformations"][0]["scale"][3:]]
    assert [c["label"] for c in grp.attrs["ome"]["omero"]["channels"]] == list(
        ds.channel_name.values)
    models = pytest.importorskip("ome_zarr_models.v05.image")
    models.Image.from_zarr(grp)  # raises if the metadata break the NGFF 0.5 spec


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(st.sampled_from([np.uint16, np.int16]),
                  hnp.array_shapes(min_dims=2, max_dims=4, max_side=7)))
def test_downsample2_is_the_rounded_mean(a):
    """Integer 2 x 2 sums with shifts equal numpy's rint of the float mean, sign and halves."""
    h, w = a.shape[-2:]
    pad = [(0, 0)] * (a.ndim - 2) + [(0, h % 2), (0, w % 2)]
    b = np.pad(a.astype(np.float64), pad, mode="edge")
    want = b.reshape(*b.shape[:-2], b.shape[-2] // 2, 2, b.shape[-1] // 2, 2).mean(axis=(-3, -1))
    got = zs.downsample2(a)
    assert got.dtype == a.dtype
    np.testing.assert_array_equal(got, np.rint(want).astype(a.dtype))


def test_downsample_and_pyramid_levels():
    a = np.arange(2 * 5 * 3, dtype=np.uint16).reshape(2, 5, 3)
    d = zs.downsample2(a)
    assert d.shape == (2, 3, 2) and d.dtype == np.uint16
    padded = np.pad(a.astype(float), [(0, 0), (0, 1), (0, 1)], mode="edge")
    want = padded.reshape(2, 3, 2, 2, 2).mean(axis=(2, 4))
    np.testing.assert_array_equal(d, np.rint(want))
    signed = zs.downsample2(np.array([[-3, -1], [1, -5]], dtype=np.int16))
    assert signed.dtype == np.int16 and signed.item() == -2
    assert zs.pyramid_levels(256, 128) == 3  # 256x128, 128x64, 64x32
    assert zs.pyramid_levels(16, 12) == 1
    assert zs.pyramid_levels(16, 12, 3) == 3
    with pytest.raises(ValueError, match="at least 1"):
        zs.pyramid_levels(16, 12, 0)


@settings(max_examples=300, deadline=None)
@given(sample=hnp.arrays(st.sampled_from([np.uint16, np.int16, np.uint8, np.int8,
                                          np.float32, np.int32]),
                         hnp.array_shapes(min_dims=3, max_dims=3, min_side=1, max_side=9)))
def test_contrast_windows_are_numpys_percentiles_of_each_channel(sample):
    """The counts' windows come from a tally (one pass), bit for bit np.percentile's."""
    from siff_xarray.store.ome import windows

    if sample.dtype.kind == "f":
        sample = np.nan_to_num(sample, posinf=0.0, neginf=0.0)
    got = windows(sample)
    for c, w in enumerate(got):
        v = sample[:, c].astype(np.float64).ravel()
        lo, hi = np.percentile(v, [0.5, 99.8])
        hi = max(float(hi), float(lo) + 1.0)
        assert w == {"min": float(v.min()), "max": max(float(v.max()), hi),
                     "start": float(lo), "end": hi}


@pytest.mark.parametrize(("n_t", "ct"), [(200, 1), (200, 8), (200, 100), (3, 1), (37, 5)])
def test_contrast_windows_sample_whole_chunks_spread_over_the_recording(n_t, ct):
    """The windows read whole chunks of level 0 (about WINDOW_SAMPLE timepoints, at
    least four chunks), evenly spaced from the first chunk to the last, and come from
    exactly those timepoints."""
    import zarr
    from zarr.storage import MemoryStore

    from siff_xarray.store.ome import WINDOW_SAMPLE, set_rendering, windows

    read: list[str] = []

    class Logged(MemoryStore):
        async def get(self, key, prototype, byte_range=None):
            read.append(key)
            return await super().get(key, prototype, byte_range)

    store = Logged()
    grp = zarr.open_group(store, path="ome", mode="w", zarr_format=3)
    grp.attrs["ome"] = {"omero": {"channels": [{"color": "00FF00"}, {"color": "FF00FF"}]}}
    t, c, y = np.meshgrid(np.arange(n_t), np.arange(2), np.arange(4), indexing="ij")
    data = np.broadcast_to(((c + 1) * t + y)[:, :, None, :, None],
                           (n_t, 2, 1, 4, 4)).astype(np.uint16)
    arr = zarr.create_array(store, name="ome/0", shape=data.shape, dtype="uint16",
                            chunks=(ct, 2, 1, 4, 4))
    arr[:] = data
    read.clear()
    ome = set_rendering(store)
    chunks = sorted({int(k.split("/")[3]) for k in read if k.startswith("ome/0/c/")})
    n_chunks = -(-n_t // ct)
    assert chunks[0] == 0 and chunks[-1] == n_chunks - 1, chunks
    assert len(chunks) == min(n_chunks, max(-(-WINDOW_SAMPLE // ct), 4)), chunks
    gaps = np.diff(chunks)
    assert gaps.size == 0 or gaps.max() - gaps.min() <= 1, chunks  # evenly spaced
    sample = np.concatenate([data[k * ct : (k + 1) * ct] for k in chunks])
    assert [ch["window"] for ch in ome["omero"]["channels"]] == windows(sample)
    assert dict(zarr.open_group(store, path="ome", mode="r").attrs)["ome"] == ome


def test_ome_rendering_gives_each_channel_a_colour_and_a_window_from_its_data(tmp_path):
    import json

    t = write_siff(tmp_path / "two.siff", shape=(32, 32), channels=(1, 2), n_timepoints=8,
                   photons_per_frame=3000, channel_brightness=(1.0, 0.05), seed=2)
    dst = tmp_path / "two.zarr"
    zs.convert(t.path, dst)
    channels = json.loads((dst / "ome" / "zarr.json").read_text())["attributes"]["ome"][
        "omero"]["channels"]
    assert [c["color"] for c in channels] == ["00FF00", "FF00FF"]  # were both FFFFFF
    with xr.open_dataset(t.path, engine="siff") as ds:
        for c, ch in zip(channels, ds.channel.values, strict=True):
            counts = ds.intensity.sel(channel=ch).values
            hi = np.percentile(counts, 99.8)
            assert c["window"]["end"] == pytest.approx(max(hi, c["window"]["start"] + 1))
            assert c["window"]["end"] <= counts.max()  # not a fixed 0-10
        bright, dim = (c["window"]["end"] for c in channels)
        assert dim < bright  # the dim channel is stretched to its own range
    # the consolidated root carries the same, so xr.open_zarr / viewers see it
    root = json.loads((dst / "zarr.json").read_text())
    assert root["consolidated_metadata"]["metadata"]["ome"]["attributes"]["ome"][
        "omero"]["channels"] == channels


def test_ome_pyramid(tmp_path):
    t = write_siff(tmp_path / "big.siff", shape=(70, 66), n_slices=2, n_timepoints=3,
                   photons_per_frame=3000)
    dst = tmp_path / "big.zarr"
    zs.convert(t.path, dst)
    import zarr

    grp = zarr.open_group(str(dst), path="ome", mode="r")
    assert [grp[str(k)].shape[-2:] for k in range(2)] == [(70, 66), (35, 33)]
    assert "2" not in grp
    with xr.open_dataset(t.path, engine="siff") as ds:
        _check_ome(dst, ds)
    zs.convert(t.path, dst, overwrite=True, ome_levels=3)
    grp = zarr.open_group(str(dst), path="ome", mode="r")
    assert grp["2"].shape[-2:] == (18, 17)
    with xr.open_dataset(t.path, engine="siff") as ds:
        _check_ome(dst, ds)


@pytest.mark.parametrize("name", ["two_chan_slices_flyback", "partial_volume",
                                  "frames_per_slice"])
def test_ome_level0_shares_the_intensity_shards(siff_files, tmp_path, name, monkeypatch):
    """Level 0 is stored in the intensity's order, so its shards are copies, not re-encoded.

    A shard whose timepoints differ (the intensity's partial last volume, which the
    image leaves out) and files with repeats (folded into t) are encoded as before.
    """
    from siff_xarray.store.layout import Target

    copies = []
    real = Target.copy

    def copy(self, src, dst):
        copies.append(dst)
        real(self, src, dst)

    monkeypatch.setattr(Target, "copy", copy)
    t = siff_files[name]
    dst = tmp_path / "out.zarr"
    zs.convert(t.path, dst, **_small_shards(t))
    with xr.open_dataset(t.path, engine="siff") as ds:
        _check_ome(dst, ds)
        repeats = "repeat" in ds.dims
    shards = sorted(p.relative_to(dst / "ome" / "0") for p in (dst / "ome" / "0" / "c").rglob("*")
                    if p.is_file())
    same = [s for s in shards if (dst / "intensity" / s).is_file()
            and (dst / "intensity" / s).read_bytes() == (dst / "ome" / "0" / s).read_bytes()]
    assert len(shards) >= 2
    assert sorted(copies) == [f"ome/0/{s}" for s in same]
    if repeats:
        assert copies == []
    elif name == "partial_volume":
        assert 0 < len(copies) == len(shards) - 1  # the last shard holds the partial volume
    else:
        assert len(copies) == len(shards)
    assert zs.verify(t.path, dst) == []


def _small_shards(t) -> dict[str, int]:
    """Shards of two volumes (chunks of one), so that files convert in several batches."""
    h, w = t.shape
    return {"shard_bytes": 2 * t.n_slices * t.frames_per_slice * len(t.channels) * h * w * 2,
            "chunk_bytes": 1}


@pytest.mark.parametrize("name", ["two_chan_slices_flyback", "partial_volume",
                                  "frames_per_slice", "smallest_bright", "single_raw"])
def test_convert_is_lossless(siff_files, tmp_path, name):
    t = siff_files[name]
    dst = tmp_path / "out.zarr"
    summary = zs.convert(t.path, dst, **_small_shards(t))
    assert summary.batches >= 2 and summary.frames == t.n_frames
    assert summary.photons == len(t.arrival)
    with zs.open_converted(dst) as ds, xr.open_dataset(t.path, engine="siff") as src:
        xr.testing.assert_identical(ds.load().drop_vars("source_file"),
                                    src.load().drop_vars("source_file"))
        assert ds.intensity.encoding["shards"][0] == 2 * ds.intensity.encoding["chunks"][0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # consolidated metadata: no fallback warning
        ds = xr.open_zarr(dst)  # plain xarray opens it too
    with ds:
        assert ds.intensity.dtype == np.uint16
        _check_ome(dst, ds)
    for fr in range(t.n_frames):  # every frame, flyback included
        pix, tau = zs.read_photons(dst, fr)
        tp, tt = t.photons(fr)
        np.testing.assert_array_equal(pix, tp)
        # within a pixel the order of photons is not kept: compare (pixel, arrival) multisets
        np.testing.assert_array_equal(np.sort(pix.astype(np.int64) << 32 | tau),
                                      np.sort(tp.astype(np.int64) << 32 | tt))
        spix, stau = zs.read_photons(t.path, fr)  # the same function reads the .siff
        np.testing.assert_array_equal(spix, pix)
        np.testing.assert_array_equal(np.sort(spix.astype(np.int64) << 32 | stau),
                                      np.sort(pix.astype(np.int64) << 32 | tau))
    assert zs.verify(t.path, dst) == []


def test_root_holds_zarr_pythons_consolidated_metadata(siff_files, tmp_path, stop_after):
    """The root zarr.json equals what zarr.consolidate_metadata would write."""
    import json
    import shutil

    import zarr

    t = siff_files["two_chan_slices_flyback"]
    dst = tmp_path / "c.zarr"
    zs.convert(t.path, dst, **_small_shards(t))
    ours = json.loads((dst / "zarr.json").read_text())
    assert {"photons", "photons/arrival_time", "intensity", "ome", "ome/0"} <= set(
        ours["consolidated_metadata"]["metadata"])
    copy = tmp_path / "copy.zarr"
    shutil.copytree(dst, copy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "not part of the Zarr v3 specification"
        zarr.consolidate_metadata(str(copy))
    assert json.loads((copy / "zarr.json").read_text()) == ours
    assert zarr.open_group(str(dst), mode="r", use_consolidated=True)["photons/photon_count"]\
        .shape == (t.n_frames,)

    # the finish consolidates the metadata the start recorded (.siff-progress/nodes.json);
    # a store started without that record (an earlier version) reads every node's
    old = tmp_path / "old.zarr"
    with pytest.raises(stop_after.error):
        zs.convert(t.path, old, progress=stop_after(1), scheduler="sync", **_small_shards(t))
    (old / ".siff-progress" / "nodes.json").unlink()
    zs.convert(t.path, old, resume=True)
    resumed = json.loads((old / "zarr.json").read_text())
    copy = tmp_path / "old-copy.zarr"
    shutil.copytree(old, copy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(str(copy))
    assert json.loads((copy / "zarr.json").read_text()) == resumed


def test_verify_finds_differences(siff_files, tmp_path):
    import zarr

    t = siff_files["two_chan_slices_flyback"]
    dst = tmp_path / "v.zarr"
    zs.convert(t.path, dst, **_small_shards(t))
    arr = zarr.open_array(str(dst), path="photons/arrival_time", mode="r+")
    start = int(zarr.open_array(str(dst), path="photons/photon_start")[5])
    arr[start] = int(arr[start]) + 1
    problems = zs.verify(t.path, dst)
    assert any("arrival times differ" in p and "frame 5" in p for p in problems)
    inten = zarr.open_array(str(dst), path="intensity", mode="r+")
    inten[0, 0, 0, 0, 0] = int(inten[0, 0, 0, 0, 0]) + 1
    problems = zs.verify(t.path, dst)
    assert any("count images differ" in p for p in problems)
    assert not any("was converted from" in p for p in problems)  # (the right file)
    # compared with another file, the differences come after a note naming the store's
    other = write_siff(tmp_path / "other.siff", shape=(32, 32), channels=(1, 2), n_slices=3,
                       n_flyback=1, n_timepoints=t.n_frames // 8, seed=11)
    problems = zs.verify(other.path, dst)
    note = (f"the store was converted from {t.path}, not {other.path}: is SOURCE the "
            "store's source?")
    # (frames of another shape: reported, not compared; it raised a numpy shape error)
    assert problems == [note, "frame shape differs: source (32, 32), store (12, 10)"]


def test_verify_compares_arrival_times_per_pixel_as_multisets(siff_files, tmp_path):
    """Reordered within a pixel: the same photons. Moved between pixels: a difference."""
    import zarr

    t = siff_files["two_chan_slices_flyback"]
    dst = tmp_path / "v.zarr"
    zs.convert(t.path, dst, **_small_shards(t))
    arr = zarr.open_array(str(dst), path="photons/arrival_time", mode="r+")
    k = int(np.argmax(zarr.open_array(str(dst), path="photons/photon_count")[...]))
    start = int(zarr.open_array(str(dst), path="photons/photon_start")[k])
    pix, tau = zs.read_photons(dst, k)
    same = np.flatnonzero((np.diff(pix) == 0) & (np.diff(tau.astype(np.int64)) != 0))
    other = np.flatnonzero(np.diff(pix) != 0)
    assert same.size and other.size
    i, j = int(same[0]), int(other[0])
    values = arr[start : start + len(tau)]
    values[[i, i + 1]] = values[[i + 1, i]]  # two photons of one pixel swap places
    arr[start : start + len(tau)] = values
    assert zs.verify(t.path, dst) == []
    values[[i, i + 1]] = values[[i + 1, i]]
    if values[j] != values[j + 1]:
        values[[j, j + 1]] = values[[j + 1, j]]  # photons of two pixels swap
    else:
        values[j] += 1
    arr[start : start + len(tau)] = values
    problems = zs.verify(t.path, dst)
    assert any(f"arrival times differ (first in frame {k})" in p for p in problems), problems
    counts = zarr.open_array(str(dst), path="photons/photon_count", mode="r+")
    counts[k] = int(counts[k]) + 1
    problems = zs.verify(t.path, dst)
    assert any("photons/photon_count disagrees with the count images" in p
               for p in problems), problems


def test_parallel_output_is_byte_identical(siff_files, tmp_path):
    t = siff_files["frames_per_slice"]
    one = tmp_path / "one.zarr"
    many = tmp_path / "many.zarr"
    zs.convert(t.path, one, scheduler="sync", **_small_shards(t))
    zs.convert(t.path, many, scheduler="threads", num_workers=4, **_small_shards(t))
    assert _tree(one) == _tree(many)


def test_a_conversion_runs_one_batch_per_core_and_leaves_dasks_main_thread(siff_files,
                                                                          tmp_path):
    """In a fresh interpreter (dask not imported yet), a conversion on the threaded
    scheduler converts at most one batch per core at a time, and the user's own
    computations after it still get dask's default pool. dask takes the thread that
    first imports ``dask.threaded`` for the main thread; the conversion's start first
    imported it in a helper thread, after which every computation of the process got
    Python's default pool (six threads on two cores)."""
    t = siff_files["two_chan_slices_flyback"]
    code = textwrap.dedent(f"""
        import threading, time
        import siff_xarray
        from siff_xarray.store import converter

        now, most, lock = [0], [0], threading.Lock()
        real = converter._write_batch

        def counted(*args):
            with lock:
                now[0] += 1
                most[0] = max(most[0], now[0])
            try:
                time.sleep(0.05)  # (each batch long enough for the others to start)
                return real(*args)
            finally:
                with lock:
                    now[0] -= 1

        converter._write_batch = counted
        siff_xarray.convert({str(t.path)!r}, {str(tmp_path / "o.zarr")!r},
                            shard_bytes={_small_shards(t)["shard_bytes"]},
                            chunk_bytes={_small_shards(t)["chunk_bytes"]})
        import dask, dask.system, dask.threaded
        dask.compute(dask.delayed(sum)([1, 2]))  # the user's computation
        print(most[0], dask.system.CPU_COUNT,
              dask.threaded.main_thread is threading.main_thread(),
              getattr(dask.threaded.default_pool, "_max_workers", None))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    most, cores, main, pool = out.stdout.split()
    assert 1 <= int(most) <= int(cores), out.stdout
    assert main == "True" and pool == cores, out.stdout


@pytest.mark.parametrize("scheduler", ["threads", "sync", "processes"])
def test_a_local_conversion_leaves_dask_distributed_unimported(siff_files, tmp_path,
                                                               scheduler):
    """Asked for by name, dask imports ``dask.distributed`` to look for a running
    client (0.1 s in a command line's process); a local scheduler never uses one."""
    t = siff_files["two_chan_slices_flyback"]
    code = textwrap.dedent(f"""
        import sys
        import siff_xarray
        siff_xarray.convert({str(t.path)!r}, {str(tmp_path / "o.zarr")!r},
                            scheduler={scheduler!r}, num_workers=2,
                            shard_bytes={_small_shards(t)["shard_bytes"]},
                            chunk_bytes={_small_shards(t)["chunk_bytes"]})
        print("distributed" in sys.modules,
              siff_xarray.verify({str(t.path)!r}, {str(tmp_path / "o.zarr")!r}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "[]"], out.stdout


def test_distributed_processes(siff_files, tmp_path):
    distributed = pytest.importorskip("distributed")
    t = siff_files["two_chan_slices_flyback"]
    ref = tmp_path / "ref.zarr"
    zs.convert(t.path, ref, scheduler="sync", **_small_shards(t))
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        out = tmp_path / "dist.zarr"
        seen = []
        zs.convert(t.path, out, scheduler=client, **_small_shards(t),
                   progress=lambda p: seen.append((p.batches_done, p.batches_total,
                                                   p.frames_done, p.photons_done)))
        # dask starts its workers with MALLOC_TRIM_THRESHOLD_ set, which fixes glibc's
        # mmap threshold at 128 KiB: the batches raised it, the run's end restored it
        # (siff_xarray._allocator)
        tuned = client.run(lambda: (__import__("siff_xarray._allocator").
                                    _allocator.times_tuned,
                                    __import__("siff_xarray._allocator")._allocator.tuned))
        fixed = client.run(lambda: __import__("siff_xarray._allocator").
                           _allocator.fixed_mmap_threshold())
    assert _tree(out) == _tree(ref)
    assert [s[0] for s in seen] == list(range(1, len(seen) + 1)) and seen[-1][0] == seen[-1][1]
    assert seen[-1][2] == t.n_frames and seen[-1][3] == len(t.arrival)
    if sys.platform.startswith("linux") and all(fixed.values()):
        # every worker that converted a batch raised them once, and none still has them
        assert all(n <= 1 and not now for n, now in tuned.values()), tuned
        assert sum(n for n, _ in tuned.values()) >= 1, tuned


def test_a_distributed_conversion_that_needs_wide_arrival_times_runs_again(tmp_path):
    """Arrival times above 65535 show only while decoding: the run is laid out again
    with uint32, as a new run. Under the old run id the workers, where that run had
    ended, refused every batch of the new one."""
    import zarr

    distributed = pytest.importorskip("distributed")
    t = write_siff(tmp_path / "w.siff", shape=(8, 8), n_timepoints=12, tau_bins=30000,
                   overflow_fraction=0.2, encoding="raw", photons_per_frame=300)
    assert t.arrival.max() > 65535
    dst = tmp_path / "w.zarr"
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        summary = zs.convert(t.path, dst, scheduler=client, shard_bytes=2 * 8 * 8 * 2,
                             chunk_bytes=1)
        running = client.run(lambda: dict(__import__(
            "siff_xarray.store.converter").store.converter._active))
    assert summary.batches >= 4 and all(r == {} for r in running.values()), running
    assert zarr.open_array(str(dst), path="photons/arrival_time").dtype == np.uint32
    assert zs.verify(t.path, dst) == []


_WORKER_PATCH = """
import os, time
from siff_xarray.store import converter as conv

real_decode, real_write = conv._decode_batch, conv._write_batch

def first(name):  # (once across the workers: the file's creation decides)
    try:
        os.close(os.open(os.path.join({marks!r}, name), os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return False
    return True

def decode(f, bounds, rows, photons, f0, *args, **kwargs):
    if first("slow"):  # the first batch to decode goes on after the second failed
        open(os.path.join({marks!r}, f"slow-{{f0}}"), "w").close()
        time.sleep(2.0)
    elif first("fail"):
        raise RuntimeError("boom in the first batch")
    return real_decode(f, bounds, rows, photons, f0, *args, **kwargs)

def write_batch(plan_json, b, *args, **kwargs):
    try:
        return real_write(plan_json, b, *args, **kwargs)
    finally:
        open(os.path.join({marks!r}, f"done-{{b}}-{{time.time()!r}}"), "w").close()

conv._decode_batch, conv._write_batch = decode, write_batch
"""


def _fail_on_a_cluster(src: str, dst: Path, patch: str, n_workers: int,
                       settle_s: float = 0.0) -> dict:
    """Convert ``src`` on a LocalCluster of ``n_workers`` one-thread worker processes
    that ran ``patch`` first (a batch fails: "boom in the first batch"); ``settle_s``
    later, return what each worker still counts running (``converter._active``)."""
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        client.run(exec, patch, {})
        with pytest.raises(RuntimeError, match="boom in the first batch"):
            zs.convert(src, dst, scheduler=client, shard_bytes=8 * 8 * 2, chunk_bytes=1)
        time.sleep(settle_s)
        return client.run(lambda: dict(getattr(__import__(
            "siff_xarray.store.converter").store.converter, "_active", {})))


def test_a_distributed_run_that_failed_gives_the_store_up_after_its_workers_batches(
        tmp_path, monkeypatch):
    """When a worker's batch fails, the client has the error while another worker's
    batch goes on. The run gives the store up only once the workers have stopped
    such batches (each ends the run itself, and waits for its own), so none writes
    into a store a resume may already have taken."""
    from siff_xarray.store import converter as conv

    pytest.importorskip("distributed")  # (before the file: a skip makes nothing)
    t = write_siff(tmp_path / "d.siff", shape=(8, 8), n_timepoints=6, photons_per_frame=300)
    marks = tmp_path / "marks"
    marks.mkdir()
    released = []
    real_release = conv.owner.release

    def release(*args, **kwargs):
        released.append(time.time())
        return real_release(*args, **kwargs)

    monkeypatch.setattr(conv.owner, "release", release)
    dst = tmp_path / "d.zarr"
    running = _fail_on_a_cluster(t.path, dst, _WORKER_PATCH.format(marks=str(marks)), 2)
    done = {int(m.name.split("-")[1]): float(m.name.split("-", 2)[2])
            for m in marks.glob("done-*")}
    slow = [int(m.name.split("-")[1]) for m in marks.glob("slow-*")]  # (its frame = batch)
    assert len(slow) == 1 and slow[0] in done and len(released) == 1, (slow, done, released)
    assert all(when <= released[0] for when in done.values()), (done, released)
    assert all(r == {} for r in running.values()), running
    monkeypatch.setattr(conv.owner, "release", real_release)
    zs.convert(t.path, dst, resume=True, shard_bytes=8 * 8 * 2, chunk_bytes=1)
    assert zs.verify(t.path, dst) == []


_BEGIN_PATCH = """
import os
from siff_xarray.store import converter as conv

real_decode, real_write = conv._decode_batch, conv._write_batch

def decode(*args, **kwargs):
    raise RuntimeError("boom in the first batch")

def write_batch(plan_json, b, *args, **kwargs):
    open(os.path.join({marks!r}, f"begun-{{b}}"), "w").close()
    return real_write(plan_json, b, *args, **kwargs)

conv._decode_batch, conv._write_batch = decode, write_batch
"""


def test_a_failed_distributed_run_cancels_the_batches_not_started(tmp_path):
    """When a batch fails on a cluster, the client cancels the run's tasks that
    have not started: they never start (a task that started anyway would be refused
    on its worker, but would still be scheduled, one after another, for nothing).
    Checked on its own: one worker of one thread, every batch failing; without the
    cancel all eight begin."""
    pytest.importorskip("distributed")  # (before the file: a skip makes nothing)
    t = write_siff(tmp_path / "c.siff", shape=(8, 8), n_timepoints=8, photons_per_frame=300)
    marks = tmp_path / "marks"
    marks.mkdir()
    dst = tmp_path / "c.zarr"
    # (2 s for tasks still scheduled to reach the worker)
    running = _fail_on_a_cluster(t.path, dst, _BEGIN_PATCH.format(marks=str(marks)), 1, 2.0)
    begun = sorted(int(m.name.split("-")[1]) for m in marks.glob("begun-*"))
    assert all(r == {} for r in running.values()), running
    n_batches = len(json.loads((dst / ".siff-progress" / "plan.json").read_text())[
        "batch_frames"])
    assert n_batches == 8 and 1 <= len(begun) <= 3, begun
    zs.convert(t.path, dst, resume=True, shard_bytes=8 * 8 * 2, chunk_bytes=1)
    assert zs.verify(t.path, dst) == []


def test_a_run_that_ends_drops_the_tails_a_late_thread_kept(monkeypatch):
    """A thread that takes a batch as its run fails can keep a list of tails for the
    run after the run took its own (a CI run on Python 3.13 met it: an empty list
    left in ``converter._tails``). The run's end drops it, once its tails are done."""
    from concurrent.futures import Future

    from siff_xarray.store import converter as conv

    monkeypatch.setattr(conv, "_tails", {})
    monkeypatch.setattr(conv, "_ended", set())
    done, failed = Future(), Future()
    done.set_result(None)
    failed.set_exception(RuntimeError("its record was refused"))
    conv._tails["late-run"] = [done, failed]
    conv._tails["other-run"] = []
    conv._forget_sources("late-run")
    assert conv._tails == {"other-run": []} and "late-run" in conv._ended


def test_a_batch_of_a_run_that_ended_here_leaves_the_malloc_settings(monkeypatch):
    """The thresholds a batch raises are restored when its run ends in the process; a
    batch that starts after that (a distributed task still running when another
    failed) must not raise them again, or nothing would restore them."""
    from siff_xarray.store import converter as conv

    raised = []
    monkeypatch.setattr(conv, "raise_thresholds", raised.append)
    monkeypatch.setattr(conv, "_ended", {"ended-run"})
    monkeypatch.setattr(conv.Plan, "from_json", classmethod(
        lambda cls, text: SimpleNamespace(destination="nowhere.zarr", destination_options=None)))

    def convert_batch(*args):
        raise RuntimeError("the batch stops here")

    monkeypatch.setattr(conv, "_convert_batch", convert_batch)
    with pytest.raises(ConversionError, match="ended before this batch started"):
        conv._write_batch("{}", 0, "ended-run")
    with pytest.raises(RuntimeError, match="the batch stops here"):
        conv._write_batch("{}", 0, "live-run")
    assert raised == ["live-run"]
    assert conv._active == {}  # (the failed batch is not counted as running)


@pytest.mark.parametrize(("env", "fixed"), [
    ({}, False),
    ({"MALLOC_TRIM_THRESHOLD_": "65536"}, True),
    ({"MALLOC_TOP_PAD_": "0"}, True),
    ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=65536"}, True),
    ({"MALLOC_TRIM_THRESHOLD_": "65536", "MALLOC_MMAP_THRESHOLD_": "131072"}, False),
    ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1:glibc.malloc.mmap_threshold=9"}, False),
])
def test_which_environments_fix_the_mmap_threshold(env, fixed):
    from siff_xarray._allocator import fixed_mmap_threshold

    assert fixed_mmap_threshold(env) is fixed


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_conversion_lets_freed_buffers_be_reused_and_gives_memory_back_after():
    """A process started with MALLOC_TRIM_THRESHOLD_ (as dask's workers are) maps
    every buffer of 128 KiB or more afresh: 1 MiB arrays allocated and freed in turn
    each fault their 256 pages in. While a conversion runs they reuse the heap; when
    the last one ends the process's settings are back, its free memory handed back
    (its RSS falls back to where it was before the conversion's buffers)."""
    code = textwrap.dedent("""
        import resource, numpy as np
        from siff_xarray import _allocator

        def faults():
            r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(200):
                a = np.ones(2**20, dtype=np.uint8)
                del a
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0

        def rss_kib():
            return int(next(l for l in open("/proc/self/status")
                            if l.startswith("RssAnon")).split()[1])

        before = faults()
        raised = _allocator.raise_thresholds("run-a")
        _allocator.raise_thresholds("run-b")
        during = faults()
        rss0 = rss_kib()
        kept = [np.ones(2**19, dtype=np.uint8) for _ in range(200)]  # 100 MiB on the heap
        del kept[:-1]  # freed, below the last one: no trim gives it back
        rss1 = rss_kib()
        _allocator.restore_thresholds("run-a")
        still = _allocator.tuned
        _allocator.restore_thresholds("run-b")
        rss2 = rss_kib()
        del kept  # the heap is free to its top: nothing left to reuse below 128 KiB maps
        print(before, raised, during, still, _allocator.tuned, faults(), rss0, rss1, rss2)
    """)
    env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": "65536"}
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    before, raised, during, still, tuned, after = (int(out[0]), out[1], int(out[2]),
                                                   out[3], out[4], int(out[5]))
    rss0, rss1, rss2 = (int(x) for x in out[6:9])
    if raised == "False":  # (not glibc)
        pytest.skip("mallopt is not available")
    assert before > 200 * 200 and during < before / 20, (before, during)
    assert still == "True" and tuned == "False"  # restored after the last run only
    assert after > before / 2, (before, after)  # the environment's settings again
    assert rss1 - rss0 > 90 * 1024 and rss2 - rss0 < 10 * 1024, (rss0, rss1, rss2)


def test_existing_stores_are_protected(siff_files, tmp_path):
    t = siff_files["single_compressed"]
    dst = tmp_path / "p.zarr"
    zs.convert(t.path, dst)
    before = _tree(dst)
    with pytest.raises(ConversionError, match="finished store exists"):
        zs.convert(t.path, dst)
    # resume is idempotent: a finished store of this source is "already complete"
    again = zs.convert(t.path, dst, resume=True)
    assert again.already_complete and again.batches == 0
    assert again.frames == SiffFile(t.path).num_frames
    assert _tree(dst) == before
    other_src = write_siff(tmp_path / "other.siff", shape=(8, 8), n_timepoints=2, seed=9)
    with pytest.raises(ConversionError, match="was being converted from"):
        zs.convert(other_src.path, dst, resume=True)
    assert _tree(dst) == before
    zs.convert(t.path, dst, overwrite=True)
    assert zs.verify(t.path, dst) == []
    other = tmp_path / "not-a-store"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(ConversionError, match="not empty"):
        zs.convert(t.path, other)
    assert (other / "notes.txt").read_text() == "keep me"


def test_interrupted_conversion_is_clearly_incomplete_and_resumes(siff_files, tmp_path,
                                                                  monkeypatch):
    t = siff_files["partial_volume"]
    ref = tmp_path / "ref.zarr"
    zs.convert(t.path, ref, scheduler="sync", **_small_shards(t))
    dst = tmp_path / "cut.zarr"
    from siff_xarray.store import converter as conv

    real = conv._write_batch
    calls = []

    # the second batch to run (dask picks the order) is cut off
    def failing(plan_json, b, run_id, tails=None):
        calls.append(b)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated interruption")
        return real(plan_json, b, run_id, tails)

    monkeypatch.setattr(conv, "_write_batch", failing)
    with pytest.raises(KeyboardInterrupt):
        zs.convert(t.path, dst, scheduler="sync", **_small_shards(t))
    monkeypatch.setattr(conv, "_write_batch", real)
    with pytest.raises(IncompleteStoreError, match=r"incomplete \(1 of 2 batches\)"):
        zs.open_converted(dst)
    with pytest.raises(Exception):  # noqa: B017 - plain xarray cannot open it as a group
        xr.open_zarr(dst, consolidated=False)
    with pytest.raises(ConversionError, match="resume"):
        zs.convert(t.path, dst, **_small_shards(t))
    summary = zs.convert(t.path, dst, resume=True, scheduler="sync")
    assert summary.batches_skipped == 1
    assert _tree(dst) == _tree(ref)
    with pytest.raises(ConversionError, match="no interrupted conversion"):
        zs.convert(t.path, tmp_path / "fresh.zarr", resume=True)


@pytest.mark.slow
def test_sigkill_mid_conversion_then_resume(tmp_path):
    t = write_siff(tmp_path / "k.siff", shape=(16, 16), channels=(1, 2), n_slices=2,
                   n_flyback=1, n_timepoints=24, photons_per_frame=500, seed=4)
    shard = 2 * 2 * 2 * 16 * 16 * 2  # two volumes per batch (chunks of one): 12 batches
    ref = tmp_path / "ref.zarr"
    zs.convert(t.path, ref, scheduler="sync", shard_bytes=shard, chunk_bytes=1)
    dst = tmp_path / "killed.zarr"
    script = textwrap.dedent(f"""
        import sys, time
        from siff_xarray import store as zs

        def progress(p):
            print("batch", p.batches_done, flush=True)
            time.sleep(0.3)

        zs.convert({t.path!r}, {str(dst)!r}, scheduler="sync", shard_bytes={shard},
                   chunk_bytes=1, progress=progress)
        print("finished", flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("batch 3"):
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        proc.wait(60)
    assert proc.returncode == -signal.SIGKILL
    with pytest.raises(IncompleteStoreError, match="incomplete"):
        zs.open_converted(dst)
    before = os.stat(t.path).st_mtime_ns
    zs.convert(t.path, dst, resume=True)
    assert os.stat(t.path).st_mtime_ns == before  # the source is only read
    assert zs.verify(t.path, dst) == []
    assert _tree(dst) == _tree(ref)


def test_wide_arrival_times_use_uint32(tmp_path):
    import zarr

    t = write_siff(tmp_path / "w.siff", shape=(8, 8), n_timepoints=3, tau_bins=30000,
                   overflow_fraction=0.2, encoding="raw", photons_per_frame=300)
    assert t.arrival.max() > 65535
    dst = tmp_path / "w.zarr"
    zs.convert(t.path, dst)
    assert zarr.open_array(str(dst), path="photons/arrival_time").dtype == np.uint32
    assert zs.verify(t.path, dst) == []


def test_without_ome(siff_files, tmp_path):
    t = siff_files["single_raw"]
    zs.convert(t.path, tmp_path / "n.zarr", ome=False)
    assert not (tmp_path / "n.zarr" / "ome").exists()
    assert zs.verify(t.path, tmp_path / "n.zarr") == []


@pytest.mark.parametrize("signed", [False, True])
def test_intensity_only_tiff(tmp_path, signed):
    t = write_siff(tmp_path / "i.tif", shape=(6, 5), n_slices=2, n_flyback=1, n_timepoints=4,
                   extra_frames=1, format="tiff", tiff_signed=signed, photons_per_frame=60)
    dst = tmp_path / "i.zarr"
    zs.convert(t.path, dst)
    with zs.open_converted(dst, partial_volume="keep") as z, \
            xr.open_dataset(t.path, engine="siff", partial_volume="keep") as ds:
        assert z.intensity.dtype == (np.int16 if signed else np.uint16)
        if signed:
            assert (ds.intensity.values < 0).any()
        xr.testing.assert_identical(z.load().drop_vars("source_file"),
                                    ds.load().drop_vars("source_file"))
        _check_ome(dst, ds)
    assert zs.verify(t.path, dst) == []
    back = tmp_path / "back.tif"
    zs.to_siff(dst, back)
    assert zs.verify(back, dst) == []
    from siff_xarray import SiffFile

    with SiffFile(t.path) as a, SiffFile(back) as b:
        np.testing.assert_array_equal(a.read_frames(), b.read_frames())
        assert (b.frame_encodings == "tiff").all()
    # pages have no photons: photon reductions say so
    from siff_xarray.errors import SiffFormatError

    with zs.open_converted(dst) as z:
        with pytest.raises(SiffFormatError, match="TIFF"):
            z.siff.lifetime().compute()
        masks = np.random.default_rng(0).random((2, 6, 5)) > 0.5
        xr.testing.assert_identical(z.siff.sum_masks(masks, method="kernel").compute(),
                                    z.siff.sum_masks(masks, method="xarray").compute())


def test_mixed_tiff_and_photon_parts_are_refused(tmp_path):
    a = write_siff(tmp_path / "i.tif", shape=(6, 6), n_timepoints=2, format="tiff")
    b = write_siff(tmp_path / "p.siff", shape=(6, 6), n_timepoints=2)
    with pytest.raises(ConversionError, match="mixes"):
        zs.convert_file([a.path, b.path], tmp_path / "m.zarr")


def test_a_failed_plan_waits_for_the_sidecar_uploads(tmp_path, monkeypatch):
    # the uploads run while the plan is made; when the plan fails, convert returns
    # only after they ended (the caller closes the sources they write from)
    import time

    from siff_xarray import SiffFile

    a = write_siff(tmp_path / "i.tif", shape=(6, 6), n_timepoints=2, format="tiff")
    b = write_siff(tmp_path / "p.siff", shape=(6, 6), n_timepoints=2)
    ended = []
    real_write = SiffFile.write_sidecar

    def slow_write(self):
        time.sleep(0.3)
        out = real_write(self)
        ended.append(out)
        return out

    monkeypatch.setattr(SiffFile, "write_sidecar", slow_write)
    with pytest.raises(ConversionError, match="mixes"):
        zs.convert_file([a.path, b.path], tmp_path / "m.zarr")
    assert len(ended) == 2


def test_s3_to_s3_end_to_end(s3_server, tmp_path):
    import s3fs

    t = write_siff(tmp_path / "s3.siff", shape=(12, 10), channels=(1, 2), n_slices=2,
                   n_flyback=1, n_timepoints=5, extra_frames=2, photons_per_frame=400,
                   events={4: ("go", 0.1)}, seed=6)
    fs = s3fs.S3FileSystem(**s3_server)
    fs.mkdir("raw-data")
    fs.mkdir("zarr-data")
    fs.put(t.path, "raw-data/day1/s3.siff")
    src = "s3://raw-data/day1/s3.siff"
    dst = "s3://zarr-data/day1/s3.zarr"
    summary = zs.convert(src, dst, storage_options=s3_server, target_options=s3_server,
                         **_small_shards(t))
    assert summary.batches >= 2 and summary.store_bytes > 0
    with zs.open_converted(dst, storage_options=s3_server) as ds, \
            xr.open_dataset(t.path, engine="siff") as local:
        xr.testing.assert_identical(ds.load().drop_attrs().drop_vars("source_file"),
                                    local.load().drop_attrs().drop_vars("source_file"))
        assert ds.attrs["source_file"] == src
        # the OME image's level 0: shards copied on the server from the intensity's
        tree = zs.open_converted_tree(dst, storage_options=s3_server)
        from siff_xarray.backend import drop_partial_volume

        np.testing.assert_array_equal(tree["/ome/0"].intensity.values, zs.to_ome_order(
            drop_partial_volume(local).intensity.values))
        tree.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = xr.open_zarr(dst, storage_options=s3_server)  # consolidated: no warning
    with ds:
        assert ds.sizes["time"] == 6
    assert zs.verify(src, dst, storage_options=s3_server, target_options=s3_server) == []
    pix, tau = zs.read_photons(dst, 3, storage_options=s3_server)
    tp, tt = t.photons(3)
    np.testing.assert_array_equal(pix, tp)
    np.testing.assert_array_equal(np.sort(pix.astype(np.int64) << 32 | tau),
                                  np.sort(tp.astype(np.int64) << 32 | tt))
    with pytest.raises(ConversionError, match="finished store exists"):
        zs.convert(src, dst, storage_options=s3_server, target_options=s3_server)


@pytest.mark.parametrize("name", ["two_chan_slices_flyback", "classic_tiff", "smallest_bright",
                                  "frames_per_slice"])
def test_to_siff_round_trip(siff_files, tmp_path, name):
    from siff_xarray import SiffFile

    t = siff_files[name]
    store = tmp_path / "rt.zarr"
    zs.convert(t.path, store, **_small_shards(t))
    back = tmp_path / "back.siff"
    zs.to_siff(store, back)
    with SiffFile(t.path) as a, SiffFile(back) as b:
        assert b.num_frames == a.num_frames
        assert b.header.nvfd_text == a.header.nvfd_text
        assert b.header.roi_text == a.header.roi_text
        assert b.header.bigtiff == a.header.bigtiff
        np.testing.assert_array_equal(b.index.encoding, a.index.encoding)
        np.testing.assert_array_equal(b.read_frames(), a.read_frames())
        np.testing.assert_array_equal(b.histograms(), a.histograms())
        assert b.frame_descriptions() == a.frame_descriptions()
        ta, tb = a.timestamps(), b.timestamps()
        np.testing.assert_array_equal(tb.epoch_laser_ns, ta.epoch_laser_ns)
        assert [(e.frame, e.text) for e in tb.events] == [(e.frame, e.text) for e in ta.events]
        sa, pa, qa = a.photons_batch()
        sb, pb, qb = b.photons_batch()
        np.testing.assert_array_equal(sa, sb)
        np.testing.assert_array_equal(pa, pb)
        key = np.repeat(np.arange(len(sa) - 1), np.diff(sa)).astype(np.int64) << 40
        np.testing.assert_array_equal(np.sort(key | pa.astype(np.int64) << 20 | qa),
                                      np.sort(key | pb.astype(np.int64) << 20 | qb))
    assert zs.verify(back, store) == []  # the written file verifies against the store
    with pytest.raises(ConversionError, match="exists"):
        zs.to_siff(store, back)


def test_streaming_sub_batches_and_many_shards(siff_files, tmp_path, monkeypatch):
    # tiny sub-batches and photon shards exercise the streaming writer on a small file
    from siff_xarray.store import converter as conv

    monkeypatch.setattr(conv, "SUB_BATCH_BYTES", 3000)
    monkeypatch.setattr(conv, "PHOTON_SHARD", 1024)
    monkeypatch.setattr(conv, "PHOTON_CHUNK", 256)
    t = siff_files["smallest_bright"]
    dst = tmp_path / "stream.zarr"
    zs.convert(t.path, dst, scheduler="sync", **_small_shards(t))
    assert zs.verify(t.path, dst) == []
    import zarr

    arr = zarr.open_array(str(dst), path="photons/arrival_time")
    assert arr.shards == (1024,) and arr.shape[0] > 4 * 1024
    for fr in range(t.n_frames):
        pix, tau = zs.read_photons(dst, fr)
        tp, tt = t.photons(fr)
        np.testing.assert_array_equal(np.sort(pix.astype(np.int64) << 32 | tau),
                                      np.sort(tp.astype(np.int64) << 32 | tt))


def test_a_batch_decodes_while_its_check_runs_but_writes_only_after_it(siff_files,
                                                                      tmp_path, monkeypatch):
    """The source's check overlaps decoding (a few round trips saved per remote batch).

    Photon shards stream into the store as they fill, so the first one must wait for
    the check: a check that fails late leaves no photons of that batch stored, and a
    decoding error of a changed source is reported as the change.
    """
    import threading

    from siff_xarray.store import converter as conv

    monkeypatch.setattr(conv, "SUB_BATCH_BYTES", 3000)
    monkeypatch.setattr(conv, "PHOTON_SHARD", 1024)
    monkeypatch.setattr(conv, "PHOTON_CHUNK", 256)
    t = siff_files["smallest_bright"]
    dst = tmp_path / "late.zarr"
    decoded = threading.Event()
    real_decode = conv.Acquisition.decode_into

    def decode_into(self, *args):
        out = real_decode(self, *args)
        decoded.set()
        return out

    def late_refusal(sources, options, recorded, context, pinned=True):
        if "batch" in context:  # the conversion's own start check passes
            assert decoded.wait(10)  # the batch decodes while the check is pending
            raise ConversionError(f"{context}: changed since the conversion started")

    monkeypatch.setattr(conv.Acquisition, "decode_into", decode_into)
    monkeypatch.setattr(conv, "_check_fingerprint", late_refusal)
    with pytest.raises(ConversionError, match="changed since the conversion started"):
        zs.convert(t.path, dst, scheduler="sync", **_small_shards(t))
    stored = [p for p in (dst / "photons" / "arrival_time").rglob("*") if p.is_file()]
    assert [p.name for p in stored] == ["zarr.json"]

    def broken(self, *args):  # what decoding a replaced file may meet
        raise SiffFormatError(f"{self}: IFD claims 99999 entries")

    monkeypatch.setattr(conv.Acquisition, "decode_into", broken)
    decoded.set()
    with pytest.raises(ConversionError, match="changed since the conversion started"):
        zs.convert(t.path, dst, scheduler="sync", overwrite=True, **_small_shards(t))


def test_split_acquisition_becomes_one_store(tmp_path):
    from siff_xarray import SiffFile, open_acquisition

    kw = dict(shape=(8, 6), channels=(1, 2), n_slices=2, n_flyback=1, n_timepoints=6,
              extra_frames=2, events={3: ("a", 0.1), 20: ("b", None)}, seed=11,
              encoding="mixed", photons_per_frame=200)
    whole = write_siff(tmp_path / "whole.siff", **kw)
    parts_dir = tmp_path / "parts"
    parts_dir.mkdir()
    split = write_siff(parts_dir / "run.siff", frames_per_file=7, **kw)  # volumes straddle
    other = write_siff(parts_dir / "single.siff", shape=(8, 6), n_timepoints=2, seed=1)
    out = tmp_path / "out"
    summaries = zs.convert(str(parts_dir / "*.siff"), out, **_small_shards(whole))
    assert sorted(p.name for p in out.iterdir()) == ["run.zarr", "single.zarr"]
    assert [s.frames for s in summaries] == [whole.n_frames, other.n_frames]
    store = out / "run.zarr"
    with zs.open_converted(store) as ds, open_acquisition(split.paths) as acq, \
            xr.open_dataset(whole.path, engine="siff") as one:
        xr.testing.assert_identical(ds.load().drop_vars(SOURCES), acq.load().drop_vars(SOURCES))
        xr.testing.assert_equal(ds.drop_attrs().drop_vars(SOURCES),
                                one.drop_attrs().drop_vars(SOURCES))
    for fr in range(whole.n_frames):
        pix, tau = zs.read_photons(store, fr)
        tp, tt = whole.photons(fr)
        np.testing.assert_array_equal(np.sort(pix.astype(np.int64) << 32 | tau),
                                      np.sort(tp.astype(np.int64) << 32 | tt))
    assert zs.verify(split.paths, store) == []
    assert zs.verify(split.paths[::-1], store) != []  # the order of the parts matters
    back = tmp_path / "joined.siff"
    zs.to_siff(store, back)  # the parts written back as one file
    with SiffFile(back) as b, SiffFile(whole.path) as w:
        np.testing.assert_array_equal(b.read_frames(), w.read_frames())
        assert b.frame_descriptions() == w.frame_descriptions()
    assert zs.group_acquisitions(["d/x_00002.siff", "d/x_00001.siff", "d/y.siff",
                                  "e/x_00001.siff"]) == [
        ["d/x_00001.siff", "d/x_00002.siff"], ["d/y.siff"], ["e/x_00001.siff"]]


def _same_reductions(a, b, rng) -> None:
    """Every photon reduction of two photon sources (SiffFile / StorePhotons) agrees."""
    fr = np.arange(a.num_frames)
    h, w = a._frame_args(fr[:1])[1]
    sh = rng.integers(-5, 6, (fr.size, 2))
    m = rng.random((3, h, w)) > 0.5
    checks = {
        "read_frames": lambda s: s.read_frames(fr, shifts=sh),
        "histograms": lambda s: s.histograms(fr, mode="clip", return_overflow=True),
        "masks_histograms": lambda s: s.masks_histograms(m, fr, shifts=sh),
        "sum_masks": lambda s: s.sum_masks(m, fr, shifts=sh),
        "lifetime_images": lambda s: s.lifetime_images(fr, shifts=sh, units="bins"),
        "sum_masks_flim": lambda s: s.sum_masks_flim(m, fr, shifts=sh),
        "photons_batch": lambda s: s.photons_batch(fr[::-1]),
    }
    for name, fn in checks.items():
        x, y = fn(a), fn(b)
        for u, v in zip(*((x, y) if isinstance(x, tuple) else ((x,), (y,))), strict=True):
            np.testing.assert_array_equal(u, v, err_msg=name)
    for u, v in zip(a.phasor_images(fr, shifts=sh), b.phasor_images(fr, shifts=sh),
                    strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-12)


@pytest.mark.parametrize("wide", [False, True])
def test_store_photons_equal_the_source(tmp_path, rng, wide):
    from siff_xarray import SiffFile
    from siff_xarray.store import StorePhotons

    kw = ({"tau_bins": 30000, "overflow_fraction": 0.2, "encoding": "raw"} if wide else
          {"encoding": "mixed"})
    t = write_siff(tmp_path / "p.siff", shape=(16, 12), channels=(1, 2), n_slices=2,
                   n_flyback=1, n_timepoints=5, extra_frames=3, photons_per_frame=400, **kw)
    dst = tmp_path / "p.zarr"
    zs.convert(t.path, dst)
    with SiffFile(t.path) as a, StorePhotons(dst) as b:
        assert b.num_frames == a.num_frames and "p.zarr" in repr(b)
        _same_reductions(a, b, rng)
        # 3-D masks take each imaging frame's plane; flyback frames have none
        imaging = np.flatnonzero(~a.im_params.locate(np.arange(a.num_frames))["flyback"])
        m3 = rng.random((2, 2, 16, 12)) > 0.5
        np.testing.assert_array_equal(a.sum_masks(m3, imaging), b.sum_masks(m3, imaging))
        with pytest.raises(ValueError, match="flyback"):
            b.sum_masks(m3, [4])  # frames 4 and 5: the flyback scan (2 channels)
        with pytest.raises(IndexError, match=r"p\.zarr"):
            b.photons(a.num_frames)


def test_store_photons_refuse_inconsistent_stores(siff_files, tmp_path):
    import zarr

    from siff_xarray.errors import SiffFormatError
    from siff_xarray.store import StorePhotons

    t = siff_files["frames_per_slice"]
    dst = tmp_path / "bad.zarr"
    zs.convert(t.path, dst)
    counts = zarr.open_array(str(dst), path="photons/photon_count", mode="r+")
    counts[0] = int(counts[0]) + 1  # damage: the count image no longer matches
    with StorePhotons(dst) as p, pytest.raises(SiffFormatError, match="photon_count"):
        p.histograms([0])
    with pytest.raises(FileNotFoundError, match="not a converted"):
        StorePhotons(tmp_path)


_PHASES = ["started", "prepared", "metadata", "planned", "descriptions", "finishing",
           "published"]


@pytest.mark.slow
@pytest.mark.parametrize("phase", _PHASES)
def test_sigkill_at_every_phase_never_leaves_a_finished_looking_store(tmp_path, phase):
    t = write_siff(tmp_path / "p.siff", shape=(12, 10), channels=(1, 2), n_slices=2,
                   n_flyback=1, n_timepoints=6, photons_per_frame=300, seed=5)
    ref = tmp_path / "ref.zarr"
    zs.convert(t.path, ref, scheduler="sync", **_small_shards(t))
    dst = tmp_path / "killed.zarr"
    script = textwrap.dedent(f"""
        import os, signal
        from siff_xarray.store import converter as conv

        def die(name):
            if name == {phase!r}:
                os.kill(os.getpid(), signal.SIGKILL)

        conv._phase = die
        conv.convert_file({t.path!r}, {str(dst)!r}, scheduler="sync",
                          **{_small_shards(t)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    if phase != "published":  # until the root is published, plain Zarr sees no group
        with pytest.raises(Exception):  # noqa: B017 - zarr's own "no group" error
            xr.open_zarr(dst, consolidated=False)
    with pytest.raises(IncompleteStoreError, match="resume"):
        zs.open_converted(dst)
    with pytest.raises(IncompleteStoreError):
        zs.verify(t.path, dst)
    with pytest.raises(ConversionError, match="resume"):
        zs.convert(t.path, dst)
    zs.convert(t.path, dst, resume=True, scheduler="sync")
    assert zs.verify(t.path, dst) == []
    assert _tree(dst) == _tree(ref)


@pytest.mark.slow
@pytest.mark.parametrize("phase", [*_PHASES, "batch"])
def test_an_s3_conversion_killed_at_any_phase_resumes_from_another_process(
        s3_server, tmp_path, phase):
    """Object storage has no partial files, but a killed converter leaves objects
    behind at every phase: the store in the bucket must read as unfinished until
    it is resumed, and resume (from another process, as on another node) must
    finish it to a store that verifies against the source."""
    import s3fs

    t = write_siff(tmp_path / "p.siff", shape=(12, 10), channels=(1, 2), n_slices=2,
                   n_flyback=1, n_timepoints=6, photons_per_frame=300, seed=15)
    fs = s3fs.S3FileSystem(**s3_server)
    fs.makedirs("kill-raw", exist_ok=True)  # the server is shared by the parameters
    fs.makedirs("kill-zarr", exist_ok=True)
    fs.put(t.path, "kill-raw/p.siff")
    src, dst = "s3://kill-raw/p.siff", f"s3://kill-zarr/{phase}.zarr"
    opts = dict(storage_options=s3_server, target_options=s3_server, **_small_shards(t))
    script = textwrap.dedent(f"""
        import os, signal
        from siff_xarray.store import converter as conv

        def die(name):
            if name == {phase!r}:
                os.kill(os.getpid(), signal.SIGKILL)

        write_batch = conv._write_batch

        def write_then_die(*args):
            out = write_batch(*args)
            die("batch")  # after the first batch is in the bucket
            return out

        conv._phase = die
        conv._write_batch = write_then_die
        conv.convert_file({src!r}, {dst!r}, scheduler="sync", **{opts!r})
    """)
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    if phase not in ("started", "prepared"):
        assert fs.ls(dst.removeprefix("s3://"), refresh=True)  # it did leave objects
    with pytest.raises(IncompleteStoreError, match="resume"):
        zs.open_converted(dst, storage_options=s3_server)
    with pytest.raises(ConversionError, match="resume"):
        zs.convert(src, dst, **opts)
    summary = zs.convert(src, dst, resume=True, scheduler="sync", **opts)
    assert summary.frames == t.n_frames
    assert zs.verify(src, dst, storage_options=s3_server, target_options=s3_server) == []
    with zs.open_converted(dst, storage_options=s3_server) as ds, \
            xr.open_dataset(t.path, engine="siff") as local:
        xr.testing.assert_identical(ds.load().drop_attrs().drop_vars("source_file"),
                                    local.load().drop_attrs().drop_vars("source_file"))


def test_a_lost_description_record_is_redone_on_resume(tmp_path, monkeypatch):
    """Each batch records its frames' descriptions; _finish joins them. A batch whose
    record is gone (or was never written) is not done, so resume converts it again."""
    from siff_xarray.store import converter as conv

    t = write_siff(tmp_path / "d.siff", shape=(12, 10), channels=(1, 2), n_slices=2,
                   n_flyback=1, n_timepoints=6, photons_per_frame=300, seed=4)
    dst = tmp_path / "d.zarr"

    def stop(name):
        if name == "descriptions":
            raise KeyboardInterrupt

    monkeypatch.setattr(conv, "_phase", stop)
    with pytest.raises(KeyboardInterrupt):
        zs.convert(t.path, dst, scheduler="sync", **_small_shards(t))
    monkeypatch.undo()
    records = sorted((dst / ".siff-progress").glob("description-*"))
    assert len(records) > 2
    records[1].unlink()
    summary = zs.convert(t.path, dst, resume=True, scheduler="sync")
    assert summary.batches_skipped == summary.batches - 1  # only that batch again
    assert zs.verify(t.path, dst) == []
    with SiffFile(t.path) as f:
        desc, _ = f.description_bytes()
    got = zs.open_converted_groups(dst)["/photons"]
    np.testing.assert_array_equal(got.description.values, desc)


def test_a_full_disk_while_publishing_leaves_a_resumable_store(siff_files, tmp_path,
                                                               monkeypatch):
    import errno

    from fsspec.implementations.local import LocalFileSystem

    t = siff_files["partial_volume"]
    dst = tmp_path / "full.zarr"
    real = LocalFileSystem.pipe_file

    def full(self, path, value, *args, **kwargs):
        if str(path).endswith("zarr.json.partial"):
            real(self, path, value[: len(value) // 3], *args, **kwargs)  # a part lands
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, path, value, *args, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "pipe_file", full)
    with pytest.raises(OSError, match="No space left"):
        zs.convert(t.path, dst, scheduler="sync")
    monkeypatch.setattr(LocalFileSystem, "pipe_file", real)
    assert not (dst / "zarr.json").exists()
    with pytest.raises(IncompleteStoreError, match=r"\((\d+) of \1 batches\)"):
        zs.open_converted(dst)
    zs.convert(t.path, dst, resume=True)
    assert zs.verify(t.path, dst) == []


def test_a_source_that_changes_stops_the_conversion(tmp_path):
    kw = {"shape": (12, 10), "channels": (1, 2), "n_slices": 2, "n_flyback": 1,
          "n_timepoints": 6, "photons_per_frame": 300}
    t = write_siff(tmp_path / "c.siff", seed=1, **kw)
    dst = tmp_path / "c.zarr"

    def replace_after_first_batch(p):  # another acquisition of the same layout
        if p.batches_done == 1:
            write_siff(tmp_path / "c.siff", seed=2, **kw)

    with pytest.raises(ConversionError, match="changed since the conversion started"):
        zs.convert(t.path, dst, scheduler="sync", progress=replace_after_first_batch,
                   **_small_shards(t))
    with pytest.raises(IncompleteStoreError):
        zs.open_converted(dst)
    with pytest.raises(ConversionError, match="changed since the conversion started"):
        zs.convert(t.path, dst, resume=True, scheduler="sync")
    zs.convert(t.path, dst, overwrite=True, scheduler="sync", **_small_shards(t))
    assert zs.verify(t.path, dst) == []


def test_verify_compares_attributes_coordinates_and_eager_variables(siff_files, tmp_path):
    import json

    import zarr

    t = siff_files["two_chan_slices_flyback"]
    dst = tmp_path / "a.zarr"
    zs.convert(t.path, dst)
    assert zs.verify(t.path, dst) == []
    root = dst / "zarr.json"
    meta = json.loads(root.read_text())
    meta["attributes"]["tau_bin_ps"] = 2 * meta["attributes"]["tau_bin_ps"]  # lifetimes x2
    root.write_text(json.dumps(meta))
    z = zarr.open_array(str(dst), path="z", mode="r+")
    z[:] = z[:] + 1.0
    zarr.open_array(str(dst), path="frame_present", mode="r+")[0] = False
    sf = zarr.open_array(str(dst), path="source_frame", mode="r+")
    sf[1, 0, 0] = int(sf[1, 0, 0]) + 1  # photon reductions would read another frame
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zarr.open_array(str(dst), path="source_file", mode="r+")[2, 0, 0] = ""
    problems = zs.verify(t.path, dst)
    assert any(p.startswith("attribute tau_bin_ps differs") for p in problems)
    assert "coordinate z differs" in problems
    assert "variable frame_present differs" in problems
    assert any(p.startswith("variable source_frame differs") for p in problems)
    assert any(p.startswith("variable source_file does not name") for p in problems)


def test_every_chunk_is_checksummed_and_a_damaged_one_is_an_error(siff_files, tmp_path):
    import json

    t = siff_files["two_chan_slices_flyback"]
    dst = tmp_path / "crc.zarr"
    zs.convert(t.path, dst)
    arrays = [p for p in dst.rglob("zarr.json")
              if json.loads(p.read_text()).get("node_type") == "array"]
    assert len(arrays) > 20
    for p in arrays:
        assert "crc32c" in p.read_text(), p.parent  # every array, coordinates included
    shard = dst / "photons" / "arrival_time" / "c" / "0"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x10  # one flipped bit inside compressed arrival times
    shard.write_bytes(bytes(data))
    with pytest.raises(SiffFormatError, match=r"photons/arrival_time: a chunk is damaged"):
        zs.read_photons(dst, 3)
    # verify lists every damaged chunk by array and key (it raised a bare checksum error)
    (dst / "time" / "c" / "0").write_bytes(b"\x00" + (dst / "time" / "c" / "0").read_bytes())
    assert [p.split(" is damaged")[0] for p in zs.verify(t.path, dst)] == [
        "time: chunk c/0", "photons/arrival_time: chunk c/0"]
    # ... and a chunk deleted beside them is listed too (it was left out: the damage
    # cut the comparison short)
    (dst / "photon_count" / "c" / "0" / "0" / "0").unlink()
    problems = zs.verify(t.path, dst)
    assert [p.split(" is damaged")[0] for p in problems[:2]] == [
        "time: chunk c/0", "photons/arrival_time: chunk c/0"]
    assert problems[2:] == ["photon_count: 1 of 1 stored chunks are missing (deleted or "
                            "lost; zarr would read them as zeros); convert again"]
    # an index coordinate is read at open: the error names the store and what to do
    with pytest.raises(SiffFormatError, match=r"crc\.zarr: a coordinate read at open: a "
                       r"chunk is damaged .*siff-xarray verify"):
        zs.open_converted(dst)


def test_verify_and_to_siff_memory_is_bounded_by_the_data_not_the_frame_size(tmp_path,
                                                                              monkeypatch):
    import tracemalloc

    from siff_xarray.store import layout

    t = write_siff(tmp_path / "big.siff", shape=(512, 256), n_timepoints=24,
                   photons_per_frame=200, seed=2)
    dst = tmp_path / "big.zarr"
    zs.convert(t.path, dst)
    monkeypatch.setattr(layout, "BATCH_PIXELS", 4 * 512 * 256)  # 4 such frames per batch
    tracemalloc.start()
    assert zs.verify(t.path, dst, batch_frames=256) == []
    zs.to_siff(dst, tmp_path / "back.siff", batch_frames=512)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    # measured: 9 MB with 4-frame batches, 51 MB when all 24 frames go in one batch (the
    # old behaviour: batch_frames alone, which at 4096 x 4096 meant tens of GB)
    assert peak < 20 * 2**20, peak


def test_verify_finds_deleted_chunks(tmp_path):
    t = write_siff(tmp_path / "m.siff", shape=(12, 10), channels=(1, 2), n_slices=2,
                   n_flyback=1, n_timepoints=8, photons_per_frame=300, seed=3)
    dst = tmp_path / "m.zarr"
    zs.convert(t.path, dst, shard_bytes=2 * 2 * 2 * 12 * 10 * 2 * 2, chunk_bytes=1)
    assert zs.verify(t.path, dst) == []

    def stored(path):
        return sorted(p for p in (dst / path / "c").rglob("*") if p.is_file())

    assert len(stored("intensity")) == 2 and len(stored("photons/arrival_time")) == 2
    stored("intensity")[1].unlink()  # zarr reads a missing chunk as zeros, silently
    stored("photons/arrival_time")[-1].unlink()
    problems = zs.verify(t.path, dst)
    assert "intensity: 1 of 2 stored chunks are missing" in problems[0]
    assert "photons/arrival_time: 1 of 2 stored chunks are missing" in problems[1]


@pytest.mark.parametrize("what", ["ome/0 shards swapped", "ome/1", "histogram",
                                  "photon_count"])
def test_verify_checks_what_the_store_derives_from_the_photons(tmp_path, what):
    """Values written through zarr (valid checksums) that do not follow from the photons."""
    import zarr

    t = write_siff(tmp_path / "d.siff", shape=(64, 64), channels=(1, 2), n_slices=2,
                   n_flyback=1, n_timepoints=6, photons_per_frame=2000, seed=4)
    dst = tmp_path / "d.zarr"
    zs.convert(t.path, dst, **_small_shards(t))
    assert zs.verify(t.path, dst) == []
    if what == "ome/0 shards swapped":  # each shard intact, in the other one's place
        a, b = sorted(p for p in (dst / "ome" / "0" / "c").rglob("*") if p.is_file())[:2]
        da, db = a.read_bytes(), b.read_bytes()
        a.write_bytes(db)
        b.write_bytes(da)
    else:
        arr = zarr.open_array(str(dst), path=what, mode="r+")
        values = arr[1]
        values.flat[0] += 1
        arr[1] = values
    problems = zs.verify(t.path, dst)
    name = what.split()[0]
    assert len(problems) == 1 and problems[0].startswith(f"{name} differs"), problems


def test_converted_store_leaves_the_partial_volume_out_like_the_source(siff_files, tmp_path):
    t = siff_files["partial_volume"]
    dst = tmp_path / "pv.zarr"
    zs.convert(t.path, dst)
    with zs.open_converted(dst) as z, xr.open_dataset(t.path, engine="siff") as ds:
        assert z.sizes["time"] == ds.sizes["time"] == t.n_timepoints
        assert bool(z.frame_present.all())
        np.testing.assert_array_equal(z.intensity.values, ds.intensity.values)
    # the OME image (what viewers show) has no never-acquired planes either
    import zarr

    ome = zarr.open_group(str(dst), path="ome", mode="r")
    assert ome["0"].shape[0] == t.n_timepoints
    with zs.open_converted(dst) as z:
        _check_ome(dst, z)
    with zs.open_converted(dst, partial_volume="keep") as z:
        assert z.sizes["time"] == t.n_timepoints + 1  # the store keeps every frame
        assert not bool(z.frame_present.isel(time=-1).all())
    with pytest.raises(ValueError, match="partial_volume"):
        zs.open_converted(dst, partial_volume="some")


def test_every_chunk_is_stored_and_a_missing_one_is_an_error_not_zeros(tmp_path):
    import json
    import pickle

    import dask
    import zarr

    from siff_xarray.errors import MissingChunkError

    # one slice (z = 0.0) and dark frames: chunks equal to the fill value are stored too
    t = write_siff(tmp_path / "d.siff", shape=(12, 10), channels=(1, 2), n_slices=1,
                   n_timepoints=8, photons_per_frame=0, seed=3)
    dark = tmp_path / "dark.zarr"
    zs.convert(t.path, dark, shard_bytes=2 * 2 * 12 * 10 * 2 * 2, chunk_bytes=1)
    for meta in dark.rglob("zarr.json"):
        node = json.loads(meta.read_text())
        if node.get("node_type") != "array":
            continue
        shape, grid = node["shape"], node["chunk_grid"]["configuration"]["chunk_shape"]
        expected = int(np.prod([-(-n // c) for n, c in zip(shape, grid, strict=True)]))
        stored = [p for p in (meta.parent / "c").rglob("*") if p.is_file()] \
            if (meta.parent / "c").exists() else list(meta.parent.glob("c"))
        assert len(stored) == expected, (meta.parent, len(stored), expected)
    with zs.open_converted(dark) as ds:
        assert int(ds.intensity.sum()) == 0  # dark, and no MissingChunkError

    t = write_siff(tmp_path / "m.siff", shape=(12, 10), channels=(1, 2), n_slices=2,
                   n_flyback=1, n_timepoints=8, photons_per_frame=300, seed=3)
    for victim, read in [
        ("intensity/c/1/0/0/0/0", lambda p: zs.open_converted(p).intensity.values),
        ("intensity/c/1/0/0/0/0", lambda p: zs.open_converted(p, chunks={}).intensity.sum()
         .compute(scheduler="threads")),
        ("photon_count/c/0/0/0", lambda p: zs.open_converted(p).photon_count.values),
        ("time/c/0", lambda p: zs.open_converted(p)),  # an index coordinate: read at open
        ("photons/photon_count/c/0", lambda p: zs.StorePhotons(p)),
        ("photons/arrival_time/c/0", lambda p: zs.read_photons(p, 3)),
        ("photons/arrival_time/c/0", lambda p: zs.to_siff(p, tmp_path / "back.siff",
                                                          overwrite=True)),
    ]:
        dst = tmp_path / "m.zarr"
        zs.convert(t.path, dst, shard_bytes=2 * 2 * 2 * 12 * 10 * 2 * 2, chunk_bytes=1,
                   overwrite=True)
        read(dst)  # complete: reads
        (dst / victim).unlink()
        with pytest.raises(MissingChunkError, match=rf"m\.zarr.*{victim.split('/c/')[0]}: "
                           r"chunk .* is missing"):
            read(dst)
        # zarr's own reading gives zeros; verify reports the chunk as missing
        problems = zs.verify(t.path, dst)
        assert any("missing" in p for p in problems), (victim, problems)
    # the strict store pickles (Dask workers) and still raises after the round trip
    with zs.open_converted(dst, chunks={}) as ds:
        (dst / "intensity/c/0/0/0/0/0").unlink()
        graph = pickle.loads(pickle.dumps(ds.intensity.data))
        with pytest.raises(MissingChunkError), dask.config.set(scheduler="sync"):
            graph.compute()
    assert zarr.open_array(str(dst), path="intensity", mode="r")[...].sum() >= 0  # zarr: 0s
    # a store without the marker (written before it existed) reads as zarr reads it
    root = json.loads((dst / "zarr.json").read_text())
    del root["consolidated_metadata"]["metadata"]["photons"]["attributes"]["all_chunks_stored"]
    (dst / "zarr.json").write_text(json.dumps(root))
    with zs.open_converted(dst) as ds:
        assert int(ds.intensity.isel(time=0).sum()) == 0  # the deleted chunk, as zeros


def _slow_conversion(src, dst, shard, delay):
    """A subprocess converting ``src`` with ``delay`` s after each batch (prints each)."""
    script = textwrap.dedent(f"""
        import time
        from siff_xarray import store as zs

        def progress(p):
            print("batch", p.batches_done, flush=True)
            time.sleep({delay})

        zs.convert({str(src)!r}, {str(dst)!r}, scheduler="sync", shard_bytes={shard},
                   chunk_bytes=1, progress=progress, overwrite=True)
        print("finished", flush=True)
    """)
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_a_second_conversion_never_clobbers_one_that_is_running(tmp_path):
    t = write_siff(tmp_path / "k.siff", shape=(16, 16), channels=(1, 2), n_slices=2,
                   n_flyback=1, n_timepoints=24, photons_per_frame=500, seed=4)
    shard = 2 * 2 * 2 * 16 * 16 * 2  # 12 batches
    ref = tmp_path / "ref.zarr"
    zs.convert(t.path, ref, scheduler="sync", shard_bytes=shard, chunk_bytes=1)
    dst = tmp_path / "run.zarr"
    cli = [sys.executable, "-m", "siff_xarray.cli", "convert", str(t.path), str(dst),
           "--shard-mb", "1"]
    first = _slow_conversion(t.path, dst, shard, 0.4)
    try:
        assert first.stdout.readline().startswith("batch 1")
        # the same job started again, staggered: --overwrite and --resume both refuse
        for flag in ("--overwrite", "--resume"):
            second = subprocess.run([*cli, flag], capture_output=True, text=True, timeout=120)
            assert second.returncode == 2, second.stderr
            assert "another conversion is writing this store (process " \
                   f"{first.pid} on host" in second.stderr, second.stderr
            assert "Traceback" not in second.stderr
        with pytest.raises(ConversionError, match="another conversion is writing"):
            zs.convert(t.path, dst, overwrite=True)
        assert first.stdout.read().rstrip().endswith("finished")
    finally:
        first.wait(120)
    assert first.returncode == 0, first.stderr
    assert zs.verify(t.path, dst) == []
    assert _tree(dst) == _tree(ref)  # the first run's store, untouched by the others

    # a killed owner is dead: --overwrite (and --resume) take the store over at once
    first = _slow_conversion(t.path, dst, shard, 0.4)
    try:
        assert first.stdout.readline().startswith("batch 1")
        first.send_signal(signal.SIGKILL)
    finally:
        first.wait(60)
    assert (dst / ".siff-progress" / "owner.json").exists()
    zs.convert(t.path, dst, overwrite=True, scheduler="sync", shard_bytes=shard,
               chunk_bytes=1)
    assert _tree(dst) == _tree(ref)


def test_a_conversion_that_loses_its_store_stops_without_publishing(tmp_path):
    import json
    import socket
    import time

    from siff_xarray.store import owner

    t = write_siff(tmp_path / "o.siff", shape=(12, 10), channels=(1, 2), n_slices=2,
                   n_flyback=1, n_timepoints=6, photons_per_frame=300, seed=5)
    dst = tmp_path / "o.zarr"
    record = dst / ".siff-progress" / "owner.json"
    other = {"run": "another-run", "host": "node-17.cluster", "pid": 4242,
             "pid_start": None, "heartbeat": time.time()}

    def taken_over_after_the_first_batch(p):  # another machine claims the store
        if p.batches_done == 1:
            record.write_text(json.dumps(other))

    with pytest.raises(ConversionError, match="another conversion took this store over "
                       r"\(process 4242 on host node-17.cluster"):
        zs.convert(t.path, dst, scheduler="sync", progress=taken_over_after_the_first_batch,
                   **_small_shards(t))
    assert not (dst / "zarr.json").exists()  # not published
    assert json.loads(record.read_text())["run"] == "another-run"  # theirs, not released
    # that owner is alive (fresh heartbeat on another host): resume refuses...
    with pytest.raises(ConversionError, match="another conversion is writing this store"):
        zs.convert(t.path, dst, resume=True, scheduler="sync")
    # ...until its heartbeat is older than STALE_AFTER_S
    other["heartbeat"] = time.time() - owner.STALE_AFTER_S - 1
    record.write_text(json.dumps(other))
    zs.convert(t.path, dst, resume=True, scheduler="sync")
    assert zs.verify(t.path, dst) == []
    assert not (dst / ".siff-progress").exists()

    # this host: a process id that exists but started at another time is a reused id
    stale = tmp_path / "s.zarr"
    zs.convert(t.path, stale, scheduler="sync")
    (stale / ".siff-progress").mkdir()
    (stale / ".siff-progress" / "started.json").write_text("{}")
    mine = {"run": "old", "host": socket.gethostname(), "pid": os.getpid(),
            "pid_start": -1, "heartbeat": time.time()}
    (stale / ".siff-progress" / "owner.json").write_text(json.dumps(mine))
    assert owner.live_owner(zs.layout.Target(str(stale), None)) is None
    mine["pid_start"] = None  # unknown start time: the living process counts
    (stale / ".siff-progress" / "owner.json").write_text(json.dumps(mine))
    with pytest.raises(ConversionError, match=f"process {os.getpid()} on host"):
        zs.convert(t.path, stale, overwrite=True)


def test_an_interrupted_conversion_releases_its_store_for_resume(siff_files, tmp_path):
    t = siff_files["two_chan_slices_flyback"]
    dst = tmp_path / "i.zarr"

    def interrupt(p):
        raise KeyboardInterrupt  # Ctrl-C in a notebook, same process resumes at once

    with pytest.raises(KeyboardInterrupt):
        zs.convert(t.path, dst, scheduler="sync", progress=interrupt, **_small_shards(t))
    assert not (dst / ".siff-progress" / "owner.json").exists()
    zs.convert(t.path, dst, resume=True, scheduler="sync")
    assert zs.verify(t.path, dst) == []


def test_a_same_size_edit_with_the_mtime_set_back_stops_the_conversion(tmp_path):
    t = write_siff(tmp_path / "e.siff", shape=(64, 64), channels=(1, 2), n_slices=2,
                   n_flyback=1, n_timepoints=12, photons_per_frame=2000, seed=1)
    size = os.path.getsize(t.path)
    assert size > 4 * 2**16  # the edit lies outside the digested first and last 64 KiB
    dst = tmp_path / "e.zarr"

    def edit_after_first_batch(p):  # one byte in the middle, size and mtime kept
        if p.batches_done == 1:
            st = os.stat(t.path)
            with open(t.path, "r+b") as fh:
                fh.seek(size // 2)
                b = fh.read(1)
                fh.seek(size // 2)
                fh.write(bytes([b[0] ^ 1]))
            os.utime(t.path, ns=(st.st_atime_ns, st.st_mtime_ns))

    with pytest.raises(ConversionError, match=r"changed since the conversion started "
                       r"\(stamp"):
        zs.convert(t.path, dst, scheduler="sync", progress=edit_after_first_batch,
                   **_small_shards(t))


def test_the_siff_engine_opens_converted_stores_as_dataset_tree_and_groups(tmp_path):
    """``engine="siff"`` takes a store where ``engine="zarr"`` cannot build its tree.

    Before, the engine refused a store (ValueError naming open_converted).
    """
    import dask.array as da

    t = write_siff(tmp_path / "e.siff", shape=(70, 66), channels=(1, 2), n_slices=2,
                   n_timepoints=4, photons_per_frame=2000, seed=7, extra_frames=3)
    dst = tmp_path / "e.zarr"
    zs.convert(t.path, dst)
    with zs.open_converted(dst) as want:
        want = want.load()
    with xr.open_dataset(dst, engine="siff") as ds:
        assert not isinstance(ds.intensity.variable._data, da.Array)  # lazy, not Dask
        xr.testing.assert_identical(ds.load(), want)
    with xr.open_dataset(dst, engine="siff", chunks={}) as ds:
        assert isinstance(ds.intensity.data, da.Array)
        assert ds.intensity.chunks[0][0] == min(
            ds.intensity.encoding["preferred_chunks"]["time"], ds.sizes["time"])
        xr.testing.assert_identical(ds.load(), want)
    with xr.open_dataset(dst, engine="siff", partial_volume="keep",
                         drop_variables=["histogram"]) as ds, \
            zs.open_converted(dst, partial_volume="keep") as kept:
        assert "histogram" not in ds and ds.sizes["time"] == kept.sizes["time"] == 5
    with xr.open_dataset(str(dst)) as ds:  # no engine: zarr's or ours, the same Dataset
        np.testing.assert_array_equal(ds.intensity.values, want.intensity.values)
    tree = xr.open_datatree(dst, engine="siff", chunks={})
    groups = xr.open_groups(dst, engine="siff")
    assert set(tree.groups) == set(groups) >= {"/", "/photons", "/ome/0", "/ome/1"}
    xr.testing.assert_identical(tree["/"].to_dataset().load(), want)
    level0 = zs.to_ome_order(want.intensity.values)
    np.testing.assert_array_equal(tree["/ome/0"].intensity.values, level0)
    np.testing.assert_array_equal(groups["/ome/1"].intensity.values, zs.downsample2(level0))
    assert int(tree["/photons"].photon_count.sum()) == len(t.arrival)
    tree.close()
    with pytest.raises(TypeError, match=r"e\.zarr: is a converted store; index_cache, "
                       r"tau_bins apply to \.siff files only"):
        xr.open_dataset(dst, engine="siff", tau_bins=64, index_cache=False)
    with xr.open_dataset(t.path, engine="siff") as ds:  # files as before
        assert ds.sizes["time"] == 4


def test_a_store_opens_as_a_datatree_with_photons_and_ome_levels(tmp_path):
    t = write_siff(tmp_path / "tree.siff", shape=(70, 66), channels=(1, 2), n_slices=2,
                   n_timepoints=3, photons_per_frame=3000, seed=6)
    dst = tmp_path / "tree.zarr"
    zs.convert(t.path, dst)
    with pytest.raises(ValueError, match=r"conflicting sizes|not aligned|align"):
        xr.open_datatree(dst, engine="zarr")  # plain xarray: the OME levels clash
    tree = zs.open_converted_tree(dst, chunks={})
    assert set(tree.groups) >= {"/", "/photons", "/ome", "/ome/0", "/ome/1"}
    with zs.open_converted(dst) as ds:
        xr.testing.assert_identical(tree["/"].to_dataset().load(), ds.load())
        level0 = zs.to_ome_order(ds.intensity.values)
    np.testing.assert_array_equal(tree["/ome/0"].intensity.values, level0)
    np.testing.assert_array_equal(tree["/ome/1"].intensity.values, zs.downsample2(level0))
    assert tree["/ome/1"].intensity.dims == ("t", "c", "z", "y_1", "x_1")
    assert tree["/ome"].attrs["ome"]["multiscales"][0]["axes"][3]["name"] == "y"
    counts = tree["/photons"].photon_count.values
    assert counts.sum() == len(t.arrival)
    _, tau = zs.read_photons(dst, 4)
    start = int(tree["/photons"].photon_start.values[4])
    np.testing.assert_array_equal(
        tree["/photons"].arrival_time.values[start:start + counts[4]], tau)
    tree.close()


def test_verify_reports_batches_in_frame_order_and_stops_after_50(tmp_path):
    """Batches are compared two at a time; what they find comes out in frame order."""
    import zarr

    t = write_siff(tmp_path / "many.siff", shape=(8, 8), n_timepoints=80, photons_per_frame=60,
                   seed=5)
    dst = tmp_path / "many.zarr"
    zs.convert(t.path, dst)
    arr = zarr.open_array(str(dst), path="photons/arrival_time", mode="r+")
    arr[:] = arr[:] + 1  # every frame's arrival times change; checksums stay valid
    problems = zs.verify(t.path, dst, batch_frames=1)  # one frame per batch
    # each batch finds two (arrival times, and the histogram made from them)
    assert 51 <= len(problems) <= 53 and problems[-1] == "... (stopped after 50 differences)"
    frames = [int(p.rsplit("frame ", 1)[1].rstrip(")")) for p in problems
              if p.startswith("arrival times differ")]
    assert frames == list(range(len(frames))) and len(frames) >= 25, problems


@pytest.mark.parametrize("where", ["first", "last"])
def test_verify_checks_derived_variables_on_the_intensity_it_read_for_the_photons(
        siff_files, tmp_path, monkeypatch, where):
    """The count images' timepoints serve the photon_count/OME checks: read once, all covered.

    On a file with a partial last volume, kept by verify, and batches that end
    inside timepoints.
    """
    import zarr

    from siff_xarray.store import verifier

    t = siff_files["partial_volume"]
    dst = tmp_path / "pv.zarr"
    zs.convert(t.path, dst, **_small_shards(t))
    reads = []
    real = verifier.checked

    def checked(fn, store, what):
        reads.append(what)
        return real(fn, store, what)

    monkeypatch.setattr(verifier, "checked", checked)
    spans = []  # timepoints whose derived values were checked, per call
    real_block = verifier._derived_block

    def derived_block(ds, levels, block, t0, where):
        spans.append((t0, t0 + block.shape[0]))
        return real_block(ds, levels, block, t0, where)

    monkeypatch.setattr(verifier, "_derived_block", derived_block)
    assert zs.verify(t.path, dst, batch_frames=3) == []
    assert "intensity" not in reads and "ome/0" in reads  # no second read of the intensity
    # batches of 3 frames end inside timepoints: each timepoint is checked exactly once
    with zs.open_converted(dst, partial_volume="keep") as z:
        n_t = z.sizes["time"]
    assert sorted(t for a, b in spans for t in range(a, b)) == list(range(n_t)), spans
    arr = zarr.open_array(str(dst), path="photon_count", mode="r+")
    k = 0 if where == "first" else arr.shape[0] - 1
    values = arr[k]
    values.flat[-1] += 1
    arr[k] = values
    problems = zs.verify(t.path, dst, batch_frames=3)
    assert len(problems) == 1 and problems[0].startswith("photon_count differs"), problems
    first = int(problems[0].rsplit("time index ", 1)[1].rstrip(")"))
    assert first <= k and (where == "first" or first >= k - 1), problems


def test_verify_checks_derived_variables_of_timepoints_no_batch_read(siff_files, tmp_path,
                                                                     monkeypatch):
    """Timepoints that no batch's count images covered are read and checked at the end."""
    import zarr

    from siff_xarray.store import verifier

    t = siff_files["two_chan_slices_flyback"]
    dst = tmp_path / "d.zarr"
    zs.convert(t.path, dst, **_small_shards(t))
    real = verifier.count_images
    monkeypatch.setattr(verifier, "count_images",  # as if no batch kept its timepoints
                        lambda *a, keep=None, **k: real(*a, **k))
    assert zs.verify(t.path, dst) == []
    arr = zarr.open_array(str(dst), path="photon_count", mode="r+")
    values = arr[1]
    values.flat[0] += 1
    arr[1] = values
    problems = zs.verify(t.path, dst)
    assert len(problems) == 1 and problems[0].startswith("photon_count differs"), problems


def test_conversion_fetches_sub_batches_ahead(tmp_path, monkeypatch):
    """While a sub-batch decodes, the next ones of its batch have been asked for."""
    from siff_xarray.reader.acquisition import Acquisition
    from siff_xarray.reader.source import PARTS_AHEAD
    from siff_xarray.store import converter as conv

    t = write_siff(tmp_path / "s.siff", shape=(16, 16), n_timepoints=40,
                   photons_per_frame=300, seed=2)
    monkeypatch.setattr(conv, "SUB_BATCH_BYTES", 2000)  # a few frames each
    events = []  # what the converter asks of its source, in order
    real_prefetch, real_decode = Acquisition.prefetch, Acquisition.decode_into
    monkeypatch.setattr(Acquisition, "prefetch", lambda self, fr: (
        events.append(("ahead", int(fr[0]))), real_prefetch(self, fr))[1])
    monkeypatch.setattr(Acquisition, "decode_into", lambda self, fr, *a: (
        events.append(("decode", int(fr[0]))), real_decode(self, fr, *a))[1])
    zs.convert(t.path, tmp_path / "s.zarr", scheduler="sync")
    monkeypatch.setattr(Acquisition, "prefetch", real_prefetch)
    monkeypatch.setattr(Acquisition, "decode_into", real_decode)
    decoded = [fr for what, fr in events if what == "decode"]
    assert len(decoded) >= 6 and sorted(fr for w, fr in events if w == "ahead") == decoded
    ahead = [sum(1 for w, g in events[:k] if w == "ahead" and g > fr)
             for k, (what, fr) in enumerate(events) if what == "decode"]
    k = PARTS_AHEAD  # a local file: the parts of any long read
    assert k == 4
    assert ahead[:-k] == [k] * (len(decoded) - k) and ahead[-k:] == list(range(k))[::-1], \
        ahead
    assert zs.verify(t.path, tmp_path / "s.zarr") == []


def test_the_sidecar_is_written_while_the_plan_is_made(tmp_path, monkeypatch):
    """On object storage the sidecar's upload waits a round trip and its transfer:
    the conversion's start writes it beside the plan's template, not before it (an
    upload that waits for the template to be made must not hold the start up)."""
    import threading

    from siff_xarray import SiffFile
    from siff_xarray.store import converter as conv
    from siff_xarray.synthetic import write_siff

    t = write_siff(tmp_path / "w.siff", shape=(8, 8), channels=(1, 2), n_slices=2,
                   n_timepoints=3, seed=4)
    made, seen = threading.Event(), []
    real_write, real_ome = SiffFile.write_sidecar, conv.create_ome

    def waiting_write(self):  # an upload that finishes only once the template is made
        seen.append(made.wait(10))
        return real_write(self)

    def ome(*args, **kwargs):
        made.set()
        return real_ome(*args, **kwargs)

    monkeypatch.setattr(SiffFile, "write_sidecar", waiting_write)
    monkeypatch.setattr(conv, "create_ome", ome)
    zs.convert(t.path, tmp_path / "w.zarr")
    assert seen == [True] and os.path.isfile(str(t.path) + ".siffidx")
    assert zs.verify(t.path, tmp_path / "w.zarr") == []


def test_a_conversion_to_s3_waits_few_round_trips_per_batch(s3_server, s3_latency, tmp_path):
    """Every request to an object store waits a round trip: a conversion to S3 must not
    chain them. Before, a batch reopened each array (its metadata, and zarr's look for
    Zarr v2 keys), wrote its arrays one after another with a bucket check before each
    key, and the start checked the bucket once per directory (56 HEADs in a row for a
    store of this layout); the end read the OME image one timepoint at a time."""
    import s3fs

    proxy, opts = s3_latency
    s3fs.S3FileSystem(**s3_server).mkdir("rt-bucket")
    t = write_siff(tmp_path / "rt.siff", shape=(32, 16), channels=(1, 2), n_slices=2,
                   n_flyback=1, n_timepoints=16, photons_per_frame=500, seed=4)
    dst = "s3://rt-bucket/run.zarr"
    proxy.latency = 0.05
    at, n0 = len(proxy.arrivals), len(proxy.log)
    summary = zs.convert(t.path, dst, target_options=opts, scheduler="sync", **_small_shards(t))
    rounds, log = proxy.round_trips(at), proxy.log[n0:]
    proxy.latency = 0.0
    n = summary.batches
    print(f"{n} batches: {len(log)} requests in {rounds} round trips")
    assert n == 8
    assert zs.verify(t.path, dst, target_options=opts) == []
    assert ("HEAD", "/rt-bucket") not in log  # no "directories" on an object store
    # the root consolidates every node's metadata as stored
    fs = s3fs.S3FileSystem(**s3_server)
    nodes = json.loads(fs.cat("rt-bucket/run.zarr/zarr.json"))["consolidated_metadata"]
    for key, node in nodes["metadata"].items():
        stored = json.loads(fs.cat(f"rt-bucket/run.zarr/{key}/zarr.json"))
        if stored.get("node_type") == "group":
            stored["consolidated_metadata"] = node["consolidated_metadata"]
        assert stored == node, key
    assert {"ome", "ome/0", "photons", "intensity"} <= set(nodes["metadata"])
    assert not fs.exists("rt-bucket/run.zarr/.siff-progress")
    # the batches' arrays open from the metadata the layout built: none is read back
    # (each was read once; before that, by every batch)
    for name in ("intensity", "histogram", "photons/flyback_intensity", "photon_count",
                 "ome/0"):
        assert sum(1 for m, p in log if m == "GET"
                   and p == f"/rt-bucket/run.zarr/{name}/zarr.json") == 0, name
    # 446 round trips (732 requests) at first, 104 (247) before the start listed the
    # root once, the finish overlapped its steps and a batch its photons' writes
    assert rounds <= 24 + 6 * n, rounds


@pytest.mark.parametrize("scheduler", ["sync", "threads"])
def test_every_array_a_batch_writes_is_opened_while_the_first_batch_decodes(
        s3_server, tmp_path, monkeypatch, scheduler):
    """On object storage each open of an array reads its metadata (a round trip). The
    histogram and the flyback rows were opened by the batches as they wrote them, in
    their write phase (and by each thread that came to one first); now every array a
    batch writes opens with the plan, behind the first batch's decoding, before any
    batch writes."""
    import s3fs

    from siff_xarray.store import converter as conv

    s3fs.S3FileSystem(**s3_server).mkdir(f"open-{scheduler}")
    t = write_siff(tmp_path / "o.siff", shape=(32, 16), channels=(1, 2), n_slices=2,
                   n_flyback=1, n_timepoints=16, photons_per_frame=500, seed=5)
    events = []
    real_open, real_write = conv._open_for_batch, conv.write_along
    monkeypatch.setattr(conv, "_open_for_batch",
                        lambda store, path: events.append(path) or real_open(store, path))
    monkeypatch.setattr(conv, "write_along", lambda *a: (
        events.append("written"), real_write(*a))[1])
    dst = f"s3://open-{scheduler}/run.zarr"
    zs.convert(t.path, dst, target_options=s3_server, scheduler=scheduler,
               **_small_shards(t))
    first = events.index("written")
    for name in ("histogram", "photons/flyback_intensity", "intensity",
                 "photons/arrival_time", "photon_count", "ome/0"):
        assert events.count(name) == 1 and events.index(name) < first, (name, events)
    assert zs.verify(t.path, dst, target_options=s3_server) == []


def test_the_process_that_lays_out_an_s3_store_reads_none_of_its_metadata_back(
        s3_server, s3_latency, tmp_path):
    """The batches' arrays open from the metadata the layout built (each open read its
    zarr.json back, a round trip, after the layout had stored them all): a conversion
    in one process sends no GET of any zarr.json. The known metadata stay in the
    process (not pickled), and only metadata can be known."""
    import s3fs

    from siff_xarray.store.layout import Target

    proxy, opts = s3_latency
    s3fs.S3FileSystem(**s3_server).mkdir("known-meta")
    t = write_siff(tmp_path / "k.siff", shape=(32, 16), channels=(1, 2), n_slices=2,
                   n_flyback=1, n_timepoints=16, photons_per_frame=500, seed=6)
    dst = "s3://known-meta/run.zarr"
    n0 = len(proxy.log)
    zs.convert(t.path, dst, target_options=opts, **_small_shards(t))
    log = proxy.log[n0:]
    assert [p for m, p in log if m == "PUT" and p.endswith("/intensity/zarr.json")]
    assert [p for m, p in log if m == "GET" and p.endswith("zarr.json")] == []
    assert zs.verify(t.path, dst, target_options=s3_server) == []
    store = Target(dst, opts).zarr(batch_writes=True)
    store.know({"intensity/zarr.json": b"{}"})
    assert "known" in store.__dict__ and "known" not in store.__getstate__()
    with pytest.raises(ValueError, match="metadata"):
        store.know({"intensity/c/0/0/0": b""})


def test_an_s3_conversions_finish_reads_its_nodes_while_it_sets_the_windows(
        s3_server, s3_latency, tmp_path, monkeypatch):
    """The finish's steps before the root is published: the frame descriptions, the
    root's metadata, and the other nodes' (the start's record of them, and the OME
    contrast windows from the batches' tallies, then ome's metadata written), all at
    once. What this process stored for the run (the start's metadata, each batch's
    descriptions and tallies) is not read back: 1 round trip, with the listing of
    the batches' records and the ownership check. A batch converted elsewhere (here:
    one this process did not note) is read. The finish took 2 round trips when it
    read everything, the windows 5 when they waited for the nodes' record, then 4
    more to read level 0's sample back from the store."""
    import s3fs
    from conftest import _chain

    from siff_xarray.store import converter as conv

    proxy, opts = s3_latency
    s3fs.S3FileSystem(**s3_server).mkdir("fin-bucket")
    t = write_siff(tmp_path / "fin.siff", shape=(32, 16), channels=(1, 2), n_slices=2,
                   n_flyback=1, n_timepoints=8, photons_per_frame=500, seed=4)
    marks = {}
    real_finish = conv._finish

    def finish(target, run_id, plan):
        marks["finish"] = len(proxy.arrivals), len(proxy.log)
        return real_finish(target, run_id, plan)

    monkeypatch.setattr(conv, "_finish", finish)
    monkeypatch.setattr(conv, "_phase", lambda name: marks.setdefault(
        name, (len(proxy.arrivals), len(proxy.log))))
    proxy.latency = 0.1  # (long enough that CPU between two requests never splits a round)
    dst = "s3://fin-bucket/run.zarr"
    zs.convert(t.path, dst, target_options=opts, scheduler="sync", **_small_shards(t))
    proxy.latency = 0.0
    (a0, l0), (a1, l1) = marks["finish"], marks["finishing"]
    assert _chain(proxy.spans[a0:a1]) == 1
    finish = proxy.log[l0:l1]
    assert not [p for _, p in finish if "/ome/0/" in p]  # no image data read
    assert [m for m, p in finish if "/.siff-progress/" in p and "list-type" not in p] == [
        "GET"]  # (the owner's record: nothing the start or the batches stored is read)
    assert zs.verify(t.path, dst, target_options=opts) == []
    # a batch this process did not note (as one converted by another process) is read
    real_keep = conv._keep
    monkeypatch.setattr(conv, "_keep", lambda run_id, b, *a: b == 1 or real_keep(run_id, b, *a))
    marks.clear()
    dst = "s3://fin-bucket/mixed.zarr"
    zs.convert(t.path, dst, target_options=opts, scheduler="sync", **_small_shards(t))
    (a0, l0), (a1, l1) = marks["finish"], marks["finishing"]
    read = sorted(p.rsplit("/", 1)[1] for m, p in proxy.log[l0:l1]
                  if m == "GET" and "/.siff-progress/" in p and "list-type" not in p)
    assert read == ["description-000001", "owner.json", "window-000001.json"]
    assert zs.verify(t.path, dst, target_options=opts) == []
    # the windows are in ome's metadata, and the root consolidates them as written
    fs = s3fs.S3FileSystem(**s3_server)
    ome = json.loads(fs.cat("fin-bucket/run.zarr/ome/zarr.json"))["attributes"]["ome"]
    root = json.loads(fs.cat("fin-bucket/run.zarr/zarr.json"))
    assert all("window" in ch for ch in ome["omero"]["channels"])
    assert root["consolidated_metadata"]["metadata"]["ome"]["attributes"]["ome"] == ome


@pytest.mark.parametrize("scheduler", ["sync", "threads"])
def test_an_s3_store_is_laid_out_while_the_first_batches_decode(
        s3_server, s3_latency, tmp_path, monkeypatch, scheduler):
    """To object storage, with the batches in this process, the start returns its plan
    once the store is claimed and leaves the ownership check, the metadata and the
    plan's record (three round trips) to a thread while the first batches decode;
    no batch writes anything before the plan is recorded."""
    import s3fs

    from siff_xarray.store import converter as conv

    proxy, opts = s3_latency
    s3fs.S3FileSystem(**s3_server).makedirs("lay-bucket", exist_ok=True)
    t = write_siff(tmp_path / "lay.siff", shape=(32, 16), channels=(1, 2), n_slices=2,
                   n_timepoints=6, photons_per_frame=500, seed=10)
    decoding = []
    real_decode = conv._decode_batch

    def decode(*a, **k):
        decoding.append(len(proxy.log))
        return real_decode(*a, **k)

    monkeypatch.setattr(conv, "_decode_batch", decode)
    proxy.latency = 0.05
    dst = f"s3://lay-bucket/{scheduler}.zarr"
    zs.convert(t.path, dst, target_options=opts, scheduler=scheduler, num_workers=2,
               **_small_shards(t))
    proxy.latency = 0.0
    puts = [p for m, p in proxy.log if m == "PUT"]
    plan_at = next(i for i, (m, p) in enumerate(proxy.log)
                   if m == "PUT" and p.endswith("/.siff-progress/plan.json"))
    assert decoding[0] < plan_at  # the first batch decoded while the plan went
    data = [i for i, (m, p) in enumerate(proxy.log) if m == "PUT" and (
        "/intensity/c/" in p or "/photons/arrival_time/c/" in p
        or "/.siff-progress/batch-" in p)]
    assert data and min(data) > plan_at, puts[:20]
    assert zs.verify(t.path, dst, target_options=opts) == [] and conv._layouts == {}


def test_a_store_laid_out_behind_the_batches_reports_its_own_error(
        s3_server, tmp_path, monkeypatch):
    """An error while the metadata are written behind the first batches is the
    conversion's error; no batch wrote anything, and resume finishes the store."""
    import s3fs

    from siff_xarray.store import converter as conv
    from siff_xarray.store.layout import Target

    fs = s3fs.S3FileSystem(**s3_server)
    fs.mkdir("lay-fail")
    t = write_siff(tmp_path / "lf.siff", shape=(32, 16), channels=(1, 2), n_slices=2,
                   n_timepoints=6, photons_per_frame=500, seed=11)
    real_pipe = Target.write_text

    def refuse_plan(self, key, text, *a, **k):
        if key.endswith("plan.json"):
            raise PermissionError(f"{self.destination}: AccessDenied (a bucket policy)")
        return real_pipe(self, key, text, *a, **k)

    monkeypatch.setattr(Target, "write_text", refuse_plan)
    dst = "s3://lay-fail/run.zarr"
    with pytest.raises(PermissionError, match="AccessDenied"):
        zs.convert(t.path, dst, target_options=s3_server, scheduler="threads",
                   **_small_shards(t))
    monkeypatch.undo()
    fs.invalidate_cache()
    written = fs.find("lay-fail/run.zarr")
    assert not [k for k in written if "/c/" in k and ("intensity" in k or "arrival" in k)]
    assert not [k for k in written if "/.siff-progress/batch-" in k], written
    assert conv._layouts == {} and conv._runs == {}
    zs.convert(t.path, dst, target_options=s3_server, resume=True)
    assert zs.verify(t.path, dst, target_options=s3_server) == []


def test_an_s3_conversions_summary_lists_the_store_while_its_progress_records_go(
        s3_server, s3_latency, tmp_path, monkeypatch):
    """After the root is published, the progress records are removed while the store
    is listed for the summary's size (the records left out), and the photons' node
    comes from the metadata just published: the summary's bytes are the store's."""
    import s3fs
    from conftest import _chain

    from siff_xarray.store import converter as conv

    proxy, opts = s3_latency
    fs = s3fs.S3FileSystem(**s3_server)
    fs.mkdir("summary-bucket")
    t = write_siff(tmp_path / "sum.siff", shape=(32, 16), channels=(1, 2), n_slices=2,
                   n_timepoints=6, photons_per_frame=500, seed=9)
    marks = {}
    monkeypatch.setattr(conv, "_phase", lambda name: marks.setdefault(
        name, (len(proxy.arrivals), len(proxy.log))))
    proxy.latency = 0.1
    summary = zs.convert(t.path, "s3://summary-bucket/run.zarr", target_options=opts,
                         scheduler="sync", **_small_shards(t))
    proxy.latency = 0.0
    a, n = marks["published"]
    after = proxy.log[n:]
    assert not [p for m, p in after if m == "GET" and p.endswith("photons/zarr.json")], after
    assert _chain(proxy.spans[a:]) <= 2, after
    fs.invalidate_cache()
    assert summary.store_bytes == fs.du("summary-bucket/run.zarr") > 0
    assert not fs.exists("summary-bucket/run.zarr/.siff-progress")
    assert summary.source_bytes == os.path.getsize(t.path)


@pytest.mark.parametrize("case", ["batches", "repeats", "signed", "old_plan", "lost_tally"])
def test_the_contrast_windows_are_the_stored_sample_s_whoever_tallies_them(tmp_path, case,
                                                                          monkeypatch):
    """The batches tally the timepoints the windows are taken from (window_rows) as
    they write them, and the finish reads the windows off the tallies: the same
    windows as from level 0's sample read back (set_rendering), across batches, with
    repeats folded into t, a partial last volume left out and signed samples. A plan
    of an earlier version (no tallies) or a missing tally (one this process did not
    keep) reads the sample instead."""
    import zarr

    from siff_xarray.store import converter as conv
    from siff_xarray.store.ome import window_rows, windows

    kw = {"repeats": {"frames_per_slice": 2},
          "signed": {"format": "tiff", "tiff_signed": True}}.get(case, {})
    t = write_siff(tmp_path / "w.siff", shape=(16, 8), channels=(1, 2), n_slices=2,
                   n_timepoints=9, extra_frames=3 if case != "repeats" else 0,
                   photons_per_frame=300, channel_brightness=(1.0, 0.1), seed=5, **kw)
    if case == "old_plan":
        real_plan = conv._plan
        monkeypatch.setattr(conv, "_plan", lambda *a, **k: dataclasses.replace(
            real_plan(*a, **k), window_rows=None))
    if case == "lost_tally":
        real_finish = conv._finish

        def finish(target, run_id, plan):
            b = next(b for b, rows in enumerate(plan.window_rows) if rows)
            target.fs.rm(target.key(conv._window_key(b)))
            conv._kept[run_id].windows.pop(b)  # (as a tally another process stored)
            return real_finish(target, run_id, plan)

        monkeypatch.setattr(conv, "_finish", finish)
    used = []
    real_set = conv.set_rendering
    monkeypatch.setattr(conv, "set_rendering", lambda store: used.append(1) or real_set(store))
    dst = tmp_path / "w.zarr"
    zs.convert(t.path, dst, **_small_shards(t))
    assert bool(used) == (case in ("old_plan", "lost_tally"))
    level0 = zarr.open_array(dst, path="ome/0", mode="r")
    assert level0.shape[0] > 2 * level0.shards[0]  # (several batches)
    rows = window_rows(level0.shape[0], level0.chunks[0])
    expected = windows(np.asarray(level0[:])[rows])
    ome = json.loads((dst / "ome" / "zarr.json").read_text())["attributes"]["ome"]
    assert [ch["window"] for ch in ome["omero"]["channels"]] == expected
    root = json.loads((dst / "zarr.json").read_text())
    assert root["consolidated_metadata"]["metadata"]["ome"]["attributes"]["ome"] == ome
    assert expected[1]["end"] < expected[0]["end"]  # each channel its own
    assert not (dst / ".siff-progress").exists()
    assert zs.verify(t.path, dst) == []


def test_s3_bodies_go_checksummed_and_unsigned_unless_asked(s3_server, s3_latency, tmp_path):
    """Over http botocore hashed every body into the signature (SHA-256) on top of its
    CRC32 checksum, both on the event loop all writes go through. The conversion's
    shards now go as presigned PUTs from the batches' threads, each URL carrying the
    body's CRC32C (which S3 checks) and no credentials; its other writes go through
    s3fs as over https: a CRC32 of each body and no SHA-256. A caller who asks for
    signed bodies, or sets what a presigned PUT would not send (server-side
    encryption), gets every write through s3fs as asked."""
    import base64
    import re
    from urllib.parse import parse_qs, urlsplit

    import s3fs

    proxy, opts = s3_latency
    s3fs.S3FileSystem(**s3_server).mkdir("sum-bucket")
    t = write_siff(tmp_path / "sum.siff", shape=(32, 16), channels=(1, 2), n_slices=2,
                   n_flyback=1, n_timepoints=4, photons_per_frame=500, seed=5)
    signed = {"config_kwargs": {"s3": {"payload_signing_enabled": True}}}
    sse = {"s3_additional_kwargs": {"ServerSideEncryption": "AES256"}}
    for name, extra in (("unsigned", {}), ("signed", signed), ("encrypted", sse)):
        dst = f"s3://sum-bucket/{name}.zarr"
        proxy.puts.clear()
        zs.convert(t.path, dst, target_options={**opts, **extra}, scheduler="sync")
        assert zs.verify(t.path, dst, target_options=opts) == []
        puts = [p for p in proxy.puts if "x-amz-copy-source" not in p[0]]
        assert len(puts) > 20
        presigned = [p for p in puts if "Signature=" in p[3]]
        through_s3fs = [p for p in puts if "Signature=" not in p[3]]
        shards = [p for p in puts if "/c/" in urlsplit(p[3]).path]
        assert len(shards) > 10
        if name == "unsigned":  # every write presigned, with its body's CRC32C
            print(sorted(urlsplit(p[3]).path for p in puts if p not in presigned))
            assert through_s3fs == []
        else:
            assert presigned == []
        for headers, _, crc32c, path in presigned:
            assert "authorization" not in headers
            query = parse_qs(urlsplit(path).query)
            assert int.from_bytes(base64.b64decode(query["x-amz-checksum-crc32c"][0]),
                                  "big") == crc32c
        for headers, crc, _, _ in through_s3fs:
            assert int.from_bytes(base64.b64decode(headers["x-amz-checksum-crc32"]),
                                  "big") == crc
            hashed = headers["x-amz-content-sha256"]
            if name == "signed":
                assert re.fullmatch("[0-9a-f]{64}", hashed)
            else:
                assert hashed == "UNSIGNED-PAYLOAD"
            if name == "encrypted":
                assert headers["x-amz-server-side-encryption"] == "AES256"


def test_presigned_shard_puts_are_retried_when_busy_and_left_to_s3fs_when_refused(
        s3_server, s3_latency, tmp_path):
    """A busy S3 (503 SlowDown) gets a presigned PUT again after a pause; one that
    refuses the signature (403) has that shard and the rest of the store's written
    through s3fs, after one refused attempt. Both stores verify."""
    import s3fs

    proxy, opts = s3_latency
    s3fs.S3FileSystem(**s3_server).mkdir("busy-bucket")
    t = write_siff(tmp_path / "busy.siff", shape=(32, 16), channels=(1, 2), n_slices=2,
                   n_flyback=1, n_timepoints=4, photons_per_frame=500, seed=7)
    def presigned_puts(name: str) -> collections.Counter:
        proxy.puts.clear()
        dst = f"s3://busy-bucket/{name}.zarr"
        zs.convert(t.path, dst, target_options=opts, scheduler="sync")
        assert zs.verify(t.path, dst, target_options=opts) == []
        return collections.Counter(p[3].split("?")[0].replace(f"/{name}.", "/*.")
                                   for p in proxy.puts if "Signature=" in p[3])

    calm = presigned_puts("calm")
    assert calm.total() > 10
    proxy.busy_puts = 2
    busy = presigned_puts("busy")
    assert proxy.busy_puts == 0
    assert busy.total() - calm.total() == 2 and set(busy) == set(calm)
    proxy.puts.clear()
    proxy.refuse_signed = True
    try:
        zs.convert(t.path, "s3://busy-bucket/refused.zarr", target_options=opts,
                   scheduler="sync")
    finally:
        proxy.refuse_signed = False
    assert zs.verify(t.path, "s3://busy-bucket/refused.zarr", target_options=opts) == []
    assert len([p for p in proxy.puts if "Signature=" in p[3]]) == 1
    assert len([p for p in proxy.puts if "/c/" in p[3] and "Signature=" not in p[3]]) > 10


def test_a_batch_store_reads_a_key_once_its_write_behind_is_stored(s3_server, s3_latency):
    """The store a conversion's batches write through sends its PUTs behind the
    writer: ``put_whole`` returns with the PUT on its way, and a read of that key
    waits for it (here a busy S3 makes the PUT wait for its retries) instead of
    finding nothing."""
    import s3fs
    from zarr.buffer import default_buffer_prototype

    from siff_xarray.store.layout import Target
    from siff_xarray.store.shards import zarr_sync

    proxy, opts = s3_latency
    s3fs.S3FileSystem(**s3_server).mkdir("behind-bucket")
    store = Target("s3://behind-bucket/run.zarr", opts).zarr(batch_writes=True)
    store.write_behind()
    proxy.busy_puts = 2  # (two 503s: the PUT is sent three times, with pauses)
    assert store.put_whole("photons/arrival_time/c/0", b"shard bytes")
    pending = store.writes_behind()
    assert len(pending) == 1 and not pending[0].done()
    got = zarr_sync()(store.get("photons/arrival_time/c/0", default_buffer_prototype()))
    assert got is not None and got.to_bytes() == b"shard bytes"
    assert proxy.busy_puts == 0 and pending[0].done() and store.writes_behind() == []
    store.settle()


def test_s3_bodies_reach_aiohttp_as_the_bytes_they_are(s3_server, tmp_path, monkeypatch):
    """botocore wraps a bytes body into a BytesIO, which aiohttp copies whole and
    then sends 64 KiB at a time, yielding to the event loop all of zarr's writes
    share after each. Every PUT of a conversion, and
    the parts of a multipart upload, reach aiohttp as bytes, and arrive whole."""
    import io

    import aiobotocore.httpsession

    from siff_xarray._remote import filesystem

    bodies = []
    real = aiobotocore.httpsession.AIOHTTPSession.send

    async def send(self, request):
        if request.method == "PUT" and "x-amz-copy-source" not in request.headers:
            bodies.append(request.body)  # (not the server-side copies: no body)
        return await real(self, request)

    monkeypatch.setattr(aiobotocore.httpsession.AIOHTTPSession, "send", send)
    opts = {**s3_server, "config_kwargs": {"user_agent_extra": f"bytes-{tmp_path.name}"}}
    filesystem("s3://bytes-bucket", opts)[0].mkdir("bytes-bucket")
    bodies.clear()  # (the bucket's PUT has none)
    t = write_siff(tmp_path / "bytes.siff", shape=(32, 16), channels=(1, 2), n_slices=2,
                   n_flyback=1, n_timepoints=4, photons_per_frame=500, seed=6)
    zs.convert(t.path, "s3://bytes-bucket/run.zarr", target_options=opts, scheduler="threads",
               num_workers=2)
    assert zs.verify(t.path, "s3://bytes-bucket/run.zarr", target_options=opts) == []
    assert len(bodies) > 20
    assert all(isinstance(b, bytes) for b in bodies), {type(b) for b in bodies}
    bodies.clear()
    fs = filesystem("s3://bytes-bucket", opts)[0]
    data = np.random.default_rng(1).bytes(11 * 2**20)
    fs.pipe_file("bytes-bucket/parts.bin", data, chunksize=5 * 2**20)  # (3 parts)
    assert fs.cat("bytes-bucket/parts.bin") == data
    assert len(bodies) == 3 and all(isinstance(b, bytes) for b in bodies)
    # a file object the caller gives, not at its start, is left to botocore as it is
    bodies.clear()
    given = io.BytesIO(b"skip-this:payload")
    given.seek(10)
    fs.call_s3("put_object", Bucket="bytes-bucket", Key="given.bin", Body=given)
    assert fs.cat("bytes-bucket/given.bin") == b"payload" and bodies[0] is not None


def test_a_conversions_store_sends_more_than_ten_writes_at_once(s3_server, s3_latency):
    """botocore lets a client send 10 requests at once, and a process's zarr stores
    share one client: the ends of two batches (more than ten writes between them)
    waited a round trip for each ten. The conversion's store takes 30 at once; a
    caller's own setting still wins."""
    import asyncio

    import s3fs
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    from siff_xarray.store.layout import _zarr_store

    proxy, opts = s3_latency
    s3fs.S3FileSystem(**s3_server).mkdir("pool-bucket")
    data = default_buffer_prototype().buffer.from_bytes(b"x" * 1000)

    def at_once(dst: str, options: dict) -> int:
        """The most of 30 writes the server answered at once."""
        store = _zarr_store(dst, options, batch_writes=True)
        proxy.latency = 0.05
        at = len(proxy.arrivals)
        proxy.most_inflight = 0

        async def write_all() -> None:
            await asyncio.gather(*[store.set(f"k{i}", data) for i in range(30)])

        sync(write_all())
        proxy.latency = 0.0
        assert len(proxy.arrivals) - at == 30
        return proxy.most_inflight

    # (counted at the server, not as rounds of arrivals: under load a client's
    # requests spread out, and waves of ten ran into each other)
    assert at_once("s3://pool-bucket/a", opts) > 10
    ten = {**opts, "config_kwargs": {"max_pool_connections": 10}}
    assert at_once("s3://pool-bucket/b", ten) <= 10


def test_object_store_keys_read_and_exist_in_one_request_each(s3_server, s3_latency):
    """Target on S3: a text is one GET (an empty object too), existence one listing,
    a missing key FileNotFoundError, and nothing makes "directories"."""
    import s3fs

    from siff_xarray.store.layout import Target

    proxy, opts = s3_latency
    s3fs.S3FileSystem(**s3_server).mkdir("keys-bucket")
    t = Target("s3://keys-bucket/x.zarr", opts)
    assert t.object_store
    n0 = len(proxy.log)
    t.write_bytes("d/empty", b"")
    t.write_text("d/text", "hello", atomic=True)
    assert [m for m, _ in proxy.log[n0:]] == ["PUT", "PUT"]
    n0 = len(proxy.log)
    assert t.read_text("d/text") == "hello"
    assert len(proxy.log) - n0 == 1
    assert t.read_bytes("d/empty") == b""
    for key, there in (("d/text", True), ("d/none", False)):
        n0 = len(proxy.log)
        assert t.exists(key) is there
        assert len(proxy.log) - n0 == 1  # one listing (a HEAD of a missing key lists too)
    assert not t.exists("e/none")
    assert t.listed("d") == {"d/empty", "d/text"} and t.listed("nothing") == set()
    with pytest.raises(FileNotFoundError):
        t.read_text("d/none")
    n0 = len(proxy.log)  # a copy is one server-side request (s3fs's cp_file: a HEAD first)
    t.copy("d/text", "e/copied")
    assert [m for m, _ in proxy.log[n0:]] == ["PUT"]
    assert t.read_text("e/copied") == "hello"
    with pytest.raises(FileNotFoundError):
        t.copy("d/none", "e/never")
    assert not t.exists("e/never")


class _RecordingArray:
    """A 1-D array stand-in that records slice writes (optionally failing some)."""

    def __init__(self, size: int, fail_at: int | None = None) -> None:
        import threading

        self.data = np.zeros(size, dtype=np.uint16)
        self.writes: list[tuple[int, int, str]] = []
        self.fail_at = fail_at
        self.lock = threading.Lock()

    def __setitem__(self, key: slice, values: np.ndarray) -> None:
        import threading
        import time

        time.sleep(0.01)  # (a write takes a while: the next shard's values come meanwhile)
        if key.start == self.fail_at:
            raise OSError(f"write at {key.start} refused")
        with self.lock:
            self.data[key] = values
            self.writes.append((key.start, key.stop, threading.current_thread().name))


@pytest.mark.parametrize("behind", [False, True])
def test_shard_writer_writes_each_shard_once_in_order_and_raises_what_failed(behind, monkeypatch):
    """Photons stream into whole shards, each written once; written behind (object
    stores), the values are the same and a failed write is raised, not lost."""
    from siff_xarray.store import converter

    monkeypatch.setattr(converter, "PHOTON_SHARD", 100)
    rng = np.random.default_rng(0)
    values = rng.integers(0, 60000, 1234).astype(np.uint16)
    arr = _RecordingArray(2000)
    w = converter._ShardWriter(arr, 200, "uint16", behind=behind)
    for part in np.array_split(values, 37):
        w.append(part)
    w.close()
    np.testing.assert_array_equal(arr.data[200:1434], values)
    assert [(a, b) for a, b, _ in arr.writes] == [(200 + 100 * k, 300 + 100 * k)
                                                  for k in range(12)] + [(1400, 1434)]
    threads = {name for _, _, name in arr.writes}
    assert (threads == {"siff-xarray-shard"}) is behind
    arr = _RecordingArray(2000, fail_at=500)
    w = converter._ShardWriter(arr, 200, "uint16", behind=behind)
    with pytest.raises(OSError, match="write at 500 refused"):
        for part in np.array_split(values, 37):
            w.append(part)
        w.close()
    assert (500, 600) not in [(a, b) for a, b, _ in arr.writes]


def test_zarr_stores_opened_in_any_thread_share_one_filesystem(s3_server):
    """fsspec keeps a filesystem per thread, and each new one made its S3 client
    again on first use (0.2 s of CPU: a conversion's finish opened two stores in
    threads of their own). zarr runs every store operation on its own loop, so the
    stores of one process share one asynchronous filesystem per options."""
    import threading

    import s3fs

    from siff_xarray.store.layout import Target

    s3fs.S3FileSystem(**s3_server).mkdir("threads-bucket")
    t = Target("s3://threads-bucket/x.zarr", s3_server)
    seen = []

    def open_stores():
        seen.extend(id(t.zarr(batch_writes=bw).fs) for bw in (False, True))

    threads = [threading.Thread(target=open_stores) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    open_stores()
    assert len(seen) == 10 and len(set(seen)) == 1
    other = Target("s3://threads-bucket/x.zarr", {**s3_server, "anon": False})
    assert id(other.zarr().fs) not in seen  # other options: a filesystem of their own
    import zarr

    zarr.create_array(t.zarr(), name="a", shape=(4,), dtype="u1")[...] = 7
    got = []
    reader = threading.Thread(target=lambda: got.append(zarr.open_array(t.zarr(), path="a")[...]))
    reader.start()
    reader.join()
    np.testing.assert_array_equal(got[0], [7, 7, 7, 7])


def _s3_case(s3_server, tmp_path, bucket: str):
    """A new bucket and a file of 8 batches (two channels, flyback): ``(fs, file, dst)``."""
    import s3fs

    fs = s3fs.S3FileSystem(**s3_server)
    fs.mkdir(bucket)
    t = write_siff(tmp_path / "r.siff", shape=(32, 16), channels=(1, 2), n_slices=2,
                   n_flyback=1, n_timepoints=16, photons_per_frame=500, seed=6)
    return fs, t, f"s3://{bucket}/run.zarr"


def test_a_refused_write_on_s3_stops_the_conversion_and_resume_finishes_it(
        s3_server, s3_latency, tmp_path):
    """Arrival-time shards go to object storage behind the decoding: one the server
    refuses stops the conversion with that error (not lost with its thread, no
    hang); the store reads as unfinished, and resume, once writes are allowed again,
    finishes it to a store that verifies."""
    proxy, opts = s3_latency
    _, t, dst = _s3_case(s3_server, tmp_path, "refuse-bucket")
    proxy.refuse_puts = r"photons/arrival_time/c/"
    with pytest.raises(OSError, match=r"(?i)access denied|permission|forbidden") as err:
        zs.convert(t.path, dst, target_options=opts, **_small_shards(t))
    assert proxy.counts.get("PUT", 0) > 0
    with pytest.raises(IncompleteStoreError):
        zs.verify(t.path, dst, target_options=opts)
    proxy.refuse_puts = None
    summary = zs.convert(t.path, dst, target_options=opts, resume=True, **_small_shards(t))
    assert summary.batches >= 1
    assert zs.verify(t.path, dst, target_options=opts) == []
    # the message names the key refused (s3fs's names nothing: "Access Denied")
    assert "s3://refuse-bucket/run.zarr/photons/arrival_time/c/" in str(err.value)
    assert "refused the write" in str(err.value)
    proxy.refuse_puts = "."  # a bucket that takes no writes at all: its first key
    with pytest.raises(PermissionError, match=r"s3://refuse-bucket/other\.zarr/"
                       r"\.siff-progress/owner\.json: the store refused the write"):
        zs.convert(t.path, "s3://refuse-bucket/other.zarr", target_options=opts)
    proxy.refuse_puts = None


def test_a_write_behind_that_failed_before_its_batch_ended_still_fails_the_batch(
        s3_server, s3_latency, tmp_path, monkeypatch):
    """A batch's tail waited for the writes behind still on their way when it came to
    them: one that had already failed was no longer among them, and the batch was
    recorded done without its shard (a resume then skipped it: a store with a chunk
    missing, as a CI run met through a refused PUT). Every arrival-time PUT here
    fails at once: no batch is recorded, and resume finishes a store that verifies."""
    from siff_xarray.store import s3_puts

    _, opts = s3_latency
    fs, t, dst = _s3_case(s3_server, tmp_path, "failed-behind-bucket")
    real = s3_puts.DirectPuts.put

    def put(self, path, data):
        if "photons/arrival_time/c/" in path:
            raise PermissionError(f"{path}: refused at once")
        return real(self, path, data)

    monkeypatch.setattr(s3_puts.DirectPuts, "put", put)
    with pytest.raises(PermissionError, match="refused at once"):
        zs.convert(t.path, dst, target_options=opts, **_small_shards(t))
    monkeypatch.setattr(s3_puts.DirectPuts, "put", real)
    fs.invalidate_cache()
    assert [k for k in fs.find("failed-behind-bucket/run.zarr/.siff-progress")
            if "/batch-" in k] == []
    summary = zs.convert(t.path, dst, target_options=opts, resume=True, **_small_shards(t))
    assert summary.batches_skipped == 0
    assert zs.verify(t.path, dst, target_options=opts) == []


def test_a_run_that_failed_waits_for_its_other_batch_before_it_gives_the_store_up(
        s3_server, tmp_path, monkeypatch):
    """When one batch fails, dask's threads return the error while the other thread's
    batch goes on. A CI run met that batch's record written after the run had dropped
    its store (its failed PUTs unseen); its writes could also land after the run gave
    the store up, where a resume may already write. The run's end waits for it: it
    stops at its next sub-batch, records nothing, and every request it sent is
    answered before the release. Resume then converts it again."""
    import s3fs

    from siff_xarray.store import converter as conv

    monkeypatch.setattr(conv, "SUB_BATCH_BYTES", 3000)
    fs = s3fs.S3FileSystem(**s3_server)
    fs.mkdir("late-batch-bucket")
    t = write_siff(tmp_path / "l.siff", shape=(32, 16), channels=(1, 2), n_slices=2,
                   n_flyback=1, n_timepoints=16, photons_per_frame=500, seed=7)
    dst = "s3://late-batch-bucket/run.zarr"
    ended, second, batch_done = threading.Event(), threading.Event(), threading.Event()
    calls, late, at_release, lock = [], [], [], threading.Lock()
    real_decode, real_write, real_forget, real_release = (
        conv._decode_batch, conv._write_batch, conv._forget_sources, conv.owner.release)

    def decode(*args, **kwargs):
        with lock:
            calls.append(1)
            n = len(calls)
        if n == 1:  # (once the other thread's batch is decoding too)
            second.wait(20)
            raise RuntimeError("boom in the first batch")
        if n == 2:  # the other thread's batch: goes on a while after the run
            late.append(threading.get_ident())  # ended (the release came at once)
            second.set()
            assert ended.wait(20)
            time.sleep(1.0)
        return real_decode(*args, **kwargs)

    def write_batch(*args, **kwargs):
        try:
            return real_write(*args, **kwargs)
        finally:
            if threading.get_ident() in late:
                batch_done.set()

    def forget(run_id):
        ended.set()
        return real_forget(run_id)

    def release(*args, **kwargs):
        at_release.append((batch_done.is_set(), dict(getattr(conv, "_active", {}))))
        return real_release(*args, **kwargs)

    monkeypatch.setattr(conv, "_decode_batch", decode)
    monkeypatch.setattr(conv, "_write_batch", write_batch)
    monkeypatch.setattr(conv, "_forget_sources", forget)
    monkeypatch.setattr(conv.owner, "release", release)
    with pytest.raises(RuntimeError, match="boom in the first batch"):
        zs.convert(t.path, dst, target_options=s3_server, scheduler="threads",
                   num_workers=2, **_small_shards(t))
    assert len(calls) == 2 and at_release == [(True, {})], at_release
    assert conv._tails == {} and conv._runs == {}  # (nothing kept for the ended run)
    fs.invalidate_cache()
    assert [k for k in fs.find("late-batch-bucket/run.zarr/.siff-progress")
            if "/batch-" in k] == []
    monkeypatch.setattr(conv, "_decode_batch", real_decode)
    summary = zs.convert(t.path, dst, target_options=s3_server, resume=True,
                         **_small_shards(t))
    assert summary.batches_skipped == 0
    assert zs.verify(t.path, dst, target_options=s3_server) == []


def test_a_batch_that_fails_on_s3_leaves_no_write_behind_it(s3_server, s3_latency,
                                                           tmp_path, monkeypatch):
    """A batch's arrival-time shards go to S3 while it decodes on: when its decoding
    then fails, the conversion raises only once every PUT it sent was answered
    (none lands after the error, e.g. in a store another run now writes)."""
    import s3fs

    from siff_xarray.store import converter as conv

    monkeypatch.setattr(conv, "SUB_BATCH_BYTES", 3000)
    monkeypatch.setattr(conv, "PHOTON_SHARD", 1024)
    monkeypatch.setattr(conv, "PHOTON_CHUNK", 256)
    proxy, opts = s3_latency
    s3fs.S3FileSystem(**s3_server).mkdir("fail-behind-bucket")
    t = write_siff(tmp_path / "f.siff", shape=(32, 16), channels=(1, 2), n_slices=2,
                   n_flyback=1, n_timepoints=4, photons_per_frame=500, seed=9)
    calls, real = [], conv.Acquisition.decode_into

    def failing(self, *args):
        calls.append(1)
        if len(calls) == 6:  # (shards of this batch are on their way by now)
            raise SiffFormatError(str(t.path), "IFD claims 99999 entries")
        return real(self, *args)

    monkeypatch.setattr(conv.Acquisition, "decode_into", failing)
    dst = "s3://fail-behind-bucket/run.zarr"
    proxy.slow_puts, since = (r"/arrival_time/c/", 0.5), len(proxy.spans)
    try:
        with pytest.raises(SiffFormatError, match="99999"):
            zs.convert(t.path, dst, target_options=opts, scheduler="sync")
        raised = time.monotonic()
    finally:
        proxy.slow_puts = None
    with proxy.lock:
        spans, log = proxy.spans[since:], proxy.log[since:]
    assert any(m == "PUT" and "/arrival_time/c/" in p for m, p in log)
    assert all(end is not None and end <= raised for _, end in spans)
    with pytest.raises(IncompleteStoreError):
        zs.verify(t.path, dst, target_options=opts)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_batch_without_its_record_is_reported_and_the_store_left_for_resume(
        where, s3_server, tmp_path, monkeypatch):
    """The finish lists the progress records while it reads what it publishes: a batch
    whose record is missing (its worker died after its data) stops the conversion
    with an error naming it, before the root is published; resume converts that
    batch and publishes a store that verifies, with no progress record left."""
    from siff_xarray.store.layout import Target

    t = write_siff(tmp_path / "rec.siff", shape=(32, 16), channels=(1, 2), n_slices=2,
                   n_flyback=1, n_timepoints=8, photons_per_frame=500, seed=12)
    if where == "s3":
        import s3fs

        s3fs.S3FileSystem(**s3_server).mkdir("record-bucket")
        dst, opts = "s3://record-bucket/run.zarr", s3_server
    else:
        dst, opts = str(tmp_path / "rec.zarr"), None
    real = Target.write_text

    def write_text(self, k, text, **kw):
        if k.endswith("/batch-000001"):
            return None  # (as if the batch's process died before its record)
        return real(self, k, text, **kw)

    monkeypatch.setattr(Target, "write_text", write_text)
    with pytest.raises(ConversionError, match=r"batches \[1\] did not finish"):
        zs.convert(t.path, dst, target_options=opts, scheduler="sync", **_small_shards(t))
    monkeypatch.setattr(Target, "write_text", real)
    target = Target(dst, opts)
    assert not target.exists("zarr.json") and target.interrupted()
    with pytest.raises(IncompleteStoreError):
        zs.verify(t.path, dst, target_options=opts)
    summary = zs.convert(t.path, dst, target_options=opts, resume=True, scheduler="sync",
                         **_small_shards(t))
    assert summary.batches >= 2
    assert zs.verify(t.path, dst, target_options=opts) == []
    assert target.listed(".siff-progress") == set()


def test_a_batchs_last_round_trips_go_on_behind_the_next_batch(s3_server, s3_latency,
                                                               tmp_path, monkeypatch):
    """On object storage a batch's PUTs and last steps only wait round trips (its
    shards on their way, the copies of its intensity shards to OME level 0, its
    record): the thread decodes its next batch meanwhile, and the run waits for
    every record before the finish. A copy the
    server refuses stops the conversion with that refusal, the store unpublished;
    resume finishes it."""
    import s3fs

    from siff_xarray.store import converter as conv

    proxy, opts = s3_latency
    s3fs.S3FileSystem(**s3_server).mkdir("tail-bucket")
    t = write_siff(tmp_path / "tail.siff", shape=(32, 16), channels=(1, 2), n_slices=2,
                   n_flyback=1, n_timepoints=8, photons_per_frame=500, seed=13)
    entered, entered_at, real = {}, {}, conv._write_batch

    def recording(plan_json, b, run_id, tails=None):
        entered[b], entered_at[b] = len(proxy.log), time.monotonic()
        return real(plan_json, b, run_id, tails)

    monkeypatch.setattr(conv, "_write_batch", recording)
    proxy.latency = 0.05
    dst = "s3://tail-bucket/run.zarr"
    zs.convert(t.path, dst, target_options=opts, scheduler="sync", **_small_shards(t))
    proxy.latency = 0.0
    records = {int(p.rsplit("-", 1)[1]): i for i, (m, p) in enumerate(proxy.log)
               if m == "PUT" and "/.siff-progress/batch-" in p}
    order = sorted(entered, key=entered.get)  # (one thread: the batches in turn)
    assert len(order) >= 3 and set(records) == set(order)
    # each record went out after the thread had started its next batch (log indexes)
    assert all(records[b] >= entered[nxt] for b, nxt in itertools.pairwise(order)), (
        records, entered)
    # ... and so were its data PUTs answered: its intensity shard (the batch's
    # time range) travelled while the thread decoded the next batch
    shard = {int(p.split("/intensity/c/")[1].split("/")[0]): i
             for i, (m, p) in enumerate(proxy.log) if m == "PUT" and "/intensity/c/" in p}
    assert set(shard) == set(order)
    answered = {b: proxy.spans[i][1] for b, i in shard.items()}
    assert all(answered[b] > entered_at[nxt] for b, nxt in itertools.pairwise(order)), (
        answered, entered_at)
    assert zs.verify(t.path, dst, target_options=opts) == []

    proxy.refuse_puts = r"/ome/0/c/"  # (the level-0 copies: PUTs with a copy source)
    dst = "s3://tail-bucket/refused.zarr"
    proxy.latency, since = 0.05, len(proxy.spans)
    try:
        with pytest.raises(PermissionError, match=r"refused\.zarr/ome/0/c/.*refused the copy"):
            zs.convert(t.path, dst, target_options=opts, scheduler="sync",
                       **_small_shards(t))
        raised = time.monotonic()
    finally:
        proxy.refuse_puts, proxy.latency = None, 0.0
    # nothing was written behind the error: every request had its answer before it
    with proxy.lock:
        spans = proxy.spans[since:]
    assert spans and all(end is not None and end <= raised for _, end in spans)
    with pytest.raises(IncompleteStoreError):
        zs.verify(t.path, dst, target_options=opts)
    zs.convert(t.path, dst, target_options=opts, scheduler="sync", resume=True,
               **_small_shards(t))
    assert zs.verify(t.path, dst, target_options=opts) == []


def test_a_batchs_copies_and_side_keys_go_while_its_photons_are_on_their_way(
        s3_server, s3_latency, tmp_path):
    """A batch's last steps wait only their own round trips: each level-0 copy goes
    once its intensity shard is stored, and the frame descriptions, contrast tallies
    and ownership check while the batch's photons are still on their way; the
    record goes after all of them. Before, all of them waited for every PUT of the
    batch: one more round trip at the end of every S3 run (measured at 20 ms)."""
    proxy, opts = s3_latency
    _, t, dst = _s3_case(s3_server, tmp_path, "tail-overlap")
    proxy.latency, since = 0.02, len(proxy.log)
    proxy.slow_puts = (r"/photons/arrival_time/c/", 0.5)  # (large shards: slow to send)
    try:
        summary = zs.convert(t.path, dst, target_options=opts, scheduler="sync",
                             ome_levels=2, **_small_shards(t))
    finally:
        proxy.latency, proxy.slow_puts = 0.0, None
    with proxy.lock:
        log, spans = proxy.log[since:], [list(s) for s in proxy.spans[since:]]

    def put(pattern: str) -> list[int]:
        return [i for i, (m, path) in enumerate(log) if m == "PUT" and re.search(pattern, path)]

    records = put(r"/\.siff-progress/batch-")
    assert len(records) == summary.batches >= 3
    for record in records:  # (a shard of each array per batch: batch b's are c/b)
        b = int(log[record][1].rsplit("-", 1)[1])
        (photons,) = put(rf"/photons/arrival_time/c/{b}$")
        intensity, copies = put(rf"/intensity/c/{b}/"), put(rf"/ome/0/c/{b}/")
        sides = put(rf"/\.siff-progress/(description|window)-{b:06d}")
        assert intensity and copies and len(sides) == 2, log
        answered = spans[photons][1]
        # the copies after their shard was stored, before the photons were
        assert all(spans[c][0] >= max(spans[i][1] for i in intensity) for c in copies)
        assert all(spans[c][0] < answered for c in copies), (b, spans[photons], copies)
        assert all(spans[s][0] < answered for s in sides)
        # ... and the record after everything of its batch was stored
        stored = max(spans[i][1] for i in [photons, *intensity, *copies, *sides])
        assert spans[record][0] >= stored
    assert zs.verify(t.path, dst, target_options=opts) == []


#: keys an S3 conversion writes, from its start to its finish (regular expressions on
#: the PUT's path): one refused at a time
_REFUSED_KEYS = [
    r"/\.siff-progress/started\.json",
    r"/frame_time/zarr\.json",  # (the metadata, with the small arrays)
    r"/\.siff-progress/nodes\.json",
    r"/\.siff-progress/plan\.json",
    r"/intensity/c/3/",
    r"/photons/arrival_time/c/2",
    r"/ome/1/c/2/",
    r"/ome/0/c/1/",  # (a server-side copy of an intensity shard)
    r"/photon_count/c/2/",
    r"/histogram/c/1/",
    r"/photons/flyback_intensity/c/",
    r"/\.siff-progress/description-000003",
    r"/\.siff-progress/window-000002",
    r"/\.siff-progress/batch-000005",
    r"/photons/description/c/",  # (written by the finish)
    r"/ome/zarr\.json",  # (the finish: the contrast windows)
    r"run\.zarr/zarr\.json",  # (the root: the store published)
]


@pytest.mark.parametrize("refused", _REFUSED_KEYS)
def test_a_write_refused_at_any_step_of_an_s3_conversion_stops_it_and_resume_finishes(
        s3_server, s3_latency, tmp_path, refused):
    """Whichever of its writes the store refuses, from the first marker to the
    published root, the conversion stops with an error and publishes nothing (the
    store never reads as finished), and resume finishes it to a store that
    verifies; refused before anything was kept, there is nothing to resume and
    the store is empty."""
    proxy, opts = s3_latency
    bucket = f"refuse-each-{_REFUSED_KEYS.index(refused)}"
    fs, t, dst = _s3_case(s3_server, tmp_path, bucket)
    proxy.refuse_puts = refused
    puts = len(proxy.puts)
    with pytest.raises((OSError, ConversionError)):
        zs.convert(t.path, dst, target_options=opts, scheduler="threads", num_workers=2,
                   ome_levels=2, **_small_shards(t))
    proxy.refuse_puts = None
    assert any(re.search(refused, p) for *_, p in proxy.puts[puts:])  # (it was asked)
    with pytest.raises((IncompleteStoreError, FileNotFoundError)):
        zs.open_converted(dst, storage_options=opts)
    fs.invalidate_cache()
    kept = fs.find(f"{bucket}/run.zarr")
    if not kept:  # (refused before the plan: resume says so, a new run converts)
        with pytest.raises(ConversionError, match="no interrupted conversion"):
            zs.convert(t.path, dst, target_options=opts, resume=True, **_small_shards(t))
        zs.convert(t.path, dst, target_options=opts, ome_levels=2, **_small_shards(t))
    else:
        zs.convert(t.path, dst, target_options=opts, resume=True, **_small_shards(t))
    assert zs.verify(t.path, dst, target_options=opts) == []


def test_a_write_refused_on_s3_stops_a_distributed_conversion_and_resume_finishes(
        s3_server, s3_latency, tmp_path):
    """On a cluster the refused write is met by a worker, its PUT behind the batch:
    the client raises it, the workers end the run (their batches still running
    record nothing), the store is given up unfinished, and resume finishes it."""
    distributed = pytest.importorskip("distributed")
    proxy, opts = s3_latency
    fs, t, dst = _s3_case(s3_server, tmp_path, "refuse-dist-bucket")
    proxy.refuse_puts = r"/photons/arrival_time/c/2"
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        with pytest.raises(OSError, match=r"arrival_time/c/2.*refused the write"):
            zs.convert(t.path, dst, target_options=opts, scheduler=client,
                       **_small_shards(t))
        running = client.run(lambda: dict(__import__(
            "siff_xarray.store.converter").store.converter._active))
    proxy.refuse_puts = None
    assert all(r == {} for r in running.values()), running
    fs.invalidate_cache()
    assert not fs.exists("refuse-dist-bucket/run.zarr/.siff-progress/owner.json")
    with pytest.raises(IncompleteStoreError):
        zs.verify(t.path, dst, target_options=opts)
    summary = zs.convert(t.path, dst, target_options=opts, resume=True, **_small_shards(t))
    assert summary.batches_skipped < summary.batches  # (the refused batch: again)
    assert zs.verify(t.path, dst, target_options=opts) == []


def test_a_sidecar_that_cannot_be_written_leaves_the_conversion_alone(tmp_path, monkeypatch,
                                                                     caplog):
    """The sidecar goes on behind the first batches; an error writing it (the sidecar
    only speeds later opens up) is logged, and the conversion finishes."""
    t = write_siff(tmp_path / "s.siff", shape=(8, 8), n_timepoints=4, photons_per_frame=200)

    def fails(self):
        raise OSError("the disk is full")

    monkeypatch.setattr(SiffFile, "write_sidecar", fails)
    with caplog.at_level("WARNING", logger="siff_xarray"):
        zs.convert(t.path, tmp_path / "s.zarr")
    assert zs.verify(t.path, tmp_path / "s.zarr") == []
    assert "its sidecar was not written (the disk is full)" in caplog.text
    assert not os.path.exists(str(t.path) + ".siffidx")


def test_the_end_of_a_run_waits_for_its_batches_only_so_long(monkeypatch, caplog):
    """A batch that never ends (its network stalled past every timeout) must not hold
    the run's end forever: after ``END_WAIT_S`` the run ends with a warning."""
    from siff_xarray.store import converter as conv

    monkeypatch.setattr(conv, "END_WAIT_S", 0.3)
    conv._begin_batch("stuck-run", "nowhere.zarr: batch 0")
    try:
        t0 = time.monotonic()
        with caplog.at_level("WARNING", logger="siff_xarray"):
            conv._forget_sources("stuck-run")
        assert 0.3 <= time.monotonic() - t0 < 5
        assert "1 batch(es) still running after 0 s" in caplog.text
        with pytest.raises(ConversionError, match="ended before this batch started"):
            conv._begin_batch("stuck-run", "nowhere.zarr: batch 1")
    finally:
        conv._end_batch("stuck-run")
    assert "stuck-run" not in conv._active
