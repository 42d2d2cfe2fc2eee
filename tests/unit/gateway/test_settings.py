from __future__ import annotations

import secrets

import pytest
from pydantic import SecretStr, ValidationError

from adapters.resolver import ResolverSettings
from adapters.store import S3Settings, s3_config
from gateway.settings import Settings, secret_weakness


def test_prod_refuses_a_missing_or_weak_admin_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BANYAN_ADMIN_KEY", raising=False)
    with pytest.raises(ValidationError, match="BANYAN_ADMIN_KEY"):
        Settings(mode="prod")
    with pytest.raises(ValidationError, match="BANYAN_ADMIN_KEY"):
        Settings(mode="prod", admin_key=SecretStr("short"))
    assert Settings(mode="prod", admin_key=SecretStr(secrets.token_hex(24))).mode == "prod"


@pytest.mark.parametrize("key", ["change-me-to-a-long-random-secret", "aaaaaaaaaaaaaaaa", "x" * 24,
                                 "abcdabcdabcdabcd", "0123456789abcdef", "ab12ab12ab12ab12ab12"])
def test_prod_refuses_placeholder_and_low_entropy_keys(key: str) -> None:
    with pytest.raises(ValidationError, match="BANYAN_ADMIN_KEY"):
        Settings(mode="prod", admin_key=SecretStr(key))
    with pytest.raises(ValidationError, match="BANYAN_ENGINE_API_KEY"):
        Settings(mode="prod", admin_key=SecretStr(secrets.token_urlsafe(24)), engine_api_key=SecretStr(key))
    assert Settings(mode="dev", admin_key=SecretStr(key)).mode == "dev"  # banyan dev takes any key


def test_generated_keys_pass_the_production_check() -> None:
    for _ in range(200):
        for key in (secrets.token_hex(24), secrets.token_urlsafe(24), "adm_" + secrets.token_urlsafe(24)):
            assert secret_weakness(key) is None, key


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


def test_gateway_and_resolver_read_the_same_s3_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    given = S3Settings(s3_endpoint_url="http://127.0.0.1:9000", s3_bucket="tenant-adapters", s3_region="ap-south-1",
                       s3_access_key_id=SecretStr("AKIA-test"), s3_secret_access_key=SecretStr("s3cr3t"))
    for name, value in given.s3_env().items():  # the names themselves are checked in tests/unit/adapters
        monkeypatch.setenv(name, value)
    gateway, resolver = Settings(mode="dev"), ResolverSettings()
    assert s3_config(gateway) == s3_config(resolver) == s3_config(given)
    assert gateway.s3_env() == given.s3_env()  # what `banyan dev` hands the engine is what the gateway read
    assert "s3cr3t" not in repr(gateway)


def test_unknown_banyan_variables_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BANYAN_DEV_MODEL", "tiny")  # the launcher sets it for `banyan dev`; Settings must not refuse it
    assert Settings(mode="dev").mode == "dev"
