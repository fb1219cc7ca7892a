"""The documentation site builds without warnings; the notebooks run and are stripped."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.slow
def test_docs_build_strict(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                        str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True,
                       env=env, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "WARNING" not in r.stderr
    for name in ("planes", "registration", "traces", "lifetime", "phasor"):
        assert (tmp_path / "site" / "figures" / f"{name}.png").stat().st_size > 5000
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert "regularize_sigma" in api and "StorePhotons" in api  # generated from docstrings


def test_notebooks_are_committed_without_outputs():
    import nbformat

    assert NOTEBOOKS, "no notebooks found"
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, path.name


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                     for o in c.outputs if o.get("output_type") == "stream")
    assert "store gives the same traces: True True" in text
    assert "cluster traces equal: True True" in text
    assert "verify: identical" in text


def test_slurm_recipe_writes_a_job_script(capsys):
    # the docs' dask-jobqueue recipe, run as written: it builds the job script only
    pytest.importorskip("dask_jobqueue")
    import dask

    text = (ROOT / "docs" / "clusters.md").read_text()
    block = text.split("# recipe: slurm\n", 1)[1].split("```", 1)[0]
    # the scheduler runs in this process; on 127.0.0.1 only in tests
    with dask.config.set({"jobqueue.slurm.scheduler-options": {"host": "127.0.0.1"}}):
        scope: dict = {}
        exec(compile(block, "clusters.md", "exec"), scope)
        scope["cluster"].close()
    script = capsys.readouterr().out
    for want in ("#SBATCH -p normal", "#SBATCH -A my-lab", "#SBATCH -n 1",
                 "#SBATCH --cpus-per-task=8", "#SBATCH -t 02:00:00",
                 "#SBATCH --output=dask-worker-%j.log", "--nworkers 2", "--nthreads 4",
                 "--local-directory $TMPDIR", "tcp://127.0.0.1:"):
        assert want in script, (want, script)


def test_plotting_is_installable_before_the_docs_plot():
    """getting-started plots with matplotlib: a ``plot`` extra exists and is named first."""
    import tomllib

    root = Path(__file__).resolve().parents[1]
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert any(dep.startswith("matplotlib") for dep in extras["plot"])
    text = (root / "docs" / "getting-started.md").read_text()
    assert text.index('pip install -e ".[plot]"') < text.index("import matplotlib")


def test_every_siff_xarray_name_in_the_docs_exists():
    """Names like ``siff_xarray.convert_file`` in README, docs and docstrings resolve."""
    import siff_xarray

    assert callable(siff_xarray.convert_file)  # named in docs, exported from the face
    import importlib
    import re

    root = Path(__file__).resolve().parents[1]
    texts = [root / "README.md", *sorted((root / "docs").glob("*.md")),
             *sorted((root / "siff_xarray").rglob("*.py"))]
    names = set()
    for path in texts:
        names.update(re.findall(r"\bsiff_xarray(?:\.[A-Za-z_][A-Za-z0-9_]*)+",
                                path.read_text(encoding="utf-8")))
    missing = []
    for name in sorted(names):
        parts = name.split(".")
        obj, i = None, len(parts)
        while i > 0:  # the longest importable module, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:i]))
                break
            except ImportError:
                i -= 1
        for attr in parts[i:]:
            obj = getattr(obj, attr, None)
            if obj is None:
                missing.append(name)
                break
    assert not missing, missing


def test_readme_examples_run_without_warnings_or_unacquired_frames(tmp_path, monkeypatch):
    """The README's Python blocks, run as a new user would on the demo file."""
    import re
    import warnings

    from siff_xarray.synthetic import make_demo

    root = Path(__file__).resolve().parents[1]
    blocks = re.findall(r"```python\n(.*?)```", (root / "README.md").read_text(), re.S)
    runnable = [b for b in blocks if "siff-xarray-demo/demo.siff" in b]
    assert len(runnable) >= 2
    (tmp_path / "siff-xarray-demo").mkdir()
    truth = make_demo(tmp_path / "siff-xarray-demo" / "demo.siff")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for block in runnable:
            exec(compile(block, "README.md", "exec"), scope)  # our own docs
    # one value per *acquired* volume: the unfinished 41st is not averaged in as zeros
    assert scope["trace"].sizes["time"] == truth.n_timepoints == scope["ip"].array_shape[0]
    assert (scope["trace"].values > 0.5 * scope["trace"].values.mean()).all()
    # the README calls it what it is: the mean arrival time, offset by the IRF
    assert "lifetime_ns" not in scope
    assert (scope["mean_arrival_ns"] > truth.irf_offset_ns).all()


def test_image_examples_put_row_zero_at_the_top():
    """Every ``plot.imshow`` in the docs, figures and notebooks uses the microscopy
    orientation (``yincrease=False``), as SiffPy's ``plt.imshow`` and napari do."""
    import json
    import re

    root = Path(__file__).resolve().parents[1]
    sources = {p: p.read_text() for p in [root / "README.md", root / "docs" / "figures.py",
                                          *sorted((root / "docs").glob("*.md"))]}
    for nb in sorted((root / "notebooks").glob("*.ipynb")):
        sources[nb] = "\n".join("".join(c["source"]) for c in json.loads(nb.read_text())["cells"])
    calls = 0
    for path, text in sources.items():
        for m in re.finditer(r"\.plot\.imshow\(", text):
            depth, i = 1, m.end()
            while depth and i < len(text):  # the call's arguments, brackets balanced
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                i += 1
            calls += 1
            assert "yincrease=False" in text[m.end(): i], (path.name, text[m.start(): i])
    assert calls >= 5
