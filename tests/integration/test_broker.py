"""Checks that the local development broker from dev/kafka.sh serves real clients.

The confluent-kafka tests cover produce, consume, large records and disabled
topic auto-creation. The Faust test runs a worker in-process with a changelogged
table, then starts a second app with the same id and checks that it recovers
the table from the changelog topic.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import faust
import pytest
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

pytestmark = pytest.mark.integration

# Largest record the test sends: more than the 1 MiB producer default, less
# than the broker's message.max.bytes of 4 MiB.
LARGE_VALUE_BYTES = 1536 * 1024
# How long a topic must stay absent after a producer's metadata request for it.
AUTO_CREATE_WAIT_S = 3.0


def create_topics(bootstrap: str, names: list[str]) -> None:
    """Create single-partition topics, because the broker does not auto-create them."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics(
        [NewTopic(name, num_partitions=1, replication_factor=1) for name in names],
        operation_timeout=10,
    )
    for future in futures.values():
        future.result(timeout=15)


def consume_all(
    bootstrap: str, topic: str, *, expected: int, timeout_s: float = 30.0
) -> list[tuple[bytes | None, bytes | None]]:
    """Read ``expected`` records from partition 0 of ``topic`` from the start."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"{topic}.reader",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    records: list[tuple[bytes | None, bytes | None]] = []
    try:
        consumer.assign([TopicPartition(topic, 0, 0)])
        deadline = time.monotonic() + timeout_s
        while len(records) < expected and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None:
                continue
            assert message.error() is None, message.error()
            records.append((message.key(), message.value()))
    finally:
        consumer.close()
    return records


def produce(
    bootstrap: str,
    topic: str,
    records: list[tuple[bytes, bytes]],
    **config: Any,
) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, **config})
    errors: list[KafkaError] = []

    def on_delivery(error: KafkaError | None, _message: Any) -> None:
        if error is not None:
            errors.append(error)

    for key, value in records:
        producer.produce(topic, key=key, value=value, on_delivery=on_delivery)
    assert producer.flush(15) == 0, "records still queued after 15 s"
    assert errors == []


# ---------------------------------------------------------------------------
# confluent-kafka
# ---------------------------------------------------------------------------


def test_confluent_round_trip(kafka_bootstrap: str, topic_prefix: str) -> None:
    topic = f"{topic_prefix}round-trip"
    create_topics(kafka_bootstrap, [topic])
    sent = [(f"key-{i}".encode(), f"value-{i}".encode()) for i in range(20)]

    produce(kafka_bootstrap, topic, sent)

    # Subscribing, unlike assign(), goes through the group coordinator.
    consumer = Consumer(
        {
            "bootstrap.servers": kafka_bootstrap,
            "group.id": f"{topic_prefix}round-trip-group",
            "auto.offset.reset": "earliest",
        }
    )
    received: list[tuple[bytes | None, bytes | None]] = []
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + 30
        while len(received) < len(sent) and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None:
                continue
            assert message.error() is None, message.error()
            received.append((message.key(), message.value()))
    finally:
        consumer.close()

    assert received == sent


def test_broker_accepts_large_record(kafka_bootstrap: str, topic_prefix: str) -> None:
    topic = f"{topic_prefix}large"
    create_topics(kafka_bootstrap, [topic])
    value = bytes(range(256)) * (LARGE_VALUE_BYTES // 256)

    # librdkafka's message.max.bytes defaults to 1,000,000 bytes.
    produce(
        kafka_bootstrap,
        topic,
        [(b"large", value)],
        **{"message.max.bytes": 4 * 1024 * 1024},
    )
    records = consume_all(kafka_bootstrap, topic, expected=1)

    assert len(records) == 1
    assert records[0][1] == value


def test_broker_does_not_auto_create_topics(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    topic = f"{topic_prefix}never-created"
    # librdkafka producers set AllowAutoTopicCreation in metadata requests. A
    # broker with auto-creation on also returns UNKNOWN_TOPIC_OR_PART here, but
    # creates the topic within about a second.
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    metadata = producer.list_topics(topic, timeout=10)
    producer.flush(1)

    assert metadata.topics[topic].error is not None
    assert metadata.topics[topic].error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    deadline = time.monotonic() + AUTO_CREATE_WAIT_S
    while time.monotonic() < deadline:
        assert topic not in admin.list_topics(timeout=10).topics
        time.sleep(0.5)


# ---------------------------------------------------------------------------
# Faust
# ---------------------------------------------------------------------------

EVENT_USERS = ["alice", "bob", "alice", "carol", "alice", "bob"]
EXPECTED_COUNTS = {"alice": 3, "bob": 2, "carol": 1}


def build_counting_app(
    app_id: str, bootstrap: str, source_topic: str
) -> tuple[faust.App, faust.Table]:
    """Build a Faust app that counts events per user in a changelogged table."""
    app = faust.App(
        app_id,
        broker=f"kafka://{bootstrap}",
        store="memory://",
        web_enabled=False,
        autodiscover=False,
        topic_partitions=1,
        topic_replication_factor=1,
        table_standby_replicas=0,
        # The broker's group.min.session.timeout.ms is 6 s.
        broker_session_timeout=6.0,
        broker_heartbeat_interval=1.0,
        broker_rebalance_timeout=6.0,
        broker_commit_interval=0.5,
        consumer_auto_offset_reset="earliest",
    )
    events = app.topic(source_topic, key_type=str, value_type=str)
    counts = app.Table("counts", default=int, key_type=str, value_type=int)

    @app.agent(events)
    async def count_events(stream: faust.StreamT[str]) -> None:
        async for user in stream:
            counts[user] += 1

    return app, counts


async def wait_for(
    condition: Callable[[], bool], *, timeout_s: float, description: str
) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s}s waiting for {description}")
        await asyncio.sleep(0.2)


def committed_offset(bootstrap: str, group_id: str, topic: str) -> int:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group_id})
    try:
        [partition] = consumer.committed([TopicPartition(topic, 0)], timeout=10)
    finally:
        consumer.close()
    return partition.offset


@pytest.mark.timeout(180)
async def test_faust_table_recovers_from_changelog(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    source_topic = f"{topic_prefix}user-events"
    app_id = f"{topic_prefix}faust-proof"
    changelog_topic = f"{app_id}-counts-changelog"
    create_topics(kafka_bootstrap, [source_topic])
    produce(
        kafka_bootstrap,
        source_topic,
        [(user.encode(), json.dumps(user).encode()) for user in EVENT_USERS],
    )

    # First instance: processes the events and writes the changelog.
    app, counts = build_counting_app(app_id, kafka_bootstrap, source_topic)
    await app.start()
    try:
        await wait_for(
            lambda: dict(counts.items()) == EXPECTED_COUNTS,
            timeout_s=60,
            description=f"the first app to count {EXPECTED_COUNTS}",
        )
    finally:
        await app.stop()

    # Faust created the changelog topic itself (CreateTopics), compacted.
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    assert changelog_topic in admin.list_topics(timeout=10).topics
    resource = ConfigResource(ConfigResource.Type.TOPIC, changelog_topic)
    config = admin.describe_configs([resource])[resource].result(timeout=10)
    assert config["cleanup.policy"].value == "compact"

    changelog = consume_all(kafka_bootstrap, changelog_topic, expected=len(EVENT_USERS))
    assert len(changelog) == len(EVENT_USERS)
    latest_values = {
        json.loads(key): json.loads(value)
        for key, value in changelog
        if key is not None and value is not None
    }
    assert latest_values == EXPECTED_COUNTS

    # The committed offset shows the second instance will not reprocess the
    # events, so any counts it has must come from the changelog.
    assert committed_offset(kafka_bootstrap, app_id, source_topic) == len(EVENT_USERS)

    # Second instance with the same id: recovers the table, then keeps counting.
    app, counts = build_counting_app(app_id, kafka_bootstrap, source_topic)
    await app.start()
    try:
        await wait_for(
            lambda: dict(counts.items()) == EXPECTED_COUNTS,
            timeout_s=60,
            description=f"the second app to recover {EXPECTED_COUNTS}",
        )
        # In a thread, so the blocking flush does not stall the app's event loop.
        await asyncio.to_thread(
            produce, kafka_bootstrap, source_topic, [(b"carol", b'"carol"')]
        )
        await wait_for(
            lambda: dict(counts.items()).get("carol") == 2,
            timeout_s=30,
            description="the second app to count one more event",
        )
    finally:
        await app.stop()

    assert dict(counts.items()) == {**EXPECTED_COUNTS, "carol": 2}


# ---------------------------------------------------------------------------
# dev/kafka.sh
# ---------------------------------------------------------------------------


def test_kafka_script_accepts_cluster_id_with_dash(tmp_path: Any) -> None:
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "dev" / "kafka.sh"
    ports = []
    for _ in range(2):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
    data = tmp_path / "kafka"
    data.mkdir()
    # The marker tells the script that the directory is its own, so it keeps the
    # cluster id found there. A random id starts with "-" about once in 64 starts.
    (data / ".autopull-kafka-data").touch()
    (data / "cluster.id").write_text("-SVP7Cs0ewzczOsc2MvKwA")
    env = os.environ | {
        "AUTOPULL_KAFKA_PORT": str(ports[0]),
        "AUTOPULL_KAFKA_CONTROLLER_PORT": str(ports[1]),
        "AUTOPULL_KAFKA_DATA": str(data),
        "AUTOPULL_PYTHON": sys.executable,
    }

    def run(action: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(script), action],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    started = run("start")
    try:
        assert started.returncode == 0, started.stderr
        assert "cluster id -SVP7Cs0ewzczOsc2MvKwA" in started.stderr
        create_topics(f"127.0.0.1:{ports[0]}", ["dash-id-check"])
    finally:
        stopped = run("stop")
    assert stopped.returncode == 0, stopped.stderr
