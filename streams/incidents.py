"""Folding incident events into incidents: pure functions, no Kafka.

The incident agent owns the incidents table and calls these functions for each
event on `incident.events`. Each returns the pull commands the change calls for,
so replaying an event that changes nothing issues nothing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from autopull.streams.policy import search_key
from autopull.streams.records import (
    FINAL_STATUSES,
    PULLED_STATUSES,
    Record,
    command_id,
    utcnow,
)
from autopull.streams.scoring import score_alert, total

SEVERITY = {"malware": 4, "phish": 3, "impostor": 2, "spam": 1, "unknown": 0}
# Verdicts that take back an earlier one: the copies it caused to be pulled go back.
WITHDRAWN_STATUSES = frozenset({"cleared", "false_positive"})
WITHDRAWN_RULE = "verdict-withdrawn"


class DecisionLike(Protocol):
    """A policy decision for one message in one mailbox."""

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


@dataclass(frozen=True)
class _Withdrawn:
    """The skip decision for a copy whose verdict was withdrawn before any pull."""

    mailbox: str
    message_id: str
    reason: str
    action: str = "skip"
    rule: str = WITHDRAWN_RULE


# Returns the MessageSearch record of an alert without a usable Message-ID, else None.
Searcher = Callable[[Record], Record | None]


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
        "score_factors": {},
        "sources": [],
        "alert_ids": [],
        "message_ids": [],
        "targets": [],
        "attackers": [],
        "pulls": [],
        "history": [],
        "custom_fields": {},
        "payload_urls": [],
        "payload_hashes": [],
        "traced_messages": [],
        "forwards": [],
    }


def apply_alert(
    incident: Record,
    enriched: Record,
    decide: Decide,
    search_for: Searcher | None = None,
) -> list[Record]:
    """Join an enriched alert to `incident` and return the pull commands it needs.

    An alert already joined is a replay and changes nothing. `search_for` gives
    the search that finds a message without a usable Message-ID, which its pull
    entries keep for their commands.
    """
    alert = enriched["alert"]
    if alert["alert_id"] in incident["alert_ids"]:
        return []

    now = utcnow()
    search = search_for(alert) if search_for is not None else None
    _add_alert_facts(incident, alert)
    _update_score(incident, enriched)
    if alert["threat_status"] in WITHDRAWN_STATUSES:
        mailboxes = [r["mailbox"] for r in enriched["recipients"]]
        commands = _withdraw(incident, alert, search, mailboxes, now)
        update_state(incident, now)
        return commands

    decisions = decide(alert, enriched["recipients"])
    recipients = {r["mailbox"]: r for r in enriched["recipients"]}
    pulls = _PullIndex(incident)
    commands = []
    for decision in decisions:
        recipient = recipients.get(decision.mailbox, {})
        kind = recipient.get("recipient_type", "original")
        entry = pulls.find(decision.mailbox, decision.message_id)
        if entry is None:
            entry = _pull_entry(decision, alert, kind, search)
            pulls.append(entry)
        elif (
            entry["action"] == "skip"
            and decision.action == "pull"
            and entry["rule"] != WITHDRAWN_RULE
        ):
            # A copy another alert skipped (a blocked click, say) is pulled once
            # an alert calls for it. A held copy keeps waiting for its approval,
            # and a copy whose verdict was withdrawn is not pulled again.
            entry.update(_pull_entry(decision, alert, kind, search))
        else:
            continue
        entry["vip"] = bool(recipient.get("vip"))
        # Decisions of the policy module carry `notify`; other deciders need not.
        if getattr(decision, "notify", False):
            incident["history"].append(
                _history(now, "notice", f"{decision.mailbox}: {decision.reason}")
            )
        if decision.action == "pull":
            commands.append(_command_for(incident, entry, "quarantine", now, alert))

    incident["history"].append(
        _history(now, "alert joined", f"{alert['source']} alert {alert['alert_id']}")
    )
    update_state(incident, now)
    return commands


def incident_mailboxes(incident: Record, recipients: list[Record]) -> set[str]:
    """Return the distinct mailboxes of `incident` together with `recipients`."""
    mailboxes = {entry["mailbox"] for entry in incident["pulls"]}
    return mailboxes | {recipient["mailbox"] for recipient in recipients}


def _update_score(incident: Record, enriched: Record) -> None:
    recipients = enriched["recipients"]
    vips = {entry["mailbox"] for entry in incident["pulls"] if entry.get("vip")}
    vips |= {recipient["mailbox"] for recipient in recipients if recipient.get("vip")}
    factors = score_alert(
        incident.get("score_factors") or {},
        enriched,
        incident_mailboxes(incident, recipients),
        vips,
    )
    incident["score_factors"] = factors
    incident["score"] = total(factors)


def apply_outcome(incident: Record, outcome: Record) -> bool:
    """Record a pull outcome on its pull entry; return False when none matches."""
    entry = _find_pull(incident, outcome["mailbox"], outcome["message_id"])
    if entry is None:
        return False
    if _already_recorded(entry, outcome):
        return True

    entry["platform"] = outcome["platform"]
    entry["error"] = outcome.get("error")
    if outcome.get("resolved_message_id"):
        entry["resolved_message_id"] = outcome["resolved_message_id"]
    if outcome["kind"] == "quarantine" and outcome["status"] == "held":
        # A search that found no message or several leaves the decision to people.
        entry.update(action="hold", status="held", rule="search.not-unique")
        entry["reason"] = outcome.get("error") or ""
        entry["candidates"] = list(outcome.get("candidates") or [])
        entry["error"] = None
    elif outcome["kind"] == "restore":
        # A restore that has not succeeded leaves the copy quarantined, as it was.
        if outcome["status"] == "restored":
            entry["status"] = "restored"
            entry["undone"] = True
    else:
        entry["status"] = outcome["status"]
        entry["mailbox_missing"] = outcome.get("mailbox_missing", False)
        entry["attempts"] = outcome["attempts"]
        entry["original_folder"] = outcome.get("original_folder")
        entry["read"] = outcome.get("read")
        entry["started_at"] = outcome["started_at"]
        entry["finished_at"] = outcome["finished_at"]
        entry["seconds_from_alert"] = outcome.get("seconds_from_alert")

    now = utcnow()
    detail = outcome_detail(outcome["mailbox"], outcome["message_id"])
    detail += outcome["status"]
    if outcome.get("error"):
        detail += f" ({outcome['error']})"
    incident["history"].append(_history(now, f"{outcome['kind']} outcome", detail))
    update_state(incident, now)
    return True


def outcome_detail(mailbox: str, message_id: str) -> str:
    """Return how the history detail of an outcome for this copy starts."""
    return f"{mailbox} <{message_id}>: "


def restores_due(incident: Record, outcome: Record) -> list[Record]:
    """Return the restore command for a copy quarantined after its verdict changed.

    A withdrawn verdict that arrives while the quarantine is in flight marks the
    pull entry, and the quarantined outcome then calls for the restore.
    """
    entry = _find_pull(incident, outcome["mailbox"], outcome["message_id"])
    if entry is None or not entry.get("withdrawn") or entry["undone"]:
        return []
    if outcome["kind"] != "quarantine" or outcome["status"] not in PULLED_STATUSES:
        return []

    # The mark stays until the restore succeeds, so an outcome replayed after a
    # crash that lost the restore command issues it again.
    now = utcnow()
    incident["history"].append(
        _history(
            now,
            "verdict withdrawn",
            f"{entry['mailbox']}: quarantined after the verdict was withdrawn, so it "
            "is restored.",
        )
    )
    return [_command_for(incident, entry, "restore", now)]


def _already_recorded(entry: Record, outcome: Record) -> bool:
    """Tell whether a quarantine outcome repeats what the pull entry records.

    A worker that restarts reads outcomes again from uncommitted offsets, and
    runs commands again, which then find their own work done. Neither changes
    the incident, so its content is the same as without the restart.
    """
    if outcome["kind"] != "quarantine" or entry.get("undone"):
        return False
    if (
        entry["status"] == outcome["status"]
        and entry.get("finished_at") == (outcome["finished_at"])
    ):
        return True
    return (
        entry["status"] in PULLED_STATUSES
        and outcome["status"] == "already_quarantined"
    )


def apply_command(incident: Record, command: Record) -> list[Record]:
    """Apply a person's command (approve, reject, release, retry, comment, close).

    `command` is the Command record of an IncidentEvent; `mailbox`, when set,
    limits approve, reject, release and retry to that mailbox, and `message_id`,
    when set, limits approve to the held copies it names (see `approve_targets`).
    Returns the pull commands the change calls for.
    """
    now = utcnow()
    action, actor = command["action"], command["actor"]
    # Only a missing mailbox means every mailbox: a blank one matches none.
    mailbox = command.get("mailbox")
    if mailbox is not None:
        mailbox = mailbox.strip().lower()
    text = command.get("text") or ""
    note = f" {text}" if text else ""
    commands: list[Record] = []
    restarted: list[Record] = []
    if action == "approve":
        picked = command.get("message_id")
        for entry, chosen in approve_targets(incident, mailbox, picked):
            entry.update(action="pull", status=None, rule="approved")
            entry["reason"] = f"Approved by {actor}.{note}"
            if chosen is not None:
                # The pull acts on the chosen candidate and skips the search,
                # which found several messages or none with a Message-ID.
                entry["resolved_message_id"] = chosen
                entry["reason"] = f"Approved by {actor} for {chosen}.{note}"
            commands.append(_command_for(incident, entry, "quarantine", now))
    elif action == "reject":
        for entry in held_entries(incident, mailbox):
            entry.update(action="skip", status="skipped", rule="rejected")
            entry["reason"] = f"Rejected by {actor}.{note}"
    elif action == "retry":
        for entry in retry_targets(incident, mailbox):
            entry.update(status=None, rule="retried", error=None, mailbox_missing=False)
            entry["reason"] = f"Retried by {actor}.{note}"
            commands.append(_command_for(incident, entry, "quarantine", now))
        restarted = restart_failed_traces(incident, mailbox)
    elif action == "release":
        for entry in release_targets(incident, mailbox):
            commands.append(_command_for(incident, entry, "restore", now))
    elif action == "close":
        incident["state"] = "closed"
    elif action != "comment":
        raise ValueError(
            f"Command {action!r} on incident {incident['incident_id']} is not known; "
            "use approve, reject, release, retry, comment or close."
        )

    detail = f"{len(commands)} pull commands" if commands else text
    if restarted:
        searches = ", ".join(entry["mailbox"] for entry in restarted)
        detail = f"{detail}; restarted the forward search of {searches}".lstrip("; ")
    if mailbox is not None:
        detail = f"{mailbox}: {detail}"
    incident["history"].append(_history(now, action, detail, actor))
    update_state(incident, now)
    return commands


def _withdraw(
    incident: Record,
    alert: Record,
    search: Record | None,
    mailboxes: list[str],
    now: datetime,
) -> list[Record]:
    """Restore the copies of a message whose verdict was withdrawn; drop its holds.

    The alerts of one source can arrive out of order, because each poll window is
    a record of its own, so a withdrawal may come before the alert that calls for
    the pull. Each named mailbox without a pull entry then gets a skipped one,
    which a later pull decision for the message leaves alone.
    """
    # NOTE: so a verdict that the source re-activates after withdrawing it pulls
    # nothing more in this incident. Alerts carry no threat time to order them by.
    commands = []
    status = alert["threat_status"]
    message_id = alert["message_id"] or (search_key(search) if search else "")
    pulls = _PullIndex(incident)
    for mailbox in mailboxes:
        if pulls.find(mailbox, message_id) is None:
            reason = (
                f"The verdict changed to {status} before any alert called for a "
                "pull, so nothing is pulled."
            )
            withdrawn = _Withdrawn(mailbox, message_id, reason)
            pulls.append(_pull_entry(withdrawn, alert, "original", search))
    for entry in incident["pulls"]:
        if entry["message_id"] != message_id:
            continue
        if entry["status"] in PULLED_STATUSES and not entry["undone"]:
            commands.append(_command_for(incident, entry, "restore", now))
        elif entry["status"] == "held":
            entry.update(action="skip", status="skipped", rule=WITHDRAWN_RULE)
            entry["reason"] = f"The verdict changed to {status}, so nothing is pulled."
        elif entry["action"] == "pull" and entry["status"] not in FINAL_STATUSES:
            # The quarantine is still in flight (or parked after throttling), so
            # the copy is restored once its outcome reports it quarantined.
            entry["withdrawn"] = True
    incident["history"].append(
        _history(
            now,
            "verdict withdrawn",
            f"{alert['source']} marked {alert['message_id']} {status}; "
            f"{len(commands)} copies are restored.",
        )
    )
    return commands


def approve_targets(
    incident: Record, mailbox: str | None, message_id: str | None
) -> list[tuple[Record, str | None]]:
    """Return the held pull entries that an approve acts on, each with its pick.

    Without `message_id`, every held entry (of `mailbox`, when given) is approved
    as it is, and one held by an ambiguous search searches again. With it, only
    the entries held for that Message-ID, or whose search offered it as a
    candidate, are approved. A picked candidate is returned beside its entry, so
    that the pull acts on that message only. An entry with neither a Message-ID
    nor a search, or whose search found only messages without one, is never
    approved, because no pull could act on its message.
    """
    targets: list[tuple[Record, str | None]] = []
    for entry in held_entries(incident, mailbox):
        own_ids = (entry["message_id"], entry.get("resolved_message_id"))
        if message_id in candidate_ids(entry):
            targets.append((entry, message_id))
        elif not pullable_as_held(entry):
            continue
        elif message_id is None or message_id in own_ids:
            targets.append((entry, None))
    return targets


def pullable_as_held(entry: Record) -> bool:
    """Tell whether approving a held entry as it is could pull its message.

    Not when nothing names the message (no Message-ID and no search), and not
    when its search found only messages without a Message-ID, because a new
    search would find them again and hold the copy again.
    """
    if not (entry["message_id"] or entry.get("search")):
        return False
    return not (entry.get("candidates") and not candidate_ids(entry))


def candidate_ids(entry: Record) -> list[str]:
    """Return the Message-IDs of the messages a held search offered, in order."""
    found = (c["message_id"] for c in entry.get("candidates") or [])
    return list(dict.fromkeys(message_id for message_id in found if message_id))


def held_entries(incident: Record, mailbox: str | None) -> list[Record]:
    """Return the pull entries held for a person (of `mailbox`, when given)."""
    return _entries(incident, mailbox, {"held"})


def release_targets(incident: Record, mailbox: str | None) -> list[Record]:
    """Return the pulled entries that are not restored yet, which a release restores."""
    pulled = _entries(incident, mailbox, set(PULLED_STATUSES))
    return [entry for entry in pulled if not entry["undone"]]


def retry_targets(incident: Record, mailbox: str | None) -> list[Record]:
    """Return the pull entries whose quarantine failed, which a retry runs again."""
    return [
        entry
        for entry in _entries(incident, mailbox, {"failed"})
        if entry["action"] == "pull"
    ]


def _entries(incident: Record, mailbox: str | None, statuses: set[str]) -> list[Record]:
    return [
        entry
        for entry in incident["pulls"]
        if entry["status"] in statuses and mailbox in (None, entry["mailbox"])
    ]


def _command_for(
    incident: Record,
    entry: Record,
    kind: str,
    now: datetime,
    alert: Record | None = None,
) -> Record:
    """Build the pull command of a pull entry; `alert` is the one that called for it.

    A copy without a usable Message-ID carries its search, and once a search found
    the real Message-ID, the command acts on that one.
    """
    return {
        "command_id": command_id(
            incident["incident_id"], kind, entry["mailbox"], entry["message_id"]
        ),
        "incident_id": incident["incident_id"],
        "kind": kind,
        "mailbox": entry["mailbox"],
        "message_id": entry["message_id"],
        "alert_id": entry["alert_id"],
        "alert_received_at": alert["received_at"] if alert else now,
        "issued_at": now,
        "recipient_type": entry["recipient_type"],
        "reason": entry["reason"],
        "attempt": 1,
        "not_before": None,
        "search": entry.get("search") if kind == "quarantine" else None,
        "resolved_message_id": entry.get("resolved_message_id"),
    }


def _add_alert_facts(incident: Record, alert: Record) -> None:
    incident["alert_ids"].append(alert["alert_id"])
    _append_new(incident["sources"], [alert["source"]])
    if alert["message_id"]:
        _append_new(incident["message_ids"], [alert["message_id"]])
    _append_new(incident["targets"], alert["recipients"])
    attackers = (alert.get("sender"), alert.get("sender_ip"))
    _append_new(incident["attackers"], [attacker for attacker in attackers if attacker])
    if not incident["title"] and alert.get("subject"):
        incident["title"] = alert["subject"]
    if SEVERITY[alert["classification"]] > SEVERITY[incident["classification"]]:
        incident["classification"] = alert["classification"]


def _pull_entry(
    decision: DecisionLike,
    alert: Record,
    recipient_type: str = "original",
    search: Record | None = None,
) -> Record:
    status = {"hold": "held", "skip": "skipped"}.get(decision.action)
    return {
        "mailbox": decision.mailbox,
        "message_id": decision.message_id,
        "action": decision.action,
        "rule": decision.rule,
        "reason": decision.reason,
        "recipient_type": recipient_type,
        "vip": False,
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
        "search": search,
        "resolved_message_id": None,
        "candidates": [],
        "withdrawn": False,
        "traced": False,
        "mailbox_missing": False,
        "trace_attempts": 0,
        "trace_error": None,
        "trace_failed": False,
        "trace_round": 0,
    }


def _find_pull(incident: Record, mailbox: str, message_id: str) -> Record | None:
    for entry in incident["pulls"]:
        if entry["mailbox"] == mailbox and entry["message_id"] == message_id:
            return entry  # type: ignore[no-any-return]
    return None


class _PullIndex:
    """The pull entries of an incident by (mailbox, Message-ID), for many look-ups.

    An alert to tens of thousands of mailboxes looks up each of them, so a scan of
    `incident["pulls"]` per mailbox (`_find_pull`) would take quadratic time. Like
    `_find_pull`, `find` returns the first entry of a copy.
    """

    def __init__(self, incident: Record) -> None:
        self.pulls: list[Record] = incident["pulls"]
        self.entries: dict[tuple[str, str], Record] = {}
        for entry in self.pulls:
            self.entries.setdefault((entry["mailbox"], entry["message_id"]), entry)

    def find(self, mailbox: str, message_id: str) -> Record | None:
        return self.entries.get((mailbox, message_id))

    def append(self, entry: Record) -> None:
        """Add `entry` to the incident's pull entries."""
        self.pulls.append(entry)
        self.entries.setdefault((entry["mailbox"], entry["message_id"]), entry)


def update_state(incident: Record, now: datetime) -> None:
    """Set the incident's state from its pull entries, and its update time.

    A pull entry with action `pull` and no final outcome makes the incident
    `quarantining`, whatever added it (an alert, a command or a trace finding).
    A closed incident stays closed.
    """
    incident["updated_at"] = now
    if incident["state"] == "closed":
        return

    pulls = [entry for entry in incident["pulls"] if entry["action"] == "pull"]
    pending = [entry for entry in pulls if entry["status"] not in FINAL_STATUSES]
    pulled = [entry for entry in pulls if entry["status"] in PULLED_STATUSES]
    undone = [entry for entry in pulls if entry["undone"]]
    if pending:
        incident["state"] = "quarantining"
    elif undone and not pulled:
        incident["state"] = "restored"
    elif pulls and all(
        entry["status"] in PULLED_STATUSES | {"not_found", "restored"}
        for entry in pulls
    ):
        incident["state"] = "contained"
    else:
        incident["state"] = "open"


def _append_new(values: list[str], new: Iterable[str]) -> None:
    """Append each of `new` that `values` lacks, in order, in linear time."""
    present = set(values)
    for value in new:
        if value not in present:
            present.add(value)
            values.append(value)


def _history(at: datetime, what: str, detail: str, actor: str = "autopull") -> Record:
    return {"at": at, "what": what, "detail": detail, "actor": actor}


def restart_failed_traces(incident: Record, mailbox: str | None) -> list[Record]:
    """Restart the searches that failed their maximum attempts and return their entries.

    Each restarted entry gets a new `trace_round`, which the trace agent takes as a
    fresh copy with no failed attempts.
    """
    restarted = []
    for entry in trace_retry_targets(incident, mailbox):
        entry["trace_failed"] = False
        entry["trace_attempts"] = 0
        entry["trace_round"] = entry.get("trace_round", 0) + 1
        restarted.append(entry)
    return restarted


def trace_retry_targets(incident: Record, mailbox: str | None) -> list[Record]:
    """Return the pull entries whose search failed its maximum number of attempts."""
    return [
        entry
        for entry in incident["pulls"]
        if entry.get("trace_failed")
        and entry["action"] == "pull"
        and not entry.get("traced")
        and mailbox in (None, entry["mailbox"])
    ]
