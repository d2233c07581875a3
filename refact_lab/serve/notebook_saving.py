"""Saving the shipped notebooks from `/lab` keeps the checkout clean: their outputs are stripped, like nbstripout.

The server's root is the notebooks folder of the package (the repository's `notebooks/` in a checkout), and
JupyterLab autosaves: without this, running a walk-through writes its outputs (images, widget state, local
paths) into tracked files. `strip_outputs` is a jupyter_server `ContentsManager.pre_save_hook`; the notebook
still shows its outputs in the open tab, only the file on disk is clean. A notebook of the user's own (any
other name or folder) is saved as it is.
"""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def _shipped_names() -> frozenset[str]:
    from refact_lab.serve.server import notebooks_dir

    return frozenset(p.name for p in notebooks_dir().glob("*.ipynb"))


def is_shipped(path: str | None) -> bool:
    """Whether a contents path ("deploy.ipynb", "/deploy.ipynb") names one of the package's notebooks."""
    path = (path or "").strip("/")
    return "/" not in path and path in _shipped_names()


def strip_outputs(model: dict, path: str | None = None, **kwargs) -> None:
    """Drop outputs, execution counts and saved widget state from a shipped notebook before it is written."""
    if model.get("type") != "notebook" or not isinstance(model.get("content"), dict) or not is_shipped(path):
        return
    nb = model["content"]
    for cell in nb.get("cells") or []:
        if cell.get("cell_type") == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
    (nb.get("metadata") or {}).pop("widgets", None)
