"""The command line: demo, info and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from siff_xarray.cli import main


def test_demo_and_info(tmp_path, capsys):
    main(["demo", str(tmp_path / "d")])
    out = capsys.readouterr().out
    assert "dimensions (time, z, [repeat], channel, y, x): (40, 3, 2, 128, 64)" in out
    assert "629 arrival-time bins of 20 ps" in out
    assert "mean photons per pixel per plane" in out and "slice 2 (z = 20 um)" in out
    assert "engine='siff'" in out and "intensity      (time, z, channel, y, x) uint16" in out
    # the dask plane means printed after the Dataset agree with the kernel's
    kernel = [float(line.split(": ")[1].split()[0]) for line in out.splitlines()
              if line.strip().startswith("slice ")]
    dask_line = next(line for line in out.splitlines() if "(dask)" in line)
    dask_means = [float(v) for v in dask_line.split(": ", 1)[1].strip("[] ").replace(
        "[", "").replace("]", "").split(",")]
    assert dask_means == pytest.approx(kernel, abs=1e-4)
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
            c = ip.colors.index(pl["channel"])
            frames = ip.framelist_by_slice(c, pl["slice"], include_partial=True)
            assert pl["mean_photons_per_pixel"] == pytest.approx(
                truth.intensity(frames).mean())


def test_bad_file_one_line_error(tmp_path):
    bad = tmp_path / "bad.siff"
    bad.write_bytes(b"II*\x00" + bytes(100))
    r = subprocess.run([sys.executable, "-m", "siff_xarray.cli", "info", str(bad)],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and "not a ScanImage file" in r.stderr
    assert "Traceback" not in r.stderr


def test_convert_and_verify_commands(siff_files, tmp_path, capsys):
    t = siff_files["two_chan_slices_flyback"]
    dst = tmp_path / "cli.zarr"
    main(["convert", t.path, str(dst), "--shard-mb", "0.001"])
    out, err = capsys.readouterr()
    assert "frames" in err and "MB/s" in err and "ETA" in err  # the progress line
    assert f"-> {dst}" in out and f"{t.n_frames} frames" in out and "photons" in out
    main(["verify", t.path, str(dst)])
    assert capsys.readouterr().out.startswith("OK:")
    with pytest.raises(SystemExit) as e:  # a finished store is not overwritten
        main(["convert", t.path, str(dst)])
    assert e.value.code == 2
    assert "overwrite" in capsys.readouterr().err
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
