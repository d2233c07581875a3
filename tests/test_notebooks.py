"""Every notebook in notebooks/ executes top to bottom (nbclient), so none of them rots."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes(path, home, tmp_path):
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors
    # scratch files go to a temp folder or the state directory, never into the folder the notebook runs in
    # (opened from /lab, that is the checkout)
    assert {p.name for p in tmp_path.iterdir()} <= {"home"}
    # the notebooks display something (the panels), not just run silently
    assert any(c.get("outputs") for c in nb.cells if c.cell_type == "code")
