"""Deploy in a real browser: switch the deployed LoRA checkpoint in the app and see /refact-caps change.

Real peft adapters in the runs layout; the server serves a tiny model; nothing but clicks in the Deploy tab
changes what the server offers to IDE clients.
"""

from __future__ import annotations

import pytest

from refact_lab.home import Home
from tests.conftest import RunningServer
from tests.e2e.conftest import click_tab, open_app
from tests.serve.conftest import varied_model_dir  # noqa: F401 (fixture)
from tests.serve.helpers import call, make_run, wait_for, wait_model_ready


@pytest.fixture(scope="module")
def deploy_server(tmp_path_factory, varied_model_dir):  # noqa: F811
    home_dir = tmp_path_factory.mktemp("deploy_e2e") / "home"
    home = Home.resolve(home_dir).ensure()
    make_run(home, "run-old", varied_model_dir, [10, 20], [2.0, 2.4], seed=11, created_at=1000)
    make_run(home, "run-new", varied_model_dir, [4, 8], [1.6, 1.2], seed=12, created_at=2000)
    srv = RunningServer(home_dir, extra_args=["--model", str(varied_model_dir)]).wait_ready()
    try:
        wait_model_ready(srv)
        yield srv
    finally:
        srv.stop()


def caps_after(srv, version: int) -> dict:
    def changed():
        caps = call(srv, "GET", "/refact-caps")[1]
        return caps if caps["caps_version"] > version else None

    return wait_for(changed, timeout=30, what="caps_version to change")


def test_switch_the_deployed_checkpoint_in_the_app_and_see_the_caps_change(page, deploy_server):
    srv = deploy_server
    start = call(srv, "GET", "/refact-caps")[1]
    assert start["running_models"] == ["tinycoder"]
    open_app(page, srv)
    click_tab(page, "Deploy")
    state = page.locator(".refact-lab-deploy-state")
    state.wait_for(timeout=30_000)

    page.locator(".refact-lab-deploy label", has_text="Best checkpoint of the latest run").click()
    page.locator("button.refact-lab-deploy-button").click()
    best = caps_after(srv, start["caps_version"])
    assert best["running_models"] == ["tinycoder", "tinycoder:lora"]
    assert best["code_completion_default_model"] == "tinycoder:lora"
    page.wait_for_selector(".refact-lab-deploy-state >> text=run-new/step-000008", timeout=30_000)
    models = call(srv, "GET", "/v1/models")[1]["data"]
    assert models[-1]["lora"] == {"run_id": "run-new", "checkpoint": "step-000008"}

    page.locator(".refact-lab-deploy label", has_text="A specific checkpoint").click()
    # ipywidgets' <option>s carry the labels the panel shows
    page.locator(".refact-lab-deploy-run select").select_option(label="run-old (finished, 2 checkpoints)")
    page.locator(".refact-lab-deploy-checkpoint select").select_option(label="step-000020, test loss 2.4000")
    page.locator("button.refact-lab-deploy-button").click()
    specific = caps_after(srv, best["caps_version"])
    assert "tinycoder:lora" in specific["running_models"]
    page.wait_for_selector(".refact-lab-deploy-state >> text=run-old/step-000020", timeout=30_000)
    assert call(srv, "GET", "/v1/models")[1]["data"][-1]["lora"]["checkpoint"] == "step-000020"

    # the playground shows base and fine-tuned completions side by side
    page.locator("button.refact-lab-playground-button").click()
    page.wait_for_function("document.querySelector('.refact-lab-playground-lora') && "
                           "!document.querySelector('.refact-lab-playground-lora').innerText.includes('no fine-tuned')",
                           timeout=30_000)
    # with each one's time, once the completions are in
    page.wait_for_selector(".refact-lab-playground-lora-head .refact-lab-playground-ms >> text=ms", timeout=30_000)
    assert "tinycoder:lora" in page.locator(".refact-lab-playground-lora-head").inner_text()
    assert "…" not in page.locator(".refact-lab-playground-lora").inner_text()
    assert "caps_version" not in page.locator(".refact-lab-deploy").inner_text()

    page.locator(".refact-lab-deploy label", has_text="Off: the base model only").click()
    page.locator("button.refact-lab-deploy-button").click()
    off = caps_after(srv, specific["caps_version"])
    assert off["running_models"] == ["tinycoder"]
    assert srv.token in page.locator(".refact-lab-connection").inner_text()
