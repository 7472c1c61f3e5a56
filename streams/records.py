"""Builders for the Avro record values that flow between agents.

Values are plain dicts shaped by `schemas/*.avsc`; these helpers keep the field
lists in one place so every agent writes complete records.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

Record = dict[str, Any]

FINAL_STATUSES = frozenset(
    {"quarantined", "already_quarantined", "not_found", "failed", "restored", "skipped"}
)
PULLED_STATUSES = frozenset({"quarantined", "already_quarantined"})


def utcnow() -> datetime:
    """Return the current time as an aware UTC datetime with millisecond precision."""
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def ledger_key(mailbox: str, message_id: str) -> str:
    """Return the quarantine ledger key of one message in one mailbox."""
    return f"{mailbox.lower()}\x1f{message_id}"


def command_id(incident_id: str, kind: str, mailbox: str, message_id: str) -> str:
    """Return the stable identity of a pull command, the same on every replay."""
    digest = hashlib.sha256(
        "\x1f".join((incident_id, kind, mailbox.lower(), message_id)).encode()
    ).hexdigest()
    return f"cmd-{digest[:24]}"


def dead_letter(
    *,
    source: str,
    stage: str,
    reason: str,
    body: bytes,
    received_at: datetime | None = None,
    content_type: str = "application/octet-stream",
    origin: tuple[str, int, int] | None = None,
    transport: dict[str, str] | None = None,
) -> Record:
    """Build a DeadLetter record that keeps the original bytes and the reason."""
    now = utcnow()
    topic, partition, offset = origin if origin else (None, None, None)
    return {
        "source": source,
        "stage": stage,
        "reason": reason,
        "body": body,
        "content_type": content_type,
        "received_at": received_at or now,
        "failed_at": now,
        "origin_topic": topic,
        "origin_partition": partition,
        "origin_offset": offset,
        "transport": transport or {},
    }


def incident_event(
    incident_id: str,
    kind: str,
    *,
    alert: Record | None = None,
    outcome: Record | None = None,
    finding: Record | None = None,
    command: Record | None = None,
    traced: Record | None = None,
) -> Record:
    """Build an IncidentEvent record for the incident agent."""
    return {
        "incident_id": incident_id,
        "kind": kind,
        "at": utcnow(),
        "alert": alert,
        "outcome": outcome,
        "finding": finding,
        "command": command,
        "traced": traced,
    }
