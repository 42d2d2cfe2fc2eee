from __future__ import annotations

import pytest
from pydantic import SecretStr, ValidationError

from gateway.settings import Settings


def test_prod_refuses_a_missing_or_weak_admin_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BANYAN_ADMIN_KEY", raising=False)
    with pytest.raises(ValidationError, match="BANYAN_ADMIN_KEY"):
        Settings(mode="prod")
    with pytest.raises(ValidationError, match="BANYAN_ADMIN_KEY"):
        Settings(mode="prod", admin_key=SecretStr("short"))
    assert Settings(mode="prod", admin_key=SecretStr("x" * 24)).mode == "prod"


def test_environment_is_read_with_the_banyan_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BANYAN_MODE", "dev")
    monkeypatch.setenv("BANYAN_ENGINE_URLS", "http://a:1, http://b:2")
    monkeypatch.setenv("BANYAN_MAX_LORA_RANK", "32")
    settings = Settings()
    assert settings.engine_urls == ["http://a:1", "http://b:2"]
    assert settings.max_lora_rank == 32
    assert "x" * 24 not in repr(Settings(mode="dev", admin_key=SecretStr("x" * 24)))


def test_engine_urls_must_not_be_empty() -> None:
    with pytest.raises(ValidationError):
        Settings(mode="dev", engine_urls=[])
