"""The Workbench without a browser: six tabs, every panel loads, and the data tabs share one project service."""

from refact_lab.ui.app import TABS, Workbench


def test_workbench_has_six_working_tabs(home):
    wb = Workbench(home)
    assert list(wb.tabs.titles) == ["Model hosting", "Sources", "Scan", "Fine-tune", "Deploy", "Settings"]
    assert set(wb.panels) == {title for title, _ in TABS}  # no tab fell back to the error panel
    assert wb.panels["Sources"].service is wb.panels["Scan"].service is wb.services.project
    bundle = wb._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle


def test_two_workbenches_on_different_homes_do_not_mix(tmp_path):
    a, b = Workbench(tmp_path / "a"), Workbench(tmp_path / "b")
    assert a.services.project is not b.services.project
    assert a.services.project.home.root != b.services.project.home.root
