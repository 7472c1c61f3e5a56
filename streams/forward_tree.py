"""The forward tree of an incident: folding trace findings in, pure functions.

The incident agent calls these for `finding` and `traced` events. A finding adds
one hop to `incident["forwards"]` and, for a mailbox of the organisation, a pull
entry whose action the trace policy decides. External recipients are reported on
the tree and never pulled. The copies whose mailboxes still wait for a search are
the pull entries with action `pull` and `traced` false.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from autopull.connectors.mail.mime import normalize_url
from autopull.streams.forwards import CONFIDENCE_RANK, Payload, TracedMessage
from autopull.streams.incidents import update_state
from autopull.streams.records import FINAL_STATUSES, Record, command_id

_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")


@dataclass(frozen=True)
class TracePolicy:
    """Trace policy: the confidences that pull a copy, and the limits of the search.

    `excluded` lists mailboxes never pulled from, the quarantine mailbox among them.
    """

    pull_confidences: frozenset[str] = frozenset({"definitive", "strong"})
    max_depth: int = 5
    max_mailboxes: int = 200
    excluded: frozenset[str] = field(default_factory=frozenset)


def record_alert_payload(incident: Record, alert: Record) -> None:
    """Add an alert's malicious URLs, attachment hashes and message to the trace.

    A copy that the trace found before this alert named it (an alert per
    recipient can arrive after a search of another recipient) becomes a root:
    its pull entry turns `original` and the hop into it is dropped.
    """
    _adopt_recipients(incident, alert)
    urls = list(alert.get("urls") or [])
    hashes = [a["sha256"] for a in alert.get("attachments") or [] if a.get("sha256")]
    for threat in alert.get("threats") or []:
        if threat["kind"] == "url":
            urls.append(threat["value"])
        elif threat["kind"] == "attachment" and _SHA256.match(threat["value"]):
            hashes.append(threat["value"])
    _extend(incident["payload_urls"], (normalize_url(url) for url in urls))
    _extend(incident["payload_hashes"], (value.lower() for value in hashes))

    message_id = alert.get("message_id")
    if not message_id or alert.get("message_id_synthetic"):
        return
    delivered = (
        alert.get("delivered_at") or alert.get("occurred_at") or alert["received_at"]
    )
    _add_traced(incident, message_id, delivered, alert.get("subject"), None, 0)


def _adopt_recipients(incident: Record, alert: Record) -> None:
    message_id = alert.get("message_id")
    recipients = {address.lower() for address in alert.get("recipients") or []}
    adopted = set()
    for entry in incident["pulls"]:
        if (
            entry["message_id"] == message_id
            and entry["mailbox"] in recipients
            and entry["recipient_type"] == "forward"
        ):
            entry["recipient_type"] = "original"
            adopted.add(entry["mailbox"])
    incident["forwards"] = [
        edge
        for edge in incident["forwards"]
        if not (edge["message_id"] == message_id and edge["to_mailbox"] in adopted)
    ]


def incident_payload(incident: Record) -> Payload:
    """Return the incident's malicious URLs and attachment hashes."""
    return Payload(
        urls=frozenset(incident.get("payload_urls") or []),
        attachment_hashes=frozenset(incident.get("payload_hashes") or []),
    )


# Header on each `incidents` record: how many pulled copies wait for a search. The
# trace agent skips a record whose header is 0 without decoding it, and decodes
# a record without the header, such as one written before the header existed.
UNTRACED_HEADER = "autopull-untraced"


def untraced_header(incident: Record) -> tuple[str, bytes]:
    """Return the untraced-copies header for the `incidents` record of `incident`."""
    return UNTRACED_HEADER, str(len(untraced_copies(incident))).encode()


def nothing_untraced(headers: Mapping[str, bytes] | None) -> bool:
    """Return True when the headers of an `incidents` record show no waiting copy."""
    value = (headers or {}).get(UNTRACED_HEADER)
    return value == b"0"


def untraced_copies(incident: Record) -> list[tuple[Record, TracedMessage]]:
    """Return the pulled copies whose mailboxes were not searched yet.

    A copy is searched once its pull has an outcome (quarantined, not found,
    failed), so the search never competes with the quarantine for the mailbox.
    A copy the user already deleted is searched too, because it may have been
    forwarded first.
    """
    messages = {
        entry["message_id"]: entry for entry in incident.get("traced_messages") or []
    }
    found = []
    for entry in incident["pulls"]:
        if entry["action"] != "pull" or entry.get("traced"):
            continue
        if entry.get("trace_failed"):
            continue
        if entry["status"] not in FINAL_STATUSES:
            continue
        message = messages.get(entry["message_id"])
        if message is None:
            continue
        found.append(
            (
                entry,
                TracedMessage(
                    message_id=message["message_id"],
                    delivered_at=message["delivered_at"],
                    subject=message.get("subject"),
                    thread_index=message.get("thread_index"),
                    depth=message.get("depth", 0),
                ),
            )
        )
    return found


# Rank above every confidence: no finding changes a copy without a hop into it.
ROOT_RANK = max(CONFIDENCE_RANK.values()) + 1


def known_copies(incident: Record) -> dict[tuple[str, str], int]:
    """Map each copy the incident has, by (mailbox, Message-ID), to its evidence rank.

    A finding of a known copy changes the incident only with evidence ranked above
    the hop into it (`apply_finding`). A pull entry without a hop, such as an
    original recipient's copy, gets `ROOT_RANK`, which no finding exceeds.
    """
    known = {
        (entry["mailbox"], entry["message_id"]): ROOT_RANK
        for entry in incident["pulls"]
    }
    for edge in incident["forwards"]:
        key = (edge["to_mailbox"], edge["message_id"])
        known[key] = CONFIDENCE_RANK[edge["confidence"]]
    return known


def trace_state(incident: Record) -> str:
    """Return the forward search state of `incident`.

    `running` while a pulled copy's mailbox waits for a search or for a retry of
    a failed one, `failed` once the only copies left are those whose searches
    failed their maximum number of attempts, and `finished` when every pulled
    copy's mailbox was searched. An incident with nothing to search is `finished`.
    """
    pending = [
        entry
        for entry in incident["pulls"]
        if entry["action"] == "pull" and not entry.get("traced")
    ]
    if any(not entry.get("trace_failed") for entry in pending):
        return "running"
    return "failed" if pending else "finished"


def apply_traced(
    incident: Record, progress: Record, now: datetime, max_attempts: int
) -> bool:
    """Fold the end of one search into its pull entry; False when no entry matches.

    A search that succeeded marks the copy searched. A failed search leaves it
    unsearched and counts the attempt, so the trace agent searches it again, and
    after `max_attempts` failures marks it failed until a retry command. A copy
    whose pull found no such mailbox is searched without a search: its error is
    final. History records a search that found copies or failed, once each.
    """
    entry = _find(incident, progress["mailbox"], progress["message_id"])
    if entry is None:
        return False
    if entry.get("traced") or entry.get("trace_failed"):
        return True
    error = progress.get("error")
    if error and not entry.get("mailbox_missing"):
        _fold_failed_search(incident, entry, error, now, max_attempts)
        return True
    entry["traced"] = True
    entry["trace_error"] = error
    if progress["findings"] or error:
        detail = f"{progress['mailbox']}: {progress['findings']} findings"
        if error:
            detail += f" (search failed: {error})"
        incident["history"].append(_history(now, "traced", detail))
    return True


def _fold_failed_search(
    incident: Record, entry: Record, error: str, now: datetime, max_attempts: int
) -> None:
    attempts = entry.get("trace_attempts", 0) + 1
    entry["trace_attempts"] = attempts
    entry["trace_error"] = error
    if attempts >= max_attempts:
        entry["trace_failed"] = True
        outcome = (
            f"the search failed {attempts} times, the maximum, so it waits for "
            "a retry command"
        )
    else:
        outcome = f"attempt {attempts} of {max_attempts} failed, it will be retried"
    incident["history"].append(
        _history(
            now,
            "trace failed",
            f"{entry['mailbox']}: {outcome} (error: {error})",
        )
    )


def apply_finding(
    incident: Record, finding: Record, policy: TracePolicy, now: datetime
) -> list[Record]:
    """Add a finding to the forward tree and return the pull commands it needs.

    Each copy gets one hop into it, the first found, so the hops form a tree. A
    later finding of the same copy changes nothing unless its evidence is stronger,
    in which case the hop is updated and a copy held for weaker evidence is pulled
    if the stronger evidence calls for it. A copy an alert named is a root and gets
    no hop. A finding whose sender and recipient are the same mailbox is the
    sender's own copy of a forward (Sent Items): it gets a pull entry but no hop.
    A finding that adds or upgrades a pull sets the incident's state again, so a
    contained incident goes back to `quarantining` until the new copy is pulled.
    """
    to_mailbox = finding["to_mailbox"].lower()
    message_id = finding["message_id"]
    own_copy = finding["from_mailbox"].lower() == to_mailbox
    edge = None if own_copy else _find_edge(incident, to_mailbox, message_id)
    if edge is not None:
        upgraded = _strengthen(incident, edge, finding, policy, now)
        if upgraded:
            update_state(incident, now)
        return upgraded
    known = _find(incident, to_mailbox, message_id)
    if known is not None and known["recipient_type"] != "forward" and not own_copy:
        return []

    if not finding["external"]:
        _add_traced(
            incident,
            message_id,
            finding.get("sent_at") or finding["found_at"],
            finding.get("subject"),
            finding.get("thread_index"),
            finding["depth"],
        )

    entry = None if finding["external"] else _find(incident, to_mailbox, message_id)
    commands: list[Record] = []
    if finding["external"]:
        action = "skip"
    elif entry is not None:
        action = entry["action"]
    else:
        action, rule, reason = _decide(incident, finding, policy)
        entry = _pull_entry(incident, to_mailbox, message_id, action, rule, reason)
        entry["recipient_type"] = "sent" if own_copy else "forward"
        incident["pulls"].append(entry)
        if action == "pull":
            commands.append(_quarantine_command(incident, entry, now))

    if not own_copy:
        incident["forwards"].append(_edge(finding, action))
    what = "external forward" if finding["external"] else "forward found"
    incident["history"].append(
        _history(
            now,
            what,
            f"{finding['from_mailbox']} -> {to_mailbox}: {message_id} "
            f"({finding['confidence']}, {action}). {finding['evidence']}",
        )
    )
    update_state(incident, now)
    return commands


def _decide(
    incident: Record, finding: Record, policy: TracePolicy
) -> tuple[str, str, str]:
    confidence = finding["confidence"]
    mailbox = finding["to_mailbox"].lower()
    if mailbox in policy.excluded:
        return "skip", "trace.excluded", f"{mailbox} is excluded from pulls."
    if confidence not in policy.pull_confidences:
        action = "hold" if confidence == "medium" else "skip"
        return (
            action,
            f"trace.{confidence}",
            f"The evidence is only {confidence}, so the copy is not pulled "
            "without approval.",
        )
    if finding["depth"] > policy.max_depth:
        return (
            "hold",
            "trace.max-depth",
            f"The copy is {finding['depth']} forwards from the original, more than "
            f"the maximum of {policy.max_depth}, so it waits for approval.",
        )
    mailboxes = {entry["mailbox"] for entry in incident["pulls"]}
    if mailbox not in mailboxes and len(mailboxes) >= policy.max_mailboxes:
        return (
            "hold",
            "trace.max-mailboxes",
            f"The incident already reaches {len(mailboxes)} mailboxes, the maximum "
            "for forward tracing, so further copies wait for approval.",
        )
    return (
        "pull",
        f"trace.{confidence}",
        f"A forwarded copy ({confidence} evidence): {finding['evidence']}",
    )


def _strengthen(
    incident: Record, edge: Record, finding: Record, policy: TracePolicy, now: datetime
) -> list[Record]:
    if CONFIDENCE_RANK[finding["confidence"]] <= CONFIDENCE_RANK[edge["confidence"]]:
        return []
    edge["confidence"] = finding["confidence"]
    edge["evidence"] = finding["evidence"]
    entry = _find(incident, finding["to_mailbox"].lower(), finding["message_id"])
    if entry is None or entry["action"] != "hold" or entry["rule"] != "trace.medium":
        return []

    action, rule, reason = _decide(incident, finding, policy)
    if action != "pull":
        return []
    entry.update(action="pull", status=None, rule=rule, reason=reason)
    edge["action"] = "pull"
    return [_quarantine_command(incident, entry, now)]


def _find(incident: Record, mailbox: str, message_id: str) -> Record | None:
    for entry in incident["pulls"]:
        if entry["mailbox"] == mailbox and entry["message_id"] == message_id:
            return entry  # type: ignore[no-any-return]
    return None


def _find_edge(incident: Record, to_mailbox: str, message_id: str) -> Record | None:
    for edge in incident["forwards"]:
        if edge["to_mailbox"] == to_mailbox and edge["message_id"] == message_id:
            return edge  # type: ignore[no-any-return]
    return None


def _edge(finding: Record, action: str) -> Record:
    return {
        "from_mailbox": finding["from_mailbox"].lower(),
        "to_mailbox": finding["to_mailbox"].lower(),
        "message_id": finding["message_id"],
        "original_message_id": finding["original_message_id"],
        "evidence": finding["evidence"],
        "confidence": finding["confidence"],
        "depth": finding["depth"],
        "found_at": finding["found_at"],
        "external": finding["external"],
        "action": action,
    }


def _add_traced(
    incident: Record,
    message_id: str,
    delivered_at: datetime,
    subject: str | None,
    thread_index: str | None,
    depth: int,
) -> None:
    if any(m["message_id"] == message_id for m in incident["traced_messages"]):
        return
    incident["traced_messages"].append(
        {
            "message_id": message_id,
            "delivered_at": delivered_at,
            "subject": subject,
            "thread_index": thread_index,
            "depth": depth,
        }
    )


def _pull_entry(
    incident: Record, mailbox: str, message_id: str, action: str, rule: str, reason: str
) -> Record:
    status = {"hold": "held", "skip": "skipped"}.get(action)
    return {
        "mailbox": mailbox,
        "message_id": message_id,
        "action": action,
        "rule": rule,
        "reason": reason,
        "recipient_type": "forward",
        "vip": False,
        "alert_id": incident["alert_ids"][0] if incident["alert_ids"] else "",
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
        "search": None,
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


def _quarantine_command(incident: Record, entry: Record, now: datetime) -> Record:
    return {
        "command_id": command_id(
            incident["incident_id"], "quarantine", entry["mailbox"], entry["message_id"]
        ),
        "incident_id": incident["incident_id"],
        "kind": "quarantine",
        "mailbox": entry["mailbox"],
        "message_id": entry["message_id"],
        "alert_id": entry["alert_id"],
        "alert_received_at": incident["created_at"],
        "issued_at": now,
        "recipient_type": entry["recipient_type"],
        "reason": entry["reason"],
        "attempt": 1,
        "not_before": None,
        "search": None,
        "resolved_message_id": None,
    }


def _extend(values: list[str], new: Iterable[str]) -> None:
    for value in new:
        if value and value not in values:
            values.append(value)


def _history(at: datetime, what: str, detail: str) -> Record:
    return {"at": at, "what": what, "detail": detail, "actor": "autopull"}
