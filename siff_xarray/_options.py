"""The options of opening a ``.siff`` file, as one frozen, hashable, picklable object.

:class:`FileOptions` is what :class:`~siff_xarray.SiffFile` needs to open a file;
:class:`OpenOptions` adds what building the Dataset needs. ``open_dataset``,
:func:`~siff_xarray.open_siff` and :func:`~siff_xarray.open_acquisition` turn
their keyword arguments into one :class:`OpenOptions` (checked once, here) and
pass that object down to the file managers and ``SiffFile``; being frozen and
hashable it is a valid key for xarray's ``CachingFileManager``.

Import rule: the standard library and :mod:`siff_xarray.format.constants` only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from .format.constants import MULTIHARP_BASE_RESOLUTION_PS

__all__ = [
    "CF_NO_OP_KEYWORDS", "OPEN_OPTION_NAMES", "FileOptions", "HistogramMode", "OpenOptions",
    "PartialVolume", "TimeCoordinate",
    "histogram_length",
]

PartialVolume = Literal["keep", "drop"]
TimeCoordinate = Literal["experiment", "epoch"]
HistogramMode = Literal["drop", "clip", "wrap", "corrosiff"]
HISTOGRAM_MODES = ("drop", "clip", "wrap", "corrosiff")
PARTIAL_VOLUME = ("keep", "drop")
TIME_COORDINATES = ("experiment", "epoch")

#: xarray's CF decoding keywords: siff Datasets carry no CF encodings, so these change
#: nothing and are accepted; ``use_cftime=True`` is refused (epochs are datetime64[ns])
CF_NO_OP_KEYWORDS = ("mask_and_scale", "decode_timedelta", "concat_characters",
                     "decode_coords", "use_cftime")


def histogram_length(tau_bins: int, mode: str) -> int:
    """Bins of an arrival histogram with ``tau_bins`` bins per laser period under ``mode``.

    ``"corrosiff"`` histograms have two more bins than the period (what corrosiffpy
    returns: arrival times modulo ``tau_bins + 2``); every other mode has ``tau_bins``.
    """
    return tau_bins + 2 if mode == "corrosiff" else tau_bins


def _frozen_key(value: Mapping[str, Any] | None) -> str:
    return json.dumps(value, sort_keys=True, default=repr)


@dataclass(frozen=True)
class FileOptions:
    """How to open one file (see :class:`~siff_xarray.SiffFile` for each field)."""

    storage_options: Mapping[str, Any] | None = None
    tau_bins: int | None = None
    bin_width_ps: float | None = None
    base_resolution_ps: float = MULTIHARP_BASE_RESOLUTION_PS
    index_cache: bool | str | None = None
    pin_version: bool = True

    def __post_init__(self) -> None:
        cache = self.index_cache
        if isinstance(cache, os.PathLike):
            object.__setattr__(self, "index_cache", os.fspath(cache))
        elif cache is not None and not isinstance(cache, (bool, str)):
            raise TypeError(f"index_cache must be None, a bool or a directory, got {cache!r}")
        if not isinstance(self.pin_version, bool):
            raise TypeError(f"pin_version must be True or False, got {self.pin_version!r}")
        if self.storage_options is not None and not isinstance(self.storage_options, Mapping):
            raise TypeError("storage_options must be a dict, got "
                            f"{type(self.storage_options).__name__}")

    @property
    def storage(self) -> dict[str, Any] | None:
        """``storage_options`` as a plain dict (for fsspec), or None."""
        return None if self.storage_options is None else dict(self.storage_options)

    def _key(self) -> tuple[Any, ...]:
        # storage_options may hold dicts (unhashable): compare them by their JSON text
        return (_frozen_key(self.storage), self.tau_bins, self.bin_width_ps,
                self.base_resolution_ps, self.index_cache, self.pin_version)

    def __hash__(self) -> int:
        return hash(self._key())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FileOptions) and self._key() == other._key()


@dataclass(frozen=True)
class OpenOptions:
    """Every option of :func:`~siff_xarray.open_siff` but the source and ``drop_variables``.

    Build it with :meth:`from_kwargs`, which checks names and values and says
    which option is wrong.
    """

    file: FileOptions = field(default_factory=FileOptions)
    decode_times: bool = True
    flim: bool = False
    partial_volume: PartialVolume = "drop"
    time_coordinate: TimeCoordinate = "experiment"
    histogram_mode: HistogramMode = "drop"
    lock: Any = None
    chunk_bytes: int = 16 * 2**20

    @classmethod
    def from_kwargs(cls, caller: str = "open_siff", **kwargs: Any) -> OpenOptions:
        """Check the keyword arguments of an open call and return them as options.

        Raises
        ------
        TypeError
            For an unknown keyword (naming the ones that exist).
        ValueError
            For a value outside an option's choices.

        """
        file_names = {f.name for f in fields(FileOptions)}
        own = {f.name for f in fields(cls)} - {"file"}
        file_kw, own_kw = {}, {}
        for key, value in kwargs.items():
            if key in file_names:
                file_kw[key] = value
            elif key in own:
                own_kw[key] = value
            elif key in CF_NO_OP_KEYWORDS:
                if key == "use_cftime" and value:
                    raise ValueError(f"{caller}: use_cftime=True is not supported: siff "
                                     "epochs are datetime64[ns] (decode_times=False gives "
                                     "int64 nanoseconds)")
            else:
                raise TypeError(f"{caller}() got an unexpected keyword argument {key!r}; its "
                                f"options are: {', '.join(OPEN_OPTION_NAMES)}")
        opts = cls(file=FileOptions(**file_kw), **own_kw)
        if opts.partial_volume not in PARTIAL_VOLUME:
            raise ValueError("partial_volume must be 'keep' or 'drop', got "
                             f"{opts.partial_volume!r}")
        if opts.time_coordinate not in TIME_COORDINATES:
            raise ValueError("time_coordinate must be 'experiment' or 'epoch', got "
                             f"{opts.time_coordinate!r}")
        if opts.histogram_mode not in HISTOGRAM_MODES:
            raise ValueError("histogram_mode must be 'drop', 'clip', 'wrap' or 'corrosiff', "
                             f"got {opts.histogram_mode!r}")
        if not isinstance(opts.chunk_bytes, int) or opts.chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be a positive integer, got {opts.chunk_bytes!r}")
        return opts

    def __hash__(self) -> int:
        return hash((self.file, self.decode_times, self.flim, self.partial_volume,
                     self.time_coordinate, self.histogram_mode, id(self.lock),
                     self.chunk_bytes))


#: the keyword arguments of the open functions besides the source and ``drop_variables``
OPEN_OPTION_NAMES: tuple[str, ...] = (
    *(f.name for f in fields(OpenOptions) if f.name != "file"),
    *(f.name for f in fields(FileOptions)),
)
