"""The memory benchmark: do an adapter trained on a tenant's documents and retrieval beat either alone?

    .venv/bin/python -m loadtests.memory_bench                                 # its own stack (smollm2)
    .venv/bin/python -m loadtests.memory_bench --url http://127.0.0.1:8080 --admin-key adm_...

The set (``loadtests/data/memory_bench.json``) is fictional: a few tenants (a ferry island, a small company, one
person's notes) with invented names, prices and schedules, so the base model cannot know them. Each tenant's
documents carry timestamps; some state a fact that a later document changes *before* training (the adapter must
learn the newer value), and some facts change only in documents added *after* the adapter is trained (the adapter
knows the old value, retrieval the new one: a user's adapter retrained nightly while the day's news arrives).

For each tenant, through the stack's public APIs: a tenant and a key (admin API), its documents
(``/v1/documents``), a fine-tuning job with ``banyan.from_documents`` through the stock ``openai`` SDK
(``client.fine_tuning.jobs.create(..., extra_body={"banyan": {...}})``, the new version activated), waiting for the
job; then the later documents, and every held-out question (worded unlike the generator's templates) four ways,
greedily: the base model, the base model with ``rag``, the adapter, the adapter with ``rag``. It prints exact-match
accuracy for each (an answer is right when it contains an accepted string as whole words and none of a changed
fact's older value), how often the newer of two conflicting values wins (with the adapter and ``rag``), each job's
wall time and training tokens, and then one line ``RESULT {json}`` with ``accuracy`` (``base``, ``rag``,
``adapter``, ``adapter_rag``), ``newer_fact_rate``, ``job_seconds`` (the longest job's own time, without its wait
in the queue) and ``training_tokens`` (the largest job's). Goals: adapter + ``rag`` the best of the four and at
least 5 points above the better of adapter alone and ``rag`` alone; the newer fact in at least 90 % of conflicts; a
job of about 100 examples under 10 minutes on a 2-core machine.

Without ``--url`` it starts its own stack with the real model (``banyan dev --empty``, ``BANYAN_DEV_MODEL=smollm2``,
loopback only, data in ``--data-dir`` where the converted model is kept and reused; it starts one trainer) and stops
it, by process id, at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import re
import secrets
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from openai import AsyncOpenAI, omit

from loadtests._stack import run_on_stack

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data" / "memory_bench.json"
DEV_MODEL = "smollm2"
SCRIPT = "memory_bench"
TIMEOUT_S = 600.0
JOB_TIMEOUT_S = 3600.0
READY_TIMEOUT_S = 900.0
"""The stack starts in 2-4 minutes; on a machine loaded by other work it took longer than the launcher's default."""
MODES = ("base", "rag", "adapter", "adapter_rag")
ADAPTER = "memory"


@dataclass(frozen=True)
class Question:
    question: str
    answers: list[str]
    old: list[str]
    kind: str
    """stable, before (changed before training) or after (changed after training)."""


@dataclass
class Tenant:
    name: str
    documents: list[dict[str, str]]
    later: list[dict[str, str]]
    questions: list[Question]
    id: str = ""
    key: str = ""
    job: dict[str, Any] = field(default_factory=dict)
    answers: dict[str, list[str]] = field(default_factory=dict)
    """Mode -> the answer to each question, in order."""


def mentions(answer: str, accepted: list[str]) -> bool:
    """Whether ``answer`` contains one of ``accepted`` as whole words, case-insensitively."""
    return any(re.search(r"(?<!\w)" + re.escape(s) + r"(?!\w)", answer, re.IGNORECASE) for s in accepted)


def right(question: Question, answer: str) -> bool:
    return mentions(answer, question.answers) and not mentions(answer, question.old)


def load_set(path: Path) -> list[Tenant]:
    data = json.loads(path.read_text())
    return [Tenant(name=t["name"], documents=t["documents"], later=t["later"],
                   questions=[Question(question=q["q"], answers=q["a"], old=q.get("old", []), kind=q["kind"])
                              for q in t["questions"]]) for t in data["tenants"]]


class Bench:
    """The calls the benchmark makes to one running stack."""

    def __init__(self, url: str, admin_key: str, *, hyperparameters: dict[str, Any], rank: int | None, seed: int,
                 top_k: int, max_tokens: int, concurrency: int) -> None:
        self.url = url.rstrip("/")
        self.admin = {"Authorization": f"Bearer {admin_key}"}
        self.hyperparameters = hyperparameters
        self.rank = rank
        self.seed = seed
        self.top_k = top_k
        self.max_tokens = max_tokens
        self.gate = asyncio.Semaphore(concurrency)
        self.client = httpx.AsyncClient(timeout=TIMEOUT_S)
        self.base_model = ""
        self.run = secrets.token_hex(3)

    async def aclose(self) -> None:
        await self.client.aclose()

    async def create_tenant(self, tenant: Tenant) -> None:
        tenant.id = f"memory-{tenant.name}-{self.run}"
        response = await self.client.post(f"{self.url}/admin/tenants", headers=self.admin,
                                          json={"id": tenant.id, "name": f"memory benchmark: {tenant.name}"})
        response.raise_for_status()
        response = await self.client.post(f"{self.url}/admin/tenants/{tenant.id}/keys", headers=self.admin,
                                          json={"name": "bench"})
        response.raise_for_status()
        tenant.key = response.json()["key"]
        if not self.base_model:
            response = await self.client.get(f"{self.url}/v1/models", headers=_bearer(tenant.key))
            response.raise_for_status()
            bases = [m["id"] for m in response.json()["data"] if m.get("parent") in (None, m["id"])]
            self.base_model = bases[0]

    async def delete_tenant(self, tenant: Tenant) -> None:
        if tenant.id:
            await self.client.delete(f"{self.url}/admin/tenants/{tenant.id}", headers=self.admin)

    async def add_documents(self, tenant: Tenant, documents: list[dict[str, str]]) -> None:
        for document in documents:  # in order: the same timestamps either way, but a stable corpus order
            response = await self.client.post(f"{self.url}/v1/documents", headers=_bearer(tenant.key), json={
                "title": document["title"], "text": document["text"], "timestamp": document["timestamp"]})
            response.raise_for_status()

    async def train(self, tenant: Tenant) -> None:
        """One ``from_documents`` job through the stock ``openai`` SDK, waited for; its record in ``tenant.job``."""
        sdk = AsyncOpenAI(base_url=f"{self.url}/v1", api_key=tenant.key, timeout=TIMEOUT_S, max_retries=0)
        try:
            banyan: dict[str, Any] = {"from_documents": {"collection": None}, "activate": "always"}
            if self.rank is not None:
                banyan["rank"] = self.rank
            created = time.monotonic()
            job = await sdk.fine_tuning.jobs.create(
                model=self.base_model, training_file=omit, suffix=ADAPTER, seed=self.seed,  # type: ignore[arg-type]
                hyperparameters=self.hyperparameters,  # type: ignore[arg-type]
                extra_body={"banyan": banyan})
            deadline = created + JOB_TIMEOUT_S
            while job.status not in ("succeeded", "failed", "cancelled") and time.monotonic() < deadline:
                await asyncio.sleep(5)
                job = await sdk.fine_tuning.jobs.retrieve(job.id)
            finished = time.monotonic()
            events = await sdk.fine_tuning.jobs.list_events(job.id, limit=100)
            losses = [e.data["train_loss"] for e in reversed(events.data)
                      if e.type == "metrics" and isinstance(e.data, dict) and "train_loss" in e.data]
            tenant.job = {**job.model_dump(), "wall_seconds": round(finished - created, 1), "losses": losses}
            if job.status != "succeeded":
                raise RuntimeError(f"job {job.id} of {tenant.id} ended {job.status}: {job.error}")
        finally:
            await sdk.close()

    async def ask(self, tenant: Tenant, question: str, mode: str) -> str:
        model = ADAPTER if mode.startswith("adapter") else self.base_model
        body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": question}],
                                "temperature": 0, "max_tokens": self.max_tokens}
        if mode.endswith("rag"):
            body["rag"] = {"top_k": self.top_k}
        async with self.gate:
            response = await self.client.post(f"{self.url}/v1/chat/completions", headers=_bearer(tenant.key),
                                              json=body)
        response.raise_for_status()
        return str(response.json()["choices"][0]["message"]["content"] or "")

    async def evaluate(self, tenant: Tenant) -> None:
        for mode in MODES:
            tenant.answers[mode] = list(await asyncio.gather(*(self.ask(tenant, q.question, mode)
                                                               for q in tenant.questions)))


def _run_seconds(tenants: list[Tenant]) -> None:
    """Each job's own time: the jobs are queued together and one trainer takes them in turn, so a job ran from
    its creation or the previous job's end, whichever is later, to its end (whole seconds, the API's unit)."""
    previous = 0
    for tenant in sorted(tenants, key=lambda t: int(t.job["finished_at"])):
        start = max(int(tenant.job["created_at"]), previous)
        tenant.job["run_seconds"] = int(tenant.job["finished_at"]) - start
        previous = int(tenant.job["finished_at"])


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _fraction(count: int, total: int) -> float:
    return round(count / total, 4) if total else 0.0


def score(tenants: list[Tenant]) -> dict[str, Any]:
    pairs = [(t, i, q) for t in tenants for i, q in enumerate(t.questions)]
    accuracy = {m: _fraction(sum(right(q, t.answers[m][i]) for t, i, q in pairs), len(pairs)) for m in MODES}
    by_kind: dict[str, dict[str, float]] = {}
    for kind in ("stable", "before", "after"):
        some = [(t, i, q) for t, i, q in pairs if q.kind == kind]
        by_kind[kind] = {m: _fraction(sum(right(q, t.answers[m][i]) for t, i, q in some), len(some)) for m in MODES}
    conflicts = [(t, i, q) for t, i, q in pairs if q.old]
    newer = {m: _fraction(sum(right(q, t.answers[m][i]) for t, i, q in conflicts), len(conflicts)) for m in MODES}
    older = {m: _fraction(sum(mentions(t.answers[m][i], q.old) and not mentions(t.answers[m][i], q.answers)
                              for t, i, q in conflicts), len(conflicts)) for m in MODES}
    jobs = [t.job for t in tenants]
    answered = {m: sum(mentions(t.answers[m][i], q.old + q.answers) and not (
        mentions(t.answers[m][i], q.old) and mentions(t.answers[m][i], q.answers)) for t, i, q in conflicts)
        for m in MODES}
    return {
        "questions": len(pairs), "conflicts": len(conflicts), "accuracy": accuracy, "accuracy_by_kind": by_kind,
        "newer_fact_rate": newer["adapter_rag"], "newer_fact_rate_by_mode": newer, "older_fact_rate_by_mode": older,
        "newer_among_answered_by_mode": {m: _fraction(round(newer[m] * len(conflicts)), answered[m]) for m in MODES},
        "job_seconds": max(j["run_seconds"] for j in jobs),
        "training_tokens": max(int(j.get("trained_tokens") or 0) for j in jobs),
        "jobs": [{"tenant": t.name, "id": t.job["id"], "wall_seconds": t.job["wall_seconds"],
                  "run_seconds": t.job["run_seconds"],
                  "trained_tokens": t.job.get("trained_tokens"), "hyperparameters": t.job.get("hyperparameters"),
                  "first_loss": (t.job["losses"] or [None])[0], "last_loss": (t.job["losses"] or [None])[-1]}
                 for t in tenants],
    }


def report(tenants: list[Tenant], result: dict[str, Any], *, show: bool) -> None:
    if show:
        for t in tenants:
            for i, q in enumerate(t.questions):
                print(f"[{t.name} {q.kind}] {q.question}")
                for m in MODES:
                    answer = t.answers[m][i]
                    mark = "ok " if right(q, answer) else ("OLD" if q.old and mentions(answer, q.old) else "-- ")
                    print(f"    {m:12} {mark} {' '.join(answer.split())[:140]}")
    print(f"{result['questions']} held-out questions ({result['conflicts']} about a changed fact), "
          f"{len(tenants)} tenants, model {result['model']}, top_k {result['top_k']}")
    for m in MODES:
        kinds = "  ".join(f"{k} {v[m]:6.1%}" for k, v in result["accuracy_by_kind"].items())
        print(f"  accuracy {m:12} {result['accuracy'][m]:6.1%}   ({kinds})")
    best_single = max(result["accuracy"]["adapter"], result["accuracy"]["rag"])
    print(f"  adapter + rag vs the better of adapter and rag: "
          f"{(result['accuracy']['adapter_rag'] - best_single) * 100:+.1f} points")
    print(f"  newer fact wins (adapter + rag) {result['newer_fact_rate']:6.1%}   by mode "
          + ", ".join(f"{m} {v:.0%}" for m, v in result["newer_fact_rate_by_mode"].items()))
    print("  newer of the answers giving either value: "
          + ", ".join(f"{m} {v:.0%}" for m, v in result["newer_among_answered_by_mode"].items()))
    for job in result["jobs"]:
        print(f"  job {job['tenant']:10} {job['run_seconds']:6.0f} s ({job['wall_seconds']:.0f} s queued to done)  "
              f"{job['trained_tokens']} training tokens  "
              f"loss {job['first_loss']} -> {job['last_loss']}  {job['hyperparameters']}")


async def benchmark(url: str, admin_key: str, *, data: Path, hyperparameters: dict[str, Any], rank: int | None,
                    seed: int, top_k: int, max_tokens: int, concurrency: int, show: bool) -> dict[str, Any]:
    tenants = load_set(data)
    bench = Bench(url, admin_key, hyperparameters=hyperparameters, rank=rank, seed=seed, top_k=top_k,
                  max_tokens=max_tokens, concurrency=concurrency)
    started = time.perf_counter()
    try:
        for tenant in tenants:
            await bench.create_tenant(tenant)
            await bench.add_documents(tenant, tenant.documents)
        # The jobs queue together; the trainer takes them one after another.
        await asyncio.gather(*(bench.train(t) for t in tenants))
        trained = time.perf_counter()
        _run_seconds(tenants)
        for tenant in tenants:
            await bench.add_documents(tenant, tenant.later)
        await asyncio.gather(*(bench.evaluate(t) for t in tenants))
        result = {**score(tenants), "model": bench.base_model, "top_k": top_k, "max_tokens": max_tokens,
                  "seed": seed, "rank": rank, "asked_hyperparameters": hyperparameters,
                  "training_seconds": round(trained - started, 1),
                  "asking_seconds": round(time.perf_counter() - trained, 1),
                  "machine": f"{platform.machine()}, cpu only"}
    finally:
        for tenant in tenants:
            await bench.delete_tenant(tenant)
        await bench.aclose()
    report(tenants, result, show=show)
    return result


def _hyperparameter(value: str) -> int | float | str:
    if value == "auto":
        return value
    return float(value) if "." in value or "e" in value else int(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.memory_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running stack's gateway (else this starts its own)")
    parser.add_argument("--admin-key", help="the running stack's admin key (with --url)")
    parser.add_argument("--data", type=Path, default=DATA, help="the tenants, documents and questions")
    parser.add_argument("--data-dir", type=Path, default=REPO / ".banyan" / "memory-bench",
                        help="the own stack's data dir (the converted model is kept there and reused)")
    parser.add_argument("--epochs", type=_hyperparameter, default="auto")
    parser.add_argument("--batch-size", type=_hyperparameter, default="auto")
    parser.add_argument("--lr-multiplier", type=_hyperparameter, default="auto")
    parser.add_argument("--rank", type=int, default=None, help="LoRA rank (default: the trainer's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--show", action="store_true", help="print every question with its four answers")
    args = parser.parse_args(argv)
    if bool(args.url) != bool(args.admin_key):
        parser.error("--url and --admin-key go together")
    # Ctrl-C stops the run and its stack even when started from a background job (SIGINT inherited ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    options = {"data": args.data, "rank": args.rank, "seed": args.seed, "top_k": args.top_k,
               "max_tokens": args.max_tokens, "concurrency": args.concurrency, "show": args.show,
               "hyperparameters": {"n_epochs": args.epochs, "batch_size": args.batch_size,
                                   "learning_rate_multiplier": args.lr_multiplier}}
    return run_on_stack(SCRIPT, url=args.url, admin_key=args.admin_key, data_dir=args.data_dir.resolve(),
                        model=DEV_MODEL, work=lambda url, key: benchmark(url, key, **options),
                        ready_timeout=READY_TIMEOUT_S)


if __name__ == "__main__":
    sys.exit(main())
