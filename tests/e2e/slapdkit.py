"""Helpers of the end-to-end directory tests: a private slapd, alerts and readers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

from autopull.connectors.directory import DirectorySettings
from autopull.schemas import AvroCodec
from autopull.streams.ingest import Input, RawSender, raw_alert
from autopull.streams.settings import Settings
from autopull.streams.topics import full_name

REPO_ROOT = Path(__file__).resolve().parents[2]
SLAPD_SCRIPT = REPO_ROOT / "dev" / "slapd.sh"


class Slapd:
    """A slapd of dev/slapd.sh on a free port, with the entries of directory.ldif."""

    def __init__(self, data_dir: Path) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = int(probe.getsockname()[1])
        self.data_dir = data_dir

    def run(self, command: str) -> None:
        env = {
            **os.environ,
            "AUTOPULL_SLAPD_PORT": str(self.port),
            "AUTOPULL_SLAPD_DATA": str(self.data_dir),
        }
        env.pop("AUTOPULL_SLAPD_LDIF", None)
        result = subprocess.run(
            ["bash", str(SLAPD_SCRIPT), command],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if result.returncode != 0:
            pytest.fail(
                f"dev/slapd.sh {command} failed: {result.stdout}{result.stderr}",
                pytrace=False,
            )

    def settings(self) -> DirectorySettings:
        return DirectorySettings(
            url=f"ldap://127.0.0.1:{self.port}/",
            bind_dn="cn=reader,ou=services,dc=autopull,dc=test",
            password="reader-secret",
            base_dn="dc=autopull,dc=test",
            flavor="openldap",
            connect_timeout_seconds=1.0,
            receive_timeout_seconds=2,
            max_attempts=1,
        )


def read_all(settings: Settings, topic: str, record: str) -> list[dict[str, Any]]:
    """Read `topic` from its start to the end it has when the call starts."""
    codec = AvroCodec(record)
    name = full_name(settings, topic)
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"{settings.topic_prefix}reader-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
        }
    )
    partitions = [
        TopicPartition(name, partition, OFFSET_BEGINNING)
        for partition in range(settings.topic_partitions)
    ]
    remaining = {}
    for partition in partitions:
        low, high = consumer.get_watermark_offsets(partition, timeout=10)
        if high > low:
            remaining[partition.partition] = high
    consumer.assign(partitions)
    values: list[dict[str, Any]] = []
    deadline = time.monotonic() + 30
    try:
        while remaining and time.monotonic() < deadline:
            for message in consumer.consume(num_messages=500, timeout=0.5):
                if message.error() is not None:
                    continue
                if message.value() is not None:
                    values.append(codec.loads(message.value()))
                if message.offset() + 1 >= remaining.get(message.partition(), 0):
                    remaining.pop(message.partition(), None)
    finally:
        consumer.close()
    assert not remaining, f"{topic} could not be read to its end within 30 s"
    return values


def alert_body(message_id: str, recipients: list[str]) -> bytes:
    return json.dumps(
        {
            "json_version": "2.0",
            "classification": "phish",
            "email": {
                "message_id": f"<{message_id}>",
                "sender": "billing@example.net",
                "recipient": recipients,
                "subject": f"Invoice {message_id}",
            },
        }
    ).encode()


def send_alert(settings: Settings, message_id: str, recipients: list[str]) -> None:
    sender = RawSender(settings)
    body = alert_body(message_id, recipients)
    sender.send(raw_alert(Input(f"{message_id}.json", body), None, "test"))
    sender.flush()


def enriched_for(settings: Settings, message_id: str) -> list[dict[str, Any]]:
    return [
        enriched
        for enriched in read_all(settings, "alerts.enriched", "EnrichedAlert")
        if enriched["alert"]["message_id"] == message_id
    ]


def wait_for(
    check: Callable[[], Any], seconds: float, what: str, interval: float = 1.0
) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            result = check()
        except KafkaException:
            # A topic created a moment ago may still lack a partition leader.
            result = None
        if result:
            return result
        time.sleep(interval)
    pytest.fail(f"{what} did not happen within {seconds:g} s", pytrace=False)


def changelog_keys(settings: Settings) -> set[str]:
    """Return the keys of every record in the directory cache's changelog."""
    name = f"{settings.faust_id}-directory_cache-changelog"
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"{settings.topic_prefix}changelog-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
        }
    )
    partitions = [
        TopicPartition(name, partition, OFFSET_BEGINNING)
        for partition in range(settings.topic_partitions)
    ]
    ends = {}
    for partition in partitions:
        low, high = consumer.get_watermark_offsets(partition, timeout=10)
        if high > low:
            ends[partition.partition] = high
    consumer.assign(partitions)
    keys: set[str] = set()
    deadline = time.monotonic() + 30
    try:
        while ends and time.monotonic() < deadline:
            for message in consumer.consume(num_messages=500, timeout=0.5):
                if message.error() is not None:
                    continue
                keys.add(json.loads(message.key()))
                if message.offset() + 1 >= ends.get(message.partition(), 0):
                    ends.pop(message.partition(), None)
    finally:
        consumer.close()
    return keys


def by_mailbox(enriched: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {recipient["mailbox"]: recipient for recipient in enriched["recipients"]}
