"""Frame bookkeeping: which file frame is which (timepoint, slice, repeat, channel).

:class:`ImParams` keeps SiffPy's names and meanings (``flatten_by_timepoints``,
``framelist_by_slices``, ``array_shape`` ...) so notebooks keep working, but
computes everything exactly and vectorised. Differences from SiffPy are listed
in ``docs/migration.md``; in short:

* the number of timepoints counts every complete volume exactly (SiffPy
  estimated it by proportion and could be one short);
* flyback frames are counted only when FastZ is enabled *and* discards flyback
  frames (SiffPy counted them whenever a FastZ section existed);
* ``color_channel`` is always a 0-based index into the *saved* channels (SiffPy
  sometimes used the ScanImage channel number minus one);
* ``reference_z`` / ``slice_idx`` mean the slice, also when frames-per-slice > 1,
  and accept lists;
* every frame-list function covers complete volumes only unless asked
  (``include_partial=True``), including ``framelist_by_slice``;
* ``single_channel_volume`` keeps the repeat axis when frames-per-slice > 1.

File frame order (one volume): channel fastest, then repeat within a slice,
then slice; then ``numDiscardFlybackFrames x channels`` flyback frames.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import SiffFormatError, SiffWarning, user_stacklevel
from .constants import MULTIHARP_BASE_RESOLUTION_PS
from .metadata import ScanImageMetadata

__all__ = ["FramePosition", "ImParams", "ScanImageModule"]

#: Header values beyond these are treated as corrupt rather than trusted.
MAX_LAYOUT = 100_000  # channels, slices or frames per slice
MAX_TAU_BINS = 1 << 20


def _as_float(v: Any) -> float | None:
    """Return a header value as a finite float, or ``None`` when it is not a finite number."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
        return None
    return float(v)


def _absent(v: Any) -> bool:
    """Tell whether a header value is missing: absent, or MATLAB's empty ``[]`` / ``''``."""
    return v is None or (isinstance(v, (np.ndarray, list, str)) and len(v) == 0)


def _module_name(part: str) -> str:
    """ScanImage's ``hFastZ`` becomes ``FastZ`` (SiffPy's attribute names)."""
    return part[1:] if len(part) > 1 and part[0] == "h" and part[1].isupper() else part


class _ItemsAsAttributes:
    """``obj[key]`` is ``obj.key`` (a KeyError where the attribute is missing)."""

    def __getitem__(self, key: str) -> Any:
        try:
            return getattr(self, key)
        except AttributeError as e:
            raise KeyError(key) from e


class ScanImageModule(_ItemsAsAttributes):
    """Attribute-style view of one ScanImage settings section (``im_params.FastZ``)."""

    def __init__(self, name: str, tree: dict[str, Any]) -> None:
        self._name = name
        self._params = {_module_name(k): v for k, v in tree.items() if not isinstance(v, dict)}
        self._submodules = {_module_name(k): ScanImageModule(_module_name(k), v)
                            for k, v in tree.items() if isinstance(v, dict)}

    def __getattr__(self, key: str) -> Any:
        if key.startswith("_"):
            raise AttributeError(key)
        if key in self._params:
            return self._params[key]
        if key in self._submodules:
            return self._submodules[key]
        raise AttributeError(f"ScanImage module {self._name} has no parameter {key!r}")

    def __contains__(self, key: str) -> bool:
        return key in self._params or key in self._submodules

    def __dir__(self) -> list[str]:
        return sorted(self._params) + sorted(self._submodules)

    def get(self, key: str, default: Any = None) -> Any:
        """Return a parameter or ``default``."""
        return self._params.get(key, self._submodules.get(key, default))

    def __str__(self) -> str:
        lines = [f"{self._name} module:", f"    submodules : {sorted(self._submodules) or {}}"]
        lines += [f"    {k} : {_show(v)}" for k, v in sorted(self._params.items())]
        return "\n".join(lines)

    __repr__ = __str__


def _show(v: Any) -> str:
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, np.ndarray):
        return np.array2string(v, separator=", ")
    return "" if v is None else str(v)


@dataclass(frozen=True)
class FramePosition:
    """Where a (non-flyback) file frame sits in the acquisition."""

    timepoint: int
    slice: int
    repeat: int
    channel: int  #: 0-based index into the saved channels
    complete: bool  #: False for a frame of an incomplete final volume


class ImParams(_ItemsAsAttributes):
    """Acquisition layout computed from the ScanImage header and the frame count.

    Parameters
    ----------
    metadata
        Parsed ScanImage settings.
    num_frames
        Number of frames (IFDs) in the file, flyback included.
    frame_shape
        ``(height, width)`` of the frames as stored (authoritative over the header).
    roi_groups
        Parsed ROI groups (kept for display and geometry).
    tau_bins, bin_width_ps, base_resolution_ps
        Overrides for the arrival-time axis: number of bins, bin width in ps, and the
        TCSPC base resolution (5 ps for MultiHarp/MHLib >= 3; 20 ps before) used with
        ``binResolution`` when ``bin_width_ps`` is not given.

    """

    def __init__(
        self,
        metadata: ScanImageMetadata,
        num_frames: int,
        frame_shape: tuple[int, int] | None = None,
        roi_groups: dict[str, Any] | None = None,
        *,
        tau_bins: int | None = None,
        bin_width_ps: float | None = None,
        base_resolution_ps: float = MULTIHARP_BASE_RESOLUTION_PS,
        name: str = "<header>",
    ) -> None:
        self.name = name
        self.metadata = metadata
        self._num_frames = int(num_frames)
        self._frame_shape = frame_shape
        self.roi_groups = roi_groups or {}
        self._tau_bins = tau_bins
        self._bin_width_ps = bin_width_ps
        self.base_resolution_ps = float(base_resolution_ps)
        si = metadata.get("SI", {})
        self._modules = {"base": ScanImageModule("base", {k: v for k, v in si.items()
                                                          if not isinstance(v, dict)})}
        for k, v in si.items():
            if isinstance(v, dict):
                self._modules[_module_name(k)] = ScanImageModule(_module_name(k), v)
        self._warned: set[str] = set()
        self._validate()

    # ---------------------------------------------------------------- header access

    def _get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get_path(key, default)

    def _ignore(self, key: str, what: str, effect: str) -> None:
        """Warn (once per key) that an optional header value is unusable and is ignored."""
        if key in self._warned:
            return
        self._warned.add(key)
        text = self.metadata.raw.get(key)
        shown = text.strip() if isinstance(text, str) else repr(self._get(key))
        shown = shown if len(shown) < 60 else shown[:57] + "..."
        warnings.warn(f"{self.name}: {key} = {shown} in the header is not {what}; it is "
                      f"ignored ({effect})", SiffWarning, stacklevel=user_stacklevel())

    def _optional_float(self, key: str, effect: str, positive: bool = False) -> float | None:
        """Return an optional header number; None (with a warning) when present but unusable."""
        v = self._get(key)
        if _absent(v):
            return None
        f = _as_float(v)
        if f is None or (positive and f <= 0):
            self._ignore(key, "a positive number" if positive else "a number", effect)
            return None
        return f

    def __getattr__(self, key: str) -> Any:
        if key.startswith("_"):
            raise AttributeError(key)
        modules = self.__dict__.get("_modules", {})
        if key in modules:
            return modules[key]
        raise AttributeError(f"ImParams has no attribute or ScanImage module {key!r}")

    @property
    def modules(self) -> list[str]:
        """Names of the ScanImage modules present in the header."""
        return list(self._modules)

    def _unusable(self, key: str, value: Any, what: str, why: str) -> SiffFormatError:
        text = self.metadata.raw.get(key)
        shown = text.strip() if isinstance(text, str) else repr(value)
        shown = shown if len(shown) < 60 else shown[:57] + "..."
        return SiffFormatError(self.name, f"{key} = {shown} in the header is not {what}; "
                               f"it decides {why}, so the file cannot be read without it")

    def _layout_count(self, key: str, default: int) -> int:
        """Return a count that decides how frames form volumes (``default`` when absent).

        A present value must be a whole number (>= 1, or >= 0 for flyback frames);
        anything else is a SiffFormatError naming the key, never a silent guess.
        """
        v = self._get(key)
        if v is None:
            return default
        f = _as_float(v)
        if f is None or f < min(default, 1) or f != round(f):
            raise self._unusable(key, v, "a whole number", "how frames form volumes")
        return int(min(f, 10 * MAX_LAYOUT))

    def _validate(self) -> None:
        c, z, r = self.num_colors, self.num_slices, self.frames_per_slice
        b = self.num_discard_flyback_frames
        if not all(1 <= v <= MAX_LAYOUT for v in (c, z, r)) or b > MAX_LAYOUT * c:
            raise SiffFormatError(
                self.name, f"implausible acquisition layout in the header: {c} channels, "
                f"{z} slices, {r} frames per slice")

    # ---------------------------------------------------------------- channels

    @property
    def colors(self) -> int | list[int]:
        """Saved ScanImage channel number(s), 1-based.

        An ``int`` for one channel, as SiffPy (``channelSave = 1``), else a list in
        file order. :attr:`color_list` is always a list.
        """
        cl = self.color_list
        return cl[0] if len(cl) == 1 else cl

    @property
    def color_list(self) -> list[int]:
        """Saved ScanImage channel numbers (1-based), in file order, always a list."""
        v = self._get("SI.hChannels.channelSave")
        if v is None:
            return [1]
        arr = np.atleast_1d(np.asarray(v)).ravel()
        if arr.dtype.kind not in "iuf" or arr.size == 0 or arr.size > 10 * MAX_LAYOUT \
                or not np.isfinite(arr).all() or (arr < 1).any() or (arr > 2**31).any() \
                or (arr != np.round(arr)).any():
            raise self._unusable("SI.hChannels.channelSave", v, "a list of channel numbers",
                                 "which frame belongs to which channel")
        return [int(x) for x in arr]

    channels = color_list

    @property
    def num_colors(self) -> int:
        """Number of saved channels (frames per scan)."""
        return len(self.color_list)

    @property
    def lowest_color_channel(self) -> int:
        """Lowest saved ScanImage channel number (1-based, as in SiffPy)."""
        return min(self.color_list)

    @property
    def channel_names(self) -> list[str]:
        """Names of the saved channels (``channelName`` from the header when present)."""
        names = self._get("SI.hChannels.channelName")
        out = []
        for ch in self.color_list:
            if isinstance(names, list) and 0 < ch <= len(names) and isinstance(names[ch - 1], str):
                out.append(names[ch - 1])
            else:
                out.append(f"Channel {ch}")
        return out

    # ---------------------------------------------------------------- volume layout

    @property
    def stack_enabled(self) -> bool:
        """Whether the StackManager (z stack / volume imaging) is enabled."""
        return bool(self._get("SI.hStackManager.enable", False))

    @property
    def num_slices(self) -> int:
        """Slices per volume (``Z``)."""
        if not self.stack_enabled:
            return 1
        start, end = self._get("SI.hStackManager.stackZStartPos"), \
            self._get("SI.hStackManager.stackZEndPos")
        if start is not None and end is not None and np.array_equal(start, end):
            return 1
        key = "SI.hStackManager.actualNumSlices"
        if self._get(key) is None:
            key = "SI.hStackManager.numSlices"
        return self._layout_count(key, 1)

    @property
    def frames_per_slice(self) -> int:
        """Frames acquired per slice per volume (``R``, ScanImage ``framesPerSlice``)."""
        if not self.stack_enabled:
            return 1
        return self._layout_count("SI.hStackManager.framesPerSlice", 1)

    @property
    def discard_frames(self) -> bool:
        """FastZ is enabled and ScanImage stores flyback frames to be discarded."""
        return bool(self._get("SI.hFastZ.enable", False)) and bool(
            self._get("SI.hFastZ.discardFlybackFrames", False))

    @property
    def num_discard_flyback_frames(self) -> int:
        """Flyback frames per volume in the file, all channels counted (``B``)."""
        if not self.discard_frames:
            return 0
        return self._layout_count("SI.hFastZ.numDiscardFlybackFrames", 0) * self.num_colors

    @property
    def flyback_scans_per_volume(self) -> int:
        """Flyback scans per volume: the header's ``numDiscardFlybackFrames``.

        Each scan stores one frame per channel, so the file holds
        ``num_discard_flyback_frames = flyback_scans_per_volume * num_colors``
        flyback frames per volume.
        """
        return self.num_discard_flyback_frames // max(self.num_colors, 1)

    @property
    def frames_per_volume(self) -> int:
        """Non-flyback frames per volume, ``Z * R * C`` (SiffPy's meaning)."""
        return self.num_slices * self.frames_per_slice * self.num_colors

    @property
    def file_frames_per_volume(self) -> int:
        """Frames per volume as stored, flyback included (``P = V + B``)."""
        return self.frames_per_volume + self.num_discard_flyback_frames

    @property
    def num_frames(self) -> int:
        """Frames (IFDs) in the file, flyback included."""
        return self._num_frames

    @property
    def num_timepoints(self) -> int:
        """Complete volumes (a volume whose only missing frames are flyback counts)."""
        p, v = self.file_frames_per_volume, self.frames_per_volume
        return self._num_frames // p + (1 if self._num_frames % p >= v else 0)

    num_volumes = num_timepoints

    @property
    def num_true_frames(self) -> int:
        """Exact number of non-flyback frames, partial final volume included."""
        p, v = self.file_frames_per_volume, self.frames_per_volume
        return (self._num_frames // p) * v + min(self._num_frames % p, v)

    @property
    def final_full_volume_frame(self) -> int:
        """Non-flyback frames in complete volumes (SiffPy's flyback-free frame index).

        Exact (``num_timepoints * frames_per_volume``), where SiffPy estimates the
        non-flyback frames by proportion.
        """
        return self.num_timepoints * self.frames_per_volume

    @property
    def num_partial_frames(self) -> int:
        """Non-flyback frames of an incomplete final volume (0 if none)."""
        return self.num_true_frames - self.num_timepoints * self.frames_per_volume

    @property
    def flyback_frames(self) -> list[int]:
        """File indices of all flyback frames."""
        f = np.arange(self._num_frames)
        return f[f % self.file_frames_per_volume >= self.frames_per_volume].tolist()

    @property
    def all_frames(self) -> list[int]:
        """File indices of all non-flyback frames, sorted (partial volume included)."""
        f = np.arange(self._num_frames)
        return f[f % self.file_frames_per_volume < self.frames_per_volume].tolist()

    # ---------------------------------------------------------------- geometry

    @property
    def ysize(self) -> int:
        """Lines per frame (from the IFDs; header ``linesPerFrame`` as fallback)."""
        if self._frame_shape is not None:
            return int(self._frame_shape[0])
        return self._header_size("SI.hRoiManager.linesPerFrame")

    @property
    def xsize(self) -> int:
        """Pixels per line (from the IFDs; header ``pixelsPerLine`` as fallback)."""
        if self._frame_shape is not None:
            return int(self._frame_shape[1])
        return self._header_size("SI.hRoiManager.pixelsPerLine")

    def _header_size(self, key: str) -> int:
        """Return a frame size from the header: 0 when absent, SiffFormatError if not a size."""
        v = self._get(key, 0)
        f = _as_float(v)
        if f is None or f < 0 or f > 65535 or f != int(f):
            raise SiffFormatError(self.name, f"header value {key} = {v!r} is not a frame size")
        return int(f)

    @property
    def shape(self) -> tuple[int, int]:
        """Frame shape ``(y, x)``."""
        return (self.ysize, self.xsize)

    def _rz(self) -> tuple[int, ...]:
        return (self.frames_per_slice,) if self.frames_per_slice > 1 else ()

    #: SiffPy's axis of the channels in :attr:`array_shape` (counted from the end)
    CHANNEL_AXIS = -3

    def __contains__(self, key: str) -> bool:
        return key in self._modules

    def keys(self) -> list[str]:
        """Names of the ScanImage modules (``im_params["FastZ"]`` is one)."""
        return list(self._modules)

    def values(self) -> list[Any]:
        """Return the ScanImage modules, in the order of :meth:`keys`."""
        return list(self._modules.values())

    def items(self) -> list[tuple[str, Any]]:
        """``(name, module)`` pairs of the ScanImage modules."""
        return list(self._modules.items())

    def _yx_scale(self) -> list[float]:
        px = self.pixel_size_um
        if px is None:
            raise ArithmeticError(f"{self.name}: the header's imagingFovUm does not give the "
                                  "pixel size (it needs the field's corners)")
        return [float(px[0]), float(px[1])]

    @property
    def scale(self) -> list[float]:
        """SiffPy's axis scales: ``[t, (1/V if R > 1), (z step if Z > 1), colour, y, x]``.

        Time 1.0, the repeats ``1 / frames_per_volume``, z the step in um (1e-6 when
        0), colour 1.0, and y, x in um per pixel from ``imagingFovUm``. Axes of one
        slice or repeat are left out, as in SiffPy (see :attr:`scale_force_z`).
        """
        out = [1.0]
        if self.frames_per_slice != 1:
            out.append(1.0 / self.frames_per_volume)
        if self.num_slices > 1:
            out.append(self.step_size or 1e-6)
        return [*out, 1.0, *self._yx_scale()]

    @property
    def scale_force_z(self) -> list[float]:
        """:attr:`scale` with a z entry (1.0) also for one slice."""
        out = self.scale
        if self.num_slices == 1:
            out.insert(2 if self.frames_per_slice != 1 else 1, 1.0)
        return out

    @property
    def scale_no_color_no_fps(self) -> list[float]:
        """:attr:`scale` without the repeat and colour entries: ``[t, (z), y, x]``.

        (SiffPy's drops z instead of the colour when there are several slices.)
        """
        out = [1.0]
        if self.num_slices > 1:
            out.append(self.step_size or 1e-6)
        return [*out, *self._yx_scale()]

    @property
    def axis_labels(self) -> list[str]:
        """SiffPy's axis names: length-1 axes (repeats, slices, colours) left out.

        ``y`` comes before ``x``, as in the arrays (SiffPy lists ``x`` first).
        """
        out = ["Time"]
        if self.frames_per_slice > 1:
            out.append("Sub-slice repeats")
        if self.num_slices > 1:
            out.append("Z planes")
        if self.num_colors > 1:
            out.append("Color channel")
        return [*out, "y", "x"]

    @property
    def volume(self) -> tuple[int, ...]:
        """Shape of one volume: ``(Z, [R], C, y, x)``."""
        return (self.num_slices, *self._rz(), self.num_colors, *self.shape)

    @property
    def single_channel_volume(self) -> tuple[int, ...]:
        """Shape of one volume of one channel: ``(Z, [R], y, x)``."""
        return (self.num_slices, *self._rz(), *self.shape)

    @property
    def volume_one_color(self) -> tuple[int, ...]:
        """Alias of :attr:`single_channel_volume` (consistent for one channel too)."""
        return self.single_channel_volume

    @property
    def array_shape(self) -> tuple[int, ...]:
        """Shape ``(timepoints, Z, [R], C, y, x)`` of the whole acquisition.

        The frames of ``flatten_by_timepoints(color_channel=None)`` reshape to it.
        """
        return (self.num_timepoints, *self.volume)

    stack = array_shape

    @property
    def step_size(self) -> float:
        """Z step between slices (um); 0 without a stack."""
        if not self.stack_enabled:
            return 0.0
        key = ("SI.hStackManager.actualStackZStepSize"
               if self._get("SI.hStackManager.actualStackZStepSize") is not None
               else "SI.hStackManager.stackZStepSize")
        v = self._optional_float(key, "z steps of 0 um")
        return 0.0 if v is None else v

    @property
    def z_vals(self) -> list[float] | None:
        """Relative z of each slice (``zsRelative``), or ``None`` without a stack."""
        if not self.stack_enabled:
            return None
        key = "SI.hStackManager.zsRelative"
        v = self._get(key)
        if _absent(v):
            return None
        try:
            if isinstance(v, (str, bool)):
                raise TypeError
            z = np.asarray(v, dtype=float).ravel()
            if not np.isfinite(z).all():
                raise ValueError
            return z.tolist()
        except (TypeError, ValueError):  # e.g. a cell array holding text
            self._ignore(key, "a list of z positions", "z from the step size")
            return None

    @property
    def z_positions(self) -> np.ndarray:
        """Z of each slice in um: ``zsRelative`` if it fits, else ``step_size * k``."""
        z = self.z_vals
        if z is not None and len(z) == self.num_slices:
            return np.asarray(z, dtype=float)
        return np.arange(self.num_slices, dtype=float) * self.step_size

    @property
    def zoom(self) -> float | None:
        """Scan zoom factor (None when absent or not a number)."""
        return self._optional_float("SI.hRoiManager.scanZoomFactor", "zoom unknown",
                                    positive=True)

    @property
    def imaging_fov(self) -> np.ndarray | None:
        """Imaging field of view corners (um), as in the header."""
        key = "SI.hRoiManager.imagingFovUm"
        v = self._get(key)
        if _absent(v):
            return None
        fov = np.asarray(v, dtype=float) if isinstance(v, np.ndarray) and \
            v.dtype.kind in "iuf" else None
        if fov is None or fov.ndim != 2 or fov.shape[1] != 2 or not np.isfinite(fov).all():
            self._ignore(key, "a list of (x, y) corners in um", "pixel size unknown")
            return None
        return fov

    @property
    def pixel_size_um(self) -> tuple[float, float] | None:
        """``(dy, dx)`` in um per pixel from ``imagingFovUm``; None when unknown."""
        fov = self.imaging_fov
        if fov is None or fov.ndim != 2 or fov.shape[1] != 2 or fov.shape[0] < 2:
            return None
        yr = float(fov[:, 1].max() - fov[:, 1].min())
        xr = float(fov[:, 0].max() - fov[:, 0].min())
        if yr <= 0 or xr <= 0:
            return None
        return (yr / self.ysize, xr / self.xsize)

    @property
    def dt_frame(self) -> float | None:
        """Frame period in s (``scanFramePeriod``; None when absent or not a number)."""
        return self._optional_float("SI.hRoiManager.scanFramePeriod", "frame period "
                                    "unknown", positive=True)

    @property
    def dt_volume(self) -> float | None:
        """Volume period in s (``1 / scanVolumeRate``)."""
        r = self._optional_float("SI.hRoiManager.scanVolumeRate", "volume period unknown",
                                 positive=True)
        return None if r is None else 1.0 / r

    # ---------------------------------------------------------------- FLIM axis

    def _flim_setting(self, key: str, lo: float, hi: float, override: str) -> int | None:
        """Return a FLIM header number (``Tau_bins``, ``binResolution``) checked for range.

        ``None`` when absent or not a number; a :class:`SiffFormatError` naming the
        key and the ``override`` keyword when implausible.
        """
        hit = self.metadata.find(key)
        if not hit or _absent(hit[1]):
            return None
        if _as_float(hit[1]) is None:
            self._ignore(hit[0], "a number", f"no arrival-time axis unless {override}= is "
                         "passed")
            return None
        if not lo <= hit[1] <= hi:
            raise SiffFormatError(self.name, f"implausible {hit[0]} = {hit[1]} in the header "
                                  f"(pass {override}= to override)")
        return int(hit[1])

    @property
    def num_bins(self) -> int | None:
        """Arrival-time bins per laser period (``Tau_bins``, or the override)."""
        if self._tau_bins is not None:
            return int(self._tau_bins)
        return self._flim_setting("Tau_bins", 1, MAX_TAU_BINS, "tau_bins")

    @property
    def picoseconds_per_bin(self) -> float | None:
        """Bin width in ps: ``base_resolution_ps * 2**binResolution`` (or the override)."""
        if self._bin_width_ps is not None:
            return float(self._bin_width_ps)
        res = self._flim_setting("binResolution", -10, 30, "bin_width_ps")
        return None if res is None else self.base_resolution_ps * 2**res

    @property
    def arrival_time_bins(self) -> np.ndarray:
        """Start of each arrival-time bin in ps (length :attr:`num_bins`)."""
        if self.num_bins is None or self.picoseconds_per_bin is None:
            raise ValueError("the header gives no Tau_bins/binResolution; pass tau_bins= and "
                             "bin_width_ps= when opening the file")
        return np.arange(self.num_bins) * self.picoseconds_per_bin

    # ---------------------------------------------------------------- frame lists

    def _to_file(self, g: np.ndarray) -> np.ndarray:
        """Map flyback-free indices to file frame indices."""
        v, b = self.frames_per_volume, self.num_discard_flyback_frames
        return g + b * (g // v)

    def _channels(self, color_channel: int | Sequence[int] | None) -> np.ndarray:
        c = self.num_colors
        if color_channel is None:
            return np.arange(c)
        chans = np.atleast_1d(np.asarray(color_channel, dtype=np.int64))
        bad = chans[(chans < 0) | (chans >= c)]
        if bad.size:
            raise ValueError(f"color_channel {bad[0]} out of range: this file saves {c} "
                             f"channel(s) (ScanImage channels {self.color_list}); use a 0-based "
                             "index into the saved channels")
        return chans

    def _slices(self, z: int | Sequence[int] | None) -> np.ndarray:
        if z is None:
            return np.arange(self.num_slices)
        zs = np.atleast_1d(np.asarray(z, dtype=np.int64))
        bad = zs[(zs < 0) | (zs >= self.num_slices)]
        if bad.size:
            raise ValueError(f"slice {bad[0]} out of range: this file has {self.num_slices} "
                             "slice(s)")
        return zs

    def _timepoints(self, start: int | None, end: int | None,
                    include_partial: bool = False) -> np.ndarray:
        n = self.num_timepoints + (1 if include_partial and self.num_partial_frames else 0)
        start = 0 if start is None else int(start)
        if end is None:
            end = n
        elif end > n:
            warnings.warn(f"timepoint_end {end} is past the last timepoint ({n}); clamped",
                          stacklevel=user_stacklevel())
            end = n
        return np.arange(max(start, 0), max(int(end), 0))

    def frame_indices(
        self,
        timepoints: Iterable[int] | None = None,
        slices: int | Sequence[int] | None = None,
        channels: int | Sequence[int] | None = None,
        repeats: int | Sequence[int] | None = None,
        *,
        include_partial: bool = False,
    ) -> np.ndarray:
        """File frame indices as an array of shape ``(T, Z, R, C)`` for the selection.

        Frames of an incomplete final volume that were never written are ``-1``.
        """
        t = (self._timepoints(None, None, include_partial) if timepoints is None
             else np.asarray(list(timepoints), dtype=np.int64))
        z = self._slices(slices)
        r = (np.arange(self.frames_per_slice) if repeats is None
             else np.atleast_1d(np.asarray(repeats, dtype=np.int64)))
        c = self._channels(channels)
        R, C, V = self.frames_per_slice, self.num_colors, self.frames_per_volume
        g = (t[:, None, None, None] * V + ((z[None, :, None, None] * R
             + r[None, None, :, None]) * C) + c[None, None, None, :])
        f = self._to_file(g)
        return np.where(f < self._num_frames, f, -1)

    def _flat(self, idx: np.ndarray) -> list[int]:
        flat = idx.reshape(-1)
        return flat[flat >= 0].tolist()

    def flatten_by_timepoints(
        self,
        timepoint_start: int = 0,
        timepoint_end: int | None = None,
        reference_z: int | Sequence[int] | None = None,
        color_channel: int | Sequence[int] | None = 0,
        *,
        include_partial: bool = False,
    ) -> list[int]:
        """Frames ordered by timepoint, then slice (and repeat), then channel.

        Parameters
        ----------
        timepoint_start, timepoint_end
            Half-open range of timepoints (volumes); ``None`` = to the last complete one.
        reference_z
            Slice index (or list of them) to keep; ``None`` keeps every slice.
        color_channel
            0-based index (or list) into the saved channels; ``None`` keeps all.
        include_partial
            Also return the frames of an incomplete final volume.

        """
        t = self._timepoints(timepoint_start, timepoint_end, include_partial)
        return self._flat(self.frame_indices(t, reference_z, color_channel,
                                             include_partial=include_partial))

    def framelist_by_color(
        self,
        color_channel: int,
        lower_bound_timepoint: int = 0,
        upper_bound_timepoint: int | None = None,
        *,
        include_partial: bool = False,
    ) -> list[int]:
        """All frames of one channel (0-based) in the timepoint range, in file order."""
        if not isinstance(color_channel, (int, np.integer)):
            raise TypeError("color_channel must be a single 0-based channel index")
        return self.flatten_by_timepoints(lower_bound_timepoint, upper_bound_timepoint, None,
                                          color_channel, include_partial=include_partial)

    def framelist_by_slice(
        self,
        color_channel: int | None = 0,
        slice_idx: int | None = None,
        *,
        include_partial: bool = False,
    ) -> list[int] | list[list[int]]:
        """Frames of one slice in time order (all repeats), or a list per slice."""
        if slice_idx is None:
            return [self.framelist_by_slice(color_channel, z, include_partial=include_partial)
                    for z in range(self.num_slices)]
        t = self._timepoints(None, None, include_partial)
        idx = self.frame_indices(t, slice_idx, color_channel, include_partial=include_partial)
        return self._flat(idx)

    def framelist_by_slices(
        self,
        color_channel: int | None = 0,
        lower_bound: int = 0,
        upper_bound: int | None = None,
        slices: int | Sequence[int] | None = None,
        *,
        include_partial: bool = False,
    ) -> list[int] | list[list[int]]:
        """Frames of the given slices (each slice's timepoints in turn), flattened.

        ``lower_bound``/``upper_bound`` are timepoints, also when frames-per-slice > 1.
        Without ``slices``, one list per slice (as SiffPy returns; SiffPy then applied
        the bounds to the list of slices, a quirk not reproduced).
        """
        t = self._timepoints(lower_bound, upper_bound, include_partial)
        if slices is None:
            return [self._flat(self.frame_indices(t, z, color_channel,
                                                  include_partial=include_partial))
                    for z in range(self.num_slices)]
        out: list[int] = []
        for z in self._slices(slices):
            out += self._flat(self.frame_indices(t, int(z), color_channel,
                                                 include_partial=include_partial))
        return out

    def framelist_by_timepoint(
        self,
        color_channel: int | None = 0,
        timepoint_start: int = 0,
        timepoint_end: int | None = None,
        slice_idx: int | None = None,
    ) -> list[list[int]] | list[int]:
        """One list of frames per timepoint; a flat list when ``slice_idx`` is given."""
        t = self._timepoints(timepoint_start, timepoint_end)
        idx = self.frame_indices(t, slice_idx, color_channel)
        if slice_idx is not None:
            return self._flat(idx)
        return [self._flat(row) for row in idx]

    def locate(self, frames: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
        """Vectorised inverse of the frame lists.

        Returns arrays ``timepoint``, ``slice``, ``repeat``, ``channel`` (-1 for
        flyback frames) and booleans ``flyback`` and ``complete``.
        """
        f = np.asarray(frames, dtype=np.int64)
        if f.size and (f.min() < 0 or f.max() >= self._num_frames):
            raise IndexError(f"frame index out of range for a file of {self._num_frames} frames")
        P, V = self.file_frames_per_volume, self.frames_per_volume
        R, C = self.frames_per_slice, self.num_colors
        vol, r = f // P, f % P
        fly = r >= V
        k = r // C
        out = {
            "timepoint": vol,
            "slice": np.where(fly, -1, k // R),
            "repeat": np.where(fly, -1, k % R),
            "channel": np.where(fly, -1, r % C),
            "flyback": fly,
            "complete": vol < self.num_timepoints,
        }
        return out

    def frame_position(self, frame: int) -> FramePosition | str:
        """``FramePosition`` of a file frame, or the string ``"flyback"``."""
        d = self.locate([frame])
        if d["flyback"][0]:
            return "flyback"
        return FramePosition(int(d["timepoint"][0]), int(d["slice"][0]), int(d["repeat"][0]),
                             int(d["channel"][0]), bool(d["complete"][0]))

    # ---------------------------------------------------------------- display

    def __str__(self) -> str:
        lines = ["Image parameters:", "    ScanImage modules :"]
        lines += [f"            {m}" for m in self._modules]
        lines.append(f"    num_frames : {self.num_frames}")
        lines.append(f"    array_shape : {self.array_shape}")
        lines.append(f"    channels : {self.colors}")
        lines.append(f"    flyback frames per volume : {self.num_discard_flyback_frames} "
                     f"({self.flyback_scans_per_volume} flyback scan(s) x {self.num_colors} "
                     "channel(s))")
        lines.append(f"    roi_groups : {sorted(self.roi_groups)}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"<ImParams {self.num_frames} frames, array_shape={self.array_shape}, "
                f"channels={self.colors}>")
