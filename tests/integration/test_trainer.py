"""Trainer workers on the real stack: a second ``banyan trainer`` process joins ``banyan dev``'s own; the worker
that runs a job is killed (SIGKILL) mid-training, and the job is still finished, by the other worker, with exactly
one new version. The session stack's lease is short for this (``BANYAN_TRAINER_LEASE_S`` in conftest.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from gateway.dev.launcher import clean_env
from tests.integration.conftest import TRAINER_LEASE_S, RunningStack, TenantHandle
from tests.integration.fine_tuning_jobs import job_events

TIMEOUT_S = 600.0
"""Seconds for a job of the tiny model, allowing for a machine busy with other heavy work (never a gate)."""
STARTED = "Job started on worker "


@pytest.fixture
def second_trainer(stack: RunningStack, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """One more ``banyan trainer`` against the session stack's Redis, object store and base model."""
    env = clean_env({
        **stack.s3_settings().s3_env(),
        "BANYAN_REDIS_URL": stack.info["redis_url"],
        "BANYAN_BASE_MODEL": stack.info["base_model"],
        "BANYAN_BASE_MODEL_PATH": stack.info["model_path"],
        "BANYAN_TRAINER_LEASE_S": str(TRAINER_LEASE_S),
        "BANYAN_TRAINER_THREADS": "1",
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    log = tmp_path / "trainer.log"
    with log.open("wb") as sink:
        process = subprocess.Popen([str(Path(sys.executable).parent / "banyan"), "trainer"], env=env, stdout=sink,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while "trainer ready" not in log.read_text(errors="replace"):
            assert process.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, "the second trainer did not start"
            time.sleep(0.2)
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def _first_worker_mid_training(client: openai.OpenAI, job_id: str) -> str:
    """The worker of the job's first attempt, once it has reported a training step."""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        events = job_events(client, job_id)
        started = [e.message.removeprefix(STARTED) for e in events if e.message.startswith(STARTED)]
        if started and any(e.type == "metrics" for e in events):
            assert started[0].endswith(" (attempt 1)"), started
            return started[0].removesuffix(" (attempt 1)")
        assert client.fine_tuning.jobs.retrieve(job_id).status in ("queued", "running")
        time.sleep(0.2)
    raise AssertionError("the job did not start training")


def _trainer_pid(worker: str) -> int:
    """The process id in a worker's default name (``<hostname>-<pid>``), checked to be a ``banyan trainer``."""
    pid = int(worker.rsplit("-", 1)[1])
    command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert b"trainer" in command, command
    return pid


def test_a_job_whose_worker_is_killed_is_finished_by_another_worker(
        stack: RunningStack, admin: httpx.Client, tenant: TenantHandle,
        second_trainer: subprocess.Popen[bytes]) -> None:
    client = tenant.client()
    examples = [{"messages": [{"role": "user", "content": f"Which gate is door {n}?"},
                              {"role": "assistant", "content": f"Door {n} is gate {n * 7 % 31}."}]} for n in range(20)]
    uploaded = client.files.create(file=("doors.jsonl", "".join(json.dumps(e) + "\n" for e in examples).encode()),
                                   purpose="fine-tune")
    # 100 steps: long enough to be killed mid-training, seconds on the tiny model.
    job = client.fine_tuning.jobs.create(model=stack.info["base_model"], training_file=uploaded.id, suffix="doors",
                                         seed=11, hyperparameters={"n_epochs": 10, "batch_size": 2,
                                                                   "learning_rate_multiplier": 5},
                                         extra_body={"banyan": {"rank": 4, "activate": "always"}})
    first = _first_worker_mid_training(client, job.id)
    pid = _trainer_pid(first)
    os.kill(pid, signal.SIGKILL)
    killed_own = pid != second_trainer.pid

    deadline = time.monotonic() + TIMEOUT_S
    while (done := client.fine_tuning.jobs.retrieve(job.id)).status in ("queued", "running"):
        assert time.monotonic() < deadline, f"job still {done.status}"
        time.sleep(1.0)
    assert done.status == "succeeded", done.error
    assert done.to_dict()["banyan"] == {"adapter": "doors", "version": 1, "activated": True}
    assert done.trained_tokens and done.trained_tokens > 0

    events = job_events(client, job.id)
    started = [e.message.removeprefix(STARTED) for e in events if e.message.startswith(STARTED)]
    assert len(started) == 2 and started[0] == f"{first} (attempt 1)", started
    assert started[1].endswith(" (attempt 2)") and not started[1].startswith(first + " "), started
    steps = [e.data["step"] for e in events if e.type == "metrics"]
    assert steps.count(100) == 1 and steps[-1] == 100  # the second attempt trained all 100 steps

    adapter = admin.get(f"/admin/tenants/{tenant.id}/adapters/doors")
    assert adapter.status_code == 200, adapter.text
    assert [v["version"] for v in adapter.json()["versions"]] == [1]
    assert len({k.split("/")[3] for k in stack.s3_keys(f"adapters/{tenant.id}/doors/")}) == 1
    reply = client.chat.completions.create(model="doors", messages=[{"role": "user", "content": "Which gate?"}],
                                           max_tokens=4, temperature=0)
    assert reply.choices[0].message.content is not None
    if killed_own:  # banyan dev's own trainer: it is started again
        deadline = time.monotonic() + 120
        while "the training worker exited (code -9)" not in stack.output_text():
            assert time.monotonic() < deadline, "banyan dev did not restart its trainer"
            time.sleep(0.5)
