"""One rule for what is a URL and what is a local path, and for expanding globs.

Every module that has to tell a local file from an fsspec URL asks here, so the
rule is written once: a string holding ``://`` or ``::`` (fsspec's chained
URLs) is a URL, except ``file://`` URLs, which are local paths. Local paths are
made absolute at open so that Dask workers started in another directory open
the same file (as xarray's own backends do).

Import rule: the standard library only (fsspec is imported lazily, for remote globs).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from typing import Any

__all__ = ["any_remote", "expand", "is_remote", "local_path", "normalize"]


def is_remote(path: str | os.PathLike[str]) -> bool:
    """Tell whether ``path`` is a URL that fsspec opens (``file://`` URLs are local)."""
    text = os.fspath(path)
    if not isinstance(text, str):
        return False
    return ("://" in text or "::" in text) and not text.startswith("file://")


def any_remote(sources: Sequence[Any]) -> bool:
    """Tell whether any of ``sources`` is a URL (file objects and open files are not)."""
    return any(is_remote(s) for s in sources if isinstance(s, (str, os.PathLike)))


def local_path(path: str | os.PathLike[str]) -> str:
    """Return a local path (``file://`` prefix removed); the caller checked ``is_remote``."""
    return os.fspath(path).removeprefix("file://")


def normalize(path: str | os.PathLike[str]) -> str:
    """Return URLs unchanged and local paths absolute (``file://`` removed)."""
    text = os.fspath(path)
    if is_remote(text):
        return text
    return os.path.abspath(os.path.expanduser(local_path(text)))


def _is_http(url: str) -> bool:
    """Tell whether ``url`` (the last link of a chained URL) is plain http(s)."""
    return url.rsplit("::", 1)[-1].lower().startswith(("http://", "https://"))


def has_glob(text: str) -> bool:
    """Tell whether ``text`` holds a glob wildcard.

    In an http(s) URL ``?`` starts the query (a presigned URL's signature, a
    download flag), so only ``*`` and ``[`` before it count.
    """
    if _is_http(text):
        return any(ch in text.rsplit("::", 1)[-1].split("?", 1)[0] for ch in "*[")
    return any(ch in text for ch in "*?[")


def expand(paths_or_glob: str | os.PathLike[str] | Sequence[Any],
           storage_options: dict[str, Any] | None = None) -> list[Any]:
    """Return the files a glob pattern (local or URL) matches, sorted, or the sequence given.

    A single path without wildcards is returned as a one-element list.

    Raises
    ------
    FileNotFoundError
        If a pattern matches nothing.
    ValueError
        If an empty sequence is given.

    """
    if isinstance(paths_or_glob, (str, os.PathLike)):
        pattern = os.fspath(paths_or_glob)
        if not has_glob(pattern):
            return [pattern]
        if is_remote(pattern):
            import fsspec

            fs, _, found = fsspec.get_fs_token_paths(pattern, storage_options=storage_options)
            protocol = fs.protocol[0] if isinstance(fs.protocol, tuple) else fs.protocol
            # (fsspec's HTTP paths are whole URLs; other filesystems' lack the protocol)
            paths = sorted(p if "://" in p else f"{protocol}://{p}" for p in found)
        else:
            paths = sorted(glob.glob(local_path(pattern)))
        if not paths:
            raise FileNotFoundError(f"no files match {pattern!r}")
        return paths
    paths = list(paths_or_glob)
    if not paths:
        raise ValueError("no files given")
    return paths
