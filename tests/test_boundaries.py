"""Import boundaries: the package and the CLI start without torch; only ui/ touches ipywidgets."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "refact_lab"


def _imported_modules(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print('\\n'.join(sys.modules))"],
                         capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_import_refact_lab_and_cli_do_not_import_torch():
    mods = _imported_modules("import refact_lab, refact_lab.cli, refact_lab.config, refact_lab.home")
    assert "torch" not in mods and "transformers" not in mods and "ipywidgets" not in mods


def test_services_do_not_import_ipywidgets_at_runtime():
    mods = _imported_modules(
        "import refact_lab.data, refact_lab.finetune, refact_lab.serve, refact_lab.models.registry")
    assert "ipywidgets" not in mods and "torch" not in mods


def test_no_module_outside_ui_imports_ipywidgets():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if "ui" in path.relative_to(PACKAGE).parts[:1]:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "ipywidgets" or n.startswith("ipywidgets.") for n in names):
                offenders.append(str(path.relative_to(PACKAGE)))
    assert offenders == []


def test_ui_modules_do_no_file_io_torch_or_subprocess():
    """Panels are views: they call services (STYLE.md point 7)."""
    forbidden = {"torch", "subprocess", "transformers", "shutil"}
    for path in (PACKAGE / "ui").rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(n.split(".")[0] in forbidden for n in names), f"{path.name} imports {names}"
