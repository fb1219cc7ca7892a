"""The virtual Zarr view: count images of compressed frames read in place."""

from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr

from siff_xarray import SiffFormatError
from siff_xarray.synthetic import write_siff
from siff_xarray.virtual import open_virtual, references, write_references


@pytest.mark.parametrize("kw", [
    dict(shape=(6, 5), channels=(1, 2), n_slices=2, n_flyback=1, n_timepoints=3,
         extra_frames=1),
    dict(shape=(8, 8), channels=(2, 3), n_slices=2, frames_per_slice=3, n_flyback=2,
         n_timepoints=2, events={4: ("go", 0.2)}),
    dict(shape=(16, 12), n_timepoints=5),
])
def test_virtual_equals_backend(tmp_path, kw):
    # flyback frames may use any encoding: only imaging frames are referenced
    t = write_siff(tmp_path / "c.siff", encoding="compressed", photons_per_frame=150,
                   empty_compressed=True, **kw)
    refs = references(t.path)
    json.dumps(refs)  # serialisable
    with open_virtual(refs) as v, xr.open_dataset(t.path, engine="siff",
                                                  drop_variables="histogram") as ds:
        xr.testing.assert_identical(v.load(), ds.load())  # both leave a partial volume out
    with open_virtual(refs, partial_volume="keep") as v, xr.open_dataset(
            t.path, engine="siff", drop_variables="histogram", partial_volume="keep") as ds:
        xr.testing.assert_identical(v.load(), ds.load())
    write_references(t.path, tmp_path / "refs.json")
    with open_virtual(tmp_path / "refs.json") as v:
        np.testing.assert_array_equal(v.intensity.isel(time=1).values,
                                      t.intensity(v.frame_index.isel(time=1).values.ravel())
                                      .reshape(v.intensity.isel(time=1).shape))


def test_virtual_refuses_raw_frames(tmp_path):
    t = write_siff(tmp_path / "m.siff", shape=(6, 5), n_timepoints=3, encoding="mixed")
    with pytest.raises(SiffFormatError, match="not compressed"):
        references(t.path)


def test_virtual_over_http(http_server, tmp_path):
    t = write_siff(tmp_path / "h.siff", shape=(10, 8), channels=(1, 2), n_timepoints=3,
                   encoding="compressed", photons_per_frame=200, empty_compressed=True)
    url = f"{http_server.url}/h.siff"
    refs = references(url)
    assert all(v[0] == url for v in refs["refs"].values() if isinstance(v, list))
    with open_virtual(refs) as v, xr.open_dataset(t.path, engine="siff") as ds:
        np.testing.assert_array_equal(v.intensity.values, ds.intensity.values)
