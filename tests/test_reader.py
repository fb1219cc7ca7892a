"""SiffFile outputs against the synthetic ground truth and against corrosiffpy."""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import open_corrosiff as _corrosiff

from siff_xarray import SiffFile, SiffFormatError
from siff_xarray.synthetic import write_siff


def _all(t):
    return list(range(t.n_frames))


def test_frames_match_truth_and_corrosiff(truth):
    with SiffFile(truth.path) as f:
        assert f.num_frames == truth.n_frames
        assert f.frame_shape == truth.shape
        assert list(f.frame_encodings) == list(truth.encodings)
        got = f.read_frames()
        assert got.dtype == np.uint16
        np.testing.assert_array_equal(got, truth.intensity())
        c = _corrosiff(truth.path) if f.header.bigtiff else None
        if c is not None:  # corrosiff cannot read classic TIFF (it panics)
            np.testing.assert_array_equal(got, c.get_frames(_all(truth)))


def test_frame_selection_order_and_negative(truth, rng):
    with SiffFile(truth.path) as f:
        frames = rng.permutation(truth.n_frames)[:7]
        np.testing.assert_array_equal(f.read_frames(frames), truth.intensity(frames))
        np.testing.assert_array_equal(f.read_frames([-1]), truth.intensity([truth.n_frames - 1]))
        assert f.read_frames([]).shape == (0, *truth.shape)
        with pytest.raises(IndexError, match="out of range"):
            f.read_frames([truth.n_frames])


def _random_shifts(truth, rng, kind: str) -> dict[int, tuple[int, int]]:
    """One (dy, dx) per frame: all positive, all negative, or up to 5 frame sizes either way."""
    h, w = truth.shape
    lo, hi = {"positive": (0, max(h, w)), "negative": (-max(h, w), 0),
              "large": (-5 * max(h, w), 5 * max(h, w))}[kind]
    return {i: (int(rng.integers(lo, hi)), int(rng.integers(lo, hi)))
            for i in range(truth.n_frames)}


@pytest.mark.parametrize("kind", ["positive", "negative", "large"])
def test_shifts_are_numpy_roll(truth, rng, kind):
    shifts = _random_shifts(truth, rng, kind)
    with SiffFile(truth.path) as f:
        got = f.read_frames(shifts=shifts)
    raw = truth.intensity()
    want = np.stack([np.roll(raw[i], shifts[i], axis=(0, 1)) for i in range(truth.n_frames)])
    np.testing.assert_array_equal(got, want)


def test_shift_array_and_missing_shift(siff_files):
    t = siff_files["single_raw"]
    with SiffFile(t.path) as f:
        arr = np.tile([[-1, 3]], (3, 1))
        np.testing.assert_array_equal(f.read_frames([0, 1, 2], shifts=arr),
                                      np.roll(t.intensity([0, 1, 2]), (-1, 3), axis=(1, 2)))
        with pytest.raises(ValueError, match="no shift given for frame"):
            f.read_frames([0, 1], shifts={0: (1, 1)})
        with pytest.raises(ValueError, match="shifts must be"):
            f.read_frames([0, 1], shifts=np.zeros((3, 2), int))


def test_corrosiff_registration_positive_shifts(siff_files, rng):
    t = siff_files["two_chan_slices_flyback"]
    h, w = t.shape
    shifts = {i: (int(rng.integers(0, h)), int(rng.integers(0, w))) for i in range(t.n_frames)}
    with SiffFile(t.path) as f:
        c = _corrosiff(t.path)
        np.testing.assert_array_equal(f.read_frames(shifts=shifts),
                                      c.get_frames(_all(t), registration=shifts))
        masks = rng.random((3, h, w)) > 0.5
        np.testing.assert_array_equal(f.sum_masks(masks, shifts=shifts),
                                      c.sum_rois(masks, frames=_all(t), registration=shifts))


def test_histograms(truth):
    with SiffFile(truth.path) as f:
        if not f.header.bigtiff:
            pytest.skip("corrosiff cannot read classic TIFF")
        h = f.histograms()
        assert h.shape == (truth.n_frames, truth.tau_bins)
        for i in range(truth.n_frames):
            np.testing.assert_array_equal(
                h[i], np.bincount(truth.photons(i)[1], minlength=truth.tau_bins))
        c = _corrosiff(truth.path)
        np.testing.assert_array_equal(f.histograms(mode="corrosiff"),
                                      c.get_histogram_by_frames(_all(truth)))


def test_histogram_overflow_modes(tmp_path):
    t = write_siff(tmp_path / "o.siff", shape=(8, 8), n_timepoints=4, tau_bins=50,
                   overflow_fraction=0.3, encoding="mixed", photons_per_frame=300)
    with SiffFile(t.path) as f:
        drop, over = f.histograms(return_overflow=True)
        clip = f.histograms(mode="clip")
        wrap = f.histograms(mode="wrap")
        corr = f.histograms(mode="corrosiff")
        c = _corrosiff(t.path)
        np.testing.assert_array_equal(corr, c.get_histogram_by_frames(list(range(t.n_frames))))
    assert over.sum() > 0
    for i in range(t.n_frames):
        tau = t.photons(i)[1].astype(np.int64)
        np.testing.assert_array_equal(drop[i], np.bincount(tau[tau < 50], minlength=50))
        assert over[i] == (tau >= 50).sum()
        np.testing.assert_array_equal(clip[i], np.bincount(np.minimum(tau, 49), minlength=50))
        np.testing.assert_array_equal(wrap[i], np.bincount(tau % 50, minlength=50))
        assert corr.shape[1] == 52
        np.testing.assert_array_equal(corr[i], np.bincount(tau % 52, minlength=52))
    with pytest.raises(ValueError, match="mode must be"):
        SiffFile(t.path).histograms(mode="nope")


def test_sum_masks_2d_and_stacks(truth, rng):
    h, w = truth.shape
    masks = rng.random((4, h, w)) > 0.6
    raw = truth.intensity().astype(np.int64)
    want = np.einsum("fyx,myx->mf", raw, masks)
    with SiffFile(truth.path) as f:
        np.testing.assert_array_equal(f.sum_masks(masks), want)
        np.testing.assert_array_equal(f.sum_masks(list(masks)), want)
        np.testing.assert_array_equal(f.sum_mask(masks[1]), want[1])
        if f.header.bigtiff:
            c = _corrosiff(truth.path)
            np.testing.assert_array_equal(f.sum_masks(masks), c.sum_rois(masks, _all(truth)))
            np.testing.assert_array_equal(f.sum_mask(masks[0]), c.sum_roi(masks[0],
                                                                           frames=_all(truth)))
        with pytest.raises(ValueError, match="does not match the frame shape"):
            f.sum_masks(np.ones((2, h + 1, w), bool))


def test_sum_masks_3d_plane_by_slice(siff_files, rng):
    t = siff_files["two_chan_slices_flyback"]
    h, w = t.shape
    with SiffFile(t.path) as f:
        ip = f.im_params
        masks = rng.random((2, ip.num_slices, h, w)) > 0.5
        frames = rng.permutation(ip.all_frames)[:20]  # shuffled: plane must follow z, not order
        pos = ip.locate(frames)
        raw = t.intensity(frames).astype(np.int64)
        want = np.array([[(raw[i] * masks[m, pos["slice"][i]]).sum() for i in range(len(frames))]
                         for m in range(2)])
        np.testing.assert_array_equal(f.sum_masks(masks, frames), want)
        np.testing.assert_array_equal(f.sum_mask(masks[0], frames), want[0])
        with pytest.raises(ValueError, match="flyback"):
            f.sum_masks(masks, ip.flyback_frames[:1])
        with pytest.raises(ValueError, match="planes"):
            f.sum_masks(masks[:, :2], frames)


def test_lifetime_and_phasor_images(truth):
    h, w = truth.shape
    with SiffFile(truth.path) as f:
        if f.frame_encodings[0] == "tiff":
            pytest.skip("intensity-only")
        mean, inten = f.lifetime_images(units="bins", return_intensity=True)
        g, s = f.phasor_images(harmonic=2)
        ns = f.lifetime_images(dtype=np.float32)
        assert ns.dtype == np.float32
        for i in range(truth.n_frames):
            pix, tau = truth.photons(i)
            cnt = np.bincount(pix, minlength=h * w)
            tsum = np.bincount(pix, weights=tau, minlength=h * w)
            with np.errstate(invalid="ignore"):
                np.testing.assert_allclose(mean[i].ravel(), tsum / cnt, equal_nan=True)
                ang = 2 * np.pi * 2 * (tau % truth.tau_bins) / truth.tau_bins
                np.testing.assert_allclose(
                    g[i].ravel(), np.bincount(pix, np.cos(ang), h * w) / cnt, equal_nan=True,
                    atol=1e-12)
                np.testing.assert_allclose(
                    s[i].ravel(), np.bincount(pix, np.sin(ang), h * w) / cnt, equal_nan=True,
                    atol=1e-12)
            np.testing.assert_array_equal(inten[i].ravel(), cnt)
        np.testing.assert_allclose(ns, mean * truth.bin_width_ps / 1000, rtol=1e-6)
        if f.header.bigtiff:
            c = _corrosiff(truth.path)
            lc, _ic, _ = c.flim_map(None, _all(truth))
            np.testing.assert_allclose(mean, lc, equal_nan=True)
            pc = c.flim_map(None, _all(truth), flim_method="phasor")[0]
            g1, s1 = f.phasor_images(period_bins=truth.tau_bins + 2)
            np.testing.assert_allclose(g1, pc.real, equal_nan=True, atol=1e-12)
            np.testing.assert_allclose(s1, pc.imag, equal_nan=True, atol=1e-12)


@pytest.mark.parametrize("kind", ["positive", "negative", "large"])
def test_pixel_images_with_shifts_are_numpy_roll(truth, rng, kind):
    """Mean-only (the fast path), mean + counts and phasor images all move like numpy.roll."""
    shifts = _random_shifts(truth, rng, kind)
    h, w = truth.shape
    with SiffFile(truth.path) as f:
        if f.frame_encodings[0] == "tiff":
            pytest.skip("intensity-only")
        mean = f.lifetime_images(units="bins", shifts=shifts)
        mean2, cnt = f.lifetime_images(units="bins", shifts=shifts, return_intensity=True)
        g, s = f.phasor_images(shifts=shifts)
    for i in range(truth.n_frames):
        pix, tau = truth.photons(i)
        n = np.bincount(pix, minlength=h * w).reshape(h, w)
        tsum = np.bincount(pix, weights=tau, minlength=h * w).reshape(h, w)
        ang = 2 * np.pi * (tau % truth.tau_bins) / truth.tau_bins
        gs = np.bincount(pix, np.cos(ang), h * w).reshape(h, w)
        with np.errstate(invalid="ignore"):
            want = np.roll(tsum / n, shifts[i], axis=(0, 1))
            want_g = np.roll(gs / n, shifts[i], axis=(0, 1))
        np.testing.assert_array_equal(mean[i], want)
        np.testing.assert_array_equal(mean2[i], want)
        np.testing.assert_array_equal(cnt[i], np.roll(n, shifts[i], axis=(0, 1)))
        np.testing.assert_allclose(g[i], want_g, atol=1e-12)
        assert np.array_equal(np.isnan(s[i]), np.isnan(want_g))


def test_mask_flim_and_phasor(truth, rng):
    h, w = truth.shape
    masks = rng.random((3, h, w)) > 0.5
    shifts = {i: (int(rng.integers(0, h)), int(rng.integers(0, w))) for i in range(truth.n_frames)}
    with SiffFile(truth.path) as f:
        if f.frame_encodings[0] == "tiff":
            pytest.skip("intensity-only")
        tsum, cnt = f.sum_masks_flim(masks, shifts=shifts)
        g, s, cnt2 = f.masks_phasor(masks, shifts=shifts)
        np.testing.assert_array_equal(cnt, cnt2)
        for i in range(truth.n_frames):
            pix, tau = truth.photons(i)
            y, x = pix // w, pix % w
            q = ((y + shifts[i][0]) % h) * w + (x + shifts[i][1]) % w
            for m in range(3):
                inside = masks[m].ravel()[q]
                assert cnt[m, i] == inside.sum()
                assert tsum[m, i] == tau[inside].astype(np.int64).sum()
                if inside.any():
                    ang = 2 * np.pi * (tau[inside] % truth.tau_bins) / truth.tau_bins
                    assert g[m, i] == pytest.approx(np.cos(ang).mean())
                    assert s[m, i] == pytest.approx(np.sin(ang).mean())
        if f.header.bigtiff:
            c = _corrosiff(truth.path)
            lc, ic, _ = c.sum_rois_flim(masks, None, _all(truth), registration=shifts)
            np.testing.assert_array_equal(ic, cnt)
            with np.errstate(invalid="ignore"):
                np.testing.assert_allclose(tsum / cnt, lc, equal_nan=True)


def test_photons_pixel_sorted(truth):
    with SiffFile(truth.path) as f:
        if f.frame_encodings[0] == "tiff":
            with pytest.raises(SiffFormatError, match="plain TIFF page"):
                f.photons(0)
            return
        starts, pix, tau = f.photons_batch()
        np.testing.assert_array_equal(starts, truth.photon_starts)
        np.testing.assert_array_equal(pix, truth.pixel_index)
        np.testing.assert_array_equal(tau, truth.arrival)
        p1, _t1 = f.photons(truth.n_frames - 1)
        np.testing.assert_array_equal(p1, truth.photons(truth.n_frames - 1)[0])
        assert np.all(np.diff(p1.astype(np.int64)) >= 0)


def test_timestamps_exact(truth):
    with SiffFile(truth.path) as f:
        ts = f.timestamps()
    np.testing.assert_array_equal(ts.experiment_s, np.round(truth.frame_time_s, 6))
    assert ts.epoch_laser_ns.dtype == np.int64
    np.testing.assert_array_equal(ts.epoch_laser_ns, truth.epoch_laser_ns)
    np.testing.assert_array_equal(ts.epoch_system_ns, truth.epoch_system_ns)
    assert ts.epoch_laser.dtype == np.dtype("datetime64[ns]")
    assert [(e.frame, e.text) for e in ts.events] == [(e[0], e[1]) for e in truth.events]
    np.testing.assert_array_equal([e.time_s for e in ts.events], [e[2] for e in truth.events])
    if truth.path.endswith("smallest_bright.siff"):
        c = _corrosiff(truth.path)
        np.testing.assert_array_equal(ts.epoch_laser_ns.astype(np.uint64),
                                      c.get_epoch_timestamps_laser(_all(truth)))
        np.testing.assert_array_equal(ts.experiment_s, c.get_experiment_timestamps(_all(truth)))
        # corrosiff drops the event without a timestamp; we keep it with NaN
        assert [e[:2] for e in c.get_appended_text()] == [(2, "odour A")]
        assert np.isnan(ts.events[1].time_s)


def test_frame_metadata(siff_files):
    t = siff_files["smallest_bright"]
    with SiffFile(t.path) as f:
        md = f.frame_metadata([2, 3])
    assert md[0]["frameNumbers"] == 2
    assert md[0]["epoch"] == t.epoch_laser_ns[2]
    assert md[0]["Appended text"] == "odour A"
    assert md[1]["acqTriggerTimestamps_sec"] is None


def test_file_object_path_matches_mmap(siff_files, rng):
    import io

    t = siff_files["two_chan_slices_flyback"]
    with open(t.path, "rb") as fh:
        data = fh.read()
    h, w = t.shape
    masks = rng.random((2, h, w)) > 0.5
    with SiffFile(t.path) as a, SiffFile(io.BytesIO(data)) as b:
        assert a.is_local and not b.is_local
        frames = [5, 0, 17, 3]
        np.testing.assert_array_equal(a.read_frames(frames), b.read_frames(frames))
        np.testing.assert_array_equal(a.histograms(frames), b.histograms(frames))
        np.testing.assert_array_equal(a.sum_masks(masks, frames), b.sum_masks(masks, frames))
        np.testing.assert_array_equal(a.photons_batch(frames)[2], b.photons_batch(frames)[2])
        np.testing.assert_array_equal(a.timestamps(frames).epoch_laser_ns,
                                      b.timestamps(frames).epoch_laser_ns)
        np.testing.assert_allclose(a.lifetime_images(frames), b.lifetime_images(frames),
                                   equal_nan=True)


def test_fsspec_memory_url(siff_files):
    import fsspec

    t = siff_files["single_compressed"]
    fs = fsspec.filesystem("memory")
    with open(t.path, "rb") as fh:
        fs.pipe("/data/run.siff", fh.read())
    with SiffFile("memory://data/run.siff") as f:
        np.testing.assert_array_equal(f.read_frames(), t.intensity())
        assert "memory://" in f.name


def test_pickle_reopens(siff_files):
    import pickle

    t = siff_files["single_raw"]
    f = SiffFile(t.path)
    g = pickle.loads(pickle.dumps(f))
    np.testing.assert_array_equal(g.read_frames(), f.read_frames())
    f.close()
    g.close()


def test_parallel_threads_agree(siff_files):
    from concurrent.futures import ThreadPoolExecutor

    t = siff_files["smallest_bright"]
    with SiffFile(t.path) as f:
        want = f.read_frames()
        with ThreadPoolExecutor(4) as ex:
            outs = list(ex.map(lambda _: f.read_frames(), range(8)))
    for o in outs:
        np.testing.assert_array_equal(o, want)


def test_intensity_tiff_file(tmp_path):
    t = write_siff(tmp_path / "si.tif", shape=(10, 12), n_timepoints=3, format="tiff",
                   channels=(1, 2))
    with SiffFile(t.path) as f:
        assert not f.has_photons
        np.testing.assert_array_equal(f.read_frames(), t.intensity())
        assert f.im_params.num_colors == 2
        with pytest.raises(SiffFormatError, match="plain TIFF"):
            f.histograms()


def test_read_ranges_coalesces_and_keeps_order(siff_files):
    import io

    from siff_xarray.reader.source import FileObjectSource

    t = siff_files["single_raw"]
    with open(t.path, "rb") as fh:
        data = fh.read()

    class Counting(io.BytesIO):
        reads = 0

        def read(self, n=-1):
            Counting.reads += 1
            return super().read(n)

    src = FileObjectSource(Counting(data))
    starts = np.array([500, 100, 100, 3000, len(data) - 20])
    stops = starts + np.array([10, 50, 5, 0, 7])
    Counting.reads = 0
    buf, base = src.read_ranges(starts, stops)
    for s, e, b in zip(starts, stops, base, strict=True):
        assert bytes(buf[b : b + e - s]) == data[s:e]
    assert Counting.reads <= 2  # nearby ranges share one read
    src.coalesce_gap = 0
    Counting.reads = 0
    buf, base = src.read_ranges(starts, stops)
    for s, e, b in zip(starts, stops, base, strict=True):
        assert bytes(buf[b : b + e - s]) == data[s:e]
    assert Counting.reads >= 3


def test_slice_selection_and_events(siff_files):
    t = siff_files["smallest_bright"]
    with SiffFile(t.path) as f:
        np.testing.assert_array_equal(f.read_frames(slice(1, None, 3)),
                                      t.intensity(range(1, t.n_frames, 3)))
        assert [(e.frame, e.text) for e in f.events()] == [(2, "odour A"), (5, "no time")]
        with pytest.raises(TypeError, match="integers"):
            f.read_frames([0.5])


def test_saturated_pixel_warns(tmp_path):
    from siff_xarray import SiffWarning
    from siff_xarray.synthetic import SiffWriter, roi_json, scanimage_header

    p = tmp_path / "sat.siff"
    n = 70_000  # more photons in pixel (1, 2) than uint16 holds
    rec = (np.uint64(1) << np.uint64(48)) | (np.uint64(2) << np.uint64(32)) | np.arange(
        n, dtype=np.uint64) % np.uint64(600)
    with open(p, "wb") as fh:
        w = SiffWriter(fh, scanimage_header(height=4, width=4), roi_json(4, 4))
        w.set_shape(4, 4)
        w.write_frame("frameTimestamps_sec = 0.1\nepoch = 5\n", photons=rec)
    with SiffFile(p) as f:
        with pytest.warns(SiffWarning, match="more than 65535"):
            img = f.read_frames()
        assert img[0, 1, 2] == 65535
        assert f.sum_mask(np.ones((4, 4), bool))[0] == n  # exact where not saturated
        assert f.lifetime_images(return_intensity=True)[1][0, 1, 2] == n


def test_arrival_axis_overrides(siff_files):
    t = siff_files["single_compressed"]
    with SiffFile(t.path) as f:
        base = f.lifetime_images(units="bins")
        assert f.im_params.picoseconds_per_bin == 20.0
        np.testing.assert_allclose(f.lifetime_images(units="bins", offset_bins=10.0),
                                   base - 10.0, equal_nan=True)
        with pytest.raises(ValueError, match="units"):
            f.lifetime_images(units="ps")
    with SiffFile(t.path, base_resolution_ps=20.0) as f:
        assert f.im_params.picoseconds_per_bin == 80.0
        np.testing.assert_allclose(f.lifetime_images(), base * 0.08, equal_nan=True)
    with SiffFile(t.path, tau_bins=100, bin_width_ps=50.0) as f:
        assert f.histograms().shape == (t.n_frames, 100)
        assert f.im_params.arrival_time_bins[1] == 50.0


def test_implausible_header_values(tmp_path):
    for extra, match in (({"SI.hScan2D.Acq.Tau_bins": "99999999999"}, "implausible"),
                         ({"SI.hScan2D.Acq.binResolution": "400"}, "implausible")):
        p = tmp_path / "h.siff"
        write_siff(p, shape=(4, 4), n_timepoints=1, header_extra=extra)
        # the extra line comes after the normal one and the first wins: blank the normal
        # line out (same length, so the header stays valid) to make the bad value count
        data = p.read_bytes()
        key = next(iter(extra)).encode()
        good_line = data[data.index(key): data.index(b"\n", data.index(key)) + 1]
        data = data.replace(good_line, b"X" * (len(good_line) - 1) + b"\n", 1)
        p.write_bytes(data)
        with SiffFile(p) as f, pytest.raises(SiffFormatError, match=match):
            f.histograms() if b"Tau" in key else f.lifetime_images()


def test_windowed_walk_of_a_memory_map_equals_one_pass(truth, monkeypatch):
    from siff_xarray.reader import ifd

    with SiffFile(truth.path, index_cache=False) as f:
        want = f.index
    monkeypatch.setattr(ifd, "MAP_WINDOW", 512)  # many windows, page releases in between
    with SiffFile(truth.path, index_cache=False) as f:
        for name in ("ifd_offset", "strip_offset", "strip_bytes", "desc_offset",
                     "desc_length", "encoding", "n_photons"):
            np.testing.assert_array_equal(getattr(f.index, name), getattr(want, name))
        np.testing.assert_array_equal(f.read_frames(), truth.intensity())


def test_masks_histograms_equal_truth(truth, rng):
    with SiffFile(truth.path) as f:
        if not f.has_photons or (f.index.encoding == 2).any():
            pytest.skip("no photons")
        h, w = truth.shape
        frames = np.arange(truth.n_frames)
        masks = rng.random((3, h, w)) > 0.5
        shifts = rng.integers(-h, h, (truth.n_frames, 2))
        got = f.masks_histograms(masks, frames, shifts=shifts)
        nb = truth.tau_bins
        assert got.shape == (3, truth.n_frames, nb)
        for fr in range(0, truth.n_frames, 3):
            pix, tau = truth.photons(fr)
            y, x = (pix // w + shifts[fr, 0]) % h, (pix % w + shifts[fr, 1]) % w
            for m in range(3):
                keep = masks[m, y, x] & (tau < nb)
                np.testing.assert_array_equal(got[m, fr], np.bincount(tau[keep], minlength=nb))
        # whole-frame masks give the per-frame histograms
        full = f.masks_histograms(np.ones((1, h, w), bool), frames, mode="clip")
        np.testing.assert_array_equal(full[0], f.histograms(frames, mode="clip"))


def test_closed_file_says_so(siff_files):
    f = SiffFile(siff_files["single_raw"].path)
    f.read_frames([0])
    f.close()
    for call in (lambda: f.read_frames([0]), lambda: f.histograms([0]),
                 lambda: f.photons(0)):
        with pytest.raises(ValueError, match="closed"):
            call()


def test_signed_tiff_pages(tmp_path, rng):
    import xarray as xr

    t = write_siff(tmp_path / "s.tif", shape=(7, 5), n_slices=2, n_timepoints=3,
                   format="tiff", tiff_signed=True, photons_per_frame=40)
    with SiffFile(t.path) as f:
        frames = f.read_frames()
        assert frames.dtype == np.int16 and (frames < 0).any()
        masks = rng.random((3, 7, 5)) > 0.5
        sh = rng.integers(-4, 5, (len(frames), 2))
        want = np.einsum("fyx,myx->mf", f.read_frames(shifts=sh).astype(np.int64), masks)
        np.testing.assert_array_equal(f.sum_masks(masks, shifts=sh), want)
        np.testing.assert_array_equal(f.sum_mask(masks[0], shifts=sh), want[0])
    with xr.open_dataset(t.path, engine="siff") as ds:  # the Dataset says int16 too
        assert ds.intensity.dtype == np.int16
        np.testing.assert_array_equal(ds.intensity.values.reshape(-1, 7, 5), frames)


def test_decode_into_matches_the_separate_decoders(truth, rng):
    """One decode gives the count images, pixel-sorted arrivals and histograms of the readers."""
    with SiffFile(truth.path) as f:
        n = f.num_frames
        frames = np.sort(rng.choice(n, size=max(1, n * 2 // 3), replace=False))
        rows = rng.permutation(len(frames)) + 2  # anywhere in the buffers, in any order
        h, w = f.frame_shape
        images = np.zeros((len(frames) + 3, h, w), dtype=np.uint16)
        counts = np.zeros(len(frames) + 3, dtype=np.uint32)
        photons = f.index.n_photons[frames]
        arrivals = np.zeros(int(photons.sum()), dtype=np.uint32)
        tiff = (f.index.encoding[frames] == 2).all()
        nbins = f.im_params.num_bins or 8
        hists = np.zeros((len(frames) + 3, nbins), dtype=np.uint32)
        hi = f.decode_into(frames, rows, images, counts, hists, arrivals)
        np.testing.assert_array_equal(images[rows], f.read_frames(frames).view(np.uint16))
        assert not images[:2].any() and not images[-1].any()
        if tiff:
            np.testing.assert_array_equal(
                counts[rows], f.read_frames(frames).view(np.uint16).sum(axis=(1, 2)))
            return
        np.testing.assert_array_equal(counts[rows], photons)
        _starts, _pix, tau = f.photons_batch(frames)
        np.testing.assert_array_equal(arrivals, tau)
        assert hi == (int(tau.max()) if tau.size else 0)
        np.testing.assert_array_equal(hists[rows], f.histograms(frames, n_bins=nbins))


def test_decode_into_checks_its_buffers(siff_files):
    t = siff_files["single_raw"]
    with SiffFile(t.path) as f:
        h, w = f.frame_shape
        images = np.zeros((2, h, w), dtype=np.uint16)
        n = int(f.index.n_photons[:2].sum())
        hist = np.zeros((0, 1), dtype=np.uint32)
        counts = np.zeros(2, dtype=np.uint32)
        with pytest.raises(ValueError, match="one row"):
            f.decode_into([0, 1], [0, 2], images, counts, hist, np.zeros(n, np.uint16))
        with pytest.raises(ValueError, match="photons"):
            f.decode_into([0, 1], [0, 1], images, counts, hist, np.zeros(n + 1, np.uint16))
        with pytest.raises(ValueError, match="C-contiguous"):
            f.decode_into([0, 1], [0, 1], np.zeros((2, h, w + 1), np.uint16), counts, hist,
                          np.zeros(n, np.uint16))


def test_decode_into_refuses_saturated_pixels(tmp_path):
    """A raw frame with a pixel above 65535 photons cannot be stored as count image + photons."""
    from siff_xarray.synthetic import SiffWriter, roi_json, scanimage_header

    p = tmp_path / "hot.siff"
    rec = np.full(70000, (np.uint64(3) << np.uint64(48)) | (np.uint64(2) << np.uint64(32))
                  | np.uint64(17), dtype=np.uint64)
    with open(p, "wb") as fh:
        w = SiffWriter(fh, scanimage_header(height=8, width=8), roi_json(8, 8))
        w.set_shape(8, 8)
        w.write_frame("frameTimestamps_sec = 0.1\nepoch = 5\n", photons=rec)
    with SiffFile(p) as f:
        images = np.zeros((1, 8, 8), dtype=np.uint16)
        with pytest.raises(SiffFormatError, match="65535"):
            f.decode_into([0], [0], images, np.zeros(1, np.uint32), np.zeros((0, 1), np.uint32),
                          np.zeros(70000, np.uint16))


def test_read_frames_into_out(truth):
    with SiffFile(truth.path) as f:
        want = f.read_frames()
        out = np.full(want.shape, 7, dtype=want.dtype)
        assert f.read_frames(out=out) is out or f.read_frames(out=out).base is out
        np.testing.assert_array_equal(out, want)
        with pytest.raises(ValueError, match="C-contiguous 16-bit"):
            f.read_frames(out=np.zeros(want.shape, np.float32))


def test_prefetch_asks_for_the_frames_span(siff_files, monkeypatch):
    """Local decodes hand the span of their frames' bytes to the OS to read ahead."""
    t = siff_files["two_chan_slices_flyback"]
    with SiffFile(t.path) as f:
        seen = []
        monkeypatch.setattr(f._source, "will_need", lambda a, b: seen.append((a, b)))
        f.read_frames([2, 3, 4])
        idx = f.index
        assert seen == [(int(idx.ifd_offset[2]), int(idx.data_stop[4]))]
        seen.clear()
        f.prefetch([0, f.num_frames - 1])  # far apart: no hint for the bytes between
        assert seen == []
        monkeypatch.undo()
        f._source.will_need(-5, os.path.getsize(t.path) + 100)  # clipped, never an error
        f._source.will_need(10, 5)


def test_spot_check_reads_ifds_like_the_walk(truth):
    """The cached index's plain-Python IFD check agrees with the compiled walk, frame by frame."""
    from siff_xarray.reader import index_cache as ic

    with SiffFile(truth.path, index_cache=False) as f:
        src, hdr, idx = f._source, f.header, f.index
        for k in range(len(idx)):
            pos = int(idx.ifd_offset[k])
            py = ic._strips_and_next(src.read(pos, 2048), hdr.bigtiff)
            assert py is not None and py == ic._walk_one(src, hdr, pos), k
            assert py[:2] == (idx.strip_offset[k], idx.strip_bytes[k])
        assert ic._spot_check(src, hdr, idx)
        bad = type(idx)(**{**{fl: getattr(idx, fl) for fl in idx.__dataclass_fields__},
                           "strip_bytes": idx.strip_bytes + 1})
        assert not ic._spot_check(src, hdr, bad)


def test_cached_open_and_a_first_frame_do_not_load_numba(siff_files):
    """Opening a file whose index is cached, its metadata and a first frame need no Numba.

    Importing Numba costs ~0.15 s and its first call in a process 0.3-0.5 s more;
    ``siff-xarray info`` and a first look at a frame pay neither. A larger read does.
    """
    import subprocess
    import sys

    t = siff_files["smallest_bright"]
    with SiffFile(t.path):
        pass  # the index is cached now
    # numba.np.arraymath is imported when Numba first loads or compiles a function
    code = ("import sys\nfrom siff_xarray import SiffFile\n"
            f"f = SiffFile({str(t.path)!r})\n"
            "f.metadata, f.im_params, f.timestamps()\n"
            "print(len(f.index), 'numba' in sys.modules)\n"
            "f.read_frames([0])\n"  # a few frames: the NumPy twin of the kernel
            "print('numba' in sys.modules)\n"
            "f.read_frames()\n"
            "print('numba.np.arraymath' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(t.n_frames), "False", "False", "True"], out.stdout
    # the same through xarray, as a user's first look at a file
    code = ("import sys\nimport xarray as xr\n"
            f"ds = xr.open_dataset({str(t.path)!r}, engine='siff')\n"
            "ds.intensity[0, 0, 0].values\n"
            "print('numba' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False"], out.stdout


# ------------------------------------------------------------------ NumPy twin of a kernel


def _frames_buffer(rng: np.random.Generator, n: int, h: int, w: int, damage: float):
    """A byte buffer of ``n`` frames of every encoding, some damaged, and their kernel args."""
    from siff_xarray.format.constants import ENC_COMPRESSED, ENC_RAW, ENC_TIFF

    parts, enc, off, nb, pos = [], [], [], [], 0
    for _ in range(n):
        e = int(rng.choice([ENC_RAW, ENC_COMPRESSED, ENC_TIFF]))
        m = int(rng.integers(0, 3 * h * w))
        ys = rng.integers(0, h + (2 if rng.random() < damage else 0), m)
        xs = rng.integers(0, w + (2 if rng.random() < damage else 0), m)
        ys, xs = np.minimum(ys, 65535), np.minimum(xs, 65535)
        tau = rng.integers(0, 2**32, m)
        if e == ENC_RAW:
            u = np.uint64
            data = ((ys.astype(u) << u(48)) | (xs.astype(u) << u(32)) | tau.astype(u)).tobytes()
            start, length = pos, len(data)
        else:
            img = np.bincount(np.minimum(ys, h - 1) * w + np.minimum(xs, w - 1),
                              minlength=h * w).astype(np.uint16)
            arr = np.sort(tau % 65536).astype(np.uint16) if e == ENC_COMPRESSED else b""
            data = img.tobytes() + (arr.tobytes() if e == ENC_COMPRESSED else b"")
            start = pos + (2 * h * w if e == ENC_COMPRESSED else 0)
            length = 2 * m if e == ENC_COMPRESSED else 2 * h * w
        if rng.random() < damage:  # a wrong length, or data beyond the buffer
            length += int(rng.choice([-2, 2, 1, 10**6]))
        parts.append(data + bytes(int(rng.integers(0, 3))))  # odd gaps: unaligned frames
        enc.append(e), off.append(start), nb.append(length)
        pos += len(parts[-1])
    buf = np.frombuffer(b"".join(parts), dtype=np.uint8)
    sy, sx = rng.integers(0, h, n), rng.integers(0, w, n)
    i64 = lambda v: np.asarray(v, dtype=np.int64)  # noqa: E731
    return (buf, np.asarray(enc, dtype=np.int8), i64(off), i64(nb), i64([h] * n), i64([w] * n),
            i64(sy), i64(sx))


def _both_intensity_decoders(args: tuple, h: int, w: int):
    from siff_xarray.reader import decode, kernels

    n = len(args[1])
    outs, stats = [], []
    for run in (decode.intensity_few,
                lambda *a: kernels.kernel("intensity")[1](*a[:8], 1, *a[8:])):
        out = np.full((n, h * w), 7, dtype=np.uint16)  # rows left alone stay 7 in both
        status = np.full(n, -1, dtype=np.int8)
        run(*args, out, status)
        outs.append(out), stats.append(status)
    return outs, stats


@pytest.mark.parametrize("seed", range(40))
def test_few_frame_intensity_twin_matches_the_kernel(seed):
    """The NumPy path of small intensity reads gives the kernel's images and statuses."""
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(1, 9)), int(rng.integers(1, 9))
    args = _frames_buffer(rng, int(rng.integers(1, 6)), h, w, damage=0.3)
    (a, b), (sa, sb) = _both_intensity_decoders(args, h, w)
    np.testing.assert_array_equal(sa, sb)
    np.testing.assert_array_equal(a, b)


def test_few_frame_intensity_twin_saturates_like_the_kernel():
    from siff_xarray.format.constants import ENC_RAW
    from siff_xarray.reader import decode as K

    rec = np.full(70_000, (1 << 48) | (2 << 32) | 5, dtype=np.uint64)  # pixel (1, 2)
    rec = np.concatenate([rec, [(3 << 48) | 5]]).astype(np.uint64)  # and one more photon
    i64 = lambda v: np.asarray([v], dtype=np.int64)  # noqa: E731
    args = (rec.view(np.uint8), np.asarray([ENC_RAW], np.int8), i64(0), i64(rec.nbytes),
            i64(4), i64(4), i64(1), i64(3))
    (a, b), (sa, sb) = _both_intensity_decoders(args, 4, 4)
    assert sa[0] == sb[0] == K.ST_SATURATED
    np.testing.assert_array_equal(a, b)
    assert a[0].reshape(4, 4)[2, 1] == 65535 and a.sum() == 65536


def test_first_small_reads_take_the_numpy_path_then_the_kernel(siff_files, monkeypatch):
    """Small reads use the NumPy twin until a kernel ran or FEW_CALLS of them were made."""
    from siff_xarray.reader import decode as K

    t = siff_files["smallest_bright"]
    calls = []
    twin = K.intensity_few
    monkeypatch.setattr(K, "intensity_few", lambda *a: calls.append(len(a[1])) or twin(*a))
    few = list(range(K.FEW_FRAMES))
    with SiffFile(t.path) as f:
        monkeypatch.setattr(K, "_few_calls_left", [K.FEW_CALLS])
        for _ in range(K.FEW_CALLS + 2):
            np.testing.assert_array_equal(f.read_frames(few), t.intensity(few))
        assert calls == [K.FEW_FRAMES] * K.FEW_CALLS  # then the kernel
        monkeypatch.setattr(K, "_few_calls_left", [K.FEW_CALLS])
        f.read_frames([0])
        full = f.read_frames(list(range(K.FEW_FRAMES + 1)))  # a larger read: the kernel
        f.read_frames([0])  # and from now on
    assert calls == [K.FEW_FRAMES] * K.FEW_CALLS + [1]
    np.testing.assert_array_equal(full, t.intensity(list(range(K.FEW_FRAMES + 1))))


@pytest.mark.parametrize("n", [3, 100])  # plain preads, and the compiled gather
def test_pread_ranges_reads_each_range_and_names_the_first_that_fails(tmp_path, n):
    from siff_xarray.reader import ifd

    data = np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8)
    p = tmp_path / "bytes"
    p.write_bytes(data.tobytes())
    starts = np.linspace(0, 4900, n).astype(np.int64)
    lengths = (np.arange(n) % 7 * 11).astype(np.int64)  # some empty
    fd = os.open(p, os.O_RDONLY)
    try:
        buf, base, failed = ifd.pread_ranges(fd, starts, lengths)
        assert failed == -1
        for a, ln, b in zip(starts, lengths, base, strict=True):
            np.testing.assert_array_equal(buf[b : b + ln], data[a : a + ln])
        lengths[n // 2] = 200 if starts[n // 2] > 4800 else 6000  # runs past the end
        lengths[n // 2 + 1] = 6000
        assert ifd.pread_ranges(fd, starts, lengths)[2] == n // 2
        starts[1], lengths[1] = -5, 4  # a negative offset fails, never raises
        assert ifd.pread_ranges(fd, starts, lengths)[2] == 1
    finally:
        os.close(fd)
