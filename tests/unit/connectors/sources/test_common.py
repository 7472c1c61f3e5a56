from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from autopull.connectors.sources.common import (
    MAX_MESSAGE_ID_LENGTH,
    ObjectReader,
    bare_message_id,
    checked_message_id,
    clean_display_fields,
    combine_statuses,
    escape_control_characters,
    is_synthetic_message_id,
    load_json,
    map_classification,
    map_threat_status,
    most_severe,
    normalize_address,
    normalize_addresses,
    normalize_sender,
    parse_time,
    subject_was_replaced,
    unfold_header,
)
from autopull.connectors.sources.exceptions import InvalidAlertError

FOLDED_ID = (
    "PAXP193MB2314C6F90A60DA909597069AA7802@PAXP193MB2314.eurprd01.mail.example.com"
)

# Real Message-ID shapes that Python's strict header parser breaks on or cuts.
UNUSUAL_IDS = [
    "[ABCDEF====@example.com]",
    "[gw10].1c69fb81.7aec0.5503SMTPIN_ADDED_[gw5]@[gw13].mail.example.com",
    "113c01d86b4a$53bb4230$fa9e45a$@appmanager@example.net",
    "00E19E93-513A-4A2B-964B-BB0372099DB6@@example.com",
    "2415681bce7c00293a83fce817e928a4",
    "CAH7x+q/Lk=Zp'8#w%41&r@mail.example.net",
]


@pytest.mark.parametrize("bare", UNUSUAL_IDS)
def test_bare_message_id_unusual_id_keeps_inner_text(bare: str) -> None:
    assert bare_message_id(f"<{bare}>") == bare


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("<a@example.com>", "a@example.com"),
        ("a@example.com", "a@example.com"),
        ("  <a@example.com>\t", "a@example.com"),
        (f"\r\n <{FOLDED_ID}>", FOLDED_ID),
        (f" <{FOLDED_ID}>", FOLDED_ID),
        (f"<{FOLDED_ID}>\r\n", FOLDED_ID),
        ("<<a@example.com>>", "a@example.com"),
        ("< a@example.com >", "a@example.com"),
        ("<a@example.com", "<a@example.com"),
        ("a@example.com>", "a@example.com>"),
        ("<>", ""),
        ("", ""),
        (None, ""),
        ("   ", ""),
    ],
)
def test_bare_message_id_strips_space_and_brackets(
    value: str | None, expected: str
) -> None:
    assert bare_message_id(value) == expected


@given(st.text())
def test_bare_message_id_any_text_is_idempotent(value: str) -> None:
    bare = bare_message_id(value)

    assert bare_message_id(bare) == bare
    assert bare == bare.strip()


def test_checked_message_id_inner_line_break_raises() -> None:
    with pytest.raises(InvalidAlertError) as caught:
        checked_message_id("<a@example.com>\r\nBcc: x@example.net", field="messageID")

    assert "messageID" in str(caught.value)
    assert caught.value.field == "messageID"


def test_checked_message_id_at_limit_is_kept() -> None:
    longest = "a" * (MAX_MESSAGE_ID_LENGTH - len("@example.com")) + "@example.com"

    assert checked_message_id(f"<{longest}>", field="messageID") == longest


def test_checked_message_id_over_limit_raises() -> None:
    value = "<" + "a" * 100_000 + "@example.com>"

    with pytest.raises(InvalidAlertError) as caught:
        checked_message_id(value, field="messageID")

    reason = caught.value.reason
    assert "100,012 characters" in reason
    assert f"maximum of {MAX_MESSAGE_ID_LENGTH}" in reason
    assert "messageID" in reason
    assert len(reason) < 400
    assert caught.value.field == "messageID"


@pytest.mark.parametrize(
    ("bare", "expected"),
    [
        ("queue-id-7Q2@no-message-id", True),
        ("Queue-ID-7Q2@No-Message-Id", True),
        ("queue-id-7Q2@example.com", False),
        ("a@no-message-id", False),
        ("", False),
    ],
)
def test_is_synthetic_message_id_table(bare: str, expected: bool) -> None:
    assert is_synthetic_message_id(bare) is expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("alice@example.com", "alice@example.com"),
        ("Alice@Example.COM", "alice@example.com"),
        ("  alice@example.com  ", "alice@example.com"),
        ("<alice@example.com>", "alice@example.com"),
        ('"Alice Smith" <Alice@example.com>', "alice@example.com"),
        ("Alice <alice@example.com>", "alice@example.com"),
        ("alice@example.com (Alice)", "alice@example.com"),
        ("a@[192.0.2.1]", "a@[192.0.2.1]"),
        ("bob+tag@example.com", "bob+tag@example.com"),
        ("bob%2f@example.com", "bob%2f@example.com"),
        # Internal domains of an organization's own mail system.
        ("carol@autopull.test", "carol@autopull.test"),
        ("carol@corp.local", "carol@corp.local"),
        # Internationalized domains are kept in Unicode, from either spelling.
        ("bob@Bücher.de", "bob@bücher.de"),
        ("bob@xn--bcher-kva.de", "bob@bücher.de"),
        ("иван@пример.рф", "иван@пример.рф"),
        ("用户@例子.广告", "用户@例子.广告"),
        ("ユーザー@例え.jp", "ユーザー@例え.jp"),
    ],
)
def test_normalize_address_valid_forms(value: str, expected: str) -> None:
    assert normalize_address(value, field="recipient") == expected


@pytest.mark.parametrize(
    "value",
    [
        "",
        "alice",
        "alice@",
        "@example.com",
        "a@b@example.com",
        "alice@exa mple.com",
        "ali ce@example.com",
        "a@example.com, b@example.com",
        "<>",
        "alice@example.com\r\nBcc: eve@example.net",
        "alice@example.com\n",
        "alice@example.com\x00",
        "alice@example.com\u2028",
        "../users/bob@example.com",
        "bob@example.com/messages",
        "bob@example.com/../carol@example.com",
        "?x=1",
        "bob@example.com?x=1",
        "#frag",
        "bob@example.com#frag",
        "%2f",
        "bob@example.com%2f",
        "bob@example.com.",
        "bob..x@example.com",
        "bob@localhost",
        "bob@example.invalid",
        "bob@example.onion",
        # Look-alikes: Cyrillic letters among Latin ones, and fullwidth letters.
        "b\u043eb@example.com",
        "bob@ex\u0430mple.com",
        "bob@xn--exmple-4nf.com",
        "\uff42\uff4f\uff42@example.com",
        "bob@\uff45\uff58\uff41\uff4d\uff50\uff4c\uff45.com",
    ],
)
def test_normalize_address_invalid_value_raises(value: str) -> None:
    with pytest.raises(InvalidAlertError) as caught:
        normalize_address(value, field="messagesDelivered[0].recipient")

    assert "messagesDelivered[0].recipient" in caught.value.reason
    assert caught.value.field == "messagesDelivered[0].recipient"


def test_normalize_address_error_names_value() -> None:
    with pytest.raises(InvalidAlertError) as caught:
        normalize_address("not-an-address", field="recipient")

    assert "'not-an-address'" in str(caught.value)


def test_normalize_address_look_alike_names_scripts() -> None:
    with pytest.raises(InvalidAlertError) as caught:
        normalize_address("bob@ex\u0430mple.com", field="recipient")

    assert "'bob@ex\u0430mple.com'" in caught.value.reason
    assert "Cyrillic and Latin" in caught.value.reason


def test_normalize_address_fullwidth_names_imitated() -> None:
    with pytest.raises(InvalidAlertError) as caught:
        normalize_address("\uff42\uff4f\uff42@example.com", field="recipient")

    assert "imitate 'bob@example.com'" in caught.value.reason


def test_normalize_address_syntax_error_names_value() -> None:
    with pytest.raises(InvalidAlertError) as caught:
        normalize_address("bob@example.com/messages", field="recipient")

    assert "'bob@example.com/messages'" in caught.value.reason
    assert "invalid characters" in caught.value.reason


def test_normalize_address_long_value_is_shortened() -> None:
    with pytest.raises(InvalidAlertError) as caught:
        normalize_address("x" * 5000, field="recipient")

    assert len(str(caught.value)) < 400


def test_normalize_addresses_repeats_keep_first_place() -> None:
    values = [
        "Bob@example.com",
        "alice@example.com",
        "bob@EXAMPLE.com",
        "carol@example.com",
    ]

    addresses = normalize_addresses(values, field="recipient")

    assert addresses == ["bob@example.com", "alice@example.com", "carol@example.com"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("", ""),
        ("<>", ""),
        ("  ", ""),
        ("Billing@Example.net", "billing@example.net"),
        ("MAILER-DAEMON", "mailer-daemon"),
        (
            "e99d7ed5580193f36a51f597bc2c0210@example.net",
            "e99d7ed5580193f36a51f597bc2c0210@example.net",
        ),
    ],
)
def test_normalize_sender_lenient_forms(value: str, expected: str) -> None:
    assert normalize_sender(value, field="sender") == expected


def test_normalize_sender_line_break_raises() -> None:
    with pytest.raises(InvalidAlertError):
        normalize_sender("a@example.net\r\nX-Evil: 1", field="sender")


@pytest.mark.parametrize(
    "value",
    [
        "2024-03-10 01:30:00 -0800",
        "2024-03-10T01:30:00-08:00",
        "2024-03-10T09:30:00Z",
        "2024-03-10T09:30:00.000Z",
        "2024-03-10T09:30:00+00:00",
        "2024-03-10 09:30:00 +0000",
        "2024-03-10T11:30:00+0200",
    ],
)
def test_parse_time_offsets_give_same_utc_instant(value: str) -> None:
    parsed = parse_time(value, field="occurred")

    assert parsed == datetime(2024, 3, 10, 9, 30, tzinfo=UTC)
    assert parsed.utcoffset() is not None
    assert parsed.tzinfo is UTC


@pytest.mark.parametrize(
    ("value", "microsecond"),
    [
        ("2021-03-30T11:21:24.43Z", 430000),
        ("2021-03-30T11:21:24.4Z", 400000),
        ("2021-03-30T11:21:24.123456Z", 123000),
        ("2021-03-30T11:21:24.1239999Z", 123000),
    ],
)
def test_parse_time_fraction_truncated_to_millis(value: str, microsecond: int) -> None:
    assert parse_time(value, field="startTime").microsecond == microsecond


@pytest.mark.parametrize(
    "value",
    [
        "",
        "yesterday",
        "2024-03-10T09:30:00",
        "2024-03-10",
        "2024-13-10T09:30:00Z",
        "2024-03-10T24:00:00Z",
        "0001-01-01T00:00:00+01:00",
    ],
)
def test_parse_time_invalid_value_raises(value: str) -> None:
    with pytest.raises(InvalidAlertError) as caught:
        parse_time(value, field="messageTime")

    assert "messageTime" in caught.value.reason


def test_parse_time_naive_error_asks_for_zone() -> None:
    with pytest.raises(InvalidAlertError) as caught:
        parse_time("2024-03-10T09:30:00", field="messageTime")

    assert "no time zone" in caught.value.reason


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("phish", "phish"),
        ("PHISH", "phish"),
        ("Malware", "malware"),
        ("spam", "spam"),
        ("IMPOSTOR", "impostor"),
        (" phish ", "phish"),
        ("unknown", "unknown"),
        ("toad", "unknown"),
        ("", "unknown"),
        (None, "unknown"),
    ],
)
def test_map_classification_table(value: str | None, expected: str) -> None:
    assert map_classification(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("active", "active"),
        ("ACTIVE", "active"),
        ("cleared", "cleared"),
        ("falsePositive", "false_positive"),
        ("false_positive", "false_positive"),
        ("expired", "unknown"),
        (None, "active"),
        ("", "active"),
    ],
)
def test_map_threat_status_table(value: str | None, expected: str) -> None:
    assert map_threat_status(value) == expected


def test_most_severe_malware_beats_phish() -> None:
    assert most_severe(["spam", "phish", "malware"]) == "malware"


def test_most_severe_phish_beats_impostor() -> None:
    assert most_severe(["impostor", "phish"]) == "phish"


def test_most_severe_impostor_beats_spam() -> None:
    assert most_severe(["spam", "impostor"]) == "impostor"


def test_most_severe_nothing_is_unknown() -> None:
    assert most_severe([]) == "unknown"


@pytest.mark.parametrize(
    ("statuses", "expected"),
    [
        ([], "active"),
        (["cleared", "active"], "active"),
        (["cleared", "unknown"], "unknown"),
        (["cleared", "false_positive"], "cleared"),
        (["false_positive", "false_positive"], "false_positive"),
    ],
)
def test_combine_statuses_table(statuses: list[str], expected: str) -> None:
    assert combine_statuses(statuses) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{",
        b"\xff\xfe\x00",
        b'{"a": NaN}',
        b"[Infinity]",
        b"[" * 100_000 + b"]" * 100_000,
        b"1" * 5000,
    ],
)
def test_load_json_invalid_body_raises(body: bytes) -> None:
    with pytest.raises(InvalidAlertError):
        load_json(body)


def test_load_json_utf16_body_decodes() -> None:
    assert load_json('{"a": "\u00fc"}'.encode("utf-16")) == {"a": "\u00fc"}


def test_unfold_header_folded_subject_unfolds() -> None:
    assert unfold_header("Invoice\r\n 4471") == "Invoice 4471"


def test_unfold_header_bare_line_break_stays() -> None:
    assert unfold_header("Invoice\r\nBcc: x") == "Invoice\r\nBcc: x"


def test_escape_control_characters_escapes_and_keeps_tab() -> None:
    escaped = escape_control_characters("a\\b\u2028c\x1b\td\x7f")

    assert escaped == "a\\\\b\\u2028c\\u001b\td\\u007f"


def test_clean_display_fields_replaces_controls() -> None:
    alert: Any = {
        "subject": "Pay\u2028now\x07\tplease",
        "header_from": '"IT\x1b[2J" <it@example.com>',
        "custom_fields": {},
    }

    clean_display_fields(alert)

    assert alert["subject"] == "Pay\ufffdnow\ufffd\tplease"
    assert alert["header_from"] == '"IT\ufffd[2J" <it@example.com>'
    assert alert["custom_fields"]["subject_escaped"] == "Pay\\u2028now\\u0007\tplease"
    assert alert["custom_fields"]["header_from_escaped"] == (
        '"IT\\u001b[2J" <it@example.com>'
    )
    assert subject_was_replaced(alert)


def test_clean_display_fields_clean_subject_unchanged() -> None:
    alert: Any = {"subject": "Invoice\t4471", "header_from": None, "custom_fields": {}}

    clean_display_fields(alert)

    assert alert["subject"] == "Invoice\t4471"
    assert alert["custom_fields"] == {}
    assert not subject_was_replaced(alert)


def test_object_reader_non_object_raises() -> None:
    with pytest.raises(InvalidAlertError) as caught:
        ObjectReader(["x"], "messagesDelivered[0]")

    assert "messagesDelivered[0]" in caught.value.reason
    assert "array" in caught.value.reason


def test_object_reader_wrong_type_names_field_and_type() -> None:
    reader = ObjectReader({"subject": 42}, "messagesDelivered[1]")

    with pytest.raises(InvalidAlertError) as caught:
        reader.optional_str("subject")

    assert caught.value.field == "messagesDelivered[1].subject"
    assert "number" in caught.value.reason
    assert "a string was expected" in caught.value.reason


def test_object_reader_first_spelling_present_wins() -> None:
    reader = ObjectReader({"threatId": "doc", "threatID": "wire"}, "")

    assert reader.optional_str("threatID", "threatId") == "wire"


def test_object_reader_null_counts_as_missing() -> None:
    reader = ObjectReader({"threatID": None, "threatId": "doc"}, "")

    assert reader.optional_str("threatID", "threatId") == "doc"


@pytest.mark.parametrize(
    ("value", "expected"),
    [(True, "true"), (False, "false"), ("TRUE", "true"), ("na", "na"), (None, None)],
)
def test_object_reader_flag_boolean_or_string(
    value: object, expected: str | None
) -> None:
    assert ObjectReader({"flag": value}, "").optional_flag("flag") == expected


@pytest.mark.parametrize("value", [True, "5", 10**400, 1e308 * 10])
def test_object_reader_number_invalid_raises(value: object) -> None:
    with pytest.raises(InvalidAlertError):
        ObjectReader({"spamScore": value}, "").optional_number("spamScore")


@pytest.mark.parametrize(
    "read",
    [
        lambda reader: reader.optional_str("value"),
        lambda reader: reader.optional_flag("value"),
        lambda reader: reader.string_list("value"),
    ],
    ids=["optional_str", "optional_flag", "string_list"],
)
@pytest.mark.parametrize("value", ["a\ud800b", ["a", "\udfff"]])
def test_object_reader_lone_surrogate_raises(
    read: Callable[[ObjectReader], object], value: object
) -> None:
    reader = ObjectReader({"value": value}, "")

    with pytest.raises(InvalidAlertError):
        read(reader)


@given(st.emails() | st.text(max_size=40))
def test_normalize_address_any_text_idempotent_or_invalid(value: str) -> None:
    try:
        address = normalize_address(value, field="recipient")
    except InvalidAlertError:
        return

    assert normalize_address(address, field="recipient") == address
    assert address == address.lower()
    assert address.count("@") == 1


@given(st.text(max_size=40))
def test_parse_time_any_text_utc_or_invalid(value: str) -> None:
    try:
        parsed = parse_time(value, field="messageTime")
    except InvalidAlertError:
        return

    assert parsed.tzinfo is UTC
    assert parsed.microsecond % 1000 == 0


def test_load_json_rejects_duplicate_keys() -> None:
    body = b'{"recipient": ["eve@example.com"], "recipient": ["alice@example.com"]}'
    with pytest.raises(InvalidAlertError, match="'recipient' appears twice"):
        load_json(body)


def test_load_json_long_integer_names_limit() -> None:
    with pytest.raises(InvalidAlertError) as raised:
        load_json(b'{"count": ' + b"7" * 5000 + b"}")
    message = str(raised.value)
    assert "a number has 5000 digits, more than the limit of 4300 digits" in message
    assert "sys." not in message


def test_load_json_integer_at_limit_parses() -> None:
    assert load_json(b"-" + b"9" * 4300) == -int("9" * 4300)
