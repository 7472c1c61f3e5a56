"""Directory results in a changelogged Faust GlobalTable, shared by every worker.

Each entry carries its expiry time, because Faust tables have none. The enrich
agent writes the table while it processes an alert, so each entry goes to the
changelog partition of that alert. Every worker reads every partition of a global
table's changelog, so a restarted or new worker recovers all recent results,
whichever partition they were written to. The changelog is compacted and also
deletes segments older than the longest time to live, so results that are not
looked up again leave Kafka.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections.abc import Callable, MutableMapping
from typing import Any, Literal

from autopull.connectors.directory import (
    MISSING,
    Expansion,
    Missing,
    Person,
    decode_expansion,
    decode_person,
    encode_expansion,
    encode_person,
)

log = logging.getLogger(__name__)

PERSON_PREFIX = "person:"
EXPANSION_PREFIX = "expansion:"
# Maximum of expired entries deleted per write, so that one alert does a bounded
# amount of extra work. Each deletion is one changelog record.
SWEEP_LIMIT = 50


class TableCache:
    """A `DirectoryCache` over a Faust table of str keys and JSON values.

    Values are `{"expires_at": <Unix time>, "value": <encoded result or None>}`.
    The clock is the wall clock (`time.time`), because workers on different
    machines compare the expiry times of one another's entries.

    Faust raises when a table is written outside the processing of an event, so
    `put_person`, `put_expansion` and `clear` must be called while an agent
    processes one. Each write also deletes up to `sweep_limit` entries whose time
    ran out, which this worker wrote or recovered, so the table does not keep
    results that are not looked up again.
    """

    def __init__(
        self,
        table: MutableMapping[str, Any],
        clock: Callable[[], float] = time.time,
        sweep_limit: int = SWEEP_LIMIT,
    ) -> None:
        self._table = table
        self._clock = clock
        self._sweep_limit = sweep_limit
        self._expiries: list[tuple[float, str]] = []
        self._seeded = False

    def get_person(self, address: str) -> Person | Literal[Missing.token] | None:
        value = self._live(PERSON_PREFIX + address)
        if value is MISSING or value is None:
            return value
        try:
            return decode_person(value)
        except (KeyError, TypeError, ValueError) as error:
            _log_unreadable(PERSON_PREFIX + address, error)
            return MISSING

    def put_person(
        self, address: str, person: Person | None, ttl_seconds: float
    ) -> None:
        value = None if person is None else encode_person(person)
        self._store(PERSON_PREFIX + address, value, ttl_seconds)

    def get_expansion(self, address: str) -> Expansion | Literal[Missing.token]:
        value = self._live(EXPANSION_PREFIX + address)
        if value is MISSING or value is None:
            return MISSING
        try:
            return decode_expansion(value)
        except (KeyError, TypeError, ValueError) as error:
            _log_unreadable(EXPANSION_PREFIX + address, error)
            return MISSING

    def put_expansion(
        self, address: str, expansion: Expansion, ttl_seconds: float
    ) -> None:
        self._store(
            EXPANSION_PREFIX + address, encode_expansion(expansion), ttl_seconds
        )

    def clear(self) -> None:
        for key in list(self._table):
            del self._table[key]
        self._expiries.clear()

    def _live(self, key: str) -> dict[str, Any] | Literal[Missing.token] | None:
        """Return the value stored under `key` while it has not expired, or MISSING."""
        entry = self._table.get(key)
        if not isinstance(entry, dict):
            return MISSING
        expires_at = entry.get("expires_at")
        if not isinstance(expires_at, int | float) or self._clock() >= expires_at:
            return MISSING
        value = entry.get("value")
        if value is not None and not isinstance(value, dict):
            _log_unreadable(key, TypeError("the value is not a mapping"))
            return MISSING
        return value

    def _store(self, key: str, value: dict[str, Any] | None, ttl: float) -> None:
        if ttl <= 0:
            return

        now = self._clock()
        self._seed()
        # A new mapping on every write, because Faust sends a value to the changelog
        # only when it is assigned, never when a stored one is changed in place.
        self._table[key] = {"expires_at": now + ttl, "value": value}
        heapq.heappush(self._expiries, (now + ttl, key))
        self._sweep(now)

    def _seed(self) -> None:
        """Learn the expiry times of the entries recovered from the changelog."""
        if self._seeded:
            return
        self._seeded = True
        for key, entry in list(self._table.items()):
            if isinstance(entry, dict) and isinstance(
                entry.get("expires_at"), int | float
            ):
                heapq.heappush(self._expiries, (entry["expires_at"], key))

    def _sweep(self, now: float) -> None:
        deleted = 0
        while self._expiries and deleted < self._sweep_limit:
            expires_at, key = self._expiries[0]
            if expires_at > now:
                return
            heapq.heappop(self._expiries)
            entry = self._table.get(key)
            # A later write of the key has its own, later place in the heap.
            if isinstance(entry, dict) and entry.get("expires_at") == expires_at:
                del self._table[key]
                deleted += 1


def _log_unreadable(key: str, error: Exception) -> None:
    log.warning(
        "Ignoring an unreadable directory cache entry key=%s error=%s", key, error
    )
