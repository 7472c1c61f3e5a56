from types import SimpleNamespace
from typing import Any

from faust.types import TP

from autopull.streams.stall import StallDetector, StallWatchdog, waiting_records

RAW = TP("p.alerts.raw", 0)
EVENTS = TP("p.incident.events", 1)
CHANGELOG = TP("p-ledger-changelog", 0)


def test_waiting_records_from_committed() -> None:
    waiting = waiting_records({RAW: 5, EVENTS: 7}, {RAW: 5, EVENTS: None}, {EVENTS: 2})
    assert waiting == {RAW: 0, EVENTS: 5}


def test_waiting_records_skip_unknown_end() -> None:
    assert waiting_records({RAW: None}, {RAW: 0}, {}) == {}


def test_detector_recovers_then_fails() -> None:
    detector = StallDetector(timeout=30)
    assert detector.observe(0, 10, {RAW: 3}).action == "none"
    assert detector.observe(29, 10, {RAW: 3}).action == "none"
    recover = detector.observe(30, 10, {RAW: 3})
    assert recover.action == "recover"
    assert recover.waiting == {RAW: 3}
    assert detector.observe(59, 10, {RAW: 3}).action == "none"
    assert detector.observe(60, 10, {RAW: 3}).action == "fail"


def test_detector_progress_resets() -> None:
    detector = StallDetector(timeout=30)
    detector.observe(0, 10, {RAW: 3})
    assert detector.observe(30, 10, {RAW: 3}).action == "recover"
    assert detector.observe(40, 11, {RAW: 2}).action == "none"
    assert detector.observe(69, 11, {RAW: 2}).action == "none"
    assert detector.observe(70, 11, {RAW: 2}).action == "recover"


def test_detector_idle_is_no_stall() -> None:
    detector = StallDetector(timeout=30)
    for now in range(0, 200, 10):
        assert detector.observe(now, 10, {RAW: 0}).action == "none"


class FakeConsumer:
    """The calls of Faust's consumer that the watchdog makes, on fixed offsets."""

    def __init__(self) -> None:
        self.ends = {RAW: 4, EVENTS: 9, CHANGELOG: 3}
        self._committed_offset: dict[TP, int | None] = {RAW: 4}
        self.calls: list[Any] = []

    def assignment(self) -> set[TP]:
        return {RAW, EVENTS, CHANGELOG}

    async def highwaters(self, *partitions: TP) -> dict[TP, int]:
        return {tp: self.ends[tp] for tp in partitions}

    async def earliest_offsets(self, *partitions: TP) -> dict[TP, int]:
        return dict.fromkeys(partitions, 0)

    async def perform_seek(self) -> None:
        self.calls.append("perform_seek")

    async def seek_wait(self, partitions: dict[TP, int]) -> None:
        self.calls.append(("seek_wait", partitions))

    def resume_partitions(self, partitions: set[TP]) -> None:
        self.calls.append(("resume_partitions", partitions))

    def resume_flow(self) -> None:
        self.calls.append("resume_flow")


class FakeFetcher:
    def __init__(self) -> None:
        self.started = 0

    async def maybe_start(self) -> None:
        self.started += 1


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def fake_app(consumer: FakeConsumer) -> Any:
    recovery = SimpleNamespace(completed=SimpleNamespace(is_set=lambda: True))
    flow: list[str] = []
    return SimpleNamespace(
        consumer=consumer,
        rebalancing=False,
        tables=SimpleNamespace(recovery=recovery),
        monitor=SimpleNamespace(messages_received_total=12),
        flow_control=SimpleNamespace(resume=lambda: flow.append("resume")),
        flow=flow,
        _fetcher=FakeFetcher(),
    )


async def test_watchdog_seeks_stalled_partitions() -> None:
    consumer = FakeConsumer()
    app = fake_app(consumer)
    clock = FakeClock()
    watchdog = StallWatchdog(app, {RAW.topic, EVENTS.topic}, 30, clock=clock)

    assert (await watchdog.check()).action == "none"
    clock.now = 30
    verdict = await watchdog.check()

    assert verdict.action == "recover"
    assert verdict.waiting == {EVENTS: 9}
    assert consumer.calls == [
        "perform_seek",
        ("seek_wait", {EVENTS: 0}),
        ("resume_partitions", {RAW, EVENTS}),
        "resume_flow",
    ]
    assert app.flow == ["resume"]
    assert app._fetcher.started == 1
    assert watchdog.recoveries == 1
    assert not watchdog.failed


async def test_watchdog_fails_after_recovery() -> None:
    consumer = FakeConsumer()
    app = fake_app(consumer)
    clock = FakeClock()
    watchdog = StallWatchdog(app, {RAW.topic, EVENTS.topic}, 30, clock=clock)
    for now in (0, 30, 60):
        clock.now = now
        await watchdog.check()
    assert watchdog.failed
    assert watchdog.recoveries == 1


async def test_watchdog_waits_during_rebalance() -> None:
    consumer = FakeConsumer()
    app = fake_app(consumer)
    app.rebalancing = True
    clock = FakeClock()
    watchdog = StallWatchdog(app, {RAW.topic, EVENTS.topic}, 30, clock=clock)
    for now in (0, 30, 60, 90):
        clock.now = now
        assert (await watchdog.check()).action == "none"
    assert consumer.calls == []


async def test_watchdog_waits_while_broker_unreachable() -> None:
    consumer = FakeConsumer()
    app = fake_app(consumer)
    clock = FakeClock()
    problem: list[str | None] = ["The broker is away."]
    watchdog = StallWatchdog(
        app,
        {RAW.topic, EVENTS.topic},
        30,
        clock=clock,
        broker_problem=lambda: problem[0],
    )
    for now in (0, 30, 60, 90):
        clock.now = now
        assert (await watchdog.check()).action == "none"
    assert consumer.calls == []
    assert not watchdog.failed

    # Once the broker is back, a stall counts from the first check after it.
    problem[0] = None
    clock.now = 100
    assert (await watchdog.check()).action == "none"
    clock.now = 129
    assert (await watchdog.check()).action == "none"
    clock.now = 130
    assert (await watchdog.check()).action == "recover"
