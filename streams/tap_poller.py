"""The TAP SIEM API poller and its cursor, kept in a changelogged table.

The poller is a task of the worker's Faust app and runs when `tap.enabled` is set.
Each poll reads from the cursor minus the overlap up to now, in windows of at most
one hour. For each window it sends the body to alerts.raw as a RawAlert and waits
for the broker's acknowledgement. Only then does it send the window's
`queryEndTime` to the cursor topic, so a crash never moves the cursor past a window
that is not on Kafka.

A Faust table may be written only while the agent that owns the key's partition
processes an event, and a write anywhere else raises. So the poller never writes
the `source_cursors` table. It sends cursor records to `sources.cursors`, a
compacted topic with one partition keyed by source name, and the cursor agent
writes them into the table. The poller reads the table, because reads are free
anywhere. Only the worker that owns that one partition polls.

Reading a window twice is harmless: a normalized TAP alert is identified by its
event id (`tap:<id>`), and the incident agent ignores alert ids it already has.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

import faust
from faust.types import TP, EventT, StreamT

from autopull.connectors.errors import ConnectorError
from autopull.connectors.sources.tap_api import (
    SiemWindow,
    TapClient,
    format_time,
    plan_windows,
    poll_range,
    split_envelope,
)
from autopull.streams.records import Record, utcnow
from autopull.streams.topics import full_name

if TYPE_CHECKING:
    from autopull.streams.app import Pipeline

log = logging.getLogger(__name__)

SOURCE = "tap"
TRANSPORT = "tap-poller"
CURSOR_TOPIC = "sources.cursors"
CURSOR_TABLE = "source_cursors"

Clock = Callable[[], datetime]


def register_tap_poller(pipe: Pipeline) -> TapPoller | None:
    """Add the cursor topic, table and agent and the poller task when TAP is on.

    Returns the poller, or None when `tap.enabled` is off.
    """
    if not pipe.settings.tap.enabled:
        return None

    topic = cursor_topic(pipe)
    table = pipe.app.Table(
        CURSOR_TABLE, default=None, key_type=str, value_type=None, partitions=1
    )
    _cursor_agent(pipe, topic, table)
    poller = TapPoller(pipe, topic, table)
    pipe.app.task(poller.run)
    return poller


def cursor_topic(pipe: Pipeline) -> faust.TopicT:
    """Return the cursor topic: one partition, compacted, JSON values.

    It is internal to Autopull, so Faust creates it (CreateTopics, never broker
    auto-creation) before the consumer subscribes, with these settings.
    """
    return pipe.app.topic(
        full_name(pipe.settings, CURSOR_TOPIC),
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=1,
        compacting=True,
        internal=True,
    )


# --- records --------------------------------------------------------------------------


def cursor_record(window: SiemWindow, updated_at: datetime) -> dict[str, str]:
    """Build the cursor record that follows an acknowledged window."""
    return {
        "source": SOURCE,
        "query_end_time": format_time(window.query_end_time),
        "window_start": format_time(window.start),
        "window_end": format_time(window.end),
        "updated_at": updated_at.isoformat(),
    }


def cursor_time(record: object) -> datetime | None:
    """Return the `query_end_time` of a cursor record, None when it has none."""
    if not isinstance(record, dict):
        return None
    value = record.get("query_end_time")
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else None


def later(first: datetime | None, second: datetime | None) -> datetime | None:
    """Return the later of two optional times."""
    if first is None:
        return second
    if second is None:
        return first
    return max(first, second)


def raw_alert_records(
    window: SiemWindow, max_bytes: int, received_at: datetime
) -> list[Record]:
    """Build the RawAlert records of one window, split when the body is too large.

    The key of each record is the source and a hash of its body, as for ingest.
    """
    parts = split_envelope(window.body, max_bytes)
    records = []
    for number, body in enumerate(parts, 1):
        transport = {
            "transport": TRANSPORT,
            "window_start": format_time(window.start),
            "window_end": format_time(window.end),
            "query_end_time": format_time(window.query_end_time),
        }
        if len(parts) > 1:
            transport["part"] = f"{number}/{len(parts)}"
        records.append(
            {
                "source": SOURCE,
                "source_alert_id": hashlib.sha256(body).hexdigest(),
                "received_at": received_at,
                "content_type": "application/json",
                "transport": transport,
                "body": body,
            }
        )
    return records


# --- the poller -----------------------------------------------------------------------


class TapPoller:
    """Reads TAP SIEM windows into alerts.raw and moves the cursor behind them.

    `clock` returns the current time and `client` is the TAP client; tests can
    replace both. Without a client, the first poll creates one from the settings.
    """

    def __init__(
        self,
        pipe: Pipeline,
        topic: faust.TopicT,
        cursors: faust.Table,
        *,
        client: TapClient | None = None,
        clock: Clock = utcnow,
    ) -> None:
        self.pipe = pipe
        self.settings = pipe.settings.tap
        self.topic = topic
        self.cursors = cursors
        self.client = client
        self.clock = clock
        self.cursor: datetime | None = None

    async def run(self) -> None:
        """Poll every `poll_interval_seconds` until the app stops."""
        log.info(
            "TAP poller started url=%s poll_interval_seconds=%s overlap_minutes=%s",
            self.settings.url,
            self.settings.poll_interval_seconds,
            self.settings.overlap_minutes,
        )
        try:
            while True:
                await self.poll_if_owner()
                await asyncio.sleep(self.settings.poll_interval_seconds)
        finally:
            if self.client is not None:
                await self.client.aclose()
            log.info("TAP poller stopped cursor=%s", self.cursor)

    async def poll_if_owner(self) -> int:
        """Poll when this worker owns the cursor; return the windows read.

        Errors are logged, and the next poll starts again from the cursor.
        """
        if not self.owns_cursor():
            log.debug("TAP poll skipped: another worker owns the cursor partition")
            return 0
        try:
            return await self.poll()
        except ConnectorError as error:
            log.error(
                "TAP poll failed; the next poll in %s s starts again from the "
                "cursor. cursor=%s error=%s",
                self.settings.poll_interval_seconds,
                self.cursor,
                error,
            )
        except Exception:
            log.exception(
                "TAP poll failed unexpectedly; the next poll starts again from the "
                "cursor. cursor=%s",
                self.cursor,
            )
        return 0

    def owns_cursor(self) -> bool:
        """Tell whether this worker owns the cursor partition and has recovered it."""
        app = self.pipe.app
        if app.rebalancing or app.in_recovery:
            return False
        assigned = app.assignor.assigned_actives()
        return TP(self.topic.get_topic_name(), 0) in assigned

    async def poll(self) -> int:
        """Read every window from the cursor minus the overlap up to now.

        Returns the number of windows read. Stops early when the worker loses the
        cursor partition. Raises `ConnectorError` when TAP fails for good.
        """
        self.cursor = later(self.cursor, cursor_time(self.cursors.get(SOURCE)))
        span = poll_range(
            self.cursor,
            self.clock(),
            overlap=self.settings.overlap,
            lookback=self.settings.lookback,
        )
        if span.lost_from is not None:
            log.warning(
                "The TAP cursor is older than the 7 days TAP serves, so events from "
                "%s to %s cannot be read any more. cursor=%s",
                format_time(span.lost_from),
                format_time(span.start),
                self.cursor,
            )

        windows = plan_windows(span.start, span.end)
        for number, (start, end) in enumerate(windows, 1):
            if not self.owns_cursor():
                log.info(
                    "TAP poll stopped: the cursor partition moved to another worker"
                )
                return number - 1
            window = await self._tap_client().fetch_window(start, end)
            await self._publish(window)
            await self._save_cursor(window)
            log.info(
                "TAP window read start=%s end=%s events=%d window=%d/%d",
                format_time(start),
                format_time(end),
                window.events,
                number,
                len(windows),
            )
        return len(windows)

    def _tap_client(self) -> TapClient:
        if self.client is None:
            self.client = TapClient(self.settings)
        return self.client

    async def _publish(self, window: SiemWindow) -> None:
        if window.events == 0:
            return
        codec = self.pipe.codecs["alerts.raw"]
        topic = self.pipe.topics["alerts.raw"]
        limit = self.pipe.settings.ingest_max_bytes
        for record in raw_alert_records(window, limit, utcnow()):
            key = f"{SOURCE}:{record['source_alert_id']}"
            await _send_acknowledged(topic, key.encode(), codec.dumps(record))

    async def _save_cursor(self, window: SiemWindow) -> None:
        record = cursor_record(window, utcnow())
        await _send_acknowledged(
            self.topic, SOURCE.encode(), json.dumps(record).encode()
        )
        self.cursor = later(self.cursor, window.query_end_time)


async def _send_acknowledged(topic: faust.TopicT, key: bytes, value: bytes) -> None:
    """Send one record and wait until the broker acknowledges it (acks=all)."""
    pending = await topic.send(key=key, value=value)
    await pending


# --- the cursor agent -----------------------------------------------------------------


def _cursor_agent(pipe: Pipeline, topic: faust.TopicT, table: faust.Table) -> None:
    @pipe.app.agent(topic, name="source_cursors")
    async def source_cursors(stream: StreamT) -> None:
        async for event in stream.events():
            await _apply_cursor(pipe, table, event)


async def _apply_cursor(pipe: Pipeline, table: faust.Table, event: EventT) -> None:
    """Store a cursor record unless the table already has a later one.

    Keeping the later cursor means that a record sent by a worker that lost the
    partition during a rebalance never moves the cursor back.
    """
    source = bytes(event.key or b"").decode("utf-8", "replace")
    body = bytes(event.value or b"")
    try:
        record: Any = json.loads(body)
    except ValueError:
        record = None
    received = cursor_time(record)
    if received is None:
        await pipe.dead_letter(
            event,
            source=CURSOR_TOPIC,
            stage="cursor",
            reason=f"The cursor record for source {source!r} is not a JSON object "
            "with a query_end_time in ISO 8601; it was not stored.",
            body=body,
        )
        return

    stored = cursor_time(table.get(source))
    if stored is not None and stored >= received:
        log.debug(
            "Cursor record ignored source=%s received=%s stored=%s",
            source,
            received,
            stored,
        )
        return
    table[source] = record
    log.debug("Cursor stored source=%s query_end_time=%s", source, received)
