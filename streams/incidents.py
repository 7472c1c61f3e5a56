"""Folding incident events into incidents: pure functions, no Kafka.

The incident agent owns the incidents table and calls these functions for each
event on `incident.events`. Each returns the pull commands the change calls for,
so replaying an event that changes nothing issues nothing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Protocol

from autopull.streams.records import (
    FINAL_STATUSES,
    PULLED_STATUSES,
    Record,
    command_id,
    utcnow,
)

SEVERITY = {"malware": 4, "phish": 3, "impostor": 2, "spam": 1, "unknown": 0}


class DecisionLike(Protocol):
    """What the policy returns for one message in one mailbox."""

    @property
    def mailbox(self) -> str: ...
    @property
    def message_id(self) -> str: ...
    @property
    def action(self) -> str: ...
    @property
    def reason(self) -> str: ...
    @property
    def rule(self) -> str: ...


Decide = Callable[[Record, list[Record]], Sequence[DecisionLike]]


def incident_id_for(campaign_key: str, opened_at: datetime) -> str:
    """Return a deterministic incident id, the same when a grouping is replayed."""
    seed = f"{campaign_key}\x1f{opened_at.isoformat()}"
    return "INC-" + hashlib.sha256(seed.encode()).hexdigest()[:12].upper()


def new_incident(incident_id: str, campaign_key: str, at: datetime) -> Record:
    """Return an empty incident in state `new`."""
    return {
        "incident_id": incident_id,
        "state": "new",
        "created_at": at,
        "updated_at": at,
        "campaign_key": campaign_key,
        "title": "",
        "classification": "unknown",
        "score": 0,
        "sources": [],
        "alert_ids": [],
        "message_ids": [],
        "targets": [],
        "attackers": [],
        "pulls": [],
        "history": [],
        "custom_fields": {},
    }


def apply_alert(incident: Record, enriched: Record, decide: Decide) -> list[Record]:
    """Join an enriched alert to `incident` and return the pull commands it needs.

    An alert already joined is a replay and changes nothing.
    """
    alert = enriched["alert"]
    if alert["alert_id"] in incident["alert_ids"]:
        return []

    now = utcnow()
    _add_alert_facts(incident, alert)
    decisions = decide(alert, enriched["recipients"])
    commands = []
    for decision in decisions:
        entry = _find_pull(incident, decision.mailbox, decision.message_id)
        if entry is None:
            incident["pulls"].append(_pull_entry(decision, alert))
        elif entry["action"] == "skip" and decision.action == "pull":
            # A copy another alert skipped (a blocked click, say) is pulled once
            # an alert calls for it. A held copy keeps waiting for its approval.
            entry.update(_pull_entry(decision, alert))
        else:
            continue
        if decision.action == "pull":
            commands.append(_quarantine_command(incident, decision, alert, now))

    incident["history"].append(
        _history(now, "alert joined", f"{alert['source']} alert {alert['alert_id']}")
    )
    _update_state(incident, now)
    return commands


def apply_outcome(incident: Record, outcome: Record) -> bool:
    """Record a pull outcome on its pull entry; return False when none matches."""
    entry = _find_pull(incident, outcome["mailbox"], outcome["message_id"])
    if entry is None:
        return False

    entry["status"] = outcome["status"]
    entry["platform"] = outcome["platform"]
    entry["attempts"] = outcome["attempts"]
    entry["error"] = outcome.get("error")
    if outcome["kind"] == "restore":
        entry["undone"] = outcome["status"] == "restored"
    else:
        entry["original_folder"] = outcome.get("original_folder")
        entry["read"] = outcome.get("read")
        entry["started_at"] = outcome["started_at"]
        entry["finished_at"] = outcome["finished_at"]
        entry["seconds_from_alert"] = outcome.get("seconds_from_alert")

    now = utcnow()
    detail = f"{outcome['mailbox']}: {outcome['status']}"
    if outcome.get("error"):
        detail += f" ({outcome['error']})"
    incident["history"].append(_history(now, f"{outcome['kind']} outcome", detail))
    _update_state(incident, now)
    return True


def _add_alert_facts(incident: Record, alert: Record) -> None:
    incident["alert_ids"].append(alert["alert_id"])
    _append_new(incident["sources"], alert["source"])
    if alert["message_id"]:
        _append_new(incident["message_ids"], alert["message_id"])
    for recipient in alert["recipients"]:
        _append_new(incident["targets"], recipient)
    for attacker in (alert.get("sender"), alert.get("sender_ip")):
        if attacker:
            _append_new(incident["attackers"], attacker)
    if not incident["title"] and alert.get("subject"):
        incident["title"] = alert["subject"]
    if SEVERITY[alert["classification"]] > SEVERITY[incident["classification"]]:
        incident["classification"] = alert["classification"]


def _pull_entry(decision: DecisionLike, alert: Record) -> Record:
    status = {"hold": "held", "skip": "skipped"}.get(decision.action)
    return {
        "mailbox": decision.mailbox,
        "message_id": decision.message_id,
        "action": decision.action,
        "rule": decision.rule,
        "reason": decision.reason,
        "recipient_type": "original",
        "alert_id": alert["alert_id"],
        "status": status,
        "platform": None,
        "original_folder": None,
        "read": None,
        "attempts": 0,
        "started_at": None,
        "finished_at": None,
        "seconds_from_alert": None,
        "undone": False,
        "error": None,
    }


def _quarantine_command(
    incident: Record, decision: DecisionLike, alert: Record, now: datetime
) -> Record:
    return {
        "command_id": command_id(
            incident["incident_id"], "quarantine", decision.mailbox, decision.message_id
        ),
        "incident_id": incident["incident_id"],
        "kind": "quarantine",
        "mailbox": decision.mailbox,
        "message_id": decision.message_id,
        "alert_id": alert["alert_id"],
        "alert_received_at": alert["received_at"],
        "issued_at": now,
        "recipient_type": "original",
        "reason": decision.reason,
        "attempt": 1,
        "not_before": None,
    }


def _find_pull(incident: Record, mailbox: str, message_id: str) -> Record | None:
    for entry in incident["pulls"]:
        if entry["mailbox"] == mailbox and entry["message_id"] == message_id:
            return entry  # type: ignore[no-any-return]
    return None


def _update_state(incident: Record, now: datetime) -> None:
    incident["updated_at"] = now
    if incident["state"] == "closed":
        return

    pulls = [entry for entry in incident["pulls"] if entry["action"] == "pull"]
    pending = [entry for entry in pulls if entry["status"] not in FINAL_STATUSES]
    if pending:
        incident["state"] = "quarantining"
    elif pulls and all(
        entry["status"] in PULLED_STATUSES | {"not_found"} for entry in pulls
    ):
        incident["state"] = "contained"
    else:
        incident["state"] = "open"


def _append_new(values: list[str], value: str) -> None:
    if value not in values:
        values.append(value)


def _history(at: datetime, what: str, detail: str) -> Record:
    return {"at": at, "what": what, "detail": detail, "actor": "autopull"}
