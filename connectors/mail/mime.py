"""Reading the facts forward tracing matches on from a message's raw MIME.

Every adapter that lists sent messages turns their MIME into a `SentMessage` here,
so all platforms extract the same headers, attachment hashes and URLs. Headers are
read with the `compat32` policy and unfolded by hand, because the strict parser
raises on, or cuts, Message-IDs that real mail carries (`<[gw10]...>`, two `@`).
"""

from __future__ import annotations

import email.utils
import hashlib
import re
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from email import message_from_bytes
from email.header import decode_header, make_header
from email.message import Message
from email.policy import compat32

from yarl import URL

from autopull.connectors.mail.base import SentMessage

# Headers a forward or reply can carry that tie it to an earlier message.
TRACE_HEADERS = (
    "References",
    "In-Reply-To",
    "X-Forwarded-Message-Id",
    "Thread-Index",
    "Thread-Topic",
    "X-MS-Exchange-Inbox-Rules-Loop",
)
_URL = re.compile(r"""https?://[^\s<>"'`)\]]+""", re.IGNORECASE)
_URL_TRAILER = ".,;:!?"
_ANGLE_ID = re.compile(r"<([^<>]*)>")


def unfold(value: str) -> str:
    """Remove the line breaks of a folded header (RFC 5322) and trim the result."""
    return re.sub(r"\r?\n(?=[ \t])", "", value).strip()


def bare_message_id(value: str | None) -> str | None:
    """Return a Message-ID without white space and angle brackets, or None if empty."""
    if value is None:
        return None
    bare = unfold(value).strip()
    if bare.startswith("<") and bare.endswith(">"):
        bare = bare[1:-1].strip()
    return bare or None


def message_id_list(value: str | None) -> tuple[str, ...]:
    """Return the bare ids of a References or In-Reply-To header, in order."""
    if not value:
        return ()
    text = unfold(value)
    ids = [found.strip() for found in _ANGLE_ID.findall(text) if found.strip()]
    if not ids and text:
        # Some clients write one id without brackets.
        ids = text.split()
    return tuple(ids)


def normalize_url(url: str) -> str:
    """Return `url` in a comparable form: scheme and host lower case, no fragment.

    Text that yarl cannot parse is returned trimmed, so it still compares exactly.
    """
    text = url.strip().rstrip(_URL_TRAILER)
    try:
        parsed = URL(text)
    except ValueError:
        return text
    if not parsed.is_absolute():
        return text
    return str(parsed.with_fragment(None))


def urls_in(text: str) -> set[str]:
    """Return the normalized http and https URLs written in `text`."""
    return {normalize_url(found) for found in _URL.findall(text)}


def _decoded_header(value: object) -> str:
    text = unfold(str(value))
    try:
        return str(make_header(decode_header(text)))
    except (LookupError, ValueError):
        return text


def _addresses(message: Message, names: Iterable[str]) -> list[str]:
    values = [_decoded_header(v) for name in names for v in message.get_all(name, [])]
    return [
        address.lower() for _, address in email.utils.getaddresses(values) if address
    ]


def _sent_time(message: Message) -> datetime | None:
    value = message.get("Date")
    if value is None:
        return None
    try:
        moment = email.utils.parsedate_to_datetime(unfold(str(value)))
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def _parts(message: Message) -> Iterator[Message]:
    """Walk every part, descending into attached messages (message/rfc822)."""
    yield message
    if message.is_multipart():
        payload = message.get_payload()
        if isinstance(payload, list):
            for part in payload:
                if isinstance(part, Message):
                    yield from _parts(part)


def _is_attachment(part: Message) -> bool:
    if part.is_multipart() or part.get_content_type() == "message/rfc822":
        return False
    if part.get_content_disposition() == "attachment":
        return True
    return part.get_filename() is not None and part.get_content_maintype() != "text"


def _text_of(part: Message) -> str:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return ""
    charset = part.get_content_charset() or "utf-8"
    try:
        return payload.decode(charset, errors="replace")
    except LookupError:
        return payload.decode("utf-8", errors="replace")


def payload_facts(message: Message) -> tuple[set[str], set[str], list[str]]:
    """Return the attachment SHA-256 hashes, body URLs and attached Message-IDs.

    Hashes are of the decoded attachment bytes, so a re-encoded forward of the same
    file has the same hash. Attached messages are searched like the outer one.
    """
    hashes: set[str] = set()
    urls: set[str] = set()
    attached: list[str] = []
    for part in _parts(message):
        if part.get_content_type() == "message/rfc822":
            for inner in part.get_payload():
                if not isinstance(inner, Message):
                    continue
                inner_id = bare_message_id(inner.get("Message-ID"))
                if inner_id and inner_id not in attached:
                    attached.append(inner_id)
        elif _is_attachment(part):
            data = part.get_payload(decode=True)
            if isinstance(data, bytes):
                hashes.add(hashlib.sha256(data).hexdigest())
        elif part.get_content_maintype() == "text":
            urls |= urls_in(_text_of(part))
    return hashes, urls, attached


def sent_message_from_mime(
    mailbox: str, mime: bytes, fallback_sent_at: datetime | None = None
) -> SentMessage | None:
    """Parse a sent message's MIME into the facts forward tracing compares.

    Returns None for a message without a Message-ID, which no later search could
    find. `fallback_sent_at` is used when the Date header is missing or invalid.
    """
    message = message_from_bytes(mime, policy=compat32)
    message_id = bare_message_id(message.get("Message-ID"))
    if message_id is None:
        return None

    sent_at = _sent_time(message) or fallback_sent_at or datetime.now(UTC)
    headers = {
        name: unfold(str(message[name])) for name in TRACE_HEADERS if name in message
    }
    hashes, urls, attached = payload_facts(message)
    subject = message.get("Subject")
    return SentMessage(
        mailbox=mailbox.lower(),
        message_id=message_id,
        sent_at=sent_at,
        recipients=tuple(
            dict.fromkeys(_addresses(message, ("To", "Cc", "Bcc", "Resent-To")))
        ),
        subject=_decoded_header(subject) if subject is not None else None,
        headers=headers,
        attachment_hashes=tuple(sorted(hashes)),
        urls=tuple(sorted(urls)),
        attached_message_ids=tuple(attached),
    )
