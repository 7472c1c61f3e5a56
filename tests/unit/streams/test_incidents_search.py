"""Incidents of alerts without a usable Message-ID: searched pulls and their holds."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from autopull.schemas import AvroCodec
from autopull.streams.incidents import (
    apply_alert,
    apply_command,
    apply_outcome,
    new_incident,
)
from autopull.streams.policy import PolicySettings, decide, message_search

SETTINGS = PolicySettings(quarantine_mailbox="quarantine@example.com")
DELIVERED = datetime(2024, 3, 10, 9, 30, tzinfo=UTC)
SYNTHETIC = "queue-id-7Q2@no-message-id"
REAL_ID = "s1@mail.example.net"


def enriched(threat_status: str = "active", alert_id: str = "fireeye:1") -> Any:
    alert = {
        "alert_id": alert_id,
        "source": "fireeye",
        "event_class": "message_delivered",
        "message_id": SYNTHETIC,
        "message_id_synthetic": True,
        "recipients": ["tara@example.com"],
        "sender": "billing@example.net",
        "header_from": None,
        "sender_ip": None,
        "subject": "Invoice 4471",
        "classification": "malware",
        "threat_status": threat_status,
        "received_at": DELIVERED,
        "occurred_at": DELIVERED,
        "delivered_at": DELIVERED,
    }
    return {
        "alert": alert,
        "campaign_key": "message:" + SYNTHETIC,
        "recipients": [{"mailbox": "tara@example.com"}],
    }


def policy_decide(alert: Any, recipients: list[Any]) -> Any:
    return decide(alert, [r["mailbox"] for r in recipients], SETTINGS)


def searched(alert: Any) -> Any:
    return message_search(alert, SETTINGS)


def outcome(status: str, kind: str = "quarantine", **changes: Any) -> Any:
    values = {
        "mailbox": "tara@example.com",
        "message_id": SYNTHETIC,
        "kind": kind,
        "status": status,
        "platform": "graph",
        "attempts": 1,
        "error": None,
        "original_folder": "Inbox",
        "read": False,
        "started_at": DELIVERED,
        "finished_at": DELIVERED,
        "seconds_from_alert": 1.0,
        "resolved_message_id": None,
        "candidates": [],
    }
    values.update(changes)
    return values


def joined() -> tuple[Any, list[Any]]:
    incident = new_incident("INC-1", "message:" + SYNTHETIC, DELIVERED)
    commands = apply_alert(incident, enriched(), policy_decide, searched)
    return incident, commands


def test_alert_command_carries_search() -> None:
    incident, commands = joined()

    assert len(commands) == 1
    command = commands[0]
    assert command["message_id"] == SYNTHETIC
    assert command["search"]["senders"] == ["billing@example.net"]
    assert command["search"]["subject"] == "Invoice 4471"
    assert command["resolved_message_id"] is None
    assert incident["pulls"][0]["search"] == command["search"]
    assert AvroCodec("PullCommand").loads(AvroCodec("PullCommand").dumps(command))


def test_held_outcome_lists_candidates() -> None:
    incident, _ = joined()
    candidates = [
        {
            "message_id": f"s{n}@mail.example.net",
            "folder": "Inbox",
            "subject": "Invoice 4471",
            "sender": "billing@example.net",
            "received_at": DELIVERED,
        }
        for n in (5, 6)
    ]
    reason = "2 different messages in tara@example.com match."

    applied = apply_outcome(
        incident, outcome("held", error=reason, candidates=candidates)
    )

    entry = incident["pulls"][0]
    assert applied is True
    assert entry["action"] == "hold"
    assert entry["status"] == "held"
    assert entry["rule"] == "search.not-unique"
    assert entry["reason"] == reason
    assert entry["error"] is None
    assert entry["candidates"] == candidates
    assert incident["state"] == "open"
    codec = AvroCodec("Incident")
    assert codec.loads(codec.dumps(incident))["pulls"][0]["candidates"] == candidates


def test_approved_held_search_searches_again() -> None:
    incident, _ = joined()
    apply_outcome(incident, outcome("held", error="none matched"))

    commands = apply_command(
        incident, {"action": "approve", "actor": "ana", "mailbox": None, "text": ""}
    )

    assert len(commands) == 1
    assert commands[0]["kind"] == "quarantine"
    assert commands[0]["search"] == incident["pulls"][0]["search"]


def test_release_restores_resolved_message() -> None:
    incident, _ = joined()
    apply_outcome(incident, outcome("quarantined", resolved_message_id=REAL_ID))

    commands = apply_command(
        incident, {"action": "release", "actor": "ana", "mailbox": None, "text": ""}
    )

    assert incident["pulls"][0]["resolved_message_id"] == REAL_ID
    assert len(commands) == 1
    assert commands[0]["kind"] == "restore"
    assert commands[0]["message_id"] == SYNTHETIC
    assert commands[0]["resolved_message_id"] == REAL_ID
    assert commands[0]["search"] is None


def test_cleared_verdict_restores_searched_copy() -> None:
    incident, _ = joined()
    apply_outcome(incident, outcome("quarantined", resolved_message_id=REAL_ID))

    commands = apply_alert(
        incident, enriched("cleared", "fireeye:2"), policy_decide, searched
    )

    assert [c["kind"] for c in commands] == ["restore"]
    assert commands[0]["resolved_message_id"] == REAL_ID


def test_restored_outcome_marks_entry_undone() -> None:
    incident, _ = joined()
    apply_outcome(incident, outcome("quarantined", resolved_message_id=REAL_ID))

    apply_outcome(
        incident, outcome("restored", kind="restore", resolved_message_id=REAL_ID)
    )

    assert incident["pulls"][0]["undone"] is True
    assert incident["state"] == "restored"
