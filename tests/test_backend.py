"""The xarray backend: layout, values (truth and corrosiffpy), laziness, pickling, I/O."""

from __future__ import annotations

import io
import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from conftest import open_corrosiff

import siff_xarray
from siff_xarray import SiffFile, SiffFormatError
from siff_xarray.backend import open_acquisition, open_siff
from siff_xarray.backend.entrypoint import SiffBackendEntrypoint
from siff_xarray.synthetic import write_siff


def _expected_map(t, include_partial=True):
    """(T, Z, [R], C) file frame indices built from the truth's layout, -1 if missing."""
    c = len(t.channels)
    v = t.n_slices * t.frames_per_slice * c
    p = v + t.n_flyback * c
    n_t = t.n_frames // p + (1 if t.n_frames % p >= (1 if include_partial else v) else 0)
    out = np.full((n_t, t.n_slices, t.frames_per_slice, c), -1, dtype=np.int64)
    for tt in range(n_t):
        for z in range(t.n_slices):
            for r in range(t.frames_per_slice):
                for ch in range(c):
                    fr = tt * p + (z * t.frames_per_slice + r) * c + ch
                    if fr < t.n_frames:
                        out[tt, z, r, ch] = fr
    return out if t.frames_per_slice > 1 else out[:, :, 0, :]


def _arrange(frames_fn, fmap, shape):
    """Frames placed by ``fmap`` (zeros where -1)."""
    flat = fmap.reshape(-1)
    out = np.zeros((flat.size, *shape), dtype=np.uint16)
    ok = flat >= 0
    if ok.any():
        out[ok] = frames_fn(flat[ok])
    return out.reshape(*fmap.shape, *shape)


# ------------------------------------------------------------------ entry point


def test_engine_is_registered_and_detected(siff_files):
    assert "siff" in xr.backends.list_engines()
    t = siff_files["single_raw"]
    with xr.open_dataset(t.path) as ds:  # no engine=: guessed from the magic bytes
        assert "intensity" in ds


def test_guess_can_open_never_raises(tmp_path, siff_files):
    e = SiffBackendEntrypoint()
    assert e.guess_can_open(siff_files["classic_tiff"].path)
    assert e.guess_can_open("file://" + siff_files["single_raw"].path)
    tif = write_siff(tmp_path / "si.tif", shape=(4, 4), n_timepoints=1, format="tiff")
    assert e.guess_can_open(tif.path)
    other = tmp_path / "plain.tif"
    other.write_bytes(b"II*\x00" + b"\x00" * 64)
    assert not e.guess_can_open(other)
    assert not e.guess_can_open(tmp_path / "missing.siff")
    assert not e.guess_can_open(tmp_path)  # a directory
    assert e.guess_can_open("s3://bucket/run.siff")
    assert not e.guess_can_open("s3://bucket/run.nc")
    with open(siff_files["single_raw"].path, "rb") as fh:
        fh.seek(5)
        assert e.guess_can_open(fh)
        assert fh.tell() == 5  # position restored
    assert not e.guess_can_open(io.StringIO("text"))
    assert not e.guess_can_open(12345)
    assert not e.guess_can_open(b"/bytes/path.siff")


def test_entrypoint_module_is_light():
    import subprocess
    import sys

    code = ("import sys, xarray as xr, siff_xarray; xr.backends.list_engines(); "
            "heavy = [m for m in ('numba', 'dask', 'zarr', 'siff_xarray.reader') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.parametrize("code", [
    # the package alone (the command line): no xarray; ds.siff once xarray comes
    "import sys, importlib.util, siff_xarray\n"
    "assert 'xarray' not in sys.modules\n"
    "importlib.util.find_spec('xarray')  # an availability check does not disarm the hook\n"
    "import xarray as xr\n"
    "print(type(xr.Dataset().siff).__name__)",
    # xarray first, then the package
    "import xarray as xr, siff_xarray\nprint(type(xr.Dataset().siff).__name__)",
    # only xarray: the engine brings the accessor
    "import xarray as xr\n"
    "xr.backends.list_engines()\n"
    "print(type(xr.Dataset().siff).__name__)",
])
def test_accessor_registers_whatever_the_import_order(code):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "SiffAccessor"


def test_open_siff_is_open_dataset(siff_files):
    t = siff_files["two_chan_slices_flyback"]
    with open_siff(t.path) as a, xr.open_dataset(t.path, engine="siff") as b:
        xr.testing.assert_identical(a, b)
    assert siff_xarray.open_siff is open_siff
    assert siff_xarray.open_acquisition is open_acquisition


# ------------------------------------------------------------------ values


def test_intensity_matches_truth_and_corrosiff(truth):
    fmap = _expected_map(truth)
    with xr.open_dataset(truth.path, engine="siff", partial_volume="keep") as ds:
        dims = ("time", "z", "repeat", "channel") if truth.frames_per_slice > 1 else (
            "time", "z", "channel")
        assert ds.intensity.dims == (*dims, "y", "x")
        assert ds.intensity.dtype == np.uint16
        np.testing.assert_array_equal(ds.frame_index.values, fmap)
        np.testing.assert_array_equal(ds.frame_present.values, fmap >= 0)
        want = _arrange(truth.intensity, fmap, truth.shape)
        np.testing.assert_array_equal(ds.intensity.values, want)
        with xr.open_dataset(truth.path, engine="siff", chunks={},
                             partial_volume="keep") as dds:
            assert dds.intensity.chunks is not None
            np.testing.assert_array_equal(dds.intensity.values, want)
        with SiffFile(truth.path) as f:
            bigtiff = f.header.bigtiff
        if bigtiff:  # corrosiff cannot read classic TIFF
            c = open_corrosiff(truth.path)
            np.testing.assert_array_equal(
                ds.intensity.values, _arrange(lambda fr: c.get_frames(fr.tolist()), fmap,
                                              truth.shape))


def test_outer_indexing_equals_numpy(siff_files, rng):
    t = siff_files["frames_per_slice"]
    with xr.open_dataset(t.path, engine="siff") as ds:
        full = ds.intensity.values
        sel = ds.intensity[[2, 0], 1, :, [1, 0], 2:7:2, [-1, 0, 3]]
        np.testing.assert_array_equal(sel.values, full[[2, 0]][:, 1][:, :, [1, 0]]
                                      [:, :, :, 2:7:2][..., [-1, 0, 3]])
        np.testing.assert_array_equal(ds.intensity.isel(time=-1, channel=0).values,
                                      full[-1, :, :, 0])
        pts = ds.intensity.isel(time=xr.DataArray([0, 2], dims="p"),
                                x=xr.DataArray([1, 5], dims="p"))  # vectorised
        assert pts.dims == ("p", "z", "repeat", "channel", "y")
        np.testing.assert_array_equal(pts.isel(p=0).values, full[0][..., 1])
        np.testing.assert_array_equal(pts.isel(p=1).values, full[2][..., 5])


def test_partial_volume_keep_and_drop(siff_files):
    t = siff_files["partial_volume"]
    with xr.open_dataset(t.path, engine="siff", partial_volume="keep") as ds:
        assert ds.sizes["time"] == 4
        last = ds.frame_present.isel(time=-1).values
        assert last.any() and not last.all()
        missing = ds.intensity.isel(time=-1).values[~last]
        assert (missing == 0).all()
        assert np.isnan(ds.frame_time.isel(time=-1).values[~last]).all()
        assert np.isnat(ds.epoch.isel(time=-1).values[~last]).all()
    # the default leaves the never-completed volume out (SiffPy's array_shape), so a
    # mean over time never includes frames that were never acquired
    for kw in ({}, {"partial_volume": "drop"}):
        with xr.open_dataset(t.path, engine="siff", **kw) as ds:
            assert ds.sizes["time"] == 3
            assert ds.frame_present.all()
            assert ds.sizes["time"] == t.n_timepoints
            keep = xr.open_dataset(t.path, engine="siff", partial_volume="keep")
            xr.testing.assert_identical(ds, keep.isel(time=slice(0, 3)))
            keep.close()
    with pytest.raises(ValueError, match="partial_volume"):
        xr.open_dataset(t.path, engine="siff", partial_volume="maybe")


def test_photon_count_histogram_and_mean_arrival(truth):
    fmap = _expected_map(truth)
    with SiffFile(truth.path) as f, xr.open_dataset(truth.path, engine="siff", flim=True,
                                                    partial_volume="keep") as ds:
        flat = fmap.reshape(-1)
        ok = flat >= 0
        counts = np.zeros(flat.size, dtype=np.int64)
        counts[ok] = np.diff(truth.photon_starts)[flat[ok]]
        np.testing.assert_array_equal(ds.photon_count.values.reshape(-1), counts)
        hist = ds.histogram.values.reshape(flat.size, -1)
        np.testing.assert_array_equal(hist[ok], f.histograms(flat[ok]))
        assert (hist[~ok] == 0).all()
        assert ds.histogram.dims[-1] == "tau" and ds.sizes["tau"] == truth.tau_bins
        mean = ds.mean_arrival.values.reshape(flat.size, *truth.shape)
        np.testing.assert_allclose(mean[ok], f.lifetime_images(flat[ok]), rtol=1e-6)
        assert np.isnan(mean[~ok]).all()
        assert ds.mean_arrival.dtype == np.float32 and ds.mean_arrival.attrs["units"] == "ns"
    with xr.open_dataset(truth.path, engine="siff") as ds:
        assert "mean_arrival" not in ds


def test_corrosiff_histogram_mode(siff_files):
    t = siff_files["two_chan_slices_flyback"]
    with xr.open_dataset(t.path, engine="siff", histogram_mode="corrosiff") as ds:
        c = open_corrosiff(t.path)
        fr = ds.frame_index.values.reshape(-1)
        np.testing.assert_array_equal(ds.histogram.values.reshape(fr.size, -1),
                                      c.get_histogram_by_frames(fr.tolist()))
        assert ds.sizes["tau"] == t.tau_bins + 2


def test_coordinates_and_attrs(siff_files):
    t = siff_files["two_chan_slices_flyback"]
    fmap = _expected_map(t)
    with xr.open_dataset(t.path, engine="siff") as ds:
        np.testing.assert_allclose(ds.time.values, t.frame_time_s[fmap[:, 0, 0]])
        np.testing.assert_allclose(ds.frame_time.values, t.frame_time_s[fmap])
        np.testing.assert_array_equal(ds.epoch.values.view(np.int64), t.epoch_laser_ns[fmap])
        assert ds.epoch.dtype == np.dtype("datetime64[ns]")
        np.testing.assert_array_equal(ds.channel.values, t.channels)
        assert list(ds.channel_name.values) == [f"Channel {c}" for c in t.channels]
        assert ds.z.attrs["units"] == "um" and ds.sizes["z"] == t.n_slices
        assert np.all(np.diff(ds.z.values) > 0)
        bw = t.bin_width_ps / 1000
        np.testing.assert_allclose(ds.tau.values, (np.arange(t.tau_bins) + 0.5) * bw)
        assert ds.tau.attrs["units"] == "ns"
        dy = np.diff(ds.y.values)
        np.testing.assert_allclose(dy, ds.attrs["pixel_size_um"][0])
        assert ds.y.attrs["units"] == "um"
        a = ds.attrs
        assert a["n_tau_bins"] == t.tau_bins and a["tau_bin_ps"] == t.bin_width_ps
        assert a["source_file"] == t.path
        assert a["scanimage_version"] == "2023.1.0"
        assert a["frame_rate_hz"] > 0 and a["volume_rate_hz"] > 0 and a["zoom"] == 2.0
        with SiffFile(t.path) as f:
            assert a["scanimage_header"] == f.header.nvfd_text
            assert a["roi_json"] == f.header.roi_text
        assert ds.intensity.encoding["source"] == t.path


def test_decode_times_false_gives_int_ns(siff_files):
    t = siff_files["partial_volume"]
    with xr.open_dataset(t.path, engine="siff") as a, \
            xr.open_dataset(t.path, engine="siff", decode_times=False) as b, \
            xr.open_dataset(t.path, engine="siff", decode_cf=False) as c:
        assert a.epoch.dtype == np.dtype("datetime64[ns]")
        assert b.epoch.dtype == np.int64 and c.epoch.dtype == np.int64
        np.testing.assert_array_equal(a.epoch.values.view(np.int64), b.epoch.values)
    # xarray's CF decoder keywords: nothing in a siff Dataset is CF-encoded, so they are
    # accepted and change nothing; cftime epochs are refused with a reason
    with xr.open_dataset(t.path, engine="siff", mask_and_scale=True, decode_timedelta=True,
                         concat_characters=True, decode_coords=True) as d:
        xr.testing.assert_identical(d.load(), a.load())
    with pytest.raises(ValueError, match="use_cftime=True is not supported"):
        xr.open_dataset(t.path, engine="siff", use_cftime=True)
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'flimm'.*options are"):
        siff_xarray.open_siff(t.path, flimm=True)


def test_pixel_index_coords_without_fov(tmp_path):
    t = write_siff(tmp_path / "nofov.siff", shape=(6, 5), n_timepoints=2,
                   header_extra={"SI.hRoiManager.imagingFovUm": "[]"})
    with xr.open_dataset(t.path, engine="siff") as ds:
        np.testing.assert_array_equal(ds.y.values, np.arange(6))
        assert ds.x.attrs["units"] == "pixel"


def test_events(siff_files):
    t = siff_files["smallest_bright"]
    with xr.open_dataset(t.path, engine="siff") as ds:
        assert list(ds.event_text.values) == [e[1] for e in t.events]
        np.testing.assert_array_equal(ds.event_frame.values, [e[0] for e in t.events])
        np.testing.assert_allclose(ds.event_time.values, [e[2] for e in t.events])
    with xr.open_dataset(siff_files["single_raw"].path, engine="siff") as ds:
        assert "event_text" not in ds


def test_intensity_only_tiff(tmp_path):
    t = write_siff(tmp_path / "si.tif", shape=(6, 7), channels=(1, 2), n_timepoints=3,
                   format="tiff")
    with xr.open_dataset(t.path, engine="siff") as ds:
        assert "histogram" not in ds and "tau" not in ds.coords
        fmap = _expected_map(t)
        np.testing.assert_array_equal(ds.intensity.values, _arrange(t.intensity, fmap, t.shape))
        np.testing.assert_array_equal(ds.photon_count.values,
                                      ds.intensity.values.sum(axis=(-2, -1)))


# ------------------------------------------------------------------ laziness


class _Spy:
    """Record the frames each SiffFile method decodes."""

    def __init__(self, monkeypatch, *names):
        self.calls: list[tuple[str, list[int]]] = []
        for name in names:
            orig = getattr(SiffFile, name)

            def wrapped(f, frames=None, *args, _orig=orig, _name=name, **kw):
                self.calls.append((_name, np.asarray(frames).ravel().tolist()))
                return _orig(f, frames, *args, **kw)

            monkeypatch.setattr(SiffFile, name, wrapped)

    def frames(self, name=None):
        return sorted({fr for n, frs in self.calls if name in (None, n) for fr in frs})


def test_10000_frames_one_timepoint_decodes_only_its_frames(tmp_path, monkeypatch):
    t = write_siff(tmp_path / "long.siff", shape=(4, 4), channels=(1, 2), n_slices=4,
                   n_flyback=1, n_timepoints=1000, photons_per_frame=20, encoding="compressed",
                   return_truth=False)
    assert t is None
    spy = _Spy(monkeypatch, "read_frames", "histograms", "lifetime_images")
    with xr.open_dataset(tmp_path / "long.siff", engine="siff") as ds:
        assert ds.sizes["time"] == 1000
        assert int(ds.frame_index.max()) == 9997  # 10 000 frames, 2 flyback per volume
        assert spy.calls == []  # opening decodes nothing
        one = ds.intensity.isel(time=637).values
        assert spy.frames() == sorted(ds.frame_index.isel(time=637).values.ravel().tolist())
        assert one.shape == (4, 2, 4, 4)
        spy.calls.clear()
        _ = ds.histogram.isel(time=10, z=2, channel=1).values
        assert spy.frames("histograms") == [int(ds.frame_index[10, 2, 1])]
        spy.calls.clear()
        # 10 000 descriptions are parsed in chunks (releasing mapped pages in between):
        # the result equals one parse over all of them
        from siff_xarray.reader.frame_meta import parse_timestamps

        with SiffFile(tmp_path / "long.siff", index_cache=False) as f:
            every = np.arange(f.num_frames)
            ref = parse_timestamps(*f._descriptions(every), every, f.name)
            got = f.timestamps()
            np.testing.assert_array_equal(got.experiment_s, ref.experiment_s)
            np.testing.assert_array_equal(got.epoch_laser_ns, ref.epoch_laser_ns)
            np.testing.assert_array_equal(got.epoch_system_ns, ref.epoch_system_ns)
        np.testing.assert_array_equal(ds.frame_time.values.ravel(),
                                      ref.experiment_s[ds.frame_index.values.ravel()])
        with xr.open_dataset(tmp_path / "long.siff", engine="siff", chunks={}) as dds:
            dds.intensity.isel(time=slice(5, 7)).sum().compute()
            want = dds.frame_index.isel(time=slice(5, 7)).values.ravel().tolist()
            assert spy.frames("read_frames") == sorted(want)


def test_drop_variables_are_never_read(siff_files, monkeypatch):
    t = siff_files["single_compressed"]
    spy = _Spy(monkeypatch, "histograms", "read_frames")
    with xr.open_dataset(t.path, engine="siff", drop_variables=["histogram", "epoch"]) as ds:
        assert "histogram" not in ds and "epoch" not in ds.coords
        _ = ds.photon_count.values
        ds.load()
    assert spy.frames("histograms") == []
    with xr.open_dataset(t.path, engine="siff", drop_variables="intensity") as ds:
        assert "intensity" not in ds


def test_preferred_chunks_whole_frames(siff_files):
    t = siff_files["two_chan_slices_flyback"]
    with xr.open_dataset(t.path, engine="siff", chunk_bytes=2 * (3 * 2 * 12 * 10 * 2)) as ds:
        pc = ds.intensity.encoding["preferred_chunks"]
        assert pc == {"time": 2, "z": 3, "channel": 2, "y": 12, "x": 10}
    with xr.open_dataset(t.path, engine="siff", chunks={},
                         chunk_bytes=2 * (3 * 2 * 12 * 10 * 2)) as ds:
        assert ds.intensity.chunks[0] == (2, 2, 1)
        assert ds.intensity.chunks[-2:] == ((12,), (10,))
    with xr.open_dataset(t.path, engine="siff", chunks={}, chunk_bytes=100) as ds:
        # a volume is bigger than a chunk: one frame per chunk
        assert ds.intensity.chunks[:3] == ((1,) * 5, (1,) * 3, (1, 1))


def _open_fds(path):
    real = os.path.realpath(path)
    out = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.path.realpath(f"/proc/self/fd/{fd}") == real:
                out += 1
        except OSError:
            pass
    return out


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_close_releases_the_file(tmp_path):
    t = write_siff(tmp_path / "c.siff", shape=(4, 4), n_timepoints=2)
    ds = xr.open_dataset(t.path, engine="siff")
    _ = ds.intensity.values
    assert _open_fds(t.path) >= 1
    ds.close()
    assert _open_fds(t.path) == 0


def test_sources_kept_open_by_reductions_are_closed_at_exit(tmp_path):
    """The reductions' per-process cache of open files closes them when Python exits.

    Before, the interpreter printed ``ResourceWarning: unclosed file`` at exit.
    """
    import subprocess
    import sys
    import textwrap

    t = write_siff(tmp_path / "x.siff", shape=(8, 8), n_timepoints=3, photons_per_frame=50)
    script = textwrap.dedent(f"""
        import numpy as np, xarray as xr, siff_xarray
        with xr.open_dataset({t.path!r}, engine="siff") as ds:
            ds.siff.lifetime(np.ones((8, 8), bool)).values  # opens a cached source
        print("done")
    """)
    out = subprocess.run([sys.executable, "-X", "dev", "-W", "always::ResourceWarning",
                          "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "done" in out.stdout, out.stderr[-2000:]
    assert "unclosed file" not in out.stderr, out.stderr[-2000:]


# ------------------------------------------------------------------ writing and pickling


def test_to_zarr_and_to_netcdf_as_is(siff_files, tmp_path):
    t = siff_files["smallest_bright"]
    with xr.open_dataset(t.path, engine="siff", flim=True) as ds:
        with warnings.catch_warnings():  # text as variable-length strings: no warning
            if hasattr(np.dtypes, "StringDType"):  # (NumPy 2)
                warnings.simplefilter("error")
            ds.to_zarr(tmp_path / "out.zarr", zarr_format=3, consolidated=False)
        ds.to_netcdf(tmp_path / "out.nc", engine="h5netcdf")
        loaded = ds.load()
    with xr.open_dataset(t.path, engine="siff", chunks={}) as ds, warnings.catch_warnings():
        if hasattr(np.dtypes, "StringDType"):  # Dask-backed text: no load to find a type
            warnings.simplefilter("error")
        ds.to_zarr(tmp_path / "lazy.zarr", zarr_format=3, consolidated=False)
        ds.to_netcdf(tmp_path / "lazy.nc", engine="h5netcdf")
        with xr.open_zarr(tmp_path / "lazy.zarr", consolidated=False) as z:
            for name in ("channel_name", "source_file"):
                np.testing.assert_array_equal(z[name].values, ds[name].values)
        with xr.open_zarr(tmp_path / "out.zarr", consolidated=False) as z:
            xr.testing.assert_identical(z.load(), loaded)
        with xr.open_dataset(tmp_path / "out.nc", engine="h5netcdf") as n:
            # netCDF stores a length-1 list attribute as a scalar: compare values
            xr.testing.assert_equal(n.load(), loaded)
            assert n.attrs.keys() == loaded.attrs.keys()
            for k, v in loaded.attrs.items():
                np.testing.assert_array_equal(np.atleast_1d(n.attrs[k]), np.atleast_1d(v))
            for k in loaded.variables:
                assert n[k].attrs == loaded[k].attrs


def test_pickle_dataset_and_dask_graph(siff_files):
    import cloudpickle

    t = siff_files["two_chan_slices_flyback"]
    with xr.open_dataset(t.path, engine="siff", chunks={}, flim=True) as ds:
        want = ds.intensity.sum(("y", "x")).values
        back = pickle.loads(pickle.dumps(ds))
        np.testing.assert_array_equal(back.intensity.sum(("y", "x")).values, want)
        graph = cloudpickle.loads(cloudpickle.dumps(ds.mean_arrival.mean(("y", "x")).data))
        np.testing.assert_allclose(graph.compute(),
                                   ds.mean_arrival.mean(("y", "x")).values)
    with xr.open_dataset(t.path, engine="siff") as ds:  # lazy (not dask) variables too
        back = pickle.loads(pickle.dumps(ds))
        xr.testing.assert_identical(back.load(), ds.load())


@pytest.mark.slow
def test_distributed_local_cluster_processes(siff_files):
    distributed = pytest.importorskip("distributed")
    t = siff_files["frames_per_slice"]
    with xr.open_dataset(t.path, engine="siff") as ds:
        eager_sum = ds.intensity.sum(("y", "x")).values
        eager_hist = ds.histogram.sum("tau").values
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client, \
            xr.open_dataset(t.path, engine="siff", chunks={}, chunk_bytes=1) as ds:
        s, hsum = client.compute([ds.intensity.sum(("y", "x")).data,
                                  ds.histogram.sum("tau").data], sync=True)
        np.testing.assert_array_equal(s, eager_sum)
        np.testing.assert_array_equal(hsum, eager_hist)


# ------------------------------------------------------------------ other inputs


def test_file_objects_and_fsspec_urls(siff_files):
    import fsspec

    t = siff_files["partial_volume"]
    with xr.open_dataset(t.path, engine="siff") as ref:
        want = ref.load()
    present = want.source_frame.values >= 0

    def same(ds: xr.Dataset, location: str) -> None:
        # everything equal; source_file names where each frame can be opened again
        xr.testing.assert_equal(ds.drop_vars("source_file"), want.drop_vars("source_file"))
        assert (ds.source_file.values[present] == location).all()
        assert (ds.source_file.values[~present] == "").all()

    assert (want.source_file.values[present] == t.path).all()
    with open(t.path, "rb") as fh, xr.open_dataset(fh, engine="siff") as ds:
        same(ds.load(), "")  # a file object cannot be reopened
    with open(t.path, "rb") as fh:
        data = fh.read()
    with xr.open_dataset(io.BytesIO(data), engine="siff") as ds:
        same(ds.load(), "")
    with fsspec.open("memory://bucket/run.siff", "wb") as out:
        out.write(data)
    with xr.open_dataset("memory://bucket/run.siff", engine="siff") as ds:
        same(ds.load(), "memory://bucket/run.siff")
        back = pickle.loads(pickle.dumps(ds))  # URLs reopen after unpickling
        same(back.load(), "memory://bucket/run.siff")
    with xr.open_dataset("file://" + t.path, engine="siff") as ds:
        xr.testing.assert_equal(ds.load(), want)


def test_reader_errors_name_the_file(tmp_path, siff_files):
    bad = tmp_path / "bad.siff"
    bad.write_bytes(b"II+\x00" + b"\xff" * 60)
    with pytest.raises(SiffFormatError, match=r"bad\.siff"):
        xr.open_dataset(bad, engine="siff")
    t = siff_files["single_compressed"]
    data = bytearray(Path(t.path).read_bytes())
    with SiffFile(t.path) as f:
        off = int(f.index.strip_offset[3]) - 2 * 16 * 12  # count image of frame 3
    data[off : off + 2] = b"\xff\xff"  # its counts no longer match its photons
    broken = tmp_path / "broken.siff"
    broken.write_bytes(bytes(data))
    with xr.open_dataset(broken, engine="siff") as ds:
        _ = ds.intensity.isel(time=0).values  # other frames still read
        with pytest.raises(SiffFormatError, match=r"broken\.siff.*frame 3"):
            _ = ds.intensity.isel(time=3).values
    with pytest.raises(FileNotFoundError):
        xr.open_dataset(tmp_path / "nope.siff", engine="siff")


# ------------------------------------------------------------------ several files


def test_open_acquisition_joins_split_files(tmp_path):
    kw = dict(shape=(8, 6), channels=(1, 2), n_slices=2, n_flyback=1, n_timepoints=6,
              extra_frames=2, events={3: ("a", 0.1), 20: ("b", None)}, seed=5)
    whole = write_siff(tmp_path / "whole.siff", **kw)
    split = write_siff(tmp_path / "run.siff", frames_per_file=7, **kw)  # volumes straddle files
    assert len(split.paths) == 6 and os.path.basename(split.paths[0]) == "run_00001.siff"
    with open_acquisition(str(tmp_path / "run_*.siff")) as acq, \
            xr.open_dataset(whole.path, engine="siff") as one:
        src = ["source_file", "source_frame"]
        xr.testing.assert_equal(acq.drop_attrs().drop_vars(src),
                                one.drop_attrs().drop_vars(src))
        assert acq.attrs["file_frame_offsets"] == [0, 7, 14, 21, 28, 35]
        # each frame names its part and its frame within that part
        f = acq.frame_index.values
        ok = f >= 0
        part = f[ok] // 7
        assert (acq.source_file.values[ok] == np.array(split.paths)[part]).all()
        assert (acq.source_frame.values[ok] == f[ok] - 7 * part).all()
        assert list(acq.event_frame.values) == [3, 20]
    with open_acquisition(split.paths) as acq:
        _ = acq.intensity.isel(time=1).values
        back = pickle.loads(pickle.dumps(acq))
        np.testing.assert_array_equal(back.intensity.values, acq.intensity.values)
    with pytest.warns(siff_xarray.SiffWarning, match="open_acquisition"), \
            xr.open_dataset(split.paths[1], engine="siff"):
        pass  # a later part alone starts mid-volume: say so
    with pytest.raises(FileNotFoundError):
        open_acquisition(str(tmp_path / "none_*.siff"))
    other = write_siff(tmp_path / "other.siff", shape=(8, 6), n_timepoints=1)
    with pytest.raises(ValueError, match="not one acquisition"):
        open_acquisition([split.paths[0], other.path])


def test_open_mfdataset_volume_aligned_files(tmp_path):
    kw = dict(shape=(8, 6), channels=(1, 2), n_slices=2, n_flyback=1, n_timepoints=6, seed=2)
    whole = write_siff(tmp_path / "whole.siff", **kw)
    write_siff(tmp_path / "run.siff", frames_per_file=12, **kw)  # two volumes per file
    with xr.open_mfdataset(str(tmp_path / "run_*.siff"), engine="siff", combine="nested",
                           concat_dim="time") as mf, \
            xr.open_dataset(whole.path, engine="siff") as one:
        np.testing.assert_array_equal(mf.intensity.values, one.intensity.values)
        np.testing.assert_array_equal(mf.histogram.values, one.histogram.values)
        np.testing.assert_allclose(mf.time.values, one.time.values)
        np.testing.assert_array_equal(mf.epoch.values, one.epoch.values)


def test_relative_path_opens_the_same_file_from_another_directory(siff_files, tmp_path,
                                                                  monkeypatch):
    # a Dask worker started in another working directory unpickles the graph there
    t = siff_files["two_chan_slices_flyback"]
    here = Path(t.path).parent
    monkeypatch.chdir(here)
    rel = os.path.basename(t.path)
    with xr.open_dataset(rel, engine="siff", chunks={}) as ds:
        assert ds.attrs["source_file"] == str(here / rel)
        assert ds.intensity.encoding["source"] == str(here / rel)
        blob = pickle.dumps(ds.intensity.sum(("y", "x")))
        want = ds.intensity.sum(("y", "x")).compute()
    elsewhere = tmp_path / "worker-cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    got = pickle.loads(blob).compute(scheduler="sync")
    xr.testing.assert_identical(got, want)


def test_load_async_gives_the_same_values(siff_files):
    import asyncio

    if not hasattr(xr.Dataset, "load_async"):
        pytest.skip("this xarray has no load_async")
    t = siff_files["two_chan_slices_flyback"]

    async def both(a, b):
        return await asyncio.gather(a.load_async(), b.load_async())

    with xr.open_dataset(t.path, engine="siff") as ds, \
            xr.open_dataset(t.path, engine="siff") as eager:
        sub = ds.isel(time=slice(1, 3))
        got_all, got_sub = asyncio.run(both(ds.copy(), sub.copy()))
        want = eager.load()
        xr.testing.assert_identical(got_all, want)
        xr.testing.assert_identical(got_sub, want.isel(time=slice(1, 3)))


def test_open_datatree_and_groups(siff_files):
    t = siff_files["two_chan_slices_flyback"]
    with xr.open_dataset(t.path, engine="siff") as ds:
        want = ds.load()
    with xr.open_datatree(t.path, engine="siff") as tree:
        xr.testing.assert_identical(tree.to_dataset().load(), want)
    groups = xr.open_groups(t.path, engine="siff")
    assert list(groups) == ["/"]
    xr.testing.assert_identical(groups["/"].load(), want)
    groups["/"].close()


@pytest.mark.parametrize("var", ["intensity", "photon_count", "histogram"])
def test_kept_partial_volume_reads_like_numpy(siff_files, var):
    """Eager reads of a kept partial volume (decoded in place or through a copy) agree."""
    t = siff_files["partial_volume"]
    given_out: list[bool] = []
    read_frames = SiffFile.read_frames

    def recording(self, frames=None, shifts=None, out=None):
        given_out.append(out is not None)
        return read_frames(self, frames, shifts, out=out)

    with xr.open_dataset(t.path, engine="siff", partial_volume="keep") as ds:
        if var == "intensity":  # the full read decodes into the result, not a temporary
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(SiffFile, "read_frames", recording)
                full = ds[var].values
            assert given_out == [True]
        else:
            full = ds[var].values
        assert not ds.frame_present.values.all()
        keys = [{"channel": 1}, {"time": slice(None, None, -1)}, {"z": [1, 0], "time": [2, 3]},
                {"time": 3}, {"y": slice(2, 5)} if var == "intensity" else {"time": [3, 0]}]
        for key in keys:
            want = xr.DataArray(full, dims=ds[var].dims).isel(key).values
            np.testing.assert_array_equal(ds[var].isel(key).values, want, err_msg=str(key))
