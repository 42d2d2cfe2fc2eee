"""A real demo base model and a real PEFT LoRA adapter for it, built once per session."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from adapters.basemodel import BaseModelSpec
from gateway.dev.demo_model import build_adapter, build_base_model


@pytest.fixture(scope="session")
def demo_base_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_base_model(tmp_path_factory.mktemp("base") / "demo-model")


@pytest.fixture(scope="session")
def demo_spec(demo_base_path: Path) -> BaseModelSpec:
    return BaseModelSpec.from_path(demo_base_path)


@pytest.fixture(scope="session")
def peft_adapter(tmp_path_factory: pytest.TempPathFactory, demo_base_path: Path) -> Path:
    """Rank 8, alpha 16, all seven linear modules; never modified (copy it with ``adapter_dir``)."""
    return build_adapter(demo_base_path, tmp_path_factory.mktemp("peft") / "adapter", seed=1)


@pytest.fixture
def adapter_dir(tmp_path: Path, peft_adapter: Path) -> Path:
    """A private copy of the PEFT adapter that a test may mutate."""
    return Path(shutil.copytree(peft_adapter, tmp_path / "adapter"))
