"""Lazy attributes of package faces, and deprecated aliases of moved modules.

Packages whose modules pull in Numba, Zarr or Dask expose their public names
through :func:`lazy_getattr`, so that importing the package (which xarray does
for every installed backend when it lists engines) stays cheap. Modules that
moved keep their old import path through :func:`deprecated_getattr`.

Import rule: the standard library only.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import warnings
from collections.abc import Callable, Iterable, Mapping
from importlib import import_module
from typing import Any

__all__ = ["after_import", "deprecated_getattr", "lazy_getattr"]


def lazy_getattr(package: str, table: Mapping[str, str], namespace: dict[str, Any]
                 ) -> Callable[[str], Any]:
    """Return a module ``__getattr__`` importing ``name`` from ``table[name]`` on first use.

    ``table`` maps public names to module paths (relative to ``package``); a path
    of the form ``"module:"`` returns the module itself. The value is cached in
    ``namespace`` (the package's globals), so the lookup runs once per name.
    """

    def __getattr__(name: str) -> Any:
        try:
            target = table[name]
        except KeyError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        module, sep, attr = target.partition(":")
        mod = import_module(module, package)
        value = mod if sep and not attr else getattr(mod, attr or name)
        namespace[name] = value
        return value

    return __getattr__


def deprecated_getattr(old: str, new: Iterable[str]) -> Callable[[str], Any]:
    """Return a module ``__getattr__`` that finds names in the ``new`` modules, with a warning.

    Used by modules that moved: ``import siff_xarray.zarr_store as zs; zs.convert``
    keeps working and says where ``convert`` lives now.
    """
    modules = tuple(new)

    def __getattr__(name: str) -> Any:
        for module in modules:
            mod = import_module(module)
            if hasattr(mod, name):
                warnings.warn(f"{old} is deprecated; use {module}.{name}", DeprecationWarning,
                              stacklevel=2)
                return getattr(mod, name)
        raise AttributeError(f"module {old!r} has no attribute {name!r} (it moved to "
                             f"{' / '.join(modules)})")

    return __getattr__


class _AfterImport:
    """An import hook: run ``then()`` right after module ``name`` is executed, once.

    ``find_spec`` hands out the normal spec with its loader's ``exec_module``
    wrapped; the hook leaves ``sys.meta_path`` only when the module has really been
    executed (``importlib.util.find_spec`` alone, as availability checks call it,
    leaves it in place).
    """

    def __init__(self, name: str, then: Callable[[], Any]) -> None:
        self.name = name
        self.then = then
        self._inside = threading.local()  # our own lookup of the real spec

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != self.name or getattr(self._inside, "active", False):
            return None
        from importlib.util import find_spec

        self._inside.active = True
        try:
            spec = find_spec(fullname)
        finally:
            self._inside.active = False
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run_module = loader.exec_module

        def exec_module(module: Any) -> None:
            run_module(module)
            with contextlib.suppress(ValueError):
                sys.meta_path.remove(self)
            self.then()

        loader.exec_module = exec_module  # this spec's own loader object
        return spec


def after_import(name: str, then: Callable[[], Any]) -> None:
    """Run ``then()`` once module ``name`` is imported: now if it already is, else right after.

    The package registers ``ds.siff`` this way, so that importing it (for the command
    line, or when xarray lists engines) does not import xarray itself.
    """
    if name in sys.modules:
        then()
        return
    if not any(isinstance(f, _AfterImport) and f.name == name for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(name, then))
