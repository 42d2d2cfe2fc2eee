"""The base model's token counter: found beside the model's config, else a character estimate."""

from __future__ import annotations

from pathlib import Path

from pydantic import SecretStr
from tokenizers import Tokenizer, models, pre_tokenizers

from gateway.settings import Settings
from gateway.tokens import BaseModelTokens, base_model_tokens, tokenizer_path
from retrieval.context import CharEstimate


def _settings(**values: object) -> Settings:
    return Settings(mode="dev", admin_key=SecretStr("x" * 16), **values)  # type: ignore[arg-type]


def _write_tokenizer(folder: Path) -> Path:
    tokenizer = Tokenizer(models.WordLevel(vocab={"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "config.json").write_text("{}")
    return folder / "tokenizer.json"


def test_the_tokenizer_beside_the_config_counts_tokens(tmp_path: Path) -> None:
    path = _write_tokenizer(tmp_path / "model")
    for config in (tmp_path / "model", tmp_path / "model" / "config.json"):
        settings = _settings(base_model_config=config)
        assert tokenizer_path(settings.bases[0]) == path
        counter = base_model_tokens(settings)
        assert isinstance(counter, BaseModelTokens)
        assert counter.count("hello world hello") == 3


def test_an_explicit_tokenizer_wins_and_none_falls_back_to_an_estimate(tmp_path: Path) -> None:
    path = _write_tokenizer(tmp_path / "elsewhere")
    assert tokenizer_path(_settings(base_model_tokenizer=path, base_model_config=tmp_path).bases[0]) == path
    (tmp_path / "bare").mkdir()
    assert isinstance(base_model_tokens(_settings(base_model_config=tmp_path / "bare")), CharEstimate)
    assert isinstance(base_model_tokens(_settings()), CharEstimate)
