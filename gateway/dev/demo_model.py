"""A small deterministic demo base model and demo LoRA adapters, made locally (no model hub).

The base model is a 2-layer Llama (hidden 128, head size 64, one KV head) in float32 with seeded
random weights, and a character-level tokenizer over printable ASCII plus newline, so every token id
decodes to clean printable text. Adapters are real PEFT LoRA adapters for it. Everything is
deterministic: the same seed gives the same bytes, so tests can rebuild the same model and compare.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

log = logging.getLogger("banyan.dev")

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = ["\n"] + [chr(c) for c in range(0x20, 0x7F)]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_MARKER = "banyan-demo-model.json"
MODEL_VERSION = 2


def _build_tokenizer() -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=4096,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_base_model(path: Path, *, seed: int = 0) -> Path:
    """Write the demo base model to ``path`` once; later calls reuse it."""
    marker = path / _MARKER
    if marker.exists() and json.loads(marker.read_text()).get("version") == MODEL_VERSION:
        return path
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = _build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        # Large enough that greedy choices have clear margins (robust to kernel round-off).
        initializer_range=0.3,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        # Special tokens get a constant zero logit, below the best of the 96 random text logits, so greedy
        # demo answers are never empty (the demo model has nothing to say, but it says it visibly).
        model.lm_head.weight[: len(SPECIAL_TOKENS)] = 0.0
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / _MARKER).write_text(json.dumps({"version": MODEL_VERSION, "seed": seed}))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


def build_adapter(base_path: Path, out: Path, *, seed: int, rank: int = 8,
                  targets: list[str] | None = None) -> Path:
    """Write a PEFT LoRA adapter for the demo model whose weights visibly change its outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets or LORA_TARGETS,
                     lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    return out


def synthetic_variant(src: Path, dest: Path, *, seed: int) -> Path:
    """A copy of the adapter in ``src`` with the same PEFT config and new random LoRA weights: a distinct,
    valid adapter for the same base model, made in milliseconds (no model is loaded)."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    from adapters.layout import ADAPTER_FILES, WEIGHTS_FILE

    dest.mkdir(parents=True, exist_ok=True)
    for name in ADAPTER_FILES:
        shutil.copy(src / name, dest / name)
    rng = np.random.default_rng(seed)
    tensors = {k: (rng.standard_normal(v.shape) * 0.2).astype(np.float32)
               for k, v in load_file(src / WEIGHTS_FILE).items()}
    save_file(tensors, str(dest / WEIGHTS_FILE))
    return dest
