"""An in-memory cache whose entries expire after a time to live."""

from __future__ import annotations

import enum
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, Literal, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class Missing(enum.Enum):
    """The type of MISSING, which `TtlCache.get` returns on a miss."""

    token = 0


MISSING: Literal[Missing.token] = Missing.token


class TtlCache(Generic[K, V]):
    """Values kept until their time to live runs out, at most `max_entries` of them.

    When full, the cache evicts the entry stored longest ago. The clock is
    `time.monotonic` unless another one is given, in seconds.
    """

    # NOTE: each worker keeps its own cache, which a restart loses. It is no
    # changelogged Faust table, because the enrich agent's input is keyed by alert
    # id and not by address, and re-keying every lookup through a topic costs more
    # than it saves (docs/directory.md, "Why the cache is not a Faust table").

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
