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
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from aiokafka import AIOKafkaConsumer, TopicPartition
from faust.web import Request, Response, View

from autopull.schemas import AvroCodec, SchemaError
from autopull.streams.commands import ACTIONS, CommandError, command_event
from autopull.streams.records import Record
from autopull.streams.settings import Role
from autopull.streams.topics import full_name
from autopull.streams.views import (
    INCIDENT_STATES,
    incident_detail,
    matches,
    summary_row,
)

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
    "close": "analyst",
}


class IncidentReadModel:
    """The latest state of every incident, read from the incidents topic."""

    def __init__(self, pipe: Pipeline) -> None:
        self.pipe = pipe
        self.incidents: dict[str, Record] = {}
        self.caught_up = asyncio.Event()
        self.codec = AvroCodec("Incident", registry=pipe.settings.schema_registry_url)

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
                        self._apply(record.value)
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

    def _apply(self, value: bytes | None) -> None:
        if value is None:
            return
        try:
            incident = self.codec.loads(value)
        except SchemaError:
            log.exception("Skipping an unreadable record on the incidents topic")
            return
        self.incidents[incident["incident_id"]] = incident


def _json_error(view: View, status: int, code: str, message: str) -> Response:
    return view.json({"error": {"code": code, "message": message}}, status=status)


def _parse_time(value: str | None, name: str) -> datetime | None:
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as error:
        raise ValueError(
            f"Query parameter {name}={value!r} is not an ISO 8601 time."
        ) from error
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


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

    def authorize(
        view: View, request: Request, needed: Role
    ) -> tuple[Response | None, str]:
        """Check the bearer key; return an error response or None, and the key name."""
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            message = "Send an API key as 'Authorization: Bearer <key>'."
            return _json_error(view, 401, "unauthorized", message), ""
        digest = hashlib.sha256(token.strip().encode()).hexdigest()
        name, role = "", None
        for key_name, key in keys.items():
            if hmac.compare_digest(key.sha256, digest):
                name, role = key_name, key.role
        if role is None:
            return _json_error(
                view, 401, "unauthorized", "The API key is not valid."
            ), ""
        if ROLE_RANK[role] < ROLE_RANK[needed]:
            message = f"This API key has the {role} role; this request needs {needed}."
            return _json_error(view, 403, "forbidden", message), name
        return None, name

    @app.page("/livez")
    class Live(View):
        async def get(self, request: Request) -> Response:
            return self.json({"status": "alive"})

    @app.page("/readyz")
    class Ready(View):
        async def get(self, request: Request) -> Response:
            # A rebalance does not make a worker unready: every pod goes through the
            # same rebalance, and taking them all out of service at once helps nobody.
            recovered = app.tables.recovery.completed.is_set()
            ready = recovered and model.caught_up.is_set()
            body = {
                "ready": ready,
                "tables_recovered": recovered,
                "incidents_loaded": model.caught_up.is_set(),
                "rebalancing": bool(app.rebalancing),
            }
            return self.json(body, status=200 if ready else 503)

    @app.page("/metrics")
    class MetricsView(View):
        async def get(self, request: Request) -> Response:
            return self.bytes(
                pipe.metrics.render(), content_type="text/plain; version=0.0.4"
            )

    @app.page("/api/incidents")
    class Incidents(View):
        async def get(self, request: Request) -> Response:
            denied, _name = authorize(self, request, "read")
            if denied:
                return denied
            query = request.query
            state = query.get("state")
            if state and state not in INCIDENT_STATES:
                return _json_error(
                    self,
                    400,
                    "bad_request",
                    f"Query parameter state={state!r} is not a state; use one of "
                    f"{', '.join(INCIDENT_STATES)}.",
                )
            try:
                since = _parse_time(query.get("since"), "since")
                until = _parse_time(query.get("until"), "until")
            except ValueError as error:
                return _json_error(self, 400, "bad_request", str(error))
            found = [
                summary_row(incident)
                for incident in model.incidents.values()
                if matches(
                    incident,
                    state=query.get("state"),
                    message_id=query.get("message_id"),
                    mailbox=query.get("mailbox"),
                    since=since,
                    until=until,
                )
            ]
            found.sort(key=lambda row: row["updated_at"], reverse=True)
            return self.json({"incidents": found, "count": len(found)})

    @app.page("/api/incidents/{incident_id}")
    class Incident(View):
        async def get(self, request: Request, incident_id: str) -> Response:
            denied, _name = authorize(self, request, "read")
            if denied:
                return denied
            incident = model.incidents.get(incident_id)
            if incident is None:
                return _json_error(
                    self, 404, "not_found", f"Incident {incident_id} was not found."
                )
            return self.json(incident_detail(incident))

    @app.page("/api/incidents/{incident_id}/{action}")
    class Command(View):
        async def post(
            self, request: Request, incident_id: str, action: str
        ) -> Response:
            if action not in ACTIONS:
                return _json_error(
                    self, 404, "not_found", f"No action {action!r} on incidents."
                )
            denied, key_name = authorize(self, request, COMMAND_ROLES[action])
            if denied:
                return denied
            try:
                body = await _command_body(request)
            except ValueError as error:
                return _json_error(self, 400, "bad_request", str(error))
            if action == "release" and not body.get("mailbox"):
                denied, key_name = authorize(self, request, "admin")
                if denied:
                    return denied
            if incident_id not in model.incidents:
                return _json_error(
                    self, 404, "not_found", f"Incident {incident_id} was not found."
                )
            return await _send(self, pipe, incident_id, action, body, key_name)

    return model


async def _command_body(request: Request) -> dict[str, str]:
    """Return the command's JSON body; raise ValueError naming what is wrong."""
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError as error:
        raise ValueError(f"The request body is not valid JSON: {error}.") from error
    if not isinstance(body, dict):
        raise ValueError("The request body must be a JSON object.")
    for name in ("mailbox", "comment", "text"):
        if body.get(name) is not None and not isinstance(body[name], str):
            raise ValueError(f"The field {name!r} must be a string.")
    return {name: value for name, value in body.items() if isinstance(value, str)}


async def _send(
    view: View,
    pipe: Pipeline,
    incident_id: str,
    action: str,
    body: dict[str, str],
    key_name: str,
) -> Response:
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
        )
    except CommandError as error:
        return _json_error(view, 400, "bad_request", str(error))
    await pipe.send("incident.events", incident_id, event)
    log.info(
        "Command accepted incident_id=%s action=%s actor=%s", incident_id, action, actor
    )
    accepted = {"accepted": True, "incident_id": incident_id, "action": action}
    return view.json(accepted, status=202)
