"""Export a checkpoint so it can be served elsewhere: a PEFT adapter folder or a merged transformers model.

    peft    adapter_config.json + adapter_model.safetensors: what `peft.PeftModel.from_pretrained(base, DIR)`
            and vLLM's `--lora-modules name=DIR` load, next to the base model they were trained on;
    merged  the base model with the adapter merged into its weights (`merge_and_unload`), saved as
            safetensors with its tokenizer and generation config: a plain `AutoModelForCausalLM` folder,
            which llama.cpp's converter can turn into GGUF for Ollama.

Both carry a card (README.md): the base model, the sources with their commits, the training files (count, and
`training_files.sha256`, a manifest of what training read), the scan's filter stats, the settings, the
checkpoint's metrics and the scoreboard when the run was evaluated; `export.json` holds the same facts for
programs. The checkpoint is chosen the way serving chooses it (`checkpoints.select`: best, latest or a name).

The export is written into a temporary folder beside `out` and renamed into place at the end, so a failure
(a full disk, a model that cannot load) leaves no half-written folder, and an `out` that exists and is not empty
is refused before any work. torch, transformers and peft are imported inside `export_checkpoint`.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import secrets as _random
import shutil
from dataclasses import dataclass
from pathlib import Path

from refact_lab.finetune.checkpoints import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, Checkpoint, adapter_problem,
                                             read_checkpoint, select)
from refact_lab.home import Home, read_json, read_json_object

FORMATS = ("peft", "merged")
CARD = "README.md"
FACTS = "export.json"
MANIFEST = "training_files.sha256"


class ExportError(ValueError):
    """Bad input (no such run or checkpoint, a folder that is not empty, an unknown format): one clear line."""


@dataclass(frozen=True)
class ExportResult:
    out: Path
    format: str
    run_id: str
    checkpoint: str
    base_model: str
    files: list[str]     # names written into `out`


def resolve_checkpoint(home: Home, run_id: str, checkpoint: str = "best") -> Checkpoint:
    """best / latest / a checkpoint name of `run_id`, as serving resolves it. Raises ExportError."""
    if not run_id:
        raise ExportError("--run is required: the run whose checkpoint to export (see `refact-lab runs`)")
    if not (home.run_dir(run_id) / "settings.json").is_file():
        raise ExportError(f"no run {run_id!r} in {home.runs_dir}")
    mode = checkpoint if checkpoint in ("best", "latest") else "checkpoint"
    try:
        found = select(home, mode, run_id, None if mode != "checkpoint" else checkpoint)
    except ValueError as e:
        raise ExportError(str(e)) from None
    if found is None or not found.loadable:
        raise ExportError(f"run {run_id} has no complete checkpoint {checkpoint!r}")
    return found


def check_out(out: Path) -> Path:
    """The export folder must not exist or be empty, and must be a folder that can be made; refused before any
    work."""
    out = Path(out).expanduser().absolute()
    if out.is_dir():
        if any(out.iterdir()):
            raise ExportError(f"{out} already exists and is not empty: choose a new folder or empty it first")
    elif out.exists():
        raise ExportError(f"{out} is a file, not a folder: choose a new folder")
    else:
        # it will be created inside its nearest existing parent, which must be a folder
        parent = next(p for p in out.parents if p.exists())
        if not parent.is_dir():
            raise ExportError(f"{out} cannot be created: {parent} is a file, not a folder")
    return out


def _run_file(path: Path) -> dict:
    """A JSON object of the run folder (settings.json, status.json); ExportError naming it when it is damaged."""
    try:
        return read_json_object(path)
    except ValueError as e:
        raise ExportError(str(e)) from None


def export_checkpoint(home: Home, run_id: str, checkpoint: str = "best", fmt: str = "peft",
                      out: str | Path = "", *, log=None) -> ExportResult:
    """Write checkpoint `checkpoint` of run `run_id` to `out` in format `fmt` ("peft" or "merged").
    The service the CLI (`refact-lab export`) and a Deploy download button call."""
    if fmt not in FORMATS:
        raise ExportError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
    if not out:
        raise ExportError("--out is required: the folder to write the export into")
    out = check_out(Path(out))
    ck = resolve_checkpoint(home, run_id, checkpoint)
    run_settings = _run_file(home.run_dir(run_id) / "settings.json")
    say = log or (lambda message: None)

    tmp = out.parent / f".{out.name}.export-{_random.token_hex(4)}.tmp"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except FileNotFoundError as e:
        # mkdir in a folder that exists, yet "No such file or directory": a place that takes no new folders (/proc)
        raise ExportError(f"cannot create {out}: {Path(e.filename).parent} does not take new folders") from None
    try:
        # a damaged adapter would fail the merge with a library traceback, or be copied into a PEFT export that
        # fails wherever it is loaded: refuse it naming the file
        problem = adapter_problem(ck.path)
        if problem:
            raise ExportError(f"checkpoint {ck.key} is damaged: {problem}; export another checkpoint "
                              "(--checkpoint, see `refact-lab runs`)")
        if fmt == "peft":
            for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
                shutil.copy2(ck.path / name, tmp / name)
        else:
            say(f"merging {ck.key} into {run_settings.get('model_name') or run_settings.get('model')}")
            _write_merged(run_settings["model"], ck.path, tmp)
        facts = card_facts(home, run_id, ck, fmt)
        manifest = facts.pop("_manifest")
        (tmp / MANIFEST).write_text("".join(f"{sha}  {name}\n" for name, sha in manifest), encoding="utf-8")
        (tmp / FACTS).write_text(json.dumps(facts, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
        (tmp / CARD).write_text(render_card(facts), encoding="utf-8")
        files = sorted(p.name for p in tmp.iterdir())
        if out.exists():
            check_out(out)      # it may have filled up while we worked
            out.rmdir()         # empty: the rename takes its place
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"exported {ck.key} ({fmt}) to {out}")
    return ExportResult(out, fmt, run_id, ck.name, str(run_settings.get("model")), files)


def export_archive(home: Home, run_id: str, checkpoint: str, fmt: str, folder: str | Path) -> Path:
    """The export as one .zip in `folder` (what a download button hands the browser). The zip is built beside
    the export in a temporary folder and renamed into place, so a full disk leaves no truncated .zip."""
    import tempfile

    Path(folder).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        result = export_checkpoint(home, run_id, checkpoint, fmt, Path(tmp) / f"{run_id}-{checkpoint}-{fmt}")
        archive = shutil.make_archive(str(Path(tmp) / "archive"), "zip", root_dir=result.out)
        final = Path(folder) / f"{run_id}-{result.checkpoint}-{fmt}.zip"
        os.replace(archive, final)
        return final


def _write_merged(model: str, adapter: Path, tmp: Path) -> None:
    """Base + adapter merged in fp32 (so the merge adds no rounding of its own), then saved in the base's own
    precision, with the tokenizer and the generation config the base ships."""
    import torch
    from peft import PeftModel

    from refact_lab.models.loading import MODEL_LOADING, load_model, load_tokenizer
    from refact_lab.models.registry import resolve

    spec = resolve(model)
    base = load_model(spec, device="cpu", dtype="float32")
    stored = getattr(base.config, "dtype", None) or getattr(base.config, "torch_dtype", None)
    with MODEL_LOADING:
        merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    if isinstance(stored, torch.dtype) and stored != torch.float32:
        merged = merged.to(stored)
    merged.save_pretrained(str(tmp), safe_serialization=True)
    merged.generation_config.save_pretrained(str(tmp))
    load_tokenizer(spec).save_pretrained(str(tmp))


# --- the card ---------------------------------------------------------------------------------------------

_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


def _safe_url(text) -> str:
    """A source's origin without user:password@ (the card is meant to travel)."""
    return _USERINFO.sub("", str(text or ""))


def card_facts(home: Home, run_id: str, ck: Checkpoint, fmt: str) -> dict:
    """Everything the card says, as data. The training files are the project's current scan; when that scan
    finished after the run was created the card says so, since the run may have read an earlier one."""
    from refact_lab.data import results

    run_dir = home.run_dir(run_id)
    settings = _run_file(run_dir / "settings.json")
    status = _run_file(run_dir / "status.json")
    project = settings.get("project") or status.get("project") or "default"
    scan = results.read_results(home, project)
    stats = scan.stats or {}
    created = settings.get("created_at")
    scan_after_run = bool(created and stats.get("finished_at")
                          and _dt.datetime.fromisoformat(stats["finished_at"]).timestamp() > float(created))
    sources = []
    for s in stats.get("sources") or []:
        doc = read_json(home.sources_dir(project) / str(s.get("id")) / "source.json", {}) or {}
        sources.append({"name": s.get("display_name") or s.get("name"), "kind": s.get("kind"),
                        "origin": _safe_url(s.get("origin")), "branch": doc.get("branch"),
                        "commit": s.get("commit") or doc.get("commit"), "test": bool(s.get("test"))})
    manifest = sorted((f"{r.get('source_name') or r.get('source')}/{r.get('path')}", r.get("sha256") or "")
                      for r in scan.accepted)
    ckpt = read_checkpoint(ck.path)
    evaluation = read_json(run_dir / "eval.json", None)
    return {
        "exported_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "format": fmt,
        "run_id": run_id,
        "checkpoint": ck.name,
        "step": ck.step,
        "best": ck.name == getattr(select(home, "best", run_id), "name", None),
        "base_model": {"name": settings.get("model_name") or status.get("model"), "source": settings.get("model")},
        "project": project,
        "sources": sources,
        "files": {"total": len(scan.accepted), "train": sum(1 for r in scan.accepted if r.get("set") != "test"),
                  "test": sum(1 for r in scan.accepted if r.get("set") == "test"),
                  "redacted": sum(1 for r in scan.accepted if r.get("redacted")), "manifest": MANIFEST},
        "scan": {"finished_at": stats.get("finished_at"), "after_run_created": scan_after_run,
                 "accepted": stats.get("accepted"), "rejected": stats.get("rejected"),
                 "reasons": stats.get("reasons") or {}, "secrets": stats.get("secrets"),
                 "settings": stats.get("settings")},
        "finetune_settings": settings.get("finetune") or ckpt.get("settings", {}).get("finetune") or {},
        "metrics": ckpt.get("metrics") or {},
        "scoreboard": _scoreboard(evaluation),
        "_manifest": manifest,
    }


def _scoreboard(evaluation: dict | None) -> dict | None:
    if not evaluation or not evaluation.get("models"):
        return None
    from refact_lab.scoreboard.runner import format_table

    try:
        table = format_table(evaluation)
    except (KeyError, TypeError):
        table = None
    return {"cursors": evaluation.get("cursors"), "table": table,
            "models": [{k: m.get(k) for k in ("name", "lora", "overall")} for m in evaluation["models"]]}


def render_card(f: dict) -> str:
    base = f["base_model"]
    lines = [f"# {f['run_id']} / {f['checkpoint']}: LoRA fine-tune of {base['name']}", "",
             f"Exported by refact-lab on {f['exported_at']} as **{f['format']}**"
             + (" (the run's best checkpoint)." if f["best"] else "."), ""]
    if f["format"] == "peft":
        lines += ["A PEFT LoRA adapter: load it on top of the base model it was trained on.", "", "```python",
                  "from peft import PeftModel", "from transformers import AutoModelForCausalLM",
                  f"base = AutoModelForCausalLM.from_pretrained({base['source']!r})",
                  "model = PeftModel.from_pretrained(base, 'THIS_FOLDER')", "```", "",
                  f"vLLM: `vllm serve {base['source']} --enable-lora --lora-modules {f['run_id']}=THIS_FOLDER`", ""]
    else:
        lines += ["The base model with the adapter merged into its weights: a plain transformers model.", "",
                  "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  "model = AutoModelForCausalLM.from_pretrained('THIS_FOLDER')",
                  "tokenizer = AutoTokenizer.from_pretrained('THIS_FOLDER')", "```", ""]
    lines += ["## Base model", "", f"- name: {base['name']}", f"- source: {base['source']}", "",
              "## Training data", "", f"Project `{f['project']}`, scan finished {f['scan']['finished_at']}."]
    if f["scan"]["after_run_created"]:
        lines.append("Note: that scan finished after the run was created, so the run may have read an earlier one.")
    lines += ["", "| source | kind | origin | branch | commit | held out |", "|---|---|---|---|---|---|"]
    lines += [f"| {s['name']} | {s['kind']} | {s['origin']} | {s['branch'] or ''} | {s['commit'] or ''} | "
              f"{'yes' if s['test'] else ''} |" for s in f["sources"]]
    files = f["files"]
    lines += ["", f"{files['total']} files ({files['train']} train, {files['test']} test"
              + (f", {files['redacted']} with secrets redacted" if files["redacted"] else "")
              + f"); their sha256 are in `{files['manifest']}` (`sha256sum` format).", "",
              "## Filter stats", "", f"Accepted {f['scan']['accepted']}, rejected {f['scan']['rejected']}.", ""]
    if f["scan"]["reasons"]:
        lines += ["| reason | files |", "|---|---|"] + [f"| {k} | {v} |" for k, v in f["scan"]["reasons"].items()]
    if f["scan"]["secrets"]:
        s = f["scan"]["secrets"]
        lines += ["", f"Secrets filter: {s.get('mode')}; {s.get('files_with_secrets')} of {s.get('files_checked')} "
                  f"files held credentials, {s.get('redacted')} redacted."]
    lines += ["", "## Metrics", "", "```json", json.dumps(f["metrics"], indent=2, sort_keys=True), "```", "",
              "## Settings", "", "Fine-tuning:", "", "```json", json.dumps(f["finetune_settings"], indent=2,
                                                                           sort_keys=True, default=str), "```",
              "", "Scan:", "", "```json", json.dumps(f["scan"]["settings"], indent=2, sort_keys=True, default=str),
              "```", ""]
    board = f["scoreboard"]
    lines += ["## Scoreboard", ""]
    if board and board.get("table"):
        lines += ["```", board["table"], "```", ""]
    else:
        lines += ["The run was not evaluated (`refact-lab eval --run RUN`).", ""]
    return "\n".join(lines)
