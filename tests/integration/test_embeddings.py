"""``POST /v1/embeddings`` on the session stack through the stock ``openai`` SDK: the retrieval embedder's vectors
(float and base64 agree; equal to the vectors the document search stored for the same text), usage counted with the
embedder's tokenizer (in the response and in the tenant's usage), and the 401/404/429 shapes."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import openai
import pytest

from retrieval.index import decode_vector
from tests.integration.conftest import RunningStack, TenantHandle, make_tenant

MODEL = "all-MiniLM-L6-v2"
TEXTS = ["The night ferry to Vesterholm leaves at 23:40 from pier 4.",
         "Harbour fees are waived for boats shorter than six metres.",
         "Fog closes the channel about twelve days a year."]


def _token_counts(texts: list[str]) -> list[int]:
    """What the embedder's own tokenizer makes of each text, special tokens included, nothing cut."""
    from tokenizers import Tokenizer

    from retrieval.embedding import bundled_minilm_path

    tokenizer = Tokenizer.from_file(str(bundled_minilm_path() / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return [len(e.ids) for e in tokenizer.encode_batch(texts)]


def test_float_and_base64_agree_and_usage_is_counted(tenant: TenantHandle, admin: httpx.Client) -> None:
    client = tenant.client()
    floats = client.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float")
    assert floats.model == MODEL and [d.index for d in floats.data] == [0, 1, 2]
    vectors = np.array([d.embedding for d in floats.data], dtype=np.float32)
    assert vectors.shape == (3, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    tokens = sum(_token_counts(TEXTS))
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == tokens

    raw = client.embeddings.with_raw_response.create(model=MODEL, input=TEXTS, encoding_format="base64")
    encoded = raw.http_response.json()["data"]
    decoded = np.array([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in encoded])
    assert np.array_equal(decoded, vectors)  # the same batch, the same bytes
    default = client.embeddings.create(model=MODEL, input=TEXTS)  # the SDK asks for base64 and decodes it
    assert np.array_equal(np.array([d.embedding for d in default.data], dtype=np.float32), vectors)

    usage = admin.get(f"/admin/tenants/{tenant.id}/usage").json()
    assert usage["models"][MODEL]["requests"] == 3
    assert usage["models"][MODEL]["prompt_tokens"] == 3 * tokens
    assert usage["models"][MODEL]["completion_tokens"] == 0


def test_vectors_equal_what_the_document_search_stored(tenant: TenantHandle, stack: RunningStack) -> None:
    with tenant.http() as http:
        response = http.post("/v1/documents", json={"text": TEXTS[0]})
        assert response.status_code == 201, response.text
        document = response.json()["id"]
    with stack.redis() as redis:
        keys = list(redis.scan_iter(f"banyan:chunk:{tenant.id}:{document}:*"))
        assert len(keys) == 1
        stored_text, stored = redis.hmget(keys[0], ["text", "embedding"])
    assert stored_text.decode() == TEXTS[0]
    # The index stores vectors at its type (FLOAT16 by default: BANYAN_RETRIEVAL_VECTOR_TYPE), so the stored
    # vector is the served one rounded to that precision (half precision: within 1e-3 for unit-length vectors).
    vector_type = "FLOAT16" if len(stored) == 2 * 384 else "FLOAT32"
    stored_vector = decode_vector(stored, vector_type, 384)
    assert stored_vector is not None
    one = np.array(tenant.client().embeddings.create(model=MODEL, input=TEXTS[0]).data[0].embedding, dtype=np.float32)
    assert np.allclose(one, stored_vector, atol=1e-3 if vector_type == "FLOAT16" else 1e-6, rtol=0)


def test_a_single_string_without_model(tenant: TenantHandle) -> None:
    with tenant.http() as http:
        response = http.post("/v1/embeddings", json={"input": "fog in the channel"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list" and body["model"] == MODEL
    assert body["data"][0]["object"] == "embedding" and len(body["data"][0]["embedding"]) == 384


def test_errors_in_the_openai_shape(tenant: TenantHandle, stack: RunningStack) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        tenant.client().embeddings.create(model="text-embedding-3-small", input="x")
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as dimensions:
        tenant.client().embeddings.create(model=MODEL, input="x", dimensions=256)
    assert dimensions.value.param == "dimensions"
    with pytest.raises(openai.BadRequestError) as too_long:
        tenant.client().embeddings.create(model=MODEL, input="word " * 400)
    assert too_long.value.param == "input" and "256 tokens" in too_long.value.message
    wrong = openai.OpenAI(base_url=stack.url + "/v1", api_key="bk_not_a_key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as unauthenticated:
        wrong.embeddings.create(model=MODEL, input="x")
    assert unauthenticated.value.code == "invalid_api_key"


def test_admitted_like_any_request(stack: RunningStack, admin: httpx.Client) -> None:
    limited = make_tenant(stack, admin, prefix="emb")
    assert admin.patch(f"/admin/tenants/{limited.id}", json={"rpm": 2}).status_code == 200
    client = limited.client()
    first = client.embeddings.with_raw_response.create(model=MODEL, input="one")
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    client.chat.completions.create(model=stack.info["base_model"], messages=[{"role": "user", "content": "hi"}],
                                   max_tokens=2)  # the same requests-per-minute window
    with pytest.raises(openai.RateLimitError) as limited_out:
        client.embeddings.create(model=MODEL, input="three")
    assert limited_out.value.code == "rate_limit_exceeded"
    assert limited_out.value.response.headers.get("retry-after")
    assert limited_out.value.response.headers["x-ratelimit-remaining-requests"] == "0"
