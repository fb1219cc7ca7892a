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
    "ConversionError", "IncompleteStoreError", "RemoteAccessError", "SiffFormatError",
    "SiffWarning",
]


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
