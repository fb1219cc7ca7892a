"""Per-frame metadata: the ImageDescription text of each frame.

Each frame carries ``key = value`` lines (``frameTimestamps_sec``, ``epoch``,
``mostRecentSystemTimestamp_epoch``, optionally ``Appended text`` and
``Text timestamp``...). A Numba kernel finds the value of a key in every
requested description at once (a key counts only at the start of a line);
numpy then converts all values in one call, so timestamps of 100 000 frames
need no Python loop. Epoch times stay exact ``int64`` nanoseconds.

Missing values are ``NaN`` (seconds) or ``NaT`` (epochs); a value that is
present but not a number raises :class:`~siff_xarray.errors.SiffFormatError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numba
import numpy as np

from ..errors import SiffFormatError

__all__ = ["NAT", "Event", "FrameTimestamps", "find_values", "parse_description"]

NAT = np.iinfo(np.int64).min  #: missing epoch (the int64 value of ``numpy.datetime64('NaT')``)

KEY_EXPERIMENT = b"frameTimestamps_sec = "
KEY_EPOCH = b"epoch = "
KEY_SYSTEM = b"mostRecentSystemTimestamp_epoch = "
KEY_TEXT = b"Appended text = "
KEY_TEXT_TIME = b"Text timestamp = "


@numba.njit(cache=True, nogil=True)
def _find_values(buf, desc_off, desc_len, needle, starts, stops):
    """For each description, the span of the value of the first line starting with needle."""
    m = needle.shape[0]
    for i in range(desc_off.shape[0]):
        starts[i] = -1
        stops[i] = -1
        lo = desc_off[i]
        hi = lo + desc_len[i]
        if lo < 0 or hi > buf.shape[0]:
            continue
        p = lo
        while p + m <= hi:
            if p == lo or buf[p - 1] == 10:
                ok = True
                for k in range(m):
                    if buf[p + k] != needle[k]:
                        ok = False
                        break
                if ok:
                    s = p + m
                    e = s
                    while e < hi and buf[e] != 10 and buf[e] != 0:
                        e += 1
                    while s < e and (buf[s] == 32 or buf[s] == 9):
                        s += 1
                    while e > s and (buf[e - 1] == 32 or buf[e - 1] == 13 or buf[e - 1] == 9):
                        e -= 1
                    starts[i] = s
                    stops[i] = e
                    break
            # jump to the next line
            while p < hi and buf[p] != 10:
                p += 1
            p += 1


@numba.njit(cache=True, nogil=True)
def _pack(buf, starts, stops, width, out):
    for i in range(starts.shape[0]):
        n = stops[i] - starts[i]
        for k in range(min(n, width)):
            out[i, k] = buf[starts[i] + k]


def find_values(buf: np.ndarray, desc_off: np.ndarray, desc_len: np.ndarray,
                key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(starts, stops)`` of ``key``'s value in each description (-1 if absent)."""
    n = len(desc_off)
    starts = np.empty(n, dtype=np.int64)
    stops = np.empty(n, dtype=np.int64)
    _find_values(buf, desc_off, desc_len, np.frombuffer(key, dtype=np.uint8), starts, stops)
    return starts, stops


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
    _pack(buf, s, e, width, packed)
    text = packed.view(f"S{width}").ravel()
    try:
        out[present] = text.astype(dtype)
    except (ValueError, OverflowError):
        conv = float if dtype is np.float64 else int
        for j, t in enumerate(text.tolist()):
            try:
                conv(t)
            except (ValueError, OverflowError):
                frame = int(frames[np.flatnonzero(present)[j]])
                raise SiffFormatError(
                    name, f"frame description has a non-numeric {key.decode().strip(' =')} "
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


def parse_timestamps(buf: np.ndarray, desc_off: np.ndarray, desc_len: np.ndarray,
                     frames: np.ndarray, name: str) -> FrameTimestamps:
    """Extract timestamps and events from descriptions held in ``buf``."""
    def span(key: bytes) -> tuple[np.ndarray, np.ndarray]:
        return find_values(buf, desc_off, desc_len, key)

    exp = _numbers(buf, *span(KEY_EXPERIMENT), np.float64, np.nan, name, frames,
                   KEY_EXPERIMENT)
    laser = _numbers(buf, *span(KEY_EPOCH), np.int64, NAT, name, frames, KEY_EPOCH)
    system = _numbers(buf, *span(KEY_SYSTEM), np.int64, NAT, name, frames, KEY_SYSTEM)
    ts, te = span(KEY_TEXT)
    events = []
    has = np.flatnonzero(ts >= 0)
    if has.size:
        times = _numbers(buf, *span(KEY_TEXT_TIME), np.float64, np.nan, name, frames,
                         KEY_TEXT_TIME)
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
