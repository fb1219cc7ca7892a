"""Exception and warning types raised by siff-xarray.

Every problem with the *content* of a file is a :class:`SiffFormatError` (a
``ValueError``) whose message names the file, the byte offset (when one is
known) and what is wrong, so that users can report or repair the file.
Recoverable oddities are reported with :class:`SiffWarning`. Zarr conversions
that cannot start or finish raise :class:`ConversionError`; opening the partial
result of an interrupted one raises :class:`IncompleteStoreError`.
"""

from __future__ import annotations

__all__ = [
    "ConversionError", "IncompleteStoreError", "MissingChunkError", "RemoteAccessError",
    "SiffFormatError",
    "SiffWarning", "user_stacklevel",
]

#: Packages whose frames a warning skips to reach the user's call.
_LIBRARIES = ("siff_xarray", "xarray", "dask", "fsspec", "zarr", "numpy", "contextlib",
              "functools", "importlib")


def user_stacklevel() -> int:
    """Return the ``stacklevel`` that points a warning at the user's own call.

    Counts the frames above the caller of this function that belong to
    siff-xarray or the libraries it is called through (xarray, dask, fsspec, ...),
    so that a warning raised deep inside ``xr.open_dataset`` names the user's line,
    not a library line. Warnings issued where no user frame exists (a worker
    thread) point at the outermost frame.
    """
    import os
    import sys

    prefixes = []
    for name in _LIBRARIES:
        mod = sys.modules.get(name)
        path = getattr(mod, "__file__", None) if mod is not None else None
        if path:
            prefixes.append(os.path.dirname(path) if path.endswith("__init__.py") else path)
    frame = sys._getframe(1)  # the function that warns: stacklevel 1
    level = 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(tuple(prefixes)):
        frame = frame.f_back
        level += 1
    return level



class SiffFormatError(ValueError):
    """A ``.siff`` / ScanImage TIFF file is malformed or not what it claims to be.

    Parameters
    ----------
    path
        The file (path, URL or a description of the file object).
    problem
        What is wrong, in plain words.
    offset
        Byte offset in the file where the problem was found, if known.
    frame
        The frame (IFD index) concerned, if any.

    """

    def __init__(
        self,
        path: str,
        problem: str,
        offset: int | None = None,
        frame: int | None = None,
    ) -> None:
        self.path = path
        self.problem = problem
        self.offset = offset
        self.frame = frame
        where = []
        if frame is not None:
            where.append(f"frame {frame}")
        if offset is not None:
            where.append(f"byte offset {offset}")
        location = f" ({', '.join(where)})" if where else ""
        super().__init__(f"{path}{location}: {problem}")

    def __reduce__(self):  # keep the structured fields through pickling (dask workers)
        return (type(self), (self.path, self.problem, self.offset, self.frame))


class MissingChunkError(SiffFormatError):
    """A chunk that a converted store must hold is not there (deleted or lost).

    Zarr would read it as zeros; stores written by :func:`siff_xarray.convert` hold
    every chunk, so its absence is damage (see ``docs/zarr-layout.md``).
    """


class SiffWarning(UserWarning):
    """Something in a file was unusual but could be handled (e.g. a truncated last frame)."""


class ConversionError(RuntimeError):
    """A Zarr conversion could not be started or finished (the message says why)."""


class IncompleteStoreError(ConversionError):
    """A Zarr store is the partial result of an interrupted conversion."""


class RemoteAccessError(OSError):
    """A remote file or store could not be reached (timeout, refused, no credentials).

    The message names the URL and what to check.
    """

    def __init__(self, url: str, problem: str) -> None:
        self.url = url
        self.problem = problem
        super().__init__(f"{url}: {problem}")

    def __reduce__(self):  # keep the fields through pickling (dask workers)
        return (type(self), (self.url, self.problem))
