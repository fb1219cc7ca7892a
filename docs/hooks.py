"""MkDocs hook: draw the gallery's figures (``docs/figures.py``) before every build."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent


def on_pre_build(config: Any, **kwargs: Any) -> None:
    """Write ``docs/figures/*.png`` from synthetic data, so the figures cannot go stale."""
    spec = importlib.util.spec_from_file_location("siff_docs_figures", HERE / "figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.make_figures(HERE / "figures")
