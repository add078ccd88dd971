"""Micro-batching: requests are grouped up to the batch size, one model per batch, a full queue answers 429.

Nothing sleeps to wait for a state change: a gated model says when a batch has reached the executor
(`FakeVersion.entered`), and queue states are polled with a deadline (`until`). The one fixed pause left is where a
test asserts that something does *not* happen while the executor is busy.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch

from service.errors import ApiError
from service.inference.batcher import MicroBatcher

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class FakeVersion:
    """Returns each image's first pixel as its 'probability'; can be gated to hold a batch on the executor."""

    def __init__(self, version: int, gate: threading.Event | None = None) -> None:
        self.version = version
        self.gate = gate
        self.batches: list[int] = []
        self.entered = threading.Event()  # a batch has reached the executor

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(5), "test gate never opened"
        self.batches.append(len(images))
        return images[:, :1, 0, 0] * 0 + self.version


def images(count: int, value: float = 0.0) -> torch.Tensor:
    return torch.full((count, 3, 2, 2), value)


def batcher(model: Any, **options: Any) -> tuple[MicroBatcher, list[int]]:
    sizes: list[int] = []
    settings = {"max_batch_size": 8, "max_wait_s": 0.05, "max_queue_images": 64, "threads": 1} | options
    return MicroBatcher(lambda: model, on_batch=lambda size, _seconds: sizes.append(size), **settings), sizes


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    """Let the event loop run until `condition()` holds; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s"
        await asyncio.sleep(0.001)


async def held(model: FakeVersion) -> None:
    """Wait until a batch is on the executor (and held there by the model's gate)."""
    assert await asyncio.to_thread(model.entered.wait, 10), "no batch reached the executor"


async def test_concurrent_requests_share_a_batch() -> None:
    model = FakeVersion(1)
    micro, sizes = batcher(model, max_wait_s=0.2)
    micro.start()
    results = await asyncio.gather(*(micro.submit(images(2)) for _ in range(3)))
    await micro.stop()
    assert sizes == [6]
    assert [r.probabilities.shape[0] for r in results] == [2, 2, 2]


async def test_batches_never_exceed_the_maximum_size() -> None:
    gate = threading.Event()
    model = FakeVersion(1, gate)
    micro, sizes = batcher(model, max_wait_s=0.01)
    micro.start()
    pending = [asyncio.ensure_future(micro.submit(images(4))) for _ in range(5)]
    await held(model)
    await until(lambda: micro.queued_images == 12, "three requests waiting behind the held batch of two")
    gate.set()
    await asyncio.gather(*pending)
    await micro.stop()
    assert sizes == [8, 8, 4]


async def test_each_batch_reads_the_served_version_once() -> None:
    models = [FakeVersion(1), FakeVersion(2)]
    serving = {"served": models[0]}
    micro = MicroBatcher(lambda: serving["served"], max_batch_size=4, max_wait_s=0.0, max_queue_images=64, threads=1)
    micro.start()
    first = await micro.submit(images(2))
    serving["served"] = models[1]
    second = await micro.submit(images(2))
    await micro.stop()
    assert first.served is models[0] and torch.all(first.probabilities == 1)
    assert second.served is models[1] and torch.all(second.probabilities == 2)


async def test_requests_that_wait_for_a_running_batch_form_one_full_batch() -> None:
    gate = threading.Event()
    model = FakeVersion(1, gate)
    micro, sizes = batcher(model, max_wait_s=0.0)
    micro.start()
    running = asyncio.ensure_future(micro.submit(images(1)))
    await held(model)
    waiting = [asyncio.ensure_future(micro.submit(images(2))) for _ in range(4)]
    await until(lambda: micro.queued_images == 8, "four requests queued")
    await asyncio.sleep(0.05)  # far longer than max_wait (0): still no batch may close while the executor is busy
    assert micro.queued_images == 8 and model.batches == []
    gate.set()
    await asyncio.gather(running, *waiting)
    await micro.stop()
    assert sizes == [1, 8]


async def test_full_queue_is_refused_with_retry_after_and_stop_fails_the_rest() -> None:
    gate = threading.Event()
    model = FakeVersion(1, gate)
    micro, _ = batcher(model, max_queue_images=4, max_batch_size=2, max_wait_s=0.0)
    micro.start()
    running = asyncio.ensure_future(micro.submit(images(2)))
    await held(model)
    waiting = [asyncio.ensure_future(micro.submit(images(2))) for _ in range(2)]
    await until(lambda: micro.queued_images == 4, "the queue filled to its cap")
    with pytest.raises(ApiError) as refused:
        await micro.submit(images(1))
    assert refused.value.status == 429 and refused.value.code == "overloaded"
    assert int(refused.value.headers["Retry-After"]) >= 1
    gate.set()
    await running
    stop = asyncio.ensure_future(micro.stop())
    outcomes = await asyncio.gather(*waiting, return_exceptions=True)
    await stop
    for outcome in outcomes:
        assert not isinstance(outcome, ApiError) or outcome.status == 503
    assert micro.queued_images == 0


async def test_the_queue_is_reported_as_requests_are_queued_and_taken_into_batches() -> None:
    gate = threading.Event()
    model: Any = FakeVersion(1, gate)
    reported: list[int] = []
    micro = MicroBatcher(
        lambda: model, max_batch_size=4, max_wait_s=0.0, max_queue_images=64, threads=1, on_queue=reported.append
    )
    micro.start()
    running = asyncio.ensure_future(micro.submit(images(3)))
    await held(model)
    assert reported == [3, 0]  # queued, then taken into the batch now on the executor
    waiting = [asyncio.ensure_future(micro.submit(images(2))) for _ in range(3)]
    await until(lambda: reported[-1] == 6, "three requests queued behind the held batch")
    gate.set()
    await asyncio.gather(running, *waiting)
    await micro.stop()
    # Two requests taken into the second batch one by one, the last one into the third.
    assert reported == [3, 0, 2, 4, 6, 4, 2, 0] and model.batches == [3, 4, 2]


async def test_requests_collected_when_stop_comes_are_failed_not_lost() -> None:
    # A long max_wait: the collector has taken the first request and waits for company when stop() cancels it.
    model: Any = FakeVersion(1)
    reported: list[int] = []
    micro = MicroBatcher(
        lambda: model, max_batch_size=8, max_wait_s=60.0, max_queue_images=64, threads=1, on_queue=reported.append
    )
    micro.start()
    first = asyncio.ensure_future(micro.submit(images(2)))
    await until(lambda: reported[-1:] == [0], "the collector took the request and is waiting for more")
    await micro.stop()
    with pytest.raises(ApiError) as failed:
        await asyncio.wait_for(first, 5)
    assert failed.value.status == 503 and failed.value.code == "shutting_down"
    assert model.batches == [] and micro.queued_images == 0 and reported[-1] == 0
