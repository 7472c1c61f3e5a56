"""A throttling storm on Gmail: 40% of API requests fail for a virtual minute.

A fifth of the requests get 429 userRateLimitExceeded with Retry-After and a
quarter of the rest get 503 with Retry-After, batch parts included. The
simulator, with Gmail's per-user quota units and concurrency, and the pull path
share one event loop on the virtual clock. google-api-python-client runs in the
adapter's threads, and the clock jumps only while every executor job waits for a
reply that waits out the simulator's latency. Pulls still throttled after their
attempts are parked and run again once due, as the pull agent does. A real-time
watchdog and a test timeout make a deadlock fail the test instead of hanging it.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from typing import Any

import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from storms import pull_command, pull_until_settled

from autopull.connectors.mail.gmail import GmailPlatform, GmailSettings
from autopull.sim.clock import VirtualTimeLoop, run_virtual
from autopull.sim.gmail import GmailSimSettings, GmailSimulator, LoggedRequest, SimClock
from autopull.sim.world import World
from autopull.streams.pulls import PullResult

pytestmark = [pytest.mark.integration, pytest.mark.timeout(170, method="thread")]

DOMAIN = "storm.example.org"
QUARANTINE = f"quarantine@{DOMAIN}"
SERVICE_ACCOUNT = "autopull@storm-test.iam.gserviceaccount.com"
CLIENT_ID = "104500000000000000002"
MESSAGE_ID = "storm-0001@payroll.example.net"
INCIDENT = "INC-GMAIL-STORM"
MAILBOXES = 40
STORM_SECONDS = 60.0
RETRY_AFTER = {429: 2, 503: 1}
THREADS = 8
# Real seconds the pulls may take before the watchdog cancels them.
DEADLINE_SECONDS = 120.0
# Runs of the batch: the first, then up to two of the pulls it parked.
ROUNDS = 3


class CountingGmailSimulator(GmailSimulator):
    """The Gmail simulator, counting the HTTP requests it has not responded to yet."""

    open_requests = 0

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.open_requests += 1
        try:
            return await super()._handle(request)
        finally:
            self.open_requests -= 1


def user_mailbox(index: int) -> str:
    return f"user{index:03d}@{DOMAIN}"


def storm_world(key: rsa.RSAPrivateKey) -> World:
    public = (
        key.public_key()
        .public_bytes(
            serialization.Encoding.PEM,
            serialization.PublicFormat.SubjectPublicKeyInfo,
        )
        .decode("ascii")
    )
    users = [user_mailbox(i) for i in range(MAILBOXES)]
    return World.from_scenario(
        {
            "name": "gmail-storm",
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
                    "key": "STORM",
                    "message_id": f"<{MESSAGE_ID}>",
                    "from": "Payroll <payroll@payroll.example.net>",
                    "to": users[:1],
                    "subject": "Your payslip",
                    "date": "2026-12-04T09:00:00Z",
                    "body": "Open http://payroll.example.net/slip\n",
                    "malicious": True,
                    "deliveries": [{"mailbox": a, "folder": "inbox"} for a in users],
                }
            ],
        }
    )


def storm_faults(until: float) -> list[dict[str, Any]]:
    # 20% of requests get 429, and a quarter of the rest (20%) get 503.
    return [
        {
            "path": r"^/gmail/v1/users/",
            "status": 429,
            "reason": "userRateLimitExceeded",
            "retry_after": RETRY_AFTER[429],
            "probability": 0.2,
            "until": until,
            "count": 10**9,
        },
        {
            "path": r"^/gmail/v1/users/",
            "status": 503,
            "retry_after": RETRY_AFTER[503],
            "probability": 0.25,
            "until": until,
            "count": 10**9,
        },
    ]


def run_storm() -> tuple[list[PullResult], GmailSimulator, float]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    world = storm_world(key)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")

    async def main() -> tuple[list[PullResult], GmailSimulator]:
        loop = asyncio.get_running_loop()
        clock = SimClock(1.0, monotonic=loop.time, wall=time.time)
        sim = CountingGmailSimulator(
            world,
            GmailSimSettings(latency_ms=100, request_log_size=100_000),
            clock=clock,
        )
        assert isinstance(loop, VirtualTimeLoop)
        # Jobs beyond the adapter's threads are queued, not computing.
        loop.may_advance = lambda: (
            min(loop.executor_jobs, THREADS) <= (sim.open_requests)
        )
        await sim.start()
        platform = GmailPlatform(
            GmailSettings(
                api_url=f"{sim.base_url}/",
                token_uri=f"{sim.base_url}/token",
                service_account_email=SERVICE_ACCOUNT,
                client_id=CLIENT_ID,
                private_key=pem,
                quarantine_mailbox=QUARANTINE,
                max_threads=THREADS,
            )
        )
        for rule in storm_faults(clock.now() + STORM_SECONDS):
            sim.faults.add(rule)
        commands = [
            pull_command(user_mailbox(i), i, INCIDENT, MESSAGE_ID)
            for i in range(MAILBOXES)
        ]
        try:
            results, _ = await pull_until_settled(
                commands, lambda _: platform, rounds=ROUNDS, deadline=DEADLINE_SECONDS
            )
        finally:
            await platform.close()
            await sim.stop()
        return results, sim

    started = time.perf_counter()
    results, sim = run_virtual(main)
    return results, sim, time.perf_counter() - started


@pytest.fixture(scope="module")
def storm() -> tuple[list[PullResult], GmailSimulator, float]:
    return run_storm()


def api_requests(sim: GmailSimulator) -> list[LoggedRequest]:
    return [e for e in sim.log if e.api_method is not None and e.mailbox is not None]


def told_wait(answer: LoggedRequest) -> float:
    return float(answer.retry_after or 0)


def waits_kept(entries: list[LoggedRequest], *, same_instant: bool) -> list[float]:
    """Return, per response with Retry-After, how long after its requested wait the
    next one of `entries` came.

    With `same_instant` false, requests that arrived at the very moment of the
    throttled one are left out: they were sent together with it, before its response.
    """
    margins: list[float] = []
    for index, answer in enumerate(entries):
        if answer.retry_after is None:
            continue
        later = [
            e for e in entries[index + 1 :] if same_instant or e.time > answer.time
        ]
        if later:
            margins.append(later[0].time - answer.time - told_wait(answer))
    return margins


def test_storm_every_pull_quarantined(
    storm: tuple[list[PullResult], GmailSimulator, float],
) -> None:
    results, sim, _ = storm

    statuses = Counter(result.outcome["status"] for result in results)
    assert set(statuses) <= {"quarantined", "already_quarantined"}
    assert sum(statuses.values()) == MAILBOXES
    for index in range(MAILBOXES):
        rows = sim.snapshot(user_mailbox(index))
        assert [row["labels"] for row in rows if "TRASH" not in row["labels"]] == []
        assert len(rows) == 1
    evidence = [
        row
        for row in sim.snapshot(QUARANTINE)
        if row["internet_message_id"] == f"<{MESSAGE_ID}>"
    ]
    assert len(evidence) == 1


def test_storm_hits_forty_percent(
    storm: tuple[list[PullResult], GmailSimulator, float],
) -> None:
    _, sim, _ = storm
    requests = api_requests(sim)
    first = min(e.time for e in requests)
    during = [e for e in requests if e.time < first + STORM_SECONDS]
    injected = [e for e in during if e.fault_rule is not None]

    assert len(during) > 80
    # 40% expected; the bounds allow for a sample of a hundred or more requests.
    assert 0.3 <= len(injected) / len(during) <= 0.5
    assert {e.status for e in injected} == {429, 503}
    assert all(
        e.fault_rule is None for e in requests if e.time >= first + STORM_SECONDS
    )


def test_storm_stays_within_limits(
    storm: tuple[list[PullResult], GmailSimulator, float],
) -> None:
    _, sim, _ = storm
    limit = min(
        GmailSimSettings().concurrency_limit,
        GmailSettings.model_fields["max_concurrency_per_mailbox"].default,
    )

    # Every 429 came from the storm: none for quota units or concurrency.
    assert [e.seq for e in sim.log if e.status == 429 and e.fault_rule is None] == []
    assert max(sim.limits.peak_in_flight.values()) <= limit
    # The quota counted units: the requests that passed the storm spent them.
    assert sum(sim.limits.units_total.values()) > 0


def test_storm_retry_after_honoured(
    storm: tuple[list[PullResult], GmailSimulator, float],
) -> None:
    _, sim, _ = storm
    # A retry repeats its request: the same user, method, path and query.
    by_request: dict[tuple[str, ...], list[LoggedRequest]] = defaultdict(list)
    for entry in api_requests(sim):
        assert entry.mailbox is not None
        query = repr(sorted(entry.query.items()))
        by_request[(entry.mailbox, entry.method, entry.path, query)].append(entry)

    # One pull per user, so the same request again for a user is a retry.
    user_margins = [
        margin
        for key, entries in by_request.items()
        if key[0] != QUARANTINE
        for margin in waits_kept(entries, same_instant=True)
    ]
    # Pulls share the quarantine mailbox, and the same request from another pull
    # at the moment of a throttled one was sent before its response.
    shared_margins = [
        margin
        for key, entries in by_request.items()
        if key[0] == QUARANTINE
        for margin in waits_kept(entries, same_instant=False)
    ]

    assert len(user_margins) > 20
    # Float sums of the virtual clock may be off by 1e-6.
    assert min(user_margins) >= -1e-6
    assert min(shared_margins, default=0.0) >= -1e-6


def test_storm_bounded_in_real_time(
    storm: tuple[list[PullResult], GmailSimulator, float],
) -> None:
    _, _, real_seconds = storm

    assert real_seconds < 150
