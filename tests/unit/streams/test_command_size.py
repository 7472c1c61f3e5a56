"""The size check of a command against `incident_max_bytes`, before it is sent."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

import pytest

from autopull.schemas import AvroCodec
from autopull.streams.commands import (
    IncidentTooLargeError,
    check_incident_size,
    command_event,
)
from autopull.streams.incidents import apply_command, new_incident

OPENED = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
CODEC = AvroCodec("Incident")


def held_incident(mailboxes: int) -> dict[str, Any]:
    incident = new_incident("INC-1", "campaign:1", OPENED)
    for number in range(mailboxes):
        incident["pulls"].append(
            {
                "mailbox": f"user{number:04d}@example.com",
                "message_id": "m1@example.net",
                "action": "hold",
                "rule": "policy.hold-above-mailboxes",
                "reason": "Held for approval.",
                "alert_id": "tap:1",
                "status": "held",
            }
        )
    return incident


def encoded_size(incident: dict[str, Any]) -> int:
    return len(CODEC.dumps(incident))


def test_comment_within_limit_passes() -> None:
    incident = held_incident(10)
    event = command_event("INC-1", "comment", "carol", text="x" * 100)

    check_incident_size(incident, event, encoded_size(incident) + 200)


def test_comment_over_limit_is_rejected() -> None:
    incident = held_incident(10)
    before = copy.deepcopy(incident)
    limit = encoded_size(incident) + 50
    event = command_event("INC-1", "comment", "carol", text="x" * 100)

    with pytest.raises(IncidentTooLargeError) as raised:
        check_incident_size(incident, event, limit)

    applied = copy.deepcopy(incident)
    apply_command(applied, event["command"])
    assert raised.value.size == encoded_size(applied)
    assert raised.value.limit == limit
    message = str(raised.value)
    assert f"{raised.value.size:,} bytes" in message
    assert f"above the maximum of {limit:,} bytes" in message
    assert "AUTOPULL_INCIDENT_MAX_BYTES" in message
    assert "Send a shorter text" in message
    # The check changes a copy, never the incident it was given.
    assert incident == before


def test_reject_counts_text_on_every_copy() -> None:
    # A reject writes its text into the reason of each held copy, so the same
    # text that fits as one comment can be too large as a reject.
    incident = held_incident(200)
    limit = encoded_size(incident) + 5_000
    text = "y" * 100
    comment = command_event("INC-1", "comment", "carol", text=text)
    reject = command_event("INC-1", "reject", "carol", text=text)

    check_incident_size(incident, comment, limit)
    with pytest.raises(IncidentTooLargeError) as raised:
        check_incident_size(incident, reject, limit)

    # Each of the 200 reasons grows by about the 100 bytes of text.
    assert raised.value.size > encoded_size(incident) + 200 * 80
    assert "The reject would make incident INC-1" in str(raised.value)


def test_close_without_text_names_setting() -> None:
    incident = held_incident(10)
    event = command_event("INC-1", "close", "carol")

    with pytest.raises(IncidentTooLargeError) as raised:
        check_incident_size(incident, event, encoded_size(incident))

    assert "Raise AUTOPULL_INCIDENT_MAX_BYTES" in str(raised.value)
