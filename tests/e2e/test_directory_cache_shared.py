"""Two workers share the directory cache through its changelog.

Two workers of one app run at the same time, each with its own partitions of
alerts.normalized. One of them resolves alice@ while slapd runs. Then slapd
stops, and alerts to alice@ spread over the partitions of both workers. Each of
them must be enriched with alice's attributes: the worker that did not look
alice@ up has her entry from the other worker's changelog partition, which it
reads as a standby of the global table.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition
from slapdkit import (
    Slapd,
    by_mailbox,
    changelog_keys,
    enriched_for,
    send_alert,
    wait_for,
)

from autopull.streams.settings import Settings
from autopull.streams.topics import admin_client, ensure_topics, full_name

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

VIP_GROUP = "cn=vip,ou=groups,dc=autopull,dc=test"
ALIAS = "alice@autopull.test"
MAILBOX = "alice.archer@autopull.test"
# Alerts sent during the outage. Their alert ids spread them over the partitions,
# and the test checks that both workers own some of them.
OUTAGE_ALERTS = 12


@pytest.fixture
def slapd(tmp_path: Path) -> Iterator[Slapd]:
    instance = Slapd(tmp_path / "slapd")
    instance.run("start")
    yield instance
    instance.run("stop")


def assignments(settings: Settings) -> list[set[int]]:
    """Return the alerts.normalized partitions of each member of the worker group."""
    admin = admin_client(settings)
    topic = full_name(settings, "alerts.normalized")
    future = admin.describe_consumer_groups([settings.faust_id])[settings.faust_id]
    members = future.result().members
    return [
        {tp.partition for tp in member.assignment.topic_partitions if tp.topic == topic}
        for member in members
    ]


def both_assigned(settings: Settings) -> list[set[int]] | None:
    """Return the partitions of two workers when both have some, else None."""
    members = assignments(settings)
    if len(members) == 2 and all(members):
        return members
    return None


def normalized_partitions(settings: Settings, alert_ids: set[str]) -> set[int]:
    """Return the alerts.normalized partitions with records keyed by `alert_ids`."""
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"{settings.topic_prefix}partitions",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    topic = full_name(settings, "alerts.normalized")
    found: set[int] = set()
    try:
        for partition in range(settings.topic_partitions):
            tp = TopicPartition(topic, partition)
            low, high = consumer.get_watermark_offsets(tp, timeout=10)
            if high <= low:
                continue
            consumer.assign([TopicPartition(topic, partition, low)])
            read = 0
            deadline = time.monotonic() + 30
            while read < high - low and time.monotonic() < deadline:
                for message in consumer.consume(num_messages=100, timeout=1):
                    read += 1
                    key = message.key()
                    if message.error() is None and key and key.decode() in alert_ids:
                        found.add(partition)
    finally:
        consumer.close()
    return found


def test_workers_share_directory_cache(
    pipeline_settings: Settings,
    start_worker: Any,
    slapd: Slapd,
    tmp_path: Path,
) -> None:
    directory = slapd.settings().model_copy(update={"vip_groups": (VIP_GROUP,)})
    settings = pipeline_settings.model_copy(update={"directory": directory})
    ensure_topics(settings)
    start_worker(settings.model_copy(update={"data_dir": tmp_path / "one"}))
    start_worker(settings.model_copy(update={"data_dir": tmp_path / "two"}))
    owned = wait_for(
        lambda: both_assigned(settings), 120, "Two workers sharing the partitions"
    )

    send_alert(settings, "shared-0@billing-example.net", [ALIAS])
    first = wait_for(
        lambda: enriched_for(settings, "shared-0@billing-example.net"),
        120,
        "The first enrichment",
    )[0]
    wait_for(
        lambda: f"person:{ALIAS}" in changelog_keys(settings),
        30,
        "The changelog record of alice@",
    )
    slapd.run("stop")

    message_ids = [
        f"shared-{n}@billing-example.net" for n in range(1, OUTAGE_ALERTS + 1)
    ]
    for message_id in message_ids:
        send_alert(settings, message_id, [ALIAS])
    enriched = {
        message_id: wait_for(
            lambda message_id=message_id: enriched_for(settings, message_id),
            120,
            f"The enrichment of {message_id} without slapd",
        )[0]
        for message_id in message_ids
    }

    expected = by_mailbox(first)[MAILBOX]
    assert expected["vip"] is True
    for message_id, alert in enriched.items():
        assert by_mailbox(alert) == {MAILBOX: expected}, message_id
    alert_ids = {alert["alert"]["alert_id"] for alert in enriched.values()}
    used = normalized_partitions(settings, alert_ids)
    # The workers kept their partitions, so both enriched some of the alerts.
    assert sorted(map(sorted, assignments(settings))) == sorted(map(sorted, owned))
    assert all(used & partitions for partitions in owned), (used, owned)
