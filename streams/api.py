"""The REST API, health probes and metrics on the worker's web server.

Incidents are served from a read model that follows the compacted incidents topic
from its start, so any worker serves every incident, whichever partition owns
it. Changes go to incident.events as commands for the incident agent.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from aiohttp.web import json_response
from aiokafka import AIOKafkaConsumer, TopicPartition
from faust.web import Request, Response

from autopull.connectors.sources.common import parse_json_int
from autopull.schemas import AvroCodec, SchemaError
from autopull.streams.broker_state import broker_problem
from autopull.streams.commands import (
    ACTIONS,
    CommandError,
    IncidentTooLargeError,
    check_approve_pick,
    check_incident_size,
    check_mailbox,
    check_reject,
    check_retry,
    command_event,
    normalize_mailbox,
    normalize_message_id,
)
from autopull.streams.records import Record
from autopull.streams.settings import Role
from autopull.streams.topics import full_name
from autopull.streams.views import (
    INCIDENT_STATES,
    incident_detail,
    matches,
    summary_row,
)
from autopull.streams.web_errors import json_error
from autopull.streams.web_views import RouteView

if TYPE_CHECKING:
    from autopull.streams.app import Pipeline

log = logging.getLogger(__name__)

ROLE_RANK = {"read": 0, "analyst": 1, "admin": 2}
# The role each command needs. Releasing a whole incident needs admin instead.
COMMAND_ROLES: dict[str, Role] = {
    "approve": "analyst",
    "reject": "analyst",
    "comment": "analyst",
    "release": "analyst",
    "retry": "analyst",
    "close": "analyst",
}
# Query parameters of GET /api/incidents. Another name, or one given twice, is a 400.
LIST_PARAMETERS = ("state", "since", "until", "message_id", "mailbox")
# Fields of a command body. A command carries an address and a short note, so its
# body has a limit far below the web server's own (1 MiB).
COMMAND_FIELDS = ("mailbox", "message_id", "comment", "text")
COMMAND_MAX_BYTES = 64 * 1024


class RequestError(Exception):
    """A request that the API rejects, with the status and code of its reply."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def response(self) -> Response:
        """Return the JSON error reply."""
        return json_error(self.status, self.code, self.message)


class LatestIncidents(Mapping[str, Record]):
    """Incidents by id, kept as their latest encoded record and decoded when read.

    The incidents topic carries the whole incident after every change, and most of
    those records are replaced before anyone reads them, so decoding each one on
    arrival would cost a full decode per change. A record that cannot be decoded
    is logged and skipped, and the incident keeps the state it had when last read.
    """

    def __init__(self, codec: AvroCodec) -> None:
        self.codec = codec
        self._encoded: dict[str, bytes] = {}
        self._decoded: dict[str, Record] = {}

    def put(self, incident_id: str, data: bytes) -> None:
        """Keep `data` as the latest record of `incident_id`, to decode on read."""
        self._encoded[incident_id] = data

    def __getitem__(self, incident_id: str) -> Record:
        data = self._encoded.pop(incident_id, None)
        if data is not None:
            self._decode(incident_id, data)
        return self._decoded[incident_id]

    def __iter__(self) -> Iterator[str]:
        self._decode_all()
        return iter(self._decoded)

    def __len__(self) -> int:
        self._decode_all()
        return len(self._decoded)

    def _decode_all(self) -> None:
        encoded, self._encoded = self._encoded, {}
        for incident_id, data in encoded.items():
            self._decode(incident_id, data)

    def _decode(self, incident_id: str, data: bytes) -> None:
        try:
            self._decoded[incident_id] = self.codec.loads(data)
        except SchemaError:
            log.exception(
                "Skipping an unreadable record on the incidents topic incident_id=%s",
                incident_id,
            )


class IncidentReadModel:
    """The latest state of every incident, read from the incidents topic."""

    def __init__(self, pipe: Pipeline) -> None:
        self.pipe = pipe
        # The topic's records carry the registry's framing when one is configured.
        self.codec = pipe.codecs["incidents"]
        self.incidents = LatestIncidents(self.codec)
        self.caught_up = asyncio.Event()

    async def run(self) -> None:
        """Follow the topic until cancelled; set `caught_up` once at its end."""
        topic = full_name(self.pipe.settings, "incidents")
        # Without a group, aiokafka assigns every partition of the topic, and
        # "earliest" starts each at its beginning.
        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=self.pipe.settings.kafka_bootstrap,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            group_id=None,
        )
        await consumer.start()
        try:
            ends: dict[TopicPartition, int] | None = None
            while True:
                batches = await consumer.getmany(timeout_ms=500)
                for records in batches.values():
                    for record in records:
                        self._apply(record.key, record.value)
                if self.caught_up.is_set() or not consumer.assignment():
                    continue
                partitions = sorted(consumer.assignment())
                if ends is None:
                    ends = await consumer.end_offsets(partitions)
                positions = [await consumer.position(p) for p in partitions]
                if all(
                    pos >= ends[p] for pos, p in zip(positions, partitions, strict=True)
                ):
                    self.caught_up.set()
        finally:
            await consumer.stop()

    def _apply(self, key: bytes | None, value: bytes | None) -> None:
        if value is None:
            return
        if key is not None:
            # The incident agent keys each record by its incident id.
            self.incidents.put(key.decode(errors="replace"), value)
            return
        try:
            incident = self.codec.loads(value)
        except SchemaError:
            log.exception("Skipping an unreadable record on the incidents topic")
            return
        self.incidents.put(incident["incident_id"], value)


def _parse_time(value: str | None, name: str) -> datetime | None:
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as error:
        raise RequestError(
            400,
            "bad_request",
            f"Query parameter {name}={value!r} is not an ISO 8601 time. Send one "
            "such as 2026-12-01T09:00:00Z.",
        ) from error
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _list_filters(query: Any) -> dict[str, Any]:
    """Return the filters of the incident list; raise RequestError for a bad one.

    `query` is the request's multidict. An empty value counts as unset.
    """
    unknown = sorted(set(query) - set(LIST_PARAMETERS))
    if unknown:
        raise RequestError(
            400,
            "bad_request",
            f"Query parameter {unknown[0]!r} is not known. Use "
            f"{', '.join(LIST_PARAMETERS)}.",
        )
    filters: dict[str, Any] = {}
    for name in LIST_PARAMETERS:
        values = query.getall(name, [])
        if len(values) > 1:
            raise RequestError(
                400,
                "bad_request",
                f"Query parameter {name} is given {len(values)} times. Give it once.",
            )
        filters[name] = values[0] if values and values[0] else None
    state = filters["state"]
    if state is not None and state not in INCIDENT_STATES:
        raise RequestError(
            400,
            "bad_request",
            f"Query parameter state={state!r} is not a state; use one of "
            f"{', '.join(INCIDENT_STATES)}.",
        )
    filters["since"] = _parse_time(filters["since"], "since")
    filters["until"] = _parse_time(filters["until"], "until")
    return filters


def register_api(pipe: Pipeline) -> IncidentReadModel:
    """Add the probes, metrics and REST API routes to the pipeline's web server."""
    app = pipe.app
    model = IncidentReadModel(pipe)
    keys = pipe.settings.api_keys

    @app.task
    async def follow_incidents() -> None:
        try:
            await model.run()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("The incident read model stopped; the API is not ready")
            raise

    def authorize(request: Request, needed: Role) -> tuple[Response | None, str]:
        """Check the bearer key; return an error response or None, and the key name."""
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            message = "Send an API key as 'Authorization: Bearer <key>'."
            return json_error(401, "unauthorized", message), ""
        digest = hashlib.sha256(token.strip().encode()).hexdigest()
        name, role = "", None
        for key_name, key in keys.items():
            if hmac.compare_digest(key.sha256, digest):
                name, role = key_name, key.role
        if role is None:
            return json_error(401, "unauthorized", "The API key is not valid."), ""
        if ROLE_RANK[role] < ROLE_RANK[needed]:
            message = f"This API key has the {role} role; this request needs {needed}."
            return json_error(403, "forbidden", message), name
        return None, name

    @app.page("/livez")
    class Live(RouteView):
        async def get(self, request: Request) -> Response:
            if pipe.watchdog.failed:
                return self.json({"status": "stalled"}, status=503)
            return self.json({"status": "alive"})

    @app.page("/readyz")
    class Ready(RouteView):
        async def get(self, request: Request) -> Response:
            # A rebalance does not make a worker unready: every pod goes through the
            # same rebalance, and taking them all out of service at once helps nobody.
            recovered = app.tables.recovery.completed.is_set()
            loaded = model.caught_up.is_set()
            problem = broker_problem(app.consumer)
            reasons = []
            if not recovered:
                reasons.append("The tables are still recovering from their changelogs.")
            if not loaded:
                reasons.append(
                    "The incident read model has not reached the end of the "
                    "incidents topic yet."
                )
            if problem is not None:
                reasons.append(problem)
            body = {
                "ready": not reasons,
                "tables_recovered": recovered,
                "incidents_loaded": loaded,
                "broker_connected": problem is None,
                "rebalancing": bool(app.rebalancing),
                "reasons": reasons,
            }
            return self.json(body, status=503 if reasons else 200)

    @app.page("/metrics")
    class MetricsView(RouteView):
        async def get(self, request: Request) -> Response:
            return self.bytes(
                pipe.metrics.render(), content_type="text/plain; version=0.0.4"
            )

    @app.page("/api/incidents")
    class Incidents(RouteView):
        async def get(self, request: Request) -> Response:
            denied, _name = authorize(request, "read")
            if denied:
                return denied
            try:
                filters = _list_filters(request.query)
            except RequestError as error:
                return error.response()
            found = [
                summary_row(incident)
                for incident in model.incidents.values()
                if matches(incident, **filters)
            ]
            found.sort(key=lambda row: row["updated_at"], reverse=True)
            return self.json({"incidents": found, "count": len(found)})

    @app.page("/api/incidents/{incident_id}")
    class Incident(RouteView):
        async def get(self, request: Request, incident_id: str) -> Response:
            denied, _name = authorize(request, "read")
            if denied:
                return denied
            incident = model.incidents.get(incident_id)
            if incident is None:
                return json_error(
                    404, "not_found", f"Incident {incident_id} was not found."
                )
            return self.json(incident_detail(incident))

    @app.page("/api/incidents/{incident_id}/{action}")
    class Command(RouteView):
        async def post(
            self, request: Request, incident_id: str, action: str
        ) -> Response:
            if action not in ACTIONS:
                return json_error(
                    404,
                    "not_found",
                    f"No action {action!r} on incidents; use one of "
                    f"{', '.join(ACTIONS)}.",
                )
            denied, key_name = authorize(request, COMMAND_ROLES[action])
            if denied:
                return denied
            try:
                body = await _command_body(request)
                mailbox = normalize_mailbox(body.get("mailbox"))
            except RequestError as error:
                return error.response()
            except CommandError as error:
                return json_error(400, "bad_request", str(error))
            # The role follows the normalized mailbox, which the incident agent
            # applies: only a missing one releases every copy.
            if action == "release" and mailbox is None:
                denied, key_name = authorize(request, "admin")
                if denied:
                    return denied
            incident = model.incidents.get(incident_id)
            if incident is None:
                return json_error(
                    404, "not_found", f"Incident {incident_id} was not found."
                )
            try:
                message_id = normalize_message_id(body.get("message_id"))
                check_mailbox(incident, mailbox)
                if action == "approve":
                    check_approve_pick(incident, mailbox, message_id)
                elif action == "reject":
                    check_reject(incident, mailbox)
                elif action == "retry":
                    check_retry(incident, mailbox)
            except CommandError as error:
                return json_error(400, "bad_request", str(error))
            return await _check_and_send(pipe, incident, action, body, key_name)

    return model


async def _command_body(request: Request) -> dict[str, str]:
    """Return the fields of the command's JSON body that are set.

    Raises RequestError naming what is wrong: a body over COMMAND_MAX_BYTES, JSON
    that does not parse, a value that is not an object, an unknown or repeated
    field, or a field that is not a string. An empty body is an empty object.
    """
    raw = await _read_limited(request, COMMAND_MAX_BYTES)
    if not raw.strip():
        return {}
    try:
        body = json.loads(
            raw, parse_int=parse_json_int, object_pairs_hook=_unique_fields
        )
    except ValueError as error:
        raise RequestError(
            400,
            "bad_request",
            f"The request body could not be parsed as JSON: {error}. Send a JSON "
            "object.",
        ) from error
    if not isinstance(body, dict):
        raise RequestError(
            400,
            "bad_request",
            f"The request body is {_json_kind(body)}, but it must be a JSON object "
            'such as {"mailbox": "alice@example.com"}.',
        )
    for name, value in body.items():
        if name not in COMMAND_FIELDS:
            raise RequestError(
                400,
                "bad_request",
                f"The field {name!r} is not known. Use {', '.join(COMMAND_FIELDS)}.",
            )
        if value is not None and not isinstance(value, str):
            raise RequestError(
                400, "bad_request", f"The field {name!r} must be a string."
            )
    return {name: value for name, value in body.items() if value is not None}


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return "a string" if isinstance(value, str) else "an array"


async def _read_limited(request: Request, limit: int) -> bytes:
    """Read the body, raising RequestError (413) once it is over `limit` bytes."""
    declared = request.content_length
    chunks: list[bytes] = []
    size = 0
    if declared is None or declared <= limit:
        while size <= limit:
            chunk = await request.content.read(limit + 1 - size)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            size += len(chunk)
    raise RequestError(
        413,
        "too_large",
        f"The request body is larger than the command limit of {limit} bytes. "
        "Send only mailbox, comment and text.",
    )


def _unique_fields(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # A repeated field is ambiguous, and a repeated mailbox could widen a release.
    result: dict[str, Any] = {}
    for name, value in pairs:
        if name in result:
            raise RequestError(
                400,
                "bad_request",
                f"The field {name!r} appears twice in the request body. Give it once.",
            )
        result[name] = value
    return result


async def _check_and_send(
    pipe: Pipeline,
    incident: Record,
    action: str,
    body: dict[str, str],
    key_name: str,
) -> Response:
    """Build the command, check the incident's size after it, and send it.

    The reply is 400 for a command that cannot be built, 413 for one that would
    make the incident larger than `incident_max_bytes`, and otherwise `_send`'s.
    """
    incident_id = incident["incident_id"]
    # The actor is the API key's name, so the history records who really acted.
    actor = f"api:{key_name}"
    text = body.get("comment") or body.get("text")
    try:
        event = command_event(
            incident_id,
            action,
            actor,
            mailbox=body.get("mailbox"),
            text=text or None,
            message_id=body.get("message_id"),
        )
    except CommandError as error:
        return json_error(400, "bad_request", str(error))

    # Copying, changing and encoding an incident of 20,000 mailboxes took about
    # 0.5 s in one run on 2 cores, so the check runs outside the event loop. The
    # read model replaces an incident's record and never changes it in place.
    limit = pipe.settings.incident_max_bytes
    try:
        await asyncio.to_thread(check_incident_size, incident, event, limit)
    except IncidentTooLargeError as error:
        log.info(
            "Rejected a command that would make its incident too large "
            "incident_id=%s action=%s bytes=%d limit=%d",
            incident_id,
            action,
            error.size,
            error.limit,
        )
        return json_error(413, "too_large", str(error))
    return await _send(pipe, incident_id, action, event, actor)


async def _send(
    pipe: Pipeline, incident_id: str, action: str, event: Record, actor: str
) -> Response:
    """Send the command and reply 202 only once Kafka acknowledged it (acks=all)."""
    topic = pipe.topics["incident.events"]
    value = pipe.codecs["incident.events"].dumps(event)

    async def send_acknowledged() -> None:
        # Topic.send returns once the record is queued, with a future that resolves
        # when the broker acknowledged it with the app's acks=-1. The shield keeps
        # a timeout from cancelling that future, whose Faust callback fails on a
        # cancelled one.
        pending = await topic.send(key=incident_id.encode(), value=value, force=True)
        await asyncio.shield(pending)

    timeout = pipe.settings.api_ack_timeout_seconds
    try:
        await asyncio.wait_for(send_acknowledged(), timeout)
    except TimeoutError:
        log.error(
            "Kafka did not acknowledge a command incident_id=%s action=%s "
            "within timeout_s=%s",
            incident_id,
            action,
            timeout,
        )
        return _unavailable(f"within {timeout} s")
    except Exception as error:
        log.exception(
            "Sending a command failed incident_id=%s action=%s", incident_id, action
        )
        return _unavailable(f"({type(error).__name__})")
    log.info(
        "Command accepted incident_id=%s action=%s actor=%s", incident_id, action, actor
    )
    accepted = {"accepted": True, "incident_id": incident_id, "action": action}
    return json_response(accepted, status=202)


def _unavailable(detail: str) -> Response:
    # NOTE: a command that timed out can still reach Kafka later from the
    # producer's buffer, so a client that sends it again may see it applied twice.
    return json_error(
        503,
        "unavailable",
        f"Kafka did not acknowledge the command {detail}. Read the incident, "
        "and send the command again later if its history does not show it.",
    )
