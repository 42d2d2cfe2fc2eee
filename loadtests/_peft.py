"""The correctness oracle for benchmarks: greedy generation with Hugging Face PEFT.

The same procedure as ``peft_greedy`` in ``tests/integration/test_correctness.py`` (raw prompt, no special
tokens added, greedy, decode without special tokens), with the tokenizer loaded once. Imports torch,
transformers and peft inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class PeftOracle:
    """Greedy outputs of the base model at ``model_path`` with one PEFT LoRA adapter at a time."""

    def __init__(self, model_path: Path) -> None:
        from transformers import AutoTokenizer

        self.model_path = model_path
        self.tokenizer: Any = AutoTokenizer.from_pretrained(model_path)

    def _model(self, adapter: Path | None) -> Any:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        model: Any = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch.float32)
        if adapter is not None:
            model = PeftModel.from_pretrained(model, adapter)
        return model.eval()

    def greedy(self, adapter: Path | None, prompts: list[str], *, max_new_tokens: int) -> list[str]:
        import torch

        model = self._model(adapter)
        outputs: list[str] = []
        for prompt in prompts:
            ids = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=self.tokenizer.pad_token_id)
            outputs.append(str(self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)))
        return outputs
