"""The Sources, Scan and Settings panels without a browser: set widget values, click, assert on the service."""

from __future__ import annotations

import datetime
import io
import time
import zipfile
from pathlib import Path

import pytest

from refact_lab.data.service import ProjectService
from tests.data.conftest import commit, good_py, make_git_repo, write_tree

FILES = {**{f"pkg/m{i}.py": good_py(i) for i in range(6)}, "vendor/lib.py": good_py(40),
         "tests/test_x.py": good_py(41), "README.md": "# demo\n"}


def _upload(name: str, data: bytes) -> dict:
    return {"name": name, "type": "application/octet-stream", "size": len(data), "content": memoryview(data),
            "last_modified": datetime.datetime.now(datetime.timezone.utc)}


@pytest.fixture
def panels(home):
    from refact_lab.ui.scan_panel import ScanPanel
    from refact_lab.ui.sources_panel import SourcesPanel

    service = ProjectService(home)
    sources = SourcesPanel(service)
    scan = ScanPanel(service, poll_s=0.05)
    yield service, sources, scan
    sources.close()
    scan.close()


def _wait_until(predicate, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_add_git_repository_then_update_rescans(panels, tmp_path):
    service, sources, scan = panels
    upstream = make_git_repo(tmp_path / "up", FILES)
    sources.git_url.value = str(upstream.working_tree_dir)
    sources.git_shallow.value = False
    sources.add_git_button.click()
    sources.wait(60)
    assert sources.last_error is None, sources.message.value
    [src] = service.list_sources()
    assert src.kind == "git" and src.commit == upstream.head.commit.hexsha
    assert sources.sources.value == src.id and sources.git_url.value == ""
    assert src.name in scan.sources_info.value     # the Scan tab saw it through the shared service
    scan.fields["lm_filter"].input.value = False
    scan.scan_button.click()
    service.wait_scan(60)
    assert _wait_until(lambda: scan.results is not None and scan.results.stats is not None)
    assert scan.results.stats["files"] == 9

    commit(upstream, {"pkg/new.py": good_py(77)}, "new file")
    sources.update_button.click()
    sources.wait(60)
    assert "1 file(s) changed" in sources.message.value, sources.message.value
    service.wait_scan(60)
    # The re-scan (same settings as the last scan) read only the new file and the Scan tab shows it.
    assert _wait_until(lambda: scan.results.stats["files"] == 10)
    assert scan.results.stats["files_read"] == 1
    assert any(r["path"] == "pkg/new.py" for r in scan.results.accepted)


def test_refused_transport_shows_an_error_and_adds_nothing(panels):
    service, sources, _ = panels
    sources.git_url.value = "ext::sh -c touch% /tmp/refact-lab-panel-pwned"
    sources.add_git_button.click()
    sources.wait(30)
    assert "not allowed" in sources.last_error and "not allowed" in sources.message.value
    assert service.list_sources() == [] and not Path("/tmp/refact-lab-panel-pwned").exists()


def test_upload_files_and_an_archive_and_mark_test(panels):
    service, sources, _ = panels
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("lib/z.py", good_py(9))
    sources.upload.value = (_upload("one.py", good_py(1).encode()), _upload("code.zip", buf.getvalue()))
    sources.as_test.value = True
    sources.add_upload_button.click()
    sources.wait(30)
    assert sources.last_error is None, sources.message.value
    kinds = sorted((s.kind, s.test) for s in service.list_sources())
    assert kinds == [("archive", True), ("upload", True)]
    assert sources.upload.value == ()
    sources.sources.value = service.list_sources()[0].id
    assert sources.test_button.description == "Mark as train"
    sources.test_button.click()
    sources.wait(30)
    assert service.list_sources()[0].test is False


def test_folder_scan_chart_filters_and_force_include(panels, tmp_path):
    service, sources, scan = panels
    root = write_tree(tmp_path / "proj", FILES)
    sources.folder_path.value = str(root)
    sources.add_folder_button.click()
    sources.wait(30)
    assert [s.kind for s in service.list_sources()] == ["folder"]

    scan.fields["exclude"].input.value = "tests/"
    scan.fields["lm_filter"].input.value = False
    scan.scan_button.click()
    assert scan.settings().exclude == ["tests/"]
    service.wait_scan(60)
    # The poller thread notices the end of the job and loads the results by itself.
    assert _wait_until(lambda: scan.results is not None and scan.results.stats is not None)
    assert _wait_until(lambda: "Done" in scan.progress_text.value)
    stats = scan.results.stats
    assert stats["reasons"] == {"excluded_by_mask": 1, "vendored": 1, "type_off": 1}
    assert "<span class='accepted-count'>6</span>" in scan.summary.value
    assert scan.chart_png.startswith(b"\x89PNG") and scan.chart.outputs[0]["data"]["image/png"]
    assert "vendored 1" in scan.chart.outputs[0]["data"]["text/plain"]

    # filters: rejected by reason, then accepted by path
    scan.show.value = "rejected"
    scan.reason.value = "vendored"
    assert [label for label, _ in scan.files.options] == ["vendor/lib.py  ·  Python  ·  vendored: inside vendor/"]
    scan.show.value = "accepted"
    scan.reason.value = "(all)"
    scan.path_filter.value = "m3"
    assert len(scan.files.options) == 1 and scan.files.options[0][1].endswith("/pkg/m3.py")
    scan.show.value = "all"
    scan.path_filter.value = ""
    scan.language.value = "Markdown"
    assert [v for _, v in scan.files.options] == [f"{service.list_sources()[0].id}/README.md"]

    # hold one accepted file out as test
    scan.show.value = "accepted"
    scan.language.value = "(all)"
    scan.path_filter.value = "m2"
    scan.files.value = scan.files.options[0][1]
    scan.test_button.click()
    assert service.overrides()["test"] == [scan.files.value]
    scan.path_filter.value = ""

    # force-include the vendored file and re-run
    scan.show.value = "rejected"
    scan.language.value = "(all)"
    scan.reason.value = "vendored"
    scan.files.value = scan.files.options[0][1]
    scan.include_button.click()
    assert scan.files.value in service.overrides()["include"]
    scan.rerun_button.click()
    service.wait_scan(60)
    assert _wait_until(lambda: scan.results.stats["accepted"] == 7)
    forced = [r for r in scan.results.accepted if r["path"] == "vendor/lib.py"]
    assert forced and forced[0]["forced"] and forced[0]["overridden"]["reason"] == "vendored"
    assert [r["path"] for r in scan.results.accepted if r["set"] == "test"] == ["pkg/m2.py"]


def test_file_types_offered_with_counts_after_a_scan(panels, tmp_path):
    service, sources, scan = panels
    service.add_folder(str(write_tree(tmp_path / "proj", FILES)))
    scan.fields["lm_filter"].input.value = False
    assert scan.start()
    service.wait_scan(60)
    assert _wait_until(lambda: scan.results is not None and scan.results.stats is not None)
    # counted over the files the name rules kept (vendor/ is out), most common first
    assert scan.types.options == (("Python (7)", "Python"), ("Markdown (1)", "Markdown"))
    assert scan.types.value == ("Python",) and scan.types_auto.value
    scan.types_auto.value = False
    scan.types.value = ("Python", "Markdown")
    assert scan.settings().file_types == ["Python", "Markdown"]


def test_scan_without_sources_says_what_to_do(panels):
    _, _, scan = panels
    assert scan.start() is False
    assert "No sources yet" in scan.last_error


def test_settings_panel_generates_the_deploy_key(home):
    from refact_lab.ui.settings_panel import SettingsPanel

    panel = SettingsPanel(ProjectService(home))
    assert panel.public_key.value == "" and str(home.root) in panel.widget.children[0].value
    panel.generate_button.click()
    first = panel.public_key.value
    assert first.startswith("ssh-ed25519 ") and panel.service.deploy_key() == first
    panel.generate_button.click()          # a second click does not silently replace the key
    assert panel.public_key.value == first and "replace" in panel.last_error
    panel.replace_ok.value = True
    panel.generate_button.click()
    assert panel.public_key.value != first and panel.public_key.value.startswith("ssh-ed25519 ")


def test_workbench_wires_the_three_tabs_to_one_service(home):
    from refact_lab.ui.app import Workbench

    wb = Workbench(home)
    sources, scan, settings = wb.panels["Sources"], wb.panels["Scan"], wb.panels["Settings"]
    assert sources.service is scan.service is settings.service
