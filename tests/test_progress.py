"""Progress on long work: one mechanism (bars, callbacks, silence) for every long call."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import xarray as xr

import siff_xarray
from siff_xarray import _progress
from siff_xarray import store as zs
from siff_xarray.synthetic import write_siff


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("progress")
    t = write_siff(d / "p.siff", shape=(32, 32), n_slices=2, n_timepoints=40,
                   photons_per_frame=800, max_shift=2, seed=4)
    zs.convert(t.path, d / "p.zarr", progress=False)
    return t, d / "p.zarr"


@pytest.fixture(autouse=True)
def _default_restored():
    old = siff_xarray.set_progress(None)
    yield
    siff_xarray.set_progress(old)


def _collect():
    steps = []
    return steps, steps.append


def test_callbacks_see_every_long_call_to_its_end(run, tmp_path):
    t, store = run
    steps, cb = _collect()
    assert zs.verify(t.path, store, batch_frames=16, progress=cb) == []
    assert [s.done for s in steps] == [16, 32, 48, 64, 80] and steps[-1].total == 80
    assert steps[-1].task.startswith("verify") and steps[-1].unit == "frames"
    assert steps[-1].fraction == 1.0 and steps[-1].elapsed_s > 0

    steps, cb = _collect()
    with xr.open_dataset(t.path, engine="siff") as ds:
        ds.siff.register(progress=cb, n_reference_frames=20, batch_frames=20)
    tasks = [s.task for s in steps]
    assert tasks[0].startswith("registration reference from 20 volumes")
    levels = [s for s in steps if s.unit == "levels"]
    assert levels[-1].done == levels[-1].total == len(levels)
    volumes = [s for s in steps if s.unit == "volumes"]
    assert volumes[-1].done == volumes[-1].total == 20  # the 20 others keep the EM's fit

    seen = []
    zs.convert(t.path, tmp_path / "c.zarr", progress=seen.append)  # its own Progress
    assert seen[-1].frames_done == seen[-1].frames_total == t.n_frames


def test_bars_when_asked_or_watched_and_silence_otherwise(run, tmp_path, capsys,
                                                          monkeypatch):
    t, store = run
    zs.verify(t.path, store)  # tests are not watched: no bar by default
    assert capsys.readouterr().err == ""
    zs.verify(t.path, store, progress=True)
    err = capsys.readouterr().err
    assert "verify" in err and "80/80" in err and "frames" in err
    # someone watches (a terminal or a notebook) and the work takes long: a bar
    monkeypatch.setattr(_progress, "watched", lambda: True)
    monkeypatch.setattr(_progress, "DELAY_S", 0.0)
    from siff_xarray.accessor import reductions

    monkeypatch.setattr(reductions, "EAGER_BLOCK_FRAMES", 16)  # several blocks of frames
    with xr.open_dataset(t.path, engine="siff") as ds:
        mask = np.zeros((32, 32), bool)
        mask[8:20, 8:20] = True
        ds.siff.lifetime(mask)  # an eager photon reduction over every frame
    assert "ds.siff" in capsys.readouterr().err
    zs.convert(t.path, tmp_path / "w.zarr", shard_bytes=8192, chunk_bytes=1)  # 20 batches
    assert "convert" in capsys.readouterr().err
    # ...unless silenced for the session, or per call
    siff_xarray.set_progress(False)
    zs.verify(t.path, store)
    zs.convert(t.path, tmp_path / "q.zarr")
    assert capsys.readouterr().err == ""
    siff_xarray.set_progress(None)
    monkeypatch.setenv("SIFF_XARRAY_PROGRESS", "0")
    zs.verify(t.path, store)
    assert capsys.readouterr().err == ""
    with pytest.raises(TypeError, match="True, False or None"):
        siff_xarray.set_progress("yes")


def test_short_work_draws_no_bar_even_when_watched(capsys, monkeypatch):
    monkeypatch.setattr(_progress, "watched", lambda: True)  # DELAY_S stays 1 s
    with _progress.Reporter("quick", 10, "frames") as bar:
        for _ in bar.track(range(10)):
            pass
    assert capsys.readouterr().err == ""


def test_no_bar_is_drawn_for_no_work(capsys):
    # (registration of a short file: every volume is in the reference's sample, so the
    # alignment after it has none left; it drew an empty "0/0 volumes" bar)
    with _progress.Reporter("nothing", 0, "volumes", progress=True) as bar:
        for _ in bar.track(range(0)):
            pass
    assert capsys.readouterr().err == ""
    with _progress.Reporter("some", 2, "volumes", progress=True) as bar:
        for _ in bar.track(range(2)):
            pass
    assert "2/2" in capsys.readouterr().err


def test_cli_verify_and_register_show_progress_unless_quiet(run, tmp_path):
    t, store = run
    cli = [sys.executable, "-m", "siff_xarray.cli"]
    r = subprocess.run([*cli, "verify", t.path, str(store)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "80/80 frames" in r.stderr, r.stderr
    r = subprocess.run([*cli, "verify", t.path, str(store), "--quiet"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and r.stderr == ""
    out = tmp_path / "s.zarr"
    r = subprocess.run([*cli, "register", t.path, "--output", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "registration reference" in r.stderr and "volumes" in r.stderr
