"""refact-lsp 0.10.14 (PyPI `refact`), the engine inside the Refact IDE plugins, pointed at our server.

It fetches /refact-caps, downloads /tokenizer/<model>, builds the FIM prompt itself and posts it to
/v1/completions. We ask it for a completion at a cursor through its own HTTP API and check that the text is what
our server generated (its request record) and what the model itself generates for that FIM prompt.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.serve.conftest import cut_at_special
from tests.serve.helpers import call


def refact_lsp_binary() -> Path:
    import refact

    path = Path(refact.__file__).parent / "bin" / "refact-lsp"
    if not path.is_file():
        pytest.fail(f"{path} is missing: install the test extras (refact==0.10.14)")
    return path


@pytest.fixture(scope="module")
def lsp(model_server, tmp_path_factory):
    port = free_port()
    home = tmp_path_factory.mktemp("lsp_home")  # its caches and logs stay out of the real home
    log_path = home / "refact-lsp.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [str(refact_lsp_binary()), "--address-url", model_server.url, "--api-key", model_server.token,
         "--http-port", str(port), "--logs-stderr"],
        stdout=log, stderr=subprocess.STDOUT, cwd=home, env={**os.environ, "HOME": str(home)})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{url}/v1/ping", timeout=2).read()
            break
        except (urllib.error.URLError, OSError):
            if proc.poll() is not None:
                raise RuntimeError(f"refact-lsp exited:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.3)
    yield url, log_path
    proc.terminate()
    proc.wait(10)
    log.close()


def code_completion(url: str, source: str, line: int, character: int) -> dict:
    body = {"inputs": {"sources": {"a.py": source}, "cursor": {"file": "a.py", "line": line, "character": character},
                       "multiline": True},
            "parameters": {"max_new_tokens": 16, "temperature": 0.0}, "stream": False}
    req = urllib.request.Request(f"{url}/v1/code-completion", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def test_refact_lsp_completes_with_our_model(lsp, model_server, reference):
    url, log_path = lsp
    before = {r["id"] for r in call(model_server, "GET", "/v1/refact-lab/status")[1]["recent"]}
    source = "import os\n\ndef load(path):\n    with open(path) as f:\n        return f.\n"
    out = code_completion(url, source, line=4, character=17)
    assert out["model"] == "tinycoder", out
    text = out["choices"][0]["code_completion"]

    records = [r for r in call(model_server, "GET", "/v1/refact-lab/status")[1]["recent"] if r["id"] not in before]
    assert len(records) == 1, (records, log_path.read_text()[-3000:])
    record = records[0]
    # refact-lsp built the prompt with our caps' FIM tokens and the tokenizer it downloaded from us
    prefix, suffix = source[:source.index("f.\n") + 2], source[source.index("f.\n") + 2:]
    fim = f"<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>"
    assert record["prompt_tokens"] == len(reference.tokenizer(fim).input_ids)
    expected = cut_at_special(reference(fim, 16)).split("\n\n")[0]  # refact-lsp also stops at a blank line
    assert record["text"] == expected and len(expected) > 3  # a real completion, not an empty one
    # and the IDE gets that text (refact-lsp may only trim trailing whitespace)
    assert text.rstrip() == record["text"].rstrip()
    assert "downloading tokenizer" in log_path.read_text()

