"""SiffPy's ``SiffReader`` API on top of siff-xarray, for existing notebooks.

``from siff_xarray.compat import SiffReader`` replaces ``from siffpy import SiffReader``
for the calls the users' notebooks make: ``open``/``close``, ``get_frames`` (with
``registration_dict``), ``im_params`` and its frame lists, ``register``,
``registration_dict``, ``registration_info`` (``yx_shifts``, ``reference_frames``),
``sum_mask``/``sum_masks`` (and their FLIM versions), ``get_histogram``, ``get_time``
and ``t_axis``. Argument names and output shapes follow SiffPy; the SiffPy bugs listed
in ``docs/migration.md`` are not reproduced:

* registration dictionaries need not cover every requested frame (frames without an
  entry are read unshifted instead of raising);
* 3-D masks pick each frame's plane from its z position, not from its position in
  the request, and a list of 3-D masks stays a list of 3-D masks;
* ``color_channel`` of the mask methods is 1-based as in SiffPy, everything else
  0-based, as in SiffPy (kept for compatibility, documented).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._options import histogram_length

__all__ = [
    "EventStamp", "FLIMParams", "FlimTrace", "RegistrationInfo", "SiffReader", "Timeseries",
    "legacy_registration", "registration_info_path", "save_registration_info", "siff_to_tiff",
]


#: SiffPy's suffix of saved registrations: ``<dir>/<stem>/<stem>_registration_info.h5``.
REGISTRATION_SUFFIX = "_registration_info.h5"


def registration_info_path(data_file: str | os.PathLike[str],
                           directory: str | os.PathLike[str] | None = None) -> Path:
    """Where SiffPy keeps the registration of ``data_file``.

    ``<parent>/<stem>/<stem>_registration_info.h5`` (a folder named after the data
    file beside it), or ``<directory>/<stem>_registration_info.h5``.
    """
    data = Path(os.fspath(data_file))
    folder = Path(os.fspath(directory)) if directory is not None else data.with_suffix("")
    return folder / f"{data.stem}{REGISTRATION_SUFFIX}"


def _h5py() -> Any:
    try:
        import h5py
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError("SiffPy registration files (.h5) need h5py: "
                          "pip install 'siff-xarray[compat]'") from exc
    return h5py


@dataclass
class RegistrationInfo:
    """What a registration produced (SiffPy's ``RegistrationInfo`` fields).

    :meth:`save` and :meth:`load` read and write SiffPy's ``.h5`` layout, so that
    registrations move both ways between SiffPy and siff-xarray.
    """

    filename: str
    registration_type: str
    registration_color: int
    yx_shifts: dict[int, tuple[int, int]] = field(default_factory=dict)
    reference_frames: np.ndarray | None = None

    def __str__(self) -> str:
        return f"RegistrationType.{self.registration_type.capitalize()} RegistrationInfo " \
               f"for {self.filename}"

    def save(self, save_path: str | os.PathLike[str] | None = None) -> Path:
        """Write SiffPy's ``.h5`` file; return its path.

        ``save_path`` is a *directory* (as in SiffPy); default: the folder named
        after the data file, beside it. Layout: root attributes ``filename`` (the
        data file's stem), ``registration_type``, ``registration_color``; group
        ``yx_shifts`` with ``frame_index`` (int64 ``(N,)``) and ``shift_values``
        (int64 ``(N, 2)``); dataset ``reference_frames`` (float32).
        """
        h5py = _h5py()
        path = registration_info_path(self.filename, save_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        frames = np.array(sorted(self.yx_shifts), dtype=np.int64)
        values = np.array([self.yx_shifts[int(k)] for k in frames], dtype=np.int64
                          ).reshape(-1, 2)
        with h5py.File(path, "w") as h5:
            h5.attrs["filename"] = Path(self.filename).stem
            h5.attrs["registration_type"] = self.registration_type
            h5.attrs["registration_color"] = int(self.registration_color)
            grp = h5.create_group("yx_shifts")
            grp.create_dataset("frame_index", data=frames)
            grp.create_dataset("shift_values", data=values)
            if self.reference_frames is not None:
                h5.create_dataset("reference_frames",
                                  data=np.asarray(self.reference_frames, dtype=np.float32))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str],
             data_file: str | os.PathLike[str] | None = None) -> RegistrationInfo:
        """Read a SiffPy ``..._registration_info.h5`` file.

        ``data_file`` (the ``.siff`` it belongs to) becomes :attr:`filename`;
        SiffPy put the stored stem there, so that a later save landed in the
        working directory.
        """
        h5py = _h5py()
        path = Path(os.fspath(path))
        if path.suffix != ".h5":
            raise ValueError(f"{path}: a SiffPy registration file ends in .h5")
        with h5py.File(path, "r") as h5:
            try:
                frames = np.asarray(h5["yx_shifts/frame_index"][...], dtype=np.int64)
                values = np.asarray(h5["yx_shifts/shift_values"][...], dtype=np.int64)
            except KeyError as exc:
                raise ValueError(f"{path}: not a SiffPy registration file (no yx_shifts/"
                                 "frame_index and shift_values)") from exc
            if values.shape != (len(frames), 2):
                raise ValueError(f"{path}: yx_shifts/shift_values has shape {values.shape}, "
                                 f"expected {(len(frames), 2)}")
            ref = (np.asarray(h5["reference_frames"][...]) if "reference_frames" in h5
                   else None)
            kind = h5.attrs.get("registration_type", "siffpy")
            color = h5.attrs.get("registration_color", 0)
            stem = h5.attrs.get("filename", path.stem.removesuffix("_registration_info"))
        kind = kind.decode() if isinstance(kind, bytes) else str(kind)
        shifts = {int(f): (int(v[0]), int(v[1])) for f, v in zip(frames, values, strict=True)}
        return cls(filename=os.fspath(data_file) if data_file is not None else str(stem),
                   registration_type=kind.split(".")[-1].lower(),
                   registration_color=int(color), yx_shifts=shifts, reference_frames=ref)


#: what a legacy SiffPy ``.dict`` / ``.ref`` pickle may hold (nothing that runs code)
_SAFE_PICKLE = {
    ("builtins", n) for n in ("dict", "list", "tuple", "set", "frozenset", "int", "float",
                              "complex", "bool", "str", "bytes", "bytearray")
} | {(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray")
     for n in ("_reconstruct", "scalar")} | {
    (m, "_frombuffer") for m in ("numpy.core.numeric", "numpy._core.numeric")} | {
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    ("collections", "OrderedDict"),
}


def _load_legacy_pickle(path: Path) -> Any:
    """Unpickle a legacy SiffPy file allowing only containers, numbers and numpy arrays.

    A pickle can run any code when loaded; these files come from disk, so anything
    but plain data is refused with a ValueError naming the file.
    """
    import pickle

    class _Plain(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if (module, name) not in _SAFE_PICKLE:
                raise pickle.UnpicklingError(f"{module}.{name} is not plain data")
            return super().find_class(module, name)

    try:
        with open(path, "rb") as fh:
            return _Plain(fh).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as exc:
        raise ValueError(f"{path}: not a SiffPy registration pickle of plain data ({exc}); "
                         "it is not loaded") from exc


def legacy_registration(data_file: str | os.PathLike[str]) -> RegistrationInfo | None:
    """Read SiffPy's legacy pickled registration beside ``data_file``, if there is one.

    ``<file>.dict`` (``{frame: (dy, dx)}``) and ``<file>.ref`` (reference images), as
    SiffPy wrote them before its ``.h5`` files (``run.dict`` or ``run.siff.dict``).
    Only plain data is unpickled. Returns None when there is no ``.dict``.
    """
    src = Path(os.fspath(data_file))
    for base in (src.with_suffix(""), src):
        dict_path = base.parent / f"{base.name}.dict"
        if dict_path.is_file():
            break
    else:
        return None
    raw = _load_legacy_pickle(dict_path)
    if not isinstance(raw, dict):
        raise ValueError(f"{dict_path}: expected a pickled dict of frame -> (dy, dx), got "
                         f"{type(raw).__name__}")
    try:
        shifts = {int(k): (int(v[0]), int(v[1])) for k, v in raw.items()}
    except (TypeError, ValueError, IndexError) as exc:
        raise ValueError(f"{dict_path}: entries must be frame -> (dy, dx)") from exc
    ref_path = dict_path.with_suffix(".ref")
    ref = None
    if ref_path.is_file():
        ref = np.asarray(_load_legacy_pickle(ref_path), dtype=np.float64)
    return RegistrationInfo(filename=os.fspath(data_file), registration_type="siffpy",
                            registration_color=0, yx_shifts=shifts, reference_frames=ref)


class Timeseries(np.ndarray):
    """SiffPy's ``Timeseries``: times with their ``units``.

    ``units`` is ``"experiment_seconds"``, ``"epoch_nanoseconds"`` or
    ``"epoch_seconds"``. Arithmetic between two Timeseries of different units
    raises ValueError, as in SiffPy; results keep the units.
    """

    units: str | None

    def __new__(cls, values: Any, units: str) -> Timeseries:
        """Wrap ``values`` (any array-like) with ``units``."""
        obj = np.asarray(values).view(cls)
        obj.units = units
        return obj

    def __array_finalize__(self, obj: Any) -> None:
        self.units = getattr(obj, "units", None)

    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        units = {x.units for x in inputs if isinstance(x, Timeseries)}
        if len(units) > 1:
            raise ValueError(f"{ufunc.__name__} of Timeseries in different units "
                             f"{sorted(u or '' for u in units)}")
        plain = [x.view(np.ndarray) if isinstance(x, Timeseries) else x for x in inputs]
        if "out" in kwargs:
            kwargs["out"] = tuple(o.view(np.ndarray) if isinstance(o, Timeseries) else o
                                  for o in kwargs["out"])
        out = getattr(ufunc, method)(*plain, **kwargs)
        if isinstance(out, np.ndarray) and out.ndim:
            return Timeseries(out, units.pop() if units else None)
        return out


@dataclass(frozen=True)
class EventStamp:
    """SiffPy's ``EventStamp``: text appended to a frame, with its experiment time (s)."""

    frame_number: int
    text: str
    timestamp: float | None

    def epoch_ns(self, reader: SiffReader) -> int | None:
        """Return the event's laser-clock epoch time (ns); None without a timestamp."""
        if self.timestamp is None:
            return None
        return reader.frame_time_to_epoch_time(self.timestamp)


@dataclass
class FLIMParams:
    """Fitted FLIM parameters in SiffPy's terms (``tau_offset`` and ``units`` are read).

    ``exps`` holds ``(tau, fraction)`` pairs (short to long), ``irf`` the IRF
    ``(mean, sigma)``, all in ``units`` (``"nanoseconds"``); ``noise`` the
    background fraction; ``chi_sq`` the fit's reduced chi-square.
    """

    exps: list[tuple[float, float]]
    irf: tuple[float, float]
    noise: float = 0.0
    units: str = "nanoseconds"
    chi_sq: float | None = None  #: None unless fitted (NaN would make equal params unequal)
    color_channel: int | None = None
    name: str | None = None

    @property
    def tau_offset(self) -> float:
        """The IRF's mean (the arrival-time offset of the decay), in :attr:`units`."""
        return float(self.irf[0])

    @property
    def n_exp(self) -> int:
        """Number of exponential components."""
        return len(self.exps)

    def to_dict(self) -> dict[str, Any]:
        """SiffPy's ``FLIMParams.to_dict`` layout (what its ``.flimparams`` JSON holds)."""
        return {"exps": [{"tau": t, "frac": f, "units": self.units} for t, f in self.exps],
                "irf": {"tau_offset": self.irf[0], "tau_g": self.irf[1], "units": self.units},
                "color_channel": self.color_channel, "noise": self.noise, "name": self.name,
                "units": self.units, "class": "FLIMParams"}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FLIMParams:
        """Build from SiffPy's ``to_dict`` layout (one unit for all; aliases accepted)."""
        def pick(entry: Mapping[str, Any], *names: str) -> float:
            for n in names:
                if entry.get(n) is not None:
                    return float(entry[n])
            raise ValueError(f"FLIM parameters: none of {names} in {dict(entry)}")

        if d.get("class", "FLIMParams") != "FLIMParams":
            raise ValueError(f"not single-pulse FLIMParams (class {d.get('class')!r})")
        exps = [(pick(e, "tau", "lifetime", "mean", "average"),
                 pick(e, "frac", "fraction", "f")) for e in d.get("exps", [])]
        if not exps:
            raise ValueError("FLIM parameters without any exponential")
        irf = d.get("irf") or {}
        units = {_unit_name(u) for u in [d.get("units"), irf.get("units"),
                                         *(e.get("units") for e in d["exps"])] if u}
        if len(units) > 1:
            raise ValueError(f"FLIM parameters in mixed units {sorted(units)}")
        return cls(exps=exps, irf=(pick(irf, "tau_offset", "mu", "mean", "offset"),
                                   pick(irf, "tau_g", "sigma", "width")),
                   noise=float(d.get("noise") or 0.0),
                   units=units.pop() if units else "countbins",
                   color_channel=d.get("color_channel"), name=d.get("name"))

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write SiffPy's JSON ``.flimparams`` file (the suffix is forced, as SiffPy does)."""
        import json

        out = Path(os.fspath(path)).with_suffix(".flimparams")
        out.write_text(json.dumps(self.to_dict(), indent=2))
        return out

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FLIMParams:
        """Read a ``.flimparams`` file written by SiffPy or :meth:`save`."""
        import json

        p = Path(os.fspath(path))
        try:
            return cls.from_dict(json.loads(p.read_text()))
        except (ValueError, TypeError, AttributeError) as exc:
            raise ValueError(f"{p}: not a SiffPy .flimparams file ({exc})") from exc


#: numpy reductions of a FlimTrace: intensity-weighted lifetime; summed or mean intensity
_FLIM_SUMS = (np.sum, np.nansum)
_FLIM_MEANS = (np.mean, np.nanmean)


class FlimTrace:
    """FLIM values with their intensity, with SiffPy's ``FlimTrace`` arithmetic.

    ``lifetime`` holds the values of ``method``: empirical lifetimes (mean arrival
    time minus the offset) in ``units`` (``"countbins"``), NaN where there is no
    photon, or complex phasors ``g + i s`` for ``method="phasor"``. ``intensity``
    holds the photons behind each value. ``numpy.asarray(trace)`` gives ``lifetime``.

    As in SiffPy: ``FlimTrace([a, b])`` stacks traces; ``trace[k]`` indexes both
    arrays; ``a + b`` / ``a - b`` pool (remove) photons: intensities add, lifetimes
    average weighted by intensity; ``+``, ``-``, ``*``, ``/`` with a number or a
    plain array change the intensity only; ``-trace`` negates the intensity;
    ``np.sum``/``np.nansum`` give the intensity-weighted lifetime and the summed
    intensity, ``np.mean``/``np.nanmean`` the same lifetime and the mean intensity
    (both ignore NaN lifetimes of empty frames); ``np.concatenate``, ``reshape``,
    ``ravel``, ``squeeze`` act on both arrays. A trace times a trace is a
    TypeError (as in SiffPy); other numpy functions and ufuncs act on the lifetime
    and return plain arrays. In-place operators work (SiffPy's raise).
    """

    def __init__(self, lifetime: Any, intensity: Any = None,
                 method: str | None = "empirical lifetime", units: str = "countbins",
                 info_string: str | None = None, confidence: None = None,
                 FLIMParams: Any = None) -> None:
        if isinstance(lifetime, (list, tuple)) and lifetime and all(
                isinstance(x, FlimTrace) for x in lifetime):
            parts = list(lifetime)
            lifetime = np.stack([p.lifetime for p in parts])
            intensity = np.stack([p.intensity for p in parts])
            shared = {(p.method, p.units) for p in parts}
            method, units = shared.pop() if len(shared) == 1 else (None, "unknown")
            FLIMParams = parts[0].FLIMParams if all(
                p.FLIMParams is parts[0].FLIMParams for p in parts) else None
        self.lifetime = np.asarray(lifetime)
        self.intensity = (np.zeros(self.lifetime.shape) if intensity is None
                          else np.asarray(intensity, dtype=np.float64))
        if self.intensity.shape != self.lifetime.shape:
            raise ValueError(f"FlimTrace: intensity of shape {self.intensity.shape} for "
                             f"values of shape {self.lifetime.shape}")
        self.method = method
        self.units = units
        self.info_string = info_string
        self.confidence = confidence
        self.FLIMParams = FLIMParams

    def _new(self, lifetime: Any, intensity: Any, keep: bool = True) -> FlimTrace:
        return FlimTrace(lifetime, intensity, self.method if keep else None,
                         self.units if keep else "unknown", self.info_string,
                         FLIMParams=self.FLIMParams if keep else None)

    # ------------------------------------------------------------------ array protocol

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the values."""
        return self.lifetime.shape

    @property
    def ndim(self) -> int:
        """Number of dimensions."""
        return self.lifetime.ndim

    def __len__(self) -> int:
        return len(self.lifetime)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        return np.asarray(self.lifetime, dtype=dtype)

    def __float__(self) -> float:
        return float(self.lifetime)

    def __complex__(self) -> complex:
        return complex(self.lifetime)

    def __repr__(self) -> str:
        return (f"FlimTrace({self.lifetime!r}, intensity={self.intensity!r}, "
                f"method={self.method!r}, units={self.units!r})")

    def __getitem__(self, key: Any) -> Any:
        if key is Ellipsis:  # SiffPy: trace[...] is the plain lifetime array
            return self.lifetime
        return self._new(self.lifetime[key], self.intensity[key])

    def reshape(self, *shape: Any) -> FlimTrace:
        """Reshape both arrays."""
        return self._new(self.lifetime.reshape(*shape), self.intensity.reshape(*shape))

    def ravel(self) -> FlimTrace:
        """Flatten both arrays."""
        return self._new(self.lifetime.ravel(), self.intensity.ravel())

    def squeeze(self, axis: Any = None) -> FlimTrace:
        """Drop length-1 axes of both arrays."""
        return self._new(self.lifetime.squeeze(axis), self.intensity.squeeze(axis))

    def sum(self, axis: Any = None) -> FlimTrace:
        """Intensity-weighted lifetime and summed intensity (see the class docstring)."""
        return self._pool(axis, mean=False)

    def mean(self, axis: Any = None) -> FlimTrace:
        """Intensity-weighted lifetime and mean intensity."""
        return self._pool(axis, mean=True)

    def _pool(self, axis: Any, mean: bool) -> FlimTrace:
        w = np.where(np.isnan(self.lifetime), 0.0, self.intensity)  # empty frames: no weight
        total = np.sum(w, axis=axis)
        with np.errstate(invalid="ignore", divide="ignore"):
            life = np.where(total > 0, np.nansum(self.lifetime * w, axis=axis) / total, np.nan)
        inten = (np.mean if mean else np.sum)(self.intensity, axis=axis)
        return self._new(life, inten)

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        if func in (*_FLIM_SUMS, *_FLIM_MEANS) and args and args[0] is self:
            return self._pool(kwargs.get("axis", args[1] if len(args) > 1 else None),
                              mean=func in _FLIM_MEANS)
        if func is np.concatenate:
            parts = list(args[0])
            axis = kwargs.get("axis", args[1] if len(args) > 1 else 0)
            if not all(isinstance(p, FlimTrace) for p in parts):
                raise TypeError("np.concatenate: every part must be a FlimTrace")
            keep = len({(p.method, p.units) for p in parts}) == 1
            return parts[0]._new(np.concatenate([p.lifetime for p in parts], axis=axis),
                                 np.concatenate([p.intensity for p in parts], axis=axis),
                                 keep)
        if func in (np.reshape, np.ravel, np.squeeze) and args and args[0] is self:
            return getattr(self, func.__name__)(*args[1:], **kwargs)
        plain = [a.lifetime if isinstance(a, FlimTrace) else a for a in args]
        return func(*plain, **kwargs)

    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        if method == "__call__" and ufunc in (np.add, np.subtract, np.multiply,
                                              np.true_divide, np.negative, np.positive):
            op = {np.add: "__add__", np.subtract: "__sub__", np.multiply: "__mul__",
                  np.true_divide: "__truediv__"}.get(ufunc)
            if op is None:
                return -self if ufunc is np.negative else self
            a, b = inputs
            if a is self:
                return getattr(self, op)(b)
            return getattr(self, {"__add__": "__radd__", "__sub__": "__rsub__",
                                  "__mul__": "__rmul__", "__truediv__": "__rtruediv__"}[op])(a)
        plain = [x.lifetime if isinstance(x, FlimTrace) else x for x in inputs]
        return getattr(ufunc, method)(*plain, **kwargs)

    # ------------------------------------------------------------------ arithmetic

    def _pool_with(self, other: FlimTrace, sign: float) -> FlimTrace:
        if _unit_name(other.units) != _unit_name(self.units):
            raise ValueError(f"FlimTrace arithmetic in different units ({self.units} and "
                             f"{other.units}); convert one first")
        inten = self.intensity + sign * other.intensity
        with np.errstate(invalid="ignore", divide="ignore"):
            life = (self.lifetime * self.intensity + sign * other.lifetime * other.intensity
                    ) / inten
        keep = self.method == other.method and self.FLIMParams is other.FLIMParams
        return self._new(life, inten, keep)

    def __add__(self, other: Any) -> FlimTrace:
        if isinstance(other, FlimTrace):
            return self._pool_with(other, 1.0)
        return self._new(self.lifetime, self.intensity + np.asarray(other))

    def __sub__(self, other: Any) -> FlimTrace:
        if isinstance(other, FlimTrace):
            return self._pool_with(other, -1.0)
        return self._new(self.lifetime, self.intensity - np.asarray(other))

    def __mul__(self, other: Any) -> FlimTrace:
        if isinstance(other, FlimTrace):
            raise TypeError("a FlimTrace times a FlimTrace has no meaning (as in SiffPy)")
        return self._new(self.lifetime, self.intensity * np.asarray(other))

    def __truediv__(self, other: Any) -> FlimTrace:
        if isinstance(other, FlimTrace):
            raise TypeError("a FlimTrace divided by a FlimTrace has no meaning (as in SiffPy)")
        return self._new(self.lifetime, self.intensity / np.asarray(other))

    __radd__ = __add__
    __rmul__ = __mul__

    def __rsub__(self, other: Any) -> FlimTrace:
        return self._new(self.lifetime, np.asarray(other) - self.intensity)

    def __rtruediv__(self, other: Any) -> FlimTrace:
        raise TypeError("dividing by a FlimTrace has no meaning")

    __iadd__ = __add__
    __isub__ = __sub__
    __imul__ = __mul__
    __itruediv__ = __truediv__

    # comparisons act on the lifetime, as numpy's do (plain boolean arrays)
    def __lt__(self, other: Any) -> Any:
        return self.lifetime < np.asarray(other)

    def __le__(self, other: Any) -> Any:
        return self.lifetime <= np.asarray(other)

    def __gt__(self, other: Any) -> Any:
        return self.lifetime > np.asarray(other)

    def __ge__(self, other: Any) -> Any:
        return self.lifetime >= np.asarray(other)

    def __eq__(self, other: object) -> Any:  # type: ignore[override]
        return self.lifetime == np.asarray(other)

    def __ne__(self, other: object) -> Any:  # type: ignore[override]
        return self.lifetime != np.asarray(other)

    __hash__ = None  # type: ignore[assignment]

    def __neg__(self) -> FlimTrace:
        return self._new(self.lifetime, -self.intensity, keep=False)

    def __pos__(self) -> FlimTrace:
        return self._new(self.lifetime, self.intensity, keep=False)


def _unit_name(units: Any) -> str:
    """SiffPy's ``FlimUnits`` member, its value, or a plain string, as a lower-case name."""
    name = getattr(units, "name", None) if not isinstance(units, str) else units
    if not isinstance(name, str):
        name = str(getattr(units, "value", units))
    return name.strip().lower().replace("_", "").replace(" ", "")


#: ``FlimUnits`` names -> picoseconds per unit (None: already arrival bins)
_PS_PER_UNIT = {"picoseconds": 1.0, "ps": 1.0, "nanoseconds": 1000.0, "ns": 1000.0,
                "countbins": None, "bins": None, "unitless": None}


def _offset_bins(params: Any, ps_per_bin: float | None) -> float:
    """Return the IRF offset in arrival bins: ``params.tau_offset`` in ``params.units``.

    ``params`` is None (0), a number (arrival bins), or a FLIMParams-like object with
    ``tau_offset`` and ``units`` (SiffPy's ``FlimUnits`` or a name: picoseconds,
    nanoseconds, countbins, unitless; no ``units`` means countbins). Offsets in time
    units are converted with the file's own bin width (SiffPy assumes 20 ps whatever
    ``binResolution`` says, a bug documented in docs/migration.md).
    """
    if params is None:
        return 0.0
    if isinstance(params, (int, float, np.integer, np.floating)):
        return float(params)
    off = getattr(params, "tau_offset", None)
    if off is None:
        raise TypeError("params must be None, an offset in arrival bins, or an object with "
                        "a tau_offset attribute (FLIMParams)")
    units = getattr(params, "units", None)
    if units is None:
        return float(off)
    name = _unit_name(units)
    if name not in _PS_PER_UNIT:
        raise ValueError(f"params.units is {units!r}: the IRF offset cannot be converted to "
                         "arrival bins (SiffPy raises for UNKNOWN units too); set the units "
                         "of the FLIMParams (e.g. to nanoseconds)")
    per = _PS_PER_UNIT[name]
    if per is None:
        return float(off)
    if not ps_per_bin:
        raise ValueError("the file does not give its arrival-bin width, so an offset in "
                         f"{name} cannot be converted to bins; give params in countbins")
    return float(off) * per / float(ps_per_bin)


def _registration_info(reg: Any, ds: Any, filename: str, frame_shape: tuple[int, int],
                       kind: str, color: int) -> RegistrationInfo:
    """``ds.siff.register`` output as SiffPy's ``{frame: (dy, dx)}`` for every frame."""
    fmap = ds.frame_index  # (time, z, [repeat], channel)
    sy, sx = (v.broadcast_like(fmap).transpose(*fmap.dims).values
              for v in (reg.shift_y, reg.shift_x))
    frames = fmap.values
    h, w = frame_shape
    ok = frames >= 0
    shifts = {int(fr): (int(a) % h, int(b) % w)
              for fr, a, b in zip(frames[ok], sy[ok], sx[ok], strict=True)}
    # SiffPy's RegistrationType values: the native methods are its 'siffpy' kind
    kind = "suite2p" if kind == "suite2p" else "siffpy"
    return RegistrationInfo(filename=filename, registration_type=kind,
                            registration_color=color, yx_shifts=shifts,
                            reference_frames=np.squeeze(reg.reference.values.astype(np.float32)))


def save_registration_info(reg: Any, ds: Any, save_path: str | os.PathLike[str] | None = None,
                           *, registration_color: int = 0) -> Path:
    """Save a ``ds.siff.register`` result where SiffPy (and :class:`SiffReader`) find it.

    ``ds`` is the Dataset of one ``.siff`` file that ``reg`` registered (opened
    with ``partial_volume="keep"`` to give every acquired frame its shift);
    ``save_path`` a directory (default ``<parent>/<stem>/`` of the file). Returns
    the ``.h5`` path. SiffPy and ``SiffReader`` apply it when they open the file.
    """
    sources = np.unique(np.asarray(ds.source_file.values)) if "source_file" in ds else []
    sources = [str(x) for x in sources if str(x)]
    if len(sources) != 1 or not sources[0].endswith((".siff", ".tif", ".tiff")):
        raise ValueError("save_registration_info needs the Dataset of one .siff file "
                         f"(this one holds frames of {sources or 'no file'})")
    shape = (ds.sizes["y"], ds.sizes["x"])
    kind = str(reg.shift_y.attrs.get("method", "siffpy"))
    info = _registration_info(reg, ds, sources[0], shape, kind, registration_color)
    return info.save(save_path)


class SiffReader:
    """SiffPy-compatible reader (see the module docstring)."""

    def __init__(self, filename: str | os.PathLike[str] | None = None, **kwargs: Any) -> None:
        self._file: Any = None
        self.filename: str | os.PathLike[str] = ""
        self._registration_info: RegistrationInfo | None = None
        self._flim_params: tuple[Any, ...] | None = None
        if filename is not None:
            self.open(filename, **kwargs)

    # ------------------------------------------------------------------ file

    def open(self, filename: str | os.PathLike[str], **kwargs: Any) -> None:
        """Open a ``.siff`` (or ScanImage ``.tif``) file; keyword args go to ``SiffFile``.

        A registration SiffPy (or :meth:`register`) saved beside the file
        (``<parent>/<stem>/<stem>_registration_info.h5``) is loaded and applied, as
        SiffPy does.
        """
        from .reader.siff_file import SiffFile

        self.close()
        self._file = SiffFile(filename, **kwargs)
        self.filename = filename  # a Path stays a Path, as in SiffPy
        path = os.fspath(filename)
        # SiffPy applies a saved registration on open: <parent>/<stem>/<stem>_registration_info.h5
        if "://" not in path:
            saved = registration_info_path(path)
            if saved.is_file():
                self._registration_info = RegistrationInfo.load(saved, path)
            else:  # SiffPy's older pickled <file>.dict / .ref (plain data only)
                self._registration_info = legacy_registration(path)
            # SiffPy's saved FLIM parameters: every <parent>/<stem>/*.flimparams
            folder = Path(path).parent / Path(path).stem
            found = [FLIMParams.load(f) for f in sorted(folder.glob("*.flimparams"))]
            if found:  # by colour where they say it, else in name order
                found.sort(key=lambda fp: (fp.color_channel is None, fp.color_channel or 0))
                self._flim_params = tuple(found)

    def close(self) -> None:
        """Close the file."""
        if self._file is not None:
            self._file.close()
        self._file = None
        self.filename = ""
        self._registration_info = None
        self._flim_params = None

    def __enter__(self) -> SiffReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def opened(self) -> bool:
        """True while a file is open."""
        return self._file is not None

    def _f(self) -> Any:
        if self._file is None:
            raise RuntimeError("no file is open; call SiffReader.open(path) first")
        return self._file

    def __repr__(self) -> str:
        return (f"SiffReader({os.fspath(self.filename)!r})" if self.opened
                else "SiffReader (no file open)")

    @property
    def im_params(self) -> Any:
        """The file's :class:`~siff_xarray.ImParams` (SiffPy's frame lists)."""
        return self._f().im_params

    @property
    def all_frames(self) -> list[int]:
        """SiffPy's ``all_frames``: ``flatten_by_timepoints()`` (colour 0, full volumes)."""
        return self.im_params.flatten_by_timepoints()

    @property
    def series_shape(self) -> tuple[int, ...]:
        """``(-1, *im_params.volume)``."""
        return (-1, *self.im_params.volume)

    # ------------------------------------------------------------------ registration

    @property
    def registration_info(self) -> RegistrationInfo:
        """The registration made by :meth:`register` (``AttributeError`` if none)."""
        if self._registration_info is None:
            raise AttributeError("no registration: call SiffReader.register() first")
        return self._registration_info

    @registration_info.setter
    def registration_info(self, info: RegistrationInfo) -> None:
        if not isinstance(info, RegistrationInfo):
            raise TypeError("registration_info must be a RegistrationInfo")
        self._registration_info = info

    @property
    def registration_dict(self) -> dict[int, tuple[int, int]] | None:
        """``{frame: (dy, dx)}`` of the current registration, or ``None``."""
        info = self._registration_info
        return None if info is None else info.yx_shifts

    @property
    def reference_frames(self) -> np.ndarray | None:
        """Reference images of the current registration, or ``None``."""
        info = self._registration_info
        return None if info is None else info.reference_frames

    def register(self, registration_method: str = "siffpy",
                 save_path: str | os.PathLike[str] | None = None,
                 alignment_color_channel: int = 0, *, save: bool = True,
                 **kwargs: Any) -> dict[int, tuple[int, int]]:
        """Register every imaging frame; return (and keep) ``{frame: (dy, dx)}``.

        ``registration_method="siffpy"`` runs siff-xarray's native default (the
        photon-count likelihood; ``"likelihood"`` and ``"phase"`` name the native
        methods directly) and ``"suite2p"`` suite2p 1.x's rigid registration
        (:meth:`siff_xarray.accessor.SiffAccessor.register`); the shifts of the
        alignment channel apply to every channel of the same scan. Shifts are
        stored non-negative (``0 <= dy < H``), as SiffPy stores them. As SiffPy,
        the result is saved (SiffPy's ``.h5`` layout, in the directory
        ``save_path``, default ``<parent>/<stem>/``) and applied to later
        ``get_frames`` calls and later opens; ``save=False`` keeps it in memory
        only. Keyword arguments go to ``ds.siff.register`` (e.g. ``max_shift``,
        ``motion``, ``regularize_sigma``, ``suite2p_settings``).
        """
        from .backend import open_siff

        methods = {"siffpy": "likelihood", "likelihood": "likelihood", "phase": "phase",
                   "suite2p": "suite2p"}
        if registration_method not in methods:
            raise ValueError(f"registration_method {registration_method!r} is not available "
                             f"in siff-xarray's SiffReader; use one of {sorted(methods)}")
        f = self._f()
        channel = f.im_params.color_list[alignment_color_channel]
        with open_siff(f.path, storage_options=f.options.storage,
                       partial_volume="keep") as ds:  # every acquired frame gets a shift
            reg = ds.siff.register(channel=channel, method=methods[registration_method],
                                   **kwargs)
            info = _registration_info(reg, ds, self.filename, f.frame_shape,
                                      registration_method, alignment_color_channel)
        self._registration_info = info
        if save:
            info.save(save_path)
        return info.yx_shifts

    def load_registration_info(self, path: str | os.PathLike[str] | None = None
                               ) -> RegistrationInfo:
        """Load a saved registration (SiffPy's ``.h5``) and apply it from now on.

        ``path``: the ``.h5`` file (default: where :meth:`register` and SiffPy
        save it). SiffPy's own method of this name is broken (it calls a function
        that does not exist).
        """
        self._f()
        path = registration_info_path(self.filename) if path is None else Path(os.fspath(path))
        self._registration_info = RegistrationInfo.load(path, self.filename)
        return self._registration_info

    def _shifts(self, registration_dict: Any) -> Mapping[int, tuple[int, int]] | None:
        if registration_dict is None:
            return self.registration_dict
        if isinstance(registration_dict, RegistrationInfo):
            return registration_dict.yx_shifts
        if isinstance(registration_dict, Mapping) and "yx_shifts" in registration_dict:
            return registration_dict["yx_shifts"]
        return registration_dict

    # ------------------------------------------------------------------ data

    def get_frames(self, frames: Sequence[int] | None = None,
                   registration_dict: Any = None, full: bool = False) -> np.ndarray:
        """``uint16 (n, y, x)`` photon counts; ``frames=None`` means every frame (IFD).

        ``full=True``: ``uint16 (n, y, x, N)`` per-pixel arrival histograms, ``N`` =
        corrosiff's ``Tau_bins + 2`` bins (later arrivals wrap, as corrosiff's
        ``get_frames_full`` does), registered like the counts. Frames without an
        entry in the registration (e.g. flyback frames) are read unshifted; SiffPy
        raised instead.
        """
        f = self._f()
        frames = list(range(f.num_frames)) if frames is None else list(frames)
        shifts = self._frame_shifts(frames, registration_dict)
        if not full:
            return f.read_frames(frames, shifts=shifts)
        h, w = f.frame_shape
        n_bins = histogram_length(f.n_tau_bins, "corrosiff")
        out = np.zeros((len(frames), h * w, n_bins), dtype=np.uint16)
        for k, fr in enumerate(frames):
            pix, tau = f.photons(int(fr))
            pix = pix.astype(np.int64)
            if shifts is not None:  # a photon moves with its pixel
                pix = ((pix // w + shifts[k, 0]) % h) * w + (pix % w + shifts[k, 1]) % w
            np.add.at(out[k], (pix, tau.astype(np.int64) % n_bins), 1)
        return out.reshape(len(frames), h, w, n_bins)

    def _mask_frames(self, timepoint_start: int, timepoint_end: int | None,
                     z_index: int | None, color_channel: int) -> list[int]:
        return self.im_params.flatten_by_timepoints(
            timepoint_start, timepoint_end, reference_z=z_index,
            color_channel=color_channel - 1)

    def sum_mask(self, mask: Any, timepoint_start: int = 0, timepoint_end: int | None = None,
                 z_index: int | None = None, color_channel: int = 1,
                 registration_dict: Any = None, return_framewise: bool = False
                 ) -> np.ndarray:
        """Photons in ``mask`` per frame (2-D mask) or per volume (3-D ``(Z, y, x)`` mask).

        As in SiffPy: frames come from ``flatten_by_timepoints`` for ``color_channel``
        (1-based); a 2-D mask gives one value per frame, a 3-D mask one value per
        timepoint (the sum over planes) unless ``return_framewise``.
        """
        m = np.asarray(mask)
        if isinstance(mask, list) or m.ndim > 3:
            return self.sum_masks(mask, timepoint_start, timepoint_end, z_index,
                                  color_channel, registration_dict, return_framewise)
        return self.sum_masks(m[None], timepoint_start, timepoint_end, z_index, color_channel,
                              registration_dict, return_framewise)[0]

    def sum_masks(self, masks: Any, timepoint_start: int = 0, timepoint_end: int | None = None,
                  z_index: int | None = None, color_channel: int = 1,
                  registration_dict: Any = None, return_framewise: bool = False
                  ) -> np.ndarray:
        """:meth:`sum_mask` for several masks at once (each frame is read once)."""
        f = self._f()
        m = np.stack([np.asarray(x) for x in masks]) if isinstance(masks, list) \
            else np.asarray(masks)
        frames = self._mask_frames(timepoint_start, timepoint_end, z_index, color_channel)
        out = f.sum_masks(m, frames, shifts=self._frame_shifts(frames, registration_dict))
        out = np.asarray(out).astype(np.uint64)  # SiffPy's dtype
        if m.ndim == 4 and not return_framewise:
            z = self.im_params.num_slices * self.im_params.frames_per_slice \
                if z_index is None else 1
            out = out.reshape(out.shape[0], -1, z).sum(axis=2, dtype=np.uint64)
        return out

    def _frame_shifts(self, frames: Sequence[int], registration_dict: Any
                      ) -> np.ndarray | None:
        from .reader.siff_file import shifts_for_frames

        shifts = self._shifts(registration_dict)
        if not shifts:
            return None
        return shifts_for_frames(shifts, np.asarray(frames, dtype=np.int64))[0]

    def get_histogram(self, frames: Sequence[int] | None = None, framewise: bool = False
                      ) -> np.ndarray:
        """Arrival histograms with corrosiff's bins (``Tau_bins + 2``), summed or per frame."""
        h = self._f().histograms(frames, mode="corrosiff").astype(np.uint64)
        return h if framewise else h.sum(axis=0)

    def get_histogram_masked(self, mask: Any, frames: Sequence[int] | None = None,
                             registration_dict: Any = None) -> np.ndarray:
        """Arrival histograms of the photons in ``mask``, per frame: ``(n_frames, bins)``.

        Bins as :meth:`get_histogram` (corrosiff's ``Tau_bins + 2``); ``frames=None``
        means every frame (IFD). A 3-D ``(Z, y, x)`` mask uses each frame's own plane
        (all requested frames must then be imaging frames).
        """
        f = self._f()
        frames = list(range(f.num_frames)) if frames is None else list(frames)
        m = np.asarray(mask)
        stack = m[None] if m.ndim in (2, 3) else m
        h = f.masks_histograms(stack, frames, shifts=self._frame_shifts(frames,
                                                                        registration_dict),
                               mode="corrosiff")
        return h[0].astype(np.uint64)

    def get_frames_flim(self, params: Any = None, frames: Sequence[int] | None = None,
                        registration_dict: Any = None, confidence_metric: str = "chi_sq",
                        method: str = "empirical lifetime") -> FlimTrace:
        """Per-pixel FLIM images ``(n, y, x)`` with their intensities.

        ``method="empirical lifetime"``: mean arrival bin minus ``params.tau_offset``
        (arrival bins; 0 without params), NaN where a pixel has no photon.
        ``method="phasor"``: complex ``g + i s`` with corrosiff's period (``Tau_bins
        + 2`` bins), rotated by ``exp(-2 pi i offset / period)`` to remove the IRF
        delay (corrosiffpy's ``flim_map`` rotates the other way, a bug we do not
        copy). ``confidence_metric`` is accepted and ignored, as in SiffPy.
        """
        f = self._f()
        frames = list(range(f.num_frames)) if frames is None else list(frames)
        shifts = self._frame_shifts(frames, registration_dict)
        off = _offset_bins(params, self.im_params.picoseconds_per_bin)
        if method == "empirical lifetime":
            life, cnt = f.lifetime_images(frames, shifts=shifts, units="bins",
                                          offset_bins=off, return_intensity=True)
        elif method == "phasor":
            period = histogram_length(f.n_tau_bins, "corrosiff")
            g, s = f.phasor_images(frames, shifts=shifts, period_bins=period)
            life = (g + 1j * s) * np.exp(-2j * np.pi * off / period)
            cnt = f.read_frames(frames, shifts=shifts)
        else:
            raise ValueError(f"method must be 'empirical lifetime' or 'phasor', got {method!r}")
        return FlimTrace(life, cnt.astype(np.float64), method=method)

    def sum_mask_flim(self, mask: Any, params: Any = None, timepoint_start: int = 0,
                      timepoint_end: int | None = None, z_index: int | None = None,
                      color_channel: int = 1, registration_dict: Any = None,
                      return_framewise: bool = False,
                      flim_method: str = "empirical lifetime") -> FlimTrace:
        """Lifetime and photons in ``mask`` per frame or per timepoint (SiffPy's shapes).

        Frames as in :meth:`sum_mask`. Per frame: the mean arrival bin of the mask's
        photons minus ``params.tau_offset`` and their number; for 3-D masks (unless
        ``return_framewise``) per timepoint: the photon-weighted mean lifetime of the
        planes and the summed photons, as SiffPy computes them.
        """
        m = np.asarray(mask)
        if isinstance(mask, list) or m.ndim > 3:
            raise ValueError("sum_mask_flim takes one 2-D or 3-D mask; use sum_masks_flim")
        out = self.sum_masks_flim(m[None], params, timepoint_start, timepoint_end, z_index,
                                  color_channel, registration_dict, return_framewise,
                                  flim_method)
        return FlimTrace(out.lifetime[0], out.intensity[0], out.method, out.units, "ROI")

    def sum_masks_flim(self, masks: Any, params: Any = None, timepoint_start: int = 0,
                       timepoint_end: int | None = None, z_index: int | None = None,
                       color_channel: int = 1, registration_dict: Any = None,
                       return_framewise: bool = False,
                       flim_method: str = "empirical lifetime") -> FlimTrace:
        """:meth:`sum_mask_flim` for several masks at once: ``(n_masks, ...)``.

        ``flim_method="phasor"``: complex ``g + i s`` per mask and frame (each photon
        ``exp(2 pi i b / N)``, ``N`` = corrosiff's ``Tau_bins + 2``, averaged over the
        mask's photons), rotated by ``exp(-2 pi i offset / N)`` to remove the IRF
        delay; per timepoint for 3-D masks, the photon-weighted mean.
        """
        if flim_method not in ("empirical lifetime", "phasor"):
            raise ValueError("flim_method must be 'empirical lifetime' or 'phasor', got "
                             f"{flim_method!r}")
        f = self._f()
        m = np.stack([np.asarray(x) for x in masks]) if isinstance(masks, list) \
            else np.asarray(masks)
        frames = self._mask_frames(timepoint_start, timepoint_end, z_index, color_channel)
        shifts = self._frame_shifts(frames, registration_dict)
        off = _offset_bins(params, self.im_params.picoseconds_per_bin)
        period = histogram_length(f.n_tau_bins, "corrosiff")
        phasor = flim_method == "phasor"
        cnt, tsum, gsum, ssum = f.masks_flim_sums(m, frames, shifts, phasor=phasor,
                                                  period_bins=period)
        sums = [cnt, tsum, gsum, ssum] if phasor else [cnt, tsum]
        if m.ndim == 4 and not return_framewise:  # per timepoint: pool the planes
            z = self.im_params.num_slices * self.im_params.frames_per_slice \
                if z_index is None else 1
            sums = [a.reshape(a.shape[0], -1, z).sum(axis=2) for a in sums]
        cnt = sums[0]
        with np.errstate(invalid="ignore", divide="ignore"):
            n = np.where(cnt > 0, cnt, np.nan)
            if phasor:
                value = (sums[2] + 1j * sums[3]) / n * np.exp(-2j * np.pi * off / period)
            else:
                value = sums[1] / n - off
        return FlimTrace(value, cnt.astype(np.float64), method=flim_method,
                         info_string="Multi-ROIs")

    def get_time(self, frames: Sequence[int] | None = None,
                 reference_time: str = "experiment") -> Timeseries:
        """Frame times as a :class:`Timeseries`: experiment seconds or laser-clock epoch.

        ``"experiment"``: float64 seconds (``experiment_seconds``); ``"epoch"``: the
        laser-clock epoch of each frame, int64 ns, exact (``epoch_nanoseconds``;
        SiffPy bends it toward the system clock with a line fit, see
        docs/migration.md). ``frames=None``: every frame.
        """
        ts = self._f().timestamps(frames)
        if reference_time == "experiment":
            return Timeseries(ts.experiment_s, "experiment_seconds")
        if reference_time == "epoch":
            return Timeseries(ts.epoch_laser_ns, "epoch_nanoseconds")
        raise ValueError("reference_time must be 'experiment' or 'epoch'")

    def t_axis(self, timepoint_start: int = 0, timepoint_end: int | None = None,
               reference_z: int | None = 0, reference_time: str = "experiment"
               ) -> Timeseries:
        """Time of each timepoint: the time of slice ``reference_z``'s frame (colour 0).

        One value per timepoint (per timepoint and slice with ``reference_z=None``);
        with several frames per slice, the first frame of each slice counts.
        """
        ip = self.im_params
        frames = np.asarray(ip.flatten_by_timepoints(timepoint_start, timepoint_end,
                                                     reference_z=reference_z))
        r = ip.frames_per_slice
        if r > 1:  # the first repeat of each slice
            frames = frames.reshape(-1, r)[:, 0]
        return self.get_time(frames.tolist(), reference_time)

    @property
    def time_zero(self) -> int:
        """Laser-clock epoch (ns) of the first frame of the first timepoint, slice 0."""
        return int(self.t_axis(0, 1, 0, "epoch")[0])

    @staticmethod
    def _period(header: float | None, times: Callable[[], Any]) -> float:
        """Return the header's period, else the mean step of ``times()`` (NaN if one)."""
        if header is not None:
            return float(header)
        t = np.asarray(times())
        return float(np.mean(np.diff(t))) if t.size > 1 else float("nan")

    @property
    def dt_frame(self) -> float:
        """Frame period (s): ``scanFramePeriod``, else the mean step of the frame times."""
        return self._period(self.im_params.dt_frame, self.get_time)

    @property
    def dt_volume(self) -> float:
        """Volume period (s): ``1 / scanVolumeRate``, else the mean step of the time axis."""
        return self._period(self.im_params.dt_volume, self.t_axis)

    def sec_to_frames(self, seconds: float, base: str = "volume") -> int:
        """Whole volumes (``base="volume"``) or frames (``"frame"``) in ``seconds``."""
        if base not in ("volume", "frame"):
            raise ValueError("base must be 'volume' or 'frame'")
        return int(seconds / (self.dt_volume if base == "volume" else self.dt_frame))

    def _epoch_anchor(self) -> tuple[float, int]:
        ts = self._f().timestamps([0])
        return float(ts.experiment_s[0]), int(ts.epoch_laser_ns[0])

    def frame_time_to_epoch_time(self, frame_time: Any) -> Any:
        """Experiment seconds -> laser-clock epoch (int64 ns), anchored at frame 0.

        Exact in int64 (SiffPy parses the epoch as a float and loses ~256 ns).
        """
        t0, e0 = self._epoch_anchor()
        out = np.rint((np.asarray(frame_time, dtype=np.float64) - t0) * 1e9).astype(
            np.int64) + e0
        return int(out) if out.ndim == 0 else out

    def epoch_to_frame_time(self, epoch_time: Any) -> Any:
        """Laser-clock epoch (ns) -> experiment seconds, anchored at frame 0.

        The inverse of :meth:`frame_time_to_epoch_time` (SiffPy's divides by 1e-9
        and is 1e18 times off; fixed, see docs/migration.md).
        """
        t0, e0 = self._epoch_anchor()
        out = (np.asarray(epoch_time, dtype=np.int64) - e0) * 1e-9 + t0
        return float(out) if out.ndim == 0 else out

    def epoch_time_to_volume_index(self, epoch_time: Any) -> Any:
        """Index of the first volume starting at or after ``epoch_time`` (SiffPy's rule)."""
        return np.searchsorted(np.asarray(self.t_axis(reference_time="epoch")), epoch_time)

    def epoch_time_to_frame_index(self, epoch_time: Any) -> Any:
        """Index of the first frame (any, flyback included) starting at or after it."""
        return np.searchsorted(np.asarray(self.get_time(reference_time="epoch")), epoch_time)

    def _time_axis_path(self) -> Path:
        p = Path(os.fspath(self.filename))
        return p.parent / p.stem / f"{p.stem}_time_axis.npy"

    def save_time_axis(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Save :meth:`t_axis` (experiment s) as ``<parent>/<stem>/<stem>_time_axis.npy``.

        SiffPy's fails (an invalid ``with_suffix``); this writes where its saved
        registrations live. Returns the path.
        """
        out = Path(os.fspath(path)) if path is not None else self._time_axis_path()
        out.parent.mkdir(parents=True, exist_ok=True)
        np.save(out, np.asarray(self.t_axis()))
        return out

    def load_time_axis(self, path: str | os.PathLike[str] | None = None) -> Timeseries:
        """Load a time axis saved by :meth:`save_time_axis`."""
        src = Path(os.fspath(path)) if path is not None else self._time_axis_path()
        return Timeseries(np.load(src), "experiment_seconds")

    def get_frames_metadata(self, frames: Sequence[int] | None = None
                            ) -> list[dict[str, Any]]:
        """Return each frame's parsed description (default: SiffPy's, colour 0 full volumes).

        Each is a dict of the ``key = value`` lines, numbers converted
        (``frameNumbers``, ``frameTimestamps_sec``, ``epoch`` exact as int...).
        """
        if frames is None:
            frames = self.im_params.flatten_by_timepoints()
        return self._f().frame_metadata(frames)

    def get_appended_text(self, frames: Sequence[int] | None = None) -> list[EventStamp]:
        """Text appended to frames (user events), as :class:`EventStamp`.

        ``frames=None`` searches every frame (SiffPy searches only colour 0 of full
        volumes and misses events on flyback, other-colour or partial-volume frames).
        """
        events = self._f().timestamps(frames).events
        return [EventStamp(e.frame, e.text, None if np.isnan(e.time_s) else e.time_s)
                for e in events]

    def histograms(self, color_channel: int | Sequence[int] | None = None,
                   frame_endpoints: tuple[int | None, int | None] = (None, None)
                   ) -> np.ndarray:
        """One summed arrival histogram per colour (0-based): ``(n_colours, bins)`` uint64.

        ``frame_endpoints`` index each colour's frame list (``framelist_by_color``).
        Works for one-channel files (SiffPy's raises there).
        """
        ip = self.im_params
        colors = list(range(ip.num_colors)) if color_channel is None else \
            ([color_channel] if isinstance(color_channel, (int, np.integer))
             else list(color_channel))
        rows = []
        for c in colors:
            frames = ip.framelist_by_color(int(c))[slice(*frame_endpoints)]
            rows.append(self.get_histogram(frames) if len(frames) else
                        np.zeros(histogram_length(ip.num_bins), dtype=np.uint64))
        return np.stack(rows).astype(np.uint64)

    # ------------------------------------------------------------------ FLIM params

    @property
    def flim_params(self) -> tuple[Any, ...] | None:
        """Per-colour FLIM parameters (a tuple, ``None`` until set or fitted)."""
        return self._flim_params

    @flim_params.setter
    def flim_params(self, value: Any) -> None:
        if value is None:
            self._flim_params = None
        elif isinstance(value, (list, tuple)):
            self._flim_params = tuple(value)
        else:
            self._flim_params = (value,)

    def fit_flimparams_to_timepoints(self, timepoint_start: int = 0,
                                     timepoint_end: int | None = None,
                                     color_channel: int = 0, mask: Any = None,
                                     initial_guess: Any = None, num_lasers: int = 1,
                                     num_exps: int = 2) -> FLIMParams:
        """Fit a lifetime model to the summed histogram of a colour's frames (0-based).

        Uses every slice's frames of ``color_channel`` in the timepoint range (only
        the photons in ``mask`` if given), fits ``num_exps`` exponentials convolved
        with a Gaussian IRF (:func:`siff_xarray.flim.fit`), and stores the result at
        index ``color_channel`` of :attr:`flim_params` (SiffPy stores it first
        whatever the colour when none were set; fixed). ``initial_guess``: its IRF
        ``(mean, sigma)`` in ns starts the fit. Only ``num_lasers=1`` is supported.
        """
        from .flim import fit

        if num_lasers != 1:
            raise ValueError("fit_flimparams_to_timepoints: only num_lasers=1 is supported")
        if num_exps not in (1, 2):
            raise ValueError("num_exps must be 1 or 2")
        ip = self.im_params
        frames = ip.flatten_by_timepoints(timepoint_start, timepoint_end, reference_z=None,
                                          color_channel=color_channel)
        hist = (self.get_histogram_masked(mask, frames).sum(axis=0) if mask is not None
                else self.get_histogram(frames))
        ps = ip.picoseconds_per_bin
        if ps is None:
            raise ValueError(f"{os.fspath(self.filename)}: the header has no FLIM bin width")
        bin_ns = ps / 1000.0
        period = (ip.num_bins or len(hist)) * bin_ns
        irf = None
        if initial_guess is not None and getattr(initial_guess, "irf", None) is not None:
            irf = tuple(float(v) for v in initial_guess.irf)
        hist = np.asarray(hist, dtype=np.float64)[: ip.num_bins or None]  # one period
        res = fit(hist, n_exp=num_exps, bin_ns=bin_ns, period_ns=period, irf=irf)
        params = FLIMParams(exps=[(float(t), float(f)) for t, f in
                                  zip(res.taus, res.fractions, strict=True)],
                            irf=(float(res.irf_offset), float(res.irf_sigma)),
                            noise=float(res.background * hist.size / max(res.photons, 1.0)),
                            units="nanoseconds", chi_sq=float(res.reduced_chi2))
        current = list(self._flim_params or ())
        current += [None] * (color_channel + 1 - len(current))
        current[color_channel] = params
        self._flim_params = tuple(current)
        return params

    def pool_frames(self, *args: Any, **kwargs: Any) -> Any:
        """Not implemented (nor in SiffPy): pool with xarray instead.

        ``ds.intensity.coarsen(time=n).sum()`` on ``xr.open_dataset(path, engine="siff")``.
        """
        raise NotImplementedError("pool_frames is not implemented (SiffPy raises too); pool "
                                  "frames with xarray: ds.intensity.coarsen(time=n).sum()")


def siff_to_tiff(source_file: str | os.PathLike[str],
                 target_file: str | os.PathLike[str] | None = None,
                 mode: str = "ScanImage") -> str:
    """SiffPy's ``siffpy.siff_to_tiff``: the photon counts of every frame as a TIFF.

    ``source_file`` and ``target_file`` may be ``str`` or path objects; the default
    target is the source with a ``.tiff`` suffix. ``mode="ScanImage"`` writes a
    ScanImage TIFF (intensity only, as SiffPy's); SiffPy's unfinished ``"ome"`` mode
    is refused (use :func:`siff_xarray.convert` for OME-Zarr). Returns the target.
    """
    from pathlib import Path

    from .store.export import to_tiff

    if mode != "ScanImage":
        raise ValueError(f"siff_to_tiff: mode={mode!r} is not supported; 'ScanImage' writes "
                         "a ScanImage TIFF, and siff_xarray.convert writes OME-Zarr")
    src = Path(os.fspath(source_file))
    target = Path(os.fspath(target_file)) if target_file is not None else \
        src.with_suffix(".tiff")
    to_tiff(src, target)
    return str(target)

