"""The whole pipeline on the real broker, against the Graph simulator."""

from __future__ import annotations

import io
import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fastavro
import pytest
from confluent_kafka import Consumer

from autopull.streams.ingest import Input, RawSender, raw_alert
from autopull.streams.settings import Settings
from autopull.streams.topics import ensure_topics, full_name

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

REPO_ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = REPO_ROOT / "schemas"
PHISH_ALERT = REPO_ROOT / "examples" / "alerts" / "tap-delivered-phish.json"
PHISH_ID = "20261201093000.1234.invoice@billing-example.net"
PHISH_HEADER = f"<{PHISH_ID}>"
RECIPIENTS = ["alice@example.com", "bob@example.com", "carol@example.com"]
MALFORMED = b'{"messagesDelivered": [{"GUID": 5, "recipient": "not a list"'
HIDDEN_FOLDER = "Autopull Quarantine"


def read_topic(
    settings: Settings,
    topic: str,
    done: Callable[[list[bytes]], bool],
    timeout: float = 120.0,
) -> list[bytes]:
    """Read raw values of `topic` from its start until `done` holds or time runs out."""
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"test-reader-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([full_name(settings, topic)])
    values: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while not done(values) and time.monotonic() < deadline:
            for message in consumer.consume(num_messages=100, timeout=0.5):
                if message.error() is None and message.value() is not None:
                    values.append(message.value())
    finally:
        consumer.close()
    return values


def decode_single_object(data: bytes, schema_file: Path) -> dict[str, object]:
    """Decode Avro single-object encoding the way a SIEM would, without our codec."""
    schema = json.loads(schema_file.read_text())
    parsed = fastavro.parse_schema(schema)
    canonical = fastavro.schema.to_parsing_canonical_form(parsed)
    fingerprint = bytes.fromhex(fastavro.schema.fingerprint(canonical, "CRC-64-AVRO"))

    assert data[:2] == b"\xc3\x01"
    assert data[2:10] == fingerprint
    body = io.BytesIO(data[10:])
    record: dict[str, object] = fastavro.schemaless_reader(body, parsed)
    return record


def ingest(settings: Settings, bodies: list[tuple[str, bytes]]) -> None:
    sender = RawSender(settings)
    for name, body in bodies:
        sender.send(raw_alert(Input(name, body), None, "test"))
    sender.flush()


def test_tap_alert_quarantines_three_mailboxes(
    pipeline_settings: Settings, graph_sim: Any, start_worker: Any
) -> None:
    ensure_topics(pipeline_settings)
    start_worker()
    ingest(
        pipeline_settings,
        [("malformed.json", MALFORMED), ("phish.json", PHISH_ALERT.read_bytes())],
    )

    values = read_topic(pipeline_settings, "pull.outcomes", lambda v: len(v) >= 3)
    outcomes = [decode_single_object(v, SCHEMAS / "PullOutcome.avsc") for v in values]
    assert sorted(o["mailbox"] for o in outcomes) == RECIPIENTS
    assert {o["status"] for o in outcomes} == {"quarantined"}
    assert {o["message_id"] for o in outcomes} == {PHISH_ID}
    assert {o["platform"] for o in outcomes} == {"graph"}

    for mailbox in RECIPIENTS:
        copies = [
            m
            for m in graph_sim.messages(mailbox)
            if m["internet_message_id"] == PHISH_HEADER
        ]
        assert [c["folder"] for c in copies] == [HIDDEN_FOLDER], mailbox
        assert copies[0]["hidden_folder"] is True
    evidence = [
        m
        for m in graph_sim.messages("quarantine@example.com")
        if m["internet_message_id"] == PHISH_HEADER
    ]
    assert len(evidence) == 1
    assert str(evidence[0]["folder"]).startswith("INC-")


def test_malformed_alert_becomes_dead_letter(
    pipeline_settings: Settings, graph_sim: Any, start_worker: Any
) -> None:
    ensure_topics(pipeline_settings)
    start_worker()
    ingest(
        pipeline_settings,
        [("malformed.json", MALFORMED), ("phish.json", PHISH_ALERT.read_bytes())],
    )

    values = read_topic(pipeline_settings, "alerts.dead", lambda v: len(v) >= 1)
    letters = [decode_single_object(v, SCHEMAS / "DeadLetter.avsc") for v in values]
    assert len(letters) == 1
    assert letters[0]["body"] == MALFORMED
    assert letters[0]["stage"] == "normalize"
    assert "JSON" in str(letters[0]["reason"])

    outcomes = read_topic(pipeline_settings, "pull.outcomes", lambda v: len(v) >= 3)
    assert len(outcomes) == 3


def mixed_body() -> bytes:
    """Return a TAP body with an invalid event before a valid one."""
    document: dict[str, Any] = json.loads(PHISH_ALERT.read_text())
    clean = document["messagesDelivered"][0]
    clean["subject"] = "Invoice 4471\u2028overdue"
    bad = json.loads(json.dumps(clean))
    bad["id"] = "bad-event-1"
    bad["GUID"] = "badGuid1"
    bad["messageID"] = "<other.message@example.net>"
    bad["recipient"] = ["alice@example.com\u2028Bcc: eve@example.net"]
    document["messagesDelivered"] = [bad, clean]
    return json.dumps(document).encode()


def test_tap_invalid_event_rest_pulled(
    pipeline_settings: Settings, graph_sim: Any, start_worker: Any
) -> None:
    ensure_topics(pipeline_settings)
    start_worker()
    body = mixed_body()
    ingest(pipeline_settings, [("mixed.json", body)])

    values = read_topic(pipeline_settings, "pull.outcomes", lambda v: len(v) >= 3)
    outcomes = [decode_single_object(v, SCHEMAS / "PullOutcome.avsc") for v in values]
    assert sorted(o["mailbox"] for o in outcomes) == RECIPIENTS
    assert {o["status"] for o in outcomes} == {"quarantined"}
    assert {o["message_id"] for o in outcomes} == {PHISH_ID}
    for mailbox in RECIPIENTS:
        copies = [
            m
            for m in graph_sim.messages(mailbox)
            if m["internet_message_id"] == PHISH_HEADER
        ]
        assert [c["folder"] for c in copies] == [HIDDEN_FOLDER], mailbox

    dead = read_topic(pipeline_settings, "alerts.dead", lambda v: len(v) >= 1)
    letters = [decode_single_object(v, SCHEMAS / "DeadLetter.avsc") for v in dead]
    assert len(letters) == 1
    assert letters[0]["body"] == body
    assert letters[0]["stage"] == "normalize"
    reason = str(letters[0]["reason"])
    assert "The event messagesDelivered[0] (id 'bad-event-1'" in reason
    assert "messagesDelivered[0].recipient" in reason
