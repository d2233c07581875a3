"""Repository context in served completions (pytest-jupyter's server, our extension, the embedded default model,
whose tokenizer has the repository-layout tokens): a Tabby request without snippets gets the definition from
another file of the scanned project, never the file being edited; the client's own snippets come first; the
Deploy choice "off" turns it off; Tabby's debug_options.return_prompt shows the prompt."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from pytest_jupyter.jupyter_server import *  # noqa: F401,F403  (jp_fetch and the fixtures it needs)
from refact_lab.home import DEFAULT_PROJECT, Home
from refact_lab.serve import state
from tests.data.conftest import scan_folder

RATES = '''"""Exchange rates of the kestrel desk."""

KESTREL_RATE = 1.37


def convert_with_kestrel_rate(amount):
    """Amount in kestrel units."""
    return amount * KESTREL_RATE
'''
MAIN_ON_DISK = '''from rates import *

STALE_VERSION_MARKER = "only in the scanned copy of main.py"


def price(amount):
    total = amount + 1
    return convert_with_kestrel_rate(total)
'''
PREFIX = "from rates import *\n\n\ndef price(amount):\n    total = amount + 1\n    return convert_with_"
SUFFIX = "\n"


@pytest.fixture
def lab_home(tmp_path):
    home = Home.resolve(tmp_path / "lab_home").ensure()
    home.update_settings(loop_guard=False)
    project = tmp_path / "shop"
    project.mkdir()
    (project / "rates.py").write_text(RATES)
    (project / "main.py").write_text(MAIN_ON_DISK)
    (project / "notes.py").write_text("# nothing about rates here\nVALUE = 3\n")
    _, _, stats = scan_folder(home, project)
    assert stats["index"]["files"] == 3
    # the embedded model's "auto" is off (it was not trained on repository context): choose the project
    state.save(home, context=DEFAULT_PROJECT)
    return home


@pytest.fixture
def jp_server_config(lab_home):
    return {"ServerApp": {"jpserver_extensions": {"refact_lab": True}},
            "RefactLabExtension": {"home": str(lab_home.root), "model": "default", "load_wait_s": 60.0,
                                   "poll_interval": 0.05}}


async def fetch(jp_fetch, path: str, body):
    r = await jp_fetch(path.lstrip("/"), method="POST", body=json.dumps(body), raise_error=False)
    return r.code, json.loads(r.body)


async def tabby(jp_fetch, **segments):
    body = {"language": "python", "segments": {"prefix": PREFIX, "suffix": SUFFIX, **segments},
            "max_tokens": 4, "debug_options": {"return_prompt": True}}
    # the first request may arrive while the model loads (it waits load_wait_s, then 503)
    status, out = await post_when_ready(jp_fetch, "/v1/completions", body)
    assert status == 200, out
    assert isinstance(out["choices"][0]["text"], str)
    return out["debug_data"]["prompt"]


def test_tabby_gets_the_definition_from_another_file(jp_fetch, jp_asyncio_loop, lab_home):
    prompt = jp_asyncio_loop.run_until_complete(tabby(jp_fetch, filepath="main.py"))
    assert prompt.startswith("<|repo_name|>")
    assert "<|file_sep|>rates.py\n" in prompt and "def convert_with_kestrel_rate(amount):" in prompt
    assert "STALE_VERSION_MARKER" not in prompt   # the file being edited is never its own context
    assert prompt.endswith("<|file_sep|>main.py\n<|fim_prefix|>" + PREFIX + "<|fim_suffix|>" + SUFFIX
                           + "<|fim_middle|>")


def test_client_snippets_come_first_and_off_turns_retrieval_off(jp_fetch, jp_asyncio_loop, lab_home, jp_serverapp):
    declared = {"filepath": "decl.py", "body": "def convert_with_decl(x):\n    return x\n"}
    prompt = jp_asyncio_loop.run_until_complete(tabby(jp_fetch, filepath="/abs/checkout/main.py",
                                                      declarations=[declared]))
    assert prompt.index("<|file_sep|>decl.py\n") < prompt.index("<|file_sep|>rates.py\n")
    assert "STALE_VERSION_MARKER" not in prompt

    state.save(lab_home, context="off")
    engine = jp_serverapp.web_app.settings["refact_lab"]["engine"]
    deadline = time.monotonic() + 30
    while engine.choice.context != "off":   # the engine re-reads settings.json between steps
        assert time.monotonic() < deadline, "the engine did not apply context: off"
        time.sleep(0.02)
    off = jp_asyncio_loop.run_until_complete(tabby(jp_fetch, filepath="main.py", declarations=[declared]))
    assert off == "<|fim_prefix|>" + PREFIX + "<|fim_suffix|>" + SUFFIX + "<|fim_middle|>"


def test_bad_client_context_is_a_400(jp_fetch, jp_asyncio_loop):
    body = {"segments": {"prefix": "x", "declarations": [{"filepath": "a.py"}]}}
    status, out = jp_asyncio_loop.run_until_complete(fetch(jp_fetch, "/v1/completions", body))
    assert status == 400 and "declarations[0]" in out["error"]["message"]


@pytest.fixture
def prompts(jp_serverapp):
    """The FIM prompts the server builds, as text (for routes that have no return_prompt option)."""
    engine = jp_serverapp.web_app.settings["refact_lab"]["engine"]
    seen = []
    real = engine.encode_fim

    def spy(*args, **kwargs):
        ids = real(*args, **kwargs)
        seen.append(engine.decode_prompt(ids))
        return ids

    engine.encode_fim = spy
    return seen


async def post_when_ready(jp_fetch, path, body):
    deadline = time.monotonic() + 120
    while True:
        status, out = await fetch(jp_fetch, path, body)
        if status != 503 or time.monotonic() > deadline:
            return status, out
        await asyncio.sleep(0.1)


def test_openai_suffix_request_gets_context_but_not_its_own_file(jp_fetch, jp_asyncio_loop, prompts):
    body = {"prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 4, "temperature": 0}
    status, out = jp_asyncio_loop.run_until_complete(post_when_ready(jp_fetch, "/v1/completions", body))
    assert status == 200, out
    # no file name comes with it: main.py is recognised by the lines above the cursor
    assert "<|file_sep|>rates.py\n" in prompts[-1] and "STALE_VERSION_MARKER" not in prompts[-1]
    # a prompt the client laid out itself (no suffix: refact-lsp, Continue) is left as sent
    status, out = jp_asyncio_loop.run_until_complete(post_when_ready(
        jp_fetch, "/v1/completions", {"prompt": "<|fim_prefix|>" + PREFIX + "<|fim_suffix|>\n<|fim_middle|>",
                                      "max_tokens": 2}))
    assert status == 200 and len(prompts) == 1


def test_infill_uses_input_extra_and_streams_like_llama_cpp(jp_fetch, jp_asyncio_loop, prompts):
    extra = [{"filename": "helpers/units.py", "text": "def convert_with_units(x):\n    return x\n"}]
    body = {"input_prefix": PREFIX, "input_suffix": SUFFIX, "input_extra": extra, "n_predict": 6}

    async def check():
        status, out = await post_when_ready(jp_fetch, "/infill", body)
        assert status == 200, out
        assert out["stop"] is True and isinstance(out["content"], str) and out["tokens_predicted"] <= 6
        assert out["tokens_evaluated"] > 0
        prompt = prompts[-1]
        assert "<|file_sep|>helpers/units.py\ndef convert_with_units(x):" in prompt
        # the client's file comes before the retrieved one, and the scanned main.py (recognised by the lines
        # above the cursor: /infill names no file) is not there
        assert prompt.index("helpers/units.py") < prompt.index("<|file_sep|>rates.py")
        assert "STALE_VERSION_MARKER" not in prompt

        r = await jp_fetch("infill", method="POST", body=json.dumps({**body, "stream": True}))
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events = [json.loads(line[len("data: "):]) for line in r.body.decode().split("\n\n") if line]
        assert all(e["stop"] is False for e in events[:-1]) and events[-1]["stop"] is True
        assert "".join(e["content"] for e in events) == out["content"]   # greedy: the same completion

        status, bad = await fetch(jp_fetch, "/infill", {"input_prefix": "x", "input_extra": [{"text": 3}]})
        assert status == 400 and "input_extra[0]" in bad["error"]["message"]

    jp_asyncio_loop.run_until_complete(check())


def test_openai_return_prompt_names_the_snippets_it_used(jp_fetch, jp_asyncio_loop):
    body = {"prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 4, "temperature": 0,
            "debug_options": {"return_prompt": True}}
    status, out = jp_asyncio_loop.run_until_complete(post_when_ready(jp_fetch, "/v1/completions", body))
    assert status == 200, out
    debug = out["debug_data"]
    assert [s["path"] for s in debug["snippets"]][0] == "rates.py"
    assert "def convert_with_kestrel_rate" in debug["snippets"][0]["text"]
    assert "<|file_sep|>rates.py\n" in debug["prompt"] and debug["prompt"].endswith("<|fim_middle|>")
    plain = {k: v for k, v in body.items() if k != "debug_options"}
    status, out = jp_asyncio_loop.run_until_complete(post_when_ready(jp_fetch, "/v1/completions", plain))
    assert status == 200 and "debug_data" not in out
    status, out = jp_asyncio_loop.run_until_complete(fetch(jp_fetch, "/v1/completions",
                                                           {**body, "debug_options": "yes"}))
    assert status == 400 and "debug_options" in out["error"]["message"]


def test_the_playground_shows_the_snippets_its_completion_used(lab_home):
    from refact_lab.serve.client import LocalInference
    from refact_lab.serve.deploy import DeployService
    from refact_lab.ui.deploy_panel import DeployPanel

    inference = LocalInference(lab_home)
    try:
        panel = DeployPanel(DeployService(lab_home, inference=inference))
        panel.prefix.value, panel.suffix.value, panel.max_tokens.value = PREFIX, SUFFIX, 4
        out = panel.complete()
        assert out is not None, panel.base_out.value
        assert out["snippets"][0]["path"] == "rates.py"
        n = len(out["snippets"])
        assert "rates.py" in panel.snippets_out.value and f": {n} snippet" in panel.snippets_out.value
        assert "convert_with_kestrel_rate" in panel.snippets_out.value

        state.save(lab_home, context="off")
        inference.engine.wait_ready(60)
        deadline = time.monotonic() + 30
        while inference.engine.choice.context != "off":
            assert time.monotonic() < deadline, "the engine did not apply context: off"
            time.sleep(0.05)
        panel.complete()
        assert "none in this prompt" in panel.snippets_out.value
    finally:
        inference.stop()


def test_auto_context_is_off_for_the_embedded_model(jp_fetch, jp_asyncio_loop, lab_home, jp_serverapp):
    state.save(lab_home, context=None)   # auto: the deployed run's project, for models that use context
    engine = jp_serverapp.web_app.settings["refact_lab"]["engine"]
    deadline = time.monotonic() + 30
    while engine.choice.context is not None:
        assert time.monotonic() < deadline, "the engine did not apply context: auto"
        time.sleep(0.02)
    prompt = jp_asyncio_loop.run_until_complete(tabby(jp_fetch, filepath="main.py"))
    assert prompt == "<|fim_prefix|>" + PREFIX + "<|fim_suffix|>" + SUFFIX + "<|fim_middle|>"
