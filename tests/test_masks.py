"""ds.siff.sum_mask / sum_masks: kernel and xarray paths against numpy and corrosiffpy."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from conftest import open_corrosiff

from siff_xarray import store as zs
from siff_xarray.synthetic import write_siff


def _brute(ds, m, is_3d):
    """numpy: photons inside each mask from the (registered) intensity."""
    inten = (ds.siff.apply_shifts() if "shift_y" in ds else ds).intensity.values.astype(
        np.int64)  # (t, z, [r], c, y, x)
    if is_3d:  # (M, z, y, x): each plane its own mask, then sum over z
        zaxis = 1
        inten = np.moveaxis(inten, zaxis, -3)  # (t, [r], c, z, y, x)
        return np.einsum("...zyx,mzyx->m...", inten, m.astype(np.int64))
    return np.einsum("...yx,myx->m...", inten, m[:, 0].astype(np.int64))


@pytest.mark.parametrize("name", ["two_chan_slices_flyback", "frames_per_slice",
                                  "partial_volume"])
def test_sum_masks_paths_agree_with_numpy(siff_files, rng, name):
    t = siff_files[name]
    with xr.open_dataset(t.path, engine="siff") as ds:
        h, w, nz = ds.sizes["y"], ds.sizes["x"], ds.sizes["z"]
        masks = rng.random((4, h, w)) > 0.6
        k = ds.siff.sum_masks(masks, method="kernel")
        x = ds.siff.sum_masks(masks, method="xarray")
        assert k.dims[:3] == ("roi", "time", "z") and "channel" in k.dims
        np.testing.assert_array_equal(k.values, x.values)
        np.testing.assert_array_equal(k.values, _brute(ds, masks[:, None], False))
        m3 = rng.random((3, nz, h, w)) > 0.5
        k3 = ds.siff.sum_masks(m3, method="kernel")
        assert "z" not in k3.dims
        np.testing.assert_array_equal(k3.values, ds.siff.sum_masks(m3, method="xarray").values)
        np.testing.assert_array_equal(k3.values, _brute(ds, m3, True))
        one = ds.siff.sum_mask(masks[0], channel=int(ds.channel[0]))
        assert "roi" not in one.dims and "channel" not in one.dims
        np.testing.assert_array_equal(one.values, k.isel(roi=0).sel(channel=ds.channel[0]))


def test_label_images_and_dataarrays(siff_files):
    t = siff_files["two_chan_slices_flyback"]
    with xr.open_dataset(t.path, engine="siff") as ds:
        h, w = ds.sizes["y"], ds.sizes["x"]
        labels = np.zeros((h, w), dtype=np.int32)
        labels[:4, :5] = 7
        labels[6:, 3:] = 2
        out = ds.siff.sum_masks(labels)
        assert list(out.roi.values) == [2, 7]
        np.testing.assert_array_equal(out.sel(roi=7).values,
                                      ds.siff.sum_mask(labels == 7).values)
        da = xr.DataArray(np.stack([labels == 2, labels == 7]), dims=("roi", "y", "x"),
                          coords={"roi": ["b", "a"]})
        named = ds.siff.sum_masks(da)
        assert list(named.roi.values) == ["b", "a"]
        np.testing.assert_array_equal(named.values, out.values)
        with pytest.raises(ValueError, match="do not fit"):
            ds.siff.sum_masks(np.ones((3, 2, 2), bool))


def test_sum_masks_with_shifts_equals_corrosiff(siff_files, rng):
    t = siff_files["two_chan_slices_flyback"]
    with xr.open_dataset(t.path, engine="siff") as ds:
        h, w = ds.sizes["y"], ds.sizes["x"]
        shifts = xr.Dataset({
            "shift_y": (("time", "z"), rng.integers(0, h, (ds.sizes["time"], ds.sizes["z"]))),
            "shift_x": (("time", "z"), rng.integers(0, w, (ds.sizes["time"], ds.sizes["z"]))),
        })
        reg = ds.assign(shift_y=shifts.shift_y, shift_x=shifts.shift_x)
        masks = rng.random((3, h, w)) > 0.5
        k = reg.siff.sum_masks(masks, method="kernel")
        np.testing.assert_array_equal(k.values, reg.siff.sum_masks(masks, method="xarray"))
        np.testing.assert_array_equal(k.values, _brute(reg, masks[:, None], False))
        # corrosiffpy, same frames and the same (non-negative) shifts
        c = open_corrosiff(t.path)
        frames = ds.frame_index.values.reshape(-1)
        sy = np.broadcast_to(shifts.shift_y.values[..., None], ds.frame_index.shape).ravel()
        sx = np.broadcast_to(shifts.shift_x.values[..., None], ds.frame_index.shape).ravel()
        reg_dict = {int(f): (int(a), int(b)) for f, a, b in zip(frames, sy, sx, strict=True)}
        theirs = c.sum_rois(masks, frames=frames.tolist(), registration=reg_dict)
        np.testing.assert_array_equal(k.values.reshape(3, -1), theirs)


@pytest.mark.filterwarnings("ignore:The specified chunks separate the stored chunks")
def test_photon_reductions_on_a_converted_store(siff_files, tmp_path, rng):
    t = siff_files["two_chan_slices_flyback"]
    zs.convert(t.path, tmp_path / "m.zarr")
    with zs.open_converted(tmp_path / "m.zarr") as z, \
            xr.open_dataset(t.path, engine="siff") as ds:
        h, w = ds.sizes["y"], ds.sizes["x"]
        masks = rng.random((2, h, w)) > 0.5
        labels3d = rng.integers(0, 3, (ds.sizes["z"], h, w))
        sh = xr.Dataset({"shift_y": (("time", "z"), rng.integers(-3, 4, (ds.sizes["time"],
                                                                        ds.sizes["z"]))),
                         "shift_x": (("time", "z"), rng.integers(-3, 4, (ds.sizes["time"],
                                                                        ds.sizes["z"])))})
        pairs = [(z, ds), (z.siff.apply_shifts(sh), ds.siff.apply_shifts(sh))]
        for a, b in pairs:  # store vs .siff, unregistered and registered
            for m in (masks, labels3d):
                xr.testing.assert_identical(a.siff.sum_masks(m, method="kernel"),
                                            b.siff.sum_masks(m))
                xr.testing.assert_identical(a.siff.histogram(m), b.siff.histogram(m))
                xr.testing.assert_identical(a.siff.lifetime(m, offset=1.0),
                                            b.siff.lifetime(m, offset=1.0))
                # raw-encoded frames sum cosines in photon order, the store in pixel order
                xr.testing.assert_allclose(a.siff.phasor(m), b.siff.phasor(m), rtol=1e-12)
            xr.testing.assert_identical(a.siff.lifetime(), b.siff.lifetime())
            xr.testing.assert_allclose(a.siff.phasor(harmonic=2), b.siff.phasor(harmonic=2),
                                       rtol=1e-12)
            np.testing.assert_array_equal(a.siff.sum_masks(masks).values,
                                          b.siff.sum_masks(masks).values)
        np.testing.assert_array_equal(z.siff.histogram().values, ds.histogram.values)
    # Dask-backed Datasets give lazy results, one task per time chunk, equal to eager ones
    with zs.open_converted(tmp_path / "m.zarr", chunks={"time": 2}) as lz, \
            xr.open_dataset(t.path, engine="siff", chunks={}) as dds:
        for lazy_ds in (lz, dds):
            lazy = [lazy_ds.siff.sum_masks(masks, method="kernel"),
                    lazy_ds.siff.histogram(masks), lazy_ds.siff.lifetime(masks),
                    lazy_ds.siff.lifetime(), lazy_ds.siff.phasor(masks).photons]
            assert all(x.chunks is not None for x in lazy)
            eager = [ds.siff.sum_masks(masks), ds.siff.histogram(masks),
                     ds.siff.lifetime(masks), ds.siff.lifetime(), ds.siff.phasor(masks).photons]
            for x, y in zip(lazy, eager, strict=True):
                xr.testing.assert_identical(x.compute(), y)
    # a Dataset with neither a .siff nor a store behind it says so
    plain = ds.load().copy().drop_vars(["source_file", "source_frame"])
    plain.encoding = {}
    plain.intensity.encoding = {}
    with pytest.raises(ValueError, match="converted store"):
        plain.siff.lifetime(masks)
    with pytest.raises(ValueError, match="converted store"):
        plain.siff.sum_masks(masks, method="kernel")


def test_histogram_and_lifetime_per_roi(siff_files, rng):
    t = siff_files["two_chan_slices_flyback"]
    with xr.open_dataset(t.path, engine="siff") as ds:
        h, w = ds.sizes["y"], ds.sizes["x"]
        whole = ds.siff.histogram()
        np.testing.assert_array_equal(whole.values, ds.histogram.values)
        assert whole.dims[-1] == "tau"
        assert whole.attrs["frequency"] == pytest.approx(1000 / ds.attrs["laser_period_ns"])
        masks = rng.random((2, h, w)) > 0.5
        hist = ds.siff.histogram(masks)
        assert hist.dims == ("roi", "time", "z", "channel", "tau")
        life = ds.siff.lifetime(masks, offset=0.5)
        bin_ns = t.bin_width_ps / 1000
        fmap = ds.frame_index.values
        for idx in [(0, 0, 0), (2, 1, 1), (4, 2, 0)]:
            fr = fmap[idx]
            pix, tau = t.photons(fr)
            for r in range(2):
                inside = masks[r].ravel()[pix]
                want = np.bincount(tau[inside & (tau < t.tau_bins)], minlength=t.tau_bins)
                np.testing.assert_array_equal(hist.values[(r, *idx)], want)
                np.testing.assert_allclose(life.values[(r, *idx)],
                                           tau[inside].mean() * bin_ns - 0.5)
        ones = ds.siff.histogram(np.ones((1, h, w), bool)).isel(roi=0)
        np.testing.assert_array_equal(ones.values, ds.histogram.values)
        per_pixel = ds.siff.lifetime()
        assert per_pixel.dims == ("time", "z", "channel", "y", "x")
        from siff_xarray import SiffFile

        with SiffFile(t.path) as f:
            want = f.lifetime_images(fmap.ravel(), units="ns", dtype=np.float32)
        np.testing.assert_allclose(per_pixel.values.reshape(want.shape), want, equal_nan=True)


def test_phasor_matches_phasorpy_and_calibrates(tmp_path, rng):
    phasorpy = pytest.importorskip("phasorpy.phasor")
    kw = dict(shape=(16, 16), n_timepoints=4, photons_per_frame=20000, fractions=(1.0,),
              irf_offset_ns=1.2, irf_sigma_ns=0.1, encoding="mixed")
    sample = write_siff(tmp_path / "sample.siff", lifetimes_ns=(2.0,), seed=1, **kw)
    ref = write_siff(tmp_path / "ref.siff", lifetimes_ns=(4.0,), seed=2, **kw)
    with xr.open_dataset(sample.path, engine="siff") as ds, \
            xr.open_dataset(ref.path, engine="siff") as rds:
        masks = rng.random((2, 16, 16)) > 0.5
        ph = ds.siff.phasor(masks)
        hist = ds.siff.histogram(masks)
        _, g, s = phasorpy.phasor_from_signal(hist.values, axis=-1)
        np.testing.assert_allclose(ph.g.values, g, atol=1e-12)
        np.testing.assert_allclose(ph.s.values, s, atol=1e-12)
        np.testing.assert_array_equal(ph.photons.values, hist.sum("tau").values)
        pix = ds.siff.phasor()
        assert pix.g.dims == ("time", "z", "channel", "y", "x")
        # pooled over the whole file, a pixel-wide mask
        whole = np.ones((1, 16, 16), bool)
        r = rds.siff.phasor(whole)
        cal = ds.siff.phasor(whole, reference=(r.g, r.s), reference_lifetime=4.0)
        f_ghz = cal.g.attrs["frequency"] / 1000
        wt = 2 * np.pi * f_ghz * 2.0
        assert float(cal.g.mean()) == pytest.approx(1 / (1 + wt**2), abs=0.02)
        assert float(cal.s.mean()) == pytest.approx(wt / (1 + wt**2), abs=0.02)
        raw = ds.siff.phasor(whole)  # uncalibrated: the IRF delay rotates it far away
        assert abs(float(raw.g.mean()) - 1 / (1 + wt**2)) > 0.1


def test_split_acquisitions_reduce_each_part_s_photons(tmp_path, rng):
    from siff_xarray import open_acquisition

    kw = dict(shape=(8, 6), channels=(1, 2), n_slices=2, n_flyback=1, n_timepoints=5,
              seed=4, photons_per_frame=300)
    whole = write_siff(tmp_path / "whole.siff", **kw)
    split = write_siff(tmp_path / "run.siff", frames_per_file=7, **kw)
    masks = rng.random((2, 8, 6)) > 0.5
    with open_acquisition(split.paths) as acq, xr.open_dataset(whole.path,
                                                               engine="siff") as one:
        # frame_index counts across the parts; source_file/source_frame name each part
        for method in ("kernel", "xarray"):
            np.testing.assert_array_equal(acq.siff.sum_masks(masks, method=method).values,
                                          one.siff.sum_masks(masks).values)
        np.testing.assert_array_equal(acq.siff.lifetime(masks).values,
                                      one.siff.lifetime(masks).values)
        np.testing.assert_array_equal(acq.siff.histogram(masks).values,
                                      one.siff.histogram(masks).values)
        np.testing.assert_array_equal(acq.siff.lifetime().values, one.siff.lifetime().values)
        a = acq.siff.arrival_times(time=3, z=1, channel=1)
        xr.testing.assert_identical(a.drop_attrs(),
                                    one.siff.arrival_times(time=3, z=1, channel=1).drop_attrs())
        with pytest.raises(ValueError, match="ambiguous"):
            acq.siff.arrival_times(3)


def test_arrival_times_from_siff_and_store(siff_files, tmp_path):
    t = siff_files["two_chan_slices_flyback"]
    zs.convert(t.path, tmp_path / "a.zarr")
    with zs.open_converted(tmp_path / "a.zarr") as z, \
            xr.open_dataset(t.path, engine="siff") as ds:
        fr = int(ds.frame_index.isel(time=1, z=1, channel=0))
        a = ds.siff.arrival_times(time=1, z=1, channel=0)
        xr.testing.assert_identical(a, z.siff.arrival_times(time=1, z=1, channel=0))
        xr.testing.assert_identical(a, ds.siff.arrival_times(fr))
        assert a.attrs["frame"] == fr
        # the photons rebuild the frame's count image
        img = np.zeros((ds.sizes["y"], ds.sizes["x"]), np.int64)
        np.add.at(img, (a.y.values, a.x.values), 1)
        np.testing.assert_array_equal(img, ds.intensity.isel(time=1, z=1, channel=0).values)
        # with shifts, photons move with their pixel
        sh = xr.Dataset({"shift_y": (("time", "z"), np.full((ds.sizes["time"], 3), -2)),
                         "shift_x": (("time", "z"), np.full((ds.sizes["time"], 3), 5))})
        moved = ds.siff.apply_shifts(sh)
        b = moved.siff.arrival_times(time=1, z=1, channel=0)
        img2 = np.zeros_like(img)
        np.add.at(img2, (b.y.values, b.x.values), 1)
        np.testing.assert_array_equal(img2, moved.intensity.isel(time=1, z=1, channel=0))
        with pytest.raises(ValueError, match="not one"):
            ds.siff.arrival_times(time=1)
        with pytest.raises(ValueError, match="not both"):
            ds.siff.arrival_times(3, time=1)


def test_photon_reductions_on_one_timepoint_and_without_attrs(siff_files, rng):
    t = siff_files["two_chan_slices_flyback"]
    with xr.open_dataset(t.path, engine="siff") as ds:
        masks = rng.random((2, ds.sizes["y"], ds.sizes["x"])) > 0.5
        full = ds.siff.lifetime(masks)
        one = ds.isel(time=2).siff.lifetime(masks)
        assert "time" not in one.dims
        xr.testing.assert_identical(one, full.isel(time=2))
        bare = ds.copy()
        bare.attrs = {k: v for k, v in ds.attrs.items() if k != "tau_bin_ps"}
        xr.testing.assert_allclose(bare.siff.lifetime(masks), full)


def test_more_mask_sets_than_uint16_ids(tmp_path, rng):
    """Over 65536 distinct mask combinations switch the set ids to uint32; sums stay exact."""
    from siff_xarray import SiffFile
    from siff_xarray.reader.reductions import _mask_sets

    t = write_siff(tmp_path / "wide.siff", shape=(320, 256), n_timepoints=2,
                   photons_per_frame=50_000, encoding="mixed", seed=3)
    masks = rng.random((20, 320, 256)) > 0.5
    setid, set_ptr, _ = _mask_sets(masks[:, None])
    assert len(set_ptr) - 1 > 1 << 16 and setid.dtype == np.uint32
    assert _mask_sets(masks[:3, None])[0].dtype == np.uint16
    inten = t.intensity().astype(np.int64)
    want = np.einsum("fyx,myx->mf", inten, masks.astype(np.int64))
    with SiffFile(t.path) as f:
        np.testing.assert_array_equal(f.sum_masks(masks), want)
        tsum, cnt = f.sum_masks_flim(masks)
        np.testing.assert_array_equal(cnt, want)
        for i in range(2):
            pix, tau = t.photons(i)
            np.testing.assert_array_equal(
                tsum[:, i], masks.reshape(20, -1)[:, pix].astype(np.int64) @ tau)
        np.testing.assert_array_equal(f.masks_histograms(masks, mode="wrap").sum(axis=-1), want)
