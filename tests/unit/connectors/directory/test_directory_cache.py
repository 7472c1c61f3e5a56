"""The in-memory caches of directory results, and the encoding of results."""

from __future__ import annotations

import json
from typing import Any

import pytest

from autopull.connectors.directory import (
    Expansion,
    Member,
    Person,
    decode_expansion,
    decode_person,
    encode_expansion,
    encode_person,
)
from autopull.connectors.directory.cache import MISSING, MemoryCache, TtlCache


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


def test_memory_cache_keeps_kinds_apart() -> None:
    clock = Clock()
    cache = MemoryCache(10, clock)
    expansion = Expansion(address="staff@corp.test", kind="unknown")
    cache.put_person("staff@corp.test", None, ttl_seconds=5)
    cache.put_expansion("staff@corp.test", expansion, ttl_seconds=60)

    clock.now += 5

    assert cache.get_person("staff@corp.test") is MISSING
    assert cache.get_expansion("staff@corp.test") == expansion


def test_person_encoding_round_trip() -> None:
    person = Person(
        dn="uid=alice,ou=people,dc=corp,dc=test",
        mailbox="alice@corp.test",
        addresses=("alice@corp.test", "a@corp.test"),
        display_name="Alice",
        department="Finance",
        groups=("cn=vips,ou=groups,dc=corp,dc=test",),
        vip=True,
    )

    decoded = decode_person(json.loads(json.dumps(encode_person(person))))

    assert decoded == person


def test_expansion_encoding_round_trip() -> None:
    expansion = Expansion(
        address="staff@corp.test",
        kind="list",
        members=(
            Member(
                mailbox="bob@corp.test",
                dn="uid=bob,ou=people,dc=corp,dc=test",
                display_name=None,
                path=("staff@corp.test", "bob@corp.test"),
            ),
        ),
        too_large=True,
        unresolved=("uid=gone,ou=people,dc=corp,dc=test",),
    )

    decoded = decode_expansion(json.loads(json.dumps(encode_expansion(expansion))))

    assert decoded == expansion


@pytest.mark.parametrize(
    "data",
    [
        {"address": "a@corp.test", "kind": "group", "members": []},
        {"address": "a@corp.test", "kind": "list"},
        {"address": 5, "kind": "list", "members": []},
    ],
)
def test_expansion_decoding_rejects_bad_data(data: dict[str, Any]) -> None:
    with pytest.raises((KeyError, TypeError, ValueError)):
        decode_expansion(data)
