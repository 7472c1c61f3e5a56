"""Avro encoding of every Autopull topic value, with or without a schema registry.

Two standard wire formats are written:

- Avro single-object encoding when no registry is configured: the marker bytes
  ``C3 01``, the 8-byte little-endian CRC-64-AVRO fingerprint of the writer schema's
  Parsing Canonical Form, then the Avro binary body.
- Confluent framing when a registry is configured: magic byte ``0``, the 4-byte
  big-endian schema id, then the Avro binary body.

Decoding accepts both, finds the writer schema by fingerprint (current and released
schemas) or by registry id, and reads with the current schema, so data written with
an older released schema stays readable. Values are plain dicts matching the
schemas; timestamps are timezone-aware datetimes and come back in UTC.
"""

from __future__ import annotations

import datetime
import functools
import io
import json
import logging
import reprlib
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import httpx
from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.read import SchemaResolutionError
from fastavro.schema import (
    SchemaParseException,
    fingerprint,
    to_parsing_canonical_form,
)
from fastavro.types import Schema
from fastavro.validation import ValidationError, validate
from faust.serializers.codecs import Codec

logger = logging.getLogger(__name__)

SCHEMA_DIRECTORY = Path(__file__).resolve().parent
RELEASED_DIRECTORY = SCHEMA_DIRECTORY / "released"

SINGLE_OBJECT_MARKER = b"\xc3\x01"
SINGLE_OBJECT_HEADER_SIZE = 10
CONFLUENT_MAGIC = b"\x00"
CONFLUENT_HEADER_SIZE = 5
REGISTRY_CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"

_PRIMITIVES = frozenset(
    {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}
)
_NAMED_KINDS = frozenset({"record", "error", "enum", "fixed"})
_TIMESTAMP_TYPES = frozenset({"timestamp-millis", "timestamp-micros"})

# Exceptions that fastavro raises on a value that does not match the schema.
_WRITE_ERRORS = (ValueError, TypeError, AttributeError, KeyError, OverflowError)

# Exceptions that fastavro raises on a body that is truncated or not Avro at all.
_READ_ERRORS = (
    EOFError,
    IndexError,
    ValueError,
    TypeError,
    OverflowError,
    MemoryError,
    struct.error,
)


class SchemaError(ValueError):
    """A value or message that does not match the Autopull schemas."""


class RegistryError(Exception):
    """The schema registry failed or rejected a request.

    `retriable` is true for transport failures and 5xx responses, which a later
    attempt may get past. A 4xx response repeats until the request changes.
    """

    def __init__(
        self,
        message: str,
        *,
        url: str,
        status_code: int | None = None,
        error_code: int | None = None,
    ) -> None:
        super().__init__(message)
        self.url = url
        self.status_code = status_code
        self.error_code = error_code
        self.retriable = status_code is None or status_code >= 500


TimestampCheck = Callable[[Any, str], None]


@dataclass(frozen=True)
class RecordSchema:
    """One self-contained record schema, parsed and fingerprinted once."""

    name: str
    full_name: str
    schema: dict[str, Any] = field(repr=False)
    parsed: Schema = field(repr=False, compare=False)
    canonical_form: str = field(repr=False)
    fingerprint: bytes
    release: str | None = None
    check_timestamps: TimestampCheck | None = field(
        default=None, repr=False, compare=False
    )

    @property
    def schema_json(self) -> str:
        """Compact JSON text of the schema, as registered in a schema registry."""
        return json.dumps(self.schema, separators=(",", ":"))

    @property
    def single_object_header(self) -> bytes:
        """Marker and fingerprint that start every single-object message."""
        return SINGLE_OBJECT_MARKER + self.fingerprint

    @property
    def origin(self) -> str:
        """Source of the schema, as error messages name it."""
        return "the current schemas" if self.release is None else self.release


# --- Loading .avsc files --------------------------------------------------------


def load_schemas(
    directory: Path, release: str | None = None
) -> dict[str, RecordSchema]:
    """Load every ``*.avsc`` record in `directory`, keyed by short record name.

    A record may name records of other files in the directory. Each result is
    self-contained: every named type it uses is defined at its first use and
    referred to by full name afterwards, as the Avro specification requires.
    """
    definitions = _read_definitions(directory)
    records = {}
    for full_name in sorted(definitions):
        expanded = _inline_named(definitions[full_name], "", definitions, set())
        records[expanded["name"]] = build_record_schema(expanded, release)
    return records


def build_record_schema(schema: dict[str, Any], release: str | None) -> RecordSchema:
    """Parse a self-contained record schema and compute its fingerprint."""
    try:
        parsed = parse_schema(schema)
    except (SchemaParseException, ValueError, KeyError, TypeError) as error:
        raise SchemaError(
            f"Schema {schema.get('name')!r} from {release or 'the current schemas'} "
            f"is not a valid Avro schema: {error}. Fix the schema definition."
        ) from error

    canonical_form = to_parsing_canonical_form(parsed)
    full_name = parsed["name"] if isinstance(parsed, dict) else str(parsed)
    return RecordSchema(
        name=full_name.rpartition(".")[2],
        full_name=full_name,
        schema=schema,
        parsed=parsed,
        canonical_form=canonical_form,
        fingerprint=schema_fingerprint(canonical_form),
        release=release,
        check_timestamps=_timestamp_check(parsed, _named_types(parsed), set()),
    )


def schema_fingerprint(canonical_form: str) -> bytes:
    """Return the CRC-64-AVRO fingerprint of a Parsing Canonical Form, as written.

    The Avro single-object encoding writes the 64-bit fingerprint little-endian,
    and fastavro returns the hex of exactly those bytes.
    """
    return bytes.fromhex(fingerprint(canonical_form, "CRC-64-AVRO"))


def _read_definitions(directory: Path) -> dict[str, dict[str, Any]]:
    definitions = {}
    for path in sorted(directory.glob("*.avsc")):
        try:
            definition = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise SchemaError(
                f"Schema file {path} could not be read as JSON: {error}."
            ) from error

        if not isinstance(definition, dict) or definition.get("type") != "record":
            raise SchemaError(f"Schema file {path} must contain one Avro record.")
        if definition.get("name") != path.stem:
            raise SchemaError(
                f"Schema file {path} defines {definition.get('name')!r}: name the "
                "file after the record it contains."
            )
        full_name = _full_name(definition["name"], definition.get("namespace", ""))
        definitions[full_name] = definition
    return definitions


def _full_name(name: str, namespace: str) -> str:
    if "." in name or not namespace:
        return name
    return f"{namespace}.{name}"


def _inline(
    node: Any, namespace: str, definitions: Mapping[str, Any], defined: set[str]
) -> Any:
    """Copy a schema node with references to other files replaced by definitions."""
    if isinstance(node, list):
        return [_inline(branch, namespace, definitions, defined) for branch in node]
    if isinstance(node, str):
        return _inline_reference(node, namespace, definitions, defined)
    if not isinstance(node, dict):
        return node

    kind = node.get("type")
    if kind in _NAMED_KINDS:
        return _inline_named(node, namespace, definitions, defined)
    if kind == "array":
        return {
            **node,
            "items": _inline(node["items"], namespace, definitions, defined),
        }
    if kind == "map":
        return {
            **node,
            "values": _inline(node["values"], namespace, definitions, defined),
        }
    return dict(node)


def _inline_reference(
    name: str, namespace: str, definitions: Mapping[str, Any], defined: set[str]
) -> Any:
    if name in _PRIMITIVES:
        return name

    full_name = _full_name(name, namespace)
    if full_name in defined:
        return full_name
    if full_name in definitions:
        return _inline_named(definitions[full_name], "", definitions, defined)
    raise SchemaError(
        f"Type {full_name} is used but defined nowhere: define it in the record or "
        "in its own .avsc file."
    )


def _inline_named(
    node: dict[str, Any],
    namespace: str,
    definitions: Mapping[str, Any],
    defined: set[str],
) -> dict[str, Any]:
    full_name = _full_name(node["name"], node.get("namespace", namespace))
    if full_name in defined:
        raise SchemaError(
            f"Type {full_name} is defined twice in one expanded schema: define it "
            "once and refer to it by name afterwards."
        )
    defined.add(full_name)

    own_namespace = full_name.rpartition(".")[0]
    result = dict(node)
    result["name"] = full_name.rpartition(".")[2]
    result["namespace"] = own_namespace
    if node.get("type") in ("record", "error"):
        result["fields"] = [
            {**item, "type": _inline(item["type"], own_namespace, definitions, defined)}
            for item in node["fields"]
        ]
    return result


# --- Naive timestamp check ------------------------------------------------------


def _named_types(parsed: Schema) -> dict[str, Any]:
    if isinstance(parsed, dict):
        return dict(parsed.get("__named_schemas", {}))
    return {}


def _timestamp_check(
    node: Any, named: Mapping[str, Any], visiting: set[str]
) -> TimestampCheck | None:
    """Build a check that rejects naive datetimes in timestamp fields, if any.

    fastavro writes a naive datetime as local time, so a value built with
    ``datetime.now()`` would shift by the host's UTC offset without an error.
    """
    if isinstance(node, str):
        if node in _PRIMITIVES or node in visiting or node not in named:
            return None
        return _timestamp_check(named[node], named, visiting | {node})
    if isinstance(node, list):
        return _union_check(node, named, visiting)
    if not isinstance(node, dict):
        return None

    kind = node.get("type")
    if node.get("logicalType") in _TIMESTAMP_TYPES:
        return _check_aware
    if kind in ("record", "error"):
        return _record_check(node, named, visiting | {node["name"]})
    if kind == "array":
        items = _timestamp_check(node["items"], named, visiting)
        return None if items is None else functools.partial(_check_items, items)
    if kind == "map":
        values = _timestamp_check(node["values"], named, visiting)
        return None if values is None else functools.partial(_check_values, values)
    return None


def _record_check(
    node: dict[str, Any], named: Mapping[str, Any], visiting: set[str]
) -> TimestampCheck | None:
    checks = []
    for item in node["fields"]:
        check = _timestamp_check(item["type"], named, visiting)
        if check is not None:
            checks.append((item["name"], check))
    return functools.partial(_check_fields, tuple(checks)) if checks else None


def _union_check(
    branches: list[Any], named: Mapping[str, Any], visiting: set[str]
) -> TimestampCheck | None:
    checks = [_timestamp_check(branch, named, visiting) for branch in branches]
    found = tuple(check for check in checks if check is not None)
    return functools.partial(_check_branches, found) if found else None


def _check_aware(value: Any, path: str) -> None:
    if isinstance(value, datetime.datetime) and value.tzinfo is None:
        raise SchemaError(
            f"Field {path} is a naive datetime ({value.isoformat()}), which would "
            "be written as local time: give a timezone-aware UTC datetime, such as "
            "datetime.now(timezone.utc)."
        )


def _check_fields(
    checks: tuple[tuple[str, TimestampCheck], ...], value: Any, path: str
) -> None:
    if not isinstance(value, dict):
        return
    for name, check in checks:
        item = value.get(name)
        if item is not None:
            check(item, f"{path}.{name}")


def _check_items(check: TimestampCheck, value: Any, path: str) -> None:
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            check(item, f"{path}[{index}]")


def _check_values(check: TimestampCheck, value: Any, path: str) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            check(item, f"{path}[{key!r}]")


def _check_branches(checks: tuple[TimestampCheck, ...], value: Any, path: str) -> None:
    for check in checks:
        check(value, path)


# --- Schema catalog -------------------------------------------------------------


@dataclass(frozen=True)
class SchemaCatalog:
    """Current schemas, released schemas, and every writer schema by fingerprint."""

    current: dict[str, RecordSchema]
    released: dict[str, dict[str, RecordSchema]]
    by_fingerprint: dict[bytes, RecordSchema]

    def record(self, record_name: str) -> RecordSchema:
        """Return the current schema of a record, by short or full name."""
        record = self.current.get(record_name.rpartition(".")[2])
        if record is None or record_name not in (record.name, record.full_name):
            raise SchemaError(
                f"Record {record_name!r} has no schema: use one of "
                f"{', '.join(sorted(self.current))}."
            )
        return record


@functools.cache
def catalog() -> SchemaCatalog:
    """Load the current and released schemas once per process."""
    current = load_schemas(SCHEMA_DIRECTORY)
    released = {
        directory.name: load_schemas(directory, release=f"release {directory.name}")
        for directory in _release_directories()
    }

    by_fingerprint: dict[bytes, RecordSchema] = {}
    for records in released.values():
        for record in records.values():
            by_fingerprint[record.fingerprint] = record
    for record in current.values():
        by_fingerprint[record.fingerprint] = record

    logger.debug(
        "Loaded Avro schemas records=%d releases=%s", len(current), sorted(released)
    )
    return SchemaCatalog(current, released, by_fingerprint)


def _release_directories() -> Iterator[Path]:
    if not RELEASED_DIRECTORY.is_dir():
        return iter(())
    return (path for path in sorted(RELEASED_DIRECTORY.iterdir()) if path.is_dir())


# --- Avro body ------------------------------------------------------------------


def write_body(record: RecordSchema, value: Any, buffer: io.BytesIO) -> None:
    """Append the Avro binary body of `value` to `buffer`, or raise SchemaError."""
    if not isinstance(value, dict):
        raise SchemaError(
            f"A {record.name} value must be a dict, not {type(value).__name__}."
        )
    if record.check_timestamps is not None:
        record.check_timestamps(value, record.name)

    try:
        schemaless_writer(buffer, record.parsed, value, strict_allow_default=True)
    except _WRITE_ERRORS as error:
        raise _invalid_value(record, value, error) from error


_short_repr = reprlib.Repr()
_short_repr.maxstring = _short_repr.maxother = 80


def _invalid_value(record: RecordSchema, value: Any, error: Exception) -> SchemaError:
    try:
        validate(value, record.parsed, raise_errors=True)
    except ValidationError as validation:
        # A record inside a union fails once per branch. Its own field errors are
        # more specific than the branches that the whole dict did not match.
        leaves = [e for e in validation.errors if not isinstance(e.datum, dict)]
        problems = "; ".join(
            f"field {problem.field or record.full_name} is "
            f"{_short_repr.repr(problem.datum)} ({type(problem.datum).__name__}), "
            f"expected {_describe(problem.schema)}"
            for problem in leaves or validation.errors
        )
        return SchemaError(
            f"Invalid {record.name} value: {problems}. Fix the value to match "
            f"schemas/{record.name}.avsc."
        )
    return SchemaError(
        f"Invalid {record.name} value: {error}. Fix the value to match "
        f"schemas/{record.name}.avsc."
    )


def _describe(schema: Any) -> str:
    if isinstance(schema, list):
        return " or ".join(_describe(branch) for branch in schema)
    if not isinstance(schema, dict):
        return str(schema)
    if schema.get("type") == "enum":
        return f"enum {schema['name']} ({', '.join(schema['symbols'])})"
    if "logicalType" in schema:
        return f"{schema['logicalType']} ({schema['type']})"
    return str(schema.get("name", schema.get("type")))


def read_body(
    writer: RecordSchema, reader: RecordSchema, data: bytes, offset: int
) -> dict[str, Any]:
    """Read the Avro body at `offset` written with `writer`, resolved to `reader`."""
    if writer.full_name != reader.full_name:
        raise SchemaError(
            f"The message contains a record of type {writer.full_name} (schema from "
            f"{writer.origin}), not {reader.full_name}: check which topic it came from."
        )

    buffer = io.BytesIO(data)
    buffer.seek(offset)
    reader_schema = None if writer.fingerprint == reader.fingerprint else reader.parsed
    try:
        value = schemaless_reader(buffer, writer.parsed, reader_schema)
    except SchemaResolutionError as error:
        raise SchemaError(
            f"The {reader.name} message was written with the schema from "
            f"{writer.origin}, which the current schema cannot read: {error}. "
            "Make the schema change backward compatible."
        ) from error
    except _READ_ERRORS as error:
        raise SchemaError(
            f"The {reader.name} message body could not be read with the writer "
            f"schema from {writer.origin}: {type(error).__name__}: {error}. The "
            "message is truncated or corrupt."
        ) from error

    if buffer.tell() != len(data):
        raise SchemaError(
            f"The {reader.name} message has {len(data) - buffer.tell()} bytes left "
            "after its Avro body: the message is corrupt or was written with "
            "another schema than its header names."
        )
    if not isinstance(value, dict):
        raise SchemaError(f"The {reader.name} message body is not an Avro record.")
    return value


# --- Schema registry client -----------------------------------------------------


class RegistryClient:
    """Client of the Confluent Schema Registry REST API, with caches.

    Calls are synchronous: registration happens once per subject and schema, and a
    schema id is fetched once per process, so only the first use blocks.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 5.0,
        client: httpx.Client | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.display_url = _without_credentials(self.url)
        self._client = client or httpx.Client(timeout=timeout)
        self._ids: dict[tuple[str, bytes], int] = {}
        self._schemas: dict[int, RecordSchema] = {}

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the HTTP connections."""
        self._client.close()

    def register(self, subject: str, record: RecordSchema) -> int:
        """Register `record` under `subject` and return its schema id.

        Registering a schema that the subject already has returns its existing id.
        """
        key = (subject, record.fingerprint)
        schema_id = self._ids.get(key)
        if schema_id is not None:
            return schema_id

        body = self._request(
            "POST",
            f"/subjects/{quote(subject, safe='')}/versions",
            {"schema": record.schema_json},
        )
        schema_id = _response_id(body, self.display_url)
        self._ids[key] = schema_id
        self._schemas.setdefault(schema_id, record)
        logger.info(
            "Registered Avro schema subject=%s record=%s id=%d registry=%s",
            subject,
            record.full_name,
            schema_id,
            self.display_url,
        )
        return schema_id

    def schema(self, schema_id: int) -> RecordSchema:
        """Return the writer schema with `schema_id`, fetched once from the registry."""
        record = self._schemas.get(schema_id)
        if record is not None:
            return record

        body = self._request("GET", f"/schemas/ids/{schema_id}", None, schema_id)
        record = self._record_from_response(body, schema_id)
        self._schemas[schema_id] = record
        logger.info(
            "Fetched Avro schema id=%d record=%s registry=%s",
            schema_id,
            record.full_name,
            self.display_url,
        )
        return record

    def _record_from_response(self, body: Any, schema_id: int) -> RecordSchema:
        schema_type = body.get("schemaType", "AVRO") if isinstance(body, dict) else None
        text = body.get("schema") if isinstance(body, dict) else None
        if schema_type != "AVRO" or not isinstance(text, str):
            raise SchemaError(
                f"Schema id {schema_id} in the schema registry at {self.display_url} "
                f"is not an Avro schema (schemaType {schema_type!r})."
            )
        try:
            schema = json.loads(text)
        except ValueError as error:
            raise SchemaError(
                f"Schema id {schema_id} in the schema registry at {self.display_url} "
                f"is not valid JSON: {error}."
            ) from error

        record = build_record_schema(schema, release=f"registry id {schema_id}")
        return catalog().by_fingerprint.get(record.fingerprint, record)

    def _request(
        self, method: str, path: str, payload: Any, schema_id: int | None = None
    ) -> Any:
        headers = {"Accept": REGISTRY_CONTENT_TYPE}
        content = None
        if payload is not None:
            headers["Content-Type"] = REGISTRY_CONTENT_TYPE
            content = json.dumps(payload).encode()

        try:
            response = self._client.request(
                method, self.url + path, content=content, headers=headers
            )
        except httpx.HTTPError as error:
            raise RegistryError(
                f"The schema registry at {self.display_url} could not be reached "
                f"({method} {path}): {error}. Check that it runs and the URL is right.",
                url=self.display_url,
            ) from error

        return self._json_body(response, method, path, schema_id)

    def _json_body(
        self, response: httpx.Response, method: str, path: str, schema_id: int | None
    ) -> Any:
        try:
            body = response.json()
        except ValueError:
            body = None

        if response.is_success and body is not None:
            return body

        error_code = body.get("error_code") if isinstance(body, dict) else None
        message = body.get("message") if isinstance(body, dict) else response.text
        if schema_id is not None and error_code == 40403:
            raise SchemaError(
                f"Schema id {schema_id} was not found in the schema registry at "
                f"{self.display_url}: the message was written against another "
                "registry, or the schema was deleted."
            )
        raise RegistryError(
            f"The schema registry at {self.display_url} returned HTTP "
            f"{response.status_code} (error code {error_code}) for {method} {path}: "
            f"{message}",
            url=self.display_url,
            status_code=response.status_code,
            error_code=error_code if isinstance(error_code, int) else None,
        )


def _without_credentials(url: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def _response_id(body: Any, url: str) -> int:
    schema_id = body.get("id") if isinstance(body, dict) else None
    if not isinstance(schema_id, int):
        raise RegistryError(
            f"The schema registry at {url} returned no schema id: {body!r}.", url=url
        )
    return schema_id


# --- Framing --------------------------------------------------------------------


def topic_subject(topic: str) -> str:
    """Return the registry subject of a topic's values (TopicNameStrategy)."""
    return f"{topic}-value"


def encode(record_name: str, value: Mapping[str, Any]) -> bytes:
    """Encode `value` as an Avro single-object message of the current schema."""
    record = catalog().record(record_name)
    buffer = io.BytesIO()
    buffer.write(record.single_object_header)
    write_body(record, value, buffer)
    return buffer.getvalue()


def encode_framed(
    record: RecordSchema, schema_id: int, value: Mapping[str, Any]
) -> bytes:
    """Encode `value` with the Confluent framing and registry id `schema_id`."""
    buffer = io.BytesIO()
    buffer.write(CONFLUENT_MAGIC + schema_id.to_bytes(4, "big"))
    write_body(record, value, buffer)
    return buffer.getvalue()


def decode(
    record_name: str, data: bytes, registry: RegistryClient | None = None
) -> dict[str, Any]:
    """Decode a single-object or Confluent-framed message into a current value.

    `registry` resolves Confluent schema ids; without it only single-object
    messages can be decoded.
    """
    reader = catalog().record(record_name)
    writer, offset = writer_schema(data, registry)
    return read_body(writer, reader, data, offset)


def writer_schema(
    data: bytes, registry: RegistryClient | None = None
) -> tuple[RecordSchema, int]:
    """Return the writer schema named by a message header, and the body offset."""
    data = bytes(data)
    if data[:2] == SINGLE_OBJECT_MARKER:
        return _single_object_writer(data), SINGLE_OBJECT_HEADER_SIZE
    if data[:1] == CONFLUENT_MAGIC:
        return _confluent_writer(data, registry), CONFLUENT_HEADER_SIZE
    raise SchemaError(
        f"The message starts with bytes {data[:4].hex(' ') or '(none)'}, which is "
        "neither Avro single-object encoding (c3 01) nor Confluent framing (00): "
        "it was not written by an Avro serializer."
    )


def _single_object_writer(data: bytes) -> RecordSchema:
    if len(data) < SINGLE_OBJECT_HEADER_SIZE:
        raise SchemaError(
            f"The single-object message has {len(data)} bytes, fewer than its "
            f"{SINGLE_OBJECT_HEADER_SIZE}-byte header: the message is truncated."
        )

    fingerprint_bytes = data[2:SINGLE_OBJECT_HEADER_SIZE]
    writer = catalog().by_fingerprint.get(fingerprint_bytes)
    if writer is None:
        raise SchemaError(
            f"Schema fingerprint {fingerprint_bytes.hex()} (CRC-64-AVRO, as written) "
            "matches no current or released Autopull schema: the message was "
            "written with a newer or foreign schema. Upgrade this reader or add the "
            "writer's schema under schemas/released/."
        )
    return writer


def _confluent_writer(data: bytes, registry: RegistryClient | None) -> RecordSchema:
    if len(data) < CONFLUENT_HEADER_SIZE:
        raise SchemaError(
            f"The Confluent-framed message has {len(data)} bytes, fewer than its "
            f"{CONFLUENT_HEADER_SIZE}-byte header: the message is truncated."
        )

    schema_id = int.from_bytes(data[1:CONFLUENT_HEADER_SIZE], "big")
    if registry is None:
        raise SchemaError(
            f"The message names schema registry id {schema_id}, but no schema "
            "registry is configured: configure the registry URL to read it."
        )
    return registry.schema(schema_id)


# --- Faust codec ----------------------------------------------------------------


class AvroCodec(Codec):
    """Faust codec of one record type, for a topic's `value_serializer`.

    Without a registry it writes single-object messages. With one (a URL or a
    shared `RegistryClient`) it writes Confluent framing, registering the schema
    under `subject` (``<topic>-value``) on the first encode or on `register()`.
    """

    def __init__(
        self,
        record_name: str,
        registry: RegistryClient | str | None = None,
        subject: str | None = None,
        **kwargs: Any,
    ) -> None:
        if registry is not None and not subject:
            raise ValueError(
                f"AvroCodec({record_name!r}) has a schema registry but no subject: "
                "pass subject=topic_subject(topic)."
            )
        if isinstance(registry, str):
            registry = RegistryClient(registry)

        super().__init__(
            record_name=record_name, registry=registry, subject=subject, **kwargs
        )
        self.record = catalog().record(record_name)
        self.registry = registry
        self.subject = subject
        self.schema_id: int | None = None

    def register(self) -> int | None:
        """Register the schema in the registry, if any, and return its id."""
        if self.registry is None or self.subject is None:
            return None
        if self.schema_id is None:
            self.schema_id = self.registry.register(self.subject, self.record)
        return self.schema_id

    def reframe(self, data: bytes) -> bytes:
        """Return a single-object message of this codec's record in its own framing.

        The Avro body stays as it is, so a value encoded once without a registry
        can go to a topic whose codec writes Confluent framing.
        """
        header = self.record.single_object_header
        if data[:SINGLE_OBJECT_HEADER_SIZE] != header:
            raise SchemaError(
                f"The message does not start with the single-object header of the "
                f"current {self.record.name} schema ({header.hex()}): encode it with "
                f"AvroCodec({self.record.name!r}) and no registry."
            )
        schema_id = self.register()
        if schema_id is None:
            return data
        body = data[SINGLE_OBJECT_HEADER_SIZE:]
        return CONFLUENT_MAGIC + schema_id.to_bytes(4, "big") + body

    def _dumps(self, obj: Any) -> bytes:
        # NOTE: the first encode with a registry blocks the event loop for one
        # HTTP request unless register() was called at startup.
        schema_id = self.register()
        if schema_id is None:
            return encode(self.record.name, obj)
        return encode_framed(self.record, schema_id, obj)

    def _loads(self, s: bytes) -> Any:
        # NOTE: a schema id seen for the first time blocks the event loop for one
        # HTTP request to the registry.
        return decode(self.record.name, s, self.registry)
