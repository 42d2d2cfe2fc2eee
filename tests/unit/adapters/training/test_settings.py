"""The bases a ``banyan trainer`` trains: ``BANYAN_TRAINER_BASES`` (``id=folder`` pairs), else its one base."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from adapters.training.settings import TrainerSettings


def test_without_trainer_bases_the_one_base_is_trained() -> None:
    settings = TrainerSettings(base_model="banyan-demo", base_model_path=Path("/models/tiny"))
    assert settings.bases == {"banyan-demo": Path("/models/tiny")}


def test_trainer_bases_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BANYAN_TRAINER_BASES", "smollm2-135m-instruct=/models/smollm2, banyan-demo=/models/tiny")
    assert TrainerSettings().bases == {"smollm2-135m-instruct": Path("/models/smollm2"),
                                       "banyan-demo": Path("/models/tiny")}


@pytest.mark.parametrize(("value", "message"), [("banyan-demo", "id=folder"), ("=/x", "id=folder"),
                                                ("a=/x,a=/y", "names a twice")])
def test_bad_trainer_bases_are_refused(monkeypatch: pytest.MonkeyPatch, value: str, message: str) -> None:
    monkeypatch.setenv("BANYAN_TRAINER_BASES", value)
    with pytest.raises(ValidationError, match=message):
        TrainerSettings()
