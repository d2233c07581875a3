"""The hosting list in settings.json: entry one is the flat model fields (a home without `hosted` is a single-model
server as before), hosted entries are validated, and a LoRA goes to the model it was trained from."""

from __future__ import annotations

import pytest

from refact_lab.config import SettingsError
from refact_lab.serve import state
from refact_lab.serve.fleet import engine_device, lora_for, lora_target
from refact_lab.serve.hosting import HostingService
from refact_lab.serve.state import HostedModel, LoraChoice


def test_a_home_without_a_hosting_list_hosts_its_one_model(home):
    home.update_settings(model="default", device="cpu", dtype="fp32")
    rows = state.hosting_list(home)
    assert rows == [{"name": "default", "model": "default", "placement": "cpu", "dtype": "fp32",
                     "role": "completion", "memory_share": 1.0, "max_batch": 16, "loaded": True, "source": "first"}]
    assert "hosted" not in home.load_settings()
    assert state.load(home)[0].hosted == ()


def test_entry_one_gives_the_completion_role_away_when_another_entry_claims_it(home):
    state.save_hosted(home, [HostedModel("b", "default", placement="cpu", role="completion")])
    rows = state.hosting_list(home)
    assert [(r["name"], r["role"]) for r in rows] == [("default", "none"), ("b", "completion")]
    home.update_settings(device="cuda:1", gpu_memory_fraction=0.4)
    assert state.hosting_list(home)[0]["placement"] == "share:1"


@pytest.mark.parametrize("bad, message", [
    (dict(name="a", model="m", placement="gpu"), "placement: 'gpu' is not"),
    (dict(name="a", model="m", placement="shard:1"), "placement: 'shard:1' is not"),
    (dict(name="a", model="m", placement="shard:1,1"), "names a GPU twice"),
    (dict(name="a:lora", model="m"), "not end in :lora"),
    (dict(name="a", model="m", role="boss"), "role: 'boss' is not one of"),
    (dict(name="a", model="m", memory_share=0), "memory_share: 0 is below the minimum"),
    (dict(name="a", model=" "), "model: a registry name"),
])
def test_bad_entries_are_refused_naming_the_field(bad, message):
    with pytest.raises(SettingsError, match=message):
        HostedModel(**bad)


def test_a_bad_hosting_list_in_the_file_is_reported_not_raised(home):
    home.update_settings(hosted=[{"name": "a", "model": "m"}, {"name": "a", "model": "n"}])
    choice, problems = state.load(home)
    assert choice.hosted == () and "the name 'a' is used twice" in problems[state.HOSTED]
    home.update_settings(hosted=[{"name": "a", "model": "m", "role": "chat"}, {"name": "b", "model": "n",
                                                                                "role": "chat"}])
    assert "only one model can have the chat role" in state.load(home)[1][state.HOSTED]
    home.update_settings(hosted=[{"name": "a", "model": "m", "gpu": 1}])
    assert "unknown keys gpu" in state.load(home)[1][state.HOSTED]


def test_placements_in_the_engines_device_words():
    assert [engine_device(p) for p in ("cpu", "auto", "gpu:2", "share:1", "shard:0,1")] == \
        ["cpu", "auto", "cuda:2", "cuda:1", "shard"]
    assert state.placement_gpus("shard:0,2,3") == (0, 2, 3) and state.placement_gpus("cpu") == ()


def test_adding_a_role_moves_it_and_names_must_be_free(home, tiny_model_dir):
    service = HostingService(home, inference=object())
    service.add_hosted(str(tiny_model_dir), "one", placement="cpu", role="chat")
    service.add_hosted(str(tiny_model_dir), "two", placement="cpu", role="chat")
    assert [(e.name, e.role) for e in state.hosted_entries(home)] == [("one", "none"), ("two", "chat")]
    with pytest.raises(ValueError, match="'two' is already hosted"):
        service.add_hosted(str(tiny_model_dir), "two", placement="cpu")
    with pytest.raises(ValueError, match="'default' is already hosted"):
        service.add_hosted("default", placement="cpu")
    service.set_loaded("one", False)
    assert [e.loaded for e in state.hosted_entries(home)] == [False, True]
    service.remove_hosted("one")
    assert [e.name for e in state.hosted_entries(home)] == ["two"]
    with pytest.raises(ValueError, match="first model"):
        service.remove_hosted("default")


def test_a_lora_goes_to_the_entry_serving_the_model_it_was_trained_from(home, varied_model_dir):
    from tests.serve.helpers import make_run

    make_run(home, "run-v", varied_model_dir, steps=[2], losses=[1.0])
    choice = state.save(home, lora="run-v")
    # one model: the choice applies as it always did
    assert lora_target(home, choice) is None and lora_for(home, choice, None) is choice
    entry = HostedModel("tiny", str(varied_model_dir), placement="cpu")
    choice = state.save(home, hosted=[entry])
    assert lora_target(home, choice) == "tiny"
    assert lora_for(home, choice, entry).lora == LoraChoice("best", "run-v")
    assert lora_for(home, choice, None).lora == LoraChoice()   # the first model (default) is not its base
    # trained on the first model's own model: it stays there
    choice = state.save(home, model=str(varied_model_dir))
    assert lora_target(home, choice) is None and lora_for(home, choice, entry).lora == LoraChoice()
