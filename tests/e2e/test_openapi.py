"""docs/openapi.yaml against the OpenAPI 3.1 schema and against a running worker."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import yaml
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from autopull.streams.app import Pipeline
from autopull.streams.settings import Settings
from autopull.streams.topics import ensure_topics

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCUMENT = REPO_ROOT / "docs" / "openapi.yaml"
OPENAPI_SCHEMA = REPO_ROOT / "tests" / "data" / "openapi-3.1-schema.json"
PHISH_ALERT = REPO_ROOT / "examples" / "alerts" / "tap-delivered-phish.json"
PHISH_HEADER = "<20261201093000.1234.invoice@billing-example.net>"
DOCUMENT_URI = "urn:autopull:openapi"
# Prefixes of the project's routes, which leave out Faust's built-in routes.
SERVED_PREFIXES = ("/api/", "/alerts/", "/livez", "/readyz", "/metrics")
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
KEYS = {"reader": "read-key-1", "analyst": "analyst-key-2", "boss": "admin-key-3"}
ROLES = {"reader": "read", "analyst": "analyst", "boss": "admin"}
TAP_TOKEN = "tap-webhook-token-4"
WORKER_TIMEOUT_S = 60


def load_document() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(DOCUMENT.read_text())
    return document


def escape_pointer(part: str) -> str:
    return part.replace("~", "~0").replace("/", "~1")


class Contract:
    """Checks responses against the document and records which operations ran."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        resource = Resource.from_contents(document, default_specification=DRAFT202012)
        self.registry: Registry[Any] = Registry().with_resource(DOCUMENT_URI, resource)
        self.called: set[tuple[str, str]] = set()
        self.statuses: list[tuple[str, str, int]] = []

    def check(self, path: str, method: str, response: httpx.Response) -> None:
        """Assert that the status, media type and JSON body are documented."""
        self.called.add((path, method))
        self.statuses.append((path, method, response.status_code))
        pointer = f"/paths/{escape_pointer(path)}/{method}/responses"
        responses = self.document["paths"][path][method]["responses"]
        status = str(response.status_code)
        assert status in responses, (
            f"{method.upper()} {path} replied {status}, which the document does not "
            f"list: {response.text[:300]}"
        )
        pointer, documented = self._resolve(f"{pointer}/{status}", responses[status])
        self._check_headers(documented, response, method, path)

        content = documented.get("content", {})
        media_types = {key.partition(";")[0].strip(): key for key in content}
        received = response.headers.get("content-type", "").partition(";")[0].strip()
        assert received in media_types, (
            f"{method.upper()} {path} replied {status} as {received!r}, but the "
            f"document lists {sorted(media_types)}."
        )
        if received == "application/json":
            key = escape_pointer(media_types[received])
            self._validate(f"{pointer}/content/{key}/schema", response.json())

    def _resolve(self, pointer: str, item: dict[str, Any]) -> tuple[str, Any]:
        while "$ref" in item:
            pointer = item["$ref"].removeprefix("#")
            item = self.registry.resolver(DOCUMENT_URI).lookup(item["$ref"]).contents
        return pointer, item

    def _check_headers(
        self,
        documented: dict[str, Any],
        response: httpx.Response,
        method: str,
        path: str,
    ) -> None:
        for name, header in documented.get("headers", {}).items():
            assert name in response.headers, (
                f"{method.upper()} {path} replied {response.status_code} without "
                f"the documented {name} header."
            )
            self._validate_value(header["schema"], response.headers[name])

    def _validate(self, pointer: str, body: Any) -> None:
        self._validate_value({"$ref": f"{DOCUMENT_URI}#{pointer}"}, body)

    def _validate_value(self, schema: dict[str, Any], value: Any) -> None:
        validator = jsonschema.Draft202012Validator(
            schema,
            registry=self.registry,
            format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER,
        )
        validator.validate(value)

    def operations(self) -> set[tuple[str, str]]:
        """Return every documented (path, method) pair."""
        return {
            (path, method)
            for path, item in self.document["paths"].items()
            for method in item
            if method in METHODS
        }


def test_openapi_document_is_valid() -> None:
    schema = json.loads(OPENAPI_SCHEMA.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = [
        f"{error.json_path}: {error.message}"
        for error in validator.iter_errors(load_document())
    ]
    assert errors == []


def test_openapi_schema_rejects_broken_document() -> None:
    schema = json.loads(OPENAPI_SCHEMA.read_text())
    broken = load_document()
    broken["paths"]["/livez"]["get"]["responses"]["200"].pop("description")
    assert not jsonschema.Draft202012Validator(schema).is_valid(broken)


def test_openapi_documents_every_served_route(tmp_path: Path) -> None:
    settings = Settings(
        web_enabled=True, kafka_bootstrap="127.0.0.1:9", data_dir=tmp_path
    )
    router = Pipeline(settings).app.web.web_app.router
    # Faust registers HEAD on every view and runs the view's GET handler for it, so
    # the document lists only the methods that each view defines.
    served = {
        (route.resource.canonical, route.method.lower())
        for route in router.routes()
        if route.resource is not None
        and route.resource.canonical.startswith(SERVED_PREFIXES)
        and route.method != "HEAD"
    }
    documented = Contract(load_document()).operations()
    assert served - documented == set()
    assert documented - served == set()


@pytest.fixture
def openapi_settings(pipeline_settings: Settings, tmp_path: Path) -> Settings:
    keys = {
        name: {"sha256": hashlib.sha256(key.encode()).hexdigest(), "role": ROLES[name]}
        for name, key in KEYS.items()
    }
    with_keys = Settings(api_keys=keys, webhook={"tokens": {"tap": TAP_TOKEN}})
    port = free_port()
    return pipeline_settings.model_copy(
        update={
            "web_enabled": True,
            "web_port": port,
            "api_keys": with_keys.api_keys,
            "webhook": with_keys.webhook,
        }
    )


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def worker_environment(settings: Settings) -> dict[str, str]:
    """Return the AUTOPULL_* variables of `settings`, with their secrets in clear."""
    env = {}
    for name, value in settings.model_dump(mode="json", exclude_none=True).items():
        if isinstance(value, dict):
            for inner, inner_value in value.items():
                key = f"AUTOPULL_{name.upper()}__{inner.upper()}"
                env[key] = (
                    json.dumps(inner_value)
                    if isinstance(inner_value, list | dict)
                    else str(inner_value)
                )
        else:
            env[f"AUTOPULL_{name.upper()}"] = str(value)
    # model_dump masks SecretStr values, so the webhook tokens are added in clear.
    tokens = settings.webhook.tokens.items()
    env["AUTOPULL_WEBHOOK__TOKENS"] = json.dumps(
        {source: token.get_secret_value() for source, token in tokens}
    )
    if settings.graph is not None:
        secret = settings.graph.client_secret.get_secret_value()
        env["AUTOPULL_GRAPH__CLIENT_SECRET"] = secret
    return env


@pytest.fixture
def openapi_worker(
    openapi_settings: Settings, graph_sim: Any, tmp_path: Path
) -> Iterator[str]:
    """Start a worker with the API and a `tap` webhook source, and yield its URL."""
    ensure_topics(openapi_settings)
    environment = os.environ | worker_environment(openapi_settings)
    environment.pop("AUTOPULL_CONFIG", None)
    log = tmp_path / "openapi-worker.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "autopull.streams.cli", "worker"],
            env=environment,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        yield f"http://127.0.0.1:{openapi_settings.web_port}"
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.returncode not in (0, -signal.SIGTERM):
            print(log.read_text()[-5000:])


def auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


def wait_until_ready(contract: Contract, base: str) -> None:
    """Poll /readyz, checking each reply, until it is 200."""
    deadline = time.monotonic() + WORKER_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{base}/readyz")
        except httpx.HTTPError:
            time.sleep(0.3)
            continue
        contract.check("/readyz", "get", response)
        if response.status_code == 200:
            return
        time.sleep(0.3)
    raise AssertionError(f"The worker at {base} did not become ready in time.")


def wait_for_incident(contract: Contract, base: str) -> dict[str, Any]:
    """Poll the incident list, checking each reply, until an incident is there."""
    deadline = time.monotonic() + WORKER_TIMEOUT_S
    url = f"{base}/api/incidents"
    while time.monotonic() < deadline:
        response = httpx.get(url, headers=auth("reader"))
        contract.check("/api/incidents", "get", response)
        incidents: list[dict[str, Any]] = response.json()["incidents"]
        if incidents and incidents[0]["pulls"].get("pending") is None:
            return incidents[0]
        time.sleep(0.5)
    raise AssertionError("No incident with finished pulls appeared in time.")


def post_alerts(contract: Contract, base: str) -> None:
    path = "/alerts/{source}"
    json_type = {"Content-Type": "application/json"}
    token = {"Authorization": f"Bearer {TAP_TOKEN}"} | json_type
    body = PHISH_ALERT.read_bytes()
    requests = [
        ("tap", body, token, 202),
        ("nobody", body, token, 404),
        ("tap", body, json_type, 401),
        ("tap", body, {"Authorization": f"Bearer {TAP_TOKEN}"}, 415),
        ("tap", b"", token, 400),
        ("tap", b"{" + b" " * (1024 * 1024) + b"}", token, 413),
    ]
    for source, content, headers, expected in requests:
        # The webhook answers once Kafka acknowledged the alert, or after its own
        # 30-second wait, so the client waits longer than that.
        response = httpx.post(
            f"{base}/alerts/{source}", content=content, headers=headers, timeout=60
        )
        contract.check(path, "post", response)
        assert response.status_code == expected, response.text


def read_incidents(contract: Contract, base: str, incident_id: str) -> None:
    listing = "/api/incidents"
    queries: list[tuple[dict[str, str], str, int]] = [
        ({"state": "contained"}, "reader", 200),
        (
            {"since": "2000-01-01T00:00:00Z", "until": "2999-01-01T00:00:00"},
            "boss",
            200,
        ),
        ({"message_id": PHISH_HEADER, "mailbox": "BOB@example.com"}, "analyst", 200),
        ({"since": "yesterday"}, "reader", 400),
        ({"state": "bogus"}, "reader", 400),
        ({"limit": "5"}, "reader", 400),
    ]
    for params, key, expected in queries:
        response = httpx.get(f"{base}{listing}", params=params, headers=auth(key))
        contract.check(listing, "get", response)
        assert response.status_code == expected, response.text
    anonymous = httpx.get(f"{base}{listing}")
    contract.check(listing, "get", anonymous)
    assert anonymous.status_code == 401

    detail = "/api/incidents/{incident_id}"
    for target, headers, expected in [
        (incident_id, auth("reader"), 200),
        ("INC-NOPE", auth("reader"), 404),
        (incident_id, {"Authorization": "Bearer wrong"}, 401),
    ]:
        response = httpx.get(f"{base}/api/incidents/{target}", headers=headers)
        contract.check(detail, "get", response)
        assert response.status_code == expected, response.text


def send_commands(contract: Contract, base: str, incident_id: str) -> None:
    path = "/api/incidents/{incident_id}/{action}"
    bob = {"mailbox": "bob@example.com"}
    requests: list[tuple[str, str, dict[str, Any] | None, str | None, int]] = [
        # Nothing of the contained incident is held, so there is nothing to approve
        # or reject.
        (incident_id, "approve", bob, "analyst", 400),
        (incident_id, "reject", {}, "analyst", 400),
        (incident_id, "comment", {"comment": "Checked with the sender."}, "boss", 202),
        (incident_id, "comment", {"text": ""}, "analyst", 400),
        (incident_id, "release", {}, "analyst", 403),
        (incident_id, "release", {"mailbox": None}, "analyst", 403),
        (incident_id, "release", {"mailbox": "  "}, "boss", 400),
        (incident_id, "approve", {"mailbox": "bob"}, "analyst", 400),
        (incident_id, "approve", {"mailbx": "bob@example.com"}, "analyst", 400),
        (incident_id, "comment", {"comment": "x" * 70_000}, "analyst", 413),
        (incident_id, "release", bob, "reader", 403),
        (incident_id, "release", bob, None, 401),
        (incident_id, "release", bob, "analyst", 202),
        (incident_id, "archive", {}, "boss", 404),
        ("INC-NOPE", "close", {}, "boss", 404),
        (incident_id, "close", None, "analyst", 202),
    ]
    for target, action, body, key, expected in requests:
        url = f"{base}/api/incidents/{target}/{action}"
        headers = auth(key) if key else {}
        response = httpx.post(url, json=body, headers=headers, timeout=60)
        contract.check(path, "post", response)
        assert response.status_code == expected, response.text


@pytest.mark.e2e
@pytest.mark.integration
def test_openapi_matches_running_worker(openapi_worker: str) -> None:
    base = openapi_worker
    contract = Contract(load_document())
    wait_until_ready(contract, base)
    contract.check("/livez", "get", httpx.get(f"{base}/livez"))
    contract.check("/metrics", "get", httpx.get(f"{base}/metrics"))

    post_alerts(contract, base)
    incident = wait_for_incident(contract, base)
    read_incidents(contract, base, incident["incident_id"])
    send_commands(contract, base, incident["incident_id"])

    assert contract.operations() - contract.called == set()
