"""The documents routes on in-memory state: a document is written under its tenant's live guard."""

from __future__ import annotations

from collections.abc import Callable

import httpx

from gateway.tenants import live_guard
from tests.unit.gateway.conftest import Handler, Harness


def _no_engine(request: httpx.Request) -> httpx.Response:
    raise AssertionError("the documents routes never call the engine")


def test_a_document_is_added_under_its_tenants_live_guard(make_harness: Callable[[Handler], Harness]) -> None:
    h = make_harness(_no_engine)
    response = h.client.post("/v1/documents", headers=h.tenant_headers(), json={"text": "Parking is free."})
    assert response.status_code == 201, response.text
    assert h.documents.guards == [live_guard("acme")]
