"""The search of one mailbox for forwarded copies, over a scripted platform."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

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
from autopull.streams.forwards import Payload, TracedMessage
from autopull.streams.trace import frontier_key, search_copy

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
