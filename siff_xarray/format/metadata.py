"""ScanImage header metadata: the settings dump and the ROI-group JSON.

The non-varying frame data (NVFD) is MATLAB-style ``key = value`` text, one
setting per line, keys dotted (``SI.hFastZ.enable``). :func:`parse_matlab_value`
is a small recursive-descent parser for the MATLAB literals ScanImage writes
(numbers, logicals, quoted strings, row/column vectors, matrices, cell arrays,
``NaN``/``Inf``, empties). It never evaluates file content; text it does not
recognise as a literal (enum names, ``<nonscalar struct>``...) stays a string.

Value types:

==========================  =================================================
MATLAB                      Python
==========================  =================================================
``30`` / ``0.0163``         ``int`` / ``float`` (``NaN``, ``Inf`` as floats)
``true`` / ``false``        ``bool``
``'text'`` / ``"text"``     ``str``
``[1 2 3]``                 1-D ``numpy`` array (int64, float64 or bool)
``[1;2]``                   2-D array of shape (2, 1)
``[1 2;3 4]``               2-D array
``[]``                      empty float64 array
``{'a' 'b'}``               ``list`` (rows of a 2-D cell: list of lists)
empty value                 ``None``
==========================  =================================================

The ROI text is JSON; trailing NUL bytes and whitespace are ignored.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import SiffWarning, user_stacklevel

__all__ = [
    "MatlabParseError",
    "Roi",
    "RoiGroup",
    "ScanImageMetadata",
    "Scanfield",
    "parse_matlab_value",
    "parse_nvfd",
    "parse_roi_groups",
]

_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SPECIAL = {"true": True, "false": False, "NaN": math.nan, "nan": math.nan,
            "Inf": math.inf, "inf": math.inf}


class MatlabParseError(ValueError):
    """Text is not a MATLAB literal this parser understands."""


class _Parser:
    """Recursive-descent parser over one value string."""

    MAX_DEPTH = 16

    def __init__(self, text: str) -> None:
        self.s = text
        self.i = 0
        self.depth = 0

    def error(self, what: str) -> MatlabParseError:
        return MatlabParseError(f"{what} at position {self.i} in {self.s!r}")

    def peek(self) -> str:
        return self.s[self.i] if self.i < len(self.s) else ""

    def skip_ws(self) -> bool:
        """Skip blanks; return True if any were skipped."""
        start = self.i
        while self.i < len(self.s) and self.s[self.i] in " \t":
            self.i += 1
        return self.i > start

    def value(self) -> Any:
        self.skip_ws()
        ch = self.peek()
        if ch == "'" or ch == '"':
            return self.string(ch)
        if ch == "[":
            return self.container("[", "]")
        if ch == "{":
            return self.container("{", "}")
        return self.scalar()

    def string(self, quote: str) -> str:
        self.i += 1
        out = []
        while True:
            j = self.s.find(quote, self.i)
            if j < 0:
                raise self.error("unterminated string")
            out.append(self.s[self.i : j])
            if self.s.startswith(quote * 2, j):  # doubled quote = literal quote
                out.append(quote)
                self.i = j + 2
                continue
            self.i = j + 1
            return "".join(out)

    def scalar(self) -> Any:
        neg = ""
        if self.peek() and self.peek() in "+-" and self.s[self.i + 1 : self.i + 2].isalpha():
            neg = self.s[self.i]
            self.i += 1
        m = _WORD.match(self.s, self.i)
        if m and m.group() in _SPECIAL:
            self.i = m.end()
            v = _SPECIAL[m.group()]
            if isinstance(v, bool):
                if neg:
                    raise self.error("sign before a logical")
                return v
            return -v if neg == "-" else v
        if neg:
            raise self.error("sign before a word")
        m = _NUMBER.match(self.s, self.i)
        if not m:
            raise self.error("expected a value")
        self.i = m.end()
        text = m.group()
        if any(c in text for c in ".eE"):
            return float(text)
        if len(text) > 1000:  # Python refuses int() of > 4300 digits; no setting has 1000
            raise self.error(f"an integer of {len(text)} digits")
        return int(text)

    def container(self, open_: str, close: str) -> Any:
        self.depth += 1
        if self.depth > self.MAX_DEPTH:
            raise self.error("nesting too deep")
        self.i += 1
        rows: list[list[Any]] = [[]]
        while True:
            spaced = self.skip_ws()
            ch = self.peek()
            if ch == "":
                raise self.error(f"missing '{close}'")
            if ch == close:
                self.i += 1
                break
            if ch in ";\n":
                self.i += 1
                rows.append([])
                continue
            if ch == ",":
                self.i += 1
                continue
            if rows[-1] and not spaced and self.s[self.i - 1] not in ",;" + open_:
                raise self.error("elements must be separated")
            rows[-1].append(self.value())
        if rows and not rows[-1] and len(rows) > 1:
            rows.pop()  # trailing ';'
        self.depth -= 1
        if open_ == "{":
            if len(rows) == 1:
                return rows[0]
            return rows
        return _matrix(rows, self)


def _matrix(rows: list[list[Any]], parser: _Parser) -> Any:
    """Turn parsed rows of a ``[...]`` literal into a numpy array (or joined string)."""
    flat = [v for r in rows for v in r]
    if not flat:
        return np.zeros(0, dtype=np.float64)
    if all(isinstance(v, str) for v in flat):
        # MATLAB concatenates char arrays: ['ab' 'cd'] is 'abcd'
        return "".join(flat) if len(rows) == 1 else ["".join(r) for r in rows]
    if any(isinstance(v, (str, list, np.ndarray)) for v in flat):
        raise parser.error("mixed or nested matrix")
    if len({len(r) for r in rows}) != 1:
        raise parser.error("matrix rows of different lengths")
    if all(isinstance(v, bool) for v in flat):
        dtype: type = np.bool_
    elif all(isinstance(v, (int, bool)) for v in flat):
        dtype = np.int64
    else:
        dtype = np.float64
    arr = np.array(rows, dtype=dtype)
    return arr[0] if arr.shape[0] == 1 else arr


def parse_matlab_value(text: str) -> Any:
    """Parse one MATLAB literal into a Python / numpy value.

    Parameters
    ----------
    text
        The value text, e.g. ``"[1 2;3 4]"``.

    Returns
    -------
    The parsed value (see the module docstring); ``None`` for empty text.

    Raises
    ------
    MatlabParseError
        If ``text`` is not a literal (callers usually keep such text as a string).

    """
    stripped = text.strip()
    if stripped == "":
        return None
    p = _Parser(stripped)
    v = p.value()
    p.skip_ws()
    if p.i != len(stripped):
        raise p.error("unexpected text after the value")
    return v


class ScanImageMetadata(Mapping[str, Any]):
    """ScanImage settings as a nested, read-only mapping.

    ``md["SI"]["hFastZ"]["enable"]`` and ``md.get_path("SI.hFastZ.enable")`` both
    work. :attr:`flat` maps each original dotted key to its value,
    :attr:`raw` to its unparsed text, and :attr:`unparsed_lines` keeps any line
    that is not ``key = value``.
    """

    def __init__(self, flat: dict[str, Any], raw: dict[str, str],
                 unparsed_lines: list[str]) -> None:
        self.flat = flat
        self.raw = raw
        self.unparsed_lines = unparsed_lines
        self._tree: dict[str, Any] = {}
        for key, value in flat.items():
            node = self._tree
            parts = key.split(".")
            for part in parts[:-1]:
                nxt = node.get(part)
                if not isinstance(nxt, dict):
                    nxt = {} if nxt is None else {"_value": nxt}
                    node[part] = nxt
                node = nxt
            if isinstance(node.get(parts[-1]), dict):
                node[parts[-1]]["_value"] = value
            else:
                node[parts[-1]] = value

    def __getitem__(self, key: str) -> Any:
        return self._tree[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tree)

    def __len__(self) -> int:
        return len(self._tree)

    def __repr__(self) -> str:
        return f"<ScanImageMetadata: {len(self.flat)} settings>"

    def get_path(self, dotted: str, default: Any = None) -> Any:
        """Return the value at a dotted key, or ``default`` if absent."""
        return self.flat.get(dotted, default)

    def find(self, suffix: str) -> tuple[str, Any] | None:
        """Return the first ``(key, value)`` whose key ends with ``.suffix``."""
        for key, value in self.flat.items():
            if key == suffix or key.endswith("." + suffix):
                return key, value
        return None


def parse_nvfd(text: str) -> ScanImageMetadata:
    """Parse the non-varying frame data text into :class:`ScanImageMetadata`.

    Values that are not MATLAB literals are kept as their stripped text.
    """
    flat: dict[str, Any] = {}
    raw: dict[str, str] = {}
    unparsed: list[str] = []
    for line in text.replace("\r\n", "\n").split("\n"):
        line = line.rstrip("\x00\r")
        if not line.strip():
            continue
        i = line.find(" = ")
        if i >= 0:
            key, value_text = line[:i].strip(), line[i + 3 :]
        elif line.rstrip().endswith(" ="):
            key, value_text = line.rstrip()[:-2].strip(), ""
        else:
            unparsed.append(line)
            continue
        if not key:
            unparsed.append(line)
            continue
        try:
            value = parse_matlab_value(value_text)
        except MatlabParseError:
            value = value_text.strip()
        flat[key] = value
        raw[key] = value_text
    return ScanImageMetadata(flat, raw, unparsed)


# ------------------------------------------------------------------------ ROI JSON


def _as_list(x: Any) -> list[Any]:
    if x is None:
        return []
    return list(x) if isinstance(x, list) else [x]


@dataclass(frozen=True)
class Scanfield:
    """One imaging scanfield (a rotated rectangle in ScanImage reference space)."""

    center_xy: tuple[float, float] | None
    size_xy: tuple[float, float] | None
    rotation_degrees: float
    pixel_resolution_xy: tuple[int, int] | None
    enable: bool
    affine: np.ndarray | None
    pixel_to_ref_transform: np.ndarray | None
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def from_json(cls, d: dict[str, Any], problems: list[str] | None = None) -> Scanfield:
        """Build from one JSON scanfield object.

        Fields of the wrong type (text, NaN or infinite numbers, ragged matrices) are
        left out (``None``, rotation 0) and their names appended to ``problems``.
        """
        bad = problems if problems is not None else []

        def number(v: Any) -> float:
            f = float(v)  # TypeError/ValueError for text, lists, ...
            if not math.isfinite(f):
                raise ValueError(v)
            return f

        def pair(key: str, typ: type) -> Any:
            v = d.get(key)
            if v is None:
                return None
            try:
                if not isinstance(v, list) or len(v) != 2:
                    raise ValueError(v)
                return tuple(typ(number(x)) for x in v)
            except (TypeError, ValueError, OverflowError):
                bad.append(key)
                return None

        def mat(key: str) -> np.ndarray | None:
            v = d.get(key)
            if v is None:
                return None
            try:
                m = np.asarray(v, dtype=float)
                if not isinstance(v, list) or m.ndim != 2 or not np.isfinite(m).all():
                    raise ValueError(v)
                return m
            except (TypeError, ValueError):
                bad.append(key)
                return None

        try:
            rotation = number(d.get("rotationDegrees") or 0.0)
        except (TypeError, ValueError, OverflowError):
            bad.append("rotationDegrees")
            rotation = 0.0
        return cls(
            center_xy=pair("centerXY", float), size_xy=pair("sizeXY", float),
            rotation_degrees=rotation, pixel_resolution_xy=pair("pixelResolutionXY", int),
            enable=bool(d.get("enable", 1)), affine=mat("affine"),
            pixel_to_ref_transform=mat("pixelToRefTransform"), raw=d,
        )


@dataclass(frozen=True)
class Roi:
    """An ROI: a name and its scanfields (one per z for multi-plane ROIs)."""

    name: str
    scanfields: list[Scanfield]
    raw: dict[str, Any] = field(repr=False)


@dataclass(frozen=True)
class RoiGroup:
    """A ScanImage ROI group (imaging, photostimulation or integration)."""

    name: str
    rois: list[Roi]
    raw: dict[str, Any] = field(repr=False)


def parse_roi_groups(text: str, source: str = "<file>") -> dict[str, RoiGroup]:
    """Parse the ROI-group JSON text; return ``{group kind: RoiGroup}``.

    Empty text gives ``{}``. Malformed JSON gives ``{}`` and a
    :class:`~siff_xarray.errors.SiffWarning` (the photons are still readable;
    the raw text stays available on the header).
    """
    text = text.strip("\x00 \t\r\n")
    if not text:
        return {}
    try:
        doc = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        warnings.warn(f"{source}: ROI-group JSON is malformed ({exc}); ignoring it",
                      SiffWarning, stacklevel=user_stacklevel())
        return {}
    groups = doc.get("RoiGroups", doc) if isinstance(doc, dict) else {}
    out: dict[str, RoiGroup] = {}
    if not isinstance(groups, dict):
        return out
    problems: list[str] = []
    for kind, g in groups.items():
        for k, gd in enumerate(_as_list(g)):
            if not isinstance(gd, dict):
                continue
            rois = []
            for r in _as_list(gd.get("rois")):
                if isinstance(r, dict):
                    sfs = [Scanfield.from_json(s, problems)
                           for s in _as_list(r.get("scanfields")) if isinstance(s, dict)]
                    rois.append(Roi(name=str(r.get("name") or ""), scanfields=sfs, raw=r))
            key = kind if k == 0 else f"{kind}_{k}"
            out[key] = RoiGroup(name=str(gd.get("name") or ""), rois=rois, raw=gd)
    if problems:
        warnings.warn(f"{source}: ROI-group JSON fields of the wrong type are ignored: "
                      f"{', '.join(sorted(set(problems)))} (the photons are unaffected; the "
                      "header's field of view is used instead)", SiffWarning,
                      stacklevel=user_stacklevel())
    return out
