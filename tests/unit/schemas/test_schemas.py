"""The .avsc files: loading, fingerprints, enum defaults and compatibility."""

from __future__ import annotations

import copy
import io
import json
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fastavro
import pytest
from fastavro.read import SchemaResolutionError

from autopull.schemas import (
    RecordSchema,
    SchemaError,
    build_record_schema,
    catalog,
    decode,
    load_schemas,
)
from autopull.schemas.codec import read_body

SCHEMA_DIRECTORY = Path(__file__).resolve().parents[3] / "schemas"
RELEASED_DIRECTORY = SCHEMA_DIRECTORY / "released"
RECORD_NAMES = sorted(path.stem for path in SCHEMA_DIRECTORY.glob("*.avsc"))
PRIMITIVE_EXAMPLES: dict[str, Any] = {
    "null": None,
    "boolean": True,
    "int": 7,
    "long": 7_000_000_000,
    "float": 1.5,
    "double": 2.25,
    "bytes": b"\x00\xff",
    "string": "example",
}
TIMESTAMP = datetime(2025, 3, 4, 9, 15, 30, 123000, tzinfo=UTC)


def released_pairs() -> list[tuple[str, str]]:
    return [
        (directory.name, path.stem)
        for directory in sorted(RELEASED_DIRECTORY.iterdir())
        if directory.is_dir()
        for path in sorted(directory.glob("*.avsc"))
    ]


def example_value(schema: Any, named: dict[str, Any]) -> Any:
    """Build a value that fills every field, taking the last non-null union branch."""
    if isinstance(schema, str):
        if schema in PRIMITIVE_EXAMPLES:
            return PRIMITIVE_EXAMPLES[schema]
        return example_value(named[schema], named)
    if isinstance(schema, list):
        branches = [branch for branch in schema if branch != "null"]
        return example_value(branches[-1], named) if branches else None

    kind = schema["type"]
    if schema.get("logicalType") in ("timestamp-millis", "timestamp-micros"):
        return TIMESTAMP
    if kind in ("record", "error"):
        return {
            item["name"]: example_value(item["type"], named)
            for item in schema["fields"]
        }
    if kind == "enum":
        return schema["symbols"][-1]
    if kind == "array":
        return [example_value(schema["items"], named)]
    if kind == "map":
        return {"key": example_value(schema["values"], named)}
    if kind == "fixed":
        return bytes(schema["size"])
    return example_value(kind, named)


def example_for(record: RecordSchema) -> dict[str, Any]:
    named = dict(record.parsed["__named_schemas"])
    value = example_value(record.parsed, named)
    assert isinstance(value, dict)
    return value


def walk(node: Any) -> Iterator[dict[str, Any]]:
    """Yield every JSON object in a schema."""
    if isinstance(node, list):
        for item in node:
            yield from walk(item)
    elif isinstance(node, dict):
        yield node
        for item in node.values():
            yield from walk(item)


def assert_readable(old: RecordSchema, new: RecordSchema) -> None:
    """Fail unless data written with `old` reads with `new` through resolution."""
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, old.parsed, example_for(old))
    buffer.seek(0)

    fastavro.schemaless_reader(buffer, old.parsed, new.parsed)

    assert buffer.tell() == len(buffer.getvalue())


# --- Loading --------------------------------------------------------------------


def test_catalog_loads_every_avsc_file() -> None:
    assert sorted(catalog().current) == RECORD_NAMES


@pytest.mark.parametrize("record_name", RECORD_NAMES)
def test_record_full_name_in_autopull_namespace(record_name: str) -> None:
    assert catalog().record(record_name).full_name == f"autopull.{record_name}"


@pytest.mark.parametrize("record_name", RECORD_NAMES)
def test_expanded_schema_defines_types_once(record_name: str) -> None:
    schema = catalog().record(record_name).schema
    names = [
        f"{node['namespace']}.{node['name']}"
        for node in walk(schema)
        if node.get("type") in ("record", "enum", "fixed")
    ]

    assert len(names) == len(set(names))


@pytest.mark.parametrize("record_name", RECORD_NAMES)
def test_expanded_schema_parses_without_other_files(record_name: str) -> None:
    record = catalog().record(record_name)

    parsed = fastavro.parse_schema(json.loads(record.schema_json))

    assert fastavro.schema.to_parsing_canonical_form(parsed) == record.canonical_form


def test_incident_event_inlines_referenced_records() -> None:
    schema_json = catalog().record("IncidentEvent").schema_json

    assert '"name":"EnrichedAlert"' in schema_json
    assert '"name":"NormalizedAlert"' in schema_json
    assert '"name":"PullOutcome"' in schema_json
    assert '"name":"ForwardFinding"' in schema_json


@pytest.mark.parametrize("record_name", RECORD_NAMES)
def test_canonical_form_strips_attributes(
    record_name: str,
) -> None:
    canonical = catalog().record(record_name).canonical_form

    assert '"doc"' not in canonical
    assert '"default"' not in canonical
    assert '"logicalType"' not in canonical
    assert canonical.startswith(f'{{"name":"autopull.{record_name}","type":"record"')


def test_fingerprints_differ_between_records() -> None:
    fingerprints = [record.fingerprint for record in catalog().current.values()]

    assert len(set(fingerprints)) == len(fingerprints)


def test_load_schemas_defined_twice_raises(tmp_path: Path) -> None:
    status = {"type": "enum", "name": "Status", "symbols": ["a"], "default": "a"}
    schema = {
        "type": "record",
        "name": "Twice",
        "namespace": "autopull",
        "fields": [{"name": "one", "type": status}, {"name": "two", "type": status}],
    }
    (tmp_path / "Twice.avsc").write_text(json.dumps(schema))

    with pytest.raises(SchemaError, match=r"autopull\.Status is defined twice"):
        load_schemas(tmp_path)


def test_load_schemas_undefined_type_raises(tmp_path: Path) -> None:
    schema = {
        "type": "record",
        "name": "Orphan",
        "namespace": "autopull",
        "fields": [{"name": "parent", "type": "Missing"}],
    }
    (tmp_path / "Orphan.avsc").write_text(json.dumps(schema))

    with pytest.raises(
        SchemaError, match=r"autopull\.Missing is used but defined nowhere"
    ):
        load_schemas(tmp_path)


def test_load_schemas_file_name_mismatch_raises(tmp_path: Path) -> None:
    schema = {"type": "record", "name": "Inner", "namespace": "autopull", "fields": []}
    (tmp_path / "Outer.avsc").write_text(json.dumps(schema))

    with pytest.raises(SchemaError, match="name the file after the record"):
        load_schemas(tmp_path)


def test_load_schemas_invalid_json_raises(tmp_path: Path) -> None:
    (tmp_path / "Broken.avsc").write_text('{"type": "record",')

    with pytest.raises(SchemaError, match="could not be read as JSON"):
        load_schemas(tmp_path)


def test_build_record_schema_invalid_default_raises() -> None:
    schema = {
        "type": "record",
        "name": "Bad",
        "namespace": "autopull",
        "fields": [{"name": "n", "type": "int", "default": "seven"}],
    }

    with pytest.raises(SchemaError, match="not a valid Avro schema"):
        build_record_schema(schema, release=None)


# --- Enums ----------------------------------------------------------------------


def enum_definitions() -> list[tuple[str, dict[str, Any]]]:
    return [
        (path.stem, node)
        for path in sorted(SCHEMA_DIRECTORY.glob("*.avsc"))
        for node in walk(json.loads(path.read_text()))
        if node.get("type") == "enum"
    ]


@pytest.mark.parametrize(
    ("record_name", "enum"),
    enum_definitions(),
    ids=[f"{record}-{enum['name']}" for record, enum in enum_definitions()],
)
def test_enum_has_default_among_symbols(record_name: str, enum: dict[str, Any]) -> None:
    assert "default" in enum
    assert enum["default"] in enum["symbols"]


def test_enum_definitions_found() -> None:
    assert len(enum_definitions()) >= 10


def test_unknown_enum_symbol_reads_as_default() -> None:
    current = catalog().record("PullOutcome")
    newer_schema = copy.deepcopy(current.schema)
    status = next(
        node for node in walk(newer_schema) if node.get("name") == "OutcomeStatus"
    )
    status["symbols"].append("purged")
    newer = build_record_schema(newer_schema, release="a newer writer")
    value = {**example_for(current), "status": "purged"}
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, newer.parsed, value)

    decoded = read_body(newer, current, buffer.getvalue(), 0)

    assert decoded["status"] == "failed"


@pytest.mark.parametrize("record_name", RECORD_NAMES)
def test_every_enum_survives_new_symbol(record_name: str) -> None:
    current = catalog().record(record_name)
    enum_names = [
        node["name"] for node in walk(current.schema) if node.get("type") == "enum"
    ]

    for enum_name in enum_names:
        newer_schema = copy.deepcopy(current.schema)
        enum = next(
            node for node in walk(newer_schema) if node.get("name") == enum_name
        )
        enum["symbols"].append("future_symbol")
        newer = build_record_schema(newer_schema, release="a newer writer")
        buffer = io.BytesIO()
        fastavro.schemaless_writer(buffer, newer.parsed, example_for(newer))

        read_body(newer, current, buffer.getvalue(), 0)


# --- Backward compatibility -----------------------------------------------------


def test_released_schemas_exist() -> None:
    assert catalog().released


def test_first_release_covers_every_record() -> None:
    assert set(catalog().released["0.1.0"]) == {
        "DeadLetter",
        "EnrichedAlert",
        "ForwardFinding",
        "Incident",
        "IncidentEvent",
        "NormalizedAlert",
        "PullCommand",
        "PullOutcome",
        "RawAlert",
    }


def test_unreadable_writer_raises_schema_error() -> None:
    current = catalog().record("PullOutcome")
    stricter_schema = copy.deepcopy(current.schema)
    status = next(
        node for node in walk(stricter_schema) if node.get("name") == "OutcomeStatus"
    )
    del status["default"]
    stricter = build_record_schema(stricter_schema, release=None)
    newer_schema = copy.deepcopy(stricter_schema)
    next(node for node in walk(newer_schema) if node.get("name") == "OutcomeStatus")[
        "symbols"
    ].append("purged")
    newer = build_record_schema(newer_schema, release="a newer writer")
    buffer = io.BytesIO()
    fastavro.schemaless_writer(
        buffer, newer.parsed, {**example_for(current), "status": "purged"}
    )

    with pytest.raises(SchemaError, match="which the current schema cannot read"):
        read_body(newer, stricter, buffer.getvalue(), 0)


@pytest.mark.parametrize(
    ("release", "record_name"),
    released_pairs(),
    ids=[f"{release}-{name}" for release, name in released_pairs()],
)
def test_current_schema_reads_released_writer(release: str, record_name: str) -> None:
    old = catalog().released[release][record_name]
    new = catalog().current.get(record_name)
    assert new is not None, f"{record_name} of release {release} has no current schema"

    assert_readable(old, new)


@pytest.mark.parametrize(
    ("release", "record_name"),
    released_pairs(),
    ids=[f"{release}-{name}" for release, name in released_pairs()],
)
def test_decode_released_single_object_message(release: str, record_name: str) -> None:
    old = catalog().released[release][record_name]
    buffer = io.BytesIO()
    buffer.write(old.single_object_header)
    fastavro.schemaless_writer(buffer, old.parsed, example_for(old))

    value = decode(record_name, buffer.getvalue())

    assert set(value) == set(example_for(catalog().record(record_name)))


def test_compatibility_catches_new_required_field() -> None:
    old = catalog().record("PullCommand")
    newer_schema = copy.deepcopy(old.schema)
    newer_schema["fields"].append({"name": "priority", "type": "int"})
    new = build_record_schema(newer_schema, release=None)

    with pytest.raises(SchemaResolutionError):
        assert_readable(old, new)


def test_compatibility_accepts_new_defaulted_field() -> None:
    old = catalog().record("PullCommand")
    newer_schema = copy.deepcopy(old.schema)
    newer_schema["fields"].append({"name": "priority", "type": "int", "default": 0})
    new = build_record_schema(newer_schema, release=None)

    assert_readable(old, new)


def test_released_directory_loads_like_current(tmp_path: Path) -> None:
    shutil.copytree(RELEASED_DIRECTORY / "0.1.0", tmp_path / "0.1.0")

    records = load_schemas(tmp_path / "0.1.0", release="release 0.1.0")

    assert records["PullOutcome"].release == "release 0.1.0"
    assert records["PullOutcome"].origin == "release 0.1.0"
