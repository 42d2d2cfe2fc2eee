"""vLLM's message-queue readers sleep between checks in their busy window instead of spinning, and a real
queue between two processes still delivers every message promptly (after an idle gap too)."""

from __future__ import annotations

import multiprocessing
import time
from types import SimpleNamespace
from typing import Any

import pytest

from adapters import vllm_patches
from adapters.vllm_patches import sleep_in_shm_busy_wait

ROUND_TRIPS = 300


@pytest.fixture
def spin_condition(monkeypatch: pytest.MonkeyPatch) -> Any:
    """vLLM's SpinCondition, its ``wait`` restored after the test."""
    from vllm.distributed.device_communicators import shm_broadcast

    monkeypatch.setattr(shm_broadcast.SpinCondition, "wait", shm_broadcast.SpinCondition.wait)
    return shm_broadcast.SpinCondition


def test_a_reader_in_its_busy_window_sleeps_and_an_idle_one_waits_as_before(
        spin_condition: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.distributed.device_communicators import shm_broadcast

    yields: list[int] = []
    sleeps: list[float] = []
    polls: list[int | None] = []
    monkeypatch.setattr(shm_broadcast, "sched_yield", lambda: yields.append(1))
    monkeypatch.setattr(vllm_patches.time, "sleep", sleeps.append)
    reader = SimpleNamespace(is_reader=True, last_read=time.monotonic(), busy_loop_s=60.0,
                             poller=SimpleNamespace(poll=lambda timeout: polls.append(timeout) or []),
                             read_cancel_socket=object(), local_notify_socket=object())
    spin_condition.wait(reader)
    assert (yields, sleeps) == ([1], [])  # vLLM's own: a spin

    assert sleep_in_shm_busy_wait(0.0002)
    assert sleep_in_shm_busy_wait(0.0002)  # again: still one wrapper
    spin_condition.wait(reader)
    assert (yields, sleeps, polls) == ([1], [0.0002], [])
    reader.last_read -= 120  # idle past the window: vLLM's wait on the notification socket, unchanged
    spin_condition.wait(reader, timeout_ms=5)
    assert (yields, sleeps, polls) == ([1], [0.0002], [5])


def _echo(inbox: Any, outbox: Any, sleep: float) -> None:
    from vllm.distributed.device_communicators.shm_broadcast import MessageQueue

    sleep_in_shm_busy_wait(sleep)
    requests = MessageQueue.create_from_handle(inbox.get(), 0)
    answers = MessageQueue(1, 1)
    outbox.put(answers.export_handle())
    requests.wait_until_ready()
    answers.wait_until_ready()
    for _ in range(ROUND_TRIPS):
        answers.enqueue(requests.dequeue())


def test_a_real_queue_between_two_processes_delivers_promptly_with_sleeping_readers(spin_condition: Any) -> None:
    from vllm.distributed.device_communicators.shm_broadcast import MessageQueue

    assert sleep_in_shm_busy_wait(0.0001)
    context = multiprocessing.get_context("spawn")
    inbox, outbox = context.Queue(), context.Queue()
    requests = MessageQueue(1, 1)
    inbox.put(requests.export_handle())
    echo = context.Process(target=_echo, args=(inbox, outbox, 0.0001), daemon=True)
    echo.start()
    answers = MessageQueue.create_from_handle(outbox.get(timeout=120), 0)
    requests.wait_until_ready()
    answers.wait_until_ready()
    worst = 0.0
    for i in range(ROUND_TRIPS):
        if i == ROUND_TRIPS // 2:
            time.sleep(1.5)  # both readers idle past vLLM's 1 s window: they wait on the notification socket
        sent = time.monotonic()
        requests.enqueue(i)
        assert answers.dequeue(timeout=30) == i
        worst = max(worst, time.monotonic() - sent)
    echo.join(timeout=30)
    assert echo.exitcode == 0
    assert worst < 2.0, f"a message waited {worst:.2f} s (a lost wake-up waits vLLM's 5 s recheck)"
