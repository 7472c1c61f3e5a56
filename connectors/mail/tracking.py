"""Exchange message tracking logs, read from their CSV files.

Exchange Server writes message tracking logs as CSV files (MSGTRK*.LOG) that start
with `#Software`, `#Version`, `#Date` and `#Fields:` lines. The `#Fields:` line names
the columns (date-time, event-id, source, internal-message-id, message-id,
recipient-address, related-recipient-address, reference, message-subject,
sender-address, ...). `Get-MessageTrackingLog | Export-Csv` writes the same facts with
a plain header row (Timestamp, EventId, Source, MessageId, Recipients, ...). Both
forms are read here; several recipients are separated by `;`.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path

from autopull.connectors.errors import PermanentError
from autopull.connectors.mail.base import TraceEvent
from autopull.connectors.mail.mime import bare_message_id

logger = logging.getLogger(__name__)

# Column names of both forms, mapped to TraceEvent fields.
_COLUMNS = {
    "date-time": "at",
    "timestamp": "at",
    "event-id": "event",
    "eventid": "event",
    "source": "source",
    "sender-address": "sender",
    "sender": "sender",
    "recipient-address": "recipients",
    "recipients": "recipients",
    "related-recipient-address": "related_recipient",
    "relatedrecipientaddress": "related_recipient",
    "reference": "reference",
    "message-id": "message_id",
    "messageid": "message_id",
    "internal-message-id": "internal_message_id",
    "internalmessageid": "internal_message_id",
    "message-subject": "subject",
    "messagesubject": "subject",
}
_REQUIRED = ("at", "event", "message_id")


def parse_tracking_log(text: str, name: str = "<log>") -> list[TraceEvent]:
    """Parse one tracking log (either CSV form) into trace events, in file order.

    Raises `PermanentError` naming the file when the header lacks a required column
    (date-time, event-id, message-id) or a time cannot be read.
    """
    lines = text.splitlines()
    fields: list[str] | None = None
    body: list[str] = []
    for line in lines:
        if line.startswith("#Fields:"):
            fields = next(csv.reader([line[len("#Fields:") :].strip()]))
        elif line.startswith("#") or not line.strip():
            continue
        else:
            body.append(line)
    if fields is None:
        if not body:
            return []
        fields = next(csv.reader([body[0]]))
        body = body[1:]

    columns = [_COLUMNS.get(field.strip().lower()) for field in fields]
    missing = [wanted for wanted in _REQUIRED if wanted not in columns]
    if missing:
        raise PermanentError(
            f"The tracking log {name} has no column for {', '.join(missing)}; export "
            "it with Get-MessageTrackingLog or copy the MSGTRK files unchanged."
        )

    events = []
    for number, row in enumerate(csv.reader(io.StringIO("\n".join(body))), start=1):
        values: dict[str, str] = {}
        for column, value in zip(columns, row, strict=False):
            if column is not None:
                values[column] = value.strip()
        events.append(_event(values, name, number))
    return events


def _event(values: dict[str, str], name: str, row: int) -> TraceEvent:
    try:
        at = datetime.fromisoformat(values["at"].replace("Z", "+00:00"))
    except ValueError as exc:
        raise PermanentError(
            f"Row {row} of the tracking log {name} has the time {values['at']!r}, "
            "which is not an ISO 8601 time; fix or remove the row."
        ) from exc
    at = at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)
    recipients = tuple(
        address.strip().lower()
        for address in values.get("recipients", "").replace(",", ";").split(";")
        if address.strip()
    )
    return TraceEvent(
        message_id=bare_message_id(values["message_id"]) or "",
        event=values["event"].upper(),
        at=at,
        source=values.get("source", "").upper(),
        sender=values.get("sender", "").lower(),
        recipients=recipients,
        related_recipient=(values.get("related_recipient") or "").lower() or None,
        reference=values.get("reference") or None,
        internal_message_id=values.get("internal_message_id") or None,
        subject=values.get("subject") or None,
    )


def related_events(events: Iterable[TraceEvent], message_id: str) -> list[TraceEvent]:
    """Return the rows of `message_id` and of the messages rules generated from it.

    A rule-generated message names the original in its Reference, by Message-ID or
    by internal message id. Rows of such messages are followed one level deep, and
    the tracer follows deeper generations from their own Message-IDs.
    """
    rows = list(events)
    own = [event for event in rows if event.message_id == message_id]
    keys = {message_id, *(e.internal_message_id for e in own if e.internal_message_id)}
    generated = {
        event.message_id
        for event in rows
        if event.message_id != message_id
        and event.reference
        and (event.reference in keys or bare_message_id(event.reference) in keys)
    }
    return [e for e in rows if e.message_id == message_id or e.message_id in generated]


class TrackingLogDirectory:
    """The tracking logs in one folder: every `*.log` and `*.csv` file in it.

    Logs are small next to a search of a mailbox, and Exchange appends to them, so
    they are read again on every request instead of being cached.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def files(self) -> Iterator[Path]:
        """Yield the log files of the folder in name order."""
        if not self.folder.is_dir():
            raise PermanentError(
                f"The tracking log folder {self.folder} does not exist or is not a "
                "folder; set trace.tracking_log_dir to the folder of the MSGTRK files."
            )
        for path in sorted(self.folder.iterdir()):
            if path.suffix.lower() in (".log", ".csv") and path.is_file():
                yield path

    def events(self, message_id: str, since: datetime) -> list[TraceEvent]:
        """Return the rows of `message_id` and its rule-made messages since `since`."""
        rows: list[TraceEvent] = []
        for path in self.files():
            text = path.read_text(encoding="utf-8-sig", errors="replace")
            rows.extend(parse_tracking_log(text, str(path)))
        recent = [event for event in rows if event.at >= since]
        found = related_events(recent, message_id)
        logger.debug(
            "Read tracking logs folder=%s message_id=%s rows=%d",
            self.folder,
            message_id,
            len(found),
        )
        return found
