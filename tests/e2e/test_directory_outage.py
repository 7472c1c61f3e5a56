"""slapd stopped during a whole pipeline run on the real broker, against Graph.

The alert names two aliases that only the directory resolves: robert.brown@ and
alice@ (dev/slapd/directory.ldif), whose mailboxes are bob.brown@ and
alice.archer@. While slapd is down the alert must wait: no pull, no dead letter,
and above all no pull from the alias addresses. Once slapd is back, both mailboxes
are quarantined.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from autopull.connectors.directory import DirectorySettings
from autopull.schemas import AvroCodec
from autopull.streams.ingest import Input, RawSender, raw_alert
from autopull.streams.settings import Settings
from autopull.streams.topics import ensure_topics, full_name

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO = REPO_ROOT / "examples" / "worlds" / "demo.json"
SLAPD_SCRIPT = REPO_ROOT / "dev" / "slapd.sh"
MESSAGE_ID = "dir-outage-1@billing-example.net"
MAILBOXES = ["alice.archer@autopull.test", "bob.brown@autopull.test"]
ALIASES = ["alice@autopull.test", "robert.brown@autopull.test"]
OUTAGE_SECONDS = 20.0


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


@pytest.fixture
def slapd(tmp_path: Path) -> Iterator[Slapd]:
    instance = Slapd(tmp_path / "slapd")
    instance.run("start")
    yield instance
    instance.run("stop")


@pytest.fixture
def graph_world(tmp_path: Path) -> Path:
    """Return the demo world plus the tenant autopull.test and two of its users."""
    world: dict[str, Any] = json.loads(DEMO.read_text())
    tenant = dict(world["tenants"][0], domain="autopull.test")
    world["tenants"].append(tenant)
    world["mailboxes"] += [{"address": address} for address in MAILBOXES]
    world["messages"].append(
        {
            "key": "D1",
            "verdict": "phishing",
            "malicious": True,
            "message_id": f"<{MESSAGE_ID}>",
            "from": "Billing <billing@example.net>",
            "to": ALIASES,
            "subject": "Invoice 9001 overdue",
            "date": "2026-12-01T09:30:00Z",
            "body": "Pay at http://billing-example.net/pay/9001\n",
            "deliveries": [
                {"mailbox": mailbox, "folder": "inbox", "read": False}
                for mailbox in MAILBOXES
            ],
        }
    )
    path = tmp_path / "world.json"
    path.write_text(json.dumps(world))
    return path


def alert_body() -> bytes:
    return json.dumps(
        {
            "json_version": "2.0",
            "classification": "phish",
            "email": {
                "message_id": f"<{MESSAGE_ID}>",
                "sender": "billing@example.net",
                "recipient": ALIASES,
                "subject": "Invoice 9001 overdue",
            },
        }
    ).encode()


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


def test_slapd_outage_alert_waits_then_pulls(
    pipeline_settings: Settings,
    graph_sim: Any,
    start_worker: Any,
    slapd: Slapd,
    tmp_path: Path,
) -> None:
    settings = pipeline_settings.model_copy(update={"directory": slapd.settings()})
    ensure_topics(settings)
    start_worker(settings)
    # The worker's first lookups must meet a running slapd only after the outage.
    slapd.run("stop")
    sender = RawSender(settings)
    sender.send(raw_alert(Input("alert.json", alert_body()), None, "test"))
    sender.flush()

    time.sleep(OUTAGE_SECONDS)
    assert read_all(settings, "pull.outcomes", "PullOutcome") == []
    assert read_all(settings, "alerts.dead", "DeadLetter") == []
    assert read_all(settings, "alerts.enriched", "EnrichedAlert") == []
    logs = "".join(path.read_text() for path in tmp_path.glob("worker-*.log"))
    assert "Enrichment failed, retrying" in logs

    slapd.run("start")
    deadline = time.monotonic() + 120
    outcomes: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        outcomes = read_all(settings, "pull.outcomes", "PullOutcome")
        if len(outcomes) >= len(MAILBOXES):
            break
        time.sleep(1)

    assert sorted(o["mailbox"] for o in outcomes) == MAILBOXES
    assert {o["status"] for o in outcomes} == {"quarantined"}
    assert {o["message_id"] for o in outcomes} == {MESSAGE_ID}
    enriched = read_all(settings, "alerts.enriched", "EnrichedAlert")
    assert len(enriched) == 1
    assert sorted(r["mailbox"] for r in enriched[0]["recipients"]) == MAILBOXES
    assert {r["recipient_type"] for r in enriched[0]["recipients"]} == {"alias"}
    for mailbox in MAILBOXES:
        folders = [
            m["folder"]
            for m in graph_sim.messages(mailbox)
            if m["internet_message_id"] == f"<{MESSAGE_ID}>"
        ]
        assert folders == ["Autopull Quarantine"], mailbox
