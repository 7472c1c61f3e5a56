"""Caches of directory results: the interface, and one kept in memory.

`Directory` stores every result through a `DirectoryCache`. `MemoryCache` keeps
them in the worker's memory. The pipeline passes an implementation backed by a
changelogged table instead, so that results survive restarts and are shared
between workers.
"""

from __future__ import annotations

import enum
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, Literal, Protocol, TypeVar

from .models import Expansion, Person

K = TypeVar("K")
V = TypeVar("V")


class Missing(enum.Enum):
    """The type of MISSING, which a cache returns on a miss."""

    token = 0


MISSING: Literal[Missing.token] = Missing.token


class DirectoryCache(Protocol):
    """Results of directory lookups, each kept until its time to live runs out.

    A person of None records an address that the directory does not know. A TTL
    of 0 or less stores nothing. Errors are never passed to a cache.
    """

    def get_person(self, address: str) -> Person | Literal[Missing.token] | None:
        """Return the live result of resolving `address`, or MISSING."""
        ...

    def put_person(
        self, address: str, person: Person | None, ttl_seconds: float
    ) -> None:
        """Store the result of resolving `address` for `ttl_seconds`."""
        ...

    def get_expansion(self, address: str) -> Expansion | Literal[Missing.token]:
        """Return the live expansion of `address`, or MISSING."""
        ...

    def put_expansion(
        self, address: str, expansion: Expansion, ttl_seconds: float
    ) -> None:
        """Store the expansion of `address` for `ttl_seconds`."""
        ...

    def clear(self) -> None:
        """Forget every result, so that the next lookups search the server."""
        ...


class TtlCache(Generic[K, V]):
    """Values kept until their time to live runs out, at most `max_entries` of them.

    When full, the cache evicts the entry stored longest ago. The clock is
    `time.monotonic` unless another one is given, in seconds.
    """

    def __init__(
        self, max_entries: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if max_entries < 1:
            raise ValueError(
                f"A cache needs room for at least one entry, not {max_entries}; "
                "set cache_max_entries to 1 or more."
            )
        self._max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[K, tuple[float, V]] = OrderedDict()

    def get(self, key: K) -> V | Literal[Missing.token]:
        """Return the live value stored under `key`, or MISSING."""
        stored = self._entries.get(key)
        if stored is None:
            return MISSING
        expires_at, value = stored
        if self._clock() >= expires_at:
            del self._entries[key]
            return MISSING
        return value

    def put(self, key: K, value: V, ttl_seconds: float) -> None:
        """Store `value` under `key` for `ttl_seconds`; a TTL of 0 stores nothing."""
        if ttl_seconds <= 0:
            return
        self._entries.pop(key, None)
        self._entries[key] = (self._clock() + ttl_seconds, value)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        """Remove every entry."""
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


class MemoryCache:
    """A `DirectoryCache` in the memory of one process, lost when it ends.

    People and expansions each keep at most `max_entries` results.
    """

    def __init__(
        self, max_entries: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._people: TtlCache[str, Person | None] = TtlCache(max_entries, clock)
        self._expansions: TtlCache[str, Expansion] = TtlCache(max_entries, clock)

    def get_person(self, address: str) -> Person | Literal[Missing.token] | None:
        return self._people.get(address)

    def put_person(
        self, address: str, person: Person | None, ttl_seconds: float
    ) -> None:
        self._people.put(address, person, ttl_seconds)

    def get_expansion(self, address: str) -> Expansion | Literal[Missing.token]:
        return self._expansions.get(address)

    def put_expansion(
        self, address: str, expansion: Expansion, ttl_seconds: float
    ) -> None:
        self._expansions.put(address, expansion, ttl_seconds)

    def clear(self) -> None:
        self._people.clear()
        self._expansions.clear()
