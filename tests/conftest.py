"""Shared fixtures: an isolated state directory and a tiny model built on the fly (no hub is reachable)."""

from __future__ import annotations

import pytest


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh state directory, also exported as REFACT_LAB_HOME for code that reads the environment."""
    from refact_lab.home import Home

    root = tmp_path / "home"
    monkeypatch.setenv("REFACT_LAB_HOME", str(root))
    return Home.resolve(root).ensure()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random-initialised 2-layer Llama with a BPE tokenizer carrying Qwen-style FIM tokens."""
    from refact_lab.models.tokenizer_build import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    """A real `refact-lab serve` process on a free port, with its own state directory and token."""

    def __init__(self, home_dir, token: str | None = "test-token", extra_args=(), env=None):
        import os
        import subprocess
        import sys

        self.port = free_port()
        self.token = token
        self.home_dir = home_dir
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = home_dir.parent / f"server-{self.port}.log"
        args = [sys.executable, "-m", "refact_lab.cli", "serve", "--port", str(self.port), "--home", str(home_dir)]
        args += ["--token", token] if token else ["--no-auth"]
        args += list(extra_args)
        full_env = {**os.environ, "REFACT_LAB_HOME": str(home_dir), "PYTHONUNBUFFERED": "1", **(env or {})}
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=full_env)

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    @property
    def app_url(self) -> str:
        return f"{self.url}/?token={self.token}" if self.token else f"{self.url}/"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60) -> "RunningServer":
        import time
        import urllib.error
        import urllib.request

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()[-3000:]}")
            try:
                req = urllib.request.Request(f"{self.url}/v1/health", headers=self.headers)
                urllib.request.urlopen(req, timeout=2).read()
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.3)
        raise RuntimeError(f"server did not answer within {timeout}s:\n{self.log()[-3000:]}")

    def stop(self) -> int:
        import signal
        import subprocess

        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real server for this test module: `.url`, `.token`, `.headers`, `.app_url`, `.home_dir`."""
    home_dir = tmp_path_factory.mktemp("server") / "home"
    srv = RunningServer(home_dir).wait_ready()
    yield srv
    srv.stop()
