"""The update as a job: one detached `refact-lab update` process per project, its status on disk, a schedule.

    projects/<project>/update/status.json   state (queued, running, finished, failed, stopped), pid,
                                            started_at, finished_at, run, result (update's JSON), error
    projects/<project>/update/log.txt       everything the update process printed
    projects/<project>/update/stop          a flag: the update stops at its next stage boundary, and the
                                            run it is training stops at its next step

The schedule (`UpdateSchedule` in settings.json, "update_schedule": every N hours, one project; off by
default) is checked by the server every few minutes (`tick`, from the jupyter_server extension): when the
last update started longer ago than the period (or never did) and none is running, one is launched. One at a
time: a launch while an update of the project is active is refused.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from refact_lab.config import UpdateSchedule, from_dict
from refact_lab import job_status
from refact_lab.home import Home, atomic_write_json, file_lock, read_json
from refact_lab.job_status import ACTIVE, orphaned, owner_fields

SETTINGS_KEY = "update_schedule"
# the schedule dropdown's choices (hours; 0 = off)
CHOICES = (("off", 0), ("every 6 hours", 6), ("every 12 hours", 12), ("daily", 24), ("weekly", 24 * 7))


def job_dir(home: Home, project: str) -> Path:
    return home.project_dir(project) / "update"


def _write(home: Home, project: str, **changes) -> dict:
    d = job_dir(home, project)
    d.mkdir(parents=True, exist_ok=True)
    with file_lock(d / ".status.lock"):
        status = {**(read_json(d / "status.json", {}) or {}), **changes, "updated_at": time.time()}
        atomic_write_json(d / "status.json", status)
        return status


def read_status(home: Home, project: str) -> dict:
    """The job's status; an active job whose process is gone is reported (and recorded) as failed. A damaged
    status.json reads as a failed job saying so (the next launch writes a fresh one): the app and the schedule
    keep working instead of raising at every refresh and tick."""
    path = job_dir(home, project) / "status.json"
    try:
        status = read_json(path, {})
        why = job_status.status_problem(status, ("started_at", "finished_at"))
    except ValueError as e:
        status, why = None, str(e)
    if why is not None:
        return {"state": "failed", "project": project, "started_at": None,
                "error": why if str(path) in why else f"{path} is damaged: {why}"}
    if not status:
        return {"state": "idle", "project": project}
    if orphaned(status):
        status = _write(home, project, state="failed", finished_at=time.time(),
                        error="the update process ended without finishing (killed or crashed); see its log")
    return status


def log_tail(home: Home, project: str, lines: int = 20) -> str:
    path = job_dir(home, project) / "log.txt"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else ""


class UpdateBusy(RuntimeError):
    """An update of the project is already queued or running (in the background or in a terminal)."""


def _check_idle(home: Home, project: str) -> None:
    """Under the start lock: refuse while another update of the project is active."""
    current = read_status(home, project)
    if current.get("state") in ACTIVE:
        raise UpdateBusy(f"an update of {project!r} is already {current['state']} (pid {current.get('pid')})")


def launch(home: Home, project: str, *, extra_args: tuple[str, ...] = ()) -> dict:
    """Start `refact-lab update` detached for the project; UpdateBusy (a RuntimeError) if one is already active."""
    if not (home.project_dir(project) / "scan").is_dir():
        raise ValueError(f"project {project!r} has not been scanned in {home.root}")
    d = job_dir(home, project)
    d.mkdir(parents=True, exist_ok=True)
    with file_lock(d / ".start.lock"):
        _check_idle(home, project)
        job_status.clear_stop(d)
        cmd = [sys.executable, "-m", "refact_lab.cli", "update", "--project", project, "--home", str(home.root),
               "--json", "--job", *extra_args]
        # a fresh status (the previous job's result stays in its log and the deploy history), owned by this
        # process until the child's pid is known, so a launcher killed right here leaves a failed job, not a
        # queued one forever
        atomic_write_json(d / "status.json", {
            "project": project, "state": "queued", **owner_fields(),
            "started_at": time.time(), "finished_at": None, "run": None, "result": None, "error": None,
            "updated_at": time.time()})
        with open(d / "log.txt", "a", encoding="utf-8") as log:
            log.write(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] starting: {' '.join(cmd)}\n")
            log.flush()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=str(d), env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                    start_new_session=True, close_fds=True)
        # only the owner changes: the child may already have written "running"
        _write(home, project, **owner_fields(proc.pid))
    return {"pid": proc.pid, "proc": proc}


def stop(home: Home, project: str) -> dict:
    """Ask the active update to stop (and the run it trains); RuntimeError when none is active."""
    status = read_status(home, project)
    if status.get("state") not in ACTIVE:
        raise RuntimeError(f"no update of {project!r} is running")
    job_status.request_stop(job_dir(home, project))
    if status.get("run"):
        from refact_lab.finetune.runs import request_stop

        request_stop(home.run_dir(status["run"]))
    return status


def stop_requested(home: Home, project: str) -> bool:
    return job_status.stop_requested(job_dir(home, project))


def run_in_foreground(home: Home, project: str, work) -> dict:
    """`refact-lab update` typed in a terminal: the same one-at-a-time check as `launch`, then a job status
    owned by this process, so the app shows it running and neither the schedule nor Update now starts a
    second update of the project beside it (two would fetch, rescan and deploy over each other)."""
    d = job_dir(home, project)
    d.mkdir(parents=True, exist_ok=True)
    with file_lock(d / ".start.lock"):
        _check_idle(home, project)
        job_status.clear_stop(d)
        atomic_write_json(d / "status.json", {
            "project": project, "state": "running", **owner_fields(),
            "started_at": time.time(), "finished_at": None, "run": None, "result": None, "error": None,
            "updated_at": time.time()})
    with open(d / "log.txt", "a", encoding="utf-8") as log:   # the app's log tail says where the output is
        log.write(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] running in a terminal (pid {os.getpid()}): "
                  "its output is there\n")
    return run_as_job(home, project, work)


def run_as_job(home: Home, project: str, work) -> dict:
    """In the launched process: run `work(should_stop, on_run)` (the update) writing the job's status."""
    from refact_lab.keep_current.update import UpdateStopped

    _write(home, project, state="running", **owner_fields())
    try:
        result = work(lambda: stop_requested(home, project), lambda run_id: _write(home, project, run=run_id))
    except (UpdateStopped, KeyboardInterrupt) as e:
        _write(home, project, state="stopped", error=str(e) or "stopped (Ctrl-C)", finished_at=time.time())
        raise
    except BaseException as e:  # noqa: BLE001 - the job must say why it ended
        _write(home, project, state="failed", error=f"{type(e).__name__}: {e}", finished_at=time.time())
        raise
    _write(home, project, state="finished", result=result, finished_at=time.time())
    return result


# --- the schedule ---------------------------------------------------------------------------------------------

def load_schedule(home: Home) -> UpdateSchedule:
    try:
        value = home.load_settings().get(SETTINGS_KEY) or {}
        if not isinstance(value, dict):   # "daily", [6]: from_dict would fail on it with an AttributeError
            raise TypeError(f"{SETTINGS_KEY}: expected an object")
        return from_dict(UpdateSchedule, value)
    except (ValueError, TypeError):
        return UpdateSchedule()   # a bad value in settings.json means "off", never a crash of the server


def save_schedule(home: Home, schedule: UpdateSchedule) -> UpdateSchedule:
    home.update_settings(**{SETTINGS_KEY: asdict(schedule)})
    return schedule


def due(schedule: UpdateSchedule, status: dict, now: float) -> bool:
    """Whether a scheduled update should start now: the schedule is on, none is active, and the last one
    started at least `every_hours` ago (or never started)."""
    if schedule.every_hours <= 0 or status.get("state") in ACTIVE:
        return False
    last = status.get("started_at")
    return last is None or now - float(last) >= schedule.every_hours * 3600


def tick(home: Home, now: float | None = None, start=launch) -> str | None:
    """The server's periodic check: launch the scheduled project's update when due; returns the project
    launched, else None. A launch that cannot start (a project never scanned) raises; the caller logs it and
    tries again at the next tick."""
    schedule = load_schedule(home)
    if not due(schedule, read_status(home, schedule.project), time.time() if now is None else now):
        return None
    start(home, schedule.project)
    return schedule.project
