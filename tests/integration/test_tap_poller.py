"""The TAP poller in `autopull worker` processes, against the TAP simulator.

The simulator runs in this process on a free port, with its clock on real time, so
the worker's clock and the simulator's agree. Scenario times are relative to the
start of each test. Pull commands have no mail platform to go to here, which does
not matter: the tests count the commands, not their outcomes.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource

from autopull.schemas import AvroCodec
from autopull.sim.tap import TapScenario, TapSimSettings, TapSimulator

pytestmark = pytest.mark.integration

PRINCIPAL = "svc-autopull-test"
SECRET = "tap-simulator-secret"
PARTITIONS = 2
OVERLAP = timedelta(minutes=30)
LOOKBACK_MARGIN = timedelta(minutes=5)

WorkerFactory = Callable[..., subprocess.Popen[bytes]]


# --- the simulator --------------------------------------------------------------------


class SimThread:
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

    def requests(self) -> list[dict[str, Any]]:
        """Return the SIEM request log from the admin API."""
        response = httpx.get(f"{self.url}/_sim/requests", timeout=10)
        response.raise_for_status()
        entries: list[dict[str, Any]] = response.json()
        return entries

    def add_events(self, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Add scenario entries through the admin API; return their summaries."""
        response = httpx.post(
            f"{self.url}/_sim/events", json={"events": entries}, timeout=10
        )
        response.raise_for_status()
        added: list[dict[str, Any]] = response.json()
        return added

    def event_ids(self) -> list[str]:
        """Return the id of every event served, verdict changes included."""
        response = httpx.get(f"{self.url}/_sim/events", timeout=10)
        response.raise_for_status()
        return [event["id"] for event in response.json()]


SimFactory = Callable[..., SimThread]


@pytest.fixture
def tap_sim() -> Iterator[SimFactory]:
    """Return a function that starts a simulator over scenario entries."""
    started: list[SimThread] = []

    def start(entries: list[dict[str, Any]], **settings: Any) -> SimThread:
        scenario = TapScenario(principal=PRINCIPAL, secret=SECRET, events=entries)
        sim = SimThread(TapSimulator(scenario, TapSimSettings(**settings)))
        sim.start()
        started.append(sim)
        return sim

    yield start
    for sim in started:
        sim.stop()


# --- the worker -----------------------------------------------------------------------


@pytest.fixture
def start_worker(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> Iterator[WorkerFactory]:
    """Return a function that starts a worker polling `url`; all stop at the end."""
    processes: list[subprocess.Popen[bytes]] = []

    def start(url: str, **tap: str) -> subprocess.Popen[bytes]:
        environment = {
            **os.environ,
            "AUTOPULL_KAFKA_BOOTSTRAP": kafka_bootstrap,
            "AUTOPULL_TOPIC_PREFIX": topic_prefix,
            "AUTOPULL_TOPIC_PARTITIONS": str(PARTITIONS),
            "AUTOPULL_STORE": "memory://",
            "AUTOPULL_DATA_DIR": str(tmp_path / "worker"),
            "AUTOPULL_WEB_ENABLED": "false",
            "AUTOPULL_SESSION_TIMEOUT_SECONDS": "6",
            "AUTOPULL_TAP__ENABLED": "true",
            "AUTOPULL_TAP__URL": url,
            "AUTOPULL_TAP__PRINCIPAL": PRINCIPAL,
            "AUTOPULL_TAP__SECRET": SECRET,
            "AUTOPULL_TAP__POLL_INTERVAL_SECONDS": "1",
        }
        environment.update({f"AUTOPULL_TAP__{k.upper()}": v for k, v in tap.items()})
        environment.pop("AUTOPULL_CONFIG", None)
        log = (tmp_path / f"worker-{len(processes)}.log").open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "autopull.streams.cli", "worker"],
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        processes.append(process)
        return process

    yield start
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# --- scenario and topics --------------------------------------------------------------


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds")


def parse(text: str) -> datetime:
    return datetime.fromisoformat(text)


def phish(number: int, at: datetime, **extra: Any) -> dict[str, Any]:
    """A delivered phish to one mailbox of its own, created at `at`."""
    event = {
        "id": str(uuid.uuid4()),
        "GUID": f"guid-{number}-{uuid.uuid4().hex[:12]}",
        "messageID": f"<tap-test-{number}@billing-example.net>",
        "messageTime": iso(at),
        "recipient": [f"user{number}@example.com"],
        "sender": "billing@example.net",
        "subject": f"Invoice {number}",
        "threatsInfoMap": [
            {
                "threatID": uuid.uuid4().hex * 2,
                "campaignID": str(uuid.uuid4()),
                "classification": "phish",
                "threat": f"http://billing-example.net/pay/{number}",
                "threatStatus": "active",
                "threatTime": iso(at),
                "threatType": "url",
            }
        ],
    }
    return {"type": "messagesDelivered", "event": event, **extra}


def mailbox_of(entry: dict[str, Any]) -> tuple[str, str]:
    event = entry["event"]
    return event["recipient"][0], event["messageID"].strip("<>")


def read_records(bootstrap: str, topic: str, record: str) -> list[dict[str, Any]]:
    """Read every record of `topic` up to the end it has when the call starts."""
    codec = AvroCodec(record)
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
        }
    )
    partitions = [TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(PARTITIONS)]

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


def cursor_records(bootstrap: str, topic: str) -> list[dict[str, Any]]:
    """Read the JSON cursor records of the one-partition cursor topic."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
        }
    )
    partition = TopicPartition(topic, 0, OFFSET_BEGINNING)
    _, high = consumer.get_watermark_offsets(partition, timeout=10)
    consumer.assign([partition])
    records: list[dict[str, Any]] = []
    deadline = time.monotonic() + 30
    try:
        while len(records) < high and time.monotonic() < deadline:
            for message in consumer.consume(num_messages=500, timeout=0.5):
                if message.error() is None:
                    records.append(json.loads(message.value()))
    finally:
        consumer.close()
    return records


def topic_layout(bootstrap: str, topic: str) -> tuple[int, str]:
    """Return the partition count and cleanup policy of `topic`."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    partitions = len(admin.list_topics(topic, timeout=10).topics[topic].partitions)
    resource = ConfigResource(ConfigResource.Type.TOPIC, topic)
    config = admin.describe_configs([resource])[resource].result(timeout=10)
    return partitions, config["cleanup.policy"].value


def wait_for(
    condition: Callable[[], bool], *, timeout: float, description: str
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"Timed out after {timeout} s waiting for {description}.")
        time.sleep(0.5)


def served(sim: SimThread) -> list[dict[str, Any]]:
    """Return the SIEM requests that succeeded (200), in order."""
    return [entry for entry in sim.requests() if entry["status"] == 200]


def caught_up(sim: SimThread, moment: datetime, after: int = 0) -> bool:
    """Tell whether a request after sequence `after` read up to `moment`."""
    return any(
        entry["seq"] > after and parse(entry["window_end"]) >= moment
        for entry in served(sim)
    )


def first_poll(entries: list[dict[str, Any]], moment: datetime) -> list[dict[str, Any]]:
    """Return the windows of the first poll: from the first one to `moment`."""
    windows = []
    for entry in entries:
        windows.append(entry)
        if parse(entry["window_end"]) >= moment:
            break
    return windows


def polls_after(sim: SimThread, seq: int) -> int:
    return sum(1 for entry in served(sim) if entry["seq"] > seq)


def normalized_ids(bootstrap: str, prefix: str) -> Counter[str]:
    alerts = read_records(bootstrap, f"{prefix}alerts.normalized", "NormalizedAlert")
    return Counter(alert["alert_id"] for alert in alerts)


def pulled(bootstrap: str, prefix: str) -> Counter[tuple[str, str]]:
    commands = read_records(bootstrap, f"{prefix}pull.commands", "PullCommand")
    return Counter((command["mailbox"], command["message_id"]) for command in commands)


def wait_for_alerts(
    bootstrap: str, prefix: str, expected: set[str], timeout: float = 60
) -> Counter[str]:
    seen: Counter[str] = Counter()

    def arrived() -> bool:
        seen.clear()
        seen.update(normalized_ids(bootstrap, prefix))
        return expected <= set(seen)

    wait_for(arrived, timeout=timeout, description=f"{len(expected)} alerts")
    return seen


# --- tests ----------------------------------------------------------------------------


@pytest.mark.timeout(150)
def test_catch_up_reads_seven_days_in_hour_windows(
    kafka_bootstrap: str,
    topic_prefix: str,
    tap_sim: SimFactory,
    start_worker: WorkerFactory,
) -> None:
    started = datetime.now(UTC)
    daily = [
        phish(day, started - timedelta(days=day, hours=3, minutes=17))
        for day in range(7)
    ]
    # A late verdict: the same message, cleared as a false positive two hours later.
    verdict_at = started - timedelta(hours=28, minutes=10)
    verdict = phish(
        7,
        verdict_at - timedelta(hours=2),
        verdicts=[{"at": iso(verdict_at), "threatStatus": "falsePositive"}],
    )
    # Inside the overlap, so that every later poll reads it again.
    recent = phish(8, started - timedelta(minutes=10))
    entries = [*daily, verdict, recent]
    sim = tap_sim(entries, burst_limit=40)

    start_worker(sim.url)
    wait_for(
        lambda: caught_up(sim, started),
        timeout=90,
        description="the catch-up to reach the start of the test",
    )

    log = sim.requests()
    assert [entry for entry in log if entry["status"] not in (200, 429)] == []
    windows = first_poll(served(sim), started)
    first = windows[0]
    lookback = parse(first["at"]) - parse(first["window_start"])
    assert timedelta(days=7) - LOOKBACK_MARGIN <= lookback
    assert lookback < timedelta(days=7) - LOOKBACK_MARGIN + timedelta(seconds=10)
    for entry in windows:
        span = parse(entry["window_end"]) - parse(entry["window_start"])
        assert timedelta(seconds=30) <= span <= timedelta(hours=1), entry
    for previous, following in itertools.pairwise(windows):
        assert following["window_start"] == previous["window_end"], following
    assert parse(windows[-1]["window_end"]) >= started
    assert len(windows) == 168

    cursor_topic = f"{topic_prefix}sources.cursors"
    assert topic_layout(kafka_bootstrap, cursor_topic) == (1, "compact")
    cursors = cursor_records(kafka_bootstrap, cursor_topic)
    assert len(cursors) >= len(windows)
    assert {record["source"] for record in cursors} == {"tap"}
    assert parse(cursors[-1]["query_end_time"]) >= started

    expected = {f"tap:{event_id}" for event_id in sim.event_ids()}
    assert len(expected) == len(entries) + 1
    wait_for_alerts(kafka_bootstrap, topic_prefix, expected)

    alerts = read_records(
        kafka_bootstrap, f"{topic_prefix}alerts.normalized", "NormalizedAlert"
    )
    guid = verdict["event"]["GUID"]
    statuses = {
        alert["threat_status"] for alert in alerts if alert["source_guid"] == guid
    }
    assert statuses == {"active", "false_positive"}

    # Five more polls have read the recent event again.
    last_catch_up = windows[-1]["seq"]
    wait_for(
        lambda: polls_after(sim, last_catch_up) >= 5,
        timeout=30,
        description="five more polls",
    )
    expected_pulls = {mailbox_of(entry) for entry in entries}
    wait_for(
        lambda: set(pulled(kafka_bootstrap, topic_prefix)) >= expected_pulls,
        timeout=60,
        description="a pull command for every mailbox",
    )
    commands = pulled(kafka_bootstrap, topic_prefix)
    assert set(commands) == expected_pulls
    assert {key: n for key, n in commands.items() if n > 1} == {}


@pytest.mark.timeout(120)
def test_event_indexed_late_inside_overlap_is_read(
    kafka_bootstrap: str,
    topic_prefix: str,
    tap_sim: SimFactory,
    start_worker: WorkerFactory,
) -> None:
    started = datetime.now(UTC)
    earlier = phish(1, started - timedelta(minutes=40))
    sim = tap_sim([earlier], burst_limit=0)
    start_worker(sim.url, lookback_hours="1")
    wait_for(
        lambda: caught_up(sim, started),
        timeout=60,
        description="the first poll to reach the start of the test",
    )

    # Created ten minutes ago but visible only now, after its window was read.
    created = datetime.now(UTC) - timedelta(minutes=10)
    late = phish(2, created)
    [summary] = sim.add_events([late])
    added_after = sim.requests()[-1]["seq"]
    read_before = [
        entry
        for entry in served(sim)
        if entry["seq"] <= added_after
        and parse(entry["window_start"]) <= created < parse(entry["window_end"])
    ]
    assert read_before, "no poll read the late event's window before it was indexed"

    wait_for_alerts(kafka_bootstrap, topic_prefix, {f"tap:{summary['id']}"})
    wait_for(
        lambda: polls_after(sim, added_after) >= 4,
        timeout=30,
        description="four polls after the late event",
    )
    commands = pulled(kafka_bootstrap, topic_prefix)
    assert commands[mailbox_of(late)] == 1
    assert commands[mailbox_of(earlier)] == 1
    first_read = next(
        entry
        for entry in served(sim)
        if entry["seq"] > added_after and entry["events"] > 0
    )
    assert parse(first_read["window_start"]) <= created


@pytest.mark.timeout(180)
def test_worker_killed_during_catch_up_loses_nothing(
    kafka_bootstrap: str,
    topic_prefix: str,
    tap_sim: SimFactory,
    start_worker: WorkerFactory,
) -> None:
    seed = random.randrange(1_000_000)
    chooser = random.Random(seed)
    started = datetime.now(UTC)
    entries = [
        phish(number, started - timedelta(seconds=chooser.uniform(60, 6.9 * 86400)))
        for number in range(30)
    ]
    # Each request takes 25 ms, so the catch-up lasts long enough to be cut.
    sim = tap_sim(entries, burst_limit=0, latency_ms=25)

    first = start_worker(sim.url)
    wait_for(lambda: bool(served(sim)), timeout=60, description="the first window")
    delay = chooser.uniform(0.1, 3.0)
    time.sleep(delay)
    first.kill()
    first.wait(timeout=10)
    cut = sim.requests()[-1]["seq"]
    context = f"seed={seed} kill_after_seconds={delay:.2f} requests={cut}"
    assert not caught_up(sim, started), (
        f"the worker finished before the kill: {context}"
    )

    sent = cursor_records(kafka_bootstrap, f"{topic_prefix}sources.cursors")
    changelog = f"{topic_prefix.rstrip('.')}-source_cursors-changelog"
    stored = cursor_records(kafka_bootstrap, changelog)
    assert sent, f"no window was acknowledged before the kill: {context}"

    start_worker(sim.url)
    wait_for(
        lambda: caught_up(sim, started, after=cut),
        timeout=90,
        description=f"the restarted worker to catch up ({context})",
    )

    # The restart resumes from the recovered table, never past the last window sent.
    resumed = next(entry for entry in served(sim) if entry["seq"] > cut)
    resumed_start = parse(resumed["window_start"])
    last_sent = parse(sent[-1]["query_end_time"])
    assert resumed_start <= last_sent - OVERLAP, context
    if stored:
        last_stored = parse(stored[-1]["query_end_time"])
        assert resumed_start >= last_stored - OVERLAP, context

    expected = {f"tap:{event_id}" for event_id in sim.event_ids()}
    wait_for_alerts(kafka_bootstrap, topic_prefix, expected)
    expected_pulls = {mailbox_of(entry) for entry in entries}
    wait_for(
        lambda: set(pulled(kafka_bootstrap, topic_prefix)) >= expected_pulls,
        timeout=60,
        description=f"a pull command for every mailbox ({context})",
    )
    commands = pulled(kafka_bootstrap, topic_prefix)
    assert set(commands) == expected_pulls, context
    assert {key: n for key, n in commands.items() if n > 1} == {}, context
