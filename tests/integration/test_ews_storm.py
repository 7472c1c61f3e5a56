"""A throttling storm on EWS: 40% of requests fail for a virtual minute.

A fifth of the requests get the ErrorServerBusy fault with BackOffMilliseconds
(HTTP 500) and a quarter of the rest get HTTP 503 with Retry-After. The simulator
and the pull path share one event loop on the virtual clock, and exchangelib runs
in the adapter's threads, so the storm's minute and every back-off pass at once
while the request log keeps their times on that clock.

The clock jumps only while every executor job waits for a reply that waits out
the simulator's latency, so it never skips ahead of a thread that is still
computing. Pulls still throttled after their attempts are parked and run again
once due, as the pull agent does. A deadlock in the threads would stop the clock,
so the run has two firm limits in real time: a watchdog that cancels the pulls,
and a timeout on each test that ends the process if the threads never return.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict

import pytest
from exchangelib.protocol import CachingProtocol
from storms import pull_command, pull_until_settled

from autopull.connectors.mail.ews import EwsPlatform, EwsSettings
from autopull.sim.campaign import (
    CAMPAIGN_MESSAGE_ID,
    QUARANTINE_MAILBOX,
    campaign_scenario,
    user_mailbox,
)
from autopull.sim.clock import VirtualTimeLoop, run_virtual
from autopull.sim.ews import EwsLoggedRequest, EwsSimSettings, EwsSimulator
from autopull.sim.world import World
from autopull.streams.pulls import PullResult

pytestmark = [pytest.mark.integration, pytest.mark.timeout(170, method="thread")]

MAILBOXES = 40
STORM_SECONDS = 60.0
BACK_OFF_MS = 2000
RETRY_AFTER = 3
# Real seconds the pulls may take before the watchdog cancels them.
DEADLINE_SECONDS = 120.0
# Runs of the batch: the first, then up to two of the pulls it parked.
ROUNDS = 3
SERVICE_ACCOUNT = "svc-autopull@burst.example.com"
PASSWORD = "storm-service-account-password"
INCIDENT = "INC-EWS-STORM"
ADAPTER_CONCURRENCY = 4
THREADS = 8


def ews_world() -> World:
    scenario = campaign_scenario(MAILBOXES)
    scenario["tenants"][0]["platform"] = "ews"
    return World.from_scenario(scenario)


def run_storm() -> tuple[list[PullResult], EwsSimulator, float]:
    world = ews_world()

    async def main() -> tuple[list[PullResult], EwsSimulator]:
        loop = asyncio.get_running_loop()
        sim = EwsSimulator(
            world,
            EwsSimSettings(
                latency_ms=100,
                service_accounts={SERVICE_ACCOUNT: PASSWORD},
                request_log_size=100_000,
            ),
            clock=loop.time,
        )
        assert isinstance(loop, VirtualTimeLoop)
        # Jobs beyond the adapter's threads are queued, not computing.
        loop.may_advance = lambda: (
            min(loop.executor_jobs, THREADS) <= sum(sim.budgets.in_flight.values())
        )
        await sim.start()
        platform = EwsPlatform(
            EwsSettings(
                service_endpoint=sim.endpoint,
                username=SERVICE_ACCOUNT,
                password=PASSWORD,
                quarantine_mailbox=QUARANTINE_MAILBOX,
                max_concurrency_per_mailbox=ADAPTER_CONCURRENCY,
                max_connections=THREADS,
            )
        )
        until = loop.time() + STORM_SECONDS
        # 20% of requests get ErrorServerBusy, and a quarter of the rest (20%) 503.
        sim.faults.add(
            {
                "kind": "server_busy",
                "back_off_ms": BACK_OFF_MS,
                "probability": 0.2,
                "until": until,
                "count": 10**9,
            }
        )
        sim.faults.add(
            {
                "kind": "unavailable",
                "retry_after": RETRY_AFTER,
                "probability": 0.25,
                "until": until,
                "count": 10**9,
            }
        )
        commands = [
            pull_command(user_mailbox(i), i, INCIDENT, CAMPAIGN_MESSAGE_ID)
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

    CachingProtocol.clear_cache()
    started = time.perf_counter()
    try:
        results, sim = run_virtual(main)
    finally:
        CachingProtocol.clear_cache()
    return results, sim, time.perf_counter() - started


@pytest.fixture(scope="module")
def storm() -> tuple[list[PullResult], EwsSimulator, float]:
    return run_storm()


def mailbox_requests(sim: EwsSimulator) -> list[EwsLoggedRequest]:
    return [e for e in sim.log if e.mailbox is not None and e.operation is not None]


def faulted(entry: EwsLoggedRequest) -> bool:
    return entry.code == "ErrorServerBusy" or entry.status == 503


def test_storm_every_pull_quarantined(
    storm: tuple[list[PullResult], EwsSimulator, float],
) -> None:
    results, sim, _ = storm

    statuses = Counter(result.outcome["status"] for result in results)
    assert statuses == Counter({"quarantined": MAILBOXES})
    for index in range(MAILBOXES):
        assert [r for r in sim.world.snapshot(user_mailbox(index)) if r["key"]] == []
    evidence = [
        row
        for row in sim.world.snapshot(QUARANTINE_MAILBOX)
        if row["internet_message_id"] == f"<{CAMPAIGN_MESSAGE_ID}>"
    ]
    assert len(evidence) == MAILBOXES
    assert sorted(row["folder"] for row in evidence) == [INCIDENT] * MAILBOXES


def test_storm_hits_forty_percent(
    storm: tuple[list[PullResult], EwsSimulator, float],
) -> None:
    _, sim, _ = storm
    requests = mailbox_requests(sim)
    first = min(e.at for e in requests)
    during = [e for e in requests if e.at < first + STORM_SECONDS]
    injected = [e for e in during if e.fault_rule is not None]

    assert len(during) > 200
    # 40% expected; the bounds allow for a sample of a few hundred requests.
    assert 0.3 <= len(injected) / len(during) <= 0.5
    assert {e.status for e in injected} == {500, 503}
    assert all(e.fault_rule is None for e in requests if e.at >= first + STORM_SECONDS)


def test_storm_stays_within_limits(
    storm: tuple[list[PullResult], EwsSimulator, float],
) -> None:
    _, sim, _ = storm

    assert [e.seq for e in sim.log if e.code == "ErrorExceededConnectionCount"] == []
    assert max(sim.budgets.peak_in_flight.values()) <= ADAPTER_CONCURRENCY


def told_wait(answer: EwsLoggedRequest) -> float:
    """Return the wait in seconds that a faulted response requested of the client."""
    if answer.status == 503:
        return float(answer.retry_after or 0)
    return (answer.back_off_ms or 0) / 1000


def waits_kept(entries: list[EwsLoggedRequest], *, same_instant: bool) -> list[float]:
    """Return, per faulted response, how long after its requested wait the next
    request came.

    With `same_instant` false, requests that arrived at the very moment of the
    faulted one are left out: they were sent together with it, before its response.
    """
    margins: list[float] = []
    for index, answer in enumerate(entries):
        if not faulted(answer):
            continue
        wait = told_wait(answer)
        assert wait > 0
        later = [e for e in entries[index + 1 :] if same_instant or e.at > answer.at]
        if later:
            margins.append(later[0].at - answer.at - wait)
    return margins


def test_storm_back_off_honoured(
    storm: tuple[list[PullResult], EwsSimulator, float],
) -> None:
    _, sim, _ = storm
    by_mailbox: dict[str, list[EwsLoggedRequest]] = defaultdict(list)
    for entry in mailbox_requests(sim):
        assert entry.mailbox is not None
        by_mailbox[entry.mailbox].append(entry)
    users = [user_mailbox(i) for i in range(MAILBOXES)]

    # A user mailbox has one pull, which sends one request at a time, so every
    # request after a faulted one was sent after its response.
    user_margins = [
        margin
        for user in users
        for margin in waits_kept(by_mailbox[user], same_instant=True)
    ]
    # Pulls share the quarantine mailbox, and requests sent at the moment of a
    # faulted one were on their way already. Every later one, a request that waited
    # for a slot included, must keep the wait.
    shared_margins = waits_kept(by_mailbox[QUARANTINE_MAILBOX], same_instant=False)

    assert max(sim.budgets.peak_in_flight[user] for user in users) == 1
    assert len(user_margins) > 50
    assert len(shared_margins) > 5
    # Float sums of the virtual clock may be off by 1e-9.
    assert min(user_margins) >= -1e-9
    assert min(shared_margins) >= -1e-9


def test_storm_bounded_in_real_time(
    storm: tuple[list[PullResult], EwsSimulator, float],
) -> None:
    _, _, real_seconds = storm

    assert real_seconds < 150
