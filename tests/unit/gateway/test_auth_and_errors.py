"""Authentication, error rendering and request ids through the real app with fakes behind its seams."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from tests.unit.gateway.conftest import ADMIN_KEY, TENANT_KEY, Handler, Harness


def _never(request: httpx.Request) -> httpx.Response:
    raise AssertionError("the engine must not be called")


@pytest.mark.parametrize("header", [None, "Bearer", "Basic abc", "Bearer bk_unknown_key_12345678901234",
                                    f"Bearer {ADMIN_KEY}", "Bearer not-a-key"])
def test_bad_tenant_credentials_are_401(make_harness: Callable[[Handler], Harness], header: str | None) -> None:
    h = make_harness(_never)
    headers = {"Authorization": header} if header else {}
    response = h.client.get("/v1/models", headers=headers)
    assert response.status_code == 401
    assert response.json() == {"error": {"message": response.json()["error"]["message"],
                                         "type": "authentication_error", "param": None, "code": "invalid_api_key"}}
    assert response.headers["x-request-id"].startswith("req_")


def test_tenant_key_on_admin_route_is_401(make_harness: Callable[[Handler], Harness]) -> None:
    h = make_harness(_never)
    response = h.client.get("/admin/tenants", headers={"Authorization": f"Bearer {TENANT_KEY}"})
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"


def test_malformed_json_is_400_before_the_engine(make_harness: Callable[[Handler], Harness]) -> None:
    h = make_harness(_never)
    response = h.client.post("/v1/chat/completions", content=b'{"model": ', headers={
        **h.tenant_headers(), "content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "The request body is not valid JSON."


def test_missing_field_names_the_param(make_harness: Callable[[Handler], Harness]) -> None:
    h = make_harness(_never)
    response = h.client.post("/v1/chat/completions", json={"model": "banyan-demo"}, headers=h.tenant_headers())
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "messages"


def test_unknown_route_is_openai_shaped_404(make_harness: Callable[[Handler], Harness]) -> None:
    h = make_harness(_never)
    response = h.client.get("/v1/nope", headers=h.tenant_headers())
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found_error"


def test_request_id_echo_and_sanitising(make_harness: Callable[[Handler], Harness]) -> None:
    h = make_harness(_never)
    assert h.client.get("/healthz", headers={"x-request-id": "abc-123"}).headers["x-request-id"] == "abc-123"
    generated = h.client.get("/healthz", headers={"x-request-id": "bad id\twith junk"}).headers["x-request-id"]
    assert generated.startswith("req_")


def test_oversized_body_is_413(make_harness: Callable[[Handler], Harness]) -> None:
    h = make_harness(_never)
    response = h.client.post("/v1/completions", content=b"x" * (5 * 1024 * 1024),
                             headers={**h.tenant_headers(), "content-type": "application/json"})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"


def test_metrics_count_requests_by_route_template(make_harness: Callable[[Handler], Harness]) -> None:
    h = make_harness(_never)
    h.client.get("/v1/models", headers={"Authorization": "Bearer nope"})
    text = h.client.get("/metrics").text
    assert 'banyan_requests_total{method="GET",route="/v1/models",status="401"} 1.0' in text
    assert "process_cpu_seconds_total " in text and 'python_gc_collections_total{generation="0"}' in text


def test_a_dependency_failure_is_503_to_the_client_and_a_warning_naming_why(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from redis.exceptions import TimeoutError as RedisTimeout

    from gateway.errors import DependencyUnavailable, translate

    with caplog.at_level(logging.WARNING, logger="banyan.errors"):
        error = translate(RedisTimeout("Timeout reading from socket"))
    assert isinstance(error, DependencyUnavailable) and error.body()["error"]["code"] == "dependency_unavailable"
    assert "database" in error.body()["error"]["message"] and "socket" not in error.body()["error"]["message"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["dependency unavailable: TimeoutError: Timeout reading from socket"]
