"""The default policy: which mailboxes to pull a reported message from.

A policy is an ordered list of rules. For each mailbox, the first rule that matches
decides `pull`, `hold` (wait for an analyst's approval) or `skip`, and names itself
and its reason in the `Decision`. The default rules are below, and `decide` takes any
other list of rules with the same signature.

This module imports neither Faust nor the settings module, so `autopull plan` runs
without Kafka.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Action = Literal["pull", "hold", "skip"]

MALICIOUS_CLASSIFICATIONS = frozenset({"phish", "malware", "impostor"})


@dataclass(frozen=True)
class PolicySettings:
    """Parameters of the default policy.

    `quarantine_mailbox` is never pulled from, because it contains the evidence
    copies, and "" means that none is configured. `excluded_mailboxes` are never
    pulled from either. `hold_above_mailboxes` is the maximum number of mailboxes
    one message is pulled from without an analyst's approval. Addresses are
    compared in lower case.
    """

    quarantine_mailbox: str = ""
    excluded_mailboxes: frozenset[str] = field(default_factory=frozenset)
    hold_above_mailboxes: int = 50

    def __post_init__(self) -> None:
        if self.hold_above_mailboxes < 0:
            raise ValueError(
                f"hold_above_mailboxes is {self.hold_above_mailboxes}, but it must be "
                "0 or more."
            )
        object.__setattr__(
            self, "quarantine_mailbox", self.quarantine_mailbox.strip().lower()
        )
        object.__setattr__(
            self,
            "excluded_mailboxes",
            frozenset(mailbox.strip().lower() for mailbox in self.excluded_mailboxes),
        )


@dataclass(frozen=True)
class Decision:
    """A policy decision for one message in one mailbox, with its rule and reason."""

    mailbox: str
    message_id: str
    action: Action
    reason: str
    rule: str
    source: str
    alert_id: str
    classification: str
    event_class: str

    def as_dict(self) -> dict[str, str]:
        """Return the decision as a flat dict, in field order."""
        return asdict(self)


@dataclass(frozen=True)
class Verdict:
    """The outcome of one rule: an action, the rule name and a full-sentence reason."""

    action: Action
    rule: str
    reason: str


@dataclass(frozen=True)
class RuleContext:
    """The input of a rule: the alert, one mailbox, the mailbox count and settings.

    `mailbox_count` is the number of distinct mailboxes the message reached.
    """

    alert: Mapping[str, Any]
    mailbox: str
    mailbox_count: int
    settings: PolicySettings


Rule = Callable[[RuleContext], Verdict | None]


def decide(
    alert: Mapping[str, Any],
    mailboxes: Iterable[str],
    settings: PolicySettings,
    rules: tuple[Rule, ...] | None = None,
) -> list[Decision]:
    """Return one decision per mailbox, lower-cased and without repeats.

    `alert` is a NormalizedAlert dict. `mailboxes` are the mailboxes that received
    the message, usually its recipients. `rules` defaults to `DEFAULT_RULES`.
    """
    unique = list(dict.fromkeys(mailbox.strip().lower() for mailbox in mailboxes))
    active_rules = DEFAULT_RULES if rules is None else rules

    decisions: list[Decision] = []
    for mailbox in unique:
        context = RuleContext(alert, mailbox, len(unique), settings)
        verdict = _first_verdict(context, active_rules)
        decisions.append(
            Decision(
                mailbox=mailbox,
                message_id=alert.get("message_id") or "",
                action=verdict.action,
                reason=verdict.reason,
                rule=verdict.rule,
                source=alert.get("source") or "",
                alert_id=alert.get("alert_id") or "",
                classification=alert.get("classification") or "unknown",
                event_class=alert.get("event_class") or "unknown",
            )
        )
    return decisions


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
    quarantine = context.settings.quarantine_mailbox
    if not quarantine or context.mailbox != quarantine:
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


def skip_blocked(context: RuleContext) -> Verdict | None:
    """Skip blocked messages and blocked clicks, which leave nothing to pull."""
    event_class = context.alert.get("event_class")
    if event_class == "message_blocked":
        return Verdict(
            "skip",
            "default.skip-blocked",
            "The message was blocked before delivery, so no mailbox holds a copy to "
            "pull.",
        )
    if event_class == "click_blocked":
        return Verdict(
            "skip",
            "default.skip-blocked-click",
            "The click was blocked, so this alert pulls nothing. The message is "
            "pulled by its delivered-message alert or by a permitted click.",
        )
    return None


def skip_cleared(context: RuleContext) -> Verdict | None:
    """Skip messages whose verdict was cleared or found to be a false positive."""
    status = context.alert.get("threat_status")
    if status == "cleared":
        return Verdict(
            "skip",
            "default.skip-cleared",
            "The source cleared its verdict on this message, so it is not pulled. "
            "Copies pulled earlier stay in quarantine until their incident restores "
            "them.",
        )
    if status == "false_positive":
        return Verdict(
            "skip",
            "default.skip-false-positive",
            "The source marked its verdict on this message as a false positive, so it "
            "is not pulled. Copies pulled earlier stay in quarantine until their "
            "incident restores them.",
        )
    return None


def skip_not_malicious(context: RuleContext) -> Verdict | None:
    """Skip spam and messages of unknown class."""
    classification = context.alert.get("classification") or "unknown"
    if classification in MALICIOUS_CLASSIFICATIONS:
        return None
    return Verdict(
        "skip",
        "default.skip-not-malicious",
        f"The message is classified {classification}, and only phish, malware and "
        "impostor messages are pulled.",
    )


def hold_without_message_id(context: RuleContext) -> Verdict | None:
    """Hold messages that have no Message-ID or only one the source made up."""
    # TODO: find the copy by sender, exact subject and delivery time instead, and
    # pull when exactly one message matches.
    if not context.alert.get("message_id"):
        return Verdict(
            "hold",
            "default.hold-no-message-id",
            "The alert has no Message-ID, and finding the copy by sender, subject and "
            "delivery time needs an analyst, so the message waits for approval.",
        )
    if context.alert.get("message_id_synthetic"):
        return Verdict(
            "hold",
            "default.hold-synthetic-message-id",
            "The Message-ID was made up by the source because the message had none, "
            "and finding the copy by sender, subject and delivery time needs an "
            "analyst, so the message waits for approval.",
        )
    return None


def hold_unknown_status(context: RuleContext) -> Verdict | None:
    """Hold messages whose threat status is outside the known vocabulary."""
    if context.alert.get("threat_status") != "unknown":
        return None
    return Verdict(
        "hold",
        "default.hold-unknown-status",
        "The threat status is neither active, cleared nor false positive (for "
        "example expired), so the message waits for an analyst's approval.",
    )


def pull_clicked(context: RuleContext) -> Verdict | None:
    """Pull the clicker's copy after a permitted click on a malicious URL."""
    if context.alert.get("event_class") != "click_permitted":
        return None
    return Verdict(
        "pull",
        "default.pull-clicked",
        f"The click by {context.mailbox} on a {context.alert.get('classification')} "
        "URL in this message was permitted, so this copy is pulled.",
    )


def hold_large_campaign(context: RuleContext) -> Verdict | None:
    """Hold a message that reached more mailboxes than may be pulled unapproved."""
    # NOTE: counts the mailboxes of this alert only. TAP events without an id arrive
    # one per recipient, so their campaign size shows only once alerts are grouped.
    limit = context.settings.hold_above_mailboxes
    if context.mailbox_count <= limit:
        return None
    return Verdict(
        "hold",
        "default.hold-large-campaign",
        f"The message reached {context.mailbox_count} mailboxes, more than the "
        f"{limit} that may be pulled without approval, so it waits for an analyst.",
    )


def pull_malicious(context: RuleContext) -> Verdict | None:
    """Pull a delivered message classified phish, malware or impostor."""
    return Verdict(
        "pull",
        "default.pull-malicious",
        f"The message was delivered and classified "
        f"{context.alert.get('classification')}, so this copy is pulled.",
    )


DEFAULT_RULES: tuple[Rule, ...] = (
    exclude_quarantine_mailbox,
    exclude_configured_mailboxes,
    skip_blocked,
    skip_cleared,
    skip_not_malicious,
    hold_without_message_id,
    hold_unknown_status,
    pull_clicked,
    hold_large_campaign,
    pull_malicious,
)
