"""Native rigid registration: exact roll semantics and recovery of known motion."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from siff_xarray import SiffFile
from siff_xarray.registration import (
    apply_shifts,
    phase_shifts,
    register_frames,
    regularize_planes,
)
from siff_xarray.synthetic import write_siff


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 9), st.integers(1, 9), st.integers(1, 4), st.data())
def test_apply_shifts_is_numpy_roll(h, w, n, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    frames = rng.integers(0, 100, (n, h, w))
    shifts = rng.integers(-40, 40, (n, 2))
    out = apply_shifts(frames, shifts)
    for i in range(n):
        np.testing.assert_array_equal(out[i], np.roll(frames[i], tuple(shifts[i]), axis=(0, 1)))


def test_phase_shifts_on_clean_images():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:64, 0:48]
    img = sum(np.exp(-((yy - rng.uniform(0, 64)) ** 2 + (xx - rng.uniform(0, 48)) ** 2) / 8)
              for _ in range(10))
    true = rng.integers(-6, 7, (30, 2))
    frames = apply_shifts(np.broadcast_to(img, (30, 64, 48)), -true)
    for whiten in (0.0, 1.0):
        est, quality = phase_shifts(frames, img, max_shift=8, whiten=whiten)
        np.testing.assert_array_equal(est, true)
        assert quality.shape == (30,)
    with pytest.raises(ValueError, match="reference shape"):
        phase_shifts(frames, img[:10])


@pytest.mark.parametrize("photons", [3000, 6000])
def test_register_frames_recovers_known_motion(tmp_path, photons):
    # 0.37 and 0.73 photons per pixel per frame: sparse, like real FLIM frames
    t = write_siff(tmp_path / "m.siff", shape=(128, 64), n_timepoints=200,
                   photons_per_frame=photons, max_shift=4, seed=3, encoding="compressed")
    with SiffFile(t.path) as f:
        frames = f.read_frames()
    shifts, ref, quality = register_frames(frames, max_shift=8)
    assert ref.shape == (128, 64) and quality.shape == (200,)
    d = shifts - t.shifts  # equal up to one constant offset (the reference's position)
    vals, counts = np.unique(d, axis=0, return_counts=True)
    assert counts.max() / len(d) >= 0.95, dict(zip(map(tuple, vals), counts, strict=True))


def test_accessor_register_and_apply(tmp_path):
    import xarray as xr

    t = write_siff(tmp_path / "acc.siff", shape=(96, 64), channels=(1, 2), n_slices=2,
                   n_flyback=1, n_timepoints=60, photons_per_frame=5000, max_shift=3,
                   seed=8, encoding="compressed", channel_brightness=(1.0, 0.3))
    with xr.open_dataset(t.path, engine="siff") as ds:
        reg = ds.siff.register(channel=1, max_shift=8, n_reference_frames=60)
        assert reg.shift_y.dims == ("time", "z") and reg.reference.dims == ("z", "y", "x")
        assert reg.shift_y.attrs["convention"].startswith("registered = numpy.roll")
        fmap = ds.frame_index.sel(channel=1).values  # (time, z)
        est = np.stack([reg.shift_y.values, reg.shift_x.values], axis=-1)
        for k in range(2):  # per plane, equal to the truth up to one offset
            d = est[:, k] - t.shifts[fmap[:, k]]
            _, counts = np.unique(d, axis=0, return_counts=True)
            assert counts.max() / len(d) >= 0.95
        moved = ds.siff.apply_shifts(reg)
        assert "shift_y" in moved
        # the registered intensity is exactly the reader's read_frames(shifts=...)
        sh = {int(fr): (int(reg.shift_y[ti, zi]), int(reg.shift_x[ti, zi]))
              for (ti, zi, ci), fr in np.ndenumerate(ds.frame_index.values)}
        with SiffFile(t.path) as f:
            frames = ds.frame_index.values.ravel()
            want = f.read_frames(frames, shifts=sh).reshape(ds.intensity.shape)
        np.testing.assert_array_equal(moved.intensity.values, want)
    with xr.open_dataset(t.path, engine="siff", chunks={}) as dds:
        lazy = dds.siff.apply_shifts(reg)
        assert lazy.intensity.chunks is not None  # still lazy
        np.testing.assert_array_equal(lazy.intensity.values, want)
        lazy.drop_vars(["histogram"]).to_zarr(tmp_path / "reg.zarr", consolidated=False)
    with xr.open_zarr(tmp_path / "reg.zarr", consolidated=False) as z:
        np.testing.assert_array_equal(z.shift_y.values, reg.shift_y.values)
        np.testing.assert_array_equal(z.siff.apply_shifts().intensity.values,
                                      np.asarray(want))  # shifts are not applied twice


def _exact_fraction(est: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of frames whose shift equals the truth up to one constant offset."""
    _, counts = np.unique(est - truth, axis=0, return_counts=True)
    return counts.max() / len(est)


def test_regularize_planes_pools_neighbours():
    rng = np.random.default_rng(1)
    win = rng.random((5, 7, 3, 3))
    np.testing.assert_array_equal(regularize_planes(win, 0.0), win)
    pooled = regularize_planes(win, 1.0)
    w = np.exp(-((np.arange(5)[:, None] - np.arange(5)[None]) ** 2) / 2.0)
    w /= w.sum(1, keepdims=True)
    np.testing.assert_allclose(pooled[2], np.tensordot(w[2], win, axes=(0, 0)))


def _oracle_rates(t, ds) -> list[float]:
    """Per plane, the exact-shift rate of the oracle that knows the true scene."""
    fmap = ds.frame_index.isel(channel=0).values
    img = ds.intensity.isel(channel=0).values
    ok = (fmap >= 0).all(axis=1)
    return [_exact_fraction(t.oracle_shifts(img[ok, k], fmap[ok, k]), t.shifts[fmap[ok, k]])
            for k in range(fmap.shape[1])]


def _rates(t, ds, reg) -> list[float]:
    fmap = ds.frame_index.isel(channel=0).values
    ok = (fmap >= 0).all(axis=1)
    est = np.stack([reg.shift_y.values, reg.shift_x.values], axis=-1)
    return [_exact_fraction(est[ok, k], t.shifts[fmap[ok, k]]) for k in range(fmap.shape[1])]


def test_oracle_is_the_brute_force_likelihood(tmp_path):
    t = write_siff(tmp_path / "o.siff", shape=(24, 20), n_slices=2, n_timepoints=3,
                   photons_per_frame=400, max_shift=2, seed=1)
    counts = t.intensity()
    got = t.oracle_shifts(counts, range(t.n_frames))
    for fr in range(t.n_frames):
        z, best, arg = t.plane(fr), -np.inf, None
        for sy in range(-2, 3):
            for sx in range(-2, 3):
                win = t.scene[z, 2 + sy: 2 + sy + 24, 2 + sx: 2 + sx + 20]
                ll = float((counts[fr] * np.log(win / win.sum())).sum())
                if ll > best:
                    best, arg = ll, (sy, sx)
        assert tuple(got[fr]) == arg


def test_likelihood_reaches_the_oracle_where_phase_correlation_fails(tmp_path):
    import xarray as xr

    # all planes of a volume share the motion; at 2000 photons per 96x64 frame (0.33
    # photons per pixel) some planes of this scene defeat phase correlation
    t = write_siff(tmp_path / "vol.siff", shape=(96, 64), n_slices=4, n_flyback=1,
                   n_timepoints=150, photons_per_frame=2000, max_shift=3, motion="volume",
                   seed=5, encoding="compressed")
    with xr.open_dataset(t.path, engine="siff") as ds:
        oracle = _oracle_rates(t, ds)
        phase = _rates(t, ds, ds.siff.register(method="phase", max_shift=6))
        alone = ds.siff.register(max_shift=6)
        pooled = ds.siff.register(max_shift=6, regularize_sigma=3.0)
        volume = ds.siff.register(max_shift=6, motion="volume")
        rates = _rates(t, ds, alone)
        assert min(phase) < 0.8, phase  # the weakest plane fails phase correlation ...
        # ... while the likelihood is within 3 points of the oracle on every plane
        assert all(r >= o - 0.03 for r, o in zip(rates, oracle, strict=True)), (rates, oracle)
        assert alone.quality.attrs["units"] == "nat" and alone.shift_y.attrs["motion"] == "frame"
        # planes that move together: pooling their evidence beats the per-frame oracle
        assert min(_rates(t, ds, pooled)) >= max(0.99, min(oracle))
        assert min(_rates(t, ds, volume)) >= max(0.99, min(oracle))
        assert (volume.shift_y.diff("z") == 0).all() and (volume.shift_x.diff("z") == 0).all()
        with pytest.raises(ValueError, match="phase"):
            ds.siff.register(method="suite2p", regularize_sigma=1.0)
        with pytest.raises(ValueError, match="step_cost applies"):
            ds.siff.register(method="phase", step_cost=1.0)
        with pytest.raises(ValueError, match="motion must be"):
            ds.siff.register(motion="plane")


def test_likelihood_quality_falls_with_the_photons(tmp_path):
    import xarray as xr

    # brightness varies from volume to volume: dimmer frames carry less evidence
    t = write_siff(tmp_path / "q.siff", shape=(64, 64), n_timepoints=80,
                   photons_per_frame=3000, max_shift=3, seed=7, encoding="compressed")
    with xr.open_dataset(t.path, engine="siff") as ds:
        reg = ds.siff.register(max_shift=5)
        photons = ds.intensity.isel(channel=0, z=0).sum(("y", "x")).values.astype(float)
        q = reg.quality.isel(z=0).values
        assert np.corrcoef(photons, q)[0, 1] > 0.5
        # the same frames thinned to a tenth of their photons are far less certain
        rng = np.random.default_rng(0)
        thin = rng.binomial(ds.intensity.values.astype(np.int64), 0.1).astype(np.uint16)
        sparse = ds.copy(data={**{k: v.values for k, v in ds.data_vars.items()},
                               "intensity": thin})
        q_thin = sparse.siff.register(max_shift=5, reference=reg.reference).quality
        assert np.median(q_thin) < 0.3 * np.median(q)


def test_smooth_motion_prior_helps_slow_drift_on_sparse_frames(tmp_path):
    import xarray as xr

    # slow drift (a step every 8 scans) with two jumps, in very sparse frames
    n = 300
    walk = np.zeros((n, 2), dtype=np.int64)
    rng = np.random.default_rng(3)
    for k in range(1, n):
        walk[k] = walk[k - 1] + (rng.integers(-1, 2, 2) if k % 8 == 0 else 0)
        walk[k] = np.clip(walk[k], -3, 3)
        if k in (100, 200):
            walk[k] = -walk[k]  # a jump across the field
    t = write_siff(tmp_path / "d.siff", shape=(64, 48), n_timepoints=n,
                   photons_per_frame=600, max_shift=3, motion=walk, seed=2,
                   encoding="compressed")
    with xr.open_dataset(t.path, engine="siff") as ds:
        oracle = _oracle_rates(t, ds)[0]
        free = _rates(t, ds, ds.siff.register(max_shift=5))[0]
        smooth = ds.siff.register(max_shift=5, step_cost=3.0)
        got = _rates(t, ds, smooth)[0]
        # the prior lifts sparse frames beyond what each frame alone allows (the oracle)
        assert got >= free + 0.1 and got >= oracle, (free, got, oracle)
        assert (smooth.quality.values < 0).any()  # the prior overruled some frames
    with pytest.raises(ValueError, match="motion array"):
        write_siff(tmp_path / "bad.siff", n_timepoints=2, max_shift=1, motion=walk)


@pytest.mark.filterwarnings("ignore:The specified chunks separate the stored chunks")
def test_register_chunked_dataset_is_lazy_and_equal(tmp_path):
    import xarray as xr

    t = write_siff(tmp_path / "lazy.siff", shape=(64, 48), n_slices=2, n_flyback=1,
                   n_timepoints=40, photons_per_frame=3000, max_shift=2, seed=2,
                   encoding="compressed", extra_frames=1)
    keep = {"partial_volume": "keep"}  # the partial volume's frames are registered too
    with xr.open_dataset(t.path, engine="siff", **keep) as ds:
        built = ds.siff.register(max_shift=4)
        ref = built.reference
        eager = ds.siff.register(max_shift=4, reference=ref.values)
        # the same shifts whether the frames are fitted by the EM or aligned afterwards
        assert (eager.shift_y == built.shift_y).mean() > 0.95
        assert min(_rates(t, ds, built)) >= 0.95 and min(_rates(t, ds, eager)) >= 0.95
    with xr.open_dataset(t.path, engine="siff", chunks={"time": 8}, **keep) as dds:
        lazy = dds.siff.register(max_shift=4, reference=ref.values)
        assert lazy.shift_y.chunks is not None  # nothing aligned yet
        xr.testing.assert_identical(lazy.compute(), eager)
        lazy_built = dds.siff.register(max_shift=4)  # the EM's fit overlays lazily too
        assert lazy_built.shift_y.chunks is not None
        xr.testing.assert_identical(lazy_built.compute(), built)
        # frames of the partial last volume that were never acquired get zero shifts
        missing = ~dds.frame_present.isel(channel=0).values
        assert missing.any()
        assert (eager.shift_y.values[missing] == 0).all()
        assert (eager.quality.values[missing] == 0).all()
    with pytest.raises(ValueError, match="reference of shape"):
        ds.siff.register(reference=np.zeros((3, 64, 48)))
    with pytest.raises(ValueError, match="unknown registration method"):
        ds.siff.register(method="caiman")


def test_known_motion_on_held_out_frames(tmp_path):
    # a frame inside its own reference could bias its shift toward where it already
    # is; frames registered against a reference built from *other* frames do as well
    t = write_siff(tmp_path / "h.siff", shape=(128, 64), n_timepoints=300,
                   photons_per_frame=3000, max_shift=4, seed=3, encoding="compressed")
    with SiffFile(t.path) as f:
        frames = f.read_frames()
    _, ref, _ = register_frames(frames[0::2], max_shift=8)
    held_out, _ = phase_shifts(frames[1::2], ref, max_shift=8)
    assert _exact_fraction(held_out, t.shifts[1::2]) >= 0.95


def test_register_a_converted_store_like_the_source(tmp_path):
    import xarray as xr

    from siff_xarray import store as zs

    t = write_siff(tmp_path / "c.siff", shape=(64, 48), n_slices=2, n_flyback=1,
                   n_timepoints=30, photons_per_frame=3000, max_shift=2, seed=4,
                   encoding="compressed")
    zs.convert(t.path, tmp_path / "c.zarr")
    with xr.open_dataset(t.path, engine="siff") as ds, \
            zs.open_converted(tmp_path / "c.zarr") as z:
        a, b = ds.siff.register(max_shift=4), z.siff.register(max_shift=4)
        xr.testing.assert_identical(a, b.compute())
        np.testing.assert_array_equal(ds.siff.apply_shifts(a).intensity.values,
                                      z.siff.apply_shifts(b).intensity.values)


def test_register_streams_a_lazy_dataset(tmp_path, monkeypatch):
    """Registering a file opened without Dask decodes sample and blocks, never the channel."""
    import xarray as xr

    t = write_siff(tmp_path / "long.siff", shape=(32, 24), channels=(1, 2), n_slices=2,
                   n_timepoints=30, photons_per_frame=800, max_shift=2, seed=4)
    sizes: list[int] = []
    read = SiffFile.read_frames

    def counting(self, frames=None, *args, **kwargs):
        out = read(self, frames, *args, **kwargs)
        sizes.append(len(out))
        return out

    monkeypatch.setattr(SiffFile, "read_frames", counting)
    with xr.open_dataset(t.path, engine="siff") as ds:
        reg = ds.siff.register(n_reference_frames=5, batch_frames=8, progress=False)
    assert reg.shift_y.shape == (30, 2)
    assert sum(sizes) >= 60 and max(sizes) <= 10, sizes  # the channel is 60 frames


def test_planes_run_in_threads_only_on_the_cores_this_process_may_use(monkeypatch):
    """One core allowed (a cluster job's share): planes run one after another here."""
    import os
    import threading

    from siff_xarray.registration import likelihood

    def where(z, workers):
        return threading.get_ident(), workers

    if hasattr(os, "sched_getaffinity"):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
        assert likelihood._per_plane(where, 4) == [(threading.get_ident(), -1)] * 4
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    else:
        monkeypatch.setattr(os, "cpu_count", lambda: 2)
    both = likelihood._per_plane(where, 4)
    assert {w for _, w in both} == {1} and threading.get_ident() not in {i for i, _ in both}


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 12), st.integers(1, 12), st.integers(0, 4), st.integers(0, 4),
       st.integers(0, 2**16))
def test_window_totals_and_binning_are_the_brute_force_sums(h, w, my, mx, seed):
    from siff_xarray.registration import likelihood

    rng = np.random.default_rng(seed)
    canvas = rng.random((h + 2 * my, w + 2 * mx)) + 0.1
    got = likelihood._window_totals(canvas, (h, w))
    want = np.array([[canvas[y: y + h, x: x + w].sum() for x in range(2 * mx + 1)]
                     for y in range(2 * my + 1)])
    np.testing.assert_allclose(got, want, rtol=1e-12)
    frames = rng.integers(0, 50, (3, h, w)).astype(np.uint16)
    hb, wb = h // 2 * 2, w // 2 * 2
    want_bin = frames[:, :hb, :wb].reshape(3, hb // 2, 2, wb // 2, 2).sum(axis=(2, 4))
    np.testing.assert_array_equal(likelihood._bin(frames, 2), want_bin)


def test_coarse_peaks_and_the_search_range():
    from siff_xarray.registration import likelihood

    # a map that is a parabola in each axis with its vertex between grid points
    yy, xx = np.mgrid[-4:5, -4:5]
    vertex = (1.3, -2.4)
    maps = -((yy - vertex[0]) ** 2 + 2 * (xx - vertex[1]) ** 2)[None, None].astype(float)
    at = np.array([[[1, -2]]])  # the grid maximum, (N=1, Z=1, 2)
    off = likelihood._peak_offsets(maps, at, (4, 4))
    np.testing.assert_allclose(off[0, 0], [0.3, -0.4])
    # at the map's edge there is no neighbour: no offset
    assert (likelihood._peak_offsets(maps, np.array([[[4, -4]]]), (4, 4)) == 0).all()
    # the search range covers what is needed, stays within the limit, and gives
    # canvases with small prime factors only
    import scipy.fft as sfft

    for need in range(0, 40):
        my, mx = likelihood._search_margin((256, 128), (32, 32), np.array([need, need]))
        assert min(need, 32) <= my <= 32 and min(need, 32) <= mx <= 32
        assert my == 32 or sfft.next_fast_len(256 + 2 * my, real=True) == 256 + 2 * my


def test_a_rare_jump_outside_the_coarse_frames_is_still_found(tmp_path):
    import xarray as xr

    # The coarse levels place 64 evenly spaced frames first; the fine levels search
    # only as far as the coarse shifts of *every* frame reach (a faster transform).
    # Frames jumping far away outside those 64 must widen that range.
    n = 100
    coarse = set(np.unique(np.linspace(0, n - 1, 64).round()).astype(int).tolist())
    jumps = [k for k in range(n) if k not in coarse][5::7][:4]
    walk = np.random.default_rng(2).integers(-1, 2, (n, 2))
    walk[jumps] = [[10, -9], [-11, 8], [9, 10], [-10, -10]]
    t = write_siff(tmp_path / "j.siff", shape=(128, 96), n_timepoints=n,
                   photons_per_frame=6000, max_shift=12, motion=walk, seed=4,
                   encoding="compressed")
    with xr.open_dataset(t.path, engine="siff") as ds:
        reg = ds.siff.register(max_shift=16)
        oracle = _oracle_rates(t, ds)
        rates = _rates(t, ds, reg)
    est = np.stack([reg.shift_y.values[:, 0], reg.shift_x.values[:, 0]], axis=-1)
    offset = np.median(est - t.shifts, axis=0)
    np.testing.assert_array_equal(est[jumps] - t.shifts[jumps], np.tile(offset, (4, 1)))
    assert rates[0] >= oracle[0] - 0.02, (rates, oracle)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 30), st.integers(1, 30), st.floats(0.5, 7.0), st.integers(0, 2**16))
def test_compiled_smoothing_is_scipys_gaussian_filter(h, w, sigma, seed):
    from scipy.ndimage import gaussian_filter

    from siff_xarray.registration import likelihood

    img = np.random.default_rng(seed).random((h, w)) * 100
    want = gaussian_filter(img.astype(np.float32), sigma, mode="nearest", truncate=3.0)
    np.testing.assert_allclose(likelihood._smooth(img, sigma), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(likelihood._smooth(img, 0.0), img)  # no NaN weights


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(1, 6), st.integers(0, 3), st.integers(0, 3),
       st.integers(1, 5), st.integers(0, 2**16))
def test_accumulated_photons_and_exposure_are_the_brute_force_sums(h, w, my, mx, n, seed):
    from siff_xarray.registration import likelihood

    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 9, (n, h, w)).astype(np.uint16)
    shifts = np.stack([rng.integers(-my, my + 1, n), rng.integers(-mx, mx + 1, n)], axis=1)
    totals = frames.reshape(n, -1).sum(axis=1).astype(float) + 1.0
    group = rng.integers(0, 2, n)
    acc, exposure = likelihood._accumulate(frames, shifts, (my, mx), totals, 3.0, group, 2)
    want_acc = np.zeros((2, h + 2 * my, w + 2 * mx))
    want_exp = np.zeros_like(want_acc)
    for i in range(n):
        y, x = shifts[i] + (my, mx)
        want_acc[group[i], y: y + h, x: x + w] += frames[i]
        want_exp[group[i], y: y + h, x: x + w] += totals[i] / 3.0
    np.testing.assert_array_equal(acc, want_acc)
    np.testing.assert_allclose(exposure, want_exp, rtol=1e-12, atol=1e-12)
