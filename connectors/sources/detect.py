"""Recognize the format of an alert body and pick its parser.

Formats are tried in registration order, and the first whose `matches` accepts the
decoded document parses it. A caller that knows the format names it instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from autopull.connectors.sources import tap
from autopull.connectors.sources.common import NormalizedAlert, load_json
from autopull.connectors.sources.exceptions import InvalidAlertError, UnknownFormatError


class AlertParser(Protocol):
    """A parser of one decoded alert document into normalized alerts."""

    def __call__(
        self, document: object, *, received_at: datetime
    ) -> list[NormalizedAlert]: ...


@dataclass(frozen=True)
class AlertFormat:
    """One alert format: its name, a recognizer and a parser of decoded JSON."""

    name: str
    matches: Callable[[object], bool]
    parse: AlertParser


# NOTE: every registered format is JSON. A format sent as XML (FireEye EX can) needs
# recognizing from the bytes before `load_json`.
FORMATS: tuple[AlertFormat, ...] = (
    AlertFormat(
        name=tap.SOURCE, matches=tap.looks_like_tap, parse=tap.parse_tap_document
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
    body: bytes | str, *, received_at: datetime, format_name: str | None = None
) -> list[NormalizedAlert]:
    """Decode an alert body and parse it with the named or the detected format.

    Raises `InvalidAlertError` for a body no format can use, and `UnknownFormatError`
    for a format name that is not registered.
    """
    alert_format = get_format(format_name) if format_name else None
    document = load_json(body)

    if alert_format is None:
        alert_format = detect_format(document)
    return alert_format.parse(document, received_at=received_at)
