"""What the load scripts share about a local stack: where ``banyan dev`` keeps the demo model, and its Prometheus
text. The stack itself is started, awaited and stopped by :mod:`gateway.dev.launcher` (the integration tests use
the same launcher)."""

from __future__ import annotations

from pathlib import Path

import httpx

BASE_MODEL = "banyan-demo"


def model_dir(data_dir: Path) -> Path:
    """Where ``banyan dev`` keeps (and reuses) the demo base model under ``data_dir``."""
    return data_dir / "models" / BASE_MODEL


Sample = tuple[str, dict[str, str], float]


def parse_metrics(text: str) -> list[Sample]:
    """Every sample of a Prometheus text exposition as ``(name, labels, value)``."""
    from prometheus_client.parser import text_string_to_metric_families

    return [(s.name, dict(s.labels), float(s.value))
            for family in text_string_to_metric_families(text) for s in family.samples]


def metric_sum(samples: list[Sample], name: str, **labels: str) -> float:
    """The sum of one metric's samples whose labels include ``labels``."""
    return sum(value for n, lab, value in samples
               if n == name and all(lab.get(k) == v for k, v in labels.items()))


def metric_by_label(samples: list[Sample], name: str, label: str) -> dict[str, float]:
    """One metric's samples summed per value of one label."""
    out: dict[str, float] = {}
    for n, lab, value in samples:
        if n == name:
            out[lab.get(label, "")] = out.get(lab.get(label, ""), 0.0) + value
    return out


def scrape(url: str) -> list[Sample]:
    return parse_metrics(httpx.get(url.rstrip("/") + "/metrics", timeout=30).text)
