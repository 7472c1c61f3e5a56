"""Benchmark a Graph quarantine burst: one campaign in ten thousand mailboxes.

Builds a simulated Microsoft 365 tenant in which every user mailbox has one copy
of one campaign message, and quarantines all of them through the product's pull
path (`autopull.streams.pulls.execute_many`, which sends the quarantines as one
burst through `GraphPlatform.quarantine_many`). The Graph simulator applies a fixed
latency to every mailbox request and Graph's published limits: 4 concurrent
requests and 10,000 requests per 10 minutes per mailbox, the quarantine mailbox
included, and 130,000 requests per 10 seconds per app.

The simulator and the adapter share one event loop on the virtual clock
(`autopull.sim.clock`), so durations are those that the limits and the latency
allow for the requests the product sends, not the CPU time of this machine,
which the script reports beside them.

The run is compared with:

- the lower bound that the limits and the latency allow for the same work,
  computed from the request chain each mailbox needs (`lower_bound`), and
- a sequential baseline: `execute` for one pull after another, measured on a
  sample of mailboxes in a fresh world and scaled to all of them.

At the end the request log is checked: no request was answered by a simulated
limit, no mailbox had more than 4 requests in flight, and no window held more
requests than its limit.

Run: .venv/bin/python bench/graph_burst.py [--mailboxes N] [--sample N]
     [--latency-ms MS] [--batches-in-flight N]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import resource
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from autopull.connectors.mail.graph import (
    DEFAULT_BATCHES_IN_FLIGHT,
    SINGLE_REQUEST_CONNECTIONS,
    GraphPlatform,
    GraphSettings,
)
from autopull.sim.campaign import (
    CAMPAIGN_MESSAGE_ID,
    CLIENT_ID,
    CLIENT_SECRET,
    QUARANTINE_MAILBOX,
    TENANT_ID,
    campaign_scenario,
    user_mailbox,
)
from autopull.sim.clock import run_virtual
from autopull.sim.graph import GraphSimSettings, GraphSimulator, LoggedRequest
from autopull.sim.world import World
from autopull.streams.progress import progress
from autopull.streams.pulls import RetryPolicy, execute, execute_many
from autopull.streams.records import Record

INCIDENT = "INC-BENCH"
# Per user mailbox the burst needs, one after another: find (with the folder list
# beside it), mark (with the hidden folder's creation beside it), move, verify.
USER_CHAIN = 4
USER_REQUESTS = 6
# The evidence copy needs, one after another: the find in a source mailbox, its
# MIME content (with the incident folder lookup and the search for an existing
# copy beside it), the upload, the move into the incident folder, the check.
EVIDENCE_CHAIN = 5
# Requests in the quarantine mailbox: folder lookup and creation, search, upload,
# move, check.
EVIDENCE_REQUESTS = 6


@dataclass(frozen=True)
class Limits:
    """Graph's published limits, as the simulator applies them."""

    concurrency: int = 4
    mailbox_requests: int = 10_000
    mailbox_window_s: float = 600.0
    app_requests: int = 130_000
    app_window_s: float = 10.0


@dataclass
class Run:
    """The measurements of one timed run."""

    virtual_s: float
    real_s: float
    outcomes: dict[str, int]
    log: list[LoggedRequest]
    peak_in_flight: int


def main() -> None:
    options = parse_args()
    # Each batch in flight uses a connection, and the simulator's end of it.
    raise_file_limit(
        2 * (options.batches_in_flight + SINGLE_REQUEST_CONNECTIONS) + 1024
    )
    limits = Limits()
    latency = options.latency_ms / 1000

    burst = run_virtual(lambda: timed_run(options, options.mailboxes, burst=True))
    baseline = run_virtual(lambda: timed_run(options, options.sample, burst=False))

    bound = lower_bound(options.mailboxes, latency, limits)
    naive_bound = quarantine_mailbox_bound(2 * options.mailboxes, latency, limits)
    scaled = baseline.virtual_s * options.mailboxes / options.sample
    violations = check_limits(burst.log, limits)

    print_machine()
    print(
        f"mailboxes: {options.mailboxes}, latency: {options.latency_ms:g} ms, "
        f"batches in flight: {options.batches_in_flight}"
    )
    print(
        f"burst: {burst.virtual_s:.3f} s virtual, {burst.real_s:.1f} s real, "
        f"outcomes {burst.outcomes}"
    )
    print(f"lower bound: {bound:.3f} s; burst / bound = {burst.virtual_s / bound:.2f}")
    print(
        f"sequential sample: {options.sample} mailboxes in "
        f"{baseline.virtual_s:.1f} s virtual ({baseline.real_s:.1f} s real), "
        f"outcomes {baseline.outcomes}"
    )
    print(
        f"sequential scaled to {options.mailboxes}: {scaled:.0f} s; "
        f"baseline / burst = {scaled / burst.virtual_s:.0f}x"
    )
    print(
        f"bound if the quarantine mailbox took two searches per mailbox: "
        f"{naive_bound:.0f} s"
    )
    describe_requests(burst.log)
    print(f"peak requests in flight in one mailbox: {burst.peak_in_flight}")
    print(f"limit violations in the request log: {violations or 'none'}")
    print(f"peak resident set: {peak_rss_mib():.0f} MiB")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mailboxes", type=int, default=10_000)
    parser.add_argument("--sample", type=int, default=500)
    parser.add_argument("--latency-ms", type=float, default=150.0)
    parser.add_argument(
        "--batches-in-flight",
        type=int,
        default=DEFAULT_BATCHES_IN_FLIGHT,
        help="the adapter's max_batches_in_flight "
        f"(default {DEFAULT_BATCHES_IN_FLIGHT})",
    )
    return parser.parse_args()


# --- the runs -------------------------------------------------------------------------


async def timed_run(options: argparse.Namespace, mailboxes: int, *, burst: bool) -> Run:
    """Quarantine `mailboxes` mailboxes as a burst, or one after another."""
    world = World.from_scenario(campaign_scenario(mailboxes))
    sim_settings = GraphSimSettings(
        latency_ms=options.latency_ms, request_log_size=mailboxes * 10 + 1000
    )
    sim = GraphSimulator(world, sim_settings)
    url = await sim.start()
    graph = GraphPlatform(
        GraphSettings(
            graph_url=f"{url}/v1.0",
            authority_url=url,
            tenant_id=TENANT_ID,
            client_id=CLIENT_ID,
            client_secret=CLIENT_SECRET,
            quarantine_mailbox=QUARANTINE_MAILBOX,
            # The pool keeps its default room beside the batches.
            max_batches_in_flight=options.batches_in_flight,
            request_timeout=600,
        )
    )
    commands = [pull_command(user_mailbox(i), i) for i in range(mailboxes)]
    policy = RetryPolicy()
    loop = asyncio.get_running_loop()
    try:
        started, real_started = loop.time(), time.monotonic()
        if burst:
            results = await execute_many(commands, lambda _: graph, policy)
        else:
            results = []
            with progress("Sequential baseline pulls", len(commands)) as shown:
                for command in commands:
                    results.append(await execute(command, lambda _: graph, policy))
                    shown.advance()
        virtual_s, real_s = loop.time() - started, time.monotonic() - real_started
    finally:
        await graph.close()
        await sim.stop()

    outcomes: dict[str, int] = defaultdict(int)
    for result in results:
        outcomes[result.outcome["status"]] += 1
    peak = max(sim.throttle.peak_in_flight.values())
    return Run(virtual_s, real_s, dict(outcomes), list(sim.log), peak)


def pull_command(mailbox: str, number: int) -> Record:
    now = datetime.now(UTC)
    return {
        "command_id": f"bench-{number}",
        "incident_id": INCIDENT,
        "kind": "quarantine",
        "mailbox": mailbox,
        "message_id": CAMPAIGN_MESSAGE_ID,
        "alert_id": "bench:1",
        "alert_received_at": now,
        "issued_at": now,
        "recipient_type": "original",
        "reason": "",
        "attempt": 1,
        "not_before": None,
    }


# --- the bound ------------------------------------------------------------------------


def lower_bound(mailboxes: int, latency: float, limits: Limits) -> float:
    """Return the shortest time the limits and the latency allow for the burst.

    Each mailbox's chain of dependent requests takes one latency per step, and its
    requests need at least ceil(requests / concurrency) latencies. A mailbox window
    or the app window adds a whole window for every time its limit is used up.
    """
    user = max(USER_CHAIN, math.ceil(USER_REQUESTS / limits.concurrency)) * latency
    user += (
        windows_needed(USER_REQUESTS, limits.mailbox_requests) * limits.mailbox_window_s
    )
    evidence = quarantine_mailbox_bound(EVIDENCE_REQUESTS, latency, limits)
    evidence = max(evidence, EVIDENCE_CHAIN * latency)
    total_requests = mailboxes * USER_REQUESTS + EVIDENCE_REQUESTS
    app = windows_needed(total_requests, limits.app_requests) * limits.app_window_s
    return max(user, evidence, app)


def quarantine_mailbox_bound(requests: int, latency: float, limits: Limits) -> float:
    """Return the least time `requests` requests to one mailbox can take."""
    in_flight = math.ceil(requests / limits.concurrency) * latency
    windows = windows_needed(requests, limits.mailbox_requests)
    return in_flight + windows * limits.mailbox_window_s


def windows_needed(requests: int, per_window: int) -> int:
    """Return how many full windows must pass before the last request may start."""
    return max(0, math.ceil(requests / per_window) - 1)


# --- checking the request log ---------------------------------------------------------


def check_limits(log: Sequence[LoggedRequest], limits: Limits) -> list[str]:
    """List every limit the logged mailbox requests broke; empty when none did."""
    problems = [
        f"request {e.seq} to {e.mailbox} was answered by the {e.limit} limit"
        for e in log
        if e.limit is not None
    ]
    requests = [e for e in log if e.mailbox is not None and e.at is not None]
    by_mailbox: dict[str, list[float]] = defaultdict(list)
    for entry in requests:
        assert entry.mailbox is not None and entry.at is not None
        by_mailbox[entry.mailbox].append(entry.at)
    for mailbox, times in by_mailbox.items():
        busiest = busiest_window(times, limits.mailbox_window_s)
        if busiest > limits.mailbox_requests:
            problems.append(f"{mailbox}: {busiest} requests in one mailbox window")
    app_times = [e.at for e in requests if e.at is not None]
    busiest = busiest_window(app_times, limits.app_window_s)
    if busiest > limits.app_requests:
        problems.append(f"app: {busiest} requests in one app window")
    return problems


def busiest_window(times: list[float], window: float) -> int:
    """Return the most requests that fall in any window of `window` seconds."""
    ordered = sorted(times)
    most, start = 0, 0
    for end, moment in enumerate(ordered):
        while ordered[start] <= moment - window:
            start += 1
        most = max(most, end - start + 1)
    return most


def describe_requests(log: Sequence[LoggedRequest]) -> None:
    outer = sum(1 for e in log if e.path == "/v1.0/$batch")
    mailbox = [e for e in log if e.mailbox is not None]
    quarantine = sum(1 for e in mailbox if e.mailbox == QUARANTINE_MAILBOX)
    batched = sum(1 for e in mailbox if e.batch is not None)
    throttled = sum(1 for e in mailbox if e.status == 429)
    print(
        f"requests: {len(mailbox)} to mailboxes ({batched} inside {outer} batches), "
        f"{quarantine} to the quarantine mailbox, {throttled} answered 429"
    )


# --- the machine ----------------------------------------------------------------------


def raise_file_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def print_machine() -> None:
    try:
        cpu = subprocess.run(
            ["lscpu"], capture_output=True, text=True, check=False
        ).stdout
        model = next(
            (
                line.split(":", 1)[1].strip()
                for line in cpu.splitlines()
                if line.startswith("Model name")
            ),
            platform.processor(),
        )
    except OSError:
        model = platform.processor()
    print(
        f"machine: {model}, {os.cpu_count()} CPUs, Python "
        f"{sys.version.split()[0]}, load average {os.getloadavg()[0]:.1f}"
    )


if __name__ == "__main__":
    main()
