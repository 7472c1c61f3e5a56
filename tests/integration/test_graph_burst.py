"""Graph quarantine bursts: the adapter's JSON batches against the Graph simulator.

The burst tests run on the virtual clock (`autopull.sim.clock`), with the simulator
and the adapter in one event loop, so Retry-After waits and latency pass at once
and the request log's times are exact.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from autopull.connectors.errors import ConnectorError, NotFoundError
from autopull.connectors.mail.base import QuarantineResult
from autopull.connectors.mail.graph import GraphPlatform, GraphSettings
from autopull.sim.campaign import (
    CAMPAIGN_MESSAGE_ID,
    CLIENT_ID,
    CLIENT_SECRET,
    QUARANTINE_MAILBOX,
    TENANT_ID,
    campaign_scenario,
    user_mailbox,
)
from autopull.sim.clock import run_virtual
from autopull.sim.graph import GraphSimSettings, GraphSimulator, LoggedRequest
from autopull.sim.world import World

pytestmark = pytest.mark.integration

T = TypeVar("T")
HIDDEN = "Autopull Quarantine"
MAILBOXES = 60


def platform_settings(url: str, **changes: Any) -> GraphSettings:
    values: dict[str, Any] = {
        "graph_url": f"{url}/v1.0",
        "authority_url": url,
        "tenant_id": TENANT_ID,
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "quarantine_mailbox": QUARANTINE_MAILBOX,
    }
    values.update(changes)
    return GraphSettings(**values)


def with_graph(
    work: Callable[[GraphSimulator, GraphPlatform], Awaitable[T]],
    *,
    mailboxes: int = MAILBOXES,
    latency_ms: float = 150.0,
    scenario: dict[str, Any] | None = None,
) -> tuple[T, GraphSimulator]:
    """Run `work` on the virtual clock against a fresh simulator and adapter."""
    world = World.from_scenario(scenario or campaign_scenario(mailboxes))
    sim = GraphSimulator(world, GraphSimSettings(latency_ms=latency_ms))

    async def main() -> T:
        url = await sim.start()
        platform = GraphPlatform(platform_settings(url))
        try:
            return await work(sim, platform)
        finally:
            await platform.close()
            await sim.stop()

    return run_virtual(main), sim


def pulls(count: int, incident: str = "INC-B") -> list[tuple[str, str, str]]:
    return [(user_mailbox(i), CAMPAIGN_MESSAGE_ID, incident) for i in range(count)]


def folders_of(sim: GraphSimulator, mailbox: str) -> list[str]:
    return [row["folder"] for row in sim.world.snapshot(mailbox) if row["key"]]


def mailbox_requests(sim: GraphSimulator) -> list[LoggedRequest]:
    return [e for e in sim.log if e.mailbox is not None and e.path != "/v1.0/$batch"]


def assert_within_limits(sim: GraphSimulator) -> None:
    """No request hit a simulated limit, and no mailbox had five requests at once."""
    assert [e.limit for e in sim.log if e.limit is not None] == []
    assert max(sim.throttle.peak_in_flight.values()) <= 4


def test_burst_quarantines_every_mailbox() -> None:
    async def work(sim: GraphSimulator, graph: GraphPlatform) -> list[Any]:
        return await graph.quarantine_many(pulls(MAILBOXES))

    results, sim = with_graph(work)

    assert all(isinstance(r, QuarantineResult) for r in results), results
    assert [r.mailbox for r in results] == [user_mailbox(i) for i in range(MAILBOXES)]
    for result in results:
        assert isinstance(result, QuarantineResult)
        assert result.already_done is False
        assert [(c.folder, c.read) for c in result.copies] == [("Inbox", False)]
        assert result.evidence_location == f"{QUARANTINE_MAILBOX}/INC-B"
    for index in range(MAILBOXES):
        assert folders_of(sim, user_mailbox(index)) == [HIDDEN]
    evidence = [
        r for r in sim.world.snapshot(QUARANTINE_MAILBOX) if r["folder"] == "INC-B"
    ]
    assert len(evidence) == 1
    assert_within_limits(sim)


def test_burst_two_messages_one_mailbox() -> None:
    second_id = "second-0001@invoices.example.net"
    scenario = campaign_scenario(3)
    first = scenario["messages"][0]
    scenario["messages"].append(
        dict(
            first,
            key="SECOND",
            message_id=f"<{second_id}>",
            subject="Second invoice",
            deliveries=[{"mailbox": user_mailbox(0)}],
        )
    )

    async def work(sim: GraphSimulator, graph: GraphPlatform) -> list[Any]:
        both = [*pulls(3), (user_mailbox(0), second_id, "INC-B")]
        return await graph.quarantine_many(both)

    results, sim = with_graph(work, scenario=scenario)

    assert all(isinstance(r, QuarantineResult) for r in results), results
    assert folders_of(sim, user_mailbox(0)) == [HIDDEN, HIDDEN]
    creations = [
        r
        for r in sim.log
        if r.method == "POST"
        and r.path.endswith("/mailFolders")
        and user_mailbox(0) in r.path
    ]
    assert len(creations) == 1
    assert_within_limits(sim)


def test_burst_sends_requests_in_batches() -> None:
    async def work(sim: GraphSimulator, graph: GraphPlatform) -> None:
        await graph.quarantine_many(pulls(MAILBOXES))

    _, sim = with_graph(work)

    users = [e for e in mailbox_requests(sim) if e.mailbox != QUARANTINE_MAILBOX]
    outer = [e for e in sim.log if e.path == "/v1.0/$batch"]
    batched = [e for e in users if e.batch is not None]
    # Per mailbox: find and folder list, then marker and hidden folder, then move,
    # then verify.
    assert len(batched) == MAILBOXES * 6
    assert len(users) - len(batched) == 1  # the evidence source's MIME content
    assert len(outer) == 6 + 6 + 3 + 3
    assert {e.status for e in outer} == {200}


def test_burst_runs_in_few_latencies() -> None:
    async def work(sim: GraphSimulator, graph: GraphPlatform) -> float:
        loop = asyncio.get_running_loop()
        started = loop.time()
        await graph.quarantine_many(pulls(MAILBOXES))
        return loop.time() - started

    seconds, sim = with_graph(work, latency_ms=150)

    # The evidence chain is the longest: find, then the MIME content (beside the
    # incident folder's lookup and creation), upload, move, verify.
    assert seconds <= 5 * 0.150 + 1e-6
    assert_within_limits(sim)


def test_burst_again_is_already_done() -> None:
    async def work(sim: GraphSimulator, graph: GraphPlatform) -> list[Any]:
        await graph.quarantine_many(pulls(10))
        sim.log.clear()
        return await graph.quarantine_many(pulls(10))

    results, sim = with_graph(work, mailboxes=10)

    assert all(isinstance(r, QuarantineResult) and r.already_done for r in results)
    writes = [e for e in sim.log if e.method != "GET" and e.path != "/v1.0/$batch"]
    assert writes == []


def test_burst_reports_missing_copy_alone() -> None:
    async def work(sim: GraphSimulator, graph: GraphPlatform) -> list[Any]:
        mailbox = user_mailbox(3)
        item = next(sim.world.items_of(mailbox))
        sim.world.remove_item(mailbox, item.item_id)
        return await graph.quarantine_many(pulls(6))

    results, _ = with_graph(work, mailboxes=6)

    assert isinstance(results[3], NotFoundError)
    assert results[3].mailbox == user_mailbox(3)
    others = [r for i, r in enumerate(results) if i != 3]
    assert all(isinstance(r, QuarantineResult) for r in others)


def test_burst_retries_throttled_request_alone() -> None:
    async def work(sim: GraphSimulator, graph: GraphPlatform) -> list[Any]:
        sim.faults.add(
            {
                "path": f"^/v1\\.0/users/{user_mailbox(2)}/messages/[^/]+/move$",
                "status": 429,
                "retry_after": 5,
                "count": 2,
            }
        )
        return await graph.quarantine_many(pulls(5))

    results, sim = with_graph(work, mailboxes=5)

    moves = [
        e for e in sim.log if e.mailbox == user_mailbox(2) and e.path.endswith("/move")
    ]
    assert all(isinstance(r, QuarantineResult) for r in results)
    assert [e.status for e in moves] == [429, 429, 201]
    assert moves[1].at is not None and moves[0].at is not None
    assert moves[2].at is not None
    # Floating-point sums of the virtual clock may fall short by a rounding error.
    assert moves[1].at - moves[0].at >= 5 - 1e-9
    assert moves[2].at - moves[1].at >= 5 - 1e-9
    other_moves = [
        e for e in sim.log if e.path.endswith("/move") and e.mailbox != user_mailbox(2)
    ]
    assert all(e.batch == moves[0].batch for e in other_moves[:4])


def test_burst_gives_up_after_attempts() -> None:
    async def work(sim: GraphSimulator, graph: GraphPlatform) -> list[Any]:
        sim.faults.add(
            {
                "path": f"^/v1\\.0/users/{user_mailbox(1)}/mailFolders$",
                "status": 503,
                "retry_after": 1,
                "count": 100,
            }
        )
        return await graph.quarantine_many(pulls(3))

    results, sim = with_graph(work, mailboxes=3)

    assert isinstance(results[1], ConnectorError)
    assert results[1].retriable is True
    assert isinstance(results[0], QuarantineResult)
    assert folders_of(sim, user_mailbox(1)) == ["Inbox"]


def test_burst_after_lost_evidence_makes_it() -> None:
    """A crash after the moves and before the evidence copy leaves no evidence."""

    async def work(sim: GraphSimulator, graph: GraphPlatform) -> list[Any]:
        # Every upload to the quarantine mailbox fails, as if the worker had died
        # after phase 3; the originals are hidden all the same.
        quarantine = QUARANTINE_MAILBOX.replace(".", r"\.")
        sim.faults.add(
            {"method": "POST", "path": rf"/users/{quarantine}/messages$", "count": 99}
        )
        first = await graph.quarantine_many(pulls(3))
        assert all(isinstance(r, ConnectorError) for r in first), first
        sim.faults.clear()
        # A new adapter, as a new worker has after a restart.
        fresh = GraphPlatform(platform_settings(str(sim.base_url)))
        try:
            return await fresh.quarantine_many(pulls(3))
        finally:
            await fresh.close()

    results, sim = with_graph(work, mailboxes=3)

    for result in results:
        assert isinstance(result, QuarantineResult), result
        assert result.already_done is True
        assert result.evidence_location == f"{QUARANTINE_MAILBOX}/INC-B"
    for index in range(3):
        assert folders_of(sim, user_mailbox(index)) == [HIDDEN]
    evidence = [
        r for r in sim.world.snapshot(QUARANTINE_MAILBOX) if r["folder"] == "INC-B"
    ]
    assert len(evidence) == 1


def test_burst_killed_after_upload_left_one() -> None:
    """A burst killed after its late upload leaves one evidence copy once retried.

    The killed worker's burst finds no evidence copy, another worker's burst then
    files one, and only then does the killed burst upload its own. The surviving
    worker takes over the killed burst's pulls.
    """
    quarantine = re.escape(QUARANTINE_MAILBOX)
    killed_pulls = pulls(3)
    other_pulls = [(user_mailbox(i), CAMPAIGN_MESSAGE_ID, "INC-B") for i in (3, 4, 5)]

    async def work(sim: GraphSimulator, survivor: GraphPlatform) -> list[Any]:
        killed = GraphPlatform(platform_settings(str(sim.base_url)))
        try:
            searched = sim.faults.add(
                {
                    "method": "GET",
                    "path": rf"^/v1\.0/users/{quarantine}/messages$",
                    "hold": True,
                    "after": True,
                }
            )
            burst = asyncio.create_task(killed.quarantine_many(killed_pulls))
            await searched.reached.wait()
            others = await survivor.quarantine_many(other_pulls)
            assert all(isinstance(r, QuarantineResult) for r in others), others

            sim.faults.clear()
            uploaded = sim.faults.add(
                {
                    "method": "POST",
                    "path": rf"^/v1\.0/users/{quarantine}/messages$",
                    "hold": True,
                    "after": True,
                }
            )
            await uploaded.reached.wait()
            burst.cancel()
            with pytest.raises(asyncio.CancelledError):
                await burst
            sim.faults.clear()
        finally:
            await killed.close()
        assert sorted(evidence_folders(sim)) == ["Drafts", "INC-B"]
        return await survivor.quarantine_many(killed_pulls)

    results, sim = with_graph(work, mailboxes=6)

    for result in results:
        assert isinstance(result, QuarantineResult), result
        assert result.evidence_location == f"{QUARANTINE_MAILBOX}/INC-B"
    for index in range(6):
        assert folders_of(sim, user_mailbox(index)) == [HIDDEN]
    assert evidence_folders(sim) == ["INC-B"]


def test_burst_without_markers_writes_no_evidence() -> None:
    """An evidence copy is written only once a pull's marker is stored."""

    async def work(sim: GraphSimulator, graph: GraphPlatform) -> list[Any]:
        sim.faults.add(
            {"method": "PATCH", "path": r"/messages/[^/]+$", "status": 500, "count": 9}
        )
        return await graph.quarantine_many(pulls(3))

    results, sim = with_graph(work, mailboxes=3)

    for result in results:
        assert isinstance(result, ConnectorError), result
        assert result.retriable is True
    uploads = [
        e
        for e in sim.log
        if e.method == "POST" and e.path.endswith(f"/{QUARANTINE_MAILBOX}/messages")
    ]
    assert uploads == []
    assert evidence_folders(sim) == []
    for index in range(3):
        assert folders_of(sim, user_mailbox(index)) == ["Inbox"]


def evidence_folders(sim: GraphSimulator) -> list[str]:
    """List the folder of every copy of the campaign in the quarantine mailbox."""
    return [
        row["folder"]
        for row in sim.world.snapshot(QUARANTINE_MAILBOX)
        if row["internet_message_id"] == f"<{CAMPAIGN_MESSAGE_ID}>"
    ]


def test_burst_sends_phase_at_once_by_default() -> None:
    # 520 mailboxes make 52 batches in each of the first two phases, so with 50
    # batches in flight each of them would take two rounds.
    mailboxes = 520

    async def work(sim: GraphSimulator, graph: GraphPlatform) -> float:
        loop = asyncio.get_running_loop()
        started = loop.time()
        results = await graph.quarantine_many(pulls(mailboxes))
        assert all(isinstance(r, QuarantineResult) for r in results)
        return loop.time() - started

    seconds, sim = with_graph(work, mailboxes=mailboxes, latency_ms=150)

    first_phase = [e for e in sim.log if e.path == "/v1.0/$batch"][:52]
    assert seconds == pytest.approx(5 * 0.150)
    assert len({e.at for e in first_phase}) == 1
    assert_within_limits(sim)
