"""The real server on a free port: /v1/health behind the token, JSON errors, Ctrl-C stops it cleanly."""

import json
import urllib.error
import urllib.request

from tests.conftest import RunningServer


def fetch(url, headers=None):
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def test_health_needs_the_token(server):
    status, headers, body = fetch(f"{server.url}/v1/health")
    assert status in (401, 403)
    assert headers["Content-Type"].startswith("application/json")
    assert "token" in json.loads(body)["error"]["message"]

    status, _, body = fetch(f"{server.url}/v1/health", {"Authorization": "Bearer wrong"})
    assert status in (401, 403)

    status, _, body = fetch(f"{server.url}/v1/health", server.headers)
    assert status == 200
    info = json.loads(body)
    assert info["version"] and info["home"] == str(server.home_dir.resolve())


def test_app_and_lab_are_served_on_the_same_port(server):
    status, _, body = fetch(f"{server.url}/voila/render/workbench.ipynb?token={server.token}")
    assert status == 200 and b"voila" in body.lower()
    status, _, body = fetch(f"{server.url}/lab?token={server.token}")
    assert status == 200 and b"JupyterLab" in body
    # `/` sends the browser to the app
    req = urllib.request.Request(f"{server.url}/?token={server.token}")
    opener = urllib.request.build_opener(type("NoRedirect", (urllib.request.HTTPRedirectHandler,),
                                              {"redirect_request": lambda *a, **k: None}))
    try:
        opener.open(req, timeout=10)
        raise AssertionError("expected a redirect")
    except urllib.error.HTTPError as e:
        assert e.code in (301, 302) and "/voila/render/workbench.ipynb" in e.headers["Location"]


def test_no_auth_on_loopback_and_clean_ctrl_c(tmp_path):
    srv = RunningServer(tmp_path / "home", token=None).wait_ready()
    try:
        status, _, body = fetch(f"{srv.url}/v1/health")
        assert status == 200 and json.loads(body)["status"] == "ok"
        assert (tmp_path / "home" / "settings.json").is_file()  # state directory created on first start
    finally:
        code = srv.stop()
    assert code == 0, srv.log()[-2000:]
    assert "refact_lab stopped" in srv.log()
