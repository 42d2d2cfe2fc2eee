"""``banyan trainer``: a worker that takes fine-tuning jobs from the queue in Redis and turns each into a new
version of a tenant's adapter.

One job at a time (:meth:`Worker.run`): claim an entry of the queue (:class:`adapters.training.jobs.JobStore`),
start its job, download the training file (and validation file) from the object store, train a LoRA with PEFT
(:func:`adapters.training.lora.train_lora`) in a thread, validate the result exactly as an upload is validated,
decide whether to activate it, and publish it as a new immutable version the way uploads are published
(:func:`adapters.layout.publish_version`, fenced on the tenant being live). Then finish the job and acknowledge
the entry.

While training, the event loop stays free: the training thread reports each step through a thread-safe hand-off
(it never calls Redis itself); the loop writes the step as a ``metrics`` event, checks the job's status (a
``cancelled`` job stops at the next step and publishes nothing) and, every third of the lease, renews the
worker's lease on the entry. A worker that dies stops renewing, and another worker takes the job over once the
lease lapses and runs it again from the start; a worker that finds its lease lost (it stalled) stops without
publishing and leaves the entry alone. SIGTERM/SIGINT stop the worker between jobs; a job in progress is left
(not acknowledged) for another worker to take over after the lease. A second signal exits at once.

Job failures reach the client as a short message with a code (never a traceback; the log has it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from adapters.basemodel import BaseModelSpec
from adapters.errors import AdapterTooLargeError, InvalidAdapterError
from adapters.layout import ADAPTER_FILES, CONFIG_FILE, CommitRefused, object_key, publish_version
from adapters.naming import AdapterRef, new_uid
from adapters.registry import AdapterRegistry, VersionMeta
from adapters.store import ObjectMissing, ObjectStore, S3ObjectStore, StoreError, StoreUnavailable, s3_config
from adapters.training.jobs import (
    Claim,
    Job,
    JobStore,
    fence_from_dict,
    file_key,
    resolve_hyperparameters,
    training_steps,
)
from adapters.training.lora import (
    ChatMessages,
    LoraTrainingConfig,
    NoTrainableTokens,
    TrainingResult,
    TrainingStep,
    TrainingStopped,
    evaluate_loss,
    parse_chat_jsonl,
    train_lora,
)
from adapters.training.metrics import TrainerMetrics
from adapters.training.settings import TrainerSettings
from adapters.validation import validate_adapter_dir

log = logging.getLogger("banyan.trainer")

HOLDOUT_FRACTION = 0.1
"""The share of the training examples held out to compare versions (``if_better`` without a validation file)."""
MESSAGES_PER_JOB = 10
"""About how many progress messages a job's training writes (besides one ``metrics`` event per step)."""
_RETRY_S = (1.0, 2.0, 5.0, 10.0, 30.0)

TrainFn = Callable[..., TrainingResult]
""":func:`adapters.training.lora.train_lora`'s signature (tests wrap it)."""
EvaluateFn = Callable[..., float]


class JobFailed(Exception):
    """A job cannot succeed, for a reason the client is told (``code`` and ``message``, OpenAI's error shape)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _Halted(Exception):
    """The run stopped early, for :attr:`_Run.reason`."""


@dataclass
class _Run:
    """One run of one job on this worker."""

    claim: Claim
    job: Job
    stop: threading.Event = field(default_factory=threading.Event)
    """Set when the run must stop; the training thread checks it between steps."""
    reason: str | None = None
    """Why it stopped: ``cancelled``, ``deleted`` (the job is gone), ``lost`` (another worker has it) or
    ``shutdown`` (this worker is stopping)."""

    def halt(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
        self.stop.set()


def holdout(examples: Sequence[ChatMessages], *, seed: int) -> tuple[list[ChatMessages], list[ChatMessages]]:
    """Split ``examples`` into what is trained on and a held-out comparison set: about a tenth, at least one,
    chosen by ``seed`` (the same job holds out the same examples on every attempt). A single example cannot be
    split: it is both."""
    if len(examples) < 2:
        return list(examples), list(examples)
    count = max(1, round(len(examples) * HOLDOUT_FRACTION))
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[:count])
    return ([e for i, e in enumerate(examples) if i not in held],
            [e for i, e in enumerate(examples) if i in held])


class Worker:
    """One trainer worker: :meth:`run` until :meth:`request_stop`; :meth:`run_once` handles one entry."""

    def __init__(self, settings: TrainerSettings, *, redis: Redis, store: ObjectStore,
                 metrics: TrainerMetrics | None = None, train: TrainFn = train_lora,
                 evaluate: EvaluateFn = evaluate_loss, renew_every_s: float | None = None) -> None:
        """``renew_every_s``: how often the lease is renewed while a job runs (default a third of the lease)."""
        self.settings = settings
        self.name = settings.worker_name
        self.jobs = JobStore(redis)
        self.registry = AdapterRegistry(redis)
        self.store = store
        self.metrics = metrics or TrainerMetrics()
        self.base_paths = settings.bases
        """The base models this worker trains (it claims only their jobs): their folders, and their shapes."""
        self.base_specs = {base: BaseModelSpec.from_path(path) for base, path in self.base_paths.items()}
        self._train = train
        self._evaluate = evaluate
        self._renew_every_s = renew_every_s or settings.trainer_lease_s / 3
        self._stop_requested = False
        self._group_ready = False
        self._run: _Run | None = None

    # -- the loop ------------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Stop between jobs; a job in progress stops at its next step and is left to another worker."""
        self._stop_requested = True
        if self._run is not None:
            self._run.halt("shutdown")

    @property
    def stopping(self) -> bool:
        return self._stop_requested

    async def run(self) -> None:
        """Take jobs until :meth:`request_stop`. Redis or object-store outages are waited out."""
        failures = 0
        while not self._stop_requested:
            try:
                await self.run_once()
                failures = 0
            except (RedisError, OSError, StoreError) as e:
                if self._stop_requested:
                    break
                wait = _RETRY_S[min(failures, len(_RETRY_S) - 1)]
                failures += 1
                self._group_ready = False  # the queue may have been lost with its server (a restart)
                log.warning("the queue is unreachable; retrying", extra={"error": type(e).__name__, "wait_s": wait})
                await asyncio.sleep(wait)

    async def run_once(self, *, block_s: float | None = None) -> bool:
        """Claim one entry (a lapsed one first, else a new one, waiting up to ``block_s``) and handle it; False
        when there was none."""
        if not self._group_ready:
            await self.jobs.ensure_group(list(self.base_paths))
            self._group_ready = True
        claim = await self.jobs.claim(self.name, bases=list(self.base_paths), lease_s=self.settings.trainer_lease_s,
                                      block_s=self.settings.trainer_block_s if block_s is None else block_s)
        if claim is None:
            return False
        await self._handle(claim)
        return True

    async def _handle(self, claim: Claim) -> None:
        job = await self.jobs.start(claim)
        if job is None:  # cancelled, finished or deleted before it started
            await self.jobs.ack(claim)
            return
        run = _Run(claim=claim, job=job)
        self._run = run
        if self._stop_requested:
            run.halt("shutdown")
        self.metrics.busy.set(1)
        began = time.monotonic()
        renewer = asyncio.create_task(self._keep_lease(run))
        outcome, ack = "abandoned", False
        try:
            outcome, ack = await self._outcome(run)
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
            self._run = None
            self.metrics.busy.set(0)
            self.metrics.jobs.labels(outcome).inc()
            self.metrics.job_seconds.labels(outcome).observe(time.monotonic() - began)
        log.info("job done", extra={"job": job.id, "result": outcome, "seconds": round(time.monotonic() - began, 1)})
        if ack:
            await self.jobs.ack(claim)

    async def _outcome(self, run: _Run) -> tuple[str, bool]:
        """Run the job; how it ended and whether its queue entry is done with (acknowledged)."""
        try:
            if await self._execute(run):
                return "succeeded", True
            return await self._halted(run)
        except _Halted:
            return await self._halted(run)
        except (RedisError, StoreUnavailable) as e:
            # Not the job's fault: leave it (unacknowledged) to be started again once the lease lapses.
            log.warning("the queue or the object store failed during a job; it restarts after the lease",
                        extra={"job": run.job.id, "error": type(e).__name__})
            await self._event(run.job, "The job was interrupted (storage unreachable); it restarts after "
                                       f"{self.settings.trainer_lease_s:.0f} s", level="warn")
            return "abandoned", False
        except Exception as e:
            return await self._fail(run, e)

    async def _halted(self, run: _Run) -> tuple[str, bool]:
        job = run.job
        if run.reason == "cancelled":
            await self._event(job, "Job cancelled")
            return "cancelled", True
        if run.reason == "shutdown":
            await self._event(job, f"Worker {self.name} stopped; the job resumes on another worker once its lease "
                                   f"lapses (about {self.settings.trainer_lease_s:.0f} s)", level="warn")
            log.warning("stopping: the job in progress is left to another worker after the lease",
                        extra={"job": job.id, "lease_s": self.settings.trainer_lease_s})
            return "abandoned", False
        if run.reason == "deleted":
            log.info("the job was deleted while it ran", extra={"job": job.id})
            return "deleted", True
        log.warning("lost the job to another worker (the lease lapsed); nothing published", extra={"job": job.id})
        return "lost", False  # the entry is another worker's now: acknowledging it would drop it from the queue

    async def _fail(self, run: _Run, error: Exception) -> tuple[str, bool]:
        job = run.job
        if isinstance(error, JobFailed):
            code, message = error.code, error.message
            log.info("job failed", extra={"job": job.id, "code": code})
        else:
            code, message = "internal_error", "Training failed on the worker because of an internal error."
            log.exception("job failed with an unexpected error", extra={"job": job.id})
        await self._watch_status(run)
        if run.reason is not None:  # cancelled or deleted meanwhile: that is the outcome
            return await self._halted(run)
        await self._event(job, f"Job failed: {message}", level="error")
        if await self.jobs.finish(job.id, self.name, status="failed",
                                  error={"code": code, "message": message, "param": None}):
            return "failed", True
        await self._why_not_running(run)
        return await self._halted(run)

    # -- one job -------------------------------------------------------------------------------------

    async def _execute(self, run: _Run) -> bool:
        """Run the job to its end; True when it succeeded, False when it was no longer this worker's to finish."""
        job, s = run.job, self.settings
        if run.claim.redelivered and job.attempts > s.trainer_max_attempts:
            lost = job.attempts - 1
            raise JobFailed("worker_lost", f"The job's worker was lost {lost} time{'s' if lost != 1 else ''}; it is "
                                           "not started again.")
        await self._event(job, f"Job started on worker {self.name} (attempt {job.attempts})")
        if job.base_model not in self.base_paths:  # only a job queued for the wrong base gets here
            raise JobFailed("invalid_model", f"This worker trains adapters for {', '.join(self.base_paths)}, not "
                                             f"`{job.base_model}`.")
        base_path, base_spec = self.base_paths[job.base_model], self.base_specs[job.base_model]
        if job.rank is not None and not 1 <= job.rank <= s.max_lora_rank:
            raise JobFailed("invalid_rank", f"The rank must be between 1 and {s.max_lora_rank}.")
        with tempfile.TemporaryDirectory(prefix="banyan-train-") as tmp_name:
            tmp = Path(tmp_name)
            training = await self._examples(job, job.training_file, tmp / "training.jsonl", what="training")
            validation = (await self._examples(job, job.validation_file, tmp / "validation.jsonl", what="validation")
                          if job.validation_file else None)
            hp = resolve_hyperparameters(job.hyperparameters, examples=len(training))
            trained_on, compare = training, validation
            if job.activate == "if_better" and validation is None:
                trained_on, compare = holdout(training, seed=job.seed)
            if not await self.jobs.record(job.id, self.name, hyperparameters=hp.as_dict()):
                await self._why_not_running(run)
                raise _Halted
            init = await self._continued_adapter(job, tmp / "continued")
            rank = job.rank or s.trainer_default_rank
            config = LoraTrainingConfig(rank=rank, alpha=2 * rank, target_modules=tuple(base_spec.modules),
                                        learning_rate=hp.learning_rate, steps=training_steps(hp, examples=len(
                                            trained_on)), batch_size=hp.batch_size, max_length=s.trainer_max_length,
                                        seed=job.seed)
            held = (f"; {len(compare)} held out to compare with the active version"
                    if compare is not None and validation is None else "")
            await self._event(job, f"Training on {len(trained_on)} examples{held}: {config.steps} steps "
                                   f"(n_epochs={hp.n_epochs}, batch_size={hp.batch_size}, learning_rate="
                                   f"{hp.learning_rate:g}, rank={self._rank_of(init) or rank})")
            out = tmp / "adapter"
            result = await self._train_in_thread(run, trained_on, out, config=config, init=init, base=base_path)
            await self._check(run)
            info = await self._validate(out, base_spec)
            activate = await self._decide(run, out, compare, tmp / "active", base=base_path)
            await self._check(run)
            version = await self._publish(job, out, info=info, activate=activate)
        state = "activated" if activate else "not activated"
        await self._event(job, f"New version {version} of `{job.adapter}` stored ({state}); the job succeeded")
        if await self.jobs.finish(job.id, self.name, status="succeeded", trained_tokens=result.trained_tokens,
                                  result={"adapter": job.adapter, "version": version, "activated": activate}):
            return True
        # Cancelled (or taken over) in the moment between the last check and the commit: the version stays.
        log.warning("a version was stored but the job could not be finished", extra={"job": job.id,
                                                                                      "version": version})
        await self._why_not_running(run)
        return False

    async def _examples(self, job: Job, file_id: str | None, dest: Path, *, what: str) -> list[ChatMessages]:
        code = f"invalid_{what}_file"
        if not file_id:
            raise JobFailed(code, f"The job names no {what} file.")
        try:
            await self.store.get_file(file_key(job.tenant, file_id), dest)
        except ObjectMissing:
            raise JobFailed(code, f"The {what} file `{file_id}` does not exist (was it deleted?).") from None
        text = await asyncio.to_thread(dest.read_text, encoding="utf-8")
        try:
            return parse_chat_jsonl(text, source=file_id)
        except ValueError as e:
            raise JobFailed(code, f"The {what} file is not valid: {e}") from None

    async def _continued_adapter(self, job: Job, dest: Path) -> Path | None:
        """The files of the version the job continues from (``continue_from``), or None."""
        if not job.continue_from:
            return None
        source = job.continue_from
        ref = AdapterRef(job.tenant, str(source["name"]), int(source["version"]), str(source["uid"]))
        if not await self._download(ref, dest):
            raise JobFailed("invalid_model", f"Version {ref.version} of adapter `{ref.name}` no longer exists.")
        if job.rank is not None and job.rank != self._rank_of(dest):
            await self._event(job, f"Continuing from `{ref.name}` version {ref.version} keeps its rank "
                                   f"{self._rank_of(dest)}; the rank asked ({job.rank}) does not apply", level="warn")
        return dest

    async def _download(self, ref: AdapterRef, dest: Path) -> bool:
        await asyncio.to_thread(dest.mkdir, parents=True, exist_ok=True)
        try:
            for filename in ADAPTER_FILES:
                await self.store.get_file(object_key(ref, filename), dest / filename)
        except ObjectMissing:
            return False
        return True

    @staticmethod
    def _rank_of(adapter: Path | None) -> int | None:
        if adapter is None:
            return None
        rank = json.loads((adapter / CONFIG_FILE).read_text()).get("r")
        return rank if isinstance(rank, int) else None

    async def _train_in_thread(self, run: _Run, examples: list[ChatMessages], out: Path, *,
                               config: LoraTrainingConfig, init: Path | None, base: Path) -> TrainingResult:
        """Train in a thread; meanwhile write each step as an event and stop when the run is halted."""
        loop = asyncio.get_running_loop()
        steps: asyncio.Queue[TrainingStep | None] = asyncio.Queue()

        def progress(step: TrainingStep) -> None:  # in the training thread: hand over, never call Redis
            loop.call_soon_threadsafe(steps.put_nowait, step)
            if run.stop.is_set():
                raise TrainingStopped

        def work() -> TrainingResult:
            try:
                return self._train(base, examples, out, config=config, progress=progress,
                                   init_adapter=init, should_stop=run.stop.is_set,
                                   device=self.settings.trainer_device or None)
            finally:
                loop.call_soon_threadsafe(steps.put_nowait, None)

        training = asyncio.ensure_future(asyncio.to_thread(work))
        every = max(1, config.steps // MESSAGES_PER_JOB)
        try:
            while (step := await steps.get()) is not None:
                await self._on_step(run, step, every=every)
        except BaseException:
            run.stop.set()
            with contextlib.suppress(BaseException):
                await training
            raise
        try:
            result = await training
        except TrainingStopped:
            raise _Halted from None
        except NoTrainableTokens as e:
            raise JobFailed("invalid_training_file", f"Nothing to learn: {e}.") from None
        if run.reason:
            raise _Halted
        self.metrics.tokens.inc(result.trained_tokens)
        return result

    async def _on_step(self, run: _Run, step: TrainingStep, *, every: int) -> None:
        self.metrics.steps.inc()
        job = run.job
        if run.reason is None:
            try:
                await self._watch_status(run)
            except (RedisError, OSError) as e:
                log.warning("could not read the job's status", extra={"job": job.id, "error": type(e).__name__})
        if run.reason == "deleted":
            return  # an event would bring the deleted job's event stream back
        text = f"Step {step.step}/{step.steps}: training loss={step.loss:.4f}"
        await self._event(job, text, kind="metrics", data={"step": step.step, "total_steps": step.steps,
                                                           "train_loss": step.loss})
        if step.step % every == 0 or step.step == step.steps:
            await self._event(job, text)

    async def _watch_status(self, run: _Run) -> None:
        status = await self.jobs.status(run.job.id)
        if status == "cancelled":
            run.halt("cancelled")
        elif status is None:
            run.halt("deleted")
        elif status != "running":
            run.halt("lost")

    async def _why_not_running(self, run: _Run) -> None:
        await self._watch_status(run)
        if run.reason is None:  # running, but another worker's
            run.halt("lost")

    async def _check(self, run: _Run) -> None:
        """Between phases: is the job still running, and still this worker's? :class:`_Halted` if not."""
        if run.reason is None:
            await self._watch_status(run)
        if run.reason is None and not await self.jobs.renew(run.claim):
            run.halt("lost")
        if run.reason is not None:
            raise _Halted

    async def _keep_lease(self, run: _Run) -> None:
        while True:
            await asyncio.sleep(self._renew_every_s)
            try:
                if not await self.jobs.renew(run.claim):
                    run.halt("lost")
                    return
            except (RedisError, OSError) as e:  # Redis away for a moment: try again; the lease may still hold
                log.warning("could not renew the lease", extra={"job": run.job.id, "error": type(e).__name__})

    async def _validate(self, out: Path, spec: BaseModelSpec) -> Any:
        s = self.settings
        try:
            return await asyncio.to_thread(validate_adapter_dir, out, base=spec, max_rank=s.max_lora_rank,
                                           max_bytes=s.max_adapter_bytes)
        except (InvalidAdapterError, AdapterTooLargeError) as e:
            raise JobFailed("invalid_adapter", f"The trained adapter was refused by validation: {e}") from None

    async def _decide(self, run: _Run, out: Path, compare: list[ChatMessages] | None, active_dir: Path, *,
                      base: Path) -> bool:
        """Whether the new version becomes active: ``always``, ``never``, or ``if_better``: when its mean loss
        per assistant token on the comparison set is lower than the active version's (no active version: yes)."""
        job = run.job
        if job.activate != "if_better":
            return job.activate == "always"
        active = await self.registry.active_meta(job.tenant, job.adapter)
        if active is None:
            await self._event(job, f"`{job.adapter}` has no active version: the new version is activated")
            return True
        if not compare:
            return True  # unreachable: if_better always has a comparison set
        if (active.base_model or self.settings.base_model) != job.base_model:  # losses in two tokenizers' units
            await self._event(job, f"The active version {active.version} is for another base model: the two cannot "
                                   "be compared, and the new version is not activated (activate it, or give it a "
                                   "canary share, with the admin API)", level="warn")
            return False
        ref = AdapterRef(job.tenant, job.adapter, active.version, active.uid)
        if not await self._download(ref, active_dir):
            await self._event(job, f"The files of the active version {active.version} could not be read: the new "
                                   "version is not activated", level="warn")
            return False
        await self._check(run)
        length, device = self.settings.trainer_max_length, self.settings.trainer_device or None
        new = await asyncio.to_thread(self._evaluate, base, out, compare, max_length=length, device=device)
        await self._check(run)
        old = await asyncio.to_thread(self._evaluate, base, active_dir, compare, max_length=length, device=device)
        better = new < old
        verdict = "activated" if better else "not activated (the active version does as well or better)"
        await self._event(job, f"Held-out loss on {len(compare)} examples: new version {new:.4f}, active version "
                               f"{active.version} {old:.4f}; the new version is {verdict}")
        return better

    async def _publish(self, job: Job, out: Path, *, info: Any, activate: bool) -> int:
        version = await self.registry.allocate_version(job.tenant, job.adapter)
        meta = VersionMeta(version=version, uid=new_uid(), sha256=info.sha256, rank=info.rank, alpha=info.alpha,
                           target_modules=info.target_modules, size_bytes=info.size_bytes, created=int(time.time()),
                           base_model=job.base_model)
        ref = AdapterRef(job.tenant, job.adapter, version, meta.uid)
        fence = fence_from_dict(job.fence) if job.fence else None
        try:
            await publish_version(self.store, self.registry, ref=ref, folder=out, meta=meta, activate=activate,
                                  fence=fence)
        except CommitRefused:
            raise JobFailed("tenant_deleted", "The tenant was deleted while the job ran; nothing was stored.") from None
        return version

    async def _event(self, job: Job, message: str, *, level: str = "info", kind: str = "message",
                     data: dict[str, Any] | None = None) -> None:
        """Record an event (``kind``: its type); best effort, as a Redis hiccup must not fail the training."""
        try:
            await self.jobs.add_event(job.id, message, level=level, type=kind, data=data)
        except (RedisError, OSError) as e:
            log.warning("could not record a job event", extra={"job": job.id, "error": type(e).__name__})


# -- the process ---------------------------------------------------------------------------------------


def _set_threads(threads: int) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)


async def serve(settings: TrainerSettings, *, metrics: TrainerMetrics) -> None:
    """Run one worker until SIGTERM/SIGINT (the first stops between jobs, a second exits at once)."""
    redis = Redis.from_url(settings.redis_url, socket_connect_timeout=5,
                           socket_timeout=settings.trainer_block_s + 30)  # above the claim's blocking read
    store = S3ObjectStore(s3_config(settings))
    worker = Worker(settings, redis=redis, store=store, metrics=metrics)
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if worker.stopping:
            log.warning("second signal: exiting at once")
            os._exit(128 + signum)
        log.info("stopping between jobs (a signal)", extra={"signal": signal.Signals(signum).name})
        worker.request_stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    log.info("trainer ready", extra={"worker": worker.name, "base_models": ",".join(settings.bases),
                                     "lease_s": settings.trainer_lease_s})
    try:
        await worker.run()
    finally:
        await store.aclose()
        await redis.aclose()
    log.info("trainer stopped", extra={"worker": worker.name})


def main(settings: TrainerSettings) -> int:
    """``banyan trainer``: check the base model, serve metrics (if a port is set), then take jobs until a
    signal. Logging is configured by the caller."""
    for path in settings.bases.values():
        try:
            BaseModelSpec.from_path(path)
        except (OSError, ValueError) as e:
            log.error("the base model folder is not usable", extra={"path": str(path), "error": str(e)})
            return 2
    metrics = TrainerMetrics()
    if settings.trainer_metrics_port:
        from prometheus_client import start_http_server

        start_http_server(settings.trainer_metrics_port, addr=settings.trainer_metrics_host,
                          registry=metrics.registry)
    _set_threads(settings.trainer_threads)
    asyncio.run(serve(settings, metrics=metrics))
    return 0
