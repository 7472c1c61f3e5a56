"""People's commands on incidents: approve, reject, release, retry, comment, close.

Commands go to incident.events keyed by incident id, like every other change, and
the incident agent alone applies them. Both the CLI and the REST API send them here.
"""

from __future__ import annotations

import copy
from functools import cache

from confluent_kafka import Producer

from autopull.connectors.sources.common import checked_message_id
from autopull.connectors.sources.exceptions import InvalidAlertError
from autopull.schemas import AvroCodec
from autopull.streams import records
from autopull.streams.incidents import (
    apply_command,
    approve_targets,
    candidate_ids,
    held_entries,
    retry_targets,
    trace_retry_targets,
)
from autopull.streams.settings import Settings
from autopull.streams.topics import client_config, full_name

ACTIONS = ("approve", "reject", "release", "retry", "comment", "close")
# The Java client's partitioner, which aiokafka and so Faust use too: a record keyed
# by incident id must land on the partition whose agent owns that incident.
KAFKA_PARTITIONER = "murmur2_random"
# Actors named like this are API keys; a person's name may not take that form.
API_ACTOR_PREFIX = "api:"


class CommandError(Exception):
    """A command that cannot be sent."""


class IncidentTooLargeError(CommandError):
    """A command that would make its incident larger than `incident_max_bytes`."""

    def __init__(self, message: str, *, size: int, limit: int) -> None:
        super().__init__(message)
        self.size = size
        self.limit = limit


def check_text(value: str | None, field: str) -> None:
    """Raise CommandError when `value` cannot be written as UTF-8.

    A JSON string may carry a lone UTF-16 surrogate such as "\\ud800", which no
    Avro string can hold.
    """
    if value is None:
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise CommandError(
            f"The {field} contains a lone UTF-16 surrogate at position "
            f"{error.start}, which is not text; send it as valid Unicode."
        ) from None


def normalize_mailbox(mailbox: str | None) -> str | None:
    """Return `mailbox` stripped and in lower case, or None when none is given.

    Approve, reject and release without a mailbox act on every mailbox, so a blank
    value or one that is not an address raises CommandError instead of acting on
    every mailbox.
    """
    if mailbox is None:
        return None
    check_text(mailbox, "mailbox")
    address = mailbox.strip().lower()
    if not address:
        raise CommandError(
            "The mailbox is blank. Give an address such as alice@example.com, or "
            "leave the mailbox out to act on every mailbox of the incident."
        )
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain or any(c.isspace() for c in address):
        raise CommandError(
            f"The mailbox {mailbox!r} is not an email address. Give an address "
            "such as alice@example.com."
        )
    return address


def normalize_message_id(message_id: str | None) -> str | None:
    """Return the bare form of a Message-ID given to approve, or None.

    Raises CommandError for a blank id, one with a line break or control
    character, and one longer than a header line can carry.
    """
    if message_id is None:
        return None
    check_text(message_id, "Message-ID")
    try:
        bare = checked_message_id(message_id, field="message_id")
    except InvalidAlertError as error:
        raise CommandError(str(error)) from error
    if not bare:
        raise CommandError(
            "The Message-ID is blank. Give the id of one held copy or of one "
            "candidate that `autopull incident show` lists, or leave it out to "
            "approve every held copy."
        )
    return bare


def check_mailbox(incident: records.Record, mailbox: str | None) -> None:
    """Raise CommandError when `mailbox` has no copy in `incident`.

    Such a command would change nothing, yet the history would record it.
    """
    if mailbox is None:
        return
    mailboxes = sorted({entry["mailbox"] for entry in incident["pulls"]})
    if mailbox in mailboxes:
        return
    listed = ", ".join(mailboxes) or "none"
    raise CommandError(
        f"The mailbox {mailbox} has no copy in incident {incident['incident_id']}. "
        f"Its mailboxes are: {listed}."
    )


def check_approve_pick(
    incident: records.Record, mailbox: str | None, message_id: str | None
) -> None:
    """Raise CommandError when an approve can pull nothing it names.

    The incident agent would approve nothing, so the error gives the reason: no
    copy is held, the held copies have no Message-ID to pull them by, or no held
    copy has the Message-ID and no search offered it. The last error lists the
    ids that are offered.
    """
    held = held_entries(incident, mailbox)
    where = f" in {mailbox}" if mailbox is not None else ""
    if not held:
        raise CommandError(
            f"Incident {incident['incident_id']} has no held copy{where}, so there "
            "is nothing to approve; `autopull incident show` lists each copy's status."
        )
    if approve_targets(incident, mailbox, message_id):
        return
    named = [
        entry
        for entry in held
        if message_id in (None, entry["message_id"], entry.get("resolved_message_id"))
    ]
    if named:
        # Every copy the approve names is held in a way no pull can resolve.
        raise CommandError(
            f"The held copies{where} of incident {incident['incident_id']} have no "
            "Message-ID to pull them by, and a new search would find the same "
            "messages without one. Reject them, or remove the message on the mail "
            "server."
        )
    offered: list[str] = []
    for entry in held:
        offered.extend(candidate_ids(entry) or [entry["message_id"]])
    listed = ", ".join(dict.fromkeys(offered)) or "none: no copy is held"
    raise CommandError(
        f"No held copy{where} of incident {incident['incident_id']} has the "
        f"Message-ID {message_id} or offers it as a search candidate. Held copies "
        f"and candidates: {listed}."
    )


def check_reject(incident: records.Record, mailbox: str | None) -> None:
    """Raise CommandError when `incident` has no held copy (in `mailbox`) to reject.

    The incident agent would reject nothing, yet the history would record it.
    """
    if held_entries(incident, mailbox):
        return
    where = f" in {mailbox}" if mailbox is not None else ""
    raise CommandError(
        f"Incident {incident['incident_id']} has no held copy{where}, so there is "
        "nothing to reject; `autopull incident show` lists each copy's status."
    )


def check_retry(incident: records.Record, mailbox: str | None) -> None:
    """Raise CommandError when no pull or forward search of `incident` has failed.

    With `mailbox`, only the copies in that mailbox count.
    """
    if retry_targets(incident, mailbox) or trace_retry_targets(incident, mailbox):
        return
    where = f" in {mailbox}" if mailbox is not None else ""
    raise CommandError(
        f"No pull or forward search{where} of incident {incident['incident_id']} "
        "has failed, so there is nothing to retry; `autopull incident show` lists "
        "each copy's status."
    )


@cache
def _incident_codec() -> AvroCodec:
    # The incident table's codec: plain Avro, without a registry's framing.
    return AvroCodec("Incident")


def check_incident_size(
    incident: records.Record, event: records.Record, max_bytes: int
) -> None:
    """Raise IncidentTooLargeError when `event` would make `incident` too large.

    The command of `event` is applied to a copy of `incident`, as the incident
    agent applies it, and the copy is encoded as the incident table stores it.
    The agent checks again on its own, newer state of the incident and sends an
    event that is too large there to alerts.dead.
    """
    changed = copy.deepcopy(incident)
    command = event["command"]
    apply_command(changed, command)
    size = len(_incident_codec().dumps(changed))
    if size <= max_bytes:
        return
    fix = (
        "Send a shorter text, or raise AUTOPULL_INCIDENT_MAX_BYTES."
        if command["text"]
        else "Raise AUTOPULL_INCIDENT_MAX_BYTES to change this incident."
    )
    raise IncidentTooLargeError(
        f"The {command['action']} would make incident {incident['incident_id']} "
        f"{size:,} bytes, above the maximum of {max_bytes:,} bytes that "
        f"AUTOPULL_INCIDENT_MAX_BYTES sets, so it was not sent. {fix}",
        size=size,
        limit=max_bytes,
    )


def command_event(
    incident_id: str,
    action: str,
    actor: str,
    *,
    mailbox: str | None = None,
    text: str | None = None,
    message_id: str | None = None,
) -> records.Record:
    """Build the IncidentEvent that carries one command.

    Raises CommandError for an unknown action, a missing actor or comment text,
    a mailbox that `normalize_mailbox` rejects, and a Message-ID on a command
    other than approve or one that `normalize_message_id` rejects.
    """
    if action not in ACTIONS:
        raise CommandError(
            f"Unknown command {action!r}; use one of {', '.join(ACTIONS)}."
        )
    if not actor.strip():
        raise CommandError("A command needs the name of the person who gives it.")
    if action == "comment" and not (text or "").strip():
        raise CommandError("A comment needs its text; it was empty.")
    check_text(text, "comment")
    check_text(actor, "actor")
    if message_id is not None and action != "approve":
        raise CommandError(
            f"A Message-ID picks the copy to approve, so {action} does not take "
            "one; leave it out."
        )
    command = {
        "action": action,
        "actor": actor.strip(),
        "mailbox": normalize_mailbox(mailbox),
        "message_id": normalize_message_id(message_id),
        "text": text,
    }
    return records.incident_event(incident_id, "command", command=command)


def send_command(
    settings: Settings, event: records.Record, timeout: float = 30
) -> None:
    """Send a command event to incident.events and wait for its acknowledgement."""
    topic = full_name(settings, "incident.events")
    codec = AvroCodec(
        "IncidentEvent", registry=settings.schema_registry_url, subject=f"{topic}-value"
    )
    producer = Producer(
        client_config(settings, {"acks": "all", "partitioner": KAFKA_PARTITIONER})
    )
    errors: list[str] = []

    def done(error: object, _message: object) -> None:
        if error is not None:
            errors.append(str(error))

    producer.produce(
        topic,
        key=event["incident_id"].encode(),
        value=codec.dumps(event),
        on_delivery=done,
    )
    if producer.flush(timeout) or errors:
        raise CommandError(
            f"Kafka did not acknowledge the command for incident "
            f"{event['incident_id']}: {'; '.join(errors) or 'timed out'}. "
            "Send it again."
        )
