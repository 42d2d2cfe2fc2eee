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
from adapters.training.settings import TrainerSettings
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
    """A ``BANYAN_*`` variable that the gateway's, the resolver's or the trainer's settings read."""
    field = name.removeprefix("BANYAN_").lower()
    return name.startswith("BANYAN_") and any(field in s.model_fields for s in (Settings, ResolverSettings,
                                                                                TrainerSettings))


def test_the_deploy_tree_has_every_piece() -> None:
    expected = ["prometheus/prometheus.yml", "grafana/provisioning/datasources/prometheus.yml",
                "grafana/provisioning/dashboards/banyan.yml", "docker-compose.yml", "docker/Dockerfile.gateway",
                "docker/Dockerfile.engine", "docker/Dockerfile.trainer", "k8s/trainer.yaml",
                *(f"grafana/dashboards/{n}.json"
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
    assert {"gateway", "engine", "trainer", "redis", "minio", "prometheus", "grafana"} <= set(services)
    engine = services["engine"]
    assert "ports" not in engine, "the engine must not publish a port"
    assert engine.get("network_mode") != "host"
    assert set(engine["environment"]) >= ENGINE_ENV, ENGINE_ENV - set(engine["environment"])
    assert str(engine["environment"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"]) == "True"
    assert "127.0.0.1" in engine["environment"]["BANYAN_ENGINE_SELF_URL"]
    assert "--enable-lora" in engine["command"]
    assert _tool_calls_enabled(engine["command"])
    devices = engine["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d.get("capabilities", []) for d in devices)
    gateway = services["gateway"]
    assert gateway["environment"]["BANYAN_ENGINE_URLS"] == "http://engine:8000"
    assert gateway["environment"]["BANYAN_HOST"] == "0.0.0.0"
    assert "BANYAN_ADMIN_KEY" in gateway["environment"]
    for service in ("gateway", "engine"):
        build = services[service]["build"]
        assert (DEPLOY / build["context"] / build["dockerfile"]).resolve().is_file(), build


def _tool_calls_enabled(args: list[str]) -> bool:
    """The engine's arguments turn on ``tool_choice: "auto"`` with a parser (vLLM refuses it otherwise)."""
    return "--enable-auto-tool-choice" in args and args[args.index("--tool-call-parser") + 1] == "hermes"


def test_engine_image_and_k8s_engines_parse_tool_calls() -> None:
    text = (DEPLOY / "docker" / "Dockerfile.engine").read_text()
    assert '"--enable-auto-tool-choice", "--tool-call-parser", "hermes"' in text
    docs = [d for p in sorted((DEPLOY / "k8s").glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]
    engine = next(d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "banyan-engine")
    container = next(c for c in engine["spec"]["template"]["spec"]["containers"] if c["name"] == "vllm")
    assert _tool_calls_enabled(container["args"])


def test_compose_settings_are_ones_the_code_reads() -> None:
    services = _compose()["services"]
    for name in ("gateway", "engine", "trainer"):
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
                       ("Service", "banyan-engine"), ("ConfigMap", "banyan-config"), ("Service", "banyan-redis")]:
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
        if container["name"] != "vllm":  # the metrics-proxy sidecar
            continue
        env = {e["name"] for e in container.get("env", [])}
        assert env >= ENGINE_ENV, ENGINE_ENV - env
        assert container["resources"]["limits"].get("nvidia.com/gpu")
    policies = [d for d in docs if d["kind"] == "NetworkPolicy" and
                _engine_selected(d["spec"]["podSelector"].get("matchLabels"))]
    assert policies, "no NetworkPolicy restricts who reaches the engines"


def test_k8s_pods_are_scraped_and_settings_are_known() -> None:
    docs = _k8s()
    for name in ("banyan-gateway", "banyan-engine", "banyan-trainer"):
        workload = next(d for d in docs if d["kind"] in ("Deployment", "StatefulSet") and
                        d["metadata"]["name"] == name)
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/path"] == "/metrics"
    config = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "banyan-config")
    unknown = [k for k in [*config["data"], *_documented_secret_keys()] if not _known_setting(k)]
    assert unknown == ["REDIS_PASSWORD"], unknown  # the one secret that is Redis's, not Banyan's
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


# -- secrets, keys and hygiene (#10 items 8, 9, Low) ------------------------------------------------------


def _documented_secret_keys() -> set[str]:
    """The keys of the Secret ``banyan-secrets`` as kustomization.yaml tells how to create it."""
    text = (DEPLOY / "k8s" / "kustomization.yaml").read_text()
    assert "kubectl -n banyan create secret generic banyan-secrets" in text
    return set(re.findall(r"--from-literal=(\w+)=", text))


def _secret_refs(value: Any) -> list[dict[str, Any]]:
    """Every ``secretKeyRef`` in a Kubernetes object."""
    if isinstance(value, dict):
        return [value["secretKeyRef"]] if "secretKeyRef" in value else [r for v in value.values()
                                                                       for r in _secret_refs(v)]
    if isinstance(value, list):
        return [r for v in value for r in _secret_refs(v)]
    return []


def test_no_secret_value_ships_in_deploy() -> None:
    from gateway.settings import PLACEHOLDER_WORDS

    docs = _k8s()
    assert not [d for d in docs if d["kind"] == "Secret"], "a Secret with values is shipped"
    documented = _documented_secret_keys()
    for ref in _secret_refs(docs):
        assert ref["name"] == "banyan-secrets" and ref["key"] in documented, ref
    for path in [*YAML_FILES, *DEPLOY.rglob("Dockerfile.*")]:
        text = path.read_text().lower()
        assert not [w for w in PLACEHOLDER_WORDS if w in text and w.startswith("change")], path


def test_compose_has_no_default_credentials() -> None:
    text = (DEPLOY / "docker-compose.yml").read_text()
    for name in ("BANYAN_ADMIN_KEY", "BANYAN_ENGINE_API_KEY", "REDIS_PASSWORD", "MINIO_ROOT_USER",
                 "MINIO_ROOT_PASSWORD", "GRAFANA_ADMIN_PASSWORD"):
        uses = re.findall(r"\$\{" + name + r"(:?[-?])?", text)
        assert uses and all(u == ":?" for u in uses), f"{name} must be required (${{{name}:?...}}), not defaulted"
    assert "deploy/.env" in (DEPLOY.parent / ".gitignore").read_text()


def _images() -> list[str]:
    images = [s["image"] for s in _compose()["services"].values() if "image" in s]
    images += [c["image"] for d in _k8s() if d["kind"] in ("Deployment", "StatefulSet")
               for c in d["spec"]["template"]["spec"]["containers"]]
    for dockerfile in DEPLOY.rglob("Dockerfile.*"):
        text = dockerfile.read_text()
        args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.MULTILINE))
        for ref in re.findall(r"^FROM (\S+)", text, re.MULTILINE):
            images.append(args.get(ref.strip("${}"), ref))
    return images


def test_every_image_tag_is_pinned() -> None:
    images = _images()
    assert len(images) >= 10
    for image in images:
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest" and "/" not in tag, image


def test_redis_has_a_password_and_a_memory_bound_without_eviction() -> None:
    compose = _compose()["services"]
    k8s_redis = next(d for d in _k8s() if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "banyan-redis")
    [container] = k8s_redis["spec"]["template"]["spec"]["containers"]
    for args in (compose["redis"]["command"], container["args"]):
        flags = dict(zip(args[1::2], args[2::2], strict=False)) if args[0] == "redis-server" else {}
        assert flags.get("--requirepass", "").strip(), args
        assert flags.get("--maxmemory") and flags.get("--maxmemory-policy") == "noeviction", args
    assert "@redis:6379" in compose["gateway"]["environment"]["BANYAN_REDIS_URL"]  # with the password
    assert "REDISCLI_AUTH" in compose["redis"]["environment"]  # the healthcheck's redis-cli authenticates
    assert "BANYAN_REDIS_URL" in _documented_secret_keys()  # on Kubernetes the URL (and its password) is a secret
    config = next(d for d in _k8s() if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "banyan-config")
    assert "BANYAN_REDIS_URL" not in config["data"]


def test_engines_take_an_api_key_that_the_gateway_holds() -> None:
    compose = _compose()["services"]
    engine_env, gateway_env = compose["engine"]["environment"], compose["gateway"]["environment"]
    assert engine_env["VLLM_API_KEY"] == engine_env["BANYAN_ENGINE_API_KEY"] == gateway_env["BANYAN_ENGINE_API_KEY"]
    engine = next(d for d in _k8s() if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "banyan-engine")
    vllm = next(c for c in engine["spec"]["template"]["spec"]["containers"] if c["name"] == "vllm")
    env = {e["name"]: e.get("valueFrom", {}).get("secretKeyRef", {}).get("key") for e in vllm["env"]}
    assert env["VLLM_API_KEY"] == env["BANYAN_ENGINE_API_KEY"] == "BANYAN_ENGINE_API_KEY"
    assert "BANYAN_ENGINE_API_KEY" in _documented_secret_keys()  # the gateway reads the Secret whole (envFrom)


def test_only_the_gateway_reaches_the_engine_api_and_the_scraper_only_metrics() -> None:
    docs = _k8s()
    [policy] = [d for d in docs if d["kind"] == "NetworkPolicy" and
                _engine_selected(d["spec"]["podSelector"].get("matchLabels"))]
    by_port = {p["port"]: rule["from"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert by_port[8000] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "banyan-gateway"}}}]
    [scraper] = by_port[9100]
    assert "namespaceSelector" in scraper and set(by_port) == {8000, 9100}
    engine = next(d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "banyan-engine")
    assert engine["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == "9100"
    proxy = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "banyan-engine-metrics-proxy")
    conf = proxy["data"]["default.conf"]
    assert "listen 9100" in conf and "location = /metrics" in conf and "location / { return 404; }" in conf


# -- the trainer workers (#14) -------------------------------------------------------------------------------


def _trainer_env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_compose_trainer_trains_on_the_gpu_on_the_engines_model_and_is_private() -> None:
    services = _compose()["services"]
    trainer, engine = services["trainer"], services["engine"]
    assert "ports" not in trainer and trainer.get("network_mode") != "host"
    env = trainer["environment"]
    assert env["BANYAN_REDIS_URL"] == services["gateway"]["environment"]["BANYAN_REDIS_URL"]
    assert env["BANYAN_BASE_MODEL"] == services["gateway"]["environment"]["BANYAN_BASE_MODEL"]
    for name in ("BANYAN_S3_ENDPOINT_URL", "BANYAN_S3_BUCKET", "BANYAN_S3_ACCESS_KEY_ID",
                 "BANYAN_S3_SECRET_ACCESS_KEY"):
        assert env[name] == engine["environment"][name], name
    assert "BANYAN_ADMIN_KEY" not in env and "BANYAN_ENGINE_API_KEY" not in env  # it needs neither
    model_mount = next(v for v in engine["volumes"] if v.endswith(":/models/base:ro"))  # the engine's model folder
    assert model_mount.replace(":/models/base:", f":{env['BANYAN_BASE_MODEL_PATH']}:") in trainer["volumes"]
    assert [str(p) for p in trainer["expose"]] == [env["BANYAN_TRAINER_METRICS_PORT"]]
    devices = trainer["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d.get("capabilities", []) for d in devices)
    build = trainer["build"]
    dockerfile = (DEPLOY / build["context"] / build["dockerfile"]).resolve()
    text = dockerfile.read_text()
    assert re.search(r"^FROM .*VLLM_IMAGE", text, re.MULTILINE)  # torch + transformers as the engine has them
    assert re.search(r"pip install \"peft[^\"]*\" \.", text), "the trainer image installs PEFT and Banyan"
    assert 'ENTRYPOINT ["banyan", "trainer"]' in text and "USER banyan" in text


def test_k8s_trainer_is_a_gpu_deployment_with_only_the_secrets_it_needs() -> None:
    docs = _k8s()
    trainer = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "banyan-trainer")
    pod = trainer["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["resources"]["limits"].get("nvidia.com/gpu")
    assert "envFrom" not in container, "the trainer names the settings and secrets it needs"
    env = _trainer_env(container)
    assert all(_known_setting(k) for k in env if k.startswith("BANYAN_")), env
    secrets = {v["secretKeyRef"]["key"] for v in env.values() if isinstance(v, dict) and "secretKeyRef" in v}
    assert secrets == {"BANYAN_REDIS_URL", "BANYAN_S3_ACCESS_KEY_ID", "BANYAN_S3_SECRET_ACCESS_KEY"}
    annotations = trainer["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == env["BANYAN_TRAINER_METRICS_PORT"] == "9200"
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == env["BANYAN_BASE_MODEL_PATH"])
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert mount["readOnly"] and volume["persistentVolumeClaim"]["claimName"] == "banyan-models"  # the engines'
    assert pod["terminationGracePeriodSeconds"] >= 30 and not pod.get("hostNetwork")
    config = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "banyan-config")
    refs = {v["configMapKeyRef"]["key"] for v in env.values() if isinstance(v, dict) and "configMapKeyRef" in v}
    assert refs <= set(config["data"]), refs - set(config["data"])


def test_trainers_reach_only_redis_the_object_store_and_dns_and_redis_admits_them() -> None:
    docs = _k8s()
    policies = {d["metadata"]["name"]: d for d in docs if d["kind"] == "NetworkPolicy"}
    trainer = next(p for p in policies.values()
                   if p["spec"]["podSelector"]["matchLabels"].get("app.kubernetes.io/name") == "banyan-trainer")
    assert set(trainer["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    [ingress] = trainer["spec"]["ingress"]
    assert [p["port"] for p in ingress["ports"]] == [9200] and "namespaceSelector" in ingress["from"][0]
    egress_ports = {p["port"] for rule in trainer["spec"]["egress"] for p in rule["ports"]}
    assert egress_ports == {6379, 443, 9000, 53}
    to_redis = next(r for r in trainer["spec"]["egress"] if r["ports"][0]["port"] == 6379)
    assert to_redis["to"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "banyan-redis"}}}]
    redis = policies["banyan-redis-private"]
    admitted = {f["podSelector"]["matchLabels"]["app.kubernetes.io/name"] for rule in redis["spec"]["ingress"]
                for f in rule["from"]}
    assert admitted == {"banyan-gateway", "banyan-trainer"}


def test_prometheus_scrapes_the_trainers() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in config["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]}
    port = _compose()["services"]["trainer"]["environment"]["BANYAN_TRAINER_METRICS_PORT"]
    assert f"trainer:{port}" in targets


def test_the_adapters_dashboard_has_a_fine_tuning_row() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "adapters.json").read_text())
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert "Fine-tuning" in rows
    exprs = " ".join(t["expr"] for p in _panels(dashboard) for t in p.get("targets", []))
    for metric in ("banyan_fine_tuning_jobs", "banyan_trainer_jobs_total", "banyan_trainer_tokens_total",
                   "banyan_trainer_job_duration_seconds_bucket", "banyan_trainer_steps_total", "banyan_trainer_busy"):
        assert metric + "{" in exprs, metric
