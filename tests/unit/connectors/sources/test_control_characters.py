"""Control characters in alert fields: display text is kept, addresses are rejected.

An attacker controls the subject of a message, so a line break or control character
there must not cost the alert. An address with one is still invalid, but in a body
with several events only that event is rejected.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from autopull.connectors.sources.common import NormalizedAlert
from autopull.connectors.sources.detect import parse_alert
from autopull.connectors.sources.exceptions import InvalidAlertError
from autopull.streams.policy import PolicySettings, decide, message_search

REPO = Path(__file__).resolve().parents[4]
EXAMPLES = REPO / "examples" / "alerts"
RECEIVED_AT = datetime(2026, 12, 1, 10, 0, 5, tzinfo=UTC)
SETTINGS = PolicySettings(quarantine_mailbox="quarantine@example.com")

# Line separator, next line, escape, bell and delete, with their escaped spelling.
CONTROLS = [
    ("\u2028", "\\u2028"),
    ("\x85", "\\u0085"),
    ("\x1b", "\\u001b"),
    ("\x07", "\\u0007"),
    ("\x7f", "\\u007f"),
]
# Where each format carries the subject, as keys from the document root.
SUBJECT_PATHS = {
    "tap-delivered-phish.json": ("messagesDelivered", 0, "subject"),
    "fireeye-notification.json": ("alert", "smtp-message", "subject"),
    "fireeye-wsapi.json": ("alert", 0, "smtpMessage", "subject"),
    "generic-full.json": ("email", "subject"),
}


def example(name: str) -> Any:
    return json.loads((EXAMPLES / name).read_text())


def with_value(document: Any, path: tuple[str | int, ...], value: object) -> Any:
    copy = json.loads(json.dumps(document))
    target = copy
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return copy


def parse(document: object, rejected: list[InvalidAlertError] | None = None) -> Any:
    body = json.dumps(document).encode()
    return parse_alert(body, received_at=RECEIVED_AT, rejected=rejected)


@pytest.mark.parametrize("name", sorted(SUBJECT_PATHS))
@pytest.mark.parametrize(("control", "escaped"), CONTROLS)
def test_subject_control_character_replaced(
    name: str, control: str, escaped: str
) -> None:
    path = SUBJECT_PATHS[name]
    document = with_value(example(name), path, f"Invoice{control}4471")

    alerts = parse(document)

    assert len(alerts) >= 1
    alert = alerts[0]
    assert alert["subject"] == "Invoice\ufffd4471"
    assert alert["custom_fields"]["subject_escaped"] == f"Invoice{escaped}4471"
    assert alert["recipients"]


@pytest.mark.parametrize("name", sorted(SUBJECT_PATHS))
def test_subject_clean_keeps_no_escaped_field(name: str) -> None:
    alert = parse(example(name))[0]

    assert "\ufffd" not in (alert["subject"] or "")
    assert "subject_escaped" not in alert["custom_fields"]


def test_subject_folding_and_tab_kept() -> None:
    path = SUBJECT_PATHS["tap-delivered-phish.json"]
    document = with_value(example("tap-delivered-phish.json"), path, "A\r\n B\tC")

    alert = parse(document)[0]

    assert alert["subject"] == "A B\tC"
    assert "subject_escaped" not in alert["custom_fields"]


def test_subject_header_injection_replaced() -> None:
    path = SUBJECT_PATHS["generic-full.json"]
    document = with_value(
        example("generic-full.json"), path, "Hi\r\nBcc: x@example.com"
    )

    alert = parse(document)[0]

    assert alert["subject"] == "Hi\ufffd\ufffdBcc: x@example.com"
    assert (
        alert["custom_fields"]["subject_escaped"]
        == "Hi\\u000d\\u000aBcc: x@example.com"
    )


def test_tap_header_from_control_character_replaced() -> None:
    path = ("messagesDelivered", 0, "headerFrom")
    document = with_value(
        example("tap-delivered-phish.json"),
        path,
        '"Billing\x1b[2J" <billing@example.net>',
    )

    alert = parse(document)[0]

    assert alert["header_from"] == '"Billing\ufffd[2J" <billing@example.net>'
    assert alert["custom_fields"]["header_from_escaped"] == (
        '"Billing\\u001b[2J" <billing@example.net>'
    )


def test_sender_control_character_still_rejected() -> None:
    path = ("messagesDelivered", 0, "sender")
    document = with_value(
        example("tap-delivered-phish.json"), path, "billing@example.net\u2028"
    )

    with pytest.raises(InvalidAlertError) as caught:
        parse(document)

    assert caught.value.field == "messagesDelivered[0].sender"


def two_tap_events() -> dict[str, Any]:
    document = example("tap-delivered-phish.json")
    clean = document["messagesDelivered"][0]
    bad = json.loads(json.dumps(clean))
    bad["id"] = "bad-event-1"
    bad["GUID"] = "badGuid1"
    bad["messageID"] = "<other.message@example.net>"
    bad["recipient"] = ["alice@example.com\u2028Bcc: eve@example.net"]
    document["messagesDelivered"] = [bad, clean]
    return document


def test_tap_bad_address_event_rejected_alone() -> None:
    document = two_tap_events()
    rejected: list[InvalidAlertError] = []

    alerts = parse(document, rejected)

    assert [alert["alert_id"] for alert in alerts] == [
        "tap:6f1c2a9e-3b7d-4e58-9a10-c4d2e8f7b315"
    ]
    assert alerts[0]["recipients"] == [
        "alice@example.com",
        "bob@example.com",
        "carol@example.com",
    ]
    assert len(rejected) == 1
    assert rejected[0].field == "messagesDelivered[0]"
    assert "messagesDelivered[0] (id 'bad-event-1', GUID 'badGuid1')" in str(
        rejected[0]
    )
    assert "messagesDelivered[0].recipient" in str(rejected[0])


def test_tap_bad_address_without_list_raises() -> None:
    with pytest.raises(InvalidAlertError) as caught:
        parse(two_tap_events())

    assert caught.value.field == "messagesDelivered[0].recipient"


def test_tap_all_events_bad_returns_none() -> None:
    document = two_tap_events()
    document["messagesDelivered"] = document["messagesDelivered"][:1]
    rejected: list[InvalidAlertError] = []

    alerts = parse(document, rejected)

    assert alerts == []
    assert len(rejected) == 1


def test_fireeye_listing_bad_address_rejected_alone() -> None:
    document = example("fireeye-wsapi.json")
    first = document["alert"][0]
    bad = json.loads(json.dumps(first))
    bad["uuid"] = "bad-uuid"
    bad["dst"] = {"smtpTo": ["tara@example.com\x1b"]}
    document["alert"] = [first, bad]
    rejected: list[InvalidAlertError] = []

    alerts = parse(document, rejected)

    assert len(alerts) == 1
    assert alerts[0]["source_alert_id"] == first["uuid"]
    assert len(rejected) == 1
    assert rejected[0].field == "alert[1]"
    assert "uuid 'bad-uuid'" in str(rejected[0])


def test_generic_bad_address_raises_with_list() -> None:
    document = with_value(example("generic-full.json"), ("email", "sender"), "a@b\x07")
    rejected: list[InvalidAlertError] = []

    with pytest.raises(InvalidAlertError):
        parse(document, rejected)

    assert rejected == []


def searched_alert(subject: str) -> NormalizedAlert:
    """A FireEye alert whose Message-ID the appliance made up, so it is searched."""
    path = SUBJECT_PATHS["fireeye-wsapi.json"]
    document = with_value(example("fireeye-wsapi.json"), path, subject)
    alert: NormalizedAlert = parse(document)[0]
    assert alert["message_id_synthetic"]
    return alert


def test_policy_clean_subject_searched() -> None:
    alert = searched_alert("Invoice 4471")

    search = message_search(alert, SETTINGS)

    assert search is not None
    assert search["subject"] == "Invoice 4471"


@pytest.mark.parametrize(("control", "escaped"), CONTROLS)
def test_policy_replaced_subject_held(control: str, escaped: str) -> None:
    alert = searched_alert(f"Invoice{control}4471")

    decisions = decide(alert, alert["recipients"], SETTINGS)

    assert message_search(alert, SETTINGS) is None
    assert decisions
    for decision in decisions:
        assert decision.action == "hold"
        assert decision.rule == "default.hold-synthetic-message-id"
        assert "replaced with U+FFFD" in decision.reason
        assert "exact subject" in decision.reason
