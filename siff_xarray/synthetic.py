"""Synthetic ScanImage-FLIM files with known ground truth.

No real ``.siff`` files are public, so tests, demos, docs and benchmarks use
files made here. :func:`write_siff` simulates an acquisition (a scene of
Gaussian "cells" per slice, per-channel brightness, Poisson photon counts,
arrival times drawn from a multi-exponential decay convolved with a Gaussian
IRF and wrapped into one laser period, rigid motion per scan, flyback frames,
timestamps and appended text events) and writes it with :class:`SiffWriter` in
the byte layout the reference readers accept (BigTIFF, 19 tags per IFD; see
``docs/format.md``). It returns a :class:`SyntheticTruth` with every photon.

Shifts in the truth follow the package convention: the *registered* frame is
``numpy.roll(raw, (shift_y, shift_x), axis=(0, 1))``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from .format.writer import SiffWriter

__all__ = ["SiffWriter", "SyntheticTruth", "make_demo", "scanimage_header", "write_siff"]

Encoding = Literal["raw", "compressed", "mixed", "smallest"]

# ----------------------------------------------------------------------------- header text


def _mat(v: object) -> str:
    """Format a Python value as the MATLAB literal ScanImage would write."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return "'" + v.replace("'", "''") + "'"
    if isinstance(v, float):
        if np.isnan(v):
            return "NaN"
        if np.isinf(v):
            return "Inf" if v > 0 else "-Inf"
        return repr(v)
    if isinstance(v, (list, tuple)):  # cell array
        return "{" + " ".join(_mat(x) for x in v) + "}"
    if isinstance(v, np.ndarray):
        if v.ndim == 1:
            return "[" + " ".join(_mat(x.item()) for x in v) + "]"
        return "[" + ";".join(" ".join(_mat(x.item()) for x in row) for row in v) + "]"
    return str(v)


def scanimage_header(
    *,
    height: int,
    width: int,
    n_slices: int = 1,
    n_volumes: int = 1,
    frames_per_slice: int = 1,
    n_flyback: int = 0,
    z_step_um: float = 10.0,
    frame_period_s: float = 0.016,
    tau_bins: int = 629,
    bin_resolution: int = 2,
    zoom: float = 2.0,
    fov_um: float = 300.0,
    channels: Sequence[int] = (1,),
    extra: Mapping[str, str] | None = None,
) -> str:
    r"""Build a realistic ScanImage NVFD text (``key = value`` lines, ``\\n`` after each).

    ``extra`` maps keys to raw MATLAB literal text and is appended last.
    """
    stack = n_slices > 1
    c = len(channels)
    scans_per_volume = n_slices * frames_per_slice + n_flyback
    volume_period = scans_per_volume * frame_period_s
    half_y = fov_um / 2 * height / max(height, width)
    half_x = fov_um / 2 * width / max(height, width)
    chan = np.asarray(channels, dtype=np.int64).reshape(-1, 1) if c > 1 else int(channels[0])
    zs = np.arange(n_slices, dtype=np.int64) * z_step_um if stack else np.array([0])
    entries: list[tuple[str, object]] = [
        ("SI.VERSION_MAJOR", 2023), ("SI.VERSION_MINOR", 1), ("SI.VERSION_UPDATE", 0),
        ("SI.acqState", "grab"), ("SI.hBeams.powers", 20.5),
        ("SI.hBeams.pzAdjust", "scanimage.types.BeamAdjustTypes.None"),
        ("SI.hChannels.channelName", ["Channel 1", "Channel 2", "Channel 3", "Channel 4"]),
        ("SI.hChannels.channelSave", chan),
        ("SI.hChannels.channelOffset", np.array([0, 0, 0, 0])),
        ("SI.hChannels.channelInputRange", [np.array([-1, 1])] * 2),
        ("SI.hFastZ.actuatorLag", 0), ("SI.hFastZ.discardFlybackFrames", n_flyback > 0),
        ("SI.hFastZ.enable", stack), ("SI.hFastZ.enableFieldCurveCorr", False),
        ("SI.hFastZ.errorMsg", ""), ("SI.hFastZ.flybackTime", 0.015),
        ("SI.hFastZ.hasFastZ", True), ("SI.hFastZ.name", "SI FastZ"),
        ("SI.hFastZ.numDiscardFlybackFrames", n_flyback), ("SI.hFastZ.position", -45),
        ("SI.hFastZ.volumePeriodAdjustment", -0.0006), ("SI.hFastZ.waveformType", "sawtooth"),
        ("SI.hMotors.axesPosition", np.array([1.5, -2.25, -45.0])),
        ("SI.hMotors.motorPosition", np.array([[1.5, -2.25, -45.0]])),
        ("SI.hRoiManager.imagingFovUm",
         np.array([[-half_x, -half_y], [half_x, -half_y], [half_x, half_y], [-half_x, half_y]])),
        ("SI.hRoiManager.linePeriod", frame_period_s / height),
        ("SI.hRoiManager.linesPerFrame", height), ("SI.hRoiManager.mroiEnable", False),
        ("SI.hRoiManager.pixelsPerLine", width),
        ("SI.hRoiManager.scanFramePeriod", frame_period_s),
        ("SI.hRoiManager.scanFrameRate", 1.0 / frame_period_s),
        ("SI.hRoiManager.scanVolumeRate", 1.0 / volume_period),
        ("SI.hRoiManager.scanZoomFactor", zoom),
        ("SI.hScan2D.Acq.Tau_bins", tau_bins), ("SI.hScan2D.Acq.binResolution", bin_resolution),
        ("SI.hScan2D.bidirectional", False), ("SI.hScan2D.flytoTimePerScanfield", 0.001),
        ("SI.hScan2D.logAverageFactor", 1), ("SI.hScan2D.sampleRate", 8e7),
        ("SI.hScan2D.scannerFrequency", float("nan")), ("SI.hScan2D.maxSampleRate", float("inf")),
        ("SI.hStackManager.actualNumSlices", n_slices),
        ("SI.hStackManager.actualNumVolumes", n_volumes),
        ("SI.hStackManager.actualStackZStepSize", z_step_um if stack else 0),
        ("SI.hStackManager.enable", stack),
        ("SI.hStackManager.framesPerSlice", frames_per_slice),
        ("SI.hStackManager.numFramesPerVolume", scans_per_volume),
        ("SI.hStackManager.numSlices", n_slices),
        ("SI.hStackManager.stackZEndPos", float(zs[-1]) if stack else np.zeros(0)),
        ("SI.hStackManager.stackZStartPos", 0.0 if stack else np.zeros(0)),
        ("SI.hStackManager.zs", zs - 45), ("SI.hStackManager.zsRelative", zs),
        ("SI.hUserFunctions.userFunctionsCfg", np.zeros(0)),
    ]
    lines = [f"{k} = {_mat(v)}" for k, v in entries]
    lines += [f"{k} = {v}" for k, v in (extra or {}).items()]
    return "\n".join(lines) + "\n"


def roi_json(height: int, width: int, fov_um: float = 300.0) -> str:
    """Return a ScanImage ROI-group JSON with one imaging scanfield (no JSON true/false)."""
    sy, sx = height / max(height, width), width / max(height, width)
    scanfield = {
        "ver": 1, "classname": "scanimage.mroi.scanfield.fields.RotatedRectangle",
        "name": "Default Imaging Scanfield", "UserData": None, "roiUuid": "9DB51A994047081F",
        "roiUuiduint64": 1.136401848e19, "centerXY": [0, 0], "sizeXY": [sx, sy],
        "rotationDegrees": 0, "enable": 1, "pixelResolutionXY": [width, height],
        "pixelToRefTransform": [[sx / width, 0, -sx / 2], [0, sy / height, -sy / 2], [0, 0, 1]],
        "affine": [[sx, 0, -sx / 2], [0, sy, -sy / 2], [0, 0, 1]],
    }
    doc = {"RoiGroups": {
        "imagingRoiGroup": {"ver": 1, "classname": "scanimage.mroi.RoiGroup",
                            "name": "Default Imaging ROI Group", "UserData": None,
                            "roiUuid": "4D4A1BE1A4C3F0E1", "roiUuiduint64": 5.56e18,
                            "rois": {"ver": 1, "classname": "scanimage.mroi.Roi",
                                     "name": "", "UserData": None, "zs": 0,
                                     "scanfields": scanfield, "discretePlaneMode": 0}},
        "photostimRoiGroups": None,
        "integrationRoiGroup": {"ver": 1, "classname": "scanimage.mroi.RoiGroup", "name": "",
                                "UserData": None, "roiUuid": "1", "roiUuiduint64": 1.0,
                                "rois": {"_ArrayType_": "double", "_ArraySize_": [1, 0],
                                         "_ArrayData_": None}},
    }}
    return json.dumps(doc)


# ----------------------------------------------------------------------------- writer

# ----------------------------------------------------------------------------- simulation


@dataclass
class SyntheticTruth:
    """Everything :func:`write_siff` put into a file.

    Photon arrays hold every frame's photons sorted by pixel (stable with respect
    to the order written), frame ``i`` at ``photon_starts[i]:photon_starts[i+1]``.
    """

    path: str
    shape: tuple[int, int]
    channels: list[int]
    n_slices: int
    frames_per_slice: int
    n_flyback: int
    n_timepoints: int
    n_frames: int
    encodings: np.ndarray
    photon_starts: np.ndarray
    pixel_index: np.ndarray
    arrival: np.ndarray
    shifts: np.ndarray
    frame_time_s: np.ndarray
    epoch_laser_ns: np.ndarray
    epoch_system_ns: np.ndarray
    events: list[tuple[int, str, float]]
    lifetimes_ns: tuple[float, ...]
    fractions: tuple[float, ...]
    irf_offset_ns: float
    irf_sigma_ns: float
    tau_bins: int
    bin_width_ps: float
    scene: np.ndarray = field(repr=False)
    #: every file written (more than one with ``frames_per_file``), in frame order
    paths: list[str] = field(default_factory=list)

    def photons(self, frame: int) -> tuple[np.ndarray, np.ndarray]:
        """``(pixel_index, arrival)`` of one frame, sorted by pixel."""
        s, e = self.photon_starts[frame], self.photon_starts[frame + 1]
        return self.pixel_index[s:e], self.arrival[s:e]

    def plane(self, frame: int) -> int:
        """Return the slice a frame images (0 for flyback frames: they show slice 0)."""
        c = len(self.channels)
        r = frame % ((self.n_slices * self.frames_per_slice + self.n_flyback) * c)
        return 0 if r >= self.n_slices * self.frames_per_slice * c else \
            (r // c) // self.frames_per_slice

    def oracle_shifts(self, counts: np.ndarray, frames: Sequence[int]) -> np.ndarray:
        """Shifts an oracle that knows the true scene gives frames of ``counts (F, H, W)``.

        For each frame, the candidate shift (every one the motion could take) of
        maximum multinomial likelihood ``sum_x counts(x) log(scene_s(x) / sum
        scene_s)``, with ``scene_s`` the true scene seen at shift ``s``: the limit
        of any registration that estimates its reference from the data. Returns
        int64 ``(F, 2)`` in the convention of :attr:`shifts`.
        """
        counts = np.asarray(counts, dtype=np.float64)
        h, w = self.shape
        m = (self.scene.shape[1] - h) // 2
        cand = np.array([(sy, sx) for sy in range(-m, m + 1) for sx in range(-m, m + 1)])
        out = np.zeros((len(frames), 2), dtype=np.int64)
        planes = np.array([self.plane(int(fr)) for fr in frames])
        for z in np.unique(planes):
            windows = np.stack([self.scene[z, m + sy: m + sy + h, m + sx: m + sx + w]
                                for sy, sx in cand])
            log_p = np.log(windows / windows.sum(axis=(1, 2), keepdims=True))
            sel = planes == z
            ll = counts[sel].reshape(sel.sum(), -1) @ log_p.reshape(len(cand), -1).T
            out[sel] = cand[ll.argmax(axis=1)]
        return out

    def intensity(self, frames: Sequence[int] | None = None) -> np.ndarray:
        """Photon-count images of ``frames`` (default all), ``uint16`` ``(F, H, W)``."""
        frames = range(self.n_frames) if frames is None else frames
        h, w = self.shape
        out = np.zeros((len(frames), h * w), dtype=np.int64)
        for i, fr in enumerate(frames):
            out[i] = np.bincount(self.photons(fr)[0], minlength=h * w)
        return out.reshape(-1, h, w).astype(np.uint16)


def _scene(rng: np.random.Generator, h: int, w: int, n_cells: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.full((h, w), 0.15)
    for _ in range(n_cells):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        r = rng.uniform(1.5, 0.06 * min(h, w) + 2)
        img += rng.uniform(0.5, 2.0) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    return img / img.mean()


def _arrivals(rng: np.random.Generator, n: int, lifetimes: Sequence[float],
              fractions: Sequence[float], irf_offset: float, irf_sigma: float,
              period_ns: float, bin_ns: float, tau_bins: int) -> np.ndarray:
    comp = rng.choice(len(lifetimes), size=n, p=np.asarray(fractions) / np.sum(fractions))
    t = irf_offset + rng.normal(0.0, irf_sigma, n) + rng.exponential(
        np.asarray(lifetimes)[comp])
    b = np.floor(np.mod(t, period_ns) / bin_ns).astype(np.int64)
    return np.clip(b, 0, tau_bins - 1)


def write_siff(
    path: str | os.PathLike[str],
    *,
    shape: tuple[int, int] = (32, 32),
    channels: Sequence[int] = (1,),
    n_slices: int = 1,
    frames_per_slice: int = 1,
    n_flyback: int = 0,
    n_timepoints: int = 4,
    extra_frames: int = 0,
    encoding: Encoding | Callable[[int, int], str] = "smallest",
    bigtiff: bool = True,
    format: Literal["siff", "tiff"] = "siff",
    tiff_signed: bool = False,
    photons_per_frame: float = 2000.0,
    channel_brightness: Sequence[float] | None = None,
    flyback_brightness: float = 0.2,
    lifetimes_ns: Sequence[float] = (0.6, 2.8),
    fractions: Sequence[float] = (0.4, 0.6),
    irf_offset_ns: float = 1.2,
    irf_sigma_ns: float = 0.12,
    tau_bins: int = 629,
    bin_resolution: int = 2,
    max_shift: int = 0,
    motion: Literal["scan", "volume"] | np.ndarray = "scan",
    frame_period_s: float = 0.016,
    start_epoch_ns: int = 1_713_382_945_498_920_800,
    events: Mapping[int, tuple[str, float | None]] | None = None,
    overflow_fraction: float = 0.0,
    empty_compressed: bool = False,
    n_cells: int = 12,
    seed: int = 0,
    header_extra: Mapping[str, str] | None = None,
    frames_per_file: int | None = None,
    return_truth: bool = True,
) -> SyntheticTruth | None:
    """Simulate an acquisition and write it as a ScanImage-FLIM file.

    Parameters
    ----------
    path
        Output file (``.siff``; ``.tif`` for ``format="tiff"``).
    shape
        ``(height, width)`` of each frame.
    channels
        Saved ScanImage channel numbers (1-based), e.g. ``(1, 2)``.
    n_slices, frames_per_slice, n_flyback
        Volume layout: slices, frames per slice and flyback scans per volume (each
        flyback scan stores one frame per channel).
    n_timepoints, extra_frames
        Complete volumes, then ``extra_frames`` more file frames (a partial volume).
    encoding
        ``"raw"``, ``"compressed"``, ``"mixed"`` (alternating per frame),
        ``"smallest"`` (whichever is smaller, as ScanImage-FLIM appears to do), or a
        function ``(frame, n_photons) -> "raw" | "compressed"``.
    bigtiff
        BigTIFF (default) or classic TIFF container.
    format
        ``"siff"`` (photons) or ``"tiff"`` (ScanImage intensity-only TIFF).
    tiff_signed
        With ``format="tiff"``: signed 16-bit pages holding ``counts - 3`` (ScanImage
        subtracts a channel offset, so values can be negative).
    photons_per_frame
        Mean photons in a frame of the brightest channel.
    channel_brightness
        Relative brightness per channel (default 1, then 0.1 for the others).
    flyback_brightness
        Relative brightness of flyback frames.
    lifetimes_ns, fractions, irf_offset_ns, irf_sigma_ns
        The decay: exponential components and their weights, convolved with a
        Gaussian IRF (offset = its mean).
    tau_bins, bin_resolution
        Arrival-time bins per laser period and ScanImage ``binResolution``
        (bin width ``5 * 2**bin_resolution`` ps).
    max_shift
        Largest rigid motion (pixels, each axis); motion is a random walk of one
        pixel steps per scan (all channels of a scan share its position).
    motion
        ``"scan"`` (default): the walk takes a step every scan; ``"volume"``: one
        step per volume, so all planes of a volume share a position (fast
        volumetric imaging, where motion between planes is negligible); or an
        integer array ``(n_scans, 2)`` giving the position of every scan (each
        coordinate within ``max_shift``), e.g. drift with rare jumps.
    frame_period_s, start_epoch_ns
        Timing of the scans; the laser-clock epoch of the first frame.
    events
        ``{frame: (text, time_s or None)}`` appended-text events.
    overflow_fraction
        Fraction of photons given arrival times ``>= tau_bins`` (tests of edge cases).
    empty_compressed
        Allow compressed frames with no photons (corrosiff cannot read them).
    n_cells, seed
        Scene complexity and random seed.
    header_extra
        Extra header lines (raw MATLAB literal text).
    frames_per_file
        Split the acquisition as ScanImage does (``logFramesPerFile``): files
        ``<stem>_00001<suffix>``, ``<stem>_00002<suffix>``, ... of this many frames
        each (volumes may straddle files), named after ``path``; frame numbers and
        timestamps continue across files.
    return_truth
        Collect and return the ground truth (set False for huge files).

    """
    rng = np.random.default_rng(seed)
    h, w = shape
    channels = list(channels)
    c = len(channels)
    bright = list(channel_brightness) if channel_brightness is not None else \
        [1.0] + [0.1] * (c - 1)
    v = n_slices * frames_per_slice * c
    p = v + n_flyback * c
    n_frames = n_timepoints * p + extra_frames
    n_volumes = -(-n_frames // p)
    bin_ps = 5.0 * 2**bin_resolution
    period_ns = tau_bins * bin_ps / 1000.0
    m = max_shift
    scenes = [_scene(rng, h + 2 * m, w + 2 * m, n_cells) for _ in range(n_slices)]
    # motion: a clipped random walk per scan (the channels of one scan share it)
    n_scans = -(-n_frames // c)
    if isinstance(motion, str):
        if motion not in ("scan", "volume"):
            raise ValueError(f"motion must be 'scan', 'volume' or an array, got {motion!r}")
        steps = rng.integers(-1, 2, size=(n_scans, 2)) if m else np.zeros((n_scans, 2), int)
        scan_shift = np.zeros((n_scans, 2), dtype=np.int64)
        for k in range(1, n_scans):  # reflect at the bounds so motion keeps moving
            scan_shift[k] = scan_shift[k - 1] + steps[k]
            over = np.abs(scan_shift[k]) > m
            scan_shift[k][over] -= 2 * steps[k][over]
    else:
        scan_shift = np.asarray(motion, dtype=np.int64)
        if scan_shift.shape != (n_scans, 2) or np.abs(scan_shift).max(initial=0) > m:
            raise ValueError(f"a motion array must have shape {(n_scans, 2)} (one position "
                             f"per scan) with values within max_shift={m}")
    activity = 1.0 + 0.3 * np.sin(np.arange(n_volumes) / 3.0)

    nvfd = scanimage_header(height=h, width=w, channels=channels, n_slices=n_slices,
                            frames_per_slice=frames_per_slice, n_flyback=n_flyback,
                            n_volumes=n_timepoints, frame_period_s=frame_period_s,
                            tau_bins=tau_bins, bin_resolution=bin_resolution,
                            extra=header_extra)
    truth_pix: list[np.ndarray] = []
    truth_tau: list[np.ndarray] = []
    encodings: list[str] = []
    shifts = np.zeros((n_frames, 2), dtype=np.int64)
    times = np.zeros(n_frames)
    laser = np.zeros(n_frames, dtype=np.int64)
    system = np.zeros(n_frames, dtype=np.int64)
    events = dict(events or {})
    event_list: list[tuple[int, str, float]] = []
    start_system = start_epoch_ns - 535_000_000
    drift_ppm = 3.0
    if frames_per_file is not None and frames_per_file < 1:
        raise ValueError("frames_per_file must be at least 1")
    per_file = frames_per_file or max(n_frames, 1)
    stem, suffix = os.path.splitext(os.fspath(path))
    paths = ([os.fspath(path)] if frames_per_file is None else
             [f"{stem}_{k + 1:05d}{suffix}" for k in range(max(1, -(-n_frames // per_file)))])
    fh = None
    try:
        for fr in range(n_frames + (n_frames == 0)):
            if fr % per_file == 0:  # start the next file of the acquisition
                if fh is not None:
                    fh.close()
                fh = open(paths[fr // per_file], "wb")  # noqa: SIM115 - closed below
                writer = SiffWriter(fh, nvfd, roi_json(h, w), bigtiff=bigtiff)
                writer.set_shape(h, w)
            if fr == n_frames:
                break
            vol, r = divmod(fr, p)
            scan = fr // c  # all channels of one scan share a timestamp
            ch = r % c
            fly = r >= v
            zslice = 0 if fly else (r // c) // frames_per_slice
            sy, sx = scan_shift[vol if isinstance(motion, str) and motion == "volume"
                                else scan]
            if not fly:
                shifts[fr] = (sy, sx)
            scene = scenes[zslice][m + sy : m + sy + h, m + sx : m + sx + w]
            lam = scene * (photons_per_frame / (h * w)) * bright[ch] * activity[vol]
            if fly:
                lam = lam * flyback_brightness
            counts = rng.poisson(lam).astype(np.int64)
            n = int(counts.sum())
            pix = np.repeat(np.arange(h * w, dtype=np.int64), counts.ravel())
            tau = _arrivals(rng, n, lifetimes_ns, fractions, irf_offset_ns, irf_sigma_ns,
                            period_ns, bin_ps / 1000.0, tau_bins)
            if overflow_fraction > 0 and n:
                over = rng.random(n) < overflow_fraction
                tau[over] = tau_bins + rng.integers(0, 3 * tau_bins, over.sum())
            t_s = 0.01 + scan * frame_period_s
            times[fr] = t_s
            laser[fr] = start_epoch_ns + round(t_s * 1e9 * (1 + drift_ppm * 1e-6))
            system[fr] = start_system + int(t_s) * 1_000_000_000 + int(rng.integers(0, 2e6))
            desc = (
                f"frameNumbers = {fr}\nframeNumberAcquisition = {fr}\n"
                f"frameTimestamps_sec = {t_s:.6f}\nsync Stamps = {scan * 1000}\n"
                f"mostRecentSystemTimestamp_epoch = {system[fr]}\n"
                "acqTriggerTimestamps_sec = \nnextFileMarkerTimestamps_sec = \n"
                "endOfAcquisition = \nendOfAcquisitionMode = \ndcOverVoltage = 0\n"
                f"epoch = {laser[fr]}\n"
            )
            if fr in events:
                text, t_ev = events[fr]
                desc += f"Appended text = {text}\n"
                if t_ev is not None:
                    desc += f"Text timestamp = {t_ev:.6f}\n"
                event_list.append((fr, text, np.nan if t_ev is None else float(t_ev)))
            if format == "tiff":
                enc = "tiff"
                if tiff_signed:
                    writer.write_frame(desc, image=np.clip(counts.astype(np.int64) - 3, -32768,
                                                           32767).reshape(h, w), signed=True)
                else:
                    writer.write_frame(desc, image=np.minimum(counts, 65535).reshape(h, w))
            else:
                if callable(encoding):
                    enc = encoding(fr, n)
                elif encoding == "mixed":
                    enc = "raw" if fr % 2 == 0 else "compressed"
                elif encoding == "smallest":
                    enc = "compressed" if 2 * h * w + 2 * n < 8 * n else "raw"
                else:
                    enc = encoding
                if enc == "compressed" and n == 0 and not empty_compressed:
                    enc = "raw"
                if enc == "compressed" and (tau.max(initial=0) > 65535 or counts.max() > 65535):
                    enc = "raw"
                if enc == "compressed":
                    writer.write_frame(desc, counts=counts.reshape(h, w).astype(np.uint16),
                                       arrivals=tau.astype(np.uint16))
                elif enc == "raw":
                    order = rng.permutation(n)  # acquisition order is not pixel order
                    y, x = pix[order] // w, pix[order] % w
                    rec = (y.astype(np.uint64) << np.uint64(48)) | (
                        x.astype(np.uint64) << np.uint64(32)) | tau[order].astype(np.uint64)
                    writer.write_frame(desc, photons=rec)
                    if return_truth:  # truth order: pixel-sorted, stable w.r.t. the file
                        srt = np.argsort(pix[order], kind="stable")
                        pix, tau = pix[order][srt], tau[order][srt]
                else:
                    raise ValueError(f"unknown encoding {enc!r}")
            encodings.append(enc)
            if return_truth:
                truth_pix.append(pix.astype(np.uint32))
                truth_tau.append(tau.astype(np.uint32))
    finally:
        if fh is not None:
            fh.close()
    if not return_truth:
        return None
    starts = np.zeros(n_frames + 1, dtype=np.int64)
    np.cumsum([len(x) for x in truth_pix], out=starts[1:])
    return SyntheticTruth(
        path=paths[0], paths=paths, shape=(h, w), channels=channels, n_slices=n_slices,
        frames_per_slice=frames_per_slice, n_flyback=n_flyback, n_timepoints=n_timepoints,
        n_frames=n_frames, encodings=np.array(encodings), photon_starts=starts,
        pixel_index=np.concatenate(truth_pix) if truth_pix else np.zeros(0, np.uint32),
        arrival=np.concatenate(truth_tau) if truth_tau else np.zeros(0, np.uint32),
        shifts=shifts, frame_time_s=times, epoch_laser_ns=laser, epoch_system_ns=system,
        events=event_list, lifetimes_ns=tuple(lifetimes_ns), fractions=tuple(fractions),
        irf_offset_ns=irf_offset_ns, irf_sigma_ns=irf_sigma_ns, tau_bins=tau_bins,
        bin_width_ps=bin_ps, scene=np.stack(scenes),
    )


def make_demo(path: str | os.PathLike[str], seed: int = 0) -> SyntheticTruth:
    """Write the built-in demo acquisition: 2 channels, 3 slices + 1 flyback, 40 volumes."""
    return write_siff(
        path, shape=(128, 64), channels=(1, 2), n_slices=3, n_flyback=1, n_timepoints=40,
        extra_frames=2, photons_per_frame=6000, max_shift=3, encoding="smallest",
        events={20: ("stimulus on", 0.5), 200: ("stimulus off", 2.1)}, seed=seed,
    )
