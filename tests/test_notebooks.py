"""The example notebooks run top to bottom (nbclient, a real kernel) on a sample of MovieLens 100K,
so they never rot; each notebook asserts the claims it makes (e.g. the best model beats popularity
with p < 0.05)."""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A fresh data directory whose cache is the checkout's (MovieLens 100K is fetched once)."""
    from freshrec.data import datasets
    from freshrec.settings import PROJECT_ROOT

    cache = PROJECT_ROOT / "data" / "cache"
    datasets._recbole_wheel(cache)
    d = tmp_path_factory.mktemp("nb-data")
    (d / "cache").symlink_to(cache, target_is_directory=True)
    return d


@pytest.mark.parametrize("name", ["quickstart", "add_a_model"])
def test_notebook_runs(name, data_dir, monkeypatch):
    monkeypatch.setenv("FRESHREC_DATA_DIR", str(data_dir))
    monkeypatch.setenv("FRESHREC_NB_USERS", "300")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    nb = nbformat.read(ROOT / "examples" / f"{name}.ipynb", as_version=4)
    client = NotebookClient(nb, timeout=180, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}})
    client.execute()  # raises CellExecutionError naming the cell on any error or failed assert
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
               for o in outputs), "the plot cell shows a figure"
