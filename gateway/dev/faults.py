"""Fault injection on a local stack of its own: break one dependency under steady mixed traffic, bring it back, and
say what every client saw.

- :class:`FaultStack` assembles the pieces of ``banyan dev`` (:class:`gateway.dev.stack.DevStack`, the tiny
  model) so that each can be broken and brought back on the same port: Valkey persisting every write to its
  append-only file (as a production Redis would), moto S3, the vLLM engine, and the gateway as a ``banyan
  serve`` child process (so it can get a SIGTERM and be started again).
- :class:`Traffic` is a bounded pool of clients sending mixed requests (streams of the base model and of an
  adapter, ``rag``, JSON completions) and classifying each answer (:func:`classify_json`,
  :func:`classify_stream`): a full answer, a clean OpenAI-shaped error (an HTTP error with the OpenAI error
  body, or in a stream an error event followed by ``data: [DONE]``), or anything else (a hung or refused
  connection, a torn stream, a body in another shape).
- The phase functions (``phase_*``, one per fault) run traffic, break and restore one dependency and return a
  :class:`PhaseResult`: the counts, the recovery time (from the dependency being back to the first answered
  request that started after it), the usage the gateway recorded against the tokens the clients were told
  they were served, and what of the stored state (tenants, keys, adapters, documents) differs afterwards.

The integration tests (``tests/integration/test_faults.py``) assert on the results; the load script
(``loadtests/fault_injection.py``) prints them as a table. Loopback only; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import enum
import json
import secrets
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
from pydantic import SecretStr

from adapters.layout import ADAPTER_FILES
from adapters.store import S3Settings
from gateway.dev.launcher import serve_env, start_serve
from gateway.dev.models import dev_model
from gateway.dev.processes import free_port
from gateway.dev.stack import DevStack, dev_settings
from gateway.settings import Settings

Progress = Callable[[str], None]
T = TypeVar("T")

FAULT_MODEL = "tiny"
"""The dev model of the fault stack: the small deterministic one (fast to start and to serve)."""
PROMPT = "Tell me about the harbour and the ships that sail from it."
RAG_QUESTION = "When does the ferry to the lighthouse leave?"
DOCUMENTS = [
    {"title": "Ferry timetable", "text": "The ferry to the lighthouse leaves the north pier at 7 am and 3 pm."},
    {"title": "Harbour fees", "text": "Mooring in the inner harbour costs 14 crowns a night, paid at the office."},
    {"title": "Fish market", "text": "The fish market opens at dawn on weekdays and closes when the catch is sold."},
]


def _quiet(_: str) -> None:
    pass


def _port(url: str) -> int:
    port = urlsplit(url).port
    if port is None:
        raise ValueError(f"no port in {url}")
    return port


class FaultStack:
    """Valkey (persistent), moto, the engine and the gateway (``banyan serve``), each restartable on its port."""

    def __init__(self, root: Path, *, progress: Progress = _quiet, drain_s: float = 3.0,
                 gateway_env: Mapping[str, str] | None = None) -> None:
        self.root = root.resolve()
        self.admin_key = "adm_faults_" + secrets.token_hex(16)
        self.drain_s = drain_s
        self._gateway_env = dict(gateway_env or {})
        model = dev_model(FAULT_MODEL)
        settings = dev_settings(Settings(mode="dev", data_dir=self.root, dev_model=FAULT_MODEL,
                                         admin_key=SecretStr(self.admin_key)), model)
        self.dev = DevStack(settings, model=model, progress=progress)
        self.base_model = settings.base_model
        self.gateway_port = free_port()
        self.redis_url = ""
        self.engine_url = ""
        self.s3 = S3Settings()
        self.model_path = Path()
        # Children are asked to die with the thread that started them (PR_SET_PDEATHSIG fires when that *thread*
        # ends), so they are all started and stopped from one thread that lives as long as the stack.
        self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="fault-stack")

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking method of this stack (a kill, a restart) in the stack's own thread: the event loop's
        traffic goes on meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    @property
    def valkey_dir(self) -> Path:
        return self.root / "valkey"

    @property
    def logs(self) -> Path:
        return self.dev.children.log_dir

    def start(self) -> None:
        """Start every service (in the stack's thread; blocks until the gateway is ready)."""
        self._thread.submit(self._start).result()

    def _start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            self.redis_url = self.dev.start_valkey(persist_dir=self.valkey_dir)
            self.s3 = self.dev.start_s3()
            self.model_path = self.dev.build_model()
            self.engine_url = self.dev.start_engine(self.model_path, self.s3)
            self.start_gateway()
        except BaseException:
            self._stop()
            raise

    def stop(self) -> None:
        self._thread.submit(self._stop).result()
        self._thread.shutdown()

    def _stop(self) -> None:
        for child in self.dev.children.started:  # a paused server cannot handle its SIGTERM
            self.dev.children.send_signal(child, signal.SIGCONT)
        self.dev.stop()

    def start_gateway(self, *, timeout: float = 240.0) -> None:
        s = self.dev.settings
        env = serve_env(port=self.gateway_port, admin_key=self.admin_key, data_dir=self.root,
                        redis_url=self.redis_url, s3=self.s3, engine_urls=self.engine_url,
                        base_model=s.base_model, model_config=self.model_path / "config.json",
                        engine_api_key=self.dev.engine_api_key, max_model_len=s.max_model_len,
                        extra={"BANYAN_SHUTDOWN_DRAIN_S": str(self.drain_s), **self._gateway_env})
        start_serve(self.dev.children, "gateway", env, cwd=self.root, timeout=timeout)

    def stop_gateway(self, *, sig: signal.Signals = signal.SIGTERM, grace: float = 60.0) -> float:
        """Send ``sig`` to the gateway and wait for it to exit (SIGKILL after ``grace`` s); return how long it took."""
        began = time.monotonic()
        self.dev.children.kill(self.dev.children.named("gateway"), sig=sig, grace=grace)
        return time.monotonic() - began

    def kill(self, service: str) -> None:
        """SIGKILL one of ``valkey``, ``s3``, ``engine``, ``gateway`` (its whole process group)."""
        self.dev.children.kill(self.dev.children.named(service))

    def pause(self, service: str) -> None:
        """SIGSTOP: the service accepts connections (the kernel does) and answers nothing until :meth:`resume`."""
        self.dev.children.send_signal(self.dev.children.named(service), signal.SIGSTOP)

    def resume(self, service: str) -> None:
        self.dev.children.send_signal(self.dev.children.named(service), signal.SIGCONT)

    def restart_valkey(self) -> None:
        """Valkey again on its port, reading back its append-only file."""
        self.dev.start_valkey(port=_port(self.redis_url), persist_dir=self.valkey_dir)

    def restart_s3(self) -> None:
        """Moto again on its port: empty (it keeps objects in memory only), with the bucket made again."""
        self.dev.start_s3(port=_port(str(self.s3.s3_endpoint_url)))

    def restart_engine(self) -> None:
        self.dev.start_engine(self.model_path, self.s3, port=_port(self.engine_url))

    def engine_metric(self, name: str) -> float:
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(self.engine_url + "/metrics", timeout=10).text
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


# --- what a client saw ---------------------------------------------------------------------------------------


class Result(enum.Enum):
    ANSWERED = "answered"
    CLEAN_ERROR = "clean error"
    OTHER = "other"


@dataclass(frozen=True)
class Outcome:
    kind: str
    result: Result
    detail: str
    started: float
    ended: float
    tokens: int = 0
    """Prompt plus completion tokens the answer said were served (in a stream: the last usage it carried)."""
    message: str = ""
    """An error answer's ``message`` (which dependency, which limit)."""


def is_openai_error(body: object) -> bool:
    """``{"error": {"message": str, "type": str, "param": ..., "code": ...}}``."""
    if not isinstance(body, dict) or not isinstance(body.get("error"), dict):
        return False
    error = body["error"]
    return (isinstance(error.get("message"), str) and bool(error["message"]) and isinstance(error.get("type"), str)
            and "param" in error and "code" in error)


def error_message(content: bytes | str) -> str:
    """The ``message`` of an OpenAI-shaped error body, else ""."""
    body = _parse(content)
    return str(body["error"]["message"]) if is_openai_error(body) else ""  # type: ignore[index]


def _error_name(body: dict[str, Any]) -> str:
    error = body["error"]
    return str(error.get("code") or error.get("type"))


def _tokens(usage: object) -> int:
    if not isinstance(usage, dict):
        return 0
    return int(usage.get("prompt_tokens") or 0) + int(usage.get("completion_tokens") or 0)


def _parse(raw: bytes | str) -> object:
    try:
        return json.loads(raw)
    except ValueError:
        return None


def classify_json(status: int, content: bytes) -> tuple[Result, str, int]:
    """A non-streaming answer: 200 with choices and usage, or an error status with the OpenAI error body."""
    body = _parse(content)
    if status == 200:
        if isinstance(body, dict) and isinstance(body.get("choices"), list) and isinstance(body.get("usage"), dict):
            return Result.ANSWERED, "200", _tokens(body["usage"])
        return Result.OTHER, "200 without choices and usage", 0
    if status >= 400 and isinstance(body, dict) and is_openai_error(body):
        return Result.CLEAN_ERROR, f"{status} {_error_name(body)}", 0
    return Result.OTHER, f"{status} not in the OpenAI error shape", 0


def classify_stream(events: list[str], *, broken: str | None = None) -> tuple[Result, str, int]:
    """The ``data:`` payloads of a 200 SSE stream, in order (``broken``: the transport error that ended it)."""
    tokens = 0
    errors: list[int] = []
    finished = False
    for index, event in enumerate(events):
        if event == "[DONE]":
            continue
        parsed = _parse(event)
        if not isinstance(parsed, dict):
            return Result.OTHER, "an event that is not JSON", tokens
        if "error" in parsed:
            if not is_openai_error(parsed):
                return Result.OTHER, "an error event not in the OpenAI shape", tokens
            errors.append(index)
            continue
        tokens = _tokens(parsed.get("usage")) or tokens
        choices = parsed.get("choices")
        if isinstance(choices, list) and any(isinstance(c, dict) and c.get("finish_reason") for c in choices):
            finished = True
    if broken is not None or not events or events[-1] != "[DONE]":
        how = f" ({broken})" if broken else ""
        return Result.OTHER, f"torn stream: no [DONE]{how}", tokens
    if events.count("[DONE]") != 1:
        return Result.OTHER, "more than one [DONE]", tokens
    if errors:
        if errors != [len(events) - 2]:
            return Result.OTHER, "an error event not right before [DONE]", tokens
        last = _parse(events[-2])
        assert isinstance(last, dict)
        return Result.CLEAN_ERROR, f"stream error event {_error_name(last)}", tokens
    if not finished:
        return Result.OTHER, "[DONE] without a finished choice", tokens
    return Result.ANSWERED, "200 stream", tokens


# --- traffic -------------------------------------------------------------------------------------------------

KINDS = ("stream", "adapter", "rag", "json")
"""The mix, in the order each client cycles through it: a base-model chat stream, a chat stream of an adapter,
a JSON chat with ``rag``, a JSON completion."""


@dataclass(frozen=True)
class Workload:
    base_model: str
    adapter: str
    stream_tokens: int = 48
    json_tokens: int = 16

    def request(self, kind: str) -> tuple[str, dict[str, Any]]:
        def chat(model: str, **extra: Any) -> tuple[str, dict[str, Any]]:
            return "/v1/chat/completions", {"model": model, "temperature": 0, **extra,
                                            "messages": [{"role": "user", "content": RAG_QUESTION if "rag" in extra
                                                          else PROMPT}]}

        streaming = {"stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True},
                     "max_tokens": self.stream_tokens, "ignore_eos": True}
        if kind == "stream":
            return chat(self.base_model, **streaming)
        if kind == "adapter":
            return chat(self.adapter, **streaming)
        if kind == "rag":
            return chat(self.base_model, max_tokens=self.json_tokens, rag={"top_k": 2})
        return "/v1/completions", {"model": self.base_model, "prompt": PROMPT, "max_tokens": self.json_tokens,
                                   "temperature": 0}


async def _read_stream(response: httpx.Response) -> tuple[Result, str, int]:
    events: list[str] = []
    try:
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: "):])
    except httpx.HTTPError as e:
        return classify_stream(events, broken=type(e).__name__)
    return classify_stream(events)


async def send(client: httpx.AsyncClient, kind: str, path: str, body: dict[str, Any], *,
               timeout_s: float) -> Outcome:
    """One request, classified; never longer than ``timeout_s``."""
    started = time.monotonic()
    message = ""
    try:
        async with asyncio.timeout(timeout_s):
            if body.get("stream"):
                async with client.stream("POST", path, json=body) as response:
                    if response.status_code == 200:
                        result, detail, tokens = await _read_stream(response)
                    else:
                        content = await response.aread()
                        result, detail, tokens = classify_json(response.status_code, content)
                        message = error_message(content)
            else:
                response = await client.post(path, json=body)
                result, detail, tokens = classify_json(response.status_code, response.content)
                if response.status_code != 200:
                    message = error_message(response.content)
    except TimeoutError:
        result, detail, tokens = Result.OTHER, f"no answer in {timeout_s:.0f} s (hung)", 0
    except httpx.ConnectError:
        result, detail, tokens = Result.OTHER, "connection refused", 0
    except httpx.HTTPError as e:
        result, detail, tokens = Result.OTHER, f"transport error {type(e).__name__}", 0
    return Outcome(kind=kind, result=result, detail=detail, started=started, ended=time.monotonic(), tokens=tokens,
                   message=message)


class Traffic:
    """``workers`` clients, each sending the :data:`KINDS` in turn, one request at a time, until stopped; after
    anything but an answer a client waits ``pause_after_error_s``. Use as ``async with``."""

    def __init__(self, url: str, key: str, workload: Workload, *, workers: int = 4, timeout_s: float = 60.0,
                 pause_after_error_s: float = 0.25) -> None:
        self.outcomes: list[Outcome] = []
        self.in_flight: dict[int, tuple[str, float]] = {}
        """Per client: the kind and start of the request it is waiting for."""
        self._url, self._key, self._workload = url, key, workload
        self._workers, self._timeout_s, self._pause = workers, timeout_s, pause_after_error_s
        self._stop = asyncio.Event()
        self._go = asyncio.Event()
        self._go.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks: list[asyncio.Task[None]] = []
        self._client: httpx.AsyncClient | None = None

    async def __aenter__(self) -> Traffic:
        self._client = httpx.AsyncClient(base_url=self._url, headers={"Authorization": f"Bearer {self._key}"},
                                         timeout=httpx.Timeout(self._timeout_s, connect=5.0),
                                         limits=httpx.Limits(max_connections=self._workers * 2))
        self._tasks = [asyncio.create_task(self._run(i)) for i in range(self._workers)]
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    async def _run(self, index: int) -> None:
        assert self._client is not None
        turn = index
        while True:
            await self._go.wait()
            if self._stop.is_set():
                return
            kind = KINDS[turn % len(KINDS)]
            turn += 1
            path, body = self._workload.request(kind)
            self.in_flight[index] = (kind, time.monotonic())
            self._idle.clear()
            outcome = await send(self._client, kind, path, body, timeout_s=self._timeout_s)
            del self.in_flight[index]
            if not self.in_flight:
                self._idle.set()
            self.outcomes.append(outcome)
            if outcome.result is not Result.ANSWERED:
                await asyncio.sleep(self._pause)

    def hold(self) -> None:
        """Send nothing new (requests under way go on) until :meth:`release`."""
        self._go.clear()

    def release(self) -> None:
        self._go.set()

    async def wait_idle(self, *, timeout_s: float) -> bool:
        """After :meth:`hold`: wait until no request is under way."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout=timeout_s)
        return not self.in_flight

    async def wait_streaming(self, *, timeout_s: float) -> bool:
        """Wait until a stream has been under way for a moment (so that a fault lands mid-stream)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            now = time.monotonic()
            if any(kind in ("stream", "adapter") and now - began > 0.3 for kind, began in self.in_flight.values()):
                return True
            await asyncio.sleep(0.05)
        return False

    async def stop(self) -> None:
        """Send nothing new; wait for the requests under way (each bounded by its timeout)."""
        self._stop.set()
        self._go.set()
        if self._tasks:
            await asyncio.gather(*self._tasks)
            self._tasks = []
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def first_success_after(self, moment: float) -> float | None:
        """Seconds from ``moment`` to the end of the first answered request that started at or after it."""
        ends = [o.ended for o in self.outcomes if o.result is Result.ANSWERED and o.started >= moment]
        return min(ends) - moment if ends else None

    async def wait_success_after(self, moment: float, *, timeout_s: float) -> float | None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = self.first_success_after(moment)
            if found is not None:
                return found
            await asyncio.sleep(0.1)
        return None


# --- the stored state, usage -------------------------------------------------------------------------------


@dataclass
class World:
    """What is seeded before the faults: the traffic tenant (a key, an adapter, documents), a witness tenant
    (two keys, an adapter with two versions and another, documents) and a tenant whose clients hang up
    (``max_concurrency`` 2). ``keys``: each tenant's key."""

    url: str
    admin_key: str
    workload: Workload
    traffic_tenant: str
    leaver_tenant: str
    keys: dict[str, str]
    adapter_dir: Path
    """Folders of valid PEFT adapters for the base model, one per upload (``a<n>``)."""
    uploads: int = 0

    def admin(self, *, timeout_s: float = 60.0) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, headers={"Authorization": f"Bearer {self.admin_key}"},
                                 timeout=timeout_s)

    def tenant(self, tenant: str, *, timeout_s: float = 60.0) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, headers={"Authorization": f"Bearer {self.keys[tenant]}"},
                                 timeout=timeout_s)

    def next_adapter(self) -> Path:
        """A fresh valid adapter folder (a variant of the first with new weights)."""
        from gateway.dev.demo_model import synthetic_variant

        self.uploads += 1
        return synthetic_variant(self.adapter_dir / "a0", self.adapter_dir / f"a{self.uploads}", seed=self.uploads)


def make_adapter_source(model_path: Path, folder: Path) -> Path:
    """The first PEFT adapter (``folder/a0``; later ones are variants of it)."""
    from gateway.dev.demo_model import build_adapter

    if not (folder / "a0" / ADAPTER_FILES[0]).exists():
        build_adapter(model_path, folder / "a0", seed=7)
    return folder


async def upload(admin: httpx.AsyncClient, tenant: str, name: str, folder: Path) -> httpx.Response:
    files = [("files", (f, (folder / f).read_bytes(), "application/octet-stream")) for f in ADAPTER_FILES]
    return await admin.post(f"/admin/tenants/{tenant}/adapters", data={"name": name}, files=files)


def _ok(response: httpx.Response, *statuses: int) -> Any:
    if response.status_code not in (statuses or (200,)):
        raise RuntimeError(f"{response.request.method} {response.request.url.path}: {response.status_code} "
                           f"{response.text[:300]}")
    return response.json()


async def seed_world(stack: FaultStack, *, adapter_dir: Path) -> World:
    make_adapter_source(stack.model_path, adapter_dir)
    world = World(url=stack.url, admin_key=stack.admin_key, workload=Workload(stack.base_model, "tone"),
                  traffic_tenant="load", leaver_tenant="leave", keys={}, adapter_dir=adapter_dir)
    async with world.admin() as admin:
        for tenant, limits in (("load", {}), ("keep", {"rpm": 1000, "tpm": 10_000_000}),
                               ("leave", {"max_concurrency": 2})):
            _ok(await admin.post("/admin/tenants", json={"id": tenant, "name": f"{tenant} tenant", **limits}), 201)
            world.keys[tenant] = _ok(await admin.post(f"/admin/tenants/{tenant}/keys", json={"name": "a"}), 201)["key"]
        _ok(await admin.post("/admin/tenants/keep/keys", json={"name": "second"}), 201)
        for tenant, name in (("load", "tone"), ("keep", "keep-a"), ("keep", "keep-a"), ("keep", "keep-b")):
            _ok(await upload(admin, tenant, name, world.next_adapter()), 201)
    for tenant, documents in (("load", DOCUMENTS), ("keep", DOCUMENTS[:2])):
        async with world.tenant(tenant) as client:
            for document in documents:
                _ok(await client.post("/v1/documents", json=document), 201)
    return world


async def stored_state(world: World, *, serve: bool = True) -> dict[str, Any]:
    """Every tenant's record, key ids, adapters (versions, sha256, active), documents (chunks), the models its
    key lists and (``serve``) the adapter version each active adapter answers with."""
    state: dict[str, Any] = {}
    async with world.admin() as admin:
        for tenant in world.keys:
            record = _ok(await admin.get(f"/admin/tenants/{tenant}"))
            keys = [k["key_id"] for k in _ok(await admin.get(f"/admin/tenants/{tenant}/keys"))["data"]]
            adapters = {a["name"]: {"active": a["active_version"],
                                    "versions": {str(v["version"]): v["sha256"] for v in a["versions"]}}
                        for a in _ok(await admin.get(f"/admin/tenants/{tenant}/adapters"))["data"]}
            async with world.tenant(tenant) as client:
                documents = {d["id"]: d["chunks"]
                             for d in _ok(await client.get("/v1/documents", params={"limit": 100}))["data"]}
                models = [m["id"] for m in _ok(await client.get("/v1/models"))["data"]]
                served: dict[str, str] = {}
                for name, adapter in adapters.items() if serve else ():
                    if adapter["active"] is not None:
                        response = await client.post("/v1/completions", json={"model": name, "prompt": "hi",
                                                                               "max_tokens": 1})
                        _ok(response)
                        served[name] = response.headers.get("x-banyan-adapter-version", "")
            state[tenant] = {"status": record["status"], "name": record["name"], "rpm": record["rpm"],
                             "tpm": record["tpm"], "max_concurrency": record["max_concurrency"], "keys": keys,
                             "adapters": adapters, "documents": documents, "models": models, "served": served}
    return state


def missing(before: object, after: object, path: str = "") -> list[str]:
    """What ``before`` held that ``after`` does not hold the same (what ``after`` adds is fine)."""
    if isinstance(before, dict) and isinstance(after, dict):
        lost: list[str] = []
        for key, value in before.items():
            if key not in after:
                lost.append(f"{path}/{key} is gone")
            else:
                lost.extend(missing(value, after[key], f"{path}/{key}"))
        return lost
    if isinstance(before, list) and isinstance(after, list):
        return [f"{path}: {item!r} is gone" for item in before if item not in after]
    return [] if before == after else [f"{path}: {before!r} became {after!r}"]


async def usage_tokens(world: World, tenant: str, *, settle_s: float = 8.0) -> tuple[int, int]:
    """The tenant's recorded (requests, prompt + completion tokens), once two reads 0.5 s apart agree (usage of
    a stream is recorded just after it ends)."""
    async with world.admin() as admin:
        last: tuple[int, int] | None = None
        deadline = time.monotonic() + settle_s
        while True:
            total = _ok(await admin.get(f"/admin/tenants/{tenant}/usage"))["total"]
            now = (int(total["requests"]), int(total["total_tokens"]))
            if now == last or time.monotonic() > deadline:
                return now
            last = now
            await asyncio.sleep(0.5)


# --- phases --------------------------------------------------------------------------------------------------


@dataclass
class PhaseResult:
    fault: str
    outcomes: list[Outcome]
    recovery_s: float | None
    """From the dependency being back to the first answered request that started after it."""
    tokens_seen: int
    tokens_recorded: int
    lost: list[str] = field(default_factory=list)
    """Stored state that was there before the fault and is not the same after it."""
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    recovered_at: float | None = None
    """When the first answer after the dependency came back ended (monotonic)."""
    back_at: float | None = None
    """When the dependency was back (monotonic)."""

    def count(self, result: Result) -> int:
        return sum(1 for o in self.outcomes if o.result is result)

    @property
    def others(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.result is Result.OTHER]

    def details(self, result: Result) -> dict[str, int]:
        out: dict[str, int] = {}
        for o in self.outcomes:
            if o.result is result:
                out[o.detail] = out.get(o.detail, 0) + 1
        return out

    @property
    def steady_s(self) -> float | None:
        """From the dependency being back to the first answer after which every request that started was answered
        (None: a request that started after the last answer failed)."""
        if self.back_at is None:
            return None
        after = sorted((o for o in self.outcomes if o.started >= self.back_at), key=lambda o: o.started)
        failed = [i for i, o in enumerate(after) if o.result is not Result.ANSWERED]
        rest = after[failed[-1] + 1:] if failed else after
        if not rest:
            return None
        return min(o.ended for o in rest) - self.back_at

    def error_messages(self) -> dict[str, list[str]]:
        """The messages of the error answers, by detail (at most 3 different ones each)."""
        out: dict[str, list[str]] = {}
        for o in self.outcomes:
            seen = out.setdefault(o.detail, []) if o.message else []
            if o.message and o.message not in seen and len(seen) < 3:
                seen.append(o.message)
        return out

    def failed_after_recovery(self) -> dict[str, int]:
        """What the requests that started after the recovery got, when it was not an answer."""
        out: dict[str, int] = {}
        for o in self.outcomes:
            if self.recovered_at is not None and o.started >= self.recovered_at and o.result is not Result.ANSWERED:
                out[f"{o.kind}: {o.detail}"] = out.get(f"{o.kind}: {o.detail}", 0) + 1
        return out

    def row(self) -> dict[str, Any]:
        return {"fault": self.fault, "requests": len(self.outcomes), "answered": self.count(Result.ANSWERED),
                "clean_errors": self.count(Result.CLEAN_ERROR), "other": self.count(Result.OTHER),
                "recovery_s": None if self.recovery_s is None else round(self.recovery_s, 2),
                "steady_s": None if self.steady_s is None else round(self.steady_s, 2),
                "tokens_seen": self.tokens_seen, "tokens_recorded": self.tokens_recorded, "lost": self.lost,
                "errors": self.details(Result.CLEAN_ERROR), "other_details": self.details(Result.OTHER),
                "error_messages": self.error_messages(), "failed_after_recovery": self.failed_after_recovery(),
                "notes": self.notes, **self.extra}


@dataclass(frozen=True)
class Timing:
    """How long each part of a phase lasts (the test and the script differ)."""

    workers: int = 4
    steady_s: float = 2.0
    outage_s: float = 3.0
    after_s: float = 1.5
    recovery_timeout_s: float = 60.0
    request_timeout_s: float = 45.0


class _Phase:
    """The common frame: the stored state and the usage before, traffic, then usage and stored state after."""

    def __init__(self, fault: str, stack: FaultStack, world: World, timing: Timing, *,
                 workload: Workload | None = None, serve: bool = True) -> None:
        self.fault, self.stack, self.world, self.timing = fault, stack, world, timing
        self.workload = workload or world.workload
        self.serve = serve
        self.traffic = Traffic(world.url, world.keys[world.traffic_tenant], self.workload, workers=timing.workers,
                               timeout_s=timing.request_timeout_s)
        self.notes: list[str] = []
        self.extra: dict[str, Any] = {}
        self.recovery_s: float | None = None
        self.recovered_at: float | None = None
        self.back_at: float | None = None

    async def run(self, body: Callable[[_Phase], Awaitable[None]]) -> PhaseResult:
        before, unread_before = await self._state()
        _, tokens_before = await usage_tokens(self.world, self.world.traffic_tenant)
        async with self.traffic:
            await asyncio.sleep(self.timing.steady_s)
            await body(self)
            await asyncio.sleep(self.timing.after_s)
        seen = sum(o.tokens for o in self.traffic.outcomes)
        tokens_after = await self._settled_usage(tokens_before + seen)
        after, unread_after = await self._state()
        lost = [f"before the fault, {unread_before}"] if unread_before else []
        lost += [f"after the fault, {unread_after}"] if unread_after else missing(before, after)
        return PhaseResult(fault=self.fault, outcomes=self.traffic.outcomes, recovery_s=self.recovery_s,
                           tokens_seen=seen,
                           tokens_recorded=tokens_after - tokens_before, lost=lost, notes=self.notes,
                           extra=self.extra, recovered_at=self.recovered_at, back_at=self.back_at)

    async def _settled_usage(self, expected: int, *, within_s: float = 60.0) -> int:
        """The tenant's recorded tokens once they reach ``expected``, or as they stand after ``within_s``: usage
        refused by Redis during an outage is recorded by the gateway in the background once it is back."""
        deadline = time.monotonic() + within_s
        while True:
            _, tokens = await usage_tokens(self.world, self.world.traffic_tenant)
            if tokens >= expected or time.monotonic() > deadline:
                return tokens
            await asyncio.sleep(1.0)

    async def _state(self) -> tuple[dict[str, Any], str]:
        """The stored state, or why it could not be read."""
        try:
            return await stored_state(self.world, serve=self.serve), ""
        except (RuntimeError, httpx.HTTPError) as e:
            return {}, f"the stored state could not be read: {e}"

    def recovered(self, since: float, after_s: float | None) -> None:
        self.back_at = since
        self.recovery_s = after_s
        self.recovered_at = None if after_s is None else since + after_s

    async def back(self, restore: Callable[[], None]) -> None:
        """Restore the dependency (in a thread: traffic goes on), then wait for the first answer after it."""
        await self.stack.call(restore)
        since = time.monotonic()
        self.recovered(since, await self.traffic.wait_success_after(since, timeout_s=self.timing.recovery_timeout_s))

    def cut_streams(self, moment: float) -> None:
        """Note what the streams under way at ``moment`` got."""
        cut = [o for o in self.traffic.outcomes if o.kind in ("stream", "adapter") and o.started < moment < o.ended]
        got: dict[str, int] = {}
        for o in cut:
            got[o.detail] = got.get(o.detail, 0) + 1
        self.extra["streams_under_way"] = got
        self.notes.append(f"streams under way at the fault: {got or 'none'}")


async def _admin_outcome(kind: str, call: Awaitable[httpx.Response], *, started: float | None = None) -> Outcome:
    """An admin call (2xx: answered), classified like a completion."""
    began = time.monotonic() if started is None else started
    try:
        response = await call
    except httpx.ConnectError:
        return Outcome(kind=kind, result=Result.OTHER, detail="connection refused", started=began,
                       ended=time.monotonic())
    except httpx.HTTPError as e:
        return Outcome(kind=kind, result=Result.OTHER, detail=f"transport error {type(e).__name__}", started=began,
                       ended=time.monotonic())
    if 200 <= response.status_code < 300:
        result, detail = Result.ANSWERED, str(response.status_code)
    else:
        result, detail, _ = classify_json(response.status_code, response.content)
    return Outcome(kind=kind, result=result, detail=detail, started=began, ended=time.monotonic())


async def _admin_call(admin: httpx.AsyncClient, method: str, path: str, **kwargs: Any) -> Outcome:
    return await _admin_outcome("admin", admin.request(method.upper(), path, **kwargs))


async def _readyz_statuses(url: str, until: Callable[[], bool], *, every_s: float = 0.2) -> dict[str, int]:
    """Poll ``/readyz`` until ``until()``: how often each answer (a status, or ``refused``) came."""
    seen: dict[str, int] = {}
    async with httpx.AsyncClient(base_url=url, timeout=5.0) as client:
        while not until():
            try:
                answer = str((await client.get("/readyz")).status_code)
            except httpx.HTTPError as e:
                answer = "refused" if isinstance(e, httpx.ConnectError) else type(e).__name__
            seen[answer] = seen.get(answer, 0) + 1
            await asyncio.sleep(every_s)
    return seen


async def phase_valkey(stack: FaultStack, world: World, timing: Timing) -> PhaseResult:
    """SIGKILL Valkey under traffic; start it again on its port from its append-only file."""
    async def body(phase: _Phase) -> None:
        await phase.traffic.wait_streaming(timeout_s=10)
        killed = time.monotonic()
        await stack.call(stack.kill, "valkey")
        tenant = f"new-{secrets.token_hex(3)}"
        async with world.admin(timeout_s=timing.request_timeout_s) as admin:
            during = await _admin_call(admin, "post", "/admin/tenants", json={"id": tenant, "name": "new"})
            phase.traffic.outcomes.append(during)
            await asyncio.sleep(timing.outage_s)
            phase.cut_streams(killed)
            await phase.back(stack.restart_valkey)
            again = await _admin_call(admin, "post", "/admin/tenants", json={"id": tenant, "name": "new"})
            phase.traffic.outcomes.append(again)
        phase.extra["tenant_created_while_down"] = during.detail
        phase.extra["same_tenant_created_after"] = again.detail
        phase.notes.append(f"a tenant created while Valkey was down: {during.detail}; the same one after: "
                           f"{again.detail}")

    return await _Phase("Valkey killed (SIGKILL) and restarted", stack, world, timing).run(body)


async def _serve_uploaded(phase: _Phase, world: World, timing: Timing, *, adapter: str, since: float) -> bool:
    """Ask the adapter just uploaded for a completion; when it answers, the phase recovered (from ``since``)."""
    async with world.tenant(world.traffic_tenant) as client:
        served = await send(client, f"{adapter}-adapter", "/v1/completions",
                            {"model": adapter, "prompt": PROMPT, "max_tokens": 4}, timeout_s=timing.request_timeout_s)
    phase.traffic.outcomes.append(served)
    if served.result is not Result.ANSWERED:
        return False
    phase.recovered(since, served.ended - since)
    return True


async def phase_s3_hung(stack: FaultStack, world: World, timing: Timing) -> PhaseResult:
    """SIGSTOP the S3 server under traffic (a hung object store) while an adapter upload is under way; SIGCONT.
    Recovery: from SIGCONT to that upload answered and its adapter serving (it needs the store)."""
    hang_s = max(timing.outage_s, 6.0)  # longer than the readiness probe's own timeout

    async def body(phase: _Phase) -> None:
        stack.pause("s3")
        paused = time.monotonic()
        folder = world.next_adapter()
        async with world.admin(timeout_s=timing.request_timeout_s) as admin:
            uploading = asyncio.create_task(upload(admin, world.traffic_tenant, "late", folder))
            ready = asyncio.create_task(_readyz_statuses(world.url, lambda: time.monotonic() > paused + hang_s))
            await asyncio.sleep(hang_s)
            stack.resume("s3")
            back = time.monotonic()
            phase.extra["readyz_while_hung"] = await ready
            uploaded = await _admin_outcome("upload", uploading, started=paused)
            phase.extra["upload_during_hang"] = detail = uploaded.detail
            phase.traffic.outcomes.append(uploaded)
        if uploaded.result is Result.ANSWERED:
            await _serve_uploaded(phase, world, timing, adapter="late", since=back)
        phase.notes.append(f"upload during the hang: {detail}; /readyz while hung: {phase.extra['readyz_while_hung']}")

    return await _Phase("S3 hung (SIGSTOP) then resumed (SIGCONT)", stack, world, timing).run(body)


async def phase_engine(stack: FaultStack, world: World, timing: Timing) -> PhaseResult:
    """SIGKILL the engine (its process group) mid-stream; start it again on its port."""
    async def body(phase: _Phase) -> None:
        if not await phase.traffic.wait_streaming(timeout_s=10):
            phase.notes.append("no stream was under way at the kill")
        killed = time.monotonic()
        await stack.call(stack.kill, "engine")
        await asyncio.sleep(timing.outage_s)
        phase.cut_streams(killed)
        began = time.monotonic()
        await phase.back(stack.restart_engine)
        phase.extra["engine_restart_s"] = round(time.monotonic() - began - (phase.recovery_s or 0.0), 1)

    # streams long enough to be mid-generation at the kill (the tiny model writes 256 tokens in a blink)
    workload = replace(world.workload, stream_tokens=max(world.workload.stream_tokens, 3000))
    return await _Phase("engine killed (SIGKILL) mid-stream and restarted", stack, world, timing,
                        workload=workload).run(body)


async def phase_gateway_sigterm(stack: FaultStack, world: World, timing: Timing) -> PhaseResult:
    """SIGTERM the gateway with long streams open (new requests held back from then, as a load balancer would
    once it is unready); note /readyz during the drain and how long it took to exit; start it again. Recovery:
    from starting it again to the first answer."""
    async def body(phase: _Phase) -> None:
        if not await phase.traffic.wait_streaming(timeout_s=10):
            phase.notes.append("no stream was under way at the SIGTERM")
        phase.traffic.hold()
        signalled = time.monotonic()
        exited = False
        ready = asyncio.create_task(_readyz_statuses(world.url, lambda: exited, every_s=0.1))
        phase.extra["exit_s"] = round(await stack.call(stack.stop_gateway), 2)
        exited = True
        phase.extra["readyz_during_drain"] = await ready
        await phase.traffic.wait_idle(timeout_s=timing.request_timeout_s)
        phase.cut_streams(signalled)
        began = time.monotonic()
        await stack.call(stack.start_gateway)
        phase.traffic.release()
        phase.recovered(began, await phase.traffic.wait_success_after(began, timeout_s=timing.recovery_timeout_s))
        phase.notes.append(f"exit {phase.extra['exit_s']} s after SIGTERM (drain setting {stack.drain_s} s); "
                           f"/readyz during the drain: {phase.extra['readyz_during_drain']}")

    workload = replace(world.workload, stream_tokens=3000)
    return await _Phase("gateway SIGTERM with streams open, then started again", stack, world, timing,
                        workload=workload).run(body)


async def phase_s3_restart(stack: FaultStack, world: World, timing: Timing) -> PhaseResult:
    """SIGKILL the S3 server; start it again empty (moto keeps objects in memory only, so only recovery is
    checked, not the stored files). Recovery: from the restart to the first adapter upload answered and served."""
    async def body(phase: _Phase) -> None:
        await stack.call(stack.kill, "s3")
        await asyncio.sleep(timing.outage_s)
        async with world.admin(timeout_s=timing.request_timeout_s) as admin:
            during = await _admin_outcome("upload", upload(admin, world.traffic_tenant, "during", world.next_adapter()))
            phase.traffic.outcomes.append(during)
            phase.extra["upload_while_down"] = during.detail
            await stack.call(stack.restart_s3)
            back = time.monotonic()
            deadline = back + timing.recovery_timeout_s
            while time.monotonic() < deadline:
                uploaded = await _admin_outcome("upload", upload(admin, world.traffic_tenant, "after",
                                                                 world.next_adapter()))
                phase.traffic.outcomes.append(uploaded)
                if uploaded.result is Result.ANSWERED and await _serve_uploaded(phase, world, timing, adapter="after",
                                                                                since=back):
                    break
                await asyncio.sleep(0.5)
        phase.notes.append(f"upload while S3 was down: {phase.extra['upload_while_down']}; moto restarts empty: "
                           "stored files not checked, adapters the engine held kept serving")

    return await _Phase("S3 killed (SIGKILL) and restarted empty", stack, world, timing, serve=False).run(body)


async def _hang_up_stream(client: httpx.AsyncClient, body: dict[str, Any], *, events: int) -> int:
    """Read ``events`` data events of a stream, then close it; the tokens the last one said were served."""
    tokens = 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        seen = 0
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                parsed = _parse(line[len("data: "):])
                tokens = (_tokens(parsed.get("usage")) if isinstance(parsed, dict) else 0) or tokens
                seen += 1
                if seen >= events:
                    break
    return tokens


async def _hang_up_json(client: httpx.AsyncClient, body: dict[str, Any], *, after_s: float) -> None:
    """Send a JSON request and leave before its answer."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(client.post("/v1/completions", json=body), timeout=after_s)


def _half_a_body(url: str, key: str) -> None:
    """Send the headers and part of a JSON body (``Content-Length`` promises more), then close the socket."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80), timeout=5) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {key}\r\nContent-Length: 4000\r\n\r\n".encode()
                     + b'{"model": "banyan-demo", "messages": [{"role": "us')
        time.sleep(0.2)


async def phase_disconnects(stack: FaultStack, world: World, timing: Timing, *, rounds: int = 3) -> PhaseResult:
    """Under traffic, the leaving tenant's clients hang up: streams after a few events, JSON requests before the
    answer (long ones: the engine must drop them), bodies half sent. Then: the engine runs nothing of theirs,
    the tenant's two concurrency slots are free, and its recorded usage covers what its readers were shown."""
    leaver = world.leaver_tenant
    stream_body = {"model": world.workload.base_model, "messages": [{"role": "user", "content": PROMPT}],
                   "max_tokens": 400, "ignore_eos": True, "stream": True,
                   "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    json_body = {"model": world.workload.base_model, "prompt": PROMPT, "max_tokens": 3000, "ignore_eos": True}

    async def body(phase: _Phase) -> None:
        _, before = await usage_tokens(world, leaver, settle_s=0)
        shown = 0
        async with world.tenant(leaver, timeout_s=timing.request_timeout_s) as client:
            for _ in range(rounds):
                shown += await _hang_up_stream(client, stream_body, events=5)
                await _hang_up_json(client, json_body, after_s=1.0)
                await asyncio.to_thread(_half_a_body, world.url, world.keys[leaver])
        left = time.monotonic()
        phase.traffic.hold()
        await phase.traffic.wait_idle(timeout_s=timing.request_timeout_s)
        running = await _engine_idle(stack, timeout_s=15.0)
        phase.extra["engine_idle_after_s"] = None if running is None else round(running - left, 2)
        async with world.tenant(leaver, timeout_s=timing.request_timeout_s) as client:
            pair = await asyncio.gather(*(send(client, "json", "/v1/completions",
                                               {"model": world.workload.base_model, "prompt": PROMPT,
                                                "max_tokens": 4}, timeout_s=timing.request_timeout_s)
                                          for _ in range(2)))
        phase.extra["slots_free_after"] = [o.detail for o in pair]
        _, after = await usage_tokens(world, leaver)
        phase.extra["leaver_tokens_shown"] = shown
        phase.extra["leaver_tokens_recorded"] = after - before - sum(o.tokens for o in pair)
        phase.traffic.release()
        phase.notes.append(f"{rounds} streams, {rounds} JSON waits and {rounds} half-sent bodies hung up on purpose; "
                           f"engine idle {phase.extra['engine_idle_after_s']} s after; two requests at once "
                           f"afterwards: {phase.extra['slots_free_after']}; leaving tenant's usage "
                           f"{phase.extra['leaver_tokens_recorded']} tokens recorded for {shown} shown")

    return await _Phase("clients hang up mid-stream and mid-JSON", stack, world, timing).run(body)


async def _engine_idle(stack: FaultStack, *, timeout_s: float) -> float | None:
    """When the engine had nothing running or waiting (None: not within ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        busy = await asyncio.to_thread(lambda: stack.engine_metric("vllm:num_requests_running")
                                       + stack.engine_metric("vllm:num_requests_waiting"))
        if busy == 0:
            return time.monotonic()
        await asyncio.sleep(0.2)
    return None


PHASES: dict[str, Callable[[FaultStack, World, Timing], Awaitable[PhaseResult]]] = {
    "disconnects": phase_disconnects,
    "valkey": phase_valkey,
    "s3-hung": phase_s3_hung,
    "engine": phase_engine,
    "gateway-sigterm": phase_gateway_sigterm,
    "s3-restart": phase_s3_restart,
}
"""Every fault, in the order they can run on one stack (the S3 restart loses the stored files: last)."""


def _counts(details: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in details.items()) or "0"


def table(results: list[PhaseResult]) -> str:
    """A Markdown table: fault, requests, answered, clean errors, anything else, recovery time, usage."""
    lines = ["| fault | requests | answered | clean errors | anything else | recovery: first answer (s) | all answered "
             "from (s) | not answered after the first answer | usage recorded / served (tokens) | stored state lost |",
             "|---|---:|---:|---:|---:|---:|---:|---|---:|---|"]
    for r in results:
        other = r.count(Result.OTHER)
        other_text = f"{other} ({_counts(r.details(Result.OTHER))})" if other else "0"
        recovery = "-" if r.recovery_s is None else f"{r.recovery_s:.1f}"
        steady = "-" if r.steady_s is None else f"{r.steady_s:.1f}"
        lines.append(f"| {r.fault} | {len(r.outcomes)} | {r.count(Result.ANSWERED)} | {r.count(Result.CLEAN_ERROR)} "
                     f"| {other_text} | {recovery} | {steady} | {_counts(r.failed_after_recovery())} | "
                     f"{r.tokens_recorded} / {r.tokens_seen} | "
                     f"{'; '.join(r.lost) or 'nothing'} |")
    return "\n".join(lines)
