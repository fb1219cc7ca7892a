"""The SiffPy walkthrough (../shared/seed/siffpy-introduction.txt) run through compat.SiffReader.

The seed's code is reproduced with the import and file path changed and plotting
left out, on a synthetic file with the seed's layout (256 x 128 pixels, channels 1
and 2, 6 slices + 1 flyback frame, here 12 volumes instead of 6736). Every printed
quantity that does not depend on the data is checked.
"""

from __future__ import annotations

import numpy as np
import pytest

from siff_xarray.compat import RegistrationInfo, SiffReader
from siff_xarray.synthetic import write_siff

SEED_FLAT = [0, 2, 4, 6, 8, 10, 14, 16, 18, 20, 22, 24, 28, 30, 32, 34, 36, 38, 42, 44, 46, 48,
             50, 52, 56, 58, 60, 62, 64, 66, 70, 72, 74, 76, 78, 80, 84, 86, 88, 90, 92, 94, 98,
             100, 102, 104, 106, 108, 112, 114, 116, 118, 120, 122, 126, 128, 130, 132, 134, 136]
N_T = 12


@pytest.fixture(scope="module")
def seed_file(tmp_path_factory):
    return write_siff(tmp_path_factory.mktemp("seed") / "FB_1.siff", shape=(256, 128),
                      channels=(1, 2), n_slices=6, n_flyback=1, n_timepoints=N_T,
                      photons_per_frame=30000, channel_brightness=(1.0, 0.0), max_shift=2,
                      encoding="compressed", seed=21)


def test_seed_walkthrough(seed_file, capsys):
    file_path = seed_file.path

    # File I/O
    sr = SiffReader()
    sr.open(file_path)
    sr = SiffReader(file_path)
    first_few_frame_indices = list(range(8))
    first_frames = sr.get_frames(frames=first_few_frame_indices)
    assert first_frames.shape == (8, 256, 128) and first_frames.dtype == np.uint16
    assert first_frames[1::2].sum() == 0  # "two color channels but only one with signal"

    # ImParams and figuring out which frames to load
    im_par = sr.im_params
    print(im_par)
    print(im_par.FastZ)
    out = capsys.readouterr().out
    assert "FastZ" in out and "numDiscardFlybackFrames : 1" in out
    assert "discardFlybackFrames : True" in out and "waveformType : sawtooth" in out
    assert im_par.flatten_by_timepoints(timepoint_start=0, timepoint_end=10) == SEED_FLAT
    assert im_par.flatten_by_timepoints(timepoint_start=0, timepoint_end=10,
                                        reference_z=3) == [6, 20, 34, 48, 62, 76, 90, 104,
                                                           118, 132]
    assert im_par.framelist_by_color(color_channel=0, lower_bound_timepoint=0,
                                     upper_bound_timepoint=10) == SEED_FLAT
    assert im_par.framelist_by_slices(color_channel=0, lower_bound=0, upper_bound=5,
                                      slices=[2]) == [4, 18, 32, 46, 60]
    slice_frames = sr.get_frames(frames=im_par.framelist_by_slices(color_channel=0,
                                                                   slices=[3]))
    assert slice_frames.shape == (N_T, 256, 128)
    full_session = (
        sr
        .get_frames(frames=sr.im_params.flatten_by_timepoints(color_channel=None))
        .reshape(sr.im_params.array_shape)
    )
    assert [
        f"{dim_name}: {dim_val}"
        for dim_name, dim_val in zip(("timepoints", "slices", "channels", "rows", "columns"),
                                     full_session.shape, strict=True)
    ] == [f"timepoints: {N_T}", "slices: 6", "channels: 2", "rows: 256", "columns: 128"]

    # Registration
    registration_dict = sr.register(registration_method="siffpy", alignment_color_channel=0)
    reg_info = sr.registration_info
    assert registration_dict is sr.registration_dict is reg_info.yx_shifts
    assert str(reg_info) == f"RegistrationType.Siffpy RegistrationInfo for {file_path}"
    assert isinstance(reg_info, RegistrationInfo)
    assert len(reg_info.reference_frames) == 6  # one reference per plane
    assert all(0 <= dy < 256 and 0 <= dx < 128 for dy, dx in registration_dict.values())
    assert set(registration_dict) == set(sr.im_params.all_frames)  # every imaging frame
    # as in SiffPy, the registration is saved beside the file and applied on the next open
    import shutil
    from pathlib import Path

    saved = Path(file_path).with_suffix("") / "FB_1_registration_info.h5"
    assert saved.is_file()
    with SiffReader(file_path) as reopened:
        assert reopened.registration_dict == registration_dict
        np.testing.assert_array_equal(
            reopened.get_frames(frames=first_few_frame_indices),
            sr.get_frames(frames=first_few_frame_indices))
    shutil.rmtree(saved.parent)  # the module's other tests read the file unregistered
    registered_frames = sr.get_frames(frames=first_few_frame_indices,
                                      registration_dict=reg_info.yx_shifts)
    assert registered_frames.shape == (8, 256, 128)
    # every frame, flyback included, with the stored registration (SiffPy raised here);
    # frames without a shift (flyback) are read as they are
    everything = sr.get_frames()
    assert everything.shape == (seed_file.n_frames, 256, 128)
    fly = sr.im_params.flyback_frames
    np.testing.assert_array_equal(everything[fly], sr.get_frames(frames=fly,
                                                                 registration_dict={}))
    # registration helps: registered frames match their plane's reference better than raw
    # ones (shift accuracy against known motion is tested in test_registration.py)
    for z in range(6):
        frames = sr.im_params.framelist_by_slice(0, z)
        ref = reg_info.reference_frames[z].ravel()
        raw = sr.get_frames(frames=frames, registration_dict={}).reshape(len(frames), -1)
        reg = sr.get_frames(frames=frames).reshape(len(frames), -1)  # stored registration
        corr = [np.mean([np.corrcoef(x, ref)[0, 1] for x in a]) for a in (raw, reg)]
        assert corr[1] >= corr[0]
    with pytest.raises(ValueError, match="not available"):
        sr.register(registration_method="caiman", alignment_color_channel=0)

    # Masking methods
    mask = np.ones(sr.im_params.shape, dtype=bool)
    mask[mask.shape[0] // 2:, ...] = False
    collapsed = sr.sum_mask(mask)
    assert collapsed.shape == (N_T * 6,)  # one value per frame, as SiffPy gives
    framewise = sr.sum_mask(mask)
    from_raw = (
        sr.get_frames(
            frames=sr.im_params.flatten_by_timepoints(),
            registration_dict=sr.registration_dict
        )
        * mask
    ).sum(axis=(-1, -2))
    assert (from_raw == framewise).all()

    base_mask = np.zeros(sr.im_params.single_channel_volume, dtype=bool)
    base_mask[..., :base_mask.shape[-1] // 10] = True
    masks = [
        np.roll(base_mask, i * base_mask.shape[-1] // 10, axis=-1)
        for i in range(10)
    ]
    summed = sr.sum_masks(masks)
    assert summed.shape == (10, N_T)  # 3-D masks: one value per timepoint
    frames = (
        sr.get_frames(frames=sr.im_params.flatten_by_timepoints())
        .reshape(-1, *sr.im_params.single_channel_volume)
    )
    np.testing.assert_array_equal(
        summed, np.array([frames[:, submask].sum(axis=-1) for submask in masks]))

    # time axis and histograms
    t = sr.t_axis()
    assert t.shape == (N_T,) and np.all(np.diff(t) > 0)
    assert sr.t_axis(reference_z=None).shape == (N_T * 6,)
    assert sr.get_histogram().shape == (629 + 2,)
    assert sr.get_histogram(frames=[0, 2], framewise=True).shape == (2, 629 + 2)
    sr.close()
    assert not sr.opened
    with pytest.raises(RuntimeError, match="no file is open"):
        sr.get_frames()


def test_flim_methods_match_corrosiff_and_shapes(seed_file, rng):
    from conftest import open_corrosiff

    from siff_xarray.compat import FlimTrace

    sr = SiffReader(seed_file.path)
    reg = sr.register("siffpy", alignment_color_channel=0, save=False, max_shift=4,
                      n_reference_frames=12)
    h, w = sr.im_params.shape
    mask = rng.random((h, w)) > 0.7
    vol = rng.random((6, h, w)) > 0.7
    # per-frame lifetimes (arrival bins, offset subtracted) and photons of a 2-D mask
    tr = sr.sum_mask_flim(mask, params=3.0, registration_dict=reg)
    assert isinstance(tr, FlimTrace) and tr.info_string == "ROI"
    frames = sr.im_params.flatten_by_timepoints()
    assert tr.shape == (len(frames),) == (N_T * 6,)
    c = open_corrosiff(seed_file.path)
    life, inten, _ = c.sum_roi_flim(mask, None, frames=frames, registration=reg)
    np.testing.assert_allclose(tr.lifetime + 3.0, life, rtol=1e-12)
    np.testing.assert_array_equal(tr.intensity, inten)
    np.testing.assert_array_equal(tr.intensity, sr.sum_mask(mask, registration_dict=reg))
    # 3-D masks: per timepoint, photon-weighted mean over planes and summed photons
    many = sr.sum_masks_flim([vol, vol[::-1]], registration_dict=reg)
    assert many.shape == (2, N_T) and many.info_string == "Multi-ROIs"
    per_frame = sr.sum_masks_flim([vol, vol[::-1]], registration_dict=reg,
                                  return_framewise=True)
    n = per_frame.intensity.reshape(2, N_T, 6)
    weighted = np.nansum(per_frame.lifetime.reshape(2, N_T, 6) * n, axis=2) / n.sum(axis=2)
    np.testing.assert_allclose(many.lifetime, weighted, rtol=1e-12)
    np.testing.assert_array_equal(many.intensity, n.sum(axis=2))
    np.testing.assert_array_equal(many.intensity, sr.sum_masks([vol, vol[::-1]],
                                                                registration_dict=reg))
    # masked histograms, corrosiff's bins
    some = frames[:10]
    hist = sr.get_histogram_masked(mask, frames=some, registration_dict=reg)
    assert hist.dtype == np.uint64 and hist.shape[0] == 10
    # corrosiffpy 0.1.2's get_histogram_masked applies registration dictionaries with the
    # opposite sign to its own sum_roi / get_frames (a bug): bin for bin equal to ours
    # when given the inverse shifts, and equal without registration
    inverse = {k: ((-a) % h, (-b) % w) for k, (a, b) in reg.items()}
    np.testing.assert_array_equal(hist, c.get_histogram_masked(mask, frames=some,
                                                               registration=inverse))
    np.testing.assert_array_equal(sr.get_histogram_masked(mask, frames=some,
                                                          registration_dict={}),
                                  c.get_histogram_masked(mask, frames=some))
    np.testing.assert_array_equal(hist.sum(axis=1), tr.intensity[:10])
    # per-pixel FLIM images: empirical lifetime and offset-corrected phasors
    img = sr.get_frames_flim(params=2.0, frames=some, registration_dict={})
    assert img.shape == (10, h, w) and img.method == "empirical lifetime"
    want = sr._f().lifetime_images(some, units="bins") - 2.0
    np.testing.assert_allclose(np.asarray(img), want, equal_nan=True)
    np.testing.assert_array_equal(img.intensity, sr.get_frames(frames=some, registration_dict={}))
    ph = sr.get_frames_flim(frames=some, method="phasor")
    assert np.iscomplexobj(ph.lifetime) and ph.method == "phasor"
    rot = sr.get_frames_flim(params=5.0, frames=some, method="phasor")
    period = sr.im_params.num_bins + 2
    np.testing.assert_allclose(rot.lifetime, ph.lifetime * np.exp(-2j * np.pi * 5 / period))
    with pytest.raises(ValueError, match="method"):
        sr.get_frames_flim(method="fit")
    with pytest.raises(TypeError, match="tau_offset"):
        sr.get_frames_flim(params="x", frames=some)


def test_flimparams_offsets_are_converted_from_their_units(seed_file, tmp_path):
    # SiffPy's FLIMParams carry units (FlimUnits); an offset in ns or ps is converted
    # to arrival bins with the file's bin width (20 ps here, so SiffPy agrees)
    import enum
    from types import SimpleNamespace

    class FlimUnits(enum.Enum):  # SiffPy's unit names, as its objects carry them
        PICOSECONDS = "Picoseconds"
        NANOSECONDS = "Nanoseconds"
        COUNTBINS = "Countbins"
        UNKNOWN = "Unknown"
        UNITLESS = "Unitless"

    sr = SiffReader(seed_file.path)
    ps = sr.im_params.picoseconds_per_bin
    mask = np.zeros(sr.im_params.shape, bool)
    mask[4:20, 4:20] = True
    plain = np.asarray(sr.sum_mask_flim(mask, None).lifetime)
    frames = list(range(6))
    img0 = np.asarray(sr.get_frames_flim(None, frames=frames))
    for units, offset, bins in ((FlimUnits.NANOSECONDS, 1.3, 1300 / ps),
                                (FlimUnits.PICOSECONDS, 1300.0, 1300 / ps),
                                ("nanoseconds", 1.3, 1300 / ps),
                                (FlimUnits.COUNTBINS, 65.0, 65.0),
                                (FlimUnits.UNITLESS, 7.0, 7.0)):
        params = SimpleNamespace(tau_offset=offset, units=units)
        got = np.asarray(sr.sum_mask_flim(mask, params).lifetime)
        np.testing.assert_allclose(got, plain - bins, err_msg=str(units))
        img = np.asarray(sr.get_frames_flim(params, frames=frames))
        np.testing.assert_allclose(img, img0 - bins, equal_nan=True, err_msg=str(units))
    assert ps == 20.0 and 1300 / ps == 65.0  # the issue's case: 1.3 ns = 65 bins, not 1.3
    with pytest.raises(ValueError, match="UNKNOWN"):
        sr.sum_mask_flim(mask, SimpleNamespace(tau_offset=1.0, units=FlimUnits.UNKNOWN))


def test_sum_mask_flim_phasor_traces(seed_file):
    from types import SimpleNamespace

    sr = SiffReader(seed_file.path)
    f = sr._f()
    h, w = sr.im_params.shape
    mask = np.zeros((h, w), bool)
    mask[10:60, 20:90] = True
    off = SimpleNamespace(tau_offset=0.4, units="nanoseconds")  # 20 bins
    tr = sr.sum_mask_flim(mask, off, flim_method="phasor", return_framewise=True)
    assert tr.method == "phasor" and np.iscomplexobj(tr.lifetime)
    frames = sr._mask_frames(0, None, None, 1)
    n_bins = sr.im_params.num_bins + 2  # corrosiff's histogram length
    for k in (0, 5, len(frames) - 1):  # from the photons themselves
        pix, tau = f.photons(int(frames[k]))
        inside = mask.reshape(-1)[pix.astype(np.int64)]
        z = np.exp(2j * np.pi * tau[inside] / n_bins).mean()
        np.testing.assert_allclose(tr.lifetime[k], z * np.exp(-2j * np.pi * 20 / n_bins))
        assert tr.intensity[k] == inside.sum()
    both = sr.sum_masks_flim([mask, ~mask], None, flim_method="phasor")
    assert both.lifetime.shape[0] == 2 and np.iscomplexobj(both.lifetime)
    with pytest.raises(ValueError, match="flim_method"):
        sr.sum_mask_flim(mask, None, flim_method="fit")


def test_get_frames_full_is_corrosiff_s_per_pixel_histograms(seed_file):
    from conftest import open_corrosiff

    sr = SiffReader(seed_file.path)
    frames = [0, 3, 8]
    full = sr.get_frames(frames, full=True)
    h, w = sr.im_params.shape
    assert full.shape == (3, h, w, sr.im_params.num_bins + 2) and full.dtype == np.uint16
    np.testing.assert_array_equal(full.sum(axis=-1), sr.get_frames(frames))
    c = open_corrosiff(seed_file.path)
    np.testing.assert_array_equal(full, c.get_frames_full(frames=frames))
    reg = {fr: (3, -2) for fr in frames}
    moved = sr.get_frames(frames, registration_dict=reg, full=True)
    np.testing.assert_array_equal(moved, np.roll(full, (3, -2), axis=(1, 2)))


def test_siff_to_tiff_takes_str_paths_and_reads_back_the_same(tmp_path):
    from siff_xarray.compat import siff_to_tiff

    t = write_siff(tmp_path / "run.siff", shape=(16, 12), channels=(1, 2), n_slices=2,
                   n_flyback=1, n_timepoints=3, seed=4)
    out = siff_to_tiff(str(t.path))  # a str, as SiffPy's callers pass it
    assert out == str(tmp_path / "run.tiff")
    np.testing.assert_array_equal(SiffReader(out).get_frames(), SiffReader(t.path).get_frames())
    other = siff_to_tiff(t.path, str(tmp_path / "other.tif"))
    assert other.endswith("other.tif")
    with pytest.raises(ValueError, match="ome"):
        siff_to_tiff(t.path, str(tmp_path / "x.tif"), mode="ome")


# --------------------------------------------------------------- saved registrations


def _siffpy_h5(path, stem, shifts, refs, kind="siffpy", color=0):
    """Write a registration file the way the spec describes SiffPy's (section 3.2)."""
    h5py = pytest.importorskip("h5py")
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = np.array(sorted(shifts), dtype=np.int64)
    with h5py.File(path, "w") as h5:
        h5.attrs["filename"] = stem
        h5.attrs["registration_type"] = kind
        h5.attrs["registration_color"] = color
        h5.create_group("yx_shifts")
        h5["yx_shifts"].create_dataset("frame_index", data=frames)
        h5["yx_shifts"].create_dataset(
            "shift_values", data=np.array([shifts[int(f)] for f in frames], dtype=np.int64))
        h5.create_dataset("reference_frames", data=refs.astype(np.float32))


def test_a_siffpy_registration_beside_the_file_is_applied_on_open(tmp_path):
    from siff_xarray import SiffFile

    t = write_siff(tmp_path / "run.siff", shape=(24, 20), n_slices=2, n_timepoints=5,
                   photons_per_frame=900, max_shift=2, seed=4)
    with SiffReader(t.path) as plain:
        assert plain.registration_dict is None
        raw = plain.get_frames(list(range(t.n_frames)))
    # SiffPy stores non-negative shifts (dy mod H, dx mod W)
    shifts = {fr: (int(-t.shifts[fr][0]) % 24, int(-t.shifts[fr][1]) % 20)
              for fr in range(t.n_frames)}
    _siffpy_h5(tmp_path / "run" / "run_registration_info.h5", "run", shifts,
               np.ones((2, 24, 20)))
    with SiffReader(t.path) as sr:
        assert sr.registration_dict == shifts
        assert sr.registration_info.filename == t.path  # the data file, not SiffPy's stem
        assert sr.reference_frames.shape == (2, 24, 20)
        got = sr.get_frames(list(range(t.n_frames)))  # applied by default, as SiffPy
    with SiffFile(t.path) as f:
        want = f.read_frames(list(range(t.n_frames)), shifts=shifts)
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(got, raw)


def test_register_saves_where_siffpy_and_a_new_reader_find_it(tmp_path):
    import xarray as xr

    from siff_xarray.compat import registration_info_path, save_registration_info

    t = write_siff(tmp_path / "s.siff", shape=(48, 40), n_slices=2, n_flyback=1,
                   n_timepoints=30, photons_per_frame=3000, max_shift=2, seed=6,
                   extra_frames=1)
    with SiffReader(t.path) as sr:
        shifts = sr.register(max_shift=4)
    saved = registration_info_path(t.path)
    assert saved == tmp_path / "s" / "s_registration_info.h5" and saved.is_file()
    with SiffReader(t.path) as again:
        assert again.registration_dict == shifts
        assert again.registration_info.registration_type == "siffpy"
    # the layout is SiffPy's: read it back with h5py alone
    h5py = pytest.importorskip("h5py")
    with h5py.File(saved, "r") as h5:
        assert h5.attrs["filename"] == "s" and h5.attrs["registration_type"] == "siffpy"
        frames = h5["yx_shifts/frame_index"][...]
        values = h5["yx_shifts/shift_values"][...]
        assert frames.dtype == np.int64 and values.shape == (len(frames), 2)
        assert h5["reference_frames"].dtype == np.float32
    assert {int(f): tuple(map(int, v)) for f, v in zip(frames, values, strict=True)} == shifts
    # ds.siff.register results go the same way, e.g. into another directory
    with xr.open_dataset(t.path, engine="siff", partial_volume="keep") as ds:
        reg = ds.siff.register(max_shift=4)
        out = save_registration_info(reg, ds, tmp_path / "elsewhere")
        assert out == tmp_path / "elsewhere" / "s_registration_info.h5"
        with SiffReader(t.path) as sr:
            info = sr.load_registration_info(out)
            assert info.yx_shifts == sr.registration_dict
            fmap = ds.frame_index.isel(channel=0).values
            frames = [int(x) for x in fmap.ravel() if x >= 0]
            got = sr.get_frames(frames)
        moved = ds.siff.apply_shifts(reg).intensity.isel(channel=0).values
        want = moved.reshape(-1, 48, 40)[(fmap >= 0).ravel()]
        np.testing.assert_array_equal(got, want)
        two = ds.assign(source_file=ds.source_file.where(ds.time < ds.time[5], "/b.siff"))
        with pytest.raises(ValueError, match=r"one \.siff file"):
            save_registration_info(reg, two)  # frames of two files: no single sidecar
    with SiffReader(t.path) as sr, pytest.raises(ValueError, match=r"a SiffPy registration"):
        sr.load_registration_info(tmp_path / "s.dict")


@pytest.fixture(scope="module")
def repeats_file(tmp_path_factory):
    """2 channels, 3 slices x 2 frames per slice, 1 flyback, events on awkward frames."""
    # frames per volume: 3 * 2 * 2 + 2 (flyback, both channels) = 14
    return write_siff(tmp_path_factory.mktemp("rep") / "rep.siff", shape=(16, 12),
                      channels=(1, 2), n_slices=3, frames_per_slice=2, n_flyback=1,
                      n_timepoints=5, extra_frames=3, photons_per_frame=400,
                      events={12: ("on flyback", 0.25), 3: ("on colour 1", None)}, seed=8)


def test_time_methods_give_siffpy_s_axes_with_units(repeats_file, tmp_path):
    from pathlib import Path

    from siff_xarray.compat import Timeseries

    t = repeats_file
    sr = SiffReader(Path(t.path))
    assert isinstance(sr.filename, Path)  # SiffPy keeps the Path it was given
    ip = sr.im_params
    ax = sr.t_axis()
    assert isinstance(ax, Timeseries) and ax.units == "experiment_seconds"
    assert len(ax) == t.n_timepoints  # one per timepoint (was one per frame with R = 2)
    first = np.asarray(ip.flatten_by_timepoints(reference_z=0)).reshape(-1, 2)[:, 0]
    np.testing.assert_allclose(ax, t.frame_time_s[first], rtol=0, atol=1e-9)
    ep = sr.get_time(reference_time="epoch")
    assert ep.units == "epoch_nanoseconds" and ep.dtype == np.int64
    np.testing.assert_array_equal(ep, t.epoch_laser_ns)
    with pytest.raises(ValueError, match="different units"):
        _ = sr.get_time() - ep
    assert (sr.t_axis() - sr.t_axis()[0]).units == "experiment_seconds"
    assert sr.time_zero == int(t.epoch_laser_ns[0])
    assert sr.dt_frame == pytest.approx(0.016)
    assert sr.dt_volume == pytest.approx(0.016 * 7)  # 3 x 2 frames + 1 flyback scan
    assert sr.sec_to_frames(1.0) == int(1.0 / sr.dt_volume)
    assert sr.sec_to_frames(1.0, base="frame") == int(1.0 / 0.016)
    # epoch <-> experiment time, exact both ways (SiffPy's epoch_to_frame_time is 1e18 off)
    k = 17
    assert sr.frame_time_to_epoch_time(t.frame_time_s[k]) == pytest.approx(
        int(t.epoch_laser_ns[k]), abs=1000)
    assert sr.epoch_to_frame_time(int(t.epoch_laser_ns[k])) == pytest.approx(
        t.frame_time_s[k], abs=1e-6)
    vol_epochs = np.asarray(sr.t_axis(reference_time="epoch"))
    assert sr.epoch_time_to_volume_index(vol_epochs[2]) == 2
    assert sr.epoch_time_to_volume_index(vol_epochs[2] + 1) == 3  # SiffPy's rule: next start
    # both channels of a scan share its time: the first of them is "at or after"
    assert sr.epoch_time_to_frame_index(int(t.epoch_laser_ns[k])) == k - 1
    # the time axis saves where SiffPy keeps its files (SiffPy's own save raised)
    saved = sr.save_time_axis()
    assert saved == Path(t.path).parent / "rep" / "rep_time_axis.npy"
    np.testing.assert_array_equal(sr.load_time_axis(), ax)
    # events on every frame, flyback and colour 1 included (SiffPy looks at colour 0 only)
    events = sr.get_appended_text()
    assert [(e.frame_number, e.text) for e in events] == [(3, "on colour 1"),
                                                         (12, "on flyback")]
    assert events[1].timestamp == pytest.approx(0.25) and events[0].timestamp is None
    assert events[1].epoch_ns(sr) == sr.frame_time_to_epoch_time(0.25)
    meta = sr.get_frames_metadata([0, 5])
    assert [m["frameNumbers"] for m in meta] == [0, 5]  # as the synthetic writer numbers
    assert [m["frameTimestamps_sec"] for m in meta] == pytest.approx(t.frame_time_s[[0, 5]])
    assert len(sr.get_frames_metadata()) == len(ip.flatten_by_timepoints())
    with pytest.raises(NotImplementedError, match="coarsen"):
        sr.pool_frames()
    sr.close()


def test_histograms_sum_masks_dtype_and_fitted_flim_params(tmp_path):
    t = write_siff(tmp_path / "two.siff", shape=(32, 32), channels=(1, 2), n_slices=2,
                   n_flyback=1, n_timepoints=20, photons_per_frame=6000,
                   lifetimes_ns=(0.6, 2.8), fractions=(0.4, 0.6), seed=12)
    with SiffReader(t.path) as sr:
        ip = sr.im_params
        h = sr.histograms()
        assert h.dtype == np.uint64 and h.shape == (2, ip.num_bins + 2)
        np.testing.assert_array_equal(h[1], sr.get_histogram(ip.framelist_by_color(1)))
        np.testing.assert_array_equal(sr.histograms(1, (0, 5))[0],
                                      sr.get_histogram(ip.framelist_by_color(1)[:5]))
        mask = np.zeros((32, 32), bool)
        mask[4:20, 6:30] = True
        assert sr.sum_mask(mask).dtype == np.uint64  # SiffPy's dtype
        assert sr.sum_masks([mask, ~mask]).dtype == np.uint64
        assert sr.flim_params is None
        p1 = sr.fit_flimparams_to_timepoints(color_channel=1)
        # stored at its colour, the others padded (SiffPy put it first when none were set)
        assert sr.flim_params == (None, p1)
        assert [tau for tau, _ in p1.exps] == pytest.approx([0.6, 2.8], rel=0.15)
        assert p1.irf[0] == pytest.approx(t.irf_offset_ns, abs=0.1)
        assert p1.units == "nanoseconds" and p1.tau_offset == p1.irf[0]
        # the fitted params work where SiffPy's do: offsets in their units
        trace = sr.sum_mask_flim(mask, p1, color_channel=2)
        assert np.nanmean(np.asarray(trace)) > 0
        p0 = sr.fit_flimparams_to_timepoints(color_channel=0, mask=mask, num_exps=1)
        assert sr.flim_params == (p0, p1) and p0.n_exp == 1
    one = write_siff(tmp_path / "one.siff", shape=(16, 16), n_timepoints=3, seed=1)
    with SiffReader(one.path) as sr:
        assert sr.histograms().shape[0] == 1  # SiffPy's raises on one channel


def test_imparams_scales_labels_and_dict_view(seed_file, tmp_path):
    with SiffReader(seed_file.path) as sr:
        ip = sr.im_params
        dy, dx = ip.pixel_size_um
        assert ip.scale == pytest.approx([1.0, ip.step_size, 1.0, dy, dx])
        assert ip.scale_force_z == ip.scale  # several slices: z is there already
        assert ip.scale_no_color_no_fps == pytest.approx([1.0, ip.step_size, dy, dx])
        assert ip.axis_labels == ["Time", "Z planes", "Color channel", "y", "x"]
        assert ip.final_full_volume_frame == N_T * 6 * 2
        assert ip.array_shape[ip.CHANNEL_AXIS] == 2
        assert "FastZ" in ip and "StackManager" in ip and "Nope" not in ip  # was TypeError
        assert set(ip.keys()) >= {"FastZ", "StackManager"}
        assert dict(ip.items())["FastZ"] is ip["FastZ"]
        assert len(ip.values()) == len(ip.keys())
    one = write_siff(tmp_path / "flat.siff", shape=(16, 16), n_timepoints=3, seed=1)
    with SiffReader(one.path) as sr:
        ip = sr.im_params
        assert ip.axis_labels == ["Time", "y", "x"]
        assert len(ip.scale) == 4 and ip.scale_force_z[1] == 1.0 and len(ip.scale_force_z) == 5


def test_flimtrace_arithmetic_is_siffpy_s_intensity_weighted_pooling(seed_file):
    from siff_xarray.compat import FlimTrace

    a = FlimTrace(np.array([100.0, 120.0, np.nan]), np.array([10.0, 30.0, 0.0]))
    b = FlimTrace(np.array([110.0, 90.0, 130.0]), np.array([10.0, 10.0, 5.0]))
    # np.sum / np.mean: the intensity-weighted lifetime (was a plain sum of lifetimes)
    s = np.sum(a)
    assert float(s) == pytest.approx((100 * 10 + 120 * 30) / 40) and s.intensity == 40
    assert float(np.nansum(a)) == float(s) and float(a.sum()) == float(s)
    assert float(np.mean(a)) == float(s) and np.mean(a).intensity == pytest.approx(40 / 3)
    # pooling photons: intensities add, lifetimes average weighted by intensity
    c = a + b
    np.testing.assert_allclose(c.intensity, [20, 40, 5])
    np.testing.assert_allclose(np.asarray(c)[:2], [105.0, 112.5])
    d = c - b  # removing b's photons gives a back
    np.testing.assert_allclose(np.asarray(d)[:2], [100.0, 120.0])
    # a number changes the intensity only; trace x trace is refused
    np.testing.assert_array_equal(np.asarray(a * 2), np.asarray(a))
    np.testing.assert_array_equal((a * 2).intensity, [20, 60, 0])
    np.testing.assert_array_equal((a + 1).intensity, [11, 31, 1])
    with pytest.raises(TypeError, match="FlimTrace times a FlimTrace"):
        _ = a * b
    np.testing.assert_array_equal((-a).intensity, -a.intensity)
    # building from a list, indexing, concatenation, in-place operators
    st = FlimTrace([a, b])
    assert st.shape == (2, 3) and st.method == "empirical lifetime"
    row = st[1]
    assert isinstance(row, FlimTrace) and float(row[0]) == 110.0 and row[0].intensity == 10
    np.testing.assert_array_equal(st[...], st.lifetime)
    cat = np.concatenate([a, b])
    assert cat.shape == (6,) and cat.intensity.sum() == 65
    e = FlimTrace(a.lifetime.copy(), a.intensity.copy())
    e += b
    np.testing.assert_allclose(e.intensity, c.intensity)
    # other ufuncs act on the lifetime: comparisons give plain arrays
    assert (a > 105).tolist() == [False, True, False]
    with pytest.raises(ValueError, match="different units"):
        _ = a + FlimTrace(b.lifetime, b.intensity, units="nanoseconds")
    # a real trace: the per-timepoint value of a 3-D mask equals np.sum over its planes
    with SiffReader(seed_file.path) as sr:
        mask = np.zeros((6, 256, 128), bool)
        mask[:, 40:200, 20:100] = True
        per_frame = sr.sum_mask_flim(mask, return_framewise=True)
        per_tp = sr.sum_mask_flim(mask)
        pooled = np.sum(per_frame.reshape(-1, 6), axis=1)
        np.testing.assert_allclose(np.asarray(per_tp), np.asarray(pooled), rtol=1e-9)
        np.testing.assert_allclose(per_tp.intensity, pooled.intensity)


@pytest.mark.parametrize("protocol", [2, 5])
def test_legacy_pickled_registrations_load_as_plain_data_only(tmp_path, protocol):
    import os
    import pickle

    t = write_siff(tmp_path / "old.siff", shape=(16, 16), n_slices=2, n_timepoints=3,
                   photons_per_frame=300, seed=3)
    shifts = {int(f): (np.int64(f % 3 - 1), np.int64(1 - f % 2)) for f in range(6)}
    refs = [np.full((16, 16), k, dtype=np.float32) for k in range(2)]
    (tmp_path / "old.dict").write_bytes(pickle.dumps(shifts, protocol=protocol))
    (tmp_path / "old.ref").write_bytes(pickle.dumps(refs, protocol=protocol))
    with SiffReader(t.path) as sr:  # applied on open, as SiffPy does
        assert sr.registration_dict == {f: (int(a), int(b)) for f, (a, b) in shifts.items()}
        np.testing.assert_array_equal(sr.reference_frames, np.stack(refs))
        np.testing.assert_array_equal(
            sr.get_frames([4]), np.roll(sr.get_frames([4], registration_dict={}),
                                        shifts[4], axis=(-2, -1)))
    # a pickle that would run code is refused, and the code never runs
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "old.dict").write_bytes(pickle.dumps({0: Evil()}, protocol=protocol))
    with pytest.raises(ValueError, match=r"old\.dict: not a SiffPy registration pickle of "
                       "plain data .*posix.system|old\\.dict: not a SiffPy"):
        SiffReader(t.path)
    assert not marker.exists()


def test_flimparams_files_beside_the_data_load_on_open_and_round_trip(tmp_path):
    import json

    from siff_xarray.compat import FLIMParams

    t = write_siff(tmp_path / "fp.siff", shape=(16, 16), channels=(1, 2), n_timepoints=3,
                   photons_per_frame=500, seed=4)
    folder = tmp_path / "fp"
    folder.mkdir()
    # SiffPy's to_dict layout (aliases for the irf), colour 1 written first by name
    (folder / "a.flimparams").write_text(json.dumps({
        "exps": [{"lifetime": 2.5, "fraction": 1.0, "units": "nanoseconds"}],
        "irf": {"mean": 1.3, "sigma": 0.1, "units": "nanoseconds"}, "color_channel": 1,
        "noise": 0.1, "name": None, "units": "nanoseconds", "class": "FLIMParams"}))
    FLIMParams(exps=[(0.6, 0.4), (2.8, 0.6)], irf=(1.2, 0.12), color_channel=0).save(
        folder / "b")
    with SiffReader(t.path) as sr:
        p0, p1 = sr.flim_params  # sorted by colour
        assert p0.exps == [(0.6, 0.4), (2.8, 0.6)] and p1.exps == [(2.5, 1.0)]
        assert p1.tau_offset == 1.3 and p1.noise == 0.1 and p1.units == "nanoseconds"
        mask = np.ones((16, 16), bool)
        np.testing.assert_allclose(np.asarray(sr.sum_mask_flim(mask, p1, color_channel=2)),
                                   np.asarray(sr.sum_mask_flim(mask, 65.0, color_channel=2)))
    assert FLIMParams.load(folder / "b.flimparams") == FLIMParams.from_dict(p0.to_dict())
    (folder / "c.flimparams").write_text("{not json")
    with pytest.raises(ValueError, match=r"c\.flimparams: not a SiffPy \.flimparams file"):
        SiffReader(t.path)
