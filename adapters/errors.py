"""Why an uploaded adapter was refused, in words the API user can act on.

::

    AdapterError (base; .message, .code)
     +-- InvalidAdapterError   -> the gateway answers 400 (InvalidAdapter)
     +-- AdapterTooLargeError  -> the gateway answers 413 (PayloadTooLarge)

``code`` is one of :class:`AdapterErrorCode` and goes out as the OpenAI ``error.code``, so clients
can branch on it; callers never classify these errors by their message. Messages name the file,
tensor, member or limit at fault, and never a server path: they are shown to the API user.

These do not derive from ``gateway.errors.BanyanError`` on purpose: this package also runs inside
the vLLM engine (the resolver plugin), which must not import the gateway's web stack. The gateway
translates them at its boundary.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum


class AdapterErrorCode(StrEnum):
    INVALID_ADAPTER = "invalid_adapter"
    # archives
    UNSUPPORTED_ARCHIVE_FORMAT = "unsupported_archive_format"
    INVALID_ARCHIVE = "invalid_archive"
    UNSAFE_ARCHIVE_MEMBER = "unsafe_archive_member"
    # the set of files
    MISSING_ADAPTER_FILE = "missing_adapter_file"
    UNSAFE_WEIGHTS_FORMAT = "unsafe_weights_format"
    UNEXPECTED_ADAPTER_FILE = "unexpected_adapter_file"
    # adapter_config.json
    INVALID_ADAPTER_CONFIG = "invalid_adapter_config"
    UNSUPPORTED_ADAPTER_TYPE = "unsupported_adapter_type"
    RANK_TOO_LARGE = "rank_too_large"
    UNKNOWN_TARGET_MODULE = "unknown_target_module"
    UNSUPPORTED_LORA_FEATURE = "unsupported_lora_feature"
    # adapter_model.safetensors
    INVALID_SAFETENSORS = "invalid_safetensors"
    UNSUPPORTED_DTYPE = "unsupported_dtype"
    UNEXPECTED_TENSOR = "unexpected_tensor"
    MISSING_TENSOR = "missing_tensor"
    TENSOR_SHAPE_MISMATCH = "tensor_shape_mismatch"
    NON_FINITE_WEIGHTS = "non_finite_weights"
    # sizes (413)
    ADAPTER_TOO_LARGE = "adapter_too_large"


class AdapterError(Exception):
    def __init__(self, message: str, *, code: str = AdapterErrorCode.INVALID_ADAPTER) -> None:
        super().__init__(message)
        self.message = message
        self.code = str(code)


class InvalidAdapterError(AdapterError):
    """The upload is not an adapter this server can serve (HTTP 400)."""


class AdapterTooLargeError(AdapterError):
    """The upload, or something inside it, is over a size limit (HTTP 413)."""

    def __init__(self, message: str, *, code: str = AdapterErrorCode.ADAPTER_TOO_LARGE) -> None:
        super().__init__(message, code=code)


def shown(text: str, *, limit: int = 120) -> str:
    """``text`` quoted for an error message: repr-escaped (no control characters) and cut short."""
    quoted = repr(text)
    return quoted if len(quoted) <= limit else quoted[: limit - 4] + "...'"


def shown_list(texts: Iterable[str], *, limit: int = 5) -> str:
    """Up to ``limit`` quoted items, comma-separated, then how many more there are."""
    items = list(texts)
    head = ", ".join(shown(t) for t in items[:limit])
    return head if len(items) <= limit else f"{head} and {len(items) - limit} more"
