"""Adversarial bodies against every alert format: each one is an InvalidAlertError.

Each body is parsed with format detection and with every format forced, the way
the normalize agent parses bodies whose source names a format. No other exception
may escape, because the agent turns only InvalidAlertError into a dead letter with
a readable reason.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from autopull.connectors.sources.detect import format_names, parse_alert
from autopull.connectors.sources.exceptions import InvalidAlertError
from autopull.connectors.sources.fireeye import parse_fireeye

REPO = Path(__file__).resolve().parents[4]
EXAMPLES = REPO / "examples" / "alerts"
RECEIVED_AT = datetime(2026, 12, 1, 10, 0, 5, tzinfo=UTC)
# Far above the CPU time any body here takes to parse, so that only super-linear
# work on hostile input exceeds it. CPU time of this process, not wall time, so a
# busy machine does not fail the test.
SLOW_CPU_SECONDS = 2.0


def example(name: str) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((EXAMPLES / name).read_text())
    return document


def replaced(document: dict[str, Any], path: str, value: object) -> dict[str, Any]:
    """Return a copy of `document` with the member at a dotted path set to `value`."""
    copy: dict[str, Any] = json.loads(json.dumps(document))
    target: Any = copy
    keys = path.split(".")
    for key in keys[:-1]:
        target = target[int(key)] if isinstance(target, list) else target[key]
    target[keys[-1]] = value
    return copy


def encoded(document: object) -> bytes:
    return json.dumps(document).encode()


INJECTIONS = [
    "a@example.com\r\nBcc: x@example.com",
    "a@example.com\nBcc: x@example.com",
    "a@example.com\rX: y",
    "a@example.com\x00",
    "a@example.com\u2028x",
    "a@example.com\x85",
]
WRONG_TYPES: list[object] = [5, 1.5, True, [1], {"a": 1}, [[["x"]]]]
BAD_ADDRESSES = [
    "",
    "not an address",
    "a@b@c",
    "@example.com",
    "a@",
    "<>",
    "a b@c",
    "../users/bob@example.com",
    "bob@example.com/messages",
    "?x=1",
    "#frag",
    "%2f",
    "bob@example.com.",
    "b\u043eb@example.com",
    "\uff42\uff4f\uff42@example.com",
]
# A Message-ID far above the 998 characters that one header line can carry.
HUGE_MESSAGE_ID = "<" + "a" * 100_000 + "@example.com>"
BAD_TIMES = ["soon", "2024-13-45T00:00:00Z", "2024-03-10T01:30:00", "", "1700000000"]


def generic_bodies() -> Iterator[tuple[str, bytes]]:
    base = example("generic-full.json")
    for index, value in enumerate(WRONG_TYPES):
        for path in ("email.subject", "email.sender", "email.message_id", "summary"):
            yield f"generic-{path}-type-{index}", encoded(replaced(base, path, value))

    for index, value in enumerate(INJECTIONS):
        # A control character in the subject is replaced, not rejected.
        for path in ("email.recipient", "email.sender"):
            yield f"generic-{path}-inject-{index}", encoded(replaced(base, path, value))
        yield (
            f"generic-message-id-inject-{index}",
            encoded(replaced(base, "email.message_id", f"<{value}.id>")),
        )

    for index, value in enumerate(BAD_ADDRESSES):
        body = replaced(base, "email.recipient", [value])
        yield f"generic-bad-address-{index}", encoded(body)
    yield (
        "generic-message-id-huge",
        encoded(replaced(base, "email.message_id", HUGE_MESSAGE_ID)),
    )
    headers = f"Subject: x\r\nMessage-ID: {HUGE_MESSAGE_ID}\r\n\r\n"
    without_id = replaced(base, "email.message_id", None)
    yield (
        "generic-headers-message-id-huge",
        encoded(replaced(without_id, "email.headers", headers)),
    )
    for index, value in enumerate(BAD_TIMES):
        body = replaced(base, "email.delivery_time", value)
        yield f"generic-bad-time-{index}", encoded(body)
    for key in ("json_version", "classification", "email"):
        body = dict(base)
        del body[key]
        yield f"generic-missing-{key}", encoded(body)

    yield "generic-nan", encoded(base).replace(b"97", b"NaN")
    yield "generic-infinity", encoded(base).replace(b"97", b"-Infinity")
    yield "generic-overflow", encoded(base).replace(b"97", b"1e400")
    yield "generic-lone-surrogate", encoded(base).replace(b"SOC-2291", b"\\udc00")
    yield "generic-unknown-key", encoded({**base, "constructor": {"prototype": 1}})
    yield (
        "generic-duplicate-key-last-invalid",
        encoded(base)[:-1] + b', "email": "alice@example.com"}',
    )
    nested: object = "x"
    for _ in range(500):
        nested = {"a": nested}
    yield "generic-nested-target", encoded({**base, "target": nested})


def fireeye_bodies() -> Iterator[tuple[str, bytes]]:
    base = example("fireeye-notification.json")
    for index, value in enumerate(WRONG_TYPES):
        for path in ("alert.occurred", "alert.uuid", "alert.smtp-message.subject"):
            yield f"fireeye-{path}-type-{index}", encoded(replaced(base, path, value))
    for index, value in enumerate(INJECTIONS):
        for path in ("alert.dst.smtp-to", "alert.src.smtp-mail-from"):
            yield f"fireeye-{path}-inject-{index}", encoded(replaced(base, path, value))
    for index, value in enumerate(BAD_TIMES):
        yield (
            f"fireeye-bad-time-{index}",
            encoded(replaced(base, "alert.occurred", value)),
        )
    yield "fireeye-no-recipient", encoded(replaced(base, "alert.dst", {}))
    for index, value in enumerate(BAD_ADDRESSES[7:]):
        body = replaced(base, "alert.dst.smtp-to", [value])
        yield f"fireeye-bad-address-{index}", encoded(body)
    yield (
        "fireeye-message-id-huge",
        encoded(replaced(base, "alert.smtp-message.id", HUGE_MESSAGE_ID)),
    )
    yield "fireeye-alert-string", encoded({"alert": "x"})
    yield "fireeye-alert-list-of-null", encoded({"alert": [None]})
    wsapi = example("fireeye-wsapi.json")
    yield "fireeye-wsapi-id-float", encoded(replaced(wsapi, "alert.0.uuid", 7.5))
    yield (
        "fireeye-wsapi-smtp-to-number",
        encoded(replaced(wsapi, "alert.0.dst.smtpTo", [1])),
    )


XML_ALERT = (
    b"<alerts><alert uuid='u'><dst><smtp-to>a@example.com</smtp-to></dst>"
    b"<action>notified</action></alert></alerts>"
)


def tap_bodies() -> Iterator[tuple[str, bytes]]:
    base = example("tap-delivered-phish.json")
    for index, value in enumerate(BAD_ADDRESSES[7:]):
        body = replaced(
            base, "messagesDelivered.0.recipient", ["alice@example.com", value]
        )
        yield f"tap-bad-address-{index}", encoded(body)
    yield (
        "tap-message-id-huge",
        encoded(replaced(base, "messagesDelivered.0.messageID", HUGE_MESSAGE_ID)),
    )


def xml_bodies() -> Iterator[tuple[str, bytes]]:
    yield (
        "xml-billion-laughs",
        (
            b'<?xml version="1.0"?><!DOCTYPE alerts [<!ENTITY a "aaaaaaaaaa">'
            + b"".join(
                b'<!ENTITY a%d "%s">' % (level, b"".join([b"&a%d;" % (level - 1)] * 10))
                for level in range(1, 10)
            ).replace(b"&a0;", b"&a;")
            + b"]><alerts><alert uuid='&a9;'/></alerts>"
        ),
    )
    yield (
        "xml-external-entity",
        (
            b'<!DOCTYPE alerts [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
            b"<alerts><alert uuid='u'><smtp-message><subject>&x;</subject>"
            b"</smtp-message><dst><smtp-to>a@example.com</smtp-to></dst>"
            b"</alert></alerts>"
        ),
    )
    yield (
        "xml-external-dtd",
        (b'<!DOCTYPE alerts SYSTEM "http://127.0.0.1:9/a.dtd">' + XML_ALERT),
    )
    yield (
        "xml-parameter-entity",
        (
            b'<!DOCTYPE alerts [<!ENTITY % p SYSTEM "http://127.0.0.1:9/p.dtd"> %p;]>'
            b"<alerts/>"
        ),
    )
    yield "xml-deep", b"<alerts>" + b"<a>" * 50_000 + b"</a>" * 50_000 + b"</alerts>"
    yield "xml-truncated", XML_ALERT[:-10]
    yield "xml-invalid-utf8", XML_ALERT.replace(b"a@example.com", b"a\xff@example.com")
    yield (
        "xml-injection",
        XML_ALERT.replace(b"a@example.com", b"a@example.com&#13;&#10;X"),
    )
    yield "xml-wrong-root", b"<report><alert/></report>"


def shape_bodies() -> Iterator[tuple[str, bytes]]:
    yield "empty", b""
    yield "whitespace", b" \r\n\t "
    yield "null", b"null"
    yield "array", b"[]"
    yield "number", b"42"
    yield "string", b'"alert"'
    yield "unknown-object", b'{"foo": 1}'
    yield "deep-arrays", b"[" * 200_000
    yield "deep-objects", b'{"a":' * 100_000
    yield "invalid-utf8", b'{"json_version": "2.0", "summary": "\xff\xfe"}'
    yield "utf8-bom", b'\xef\xbb\xbf{"json_version": "2.0"}'
    yield "huge-integer", b'{"alert": ' + b"9" * 5000 + b"}"
    yield "binary", bytes(range(256))
    yield "tap-recipient-number", b'{"GUID": "g", "messageTime": "x", "recipient": 5}'


def hostile_bodies() -> list[tuple[str, bytes]]:
    return [
        *generic_bodies(),
        *fireeye_bodies(),
        *tap_bodies(),
        *xml_bodies(),
        *shape_bodies(),
    ]


HOSTILE = hostile_bodies()


def test_hostile_corpus_is_large_and_unique() -> None:
    names = [name for name, _ in HOSTILE]

    assert len(HOSTILE) >= 120
    assert len(set(names)) == len(names)
    assert len({body for _, body in HOSTILE}) == len(HOSTILE)


@pytest.mark.parametrize(("name", "body"), HOSTILE, ids=[name for name, _ in HOSTILE])
@pytest.mark.parametrize("format_name", [None, *format_names()])
def test_parse_alert_hostile_body_invalid(
    name: str, body: bytes, format_name: str | None
) -> None:
    started = time.process_time()

    with pytest.raises(InvalidAlertError) as caught:
        parse_alert(body, received_at=RECEIVED_AT, format_name=format_name)

    assert caught.value.reason
    assert len(caught.value.reason) < 1000
    assert time.process_time() - started < SLOW_CPU_SECONDS


@pytest.mark.parametrize(
    ("name", "body"),
    [(name, body) for name, body in HOSTILE if name.startswith("xml-")],
    ids=[name for name, _ in HOSTILE if name.startswith("xml-")],
)
def test_parse_fireeye_hostile_xml_invalid(name: str, body: bytes) -> None:
    with pytest.raises(InvalidAlertError):
        parse_fireeye(body, received_at=RECEIVED_AT)


def test_parse_fireeye_external_entity_never_read(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret")
    body = (
        f'<!DOCTYPE alerts [<!ENTITY x SYSTEM "{secret.as_uri()}">]>'
        "<alerts><alert uuid='u'><smtp-message><subject>&x;</subject></smtp-message>"
        "<dst><smtp-to>a@example.com</smtp-to></dst></alert></alerts>"
    ).encode()

    with pytest.raises(InvalidAlertError) as caught:
        parse_fireeye(body, received_at=RECEIVED_AT)

    assert "top secret" not in caught.value.reason
