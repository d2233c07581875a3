"""Helpers for serving tests: a tiny model whose output depends on its input, real LoRA checkpoints in the runs
layout, and small HTTP helpers for the real server."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"]


def build_varied_model(folder: Path) -> Path:
    """The tiny random Llama, re-initialised with larger weights so different prompts give different text
    (the default init gives near-uniform logits and the same token over and over)."""
    import torch
    from transformers import AutoModelForCausalLM

    from refact_lab.models.tokenizer_build import build_tiny_model

    from refact_lab.models.loading import MODEL_LOADING

    build_tiny_model(folder)
    with MODEL_LOADING:  # an engine may be loading in another thread of this process
        model = AutoModelForCausalLM.from_pretrained(folder)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.15)
    model.save_pretrained(folder)
    return folder


def save_lora(model_dir: Path, out: Path, seed: int) -> Path:
    """A real peft LoRA adapter for the tiny model, with random (non-zero) weights so it changes the output."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from refact_lab.models.loading import MODEL_LOADING

    with MODEL_LOADING:
        base = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, lora_dropout=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.4)
    model.save_pretrained(out)
    return out


def make_run(home, run_id: str, model_dir: Path, steps: list[int], losses: list[float], seed: int = 0,
             created_at: float | None = None) -> list[Path]:
    """A finished run in refact_lab.finetune's layout with one real adapter per step; best = lowest loss."""
    from refact_lab.home import atomic_write_json

    path = home.run_dir(run_id)
    (path / "checkpoints").mkdir(parents=True, exist_ok=True)
    atomic_write_json(path / "settings.json", {"run_id": run_id, "model": str(model_dir), "project": "default"})
    folders = []
    for i, (step, loss) in enumerate(zip(steps, losses)):
        folder = path / "checkpoints" / f"step-{step:06d}"
        save_lora(model_dir, folder, seed * 100 + i)
        atomic_write_json(folder / "metrics.json", {"step": step, "test_loss": loss})
        folders.append(folder)
    best = min(range(len(steps)), key=lambda i: losses[i])
    atomic_write_json(path / "status.json", {
        "run_id": run_id, "state": "finished", "step": steps[-1], "created_at": created_at or time.time(),
        "best": {"step": steps[best], "test_loss": losses[best], "checkpoint": f"step-{steps[best]:06d}"},
        "model": Path(model_dir).name})
    return folders


def call(srv, method: str, path: str, body=None, headers=None, timeout: float = 60, raw: bytes | None = None):
    """(status, parsed JSON or text) from the real server; HTTP errors are returned, not raised."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(f"{srv.url}{path}", data=data, method=method,
                                 headers={**srv.headers, "Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, payload = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, payload = e.code, e.read()
    try:
        return status, json.loads(payload)
    except ValueError:
        return status, payload.decode(errors="replace")


def wait_model_ready(srv, timeout: float = 120, want: str = "ready") -> dict:
    deadline = time.time() + timeout
    snap = {}
    while time.time() < deadline:
        status, snap = call(srv, "GET", "/v1/refact-lab/status")
        if status == 200 and snap["state"] == want:
            return snap
        if status == 200 and snap["state"] == "failed" and want != "failed":
            raise AssertionError(f"model failed to load: {snap['error']}")
        time.sleep(0.2)
    raise AssertionError(f"model not {want} after {timeout}s: {snap}\n{srv.log()[-3000:]}")


def wait_for(predicate, timeout: float = 30, interval: float = 0.1, what: str = "condition"):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}; last value {last!r}")
