"""Hostile input for the scoreboard: damaged results on disk and files whose cursors would not be IDE-like.
Fast: no engine, the results are written as an evaluation would write them."""

from __future__ import annotations

import json

from refact_lab.scoreboard import results
from refact_lab.scoreboard.metrics import FIELDS


def _evaluation(project: str, lora: str, es: float, fingerprint: str = "f1") -> tuple[dict, dict]:
    overall = {k: 0.5 for k in FIELDS} | {"edit_similarity": es}
    report = {"project": project, "cursors": 1, "context": "off",
              "models": [{"name": "m", "lora": None, "overall": overall, "by_kind": {}},
                         {"name": f"m+{lora}", "lora": lora, "overall": overall, "by_kind": {}}]}
    row = {"id": "c1", "text": "x", "exact_match": 0.0, "edit_similarity": es}
    details = {"fingerprint": fingerprint, "cursors": [], "completions": {"base": [row], lora: [row]}}
    return report, details


def test_a_damaged_run_eval_json_is_replaced_by_the_new_evaluation_and_kept_aside(home):
    run_dir = home.run_dir("run-a")
    run_dir.mkdir(parents=True)
    (run_dir / "eval.json").write_text('{"models": [{"lora": "run-a/st')   # cut off mid-write
    report, details = _evaluation("p", "run-a/step-000002", 0.7)
    results.save(home, report, details, seed=1)     # raised ValueError after the whole evaluation had run
    saved = results.run_eval(home, "run-a")
    assert [m["lora"] for m in saved["models"]] == [None, "run-a/step-000002"]
    assert (run_dir / "eval.json.damaged").read_text().startswith('{"models"')
    # and the next evaluation over the same cursors merges with it as usual
    report, details = _evaluation("p", "run-a/step-000004", 0.8)
    results.save(home, report, details, seed=1)
    assert [m["lora"] for m in results.run_eval(home, "run-a")["models"]] == [
        None, "run-a/step-000002", "run-a/step-000004"]
    assert len(results.history(home, "p")) == 2
    assert json.loads((home.project_dir("p") / "eval" / "latest.json").read_text())["models"][1]["lora"] == \
        "run-a/step-000004"


def test_a_huge_single_line_gives_no_cursors_and_does_not_outweigh_the_code():
    from refact_lab.scoreboard.cursors import MAX_LINE_CHARS, sample_cursors

    code = "def total(items):\n    s = 0\n    for x in items:\n        s += x\n    return s\n"
    blob = "DATA = [" + ", ".join(str(i) for i in range(20000)) + "]\n"   # 100 KiB on one line
    files = [("data.py", "def load():\n    return DATA\n" + blob), ("calc.py", code)]
    cursors = sample_cursors(files, 50, seed=1)
    assert cursors and all(len(c.expected) <= MAX_LINE_CHARS for c in cursors)
    assert not any(c.file == "data.py" and c.line == 3 for c in cursors)   # none inside the blob line
    assert any(c.file == "calc.py" for c in cursors)


def test_the_panel_says_a_stored_scoreboard_is_damaged_instead_of_raising(home):
    from refact_lab.scoreboard.service import ScoreboardService
    from refact_lab.ui.scoreboard_panel import ScoreboardPanel

    run_dir = home.run_dir("run-a")
    run_dir.mkdir(parents=True)
    service = ScoreboardService(home)
    for text in ('{"models": [{"lora": "run-a/st', '{"models": 3}', "[]"):
        (run_dir / "eval.json").write_text(text)
        panel = ScoreboardPanel(service, run_id="run-a")   # refreshes: it raised before
        assert "eval.json is" in panel.summary.value and "Evaluate replaces it" in panel.summary.value, text
        assert not panel.chart.outputs and not panel.samples.value
    report, details = _evaluation("p", "run-a/step-000002", 0.7)
    results.save(home, report, details, seed=1)
    panel.refresh()
    assert "m+run-a/step-000002" in panel.summary.value
