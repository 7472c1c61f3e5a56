"""A watchdog for a worker whose consumer has records to read and reads none.

A worker that takes over partitions without a committed offset can lose their
first records. With faust-streaming 0.15.3 and aiokafka 0.14, a fetch at offset 0
can return while `rewind_uncommitted` waits for its seek. The records then leave
aiokafka's buffer and the position moves to the end, but no agent gets them.
Faust's own seek skips these partitions because nothing is committed, so the
worker reads nothing more there until new records arrive, and whatever waits on
the lost ones never finishes.

NOTE: which Faust path takes these records is not confirmed, so the watchdog
repairs the effect, not the cause.

The watchdog compares the end offsets of the assigned input partitions with
their committed offsets. When records wait and the worker has read none for
`stall_timeout_seconds`, it logs the partitions and seeks them back to their
committed offsets (the first offset where nothing is committed), as a rebalance
would. If the worker still reads nothing for another period, it marks itself not
live, so /livez returns 503 and an orchestrator restarts it.

NOTE: one pull attempt may take up to `pull_attempt_timeout_seconds`, longer than
the stall timeout. If no other record arrives meanwhile, the watchdog seeks back
too, and the pulls after the committed offset run again. The ledger makes them
idempotent, so no message moves twice, but each writes one more outcome.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any

from faust.types import TP

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The action after one check, with the partitions where records wait."""

    action: str  # "none", "recover" or "fail"
    waiting: dict[TP, int] = dataclasses.field(default_factory=dict)


NONE = Verdict("none")


class StallDetector:
    """Stall detection from successive checks of one consumer.

    A check passes the count of records read so far and, for each assigned input
    partition, the records that wait to be read there. The consumer has stalled
    when records waited at every check of the last `timeout` seconds and the count
    did not change.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._received: int | None = None
        self._since: float | None = None
        self._recovered = False

    def observe(self, now: float, received: int, waiting: Mapping[TP, int]) -> Verdict:
        """Record one check at monotonic time `now` and return what to do."""
        lagging = {tp: count for tp, count in waiting.items() if count > 0}
        if received != self._received or not lagging:
            self._received = received
            self._since = now if lagging else None
            self._recovered = False
            return NONE
        if self._since is None:
            self._since = now
            return NONE
        if now - self._since < self.timeout:
            return NONE
        self._since = now
        if self._recovered:
            return Verdict("fail", lagging)
        self._recovered = True
        return Verdict("recover", lagging)

    def reset(self) -> None:
        """Forget the checks so far, as after a rebalance."""
        self._received = None
        self._since = None
        self._recovered = False


def waiting_records(
    ends: Mapping[TP, int | None],
    committed: Mapping[TP, int | None],
    earliest: Mapping[TP, int],
) -> dict[TP, int]:
    """Return the records after each partition's committed offset, by partition.

    A partition without a committed offset counts from its first offset.
    """
    waiting: dict[TP, int] = {}
    for tp, end in ends.items():
        if end is None:
            continue
        start = committed.get(tp)
        if start is None:
            start = earliest.get(tp, 0)
        waiting[tp] = max(end - start, 0)
    return waiting


class StallWatchdog:
    """Checks a Faust app's input partitions and recovers a stalled consumer.

    `broker_problem` returns why the consumer cannot reach Kafka, or None. While
    it returns a reason, the watchdog sends no request and resets its detector, so
    a broker outage alone never makes /livez return 503.
    """

    def __init__(
        self,
        app: Any,
        topics: Collection[str],
        timeout: float,
        clock: Callable[[], float] = time.monotonic,
        broker_problem: Callable[[], str | None] = lambda: None,
    ) -> None:
        self.app = app
        self.topics = set(topics)
        self.detector = StallDetector(timeout)
        self.clock = clock
        self.broker_problem = broker_problem
        self.failed = False
        self.recoveries = 0

    def _input_partitions(self) -> set[TP]:
        return {tp for tp in self.app.consumer.assignment() if tp.topic in self.topics}

    async def check(self) -> Verdict:
        """Run one check and act on its verdict."""
        app = self.app
        if app.rebalancing or not app.tables.recovery.completed.is_set():
            self.detector.reset()
            return NONE
        if self.broker_problem() is not None:
            self.detector.reset()
            return NONE
        partitions = self._input_partitions()
        if not partitions:
            self.detector.reset()
            return NONE

        consumer = app.consumer
        received = app.monitor.messages_received_total
        ends = await consumer.highwaters(*partitions)
        # NOTE: Faust 0.15.3 keeps committed offsets in a private mapping; this
        # reads it, as the consumer lag gauge does. Offsets that the worker read
        # but never committed count as waiting, because a record that Faust drops
        # during a rebalance may count as read.
        known = getattr(consumer, "_committed_offset", {})
        committed = {tp: known.get(tp) for tp in partitions}
        unknown = [tp for tp, offset in committed.items() if offset is None]
        earliest = await consumer.earliest_offsets(*unknown) if unknown else {}
        waiting = waiting_records(ends, committed, earliest)

        verdict = self.detector.observe(self.clock(), received, waiting)
        if verdict.action == "recover":
            await self._recover(verdict.waiting)
        elif verdict.action == "fail" and not self.failed:
            self.failed = True
            log.error(
                "The consumer still reads no record after a recovery, so /livez "
                "now returns 503; restart the worker. waiting=%s",
                _describe(verdict.waiting),
            )
        return verdict

    async def _recover(self, waiting: Mapping[TP, int]) -> None:
        app = self.app
        consumer = app.consumer
        partitions = self._input_partitions()
        log.warning(
            "The consumer read no record for %.0f seconds while records wait, so it "
            "resumes and seeks its input partitions. waiting=%s",
            self.detector.timeout,
            _describe(waiting),
        )
        self.recoveries += 1
        # Faust's own seek also resets the offsets below which it drops records.
        await consumer.perform_seek()
        committed = getattr(consumer, "_committed_offset", {})
        uncommitted = [tp for tp in partitions if not committed.get(tp)]
        if uncommitted:
            earliest = await consumer.earliest_offsets(*uncommitted)
            await consumer.seek_wait({tp: earliest[tp] for tp in uncommitted})
        consumer.resume_partitions(partitions)
        app.flow_control.resume()
        consumer.resume_flow()
        # NOTE: Faust 0.15.3 has no public handle on its fetcher service.
        await app._fetcher.maybe_start()


def _describe(waiting: Mapping[TP, int]) -> str:
    return ", ".join(
        f"{tp.topic}[{tp.partition}]:{count}" for tp, count in sorted(waiting.items())
    )
