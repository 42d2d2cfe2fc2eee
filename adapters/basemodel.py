"""The shape of the served base model, as far as LoRA adapters for it are concerned.

Read from the model's Hugging Face ``config.json``: how many decoder layers it has and, for each
linear module a LoRA can target, its parent inside a layer and its ``(in_features, out_features)``.
Only layouts listed in ``_LAYOUTS`` are understood; adding an architecture is one entry there.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

CONFIG_FILENAME = "config.json"


@dataclass(frozen=True, slots=True)
class ModuleShape:
    in_features: int
    out_features: int


_Layout = tuple[dict[str, ModuleShape], dict[str, str]]
"""Leaf module name -> shape, and leaf module name -> parent inside a decoder layer."""


@dataclass(frozen=True)
class BaseModelSpec:
    num_layers: int
    modules: Mapping[str, ModuleShape] = field(hash=False)
    parents: Mapping[str, str] = field(hash=False)

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any]) -> BaseModelSpec:
        """Raises ``ValueError`` for an architecture we do not know or a config missing a field."""
        model_type = _model_type(config)
        layout = _LAYOUTS.get(model_type) if model_type else None
        if layout is None:
            known = ", ".join(sorted(_LAYOUTS))
            raise ValueError(f"unsupported base model type {model_type!r} (supported: {known})")
        modules, parents = layout(config)
        return cls(
            num_layers=_positive_int(config, "num_hidden_layers"),
            modules=MappingProxyType(modules),
            parents=MappingProxyType(parents),
        )

    @property
    def max_lora_tensors(self) -> int:
        """The most LoRA tensors an adapter for this model can hold: lora_A and lora_B of every targetable
        module of every decoder layer."""
        return 2 * self.num_layers * len(self.modules)

    @classmethod
    def from_path(cls, path: Path) -> BaseModelSpec:
        """``path`` is a ``config.json`` file or a model folder holding one."""
        file = path / CONFIG_FILENAME if path.is_dir() else path
        try:
            config = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{file.name} is not valid JSON: {e}") from e
        if not isinstance(config, dict):
            raise ValueError(f"{file.name} does not hold a JSON object")
        return cls.from_hf_config(config)


def _llama_layout(config: Mapping[str, Any]) -> _Layout:
    """Llama and its look-alikes: separate q/k/v/o projections, a gated MLP, optional GQA."""
    hidden = _positive_int(config, "hidden_size")
    intermediate = _positive_int(config, "intermediate_size")
    heads = _positive_int(config, "num_attention_heads")
    kv_heads = _positive_int(config, "num_key_value_heads", default=heads)
    head_dim = _positive_int(config, "head_dim", default=hidden // heads)
    if heads % kv_heads:
        raise ValueError(f"num_attention_heads ({heads}) is not a multiple of "
                         f"num_key_value_heads ({kv_heads})")
    attn = {
        "q_proj": ModuleShape(hidden, heads * head_dim),
        "k_proj": ModuleShape(hidden, kv_heads * head_dim),
        "v_proj": ModuleShape(hidden, kv_heads * head_dim),
        "o_proj": ModuleShape(heads * head_dim, hidden),
    }
    mlp = {
        "gate_proj": ModuleShape(hidden, intermediate),
        "up_proj": ModuleShape(hidden, intermediate),
        "down_proj": ModuleShape(intermediate, hidden),
    }
    parents = {name: "self_attn" for name in attn} | {name: "mlp" for name in mlp}
    return attn | mlp, parents


_LAYOUTS: dict[str, Callable[[Mapping[str, Any]], _Layout]] = {
    "llama": _llama_layout,
    "mistral": _llama_layout,
    "qwen2": _llama_layout,
    "qwen3": _llama_layout,
}
_MODEL_TYPE_BY_ARCHITECTURE = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


def _model_type(config: Mapping[str, Any]) -> str | None:
    model_type = config.get("model_type")
    if isinstance(model_type, str):
        return model_type
    architectures = config.get("architectures")
    if isinstance(architectures, list):
        for arch in architectures:
            if isinstance(arch, str) and arch in _MODEL_TYPE_BY_ARCHITECTURE:
                return _MODEL_TYPE_BY_ARCHITECTURE[arch]
    return None


def _positive_int(config: Mapping[str, Any], key: str, *, default: int | None = None) -> int:
    value = config.get(key)
    if value is None:
        if default is None:
            raise ValueError(f"base model config is missing {key!r}")
        value = default
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"base model config field {key!r} must be a positive integer, got {value!r}")
    return value
