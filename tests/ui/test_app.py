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


def test_journey_bar_names_the_five_steps_and_opens_their_tabs(home):
    wb = Workbench(home)
    assert [b.description for b in wb.steps] == ["1 Model", "2 Sources", "3 Scan", "4 Fine-tune", "5 Deploy"]
    assert wb.widget.children[1].children[0] is wb.steps[0]      # above the tabs, the first thing after the title
    assert [b.button_style for b in wb.steps] == ["info", "", "", "", ""]   # the app opens on step 1
    wb.steps[2].click()
    assert wb.tabs.titles[wb.tabs.selected_index] == "Scan"
    assert [b.button_style for b in wb.steps] == ["", "", "info", "", ""]


def test_opening_the_deploy_tab_rereads_runs_written_meanwhile(home, tmp_path):
    from tests.serve.helpers import build_varied_model, make_run

    wb = Workbench(home)
    deploy = wb.panels["Deploy"]
    assert deploy.run.options == ()
    make_run(home, "run-a", build_varied_model(tmp_path / "m"), [10], [2.0], seed=1)   # e.g. a CLI run
    wb.tabs.selected_index = wb.tabs.titles.index("Deploy")
    assert [v for _, v in deploy.run.options] == ["run-a"]
