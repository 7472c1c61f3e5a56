"""MISP event JSON: the attributes of events and of their objects.

Accepted layouts: one event export (`{"Event": {...}}`), a list of them, a REST
search response (`{"response": [...]}`, events or `{"Attribute": [...]}`), or a bare
event with an `Attribute` list. Attributes are read from the event and from each of
its objects (`Object[].Attribute`). Only attributes flagged `to_ids` are used unless
the feed's `misp_to_ids_only` is off; deleted ones never are.

The confidence comes from the tag `misp:confidence-level` of the attribute, else of
the event, else from the feed. Tag values map as the MISP taxonomy does:
completely-confident 100, usually-confident 75, fairly-confident 50,
rarely-confident 25, unconfident 0. MISP attributes carry no expiry.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from autopull.connectors.intel import IndicatorKind
from autopull.connectors.intel.exceptions import FeedError
from autopull.connectors.intel.feeds import FeedReader
from autopull.connectors.intel.indicators import HashAlgorithm

# Attribute types read, with the kind, the digest, and which part of a composite
# value (`first|second`) contains the indicator.
ATTRIBUTE_TYPES: dict[str, tuple[IndicatorKind, HashAlgorithm | None, int]] = {
    "ip-src": ("ip", None, 0),
    "ip-dst": ("ip", None, 0),
    "ip-src|port": ("ip", None, 0),
    "ip-dst|port": ("ip", None, 0),
    "domain": ("host", None, 0),
    "hostname": ("host", None, 0),
    "hostname|port": ("host", None, 0),
    "domain|ip": ("host", None, 0),
    "url": ("url", None, 0),
    "md5": ("hash", "md5", 0),
    "sha1": ("hash", "sha1", 0),
    "sha256": ("hash", "sha256", 0),
    "filename|md5": ("hash", "md5", 1),
    "filename|sha1": ("hash", "sha1", 1),
    "filename|sha256": ("hash", "sha256", 1),
    "malware-sample": ("hash", "md5", 1),
}

_CONFIDENCE_TAG = "misp:confidence-level="
_CONFIDENCE_LEVELS = {
    "completely-confident": 100,
    "usually-confident": 75,
    "fairly-confident": 50,
    "rarely-confident": 25,
    "unconfident": 0,
}


def read_misp(data: Any, reader: FeedReader) -> None:
    """Read the attributes of every event in MISP JSON (see the module)."""
    for index, event in enumerate(_events(data, reader)):
        if not isinstance(event, dict):
            reader.report.reject(f"event {index}", str(event)[:80], "Not an object.")
            continue

        name = f"event {event.get('uuid') or event.get('id') or index}"
        confidence = _tag_confidence(event)
        for attribute, location in _attributes(event, name):
            _read_attribute(attribute, location, confidence, reader)


def _events(data: Any, reader: FeedReader) -> list[Any]:
    if isinstance(data, dict) and "response" in data:
        data = data["response"]
    if isinstance(data, list):
        return [
            item.get("Event", item) if isinstance(item, dict) else item for item in data
        ]
    if isinstance(data, dict) and isinstance(data.get("Event"), dict):
        return [data["Event"]]
    if isinstance(data, dict) and "Attribute" in data:
        return [data]
    raise FeedError(
        f"The feed file {str(reader.report.path)!r} is not MISP event JSON: expected "
        "an 'Event' object, a list of events or a 'response'.",
        path=reader.report.path,
    )


def _attributes(event: dict[str, Any], name: str) -> Iterator[tuple[Any, str]]:
    for index, attribute in enumerate(_list(event.get("Attribute"))):
        yield attribute, f"{name} attribute {_id(attribute, index)}"
    for object_index, misp_object in enumerate(_list(event.get("Object"))):
        if not isinstance(misp_object, dict):
            continue
        object_name = f"{name} object {_id(misp_object, object_index)}"
        for index, attribute in enumerate(_list(misp_object.get("Attribute"))):
            yield attribute, f"{object_name} attribute {_id(attribute, index)}"


def _read_attribute(
    attribute: Any, location: str, event_confidence: int | None, reader: FeedReader
) -> None:
    if not isinstance(attribute, dict):
        reader.report.reject(location, str(attribute)[:80], "Not an object.")
        return
    if _flag(attribute.get("deleted")):
        reader.report.skip("deleted")
        return
    if reader.feed.misp_to_ids_only and not _flag(attribute.get("to_ids")):
        reader.report.skip("to_ids is false")
        return

    attribute_type = str(attribute.get("type", ""))
    if attribute_type not in ATTRIBUTE_TYPES:
        reader.report.skip(f"type {attribute_type} is not read")
        return
    kind, algorithm, part = ATTRIBUTE_TYPES[attribute_type]
    value = attribute.get("value")
    if not isinstance(value, str):
        reader.report.reject(location, str(value)[:80], "The value is not text.")
        return
    parts = value.split("|")
    if len(parts) <= part:
        reader.report.reject(
            location, value, f"A {attribute_type} value needs the form first|second."
        )
        return

    confidence = _tag_confidence(attribute)
    if confidence is None:
        confidence = event_confidence
    reader.offer(
        location, kind, parts[part], algorithm=algorithm, confidence=confidence
    )
    if attribute_type == "domain|ip" and len(parts) > 1:
        reader.offer(location, "ip", parts[1], confidence=confidence)


def _tag_confidence(item: dict[str, Any]) -> int | None:
    for tag in _list(item.get("Tag")):
        name = tag.get("name", "") if isinstance(tag, dict) else ""
        if isinstance(name, str) and name.startswith(_CONFIDENCE_TAG):
            level = name.removeprefix(_CONFIDENCE_TAG).strip('"')
            if level in _CONFIDENCE_LEVELS:
                return _CONFIDENCE_LEVELS[level]
    return None


def _flag(value: Any) -> bool:
    # Older MISP versions export flags as "0" and "1".
    return value is True or value == 1 or str(value).lower() in ("1", "true")


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _id(item: Any, index: int) -> str:
    if isinstance(item, dict):
        return str(item.get("uuid") or item.get("id") or index)
    return str(index)
