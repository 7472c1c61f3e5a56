"""Carrying out one pull command on a mail platform, with retries.

Runs inside the pull agent's batch, so it writes no table: it returns the outcome
record (and, for a command still throttled after its attempts, the command to park
on the topic) and the agent sends them on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)

from autopull.connectors.errors import (
    AlreadyDoneError,
    ConnectorError,
    NotFoundError,
    PermanentError,
    ThrottledError,
    TransientError,
)
from autopull.connectors.mail.base import (
    MailPlatform,
    MessageCopy,
    MessageSearch,
    QuarantineResult,
)
from autopull.streams.records import Record, utcnow

log = logging.getLogger(__name__)

Router = Callable[[str], MailPlatform | None]


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long a pull is retried in process before it is parked.

    `attempt_timeout_seconds` bounds one attempt, every request and wait inside
    it included. An attempt that runs longer is cancelled and counts as a
    transient failure.
    """

    max_attempts: int = 5
    max_wait_seconds: float = 60.0
    base_wait_seconds: float = 0.5
    # NOTE: an estimate, not a measurement. One Graph quarantine makes about ten
    # requests of at most 30 s each and may queue behind other quarantines of the
    # same message for its evidence copy.
    attempt_timeout_seconds: float = 300.0


@dataclass(frozen=True)
class PullResult:
    """The outcome of one command, and the command to park when still throttled."""

    outcome: Record
    parked: Record | None = None


class _SearchHeld(Exception):
    """A search that did not find exactly one message, with what it found."""

    def __init__(self, copies: list[MessageCopy], reason: str) -> None:
        super().__init__(reason)
        self.copies = copies
        self.reason = reason


def _wait_for(policy: RetryPolicy) -> Callable[[RetryCallState], float]:
    backoff = wait_random_exponential(
        multiplier=policy.base_wait_seconds, max=policy.max_wait_seconds
    )

    def wait(state: RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome else None
        requested = getattr(error, "retry_after", None)
        if requested is not None:
            return min(float(requested), policy.max_wait_seconds)
        return float(backoff(state))

    return wait


async def execute(
    command: Record,
    route: Router,
    policy: RetryPolicy,
    ledger_entry: Any = None,
    quarantine_mailboxes: frozenset[str] = frozenset(),
) -> PullResult:
    """Quarantine or restore the copies named by `command` and describe the outcome.

    A quarantine in one of `quarantine_mailboxes` is skipped without touching the
    platform, because the copies there are the evidence.
    """
    started = utcnow()
    mailbox, message_id = command["mailbox"], command["message_id"]
    if command["kind"] == "quarantine" and mailbox.lower() in quarantine_mailboxes:
        return PullResult(_evidence_kept(command, started))
    if command["kind"] not in ("quarantine", "restore"):
        error = PermanentError(
            f"Pull command {command['command_id']} has kind {command['kind']!r}, which "
            "this worker does not know; upgrade the worker before replaying it.",
            mailbox=mailbox,
        )
        return PullResult(_outcome(command, "none", started, error=error, attempts=0))

    try:
        platform = route(mailbox)
    except Exception as setup_error:
        log.exception("Creating the mail platform failed mailbox=%s", mailbox)
        wrapped = PermanentError(
            f"The mail platform for {mailbox} could not be set up: "
            f"{type(setup_error).__name__}: {setup_error}. Check its settings.",
            mailbox=mailbox,
        )
        return PullResult(_outcome(command, "unrouted", started, error=wrapped))
    if platform is None:
        unrouted = PermanentError(
            f"No mail platform is configured for mailbox {mailbox}; add its domain "
            "to the routing settings.",
            mailbox=mailbox,
        )
        return PullResult(_outcome(command, "unrouted", started, error=unrouted))

    if (
        command["kind"] == "quarantine"
        and isinstance(ledger_entry, dict)
        and ledger_entry.get("status") in ("quarantined", "already_quarantined")
    ):
        log.info(
            "Ledger shows the copy already quarantined mailbox=%s message_id=%s",
            mailbox,
            message_id,
        )
        result = QuarantineResult(mailbox, message_id, already_done=True, attempts=0)
        return PullResult(_outcome(command, platform.name, started, result=result))

    attempts = 0
    target = command.get("resolved_message_id") or message_id
    try:
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(TransientError),
            stop=stop_after_attempt(policy.max_attempts),
            wait=_wait_for(policy),
            reraise=True,
        ):
            with attempt:
                attempts += 1
                if _searched(command) and target == message_id:
                    target = await _resolve(platform, command)
                result = await _call_within(
                    platform, command, target, policy.attempt_timeout_seconds
                )
    except _SearchHeld as held:
        return PullResult(_held(command, platform.name, started, held, attempts))
    except TransientError as error:
        return _parked(command, platform.name, started, error, attempts)
    except ConnectorError as error:
        return PullResult(
            _outcome(command, platform.name, started, error=error, attempts=attempts)
        )
    except Exception as error:
        log.exception(
            "Pull failed unexpectedly mailbox=%s message_id=%s", mailbox, message_id
        )
        wrapped = PermanentError(f"Unexpected error: {type(error).__name__}: {error}")
        return PullResult(
            _outcome(command, platform.name, started, error=wrapped, attempts=attempts)
        )

    result = dataclasses.replace(result, attempts=attempts)
    if result.unfinished:
        incomplete = PermanentError(
            "The copy is in quarantine but the original could not be removed from "
            f"the mailbox: {' '.join(result.notes)} Remove it by hand or from the "
            "mail server.",
            mailbox=mailbox,
            message_id=message_id,
        )
        outcome = _outcome(command, platform.name, started, error=incomplete)
        outcome.update(
            attempts=attempts,
            copies=len(result.copies),
            original_folder=_folders(result) or None,
        )
        return PullResult(_with_target(outcome, target))
    outcome = _outcome(command, platform.name, started, result=result)
    return PullResult(_with_target(outcome, target))


def _searched(command: Record) -> bool:
    return command["kind"] == "quarantine" and command.get("search") is not None


async def _resolve(platform: MailPlatform, command: Record) -> str:
    """Return the Message-ID of the one message the command's search matches.

    Raises `_SearchHeld` when no message or more than one matches, or when the
    platform cannot search, because pulling a guess could remove a message that
    is not the reported one.
    """
    record = command["search"]
    search = MessageSearch(
        senders=tuple(record["senders"]),
        subject=record["subject"],
        received_after=record["received_after"],
        received_before=record["received_before"],
    )
    try:
        copies = await platform.search(command["mailbox"], search)
    except NotImplementedError as error:
        raise _SearchHeld([], f"{error} An analyst finds the copy.") from error

    message_ids = list(dict.fromkeys(copy.message_id for copy in copies))
    if len(message_ids) == 1 and message_ids[0]:
        log.info(
            "Search found one message mailbox=%s key=%s message_id=%s copies=%d",
            command["mailbox"],
            command["message_id"],
            message_ids[0],
            len(copies),
        )
        return message_ids[0]

    if not copies:
        reason = (
            f"No message in {command['mailbox']} is from {', '.join(search.senders)} "
            f"with the subject {search.subject!r} and arrived between "
            f"{search.received_after.isoformat()} and "
            f"{search.received_before.isoformat()}, so nothing is pulled and an "
            "analyst decides."
        )
    elif len(message_ids) > 1:
        reason = (
            f"{len(message_ids)} different messages in {command['mailbox']} match the "
            "sender, subject and arrival time, so none is pulled and an analyst "
            "picks from the candidates."
        )
    elif len(copies) > 1:
        # Copies without a Message-ID cannot be distinguished or pulled by id.
        reason = (
            f"{len(copies)} messages in {command['mailbox']} match the sender, "
            "subject and arrival time, and none has a Message-ID to pull it by, so "
            "an analyst decides."
        )
    else:
        reason = (
            f"The message in {command['mailbox']} that matches the sender, subject "
            "and arrival time has no Message-ID to pull it by, so an analyst decides."
        )
    log.warning(
        "Search did not find exactly one message mailbox=%s key=%s copies=%d "
        "messages=%d",
        command["mailbox"],
        command["message_id"],
        len(copies),
        len(message_ids),
    )
    raise _SearchHeld(copies, reason)


def _held(
    command: Record, platform: str, started: Any, held: _SearchHeld, attempts: int
) -> Record:
    outcome = _outcome(command, platform, started, attempts=attempts)
    outcome["status"] = "held"
    outcome["error_class"] = "none"
    outcome["error"] = held.reason
    outcome["candidates"] = [
        {
            "message_id": copy.message_id,
            "folder": copy.folder,
            "subject": copy.subject,
            "sender": copy.sender,
            "received_at": copy.received_at,
        }
        for copy in held.copies
    ]
    return outcome


def _with_target(outcome: Record, target: str) -> Record:
    if target != outcome["message_id"]:
        outcome["resolved_message_id"] = target
    return outcome


async def execute_many(
    commands: Sequence[Record],
    route: Router,
    policy: RetryPolicy,
    ledger_entries: Sequence[Any] | None = None,
    quarantine_mailboxes: frozenset[str] = frozenset(),
) -> list[PullResult]:
    """Run commands for distinct copies, with quarantines on one platform as a burst.

    Quarantines that route to the same platform go first to its `quarantine_many`
    as one burst. A pull that the burst failed transiently runs again through
    `execute`, with its retries, after the Retry-After the platform sent. Every
    other command runs through `execute` directly, and all run concurrently.
    Returns one result per command, in order.
    """
    entries = list(ledger_entries or [None] * len(commands))
    started = utcnow()
    results: list[PullResult | None] = [None] * len(commands)
    waits: dict[int, float] = {}

    bursts = _burst_groups(commands, route, entries, quarantine_mailboxes)
    outcomes = await asyncio.gather(
        *(
            platform.quarantine_many([_pull_of(commands[i]) for i in indices])
            for platform, indices in bursts
        )
    )
    for (platform, indices), burst in zip(bursts, outcomes, strict=True):
        for index, outcome in zip(indices, burst, strict=True):
            command = commands[index]
            if isinstance(outcome, TransientError):
                waits[index] = outcome.retry_after or 0.0
            elif isinstance(outcome, ConnectorError):
                results[index] = PullResult(
                    _outcome(command, platform.name, started, error=outcome)
                )
            else:
                results[index] = PullResult(
                    _outcome(command, platform.name, started, result=outcome)
                )

    async def run_alone(index: int) -> None:
        wait = min(waits.get(index, 0.0), policy.max_wait_seconds)
        if wait > 0:
            await asyncio.sleep(wait)
        result = await execute(
            commands[index], route, policy, entries[index], quarantine_mailboxes
        )
        if index in waits:
            # The burst was the first attempt.
            result.outcome["attempts"] = result.outcome["attempts"] + 1
        results[index] = result

    await asyncio.gather(
        *(run_alone(i) for i, result in enumerate(results) if result is None)
    )
    return [result for result in results if result is not None]


def _burst_groups(
    commands: Sequence[Record],
    route: Router,
    entries: Sequence[Any],
    quarantine_mailboxes: frozenset[str],
) -> list[tuple[MailPlatform, list[int]]]:
    """Group the quarantines worth a burst by platform: at least two per platform.

    Quarantines in a quarantine mailbox stay out, so `execute` skips them.
    """
    groups: dict[int, tuple[MailPlatform, list[int]]] = {}
    for index, command in enumerate(commands):
        entry = entries[index]
        already = isinstance(entry, dict) and entry.get("status") in (
            "quarantined",
            "already_quarantined",
        )
        evidence = command["mailbox"].lower() in quarantine_mailboxes
        if command["kind"] != "quarantine" or already or evidence:
            continue
        if _searched(command) or command.get("resolved_message_id"):
            # The copy is named by a search or by the Message-ID a search found,
            # which only `execute` resolves.
            continue
        try:
            platform = route(command["mailbox"])
        except Exception:  # noqa: S112 - `execute` logs and reports this command's error
            continue
        if platform is not None:
            groups.setdefault(id(platform), (platform, []))[1].append(index)
    return [group for group in groups.values() if len(group[1]) > 1]


def _pull_of(command: Record) -> tuple[str, str, str]:
    return command["mailbox"], command["message_id"], command["incident_id"]


async def _call_within(
    platform: MailPlatform, command: Record, target: str, seconds: float
) -> QuarantineResult:
    mailbox, message_id = command["mailbox"], target
    try:
        async with asyncio.timeout(seconds):
            return await _call(platform, command, target)
    except TimeoutError as error:
        raise TransientError(
            f"The {command['kind']} of {message_id} in mailbox {mailbox} on "
            f"{platform.name} timed out after {seconds:g} s; it will be retried.",
            mailbox=mailbox,
            message_id=message_id,
            platform=platform.name,
        ) from error


async def _call(
    platform: MailPlatform, command: Record, message_id: str
) -> QuarantineResult:
    mailbox = command["mailbox"]
    if command["kind"] == "restore":
        return await platform.restore(mailbox, message_id, command["incident_id"])
    return await platform.quarantine(mailbox, message_id, command["incident_id"])


def _parked(
    command: Record,
    platform: str,
    started: Any,
    error: TransientError,
    attempts: int,
) -> PullResult:
    wait = error.retry_after if error.retry_after is not None else 60.0
    retry_at = utcnow() + timedelta(seconds=wait)
    log.warning(
        "Pull parked after %d attempts error_class=%s mailbox=%s message_id=%s "
        "retry_at=%s error=%s",
        attempts,
        "throttled" if isinstance(error, ThrottledError) else "transient",
        command["mailbox"],
        command["message_id"],
        retry_at.isoformat(),
        error,
    )
    outcome = _outcome(command, platform, started, error=error, attempts=attempts)
    outcome["status"] = "throttled"
    outcome["retry_at"] = retry_at
    parked = dict(command, attempt=command["attempt"] + 1, not_before=retry_at)
    return PullResult(outcome, parked)


def _outcome(
    command: Record,
    platform: str,
    started: Any,
    *,
    result: QuarantineResult | None = None,
    error: ConnectorError | None = None,
    attempts: int = 1,
) -> Record:
    finished = utcnow()
    status, error_class = _classify(command["kind"], result, error)
    copies = result.copies if result else ()
    folders = _folders(result) if result else ""
    seconds = (finished - command["alert_received_at"]).total_seconds()
    return {
        "command_id": command["command_id"],
        "incident_id": command["incident_id"],
        "kind": command["kind"],
        "mailbox": command["mailbox"],
        "message_id": command["message_id"],
        "status": status,
        "platform": platform,
        "copies": len(copies),
        "original_folder": folders or None,
        "read": any(copy.read for copy in copies) if copies else None,
        "attempts": result.attempts if result else attempts,
        "started_at": started,
        "finished_at": finished,
        "seconds_from_alert": seconds,
        "error_class": error_class,
        "error": str(error) if error else None,
        "recipient_type": command.get("recipient_type", "original"),
        "alert_id": command.get("alert_id", ""),
        "retry_at": None,
        "resolved_message_id": command.get("resolved_message_id"),
        "candidates": [],
        "mailbox_missing": error is not None and error.mailbox_missing,
    }


def _evidence_kept(command: Record, started: Any) -> Record:
    log.warning(
        "Pull skipped: the mailbox is a quarantine mailbox incident_id=%s "
        "mailbox=%s message_id=%s",
        command["incident_id"],
        command["mailbox"],
        command["message_id"],
    )
    refusal = PermanentError(
        f"The mailbox {command['mailbox']} is a quarantine mailbox, whose copies are "
        "evidence, so nothing is pulled from it.",
        mailbox=command["mailbox"],
        message_id=command["message_id"],
    )
    outcome = _outcome(command, "none", started, error=refusal, attempts=0)
    outcome["status"] = "skipped"
    return outcome


def _folders(result: QuarantineResult) -> str:
    return ", ".join(dict.fromkeys(copy.folder for copy in result.copies))


def _classify(
    kind: str, result: QuarantineResult | None, error: ConnectorError | None
) -> tuple[str, str]:
    if result is not None:
        if kind == "restore" and result.already_done and not result.copies:
            # Nothing in quarantine carries this incident's marker: another incident
            # quarantined the copy, or it was restored before. Claiming "restored"
            # would hide a copy that is still in quarantine.
            # NOTE: a restore replayed after a crash that lost its first outcome is
            # reported not_found too, although the copy is back in place.
            return "not_found", "not_found"
        if kind == "restore":
            return "restored", "already_done" if result.already_done else "none"
        if result.already_done:
            return "already_quarantined", "already_done"
        return "quarantined", "none"
    if isinstance(error, NotFoundError):
        return "not_found", "not_found"
    if isinstance(error, AlreadyDoneError):
        done = "restored" if kind == "restore" else "already_quarantined"
        return done, "already_done"
    # Both park the command under the status throttled, and the error class
    # distinguishes a platform that asked to slow down from an outage or server error.
    if isinstance(error, ThrottledError):
        return "throttled", "throttled"
    if isinstance(error, TransientError):
        return "throttled", "transient"
    return "failed", "permanent"
