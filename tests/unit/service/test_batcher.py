"""Micro-batching: requests are grouped up to the batch size, one model per batch, a full queue answers 429."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
import torch

from service.errors import ApiError
from service.inference.batcher import MicroBatcher

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class FakeModel:
    """Returns each image's first pixel as its 'probability'; can be gated to hold a batch on the executor."""

    def __init__(self, version: int, gate: threading.Event | None = None) -> None:
        self.version = version
        self.gate = gate
        self.batches: list[int] = []

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        if self.gate is not None:
            assert self.gate.wait(5), "test gate never opened"
        self.batches.append(len(images))
        return images[:, :1, 0, 0] * 0 + self.version


def images(count: int, value: float = 0.0) -> torch.Tensor:
    return torch.full((count, 3, 2, 2), value)


def batcher(model: Any, **options: Any) -> tuple[MicroBatcher, list[int]]:
    sizes: list[int] = []
    settings = {"max_batch_size": 8, "max_wait_s": 0.05, "max_queue_images": 64, "threads": 1} | options
    return MicroBatcher(lambda: model, on_batch=sizes.append, **settings), sizes


async def test_concurrent_requests_share_a_batch() -> None:
    model = FakeModel(1)
    micro, sizes = batcher(model, max_wait_s=0.2)
    micro.start()
    results = await asyncio.gather(*(micro.submit(images(2)) for _ in range(3)))
    await micro.stop()
    assert sizes == [6]
    assert [r.probabilities.shape[0] for r in results] == [2, 2, 2]


async def test_batches_never_exceed_the_maximum_size() -> None:
    gate = threading.Event()
    model = FakeModel(1, gate)
    micro, sizes = batcher(model, max_wait_s=0.01)
    micro.start()
    pending = [asyncio.ensure_future(micro.submit(images(4))) for _ in range(5)]
    await asyncio.sleep(0.05)  # let the collector form its batches while the first one is held
    gate.set()
    await asyncio.gather(*pending)
    await micro.stop()
    assert max(sizes) <= 8 and sum(sizes) == 20


async def test_each_batch_reads_the_model_once() -> None:
    models = [FakeModel(1), FakeModel(2)]
    current = {"model": models[0]}
    micro = MicroBatcher(lambda: current["model"], max_batch_size=4, max_wait_s=0.0, max_queue_images=64, threads=1)
    micro.start()
    first = await micro.submit(images(2))
    current["model"] = models[1]
    second = await micro.submit(images(2))
    await micro.stop()
    assert first.model is models[0] and torch.all(first.probabilities == 1)
    assert second.model is models[1] and torch.all(second.probabilities == 2)


async def test_requests_that_wait_for_a_running_batch_form_one_full_batch() -> None:
    gate = threading.Event()
    model = FakeModel(1, gate)
    micro, sizes = batcher(model, max_wait_s=0.0)
    micro.start()
    running = asyncio.ensure_future(micro.submit(images(1)))
    await asyncio.sleep(0.05)  # the first batch is now held on the executor
    waiting = [asyncio.ensure_future(micro.submit(images(2))) for _ in range(4)]
    await asyncio.sleep(0.05)  # far longer than max_wait: still no batch may close while the executor is busy
    assert micro.queued_images == 8
    gate.set()
    await asyncio.gather(running, *waiting)
    await micro.stop()
    assert sizes == [1, 8]


async def test_full_queue_is_refused_with_retry_after_and_stop_fails_the_rest() -> None:
    gate = threading.Event()
    micro, _ = batcher(FakeModel(1, gate), max_queue_images=4, max_batch_size=2, max_wait_s=0.0)
    micro.start()
    running = asyncio.ensure_future(micro.submit(images(2)))
    await asyncio.sleep(0.05)  # the first batch is now held on the executor
    waiting = [asyncio.ensure_future(micro.submit(images(2))) for _ in range(2)]
    await asyncio.sleep(0.05)
    assert micro.queued_images == 4  # the cap
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
