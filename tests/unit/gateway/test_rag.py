"""`rag` on completions against a fake engine and canned passages: grounding, sources, streams."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import pytest

from gateway.openai_api.serving import ResolvedModel, _EventRewriter
from retrieval.context import INSTRUCTIONS
from retrieval.documents import Passage, parse_rfc3339
from tests.unit.gateway.conftest import OTHER_KEY, ChunkStream, Handler, Harness

ENGINE_NAME = "banyan.acme.helper.v1.uid000000001"


def _passage(n: int, text: str = "", *, title: str | None = "Handbook", day: str = "2024-05-01") -> Passage:
    return Passage(document_id=f"doc_{n:024x}", chunk_id=f"doc_{n:024x}:0", title=title,
                   text=text or f"Passage number {n} says something useful.", score=1.0 / n,
                   timestamp=parse_rfc3339(f"{day}T00:00:00Z"))


def _engine(request: httpx.Request) -> httpx.Response:
    body = json.loads(request.content)
    if body.get("stream"):
        events = [{"id": "c", "model": body["model"], "choices": [{"index": 0, "delta": {"role": "assistant"}}]},
                  {"id": "c", "model": body["model"], "choices": [{"index": 0, "delta": {"content": "hi"}}]}]
        raw = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"
        return httpx.Response(200, stream=ChunkStream([raw[i:i + 9] for i in range(0, len(raw), 9)]),
                              headers={"content-type": "text/event-stream"})
    return httpx.Response(200, json={"id": "x", "object": "chat.completion", "model": body["model"],
                                     "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}],
                                     "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}})


def _sent(h: Harness) -> dict:
    return json.loads(h.engine_requests[-1].content)


def test_chat_with_rag_grounds_the_prompt_and_returns_sources(make_harness: Callable[[Handler], Harness]) -> None:
    h = make_harness(_engine)
    h.documents.passages["acme"] = [_passage(1, title="Parking"), _passage(2, title=None)]
    response = h.client.post("/v1/chat/completions", headers=h.tenant_headers(), json={
        "model": "banyan-demo", "rag": {"top_k": 3},
        "messages": [{"role": "user", "content": "first"}, {"role": "assistant", "content": "a"},
                     {"role": "user", "content": "Where do I park?"}]})
    assert response.status_code == 200, response.text
    assert h.documents.queries == [("acme", "Where do I park?", 3, None)]
    sources = response.json()["sources"]
    assert [s["document_id"] for s in sources] == [_passage(1).document_id, _passage(2).document_id]
    assert sources[0] == {"document_id": _passage(1).document_id, "chunk_id": _passage(1).chunk_id,
                          "title": "Parking", "text": _passage(1).text, "score": 1.0,
                          "timestamp": "2024-05-01T00:00:00Z"}
    messages = _sent(h)["messages"]
    assert messages[0]["role"] == "system"
    assert messages[0]["content"].startswith(INSTRUCTIONS)
    assert "[1] Parking (2024-05-01)\n" + _passage(1).text in messages[0]["content"]
    assert "[2] (2024-05-01)\n" + _passage(2).text in messages[0]["content"]
    assert messages[1:] == [{"role": "user", "content": "first"}, {"role": "assistant", "content": "a"},
                            {"role": "user", "content": "Where do I park?"}]
    assert "rag" not in _sent(h)


def test_rag_true_uses_defaults_and_keeps_the_system_message(make_harness: Callable[[Handler], Harness]) -> None:
    h = make_harness(_engine)
    h.documents.passages["acme"] = [_passage(n) for n in range(1, 8)]
    response = h.client.post("/v1/chat/completions", headers=h.tenant_headers(), json={
        "model": "banyan-demo", "rag": True,
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q"}]})
    assert response.status_code == 200
    assert h.documents.queries[0][2] == 4
    messages = _sent(h)["messages"]
    assert len(messages) == 2
    assert messages[0]["content"].startswith("Be brief.\n\n" + INSTRUCTIONS)


def test_sources_are_the_passages_that_fit_the_budget(make_harness: Callable[[Handler], Harness]) -> None:
    h = make_harness(_engine)
    h.documents.passages["acme"] = [_passage(n, "word " * 100) for n in range(1, 6)]  # 500 chars each
    response = h.client.post("/v1/chat/completions", headers=h.tenant_headers(), json={
        "model": "banyan-demo", "rag": {"top_k": 5}, "messages": [{"role": "user", "content": "q"}]})
    sources = response.json()["sources"]
    assert 1 <= len(sources) < 5  # the default bound is 1024 tokens (here: characters)
    assert h.documents.budgets == [1024]
    context = _sent(h)["messages"][0]["content"]
    assert f"[{len(sources)}]" in context and f"[{len(sources) + 1}]" not in context
    assert len(context) <= 1024


def test_the_budget_is_what_the_window_leaves_after_prompt_and_answer(
        make_harness: Callable[[Handler], Harness]) -> None:
    h = make_harness(_engine)
    h.documents.passages["acme"] = [_passage(n, "word " * 100) for n in range(1, 6)]
    question = "q" * 100
    for max_tokens in (3600, 3800):
        response = h.client.post("/v1/chat/completions", headers=h.tenant_headers(), json={
            "model": "banyan-demo", "rag": {"top_k": 5}, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": question}]})
        assert response.status_code == 200, response.text
    # 4096 positions - max_tokens - the question (100) - 8 per message and 8 for the reply's header
    assert h.documents.budgets == [4096 - 3600 - 100 - 16, 4096 - 3800 - 100 - 16]
    assert len(_sent(h)["messages"][0]["content"]) <= 4096 - 3800 - 100 - 16
    response = h.client.post("/v1/chat/completions", headers=h.tenant_headers(), json={
        "model": "banyan-demo", "rag": True, "max_completion_tokens": 4000,
        "messages": [{"role": "user", "content": question}]})
    assert response.json()["sources"] == []  # no room: the request goes as it came
    assert _sent(h)["messages"] == [{"role": "user", "content": question}]


def test_no_passages_leaves_the_prompt_alone(make_harness: Callable[[Handler], Harness]) -> None:
    h = make_harness(_engine)
    response = h.client.post("/v1/chat/completions", headers=h.tenant_headers(), json={
        "model": "banyan-demo", "rag": True, "messages": [{"role": "user", "content": "q"}]})
    assert response.status_code == 200
    assert response.json()["sources"] == []
    assert _sent(h)["messages"] == [{"role": "user", "content": "q"}]


def test_without_rag_there_are_no_sources(make_harness: Callable[[Handler], Harness]) -> None:
    h = make_harness(_engine)
    h.documents.passages["acme"] = [_passage(1)]
    response = h.client.post("/v1/chat/completions", headers=h.tenant_headers(), json={
        "model": "banyan-demo", "messages": [{"role": "user", "content": "q"}]})
    assert "sources" not in response.json()
    assert h.documents.queries == []


def test_completion_prompt_is_grounded(make_harness: Callable[[Handler], Harness]) -> None:
    h = make_harness(_engine)
    h.documents.passages["acme"] = [_passage(1)]
    response = h.client.post("/v1/completions", headers=h.tenant_headers(), json={
        "model": "banyan-demo", "rag": {"top_k": 2, "collection": "faq"}, "prompt": "The answer is"})
    assert response.status_code == 200
    assert h.documents.queries == [("acme", "The answer is", 2, "faq")]
    prompt = _sent(h)["prompt"]
    assert prompt.startswith(INSTRUCTIONS) and prompt.endswith("\n\nThe answer is")
    assert len(response.json()["sources"]) == 1


def test_token_prompt_with_rag_is_400_before_the_engine(make_harness: Callable[[Handler], Harness]) -> None:
    h = make_harness(_engine)
    for prompt in ([1, 2, 3], ["a", "b"]):
        response = h.client.post("/v1/completions", headers=h.tenant_headers(),
                                 json={"model": "banyan-demo", "rag": True, "prompt": prompt})
        assert response.status_code == 400
        assert response.json()["error"]["param"] == "prompt"
    assert h.engine_requests == []


def test_chat_without_user_text_is_400(make_harness: Callable[[Handler], Harness]) -> None:
    h = make_harness(_engine)
    response = h.client.post("/v1/chat/completions", headers=h.tenant_headers(), json={
        "model": "banyan-demo", "rag": True, "messages": [{"role": "system", "content": "x"}]})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "messages"
    assert h.engine_requests == []


def test_unknown_model_fails_before_retrieval(make_harness: Callable[[Handler], Harness]) -> None:
    h = make_harness(_engine)
    h.registry.add("acme", "helper")
    response = h.client.post("/v1/chat/completions", headers=h.tenant_headers(OTHER_KEY), json={
        "model": "helper", "rag": True, "messages": [{"role": "user", "content": "q"}]})
    assert response.status_code == 404
    assert h.documents.queries == []


def test_stream_carries_sources_on_the_first_chunk_only(make_harness: Callable[[Handler], Harness]) -> None:
    h = make_harness(_engine)
    h.registry.add("acme", "helper")
    h.documents.passages["acme"] = [_passage(1, 'Text with "quotes", {braces} and\n\nblank lines.')]
    response = h.client.post("/v1/chat/completions", headers=h.tenant_headers(), json={
        "model": "helper", "rag": True, "stream": True, "messages": [{"role": "user", "content": "q"}]})
    assert response.status_code == 200
    events = [e for e in response.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert [c["model"] for c in chunks] == ["helper", "helper"]
    assert chunks[0]["sources"][0]["text"] == 'Text with "quotes", {braces} and\n\nblank lines.'
    assert next(iter(chunks[0])) == "sources"
    assert "sources" not in chunks[1]
    assert ENGINE_NAME not in response.text


def test_rewriter_skips_error_events_and_empty_objects() -> None:
    resolved = ResolvedModel(public="m", engine="m", adapter=None)
    rewriter = _EventRewriter(resolved, sources=[{"a": 1}])
    out = rewriter.feed(b'data: {"error": {"message": "x", "code": 400}}\n\n')
    assert b"sources" not in out
    out = rewriter.feed(b"data: {}\n\ndata: {}\n\n")
    assert out == b'data: {"sources": [{"a": 1}]}\n\ndata: {}\n\n'


def test_the_prompt_is_counted_once_for_admission_and_the_budget(
        make_harness: Callable[[Handler], Harness], monkeypatch: pytest.MonkeyPatch) -> None:
    h = make_harness(_engine)
    counted: list[str] = []
    count = h.state.tokens.count
    monkeypatch.setattr(h.state.tokens, "count", lambda text: counted.append(text) or count(text))
    h.documents.passages["acme"] = [_passage(1)]
    response = h.client.post("/v1/chat/completions", headers=h.tenant_headers(), json={
        "model": "banyan-demo", "rag": True, "messages": [{"role": "user", "content": "Where do I park?"}]})
    assert response.status_code == 200, response.text
    assert counted == ["Where do I park?"]  # admission's worst case and the rag budget share one count
    assert h.documents.budgets == [min(1024, 4096 - 256 - (16 + 8 * 2))]


def test_a_blank_completion_prompt_without_rag_reaches_the_engine(make_harness: Callable[[Handler], Harness]) -> None:
    h = make_harness(_engine)
    response = h.client.post("/v1/completions", headers=h.tenant_headers(), json={"model": "banyan-demo",
                                                                                "prompt": "   "})
    assert response.status_code == 200, response.text
