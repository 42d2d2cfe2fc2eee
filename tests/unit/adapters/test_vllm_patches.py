"""The fix for vLLM's CPU LoRA ops: rows without an adapter (index -1) are left untouched."""

from __future__ import annotations

import torch

from adapters.vllm_patches import patch_cpu_lora_ops


def test_rows_without_an_adapter_get_no_delta_from_the_last_slot() -> None:
    from vllm.lora.ops.torch_ops import lora_ops

    assert patch_cpu_lora_ops()
    torch.manual_seed(0)
    slots, rank, hidden = 4, 2, 8
    lora_a = torch.randn(slots, 1, rank, hidden)  # every slot filled, the last one included
    lora_b = torch.randn(slots, 1, hidden, rank)
    x = torch.randn(3, hidden)
    indices = torch.tensor([1, -1, 3])  # the middle row is a base-model request
    buffer = torch.zeros(3, rank)
    lora_ops.bgmv_shrink(x, lora_a, buffer, indices, 1.0)
    out = torch.full((3, hidden), 7.0)
    lora_ops.bgmv_expand(buffer, lora_b, out, indices, add_inputs=True)
    assert torch.equal(out[1], torch.full((hidden,), 7.0))  # untouched: no adapter, no delta
    assert torch.equal(buffer[1], torch.zeros(rank))
    expected_row0 = 7.0 + lora_b[1, 0] @ (lora_a[1, 0] @ x[0])
    assert torch.allclose(out[0], expected_row0, atol=1e-5)
    # the sequence-level op goes through the same fix
    seq_out = torch.full((3, hidden), 7.0)
    lora_ops.sgmv_expand(buffer, lora_b, seq_out, torch.tensor([0, 1, 2]), torch.tensor([1, 1, 1]), indices,
                         3, 1, 3, add_inputs=True)
    assert torch.equal(seq_out[1], torch.full((hidden,), 7.0))
    assert patch_cpu_lora_ops()  # idempotent
