"""settings.json's serving choice as a typed contract (refact_lab.serve.state): one dataclass, read part by part
(a bad value is a reported problem, never an exception or a silent default), validated when written."""

from __future__ import annotations

import pytest

from refact_lab.config import SettingsError
from refact_lab.serve import state
from refact_lab.serve.state import LoraChoice, ServingChoice


def test_an_empty_file_is_the_default_choice(home):
    choice, problems = state.load(home)
    assert choice == ServingChoice() and problems == {}
    assert choice.model is None and choice.lora == LoraChoice() and choice.loop_guard is True


def test_values_are_read_typed(home):
    home.update_settings(model="default", device="cpu", dtype="fp32", gpu_memory_fraction=1, max_batch=4.0,
                         lora="run-a/step-000010", loop_guard=False, openai_api_key="sk-x", openai_models=["gpt-a"])
    choice, problems = state.load(home)
    assert problems == {}
    assert (choice.device, choice.dtype, choice.max_batch, choice.loop_guard) == ("cpu", "fp32", 4, False)
    assert isinstance(choice.gpu_memory_fraction, float) and isinstance(choice.max_batch, int)
    assert choice.lora == LoraChoice("checkpoint", "run-a", "step-000010")
    assert choice.openai_models == ("gpt-a",)
    # overrides (the CLI's one-off --model / --lora) win without being saved
    once, _ = state.load(home, {"model": "other", "lora": {"mode": "off"}})
    assert once.model == "other" and once.lora.mode == "off" and home.load_settings()["model"] == "default"


@pytest.mark.parametrize("bad, part, words", [
    ({"lora": {"mode": "bestest"}}, "lora", "'bestest' is not one of"),
    ({"lora": "../etc"}, "lora", "run id"),
    ({"lora": 7}, "lora", "expected"),
    ({"max_batch": 0}, "model", "max_batch: 0 is below"),
    ({"device": "gpu9"}, "model", "device: 'gpu9'"),
    ({"model": 3}, "model", "model: expected text"),
    ({"loop_guard": "yes"}, "guard", "loop_guard"),
    ({"openai_models": "gpt-4o"}, "upstream", "openai_models"),
])
def test_a_bad_value_is_a_problem_of_its_part_and_keeps_the_rest(home, bad, part, words):
    good = dict(dtype="fp32", lora="best", loop_guard=False, upstream_url="http://10.0.0.5/v1")
    home.update_settings(**{**good, **bad})
    previous = ServingChoice(max_batch=8, lora=LoraChoice("latest"), loop_guard=True)
    choice, problems = state.load(home, previous=previous)
    assert list(problems) == [part] and words in problems[part] and problems[part].startswith("settings.json")
    # the bad part keeps what was applied before; the other parts are read as the file says
    assert choice.part(part) == previous.part(part)
    expected = ServingChoice(**{**good, "lora": LoraChoice("best")})
    for other in set(state.PARTS) - {part}:
        assert choice.part(other) == expected.part(other)


def test_a_file_that_is_not_json_is_reported(home):
    home.settings_file.write_text("{not json")
    choice, problems = state.load(home)
    assert choice == ServingChoice() and set(problems) == set(state.PARTS)


def test_save_validates_writes_and_removes(home):
    state.save(home, model="default", device="cpu", max_batch=4, lora="best")
    assert home.load_settings() == {"model": "default", "device": "cpu", "max_batch": 4,
                                    "lora": {"mode": "best", "run_id": None, "checkpoint": None}}
    with pytest.raises(SettingsError, match="max_batch"):
        state.save(home, max_batch=0)
    with pytest.raises(ValueError, match="run id"):
        state.save(home, lora="../x")
    with pytest.raises(SettingsError, match="not a serving setting"):
        state.save(home, colour="blue")
    assert home.load_settings()["max_batch"] == 4  # nothing written by a refused save
    state.save(home, lora=None, device=None)
    assert home.load_settings() == {"model": "default", "max_batch": 4}


def test_save_leaves_an_unrelated_bad_value_for_the_status_to_report(home):
    home.update_settings(lora={"mode": "bestest"})
    state.save(home, max_batch=2)
    assert home.load_settings() == {"lora": {"mode": "bestest"}, "max_batch": 2}
    assert "lora" in state.load(home)[1]


def test_every_field_belongs_to_one_part():
    fields = [f for part in state.PARTS for f in state.fields_of(part)]
    assert sorted(fields) == sorted(f for f in ServingChoice.__dataclass_fields__) and len(set(fields)) == len(fields)


def test_the_active_model_is_the_files_or_the_default(home):
    assert state.active_model(home) == "default"
    state.save(home, model="/models/mine")
    assert state.active_model(home) == "/models/mine"


@pytest.mark.parametrize("text, words", [
    ("[1, 2]", "settings.json is damaged: expected a JSON object, found a list"),
    ('"str"', "settings.json is damaged: expected a JSON object, found a string"),
    ("{bad", "settings.json is not valid JSON"),
    ('{"context": 5, "context_tokens": "lots"}', "settings.json: invalid context project 5"),
])
def test_a_command_refuses_a_damaged_file_in_one_line_and_the_engine_reads_on(home, text, words):
    home.settings_file.write_text(text)
    with pytest.raises(SettingsError) as err:
        state.load_checked(home)
    assert words in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(SettingsError, match="settings.json"):
        state.active_model(home)   # what scan, finetune and eval default to: not silently "default"
    choice, problems = state.load(home)   # the engine's reading: problems reported, never raised
    assert problems and choice.part(state.LORA) == ServingChoice().part(state.LORA)
