"""Running a batch of pulls through a throttling storm, as the pull agent does.

A pull still throttled after its attempts in process is parked: the agent sends
it back to pull.commands with `not_before`, and runs it again once that time has
come. `pull_until_settled` does the same for a batch, on the running event loop's
clock, with a real-time watchdog so that a deadlock fails instead of hanging.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from datetime import UTC, datetime

from autopull.streams.pulls import PullResult, RetryPolicy, Router, execute_many
from autopull.streams.records import Record, utcnow


def pull_command(mailbox: str, number: int, incident: str, message_id: str) -> Record:
    """Return quarantine command `number` for one copy of the storm's message."""
    now = datetime.now(UTC)
    return {
        "command_id": f"{incident}-{number}",
        "incident_id": incident,
        "kind": "quarantine",
        "mailbox": mailbox,
        "message_id": message_id,
        "alert_id": f"{incident}:1",
        "alert_received_at": now,
        "issued_at": now,
        "recipient_type": "original",
        "reason": "",
        "attempt": 1,
        "not_before": None,
    }


async def pull_until_settled(
    commands: Sequence[Record], route: Router, *, rounds: int, deadline: float
) -> tuple[list[PullResult], int]:
    """Run the commands, then the parked ones once due, for at most `rounds`.

    Returns each command's last result, in order, and the number of rounds run.
    Raises TimeoutError when the rounds take more than `deadline` real seconds.
    """
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    watchdog = threading.Timer(deadline, loop.call_soon_threadsafe, args=(task.cancel,))
    watchdog.start()
    last: dict[str, PullResult] = {}
    pending = list(commands)
    done = 0
    try:
        while pending and done < rounds:
            done += 1
            results = await execute_many(pending, route, RetryPolicy())
            parked = [r.parked for r in results if r.parked is not None]
            for command, result in zip(pending, results, strict=True):
                last[command["command_id"]] = result
            if parked:
                due = max(p["not_before"] for p in parked)
                await asyncio.sleep(max(0.0, (due - utcnow()).total_seconds()))
            pending = parked
    except asyncio.CancelledError:
        raise TimeoutError(
            f"The storm's {len(commands)} pulls did not settle within {deadline:g} s "
            "of real time."
        ) from None
    finally:
        watchdog.cancel()
    return [last[c["command_id"]] for c in commands], done
