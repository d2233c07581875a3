"""Export: a PEFT folder that peft loads to the same logits as the checkpoint, a merged transformers folder whose
logits match base + adapter, a card with the data's provenance, and clear refusals that leave nothing behind."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from refact_lab.cli import main
from refact_lab.finetune.export import ExportError, export_checkpoint
from refact_lab.models.loading import MODEL_LOADING
from tests.finetune.conftest import STDLIB, TEST_FILES, TRAIN_FILES, quick_settings

PROMPTS = ["def parse(text):\n    return json.loads(", "class Queue:\n    def __init__(self, maxsize=0):\n"]


@pytest.fixture
def trained(home, learnable_model_dir, tmp_path):
    """A real git repository scanned into the default project, then a 2-step run on the tiny model."""
    from refact_lab.config import ScanSettings
    from refact_lab.data.pipeline import run_scan
    from refact_lab.data.sources import SourceStore
    from refact_lab.finetune import runs
    from tests.data.conftest import make_git_repo

    files = {name.replace("/", "_"): (STDLIB / name).read_text() for name in TRAIN_FILES[:8] + TEST_FILES}
    repo = make_git_repo(tmp_path / "upstream", files)
    SourceStore(home).add_git(repo.working_tree_dir)
    run_scan(home, settings=ScanSettings(lm_filter=False))
    settings = quick_settings(train_steps=2, eval_every=1, checkpoint_every=1, warmup_steps=0)
    run_id = runs.create_run(home, "default", str(learnable_model_dir), settings)
    assert runs.execute_run(home.run_dir(run_id), log=lambda m: None) is not None
    return run_id, repo.head.commit.hexsha


def _logits(model, tokenizer):
    import torch

    with torch.no_grad():
        return [model(**tokenizer(p, return_tensors="pt")).logits for p in PROMPTS]


def _base(model_dir):
    from transformers import AutoModelForCausalLM

    with MODEL_LOADING:
        return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype="float32").eval()


def test_peft_and_merged_load_and_match_the_served_adapter(home, trained, learnable_model_dir, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from refact_lab.finetune.checkpoints import select

    run_id, _ = trained
    ck = select(home, "best", run_id)
    tok = AutoTokenizer.from_pretrained(str(learnable_model_dir))
    served = _logits(PeftModel.from_pretrained(_base(learnable_model_dir), str(ck.path)).eval(), tok)
    plain = _logits(_base(learnable_model_dir), tok)
    # the adapter moved the logits, so matching them below means something
    assert max((a - b).abs().max().item() for a, b in zip(served, plain)) > 1e-4

    peft_dir = export_checkpoint(home, run_id, "best", "peft", tmp_path / "peft").out
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= {p.name for p in peft_dir.iterdir()}
    loaded = _logits(PeftModel.from_pretrained(_base(learnable_model_dir), str(peft_dir)).eval(), tok)
    assert all(torch.equal(a, b) for a, b in zip(loaded, served))

    merged_dir = export_checkpoint(home, run_id, "best", "merged", tmp_path / "merged").out
    names = {p.name for p in merged_dir.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "README.md"} <= names
    assert not any(n.startswith("adapter_") for n in names)
    with MODEL_LOADING:
        merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype="float32").eval()
    merged_tok = AutoTokenizer.from_pretrained(str(merged_dir))
    assert merged_tok("def f(x):")["input_ids"] == tok("def f(x):")["input_ids"]
    for a, b in zip(_logits(merged, merged_tok), served):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()
    assert not list(tmp_path.glob(".*.tmp"))      # no temporary folder left behind


def test_the_card_tells_where_the_model_came_from(home, trained, tmp_path, capsys):
    run_id, commit = trained
    rc = main(["export", "--run", run_id, "--checkpoint", "latest", "--format", "peft", "--out",
               str(tmp_path / "out"), "--home", str(home.root)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    folder = Path(out.strip())
    card = (folder / "README.md").read_text()
    facts = json.loads((folder / "export.json").read_text())
    assert facts["checkpoint"] == "step-000002" and facts["base_model"]["source"]
    assert commit in card and facts["sources"][0]["commit"] == commit and facts["sources"][0]["kind"] == "git"
    manifest = (folder / "training_files.sha256").read_text().splitlines()
    assert len(manifest) == facts["files"]["total"] == len(TRAIN_FILES[:8] + TEST_FILES)
    contents = {name.replace("/", "_"): (STDLIB / name).read_bytes() for name in TRAIN_FILES[:8] + TEST_FILES}
    for line in manifest:   # "<sha256>  <source>/<path>", the hash of what training read
        sha, name = line.split("  ", 1)
        assert sha == hashlib.sha256(contents[name.split("/", 1)[1]]).hexdigest(), name
    for section in ("## Base model", "## Training data", "## Filter stats", "## Metrics", "## Settings",
                    "## Scoreboard", "learning_rate", "test_loss", "not evaluated"):
        assert section in card, section


def test_the_scoreboard_goes_on_the_card_when_the_run_was_evaluated(home, trained, tmp_path):
    from refact_lab.home import atomic_write_json

    run_id, _ = trained
    overall = {"exact_match": 0.25, "edit_similarity": 0.5, "identifier_f1": 0.4, "degenerate": 0.0, "p50_ms": 12.0}
    atomic_write_json(home.run_dir(run_id) / "eval.json", {"project": "default", "cursors": 4, "models": [
        {"name": "tiny", "lora": f"{run_id}/step-000002", "overall": overall, "by_kind": {"multi_line": {
            "n": 4, **overall}}}]})
    card = (export_checkpoint(home, run_id, "step-000002", "peft", tmp_path / "x").out / "README.md").read_text()
    assert "EDIT SIM" in card and "0.500" in card and f"LoRA {run_id}/step-000002" in card


def test_bad_input_is_refused_and_nothing_is_written(home, trained, tmp_path, capsys):
    run_id, _ = trained
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    cases = [(["--run", "nope"], "no run 'nope'"),
             (["--run", run_id, "--checkpoint", "step-999999"], "has no checkpoint 'step-999999'"),
             (["--run", run_id, "--out", str(busy)], "already exists and is not empty")]
    for extra, message in cases:
        argv = ["export", "--format", "peft", "--out", str(tmp_path / "new"), "--home", str(home.root), *extra]
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc == 2 and message in err and "Traceback" not in err, err
        assert err.count("\n") == 1
    assert not (tmp_path / "new").exists()
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    with pytest.raises(ExportError, match="not one of peft, merged"):
        export_checkpoint(home, run_id, "best", "gguf", tmp_path / "g")


def test_a_failure_midway_leaves_no_half_written_export(home, trained, tmp_path, monkeypatch):
    from refact_lab.finetune import export

    run_id, _ = trained
    empty = tmp_path / "empty"
    empty.mkdir()

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "render_card", broken)
    with pytest.raises(OSError):
        export_checkpoint(home, run_id, "best", "peft", empty)
    assert empty.is_dir() and not any(empty.iterdir())
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_an_archive_for_a_download_button(home, trained, tmp_path):
    import zipfile

    from refact_lab.finetune.export import export_archive

    run_id, _ = trained
    archive = export_archive(home, run_id, "best", "peft", tmp_path / "downloads")
    assert archive.suffix == ".zip" and archive.parent == tmp_path / "downloads"
    names = set(zipfile.ZipFile(archive).namelist())
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "training_files.sha256"} <= names
    assert [p.name for p in (tmp_path / "downloads").iterdir()] == [archive.name]   # nothing else left there
