"""Exchange message tracking logs in both CSV forms."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from autopull.connectors.errors import PermanentError
from autopull.connectors.mail.tracking import (
    TrackingLogDirectory,
    parse_tracking_log,
    related_events,
)

FIELDS = (
    "date-time,client-ip,source,event-id,internal-message-id,message-id,"
    "recipient-address,related-recipient-address,reference,message-subject,"
    "sender-address"
)
ROWS = [
    ("2026-12-01T09:30:04.120Z", "192.0.2.44", "SMTP", "RECEIVE", "4711",
     "<orig@example.net>", "alice@example.com", "", "", "Invoice 4471",
     "billing@example.net"),
    ("2026-12-01T09:30:05.000Z", "", "STOREDRIVER", "DELIVER", "4711",
     "<orig@example.net>", "alice@example.com;bob@example.com", "", "",
     "Invoice 4471", "billing@example.net"),
    ("2026-12-01T09:30:05.500Z", "", "ROUTING", "REDIRECT", "4711",
     "<orig@example.net>", "dave@example.com", "alice@example.com", "",
     "Invoice 4471", "billing@example.net"),
    ("2026-12-01T09:31:00.000Z", "", "MAILBOXRULE", "RECEIVE", "4790",
     "<rule-fwd@example.com>", "ivan@example.com", "", "4711", "FW: Invoice 4471",
     "alice@example.com"),
    ("2026-12-01T09:31:01.000Z", "", "STOREDRIVER", "DELIVER", "4790",
     "<rule-fwd@example.com>", "ivan@example.com", "", "", "FW: Invoice 4471",
     "alice@example.com"),
    ("2026-12-01T09:40:00.000Z", "", "STOREDRIVER", "DELIVER", "4800",
     "<other@example.com>", "kim@example.com", "", "", "Lunch", "lee@example.com"),
]  # fmt: skip
MSGTRK = (
    "#Software: Microsoft Exchange Server\n"
    "#Version: 15.02.1544.004\n"
    "#Log-type: Message Tracking Log\n"
    "#Date: 2026-12-01T09:00:00.000Z\n"
    f"#Fields: {FIELDS}\n" + "".join(",".join(row) + "\n" for row in ROWS)
)
EXPORTED = (
    "Timestamp,EventId,Source,Sender,Recipients,MessageSubject,MessageId,"
    "InternalMessageId,RelatedRecipientAddress,Reference\n"
    "2026-12-01T09:30:05Z,EXPAND,ROUTING,billing@example.net,"
    "gina@example.com;hal@example.com,Invoice 4471,<orig@example.net>,4711,"
    "finance@example.com,\n"
)


def test_parse_msgtrk_fields() -> None:
    events = parse_tracking_log(MSGTRK, "MSGTRK2026120109-1.LOG")
    assert len(events) == 6
    first = events[0]
    assert first.message_id == "orig@example.net"
    assert first.event == "RECEIVE"
    assert first.source == "SMTP"
    assert first.at == datetime(2026, 12, 1, 9, 30, 4, 120000, tzinfo=UTC)
    assert first.internal_message_id == "4711"
    assert events[1].recipients == ("alice@example.com", "bob@example.com")
    assert events[2].related_recipient == "alice@example.com"
    assert events[3].reference == "4711"
    assert events[3].subject == "FW: Invoice 4471"


def test_parse_exported_form() -> None:
    events = parse_tracking_log(EXPORTED, "export.csv")
    assert len(events) == 1
    assert events[0].event == "EXPAND"
    assert events[0].recipients == ("gina@example.com", "hal@example.com")
    assert events[0].related_recipient == "finance@example.com"


def test_missing_column_names_file() -> None:
    with pytest.raises(PermanentError, match="no column for message_id") as caught:
        parse_tracking_log("Timestamp,EventId\n2026-12-01T09:30:05Z,DELIVER\n", "x.csv")
    assert "x.csv" in str(caught.value)


def test_bad_time_names_row() -> None:
    text = "Timestamp,EventId,MessageId\nyesterday,DELIVER,<a@b>\n"
    with pytest.raises(PermanentError, match=r"Row 1 .*'yesterday'"):
        parse_tracking_log(text, "x.csv")


def test_related_events_follow_rule_reference() -> None:
    events = parse_tracking_log(MSGTRK)
    related = related_events(events, "orig@example.net")
    ids = [event.message_id for event in related]
    assert ids.count("orig@example.net") == 3
    assert ids.count("rule-fwd@example.com") == 2
    assert "other@example.com" not in ids


def test_directory_reads_every_log(tmp_path: Path) -> None:
    (tmp_path / "MSGTRK1.LOG").write_text(MSGTRK, encoding="utf-8")
    (tmp_path / "export.csv").write_text(EXPORTED, encoding="utf-8")
    (tmp_path / "notes.txt").write_text("ignored", encoding="utf-8")
    logs = TrackingLogDirectory(tmp_path)
    since = datetime(2026, 12, 1, 9, 30, 5, tzinfo=UTC)
    events = logs.events("orig@example.net", since)
    assert {event.event for event in events} == {
        "DELIVER",
        "REDIRECT",
        "RECEIVE",
        "EXPAND",
    }
    assert all(event.at >= since for event in events)


def test_directory_missing_is_clear(tmp_path: Path) -> None:
    logs = TrackingLogDirectory(tmp_path / "nope")
    with pytest.raises(PermanentError, match="does not exist"):
        logs.events("a@b", datetime(2026, 1, 1, tzinfo=UTC))
