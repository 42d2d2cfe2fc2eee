"""The adapter route over HTTP takes a multipart upload or a JSON import body (the content type decides): how each
is parsed and refused before anything is read from storage."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.unit.gateway.conftest import ADMIN_KEY, Handler, Harness

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
ROUTE = "/admin/tenants/acme/adapters"


def _never(request: httpx.Request) -> httpx.Response:
    raise AssertionError("no engine call expected")


@pytest.fixture
def harness(make_harness: Callable[[Handler], Harness]) -> Harness:
    return make_harness(_never)


def _error(response: httpx.Response, status: int = 400) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    return error


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"name": "bot", "source": "https://example.com/bot/"}, "source", "pattern"),
    ({"name": "bot", "source": "s3://src/p/", "from": "elsewhere"}, "from", "Extra inputs"),
    ({"name": "Bot!", "source": "s3://src/p/"}, "name", "pattern"),
    ({"source": "s3://src/p/"}, "name", "required"),
    ({"name": "bot", "source": "s3://src/p/", "credentials": {"access_key_id": "k"}}, "credentials.secret_access_key",
     "required"),
    ({"name": "bot", "source": "s3://src/p/", "credentials": {"access_key_id": "k", "secret_access_key": "s",
                                                            "endpoint_url": "file:///etc"}},
     "credentials.endpoint_url", "pattern"),
    ({"name": "bot", "source": "s3://src/p/", "base_model": "other-base"}, "base_model", "Banyan serves `banyan-demo`"),
])
def test_a_json_import_body_is_checked_before_anything_is_read(body: dict[str, Any], param: str, words: str,
                                                               harness: Harness) -> None:
    error = _error(harness.client.post(ROUTE, json=body, headers=ADMIN))
    assert error["param"] == param and words in error["message"], error
    assert harness.registry.records == {}


def test_a_json_body_that_is_not_json_is_a_400(harness: Harness) -> None:
    response = harness.client.post(ROUTE, content=b'{"name": "bot",', headers={**ADMIN,
                                                                             "content-type": "application/json"})
    assert "not valid JSON" in _error(response)["message"]


def test_a_json_import_for_an_unknown_tenant_is_404(harness: Harness) -> None:
    response = harness.client.post("/admin/tenants/nobody/adapters", json={"name": "bot", "source": "s3://src/p/"},
                                   headers=ADMIN)
    assert _error(response, 404)["param"] == "tenant_id"


def test_a_secret_in_a_refused_body_is_never_echoed(harness: Harness) -> None:
    body = {"name": "bot", "source": "s3://src/p/", "credentials": {"access_key_id": "k", "secret_access_key": "zz-9",
                                                                  "session_token": 5}}
    response = harness.client.post(ROUTE, json=body, headers=ADMIN)
    assert _error(response)["param"] == "credentials.session_token" and "zz-9" not in response.text


def test_multipart_takes_a_base_model_and_refuses_one_not_served(harness: Harness) -> None:
    files = [("files", ("adapter_config.json", b"{}", "application/json"))]
    response = harness.client.post(ROUTE, data={"name": "bot", "base_model": "other-base"}, files=files, headers=ADMIN)
    assert _error(response)["param"] == "base_model"
    response = harness.client.post(ROUTE, data={"name": "bot", "base_model": "banyan-demo"}, files=files,
                                   headers=ADMIN)
    assert "no configuration of base model" in _error(response)["message"]  # past the check: this state has no base


def test_multipart_without_a_name_is_a_400(harness: Harness) -> None:
    files = [("files", ("adapter_config.json", b"{}", "application/json"))]
    error = _error(harness.client.post(ROUTE, data={"activate": "false"}, files=files, headers=ADMIN))
    assert error["param"] == "name"


def test_multipart_activate_must_be_a_boolean(harness: Harness) -> None:
    files = [("files", ("adapter_config.json", b"{}", "application/json"))]
    error = _error(harness.client.post(ROUTE, data={"name": "bot", "activate": "maybe"}, files=files, headers=ADMIN))
    assert error["param"] == "activate"


def test_bulk_imports_need_the_gateway_redis(harness: Harness) -> None:
    body = {"items": [{"tenant": "acme", "name": "bot", "source": "s3://src/p/"}]}
    assert _error(harness.client.post("/admin/imports", json=body, headers=ADMIN), 503)["code"] == \
        "dependency_unavailable"
    assert _error(harness.client.post("/admin/imports", json={"items": []}, headers=ADMIN))["param"] == "items"
