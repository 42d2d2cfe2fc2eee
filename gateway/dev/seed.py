"""Seed data for ``banyan dev``: the ``demo`` tenant, a key, demo adapters (through the real admin API)
and demo documents (through the tenant API, as a user would add them).

The adapters themselves come from the dev model's entry (:mod:`gateway.dev.models`); those that take minutes
to make are added later with :func:`add_demo_adapters`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx

from adapters.layout import ADAPTER_FILES

DEMO_TENANT = "demo"
PLAIN_QUESTION = "What is the capital of France?"
"""Asked through the base model and a demo adapter in the curl commands ``banyan dev`` prints."""
DEMO_QUESTION = "Where do orders ship from?"
"""Asked with ``rag`` in the printed curl: the demo documents answer it (without them the model guesses)."""
DEMO_DOCUMENTS = [  # the last two disagree: retrieval ranks the newer one first
    {"title": "Returns policy", "timestamp": "2024-02-01T09:00:00Z", "collection": "policies",
     "text": "Customers can return any product within 30 days of delivery for a full refund. Items must be "
             "unused and in their original packaging. Refunds are paid to the original payment method within "
             "five business days of the return being received."},
    {"title": "Shipping", "timestamp": "2024-03-10T09:00:00Z", "collection": "policies",
     "text": "Orders ship from the Lisbon warehouse within two business days. Standard delivery in the EU takes "
             "three to five days; express delivery takes one to two days and costs 12 euros."},
    {"title": "Support hours", "timestamp": "2023-06-01T09:00:00Z",
     "text": "The support desk is open on weekdays from 9 am to 5 pm (Lisbon time). Outside these hours, "
             "tickets are answered the next business day."},
    {"title": "Support hours update", "timestamp": "2024-09-15T09:00:00Z",
     "text": "Since September 2024 the support desk is open every day from 8 am to 8 pm (Lisbon time), "
             "weekends included."},
]


@dataclass(frozen=True)
class Seeded:
    tenant: str
    key: str
    adapters: list[str]
    documents: int = 0


async def seed_demo(gateway_url: str, *, admin_key: str, adapters: Mapping[str, Path]) -> Seeded:
    """Create the demo tenant and a key for it; upload ``adapters`` (name -> PEFT folder); add the documents."""
    headers = {"Authorization": f"Bearer {admin_key}"}
    async with httpx.AsyncClient(base_url=gateway_url, headers=headers, timeout=120) as client:
        response = await client.post("/admin/tenants", json={"id": DEMO_TENANT, "name": "Demo tenant"})
        if response.status_code not in (201, 409):
            response.raise_for_status()
        response = await client.post(f"/admin/tenants/{DEMO_TENANT}/keys", json={"name": "banyan-dev"})
        response.raise_for_status()
        key = response.json()["key"]
        for name, folder in adapters.items():
            await upload_adapter(client, DEMO_TENANT, name, folder)
        for document in DEMO_DOCUMENTS:
            response = await client.post("/v1/documents", json=document, headers={"Authorization": f"Bearer {key}"})
            response.raise_for_status()
    return Seeded(tenant=DEMO_TENANT, key=key, adapters=list(adapters), documents=len(DEMO_DOCUMENTS))


async def add_demo_adapters(gateway_url: str, *, admin_key: str, adapters: Mapping[str, Path]) -> None:
    """Upload (and so activate) more adapters for the demo tenant."""
    headers = {"Authorization": f"Bearer {admin_key}"}
    async with httpx.AsyncClient(base_url=gateway_url, headers=headers, timeout=120) as client:
        for name, folder in adapters.items():
            await upload_adapter(client, DEMO_TENANT, name, folder)


async def upload_adapter(client: httpx.AsyncClient, tenant: str, name: str, folder: Path) -> dict[str, object]:
    files = [("files", (f, (folder / f).read_bytes(), "application/octet-stream")) for f in ADAPTER_FILES]
    response = await client.post(f"/admin/tenants/{tenant}/adapters", data={"name": name}, files=files)
    response.raise_for_status()
    result: dict[str, object] = response.json()
    return result
