"""Commands sent from the CLI land on the partition that owns their incident."""

from __future__ import annotations

import uuid

import pytest
from aiokafka.partitioner import murmur2
from confluent_kafka import Consumer

from autopull.streams.commands import command_event, send_command
from autopull.streams.settings import Settings
from autopull.streams.topics import ensure_topics, full_name

pytestmark = pytest.mark.integration

INCIDENTS = [f"INC-{number:012X}" for number in range(0, 4000, 333)]


def faust_partition(key: str, partitions: int) -> int:
    """Return the partition aiokafka (and so Faust) picks for `key`."""
    return (murmur2(key.encode()) & 0x7FFFFFFF) % partitions


def test_commands_use_faust_partitions(kafka_bootstrap: str, topic_prefix: str) -> None:
    settings = Settings(
        kafka_bootstrap=kafka_bootstrap, topic_prefix=topic_prefix, topic_partitions=8
    )
    ensure_topics(settings)
    for incident_id in INCIDENTS:
        send_command(settings, command_event(incident_id, "close", "tester"))

    consumer = Consumer(
        {
            "bootstrap.servers": kafka_bootstrap,
            "group.id": f"commands-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
        }
    )
    consumer.subscribe([full_name(settings, "incident.events")])
    seen: dict[str, int] = {}
    try:
        for _ in range(60):
            for message in consumer.consume(num_messages=100, timeout=0.5):
                if message.error() is None:
                    seen[message.key().decode()] = message.partition()
            if len(seen) == len(INCIDENTS):
                break
    finally:
        consumer.close()

    assert sorted(seen) == sorted(INCIDENTS)
    for incident_id, partition in seen.items():
        assert partition == faust_partition(incident_id, 8), incident_id
