"""Recognize the format of an alert body and pick its parser.

Formats are tried in registration order, and the first whose `matches` accepts the
decoded document parses it. A caller that knows the format names it instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from autopull.connectors.sources import fireeye, generic, tap
from autopull.connectors.sources.common import NormalizedAlert, load_json
from autopull.connectors.sources.exceptions import InvalidAlertError, UnknownFormatError


class AlertParser(Protocol):
    """A parser of one decoded alert document into normalized alerts."""

    def __call__(
        self,
        document: object,
        *,
        received_at: datetime,
        rejected: list[InvalidAlertError] | None = None,
    ) -> list[NormalizedAlert]: ...


@dataclass(frozen=True)
class AlertFormat:
    """One alert format: its name, a recognizer and a parser of decoded JSON."""

    name: str
    matches: Callable[[object], bool]
    parse: AlertParser


FORMATS: tuple[AlertFormat, ...] = (
    AlertFormat(
        name=tap.SOURCE, matches=tap.looks_like_tap, parse=tap.parse_tap_document
    ),
    # A FireEye body has an `alert` member and a generic one has `json_version`,
    # which no TAP body has, so the order does not change what is detected.
    AlertFormat(
        name=fireeye.SOURCE,
        matches=fireeye.looks_like_fireeye,
        parse=fireeye.parse_fireeye_document,
    ),
    AlertFormat(
        name=generic.SOURCE,
        matches=generic.looks_like_generic,
        parse=generic.parse_generic_document,
    ),
)


def format_names() -> tuple[str, ...]:
    """Return the names of the registered formats, in detection order."""
    return tuple(alert_format.name for alert_format in FORMATS)


def get_format(name: str) -> AlertFormat:
    """Return the registered format called `name`, or raise `UnknownFormatError`."""
    for alert_format in FORMATS:
        if alert_format.name == name:
            return alert_format
    raise UnknownFormatError(name, format_names())


def detect_format(document: object) -> AlertFormat:
    """Return the first format that recognizes the decoded document."""
    for alert_format in FORMATS:
        if alert_format.matches(document):
            return alert_format
    raise InvalidAlertError(
        "The alert matches none of the known formats "
        f"({', '.join(format_names())}). Check that the body is a complete alert, or "
        "name its format explicitly."
    )


def parse_alert(
    body: bytes | str,
    *,
    received_at: datetime,
    format_name: str | None = None,
    rejected: list[InvalidAlertError] | None = None,
) -> list[NormalizedAlert]:
    """Decode an alert body and parse it with the named or the detected format.

    Raises `InvalidAlertError` for a body no format can use, and `UnknownFormatError`
    for a format name that is not registered. With a `rejected` list, an invalid
    event of a document with several (a TAP envelope, a FireEye listing) is
    appended to it instead, and the other events are returned.
    """
    alert_format = get_format(format_name) if format_name else None
    if fireeye.looks_like_xml(body):
        if alert_format is not None and alert_format.name != fireeye.SOURCE:
            raise InvalidAlertError(
                f"The alert body is XML, but the {alert_format.name} format is JSON. "
                "Send JSON, or send the XML as a FireEye notification."
            )
        return fireeye.parse_fireeye_xml(
            body, received_at=received_at, rejected=rejected
        )
    document = load_json(body)

    if alert_format is None:
        alert_format = detect_format(document)
    return alert_format.parse(document, received_at=received_at, rejected=rejected)
