"""Internal engine names: they encode tenant, adapter, version and upload, and parse back exactly."""

from __future__ import annotations

import pytest

from adapters.naming import AdapterRef, is_valid_id


@pytest.mark.parametrize("value", ["a", "acme", "a-b-c", "0day", "x" * 63])
def test_valid_ids(value: str) -> None:
    assert is_valid_id(value)


@pytest.mark.parametrize("value", ["", "-a", "A", "a_b", "a.b", "a/b", "x" * 64, "a b", "ä", "../x"])
def test_invalid_ids(value: str) -> None:
    assert not is_valid_id(value)


def test_engine_name_round_trip() -> None:
    ref = AdapterRef("acme-co", "support-bot", 12, "0123456789ab")
    assert ref.engine_name == "banyan.acme-co.support-bot.v12.0123456789ab"
    assert AdapterRef.from_engine_name(ref.engine_name) == ref


@pytest.mark.parametrize("name", ["banyan-demo", "banyan.acme.bot.v1", "banyan.acme.bot.v0.0123456789ab",
                                  "banyan.ac.me.bot.v1.0123456789ab", "banyan.acme.bot.v1.XYZ", "other.acme.bot.v1.x",
                                  "banyan.acme.bot.v1.0123456789ab.extra", "banyan.Acme.bot.v1.0123456789ab"])
def test_foreign_or_malformed_names_do_not_parse(name: str) -> None:
    assert AdapterRef.from_engine_name(name) is None


def test_references_refuse_bad_parts() -> None:
    with pytest.raises(ValueError):
        AdapterRef("acme", "bot", 0, "0123456789ab")
    with pytest.raises(ValueError):
        AdapterRef("acme", "../bot", 1, "0123456789ab")
    with pytest.raises(ValueError):
        AdapterRef("acme", "bot", 1, "short")
