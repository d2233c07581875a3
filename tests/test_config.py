"""Settings dataclasses: metadata-driven validation and `--set key=value` parsing."""

from dataclasses import dataclass

import pytest

from refact_lab.config import (ServeSettings, SettingsError, field_specs, is_loopback, setting, validate,
                               with_overrides)


@dataclass
class Example:
    steps: int | None = setting(None, help="steps", min=1, max=100, auto=True)
    rate: float = setting(0.5, help="rate", min=0.0, max=1.0)
    mode: str = setting("a", help="mode", choices=("a", "b"))
    flag: bool = setting(False, help="flag")

    def __post_init__(self):
        validate(self)


def test_bounds_choices_and_types_are_checked():
    with pytest.raises(SettingsError, match="steps: 0 is below the minimum 1"):
        Example(steps=0)
    with pytest.raises(SettingsError, match="rate: 2.0 is above the maximum"):
        Example(rate=2.0)
    with pytest.raises(SettingsError, match="mode: 'c' is not one of a, b"):
        Example(mode="c")
    with pytest.raises(SettingsError, match="flag: expected true or false"):
        Example(flag="yes")
    with pytest.raises(SettingsError, match="expected a number"):
        Example(rate="fast")


def test_overrides_parse_text_into_field_types():
    e = with_overrides(Example(), ["steps=10", "rate=0.25", "flag=true", "mode=b"])
    assert (e.steps, e.rate, e.flag, e.mode) == (10, 0.25, True, "b")
    assert with_overrides(e, ["steps=auto"]).steps is None
    with pytest.raises(SettingsError, match="unknown setting 'nope'"):
        with_overrides(e, ["nope=1"])
    with pytest.raises(SettingsError, match="cannot read 'x' as float"):
        with_overrides(e, ["rate=x"])
    with pytest.raises(SettingsError, match="expected key=value"):
        with_overrides(e, ["rate"])


def test_field_specs_expose_help_and_bounds_for_forms():
    specs = {s["name"]: s for s in field_specs(Example)}
    assert specs["rate"]["min"] == 0.0 and specs["rate"]["max"] == 1.0 and specs["rate"]["help"] == "rate"
    assert specs["steps"]["auto"] is True and specs["mode"]["choices"] == ("a", "b")


def test_serve_settings_refuse_no_auth_off_loopback():
    assert ServeSettings(no_auth=True).no_auth
    with pytest.raises(SettingsError, match="--no-auth is refused on 0.0.0.0"):
        ServeSettings(host="0.0.0.0", no_auth=True)
    with pytest.raises(SettingsError, match="port: 70000 is above"):
        ServeSettings(port=70000)
    assert is_loopback("::1") and is_loopback("127.0.0.2") and not is_loopback("10.0.0.1")


@pytest.mark.parametrize("pair", ["rate=nan", "rate=NaN", "rate=-nan", "rate=inf", "rate=-inf", "steps=nan",
                                  "steps=inf"])
def test_a_number_that_is_not_finite_is_refused(pair):
    # nan passes every bound (each comparison with it is false), so it needs its own check
    name = pair.split("=")[0]
    with pytest.raises(SettingsError, match=f"{name}: expected a finite number, got"):
        with_overrides(Example(), [pair])
    with pytest.raises(SettingsError, match="rate: expected a finite number, got nan"):
        Example(rate=float("nan"))   # a saved settings.json goes through the same check


def test_every_float_setting_refuses_nan():
    from refact_lab.config import FinetuneSettings, ScanSettings

    for cls in (FinetuneSettings, ScanSettings, ServeSettings):
        for spec in field_specs(cls):
            if spec["type"] is float:
                with pytest.raises(SettingsError, match=f"{spec['name']}: expected a finite number"):
                    with_overrides(cls(), [f"{spec['name']}=nan"])


def test_an_empty_value_is_refused_saying_how_to_ask_for_the_default():
    with pytest.raises(SettingsError, match="steps: the value is empty; write steps=auto for the automatic value"):
        with_overrides(Example(), ["steps="])
    with pytest.raises(SettingsError, match="rate: the value is empty; leave the setting out to keep its default"):
        with_overrides(Example(), ["rate= "])
    assert with_overrides(Example(steps=5), ["steps=auto"]).steps is None
