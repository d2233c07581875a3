"""Deploying LoRA checkpoints on the running server without a restart.

Real peft adapters in the runs layout; the choice is written to settings.json exactly as the Deploy panel does
(through Home.update_settings) and the server picks it up: the served model list and caps change, caps_version
moves, completions for "<base>:lora" are what the base model plus that adapter generate, and a request that was
running when the choice changed finishes on the adapter it started with.
"""

from __future__ import annotations

import http.client
import json
import time

import pytest

from refact_lab.home import Home
from tests.conftest import RunningServer
from tests.serve.conftest import cut_at_special
from tests.serve.helpers import call, make_run, wait_for, wait_model_ready

PROMPT = "def parse(line):\n    return"


@pytest.fixture(scope="module")
def lora_server(tmp_path_factory, varied_model_dir):
    home_dir = tmp_path_factory.mktemp("lora_server") / "home"
    home = Home.resolve(home_dir).ensure()
    home.update_settings(loop_guard=False)  # outputs are compared with plain greedy generate
    old = make_run(home, "run-a", varied_model_dir, [10, 20], [2.5, 2.0], seed=1, created_at=1000)
    new = make_run(home, "run-b", varied_model_dir, [5, 10, 15], [3.0, 1.5, 1.8], seed=2, created_at=2000)
    srv = RunningServer(home_dir, extra_args=["--model", str(varied_model_dir), "--dtype", "fp32"]).wait_ready()
    srv.home = home
    srv.checkpoints = {"run-a": old, "run-b": new}
    try:
        wait_model_ready(srv)
        yield srv
    finally:
        srv.stop()


def lora_reference(model_dir, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from refact_lab.models.loading import MODEL_LOADING

    with MODEL_LOADING:  # the server's engine may be loading in this process too
        base = AutoModelForCausalLM.from_pretrained(model_dir)
        return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def deploy(srv, lora) -> dict:
    """Write the choice the way the Deploy service does, then wait until the engine reports it applied."""
    srv.home.update_settings(lora=lora)

    def applied():
        snap = call(srv, "GET", "/v1/refact-lab/status")[1]
        wanted = {"mode": "off", "run_id": None, "checkpoint": None, **lora}
        return snap if snap["lora"]["choice"] == wanted and snap["lora"]["applied"] == wanted else None

    return wait_for(applied, timeout=20, what=f"lora {lora} applied")


def caps(srv):
    return call(srv, "GET", "/refact-caps")[1]


def test_switching_checkpoints_changes_models_caps_and_output(lora_server, reference, varied_model_dir):
    srv = lora_server
    start = caps(srv)
    assert start["running_models"] == ["tinycoder"]

    snap = deploy(srv, {"mode": "best"})
    # best of the latest run (run-b, lowest test loss at step 10)
    assert snap["lora"]["deployed"]["run_id"] == "run-b" and snap["lora"]["deployed"]["checkpoint"] == "step-000010"
    best = caps(srv)
    assert best["caps_version"] > start["caps_version"]
    assert best["running_models"] == ["tinycoder", "tinycoder:lora"]
    assert best["code_completion_default_model"] == "tinycoder:lora"
    models = call(srv, "GET", "/v1/models")[1]["data"]
    assert [m["id"] for m in models] == ["tinycoder", "tinycoder:lora"]
    assert models[1]["lora"] == {"run_id": "run-b", "checkpoint": "step-000010"}

    status, out = call(srv, "POST", "/v1/completions", {"model": "tinycoder:lora", "prompt": PROMPT, "max_tokens": 12})
    assert status == 200, out
    tuned = lora_reference(varied_model_dir, srv.checkpoints["run-b"][1])
    assert out["choices"][0]["text"] == cut_at_special(reference(PROMPT, 12, model_override=tuned))
    base_out = call(srv, "POST", "/v1/completions", {"model": "tinycoder", "prompt": PROMPT, "max_tokens": 12})[1]
    assert base_out["choices"][0]["text"] == cut_at_special(reference(PROMPT, 12))
    assert base_out["choices"][0]["text"] != out["choices"][0]["text"]

    snap = deploy(srv, {"mode": "latest"})
    assert snap["lora"]["deployed"]["checkpoint"] == "step-000015"
    latest = caps(srv)
    assert latest["caps_version"] > best["caps_version"]

    snap = deploy(srv, {"mode": "checkpoint", "run_id": "run-a", "checkpoint": "step-000010"})
    assert snap["lora"]["deployed"] == {"run_id": "run-a", "checkpoint": "step-000010",
                                        "path": str(srv.checkpoints["run-a"][0])}
    models = call(srv, "GET", "/v1/models")[1]["data"]
    assert models[1]["lora"] == {"run_id": "run-a", "checkpoint": "step-000010"}

    deploy(srv, {"mode": "off"})
    off = caps(srv)
    assert off["running_models"] == ["tinycoder"] and off["caps_version"] > latest["caps_version"]
    status, err = call(srv, "POST", "/v1/completions", {"model": "tinycoder:lora", "prompt": PROMPT})
    assert status == 404 and "tinycoder:lora" in err["error"]["message"]


def test_a_missing_checkpoint_is_reported_not_served(lora_server):
    snap = deploy(lora_server, {"mode": "checkpoint", "run_id": "run-a", "checkpoint": "step-000099"})
    assert snap["lora"]["deployed"] is None
    assert "step-000099" in snap["lora"]["error"] and "step-000010, step-000020" in snap["lora"]["error"]
    assert caps(lora_server)["running_models"] == ["tinycoder"]
    deploy(lora_server, {"mode": "off"})


def test_in_flight_request_finishes_on_the_adapter_it_started_with(lora_server, reference, varied_model_dir):
    srv = lora_server
    deploy(srv, {"mode": "checkpoint", "run_id": "run-b", "checkpoint": "step-000005"})
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=120)
    conn.request("POST", "/v1/completions", json.dumps({"model": "tinycoder:lora", "prompt": PROMPT,
                                                        "max_tokens": 300, "stream": True}),
                 {**srv.headers, "Content-Type": "application/json"})
    resp = conn.getresponse()
    first = resp.readline()
    assert first.startswith(b"data: "), first
    # switch while it streams; the request was pinned to step-000005 when it was admitted
    deploy(srv, {"mode": "checkpoint", "run_id": "run-a", "checkpoint": "step-000020"})
    switched_at = time.time()
    rest = first + resp.read()
    conn.close()
    events = [json.loads(line[6:]) for line in rest.decode().split("\n\n") if line.startswith("data: {")]
    text = "".join(e["choices"][0]["text"] for e in events)
    record = next(r for r in call(srv, "GET", "/v1/refact-lab/status")[1]["recent"] if r["text"] == text)
    assert record["adapter"] == "run-b/step-000005"
    assert record["time"] > switched_at, "the request ended before the switch; it proves nothing"
    tuned = lora_reference(varied_model_dir, srv.checkpoints["run-b"][0])
    assert text == cut_at_special(reference(PROMPT, 300, model_override=tuned))
    # new requests use the new checkpoint
    out = call(srv, "POST", "/v1/completions", {"model": "tinycoder:lora", "prompt": PROMPT, "max_tokens": 4})[1]
    assert out["choices"][0]["finish_reason"]
    assert call(srv, "GET", "/v1/refact-lab/status")[1]["recent"][-1]["adapter"] == "run-a/step-000020"
    deploy(srv, {"mode": "off"})
    time.sleep(0.1)
