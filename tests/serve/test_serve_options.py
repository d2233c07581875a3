"""The engine's options reach it from `refact-lab serve` (command line -> traitlets -> Engine), for the first
model and for every model hosted beside it."""

from __future__ import annotations

import pytest

from pytest_jupyter.jupyter_server import *  # noqa: F401,F403  (jp_serverapp and the fixtures it needs)
from refact_lab.cli import build_parser
from refact_lab.config import ServeSettings
from refact_lab.home import Home
from refact_lab.serve.server import server_argv


def test_the_command_line_option_reaches_the_server_argv(tmp_path):
    args = build_parser().parse_args(["serve", "--prefix-cache-mib", "64", "--compile-decode", "on",
                                      "--home", str(tmp_path)])
    assert args.prefix_cache_mib == 64 and args.compile_decode == "on"
    assert "--RefactLabExtension.compile_decode=on" in server_argv(ServeSettings(compile_decode="on"),
                                                                     Home.resolve(tmp_path), "tok")
    argv = server_argv(ServeSettings(prefix_cache_mib=64), Home.resolve(tmp_path), "tok")
    assert "--RefactLabExtension.prefix_cache_mib=64" in argv
    assert f"--RefactLabExtension.prefix_cache_mib={ServeSettings().prefix_cache_mib}" in server_argv(
        ServeSettings(), Home.resolve(tmp_path), "tok")


@pytest.fixture
def jp_server_config(tmp_path):
    home = Home.resolve(tmp_path / "lab_home").ensure()
    return {"ServerApp": {"jpserver_extensions": {"refact_lab": True}},
            "RefactLabExtension": {"home": str(home.root), "model": "default", "prefix_cache_mib": 0,
                                   "speculative_tokens": 0, "compile_decode": "off", "poll_interval": 0.05}}


def test_the_extension_gives_the_option_to_every_engine(jp_serverapp):
    lab = jp_serverapp.web_app.settings["refact_lab"]
    assert lab["engine"].prefix_cache.stats()["budget_mib"] == 0 and not lab["engine"].prefix_cache.enabled
    assert lab["engine"].speculative_tokens == 0 and lab["engine"].compile_decode == "off"
    # what a model hosted beside it is built with
    assert lab["fleet"].engine_options == {"prefix_cache_mib": 0, "speculative_tokens": 0, "compile_decode": "off"}
    lab["engine"].wait_ready(120)
