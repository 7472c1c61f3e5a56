"""The search of one mailbox for forwarded copies, and the trace agent around it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from autopull.connectors.errors import PermanentError
from autopull.connectors.mail.base import (
    ForwardingRule,
    MailPlatform,
    MessageCopy,
    QuarantineResult,
    SentMessage,
    TraceEvent,
)
from autopull.streams.app import Pipeline
from autopull.streams.forwards import Evidence, Match, Payload, TracedMessage
from autopull.streams.incidents import new_incident
from autopull.streams.logs import RepeatFilter
from autopull.streams.settings import Settings
from autopull.streams.trace import frontier_key, new_matches, search_copy

DELIVERED = datetime(2026, 12, 1, 9, 30, tzinfo=UTC)
ORIGINAL = TracedMessage("m1@example.net", DELIVERED, "Invoice", None, 0)
PAYLOAD = Payload(urls=frozenset({"http://pay.example.net/x"}))


class ScriptedPlatform(MailPlatform):
    """A platform whose sent items, rules and trace come from the test."""

    name = "scripted"

    def __init__(
        self,
        sent: list[SentMessage],
        rules: list[ForwardingRule] | None = None,
        trace_error: bool = False,
    ) -> None:
        self.sent = sent
        self.rules = rules or []
        self.trace_error = trace_error

    async def find(self, mailbox: str, message_id: str) -> list[MessageCopy]:
        raise AssertionError("a search never calls find")

    async def quarantine(
        self, mailbox: str, message_id: str, incident_id: str
    ) -> QuarantineResult:
        raise AssertionError("a search never quarantines")

    async def restore(
        self, mailbox: str, message_id: str, incident_id: str
    ) -> QuarantineResult:
        raise AssertionError("a search never restores")

    async def sent_since(self, mailbox: str, since: datetime) -> list[SentMessage]:
        return [m for m in self.sent if m.sent_at >= since]

    async def forwarding_rules(self, mailbox: str) -> list[ForwardingRule]:
        return self.rules

    async def message_trace(self, message_id: str, since: datetime) -> list[TraceEvent]:
        if self.trace_error:
            raise PermanentError("Missing role permissions on the request.")
        return []


def forward(recipients: tuple[str, ...]) -> SentMessage:
    return SentMessage(
        mailbox="alice@example.com",
        message_id="m2@example.com",
        sent_at=DELIVERED + timedelta(minutes=5),
        recipients=recipients,
        subject="FW: Invoice",
        attached_message_ids=("m1@example.net",),
    )


def internal(address: str) -> bool:
    return address.endswith("@example.com")


async def test_search_adds_own_sent_copy() -> None:
    platform = ScriptedPlatform([forward(("bob@example.com", "eve@example.net"))])

    matches = await search_copy(
        platform, "alice@example.com", ORIGINAL, PAYLOAD, internal
    )

    found = sorted((m.from_mailbox, m.to_mailbox, m.external) for m in matches)
    assert found == [
        ("alice@example.com", "alice@example.com", False),
        ("alice@example.com", "bob@example.com", False),
        ("alice@example.com", "eve@example.net", True),
    ]
    assert {m.evidence.confidence for m in matches} == {"definitive"}


async def test_trace_failure_keeps_sent_items() -> None:
    rules = [ForwardingRule("alice@example.com", ("deputy@example.com",))]
    platform = ScriptedPlatform(
        [forward(("bob@example.com",))], rules=rules, trace_error=True
    )

    matches = await search_copy(
        platform, "alice@example.com", ORIGINAL, PAYLOAD, internal
    )

    assert {m.to_mailbox for m in matches} == {
        "alice@example.com",
        "bob@example.com",
        "deputy@example.com",
    }


async def test_search_without_forwards_is_empty() -> None:
    platform = ScriptedPlatform([])
    assert (
        await search_copy(platform, "a@example.com", ORIGINAL, PAYLOAD, internal) == []
    )


@pytest.mark.parametrize(
    ("mailbox", "message_id", "key"),
    [("Alice@Example.com", "m1", "alice@example.com\x1fm1")],
)
def test_frontier_key_lowercases_mailbox(
    mailbox: str, message_id: str, key: str
) -> None:
    assert frontier_key(mailbox, message_id) == key


# The trace agent under Faust's test_context, with a recording platform.


class RecordingPlatform(ScriptedPlatform):
    """A platform that records which mailboxes were searched and fails for some."""

    def __init__(self, failing: frozenset[str] = frozenset()) -> None:
        super().__init__([])
        self.failing = failing
        self.searched: list[str] = []
        self.trace_events: list[TraceEvent] = []
        self.trace_reads: list[str] = []

    async def sent_since(self, mailbox: str, since: datetime) -> list[SentMessage]:
        self.searched.append(mailbox)
        if mailbox in self.failing:
            raise PermanentError(f"Graph found no user for mailbox {mailbox}.")
        return []

    async def message_trace(self, message_id: str, since: datetime) -> list[TraceEvent]:
        self.trace_reads.append(message_id)
        return self.trace_events


@dataclass
class TraceAgent:
    pipe: Pipeline
    context: Any
    platform: RecordingPlatform
    sent: list[tuple[str, str, dict[str, Any]]]

    async def feed(self, incident: dict[str, Any]) -> None:
        data = self.pipe.codecs["incidents"].dumps(incident)
        await self.context.put(data, key=incident["incident_id"].encode())

    def traced(self) -> dict[tuple[str, str], dict[str, Any]]:
        """Return the traced progress sent, by incident id and mailbox."""
        return {
            (key, value["traced"]["mailbox"]): value["traced"]
            for topic, key, value in self.sent
            if topic == "incident.events" and value["kind"] == "traced"
        }


@pytest.fixture
def platform() -> RecordingPlatform:
    return RecordingPlatform(failing=frozenset({"bob@example.com"}))


@pytest.fixture
async def agent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, platform: RecordingPlatform
) -> AsyncIterator[TraceAgent]:
    monkeypatch.setattr(
        "autopull.streams.trace.build_router",
        lambda settings, platforms: lambda mailbox: platform,
    )
    pipe = Pipeline(
        Settings(
            kafka_bootstrap="127.0.0.1:9",
            store="memory://",
            data_dir=tmp_path,
            web_enabled=False,
            topic_partitions=1,
        )
    )
    pipe.app.loop = asyncio.get_running_loop()
    pipe.app.finalize()
    agents = {a.name.rsplit(".", 1)[-1]: a for a in pipe.app.agents.values()}
    manager = agents["trace"].test_context()
    context = await manager.__aenter__()
    harness = TraceAgent(pipe, context, platform, [])

    async def record(topic: str, key: str, value: dict[str, Any]) -> None:
        harness.sent.append((topic, key, value))

    pipe.send = record  # type: ignore[method-assign]
    yield harness
    await manager.__aexit__(None, None, None)


def pulled_incident(incident_id: str, copies: dict[str, dict[str, Any]]) -> Any:
    """An incident whose copy of ORIGINAL in each mailbox has a pull outcome."""
    incident = new_incident(incident_id, "campaign:1", DELIVERED)
    incident["traced_messages"].append(
        {"message_id": ORIGINAL.message_id, "delivered_at": DELIVERED, "depth": 0}
    )
    for mailbox, fields in copies.items():
        entry = {
            "mailbox": mailbox,
            "message_id": ORIGINAL.message_id,
            "action": "pull",
            "rule": "policy.pull",
            "reason": "Pulled.",
            "alert_id": "tap:1",
            "status": "quarantined",
        }
        incident["pulls"].append({**entry, **fields})
    return incident


MISSING = {"status": "failed", "error": "No such user.", "mailbox_missing": True}


async def test_agent_skips_missing_mailbox(agent: TraceAgent) -> None:
    incident = pulled_incident(
        "INC-1", {"alice@example.com": {}, "ghost@example.com": MISSING}
    )

    await agent.feed(incident)

    assert agent.platform.searched == ["alice@example.com"]
    traced = agent.traced()
    assert traced[("INC-1", "alice@example.com")]["error"] is None
    ghost = traced[("INC-1", "ghost@example.com")]
    assert ghost["findings"] == 0
    assert "ghost@example.com does not exist" in ghost["error"]
    assert "not searched" in ghost["error"]
    searched = agent.pipe.frontier["INC-1"]["searched"]
    assert frontier_key("ghost@example.com", ORIGINAL.message_id) in searched


async def test_agent_searches_mailbox_after_retry(agent: TraceAgent) -> None:
    # A retried pull that found the mailbox clears the mark, so it is searched.
    found = {"status": "not_found", "mailbox_missing": False}
    await agent.feed(pulled_incident("INC-1", {"ghost@example.com": found}))

    assert agent.platform.searched == ["ghost@example.com"]


async def test_missing_mailbox_warning_is_rate_limited(
    agent: TraceAgent, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.handler.addFilter(RepeatFilter())
    caplog.set_level(logging.WARNING, logger="autopull.streams.trace")

    for incident_id in ("INC-1", "INC-2", "INC-3"):
        await agent.feed(pulled_incident(incident_id, {"ghost@example.com": MISSING}))

    warnings = [r for r in caplog.records if r.name == "autopull.streams.trace"]
    assert len(warnings) == 1
    assert "ghost@example.com" in warnings[0].getMessage()
    assert len(agent.traced()) == 3


async def test_search_failure_warning_is_rate_limited(
    agent: TraceAgent, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.handler.addFilter(RepeatFilter())
    caplog.set_level(logging.WARNING, logger="autopull.streams.trace")

    for incident_id in ("INC-1", "INC-2", "INC-3"):
        await agent.feed(pulled_incident(incident_id, {"bob@example.com": {}}))

    assert agent.platform.searched == ["bob@example.com"] * 3
    warnings = [r for r in caplog.records if r.name == "autopull.streams.trace"]
    assert len(warnings) == 1
    assert "Trace search failed mailbox=bob@example.com" in warnings[0].getMessage()
    errors = [progress["error"] for progress in agent.traced().values()]
    assert len(errors) == 3
    assert all("no user for mailbox bob@example.com" in error for error in errors)


BULK = ("alice", "bob", "carol", "dan", "erin")


def delivery(recipient: str, sender: str = "billing@example.net", **fields: Any) -> Any:
    return TraceEvent(
        message_id=ORIGINAL.message_id,
        event="DELIVER",
        at=DELIVERED,
        source="STOREDRIVER",
        sender=sender,
        recipients=(recipient,),
        **fields,
    )


async def test_agent_reports_only_new_copies(agent: TraceAgent) -> None:
    mailboxes = [f"{name}@example.com" for name in BULK]
    agent.platform.failing = frozenset()
    # One trace by Message-ID for every mailbox: the five original deliveries, a
    # redirect by alice to dave, and carol sending the message on to frank.
    agent.platform.trace_events = [delivery(mailbox) for mailbox in mailboxes]
    agent.platform.trace_events += [
        TraceEvent(
            message_id=ORIGINAL.message_id,
            event="REDIRECT",
            at=DELIVERED,
            source="ROUTING",
            recipients=("dave@example.com",),
            related_recipient="alice@example.com",
        ),
        delivery("dave@example.com"),
        delivery("frank@example.com", sender="carol@example.com"),
    ]
    incident = pulled_incident("INC-1", {mailbox: {} for mailbox in mailboxes})

    await agent.feed(incident)

    findings = [value for topic, _, value in agent.sent if topic == "trace.findings"]
    edges = [(f["from_mailbox"], f["to_mailbox"]) for f in findings]
    assert edges == [
        ("alice@example.com", "dave@example.com"),
        ("carol@example.com", "frank@example.com"),
    ]
    events = [v for t, _, v in agent.sent if t == "incident.events"]
    assert len([v for v in events if v["kind"] == "finding"]) == 2
    counts = {mailbox: p["findings"] for (_, mailbox), p in agent.traced().items()}
    assert counts == {
        "alice@example.com": 1,
        "bob@example.com": 0,
        "carol@example.com": 1,
        "dan@example.com": 0,
        "erin@example.com": 0,
    }
    assert agent.platform.searched == mailboxes
    assert agent.platform.trace_reads == [ORIGINAL.message_id]


def match(to_mailbox: str, confidence: Any) -> Match:
    return Match(
        "alice@example.com", to_mailbox, "m2", Evidence(confidence, "test evidence")
    )


def test_new_matches_drops_known_copies() -> None:
    known = {("bob@example.com", "m2"): 4, ("carol@example.com", "m2"): 1}
    matches = [
        match("bob@example.com", "definitive"),
        match("carol@example.com", "medium"),
        match("carol@example.com", "strong"),
        match("dave@example.com", "medium"),
        match("dave@example.com", "medium"),
    ]

    unseen = new_matches(matches, known)

    assert [(m.to_mailbox, m.evidence.confidence) for m in unseen] == [
        ("carol@example.com", "strong"),
        ("dave@example.com", "medium"),
    ]
    assert known[("carol@example.com", "m2")] == 2
    assert known[("dave@example.com", "m2")] == 1
