"""The notebooks in ``notebooks/`` run top to bottom without an error: each is executed in a fresh
``python3`` kernel with nbclient, in a temporary working directory, importing this checkout's
``sparsetrain``. Needs ``nbclient``, ``nbformat`` and ``ipykernel`` (skipped without them). The stored
copies are checked to stay small (no progress bars in their outputs)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
CELL_TIMEOUT = 300  # seconds per cell; the slowest cell (the sweep) takes ~20 s on 2 idle cores


def execute(name: str, tmp_path: Path, monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("ipykernel")
    # the kernel (and the processes it starts) import this checkout, and write temp files under tmp_path
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    work = tmp_path / "cwd"
    work.mkdir()
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=CELL_TIMEOUT, kernel_name="python3", allow_errors=False, resources={"metadata": {"path": str(work)}}
    )
    client.execute()  # raises CellExecutionError, naming the cell, on the first cell that fails
    return nb


def outputs(nb, key: str) -> list[str]:
    """Every output's ``key`` (``"text"`` for streams, a MIME type for rich outputs) as one string each."""
    found = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            value = out.get(key) if key == "text" else out.get("data", {}).get(key)
            if value is not None:
                found.append("".join(value) if isinstance(value, list) else value)
    return found


@pytest.mark.slow  # ~30 s on 2 cores: two short training runs and Lightning's imports
def test_quickstart(tmp_path, monkeypatch):
    nb = execute("quickstart.ipynb", tmp_path, monkeypatch)
    text = "\n".join(outputs(nb, "text"))
    assert text.count("test accuracy:") == 2 and text.count("global") == 2, text
    assert "Epoch" not in text  # no progress bar


@pytest.mark.slow  # ~35 s on 2 cores: a 4-job sweep of sparsetrain-train and sparsetrain-report
def test_sweep_report(tmp_path, monkeypatch):
    nb = execute("sweep_report.ipynb", tmp_path, monkeypatch)
    tables = outputs(nb, "text/markdown")
    assert len(tables) == 1 and "| GMP |" in tables[0] and "| Static |" in tables[0], tables
    assert len(outputs(nb, "image/png")) == 3  # accuracy_vs_sparsity, layer_density, sparsity_schedule
    assert list(tmp_path.glob("sparsetrain-sweep-*/report/results.csv"))  # its temp folder went to TMPDIR


@pytest.mark.parametrize("name", ["quickstart.ipynb", "sweep_report.ipynb"])
def test_stored_notebook_is_small_and_ran(name):
    path = NOTEBOOKS / name
    assert path.stat().st_size < 400_000, f"{name}: {path.stat().st_size} bytes; store it without progress bars"
    nb = json.loads(path.read_text())
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(c.get("execution_count") for c in code), f"{name}: stored without running every cell"
    assert not [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
