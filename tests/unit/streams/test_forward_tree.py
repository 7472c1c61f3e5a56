"""Folding trace findings into an incident's forward tree and pull list."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from autopull.streams.forward_tree import (
    TracePolicy,
    apply_finding,
    apply_traced,
    incident_payload,
    known_copies,
    nothing_untraced,
    record_alert_payload,
    trace_state,
    untraced_copies,
    untraced_header,
)
from autopull.streams.incidents import (
    apply_alert,
    apply_outcome,
    new_incident,
    restart_failed_traces,
    trace_retry_targets,
)

NOW = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
DELIVERED = datetime(2026, 12, 1, 9, 30, tzinfo=UTC)
ORIGINAL = "m1@example.net"
POLICY = TracePolicy(excluded=frozenset({"quarantine@example.com"}))
ATTEMPTS = 3


class Decision:
    def __init__(self, mailbox: str) -> None:
        self.mailbox = mailbox
        self.message_id = ORIGINAL
        self.action = "pull"
        self.reason = "malicious"
        self.rule = "test.pull"


def incident_with_alert() -> dict[str, Any]:
    incident = new_incident("INC-1", "campaign:c1", NOW)
    alert = {
        "alert_id": "generic:1",
        "source": "generic",
        "message_id": ORIGINAL,
        "message_id_synthetic": False,
        "recipients": ["alice@example.com"],
        "sender": "billing@example.net",
        "sender_ip": None,
        "subject": "Invoice 4471",
        "classification": "malware",
        "threat_status": "active",
        "received_at": NOW,
        "delivered_at": DELIVERED,
        "urls": ["HTTP://Pay.Example.net/x#top"],
        "attachments": [{"name": "a.exe", "sha256": "A" * 64}],
        "threats": [{"kind": "url", "value": "http://other.example.net/y"}],
    }
    enriched = {"alert": alert, "recipients": [{"mailbox": "alice@example.com"}]}
    apply_alert(incident, enriched, lambda a, rs: [Decision(r["mailbox"]) for r in rs])
    record_alert_payload(incident, alert)
    return incident


def finding(
    from_mailbox: str,
    to_mailbox: str,
    message_id: str,
    confidence: str = "definitive",
    depth: int = 1,
    external: bool = False,
) -> dict[str, Any]:
    return {
        "incident_id": "INC-1",
        "from_mailbox": from_mailbox,
        "to_mailbox": to_mailbox,
        "message_id": message_id,
        "original_message_id": ORIGINAL,
        "evidence": f"{confidence} evidence",
        "confidence": confidence,
        "depth": depth,
        "found_at": NOW,
        "external": external,
        "subject": "FW: Invoice 4471",
        "sent_at": DELIVERED + timedelta(minutes=depth),
        "thread_index": None,
    }


def traced(mailbox: str, message_id: str) -> dict[str, Any]:
    return {"mailbox": mailbox, "message_id": message_id, "findings": 0, "error": None}


def test_alert_payload_recorded() -> None:
    incident = incident_with_alert()
    payload = incident_payload(incident)
    assert payload.urls == {"http://pay.example.net/x", "http://other.example.net/y"}
    assert payload.attachment_hashes == {"a" * 64}
    assert [m["message_id"] for m in incident["traced_messages"]] == [ORIGINAL]
    assert incident["traced_messages"][0]["delivered_at"] == DELIVERED


def test_original_copy_waits_for_search() -> None:
    incident = incident_with_alert()
    # The search starts once the pull has an outcome.
    assert untraced_copies(incident) == []
    assert trace_state(incident) == "running"
    incident["pulls"][0]["status"] = "not_found"
    copies = untraced_copies(incident)
    assert [(entry["mailbox"], m.depth) for entry, m in copies] == [
        ("alice@example.com", 0)
    ]
    assert trace_state(incident) == "running"
    assert apply_traced(incident, traced("alice@example.com", ORIGINAL), NOW, ATTEMPTS)
    assert trace_state(incident) == "finished"
    assert not apply_traced(
        incident, traced("nobody@example.com", ORIGINAL), NOW, ATTEMPTS
    )


def test_untraced_header_counts_waiting_copies() -> None:
    incident = incident_with_alert()
    assert untraced_header(incident) == ("autopull-untraced", b"0")
    incident["pulls"][0]["status"] = "quarantined"
    assert untraced_header(incident) == ("autopull-untraced", b"1")
    assert apply_traced(incident, traced("alice@example.com", ORIGINAL), NOW, ATTEMPTS)
    assert untraced_header(incident) == ("autopull-untraced", b"0")


def test_nothing_untraced_reads_header() -> None:
    assert nothing_untraced({"autopull-untraced": b"0"})
    assert not nothing_untraced({"autopull-untraced": b"1"})
    # A record without the header may have work, so it is decoded.
    assert not nothing_untraced({})
    assert not nothing_untraced(None)


def test_definitive_finding_pulls() -> None:
    incident = incident_with_alert()
    commands = apply_finding(
        incident, finding("alice@example.com", "bob@example.com", "m2"), POLICY, NOW
    )
    assert [(c["mailbox"], c["message_id"], c["kind"]) for c in commands] == [
        ("bob@example.com", "m2", "quarantine")
    ]
    entry = incident["pulls"][-1]
    assert entry["recipient_type"] == "forward"
    assert entry["rule"] == "trace.definitive"
    edge = incident["forwards"][0]
    assert (edge["from_mailbox"], edge["to_mailbox"], edge["action"]) == (
        "alice@example.com",
        "bob@example.com",
        "pull",
    )
    assert "m2" in [m["message_id"] for m in incident["traced_messages"]]


def test_cycle_adds_no_second_pull() -> None:
    incident = incident_with_alert()
    forward = finding("alice@example.com", "bob@example.com", "m2")
    back = finding("bob@example.com", "alice@example.com", "m3", depth=2)
    assert len(apply_finding(incident, forward, POLICY, NOW)) == 1
    assert len(apply_finding(incident, back, POLICY, NOW)) == 1
    # The same forward found again, from a later search, changes nothing.
    assert apply_finding(incident, forward, POLICY, NOW) == []
    assert apply_finding(incident, back, POLICY, NOW) == []
    assert len(incident["forwards"]) == 2
    assert len(incident["pulls"]) == 3


def test_medium_finding_holds() -> None:
    incident = incident_with_alert()
    medium = finding("alice@example.com", "bob@example.com", "m2", "medium")
    assert apply_finding(incident, medium, POLICY, NOW) == []
    entry = incident["pulls"][-1]
    assert entry["action"] == "hold"
    assert entry["status"] == "held"
    incident["pulls"][0]["status"] = "quarantined"
    searched = [entry["mailbox"] for entry, _ in untraced_copies(incident)]
    assert searched == ["alice@example.com"]


def test_stronger_evidence_releases_hold() -> None:
    incident = incident_with_alert()
    medium = finding("alice@example.com", "bob@example.com", "m2", "medium")
    apply_finding(incident, medium, POLICY, NOW)
    strong = finding("alice@example.com", "bob@example.com", "m2", "strong")
    commands = apply_finding(incident, strong, POLICY, NOW)
    assert [c["mailbox"] for c in commands] == ["bob@example.com"]
    assert incident["pulls"][-1]["action"] == "pull"
    assert incident["forwards"][0]["confidence"] == "strong"


def test_external_forward_is_reported_only() -> None:
    incident = incident_with_alert()
    external = finding("alice@example.com", "eve@example.net", "m2", external=True)
    assert apply_finding(incident, external, POLICY, NOW) == []
    assert [p["mailbox"] for p in incident["pulls"]] == ["alice@example.com"]
    assert incident["forwards"][0]["external"]
    assert incident["forwards"][0]["action"] == "skip"


def test_own_sent_copy_has_no_hop() -> None:
    incident = incident_with_alert()
    own = finding("alice@example.com", "alice@example.com", "m2")
    commands = apply_finding(incident, own, POLICY, NOW)
    assert [c["mailbox"] for c in commands] == ["alice@example.com"]
    assert incident["pulls"][-1]["recipient_type"] == "sent"
    assert incident["forwards"] == []


def test_depth_limit_holds() -> None:
    incident = incident_with_alert()
    policy = TracePolicy(max_depth=2)
    deep = finding("carol@example.com", "dave@example.com", "m4", depth=3)
    assert apply_finding(incident, deep, policy, NOW) == []
    assert incident["pulls"][-1]["rule"] == "trace.max-depth"
    assert incident["pulls"][-1]["action"] == "hold"


def test_mailbox_limit_holds() -> None:
    incident = incident_with_alert()
    policy = TracePolicy(max_mailboxes=2)
    apply_finding(
        incident, finding("alice@example.com", "b@example.com", "m2"), policy, NOW
    )
    commands = apply_finding(
        incident, finding("alice@example.com", "c@example.com", "m2"), policy, NOW
    )
    assert commands == []
    assert incident["pulls"][-1]["rule"] == "trace.max-mailboxes"


def test_quarantine_mailbox_never_pulled() -> None:
    incident = incident_with_alert()
    into_quarantine = finding("alice@example.com", "quarantine@example.com", "m2")
    assert apply_finding(incident, into_quarantine, POLICY, NOW) == []
    assert incident["pulls"][-1]["action"] == "skip"


def test_delivery_to_alert_recipient_adds_no_hop() -> None:
    incident = incident_with_alert()
    delivery = finding("billing@example.net", "alice@example.com", ORIGINAL)
    assert apply_finding(incident, delivery, POLICY, NOW) == []
    assert incident["forwards"] == []
    assert len(incident["pulls"]) == 1


def test_second_sender_of_copy_adds_no_hop() -> None:
    incident = incident_with_alert()
    rule = finding("alice@example.com", "dave@example.com", ORIGINAL)
    trace = finding("billing@example.net", "dave@example.com", ORIGINAL)
    assert len(apply_finding(incident, rule, POLICY, NOW)) == 1
    assert apply_finding(incident, trace, POLICY, NOW) == []
    assert [e["from_mailbox"] for e in incident["forwards"]] == ["alice@example.com"]


def test_later_alert_makes_found_copy_a_root() -> None:
    incident = incident_with_alert()
    delivery = finding("billing@example.net", "bob@example.com", ORIGINAL)
    assert len(apply_finding(incident, delivery, POLICY, NOW)) == 1
    assert len(incident["forwards"]) == 1

    alert = {"message_id": ORIGINAL, "recipients": ["Bob@example.com"], "urls": []}
    record_alert_payload(incident, {**alert, "received_at": NOW})

    bob = [p for p in incident["pulls"] if p["mailbox"] == "bob@example.com"]
    assert [p["recipient_type"] for p in bob] == ["original"]
    assert incident["forwards"] == []


def test_traced_history_once_and_only_with_news() -> None:
    incident = incident_with_alert()
    incident["pulls"][0]["status"] = "quarantined"
    before = len(incident["history"])
    progress = {**traced("alice@example.com", ORIGINAL), "findings": 2}
    assert apply_traced(incident, progress, NOW, ATTEMPTS)
    assert apply_traced(incident, progress, NOW, ATTEMPTS)
    assert len(incident["history"]) == before + 1
    assert incident["history"][-1]["detail"] == "alice@example.com: 2 findings"


def test_empty_search_adds_no_history() -> None:
    incident = incident_with_alert()
    before = len(incident["history"])
    assert apply_traced(incident, traced("alice@example.com", ORIGINAL), NOW, ATTEMPTS)
    assert len(incident["history"]) == before


def outcome(
    mailbox: str, message_id: str, status: str, kind: str = "quarantine"
) -> dict[str, Any]:
    return {
        "mailbox": mailbox,
        "message_id": message_id,
        "kind": kind,
        "status": status,
        "platform": "graph",
        "attempts": 1,
        "error": None,
        "original_folder": "Inbox",
        "read": False,
        "started_at": NOW,
        "finished_at": NOW,
        "seconds_from_alert": 1.5,
    }


def contained_incident() -> dict[str, Any]:
    incident = incident_with_alert()
    assert incident["state"] == "quarantining"
    assert apply_outcome(
        incident, outcome("alice@example.com", ORIGINAL, "quarantined")
    )
    assert incident["state"] == "contained"
    return incident


def test_forward_pull_reopens_contained() -> None:
    incident = contained_incident()
    forward = finding("alice@example.com", "bob@example.com", "m2")
    assert len(apply_finding(incident, forward, POLICY, NOW)) == 1
    assert incident["state"] == "quarantining"
    assert incident["updated_at"] == NOW
    assert apply_outcome(incident, outcome("bob@example.com", "m2", "quarantined"))
    assert incident["state"] == "contained"


def test_held_forward_keeps_contained() -> None:
    incident = contained_incident()
    medium = finding("alice@example.com", "bob@example.com", "m2", "medium")
    assert apply_finding(incident, medium, POLICY, NOW) == []
    assert incident["pulls"][-1]["status"] == "held"
    assert incident["state"] == "contained"


def test_released_hold_reopens_contained() -> None:
    incident = contained_incident()
    medium = finding("alice@example.com", "bob@example.com", "m2", "medium")
    apply_finding(incident, medium, POLICY, NOW)
    strong = finding("alice@example.com", "bob@example.com", "m2", "strong")
    assert len(apply_finding(incident, strong, POLICY, NOW)) == 1
    assert incident["state"] == "quarantining"


def test_external_forward_keeps_contained() -> None:
    incident = contained_incident()
    external = finding("alice@example.com", "eve@example.net", "m2", external=True)
    assert apply_finding(incident, external, POLICY, NOW) == []
    assert incident["state"] == "contained"


def test_forward_pull_after_restore() -> None:
    incident = contained_incident()
    restored = outcome("alice@example.com", ORIGINAL, "restored", kind="restore")
    assert apply_outcome(incident, restored)
    assert incident["state"] == "restored"
    forward = finding("alice@example.com", "bob@example.com", "m2")
    assert len(apply_finding(incident, forward, POLICY, NOW)) == 1
    assert incident["state"] == "quarantining"


def test_forward_pull_keeps_closed() -> None:
    incident = contained_incident()
    incident["state"] = "closed"
    forward = finding("alice@example.com", "bob@example.com", "m2")
    assert len(apply_finding(incident, forward, POLICY, NOW)) == 1
    assert incident["state"] == "closed"


def test_known_copies_ranks_evidence() -> None:
    incident = incident_with_alert()
    apply_finding(
        incident,
        finding("alice@example.com", "bob@example.com", "m2", "medium"),
        POLICY,
        NOW,
    )
    apply_finding(
        incident,
        finding("alice@example.com", "eve@example.net", "m3", external=True),
        POLICY,
        NOW,
    )
    assert known_copies(incident) == {
        ("alice@example.com", ORIGINAL): 4,
        ("bob@example.com", "m2"): 1,
        ("eve@example.net", "m3"): 3,
    }


def failed(mailbox: str, message_id: str) -> dict[str, Any]:
    return {**traced(mailbox, message_id), "error": "Graph was unavailable (503)"}


def test_failed_search_stays_untraced() -> None:
    incident = incident_with_alert()
    incident["pulls"][0]["status"] = "quarantined"
    before = len(incident["history"])
    assert apply_traced(incident, failed("alice@example.com", ORIGINAL), NOW, ATTEMPTS)

    entry = incident["pulls"][0]
    assert entry["traced"] is False
    assert entry["trace_attempts"] == 1
    assert entry["trace_error"] == "Graph was unavailable (503)"
    assert entry["trace_failed"] is False
    assert [e["mailbox"] for e, _ in untraced_copies(incident)] == ["alice@example.com"]
    assert untraced_header(incident) == ("autopull-untraced", b"1")
    assert trace_state(incident) == "running"
    assert len(incident["history"]) == before + 1
    assert incident["history"][-1]["what"] == "trace failed"
    assert "attempt 1 of 3 failed" in incident["history"][-1]["detail"]


def test_search_success_after_failure() -> None:
    incident = incident_with_alert()
    incident["pulls"][0]["status"] = "quarantined"
    apply_traced(incident, failed("alice@example.com", ORIGINAL), NOW, ATTEMPTS)
    assert apply_traced(incident, traced("alice@example.com", ORIGINAL), NOW, ATTEMPTS)

    entry = incident["pulls"][0]
    assert entry["traced"] is True
    assert entry["trace_error"] is None
    assert trace_state(incident) == "finished"


def test_search_fails_after_max_attempts() -> None:
    incident = incident_with_alert()
    incident["pulls"][0]["status"] = "quarantined"
    for _ in range(ATTEMPTS):
        apply_traced(incident, failed("alice@example.com", ORIGINAL), NOW, ATTEMPTS)

    entry = incident["pulls"][0]
    assert entry["trace_attempts"] == ATTEMPTS
    assert entry["trace_failed"] is True
    assert entry["traced"] is False
    assert untraced_copies(incident) == []
    assert untraced_header(incident) == ("autopull-untraced", b"0")
    assert trace_state(incident) == "failed"
    assert "waits for a retry command" in incident["history"][-1]["detail"]
    # A late event for the failed copy changes nothing.
    apply_traced(incident, failed("alice@example.com", ORIGINAL), NOW, ATTEMPTS)
    assert entry["trace_attempts"] == ATTEMPTS


def test_missing_mailbox_error_is_final() -> None:
    incident = incident_with_alert()
    incident["pulls"][0].update(status="not_found", mailbox_missing=True)
    progress = {**traced("alice@example.com", ORIGINAL), "error": "no such mailbox"}
    assert apply_traced(incident, progress, NOW, ATTEMPTS)

    assert incident["pulls"][0]["traced"] is True
    assert incident["pulls"][0]["trace_attempts"] == 0
    assert trace_state(incident) == "finished"


def test_restart_failed_traces() -> None:
    incident = incident_with_alert()
    incident["pulls"][0]["status"] = "quarantined"
    assert trace_retry_targets(incident, None) == []
    for _ in range(ATTEMPTS):
        apply_traced(incident, failed("alice@example.com", ORIGINAL), NOW, ATTEMPTS)
    assert trace_retry_targets(incident, "bob@example.com") == []
    assert len(trace_retry_targets(incident, "alice@example.com")) == 1

    restarted = restart_failed_traces(incident, None)
    entry = incident["pulls"][0]
    assert restarted == [entry]
    assert entry["trace_failed"] is False
    assert entry["trace_attempts"] == 0
    assert entry["trace_round"] == 1
    assert trace_state(incident) == "running"
    assert len(untraced_copies(incident)) == 1
