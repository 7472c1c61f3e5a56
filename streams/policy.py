"""The pull policy: which mailboxes to pull a reported message from.

A policy is an ordered list of rules. For each mailbox, the first rule that matches
decides `pull`, `hold` (wait for an analyst's approval) or `skip`, and names itself
and its reason in the `Decision`. The rules come from a YAML policy file
(`policy_file.py`, docs/policy.md), by default the one shipped with Autopull, and
`decide` takes any other list of rules with the same signature. The quarantine
mailbox and the excluded mailboxes of the settings are checked before any rule, so
no rule can target them.

This module imports neither Faust nor the settings module, so `autopull plan` runs
without Kafka.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.utils import parseaddr
from typing import Any, Literal

from autopull.connectors.sources.common import subject_was_replaced

Action = Literal["pull", "hold", "skip"]

# Fields of a decision that `as_dict`, and so `autopull plan --json`, writes.
DECISION_FIELDS = (
    "mailbox",
    "message_id",
    "action",
    "reason",
    "rule",
    "source",
    "alert_id",
    "classification",
    "event_class",
)


@dataclass(frozen=True)
class PolicySettings:
    """Parameters of the policy.

    `quarantine_mailbox` is never pulled from, because it contains the evidence
    copies, and "" means that none is configured. `quarantine_mailboxes` adds the
    quarantine mailboxes of the mail platforms. `excluded_mailboxes` are never
    pulled from either. `hold_above_mailboxes` is the maximum number of mailboxes
    one message is pulled from without an analyst's approval, where a policy rule
    refers to it. `rules` are the rules of a loaded policy file, and None means
    the default policy file. Addresses are compared in lower case.
    `search_window_seconds` is how far, either way, the arrival of a message
    without a usable Message-ID may lie from the delivery time the alert gives.
    """

    quarantine_mailbox: str = ""
    excluded_mailboxes: frozenset[str] = field(default_factory=frozenset)
    hold_above_mailboxes: int = 50
    quarantine_mailboxes: frozenset[str] = field(default_factory=frozenset)
    rules: tuple[Rule, ...] | None = None
    search_window_seconds: float = 600.0

    def __post_init__(self) -> None:
        if self.hold_above_mailboxes < 0:
            raise ValueError(
                f"hold_above_mailboxes is {self.hold_above_mailboxes}, but it must be "
                "0 or more."
            )
        if self.search_window_seconds <= 0:
            raise ValueError(
                f"search_window_seconds is {self.search_window_seconds}, but it must "
                "be more than 0."
            )
        object.__setattr__(
            self, "quarantine_mailbox", self.quarantine_mailbox.strip().lower()
        )
        object.__setattr__(
            self,
            "excluded_mailboxes",
            frozenset(mailbox.strip().lower() for mailbox in self.excluded_mailboxes),
        )
        quarantine = {mailbox.strip().lower() for mailbox in self.quarantine_mailboxes}
        quarantine.add(self.quarantine_mailbox)
        object.__setattr__(self, "quarantine_mailboxes", frozenset(quarantine - {""}))


@dataclass(frozen=True)
class Decision:
    """A policy decision for one message in one mailbox, with its rule and reason.

    `notify` is set by a `notify` rule: the copy is skipped, and the incident agent
    adds a notice to the incident's history.
    """

    mailbox: str
    message_id: str
    action: Action
    reason: str
    rule: str
    source: str
    alert_id: str
    classification: str
    event_class: str
    notify: bool = False

    def as_dict(self) -> dict[str, str]:
        """Return the decision as a flat dict of `DECISION_FIELDS`, in that order."""
        return {name: getattr(self, name) for name in DECISION_FIELDS}


@dataclass(frozen=True)
class Verdict:
    """The outcome of one rule: an action, the rule name and a full-sentence reason."""

    action: Action
    rule: str
    reason: str
    notify: bool = False


@dataclass(frozen=True)
class RuleContext:
    """The input of a rule: the alert, one mailbox, the mailbox count and settings.

    `mailbox_count` is the number of distinct mailboxes the message, or the
    incident it joined, reached. `recipient` is the mailbox's Recipient record
    from enrichment (directory attributes, VIP, lists), empty when unknown.
    `score` is the threat score of the incident with this alert.
    """

    alert: Mapping[str, Any]
    mailbox: str
    mailbox_count: int
    settings: PolicySettings
    recipient: Mapping[str, Any] = field(default_factory=dict)
    score: int = 0


Rule = Callable[[RuleContext], Verdict | None]


def decide(
    alert: Mapping[str, Any],
    recipients: Iterable[str | Mapping[str, Any]],
    settings: PolicySettings,
    rules: tuple[Rule, ...] | None = None,
    *,
    score: int = 0,
    mailbox_count: int | None = None,
) -> list[Decision]:
    """Return one decision per mailbox, lower-cased and without repeats.

    `alert` is a NormalizedAlert dict. `recipients` are the mailboxes that received
    the message, as addresses or as Recipient records. `rules` defaults to the
    settings' policy rules, else to the default policy file. `mailbox_count`
    defaults to the number of distinct mailboxes given. An alert without a
    Message-ID that can be searched gets the stand-in id of `search_key` in its
    decisions.
    """
    records = _recipient_records(recipients)
    count = len(records) if mailbox_count is None else mailbox_count
    active_rules = _active_rules(settings, rules)
    search = message_search(alert, settings)
    message_id = alert.get("message_id") or (search_key(search) if search else "")

    decisions: list[Decision] = []
    for mailbox, recipient in records.items():
        context = RuleContext(alert, mailbox, count, settings, recipient, score)
        verdict = _first_verdict(context, active_rules)
        reason = verdict.reason
        if needs_search(alert) and subject_was_replaced(alert):
            reason += (
                " The subject contained line breaks or control characters, which "
                "were replaced with U+FFFD, so the copy cannot be searched by its "
                "exact subject."
            )
        if verdict.action == "pull" and needs_search(alert):
            reason += (
                " The alert has no usable Message-ID, so the copy is searched by "
                "sender, exact subject and delivery time, and it is pulled only when "
                "exactly one message matches."
            )
        decisions.append(
            Decision(
                mailbox=mailbox,
                message_id=message_id,
                action=verdict.action,
                reason=reason,
                rule=verdict.rule,
                source=alert.get("source") or "",
                alert_id=alert.get("alert_id") or "",
                classification=alert.get("classification") or "unknown",
                event_class=alert.get("event_class") or "unknown",
                notify=verdict.notify,
            )
        )
    return decisions


def _recipient_records(
    recipients: Iterable[str | Mapping[str, Any]],
) -> dict[str, Mapping[str, Any]]:
    records: dict[str, Mapping[str, Any]] = {}
    for recipient in recipients:
        record: Mapping[str, Any] = {}
        if isinstance(recipient, str):
            mailbox = recipient
        else:
            mailbox, record = recipient["mailbox"], recipient
        records.setdefault(mailbox.strip().lower(), record)
    return records


def _active_rules(
    settings: PolicySettings, rules: tuple[Rule, ...] | None
) -> tuple[Rule, ...]:
    # The exclusions of the settings come before every rule, so no rule can target
    # those mailboxes.
    chosen = rules if rules is not None else settings.rules
    if chosen is None:
        chosen = default_rules()
    return (exclude_quarantine_mailbox, exclude_configured_mailboxes, *chosen)


def _first_verdict(context: RuleContext, rules: tuple[Rule, ...]) -> Verdict:
    for rule in rules:
        verdict = rule(context)
        if verdict is not None:
            return verdict
    return Verdict(
        "skip",
        "default.no-rule-matched",
        "No policy rule matched this alert, so nothing is done.",
    )


def exclude_quarantine_mailbox(context: RuleContext) -> Verdict | None:
    """Skip the quarantine mailbox, whose copies are the evidence."""
    if context.mailbox not in context.settings.quarantine_mailboxes:
        return None
    return Verdict(
        "skip",
        "exclude.quarantine-mailbox",
        f"The mailbox {context.mailbox} is the quarantine mailbox, whose copies are "
        "evidence and are never pulled.",
    )


def exclude_configured_mailboxes(context: RuleContext) -> Verdict | None:
    """Skip the mailboxes the settings exclude."""
    if context.mailbox not in context.settings.excluded_mailboxes:
        return None
    return Verdict(
        "skip",
        "exclude.excluded-mailbox",
        f"The mailbox {context.mailbox} is in the excluded mailboxes, so it is never "
        "pulled from.",
    )


def needs_search(alert: Mapping[str, Any]) -> bool:
    """Return True when the alert names its message by no usable Message-ID."""
    return not alert.get("message_id") or bool(alert.get("message_id_synthetic"))


def searchable(alert: Mapping[str, Any]) -> bool:
    """Return True when the alert gives a sender, a subject and a delivery time.

    A subject whose control characters were replaced with U+FFFD is not usable.
    The connectors ask the platform only for the time window and compare the
    subject themselves, so no subject text reaches a protocol command. The
    replaced subject can never equal the message's own, and a comparison that
    took U+FFFD as a wildcard would no longer be exact. So such an alert is held
    for an analyst, like one without a subject.
    """
    subject = (alert.get("subject") or "").strip()
    if not subject or subject_was_replaced(alert):
        return False
    return bool(search_senders(alert)) and bool(delivery_time(alert))


def search_senders(alert: Mapping[str, Any]) -> tuple[str, ...]:
    """Return the envelope sender and the From address, lower-cased, without repeats.

    A platform shows the From or Sender header of a message, and the envelope sender
    of a list or a bounce often differs from both, so either may match.
    """
    header_from = parseaddr(alert.get("header_from") or "")[1]
    addresses = [alert.get("sender") or "", header_from]
    cleaned = (address.strip().lower() for address in addresses)
    return tuple(dict.fromkeys(address for address in cleaned if "@" in address))


def delivery_time(alert: Mapping[str, Any]) -> datetime | None:
    """Return when the message reached the mailbox, as the alert gives it."""
    moment: datetime | None = alert.get("delivered_at") or alert.get("occurred_at")
    return moment


def message_search(
    alert: Mapping[str, Any], settings: PolicySettings
) -> dict[str, Any] | None:
    """Return the MessageSearch record of an alert that needs one, else None."""
    moment = delivery_time(alert)
    if not needs_search(alert) or not searchable(alert) or moment is None:
        return None
    window = timedelta(seconds=settings.search_window_seconds)
    return {
        "senders": list(search_senders(alert)),
        "subject": (alert.get("subject") or "").strip(),
        "received_after": moment - window,
        "received_before": moment + window,
    }


def search_key(search: Mapping[str, Any]) -> str:
    """Return a stand-in Message-ID for a searched message, the same on every replay.

    The incident and the ledger key each copy by Message-ID, so two different
    messages without one must not share the empty string.
    """
    parts = [
        *search["senders"],
        search["subject"],
        search["received_after"].isoformat(),
        search["received_before"].isoformat(),
    ]
    digest = hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:24]
    return f"search-{digest}@no-message-id"


def default_rules() -> tuple[Rule, ...]:
    """Return the rules of the default policy file shipped with Autopull."""
    from autopull.streams.policy_file import default_policy

    return default_policy().rules
