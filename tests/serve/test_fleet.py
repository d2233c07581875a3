"""Several models in one real server: the embedded default model and the tiny test model hosted at once, requests
to both at the same time through the official `openai` client, the hosting list changed while the server runs
(`refact-lab host ...`), a placement the memory plan refuses, and a LoRA deployed onto the model it was trained
from."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from refact_lab.home import Home
from refact_lab.serve import state
from refact_lab.serve.hosting import HostingService
from tests.conftest import RunningServer
from tests.serve.conftest import cut_at_special
from tests.serve.helpers import call, make_run, wait_for

PROMPTS = ["def fib(n):\n    if n < 2:\n        return", "import os\n\nclass Config:", "for i in range(",
           "<|fim_prefix|>def area(r):\n    return <|fim_suffix|>\n\nprint(area(2))\n<|fim_middle|>"]


def hosted(srv) -> dict:
    status, snap = call(srv, "GET", "/v1/refact-lab/status")
    assert status == 200, snap
    return {row["name"]: row for row in snap["hosted"]}


def model_states(srv) -> dict:
    status, body = call(srv, "GET", "/v1/models")
    assert status == 200, body
    return {m["id"]: m.get("state") for m in body["data"]}


def host_cli(srv, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "refact_lab.cli", "host", *args, "--home", str(srv.home_dir),
                           "--url", srv.url, "--token", srv.token], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def two_models(tmp_path_factory, varied_model_dir):
    home_dir = tmp_path_factory.mktemp("fleet") / "home"
    # answers are compared with plain greedy generate: no loop guard, fp32 like the reference
    Home.resolve(home_dir).ensure().update_settings(loop_guard=False)
    srv = RunningServer(home_dir, extra_args=["--model", "default", "--model", str(varied_model_dir),
                                              "--dtype", "fp32"]).wait_ready()
    try:
        wait_for(lambda: all(r["state"] == "ready" for r in hosted(srv).values()), 180, 0.2, "both models ready")
        yield srv
    finally:
        srv.stop()


def test_serve_with_two_models_hosts_both_and_lists_them_everywhere(two_models):
    srv = two_models
    rows = hosted(srv)
    assert list(rows) == ["default", "tinycoder"]
    assert rows["default"]["role"] == "completion" and rows["default"]["source"] == "first"
    assert rows["tinycoder"]["role"] == "none" and rows["tinycoder"]["placement"] == "auto"
    assert rows["tinycoder"]["device"] == "cpu" and rows["tinycoder"]["weights_mb"] > 0
    # the second --model is remembered as the hosting list, the first as the flat model fields
    saved = Home.resolve(srv.home_dir).load_settings()
    assert saved["model"] == "default" and [e["name"] for e in saved["hosted"]] == ["tinycoder"]
    assert model_states(srv) == {"default": "ready", "tinycoder": "ready"}
    status, caps = call(srv, "GET", "/refact-caps")
    assert status == 200 and caps["code_completion_default_model"] == "default"
    assert set(caps["code_completion_models"]) == {"default", "tinycoder"}
    assert {"default", "tinycoder"} <= set(caps["running_models"])
    status, health = call(srv, "GET", "/v1/health")
    assert health["model"] == "default" and health["chat_model"] is None
    assert {m["name"]: m["state"] for m in health["models"]} == {"default": "ready", "tinycoder": "ready"}
    status, tok = call(srv, "GET", "/tokenizer/tinycoder")
    assert status == 200 and "<|fim_prefix|>" in json.dumps(tok)


def test_concurrent_requests_to_both_models_each_answered_by_its_own(two_models, reference):
    from openai import OpenAI

    client = OpenAI(base_url=f"{two_models.url}/v1", api_key=two_models.token, max_retries=0)

    def complete(model, prompt):
        out = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
        return out.model, out.choices[0].text

    alone = {p: complete("default", p)[1] for p in PROMPTS}  # the default model's answers, one at a time
    jobs = [(m, p) for p in PROMPTS for m in ("default", "tinycoder")] * 2
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: complete(*job), jobs))
    for (model, prompt), (served_by, text) in zip(jobs, results):
        assert served_by == model
        if model == "tinycoder":
            assert text == cut_at_special(reference(prompt, 12))
        else:
            assert text == alone[prompt]
    assert any(alone[p] != cut_at_special(reference(p, 12)) for p in PROMPTS)  # two different models answered
    with pytest.raises(Exception, match="unknown model 'nope'; this server hosts default, tinycoder"):
        client.completions.create(model="nope", prompt="x")


def test_host_add_with_the_chat_role_then_remove_it_while_it_streams(two_models, varied_model_dir):
    srv = two_models
    out = host_cli(srv, "add", str(varied_model_dir), "--name", "chatty", "--role", "chat", "--placement", "cpu",
                   "--dtype", "fp32", "--wait")
    assert out.returncode == 0, out.stderr
    assert "chatty: ready" in out.stdout
    assert model_states(srv)["chatty"] == "ready"
    # chat without a model goes to the chat role's model; completions still to the first model
    status, body = call(srv, "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                              "max_tokens": 4})
    assert status == 200 and body["model"] == "chatty"
    status, body = call(srv, "POST", "/v1/completions", {"prompt": "x = ", "max_tokens": 2})
    assert status == 200 and body["model"] == "default"
    status, caps = call(srv, "GET", "/refact-caps")
    assert caps["code_chat_default_model"] == "chatty" and "chatty" in caps["code_chat_models"]
    assert "chatty" not in caps["code_completion_models"] and caps["code_completion_default_model"] == "default"
    listed = host_cli(srv, "list")
    assert listed.returncode == 0 and any(line.startswith("chatty") and "ready" in line and "role=chat" in line
                                          for line in listed.stdout.splitlines()), listed.stdout

    # a long streamed answer is in flight when the entry is removed: it still ends normally on its engine
    req = urllib.request.Request(f"{srv.url}/v1/completions", method="POST", headers={
        **srv.headers, "Content-Type": "application/json"}, data=json.dumps(
        {"model": "chatty", "prompt": "def f(", "max_tokens": 900, "stream": True}).encode())
    with urllib.request.urlopen(req, timeout=120) as r:
        first = r.readline()
        assert first.startswith(b"data: {")
        HostingService(Home.resolve(srv.home_dir)).remove_hosted("chatty")
        rest = r.read().decode()
    events = [line[6:] for line in rest.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and not any('"error"' in e for e in events)
    assert json.loads(events[-2])["choices"][0]["finish_reason"] in ("length", "stop")
    wait_for(lambda: "chatty" not in model_states(srv), 30, 0.1, "chatty gone")
    status, body = call(srv, "POST", "/v1/completions", {"model": "chatty", "prompt": "x", "max_tokens": 2})
    assert status == 404 and "this server hosts default, tinycoder" in body["error"]["message"]
    status, caps = call(srv, "GET", "/refact-caps")
    assert caps["code_chat_default_model"] != "chatty"


def test_the_completion_role_moves_the_default_without_a_reload(two_models):
    srv = two_models
    out = host_cli(srv, "role", "tinycoder", "completion")
    assert out.returncode == 0, out.stderr

    def default_model():
        return call(srv, "GET", "/refact-caps")[1]["code_completion_default_model"]

    wait_for(lambda: default_model() == "tinycoder", 30, 0.1, "tinycoder the completion default")
    assert call(srv, "POST", "/v1/completions", {"prompt": "x = ", "max_tokens": 2})[1]["model"] == "tinycoder"
    assert call(srv, "GET", "/v1/health")[1]["model"] == "tinycoder"
    rows = hosted(srv)
    assert rows["default"]["role"] == "none" and rows["tinycoder"]["role"] == "completion"
    assert rows["tinycoder"]["state"] == "ready"
    assert host_cli(srv, "role", "tinycoder", "none").returncode == 0
    wait_for(lambda: default_model() == "default", 30, 0.1, "the first model the default again")
    assert srv.log().count("hosting tinycoder (") == 1  # the same engine all along: a role is not a reload


def test_unload_frees_a_model_and_load_brings_it_back(two_models):
    srv = two_models
    assert host_cli(srv, "unload", "tinycoder").returncode == 0
    wait_for(lambda: hosted(srv)["tinycoder"]["state"] == "unloaded", 30, 0.1, "tinycoder unloaded")
    assert "tinycoder" not in model_states(srv)
    status, body = call(srv, "POST", "/v1/completions", {"model": "tinycoder", "prompt": "x", "max_tokens": 2})
    assert status == 404
    assert call(srv, "POST", "/v1/completions", {"model": "default", "prompt": "x", "max_tokens": 2})[0] == 200
    assert host_cli(srv, "load", "tinycoder").returncode == 0
    wait_for(lambda: hosted(srv)["tinycoder"]["state"] == "ready", 120, 0.2, "tinycoder ready again")
    assert call(srv, "POST", "/v1/completions", {"model": "tinycoder", "prompt": "x", "max_tokens": 2})[0] == 200


def test_a_placement_that_cannot_fit_is_refused_and_the_others_keep_serving(two_models):
    srv = two_models
    out = host_cli(srv, "add", "default", "--name", "big", "--placement", "gpu:7")
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0
    assert "GPU 7 is not visible" in out.stderr and "Traceback" not in out.stderr
    assert "big" not in json.dumps(Home.resolve(srv.home_dir).load_settings())
    # saved anyway (no check here): the server's own plan refuses it, and says why, before loading anything
    out = host_cli(srv, "add", "default", "--name", "big", "--placement", "gpu:7", "--no-memory-check")
    assert out.returncode == 0, out.stderr
    row = wait_for(lambda: hosted(srv)["big"]["state"] == "failed" and hosted(srv)["big"], 60, 0.1, "big failed")
    assert "GPU 7" in row["error"] or "'gpu:7' needs a CUDA GPU" in row["error"]
    assert model_states(srv)["big"] == "failed"
    assert call(srv, "POST", "/v1/completions", {"model": "tinycoder", "prompt": "x", "max_tokens": 2})[0] == 200
    status, body = call(srv, "POST", "/v1/completions", {"model": "big", "prompt": "x", "max_tokens": 2})
    assert status == 503 and row["error"] in body["error"]["message"]
    assert host_cli(srv, "remove", "big").returncode == 0
    wait_for(lambda: "big" not in hosted(srv), 30, 0.1, "big removed")


def test_bad_host_commands_exit_2_with_one_line(two_models):
    srv = two_models
    for args, message in [(("remove", "default"), "the server's first model"),
                          (("remove", "nope"), "'nope' is not hosted"),
                          (("add", "default", "--placement", "gpu"), "placement: 'gpu' is not"),
                          (("add", "no-such-model"), "unknown model 'no-such-model'"),
                          (("add", "default"), "the name 'default' is already hosted")]:
        out = host_cli(srv, *args)
        assert out.returncode == 2 and message in out.stderr, (args, out.stderr)
        assert out.stderr.strip().count("\n") == 0


def test_a_lora_deploys_onto_the_hosted_model_it_was_trained_from(two_models, varied_model_dir):
    srv = two_models
    home = Home.resolve(srv.home_dir)
    make_run(home, "run-tiny", varied_model_dir, steps=[2], losses=[1.0])
    state.save(home, lora="run-tiny")
    wait_for(lambda: "tinycoder:lora" in model_states(srv), 60, 0.1, "tinycoder:lora served")
    assert "default:lora" not in model_states(srv)
    status, body = call(srv, "POST", "/v1/completions", {"model": "tinycoder:lora", "prompt": "x", "max_tokens": 2})
    assert status == 200 and body["model"] == "tinycoder:lora"
    # the status's LoRA section is that model's: the Deploy panel sees its choice applied
    lora = call(srv, "GET", "/v1/refact-lab/status")[1]["lora"]
    assert lora["model"] == "tinycoder" and lora["applied"] == {"mode": "best", "run_id": "run-tiny",
                                                                "checkpoint": None}
    assert lora["deployed"]["run_id"] == "run-tiny"
    state.save(home, lora="off")
    wait_for(lambda: "tinycoder:lora" not in model_states(srv), 60, 0.1, "LoRA off")
