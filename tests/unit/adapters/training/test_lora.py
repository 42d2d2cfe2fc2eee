"""Training a LoRA from chat examples: parsing the OpenAI format, which tokens are learned, a real (tiny) run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from adapters.training.lora import (
    IGNORE_INDEX,
    LoraTrainingConfig,
    encode_chat,
    load_chat_jsonl,
    parse_chat_jsonl,
    train_lora,
)

_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
             "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    """A character-level tokenizer with a chat template whose role markers are single tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
    vocab = {tok: i for i, tok in enumerate(specials + [chr(c) for c in range(0x20, 0x7F)])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"<\|\w+\|>|</s>|[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>")
    tok.chat_template = _TEMPLATE
    return tok


def _learned(tokenizer: Any, encoded: Any) -> str:
    return str(tokenizer.decode([t for t, label in zip(encoded.input_ids, encoded.labels, strict=True)
                                 if label != IGNORE_INDEX]))


def test_parse_reads_the_openai_fine_tuning_format() -> None:
    text = "\n".join(json.dumps({"messages": m}) for m in (
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Arr!"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q"},
         {"role": "assistant", "content": "A", "weight": 1}],
    )) + "\n\n"
    examples = parse_chat_jsonl(text)
    assert examples == [
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Arr!"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q"},
         {"role": "assistant", "content": "A"}],
    ]


@pytest.mark.parametrize(("line", "why"), [
    ("{not json", "not JSON"),
    ('{"prompt": "x"}', "messages"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "role"),
    ('{"messages": [{"role": "user", "content": 3}]}', "string content"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant"),
])
def test_parse_names_the_line_of_a_bad_example(line: str, why: str) -> None:
    good = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    with pytest.raises(ValueError, match=rf"data.jsonl:2: .*{why}"):
        parse_chat_jsonl(f"{good}\n{line}\n", source="data.jsonl")


def test_parse_refuses_an_empty_file() -> None:
    with pytest.raises(ValueError, match="no examples"):
        parse_chat_jsonl("\n")


def test_only_assistant_turns_and_their_end_of_turn_are_learned(tokenizer: Any) -> None:
    messages = [{"role": "system", "content": "Talk like a pirate."}, {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": "Ahoy!"}, {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Arr."}]
    encoded = encode_chat(tokenizer, messages, max_length=512)
    assert len(encoded.input_ids) == len(encoded.labels)
    assert tokenizer.decode(encoded.input_ids) == tokenizer.apply_chat_template(messages, tokenize=False)
    assert _learned(tokenizer, encoded) == "Ahoy!</s>Arr.</s>"


def test_long_conversations_are_cut(tokenizer: Any) -> None:
    messages = [{"role": "user", "content": "x" * 50}, {"role": "assistant", "content": "y" * 50}]
    encoded = encode_chat(tokenizer, messages, max_length=60)
    assert len(encoded.input_ids) == len(encoded.labels) == 60
    assert _learned(tokenizer, encoded) == "y" * (60 - 1 - 50 - 1 - 1)  # <|user|>, x*50, </s>, <|assistant|>


def test_training_learns_and_writes_an_adapter_banyan_accepts(demo_base_path: Path, tmp_path: Path) -> None:
    from adapters.basemodel import BaseModelSpec
    from adapters.validation import validate_adapter_dir

    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                       {"role": "assistant", "content": "Arr, matey!"}]})
                              for q in ("Hi", "Who are you?", "What time is it?")))
    config = LoraTrainingConfig(rank=4, alpha=8, learning_rate=1e-2, steps=8, batch_size=2, seed=3)
    steps: list[int] = []
    result = train_lora(demo_base_path, load_chat_jsonl(data), tmp_path / "a", config=config,
                        progress=lambda s: steps.append(s.step))
    assert steps == list(range(1, 9))
    assert result.last_loss < result.first_loss * 0.8, result.losses
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["r"] == 4
    validate_adapter_dir(tmp_path / "a", base=BaseModelSpec.from_path(demo_base_path), max_rank=16, max_bytes=1 << 26)

    again = train_lora(demo_base_path, load_chat_jsonl(data), tmp_path / "b", config=config)
    first, second = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("a", "b"))
    assert again.losses == result.losses
    assert first.keys() == second.keys() and all(first[k].equal(second[k]) for k in first)
