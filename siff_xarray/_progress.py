"""One progress mechanism for long work: a bar in terminals and notebooks, a callback, or nothing.

Long calls (conversion, ``verify``, registration, photon reductions over many
frames) take a ``progress`` argument or follow the process-wide default:

* ``None`` (the default): a bar (rich, on stderr; rendered in Jupyter
  notebooks too) when a person is watching (stderr is a terminal, or the code runs
  in an IPython kernel) and the work lasts longer than :data:`DELAY_S`; nothing
  otherwise (scripts, logs, tests);
* ``True``: always a bar; ``False``: nothing;
* a callable: called with a :class:`Step` after every unit of work.

:func:`set_progress` changes the default (``siff_xarray.set_progress(False)``
silences everything); the environment variable ``SIFF_XARRAY_PROGRESS`` (``0`` or
``1``) sets it for a whole session. Work that is a lazy Dask graph reports
nothing here: use Dask's own ``dask.diagnostics.ProgressBar`` or
``distributed.progress`` when computing it (the CLI does).

Import rule: the standard library only (rich lazily, when a bar is drawn).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["DELAY_S", "ProgressArg", "Reporter", "Step", "set_progress", "short_name",
           "watched"]

#: seconds of work before an automatic bar appears (short calls stay silent)
DELAY_S = 1.0


@dataclass
class Step:
    """State of a long call, passed to a ``progress`` callable after each unit of work."""

    task: str
    done: int
    total: int
    unit: str
    elapsed_s: float

    @property
    def fraction(self) -> float:
        """Share of the work done (1.0 when there is none)."""
        return self.done / self.total if self.total else 1.0


ProgressArg = bool | Callable[[Step], Any] | None

_default: bool | None = None


def set_progress(enabled: bool | None) -> bool | None:
    """Set the default of every ``progress`` argument; return the previous default.

    ``True``: always draw bars; ``False``: never; ``None``: draw them when a person
    is watching (a terminal or a notebook) and the work lasts over a second.
    """
    global _default
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"set_progress takes True, False or None, not {enabled!r}")
    old, _default = _default, enabled
    return old


def short_name(path: str) -> str:
    """Return the last part of a path or URL (a bar's description)."""
    return str(path).rstrip("/").rsplit("/", 1)[-1] or str(path)


def watched() -> bool:
    """Tell whether a person is likely watching: a terminal or an IPython kernel."""
    if "ipykernel" in sys.modules:
        return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _resolve(progress: ProgressArg) -> bool | Callable[[Step], Any] | None:
    """Return False (nothing), True (a bar now), None (a bar after a delay) or a callable."""
    if callable(progress):
        return progress
    if progress is None:
        progress = _default
    if progress is None:
        env = os.environ.get("SIFF_XARRAY_PROGRESS", "").strip().lower()
        if env in ("0", "false", "no", "off"):
            return False
        if env in ("1", "true", "yes", "on"):
            return True
        return None if watched() else False
    return bool(progress)


class Reporter:
    """Report the progress of one task of ``total`` units (see the module docstring).

    Use as a context manager; call :meth:`advance` after each unit (or batch of
    units) of work.
    """

    def __init__(self, task: str, total: int, unit: str = "frames",
                 progress: ProgressArg = None, done: int = 0) -> None:
        self.task, self.total, self.unit = task, int(total), unit
        self.done = int(done)  # units done before this run (a resumed conversion)
        self._t0 = time.perf_counter()
        self._mode = _resolve(progress)
        self._bar: Any = None
        self._id: Any = None
        if self._mode is True and self.total:  # (no work: no empty "0/0" bar)
            self._start_bar()

    def _start_bar(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._bar = Progress(TextColumn("{task.description}"), BarColumn(),
                             MofNCompleteColumn(), TextColumn(self.unit),
                             TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                             console=Console(stderr=True))
        self._bar.start()
        self._id = self._bar.add_task(self.task, total=self.total, completed=self.done)

    def advance(self, n: int = 1) -> None:
        """Record ``n`` more units done."""
        self.done = min(self.done + int(n), self.total) if self.total else self.done + int(n)
        elapsed = time.perf_counter() - self._t0
        if callable(self._mode):
            self._mode(Step(self.task, self.done, self.total, self.unit, elapsed))
            return
        if self._bar is None and self._mode is None and elapsed >= DELAY_S \
                and self.done < self.total:
            self._start_bar()
        if self._bar is not None:
            self._bar.update(self._id, completed=self.done)

    def track(self, items: Any, size: Callable[[Any], int] = lambda item: 1) -> Any:
        """Yield ``items``, advancing by ``size(item)`` once the caller is done with each."""
        for item in items:
            yield item
            self.advance(size(item))

    def close(self) -> None:
        """Finish the bar (left on screen, complete or where the work stopped)."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __enter__(self) -> Reporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
