"""The trace agent: search the mailboxes of pulled copies for the copies they spawned.

The agent reads the `incidents` topic, keyed by incident id, so it alone writes the
frontier table under the same key: the (mailbox, Message-ID) pairs already searched
for each incident, and the failed searches with the time of their next attempt. For
every copy with action `pull` whose pull has an outcome and
that the frontier lacks, it
reads the mailbox's sent items since the delivery, its redirect rules and the
platform's message trace, and matches them (`autopull.streams.forwards`). A copy
whose pull found that the mailbox does not exist is marked searched without a
search, with that reason as its error. Each
finding of a copy that the incident lacks, or has with weaker evidence, goes to
`trace.findings` and, as a `finding` event, to `incident.events`. A
`traced` event then marks the copy as searched, or counts a failed search. A
failed search runs again after a wait that doubles with each failure, when an
incident update arrives after that time. A `trace_retry` event sent after the wait
makes the incident agent publish the incident again, so an incident without other
updates is searched too. The incident agent folds findings
into the forward tree and issues the pulls, whose copies come back here in the next
incident update, so the search ends when no new copy turns up, cycles included.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING

from faust.types import EventT, StreamT

from autopull.connectors.errors import ConnectorError, PermanentError, TransientError
from autopull.connectors.mail.base import MailPlatform, TraceEvent
from autopull.streams import records
from autopull.streams.forward_tree import (
    incident_payload,
    known_copies,
    nothing_untraced,
    untraced_copies,
)
from autopull.streams.forwards import (
    CONFIDENCE_RANK,
    Evidence,
    Match,
    Payload,
    TracedMessage,
    matches_from_rules,
    matches_from_sent,
    matches_from_trace,
    strongest,
)
from autopull.streams.records import Record, utcnow
from autopull.streams.routing import build_router, platform_name

if TYPE_CHECKING:
    from autopull.streams.app import Pipeline

log = logging.getLogger(__name__)

SEARCH_ATTEMPTS = 3
# Trace rows are logged by transport before the mailbox reports the delivery.
TRACE_MARGIN = timedelta(hours=1)
Router = Callable[[str], MailPlatform | None]
# Message trace rows by (platform name, Message-ID), read once per incident update.
TraceCache = dict[tuple[str, str], list[TraceEvent]]


def frontier_key(mailbox: str, message_id: str, trace_round: int = 0) -> str:
    """Return the frontier entry of one copy's search.

    A retry command that restarts a failed search raises the pull entry's
    `trace_round`, which makes a new key without the failed attempts.
    """
    key = f"{mailbox.lower()}\x1f{message_id}"
    return f"{key}\x1f{trace_round}" if trace_round else key


def retry_delay(attempts: int, first: float, maximum: float) -> float:
    """Return the seconds before the next search after `attempts` failed ones."""
    return float(min(first * 2 ** (attempts - 1), maximum))


async def search_copy(
    platform: MailPlatform,
    mailbox: str,
    message: TracedMessage,
    payload: Payload,
    is_internal: Callable[[str], bool],
    traces: TraceCache | None = None,
) -> list[Match]:
    """Return the copies that `message` in `mailbox` spawned, strongest evidence each.

    A forward that the mailbox sent also yields a match for the mailbox's own
    Sent Items copy, with the sender as both ends. A trace by Message-ID is the
    same for every mailbox, so a successful read is kept in `traces` and reused.
    Raises `ConnectorError` when the platform fails.
    """
    matches: list[Match] = []
    try:
        sent = await platform.sent_since(mailbox, message.delivered_at)
    except NotImplementedError:
        log.warning(
            "Platform cannot list sent messages platform=%s mailbox=%s",
            platform.name,
            mailbox,
        )
        sent = []
    forwards = matches_from_sent(mailbox, message, payload, sent, is_internal)
    matches.extend(forwards)
    for message_id in dict.fromkeys(match.message_id for match in forwards):
        first = next(match for match in forwards if match.message_id == message_id)
        matches.append(
            Match(
                from_mailbox=mailbox.lower(),
                to_mailbox=mailbox.lower(),
                message_id=message_id,
                evidence=Evidence(
                    first.evidence.confidence,
                    f"The sender's own copy of the forward. {first.evidence.reason}",
                ),
                subject=first.subject,
                sent_at=first.sent_at,
                thread_index=first.thread_index,
            )
        )

    # Rules and the message trace add to the sent items. A permanent failure of
    # either (a missing permission, say) is logged and the other sources still count.
    try:
        rules = await platform.forwarding_rules(mailbox)
        matches.extend(matches_from_rules(mailbox, message, rules, is_internal))
    except PermanentError as error:
        log.warning(
            "Reading forwarding rules failed mailbox=%s error=%s", mailbox, error
        )
    try:
        key = (platform.name, message.message_id)
        events = None if traces is None else traces.get(key)
        if events is None:
            since = message.delivered_at - TRACE_MARGIN
            events = await platform.message_trace(message.message_id, since)
            if traces is not None:
                traces[key] = events
        matches.extend(matches_from_trace(mailbox, message, events, is_internal))
    except PermanentError as error:
        log.warning(
            "Reading the message trace failed platform=%s message_id=%s error=%s",
            platform.name,
            message.message_id,
            error,
        )
    return strongest(matches)


def new_matches(matches: list[Match], known: dict[tuple[str, str], int]) -> list[Match]:
    """Return the matches that would change the incident, and add them to `known`.

    `known` maps each copy the incident has, or a search reported before, to its
    evidence rank (`known_copies`). A match of such a copy without stronger
    evidence, such as the delivery to another original recipient, is dropped.
    """
    unseen = []
    for match in matches:
        key = (match.to_mailbox, match.message_id)
        rank = CONFIDENCE_RANK[match.evidence.confidence]
        if rank <= known.get(key, -1):
            continue
        known[key] = rank
        unseen.append(match)
    return unseen


def finding_record(
    incident_id: str, original: TracedMessage, match: Match, depth: int
) -> Record:
    """Build the ForwardFinding record of one match."""
    return {
        "incident_id": incident_id,
        "from_mailbox": match.from_mailbox,
        "to_mailbox": match.to_mailbox,
        "message_id": match.message_id,
        "original_message_id": original.message_id,
        "evidence": match.evidence.reason,
        "confidence": match.evidence.confidence,
        "depth": depth,
        "found_at": utcnow(),
        "external": match.external,
        "subject": match.subject,
        "sent_at": match.sent_at,
        "thread_index": match.thread_index,
    }


def register_trace_agent(pipe: Pipeline) -> None:
    """Attach the trace agent to the pipeline's app."""
    settings = pipe.settings
    platforms: dict[str, MailPlatform] = {}
    route = build_router(settings, platforms)

    def is_internal(address: str) -> bool:
        return platform_name(settings, address) is not None

    async def search_with_retries(
        platform: MailPlatform,
        mailbox: str,
        message: TracedMessage,
        payload: Payload,
        traces: TraceCache,
    ) -> list[Match]:
        for attempt in range(1, SEARCH_ATTEMPTS + 1):
            try:
                return await search_copy(
                    platform, mailbox, message, payload, is_internal, traces
                )
            except TransientError as error:
                if attempt == SEARCH_ATTEMPTS:
                    raise
                wait = min(error.retry_after or 1.0, settings.pull_max_wait_seconds)
                log.warning(
                    "Trace search failed, retrying mailbox=%s message_id=%s "
                    "attempt=%d wait=%.1f error=%s",
                    mailbox,
                    message.message_id,
                    attempt,
                    wait,
                    error,
                )
                await asyncio.sleep(wait)
        raise AssertionError("unreachable")

    async def search(
        incident: Record, entry: Record, message: TracedMessage, traces: TraceCache
    ) -> tuple[list[Match], str | None]:
        """Return the matches of one copy's mailbox, or none and why not."""
        mailbox = entry["mailbox"]
        # The warnings name the mailbox and the error but no incident or
        # Message-ID, so the log's RepeatFilter passes one a minute for a mailbox
        # that fails for many copies. The "Traced copy" line names the ids.
        if entry.get("mailbox_missing"):
            log.warning(
                "Trace search skipped, the pull found no such mailbox mailbox=%s",
                mailbox,
            )
            return [], (
                f"the pull found that mailbox {mailbox} does not exist, so it was "
                "not searched"
            )
        platform = route(mailbox)
        if platform is None:
            return [], f"No mail platform is configured for {mailbox}."
        try:
            matches = await search_with_retries(
                platform, mailbox, message, incident_payload(incident), traces
            )
        except ConnectorError as failure:
            log.warning("Trace search failed mailbox=%s error=%s", mailbox, failure)
            return [], str(failure)
        return matches, None

    async def trace_one(
        incident: Record,
        entry: Record,
        message: TracedMessage,
        known: dict[tuple[str, str], int],
        traces: TraceCache,
    ) -> str | None:
        """Search one copy's mailbox, send its findings and return the error."""
        incident_id = incident["incident_id"]
        mailbox = entry["mailbox"]
        found, error = await search(incident, entry, message, traces)
        matches = new_matches(found, known)

        for match in matches:
            finding = finding_record(incident_id, message, match, message.depth + 1)
            await pipe.send("trace.findings", incident_id, finding)
            event = records.incident_event(incident_id, "finding", finding=finding)
            await pipe.send("incident.events", incident_id, event)
        progress = {
            "mailbox": mailbox,
            "message_id": entry["message_id"],
            "findings": len(matches),
            "error": error,
        }
        event = records.incident_event(incident_id, "traced", traced=progress)
        await pipe.send("incident.events", incident_id, event)
        log.info(
            "Traced copy incident_id=%s mailbox=%s message_id=%s findings=%d error=%s",
            incident_id,
            mailbox,
            entry["message_id"],
            len(matches),
            error,
        )
        return error

    # Wake-up tasks, kept referenced until they finish.
    wake_ups: set[asyncio.Task[None]] = set()

    async def wake_up(incident_id: str, delay: float) -> None:
        await asyncio.sleep(delay)
        event = records.incident_event(incident_id, "trace_retry")
        await pipe.send("incident.events", incident_id, event)

    def schedule_wake_up(incident_id: str, delay: float) -> None:
        # The incident agent republishes the incident on a `trace_retry` event,
        # so an incident without other updates comes back here once the retry
        # is due. NOTE: the task lives in this worker's memory, so after a
        # restart a due retry waits for the incident's next update or a retry
        # command.
        task = asyncio.ensure_future(wake_up(incident_id, delay))
        wake_ups.add(task)
        task.add_done_callback(wake_ups.discard)

    def record_failure(
        incident_id: str, entry: Record, failure: Record | None, error: str
    ) -> Record:
        """Return the frontier's failure record after one more failed search."""
        trace = settings.trace
        attempts = (failure or {}).get("attempts", 0) + 1
        if attempts >= trace.search_max_attempts:
            log.warning(
                "Trace search failed its maximum attempts incident_id=%s mailbox=%s "
                "message_id=%s attempts=%d error=%s",
                incident_id,
                entry["mailbox"],
                entry["message_id"],
                attempts,
                error,
            )
            return {"attempts": attempts, "retry_at": None}
        delay = retry_delay(
            attempts, trace.search_retry_seconds, trace.search_retry_max_seconds
        )
        schedule_wake_up(incident_id, delay)
        log.info(
            "Trace search scheduled again incident_id=%s mailbox=%s message_id=%s "
            "attempts=%d wait=%.1f",
            incident_id,
            entry["mailbox"],
            entry["message_id"],
            attempts,
            delay,
        )
        return {"attempts": attempts, "retry_at": time.time() + delay}

    async def handle(event: EventT, incident: Record) -> None:
        if not settings.trace.enabled:
            return
        incident_id = incident["incident_id"]
        frontier = pipe.frontier.get(incident_id) or {}
        searched = set(frontier.get("searched", []))
        # Copies whose last search failed: attempts, and the epoch seconds after
        # which the next search may start, or None once the attempts ran out.
        failures: dict[str, Record] = dict(frontier.get("failed", {}))
        now = time.time()
        work = []
        for entry, message in untraced_copies(incident):
            key = frontier_key(
                entry["mailbox"], entry["message_id"], entry.get("trace_round", 0)
            )
            failure = failures.get(key)
            if key in searched:
                continue
            if failure is not None and (
                failure["retry_at"] is None or failure["retry_at"] > now
            ):
                continue
            work.append((key, entry, message))
        if not work:
            return

        known = known_copies(incident)
        traces: TraceCache = {}
        for key, entry, message in work:
            error = await trace_one(incident, entry, message, known, traces)
            # A mailbox that the pull found missing is final, not a failure.
            if error is None or entry.get("mailbox_missing"):
                searched.add(key)
                failures.pop(key, None)
            else:
                failures[key] = record_failure(
                    incident_id, entry, failures.get(key), error
                )
        # A new value, assigned back, so the changelog records the change.
        pipe.frontier[incident_id] = {"searched": sorted(searched), "failed": failures}

    @pipe.app.agent(pipe.topics["incidents"], name="trace")
    async def trace(stream: StreamT) -> None:
        await pipe.run_each(
            stream,
            "incidents",
            "trace",
            handle,
            skip=lambda event: nothing_untraced(event.headers),
        )
