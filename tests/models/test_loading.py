"""Model loads in two threads at once (the engine loading while a LoRA switch or an export loads) must both
come out whole: transformers 5 patches `PreTrainedModel.tie_weights` process-wide while it loads."""

from __future__ import annotations

import threading
import time


def test_two_threads_loading_at_once_both_get_tied_weights(tiny_model_dir, monkeypatch):
    import transformers.modeling_utils as modeling_utils

    from refact_lab.models.loading import load_model

    second_started = threading.Event()
    inside = {"first": True}
    original = modeling_utils.patch_output_recorders

    def pause_the_first_load_inside_its_patches(model):
        # runs inside from_pretrained's init contexts (tie_weights patched to a no-op): the first load waits
        # here until the second has been asked for, and a little longer, so an unguarded second load overlaps
        if inside.pop("first", False):
            second_started.wait(10)
            time.sleep(0.5)
        return original(model)

    monkeypatch.setattr(modeling_utils, "patch_output_recorders", pause_the_first_load_inside_its_patches)
    results, errors = {}, []

    def load(name):
        try:
            results[name] = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
        except Exception as e:  # noqa: BLE001 (the assertion below shows it)
            errors.append(f"{name}: {type(e).__name__}: {e}")

    first = threading.Thread(target=load, args=("first",))
    first.start()
    time.sleep(0.2)
    second = threading.Thread(target=load, args=("second",))
    second.start()
    second_started.set()
    first.join(60)
    second.join(60)
    assert errors == []
    for model in results.values():
        assert not [n for n, p in model.named_parameters() if p.device.type == "meta"]
        assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    # and a load after both still ties (no patch was left in place)
    later = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    assert later.lm_head.weight.data_ptr() == later.get_input_embeddings().weight.data_ptr()
