"""Finding a message without a Message-ID on Graph and EWS: adapter and pull step.

Each simulator runs in-process on a free port over the demo world plus three
mailboxes: henry@ has one matching message in two folders and three near misses,
ivan@ has two different matching messages, and judy@ has none (one differs only in
the case of its subject).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from exchangelib.protocol import CachingProtocol

from autopull.connectors.mail.base import MailPlatform, MessageSearch
from autopull.connectors.mail.ews import EwsPlatform, EwsSettings
from autopull.connectors.mail.graph import (
    GraphPlatform,
    GraphSettings,
    received_window_filter,
)
from autopull.sim.ews import EwsSimSettings, EwsSimulator
from autopull.sim.graph import GraphSimSettings, GraphSimulator
from autopull.sim.world import World
from autopull.streams.pulls import RetryPolicy, execute

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO = REPO_ROOT / "examples" / "worlds" / "demo.json"
QUARANTINE = "quarantine@example.com"
DELIVERED = datetime(2024, 3, 10, 9, 30, tzinfo=UTC)
SEARCH = MessageSearch(
    senders=("billing@example.net",),
    subject="Invoice 4471",
    received_after=DELIVERED - timedelta(minutes=10),
    received_before=DELIVERED + timedelta(minutes=10),
)
KEY = "queue-id-7Q2@no-message-id"
SERVICE_ACCOUNT = "svc-autopull@example.com"
PASSWORD = "service-account-password"
HIDDEN = "Autopull Quarantine"


def message(
    key: str,
    to: str,
    deliveries: list[tuple[str, str]],
    *,
    sender: str = "Billing <billing@example.net>",
    subject: str = "Invoice 4471",
) -> dict[str, Any]:
    return {
        "key": key,
        "message_id": f"<{key.lower()}@mail.example.net>",
        "from": sender,
        "to": [to],
        "subject": subject,
        "date": "2024-03-10T09:29:00Z",
        "body": "Invoice attached.\n",
        "malicious": True,
        "deliveries": [
            {"mailbox": to, "folder": folder, "read": False, "received": received}
            for folder, received in deliveries
        ],
    }


def make_scenario() -> dict[str, Any]:
    scenario: dict[str, Any] = json.loads(DEMO.read_text(encoding="utf-8"))
    scenario["mailboxes"] += [
        {"address": "henry@example.com", "folders": [{"name": "Projects"}]},
        {"address": "ivan@example.com"},
        {"address": "judy@example.com"},
    ]
    henry, ivan, judy = "henry@example.com", "ivan@example.com", "judy@example.com"
    scenario["messages"] += [
        message(
            "S1",
            henry,
            [("inbox", "2024-03-10T09:30:02Z"), ("Projects", "2024-03-10T09:30:02Z")],
        ),
        message(
            "S2",
            henry,
            [("inbox", "2024-03-10T09:31:00Z")],
            subject="Invoice 4471 paid",
        ),
        message("S3", henry, [("inbox", "2024-03-10T11:00:00Z")]),
        message(
            "S4",
            henry,
            [("inbox", "2024-03-10T09:30:30Z")],
            sender="Other <other@example.net>",
        ),
        message("S5", ivan, [("inbox", "2024-03-10T09:30:02Z")]),
        message("S6", ivan, [("inbox", "2024-03-10T09:34:00Z")]),
        message(
            "S7",
            judy,
            [("inbox", "2024-03-10T09:30:02Z")],
            subject="invoice 4471",
        ),
    ]
    return scenario


class Simulated:
    """A platform adapter and the simulator it talks to."""

    def __init__(self, platform: MailPlatform, world: World, name: str) -> None:
        self.platform = platform
        self.world = world
        self.name = name


@pytest.fixture(params=["graph", "ews"])
async def simulated(request: Any, tmp_path: Path) -> AsyncIterator[Simulated]:
    scenario = make_scenario()
    if request.param == "ews":
        scenario["tenants"][0]["platform"] = "ews"
    scenario_path = tmp_path / "scenario.json"
    scenario_path.write_text(json.dumps(scenario), encoding="utf-8")
    world = World.open(scenario_path, tmp_path / "state.json")

    platform: MailPlatform
    if request.param == "graph":
        graph_sim = GraphSimulator(
            world, GraphSimSettings(), scenario_path=scenario_path
        )
        await graph_sim.start()
        assert graph_sim.base_url is not None
        tenant = scenario["tenants"][0]
        platform = GraphPlatform(
            GraphSettings(
                graph_url=f"{graph_sim.base_url}/v1.0",
                authority_url=graph_sim.base_url,
                tenant_id=tenant["tenant_id"],
                client_id=tenant["client_id"],
                client_secret=tenant["client_secret"],
                quarantine_mailbox=QUARANTINE,
                page_size=1,
            )
        )
        yield Simulated(platform, world, "graph")
        await platform.close()
        await graph_sim.stop()
        return

    CachingProtocol.clear_cache()
    ews_sim = EwsSimulator(
        world,
        EwsSimSettings(service_accounts={SERVICE_ACCOUNT: PASSWORD}),
        scenario_path=scenario_path,
    )
    await ews_sim.start()
    platform = EwsPlatform(
        EwsSettings(
            service_endpoint=ews_sim.endpoint,
            username=SERVICE_ACCOUNT,
            password=PASSWORD,
            quarantine_mailbox=QUARANTINE,
        )
    )
    yield Simulated(platform, world, "ews")
    await platform.close()
    await ews_sim.stop()
    CachingProtocol.clear_cache()


def folders_of(world: World, mailbox: str, key: str) -> list[str]:
    """Return the folders of every copy of message `key`, found by its Message-ID."""
    header = f"<{key.lower()}@mail.example.net>"
    return sorted(
        str(row["folder"])
        for row in world.snapshot(mailbox)
        if row["internet_message_id"] == header
    )


def command(mailbox: str) -> dict[str, Any]:
    return {
        "command_id": f"INC-1:quarantine:{mailbox}:{KEY}",
        "incident_id": "INC-1",
        "kind": "quarantine",
        "mailbox": mailbox,
        "message_id": KEY,
        "alert_id": "fireeye:3c9e5a71:" + mailbox,
        "alert_received_at": DELIVERED,
        "issued_at": DELIVERED,
        "recipient_type": "original",
        "reason": "",
        "attempt": 1,
        "not_before": None,
        "search": {
            "senders": list(SEARCH.senders),
            "subject": SEARCH.subject,
            "received_after": SEARCH.received_after,
            "received_before": SEARCH.received_before,
        },
        "resolved_message_id": None,
    }


def test_received_window_filter_text() -> None:
    assert received_window_filter(SEARCH) == (
        "receivedDateTime ge 2024-03-10T09:20:00Z and "
        "receivedDateTime le 2024-03-10T09:40:00Z"
    )


async def test_search_one_message_two_folders(simulated: Simulated) -> None:
    copies = await simulated.platform.search("henry@example.com", SEARCH)

    assert sorted(copy.folder for copy in copies) == ["Inbox", "Projects"]
    assert {copy.message_id for copy in copies} == {"s1@mail.example.net"}
    assert {copy.sender for copy in copies} == {"billing@example.net"}
    assert {copy.subject for copy in copies} == {"Invoice 4471"}


async def test_search_two_messages_both_listed(simulated: Simulated) -> None:
    copies = await simulated.platform.search("ivan@example.com", SEARCH)

    assert sorted(copy.message_id for copy in copies) == [
        "s5@mail.example.net",
        "s6@mail.example.net",
    ]


async def test_search_subject_compared_exactly(simulated: Simulated) -> None:
    assert await simulated.platform.search("judy@example.com", SEARCH) == []


async def test_pull_unique_match_quarantines_it(simulated: Simulated) -> None:
    route = {"henry@example.com": simulated.platform}.get

    result = await execute(command("henry@example.com"), route, RetryPolicy())

    outcome = result.outcome
    assert outcome["status"] == "quarantined"
    assert outcome["message_id"] == KEY
    assert outcome["resolved_message_id"] == "s1@mail.example.net"
    assert outcome["copies"] == 2
    assert outcome["candidates"] == []
    # Graph moves the copies into a hidden folder of the mailbox; EWS moves them
    # into the quarantine mailbox.
    left = [HIDDEN, HIDDEN] if simulated.name == "graph" else []
    assert folders_of(simulated.world, "henry@example.com", "S1") == left
    assert folders_of(simulated.world, "henry@example.com", "S2") == ["Inbox"]
    assert folders_of(simulated.world, "henry@example.com", "S3") == ["Inbox"]
    assert folders_of(simulated.world, "henry@example.com", "S4") == ["Inbox"]


async def test_pull_two_matches_held_with_candidates(simulated: Simulated) -> None:
    route = {"ivan@example.com": simulated.platform}.get

    result = await execute(command("ivan@example.com"), route, RetryPolicy())

    outcome = result.outcome
    assert outcome["status"] == "held"
    assert outcome["resolved_message_id"] is None
    assert sorted(c["message_id"] for c in outcome["candidates"]) == [
        "s5@mail.example.net",
        "s6@mail.example.net",
    ]
    assert {c["folder"] for c in outcome["candidates"]} == {"Inbox"}
    assert {c["sender"] for c in outcome["candidates"]} == {"billing@example.net"}
    assert "2 different messages" in outcome["error"]
    assert folders_of(simulated.world, "ivan@example.com", "S5") == ["Inbox"]
    assert folders_of(simulated.world, "ivan@example.com", "S6") == ["Inbox"]


async def test_pull_no_match_held_nothing_moved(simulated: Simulated) -> None:
    route = {"judy@example.com": simulated.platform}.get

    result = await execute(command("judy@example.com"), route, RetryPolicy())

    outcome = result.outcome
    assert outcome["status"] == "held"
    assert outcome["candidates"] == []
    assert "No message in judy@example.com" in outcome["error"]
    assert folders_of(simulated.world, "judy@example.com", "S7") == ["Inbox"]


async def test_pull_restore_uses_resolved_id(simulated: Simulated) -> None:
    route = {"henry@example.com": simulated.platform}.get
    quarantined = await execute(command("henry@example.com"), route, RetryPolicy())
    restore = command("henry@example.com") | {
        "kind": "restore",
        "search": None,
        "resolved_message_id": quarantined.outcome["resolved_message_id"],
    }

    result = await execute(restore, route, RetryPolicy())

    assert result.outcome["status"] == "restored"
    assert result.outcome["message_id"] == KEY
    assert folders_of(simulated.world, "henry@example.com", "S1") == [
        "Inbox",
        "Projects",
    ]
