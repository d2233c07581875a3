"""Real `refact-lab serve` processes for tests that stop them: start one with its own runtime folder, find
its kernels and what they started in /proc, signal it and check how it ended."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import RunningServer
from tests.serve.helpers import call, wait_for

STOP_LIMIT_S = 10  # what the issue asks: within docker stop's default grace period


def start_server(tmp_path: Path, extra_args=(), env=None) -> RunningServer:
    """A server whose kernels write their connection files under tmp_path/runtime, so a leftover kernel is
    found by that path in any process's command line."""
    runtime = tmp_path / "runtime"
    runtime.mkdir(parents=True, exist_ok=True)
    return RunningServer(tmp_path / "home", extra_args=extra_args,
                         env={"JUPYTER_RUNTIME_DIR": str(runtime), **(env or {})}).wait_ready()


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name, or None for a process gone or a zombie."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()
    return None if fields[0] in ("Z", "X") else fields


def processes(where) -> list[int]:
    """Live processes (not zombies) for which where(pid, cmdline, fields) holds."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != os.getpid():
            fields = _stat(int(name))
            if fields is None:
                continue
            try:
                cmd = Path(f"/proc/{name}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if where(int(name), cmd, fields):
                found.append(int(name))
    return found


def processes_alive(pids) -> list[int]:
    """Those of `pids` still running (a zombie waiting for its parent counts as ended)."""
    return [pid for pid in pids if _stat(pid)]


def kernels_of(srv: RunningServer) -> list[int]:
    """Kernel processes started by this server (their command line names its runtime folder)."""
    runtime = srv.home_dir.parent / "runtime"
    return processes(lambda pid, cmd, fields: "ipykernel" in cmd and str(runtime) in cmd)


def in_group(pgid: int) -> list[int]:
    return processes(lambda pid, cmd, fields: int(fields[2]) == pgid)


def stop_with(srv: RunningServer, sig=signal.SIGTERM) -> float:
    """Send `sig`, wait for the process; returns the seconds it took. Fails (after killing it) past the limit."""
    t0 = time.monotonic()
    srv.process.send_signal(sig)
    try:
        srv.process.wait(STOP_LIMIT_S)
    except subprocess.TimeoutExpired:
        srv.process.kill()
        srv.process.wait()
        pytest.fail(f"the server was still running {STOP_LIMIT_S}s after {sig.name}:\n{srv.log()[-3000:]}")
    finally:
        srv._log.close()
    return time.monotonic() - t0


def assert_clean_exit(srv: RunningServer, kernel_pids=()) -> None:
    assert srv.process.returncode == 0, srv.log()[-3000:]
    assert "refact_lab stopped" in srv.log()
    # the kernels go with the server; they are reaped by init once their parent is gone, so allow a moment
    wait_for(lambda: not kernels_of(srv) and not processes_alive(kernel_pids), timeout=5,
             what="kernel processes to end")


def run_in_kernel(srv: RunningServer, code: str) -> int:
    """Start a kernel through the server's API, run `code` in it (as a client connected to the kernel itself,
    not through the server) and return the kernel's pid."""
    from jupyter_client import BlockingKernelClient

    status, kernel = call(srv, "POST", "/api/kernels", {})
    assert status == 201, kernel
    client = BlockingKernelClient(
        connection_file=str(srv.home_dir.parent / "runtime" / f"kernel-{kernel['id']}.json"))
    client.load_connection_file()
    client.start_channels()
    outputs: list[dict] = []
    try:
        client.wait_for_ready(timeout=60)
        reply = client.execute_interactive(code + "\nimport os\nprint(os.getpid())", timeout=60,
                                           output_hook=outputs.append)
        assert reply["content"]["status"] == "ok", reply["content"]
    finally:
        client.stop_channels()
    pid = int("".join(m["content"].get("text", "") for m in outputs).split()[-1])
    assert pid in kernels_of(srv)
    return pid
