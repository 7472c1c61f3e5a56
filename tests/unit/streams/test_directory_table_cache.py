"""The directory cache in a Faust GlobalTable, written by an agent under test_context.

The agent resolves or expands the address each event carries with the real
`Directory` client over ldap3's mock directory. Every changelog record the table
sends is recorded instead of produced, so the tests see what Kafka would get.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import faust
import pytest
from faust.types import StreamT
from ldap3.core import exceptions as ldap_errors

from autopull.connectors.directory import MISSING, DirectorySettings, Person
from autopull.connectors.directory.client import Directory
from autopull.connectors.directory.ldap import LdapSession
from autopull.connectors.errors import TransientError
from autopull.streams.directory_cache import TableCache

# The mock directory of the connector's own unit tests.
sys.path.insert(
    0, str(Path(__file__).resolve().parents[1] / "connectors" / "directory")
)
from directory_fakes import build_corp, openldap_settings

Opener = Callable[[DirectorySettings], LdapSession]


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


class Lookups:
    """An agent that looks up the address of each event through a TableCache."""

    def __init__(self, table: Any, clock: Clock) -> None:
        self.table = table
        self.clock = clock
        self.changelog: list[tuple[int | None, str, Any]] = []
        self.outcomes: list[Any] = []
        self.directory: Directory | None = None
        self.context: Any = None
        self.handled = asyncio.Event()
        table.send_changelog = self._record

    def _record(
        self, partition: int | None, key: Any, value: Any, *_: Any, **__: Any
    ) -> Any:
        # A JSON round trip, as the changelog's serializer makes.
        self.changelog.append((partition, key, json.loads(json.dumps(value))))
        return SimpleNamespace(message=SimpleNamespace(partition=partition))

    def use(self, settings: DirectorySettings, opener: Opener) -> None:
        """Look up with a new client over the same table, as a new worker would."""
        self.directory = Directory(
            settings, opener=opener, cache=TableCache(self.table, self.clock)
        )

    async def resolve(self, address: str) -> Any:
        return await self._run(f"resolve {address}")

    async def expand(self, address: str) -> Any:
        return await self._run(f"expand {address}")

    async def _run(self, command: str) -> Any:
        self.handled.clear()
        await self.context.put(command.encode(), key=b"alert")
        await asyncio.wait_for(self.handled.wait(), timeout=10)
        return self.outcomes[-1]

    async def handle(self, command: str) -> None:
        assert self.directory is not None
        action, address = command.split(" ", 1)
        try:
            if action == "resolve":
                self.outcomes.append(await self.directory.resolve(address))
            else:
                self.outcomes.append(await self.directory.expand(address))
        except TransientError as error:
            self.outcomes.append(error)
        self.handled.set()


@pytest.fixture
async def lookups(tmp_path: Path) -> AsyncIterator[Lookups]:
    app = faust.App(
        "dircache-unit",
        broker="kafka://127.0.0.1:9",
        store="memory://",
        datadir=str(tmp_path),
        topic_partitions=1,
        web_enabled=False,
    )
    table = app.GlobalTable(
        "directory_cache", default=None, key_type=str, value_type=None
    )
    topic = app.topic("lookups", key_type=bytes, value_type=bytes)
    result = Lookups(table, Clock())

    @app.agent(topic)
    async def look_up(stream: StreamT) -> None:
        async for value in stream:
            await result.handle(bytes(value).decode())

    app.loop = asyncio.get_running_loop()
    app.finalize()
    async with look_up.test_context() as context:
        result.context = context
        yield result
    if result.directory is not None:
        await result.directory.close()


def failing_opener(settings: DirectorySettings) -> LdapSession:
    raise ldap_errors.LDAPSocketOpenError("connection refused")


def keys(changelog: list[tuple[int | None, str, Any]]) -> list[str]:
    return [key for _, key, _ in changelog]


async def test_person_written_to_changelog(lookups: Lookups) -> None:
    corp = build_corp()
    lookups.use(openldap_settings(cache_ttl_seconds=600), corp.opener())

    person = await lookups.resolve("alice@corp.test")

    assert isinstance(person, Person)
    assert keys(lookups.changelog) == ["person:alice@corp.test"]
    partition, _, value = lookups.changelog[0]
    assert partition == 0
    assert value["expires_at"] == lookups.clock.now + 600
    assert value["value"]["mailbox"] == person.mailbox
    assert value["value"]["groups"] == list(person.groups)
    # The table contains the value it sent, so the changelog and the table agree.
    assert lookups.table["person:alice@corp.test"] == value


async def test_hit_within_ttl_skips_ldap(lookups: Lookups) -> None:
    corp = build_corp()
    lookups.use(openldap_settings(cache_ttl_seconds=600), corp.opener())
    first = await lookups.resolve("alice@corp.test")
    searches = corp.searches

    lookups.clock.now += 599.9
    second = await lookups.resolve("ALICE@corp.test")

    assert second == first
    assert corp.searches == searches
    assert len(lookups.changelog) == 1


async def test_expired_entry_searched_and_rewritten(lookups: Lookups) -> None:
    corp = build_corp()
    lookups.use(openldap_settings(cache_ttl_seconds=600), corp.opener())
    await lookups.resolve("alice@corp.test")
    searches = corp.searches

    lookups.clock.now += 600
    again = await lookups.resolve("alice@corp.test")

    assert isinstance(again, Person)
    assert corp.searches > searches
    assert keys(lookups.changelog) == ["person:alice@corp.test"] * 2
    assert lookups.changelog[1][2]["expires_at"] == lookups.clock.now + 600


async def test_unknown_address_kept_for_negative_ttl(lookups: Lookups) -> None:
    corp = build_corp()
    settings = openldap_settings(cache_ttl_seconds=600, negative_cache_ttl_seconds=10)
    lookups.use(settings, corp.opener())
    written_at = lookups.clock.now
    assert await lookups.resolve("nobody@corp.test") is None
    searches = corp.searches

    lookups.clock.now += 9.9
    within = await lookups.resolve("nobody@corp.test")
    searches_within = corp.searches
    lookups.clock.now += 0.1
    after = await lookups.resolve("nobody@corp.test")

    assert within is None
    assert after is None
    assert searches_within == searches
    assert corp.searches > searches
    first = lookups.changelog[0][2]
    assert first == {"expires_at": written_at + 10, "value": None}


async def test_errors_never_cached(lookups: Lookups) -> None:
    lookups.use(openldap_settings(max_attempts=1), failing_opener)

    outcome = await lookups.resolve("alice@corp.test")
    expansion = await lookups.expand("staff@corp.test")

    assert isinstance(outcome, TransientError)
    assert isinstance(expansion, TransientError)
    assert lookups.changelog == []
    assert len(lookups.table) == 0


async def test_new_client_reads_table(lookups: Lookups) -> None:
    corp = build_corp()
    lookups.use(openldap_settings(cache_ttl_seconds=600), corp.opener())
    person = await lookups.resolve("alice@corp.test")
    expansion = await lookups.expand("staff@corp.test")
    assert isinstance(person, Person)
    assert expansion.kind == "list"

    # A new worker with the same table and no reachable server.
    lookups.use(
        openldap_settings(cache_ttl_seconds=600, max_attempts=1), failing_opener
    )
    lookups.clock.now += 300
    cached_person = await lookups.resolve("alice@corp.test")
    cached_expansion = await lookups.expand("staff@corp.test")

    assert cached_person == person
    assert cached_expansion == expansion
    assert cached_person.vip == person.vip


async def test_expired_entries_swept_on_write(lookups: Lookups) -> None:
    corp = build_corp()
    settings = openldap_settings(cache_ttl_seconds=600, negative_cache_ttl_seconds=10)
    lookups.use(settings, corp.opener())
    await lookups.resolve("nobody@corp.test")
    await lookups.resolve("alice@corp.test")

    lookups.clock.now += 10
    await lookups.resolve("bob@corp.test")

    assert keys(lookups.changelog) == [
        "person:nobody@corp.test",
        "person:alice@corp.test",
        "person:bob@corp.test",
        "person:nobody@corp.test",
    ]
    # Deleting a key sends a tombstone, which compaction removes from Kafka.
    assert lookups.changelog[-1][2] is None
    assert "person:nobody@corp.test" not in lookups.table
    assert "person:alice@corp.test" in lookups.table


async def test_unreadable_entry_is_a_miss(lookups: Lookups) -> None:
    corp = build_corp()
    lookups.use(openldap_settings(cache_ttl_seconds=600), corp.opener())
    cache = TableCache(lookups.table, lookups.clock)
    lookups.table.data["person:alice@corp.test"] = {
        "expires_at": lookups.clock.now + 600,
        "value": {"mailbox": 5},
    }
    lookups.table.data["expansion:staff@corp.test"] = "not an entry"

    assert cache.get_person("alice@corp.test") is MISSING
    assert cache.get_expansion("staff@corp.test") is MISSING
    assert isinstance(await lookups.resolve("alice@corp.test"), Person)


def test_write_outside_event_raises(tmp_path: Path) -> None:
    app = faust.App(
        "dircache-unit-outside",
        broker="kafka://127.0.0.1:9",
        store="memory://",
        datadir=str(tmp_path),
        web_enabled=False,
    )
    table = app.GlobalTable(
        "directory_cache", default=None, key_type=str, value_type=None
    )
    cache = TableCache(table)

    with pytest.raises(TypeError, match="outside of stream iteration"):
        cache.put_person("alice@corp.test", None, 60)


def test_zero_ttl_writes_nothing() -> None:
    table: dict[str, Any] = {}
    cache = TableCache(table, Clock())

    cache.put_person("alice@corp.test", None, 0)

    assert table == {}
    assert cache.get_person("alice@corp.test") is MISSING


async def test_sweep_keeps_rewritten_entry(lookups: Lookups) -> None:
    corp = build_corp()
    settings = openldap_settings(cache_ttl_seconds=600, negative_cache_ttl_seconds=10)
    lookups.use(settings, corp.opener())
    await lookups.resolve("nobody@corp.test")
    lookups.clock.now += 10
    # The expired negative entry is searched again and rewritten for 10 s more.
    await lookups.resolve("nobody@corp.test")

    lookups.clock.now += 5
    await lookups.resolve("alice@corp.test")

    assert keys(lookups.changelog) == [
        "person:nobody@corp.test",
        "person:nobody@corp.test",
        "person:alice@corp.test",
    ]
    assert "person:nobody@corp.test" in lookups.table


async def test_sweep_deletes_recovered_expired_entry(lookups: Lookups) -> None:
    corp = build_corp()
    lookups.use(openldap_settings(cache_ttl_seconds=600), corp.opener())
    # An entry another worker wrote, as recovery puts it into the store.
    lookups.table.data["person:gone@corp.test"] = {
        "expires_at": lookups.clock.now - 1,
        "value": None,
    }

    await lookups.resolve("alice@corp.test")

    assert keys(lookups.changelog) == [
        "person:alice@corp.test",
        "person:gone@corp.test",
    ]
    assert lookups.changelog[-1][2] is None
    assert "person:gone@corp.test" not in lookups.table
