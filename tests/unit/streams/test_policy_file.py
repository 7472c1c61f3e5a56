"""YAML policy files: actions, conditions, exclusions, errors with lines, and plan."""

from __future__ import annotations

import io
import json
from pathlib import Path
from textwrap import dedent
from typing import Any

import pytest

from autopull.streams.cli import main
from autopull.streams.incidents import apply_alert, new_incident
from autopull.streams.policy import (
    Decision,
    PolicySettings,
    RuleContext,
    Verdict,
    decide,
)
from autopull.streams.policy_file import PolicyError, default_policy, parse_policy
from autopull.streams.records import utcnow

EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "alerts"
QUARANTINE = "quarantine@example.com"
MESSAGE_ID = "20261201093000.1234.invoice@billing-example.net"


def alert(**changes: Any) -> dict[str, Any]:
    """The parts of a NormalizedAlert the policy reads."""
    values: dict[str, Any] = {
        "alert_id": "tap:6f1c2a9e",
        "source": "tap",
        "event_class": "message_delivered",
        "message_id": MESSAGE_ID,
        "message_id_synthetic": False,
        "classification": "phish",
        "threat_status": "active",
        "sender": "billing@billing-example.net",
        "recipients": ["alice@example.com"],
    }
    values.update(changes)
    return values


def policy(text: str, **settings: Any) -> PolicySettings:
    """Return policy settings with the rules of the policy in `text`."""
    rules = parse_policy(dedent(text), "policy.yaml").rules
    return PolicySettings(quarantine_mailbox=QUARANTINE, rules=rules, **settings)


def decide_one(
    settings: PolicySettings,
    recipient: str | dict[str, Any] = "alice@example.com",
    **changes: Any,
) -> Decision:
    decisions = decide(
        alert(**changes.pop("alert", {})), [recipient], settings, **changes
    )
    assert len(decisions) == 1
    return decisions[0]


def one_rule(when: str, action: str = "quarantine") -> PolicySettings:
    """A policy whose only rule has the conditions `when` (YAML, 6 spaces in)."""
    return policy(
        f"""
        version: 1
        rules:
          - name: test.rule
            when:
{when}
            action: {action}
            reason: The test rule matched for {{mailbox}}.
        """
    )


def errors_of(text: str) -> list[tuple[int | None, str]]:
    with pytest.raises(PolicyError) as caught:
        parse_policy(dedent(text), "policy.yaml")
    return caught.value.problems


# --- Actions ---------------------------------------------------------------------

ALL_MATCH = """
version: 1
rules:
  - name: test.every-message
    action: {action}
    reason: Every message of {{classification}} matches.
"""


@pytest.mark.parametrize(
    ("action", "decided", "notify"),
    [
        ("quarantine", "pull", False),
        ("hold", "hold", False),
        ("ignore", "skip", False),
        ("notify", "skip", True),
    ],
)
def test_action_maps_to_decision(action: str, decided: str, notify: bool) -> None:
    decision = decide_one(policy(ALL_MATCH.format(action=action)))

    assert decision.action == decided
    assert decision.notify is notify
    assert decision.rule == "test.every-message"
    assert decision.reason == "Every message of phish matches."


def test_notify_rule_records_notice() -> None:
    settings = policy(ALL_MATCH.format(action="notify"))
    incident = new_incident("INC-1", "campaign:c1", utcnow())
    enriched = {
        "alert": {**alert(), "received_at": utcnow()},
        "campaign_key": "campaign:c1",
        "intel_hits": [],
        "recipients": [{"mailbox": "alice@example.com"}],
    }

    commands = apply_alert(incident, enriched, lambda a, r: decide(a, r, settings))

    assert commands == []
    notices = [entry for entry in incident["history"] if entry["what"] == "notice"]
    assert len(notices) == 1
    assert notices[0]["detail"] == "alice@example.com: Every message of phish matches."
    assert incident["pulls"][0]["status"] == "skipped"


def test_first_matching_rule_decides() -> None:
    settings = policy(
        """
        version: 1
        rules:
          - name: test.hold-malware
            when: {classification: [malware]}
            action: hold
            reason: Malware waits.
          - name: test.pull-rest
            action: quarantine
            reason: The rest is pulled.
        """
    )

    assert decide_one(settings, alert={"classification": "malware"}).rule == (
        "test.hold-malware"
    )
    assert decide_one(settings).rule == "test.pull-rest"


def test_no_rule_matched_skips() -> None:
    decision = decide_one(one_rule("              source: [fireeye]"))

    assert decision.action == "skip"
    assert decision.rule == "default.no-rule-matched"


# --- Conditions ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("when", "matching", "other"),
    [
        ("source: [fireeye, generic]", {"source": "fireeye"}, {"source": "tap"}),
        ("classification: [malware]", {"classification": "malware"}, {}),
        ("classification: {not: [spam]}", {}, {"classification": "spam"}),
        ("threat_status: [unknown]", {"threat_status": "unknown"}, {}),
        ("event_class: [click_permitted]", {"event_class": "click_permitted"}, {}),
        ("message_id: missing", {"message_id": ""}, {}),
        ("message_id: synthetic", {"message_id_synthetic": True}, {}),
        ("message_id: present", {}, {"message_id": ""}),
        ("sender: ['*@billing-example.net']", {}, {"sender": "a@example.org"}),
        ("sender: [example.org]", {"sender": "a@mail.example.org"}, {}),
    ],
)
def test_alert_condition_matches(
    when: str, matching: dict[str, Any], other: dict[str, Any]
) -> None:
    settings = one_rule(f"              {when}")

    assert decide_one(settings, alert=matching).rule == "test.rule"
    assert decide_one(settings, alert=other).rule == "default.no-rule-matched"


def test_score_condition_bounds() -> None:
    settings = one_rule("              score: {at_least: 60, below: 90}")

    assert decide_one(settings, score=59).rule == "default.no-rule-matched"
    assert decide_one(settings, score=60).rule == "test.rule"
    assert decide_one(settings, score=89).rule == "test.rule"
    assert decide_one(settings, score=90).rule == "default.no-rule-matched"


def test_mailbox_count_condition_bounds() -> None:
    settings = one_rule("              mailboxes: {above: 3, at_most: 10}")

    assert decide_one(settings, mailbox_count=3).rule == "default.no-rule-matched"
    assert decide_one(settings, mailbox_count=4).rule == "test.rule"
    assert decide_one(settings, mailbox_count=10).rule == "test.rule"
    assert decide_one(settings, mailbox_count=11).rule == "default.no-rule-matched"


def test_mailbox_count_names_setting() -> None:
    rules = one_rule("              mailboxes: {above: hold_above_mailboxes}").rules
    settings = PolicySettings(hold_above_mailboxes=5, rules=rules)

    assert decide_one(settings, mailbox_count=5).rule == "default.no-rule-matched"
    assert decide_one(settings, mailbox_count=6).rule == "test.rule"


def recipient(**changes: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "address": "alice@example.com",
        "mailbox": "alice@example.com",
        "recipient_type": "original",
        "path": ["alice@example.com"],
        "vip": False,
        "attributes": {},
    }
    values.update(changes)
    return values


@pytest.mark.parametrize(
    ("when", "matching"),
    [
        ("recipient: {vip: true}", {"vip": True}),
        (
            "recipient: {attributes: {department: [Finance, Payroll]}}",
            {"attributes": {"department": "finance"}},
        ),
        (
            "recipient: {groups: [finance@example.com]}",
            {
                "recipient_type": "list_member",
                "path": ["finance@example.com", "alice@example.com"],
            },
        ),
        (
            "recipient: {groups: ['cn=executives,ou=groups,dc=example,dc=com']}",
            {
                "attributes": {
                    "groups": "cn=staff,ou=groups,dc=example,dc=com\n"
                    "CN=Executives,ou=groups,dc=example,dc=com"
                }
            },
        ),
        ("recipient: {recipient_type: [alias]}", {"recipient_type": "alias"}),
        ("recipient: {mailboxes: ['alice@*']}", {}),
    ],
)
def test_recipient_condition_matches(when: str, matching: dict[str, Any]) -> None:
    settings = one_rule(f"              {when}")
    other = recipient(mailbox="bob@example.com", address="bob@example.com")

    assert decide_one(settings, recipient=recipient(**matching)).rule == "test.rule"
    assert decide_one(settings, recipient=other).rule == "default.no-rule-matched"


def test_all_conditions_must_hold() -> None:
    settings = one_rule(
        "              classification: [phish]\n              recipient: {vip: true}"
    )

    assert decide_one(settings, recipient=recipient(vip=True)).rule == "test.rule"
    assert decide_one(settings, recipient=recipient()).rule == (
        "default.no-rule-matched"
    )


# --- Exclusions ------------------------------------------------------------------

EXCLUDING = """
version: 1
exclusions:
  mailboxes: [CEO@example.com]
  service_accounts: ["svc-*@example.com"]
rules:
  - name: test.pull-everything
    action: quarantine
    reason: Everything is pulled.
"""


def test_policy_excluded_mailbox_skips() -> None:
    decision = decide_one(policy(EXCLUDING), "ceo@example.com")

    assert decision.action == "skip"
    assert decision.rule == "exclude.policy-mailbox"


def test_service_account_skips() -> None:
    decision = decide_one(policy(EXCLUDING), "svc-backup@example.com")

    assert decision.action == "skip"
    assert decision.rule == "exclude.service-account"
    assert "svc-*@example.com" in decision.reason


def test_settings_excluded_mailbox_skips() -> None:
    settings = policy(EXCLUDING, excluded_mailboxes=frozenset({"dan@example.com"}))

    decision = decide_one(settings, "dan@example.com")

    assert decision.action == "skip"
    assert decision.rule == "exclude.excluded-mailbox"


def test_other_mailbox_still_pulled() -> None:
    decision = decide_one(policy(EXCLUDING), "alice@example.com")

    assert decision.action == "pull"
    assert decision.rule == "test.pull-everything"


def test_quarantine_mailbox_never_targeted() -> None:
    settings = policy(
        f"""
        version: 1
        rules:
          - name: test.pull-quarantine
            when:
              recipient: {{mailboxes: ["{QUARANTINE}"]}}
            action: quarantine
            reason: This rule targets the quarantine mailbox.
        """
    )

    for mailbox in (QUARANTINE, " Quarantine@Example.COM "):
        decision = decide_one(settings, mailbox)
        assert decision.action == "skip"
        assert decision.rule == "exclude.quarantine-mailbox"


def test_quarantine_mailbox_skipped_with_custom_rules() -> None:
    def pull_everything(context: RuleContext) -> Verdict:
        return Verdict("pull", "test.pull", "Pulled.")

    settings = PolicySettings(quarantine_mailbox=QUARANTINE)
    decisions = decide(alert(), [QUARANTINE], settings, (pull_everything,))

    assert decisions[0].rule == "exclude.quarantine-mailbox"


# --- Malformed policies ----------------------------------------------------------


def test_invalid_action_names_line() -> None:
    problems = errors_of(
        """
        version: 1
        rules:
          - name: test.ok
            action: quarantine
            reason: Fine.
          - name: test.bad
            action: delete
            reason: Not an action.
        """
    )

    assert len(problems) == 1
    line, reason = problems[0]
    assert line == 8
    assert reason.startswith("rules[1].action: Input should be 'quarantine'")


def test_unknown_condition_names_line() -> None:
    problems = errors_of(
        """
        version: 1
        rules:
          - name: test.bad
            when:
              clasification: [phish]
            action: hold
            reason: Misspelled.
        """
    )

    assert problems == [
        (6, "rules[0].when.clasification: Extra inputs are not permitted")
    ]


def test_invalid_classification_names_line() -> None:
    problems = errors_of(
        """
        version: 1
        rules:
          - name: test.bad
            when:
              classification:
                - phish
                - phising
            action: hold
            reason: Misspelled value.
        """
    )

    assert problems == [
        (
            8,
            "rules[0].when.classification[1]: Input should be 'phish', 'malware', "
            "'spam', 'impostor' or 'unknown'",
        )
    ]


def test_yaml_syntax_error_names_line() -> None:
    problems = errors_of(
        """
        version: 1
        rules:
          - name: test.bad
            action: [hold
            reason: Unclosed.
        """
    )

    assert len(problems) == 1
    line, reason = problems[0]
    assert line == 6
    assert reason.startswith("the YAML is invalid")


def test_duplicate_key_names_line() -> None:
    problems = errors_of(
        """
        version: 1
        rules:
          - name: test.bad
            action: hold
            action: quarantine
            reason: Twice.
        """
    )

    assert problems == [(6, "the key 'action' appears twice")]


def test_duplicate_rule_name_names_line() -> None:
    problems = errors_of(
        """
        version: 1
        rules:
          - name: test.same
            action: hold
            reason: First.
          - name: test.same
            action: quarantine
            reason: Second.
        """
    )

    assert problems == [(7, "rules[1].name: the rule name 'test.same' is used twice")]


def test_unknown_reason_field_names_line() -> None:
    problems = errors_of(
        """
        version: 1
        rules:
          - name: test.bad
            action: hold
            reason: Held for {recipient}.
        """
    )

    assert len(problems) == 1
    line, reason = problems[0]
    assert line == 6
    assert "{recipient}" in reason
    assert "mailbox" in reason


@pytest.mark.parametrize(
    "field", ["{mailbox:>99999999}", "{mailbox!r}", "{mailbox!r:>5}"]
)
def test_reason_format_spec_rejected(field: str) -> None:
    problems = errors_of(
        f"""
        version: 1
        rules:
          - name: test.wide
            action: hold
            reason: "Held for {field}."
        """
    )

    assert len(problems) == 1
    line, reason = problems[0]
    assert line == 6
    assert "conversion or format specification" in reason
    assert "write it as {mailbox}" in reason


def test_missing_fields_name_lines() -> None:
    problems = errors_of(
        """
        version: 2
        rules:
          - name: test.bad
        """
    )

    assert (2, "version: Input should be 1") in problems
    assert (4, "rules[0].action: Field required") in problems
    assert (4, "rules[0].reason: Field required") in problems


def test_empty_policy_rejected() -> None:
    assert errors_of("") == [(None, "the file is empty")]


def test_error_message_names_file_and_line() -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy("version: 1\nrules: []\n", "/etc/autopull/policy.yaml")

    lines = str(caught.value).splitlines()
    assert lines[0] == (
        "The policy is invalid. Fix the file; docs/policy.md describes the format."
    )
    assert lines[1].startswith("/etc/autopull/policy.yaml, line 2:")


def test_error_message_one_line_per_problem() -> None:
    text = (
        'version: "1"\nrules:\n  - name: a.b\n    action: QUARANTINE\n    reason: x\n'
    )
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, "policy.yaml")

    lines = str(caught.value).splitlines()[1:]
    assert len(lines) == 2
    assert lines[0].startswith("policy.yaml, line 1:")
    assert lines[1].startswith("policy.yaml, line 4:")


def test_default_policy_is_valid() -> None:
    names = [getattr(rule, "name", None) for rule in default_policy().rules]

    assert "default.pull-malicious" in names
    assert names[-1] == "default.pull-malicious"


# --- Command line ----------------------------------------------------------------


def write_policy(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(dedent(text))
    return path


def test_plan_names_deciding_rule(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_policy(
        tmp_path,
        """
        version: 1
        rules:
          - name: finance.hold-invoices
            when:
              sender: [example.net]
            action: hold
            reason: Invoices from {sender} wait for the finance team.
        """,
    )
    monkeypatch.setenv("AUTOPULL_POLICY__FILE", str(path))

    code = main(["plan", "--json", str(EXAMPLES / "tap-delivered-phish.json")])

    assert code == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["rule"] for row in rows] == ["finance.hold-invoices"] * 3
    assert {row["action"] for row in rows} == {"hold"}
    assert rows[0]["reason"] == (
        "Invoices from billing@example.net wait for the finance team."
    )


def test_plan_table_shows_rule(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_policy(tmp_path, ALL_MATCH.format(action="notify"))
    monkeypatch.setenv("AUTOPULL_POLICY__FILE", str(path))
    monkeypatch.setenv("COLUMNS", "200")

    code = main(["plan", str(EXAMPLES / "tap-delivered-phish.json")])

    out = capsys.readouterr().out
    assert code == 0
    assert "test.every-message" in out
    assert "skip (notify)" in out


@pytest.mark.parametrize("command", [["plan", "-"], ["worker"]])
def test_malformed_policy_rejected_at_start(
    command: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = write_policy(
        tmp_path,
        """
        version: 1
        rules:
          - name: test.bad
            action: pull
            reason: pull is the decision, quarantine the policy action.
        """,
    )
    monkeypatch.setenv("AUTOPULL_POLICY__FILE", str(path))
    # Nothing listens there: the worker must stop before it connects.
    monkeypatch.setenv("AUTOPULL_KAFKA_BOOTSTRAP", "127.0.0.1:9")
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"{}")))

    code = main(command)

    err = capsys.readouterr().err
    assert code == 2
    assert f"{path}, line 5: rules[0].action: Input should be" in err


def test_missing_policy_file_rejected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nowhere.yaml"
    monkeypatch.setenv("AUTOPULL_POLICY__FILE", str(missing))

    code = main(["plan", str(EXAMPLES / "tap-delivered-phish.json")])

    assert code == 2
    assert f"{missing}: the file cannot be read" in capsys.readouterr().err
