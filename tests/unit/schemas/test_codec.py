"""Encoding and decoding of every record, both wire formats and the errors."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import fastavro
import pytest
from fastavro.schema import to_parsing_canonical_form
from hypothesis import given, settings
from hypothesis import strategies as st

from autopull.schemas import (
    AvroCodec,
    SchemaError,
    build_record_schema,
    catalog,
    decode,
    encode,
    encode_framed,
    schema_fingerprint,
    topic_subject,
    writer_schema,
)

SCHEMA_DIRECTORY = Path(__file__).resolve().parents[3] / "schemas"

RECEIVED = datetime(2025, 3, 4, 9, 15, 30, 123000, tzinfo=UTC)
DELIVERED = RECEIVED - timedelta(minutes=7)
STARTED = RECEIVED + timedelta(seconds=40)
FINISHED = RECEIVED + timedelta(seconds=42, milliseconds=500)

MESSAGE_ID = "CAKx9w1c3@mail.example.net"
MAILBOX = "jane.doe@corp.example.com"
INCIDENT_ID = "inc-2025-03-04-0007"

RAW_ALERT: dict[str, Any] = {
    "source": "tap",
    "source_alert_id": "f6a1c7f2-9b1e-4d0a-8a8e-0d3f5c2b7e11",
    "received_at": RECEIVED,
    "content_type": "application/json",
    "transport": {"transport": "tap-poller", "remote_addr": "127.0.0.1"},
    "body": b'{"messagesDelivered": []}',
}

NORMALIZED_ALERT: dict[str, Any] = {
    "alert_id": "tap:f6a1c7f2-9b1e-4d0a-8a8e-0d3f5c2b7e11",
    "source": "tap",
    "source_alert_id": "f6a1c7f2-9b1e-4d0a-8a8e-0d3f5c2b7e11",
    "event_class": "message_delivered",
    "received_at": RECEIVED,
    "occurred_at": DELIVERED,
    "message_id": MESSAGE_ID,
    "message_id_synthetic": False,
    "source_guid": "c26dbea0-80d5-463b-b93c-4e8b708219ce",
    "sender": "billing@invoices.example.org",
    "header_from": '"Billing" <billing@invoices.example.org>',
    "sender_ip": "192.0.2.44",
    "subject": "Invoice 4471 overdue",
    "recipients": [MAILBOX, "finance@corp.example.com"],
    "delivered_at": DELIVERED,
    "classification": "phish",
    "threat_status": "active",
    "severity": "high",
    "campaign_id": "46e01b8a-c899-404d-bcd9-189bb393d1a7",
    "threats": [
        {
            "threat_id": "2fab740f143fc1aa4c1cd0146d334c55",
            "kind": "url",
            "value": "https://invoices.example.org/pay",
            "classification": "phish",
            "status": "active",
            "url": "https://threatinsight.example.com/threat/2fab740f",
        }
    ],
    "urls": ["https://invoices.example.org/pay"],
    "attachments": [
        {
            "name": "invoice.pdf",
            "content_type": "application/pdf",
            "md5": "d41d8cd98f00b204e9800998ecf8427e",
            "sha256": None,
        }
    ],
    "scores": {"phish": 100.0, "spam": 12.5},
    "clicker": None,
    "click_ip": None,
    "custom_fields": {"policy": "default_inbound"},
}

ENRICHED_ALERT: dict[str, Any] = {
    "alert": NORMALIZED_ALERT,
    "campaign_key": "46e01b8a-c899-404d-bcd9-189bb393d1a7",
    "intel_hits": [
        {
            "indicator": "invoices.example.org",
            "kind": "host",
            "source": "blocklist",
            "confidence": 90,
        }
    ],
    "recipients": [
        {
            "address": "finance@corp.example.com",
            "mailbox": MAILBOX,
            "recipient_type": "list_member",
            "path": ["finance@corp.example.com"],
            "vip": True,
            "attributes": {"department": "Finance"},
        }
    ],
    "unavailable": ["ldap"],
}

PULL_COMMAND: dict[str, Any] = {
    "command_id": f"{INCIDENT_ID}:quarantine:{MAILBOX}:{MESSAGE_ID}",
    "incident_id": INCIDENT_ID,
    "kind": "quarantine",
    "mailbox": MAILBOX,
    "message_id": MESSAGE_ID,
    "alert_id": NORMALIZED_ALERT["alert_id"],
    "alert_received_at": RECEIVED,
    "issued_at": RECEIVED + timedelta(seconds=2),
    "recipient_type": "original",
    "reason": "policy quarantine-phish matched",
    "attempt": 2,
    "not_before": RECEIVED + timedelta(minutes=1),
    "search": {
        "senders": ["billing@invoices.example.org"],
        "subject": "Invoice 4471 overdue",
        "received_after": RECEIVED - timedelta(minutes=10),
        "received_before": RECEIVED + timedelta(minutes=10),
    },
    "resolved_message_id": None,
}

PULL_OUTCOME: dict[str, Any] = {
    "command_id": PULL_COMMAND["command_id"],
    "incident_id": INCIDENT_ID,
    "kind": "quarantine",
    "mailbox": MAILBOX,
    "message_id": MESSAGE_ID,
    "status": "quarantined",
    "platform": "graph",
    "copies": 2,
    "original_folder": "Inbox",
    "read": False,
    "attempts": 1,
    "started_at": STARTED,
    "finished_at": FINISHED,
    "seconds_from_alert": 42.5,
    "error_class": "none",
    "error": None,
    "recipient_type": "original",
    "alert_id": NORMALIZED_ALERT["alert_id"],
    "retry_at": None,
    "resolved_message_id": "CAF4n9.remittance@invoices.example.org",
    "candidates": [
        {
            "message_id": "CAF4n9.remittance@invoices.example.org",
            "folder": "Inbox",
            "subject": "Invoice 4471 overdue",
            "sender": "billing@invoices.example.org",
            "received_at": RECEIVED,
        }
    ],
    "mailbox_missing": False,
}

FORWARD_FINDING: dict[str, Any] = {
    "incident_id": INCIDENT_ID,
    "from_mailbox": MAILBOX,
    "to_mailbox": "john.roe@corp.example.com",
    "message_id": "BN8PR11MB3650@outlook.example.com",
    "original_message_id": MESSAGE_ID,
    "evidence": "X-Forwarded-Message-Id carries the original Message-ID",
    "confidence": "definitive",
    "depth": 1,
    "found_at": FINISHED,
    "external": False,
    "subject": "FW: Invoice 4471 overdue",
    "sent_at": STARTED,
    "thread_index": "AQHZ",
}

INCIDENT: dict[str, Any] = {
    "incident_id": INCIDENT_ID,
    "state": "contained",
    "created_at": RECEIVED,
    "updated_at": FINISHED,
    "campaign_key": ENRICHED_ALERT["campaign_key"],
    "title": "Invoice 4471 overdue",
    "classification": "phish",
    "score": 100,
    "score_factors": {"classification": 40, "campaign_size": 5},
    "sources": ["tap"],
    "alert_ids": [NORMALIZED_ALERT["alert_id"]],
    "message_ids": [MESSAGE_ID],
    "targets": [MAILBOX],
    "attackers": ["billing@invoices.example.org"],
    "pulls": [
        {
            "mailbox": MAILBOX,
            "message_id": MESSAGE_ID,
            "action": "pull",
            "rule": "quarantine-phish",
            "reason": "classification phish",
            "recipient_type": "original",
            "vip": True,
            "alert_id": NORMALIZED_ALERT["alert_id"],
            "status": "quarantined",
            "platform": "graph",
            "original_folder": "Inbox",
            "read": False,
            "attempts": 1,
            "started_at": STARTED,
            "finished_at": FINISHED,
            "seconds_from_alert": 42.5,
            "undone": False,
            "error": None,
            "search": None,
            "resolved_message_id": None,
            "candidates": [],
            "withdrawn": False,
            "traced": True,
            "mailbox_missing": False,
            "trace_attempts": 1,
            "trace_error": "Graph was unavailable for the sent items (503).",
            "trace_failed": False,
            "trace_round": 0,
        }
    ],
    "history": [
        {
            "at": RECEIVED,
            "what": "created",
            "detail": "alert tap:f6a1c7f2 joined",
            "actor": "autopull",
        }
    ],
    "custom_fields": {"ticket": "SEC-1182"},
    "payload_urls": ["http://invoices.example.org/pay"],
    "payload_hashes": ["a" * 64],
    "traced_messages": [
        {
            "message_id": MESSAGE_ID,
            "delivered_at": RECEIVED,
            "subject": "Invoice 4471 overdue",
            "thread_index": None,
            "depth": 0,
        }
    ],
    "forwards": [
        {
            "from_mailbox": MAILBOX,
            "to_mailbox": "john.roe@corp.example.com",
            "message_id": "BN8PR11MB3650@outlook.example.com",
            "original_message_id": MESSAGE_ID,
            "evidence": "X-Forwarded-Message-Id carries the original Message-ID",
            "confidence": "definitive",
            "depth": 1,
            "found_at": FINISHED,
            "external": False,
            "action": "pull",
        }
    ],
}

EXPOSURE: dict[str, Any] = {
    "mailbox": MAILBOX,
    "window_start": datetime(2025, 3, 4, tzinfo=UTC),
    "window_end": datetime(2025, 3, 5, tzinfo=UTC),
    "messages": 3,
    "clicks": 1,
    "campaigns": 2,
}

INCIDENT_EVENT_ALERT: dict[str, Any] = {
    "incident_id": INCIDENT_ID,
    "kind": "alert_joined",
    "at": RECEIVED,
    "alert": ENRICHED_ALERT,
    "outcome": None,
    "finding": None,
    "command": None,
    "traced": None,
}

INCIDENT_EVENT_OUTCOME: dict[str, Any] = {
    "incident_id": INCIDENT_ID,
    "kind": "outcome",
    "at": FINISHED,
    "alert": None,
    "outcome": PULL_OUTCOME,
    "finding": FORWARD_FINDING,
    "command": {
        "action": "approve",
        "actor": "analyst@corp.example.com",
        "mailbox": MAILBOX,
        "message_id": MESSAGE_ID,
        "text": "confirmed phish",
    },
    "traced": {
        "mailbox": MAILBOX,
        "message_id": MESSAGE_ID,
        "findings": 1,
        "error": None,
    },
}

DEAD_LETTER: dict[str, Any] = {
    "source": "fireeye",
    "stage": "normalize",
    "reason": "The alert has no recipient: the FireEye alert must name one.",
    "body": b"<alerts><alert/></alerts>",
    "content_type": "application/xml",
    "received_at": RECEIVED,
    "failed_at": RECEIVED + timedelta(milliseconds=3),
    "origin_topic": "autopull.alerts.raw",
    "origin_partition": 3,
    "origin_offset": 81234,
    "transport": {"transport": "webhook"},
}

EXAMPLES = [
    ("RawAlert", RAW_ALERT),
    ("NormalizedAlert", NORMALIZED_ALERT),
    ("EnrichedAlert", ENRICHED_ALERT),
    ("PullCommand", PULL_COMMAND),
    ("PullOutcome", PULL_OUTCOME),
    ("ForwardFinding", FORWARD_FINDING),
    ("Incident", INCIDENT),
    ("IncidentEvent", INCIDENT_EVENT_ALERT),
    ("IncidentEvent", INCIDENT_EVENT_OUTCOME),
    ("DeadLetter", DEAD_LETTER),
    ("Exposure", EXPOSURE),
]


def rabin_fingerprint(data: bytes) -> int:
    """Compute CRC-64-AVRO as the Avro specification's reference code does."""
    empty = 0xC15D213AA4D7A795
    table = []
    for index in range(256):
        value = index
        for _ in range(8):
            value = (value >> 1) ^ (empty & -(value & 1))
        table.append(value)

    result = empty
    for byte in data:
        result = (result >> 8) ^ table[(result ^ byte) & 0xFF]
    return result


def with_field(value: dict[str, Any], name: str, item: Any) -> dict[str, Any]:
    return {**value, name: item}


# --- Round trips ----------------------------------------------------------------


def test_examples_cover_every_record() -> None:
    assert {name for name, _ in EXAMPLES} == set(catalog().current)


@pytest.mark.parametrize(
    ("record_name", "value"),
    EXAMPLES,
    ids=[f"{n}-{i}" for i, (n, _) in enumerate(EXAMPLES)],
)
def test_round_trip_returns_value(record_name: str, value: dict[str, Any]) -> None:
    data = encode(record_name, value)

    assert decode(record_name, data) == value


@pytest.mark.parametrize(
    ("record_name", "value"),
    EXAMPLES,
    ids=[f"{n}-{i}" for i, (n, _) in enumerate(EXAMPLES)],
)
def test_framed_round_trip_returns_value(
    record_name: str, value: dict[str, Any]
) -> None:
    record = catalog().record(record_name)
    data = encode_framed(record, 7, value)

    class KnownIds:
        def schema(self, schema_id: int) -> Any:
            assert schema_id == 7
            return record

    assert decode(record_name, data, KnownIds()) == value  # type: ignore[arg-type]


def test_decode_timestamps_returns_aware_utc() -> None:
    value = decode("PullOutcome", encode("PullOutcome", PULL_OUTCOME))

    assert value["started_at"].tzinfo is not None
    assert value["started_at"].utcoffset() == timedelta(0)


def test_encode_non_utc_timestamp_keeps_instant() -> None:
    paris = timezone(timedelta(hours=1))
    local = STARTED.astimezone(paris)

    value = decode(
        "PullOutcome",
        encode("PullOutcome", with_field(PULL_OUTCOME, "started_at", local)),
    )

    assert value["started_at"] == STARTED


def test_missing_defaulted_fields_decode_defaults() -> None:
    minimal = {
        key: PULL_COMMAND[key]
        for key in (
            "command_id",
            "incident_id",
            "kind",
            "mailbox",
            "message_id",
            "alert_id",
            "alert_received_at",
            "issued_at",
        )
    }

    value = decode("PullCommand", encode("PullCommand", minimal))

    assert value["attempt"] == 1
    assert value["reason"] == ""
    assert value["not_before"] is None


def test_record_full_name_accepted() -> None:
    data = encode("autopull.PullOutcome", PULL_OUTCOME)

    assert decode("autopull.PullOutcome", data) == PULL_OUTCOME


# --- Header bytes ---------------------------------------------------------------


def test_fingerprint_int_matches_published_value() -> None:
    # CRC-64-AVRO of the schema "int" is 0x7275d51a3f395c8f (Apache Avro's Ruby
    # tests); single-object encoding writes it little-endian.
    assert schema_fingerprint('"int"') == bytes.fromhex("8f5c393f1ad57572")
    assert rabin_fingerprint(b'"int"') == 0x7275D51A3F395C8F


def test_fingerprint_string_matches_published_value() -> None:
    assert schema_fingerprint('"string"') == (0x8F014872634503C7).to_bytes(8, "little")


def test_small_record_header_is_exact() -> None:
    schema = {
        "type": "record",
        "name": "Ping",
        "namespace": "test",
        "fields": [{"name": "n", "type": "int"}],
    }
    record = build_record_schema(schema, release=None)
    canonical = (
        '{"name":"test.Ping","type":"record","fields":[{"name":"n","type":"int"}]}'
    )
    expected = rabin_fingerprint(canonical.encode()).to_bytes(8, "little")

    assert record.canonical_form == canonical
    assert record.single_object_header == b"\xc3\x01" + expected


@pytest.mark.parametrize("record_name", sorted(catalog().current))
def test_encode_header_marker_and_fingerprint(
    record_name: str,
) -> None:
    value = dict(EXAMPLES)[record_name]
    record = catalog().record(record_name)
    expected = rabin_fingerprint(record.canonical_form.encode()).to_bytes(8, "little")

    data = encode(record_name, value)

    assert data[:2] == b"\xc3\x01"
    assert data[2:10] == expected


def test_framed_header_magic_and_id() -> None:
    record = catalog().record("PullOutcome")

    data = encode_framed(record, 258, PULL_OUTCOME)

    assert data[:5] == b"\x00\x00\x00\x01\x02"


def test_framed_body_equals_single_object_body() -> None:
    record = catalog().record("PullOutcome")

    framed = encode_framed(record, 1, PULL_OUTCOME)
    single = encode("PullOutcome", PULL_OUTCOME)

    assert framed[5:] == single[10:]


def test_writer_schema_returns_offset_ten() -> None:
    record, offset = writer_schema(encode("PullOutcome", PULL_OUTCOME))

    assert record.full_name == "autopull.PullOutcome"
    assert offset == 10


def test_topic_subject_appends_value() -> None:
    assert topic_subject("autopull.pull.outcomes") == "autopull.pull.outcomes-value"


# --- A reader without this codec ------------------------------------------------


def test_pull_outcome_readable_without_codec() -> None:
    data = encode("PullOutcome", PULL_OUTCOME)
    schema = fastavro.parse_schema(
        json.loads((SCHEMA_DIRECTORY / "PullOutcome.avsc").read_text())
    )
    canonical = to_parsing_canonical_form(schema)
    fingerprint = rabin_fingerprint(canonical.encode()).to_bytes(8, "little")

    assert data[:2] == b"\xc3\x01"
    assert data[2:10] == fingerprint
    assert fastavro.schemaless_reader(io.BytesIO(data[10:]), schema) == PULL_OUTCOME


# --- Decoding errors ------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [b"", b"hello world", b'{"status": "quarantined"}', b"\xc3\x02" + bytes(12)],
    ids=["empty", "text", "json", "wrong-marker-version"],
)
def test_decode_garbage_raises_schema_error(data: bytes) -> None:
    with pytest.raises(SchemaError, match="neither Avro single-object encoding"):
        decode("PullOutcome", data)


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=300))
@pytest.mark.parametrize("record_name", ["PullOutcome", "IncidentEvent", "RawAlert"])
def test_decode_random_body_raises_only_schema_error(
    record_name: str, body: bytes
) -> None:
    data = catalog().record(record_name).single_object_header + body

    try:
        value = decode(record_name, data)
    except SchemaError:
        return
    assert isinstance(value, dict)


def test_decode_truncated_body_raises_schema_error() -> None:
    data = encode("PullOutcome", PULL_OUTCOME)

    with pytest.raises(SchemaError, match="truncated or corrupt"):
        decode("PullOutcome", data[:-5])


def test_decode_truncated_header_raises_schema_error() -> None:
    data = encode("PullOutcome", PULL_OUTCOME)

    with pytest.raises(SchemaError, match="fewer than its 10-byte header"):
        decode("PullOutcome", data[:6])


def test_decode_truncated_confluent_header_raises() -> None:
    with pytest.raises(SchemaError, match="fewer than its 5-byte header"):
        decode("PullOutcome", b"\x00\x00\x01")


def test_decode_trailing_bytes_raises_schema_error() -> None:
    data = encode("PullOutcome", PULL_OUTCOME)

    with pytest.raises(SchemaError, match="3 bytes left after its Avro body"):
        decode("PullOutcome", data + b"\x00\x00\x00")


def test_decode_unknown_fingerprint_names_it() -> None:
    data = encode("PullOutcome", PULL_OUTCOME)
    forged = b"\xc3\x01" + bytes.fromhex("0123456789abcdef") + data[10:]

    with pytest.raises(SchemaError, match="0123456789abcdef") as caught:
        decode("PullOutcome", forged)

    assert "schemas/released/" in str(caught.value)


def test_decode_other_record_raises_schema_error() -> None:
    data = encode("PullOutcome", PULL_OUTCOME)

    with pytest.raises(SchemaError, match=r"record of type autopull\.PullOutcome"):
        decode("PullCommand", data)


def test_decode_confluent_without_registry_names_id() -> None:
    data = encode_framed(catalog().record("PullOutcome"), 4242, PULL_OUTCOME)

    with pytest.raises(SchemaError, match="registry id 4242"):
        decode("PullOutcome", data)


def test_decode_unknown_record_name_raises_schema_error() -> None:
    with pytest.raises(SchemaError, match="Record 'PullResult' has no schema"):
        decode("PullResult", encode("PullOutcome", PULL_OUTCOME))


def test_schema_error_is_value_error() -> None:
    assert issubclass(SchemaError, ValueError)


# --- Encoding errors ------------------------------------------------------------


def test_encode_missing_field_names_field() -> None:
    value = {key: item for key, item in PULL_OUTCOME.items() if key != "mailbox"}

    with pytest.raises(SchemaError, match=r"autopull\.PullOutcome\.mailbox"):
        encode("PullOutcome", value)


def test_encode_wrong_type_names_field() -> None:
    value = with_field(PULL_OUTCOME, "copies", "two")

    with pytest.raises(SchemaError, match=r"autopull\.PullOutcome\.copies is 'two'"):
        encode("PullOutcome", value)


def test_encode_unknown_enum_symbol_names_symbols() -> None:
    value = with_field(PULL_OUTCOME, "status", "purged")

    with pytest.raises(SchemaError, match=r"PullOutcome\.status is 'purged'") as caught:
        encode("PullOutcome", value)

    assert "already_quarantined" in str(caught.value)


def test_encode_nested_wrong_type_names_field() -> None:
    outcome = with_field(PULL_OUTCOME, "attempts", None)
    value = with_field(INCIDENT_EVENT_OUTCOME, "outcome", outcome)

    with pytest.raises(SchemaError, match=r"autopull\.PullOutcome\.attempts is None"):
        encode("IncidentEvent", value)


def test_encode_unknown_field_raises_schema_error() -> None:
    value = with_field(PULL_OUTCOME, "mail_box", MAILBOX)

    with pytest.raises(SchemaError, match="mail_box"):
        encode("PullOutcome", value)


def test_encode_non_dict_raises_schema_error() -> None:
    with pytest.raises(SchemaError, match="must be a dict, not list"):
        encode("PullOutcome", [PULL_OUTCOME])  # type: ignore[arg-type]


def test_encode_naive_timestamp_names_field() -> None:
    value = with_field(PULL_OUTCOME, "started_at", datetime(2025, 3, 4, 9, 16, 10))

    with pytest.raises(
        SchemaError, match=r"PullOutcome\.started_at is a naive datetime"
    ):
        encode("PullOutcome", value)


def test_naive_timestamp_in_array_names_path() -> None:
    pull = with_field(INCIDENT["pulls"][0], "finished_at", datetime(2025, 3, 4, 9, 16))
    value = with_field(INCIDENT, "pulls", [pull])

    with pytest.raises(SchemaError, match=r"Incident\.pulls\[0\]\.finished_at"):
        encode("Incident", value)


def test_naive_timestamp_in_union_names_path() -> None:
    alert = with_field(NORMALIZED_ALERT, "received_at", datetime(2025, 3, 4, 9, 15))
    value = with_field(
        INCIDENT_EVENT_ALERT, "alert", with_field(ENRICHED_ALERT, "alert", alert)
    )

    with pytest.raises(SchemaError, match=r"IncidentEvent\.alert\.alert\.received_at"):
        encode("IncidentEvent", value)


def test_encode_epoch_millis_timestamp_accepted() -> None:
    millis = int(STARTED.timestamp() * 1000)

    value = decode(
        "PullOutcome",
        encode("PullOutcome", with_field(PULL_OUTCOME, "started_at", millis)),
    )

    assert value["started_at"] == STARTED


# --- Faust codec ----------------------------------------------------------------


def test_avro_codec_dumps_single_object_encoding() -> None:
    codec = AvroCodec("PullOutcome")

    assert codec.dumps(PULL_OUTCOME) == encode("PullOutcome", PULL_OUTCOME)


def test_avro_codec_loads_returns_value() -> None:
    codec = AvroCodec("PullOutcome")

    assert codec.loads(codec.dumps(PULL_OUTCOME)) == PULL_OUTCOME


def test_avro_codec_clone_keeps_record() -> None:
    clone = AvroCodec("PullCommand").clone()

    assert isinstance(clone, AvroCodec)
    assert clone.record.name == "PullCommand"


def test_avro_codec_register_without_registry() -> None:
    assert AvroCodec("PullOutcome").register() is None


def test_avro_codec_registry_without_subject_raises() -> None:
    with pytest.raises(ValueError, match="no subject"):
        AvroCodec("PullOutcome", registry="http://127.0.0.1:1")


def test_reframe_without_registry_keeps_bytes() -> None:
    data = encode("PullOutcome", PULL_OUTCOME)

    assert AvroCodec("PullOutcome").reframe(data) == data


def test_reframe_with_registry_writes_confluent_framing() -> None:
    codec = AvroCodec(
        "PullOutcome", registry="http://127.0.0.1:1", subject="t.outcomes-value"
    )
    codec.schema_id = 258
    record = catalog().record("PullOutcome")

    reframed = codec.reframe(encode("PullOutcome", PULL_OUTCOME))

    assert reframed == encode_framed(record, 258, PULL_OUTCOME)


def test_reframe_other_record_raises_schema_error() -> None:
    data = encode("PullOutcome", PULL_OUTCOME)

    with pytest.raises(SchemaError, match="single-object header of the current"):
        AvroCodec("PullCommand").reframe(data)


def test_avro_codec_unknown_record_raises_schema_error() -> None:
    with pytest.raises(SchemaError, match="PullResult"):
        AvroCodec("PullResult")
