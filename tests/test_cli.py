"""The command line: demo, info and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from siff_xarray.cli import main


def test_demo_and_info(tmp_path, capsys):
    from siff_xarray.cli import summarize

    main(["demo", str(tmp_path / "d")])
    out = capsys.readouterr().out
    assert "dimensions (time, z, [repeat], channel, y, x)" in out
    assert "(40, 3, 2, 128, 64) + 2 frames of a partial volume" in out
    # one definition of flyback everywhere: scans (the header's count) and frames
    assert "1 scan(s) = 2 frames (one per channel)" in out
    from siff_xarray import SiffFile

    with SiffFile(tmp_path / "d" / "demo.siff") as f:
        assert "2 (1 flyback scan(s) x 2 channel(s))" in str(f.im_params)
        assert f.im_params.flyback_scans_per_volume == 1
    guide = (Path(__file__).resolve().parents[1] / "docs" / "getting-started.md").read_text()
    assert "1 flyback scan per volume (2 flyback frames" in " ".join(guide.split())
    assert "629 arrival-time bins of 20 ps" in out
    assert "mean photons per pixel per plane" in out and "stimulus off" in out
    assert "frame rate" in out and "62.50 Hz" in out and "volume rate" in out
    assert "engine='siff'" in out and "intensity      (time, z, channel, y, x) uint16" in out
    # the dask plane means printed after the Dataset agree with the kernel's
    kernel = [p["mean_photons_per_pixel"] for p in summarize(tmp_path / "d" / "demo.siff")[
        "planes"]]
    dask_line = next(line for line in out.splitlines() if "(dask, every acquired frame)" in line)
    dask_means = [float(v) for v in dask_line.split(": ", 1)[1].strip("[] ").replace(
        "[", "").replace("]", "").split(",")]
    assert dask_means == pytest.approx(kernel, abs=1e-4)
    for p in summarize(tmp_path / "d" / "demo.siff")["planes"]:  # the plane table
        assert f"{p['mean_photons_per_pixel']:.4f}" in out
    main(["info", "--json", str(tmp_path / "d" / "demo.siff")])
    s = json.loads(capsys.readouterr().out)
    assert s["frames"] == 322 and s["channels"] == [1, 2] and s["timepoints"] == 40
    assert [e["text"] for e in s["events"]] == ["stimulus on", "stimulus off"]
    # per-plane means equal the ground truth (the demo writer is deterministic)
    from siff_xarray import SiffFile
    from siff_xarray.synthetic import make_demo

    truth = make_demo(tmp_path / "again.siff")
    with SiffFile(truth.path) as f:
        ip = f.im_params
        for pl in s["planes"]:
            c = ip.color_list.index(pl["channel"])
            frames = ip.framelist_by_slice(c, pl["slice"], include_partial=True)
            assert pl["mean_photons_per_pixel"] == pytest.approx(
                truth.intensity(frames).mean())


def test_bad_file_one_line_error(tmp_path):
    import os

    bad = tmp_path / "bad.siff"
    bad.write_bytes(b"II*\x00" + bytes(100))
    env = {**os.environ, "SIFF_XARRAY_LOG_DIR": str(tmp_path / "logs")}
    r = subprocess.run([sys.executable, "-m", "siff_xarray.cli", "info", str(bad)],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and "not a ScanImage file" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    log = tmp_path / "logs" / "siff-xarray.log"
    assert f"(details: {log})" in r.stderr
    assert "Traceback" in log.read_text() and "SiffFormatError" in log.read_text()
    r = subprocess.run([sys.executable, "-m", "siff_xarray.cli", "--debug", "info", str(bad)],
                       capture_output=True, text=True, env=env)
    assert r.returncode != 0 and "Traceback" in r.stderr
    r = subprocess.run([sys.executable, "-m", "siff_xarray.cli", "info", "--help"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "--json" in r.stdout


def test_to_tiff_command(siff_files, tmp_path, capsys):
    import xarray as xr

    from siff_xarray import SiffFile

    t = siff_files["two_chan_slices_flyback"]
    out = tmp_path / "out.tif"
    main(["to-tiff", t.path, str(out)])
    assert f"{t.n_frames} frames" in capsys.readouterr().out
    with SiffFile(t.path) as a, SiffFile(out) as b:
        assert not b.has_photons and (b.frame_encodings == "tiff").all()
        np.testing.assert_array_equal(a.read_frames(), b.read_frames())
        assert a.frame_descriptions() == b.frame_descriptions()
        assert a.header.nvfd_text == b.header.nvfd_text
    with xr.open_dataset(t.path, engine="siff") as ds, \
            xr.open_dataset(out, engine="siff") as tif:
        xr.testing.assert_identical(ds.intensity, tif.intensity.assign_attrs(
            ds.intensity.attrs))
        np.testing.assert_array_equal(ds.epoch.values, tif.epoch.values)
    with pytest.raises(SystemExit) as e:  # never overwritten silently
        main(["to-tiff", t.path, str(out)])
    assert e.value.code == 2 and "overwrite" in capsys.readouterr().err
    main(["to-tiff", "--overwrite", t.path, str(out)])


def test_register_command(tmp_path, capsys):
    import xarray as xr

    from siff_xarray import store as zs
    from siff_xarray.synthetic import write_siff

    t = write_siff(tmp_path / "r.siff", shape=(64, 48), n_slices=2, n_flyback=1,
                   n_timepoints=30, photons_per_frame=3000, max_shift=2, seed=4,
                   encoding="compressed")
    main(["register", t.path, "--max-shift", "4"])
    out = tmp_path / "r.siff.shifts.zarr"
    assert str(out) in capsys.readouterr().out
    with xr.open_dataset(t.path, engine="siff") as ds:
        want = ds.siff.register(max_shift=4)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the documented way to reopen it, without warnings
        got = xr.open_zarr(out)
    with got:
        np.testing.assert_array_equal(got.shift_y.values, want.shift_y.values)
        np.testing.assert_array_equal(got.reference.values, want.reference.values)
    with pytest.raises(SystemExit) as e:
        main(["register", t.path])
    err = capsys.readouterr().err  # one convention for every command: one line, exit 2
    assert e.value.code == 2 and err.startswith("error: ") and "exists" in err
    assert "details:" in err and len(err.strip().splitlines()) == 1
    # a converted store, to NetCDF
    zs.convert(t.path, tmp_path / "r.zarr")
    main(["register", str(tmp_path / "r.zarr"), "--max-shift", "4", "--output",
          str(tmp_path / "s.nc")])
    with xr.open_dataset(tmp_path / "s.nc") as got:
        np.testing.assert_array_equal(got.shift_x.values, want.shift_x.values)


def test_convert_and_verify_commands(siff_files, tmp_path, capsys):
    t = siff_files["two_chan_slices_flyback"]
    dst = tmp_path / "cli.zarr"
    main(["convert", t.path, str(dst), "--shard-mb", "0.001"])
    out, err = capsys.readouterr()
    assert "frames" in err and "MB/s" in err and "ETA" in err  # the progress line
    # stderr is not a terminal here (a batch job's log): whole lines, a tenth at a time
    assert "\r" not in err and err.count("%") <= 11 and "100% (" in err, err
    assert f"-> {dst}" in out and f"{t.n_frames} frames" in out and "photons" in out
    main(["verify", t.path, str(dst)])
    assert capsys.readouterr().out.startswith("OK:")
    with pytest.raises(SystemExit) as e:  # arguments swapped: say what was expected
        main(["verify", str(dst), t.path])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "is not a converted siff-xarray store" in err
    assert "SOURCE then STORE" in err and "Not a directory" not in err
    with pytest.raises(SystemExit) as e:
        main(["convert", str(tmp_path / "nothing_*.siff"), str(tmp_path / "x.zarr")])
    assert e.value.code == 2 and "no files match" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # a finished store is not overwritten
        main(["convert", t.path, str(dst)])
    assert e.value.code == 2
    assert "overwrite" in capsys.readouterr().err
    main(["convert", "--resume", t.path, str(dst)])  # re-running a batch job is harmless
    assert "already complete" in capsys.readouterr().out
    main(["convert", "--quiet", "--overwrite", "--ome-levels", "2", t.path, str(dst)])
    out, err = capsys.readouterr()
    assert out == "" and err == ""
    assert (dst / "ome" / "1" / "zarr.json").exists()
    main(["convert", "--quiet", "--overwrite", "--no-ome", t.path, str(tmp_path / "n.zarr")])
    assert not (tmp_path / "n.zarr" / "ome").exists()
    # several sources (a glob) into a directory: one store each
    many = tmp_path / "many"
    pattern = Path(siff_files["single_raw"].path).parent / "single_*.siff"
    main(["convert", "--quiet", str(pattern), str(many)])
    assert sorted(p.name for p in many.iterdir()) == ["single_compressed.zarr",
                                                      "single_raw.zarr"]
    # verify reports a damaged store with exit code 1
    import zarr

    arr = zarr.open_array(str(dst), path="photons/arrival_time", mode="r+")
    arr[0] = int(arr[0]) + 1
    with pytest.raises(SystemExit) as e:
        main(["verify", t.path, str(dst)])
    assert e.value.code == 1
    assert "DIFFERENT" in capsys.readouterr().out


def test_info_on_a_url(siff_files, http_server, capsys):
    import shutil

    t = siff_files["frames_per_slice"]
    shutil.copy(t.path, Path(http_server.root) / "remote.siff")
    main(["info", "--json", f"{http_server.url}/remote.siff"])
    s = json.loads(capsys.readouterr().out)
    assert s["frames"] == t.n_frames and s["file"].endswith("remote.siff")


def test_info_plane_means_equal_the_decoded_means(truth, monkeypatch):
    """info's photons per pixel (index counts; TIFF pages decoded) equal the images' means."""
    import xarray as xr

    from siff_xarray import SiffFile
    from siff_xarray.cli import summarize

    decoded: list[int] = []
    sum_mask = SiffFile.sum_mask

    def recording(self, mask, frames=None, *args, **kwargs):
        decoded.extend(np.asarray(frames).tolist())
        return sum_mask(self, mask, frames, *args, **kwargs)

    monkeypatch.setattr(SiffFile, "sum_mask", recording)
    s = summarize(truth.path)
    monkeypatch.undo()
    with SiffFile(truth.path) as f:  # only intensity-only TIFF pages are decoded
        assert all(f.index.encoding[k] == 2 for k in decoded), decoded[:5]
    with xr.open_dataset(truth.path, engine="siff", partial_volume="keep") as ds:
        img = ds.intensity.where(ds.frame_present).astype(float)
        dims = [d for d in img.dims if d not in ("z", "channel")]
        want = img.mean(dims)
        for p in s["planes"]:
            got = p["mean_photons_per_pixel"]
            np.testing.assert_allclose(got, want.isel(z=p["slice"]).sel(
                channel=p["channel"]).item(), rtol=1e-9)


def test_info_on_a_converted_store(siff_files, tmp_path, capsys, stop_after, s3_server):
    """``info run.zarr`` said "[Errno 21] Is a directory"; it now summarizes the store,
    says how far an unfinished conversion got and how to finish it, and names a path
    that is neither a file nor a store."""
    from siff_xarray import SiffFile, convert

    t = siff_files["two_chan_slices_flyback"]
    dst = tmp_path / "done.zarr"
    convert(t.path, dst)
    with SiffFile(t.path) as f:
        photons = int(f.index.n_photons.sum())
    main(["info", "--json", str(dst)])
    s = json.loads(capsys.readouterr().out)
    assert s["frames"] == t.n_frames and s["photons"] == photons
    assert s["source_file"] == t.path and "intensity" in s["variables"]
    assert s["sizes"]["channel"] == 2 and s["ome_levels"] >= 1
    main(["info", str(dst)])
    out = capsys.readouterr().out
    assert "converted store" in out and f"{photons:,}" in out
    half = tmp_path / "half.zarr"
    volume = 2 * 3 * 32 * 32 * 2
    with pytest.raises(stop_after.error):
        convert(t.path, half, progress=stop_after(1), scheduler="sync", shard_bytes=volume)
    with pytest.raises(SystemExit) as e:
        main(["info", str(half)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "is incomplete" in err and "--resume" in err
    with pytest.raises(SystemExit) as e:
        main(["info", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "not a converted siff-xarray store" in err
    assert "info reads a .siff or TIFF file" in err and "Is a directory" not in err
    # on S3: a store URL (its path ends in .zarr)
    import fsspec

    fs = fsspec.filesystem("s3", **s3_server)
    fs.mkdir("info-bucket")
    convert(t.path, "s3://info-bucket/run.zarr", target_options=s3_server)
    import siff_xarray.store as zs

    assert zs.describe_store("s3://info-bucket/run.zarr", s3_server)["photons"] == photons
    with pytest.raises(FileNotFoundError, match=r"info-bucket/none\.zarr: not a converted"):
        zs.describe_store("s3://info-bucket/none.zarr", s3_server)


def test_a_directory_given_as_a_file_is_named_with_what_to_do(siff_files, tmp_path, capsys):
    """A directory where a .siff file is read said "[Errno 21] Is a directory"."""
    import shutil

    import xarray as xr

    from siff_xarray import convert

    t = siff_files["single_raw"]
    store = tmp_path / "s.zarr"
    convert(t.path, store)
    folder = tmp_path / "runs"
    folder.mkdir()
    shutil.copy(t.path, folder / "r.siff")
    for argv, hint in [
        (["convert", str(store), str(tmp_path / "x.zarr")], "it is a converted Zarr store"),
        (["index", str(store)], "siff-xarray info, verify and register read stores"),
        (["to-tiff", str(store), str(tmp_path / "s.tif")], "siff_xarray.open_converted"),
        (["convert", str(folder), str(tmp_path / "y.zarr")],
         f"give a glob: '{folder}/*.siff'"),
        (["info", str(folder)], "not a converted siff-xarray store"),
    ]:
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and hint in err and "Errno" not in err, (argv, err)
    with pytest.raises(IsADirectoryError, match=r"runs: is a directory, not a \.siff"):
        xr.open_dataset(folder, engine="siff")
    assert not (tmp_path / "x.zarr").exists() and not (tmp_path / "y.zarr").exists()


def test_converting_many_goes_on_after_one_that_fails(tmp_path, capsys):
    """One acquisition cut off mid-write stopped a conversion of many: those after it
    were not converted. They are now, and the command fails at the end naming it."""
    import os

    from siff_xarray import verify
    from siff_xarray.synthetic import write_siff

    paths = [write_siff(tmp_path / f"{n}.siff", shape=(16, 16), n_timepoints=4, seed=i).path
             for i, n in enumerate(("a", "b", "c"))]
    os.truncate(paths[1], os.path.getsize(paths[1]) - 100)  # b: cut off mid-write
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main(["convert", "--quiet", str(tmp_path / "*.siff"), str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert "b.siff" in err and "going on with the others" in err
    assert f"1 of 3 acquisitions were not converted: {paths[1]}" in err
    assert sorted(p.name for p in out.iterdir()) == ["a.zarr", "c.zarr"]
    for name, path in (("a", paths[0]), ("c", paths[2])):
        assert verify(path, out / f"{name}.zarr") == []
    # one acquisition alone: its error, as before
    with pytest.raises(SystemExit) as e:
        main(["convert", "--quiet", paths[1], str(tmp_path / "b.zarr")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "going on" not in err and "allow-truncated" in err
