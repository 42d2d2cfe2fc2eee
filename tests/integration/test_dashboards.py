"""The Grafana dashboards in ``deploy/grafana/dashboards`` work against a real stack.

A real Prometheus (Debian's ``prometheus``, installed here when missing) scrapes the session stack's
gateway, engine and training worker every second while light traffic runs through the gateway: a tenant, adapter
uploads (enough to make the engine's disk cache evict), chat and completions with and without
streaming, rag requests, documents, ``/v1/retrieve``, a fine-tuning job, 401s, 404s, 429s (a tenant limited to
one request per minute) and an engine refusal. The traffic
runs in two rounds with scrapes between them, so that every counter has moved inside the rate
window. Then every query of every panel (Grafana variables substituted the way Grafana does) is
evaluated through Prometheus' HTTP API and must return a finite value (a rate: above 0, unless it is
one the traffic must not cause), and every metric a dashboard names must be exposed by the gateway or
the engine or the trainer.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.dev.demo_model import build_adapter
from gateway.dev.processes import free_port
from tests.integration.conftest import RunningStack, TenantHandle, make_tenant, upload

DASHBOARDS = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards"
RATE_WINDOW = "10m"  # what `$__rate_interval` becomes: holds both traffic rounds (Prometheus is new)
BUILTINS = {"__rate_interval": RATE_WINDOW, "__interval": "15s", "__range": RATE_WINDOW}
_VAR_RE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")
_METRIC_RE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{")
_LABEL_VALUES_RE = re.compile(r"^label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*,\s*(\w+)\s*\)$")


# -- the dashboards, read at collection time -----------------------------------------------------------


@dataclass(frozen=True)
class Target:
    dashboard: str
    panel: str
    ref: str
    expr: str


def _dashboards() -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(DASHBOARDS.glob("*.json"))}


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row holds its panels


def _targets() -> list[Target]:
    return [Target(name, panel["title"], t["refId"], t["expr"])
            for name, dashboard in _dashboards().items() for panel in _panels(dashboard)
            for t in panel.get("targets", [])]


def _query_variables(dashboard: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Query variables: name -> (metric, label) of their ``label_values(metric, label)``."""
    out: dict[str, tuple[str, str]] = {}
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        match = _LABEL_VALUES_RE.match(query.strip())
        assert match, f"variable {variable['name']}: unsupported query {query!r}"
        out[variable["name"]] = (match[1], match[2])
    return out


def _named_metrics() -> set[str]:
    names = {m for t in _targets() for m in _METRIC_RE.findall(t.expr)}
    names |= {metric for d in _dashboards().values() for metric, _ in _query_variables(d).values()}
    return names


# -- Prometheus ------------------------------------------------------------------------------------------


def _install_prometheus() -> str:
    """Debian's prometheus, installed quietly when it is missing (CI runs as root)."""
    found = shutil.which("prometheus") or ("/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None)
    if found:
        return found
    if os.geteuid() != 0:
        pytest.fail("prometheus is not installed and this is not root: run `sudo apt-get install -y prometheus`")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "NEEDRESTART_MODE": "a"}
    lock = ["-o", "DPkg::Lock::Timeout=300"]
    steps = [["apt-get", *lock, "update", "-qq"],
             ["apt-get", *lock, "install", "-y", "-qq", "--no-install-recommends", "prometheus"]]
    log = ""
    for attempt in range(3):
        try:
            for step in steps:
                done = subprocess.run(step, env=env, capture_output=True, text=True, timeout=900, check=False)
                log += f"$ {' '.join(step)}\n{done.stdout[-2000:]}{done.stderr[-2000:]}\n"
                if done.returncode != 0:
                    raise RuntimeError(f"{step[0]} exited with {done.returncode}")
            break
        except (RuntimeError, subprocess.TimeoutExpired):
            time.sleep(5 * (attempt + 1))
    found = shutil.which("prometheus") or ("/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None)
    if not found:
        pytest.fail(f"installing Debian's prometheus failed:\n{log[-4000:]}")
    return found


@dataclass
class Prometheus:
    url: str
    client: httpx.Client

    def query(self, expr: str) -> list[dict[str, Any]]:
        response = self.client.get("/api/v1/query", params={"query": expr})
        body = response.json()
        assert response.status_code == 200 and body.get("status") == "success", f"{expr}\n-> {response.text}"
        assert body["data"]["resultType"] == "vector", body["data"]["resultType"]
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def label_values(self, label: str, metric: str) -> list[str]:
        response = self.client.get(f"/api/v1/label/{label}/values", params={"match[]": metric})
        response.raise_for_status()
        values: list[str] = response.json()["data"]
        return values

    def wait_for_scrapes_after(self, moment: float, *, jobs: int = 3, timeout: float = 60) -> None:
        """Until every job has been scraped (successfully) after ``moment`` (a Unix time)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = self.query("timestamp(up == 1)")
            if len(result) >= jobs and all(float(r["value"][1]) > moment for r in result):
                return
            time.sleep(0.5)
        raise AssertionError(f"Prometheus did not scrape every target after {moment}: {self.query('up')}")


def _prometheus_config(stack: RunningStack) -> str:
    gateway = stack.url.removeprefix("http://")
    engine = stack.info["engine_url"].removeprefix("http://")
    trainer = stack.info["trainer_metrics_url"].removeprefix("http://").removesuffix("/metrics")
    return (
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n"
        f"  - job_name: banyan-gateway\n    static_configs:\n      - targets: ['{gateway}']\n"
        f"  - job_name: vllm\n    static_configs:\n      - targets: ['{engine}']\n"
        f"  - job_name: banyan-trainer\n    static_configs:\n      - targets: ['{trainer}']\n"
    )


@pytest.fixture(scope="module")
def prometheus(stack: RunningStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    binary = _install_prometheus()
    root = tmp_path_factory.mktemp("prometheus")
    (root / "prometheus.yml").write_text(_prometheus_config(stack))
    port = free_port()
    log = (root / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [binary, f"--config.file={root / 'prometheus.yml'}", f"--storage.tsdb.path={root / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            deadline = time.monotonic() + 60
            while True:
                assert process.poll() is None, (root / "prometheus.log").read_text()[-3000:]
                try:
                    if client.get("/-/ready").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "prometheus did not become ready"
                time.sleep(0.2)
            yield Prometheus(url=url, client=client)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        log.close()


# -- traffic ---------------------------------------------------------------------------------------------


@dataclass
class Traffic:
    stack: RunningStack
    admin: httpx.Client
    tenant: TenantHandle
    limited: TenantHandle  # a tenant with a limit of one request per minute
    adapter: Path
    filler: Path
    fillers: int = 0

    def round(self, number: int, *, fill: int) -> None:
        """One round of the traffic every panel needs."""
        base = self.stack.info["base_model"]
        admin = self.admin
        name = f"dash-{number}"
        self.fine_tune(number)
        assert upload(admin, self.tenant.id, name, self.adapter).status_code == 201
        with self.tenant.http() as http:
            for model in (name, base):
                for stream in (False, True):
                    chat = {"model": model, "messages": [{"role": "user", "content": f"Hello {number}"}],
                            "max_tokens": 8, "stream": stream, "stream_options": {"include_usage": True}}
                    if not stream:
                        chat.pop("stream_options")
                    response = http.post("/v1/chat/completions", json=chat)
                    assert response.status_code == 200, response.text
                    completion = {**chat, "prompt": "Once upon a time"}
                    completion.pop("messages")
                    response = http.post("/v1/completions", json=completion)
                    assert response.status_code == 200, response.text
            for i in range(2):
                response = http.post("/v1/documents", json={
                    "title": f"note {number}.{i}", "text": f"Round {number}: the office opens at {8 + i} am; "
                    "parking is in the rear lot and badges are at the front desk."})
                assert response.status_code == 201, response.text
            response = http.post("/v1/retrieve", json={"query": "when does the office open", "top_k": 3})
            assert response.status_code == 200 and response.json()["data"], response.text
            for stream in (False, True):
                response = http.post("/v1/chat/completions", json={
                    "model": name, "messages": [{"role": "user", "content": "Where do I park?"}],
                    "max_tokens": 8, "stream": stream, "rag": {"top_k": 2}})
                assert response.status_code == 200, response.text
            response = http.post("/v1/completions", json={"model": base, "prompt": "x" * 5000, "max_tokens": 4})
            assert response.status_code == 400, response.text  # refused by the engine: too long
            response = http.post("/v1/chat/completions", json={
                "model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]})
            assert response.status_code == 404, response.text
        response = httpx.post(self.stack.url + "/v1/chat/completions", headers={"Authorization": "Bearer bk_nope"},
                              json={"model": base, "messages": [{"role": "user", "content": "hi"}]}, timeout=30)
        assert response.status_code == 401
        with self.limited.http() as http:  # 3 requests: two may fall in two different minutes, never three
            statuses: list[int] = []
            while 429 not in statuses and len(statuses) < 3:
                statuses.append(http.post("/v1/completions", json={"model": base, "prompt": "hi",
                                                                   "max_tokens": 2}).status_code)
        assert 429 in statuses, statuses
        for _ in range(fill):  # versions the engine fetches (prefetch on activate) until its disk cache evicts
            self.fillers += 1
            assert upload(admin, self.tenant.id, f"fill-{self.fillers}", self.filler).status_code == 201
        assert admin.delete(f"/admin/tenants/{self.tenant.id}/adapters/{name}").status_code == 200


    def fine_tune(self, number: int) -> None:
        """A small fine-tuning job run to its end by the stack's trainer (its metrics and the jobs gauge move)."""
        client = self.tenant.client()
        lines = "".join(json.dumps({"messages": [{"role": "user", "content": f"Round {number}, question {i}?"},
                                                 {"role": "assistant", "content": f"Answer {i}."}]}) + "\n"
                        for i in range(4))
        uploaded = client.files.create(file=("dash.jsonl", lines.encode()), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model=self.stack.info["base_model"], training_file=uploaded.id,
                                             suffix=f"dash-ft-{number}", hyperparameters={"n_epochs": 2})
        deadline = time.monotonic() + 600
        while (job := client.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
            assert time.monotonic() < deadline, f"fine-tuning job still {job.status}"
            time.sleep(0.5)
        assert job.status == "succeeded", job.error


def _fill_count(stack: RunningStack, filler: Path) -> int:
    """Uploads of ``filler`` that overflow the engine's adapter disk cache (the session stack bounds it)."""
    size = sum(f.stat().st_size for f in filler.iterdir() if f.is_file())
    room = (stack.engine_metric("banyan_resolver_disk_cache_max_bytes")
            - stack.engine_metric("banyan_resolver_disk_cache_bytes"))
    needed = max(0, math.ceil(room / size)) + 4
    assert needed <= 200, f"the engine's disk cache is too large to fill in a test ({room} bytes free)"
    return needed


def _wait_idle(stack: RunningStack, *, timeout: float = 60) -> None:
    """Until the engine has no request running or waiting (background warm-ups included)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy = stack.engine_metric("vllm:num_requests_running") + stack.engine_metric("vllm:num_requests_waiting")
        if busy == 0:
            return
        time.sleep(0.5)


@pytest.fixture(scope="module")
def loaded(stack: RunningStack, admin: httpx.Client, peft_adapters: dict[str, Path], prometheus: Prometheus,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    """Prometheus, after two rounds of traffic each followed by scrapes of every target."""
    filler = build_adapter(stack.model_path, tmp_path_factory.mktemp("filler") / "big", seed=77, rank=16)
    tenant = make_tenant(stack, admin, prefix="dash")
    limited = make_tenant(stack, admin, prefix="dash-rpm")
    assert admin.patch(f"/admin/tenants/{limited.id}", json={"rpm": 1}).status_code == 200
    traffic = Traffic(stack=stack, admin=admin, tenant=tenant, limited=limited, adapter=peft_adapters["alpha"],
                      filler=filler)
    try:
        prometheus.wait_for_scrapes_after(time.time())  # the counters' values before the traffic
        traffic.round(1, fill=_fill_count(stack, filler))
        _wait_idle(stack)
        prometheus.wait_for_scrapes_after(time.time())
        traffic.round(2, fill=6)
        _wait_idle(stack)
        prometheus.wait_for_scrapes_after(time.time())
        time.sleep(1.5)
        prometheus.wait_for_scrapes_after(time.time())
        yield prometheus
    finally:
        admin.delete(f"/admin/tenants/{tenant.id}")
        admin.delete(f"/admin/tenants/{limited.id}")


# -- the tests -------------------------------------------------------------------------------------------


def _substitute(expr: str, dashboard: dict[str, Any], prometheus: Prometheus) -> str:
    """The query Grafana sends with every variable at "All" (Grafana's regex of the variable's values)."""
    values: dict[str, str] = dict(BUILTINS)
    for name, (metric, label) in _query_variables(dashboard).items():
        found = prometheus.label_values(label, metric)
        assert found, f"variable ${name}: label_values({metric}, {label}) is empty"
        # Escaped as Grafana does: a regex inside a PromQL string literal (backslashes doubled).
        values[name] = "(" + "|".join(re.escape(v).replace("\\", "\\\\") for v in found) + ")"

    def replace(match: re.Match[str]) -> str:
        name = match[1] or match[2]
        assert name in values, f"unknown variable ${name} in {expr}"
        return values[name]

    return _VAR_RE.sub(replace, expr)


def _finite(sample: dict[str, Any]) -> bool:
    return math.isfinite(float(sample["value"][1]))


# Rates that may rightly stay at 0 after the traffic: what it does not, and should not, cause.
MAY_STAY_ZERO = {("engine", "Preemptions/s"),  # light traffic never fills the KV cache
                 ("gateway", "GC collections/s")}  # at the gateway's young threshold, light traffic may collect nothing


def _is_rate(expr: str) -> bool:
    return ("rate(" in expr or "increase(" in expr) and "histogram_quantile" not in expr


@pytest.mark.parametrize("target", _targets(), ids=lambda t: f"{t.dashboard}:{t.panel}:{t.ref}")
def test_every_panel_query_returns_data(target: Target, loaded: Prometheus) -> None:
    dashboard = _dashboards()[target.dashboard]
    expr = _substitute(target.expr, dashboard, loaded)
    result = loaded.query(expr)
    assert result, f"no data for {target.panel!r} ({target.dashboard}): {expr}"
    assert any(_finite(s) for s in result), f"only NaN/Inf for {target.panel!r}: {expr} -> {result}"
    if _is_rate(target.expr) and (target.dashboard, target.panel) not in MAY_STAY_ZERO:
        assert any(_finite(s) and float(s["value"][1]) > 0 for s in result), \
            f"the traffic never moved {target.panel!r} ({target.dashboard}): {expr} -> {result}"


def test_dashboards_and_panels_exist() -> None:
    assert {"gateway", "adapters", "retrieval", "engine"} <= set(_dashboards())
    assert len(_targets()) >= 40


def test_every_metric_a_dashboard_names_is_exposed(loaded: Prometheus, stack: RunningStack) -> None:
    exposed: set[str] = set()
    for url in (stack.url + "/metrics", stack.info["engine_url"] + "/metrics", stack.info["trainer_metrics_url"]):
        for line in httpx.get(url, timeout=30).text.splitlines():
            if line.startswith("# TYPE "):
                exposed.add(line.split()[2])
            elif line and not line.startswith("#"):
                exposed.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    named = _named_metrics()
    assert any(n.startswith("banyan_") for n in named) and any(n.startswith("vllm:") for n in named)
    missing = sorted(named - exposed)
    assert not missing, f"dashboards name metrics that no gateway, engine or trainer exposes: {missing}"
    for target in _targets():
        assert _METRIC_RE.search(target.expr), f"{target.panel}: no metric in {target.expr}"


def test_prometheus_scraped_every_target(loaded: Prometheus) -> None:
    jobs = {r["metric"]["job"]: r["value"][1] for r in loaded.query("up")}
    assert jobs == {"banyan-gateway": "1", "vllm": "1", "banyan-trainer": "1"}
