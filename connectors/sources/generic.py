"""Parse generic JSON alerts into normalized alerts.

Any detection system can report a delivered message with a body in the top-level
shape of the JSON Alert Source 2.0 format (`json_version`, `classification`,
`severity`, `email`, `threat_info`, `custom_fields`, ...). The inner keys are
Autopull's own, and `schemas/generic-alert.schema.json` defines all of them. A body
is validated against that schema first, and every violation is reported with the
JSON path of the offending value.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from datetime import datetime
from functools import cache
from importlib import resources

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, best_match

from autopull.connectors.sources.common import (
    Attachment,
    Classification,
    EventClass,
    NormalizedAlert,
    ObjectReader,
    Threat,
    ThreatStatus,
    checked_message_id,
    clean_display_fields,
    is_synthetic_message_id,
    load_json,
    map_threat_status,
    normalize_addresses,
    normalize_sender,
    recipients_key,
    unfold_header,
)
from autopull.connectors.sources.exceptions import InvalidAlertError

logger = logging.getLogger(__name__)

SOURCE = "generic"
ALERT_ID_PREFIX = "generic:"
SCHEMA_FILE = "generic-alert.schema.json"
EVENT_CLASS: EventClass = "alert"

# The classification vocabulary of the body, mapped onto Autopull's classes.
# Every other value of the schema's enum maps to unknown.
CLASSIFICATIONS: dict[str, Classification] = {
    "phish": "phish",
    "malware": "malware",
    "command-and-control": "malware",
    "spam": "spam",
    "impostor": "impostor",
}
_MESSAGE_LIMIT = 300
_HEADER_FOLD = re.compile(r"\r?\n(?=[ \t])")
_HEADER_LINE_END = re.compile(r"\r?\n")


def looks_like_generic(document: object) -> bool:
    """Tell whether a decoded JSON document is a generic alert (has json_version)."""
    return isinstance(document, dict) and "json_version" in document


def parse_generic(
    body: bytes | str | object, *, received_at: datetime, source: str = SOURCE
) -> list[NormalizedAlert]:
    """Parse a generic alert (JSON text as bytes or str, or already decoded JSON).

    Returns one alert for the message and all its recipients. Raises
    `InvalidAlertError` naming the JSON path of the first problem for anything that
    does not match the schema.
    """
    if isinstance(body, bytes | bytearray | memoryview):
        body = bytes(body)
    document = load_json(body) if isinstance(body, bytes | str) else body
    return parse_generic_document(document, received_at=received_at, source=source)


def parse_generic_document(
    document: object,
    *,
    received_at: datetime,
    source: str = SOURCE,
    rejected: list[InvalidAlertError] | None = None,
) -> list[NormalizedAlert]:
    """Validate and parse a decoded generic alert; see `parse_generic`.

    A generic body is one alert, so an invalid one always raises and `rejected`,
    which the other formats fill with their invalid events, stays unchanged.
    """
    if received_at.tzinfo is None:
        raise ValueError("received_at must be a timezone-aware datetime.")

    validate_generic(document)
    body = ObjectReader(document, "")
    email = ObjectReader(body.data["email"], "email")
    alert = _base_alert(body, email, received_at, source)
    clean_display_fields(alert)

    # One alert for the message and all its recipients, so that the policy counts
    # every mailbox the message reached. The recipients are part of the identity,
    # because a detector may send another alert about the same message for other
    # recipients, which is no replay.
    message_key = alert["message_id"] or _fallback_key(alert)
    identity_tail = f"{EVENT_CLASS}:{alert['classification']}:{alert['threat_status']}"
    recipients = recipients_key(alert["recipients"])
    alert["alert_id"] = f"{ALERT_ID_PREFIX}{message_key}:{recipients}:{identity_tail}"
    alert["source_alert_id"] = message_key
    logger.debug("Parsed generic alert recipients=%d", len(alert["recipients"]))
    return [alert]


@cache
def _validator() -> Draft202012Validator:
    text = resources.files("autopull.schemas").joinpath(SCHEMA_FILE).read_text()
    return Draft202012Validator(json.loads(text))


def validate_generic(document: object) -> None:
    """Raise `InvalidAlertError` naming the JSON path when the schema rejects it."""
    try:
        error = best_match(_validator().iter_errors(document))
    except RecursionError as caught:
        raise InvalidAlertError(
            "The generic alert nests arrays or objects too deeply to validate. "
            "Send a flatter document."
        ) from caught
    if error is not None:
        raise _schema_error(error)


def _schema_error(error: ValidationError) -> InvalidAlertError:
    path = error.json_path.removeprefix("$").removeprefix(".") or "the top level"
    problem = error.message
    if len(problem) > _MESSAGE_LIMIT:
        problem = problem[: _MESSAGE_LIMIT - 3] + "..."
    return InvalidAlertError(
        f"The generic alert is invalid at {path}: {problem}. Check the body against "
        "the generic alert schema (schemas/generic-alert.schema.json).",
        field=path,
    )


def _base_alert(
    body: ObjectReader,
    email: ObjectReader,
    received_at: datetime,
    source: str,
) -> NormalizedAlert:
    verdict = _child(body, "threat_info")
    attacker = _child(body, "attacker")
    classification = CLASSIFICATIONS.get(body.optional_str("classification") or "")
    status = _threat_status(verdict)
    message_id = _message_id(email)
    delivered_at = email.optional_time("delivery_time")
    urls = _urls(email)
    attachments = _attachments(email)
    severity = body.optional_str("severity")
    return {
        "alert_id": "",
        "source": source,
        "source_alert_id": "",
        "event_class": EVENT_CLASS,
        "received_at": received_at,
        "occurred_at": _optional_time(verdict, "time") or delivered_at,
        "message_id": message_id,
        "message_id_synthetic": is_synthetic_message_id(message_id),
        "source_guid": None,
        "sender": normalize_sender(
            email.optional_str("sender") or "", field=email.field("sender")
        ),
        "header_from": None,
        "sender_ip": attacker.optional_str("ip_address") if attacker else None,
        "subject": _subject(email),
        "recipients": _recipients(email),
        "delivered_at": delivered_at,
        "classification": classification or "unknown",
        "threat_status": status,
        "severity": severity.lower() if severity else None,
        "campaign_id": verdict.optional_str("campaign_id") if verdict else None,
        "threats": _threats(
            verdict, classification or "unknown", status, urls, attachments, message_id
        ),
        "urls": urls,
        "attachments": attachments,
        "scores": {},
        "clicker": None,
        "click_ip": None,
        "custom_fields": _custom_fields(body),
    }


def _child(body: ObjectReader, name: str) -> ObjectReader | None:
    value = body.data.get(name)
    return None if value is None else ObjectReader(value, body.field(name))


def _optional_time(reader: ObjectReader | None, name: str) -> datetime | None:
    return reader.optional_time(name) if reader else None


def _threat_status(verdict: ObjectReader | None) -> ThreatStatus:
    return map_threat_status(verdict.optional_str("status") if verdict else None)


def _message_id(email: ObjectReader) -> str:
    """Return the bare Message-ID, from `message_id` or else from the raw headers."""
    value = email.optional_str("message_id")
    if value is not None:
        return checked_message_id(value, field=email.field("message_id"))

    headers = email.optional_str("headers")
    if headers is None:
        return ""
    found = header_value(headers, "Message-ID")
    if found is None:
        return ""
    return checked_message_id(found, field=email.field("headers"))


def header_value(headers: str, name: str) -> str | None:
    """Return the unfolded value of the first header called `name`, else None.

    Reading stops at the first empty line, which ends the header block. Unfolding
    removes the line break of a fold and keeps its white space (RFC 5322, 2.2.3).
    """
    unfolded = _HEADER_FOLD.sub("", headers)
    expected_name = name.lower()
    for line in _HEADER_LINE_END.split(unfolded):
        if not line:
            break
        field_name, colon, value = line.partition(":")
        if colon and field_name.rstrip(" \t").lower() == expected_name:
            return value
    return None


def _fallback_key(alert: NormalizedAlert) -> str:
    """Return a stable stand-in for a missing Message-ID: a digest of the message.

    Replays of the same alert give the same key, so they stay harmless.
    """
    delivered = alert["delivered_at"].isoformat() if alert["delivered_at"] else ""
    facts = "\x1f".join((alert["sender"], alert["subject"] or "", delivered))
    digest = hashlib.sha256(facts.encode("utf-8")).hexdigest()
    return f"no-message-id-{digest[:24]}"


def _subject(email: ObjectReader) -> str | None:
    subject = email.optional_str("subject")
    if subject is None:
        return None
    return unfold_header(subject)


def _recipients(email: ObjectReader) -> list[str]:
    field = email.field("recipient")
    return normalize_addresses(email.string_list("recipient"), field=field)


def _urls(email: ObjectReader) -> list[str]:
    urls: list[str] = []
    for url in email.string_list("urls"):
        stripped = url.strip()
        if stripped and stripped not in urls:
            urls.append(stripped)
    return urls


def _attachments(email: ObjectReader) -> list[Attachment]:
    attachments: list[Attachment] = []
    for item in email.object_list("attachments"):
        attachment: Attachment = {
            "name": item.optional_str("name"),
            "content_type": item.optional_str("content_type"),
            "md5": _lower(item.optional_str("md5")),
            "sha256": _lower(item.optional_str("sha256")),
        }
        if attachment not in attachments:
            attachments.append(attachment)
    return attachments


def _threats(
    verdict: ObjectReader | None,
    classification: Classification,
    status: ThreatStatus,
    urls: list[str],
    attachments: list[Attachment],
    message_id: str,
) -> list[Threat]:
    """Return one threat per URL and per hashed attachment, else one for the message."""
    name = (verdict.optional_str("name") if verdict else None) or ""
    console = verdict.optional_str("url") if verdict else None

    def threat(kind: str, value: str) -> Threat:
        return {
            "threat_id": name,
            "kind": kind,
            "value": value,
            "classification": classification,
            "status": status,
            "url": console,
        }

    threats = [threat("url", url) for url in urls]
    for attachment in attachments:
        digest = attachment["sha256"] or attachment["md5"]
        if digest:
            threats.append(threat("attachment", digest))
    return threats or [threat("message", message_id)]


def _custom_fields(body: ObjectReader) -> dict[str, str]:
    """Return the custom fields as strings: numbers and booleans as JSON text."""
    fields: dict[str, str] = {}
    custom = _child(body, "custom_fields")
    if custom is None:
        return fields
    for name, value in custom.data.items():
        fields[_checked_name(custom, name)] = _custom_text(custom, name, value)
    return fields


def _checked_name(custom: ObjectReader, name: str) -> str:
    """Return a custom field name, rejecting lone surrogates as the values are."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InvalidAlertError(
            f"A custom field name in {custom.path} contains a lone UTF-16 surrogate, "
            "so it is not valid Unicode text. Send valid UTF-8.",
            field=custom.path,
        ) from error
    return name


def _custom_text(custom: ObjectReader, name: str, value: object) -> str:
    if isinstance(value, str):
        return custom.optional_str(name) or ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    # optional_number raises for 1e400, which the JSON decoder turns into infinity.
    number = custom.optional_number(name)
    return json.dumps(number)


def _lower(value: str | None) -> str | None:
    return value.strip().lower() if value else None
