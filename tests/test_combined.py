"""Datasets combined from several files: every part reduces its own file's photons.

Each combined Dataset (``xr.concat``, ``open_mfdataset``, ``isel`` of those, from
``.siff`` files, converted stores, or both) must give, for every part, exactly
the photon reductions of that part's file opened alone, eagerly and under Dask.
"""

from __future__ import annotations

import itertools
import os
import warnings

import numpy as np
import pytest
import xarray as xr

from siff_xarray import store as zs
from siff_xarray.synthetic import write_siff

KW = dict(shape=(10, 8), channels=(1, 2), n_slices=2, n_flyback=1, photons_per_frame=400,
          max_shift=0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three files of one layout with different photons; the last one is longer."""
    d = tmp_path_factory.mktemp("runs")
    a = write_siff(d / "run_a.siff", n_timepoints=4, seed=11, **KW)
    b = write_siff(d / "run_b.siff", n_timepoints=4, seed=12, lifetimes_ns=(1.5, 4.0), **KW)
    c = write_siff(d / "run_c.siff", n_timepoints=6, seed=13, **KW)
    return [a.path, b.path, c.path]


@pytest.fixture(scope="module")
def stores(runs, tmp_path_factory):
    d = tmp_path_factory.mktemp("stores")
    out = []
    for p in runs:
        dst = d / (os.path.basename(p) + ".zarr")
        zs.convert(p, dst)
        out.append(str(dst))
    return out


@pytest.fixture(scope="module")
def masks():
    rng = np.random.default_rng(0)
    return rng.random((3, *KW["shape"])) > 0.4


def _reductions(ds: xr.Dataset, masks: np.ndarray) -> dict[str, np.ndarray]:
    """Every photon reduction of ``ds``, computed (numbers only)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # means of empty ROIs
        out = {
            "sum_kernel": ds.siff.sum_masks(masks, method="kernel"),
            "sum_xarray": ds.siff.sum_masks(masks, method="xarray"),
            "histogram": ds.siff.histogram(masks),
            "lifetime_roi": ds.siff.lifetime(masks),
            "lifetime_px": ds.siff.lifetime(channel=1),
            "phasor_g": ds.siff.phasor(masks).g,
            "phasor_n": ds.siff.phasor(masks).photons,
        }
        return {k: np.asarray(v.compute().values) for k, v in out.items()}


def _alone(path: str, masks: np.ndarray, **open_kw) -> dict[str, np.ndarray]:
    opener = zs.open_converted if path.endswith(".zarr") else \
        (lambda p, **k: xr.open_dataset(p, engine="siff", **k))
    with opener(path, **open_kw) as ds:
        return _reductions(ds, masks)


def _equal(got: dict[str, np.ndarray], want: dict[str, np.ndarray], what: str) -> None:
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=f"{what}: {k}")


def test_the_files_differ(runs, masks):
    a, b = (_alone(p, masks) for p in runs[:2])
    assert not np.array_equal(a["histogram"], b["histogram"])
    assert np.nanmax(np.abs(a["lifetime_roi"] - b["lifetime_roi"])) > 0.3


@pytest.mark.parametrize("kind", ["siff", "store", "mixed"])
@pytest.mark.parametrize("chunks", [None, {}])
def test_concat_along_time_gives_each_file_its_own_photons(runs, stores, masks, kind, chunks):
    paths = {"siff": runs, "store": stores, "mixed": [runs[0], stores[1], runs[2]]}[kind]
    want = [_alone(p, masks) for p in paths]
    opened = [zs.open_converted(p, chunks=chunks) if p.endswith(".zarr")
              else xr.open_dataset(p, engine="siff", chunks=chunks) for p in paths]
    try:
        both = xr.concat(opened, dim="time", data_vars="all", coords="different",
                         compat="equals", join="outer")
        bounds = np.cumsum([0] + [o.sizes["time"] for o in opened])
        whole = _reductions(both, masks)
        for k, (t0, t1) in enumerate(itertools.pairwise(bounds)):
            # the slices of the combined result, and the reductions of the sliced Dataset
            part = {n: v[(slice(None),) * _time_axis(n) + (slice(t0, t1),)]
                    for n, v in whole.items()}
            _equal(part, want[k], f"{paths[k]} in the combined result")
            _equal(_reductions(both.isel(time=slice(t0, t1)), masks), want[k],
                   f"{paths[k]} selected from the combined Dataset")
    finally:
        for o in opened:
            o.close()


def _time_axis(name: str) -> int:
    """Axis of ``time`` in the results of :func:`_reductions`."""
    return 0 if name == "lifetime_px" else 1


@pytest.mark.parametrize(("kind", "engine"), [("siff", "siff"), ("store", "zarr"),
                                              ("store", "siff")])
def test_open_mfdataset_nested_runs(runs, stores, masks, kind, engine):
    paths = (runs if kind == "siff" else stores)[:2]  # the same length: a "run" dimension
    want = [_alone(p, masks) for p in paths]
    with xr.open_mfdataset(paths, engine=engine, combine="nested", concat_dim="run",
                           data_vars="all", coords="different", compat="equals",
                           join="override") as mf:
        assert mf.sizes["run"] == 2
        for k in range(2):
            _equal(_reductions(mf.isel(run=k), masks), want[k], f"run {k} of {paths}")
    with xr.open_mfdataset(paths, engine=engine, combine="nested", concat_dim="time",
                           data_vars="all", coords="different", compat="equals",
                           join="outer") as mf:
        n = mf.sizes["time"] // 2
        _equal(_reductions(mf.isel(time=slice(n, None)), masks), want[1], "second file")


def test_a_combination_that_lost_the_sources_is_refused(runs, masks):
    with xr.open_mfdataset(runs[:2], engine="siff", combine="nested", concat_dim="run",
                           data_vars=["intensity"], coords="minimal", compat="override",
                           join="override") as mf:
        assert "run" in mf.intensity.dims and "run" not in mf.source_frame.dims
        with pytest.raises(ValueError, match="cannot be traced"):
            mf.siff.lifetime(masks)


def test_a_moved_store_is_named(stores, masks, tmp_path):
    import shutil

    moved = tmp_path / "moved.zarr"
    shutil.copytree(stores[0], moved)
    want = _alone(stores[0], masks)
    with xr.open_zarr(moved) as ds:  # alone: its own location is used
        _equal(_reductions(ds, masks), want, "moved store")
    with zs.open_converted(moved) as ds:
        assert (ds.source_file.values[ds.source_frame.values >= 0] == str(moved)).all()
    with xr.open_zarr(moved) as m, xr.open_zarr(stores[1]) as other:
        both = xr.concat([m, other], dim="time", data_vars="all", coords="different",
                         compat="equals", join="outer")
        shutil.rmtree(moved.parent / "gone.zarr", ignore_errors=True)
    both = both.assign(source_file=both.source_file.where(
        both.source_file != stores[1], str(tmp_path / "gone.zarr")))
    with pytest.raises(FileNotFoundError, match=r"gone\.zarr"):
        both.siff.lifetime(masks)
    # through engine="siff", each store records where it is now: combined, it is found
    with zs.open_converted(moved) as alone:
        n = alone.sizes["time"]
    with xr.open_mfdataset([moved, stores[1]], engine="siff", combine="nested",
                           concat_dim="time", data_vars="all", coords="different",
                           compat="equals", join="outer") as mf:
        _equal(_reductions(mf.isel(time=slice(None, n)), masks), want, "moved, combined")


@pytest.mark.slow
def test_combined_on_a_cluster_in_another_directory(runs, stores, masks, tmp_path,
                                                    monkeypatch):
    distributed = pytest.importorskip("distributed")
    paths = [runs[0], stores[1], runs[2]]
    want = [_alone(p, masks) for p in paths]
    here = os.path.dirname(runs[0])
    monkeypatch.chdir(here)
    rel = [os.path.relpath(p) for p in paths]  # relative paths, made absolute at open
    opened = [zs.open_converted(p, chunks={}) if p.endswith(".zarr")
              else xr.open_dataset(p, engine="siff", chunks={}) for p in rel]
    both = xr.concat(opened, dim="time", data_vars="all", coords="different",
                     compat="equals", join="outer")
    elsewhere = tmp_path / "worker-cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # workers start here, with their own empty caches
    monkeypatch.setenv("SIFF_XARRAY_CACHE_DIR", str(tmp_path / "worker-cache"))
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster):
        lazy = {"lifetime_roi": both.siff.lifetime(masks),
                "histogram": both.siff.histogram(masks),
                "sum_kernel": both.siff.sum_masks(masks, method="kernel")}
        assert all(v.chunks is not None for v in lazy.values())
        got = {k: np.asarray(v.compute().values) for k, v in lazy.items()}
    bounds = np.cumsum([0] + [o.sizes["time"] for o in opened])
    for k, (t0, t1) in enumerate(itertools.pairwise(bounds)):
        for name, v in got.items():
            np.testing.assert_array_equal(v[:, t0:t1], want[k][name],
                                          err_msg=f"{paths[k]}: {name}")
    for o in opened:
        o.close()


def test_chunks_auto_on_siff_and_store(runs, stores):
    # text variables are fixed-width: Dask can size every variable
    with xr.open_dataset(runs[0], engine="siff", chunks="auto") as ds, \
            xr.open_dataset(runs[0], engine="siff") as eager:
        assert ds.intensity.chunks is not None
        assert ds.channel_name.dtype.kind == "U" and ds.source_file.dtype.kind == "U"
        xr.testing.assert_identical(ds.load(), eager.load())
    with zs.open_converted(stores[0], chunks="auto") as ds, \
            zs.open_converted(stores[0]) as eager:
        assert ds.intensity.chunks is not None
        xr.testing.assert_identical(ds.load(), eager.load())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr-python: FixedLengthUTF32 spec pending
        with xr.open_zarr(stores[0], chunks="auto") as ds:
            assert ds.channel_name.dtype.kind == "U"


def test_files_of_a_session_combine_by_their_epoch(tmp_path, masks):
    early = write_siff(tmp_path / "early.siff", n_timepoints=3, seed=21,
                       start_epoch_ns=1_700_000_000_000_000_000, **KW)
    late = write_siff(tmp_path / "late.siff", n_timepoints=4, seed=22,
                      start_epoch_ns=1_700_000_100_000_000_000, **KW)
    paths = [late.path, early.path]  # given out of order
    with xr.open_mfdataset(paths, engine="siff", combine="by_coords",
                           time_coordinate="epoch", data_vars="all", coords="different",
                           compat="equals", join="outer") as mf:
        assert mf.time.dtype.kind == "M" and mf.indexes["time"].is_monotonic_increasing
        assert mf.sizes["time"] == 7
        np.testing.assert_array_equal(mf.time.values[:3],
                                      mf.epoch.isel(z=0, channel=0).values[:3])
        _equal(_reductions(mf.isel(time=slice(0, 3)), masks), _alone(early.path, masks),
               "the earlier file first")
        _equal(_reductions(mf.isel(time=slice(3, None)), masks), _alone(late.path, masks),
               "then the later one")
    with xr.open_dataset(early.path, engine="siff", time_coordinate="epoch",
                         decode_times=False) as ds:
        assert ds.time.dtype == np.int64 and ds.time.attrs["units"].startswith("ns since")
    with pytest.raises(ValueError, match="time_coordinate"):
        xr.open_dataset(early.path, engine="siff", time_coordinate="wall")


def test_threads_opening_one_photon_source_at_once_share_it(siff_files, monkeypatch):
    """Two Dask tasks that open a new source together: neither closes the other's file."""
    import threading
    import time

    from siff_xarray.accessor import reductions
    from siff_xarray.accessor.reductions import PhotonSource

    t = siff_files["two_chan_slices_flyback"]
    monkeypatch.setattr(reductions, "_OPEN", type(reductions._OPEN)())
    real = PhotonSource._create

    def slow_create(self):  # both threads miss the cache before either stores its file
        obj = real(self)
        time.sleep(0.3)
        return obj

    monkeypatch.setattr(PhotonSource, "_create", slow_create)
    src = PhotonSource("siff", t.path)
    got, errors = [], []

    def use():
        try:
            with src.open() as f:
                got.append(f)
                time.sleep(0.3)  # still reading when the other thread finishes opening
                f.read_frames([0])  # was OSError: [Errno 9] Bad file descriptor
        except Exception as exc:  # pragma: no cover - the failure being tested
            errors.append(exc)

    threads = [threading.Thread(target=use) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == [] and got[0] is got[1]


def test_a_photon_source_dropped_from_the_cache_closes_after_its_last_read(siff_files,
                                                                         monkeypatch):
    """More open sources than the cache holds: the evicted one is closed after its reads."""
    from siff_xarray.accessor import reductions
    from siff_xarray.accessor.reductions import PhotonSource

    monkeypatch.setattr(reductions, "_OPEN", type(reductions._OPEN)())
    monkeypatch.setattr(reductions, "MAX_OPEN", 1)
    a = PhotonSource("siff", siff_files["two_chan_slices_flyback"].path)
    b = PhotonSource("siff", siff_files["single_raw"].path)
    with a.open() as fa:
        with b.open() as fb:  # evicts a while a block still reads it
            fb.read_frames([0])
        fa.read_frames([0])  # was: the evicted file closed under this read
        assert not fa._source.closed
    assert fa._source.closed  # closed once its last user was done
    with b.open() as fb2:
        assert fb2 is fb and not fb._source.closed  # b stayed cached
