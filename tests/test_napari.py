"""The napari plugin: layers of .siff files and converted stores, headless screenshots."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import xarray as xr

from siff_xarray import store as zs
from siff_xarray.napari_reader import flim_rgb, get_reader, read
from siff_xarray.synthetic import write_siff


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("napari")
    t = write_siff(d / "n.siff", shape=(64, 48), channels=(1, 2), n_slices=2, n_timepoints=6,
                   photons_per_frame=4000, channel_brightness=(1.0, 0.1), seed=2)
    zs.convert(t.path, d / "n.zarr", progress=False)
    return t, d


def test_flim_rgb_maps_lifetime_to_hue_and_counts_to_brightness():
    tau = np.array([1.0, 2.0, 3.0, 3.0, np.nan])
    counts = np.array([10, 10, 10, 5, 0])
    rgb = flim_rgb(tau, counts, (1.0, 3.0), 10.0)
    assert rgb.dtype == np.uint8 and rgb.shape == (5, 3)
    np.testing.assert_array_equal(rgb[0], [255, 0, 0])  # shortest: red
    np.testing.assert_array_equal(rgb[1], [0, 255, 0])  # middle: green
    np.testing.assert_array_equal(rgb[2], [0, 0, 255])  # longest: blue
    np.testing.assert_array_equal(rgb[3], [0, 0, 128])  # half the photons: half as bright
    np.testing.assert_array_equal(rgb[4], [0, 0, 0])    # no photon: black


def test_reader_finds_siff_files_and_store_roots_only(files, tmp_path):
    t, d = files
    assert get_reader(t.path) is read and get_reader([str(d / "n.zarr")]) is read
    assert get_reader(str(tmp_path)) is None and get_reader(str(d / "n.zarr" / "ome")) is None
    assert get_reader([t.path, t.path]) is None


@pytest.mark.parametrize("which", ["n.siff", "n.zarr"])
def test_layers_have_physical_scale_colours_contrast_and_lazy_lifetimes(files, which):
    import warnings

    import dask.array as da

    t, d = files
    with warnings.catch_warnings():  # a viewer's user sees no warning about its chunks
        warnings.simplefilter("error")
        out = read(str(d / which))
    names = [meta["name"] for _, meta, _ in out]
    assert names == [f"{which} Channel 1", f"{which} Channel 2",
                     f"{which} Channel 1 lifetime", f"{which} Channel 2 lifetime"]
    with xr.open_dataset(t.path, engine="siff") as ds:
        for (data, meta, kind), ch in zip(out[:2], ds.channel.values, strict=True):
            assert kind == "image" and isinstance(data, da.Array)
            assert data.chunksize[0] == 1  # one volume decoded per displayed timepoint
            np.testing.assert_array_equal(data.compute(), ds.intensity.sel(channel=ch))
            assert meta["axis_labels"] == ["time", "z", "y", "x"]
            assert meta["units"] == ["s", "um", "um", "um"]
            np.testing.assert_allclose(meta["scale"], [
                float(np.diff(ds.time.values).mean()), float(np.diff(ds.z.values)[0]),
                float(np.diff(ds.y.values)[0]), float(np.diff(ds.x.values)[0])], rtol=1e-6)
            assert meta["blending"] == "additive"
            lo, hi = meta["contrast_limits"]
            assert hi == pytest.approx(max(np.percentile(ds.intensity.sel(channel=ch), 99.8,
                                                         method="linear"), lo + 1), rel=0.5)
        assert [m["colormap"] for _, m, _ in out[:2]] == ["green", "magenta"]
        assert out[0][1]["contrast_limits"][1] > out[1][1]["contrast_limits"][1]  # dim: own
        rgb, meta, _ = out[2]
        assert meta["rgb"] and meta["visible"] and not out[3][1]["visible"]
        assert isinstance(rgb, da.Array) and rgb.shape == (*out[0][0].shape, 3)
        lo, hi = meta["metadata"]["lifetime_range_ns"]
        frame = rgb[1, 0].compute()
        tau = ds.siff.lifetime(channel=1).isel(time=1, z=0).values
        counts = ds.intensity.sel(channel=1).isel(time=1, z=0).values
        np.testing.assert_array_equal(frame, flim_rgb(tau, counts, (lo, hi),
                                                      out[0][1]["contrast_limits"][1]))


def test_manifest_is_valid():
    npe2 = pytest.importorskip("npe2")
    manifest = npe2.PluginManifest.from_distribution("siff-xarray")
    assert manifest.name == "siff-xarray"
    reader = manifest.contributions.readers[0]
    assert "*.siff" in reader.filename_patterns and reader.accepts_directories


_SHOT = textwrap.dedent("""
    import json, sys, warnings
    import numpy as np
    warnings.simplefilter("ignore")
    import napari

    path, plugin = sys.argv[1], (sys.argv[2] or None)
    viewer = napari.Viewer(show=True)
    viewer.open(path, plugin=plugin)
    viewer.dims.set_current_step(0, 2)
    viewer.reset_view()

    def shot():
        img = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(float)
        return img

    flim = shot()
    for layer in viewer.layers:
        layer.visible = "lifetime" not in layer.name
    inten = shot()
    lit = flim[flim.max(axis=-1) > 40]
    hue_bins = np.unique(np.argmax(lit, axis=-1)) if lit.size else []
    print(json.dumps({"layers": [layer.name for layer in viewer.layers],
                      "flim_std": float(flim.std()), "inten_std": float(inten.std()),
                      "inten_mean": inten.reshape(-1, 3).mean(0).tolist(),
                      "flim_dominant_channels": [int(h) for h in hue_bins]}))
    viewer.close()
""")


@pytest.mark.slow
@pytest.mark.parametrize(("which", "plugin"), [("n.siff", ""), ("n.zarr", "siff-xarray")])
def test_napari_shows_flim_headless(files, tmp_path, which, plugin):
    pytest.importorskip("napari")
    if shutil.which("xvfb-run") is None:
        pytest.skip("xvfb-run is not installed (apt-get install xvfb): no headless display")
    _, d = files
    script = tmp_path / "shot.py"
    script.write_text(_SHOT)
    env = {**os.environ, "QT_QPA_PLATFORM": "xcb", "XDG_RUNTIME_DIR": str(tmp_path)}
    r = subprocess.run(["xvfb-run", "-a", sys.executable, str(script), str(d / which),
                        plugin], capture_output=True, text=True, timeout=600, env=env,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(got["layers"]) == 4
    # not blank: the lifetime view has pixels of several hues (red, green, blue dominant)
    assert got["flim_std"] > 5 and len(got["flim_dominant_channels"]) >= 2
    # the intensity view shows both channels: green (channel 1) and magenta (channel 2)
    # (gray colormaps, as the OME image had, would give r == g == b)
    r_mean, g_mean, b_mean = got["inten_mean"]
    assert got["inten_std"] > 5 and r_mean > 1 and b_mean == pytest.approx(r_mean, rel=0.05)
    assert g_mean > 1.3 * r_mean  # the bright channel 1 is green
