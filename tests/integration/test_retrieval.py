"""Retrieval on the real stack: documents, ranking quality, isolation, grounding through the openai SDK."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from gateway.settings import Settings
from tests.integration.conftest import RunningStack, TenantHandle, make_tenant, upload
from tests.integration.retrieval_corpus import Doc, conflicting_set, labelled_set


def _add(http: httpx.Client, doc: Doc | dict, **extra: object) -> dict:
    body = {"text": doc.text, "title": doc.title, "timestamp": doc.timestamp} if isinstance(doc, Doc) else doc
    response = http.post("/v1/documents", json={**body, **extra})
    assert response.status_code == 201, response.text
    result: dict = response.json()
    return result


def _retrieve(http: httpx.Client, query: str, **extra: object) -> list[dict]:
    response = http.post("/v1/retrieve", json={"query": query, **extra})
    assert response.status_code == 200, response.text
    data: list[dict] = response.json()["data"]
    return data


def _chunk_keys(stack: RunningStack, pattern: str) -> list[bytes]:
    return list(stack.redis().scan_iter(pattern, count=1000))


# -- documents -----------------------------------------------------------------------------------


def test_document_lifecycle_and_pagination(stack: RunningStack, tenant: TenantHandle) -> None:
    with tenant.http() as http:
        created = [_add(http, {"text": f"Note {i}: the shuttle leaves at {i} pm.", "title": f"Note {i}",
                               "timestamp": "2024-05-01T11:30:00+02:00", "metadata": {"n": i}}) for i in range(3)]
        first = created[0]
        assert first["id"].startswith("doc_") and first["chunks"] == 1 and first["object"] == "document"
        assert first["timestamp"] == "2024-05-01T09:30:00Z" and first["collection"] == "default"

        page = http.get("/v1/documents", params={"limit": 2}).json()
        assert page["object"] == "list" and page["has_more"] is True
        assert [d["id"] for d in page["data"]] == [created[2]["id"], created[1]["id"]]  # newest first
        assert set(page["data"][0]) == {"id", "title", "timestamp", "collection", "chunks"}
        rest = http.get("/v1/documents", params={"limit": 2, "after": page["data"][-1]["id"]}).json()
        assert [d["id"] for d in rest["data"]] == [first["id"]] and rest["has_more"] is False

        got = http.get(f"/v1/documents/{first['id']}")
        assert got.status_code == 200 and got.json()["metadata"] == {"n": 0} and got.json()["title"] == "Note 0"

        assert _chunk_keys(stack, f"banyan:chunk:{tenant.id}:{first['id']}:*")
        stats, df = f"banyan:stats:{tenant.id}", f"banyan:df:{tenant.id}"
        assert stack.redis().hmget(stats, ["chunks", "chunks:default"]) == [b"3", b"3"]
        assert stack.redis().hmget(df, ["shuttle", "0", "1"]) == [b"3", b"1", b"1"]
        deleted = http.delete(f"/v1/documents/{first['id']}")
        assert deleted.status_code == 200 and deleted.json() == {"id": first["id"], "object": "document",
                                                                  "deleted": True}
        assert _chunk_keys(stack, f"banyan:chunk:{tenant.id}:{first['id']}:*") == []
        assert stack.redis().hmget(stats, ["chunks", "chunks:default"]) == [b"2", b"2"]
        assert stack.redis().hmget(df, ["shuttle", "0", "1"]) == [b"2", b"0", b"1"]
        assert http.get(f"/v1/documents/{first['id']}").status_code == 404
        assert http.delete(f"/v1/documents/{first['id']}").status_code == 404
        assert all(p["document_id"] != first["id"] for p in _retrieve(http, "When does the shuttle leave?"))


def test_a_long_document_is_chunked_and_every_chunk_keeps_its_title(stack: RunningStack,
                                                                      tenant: TenantHandle) -> None:
    filler = ("The committee reviewed the quarterly figures and discussed staffing, travel and training plans "
              "for the coming months in some detail. ")
    paragraphs = [filler * 6 for _ in range(12)]
    paragraphs[9] = filler * 3 + "The emergency generator is tested every second Thursday at noon. " + filler * 2
    with tenant.http() as http:
        doc = _add(http, {"text": "\n\n".join(paragraphs), "title": "Facilities minutes"})
        assert doc["chunks"] >= 6
        titles = {stack.redis().hget(k, "title") for k in _chunk_keys(stack, f"banyan:chunk:{tenant.id}:{doc['id']}:*")}
        assert titles == {b"Facilities minutes"}
        best = _retrieve(http, "How often is the backup power generator checked?", top_k=1)[0]
        assert best["document_id"] == doc["id"] and "generator is tested every second Thursday" in best["text"]
        assert best["title"] == "Facilities minutes" and best["chunk_id"].startswith(doc["id"] + ":")


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"text": ""}, 400, "text"),
    ({"text": "  \n "}, 400, "text"),
    ({"title": "no text"}, 400, "text"),
    ({"text": "x", "timestamp": "yesterday"}, 400, "timestamp"),
    ({"text": "x", "timestamp": "2024-05-01"}, 400, "timestamp"),
    ({"text": "x", "timestamp": "2024-02-30T10:00:00Z"}, 400, "timestamp"),
    ({"text": "x", "collection": "not valid!"}, 400, "collection"),
    ({"text": "x", "unknown": 1}, 400, "unknown"),
    ({"text": "x", "metadata": "not an object"}, 400, "metadata"),
])
def test_bad_documents_are_rejected(tenant: TenantHandle, body: dict, status: int, param: str) -> None:
    with tenant.http() as http:
        response = http.post("/v1/documents", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param


def test_malformed_json_and_oversized_documents(tenant: TenantHandle) -> None:
    with tenant.http() as http:
        response = http.post("/v1/documents", content=b'{"text": "unterminated', headers={"content-type":
                                                                                        "application/json"})
        assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"
        response = http.post("/v1/documents", json={"text": "a" * (1024 * 1024 + 1)})
        assert response.status_code == 413
        assert response.json()["error"] == {"message": response.json()["error"]["message"],
                                            "type": "invalid_request_error", "param": "text",
                                            "code": "payload_too_large"}
        assert http.get("/v1/documents").json()["data"] == []


@pytest.mark.parametrize(("body", "param"), [
    ({"query": ""}, "query"), ({"query": "   "}, "query"), ({"query": "x", "top_k": 0}, "top_k"),
    ({"query": "x", "top_k": 21}, "top_k"), ({"query": "x", "collection": "a b"}, "collection"),
    ({"top_k": 3}, "query"),
])
def test_bad_retrieve_requests_are_400(tenant: TenantHandle, body: dict, param: str) -> None:
    with tenant.http() as http:
        response = http.post("/v1/retrieve", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_bad_list_parameters_are_400(tenant: TenantHandle) -> None:
    with tenant.http() as http:
        assert http.get("/v1/documents", params={"limit": 0}).status_code == 400
        assert http.get("/v1/documents", params={"limit": 101}).status_code == 400
        assert http.get("/v1/documents", params={"after": "doc_" + "0" * 24}).status_code == 400


def test_collections_scope_retrieval(tenant: TenantHandle) -> None:
    with tenant.http() as http:
        faq = _add(http, {"text": "The cafeteria opens at 8 am.", "collection": "faq"})
        memo = _add(http, {"text": "The cafeteria opens at 9 am on holidays.", "collection": "memos"})
        assert {p["document_id"] for p in _retrieve(http, "When does the cafeteria open?")} == {faq["id"], memo["id"]}
        assert [p["document_id"] for p in _retrieve(http, "When does the cafeteria open?", collection="faq")] == \
            [faq["id"]]
        assert _retrieve(http, "When does the cafeteria open?", collection="nothing-here") == []


# -- limits --------------------------------------------------------------------------------------


def test_documents_and_retrieve_are_admitted_like_completions(stack: RunningStack, admin: httpx.Client) -> None:
    tenant = make_tenant(stack, admin, "doc-rpm")
    with tenant.http() as http:
        _add(http, {"text": "The library opens at nine."})
        assert admin.patch(f"/admin/tenants/{tenant.id}", json={"rpm": 1}).status_code == 200
        calls = [lambda: http.get("/v1/documents"), lambda: http.post("/v1/retrieve", json={"query": "library"}),
                 lambda: http.post("/v1/documents", json={"text": "The library closes at six."})]
        for call in calls:
            # Three calls in a row: whatever minute boundary falls between them, two share a window of rpm=1.
            answers = [call() for _ in range(3)]
            refused = [a for a in answers if a.status_code == 429]
            assert refused, [a.status_code for a in answers]
            assert all(a.status_code in (200, 201) for a in answers if a.status_code != 429)
            error = refused[0].json()["error"]
            assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
        # The slot of each call is given back: one at a time, every call gets in.
        assert admin.patch(f"/admin/tenants/{tenant.id}", json={"rpm": None, "max_concurrency": 1}).status_code == 200
        for _ in range(3):
            assert http.get("/v1/documents").status_code == 200
            assert http.post("/v1/retrieve", json={"query": "library"}).status_code == 200


def _prose(size: int) -> str:
    """Sentences of short words: about 2 chunks per KB (1 MB makes some 1,900)."""
    words = ["a", "an", "the", "of", "to", "in", "on", "at", "by", "is", "it", "as", "be", "or", "we", "he", "she",
             "go", "do", "no", "so", "up", "my", "me", "us"]
    rng, parts, total = random.Random(5), [], 0
    while total < size:
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(8, 20))).capitalize() + ". "
        parts.append(sentence)
        total += len(sentence)
    return "".join(parts)[:size]


def test_a_document_of_too_many_chunks_is_413(tenant: TenantHandle) -> None:
    with tenant.http() as http:
        response = http.post("/v1/documents", json={"text": _prose(1000 * 1000)})  # under the byte limit
        assert response.status_code == 413, response.text
        error = response.json()["error"]
        assert (error["code"], error["param"]) == ("payload_too_large", "text")
        assert str(Settings.model_fields["max_chunks_per_document"].default) in error["message"]
        assert http.get("/v1/documents").json()["data"] == []


def test_document_and_chunk_quotas(stack: RunningStack, tenant: TenantHandle) -> None:
    max_documents = Settings.model_fields["max_documents_per_tenant"].default
    max_chunks = Settings.model_fields["max_chunks_per_tenant"].default
    redis = stack.redis()
    # Bring the tenant's counts (kept by the gateway with its documents) near its quotas without writing
    # 100k chunks: the counts are what the quotas read.
    redis.hset(f"banyan:stats:{tenant.id}", "chunks", max_chunks - 2)
    with tenant.http() as http:
        first = _add(http, {"text": "Room one is on the first floor."})
        two = {"text": _prose(3000), "title": "Long"}
        response = http.post("/v1/documents", json=two)
        assert response.status_code == 429, response.text
        error = response.json()["error"]
        assert (error["type"], error["code"]) == ("rate_limit_error", "quota_exceeded")
        assert first["chunks"] == 1 and [d["id"] for d in http.get("/v1/documents").json()["data"]] == [first["id"]]
        # Concurrent additions with room for one more chunk: exactly one gets in (the quota is checked where the
        # document is written, atomically with it).
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda i: http.post("/v1/documents", json={"text": f"Room {i} is free."}),
                                    range(4)))
        assert sorted(a.status_code for a in answers) == [201, 429, 429, 429], [a.text for a in answers]
        assert int(redis.hget(f"banyan:stats:{tenant.id}", "chunks") or 0) == max_chunks
        # A deletion gives its chunks back.
        assert http.delete(f"/v1/documents/{first['id']}").status_code == 200
        assert int(redis.hget(f"banyan:stats:{tenant.id}", "chunks") or 0) == max_chunks - 1
        _add(http, {"text": "Room seven is on the second floor."})
        # Documents: the tenant's list counts them.
        redis.zadd(f"banyan:docs:{tenant.id}", {f"doc_{i:024x}": 0 for i in range(max_documents - 2)})
        response = http.post("/v1/documents", json={"text": "One document too many."})
        assert response.status_code == 429 and response.json()["error"]["code"] == "quota_exceeded"
        assert f"limit of {max_documents} documents" in response.json()["error"]["message"]


# -- ranking quality -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def labelled(stack: RunningStack, admin: httpx.Client) -> Iterator[tuple[TenantHandle, dict[str, str]]]:
    tenant = make_tenant(stack, admin, "labelled")
    docs, _ = labelled_set()
    with tenant.http() as http:
        ids = {_add(http, doc)["id"]: doc.key for doc in docs}
    yield tenant, ids


def test_recall_at_4_on_a_labelled_set(labelled: tuple[TenantHandle, dict[str, str]]) -> None:
    tenant, ids = labelled
    docs, queries = labelled_set()
    assert len(docs) >= 200 and len(queries) >= 50
    with tenant.http() as http:
        found = [q.relevant in [ids[p["document_id"]] for p in _retrieve(http, q.text, top_k=4)] for q in queries]
    recall = sum(found) / len(found)
    assert recall >= 0.9, f"recall@4 = {recall:.3f}"


def test_the_newer_of_two_conflicting_passages_ranks_first(stack: RunningStack, admin: httpx.Client) -> None:
    tenant = make_tenant(stack, admin, "conflicts")
    docs, conflicts = conflicting_set()
    with tenant.http() as http:
        ids = {_add(http, doc)["id"]: doc.key for doc in docs}
        wins = 0
        for conflict in conflicts:
            keys = [ids[p["document_id"]] for p in _retrieve(http, conflict.query, top_k=4)]
            newer, older = conflict.newer.key, conflict.older.key
            wins += newer in keys and (older not in keys or keys.index(newer) < keys.index(older))
    assert wins / len(conflicts) >= 0.95, f"the newer passage came first in {wins} of {len(conflicts)}"


def test_a_republished_passage_collapses_to_the_newest_copy(tenant: TenantHandle) -> None:
    text = "Badges must be worn visibly at all times inside the building, including in the car park."
    with tenant.http() as http:
        old = _add(http, {"text": text, "timestamp": "2022-01-01T00:00:00Z"})
        new = _add(http, {"text": text.replace("car park", "car-park"), "timestamp": "2024-01-01T00:00:00Z"})
        results = _retrieve(http, "Do I need to wear my badge in the parking garage?")
    assert [p["document_id"] for p in results] == [new["id"]]
    assert old["id"] not in {p["document_id"] for p in results}


# -- isolation -----------------------------------------------------------------------------------

HOSTILE_QUERIES = [
    "@tenant:{%(other)s}", "@tenant:{%(other)s} secret", "*", "* | secret", "secret | *", '"secret plans"',
    "{secret}", "(@tenant:{%(other)s}) | (@tenant:{%(me)s})", "-@tenant:{%(me)s}", "@collection:{default} secret",
    "secret=>[KNN 100 @embedding $vec]", "%%secret%%", "secret*", "\\@tenant\\:\\{%(other)s\\}", "@text:secret",
    "tenant other secret plans", "}|@tenant:{%(other)s", "$vec", "~secret", "secret)) | ((*",
]


def test_another_tenants_documents_never_appear(stack: RunningStack, admin: httpx.Client) -> None:
    me, other = make_tenant(stack, admin, "iso-me"), make_tenant(stack, admin, "iso-other")
    with me.http() as http:
        mine = {_add(http, {"text": "Our picnic is planned for the last Friday of June in the park."})["id"]}
    with other.http() as http:
        theirs = {_add(http, {"text": f"Secret plans of tenant {other.id}: {word} budget, other secret plans.",
                              "title": "secret"})["id"] for word in ("merger", "layoffs", "launch")}
    # Both sides are searchable: an empty answer below is the scope at work, not an empty index.
    with other.http() as http:
        assert {p["document_id"] for p in _retrieve(http, "secret plans budget")} & theirs
    with me.http() as http:
        assert {p["document_id"] for p in _retrieve(http, "picnic in the park")} == mine
        for template in HOSTILE_QUERIES:
            query = template % {"other": other.id, "me": me.id}
            response = http.post("/v1/retrieve", json={"query": query, "top_k": 20})
            assert response.status_code in (200, 400), (query, response.text)
            if response.status_code == 200:
                assert {p["document_id"] for p in response.json()["data"]} <= mine, query
            response = http.post("/v1/chat/completions", json={
                "model": stack.info["base_model"], "max_tokens": 1, "rag": {"top_k": 20},
                "messages": [{"role": "user", "content": query}]})
            assert response.status_code in (200, 400), (query, response.text)
            if response.status_code == 200:
                assert {s["document_id"] for s in response.json()["sources"]} <= mine, query
        for collection in ("default} | @tenant:{" + other.id, "*", "default|x"):
            response = http.post("/v1/retrieve", json={"query": "secret", "collection": collection})
            assert response.status_code == 400
        for document_id in theirs:
            assert http.get(f"/v1/documents/{document_id}").status_code == 404
            assert http.delete(f"/v1/documents/{document_id}").status_code == 404
        assert {d["id"] for d in http.get("/v1/documents").json()["data"]} == mine
    with other.http() as http:
        assert {d["id"] for d in http.get("/v1/documents", params={"limit": 100}).json()["data"]} == theirs


def test_deleting_a_tenant_removes_its_documents(stack: RunningStack, admin: httpx.Client) -> None:
    doomed = make_tenant(stack, admin, "doomed-docs")
    with doomed.http() as http:
        for i in range(3):
            _add(http, {"text": f"Paragraph {i} of a document that will go away. " * 40})
    assert _chunk_keys(stack, f"banyan:chunk:{doomed.id}:*")
    assert admin.delete(f"/admin/tenants/{doomed.id}").status_code == 200
    assert _chunk_keys(stack, f"banyan:*{doomed.id}*") == []


# -- grounding -----------------------------------------------------------------------------------


@pytest.fixture
def grounded(tenant: TenantHandle) -> TenantHandle:
    with tenant.http() as http:
        _add(http, {"title": "Parking", "timestamp": "2024-03-01T00:00:00Z",
                    "text": "Staff can park in levels 2 and 3 of the Rua Augusta garage with their badge."})
        _add(http, {"title": "Lunch", "text": "The canteen serves lunch from noon to 2 pm on weekdays."})
    return tenant


def test_chat_with_rag_through_the_openai_sdk(grounded: TenantHandle, stack: RunningStack) -> None:
    client = grounded.client()
    messages = [{"role": "user", "content": "Where can I park my car?"}]
    base = stack.info["base_model"]
    plain = client.chat.completions.create(model=base, messages=messages, max_tokens=4, temperature=0)
    rag = client.chat.completions.create(model=base, messages=messages, max_tokens=4, temperature=0,
                                         extra_body={"rag": {"top_k": 2}})
    assert "sources" not in (plain.model_extra or {})
    sources = (rag.model_extra or {})["sources"]
    assert sources and sources[0]["title"] == "Parking" and "Rua Augusta" in sources[0]["text"]
    assert set(sources[0]) == {"document_id", "chunk_id", "title", "text", "score", "timestamp"}
    assert sources[0]["timestamp"] == "2024-03-01T00:00:00Z"
    assert plain.usage is not None and rag.usage is not None
    assert rag.usage.prompt_tokens > plain.usage.prompt_tokens + len(sources[0]["text"])


def test_rag_works_the_same_with_an_adapter(grounded: TenantHandle, admin: httpx.Client,
                                            peft_adapters: dict[str, Path]) -> None:
    assert upload(admin, grounded.id, "helper", peft_adapters["gamma"]).status_code == 201
    raw = grounded.client().chat.completions.with_raw_response.create(
        model="helper", messages=[{"role": "user", "content": "When is lunch served?"}], max_tokens=4,
        temperature=0, extra_body={"rag": True})
    completion = raw.parse()
    assert raw.headers["x-banyan-adapter"] == "helper" and completion.model == "helper"
    assert (completion.model_extra or {})["sources"][0]["title"] == "Lunch"
    plain = grounded.client().chat.completions.create(
        model="helper", messages=[{"role": "user", "content": "When is lunch served?"}], max_tokens=4, temperature=0)
    assert completion.usage is not None and plain.usage is not None
    assert completion.usage.prompt_tokens > plain.usage.prompt_tokens  # the passages went to the adapter too


def test_streaming_carries_sources_on_the_first_chunk(grounded: TenantHandle, stack: RunningStack) -> None:
    stream = grounded.client().chat.completions.create(
        model=stack.info["base_model"], messages=[{"role": "user", "content": "Where can I park?"}], max_tokens=4,
        temperature=0, stream=True, extra_body={"rag": {"top_k": 1}})
    chunks = list(stream)
    assert len(chunks) > 1
    sources = (chunks[0].model_extra or {}).get("sources")
    assert sources and sources[0]["title"] == "Parking"
    assert all("sources" not in (c.model_extra or {}) for c in chunks[1:])


def test_completions_with_rag(grounded: TenantHandle, stack: RunningStack) -> None:
    with grounded.http() as http:
        base = stack.info["base_model"]
        plain = http.post("/v1/completions", json={"model": base, "prompt": "Lunch is served", "max_tokens": 2})
        rag = http.post("/v1/completions", json={"model": base, "prompt": "Lunch is served", "max_tokens": 2,
                                                 "rag": {"top_k": 1}})
        assert rag.status_code == 200, rag.text
        assert rag.json()["sources"][0]["title"] == "Lunch"
        assert rag.json()["usage"]["prompt_tokens"] > plain.json()["usage"]["prompt_tokens"]
        tokens = http.post("/v1/completions", json={"model": base, "prompt": [1, 2, 3], "rag": True})
        assert tokens.status_code == 400 and tokens.json()["error"]["param"] == "prompt"
        with http.stream("POST", "/v1/completions", json={"model": base, "prompt": "Lunch", "max_tokens": 2,
                                                          "stream": True, "rag": True}) as response:
            assert response.status_code == 200
            events = [e for e in b"".join(response.iter_bytes()).decode().split("\n\n") if e]
        assert events[-1] == "data: [DONE]"
        assert "sources" in json.loads(events[0][len("data: "):])


def test_retrieval_metrics_are_exported(grounded: TenantHandle, stack: RunningStack) -> None:
    def counts() -> tuple[float, ...]:
        return (stack.gateway_metric("banyan_retrieval_duration_seconds_count", stage="search"),
                stack.gateway_metric("banyan_retrieval_duration_seconds_count", stage="embed"),
                stack.gateway_metric("banyan_retrieval_passages_count"),
                stack.gateway_metric("banyan_ingested_chunks_total"))

    before = counts()
    with grounded.http() as http:
        _retrieve(http, "parking")
        _add(http, {"text": "The car park closes at midnight.", "title": "Parking hours"})
    search, embed, passages, chunks = (after - earlier for after, earlier in zip(counts(), before, strict=True))
    assert search == 1 and embed == 1 and passages == 1
    assert chunks >= 1
