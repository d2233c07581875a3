"""Stage 2 of the scan: each file's mean per-token loss under the base model, batched and cached on disk.

A file the model finds very surprising (high loss) is usually not code worth learning from: data dumps,
encoded blobs, text in an unexpected language. The loss is measured on the first `max_tokens` tokens of
the file (long files are judged by their start) and averaged per token, not per sequence, so short and long
files compare fairly.

Results are cached in `scan/loss_cache/<model key>.jsonl`, keyed by the content's sha256, so a re-scan of
unchanged files never loads the model. Each batch is appended as soon as it is computed, so a stopped scan
keeps what it already paid for. torch and transformers are imported inside `compute_losses` only.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Callable

from refact_lab.data.filters import decode_text
from refact_lab.home import append_jsonl, read_jsonl


class LossFilterError(RuntimeError):
    """The model cannot be loaded at all (not one file's problem): the message says what to do."""


def model_key(spec, max_tokens: int) -> str:
    """A file-name-safe key for the cache: same model and same truncation give the same losses."""
    ident = f"{spec.name}|{spec.source}|{max_tokens}"
    if spec.is_local:
        # A local folder can be retrained in place: its weights' modification time is part of its identity.
        folder = Path(spec.source)
        stamps = sorted((p.name, p.stat().st_mtime_ns) for p in folder.glob("*.safetensors")) if folder.is_dir() \
            else []
        ident += f"|{stamps}"
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in spec.name)[:40]
    return f"{safe}-{hashlib.sha256(ident.encode()).hexdigest()[:12]}"


class LossCache:
    """sha256 -> (loss or None, error) for one model key, backed by an append-only JSONL file."""

    def __init__(self, folder: Path, key: str):
        self.path = Path(folder) / f"{key}.jsonl"
        self.entries: dict[str, tuple[float | None, str | None]] = {}
        for rec in read_jsonl(self.path):
            if "sha256" in rec:
                self.entries[rec["sha256"]] = (rec.get("loss"), rec.get("error"))

    def get(self, sha: str):
        return self.entries.get(sha)

    def put_many(self, items: list[tuple[str, float | None, str | None]]) -> None:
        for sha, loss, err in items:
            self.entries[sha] = (loss, err)
            append_jsonl(self.path, {"sha256": sha, "loss": loss, "error": err})


def _device() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def compute_losses(items: list[tuple[str, str]], *, model: str | None, cache_dir: Path, batch_size: int = 8,
                   max_tokens: int = 1024, progress: Callable[[int, int], None] | None = None,
                   should_stop: Callable[[], bool] | None = None) -> tuple[dict, dict]:
    """Loss per content hash for `items` = [(sha256, absolute file path)].

    Returns ({sha256: (loss or None, error or None)}, counts {"cached": n, "computed": n}). Only files
    missing from the cache are read and only then is the model loaded.
    """
    from refact_lab.models.registry import resolve

    try:
        spec = resolve(model)
    except ValueError as e:
        raise LossFilterError(f"loss filter: {e}") from None
    max_tokens = min(max_tokens, spec.n_ctx)
    cache = LossCache(cache_dir, model_key(spec, max_tokens))
    out: dict[str, tuple[float | None, str | None]] = {}
    todo: dict[str, str] = {}
    for sha, file in items:
        hit = cache.get(sha)
        if hit is not None:
            out[sha] = hit
        else:
            todo.setdefault(sha, file)
    counts = {"cached": len(items) - len(todo), "computed": 0, "model": spec.name,
              "model_threshold": spec.loss_threshold}
    total = len(todo)
    if progress:
        progress(0, total)
    if not todo:
        return out, counts

    import torch

    from refact_lab.models.loading import load_model, load_tokenizer

    device = _device()
    try:
        tokenizer = load_tokenizer(spec)
        lm = load_model(spec, device=device)
    except Exception as e:  # any load failure is the same message to the user
        raise LossFilterError(f"cannot load model {spec.name!r} for the loss filter: {e}. "
                              "Pick another model, or skip stage 2 (--no-lm-filter).") from None

    # Tokenize everything first, then batch by length so padding wastes little compute.
    encoded: list[tuple[str, list[int] | None, str | None]] = []
    for sha, file in todo.items():
        try:
            text = decode_text(Path(file).read_bytes())  # as the scan and training read it (UTF-16 too)
        except (OSError, UnicodeDecodeError) as e:
            encoded.append((sha, None, f"cannot read: {e}"))
            continue
        # Only the start is measured, so only the start is tokenized (a token is rarely over 16 characters);
        # as content, as fine-tuning will see it: "<|endoftext|>" written in the code is text.
        ids = tokenizer(text[:max_tokens * 16], add_special_tokens=False, truncation=True, max_length=max_tokens,
                        split_special_tokens=True)["input_ids"]
        if len(ids) < 2:
            encoded.append((sha, None, f"too short for a loss ({len(ids)} token{'s' if len(ids) != 1 else ''})"))
        else:
            encoded.append((sha, ids, None))
    failed = [(sha, None, err) for sha, ids, err in encoded if ids is None]
    cache.put_many(failed)
    out.update({sha: (None, err) for sha, _, err in failed})
    done = len(failed)
    if progress:
        progress(done, total)
    ready = sorted(((sha, ids) for sha, ids, _ in encoded if ids is not None), key=lambda x: len(x[1]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(ready), batch_size):
        if should_stop and should_stop():
            break
        batch = ready[start:start + batch_size]
        transient: set[str] = set()
        try:
            results = _batch_losses(lm, batch, pad, device, torch)
        except Exception:  # out of memory or a model quirk: one file at a time, so only the bad one fails
            results = []
            for sha, ids in batch:
                try:
                    results += _batch_losses(lm, [(sha, ids)], pad, device, torch)
                except Exception as e:
                    results.append((sha, None, f"{type(e).__name__}: {e}"[:200]))
                    transient.add(sha)  # may work next time (memory), so not cached
        cache.put_many([r for r in results if r[0] not in transient])
        out.update({sha: (loss, err) for sha, loss, err in results})
        done += len(batch)
        counts["computed"] += len(batch)
        if progress:
            progress(done, total)
    counts["computed"] += len(failed)
    return out, counts


def _batch_losses(lm, batch, pad: int, device: str, torch) -> list[tuple[str, float | None, str | None]]:
    longest = max(len(ids) for _, ids in batch)
    input_ids = torch.full((len(batch), longest), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), longest), dtype=torch.long)
    for row, (_, ids) in enumerate(batch):
        input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[row, :len(ids)] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    with torch.inference_mode():
        logits = lm(input_ids=input_ids, attention_mask=mask).logits.float()
    # Token t predicts token t+1; padding positions are masked out of the per-row mean.
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), input_ids[:, 1:], reduction="none")
    target_mask = mask[:, 1:].float()
    per_row = (nll * target_mask).sum(1) / target_mask.sum(1).clamp(min=1)
    out = []
    for (sha, _), value in zip(batch, per_row.tolist()):
        if math.isfinite(value):
            out.append((sha, float(value), None))
        else:
            out.append((sha, None, "the loss is not a finite number"))
    return out
