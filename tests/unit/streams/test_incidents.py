from dataclasses import dataclass
from datetime import UTC, datetime

import pytest

from autopull.streams.incidents import (
    apply_alert,
    apply_command,
    apply_outcome,
    incident_id_for,
    new_incident,
    restores_due,
)

RECEIVED = datetime(2026, 12, 1, 9, 30, tzinfo=UTC)


@dataclass
class Decision:
    mailbox: str
    message_id: str
    action: str
    reason: str = "because"
    rule: str = "test.rule"
    notify: bool = False


def enriched(alert_id="tap:1", recipients=("alice@example.com", "bob@example.com")):
    alert = {
        "alert_id": alert_id,
        "source": "tap",
        "message_id": "m1@example.net",
        "recipients": list(recipients),
        "sender": "billing@example.net",
        "sender_ip": "192.0.2.7",
        "subject": "Invoice",
        "classification": "phish",
        "threat_status": "active",
        "received_at": RECEIVED,
    }
    return {
        "alert": alert,
        "campaign_key": "campaign:c1",
        "recipients": [{"mailbox": r} for r in recipients],
    }


def pull_all(alert, recipients):
    return [Decision(r["mailbox"], alert["message_id"], "pull") for r in recipients]


def outcome(mailbox, status, kind="quarantine"):
    return {
        "mailbox": mailbox,
        "message_id": "m1@example.net",
        "kind": kind,
        "status": status,
        "platform": "graph",
        "attempts": 1,
        "error": None,
        "original_folder": "Inbox",
        "read": False,
        "started_at": RECEIVED,
        "finished_at": RECEIVED,
        "seconds_from_alert": 1.5,
    }


def test_incident_id_is_deterministic():
    first = incident_id_for("campaign:c1", RECEIVED)
    second = incident_id_for("campaign:c1", RECEIVED)
    other = incident_id_for("campaign:c2", RECEIVED)
    assert first == second
    assert first != other
    assert first.startswith("INC-")


def test_alert_issues_one_command_per_mailbox():
    incident = new_incident("INC-1", "campaign:c1", RECEIVED)
    commands = apply_alert(incident, enriched(), pull_all)
    assert [c["mailbox"] for c in commands] == ["alice@example.com", "bob@example.com"]
    assert all(c["kind"] == "quarantine" for c in commands)
    assert incident["state"] == "quarantining"
    assert incident["targets"] == ["alice@example.com", "bob@example.com"]
    assert incident["attackers"] == ["billing@example.net", "192.0.2.7"]


def test_replayed_alert_issues_nothing():
    incident = new_incident("INC-1", "campaign:c1", RECEIVED)
    apply_alert(incident, enriched(), pull_all)
    assert apply_alert(incident, enriched(), pull_all) == []
    assert len(incident["pulls"]) == 2


def test_second_alert_same_copy_issues_nothing():
    incident = new_incident("INC-1", "campaign:c1", RECEIVED)
    apply_alert(incident, enriched(), pull_all)
    commands = apply_alert(incident, enriched("tap:2", ["bob@example.com"]), pull_all)
    assert commands == []
    assert incident["alert_ids"] == ["tap:1", "tap:2"]


def test_command_ids_are_stable():
    first = apply_alert(new_incident("INC-1", "k", RECEIVED), enriched(), pull_all)
    second = apply_alert(new_incident("INC-1", "k", RECEIVED), enriched(), pull_all)
    assert [c["command_id"] for c in first] == [c["command_id"] for c in second]


def test_held_and_skipped_copies_issue_no_command():
    def hold_alice(alert, recipients):
        return [
            Decision("alice@example.com", alert["message_id"], "hold"),
            Decision("bob@example.com", alert["message_id"], "skip"),
        ]

    incident = new_incident("INC-1", "campaign:c1", RECEIVED)
    assert apply_alert(incident, enriched(), hold_alice) == []
    assert [p["status"] for p in incident["pulls"]] == ["held", "skipped"]
    assert incident["state"] == "open"


def test_outcomes_contain_incident():
    incident = new_incident("INC-1", "campaign:c1", RECEIVED)
    apply_alert(incident, enriched(), pull_all)
    assert apply_outcome(incident, outcome("alice@example.com", "quarantined"))
    assert incident["state"] == "quarantining"
    assert apply_outcome(incident, outcome("bob@example.com", "already_quarantined"))
    assert incident["state"] == "contained"
    alice = incident["pulls"][0]
    assert alice["original_folder"] == "Inbox"
    assert alice["read"] is False
    assert alice["seconds_from_alert"] == 1.5


def test_replayed_outcome_changes_nothing():
    incident = new_incident("INC-1", "campaign:c1", RECEIVED)
    apply_alert(incident, enriched(), pull_all)
    apply_outcome(incident, outcome("alice@example.com", "quarantined"))
    before = [dict(entry) for entry in incident["history"]]

    # A worker that restarts reads the outcome again from an uncommitted offset.
    assert apply_outcome(incident, outcome("alice@example.com", "quarantined"))

    assert incident["history"] == before
    assert incident["pulls"][0]["status"] == "quarantined"


def test_rerun_pull_keeps_first_outcome():
    incident = new_incident("INC-1", "campaign:c1", RECEIVED)
    apply_alert(incident, enriched(), pull_all)
    apply_outcome(incident, outcome("alice@example.com", "quarantined"))
    history = len(incident["history"])
    rerun = outcome("alice@example.com", "already_quarantined")
    rerun["finished_at"] = datetime(2026, 12, 1, 9, 31, tzinfo=UTC)

    # The command ran again after a crash and found its own work done.
    assert apply_outcome(incident, rerun)

    alice = incident["pulls"][0]
    assert alice["status"] == "quarantined"
    assert alice["finished_at"] == RECEIVED
    assert len(incident["history"]) == history


def test_failed_outcome_leaves_incident_open():
    incident = new_incident("INC-1", "campaign:c1", RECEIVED)
    apply_alert(incident, enriched(), pull_all)
    apply_outcome(incident, outcome("alice@example.com", "quarantined"))
    apply_outcome(incident, outcome("bob@example.com", "failed"))
    assert incident["state"] == "open"


def test_throttled_outcome_keeps_quarantining():
    incident = new_incident("INC-1", "campaign:c1", RECEIVED)
    apply_alert(incident, enriched(), pull_all)
    apply_outcome(incident, outcome("alice@example.com", "throttled"))
    assert incident["state"] == "quarantining"


def test_outcome_for_unplanned_copy_is_rejected():
    incident = new_incident("INC-1", "campaign:c1", RECEIVED)
    apply_alert(incident, enriched(), pull_all)
    assert not apply_outcome(incident, outcome("mallory@example.com", "quarantined"))


def test_later_pull_upgrades_skipped_copy():
    def skip_all(alert, recipients):
        return [Decision(r["mailbox"], alert["message_id"], "skip") for r in recipients]

    incident = new_incident("INC-1", "campaign:c1", RECEIVED)
    apply_alert(incident, enriched("tap:click", ["alice@example.com"]), skip_all)
    commands = apply_alert(incident, enriched("tap:2", ["alice@example.com"]), pull_all)
    assert [c["mailbox"] for c in commands] == ["alice@example.com"]
    assert incident["pulls"][0]["action"] == "pull"
    assert incident["pulls"][0]["status"] is None
    assert incident["pulls"][0]["alert_id"] == "tap:2"


def test_later_pull_leaves_held_copy_waiting():
    def hold_all(alert, recipients):
        return [Decision(r["mailbox"], alert["message_id"], "hold") for r in recipients]

    incident = new_incident("INC-1", "campaign:c1", RECEIVED)
    apply_alert(incident, enriched("tap:1", ["alice@example.com"]), hold_all)
    commands = apply_alert(incident, enriched("tap:2", ["alice@example.com"]), pull_all)
    assert commands == []
    assert incident["pulls"][0]["status"] == "held"


def contained_incident():
    incident = new_incident("INC-1", "campaign:c1", RECEIVED)
    apply_alert(incident, enriched(), pull_all)
    apply_outcome(incident, outcome("alice@example.com", "quarantined"))
    apply_outcome(incident, outcome("bob@example.com", "quarantined"))
    return incident


def cleared(alert_id="tap:cleared"):
    change = enriched(alert_id)
    change["alert"]["threat_status"] = "cleared"
    return change


def test_cleared_verdict_restores_quarantined_copies():
    incident = contained_incident()
    commands = apply_alert(incident, cleared(), pull_all)
    assert [c["kind"] for c in commands] == ["restore", "restore"]
    assert [c["mailbox"] for c in commands] == ["alice@example.com", "bob@example.com"]


def test_cleared_verdict_drops_held_copies():
    def hold_all(alert, recipients):
        return [Decision(r["mailbox"], alert["message_id"], "hold") for r in recipients]

    incident = new_incident("INC-1", "campaign:c1", RECEIVED)
    apply_alert(incident, enriched(), hold_all)
    assert apply_alert(incident, cleared(), pull_all) == []
    assert {p["status"] for p in incident["pulls"]} == {"skipped"}


def test_cleared_during_quarantine_restores_after(monkeypatch):
    # Commands carry the time they were issued; a fixed clock makes two equal.
    monkeypatch.setattr("autopull.streams.incidents.utcnow", lambda: RECEIVED)
    incident = new_incident("INC-1", "campaign:c1", RECEIVED)
    apply_alert(incident, enriched(), pull_all)
    apply_outcome(incident, outcome("alice@example.com", "quarantined"))

    commands = apply_alert(incident, cleared(), pull_all)
    assert [(c["kind"], c["mailbox"]) for c in commands] == [
        ("restore", "alice@example.com")
    ]
    assert [p["withdrawn"] for p in incident["pulls"]] == [False, True]

    late = outcome("bob@example.com", "quarantined")
    assert apply_outcome(incident, late)
    restores = restores_due(incident, late)
    assert [(c["kind"], c["mailbox"]) for c in restores] == [
        ("restore", "bob@example.com")
    ]
    # A replay of the outcome issues the same restore again until it succeeded.
    assert restores_due(incident, late) == restores
    apply_outcome(incident, outcome("bob@example.com", "restored", kind="restore"))
    assert restores_due(incident, late) == []


def test_withdrawal_before_pull_alert_pulls_nothing():
    incident = new_incident("INC-1", "campaign:c1", RECEIVED)

    assert apply_alert(incident, cleared(), pull_all) == []
    commands = apply_alert(incident, enriched("tap:late-active"), pull_all)

    assert commands == []
    assert [p["action"] for p in incident["pulls"]] == ["skip", "skip"]
    assert {p["rule"] for p in incident["pulls"]} == {"verdict-withdrawn"}
    assert incident["pulls"][0]["reason"].startswith("The verdict changed to cleared")


def test_restores_due_ignores_unwithdrawn_copies():
    incident = new_incident("INC-1", "campaign:c1", RECEIVED)
    apply_alert(incident, enriched(), pull_all)
    done = outcome("alice@example.com", "quarantined")
    apply_outcome(incident, done)

    assert restores_due(incident, done) == []


def test_withdrawn_copy_not_found_needs_no_restore():
    incident = new_incident("INC-1", "campaign:c1", RECEIVED)
    apply_alert(incident, enriched(), pull_all)
    apply_alert(incident, cleared(), pull_all)
    missing = outcome("alice@example.com", "not_found")
    apply_outcome(incident, missing)

    assert restores_due(incident, missing) == []


def test_restore_outcomes_mark_incident_restored():
    incident = contained_incident()
    apply_alert(incident, cleared(), pull_all)
    apply_outcome(incident, outcome("alice@example.com", "restored", kind="restore"))
    assert incident["state"] == "contained"
    apply_outcome(incident, outcome("bob@example.com", "restored", kind="restore"))
    assert incident["state"] == "restored"
    assert all(p["undone"] for p in incident["pulls"])


def test_failed_restore_keeps_copy_quarantined():
    incident = contained_incident()
    apply_outcome(incident, outcome("alice@example.com", "failed", kind="restore"))
    assert incident["pulls"][0]["status"] == "quarantined"
    assert incident["pulls"][0]["undone"] is False


def command(action, mailbox=None, actor="analyst@example.com"):
    return {"action": action, "actor": actor, "mailbox": mailbox, "text": None}


def held_incident():
    def hold_all(alert, recipients):
        return [Decision(r["mailbox"], alert["message_id"], "hold") for r in recipients]

    incident = new_incident("INC-1", "campaign:c1", RECEIVED)
    apply_alert(incident, enriched(), hold_all)
    return incident


def test_approve_issues_held_pulls():
    incident = held_incident()
    commands = apply_command(incident, command("approve"))
    assert [c["mailbox"] for c in commands] == ["alice@example.com", "bob@example.com"]
    assert all(c["kind"] == "quarantine" for c in commands)
    assert incident["state"] == "quarantining"
    assert incident["history"][-1]["actor"] == "analyst@example.com"


def test_approve_one_mailbox_only():
    incident = held_incident()
    commands = apply_command(incident, command("approve", "BOB@example.com"))
    assert [c["mailbox"] for c in commands] == ["bob@example.com"]
    assert incident["pulls"][0]["status"] == "held"


def test_reject_skips_held_pulls():
    incident = held_incident()
    assert apply_command(incident, command("reject")) == []
    assert {p["status"] for p in incident["pulls"]} == {"skipped"}


def test_release_restores_quarantined_copies_once():
    incident = contained_incident()
    commands = apply_command(incident, command("release", "alice@example.com"))
    assert [(c["kind"], c["mailbox"]) for c in commands] == [
        ("restore", "alice@example.com")
    ]
    apply_outcome(incident, outcome("alice@example.com", "restored", kind="restore"))
    assert apply_command(incident, command("release", "alice@example.com")) == []


def test_close_and_comment():
    incident = contained_incident()
    apply_command(incident, {**command("comment"), "text": "looked at it"})
    apply_command(incident, command("close"))
    assert incident["state"] == "closed"
    assert incident["history"][-2]["detail"] == "looked at it"


def test_unknown_command_raises():
    incident = contained_incident()
    with pytest.raises(ValueError, match="explode"):
        apply_command(incident, command("explode"))


def test_release_with_blank_mailbox_restores_nothing():
    for blank in ("", "   "):
        incident = contained_incident()
        assert apply_command(incident, command("release", blank)) == []
        assert incident["state"] == "contained"
        assert not any(p["undone"] for p in incident["pulls"])


def test_release_without_mailbox_restores_every_copy():
    incident = contained_incident()
    commands = apply_command(incident, command("release", None))
    assert [c["mailbox"] for c in commands] == ["alice@example.com", "bob@example.com"]


def failed_incident():
    incident = new_incident("INC-1", "campaign:c1", RECEIVED)
    apply_alert(incident, enriched(), pull_all)
    apply_outcome(incident, outcome("alice@example.com", "quarantined"))
    failed = outcome("bob@example.com", "failed")
    failed["error"] = "The mailbox refused access."
    apply_outcome(incident, failed)
    return incident


def test_retry_pulls_failed_copies_only():
    incident = failed_incident()
    commands = apply_command(incident, command("retry"))
    assert [(c["kind"], c["mailbox"]) for c in commands] == [
        ("quarantine", "bob@example.com")
    ]
    bob = incident["pulls"][1]
    assert bob["status"] is None
    assert bob["error"] is None
    assert bob["rule"] == "retried"
    assert bob["reason"] == "Retried by analyst@example.com."
    assert incident["state"] == "quarantining"


def test_retry_then_success_contains_incident():
    incident = failed_incident()
    apply_command(incident, command("retry"))
    later = outcome("bob@example.com", "quarantined")
    later["finished_at"] = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
    apply_outcome(incident, later)
    assert incident["pulls"][1]["status"] == "quarantined"
    assert incident["state"] == "contained"


def test_missing_mailbox_outcome_marks_copy():
    incident = new_incident("INC-1", "campaign:c1", RECEIVED)
    apply_alert(incident, enriched(), pull_all)
    missing = outcome("bob@example.com", "failed")
    missing["error"] = "Graph found no user for mailbox bob@example.com."
    missing["mailbox_missing"] = True

    apply_outcome(incident, outcome("alice@example.com", "quarantined"))
    apply_outcome(incident, missing)

    alice, bob = incident["pulls"]
    assert alice["mailbox_missing"] is False
    assert bob["mailbox_missing"] is True
    assert bob["status"] == "failed"


def test_retry_clears_missing_mailbox_mark():
    incident = new_incident("INC-1", "campaign:c1", RECEIVED)
    apply_alert(incident, enriched(), pull_all)
    missing = outcome("bob@example.com", "failed")
    missing["mailbox_missing"] = True
    apply_outcome(incident, missing)

    apply_command(incident, command("retry", "bob@example.com"))

    assert incident["pulls"][1]["mailbox_missing"] is False


def test_retry_other_mailbox_issues_nothing():
    incident = failed_incident()
    assert apply_command(incident, command("retry", "alice@example.com")) == []
    assert incident["pulls"][1]["status"] == "failed"


def test_retry_without_failures_issues_nothing():
    incident = contained_incident()
    assert apply_command(incident, command("retry")) == []
    assert incident["state"] == "contained"


def searched_incident():
    """An incident whose copy for alice was held by a search with two candidates."""
    incident = held_incident()
    entry = incident["pulls"][0]
    entry.update(rule="search.not-unique", message_id="search-1@no-message-id")
    entry["candidates"] = [
        {"message_id": "first@example.net", "folder": "Inbox"},
        {"message_id": "second@example.net", "folder": "Archive"},
        {"message_id": "", "folder": "Drafts"},
    ]
    return incident


def pick(message_id, mailbox=None):
    return {**command("approve", mailbox), "message_id": message_id}


def test_approve_candidate_pulls_that_message():
    incident = searched_incident()
    commands = apply_command(incident, pick("second@example.net"))
    assert len(commands) == 1
    assert commands[0]["mailbox"] == "alice@example.com"
    assert commands[0]["message_id"] == "search-1@no-message-id"
    assert commands[0]["resolved_message_id"] == "second@example.net"
    alice = incident["pulls"][0]
    assert alice["resolved_message_id"] == "second@example.net"
    assert alice["reason"] == "Approved by analyst@example.com for second@example.net."
    assert incident["pulls"][1]["status"] == "held"


def test_approve_unknown_candidate_changes_nothing():
    incident = searched_incident()
    assert apply_command(incident, pick("other@example.net")) == []
    assert [p["status"] for p in incident["pulls"]] == ["held", "held"]


def test_approve_by_message_id_picks_held_copies():
    incident = searched_incident()
    commands = apply_command(incident, pick("m1@example.net"))
    assert [c["mailbox"] for c in commands] == ["bob@example.com"]
    assert commands[0]["resolved_message_id"] is None


def test_approve_candidate_limited_to_mailbox():
    incident = searched_incident()
    assert apply_command(incident, pick("first@example.net", "bob@example.com")) == []
    assert incident["pulls"][0]["status"] == "held"


def test_approve_skips_copy_without_message_id():
    incident = held_incident()
    incident["pulls"][0]["message_id"] = ""
    commands = apply_command(incident, command("approve"))
    assert [c["mailbox"] for c in commands] == ["bob@example.com"]
    assert incident["pulls"][0]["status"] == "held"


class Comparisons:
    """Mailboxes that count the equality tests they take part in.

    A scan of a list per mailbox makes these grow with the square of the number
    of mailboxes.
    """

    def __init__(self) -> None:
        self.count = 0
        comparisons = self

        class Mailbox(str):
            __hash__ = str.__hash__

            def __eq__(self, other: object) -> bool:
                comparisons.count += 1
                return str.__eq__(self, other)

        self.mailbox = Mailbox

    def mailboxes(self, count: int) -> list[str]:
        """Return `count` new mailbox objects, equal to those of earlier calls."""
        return [self.mailbox(f"user{n:05d}@example.com") for n in range(count)]


def test_large_alert_compares_linearly():
    count = 3000
    comparisons = Comparisons()
    mailboxes = comparisons.mailboxes(count)
    incident = new_incident("INC-1", "campaign:c1", RECEIVED)

    first = apply_alert(incident, enriched("tap:1", mailboxes), pull_all)
    assert len(first) == count
    assert comparisons.count <= 2 * count

    # Another source reports the same copies: each is found, none is added. Each
    # mailbox is compared once in the pull look-up, the targets and the count.
    comparisons.count = 0
    again = comparisons.mailboxes(count)
    assert apply_alert(incident, enriched("tap:2", again), pull_all) == []
    assert len(incident["pulls"]) == count
    assert incident["targets"] == mailboxes
    assert comparisons.count <= 3 * count


def test_large_withdrawal_compares_linearly():
    count = 3000
    comparisons = Comparisons()
    incident = new_incident("INC-1", "campaign:c1", RECEIVED)
    withdrawn = enriched("tap:cleared", comparisons.mailboxes(count))
    withdrawn["alert"]["threat_status"] = "cleared"

    assert apply_alert(incident, withdrawn, pull_all) == []
    assert len(incident["pulls"]) == count
    assert {entry["rule"] for entry in incident["pulls"]} == {"verdict-withdrawn"}
    assert comparisons.count <= 2 * count
