"""The Model hosting and Deploy panels without a browser: set widget values, click, check the services' effect.

The panels drive an engine in this process (LocalInference, as in a notebook without a server) serving a tiny
model, and real LoRA checkpoints in the runs layout; what the panels show comes from that engine.
"""

from __future__ import annotations

import pytest

from refact_lab.serve.client import LocalInference
from refact_lab.serve.deploy import DeployService
from refact_lab.serve.hosting import HostingService
from refact_lab.ui.deploy_panel import DeployPanel
from refact_lab.ui.hosting_panel import OTHER, HostingPanel
from tests.serve.helpers import build_varied_model, make_run, wait_for


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_varied_model(tmp_path_factory.mktemp("panel_model") / "tinycoder")


@pytest.fixture
def inference(home):
    inf = LocalInference(home)
    yield inf
    inf.stop()


def test_hosting_panel_loads_a_local_folder_and_shows_state(home, model_dir, inference):
    panel = HostingPanel(HostingService(home, inference), poll_s=0.05)
    assert "small demo model" in panel.widget.children[0].value  # the honest note about the default model
    assert "stopped" in panel.state.value  # nothing loaded yet in this process
    panel.model.value = OTHER
    panel.custom.value = str(model_dir)
    panel.device.value = "cpu"
    panel.load_button.click()
    assert home.load_settings()["model"] == str(model_dir) and home.load_settings()["device"] == "cpu"
    wait_for(lambda: "ready" in panel.state.value, timeout=60, what="ready shown in the panel")
    assert "tinycoder" in panel.state.value and "weights" in panel.state.value and "cpu" in panel.state.value


def test_hosting_panel_reports_a_bad_choice_and_a_failed_load(home, model_dir, inference):
    panel = HostingPanel(HostingService(home, inference), poll_s=0.05)
    panel.model.value = OTHER
    panel.custom.value = "no-such-model"
    panel.load_button.click()
    assert "unknown model" in panel.message.value and "no-such-model" in panel.message.value
    assert "model" not in home.load_settings()
    # cuda on a machine without a GPU: saved, then the engine fails with the reason
    panel.custom.value = str(model_dir)
    panel.device.value = "cuda"
    panel.load_button.click()
    wait_for(lambda: "failed" in panel.state.value, timeout=60, what="failed shown")
    assert "needs a CUDA GPU" in panel.state.value


@pytest.fixture
def models_endpoint(monkeypatch):
    """A real HTTP server standing in for OpenAI's `GET /v1/models`: 200 for GOOD_KEY, 401 for any other key.
    The service's default OpenAI URL points at it; `requests` counts the calls."""
    import http.server
    import json
    import threading

    requests = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append((self.path, self.headers.get("Authorization")))
            ok = self.path == "/v1/models" and self.headers.get("Authorization") == f"Bearer {GOOD_KEY}"
            body = json.dumps({"data": [{"id": "gpt-4o"}, {"id": "gpt-4o-mini"}]} if ok else
                              {"error": {"message": "Incorrect API key"}}).encode()
            self.send_response(200 if ok else 401)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    monkeypatch.setattr("refact_lab.serve.upstream.DEFAULT_OPENAI_URL", f"http://127.0.0.1:{srv.server_port}/v1")
    yield requests
    srv.shutdown()


GOOD_KEY = "sk-proj-good0123456789abcd"


def test_hosting_panel_checks_the_openai_key_shows_it_stored_and_removes_it(home, inference, models_endpoint):
    panel = HostingPanel(HostingService(home, inference))
    assert "No OpenAI key stored" in panel.key_state.value and panel.remove_key_button.layout.display == "none"
    # malformed: refused before any request, nothing saved
    for bad in ("hello world", "sk-short", "pk-0123456789abcdefghijkl"):
        panel.openai_key.value = bad
        panel.save_upstream_button.click()
        assert "does not look like" in panel.message.value, bad
    assert models_endpoint == [] and "openai_api_key" not in home.load_settings()
    # well-formed but refused by the models list: not saved
    panel.openai_key.value = "sk-proj-wrong0123456789abcd"
    panel.save_upstream_button.click()
    assert "Not saved" in panel.message.value and "refused the key (HTTP 401)" in panel.message.value
    assert "openai_api_key" not in home.load_settings()
    # accepted: saved, the field cleared, and the panel says a key is stored, masked, with a Remove button
    panel.openai_key.value = GOOD_KEY
    panel.save_upstream_button.click()
    assert "accepted (2 models)" in panel.message.value
    assert home.load_settings()["openai_api_key"] == GOOD_KEY and panel.openai_key.value == ""
    assert "A key is stored" in panel.key_state.value and "sk-...abcd" in panel.key_state.value
    assert GOOD_KEY not in panel.key_state.value and panel.remove_key_button.layout.display == ""
    assert (home.settings_file.stat().st_mode & 0o777) == 0o600
    assert "sk-...abcd" in HostingPanel(HostingService(home, inference)).key_state.value  # after a reload too
    panel.remove_key_button.click()
    assert home.load_settings().get("openai_api_key") is None and "No OpenAI key stored" in panel.key_state.value
    panel.upstream_url.value = "not a url"
    panel.save_upstream_button.click()
    assert "not an http(s) URL" in panel.message.value


def test_hosting_panel_saves_a_key_it_could_not_check_and_says_why(home, inference, monkeypatch):
    from tests.conftest import free_port

    monkeypatch.setattr("refact_lab.serve.upstream.DEFAULT_OPENAI_URL", f"http://127.0.0.1:{free_port()}/v1")
    panel = HostingPanel(HostingService(home, inference))
    panel.openai_key.value = GOOD_KEY
    panel.save_upstream_button.click()
    assert "could not check" in panel.message.value and "refused" in panel.message.value.lower()
    assert home.load_settings()["openai_api_key"] == GOOD_KEY and "A key is stored" in panel.key_state.value


def test_hosting_panel_loop_guard_checkbox_saves_the_setting_and_keeps_the_batch_size(home, model_dir, inference):
    home.update_settings(max_batch=4)
    service = HostingService(home, inference)
    panel = HostingPanel(service)
    assert panel.loop_guard.value is True  # on by default
    panel.loop_guard.value = False
    assert home.load_settings()["loop_guard"] is False and service.current()["loop_guard"] is False
    assert HostingPanel(service).loop_guard.value is False  # a reload shows what is saved
    service.choose(str(model_dir))  # choosing a model does not reset a batch size set elsewhere (CLI)
    assert home.load_settings()["max_batch"] == 4


def test_deploy_panel_switches_checkpoints_and_compares_in_the_playground(home, model_dir, inference):
    make_run(home, "run-a", model_dir, [10, 20], [2.0, 2.5], seed=3, created_at=1000)
    make_run(home, "run-b", model_dir, [5, 10], [1.9, 1.7], seed=4, created_at=2000)
    home.update_settings(model=str(model_dir), device="cpu")
    inference.start().wait_ready(60)
    panel = DeployPanel(DeployService(home, inference, url="http://127.0.0.1:8008", token="tok-123"), poll_s=0.05)
    assert [v for _, v in panel.run.options] == ["run-b", "run-a"]  # newest first
    assert "off" in panel.state.value and panel.run.disabled

    panel.mode.value = "best"
    panel.deploy_button.click()
    assert home.load_settings()["lora"] == {"mode": "best", "run_id": None, "checkpoint": None}
    wait_for(lambda: "run-b/step-000010" in panel.state.value, timeout=30, what="best of run-b deployed")

    panel.mode.value = "checkpoint"
    assert not panel.run.disabled
    panel.run.value = "run-a"
    assert [v for _, v in panel.checkpoint.options] == ["step-000010", "step-000020"]
    assert "★ best" in panel.checkpoint.options[0][0]
    panel.checkpoint.value = "step-000020"
    panel.deploy_button.click()
    wait_for(lambda: "run-a/step-000020" in panel.state.value, timeout=30, what="run-a/step-000020 deployed")

    panel.prefix.value, panel.suffix.value, panel.max_tokens.value = "def add(a, b):\n    return", "\n", 8
    out = panel.complete()
    assert out["base_model"] == "tinycoder" and out["lora_model"] == "tinycoder:lora"
    assert out["base"] != out["lora"]  # the adapter changes what the model writes
    expected_base = inference.complete("def add(a, b):\n    return", "\n", model="tinycoder", max_tokens=8)["text"]
    assert out["base"] == expected_base
    assert panel.lora_out.value.count("<pre") == 1 and "refact-lab-playground-lora" in panel.lora_out.value

    panel.mode.value = "off"
    panel.deploy_button.click()
    wait_for(lambda: "<code class='refact-lab-deployed'>off</code>" in panel.state.value, timeout=30,
             what="LoRA off")
    assert panel.complete()["lora"] is None


def test_deploy_panel_shows_connection_settings(home, model_dir, inference):
    home.update_settings(model=str(model_dir), device="cpu")
    inference.start().wait_ready(60)
    panel = DeployPanel(DeployService(home, inference, url="http://10.0.0.7:8008", token="tok-xyz"))
    text = panel.connection.value
    assert "http://10.0.0.7:8008" in text and "tok-xyz" in text
    assert "refactai.addressURL" in text and "refactai.apiKey" in text           # Refact plugin
    assert "apiBase: http://10.0.0.7:8008/v1" in text and "&lt;|fim_prefix|&gt;" in text  # Continue
    assert "[server]" in text and 'endpoint = &quot;http://10.0.0.7:8008&quot;' in text   # Tabby


def test_deploy_panel_refuses_a_checkpoint_that_does_not_exist(home, model_dir, inference):
    make_run(home, "run-a", model_dir, [10], [2.0], seed=5)
    panel = DeployPanel(DeployService(home, inference))
    panel.mode.value = "checkpoint"
    panel.run.value = "run-a"
    panel.checkpoint.options = [("step-999999", "step-999999")]  # e.g. deleted since the list was read
    panel.checkpoint.value = "step-999999"
    panel.deploy_button.click()
    assert "Not deployed" in panel.message.value and "step-999999" in panel.message.value
    assert "lora" not in home.load_settings()


def _running_run(home, model_dir, steps):
    """run-b, still running: checkpoints written, no best named yet."""
    from refact_lab.home import atomic_write_json

    make_run(home, "run-b", model_dir, steps, [1.0] * len(steps), seed=7, created_at=2000)
    atomic_write_json(home.run_dir("run-b") / "status.json", {
        "run_id": "run-b", "state": "running", "step": steps[-1], "created_at": 2000, "model": model_dir.name})


def test_deploy_panel_refresh_rereads_runs_and_selects_a_step(home, model_dir, inference):
    make_run(home, "run-a", model_dir, [10, 20, 30], [2.5, 1.9, 2.2], seed=6, created_at=1000)
    panel = DeployPanel(DeployService(home, inference), poll_s=0.05)
    panel.mode.value = "checkpoint"
    # "a specific checkpoint" never leaves the step empty: the run's best
    assert panel.run.value == "run-a" and panel.checkpoint.value == "step-000020"
    _running_run(home, model_dir, [5])   # written after the panel opened
    assert "run-b" not in [v for _, v in panel.run.options]
    panel.refresh_button.click()
    assert [v for _, v in panel.run.options] == ["run-b", "run-a"]
    assert panel.run.value == "run-a" and panel.checkpoint.value == "step-000020"   # the selection is kept
    panel.run.value = "run-b"          # no best (no test loss): the newest step
    assert panel.checkpoint.value == "step-000005"
    # a new checkpoint of a run already listed appears on Refresh too (label counts it)
    _running_run(home, model_dir, [5, 15])
    panel.refresh_button.click()
    assert [v for _, v in panel.checkpoint.options] == ["step-000005", "step-000015"]
    assert "2 checkpoints" in panel.run.options[0][0]


def test_deploy_panel_messages_do_not_outlive_what_they_describe(home, model_dir, inference):
    make_run(home, "run-a", model_dir, [10], [2.0], seed=8)
    home.update_settings(model=str(model_dir), device="cpu")
    inference.start().wait_ready(60)
    service = DeployService(home, inference)
    panel = DeployPanel(service, poll_s=0.05)
    assert "caps_version" not in panel.state.value and "caps_version" not in panel.widget.children[0].value
    panel.mode.value = "checkpoint"
    panel.checkpoint.options = [("step-999999", "step-999999")]
    panel.checkpoint.value = "step-999999"
    panel.deploy_button.click()
    assert "Not deployed" in panel.message.value
    panel.mode.value = "best"                      # the user moved on: the error about the old choice goes
    assert panel.message.value == ""
    panel.deploy_button.click()
    assert "Deploying" in panel.message.value
    wait_for(lambda: "Deployed: run-a/step-000010" in panel.message.value, timeout=30, what="deployed message")
    assert "Deploying" not in panel.message.value
    service.deploy("off")                          # changed elsewhere (CLI, another page)
    service.wait_applied(30)
    panel.refresh()
    assert panel.message.value == "" and "<code class='refact-lab-deployed'>off</code>" in panel.state.value


def test_playground_uses_the_choice_just_deployed_and_shows_timing(home, model_dir, inference):
    make_run(home, "run-a", model_dir, [10, 20], [2.0, 2.5], seed=3, created_at=1000)
    home.update_settings(model=str(model_dir), device="cpu")
    inference.start().wait_ready(60)
    service = DeployService(home, inference)
    prompt = ("def add(a, b):\n    return", "\n")
    lora = {}
    for ck in ("step-000010", "step-000020"):
        service.deploy(f"run-a/{ck}")
        service.wait_applied(30)
        lora[ck] = inference.complete(*prompt, model="tinycoder:lora", max_tokens=8)["text"]
    assert lora["step-000010"] != lora["step-000020"]   # else this test could not tell them apart
    service.deploy("off")
    service.wait_applied(30)
    panel = DeployPanel(service, poll_s=0.05)
    panel.prefix.value, panel.suffix.value, panel.max_tokens.value = *prompt, 8
    # each Complete comes at once after its Deploy: the playground waits for the engine, not the user
    panel.mode.value = "checkpoint"
    panel.run.value, panel.checkpoint.value = "run-a", "step-000010"
    panel.deploy_button.click()
    out = panel.complete()
    assert out["lora"] == lora["step-000010"]
    panel.checkpoint.value = "step-000020"
    panel.deploy_button.click()
    assert panel.complete()["lora"] == lora["step-000020"]
    panel.mode.value = "off"
    panel.deploy_button.click()
    assert panel.complete()["lora"] is None
    panel.mode.value = "checkpoint"
    panel.deploy_button.click()
    out = panel.complete()
    assert out["lora"] == lora["step-000020"]
    assert out["base_ms"] > 0 and out["lora_ms"] > 0
    assert "ms</span>" in panel.base_head.value and "ms</span>" in panel.lora_head.value
    assert "tinycoder:lora" in panel.lora_head.value


def test_deploy_panel_says_how_the_best_checkpoint_was_chosen(home, model_dir, inference):
    from refact_lab.finetune.runs import update_status

    make_run(home, "run-a", model_dir, [10, 20], [1.5, 2.0], seed=9)
    panel = DeployPanel(DeployService(home, inference))
    panel.mode.value = "checkpoint"
    assert "★ best by test loss" in dict((v, k) for k, v in panel.checkpoint.options)["step-000010"]
    # the scoreboard picked the other one (FinetuneSettings.best_by = edit_similarity)
    update_status(home.run_dir("run-a"), best={"checkpoint": "step-000020", "step": 20, "test_loss": 2.0,
                                               "edit_similarity": 0.4, "chosen_by": "edit_similarity"})
    panel.refresh_button.click()
    labels = dict((v, k) for k, v in panel.checkpoint.options)
    assert "★ best by edit similarity" in labels["step-000020"] and "★" not in labels["step-000010"]


def test_deploy_panel_links_the_chosen_step_for_download(home, model_dir, inference):
    make_run(home, "run-a", model_dir, [10, 20], [1.5, 2.0], seed=10)
    panel = DeployPanel(DeployService(home, inference))
    panel.mode.value = "checkpoint"
    assert "/v1/refact-lab/export?run=run-a&amp;checkpoint=step-000010&amp;format=peft" in panel.export_link.value
    panel.checkpoint.value = "step-000020"
    panel.export_format.value = "merged"
    assert "checkpoint=step-000020&amp;format=merged" in panel.export_link.value
    assert "Download run-a/step-000020" in panel.export_link.value


def test_deploy_panel_saves_repository_context_and_its_budget(home, inference):
    import shutil

    from refact_lab.serve import state

    home.project_dir("proj").mkdir(parents=True)
    panel = DeployPanel(DeployService(home, inference))
    assert panel.context.value == "auto" and panel.context_tokens.value == state.DEFAULT_CONTEXT_TOKENS
    assert ("proj", "proj") in panel.context.options
    panel.context.value, panel.context_tokens.value = "proj", 512
    panel.context_button.click()
    choice = state.load(home)[0]
    assert (choice.context, choice.context_tokens) == ("proj", 512)        # saved where the server reads it
    assert "proj, up to 512 tokens" in panel.context_message.value
    panel.context.value = "off"
    panel.context_button.click()
    assert state.load(home)[0].context == "off" and "refact-lab-context-now'>off<" in panel.context_message.value
    panel.context.value = "proj"
    shutil.rmtree(home.project_dir("proj"))                                # removed since the list was read
    panel.context_button.click()
    assert "Not saved" in panel.context_message.value and "proj" in panel.context_message.value
    assert state.load(home)[0].context == "off"
    # a panel opened later still shows the saved choice, even for a project that is gone
    home.update_settings(context="gone")
    assert DeployPanel(DeployService(home, inference)).context.value == "gone"


def test_hosting_panel_lists_hosted_models_and_adds_unloads_and_removes_them(home, model_dir, inference):
    from refact_lab.serve import state

    service = HostingService(home, inference)
    panel = HostingPanel(service, poll_s=0.05)
    assert [c.children[0].value.count("refact-lab-hosted-name") for c in panel.hosted_rows.children] == [1]
    assert "default" in panel.hosted_rows.children[0].children[0].value and panel.hosted_buttons["default"] == []
    panel.add_model.value = str(model_dir)
    panel.add_name.value = "side"
    panel.add_placement.value = "cpu"
    panel.add_role.value = "chat"
    panel.add_button.click()
    assert [(e.name, e.placement, e.role) for e in state.hosted_entries(home)] == [("side", "cpu", "chat")]
    row = panel.hosted_rows.children[1].children[0].value
    assert "side" in row and "cpu" in row and "role: chat" in row
    unload, remove = panel.hosted_buttons["side"]
    assert unload.description == "Unload"
    unload.click()
    assert state.hosted_entries(home)[0].loaded is False and panel.hosted_buttons["side"][0].description == "Load"
    panel.hosted_buttons["side"][1].click()
    assert state.hosted_entries(home) == () and len(panel.hosted_rows.children) == 1
    # bad input: the reason in the message, nothing saved
    panel.add_model.value, panel.add_placement.value = str(model_dir), "gpu"
    panel.add_button.click()
    assert "placement: &#x27;gpu&#x27; is not" in panel.message.value and state.hosted_entries(home) == ()


def test_render_hosted_shows_state_placement_memory_and_error():
    from refact_lab.ui.hosting_panel import render_hosted

    text = render_hosted({"name": "big", "model": "Qwen/Qwen2.5-Coder-7B", "state": "failed", "placement": "share:0",
                          "memory_share": 0.3, "dtype": "bf16", "role": "chat", "weights_mb": 2048.0,
                          "error": "big does not fit on share:0"})
    for part in ("big", "failed", "share:0", "share 30%", "bf16", "role: chat", "2.00 GiB", "Qwen/Qwen2.5-Coder-7B",
                 "does not fit"):
        assert part in text
