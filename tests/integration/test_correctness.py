"""The correctness oracle: for any mix of adapters in one batch, greedy output through the gateway equals
Hugging Face PEFT's greedy output with that adapter on the same base model."""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from gateway.dev.demo_model import synthetic_variant
from gateway.settings import Settings
from tests.integration.conftest import RunningStack, TenantHandle, upload

PROMPTS = ["Hello there", "The quick brown fox", "abc", "Tell me a story about", "1 2 3 4", "Banyan trees",
           "{json: true}", "Why?"]
MAX_TOKENS = 20
MAX_LORAS = Settings(mode="dev").max_loras  # the engine's --max-loras: the stack reads the same environment


def peft_greedy(model_path: Path, adapter: Path | None, prompts: list[str], *, chat: bool = False,
                max_new_tokens: int = MAX_TOKENS) -> list[str]:
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    outputs = []
    for prompt in prompts:
        text = (tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                              add_generation_prompt=True) if chat else prompt)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        outputs.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return outputs


@pytest.fixture(scope="module")
def oracle_tenant(stack: RunningStack, admin: httpx.Client, peft_adapters: dict[str, Path]) -> TenantHandle:
    from tests.integration.conftest import make_tenant

    tenant = make_tenant(stack, admin, "oracle")
    for name in ("alpha", "beta"):
        response = upload(admin, tenant.id, name, peft_adapters[name])
        assert response.status_code == 201, response.text
    return tenant


def _fill_every_lora_slot(stack: RunningStack, tenant: TenantHandle, source: Path, tmp_path: Path) -> None:
    """Use more distinct adapters than the engine has LoRA slots, so that no slot is left empty (zeros): a
    base-model row that picked up a slot's weights by mistake would then show (it did, see
    adapters/vllm_patches.py)."""
    with stack.admin() as admin, tenant.http() as http:
        for i in range(MAX_LORAS + 2):
            folder = synthetic_variant(source, tmp_path / f"filler-{i}", seed=500 + i)
            assert upload(admin, tenant.id, f"filler-{i}", folder).status_code == 201
            response = http.post("/v1/completions", json={"model": f"filler-{i}", "prompt": "x", "max_tokens": 1})
            assert response.is_success, response.text


def test_mixed_batch_equals_peft(stack: RunningStack, oracle_tenant: TenantHandle,
                                 peft_adapters: dict[str, Path], tmp_path: Path) -> None:
    base = stack.info["base_model"]
    _fill_every_lora_slot(stack, oracle_tenant, peft_adapters["gamma"], tmp_path)
    models = {base: None, "alpha": peft_adapters["alpha"], "beta": peft_adapters["beta"]}
    expected = {m: peft_greedy(stack.model_path, path, PROMPTS) for m, path in models.items()}
    # The adapters must matter, or the comparison proves nothing.
    assert expected["alpha"] != expected[base] and expected["beta"] != expected[base]

    jobs = list(itertools.product(models, range(len(PROMPTS)))) * 2  # 48 requests in flight together

    def run(job: tuple[str, int]) -> tuple[str, int, str]:
        model, i = job
        with oracle_tenant.http() as http:
            response = http.post("/v1/completions", json={"model": model, "prompt": PROMPTS[i],
                                                          "max_tokens": MAX_TOKENS, "temperature": 0})
        assert response.status_code == 200, response.text
        return model, i, response.json()["choices"][0]["text"]

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        results = list(pool.map(run, jobs))
    mismatches = [(m, PROMPTS[i], got, expected[m][i]) for m, i, got in results if got != expected[m][i]]
    assert not mismatches, mismatches[:5]


def test_chat_with_adapter_equals_peft(stack: RunningStack, oracle_tenant: TenantHandle,
                                       peft_adapters: dict[str, Path]) -> None:
    prompts = PROMPTS[:3]
    expected = peft_greedy(stack.model_path, peft_adapters["beta"], prompts, chat=True)
    client = oracle_tenant.client()
    for prompt, want in zip(prompts, expected, strict=True):
        got = client.chat.completions.create(model="beta", messages=[{"role": "user", "content": prompt}],
                                             max_tokens=MAX_TOKENS, temperature=0)
        assert got.choices[0].message.content == want


def test_streamed_output_equals_peft(stack: RunningStack, oracle_tenant: TenantHandle,
                                     peft_adapters: dict[str, Path]) -> None:
    expected = peft_greedy(stack.model_path, peft_adapters["alpha"], PROMPTS[:2])
    client = oracle_tenant.client()
    for prompt, want in zip(PROMPTS[:2], expected, strict=True):
        stream = client.completions.create(model="alpha", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                           stream=True)
        assert "".join(c.choices[0].text for c in stream if c.choices) == want
