"""The time-to-live cache of directory results."""

from __future__ import annotations

import pytest

from autopull.connectors.directory.cache import MISSING, TtlCache


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_cache_returns_value_until_ttl() -> None:
    clock = Clock()
    cache: TtlCache[str, int] = TtlCache(10, clock)
    cache.put("a", 1, ttl_seconds=60)

    clock.now += 59.9
    before = cache.get("a")
    clock.now += 0.1
    after = cache.get("a")

    assert before == 1
    assert after is MISSING
    assert len(cache) == 0


def test_cache_stores_none_as_value() -> None:
    cache: TtlCache[str, int | None] = TtlCache(10, Clock())
    cache.put("unknown", None, ttl_seconds=5)

    assert cache.get("unknown") is None
    assert cache.get("other") is MISSING


def test_cache_zero_ttl_stores_nothing() -> None:
    cache: TtlCache[str, int] = TtlCache(10, Clock())
    cache.put("a", 1, ttl_seconds=0)

    assert cache.get("a") is MISSING


def test_cache_evicts_oldest_when_full() -> None:
    cache: TtlCache[str, int] = TtlCache(2, Clock())
    cache.put("a", 1, ttl_seconds=60)
    cache.put("b", 2, ttl_seconds=60)
    cache.put("a", 3, ttl_seconds=60)
    cache.put("c", 4, ttl_seconds=60)

    assert cache.get("b") is MISSING
    assert cache.get("a") == 3
    assert cache.get("c") == 4


def test_cache_clear_removes_all() -> None:
    cache: TtlCache[str, int] = TtlCache(10, Clock())
    cache.put("a", 1, ttl_seconds=60)

    cache.clear()

    assert cache.get("a") is MISSING


def test_cache_rejects_zero_size() -> None:
    with pytest.raises(ValueError, match="at least one entry"):
        TtlCache(0)
