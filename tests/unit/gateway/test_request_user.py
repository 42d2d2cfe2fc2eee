"""The request's ``user`` on the request path: recorded with its usage (streamed or not), and refused before
admission when it is not a short string."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from tests.unit.gateway.conftest import Handler, Harness


def _engine(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json={"id": "c", "object": "chat.completion", "model": "m", "choices": [],
                                     "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}})


def _chat(**extra: object) -> dict[str, object]:
    return {"model": "banyan-demo", "messages": [{"role": "user", "content": "hi"}], **extra}


def test_the_user_of_a_request_is_recorded_with_its_usage(make_harness: Callable[[Handler], Harness]) -> None:
    h = make_harness(_engine)
    for body in (_chat(user="alice"), _chat(), _chat(user="")):
        assert h.client.post("/v1/chat/completions", json=body, headers=h.tenant_headers()).status_code == 200
    assert h.usage.users == ["alice", None, None]
    assert h.usage.records[0] == ("acme", "banyan-demo", 3, 2)


@pytest.mark.parametrize("user", ["u" * 257, 42, ["alice"]])
def test_a_bad_user_is_400_before_admission(make_harness: Callable[[Handler], Harness], user: object) -> None:
    h = make_harness(_engine)
    response = h.client.post("/v1/chat/completions", json=_chat(user=user), headers=h.tenant_headers())
    assert response.status_code == 400 and response.json()["error"]["param"] == "user"
    assert h.engine_requests == [] and h.usage.records == []
