"""Grounded QA, measured: does ``rag`` make the real model answer from a tenant's own documents?

    .venv/bin/python -m loadtests.grounded_eval                                 # its own stack (~5 min)
    .venv/bin/python -m loadtests.grounded_eval --url http://127.0.0.1:8080 --admin-key adm_...

The labelled set (``loadtests/data/grounded_qa.json``) is fictional: invented people, places, products
and schedules, so the model cannot know the answers from pretraining. 16 of its questions are about a
fact that changed: two documents with different timestamps disagree, and the right answer is the newer
one (the older one is recorded too, to count answers that repeat it).

Without ``--url`` it starts its own stack with the real model (``banyan dev --empty``,
``BANYAN_DEV_MODEL=smollm2``, loopback only, data in ``--data-dir`` where the converted model is kept
and reused) and stops it, by process id, at the end. With ``--url`` and ``--admin-key`` it uses a
running stack. Either way it creates a tenant and a key through the admin API, adds the documents
through ``/v1/documents``, asks every question greedily (temperature 0, a short ``max_tokens``) without
and with ``rag`` and retrieves for it through ``/v1/retrieve`` with the same ``top_k`` (all of it
``--concurrency`` requests at a time), deletes the tenant, and prints:

- accuracy without and with ``rag``: an answer is right when it contains one of the accepted strings
  (case-insensitive, whole words) and, for a changed fact, none of the older value's;
- the newer-fact rate over the changed facts (and how often the answer is the older value);
- the recall of the gold passage: its document is among the ``top_k`` retrieved; and how often it made
  it into the ``sources`` of the ``rag`` answer (the context budget may leave it out);
- where the ``rag`` misses come from: the gold passage was not retrieved (retrieval), or it was and the
  model did not answer from it (reading);

then one line ``RESULT {json}`` with ``accuracy_no_rag``, ``accuracy_rag``, ``newer_fact_rate`` and
``gold_recall`` (fractions) and more. Goals: ``rag`` at least 40 points above no ``rag``; the newer
fact in at least 80 % of the changed-fact questions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import re
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from loadtests._stack import run_on_stack

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data" / "grounded_qa.json"
DEV_MODEL = "smollm2"
SCRIPT = "grounded_eval"
TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Document:
    key: str
    title: str
    timestamp: str
    text: str


@dataclass(frozen=True)
class Question:
    question: str
    answers: list[str]
    gold: str
    """The key of the document that holds the answer."""
    old_answers: list[str] = field(default_factory=list)
    """A changed fact's older value (empty for the other questions)."""
    old_gold: str | None = None

    @property
    def changed(self) -> bool:
        return bool(self.old_answers)


@dataclass
class Outcome:
    question: Question
    no_rag: str = ""
    rag: str = ""
    retrieved: list[str] = field(default_factory=list)
    """Document keys ``/v1/retrieve`` returned, best first."""
    sources: list[str] = field(default_factory=list)
    """Document keys of the ``rag`` answer's ``sources``, in context order."""

    def right(self, answer: str) -> bool:
        return mentions(answer, self.question.answers) and not mentions(answer, self.question.old_answers)

    def older(self, answer: str) -> bool:
        return mentions(answer, self.question.old_answers) and not mentions(answer, self.question.answers)


def mentions(answer: str, accepted: list[str]) -> bool:
    """Whether ``answer`` contains one of ``accepted`` as whole words, case-insensitively."""
    return any(re.search(r"(?<!\w)" + re.escape(s) + r"(?!\w)", answer, re.IGNORECASE) for s in accepted)


def load_set(path: Path) -> tuple[list[Document], list[Question]]:
    data = json.loads(path.read_text())
    documents = [Document(**d) for d in data["documents"]]
    questions = [Question(**q) for q in data["questions"]]
    keys = {d.key for d in documents}
    missing = [q.gold for q in questions if q.gold not in keys]
    if missing:
        raise ValueError(f"{path}: questions point at unknown documents {missing}")
    return documents, questions


class Eval:
    """One tenant on a running stack, and the calls the evaluation makes."""

    def __init__(self, url: str, admin_key: str, *, model: str | None, top_k: int, max_tokens: int,
                 concurrency: int) -> None:
        self.url = url.rstrip("/")
        self.admin = {"Authorization": f"Bearer {admin_key}"}
        self.model = model
        self.top_k = top_k
        self.max_tokens = max_tokens
        self.gate = asyncio.Semaphore(concurrency)
        self.tenant = "grounded-eval-" + secrets.token_hex(4)
        self.key = ""
        self.client = httpx.AsyncClient(timeout=TIMEOUT_S)
        self.ids: dict[str, str] = {}  # document id -> key

    async def __aenter__(self) -> Eval:
        response = await self.client.post(f"{self.url}/admin/tenants", headers=self.admin,
                                          json={"id": self.tenant, "name": "grounded QA evaluation"})
        response.raise_for_status()
        response = await self.client.post(f"{self.url}/admin/tenants/{self.tenant}/keys", headers=self.admin,
                                          json={"name": "eval"})
        response.raise_for_status()
        self.key = response.json()["key"]
        if self.model is None:
            self.model = await self._base_model()
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self.client.delete(f"{self.url}/admin/tenants/{self.tenant}", headers=self.admin)
        finally:
            await self.client.aclose()

    @property
    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    async def _base_model(self) -> str:
        response = await self.client.get(f"{self.url}/v1/models", headers=self._headers)
        response.raise_for_status()
        bases = [m["id"] for m in response.json()["data"] if m.get("parent") in (None, m["id"])]
        if not bases:
            raise RuntimeError("the stack lists no base model")
        return str(bases[0])

    async def add(self, document: Document) -> None:
        async with self.gate:
            response = await self.client.post(f"{self.url}/v1/documents", headers=self._headers, json={
                "title": document.title, "text": document.text, "timestamp": document.timestamp,
                "metadata": {"key": document.key}})
        response.raise_for_status()
        self.ids[response.json()["id"]] = document.key

    async def ask(self, question: str, *, rag: bool) -> tuple[str, list[str]]:
        body: dict[str, Any] = {"model": self.model, "messages": [{"role": "user", "content": question}],
                                "temperature": 0, "max_tokens": self.max_tokens}
        if rag:
            body["rag"] = {"top_k": self.top_k}
        async with self.gate:
            response = await self.client.post(f"{self.url}/v1/chat/completions", headers=self._headers, json=body)
        response.raise_for_status()
        reply = response.json()
        answer = reply["choices"][0]["message"]["content"] or ""
        return answer, [self.ids.get(s["document_id"], "?") for s in reply.get("sources") or []]

    async def retrieve(self, question: str) -> list[str]:
        async with self.gate:
            response = await self.client.post(f"{self.url}/v1/retrieve", headers=self._headers,
                                              json={"query": question, "top_k": self.top_k})
        response.raise_for_status()
        return [self.ids.get(p["document_id"], "?") for p in response.json()["data"]]

    async def run(self, question: Question) -> Outcome:
        (no_rag, _), (rag, sources), retrieved = await asyncio.gather(
            self.ask(question.question, rag=False), self.ask(question.question, rag=True),
            self.retrieve(question.question))
        return Outcome(question, no_rag=no_rag, rag=rag, retrieved=retrieved, sources=sources)


def _fraction(count: int, total: int) -> float:
    return round(count / total, 4) if total else 0.0


def score(outcomes: list[Outcome]) -> dict[str, Any]:
    changed = [o for o in outcomes if o.question.changed]
    rag_right = [o for o in outcomes if o.right(o.rag)]
    missed = [o for o in outcomes if not o.right(o.rag)]
    return {
        "questions": len(outcomes),
        "changed_fact_questions": len(changed),
        "accuracy_no_rag": _fraction(sum(o.right(o.no_rag) for o in outcomes), len(outcomes)),
        "accuracy_rag": _fraction(len(rag_right), len(outcomes)),
        "newer_fact_rate": _fraction(sum(o.right(o.rag) for o in changed), len(changed)),
        "older_fact_rate": _fraction(sum(o.older(o.rag) for o in changed), len(changed)),
        "gold_recall": _fraction(sum(o.question.gold in o.retrieved for o in outcomes), len(outcomes)),
        "gold_in_sources": _fraction(sum(o.question.gold in o.sources for o in outcomes), len(outcomes)),
        "misses_retrieval": sum(o.question.gold not in o.sources for o in missed),
        "misses_reading": sum(o.question.gold in o.sources for o in missed),
    }


def report(outcomes: list[Outcome], result: dict[str, Any], *, show: bool) -> None:
    if show:
        for o in outcomes:
            mark = "ok " if o.right(o.rag) else ("OLD" if o.older(o.rag) else "-- ")
            gold = "gold@" + (str(o.sources.index(o.question.gold) + 1) if o.question.gold in o.sources else "-")
            print(f"[{mark}] {gold:7} {o.question.question}\n        rag:    {_one_line(o.rag)}"
                  f"\n        no rag: {_one_line(o.no_rag)}")
    n, c = result["questions"], result["changed_fact_questions"]
    print(f"questions {n} ({c} about a changed fact), top_k {result['top_k']}, max_tokens {result['max_tokens']}, "
          f"model {result['model']}")
    print(f"  accuracy without rag   {result['accuracy_no_rag']:6.1%}")
    print(f"  accuracy with rag      {result['accuracy_rag']:6.1%}   "
          f"(+{(result['accuracy_rag'] - result['accuracy_no_rag']) * 100:.1f} points)")
    print(f"  newer fact (changed)   {result['newer_fact_rate']:6.1%}   older fact {result['older_fact_rate']:.1%}")
    print(f"  gold passage recall@{result['top_k']} {result['gold_recall']:6.1%}   "
          f"in the rag sources {result['gold_in_sources']:.1%}")
    print(f"  rag misses: {result['misses_retrieval']} without the gold passage in the context (retrieval), "
          f"{result['misses_reading']} with it (reading)")
    print(f"  {result['seconds']:.0f} s for {3 * n} requests, {result['concurrency']} at a time")


def _one_line(text: str) -> str:
    return " ".join(text.split())[:160]


async def evaluate(url: str, admin_key: str, *, data: Path, model: str | None, top_k: int, max_tokens: int,
                   concurrency: int, show: bool) -> dict[str, Any]:
    documents, questions = load_set(data)
    async with Eval(url, admin_key, model=model, top_k=top_k, max_tokens=max_tokens,
                    concurrency=concurrency) as run:
        started = time.perf_counter()
        await asyncio.gather(*(run.add(d) for d in documents))
        added = time.perf_counter()
        outcomes = await asyncio.gather(*(run.run(q) for q in questions))
        asked = time.perf_counter()
        result = {**score(list(outcomes)), "model": run.model, "top_k": top_k, "max_tokens": max_tokens,
                  "concurrency": concurrency, "documents": len(documents), "seconds": round(asked - added, 1),
                  "ingest_seconds": round(added - started, 1), "machine": f"{platform.machine()}, cpu only"}
    report(list(outcomes), result, show=show)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.grounded_eval", description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running stack's gateway (else this starts its own)")
    parser.add_argument("--admin-key", help="the running stack's admin key (with --url)")
    parser.add_argument("--model", help="the base model id to ask (default: the stack's base model)")
    parser.add_argument("--data", type=Path, default=DATA, help="the labelled set")
    parser.add_argument("--data-dir", type=Path, default=REPO / ".banyan" / "grounded-eval",
                        help="the own stack's data dir (the converted model is kept there and reused)")
    parser.add_argument("--top-k", type=int, default=4, help="passages per question (rag and /v1/retrieve)")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--show", action="store_true", help="print every question with both answers")
    args = parser.parse_args(argv)
    if bool(args.url) != bool(args.admin_key):
        parser.error("--url and --admin-key go together")
    options = {"data": args.data, "model": args.model, "top_k": args.top_k, "max_tokens": args.max_tokens,
               "concurrency": args.concurrency, "show": args.show}
    return run_on_stack(SCRIPT, url=args.url, admin_key=args.admin_key, data_dir=args.data_dir.resolve(),
                        model=DEV_MODEL, work=lambda url, key: evaluate(url, key, **options))


if __name__ == "__main__":
    sys.exit(main())
