"""Stage 2: per-file loss under a real (tiny) model: thresholds, empty files, the cache, batching."""

from __future__ import annotations

import pytest

from refact_lab.data.lossfilter import LossFilterError, compute_losses
from tests.data.conftest import good_py, scan_folder

FILES = {**{f"pkg/mod_{i}.py": good_py(i) for i in range(5)},
         "pkg/__init__.py": "x",                     # one token has no loss: filter_empty
         "pkg/short.py": "x\n"}


def test_loss_recorded_and_loss_too_high_and_filter_empty(home, tree, tiny_model_dir):
    root = tree(FILES)
    accepted, rejected, stats = scan_folder(home, root, lm_filter=True, model=str(tiny_model_dir),
                                            loss_threshold=100.0)
    assert rejected["pkg/__init__.py"]["reason"] == "filter_empty"
    assert "too short" in rejected["pkg/__init__.py"]["detail"]
    losses = {p: r["loss"] for p, r in accepted.items()}
    assert set(losses) >= {f"pkg/mod_{i}.py" for i in range(5)}
    assert all(isinstance(v, float) and 0 < v < 100 for v in losses.values())
    assert stats["loss"]["computed"] == 7 and stats["loss"]["cached"] == 0

    # A threshold below every file's loss rejects them, each with its loss in the detail.
    threshold = min(losses.values()) - 0.01
    accepted2, rejected2, stats2 = scan_folder(home, root, lm_filter=True, model=str(tiny_model_dir),
                                               loss_threshold=threshold)
    assert not accepted2
    rec = rejected2["pkg/mod_0.py"]
    assert rec["reason"] == "loss_too_high" and rec["loss"] == pytest.approx(losses["pkg/mod_0.py"])
    assert rec["detail"] == f"loss {losses['pkg/mod_0.py']:.2f} > {threshold:g}"
    # Second scan: every loss came from the cache, nothing was computed (the model was not even loaded).
    assert stats2["loss"]["computed"] == 0 and stats2["loss"]["cached"] == 7
    assert stats2["split_error"] and "0 files accepted" in stats2["split_error"]


def test_batched_losses_equal_one_at_a_time(tmp_path, tree, tiny_model_dir):
    import hashlib

    root = tree({f"f{i}.py": good_py(i) * (i + 1) for i in range(5)})
    items = [(hashlib.sha256(p.read_bytes()).hexdigest(), str(p)) for p in sorted(root.glob("*.py"))]
    one, _ = compute_losses(items, model=str(tiny_model_dir), cache_dir=tmp_path / "c1", batch_size=1)
    many, counts = compute_losses(items, model=str(tiny_model_dir), cache_dir=tmp_path / "c2", batch_size=5)
    assert counts["computed"] == 5
    for sha, _ in items:
        assert many[sha][0] == pytest.approx(one[sha][0], abs=1e-4)  # padding is masked out of the mean


def test_unknown_model_is_a_clear_error(tmp_path, tree):
    root = tree({"a.py": good_py(1)})
    with pytest.raises(LossFilterError, match="unknown model 'no-such-model'"):
        compute_losses([("0" * 64, str(root / "a.py"))], model="no-such-model", cache_dir=tmp_path)


def test_model_folder_that_cannot_load_suggests_skipping_stage_2(tmp_path, tree, tiny_model_dir):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not weights")
    root = tree({"a.py": good_py(1)})
    with pytest.raises(LossFilterError, match="--no-lm-filter"):
        compute_losses([("1" * 64, str(root / "a.py"))], model=str(broken), cache_dir=tmp_path / "c")


def test_auto_threshold_comes_from_the_model(home, tree, tiny_model_dir):
    """No threshold given: the registry's value for the model is used and recorded (3.0 for unknown models,
    higher for the small embedded one, whose losses on ordinary code run higher)."""
    from refact_lab.models.registry import resolve

    root = tree(FILES)
    from refact_lab.data.service import ProjectService

    _, _, stats = scan_folder(home, root, lm_filter=True, model=str(tiny_model_dir))
    assert stats["loss"]["threshold"] == 3.0
    _, _, stats = scan_folder(home, root, lm_filter=True, model="default")
    assert stats["loss"]["threshold"] == resolve("default").loss_threshold > 3.0
    # the applied value is recorded for the Scan panel, which must not show the setting's "auto" as 0
    assert stats["loss_threshold"] == stats["loss"]["threshold"] and stats["loss"]["threshold_auto"] is True
    assert stats["settings"]["loss_threshold"] is None
    assert ProjectService(home).applied_loss_threshold() == resolve("default").loss_threshold


def test_a_utf16_file_gets_the_loss_of_its_text(tmp_path, tiny_model_dir):
    """The loss filter reads a file as the scan and training do (by its byte-order mark): a UTF-16 file's loss
    is the loss of its text, not 'cannot read'."""
    import hashlib

    text = good_py(3)
    items = []
    for name, data in (("a8.py", text.encode("utf-8")), ("a16.py", text.encode("utf-16"))):
        (tmp_path / name).write_bytes(data)
        items.append((hashlib.sha256(data).hexdigest(), str(tmp_path / name)))
    losses, _ = compute_losses(items, model=str(tiny_model_dir), cache_dir=tmp_path / "c", batch_size=1)
    (sha8, _), (sha16, _) = items
    assert isinstance(losses[sha16][0], float), losses[sha16]
    assert losses[sha16][0] == pytest.approx(losses[sha8][0], abs=1e-4)
