"""Forward evidence: every kind, strongest first, and the decoys that must not match."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta

import pytest

from autopull.connectors.mail.base import ForwardingRule, SentMessage, TraceEvent
from autopull.streams.forwards import (
    Match,
    Payload,
    TracedMessage,
    forward_evidence,
    is_thread_index_child,
    matches_from_rules,
    matches_from_sent,
    matches_from_trace,
    strip_forward_prefixes,
    strongest,
)

DELIVERED = datetime(2026, 12, 1, 9, 30, tzinfo=UTC)
ORIGINAL_ID = "20261201093000.1234.invoice@billing-example.net"
BAD_URL = "http://billing-example.net/pay/4471"
BAD_HASH = "a" * 64
THREAD_ROOT = base64.b64encode(bytes(range(22))).decode()
THREAD_CHILD = base64.b64encode(bytes(range(22)) + b"\x01\x02\x03\x04\x05").decode()
OTHER_THREAD = base64.b64encode(bytes(range(1, 23)) + b"\x01\x02\x03\x04\x05").decode()

ORIGINAL = TracedMessage(
    message_id=ORIGINAL_ID,
    delivered_at=DELIVERED,
    subject="Invoice 4471 overdue",
    thread_index=THREAD_ROOT,
)
PAYLOAD = Payload(urls=frozenset({BAD_URL}), attachment_hashes=frozenset({BAD_HASH}))


def sent(**fields: object) -> SentMessage:
    values: dict[str, object] = {
        "mailbox": "alice@example.com",
        "message_id": "fwd-1@example.com",
        "sent_at": DELIVERED + timedelta(minutes=5),
        "recipients": ("bob@example.com",),
        "subject": "FW: Invoice 4471 overdue",
    }
    values.update(fields)
    return SentMessage(**values)  # type: ignore[arg-type]


def internal(address: str) -> bool:
    return address.endswith("@example.com") or address.endswith("@corp.example.org")


def test_attached_original_is_definitive() -> None:
    evidence = forward_evidence(
        ORIGINAL, PAYLOAD, sent(attached_message_ids=(ORIGINAL_ID,))
    )
    assert evidence is not None
    assert evidence.confidence == "definitive"
    assert "message/rfc822" in evidence.reason


def test_forwarded_message_id_is_definitive() -> None:
    header = {"X-Forwarded-Message-Id": f" <{ORIGINAL_ID}>"}
    evidence = forward_evidence(ORIGINAL, Payload(), sent(headers=header))
    assert evidence is not None
    assert evidence.confidence == "definitive"


def test_references_with_payload_is_strong() -> None:
    headers = {"References": f"<r1@example.net>\r\n <{ORIGINAL_ID}>"}
    message = sent(headers=headers, urls=(BAD_URL,), subject="RE: other")
    evidence = forward_evidence(ORIGINAL, PAYLOAD, message)
    assert evidence is not None
    assert evidence.confidence == "strong"
    assert "References" in evidence.reason


def test_in_reply_to_with_attachment_is_strong() -> None:
    headers = {"In-Reply-To": f"<{ORIGINAL_ID}>"}
    message = sent(headers=headers, attachment_hashes=(BAD_HASH,))
    evidence = forward_evidence(ORIGINAL, PAYLOAD, message)
    assert evidence is not None
    assert evidence.confidence == "strong"


def test_reply_without_payload_is_not_matched() -> None:
    headers = {"In-Reply-To": f"<{ORIGINAL_ID}>", "References": f"<{ORIGINAL_ID}>"}
    reply = sent(headers=headers, subject="RE: Invoice 4471 overdue")
    assert forward_evidence(ORIGINAL, PAYLOAD, reply) is None


def test_reply_quoting_text_without_url_is_not_matched() -> None:
    # The quote repeats the prose of the original but not its link.
    headers = {"In-Reply-To": f"<{ORIGINAL_ID}>", "Thread-Index": THREAD_CHILD}
    reply = sent(
        headers=headers,
        subject="RE: Invoice 4471 overdue",
        urls=("https://intranet.example.com/finance",),
    )
    assert forward_evidence(ORIGINAL, PAYLOAD, reply) is None


def test_reply_quoting_the_url_is_strong() -> None:
    # A quote that keeps the live link carries the payload.
    headers = {"In-Reply-To": f"<{ORIGINAL_ID}>"}
    reply = sent(headers=headers, subject="RE: Invoice 4471 overdue", urls=(BAD_URL,))
    evidence = forward_evidence(ORIGINAL, PAYLOAD, reply)
    assert evidence is not None
    assert evidence.confidence == "strong"


def test_attachment_hash_alone_is_strong() -> None:
    message = sent(subject="see this", attachment_hashes=(BAD_HASH, "b" * 64))
    evidence = forward_evidence(ORIGINAL, PAYLOAD, message)
    assert evidence is not None
    assert evidence.confidence == "strong"
    assert BAD_HASH in evidence.reason


def test_thread_index_with_url_is_strong() -> None:
    message = sent(
        subject="look", headers={"Thread-Index": THREAD_CHILD}, urls=(BAD_URL,)
    )
    evidence = forward_evidence(ORIGINAL, PAYLOAD, message)
    assert evidence is not None
    assert evidence.confidence == "strong"
    assert "Thread-Index" in evidence.reason


def test_thread_index_without_payload_is_not_matched() -> None:
    message = sent(headers={"Thread-Index": THREAD_CHILD})
    assert forward_evidence(ORIGINAL, PAYLOAD, message) is None


@pytest.mark.parametrize(
    "subject",
    [
        "FW: Invoice 4471 overdue",
        "Fwd: Invoice 4471 overdue",
        "WG: Invoice 4471 overdue",
        "TR: Invoice 4471 overdue",
        "RV: Invoice 4471 overdue",
        "VS: Invoice 4471 overdue",
        "Doorst: Invoice 4471 overdue",
        "FW: RE: Fwd:  invoice   4471 OVERDUE",
        "[EXTERNAL] FW: Invoice 4471 overdue",
    ],
)
def test_subject_with_url_is_medium(subject: str) -> None:
    message = sent(subject=subject, urls=(BAD_URL,))
    evidence = forward_evidence(ORIGINAL, PAYLOAD, message)
    assert evidence is not None
    assert evidence.confidence == "medium"


def test_same_subject_without_payload_is_not_matched() -> None:
    decoy = sent(subject="FW: Invoice 4471 overdue", urls=("https://example.com/",))
    assert forward_evidence(ORIGINAL, PAYLOAD, decoy) is None


def test_url_with_other_subject_is_not_matched() -> None:
    message = sent(subject="Lunch on Friday?", urls=(BAD_URL,))
    assert forward_evidence(ORIGINAL, PAYLOAD, message) is None


def test_own_copy_is_not_a_forward() -> None:
    message = sent(message_id=ORIGINAL_ID, attached_message_ids=(ORIGINAL_ID,))
    assert forward_evidence(ORIGINAL, PAYLOAD, message) is None


def test_strip_prefixes_keeps_inner_words() -> None:
    assert strip_forward_prefixes("FW: Re: TRaining plan") == "training plan"
    assert strip_forward_prefixes("Fwd[2]: report") == "report"
    assert strip_forward_prefixes("Reminder: report") == "reminder: report"
    assert strip_forward_prefixes(None) == ""


def test_thread_index_child_rules() -> None:
    assert is_thread_index_child(THREAD_ROOT, THREAD_CHILD)
    assert not is_thread_index_child(THREAD_ROOT, THREAD_ROOT)
    assert not is_thread_index_child(THREAD_ROOT, OTHER_THREAD)
    assert not is_thread_index_child(THREAD_ROOT, "not base64!")
    assert not is_thread_index_child(None, THREAD_CHILD)
    short = base64.b64encode(bytes(range(22)) + b"\x01\x02").decode()
    assert not is_thread_index_child(THREAD_ROOT, short)


def test_sent_matches_one_per_recipient() -> None:
    message = sent(
        recipients=("bob@example.com", "eve@example.net", "alice@example.com"),
        attached_message_ids=(ORIGINAL_ID,),
    )
    matches = matches_from_sent(
        "alice@example.com", ORIGINAL, PAYLOAD, [message], internal
    )
    assert [(m.to_mailbox, m.external) for m in matches] == [
        ("bob@example.com", False),
        ("eve@example.net", True),
    ]
    assert all(m.message_id == "fwd-1@example.com" for m in matches)
    assert all(m.from_mailbox == "alice@example.com" for m in matches)


def test_sent_before_delivery_is_ignored() -> None:
    earlier = sent(
        sent_at=DELIVERED - timedelta(minutes=1), attached_message_ids=(ORIGINAL_ID,)
    )
    assert (
        matches_from_sent("alice@example.com", ORIGINAL, PAYLOAD, [earlier], internal)
        == []
    )


def test_forward_to_external_is_reported_external() -> None:
    message = sent(recipients=("friend@example.net",), urls=(BAD_URL,))
    matches = matches_from_sent(
        "alice@example.com", ORIGINAL, PAYLOAD, [message], internal
    )
    assert len(matches) == 1
    assert matches[0].external
    assert matches[0].evidence.confidence == "medium"


def test_rules_keep_the_message_id() -> None:
    rules = [ForwardingRule("alice@example.com", ("dave@example.com",), "redirect")]
    matches = matches_from_rules("alice@example.com", ORIGINAL, rules, internal)
    assert len(matches) == 1
    assert matches[0].message_id == ORIGINAL_ID
    assert matches[0].to_mailbox == "dave@example.com"
    assert matches[0].evidence.confidence == "definitive"


def trace(event: str, **fields: object) -> TraceEvent:
    values: dict[str, object] = {
        "message_id": ORIGINAL_ID,
        "event": event,
        "at": DELIVERED + timedelta(seconds=3),
        "source": "STOREDRIVER",
        "sender": "billing@example.net",
    }
    values.update(fields)
    return TraceEvent(**values)  # type: ignore[arg-type]


def test_forward_rules_are_not_same_id() -> None:
    rules = [ForwardingRule("alice@example.com", ("dave@example.com",), "forward")]
    assert matches_from_rules("alice@example.com", ORIGINAL, rules, internal) == []


def test_trace_redirect_is_definitive() -> None:
    events = [
        trace(
            "RECEIVE",
            source="SMTP",
            recipients=("alice@example.com",),
            internal_message_id="4711",
        ),
        trace("DELIVER", recipients=("alice@example.com",), internal_message_id="4711"),
        trace(
            "REDIRECT",
            source="ROUTING",
            recipients=("dave@example.com",),
            related_recipient="alice@example.com",
        ),
        trace("DELIVER", recipients=("dave@example.com",)),
    ]
    matches = matches_from_trace("alice@example.com", ORIGINAL, events, internal)
    assert [(m.from_mailbox, m.to_mailbox, m.message_id) for m in matches] == [
        ("alice@example.com", "dave@example.com", ORIGINAL_ID)
    ]
    assert matches[0].evidence.confidence == "definitive"
    assert "REDIRECT" in matches[0].evidence.reason


def test_trace_expand_of_list() -> None:
    events = [
        trace(
            "EXPAND",
            source="ROUTING",
            recipients=("gina@example.com", "hal@example.com"),
            related_recipient="finance@example.com",
        ),
    ]
    matches = matches_from_trace("alice@example.com", ORIGINAL, events, internal)
    assert {m.to_mailbox for m in matches} == {"gina@example.com", "hal@example.com"}
    assert {m.from_mailbox for m in matches} == {"finance@example.com"}


def test_trace_inbox_rule_generated_message() -> None:
    events = [
        trace("DELIVER", recipients=("alice@example.com",), internal_message_id="4711"),
        trace(
            "RECEIVE",
            message_id="rule-fwd@example.com",
            source="MAILBOXRULE",
            reference="4711",
            sender="alice@example.com",
            recipients=("ivan@example.com",),
            subject="FW: Invoice 4471 overdue",
        ),
        trace(
            "DELIVER",
            message_id="rule-fwd@example.com",
            source="STOREDRIVER",
            recipients=("ivan@example.com",),
        ),
        trace(
            "DELIVER",
            message_id="unrelated@example.com",
            recipients=("kim@example.com",),
        ),
    ]
    matches = matches_from_trace("alice@example.com", ORIGINAL, events, internal)
    assert [(m.to_mailbox, m.message_id) for m in matches] == [
        ("ivan@example.com", "rule-fwd@example.com")
    ]
    assert "inbox rule" in matches[0].evidence.reason


def test_trace_transport_rule_copy() -> None:
    events = [
        trace(
            "RECEIVE",
            message_id="journal@example.com",
            source="AGENT",
            reference=f"<{ORIGINAL_ID}>",
            recipients=(),
        ),
        trace(
            "DELIVER",
            message_id="journal@example.com",
            recipients=("audit@example.com",),
        ),
    ]
    matches = matches_from_trace("alice@example.com", ORIGINAL, events, internal)
    assert [m.to_mailbox for m in matches] == ["audit@example.com"]
    assert "transport rule" in matches[0].evidence.reason


BULK_RECIPIENTS = tuple(
    f"{name}@example.com" for name in ("alice", "bob", "carol", "dan", "erin")
)


def bulk_trace() -> list[TraceEvent]:
    """A trace by Message-ID: five original deliveries and one redirect by alice."""
    events = [trace("DELIVER", recipients=(r,)) for r in BULK_RECIPIENTS]
    events.append(
        trace(
            "REDIRECT",
            source="ROUTING",
            recipients=("dave@example.com",),
            related_recipient="alice@example.com",
        )
    )
    events.append(trace("DELIVER", recipients=("dave@example.com",)))
    return events


@pytest.mark.parametrize("mailbox", BULK_RECIPIENTS)
def test_trace_skips_original_deliveries(mailbox: str) -> None:
    matches = matches_from_trace(mailbox, ORIGINAL, bulk_trace(), internal)
    found = [(m.from_mailbox, m.to_mailbox, m.message_id) for m in matches]
    # Every mailbox's trace shows the redirect, and no original delivery counts.
    assert found == [("alice@example.com", "dave@example.com", ORIGINAL_ID)]


def test_trace_original_delivery_without_sender() -> None:
    events = [trace("DELIVER", sender="", recipients=("bob@example.com",))]
    assert matches_from_trace("alice@example.com", ORIGINAL, events, internal) == []


def test_trace_delivery_sent_by_mailbox() -> None:
    # The searched mailbox sent the same Message-ID on, as a resend keeps it.
    events = [
        trace(
            "DELIVER",
            sender="Alice@Example.com",
            recipients=("alice@example.com", "ivan@example.com"),
        )
    ]
    matches = matches_from_trace("alice@example.com", ORIGINAL, events, internal)
    found = [(m.from_mailbox, m.to_mailbox) for m in matches]
    assert found == [("alice@example.com", "ivan@example.com")]
    assert matches[0].evidence.confidence == "definitive"


def test_trace_ignores_other_messages() -> None:
    events = [
        trace("DELIVER", message_id="other@example.com", recipients=("x@example.com",))
    ]
    assert matches_from_trace("alice@example.com", ORIGINAL, events, internal) == []


def test_strongest_keeps_best_evidence() -> None:
    weak = forward_evidence(ORIGINAL, PAYLOAD, sent(urls=(BAD_URL,)))
    best = forward_evidence(
        ORIGINAL, PAYLOAD, sent(attached_message_ids=(ORIGINAL_ID,))
    )
    assert weak is not None and best is not None
    first = Match("alice@example.com", "bob@example.com", "m2", weak)
    second = Match("alice@example.com", "bob@example.com", "m2", best)
    kept = strongest([first, second])
    assert len(kept) == 1
    assert kept[0].evidence.confidence == "definitive"
