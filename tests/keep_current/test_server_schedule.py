"""The server's periodic check launches the scheduled update: a real jupyter_server with our extension, a
scanned project with a schedule due now, and the detached `refact-lab update` it starts (one, run to the end)."""

from __future__ import annotations

import asyncio
import time

import pytest

from pytest_jupyter.jupyter_server import *  # noqa: F401,F403  (jp_serverapp and the fixtures it needs)
from refact_lab.config import UpdateSchedule
from refact_lab.keep_current import schedule

pytest.importorskip("git")


@pytest.fixture
def jp_server_config(home, scanned, tiny_model_dir):
    schedule.save_schedule(home, UpdateSchedule(every_hours=24, project=scanned))
    return {"ServerApp": {"jpserver_extensions": {"refact_lab": True}},
            "RefactLabExtension": {"home": str(home.root), "model": str(tiny_model_dir),
                                   "update_check_interval": 1}}


def test_a_due_schedule_launches_one_update(home, scanned, jp_serverapp, jp_asyncio_loop):
    # what ServerApp.start does once the loop runs (pytest-jupyter's server app is not started)
    ext = next(iter(jp_serverapp.extension_manager.extension_apps["refact_lab"]))
    jp_asyncio_loop.run_until_complete(ext._start_jupyter_server_extension(jp_serverapp))
    deadline = time.time() + 120
    status = schedule.read_status(home, scanned)
    while time.time() < deadline and status.get("state") not in ("finished", "failed"):
        jp_asyncio_loop.run_until_complete(asyncio.sleep(0.5))   # the server's loop ticks
        status = schedule.read_status(home, scanned)
    assert status["state"] == "finished", schedule.log_tail(home, scanned)
    assert status["result"]["reason"] == "no changes"
    # started less than a day ago: the next ticks launch nothing
    first = status["started_at"]
    jp_asyncio_loop.run_until_complete(asyncio.sleep(2.5))
    assert schedule.read_status(home, scanned)["started_at"] == first
    assert schedule.log_tail(home, scanned, 200).count("starting:") == 1
