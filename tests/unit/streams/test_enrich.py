"""Enrichment of an alert to very many recipients whose look-ups are cached."""

from __future__ import annotations

import asyncio

from autopull.connectors.directory import Expansion, Member, Person
from autopull.streams.enrich import LOOKUPS_PER_YIELD, resolve_recipients

RECIPIENTS = 4 * LOOKUPS_PER_YIELD + 1


class CachedDirectory:
    """A directory whose every look-up returns at once, as a cache hit does."""

    def __init__(self, lists: dict[str, Expansion] | None = None) -> None:
        self.lists = lists or {}

    async def resolve(self, address: str) -> Person | None:
        if address in self.lists:
            return None
        return Person(dn=f"cn={address}", mailbox=address, addresses=(address,))

    async def expand(self, address: str) -> Expansion:
        return self.lists.get(address, Expansion(address=address, kind="unknown"))


async def count_turns_while(work: asyncio.Future[object]) -> int:
    """Return how often another task ran on the event loop before `work` ended."""
    turns = 0

    async def tick() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    ticker = asyncio.ensure_future(tick())
    await asyncio.sleep(0)
    turns = 0
    await work
    ticker.cancel()
    return turns


async def test_cached_recipients_let_loop_run():
    addresses = [f"user{number}@example.com" for number in range(RECIPIENTS)]
    work = asyncio.ensure_future(resolve_recipients(addresses, CachedDirectory()))

    turns = await count_turns_while(work)

    assert len(work.result()) == RECIPIENTS
    assert turns >= RECIPIENTS // LOOKUPS_PER_YIELD


async def test_cached_list_members_let_loop_run():
    members = tuple(
        Member(f"member{n}@example.com", f"cn=m{n}", None, ("all@example.com",))
        for n in range(RECIPIENTS)
    )
    lists = {"all@example.com": Expansion("all@example.com", "list", members)}
    work = asyncio.ensure_future(
        resolve_recipients(["all@example.com"], CachedDirectory(lists))
    )

    turns = await count_turns_while(work)

    recipients = work.result()
    assert len(recipients) == RECIPIENTS
    assert {r["recipient_type"] for r in recipients} == {"list_member"}
    assert turns >= RECIPIENTS // LOOKUPS_PER_YIELD
