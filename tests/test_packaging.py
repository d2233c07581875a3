"""Packaging: dependencies, the console script, the torch pin, the Dockerfile lint and Binder files."""

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_pyproject_declares_dependencies_and_script():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    deps = " ".join(data["project"]["dependencies"]).lower()
    for name in ("jupyterlab", "ipywidgets", "voila", "torch>=", "transformers", "peft", "accelerate",
                 "matplotlib", "gitpython", "tornado"):
        assert name in deps, name
    assert data["project"]["scripts"]["refact-lab"] == "refact_lab.cli:main"
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text()


def test_layout():
    for path in ("refact_lab", "notebooks", "tests", "binder", "bench", "Dockerfile", "pyproject.toml",
                 "Makefile", ".ci/run", "README.md", "notebooks/workbench.ipynb"):
        assert (ROOT / path).exists(), path


def test_readme_opens_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    commands = [line.strip() for line in text.split("```")[1].splitlines() if line.strip()]
    assert commands == ["make run", "make test"]
    assert "make test" in (ROOT / ".ci/run").read_text()


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    out = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    text = (ROOT / "Dockerfile").read_text()
    assert "nvidia/cuda" in text and "EXPOSE 8008" in text and "VOLUME" in text
    assert '"serve", "--host", "0.0.0.0"' in text


def test_binder_installs_package_and_opens_workbench():
    assert (ROOT / "binder/requirements.txt").read_text().count("torch") >= 1
    post = (ROOT / "binder/postBuild").read_text()
    assert "pip install" in post and "workbench.ipynb" in post
    assert subprocess.run(["bash", "-n", str(ROOT / "binder/postBuild")]).returncode == 0
