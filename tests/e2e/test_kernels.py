"""The app's kernels in a real browser: a reloaded page leaves no kernel behind (issue 11.9), and SIGTERM while
a page opens its kernel ends the server within 10 s, kernel included (issue 17)."""

from __future__ import annotations

import signal

from tests.e2e.conftest import open_app
from tests.serve.helpers import call, wait_for
from tests.serve.server_processes import assert_clean_exit, kernels_of, start_server, stop_with


def kernel_ids(srv) -> list[str]:
    status, body = call(srv, "GET", "/api/kernels")
    assert status == 200, body
    return [k["id"] for k in body]


def test_reloaded_pages_leave_one_kernel(tmp_path, page):
    srv = start_server(tmp_path)
    try:
        open_app(page, srv)
        for _ in range(3):
            page.reload()
            page.wait_for_selector(".lm-TabBar-tab >> text=Model hosting", timeout=90_000)
        # each unloaded page shuts its kernel down; the open page keeps its own
        left = wait_for(lambda: (lambda ids: ids if len(ids) <= 1 else None)(kernel_ids(srv)), timeout=60,
                        what="the reloaded pages' kernels to be shut down")
        assert len(left) == 1 and len(kernels_of(srv)) == 1
        # the kernel left is the open page's: its widgets still answer
        assert page.locator(".lm-TabBar-tab", has_text="Model hosting").count() >= 1
        assert "403 POST /voila/api/shutdown" not in srv.log()
    finally:
        srv.stop()


def test_sigterm_while_the_app_opens_its_kernel(tmp_path, page):
    srv = start_server(tmp_path)
    try:
        page.goto(srv.app_url, wait_until="commit")
        # the moment of the reported hang: Voilà has launched the page's kernel and is still starting it
        pids = wait_for(lambda: kernels_of(srv), timeout=60, interval=0.05, what="the page's kernel process")
        stop_with(srv, signal.SIGTERM)
        assert_clean_exit(srv, pids)
    finally:
        if srv.process.poll() is None:
            srv.process.kill()
