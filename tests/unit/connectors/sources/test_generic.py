from __future__ import annotations

import copy
import hashlib
import io
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fastavro
import pytest
from fastavro.validation import validate
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from autopull.connectors.sources.common import NormalizedAlert
from autopull.connectors.sources.detect import FORMATS, detect_format, parse_alert
from autopull.connectors.sources.exceptions import InvalidAlertError
from autopull.connectors.sources.generic import (
    CLASSIFICATIONS,
    header_value,
    looks_like_generic,
    parse_generic,
)

REPO = Path(__file__).resolve().parents[4]
EXAMPLES = REPO / "examples" / "alerts"
SCHEMA_FILE = REPO / "schemas" / "generic-alert.schema.json"
SCHEMA_JSON = json.loads((REPO / "schemas" / "NormalizedAlert.avsc").read_text())
SCHEMA = fastavro.parse_schema(SCHEMA_JSON)
RECEIVED_AT = datetime(2026, 12, 1, 10, 0, 5, tzinfo=UTC)
M1_ID = "20261201093000.1234.invoice@billing-example.net"
M1_URL = "http://billing-example.net/pay/4471"
SHA256 = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
FOLDED_ID = (
    "PAXP193MB2314C6F90A60DA909597069AA7802@PAXP193MB2314.eurprd01.mail.example.com"
)


def full_alert(**changes: Any) -> dict[str, Any]:
    """A generic alert that uses every key of the schema."""
    body: dict[str, Any] = {
        "json_version": "2.0",
        "summary": "Credential phishing with a payment link",
        "classification": "phish",
        "severity": "major",
        "link_attribute": "message_id",
        "detector": {"vendor": "Example Security", "product": "Mail Sandbox"},
        "attacker": {"ip_address": "192.0.2.44", "port": 25},
        "target": {"user": "alice", "count": 3, "vip": False, "note": None},
        "cnc_hosts": [{"host": "billing-example.net", "port": 80}],
        "forensics_hosts": [{"host": "cdn.example.net"}],
        "threat_info": {
            "name": "Phish.Invoice.Payment",
            "url": "https://sandbox.example.com/analysis/88213",
            "status": "active",
            "time": "2026-12-01T09:40:55Z",
            "campaign_id": "invoice-4471",
        },
        "email": {
            "message_id": f"<{M1_ID}>",
            "sender": "billing@example.net",
            "recipient": ["Alice@example.com", "bob@example.com"],
            "subject": "Invoice 4471 overdue",
            "delivery_time": "2026-12-01T09:30:04Z",
            "urls": [M1_URL, M1_URL],
            "attachments": [
                {
                    "name": "invoice.pdf",
                    "content_type": "application/pdf",
                    "md5": "0CC175B9C0F1B6A831C399E269772661",
                    "sha256": SHA256.upper(),
                }
            ],
        },
        "custom_fields": {"ticket": "SOC-2291", "score": 97, "auto": True},
    }
    body.update(changes)
    return body


def minimal_alert(**email_changes: Any) -> dict[str, Any]:
    email: dict[str, Any] = {"message_id": M1_ID, "recipient": "alice@example.com"}
    email.update(email_changes)
    return {"json_version": "2.0", "classification": "phish", "email": email}


def parse(body: object) -> list[NormalizedAlert]:
    alerts = parse_generic(body, received_at=RECEIVED_AT)
    for alert in alerts:
        assert_valid_avro(alert)
    return alerts


# The first 24 hex digits of SHA-256 over the sorted recipients joined by newlines.
RECIPIENTS_DIGEST = hashlib.sha256(b"alice@example.com\nbob@example.com").hexdigest()[
    :24
]


def parse_one(body: object) -> NormalizedAlert:
    alerts = parse(body)
    assert len(alerts) == 1
    return alerts[0]


def assert_valid_avro(alert: NormalizedAlert) -> None:
    """Validate every field against the schema and round-trip the alert."""
    assert set(alert) == {field["name"] for field in SCHEMA_JSON["fields"]}
    assert validate(alert, SCHEMA, raise_errors=True)

    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, SCHEMA, alert)
    buffer.seek(0)
    assert fastavro.schemaless_reader(buffer, SCHEMA, SCHEMA) == alert


def reason_of(body: object) -> str:
    with pytest.raises(InvalidAlertError) as caught:
        parse_generic(body, received_at=RECEIVED_AT)
    return caught.value.reason


def test_generic_schema_is_valid_draft_2020_12() -> None:
    schema = json.loads(SCHEMA_FILE.read_text())

    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"


# Fields.


def test_parse_generic_full_alert_fields() -> None:
    alert = parse_one(full_alert())

    assert alert["alert_id"] == (
        f"generic:{M1_ID}:2-recipients-{RECIPIENTS_DIGEST}:alert:phish:active"
    )
    assert alert["source"] == "generic"
    assert alert["source_alert_id"] == M1_ID
    assert alert["event_class"] == "alert"
    assert alert["received_at"] == RECEIVED_AT
    assert alert["occurred_at"] == datetime(2026, 12, 1, 9, 40, 55, tzinfo=UTC)
    assert alert["delivered_at"] == datetime(2026, 12, 1, 9, 30, 4, tzinfo=UTC)
    assert alert["message_id"] == M1_ID
    assert alert["message_id_synthetic"] is False
    assert alert["sender"] == "billing@example.net"
    assert alert["sender_ip"] == "192.0.2.44"
    assert alert["subject"] == "Invoice 4471 overdue"
    assert alert["recipients"] == ["alice@example.com", "bob@example.com"]
    assert alert["classification"] == "phish"
    assert alert["threat_status"] == "active"
    assert alert["severity"] == "major"
    assert alert["campaign_id"] == "invoice-4471"
    assert alert["urls"] == [M1_URL]
    assert alert["scores"] == {}
    assert alert["clicker"] is None


def test_parse_generic_full_alert_threats() -> None:
    alert = parse(full_alert())[0]

    console = "https://sandbox.example.com/analysis/88213"
    assert alert["threats"] == [
        {
            "threat_id": "Phish.Invoice.Payment",
            "kind": "url",
            "value": M1_URL,
            "classification": "phish",
            "status": "active",
            "url": console,
        },
        {
            "threat_id": "Phish.Invoice.Payment",
            "kind": "attachment",
            "value": SHA256,
            "classification": "phish",
            "status": "active",
            "url": console,
        },
    ]


def test_parse_generic_attachment_hashes_lowered() -> None:
    alert = parse(full_alert())[0]

    assert alert["attachments"] == [
        {
            "name": "invoice.pdf",
            "content_type": "application/pdf",
            "md5": "0cc175b9c0f1b6a831c399e269772661",
            "sha256": SHA256,
        }
    ]


def test_parse_generic_minimal_alert_defaults() -> None:
    alert = parse_one(minimal_alert())

    assert alert["sender"] == ""
    assert alert["subject"] is None
    assert alert["severity"] is None
    assert alert["occurred_at"] is None
    assert alert["delivered_at"] is None
    assert alert["threat_status"] == "active"
    assert alert["custom_fields"] == {}
    assert alert["threats"] == [
        {
            "threat_id": "",
            "kind": "message",
            "value": M1_ID,
            "classification": "phish",
            "status": "active",
            "url": None,
        }
    ]


def test_parse_generic_severity_lowered() -> None:
    alert = parse(full_alert(severity="Critical"))[0]

    assert alert["severity"] == "critical"


def test_parse_generic_delivery_time_offset_is_utc() -> None:
    alert = parse_one(minimal_alert(delivery_time="2024-03-10 01:30:00 -0800"))

    assert alert["delivered_at"] == datetime(2024, 3, 10, 9, 30, tzinfo=UTC)
    assert alert["occurred_at"] == alert["delivered_at"]


# Classification vocabulary.


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("phish", "phish"),
        ("malware", "malware"),
        ("command-and-control", "malware"),
        ("spam", "spam"),
        ("impostor", "impostor"),
        ("policy-violation", "unknown"),
        ("vulnerability", "unknown"),
        ("network", "unknown"),
        ("data-match", "unknown"),
        ("authentication", "unknown"),
        ("system-behavior", "unknown"),
        ("reported-abuse", "unknown"),
        ("unknown", "unknown"),
    ],
)
def test_parse_generic_classification_mapped(value: str, expected: str) -> None:
    body = minimal_alert()
    body["classification"] = value

    alert = parse_one(body)

    assert alert["classification"] == expected


def test_parse_generic_schema_lists_every_mapped_class() -> None:
    schema = json.loads(SCHEMA_FILE.read_text())

    assert set(CLASSIFICATIONS) <= set(schema["properties"]["classification"]["enum"])


# Custom fields.


def test_parse_generic_custom_fields_stringified() -> None:
    body = full_alert(custom_fields={"a": "text", "b": 7, "c": 0.5, "d": False})

    alert = parse(body)[0]

    assert alert["custom_fields"] == {"a": "text", "b": "7", "c": "0.5", "d": "false"}


def test_parse_generic_huge_integer_field_kept_exactly() -> None:
    body = b'{"json_version": "2.0", "classification": "phish", "email": {"recipient":'
    body += b' "a@example.com"}, "custom_fields": {"n": 1' + b"0" * 400 + b"}}"

    alert = parse_one(body)

    assert alert["custom_fields"]["n"] == "1" + "0" * 400


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (full_alert(custom_fields={"x": None}), "custom_fields.x"),
        (full_alert(custom_fields={"x": {"y": 1}}), "custom_fields.x"),
        (full_alert(custom_fields={"x": [1]}), "custom_fields.x"),
        (full_alert(custom_fields=["x"]), "custom_fields"),
        (full_alert(custom_fields={"x": "\ud800"}), "custom_fields.x"),
        (full_alert(custom_fields={"\ud800": "x"}), "custom_fields"),
    ],
)
def test_parse_generic_bad_custom_field_raises(body: object, fragment: str) -> None:
    assert fragment in reason_of(body)


def test_parse_generic_infinite_custom_number_raises() -> None:
    body = (
        b'{"json_version": "2.0", "classification": "phish", "email": {"recipient": '
        b'"a@example.com"}, "custom_fields": {"x": 1e400}}'
    )

    assert "custom_fields.x" in reason_of(body)


# Message-IDs.


def test_parse_generic_message_id_from_raw_headers() -> None:
    headers = (
        "Received: from a\r\n\tby b\r\nMessage-ID:\r\n <" + FOLDED_ID + ">\r\n"
        "Subject: hi\r\n\r\nMessage-ID: <body@example.com>\r\n"
    )
    body = minimal_alert(headers=headers)
    del body["email"]["message_id"]

    alert = parse_one(body)

    assert alert["message_id"] == FOLDED_ID


def test_parse_generic_message_id_field_wins_over_headers() -> None:
    alert = parse_one(minimal_alert(headers="Message-ID: <other@example.com>\r\n"))

    assert alert["message_id"] == M1_ID


@pytest.mark.parametrize(
    "bare",
    [
        "[ABCDEF====@example.com]",
        "[gw10].1c69fb81.7aec0.5503SMTPIN_ADDED_[gw5]@[gw13].mail.example.com",
        "113c01d86b4a$53bb4230$fa9e45a$@appmanager@example.net",
        "00E19E93-513A-4A2B-964B-BB0372099DB6@@example.com",
        "2415681bce7c00293a83fce817e928a4",
    ],
)
def test_parse_generic_unusual_header_id_kept_exactly(bare: str) -> None:
    body = minimal_alert(headers=f"From: a@example.net\r\nMessage-ID: <{bare}>\r\n")
    del body["email"]["message_id"]

    assert parse_one(body)["message_id"] == bare


def test_parse_generic_without_message_id_stable_identity() -> None:
    body = minimal_alert(
        sender="billing@example.net",
        subject="Invoice 4471",
        delivery_time="2026-12-01T09:30:04Z",
    )
    del body["email"]["message_id"]

    first = parse_one(body)
    second = parse_one(copy.deepcopy(body))

    assert first["message_id"] == ""
    assert first["alert_id"] == second["alert_id"]
    assert first["alert_id"].startswith("generic:no-message-id-")


def test_parse_generic_without_message_id_subject_changes_identity() -> None:
    body = minimal_alert(subject="Invoice 4471")
    other = minimal_alert(subject="Invoice 4472")
    del body["email"]["message_id"]
    del other["email"]["message_id"]

    assert parse_one(body)["alert_id"] != parse_one(other)["alert_id"]


def test_parse_generic_synthetic_message_id_flagged() -> None:
    alert = parse_one(minimal_alert(message_id="queue-id-7Q2@no-message-id"))

    assert alert["message_id_synthetic"] is True


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ("Message-ID: <a@b>\r\n", " <a@b>"),
        ("message-id:<a@b>\n", "<a@b>"),
        ("MESSAGE-ID :\r\n\t<a@b>\r\n", "\t<a@b>"),
        ("Subject: x\r\n\r\nMessage-ID: <a@b>\r\n", None),
        ("X-Message-ID: <a@b>\r\n", None),
        ("", None),
    ],
)
def test_header_value_table(headers: str, expected: str | None) -> None:
    assert header_value(headers, "Message-ID") == expected


# Identity.


def test_parse_generic_one_alert_for_all_recipients() -> None:
    alert = parse_one(full_alert())

    assert alert["recipients"] == ["alice@example.com", "bob@example.com"]


def test_parse_generic_one_recipient_named_in_identity() -> None:
    body = full_alert()
    body["email"]["recipient"] = ["Bob@example.com"]

    alert = parse_one(body)

    assert alert["alert_id"] == f"generic:{M1_ID}:bob@example.com:alert:phish:active"


def test_parse_generic_recipient_order_same_identity() -> None:
    reordered = full_alert()
    reordered["email"]["recipient"].reverse()

    assert parse_one(reordered)["alert_id"] == parse_one(full_alert())["alert_id"]


def test_parse_generic_other_recipients_new_identity() -> None:
    # A second alert about the same message for other recipients is no replay.
    other = full_alert()
    other["email"]["recipient"] = ["carol@example.com"]

    assert parse_one(other)["alert_id"] != parse_one(full_alert())["alert_id"]


def test_parse_generic_replayed_alert_same_identity() -> None:
    assert parse(full_alert())[0]["alert_id"] == parse(full_alert())[0]["alert_id"]


def test_parse_generic_later_cleared_verdict_new_identity() -> None:
    cleared = full_alert()
    cleared["threat_info"]["status"] = "cleared"

    first = parse(full_alert())[0]
    second = parse(cleared)[0]

    assert second["alert_id"] != first["alert_id"]
    assert second["alert_id"].endswith(":alert:phish:cleared")
    assert second["threat_status"] == "cleared"
    assert second["threats"][0]["status"] == "cleared"


def test_parse_generic_reclassified_verdict_new_identity() -> None:
    spam = full_alert(classification="spam")

    assert parse(spam)[0]["alert_id"] != parse(full_alert())[0]["alert_id"]


def test_parse_generic_false_positive_status() -> None:
    body = full_alert()
    body["threat_info"]["status"] = "false_positive"

    assert parse(body)[0]["threat_status"] == "false_positive"


# Invalid bodies.


@pytest.mark.parametrize(
    ("body", "path", "fragment"),
    [
        ({"json_version": "2.0", "classification": "phish"}, "the top level", "email"),
        (minimal_alert() | {"json_version": "3.0"}, "json_version", "is not one of"),
        (minimal_alert() | {"json_version": 2.0}, "json_version", "is not one of"),
        (minimal_alert() | {"classification": "PHISH"}, "classification", "not one"),
        (minimal_alert() | {"severity": "urgent"}, "severity", "is not one of"),
        (minimal_alert() | {"recipients": ["a@b"]}, "the top level", "recipients"),
        (minimal_alert() | {"email": "alice@example.com"}, "email", "not of type"),
        (minimal_alert(recipient=None), "email.recipient", "not valid"),
        (minimal_alert(recipient=[]), "email.recipient", ""),
        (minimal_alert(recipient=""), "email.recipient", ""),
        (minimal_alert(recipient=["a@example.com", 5]), "email.recipient[1]", ""),
        (minimal_alert(subject=5), "email.subject", "not of type 'string'"),
        (minimal_alert(urls="http://x"), "email.urls", "not of type 'array'"),
        (minimal_alert(urls=[""]), "email.urls[0]", "should be non-empty"),
        (
            minimal_alert(attachments=[{"md5": "xyz"}]),
            "email.attachments[0].md5",
            "does not match",
        ),
        (
            minimal_alert(attachments=[{"sha1": "x"}]),
            "email.attachments[0]",
            "sha1",
        ),
        (minimal_alert(cc="b@example.com"), "email", "cc"),
        (minimal_alert() | {"attacker": {"port": 25}}, "attacker", ""),
        (
            minimal_alert() | {"attacker": {"user": "x", "port": 70000}},
            "attacker.port",
            "maximum",
        ),
        (minimal_alert() | {"target": {"a": {"b": 1}}}, "target.a", "not of type"),
        (minimal_alert() | {"cnc_hosts": [{"port": 1}]}, "cnc_hosts[0]", "host"),
        (
            minimal_alert() | {"threat_info": {"status": "expired"}},
            "threat_info.status",
            "is not one of",
        ),
        (
            minimal_alert() | {"link_attribute": "subject"},
            "link_attribute",
            "is not one of",
        ),
        (minimal_alert() | {"__proto__": {}}, "the top level", "__proto__"),
    ],
)
def test_parse_generic_schema_violation_names_path(
    body: object, path: str, fragment: str
) -> None:
    reason = reason_of(body)

    assert f"invalid at {path}:" in reason
    assert fragment in reason


def test_parse_generic_schema_error_message_is_short() -> None:
    reason = reason_of(minimal_alert(subject=["x" * 100_000]))

    assert len(reason) < 600


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (minimal_alert(recipient="not an address"), "email.recipient"),
        (minimal_alert(recipient="a@example.com\r\nBcc: x@example.com"), "recipient"),
        (minimal_alert(recipient=["a@example.com", "b@@"]), "email.recipient"),
        (minimal_alert(sender="a@example.com\nBcc: x"), "email.sender"),
        (minimal_alert(subject="\ud800"), "email.subject"),
        (minimal_alert(message_id="<a@b>\r\nX: y"), "email.message_id"),
        (minimal_alert(message_id="a\x00b@example.com"), "email.message_id"),
        (minimal_alert(delivery_time="yesterday"), "email.delivery_time"),
        (minimal_alert(delivery_time="2024-03-10T01:30:00"), "email.delivery_time"),
        (
            minimal_alert() | {"threat_info": {"time": "2024-13-45T00:00:00Z"}},
            "threat_info.time",
        ),
        (
            {
                **minimal_alert(),
                "email": {
                    "recipient": "a@example.com",
                    "headers": "Message-ID: <a@b>\rX-Injected: 1\r\n",
                },
            },
            "email.headers",
        ),
    ],
)
def test_parse_generic_invalid_value_names_field(body: object, field: str) -> None:
    assert field in reason_of(body)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"", "not valid JSON"),
        (b"[]", "the top level"),
        (b'{"json_version": NaN}', "not valid JSON"),
        (b"\xff\xfe{}", "not valid JSON"),
        (b"[" * 100_000, "too deeply"),
    ],
)
def test_parse_generic_unusable_body_raises(body: bytes, fragment: str) -> None:
    assert fragment in reason_of(body)


def test_parse_generic_deep_nesting_in_free_object_raises() -> None:
    nested: object = "x"
    for _ in range(900):
        nested = {"a": nested}

    reason = reason_of(minimal_alert() | {"target": nested})

    assert "target.a" in reason


def test_parse_generic_naive_received_at_is_programming_error() -> None:
    with pytest.raises(ValueError):
        parse_generic(minimal_alert(), received_at=datetime(2026, 12, 1))


# Recognizing the format.


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        (minimal_alert(), True),
        ({"json_version": None}, True),
        ({"email": {}}, False),
        ([], False),
    ],
)
def test_looks_like_generic_table(document: object, expected: bool) -> None:
    assert looks_like_generic(document) is expected


def test_parse_alert_detects_generic() -> None:
    alerts = parse_alert(json.dumps(minimal_alert()), received_at=RECEIVED_AT)

    assert alerts[0]["source"] == "generic"


# Properties over hostile input.

JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
HOSTILE = (
    JSON_SCALARS
    | st.sampled_from(["", "a\r\nb", "\ud800", "<>", "2024-13-01", "queue-id-1@x"])
    | st.lists(JSON_SCALARS, max_size=3)
    | st.dictionaries(st.text(max_size=4), JSON_SCALARS, max_size=2)
)
PATHS = [
    ("json_version",),
    ("classification",),
    ("severity",),
    ("attacker",),
    ("attacker", "ip_address"),
    ("threat_info",),
    ("threat_info", "status"),
    ("threat_info", "time"),
    ("email",),
    ("email", "message_id"),
    ("email", "sender"),
    ("email", "recipient"),
    ("email", "subject"),
    ("email", "delivery_time"),
    ("email", "urls"),
    ("email", "attachments"),
    ("custom_fields",),
    ("custom_fields", "ticket"),
]


@st.composite
def hostile_alerts(draw: st.DrawFn) -> dict[str, Any]:
    """A valid alert with one member replaced by a hostile value."""
    body = full_alert()
    path = draw(st.sampled_from(PATHS))
    target = body
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = draw(HOSTILE)
    return body


def check_any_outcome(body: object) -> None:
    """Assert that parsing returns valid alerts or raises InvalidAlertError only."""
    try:
        alerts = parse_generic(body, received_at=RECEIVED_AT)
    except InvalidAlertError as error:
        assert error.reason
        return
    for alert in alerts:
        assert_valid_avro(alert)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(JSON_VALUES)
def test_parse_generic_any_json_value_alerts_or_invalid(document: object) -> None:
    check_any_outcome(document)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(hostile_alerts())
def test_parse_generic_hostile_member_alerts_or_invalid(body: dict[str, Any]) -> None:
    check_any_outcome(body)


@settings(max_examples=200)
@given(st.binary(max_size=200))
def test_parse_generic_any_bytes_alerts_or_invalid(body: bytes) -> None:
    check_any_outcome(body)


# The shipped examples.

GENERIC_EXAMPLES = sorted(EXAMPLES.glob("generic-*.json"))


@pytest.mark.parametrize("path", GENERIC_EXAMPLES, ids=lambda path: path.name)
def test_parse_generic_example_file_valid(path: Path) -> None:
    assert parse(path.read_bytes())


@pytest.mark.parametrize("path", GENERIC_EXAMPLES, ids=lambda path: path.name)
def test_detect_format_generic_example_is_generic(path: Path) -> None:
    document = json.loads(path.read_bytes())

    assert detect_format(document).name == "generic"
    assert [f.name for f in FORMATS if f.matches(document)] == ["generic"]


def test_detect_format_tap_examples_still_tap() -> None:
    for path in sorted(EXAMPLES.glob("tap-*.json")):
        document = json.loads(path.read_bytes())

        assert [f.name for f in FORMATS if f.matches(document)] == ["tap"], path.name
