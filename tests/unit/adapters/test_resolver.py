"""The resolver's loopback view of its own vLLM server: its failures reach the cache as EngineControlError."""

from __future__ import annotations

import httpx
import pytest

from adapters.cache import EngineControlError
from adapters.resolver import HttpEngineControl


def _control(handler: httpx.MockTransport) -> HttpEngineControl:
    return HttpEngineControl("http://engine", transport=handler)


async def test_an_unreachable_engine_is_an_engine_control_error() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    control = _control(httpx.MockTransport(refuse))
    for call in (control.registered(), control.busy(), control.unload("banyan.t.a.v1.uid000000001")):
        with pytest.raises(EngineControlError):
            await call


async def test_unload_accepts_a_name_already_gone_and_refuses_a_server_error() -> None:
    statuses = iter([404, 500])
    control = _control(httpx.MockTransport(lambda request: httpx.Response(next(statuses))))
    await control.unload("banyan.t.a.v1.uid000000001")
    with pytest.raises(EngineControlError, match="HTTP 500"):
        await control.unload("banyan.t.a.v1.uid000000001")


async def test_registered_names_and_an_unreadable_answer() -> None:
    bodies = iter([{"data": [{"id": "base"}, {"id": "banyan.t.a.v1.uid000000001"}]}, {"data": [1]}])
    control = _control(httpx.MockTransport(lambda request: httpx.Response(200, json=next(bodies))))
    assert await control.registered() == {"base", "banyan.t.a.v1.uid000000001"}
    with pytest.raises(EngineControlError, match="unreadable"):
        await control.registered()
