"""Kernels of app pages end with their page (issue 11.9). In a real browser: tests/e2e/test_kernels.py.

Here without a browser: the Voilà page sets the `_xsrf` cookie its unload beacon needs, and a kernel nobody is
connected to (a page fetched and dropped) is culled once idle. The culling delay comes from a Jupyter config
file (`jupyter_config.json`, which every Jupyter app reads), as an operator would set it, kept short here.
"""

from __future__ import annotations

import json
import urllib.request

from tests.serve.helpers import call, wait_for
from tests.serve.server_processes import kernels_of, start_server


def test_page_sets_xsrf_cookie_and_its_dropped_kernel_is_culled(tmp_path):
    config = tmp_path / "jupyter_config"
    config.mkdir()
    (config / "jupyter_config.json").write_text(json.dumps(
        {"RefactLabExtension": {"kernel_idle_timeout": 3, "kernel_cull_interval": 1}}))
    srv = start_server(tmp_path, env={"JUPYTER_CONFIG_DIR": str(config)})
    try:
        with urllib.request.urlopen(f"{srv.url}/voila/render/workbench.ipynb?token={srv.token}", timeout=120) as r:
            cookies = r.headers.get_all("Set-Cookie") or []
            page = r.read()
        assert b"voila" in page.lower()
        assert any(c.startswith("_xsrf=") for c in cookies), cookies
        status, kernels = call(srv, "GET", "/api/kernels")
        assert status == 200 and len(kernels) == 1 and kernels_of(srv)
        # nobody connects to that kernel: once idle past the timeout, the culler shuts it down
        wait_for(lambda: call(srv, "GET", "/api/kernels")[1] == [], timeout=60, interval=0.5,
                 what="the dropped page's kernel to be culled")
        wait_for(lambda: not kernels_of(srv), timeout=10, what="the culled kernel's process to end")
        assert "Culling kernels with idle durations > 3 seconds" in srv.log()
    finally:
        srv.stop()
