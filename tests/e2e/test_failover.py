"""Two workers share a burst; one is killed with SIGKILL in the middle of it."""

from __future__ import annotations

import copy
import json
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer

from autopull.schemas import decode
from autopull.streams.ingest import Input, RawSender, raw_alert
from autopull.streams.settings import Settings
from autopull.streams.topics import ensure_topics, full_name

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_WORLD = REPO_ROOT / "examples" / "worlds" / "demo.json"
MAILBOXES = [f"user{number:03d}@example.com" for number in range(120)]
BURST_ID = "burst-0001@campaign.example.net"


@pytest.fixture
def graph_world(tmp_path: Path) -> Path:
    """The demo tenant plus 120 mailboxes that each received one phishing copy."""
    world = json.loads(DEMO_WORLD.read_text())
    world["mailboxes"] += [{"address": address} for address in MAILBOXES]
    world["messages"] = [
        {
            "key": "BURST",
            "malicious": True,
            "message_id": f"<{BURST_ID}>",
            "from": "Payroll <payroll@campaign.example.net>",
            "to": MAILBOXES,
            "subject": "Salary adjustment",
            "date": "2026-12-01T08:00:00Z",
            "body": "Review at http://campaign.example.net/salary\\n",
            "deliveries": [
                {"mailbox": address, "folder": "inbox", "read": False}
                for address in MAILBOXES
            ],
        }
    ]
    path = tmp_path / "burst-world.json"
    path.write_text(json.dumps(world))
    return path


@pytest.fixture
def graph_latency_ms() -> float:
    return 40.0


def burst_alert() -> bytes:
    event = json.loads(
        (REPO_ROOT / "examples" / "alerts" / "tap-delivered-phish.json").read_text()
    )["messagesDelivered"][0]
    event = copy.deepcopy(event)
    event.update(
        id=str(uuid.uuid4()),
        GUID="burstGUID0001",
        messageID=f"<{BURST_ID}>",
        recipient=MAILBOXES,
        toAddresses=MAILBOXES,
        subject="Salary adjustment",
    )
    for threat in event["threatsInfoMap"]:
        threat["campaignID"] = None
        threat["threat"] = "campaign.example.net/salary"
    return json.dumps({"messagesDelivered": [event]}).encode()


def outcome_reader(settings: Settings) -> Consumer:
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"failover-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([full_name(settings, "pull.outcomes")])
    return consumer


def read_outcomes(
    consumer: Consumer, into: list[dict[str, Any]], seconds: float
) -> None:
    for message in consumer.consume(num_messages=500, timeout=seconds):
        if message.error() is None and message.value() is not None:
            into.append(decode("PullOutcome", message.value()))


def test_killed_worker_loses_and_repeats_no_pull(
    pipeline_settings: Settings, graph_sim: Any, start_worker: Any
) -> None:
    settings = pipeline_settings.model_copy(
        update={
            "policy": pipeline_settings.policy.model_copy(
                update={"hold_above_mailboxes": 1000}
            )
        }
    )
    ensure_topics(settings)
    first = start_worker(settings)
    start_worker(settings)
    time.sleep(8)

    sender = RawSender(settings)
    sender.send(raw_alert(Input("burst.json", burst_alert()), None, "test"))
    sender.flush()

    consumer = outcome_reader(settings)
    outcomes: list[dict[str, Any]] = []
    deadline = time.monotonic() + 120
    while len(outcomes) < 15 and time.monotonic() < deadline:
        read_outcomes(consumer, outcomes, 0.5)
    assert len(outcomes) >= 15, "the burst did not start"
    first.send_signal(signal.SIGKILL)

    final = {"quarantined", "already_quarantined"}
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        done = {o["mailbox"] for o in outcomes if o["status"] in final}
        if done >= set(MAILBOXES):
            break
        read_outcomes(consumer, outcomes, 1.0)
    consumer.close()

    done = {o["mailbox"] for o in outcomes if o["status"] in final}
    assert sorted(set(MAILBOXES) - done) == []
    failed = [o for o in outcomes if o["status"] not in final | {"throttled"}]
    assert failed == []

    for address in MAILBOXES:
        copies = [
            m
            for m in graph_sim.messages(address)
            if m["internet_message_id"] == f"<{BURST_ID}>"
        ]
        assert [c["hidden_folder"] for c in copies] == [True], address
    evidence = [
        m
        for m in graph_sim.messages("quarantine@example.com")
        if m["internet_message_id"] == f"<{BURST_ID}>"
    ]
    assert len(evidence) == 1
