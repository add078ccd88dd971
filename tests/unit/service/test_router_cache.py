"""Tests for service.routers.cache: state traces at tiny byte caps, gated concurrency, a seeded random walk.

Values are byte strings whose size is their length. Concurrency tests never sleep to wait for a state change:
fake loaders block on ``threading.Event`` gates, and the test polls the cache's stats with a bounded timeout.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from service.routers.cache import CacheCapacityError, CacheStats, Tier, TieredLRUCache

WAIT_S = 5.0  # upper bound for anything a test waits on; a healthy run needs milliseconds

Cache = TieredLRUCache[str, bytes]


def wait_until(predicate: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
    """Polls ``predicate`` until it holds; fails the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not reached within {timeout_s}s")
        time.sleep(0.001)


class Store:
    """Backing store: key -> size; every load returns a fresh bytes object and is counted."""

    def __init__(self, sizes: dict[str, int]) -> None:
        self.sizes = sizes
        self.calls: Counter[str] = Counter()

    def value(self, key: str) -> bytes:
        return (key.encode() * self.sizes[key])[: self.sizes[key]]

    def loader(self, key: str, gate: threading.Event | None = None) -> Callable[[], bytes]:
        def load() -> bytes:
            self.calls[key] += 1
            if gate is not None:
                assert gate.wait(WAIT_S), "test never opened the gate"
            return bytes(bytearray(self.value(key)))

        return load


class Worker(threading.Thread):
    """Runs ``fn`` on its own thread and keeps its result or exception."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self.fn, self.result, self.error = fn, None, None
        self.done = threading.Event()

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as exc:
            self.error = exc
        finally:
            self.done.set()

    def finish(self) -> Any:
        self.join(WAIT_S)
        assert not self.is_alive(), "worker thread is stuck"
        return self.result


def make_cache(device: int | None = 10, host: int = 0, **kwargs: Any) -> Cache:
    return TieredLRUCache(size_of=len, device_capacity_bytes=device, host_capacity_bytes=host, **kwargs)


def check_invariants(cache: Cache, sizes: dict[str, int]) -> CacheStats:
    """The invariants that must hold between operations: caps respected, tiers exclusive, books balanced."""
    stats = cache.stats()
    device, host = cache.keys("device"), cache.keys("host")
    assert not set(device) & set(host), "tiers must be exclusive"
    assert (stats.device.entries, stats.host.entries) == (len(device), len(host))
    assert stats.device.resident_bytes == sum(sizes[k] for k in device)
    assert stats.host.resident_bytes == sum(sizes[k] for k in host)
    if stats.device.capacity_bytes is not None:
        assert stats.device.resident_bytes <= stats.device.capacity_bytes
    assert stats.host.resident_bytes <= stats.host.capacity_bytes
    return stats


def expect(cache: Cache, store: Store, device: str, host: str = "", **counters: int | float) -> None:
    """Asserts the tier contents (keys are single letters, LRU first) and the named stats.

    A ``device_`` name reads that field of the device TierStats (``device_evictions`` -> ``stats.device.evictions``);
    any other name is a CacheStats field.
    """
    check_invariants(cache, store.sizes)
    assert (cache.keys("device"), cache.keys("host")) == (list(device), list(host))
    stats = cache.stats()
    for name, expected in counters.items():
        actual = getattr(stats.device, name[7:]) if name.startswith("device_") else getattr(stats, name)
        assert actual == expected, f"{name}: {actual} != {expected}"


def test_lru_trace_evicts_least_recently_used() -> None:
    store = Store({"a": 4, "b": 4, "c": 4, "d": 2})
    cache = make_cache(10)
    assert cache.get("a", store.loader("a")) == b"aaaa"
    expect(cache, store, "a", hits=0, misses=1, loads=1)
    cache.get("b", store.loader("b"))
    expect(cache, store, "ab", misses=2)
    cache.get("a", store.loader("a"))
    expect(cache, store, "ba", hits=1, misses=2, loads=2)
    cache.get("c", store.loader("c"))
    expect(cache, store, "ac", device_evictions=1, device_resident_bytes=8)
    cache.get("d", store.loader("d"))  # 4 + 4 + 2 fills the cap exactly
    expect(cache, store, "acd", device_evictions=1, device_resident_bytes=10)
    cache.get("b", store.loader("b"))
    expect(cache, store, "cdb", device_evictions=2, hits=1, misses=5, loads=5, host_hits=0)
    assert store.calls == {"a": 1, "b": 2, "c": 1, "d": 1}


def test_evictions_demote_to_host_and_host_hits_promote() -> None:
    store = Store({"a": 4, "b": 4, "c": 4})
    to_host_args: list[bytes] = []

    def to_host(value: bytes) -> bytes:
        to_host_args.append(value)
        return value.lower()

    cache = make_cache(10, host=8, to_device=bytes.upper, to_host=to_host)
    assert cache.get("a", store.loader("a")) == b"AAAA"
    cache.get("b", store.loader("b"))
    cache.get("c", store.loader("c"))
    expect(cache, store, "bc", "a", device_evictions=1, misses=3, host_hits=0)
    assert to_host_args == [b"AAAA"]
    assert cache.get("a", store.loader("a")) == b"AAAA"  # promoted through to_device, not reloaded
    expect(cache, store, "ca", "b", device_evictions=2, misses=4, host_hits=1, loads=4, hits=0)
    assert store.calls["a"] == 1
    assert to_host_args == [b"AAAA", b"BBBB"]
    cache.get("a", store.loader("a"))
    expect(cache, store, "ca", "b", hits=1, misses=4, host_hits=1)
    assert cache.contains("b") and cache.contains("a") and not cache.contains("zz")


def test_host_overflow_evicts_host_lru_and_drops_values_too_big_for_host() -> None:
    store = Store({"a": 4, "b": 4, "c": 4, "d": 4, "e": 9})
    events: list[tuple[str, Tier]] = []
    cache = make_cache(10, host=8, on_evict=lambda key, tier: events.append((key, tier)))
    for key in "abcd":
        cache.get(key, store.loader(key))
    expect(cache, store, "cd", "ab", device_evictions=2)
    cache.get("e", store.loader("e"))  # evicts c and d; demoting them pushes a and b out of the host tier
    expect(cache, store, "e", "cd", device_evictions=4)
    assert cache.stats().host.evictions == 2
    cache.get("a", store.loader("a"))  # e (9 bytes) cannot fit in the 8-byte host tier: dropped
    expect(cache, store, "a", "cd", device_evictions=5)
    assert cache.stats().host.evictions == 2
    assert store.calls["a"] == 2
    assert events == [
        ("a", "device"),
        ("b", "device"),
        ("c", "device"),
        ("a", "host"),
        ("d", "device"),
        ("b", "host"),
        ("e", "device"),
    ]


def test_held_entry_is_never_evicted_and_is_released_on_exit() -> None:
    store = Store({"a": 4, "b": 4, "c": 4})
    cache = make_cache(10)
    with cache.hold("a", store.loader("a")) as value:
        assert value == b"aaaa"
        cache.get("b", store.loader("b"))
        cache.get("c", store.loader("c"))  # a is least recently used but pinned, so b goes
        expect(cache, store, "ac", pinned=1, device_evictions=1)
    expect(cache, store, "ac", pinned=0)
    cache.get("b", store.loader("b"))
    expect(cache, store, "cb", device_evictions=2)
    with pytest.raises(ValueError, match="inside"), cache.hold("c", store.loader("c")):
        raise ValueError("inside the block")
    expect(cache, store, "bc", pinned=0)


def test_explicit_pins_are_reference_counted() -> None:
    store = Store({"a": 4, "b": 4, "c": 4})
    cache = make_cache(8)
    assert cache.pin("a", store.loader("a")) == b"aaaa"
    cache.pin("a", store.loader("a"))
    cache.unpin("a")
    cache.get("b", store.loader("b"))
    cache.get("c", store.loader("c"))
    expect(cache, store, "ac", pinned=1, device_evictions=1, hits=1)
    cache.unpin("a")
    expect(cache, store, "ac", pinned=0)
    with pytest.raises(KeyError, match="not pinned"):
        cache.unpin("a")
    with pytest.raises(KeyError, match="not pinned"):
        cache.unpin("missing")
    cache.get("b", store.loader("b"))
    expect(cache, store, "cb")


def test_discard_and_clear_skip_pinned_entries_and_fire_no_eviction_hook() -> None:
    store = Store({"a": 4, "b": 4, "c": 4})
    events: list[tuple[str, Tier]] = []
    cache = make_cache(10, host=8, on_evict=lambda key, tier: events.append((key, tier)))
    cache.pin("a", store.loader("a"))
    cache.get("b", store.loader("b"))
    cache.get("c", store.loader("c"))
    expect(cache, store, "ac", "b")
    events.clear()
    assert cache.discard("a") is False
    assert cache.discard("b") is True
    assert cache.discard("missing") is False
    expect(cache, store, "ac", "")
    assert cache.discard("c") is True
    expect(cache, store, "a")
    cache.get("b", store.loader("b"))
    cache.get("c", store.loader("c"))  # demotes b
    events.clear()
    assert cache.clear() == 2
    expect(cache, store, "a", "", pinned=1)
    assert events == []
    assert cache.stats().host.evictions == 0


def test_value_larger_than_device_cap_fails_fast_and_leaves_the_cache_alone() -> None:
    store = Store({"a": 4, "big": 11})
    cache = make_cache(10)
    cache.get("a", store.loader("a"))
    with pytest.raises(CacheCapacityError, match=r"needs 11 bytes.*cap is 10.*CARE_ROUTER_CACHE_BYTES to at least 11"):
        cache.get("big", store.loader("big"))
    expect(cache, store, "a", load_failures=1, loads=1)
    with pytest.raises(CacheCapacityError):  # a failure is not cached: the next call tries again
        cache.get("big", store.loader("big"))
    assert store.calls["big"] == 2


def test_fill_waits_for_pinned_capacity_until_it_is_released() -> None:
    store = Store({"a": 8, "b": 6})
    cache = make_cache(10, wait_timeout_s=60)  # far beyond WAIT_S: a missed wake-up shows as a stuck worker
    cache.pin("a", store.loader("a"))
    worker = Worker(lambda: cache.get("b", store.loader("b")))
    worker.start()
    wait_until(lambda: store.calls["b"] == 1)
    assert not worker.done.wait(0.05), "the fill must wait while a is pinned"
    expect(cache, store, "a", pinned=1)
    cache.unpin("a")
    assert worker.finish() == b"bbbbbb"
    expect(cache, store, "b", device_evictions=1, pinned=0, loads=2)


def test_set_capacity_growth_wakes_a_waiting_fill() -> None:
    store = Store({"a": 8, "b": 6})
    cache = make_cache(10, wait_timeout_s=60)  # far beyond WAIT_S: a missed wake-up shows as a stuck worker
    cache.pin("a", store.loader("a"))
    worker = Worker(lambda: cache.get("b", store.loader("b")))
    worker.start()
    wait_until(lambda: store.calls["b"] == 1)
    cache.set_capacity(14)
    assert worker.finish() == b"bbbbbb"
    expect(cache, store, "ab", device_evictions=0, device_capacity_bytes=14)


def test_fill_waiting_for_pinned_capacity_times_out_with_a_clear_error() -> None:
    store = Store({"a": 8, "b": 6})
    cache = make_cache(10, wait_timeout_s=0.05, cap_setting="CARE_TEST_CAP")
    cache.pin("a", store.loader("a"))
    started = time.monotonic()
    with pytest.raises(CacheCapacityError, match=r"needs 6 bytes but only 2 of the 10-byte .*raise CARE_TEST_CAP"):
        cache.get("b", store.loader("b"))
    assert time.monotonic() - started >= 0.05
    expect(cache, store, "a", pinned=1, load_failures=1, loads=1)
    cache.unpin("a")
    cache.get("b", store.loader("b"))  # retried after the failure
    expect(cache, store, "b", load_failures=1, loads=2)


def test_failed_promotion_puts_the_entry_back_in_the_host_tier() -> None:
    store = Store({"a": 4, "b": 8})
    fail_next = [False]

    def to_device(value: bytes) -> bytes:
        if fail_next[0]:
            fail_next[0] = False
            raise RuntimeError("device out of memory")
        return value

    cache = make_cache(8, host=8, wait_timeout_s=0, to_device=to_device)
    cache.get("a", store.loader("a"))
    cache.pin("b", store.loader("b"))  # demotes a; b now holds the whole device cap
    with pytest.raises(CacheCapacityError, match="only 0 of the 8-byte"):
        cache.get("a", store.loader("a"))
    expect(cache, store, "b", "a", host_hits=1, load_failures=1)
    cache.unpin("b")
    fail_next[0] = True
    with pytest.raises(RuntimeError, match="out of memory"):
        cache.get("a", store.loader("a"))  # b is demoted to make room, then to_device fails
    # a goes back to the host tier as its most recent entry, which pushes b (8 bytes) out of the 8-byte tier.
    expect(cache, store, "", "a", host_hits=2, load_failures=2)
    assert cache.stats().host.evictions == 1
    assert cache.get("a", store.loader("a")) == b"aaaa"
    expect(cache, store, "a", "", host_hits=3, loads=3)
    assert store.calls == {"a": 1, "b": 1}


def test_bytes_of_a_fill_in_progress_count_against_the_cap() -> None:
    store = Store({"a": 6, "b": 6})
    entered, gate = threading.Event(), threading.Event()

    def slow_to_device(value: bytes) -> bytes:
        entered.set()
        assert gate.wait(WAIT_S)
        return value

    cache = make_cache(10, wait_timeout_s=0, to_device=slow_to_device)
    filler = Worker(lambda: cache.get("a", store.loader("a")))
    filler.start()
    assert entered.wait(WAIT_S)  # a's 6 bytes are claimed while it is copied to the device
    with pytest.raises(CacheCapacityError, match="needs 6 bytes but only 4 of the 10-byte"):
        cache.get("b", store.loader("b"))
    gate.set()
    assert filler.finish() == b"aaaaaa"
    expect(cache, store, "a", loads=1, load_failures=1)


def test_set_capacity_shrinks_by_demoting_and_refuses_to_drop_pins() -> None:
    store = Store({"a": 4, "b": 4, "c": 4})
    cache = make_cache(12, host=4)
    for key in "abc":
        cache.get(key, store.loader(key))
    cache.set_capacity(8)
    expect(cache, store, "bc", "a", device_evictions=1, device_capacity_bytes=8)
    cache.pin("b", store.loader("b"))
    with pytest.raises(CacheCapacityError, match="4 bytes are pinned"):
        cache.set_capacity(2)
    expect(cache, store, "cb", "a", device_capacity_bytes=8)
    with pytest.raises(ValueError, match="positive"):
        cache.set_capacity(0)
    cache.set_capacity(None)
    cache.get("a", store.loader("a"))
    expect(cache, store, "cba", device_capacity_bytes=None, device_evictions=1)


def test_concurrent_misses_for_one_key_run_the_loader_once() -> None:
    store = Store({"k": 4})
    cache = make_cache(10)
    gate = threading.Event()
    workers = [Worker(lambda: cache.get("k", store.loader("k", gate))) for _ in range(8)]
    for worker in workers:
        worker.start()
    wait_until(lambda: cache.stats().misses == len(workers))  # every caller has seen the miss
    assert store.calls["k"] == 1 and not cache.contains("k")
    gate.set()
    results = [worker.finish() for worker in workers]
    assert results[0] == b"kkkk"
    assert all(result is results[0] for result in results)
    expect(cache, store, "k", misses=8, hits=0, loads=1)
    assert store.calls["k"] == 1


def test_loader_failure_reaches_every_waiter_and_a_later_call_retries() -> None:
    cache = make_cache(10)
    gate = threading.Event()
    calls: list[int] = []

    def failing_loader() -> bytes:
        calls.append(1)
        assert gate.wait(WAIT_S)
        raise OSError("disk gone")

    workers = [Worker(lambda: cache.get("k", failing_loader)) for _ in range(5)]
    for worker in workers:
        worker.start()
    wait_until(lambda: cache.stats().misses == len(workers))
    gate.set()
    for worker in workers:
        worker.finish()
    errors = [worker.error for worker in workers]
    assert isinstance(errors[0], OSError) and all(error is errors[0] for error in errors)
    assert len(calls) == 1 and not cache.contains("k")
    assert cache.get("k", lambda: b"kkkk") == b"kkkk"
    stats = cache.stats()
    assert (stats.load_failures, stats.loads, stats.misses) == (1, 1, 6)


def test_lookup_of_a_key_being_demoted_waits_and_promotes_it() -> None:
    store = Store({"a": 4, "b": 4, "c": 4})
    entered, gate = threading.Event(), threading.Event()

    def slow_to_host(value: bytes) -> bytes:
        entered.set()
        assert gate.wait(WAIT_S)
        return value

    cache = make_cache(10, host=8, to_host=slow_to_host)
    cache.get("a", store.loader("a"))
    cache.get("b", store.loader("b"))
    filler = Worker(lambda: cache.get("c", store.loader("c")))  # evicts a; its demotion blocks on the gate
    filler.start()
    assert entered.wait(WAIT_S)
    assert not cache.contains("a")
    reader = Worker(lambda: cache.get("a", store.loader("a")))
    reader.start()
    wait_until(lambda: cache.stats().misses == 4)
    gate.set()
    assert filler.finish() == b"cccc" and reader.finish() == b"aaaa"
    assert store.calls["a"] == 1, "a must come back from the host tier, not the store"
    check_invariants(cache, store.sizes)
    assert set(cache.keys("device")) == {"a", "c"} and cache.keys("host") == ["b"]
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.host_hits, stats.loads) == (0, 4, 1, 4), "the reader's miss counts once"


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_on_load_reports_seconds_and_source() -> None:
    clock = FakeClock()
    loads: list[tuple[float, str]] = []
    store = Store({"a": 4, "b": 4})

    def loader(key: str) -> Callable[[], bytes]:
        def load() -> bytes:
            clock.advance(2.5)
            return store.value(key)

        return load

    def to_device(value: bytes) -> bytes:
        clock.advance(0.5)
        return value

    cache = make_cache(4, host=4, to_device=to_device, clock=clock, on_load=lambda s, src: loads.append((s, src)))
    cache.get("a", loader("a"))
    cache.get("b", loader("b"))  # demotes a
    cache.get("a", loader("a"))  # promotes a: only to_device is timed
    assert loads == [(3.0, "store"), (3.0, "store"), (0.5, "host")]
    expect(cache, store, "a", "b", host_hits=1)
    assert cache.stats().host.evictions == 0, "the promoted entry left the host tier before b was demoted"
    assert cache.stats().load_seconds_total == 6.5


def test_a_failing_hook_is_logged_and_does_not_break_the_cache(caplog: pytest.LogCaptureFixture) -> None:
    def broken(*args: object) -> None:
        raise RuntimeError("metrics backend down")

    store = Store({"a": 4, "b": 4})
    cache = make_cache(4, on_evict=broken, on_load=broken)
    with caplog.at_level(logging.ERROR, logger="service.routers.cache"):
        cache.get("a", store.loader("a"))
        assert cache.get("b", store.loader("b")) == b"bbbb"
    expect(cache, store, "b", device_evictions=1, loads=2)
    assert "hook" in caplog.text and "metrics backend down" in caplog.text


def test_constructor_rejects_bad_capacities() -> None:
    with pytest.raises(ValueError, match="positive"):
        make_cache(0)
    with pytest.raises(ValueError, match="host_capacity_bytes"):
        make_cache(10, host=-1)


def test_random_operations_keep_the_invariants() -> None:
    rng = random.Random(20240917)
    sizes = {f"k{i}": rng.randint(1, 6) for i in range(10)}
    store = Store(sizes)
    cache = make_cache(12, host=9, wait_timeout_s=0)  # no waiting: an impossible fill raises at once
    pins: Counter[str] = Counter()
    lookups = 0

    def pinned_bytes() -> int:
        return sum(sizes[k] for k, n in pins.items() if n)

    for _ in range(3000):
        key, op = rng.choice(list(sizes)), rng.random()
        cap = cache.stats().device.capacity_bytes
        if op < 0.7:
            pin = op < 0.07
            resident = key in cache.keys("device")
            lookups += 1
            try:
                value = cache.pin(key, store.loader(key)) if pin else cache.get(key, store.loader(key))
            except CacheCapacityError:
                assert not resident and cap is not None and pinned_bytes() + sizes[key] > cap
            else:
                assert value == store.value(key)
                assert cache.keys("device")[-1] == key, "a lookup makes its key most recently used"
                pins[key] += pin
        elif op < 0.85:
            held = [k for k, n in pins.items() if n]
            if held:
                key = rng.choice(held)
                cache.unpin(key)
                pins[key] -= 1
        elif op < 0.92:
            was_resident, is_pinned = cache.contains(key), pins[key] > 0
            assert cache.discard(key) == (was_resident and not is_pinned)
            assert cache.contains(key) == is_pinned
        elif op < 0.93:
            cache.clear()
        else:
            new_cap = rng.choice([None, *range(6, 17)])
            try:
                cache.set_capacity(new_cap)
            except CacheCapacityError:
                assert new_cap is not None and pinned_bytes() > new_cap
        stats = check_invariants(cache, sizes)
        device = cache.keys("device")
        assert all(k in device for k, n in pins.items() if n), "pinned keys stay on the device"
        assert stats.pinned == sum(1 for n in pins.values() if n)
        assert stats.hits + stats.misses == lookups
        assert sum(store.calls.values()) + stats.host_hits == stats.loads + stats.load_failures
    final = cache.stats()
    assert final.device.evictions > 100 and final.host.evictions > 10 and final.host_hits > 100


def test_concurrent_random_walk_keeps_the_invariants_and_finishes() -> None:
    sizes = {f"k{i}": 1 + i % 5 for i in range(20)}
    store = Store(sizes)
    store_lock = threading.Lock()
    cache = make_cache(12, host=8, wait_timeout_s=WAIT_S)

    def load(key: str) -> Callable[[], bytes]:
        def locked_load() -> bytes:
            with store_lock:  # Counter updates are not atomic
                return store.loader(key)()

        return locked_load

    def assert_within_caps() -> None:
        stats = cache.stats()  # one snapshot taken under the cache's lock
        assert stats.device.capacity_bytes is not None
        assert stats.device.resident_bytes <= stats.device.capacity_bytes and stats.host.resident_bytes <= 8

    def walk(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(800):
            key, op = rng.choice(list(sizes)), rng.random()
            if op < 0.45:
                assert cache.get(key, load(key)) == store.value(key)
            elif op < 0.9:
                with cache.hold(key, load(key)) as value:
                    assert value == store.value(key) and key in cache.keys("device")
                    assert_within_caps()
            elif op < 0.96:
                cache.discard(key)
            else:
                # Documented refusal: the other three walkers can pin or load up to 15 bytes at once, more than
                # the smaller caps; the cap then stays as it was, which assert_within_caps checks.
                with contextlib.suppress(CacheCapacityError):
                    cache.set_capacity(rng.choice([12, 14, 16]))
            assert_within_caps()

    workers = [Worker(lambda seed=seed: walk(seed)) for seed in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.finish()
        assert worker.error is None, repr(worker.error)
    stats = check_invariants(cache, sizes)
    assert stats.pinned == 0 and stats.load_failures == 0
    assert sum(store.calls.values()) + stats.host_hits == stats.loads
