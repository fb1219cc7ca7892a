"""The package layout keeps its rules (docs/architecture.md): imports go down, no circles.

Every ``import`` / ``from ... import`` in the package, at module level or inside a
function, is an edge between two units (a subpackage, or a top-level module).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

import siff_xarray

ROOT = Path(siff_xarray.__file__).resolve().parent
LEAVES = {"errors", "_version", "_paths", "_lazy", "_remote", "_progress", "_allocator"}
# what each unit may import (besides itself and the leaves)
ALLOWED = {
    "_options": {"format"},
    "format": set(),
    "synthetic": {"format"},
    "reader": {"format", "_options"},
    "registration": set(),
    "flim": set(),
    "backend": {"reader", "format", "_options"},
    "store": {"backend", "reader", "format", "_options"},
    "accessor": {"reader", "store", "registration"},
    "virtual": {"backend", "reader", "format"},
    "compat": {"backend", "reader", "format", "_options", "accessor", "registration", "store",
               "flim"},
    "cli": {"backend", "reader", "format", "store", "synthetic", "accessor", "registration"},
    "napari_reader": {"backend", "store", "accessor"},
    "engine": {"backend", "store", "_options"},
    # deprecated aliases of moved modules
    "zarr_store": set(), "zarr_photons": set(), "export": set(),
    "registration_suite2p": set(),
}
# units that only the package face (siff_xarray/__init__.py) imports
FACE = "__init__"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else FACE


def _edges() -> list[tuple[str, str, str | None, int]]:
    """``(from module, to module, imported name, line)`` for every siff_xarray import."""
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        mod = _module_name(path)
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] == "siff_xarray":
                    for alias in node.names:
                        full = f"{target}.{alias.name}"
                        # "from . import accessor" imports a module, not a name
                        is_module = (ROOT.parent / Path(*full.split("."))).with_suffix(
                            ".py").exists() or (ROOT.parent / Path(*full.split("."))).is_dir()
                        out.append((mod, full if is_module else target,
                                    None if is_module else alias.name, node.lineno))
            elif isinstance(node, ast.Import):
                out.extend((mod, a.name, None, node.lineno) for a in node.names
                           if a.name.split(".")[0] == "siff_xarray")
    return out


def test_every_import_between_packages_goes_down_the_stack():
    wrong = []
    for src, dst, _, line in _edges():
        a, b = _unit(src), _unit(dst)
        if a in (b, FACE) or b in LEAVES:
            continue
        if b not in ALLOWED.get(a, set()):
            wrong.append(f"{src}:{line} imports {dst} ({a} -> {b})")
    assert not wrong, "\n".join(wrong)


def test_leaves_import_only_leaves():
    wrong = [f"{src}:{line} imports {dst}" for src, dst, _, line in _edges()
             if _unit(src) in LEAVES and _unit(dst) not in LEAVES]
    assert not wrong, "\n".join(wrong)


def test_no_import_circle_between_packages():
    graph = defaultdict(set)
    for src, dst, _, _ in _edges():
        a, b = _unit(src), _unit(dst)
        if a != b and FACE not in (a, b):
            graph[a].add(b)
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                pytest.fail(f"import circle: {' -> '.join([*path, node, nxt])}")
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_no_private_name_is_imported_from_another_package():
    wrong = [f"{src}:{line} imports {name} from {dst}" for src, dst, name, line in _edges()
             if name and name.startswith("_") and not name.startswith("__")
             and _unit(src) != _unit(dst)]
    assert not wrong, "\n".join(wrong)


def test_every_module_says_what_it_does():
    missing = [str(p.relative_to(ROOT)) for p in sorted(ROOT.rglob("*.py"))
               if not ast.get_docstring(ast.parse(p.read_text(encoding="utf-8")))]
    assert not missing, f"modules without a docstring: {missing}"


def test_moved_modules_still_import_with_a_deprecation_warning():
    import siff_xarray.store
    from siff_xarray import zarr_store

    with pytest.warns(DeprecationWarning, match=r"siff_xarray\.store\.convert"):
        assert zarr_store.convert is siff_xarray.store.convert
    with pytest.warns(DeprecationWarning, match="siff_xarray.errors"):
        assert zarr_store.ConversionError is siff_xarray.ConversionError
    from siff_xarray.reader import imparams

    with pytest.warns(DeprecationWarning, match="siff_xarray.format.imparams"):
        assert imparams.ImParams is siff_xarray.ImParams
    with pytest.raises(AttributeError, match="moved to"):
        _ = zarr_store.no_such_name


# --------------------------------------------------------------- Numba's on-disk cache
#: modules whose functions Numba compiles with ``cache=True``
COMPILED = ("siff_xarray.reader.kernels", "siff_xarray.reader.ifd_walk",
            "siff_xarray.reader.frame_meta_scan", "siff_xarray.store.ome",
            "siff_xarray.registration.likelihood")


def _simple(value) -> bool:
    return isinstance(value, (int, float, str, bytes)) or (
        isinstance(value, tuple) and all(_simple(v) for v in value))


def _foreign_inputs(module) -> str:
    """Digest of what ``module`` imports from other siff_xarray modules.

    Constants by value, modules by their upper-case constants, functions by their
    source and the simple globals they read (Numba freezes all of these into the
    compiled code).
    """
    import hashlib
    import importlib
    import inspect
    import types

    tree = ast.parse(inspect.getsource(module))
    names = []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith(
                "siff_xarray")):
            names += [a.asname or a.name for a in node.names]
    parts = []
    for name in sorted(names):
        value = getattr(module, name)
        if isinstance(value, types.ModuleType):
            consts = {k: v for k, v in vars(value).items() if k.isupper() and _simple(v)}
            parts.append(f"{name}={sorted(consts.items())!r}")
        elif isinstance(value, types.FunctionType):
            home = importlib.import_module(value.__module__)
            used = {k: getattr(home, k) for k in value.__code__.co_names
                    if _simple(getattr(home, k, None))}
            parts.append(f"{name}={inspect.getsource(value)}{sorted(used.items())!r}")
        elif _simple(value):
            parts.append(f"{name}={value!r}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


@pytest.mark.parametrize("name", COMPILED)
def test_compiled_modules_change_when_what_they_compile_in_changes(name):
    """Numba's cache keys a kernel on its own file's mtime and size only.

    A helper or constant imported from another file is compiled into the cached
    kernel, so editing only that file would leave the old one running (it
    happened with ``decode.in_bounds``). Each compiled module records a digest of
    its imports: changing them fails here until the module's ``_FOREIGN_INPUTS``
    is updated, and that edit of the module's own file invalidates its cache.
    """
    import importlib

    module = importlib.import_module(name)
    assert getattr(module, "_FOREIGN_INPUTS", None) == _foreign_inputs(module), (
        f"{name}: what it imports from other modules changed (or was never recorded): "
        f"set _FOREIGN_INPUTS = {_foreign_inputs(module)!r} in it, which also makes "
        "Numba recompile its cached functions")


def test_every_module_numba_caches_is_checked():
    cached = {_module_name(p) for p in ROOT.rglob("*.py")
              if "cache=True" in p.read_text() or '"cache": True' in p.read_text()}
    assert cached == set(COMPILED)
