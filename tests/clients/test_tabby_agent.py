"""Tabby's real client: the `tabby-agent` npm package (what Tabby's IDE extensions run), configured with the
config.toml the Deploy panel shows, completes a Python file at a cursor with our embedded model's text."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from refact_lab.home import Home
from tests.conftest import RunningServer
from tests.serve.helpers import call, wait_model_ready

AGENT_DIR = Path(__file__).resolve().parents[2] / ".cache" / "tabby-agent"
DRIVER = Path(__file__).with_name("tabby_agent.js")
FILE = "import os\nimport sys\n\n\ndef main(argv):\n    parser = <CURSOR>\n"


@pytest.fixture(scope="module")
def default_server(tmp_path_factory):
    if not (AGENT_DIR / "node_modules" / "tabby-agent").is_dir() or shutil.which("node") is None:
        pytest.fail("tabby-agent is not installed: `make test` installs it (make tabby-agent)")
    srv = RunningServer(tmp_path_factory.mktemp("tabby") / "home", extra_args=["--model", "default"]).wait_ready()
    try:
        wait_model_ready(srv)
        yield srv
    finally:
        srv.stop()


def run_agent(tmp_path, srv, token: str) -> dict:
    from refact_lab.serve.deploy import DeployService

    snippet = DeployService(Home.resolve(srv.home_dir), url=srv.url, token=token).connection({})["tabby"]
    assert snippet.startswith("# ~/.tabby-client/agent/config.toml")
    config = tmp_path / ".tabby-client" / "agent" / "config.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(snippet + "\n")
    out = subprocess.run([shutil.which("node"), str(DRIVER), str(AGENT_DIR), FILE], capture_output=True, text=True,
                         timeout=120, env={"HOME": str(tmp_path), "PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_tabby_agent_completes_with_our_model(default_server, tmp_path):
    result = run_agent(tmp_path, default_server, default_server.token)
    assert result["status"] == "ready"  # the agent checked /v1/health with our token
    choices = result["completion"]["choices"]
    assert choices and choices[0]["text"].strip()
    # the text came from our model: the engine's record of the Tabby request holds it (the agent only trims)
    recent = call(default_server, "GET", "/v1/refact-lab/status")[1]["recent"]
    assert recent and recent[-1]["model"] == "default"
    assert choices[0]["text"].strip() in recent[-1]["text"]


def test_tabby_agent_with_a_wrong_token_is_unauthorized(default_server, tmp_path):
    result = run_agent(tmp_path, default_server, "wrong-token")
    assert result["status"] == "unauthorized" and result["completion"] is None
