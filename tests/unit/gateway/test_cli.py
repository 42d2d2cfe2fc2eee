"""The serving process's own set-up (``gateway/cli.py``)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from gateway.cli import _freeze_startup_heap
from gateway.settings import Settings


@pytest.fixture
def gc_state() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


@pytest.mark.usefixtures("gc_state")
def test_the_startup_heap_is_frozen_and_the_young_threshold_raised() -> None:
    gc.set_threshold(700, 10, 10)
    kept = [object(), {"a": []}]  # alive at start-up: frozen with the rest
    _freeze_startup_heap(Settings(mode="dev").gc_young_threshold)
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == (50_000, 10, 10)  # only the youngest generation's threshold moves
    assert kept


@pytest.mark.usefixtures("gc_state")
def test_zero_keeps_pythons_threshold() -> None:
    gc.set_threshold(700, 10, 10)
    _freeze_startup_heap(0)
    assert gc.get_threshold() == (700, 10, 10)


def test_the_setting_reads_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BANYAN_GC_YOUNG_THRESHOLD", "700")
    assert Settings(mode="dev").gc_young_threshold == 700
    monkeypatch.setenv("BANYAN_GC_YOUNG_THRESHOLD", "-1")
    with pytest.raises(ValueError):
        Settings(mode="dev")
