"""The MATLAB-literal parser, the ScanImage settings mapping and ROI JSON."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from siff_xarray import SiffFile
from siff_xarray.format.metadata import (
    MatlabParseError,
    parse_matlab_value,
    parse_nvfd,
    parse_roi_groups,
)
from siff_xarray.synthetic import _mat


@pytest.mark.parametrize("text,want", [
    ("30", 30), ("-45", -45), ("0.0163", 0.0163), ("1e-05", 1e-05), (".5", 0.5),
    ("true", True), ("false", False), ("'sawtooth'", "sawtooth"), ("'it''s'", "it's"),
    ('"dq"', "dq"), ("''", ""), ("", None), ("  ", None),
])
def test_scalars(text, want):
    assert parse_matlab_value(text) == want


def test_special_floats():
    assert math.isnan(parse_matlab_value("NaN"))
    assert parse_matlab_value("Inf") == math.inf
    assert parse_matlab_value("-Inf") == -math.inf


def test_arrays():
    v = parse_matlab_value("[1 2 3]")
    assert v.dtype == np.int64 and v.tolist() == [1, 2, 3]
    v = parse_matlab_value("[1;2]")
    assert v.shape == (2, 1) and v.ravel().tolist() == [1, 2]
    v = parse_matlab_value("[1 2;3 4.5]")
    assert v.dtype == np.float64 and v.tolist() == [[1, 2], [3, 4.5]]
    v = parse_matlab_value("[true false]")
    assert v.dtype == bool and v.tolist() == [True, False]
    assert parse_matlab_value("[]").shape == (0,)
    assert parse_matlab_value("[1,2, 3]").tolist() == [1, 2, 3]
    assert parse_matlab_value("[NaN -Inf 2]")[1] == -math.inf
    assert parse_matlab_value("['ab' 'cd']") == "abcd"


def test_cells():
    assert parse_matlab_value("{'a' 'b'}") == ["a", "b"]
    assert parse_matlab_value("{}") == []
    v = parse_matlab_value("{[1 2] 'x' {3}}")
    assert v[0].tolist() == [1, 2] and v[1] == "x" and v[2] == [3]
    assert parse_matlab_value("{1;2}") == [[1], [2]]


@pytest.mark.parametrize("text", ["[1 2", "'open", "abc", "[1 2;3]", "1 2", "<nonscalar>",
                                  "[" * 40 + "]" * 40, "scanimage.types.X"])
def test_not_literals(text):
    with pytest.raises(MatlabParseError):
        parse_matlab_value(text)


finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
scalars = st.one_of(st.integers(-10**12, 10**12), finite, st.booleans(),
                    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=12))


@given(scalars)
def test_scalar_round_trip(v):
    got = parse_matlab_value(_mat(v))
    assert got == v and type(got) is type(v)


@given(st.lists(st.integers(-1000, 1000), min_size=1, max_size=6),
       st.integers(1, 4))
def test_matrix_round_trip(row, nrows):
    m = np.array([row] * nrows)
    got = parse_matlab_value(_mat(m) if nrows > 1 else _mat(m[0]))
    np.testing.assert_array_equal(got, m if nrows > 1 else m[0])


@given(st.lists(scalars, max_size=5))
def test_cell_round_trip(items):
    assert parse_matlab_value(_mat(items)) == items


def test_nvfd_nested_mapping(siff_files):
    with SiffFile(siff_files["two_chan_slices_flyback"].path) as f:
        md = f.metadata
        assert md["SI"]["hFastZ"]["enable"] is True
        assert md.get_path("SI.hScan2D.Acq.Tau_bins") == 629
        assert md["SI"]["hChannels"]["channelSave"].ravel().tolist() == [1, 2]
        assert md["SI"]["hBeams"]["pzAdjust"] == "scanimage.types.BeamAdjustTypes.None"
        assert md["SI"]["hChannels"]["channelName"][1] == "Channel 2"
        assert md.raw["SI.hFastZ.waveformType"] == "'sawtooth'"
        assert math.isnan(md["SI"]["hScan2D"]["scannerFrequency"])
        assert f.header.nvfd_text.startswith("SI.VERSION_MAJOR = 2023")
        assert f.header.scanimage_version == 4 and f.header.bigtiff


def test_nvfd_odd_lines():
    md = parse_nvfd("SI.a = 1\nnot a setting\nSI.b =\nSI.a.c = 2\n\x00")
    assert md.unparsed_lines == ["not a setting"]
    assert md.get_path("SI.b") is None
    assert md["SI"]["a"] == {"_value": 1, "c": 2}


def test_roi_groups(siff_files):
    with SiffFile(siff_files["single_raw"].path) as f:
        g = f.roi_groups["imagingRoiGroup"]
        assert g.name == "Default Imaging ROI Group"
        sf = g.rois[0].scanfields[0]
        assert sf.pixel_resolution_xy == (12, 16)
        assert sf.affine.shape == (3, 3)


def test_roi_json_tolerant():
    assert parse_roi_groups('{"RoiGroups": {"imagingRoiGroup": null}}\x00\x00') == {}
    assert parse_roi_groups("") == {}
    with pytest.warns(UserWarning, match="malformed"):
        assert parse_roi_groups("{not json") == {}
    g = parse_roi_groups('{"RoiGroups": {"imagingRoiGroup": {"name": "x", "rois": [{"name": '
                         '"a", "scanfields": [{"pixelResolutionXY": [4, 8]}, {}]}]}}}')
    assert g["imagingRoiGroup"].rois[0].scanfields[0].pixel_resolution_xy == (4, 8)


@settings(max_examples=300, deadline=None)
@given(st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1).map(str),
    st.integers(min_value=2**63 - 2, max_value=10**25).map(str),  # around/beyond int64
    st.integers(min_value=-(10**25), max_value=-(2**63) + 1).map(str),
    st.floats(allow_nan=False, allow_infinity=False, min_value=-1e9, max_value=1e9)
    .map(lambda v: f"{v:.6f}"),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.decimals(allow_nan=False, allow_infinity=False, places=9,
                min_value=-10**6, max_value=10**6).map(str),
    st.text(alphabet="0123456789.-+eE", min_size=1, max_size=25),
))
def test_fast_timestamp_parsing_equals_python(text):
    from siff_xarray.errors import SiffFormatError
    from siff_xarray.reader.frame_meta import parse_timestamps

    desc = f"frameNumbers = 0\nframeTimestamps_sec = {text}\nepoch = {text}\n".encode()
    buf = np.frombuffer(desc, dtype=np.uint8)
    args = (buf, np.array([0]), np.array([len(desc)]), np.array([0]), "f.siff")
    try:
        want_f = float(text)
    except ValueError:
        want_f = None
    try:
        want_i = int(text)
        if not -(2**63) <= want_i < 2**63:
            want_i = None
    except ValueError:
        want_i = None
    if want_f is None or want_i is None:
        with pytest.raises(SiffFormatError, match=r"non-numeric|out-of-range"):
            parse_timestamps(*args)
        return
    ts = parse_timestamps(*args)
    assert ts.experiment_s[0] == want_f or (np.isnan(want_f) and np.isnan(ts.experiment_s[0]))
    assert ts.epoch_laser_ns[0] == want_i


@pytest.mark.parametrize("key,value,match", [
    ("SI.hChannels.channelSave", "[-1;0]", r"channelSave = \[-1;0\] .* channel numbers"),
    ("SI.hStackManager.actualNumSlices", "Inf", "actualNumSlices = Inf .* whole number"),
    ("SI.hStackManager.actualNumSlices", "1" * 5000, "actualNumSlices = 1111.* whole number"),
    ("SI.hStackManager.framesPerSlice", "0.5", "framesPerSlice = 0.5 .* whole number"),
])
def test_unusable_layout_metadata_is_an_error_naming_the_key(tmp_path, key, value, match):
    import xarray as xr

    from siff_xarray.errors import SiffFormatError
    from siff_xarray.synthetic import write_siff

    t = write_siff(tmp_path / "l.siff", shape=(8, 8), n_slices=2, n_timepoints=2,
                   header_extra={key: value})
    with pytest.raises(SiffFormatError, match=rf"l\.siff: SI\..*{match}"):
        xr.open_dataset(t.path, engine="siff")


def test_unusable_optional_metadata_keeps_the_file_readable(tmp_path):
    import xarray as xr

    from siff_xarray.synthetic import write_siff

    t = write_siff(tmp_path / "o.siff", shape=(8, 8), n_slices=2, n_timepoints=2,
                   header_extra={"SI.hScan2D.someSetting": "7" * 5000})
    with xr.open_dataset(t.path, engine="siff") as ds:  # a 5000-digit number: kept as text
        np.testing.assert_array_equal(ds.intensity.values, ds.intensity.values)
        assert ds.sizes["z"] == 2
    with SiffFile(t.path) as f:
        assert f.metadata.flat["SI.hScan2D.someSetting"] == "7" * 5000


def test_roi_fields_of_the_wrong_type_are_ignored_with_a_warning():
    import json

    from siff_xarray.errors import SiffWarning

    doc = {"RoiGroups": {"imagingRoiGroup": {"name": "g", "rois": {"name": "r", "scanfields": {
        "centerXY": [0, 0], "sizeXY": [1, 1], "rotationDegrees": "abc",
        "pixelResolutionXY": [float("nan"), float("inf")], "affine": [[1, 0], [0]],
        "enable": 1}}}}}
    text = json.dumps(doc).replace("NaN", "NaN").replace("Infinity", "Infinity")
    with pytest.warns(SiffWarning, match=r"f\.siff: .*affine, pixelResolutionXY, "
                                         r"rotationDegrees"):
        groups = parse_roi_groups(text, "f.siff")
    sf = groups["imagingRoiGroup"].rois[0].scanfields[0]
    assert sf.rotation_degrees == 0.0 and sf.pixel_resolution_xy is None and sf.affine is None
    assert sf.center_xy == (0.0, 0.0) and sf.size_xy == (1.0, 1.0)
