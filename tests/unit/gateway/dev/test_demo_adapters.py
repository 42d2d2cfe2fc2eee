"""The demo adapters of the real model: shipped data sets, the cache key, reuse of what was trained."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from adapters.training.lora import load_chat_jsonl
from gateway.dev.demo_adapters import DATA_DIR, TrainedDemoAdapters
from gateway.dev.models import dev_model


@pytest.fixture
def trained() -> TrainedDemoAdapters:
    adapters = dev_model("smollm2").demo_adapters
    assert isinstance(adapters, TrainedDemoAdapters)
    return adapters


def test_every_data_set_ships_and_parses(trained: TrainedDemoAdapters) -> None:
    for name, file in trained.data_sets.items():
        examples = load_chat_jsonl(DATA_DIR / file)
        assert len(examples) >= 20, name
        assert all(m[-1]["role"] == "assistant" for m in examples)


def test_the_pirate_speaks_like_one(trained: TrainedDemoAdapters) -> None:
    examples = load_chat_jsonl(DATA_DIR / trained.data_sets["demo-pirate"])
    assert all(m[-1]["content"].startswith(("Arr", "Ahoy", "Aye")) for m in examples)


def test_the_cache_key_follows_data_settings_and_base_model(trained: TrainedDemoAdapters, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    key = trained.cache_key("demo-pirate", base_model="smollm2-135m-instruct")
    assert key == trained.cache_key("demo-pirate", base_model="smollm2-135m-instruct")
    assert key != trained.cache_key("demo-support", base_model="smollm2-135m-instruct")
    assert key != trained.cache_key("demo-pirate", base_model="other-model")
    longer = dataclasses.replace(trained.config, steps=trained.config.steps + 1)
    more_steps = dataclasses.replace(trained, config=longer)
    assert key != more_steps.cache_key("demo-pirate", base_model="smollm2-135m-instruct")

    data = tmp_path / "pirate.jsonl"
    data.write_text((DATA_DIR / "pirate.jsonl").read_text() + json.dumps(
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "Arr"}]}) + "\n")
    monkeypatch.setattr("gateway.dev.demo_adapters.DATA_DIR", tmp_path)
    assert key != trained.cache_key("demo-pirate", base_model="smollm2-135m-instruct")


def test_only_finished_adapters_are_ready_and_they_are_copied_for_the_demo_tenant(
        trained: TrainedDemoAdapters, tmp_path: Path) -> None:
    base = "smollm2-135m-instruct"
    assert trained.ready(model_path=tmp_path / "model", base_model=base, data_dir=tmp_path) == {}

    half_written = trained.cached_path("demo-pirate", base_model=base, data_dir=tmp_path)
    half_written.mkdir(parents=True)
    (half_written / "adapter_config.json").write_text("{}")
    assert trained.ready(model_path=tmp_path / "model", base_model=base, data_dir=tmp_path) == {}

    (half_written / "adapter_model.safetensors").write_bytes(b"weights")
    (half_written / "banyan-trained.json").write_text(json.dumps({"name": "demo-pirate"}))
    ready = trained.ready(model_path=tmp_path / "model", base_model=base, data_dir=tmp_path)
    assert ready == {"demo-pirate": tmp_path / "demo-adapters" / "demo-pirate"}
    assert (ready["demo-pirate"] / "adapter_model.safetensors").read_bytes() == b"weights"


def test_the_rest_are_trained_by_a_child_process(trained: TrainedDemoAdapters, tmp_path: Path) -> None:
    command = trained.build_command(dev_model="smollm2", model_path=tmp_path / "m", base_model="smollm2-135m-instruct",
                                    data_dir=tmp_path, names=["demo-support"])
    assert command[1:3] == ["-m", "gateway.dev.demo_adapters"]
    assert command[command.index("--model") + 1] == "smollm2"
    assert command[-1] == "demo-support"
