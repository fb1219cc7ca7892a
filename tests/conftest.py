"""Shared fixtures: synthetic files of many shapes, written once per session."""

from __future__ import annotations

import numpy as np
import pytest

from siff_xarray.synthetic import write_siff

try:
    import corrosiffpy
except ImportError:  # no wheel for this Python (e.g. 3.13): the ground-truth checks still run
    corrosiffpy = None


def open_corrosiff(path):
    """Open ``path`` with corrosiffpy for a cross-check, or skip the rest of the test."""
    if corrosiffpy is None:
        pytest.skip("corrosiffpy has no wheel for this Python; cross-check skipped")
    return corrosiffpy.open_file(str(path))

# name -> write_siff keyword arguments; every layout the reader must handle
CONFIGS = {
    "single_raw": dict(shape=(16, 12), encoding="raw", n_timepoints=6),
    "single_compressed": dict(shape=(16, 12), encoding="compressed", n_timepoints=6,
                              photons_per_frame=400),
    "two_chan_slices_flyback": dict(shape=(12, 10), channels=(1, 2), n_slices=3, n_flyback=1,
                                    n_timepoints=5, encoding="mixed", photons_per_frame=300,
                                    max_shift=2),
    "partial_volume": dict(shape=(10, 14), channels=(1, 2), n_slices=2, n_flyback=1,
                           n_timepoints=3, extra_frames=3, encoding="smallest",
                           photons_per_frame=600),
    "frames_per_slice": dict(shape=(8, 8), channels=(2, 3), n_slices=2, frames_per_slice=3,
                             n_flyback=2, n_timepoints=3, encoding="mixed"),
    "classic_tiff": dict(shape=(9, 11), channels=(1, 2), n_slices=2, n_timepoints=3,
                         bigtiff=False, encoding="mixed", photons_per_frame=200),
    "smallest_bright": dict(shape=(24, 20), n_timepoints=8, photons_per_frame=3000,
                            encoding="smallest", events={2: ("odour A", 0.05), 5: ("no time",
                                                                                 None)}),
}


@pytest.fixture(scope="session")
def siff_files(tmp_path_factory):
    """Mapping name -> SyntheticTruth for every configuration in CONFIGS."""
    d = tmp_path_factory.mktemp("siff")
    return {name: write_siff(d / f"{name}.siff", seed=i, **kw)
            for i, (name, kw) in enumerate(CONFIGS.items())}


@pytest.fixture(params=sorted(CONFIGS))
def truth(request, siff_files):
    """Each synthetic file in turn."""
    return siff_files[request.param]


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
