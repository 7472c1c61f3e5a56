"""Time one alert to tens of thousands of recipients through a worker.

On a running broker, the script starts an `autopull worker` (RocksDB tables, a
policy that holds every copy) on fresh topics. Once it is ready, it sends one
generic alert to `--recipients` mailboxes and then a generic alert to one
mailbox, and reports:

- when the incident of each alert appeared on the incidents topic, counted from
  the first send;
- when the worker's group had committed the end offset of every stage topic;
- the CPU seconds of the worker over that time;
- the longest stall of the worker's event loop, which is the largest drift that
  the timers of mode (Faust's service library) logged;
- how often the worker rejoined its group after it was dropped from it;
- with `--profile FILE`, a py-spy profile of the worker, summed per agent.

Run: .venv/bin/python bench/huge_alert.py --bootstrap 127.0.0.1:29204
(py-spy must be installed in the virtual environment for `--profile`).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from confluent_kafka import Consumer

# The script's own folder is on sys.path when it runs as a script.
from pipeline_throughput import (
    HOLD_ALL_POLICY,
    PARTITIONS,
    free_port,
    print_machine,
    process_cpu_seconds,
    stop_worker,
    wait_for_commits,
    wait_ready,
    worker_environment,
)

from autopull.schemas import AvroCodec
from autopull.streams.ingest import Input, RawSender, raw_alert
from autopull.streams.settings import Settings
from autopull.streams.topics import ensure_topics, full_name

HUGE_MESSAGE_ID = "huge@evil.example"
SMALL_MESSAGE_ID = "small@evil.example"
# mode 0.4 logs "Timer NAME woke up too late, with a drift of +SECONDS ...".
DRIFT = re.compile(r"woke up too late, with a drift of \+([0-9.]+)")
REJOIN = "re-joining group"
AGENT_FRAME = re.compile(r"_(\w+)_agent\.<locals>")
# Frames of work that an agent runs in a worker thread, whose stack lacks the agent.
THREAD_WORK = {"parse_alert": "normalize", "AvroTable.encode": "incident"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", required=True, help="Kafka host:port.")
    parser.add_argument(
        "--recipients", type=int, default=45_000, help="Recipients of the alert."
    )
    parser.add_argument(
        "--session-timeout",
        type=float,
        default=20.0,
        help="Kafka session timeout of the worker, in seconds.",
    )
    parser.add_argument(
        "--profile", type=Path, help="Write py-spy's raw samples of the worker here."
    )
    parser.add_argument(
        "--timeout", type=float, default=900.0, help="Seconds each wait may take."
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="autopull-bench-"))
    try:
        run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path) -> None:
    print_machine()
    settings = bench_settings(args.bootstrap, work)
    ensure_topics(settings)
    huge = generic_alert(HUGE_MESSAGE_ID, recipients(args.recipients))
    small = generic_alert(SMALL_MESSAGE_ID, ["alice@example.com"])
    print(f"alert: {args.recipients:,} recipients, {len(huge):,} bytes")

    env = worker_environment(settings)
    env["AUTOPULL_LOG_LEVEL"] = "INFO"
    env["AUTOPULL_SESSION_TIMEOUT_SECONDS"] = str(args.session_timeout)
    log = work / "worker.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "autopull.streams.cli", "worker"],
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    profiler = None
    try:
        wait_ready(settings, process, args.timeout)
        if args.profile is not None:
            profiler = start_profiler(process.pid, args.profile)
        started = time.monotonic()
        cpu_started = process_cpu_seconds(process.pid)
        sender = RawSender(settings)
        sender.send(raw_alert(Input("huge.json", huge), None, "generic"))
        sender.send(raw_alert(Input("small.json", small), None, "generic"))
        sender.flush()
        appeared = wait_for_incidents(settings, started, args.timeout)
        wait_for_commits(settings, 2, args.timeout)
        elapsed = time.monotonic() - started
        cpu = process_cpu_seconds(process.pid) - cpu_started
    finally:
        if profiler is not None:
            profiler.send_signal(signal.SIGINT)
            profiler.wait(timeout=60)
        stop_worker(process)

    text = log.read_text(errors="replace")
    drifts = [float(value) for value in DRIFT.findall(text)]
    print(f"small alert's incident after {appeared[SMALL_MESSAGE_ID]:.1f} s")
    print(f"huge alert's incident after {appeared[HUGE_MESSAGE_ID]:.1f} s")
    print(f"every stage topic committed after {elapsed:.1f} s")
    print(f"worker CPU: {cpu:.1f} s")
    print(f"longest event-loop stall: {max(drifts, default=0.0):.1f} s")
    print(f"rejoins after being dropped from the group: {text.count(REJOIN)}")
    if args.profile is not None:
        print_profile(args.profile)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


def bench_settings(bootstrap: str, work: Path) -> Settings:
    policy = work / "policy.yaml"
    policy.write_text(HOLD_ALL_POLICY)
    return Settings(
        kafka_bootstrap=bootstrap,
        topic_prefix=f"bench{uuid.uuid4().hex[:8]}huge.",
        topic_partitions=PARTITIONS,
        store="rocksdb://",
        data_dir=work / "data",
        web_port=free_port(),
        policy={"file": policy},
    )


def recipients(count: int) -> list[str]:
    return [f"u{number:05d}@example.com" for number in range(count)]


def generic_alert(message_id: str, mailboxes: list[str]) -> bytes:
    alert = {
        "json_version": "2.0",
        "classification": "phish",
        "email": {"message_id": f"<{message_id}>", "recipient": mailboxes},
    }
    return json.dumps(alert).encode()


def wait_for_incidents(
    settings: Settings, started: float, timeout: float
) -> dict[str, float]:
    """Return the seconds from `started` until each alert's incident appeared."""
    codec = AvroCodec("Incident")
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"{settings.topic_prefix}incidents-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([full_name(settings, "incidents")])
    appeared: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(appeared) < 2:
            if time.monotonic() > deadline:
                raise TimeoutError("The incidents did not appear in time.")
            for message in consumer.consume(num_messages=10, timeout=0.2):
                if message.error() is not None or message.value() is None:
                    continue
                at = time.monotonic() - started
                for message_id in codec.loads(message.value())["message_ids"]:
                    appeared.setdefault(message_id, at)
    finally:
        consumer.close()
    return appeared


def start_profiler(pid: int, output: Path) -> subprocess.Popen[bytes]:
    py_spy = Path(sys.executable).with_name("py-spy")
    command = [str(py_spy), "record", "--pid", str(pid), "--rate", "20"]
    command += ["--format", "raw", "--output", str(output)]
    return subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def print_profile(path: Path) -> None:
    """Print the seconds of py-spy samples (at 20 Hz) per agent of the worker."""
    seconds: collections.Counter[str] = collections.Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if "select" in frames[-1]:
            name = "event loop idle"
        else:
            agents = [m.group(1) for f in frames if (m := AGENT_FRAME.search(f))]
            agents += [
                agent
                for frame in frames
                for function, agent in THREAD_WORK.items()
                if frame.startswith(f"{function} ")
            ]
            name = f"{agents[0]} agent" if agents else "other (Faust, aiokafka)"
        seconds[name] += int(count) / 20
    for name, value in seconds.most_common():
        print(f"  profile: {name}: {value:.1f} s")


if __name__ == "__main__":
    main()
