"""`refact-lab eval`: the printed JSON shape, persisted results and repeatability, through the real engine with
the embedded default model and real LoRA checkpoints."""

from __future__ import annotations

import json

import pytest

from refact_lab.cli import main
from refact_lab.scoreboard import results
from refact_lab.scoreboard.cursors import KINDS

FIELDS = {"exact_match", "edit_similarity", "identifier_f1", "named_right", "degenerate", "p50_ms"}


def _eval(capsys, *args) -> tuple[int, str, str]:
    code = main(["eval", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _without_latency(report: dict) -> dict:
    for m in report["models"]:
        m["overall"].pop("p50_ms")
        for agg in m["by_kind"].values():
            agg.pop("p50_ms")
    return report


def test_json_shape_persistence_and_repeatability(home, default_run, capsys):
    args = ["--project", "stdlib", "--home", str(home.root), "--checkpoint", "best", "--checkpoint", "step-000008",
            "--cursors", "5", "--json"]
    code, out, err = _eval(capsys, *args)
    assert code == 0, err
    report = json.loads(out)
    assert set(report) == {"project", "cursors", "context", "models"} and report["project"] == "stdlib"
    assert report["context"] == "off"   # the default: scores comparable with those measured before context
    assert report["cursors"] == 5
    assert [(m["name"], m["lora"]) for m in report["models"]] == [
        ("default", None), ("default+run-a/step-000004", "run-a/step-000004"),
        ("default+run-a/step-000008", "run-a/step-000008")]
    for m in report["models"]:
        assert set(m["overall"]) == FIELDS and set(m["by_kind"]) == set(KINDS)
        assert sum(k["n"] for k in m["by_kind"].values()) == 5
        assert all(set(k) == FIELDS | {"n"} for k in m["by_kind"].values())
        assert 0 <= m["overall"]["edit_similarity"] <= 1 and m["overall"]["p50_ms"] > 0
    # a LoRA with random weights completes differently from the base model
    comps = results.run_eval(home, "run-a")["details"]["completions"]
    assert comps["base"] != comps["run-a/step-000004"]
    # persisted under the run and the project
    saved = results.run_eval(home, "run-a")
    assert results.public(saved) == report
    assert len(results.history(home, "stdlib")) == 1
    # the same inputs print the same numbers (latency aside)
    code, out2, err = _eval(capsys, *args)
    assert code == 0, err
    assert _without_latency(json.loads(out2)) == _without_latency(report)
    assert len(results.history(home, "stdlib")) == 2
    # the samples the app shows: cursors where the checkpoint gained or lost, with the expected text
    s = results.samples(saved, "run-a/step-000004")
    assert all(r["delta"] > 0 and r["expected"] for r in s["gained"]) and all(r["delta"] < 0 for r in s["lost"])


def test_readable_table_and_bad_input(home, stdlib_eval_project, capsys):
    code, out, err = _eval(capsys, "--project", "stdlib", "--home", str(home.root), "--cursors", "5",
                           "--checkpoint", "off")
    assert code == 0, err
    assert "(base model, LoRA off)" in out and "newline_indent" in out and "overall" in out
    assert results.latest(home, "stdlib")["models"][0]["lora"] is None
    code, _, err = _eval(capsys, "--project", "nope", "--home", str(home.root))
    assert code == 2 and err.count("\n") == 1 and "not been scanned" in err
    code, _, err = _eval(capsys, "--project", "stdlib", "--home", str(home.root), "--checkpoint", "best")
    assert code == 2 and err.count("\n") == 1 and "no run with a checkpoint" in err
    code, _, err = _eval(capsys, "--project", "stdlib", "--home", str(home.root), "--cursors", "0")
    assert code == 2 and "--cursors" in err


def test_context_on_retrieves_from_the_project_index(home, stdlib_eval_project, capsys):
    from refact_lab.context.index import build_index
    from refact_lab.finetune.dataset import accepted_path

    records = [{**r, "file": str(home.sources_dir("stdlib") / r["source"] / r["path"])}
               for r in map(json.loads, accepted_path(home, "stdlib").read_text().splitlines())]
    build_index(home, "stdlib", records)
    base = ["--project", "stdlib", "--home", str(home.root), "--cursors", "4", "--checkpoint", "off", "--json"]
    code, out, err = _eval(capsys, *base, "--context", "on", "--context-tokens", "256")
    assert code == 0, err
    report = json.loads(out)
    assert report["context"] == "on" and report["cursors"] == 4
    assert report["cursors_with_context"] > 0      # snippets came from the index (the test files' own excluded)
    assert set(report["models"][0]["overall"]) == FIELDS
    assert results.public(results.latest(home, "stdlib")) == report
    with pytest.raises(SystemExit) as bad:   # argparse's one-line usage error
        _eval(capsys, *base, "--context", "maybe")
    assert bad.value.code == 2
