"""Per-frame metadata: the ImageDescription text of each frame.

Each frame carries ``key = value`` lines (``frameTimestamps_sec``, ``epoch``,
``mostRecentSystemTimestamp_epoch``, optionally ``Appended text`` and
``Text timestamp``...). One Numba pass over all requested descriptions
(:mod:`.frame_meta_scan`, imported when timestamps are first parsed) finds
the timestamp keys (a key counts only at the start of a line) and converts
their values: integers exactly, and plain decimals (up to 15 significant
digits, no exponent) exactly as ``float()`` would, since both the digits and
the power of ten are exact doubles and IEEE division rounds correctly. Any
other value is flagged and converted by numpy (the general path), so timestamps
of 100 000 frames need no Python loop. Epoch times stay exact ``int64`` ns.

Missing values are ``NaN`` (seconds) or ``NaT`` (epochs); a value that is
present but not a number raises :class:`~siff_xarray.errors.SiffFormatError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import SiffFormatError

__all__ = ["NAT", "Event", "FrameTimestamps", "parse_description", "parse_timestamps"]

NAT = np.iinfo(np.int64).min  #: missing epoch (the int64 value of ``numpy.datetime64('NaT')``)

KEY_EXPERIMENT = b"frameTimestamps_sec = "
KEY_EPOCH = b"epoch = "
KEY_SYSTEM = b"mostRecentSystemTimestamp_epoch = "
KEY_TEXT = b"Appended text = "
KEY_TEXT_TIME = b"Text timestamp = "


_P10 = np.array([10.0**k for k in range(23)])

# values of the fused scan (one slot per key)
K_EXP, K_EPOCH, K_SYSTEM, K_TEXT_TIME = 0, 1, 2, 3


def _compiled() -> Any:
    """Return the compiled scan (:mod:`.frame_meta_scan`), imported with Numba on first use."""
    from . import frame_meta_scan

    return frame_meta_scan


def _numbers(buf: np.ndarray, starts: np.ndarray, stops: np.ndarray, dtype: type,
             fill: float | int, name: str, frames: np.ndarray, key: bytes) -> np.ndarray:
    """Convert value spans to numbers; absent or empty values become ``fill``."""
    present = (starts >= 0) & (stops > starts)
    out = np.full(len(starts), fill, dtype=dtype)
    if not present.any():
        return out
    s, e = starts[present], stops[present]
    width = int((e - s).max())
    packed = np.zeros((len(s), width), dtype=np.uint8)
    _compiled().pack(buf, s, e, width, packed)
    text = packed.view(f"S{width}").ravel()
    try:
        out[present] = text.astype(dtype)
    except (ValueError, OverflowError):
        conv = float if dtype is np.float64 else int
        for j, t in enumerate(text.tolist()):
            problem = None
            try:
                v = conv(t)
            except (ValueError, OverflowError):
                problem = "a non-numeric"
            else:
                if conv is int and not -(2**63) <= v < 2**63:
                    problem = "an out-of-range (beyond int64)"
            if problem:
                frame = int(frames[np.flatnonzero(present)[j]])
                raise SiffFormatError(
                    name, f"frame description has {problem} {key.decode().strip(' =')} "
                    f"value {t!r}", int(s[j]), frame) from None
        raise
    return out


@dataclass(frozen=True)
class Event:
    """Text appended to a frame by the acquisition software (a user event)."""

    frame: int
    text: str
    time_s: float  #: experiment time of the event (NaN if the file gives none)


@dataclass(frozen=True)
class FrameTimestamps:
    """Timestamps of a set of frames.

    Attributes
    ----------
    frames
        The frames described (file indices).
    experiment_s
        Seconds since the acquisition started (``frameTimestamps_sec``; NaN if absent).
    epoch_laser_ns
        Laser-clock epoch (``epoch``), int64 ns since 1970 (``NAT`` if absent).
    epoch_system_ns
        System-clock epoch (``mostRecentSystemTimestamp_epoch``), int64 ns (``NAT`` if absent).
    events
        Appended text events found on these frames.

    """

    frames: np.ndarray
    experiment_s: np.ndarray
    epoch_laser_ns: np.ndarray
    epoch_system_ns: np.ndarray
    events: list[Event] = field(default_factory=list)

    @property
    def epoch_laser(self) -> np.ndarray:
        """Laser-clock epoch as ``datetime64[ns]``."""
        return self.epoch_laser_ns.view("datetime64[ns]")

    @property
    def epoch_system(self) -> np.ndarray:
        """System-clock epoch as ``datetime64[ns]``."""
        return self.epoch_system_ns.view("datetime64[ns]")


_KEYS = (KEY_EXPERIMENT, KEY_EPOCH, KEY_SYSTEM, KEY_TEXT_TIME, KEY_TEXT)
_KEY_TABLE = np.zeros((len(_KEYS), max(map(len, _KEYS))), dtype=np.uint8)
for _k, _key in enumerate(_KEYS):
    _KEY_TABLE[_k, : len(_key)] = np.frombuffer(_key, dtype=np.uint8)
_KEY_LEN = np.array([len(k) for k in _KEYS], dtype=np.int64)
_IS_FLOAT = np.array([True, False, False, True], dtype=np.bool_)


def parse_timestamps(buf: np.ndarray, desc_off: np.ndarray, desc_len: np.ndarray,
                     frames: np.ndarray, name: str) -> FrameTimestamps:
    """Extract timestamps and events from descriptions held in ``buf``."""
    n = len(desc_off)
    nk = len(_KEYS)
    spans = np.empty((n, nk, 2), dtype=np.int64)
    fvals = np.empty((n, nk), dtype=np.float64)
    ivals = np.empty((n, nk), dtype=np.int64)
    flags = np.empty((n, nk), dtype=np.int8)
    off = np.ascontiguousarray(desc_off, dtype=np.int64)
    ln = np.ascontiguousarray(desc_len, dtype=np.int64)
    scan = _compiled()
    scan.scan_descriptions(buf, off, ln, _KEY_TABLE, _KEY_LEN, fvals, ivals, spans, flags)
    scan.convert(buf, spans, _IS_FLOAT, _P10, fvals, ivals, flags)

    def column(k: int, dtype: type, fill: float | int, key: bytes) -> np.ndarray:
        out = (fvals if dtype is np.float64 else ivals)[:, k].copy()
        slow = np.flatnonzero(flags[:, k])
        if slow.size:  # unusual spelling (exponent, many digits...): the general path
            out[slow] = _numbers(buf, spans[slow, k, 0], spans[slow, k, 1], dtype, fill,
                                 name, frames[slow], key)
        return out

    exp = column(K_EXP, np.float64, np.nan, KEY_EXPERIMENT)
    laser = column(K_EPOCH, np.int64, NAT, KEY_EPOCH)
    system = column(K_SYSTEM, np.int64, NAT, KEY_SYSTEM)
    ts, te = spans[:, 4, 0], spans[:, 4, 1]
    events = []
    has = np.flatnonzero(ts >= 0)
    if has.size:
        times = column(K_TEXT_TIME, np.float64, np.nan, KEY_TEXT_TIME)
        for j in has.tolist():
            text = bytes(buf[ts[j] : te[j]]).decode("utf-8", errors="replace")
            events.append(Event(int(frames[j]), text, float(times[j])))
    return FrameTimestamps(frames, exp, laser, system, events)


_CASTS = {"frameNumbers": int, "frameNumberAcquisition": int, "frameTimestamps_sec": float,
          "sync Stamps": int, "mostRecentSystemTimestamp_epoch": int, "epoch": int,
          "dcOverVoltage": float, "Text timestamp": float}


def parse_description(text: str) -> dict[str, object]:
    """Parse one frame description into a dict (known numeric keys are converted).

    Values that fail conversion stay strings; empty values are ``None``.
    """
    out: dict[str, object] = {}
    for line in text.replace("\x00", "").split("\n"):
        i = line.find(" = ")
        if i < 0:
            if line.rstrip().endswith(" ="):
                out[line.rstrip()[:-2].strip()] = None
            continue
        key, value = line[:i].strip(), line[i + 3 :].strip()
        if value == "":
            out[key] = None
            continue
        cast = _CASTS.get(key)
        if cast is not None:
            try:
                out[key] = cast(value)
                continue
            except ValueError:
                pass
        out[key] = value
    return out
