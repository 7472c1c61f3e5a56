"""The agents of the pipeline, in data-flow order.

normalize: alerts.raw -> alerts.normalized (or alerts.dead)
enrich:    alerts.normalized -> alerts.enriched, keyed by campaign
group:     alerts.enriched -> alerts.grouped, campaign windows (hopping)
link:      alerts.grouped -> incident.events and alerts.by_mailbox, message windows,
           and slices of a large alert's recipients back to alerts.grouped
exposure:  alerts.by_mailbox -> exposures, recipient windows (tumbling)
incident:  incident.events -> incidents table and topic, pull.commands
pull:      pull.commands -> pull.outcomes (batches, no table writes)
outcomes:  pull.outcomes -> quarantine ledger, incident.events
trace:     incidents -> frontier table, trace.findings, incident.events

Each table is written only by the agent whose input topic has the table's key, so
a table's changelog partition is the partition that owns the key.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from asyncio import to_thread
from collections.abc import Callable, Collection, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from faust.types import TP, EventT, StreamT

from autopull.connectors.mail.base import MailPlatform
from autopull.connectors.sources.detect import format_names, parse_alert
from autopull.connectors.sources.exceptions import InvalidAlertError
from autopull.streams import records
from autopull.streams.directory_cache import TableCache
from autopull.streams.enrich import LIST_TOO_LARGE, DirectoryLike, enrich_until_done
from autopull.streams.forward_tree import (
    TracePolicy,
    apply_finding,
    apply_traced,
    record_alert_payload,
    untraced_header,
)
from autopull.streams.grouping import (
    RECIPIENTS_PER_EVENT,
    count_exposure,
    exposure_record,
    for_mailbox,
    grouped_key,
    message_key,
    recipient_slices,
)
from autopull.streams.incidents import (
    DecisionLike,
    apply_alert,
    apply_command,
    apply_outcome,
    incident_mailboxes,
    new_incident,
    restores_due,
)
from autopull.streams.policy import decide, message_search
from autopull.streams.pulls import (
    PullResult,
    RetryPolicy,
    Router,
    execute,
    execute_many,
)
from autopull.streams.records import Record, ledger_key, utcnow
from autopull.streams.routing import build_router
from autopull.streams.trace import register_trace_agent

if TYPE_CHECKING:
    from autopull.streams.app import Pipeline

log = logging.getLogger(__name__)

# Work above these sizes runs in a worker thread, so the event loop, Faust's timers
# and the web server keep running. Smaller work stays on the loop: a thread hop for
# every event lowered the throughput benchmark from 155 to 127 alerts per CPU
# second (bench/pipeline_throughput.py, one run each).
THREAD_BODY_BYTES = 64 * 1024
THREAD_MAILBOXES = 1000
T = TypeVar("T")


async def run_sized(
    large: bool, function: Callable[..., T], *args: Any, **kwargs: Any
) -> T:
    """Return `function(*args, **kwargs)`, run in a worker thread when `large`."""
    if large:
        return await to_thread(function, *args, **kwargs)
    return function(*args, **kwargs)


def register_agents(pipe: Pipeline) -> None:
    """Attach every agent of the chain to the pipeline's app."""
    for agent in (
        _normalize_agent,
        _enrich_agent,
        _group_agent,
        _link_agent,
        _exposure_agent,
        _incident_agent,
        _pull_agent,
        _outcomes_agent,
        register_trace_agent,
    ):
        agent(pipe)
    _rewind_after_rebalance(pipe)


class SeekingConsumer(Protocol):
    """The calls of Faust's consumer that `rewind_uncommitted` makes."""

    def assignment(self) -> set[TP]: ...

    async def seek_to_committed(self) -> Mapping[TP, int | None]: ...

    async def earliest_offsets(self, *partitions: TP) -> Mapping[TP, int]: ...

    async def seek_wait(self, partitions: Mapping[TP, int]) -> None: ...


async def rewind_uncommitted(
    consumer: SeekingConsumer, topics: Collection[str]
) -> dict[TP, int]:
    """Rewind the assigned partitions of `topics` that have no committed offset.

    faust-streaming 0.15.3 drops the records it fetched while a rebalance stops the
    flow, then seeks each partition back to its committed offset. aiokafka 0.14
    seeks only committed offsets above 0, so a partition taken over from a worker
    that died before its first commit would keep reading after the dropped records,
    which would never be processed. Returns each partition rewound with its first
    offset.
    """
    partitions = {tp for tp in consumer.assignment() if tp.topic in topics}
    if not partitions:
        return {}

    committed = await consumer.seek_to_committed()
    uncommitted = [tp for tp in partitions if (committed.get(tp) or 0) <= 0]
    if not uncommitted:
        return {}
    earliest = await consumer.earliest_offsets(*uncommitted)
    targets = {tp: earliest[tp] for tp in uncommitted}
    await consumer.seek_wait(targets)
    log.info(
        "Rewound partitions without a committed offset to their start partitions=%s",
        ", ".join(f"{tp.topic}[{tp.partition}]@{at}" for tp, at in targets.items()),
    )
    return targets


def _rewind_after_rebalance(pipe: Pipeline) -> None:
    # Faust sends this signal after recovery, before it resumes the stream
    # partitions and seeks them to their committed offsets.
    topics = {topic.get_topic_name() for topic in pipe.topics.values()}

    async def rewind(app: Any, **_: Any) -> None:
        try:
            await rewind_uncommitted(app.consumer, topics)
        except Exception:
            log.exception(
                "Rewinding partitions without a committed offset failed, so records "
                "that the rebalance dropped there stay unread until the next rebalance."
            )

    pipe.app.on_rebalance_complete.connect(rewind)


def known_format(source: str) -> str | None:
    """Return `source` when it names a registered alert format, else None (detect)."""
    return source if source in format_names() else None


def _normalize_agent(pipe: Pipeline) -> None:
    async def dead_letter(event: EventT, raw: Record, reason: str) -> None:
        pipe.metrics.alerts.labels(raw["source"], "dead").inc()
        await pipe.dead_letter(
            event,
            source=raw["source"],
            stage="normalize",
            reason=reason,
            body=raw["body"],
            received_at=raw["received_at"],
            content_type=raw["content_type"],
            transport=raw["transport"],
        )

    async def handle(event: EventT, raw: Record) -> None:
        # One invalid event of a TAP window or FireEye listing is a dead letter of
        # its own, with the whole body and a reason naming the event, so the valid
        # events of the same body are still pulled.
        rejected: list[InvalidAlertError] = []
        try:
            # Checking the addresses of an alert to 45,000 recipients took about
            # 2 s (bench/huge_alert.py), so a large body is parsed off the loop.
            alerts = await run_sized(
                len(raw["body"]) > THREAD_BODY_BYTES,
                parse_alert,
                raw["body"],
                received_at=raw["received_at"],
                format_name=known_format(raw["source"]),
                rejected=rejected,
            )
        except InvalidAlertError as error:
            await dead_letter(event, raw, str(error))
            return

        for event_error in rejected:
            await dead_letter(event, raw, str(event_error))
        if alerts:
            pipe.metrics.alerts.labels(raw["source"], "normalized").inc()
        for alert in alerts:
            await pipe.send("alerts.normalized", alert["alert_id"], dict(alert))
        log.info(
            "Normalized source=%s alerts=%d rejected_events=%d raw_id=%s",
            raw["source"],
            len(alerts),
            len(rejected),
            raw["source_alert_id"],
        )

    @pipe.app.agent(pipe.topics["alerts.raw"], name="normalize")
    async def normalize(stream: StreamT) -> None:
        await pipe.run_each(stream, "alerts.raw", "normalize", handle)


def _enrich_agent(pipe: Pipeline) -> None:
    directory: list[DirectoryLike] = []

    def current_directory() -> DirectoryLike | None:
        if pipe.settings.directory is None:
            return None
        if not directory:
            from autopull.connectors.directory.client import Directory

            cache = None
            if pipe.directory_cache is not None:
                cache = TableCache(pipe.directory_cache)
            directory.append(Directory(pipe.settings.directory, cache=cache))
        return directory[0]

    async def handle(event: EventT, alert: Record) -> None:
        enriched = await enrich_until_done(alert, current_directory(), pipe.intel)
        await pipe.send("alerts.enriched", enriched["campaign_key"], enriched)

    @pipe.app.agent(pipe.topics["alerts.normalized"], name="enrich")
    async def enrich_alerts(stream: StreamT) -> None:
        await pipe.run_each(stream, "alerts.normalized", "enrich", handle)


def _alert_time(alert: Record) -> datetime:
    moment: datetime = alert.get("occurred_at") or alert["received_at"]
    return moment


def _group_agent(pipe: Pipeline) -> None:
    async def handle(event: EventT, enriched: Record) -> None:
        key = enriched["campaign_key"]
        at = _alert_time(enriched["alert"]).timestamp()
        incident_id, opened = pipe.campaign_windows.join(key, at)
        if opened:
            log.info(
                "Campaign window opened campaign_key=%s incident_id=%s",
                key,
                incident_id,
            )

        change = records.incident_event(incident_id, "alert_joined", alert=enriched)
        await pipe.send("alerts.grouped", grouped_key(enriched["alert"]), change)

    @pipe.app.agent(pipe.topics["alerts.enriched"], name="group")
    async def group(stream: StreamT) -> None:
        await pipe.run_each(stream, "alerts.enriched", "group", handle)


def _link_agent(pipe: Pipeline) -> None:
    # Alerts about one message from different sources can carry different campaign
    # keys (a TAP campaign id, a fingerprint), so they meet here by Message-ID and
    # join the incident that the first of them opened.
    # NOTE: the group agent has already opened an incident in the second key's
    # campaign window, so other messages of that campaign join that incident, not
    # the first one: the campaigns themselves are not merged.
    async def send_copies(change: Record) -> None:
        joined = {**change, "kind": "alert_joined"}
        for recipient in change["alert"]["recipients"]:
            await pipe.send(
                "alerts.by_mailbox",
                recipient["mailbox"],
                for_mailbox(joined, recipient),
            )

    async def handle(event: EventT, change: Record) -> None:
        if change["kind"] == "exposure":
            # A slice of the recipients of a large alert, which this agent sent.
            await send_copies(change)
            return

        enriched = change["alert"]
        key = message_key(enriched["alert"])
        if key is not None:
            at = _alert_time(enriched["alert"]).timestamp()
            incident_id, _ = pipe.message_windows.join(key, at, change["incident_id"])
            change["incident_id"] = incident_id

        await pipe.send("incident.events", change["incident_id"], change)
        if len(enriched["recipients"]) <= RECIPIENTS_PER_EVENT:
            await send_copies(change)
            return
        # A rebalance waits for this event, so the copies of a large alert go out
        # in slices of their own. A replayed slice changes no exposure count.
        grouped = grouped_key(enriched["alert"])
        for part in recipient_slices(change, RECIPIENTS_PER_EVENT):
            await pipe.send("alerts.grouped", grouped, part)

    @pipe.app.agent(pipe.topics["alerts.grouped"], name="link")
    async def link(stream: StreamT) -> None:
        await pipe.run_each(stream, "alerts.grouped", "link", handle)


def _exposure_agent(pipe: Pipeline) -> None:
    async def handle(event: EventT, change: Record) -> None:
        enriched = change["alert"]
        recipient = enriched["recipients"][0]
        mailbox = recipient["mailbox"]
        at = _alert_time(enriched["alert"]).timestamp()
        window_range = pipe.recipient_windows.table.window.ranges(at)[0]
        counts = pipe.recipient_windows.table.get((mailbox, window_range))
        updated = count_exposure(counts, mailbox, enriched, window_range)
        if updated == counts:
            return

        pipe.recipient_windows[mailbox][window_range] = updated
        await pipe.send("exposures", mailbox, exposure_record(mailbox, updated))

    @pipe.app.agent(pipe.topics["alerts.by_mailbox"], name="exposure")
    async def exposure(stream: StreamT) -> None:
        await pipe.run_each(stream, "alerts.by_mailbox", "exposure", handle)


def _trace_policy(pipe: Pipeline) -> TracePolicy:
    policy = pipe.settings.pull_policy()
    excluded = set(policy.excluded_mailboxes) | set(policy.quarantine_mailboxes)
    if policy.quarantine_mailbox:
        excluded.add(policy.quarantine_mailbox)
    trace = pipe.settings.trace
    return TracePolicy(
        pull_confidences=frozenset(trace.pull_confidences),
        max_depth=trace.max_depth,
        max_mailboxes=trace.max_mailboxes,
        excluded=frozenset(excluded),
    )


def _incident_agent(pipe: Pipeline) -> None:
    policy = pipe.settings.pull_policy()
    trace_policy = _trace_policy(pipe)

    def decide_for(
        incident: Record, alert: Record, recipients: list[Record]
    ) -> Sequence[DecisionLike]:
        too_large = {
            recipient["mailbox"]: recipient["attributes"].get("list", "")
            for recipient in recipients
            if recipient["attributes"].get(LIST_TOO_LARGE)
        }
        decisions = []
        # The score and the mailbox count are the incident's, with this alert.
        found = decide(
            alert,
            recipients,
            policy,
            score=incident["score"],
            mailbox_count=len(incident_mailboxes(incident, recipients)),
        )
        for decision in found:
            if decision.action == "pull" and decision.mailbox in too_large:
                decision = dataclasses.replace(
                    decision,
                    action="hold",
                    rule="directory.hold-large-list",
                    reason=f"The list {too_large[decision.mailbox]} has more members "
                    "than the configured maximum, so its copies wait for approval.",
                )
            decisions.append(decision)
        return decisions

    def join_alert(incident: Record, enriched: Record) -> list[Record]:
        commands = apply_alert(
            incident,
            enriched,
            lambda alert, recipients: decide_for(incident, alert, recipients),
            lambda alert: message_search(alert, policy),
        )
        record_alert_payload(incident, enriched["alert"])
        return commands

    async def handle(event: EventT, change: Record) -> None:
        incident_id = change["incident_id"]
        incident = pipe.incidents.take(incident_id)
        commands: list[Record] = []
        if change["kind"] == "alert_joined" and change["alert"]:
            if incident is None:
                campaign = change["alert"]["campaign_key"]
                incident = new_incident(incident_id, campaign, utcnow())
            # Deciding for an alert to 45,000 mailboxes took about a second, so a
            # large alert joins off the event loop. No other task reads or changes
            # the incident meanwhile, because only this agent refers to it.
            large = len(change["alert"]["recipients"]) > THREAD_MAILBOXES
            commands = await run_sized(large, join_alert, incident, change["alert"])
        elif change["kind"] == "finding" and change["finding"] and incident:
            commands = apply_finding(
                incident, change["finding"], trace_policy, utcnow()
            )
        elif change["kind"] == "traced" and change["traced"] and incident:
            attempts = pipe.settings.trace.search_max_attempts
            if not apply_traced(incident, change["traced"], utcnow(), attempts):
                log.warning(
                    "Trace progress matches no pull incident_id=%s mailbox=%s",
                    incident_id,
                    change["traced"]["mailbox"],
                )
        elif change["kind"] == "trace_retry" and incident:
            # The trace agent requests the incident again because a failed
            # search is due; publishing it unchanged is the whole fold.
            pass
        elif change["kind"] == "outcome" and change["outcome"] and incident:
            if not apply_outcome(incident, change["outcome"]):
                log.warning(
                    "Outcome matches no planned pull incident_id=%s mailbox=%s",
                    incident_id,
                    change["outcome"]["mailbox"],
                )
            commands = restores_due(incident, change["outcome"])
        elif change["kind"] == "command" and change["command"] and incident:
            commands = apply_command(incident, change["command"])
            log.info(
                "Command applied incident_id=%s action=%s actor=%s",
                incident_id,
                change["command"]["action"],
                change["command"]["actor"],
            )
        else:
            await pipe.dead_letter(
                event,
                source="incident.events",
                stage="incident",
                reason=f"Event kind {change['kind']} for incident {incident_id} "
                "cannot be applied: the incident or its payload is missing.",
                body=bytes(event.value),
            )
            return

        # The table and the topic get the same Avro body, encoded once, and off
        # the event loop when large: an incident of 45,000 mailboxes is about 14 MB.
        large = len(incident["pulls"]) > THREAD_MAILBOXES
        data = await run_sized(large, pipe.incidents.encode, incident_id, incident)
        pipe.incidents.store(incident_id, incident, data)
        topic_data = pipe.codecs["incidents"].reframe(data)
        await pipe.send_encoded(
            "incidents", incident_id, topic_data, headers=[untraced_header(incident)]
        )
        for command in commands:
            await pipe.send("pull.commands", command["mailbox"], command)
        log.info(
            "Incident updated incident_id=%s state=%s commands=%d",
            incident_id,
            incident["state"],
            len(commands),
        )

    @pipe.app.agent(pipe.topics["incident.events"], name="incident")
    async def incident_events(stream: StreamT) -> None:
        await pipe.run_each(stream, "incident.events", "incident", handle)


def _pull_agent(pipe: Pipeline) -> None:
    settings = pipe.settings
    retry = RetryPolicy(
        max_attempts=settings.pull_max_attempts,
        max_wait_seconds=settings.pull_max_wait_seconds,
        attempt_timeout_seconds=settings.pull_attempt_timeout_seconds,
    )
    platforms: dict[str, MailPlatform] = {}

    # Concurrency 1: a second instance could commit past a command still in flight.
    # Parallelism comes from partitions and from running a batch concurrently.
    @pipe.app.agent(pipe.topics["pull.commands"], name="pull", concurrency=1)
    async def pull(stream: StreamT) -> None:
        route = build_router(settings, platforms, pipe.metrics.count_throttled)
        async for batch in stream.take(
            settings.pull_batch_size, within=settings.pull_batch_seconds
        ):
            groups = _by_copy(pipe, batch)
            done = await _run_heads_as_burst(pipe, groups, route, retry)
            await asyncio.gather(
                *(
                    _run_in_order(pipe, group[1:] if i in done else group, route, retry)
                    for i, group in enumerate(groups)
                )
            )


def _by_copy(pipe: Pipeline, batch: Sequence[bytes | None]) -> list[list[bytes | None]]:
    """Group a batch by (mailbox, Message-ID), keeping the order within each group.

    Two commands for the same copy (from two incidents, say) must not race on the
    platform; commands for different copies run concurrently.
    """
    groups: dict[object, list[bytes | None]] = {}
    for position, data in enumerate(batch):
        key: object = position
        if data is not None:
            try:
                command = pipe.decode("pull.commands", data)
                key = (command["mailbox"], command["message_id"])
            except Exception:
                key = position
        groups.setdefault(key, []).append(data)
    return list(groups.values())


async def _run_heads_as_burst(
    pipe: Pipeline,
    groups: list[list[bytes | None]],
    route: Router,
    retry: RetryPolicy,
) -> set[int]:
    """Run the first command of each group together, so quarantines form bursts.

    Only commands that decode and are due now take part; the rest stay at the head
    of their group. Returns the positions of the groups whose head has run.
    """
    heads: list[tuple[int, Record]] = []
    for position, group in enumerate(groups):
        data = group[0]
        if data is None:
            continue
        try:
            command = pipe.decode("pull.commands", bytes(data))
        except Exception:  # noqa: S112 - `_run_command` dead-letters it
            continue
        if _seconds_until(command.get("not_before")) <= 0:
            heads.append((position, command))
    if len(heads) < 2:
        return set()

    commands = [command for _, command in heads]
    entries = [
        pipe.ledger.get(ledger_key(c["mailbox"], c["message_id"])) for c in commands
    ]
    try:
        results = await execute_many(
            commands, route, retry, entries, pipe.settings.quarantine_mailboxes()
        )
    except Exception:
        # Every pull of a burst is idempotent, so each runs again on its own.
        log.exception("A burst of %d pulls failed unexpectedly", len(commands))
        return set()
    for command, result in zip(commands, results, strict=True):
        await _report(pipe, command, result)
    return {position for position, _ in heads}


async def _run_in_order(
    pipe: Pipeline, group: list[bytes | None], route: Router, retry: RetryPolicy
) -> None:
    for data in group:
        await _run_command(pipe, data, route, retry)


async def _run_command(
    pipe: Pipeline, data: bytes | None, route: Router, retry: RetryPolicy
) -> None:
    """Run one command; whatever fails ends as an outcome or a dead letter."""
    body = bytes(data) if data is not None else b""
    try:
        command = pipe.decode("pull.commands", body)
    except Exception as error:
        reason = (
            "The pull command record has no value."
            if data is None
            else f"The pull command is not a valid record: {error}"
        )
        await pipe.dead_letter(
            None, source="pull.commands", stage="pull", reason=reason, body=body
        )
        return

    try:
        await _pull(pipe, command, route, retry)
    except Exception as error:
        log.exception(
            "Pull failed unexpectedly incident_id=%s mailbox=%s",
            command.get("incident_id"),
            command.get("mailbox"),
        )
        await pipe.dead_letter(
            None,
            source="pull.commands",
            stage="pull",
            reason=f"The pull failed unexpectedly: {type(error).__name__}: {error}",
            body=body,
        )


async def _pull(
    pipe: Pipeline, command: Record, route: Router, retry: RetryPolicy
) -> None:

    wait = _seconds_until(command.get("not_before"))
    if wait > 0:
        await asyncio.sleep(min(wait, pipe.settings.pull_max_wait_seconds))
    entry = pipe.ledger.get(ledger_key(command["mailbox"], command["message_id"]))
    result = await execute(
        command, route, retry, entry, pipe.settings.quarantine_mailboxes()
    )
    await _report(pipe, command, result)


async def _report(pipe: Pipeline, command: Record, result: PullResult) -> None:
    """Send a pull's outcome, park it again if still throttled, and log it."""
    await pipe.send("pull.outcomes", command["mailbox"], result.outcome)
    if result.parked is not None:
        await pipe.send("pull.commands", command["mailbox"], result.parked)
    outcome = result.outcome
    level = logging.WARNING if outcome["status"] == "failed" else logging.INFO
    log.log(
        level,
        "Pull finished incident_id=%s mailbox=%s message_id=%s status=%s "
        "attempts=%d error=%s",
        command["incident_id"],
        command["mailbox"],
        command["message_id"],
        outcome["status"],
        outcome["attempts"],
        outcome["error"],
    )


def _seconds_until(moment: datetime | None) -> float:
    if moment is None:
        return 0.0
    return (moment - utcnow()).total_seconds()


def _outcomes_agent(pipe: Pipeline) -> None:
    async def handle(event: EventT, outcome: Record) -> None:
        pipe.metrics.record_outcome(outcome)
        if outcome["status"] in ("quarantined", "already_quarantined", "restored"):
            # A copy found by search is recorded under its stand-in id, which its
            # commands carry, and under the real Message-ID, which other alerts use.
            message_ids = [outcome["message_id"], outcome.get("resolved_message_id")]
            for message_id in dict.fromkeys(filter(None, message_ids)):
                pipe.ledger[ledger_key(outcome["mailbox"], message_id)] = {
                    "status": outcome["status"],
                    "incident_id": outcome["incident_id"],
                    "original_folder": outcome["original_folder"],
                    "read": outcome["read"],
                    "at": outcome["finished_at"].timestamp(),
                }
        change = records.incident_event(
            outcome["incident_id"], "outcome", outcome=outcome
        )
        await pipe.send("incident.events", outcome["incident_id"], change)

    @pipe.app.agent(pipe.topics["pull.outcomes"], name="outcomes")
    async def outcomes(stream: StreamT) -> None:
        await pipe.run_each(stream, "pull.outcomes", "outcomes", handle)
