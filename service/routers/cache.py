"""A byte-capped, two-tier LRU cache with pinning and single-flight loads.

The serving code keys it by task and stores routers in it (see "Memory: why routers are the cache unit" in the
architecture doc), but this module is generic and imports neither torch nor the project: values are opaque, and the
caller says how big they are and how to move them between tiers, so it is unit-tested with byte strings.

Tiers are exclusive: an entry is in the "device" tier, the "host" tier, or neither (only in the backing store).
One ``threading.Condition`` guards every structure; it is never held while the loader, ``to_device``, ``to_host``
or a hook runs, because those read disks, copy across PCIe or call back into the cache.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

__all__ = ["CacheCapacityError", "CacheStats", "LoadSource", "Tier", "TierStats", "TieredLRUCache"]

logger = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
_T = TypeVar("_T")
Tier = Literal["device", "host"]
LoadSource = Literal["host", "store"]


class CacheCapacityError(RuntimeError):
    """A value cannot be made resident in the device tier within its byte cap."""


@dataclass(frozen=True)
class TierStats:
    """Gauges and the eviction counter of one tier.

    Attributes:
        entries: Entries resident in the tier.
        resident_bytes: Bytes of those entries.
        capacity_bytes: The tier's cap; None means unbounded, 0 means the tier is off.
        evictions: Entries pushed out of the tier by capacity pressure (not by `discard` or `clear`).
    """

    entries: int
    resident_bytes: int
    capacity_bytes: int | None
    evictions: int


@dataclass(frozen=True)
class CacheStats:
    """A consistent snapshot of a `TieredLRUCache`; counters run from its construction.

    Attributes:
        hits: Lookups answered by the device tier.
        misses: Lookups the device tier could not answer, host hits included.
        host_hits: Misses answered by promoting the entry from the host tier.
        loads: Completed fills of the device tier, from the host tier or the backing store.
        load_failures: Fills that raised (loader, ``to_device`` or capacity error).
        load_seconds_total: Seconds spent in the loader and ``to_device`` by completed fills.
        pinned: Device entries holding at least one pin.
        device: The device tier.
        host: The host tier.
    """

    hits: int
    misses: int
    host_hits: int
    loads: int
    load_failures: int
    load_seconds_total: float
    pinned: int
    device: TierStats
    host: TierStats


@dataclass(eq=False)
class _Entry(Generic[V]):
    value: V
    size: int
    pins: int = 0


def _identity(value: _T) -> _T:
    return value


def _check_device_cap(device_bytes: int | None) -> None:
    if device_bytes is not None and device_bytes <= 0:
        raise ValueError(f"the device cap must be a positive number of bytes or None (unbounded), got {device_bytes}")


class TieredLRUCache(Generic[K, V]):
    """LRU cache with a byte-capped device tier, an optional host tier below it, pins and single-flight loads.

    A device hit moves the entry to the most recently used end; a host hit promotes the entry with ``to_device``;
    a miss runs the caller's loader once however many threads ask. To make room, least recently used unpinned device
    entries are demoted to the host tier (whose own LRU entries are dropped as needed) or dropped.

    Args:
        size_of: Size of a value in bytes. It must give the same size for a value on the device and on the host.
        device_capacity_bytes: Cap on the bytes resident in the device tier; None means unbounded.
        host_capacity_bytes: Cap on the host tier, where device evictions are demoted; 0 means no host tier.
        to_device: Moves a value to the device (after a load from the store, or on promotion from the host tier).
        to_host: Moves a value to host memory when it is demoted. Both are identity on a CPU-only machine.
        wait_timeout_s: How long a fill waits for pinned entries to be released before raising CacheCapacityError.
        on_evict: Called as ``on_evict(key, tier)`` when capacity pressure pushes an entry out of a tier (not on
            `discard` or `clear`).
        on_load: Called as ``on_load(seconds, source)`` after each completed fill, e.g. to feed a histogram.
        clock: Monotonic seconds, used to time loads.
        cap_setting: The setting named in CacheCapacityError messages, telling operators what to raise.
    """

    def __init__(
        self,
        *,
        size_of: Callable[[V], int],
        device_capacity_bytes: int | None,
        host_capacity_bytes: int = 0,
        to_device: Callable[[V], V] = _identity,
        to_host: Callable[[V], V] = _identity,
        wait_timeout_s: float = 30.0,
        on_evict: Callable[[K, Tier], None] | None = None,
        on_load: Callable[[float, LoadSource], None] | None = None,
        clock: Callable[[], float] = time.perf_counter,
        cap_setting: str = "CARE_ROUTER_CACHE_BYTES",
    ) -> None:
        _check_device_cap(device_capacity_bytes)
        if host_capacity_bytes < 0 or wait_timeout_s < 0:
            raise ValueError(
                f"need host_capacity_bytes, wait_timeout_s >= 0; got {host_capacity_bytes}, {wait_timeout_s}"
            )
        self._size_of, self._to_device, self._to_host = size_of, to_device, to_host
        self._device_cap, self._host_cap = device_capacity_bytes, host_capacity_bytes
        self._wait_timeout_s, self._clock, self._cap_setting = wait_timeout_s, clock, cap_setting
        self._on_evict, self._on_load = on_evict, on_load
        self._cond = threading.Condition(threading.Lock())
        self._device: OrderedDict[K, _Entry[V]] = OrderedDict()  # LRU first, MRU last
        self._host: OrderedDict[K, _Entry[V]] = OrderedDict()
        # A key maps to a Future while it is being filled into the device tier or demoted to the host tier; other
        # callers for that key wait on it and then look again instead of loading a second copy.
        self._inflight: dict[K, Future[None]] = {}
        self._device_bytes = self._host_bytes = 0
        self._reserved = 0  # bytes claimed by fills between eviction and insertion, so the cap covers them too
        self._hits = self._misses = self._host_hits = self._loads = self._load_failures = 0
        self._evictions: dict[Tier, int] = {"device": 0, "host": 0}
        self._load_seconds = 0.0

    def get(self, key: K, loader: Callable[[], V]) -> V:
        """Returns the value for ``key``; the entry may be evicted as soon as this returns (`hold` prevents that).

        Args:
            key: The cache key.
            loader: Reads the value from the backing store on a miss; it runs without the lock.

        Raises:
            CacheCapacityError: The value is larger than the device cap, or pinned entries did not free enough of
                it within ``wait_timeout_s``.
            Exception: Whatever the loader or ``to_device`` raised; every caller waiting on that load gets it too.
        """
        return self._acquire(key, loader, pin=False)

    @contextmanager
    def hold(self, key: K, loader: Callable[[], V]) -> Iterator[V]:
        """Context manager yielding the value for ``key`` (as `get` does) and keeping it pinned until exit."""
        value = self._acquire(key, loader, pin=True)
        try:
            yield value
        finally:
            self.unpin(key)

    def pin(self, key: K, loader: Callable[[], V]) -> V:
        """Loads ``key`` like `get` and pins it until a matching `unpin`; pins are reference-counted."""
        return self._acquire(key, loader, pin=True)

    def unpin(self, key: K) -> None:
        """Releases one pin on ``key``.

        Raises:
            KeyError: ``key`` holds no pin.
        """
        with self._cond:
            entry = self._device.get(key)
            if entry is None or entry.pins == 0:
                raise KeyError(f"{key!r} is not pinned")
            entry.pins -= 1
            if entry.pins == 0:
                self._cond.notify_all()  # fills waiting for capacity may now evict it

    def contains(self, key: K) -> bool:
        """Whether ``key`` is resident in either tier."""
        with self._cond:
            return key in self._device or key in self._host

    def keys(self, tier: Tier) -> list[K]:
        """The keys resident in ``tier``, least recently used first."""
        with self._cond:
            return list(self._device if tier == "device" else self._host)

    def discard(self, key: K) -> bool:
        """Drops ``key`` from both tiers unless it is pinned, and says whether it dropped it; loads go on."""
        with self._cond:
            entry = self._device.get(key)
            if entry is not None and entry.pins == 0:
                del self._device[key]
                self._device_bytes -= entry.size
            elif (entry := self._host.pop(key, None)) is not None:
                self._host_bytes -= entry.size
            else:
                return False
            self._cond.notify_all()
            return True

    def clear(self) -> int:
        """Drops every unpinned entry from both tiers and returns how many were dropped."""
        with self._cond:
            dropped = len(self._host)
            self._host.clear()
            self._host_bytes = 0
            for key in [k for k, e in self._device.items() if e.pins == 0]:
                self._device_bytes -= self._device.pop(key).size
                dropped += 1
            self._cond.notify_all()
            return dropped

    def set_capacity(self, device_bytes: int | None) -> None:
        """Changes the device cap: shrinking evicts (and demotes) LRU entries, growing wakes waiting fills.

        Raises:
            ValueError: ``device_bytes`` is not positive.
            CacheCapacityError: Pinned or loading entries alone exceed ``device_bytes``; nothing is changed.
        """
        _check_device_cap(device_bytes)
        with self._cond:
            held = self._reserved + sum(e.size for e in self._device.values() if e.pins)
            if device_bytes is not None and held > device_bytes:
                raise CacheCapacityError(
                    f"cannot shrink the device cap to {device_bytes} bytes: {held} bytes are "
                    "pinned or loading; unpin tasks first"
                )
            self._device_cap = device_bytes
            victims = self._evict_for(0)
            self._cond.notify_all()  # a larger cap may let waiting fills proceed
        self._demote(victims or [])

    def stats(self) -> CacheStats:
        """A consistent snapshot of the counters and gauges."""
        with self._cond:
            return CacheStats(
                hits=self._hits,
                misses=self._misses,
                host_hits=self._host_hits,
                loads=self._loads,
                load_failures=self._load_failures,
                load_seconds_total=self._load_seconds,
                pinned=sum(1 for e in self._device.values() if e.pins),
                device=TierStats(len(self._device), self._device_bytes, self._device_cap, self._evictions["device"]),
                host=TierStats(len(self._host), self._host_bytes, self._host_cap, self._evictions["host"]),
            )

    def _acquire(self, key: K, loader: Callable[[], V], pin: bool) -> V:
        # Check, lock, check again: every pass looks under the lock; a caller that finds the key in flight waits
        # for that fill (or demotion) and then looks again, so only one thread per key runs the loader.
        counted = False
        while True:
            with self._cond:
                entry = self._device.get(key)
                if entry is not None:
                    self._device.move_to_end(key)
                    self._hits += 0 if counted else 1
                    entry.pins += 1 if pin else 0
                    return entry.value
                self._misses += 0 if counted else 1
                counted = True
                flight = self._inflight.get(key)
                if flight is None:
                    flight = self._inflight[key] = Future()
                    # NOTE: a promoted entry leaves the host tier now, so the demotions that make room for it
                    # cannot push it out; lookups wait on the flight meanwhile; a failed promotion puts it back.
                    if (source := self._host.pop(key, None)) is not None:
                        self._host_bytes -= source.size
                        self._host_hits += 1
                    break
            flight.result()  # re-raises the filling thread's exception
        return self._fill(key, flight, source, loader, pin)

    def _fill(self, key: K, flight: Future[None], source: _Entry[V] | None, loader: Callable[[], V], pin: bool) -> V:
        reserved = 0
        try:
            started = self._clock()
            raw = loader() if source is None else source.value
            size = self._size_of(raw) if source is None else source.size
            seconds = self._clock() - started
            victims = self._reserve(key, size)
            reserved = size
            # NOTE: demote before to_device, so the victims' device memory is freed before the new value needs it.
            self._demote(victims)
            del victims
            started = self._clock()
            value = self._to_device(raw)
            seconds += self._clock() - started
        except BaseException as exc:
            with self._cond:
                self._reserved -= reserved
                del self._inflight[key]
                self._load_failures += 1
                dropped = [] if source is None else self._put_host(key, source)
                self._cond.notify_all()
            flight.set_exception(exc)
            for old_key in dropped:
                self._run_hook(self._on_evict, old_key, "host")
            raise
        with self._cond:
            self._reserved -= size
            self._device[key] = _Entry(value, size, pins=int(pin))
            self._device_bytes += size
            self._loads += 1
            self._load_seconds += seconds
            del self._inflight[key]
            self._cond.notify_all()  # the reservation is now an entry that waiting fills may evict
        flight.set_result(None)
        logger.debug("cache filled %r (%d bytes) in %.4fs", key, size, seconds)
        self._run_hook(self._on_load, seconds, "store" if source is None else "host")
        return value

    def _reserve(self, key: K, size: int) -> list[tuple[K, _Entry[V]]]:
        cap = self._device_cap
        if cap is not None and size > cap:
            raise CacheCapacityError(
                f"{key!r} needs {size} bytes but the device cap is {cap} bytes; "
                f"set {self._cap_setting} to at least {size}"
            )
        deadline = time.monotonic() + self._wait_timeout_s
        with self._cond:
            if (victims := self._evict_for(size)) is None:
                logger.info("cache fill of %r waits for %d bytes held by pinned entries", key, size)
            while victims is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    assert cap is not None  # an unbounded tier never has to wait
                    free = cap - self._reserved - sum(e.size for e in self._device.values() if e.pins)
                    raise CacheCapacityError(
                        f"{key!r} needs {size} bytes but only {free} of the {cap}-byte device cap can be freed "
                        f"(the rest stayed pinned or loading for {self._wait_timeout_s}s); raise {self._cap_setting}"
                    )
                self._cond.wait(remaining)
                victims = self._evict_for(size)
            self._reserved += size
        return victims

    def _evict_for(self, size: int) -> list[tuple[K, _Entry[V]]] | None:
        """Under the lock: evicts LRU unpinned device entries until ``size`` more bytes fit, or returns None
        (evicting nothing) when the pinned and reserved bytes make that impossible."""
        cap = self._device_cap
        used = self._device_bytes + self._reserved
        if cap is None or used + size <= cap:
            return []
        unpinned = [(k, e) for k, e in self._device.items() if e.pins == 0]
        if used - sum(e.size for _, e in unpinned) + size > cap:
            return None
        victims: list[tuple[K, _Entry[V]]] = []
        for key, entry in unpinned:
            if used + size <= cap:
                break
            del self._device[key]
            self._device_bytes -= entry.size
            used -= entry.size
            self._evictions["device"] += 1
            victims.append((key, entry))
            if self._host_cap > 0:
                self._inflight[key] = Future()  # lookups of a key being demoted wait, then promote it from host
        return victims

    def _demote(self, victims: list[tuple[K, _Entry[V]]]) -> None:
        """Without the lock: moves evicted device entries to the host tier (or drops them) and fires the hooks."""
        for key, entry in victims:
            logger.debug("cache evicted %r (%d bytes) from device", key, entry.size)
            self._run_hook(self._on_evict, key, "device")
            if self._host_cap == 0:
                continue
            try:
                fits = entry.size <= self._host_cap  # else it is dropped, without a wasted copy
                host_entry = _Entry(self._to_host(entry.value), entry.size) if fits else None
            except Exception:
                # The eviction serves another key's fill, which must not fail for it; the entry is just dropped.
                logger.exception("to_host failed for %r; dropping it", key)
                host_entry = None
            with self._cond:
                flight = self._inflight.pop(key)
                dropped = [] if host_entry is None else self._put_host(key, host_entry)
            flight.set_result(None)
            for old_key in dropped:
                self._run_hook(self._on_evict, old_key, "host")

    def _put_host(self, key: K, entry: _Entry[V]) -> list[K]:
        """Under the lock: inserts into the host tier, evicting its LRU entries; returns the evicted keys."""
        assert entry.size <= self._host_cap  # callers drop entries too big for the host tier
        dropped: list[K] = []
        while self._host_bytes + entry.size > self._host_cap:
            old_key, old = self._host.popitem(last=False)
            self._host_bytes -= old.size
            self._evictions["host"] += 1
            dropped.append(old_key)
        self._host[key] = entry
        self._host_bytes += entry.size
        logger.debug("cache moved %r to host, evicting %r", key, dropped)
        return dropped

    @staticmethod
    def _run_hook(hook: Callable[..., None] | None, *args: object) -> None:
        # Hooks feed metrics; a broken one must not fail a request or leave the cache half-updated.
        if hook is not None:
            try:
                hook(*args)
            except Exception:
                logger.exception("cache hook %r failed", hook)
