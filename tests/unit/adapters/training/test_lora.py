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
    TrainingStopped,
    encode_chat,
    evaluate_loss,
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


def _pirate(questions: tuple[str, ...] = ("Hi", "Who are you?", "What time is it?")) -> list[Any]:
    return [[{"role": "user", "content": q}, {"role": "assistant", "content": "Arr, matey!"}] for q in questions]


def test_evaluate_loss_scores_the_assistant_tokens_lower_with_a_trained_adapter(demo_base_path: Path,
                                                                                tmp_path: Path) -> None:
    config = LoraTrainingConfig(rank=4, alpha=8, learning_rate=1e-2, steps=8, batch_size=2, seed=3)
    result = train_lora(demo_base_path, _pirate(), tmp_path / "a", config=config)
    held_out = _pirate(("Ahoy there?",))
    base = evaluate_loss(demo_base_path, None, held_out)
    tuned = evaluate_loss(demo_base_path, tmp_path / "a", held_out)
    assert tuned < base * 0.7, (tuned, base)
    assert evaluate_loss(demo_base_path, tmp_path / "a", held_out, batch_size=1) == pytest.approx(tuned, rel=1e-5)
    # the mean over tokens is what training reported for the examples it saw, give or take the last step
    assert evaluate_loss(demo_base_path, tmp_path / "a", _pirate()) < result.first_loss


def test_training_continues_from_an_adapter_and_keeps_its_shape(demo_base_path: Path, tmp_path: Path) -> None:
    first = train_lora(demo_base_path, _pirate(), tmp_path / "a",
                       config=LoraTrainingConfig(rank=4, alpha=8, learning_rate=1e-2, steps=8, batch_size=2))
    again = train_lora(demo_base_path, _pirate(), tmp_path / "b", init_adapter=tmp_path / "a",
                       config=LoraTrainingConfig(rank=16, alpha=32, learning_rate=1e-3, steps=2, batch_size=2))
    assert again.first_loss < first.first_loss * 0.7, (again.losses, first.losses)
    config = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8


def _tokenizer_of(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def test_trained_tokens_count_every_batch_without_padding(demo_base_path: Path, tmp_path: Path) -> None:
    examples = _pirate(("Hi", "A much longer question, padded in its batch?"))
    lengths = [len(encode_chat(_tokenizer_of(demo_base_path), m, max_length=512).input_ids) for m in examples]
    result = train_lora(demo_base_path, examples, tmp_path / "a",
                        config=LoraTrainingConfig(rank=2, alpha=4, steps=3, batch_size=2))
    assert result.trained_tokens == 3 * sum(lengths)  # each step sees both examples once


def test_training_stops_between_steps_when_asked(demo_base_path: Path, tmp_path: Path) -> None:
    seen: list[int] = []
    with pytest.raises(TrainingStopped):
        train_lora(demo_base_path, _pirate(), tmp_path / "a", progress=lambda s: seen.append(s.step),
                   should_stop=lambda: len(seen) >= 2,
                   config=LoraTrainingConfig(rank=2, alpha=4, steps=10, batch_size=2))
    assert seen == [1, 2]
    assert not (tmp_path / "a").exists()
