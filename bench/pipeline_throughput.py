"""Benchmark alerts per second through the pipeline, and table recovery time.

On a running broker, the script writes `--alerts` generated TAP alerts (distinct
messages, one to three recipients each, spread over `--campaigns` campaigns, 200
by default) to a fresh
alerts.raw topic, then reads the same messages four ways, one after the other:

- passthrough: a confluent-kafka consumer that produces every value unchanged to
  another topic, the ceiling of a Python consume-and-produce loop,
- plain loop: a confluent-kafka consumer that does the per-alert work without
  Faust: decode the RawAlert, normalize, enrich from the same intelligence store,
  encode the EnrichedAlert and produce it,
- pipeline: an `autopull worker` process (RocksDB tables) running normalize,
  enrich, group, link, exposure and the incident agent's decisions. Its policy
  holds every copy, so no pull is attempted. The run ends when the worker's
  consumer group has committed the end offset of every topic up to
  incident.events. Faust commits every 2.8 seconds, so the pipeline's time is an
  upper bound by up to that much.
- Faust chain: `faust_chain.py`, a Faust worker with the worker's settings and
  the same hops per alert (normalize, enrich, group, link, one exposure per
  recipient, incident, trace), whose agents forward the bytes unchanged and keep
  no tables. It is the ceiling of the worker's topology on Faust, timed the same
  way as the pipeline.

Each way is reported in alerts per second and in alerts per CPU second of the
process doing the work, which depends less on what else the machine runs.

Then it writes `--recovery-keys` records to the changelog of the worker's ledger
table and times a worker with an empty data folder from its start until /readyz
reports the tables recovered, next to a worker whose changelog is empty.

Run: .venv/bin/python bench/pipeline_throughput.py --bootstrap 127.0.0.1:29150
(add --skip-recovery to measure alerts per second only).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
from confluent_kafka import (
    Consumer,
    ConsumerGroupTopicPartitions,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic

# The script's own folder is on sys.path when it runs as a script.
from faust_chain import RECIPIENTS_HEADER

from autopull.connectors.sources.detect import parse_alert
from autopull.schemas import AvroCodec
from autopull.streams.enrich import enrich
from autopull.streams.intel import load_intel
from autopull.streams.pipeline import known_format
from autopull.streams.records import utcnow
from autopull.streams.settings import Settings
from autopull.streams.topics import ensure_topics, full_name

REPO_ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = REPO_ROOT / "examples" / "alerts" / "tap-delivered-phish.json"
PEOPLE = 1000
PARTITIONS = 8
STAGE_TOPICS = (
    "alerts.raw",
    "alerts.normalized",
    "alerts.enriched",
    "alerts.grouped",
    "alerts.by_mailbox",
    "incident.events",
)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
HOLD_ALL_POLICY = """\
version: 1
rules:
  - name: bench.hold-everything
    action: hold
    reason: The benchmark holds every copy, so nothing is pulled.
"""


@dataclass(frozen=True)
class Measure:
    """Wall-clock and CPU seconds that one way of reading took for `count` alerts.

    CPU seconds are those of the process doing the work, all its threads included,
    so they depend less than wall-clock time on what else the machine runs.
    """

    count: int
    seconds: float
    cpu_seconds: float

    @property
    def rate(self) -> float:
        """Alerts per wall-clock second."""
        return self.count / self.seconds

    @property
    def cpu_rate(self) -> float:
        """Alerts per CPU second."""
        return self.count / self.cpu_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", required=True, help="Kafka host:port.")
    parser.add_argument("--alerts", type=int, default=20000, help="Alerts to send.")
    parser.add_argument(
        "--campaigns",
        type=int,
        default=200,
        help="Campaigns the alerts are spread over, so each incident collects "
        "alerts / campaigns alerts.",
    )
    parser.add_argument(
        "--recovery-keys", type=int, default=1_000_000, help="Ledger keys to recover."
    )
    parser.add_argument(
        "--skip-recovery",
        action="store_true",
        help="Measure alerts per second only, without the table recovery times.",
    )
    parser.add_argument(
        "--timeout", type=float, default=1800.0, help="Seconds each stage may take."
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="autopull-bench-"))
    try:
        run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path) -> None:
    print_machine()
    settings = bench_settings(args.bootstrap, work, "run")
    ensure_topics(settings)
    messages = encode_raw(generate_alerts(args.alerts, args.campaigns))
    source = create_topic(settings, "bench.source")
    produce(settings, source, messages)
    print(f"alerts: {len(messages):,} raw alerts")

    passthrough = run_passthrough(settings, source, len(messages), args.timeout)
    report("passthrough", passthrough)
    loop = asyncio.run(run_plain_loop(settings, source, len(messages), args.timeout))
    report("plain loop", loop)
    pipeline = run_pipeline(settings, work, messages, args.timeout)
    report("pipeline", pipeline)
    chain = run_faust_chain(args.bootstrap, work, messages, args.timeout)
    report("Faust chain", chain)
    print(
        f"pipeline / plain loop: {pipeline.rate / loop.rate:.3f} "
        f"(by CPU time {pipeline.cpu_rate / loop.cpu_rate:.3f})"
    )
    print(
        f"Faust chain / plain loop: {chain.rate / loop.rate:.3f} "
        f"(by CPU time {chain.cpu_rate / loop.cpu_rate:.3f})"
    )
    print(
        f"pipeline / Faust chain: {pipeline.rate / chain.rate:.3f} "
        f"(by CPU time {pipeline.cpu_rate / chain.cpu_rate:.3f})"
    )
    print(
        f"pipeline / passthrough: {pipeline.rate / passthrough.rate:.3f} "
        f"(by CPU time {pipeline.cpu_rate / passthrough.cpu_rate:.3f})"
    )
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    if args.skip_recovery:
        return

    empty = time_recovery(args.bootstrap, work, "empty", 0, args.timeout)
    print(f"worker start to ready, empty ledger changelog: {empty:.1f} s")
    full = time_recovery(
        args.bootstrap, work, "recovery", args.recovery_keys, args.timeout
    )
    print(
        f"worker start to ready, {args.recovery_keys:,} ledger keys: {full:.1f} s "
        f"({full - empty:.1f} s more than empty)"
    )


def print_machine() -> None:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    print(
        f"machine: {model}, {os.cpu_count()} CPUs, {memory:.0f} GiB, Python "
        f"{platform.python_version()}, load average {os.getloadavg()[0]:.1f}"
    )


def bench_settings(bootstrap: str, work: Path, name: str) -> Settings:
    prefix = f"bench{uuid.uuid4().hex[:8]}{name}."
    policy = work / "policy.yaml"
    policy.write_text(HOLD_ALL_POLICY)
    feed = work / "feed.txt"
    if not feed.exists():
        write_feed(feed)
    return Settings(
        kafka_bootstrap=bootstrap,
        topic_prefix=prefix,
        topic_partitions=PARTITIONS,
        store="rocksdb://",
        data_dir=work / f"data-{name}",
        web_port=free_port(),
        policy={"file": policy},
        intel={"feeds": [{"path": feed, "kind": "host", "confidence": 80}]},
    )


def write_feed(path: Path) -> None:
    # 10,000 hosts. Each campaign uses one in its URLs, so every alert has a hit.
    hosts = [f"pay{index}.billing-example.net" for index in range(10_000)]
    path.write_text("\n".join(hosts) + "\n")


def generate_alerts(count: int, campaigns: int) -> list[bytes]:
    template = json.loads(TEMPLATE.read_text())
    event = template["messagesDelivered"][0]
    rng = random.Random(7)
    bodies = []
    for index in range(count):
        campaign = index % campaigns
        item = copy.deepcopy(event)
        item["id"] = str(uuid.UUID(int=rng.getrandbits(128)))
        item["GUID"] = f"bench{index:010d}"
        item["messageID"] = f"<bench-{index}@billing-example.net>"
        recipients = rng.sample(range(PEOPLE), rng.randint(1, 3))
        item["recipient"] = [f"user{person}@example.com" for person in recipients]
        threat = item["threatsInfoMap"][0]
        threat["campaignID"] = f"bench-campaign-{campaign}"
        host = f"pay{campaign * 10 % 10_000}.billing-example.net"
        threat["threat"] = f"http://{host}/pay/{index}"
        document = {
            "queryEndTime": template["queryEndTime"],
            "messagesDelivered": [item],
        }
        bodies.append(json.dumps(document).encode())
    return bodies


Message = tuple[str, bytes, list[tuple[str, bytes]]]


def encode_raw(bodies: list[bytes]) -> list[Message]:
    """Return each body as an encoded RawAlert with its key, as ingest sends it.

    The header bench-recipients gives the alert's recipient count to the Faust
    chain, whose agents do not decode; the pipeline ignores it.
    """
    codec = AvroCodec("RawAlert")
    messages = []
    for index, body in enumerate(bodies):
        recipients = len(json.loads(body)["messagesDelivered"][0]["recipient"])
        headers = [(RECIPIENTS_HEADER, str(recipients).encode())]
        record = {
            "source": "tap",
            "source_alert_id": f"bench-{index}",
            "received_at": utcnow(),
            "content_type": "application/json",
            "transport": {"transport": "bench"},
            "body": body,
        }
        messages.append((f"tap:bench-{index}", codec.dumps(record), headers))
    return messages


def produce(settings: Settings, topic: str, messages: list[Message]) -> None:
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "acks": "all"})
    for key, value, headers in messages:
        producer.produce(topic, key=key, value=value, headers=headers)
        producer.poll(0)
    producer.flush(60)


def consumer(settings: Settings, group: str) -> Consumer:
    return Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"{settings.topic_prefix}{group}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": True,
        }
    )


def create_topic(settings: Settings, name: str) -> str:
    topic = full_name(settings, name)
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    futures = admin.create_topics([NewTopic(topic, PARTITIONS, 1)])
    for future in futures.values():
        future.result()
    return topic


def run_passthrough(
    settings: Settings, topic: str, count: int, timeout: float
) -> Measure:
    output = create_topic(settings, "bench.passthrough")
    source = consumer(settings, "passthrough")
    source.subscribe([topic])
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "acks": "all"})
    seen = 0
    started = None
    cpu_started = time.process_time()
    deadline = time.monotonic() + timeout
    while seen < count and time.monotonic() < deadline:
        for message in source.consume(500, timeout=1.0):
            if message.error():
                continue
            if started is None:
                started, cpu_started = time.monotonic(), time.process_time()
            producer.produce(output, key=message.key(), value=message.value())
            producer.poll(0)
            seen += 1
    producer.flush(60)
    elapsed = time.monotonic() - (started or time.monotonic())
    cpu = time.process_time() - cpu_started
    source.close()
    return Measure(count, elapsed, cpu)


async def run_plain_loop(
    settings: Settings, topic: str, count: int, seconds: float
) -> Measure:
    output = create_topic(settings, "bench.enriched")
    intel = load_intel(settings)
    raw_codec = AvroCodec("RawAlert")
    enriched_codec = AvroCodec("EnrichedAlert")
    source = consumer(settings, "loop")
    source.subscribe([topic])
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "acks": "all"})

    seen = 0
    started = None
    cpu_started = time.process_time()
    deadline = time.monotonic() + seconds
    while seen < count and time.monotonic() < deadline:
        for message in source.consume(500, timeout=1.0):
            if message.error():
                continue
            if started is None:
                started, cpu_started = time.monotonic(), time.process_time()
            raw = raw_codec.loads(message.value())
            alerts = parse_alert(
                raw["body"],
                received_at=raw["received_at"],
                format_name=known_format(raw["source"]),
            )
            for alert in alerts:
                enriched = await enrich(dict(alert), None, intel)
                value = enriched_codec.dumps(enriched)
                producer.produce(output, key=enriched["campaign_key"], value=value)
                producer.poll(0)
            seen += 1

    producer.flush(60)
    elapsed = time.monotonic() - (started or time.monotonic())
    cpu = time.process_time() - cpu_started
    source.close()
    return Measure(count, elapsed, cpu)


def worker_environment(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "AUTOPULL_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
            "AUTOPULL_TOPIC_PREFIX": settings.topic_prefix,
            "AUTOPULL_TOPIC_PARTITIONS": str(settings.topic_partitions),
            "AUTOPULL_STORE": settings.store,
            "AUTOPULL_DATA_DIR": str(settings.data_dir),
            "AUTOPULL_WEB_PORT": str(settings.web_port),
            "AUTOPULL_POLICY__FILE": str(settings.policy.file),
            "AUTOPULL_INTEL__FEEDS": json.dumps(
                [
                    {"path": str(feed.path), "kind": feed.kind, "confidence": 80}
                    for feed in settings.intel.feeds
                ]
            ),
            "AUTOPULL_LOG_LEVEL": "WARNING",
            "AUTOPULL_SESSION_TIMEOUT_SECONDS": "10",
        }
    )
    return env


def start_worker(
    settings: Settings, log: Path, command: list[str] | None = None
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        command or [sys.executable, "-m", "autopull.streams.cli", "worker"],
        env=worker_environment(settings),
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )


def wait_ready(
    settings: Settings, process: subprocess.Popen[bytes], timeout: float
) -> None:
    url = f"http://127.0.0.1:{settings.web_port}/readyz"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"The worker exited with code {process.returncode}.")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"The worker was not ready within {timeout} s.")


def stop_worker(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def run_pipeline(
    settings: Settings, work: Path, messages: list[Message], timeout: float
) -> Measure:
    """Time an `autopull worker` over `messages`."""
    command = [sys.executable, "-m", "autopull.streams.cli", "worker"]
    return run_worker_process(settings, work, messages, timeout, command, "run")


def run_faust_chain(
    bootstrap: str, work: Path, messages: list[Message], timeout: float
) -> Measure:
    """Time the Faust chain of `faust_chain.py` over `messages`, on its own topics."""
    settings = bench_settings(bootstrap, work, "chain")
    ensure_topics(settings)
    command = [sys.executable, str(Path(__file__).with_name("faust_chain.py"))]
    return run_worker_process(settings, work, messages, timeout, command, "chain")


def run_worker_process(
    settings: Settings,
    work: Path,
    messages: list[Message],
    timeout: float,
    command: list[str],
    name: str,
) -> Measure:
    # The worker starts on an empty alerts.raw, so its start is not timed.
    log = work / f"worker-{name}.log"
    process = start_worker(settings, log, command)
    try:
        wait_ready(settings, process, timeout)
        started = time.monotonic()
        cpu_started = process_cpu_seconds(process.pid)
        produce(settings, full_name(settings, "alerts.raw"), messages)
        wait_for_commits(settings, len(messages), timeout)
        elapsed = time.monotonic() - started
        cpu = process_cpu_seconds(process.pid) - cpu_started
    finally:
        stop_worker(process)
    rejoins = log.read_text(errors="replace").count("re-joining group")
    if rejoins:
        # A worker starved of CPU misses heartbeats, leaves its group and
        # processes again what it had not committed, so the run did more work.
        print(f"pipeline worker: {rejoins} missed heartbeats made it rejoin")
    return Measure(len(messages), elapsed, cpu)


def process_cpu_seconds(pid: int) -> float:
    """Return the user and system CPU seconds of process `pid`, all threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    # utime and stime are fields 14 and 15 of proc(5), in clock ticks.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def wait_for_commits(settings: Settings, count: int, timeout: float) -> None:
    """Wait until the worker committed the end offset of every stage topic.

    The end offsets must also be stable between two checks, and incident.events
    must contain at least `count` records, so a stage that has not produced yet
    cannot look done.
    """
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    probe = consumer(settings, "probe")
    group = settings.faust_id
    partitions = [
        TopicPartition(full_name(settings, topic), partition)
        for topic in STAGE_TOPICS
        for partition in range(PARTITIONS)
    ]
    deadline = time.monotonic() + timeout
    previous: dict[tuple[str, int], int] = {}
    while time.monotonic() < deadline:
        time.sleep(0.5)
        ends = {
            (tp.topic, tp.partition): probe.get_watermark_offsets(tp, timeout=5)[1]
            for tp in partitions
        }
        request = [ConsumerGroupTopicPartitions(group, partitions)]
        result = admin.list_consumer_group_offsets(request)[group].result()
        committed = {
            (tp.topic, tp.partition): max(tp.offset, 0)
            for tp in result.topic_partitions
        }
        done = all(committed.get(key, 0) >= end for key, end in ends.items())
        events = full_name(settings, "incident.events")
        produced = sum(end for (topic, _), end in ends.items() if topic == events)
        if done and ends == previous and produced >= count:
            probe.close()
            return
        previous = ends
    probe.close()
    raise TimeoutError("The pipeline did not commit every stage topic in time.")


def time_recovery(
    bootstrap: str, work: Path, name: str, keys: int, timeout: float
) -> float:
    settings = bench_settings(bootstrap, work, name)
    ensure_topics(settings)
    changelog = f"{settings.faust_id}-ledger-changelog"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    config = {"cleanup.policy": "compact"}
    for future in admin.create_topics(
        [NewTopic(changelog, PARTITIONS, 1, config=config)]
    ).values():
        future.result()
    producer = Producer(
        {"bootstrap.servers": bootstrap, "linger.ms": 50, "batch.size": 1_000_000}
    )
    for index in range(keys):
        key = json.dumps(
            f"user{index % PEOPLE}@example.com\x1fbench-{index}@example.net"
        )
        value = json.dumps(
            {
                "status": "quarantined",
                "incident_id": f"INC-{index % 5000:012d}",
                "original_folder": "Inbox",
                "read": False,
                "at": 1764580000.0 + index,
            }
        )
        try:
            producer.produce(
                changelog, key=key, value=value, partition=index % PARTITIONS
            )
        except BufferError:
            # The local queue is full (100,000 records by default): wait for
            # deliveries, then queue the record again.
            producer.flush(60)
            producer.produce(
                changelog, key=key, value=value, partition=index % PARTITIONS
            )
        if index % 10000 == 0:
            producer.poll(0)
    producer.flush(300)

    process = start_worker(settings, work / f"worker-{name}.log")
    try:
        started = time.monotonic()
        wait_ready(settings, process, timeout)
        return time.monotonic() - started
    finally:
        stop_worker(process)


def report(name: str, measure: Measure) -> None:
    print(
        f"{name}: {measure.rate:,.0f} alerts/s ({measure.seconds:.1f} s for "
        f"{measure.count:,}), {measure.cpu_rate:,.0f} alerts per CPU second"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


if __name__ == "__main__":
    main()
