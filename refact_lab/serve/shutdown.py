"""Ending `refact-lab serve` for certain: the kernels it started, a watchdog, and the final exit.

The graceful path (jupyter_server's: stop extensions, shut kernels down, stop the loop) usually takes 1-3 s.
What it cannot promise is the end of the process. Stopped while a Voilà page's kernel was starting, the
heartbeat thread of Voilà's client to that kernel (a non-daemon jupyter_client thread) never ended, and
Python's exit waited for it on a lock after "stopped" was printed; an executor thread or a model load can do
the same. So a stop signal also arms a watchdog that ends the process after `GRACE_S` whatever the graceful
path is doing, and the server leaves with `os._exit` once the loop has stopped. Before any exit the kernels'
process groups are killed: a kernel runs in its own session (jupyter_client starts it so), and its group
holds what it started (a scan's reader pool). Training runs start their own session too, so they are not in
a kernel's group and keep running by design."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path

# docker stop waits 10 s before SIGKILL; the watchdog leaves a margin for the interpreter and the kill itself
GRACE_S = 8.0
# a child of the server that is one of these is a detached training run or a scheduled update (which trains),
# never killed with the server
_DETACHED_MARKERS = ("refact_lab.finetune", "accelerate.commands.launch", "refact_lab.cli update")

log = logging.getLogger("refact_lab.shutdown")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def child_pids(parent: int | None = None) -> list[int]:
    """Direct children of `parent` (default: this process), from /proc; empty where /proc is missing."""
    parent = os.getpid() if parent is None else parent
    found = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for name in entries:
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        # the command name (2nd field) may hold spaces and parentheses: fields restart after the last ')'
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 1 and int(fields[1]) == parent:
            found.append(int(name))
    return found


def kernel_pids(kernel_manager) -> list[int]:
    """The process ids of the kernels this server's kernel manager knows."""
    pids = []
    if kernel_manager is None:
        return pids
    for kid in list(getattr(kernel_manager, "_kernels", {})):
        try:
            km = kernel_manager.get_kernel(kid)
        except KeyError:
            continue
        proc = getattr(getattr(km, "provisioner", None), "process", None)
        if proc is not None and getattr(proc, "pid", None):
            pids.append(proc.pid)
    return pids


def kill_children(kernel_manager=None) -> list[int]:
    """SIGKILL every kernel and every other child of this process (each with its process group, so a kernel's
    own children go too), except detached training runs. Returns the pids it signalled."""
    me = os.getpid()
    targets = set(kernel_pids(kernel_manager)) | set(child_pids())
    killed = []
    for pid in sorted(targets):
        if any(marker in _cmdline(pid) for marker in _DETACHED_MARKERS):
            continue
        try:
            pgid = os.getpgid(pid)
            if pgid == pid and pgid != os.getpgid(me):
                os.killpg(pgid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except (ProcessLookupError, PermissionError):
            continue
    for pid in killed:  # reap them, so none is left as a zombie while we still run
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
    return killed


def hard_exit(code: int = 0, message: str = "refact_lab stopped.") -> None:
    """Leave now: no thread join, no atexit hook can keep the process alive."""
    try:
        print(message, file=sys.stderr, flush=True)
        sys.stdout.flush()
    finally:
        os._exit(code)


def start_watchdog(kernel_manager_of, seconds: float = GRACE_S) -> threading.Timer:
    """A daemon timer that kills the children and exits 0 after `seconds`, unless the process has ended.
    `kernel_manager_of`: a callable returning the kernel manager (read at expiry, when it may have changed)."""
    def expire():
        log.warning("shutdown took more than %.0f s: killing kernels and exiting", seconds)
        kill_children(kernel_manager_of())
        hard_exit(0, "refact_lab stopped (forced after %.0f s)." % seconds)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.name = "refact-lab-shutdown-watchdog"
    timer.start()
    return timer
