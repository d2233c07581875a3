"""One job status for every long piece of work: a scan, a fine-tuning run, a scheduled update.

Each keeps a `status.json` of its own (written atomically through `refact_lab.home`), and they share what a
status means: the states, which process owns the job (a pid with its start time, so a recycled pid does not
pass for the owner), when a reader must conclude that the job died, and the stop flag a job checks at its step
boundaries. A job whose owners are all gone while it claims to be queued or running is failed by the reader,
with its log kept; nothing else can tell it apart from a job that is just slow.
"""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path

from refact_lab.home import atomic_write_text, pid_alive, proc_start_ticks

STATES = ("queued", "running", "finished", "failed", "stopped")
ACTIVE = ("queued", "running")
STOP_FLAG = "stop"
# The owner keys of a status: the process that created or launched the job. Fine-tuning runs also name the
# worker that trains (RUN_OWNERS): either one alive keeps the run alive.
OWNER = ("pid", "pid_started")
RUN_OWNERS = (OWNER, ("worker_pid", "worker_started"))


def _number(value, integer: bool = False) -> bool:
    return value is None or (not isinstance(value, bool) and isinstance(value, int if integer else (int, float)))


def status_problem(status, numbers: tuple[str, ...] = ()) -> str | None:
    """What is wrong with a parsed status.json, in a few words; None when the fields every reader uses are
    sound: an object, a known state (or none yet), owner pids as integers and `numbers` as numbers. A hand edit
    or a disk cut off mid-write can break any field, and a reader must say so instead of crashing on it."""
    import json

    if not isinstance(status, dict):
        return f"expected a JSON object, found {json.dumps(status)[:40]}"
    if status.get("state") not in (*STATES, None):
        return f"state: {status['state']!r} is not one of {', '.join(STATES)}"
    for pid_key, started_key in RUN_OWNERS:
        for key, integer in ((pid_key, True), (started_key, False)):
            if not _number(status.get(key), integer):
                return f"{key}: expected a number, got {status[key]!r}"
    for key in numbers:
        if not _number(status.get(key)):
            return f"{key}: expected a number, got {status[key]!r}"
    return None


def owner_fields(pid: int | None = None, keys: tuple[str, str] = OWNER) -> dict:
    """The status fields that name `pid` (default: this process) as the job's owner."""
    pid = os.getpid() if pid is None else pid
    return {keys[0]: pid, keys[1]: proc_start_ticks(pid)}


def has_owner(status: dict, owners=(OWNER,)) -> bool:
    return any(status.get(pid_key) for pid_key, _ in owners)


def owner_alive(status: dict, owners=(OWNER,)) -> bool:
    return any(pid_alive(status.get(pid_key), status.get(started_key)) for pid_key, started_key in owners)


def orphaned(status: dict, owners=(OWNER,)) -> bool:
    """An active job that names owners, none of them alive: it died (killed, crashed) without saying so."""
    return status.get("state") in ACTIVE and has_owner(status, owners) and not owner_alive(status, owners)


def request_stop(folder: Path) -> None:
    """Ask the job working in `folder` to stop at its next step boundary (it saves what it has first)."""
    atomic_write_text(Path(folder) / STOP_FLAG, _dt.datetime.now().isoformat() + "\n")


def stop_requested(folder: Path) -> bool:
    return (Path(folder) / STOP_FLAG).is_file()


def clear_stop(folder: Path) -> None:
    (Path(folder) / STOP_FLAG).unlink(missing_ok=True)
