"""Bad input: clear SiffFormatErrors, recovery of cut-off files, and fuzzing."""

from __future__ import annotations

import contextlib
import os
import struct
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from siff_xarray import SiffFile, SiffFormatError, SiffWarning
from siff_xarray.synthetic import write_siff


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    t = write_siff(d / "ok.siff", shape=(6, 5), channels=(1, 2), n_slices=2, n_flyback=1,
                   n_timepoints=2, encoding="mixed", photons_per_frame=60,
                   events={1: ("e", 0.1)})
    return t, open(t.path, "rb").read()


def _write(tmp_path, data, name="f.siff"):
    p = tmp_path / name
    p.write_bytes(data)
    return p


def _ifd_offsets(data):
    (pos,) = struct.unpack_from("<Q", data, 8)
    out = []
    while pos:
        out.append(pos)
        (n,) = struct.unpack_from("<Q", data, pos)
        (pos,) = struct.unpack_from("<Q", data, pos + 8 + 20 * n)
    return out


def _entry(data, ifd, tag):
    (n,) = struct.unpack_from("<Q", data, ifd)
    for k in range(n):
        at = ifd + 8 + 20 * k
        if struct.unpack_from("<H", data, at)[0] == tag:
            return at
    raise KeyError(tag)


@pytest.mark.parametrize("mutate,match", [
    (lambda d: b"MM" + d[2:], "big-endian"),
    (lambda d: b"PK" + d[2:], "not a TIFF file"),
    (lambda d: d[:2] + struct.pack("<H", 44) + d[4:], "TIFF magic number 44"),
    (lambda d: d[:16] + struct.pack("<I", 1234) + d[20:], "not a ScanImage file"),
    (lambda d: d[:8] + struct.pack("<Q", 2**63 + 5) + d[16:], "not a valid file offset"),
    (lambda d: d[:20] + struct.pack("<I", 9) + d[24:], "unsupported ScanImage TIFF version 9"),
    (lambda d: d[:24] + struct.pack("<I", 10**8) + d[28:], "truncated header"),
    (lambda d: d[:5], "not a TIFF file"),
    (lambda d: d[:20], "ends inside"),
    (lambda d: d[:8] + struct.pack("<Q", 40) + d[16:], "points into the file header"),
    (lambda d: d[:8] + struct.pack("<Q", len(d) + 10) + d[16:], "no complete frame"),
])
def test_header_errors(tmp_path, small, mutate, match):
    _, data = small
    with pytest.raises(SiffFormatError, match=match) as ei:
        SiffFile(_write(tmp_path, mutate(data)))
    assert "f.siff" in str(ei.value)


def test_ifd_errors(tmp_path, small):
    _, data = small
    ifds = _ifd_offsets(data)
    # cycle: last IFD points back to the first
    d = bytearray(data)
    (n,) = struct.unpack_from("<Q", d, ifds[-1])
    struct.pack_into("<Q", d, ifds[-1] + 8 + 20 * n, ifds[0])
    with pytest.raises(SiffFormatError, match="loops back") as ei:
        SiffFile(_write(tmp_path, bytes(d)))
    assert ei.value.offset == ifds[0]
    # unknown field type
    d = bytearray(data)
    struct.pack_into("<H", d, _entry(data, ifds[1], 258) + 2, 99)
    with pytest.raises(SiffFormatError, match="unknown TIFF field type 99"):
        SiffFile(_write(tmp_path, bytes(d)))
    # invalid compression flag
    d = bytearray(data)
    struct.pack_into("<Q", d, _entry(data, ifds[2], 907) + 12, 7)
    with pytest.raises(SiffFormatError, match="invalid SiffCompress flag") as ei:
        SiffFile(_write(tmp_path, bytes(d)))
    assert ei.value.frame == 2
    # strip offset out of range in a middle frame
    d = bytearray(data)
    struct.pack_into("<Q", d, _entry(data, ifds[3], 273) + 12, len(data) + 100)
    with pytest.raises(SiffFormatError, match="past the end of the file"):
        SiffFile(_write(tmp_path, bytes(d)))
    # huge entry count
    d = bytearray(data)
    struct.pack_into("<Q", d, ifds[1], 10**6)
    with pytest.raises(SiffFormatError, match="claims 1000000 entries"):
        SiffFile(_write(tmp_path, bytes(d)))


@pytest.mark.parametrize("where,value,match", [
    # 8-byte values of 2**63 and more read as negative int64s: an entry count the walker
    # once took for a small one, then read the next-IFD offset before its buffer
    ("count", 2**64 - 5, "claims 18446744073709551611 entries"),
    ("count", 2**63, "claims 9223372036854775808 entries"),
    # offsets near 2**63: their sums with lengths overflowed int64 and passed the checks
    ("strip_offset", 2**63 - 1, "past the end of the file"),
    ("strip_bytes", 2**63 - 8, "past the end of the file"),
])
def test_values_near_int64_limits_are_format_errors(tmp_path, small, monkeypatch, where,
                                                     value, match):
    _, data = small
    ifd = _ifd_offsets(data)[1]
    d = bytearray(data)
    at = {"count": ifd, "strip_offset": _entry(data, ifd, 273) + 12,
          "strip_bytes": _entry(data, ifd, 279) + 12}[where]
    struct.pack_into("<Q", d, at, value)
    path = _write(tmp_path, bytes(d))
    for walker in range(3):
        with pytest.raises(SiffFormatError, match=match):
            _open_one_walker(path, monkeypatch, walker)


def _open_one_walker(path, monkeypatch, walker: int):
    """Open ``path`` with one IFD walker: 0 pread (local), 1 memory map, 2 file object."""
    from siff_xarray.reader.source import LocalSource

    if walker == 2:
        with open(path, "rb") as fh:
            SiffFile(fh, index_cache=False).close()
        return
    with monkeypatch.context() as m:
        if walker == 1:
            m.setattr(LocalSource, "fileno", lambda self: None)
        SiffFile(path, index_cache=False).close()


@pytest.mark.parametrize("walker", [0, 1, 2])
def test_next_ifd_offset_near_int64_limit_is_a_cut_off_file(tmp_path, small, monkeypatch,
                                                            walker):
    """A next-IFD offset of 2**63 - 1 lies past the end: the chain ends there (cut off)."""
    _, data = small
    ifds = _ifd_offsets(data)
    (n,) = struct.unpack_from("<Q", data, ifds[1])
    d = bytearray(data)
    struct.pack_into("<Q", d, ifds[1] + 8 + 20 * n, 2**63 - 1)
    with pytest.warns(SiffWarning, match="recovered 2 complete frames"):
        _open_one_walker(_write(tmp_path, bytes(d)), monkeypatch, walker)


def test_count_image_inconsistent(tmp_path, small):
    t, data = small
    i = int(np.flatnonzero(t.encodings == "compressed")[0])
    ifd = _ifd_offsets(data)[i]
    d = bytearray(data)
    (strip,) = struct.unpack_from("<Q", d, _entry(data, ifd, 273) + 12)
    count_at = strip - 2 * 30
    struct.pack_into("<H", d, count_at, struct.unpack_from("<H", d, count_at)[0] + 5)
    with SiffFile(_write(tmp_path, bytes(d))) as f:
        f.read_frames([0])  # other frames stay readable
        with pytest.raises(SiffFormatError, match="inconsistent with the photon block") as ei:
            f.read_frames([i])
        assert ei.value.frame == i
        with pytest.raises(SiffFormatError, match="inconsistent"):
            f.histograms([i])


def test_photon_outside_frame(tmp_path, small):
    t, data = small
    i = int(np.flatnonzero((t.encodings == "raw") & (np.diff(t.photon_starts) > 0))[0])
    ifd = _ifd_offsets(data)[i]
    d = bytearray(data)
    (strip,) = struct.unpack_from("<Q", d, _entry(data, ifd, 273) + 12)
    struct.pack_into("<H", d, strip + 6, 999)  # y of the first photon
    with SiffFile(_write(tmp_path, bytes(d))) as f, \
            pytest.raises(SiffFormatError, match="outside the frame"):
        f.read_frames([i])


@pytest.mark.parametrize("cut", [1, 50, 300, 600])
def test_cut_off_last_frame_recovers(tmp_path, small, cut):
    t, data = small
    last = _ifd_offsets(data)[-1]
    truncated = data[: last + cut]
    with pytest.warns(SiffWarning, match=f"recovered {t.n_frames - 1} complete frames"):
        f = SiffFile(_write(tmp_path, truncated))
    with f:
        assert f.num_frames == t.n_frames - 1
        np.testing.assert_array_equal(f.read_frames(), t.intensity(range(t.n_frames - 1)))


def test_truncation_warning_names_the_users_line(tmp_path, small):
    import xarray as xr

    _, data = small
    path = _write(tmp_path, data[:-3])
    for opener in (SiffFile, lambda p: xr.open_dataset(p, engine="siff")):
        with pytest.warns(SiffWarning, match="recovered") as rec:
            obj = opener(path)
        obj.close()
        # the warning points at this test's line, not at a line inside the library
        assert rec[0].filename == __file__, rec[0].filename


def test_cut_inside_data_of_last_frame(tmp_path, small):
    t, data = small
    with pytest.warns(SiffWarning, match="recovered"):
        f = SiffFile(_write(tmp_path, data[:-3]))
    assert f.num_frames == t.n_frames - 1
    f.close()


def test_file_without_frames(tmp_path, small):
    """A header with no IFD (acquisition stopped before its first frame) opens empty."""
    import xarray as xr

    _, data = small
    path = _write(tmp_path, data[:8] + struct.pack("<Q", 0) + data[16:])
    with SiffFile(path) as f:
        assert f.num_frames == 0
        assert f.read_frames().shape[0] == 0
        with pytest.raises(SiffFormatError, match="holds no frames") as ei:
            _ = f.frame_shape
        assert "f.siff" in str(ei.value)
    with pytest.raises(SiffFormatError, match=r"f\.siff.*holds no frames"):
        xr.open_dataset(path, engine="siff")


def test_acquisition_whose_first_part_has_no_frames(tmp_path):
    """The frame shape comes from the first part that has frames; all empty is an error."""
    from siff_xarray.reader.acquisition import Acquisition

    split = write_siff(tmp_path / "run.siff", shape=(8, 6), n_timepoints=4, frames_per_file=2)
    data = Path(split.paths[0]).read_bytes()
    empty = _write(tmp_path, data[:8] + struct.pack("<Q", 0) + data[16:], "run_00000.siff")
    with Acquisition.open([empty, *split.paths[1:]]) as acq:
        assert acq.frame_shape == (8, 6)
        assert acq.num_frames == 2
    with pytest.raises(SiffFormatError, match="acquisition holds no frames"):
        Acquisition.open([empty, empty])


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError):
        SiffFile(tmp_path / "nope.siff")
    with pytest.raises(IsADirectoryError):
        SiffFile(tmp_path)


def _exercise(path):
    with SiffFile(path) as f:
        ip = f.im_params
        _ = ip.array_shape, ip.flatten_by_timepoints(color_channel=None)
        f.read_frames()
        f.timestamps()
        f.frame_metadata()
        if f.has_photons:
            f.histograms()
            f.lifetime_images()
            f.photons_batch()
            h, w = f.frame_shape
            f.sum_masks(np.ones((2, h, w), bool))


@settings(max_examples=250, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_mutations_only_raise_siff_format_error(tmp_path, small, data):
    _, original = small
    d = bytearray(original)
    for _ in range(data.draw(st.integers(1, 8), label="n_mutations")):
        kind = data.draw(st.sampled_from(["byte", "u64", "truncate", "zero_run", "value"]))
        pos = data.draw(st.integers(0, len(d) - 1))
        if kind == "byte":
            d[pos] = data.draw(st.integers(0, 255))
        elif kind == "u64" and pos + 8 <= len(d):
            d[pos : pos + 8] = struct.pack("<Q", data.draw(st.sampled_from(
                [0, 1, 2**16, 2**31, 2**63 - 1, 2**64 - 1, len(d) // 2, pos])))
        elif kind == "truncate":
            del d[max(pos, 1):]
        elif kind == "value":  # the value of the next `key = value` (header or description)
            at = d.find(b" = ", pos)
            if at >= 0:
                text = data.draw(st.binary(min_size=1, max_size=25) | st.text(
                    "0123456789-+.eEnaNIf x[];{}'\n", min_size=1, max_size=25).map(str.encode))
                d[at + 3 : at + 3 + len(text)] = text
        else:
            d[pos : pos + 16] = bytes(min(16, len(d) - pos))
    path = _write(tmp_path, bytes(d), "fuzz.siff")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.suppress(SiffFormatError):
            _exercise(path)


_BOUNDARY = [0, 1, 7, 2**15, 2**16 - 1, 2**31, 2**32 - 1, 2**62, 2**63 - 1, 2**63,
             2**64 - 8, 2**64 - 1]


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_ifd_fields_only_raise_siff_format_error(tmp_path, small, data):
    """Structure-aware fuzzing: boundary values written into IFD fields.

    Random byte mutations rarely hit the 8-byte fields whose values near 2**63 once
    overflowed the walker's int64 arithmetic; here every mutation lands in an IFD.
    """
    _, original = small
    d = bytearray(original)
    ifds = _ifd_offsets(original)
    size = len(original)
    for _ in range(data.draw(st.integers(1, 4), label="n_mutations")):
        ifd = data.draw(st.sampled_from(ifds), label="ifd")
        (n,) = struct.unpack_from("<Q", original, ifd)
        field = data.draw(st.sampled_from(["count", "next", "type", "tcount", "value"]))
        k = data.draw(st.integers(0, n - 1), label="entry")
        at = {"count": ifd, "next": ifd + 8 + 20 * n, "type": ifd + 8 + 20 * k + 2,
              "tcount": ifd + 8 + 20 * k + 4, "value": ifd + 8 + 20 * k + 12}[field]
        value = data.draw(st.sampled_from([*_BOUNDARY, size, size - 1, size // 2, *ifds]))
        width = 2 if field == "type" else 8
        struct.pack_into("<H" if width == 2 else "<Q", d, at, value % 2 ** (8 * width))
    path = _write(tmp_path, bytes(d), "fuzz.siff")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.suppress(SiffFormatError):
            _exercise(path)


@pytest.mark.parametrize("window", [4096, 16])
def test_pread_walk_equals_memory_map_and_byte_range_walks(siff_files, tmp_path, monkeypatch,
                                                           window):
    """Local files walk their IFDs with pread; the other two walkers must agree."""
    import dataclasses

    from siff_xarray.format.header import read_header
    from siff_xarray.reader import ifd
    from siff_xarray.reader.source import FileObjectSource, LocalSource

    monkeypatch.setattr(ifd, "PREAD_WINDOW", window)  # 16: every IFD needs a bigger read
    paths = [siff_files[k].path for k in ("single_raw", "two_chan_slices_flyback",
                                          "classic_tiff")]
    cut = tmp_path / "cut.siff"  # and a file cut off inside its last frame
    data = Path(paths[1]).read_bytes()
    cut.write_bytes(data[: len(data) - 300])
    for path in [*paths, str(cut)]:
        with LocalSource(path) as src:
            header = read_header(src)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                by_pread = ifd.build_frame_index(src, header)
                monkeypatch.setattr(src, "fileno", lambda: None)
                by_map = ifd.build_frame_index(src, header)
        with open(path, "rb") as fh, FileObjectSource(fh) as src, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            by_range = ifd.build_frame_index(src, read_header(src))
        for other in (by_map, by_range):
            for f in dataclasses.fields(ifd.FrameIndex):
                np.testing.assert_array_equal(getattr(by_pread, f.name),
                                              getattr(other, f.name), err_msg=f.name)


def test_descriptions_by_pread_equal_memory_map(siff_files, tmp_path, monkeypatch):
    ev = write_siff(tmp_path / "ev.siff", shape=(8, 6), n_timepoints=5,
                    events={2: ("go", 0.05), 4: ("stop", None)})
    for path in (siff_files["two_chan_slices_flyback"].path,
                 siff_files["classic_tiff"].path, ev.path):
        with SiffFile(path, index_cache=False) as a:
            by_pread = a.description_bytes(), a.timestamps()
            monkeypatch.setattr(a._source, "fileno", lambda: None)
            by_map = a.description_bytes(), a.timestamps()
        for u, v in zip(by_pread[0], by_map[0], strict=True):
            np.testing.assert_array_equal(u, v)
        np.testing.assert_array_equal(by_pread[1].epoch_laser_ns, by_map[1].epoch_laser_ns)
        a_ev, m_ev = by_pread[1].events, by_map[1].events
        assert [(e.frame, e.text) for e in a_ev] == [(e.frame, e.text) for e in m_ev]
        np.testing.assert_array_equal([e.time_s for e in a_ev], [e.time_s for e in m_ev])
    assert [e.text for e in a_ev] == ["go", "stop"]


@pytest.mark.parametrize("change", ["truncate", "rewrite"])
def test_a_file_changed_under_an_open_dataset_is_an_error_not_a_crash(tmp_path, change):
    # in a subprocess: reading a memory map past the end of a shrunk file is a SIGBUS
    t = write_siff(tmp_path / "open.siff", shape=(32, 32), n_timepoints=300, seed=3)
    script = textwrap.dedent(f"""
        import os
        import xarray as xr
        from siff_xarray import SiffFormatError

        p = {t.path!r}
        ds = xr.open_dataset(p, engine="siff")
        first = int(ds.intensity[:10].sum())
        if {change!r} == "truncate":
            os.truncate(p, os.path.getsize(p) // 4)
        else:  # same size, other bytes, a later modification time
            data = bytearray(open(p, "rb").read())
            data[-1000:] = bytes(1000)
            with open(p, "r+b") as fh:
                fh.write(data)
            st = os.stat(p)
            os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        try:
            ds.intensity[150:].sum().values
        except SiffFormatError as e:
            print("SiffFormatError:", e)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    want = "shrank" if change == "truncate" else "modified in place"
    assert "SiffFormatError" in out.stdout and want in out.stdout and t.path in out.stdout


@pytest.mark.parametrize("guard", ["lease", "no leases", "open for writing"])
@pytest.mark.parametrize("call", ["sum_mask", "read_frames"])
def test_a_file_truncated_during_a_decode_is_an_error_not_a_crash(tmp_path, guard, call):
    """Another process truncates the file while a long decode reads it.

    Where a read lease can be taken (Linux), the truncation waits for the decode and the
    next read raises. Where it cannot (leases turned off, as on other systems; the file
    held open for writing by the truncating process, as during an acquisition), the
    frames are copied with pread instead of read from the memory map, and the
    truncation gives an error. Reading the map in place there would touch pages past
    the new end and the process would die of SIGBUS (return code -7: this test fails
    that way when both guards are turned off).
    """
    if guard == "lease" and not sys.platform.startswith("linux"):
        pytest.skip("file leases are Linux's")
    t = write_siff(tmp_path / "long.siff", shape=(128, 128), n_timepoints=400,
                   photons_per_frame=4000, encoding="raw", seed=3)
    # the truncating process holds the file open for writing from the start, or not
    hold = "open(sys.argv[1], 'r+b')" if guard == "open for writing" else "None"
    cutter = (f"import os, sys, time; fh = {hold}; print('open', flush=True); "
              "time.sleep(1.0); os.truncate(sys.argv[1], os.path.getsize(sys.argv[1]) // 4)")
    script = textwrap.dedent(f"""
        import os, subprocess, sys, time
        import numpy as np
        from siff_xarray import SiffFile, SiffFormatError
        from siff_xarray.reader import source

        p = {t.path!r}
        if {guard!r} == "no leases":
            source._LEASES = False
        with SiffFile(p) as f:
            # sum_mask: one call takes a few seconds; read_frames: 262 MB per call
            frames = np.tile(np.arange(f.num_frames), 1000 if {call!r} == "sum_mask" else 20)
            mask = np.ones((128, 128), dtype=bool)
            if {call!r} == "sum_mask":
                run = lambda fr: f.sum_mask(mask, fr)
            else:
                run = lambda fr: f.read_frames(fr).sum()
            run(frames[:10])  # compiled and in the page cache
            cut = subprocess.Popen([sys.executable, "-c", {cutter!r}, p],
                                   stdout=subprocess.PIPE, text=True)
            assert cut.stdout.readline().strip() == "open"  # the writer has it open
            print("leased:", f._source.maps_safely(), flush=True)
            t0 = time.monotonic()
            try:
                while time.monotonic() - t0 < 20:
                    run(frames)
                    print("a long read finished after", time.monotonic() - t0, "s")
            except SiffFormatError as e:
                print("SiffFormatError:", e)
            cut.wait(120)
            print("truncated:", os.path.getsize(p))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    assert f"leased: {guard == 'lease'}" in out.stdout, out.stdout
    assert "SiffFormatError" in out.stdout, out.stdout
    assert "shrank" in out.stdout or "file ends" in out.stdout, out.stdout
    assert f"truncated: {os.path.getsize(t.path)}" in out.stdout


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="file leases are Linux's")
def test_the_read_lease_is_held_only_while_reading_and_waits_once_for_writers(
        tmp_path, monkeypatch):
    import fcntl

    from siff_xarray.reader import source

    t = write_siff(tmp_path / "w.siff", shape=(16, 16), n_timepoints=6, seed=1)
    with SiffFile(t.path) as f:
        f.read_frames([0])
        src = f._source
        assert src._lease_works  # leases work here...
        fd = src.fileno()
        assert fcntl.fcntl(fd, fcntl.F_GETLEASE) == fcntl.F_UNLCK  # ...and none is kept
        with open(t.path, "r+b") as fh:  # between reads, writers are not held off
            assert fh.read(4)
    sleeps = []
    monkeypatch.setattr(source.time, "sleep", lambda s: sleeps.append(s))
    monkeypatch.setattr(source.LocalSource, "lease_wait", 0.05)
    with open(t.path, "ab"), SiffFile(t.path) as f:  # written to, as during an acquisition
        want = f.read_frames([0, 1])
        waited = len(sleeps)
        for _ in range(10):
            np.testing.assert_array_equal(f.read_frames([0, 1]), want)
        assert waited > 0 and len(sleeps) == waited  # one wait in vain, then none
        assert f._source._lease_works is not False


def test_a_broken_ifd_chain_is_reported_not_taken_for_the_whole_file(tmp_path, small):
    from siff_xarray import store as zs
    from siff_xarray.errors import ConversionError

    _, data = small
    ifds = _ifd_offsets(data)
    d = bytearray(data)
    (n,) = struct.unpack_from("<Q", d, ifds[2])
    struct.pack_into("<Q", d, ifds[2] + 8 + 20 * n, 0)  # the chain ends after frame 2
    broken = _write(tmp_path, bytes(d), "broken.siff")
    with pytest.warns(SiffWarning, match="looks damaged rather than cut off"):
        f = SiffFile(broken, index_cache=tmp_path / "cache")
    with f:
        assert f.num_frames == 3 and f.unread_bytes == len(data) - ifds[3]
    # warned again when the frame index comes from the cache
    with pytest.warns(SiffWarning, match="looks damaged.*recovered 3 complete frames"):
        SiffFile(broken, index_cache=tmp_path / "cache").close()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SiffWarning)
        with pytest.raises(ConversionError, match="allow_truncated"):
            zs.convert(broken, tmp_path / "b.zarr")
        zs.convert(broken, tmp_path / "b.zarr", allow_truncated=True)
        assert zs.verify(broken, tmp_path / "b.zarr") == []


def test_an_absurd_entry_count_is_not_taken_for_a_cut_off_file(tmp_path):
    t = write_siff(tmp_path / "big.siff", shape=(16, 16), n_timepoints=24,
                   photons_per_frame=400, seed=1)
    data = Path(t.path).read_bytes()
    ifds = _ifd_offsets(data)
    d = bytearray(data)
    struct.pack_into("<Q", d, ifds[3], 4096)  # 4096 entries run past the end of the file
    with pytest.warns(SiffWarning, match="looks damaged rather than cut off"):
        SiffFile(_write(tmp_path, bytes(d)), index_cache=False).close()


def test_a_cut_off_file_converts_only_when_allowed(tmp_path, small):
    from siff_xarray import store as zs
    from siff_xarray.errors import ConversionError

    t, data = small
    cut = _write(tmp_path, data[:-3], "cut.siff")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SiffWarning)
        with pytest.raises(ConversionError, match=r"cut off mid-write.*--allow-truncated"):
            zs.convert(cut, tmp_path / "c.zarr")
        summary = zs.convert(cut, tmp_path / "c.zarr", allow_truncated=True)
    assert summary.frames == t.n_frames - 1
    # refused: the error says it all, no warning besides; allowed: the open's warning
    # says what is left out (the start opens the file once and shows it then)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(ConversionError, match="cut off mid-write"):
            zs.convert(cut, tmp_path / "d.zarr")
        assert not [w for w in seen if issubclass(w.category, SiffWarning)]
        zs.convert(cut, tmp_path / "d.zarr", allow_truncated=True)
    said = [str(w.message) for w in seen if issubclass(w.category, SiffWarning)]
    assert said and all("cut.siff" in m for m in said), said


def test_work_and_memory_follow_the_data_not_a_header_that_claims_100000_channels(tmp_path):
    import tracemalloc

    import xarray as xr

    save = "[" + ";".join(str(i) for i in range(1, 100_001)) + "]"
    t = write_siff(tmp_path / "c.siff", shape=(16, 16), n_timepoints=40, photons_per_frame=50,
                   seed=1, header_extra={"SI.hChannels.channelSave": save})
    assert Path(t.path).stat().st_size < 1_000_000
    # default: 40 frames are not one volume of 100,000: no timepoint, said so, no crash
    # (the old code raised "cannot reshape array of size 0")
    with pytest.warns(SiffWarning, match=r"holds 40 frame\(s\), fewer than one volume "
                      r"\(100000 frames"):
        ds = xr.open_dataset(t.path, engine="siff", chunks={})
    assert ds.sizes["time"] == 0 and ds.load().intensity.size == 0
    # keep: what the header says, in chunks of whole frames of ~chunk_bytes (it made one
    # Dask chunk per frame: 100,000 tasks, 65 s and 1.8 GB for a 0.6 MB file)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SiffWarning)
        ds = xr.open_dataset(t.path, engine="siff", partial_volume="keep", chunks={})
    assert ds.intensity.data.npartitions <= 8 and ds.histogram.data.npartitions <= 32
    tracemalloc.start()
    ds.load()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 3 * ds.nbytes, (peak, ds.nbytes)
    assert int(ds.frame_present.sum()) == 40
    np.testing.assert_array_equal(
        ds.intensity.isel(time=0, z=0, channel=slice(0, 40)).values,
        SiffFile(t.path).read_frames(np.arange(40)))


def test_a_file_cut_off_in_its_first_volume_opens_empty_or_kept(tmp_path):
    import xarray as xr

    t = write_siff(tmp_path / "one.siff", shape=(8, 8), channels=(1, 2), n_slices=3,
                   n_timepoints=0, extra_frames=1, photons_per_frame=50, seed=1)
    with pytest.warns(SiffWarning, match="fewer than one volume"):
        ds = xr.open_dataset(t.path, engine="siff")
    assert ds.sizes["time"] == 0
    kept = xr.open_dataset(t.path, engine="siff", partial_volume="keep")
    assert kept.sizes["time"] == 1 and int(kept.frame_present.sum()) == 1


def test_conversion_settings_it_cannot_run_with_are_refused_before_anything_is_written(
        siff_files, tmp_path):
    """An unknown scheduler name failed only once the store was laid out, leaving an
    interrupted conversion that the next (corrected) call refused to replace."""
    import pytest

    from siff_xarray import convert

    t = siff_files["single_raw"]
    dst = tmp_path / "s.zarr"
    for kwargs, message in [
        ({"scheduler": "thread"}, "scheduler 'thread': not one of threads"),
        ({"scheduler": "127.0.0.1:8786"}, "tcp://host:port"),
        ({"num_workers": 0}, "at least 1, not 0"),
        ({"shard_bytes": 0}, "shard_bytes .* must be positive, not 0"),
        ({"chunk_bytes": -1}, "chunk_bytes must be positive, not -1"),
    ]:
        with pytest.raises(ValueError, match=message):
            convert(t.path, dst, **kwargs)
        assert not dst.exists(), kwargs
    convert(t.path, dst, scheduler="Threads")  # (names as dask takes them, any case)
    assert convert(t.path, dst, resume=True).frames == t.n_frames
