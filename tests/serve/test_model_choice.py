"""`refact-lab serve --model` chooses the base model at start and the choice is remembered across restarts;
a model that cannot load leaves the server up, reporting the reason."""

from __future__ import annotations

from refact_lab.home import Home
from tests.conftest import RunningServer
from tests.serve.helpers import call, wait_model_ready


def test_the_model_given_at_start_is_remembered(tmp_path, varied_model_dir):
    home_dir = tmp_path / "home"
    first = RunningServer(home_dir, extra_args=["--model", str(varied_model_dir), "--dtype", "bf16",
                                                "--max-batch", "4"]).wait_ready()
    try:
        snap = wait_model_ready(first)
        assert snap["model"] == "tinycoder" and snap["dtype"] == "bfloat16" and snap["applied"]["max_batch"] == 4
    finally:
        assert first.stop() == 0
    saved = Home.resolve(home_dir).load_settings()
    assert (saved["model"], saved["dtype"], saved["max_batch"]) == (str(varied_model_dir), "bf16", 4)

    second = RunningServer(home_dir).wait_ready()  # no --model this time
    try:
        snap = wait_model_ready(second)
        assert snap["model"] == "tinycoder" and snap["source"] == str(varied_model_dir)
        # a broken choice saved later: the server stays up and says why
        (tmp_path / "broken").mkdir()
        (tmp_path / "broken" / "config.json").write_text("{}")
        Home.resolve(home_dir).update_settings(model=str(tmp_path / "broken"))
        snap = wait_model_ready(second, want="failed")
        assert snap["error"] and "broken" in snap["error"]
        status, err = call(second, "POST", "/v1/completions", {"prompt": "x"})
        assert status == 503 and "failed" in err["error"]["message"]
        assert call(second, "GET", "/v1/health")[0] == 200
    finally:
        second.stop()
