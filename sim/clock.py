"""A virtual clock for replaying long waits quickly: an asyncio loop whose time jumps.

`VirtualTimeLoop.time()` stands still while code runs and jumps straight to the
next timer whenever every task waits on one (an `asyncio.sleep`, a Retry-After
wait, a simulated latency). A benchmark that runs the simulators and the clients in
one such loop therefore measures the schedule that the limits and latencies allow,
not the CPU time of this machine, and a ten-minute throttling window passes at
once. Socket I/O still runs in real time: before it jumps, the loop waits
`grace_seconds` of real time for a socket to become ready, so replies already on
their way over loopback are read first.

NOTE: work that finishes in another thread more than `grace_seconds` after the
loop went idle (a slow DNS lookup in the default executor, say) lets the clock
jump past it, so virtual durations can come out longer than they would be, never
shorter.

A client that runs in threads (exchangelib, google-api-python-client) needs more:
while its thread computes, the loop is idle, and a jump would fire every pending
timer, the client's own timeouts included. The loop counts the executor jobs whose
result it has not yet received in `executor_jobs`, queued ones included, and a
`may_advance` predicate can hold the clock while any of them is computing rather
than waiting for a reply. Tests set it to
compare that count with the simulator's requests that wait out their latency.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import selectors
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar, TypeVarTuple

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

DEFAULT_GRACE_SECONDS = 0.002
# Real seconds a held clock waits for I/O before it checks `may_advance` again.
HELD_POLL_SECONDS = 0.05


class _JumpingSelector(selectors.BaseSelector):
    """A selector that advances its loop's virtual time instead of sleeping."""

    def __init__(self, inner: selectors.BaseSelector, grace_seconds: float) -> None:
        self._inner = inner
        self._grace = grace_seconds
        self.advance: Callable[[float], None] = lambda seconds: None
        self.may_advance: Callable[[], bool] = lambda: True

    def register(
        self, fileobj: Any, events: int, data: Any = None
    ) -> selectors.SelectorKey:
        return self._inner.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._inner.unregister(fileobj)

    def modify(
        self, fileobj: Any, events: int, data: Any = None
    ) -> selectors.SelectorKey:
        return self._inner.modify(fileobj, events, data)

    def select(
        self, timeout: float | None = None
    ) -> list[tuple[selectors.SelectorKey, int]]:
        ready = self._inner.select(0)
        if ready or timeout == 0:
            return ready
        wait = self._grace if timeout is None else min(timeout, self._grace)
        ready = self._inner.select(wait)
        if ready:
            return ready
        if timeout is None:
            # No timer is due at all, so only I/O can wake the loop.
            return self._inner.select(None)
        if not self.may_advance():
            return self._inner.select(HELD_POLL_SECONDS)
        self.advance(timeout)
        return []

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return self._inner.get_map()

    def close(self) -> None:
        self._inner.close()


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """A selector event loop on virtual time, starting at `start` seconds."""

    def __init__(
        self, *, start: float = 0.0, grace_seconds: float = DEFAULT_GRACE_SECONDS
    ) -> None:
        selector = _JumpingSelector(selectors.DefaultSelector(), grace_seconds)
        super().__init__(selector)
        self._virtual_now = start
        self._selector_hooks = selector
        selector.advance = self._advance
        self.executor_jobs = 0

    @property
    def may_advance(self) -> Callable[[], bool]:
        """The condition under which the clock may jump, by default always true."""
        return self._selector_hooks.may_advance

    @may_advance.setter
    def may_advance(self, predicate: Callable[[], bool]) -> None:
        self._selector_hooks.may_advance = predicate

    def time(self) -> float:
        return self._virtual_now

    def run_in_executor(
        self,
        executor: concurrent.futures.Executor | None,
        func: Callable[[*Ts], T],
        *args: *Ts,
    ) -> asyncio.Future[T]:
        future = super().run_in_executor(executor, func, *args)
        self.executor_jobs += 1
        future.add_done_callback(self._job_done)
        return future

    def _job_done(self, _: asyncio.Future[Any]) -> None:
        # Counted down only once the loop has the result, so the clock cannot jump
        # between a thread's last step and the loop's wake-up.
        self.executor_jobs -= 1

    def _advance(self, seconds: float) -> None:
        self._virtual_now += seconds


def run_virtual(main: Callable[[], Awaitable[T]], *, start: float = 0.0) -> T:
    """Run `main()` to completion on a fresh `VirtualTimeLoop` and close the loop."""
    loop = VirtualTimeLoop(start=start)
    try:
        return loop.run_until_complete(main())
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
