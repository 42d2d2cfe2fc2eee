"""Locust scenario for Banyan: many tenants, Zipf-popular adapters, chat and completions, streaming on
and off, a share of ``rag`` requests.

Run it headless and bounded against a running gateway (``banyan dev`` prints the admin key):

    BANYAN_ADMIN_KEY=adm_... .venv/bin/locust -f loadtests/locustfile.py --headless \\
        -u 32 -r 8 -t 60s --host http://127.0.0.1:8000

At test start (in each load-generating process) it creates its own tenants through the admin API,
one key each, uploads copies of a real PEFT adapter under several names per tenant, and adds a few
documents per tenant for the ``rag`` requests; at test stop it deletes those tenants again (set
``BANYAN_LOAD_KEEP=1`` to keep them). Settings (environment variables):

    BANYAN_ADMIN_KEY         the gateway's admin key (required)
    BANYAN_LOAD_ADAPTER_DIR  a PEFT adapter folder (adapter_config.json + adapter_model.safetensors) for
                             the gateway's base model; default: the first of <BANYAN_DATA_DIR or
                             .banyan>/demo-adapters/* that `banyan dev` (without --empty) writes
    BANYAN_LOAD_TENANTS      tenants to create (4)
    BANYAN_LOAD_ADAPTERS     adapters per tenant (8); requests pick one with Zipf popularity
    BANYAN_LOAD_ZIPF_S       Zipf exponent (1.1): adapter k of a tenant is picked with weight 1/k^s
    BANYAN_LOAD_BASE_SHARE   share of requests to the base model instead of an adapter (0.1)
    BANYAN_LOAD_STREAM_SHARE share of streamed requests (0.5)
    BANYAN_LOAD_RAG_SHARE    share of requests with `rag` (0.1)
    BANYAN_LOAD_CHAT_SHARE   share of chat (vs completions) requests (0.6)
    BANYAN_LOAD_MAX_TOKENS   max_tokens per request (16)

A streamed request's time in Locust's stats is its whole duration (to ``[DONE]``); the time to first
token of streams is printed as its own table when the test stops.
This file imports only Locust, the standard library, :mod:`adapters.layout` (the stored file names) and
:mod:`loadtests._stats` (the percentile), both of which import nothing but the standard library; never the
rest of the product: Locust patches the process with gevent.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from locust import HttpUser, between, events, task
from locust.env import Environment
from locust.runners import MasterRunner

from adapters.layout import ADAPTER_FILES, WEIGHTS_FILE
from loadtests._stats import percentile  # found from the repository root, where Locust runs (above)

DOCUMENTS = [
    ("Office hours", "The office opens at 9 am and closes at 6 pm on weekdays; on Saturdays it opens at 10 am."),
    ("Parking", "Visitors park in the rear lot. Badges for the garage are issued at the front desk."),
    ("Refunds", "Refunds are paid within 14 days of the return being received at the warehouse."),
    ("Support", "Support answers within one business day; urgent issues go to the on-call phone line."),
]
QUESTIONS = ["When does the office open?", "Where do visitors park?", "How long do refunds take?",
             "How fast does support answer?", "Tell me a short story.", "Say hello in three languages."]


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def _env_float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


@dataclass
class LoadTenant:
    id: str
    key: str
    adapters: list[str]
    weights: list[float]


@dataclass
class Plan:
    base_model: str = ""
    tenants: list[LoadTenant] = field(default_factory=list)
    base_share: float = 0.1
    stream_share: float = 0.5
    rag_share: float = 0.1
    chat_share: float = 0.6
    max_tokens: int = 16


PLAN = Plan()
TTFT_MS: dict[str, list[float]] = {}
_NEXT_TENANT = itertools.count()


def _adapter_dir() -> Path:
    configured = os.environ.get("BANYAN_LOAD_ADAPTER_DIR")
    if configured:
        return Path(configured)
    data_dir = Path(os.environ.get("BANYAN_DATA_DIR", ".banyan"))
    found = sorted((data_dir / "demo-adapters").glob(f"*/{WEIGHTS_FILE}"))
    if not found:
        raise SystemExit("no adapter to upload: set BANYAN_LOAD_ADAPTER_DIR to a PEFT adapter folder, or run "
                         "`banyan dev` (without --empty) once so that .banyan/demo-adapters/ exists")
    return found[0].parent


def _check(response: requests.Response, *expected: int) -> Any:
    if response.status_code not in expected:
        raise SystemExit(f"{response.request.method} {response.url} -> {response.status_code}: {response.text[:300]}")
    return response.json() if response.content else None


def _setup(host: str) -> None:
    admin_key = os.environ.get("BANYAN_ADMIN_KEY")
    if not admin_key:
        raise SystemExit("set BANYAN_ADMIN_KEY to the gateway's admin key")
    folder = _adapter_dir()
    files = {name: (folder / name).read_bytes() for name in ADAPTER_FILES}
    tenants, per_tenant = _env_int("BANYAN_LOAD_TENANTS", 4), _env_int("BANYAN_LOAD_ADAPTERS", 8)
    zipf_s = _env_float("BANYAN_LOAD_ZIPF_S", 1.1)
    PLAN.base_share = _env_float("BANYAN_LOAD_BASE_SHARE", 0.1)
    PLAN.stream_share = _env_float("BANYAN_LOAD_STREAM_SHARE", 0.5)
    PLAN.rag_share = _env_float("BANYAN_LOAD_RAG_SHARE", 0.1)
    PLAN.chat_share = _env_float("BANYAN_LOAD_CHAT_SHARE", 0.6)
    PLAN.max_tokens = _env_int("BANYAN_LOAD_MAX_TOKENS", 16)
    run = secrets.token_hex(3)
    admin = requests.Session()
    admin.headers["Authorization"] = f"Bearer {admin_key}"
    for i in range(tenants):
        tenant_id = f"load-{run}-{i}"
        _check(admin.post(f"{host}/admin/tenants", json={"id": tenant_id, "name": f"load test {i}"}, timeout=60), 201)
        key = _check(admin.post(f"{host}/admin/tenants/{tenant_id}/keys", json={"name": "locust"}, timeout=60),
                     201)["key"]
        names = [f"adapter-{k}" for k in range(per_tenant)]
        for name in names:
            upload = [("files", (f, data, "application/octet-stream")) for f, data in files.items()]
            _check(admin.post(f"{host}/admin/tenants/{tenant_id}/adapters", data={"name": name}, files=upload,
                              timeout=120), 201)
        tenant_session = requests.Session()
        tenant_session.headers["Authorization"] = f"Bearer {key}"
        for title, text in DOCUMENTS:
            _check(tenant_session.post(f"{host}/v1/documents", json={"title": title, "text": text}, timeout=120), 201)
        if not PLAN.base_model:
            models = _check(tenant_session.get(f"{host}/v1/models", timeout=60), 200)["data"]
            PLAN.base_model = next(m["id"] for m in models if m["owned_by"] == "banyan")
        weights = [1.0 / (k + 1) ** zipf_s for k in range(per_tenant)]
        PLAN.tenants.append(LoadTenant(id=tenant_id, key=key, adapters=names, weights=weights))
    print(f"[locust] {tenants} tenants x {per_tenant} adapters ready (run {run}, adapter {folder})", flush=True)


def _teardown(host: str) -> None:
    if os.environ.get("BANYAN_LOAD_KEEP") == "1" or not PLAN.tenants:
        return
    admin = requests.Session()
    admin.headers["Authorization"] = f"Bearer {os.environ.get('BANYAN_ADMIN_KEY', '')}"
    for tenant in PLAN.tenants:
        admin.delete(f"{host}/admin/tenants/{tenant.id}", timeout=120)
    PLAN.tenants.clear()


@events.test_start.add_listener
def _on_test_start(environment: Environment, **_: Any) -> None:
    if isinstance(environment.runner, MasterRunner):
        return  # the workers generate the load (and set up their own tenants)
    _setup((environment.host or "http://127.0.0.1:8000").rstrip("/"))


def _print_ttft() -> None:
    if not TTFT_MS:
        return
    print("\nTime to first token of streams (ms, measured by the clients)", flush=True)
    print(f"{'name':28s} {'count':>6s} {'p50':>7s} {'p90':>7s} {'p99':>7s} {'max':>7s}")
    for name, values in sorted(TTFT_MS.items()):
        p50, p90, p99 = (percentile(values, p) for p in (50, 90, 99))
        print(f"{name:28s} {len(values):6d} {p50:7.0f} {p90:7.0f} {p99:7.0f} {max(values):7.0f}", flush=True)


@events.test_stop.add_listener
def _on_test_stop(environment: Environment, **_: Any) -> None:
    if not isinstance(environment.runner, MasterRunner):
        _print_ttft()
        _teardown((environment.host or "http://127.0.0.1:8000").rstrip("/"))


def _has_token(data: bytes) -> bool:
    """Whether an SSE chunk carries generated text (the first chat chunk only announces the role)."""
    choices = json.loads(data).get("choices") or [{}]
    choice = choices[0]
    return bool(choice.get("text") or (choice.get("delta") or {}).get("content"))


class BanyanUser(HttpUser):
    """One client of one tenant, sending a mix of requests back to back."""

    wait_time = between(0.0, 0.05)

    def on_start(self) -> None:
        self.tenant = PLAN.tenants[next(_NEXT_TENANT) % len(PLAN.tenants)]
        self.client.headers["Authorization"] = f"Bearer {self.tenant.key}"

    def _model(self) -> str:
        if random.random() < PLAN.base_share:
            return PLAN.base_model
        return random.choices(self.tenant.adapters, weights=self.tenant.weights)[0]

    @task
    def generate(self) -> None:
        chat = random.random() < PLAN.chat_share
        stream = random.random() < PLAN.stream_share
        rag = random.random() < PLAN.rag_share
        question = random.choice(QUESTIONS)
        body: dict[str, Any] = {"model": self._model(), "max_tokens": PLAN.max_tokens, "temperature": 0.7}
        if chat:
            body["messages"] = [{"role": "user", "content": question}]
        else:
            body["prompt"] = question
        if rag:
            body["rag"] = {"top_k": 2}
        path = "/v1/chat/completions" if chat else "/v1/completions"
        name = f"{'chat' if chat else 'completions'}{' rag' if rag else ''}{' stream' if stream else ''}"
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
            self._stream(path, body, name)
        else:
            with self.client.post(path, json=body, name=name, catch_response=True) as response:
                if response.status_code != 200:
                    response.failure(f"{response.status_code}: {response.text[:200]}")
                elif not response.json().get("usage", {}).get("completion_tokens"):
                    response.failure("no completion tokens")
                elif rag and "sources" not in response.json():
                    response.failure("rag response without sources")

    def _stream(self, path: str, body: dict[str, Any], name: str) -> None:
        started = time.perf_counter()
        first: float | None = None
        done = False
        error = ""
        with self.client.post(path, json=body, name=name, stream=True, catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"{response.status_code}: {response.text[:200]}")
                return
            for line in response.iter_lines():
                if not line.startswith(b"data: "):
                    continue
                data = line[len(b"data: "):]
                if data == b"[DONE]":
                    done = True
                    break
                if data.startswith(b'{"error"'):
                    error = json.loads(data)["error"].get("message", "error event")
                elif first is None and _has_token(data):
                    first = time.perf_counter()
            # Locust timed the response headers; a stream's time is until [DONE].
            response.request_meta["response_time"] = (time.perf_counter() - started) * 1000
            if error or not done:
                response.failure(error or "the stream ended without [DONE]")
                return
            response.success()
        if first is not None:
            TTFT_MS.setdefault(name, []).append((first - started) * 1000)
