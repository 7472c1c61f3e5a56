"""Normalization shared by every alert source.

Each source parser turns its own format into `NormalizedAlert` dicts, the values of the
`alerts.normalized` topic (`schemas/NormalizedAlert.avsc`). The helpers here define
what "normalized" means for the fields every source has: Message-IDs, addresses,
times and the threat vocabularies. Helpers that check input raise
`InvalidAlertError` with a sentence naming the field and the value.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
import unicodedata
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from email.utils import getaddresses
from typing import Any, Literal, TypedDict

import email_validator
from confusable_homoglyphs import categories
from email_validator import EmailNotValidError, validate_email

from autopull.connectors.sources.exceptions import InvalidAlertError

EventClass = Literal[
    "message_delivered",
    "message_blocked",
    "click_permitted",
    "click_blocked",
    "alert",
    "unknown",
]
Classification = Literal["phish", "malware", "spam", "impostor", "unknown"]
ThreatStatus = Literal["active", "cleared", "false_positive", "unknown"]


class Threat(TypedDict):
    """One condemned artifact of an alert (the Avro record `autopull.Threat`)."""

    threat_id: str
    kind: str
    value: str
    classification: Classification
    status: ThreatStatus
    url: str | None


class Attachment(TypedDict):
    """One attached file of the reported message (the Avro record `Attachment`)."""

    name: str | None
    content_type: str | None
    md5: str | None
    sha256: str | None


class NormalizedAlert(TypedDict):
    """One alert about one message, matching `schemas/NormalizedAlert.avsc`."""

    alert_id: str
    source: str
    source_alert_id: str
    event_class: EventClass
    received_at: datetime
    occurred_at: datetime | None
    message_id: str
    message_id_synthetic: bool
    source_guid: str | None
    sender: str
    header_from: str | None
    sender_ip: str | None
    subject: str | None
    recipients: list[str]
    delivered_at: datetime | None
    classification: Classification
    threat_status: ThreatStatus
    severity: str | None
    campaign_id: str | None
    threats: list[Threat]
    urls: list[str]
    attachments: list[Attachment]
    scores: dict[str, float]
    clicker: str | None
    click_ip: str | None
    custom_fields: dict[str, str]


# Most severe first. A message with several threats takes the class of its worst one.
CLASSIFICATION_SEVERITY: tuple[Classification, ...] = (
    "malware",
    "phish",
    "impostor",
    "spam",
    "unknown",
)

_CLASSIFICATIONS: dict[str, Classification] = {
    name: name for name in CLASSIFICATION_SEVERITY
}
_THREAT_STATUSES: dict[str, ThreatStatus] = {
    "active": "active",
    "cleared": "cleared",
    "falsepositive": "false_positive",
    "false_positive": "false_positive",
    "false-positive": "false_positive",
}
_STATUS_PRECEDENCE: tuple[ThreatStatus, ...] = (
    "active",
    "unknown",
    "cleared",
    "false_positive",
)
_SYNTHETIC_PREFIX = "queue-id-"
_SYNTHETIC_SUFFIX = "@no-message-id"

# C0 controls, DEL, and the characters Python's str.splitlines() treats as line breaks.
_CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f\x85\u2028\u2029]")
_WHITESPACE = re.compile(r"\s")
_HEADER_FOLD = re.compile(r"\r?\n[ \t]+")
_FIREEYE_TIME_FORMAT = "%Y-%m-%d %H:%M:%S %z"
# email-validator rejects special-use domains because they are not globally
# deliverable. Autopull acts on an organization's own mail system, where `.local` and
# `.test` domains name real internal mailboxes, so these two are allowed, the way the
# library's documentation describes (removing them from its list, process-wide).
for _name in ("local", "test"):
    if _name in email_validator.SPECIAL_USE_DOMAIN_NAMES:
        email_validator.SPECIAL_USE_DOMAIN_NAMES.remove(_name)

# Script aliases that mix with any script: digits, punctuation, combining marks.
_NEUTRAL_SCRIPTS = frozenset({"COMMON", "INHERITED"})
# Scripts that one label may mix: the combinations of the Highly Restrictive level of
# Unicode Technical Standard 39 (Unicode Security Mechanisms), because Japanese,
# Chinese and Korean text mixes them. Any other mix, such as Latin with Cyrillic, is
# a look-alike.
_SCRIPT_MIXES = (
    frozenset({"LATIN", "HAN", "HIRAGANA", "KATAKANA"}),
    frozenset({"LATIN", "HAN", "BOPOMOFO"}),
    frozenset({"LATIN", "HAN", "HANGUL"}),
)
_SHORTEN_LIMIT = 80
REPLACEMENT_CHARACTER = "\ufffd"
# Free-text fields of an alert that are shown, never acted on as addresses.
DISPLAY_FIELDS: tuple[Literal["subject", "header_from"], ...] = (
    "subject",
    "header_from",
)
# RFC 5322 (section 2.1.1) limits a header line to 998 characters, and a msg-id cannot
# be folded, so a longer Message-ID cannot come from a real header.
MAX_MESSAGE_ID_LENGTH = 998


def shorten(value: object) -> str:
    """Return `repr(value)` cut to a length that fits in an error message."""
    text = repr(value)
    if len(text) <= _SHORTEN_LIMIT:
        return text
    return text[: _SHORTEN_LIMIT - 3] + "..."


def load_json(body: bytes | str) -> object:
    """Decode a JSON document, raising `InvalidAlertError` for anything else.

    Bytes may be UTF-8, UTF-16 or UTF-32, as `json.loads` detects. `NaN` and
    `Infinity` are rejected because they are not JSON, and so is an object that
    repeats a key.
    """
    try:
        return json.loads(
            body,
            parse_constant=_reject_constant,
            parse_int=parse_json_int,
            object_pairs_hook=_unique_keys,
        )
    except RecursionError as error:
        raise InvalidAlertError(
            "The alert body nests JSON arrays or objects too deeply to parse. "
            "Send a flatter document."
        ) from error
    except ValueError as error:
        # Covers JSONDecodeError, UnicodeDecodeError and integers over the limit.
        raise InvalidAlertError(
            f"The alert body is not valid JSON ({error}). Send a JSON document."
        ) from error


def parse_json_int(text: str) -> int:
    """Convert a JSON integer, raising ValueError that names the digit limit.

    Python converts at most `sys.get_int_max_str_digits()` digits (4300 by default),
    and its own error suggests a Python call that means nothing to a sender.
    """
    limit = sys.get_int_max_str_digits()
    digits = len(text.lstrip("-"))
    if limit and digits > limit:
        raise ValueError(
            f"a number has {digits} digits, more than the limit of {limit} digits"
        )
    return int(text)


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    # A repeated key makes the alert ambiguous: parsers differ on which value wins.
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"the key {key!r} appears twice in one object")
        result[key] = value
    return result


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not a JSON value")


def bare_message_id(value: str | None) -> str:
    """Return the Message-ID without surrounding white space and angle brackets.

    Everything between the brackets is kept exactly, because real ids contain `[ ]`,
    two `@`, `$` or no `@` at all. Folding white space at either end is removed. Nested
    bracket pairs are removed too, so that the result is stable when applied twice.
    None and empty values give "". Never raises on a string.
    """
    if not value:
        return ""
    bare = value.strip()
    while len(bare) >= 2 and bare.startswith("<") and bare.endswith(">"):
        bare = bare[1:-1].strip()
    return bare


def is_synthetic_message_id(bare: str) -> bool:
    """Tell whether a bare Message-ID was made up by the source.

    FireEye EX writes `queue-id-<queue id>@no-message-id` for a message that had no
    Message-ID header, so such an id matches no mailbox.
    """
    lowered = bare.lower()
    return lowered.startswith(_SYNTHETIC_PREFIX) and lowered.endswith(_SYNTHETIC_SUFFIX)


def checked_message_id(value: str, *, field: str) -> str:
    """Return the bare Message-ID, raising `InvalidAlertError` on control characters.

    A line break inside an id could inject a header or a search clause downstream.
    An id longer than `MAX_MESSAGE_ID_LENGTH` raises too, because it matches no real
    message and would only make the mail platform's request fail.
    """
    bare = bare_message_id(value)
    if len(bare) > MAX_MESSAGE_ID_LENGTH:
        raise InvalidAlertError(
            f"The Message-ID {shorten(value)} in the field {field} is {len(bare):,} "
            f"characters long, above the maximum of {MAX_MESSAGE_ID_LENGTH} that a "
            "header line can carry (RFC 5322). Send the Message-ID header as the "
            "message has it.",
            field=field,
        )
    if _CONTROL_CHARACTERS.search(bare):
        raise InvalidAlertError(
            f"The Message-ID {shorten(value)} in the field {field} contains a line "
            "break or control character. Send the id as one line.",
            field=field,
        )
    return bare


def normalize_address(value: str, *, field: str) -> str:
    """Return a mailbox address in lower case, without display name or brackets.

    Raises `InvalidAlertError` naming the field and value when the value contains a
    line break or control character (header injection), is not exactly one address,
    fails the address syntax of email-validator (no DNS look-up), or is a look-alike
    (see `_check_look_alike`). An internationalized domain is kept in its Unicode
    form, so its Punycode spelling (`xn--...`) names the same mailbox.
    """
    if _CONTROL_CHARACTERS.search(value):
        raise InvalidAlertError(
            f"The value {shorten(value)} of the field {field} contains a line break "
            "or control character. Send one plain address per value.",
            field=field,
        )

    try:
        parsed = getaddresses([value.strip()])
    except (ValueError, IndexError) as error:
        raise _invalid_address(value, field) from error

    # getaddresses silently joins words ("a@exa mple.com" gives "a@example.com"), so
    # the address must also appear verbatim in the value.
    if len(parsed) != 1 or parsed[0][1] not in value:
        raise _invalid_address(value, field)
    address = parsed[0][1]
    local, at, domain = address.partition("@")
    if (
        not at
        or not local
        or not domain
        or "@" in domain
        or _WHITESPACE.search(address)
    ):
        raise _invalid_address(value, field)

    try:
        validated = validate_email(
            address, check_deliverability=False, allow_domain_literal=True
        )
    except EmailNotValidError as error:
        raise InvalidAlertError(
            f"The value {shorten(value)} of the field {field} is not a valid mailbox "
            f"address ({error}) Expected an address such as user@example.com.",
            field=field,
        ) from error

    # The normalized form has Punycode labels decoded, so a look-alike spelled as
    # xn--... is caught too.
    normalized = str(validated.normalized)
    _check_look_alike(address, normalized, value, field)
    return normalized.lower()


def _invalid_address(value: str, field: str) -> InvalidAlertError:
    return InvalidAlertError(
        f"The value {shorten(value)} of the field {field} is not a single mailbox "
        "address. Expected an address such as user@example.com.",
        field=field,
    )


def _check_look_alike(address: str, normalized: str, value: str, field: str) -> None:
    """Raise `InvalidAlertError` when an address imitates another one.

    Compatibility characters such as fullwidth letters (NFKC changes them) and a
    local part or domain label that mixes scripts, such as a Cyrillic a (U+0430) among
    Latin letters, are rejected. An address wholly in one script is legitimate.
    """
    # NOTE: an address wholly in another script that looks like a Latin one (a
    # Cyrillic spelling of apple.com, say) passes, because nothing in it tells it
    # from a real domain in that script.
    folded = unicodedata.normalize("NFKC", address)
    if folded != address:
        raise InvalidAlertError(
            f"The value {shorten(value)} of the field {field} contains compatibility "
            f"characters, such as fullwidth letters, that imitate {shorten(folded)}. "
            "Send the address as the mail system spells it.",
            field=field,
        )

    local, _, domain = normalized.rpartition("@")
    for part in (local, *domain.split(".")):
        scripts = categories.unique_aliases(part) - _NEUTRAL_SCRIPTS
        mixed = len(scripts) > 1 and not any(
            scripts <= allowed for allowed in _SCRIPT_MIXES
        )
        if mixed:
            names = " and ".join(sorted(script.title() for script in scripts))
            raise InvalidAlertError(
                f"The value {shorten(value)} of the field {field} mixes the scripts "
                f"{names} in {shorten(part)}, so it can imitate another address. "
                "Send the address as the mail system spells it.",
                field=field,
            )


def normalize_addresses(values: Iterable[str], *, field: str) -> list[str]:
    """Normalize each address and drop repeats, keeping the first occurrence's place."""
    # A dict keeps the order, and checks repeats in constant time for long lists.
    addresses: dict[str, None] = {}
    for value in values:
        addresses.setdefault(normalize_address(value, field=field))
    return list(addresses)


def recipients_key(recipients: list[str]) -> str:
    """Return the part of an alert identity that names its recipients.

    One recipient is named as it is. Several are named by a digest of their sorted
    addresses, so the key stays short for thousands of them and does not depend on
    their order.
    """
    if len(recipients) == 1:
        return recipients[0]
    joined = "\n".join(sorted(recipients))
    digest = hashlib.sha256(joined.encode("utf-8")).hexdigest()
    return f"{len(recipients)}-recipients-{digest[:24]}"


def normalize_sender(value: str, *, field: str) -> str:
    """Return a sender address normalized like `normalize_address`, leniently.

    Senders are reported, not acted on, and phishing mail forges them freely, so a
    value that is not one valid address is kept stripped and lower-cased instead of
    invalidating the alert. The null sender `<>` and "" give "". Line breaks and
    control characters still raise `InvalidAlertError`.
    """
    stripped = value.strip()
    if stripped in ("", "<>"):
        return ""
    try:
        return normalize_address(value, field=field)
    except InvalidAlertError:
        if _CONTROL_CHARACTERS.search(value):
            raise
        return stripped.lower()


def unfold_header(value: str) -> str:
    """Unfold a header value: CRLF followed by white space becomes one space.

    Other line breaks and control characters stay, for `clean_display_fields`.
    """
    return _HEADER_FOLD.sub(" ", value)


def escape_control_characters(value: str) -> str:
    """Write a backslash as two and each control character but tab as \\uXXXX.

    The result has no line break or control character, and the original can be read
    back from it.
    """
    return _CONTROL_CHARACTERS.sub(_escape_control, value.replace("\\", "\\\\"))


def _escape_control(match: re.Match[str]) -> str:
    character = match.group()
    return character if character == "\t" else f"\\u{ord(character):04x}"


def _replace_control(match: re.Match[str]) -> str:
    character = match.group()
    return character if character == "\t" else REPLACEMENT_CHARACTER


def clean_display_fields(alert: NormalizedAlert) -> None:
    """Replace line breaks and control characters in the display fields of an alert.

    An attacker controls the subject and the From header (through an RFC 2047
    encoded word, say), so one such character must not cost the whole alert. Each
    control character but tab in `subject` and `header_from` becomes U+FFFD, so the
    value can inject no header, log line or search clause wherever it is written. The
    original, escaped by `escape_control_characters`, is kept in the custom field
    `<field>_escaped`. The policy holds, instead of searching, an alert whose
    subject was replaced, because it no longer equals the one in the message.
    """
    for name in DISPLAY_FIELDS:
        value = alert[name]
        if value is None:
            continue
        cleaned = _CONTROL_CHARACTERS.sub(_replace_control, value)
        if cleaned != value:
            alert[name] = cleaned
            alert["custom_fields"][f"{name}_escaped"] = escape_control_characters(value)


def subject_was_replaced(alert: Mapping[str, Any]) -> bool:
    """Return True when `clean_display_fields` replaced characters of the subject."""
    return "subject_escaped" in (alert.get("custom_fields") or {})


def rejected_event(
    error: InvalidAlertError, path: str, data: dict[str, object]
) -> InvalidAlertError:
    """Return the error of one event of a document, naming the event by path and id.

    Its `field` is the event's path, so that a caller can tell which event failed.
    """
    ids = [
        f"{name} {shorten(data[name])}"
        for name in ("id", "GUID", "uuid")
        if isinstance(data.get(name), str | int) and not isinstance(data[name], bool)
    ]
    named = f"{path} ({', '.join(ids)})" if ids else path
    return InvalidAlertError(
        f"The event {named} was rejected, and the other events of the document "
        f"were processed. {error.reason}",
        field=path,
    )


def parse_time(value: str, *, field: str) -> datetime:
    """Parse a source time into an aware UTC datetime, truncated to milliseconds.

    Accepts ISO 8601 with `Z` or an offset and any fraction, and FireEye's
    `YYYY-MM-DD HH:MM:SS +hhmm`. A time without a zone is rejected, because guessing
    its zone can shift it by hours.
    """
    text = value.strip()
    try:
        parsed = datetime.strptime(text, _FIREEYE_TIME_FORMAT)
    except ValueError:
        parsed = _parse_iso_time(text, value, field)

    if parsed.tzinfo is None or parsed.utcoffset() is None:
        raise InvalidAlertError(
            f"The time {shorten(value)} in the field {field} has no time zone. "
            "Expected ISO 8601 with Z or an offset, such as 2026-12-01T09:30:00Z.",
            field=field,
        )

    try:
        utc = parsed.astimezone(UTC)
    except OverflowError as error:
        raise _invalid_time(value, field) from error
    return utc.replace(microsecond=utc.microsecond // 1000 * 1000)


def _parse_iso_time(text: str, value: str, field: str) -> datetime:
    try:
        return datetime.fromisoformat(text)
    except ValueError as error:
        raise _invalid_time(value, field) from error


def _invalid_time(value: str, field: str) -> InvalidAlertError:
    return InvalidAlertError(
        f"The value {shorten(value)} of the field {field} is not a valid time. "
        "Expected ISO 8601 such as 2026-12-01T09:30:00Z or 2026-12-01 09:30:00 +0000.",
        field=field,
    )


def map_classification(value: str | None) -> Classification:
    """Map a source's threat class to the Autopull vocabulary, ignoring case.

    Values outside phish, malware, spam and impostor map to "unknown".
    """
    if value is None:
        return "unknown"
    return _CLASSIFICATIONS.get(value.strip().lower(), "unknown")


def map_threat_status(value: str | None) -> ThreatStatus:
    """Map a source's threat status to the Autopull vocabulary, ignoring case.

    A missing or empty status means active. `falsePositive` maps to
    "false_positive", and values such as "expired" map to "unknown".
    """
    if value is None or not value.strip():
        return "active"
    return _THREAT_STATUSES.get(value.strip().lower(), "unknown")


def most_severe(classifications: Iterable[Classification]) -> Classification:
    """Return the most severe class: malware, phish, impostor, spam, then unknown."""
    present = set(classifications)
    for classification in CLASSIFICATION_SEVERITY:
        if classification in present:
            return classification
    return "unknown"


def combine_statuses(statuses: Iterable[ThreatStatus]) -> ThreatStatus:
    """Return the status of a message from the statuses of its threats.

    Any active threat makes the message active, and no threats at all count as active.
    Otherwise an unknown status wins over cleared, and cleared over false_positive, so
    a message is false_positive only when every threat is.
    """
    present = set(statuses)
    for status in _STATUS_PRECEDENCE:
        if status in present:
            return status
    return "active"


def json_type_name(value: object) -> str:
    """Return the JSON name of a decoded value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


class ObjectReader:
    """Typed access to the fields of one decoded JSON object.

    `path` locates the object in the document (for example `messagesDelivered[0]`),
    so that every error names the full field. A field given as null counts as missing.
    Where a field has several spellings, the first one present wins.
    """

    def __init__(self, data: object, path: str) -> None:
        if not isinstance(data, dict):
            raise InvalidAlertError(
                f"The value {shorten(data)} at {path} is of type "
                f"{json_type_name(data)}, but an object was expected.",
                field=path,
            )
        self.data: dict[str, object] = data
        self.path = path

    def field(self, name: str) -> str:
        """Return the full path of a field, for error messages."""
        return f"{self.path}.{name}" if self.path else name

    def has(self, *names: str) -> bool:
        """Tell whether any of the names is present with a non-null value."""
        return any(self.data.get(name) is not None for name in names)

    def get(self, *names: str) -> tuple[str, object]:
        """Return the first spelling present and its value, else (names[0], None)."""
        for name in names:
            value = self.data.get(name)
            if value is not None:
                return name, value
        return names[0], None

    def optional_str(self, *names: str) -> str | None:
        """Return a string field, None when missing."""
        name, value = self.get(*names)
        if value is None:
            return None
        if isinstance(value, str):
            return self._checked_text(name, value)
        raise self.wrong_type(name, value, "a string")

    def string_list(self, *names: str) -> list[str]:
        """Return a field given as a string or an array of strings, [] if missing."""
        name, value = self.get(*names)
        if value is None:
            return []
        if isinstance(value, str):
            return [self._checked_text(name, value)]
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return [self._checked_text(name, item) for item in value]
        raise self.wrong_type(name, value, "a string or an array of strings")

    def optional_number(self, *names: str) -> float | None:
        """Return a numeric field as float, None when missing."""
        name, value = self.get(*names)
        if value is None:
            return None
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise self.wrong_type(name, value, "a number")
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise self.wrong_type(name, value, "a number within the range of a double")
        return number

    def optional_flag(self, *names: str) -> str | None:
        """Return a flag given as boolean or string, as lower-case text."""
        name, value = self.get(*names)
        if value is None:
            return None
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, str):
            return self._checked_text(name, value).strip().lower()
        raise self.wrong_type(name, value, "a boolean or a string")

    def optional_time(self, *names: str) -> datetime | None:
        """Return a time field parsed by `parse_time`, None when missing."""
        name, value = self.get(*names)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.wrong_type(name, value, "a time as a string")
        return parse_time(value, field=self.field(name))

    def object_list(self, *names: str) -> list[ObjectReader]:
        """Return an array of objects as readers; [] when missing."""
        name, value = self.get(*names)
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.wrong_type(name, value, "an array of objects")
        path = self.field(name)
        return [
            ObjectReader(item, f"{path}[{index}]") for index, item in enumerate(value)
        ]

    def _checked_text(self, name: str, value: str) -> str:
        """Return the text unchanged, rejecting what UTF-8 cannot encode.

        JSON escapes can produce lone surrogates, which no Avro record can carry.
        """
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as error:
            field = self.field(name)
            raise InvalidAlertError(
                f"The value {shorten(value)} of the field {field} contains a lone "
                "UTF-16 surrogate, so it is not valid Unicode text. Send valid UTF-8.",
                field=field,
            ) from error
        return value

    def wrong_type(self, name: str, value: object, expected: str) -> InvalidAlertError:
        """Build the error for a field of the wrong type."""
        field = self.field(name)
        return InvalidAlertError(
            f"The value {shorten(value)} of the field {field} is of type "
            f"{json_type_name(value)}, but {expected} was expected.",
            field=field,
        )
