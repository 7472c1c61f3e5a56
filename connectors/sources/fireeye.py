"""Parse FireEye EX (Email MPS) alerts into normalized alerts.

EX sends one alert shape in three dialects, and all three are read:

- the HTTP notification in JSON: hyphenated keys (`smtp-mail-from`, `alert-url`),
  `alert` as one object, `occurred` in ISO 8601 with an offset;
- the Web Services API listing: camelCase keys (`smtpMailFrom`, `md5Sum`), an
  envelope `{"alert": [...]}`, an integer `id`, and `occurred` written as
  `YYYY-MM-DD HH:MM:SS +hhmm`;
- the XML notification, with the element names of the JSON notification. It is
  parsed with defusedxml only, and any DTD is rejected, so entity expansion and
  external entities never run.

Some converters wrap leaves as `{"value": ...}` and send a single malware item as an
object instead of a list; both are accepted. Every FireEye alert is a malware
detection, so the class is always malware.
"""

from __future__ import annotations

import logging
import re
from datetime import datetime
from xml.etree.ElementTree import Element, ParseError

import defusedxml
import defusedxml.ElementTree

from autopull.connectors.sources.common import (
    Attachment,
    EventClass,
    NormalizedAlert,
    ObjectReader,
    Threat,
    checked_message_id,
    clean_display_fields,
    is_synthetic_message_id,
    load_json,
    normalize_addresses,
    normalize_sender,
    rejected_event,
    shorten,
    unfold_header,
)
from autopull.connectors.sources.exceptions import InvalidAlertError

logger = logging.getLogger(__name__)

SOURCE = "fireeye"
ALERT_ID_PREFIX = "fireeye:"
# FireEye alerts nest about six elements deep, so a far deeper document is no alert.
MAX_XML_DEPTH = 32

# Each field in the notification spelling first, then the Web Services API one.
_SMTP_MESSAGE = ("smtp-message", "smtpMessage")
_SMTP_MAIL_FROM = ("smtp-mail-from", "smtpMailFrom")
_SMTP_TO = ("smtp-to", "smtpTo")
_SMTP_CC = ("smtp-cc", "smtpCc")
_QUEUE_ID = ("queue-id", "queueId")
_MALWARE_DETECTED = ("malware-detected", "malwareDetected")
_MD5 = ("md5sum", "md5Sum", "md5")
_ALERT_URL = ("alert-url", "alertUrl")
_APPLIANCE_ID = ("appliance-id", "applianceId")
_OCCURRED = ("occurred", "attack-time", "attackTime")

_ACTIONS: dict[str, EventClass] = {
    "notified": "message_delivered",
    "blocked": "message_blocked",
}
_XML_START = re.compile(rb"\A(?:\xef\xbb\xbf)?\s*<")
_XML_ROOT = re.compile(r"<(?:[\w.-]+:)?(alerts?)[\s/>]")
# Prolog items allowed before the root element, each with the text that ends it.
_XML_PROLOG_ENDS = {"<?": "?>", "<!--": "-->", "<!DOCTYPE": ">"}
_XML_SNIFF_BYTES = 64 * 1024


def looks_like_fireeye(document: object) -> bool:
    """Tell whether a decoded JSON document is a FireEye EX alert or alert listing."""
    if not isinstance(document, dict) or "json_version" in document:
        return False
    return isinstance(document.get("alert"), dict | list)


def looks_like_xml(body: bytes | str) -> bool:
    """Tell whether a body starts like an XML document (after an optional BOM)."""
    head = body[:_XML_SNIFF_BYTES]
    data = head.encode("utf-8", "surrogatepass") if isinstance(head, str) else head
    return _XML_START.match(data) is not None


def looks_like_fireeye_xml(body: bytes | str) -> bool:
    """Tell whether an XML body's root element is `alerts` or `alert`, unparsed.

    Only the declaration, comments and a DOCTYPE are skipped to find the root, in
    one pass over the first bytes.
    """
    head = body[:_XML_SNIFF_BYTES]
    text = head.decode("utf-8", "replace") if isinstance(head, bytes) else head
    position = _skip_space(text, 0)
    while True:
        start = next(
            (s for s in _XML_PROLOG_ENDS if text.startswith(s, position)), None
        )
        if start is None:
            break
        end = _XML_PROLOG_ENDS[start]
        if start == "<!DOCTYPE":
            subset = text.find("[", position, text.find(">", position))
            end = "]>" if subset >= 0 else end
        cut = text.find(end, position + len(start))
        if cut < 0:
            return False
        position = _skip_space(text, cut + len(end))
    return _XML_ROOT.match(text, position) is not None


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position] in "\ufeff \t\r\n":
        position += 1
    return position


def parse_fireeye(
    body: bytes | str | object, *, received_at: datetime, source: str = SOURCE
) -> list[NormalizedAlert]:
    """Parse a FireEye body: JSON or XML text as bytes or str, or decoded JSON.

    Returns one alert per FireEye alert, with all its recipients. Raises
    `InvalidAlertError` for anything that is not a usable FireEye alert.
    """
    if isinstance(body, bytes | bytearray | memoryview):
        body = bytes(body)
    if isinstance(body, bytes | str) and looks_like_xml(body):
        return parse_fireeye_xml(body, received_at=received_at, source=source)
    document = load_json(body) if isinstance(body, bytes | str) else body
    return parse_fireeye_document(document, received_at=received_at, source=source)


def parse_fireeye_xml(
    body: bytes | str,
    *,
    received_at: datetime,
    source: str = SOURCE,
    rejected: list[InvalidAlertError] | None = None,
) -> list[NormalizedAlert]:
    """Parse an XML notification; see `parse_fireeye` and `parse_fireeye_document`."""
    document = load_fireeye_xml(body)
    return parse_fireeye_document(
        document, received_at=received_at, source=source, rejected=rejected
    )


def load_fireeye_xml(body: bytes | str) -> dict[str, object]:
    """Turn an XML notification into the dict shape of the JSON notification.

    Attributes and child elements both become keys, and repeated elements become
    lists. An element with only text becomes its text. A root `alert` is wrapped as
    `{"alert": ...}`. A DOCTYPE, entity declarations, malformed XML and nesting
    deeper than `MAX_XML_DEPTH` raise `InvalidAlertError`.
    """
    try:
        root = defusedxml.ElementTree.fromstring(body, forbid_dtd=True)
    except defusedxml.DefusedXmlException as error:
        raise InvalidAlertError(
            f"The XML alert contains a DTD or an entity declaration ({error}). These "
            "are rejected because entities can expand without bound or read local "
            "files. Send the alert without a DOCTYPE."
        ) from error
    except ParseError as error:
        raise InvalidAlertError(
            f"The alert body is not well-formed XML ({error}). Send a complete "
            "FireEye XML notification."
        ) from error

    tag = _local_name(root.tag)
    if tag == "alerts":
        members = _element_value(root, 1)
        return members if isinstance(members, dict) else {}
    if tag == "alert":
        return {"alert": _element_value(root, 1)}
    raise InvalidAlertError(
        f"The XML root element is {shorten(tag)}, but a FireEye notification has "
        "<alerts> or <alert> at its root. Send a FireEye EX XML notification."
    )


def _local_name(tag: str) -> str:
    """Return an element or attribute name without its `{namespace}` prefix."""
    return tag.rpartition("}")[2]


def _element_value(element: Element, depth: int) -> object:
    if depth > MAX_XML_DEPTH:
        raise InvalidAlertError(
            f"The XML alert nests elements more than {MAX_XML_DEPTH} levels deep, "
            "which no FireEye notification does. Send a FireEye EX XML notification."
        )

    text = (element.text or "").strip()
    if not element.attrib and len(element) == 0:
        return element.text if text else None

    value: dict[str, object] = {}
    for name, attribute in element.attrib.items():
        _add_member(value, _local_name(name), attribute)
    for child in element:
        _add_member(value, _local_name(child.tag), _element_value(child, depth + 1))
    if text:
        _add_member(value, "value", element.text)
    return value


def _add_member(members: dict[str, object], name: str, value: object) -> None:
    """Add a member, turning a repeated name into a list of its values."""
    if name not in members:
        members[name] = value
        return
    present = members[name]
    if isinstance(present, list):
        present.append(value)
    else:
        members[name] = [present, value]


class FireEyeReader(ObjectReader):
    """An `ObjectReader` for FireEye alerts.

    It unwraps `{"value": ...}` leaves and reads a member that may be one object
    or an array of objects.
    """

    def get(self, *names: str) -> tuple[str, object]:
        """Return the first spelling present and its unwrapped value."""
        name, value = super().get(*names)
        return name, _unwrap(value)

    def child(self, *names: str) -> FireEyeReader | None:
        """Return a member object as a reader, None when missing."""
        name, value = self.get(*names)
        if value is None:
            return None
        return FireEyeReader(value, self.field(name))

    def children(self, *names: str) -> list[FireEyeReader]:
        """Return a member given as one object or an array of objects."""
        name, value = self.get(*names)
        if value is None:
            return []
        path = self.field(name)
        if isinstance(value, list):
            return [
                FireEyeReader(item, f"{path}[{index}]")
                for index, item in enumerate(value)
            ]
        return [FireEyeReader(value, path)]

    def identifier(self, name: str) -> str | None:
        """Return an id given as a string or an integer, as text."""
        key, value = self.get(name)
        if value is None:
            return None
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, str):
            return self.optional_str(key)
        raise self.wrong_type(key, value, "a string or an integer")


def _unwrap(value: object) -> object:
    """Return the inner value of `{"value": x}` wrappers, however deeply nested.

    A wrapper may carry scalar attributes next to `value` (an XML leaf with
    attributes), but an object with nested members is an object, not a wrapper.
    """
    while isinstance(value, dict) and "value" in value:
        others = (member for key, member in value.items() if key != "value")
        if any(isinstance(member, dict | list) for member in others):
            break
        value = value["value"]
    return value


def parse_fireeye_document(
    document: object,
    *,
    received_at: datetime,
    source: str = SOURCE,
    rejected: list[InvalidAlertError] | None = None,
) -> list[NormalizedAlert]:
    """Parse a decoded notification or Web Services API listing; see `parse_fireeye`.

    With a `rejected` list, an invalid alert of a listing is appended to it as an
    `InvalidAlertError` that names the alert, and the other alerts are parsed.
    Without one, the first invalid alert raises.
    """
    if received_at.tzinfo is None:
        raise ValueError("received_at must be a timezone-aware datetime.")

    envelope = FireEyeReader(document, "")
    if not envelope.has("alert"):
        raise InvalidAlertError(
            "The alert has no alert member, so it is not a FireEye EX notification "
            "or Web Services API listing. Send the body EX posts.",
            field="alert",
        )

    items = envelope.children("alert")
    alerts = []
    for item in items:
        try:
            alerts.append(_parse_alert(item, envelope, received_at, source))
        except InvalidAlertError as error:
            if rejected is None or len(items) < 2:
                raise
            rejected.append(rejected_event(error, item.path, item.data))
    logger.debug("Parsed FireEye body items=%d alerts=%d", len(items), len(alerts))
    return alerts


def _parse_alert(
    item: FireEyeReader,
    envelope: FireEyeReader,
    received_at: datetime,
    source: str,
) -> NormalizedAlert:
    """Build the normalized alert of one FireEye alert, with all its recipients."""
    alert = _base_alert(item, envelope, received_at, source)
    clean_display_fields(alert)
    alert["alert_id"] = ALERT_ID_PREFIX + _identity(item, envelope)
    alert["source_alert_id"] = item.optional_str("uuid") or item.identifier("id") or ""
    alert["source_guid"] = alert["source_alert_id"]
    return alert


def _identity(item: FireEyeReader, envelope: FireEyeReader) -> str:
    """Return the uuid, else the appliance id and the alert id.

    Alert ids are numbered per appliance, so the appliance id tells alert 7 of one
    appliance from alert 7 of another.
    """
    uuid = item.optional_str("uuid")
    if uuid:
        return uuid
    number = item.identifier("id")
    if not number:
        raise InvalidAlertError(
            f"The FireEye alert at {item.path} has neither a uuid nor an id, so its "
            "replays could not be recognized. Send the alert with its uuid.",
            field=item.field("uuid"),
        )
    appliance = item.optional_str(*_APPLIANCE_ID) or envelope.optional_str(
        *_APPLIANCE_ID
    )
    return f"{appliance}:{number}" if appliance else number


def _base_alert(
    item: FireEyeReader,
    envelope: FireEyeReader,
    received_at: datetime,
    source: str,
) -> NormalizedAlert:
    smtp = item.child(*_SMTP_MESSAGE)
    origin = item.child("src")
    event_class = _event_class(item)
    occurred = item.optional_time(*_OCCURRED)
    message_id = _message_id(smtp)
    threats, urls, attachments = _findings(item)
    return {
        "alert_id": "",
        "source": source,
        "source_alert_id": "",
        "event_class": event_class,
        "received_at": received_at,
        "occurred_at": occurred,
        "message_id": message_id,
        "message_id_synthetic": is_synthetic_message_id(message_id),
        "source_guid": None,
        "sender": _sender(origin),
        "header_from": None,
        "sender_ip": origin.optional_str("ip") if origin else None,
        "subject": _subject(smtp),
        "recipients": _recipients(item),
        "delivered_at": occurred if event_class == "message_delivered" else None,
        "classification": "malware",
        "threat_status": "active",
        "severity": _lower(item.optional_str("severity")),
        "campaign_id": None,
        "threats": threats,
        "urls": urls,
        "attachments": attachments,
        "scores": {},
        "clicker": None,
        "click_ip": None,
        "custom_fields": _custom_fields(item, envelope, smtp),
    }


def _event_class(item: FireEyeReader) -> EventClass:
    """Map `action` to the event class: notified means delivered, blocked blocked."""
    action = _lower(item.optional_str("action"))
    return _ACTIONS.get(action or "", "unknown")


def _message_id(smtp: FireEyeReader | None) -> str:
    if smtp is None:
        return ""
    return checked_message_id(smtp.optional_str("id") or "", field=smtp.field("id"))


def _sender(origin: FireEyeReader | None) -> str:
    if origin is None:
        return ""
    value = origin.optional_str(*_SMTP_MAIL_FROM) or ""
    return normalize_sender(value, field=origin.field(_SMTP_MAIL_FROM[0]))


def _subject(smtp: FireEyeReader | None) -> str | None:
    if smtp is None:
        return None
    subject = smtp.optional_str("subject")
    if subject is None:
        return None
    return unfold_header(subject)


def _recipients(item: FireEyeReader) -> list[str]:
    """Return the To and Cc recipients, lower-cased and without repeats.

    Both reached a mailbox, so both are acted on.
    """
    target = item.child("dst")
    recipients: list[str] = []
    if target is not None:
        for names in (_SMTP_TO, _SMTP_CC):
            field = target.field(names[0])
            recipients += normalize_addresses(target.string_list(*names), field=field)
    if not recipients:
        field = item.field("dst.smtp-to")
        raise InvalidAlertError(
            f"The FireEye alert at {item.path} has no recipient, so there is no "
            f"mailbox to act on. Expected {field} to name the recipients.",
            field=field,
        )
    return list(dict.fromkeys(recipients))


def _findings(
    item: FireEyeReader,
) -> tuple[list[Threat], list[str], list[Attachment]]:
    """Return the threats, URLs and attachments of `explanation.malware-detected`.

    An alert without malware items still condemns its message, so it gets one
    threat of kind `message` named after the alert.
    """
    console = item.optional_str(*_ALERT_URL)
    threats: list[Threat] = []
    urls: list[str] = []
    attachments: list[Attachment] = []
    for malware in _malware_items(item):
        threat = _malware_threat(malware, console)
        threats.append(threat)
        if threat["kind"] == "url" and threat["value"] not in urls:
            urls.append(threat["value"])
        attachment = _malware_attachment(malware)
        if attachment is not None and attachment not in attachments:
            attachments.append(attachment)

    if not threats:
        threats.append(
            {
                "threat_id": "",
                "kind": "message",
                "value": item.optional_str("name") or "",
                "classification": "malware",
                "status": "active",
                "url": console,
            }
        )
    return threats, urls, attachments


def _malware_items(item: FireEyeReader) -> list[FireEyeReader]:
    explanation = item.child("explanation")
    if explanation is None:
        return []
    detected = explanation.child(*_MALWARE_DETECTED)
    if detected is None:
        return []
    return detected.children("malware")


def _malware_threat(malware: FireEyeReader, console: str | None) -> Threat:
    """Build the threat of one malware item: its URL, else its strongest hash."""
    url = (malware.optional_str("url") or "").strip()
    sha256 = _lower(malware.optional_str("sha256"))
    md5 = _lower(malware.optional_str(*_MD5))
    if url:
        kind, value = "url", url
    elif sha256 or md5:
        kind, value = "attachment", sha256 or md5 or ""
    else:
        kind, value = "other", ""
    return {
        "threat_id": malware.optional_str("name") or "",
        "kind": kind,
        "value": value,
        "classification": "malware",
        "status": "active",
        "url": console,
    }


def _malware_attachment(malware: FireEyeReader) -> Attachment | None:
    """Return the attached file a malware item describes, None for a URL."""
    if malware.optional_str("url"):
        return None
    attachment: Attachment = {
        "name": malware.optional_str("original"),
        "content_type": None,
        "md5": _lower(malware.optional_str(*_MD5)),
        "sha256": _lower(malware.optional_str("sha256")),
    }
    if not any(attachment.values()):
        return None
    return attachment


def _custom_fields(
    item: FireEyeReader, envelope: FireEyeReader, smtp: FireEyeReader | None
) -> dict[str, str]:
    candidates = {
        "alert_name": item.optional_str("name"),
        "alert_url": item.optional_str(*_ALERT_URL),
        "product": item.optional_str("product") or envelope.optional_str("product"),
        "appliance": envelope.optional_str("appliance"),
        "appliance_id": item.optional_str(*_APPLIANCE_ID)
        or envelope.optional_str(*_APPLIANCE_ID),
        "detail_level": envelope.optional_str("msg"),
        "queue_id": smtp.optional_str(*_QUEUE_ID) if smtp else None,
    }
    return {name: value for name, value in candidates.items() if value}


def _lower(value: str | None) -> str | None:
    return value.strip().lower() if value and value.strip() else None
