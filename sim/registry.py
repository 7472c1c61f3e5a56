"""Minimal Confluent Schema Registry: the REST subset that Avro serializers use.

Schemas are kept in memory. Ids are global and start at 1. Registering a schema
that a subject already has returns its id and adds no version, and registering it
under another subject reuses the id, as the real registry does. Two schema texts
are the same schema when their JSON is equal, whatever the white space or key
order. Compatibility checks are not simulated.

Run it with ``python -m autopull.sim registry --port 8081``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from fastavro import parse_schema
from fastavro.schema import SchemaParseException

logger = logging.getLogger(__name__)

CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"
MAX_VERSION = 2**31 - 1


@dataclass
class RegistryState:
    """Registered schemas: global ids, and the ids of each subject's versions."""

    schemas: list[str] = field(default_factory=list)
    ids_by_key: dict[str, int] = field(default_factory=dict)
    subjects: dict[str, list[int]] = field(default_factory=dict)

    def register(self, subject: str, schema: str) -> int:
        """Store `schema` under `subject` unless present, and return its id."""
        key = _schema_key(schema)
        schema_id = self.ids_by_key.get(key)
        if schema_id is None:
            self.schemas.append(schema)
            schema_id = len(self.schemas)
            self.ids_by_key[key] = schema_id

        versions = self.subjects.setdefault(subject, [])
        if schema_id not in versions:
            versions.append(schema_id)
            logger.info(
                "Registered schema subject=%s version=%d id=%d",
                subject,
                len(versions),
                schema_id,
            )
        return schema_id

    def schema(self, schema_id: int) -> str | None:
        """Return the schema text with `schema_id`, or None."""
        if 1 <= schema_id <= len(self.schemas):
            return self.schemas[schema_id - 1]
        return None


def _schema_key(schema: str) -> str:
    return json.dumps(json.loads(schema), sort_keys=True, separators=(",", ":"))


STATE_KEY = web.AppKey("state", RegistryState)


def create_app(state: RegistryState | None = None) -> web.Application:
    """Build the registry's aiohttp application over `state` (a new one if None)."""
    app = web.Application()
    app[STATE_KEY] = state or RegistryState()
    app.router.add_get("/subjects", list_subjects)
    app.router.add_post("/subjects/{subject}/versions", register_schema)
    app.router.add_post("/subjects/{subject}", lookup_schema)
    app.router.add_get("/subjects/{subject}/versions", list_versions)
    app.router.add_get("/subjects/{subject}/versions/{version}", get_version)
    app.router.add_get("/schemas/ids/{schema_id}", get_schema)
    return app


async def start_registry(host: str = "127.0.0.1", port: int = 0) -> web.AppRunner:
    """Start the registry in the running event loop and return its runner.

    With port 0 the system picks a free port; ``runner.addresses[0]`` contains the
    bound host and port. Stop the registry with ``await runner.cleanup()``.
    """
    runner = web.AppRunner(create_app())
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound_host, bound_port = runner.addresses[0][:2]
    logger.info("Schema registry started host=%s port=%d", bound_host, bound_port)
    return runner


# --- Handlers -------------------------------------------------------------------


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(body), status=status, content_type=CONTENT_TYPE)


def _error(status: int, error_code: int, message: str) -> web.Response:
    logger.info(
        "Rejected registry request status=%d error_code=%d message=%s",
        status,
        error_code,
        message,
    )
    return _json({"error_code": error_code, "message": message}, status)


async def list_subjects(request: web.Request) -> web.Response:
    """Return the names of all subjects (GET /subjects)."""
    return _json(sorted(request.app[STATE_KEY].subjects))


async def register_schema(request: web.Request) -> web.Response:
    """Register a schema and return its id (POST /subjects/{subject}/versions)."""
    schema_or_error = await _schema_from_body(request)
    if isinstance(schema_or_error, web.Response):
        return schema_or_error

    state = request.app[STATE_KEY]
    schema_id = state.register(request.match_info["subject"], schema_or_error)
    return _json({"id": schema_id})


async def lookup_schema(request: web.Request) -> web.Response:
    """Return the version and id of a schema in a subject (POST /subjects/{subject})."""
    schema_or_error = await _schema_from_body(request)
    if isinstance(schema_or_error, web.Response):
        return schema_or_error

    state = request.app[STATE_KEY]
    subject = request.match_info["subject"]
    versions = state.subjects.get(subject)
    if versions is None:
        return _error(404, 40401, f"Subject '{subject}' not found.")
    schema_id = state.ids_by_key.get(_schema_key(schema_or_error))
    if schema_id is None or schema_id not in versions:
        return _error(404, 40403, "Schema not found")
    return _version_body(state, subject, versions.index(schema_id) + 1)


async def list_versions(request: web.Request) -> web.Response:
    """Return the version numbers of a subject (GET /subjects/{subject}/versions)."""
    subject = request.match_info["subject"]
    versions = request.app[STATE_KEY].subjects.get(subject)
    if versions is None:
        return _error(404, 40401, f"Subject '{subject}' not found.")
    return _json(list(range(1, len(versions) + 1)))


async def get_version(request: web.Request) -> web.Response:
    """Return one version of a subject, or ``latest`` (GET .../versions/{version})."""
    state = request.app[STATE_KEY]
    subject = request.match_info["subject"]
    versions = state.subjects.get(subject)
    if versions is None:
        return _error(404, 40401, f"Subject '{subject}' not found.")

    text = request.match_info["version"]
    version = len(versions) if text in ("latest", "-1") else _int_or_none(text)
    if version is None or not 1 <= version <= MAX_VERSION:
        return _error(
            422,
            42202,
            f"The specified version '{text}' is not a valid version id. Allowed "
            'values are between [1, 2^31-1] and the string "latest"',
        )
    if version > len(versions):
        return _error(404, 40402, f"Version {version} not found.")
    return _version_body(state, subject, version)


async def get_schema(request: web.Request) -> web.Response:
    """Return the schema text with an id (GET /schemas/ids/{schema_id})."""
    schema_id = _int_or_none(request.match_info["schema_id"])
    schema = None if schema_id is None else request.app[STATE_KEY].schema(schema_id)
    if schema is None:
        return _error(404, 40403, "Schema not found")
    return _json({"schema": schema})


def _version_body(state: RegistryState, subject: str, version: int) -> web.Response:
    schema_id = state.subjects[subject][version - 1]
    return _json(
        {
            "subject": subject,
            "version": version,
            "id": schema_id,
            "schema": state.schema(schema_id),
        }
    )


async def _schema_from_body(request: web.Request) -> str | web.Response:
    """Return the Avro schema text of a request body, or the error response."""
    try:
        body = await request.json()
    except ValueError:
        return _error(400, 400, "The request body is not valid JSON.")
    if not isinstance(body, dict) or not isinstance(body.get("schema"), str):
        return _error(422, 42201, "Invalid schema: the body has no schema string.")

    schema_type = body.get("schemaType", "AVRO")
    if schema_type != "AVRO":
        return _error(
            422, 42201, f"Invalid schema: schemaType {schema_type} is not supported."
        )
    if body.get("references"):
        return _error(422, 42201, "Invalid schema: references are not supported.")

    try:
        parse_schema(json.loads(body["schema"]))
    except (ValueError, KeyError, TypeError, SchemaParseException) as error:
        return _error(422, 42201, f"Invalid schema: {error}")
    return str(body["schema"])


def _int_or_none(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None
