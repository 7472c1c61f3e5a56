"""Incident views for people and scripts: list rows and result rows.

Result rows follow the per-mailbox quarantine results that security teams know
from incident-response products: one row per mailbox action.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from typing import Any

from autopull.streams.forward_tree import trace_state
from autopull.streams.records import Record

INCIDENT_STATES = ("new", "open", "quarantining", "contained", "restored", "closed")


def _iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None


def summary_row(incident: Record) -> dict[str, Any]:
    """Return the one-line summary of an incident."""
    statuses = Counter(entry["status"] or "pending" for entry in incident["pulls"])
    return {
        "incident_id": incident["incident_id"],
        "state": incident["state"],
        "classification": incident["classification"],
        "title": incident["title"],
        "sources": incident["sources"],
        "targets": len(incident["targets"]),
        "pulls": dict(sorted(statuses.items())),
        "created_at": _iso(incident["created_at"]),
        "updated_at": _iso(incident["updated_at"]),
    }


def result_rows(incident: Record) -> list[dict[str, Any]]:
    """Return one result row per mailbox action of the incident."""
    return [
        {
            "mailbox": entry["mailbox"],
            "message_id": entry["message_id"],
            "action": entry["action"],
            "status": entry["status"] or "pending",
            "read": entry["read"],
            "original_folder": entry["original_folder"],
            "started_at": _iso(entry["started_at"]),
            "finished_at": _iso(entry["finished_at"]),
            "seconds_from_alert": entry.get("seconds_from_alert"),
            "undone": entry["undone"],
            "recipient_type": entry["recipient_type"],
            "rule": entry["rule"],
            "reason": entry["reason"],
            "error": entry["error"],
            "resolved_message_id": entry.get("resolved_message_id"),
            "candidates": [
                dict(candidate, received_at=_iso(candidate.get("received_at")))
                for candidate in entry.get("candidates") or []
            ],
        }
        for entry in incident["pulls"]
    ]


def forward_rows(incident: Record) -> list[dict[str, Any]]:
    """Return the hops of the forward tree: who passed a copy to whom, and how found.

    Hops are in the order they were found. A hop of depth 1 starts at a recipient
    of an alert, and each deeper hop starts at the recipient of a hop one level up.
    """
    return [
        {
            "from_mailbox": edge["from_mailbox"],
            "to_mailbox": edge["to_mailbox"],
            "message_id": edge["message_id"],
            "original_message_id": edge["original_message_id"],
            "depth": edge["depth"],
            "confidence": edge["confidence"],
            "evidence": edge["evidence"],
            "action": edge["action"],
            "external": edge["external"],
            "found_at": _iso(edge["found_at"]),
        }
        for edge in incident.get("forwards") or []
    ]


def incident_detail(incident: Record) -> dict[str, Any]:
    """Return an incident with its results and history, ready for JSON."""
    detail = summary_row(incident)
    detail.update(
        campaign_key=incident["campaign_key"],
        score=incident["score"],
        alert_ids=incident["alert_ids"],
        message_ids=incident["message_ids"],
        target_mailboxes=incident["targets"],
        attackers=incident["attackers"],
        results=result_rows(incident),
        history=[
            {
                "at": _iso(item["at"]),
                "what": item["what"],
                "detail": item["detail"],
                "actor": item["actor"],
            }
            for item in incident["history"]
        ],
        custom_fields=incident["custom_fields"],
        trace_state=trace_state(incident),
        forwards=forward_rows(incident),
    )
    return detail


def matches(
    incident: Record,
    *,
    state: str | None = None,
    message_id: str | None = None,
    mailbox: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> bool:
    """Return True when the incident passes every filter that is set."""
    if state and incident["state"] != state:
        return False
    if message_id and message_id.strip().strip("<>") not in incident["message_ids"]:
        return False
    if mailbox and mailbox.lower() not in {e["mailbox"] for e in incident["pulls"]}:
        return False
    if since and incident["updated_at"] < since:
        return False
    return not (until and incident["created_at"] > until)
