"""The virtual Zarr view: count images of compressed frames read in place."""

from __future__ import annotations

import json
import warnings

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


@pytest.mark.parametrize("kw", [
    dict(shape=(6, 5), channels=(1, 2), n_slices=2, n_flyback=1, n_timepoints=3,
         extra_frames=1, events={2: ("go", 0.1)}),
    dict(shape=(8, 8), channels=(2, 3), n_slices=2, frames_per_slice=3, n_flyback=2,
         n_timepoints=2),
])
def test_virtualizarr_reads_every_variable(tmp_path, kw):
    """VirtualiZarr's kerchunk parser takes the references whole: no variable skipped.

    With ``inline=False`` the small arrays' chunks live in ``refs.json.chunks`` and are
    referenced by byte range (VirtualiZarr reads no inlined data); every variable it
    loads equals the one ``open_virtual`` gives.
    """
    pytest.importorskip("virtualizarr")
    from obspec_utils.registry import ObjectStoreRegistry
    from obstore.store import LocalStore
    from virtualizarr import open_virtual_dataset
    from virtualizarr.parsers import KerchunkJSONParser

    t = write_siff(tmp_path / "c.siff", encoding="compressed", photons_per_frame=150,
                   empty_compressed=True, **kw)
    out = tmp_path / "refs.json"
    write_references(t.path, out, inline=False)
    assert (tmp_path / "refs.json.chunks").stat().st_size > 0
    refs = json.loads(out.read_text())["refs"]
    assert all(isinstance(v, list) for k, v in refs.items()
               if k.rsplit("/", 1)[-1] not in (".zarray", ".zattrs", ".zgroup"))
    registry = ObjectStoreRegistry({"file:///": LocalStore()})
    url = out.resolve().as_uri()
    with warnings.catch_warnings():  # zarr: fixed-width strings are not in the v3 spec yet
        warnings.simplefilter("ignore", FutureWarning)
        virtual = open_virtual_dataset(url=url, parser=KerchunkJSONParser(), registry=registry,
                                       loadable_variables=[])
        names = list(virtual.variables)
        loaded = open_virtual_dataset(url=url, parser=KerchunkJSONParser(), registry=registry,
                                      loadable_variables=names)
    with open_virtual(out, partial_volume="keep") as v:
        assert sorted(names) == sorted(str(n) for n in v.variables)
        for name in names:
            np.testing.assert_array_equal(loaded[name].values, v[name].values, err_msg=name)
        assert loaded.attrs == v.attrs
