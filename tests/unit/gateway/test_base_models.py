"""Several base models: the settings that declare them, routing to each base's own engine pool (an adapter's
pool is its active version's base), listing and retrieving model cards, readiness per base, and fine-tuning jobs
bound to a base."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import torch
from pydantic import SecretStr, ValidationError
from redis.asyncio import Redis
from safetensors.torch import save

from adapters.basemodel import BaseModelSpec
from adapters.registry import AdapterRecord, Split, VersionMeta
from gateway.app import build_state
from gateway.engine import EnginePool
from gateway.settings import Settings
from gateway.state import ServedBase
from tests.unit.gateway.conftest import (
    ADMIN_KEY,
    CharTokens,
    FakeStore,
    Handler,
    Harness,
    version_meta,
)
from tests.unit.retrieval.conftest import HashingEmbedder

BASE, OTHER = "banyan-demo", "other-base"
TWO_BASES = [{"id": BASE, "engine_urls": ["http://engine"]}, {"id": OTHER, "engine_urls": ["http://other:1"]}]


# -- settings ---------------------------------------------------------------------------------------


def test_without_base_models_the_single_base_settings_are_the_only_base(tmp_path: Path) -> None:
    settings = Settings(mode="dev", base_model="m", base_model_config=tmp_path, engine_urls="http://a:1,http://b:2")
    assert [(b.id, b.config, b.engine_urls) for b in settings.bases] == [("m", tmp_path, ["http://a:1", "http://b:2"])]


def test_base_models_from_the_environment_the_first_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BANYAN_BASE_MODELS", json.dumps([
        {"id": "big", "config": "/models/big", "engine_urls": ["http://big:1", "http://big:2"]},
        {"id": "small", "config": "/models/small", "tokenizer": "/t/tokenizer.json", "engine_urls": "http://s:1"}]))
    settings = Settings(mode="dev")
    assert [b.id for b in settings.bases] == ["big", "small"] and settings.base_model == "big"
    assert settings.bases[0].engine_urls == ["http://big:1", "http://big:2"]
    assert settings.bases[1].engine_urls == ["http://s:1"] and settings.bases[1].tokenizer == Path("/t/tokenizer.json")


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_base_models_from_a_file(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"bases{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps({"base_models": TWO_BASES}))
    else:
        path.write_text(f"- id: {BASE}\n  engine_urls: [http://engine]\n- id: {OTHER}\n  engine_urls: [http://other:1]\n")
    settings = Settings(mode="dev", base_models_file=path)
    assert [b.id for b in settings.bases] == [BASE, OTHER]


@pytest.mark.parametrize(("bases", "message"), [
    ([], "at least one base model"),
    ([{"id": "a", "engine_urls": ["http://a"]}, {"id": "a", "engine_urls": ["http://b"]}], "more than once: a"),
    ([{"id": "a", "engine_urls": []}], "engine_urls"),
    ([{"id": "a b", "engine_urls": ["http://a"]}], "id"),
    ([{"id": "a", "engine_urls": ["http://a"], "extra": 1}], "extra"),
])
def test_bad_base_models_are_refused_at_start(bases: list[object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(mode="dev", base_models=bases)  # type: ignore[arg-type]


def test_base_model_must_name_the_default_and_a_file_excludes_the_list(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="not the first"):
        Settings(mode="dev", base_model=OTHER, base_models=TWO_BASES)  # type: ignore[arg-type]
    path = tmp_path / "bases.json"
    path.write_text(json.dumps(TWO_BASES))
    with pytest.raises(ValidationError, match="not both"):
        Settings(mode="dev", base_models_file=path, base_models=TWO_BASES)  # type: ignore[arg-type]
    path.write_text("{}")
    with pytest.raises(ValidationError, match="must hold a list"):
        Settings(mode="dev", base_models_file=path)


# -- a harness with two bases -----------------------------------------------------------------------


@dataclasses.dataclass
class TwoBases:
    harness: Harness
    other_requests: list[httpx.Request]


def _completion(request: httpx.Request) -> httpx.Response:
    body = json.loads(request.content)
    return httpx.Response(200, json={"id": "c", "object": "text_completion", "model": body["model"],
                                     "choices": [{"index": 0, "text": "ok", "finish_reason": "stop"}],
                                     "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})


@pytest.fixture
def two_bases(make_harness: Callable[[Handler], Harness]) -> TwoBases:
    """The default base ``banyan-demo`` on the harness's engine, and ``other-base`` on an engine of its own."""
    harness = make_harness(_completion)
    other_requests: list[httpx.Request] = []

    def other(request: httpx.Request) -> httpx.Response:
        other_requests.append(request)
        return _completion(request)

    pool = EnginePool(["http://other:1"], transport=httpx.MockTransport(other))
    default = harness.state.bases[BASE]
    harness.state.bases = {BASE: default, OTHER: ServedBase(id=OTHER, spec=None, engines=pool, tokens=CharTokens())}
    return TwoBases(harness=harness, other_requests=other_requests)


def _on(meta: VersionMeta, base: str | None) -> VersionMeta:
    return dataclasses.replace(meta, base_model=base)


def _seed(h: Harness, name: str, *, bases: dict[int, str | None], active: int = 1,
          canary: Split | None = None) -> None:
    h.registry.records[("acme", name)] = AdapterRecord(
        "acme", name, active, {v: _on(version_meta(v), b) for v, b in bases.items()}, canary=canary)


def _complete(h: Harness, model: str, *, user: str | None = None) -> httpx.Response:
    body: dict[str, object] = {"model": model, "prompt": "hi", "max_tokens": 2}
    if user is not None:
        body["user"] = user
    return h.client.post("/v1/completions", headers=h.tenant_headers(), json=body)


# -- routing ----------------------------------------------------------------------------------------


def test_each_base_and_each_adapter_goes_to_its_own_base_pool(two_bases: TwoBases) -> None:
    h = two_bases.harness
    _seed(h, "on-other", bases={1: OTHER})
    _seed(h, "on-default", bases={1: BASE})
    _seed(h, "old-record", bases={1: None})  # written before versions had a base: the default base
    for model, to_other in ((OTHER, True), (BASE, False), ("on-other", True), ("on-default", False),
                            ("old-record", False)):
        before = (len(two_bases.other_requests), len(h.engine_requests))
        response = _complete(h, model)
        assert response.status_code == 200, response.text
        assert response.json()["model"] == model
        grew = (len(two_bases.other_requests) - before[0], len(h.engine_requests) - before[1])
        assert grew == ((1, 0) if to_other else (0, 1)), model
    assert json.loads(two_bases.other_requests[0].content)["model"] == OTHER


def test_a_canary_across_bases_sends_each_version_to_its_base(two_bases: TwoBases) -> None:
    h = two_bases.harness
    _seed(h, "bot", bases={1: BASE, 2: OTHER}, canary=Split(version=2, percent=50))
    served = set()
    for user in (f"user-{i}" for i in range(40)):
        response = _complete(h, "bot", user=user)
        assert response.status_code == 200
        version = response.headers["x-banyan-adapter-version"]
        served.add(version)
        last_other = two_bases.other_requests[-1] if two_bases.other_requests else None
        went_other = last_other is not None and json.loads(last_other.content)["model"].endswith(
            f".v{version}.uid{int(version):09d}")
        assert went_other == (version == "2")
    assert served == {"1", "2"}


def test_an_adapter_on_a_retired_base_is_explained(two_bases: TwoBases) -> None:
    h = two_bases.harness
    _seed(h, "legacy", bases={1: "retired-base"})
    response = _complete(h, "legacy")
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "model_not_found" and "`retired-base`, which is no longer served" in error["message"]
    listed = [m["id"] for m in h.client.get("/v1/models", headers=h.tenant_headers()).json()["data"]]
    assert "legacy" not in listed


def test_the_fallback_goes_to_the_adapters_own_base(make_harness: Callable[[Handler], Harness]) -> None:
    h = make_harness(_completion)
    other_requests: list[httpx.Request] = []

    def other(request: httpx.Request) -> httpx.Response:
        other_requests.append(request)
        if json.loads(request.content)["model"] != OTHER:
            return httpx.Response(404, json={"error": {"message": "no adapter", "code": 404}})
        return _completion(request)

    pool = EnginePool(["http://other:1"], transport=httpx.MockTransport(other))
    h.state.bases = {BASE: h.state.bases[BASE], OTHER: ServedBase(id=OTHER, spec=None, engines=pool,
                                                                  tokens=CharTokens())}
    h.tenants.tenants["acme"] = dataclasses.replace(h.tenants.tenants["acme"], fallback_to_base=True)
    _seed(h, "bot", bases={1: OTHER})
    response = _complete(h, "bot")
    assert response.status_code == 200 and response.headers["x-banyan-fallback"] == "base"
    assert json.loads(other_requests[-1].content)["model"] == OTHER
    assert not h.engine_requests  # the default base's engine never saw it


# -- listing and retrieving -------------------------------------------------------------------------


def test_models_lists_every_base_and_each_adapter_with_its_base(two_bases: TwoBases) -> None:
    h = two_bases.harness
    _seed(h, "on-other", bases={1: OTHER})
    _seed(h, "old-record", bases={1: None})
    h.registry.add("globex", "theirs")
    data = h.client.get("/v1/models", headers=h.tenant_headers()).json()["data"]
    cards = {m["id"]: (m["owned_by"], m["parent"], m["root"]) for m in data}
    assert cards == {BASE: ("banyan", None, BASE), OTHER: ("banyan", None, OTHER),
                     "on-other": ("acme", OTHER, OTHER), "old-record": ("acme", BASE, BASE)}


def test_a_model_card_is_the_listed_one_and_others_are_404(two_bases: TwoBases) -> None:
    h = two_bases.harness
    _seed(h, "on-other", bases={1: OTHER})
    h.registry.add("globex", "theirs")
    listed = {m["id"]: m for m in h.client.get("/v1/models", headers=h.tenant_headers()).json()["data"]}
    for model in (BASE, OTHER, "on-other"):
        response = h.client.get(f"/v1/models/{model}", headers=h.tenant_headers())
        assert response.status_code == 200 and response.json() == listed[model]
    for model in ("theirs", "nothing", "Not_An-Id", "org/some-model"):
        response = h.client.get(f"/v1/models/{model}", headers=h.tenant_headers())
        assert response.status_code == 404, model
        assert response.json()["error"]["type"] == "not_found_error"
        assert response.json()["error"]["code"] == "model_not_found"
    assert h.client.get(f"/v1/models/{BASE}").status_code == 401


# -- readiness --------------------------------------------------------------------------------------


def test_readiness_names_the_base_whose_engines_all_failed(make_harness: Callable[[Handler], Harness]) -> None:
    h = make_harness(lambda request: httpx.Response(200, json={"data": []}))

    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    pool = EnginePool(["http://other:1"], transport=httpx.MockTransport(down))
    h.state.bases = {BASE: h.state.bases[BASE], OTHER: ServedBase(id=OTHER, spec=None, engines=pool,
                                                                  tokens=CharTokens())}
    h.state.readiness.ttl_s = 0
    response = h.client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["checks"]["engine"] == "failed" and body["checks"][f"engine:{OTHER}"] == "failed"
    assert f"engine:{BASE}" not in body["error"]["message"] and f"engine:{OTHER}" in body["error"]["message"]


# -- uploads and fine-tuning ------------------------------------------------------------------------


def test_an_upload_for_a_base_not_served_names_the_served_ones(two_bases: TwoBases) -> None:
    h = two_bases.harness
    files = [("files", ("adapter_config.json", b"{}", "application/json"))]
    response = h.client.post("/admin/tenants/acme/adapters", data={"name": "bot", "base_model": "elsewhere"},
                             files=files, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "base_model" and f"`{BASE}`, `{OTHER}`" in error["message"]


def test_a_job_trains_on_the_base_it_names_or_its_adapters_base(two_bases: TwoBases) -> None:
    h = two_bases.harness
    _seed(h, "on-other", bases={1: OTHER})
    line = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    uploaded = h.client.post("/v1/files", headers=h.tenant_headers(), data={"purpose": "fine-tune"},
                             files={"file": ("t.jsonl", (line + "\n").encode(), "application/jsonl")})
    assert uploaded.status_code == 200, uploaded.text
    for model, base in ((OTHER, OTHER), ("on-other", OTHER), (BASE, BASE)):
        response = h.client.post("/v1/fine_tuning/jobs", headers=h.tenant_headers(), json={
            "model": model, "training_file": uploaded.json()["id"], "suffix": "made"})
        assert response.status_code == 200, response.text
        assert h.jobs.jobs[-1].base_model == base
        h.jobs.finish(h.jobs.jobs[-1].id, status="succeeded")
    response = h.client.post("/v1/fine_tuning/jobs", headers=h.tenant_headers(), json={
        "model": "elsewhere", "training_file": uploaded.json()["id"], "suffix": "made"})
    assert response.status_code == 404 and f"`{OTHER}`" in response.json()["error"]["message"]


def test_the_state_of_single_base_settings_has_one_base(make_harness: Callable[[Handler], Harness]) -> None:
    h = make_harness(_completion)
    assert list(h.state.bases) == [BASE] and h.state.default_base == BASE
    assert h.state.bases[BASE].engines is h.state.engines


async def test_settings_built_with_bases_make_a_pool_per_base(redis: Redis) -> None:
    settings = Settings(mode="dev", admin_key=SecretStr(ADMIN_KEY), base_models=TWO_BASES)  # type: ignore[arg-type]
    state = build_state(settings, redis=redis, store=FakeStore(), embedder=HashingEmbedder())
    try:
        assert list(state.bases) == [BASE, OTHER] and state.default_base == BASE
        assert [r.url for r in state.bases[OTHER].engines.replicas] == ["http://other:1"]
        assert state.engines is state.bases[BASE].engines
    finally:
        for base in state.bases.values():
            await base.engines.aclose()


# -- uploads validated against the chosen base ------------------------------------------------------


def _llama(hidden: int) -> BaseModelSpec:
    return BaseModelSpec.from_hf_config({"model_type": "llama", "hidden_size": hidden, "intermediate_size": 2 * hidden,
                                         "num_attention_heads": hidden // 64, "num_hidden_layers": 1})


def _adapter_files(hidden: int, made_for: str) -> list[tuple[str, tuple[str, bytes, str]]]:
    """A rank-2 LoRA on ``q_proj`` of a one-layer Llama of width ``hidden``, as the multipart ``files``."""
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
              "base_model_name_or_path": made_for}
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    weights = save({f"{prefix}.lora_A.weight": torch.full((2, hidden), 0.01),
                    f"{prefix}.lora_B.weight": torch.full((hidden, 2), 0.01)})
    return [("files", ("adapter_config.json", json.dumps(config).encode(), "application/json")),
            ("files", ("adapter_model.safetensors", weights, "application/octet-stream"))]


def test_an_upload_is_bound_to_the_base_it_names_and_refused_for_another(two_bases: TwoBases) -> None:
    h = two_bases.harness
    h.state.bases = {BASE: dataclasses.replace(h.state.bases[BASE], spec=_llama(64)),
                     OTHER: dataclasses.replace(h.state.bases[OTHER], spec=_llama(128))}
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    route = "/admin/tenants/acme/adapters"
    stored = h.client.post(route, data={"name": "bot", "base_model": OTHER}, files=_adapter_files(128, "org/wide"),
                           headers=admin)
    assert stored.status_code == 201, stored.text
    assert stored.json()["base_model"] == OTHER
    assert h.registry.records[("acme", "bot")].versions[1].base_model == OTHER
    default = h.client.post(route, data={"name": "bot"}, files=_adapter_files(64, "org/narrow"), headers=admin)
    assert default.status_code == 201 and default.json()["base_model"] == BASE  # none named: the default base
    detail = h.client.get(f"{route}/bot", headers=admin).json()
    assert [v["base_model"] for v in detail["versions"]] == [OTHER, BASE]

    refused = h.client.post(route, data={"name": "bot"}, files=_adapter_files(128, "org/wide"), headers=admin)
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["param"] == "base_model" and "'org/wide'" in error["message"]
    assert f"Banyan serves '{BASE}', '{OTHER}'" in error["message"]
    assert (f"the upload named no base_model); it fits `{OTHER}`: upload it with base_model `{OTHER}`"
            in error["message"])
    nowhere = h.client.post(route, data={"name": "bot", "base_model": OTHER}, files=_adapter_files(96, "org/odd"),
                            headers=admin)
    assert nowhere.status_code == 400 and "it fits" not in nowhere.json()["error"]["message"]
    assert len(h.registry.records[("acme", "bot")].versions) == 2  # nothing stored by a refusal
