"""Every Prometheus metric of a ``banyan trainer`` worker, declared in one place.

Units are in the names, buckets are explicit, the one label (``result``) has a fixed set of values. Jobs by
status across all workers are the gateway's gauge (``banyan_fine_tuning_jobs``); these say what each worker did.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

JOB_SECONDS_BUCKETS = (10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0, 14400.0, 43200.0)
RESULTS = ("succeeded", "failed", "cancelled", "deleted", "lost", "abandoned")
"""How a worker is done with a job: finished it (succeeded, failed), saw it cancelled or deleted (its tenant was),
lost its lease to another worker, or left it to be started again after the lease (this worker stopping, or Redis
or the object store failing under it)."""


class TrainerMetrics:
    """A worker's metrics, on a registry of their own (tests build many workers in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.jobs = Counter("banyan_trainer_jobs_total", "Jobs this worker was done with, by result "
                            "(succeeded, failed, cancelled, deleted, lost, abandoned).", ["result"], registry=r)
        for result in RESULTS:
            self.jobs.labels(result)
        self.job_seconds = Histogram("banyan_trainer_job_duration_seconds",
                                     "Wall time of one run of a job on this worker, from its start to its end.",
                                     ["result"], buckets=JOB_SECONDS_BUCKETS, registry=r)
        self.tokens = Counter("banyan_trainer_tokens_total", "Tokens trained on (every batch, padding not counted).",
                              registry=r)
        self.steps = Counter("banyan_trainer_steps_total", "Optimizer steps taken.", registry=r)
        self.busy = Gauge("banyan_trainer_busy", "1 while this worker runs a job, else 0.", registry=r)
