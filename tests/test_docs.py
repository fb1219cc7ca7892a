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
