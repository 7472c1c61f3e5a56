"""The forward tree in the incident view and in the terminal."""

from __future__ import annotations

import io
from datetime import UTC, datetime
from typing import Any

from rich.console import Console

from autopull.streams.incidents import new_incident
from autopull.streams.operate import forward_tree
from autopull.streams.views import forward_rows, incident_detail

FOUND = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)


def hop(
    sender: str, recipient: str, message_id: str, depth: int, **changes: Any
) -> dict[str, Any]:
    edge = {
        "from_mailbox": sender,
        "to_mailbox": recipient,
        "message_id": message_id,
        "original_message_id": "m1@example.net",
        "evidence": "The original is attached as message/rfc822.",
        "confidence": "definitive",
        "depth": depth,
        "found_at": FOUND,
        "external": False,
        "action": "pull",
    }
    edge.update(changes)
    return edge


def cycle_incident() -> dict[str, Any]:
    incident = new_incident("INC-1", "campaign:c1", FOUND)
    incident["forwards"] = [
        hop("alice@example.com", "bob@example.com", "m2", 1),
        hop("alice@example.com", "eve@example.net", "m2", 1, external=True,
            action="skip"),
        hop("bob@example.com", "alice@example.com", "m3", 2, confidence="strong",
            evidence="It carries the malicious attachment."),
    ]  # fmt: skip
    return incident


def render(incident: dict[str, Any]) -> str:
    out = io.StringIO()
    Console(file=out, width=200).print(forward_tree(forward_rows(incident), "finished"))
    return out.getvalue()


def test_detail_lists_every_hop() -> None:
    detail = incident_detail(cycle_incident())
    assert detail["trace_state"] == "finished"
    assert [(h["from_mailbox"], h["to_mailbox"]) for h in detail["forwards"]] == [
        ("alice@example.com", "bob@example.com"),
        ("alice@example.com", "eve@example.net"),
        ("bob@example.com", "alice@example.com"),
    ]
    assert detail["forwards"][0]["found_at"] == "2026-12-01T10:00:00Z"


def test_tree_nests_each_hop_once() -> None:
    lines = render(cycle_incident()).splitlines()
    assert lines[0] == "Forwards (trace finished)"
    assert lines[1].endswith("alice@example.com")
    assert "bob@example.com m2 [definitive, pull]" in lines[2]
    assert "alice@example.com m3 [strong, pull]" in lines[3]
    assert lines[3].index("alice") > lines[2].index("bob")
    assert "eve@example.net m2 [definitive, external, reported]" in lines[4]
    assert len(lines) == 5


def test_tree_keeps_brackets_in_ids() -> None:
    incident = new_incident("INC-2", "campaign:c2", FOUND)
    incident["forwards"] = [hop("a@example.com", "b@example.com", "[gw10].x@y", 1)]
    assert "b@example.com [gw10].x@y [definitive, pull]" in render(incident)
