"""ImParams: the seed walkthrough's printed lists are the specification."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from siff_xarray import SiffFile, SiffWarning
from siff_xarray.format.imparams import ImParams
from siff_xarray.format.metadata import parse_nvfd
from siff_xarray.synthetic import scanimage_header, write_siff

SEED_FLAT = [0, 2, 4, 6, 8, 10, 14, 16, 18, 20, 22, 24, 28, 30, 32, 34, 36, 38, 42, 44, 46, 48,
             50, 52, 56, 58, 60, 62, 64, 66, 70, 72, 74, 76, 78, 80, 84, 86, 88, 90, 92, 94, 98,
             100, 102, 104, 106, 108, 112, 114, 116, 118, 120, 122, 126, 128, 130, 132, 134, 136]


@pytest.fixture
def seed_params():
    text = scanimage_header(height=256, width=128, channels=(1, 2), n_slices=6, n_flyback=1,
                            n_volumes=6736)
    return ImParams(parse_nvfd(text), 94306, (256, 128))


def test_seed_walkthrough(seed_params):
    ip = seed_params
    assert ip.FastZ.numDiscardFlybackFrames == 1
    assert ip.FastZ.discardFlybackFrames is True
    assert ip.FastZ.waveformType == "sawtooth"
    assert ip["FastZ"].enable is True
    assert ip.flatten_by_timepoints(timepoint_start=0, timepoint_end=10) == SEED_FLAT
    assert ip.flatten_by_timepoints(timepoint_start=0, timepoint_end=10, reference_z=3) == \
        [6, 20, 34, 48, 62, 76, 90, 104, 118, 132]
    assert ip.framelist_by_color(color_channel=0, lower_bound_timepoint=0,
                                 upper_bound_timepoint=10) == SEED_FLAT
    assert ip.framelist_by_slices(color_channel=0, lower_bound=0, upper_bound=5,
                                  slices=[2]) == [4, 18, 32, 46, 60]
    assert len(ip.framelist_by_slices(color_channel=0, slices=[3])) == 6736
    assert ip.array_shape == (6736, 6, 2, 256, 128)
    assert len(ip.flatten_by_timepoints(color_channel=None)) == np.prod(ip.array_shape[:3])
    assert ip.shape == (256, 128)
    assert ip.volume == (6, 2, 256, 128)
    assert ip.single_channel_volume == (6, 256, 128)
    assert (ip.num_slices, ip.num_colors, ip.num_frames, ip.num_timepoints) == (6, 2, 94306, 6736)
    assert ip.picoseconds_per_bin == 20.0
    assert ip.num_bins == 629
    assert ip.frames_per_volume == 12 and ip.num_discard_flyback_frames == 2
    # the two frames of the unfinished volume 6736 (slice 0, both colours)
    assert ip.num_partial_frames == 2
    assert ip.framelist_by_slice(0, 0, include_partial=True)[-1] == 94304
    assert ip.framelist_by_slice(0, 0)[-1] == 94304 - 14


def test_reference_z_list_and_channel_index(seed_params):
    ip = seed_params
    assert ip.flatten_by_timepoints(0, 2, reference_z=[1, 3]) == [2, 6, 16, 20]
    assert ip.flatten_by_timepoints(0, 1, reference_z=0, color_channel=1) == [1]
    with pytest.raises(ValueError, match="color_channel 2 out of range"):
        ip.flatten_by_timepoints(0, 1, color_channel=2)
    with pytest.raises(ValueError, match="slice 6 out of range"):
        ip.flatten_by_timepoints(0, 1, reference_z=6)


def test_locate_inverts_frame_lists(seed_params):
    ip = seed_params
    idx = ip.frame_indices(range(5))
    pos = ip.locate(idx.ravel())
    t, z, _r, c = np.meshgrid(range(5), range(6), range(1), range(2), indexing="ij")
    np.testing.assert_array_equal(pos["timepoint"], t.ravel())
    np.testing.assert_array_equal(pos["slice"], z.ravel())
    np.testing.assert_array_equal(pos["channel"], c.ravel())
    assert ip.frame_position(12) == "flyback"
    p = ip.frame_position(94305)
    assert (p.timepoint, p.slice, p.channel, p.complete) == (6736, 0, 1, False)
    assert ip.flyback_frames[:4] == [12, 13, 26, 27]


def test_frames_per_slice_uses_slices(tmp_path):
    text = scanimage_header(height=4, width=4, channels=(1, 2), n_slices=3, frames_per_slice=2,
                            n_flyback=1)
    ip = ImParams(parse_nvfd(text), 14 * 4, (4, 4))
    # per volume: slice s repeat j channel c at (s*2 + j)*2 + c; flyback 12, 13
    assert ip.array_shape == (4, 3, 2, 2, 4, 4)
    assert ip.flatten_by_timepoints(0, 2, reference_z=1) == [4, 6, 18, 20]
    assert ip.framelist_by_slices(0, 0, 2, slices=[2]) == [8, 10, 22, 24]
    assert ip.single_channel_volume == (3, 2, 4, 4)
    pos = ip.frame_position(7)
    assert (pos.slice, pos.repeat, pos.channel) == (1, 1, 1)


def test_exact_timepoints_for_partial_volume():
    text = scanimage_header(height=4, width=4, channels=(1,), n_slices=12, n_flyback=2)
    # 10 volumes, then 12 real frames and 1 flyback frame of an 11th: 11 complete volumes
    ip = ImParams(parse_nvfd(text), 14 * 10 + 13, (4, 4))
    assert ip.num_timepoints == 11
    ip = ImParams(parse_nvfd(text), 14 * 10 + 5, (4, 4))
    assert ip.num_timepoints == 10 and ip.num_partial_frames == 5
    assert ip.num_true_frames == 125


def test_flyback_gated_on_fastz_enable():
    text = scanimage_header(height=4, width=4, n_slices=1).replace(
        "SI.hFastZ.numDiscardFlybackFrames = 0", "SI.hFastZ.numDiscardFlybackFrames = 1")
    ip = ImParams(parse_nvfd(text), 1000, (4, 4))
    assert ip.num_discard_flyback_frames == 0
    assert ip.num_timepoints == 1000


def test_single_channel_save_not_1():
    text = scanimage_header(height=4, width=4, channels=(2,))
    ip = ImParams(parse_nvfd(text), 10, (4, 4))
    # SiffPy: one saved channel is an int; color_list is always a list
    assert ip.colors == 2 and ip.color_list == [2] and ip.num_colors == 1
    assert ip.framelist_by_slice() == [list(range(10))]
    assert ip.channel_names == ["Channel 2"]


def test_real_file_reshapes_to_array_shape(siff_files):
    for name in ("partial_volume", "frames_per_slice", "two_chan_slices_flyback"):
        t = siff_files[name]
        with SiffFile(t.path) as f:
            ip = f.im_params
            frames = ip.flatten_by_timepoints(color_channel=None)
            arr = f.read_frames(frames).reshape(ip.array_shape)
            idx = ip.frame_indices()
            want = t.intensity(idx.ravel()).reshape(arr.shape)
            np.testing.assert_array_equal(arr, want)
            pos = ip.locate(range(f.num_frames))
            assert pos["flyback"].sum() == len(ip.flyback_frames)
            assert sorted(ip.all_frames + ip.flyback_frames) == list(range(f.num_frames))


def test_seed_layout_file(tmp_path):
    t = write_siff(tmp_path / "seed.siff", shape=(256, 128), channels=(1, 2), n_slices=6,
                   n_flyback=1, n_timepoints=3, extra_frames=2, photons_per_frame=50)
    with SiffFile(t.path) as f:
        ip = f.im_params
        assert ip.array_shape == (3, 6, 2, 256, 128)
        assert ip.flatten_by_timepoints(0, 3) == SEED_FLAT[:18]
        assert f.read_frames(ip.framelist_by_slices(color_channel=0, slices=[3])).shape == \
            (3, 256, 128)


def test_unusable_header_values():
    """Corrupt header values: a clear error where one is needed, ``None``/defaults elsewhere."""
    from siff_xarray.errors import SiffFormatError

    text = scanimage_header(height=4, width=6, n_slices=3)
    bad = (text.replace("pixelsPerLine = 6", "pixelsPerLine = '5ASI.hRoiMan'")
           .replace("scanZoomFactor = 2.0", "scanZoomFactor = 'x'")
           .replace("scanFramePeriod = 0.016", "scanFramePeriod = NaN")
           .replace("zsRelative = [0.0 10.0 20.0]", "zsRelative = {'a' 'b' 'c'}"))
    ip = ImParams(parse_nvfd(bad), 0, None, name="f.siff")  # no frames: sizes from the header
    assert ip.ysize == 4
    with pytest.raises(SiffFormatError, match=r"f\.siff.*pixelsPerLine .* is not a frame size"):
        _ = ip.xsize
    # optional values that are unusable: ignored, with one warning naming file and key
    for read, key in [(lambda: ip.zoom, "scanZoomFactor = 'x'"),
                      (lambda: ip.dt_frame, "scanFramePeriod = NaN"),
                      (lambda: ip.z_vals, "zsRelative = {'a' 'b' 'c'}")]:
        with pytest.warns(SiffWarning, match=rf"f\.siff: SI\.h\w+\.{key} in the header is "
                          r"not .*; it is ignored"):
            assert read() is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert read() is None  # once per key
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SiffWarning)
        np.testing.assert_array_equal(ip.z_positions, [0.0, 10.0, 20.0])  # the step size
    # layout metadata is never guessed: a channel list that is not one is an error
    with pytest.raises(SiffFormatError, match=r"f\.siff.*channelSave = 1e300 .* channel"):
        ImParams(parse_nvfd(bad.replace("channelSave = 1", "channelSave = 1e300")), 0, None,
                 name="f.siff")
    # with frames, the IFDs give the shape and the bad header size is never needed
    assert ImParams(parse_nvfd(bad), 6, (4, 6)).shape == (4, 6)


def test_framelist_by_slices_without_slices_is_one_list_per_slice():
    text = scanimage_header(height=4, width=4, channels=(1, 2), n_slices=3, n_flyback=1)
    ip = ImParams(parse_nvfd(text), 8 * 10 + 2, (4, 4))  # 10 volumes + 2 frames
    assert ip.colors == [1, 2]
    per_slice = ip.framelist_by_slices(color_channel=0)
    assert len(per_slice) == 3  # SiffPy: a list per slice (was one flat list)
    assert per_slice == [ip.framelist_by_slices(color_channel=0, slices=[z]) for z in range(3)]
    assert per_slice[1][:3] == [2, 10, 18]
    # bounds stay timepoints (SiffPy applied them to the list of slices: a quirk)
    assert ip.framelist_by_slices(0, 2, 4) == [[16, 24], [18, 26], [20, 28]]
