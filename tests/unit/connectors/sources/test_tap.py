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

from autopull.connectors.sources.common import NormalizedAlert, ObjectReader
from autopull.connectors.sources.exceptions import InvalidAlertError
from autopull.connectors.sources.tap import (
    classify_single_event,
    looks_like_tap,
    parse_tap,
)

REPO = Path(__file__).resolve().parents[4]
SCHEMA_JSON = json.loads((REPO / "schemas" / "NormalizedAlert.avsc").read_text())
SCHEMA = fastavro.parse_schema(SCHEMA_JSON)
RECEIVED_AT = datetime(2026, 12, 1, 10, 0, 5, tzinfo=UTC)
M1_ID = "20261201093000.1234.invoice@billing-example.net"
M1_URL = "http://billing-example.net/pay/4471"
THREAT_ID = "6d902e1c29c4d87982f2faa63f433b4dbaec329a78011031892a08fcc54c2f63"
FILE_SHA256 = "49b6f8024198683995067a05c1c026256090b06ab7c7045ca7ac766b450c8fe8"
CAMPAIGN_ID = "8a285c6c-bb1e-5f0e-9812-9944f7ba1765"
GUID = "bX4Ta9Lq2Wm7Rk1Yp8Vd3Nf6Hc0Zs5"


def wire_message(**changes: Any) -> dict[str, Any]:
    """A messagesDelivered event as the API sends it."""
    event: dict[str, Any] = {
        "GUID": "bX4Ta9Lq2Wm7Rk1Yp8Vd3Nf6Hc0Zs5",
        "QID": "4BQ1pK0y019873",
        "id": "6f1c2a9e-3b7d-4e58-9a10-c4d2e8f7b315",
        "cluster": "example_hosted",
        "completelyRewritten": True,
        "fromAddress": ["billing@example.net"],
        "headerFrom": '"Billing Department" <billing@example.net>',
        "messageID": f"<{M1_ID}>",
        "messageTime": "2026-12-01T09:30:04.000Z",
        "messageParts": [
            {
                "disposition": "inline",
                "filename": "text.html",
                "contentType": "text/html",
                "md5": "4f1d9b2c7e3a5068d1c2b3a4e5f60718",
                "sha256": "9c2e1f4a7b3d6e8f0a1b2c3d4e5f6071"
                "8293a4b5c6d7e8f90a1b2c3d4e5f6071",
            }
        ],
        "recipient": ["alice@example.com", "bob@example.com", "carol@example.com"],
        "sender": "billing@example.net",
        "senderIP": "192.0.2.44",
        "subject": "Invoice 4471 overdue",
        "spamScore": 21,
        "phishScore": 100,
        "malwareScore": 0,
        "impostorScore": 0.0,
        "quarantineFolder": None,
        "quarantineRule": None,
        "threatsInfoMap": [
            {
                "campaignID": CAMPAIGN_ID,
                "classification": "phish",
                "threat": M1_URL,
                "threatID": THREAT_ID,
                "threatStatus": "active",
                "threatTime": "2026-12-01T09:41:12.000Z",
                "threatType": "url",
                "threatUrl": f"https://threatinsight.proofpoint.com/c/threat/email/{THREAT_ID}",
            }
        ],
    }
    event.update(changes)
    return event


def doc_message(**changes: Any) -> dict[str, Any]:
    """The same message in the spelling of Proofpoint's documentation."""
    event: dict[str, Any] = {
        "GUID": "bX4Ta9Lq2Wm7Rk1Yp8Vd3Nf6Hc0Zs5",
        "QID": "4BQ1pK0y019873",
        "clusterId": "example_hosted",
        "completelyRewritten": "true",
        "fromAddress": "billing@example.net",
        "headerFrom": None,
        "headerTo": "alice@example.com",
        "messageID": M1_ID,
        "messageTime": "2026-12-01T09:30:04.000Z",
        "recipient": ["alice@example.com"],
        "sender": "e99d7ed5580193f36a51f597bc2c0210@example.net",
        "senderIP": "192.0.2.44",
        "subject": "Invoice 4471 overdue",
        "phishScore": 46,
        "threatsInfoMap": [
            {
                "campaignId": CAMPAIGN_ID,
                "classification": "PHISH",
                "threat": M1_URL,
                "threatId": THREAT_ID,
                "threatTime": "2026-12-01T09:41:12.000Z",
                "threatType": "URL",
                "threatUrl": f"https://threatinsight.proofpoint.com/#/c/threat/email/{THREAT_ID}",
            }
        ],
    }
    event.update(changes)
    return event


def wire_click(**changes: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "GUID": "bX4Ta9Lq2Wm7Rk1Yp8Vd3Nf6Hc0Zs5",
        "id": "a41f6c93-2d7e-4b05-8c1a-e9f3b6d20457",
        "campaignId": CAMPAIGN_ID,
        "classification": "phish",
        "clickIP": "192.0.2.77",
        "clickTime": "2026-12-01T09:36:12.000Z",
        "messageID": M1_ID,
        "recipient": "Bob@example.com",
        "sender": "billing@example.net",
        "senderIP": "192.0.2.44",
        "threatID": THREAT_ID,
        "threatStatus": "active",
        "threatURL": f"https://threatinsight.proofpoint.com/c/threat/email/{THREAT_ID}",
        "url": M1_URL,
        "userAgent": "Mozilla/5.0",
    }
    event.update(changes)
    return event


def parse(document: object) -> list[NormalizedAlert]:
    alerts = parse_tap(document, received_at=RECEIVED_AT)
    for alert in alerts:
        assert_valid_avro(alert)
    return alerts


def parse_one(document: object) -> NormalizedAlert:
    alerts = parse(document)
    assert len(alerts) == 1
    return alerts[0]


def assert_valid_avro(alert: NormalizedAlert) -> None:
    """Validate every field against the schema and round-trip the alert."""
    field_names = {field["name"] for field in SCHEMA_JSON["fields"]}
    assert set(alert) == field_names
    assert validate(alert, SCHEMA, raise_errors=True)

    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, SCHEMA, alert)
    buffer.seek(0)
    decoded = fastavro.schemaless_reader(buffer, SCHEMA, SCHEMA)
    assert decoded == alert


def recipients_digest(*addresses: str) -> str:
    """Return the digest an alert id uses for several recipients."""
    joined = "\n".join(sorted(addresses)).encode()
    return hashlib.sha256(joined).hexdigest()[:24]


def envelope(**arrays: object) -> dict[str, Any]:
    return {"queryEndTime": "2026-12-01T10:00:00Z", **arrays}


# Message events, wire spelling.


def test_parse_tap_wire_message_fields() -> None:
    alert = parse_one(envelope(messagesDelivered=[wire_message()]))

    assert alert["alert_id"] == "tap:6f1c2a9e-3b7d-4e58-9a10-c4d2e8f7b315"
    assert alert["source"] == "tap"
    assert alert["source_alert_id"] == "6f1c2a9e-3b7d-4e58-9a10-c4d2e8f7b315"
    assert alert["event_class"] == "message_delivered"
    assert alert["received_at"] == RECEIVED_AT
    assert alert["message_id"] == M1_ID
    assert alert["message_id_synthetic"] is False
    assert alert["source_guid"] == "bX4Ta9Lq2Wm7Rk1Yp8Vd3Nf6Hc0Zs5"
    assert alert["sender"] == "billing@example.net"
    assert alert["header_from"] == '"Billing Department" <billing@example.net>'
    assert alert["sender_ip"] == "192.0.2.44"
    assert alert["subject"] == "Invoice 4471 overdue"
    assert alert["recipients"] == [
        "alice@example.com",
        "bob@example.com",
        "carol@example.com",
    ]
    assert alert["classification"] == "phish"
    assert alert["threat_status"] == "active"
    assert alert["campaign_id"] == CAMPAIGN_ID
    assert alert["urls"] == [M1_URL]
    assert alert["attachments"] == []
    assert alert["clicker"] is None


def test_parse_tap_wire_message_times_are_utc() -> None:
    alert = parse_one(wire_message())

    expected = datetime(2026, 12, 1, 9, 30, 4, tzinfo=UTC)
    assert alert["delivered_at"] == expected
    assert alert["occurred_at"] == expected


def test_parse_tap_wire_message_scores_map() -> None:
    alert = parse_one(wire_message())

    assert alert["scores"] == {
        "spam": 21.0,
        "phish": 100.0,
        "malware": 0.0,
        "impostor": 0.0,
    }


def test_parse_tap_wire_message_threat_record() -> None:
    alert = parse_one(wire_message())

    assert alert["threats"] == [
        {
            "threat_id": THREAT_ID,
            "kind": "url",
            "value": M1_URL,
            "classification": "phish",
            "status": "active",
            "url": f"https://threatinsight.proofpoint.com/c/threat/email/{THREAT_ID}",
        }
    ]


def test_parse_tap_wire_message_custom_fields() -> None:
    alert = parse_one(wire_message())

    assert alert["custom_fields"] == {
        "cluster": "example_hosted",
        "qid": "4BQ1pK0y019873",
        "completely_rewritten": "true",
    }


# The documentation's spelling of the same message.


def test_parse_tap_doc_dialect_same_verdict_as_wire() -> None:
    wire = parse_one(wire_message(recipient=["alice@example.com"]))
    doc = parse_one(envelope(messagesDelivered=[doc_message()]))

    assert doc["message_id"] == wire["message_id"]
    assert doc["classification"] == "phish"
    assert doc["threat_status"] == "active"
    assert doc["campaign_id"] == CAMPAIGN_ID
    assert doc["urls"] == [M1_URL]
    assert doc["threats"][0]["threat_id"] == THREAT_ID
    assert doc["threats"][0]["kind"] == "url"
    assert doc["recipients"] == wire["recipients"]


def test_parse_tap_doc_dialect_string_fields() -> None:
    alert = parse_one(doc_message())

    assert alert["header_from"] == "billing@example.net"
    assert alert["custom_fields"]["cluster"] == "example_hosted"
    assert alert["custom_fields"]["completely_rewritten"] == "true"
    assert alert["sender"] == "e99d7ed5580193f36a51f597bc2c0210@example.net"


def test_parse_tap_doc_dialect_without_id_uses_guid() -> None:
    alert = parse_one(doc_message())

    assert alert["alert_id"] == (
        "tap:bX4Ta9Lq2Wm7Rk1Yp8Vd3Nf6Hc0Zs5:alice@example.com:message_delivered:active"
    )
    assert alert["source_alert_id"] == "bX4Ta9Lq2Wm7Rk1Yp8Vd3Nf6Hc0Zs5"


def test_parse_tap_missing_threat_status_means_active() -> None:
    alert = parse_one(doc_message())

    assert alert["threats"][0]["status"] == "active"


# Identity of events.


def test_parse_tap_without_id_one_alert_for_all_recipients() -> None:
    event = wire_message()
    del event["id"]

    alert = parse_one(event)

    digest = recipients_digest(
        "alice@example.com", "bob@example.com", "carol@example.com"
    )
    assert alert["recipients"] == [
        "alice@example.com",
        "bob@example.com",
        "carol@example.com",
    ]
    assert alert["alert_id"] == (
        f"tap:{GUID}:3-recipients-{digest}:message_delivered:active"
    )
    assert alert["source_alert_id"] == GUID


def test_parse_tap_without_id_one_recipient_identity() -> None:
    event = wire_message(recipient=["Bob@example.com"])
    del event["id"]

    alert = parse_one(event)

    assert alert["alert_id"] == f"tap:{GUID}:bob@example.com:message_delivered:active"


def test_parse_tap_same_guid_events_merged() -> None:
    # TAP may send one event per recipient of one message, each with its own id.
    body = envelope(
        messagesDelivered=[
            wire_message(id="m1", recipient=["alice@example.com"]),
            wire_message(id="m2", recipient=["bob@example.com"]),
            wire_message(id="m3", recipient=["Alice@example.com"]),
        ]
    )

    alert = parse_one(body)

    digest = recipients_digest("alice@example.com", "bob@example.com")
    assert alert["recipients"] == ["alice@example.com", "bob@example.com"]
    assert alert["alert_id"] == (
        f"tap:{GUID}:2-recipients-{digest}:message_delivered:active"
    )
    assert alert["source_alert_id"] == GUID
    assert alert["urls"] == [M1_URL]


def test_parse_tap_same_guid_findings_combined() -> None:
    second = wire_message(id="m2", recipient=["bob@example.com"])
    second["threatsInfoMap"][0]["threat"] = "http://billing-example.net/other"
    body = envelope(messagesDelivered=[wire_message(id="m1"), second])

    alert = parse_one(body)

    assert alert["urls"] == [M1_URL, "http://billing-example.net/other"]
    assert len(alert["threats"]) == 2


def test_parse_tap_same_guid_replay_same_identity() -> None:
    body = envelope(
        messagesDelivered=[
            wire_message(id="m1", recipient=["alice@example.com"]),
            wire_message(id="m2", recipient=["bob@example.com"]),
        ]
    )

    assert parse_one(body)["alert_id"] == parse_one(copy.deepcopy(body))["alert_id"]


def test_parse_tap_same_guid_other_status_apart() -> None:
    cleared = wire_message(id="m2", recipient=["bob@example.com"])
    cleared["threatsInfoMap"][0]["threatStatus"] = "cleared"
    body = envelope(messagesDelivered=[wire_message(id="m1"), cleared])

    alerts = parse(body)

    assert [alert["alert_id"] for alert in alerts] == ["tap:m1", "tap:m2"]


def test_parse_tap_same_guid_clicks_apart() -> None:
    body = envelope(
        clicksPermitted=[
            wire_click(id="c1", recipient="alice@example.com"),
            wire_click(id="c2", recipient="bob@example.com"),
        ]
    )

    alerts = parse(body)

    assert [alert["clicker"] for alert in alerts] == [
        "alice@example.com",
        "bob@example.com",
    ]


def test_parse_tap_event_id_single_alert() -> None:
    alerts = parse(wire_message())

    assert len(alerts) == 1
    assert len(alerts[0]["recipients"]) == 3


def test_parse_tap_later_cleared_verdict_new_identity() -> None:
    active = doc_message()
    cleared = copy.deepcopy(active)
    cleared["threatsInfoMap"][0]["threatStatus"] = "cleared"

    first = parse_one(active)
    second = parse_one(cleared)

    assert second["alert_id"] != first["alert_id"]
    assert second["alert_id"].endswith(":message_delivered:cleared")
    assert second["threat_status"] == "cleared"


def test_parse_tap_same_guid_other_class_new_identity() -> None:
    event = doc_message()

    delivered = parse_one(envelope(messagesDelivered=[event]))
    blocked = parse_one(envelope(messagesBlocked=[event]))

    assert delivered["alert_id"] != blocked["alert_id"]


def test_parse_tap_replayed_event_same_identity() -> None:
    first = parse_one(doc_message())
    second = parse_one(doc_message())

    assert first["alert_id"] == second["alert_id"]


def test_parse_tap_without_id_and_guid_raises() -> None:
    event = wire_message(GUID=None)
    del event["id"]

    with pytest.raises(InvalidAlertError) as caught:
        parse(event)

    assert "GUID" in caught.value.reason


# Envelopes and single events.


def test_parse_tap_envelope_order_is_class_then_array() -> None:
    body = {
        "clicksBlocked": [wire_click(id="c2", recipient="alice@example.com")],
        "clicksPermitted": [wire_click(id="c1")],
        "messagesBlocked": [wire_message(id="m3", recipient=["frank@example.com"])],
        "messagesDelivered": [
            wire_message(id="m1"),
            wire_message(id="m2", GUID="other-guid"),
        ],
        "queryEndTime": "2026-12-01T10:00:00Z",
    }

    alerts = parse(body)

    assert [alert["alert_id"] for alert in alerts] == [
        "tap:m1",
        "tap:m2",
        "tap:m3",
        "tap:c1",
        "tap:c2",
    ]
    assert [alert["event_class"] for alert in alerts] == [
        "message_delivered",
        "message_delivered",
        "message_blocked",
        "click_permitted",
        "click_blocked",
    ]


def test_parse_tap_empty_envelope_no_alerts() -> None:
    assert parse({"queryEndTime": "2024-10-11T14:34:53Z", "clicksPermitted": []}) == []


def test_parse_tap_null_event_array_no_alerts() -> None:
    assert parse(envelope(clicksBlocked=None)) == []


def test_parse_tap_bytes_body_parses() -> None:
    body = json.dumps(envelope(messagesDelivered=[wire_message()])).encode()

    assert len(parse_tap(body, received_at=RECEIVED_AT)) == 1


def test_parse_tap_single_message_is_delivered() -> None:
    assert parse_one(wire_message())["event_class"] == "message_delivered"


@pytest.mark.parametrize(
    "changes",
    [
        {"quarantineFolder": "Attachment Defense"},
        {"quarantineRule": "module.sandbox.threat"},
    ],
)
def test_parse_tap_single_message_quarantined_is_blocked(
    changes: dict[str, str],
) -> None:
    assert parse_one(wire_message(**changes))["event_class"] == "message_blocked"


def test_parse_tap_single_click_is_permitted() -> None:
    assert parse_one(wire_click())["event_class"] == "click_permitted"


def test_classify_single_event_unknown_shape_raises() -> None:
    with pytest.raises(InvalidAlertError):
        classify_single_event(ObjectReader({"GUID": "x", "subject": "hello"}, ""))


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        (envelope(messagesDelivered=[]), True),
        ({"queryEndTime": "2026-12-01T10:00:00Z"}, True),
        (wire_message(), True),
        (wire_click(), True),
        ({"alert": {"id": 1}}, False),
        ({"GUID": "x"}, False),
        ([wire_message()], False),
        ("tap", False),
    ],
)
def test_looks_like_tap_table(document: object, expected: bool) -> None:
    assert looks_like_tap(document) is expected


# Field variants.


def test_parse_tap_recipient_string_accepted() -> None:
    alert = parse_one(wire_message(recipient="Alice@Example.com"))

    assert alert["recipients"] == ["alice@example.com"]


def test_parse_tap_recipients_lowered_and_deduplicated() -> None:
    alert = parse_one(
        wire_message(
            recipient=["Bob@example.com", "bob@EXAMPLE.com", "alice@example.com"]
        )
    )

    assert alert["recipients"] == ["bob@example.com", "alice@example.com"]


def test_parse_tap_empty_message_id_is_empty() -> None:
    alert = parse_one(
        wire_message(messageID="", sender="", subject=None, messageParts=None)
    )

    assert alert["message_id"] == ""
    assert alert["sender"] == ""
    assert alert["subject"] is None


def test_parse_tap_folded_message_id_is_bare() -> None:
    folded = (
        "PAXP193MB2314C6F90A60DA909597069AA7802@PAXP193MB2314.eurprd01.mail.example.com"
    )

    alert = parse_one(wire_message(messageID=f" <{folded}>"))

    assert alert["message_id"] == folded


def test_parse_tap_reserved_characters_in_id_kept() -> None:
    alert = parse_one(
        wire_message(messageID="<CAH7x+q/Lk=Zp'8#w%41&r@mail.example.net>")
    )

    assert alert["message_id"] == "CAH7x+q/Lk=Zp'8#w%41&r@mail.example.net"


def test_parse_tap_synthetic_message_id_flagged() -> None:
    alert = parse_one(wire_message(messageID="<queue-id-7Q2@no-message-id>"))

    assert alert["message_id_synthetic"] is True


def test_parse_tap_attached_parts_become_attachments() -> None:
    parts = [
        {"disposition": "inline", "filename": "text.txt", "md5": "a" * 32},
        {
            "disposition": "attached",
            "filename": "Scan.docm",
            "contentType": "application/vnd.ms-word.document.macroEnabled.12",
            "md5": "364206436FDDF7725BA589BE4E8E0005",
            "sha256": FILE_SHA256.upper(),
        },
    ]

    alert = parse_one(wire_message(messageParts=parts, threatsInfoMap=[]))

    assert alert["attachments"] == [
        {
            "name": "Scan.docm",
            "content_type": "application/vnd.ms-word.document.macroEnabled.12",
            "md5": "364206436fddf7725ba589be4e8e0005",
            "sha256": FILE_SHA256,
        }
    ]


def test_parse_tap_repeated_part_listed_once() -> None:
    part = {"disposition": "attached", "filename": "a.zip", "sha256": FILE_SHA256}

    alert = parse_one(wire_message(messageParts=[part, dict(part)]))

    assert len(alert["attachments"]) == 1


def test_parse_tap_attachment_threat_without_part_adds_hash() -> None:
    threat = {
        "classification": "malware",
        "threat": FILE_SHA256,
        "threatID": FILE_SHA256,
        "threatStatus": "active",
        "threatType": "attachment",
    }

    alert = parse_one(wire_message(messageParts=None, threatsInfoMap=[threat]))

    assert alert["attachments"] == [
        {"name": None, "content_type": None, "md5": None, "sha256": FILE_SHA256}
    ]
    assert alert["classification"] == "malware"
    assert alert["urls"] == []


def test_parse_tap_hash_url_threat_excluded() -> None:
    threat = {"classification": "phish", "threat": THREAT_ID, "threatType": "url"}

    alert = parse_one(wire_message(threatsInfoMap=[threat]))

    assert alert["urls"] == []
    assert alert["threats"][0]["value"] == THREAT_ID


def test_parse_tap_most_severe_threat_wins() -> None:
    threats = [
        {"classification": "spam", "threat": "a.example.net", "threatType": "url"},
        {
            "classification": "MALWARE",
            "threat": FILE_SHA256,
            "threatType": "attachment",
        },
        {"classification": "phish", "threat": M1_URL, "threatType": "url"},
    ]

    alert = parse_one(wire_message(threatsInfoMap=threats))

    assert alert["classification"] == "malware"


def test_parse_tap_active_spam_outranks_cleared_phish() -> None:
    threats = [
        {"classification": "phish", "threatStatus": "cleared", "threat": M1_URL},
        {"classification": "spam", "threatStatus": "active", "threat": "b.example.net"},
    ]

    alert = parse_one(wire_message(threatsInfoMap=threats))

    assert alert["classification"] == "spam"
    assert alert["threat_status"] == "active"


def test_parse_tap_all_false_positive_is_false_positive() -> None:
    threats = [{"classification": "phish", "threatStatus": "falsePositive"}]

    alert = parse_one(wire_message(threatsInfoMap=threats))

    assert alert["threat_status"] == "false_positive"
    assert alert["classification"] == "phish"


def test_parse_tap_no_threats_unknown_and_active() -> None:
    alert = parse_one(wire_message(threatsInfoMap=None))

    assert alert["classification"] == "unknown"
    assert alert["threat_status"] == "active"
    assert alert["threats"] == []


def test_parse_tap_folded_subject_unfolded() -> None:
    alert = parse_one(wire_message(subject="Invoice 4471\r\n overdue"))

    assert alert["subject"] == "Invoice 4471 overdue"


def test_parse_tap_non_ascii_subject_kept() -> None:
    subject = "RSVP today \u2013 Platform\u2019s launch"

    assert parse_one(wire_message(subject=subject))["subject"] == subject


# Click events.


def test_parse_tap_click_fields() -> None:
    alert = parse_one(envelope(clicksPermitted=[wire_click()]))

    assert alert["alert_id"] == "tap:a41f6c93-2d7e-4b05-8c1a-e9f3b6d20457"
    assert alert["event_class"] == "click_permitted"
    assert alert["clicker"] == "bob@example.com"
    assert alert["recipients"] == ["bob@example.com"]
    assert alert["click_ip"] == "192.0.2.77"
    assert alert["message_id"] == M1_ID
    assert alert["occurred_at"] == datetime(2026, 12, 1, 9, 36, 12, tzinfo=UTC)
    assert alert["delivered_at"] is None
    assert alert["urls"] == [M1_URL]
    assert alert["campaign_id"] == CAMPAIGN_ID
    assert alert["classification"] == "phish"
    assert alert["custom_fields"] == {"user_agent": "Mozilla/5.0"}


def test_parse_tap_click_threat_from_event() -> None:
    alert = parse_one(wire_click(classification="MALWARE", threatStatus="cleared"))

    assert alert["threats"] == [
        {
            "threat_id": THREAT_ID,
            "kind": "url",
            "value": M1_URL,
            "classification": "malware",
            "status": "cleared",
            "url": f"https://threatinsight.proofpoint.com/c/threat/email/{THREAT_ID}",
        }
    ]
    assert alert["threat_status"] == "cleared"


def test_parse_tap_click_doc_spellings() -> None:
    click = wire_click(threatUrl="https://x.example/t", campaignID="camp")
    del click["threatURL"]
    del click["campaignId"]

    alert = parse_one(click)

    assert alert["threats"][0]["url"] == "https://x.example/t"
    assert alert["campaign_id"] == "camp"


def test_parse_tap_click_two_recipients_raises() -> None:
    click = wire_click(recipient=["bob@example.com", "alice@example.com"])

    with pytest.raises(InvalidAlertError) as caught:
        parse(click)

    assert "recipient" in caught.value.reason


def test_parse_tap_click_without_id_identity_has_clicker() -> None:
    click = wire_click()
    del click["id"]

    alert = parse_one(click)

    assert alert["alert_id"] == (
        "tap:bX4Ta9Lq2Wm7Rk1Yp8Vd3Nf6Hc0Zs5:bob@example.com:click_permitted:active"
    )


# Invalid bodies.


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"not json", "not valid JSON"),
        (b"", "not valid JSON"),
        (b"[]", "object was expected"),
        (b'"text"', "object was expected"),
        (b"null", "object was expected"),
        (b'{"subject": "hello"}', "neither a TAP SIEM response"),
    ],
)
def test_parse_tap_unusable_body_raises(body: bytes, fragment: str) -> None:
    with pytest.raises(InvalidAlertError) as caught:
        parse_tap(body, received_at=RECEIVED_AT)

    assert fragment in caught.value.reason


@pytest.mark.parametrize(
    ("document", "field"),
    [
        (envelope(messagesDelivered=[wire_message(recipient=[])]), "recipient"),
        (envelope(messagesDelivered=[wire_message(recipient=None)]), "recipient"),
        (
            envelope(
                messagesDelivered=[wire_message(recipient=["a@example.com\r\nBcc: x"])]
            ),
            "messagesDelivered[0].recipient",
        ),
        (envelope(messagesDelivered=[wire_message(recipient=[42])]), "recipient"),
        (envelope(messagesDelivered=["event"]), "messagesDelivered[0]"),
        (envelope(messagesDelivered={"a": 1}), "messagesDelivered"),
        (
            envelope(messagesDelivered=[wire_message(threatsInfoMap="x")]),
            "threatsInfoMap",
        ),
        (
            envelope(messagesDelivered=[wire_message(threatsInfoMap=[1])]),
            "messagesDelivered[0].threatsInfoMap[0]",
        ),
        (envelope(messagesDelivered=[wire_message(messageTime="soon")]), "messageTime"),
        (
            envelope(messagesDelivered=[wire_message(messageTime=1700000000)]),
            "messageTime",
        ),
        (envelope(messagesDelivered=[wire_message(spamScore="high")]), "spamScore"),
        (envelope(messagesDelivered=[wire_message(messageID=["a"])]), "messageID"),
        (
            envelope(messagesDelivered=[wire_message(messageID="<a@b>\r\nX: y")]),
            "messageID",
        ),
        (envelope(messagesDelivered=[wire_message(sender="a@b\nX: y")]), "sender"),
        (
            envelope(messagesDelivered=[wire_message(messageParts=[None])]),
            "messageParts",
        ),
        ({"queryEndTime": "yesterday"}, "queryEndTime"),
        (envelope(clicksPermitted=[wire_click(clickTime="")]), "clickTime"),
        (envelope(clicksPermitted=[wire_click(recipient="")]), "recipient"),
    ],
)
def test_parse_tap_invalid_field_names_field(document: object, field: str) -> None:
    with pytest.raises(InvalidAlertError) as caught:
        parse_tap(document, received_at=RECEIVED_AT)

    assert field in caught.value.reason


def test_parse_tap_naive_received_at_is_programming_error() -> None:
    with pytest.raises(ValueError):
        parse_tap(wire_message(), received_at=datetime(2026, 12, 1))


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
HOSTILE_VALUES = (
    JSON_SCALARS
    | st.sampled_from(["", "a\r\nb", "\ud800", "<>", "2026-13-01", FILE_SHA256])
    | st.lists(JSON_SCALARS, max_size=3)
)
ADDRESSES = st.sampled_from(
    ["alice@example.com", "Bob@Example.com", "<carol@example.com>", "dave@example.com"]
)
TIMES = st.sampled_from(
    ["2026-12-01T09:30:04.000Z", "2024-03-10 01:30:00 -0800", "2021-03-30T11:21:24.43Z"]
)
WORDS = st.sampled_from(["", "phish", "MALWARE", "spam", "impostor", "toad", "url"])
STATUSES = st.sampled_from(["active", "cleared", "falsePositive", "expired", "ACTIVE"])
MESSAGE_IDS = st.sampled_from(
    [
        "",
        f"<{M1_ID}>",
        M1_ID,
        " <[gw10].1c69fb81@[gw13].example.com>",
        "queue-id-1@no-message-id",
    ]
)
SCORES = st.integers(0, 100) | st.floats(0, 100)
TEXT = st.text(max_size=20)

VALID_THREAT_FIELDS = {
    "threatID": TEXT,
    "threatId": TEXT,
    "threat": st.sampled_from([M1_URL, FILE_SHA256, "example.net/x"]),
    "threatType": st.sampled_from(["url", "URL", "attachment", "message", ""]),
    "classification": WORDS,
    "threatStatus": STATUSES,
    "threatUrl": TEXT,
    "campaignID": TEXT,
    "campaignId": TEXT,
}
VALID_PART_FIELDS = {
    "disposition": st.sampled_from(["inline", "attached", "ATTACHED"]),
    "filename": TEXT,
    "contentType": TEXT,
    "md5": st.sampled_from(["a" * 32, "B" * 32]),
    "sha256": st.sampled_from([FILE_SHA256, FILE_SHA256.upper()]),
}
VALID_EVENT_FIELDS = {
    "id": TEXT,
    "QID": TEXT,
    "messageID": MESSAGE_IDS,
    "messageTime": TIMES,
    "sender": ADDRESSES | st.sampled_from(["", "<>", "MAILER-DAEMON"]),
    "senderIP": TEXT,
    "fromAddress": ADDRESSES | st.lists(ADDRESSES, max_size=2),
    "headerFrom": TEXT,
    "subject": TEXT,
    "spamScore": SCORES,
    "impostorScore": SCORES,
    "cluster": TEXT,
    "clusterId": TEXT,
    "completelyRewritten": st.booleans() | st.sampled_from(["true", "na"]),
    "quarantineFolder": st.none() | TEXT,
    "clickIP": TEXT,
    "classification": WORDS,
    "threatStatus": STATUSES,
    "threatsInfoMap": st.lists(
        st.fixed_dictionaries({}, optional=VALID_THREAT_FIELDS), max_size=3
    ),
    "messageParts": st.lists(
        st.fixed_dictionaries({}, optional=VALID_PART_FIELDS), max_size=3
    ),
}


@st.composite
def tap_events(draw: st.DrawFn, click: bool) -> dict[str, object]:
    """A TAP event of valid fields, sometimes with one field made hostile."""
    event: dict[str, object] = draw(
        st.fixed_dictionaries({}, optional=VALID_EVENT_FIELDS)
    )
    event["GUID"] = draw(st.text(min_size=1, max_size=30))
    if click:
        event["clickTime"] = draw(TIMES)
        event["url"] = M1_URL
        event["recipient"] = draw(ADDRESSES)
    else:
        event["recipient"] = draw(st.lists(ADDRESSES, min_size=1, max_size=3))

    if draw(st.booleans()):
        key = draw(st.sampled_from(sorted({*VALID_EVENT_FIELDS, "GUID", "recipient"})))
        event[key] = draw(HOSTILE_VALUES)
    return event


TAP_ENVELOPES = st.fixed_dictionaries(
    {},
    optional={
        "queryEndTime": TIMES,
        "messagesDelivered": st.lists(tap_events(click=False), max_size=3),
        "messagesBlocked": st.lists(tap_events(click=False), max_size=2),
        "clicksPermitted": st.lists(tap_events(click=True), max_size=2),
        "clicksBlocked": st.lists(tap_events(click=True), max_size=2),
    },
)
TAP_DOCUMENTS = TAP_ENVELOPES | tap_events(click=False) | tap_events(click=True)


def check_any_outcome(document: object) -> None:
    """Assert that parsing returns valid alerts or raises InvalidAlertError only."""
    try:
        alerts = parse_tap(document, received_at=RECEIVED_AT)
    except InvalidAlertError as error:
        assert error.reason
        return
    for alert in alerts:
        assert_valid_avro(alert)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(JSON_VALUES)
def test_parse_tap_any_json_value_alerts_or_invalid(document: object) -> None:
    check_any_outcome(document)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(TAP_DOCUMENTS)
def test_parse_tap_tap_shaped_input_alerts_or_invalid(document: object) -> None:
    check_any_outcome(document)


@settings(max_examples=200)
@given(st.binary(max_size=200))
def test_parse_tap_any_bytes_alerts_or_invalid(body: bytes) -> None:
    check_any_outcome(body)


# The shipped examples.

EXAMPLE_FILES = sorted(
    path
    for path in (REPO / "examples" / "alerts").glob("tap-*.json")
    if not path.name.endswith(".expected.json")
)


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda path: path.name)
def test_parse_tap_example_file_valid(path: Path) -> None:
    alerts = parse_tap(path.read_bytes(), received_at=RECEIVED_AT)

    assert alerts
    for alert in alerts:
        assert_valid_avro(alert)


def test_parse_tap_malware_example_attachment() -> None:
    body = (REPO / "examples" / "alerts" / "tap-delivered-malware.json").read_bytes()

    alert = parse_one(json.loads(body))

    assert alert["message_id"] == "CAH7x+q/Lk=Zp'8#w%41&r@mail.example.net"
    assert alert["classification"] == "malware"
    assert alert["attachments"] == [
        {
            "name": "Scan_20261201_0941.docm",
            "content_type": "application/vnd.ms-word.document.macroEnabled.12",
            "md5": "364206436fddf7725ba589be4e8e0005",
            "sha256": FILE_SHA256,
        }
    ]
