"""People's commands on incidents: approve, reject, release, retry, comment, close.

Commands go to incident.events keyed by incident id, like every other change, and
the incident agent alone applies them. Both the CLI and the REST API send them here.
"""

from __future__ import annotations

from confluent_kafka import Producer

from autopull.connectors.sources.common import checked_message_id
from autopull.connectors.sources.exceptions import InvalidAlertError
from autopull.schemas import AvroCodec
from autopull.streams import records
from autopull.streams.incidents import approve_targets, candidate_ids
from autopull.streams.settings import Settings
from autopull.streams.topics import full_name

ACTIONS = ("approve", "reject", "release", "retry", "comment", "close")
# The Java client's partitioner, which aiokafka and so Faust use too: a record keyed
# by incident id must land on the partition whose agent owns that incident.
KAFKA_PARTITIONER = "murmur2_random"
# Actors named like this are API keys; a person's name may not take that form.
API_ACTOR_PREFIX = "api:"


class CommandError(Exception):
    """A command that cannot be sent."""


def normalize_mailbox(mailbox: str | None) -> str | None:
    """Return `mailbox` stripped and in lower case, or None when none is given.

    Approve, reject and release without a mailbox act on every mailbox, so a blank
    value or one that is not an address raises CommandError instead of acting on
    every mailbox.
    """
    if mailbox is None:
        return None
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


def check_approve_pick(
    incident: records.Record, mailbox: str | None, message_id: str | None
) -> None:
    """Raise CommandError when an approve's Message-ID names no held copy.

    The incident agent would approve nothing, so the error lists the ids that the
    held copies and their searches offer instead.
    """
    if message_id is None or approve_targets(incident, mailbox, message_id):
        return
    offered: list[str] = []
    for entry in incident["pulls"]:
        if entry["status"] == "held" and mailbox in (None, entry["mailbox"]):
            offered.extend(candidate_ids(entry) or [entry["message_id"]])
    where = f" in {mailbox}" if mailbox is not None else ""
    listed = ", ".join(dict.fromkeys(offered)) or "none: no copy is held"
    raise CommandError(
        f"No held copy{where} of incident {incident['incident_id']} has the "
        f"Message-ID {message_id} or offers it as a search candidate. Held copies "
        f"and candidates: {listed}."
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
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "acks": "all",
            "partitioner": KAFKA_PARTITIONER,
        }
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
