"""IBM Domino, Dovecot and other IMAP servers, logged in as each user by a master user.

IMAP cannot copy or move a message from one user's mailbox into another's. So a
quarantine fetches the message as the user and appends it to a folder named for the
incident in the quarantine user's mailbox. Headers on the copy record the incident,
the original mailbox, folder, flags and UID. The copy is verified by searching for
it, and only then is the original deleted. A restore appends the copy back to the
folder its headers name, with the original flags, verifies it, and then removes the
quarantine copy.

How an original is deleted depends on the server's CAPABILITY response:

- UIDPLUS: flag it `\\Deleted`, then `UID EXPUNGE` its UID alone.
- MOVE without UIDPLUS: move it into a new, empty folder, then expunge that folder and
  delete it.
- neither, as on HCL Domino 12: only flag it `\\Deleted`. A plain EXPUNGE would also
  remove every other message that the user's mail client flagged, so the result lists
  the copy in `ImapQuarantineResult.pending_expunge` instead of calling it done.

No copy is ever located by APPENDUID, COPYUID or UIDNEXT, because some servers send
none of them or a UIDVALIDITY of 0. Copies are found by Message-ID and marker headers.

imaplib runs in worker threads. Its exceptions, socket errors and NO answers are
translated in one place, `map_imap_error`, and no foreign exception leaves this module.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import email.header
import hashlib
import imaplib
import logging
import re
import ssl
import weakref
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.utils import parseaddr
from typing import Any, Literal, TypeVar
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from ..errors import ConnectorError, NotFoundError, PermanentError, TransientError
from ..sources.common import bare_message_id
from .base import (
    MailPlatform,
    MessageCopy,
    MessageSearch,
    QuarantineResult,
    SentMessage,
)
from .mime import sent_message_from_mime

logger = logging.getLogger(__name__)

T = TypeVar("T")

PLATFORM = "imap"
INCIDENT_HEADER = "X-Autopull-Incident"
ORIGINAL_MAILBOX_HEADER = "X-Autopull-Original-Mailbox"
ORIGINAL_FOLDER_HEADER = "X-Autopull-Original-Folder"
ORIGINAL_FLAGS_HEADER = "X-Autopull-Original-Flags"
ORIGINAL_UID_HEADER = "X-Autopull-Original-Uid"
# The order in which the marker headers are put in front of a quarantine copy.
MARKER_HEADERS = (
    INCIDENT_HEADER,
    ORIGINAL_MAILBOX_HEADER,
    ORIGINAL_FOLDER_HEADER,
    ORIGINAL_FLAGS_HEADER,
    ORIGINAL_UID_HEADER,
)
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
# Prefix of the short-lived folder that the MOVE path empties and deletes.
# NOTE: that folder is created at the top level. On a server whose personal namespace
# has a prefix, such as Cyrus's "INBOX.", the CREATE fails, and so does the quarantine.
REMOVAL_FOLDER_PREFIX = "Autopull Removal"
# Response codes of RFC 5530 and RFC 9208 that are not permanent failures.
TRANSIENT_CODES = frozenset(
    {"UNAVAILABLE", "INUSE", "SERVERBUG", "OVERQUOTA", "LIMIT", "EXPUNGEISSUED"}
)
NOT_FOUND_CODES = frozenset({"NONEXISTENT", "TRYCREATE"})
# Flags a client cannot set (\Recent), or that would get a copy expunged (\Deleted).
UNCOPIED_FLAGS = frozenset({"\\recent", "\\deleted"})
_RESPONSE_CODE = re.compile(r"^\s*\[(?P<code>[A-Za-z0-9-]+)[^\]]*\]")
_FORBIDDEN_IN_NAMES = re.compile(r"[\x00-\x1f\x7f*%]")


class ImapSettings(BaseModel):
    """An IMAP server reached as each user through a master login.

    With `login_method` "master_separator" the adapter logs in as
    `<mailbox><master_separator><master_user>` (Dovecot's master users); with
    "sasl_plain" it sends AUTHENTICATE PLAIN with the mailbox as authorization id.
    Copies go to the folder `quarantine_folder/<incident id>` of `quarantine_mailbox`.
    At most `max_connections_per_mailbox` connections are open to any one mailbox,
    and every socket operation times out after `timeout` seconds.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    host: str = Field(description="IMAP server host.")
    port: int = Field(default=993, ge=1, le=65535, description="IMAP server port.")
    security: Literal["tls", "starttls", "none"] = Field(
        default="tls",
        description="tls (IMAPS), starttls, or none; none only on a loopback host.",
    )
    ca_file: str | None = Field(
        default=None,
        description="PEM file of CAs for the server certificate; system CAs if unset.",
    )
    master_user: str = Field(description="Master user that logs in as each user.")
    master_password: SecretStr = Field(description="Password of the master user.")
    login_method: Literal["master_separator", "sasl_plain"] = Field(
        default="master_separator",
        description="How the master user logs in as a user.",
    )
    master_separator: str = Field(
        default="*",
        min_length=1,
        description="Between user and master name (auth_master_user_separator).",
    )
    quarantine_mailbox: str = Field(description="User whose folders get the copies.")
    quarantine_folder: str = Field(
        default="Quarantine",
        min_length=1,
        description="Quarantine user's top-level folder; one subfolder per incident.",
    )
    max_connections_per_mailbox: int = Field(
        default=2, ge=1, description="Open connections allowed per mailbox."
    )
    timeout: float = Field(
        default=60.0, gt=0, description="Seconds each socket operation may take."
    )

    @model_validator(mode="after")
    def _check(self) -> ImapSettings:
        if self.security == "none" and self.host.lower() not in LOOPBACK_HOSTS:
            raise ValueError(
                f"security 'none' would send the master password in clear text to "
                f"{self.host}; use 'tls' or 'starttls' for any host but loopback."
            )
        if _FORBIDDEN_IN_NAMES.search(self.quarantine_folder):
            raise ValueError(
                f"quarantine_folder {self.quarantine_folder!r} contains a control "
                "character or an IMAP wildcard (* or %); choose another name."
            )
        return self


# --- folder names, quoting and response parsing -----------------------------------


def encode_mailbox_name(name: str) -> str:
    """Encode a folder name in IMAP's modified UTF-7 (RFC 3501, section 5.1.3)."""
    parts: list[str] = []
    pending: list[str] = []
    for char in name:
        if " " <= char <= "~":
            if pending:
                parts.append(_encode_utf7_run("".join(pending)))
                pending.clear()
            parts.append("&-" if char == "&" else char)
        else:
            pending.append(char)
    if pending:
        parts.append(_encode_utf7_run("".join(pending)))
    return "".join(parts)


def _encode_utf7_run(text: str) -> str:
    encoded = base64.b64encode(text.encode("utf-16-be")).decode("ascii")
    return "&" + encoded.rstrip("=").replace("/", ",") + "-"


def decode_mailbox_name(wire: str) -> str:
    """Decode a folder name from modified UTF-7; raise ValueError when it is invalid."""
    parts: list[str] = []
    position = 0
    while position < len(wire):
        start = wire.find("&", position)
        if start < 0:
            parts.append(wire[position:])
            break
        parts.append(wire[position:start])
        end = wire.find("-", start + 1)
        if end < 0:
            raise ValueError(f"The folder name {wire!r} has an unterminated & run.")
        run = wire[start + 1 : end]
        if not run:
            parts.append("&")
        else:
            padded = run.replace(",", "/") + "=" * (-len(run) % 4)
            parts.append(base64.b64decode(padded, validate=True).decode("utf-16-be"))
        position = end + 1
    return "".join(parts)


def quote_string(text: str) -> str:
    """Quote text as an IMAP quoted string; raise ValueError if it needs a literal."""
    if not text.isascii() or any(char in "\r\n\0" for char in text):
        raise ValueError(
            f"{text!r} contains a line break, NUL or non-ASCII character, so it "
            "cannot be sent as an IMAP quoted string."
        )
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


Token = bytes | None | list["Token"]


class ImapProtocolError(Exception):
    """A server response that this adapter cannot parse."""


class ImapCommandError(Exception):
    """A NO response to a command, or a failed login, with its response code."""

    def __init__(self, command: str, text: str) -> None:
        super().__init__(f"{command} failed: {text}")
        self.command = command
        self.text = text
        match = _RESPONSE_CODE.match(text)
        self.code = match.group("code").upper() if match else None


class FolderChangedError(Exception):
    """A folder's UIDVALIDITY changed, so the UIDs found earlier name nothing."""


class _Parser:
    """Reads IMAP tokens: atoms, NIL, quoted strings, literals, parenthesized lists."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.position = 0

    def tokens(self) -> list[Token]:
        found: list[Token] = []
        while True:
            self._skip_spaces()
            if self.position >= len(self.data):
                return found
            found.append(self._token())

    def _skip_spaces(self) -> None:
        while self.data[self.position : self.position + 1] == b" ":
            self.position += 1

    def _token(self) -> Token:
        char = self.data[self.position : self.position + 1]
        if char == b"(":
            return self._list()
        if char == b'"':
            return self._quoted()
        if char == b"{":
            return self._literal()
        if char == b")" or not char:
            raise ImapProtocolError(
                f"Unexpected {char!r} at offset {self.position} of {self.data[:200]!r}."
            )
        return self._atom()

    def _list(self) -> list[Token]:
        self.position += 1
        items: list[Token] = []
        while True:
            self._skip_spaces()
            char = self.data[self.position : self.position + 1]
            if char == b")":
                self.position += 1
                return items
            if not char:
                raise ImapProtocolError(f"Unclosed list in {self.data[:200]!r}.")
            items.append(self._token())

    def _quoted(self) -> bytes:
        self.position += 1
        value = bytearray()
        while self.position < len(self.data):
            char = self.data[self.position]
            self.position += 1
            if char == 0x5C:  # backslash: the next byte is taken as it is
                if self.position >= len(self.data):
                    break
                value.append(self.data[self.position])
                self.position += 1
            elif char == 0x22:  # closing double quote
                return bytes(value)
            else:
                value.append(char)
        raise ImapProtocolError(f"Unterminated quoted string in {self.data[:200]!r}.")

    def _literal(self) -> bytes:
        close = self.data.find(b"}", self.position)
        size_text = self.data[self.position + 1 : close].rstrip(b"+")
        if close < 0 or not size_text.isdigit():
            raise ImapProtocolError(f"Malformed literal in {self.data[:200]!r}.")
        start = close + 1
        if self.data[start : start + 2] == b"\r\n":
            start += 2
        end = start + int(size_text)
        if end > len(self.data):
            raise ImapProtocolError(f"Truncated literal in {self.data[:200]!r}.")
        self.position = end
        return self.data[start:end]

    def _atom(self) -> bytes | None:
        start = self.position
        while self.position < len(self.data):
            char = self.data[self.position : self.position + 1]
            if char in (b" ", b"(", b")"):
                break
            if char == b"[":
                # A section such as BODY[HEADER.FIELDS (SUBJECT)] belongs to the atom.
                close = self.data.find(b"]", self.position)
                if close < 0:
                    raise ImapProtocolError(f"Unclosed [ in {self.data[:200]!r}.")
                self.position = close
            self.position += 1
        atom = self.data[start : self.position]
        return None if atom.upper() == b"NIL" else atom


def _wire_responses(data: Iterable[Any]) -> list[bytes]:
    """Rejoin the pieces imaplib split around literals, one bytes value per response.

    imaplib returns a response with literals as tuples of (text ending in `{n}`,
    literal), followed by the rest of the line as bytes.
    """
    responses: list[bytes] = []
    current = b""
    for item in data:
        if item is None:
            continue
        if isinstance(item, tuple):
            current += bytes(item[0]) + b"\r\n" + bytes(item[1])
        else:
            responses.append(current + bytes(item))
            current = b""
    if current:
        responses.append(current)
    return responses


@dataclass(frozen=True)
class Folder:
    """A listed folder: the wire name for commands, the Unicode name for reports."""

    wire: str
    name: str
    delimiter: str | None
    attributes: frozenset[str] = frozenset()

    @property
    def selectable(self) -> bool:
        return not self.attributes & {"\\noselect", "\\nonexistent"}


def parse_list_response(data: Iterable[Any]) -> list[Folder]:
    """Parse the data of a LIST response, as imaplib returns it, into folders.

    Names arrive as atoms, quoted strings (with `\\"` and `\\\\` escapes) or
    literals, in modified UTF-7. The delimiter may be NIL, or a quoted backslash
    as HCL Domino sends it. Any case of INBOX is the inbox.
    """
    folders: list[Folder] = []
    for response in _wire_responses(data):
        tokens = _Parser(response).tokens()
        if len(tokens) < 3 or not isinstance(tokens[0], list):
            raise ImapProtocolError(f"Unexpected LIST response {response[:200]!r}.")
        attributes, delimiter, raw_name = tokens[0], tokens[1], tokens[2]
        if not isinstance(raw_name, bytes) or isinstance(delimiter, list):
            raise ImapProtocolError(f"Unexpected LIST response {response[:200]!r}.")
        wire = raw_name.decode("utf-8", errors="surrogateescape")
        if wire.upper() == "INBOX":
            wire = "INBOX"
        try:
            name = decode_mailbox_name(wire)
        except ValueError:
            logger.warning(
                "Folder name is not modified UTF-7, using it as is name=%r", wire
            )
            name = wire
        folders.append(
            Folder(
                wire=wire,
                name=name,
                delimiter=delimiter.decode("ascii", errors="replace")
                if delimiter is not None
                else None,
                attributes=frozenset(
                    item.decode("ascii", errors="replace").lower()
                    for item in attributes
                    if isinstance(item, bytes)
                ),
            )
        )
    return folders


@dataclass(frozen=True)
class _Fetched:
    uid: int
    flags: tuple[str, ...]
    internaldate: str | None
    body: bytes


def parse_fetch_response(data: Iterable[Any]) -> list[_Fetched]:
    """Parse the data of a UID FETCH response to a request for one BODY item.

    Untagged FETCH responses without a UID or a body (flag updates the server sends
    on its own) are skipped.
    """
    fetched: list[_Fetched] = []
    for response in _wire_responses(data):
        tokens = _Parser(response).tokens()
        if len(tokens) < 2 or not isinstance(tokens[1], list):
            raise ImapProtocolError(f"Unexpected FETCH response {response[:200]!r}.")
        items = tokens[1]
        pairs: dict[str, Token] = {}
        for key, value in zip(items[0::2], items[1::2], strict=False):
            if isinstance(key, bytes):
                pairs[key.decode("ascii", errors="replace").upper()] = value
        uid = pairs.get("UID")
        body_key = next((key for key in pairs if key.startswith("BODY[")), None)
        if not isinstance(uid, bytes) or not uid.isdigit() or body_key is None:
            continue
        body = pairs[body_key]
        flags = pairs.get("FLAGS")
        date = pairs.get("INTERNALDATE")
        fetched.append(
            _Fetched(
                uid=int(uid),
                flags=tuple(
                    flag.decode("ascii", errors="replace")
                    for flag in (flags if isinstance(flags, list) else [])
                    if isinstance(flag, bytes)
                ),
                internaldate=date.decode("ascii") if isinstance(date, bytes) else None,
                body=body if isinstance(body, bytes) else b"",
            )
        )
    return fetched


def uid_set(uids: Iterable[int]) -> str:
    """Format UIDs as an IMAP sequence set."""
    return ",".join(str(uid) for uid in sorted(set(uids)))


def flag_list(flags: Iterable[str]) -> str:
    """Format flags as a parenthesized IMAP flag list."""
    return "(" + " ".join(flags) + ")"


# --- headers ------------------------------------------------------------------------


def parse_header_block(block: bytes) -> list[tuple[str, str]]:
    """Split a header block into (name, value) pairs in order, values unfolded.

    Unfolding removes the line breaks of folded lines and keeps their white space
    (RFC 5322, section 2.2.3); the value is then stripped. Parsing stops at the first
    empty line. Bytes that are not UTF-8 are replaced.
    """
    fields: list[tuple[str, str]] = []
    for line in re.split(r"\r?\n", block.decode("utf-8", errors="replace")):
        if not line:
            break
        if line[0] in " \t":
            if fields:
                name, value = fields[-1]
                fields[-1] = (name, value + line)
            continue
        name, colon, value = line.partition(":")
        if colon:
            fields.append((name.strip(), value))
    return [(name, value.strip()) for name, value in fields]


def first_header(fields: list[tuple[str, str]], name: str) -> str | None:
    """Return the first value of a header field, or None."""
    wanted = name.lower()
    return next((value for key, value in fields if key.lower() == wanted), None)


def encode_header_text(text: str) -> str:
    """Encode text for an unstructured header, in RFC 2047 encoded words if needed.

    Printable ASCII without surrounding white space and without `=?` is kept as it
    is. Any other text becomes UTF-8 encoded words, folded with CRLF.
    """
    if (
        text.isascii()
        and text.isprintable()
        and text == text.strip()
        and "=?" not in text
    ):
        return text
    return email.header.Header(text, "utf-8").encode(linesep="\r\n")


def decode_header_text(value: str) -> str:
    """Decode RFC 2047 encoded words in an unfolded header value."""
    try:
        return str(email.header.make_header(email.header.decode_header(value)))
    except (LookupError, ValueError, UnicodeError):
        return value


@dataclass(frozen=True)
class QuarantineMarker:
    """Origin of a quarantine copy, carried in headers on the copy itself."""

    incident: str
    mailbox: str
    folder: str
    flags: tuple[str, ...]
    uidvalidity: int
    uid: int

    @property
    def key(self) -> tuple[str, int, int]:
        """The original copy this marker names: folder, UIDVALIDITY and UID."""
        return (self.folder, self.uidvalidity, self.uid)

    def headers(self) -> bytes:
        """Return the marker as header lines, in `MARKER_HEADERS` order."""
        lines = [
            f"{INCIDENT_HEADER}: {self.incident}",
            f"{ORIGINAL_MAILBOX_HEADER}: {encode_header_text(self.mailbox)}",
            f"{ORIGINAL_FOLDER_HEADER}: {encode_header_text(self.folder)}",
            f"{ORIGINAL_FLAGS_HEADER}: {flag_list(self.flags)}",
            f"{ORIGINAL_UID_HEADER}: {self.uidvalidity}/{self.uid}",
        ]
        return ("\r\n".join(lines) + "\r\n").encode("ascii")

    @classmethod
    def from_fields(cls, fields: list[tuple[str, str]]) -> QuarantineMarker | None:
        """Read a marker from header fields; None when one is missing or invalid.

        The first occurrence of each header counts, because the adapter puts its
        own in front of any that the message itself carried.
        """
        values = [first_header(fields, name) for name in MARKER_HEADERS]
        incident, mailbox, folder, flags, uid_text = values
        if None in values:
            return None
        assert incident is not None
        assert mailbox is not None
        assert folder is not None
        assert flags is not None
        assert uid_text is not None
        uidvalidity, slash, uid = uid_text.partition("/")
        if not slash or not uidvalidity.isdigit() or not uid.isdigit():
            return None
        return cls(
            incident=incident,
            mailbox=decode_header_text(mailbox),
            folder=decode_header_text(folder),
            flags=tuple(flags.strip("()").split()),
            uidvalidity=int(uidvalidity),
            uid=int(uid),
        )


def strip_markers(raw: bytes) -> bytes:
    """Remove the marker headers that the adapter put in front of a message.

    Only the leading fields that match `MARKER_HEADERS` in order are removed, so
    copies of those headers inside the original message stay where they are.
    """
    position = 0
    for name in MARKER_HEADERS:
        prefix = name.lower().encode("ascii") + b":"
        if raw[position : position + len(prefix)].lower() != prefix:
            break
        end = raw.find(b"\n", position)
        while end >= 0 and raw[end + 1 : end + 2] in (b" ", b"\t"):
            end = raw.find(b"\n", end + 1)
        if end < 0:
            break
        position = end + 1
    return raw[position:]


def parse_internaldate(value: str | None) -> datetime | None:
    """Parse an INTERNALDATE such as `01-Jan-2026 10:00:00 +0000`."""
    if not value:
        return None
    try:
        return datetime.strptime(value.strip(), "%d-%b-%Y %H:%M:%S %z")
    except ValueError:
        return None


# --- error mapping ------------------------------------------------------------------


def map_imap_error(
    exc: BaseException,
    *,
    mailbox: str | None = None,
    message_id: str | None = None,
) -> ConnectorError:
    """Translate an error of imaplib, the socket or a NO response to a connector error.

    Timeouts, socket errors and `imaplib.IMAP4.abort` (a dropped connection, a BYE)
    are transient. A NO response is classified by its response code. OVERQUOTA,
    UNAVAILABLE, INUSE, LIMIT, SERVERBUG and EXPUNGEISSUED are transient. NONEXISTENT
    and TRYCREATE are not found, and so is AUTHORIZATIONFAILED at login, because
    Dovecot returns it when the master user logs in as a user that does not exist.
    Any other code, such as AUTHENTICATIONFAILED or NOPERM, is permanent. A NO without
    a code is transient, except at login. A BAD response, a read-only folder and a
    certificate that fails verification are permanent.
    """
    context: dict[str, Any] = {
        "mailbox": mailbox,
        "message_id": message_id,
        "platform": PLATFORM,
    }
    where = f"mailbox {mailbox}" if mailbox else "the IMAP server"
    if isinstance(exc, ConnectorError):
        return exc
    if isinstance(exc, ImapCommandError):
        return _map_command_error(exc, where, context)
    if isinstance(exc, FolderChangedError):
        return TransientError(
            f"A folder of {where} changed while it was processed ({exc}); the "
            "request will be retried and finds the messages again.",
            **context,
        )
    if isinstance(exc, ssl.SSLCertVerificationError):
        return PermanentError(
            f"The certificate of the IMAP server for {where} failed verification "
            f"({exc.verify_message}); set ca_file or fix the server certificate.",
            **context,
        )
    if isinstance(exc, imaplib.IMAP4.readonly):
        return PermanentError(
            f"A folder of {where} is read-only for the master user ({exc}); grant it "
            "write access.",
            **context,
        )
    if isinstance(exc, imaplib.IMAP4.abort | OSError | EOFError):
        # socket.timeout is TimeoutError, a subclass of OSError, since Python 3.10.
        return TransientError(
            f"The IMAP connection for {where} failed ({type(exc).__name__}: {exc}); "
            "the request will be retried.",
            **context,
        )
    if isinstance(exc, imaplib.IMAP4.error):
        return PermanentError(
            f"The IMAP server rejected a command for {where} ({exc}); the command "
            "needs fixing, so it is not retried.",
            **context,
        )
    if isinstance(exc, ImapProtocolError):
        return PermanentError(
            f"The IMAP server sent a response for {where} that cannot be parsed "
            f"({exc}); report this as a bug if it repeats.",
            **context,
        )
    return PermanentError(
        f"An IMAP request for {where} failed unexpectedly ({type(exc).__name__}: "
        f"{exc}); report this as a bug if it repeats.",
        **context,
    )


def _map_command_error(
    exc: ImapCommandError, where: str, context: dict[str, Any]
) -> ConnectorError:
    code = exc.code
    detail = f"{exc.command}: {exc.text}"
    at_login = exc.command in ("LOGIN", "AUTHENTICATE")
    if at_login and code == "AUTHORIZATIONFAILED":
        return NotFoundError(
            f"The master user may not log in as {where} ({detail}); on Dovecot this "
            "means that the user does not exist.",
            mailbox_missing=True,
            **context,
        )
    if code in TRANSIENT_CODES:
        return TransientError(
            f"The IMAP server rejected a command for {where} for now ({detail}); the "
            "request will be retried.",
            **context,
        )
    if code in NOT_FOUND_CODES:
        return NotFoundError(
            f"The IMAP server found nothing for {where} ({detail}).", **context
        )
    if at_login:
        return PermanentError(
            f"The master user failed to log in as {where} ({detail}); check "
            "master_user, master_password and login_method.",
            **context,
        )
    if code is None:
        return TransientError(
            f"The IMAP server rejected a command for {where} without a response code "
            f"({detail}); the request will be retried.",
            **context,
        )
    return PermanentError(
        f"The IMAP server rejected a command for {where} ({detail}); this repeats on "
        "retry, so it is not retried.",
        **context,
    )


# --- one connection -----------------------------------------------------------------


@dataclass(frozen=True)
class _Original:
    """A copy of the message in the user's mailbox."""

    folder: Folder
    uidvalidity: int
    uid: int
    flags: tuple[str, ...]
    internaldate: str | None
    subject: str | None

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.folder.name, self.uidvalidity, self.uid)

    @property
    def deleted(self) -> bool:
        return any(flag.lower() == "\\deleted" for flag in self.flags)

    def public(self, mailbox: str, message_id: str) -> MessageCopy:
        return MessageCopy(
            mailbox=mailbox,
            message_id=message_id,
            item_id=item_id(self.folder.wire, self.uidvalidity, self.uid),
            folder=self.folder.name,
            read=any(flag.lower() == "\\seen" for flag in self.flags),
            subject=self.subject,
            received_at=parse_internaldate(self.internaldate),
        )


@dataclass(frozen=True)
class _Stored:
    """A quarantine copy in the incident folder, with the marker it carries."""

    uidvalidity: int
    uid: int
    marker: QuarantineMarker
    internaldate: str | None
    subject: str | None

    def original(self, mailbox: str, message_id: str) -> MessageCopy:
        """Describe the copy as it was before quarantine, from its marker."""
        return MessageCopy(
            mailbox=mailbox,
            message_id=message_id,
            item_id=item_id(
                encode_mailbox_name(self.marker.folder),
                self.marker.uidvalidity,
                self.marker.uid,
            ),
            folder=self.marker.folder,
            read=any(flag.lower() == "\\seen" for flag in self.marker.flags),
            subject=self.subject,
            received_at=parse_internaldate(self.internaldate),
        )


def item_id(wire: str, uidvalidity: int, uid: int) -> str:
    """Name one message the way an RFC 5092 IMAP URL path does."""
    return f"{quote(wire, safe='&,+')};UIDVALIDITY={uidvalidity}/;UID={uid}"


_MARKER_FIELDS = " ".join(name.upper() for name in MARKER_HEADERS)


# Names of the Sent folder on servers that do not mark it with \Sent (RFC 6154).
SENT_FOLDER_NAMES = frozenset(
    {"sent", "sent items", "sent messages", "sent mail", "inbox.sent", "gesendet"}
)


class ImapSession:
    """One logged-in IMAP connection; its methods block, and run in a worker thread.

    NOTE: the session never sends CLOSE, because CLOSE expunges every message flagged
    \\Deleted in the selected folder, including ones other clients flagged. It leaves
    a folder with UNSELECT, EXAMINE or LOGOUT, none of which expunges.
    """

    def __init__(
        self, imap: imaplib.IMAP4, mailbox: str, capabilities: frozenset[str]
    ) -> None:
        self.imap = imap
        self.mailbox = mailbox
        self.capabilities = capabilities

    @property
    def uidplus(self) -> bool:
        return "UIDPLUS" in self.capabilities

    @property
    def move(self) -> bool:
        return "MOVE" in self.capabilities

    # Single commands.

    def list_folders(self, pattern: str = "*") -> list[Folder]:
        typ, data = self.imap.list('""', quote_string(pattern))
        _check(typ, data, "LIST")
        return parse_list_response(data)

    def delimiter(self) -> str | None:
        typ, data = self.imap.list('""', '""')
        _check(typ, data, "LIST")
        answers = parse_list_response(data)
        return answers[0].delimiter if answers else None

    def select(self, folder: Folder, *, readonly: bool) -> int:
        """Select or examine a folder and return its UIDVALIDITY."""
        typ, data = self.imap.select(quote_string(folder.wire), readonly=readonly)
        _check(typ, data, "EXAMINE" if readonly else "SELECT")
        _, values = self.imap.response("UIDVALIDITY")
        text = values[-1] if values and values[-1] else b""
        if not isinstance(text, bytes) or not text.strip().isdigit():
            raise ImapProtocolError(
                f"SELECT of {folder.wire!r} returned no UIDVALIDITY."
            )
        return int(text)

    def deselect(self) -> None:
        """Leave the selected folder, if any, without expunging anything."""
        if self.imap.state != "SELECTED":
            return
        if "UNSELECT" in self.capabilities:
            typ, data = self.imap.unselect()
            _check(typ, data, "UNSELECT")
        else:
            self.select(Folder("INBOX", "INBOX", None), readonly=True)

    def search_message_id(self, bare: str) -> list[int]:
        """Search the selected folder for a Message-ID; a substring match (RFC 3501)."""
        if bare.isascii():
            typ, data = self.imap.uid(
                "SEARCH", "HEADER", "Message-ID", quote_string(bare)
            )
        else:
            # typeshed declares `literal` as str, but imaplib sends it as bytes.
            self.imap.literal = bare.encode("utf-8")  # type: ignore[assignment]
            typ, data = self.imap.uid(
                "SEARCH", "CHARSET", "UTF-8", "HEADER", "Message-ID"
            )
        _check(typ, data, "UID SEARCH")
        return [int(uid) for item in data if item for uid in bytes(item).split()]

    def search_uids(self, uids: Iterable[int]) -> list[int]:
        typ, data = self.imap.uid("SEARCH", "UID", uid_set(uids))
        _check(typ, data, "UID SEARCH")
        return [int(uid) for item in data if item for uid in bytes(item).split()]

    def fetch(self, uids: Iterable[int], body: str) -> list[_Fetched]:
        wanted = set(uids)
        if not wanted:
            return []
        items = f"(UID FLAGS INTERNALDATE {body})"
        typ, data = self.imap.uid("FETCH", uid_set(wanted), items)
        _check(typ, data, "UID FETCH")
        return [item for item in parse_fetch_response(data) if item.uid in wanted]

    def append(
        self, folder: Folder, flags: Iterable[str], internaldate: str | None, raw: bytes
    ) -> None:
        listed = flag_list(flags)
        typ, data = self.imap.append(
            quote_string(folder.wire),
            listed if listed != "()" else None,
            f'"{internaldate}"' if internaldate else None,
            raw,
        )
        _check(typ, data, "APPEND")

    def store(
        self, uids: Iterable[int] | str, operation: str, flags: Iterable[str]
    ) -> None:
        target = uids if isinstance(uids, str) else uid_set(uids)
        typ, data = self.imap.uid("STORE", target, operation, flag_list(flags))
        _check(typ, data, "UID STORE")

    def create(self, wire: str) -> None:
        typ, data = self.imap.create(quote_string(wire))
        if typ != "OK" and _code_of(data) == "ALREADYEXISTS":
            return
        _check(typ, data, "CREATE")

    def sent_messages(self, since: datetime) -> list[_Fetched]:
        """Fetch the messages of every Sent folder sent on or after the day of `since`.

        Sent folders carry the RFC 6154 `\\Sent` attribute, or, on servers without
        SPECIAL-USE, one of the usual names. SENTSINCE compares whole days of the
        Date header, so the search starts a day early and callers compare times.
        """
        folders = [f for f in self.list_folders() if f.selectable]
        sent = [f for f in folders if "\\sent" in f.attributes]
        if not sent:
            sent = [f for f in folders if f.name.lower() in SENT_FOLDER_NAMES]
        day = (since - timedelta(days=1)).strftime("%d-%b-%Y")
        found: list[_Fetched] = []
        for folder in sent:
            self.select(folder, readonly=True)
            typ, data = self.imap.uid("SEARCH", "SENTSINCE", day)
            _check(typ, data, "UID SEARCH")
            uids = [int(uid) for item in data if item for uid in bytes(item).split()]
            found.extend(self.fetch(uids, "BODY.PEEK[]"))
            self.deselect()
        return found

    # Steps of a quarantine or restore.

    def locate(self, bare: str, folders: list[Folder] | None = None) -> list[_Original]:
        """Find every copy of a Message-ID in every selectable folder, exactly.

        `folders` is the folder list when the caller has it already.
        """
        found: list[_Original] = []
        for folder in self.list_folders() if folders is None else folders:
            if not folder.selectable:
                continue
            found.extend(self._copies_in(folder, bare))
        return found

    def _copies_in(self, folder: Folder, bare: str) -> list[_Original]:
        uidvalidity = self.select(folder, readonly=True)
        uids = self.search_message_id(bare)
        headers = "BODY.PEEK[HEADER.FIELDS (MESSAGE-ID SUBJECT)]"
        found: list[_Original] = []
        for item in self.fetch(uids, headers):
            fields = parse_header_block(item.body)
            if bare_message_id(first_header(fields, "Message-ID")) != bare:
                continue
            found.append(
                _Original(
                    folder=folder,
                    uidvalidity=uidvalidity,
                    uid=item.uid,
                    flags=item.flags,
                    internaldate=item.internaldate,
                    subject=_subject(fields),
                )
            )
        return found

    def search_window(self, search: MessageSearch) -> list[MessageCopy]:
        """Find the copies of messages that match `search`, in every folder.

        SEARCH SINCE and BEFORE compare dates without times, so the server is asked
        for a day more on each side, and INTERNALDATE, the From or Sender address
        and the exact decoded subject are compared here.
        """
        since = (search.received_after - timedelta(days=1)).strftime("%d-%b-%Y")
        before = (search.received_before + timedelta(days=2)).strftime("%d-%b-%Y")
        headers = "BODY.PEEK[HEADER.FIELDS (MESSAGE-ID SUBJECT FROM SENDER)]"
        found: list[MessageCopy] = []
        for folder in self.list_folders():
            if not folder.selectable:
                continue
            uidvalidity = self.select(folder, readonly=True)
            typ, data = self.imap.uid("SEARCH", "SINCE", since, "BEFORE", before)
            _check(typ, data, "UID SEARCH")
            uids = [int(uid) for item in data if item for uid in bytes(item).split()]
            for item in self.fetch(uids, headers):
                copy = _matching_copy(self.mailbox, folder, uidvalidity, item, search)
                if copy is not None:
                    found.append(copy)
        return found

    def incident_folder(self, root: str, incident: str) -> Folder | None:
        """Find the incident's folder below `root`; None when it does not exist."""
        wire = self._incident_wire(root, incident)
        listed = [f for f in self.list_folders(wire) if f.wire == wire]
        return listed[0] if listed else None

    def create_incident_folder(self, root: str, incident: str) -> Folder:
        """Create the incident's folder below `root` unless it exists; return it."""
        wire = self._incident_wire(root, incident)
        self.create(wire)
        listed = [f for f in self.list_folders(wire) if f.wire == wire]
        if not listed:
            raise ImapProtocolError(f"Folder {wire!r} was created but is not listed.")
        logger.info("Ensured folder mailbox=%s folder=%s", self.mailbox, listed[0].name)
        return listed[0]

    def _incident_wire(self, root: str, incident: str) -> str:
        delimiter = self.delimiter()
        if delimiter and delimiter in incident:
            raise PermanentError(
                f"The incident id {incident!r} contains the folder delimiter "
                f"{delimiter!r} of mailbox {self.mailbox}, so it cannot name a folder.",
                mailbox=self.mailbox,
                platform=PLATFORM,
            )
        # A server without hierarchy gets one flat folder per incident.
        parts = (encode_mailbox_name(root), encode_mailbox_name(incident))
        return (delimiter or " ").join(parts)

    def stored_copies(
        self, folder: Folder, bare: str, mailbox: str, incident: str
    ) -> list[_Stored]:
        """Find the quarantine copies of one mailbox's message for one incident."""
        uidvalidity = self.select(folder, readonly=True)
        uids = self.search_message_id(bare)
        headers = f"BODY.PEEK[HEADER.FIELDS (MESSAGE-ID SUBJECT {_MARKER_FIELDS})]"
        stored: list[_Stored] = []
        for item in self.fetch(uids, headers):
            fields = parse_header_block(item.body)
            marker = QuarantineMarker.from_fields(fields)
            if (
                marker is None
                or bare_message_id(first_header(fields, "Message-ID")) != bare
                or marker.incident != incident
                or marker.mailbox.lower() != mailbox.lower()
            ):
                continue
            stored.append(
                _Stored(
                    uidvalidity, item.uid, marker, item.internaldate, _subject(fields)
                )
            )
        return stored

    def fetch_stored(
        self, folder: Folder, stored: list[_Stored]
    ) -> list[tuple[_Stored, bytes]]:
        """Fetch the whole quarantine copies, without setting \\Seen."""
        uidvalidity = self.select(folder, readonly=True)
        if any(copy.uidvalidity != uidvalidity for copy in stored):
            raise FolderChangedError(f"UIDVALIDITY of {folder.wire!r} changed")
        bodies = {
            item.uid: item.body
            for item in self.fetch([c.uid for c in stored], "BODY.PEEK[]")
        }
        if len(bodies) < len(stored):
            raise FolderChangedError(f"quarantine copies left {folder.wire!r}")
        return [(copy, bodies[copy.uid]) for copy in stored]

    def fetch_message(self, folder: Folder, uidvalidity: int, uid: int) -> _Fetched:
        """Fetch a whole message, without setting \\Seen."""
        if self.select(folder, readonly=True) != uidvalidity:
            raise FolderChangedError(f"UIDVALIDITY of {folder.wire!r} changed")
        fetched = self.fetch([uid], "BODY.PEEK[]")
        if not fetched:
            raise FolderChangedError(f"message UID {uid} left {folder.wire!r}")
        return fetched[0]

    def remove(self, originals: list[_Original], bare: str) -> list[_Original]:
        """Delete copies from their folders; return those only flagged \\Deleted."""
        left: list[_Original] = []
        for group in _by_folder(originals):
            folder = group[0].folder
            if self.select(folder, readonly=False) != group[0].uidvalidity:
                raise FolderChangedError(f"UIDVALIDITY of {folder.wire!r} changed")
            uids = [original.uid for original in group]
            scratch: Folder | None = None
            if self.uidplus:
                self.store(uids, "+FLAGS.SILENT", ["\\Deleted"])
                typ, data = self.imap.uid("EXPUNGE", uid_set(uids))
                _check(typ, data, "UID EXPUNGE")
            elif self.move:
                scratch = self._move_to_new_folder(uids, removal_folder_name(bare))
            else:
                self.store(uids, "+FLAGS.SILENT", ["\\Deleted"])
                left.extend(group)
                continue
            if self.search_uids(uids):
                raise FolderChangedError(f"copies are still in {folder.wire!r}")
            if scratch is not None:
                self._empty_and_delete(scratch)
        self.deselect()
        return left

    def _move_to_new_folder(self, uids: list[int], name: str) -> Folder:
        """Move messages of the selected folder into folder `name` and return it.

        The response's COPYUID is not used, because servers may send none, or one
        with UIDVALIDITY 0.
        """
        scratch = Folder(name, name, None)
        self.create(scratch.wire)
        typ, data = self.imap.uid("MOVE", uid_set(uids), quote_string(scratch.wire))
        if typ != "OK":
            # MOVE is atomic, so the new folder is still empty.
            self.imap.delete(quote_string(scratch.wire))
            _check(typ, data, "UID MOVE")
        return scratch

    def finish_removal(self, scratch: Folder, leftovers: list[_Original]) -> None:
        """Expunge and delete a removal folder that an interrupted quarantine left.

        A quarantine moves originals into its removal folder only after their
        quarantine copies were verified, so `leftovers`, the copies found there, are
        safe to expunge. A crash right after CREATE leaves the folder empty.
        Raises `PermanentError` when the folder contains other messages, which
        someone must have put there.
        """
        self.select(scratch, readonly=True)
        typ, data = self.imap.uid("SEARCH", "ALL")
        _check(typ, data, "UID SEARCH")
        present = {int(uid) for item in data if item for uid in bytes(item).split()}
        others = present - {original.uid for original in leftovers}
        if others:
            raise PermanentError(
                f"Folder {scratch.name!r} of mailbox {self.mailbox} contains "
                f"{len(others)} messages besides copies of the message being "
                "quarantined, so it is not expunged; move them out and retry.",
                mailbox=self.mailbox,
                platform=PLATFORM,
            )
        self._empty_and_delete(scratch)
        logger.info(
            "Finished an interrupted removal mailbox=%s folder=%s copies=%d",
            self.mailbox,
            scratch.name,
            len(leftovers),
        )

    def _empty_and_delete(self, scratch: Folder) -> None:
        """Expunge and delete a folder that `_move_to_new_folder` made.

        Every message in it was moved there by this session, so its EXPUNGE removes
        nothing that anyone else flagged.
        """
        self.select(scratch, readonly=False)
        self.store("1:*", "+FLAGS.SILENT", ["\\Deleted"])
        typ, data = self.imap.expunge()
        _check(typ, data, "EXPUNGE")
        self.deselect()
        typ, data = self.imap.delete(quote_string(scratch.wire))
        _check(typ, data, "DELETE")

    def put_back(
        self, items: list[tuple[_Stored, bytes]], originals: list[_Original]
    ) -> tuple[list[str], list[str]]:
        """Restore quarantine copies into their original folders.

        Return the wire names of the folders written to, and notes for the result.
        An original that was only flagged \\Deleted gets its flags back instead of a
        new copy. Copies that an interrupted restore already appended are counted and
        not appended again.
        """
        folders = {f.name: f for f in self.list_folders() if f.selectable}
        notes: list[str] = []
        targets: dict[str, list[tuple[_Stored, bytes]]] = {}
        for stored, raw in items:
            folder = folders.get(stored.marker.folder) or folders.get("INBOX")
            if folder is None:
                raise ImapProtocolError(f"Mailbox {self.mailbox} lists no INBOX.")
            if folder.name != stored.marker.folder:
                notes.append(
                    f"Folder {stored.marker.folder!r} no longer exists, so the copy "
                    "was restored to the INBOX."
                )
            targets.setdefault(folder.wire, []).append((stored, raw))

        for wire, group in targets.items():
            folder = next(f for f in folders.values() if f.wire == wire)
            self._put_back_into(folder, group, originals)
        self.deselect()
        return list(targets), notes

    def _put_back_into(
        self,
        folder: Folder,
        group: list[tuple[_Stored, bytes]],
        originals: list[_Original],
    ) -> None:
        uidvalidity = self.select(folder, readonly=False)
        present = [o for o in originals if o.folder.wire == folder.wire]
        to_append: list[tuple[_Stored, bytes]] = []
        for stored, raw in group:
            marker = stored.marker
            in_place = next(
                (
                    o
                    for o in present
                    if marker.folder == folder.name
                    and o.uidvalidity == uidvalidity == marker.uidvalidity
                    and o.uid == marker.uid
                ),
                None,
            )
            if in_place is None:
                to_append.append((stored, raw))
                continue
            self.store([in_place.uid], "FLAGS.SILENT", _restorable(marker.flags))
            present.remove(in_place)

        # NOTE: a copy of the message that is already in the folder and not flagged
        # \Deleted is taken for one that an interrupted restore appended. The
        # quarantine removed every copy, so only a new delivery of the same message
        # after the quarantine is mistaken for a restored copy.
        already_back = sum(1 for o in present if not o.deleted)
        for stored, raw in to_append[already_back:]:
            flags = _restorable(stored.marker.flags)
            self.append(folder, flags, stored.internaldate, strip_markers(raw))

    def discard(self, folder: Folder, uids: list[int]) -> None:
        """Delete restored copies from the quarantine folder.

        Without UIDPLUS a plain EXPUNGE runs. The incident folder belongs to the
        adapter, so the only other messages it removes are ones a person flagged
        \\Deleted there.
        """
        self.select(folder, readonly=False)
        self.store(uids, "+FLAGS.SILENT", ["\\Deleted"])
        if self.uidplus:
            typ, data = self.imap.uid("EXPUNGE", uid_set(uids))
            _check(typ, data, "UID EXPUNGE")
        else:
            typ, data = self.imap.expunge()
            _check(typ, data, "EXPUNGE")
        self.deselect()

    def logout(self) -> None:
        try:
            self.imap.logout()
        except (imaplib.IMAP4.error, OSError) as exc:
            logger.debug("Logout failed mailbox=%s error=%s", self.mailbox, exc)


def _check(typ: str, data: list[Any], command: str) -> None:
    if typ != "OK":
        raise ImapCommandError(command, _text_of(data))


def _text_of(data: list[Any]) -> str:
    last = data[-1] if data else b""
    if isinstance(last, tuple):
        last = last[0]
    if isinstance(last, bytes):
        return last.decode("utf-8", errors="replace")
    return str(last)


def _code_of(data: list[Any]) -> str | None:
    match = _RESPONSE_CODE.match(_text_of(data))
    return match.group("code").upper() if match else None


def _subject(fields: list[tuple[str, str]]) -> str | None:
    value = first_header(fields, "Subject")
    return decode_header_text(value) if value is not None else None


def _matching_copy(
    mailbox: str,
    folder: Folder,
    uidvalidity: int,
    item: _Fetched,
    search: MessageSearch,
) -> MessageCopy | None:
    """Describe a fetched message as a copy if it matches `search`, else None."""
    fields = parse_header_block(item.body)
    subject = _subject(fields)
    received_at = parse_internaldate(item.internaldate)
    for name in ("From", "Sender"):
        value = first_header(fields, name)
        address = parseaddr(decode_header_text(value))[1].lower() if value else ""
        if search.matches(address, subject, received_at):
            return MessageCopy(
                mailbox=mailbox,
                message_id=bare_message_id(first_header(fields, "Message-ID")),
                item_id=item_id(folder.wire, uidvalidity, item.uid),
                folder=folder.name,
                read=any(flag.lower() == "\\seen" for flag in item.flags),
                subject=subject,
                received_at=received_at,
                sender=address,
            )
    return None


def _restorable(flags: Iterable[str]) -> list[str]:
    return [flag for flag in flags if flag.lower() not in UNCOPIED_FLAGS]


def removal_folder_name(bare: str) -> str:
    """Name the folder that a message's copies pass through when MOVE removes them.

    The name comes from the Message-ID, so a quarantine run again after a crash
    finds the folder that the first run left.
    """
    digest = hashlib.sha256(bare.encode("utf-8")).hexdigest()[:12]
    return f"{REMOVAL_FOLDER_PREFIX} {digest}"


def _removal_folder(folders: list[Folder], bare: str) -> Folder | None:
    wire = encode_mailbox_name(removal_folder_name(bare))
    return next((folder for folder in folders if folder.wire == wire), None)


def _by_folder(originals: list[_Original]) -> list[list[_Original]]:
    groups: dict[str, list[_Original]] = {}
    for original in originals:
        groups.setdefault(original.folder.wire, []).append(original)
    return list(groups.values())


def connect(settings: ImapSettings) -> imaplib.IMAP4:
    """Open a connection with the host, port and security of the settings."""
    if settings.security == "none":
        return imaplib.IMAP4(settings.host, settings.port, timeout=settings.timeout)
    context = ssl.create_default_context(cafile=settings.ca_file)
    if settings.security == "tls":
        return imaplib.IMAP4_SSL(
            settings.host, settings.port, ssl_context=context, timeout=settings.timeout
        )
    imap = imaplib.IMAP4(settings.host, settings.port, timeout=settings.timeout)
    try:
        typ, data = imap.starttls(ssl_context=context)
        _check(typ, data, "STARTTLS")
    except BaseException:
        with suppress(OSError):
            imap.shutdown()
        raise
    return imap


# --- the adapter --------------------------------------------------------------------


@dataclass(frozen=True)
class ImapQuarantineResult(QuarantineResult):
    """A quarantine result that also lists copies only flagged, not expunged.

    `pending_expunge` lists the copies that were copied into quarantine and flagged
    \\Deleted in the user's mailbox but not expunged, because the server supports
    neither UIDPLUS nor MOVE. They disappear at the user's next expunge, and until
    then some mail clients still show them.
    """

    pending_expunge: tuple[MessageCopy, ...] = field(default_factory=tuple)


class ImapPlatform(MailPlatform):
    """Find, quarantine and restore messages on an IMAP server through a master user."""

    name = PLATFORM

    def __init__(
        self,
        settings: ImapSettings,
        *,
        connector: Callable[[ImapSettings], imaplib.IMAP4] = connect,
    ) -> None:
        self.settings = settings
        self._connector = connector
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._message_locks: weakref.WeakValueDictionary[
            tuple[str, str], asyncio.Lock
        ] = weakref.WeakValueDictionary()

    # --- the MailPlatform interface ---------------------------------------------------

    async def find(self, mailbox: str, message_id: str) -> list[MessageCopy]:
        """Find the copies of a message in every folder; folder names are in Unicode."""
        bare = _checked_message_id(message_id)
        async with self._sessions(bare, mailbox) as (user,):
            originals = await self._call(user.mailbox, bare, user.locate, bare)
        return [original.public(mailbox, bare) for original in originals]

    async def search(self, mailbox: str, search: MessageSearch) -> list[MessageCopy]:
        """Find the copies that arrived in the window and match sender and subject."""
        async with self._sessions("", mailbox) as (user,):
            copies = await self._call(user.mailbox, "", user.search_window, search)
        return [dataclasses.replace(copy, mailbox=mailbox) for copy in copies]

    async def sent_since(self, mailbox: str, since: datetime) -> list[SentMessage]:
        """List the messages of the mailbox's Sent folders sent since `since`."""
        async with self._sessions("", mailbox) as (user,):
            fetched = await self._call(user.mailbox, "", user.sent_messages, since)
        sent = []
        for item in fetched:
            parsed = sent_message_from_mime(
                mailbox, item.body, parse_internaldate(item.internaldate)
            )
            if parsed is not None and parsed.sent_at >= since:
                sent.append(parsed)
        logger.info(
            "Listed sent messages mailbox=%s since=%s count=%d",
            mailbox,
            since.isoformat(),
            len(sent),
        )
        return sent

    async def quarantine(
        self, mailbox: str, message_id: str, incident_id: str
    ) -> QuarantineResult:
        """Copy each copy of a message to quarantine, verify, then delete the originals.

        Step 1 finds the copies in the user's mailbox and the quarantine copies made
        for this incident already. Step 2 fetches each copy that has none, with its
        flags, as the user. Step 3 appends it to the incident's folder of the
        quarantine user, with marker headers in front. Step 4 verifies that every copy
        has a quarantine copy, found by Message-ID and marker. Step 5 deletes the
        originals. A failure before step 5 leaves every original untouched, and a
        retry appends only what is missing.
        """
        bare = _checked_message_id(message_id)
        self._check_request(mailbox, incident_id)
        vault_name = self.settings.quarantine_mailbox
        async with (
            self._message_lock(mailbox, bare),
            self._sessions(bare, mailbox, vault_name) as (user, vault),
        ):
            # Step 1: find the originals and what an earlier attempt already copied.
            folders = await self._call(user.mailbox, bare, user.list_folders)
            found = await self._call(user.mailbox, bare, user.locate, bare, folders)
            scratch = _removal_folder(folders, bare)
            originals = [o for o in found if o.folder != scratch]
            leftovers = [o for o in found if o.folder == scratch]
            folder = await self._incident_folder(vault, bare, incident_id)
            stored = await self._stored(vault, folder, bare, mailbox, incident_id)
            # A quarantine copy of this incident vouches for the copies that a crash
            # left in the removal folder. Without one, they are copied like the rest.
            copies = originals if stored else originals + leftovers
            if not copies:
                await self._finish_removal(user, bare, scratch, leftovers)
                return self._nothing_left(mailbox, bare, incident_id, stored, folder)

            # Steps 2 and 3: fetch and append each copy that has no quarantine copy.
            done = {copy.marker.key for copy in stored}
            missing = [o for o in copies if o.key not in done]
            if folder is None:
                root = self.settings.quarantine_folder
                folder = await self._call(
                    vault.mailbox, bare, vault.create_incident_folder, root, incident_id
                )
            for original in missing:
                await self._copy(
                    user, vault, folder, original, mailbox, bare, incident_id
                )

            # Step 4: verify that every original has its quarantine copy.
            stored = await self._stored(vault, folder, bare, mailbox, incident_id)
            self._verify_copied(copies, stored, mailbox, bare, incident_id)

            # Step 5: delete the originals, and what a crash left in the removal
            # folder.
            await self._finish_removal(user, bare, scratch, leftovers)
            left = await self._call(user.mailbox, bare, user.remove, originals, bare)

        return self._quarantined(
            mailbox, bare, incident_id, copies, missing, left, folder
        )

    async def _finish_removal(
        self,
        user: ImapSession,
        bare: str,
        scratch: Folder | None,
        leftovers: list[_Original],
    ) -> None:
        """Empty and delete the removal folder that a crash left, if there is one."""
        if scratch is not None:
            await self._call(
                user.mailbox, bare, user.finish_removal, scratch, leftovers
            )

    async def restore(
        self, mailbox: str, message_id: str, incident_id: str
    ) -> QuarantineResult:
        """Put the incident's quarantine copies back where they were, with their flags.

        Step 1 finds the quarantine copies and the copies in the mailbox. Step 2
        appends each quarantine copy, without its marker headers, to its original
        folder, or gives an original that was only flagged \\Deleted its flags back.
        Step 3 verifies that the copies are back, and step 4 removes the quarantine
        copies.
        """
        bare = _checked_message_id(message_id)
        self._check_request(mailbox, incident_id)
        vault_name = self.settings.quarantine_mailbox
        async with (
            self._message_lock(mailbox, bare),
            self._sessions(bare, mailbox, vault_name) as (user, vault),
        ):
            # Step 1: find both sides.
            folder = await self._incident_folder(vault, bare, incident_id)
            stored = await self._stored(vault, folder, bare, mailbox, incident_id)
            originals = await self._call(user.mailbox, bare, user.locate, bare)
            if not stored or folder is None:
                if not originals:
                    raise NotFoundError(
                        f"Mailbox {mailbox} has no copy of <{bare}> and incident "
                        f"{incident_id} quarantined none.",
                        mailbox=mailbox,
                        message_id=bare,
                        platform=PLATFORM,
                    )
                return QuarantineResult(
                    mailbox=mailbox,
                    message_id=bare,
                    copies=tuple(o.public(mailbox, bare) for o in originals),
                    already_done=True,
                )

            # Step 2: put each copy back.
            items = await self._call(
                vault.mailbox, bare, vault.fetch_stored, folder, stored
            )
            targets, notes = await self._call(
                user.mailbox, bare, user.put_back, items, originals
            )

            # Step 3: verify.
            after = await self._call(user.mailbox, bare, user.locate, bare)
            back = [o for o in after if o.folder.wire in targets and not o.deleted]
            if len(back) < len(stored):
                raise TransientError(
                    f"Restore of <{bare}> into mailbox {mailbox} is not complete: "
                    f"{len(back)} of {len(stored)} copies are back; the quarantine "
                    "copies are kept and the restore will be retried.",
                    mailbox=mailbox,
                    message_id=bare,
                    platform=PLATFORM,
                )

            # Step 4: remove the quarantine copies.
            uids = [copy.uid for copy in stored]
            await self._call(vault.mailbox, bare, vault.discard, folder, uids)

        logger.info(
            "Restored mailbox=%s message_id=%s incident=%s copies=%d",
            mailbox,
            bare,
            incident_id,
            len(stored),
        )
        return QuarantineResult(
            mailbox=mailbox,
            message_id=bare,
            copies=tuple(o.public(mailbox, bare) for o in back),
            notes=tuple(notes),
        )

    # --- steps ----------------------------------------------------------------------

    async def _incident_folder(
        self, vault: ImapSession, bare: str, incident_id: str
    ) -> Folder | None:
        root = self.settings.quarantine_folder
        return await self._call(
            vault.mailbox, bare, vault.incident_folder, root, incident_id
        )

    async def _stored(
        self,
        vault: ImapSession,
        folder: Folder | None,
        bare: str,
        mailbox: str,
        incident_id: str,
    ) -> list[_Stored]:
        if folder is None:
            return []
        return await self._call(
            vault.mailbox, bare, vault.stored_copies, folder, bare, mailbox, incident_id
        )

    async def _copy(
        self,
        user: ImapSession,
        vault: ImapSession,
        folder: Folder,
        original: _Original,
        mailbox: str,
        bare: str,
        incident_id: str,
    ) -> None:
        """Fetch one original as the user and append it with its marker (steps 2, 3)."""
        fetched = await self._call(
            user.mailbox,
            bare,
            user.fetch_message,
            original.folder,
            original.uidvalidity,
            original.uid,
        )
        flags = tuple(f for f in fetched.flags if f.lower() != "\\recent")
        marker = QuarantineMarker(
            incident=incident_id,
            mailbox=mailbox,
            folder=original.folder.name,
            flags=flags,
            uidvalidity=original.uidvalidity,
            uid=original.uid,
        )
        raw = marker.headers() + fetched.body
        await self._call(
            vault.mailbox,
            bare,
            vault.append,
            folder,
            _restorable(flags),
            fetched.internaldate,
            raw,
        )
        logger.debug(
            "Copied into quarantine mailbox=%s message_id=%s folder=%s uid=%d",
            mailbox,
            bare,
            original.folder.name,
            original.uid,
        )

    def _verify_copied(
        self,
        originals: list[_Original],
        stored: list[_Stored],
        mailbox: str,
        bare: str,
        incident_id: str,
    ) -> None:
        keys = {copy.marker.key for copy in stored}
        unverified = [o for o in originals if o.key not in keys]
        if unverified:
            raise TransientError(
                f"{len(unverified)} of {len(originals)} copies of <{bare}> in mailbox "
                f"{mailbox} have no verified copy in the quarantine folder of incident "
                f"{incident_id}; no original was deleted, and the quarantine will be "
                "retried.",
                mailbox=mailbox,
                message_id=bare,
                platform=PLATFORM,
            )

    def _nothing_left(
        self,
        mailbox: str,
        bare: str,
        incident_id: str,
        stored: list[_Stored],
        folder: Folder | None,
    ) -> ImapQuarantineResult:
        if not stored or folder is None:
            raise NotFoundError(
                f"Mailbox {mailbox} has no copy of <{bare}>, in or out of quarantine.",
                mailbox=mailbox,
                message_id=bare,
                platform=PLATFORM,
            )
        logger.info(
            "Already quarantined mailbox=%s message_id=%s incident=%s copies=%d",
            mailbox,
            bare,
            incident_id,
            len(stored),
        )
        return ImapQuarantineResult(
            mailbox=mailbox,
            message_id=bare,
            copies=tuple(copy.original(mailbox, bare) for copy in stored),
            already_done=True,
            evidence_location=f"{self.settings.quarantine_mailbox}/{folder.name}",
        )

    def _quarantined(
        self,
        mailbox: str,
        bare: str,
        incident_id: str,
        originals: list[_Original],
        appended: list[_Original],
        left: list[_Original],
        folder: Folder,
    ) -> ImapQuarantineResult:
        pending = tuple(o.public(mailbox, bare) for o in left)
        notes = tuple(
            f"Copy in folder {o.folder.name!r} was copied to quarantine and flagged "
            "\\Deleted, but not expunged, because the server supports neither "
            "UIDPLUS nor MOVE; it disappears at the user's next expunge."
            for o in left
        )
        # Nothing changed when every copy was in quarantine and already flagged.
        already_done = (
            not appended
            and len(left) == len(originals)
            and all(o.deleted for o in originals)
        )
        if left:
            logger.warning(
                "Copied, not expunged mailbox=%s message_id=%s incident=%s copies=%d",
                mailbox,
                bare,
                incident_id,
                len(left),
            )
        logger.info(
            "Quarantined mailbox=%s message_id=%s incident=%s copies=%d appended=%d",
            mailbox,
            bare,
            incident_id,
            len(originals),
            len(appended),
        )
        return ImapQuarantineResult(
            mailbox=mailbox,
            message_id=bare,
            copies=tuple(o.public(mailbox, bare) for o in originals),
            already_done=already_done,
            evidence_location=f"{self.settings.quarantine_mailbox}/{folder.name}",
            notes=notes,
            pending_expunge=pending,
            unfinished=pending,
        )

    def _check_request(self, mailbox: str, incident_id: str) -> None:
        if mailbox.lower() == self.settings.quarantine_mailbox.lower():
            raise PermanentError(
                f"Mailbox {mailbox} is the quarantine mailbox, so its messages cannot "
                "be quarantined into it; handle it by hand.",
                mailbox=mailbox,
                platform=PLATFORM,
            )
        if (
            not incident_id.strip()
            or not incident_id.isascii()
            or not incident_id.isprintable()
            or _FORBIDDEN_IN_NAMES.search(incident_id)
            or incident_id != incident_id.strip()
        ):
            raise PermanentError(
                f"The incident id {incident_id!r} cannot name an IMAP folder and a "
                "header: use printable ASCII without * or %.",
                mailbox=mailbox,
                platform=PLATFORM,
            )

    # --- connections and the error boundary -----------------------------------------

    def _message_lock(self, mailbox: str, bare: str) -> asyncio.Lock:
        """Return the lock that runs one change of a message in a mailbox at a time.

        Without it, two requests for the same message in this process could both
        find no quarantine copy and both append one. Requests for one mailbox go to
        one worker, because pull commands are keyed by mailbox.
        """
        key = (mailbox.lower(), bare)
        lock = self._message_locks.get(key)
        if lock is None:
            lock = asyncio.Lock()
            self._message_locks[key] = lock
        return lock

    def _slot(self, mailbox: str) -> asyncio.Semaphore:
        key = mailbox.lower()
        if key not in self._slots:
            self._slots[key] = asyncio.Semaphore(
                self.settings.max_connections_per_mailbox
            )
        return self._slots[key]

    @asynccontextmanager
    async def _sessions(
        self, bare: str, *mailboxes: str
    ) -> AsyncIterator[tuple[ImapSession, ...]]:
        """Open one logged-in session per mailbox, within each mailbox's slots.

        Slots are taken in sorted order of mailbox, so two requests that need the same
        two mailboxes cannot each hold one and wait for the other.
        """
        async with AsyncExitStack() as stack:
            for key in sorted({mailbox.lower() for mailbox in mailboxes}):
                await stack.enter_async_context(self._slot(key))
            sessions: list[ImapSession] = []
            try:
                for mailbox in mailboxes:
                    sessions.append(await self._open(mailbox, bare))
                yield tuple(sessions)
            finally:
                for session in sessions:
                    await asyncio.to_thread(session.logout)

    async def _open(self, mailbox: str, bare: str) -> ImapSession:
        return await self._call(mailbox, bare, self._login, mailbox)

    def _login(self, mailbox: str) -> ImapSession:
        # TODO: HCL Domino has no master-user login. Its mailboxes are reached through
        # delegation and the RFC 2342 "Other Users" namespace, which is not used yet.
        settings = self.settings
        imap = self._connector(settings)
        try:
            password = settings.master_password.get_secret_value()
            if settings.login_method == "sasl_plain":
                token = f"{mailbox}\0{settings.master_user}\0{password}".encode()
                try:
                    imap.authenticate("PLAIN", lambda _challenge: token)
                except imaplib.IMAP4.abort:
                    raise
                except imaplib.IMAP4.error as exc:
                    raise ImapCommandError("AUTHENTICATE", _error_text(exc)) from exc
            else:
                user = f"{mailbox}{settings.master_separator}{settings.master_user}"
                try:
                    imap.login(quote_string(user), password)
                except imaplib.IMAP4.abort:
                    raise
                except imaplib.IMAP4.error as exc:
                    raise ImapCommandError("LOGIN", _error_text(exc)) from exc
            typ, data = imap.capability()
            _check(typ, data, "CAPABILITY")
        except BaseException:
            with suppress(OSError):
                imap.shutdown()
            raise
        capabilities = frozenset(_text_of(data).upper().split())
        logger.debug(
            "Logged in mailbox=%s capabilities=%s", mailbox, sorted(capabilities)
        )
        return ImapSession(imap, mailbox, capabilities)

    async def _call(
        self, mailbox: str, bare: str, operation: Callable[..., T], *args: Any
    ) -> T:
        """Run one blocking step in a worker thread and map every error it raises."""
        try:
            return await asyncio.to_thread(operation, *args)
        except Exception as exc:  # the one place foreign errors are mapped
            error = map_imap_error(exc, mailbox=mailbox, message_id=bare)
            if error is exc:
                raise
            raise error from exc


def _error_text(exc: BaseException) -> str:
    text = exc.args[0] if exc.args else str(exc)
    if isinstance(text, bytes):
        return text.decode("utf-8", errors="replace")
    return str(text)


def _checked_message_id(message_id: str) -> str:
    bare = bare_message_id(message_id)
    if not bare or any(char in bare for char in "\r\n\0"):
        raise PermanentError(
            f"The Message-ID {message_id!r} is empty or contains a line break, so it "
            "cannot be searched for; fix the pull command.",
            message_id=message_id,
            platform=PLATFORM,
        )
    return bare
