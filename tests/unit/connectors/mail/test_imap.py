"""Unit tests of the IMAP adapter: wire formats, error mapping and scripted sessions.

The scripted tests run the real imaplib client against `ScriptedImap`, which plays
a server from a transcript: each expected command with the response to send. A
command that differs from the transcript gets a BAD response and is recorded, so a
test shows exactly what the adapter sent.
"""

from __future__ import annotations

import imaplib
import re
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from pydantic import ValidationError

from autopull.connectors.errors import (
    ConnectorError,
    NotFoundError,
    PermanentError,
    TransientError,
)
from autopull.connectors.mail.imap import (
    FolderChangedError,
    ImapCommandError,
    ImapPlatform,
    ImapProtocolError,
    ImapQuarantineResult,
    ImapSettings,
    QuarantineMarker,
    decode_header_text,
    decode_mailbox_name,
    encode_header_text,
    encode_mailbox_name,
    first_header,
    map_imap_error,
    parse_fetch_response,
    parse_header_block,
    parse_list_response,
    quote_string,
    strip_markers,
)

FOLDER_NAMES = [
    ("Entwürfe", "Entw&APw-rfe"),
    ("Gelöschte Elemente", "Gel&APY-schte Elemente"),
    ("R&D", "R&-D"),
    ("Отправленные", "&BB4EQgQ,BEAEMAQyBDsENQQ9BD0ESwQ1-"),
    ("Q1 Reports", "Q1 Reports"),
    ('Kunde "Nord"', 'Kunde "Nord"'),
    ("INBOX", "INBOX"),
    ("&", "&-"),
    ("日本語", "&ZeVnLIqe-"),
]


# --- the scripted server --------------------------------------------------------------


@dataclass
class Step:
    """One expected command (exact text, or a compiled pattern) and its response.

    `@TAG` in the response is replaced by the tag of the command.
    """

    command: str | re.Pattern[str]
    answer: bytes


class ScriptedImap(imaplib.IMAP4):
    """imaplib talking to a transcript instead of a socket."""

    def __init__(self, steps: list[Step], capabilities: str) -> None:
        self.steps = list(steps)
        self.sent: list[str] = []
        self.literals: list[bytes] = []
        self.unexpected: list[str] = []
        self._incoming = bytearray(b"* OK scripted server ready\r\n")
        self._outgoing = bytearray()
        self._pending: bytes | None = None
        self._literal_size = 0
        self.steps.insert(
            0, Step("CAPABILITY", ok(f"* CAPABILITY IMAP4rev1 {capabilities}"))
        )
        super().__init__("scripted.example.com", 143)

    def open(
        self, host: str = "", port: int = 143, timeout: float | None = None
    ) -> None:
        self.host = host
        self.port = port

    def read(self, size: int) -> bytes:
        chunk = bytes(self._incoming[:size])
        del self._incoming[:size]
        return chunk

    def readline(self) -> bytes:
        end = self._incoming.find(b"\n")
        if end < 0:
            raise imaplib.IMAP4.abort("the transcript has no more responses")
        line = bytes(self._incoming[: end + 1])
        del self._incoming[: end + 1]
        return line

    def send(self, data: bytes) -> None:
        self._outgoing += data
        while True:
            if self._pending is not None:
                if len(self._outgoing) < self._literal_size + 2:
                    return
                literal = bytes(self._outgoing[: self._literal_size])
                del self._outgoing[: self._literal_size + 2]
                line, self._pending = self._pending, None
                self._answer(line, literal)
                continue
            end = self._outgoing.find(b"\r\n")
            if end < 0:
                return
            line = bytes(self._outgoing[:end])
            del self._outgoing[: end + 2]
            size = re.search(rb" \{(\d+)\}$", line)
            if size:
                self._pending = line[: size.start()]
                self._literal_size = int(size.group(1))
                self._incoming += b"+ go ahead\r\n"
                continue
            self._answer(line, None)

    def shutdown(self) -> None:
        pass

    def _answer(self, line: bytes, literal: bytes | None) -> None:
        tag, _, command = line.decode().partition(" ")
        self.sent.append(command)
        if literal is not None:
            self.literals.append(literal)
        step = self.steps[0] if self.steps else None
        expected = step.command if step else None
        if step is None or not (
            expected.fullmatch(command)
            if isinstance(expected, re.Pattern)
            else expected == command
        ):
            self.unexpected.append(command)
            self._incoming += f"{tag} BAD not in the transcript\r\n".encode()
            return
        self.steps.pop(0)
        self._incoming += step.answer.replace(b"@TAG", tag.encode())


def ok(*untagged: str, text: str = "done") -> bytes:
    lines = [*untagged, f"@TAG OK {text}"]
    return ("\r\n".join(lines) + "\r\n").encode()


def fetch(uid: int, flags: str, item: str, body: bytes) -> bytes:
    head = (
        f'* 1 FETCH (UID {uid} FLAGS ({flags}) INTERNALDATE "01-Dec-2026 09:30:00 '
        f'+0000" {item} {{{len(body)}}}\r\n'
    ).encode()
    return head + body + b")\r\n" + b"@TAG OK Fetch completed.\r\n"


@dataclass
class Connections:
    """Hands out one scripted connection per login, in order."""

    scripts: list[tuple[list[Step], str]]
    opened: list[ScriptedImap] = field(default_factory=list)

    def __call__(self, settings: ImapSettings) -> imaplib.IMAP4:
        steps, capabilities = self.scripts[len(self.opened)]
        imap = ScriptedImap(steps, capabilities)
        self.opened.append(imap)
        return imap


def settings(**overrides: object) -> ImapSettings:
    values: dict[str, object] = {
        "host": "127.0.0.1",
        "port": 143,
        "security": "none",
        "master_user": "admin",
        "master_password": "adminpw",
        "quarantine_mailbox": "vault@example.com",
    }
    values.update(overrides)
    return ImapSettings.model_validate(values)


# --- modified UTF-7, quoting, LIST and FETCH ----------------------------------------


@pytest.mark.parametrize(("name", "wire"), FOLDER_NAMES)
def test_encode_mailbox_name_gives_wire_form(name: str, wire: str) -> None:
    assert encode_mailbox_name(name) == wire


@pytest.mark.parametrize(("name", "wire"), FOLDER_NAMES)
def test_decode_mailbox_name_gives_unicode(name: str, wire: str) -> None:
    assert decode_mailbox_name(wire) == name


def test_mailbox_name_outside_bmp_round_trips() -> None:
    name = "Akten 📁 2026"

    assert decode_mailbox_name(encode_mailbox_name(name)) == name


@pytest.mark.parametrize("wire", ["Entw&APw", "Bad&!!-", "Odd&AP-"])
def test_decode_mailbox_name_invalid_raises(wire: str) -> None:
    with pytest.raises(ValueError):
        decode_mailbox_name(wire)


def test_quote_string_escapes_quotes_and_backslashes() -> None:
    assert quote_string('Kunde "Nord"') == '"Kunde \\"Nord\\""'
    assert quote_string("a\\b") == '"a\\\\b"'


@pytest.mark.parametrize("text", ["two\r\nlines", "nul\0", "Entwürfe"])
def test_quote_string_needing_literal_raises(text: str) -> None:
    with pytest.raises(ValueError):
        quote_string(text)


def list_through_imaplib(answer: str) -> list[object]:
    """Return what imaplib's list() returns for a server's LIST response."""
    imap = ScriptedImap([Step('LIST "" "*"', answer.encode())], "")
    imap.state = "AUTH"  # as after a login, which this transcript leaves out
    typ, data = imap.list('""', '"*"')
    assert typ == "OK"
    return list(data)


def test_list_domino_backslash_delimiter_and_inbox() -> None:
    data = list_through_imaplib(
        '* LIST (\\HasNoChildren) "\\\\" Workarea\r\n'
        '* LIST (\\Noinferiors \\HasNoChildren) "\\\\" Inbox\r\n'
        "@TAG OK LIST completed\r\n"
    )

    workarea, inbox = parse_list_response(data)

    assert workarea.delimiter == "\\"
    assert workarea.wire == "Workarea"
    assert workarea.name == "Workarea"
    assert inbox.wire == "INBOX"
    assert inbox.name == "INBOX"
    assert inbox.delimiter == "\\"
    assert inbox.attributes == {"\\noinferiors", "\\hasnochildren"}
    assert inbox.selectable is True


def test_list_dovecot_quoted_literal_and_nil_names() -> None:
    data = list_through_imaplib(
        '* LIST (\\HasNoChildren) "/" "Kunde \\"Nord\\""\r\n'
        '* LIST (\\HasNoChildren) "/" "Gel&APY-schte Elemente"\r\n'
        '* LIST (\\HasNoChildren) "/" {11}\r\nQ1 "Report"\r\n'
        "* LIST (\\Noselect) NIL Public\r\n"
        '* LIST (\\HasNoChildren \\Junk) "/" Junk\r\n'
        "@TAG OK LIST completed\r\n"
    )

    folders = parse_list_response(data)

    assert [f.wire for f in folders] == [
        'Kunde "Nord"',
        "Gel&APY-schte Elemente",
        'Q1 "Report"',
        "Public",
        "Junk",
    ]
    assert folders[1].name == "Gelöschte Elemente"
    assert folders[3].delimiter is None
    assert folders[3].selectable is False
    assert "\\junk" in folders[4].attributes


def test_list_malformed_answer_raises_protocol_error() -> None:
    with pytest.raises(ImapProtocolError):
        parse_list_response([b'(\\HasNoChildren "/" INBOX'])


def test_fetch_body_literal_with_flags_after_it() -> None:
    header = b"Message-ID: <a@b.c>\r\n\r\n"
    data = [
        (b"3 (UID 41 BODY[HEADER.FIELDS (MESSAGE-ID)] {%d}" % len(header), header),
        b' FLAGS (\\Seen $Label1) INTERNALDATE "01-Dec-2026 09:30:00 +0000")',
        b"4 (FLAGS (\\Seen))",
    ]

    (item,) = parse_fetch_response(data)

    assert item.uid == 41
    assert item.flags == ("\\Seen", "$Label1")
    assert item.internaldate == "01-Dec-2026 09:30:00 +0000"
    assert item.body == header


# --- headers and markers --------------------------------------------------------------


def test_header_block_unfolds_folded_message_id() -> None:
    block = (
        b"Subject: Invoice\r\n"
        b"Message-ID:\r\n"
        b" <PAXP193MB2314C6F90A60DA909597069AA7802@PAXP193MB2314.eurprd01.mail."
        b"example.com>\r\n"
        b"\r\n"
    )

    fields = parse_header_block(block)

    assert first_header(fields, "message-id") == (
        "<PAXP193MB2314C6F90A60DA909597069AA7802@PAXP193MB2314.eurprd01.mail."
        "example.com>"
    )
    assert first_header(fields, "Subject") == "Invoice"


def test_header_block_first_occurrence_wins() -> None:
    fields = parse_header_block(b"X-A: first\r\nX-A: second\r\n\r\nX-A: body\r\n")

    assert first_header(fields, "X-A") == "first"
    assert len(fields) == 2


@pytest.mark.parametrize(
    "folder",
    [name for name, _ in FOLDER_NAMES]
    + ["=?utf-8?q?looks_encoded?=", " leading space", "Ä" * 120, "tab\there"],
)
def test_marker_round_trips_through_headers(folder: str) -> None:
    marker = QuarantineMarker(
        incident="INC-0123456789AB",
        mailbox="olga@example.com",
        folder=folder,
        flags=("\\Seen", "$Label1"),
        uidvalidity=1796402426,
        uid=35,
    )
    raw = marker.headers() + b"Message-ID: <t@example.net>\r\n\r\nBody\r\n"

    parsed = QuarantineMarker.from_fields(parse_header_block(raw))

    assert parsed == marker
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
    assert raw.isascii()


def test_marker_missing_header_reads_as_none() -> None:
    fields = parse_header_block(b"X-Autopull-Incident: INC-1\r\n\r\n")

    assert QuarantineMarker.from_fields(fields) is None


def test_strip_markers_keeps_forged_copies_in_original() -> None:
    original = (
        b"X-Autopull-Incident: forged\r\nMessage-ID: <t@example.net>\r\n\r\nBody\r\n"
    )
    marker = QuarantineMarker("INC-1", "olga@example.com", "Ä" * 80, (), 7, 35)

    assert strip_markers(marker.headers() + original) == original


def test_encode_header_text_leaves_plain_ascii() -> None:
    assert encode_header_text('Kunde "Nord"') == 'Kunde "Nord"'
    assert decode_header_text(encode_header_text("Entwürfe")) == "Entwürfe"
    assert encode_header_text("Entwürfe").startswith("=?utf-8?")


# --- settings and request checks ------------------------------------------------------


def test_settings_plaintext_to_remote_host_rejected() -> None:
    with pytest.raises(ValidationError, match="clear text"):
        settings(host="imap.example.com")


def test_settings_wildcard_in_quarantine_folder_rejected() -> None:
    with pytest.raises(ValidationError, match="wildcard"):
        settings(quarantine_folder="Quarantine*")


@pytest.mark.parametrize(
    ("mailbox", "message_id", "incident"),
    [
        ("vault@example.com", "t@example.net", "INC-1"),
        ("olga@example.com", "t@example.net\r\nX: y", "INC-1"),
        ("olga@example.com", "<>", "INC-1"),
        ("olga@example.com", "t@example.net", "INC*"),
        ("olga@example.com", "t@example.net", "INC 1\n"),
    ],
    ids=["quarantine-mailbox", "line-break-id", "empty-id", "wildcard", "newline"],
)
async def test_quarantine_bad_request_raises_before_connecting(
    mailbox: str, message_id: str, incident: str
) -> None:
    connections = Connections([])
    platform = ImapPlatform(settings(), connector=connections)

    with pytest.raises(PermanentError):
        await platform.quarantine(mailbox, message_id, incident)

    assert connections.opened == []


# --- the error boundary ---------------------------------------------------------------


def cert_error() -> ssl.SSLCertVerificationError:
    error = ssl.SSLCertVerificationError(1, "certificate verify failed")
    error.verify_message = "self-signed certificate"
    return error


ERROR_TABLE: list[tuple[str, Callable[[], BaseException], type[ConnectorError]]] = [
    ("abort", lambda: imaplib.IMAP4.abort("socket error: EOF"), TransientError),
    ("timeout", lambda: TimeoutError("timed out"), TransientError),
    ("refused", lambda: ConnectionRefusedError(111, "refused"), TransientError),
    ("dns", lambda: socket.gaierror(-2, "Name or service not known"), TransientError),
    ("ssl", lambda: ssl.SSLError(1, "wrong version number"), TransientError),
    ("eof", lambda: EOFError(), TransientError),
    ("certificate", cert_error, PermanentError),
    (
        "readonly",
        lambda: imaplib.IMAP4.readonly("INBOX is not writable"),
        PermanentError,
    ),
    ("bad", lambda: imaplib.IMAP4.error("SEARCH command error: BAD"), PermanentError),
    ("protocol", lambda: ImapProtocolError("Unclosed list"), PermanentError),
    ("folder-changed", lambda: FolderChangedError("UIDVALIDITY"), TransientError),
    ("other", lambda: ValueError("odd"), PermanentError),
    (
        "overquota",
        lambda: ImapCommandError("APPEND", "[OVERQUOTA] Quota exceeded"),
        TransientError,
    ),
    (
        "unavailable",
        lambda: ImapCommandError("SELECT", "[UNAVAILABLE] x"),
        TransientError,
    ),
    ("inuse", lambda: ImapCommandError("SELECT", "[INUSE] locked"), TransientError),
    ("limit", lambda: ImapCommandError("APPEND", "[LIMIT] too big"), TransientError),
    ("serverbug", lambda: ImapCommandError("FETCH", "[SERVERBUG] x"), TransientError),
    (
        "expunged",
        lambda: ImapCommandError("FETCH", "[EXPUNGEISSUED] x"),
        TransientError,
    ),
    ("no-code", lambda: ImapCommandError("SEARCH", "Internal error"), TransientError),
    (
        "nonexistent",
        lambda: ImapCommandError("SELECT", "[NONEXISTENT] x"),
        NotFoundError,
    ),
    ("trycreate", lambda: ImapCommandError("APPEND", "[TRYCREATE] x"), NotFoundError),
    ("noperm", lambda: ImapCommandError("STORE", "[NOPERM] no"), PermanentError),
    ("cannot", lambda: ImapCommandError("CREATE", "[CANNOT] x"), PermanentError),
    ("clientbug", lambda: ImapCommandError("STORE", "[CLIENTBUG] x"), PermanentError),
    ("corruption", lambda: ImapCommandError("FETCH", "[CORRUPTION] x"), PermanentError),
    ("exists", lambda: ImapCommandError("CREATE", "[ALREADYEXISTS] x"), PermanentError),
    ("expired", lambda: ImapCommandError("LOGIN", "[EXPIRED] x"), PermanentError),
    (
        "privacy",
        lambda: ImapCommandError("LOGIN", "[PRIVACYREQUIRED] x"),
        PermanentError,
    ),
    ("contact", lambda: ImapCommandError("LOGIN", "[CONTACTADMIN] x"), PermanentError),
    (
        "login-failed",
        lambda: ImapCommandError("LOGIN", "[AUTHENTICATIONFAILED] Failed."),
        PermanentError,
    ),
    (
        "login-no-code",
        lambda: ImapCommandError("LOGIN", "Login failed"),
        PermanentError,
    ),
    (
        "login-unavailable",
        lambda: ImapCommandError("LOGIN", "[UNAVAILABLE] Temporary failure"),
        TransientError,
    ),
    (
        "no-such-user",
        lambda: ImapCommandError("LOGIN", "[AUTHORIZATIONFAILED] Failed"),
        NotFoundError,
    ),
    (
        "sasl-no-such-user",
        lambda: ImapCommandError("AUTHENTICATE", "[AUTHORIZATIONFAILED] Failed"),
        NotFoundError,
    ),
]


@pytest.mark.parametrize(
    ("make_error", "expected"),
    [(make, expected) for _, make, expected in ERROR_TABLE],
    ids=[name for name, _, _ in ERROR_TABLE],
)
def test_map_imap_error_classifies(
    make_error: Callable[[], BaseException], expected: type[ConnectorError]
) -> None:
    error = map_imap_error(make_error(), mailbox="olga@example.com", message_id="t@x")

    assert type(error) is expected
    assert error.mailbox == "olga@example.com"
    assert error.message_id == "t@x"
    assert error.platform == "imap"


@pytest.mark.parametrize(
    ("command", "text", "missing"),
    [
        ("LOGIN", "[AUTHORIZATIONFAILED] Failed", True),
        ("AUTHENTICATE", "[AUTHORIZATIONFAILED] Failed", True),
        ("SELECT", "[NONEXISTENT] No such folder", False),
    ],
)
def test_no_such_user_marks_mailbox_missing(
    command: str, text: str, missing: bool
) -> None:
    error = map_imap_error(ImapCommandError(command, text), mailbox="olga@x.example")

    assert error.mailbox_missing is missing


def test_map_imap_error_passes_connector_errors_through() -> None:
    original = NotFoundError("gone")

    assert map_imap_error(original) is original


# --- scripted sessions ----------------------------------------------------------------

BARE = "t@example.net"
INCIDENT = "INC-0123456789AB"
RAW = (
    b"From: Billing <billing@example.net>\r\n"
    b"Subject: Invoice\r\n"
    b"Message-ID: <t@example.net>\r\n"
    b"\r\n"
    b"Pay now.\r\n"
)
USER_HEADERS = b"Subject: Invoice\r\nMessage-ID: <t@example.net>\r\n\r\n"
HEADER_ITEM = "BODY[HEADER.FIELDS (MESSAGE-ID SUBJECT)]"
MARKER_ITEM = (
    "BODY[HEADER.FIELDS (MESSAGE-ID SUBJECT X-AUTOPULL-INCIDENT "
    "X-AUTOPULL-ORIGINAL-MAILBOX X-AUTOPULL-ORIGINAL-FOLDER X-AUTOPULL-ORIGINAL-FLAGS "
    "X-AUTOPULL-ORIGINAL-UID)]"
)
SCRATCH = re.compile(r'"Autopull Removal [0-9a-f]{12}"')


def login(user: str, capabilities: str) -> list[Step]:
    return [
        Step(f'LOGIN "{user}*admin" "adminpw"', ok(text="Logged in")),
        Step("CAPABILITY", ok(f"* CAPABILITY IMAP4rev1 {capabilities}")),
    ]


def examine(folder: str, uidvalidity: int, *, readonly: bool = True) -> Step:
    command = "EXAMINE" if readonly else "SELECT"
    return Step(
        f'{command} "{folder}"',
        ok("* 2 EXISTS", f"* OK [UIDVALIDITY {uidvalidity}] UIDs valid"),
    )


def user_script(capabilities: str, removal: list[Step]) -> list[Step]:
    return [
        *login("olga@example.com", capabilities),
        Step('LIST "" "*"', ok('* LIST (\\HasNoChildren) "/" INBOX')),
        examine("INBOX", 7),
        Step(f'UID SEARCH HEADER Message-ID "{BARE}"', ok("* SEARCH 35")),
        Step(
            f"UID FETCH 35 (UID FLAGS INTERNALDATE BODY.PEEK{HEADER_ITEM[4:]})",
            fetch(35, "\\Seen", HEADER_ITEM, USER_HEADERS),
        ),
        examine("INBOX", 7),
        Step(
            "UID FETCH 35 (UID FLAGS INTERNALDATE BODY.PEEK[])",
            fetch(35, "\\Seen", "BODY[]", RAW),
        ),
        *removal,
        Step("LOGOUT", ok("* BYE Logging out")),
    ]


def vault_script(
    capabilities: str, append_answer: bytes, *, verified: bool
) -> list[Step]:
    marker = QuarantineMarker(INCIDENT, "olga@example.com", "INBOX", ("\\Seen",), 7, 35)
    stored_headers = marker.headers() + USER_HEADERS
    folder = f"Quarantine/{INCIDENT}"
    steps = [
        *login("vault@example.com", capabilities),
        Step('LIST "" ""', ok('* LIST (\\Noselect) "/" ""')),
        Step(f'LIST "" "{folder}"', ok()),
        Step('LIST "" ""', ok('* LIST (\\Noselect) "/" ""')),
        Step(f'CREATE "{folder}"', ok()),
        Step(f'LIST "" "{folder}"', ok(f'* LIST (\\HasNoChildren) "/" {folder}')),
        Step(
            f'APPEND "{folder}" (\\Seen) "01-Dec-2026 09:30:00 +0000"',
            append_answer,
        ),
    ]
    if verified:
        steps += [
            examine(folder, 3),
            Step(f'UID SEARCH HEADER Message-ID "{BARE}"', ok("* SEARCH 41")),
            Step(
                f"UID FETCH 41 (UID FLAGS INTERNALDATE BODY.PEEK{MARKER_ITEM[4:]})",
                fetch(41, "\\Seen", MARKER_ITEM, stored_headers),
            ),
        ]
    return [*steps, Step("LOGOUT", ok("* BYE Logging out"))]


MOVE_REMOVAL = [
    examine("INBOX", 7, readonly=False),
    Step(SCRATCH, ok()),
    Step(re.compile(r"UID MOVE 35 " + SCRATCH.pattern), b""),
    Step("UID SEARCH UID 35", ok("* SEARCH")),
    Step(
        re.compile(r"SELECT " + SCRATCH.pattern),
        ok("* 1 EXISTS", "* OK [UIDVALIDITY 9] x"),
    ),
    Step("UID STORE 1:* +FLAGS.SILENT (\\Deleted)", ok()),
    Step("EXPUNGE", ok("* 1 EXPUNGE")),
    Step("UNSELECT", ok()),
    Step(re.compile(r"DELETE " + SCRATCH.pattern), ok()),
]


def move_removal(move_answer: bytes) -> list[Step]:
    steps = list(MOVE_REMOVAL)
    steps[1] = Step(re.compile("CREATE " + SCRATCH.pattern), ok())
    steps[2] = Step(steps[2].command, move_answer)
    return steps


@pytest.mark.parametrize(
    ("move_answer", "append_answer"),
    [
        (
            ok("* OK [COPYUID 0 35 41] Moved", "* 1 EXPUNGE", text="Move completed."),
            ok(text="[APPENDUID 0 41] Append completed."),
        ),
        (ok("* 1 EXPUNGE", text="Move completed."), ok(text="Append completed.")),
    ],
    ids=["zero-uidvalidity", "no-copyuid"],
)
async def test_move_without_uidplus_ignores_copyuid(
    move_answer: bytes, append_answer: bytes
) -> None:
    capabilities = "MOVE UNSELECT"
    connections = Connections(
        [
            (user_script(capabilities, move_removal(move_answer)), capabilities),
            (vault_script(capabilities, append_answer, verified=True), capabilities),
        ]
    )
    platform = ImapPlatform(settings(), connector=connections)

    result = await platform.quarantine("olga@example.com", f"<{BARE}>", INCIDENT)

    user, vault = connections.opened
    assert user.unexpected == []
    assert vault.unexpected == []
    assert user.steps == []
    assert vault.steps == []
    assert [(c.folder, c.read) for c in result.copies] == [("INBOX", True)]
    assert result.already_done is False
    assert vault.literals[0].startswith(b"X-Autopull-Incident: INC-0123456789AB\r\n")
    assert vault.literals[0].endswith(RAW)
    assert not any("UID EXPUNGE" in command for command in user.sent)


async def test_refused_append_sends_no_store_or_expunge() -> None:
    capabilities = "UIDPLUS MOVE UNSELECT"
    overquota = b"@TAG NO [OVERQUOTA] Quota exceeded (mailbox for user is full)\r\n"
    connections = Connections(
        [
            (user_script(capabilities, []), capabilities),
            (vault_script(capabilities, overquota, verified=False), capabilities),
        ]
    )
    platform = ImapPlatform(settings(), connector=connections)

    with pytest.raises(TransientError) as caught:
        await platform.quarantine("olga@example.com", BARE, INCIDENT)

    user, vault = connections.opened
    assert "OVERQUOTA" in str(caught.value)
    assert user.unexpected == []
    assert vault.unexpected == []
    assert user.sent[-1] == "LOGOUT"
    assert not any(
        word in command
        for command in user.sent
        for word in ("STORE", "EXPUNGE", "MOVE")
    )


async def test_no_move_no_uidplus_only_flags_target() -> None:
    capabilities = "UNSELECT"
    removal = [
        examine("INBOX", 7, readonly=False),
        Step("UID STORE 35 +FLAGS.SILENT (\\Deleted)", ok()),
        Step("UNSELECT", ok()),
    ]
    connections = Connections(
        [
            (user_script(capabilities, removal), capabilities),
            (vault_script(capabilities, ok(), verified=True), capabilities),
        ]
    )
    platform = ImapPlatform(settings(), connector=connections)

    result = await platform.quarantine("olga@example.com", BARE, INCIDENT)

    user, _ = connections.opened
    assert user.unexpected == []
    assert user.steps == []
    assert isinstance(result, ImapQuarantineResult)
    assert [c.folder for c in result.pending_expunge] == ["INBOX"]
    assert not any("EXPUNGE" in command for command in user.sent)
