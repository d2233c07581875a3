"""Stopping a real `refact-lab serve` with real signals, whatever it is doing (issue 17).

Each case starts its own server (a stopped server cannot be shared), brings it to one moment (idle, model
loading, a completion streaming, a scan running in a kernel), signals it and checks: the process ends within
10 s (docker stop's grace period), with status 0, and none of its kernels (nor what they started) is left.
The browser case (a Voilà page opening its kernel) is in tests/e2e/test_kernels.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.request
from pathlib import Path

import pytest

from refact_lab.home import Home
from tests.serve.helpers import call, wait_for, wait_model_ready
from tests.serve.server_processes import (STOP_LIMIT_S, assert_clean_exit, in_group, kernels_of, processes_alive,
                                          run_in_kernel, start_server, stop_with)


BANNER = ("  App:", "  JupyterLab:", "  API:", "  Token:")  # the start banner shows the token on purpose


def test_sigterm_when_idle_ends_the_server_and_its_log_holds_no_token(tmp_path):
    srv = start_server(tmp_path)
    wrong = "wrong-secret-7d1f"
    # refused requests whose URL or header carries a token: tornado and Voilà log such URLs as they came
    for path in (f"/voila/static/?token={srv.token}", f"/voila/static/?token={wrong}", f"/api/kernels?token={wrong}",
                 f"/voila/render/missing.ipynb?token={srv.token}", f"/v1/health?token={wrong}"):
        status, _ = call(srv, "GET", path, headers={"Authorization": ""})
        assert status in (401, 403, 404), path
    status, _ = call(srv, "GET", "/v1/health", headers={"Authorization": f"Bearer {wrong}"})
    assert status in (401, 403)
    stop_with(srv, signal.SIGTERM)
    assert_clean_exit(srv)
    log = srv.log()
    assert "403 GET /voila/static/?token=[secret]" in log  # the refused requests were logged, masked
    assert wrong not in log
    leaks = [line for line in log.splitlines() if srv.token in line and not line.startswith(BANNER)]
    assert not leaks, leaks


def test_second_sigint_exits_at_once(tmp_path):
    srv = start_server(tmp_path)
    # a kernel that takes long to die keeps the graceful path busy (jupyter_client waits 5 s before killing it)
    kernel_pid = run_in_kernel(srv, "import atexit, time; atexit.register(time.sleep, 60)")
    srv.process.send_signal(signal.SIGINT)
    wait_for(lambda: "stopping (again to exit at once)" in srv.log(), timeout=5, what="the first signal handled")
    took = stop_with(srv, signal.SIGINT)
    assert_clean_exit(srv, [kernel_pid])
    assert "second signal" in srv.log()
    assert took < 4, f"{took:.1f}s after the second Ctrl-C"


def test_sigterm_while_the_model_loads(tmp_path):
    srv = start_server(tmp_path)
    status, snap = call(srv, "GET", "/v1/refact-lab/status")
    assert status == 200 and snap["state"] in ("starting", "loading"), f"not loading when stopped: {snap}"
    stop_with(srv, signal.SIGTERM)
    assert_clean_exit(srv)


def test_sigterm_ends_a_stream_in_flight(tmp_path):
    # the loop guard would end the default model's completion early; this test needs a long one
    Home.resolve(tmp_path / "home").ensure().update_settings(loop_guard=False)
    srv = start_server(tmp_path)
    wait_model_ready(srv)
    req = urllib.request.Request(
        f"{srv.url}/v1/completions", method="POST",
        data=json.dumps({"prompt": "def fibonacci(n):\n", "max_tokens": 400, "temperature": 0.8,
                         "stream": True}).encode(),
        headers={**srv.headers, "Content-Type": "application/json"})
    resp = urllib.request.urlopen(req, timeout=STOP_LIMIT_S + 5)
    first = resp.readline()
    assert first.startswith(b"data: {"), first
    srv.process.send_signal(signal.SIGTERM)
    # the client is told: the stream ends (here with an error event naming the shutdown), it does not hang
    rest = b""
    try:
        while chunk := resp.readline():
            rest += chunk
    except (ConnectionError, OSError) as e:  # an abruptly closed connection also ends the stream
        rest += f"<closed: {type(e).__name__}>".encode()
    events = [line[6:] for line in rest.decode().splitlines() if line.startswith("data: ")]
    assert '"finish_reason": "length"' not in rest.decode(), "the completion finished before the signal"
    assert any("shutting down" in e for e in events), rest[-1000:]
    assert events[-1] == "[DONE]"
    try:
        srv.process.wait(STOP_LIMIT_S)
    except subprocess.TimeoutExpired:
        stop_with(srv, signal.SIGKILL)
        pytest.fail("the server did not stop after its stream ended")
    srv._log.close()
    assert_clean_exit(srv)


SCAN_IN_KERNEL = """
from refact_lab.data.jobs import ScanJob
from refact_lab.home import Home
job = ScanJob(Home.resolve(None)).start()
"""


def test_sigterm_while_a_kernel_runs_a_scan(tmp_path):
    from refact_lab.data.sources import SourceStore

    home = Home.resolve(tmp_path / "home").ensure()
    code = tmp_path / "code"
    for i in range(300):  # enough files that stage 2 (the loss of each under the model) takes a while
        (code / f"pkg{i % 10}").mkdir(parents=True, exist_ok=True)
        (code / f"pkg{i % 10}" / f"mod_{i}.py").write_text(
            "".join(f"def f_{i}_{k}(x):\n    return x * {k} + {i}\n\n" for k in range(30)))
    SourceStore(home).add_folder(code)
    srv = start_server(tmp_path)
    kernel_pid = run_in_kernel(srv, SCAN_IN_KERNEL)
    scan_status = home.root / "projects" / "default" / "scan" / "status.json"

    def running():
        doc = json.loads(scan_status.read_text()) if scan_status.is_file() else {}
        return doc.get("state") == "running" and doc

    assert wait_for(running, timeout=60, what="the scan to run")["pid"] == kernel_pid
    stop_with(srv, signal.SIGTERM)
    assert_clean_exit(srv, [kernel_pid])
    assert not in_group(kernel_pid), "a process the kernel started outlived the server"


def test_docker_stop_under_tini_as_pid_1(tmp_path):
    """As in the Docker image: tini is PID 1 (here of its own PID namespace), the server its child. docker stop
    sends SIGTERM to PID 1; tini passes it on, the server and its kernels end, and PID 1 exits 0."""
    import shutil
    from unittest import mock

    from refact_lab.serve.shutdown import child_pids

    dockerfile = (Path(__file__).resolve().parents[2] / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["/usr/bin/tini", "--"]' in dockerfile and " tini " in dockerfile
    if not shutil.which("tini"):
        pytest.fail("tini is missing: `make test` installs it (apt-get install -y tini)")
    if subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True).returncode:
        pytest.skip("no permission to make a PID namespace here")
    real_popen = subprocess.Popen
    init = ["unshare", "--pid", "--fork", "--mount-proc", shutil.which("tini"), "--"]
    with mock.patch("subprocess.Popen", lambda args, **kw: real_popen(init + list(args), **kw)):
        srv = start_server(tmp_path)
    assert srv.process.args[:len(init)] == init
    status, _ = call(srv, "POST", "/api/kernels", {})
    assert status == 201
    kernel_pids = wait_for(lambda: kernels_of(srv), timeout=30, what="the kernel process")
    (tini,) = child_pids(srv.process.pid)
    os.kill(tini, signal.SIGTERM)
    try:
        srv.process.wait(STOP_LIMIT_S)
    except subprocess.TimeoutExpired:
        srv.process.kill()
        pytest.fail(f"PID 1 was still running {STOP_LIMIT_S}s after SIGTERM:\n{srv.log()[-3000:]}")
    srv._log.close()
    assert_clean_exit(srv, kernel_pids)


HUNG_SERVER = """
import subprocess, sys, threading
from refact_lab.serve.shutdown import start_watchdog
sleep = [sys.executable, "-c", "import time; time.sleep(300)"]
kernel = subprocess.Popen(sleep + ["ipykernel_launcher"], start_new_session=True, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
run = subprocess.Popen(sleep + ["-m", "refact_lab.finetune.worker"], start_new_session=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
print(kernel.pid, run.pid, flush=True)
start_watchdog(lambda: None, seconds=1)
threading.Thread(target=threading.Event().wait).start()  # a non-daemon thread that never ends: the hang
"""


def test_watchdog_ends_a_hung_process_and_spares_training_runs():
    """What the server's watchdog does when the graceful path hangs: kill the children (not a detached training
    run), exit 0. The process here hangs the way the server did (its exit waits on a thread forever)."""
    import sys

    proc = subprocess.Popen([sys.executable, "-c", HUNG_SERVER], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    kernel, run = (int(p) for p in proc.stdout.readline().split())
    try:
        assert proc.wait(STOP_LIMIT_S) == 0
        assert "forced" in proc.stderr.read()
        wait_for(lambda: not processes_alive([kernel]), timeout=5, what="the kernel-like child to be killed")
        assert processes_alive([run]), "a detached training run was killed with the server"
    finally:
        for pid in (kernel, run):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            proc.kill()
