"""Reading the pipeline's published state from Kafka, for the demo and the tests."""

from __future__ import annotations

import logging
import time
import uuid

from confluent_kafka import Consumer, TopicPartition

from autopull.schemas import AvroCodec, SchemaError, topic_subject
from autopull.streams.records import Record
from autopull.streams.settings import Settings
from autopull.streams.topics import client_config, full_name

log = logging.getLogger(__name__)


class IncidentWatcher:
    """Follows the incidents topic from its start and keeps the latest of each."""

    def __init__(self, settings: Settings) -> None:
        topic = full_name(settings, "incidents")
        self.codec = AvroCodec(
            "Incident",
            registry=settings.schema_registry_url,
            subject=topic_subject(topic),
        )
        self.bootstrap = settings.kafka_bootstrap
        self.consumer = Consumer(
            client_config(
                settings,
                {
                    "group.id": f"autopull-watch-{uuid.uuid4().hex}",
                    "auto.offset.reset": "earliest",
                    "enable.auto.commit": False,
                },
            )
        )
        self.consumer.subscribe([full_name(settings, "incidents")])
        self.incidents: dict[str, Record] = {}
        self.records_read = 0
        # Records that did not decode as an Incident.
        self.skipped = 0

    def poll(self, timeout: float) -> int:
        """Read what arrived within `timeout` seconds; return the number of records."""
        messages = self.consumer.consume(num_messages=500, timeout=timeout)
        self.records_read += len(messages)
        count = 0
        for message in messages:
            if message.error():
                continue
            value = message.value()
            if value is None:
                # A tombstone deletes the incident of its key.
                key = message.key()
                if key is not None:
                    self.incidents.pop(key.decode(errors="replace"), None)
                continue
            try:
                incident = self.codec.loads(value)
            except SchemaError as error:
                # The worker sends such a record to the dead letters; a reader keeps
                # the incident's earlier version and goes on.
                self.skipped += 1
                log.warning(
                    "Skipped an unreadable record of the incidents topic "
                    "partition=%s offset=%s error=%s",
                    message.partition(),
                    message.offset(),
                    error,
                )
                continue
            self.incidents[incident["incident_id"]] = incident
            count += 1
        return count

    def catch_up(self, timeout: float = 30.0) -> None:
        """Read until every partition of the topic was read to its current end."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.poll(0.5)
            assignment = self.consumer.assignment()
            if not assignment:
                continue
            positions = self.consumer.position(assignment)
            behind = False
            for partition in positions:
                low, high = self.consumer.get_watermark_offsets(partition, timeout=5)
                if high > low and partition.offset < high:
                    behind = True
            if not behind:
                return
        if self.consumer.assignment():
            raise TimeoutError(
                f"Reading the incidents topic from {self.bootstrap} did not reach its "
                f"end within {timeout:g} s after {self.records_read:,} records. The "
                "topic may hold many old versions of large incidents that the broker "
                "has not compacted yet; try again, or read one incident through the "
                "REST API."
            )
        raise TimeoutError(
            f"Reading the incidents topic did not finish within {timeout:g} s. "
            f"Check that the broker at {self.bootstrap} is reachable, or set "
            "AUTOPULL_KAFKA_BOOTSTRAP to its address."
        )

    def pulls(self) -> dict[tuple[str, str], Record]:
        """Return every pull entry of every incident by (mailbox, Message-ID)."""
        entries: dict[tuple[str, str], Record] = {}
        for incident in self.incidents.values():
            for entry in incident["pulls"]:
                key = (entry["mailbox"], entry["message_id"])
                known = entries.get(key)
                if known is None or _rank(entry) > _rank(known):
                    entries[key] = dict(entry, incident_id=incident["incident_id"])
        return entries

    def close(self) -> None:
        """Leave the consumer group."""
        self.consumer.close()


# When two incidents planned the same copy, the entry that did the work is shown.
_STATUS_RANK = {"quarantined": 3, "already_quarantined": 2, "restored": 1}


def _rank(entry: Record) -> int:
    return _STATUS_RANK.get(entry["status"] or "", 0)


def consumed_all(settings: Settings, topic: str = "alerts.raw") -> bool:
    """Return True when the worker's group has committed every record of `topic`."""
    name = full_name(settings, topic)
    consumer = Consumer(
        client_config(
            settings, {"group.id": settings.faust_id, "enable.auto.commit": False}
        )
    )
    try:
        metadata = consumer.list_topics(name, timeout=10)
        partitions = [
            TopicPartition(name, number) for number in metadata.topics[name].partitions
        ]
        committed = consumer.committed(partitions, timeout=10)
        for partition in committed:
            _low, high = consumer.get_watermark_offsets(partition, timeout=10)
            if high > 0 and partition.offset < high:
                return False
        return True
    finally:
        consumer.close()
