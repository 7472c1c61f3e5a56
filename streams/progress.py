"""Progress of long CLI work: a bar on a terminal, plain lines otherwise.

A bar redraws in place, which is right for a person at a terminal and wrong for a
log file or a CI job, where each redraw would become a line. Off a terminal the
reporter prints a line when the count changes, at most once per `interval`
seconds, and always the last state.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

PLAIN_INTERVAL_SECONDS = 5.0


class ProgressReporter:
    """Counts completed steps out of a total and shows them."""

    def __init__(
        self,
        description: str,
        total: int,
        *,
        out: TextIO,
        terminal: bool,
        interval: float = PLAIN_INTERVAL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.description = description
        self.total = total
        self.completed = 0
        self._out = out
        self._interval = interval
        self._clock = clock
        self._shown: tuple[int, int] | None = None
        self._shown_at = float("-inf")
        self._bar: Progress | None = None
        self._task = None
        if terminal:
            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=Console(file=out, force_terminal=True),
                transient=False,
            )
            self._task = self._bar.add_task(description, total=total)

    def update(self, completed: int, total: int | None = None) -> None:
        """Set the number of completed steps, and the total when it changed."""
        self.completed = completed
        if total is not None:
            self.total = total
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, completed=completed, total=self.total)
            return
        now = self._clock()
        if (completed, self.total) != self._shown and now - self._shown_at >= (
            self._interval
        ):
            self._print_line()
            self._shown_at = now

    def advance(self, steps: int = 1) -> None:
        """Add `steps` completed steps."""
        self.update(self.completed + steps)

    def _print_line(self) -> None:
        percent = 100 * self.completed // self.total if self.total else 100
        print(
            f"{self.description}: {self.completed}/{self.total} ({percent}%)",
            file=self._out,
            flush=True,
        )
        self._shown = (self.completed, self.total)

    def start(self) -> None:
        if self._bar is not None:
            self._bar.start()
        else:
            self._print_line()
            self._shown_at = self._clock()

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
        elif self._shown != (self.completed, self.total):
            self._print_line()


@contextmanager
def progress(
    description: str,
    total: int,
    *,
    out: TextIO | None = None,
    terminal: bool | None = None,
    interval: float = PLAIN_INTERVAL_SECONDS,
) -> Iterator[ProgressReporter]:
    """Show the progress of `total` steps on `out` (standard error by default).

    `terminal` defaults to whether `out` is a terminal.
    """
    stream = out if out is not None else sys.stderr
    if terminal is None:
        terminal = stream.isatty()
    reporter = ProgressReporter(
        description, total, out=stream, terminal=terminal, interval=interval
    )
    reporter.start()
    try:
        yield reporter
    finally:
        reporter.stop()
