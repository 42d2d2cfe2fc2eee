"""Counting tokens of the base model, for budgeting the ``rag`` context.

The gateway reads the base model's ``tokenizer.json`` with ``tokenizers`` (fast, no model weights): from
``BANYAN_BASE_MODEL_TOKENIZER``, else beside ``BANYAN_BASE_MODEL_CONFIG``. Without one it estimates from
characters (:class:`retrieval.context.CharEstimate`) and says so once at start-up.
"""

from __future__ import annotations

import logging
from pathlib import Path

from gateway.settings import BaseModelEntry, Settings
from retrieval.context import CharEstimate, TokenCounter

log = logging.getLogger("banyan.tokens")

TOKENIZER_FILE = "tokenizer.json"


class BaseModelTokens:
    """A :class:`TokenCounter` over a Hugging Face ``tokenizer.json``."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(str(path))

    def count(self, text: str) -> int:
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)


def tokenizer_path(base: BaseModelEntry) -> Path | None:
    if base.tokenizer is not None:
        return base.tokenizer
    config = base.config
    if config is None:
        return None
    folder = config if config.is_dir() else config.parent
    candidate = folder / TOKENIZER_FILE
    return candidate if candidate.is_file() else None


def base_model_tokens(settings: Settings, base: BaseModelEntry | None = None) -> TokenCounter:
    """The token counter of ``base`` (default: the default base model)."""
    base = base or settings.bases[0]
    path = tokenizer_path(base)
    if path is None:
        log.warning("no tokenizer.json for base model %s: rag context is budgeted by a character estimate", base.id)
        return CharEstimate()
    return BaseModelTokens(path)
