"""The deployment files in ``deploy/`` parse, hang together and keep the engines private.

Docker and a cluster are not available to the tests, so compose, Kubernetes, Prometheus and Grafana
files are checked by parsing them: every file loads, the services and kinds a deployment needs are
there, settings use names the code reads, and nothing exposes an engine.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from adapters.resolver import ResolverSettings
from gateway.settings import Settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
YAML_FILES = sorted([*DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml")])
JSON_FILES = sorted(DEPLOY.rglob("*.json"))
DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
ENGINE_ENV = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING", "BANYAN_S3_ENDPOINT_URL", "BANYAN_S3_BUCKET",
              "BANYAN_S3_ACCESS_KEY_ID", "BANYAN_S3_SECRET_ACCESS_KEY", "BANYAN_LORA_CACHE_DIR",
              "BANYAN_LORA_CACHE_MAX_BYTES", "BANYAN_ENGINE_SELF_URL"}


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _k8s() -> list[dict[str, Any]]:
    """The Kubernetes objects (the kustomization file is not one)."""
    return [d for p in sorted((DEPLOY / "k8s").glob("*.yaml")) for d in _docs(p)
            if "kind" in d and d["kind"] != "Kustomization"]


def _compose() -> dict[str, Any]:
    compose: dict[str, Any] = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    return compose


def _known_setting(name: str) -> bool:
    """A ``BANYAN_*`` variable that the gateway's or the resolver's settings read."""
    field = name.removeprefix("BANYAN_").lower()
    return name.startswith("BANYAN_") and (field in Settings.model_fields or field in ResolverSettings.model_fields)


def test_the_deploy_tree_has_every_piece() -> None:
    expected = ["prometheus/prometheus.yml", "grafana/provisioning/datasources/prometheus.yml",
                "grafana/provisioning/dashboards/banyan.yml", "docker-compose.yml", "docker/Dockerfile.gateway",
                "docker/Dockerfile.engine", *(f"grafana/dashboards/{n}.json"
                                              for n in ("gateway", "adapters", "retrieval", "engine"))]
    missing = [p for p in expected if not (DEPLOY / p).is_file()]
    assert not missing, missing
    assert list((DEPLOY / "k8s").glob("*.yaml"))


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_file_parses(path: Path) -> None:
    assert _docs(path), f"{path} is empty"


@pytest.mark.parametrize("path", JSON_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_json_file_parses(path: Path) -> None:
    assert isinstance(json.loads(path.read_text()), dict)


def test_compose_has_the_services_and_keeps_the_engine_private() -> None:
    services = _compose()["services"]
    assert {"gateway", "engine", "redis", "minio", "prometheus", "grafana"} <= set(services)
    engine = services["engine"]
    assert "ports" not in engine, "the engine must not publish a port"
    assert engine.get("network_mode") != "host"
    assert set(engine["environment"]) >= ENGINE_ENV, ENGINE_ENV - set(engine["environment"])
    assert str(engine["environment"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"]) == "True"
    assert "127.0.0.1" in engine["environment"]["BANYAN_ENGINE_SELF_URL"]
    assert "--enable-lora" in engine["command"]
    devices = engine["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d.get("capabilities", []) for d in devices)
    gateway = services["gateway"]
    assert gateway["environment"]["BANYAN_ENGINE_URLS"] == "http://engine:8000"
    assert gateway["environment"]["BANYAN_HOST"] == "0.0.0.0"
    assert "BANYAN_ADMIN_KEY" in gateway["environment"]
    for service in ("gateway", "engine"):
        build = services[service]["build"]
        assert (DEPLOY / build["context"] / build["dockerfile"]).resolve().is_file(), build


def test_compose_settings_are_ones_the_code_reads() -> None:
    services = _compose()["services"]
    for name in ("gateway", "engine"):
        unknown = [k for k in services[name]["environment"] if k.startswith("BANYAN_") and not _known_setting(k)]
        assert not unknown, f"{name}: {unknown}"


def test_compose_mounts_files_that_exist() -> None:
    services = _compose()["services"]
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), f"{name} mounts {source}, which is missing"


def test_engine_image_installs_vllm_and_banyan() -> None:
    text = (DEPLOY / "docker" / "Dockerfile.engine").read_text()
    assert re.search(r"^FROM .*vllm", text, re.MULTILINE | re.IGNORECASE)
    assert "pip install ." in text
    assert "vllm.general_plugins" in text  # the build checks the resolver's entry point is registered
    gateway = "\n".join(line for line in (DEPLOY / "docker" / "Dockerfile.gateway").read_text().splitlines()
                        if not line.lstrip().startswith("#"))
    assert '["banyan", "serve"]' in gateway
    assert "vllm" not in gateway.lower(), "the gateway never needs vLLM"


def test_k8s_has_the_kinds_and_the_gateway_scales() -> None:
    docs = _k8s()
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for kind, name in [("Deployment", "banyan-gateway"), ("Service", "banyan-gateway"),
                       ("HorizontalPodAutoscaler", "banyan-gateway"), ("StatefulSet", "banyan-engine"),
                       ("Service", "banyan-engine"), ("ConfigMap", "banyan-config"), ("Secret", "banyan-secrets"),
                       ("Service", "banyan-redis")]:
        assert (kind, name) in kinds, f"missing {kind}/{name}"
    hpa = next(d for d in docs if d["kind"] == "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "banyan-gateway"}
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    present = {p.name for p in (DEPLOY / "k8s").glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


def _engine_selected(selector: dict[str, Any] | None) -> bool:
    return bool(selector) and (selector or {}).get("app.kubernetes.io/name") == "banyan-engine"


def test_k8s_engines_are_private() -> None:
    docs = _k8s()
    engine_services = [d for d in docs if d["kind"] == "Service" and _engine_selected(d["spec"].get("selector"))]
    assert engine_services
    for service in engine_services:
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
        assert service["spec"].get("clusterIP") == "None", "the engines' Service is headless"
        assert "externalIPs" not in service["spec"]
    for doc in docs:
        if doc["kind"] == "Service" and doc["spec"].get("type") in ("LoadBalancer", "NodePort"):
            assert not _engine_selected(doc["spec"].get("selector")), "an engine is exposed"
        if doc["kind"] == "Ingress":
            assert "banyan-engine" not in json.dumps(doc), "an Ingress routes to an engine"
    engine = next(d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "banyan-engine")
    pod = engine["spec"]["template"]["spec"]
    assert not pod.get("hostNetwork")
    for container in pod["containers"]:
        assert all("hostPort" not in p for p in container.get("ports", []))
        env = {e["name"] for e in container.get("env", [])}
        assert env >= ENGINE_ENV, ENGINE_ENV - env
        assert container["resources"]["limits"].get("nvidia.com/gpu")
    policies = [d for d in docs if d["kind"] == "NetworkPolicy" and
                _engine_selected(d["spec"]["podSelector"].get("matchLabels"))]
    assert policies, "no NetworkPolicy restricts who reaches the engines"


def test_k8s_pods_are_scraped_and_settings_are_known() -> None:
    docs = _k8s()
    for name in ("banyan-gateway", "banyan-engine"):
        workload = next(d for d in docs if d["kind"] in ("Deployment", "StatefulSet") and
                        d["metadata"]["name"] == name)
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/path"] == "/metrics"
    config = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "banyan-config")
    secret = next(d for d in docs if d["kind"] == "Secret")
    unknown = [k for k in [*config["data"], *secret["stringData"]] if not _known_setting(k)]
    assert not unknown, unknown
    urls = config["data"]["BANYAN_ENGINE_URLS"].split(",")
    engine = next(d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "banyan-engine")
    assert len(urls) == engine["spec"]["replicas"], "one engine URL per engine replica"


def test_prometheus_scrapes_the_gateway_and_the_engines() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in config["scrape_configs"] for sc in job.get("static_configs", [])
               for t in sc["targets"]}
    assert {"gateway:8000", "engine:8000"} <= targets
    compose = _compose()["services"]
    assert {"gateway", "engine"} <= set(compose)


def test_grafana_provisioning_points_at_the_dashboards() -> None:
    datasources = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert any(d["type"] == "prometheus" for d in datasources["datasources"])
    providers = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/banyan.yml").read_text())
    path = providers["providers"][0]["options"]["path"]
    mounts = _compose()["services"]["grafana"]["volumes"]
    assert any(m.startswith("./grafana/dashboards:") and m.split(":")[1] == path for m in mounts)


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboards_are_grafana_json_with_promql_targets(path: Path) -> None:
    dashboard = json.loads(path.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = [p for p in _panels(dashboard) if p["type"] != "row"]
    assert panels
    ids = [p["id"] for p in _panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], f"{panel['title']} has no query"
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"])
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target["datasource"]["uid"] == "${datasource}"
            used = set(re.findall(r"\$\{?(\w+)", target["expr"])) - {"__rate_interval", "__interval", "__range"}
            assert used <= set(variables), f"{panel['title']}: undefined variables {used - set(variables)}"


def test_dashboard_uids_are_unique() -> None:
    uids = [json.loads(p.read_text())["uid"] for p in DASHBOARDS]
    assert len(uids) == len(set(uids)) == 4
