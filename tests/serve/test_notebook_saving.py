"""The shipped notebooks saved through jupyter_server (what `/lab` autosaves) are written without outputs;
a user's own notebook keeps them."""

from __future__ import annotations

import json

import nbformat
from jupyter_server.services.contents.filemanager import FileContentsManager

from refact_lab.serve.notebook_saving import strip_outputs
from refact_lab.serve.server import notebooks_dir


def _notebook_with_outputs():
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("print('hi')", execution_count=3,
                                     outputs=[nbformat.v4.new_output("stream", text="hi\n")])
    nb.cells = [nbformat.v4.new_markdown_cell("# title"), cell]
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    return nb


def test_a_saved_walkthrough_keeps_its_code_and_loses_its_outputs(tmp_path):
    shipped = sorted(p.name for p in notebooks_dir().glob("*.ipynb"))
    assert "deploy.ipynb" in shipped
    manager = FileContentsManager(root_dir=str(tmp_path), pre_save_hook=strip_outputs)
    manager.save({"type": "notebook", "format": "json", "content": _notebook_with_outputs()}, "deploy.ipynb")
    saved = json.loads((tmp_path / "deploy.ipynb").read_text())
    code = saved["cells"][1]
    assert "".join(code["source"]) == "print('hi')" and code["outputs"] == [] and code["execution_count"] is None
    assert "".join(saved["cells"][0]["source"]) == "# title" and "widgets" not in saved["metadata"]
    # other files are saved unchanged
    manager.save({"type": "file", "format": "text", "content": "out: 1\n"}, "notes.txt")
    assert (tmp_path / "notes.txt").read_text() == "out: 1\n"


def test_a_users_own_notebook_keeps_its_outputs(tmp_path):
    manager = FileContentsManager(root_dir=str(tmp_path), pre_save_hook=strip_outputs)
    (tmp_path / "mine").mkdir()
    for path in ("mine.ipynb", "mine/deploy.ipynb"):
        manager.save({"type": "notebook", "format": "json", "content": _notebook_with_outputs()}, path)
        saved = json.loads((tmp_path / path).read_text())
        assert "".join(saved["cells"][1]["outputs"][0]["text"]) == "hi\n", path
