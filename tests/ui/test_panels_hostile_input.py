"""Panels over damaged state and state that changes under them: they say what is wrong instead of raising into
the notebook, and a button never silently does nothing. Python only: build the panel, damage files, click."""

from __future__ import annotations

import json

from refact_lab.config import ScanSettings
from refact_lab.data.service import ProjectService


def _folder(tmp_path, name="proj"):
    d = tmp_path / name
    d.mkdir()
    (d / "a.py").write_text("def f(x):\n    return x + 1\n" * 5)
    return d


def test_sources_buttons_on_a_source_removed_elsewhere_say_so_and_refresh(home, tmp_path):
    from refact_lab.ui.sources_panel import SourcesPanel

    panel = SourcesPanel(ProjectService(home), background=False)
    panel.folder_path.value = str(_folder(tmp_path))
    panel.add_folder_button.click()
    assert panel.last_error is None and panel.sources.value
    ProjectService(home).remove_source(panel.sources.value)   # another kernel: this panel is not told
    for button in (panel.test_button, panel.remove_button):
        panel.message.value = ""
        button.click()
        assert panel.last_error and "gone" in panel.last_error
    assert panel.sources.options == () and panel.sources.value is None   # the list shows what is left
    panel.close()


def test_sources_and_scan_panels_show_a_damaged_source_json_instead_of_raising(home, tmp_path):
    from refact_lab.ui.scan_panel import ScanPanel
    from refact_lab.ui.sources_panel import SourcesPanel

    service = ProjectService(home)
    service.add_folder(str(_folder(tmp_path)))
    service.run_scan(ScanSettings(lm_filter=False))
    [source_json] = home.root.rglob("sources/*/source.json")
    source_json.write_text("{not json")
    service = ProjectService(home)
    sources = SourcesPanel(service, background=False)
    scan = ScanPanel(service, poll_s=0)
    assert "source.json" in sources.last_error and "source.json" in sources.message.value
    assert "source.json" in scan.sources_info.value
    assert scan.start() is False and "source.json" in scan.last_error     # Scan says why, not a traceback
    sources.close()
    scan.close()


def test_scan_panel_shows_damaged_results_instead_of_raising(home, tmp_path):
    from refact_lab.ui.scan_panel import ScanPanel

    service = ProjectService(home)
    service.add_folder(str(_folder(tmp_path, "a<b>&'\"")))
    service.run_scan(ScanSettings(lm_filter=False))
    [stats] = home.root.rglob("results/*/stats.json")
    stats.write_text("{not json")
    scan = ScanPanel(ProjectService(home), poll_s=0)
    assert "stats.json" in scan.last_error and "scan again" in scan.last_error
    assert scan.results is None and scan.rows() == []
    scan.close()


def test_finetune_panel_shows_a_run_with_damaged_status_instead_of_raising(home):
    from refact_lab.finetune.runs import RunService
    from refact_lab.ui.finetune_panel import FinetunePanel

    for run_id, status in (("good", json.dumps({"state": "stopped", "step": 3, "total": 10, "created_at": 2})),
                           ("broken", "{not json")):
        path = home.runs_dir / run_id
        path.mkdir(parents=True)
        (path / "settings.json").write_text("{}")
        (path / "status.json").write_text(status)
    panel = FinetunePanel(RunService(home), poll_s=0)
    assert {v for _, v in panel.runs.options} == {"good", "broken"}
    panel.runs.value = "broken"            # listed as broken by the service; selecting it must not raise
    assert "broken" in panel.progress_text.value and "status.json is not valid JSON" in panel.progress_text.value
    assert "no checkpoint yet" in panel.checkpoints.value   # its checkpoints still list (none here)
    panel.runs.value = "good"
    assert "stopped" in panel.progress_text.value and "no checkpoint yet" in panel.checkpoints.value
    panel.close()
