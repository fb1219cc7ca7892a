"""The synthetic writer's ground truth is what the files contain, and is realistic."""

from __future__ import annotations

import numpy as np

from siff_xarray import SiffFile
from siff_xarray.synthetic import write_siff


def test_motion_truth_registers_frames(tmp_path):
    m = 4
    t = write_siff(tmp_path / "m.siff", shape=(48, 40), n_timepoints=30, max_shift=m,
                   photons_per_frame=60000, seed=3)
    shifts = t.shifts
    assert np.abs(shifts).max() <= m and len(np.unique(shifts, axis=0)) > 5
    assert np.abs(np.diff(shifts, axis=0)).max() <= 1
    ref = t.scene[0][m : m + 48, m : m + 40]
    with SiffFile(t.path) as f:
        reg = f.read_frames(shifts=shifts).astype(float)
        raw = f.read_frames().astype(float)
    # registered frames line up with the scene; raw ones do not (on average)
    def err(a):
        a = a / a.mean()
        inner = (slice(m, -m), slice(m, -m))  # away from wrapped borders
        return np.mean([np.abs(x[inner] - ref[inner] / ref.mean()).mean() for x in a])
    assert err(reg) < 0.8 * err(raw)


def test_decay_statistics(tmp_path):
    t = write_siff(tmp_path / "d.siff", shape=(16, 16), n_timepoints=10,
                   photons_per_frame=20000, lifetimes_ns=(1.0,), fractions=(1.0,),
                   irf_offset_ns=1.0, irf_sigma_ns=0.05, seed=1)
    with SiffFile(t.path) as f:
        h = f.histograms().sum(0)
        centers = (np.arange(len(h)) + 0.5) * f.im_params.picoseconds_per_bin / 1000
    mean = (h * centers).sum() / h.sum()
    assert abs(mean - 2.0) < 0.05  # offset + tau, wrap negligible
    peak = centers[np.argmax(h)]
    assert 0.9 < peak < 1.3


def test_scan_timing_and_channels_share_time(tmp_path):
    t = write_siff(tmp_path / "c.siff", shape=(8, 8), channels=(1, 2), n_slices=2, n_flyback=1,
                   n_timepoints=3, frame_period_s=0.02)
    np.testing.assert_array_equal(t.frame_time_s[0::2], t.frame_time_s[1::2])
    assert np.all(np.diff(t.frame_time_s[0::2]) > 0.0199)
    assert np.all(np.diff(t.epoch_laser_ns) >= 0)
    np.testing.assert_array_equal(t.shifts[t.n_frames - 1], [0, 0])  # flyback: no shift
