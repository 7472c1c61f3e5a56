"""Evidence that a mailbox passed a malicious message on: pure functions, no Kafka.

Three kinds of input are matched against a message that a mailbox received, strongest
first:

- the platform's message trace: the same Message-ID delivered, redirected or expanded
  to a new recipient, or a new message that an inbox or transport rule generated from
  it, is definitive;
- the mailbox's forwarding and redirect rules, which keep the Message-ID: definitive;
- the mailbox's sent items since the delivery, scored by `forward_evidence`.

A matching subject alone is never evidence, and a reply in the thread that does not
carry the message's payload (a malicious attachment or URL) is never matched.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from autopull.connectors.mail.base import ForwardingRule, SentMessage, TraceEvent
from autopull.connectors.mail.mime import bare_message_id, message_id_list

Confidence = Literal["definitive", "strong", "medium", "weak"]
CONFIDENCE_RANK: dict[str, int] = {"definitive": 3, "strong": 2, "medium": 1, "weak": 0}

# Forward and reply prefixes of common mail clients and languages. English uses FW,
# FWD and RE, German WG and AW, French TR, Spanish RV, Dutch Doorst and Antw.
# Nordic clients write VS, SV or VB, Italian I and R, Portuguese ENC, Polish PD and
# ODP, Finnish VL and Turkish İLT and YNT.
_PREFIXES = (
    "fwd",
    "fw",
    "re",
    "wg",
    "aw",
    "tr",
    "rv",
    "vs",
    "sv",
    "vb",
    "vl",
    "doorst",
    "antw",
    "enc",
    "pd",
    "odp",
    "i̇lt",
    "ilt",
    "ynt",
    "i",
    "r",
)
_PREFIX = re.compile(
    r"^\s*(?:\[[^\]]*\]\s*)?(?:"
    + "|".join(_PREFIXES)
    + r")\s*(?:\[\d+\]|\(\d+\))?\s*(?::|\uff1a)",
    re.IGNORECASE,
)
# Tracking sources of messages that a rule, not a person, generated.
RULE_SOURCES = frozenset({"MAILBOXRULE", "AGENT"})
# Tracking events that put a message into a further mailbox.
DELIVERY_EVENTS = frozenset({"DELIVER", "REDIRECT", "EXPAND", "RESOLVE", "SEND"})
# An Outlook Thread-Index is a 22-byte header followed by one 5-byte block per
# reply or forward (PidTagConversationIndex, MS-OXOMSG).
THREAD_INDEX_HEADER_BYTES = 22
THREAD_INDEX_CHILD_BYTES = 5


@dataclass(frozen=True)
class Payload:
    """The malicious content of an incident: URLs and attachment SHA-256 hashes."""

    urls: frozenset[str] = frozenset()
    attachment_hashes: frozenset[str] = frozenset()


@dataclass(frozen=True)
class TracedMessage:
    """A message that reached a mailbox, whose further copies are searched."""

    message_id: str
    delivered_at: datetime
    subject: str | None = None
    thread_index: str | None = None
    depth: int = 0


@dataclass(frozen=True)
class Evidence:
    """Why a message counts as a copy: a confidence and a readable reason."""

    confidence: Confidence
    reason: str


@dataclass(frozen=True)
class Match:
    """A copy of a traced message in another mailbox, and the evidence for it."""

    from_mailbox: str
    to_mailbox: str
    message_id: str
    evidence: Evidence
    external: bool = False
    subject: str | None = None
    sent_at: datetime | None = None
    thread_index: str | None = None


def strip_forward_prefixes(subject: str | None) -> str:
    """Return the subject without forward and reply prefixes, casefolded.

    Stacked prefixes ("FW: RE: Fwd:") and gateway tags in brackets in front of them
    are removed, and runs of white space become one space.
    """
    text = subject or ""
    while True:
        stripped = _PREFIX.sub("", text, count=1)
        if stripped == text:
            break
        text = stripped
    return " ".join(text.split()).casefold()


def _thread_index_bytes(value: str | None) -> bytes | None:
    if not value:
        return None
    try:
        return base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        return None


def is_thread_index_child(original: str | None, candidate: str | None) -> bool:
    """Return whether `candidate` is a Thread-Index below `original` in its thread.

    The candidate must start with every byte of the original and add one or more
    5-byte child blocks.
    """
    parent = _thread_index_bytes(original)
    child = _thread_index_bytes(candidate)
    if parent is None or child is None or len(parent) < THREAD_INDEX_HEADER_BYTES:
        return False
    extra = len(child) - len(parent)
    return (
        extra > 0 and extra % THREAD_INDEX_CHILD_BYTES == 0 and child.startswith(parent)
    )


def _header(sent: SentMessage, name: str) -> str | None:
    wanted = name.lower()
    for key, value in sent.headers.items():
        if key.lower() == wanted:
            return value
    return None


def forward_evidence(
    original: TracedMessage, payload: Payload, sent: SentMessage
) -> Evidence | None:
    """Return the strongest evidence that `sent` passes `original` on, or None.

    Definitive: the original attached as message/rfc822, or its id in
    X-Forwarded-Message-Id. Strong: a malicious attachment hash, or the payload
    together with the original's id in References or In-Reply-To, or together with
    the original's Outlook Thread-Index as prefix. Medium: the
    same subject after removing forward prefixes, with a malicious URL in the body.
    Anything else, a matching subject alone included, is no evidence.
    """
    target = original.message_id
    if sent.message_id == target:
        return None  # the traced message itself, not a copy it spawned
    if target in sent.attached_message_ids:
        return Evidence("definitive", "The original is attached as message/rfc822.")
    if bare_message_id(_header(sent, "X-Forwarded-Message-Id")) == target:
        return Evidence("definitive", "X-Forwarded-Message-Id names the original.")

    hashes = payload.attachment_hashes & set(sent.attachment_hashes)
    urls = payload.urls & set(sent.urls)
    if not hashes and not urls:
        return None

    carried = _describe_payload(hashes, urls)
    thread = set(message_id_list(_header(sent, "References")))
    thread |= set(message_id_list(_header(sent, "In-Reply-To")))
    if target in thread:
        return Evidence(
            "strong", f"References or In-Reply-To names the original, and {carried}."
        )
    if hashes:
        return Evidence("strong", f"It carries {carried}.")
    if is_thread_index_child(original.thread_index, _header(sent, "Thread-Index")):
        return Evidence(
            "strong", f"Its Thread-Index continues the original's, and {carried}."
        )
    same_subject = strip_forward_prefixes(sent.subject) == strip_forward_prefixes(
        original.subject
    )
    if same_subject and original.subject:
        return Evidence(
            "medium", f"The subject matches without its prefix, and {carried}."
        )
    return None


def _describe_payload(hashes: frozenset[str], urls: frozenset[str]) -> str:
    parts = []
    if hashes:
        parts.append("the malicious attachment " + ", ".join(sorted(hashes)))
    if urls:
        parts.append("the malicious URL " + ", ".join(sorted(urls)))
    return "it carries " + " and ".join(parts)


def matches_from_sent(
    mailbox: str,
    original: TracedMessage,
    payload: Payload,
    sent_messages: Iterable[SentMessage],
    is_internal: Callable[[str], bool],
) -> list[Match]:
    """Return one match per recipient of each sent message that passes `original` on.

    Messages sent before the delivery of `original` are ignored. External recipients
    are matched too, marked `external`, so the incident can report them.
    """
    matches = []
    for sent in sent_messages:
        if sent.sent_at < original.delivered_at:
            continue
        evidence = forward_evidence(original, payload, sent)
        if evidence is None:
            continue
        for recipient in sent.recipients:
            if recipient.lower() == mailbox.lower():
                continue
            matches.append(
                Match(
                    from_mailbox=mailbox.lower(),
                    to_mailbox=recipient.lower(),
                    message_id=sent.message_id,
                    evidence=evidence,
                    external=not is_internal(recipient),
                    subject=sent.subject,
                    sent_at=sent.sent_at,
                    thread_index=_header(sent, "Thread-Index"),
                )
            )
    return matches


def matches_from_rules(
    mailbox: str,
    original: TracedMessage,
    rules: Iterable[ForwardingRule],
    is_internal: Callable[[str], bool],
) -> list[Match]:
    """Return a match for each target of a mailbox's redirect rules.

    A redirect sends the same message on with its Message-ID, so the target's copy
    has the original's id. Forward rules write a new message with a new id, which
    the sent items or the message trace show instead.
    """
    matches = []
    for rule in rules:
        if rule.kind != "redirect":
            continue
        for target in rule.targets:
            if target.lower() == mailbox.lower():
                continue
            matches.append(
                Match(
                    from_mailbox=mailbox.lower(),
                    to_mailbox=target.lower(),
                    message_id=original.message_id,
                    evidence=Evidence(
                        "definitive",
                        f"A {rule.kind} rule of {mailbox} sends its mail to {target} "
                        "with the same Message-ID.",
                    ),
                    external=not is_internal(target),
                    subject=original.subject,
                    sent_at=original.delivered_at,
                    thread_index=original.thread_index,
                )
            )
    return matches


def matches_from_trace(
    mailbox: str,
    original: TracedMessage,
    events: Sequence[TraceEvent],
    is_internal: Callable[[str], bool],
) -> list[Match]:
    """Return the copies a message trace shows, all definitive.

    A redirect or expansion of the same Message-ID, or a delivery of it that the
    searched mailbox sent, reaches a recipient with the original itself. A delivery
    from anyone else is an original delivery of the message, not a copy. A message
    that an inbox rule (source MAILBOXRULE) or a transport rule (source AGENT)
    generated from it, found by its Reference, is a copy under a new Message-ID,
    and its deliveries count the same way.
    """
    target = original.message_id
    internal_ids = {
        event.internal_message_id
        for event in events
        if _same_id(event.message_id, target) and event.internal_message_id
    }
    generated: dict[str, TraceEvent] = {}
    for event in events:
        event_id = bare_message_id(event.message_id) or ""
        if event_id == target or event.source.upper() not in RULE_SOURCES:
            continue
        reference = event.reference or ""
        if reference in internal_ids or bare_message_id(reference) == target:
            generated.setdefault(event_id, event)

    matches: dict[tuple[str, str], Match] = {}
    for event in events:
        event_id = bare_message_id(event.message_id) or ""
        if event.event.upper() not in DELIVERY_EVENTS:
            continue
        if event_id == target:
            reason = f"The message trace shows {event.event.upper()} of the same "
            reason += "Message-ID"
            subject, thread_index = original.subject, original.thread_index
        elif event_id in generated:
            rule = (
                "an inbox rule"
                if generated[event_id].source.upper() == ("MAILBOXRULE")
                else "a transport rule"
            )
            reason = f"The message trace shows {rule} generating {event_id} from "
            reason += "the original"
            subject, thread_index = event.subject or original.subject, None
        else:
            continue
        # REDIRECT and EXPAND rows name the recipient they replace, and a plain
        # delivery of the same id came from its sender.
        fallback = event.sender if event_id == target and event.sender else mailbox
        source = (event.related_recipient or fallback).lower()
        if _is_original_delivery(mailbox, target, event_id, event):
            continue
        for recipient in event.recipients:
            address = recipient.lower()
            if address in (mailbox.lower(), source) or (address, event_id) in matches:
                continue
            matches[(address, event_id)] = Match(
                from_mailbox=source,
                to_mailbox=address,
                message_id=event_id,
                evidence=Evidence("definitive", f"{reason} to {address}."),
                external=not is_internal(address),
                subject=subject,
                sent_at=event.at,
                thread_index=thread_index,
            )
    return list(matches.values())


def _is_original_delivery(
    mailbox: str, target: str, event_id: str, event: TraceEvent
) -> bool:
    """Return whether a trace row delivers the traced message from its first sender.

    A trace by Message-ID lists the delivery to every original recipient of a bulk
    message. Such a row names no recipient it replaces and was not sent by the
    searched mailbox, so it shows no forward by that mailbox. A redirect that a
    platform logs as a plain delivery from the first sender (Graph message traces
    do) looks the same, so the mailbox's redirect rules have to find it.
    """
    if event_id != target or event.related_recipient:
        return False
    return not event.sender or event.sender.lower() != mailbox.lower()


def _same_id(value: str, target: str) -> bool:
    return bare_message_id(value) == target


def strongest(matches: Iterable[Match]) -> list[Match]:
    """Keep, for each (recipient, Message-ID), the match with the strongest evidence."""
    best: dict[tuple[str, str], Match] = {}
    for match in matches:
        key = (match.to_mailbox, match.message_id)
        current = best.get(key)
        if (
            current is None
            or CONFIDENCE_RANK[match.evidence.confidence]
            > (CONFIDENCE_RANK[current.evidence.confidence])
        ):
            best[key] = match
    return list(best.values())
