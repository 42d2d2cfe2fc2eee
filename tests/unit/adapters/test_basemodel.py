from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from adapters.basemodel import BaseModelSpec, ModuleShape

LLAMA3_8B: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
}


def test_the_demo_model_shapes(demo_spec: BaseModelSpec) -> None:
    assert demo_spec.num_layers == 2
    assert dict(demo_spec.modules) == {
        "q_proj": ModuleShape(128, 128),  # 2 heads x head_dim 64
        "k_proj": ModuleShape(128, 64),  # 1 KV head
        "v_proj": ModuleShape(128, 64),
        "o_proj": ModuleShape(128, 128),
        "gate_proj": ModuleShape(128, 256),
        "up_proj": ModuleShape(128, 256),
        "down_proj": ModuleShape(256, 128),
    }
    assert {m for m, p in demo_spec.parents.items() if p == "self_attn"} == {"q_proj", "k_proj", "v_proj",
                                                                             "o_proj"}
    assert {m for m, p in demo_spec.parents.items() if p == "mlp"} == {"gate_proj", "up_proj", "down_proj"}


def test_a_gqa_config_gets_narrow_key_and_value_projections() -> None:
    spec = BaseModelSpec.from_hf_config(LLAMA3_8B)
    assert spec.num_layers == 32
    assert spec.modules["q_proj"] == ModuleShape(4096, 4096)  # head_dim defaults to 4096 // 32 = 128
    assert spec.modules["k_proj"] == spec.modules["v_proj"] == ModuleShape(4096, 1024)
    assert spec.modules["o_proj"] == ModuleShape(4096, 4096)
    assert spec.modules["down_proj"] == ModuleShape(14336, 4096)


def test_kv_heads_default_to_the_attention_heads() -> None:
    config = {k: v for k, v in LLAMA3_8B.items() if k != "num_key_value_heads"}
    assert BaseModelSpec.from_hf_config(config).modules["k_proj"] == ModuleShape(4096, 4096)


def test_an_explicit_head_dim_wins_over_hidden_over_heads() -> None:
    qwen3 = {"model_type": "qwen3", "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
             "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128}
    spec = BaseModelSpec.from_hf_config(qwen3)
    assert spec.modules["q_proj"] == ModuleShape(1024, 2048)
    assert spec.modules["o_proj"] == ModuleShape(2048, 1024)
    assert spec.modules["k_proj"] == ModuleShape(1024, 1024)


def test_the_architecture_names_the_layout_when_model_type_is_absent() -> None:
    config = {k: v for k, v in LLAMA3_8B.items() if k != "model_type"}
    config["architectures"] = ["Qwen2ForCausalLM"]
    assert BaseModelSpec.from_hf_config(config).num_layers == 32


@pytest.mark.parametrize("field", ["hidden_size", "intermediate_size", "num_hidden_layers",
                                   "num_attention_heads"])
def test_a_missing_field_is_named(field: str) -> None:
    config = {k: v for k, v in LLAMA3_8B.items() if k != field}
    with pytest.raises(ValueError, match=field):
        BaseModelSpec.from_hf_config(config)


@pytest.mark.parametrize("value", [0, -4, 4096.0, True, "4096"])
def test_a_field_must_be_a_positive_integer(value: Any) -> None:
    with pytest.raises(ValueError, match="hidden_size"):
        BaseModelSpec.from_hf_config(LLAMA3_8B | {"hidden_size": value})


def test_an_unknown_architecture_is_refused() -> None:
    with pytest.raises(ValueError, match="gpt2"):
        BaseModelSpec.from_hf_config({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                                      "n_embd": 768})


def test_from_path_takes_a_file_or_its_folder(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_8B))
    assert BaseModelSpec.from_path(tmp_path) == BaseModelSpec.from_path(tmp_path / "config.json")


def test_from_path_refuses_bad_json(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        BaseModelSpec.from_path(tmp_path)


def test_the_spec_cannot_be_changed_after_reading() -> None:
    spec = BaseModelSpec.from_hf_config(LLAMA3_8B)
    with pytest.raises(TypeError):
        spec.modules["lm_head"] = ModuleShape(4096, 128256)  # type: ignore[index]


def test_the_most_lora_tensors_an_adapter_can_hold(demo_spec: BaseModelSpec) -> None:
    assert demo_spec.max_lora_tensors == 2 * 2 * 7  # lora_A and lora_B, 2 layers, 7 linear modules
