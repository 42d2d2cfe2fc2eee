"""``POST /v1/embeddings`` over HTTP on in-memory state: OpenAI's shape (float and base64), the checks before
admission, the admission and the usage, and which lane of the embedding queue a request waits in."""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from gateway.errors import RateLimited
from gateway.quotas import Admission
from tests.unit.gateway.conftest import Handler, Harness

MODEL = "all-MiniLM-L6-v2"


@pytest.fixture
def h(make_harness: Callable[[Handler], Harness]) -> Harness:
    harness = make_harness(lambda request: pytest.fail("the engine is not used for embeddings"))
    return harness


def _post(h: Harness, body: dict[str, Any]) -> Any:
    return h.client.post("/v1/embeddings", json=body, headers=h.tenant_headers())


def test_float_embeddings_in_openai_shape(h: Harness) -> None:
    texts = ["the harbour opens at dawn", "ferries leave hourly, weather permitting"]
    response = _post(h, {"model": MODEL, "input": texts, "encoding_format": "float"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list" and body["model"] == MODEL
    assert [(d["object"], d["index"]) for d in body["data"]] == [("embedding", 0), ("embedding", 1)]
    expected = h.documents.embedder.embed(texts)
    got = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)
    assert got.shape == (2, 384)
    assert np.array_equal(got, expected)  # float32 values survive JSON exactly
    tokens = sum(h.documents.embedder.count_tokens(texts))
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}


def test_base64_is_little_endian_float32_of_the_same_vectors(h: Harness) -> None:
    texts = ["one text", "another text"]
    floats = _post(h, {"input": texts}).json()
    encoded = _post(h, {"input": texts, "encoding_format": "base64"}).json()
    for f, b in zip(floats["data"], encoded["data"], strict=True):
        decoded = np.frombuffer(base64.b64decode(b["embedding"]), dtype="<f4")
        assert decoded.tolist() == f["embedding"]


def test_a_string_input_is_one_embedding_and_model_is_optional(h: Harness) -> None:
    body = _post(h, {"input": "just one"}).json()
    assert [d["index"] for d in body["data"]] == [0]
    assert body["model"] == MODEL


def test_admitted_with_its_tokens_reserved_released_and_recorded(h: Harness) -> None:
    texts = ["alpha beta", "gamma, delta!"]
    assert _post(h, {"input": texts, "user": "end-user-7"}).status_code == 200
    tokens = sum(h.documents.embedder.count_tokens(texts))
    assert h.quotas.reserved == [tokens]
    assert [a.released for a in h.quotas.admissions] == [True]
    assert h.usage.records == [("acme", MODEL, tokens, 0)]
    assert h.usage.users == ["end-user-7"]
    assert [a.spent for a in h.quotas.admissions] == [tokens]  # charged to the tpm window and budgets on release


def test_small_requests_wait_in_the_query_lane_large_ones_with_ingestion(h: Harness) -> None:
    batch = h.state.settings.embedding_batch_size
    assert _post(h, {"input": ["q"] * batch}).status_code == 200
    assert _post(h, {"input": ["d"] * (batch + 1)}).status_code == 200
    assert h.documents.embedded == [("acme", batch, True), ("acme", batch + 1, False)]


@pytest.mark.parametrize(("body", "status", "param", "code"), [
    ({"input": "x", "model": "text-embedding-3-small"}, 404, "model", "model_not_found"),
    ({"input": "x", "dimensions": 256}, 400, "dimensions", None),
    ({"input": [1, 2, 3]}, 400, "input", None),
    ({"input": [[1, 2], [3]]}, 400, "input", None),
    ({"input": []}, 400, "input", None),
    ({"input": ["fine", ""]}, 400, "input", None),
    ({"input": ["x"] * 257}, 400, "input", None),
    ({"input": "y" * 8193}, 400, "input", None),
    ({"input": " ".join(["word"] * 300)}, 400, "input", None),  # over the embedder's 256 tokens
    ({"input": "x", "encoding_format": "int8"}, 400, "encoding_format", None),
    ({"input": "x", "truncate": True}, 400, "truncate", None),
    ({"input": "x", "user": "u" * 257}, 400, "user", None),
])
def test_refused_before_admission(h: Harness, body: dict[str, Any], status: int, param: str,
                                  code: str | None) -> None:
    response = _post(h, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert error["code"] == code
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    assert h.quotas.reserved == [] and h.documents.embedded == [] and h.usage.records == []


def test_dimensions_equal_to_the_model_is_accepted(h: Harness) -> None:
    assert _post(h, {"input": "x", "dimensions": 384}).status_code == 200


def test_needs_a_tenant_key(h: Harness) -> None:
    response = h.client.post("/v1/embeddings", json={"input": "x"})
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"


@dataclass
class _Refusing:
    async def admit(self, tenant: str, *, reserve_tokens: int = 0) -> Admission:
        raise RateLimited("Rate limit reached for requests per minute; retry after 7 s.",
                          headers={"retry-after": "7"})


def test_rate_limited_is_a_429_and_embeds_nothing(h: Harness) -> None:
    h.state.quotas = _Refusing()
    response = _post(h, {"input": "x"})
    assert response.status_code == 429
    assert response.json()["error"]["code"] == "rate_limit_exceeded"
    assert response.headers["retry-after"] == "7"
    assert h.documents.embedded == [] and h.usage.records == []
