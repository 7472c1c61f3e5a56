from __future__ import annotations

import copy
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

from autopull.connectors.sources.common import NormalizedAlert
from autopull.connectors.sources.detect import FORMATS, detect_format
from autopull.connectors.sources.exceptions import InvalidAlertError
from autopull.connectors.sources.fireeye import (
    MAX_XML_DEPTH,
    load_fireeye_xml,
    looks_like_fireeye,
    looks_like_fireeye_xml,
    looks_like_xml,
    parse_fireeye,
)
from autopull.streams.policy import PolicySettings, decide

REPO = Path(__file__).resolve().parents[4]
EXAMPLES = REPO / "examples" / "alerts"
SCHEMA_JSON = json.loads((REPO / "schemas" / "NormalizedAlert.avsc").read_text())
SCHEMA = fastavro.parse_schema(SCHEMA_JSON)
RECEIVED_AT = datetime(2026, 12, 1, 10, 0, 5, tzinfo=UTC)
UUID = "b7f3c1d2-5e6a-4f8b-9c0d-1e2f3a4b5c6d"
M2_ID = "CAH7x+q/Lk=Zp'8#w%41&r@mail.example.net"
SHA256 = "49b6f8024198683995067a05c1c026256090b06ab7c7045ca7ac766b450c8fe8"
MD5 = "364206436fddf7725ba589be4e8e0005"
CONSOLE = "https://ex1.example.com/emps/eanalysis?e_id=4471&type=attch"
P11_UTC = datetime(2024, 3, 10, 9, 30, tzinfo=UTC)


def notification(**changes: Any) -> dict[str, Any]:
    """An HTTP notification in JSON, hyphenated keys, one alert object."""
    alert: dict[str, Any] = {
        "id": "4471",
        "uuid": UUID,
        "name": "malware-object",
        "product": "Email MPS",
        "severity": "majr",
        "ack": "no",
        "action": "notified",
        "occurred": "2026-12-01T10:41:19+01:00",
        "alert-url": CONSOLE,
        "src": {"smtp-mail-from": "scanner@mail.example.net", "ip": "192.0.2.61"},
        "dst": {"smtp-to": "dave@example.com"},
        "smtp-message": {
            "subject": "Scanned document",
            "id": f"<{M2_ID}>",
            "queue-id": "4Tq9Vx0Lk2z",
        },
        "explanation": {
            "malware-detected": {
                "malware": [
                    {
                        "name": "Malware.Binary.docm",
                        "original": "Scan_20261201_0941.docm",
                        "md5sum": MD5,
                        "sha256": SHA256,
                    }
                ]
            }
        },
    }
    alert.update(changes)
    return {
        "msg": "extended",
        "product": "Email MPS",
        "appliance": "ex1.example.com",
        "appliance-id": "0025904F1A2B",
        "alert": alert,
    }


def wsapi(**changes: Any) -> dict[str, Any]:
    """A Web Services API listing of one alert, camelCase keys."""
    alert: dict[str, Any] = {
        "id": 7002,
        "uuid": "3c9e5a71-0d4b-4e2f-8a16-b5c7d9e1f203",
        "name": "MALWARE_OBJECT",
        "product": "EMAIL_MPS",
        "severity": "MAJR",
        "action": "notified",
        "occurred": "2024-03-10 01:30:00 -0800",
        "alertUrl": "https://ex2.example.com/emps/eanalysis?e_id=7002",
        "applianceId": "0025904F7C3D",
        "src": {"smtpMailFrom": "billing@example.net"},
        "dst": {"smtpTo": ["tara@example.com"]},
        "smtpMessage": {"subject": "Invoice 4471", "id": "queue-id-7Q2@no-message-id"},
        "explanation": {
            "malwareDetected": {
                "malware": [{"name": "Trojan.Generic", "md5Sum": MD5, "sha256": SHA256}]
            }
        },
    }
    alert.update(changes)
    return {"alert": [alert], "alertsCount": 1, "appliance": "eMPS", "msg": "concise"}


P11_XML = b"""<?xml version="1.0" encoding="UTF-8"?>
<alerts xmlns="http://www.fireeye.com/alert/2011/AlertSchema" appliance="ex2">
  <alert id="7002" uuid="3c9e5a71-0d4b-4e2f-8a16-b5c7d9e1f203" name="malware-object"
         severity="majr">
    <src><smtp-mail-from>billing@example.net</smtp-mail-from></src>
    <dst><smtp-to>tara@example.com</smtp-to></dst>
    <smtp-message>
      <subject>Invoice 4471</subject>
      <id>queue-id-7Q2@no-message-id</id>
    </smtp-message>
    <occurred>2024-03-10 01:30:00 -0800</occurred>
    <action>notified</action>
  </alert>
</alerts>"""


def parse(body: object) -> list[NormalizedAlert]:
    alerts = parse_fireeye(body, received_at=RECEIVED_AT)
    for alert in alerts:
        assert_valid_avro(alert)
    return alerts


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
        parse_fireeye(body, received_at=RECEIVED_AT)
    return caught.value.reason


# The JSON notification.


def test_parse_fireeye_notification_fields() -> None:
    alert = parse_one(notification())

    assert alert["alert_id"] == f"fireeye:{UUID}"
    assert alert["source"] == "fireeye"
    assert alert["source_alert_id"] == UUID
    assert alert["event_class"] == "message_delivered"
    assert alert["received_at"] == RECEIVED_AT
    assert alert["occurred_at"] == datetime(2026, 12, 1, 9, 41, 19, tzinfo=UTC)
    assert alert["delivered_at"] == alert["occurred_at"]
    assert alert["message_id"] == M2_ID
    assert alert["message_id_synthetic"] is False
    assert alert["sender"] == "scanner@mail.example.net"
    assert alert["sender_ip"] == "192.0.2.61"
    assert alert["subject"] == "Scanned document"
    assert alert["recipients"] == ["dave@example.com"]
    assert alert["classification"] == "malware"
    assert alert["threat_status"] == "active"
    assert alert["severity"] == "majr"
    assert alert["urls"] == []
    assert alert["scores"] == {}


def test_parse_fireeye_notification_threat_and_attachment() -> None:
    alert = parse_one(notification())

    assert alert["threats"] == [
        {
            "threat_id": "Malware.Binary.docm",
            "kind": "attachment",
            "value": SHA256,
            "classification": "malware",
            "status": "active",
            "url": CONSOLE,
        }
    ]
    assert alert["attachments"] == [
        {
            "name": "Scan_20261201_0941.docm",
            "content_type": None,
            "md5": MD5,
            "sha256": SHA256,
        }
    ]


def test_parse_fireeye_notification_custom_fields() -> None:
    alert = parse_one(notification())

    assert alert["custom_fields"] == {
        "alert_name": "malware-object",
        "alert_url": CONSOLE,
        "product": "Email MPS",
        "appliance": "ex1.example.com",
        "appliance_id": "0025904F1A2B",
        "detail_level": "extended",
        "queue_id": "4Tq9Vx0Lk2z",
    }


def test_parse_fireeye_single_malware_object_accepted() -> None:
    body = notification()
    detected = body["alert"]["explanation"]["malware-detected"]
    detected["malware"] = detected["malware"][0]

    alert = parse_one(body)

    assert alert["attachments"][0]["sha256"] == SHA256


def test_parse_fireeye_value_wrapped_leaves_accepted() -> None:
    body = notification(
        dst={"smtp-to": {"value": "Dave@Example.com"}},
        occurred={"value": "2026-12-01T10:41:19+01:00"},
    )
    body["alert"]["smtp-message"]["id"] = {"value": f"<{M2_ID}>"}

    alert = parse_one(body)

    assert alert["recipients"] == ["dave@example.com"]
    assert alert["message_id"] == M2_ID
    assert alert["occurred_at"] == datetime(2026, 12, 1, 9, 41, 19, tzinfo=UTC)


def test_parse_fireeye_url_malware_becomes_url_threat() -> None:
    malware = {"name": "Phish.URL", "url": " http://billing-example.net/pay/4471 "}
    alert = parse_one(
        notification(explanation={"malware-detected": {"malware": malware}})
    )

    assert alert["urls"] == ["http://billing-example.net/pay/4471"]
    assert alert["threats"][0]["kind"] == "url"
    assert alert["attachments"] == []


def test_parse_fireeye_without_malware_has_message_threat() -> None:
    alert = parse_one(notification(explanation=None))

    assert alert["threats"] == [
        {
            "threat_id": "",
            "kind": "message",
            "value": "malware-object",
            "classification": "malware",
            "status": "active",
            "url": CONSOLE,
        }
    ]


# The Web Services API listing.


def test_parse_fireeye_wsapi_fields() -> None:
    alert = parse_one(wsapi())

    assert alert["alert_id"] == "fireeye:3c9e5a71-0d4b-4e2f-8a16-b5c7d9e1f203"
    assert alert["occurred_at"] == P11_UTC
    assert alert["sender"] == "billing@example.net"
    assert alert["subject"] == "Invoice 4471"
    assert alert["severity"] == "majr"
    assert alert["attachments"][0]["md5"] == MD5
    assert alert["custom_fields"]["appliance_id"] == "0025904F7C3D"


def test_parse_fireeye_wsapi_synthetic_message_id_flagged() -> None:
    alert = parse_one(wsapi())

    assert alert["message_id"] == "queue-id-7Q2@no-message-id"
    assert alert["message_id_synthetic"] is True


def test_parse_fireeye_wsapi_empty_listing_no_alerts() -> None:
    assert parse({"alert": [], "alertsCount": 0}) == []


def test_parse_fireeye_wsapi_listing_order_kept() -> None:
    body = wsapi()
    second = copy.deepcopy(body["alert"][0])
    second["uuid"] = "second"
    body["alert"].append(second)

    alerts = parse(body)

    assert [alert["source_alert_id"] for alert in alerts] == [
        "3c9e5a71-0d4b-4e2f-8a16-b5c7d9e1f203",
        "second",
    ]


# Times with offsets, in every dialect.


@pytest.mark.parametrize(
    "body",
    [
        notification(occurred="2024-03-10T01:30:00-08:00"),
        notification(occurred="2024-03-10 01:30:00 -0800"),
        wsapi(occurred="2024-03-10 01:30:00 -0800"),
        wsapi(occurred="2024-03-10T01:30:00-08:00"),
        json.dumps(wsapi()).encode(),
        P11_XML,
        P11_XML.replace(b"2024-03-10 01:30:00 -0800", b"2024-03-10T01:30:00-08:00"),
    ],
    ids=[
        "notification-iso",
        "notification-space",
        "wsapi-space",
        "wsapi-iso",
        "wsapi-bytes",
        "xml-space",
        "xml-iso",
    ],
)
def test_parse_fireeye_offset_time_normalized_to_utc(body: object) -> None:
    alert = parse(body)[0]

    assert alert["occurred_at"] == P11_UTC
    assert alert["delivered_at"] == P11_UTC


def test_parse_fireeye_time_without_zone_raises() -> None:
    reason = reason_of(notification(occurred="2024-03-10 01:30:00"))

    assert "alert.occurred" in reason
    assert "time zone" in reason


# Actions and identity.


@pytest.mark.parametrize(
    ("action", "event_class"),
    [
        ("notified", "message_delivered"),
        ("NOTIFIED", "message_delivered"),
        ("blocked", "message_blocked"),
        ("quarantined", "unknown"),
        (None, "unknown"),
    ],
)
def test_parse_fireeye_action_maps_event_class(
    action: str | None, event_class: str
) -> None:
    alert = parse_one(notification(action=action))

    assert alert["event_class"] == event_class


def test_parse_fireeye_blocked_has_no_delivery_time() -> None:
    alert = parse_one(notification(action="blocked"))

    assert alert["delivered_at"] is None
    assert alert["occurred_at"] is not None


def test_parse_fireeye_one_alert_for_all_recipients() -> None:
    alerts = parse(
        notification(
            dst={
                "smtp-to": ["Dave@example.com", "erin@example.com"],
                "smtp-cc": "frank@example.com",
            }
        )
    )

    assert len(alerts) == 1
    assert alerts[0]["recipients"] == [
        "dave@example.com",
        "erin@example.com",
        "frank@example.com",
    ]
    assert alerts[0]["alert_id"] == f"fireeye:{UUID}"


def test_parse_fireeye_repeated_recipient_listed_once() -> None:
    alerts = parse(
        notification(
            dst={"smtp-to": ["dave@example.com"], "smtp-cc": "DAVE@example.com"}
        )
    )

    assert len(alerts) == 1


def test_parse_fireeye_listing_alerts_share_no_lists() -> None:
    listing = wsapi()
    second = copy.deepcopy(listing["alert"][0])
    listing["alert"].append(second)
    second["uuid"] = "other-uuid"
    first, second = parse(listing)
    first["recipients"].append("changed@example.com")

    assert "changed@example.com" not in second["recipients"]


def test_parse_fireeye_replayed_alert_same_identity() -> None:
    first = parse_one(notification())
    second = parse_one(notification())

    assert first["alert_id"] == second["alert_id"]


def test_parse_fireeye_without_uuid_uses_appliance_and_id() -> None:
    alert = parse_one(wsapi(uuid=None))

    assert alert["alert_id"] == "fireeye:0025904F7C3D:7002"
    assert alert["source_alert_id"] == "7002"


def test_parse_fireeye_without_uuid_or_appliance_uses_id() -> None:
    body = wsapi(uuid=None, applianceId=None)

    alert = parse_one(body)

    assert alert["alert_id"] == "fireeye:7002"


def test_parse_fireeye_without_uuid_and_id_raises() -> None:
    reason = reason_of(notification(uuid=None, id=None))

    assert "neither a uuid nor an id" in reason


# Message-IDs.


def test_parse_fireeye_missing_message_id_is_empty() -> None:
    body = notification()
    del body["alert"]["smtp-message"]["id"]

    alert = parse_one(body)

    assert alert["message_id"] == ""
    assert alert["message_id_synthetic"] is False


def test_parse_fireeye_missing_smtp_message_is_empty() -> None:
    alert = parse_one(notification(**{"smtp-message": None}))

    assert alert["message_id"] == ""
    assert alert["subject"] is None


def test_parse_fireeye_folded_message_id_is_bare() -> None:
    body = notification()
    body["alert"]["smtp-message"]["id"] = f"\r\n <{M2_ID}>"

    assert parse_one(body)["message_id"] == M2_ID


# The XML notification.


def test_parse_fireeye_xml_same_as_json() -> None:
    from_xml = parse_one(P11_XML)
    from_json = parse_one(wsapi())

    for field in ("alert_id", "message_id", "sender", "subject", "recipients"):
        assert from_xml[field] == from_json[field], field
    assert from_xml["occurred_at"] == from_json["occurred_at"]


def test_parse_fireeye_xml_repeated_elements_become_lists() -> None:
    document = load_fireeye_xml(
        b"<alerts><alert uuid='u'><dst><smtp-to>a@example.com</smtp-to>"
        b"<smtp-to>b@example.com</smtp-to></dst></alert></alerts>"
    )

    assert document == {
        "alert": {
            "uuid": "u",
            "dst": {"smtp-to": ["a@example.com", "b@example.com"]},
        }
    }


def test_parse_fireeye_xml_root_alert_accepted() -> None:
    body = (
        b"<alert uuid='u'><dst><smtp-to>a@example.com</smtp-to></dst>"
        b"<action>notified</action></alert>"
    )

    alert = parse_one(body)

    assert alert["alert_id"] == "fireeye:u"


def test_parse_fireeye_xml_leaf_with_attributes_unwrapped() -> None:
    body = (
        b"<alerts><alert uuid='u'><dst><smtp-to type='envelope'>a@example.com"
        b"</smtp-to></dst></alert></alerts>"
    )

    assert parse_one(body)["recipients"] == ["a@example.com"]


BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
]>
<alerts><alert uuid="&lol4;"><dst><smtp-to>a@example.com</smtp-to></dst>
</alert></alerts>
"""
EXTERNAL_ENTITY = b"""<?xml version="1.0"?>
<!DOCTYPE alerts [<!ENTITY secret SYSTEM "file:///etc/passwd">]>
<alerts><alert uuid="u"><smtp-message><subject>&secret;</subject></smtp-message>
<dst><smtp-to>a@example.com</smtp-to></dst></alert></alerts>
"""
EXTERNAL_DTD = b"""<?xml version="1.0"?>
<!DOCTYPE alerts SYSTEM "http://127.0.0.1:9/alerts.dtd">
<alerts><alert uuid="u"><dst><smtp-to>a@example.com</smtp-to></dst></alert></alerts>
"""
PARAMETER_ENTITY = b"""<?xml version="1.0"?>
<!DOCTYPE alerts [<!ENTITY % remote SYSTEM "http://127.0.0.1:9/x.dtd"> %remote;]>
<alerts/>
"""


@pytest.mark.parametrize(
    "body",
    [BILLION_LAUGHS, EXTERNAL_ENTITY, EXTERNAL_DTD, PARAMETER_ENTITY],
    ids=["billion-laughs", "external-entity", "external-dtd", "parameter-entity"],
)
def test_parse_fireeye_xml_dtd_rejected(body: bytes) -> None:
    reason = reason_of(body)

    assert "DTD or an entity declaration" in reason


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"<alerts><alert>", "not well-formed XML"),
        (b"<alerts><alert uuid='u'></alerts>", "not well-formed XML"),
        (b"<alerts>\xff</alerts>", "not well-formed XML"),
        (b"<report><alert/></report>", "root element is 'report'"),
        (b"<alerts/>", "no alert member"),
        (
            b"<alerts><alert uuid='u'><dst/></alert></alerts>",
            "has no recipient",
        ),
        (
            b"<alerts>"
            + b"<a>" * (MAX_XML_DEPTH + 1)
            + b"</a>" * (MAX_XML_DEPTH + 1)
            + b"</alerts>",
            "levels deep",
        ),
        (
            b"<alerts>" + b"<a>" * 100_000 + b"</a>" * 100_000 + b"</alerts>",
            "levels deep",
        ),
    ],
    ids=[
        "truncated",
        "unclosed",
        "invalid-utf8",
        "wrong-root",
        "empty",
        "no-recipient",
        "too-deep",
        "very-deep",
    ],
)
def test_parse_fireeye_bad_xml_raises(body: bytes, fragment: str) -> None:
    assert fragment in reason_of(body)


# Invalid bodies.


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (notification(dst=None), "alert.dst.smtp-to"),
        (notification(dst={"smtp-to": []}), "alert.dst.smtp-to"),
        (notification(dst={"smtp-to": "not an address"}), "alert.dst.smtp-to"),
        (
            notification(dst={"smtp-to": "a@example.com\r\nBcc: x@example.com"}),
            "alert.dst.smtp-to",
        ),
        (notification(dst={"smtp-cc": [5]}), "alert.dst.smtp-cc"),
        (notification(dst="dave@example.com"), "alert.dst"),
        (notification(src={"smtp-mail-from": "a@b\nX: y"}), "alert.src.smtp-mail-from"),
        (notification(occurred="soon"), "alert.occurred"),
        (notification(occurred=1700000000), "alert.occurred"),
        (notification(id=4.5, uuid=None), "alert.id"),
        (notification(id=True, uuid=None), "alert.id"),
        (notification(uuid=["u"]), "alert.uuid"),
        (notification(severity={"level": 1, "x": {}}), "alert.severity"),
        (notification(**{"smtp-message": {"id": "<a@b>\nX: y"}}), "smtp-message.id"),
        (
            notification(**{"smtp-message": {"subject": "\ud800"}}),
            "smtp-message.subject",
        ),
        (
            notification(explanation={"malware-detected": {"malware": ["x"]}}),
            "malware[0]",
        ),
        (notification(explanation="x"), "alert.explanation"),
        ({"alert": "text"}, "alert"),
        ({"alert": ["text"]}, "alert[0]"),
        ({"alert": [{"uuid": "u", "dst": {"smtpTo": 5}}]}, "alert[0].dst.smtpTo"),
    ],
)
def test_parse_fireeye_invalid_field_names_field(body: object, field: str) -> None:
    assert field in reason_of(body)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"", "not valid JSON"),
        (b"{", "not valid JSON"),
        (b"[]", "object was expected"),
        (b'{"alert": NaN}', "not valid JSON"),
        (b"{}", "no alert member"),
        (b"[" * 100_000, "too deeply"),
    ],
)
def test_parse_fireeye_unusable_body_raises(body: bytes, fragment: str) -> None:
    assert fragment in reason_of(body)


def test_parse_fireeye_naive_received_at_is_programming_error() -> None:
    with pytest.raises(ValueError):
        parse_fireeye(notification(), received_at=datetime(2026, 12, 1))


def test_parse_fireeye_deep_value_wrappers_unwrapped() -> None:
    wrapped: object = "dave@example.com"
    for _ in range(5000):
        wrapped = {"value": wrapped}

    alert = parse_one(notification(dst={"smtp-to": wrapped}))

    assert alert["recipients"] == ["dave@example.com"]


# Recognizing the format.


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        (notification(), True),
        (wsapi(), True),
        ({"alert": []}, True),
        ({"alert": "x"}, False),
        ({"alert": {}, "json_version": "2.0"}, False),
        ({"messagesDelivered": []}, False),
        ([], False),
        ("alert", False),
    ],
)
def test_looks_like_fireeye_table(document: object, expected: bool) -> None:
    assert looks_like_fireeye(document) is expected


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (P11_XML, True),
        (b"<alert/>", True),
        (b"\xef\xbb\xbf  <fe:alerts xmlns:fe='x'>", True),
        (b"<!-- note --><?pi x?><!DOCTYPE alerts><alerts>", True),
        (BILLION_LAUGHS, True),
        (b"<!DOCTYPE alerts [<!ENTITY a 'b'>]>\n<alerts>", True),
        (b"<alertsx/>", False),
        (b"<report/>", False),
        (b"<?xml version='1.0'", False),
        (b'{"alert": {}}', False),
        (b"<!--" * 20_000, False),
    ],
)
def test_looks_like_fireeye_xml_table(body: bytes, expected: bool) -> None:
    assert looks_like_fireeye_xml(body) is expected


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"<alerts/>", True),
        (b"\xef\xbb\xbf\n<alerts/>", True),
        ("  <alerts/>", True),
        (b'{"alert": {}}', False),
        (b"", False),
    ],
)
def test_looks_like_xml_table(body: bytes | str, expected: bool) -> None:
    assert looks_like_xml(body) is expected


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
    | st.sampled_from(["", "a\r\nb", "\ud800", "<>", "2024-13-01", {"value": None}])
    | st.lists(JSON_SCALARS, max_size=3)
    | st.dictionaries(st.sampled_from(["value", "x"]), JSON_SCALARS, max_size=2)
)
ALERT_PATHS = [
    ("id",),
    ("uuid",),
    ("action",),
    ("occurred",),
    ("severity",),
    ("alert-url",),
    ("src",),
    ("src", "smtp-mail-from"),
    ("dst",),
    ("dst", "smtp-to"),
    ("dst", "smtp-cc"),
    ("smtp-message",),
    ("smtp-message", "id"),
    ("smtp-message", "subject"),
    ("explanation",),
    ("explanation", "malware-detected"),
    ("explanation", "malware-detected", "malware"),
]


@st.composite
def hostile_notifications(draw: st.DrawFn) -> dict[str, Any]:
    """A valid notification with one member replaced by a hostile value."""
    body = notification()
    path = draw(st.sampled_from(ALERT_PATHS))
    target = body["alert"]
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = draw(HOSTILE)
    return body


def check_any_outcome(body: object) -> None:
    """Assert that parsing returns valid alerts or raises InvalidAlertError only."""
    try:
        alerts = parse_fireeye(body, received_at=RECEIVED_AT)
    except InvalidAlertError as error:
        assert error.reason
        return
    for alert in alerts:
        assert_valid_avro(alert)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(JSON_VALUES)
def test_parse_fireeye_any_json_value_alerts_or_invalid(document: object) -> None:
    check_any_outcome(document)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(hostile_notifications())
def test_parse_fireeye_hostile_member_alerts_or_invalid(body: dict[str, Any]) -> None:
    check_any_outcome(body)


@settings(max_examples=200)
@given(st.binary(max_size=200))
def test_parse_fireeye_any_bytes_alerts_or_invalid(body: bytes) -> None:
    check_any_outcome(body)


@settings(max_examples=200)
@given(st.binary(max_size=200))
def test_parse_fireeye_xml_bytes_alerts_or_invalid(body: bytes) -> None:
    check_any_outcome(b"<alerts>" + body)


# The shipped examples.

EXAMPLE_FILES = sorted(EXAMPLES.glob("fireeye-*.json")) + sorted(
    EXAMPLES.glob("fireeye-*.xml")
)


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda path: path.name)
def test_parse_fireeye_example_file_valid(path: Path) -> None:
    alerts = parse(path.read_bytes())

    assert alerts


@pytest.mark.parametrize(
    "path", sorted(EXAMPLES.glob("fireeye-*.json")), ids=lambda path: path.name
)
def test_detect_format_fireeye_example_is_fireeye(path: Path) -> None:
    document = json.loads(path.read_bytes())

    assert detect_format(document).name == "fireeye"
    assert [f.name for f in FORMATS if f.matches(document)] == ["fireeye"]


def test_parse_fireeye_xml_example_matches_expected_plan() -> None:
    settings = PolicySettings(quarantine_mailbox="quarantine@example.com")
    expected = (EXAMPLES / "fireeye-xml.expected.jsonl").read_text().splitlines()

    lines = [
        json.dumps(decision.as_dict(), ensure_ascii=False)
        for alert in parse((EXAMPLES / "fireeye-xml.xml").read_bytes())
        for decision in decide(alert, alert["recipients"], settings)
    ]

    assert lines == expected
