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


def test_hosting_panel_saves_the_openai_key_without_showing_it(home, inference):
    panel = HostingPanel(HostingService(home, inference))
    panel.openai_key.value = "sk-abcdefgh12345"
    panel.save_upstream_button.click()
    assert home.load_settings()["openai_api_key"] == "sk-abcdefgh12345"
    assert panel.openai_key.value == "" and "sk-abcdefgh12345" not in panel.widget.children[0].value
    assert (home.settings_file.stat().st_mode & 0o777) == 0o600
    panel.upstream_url.value = "not a url"
    panel.save_upstream_button.click()
    assert "not an http(s) URL" in panel.message.value


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
