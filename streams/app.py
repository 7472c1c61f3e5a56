"""The Faust application: topics, tables and the agent chain.

Every topic carries Avro values that the agents decode and encode themselves, so a
value that cannot be decoded becomes a dead letter instead of crashing a stream.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import faust
from faust.types import EventT, StreamT

from autopull.connectors.errors import AutopullError
from autopull.schemas import AvroCodec, SchemaError
from autopull.streams import pipeline, records
from autopull.streams.api import register_api
from autopull.streams.broker_state import broker_problem
from autopull.streams.grouping import IncidentWindows
from autopull.streams.intel import load_intel, watch_feeds
from autopull.streams.logs import logging_config
from autopull.streams.metrics import Metrics
from autopull.streams.settings import Settings
from autopull.streams.stall import StallWatchdog
from autopull.streams.tap_poller import register_tap_poller
from autopull.streams.topics import ChangelogTopic, full_name, topic_specs
from autopull.streams.web_errors import application_options
from autopull.streams.webhook import register_webhook

log = logging.getLogger(__name__)

# Incidents the incident agent keeps decoded after writing them, so the next event
# of a busy incident skips the decode. An incident of 50 alerts encodes to roughly
# 35 KB, estimated from the throughput benchmark's incidents topic.
# NOTE: the memory that kept incidents take as Python objects was not measured.
KEPT_INCIDENTS = 512

Handler = Callable[[EventT, dict[str, Any]], Awaitable[None]]
# Retention of the directory cache's changelog when every time to live is shorter,
# caching off included, so the broker never gets a retention of 0.
MIN_DIRECTORY_CACHE_RETENTION_SECONDS = 60.0


def broker_url(bootstrap: str) -> str:
    """Turn `host:port,host:port` into Faust's `kafka://host:port;kafka://...` form."""
    hosts = [host.strip() for host in bootstrap.split(",") if host.strip()]
    return ";".join(f"kafka://{host}" for host in hosts)


class RecordTooLargeError(AutopullError):
    """A table record whose encoded size is above the configured maximum."""

    def __init__(self, message: str, *, key: str, size: int, limit: int) -> None:
        super().__init__(message)
        self.key = key
        self.size = size
        self.limit = limit


class AvroTable:
    """A Faust table whose values are Avro records, stored as their encoded bytes.

    Faust's own value serialization turns datetimes into strings, so the table keeps
    the bytes the record codec writes and decodes them on every read.

    A writer that reads with `take` and writes with `put` skips the decode when
    the table still contains the bytes of its own last `put`: the record it stored
    then is handed back instead. That record must equal the decoded bytes, so its
    writer fills every field and keeps timestamps in milliseconds, and must not
    change it after `put`.
    """

    def __init__(
        self,
        table: faust.Table,
        codec: AvroCodec,
        *,
        kept_records: int = 0,
        max_bytes: int | None = None,
        max_bytes_setting: str = "",
    ) -> None:
        self.table = table
        self.codec = codec
        self.kept_records = kept_records
        self.max_bytes = max_bytes
        # The environment variable that sets `max_bytes`, named in the error.
        self.max_bytes_setting = max_bytes_setting
        # The last put of each key, as its bytes and its record, oldest first.
        self._kept: dict[str, tuple[bytes, dict[str, Any]]] = {}

    def get(self, key: str) -> dict[str, Any] | None:
        """Return the record stored under `key`, or None."""
        data = self.table.get(key)
        if data is None:
            return None
        record: dict[str, Any] = self.codec.loads(data)
        return record

    def take(self, key: str) -> dict[str, Any] | None:
        """Return the record stored under `key` for a change that ends in `put`.

        The caller owns the record and may change it. A change that fails before
        `put` leaves the table as it was, and the next `take` decodes it again.
        """
        data = self.table.get(key)
        kept = self._kept.pop(key, None)
        if data is None:
            return None
        if kept is not None and kept[0] == data:
            return kept[1]
        record: dict[str, Any] = self.codec.loads(data)
        return record

    def __setitem__(self, key: str, value: dict[str, Any]) -> None:
        self.put(key, value)

    def put(self, key: str, value: dict[str, Any]) -> bytes:
        """Store `value` under `key` and return its encoded bytes.

        Raises RecordTooLargeError, and leaves the table as it was, when the
        encoded value is above `max_bytes`. Kafka would reject its changelog
        record later, outside the event, and that would stop the worker.
        """
        data = self.encode(key, value)
        self.store(key, value, data)
        return data

    def encode(self, key: str, value: dict[str, Any]) -> bytes:
        """Return the bytes that `put` would store for `value` under `key`.

        Raises RecordTooLargeError when they are above `max_bytes`. It touches
        neither the table nor the kept records, so it may run in another thread.
        """
        data: bytes = self.codec.dumps(value)
        if self.max_bytes is not None and len(data) > self.max_bytes:
            raise RecordTooLargeError(
                f"The record for {key} would be {len(data):,} bytes, above the "
                f"maximum of {self.max_bytes:,}, so it was not stored. Raise "
                f"{self.max_bytes_setting or 'the maximum'} to keep it.",
                key=key,
                size=len(data),
                limit=self.max_bytes,
            )
        return data

    def store(self, key: str, value: dict[str, Any], data: bytes) -> None:
        """Store `value` under `key` as `data`, which `encode` returned for it."""
        self.table[key] = data
        if self.kept_records > 0:
            self._kept.pop(key, None)
            self._kept[key] = (data, value)
            while len(self._kept) > self.kept_records:
                del self._kept[next(iter(self._kept))]

    def __len__(self) -> int:
        return len(self.table)


class Pipeline:
    """One worker's Faust app with its topics, codecs, tables and agents."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = self._create_app(settings)
        self.codecs: dict[str, AvroCodec] = {}
        self.topics: dict[str, faust.TopicT] = {}
        for spec in topic_specs(settings):
            name = full_name(settings, spec.name)
            self.codecs[spec.name] = AvroCodec(
                spec.record,
                registry=settings.schema_registry_url,
                subject=f"{name}-value",
            )
            self.topics[spec.name] = self.app.topic(
                name,
                key_type=bytes,
                value_type=bytes,
                key_serializer="raw",
                value_serializer="raw",
                partitions=settings.topic_partitions,
            )
        self.campaign_windows = self._incident_windows("campaign_windows")
        self.message_windows = self._incident_windows("message_windows")
        self.recipient_windows = self.app.Table(
            "recipient_windows", default=None
        ).tumbling(
            settings.recipient_window_hours * 3600,
            expires=settings.recipient_window_hours * 3600 * 2,
        )
        self.incidents = AvroTable(
            self._table("incidents", bytes),
            AvroCodec("Incident"),
            kept_records=KEPT_INCIDENTS,
            max_bytes=settings.incident_max_bytes,
            max_bytes_setting="AUTOPULL_INCIDENT_MAX_BYTES",
        )
        self.ledger = self._table("ledger", None)
        # What forward tracing searched, per incident; only the trace agent writes.
        self.frontier = self._table("frontier", None)
        self.directory_cache = self._directory_cache_table()
        self.metrics = Metrics()
        self.intel = load_intel(settings)
        if self.intel is not None and settings.intel.feeds:
            watch_feeds(self.app, self.intel, settings.intel.reload_seconds)
        pipeline.register_agents(self)
        self.watchdog = self._register_watchdog()
        register_tap_poller(self)
        self._register_gauges()
        if settings.web_enabled:
            register_api(self)
            register_webhook(self)

    def _register_watchdog(self) -> StallWatchdog:
        inputs = {topic.get_topic_name() for topic in self.topics.values()}
        timeout = self.settings.stall_timeout_seconds
        watchdog = StallWatchdog(
            self.app,
            inputs,
            timeout,
            broker_problem=lambda: broker_problem(self.app.consumer),
        )

        @self.app.timer(max(timeout / 4, 1.0))
        async def check_stall() -> None:
            try:
                await watchdog.check()
            except Exception:
                log.exception("The stall check of the consumer failed")

        return watchdog

    def changelog_topics(self) -> list[ChangelogTopic]:
        """Return the changelog topic of every table, configured as Faust sets it."""
        changelogs = []
        for table in self.app.tables.values():
            topic = table.changelog_topic
            cleanup = {"compact"} if topic.compacting else set()
            if topic.deleting:
                cleanup.add("delete")
            config = {str(k): str(v) for k, v in (topic.config or {}).items()}
            if cleanup:
                config["cleanup.policy"] = ",".join(sorted(cleanup))
            if topic.retention:
                # Faust keeps the retention in seconds.
                config["retention.ms"] = str(int(float(topic.retention) * 1000))
            config.setdefault("max.message.bytes", str(self.settings.max_record_bytes))
            if topic.compacting:
                segment = str(self.settings.compacted_segment_bytes)
                config.setdefault("segment.bytes", segment)
            changelogs.append(
                ChangelogTopic(
                    topic.get_topic_name(),
                    topic.partitions or self.settings.topic_partitions,
                    config,
                )
            )
        return changelogs

    def _table(self, name: str, value_type: type | None) -> faust.Table:
        # Faust picks each table's serializers from these types: str keys and plain
        # values go through JSON, bytes values are stored as they are.
        return self.app.Table(name, default=None, key_type=str, value_type=value_type)

    def _directory_cache_table(self) -> faust.GlobalTable | None:
        """Return the global table of directory results, or None without a directory.

        The changelog deletes segments whose newest record is older than the
        longest time to live, and rolls a segment after as long, so a record that
        is not written again leaves Kafka within about twice that time. Compaction
        still keeps one record per key in between.
        """
        directory = self.settings.directory
        if directory is None:
            return None
        longest = max(
            directory.cache_ttl_seconds,
            directory.negative_cache_ttl_seconds,
            MIN_DIRECTORY_CACHE_RETENTION_SECONDS,
        )
        table = self.app.GlobalTable(
            "directory_cache",
            default=None,
            key_type=str,
            value_type=None,
            extra_topic_configs={"segment.ms": str(int(longest * 1000))},
            # faust-streaming 0.15.3 treats every partition of a global table's
            # changelog as active, and applies active records in batches of this
            # size. With its default of 1000, a worker kept other workers' results
            # unapplied until 1000 had arrived or the next rebalance.
            recovery_buffer_size=1,
        )
        # NOTE: faust-streaming 0.15 sets a changelog's retention and delete policy
        # only for windowed tables, and Topic.derive drops the serializers, so the
        # topic is made by the table's own (private) factory with both set.
        table.changelog_topic = table._new_changelog_topic(
            retention=longest, compacting=True, deleting=True
        )
        return table

    def _incident_windows(self, name: str) -> IncidentWindows:
        size = self.settings.incident_window_hours * 3600
        step = self.settings.incident_window_step_hours * 3600
        # Faust deletes a window once it ended more than twice the window size ago
        # by the wall clock, so an alert up to one window late still finds its
        # incident.
        windowed = self.app.Table(name, default=None).hopping(
            size, step, expires=size * 2
        )
        return IncidentWindows(windowed, windowed.table, windowed.table.window)

    def _register_gauges(self) -> None:
        tables: dict[str, Any] = {
            "campaign_windows": self.campaign_windows.raw,
            "message_windows": self.message_windows.raw,
            "recipient_windows": self.recipient_windows.table,
            "incidents": self.incidents,
            "ledger": self.ledger,
            "frontier": self.frontier,
        }
        if self.directory_cache is not None:
            tables["directory_cache"] = self.directory_cache

        def table_sizes() -> list[tuple[tuple[str, ...], float]]:
            return [((name,), float(len(table))) for name, table in tables.items()]

        # Table changelogs are assigned too, but only read during recovery and never
        # committed, so their lag would never drain; only the agents' inputs count.
        inputs = {topic.get_topic_name() for topic in self.topics.values()}

        def consumer_lag() -> list[tuple[tuple[str, ...], float]]:
            consumer = self.app.consumer
            # NOTE: Faust keeps committed offsets in a private mapping; this reads it.
            committed = getattr(consumer, "_committed_offset", {})
            samples: list[tuple[tuple[str, ...], float]] = []
            for tp in consumer.assignment():
                if tp.topic not in inputs:
                    continue
                highwater = consumer.highwater(tp)
                if highwater is None:
                    continue
                done = committed.get(tp) or 0
                labels = (tp.topic, str(tp.partition))
                samples.append((labels, float(max(highwater - done, 0))))
            return samples

        self.metrics.gauge(
            "autopull_table_keys", "Keys in each table.", ["table"], table_sizes
        )
        self.metrics.gauge(
            "autopull_consumer_lag",
            "Records not yet committed, by topic and partition.",
            ["topic", "partition"],
            consumer_lag,
        )

    @staticmethod
    def _create_app(settings: Settings) -> faust.App:
        session = settings.session_timeout_seconds
        return faust.App(
            settings.faust_id,
            broker=broker_url(settings.kafka_bootstrap),
            store=settings.store,
            datadir=str(settings.data_dir / settings.faust_id),
            topic_partitions=settings.topic_partitions,
            topic_replication_factor=settings.topic_replication,
            topic_allow_declare=True,
            table_standby_replicas=0 if settings.topic_replication == 1 else 1,
            producer_acks=-1,
            producer_max_request_size=settings.max_record_bytes,
            consumer_max_fetch_size=settings.max_record_bytes,
            broker_session_timeout=session,
            broker_heartbeat_interval=max(session / 10, 1.0),
            broker_rebalance_timeout=session,
            web_enabled=settings.web_enabled,
            web_bind=settings.web_host,
            web_port=settings.web_port,
            web_host=settings.web_host,
            web_application_options=application_options(),
            logging_config=logging_config(settings.log_level, settings.log_format),
        )

    def decode(self, topic: str, data: bytes) -> dict[str, Any]:
        """Decode a value of `topic` with its codec."""
        return self.codecs[topic].loads(data)  # type: ignore[no-any-return]

    async def send(self, topic: str, key: str, value: dict[str, Any]) -> None:
        """Encode `value` with the topic's codec and send it keyed by `key`."""
        await self.topics[topic].send(
            key=key.encode(), value=self.codecs[topic].dumps(value)
        )

    async def send_encoded(
        self,
        topic: str,
        key: str,
        data: bytes,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> None:
        """Send `data`, already encoded with the topic's codec, keyed by `key`."""
        await self.topics[topic].send(key=key.encode(), value=data, headers=headers)

    async def dead_letter(
        self,
        event: EventT | None,
        *,
        source: str,
        stage: str,
        reason: str,
        body: bytes,
        **extra: Any,
    ) -> None:
        """Send input that could not be used to alerts.dead with its bytes."""
        origin = None
        if event is not None:
            message = event.message
            origin = (message.topic, message.partition, message.offset)
        letter = records.dead_letter(
            source=source, stage=stage, reason=reason, body=body, origin=origin, **extra
        )
        log.warning(
            "Dead letter stage=%s source=%s reason=%s origin=%s",
            stage,
            source,
            reason,
            origin,
        )
        self.metrics.dead_letters.labels(stage).inc()
        await self.send("alerts.dead", source, letter)

    async def run_each(
        self,
        stream: StreamT,
        topic: str,
        stage: str,
        handle: Handler,
        skip: Callable[[EventT], bool] | None = None,
    ) -> None:
        """Decode each event of `stream` and pass it to `handle`.

        A value that does not decode, and an event whose handling fails, become a
        dead letter with the original bytes, so one bad record never stops the stream
        and nothing is lost. An event for which `skip` returns True is neither
        decoded nor handled.
        """
        async for event in stream.events():
            if skip is not None and skip(event):
                continue
            body = bytes(event.value) if event.value is not None else b""
            try:
                value = self.decode(topic, body)
            except (SchemaError, TypeError, ValueError) as error:
                reason = (
                    f"The record on {topic} has no value."
                    if event.value is None
                    else f"The value on {topic} is not a valid record: {error}"
                )
                await self.dead_letter(
                    event, source=topic, stage=stage, reason=reason, body=body
                )
                continue
            try:
                await handle(event, value)
            except Exception as error:
                log.exception("Handling failed stage=%s topic=%s", stage, topic)
                await self.dead_letter(
                    event,
                    source=topic,
                    stage=stage,
                    reason=f"Processing failed: {type(error).__name__}: {error}",
                    body=body,
                )
