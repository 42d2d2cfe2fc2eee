"""Two changes to vLLM, applied by the plugin in every vLLM process: a fix for its CPU LoRA kernels, and a
shorter busy-wait for its inter-process message queues.

**The CPU LoRA kernels.**

vLLM's torch LoRA ops (``vllm.lora.ops.torch_ops.lora_ops``, used by the CPU punica wrapper) select each
row's adapter with ``weights[lora_indices]``. A row without an adapter has index -1, and Python
indexing turns -1 into the *last* adapter slot. While that slot is empty (zeros) nothing shows; once
``max_loras`` different adapters have been loaded it holds real weights, and base-model requests that
share a batch with adapter requests get that adapter's delta. (Found by Banyan's correctness oracle:
after adapter churn, greedy base-model outputs in mixed batches differed from Hugging Face.)

The GPU kernels skip rows with index -1. The wrapper below gives the torch ops the same semantics:
rows without an adapter keep their output untouched.

**The message queues' busy-wait.** The engine core and its worker process talk through vLLM's shared-memory
``MessageQueue``. A reader that read a message in the last ``busy_loop_s`` (1 s, fixed in vLLM) waits for the
next one by spinning on ``sched_yield()``. While the engine generates, a message comes every step, so the
engine core spins through the whole generation while the worker computes, and the worker spins between
steps. On a CPU engine that is a core taken from everything else on the machine: on a 2-core box the
gateway, vLLM's own API server, Redis and any test client got almost no CPU until a generation ended
(``loadtests/stall_probe.py``; ``BENCHMARKS.md``). :func:`sleep_in_shm_busy_wait` makes the readers sleep a
short time between checks instead (``BANYAN_ENGINE_SHM_BUSY_SLEEP_S``; ``banyan dev`` sets 100 us). Not a
shorter window: leaving the window for the notification socket (what vllm-project/vllm#52814 proposes) lost
wake-ups here, and each lost one cost the reader's 5 s recheck interval.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("banyan.resolver")

_BGMV_OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")
_PATCHED = "__banyan_skips_rows_without_lora__"
_BUSY_WAIT = "__banyan_busy_wait_s__"


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



def sleep_in_shm_busy_wait(seconds: float) -> bool:
    """Readers of vLLM's shared-memory message queues, in their busy window after a read, sleep ``seconds``
    between checks instead of spinning on ``sched_yield()``; True if applied (a vLLM without
    ``SpinCondition``: nothing to change). Queues made before it keep spinning."""
    try:
        from vllm.distributed.device_communicators import shm_broadcast
    except ImportError:
        return False
    condition = getattr(shm_broadcast, "SpinCondition", None)
    original = getattr(condition, "wait", None)
    if condition is None or original is None:
        log.warning("this vLLM has no SpinCondition.wait: its message queues' busy-wait is left as it is")
        return False
    original = getattr(original, "__wrapped__", original)

    @functools.wraps(original)
    def wait(self: Any, timeout_ms: int | None = None) -> None:
        if getattr(self, "is_reader", False) and time.monotonic() <= self.last_read + self.busy_loop_s:
            time.sleep(seconds)
            return
        original(self, timeout_ms)

    setattr(wait, _BUSY_WAIT, seconds)
    condition.wait = wait
    return True
