"""Lifetime fitting: exponential mixtures convolved with a Gaussian IRF."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from siff_xarray import flim
from siff_xarray.synthetic import write_siff


def test_exgauss_is_a_density():
    t = np.linspace(-5, 150, 80001)
    for tau in (0.2, 2.5, 8.0):
        d = flim.exgauss(t, 1.2, 0.12, tau)
        assert np.all(np.isfinite(d))
        assert np.trapezoid(d, t) == pytest.approx(1.0, abs=1e-6)
        assert np.trapezoid(d * t, t) == pytest.approx(1.2 + tau, rel=1e-4)  # mean


@pytest.mark.parametrize("lifetimes,fractions", [((2.5,), (1.0,)), ((0.6, 2.8), (0.4, 0.6)),
                                                 ((1.0, 4.0), (0.7, 0.3))])
def test_fit_recovers_synthetic_lifetimes(tmp_path, lifetimes, fractions):
    t = write_siff(tmp_path / "f.siff", shape=(32, 32), n_timepoints=20,
                   photons_per_frame=20000, lifetimes_ns=lifetimes, fractions=fractions,
                   irf_offset_ns=1.3, irf_sigma_ns=0.15, encoding="mixed", seed=5)
    with xr.open_dataset(t.path, engine="siff") as ds:
        hist = ds.histogram.sum(("time", "z", "channel"))
    # the synthetic data have no background; fitting one would trade off against the
    # long lifetime's pile-up floor (4 ns -> 3.6 ns), so it is left out here
    res = flim.fit(hist, n_exp=len(lifetimes), background=False)
    assert res.success
    np.testing.assert_allclose(res.taus, lifetimes, rtol=0.05)
    np.testing.assert_allclose(res.fractions, fractions, atol=0.05)
    assert res.irf_offset == pytest.approx(1.3, abs=0.05)
    assert res.irf_sigma == pytest.approx(0.15, abs=0.05)
    assert 0.5 < res.reduced_chi2 < 2.0
    assert res.model.shape == hist.shape
    # plain arrays work with the bin width given; a fixed IRF gives the same lifetimes
    again = flim.fit(hist.values, n_exp=len(lifetimes), bin_ns=t.bin_width_ps / 1000,
                     irf=(1.3, 0.15), fix_irf=True, background=False)
    np.testing.assert_allclose(again.taus, lifetimes, rtol=0.05)
    assert again.irf_offset == pytest.approx(1.3, abs=1e-6)
    if len(lifetimes) == 1:  # with a background term a single exponential still fits
        np.testing.assert_allclose(flim.fit(hist).taus, lifetimes, rtol=0.05)


def test_fit_rejects_bad_input():
    with pytest.raises(ValueError, match="n_exp"):
        flim.fit(np.ones(10), n_exp=3, bin_ns=0.1)
    with pytest.raises(ValueError, match="no photons"):
        flim.fit(np.zeros(10), bin_ns=0.1)
    with pytest.raises(ValueError, match="bin centres"):
        flim.fit(np.ones(10), tau=np.arange(5.0))
    with pytest.raises(ValueError, match="bin_ns"):
        flim.fit(np.ones(10))
