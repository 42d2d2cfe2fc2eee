"""A fix for vLLM's CPU LoRA kernels, applied by the plugin in every vLLM process.

vLLM's torch LoRA ops (``vllm.lora.ops.torch_ops.lora_ops``, used by the CPU punica wrapper) select each
row's adapter with ``weights[lora_indices]``. A row without an adapter has index -1, and Python
indexing turns -1 into the *last* adapter slot. While that slot is empty (zeros) nothing shows; once
``max_loras`` different adapters have been loaded it holds real weights, and base-model requests that
share a batch with adapter requests get that adapter's delta. (Found by Banyan's correctness oracle:
after adapter churn, greedy base-model outputs in mixed batches differed from Hugging Face.)

The GPU kernels skip rows with index -1. The wrapper below gives the torch ops the same semantics:
rows without an adapter keep their output untouched.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("banyan.resolver")

_BGMV_OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")
_PATCHED = "__banyan_skips_rows_without_lora__"


def _skip_rows_without_lora(op: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(op)
    def wrapped(inputs: Any, weights: Any, output: Any, indices: Any, *args: Any, **kwargs: Any) -> Any:
        without = indices < 0
        if not bool(without.any()) or output.shape[0] != indices.shape[0]:
            return op(inputs, weights, output, indices, *args, **kwargs)
        kept = output[without].clone()
        result = op(inputs, weights, output, indices.clamp(min=0), *args, **kwargs)
        output[without] = kept
        return result

    setattr(wrapped, _PATCHED, True)
    return wrapped


def patch_cpu_lora_ops() -> bool:
    """Apply the fix where vLLM looks the ops up; True if applied (idempotent)."""
    try:
        from vllm.lora.ops.torch_ops import lora_ops
        from vllm.lora.punica_wrapper import punica_cpu
    except ImportError:  # a vLLM without these modules: nothing to fix
        return False
    for name in _BGMV_OPS:
        original = getattr(lora_ops, name, None)
        if original is None or getattr(original, _PATCHED, False):
            continue
        fixed = _skip_rows_without_lora(original)
        setattr(lora_ops, name, fixed)  # the sgmv_* ops call these through the module's globals
        if getattr(punica_cpu, name, None) is original:
            setattr(punica_cpu, name, fixed)
    return True
