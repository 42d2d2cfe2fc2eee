"""The resolver's loopback view of its own vLLM server: its failures reach the cache as EngineControlError."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from adapters.cache import EngineControlError
from adapters.layout import MANIFEST_FILE, Manifest
from adapters.resolver import HttpEngineControl, made_for_another_base


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


def test_a_version_bound_to_another_base_is_recognised(tmp_path: Path) -> None:
    manifest = Manifest(uid="u1", sha256="s", version=1, size_bytes=0, base_model="smollm2-135m-instruct")
    (tmp_path / MANIFEST_FILE).write_text(manifest.to_json())
    assert made_for_another_base(tmp_path, "banyan-demo") == "smollm2-135m-instruct"
    assert made_for_another_base(tmp_path, "smollm2-135m-instruct") is None
    assert made_for_another_base(tmp_path, "") is None  # the engine does not say what it serves: not checked
    (tmp_path / MANIFEST_FILE).write_text(Manifest(uid="u1", sha256="s", version=1, size_bytes=0).to_json())
    assert made_for_another_base(tmp_path, "banyan-demo") is None  # a version from before bases were bound
