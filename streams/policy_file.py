"""YAML policy files: loading, validation with line numbers, and compiled rules.

A policy file has a version, exclusions and ordered rules; docs/policy.md
describes the format. The file is parsed into PyYAML nodes, which record the line
of every key and value, then validated with pydantic. Every error names the line
of the value it is about and the reason, so a malformed policy is rejected at start.
"""

from __future__ import annotations

import fnmatch
import functools
import string
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Generic, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
)

from autopull.connectors.errors import AutopullError
from autopull.streams.policy import Action, Rule, RuleContext, Verdict, searchable

DEFAULT_POLICY_FILE = Path(__file__).resolve().parent / "default-policy.yaml"

PolicyAction = Literal["quarantine", "notify", "ignore", "hold"]
# Policy actions and the decision actions they stand for.
ACTIONS: dict[str, Action] = {
    "quarantine": "pull",
    "notify": "skip",
    "ignore": "skip",
    "hold": "hold",
}
Classification = Literal["phish", "malware", "spam", "impostor", "unknown"]
EventClass = Literal[
    "message_delivered",
    "message_blocked",
    "click_permitted",
    "click_blocked",
    "alert",
    "unknown",
]
ThreatStatus = Literal["active", "cleared", "false_positive", "unknown"]
RecipientType = Literal["original", "list_member", "alias", "forward"]
# The setting that a `mailboxes: {above: ...}` condition may name instead of a number.
LIMIT_SETTING = "hold_above_mailboxes"
# Fields a rule's reason may name in braces, such as {mailbox}.
REASON_FIELDS = frozenset(
    {
        "mailbox",
        "classification",
        "event_class",
        "threat_status",
        "source",
        "sender",
        "mailbox_count",
        "limit",
        "score",
    }
)
RULE_NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]*$"

T = TypeVar("T")


class PolicyError(AutopullError):
    """A policy file that cannot be used, with the line and reason of each problem."""

    def __init__(self, source: str, problems: list[tuple[int | None, str]]) -> None:
        self.source = source
        self.problems = problems
        lines = [
            f"{source}, line {line}: {reason}" if line else f"{source}: {reason}"
            for line, reason in problems
        ]
        super().__init__(
            "The policy is invalid. Fix the file; docs/policy.md describes the "
            "format.\n" + "\n".join(lines)
        )


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Not(_Strict, Generic[T]):
    """A condition that matches every value except the listed ones."""

    values: list[T] = Field(alias="not", min_length=1)


def _match_kind(value: Any) -> str:
    return "[not]" if isinstance(value, dict | Not) else "[list]"


# A list condition matches any of its values, and {not: [...]} any other value. The
# discriminator keeps pydantic from reporting a mismatch with both forms.
SourceMatch = Annotated[
    Annotated[list[str], Tag("[list]")] | Annotated[Not[str], Tag("[not]")],
    Discriminator(_match_kind),
]
EventClassMatch = Annotated[
    Annotated[list[EventClass], Tag("[list]")]
    | Annotated[Not[EventClass], Tag("[not]")],
    Discriminator(_match_kind),
]
ClassificationMatch = Annotated[
    Annotated[list[Classification], Tag("[list]")]
    | Annotated[Not[Classification], Tag("[not]")],
    Discriminator(_match_kind),
]
ThreatStatusMatch = Annotated[
    Annotated[list[ThreatStatus], Tag("[list]")]
    | Annotated[Not[ThreatStatus], Tag("[not]")],
    Discriminator(_match_kind),
]


class MailboxCount(_Strict):
    """Bounds on the number of mailboxes the message or its incident reached."""

    above: int | Literal["hold_above_mailboxes"] | None = None
    at_most: int | None = Field(default=None, ge=0)


class ScoreRange(_Strict):
    """Bounds on the incident's threat score: at_least <= score < below."""

    at_least: int | None = None
    below: int | None = None


class RecipientCondition(_Strict):
    """Conditions on the mailbox a decision is for. All given ones must hold."""

    vip: bool | None = None
    groups: list[str] | None = Field(default=None, min_length=1)
    attributes: dict[str, list[str]] | None = None
    recipient_type: list[RecipientType] | None = Field(default=None, min_length=1)
    mailboxes: list[str] | None = Field(default=None, min_length=1)


class Conditions(_Strict):
    """Conditions of one rule. All given ones must hold, and a rule without any
    matches every copy.
    """

    source: SourceMatch | None = None
    event_class: EventClassMatch | None = None
    classification: ClassificationMatch | None = None
    threat_status: ThreatStatusMatch | None = None
    message_id: Literal["missing", "synthetic", "present"] | None = None
    searchable: bool | None = None
    score: ScoreRange | None = None
    sender: list[str] | None = Field(default=None, min_length=1)
    recipient: RecipientCondition | None = None
    mailboxes: MailboxCount | None = None


class RuleModel(_Strict):
    """One rule of a policy file."""

    name: str = Field(pattern=RULE_NAME_PATTERN)
    when: Conditions = Field(default_factory=Conditions)
    action: PolicyAction
    reason: str = Field(min_length=1)

    @field_validator("reason")
    @classmethod
    def _known_fields(cls, reason: str) -> str:
        for _, name, spec, conversion in string.Formatter().parse(reason):
            if name is not None and name not in REASON_FIELDS:
                known = ", ".join(sorted(REASON_FIELDS))
                raise ValueError(
                    f"the reason names {{{name}}}, which is not a known field; "
                    f"use one of {known}"
                )
            # A width such as {mailbox:>99999999} would turn one reason into
            # megabytes, so fields are plain names only.
            if spec or conversion:
                raise ValueError(
                    f"the reason field {{{name}}} has a conversion or format "
                    f"specification; write it as {{{name}}}"
                )
        return reason


class Exclusions(_Strict):
    """Mailboxes no rule pulls from, besides the quarantine mailbox."""

    mailboxes: list[str] = Field(default_factory=list)
    service_accounts: list[str] = Field(default_factory=list)


class PolicyModel(_Strict):
    """A whole policy file."""

    version: Literal[1]
    exclusions: Exclusions = Field(default_factory=Exclusions)
    rules: list[RuleModel] = Field(min_length=1)


@dataclass(frozen=True)
class Policy:
    """A validated policy: its rules, exclusions first, and the file it came from."""

    source: str
    rules: tuple[Rule, ...]


def load_policy(path: Path) -> Policy:
    """Read, validate and compile the policy file at `path`, or raise PolicyError."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise PolicyError(
            str(path), [(None, f"the file cannot be read ({error})")]
        ) from error
    return parse_policy(text, str(path))


@functools.cache
def default_policy() -> Policy:
    """Return the default policy shipped with Autopull, loaded once."""
    return load_policy(DEFAULT_POLICY_FILE)


def parse_policy(text: str, source: str = "<policy>") -> Policy:
    """Validate and compile the policy in `text`. `source` names it in errors."""
    document, lines = _load_yaml(text, source)
    try:
        model = PolicyModel.model_validate(document)
    except ValidationError as error:
        problems = [
            (_line_of(lines, problem["loc"]), _describe(problem))
            for problem in error.errors(include_url=False, include_input=False)
        ]
        raise PolicyError(source, problems) from error

    duplicates = _duplicate_names(model, lines)
    if duplicates:
        raise PolicyError(source, duplicates)
    return Policy(source, _compile(model))


# --- YAML with line numbers ------------------------------------------------------


def _load_yaml(text: str, source: str) -> tuple[Any, dict[tuple[Any, ...], int]]:
    """Return the document and the 1-based line of every key path in it."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line = mark.line + 1 if mark is not None else None
        raise PolicyError(
            source, [(line, f"the YAML is invalid: {error.problem}")]
        ) from error
    except yaml.YAMLError as error:
        raise PolicyError(source, [(None, f"the YAML is invalid: {error}")]) from error
    if node is None:
        raise PolicyError(source, [(None, "the file is empty")])

    lines: dict[tuple[Any, ...], int] = {}
    document = _to_python(node, (), lines, source)
    return document, lines


def _to_python(
    node: yaml.Node,
    path: tuple[Any, ...],
    lines: dict[tuple[Any, ...], int],
    source: str,
) -> Any:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = _scalar(key_node)
            if key in result:
                raise PolicyError(
                    source,
                    [(key_node.start_mark.line + 1, f"the key {key!r} appears twice")],
                )
            result[key] = _to_python(value_node, (*path, key), lines, source)
            lines[(*path, key)] = key_node.start_mark.line + 1
        return result
    if isinstance(node, yaml.SequenceNode):
        return [
            _to_python(item, (*path, index), lines, source)
            for index, item in enumerate(node.value)
        ]
    return _scalar(node)


def _scalar(node: yaml.Node) -> Any:
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node, deep=True)
    finally:
        loader.dispose()


def _file_path(location: tuple[Any, ...]) -> tuple[Any, ...]:
    # pydantic puts the union member it tried, such as "list[...]", into a location.
    return tuple(item for item in location if not _is_union_tag(item))


def _is_union_tag(item: Any) -> bool:
    return isinstance(item, str) and "[" in item


def _line_of(
    lines: Mapping[tuple[Any, ...], int], location: tuple[Any, ...]
) -> int | None:
    # The longest prefix of the location that names a place in the file wins, so a
    # missing key points at the mapping that lacks it.
    path = _file_path(location)
    for end in range(len(path), -1, -1):
        line = lines.get(path[:end])
        if line is not None:
            return line
    return None


def _describe(problem: Mapping[str, Any]) -> str:
    parts: list[str] = []
    for item in _file_path(problem["loc"]):
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(f".{item}" if parts else str(item))
    where = "".join(parts) or "the file"
    return f"{where}: {problem['msg']}"


def _duplicate_names(
    model: PolicyModel, lines: Mapping[tuple[Any, ...], int]
) -> list[tuple[int | None, str]]:
    seen: set[str] = set()
    problems: list[tuple[int | None, str]] = []
    for index, rule in enumerate(model.rules):
        if rule.name in seen:
            line = lines.get(("rules", index, "name"))
            problems.append(
                (
                    line,
                    f"rules[{index}].name: the rule name {rule.name!r} is used twice",
                )
            )
        seen.add(rule.name)
    return problems


# --- Compiled rules --------------------------------------------------------------


@dataclass(frozen=True)
class ExclusionRule:
    """Skips the mailboxes a policy file excludes by name or as service accounts."""

    mailboxes: frozenset[str]
    service_accounts: tuple[str, ...]

    def __call__(self, context: RuleContext) -> Verdict | None:
        if context.mailbox in self.mailboxes:
            return Verdict(
                "skip",
                "exclude.policy-mailbox",
                f"The mailbox {context.mailbox} is excluded by the policy, so it is "
                "never pulled from.",
            )
        for pattern in self.service_accounts:
            if fnmatch.fnmatchcase(context.mailbox, pattern):
                return Verdict(
                    "skip",
                    "exclude.service-account",
                    f"The mailbox {context.mailbox} is a service account (it matches "
                    f"{pattern}), so it is never pulled from.",
                )
        return None


@dataclass(frozen=True)
class PolicyRule:
    """One compiled rule of a policy file."""

    model: RuleModel

    @property
    def name(self) -> str:
        return self.model.name

    def __call__(self, context: RuleContext) -> Verdict | None:
        if not matches(self.model.when, context):
            return None
        return Verdict(
            ACTIONS[self.model.action],
            self.model.name,
            self.model.reason.format_map(_reason_values(context)),
            notify=self.model.action == "notify",
        )


def _compile(model: PolicyModel) -> tuple[Rule, ...]:
    exclusions = ExclusionRule(
        frozenset(mailbox.strip().lower() for mailbox in model.exclusions.mailboxes),
        tuple(pattern.strip().lower() for pattern in model.exclusions.service_accounts),
    )
    return (exclusions, *(PolicyRule(rule) for rule in model.rules))


def matches(when: Conditions, context: RuleContext) -> bool:
    """Return whether every condition given in `when` holds for `context`.

    The checks stop at the first that fails, because `decide` runs every rule for
    each of possibly tens of thousands of mailboxes.
    """
    alert = context.alert
    return (
        _in(when.source, alert.get("source"))
        and _in(when.event_class, alert.get("event_class"))
        and _in(when.classification, alert.get("classification") or "unknown")
        and _in(when.threat_status, alert.get("threat_status"))
        and _message_id(when.message_id, alert)
        and (when.searchable is None or searchable(alert) == when.searchable)
        and _score(when.score, context.score)
        and _sender(when.sender, alert.get("sender") or "")
        and _recipient(when.recipient, context)
        and _mailbox_count(when.mailboxes, context)
    )


def _in(condition: list[Any] | Not[Any] | None, value: Any) -> bool:
    if condition is None:
        return True
    if isinstance(condition, Not):
        return value not in condition.values
    return value in condition


def _message_id(condition: str | None, alert: Mapping[str, Any]) -> bool:
    if condition is None:
        return True
    message_id = alert.get("message_id")
    if condition == "missing":
        return not message_id
    synthetic = bool(message_id) and bool(alert.get("message_id_synthetic"))
    if condition == "synthetic":
        return synthetic
    return bool(message_id) and not synthetic


def _score(condition: ScoreRange | None, score: int) -> bool:
    if condition is None:
        return True
    if condition.at_least is not None and score < condition.at_least:
        return False
    return condition.below is None or score < condition.below


def _sender(patterns: list[str] | None, sender: str) -> bool:
    """Match an address pattern (with @) or a domain and its subdomains."""
    if patterns is None:
        return True
    address = sender.strip().lower()
    domain = address.rpartition("@")[2]
    for pattern in (p.strip().lower() for p in patterns):
        if "@" in pattern:
            if fnmatch.fnmatchcase(address, pattern):
                return True
        elif domain == pattern or domain.endswith(f".{pattern}"):
            return True
    return False


def _recipient(condition: RecipientCondition | None, context: RuleContext) -> bool:
    if condition is None:
        return True
    recipient = context.recipient
    attributes = recipient.get("attributes") or {}
    if condition.vip is not None and bool(recipient.get("vip")) != condition.vip:
        return False
    if condition.recipient_type is not None and (
        recipient.get("recipient_type", "original") not in condition.recipient_type
    ):
        return False
    if condition.mailboxes is not None and not any(
        fnmatch.fnmatchcase(context.mailbox, pattern.strip().lower())
        for pattern in condition.mailboxes
    ):
        return False
    if condition.groups is not None and not _in_group(condition.groups, recipient):
        return False
    for name, values in (condition.attributes or {}).items():
        value = str(attributes.get(name, "")).lower()
        if value not in {item.lower() for item in values}:
            return False
    return True


def _in_group(groups: list[str], recipient: Mapping[str, Any]) -> bool:
    # A recipient is in a group it was reached through (a distribution list on its
    # path) or one the directory lists for it (group DNs, one a line).
    wanted = {group.strip().lower() for group in groups}
    member_of = {address.lower() for address in recipient.get("path") or []}
    listed = (recipient.get("attributes") or {}).get("groups", "")
    member_of |= {dn.strip().lower() for dn in listed.splitlines() if dn.strip()}
    return bool(wanted & member_of)


def _mailbox_count(condition: MailboxCount | None, context: RuleContext) -> bool:
    if condition is None:
        return True
    count = context.mailbox_count
    above = condition.above
    if above == LIMIT_SETTING:
        above = context.settings.hold_above_mailboxes
    if isinstance(above, int) and count <= above:
        return False
    return condition.at_most is None or count <= condition.at_most


def _reason_values(context: RuleContext) -> dict[str, Any]:
    alert = context.alert
    return {
        "mailbox": context.mailbox,
        "classification": alert.get("classification") or "unknown",
        "event_class": alert.get("event_class") or "unknown",
        "threat_status": alert.get("threat_status") or "unknown",
        "source": alert.get("source") or "",
        "sender": alert.get("sender") or "",
        "mailbox_count": context.mailbox_count,
        "limit": context.settings.hold_above_mailboxes,
        "score": context.score,
    }
