"""A new worker enriches from the directory cache's changelog while slapd is down.

A first worker enriches an alert to an alias of a VIP and to a list alias, and
writes what the directory returned to the directory_cache table. It is killed
with SIGKILL and slapd is stopped. A second worker with an empty data folder
recovers the table from the changelog and enriches a new alert to the same
addresses with their directory attributes, without slapd. An alert to an address
that no worker looked up waits, retried, and is enriched once slapd is back.
"""

from __future__ import annotations

import json
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from slapdkit import Slapd, read_all

from autopull.streams.ingest import Input, RawSender, raw_alert
from autopull.streams.settings import Settings
from autopull.streams.topics import ensure_topics

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

VIP_GROUP = "cn=vip,ou=groups,dc=autopull,dc=test"
# alice@ is an alias of alice.archer@, a VIP through the nested executives group.
# eng@ is an alias of the engineering list, whose members are bob and erin.
SEEN = ["alice@autopull.test", "eng@autopull.test"]
SEEN_MAILBOXES = [
    "alice.archer@autopull.test",
    "bob.brown@autopull.test",
    "erin.evans@autopull.test",
]
# carol@ is an alias of carol.chen@, which no worker looks up before the outage.
UNSEEN = "carol@autopull.test"
# How long the unseen address keeps failing before slapd starts again.
OUTAGE_SECONDS = 10.0


@pytest.fixture
def slapd(tmp_path: Path) -> Iterator[Slapd]:
    instance = Slapd(tmp_path / "slapd")
    instance.run("start")
    yield instance
    instance.run("stop")


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
        result = check()
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


def test_new_worker_enriches_from_changelog(
    pipeline_settings: Settings,
    start_worker: Any,
    slapd: Slapd,
    tmp_path: Path,
) -> None:
    directory = slapd.settings().model_copy(update={"vip_groups": (VIP_GROUP,)})
    settings = pipeline_settings.model_copy(
        update={"directory": directory, "data_dir": tmp_path / "first"}
    )
    ensure_topics(settings)
    first = start_worker(settings)

    send_alert(settings, "cache-1@billing-example.net", SEEN)
    before = wait_for(
        lambda: enriched_for(settings, "cache-1@billing-example.net"),
        120,
        "The first worker's enrichment",
    )[0]
    expected_keys = {f"person:{address}" for address in SEEN} | {
        "expansion:eng@autopull.test"
    }
    wait_for(
        lambda: expected_keys <= changelog_keys(settings),
        30,
        "The directory cache's changelog records",
    )
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    slapd.run("stop")

    restarted = settings.model_copy(update={"data_dir": tmp_path / "second"})
    start_worker(restarted)
    send_alert(restarted, "cache-2@billing-example.net", SEEN)
    after = wait_for(
        lambda: enriched_for(restarted, "cache-2@billing-example.net"),
        120,
        "The second worker's enrichment without slapd",
    )[0]

    assert sorted(by_mailbox(before)) == SEEN_MAILBOXES
    assert sorted(by_mailbox(after)) == SEEN_MAILBOXES
    for mailbox, recipient in by_mailbox(after).items():
        assert recipient == by_mailbox(before)[mailbox], mailbox
    alice = by_mailbox(after)["alice.archer@autopull.test"]
    assert alice["vip"] is True
    assert alice["recipient_type"] == "alias"
    assert alice["attributes"]["department"] == "Finance"
    bob = by_mailbox(after)["bob.brown@autopull.test"]
    assert bob["recipient_type"] == "list_member"
    assert bob["path"] == [
        "eng@autopull.test",
        "engineering@autopull.test",
        "bob.brown@autopull.test",
    ]
    assert bob["attributes"]["department"] == "Engineering"
    assert bob["attributes"]["list"] == "eng@autopull.test"

    # Every address of the second alert came from the table: none needed slapd.
    second_log = tmp_path / "worker-1.log"
    assert "Enrichment failed, retrying" not in second_log.read_text()

    send_alert(restarted, "cache-3@billing-example.net", [UNSEEN])
    wait_for(
        lambda: "Enrichment failed, retrying" in second_log.read_text(),
        120,
        "A failed lookup of the unseen address",
    )
    time.sleep(OUTAGE_SECONDS)
    assert enriched_for(restarted, "cache-3@billing-example.net") == []
    assert read_all(restarted, "alerts.dead", "DeadLetter") == []

    slapd.run("start")
    late = wait_for(
        lambda: enriched_for(restarted, "cache-3@billing-example.net"),
        120,
        "The enrichment of the unseen address once slapd is back",
    )[0]
    carol = by_mailbox(late)["carol.chen@autopull.test"]
    assert carol["vip"] is True
    assert carol["recipient_type"] == "alias"
    assert carol["attributes"]["department"] == "Executive Office"
