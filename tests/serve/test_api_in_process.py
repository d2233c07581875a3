"""The inference API in this process (pytest-jupyter's server, our extension, the tiny model), where a test can
hold the model's loading or a tokenizer call and look at the server meanwhile:

- every route the extension registers refuses a request without the right token (one table, built from the
  extension's own handler list, so a new route is covered the day it is added);
- a prompt is tokenized off the event loop: /v1/health answers while a completion is still being encoded;
  a prompt too large for any context is refused by its size, before a tokenizer sees it;
- a request that arrives while the model loads waits for it (up to load_wait_s), and /v1/models lists the
  model being loaded with its state;
- a serving choice settings.json cannot express is an error in the status, not only in the log.

The fixtures are imported from pytest-jupyter into this module (not registered as a plugin), so its autouse
event-loop fixtures stay here; tests drive the async client with `run`.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time

import pytest
from tornado import web

from pytest_jupyter.jupyter_server import *  # noqa: F401,F403  (jp_fetch and the fixtures it needs)
from refact_lab.home import Home
from refact_lab.serve.handlers import handlers

TOKEN_FREE_MESSAGE = "token"


@pytest.fixture
def load_wait_s():
    return 60.0


@pytest.fixture
def lab_home(tmp_path):
    home = Home.resolve(tmp_path / "lab_home").ensure()
    home.update_settings(loop_guard=False)
    return home


@pytest.fixture
def jp_server_config(lab_home, varied_model_dir, load_wait_s):
    return {"ServerApp": {"jpserver_extensions": {"refact_lab": True}},
            "RefactLabExtension": {"home": str(lab_home.root), "model": str(varied_model_dir),
                                   "load_wait_s": load_wait_s, "poll_interval": 0.05}}


@pytest.fixture
def engine(jp_serverapp):
    return jp_serverapp.web_app.settings["refact_lab"]["engine"]


def run(loop, coro):
    return loop.run_until_complete(coro)


async def fetch(jp_fetch, path: str, body=None, method=None, **kwargs):
    """(status, JSON body) for a path like "/v1/models"; errors are returned, not raised."""
    method = method or ("POST" if body is not None else "GET")
    data = body if isinstance(body, (bytes, str)) or body is None else json.dumps(body)
    r = await jp_fetch(path.lstrip("/"), method=method, body=data, raise_error=False, **kwargs)
    try:
        return r.code, json.loads(r.body or b"null")
    except ValueError:
        return r.code, r.body.decode(errors="replace")


async def until(predicate, what: str, timeout: float = 60):
    """Poll (yielding to the event loop) until predicate() is true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def ready(jp_fetch) -> dict:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status, snap = await fetch(jp_fetch, "/v1/refact-lab/status")
        if status == 200 and snap["state"] in ("ready", "failed"):
            assert snap["state"] == "ready", snap
            return snap
        await asyncio.sleep(0.05)
    raise AssertionError("the model did not load")


# ---- auth: one table over every route ------------------------------------------------------------------------

def _route_cases():
    """(path, method) for every route and every method its handler implements."""
    cases = []
    for pattern, cls in handlers():
        path = re.sub(r"\([^)]*\)", "tinycoder", pattern)  # /tokenizer/(.+) -> /tokenizer/tinycoder
        for method in ("get", "post", "put", "delete"):
            if getattr(cls, method) is not getattr(web.RequestHandler, method):
                cases.append((path, method.upper()))
    return cases


ROUTES = _route_cases()


def test_the_table_covers_the_routes_the_issue_names():
    paths = {p for p, _ in ROUTES}
    assert {"/v1/refact-lab/status", "/tokenizer/tinycoder", "/v1/chat/completions", "/v1/events", "/refact-caps",
            "/v1/completions", "/v1/models", "/v1/health"} <= paths


@pytest.mark.parametrize("path,method", ROUTES, ids=[f"{m} {p}" for p, m in ROUTES])
def test_every_route_needs_the_token(jp_fetch, jp_asyncio_loop, path, method):
    body = json.dumps({"prompt": "x", "max_tokens": 1}) if method == "POST" else None

    async def check():
        for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong-token"}):
            status, out = await fetch(jp_fetch, path, body, method, headers=headers)
            assert status in (401, 403), (path, headers, status, out)
            assert isinstance(out, dict) and TOKEN_FREE_MESSAGE in out["error"]["message"], out
            assert "recent" not in out and "choices" not in out  # nothing of the API's content leaks
        # the same request with the token gets past the auth (whatever the route then answers)
        status, _ = await fetch(jp_fetch, path, body, method)
        assert status not in (401, 403), (path, status)

    run(jp_asyncio_loop, check())


# ---- large prompts: sized first, tokenized off the event loop --------------------------------------------------

def test_health_answers_while_a_prompt_is_being_tokenized(jp_fetch, jp_asyncio_loop, engine):
    run(jp_asyncio_loop, ready(jp_fetch))
    entered, release = threading.Event(), threading.Event()
    real = engine.encode

    def slow_encode(text, special=True):
        entered.set()
        # Held until the test has its health answer. Were this on the event loop, nothing else (health included)
        # could be answered until the wait gives up, and the completion would finish first.
        release.wait(20)
        return real(text, special)

    engine.encode = slow_encode

    async def check():
        big = asyncio.ensure_future(fetch(jp_fetch, "/v1/completions",
                                          {"prompt": "value = compute(1)\n" * 20, "max_tokens": 2}))
        await until(lambda: entered.is_set() or big.done(), "the prompt to reach the tokenizer")
        status, health = await fetch(jp_fetch, "/v1/health")
        assert status == 200 and health["status"] == "ok"
        assert not big.done(), "the completion finished before /v1/health was answered"
        release.set()
        status, out = await big
        assert status == 200 and out["choices"][0]["finish_reason"] in ("stop", "length"), out

    try:
        run(jp_asyncio_loop, check())
    finally:
        release.set()


def test_a_huge_prompt_is_refused_by_its_size_before_tokenizing(jp_fetch, jp_asyncio_loop, engine):
    snap = run(jp_asyncio_loop, ready(jp_fetch))
    seen = []
    real_encode, real_fim, real_chat = engine.encode, engine.encode_fim, engine.encode_chat
    engine.encode = lambda text, special=True: seen.append(len(text)) or real_encode(text, special)
    engine.encode_fim = lambda fim, p, s, n=None, **kw: seen.append(len(p) + len(s)) or real_fim(fim, p, s, n, **kw)
    engine.encode_chat = lambda messages: seen.append(sum(len(m["content"]) for m in messages)) or \
        real_chat(messages)
    huge = "x = 1; " * (15 * 2**20 // 7)  # 15 MiB of JSON: under the 16 MiB body limit
    half = huge[:len(huge) // 2]

    async def check():
        for path, body in (("/v1/completions", {"prompt": huge}),
                           ("/v1/completions", {"prompt": huge, "suffix": "\n"}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": huge}]})):
            status, out = await fetch(jp_fetch, path, body)
            assert status == 400, (path, out)
            assert out["error"]["code"] == "context_length_exceeded" and "characters" in out["error"]["message"]
        assert seen == []  # refused before any tokenizer call
        # Tabby sends whole files: what could fit around the cursor is kept, the rest never tokenized
        status, out = await fetch(jp_fetch, "/v1/completions",
                                  {"language": "python", "segments": {"prefix": half + "total = ", "suffix": half}})
        assert status == 200 and isinstance(out["choices"][0]["text"], str), out
        from refact_lab.serve.prepare import char_budget

        assert seen and max(seen) <= 2 * char_budget(snap["n_ctx"]) < len(half)

    run(jp_asyncio_loop, check())


def test_the_clients_context_and_names_are_bounded_before_tokenizing(jp_fetch, jp_asyncio_loop, engine, monkeypatch):
    """Declarations, snippets and file names (Tabby, /infill) count against the same character budget as the
    code around the cursor; a chat role is one of OpenAI's names. None of it reaches a tokenizer whole."""
    import refact_lab.models.prompt as prompt
    from refact_lab.serve.prepare import char_budget

    snap = run(jp_asyncio_loop, ready(jp_fetch))
    seen = []
    real = prompt.content_ids
    monkeypatch.setattr(prompt, "content_ids", lambda tok, text: seen.append(len(text)) or real(tok, text))
    big = "u " * (3 * 2**20)  # 6 MiB (twice in a body: under the 16 MiB limit)
    budget = char_budget(snap["n_ctx"])

    async def check():
        for path, body in (
                ("/v1/completions", {"segments": {"prefix": "def f():\n", "filepath": big,
                                                  "declarations": [{"filepath": "a.py", "body": big}]}}),
                ("/v1/completions", {"segments": {"prefix": "def f():\n", "declarations": [
                    {"filepath": "a.py", "body": "x = 1"}] * 200_000}}),
                ("/infill", {"input_prefix": "def f():\n", "input_extra": [{"filename": big, "text": big}]})):
            started = time.monotonic()
            status, out = await fetch(jp_fetch, path, body, request_timeout=60)
            assert status == 200, (path, out)
            assert seen and max(seen) <= 2 * budget < len(big), path
            assert sum(seen) < 8 * budget, path  # 200,000 declarations: only a context's worth is looked at
            seen.clear()
            assert time.monotonic() - started < 20
        status, out = await fetch(jp_fetch, "/v1/chat/completions",
                                  {"messages": [{"role": big, "content": "x"}], "max_tokens": 2})
        assert status == 400 and "role" in out["error"]["message"] and len(out["error"]["message"]) < 300, out
        status, out = await fetch(jp_fetch, "/v1/chat/completions",
                                  {"messages": [{"role": "developer", "content": "be brief"},
                                                {"role": "user", "content": "hi"}], "max_tokens": 2})
        assert status == 200, out

    run(jp_asyncio_loop, check())


def test_malformed_headers_and_names_get_a_400(jp_fetch, jp_asyncio_loop, engine, jp_serverapp, jp_base_url):
    run(jp_asyncio_loop, ready(jp_fetch))

    async def raw(request: bytes) -> bytes:
        """What the server answers to these exact bytes (HTTP clients fix a bad Content-Length themselves)."""
        reader, writer = await asyncio.open_connection("127.0.0.1", jp_serverapp.port)
        writer.write(request)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 30)
        writer.close()
        return answer

    async def check():
        token = jp_serverapp.identity_provider.token
        path = jp_base_url.rstrip("/") + "/v1/completions"
        answer = await raw(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: token {token}\r\n"
                           "Content-Type: application/json\r\nContent-Length: abc\r\nConnection: close\r\n\r\n{}"
                           .encode())
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400"), answer[:300]
        assert "Content-Length" in json.loads(body)["error"]["message"], body
        status, out = await fetch(jp_fetch, "/v1/refact-lab/export", params={"run": "../x"})
        assert status == 400 and out["error"]["param"] == "run", out
        # and the server goes on answering
        status, out = await fetch(jp_fetch, "/v1/completions", {"prompt": "def f():", "max_tokens": 2})
        assert status == 200, out

    run(jp_asyncio_loop, check())


# ---- requests while the model loads -------------------------------------------------------------------------

@pytest.fixture
def held_loading(monkeypatch):
    """Model loading waits for `release` (set it to let the model load)."""
    import refact_lab.models.loading as loading

    release = threading.Event()
    real = loading.load_model

    def held(*args, **kwargs):
        release.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(loading, "load_model", held)
    yield release
    release.set()


def test_a_request_during_loading_waits_for_the_model(held_loading, jp_fetch, jp_asyncio_loop, engine):
    asked = threading.Event()
    real_is_loading = engine.is_loading

    def is_loading():
        asked.set()
        return real_is_loading()

    engine.is_loading = is_loading

    async def check():
        # /v1/models already names the model, and says it is loading
        def listed():
            return [m for m in engine.served_models()] == [] and engine.loading_model() and \
                engine.loading_model()["name"] == "tinycoder"

        await until(listed, "the model to be loading")
        status, models = await fetch(jp_fetch, "/v1/models")
        assert status == 200 and [(m["id"], m["state"]) for m in models["data"]] == [("tinycoder", "loading")]
        request = asyncio.ensure_future(fetch(jp_fetch, "/v1/completions", {"prompt": "x = ", "max_tokens": 2}))
        await until(lambda: asked.is_set() or request.done(), "the request to reach the handler")
        assert not request.done(), await request  # not a 503 at once: it waits
        held_loading.set()
        status, out = await request
        assert status == 200 and out["model"] == "tinycoder", out
        status, models = await fetch(jp_fetch, "/v1/models")
        assert [(m["id"], m["state"]) for m in models["data"]] == [("tinycoder", "ready")]

    run(jp_asyncio_loop, check())


@pytest.mark.parametrize("load_wait_s", [0.2])
def test_the_wait_for_a_loading_model_is_bounded(held_loading, jp_fetch, jp_asyncio_loop, engine, load_wait_s):
    async def check():
        await until(lambda: engine.state == "loading", "the model to be loading")
        status, out = await fetch(jp_fetch, "/v1/completions", {"prompt": "x = ", "max_tokens": 2})
        assert status == 503 and "loading" in out["error"]["message"], out
        assert engine.state == "loading"  # the answer came while the model was still loading

    run(jp_asyncio_loop, check())


# ---- settings.json errors in the status ---------------------------------------------------------------------

def test_a_bad_serving_choice_shows_in_the_status(jp_fetch, jp_asyncio_loop, lab_home):
    async def check():
        await ready(jp_fetch)
        lab_home.update_settings(lora={"mode": "bestest"}, max_batch=0)

        async def snap():
            return (await fetch(jp_fetch, "/v1/refact-lab/status"))[1]

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            s = await snap()
            if s["lora"]["error"] and s["settings_errors"].get("model"):
                break
            await asyncio.sleep(0.05)
        assert "bestest" in s["lora"]["error"] and "settings.json" in s["lora"]["error"], s["lora"]
        assert "max_batch" in s["settings_errors"]["model"], s["settings_errors"]
        # what was applied stays served
        assert s["state"] == "ready" and s["models"] == ["tinycoder"] and s["lora"]["choice"]["mode"] == "off"
        status, _ = await fetch(jp_fetch, "/v1/completions", {"prompt": "x = ", "max_tokens": 2})
        assert status == 200
        # fixed: the errors go
        lab_home.update_settings(lora="off", max_batch=None)
        while time.monotonic() < deadline and ((s := await snap())["lora"]["error"] or s["settings_errors"]):
            await asyncio.sleep(0.05)
        assert s["lora"]["error"] is None and s["settings_errors"] == {}

    run(jp_asyncio_loop, check())


# ---- export download (the Deploy panel's link) -------------------------------------------------------------

def test_a_checkpoint_downloads_as_a_zip_with_its_adapter_and_card(jp_fetch, jp_asyncio_loop, lab_home,
                                                                 varied_model_dir):
    import io
    import zipfile

    from tests.serve.helpers import make_run

    make_run(lab_home, "run-a", varied_model_dir, [10, 20], [2.0, 1.5], seed=3)

    async def check():
        # the engine loads its model in a thread; leaving before it is done lets that load overlap the next
        # module's model building (transformers' meta-device loading is not confined to its thread)
        await ready(jp_fetch)
        r = await jp_fetch("v1/refact-lab/export", params={"run": "run-a", "checkpoint": "best", "format": "peft"},
                           raise_error=False)
        assert r.code == 200, r.body[:300]
        assert r.headers["Content-Type"] == "application/zip"
        assert "run-a-step-000020-peft.zip" in r.headers["Content-Disposition"]
        names = zipfile.ZipFile(io.BytesIO(r.body)).namelist()
        assert "adapter_config.json" in names and "README.md" in names
        # bad input: a JSON 400 naming what is wrong, nothing half-sent
        status, out = await fetch(jp_fetch, "/v1/refact-lab/export", params={"run": "run-a",
                                                                            "checkpoint": "step-999999"})
        assert status == 400 and "step-999999" in out["error"]["message"], (status, out)
        status, out = await fetch(jp_fetch, "/v1/refact-lab/export")
        assert status == 400 and out["error"]["param"] == "run"

    run(jp_asyncio_loop, check())
