"""Seed data for ``banyan dev``: the ``demo`` tenant, a key, demo adapters, through the real admin API."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import httpx

from gateway.dev.demo_model import build_adapter

DEMO_TENANT = "demo"
DEMO_ADAPTERS = {"demo-support": 1, "demo-pirate": 2}  # adapter name -> weight seed


@dataclass(frozen=True)
class Seeded:
    tenant: str
    key: str
    adapters: list[str]


async def seed_demo(gateway_url: str, *, admin_key: str, model_path: Path, work_dir: Path) -> Seeded:
    headers = {"Authorization": f"Bearer {admin_key}"}
    async with httpx.AsyncClient(base_url=gateway_url, headers=headers, timeout=120) as client:
        response = await client.post("/admin/tenants", json={"id": DEMO_TENANT, "name": "Demo tenant"})
        if response.status_code not in (201, 409):
            response.raise_for_status()
        response = await client.post(f"/admin/tenants/{DEMO_TENANT}/keys", json={"name": "banyan-dev"})
        response.raise_for_status()
        key = response.json()["key"]
        for name, seed in DEMO_ADAPTERS.items():
            folder = await asyncio.to_thread(build_adapter, model_path, work_dir / name, seed=seed)
            await upload_adapter(client, DEMO_TENANT, name, folder)
    return Seeded(tenant=DEMO_TENANT, key=key, adapters=list(DEMO_ADAPTERS))


async def upload_adapter(client: httpx.AsyncClient, tenant: str, name: str, folder: Path) -> dict[str, object]:
    files = [("files", (f, (folder / f).read_bytes(), "application/octet-stream"))
             for f in ("adapter_config.json", "adapter_model.safetensors")]
    response = await client.post(f"/admin/tenants/{tenant}/adapters", data={"name": name}, files=files)
    response.raise_for_status()
    result: dict[str, object] = response.json()
    return result
