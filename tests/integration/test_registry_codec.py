"""The codec's Confluent framing against the schema registry simulator."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import fastavro
import httpx
import pytest

from autopull.schemas import (
    AvroCodec,
    RegistryClient,
    RegistryError,
    SchemaError,
    catalog,
    decode,
    encode,
    topic_subject,
)
from autopull.sim.registry import start_registry

pytestmark = pytest.mark.integration

CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"
TOPIC = "autopull.pull.outcomes"
SUBJECT = topic_subject(TOPIC)
STARTED = datetime(2025, 3, 4, 9, 16, 10, 123000, tzinfo=UTC)

PULL_OUTCOME: dict[str, Any] = {
    "command_id": "inc-7:quarantine:jane.doe@corp.example.com:CAKx9w1c3@example.net",
    "incident_id": "inc-7",
    "kind": "quarantine",
    "mailbox": "jane.doe@corp.example.com",
    "message_id": "CAKx9w1c3@mail.example.net",
    "status": "throttled",
    "platform": "graph",
    "copies": 0,
    "original_folder": None,
    "read": None,
    "attempts": 3,
    "started_at": STARTED,
    "finished_at": STARTED + timedelta(seconds=1),
    "seconds_from_alert": None,
    "error_class": "transient",
    "error": "Graph answered 429 for mailbox jane.doe@corp.example.com.",
    "recipient_type": "original",
    "alert_id": "tap:f6a1c7f2",
    "retry_at": STARTED + timedelta(seconds=30),
    "resolved_message_id": None,
    "candidates": [],
    "mailbox_missing": False,
}


class RecordingClient(httpx.Client):
    """HTTP client that keeps the method and path of every request it sends."""

    def __init__(self) -> None:
        super().__init__(timeout=5.0, trust_env=False)
        self.requests: list[tuple[str, str]] = []

    def send(self, request: httpx.Request, **kwargs: Any) -> httpx.Response:
        self.requests.append((request.method, request.url.path))
        return super().send(request, **kwargs)


@pytest.fixture
def registry_url() -> Iterator[str]:
    """Run the registry simulator on a free loopback port in a background loop."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    runner = asyncio.run_coroutine_threadsafe(start_registry("127.0.0.1", 0), loop)
    started = runner.result(timeout=10)
    host, port = started.addresses[0][:2]

    yield f"http://{host}:{port}"

    asyncio.run_coroutine_threadsafe(started.cleanup(), loop).result(timeout=10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)
    loop.close()


@pytest.fixture
def http(registry_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=registry_url, timeout=5.0, trust_env=False) as client:
        yield client


def new_registry(url: str) -> RegistryClient:
    return RegistryClient(url, client=RecordingClient())


def register(http: httpx.Client, subject: str, schema: str) -> httpx.Response:
    return http.post(
        f"/subjects/{subject}/versions",
        content=json.dumps({"schema": schema}),
        headers={"Content-Type": CONTENT_TYPE},
    )


# --- Codec and registry ---------------------------------------------------------


def test_codec_encode_registers_and_frames(
    registry_url: str, http: httpx.Client
) -> None:
    with new_registry(registry_url) as registry:
        data = AvroCodec("PullOutcome", registry, SUBJECT).dumps(PULL_OUTCOME)

    latest = http.get(f"/subjects/{SUBJECT}/versions/latest").json()
    assert http.get("/subjects").json() == [SUBJECT]
    assert http.get(f"/subjects/{SUBJECT}/versions").json() == [1]
    assert data[:1] == b"\x00"
    assert int.from_bytes(data[1:5], "big") == latest["id"]


def test_registered_schema_matches_current_fingerprint(
    registry_url: str, http: httpx.Client
) -> None:
    with new_registry(registry_url) as registry:
        schema_id = AvroCodec("PullOutcome", registry, SUBJECT).register()

    text = http.get(f"/schemas/ids/{schema_id}").json()["schema"]
    parsed = fastavro.parse_schema(json.loads(text))
    canonical = fastavro.schema.to_parsing_canonical_form(parsed)
    assert canonical == catalog().record("PullOutcome").canonical_form


def test_codec_decodes_own_framed_message(registry_url: str) -> None:
    with new_registry(registry_url) as registry:
        codec = AvroCodec("PullOutcome", registry, SUBJECT)

        value = codec.loads(codec.dumps(PULL_OUTCOME))

    assert value == PULL_OUTCOME


def test_fresh_codec_fetches_schema_by_id(registry_url: str) -> None:
    with new_registry(registry_url) as writer_registry:
        data = AvroCodec("PullOutcome", writer_registry, SUBJECT).dumps(PULL_OUTCOME)
    schema_id = int.from_bytes(data[1:5], "big")
    reader_registry = new_registry(registry_url)
    recording = reader_registry._client
    assert isinstance(recording, RecordingClient)

    with reader_registry:
        first = AvroCodec("PullOutcome", reader_registry, SUBJECT).loads(data)
        second = AvroCodec("PullOutcome", reader_registry, SUBJECT).loads(data)

    assert first == PULL_OUTCOME
    assert second == PULL_OUTCOME
    assert recording.requests == [("GET", f"/schemas/ids/{schema_id}")]


def test_codec_with_registry_decodes_single_object(registry_url: str) -> None:
    with new_registry(registry_url) as registry:
        codec = AvroCodec("PullOutcome", registry, SUBJECT)

        value = codec.loads(encode("PullOutcome", PULL_OUTCOME))

    assert value == PULL_OUTCOME


def test_codec_registry_url_creates_client(registry_url: str) -> None:
    codec = AvroCodec("PullOutcome", registry_url, SUBJECT)

    data = codec.dumps(PULL_OUTCOME)

    assert isinstance(codec.registry, RegistryClient)
    assert decode("PullOutcome", data, codec.registry) == PULL_OUTCOME
    codec.registry.close()


def test_two_codecs_share_id_and_version(registry_url: str, http: httpx.Client) -> None:
    with new_registry(registry_url) as first, new_registry(registry_url) as second:
        first_id = AvroCodec("PullOutcome", first, SUBJECT).register()
        second_id = AvroCodec("PullOutcome", second, SUBJECT).register()

    assert first_id == second_id
    assert http.get(f"/subjects/{SUBJECT}/versions").json() == [1]


def test_registry_client_caches_registration(registry_url: str) -> None:
    registry = new_registry(registry_url)
    recording = registry._client
    assert isinstance(recording, RecordingClient)
    record = catalog().record("PullOutcome")

    with registry:
        registry.register(SUBJECT, record)
        registry.register(SUBJECT, record)

    assert recording.requests == [("POST", f"/subjects/{SUBJECT}/versions")]


def test_same_schema_other_subject_reuses_id(
    registry_url: str, http: httpx.Client
) -> None:
    record = catalog().record("PullOutcome")

    with new_registry(registry_url) as registry:
        first = registry.register(SUBJECT, record)
        second = registry.register("audit.pull.outcomes-value", record)

    assert first == second
    assert http.get("/subjects/audit.pull.outcomes-value/versions").json() == [1]


def test_other_records_get_other_ids(registry_url: str) -> None:
    with new_registry(registry_url) as registry:
        outcome = registry.register(SUBJECT, catalog().record("PullOutcome"))
        command = registry.register(
            "autopull.pull.commands-value", catalog().record("PullCommand")
        )

    assert outcome != command


def test_decode_unknown_registry_id_raises(registry_url: str) -> None:
    data = b"\x00" + (999).to_bytes(4, "big") + encode("PullOutcome", PULL_OUTCOME)[10:]

    with (
        new_registry(registry_url) as registry,
        pytest.raises(SchemaError, match="Schema id 999 was not found"),
    ):
        decode("PullOutcome", data, registry)


def test_decode_framed_other_record_raises(registry_url: str) -> None:
    with new_registry(registry_url) as registry:
        data = AvroCodec("PullOutcome", registry, SUBJECT).dumps(PULL_OUTCOME)

        with pytest.raises(SchemaError, match=r"not autopull\.PullCommand"):
            decode("PullCommand", data, registry)


def test_unreachable_registry_raises_retriable_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://user:secret@127.0.0.1:{port}"

    with (
        RegistryClient(
            url, client=httpx.Client(timeout=2.0, trust_env=False)
        ) as registry,
        pytest.raises(RegistryError, match="could not be reached") as caught,
    ):
        registry.register(SUBJECT, catalog().record("PullOutcome"))

    assert caught.value.retriable
    assert "secret" not in str(caught.value)


# --- Registry simulator protocol ------------------------------------------------


def test_registry_schema_by_unknown_id_returns_40403(http: httpx.Client) -> None:
    response = http.get("/schemas/ids/42")

    assert response.status_code == 404
    assert response.json() == {"error_code": 40403, "message": "Schema not found"}


def test_registry_unknown_subject_returns_40401(http: httpx.Client) -> None:
    response = http.get("/subjects/nothing-value/versions")

    assert response.status_code == 404
    assert response.json()["error_code"] == 40401


def test_registry_unknown_version_returns_40402(http: httpx.Client) -> None:
    register(http, SUBJECT, catalog().record("PullOutcome").schema_json)

    response = http.get(f"/subjects/{SUBJECT}/versions/2")

    assert response.status_code == 404
    assert response.json()["error_code"] == 40402


def test_registry_invalid_version_returns_42202(http: httpx.Client) -> None:
    register(http, SUBJECT, catalog().record("PullOutcome").schema_json)

    response = http.get(f"/subjects/{SUBJECT}/versions/first")

    assert response.status_code == 422
    assert response.json()["error_code"] == 42202


@pytest.mark.parametrize(
    "schema",
    [
        '{"type": "timestamp"}',
        '{"type": "enum", "name": "E", "symbols": ["a", "a"]}',
        "{",
    ],
    ids=["unknown-type", "duplicate-symbol", "not-json"],
)
def test_registry_invalid_schema_returns_42201(http: httpx.Client, schema: str) -> None:
    response = register(http, SUBJECT, schema)

    assert response.status_code == 422
    assert response.json()["error_code"] == 42201


def test_registry_new_schema_adds_version(http: httpx.Client) -> None:
    first = register(http, SUBJECT, catalog().record("PullOutcome").schema_json)
    second = register(http, SUBJECT, catalog().record("PullCommand").schema_json)

    latest = http.get(f"/subjects/{SUBJECT}/versions/latest").json()
    assert http.get(f"/subjects/{SUBJECT}/versions").json() == [1, 2]
    assert latest["version"] == 2
    assert latest["id"] == second.json()["id"]
    assert first.json()["id"] != second.json()["id"]


def test_registry_reformatted_schema_same_id(http: httpx.Client) -> None:
    schema = catalog().record("PullOutcome").schema

    first = register(http, SUBJECT, json.dumps(schema))
    second = register(http, SUBJECT, json.dumps(schema, indent=2, sort_keys=True))

    assert first.json()["id"] == second.json()["id"]
    assert http.get(f"/subjects/{SUBJECT}/versions").json() == [1]


def test_registry_lookup_returns_version(http: httpx.Client) -> None:
    schema = catalog().record("PullOutcome").schema_json
    schema_id = register(http, SUBJECT, schema).json()["id"]

    response = http.post(
        f"/subjects/{SUBJECT}",
        content=json.dumps({"schema": schema}),
        headers={"Content-Type": CONTENT_TYPE},
    )

    assert response.json() == {
        "subject": SUBJECT,
        "version": 1,
        "id": schema_id,
        "schema": schema,
    }


def test_registry_responses_content_type(http: httpx.Client) -> None:
    response = http.get("/subjects")

    assert response.headers["Content-Type"].startswith(CONTENT_TYPE)
