"""Reading sent messages' MIME for forward tracing, odd headers included."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

from autopull.connectors.mail.mime import (
    bare_message_id,
    message_id_list,
    normalize_url,
    sent_message_from_mime,
    urls_in,
)

FOLDED_ID = (
    "PAXP193MB2314C6F90A60DA909597069AA7802@PAXP193MB2314.eurprd01.mail.example.com"
)
INNER = (
    "Message-ID: <orig-1@example.net>\r\n"
    "From: billing@example.net\r\n"
    "To: alice@example.com\r\n"
    "Subject: Invoice\r\n"
    "Content-Type: text/plain\r\n"
    "\r\n"
    "Pay at http://billing-example.net/pay/4471 now.\r\n"
)
ATTACHMENT = b"MZ\x90\x00 malicious bytes"


def forward_as_attachment() -> bytes:
    import base64

    encoded = base64.b64encode(ATTACHMENT).decode()
    return (
        "Message-ID:\r\n <fwd-1@example.com>\r\n"
        "Date: Tue, 01 Dec 2026 10:00:00 +0100\r\n"
        "From: Alice <alice@example.com>\r\n"
        "To: Bob <bob@example.com>, eve@example.net\r\n"
        "Cc: carol@example.com\r\n"
        "Subject: =?UTF-8?Q?WG:_Rechnung_f=C3=BCr?=\r\n =?UTF-8?Q?_Dezember?=\r\n"
        f"References: <r1@example.net>\r\n <r2@example.net>\r\n\t<{FOLDED_ID}>\r\n"
        "Thread-Index: AQHZ\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="b1"\r\n'
        "\r\n"
        "--b1\r\n"
        "Content-Type: text/html; charset=utf-8\r\n"
        "\r\n"
        '<p>See <a href="HTTP://Files.Example.net/x?id=1#top">this</a>.</p>\r\n'
        "--b1\r\n"
        "Content-Type: message/rfc822\r\n"
        "\r\n"
        f"{INNER}"
        "--b1\r\n"
        'Content-Type: application/octet-stream; name="invoice.exe"\r\n'
        'Content-Disposition: attachment; filename="invoice.exe"\r\n'
        "Content-Transfer-Encoding: base64\r\n"
        "\r\n"
        f"{encoded}\r\n"
        "--b1--\r\n"
    ).encode()


def test_sent_message_facts() -> None:
    message = sent_message_from_mime("Alice@Example.com", forward_as_attachment())
    assert message is not None
    assert message.mailbox == "alice@example.com"
    assert message.message_id == "fwd-1@example.com"
    assert message.sent_at == datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
    assert message.recipients == (
        "bob@example.com",
        "eve@example.net",
        "carol@example.com",
    )
    assert message.subject == "WG: Rechnung für Dezember"
    assert message.attached_message_ids == ("orig-1@example.net",)
    assert message.attachment_hashes == (hashlib.sha256(ATTACHMENT).hexdigest(),)
    assert "http://billing-example.net/pay/4471" in message.urls
    assert "http://files.example.net/x?id=1" in message.urls
    assert message.headers["Thread-Index"] == "AQHZ"


def test_folded_references_in_order() -> None:
    message = sent_message_from_mime("alice@example.com", forward_as_attachment())
    assert message is not None
    assert message_id_list(message.headers["References"]) == (
        "r1@example.net",
        "r2@example.net",
        FOLDED_ID,
    )


def test_message_without_id_is_skipped() -> None:
    mime = b"From: a@example.com\r\nSubject: x\r\n\r\nbody\r\n"
    assert sent_message_from_mime("a@example.com", mime) is None


def test_odd_message_ids_stay_whole() -> None:
    for value in (
        "<[ABCDEF====@example.com]>",
        "<113c01d86b4a$53bb4230$fa9e45a$@appmanager@example.net>",
        "<00E19E93-513A-4A2B-964B-BB0372099DB6@@example.com>",
        "<2415681bce7c00293a83fce817e928a4>",
    ):
        mime = f"Message-ID: {value}\r\nFrom: a@example.com\r\n\r\nx\r\n".encode()
        message = sent_message_from_mime("a@example.com", mime)
        assert message is not None
        assert message.message_id == value[1:-1]


def test_bare_message_id_unfolds() -> None:
    assert bare_message_id(f"\r\n <{FOLDED_ID}>") == FOLDED_ID
    assert bare_message_id("  ") is None
    assert bare_message_id(None) is None


def test_url_normalization() -> None:
    assert (
        normalize_url("HTTP://Example.NET/Path?q=1#frag")
        == "http://example.net/Path?q=1"
    )
    assert urls_in("go to https://a.example.net/x. or (http://b.example.net/y)") == {
        "https://a.example.net/x",
        "http://b.example.net/y",
    }
    assert urls_in("hxxp://defanged.example.net/") == set()
