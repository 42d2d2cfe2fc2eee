"""Train a LoRA adapter with PEFT from chat examples, on the CPU or wherever torch runs.

The examples are in the OpenAI fine-tuning format: one ``{"messages": [{"role": ..., "content": ...}, ...]}``
per JSONL line. Each conversation is rendered with the base model's own chat template; the loss counts the
assistant turns only (what the adapter should say), never the system or user text. Training is seeded:
the same examples, settings and base model give the same adapter. The result is a PEFT adapter folder
(``adapter_config.json`` + ``adapter_model.safetensors``) that Banyan's upload accepts.

Training can start from an existing adapter (its rank, alpha and target modules are kept) and can be stopped
between steps (``should_stop``); :func:`evaluate_loss` scores a base model, with or without an adapter, on
held-out examples with the same loss (mean over assistant tokens), so two versions can be compared.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

IGNORE_INDEX = -100
"""The label of a token that does not count in the loss (PyTorch's cross-entropy default)."""
ROLES = ("system", "user", "assistant")

ChatMessages = list[dict[str, str]]


class TrainingStopped(Exception):
    """Training was asked to stop between two steps (``should_stop``, or a progress callback raising it)."""


class NoTrainableTokens(ValueError):
    """No example has an assistant token within the length limit: there is nothing to learn."""


@dataclass(frozen=True)
class LoraTrainingConfig:
    """How an adapter is trained; every field goes into the cache key of a trained adapter."""

    rank: int = 8
    alpha: int = 16
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    learning_rate: float = 1e-3
    steps: int = 40
    batch_size: int = 4
    max_length: int = 512
    """Longer conversations are cut at this many tokens."""
    seed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class EncodedChat:
    input_ids: list[int]
    labels: list[int]
    """``input_ids`` with every token outside an assistant turn replaced by ``IGNORE_INDEX``."""


@dataclass(frozen=True)
class TrainingStep:
    step: int
    steps: int
    loss: float
    elapsed_s: float


@dataclass
class TrainingResult:
    path: Path
    steps: int
    first_loss: float
    last_loss: float
    seconds: float
    losses: list[float] = field(default_factory=list)
    trained_tokens: int = 0
    """Tokens of every batch trained on (padding not counted): what a job reports as ``trained_tokens``."""


def parse_chat_jsonl(text: str, *, source: str = "<examples>") -> list[ChatMessages]:
    """Parse OpenAI fine-tuning JSONL; each example needs at least one assistant message."""
    examples: list[ChatMessages] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{source}:{number}: not JSON ({e})") from e
        messages = record.get("messages") if isinstance(record, dict) else None
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{source}:{number}: expected an object with a non-empty `messages` list")
        for message in messages:
            if (not isinstance(message, dict) or message.get("role") not in ROLES
                    or not isinstance(message.get("content"), str)):
                raise ValueError(f"{source}:{number}: each message needs a role in {ROLES} and a string content")
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError(f"{source}:{number}: no assistant message to learn from")
        examples.append([{"role": m["role"], "content": m["content"]} for m in messages])
    if not examples:
        raise ValueError(f"{source}: no examples")
    return examples


def load_chat_jsonl(path: Path) -> list[ChatMessages]:
    return parse_chat_jsonl(path.read_text(encoding="utf-8"), source=str(path))


def _render(tokenizer: Any, messages: ChatMessages, *, generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids


def encode_chat(tokenizer: Any, messages: ChatMessages, *, max_length: int) -> EncodedChat:
    """Token ids of the conversation and its labels: only the assistant turns (with their end-of-turn
    token) are learned. Each assistant turn is found as the tokens between the conversation up to it with
    the generation prompt and the conversation through it."""
    ids = _render(tokenizer, messages, generation_prompt=False)
    labels = [IGNORE_INDEX] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_render(tokenizer, messages[:i], generation_prompt=True))
        through = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        if through != ids[: len(through)] or start > len(through):
            raise ValueError("the chat template does not render a conversation as the prefix of a longer one")
        labels[start:len(through)] = ids[start:len(through)]
    return EncodedChat(input_ids=ids[:max_length], labels=labels[:max_length])


def _batches(count: int, *, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """Example indices for each step: shuffled passes over the examples, as many as the steps need."""
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < steps * batch_size:
        epoch = list(range(count))
        rng.shuffle(epoch)
        order.extend(epoch)
    return [order[s * batch_size:(s + 1) * batch_size] for s in range(steps)]


def _collate(encoded: Sequence[EncodedChat], *, pad_id: int) -> dict[str, Any]:
    import torch

    width = max(len(e.input_ids) for e in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, e in enumerate(encoded):
        ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[row, : len(e.labels)] = torch.tensor(e.labels)
        mask[row, : len(e.input_ids)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _load_tokenizer_and_model(base_model: Path) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model)
    return tokenizer, AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)


def _device(device: str | None) -> str:
    """``device``, or the first GPU when there is one, else the CPU."""
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def _pad_id(tokenizer: Any) -> int:
    pad: int = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return pad


def _encode_all(tokenizer: Any, examples: Sequence[ChatMessages], *, max_length: int) -> list[EncodedChat]:
    encoded = [encode_chat(tokenizer, m, max_length=max_length) for m in examples]
    if not any(label != IGNORE_INDEX for e in encoded for label in e.labels):
        raise NoTrainableTokens(f"no assistant tokens within the first {max_length} tokens of any example")
    return encoded


def train_lora(base_model: Path, examples: Sequence[ChatMessages], out: Path, *,
               config: LoraTrainingConfig = LoraTrainingConfig(),
               progress: Callable[[TrainingStep], None] | None = None,
               init_adapter: Path | None = None,
               should_stop: Callable[[], bool] | None = None,
               device: str | None = None) -> TrainingResult:
    """Train a LoRA adapter for the Hugging Face model folder ``base_model`` on ``examples``; write it to
    ``out`` (created) and return where and how the loss went.

    ``init_adapter``: a PEFT adapter folder to continue training from (its rank, alpha and target modules are
    kept; ``config``'s are ignored), so a tenant's adapter can be retrained on new data. ``should_stop`` is
    asked before every step; when it says yes, :class:`TrainingStopped` is raised and nothing is written.
    ``device``: where to train (a torch device; default the first GPU if there is one, else the CPU)."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    if not examples:
        raise ValueError("no examples to train on")
    started = time.monotonic()
    torch.manual_seed(config.seed)
    tokenizer, base = _load_tokenizer_and_model(base_model)
    encoded = _encode_all(tokenizer, examples, max_length=config.max_length)
    pad_id = _pad_id(tokenizer)
    if init_adapter is not None:
        model = PeftModel.from_pretrained(base, str(init_adapter), is_trainable=True)
    else:
        lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, target_modules=list(config.target_modules),
                          lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
        model = get_peft_model(base, lora)
    where = _device(device)
    model.to(where)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate,
                                  weight_decay=0.0)
    # Linear warm-up over the first tenth, then cosine decay to zero.
    warmup = max(1, config.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, max(0, s - warmup) / max(1, config.steps - warmup)))))
    losses: list[float] = []
    tokens = 0
    for step, indices in enumerate(_batches(len(encoded), batch_size=config.batch_size, steps=config.steps,
                                            seed=config.seed), start=1):
        if should_stop is not None and should_stop():
            raise TrainingStopped(f"stopped before step {step} of {config.steps}")
        batch = {k: v.to(where) for k, v in _collate([encoded[i] for i in indices], pad_id=pad_id).items()}
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        tokens += int(batch["attention_mask"].sum())
        if progress is not None:
            progress(TrainingStep(step=step, steps=config.steps, loss=losses[-1],
                                  elapsed_s=time.monotonic() - started))
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    return TrainingResult(path=out, steps=config.steps, first_loss=losses[0], last_loss=losses[-1],
                          seconds=time.monotonic() - started, losses=losses, trained_tokens=tokens)


def evaluate_loss(base_model: Path, adapter_dir: Path | None, examples: Sequence[ChatMessages], *,
                  max_length: int = 512, batch_size: int = 8, device: str | None = None) -> float:
    """The mean loss per assistant token of ``examples`` on the base model, or with the adapter in
    ``adapter_dir``: the number :func:`train_lora` lowers, so two versions of an adapter compare on it (lower
    is better). Every assistant token weighs the same, whatever batch or example it is in."""
    import torch
    from peft import PeftModel

    tokenizer, model = _load_tokenizer_and_model(base_model)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    where = _device(device)
    model.to(where)
    model.eval()
    encoded = _encode_all(tokenizer, examples, max_length=max_length)
    pad_id = _pad_id(tokenizer)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(encoded), batch_size):
            batch = {k: v.to(where) for k, v in _collate(encoded[start:start + batch_size], pad_id=pad_id).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]  # token t is predicted at position t - 1
            losses = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                                                       ignore_index=IGNORE_INDEX, reduction="sum")
            total += float(losses)
            count += int((labels != IGNORE_INDEX).sum())
    return total / count
