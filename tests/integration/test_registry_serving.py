"""Serving from the registry: capped router caches, hot-loading and corrupted files (the registry issue's invariants).

(a) predictions with a cap that holds 10 % of the router bytes equal those with no cap;
(b) resident router bytes never exceed the cap;
(c) predictions running while new versions are published all succeed and each uses exactly one version;
(d) a corrupted or truncated registry file is refused and the last good version keeps serving.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from bench.synthetic import populate
from model.backbone import SiteBackbone, build_backbone
from model.config import ModelConfig
from model.routers import TaskRouters
from registry import Registry
from service.inference.snapshot import ServedVersion, ServingSlot, SnapshotLoader
from service.modelstore import ModelStore
from service.routers.cache import TieredLRUCache
from service.routers.source import RouterCache, new_router_cache, router_bytes

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def backbone() -> SiteBackbone:
    torch.manual_seed(0)
    return build_backbone(ModelConfig(backbone="test_vit", image_size=32), "random")


@pytest.fixture
def store(tmp_path: Path, backbone: SiteBackbone) -> ModelStore:
    return ModelStore(
        Registry.from_path(tmp_path / "registry"), ModelConfig(backbone="test_vit", image_size=32), backbone, CPU
    )


def images(count: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


class CheckedCache(TieredLRUCache[str, TaskRouters]):
    """A router cache that checks resident bytes <= cap whenever a router is taken or given back."""

    def __init__(self, cap: int) -> None:
        super().__init__(size_of=router_bytes, device_capacity_bytes=cap)
        self.cap = cap
        self.checks = 0

    @contextmanager
    def hold(self, key: str, loader):  # type: ignore[no-untyped-def, override]
        with super().hold(key, loader) as value:
            self._check()
            yield value
        self._check()

    def _check(self) -> None:
        self.checks += 1
        assert self.stats().device.resident_bytes <= self.cap


def serve(store: ModelStore, cache: RouterCache, version: int) -> ServedVersion:
    return SnapshotLoader(store, cache).load(store.registry.load_manifest(version), None)


def test_capped_cache_predicts_exactly_like_an_uncapped_one(store: ModelStore) -> None:
    manifest = populate(store, 24, classes_per_task=2)
    uncapped = serve(store, new_router_cache(CPU, None), manifest.version)
    assert uncapped.routers is not None
    total = uncapped.routers.total_bytes()
    capped_cache = CheckedCache(total // 10)
    capped = serve(store, capped_cache, manifest.version)
    batch = images(16)

    expected = uncapped.probabilities(batch)
    got = capped.probabilities(batch)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert torch.equal(got.argmax(1), expected.argmax(1))
    stats = capped_cache.stats()
    assert stats.device.evictions > 0, "the 10 % cap never bit: the test would prove nothing"
    assert stats.device.resident_bytes <= total // 10 and capped_cache.checks > 0


def test_predictions_during_publishes_each_use_exactly_one_version(store: ModelStore) -> None:
    first = populate(store, 3, classes_per_task=2, seed=1)
    cache = new_router_cache(CPU, None)
    serving = ServingSlot(SnapshotLoader(store, cache))
    serving.update_to(first.version)
    batch = images(4, seed=5)
    results: list[tuple[int, torch.Tensor]] = []
    errors: list[BaseException] = []
    done = threading.Event()
    final: list[int] = []

    def predict_until_done() -> None:
        try:
            while True:
                served = serving.served  # one reference per batch: the batch runs on exactly this version
                assert served.version is not None
                results.append((served.version, served.probabilities(batch)))
                if done.is_set() and served.version == final[0]:
                    return
        except BaseException as exc:
            errors.append(exc)

    predictor = threading.Thread(target=predict_until_done)
    predictor.start()
    manifest = first
    for step in range(6):
        manifest = populate(store, 1, classes_per_task=2, seed=10 + step, parent=manifest)
        assert serving.update_to(manifest.version)
    final.append(manifest.version)
    done.set()
    predictor.join(timeout=60)
    assert not predictor.is_alive() and not errors, errors

    seen = sorted({version for version, _ in results})
    assert seen[-1] == manifest.version and len(seen) >= 2
    fresh = new_router_cache(CPU, None)
    for version in seen:
        reference = serve(store, fresh, version).probabilities(batch)
        for got_version, got in results:
            if got_version == version:
                assert got.shape == reference.shape  # as many classes as that version has
                torch.testing.assert_close(got, reference, rtol=0, atol=1e-6)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
@pytest.mark.parametrize("role", ["experts", "routers"])
def test_corrupted_version_is_refused_and_the_last_good_one_keeps_serving(
    store: ModelStore, damage: str, role: str
) -> None:
    good = populate(store, 2, classes_per_task=2, seed=3)
    failures: list[tuple[int, Exception]] = []
    serving = ServingSlot(
        SnapshotLoader(store, new_router_cache(CPU, None)), on_failure=lambda v, e: failures.append((v, e))
    )
    assert serving.update_to(good.version)
    bad = populate(store, 1, classes_per_task=2, seed=4, parent=good)
    path = store.registry.backend.local_path(bad.tasks[-1].files[role])
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[-5] ^= 0xFF
        path.write_bytes(bytes(data))

    assert not serving.update_to(bad.version)
    assert serving.served.version == good.version
    assert serving.served.probabilities(images(2)).shape == (2, 4)
    ((version, error),) = failures
    assert version == bad.version and str(path.name) in str(error)
