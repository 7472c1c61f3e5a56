"""Alerts to very many recipients through the whole pipeline.

An alert to 20,000 mailboxes makes an incident of several MiB, above the broker's
default record size, and a worker must store and publish it. An incident above
`incident_max_bytes` must not stop the worker: the event goes to alerts.dead and
the next alert is handled as usual. A command that would make an incident too
large is rejected by the REST API and the CLI before it is sent. While a worker
handles an alert to 45,000 mailboxes, another worker can join the group: the first
must rejoin in time, so neither is dropped from the group, and the alert joins one
incident once.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    ConsumerGroupTopicPartitions,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from autopull.schemas import AvroCodec
from autopull.streams.ingest import Input, RawSender, raw_alert
from autopull.streams.operate import load_incidents, run_command
from autopull.streams.records import Record
from autopull.streams.settings import MIB, Settings
from autopull.streams.topics import ensure_topics, full_name

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


def campaign_alert(message_id: str, recipients: list[str]) -> bytes:
    """Return a generic alert about one message delivered to `recipients`."""
    alert = {
        "json_version": "2.0",
        "classification": "phish",
        "email": {"message_id": f"<{message_id}>", "recipient": recipients},
    }
    return json.dumps(alert).encode()


def send(settings: Settings, name: str, body: bytes) -> None:
    sender = RawSender(settings)
    sender.send(raw_alert(Input(name, body), None, "test"))
    sender.flush()


def wait_for(check: Callable[[], Any], what: str, timeout: float = 180.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(1.0)
    raise AssertionError(f"Timed out after {timeout:g} s waiting for {what}.")


def incident_with(settings: Settings, message_id: str) -> Record | None:
    for incident in load_incidents(settings).values():
        if message_id in incident["message_ids"]:
            return incident
    return None


def dead_letters(settings: Settings) -> list[Record]:
    codec = AvroCodec("DeadLetter")
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"{settings.topic_prefix}dead-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([full_name(settings, "alerts.dead")])
    letters = []
    idle_until = time.monotonic() + 5
    try:
        while time.monotonic() < idle_until:
            for message in consumer.consume(num_messages=100, timeout=0.5):
                if message.error() is None and message.value() is not None:
                    letters.append(codec.loads(message.value()))
                    idle_until = time.monotonic() + 2
    finally:
        consumer.close()
    return letters


def test_incident_of_many_mailboxes_is_stored(
    pipeline_settings: Settings, start_worker: Any
) -> None:
    settings = pipeline_settings
    ensure_topics(settings)
    worker = start_worker()
    recipients = [f"user{number:05d}@example.com" for number in range(20_000)]
    send(settings, "many.json", campaign_alert("many@evil.example", recipients))

    incident = wait_for(
        lambda: incident_with(settings, "many@evil.example"),
        "the incident of 20,000 mailboxes",
    )
    assert len(incident["pulls"]) == 20_000
    assert len(AvroCodec("Incident").dumps(incident)) > 4 * MIB
    # The default policy holds a pull of that many mailboxes for approval.
    assert {entry["status"] for entry in incident["pulls"]} == {"held"}
    assert worker.poll() is None


def test_oversized_incident_goes_to_dead_letters(
    pipeline_settings: Settings, start_worker: Any
) -> None:
    settings = pipeline_settings.model_copy(update={"incident_max_bytes": MIB})
    ensure_topics(settings)
    worker = start_worker(settings)
    recipients = [f"user{number:05d}@example.com" for number in range(8_000)]
    send(settings, "too-many.json", campaign_alert("big@evil.example", recipients))
    send(
        settings,
        "small.json",
        campaign_alert("small@evil.example", ["alice@example.com"]),
    )

    small = wait_for(
        lambda: incident_with(settings, "small@evil.example"),
        "the small incident after the oversized one",
    )
    assert [entry["mailbox"] for entry in small["pulls"]] == ["alice@example.com"]
    assert incident_with(settings, "big@evil.example") is None
    letters = [
        letter for letter in dead_letters(settings) if letter["stage"] == "incident"
    ]
    assert len(letters) == 1
    reason = letters[0]["reason"]
    assert "RecordTooLargeError" in reason
    assert f"above the maximum of {MIB:,}" in reason
    assert "AUTOPULL_INCIDENT_MAX_BYTES" in reason
    assert b"big@evil.example" in letters[0]["body"]
    assert worker.poll() is None


ANALYST_KEY = "large-incident-analyst-key"


def test_command_over_limit_rejected_before_sending(
    pipeline_settings: Settings,
    start_worker: Any,
    pick_port: Callable[[], int],
) -> None:
    keys = {
        "analyst": {
            "sha256": hashlib.sha256(ANALYST_KEY.encode()).hexdigest(),
            "role": "analyst",
        }
    }
    settings = pipeline_settings.model_copy(
        update={
            "incident_max_bytes": MIB,
            "web_enabled": True,
            "web_port": pick_port(),
            "api_keys": Settings(api_keys=keys).api_keys,
        }
    )
    ensure_topics(settings)
    worker = start_worker(settings)
    recipients = [f"user{number:05d}@example.com" for number in range(1_000)]
    send(settings, "held.json", campaign_alert("held@evil.example", recipients))
    incident = wait_for(
        lambda: incident_with(settings, "held@evil.example"),
        "the incident of 1,000 held mailboxes",
    )
    incident_id = incident["incident_id"]
    size = len(AvroCodec("Incident").dumps(incident))
    assert size < MIB // 2

    base = f"http://127.0.0.1:{settings.web_port}"
    headers = {"Authorization": f"Bearer {ANALYST_KEY}"}

    def served() -> bool:
        url = f"{base}/api/incidents/{incident_id}"
        try:
            return httpx.get(url, headers=headers, timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(served, "the incident in the REST API's read model")
    # A reject writes its 1,000 bytes of text into the reason of each held copy.
    text = "Not a phish, the sender is our payroll provider. " * 20
    url = f"{base}/api/incidents/{incident_id}"
    rejected = httpx.post(
        f"{url}/reject", json={"comment": text}, headers=headers, timeout=30
    )
    assert rejected.status_code == 413, rejected.text
    error = rejected.json()["error"]
    assert error["code"] == "too_large"
    assert f"above the maximum of {MIB:,} bytes" in error["message"]
    assert "AUTOPULL_INCIDENT_MAX_BYTES" in error["message"]

    out = io.StringIO()
    code = run_command(
        settings, incident_id, "reject", text=text, actor="carol", out=out
    )
    assert code == 2
    assert f"above the maximum of {MIB:,} bytes" in out.getvalue()
    assert "AUTOPULL_INCIDENT_MAX_BYTES" in out.getvalue()

    # The same text as one comment fits, and the incident agent applies it.
    commented = httpx.post(
        f"{url}/comment", json={"comment": text}, headers=headers, timeout=30
    )
    assert commented.status_code == 202, commented.text
    updated = wait_for(
        lambda: next(
            (
                found
                for found in [incident_with(settings, "held@evil.example")]
                if found and found["history"][-1]["what"] == "comment"
            ),
            None,
        ),
        "the comment in the incident's history",
    )
    assert updated["history"][-1]["detail"] == text
    assert {entry["status"] for entry in updated["pulls"]} == {"held"}
    letters = [
        letter for letter in dead_letters(settings) if letter["stage"] == "incident"
    ]
    assert letters == []
    assert worker.poll() is None


# The worker's rebalance timeout is its session timeout. A worker that another
# one joins rejoins only once its events in progress are done, so an event that
# takes longer drops it from the group. Joining the alert below took over 30 s
# in one event before it was made linear, and its longest event now takes a few
# seconds.
SESSION_TIMEOUT_SECONDS = 20
HUGE_RECIPIENTS = 45_000
# The topics the agents read, which the worker's group commits.
AGENT_INPUTS = (
    "alerts.raw",
    "alerts.normalized",
    "alerts.enriched",
    "alerts.grouped",
    "alerts.by_mailbox",
    "incident.events",
    "incidents",
    "pull.commands",
    "pull.outcomes",
)
# aiokafka 0.14 logs this line each time a consumer joins its group.
JOINED_GROUP = re.compile(r"Joined group '[^']+' \(generation (\d+)\)")


def joined_generations(log: Path) -> list[int]:
    """Return the generations of the group that the worker of `log` joined, in order."""
    text = log.read_text(errors="replace")
    return [int(match.group(1)) for match in JOINED_GROUP.finditer(text)]


def committed_to_end(settings: Settings) -> bool:
    """Return True when the worker group has committed every record it reads.

    A worker dropped from its group while it handled a record cannot commit
    that record, and the group handles it again, so this waits for that too.
    """
    partitions = [
        TopicPartition(full_name(settings, topic), partition)
        for topic in AGENT_INPUTS
        for partition in range(settings.topic_partitions)
    ]
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    request = ConsumerGroupTopicPartitions(settings.faust_id, partitions)
    future = admin.list_consumer_group_offsets([request])[settings.faust_id]
    committed = {
        (tp.topic, tp.partition): tp.offset
        for tp in future.result(timeout=15).topic_partitions
    }
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"{settings.topic_prefix}watermarks-{uuid.uuid4().hex}",
        }
    )
    try:
        for tp in partitions:
            _, end = consumer.get_watermark_offsets(tp, timeout=10)
            if committed.get((tp.topic, tp.partition), -1) < end and end > 0:
                return False
        return True
    finally:
        consumer.close()


def read_to_end(settings: Settings, topic: str) -> list[tuple[bytes, bytes]]:
    """Return the key and value of every record of `topic`, read to its end."""
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

    records = []
    deadline = time.monotonic() + 60
    try:
        while remaining and time.monotonic() < deadline:
            for message in consumer.consume(num_messages=500, timeout=0.5):
                if message.error() is not None:
                    continue
                records.append((message.key(), message.value()))
                if message.offset() + 1 >= remaining.get(message.partition(), 0):
                    remaining.pop(message.partition(), None)
    finally:
        consumer.close()

    assert not remaining, f"{topic} could not be read to its end within 60 s"
    return records


@pytest.mark.timeout(900)
def test_huge_alert_keeps_workers_in_group(
    pipeline_settings: Settings, start_worker: Any, tmp_path: Path
) -> None:
    settings = pipeline_settings.model_copy(
        update={"session_timeout_seconds": SESSION_TIMEOUT_SECONDS}
    )
    ensure_topics(settings)
    first = start_worker(settings)
    first_log = tmp_path / "worker-0.log"
    wait_for(lambda: joined_generations(first_log), "the first worker to join")

    recipients = [f"u{number:05d}@example.com" for number in range(HUGE_RECIPIENTS)]
    body = campaign_alert("huge@evil.example", recipients)
    assert len(body) <= settings.ingest_max_bytes
    send(settings, "huge.json", body)
    send(
        settings,
        "after.json",
        campaign_alert("after@evil.example", ["alice@example.com"]),
    )
    # The second worker joins while the first handles the huge alert after its
    # grouping (the message windows, the copies per mailbox and the incident).
    wait_for(
        lambda: "campaign_key=message:huge@evil.example" in first_log.read_text(),
        "the huge alert to open its campaign window",
    )
    second = start_worker(settings)
    second_log = tmp_path / "worker-1.log"

    after = wait_for(
        lambda: incident_with(settings, "after@evil.example"),
        "the incident of the alert after the huge one",
    )
    huge = wait_for(
        lambda: incident_with(settings, "huge@evil.example"),
        "the incident of 45,000 mailboxes",
    )
    wait_for(lambda: committed_to_end(settings), "every record to be committed")

    assert [entry["mailbox"] for entry in after["pulls"]] == ["alice@example.com"]
    # One rebalance, when the second worker joined: no worker was dropped from
    # the group and joined again.
    assert joined_generations(first_log) == [1, 2]
    assert joined_generations(second_log) == [2]

    # faust-streaming 0.15.3 commits every 2.8 s and not when a rebalance starts,
    # so the group handles the records after the last commit again, and an event
    # may be handled twice. Handling it again changes nothing and loses nothing.
    huge_incidents = [
        incident
        for incident in load_incidents(settings).values()
        if "huge@evil.example" in incident["message_ids"]
    ]
    assert len(huge_incidents) == 1
    huge = huge_incidents[0]
    assert len(huge["alert_ids"]) == 1
    assert len(huge["pulls"]) == HUGE_RECIPIENTS
    assert {entry["status"] for entry in huge["pulls"]} == {"held"}
    copies = {key for key, _ in read_to_end(settings, "alerts.by_mailbox")}
    assert copies == {
        mailbox.encode() for mailbox in [*recipients, "alice@example.com"]
    }
    codec = AvroCodec("Exposure")
    latest = {key: value for key, value in read_to_end(settings, "exposures")}
    assert len(latest) == HUGE_RECIPIENTS + 1
    assert {codec.loads(value)["messages"] for value in latest.values()} == {1}
    assert first.poll() is None
    assert second.poll() is None
