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


def _click_row(scan, row: int) -> None:
    """What the browser sends when a grid row is clicked (ipydatagrid's cell-click message, `row` in the data)."""
    scan.grid._handle_custom_msg({"event_type": "cell-click", "region": "body", "column": "file",
                                  "column_index": 0, "row": row, "primary_key_row": row,
                                  "cell_value": scan.rows()[row]["file"]}, [])


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

    # filters: rejected by reason, then accepted by path; the grid's rows name the source, not its id
    scan.show.value = "rejected"
    scan.reason.value = "vendored"
    assert scan.rows() == [{"file": "vendor/lib.py", "source": "folder: proj", "outcome": "vendored",
                            "detail": "inside vendor/", "set": "train", "language": "Python", "loss": "",
                            "KiB": scan.rows()[0]["KiB"]}]
    assert list(scan.grid.data["source"]) == ["folder: proj"] and list(scan.grid.data["file"]) == ["vendor/lib.py"]
    scan.show.value = "accepted"
    scan.reason.value = "(all)"
    scan.path_filter.value = "m3"
    assert len(scan.keys()) == 1 and scan.keys()[0].endswith("/pkg/m3.py")
    scan.show.value = "all"
    scan.path_filter.value = ""
    scan.language.value = "Markdown"
    assert scan.keys() == [f"{service.list_sources()[0].id}/README.md"]

    # hold one accepted file out as test
    scan.show.value = "accepted"
    scan.language.value = "(all)"
    scan.path_filter.value = "m2"
    _click_row(scan, 0)
    assert "pkg/m2.py" in scan.selected_info.value and "folder: proj" in scan.selected_info.value
    scan.test_button.click()
    assert service.overrides()["test"] == [scan.selected_key] and scan.selected_key.endswith("/pkg/m2.py")
    scan.path_filter.value = ""

    # force-include the vendored file and re-run
    scan.show.value = "rejected"
    scan.language.value = "(all)"
    scan.reason.value = "vendored"
    _click_row(scan, 0)
    scan.include_button.click()
    assert scan.selected_key in service.overrides()["include"] and scan.selected_key.endswith("/vendor/lib.py")
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


def test_forms_show_human_labels_from_the_settings_metadata(home):
    """Scan and Fine-tune forms label fields from one place (config.field_label), never the raw field name."""
    from refact_lab.config import FinetuneSettings, ScanSettings, field_specs
    from refact_lab.finetune.runs import RunService
    from refact_lab.ui.finetune_panel import FinetunePanel
    from refact_lab.ui.scan_panel import ScanPanel

    scan = ScanPanel(ProjectService(home), poll_s=0)
    assert scan.fields["max_file_kib"].label == "Max file size (KiB)"
    assert scan.fields["lm_filter"].label == "Loss filter (stage 2)"
    finetune = FinetunePanel(RunService(home), poll_s=0)
    assert finetune.fields["lr_decay_steps"].label == "LR decay steps"
    assert finetune.fields["low_gpu_mem_mode"].label == "Low GPU memory mode"
    for panel, cls in ((scan, ScanSettings), (finetune, FinetuneSettings)):
        for spec in field_specs(cls):
            if spec["name"] in panel.fields:
                label = panel.fields[spec["name"]].label
                assert label == spec["label"] and "_" not in label, (spec["name"], label)
    scan.close()


def test_auto_loss_threshold_shows_the_value_the_scan_applied(panels, tmp_path):
    """The embedded model's registry threshold (4.0) is applied by an auto scan: the form says 4, not 0."""
    from refact_lab.models.registry import resolve

    service, _, scan = panels
    applied = resolve("default").loss_threshold
    assert applied not in (0, 3.0)  # else this test could not tell the model's value from a fallback
    field = scan.fields["loss_threshold"]
    assert field.auto.value and field.get() is None
    assert field.input.value == applied and f"auto: {applied:g} (the model's default)" in field.hint.value
    service.add_folder(str(write_tree(tmp_path / "proj", FILES)))
    scan.fields["max_file_kib"].input.value = 64
    assert scan.start()
    service.wait_scan(300)
    assert _wait_until(lambda: scan.results is not None and (scan.results.stats or {}).get("loss"), 60)
    assert scan.results.stats["loss"]["threshold"] == applied
    assert field.input.value == applied and f"auto: {applied:g} (applied by the last scan)" in field.hint.value
    assert field.get() is None and scan.settings().loss_threshold is None  # still auto for the next scan
    scan.show.value = "all"
    losses = {r["file"]: r["loss"] for r in scan.rows()}
    assert float(losses["pkg/m1.py"]) > 0 and losses["vendor/lib.py"] == ""   # stage 2 never saw vendor/


def test_adding_the_same_source_twice_says_so_and_adds_nothing(panels, tmp_path):
    service, sources, _ = panels
    root = write_tree(tmp_path / "proj", FILES)
    for _ in range(2):
        sources.folder_path.value = str(root)
        sources.add_folder_button.click()
        sources.wait(30)
    assert "already a source of this project" in sources.last_error and "folder: proj" in sources.last_error
    assert "already a source" in sources.message.value and len(service.list_sources()) == 1


def test_rescan_hint_after_the_sources_change(panels, tmp_path):
    service, sources, scan = panels
    service.add_folder(str(write_tree(tmp_path / "proj", FILES)))
    assert scan.stale_hint.value == ""             # no scan yet: nothing to call stale
    scan.fields["lm_filter"].input.value = False
    assert scan.start()
    service.wait_scan(60)
    assert _wait_until(lambda: scan.results is not None and scan.results.stats is not None)
    assert scan.stale_hint.value == ""
    sources.folder_path.value = str(write_tree(tmp_path / "more", {"lib/extra.py": good_py(90)}))
    sources.add_folder_button.click()            # through the Sources tab: the Scan tab hears of it
    sources.wait(30)
    assert "rescan" in scan.stale_hint.value and "source &#x27;more&#x27; was added" in scan.stale_hint.value
    assert scan.results.stats["files"] == 9       # the previous results still show, under the hint
    scan.scan_button.click()
    service.wait_scan(60)
    assert _wait_until(lambda: scan.stale_hint.value == "" and scan.results.stats["files"] == 10)
