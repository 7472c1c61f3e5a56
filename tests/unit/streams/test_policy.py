from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from autopull.streams.policy import (
    Decision,
    PolicySettings,
    RuleContext,
    Verdict,
    decide,
    default_rules,
    message_search,
    search_key,
)

SETTINGS = PolicySettings(quarantine_mailbox="quarantine@example.com")
MESSAGE_ID = "20261201093000.1234.invoice@billing-example.net"


def alert(**changes: Any) -> dict[str, Any]:
    """The parts of a NormalizedAlert the policy reads."""
    values: dict[str, Any] = {
        "alert_id": "tap:6f1c2a9e-3b7d-4e58-9a10-c4d2e8f7b315",
        "source": "tap",
        "event_class": "message_delivered",
        "message_id": MESSAGE_ID,
        "message_id_synthetic": False,
        "classification": "phish",
        "threat_status": "active",
        "recipients": ["alice@example.com"],
    }
    values.update(changes)
    return values


def decide_one(
    mailbox: str = "alice@example.com",
    settings: PolicySettings = SETTINGS,
    **changes: Any,
) -> Decision:
    decisions = decide(alert(**changes), [mailbox], settings)
    assert len(decisions) == 1
    return decisions[0]


def test_decide_delivered_phish_pulls() -> None:
    decision = decide_one()

    assert decision.action == "pull"
    assert decision.rule == "default.pull-malicious"
    assert decision.reason == (
        "The message was delivered and classified phish, so this copy is pulled."
    )


@pytest.mark.parametrize("classification", ["phish", "malware", "impostor"])
def test_decide_delivered_malicious_pulls(classification: str) -> None:
    assert decide_one(classification=classification).action == "pull"


@pytest.mark.parametrize("classification", ["spam", "unknown"])
def test_decide_spam_or_unknown_skips(classification: str) -> None:
    decision = decide_one(classification=classification)

    assert decision.action == "skip"
    assert decision.rule == "default.skip-not-malicious"
    assert classification in decision.reason


def test_decide_decision_carries_alert_identity() -> None:
    decision = decide_one()

    assert decision.mailbox == "alice@example.com"
    assert decision.message_id == MESSAGE_ID
    assert decision.source == "tap"
    assert decision.alert_id == "tap:6f1c2a9e-3b7d-4e58-9a10-c4d2e8f7b315"
    assert decision.classification == "phish"
    assert decision.event_class == "message_delivered"


def test_decide_as_dict_keys_in_order() -> None:
    assert list(decide_one().as_dict()) == [
        "mailbox",
        "message_id",
        "action",
        "reason",
        "rule",
        "source",
        "alert_id",
        "classification",
        "event_class",
    ]


def test_decide_quarantine_mailbox_skips() -> None:
    decision = decide_one(mailbox="Quarantine@Example.com")

    assert decision.action == "skip"
    assert decision.rule == "exclude.quarantine-mailbox"
    assert decision.mailbox == "quarantine@example.com"


def test_decide_quarantine_setting_normalized() -> None:
    settings = PolicySettings(quarantine_mailbox=" Quarantine@Example.com ")

    decision = decide_one(mailbox="quarantine@example.com", settings=settings)

    assert decision.rule == "exclude.quarantine-mailbox"


def test_decide_no_quarantine_mailbox_configured_pulls() -> None:
    decision = decide_one(mailbox="quarantine@example.com", settings=PolicySettings())

    assert decision.action == "pull"


def test_decide_excluded_mailbox_skips() -> None:
    settings = PolicySettings(excluded_mailboxes=frozenset({"CEO@example.com"}))

    decision = decide_one(mailbox="ceo@example.com", settings=settings)

    assert decision.action == "skip"
    assert decision.rule == "exclude.excluded-mailbox"


def test_decide_exclusion_wins_over_pull_of_click() -> None:
    decision = decide_one(
        mailbox="quarantine@example.com", event_class="click_permitted"
    )

    assert decision.rule == "exclude.quarantine-mailbox"


def test_decide_blocked_message_skips() -> None:
    decision = decide_one(event_class="message_blocked", classification="malware")

    assert decision.action == "skip"
    assert decision.rule == "default.skip-blocked"


def test_decide_blocked_click_skips() -> None:
    decision = decide_one(event_class="click_blocked")

    assert decision.action == "skip"
    assert decision.rule == "default.skip-blocked-click"


@pytest.mark.parametrize(
    ("status", "rule"),
    [
        ("cleared", "default.skip-cleared"),
        ("false_positive", "default.skip-false-positive"),
    ],
)
def test_decide_cleared_verdict_skips(status: str, rule: str) -> None:
    decision = decide_one(threat_status=status)

    assert decision.action == "skip"
    assert decision.rule == rule
    assert "restores" in decision.reason


def test_decide_cleared_click_skips() -> None:
    decision = decide_one(event_class="click_permitted", threat_status="cleared")

    assert decision.rule == "default.skip-cleared"


def test_decide_no_message_id_nothing_to_search_holds() -> None:
    decision = decide_one(message_id="")

    assert decision.action == "hold"
    assert decision.rule == "default.hold-no-message-id"
    assert decision.message_id == ""
    assert decision.reason == (
        "The alert has no Message-ID and lacks the sender, subject or delivery time "
        "to search the copy by, so the message waits for approval."
    )


def test_decide_synthetic_message_id_nothing_to_search_holds() -> None:
    decision = decide_one(
        message_id="queue-id-7Q2@no-message-id", message_id_synthetic=True
    )

    assert decision.action == "hold"
    assert decision.rule == "default.hold-synthetic-message-id"
    assert decision.message_id == "queue-id-7Q2@no-message-id"


SEARCHABLE = {
    "sender": "billing@example.net",
    "header_from": '"Billing" <Accounts@Example.net>',
    "subject": "Invoice 4471",
    "delivered_at": datetime(2026, 12, 1, 9, 30, tzinfo=UTC),
}


def test_decide_no_message_id_searchable_pulls() -> None:
    decision = decide_one(message_id="", **SEARCHABLE)

    assert decision.action == "pull"
    assert decision.rule == "default.pull-malicious"
    assert decision.message_id.startswith("search-")
    assert decision.message_id.endswith("@no-message-id")
    assert decision.reason.endswith(
        "it is pulled only when exactly one message matches."
    )


def test_decide_synthetic_searchable_keeps_id() -> None:
    decision = decide_one(
        message_id="queue-id-7Q2@no-message-id",
        message_id_synthetic=True,
        **SEARCHABLE,
    )

    assert decision.action == "pull"
    assert decision.message_id == "queue-id-7Q2@no-message-id"
    assert "searched by sender, exact subject and delivery time" in decision.reason


def test_decide_message_id_no_search_sentence() -> None:
    decision = decide_one(**SEARCHABLE)

    assert decision.message_id == MESSAGE_ID
    assert "searched" not in decision.reason


@pytest.mark.parametrize(
    "missing",
    [
        {"subject": "  "},
        {"delivered_at": None},
        {"sender": "", "header_from": "Billing"},
    ],
)
def test_decide_searchable_missing_fact_holds(missing: dict[str, Any]) -> None:
    decision = decide_one(message_id="", **(SEARCHABLE | missing))

    assert decision.action == "hold"
    assert decision.rule == "default.hold-no-message-id"
    assert decision.message_id == ""


def test_decide_searchable_occurred_at_used() -> None:
    moment = SEARCHABLE["delivered_at"]
    facts = SEARCHABLE | {"delivered_at": None, "occurred_at": moment}

    assert decide_one(message_id="", **facts).action == "pull"


def test_decide_searchable_large_campaign_holds() -> None:
    settings = PolicySettings(hold_above_mailboxes=1)
    decisions = decide(
        alert(message_id="", **SEARCHABLE),
        ["alice@example.com", "bob@example.com"],
        settings,
    )

    assert [d.action for d in decisions] == ["hold", "hold"]
    assert {d.rule for d in decisions} == {"default.hold-large-campaign"}


def test_message_search_window_and_senders() -> None:
    search = message_search(alert(message_id="", **SEARCHABLE), SETTINGS)

    assert search is not None
    assert search["senders"] == ["billing@example.net", "accounts@example.net"]
    assert search["subject"] == "Invoice 4471"
    assert search["received_after"] == datetime(2026, 12, 1, 9, 20, tzinfo=UTC)
    assert search["received_before"] == datetime(2026, 12, 1, 9, 40, tzinfo=UTC)


def test_message_search_with_message_id_none() -> None:
    assert message_search(alert(**SEARCHABLE), SETTINGS) is None


def test_search_key_same_on_replay() -> None:
    first = message_search(alert(message_id="", **SEARCHABLE), SETTINGS)
    again = message_search(alert(message_id="", **SEARCHABLE), SETTINGS)
    other = message_search(
        alert(message_id="", **(SEARCHABLE | {"subject": "Invoice 4472"})), SETTINGS
    )
    assert first is not None
    assert again is not None
    assert other is not None

    assert search_key(first) == search_key(again)
    assert search_key(first) != search_key(other)


def test_policy_settings_search_window_positive() -> None:
    with pytest.raises(ValueError, match="search_window_seconds is 0"):
        PolicySettings(search_window_seconds=0)


def test_decide_spam_without_message_id_skips() -> None:
    decision = decide_one(message_id="", classification="spam")

    assert decision.action == "skip"
    assert decision.rule == "default.skip-not-malicious"


def test_decide_unknown_status_holds() -> None:
    decision = decide_one(threat_status="unknown")

    assert decision.action == "hold"
    assert decision.rule == "default.hold-unknown-status"


def test_decide_permitted_click_pulls_clicker() -> None:
    decision = decide_one(mailbox="bob@example.com", event_class="click_permitted")

    assert decision.action == "pull"
    assert decision.rule == "default.pull-clicked"
    assert "bob@example.com" in decision.reason


def test_decide_permitted_spam_click_skips() -> None:
    decision = decide_one(event_class="click_permitted", classification="spam")

    assert decision.action == "skip"


def test_decide_large_campaign_holds_every_mailbox() -> None:
    mailboxes = [f"user{index}@example.com" for index in range(51)]

    decisions = decide(alert(), mailboxes, SETTINGS)

    assert len(decisions) == 51
    assert {decision.action for decision in decisions} == {"hold"}
    assert {decision.rule for decision in decisions} == {"default.hold-large-campaign"}
    assert "51 mailboxes" in decisions[0].reason
    assert "50" in decisions[0].reason


def test_decide_campaign_at_limit_pulls() -> None:
    mailboxes = [f"user{index}@example.com" for index in range(50)]

    decisions = decide(alert(), mailboxes, SETTINGS)

    assert {decision.action for decision in decisions} == {"pull"}


def test_decide_hold_limit_setting_applies() -> None:
    settings = PolicySettings(hold_above_mailboxes=2)

    decisions = decide(
        alert(), ["a@example.com", "b@example.com", "c@example.com"], settings
    )

    assert {decision.action for decision in decisions} == {"hold"}


def test_decide_large_campaign_still_skips_quarantine_mailbox() -> None:
    mailboxes = [f"user{index}@example.com" for index in range(60)]

    decisions = decide(alert(), [*mailboxes, "quarantine@example.com"], SETTINGS)

    assert decisions[-1].rule == "exclude.quarantine-mailbox"


def test_decide_mailboxes_lowered_and_deduplicated_in_order() -> None:
    decisions = decide(
        alert(),
        ["Bob@example.com", "alice@example.com", "bob@EXAMPLE.com"],
        SETTINGS,
    )

    assert [decision.mailbox for decision in decisions] == [
        "bob@example.com",
        "alice@example.com",
    ]


def test_decide_no_mailboxes_no_decisions() -> None:
    assert decide(alert(), [], SETTINGS) == []


def test_decide_custom_rules_replace_defaults() -> None:
    def hold_everything(context: RuleContext) -> Verdict:
        return Verdict("hold", "test.hold-everything", "Every message is held.")

    decisions = decide(alert(), ["alice@example.com"], SETTINGS, (hold_everything,))

    assert decisions[0].rule == "test.hold-everything"


def test_decide_no_rule_matches_skips() -> None:
    decisions = decide(alert(), ["alice@example.com"], SETTINGS, ())

    assert decisions[0].action == "skip"
    assert decisions[0].rule == "default.no-rule-matched"


def test_default_rules_reasons_are_sentences() -> None:
    settings = PolicySettings(
        quarantine_mailbox="quarantine@example.com",
        excluded_mailboxes=frozenset({"ceo@example.com"}),
    )
    contexts = [
        RuleContext(alert(), "quarantine@example.com", 1, settings),
        RuleContext(alert(), "ceo@example.com", 1, settings),
    ]
    contexts += [
        RuleContext(alert(**changes), "alice@example.com", 60, settings)
        for changes in (
            {},
            {"event_class": "message_blocked"},
            {"event_class": "click_blocked"},
            {"event_class": "click_permitted"},
            {"threat_status": "cleared"},
            {"threat_status": "false_positive"},
            {"threat_status": "unknown"},
            {"classification": "spam"},
            {"message_id": ""},
            {"message_id_synthetic": True},
        )
    ]

    for context in contexts:
        for rule in default_rules():
            verdict = rule(context)
            if verdict is not None:
                assert verdict.reason[0].isupper(), verdict.reason
                assert verdict.reason.endswith("."), verdict.reason


def test_policy_settings_negative_limit_raises() -> None:
    with pytest.raises(ValueError):
        PolicySettings(hold_above_mailboxes=-1)
