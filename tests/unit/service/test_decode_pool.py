"""The /predict decoding pool: requests split across single-torch-thread workers, errors indexed per request."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest
import torch

from service.errors import ApiError
from service.inference.preprocess import PreprocessPool


class FakePreprocess:
    """One value per file (its length); a file b"bad" is an invalid image at its index within the call."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.threads: set[int] = set()
        self.torch_threads: set[int] = set()

    def __call__(self, files: Sequence[tuple[str, bytes]]) -> torch.Tensor:
        self.calls.append(len(files))
        self.threads.add(threading.get_ident())
        self.torch_threads.add(torch.get_num_threads())
        bad = [{"index": i, "name": name} for i, (name, data) in enumerate(files) if data == b"bad"]
        if bad:
            raise ApiError(422, "invalid_image", f"{len(bad)} images could not be decoded", {"images": bad})
        return torch.tensor([[float(len(data))] for _, data in files])


def files(*payloads: bytes) -> list[tuple[str, bytes]]:
    return [(f"{i}.png", data) for i, data in enumerate(payloads)]


def test_a_request_is_split_across_workers_and_keeps_its_order() -> None:
    preprocess = FakePreprocess()
    pool = PreprocessPool(preprocess, workers=2)
    try:
        result = asyncio.run(pool.run(files(b"a", b"bb", b"ccc", b"dddd", b"eeeee")))
    finally:
        pool.close()
    assert result.flatten().tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert sorted(preprocess.calls) == [2, 3]
    assert preprocess.torch_threads == {1}  # the workers never use the inference thread's OpenMP team size


def test_a_single_image_is_one_call() -> None:
    preprocess = FakePreprocess()
    pool = PreprocessPool(preprocess, workers=2)
    try:
        assert asyncio.run(pool.run(files(b"xy"))).tolist() == [[2.0]]
    finally:
        pool.close()
    assert preprocess.calls == [1]


def test_a_bad_image_is_reported_with_its_index_in_the_request() -> None:
    preprocess = FakePreprocess()
    pool = PreprocessPool(preprocess, workers=2)
    try:
        with pytest.raises(ApiError) as error:
            asyncio.run(pool.run(files(b"a", b"b", b"c", b"bad", b"e", b"bad")))
    finally:
        pool.close()
    assert error.value.status == 422
    assert [item["index"] for item in error.value.details["images"]] == [3, 5]
