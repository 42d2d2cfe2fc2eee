"""What the fine-tuning tests share about reading a job through the stock ``openai`` SDK."""

from __future__ import annotations

from typing import Any

import openai


def job_events(client: openai.OpenAI, job_id: str) -> list[Any]:
    """Every event of the job, oldest first (the API pages them newest first)."""
    events: list[Any] = []
    after: str | None = None
    while True:
        page = client.fine_tuning.jobs.list_events(job_id, limit=100, **({"after": after} if after else {}))
        events.extend(page.data)
        if not page.has_more or not page.data:
            return list(reversed(events))
        after = page.data[-1].id
