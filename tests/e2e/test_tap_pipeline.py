"""The TAP poller and the whole pipeline on the real broker, against Graph.

The TAP simulator runs in this process on a free port, on real time, and names
messages of the demo world that the Graph simulator holds:

- M4 (frank@) is first classified spam, and TAP re-emits it as phish two hours
  later, two poll windows after the first event. It must be quarantined.
- M1 (alice@, bob@, carol@) is phish, and TAP later clears the verdict. M5 is
  phish for erin@ and later a false positive. Their copies must come back to their
  folders, read state included, and frank's copy of M5, which no alert names,
  stays where it is.
- M2 (dave@, two copies) stays phish and must stay in quarantine.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaException
from slapdkit import read_all

from autopull.connectors.sources.tap_api import TapSettings
from autopull.schemas import AvroCodec
from autopull.sim.tap import TapScenario, TapSimSettings, TapSimulator
from autopull.streams.settings import Settings
from autopull.streams.topics import ensure_topics, full_name

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

PRINCIPAL = "svc-autopull-test"
SECRET = "tap-simulator-secret"
M1 = "20261201093000.1234.invoice@billing-example.net"
M2 = "CAH7x+q/Lk=Zp'8#w%41&r@mail.example.net"
M4 = "20261201120000.5521.invoice@billing-example.net"
M5 = "20261201113000.9931.payroll@hr-example.net"
HIDDEN_FOLDER = "Autopull Quarantine"


class TapSimThread:
    """A TAP simulator served from its own event loop in a background thread."""

    def __init__(self, simulator: TapSimulator) -> None:
        self.simulator = simulator
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.url = ""

    def start(self) -> None:
        self.thread.start()
        future = asyncio.run_coroutine_threadsafe(
            self.simulator.start("127.0.0.1", 0), self.loop
        )
        self.url = future.result(timeout=10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.simulator.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds")


def delivered(
    message_id: str,
    recipients: list[str],
    at: datetime,
    classification: str = "phish",
    verdicts: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    event = {
        "id": str(uuid.uuid4()),
        "GUID": f"guid-{uuid.uuid4().hex[:16]}",
        "messageID": f"<{message_id}>",
        "messageTime": iso(at),
        "recipient": recipients,
        "sender": "billing@example.net",
        "subject": "Reported message",
        "threatsInfoMap": [
            {
                "threatID": uuid.uuid4().hex * 2,
                "campaignID": str(uuid.uuid4()),
                "classification": classification,
                "threat": f"http://billing-example.net/pay/{uuid.uuid4().hex[:8]}",
                "threatStatus": "active",
                "threatTime": iso(at),
                "threatType": "url",
            }
        ],
    }
    return {"type": "messagesDelivered", "event": event, "verdicts": verdicts or []}


@pytest.fixture
def tap_sim() -> Iterator[TapSimThread]:
    now = datetime.now(UTC)
    entries = [
        delivered(
            M4,
            ["frank@example.com"],
            now - timedelta(hours=3, minutes=20),
            classification="spam",
            verdicts=[
                {
                    "at": iso(now - timedelta(hours=1, minutes=10)),
                    "classification": "phish",
                }
            ],
        ),
        delivered(
            M1,
            ["alice@example.com", "bob@example.com", "carol@example.com"],
            now - timedelta(hours=2, minutes=30),
            verdicts=[
                {
                    "at": iso(now - timedelta(hours=1, minutes=40)),
                    "threatStatus": "cleared",
                }
            ],
        ),
        delivered(
            M5,
            ["erin@example.com"],
            now - timedelta(hours=2, minutes=50),
            verdicts=[
                {
                    "at": iso(now - timedelta(minutes=50)),
                    "threatStatus": "falsePositive",
                }
            ],
        ),
        delivered(M2, ["dave@example.com"], now - timedelta(hours=2)),
    ]
    scenario = TapScenario(principal=PRINCIPAL, secret=SECRET, events=entries)
    sim = TapSimThread(TapSimulator(scenario, TapSimSettings(burst_limit=0)))
    sim.start()
    yield sim
    sim.stop()


def tap_settings(settings: Settings, url: str) -> Settings:
    tap = TapSettings(
        enabled=True,
        url=url,
        principal=PRINCIPAL,
        secret=SECRET,
        poll_interval_seconds=1,
        lookback_hours=4,
    )
    return settings.model_copy(update={"tap": tap})


def read_outcomes(
    settings: Settings,
    done: Callable[[list[dict[str, Any]]], bool],
    timeout: float = 150,
) -> list[dict[str, Any]]:
    codec = AvroCodec("PullOutcome")
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"{settings.topic_prefix}reader-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([full_name(settings, "pull.outcomes")])
    outcomes: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    try:
        while not done(outcomes) and time.monotonic() < deadline:
            for message in consumer.consume(num_messages=100, timeout=0.5):
                if message.error() is None and message.value() is not None:
                    outcomes.append(codec.loads(message.value()))
    finally:
        consumer.close()
    return outcomes


KEPT = {("frank@example.com", M4), ("dave@example.com", M2)}
WITHDRAWN = {
    ("alice@example.com", M1),
    ("bob@example.com", M1),
    ("carol@example.com", M1),
    ("erin@example.com", M5),
}


def count(outcomes: list[dict[str, Any]], kind: str, status: str) -> Counter[Any]:
    return Counter(
        (o["mailbox"], o["message_id"])
        for o in outcomes
        if o["kind"] == kind and o["status"] == status
    )


def folders(graph_sim: Any, mailbox: str, message_id: str) -> list[tuple[str, bool]]:
    return sorted(
        (str(m["folder"]), bool(m["is_read"]))
        for m in graph_sim.messages(mailbox)
        if m["internet_message_id"] == f"<{message_id}>"
    )


def check_mailboxes(graph_sim: Any) -> None:
    assert folders(graph_sim, "alice@example.com", M1) == [("Inbox", False)]
    assert folders(graph_sim, "bob@example.com", M1) == [("Inbox", True)]
    assert folders(graph_sim, "carol@example.com", M1) == [("Projects", False)]
    assert folders(graph_sim, "erin@example.com", M5) == [("Inbox", True)]
    # The alert names only erin@, so frank's copy of M5 is never touched.
    assert folders(graph_sim, "frank@example.com", M5) == [("Deleted Items", True)]
    assert [f for f, _ in folders(graph_sim, "frank@example.com", M4)] == [
        HIDDEN_FOLDER
    ]
    assert [f for f, _ in folders(graph_sim, "dave@example.com", M2)] == [
        HIDDEN_FOLDER,
        HIDDEN_FOLDER,
    ]


def all_outcomes(settings: Settings) -> list[dict[str, Any]]:
    """Read pull.outcomes from its start to the end it has when the call starts."""
    return read_all(settings, "pull.outcomes", "PullOutcome")


def settled(settings: Settings, graph_sim: Any) -> list[dict[str, Any]]:
    """Wait until the kept copies are quarantined, every mailbox is final and
    every withdrawn copy that was quarantined has a restore outcome.

    A withdrawn verdict can reach the incident before or after the alert that
    called for the pull, because each poll window is a record of its own. Either
    way its copies end in their folders: restored, or never pulled.
    """
    deadline = time.monotonic() + 150
    while True:
        try:
            outcomes = all_outcomes(settings)
        except KafkaException:
            # The broker may still be electing partition leaders of new topics.
            time.sleep(1)
            continue
        pulled = count(outcomes, "quarantine", "quarantined")
        pulled += count(outcomes, "quarantine", "already_quarantined")
        try:
            assert set(pulled) >= KEPT
            check_mailboxes(graph_sim)
            check_outcomes(outcomes)
            return outcomes
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        time.sleep(1)


def check_outcomes(outcomes: list[dict[str, Any]], context: str = "") -> None:
    quarantined = count(outcomes, "quarantine", "quarantined")
    # A restore replayed after a crash that lost its outcome finds the copy back
    # in place and reports not_found, so either status shows a restore ran.
    restored = count(outcomes, "restore", "restored")
    restored += count(outcomes, "restore", "not_found")
    assert {pair: n for pair, n in quarantined.items() if n > 1} == {}, context
    assert set(quarantined) <= KEPT | WITHDRAWN, context
    for pair in KEPT:
        assert restored[pair] == 0, (pair, context)
    for pair in WITHDRAWN:
        if quarantined[pair]:
            assert restored[pair] >= 1, (pair, context)
    failed = [o for o in outcomes if o["status"] == "failed"]
    assert failed == [], context


def test_tap_late_verdict_pulls_withdrawn_restores(
    pipeline_settings: Settings,
    graph_sim: Any,
    start_worker: Any,
    tap_sim: TapSimThread,
) -> None:
    settings = tap_settings(pipeline_settings, tap_sim.url)
    ensure_topics(settings)
    start_worker(settings)

    outcomes = settled(settings, graph_sim)

    check_outcomes(outcomes)
    assert count(outcomes, "quarantine", "quarantined")[("frank@example.com", M4)] == 1
    assert [o for o in outcomes if o["status"] == "not_found"] == []


@pytest.mark.timeout(300)
def test_tap_worker_killed_restarted_pulls_once(
    pipeline_settings: Settings,
    graph_sim: Any,
    start_worker: Any,
    tap_sim: TapSimThread,
) -> None:
    seed = random.randrange(1_000_000)
    delay = random.Random(seed).uniform(0.0, 2.0)
    settings = tap_settings(pipeline_settings, tap_sim.url)
    ensure_topics(settings)

    # The kill comes at a random point after the first outcome, while the other
    # pulls, restores and polls are in flight.
    first = start_worker(settings)
    read_outcomes(settings, lambda outcomes: len(outcomes) >= 1)
    time.sleep(delay)
    first.kill()
    first.wait(timeout=10)
    start_worker(settings)

    outcomes = settled(settings, graph_sim)

    context = f"seed={seed} kill_after_seconds={delay:.2f}"
    # A command replayed after the kill finds its copy done: it reports
    # already_quarantined, or not_found for a restore, but nothing moves twice.
    check_outcomes(outcomes, context)
    evidence = Counter(
        m["internet_message_id"] for m in graph_sim.messages("quarantine@example.com")
    )
    for message_id in (M2, M4):
        assert evidence[f"<{message_id}>"] == 1, context
