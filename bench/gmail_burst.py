"""Benchmark a Gmail quarantine burst: one campaign in ten thousand mailboxes.

Builds a Google Workspace domain in which every user mailbox contains one unread copy
of one campaign message in its inbox, and quarantines all of them with
`GmailPlatform.quarantine_many`, which sends the steps of every pull as phases of
HTTP batches. The Gmail simulator adds a fixed latency to every API request, and
the parts of one batch wait it at the same time. It applies Gmail's per-user
limits: 15,000 quota units a minute, each method's units from Gmail's usage-limits
page, and 10 requests in flight per user.

The simulator and the adapter share one event loop on the virtual clock
(`autopull.sim.clock`), so durations are those that the latency and the limits
allow for the requests the adapter sends, not the CPU time of this machine, which
the script reports beside them. The adapter's requests run on threads
(google-api-python-client is synchronous). The clock jumps only when every thread
waits for a response the simulator is holding back, so the threads' CPU time never
counts as latency, however loaded the machine is.

The run is compared with:

- the lower bound for the same work: the latency times the longest chain of
  requests that must follow one another in a safe quarantine (find, read the
  labels, create the record label, import the copy, verify it, remove the
  original, verify that), or the quota windows the quarantine mailbox needs,
  whichever is longer, and
- a sequential baseline: `GmailPlatform.quarantine` for one mailbox after another,
  measured on a sample of mailboxes in a fresh world and scaled to all of them.

At the end the results and the simulator's log are checked: every pull was
quarantined, every original is in the trash, the quarantine mailbox holds one
copy, no request was answered 429, and no user had more than 10 requests in flight.

Run: .venv/bin/python bench/gmail_burst.py [--mailboxes N] [--sample N]
     [--latency-ms MS] [--threads N] [--batch-size N]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import resource
import subprocess
import time
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from autopull.connectors.errors import ConnectorError
from autopull.connectors.mail.base import QuarantineResult
from autopull.connectors.mail.gmail import GmailPlatform, GmailSettings
from autopull.sim.clock import VirtualTimeLoop
from autopull.sim.gmail import QUOTA_UNITS, GmailSimSettings, GmailSimulator, SimClock
from autopull.sim.world import World
from autopull.streams.progress import progress

DOMAIN = "example.org"
QUARANTINE = f"quarantine@{DOMAIN}"
SERVICE_ACCOUNT = "autopull@bench.iam.gserviceaccount.com"
CLIENT_ID = "104500000000000000001"
MESSAGE_ID = "campaign.20261204.0001@mail.example.net"
INCIDENT = "INC-BENCH"
DEFAULT_THREADS: int = GmailSettings.model_fields["max_threads"].default
DEFAULT_BATCH_SIZE: int = GmailSettings.model_fields["batch_size"].default
# Start of the virtual clock; any value works, since only differences count.
EPOCH = 1000.0
# Requests a safe quarantine of one copy makes one after another: find, read its
# labels, create its record label, import the quarantine copy, verify it, trash
# the original, verify that. The import waits for the record label, so that a
# retry after a crash finds the label and checks the quarantine mailbox again.
SAFE_CHAIN = 7
# Quota units the quarantine mailbox needs for one distinct message at least:
# the label list and creation, the import and the check of the imported copy.
QUARANTINE_UNITS = (
    QUOTA_UNITS["labels.list"]
    + QUOTA_UNITS["labels.create"]
    + QUOTA_UNITS["messages.import"]
    + QUOTA_UNITS["messages.get"]
)


@dataclass
class Run:
    """The measurements of one timed run."""

    virtual_s: float
    real_s: float
    outcomes: Counter[str]
    requests: int
    parts_429: int
    peak_in_flight: int
    quarantine_units: int
    evidence_copies: int
    originals_trashed: int
    batches: int


def main() -> None:
    options = parse_args()
    raise_file_limit(options.threads * 4 + 1024)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    latency = options.latency_ms / 1000

    burst = run_on_virtual_clock(timed_run(options, key, options.mailboxes, burst=True))
    baseline = run_on_virtual_clock(
        timed_run(options, key, options.sample, burst=False)
    )

    # Windows the quarantine mailbox waits beyond the first for its quota units.
    extra_windows = max(0, math.ceil(QUARANTINE_UNITS / 15_000) - 1)
    bound = max(SAFE_CHAIN * latency, extra_windows * 60.0)
    scaled = baseline.virtual_s * options.mailboxes / options.sample

    print_machine()
    print(
        f"mailboxes: {options.mailboxes}, latency: {options.latency_ms:g} ms, "
        f"threads: {options.threads}, batch size: {options.batch_size}"
    )
    report("burst", burst)
    report(f"baseline ({options.sample} mailboxes)", baseline)
    print(f"lower bound: {bound:.3f} s ({SAFE_CHAIN} requests x latency)")
    print(f"burst / lower bound: {burst.virtual_s / bound:.2f}")
    print(
        f"baseline scaled to {options.mailboxes}: {scaled:.1f} s; "
        f"burst is {scaled / max(burst.virtual_s, 1e-9):.0f}x faster"
    )
    problems = check(burst, options.mailboxes) + check(baseline, options.sample)
    for problem in problems:
        print(f"CHECK FAILED: {problem}")
    if problems:
        raise SystemExit(1)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mailboxes", type=int, default=10_000)
    parser.add_argument("--sample", type=int, default=500)
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument(
        "--threads",
        type=int,
        default=DEFAULT_THREADS,
        help=f"the adapter's max_threads (default {DEFAULT_THREADS})",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help=f"the adapter's batch_size (default {DEFAULT_BATCH_SIZE})",
    )
    return parser.parse_args()


def run_on_virtual_clock(main: Coroutine[Any, Any, Run]) -> Run:
    """Run `main` to completion on a fresh virtual clock."""
    loop = VirtualTimeLoop(start=EPOCH)
    try:
        return loop.run_until_complete(main)
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def raise_file_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))


def campaign_world(mailboxes: int, key: rsa.RSAPrivateKey) -> World:
    public = (
        key.public_key()
        .public_bytes(
            serialization.Encoding.PEM,
            serialization.PublicFormat.SubjectPublicKeyInfo,
        )
        .decode("ascii")
    )
    users = [user_mailbox(n) for n in range(mailboxes)]
    scenario = {
        "name": "gmail-burst",
        "tenants": [
            {
                "domain": DOMAIN,
                "platform": "gmail",
                "client_id": CLIENT_ID,
                "service_account": SERVICE_ACCOUNT,
                "public_key_pem": public,
            }
        ],
        "mailboxes": [{"address": a} for a in [*users, QUARANTINE]],
        "messages": [
            {
                "key": "CAMPAIGN",
                "message_id": f"<{MESSAGE_ID}>",
                "from": "Payroll <payroll@mail.example.net>",
                "to": users[:3],
                "subject": "Your December payslip",
                "date": "2026-12-04T09:00:00Z",
                "body": "Open http://payroll.example.net/slip\n",
                "malicious": True,
                "deliveries": [{"mailbox": a, "folder": "inbox"} for a in users],
            }
        ],
    }
    return World.from_scenario(scenario)


def user_mailbox(number: int) -> str:
    return f"user{number:05d}@{DOMAIN}"


async def timed_run(
    options: argparse.Namespace, key: rsa.RSAPrivateKey, mailboxes: int, *, burst: bool
) -> Run:
    loop = asyncio.get_running_loop()
    world = campaign_world(mailboxes, key)
    clock = SimClock(1.0, monotonic=loop.time, wall=time.time)
    settings = GmailSimSettings(
        latency_ms=options.latency_ms, request_log_size=10**7, close_connections=True
    )
    simulator = GmailSimulator(world, settings, clock=clock)
    await simulator.start()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")
    adapter = GmailPlatform(
        GmailSettings(
            api_url=f"{simulator.base_url}/",
            token_uri=f"{simulator.base_url}/token",
            service_account_email=SERVICE_ACCOUNT,
            client_id=CLIENT_ID,
            private_key=pem,
            quarantine_mailbox=QUARANTINE,
            max_threads=options.threads,
            batch_size=options.batch_size,
            # A real-time timeout: the simulator shares this process's CPU with
            # hundreds of client threads, so its responses can take minutes.
            request_timeout=900.0,
        )
    )
    pulls = [(user_mailbox(n), MESSAGE_ID, INCIDENT) for n in range(mailboxes)]
    try:
        started_virtual, started_real = loop.time(), time.perf_counter()
        results: list[QuarantineResult | ConnectorError]
        if burst:
            results = await adapter.quarantine_many(pulls)
        else:
            results = []
            with progress("Sequential baseline pulls", len(pulls)) as shown:
                for pull in pulls:
                    try:
                        results.append(await adapter.quarantine(*pull))
                    except ConnectorError as error:
                        results.append(error)
                    shown.advance()
        virtual = loop.time() - started_virtual
        real = time.perf_counter() - started_real
    finally:
        await adapter.close()
        await simulator.stop()

    outcomes: Counter[str] = Counter(
        type(r).__name__ if isinstance(r, ConnectorError) else "quarantined"
        for r in results
    )
    api = [e for e in simulator.log if e.api_method and e.api_method != "batch"]
    trashed = sum(
        1
        for n in range(mailboxes)
        for row in simulator.snapshot(user_mailbox(n))
        if "TRASH" in row["labels"]
    )
    evidence = [
        row
        for row in simulator.snapshot(QUARANTINE)
        if row["internet_message_id"] == f"<{MESSAGE_ID}>"
    ]
    return Run(
        virtual_s=virtual,
        real_s=real,
        outcomes=outcomes,
        requests=len(api),
        parts_429=sum(1 for e in api if e.status == 429),
        peak_in_flight=max(simulator.limits.peak_in_flight.values(), default=0),
        quarantine_units=simulator.limits.units_total.get(QUARANTINE, 0),
        evidence_copies=len(evidence),
        originals_trashed=trashed,
        batches=sum(1 for e in simulator.log if e.api_method == "batch"),
    )


def report(name: str, run: Run) -> None:
    print(
        f"{name}: {run.virtual_s:.3f} s virtual, {run.real_s:.1f} s real; "
        f"outcomes {dict(run.outcomes)}; {run.requests} API requests in "
        f"{run.batches} batches; 429s {run.parts_429}; peak in flight per user "
        f"{run.peak_in_flight}; quarantine mailbox units {run.quarantine_units}"
    )


def check(run: Run, mailboxes: int) -> list[str]:
    problems = []
    if run.outcomes != Counter({"quarantined": mailboxes}):
        problems.append(f"outcomes {dict(run.outcomes)}")
    if run.originals_trashed != mailboxes:
        problems.append(f"{run.originals_trashed} of {mailboxes} originals trashed")
    if run.evidence_copies != 1:
        problems.append(f"{run.evidence_copies} quarantine copies")
    if run.parts_429:
        problems.append(f"{run.parts_429} requests answered 429")
    if run.peak_in_flight > GmailSimSettings().concurrency_limit:
        problems.append(f"peak in flight {run.peak_in_flight}")
    return problems


def print_machine() -> None:
    model = "unknown CPU"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False)
        for line in lscpu.stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    print(
        f"machine: {model}, {os.cpu_count()} CPUs, {memory_gib:.0f} GiB, Python "
        f"{platform.python_version()}, load average {os.getloadavg()[0]:.1f}"
    )


if __name__ == "__main__":
    main()
