"""A virtual clock for replaying long waits quickly: an asyncio loop whose time jumps.

`VirtualTimeLoop.time()` stands still while code runs and jumps straight to the
next timer whenever every task waits on one (an `asyncio.sleep`, a Retry-After
wait, a simulated latency). A benchmark that runs the simulators and the clients in
one such loop therefore measures the schedule that the limits and latencies allow,
not the CPU time of this machine, and a ten-minute throttling window passes at
once. Socket I/O still runs in real time: before it jumps, the loop waits
`grace_seconds` of real time for a socket to become ready, so replies already on
their way over loopback are read first.

Work in executor threads (`run_in_executor`, `asyncio.to_thread`) holds the clock
while it runs, however long it takes in real time: a job counts as running from
its submission until the loop has its result, and the clock jumps only when no job
runs. A job that waits on a server in this loop (a synchronous HTTP client talking
to a simulator) would hold the clock for ever, so such a server marks each request
it serves with `serving_thread`. The clock then jumps once every running job waits
on a request being served, because only a timer of this loop can end that wait.
The clock never counts threads started by other means.

A test may hold the clock further with a `may_advance` predicate, for example
until a simulator's own count of requests in flight matches the executor jobs in
`executor_jobs`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import selectors
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any, TypeVar

T = TypeVar("T")

DEFAULT_GRACE_SECONDS = 0.002
# How long the loop waits for I/O, in real time, while a thread holds the clock.
# Any I/O or a finished job wakes it sooner.
THREAD_POLL_SECONDS = 0.05


class ThreadWork:
    """The executor jobs of one loop, and the requests its servers serve to them.

    Every count changes on the loop's own thread only, so no lock is needed.
    """

    def __init__(self) -> None:
        self.submitted: dict[concurrent.futures.Executor, int] = {}
        self.served = 0

    def running(self) -> int:
        """Count the jobs that run or start at once: at most one per pool thread."""
        return sum(
            min(count, _pool_size(executor))
            for executor, count in self.submitted.items()
        )

    def busy(self) -> bool:
        """Return whether a job builds, sends or reads a request in real time."""
        return self.running() > self.served

    def submit(self, executor: concurrent.futures.Executor) -> None:
        self.submitted[executor] = self.submitted.get(executor, 0) + 1

    def finish(self, executor: concurrent.futures.Executor) -> None:
        left = self.submitted[executor] - 1
        if left:
            self.submitted[executor] = left
        else:
            del self.submitted[executor]


def _pool_size(executor: concurrent.futures.Executor) -> int:
    # ThreadPoolExecutor and ProcessPoolExecutor keep their size in _max_workers.
    return int(getattr(executor, "_max_workers", 1))


class _JumpingSelector(selectors.BaseSelector):
    """A selector that advances its loop's virtual time instead of sleeping."""

    def __init__(
        self, inner: selectors.BaseSelector, grace_seconds: float, work: ThreadWork
    ) -> None:
        self._inner = inner
        self._grace = grace_seconds
        self._work = work
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
        if timeout is None:
            # No timer is due at all, so only I/O can wake the loop.
            return self._inner.select(None)
        if self._work.busy() or not self.may_advance():
            # A thread still works in real time: wait for it without a jump. The
            # loop calls again with the same timeout, since its time stood still.
            return self._inner.select(THREAD_POLL_SECONDS)
        ready = self._inner.select(min(timeout, self._grace))
        if ready:
            return ready
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
        self.thread_work = ThreadWork()
        selector = _JumpingSelector(
            selectors.DefaultSelector(), grace_seconds, self.thread_work
        )
        super().__init__(selector)
        self._virtual_now = start
        self._selector_hooks = selector
        selector.advance = self._advance
        # Executor jobs whose result the loop has not received yet, queued ones
        # included.
        self.executor_jobs = 0

    @property
    def may_advance(self) -> Callable[[], bool]:
        """The extra condition under which the clock may jump, by default true."""
        return self._selector_hooks.may_advance

    @may_advance.setter
    def may_advance(self, predicate: Callable[[], bool]) -> None:
        self._selector_hooks.may_advance = predicate

    def time(self) -> float:
        return self._virtual_now

    def _advance(self, seconds: float) -> None:
        self._virtual_now += seconds

    def run_in_executor(  # type: ignore[override]
        self,
        executor: concurrent.futures.Executor | None,
        func: Callable[..., T],
        *args: Any,
    ) -> asyncio.Future[T]:
        """Run `func(*args)` in `executor` as the base loop does, holding the clock.

        The job counts from now until the loop has stored its result, so the
        clock cannot jump between the job's end and the wake-up of its awaiter.

        NOTE: a job whose future is cancelled stops counting at once, although its
        thread runs on, so the clock may jump while that thread works.
        """
        pool = executor if executor is not None else self._pool()
        future = super().run_in_executor(pool, func, *args)
        self.thread_work.submit(pool)
        self.executor_jobs += 1
        future.add_done_callback(lambda _: self._job_done(pool))
        return future

    def _job_done(self, pool: concurrent.futures.Executor) -> None:
        self.thread_work.finish(pool)
        self.executor_jobs -= 1

    def _pool(self) -> concurrent.futures.Executor:
        # The base loop creates its default executor on first use; creating it
        # here first lets the job be counted against the pool that runs it.
        if self._default_executor is None:  # type: ignore[attr-defined]
            self.set_default_executor(
                concurrent.futures.ThreadPoolExecutor(thread_name_prefix="asyncio")
            )
        return self._default_executor  # type: ignore[attr-defined, no-any-return]


@contextlib.contextmanager
def serving_thread() -> Iterator[None]:
    """Mark a request that an executor job of the running loop waits on.

    A server in a `VirtualTimeLoop` wraps each request it serves to a thread of
    that loop, from the moment it has read the whole request until it returns
    the response, so that the clock may jump while the thread waits. On any other
    loop this does nothing.
    """
    loop = asyncio.get_running_loop()
    if not isinstance(loop, VirtualTimeLoop):
        yield
        return
    loop.thread_work.served += 1
    try:
        yield
    finally:
        loop.thread_work.served -= 1


def run_virtual(main: Callable[[], Awaitable[T]], *, start: float = 0.0) -> T:
    """Run `main()` to completion on a fresh `VirtualTimeLoop` and close the loop."""
    loop = VirtualTimeLoop(start=start)
    try:
        return loop.run_until_complete(main())
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
