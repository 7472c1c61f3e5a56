"""Parse Proofpoint TAP SIEM API bodies into normalized alerts.

The body is either a SIEM API response, an object with `queryEndTime` and one array
per event class (`messagesDelivered`, `messagesBlocked`, `clicksPermitted`,
`clicksBlocked`), or a single event object.

TAP events come in two spellings, and both are read. The API itself sends `cluster`,
`threatID`, `campaignID`, `threatUrl`, boolean flags, lower case vocabularies and
Message-IDs in angle brackets. Proofpoint's documentation shows `clusterId`,
`threatId`, `campaignId`, a string `fromAddress`, string flags, upper case
vocabularies and bare Message-IDs. Click events spell `campaignId` and `threatURL`
differently from message events, and their `recipient` is one string.
"""

from __future__ import annotations

import logging
import re
from datetime import datetime
from typing import Any

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
    combine_statuses,
    is_synthetic_message_id,
    load_json,
    map_classification,
    map_threat_status,
    most_severe,
    normalize_addresses,
    normalize_sender,
    recipients_key,
    rejected_event,
    unfold_header,
)
from autopull.connectors.sources.exceptions import InvalidAlertError

logger = logging.getLogger(__name__)

SOURCE = "tap"
ALERT_ID_PREFIX = "tap:"

# Envelope arrays in the order their events are emitted, whatever the key order.
ENVELOPE_ARRAYS: dict[str, EventClass] = {
    "messagesDelivered": "message_delivered",
    "messagesBlocked": "message_blocked",
    "clicksPermitted": "click_permitted",
    "clicksBlocked": "click_blocked",
}
_ENVELOPE_KEYS = ("queryEndTime", *ENVELOPE_ARRAYS)
_EVENT_KEYS = ("messageTime", "clickTime", "threatsInfoMap", "recipient")
_CLICK_CLASSES: tuple[EventClass, ...] = ("click_permitted", "click_blocked")
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_SCORES = {
    "spam": "spamScore",
    "phish": "phishScore",
    "malware": "malwareScore",
    "impostor": "impostorScore",
}
_CUSTOM_TEXT_FIELDS = {
    "cluster": ("cluster", "clusterId"),
    "qid": ("QID",),
    "quarantine_folder": ("quarantineFolder",),
    "quarantine_rule": ("quarantineRule",),
}


def looks_like_tap(document: object) -> bool:
    """Tell whether a decoded JSON document is a TAP SIEM envelope or TAP event."""
    if not isinstance(document, dict):
        return False
    if any(key in document for key in _ENVELOPE_KEYS):
        return True
    return "GUID" in document and any(key in document for key in _EVENT_KEYS)


def parse_tap(
    body: bytes | str | object, *, received_at: datetime, source: str = SOURCE
) -> list[NormalizedAlert]:
    """Parse a TAP body (JSON text as bytes or str, or already decoded JSON).

    Returns one alert per event, except that message events sharing a GUID are
    merged into one alert with all their recipients.
    Raises `InvalidAlertError` for anything that is not a usable TAP body.
    """
    if isinstance(body, bytes | bytearray | memoryview):
        body = bytes(body)
    document = load_json(body) if isinstance(body, bytes | str) else body
    return parse_tap_document(document, received_at=received_at, source=source)


def parse_tap_document(
    document: object,
    *,
    received_at: datetime,
    source: str = SOURCE,
    rejected: list[InvalidAlertError] | None = None,
) -> list[NormalizedAlert]:
    """Parse a decoded TAP envelope or single event; see `parse_tap`.

    With a `rejected` list, an invalid event of an envelope is appended to it as an
    `InvalidAlertError` that names the event, and the other events are parsed.
    Without one, the first invalid event raises.
    """
    if received_at.tzinfo is None:
        raise ValueError("received_at must be a timezone-aware datetime.")

    reader = ObjectReader(document, "")
    if any(key in reader.data for key in _ENVELOPE_KEYS):
        events = _envelope_events(reader)
    else:
        events = [(classify_single_event(reader), reader)]

    parsed = []
    for event_class, event in events:
        try:
            parsed.append(_parse_event(event, event_class, received_at, source))
        except InvalidAlertError as error:
            if rejected is None or not event.path:
                raise
            rejected.append(rejected_event(error, event.path, event.data))
    alerts = _merge_by_guid(parsed)
    logger.debug("Parsed TAP body events=%d alerts=%d", len(events), len(alerts))
    return alerts


def classify_single_event(event: ObjectReader) -> EventClass:
    """Return the class of an event that arrived without its envelope array.

    A click event has `clickTime` or `url`, and a message event has `messageTime`,
    `threatsInfoMap` or a `recipient` array. No field of a click event distinguishes
    permitted from blocked, so a single click is taken as permitted. A single message
    event is taken as delivered unless it names a `quarantineFolder` or
    `quarantineRule`, which only blocked messages carry.
    """
    data = event.data
    if "clickTime" in data or "url" in data:
        return "click_permitted"

    is_message = (
        "messageTime" in data
        or "threatsInfoMap" in data
        or isinstance(data.get("recipient"), list)
    )
    if not is_message:
        raise InvalidAlertError(
            "The alert is neither a TAP SIEM response (no queryEndTime or event "
            "arrays) nor a TAP event (no messageTime, clickTime or threatsInfoMap). "
            "Send a body from the TAP SIEM API."
        )
    if event.optional_str("quarantineFolder") or event.optional_str("quarantineRule"):
        return "message_blocked"
    return "message_delivered"


def _envelope_events(envelope: ObjectReader) -> list[tuple[EventClass, ObjectReader]]:
    envelope.optional_time("queryEndTime")

    events: list[tuple[EventClass, ObjectReader]] = []
    for key, event_class in ENVELOPE_ARRAYS.items():
        events.extend((event_class, event) for event in envelope.object_list(key))
    return events


def _parse_event(
    event: ObjectReader,
    event_class: EventClass,
    received_at: datetime,
    source: str,
) -> NormalizedAlert:
    if event_class in _CLICK_CLASSES:
        alert = _click_alert(event, event_class, received_at, source)
    else:
        alert = _message_alert(event, event_class, received_at, source)
    clean_display_fields(alert)

    event_id = event.optional_str("id")
    if event_id:
        alert["alert_id"] = ALERT_ID_PREFIX + event_id
        alert["source_alert_id"] = event_id
        return alert

    guid = alert["source_guid"]
    if not guid:
        raise InvalidAlertError(
            f"The TAP event at {event.path or 'the top level'} has neither an id nor "
            "a GUID, so its replays could not be recognized. Send the event with its "
            "id or GUID.",
            field=event.field("GUID"),
        )
    alert["alert_id"] = _guid_identity(alert)
    alert["source_alert_id"] = guid
    return alert


def _guid_identity(alert: NormalizedAlert) -> str:
    """Return the alert id of an event known by its GUID rather than its `id`.

    TAP may report one message once per recipient with one GUID, so the identity is
    the GUID and the recipients. The event class and threat statuses are part of it
    too, so that a later verdict on the same message (cleared, say) is a new alert
    and not a replay.
    """
    recipients = recipients_key(alert["recipients"])
    event_class = alert["event_class"]
    return f"{ALERT_ID_PREFIX}{alert['source_guid']}:{recipients}:{event_class}:" + (
        _statuses(alert) or "none"
    )


def _statuses(alert: NormalizedAlert) -> str:
    return ",".join(sorted({threat["status"] for threat in alert["threats"]}))


def _merge_by_guid(alerts: list[NormalizedAlert]) -> list[NormalizedAlert]:
    """Merge the message events of one body that share a GUID, class and statuses.

    TAP may send one event per recipient of a message, each with its own `id`. The
    policy counts the mailboxes of one alert, so such events become one alert with
    all their recipients, in the place of the first. Click events stay apart, since
    each has its own clicker.
    """
    groups: dict[tuple[str, str, str], list[NormalizedAlert]] = {}
    merged: list[NormalizedAlert] = []
    for alert in alerts:
        guid = alert["source_guid"]
        if alert["event_class"] in _CLICK_CLASSES or not guid:
            merged.append(alert)
            continue
        key = (guid, alert["event_class"], _statuses(alert))
        if key not in groups:
            groups[key] = []
            merged.append(alert)
        groups[key].append(alert)

    for group in groups.values():
        if len(group) > 1:
            _absorb(group[0], group[1:])
    return merged


def _absorb(first: NormalizedAlert, others: list[NormalizedAlert]) -> None:
    """Add the recipients and findings of `others` to `first`, without repeats."""
    # A dict keeps the order and finds repeats fast among thousands of recipients.
    recipients = dict.fromkeys(first["recipients"])
    for other in others:
        recipients.update(dict.fromkeys(other["recipients"]))
        for name in ("threats", "urls", "attachments"):
            values: list[Any] = first[name]
            for value in other[name]:
                if value not in values:
                    values.append(value)
    first["recipients"] = list(recipients)
    first["classification"], first["threat_status"] = _verdict(first["threats"])
    first["alert_id"] = _guid_identity(first)
    first["source_alert_id"] = first["source_guid"] or ""


def _message_alert(
    event: ObjectReader,
    event_class: EventClass,
    received_at: datetime,
    source: str,
) -> NormalizedAlert:
    recipients = normalize_addresses(
        event.string_list("recipient"), field=event.field("recipient")
    )
    if not recipients:
        raise InvalidAlertError(
            f"The TAP message event at {event.path or 'the top level'} has no "
            "recipient, so there is no mailbox to act on. Expected recipient to list "
            "the envelope recipients.",
            field=event.field("recipient"),
        )

    threats = [_message_threat(item) for item in event.object_list("threatsInfoMap")]
    classification, status = _verdict(threats)
    message_time = event.optional_time("messageTime")
    alert = _base_alert(event, event_class, received_at, source)
    alert["occurred_at"] = message_time
    alert["delivered_at"] = message_time
    alert["header_from"] = _header_from(event)
    alert["recipients"] = recipients
    alert["classification"] = classification
    alert["threat_status"] = status
    alert["campaign_id"] = _campaign_id(event)
    alert["threats"] = threats
    alert["urls"] = _urls(threats)
    alert["attachments"] = _attachments(event, threats)
    alert["scores"] = _scores(event)
    return alert


def _click_alert(
    event: ObjectReader,
    event_class: EventClass,
    received_at: datetime,
    source: str,
) -> NormalizedAlert:
    clickers = normalize_addresses(
        event.string_list("recipient"), field=event.field("recipient")
    )
    if len(clickers) != 1:
        raise InvalidAlertError(
            f"The TAP click event at {event.path or 'the top level'} names "
            f"{len(clickers)} recipients, but a click has exactly one clicker. "
            "Expected recipient to be one address.",
            field=event.field("recipient"),
        )

    url = (event.optional_str("url") or "").strip()
    threat: Threat = {
        "threat_id": event.optional_str("threatID", "threatId") or "",
        "kind": "url",
        "value": url,
        "classification": map_classification(event.optional_str("classification")),
        "status": map_threat_status(event.optional_str("threatStatus")),
        "url": event.optional_str("threatURL", "threatUrl"),
    }
    alert = _base_alert(event, event_class, received_at, source)
    alert["occurred_at"] = event.optional_time("clickTime")
    alert["recipients"] = clickers
    alert["classification"] = threat["classification"]
    alert["threat_status"] = threat["status"]
    alert["campaign_id"] = event.optional_str("campaignId", "campaignID")
    alert["threats"] = [threat]
    alert["urls"] = [url] if url else []
    alert["clicker"] = clickers[0]
    alert["click_ip"] = event.optional_str("clickIP")
    alert["custom_fields"].update(_optional_text(event, user_agent=("userAgent",)))
    return alert


def _base_alert(
    event: ObjectReader,
    event_class: EventClass,
    received_at: datetime,
    source: str,
) -> NormalizedAlert:
    """Build the fields message and click events share; identity is set later."""
    message_id = checked_message_id(
        event.optional_str("messageID", "messageId") or "",
        field=event.field("messageID"),
    )
    subject = event.optional_str("subject")
    if subject is not None:
        subject = unfold_header(subject)
    return {
        "alert_id": "",
        "source": source,
        "source_alert_id": "",
        "event_class": event_class,
        "received_at": received_at,
        "occurred_at": None,
        "message_id": message_id,
        "message_id_synthetic": is_synthetic_message_id(message_id),
        "source_guid": event.optional_str("GUID") or None,
        "sender": normalize_sender(
            event.optional_str("sender") or "", field=event.field("sender")
        ),
        "header_from": None,
        "sender_ip": event.optional_str("senderIP"),
        "subject": subject,
        "recipients": [],
        "delivered_at": None,
        "classification": "unknown",
        "threat_status": "active",
        "severity": None,
        "campaign_id": None,
        "threats": [],
        "urls": [],
        "attachments": [],
        "scores": {},
        "clicker": None,
        "click_ip": None,
        "custom_fields": _custom_fields(event),
    }


def _message_threat(item: ObjectReader) -> Threat:
    kind = (item.optional_str("threatType") or "").strip().lower()
    return {
        "threat_id": item.optional_str("threatID", "threatId") or "",
        "kind": kind or "other",
        "value": (item.optional_str("threat") or "").strip(),
        "classification": map_classification(item.optional_str("classification")),
        "status": map_threat_status(item.optional_str("threatStatus")),
        "url": item.optional_str("threatUrl", "threatURL"),
    }


def _verdict(threats: list[Threat]) -> tuple[Classification, ThreatStatus]:
    """Return the message's class and status from its threats.

    The class is the most severe among the active threats, so that a cleared phish
    verdict next to an active spam one does not make the message phish. Without an
    active threat, it is the most severe among all.
    """
    status = combine_statuses(threat["status"] for threat in threats)
    active = [threat for threat in threats if threat["status"] == "active"]
    classification = most_severe(
        threat["classification"] for threat in (active or threats)
    )
    return classification, status


def _header_from(event: ObjectReader) -> str | None:
    header = event.optional_str("headerFrom")
    if header is not None:
        return unfold_header(header)

    field = event.field("fromAddress")
    addresses = [
        normalize_sender(value, field=field)
        for value in event.string_list("fromAddress")
    ]
    present = [address for address in addresses if address]
    return ", ".join(present) if present else None


def _campaign_id(event: ObjectReader) -> str | None:
    for item in event.object_list("threatsInfoMap"):
        campaign_id = item.optional_str("campaignID", "campaignId")
        if campaign_id:
            return campaign_id
    return None


def _urls(threats: list[Threat]) -> list[str]:
    """Return the condemned URLs of URL threats, without repeats.

    TAP sometimes sends a URL threat whose value is a SHA-256, which is left out.
    """
    urls: list[str] = []
    for threat in threats:
        value = threat["value"]
        is_url = threat["kind"] == "url" and value and not _SHA256.fullmatch(value)
        if is_url and value not in urls:
            urls.append(value)
    return urls


def _attachments(event: ObjectReader, threats: list[Threat]) -> list[Attachment]:
    """Return attached message parts, plus attachment threats given only by hash."""
    attachments: list[Attachment] = []
    for part in event.object_list("messageParts"):
        disposition = (part.optional_str("disposition") or "").strip().lower()
        if disposition != "attached":
            continue
        attachment: Attachment = {
            "name": part.optional_str("filename"),
            "content_type": part.optional_str("contentType", "oContentType"),
            "md5": _lower(part.optional_str("md5")),
            "sha256": _lower(part.optional_str("sha256")),
        }
        if attachment not in attachments:
            attachments.append(attachment)

    known = {attachment["sha256"] for attachment in attachments}
    for threat in threats:
        sha256 = threat["value"].lower()
        is_hash = threat["kind"] == "attachment" and _SHA256.fullmatch(sha256)
        if is_hash and sha256 not in known:
            known.add(sha256)
            attachments.append(
                {"name": None, "content_type": None, "md5": None, "sha256": sha256}
            )
    return attachments


def _lower(value: str | None) -> str | None:
    return value.strip().lower() if value else None


def _scores(event: ObjectReader) -> dict[str, float]:
    scores: dict[str, float] = {}
    for name, key in _SCORES.items():
        score = event.optional_number(key)
        if score is not None:
            scores[name] = score
    return scores


def _custom_fields(event: ObjectReader) -> dict[str, str]:
    fields = _optional_text(event, **_CUSTOM_TEXT_FIELDS)
    rewritten = event.optional_flag("completelyRewritten")
    if rewritten is not None:
        fields["completely_rewritten"] = rewritten
    return fields


def _optional_text(event: ObjectReader, **spellings: tuple[str, ...]) -> dict[str, str]:
    """Return the string fields that are present, under their custom field names."""
    fields: dict[str, str] = {}
    for name, keys in spellings.items():
        value = event.optional_str(*keys)
        if value:
            fields[name] = value
    return fields
