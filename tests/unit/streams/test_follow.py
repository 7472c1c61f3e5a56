from dataclasses import dataclass
from datetime import UTC, datetime

from autopull.streams.follow import followed_copies, settled_copies
from autopull.streams.incidents import (
    apply_alert,
    apply_command,
    apply_outcome,
    new_incident,
)

RECEIVED = datetime(2026, 12, 1, 9, 30, tzinfo=UTC)
MESSAGE_ID = "m1@example.net"


@dataclass
class Decision:
    mailbox: str
    message_id: str
    action: str
    reason: str = "because"
    rule: str = "test.rule"


def incident_with(actions: dict[str, str]):
    incident = new_incident("INC-1", "campaign:c1", RECEIVED)
    alert = {
        "alert_id": "tap:1",
        "source": "tap",
        "message_id": MESSAGE_ID,
        "recipients": list(actions),
        "sender": "billing@example.net",
        "sender_ip": "192.0.2.7",
        "subject": "Invoice",
        "classification": "phish",
        "threat_status": "active",
        "received_at": RECEIVED,
    }
    enriched = {
        "alert": alert,
        "campaign_key": "campaign:c1",
        "recipients": [{"mailbox": mailbox} for mailbox in actions],
    }

    def decide(alert, recipients):
        return [
            Decision(r["mailbox"], MESSAGE_ID, actions[r["mailbox"]])
            for r in recipients
        ]

    apply_alert(incident, enriched, decide)
    return incident


def outcome(mailbox, status, kind="quarantine", error=None):
    return {
        "mailbox": mailbox,
        "message_id": MESSAGE_ID,
        "kind": kind,
        "status": status,
        "platform": "graph",
        "attempts": 1,
        "error": error,
        "original_folder": "Inbox",
        "read": False,
        "started_at": RECEIVED,
        "finished_at": RECEIVED,
        "seconds_from_alert": 1.5,
    }


def command(action, mailbox=None):
    return {
        "action": action,
        "actor": "carol",
        "mailbox": mailbox,
        "message_id": None,
        "text": None,
    }


def test_approve_follows_held_copies_only():
    incident = incident_with({"a@example.com": "hold", "b@example.com": "pull"})
    copies = followed_copies(incident, "approve", None)
    assert [copy.mailbox for copy in copies] == ["a@example.com"]


def test_approve_settles_on_outcome():
    incident = incident_with({"a@example.com": "hold", "b@example.com": "hold"})
    copies = followed_copies(incident, "approve", None)
    apply_command(incident, command("approve"))
    assert settled_copies(incident, "approve", copies) == {}

    apply_outcome(incident, outcome("a@example.com", "quarantined"))
    apply_outcome(incident, outcome("b@example.com", "throttled"))
    settled = settled_copies(incident, "approve", copies)
    assert {copy.mailbox: status for copy, status in settled.items()} == {
        "a@example.com": "quarantined"
    }


def test_release_follows_pulled_copies_of_mailbox():
    incident = incident_with({"a@example.com": "pull", "b@example.com": "pull"})
    apply_outcome(incident, outcome("a@example.com", "quarantined"))
    apply_outcome(incident, outcome("b@example.com", "already_quarantined"))
    copies = followed_copies(incident, "release", "B@example.com")
    assert [copy.mailbox for copy in copies] == ["b@example.com"]


def test_release_skips_copies_already_undone():
    incident = incident_with({"a@example.com": "pull", "b@example.com": "pull"})
    apply_outcome(incident, outcome("a@example.com", "quarantined"))
    apply_outcome(incident, outcome("b@example.com", "quarantined"))
    apply_outcome(incident, outcome("a@example.com", "restored", kind="restore"))
    copies = followed_copies(incident, "release", None)
    assert [copy.mailbox for copy in copies] == ["b@example.com"]


def test_release_settles_restored_and_failed():
    incident = incident_with({"a@example.com": "pull", "b@example.com": "pull"})
    apply_outcome(incident, outcome("a@example.com", "quarantined"))
    apply_outcome(incident, outcome("b@example.com", "quarantined"))
    copies = followed_copies(incident, "release", None)
    apply_command(incident, command("release"))

    apply_outcome(incident, outcome("a@example.com", "restored", kind="restore"))
    apply_outcome(
        incident,
        outcome("b@example.com", "throttled", kind="restore", error="429 from Graph"),
    )
    settled = settled_copies(incident, "release", copies)
    assert {copy.mailbox: status for copy, status in settled.items()} == {
        "a@example.com": "restored"
    }

    apply_outcome(
        incident,
        outcome("b@example.com", "failed", kind="restore", error="403 from Graph"),
    )
    settled = settled_copies(incident, "release", copies)
    assert {copy.mailbox: status for copy, status in settled.items()} == {
        "a@example.com": "restored",
        "b@example.com": "failed",
    }


def test_release_ignores_outcomes_before_send():
    incident = incident_with({"a@example.com": "pull"})
    apply_outcome(incident, outcome("a@example.com", "quarantined"))
    apply_outcome(
        incident, outcome("a@example.com", "failed", kind="restore", error="timeout")
    )
    copies = followed_copies(incident, "release", None)
    assert settled_copies(incident, "release", copies) == {}


def test_other_actions_follow_nothing():
    incident = incident_with({"a@example.com": "hold"})
    assert followed_copies(incident, "reject", None) == []
    assert followed_copies(incident, "close", None) == []


def test_retry_follows_failed_copies_only():
    incident = incident_with({"a@example.com": "pull", "b@example.com": "pull"})
    apply_outcome(incident, outcome("a@example.com", "failed", error="refused"))
    apply_outcome(incident, outcome("b@example.com", "quarantined"))
    copies = followed_copies(incident, "retry", None)
    assert [copy.mailbox for copy in copies] == ["a@example.com"]


def test_retry_settles_only_on_new_outcome():
    incident = incident_with({"a@example.com": "pull"})
    apply_outcome(incident, outcome("a@example.com", "failed", error="refused"))
    copies = followed_copies(incident, "retry", None)
    # Before the agent applies the retry, the entry still shows the old failure.
    assert settled_copies(incident, "retry", copies) == {}

    apply_command(incident, command("retry"))
    assert settled_copies(incident, "retry", copies) == {}

    again = outcome("a@example.com", "failed", error="refused")
    again["finished_at"] = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
    apply_outcome(incident, again)
    settled = settled_copies(incident, "retry", copies)
    assert {copy.mailbox: status for copy, status in settled.items()} == {
        "a@example.com": "failed"
    }


def test_approve_with_message_id_follows_its_copies():
    incident = incident_with({"a@example.com": "hold", "b@example.com": "hold"})
    incident["pulls"][0]["candidates"] = [{"message_id": "pick@example.net"}]
    incident["pulls"][0]["message_id"] = "search-1@no-message-id"
    copies = followed_copies(incident, "approve", None, "pick@example.net")
    assert [copy.mailbox for copy in copies] == ["a@example.com"]


def test_release_tells_two_copies_of_mailbox_apart():
    incident = incident_with({"a@example.com": "pull"})
    second = dict(incident["pulls"][0], message_id="m2@example.net")
    incident["pulls"].append(second)
    apply_outcome(incident, outcome("a@example.com", "quarantined"))
    apply_outcome(
        incident,
        dict(outcome("a@example.com", "quarantined"), message_id="m2@example.net"),
    )
    copies = followed_copies(incident, "release", None)
    assert [copy.message_id for copy in copies] == [MESSAGE_ID, "m2@example.net"]
    apply_command(incident, command("release"))

    throttled = dict(
        outcome("a@example.com", "throttled", kind="restore", error="429 from Graph"),
        message_id="m2@example.net",
    )
    apply_outcome(incident, throttled)
    failed = outcome("a@example.com", "failed", kind="restore", error="403 from Graph")
    apply_outcome(incident, failed)
    # The second copy waits for its parked restore: the failure is the first's.
    settled = settled_copies(incident, "release", copies)
    assert {copy.message_id: status for copy, status in settled.items()} == {
        MESSAGE_ID: "failed"
    }
