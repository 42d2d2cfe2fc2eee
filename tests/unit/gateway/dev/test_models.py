"""Which model `banyan dev` serves: the registry, the flag and BANYAN_DEV_MODEL, the settings it gives the gateway."""

from __future__ import annotations

import pytest

from gateway.cli import main
from gateway.dev.models import DEFAULT_DEV_MODEL, DEV_MODELS, dev_model, dev_models
from gateway.dev.stack import dev_settings
from gateway.settings import Settings


def test_the_real_model_is_the_default_and_tiny_is_the_test_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BANYAN_DEV_MODEL", raising=False)
    assert DEFAULT_DEV_MODEL == Settings(mode="dev").dev_model == "smollm2"
    assert dev_model("smollm2").base_model == "smollm2-135m-instruct"
    assert dev_model("tiny").base_model == "banyan-demo"
    assert set(dev_model("smollm2").demo_adapters.names) == set(dev_model("tiny").demo_adapters.names) == {
        "demo-pirate", "demo-support"}


def test_an_unknown_model_names_the_choices() -> None:
    with pytest.raises(ValueError, match="smollm2, tiny"):
        dev_model("llama-70b")


def test_the_environment_chooses_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BANYAN_DEV_MODEL", "tiny")
    assert Settings(mode="dev").dev_model == "tiny"


@pytest.mark.parametrize("name", sorted(DEV_MODELS))
def test_the_gateway_serves_the_chosen_models_id_and_window(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BANYAN_BASE_MODEL", raising=False)
    monkeypatch.delenv("BANYAN_MAX_MODEL_LEN", raising=False)
    model = dev_model(name)
    settings = dev_settings(Settings(mode="dev"), model)
    assert settings.base_model == model.base_model
    assert settings.max_model_len == model.max_model_len


def test_what_the_user_set_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BANYAN_BASE_MODEL", "my-model")
    monkeypatch.setenv("BANYAN_MAX_MODEL_LEN", "2048")
    settings = dev_settings(Settings(mode="dev"), dev_model("smollm2"))
    assert (settings.base_model, settings.max_model_len) == ("my-model", 2048)


def test_the_flag_refuses_an_unknown_model(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["dev", "--model", "bogus"])
    assert exit_info.value.code == 2
    assert "unknown dev model 'bogus': choose one of smollm2, tiny" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["dev", "--model", "smollm2,smollm2"])
    assert "named twice" in capsys.readouterr().err


def test_several_dev_models_the_first_the_default() -> None:
    assert [m.name for m in dev_models("smollm2, tiny")] == ["smollm2", "tiny"]
    assert [m.name for m in dev_models("tiny")] == ["tiny"]
    with pytest.raises(ValueError, match="no dev model"):
        dev_models(" , ")


def test_an_unknown_model_in_the_environment_stops_before_starting_anything(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("BANYAN_DEV_MODEL", "bogus")
    assert main(["dev"]) == 2
    captured = capsys.readouterr()
    assert "unknown dev model 'bogus'" in captured.err
    assert "[1/6]" not in captured.out
