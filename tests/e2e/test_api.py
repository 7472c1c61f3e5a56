"""The REST API, probes and metrics of a running worker, on the real broker."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from autopull.streams.ingest import Input, RawSender, raw_alert
from autopull.streams.settings import Settings
from autopull.streams.topics import ensure_topics
from autopull.streams.webhook import WebhookSettings

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

REPO_ROOT = Path(__file__).resolve().parents[2]
PHISH_ALERT = REPO_ROOT / "examples" / "alerts" / "tap-delivered-phish.json"
KAFKA_SCRIPT = REPO_ROOT / "dev" / "kafka.sh"
TAP_TOKEN = "tap-webhook-token-5"
PHISH_HEADER = "<20261201093000.1234.invoice@billing-example.net>"
KEYS = {"reader": "read-key-1", "analyst": "analyst-key-2", "boss": "admin-key-3"}
ROLES = {"reader": "read", "analyst": "analyst", "boss": "admin"}


@pytest.fixture
def api_settings(pipeline_settings: Settings, free_web_port: int) -> Settings:
    keys = {
        name: {"sha256": hashlib.sha256(key.encode()).hexdigest(), "role": ROLES[name]}
        for name, key in KEYS.items()
    }
    return pipeline_settings.model_copy(
        update={
            "web_enabled": True,
            "web_port": free_web_port,
            "api_keys": Settings(api_keys=keys).api_keys,
        }
    )


@pytest.fixture
def free_web_port() -> int:
    return free_port()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for(check: Any, timeout: float = 90.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = check()
        except httpx.HTTPError:
            result = None
        if result:
            return result
        time.sleep(0.5)
    raise AssertionError(f"Timed out waiting for {what}.")


def auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


def start_contained_incident(
    settings: Settings, start_api_worker: Any
) -> tuple[str, str]:
    """Start a worker, send the phish alert and return the URL and incident id."""
    ensure_topics(settings)
    start_api_worker(settings)
    base = f"http://127.0.0.1:{settings.web_port}"
    wait_for(lambda: httpx.get(f"{base}/readyz").status_code == 200, what="readiness")

    sender = RawSender(settings)
    sender.send(raw_alert(Input("phish.json", PHISH_ALERT.read_bytes()), None, "t"))
    sender.flush()

    def contained() -> dict[str, Any] | None:
        listing = httpx.get(
            f"{base}/api/incidents?state=contained", headers=auth("reader")
        )
        incidents = listing.json()["incidents"]
        return incidents[0] if incidents else None

    incident = wait_for(contained, what="a contained incident")
    return base, incident["incident_id"]


def test_api_release_restores_one_copy(
    api_settings: Settings, graph_sim: Any, start_api_worker: Any
) -> None:
    base, incident_id = start_contained_incident(api_settings, start_api_worker)
    detail = httpx.get(f"{base}/api/incidents/{incident_id}", headers=auth("reader"))
    assert detail.status_code == 200
    results = {row["mailbox"]: row for row in detail.json()["results"]}
    assert results["bob@example.com"]["status"] == "quarantined"
    assert results["bob@example.com"]["read"] is True
    assert results["bob@example.com"]["original_folder"] == "Inbox"

    release = f"{base}/api/incidents/{incident_id}/release"
    body = {"mailbox": "bob@example.com"}
    assert httpx.post(release, json=body).status_code == 401
    assert httpx.post(release, json=body, headers=auth("reader")).status_code == 403
    whole = httpx.post(release, json={}, headers=auth("analyst"))
    assert whole.status_code == 403
    null = httpx.post(release, json={"mailbox": None}, headers=auth("analyst"))
    assert null.status_code == 403
    # A blank mailbox is not "every mailbox", whatever the key's role.
    for key in ("analyst", "boss"):
        for blank in ("", "   ", "\t"):
            response = httpx.post(release, json={"mailbox": blank}, headers=auth(key))
            assert response.status_code == 400, (key, blank)
            assert "blank" in response.json()["error"]["message"], (key, blank)
    not_address = httpx.post(release, json={"mailbox": "bob"}, headers=auth("analyst"))
    assert not_address.status_code == 400
    assert "not an email address" in not_address.json()["error"]["message"]
    accepted = httpx.post(release, json=body, headers=auth("analyst"))
    assert accepted.status_code == 202

    # An approve needs a held copy, and a Message-ID is for approve only.
    approve = f"{base}/api/incidents/{incident_id}/approve"
    picked = {"message_id": "<other@example.net>"}
    unheld = httpx.post(approve, json=picked, headers=auth("analyst"))
    assert unheld.status_code == 400
    assert "has no held copy" in unheld.json()["error"]["message"]
    assert "nothing to approve" in unheld.json()["error"]["message"]
    off_approve = httpx.post(release, json={**body, **picked}, headers=auth("analyst"))
    assert off_approve.status_code == 400
    assert "release does not take one" in off_approve.json()["error"]["message"]
    retry = f"{base}/api/incidents/{incident_id}/retry"
    assert httpx.post(retry, json={}, headers=auth("reader")).status_code == 403
    # Nothing of this incident failed, so a retry is rejected before it is sent.
    retried = httpx.post(retry, json={}, headers=auth("analyst"))
    assert retried.status_code == 400
    assert "nothing to retry" in retried.json()["error"]["message"]

    def bob_restored() -> bool:
        response = httpx.get(
            f"{base}/api/incidents/{incident_id}", headers=auth("boss")
        )
        rows = {row["mailbox"]: row for row in response.json()["results"]}
        return bool(rows["bob@example.com"]["undone"])

    wait_for(bob_restored, what="bob's copy restored")
    copies = [
        m
        for m in graph_sim.messages("bob@example.com")
        if m["internet_message_id"] == PHISH_HEADER
    ]
    assert [(c["folder"], c["is_read"]) for c in copies] == [("Inbox", True)]
    alice = [
        m
        for m in graph_sim.messages("alice@example.com")
        if m["internet_message_id"] == PHISH_HEADER
    ]
    assert [c["hidden_folder"] for c in alice] == [True]
    detail = httpx.get(f"{base}/api/incidents/{incident_id}", headers=auth("reader"))
    assert detail.json()["state"] == "contained"

    history = httpx.get(f"{base}/api/incidents/{incident_id}", headers=auth("reader"))
    actors = [item["actor"] for item in history.json()["history"]]
    assert "api:analyst" in actors

    metrics = httpx.get(f"{base}/metrics").text
    assert (
        'autopull_pulls_total{kind="quarantine",platform="graph",status="quarantined"}'
        in metrics
    )
    assert 'autopull_alerts_total{outcome="normalized",source="tap"} 1.0' in metrics


def test_api_errors_are_json(
    api_settings: Settings, graph_sim: Any, start_api_worker: Any
) -> None:
    ensure_topics(api_settings)
    start_api_worker(api_settings)
    base = f"http://127.0.0.1:{api_settings.web_port}"
    wait_for(lambda: httpx.get(f"{base}/readyz").status_code == 200, what="readiness")

    missing = httpx.get(f"{base}/api/incidents/INC-NOPE", headers=auth("reader"))
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"
    bad_key = httpx.get(f"{base}/api/incidents", headers={"Authorization": "Bearer x"})
    assert bad_key.status_code == 401
    assert bad_key.json()["error"]["code"] == "unauthorized"
    assert bad_key.headers["WWW-Authenticate"] == "Bearer"
    no_key = httpx.post(f"{base}/api/incidents/INC-NOPE/close")
    assert no_key.status_code == 401
    assert no_key.headers["WWW-Authenticate"] == "Bearer"
    bad_time = httpx.get(
        f"{base}/api/incidents?since=yesterday", headers=auth("reader")
    )
    assert bad_time.status_code == 400
    assert "since" in bad_time.json()["error"]["message"]
    assert httpx.get(f"{base}/livez").json() == {"status": "alive"}
    bad_state = httpx.get(f"{base}/api/incidents?state=bogus", headers=auth("reader"))
    assert bad_state.status_code == 400
    assert "'bogus'" in bad_state.json()["error"]["message"]
    assert "contained" in bad_state.json()["error"]["message"]
    queries = [
        ("since=2026-01-01&since=2027-01-01", "since is given 2 times"),
        ("state=open&state=closed", "state is given 2 times"),
        ("sate=open", "'sate' is not known"),
    ]
    for query, message in queries:
        response = httpx.get(f"{base}/api/incidents?{query}", headers=auth("reader"))
        assert response.status_code == 400, query
        assert message in response.json()["error"]["message"], query

    command = f"{base}/api/incidents/INC-NOPE/comment"
    cases = [
        (b"{not json", "could not be parsed as JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b"[1]", "The request body is an array"),
        (b"null", "The request body is null"),
        (b'"bob@example.com"', "The request body is a string"),
        (b'{"mailbox": 5, "comment": "x"}', "'mailbox' must be a string"),
        (b'{"comment": {"nested": [1]}}', "'comment' must be a string"),
        (b'{"mailbx": "bob@example.com"}', "'mailbx' is not known"),
        (b'{"mailbox": "a@example.com", "mailbox": null}', "'mailbox' appears twice"),
        (b'{"comment": "x", "n": ' + b"1" * 5000 + b"}", "limit of 4300 digits"),
    ]
    for body, message in cases:
        response = httpx.post(command, content=body, headers=auth("analyst"))
        assert response.status_code == 400, body
        assert message in response.json()["error"]["message"], body
        assert "sys." not in response.json()["error"]["message"], body

    # The body is checked before the incident, so a valid body on an unknown
    # incident is the 404.
    unknown = httpx.post(command, json={"comment": "x"}, headers=auth("analyst"))
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "not_found"


def test_api_server_errors_are_json(
    api_settings: Settings, graph_sim: Any, start_api_worker: Any
) -> None:
    ensure_topics(api_settings)
    start_api_worker(api_settings)
    base = f"http://127.0.0.1:{api_settings.web_port}"
    wait_for(lambda: httpx.get(f"{base}/readyz").status_code == 200, what="readiness")

    # A view that serves GET serves HEAD too, and only such a view lists HEAD.
    methods = [
        ("PUT", "/api/incidents", "GET,HEAD"),
        ("DELETE", "/api/incidents/INC-NOPE", "GET,HEAD"),
        ("GET", "/api/incidents/INC-NOPE/close", "POST"),
        ("HEAD", "/api/incidents/INC-NOPE/close", "POST"),
        ("GET", "/alerts/tap", "POST"),
        ("HEAD", "/alerts/tap", "POST"),
    ]
    for method, path, allowed in methods:
        response = httpx.request(method, f"{base}{path}", headers=auth("boss"))
        assert response.status_code == 405, (method, path)
        assert response.headers["Allow"] == allowed, (method, path)
        if method == "HEAD":
            continue
        error = response.json()["error"]
        assert error["code"] == "method_not_allowed", path
        assert f"The method {method} is not allowed on {path}" in error["message"]

    for path in ("/api", "/api/nothing/here/at/all", "/alerts"):
        response = httpx.get(f"{base}{path}", headers=auth("boss"))
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == "not_found", path

    command = f"{base}/api/incidents/INC-NOPE/comment"
    large = b'{"comment": "' + b"x" * (64 * 1024) + b'"}'
    too_large = httpx.post(command, content=large, headers=auth("analyst"))
    assert too_large.status_code == 413
    assert too_large.json()["error"]["code"] == "too_large"
    assert "65536 bytes" in too_large.json()["error"]["message"]
    huge = b'{"comment": "' + b"x" * (2 * 1024 * 1024) + b'"}'
    chunks = (huge[i : i + 65536] for i in range(0, len(huge), 65536))
    streamed = httpx.post(command, content=chunks, headers=auth("analyst"))
    assert streamed.status_code == 413
    assert streamed.json()["error"]["code"] == "too_large"

    # The probes keep their plain replies.
    assert httpx.put(f"{base}/livez").status_code == 405


class OwnBroker:
    """A broker that only one test uses, so that the test may stop it."""

    def __init__(self, data: Path) -> None:
        port = free_port()
        controller = free_port()
        self.bootstrap = f"127.0.0.1:{port}"
        self.env = os.environ | {
            "AUTOPULL_KAFKA_PORT": str(port),
            "AUTOPULL_KAFKA_CONTROLLER_PORT": str(controller),
            "AUTOPULL_KAFKA_DATA": str(data),
            "AUTOPULL_PYTHON": sys.executable,
        }

    def run(self, action: str) -> None:
        result = subprocess.run(
            ["bash", str(KAFKA_SCRIPT), action],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert result.returncode == 0, f"kafka.sh {action}: {result.stderr}"


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[OwnBroker]:
    broker = OwnBroker(tmp_path / "kafka")
    broker.run("start")
    yield broker
    broker.run("stop")


def test_api_commands_with_broker_down(
    api_settings: Settings,
    graph_sim: Any,
    start_api_worker: Any,
    own_broker: OwnBroker,
    tmp_path: Path,
) -> None:
    webhook = WebhookSettings(tokens={"tap": TAP_TOKEN}, ack_timeout_seconds=3)
    settings = api_settings.model_copy(
        update={
            "kafka_bootstrap": own_broker.bootstrap,
            "api_ack_timeout_seconds": 3,
            "webhook": webhook,
        }
    )
    base, incident_id = start_contained_incident(settings, start_api_worker)
    accepted = httpx.post(
        f"{base}/api/incidents/{incident_id}/comment",
        json={"comment": "before the outage"},
        headers=auth("analyst"),
    )
    assert accepted.status_code == 202, accepted.text

    own_broker.run("stop")
    stopped = time.monotonic()
    for action, body in [("comment", {"comment": "lost?"}), ("close", {})]:
        url = f"{base}/api/incidents/{incident_id}/{action}"
        response = httpx.post(url, json=body, headers=auth("analyst"), timeout=30)
        assert response.status_code == 503, response.text
        error = response.json()["error"]
        assert error["code"] == "unavailable"
        assert error["message"].startswith("Kafka did not acknowledge the command")
    alert = httpx.post(
        f"{base}/alerts/tap",
        content=PHISH_ALERT.read_bytes(),
        headers={
            "Authorization": f"Bearer {TAP_TOKEN}",
            "Content-Type": "application/json",
        },
        timeout=30,
    )
    assert alert.status_code == 503, alert.text
    assert alert.json()["error"]["code"] == "unavailable"

    # The client libraries retry the broker many times a second. Each repeated
    # error is logged once a minute, so the worker's log stays short.
    time.sleep(max(0.0, 20 - (time.monotonic() - stopped)))
    log = (tmp_path / "api-worker-0.log").read_text(errors="replace")
    outage = log[log.rindex("Command accepted") :]
    errors = [line for line in outage.splitlines() if "[ERROR]" in line]
    assert errors, "the outage was not logged"
    assert len(errors) < 40, f"{len(errors)} ERROR lines:\n" + "\n".join(errors[:60])
    assert any("Kafka did not acknowledge a command" in line for line in errors)
    assert any("Kafka did not acknowledge alert" in line for line in errors)
    assert "Exception in callback" not in outage


def test_readiness_follows_broker(
    api_settings: Settings,
    graph_sim: Any,
    start_api_worker: Any,
    own_broker: OwnBroker,
) -> None:
    settings = api_settings.model_copy(update={"kafka_bootstrap": own_broker.bootstrap})
    ensure_topics(settings)
    start_api_worker(settings)
    base = f"http://127.0.0.1:{settings.web_port}"
    wait_for(lambda: httpx.get(f"{base}/readyz").status_code == 200, what="readiness")

    own_broker.run("stop")

    def unready() -> httpx.Response | None:
        response = httpx.get(f"{base}/readyz", timeout=5)
        return response if response.status_code == 503 else None

    started = time.monotonic()
    response = wait_for(unready, timeout=30, what="unreadiness without the broker")
    # A stopped broker closes its connections, so the probe reports it at once.
    assert time.monotonic() - started < 10
    body = response.json()
    assert body["ready"] is False
    assert body["broker_connected"] is False
    assert body["tables_recovered"] is True
    assert body["incidents_loaded"] is True
    assert len(body["reasons"]) == 1
    assert "Kafka consumer" in body["reasons"][0]
    live = httpx.get(f"{base}/livez", timeout=5)
    assert live.status_code == 200
    assert live.json() == {"status": "alive"}

    own_broker.run("start")
    ready = wait_for(
        lambda: httpx.get(f"{base}/readyz", timeout=5).status_code == 200,
        timeout=90,
        what="readiness once the broker is back",
    )
    assert ready
    body = httpx.get(f"{base}/readyz", timeout=5).json()
    assert body["broker_connected"] is True
    assert body["reasons"] == []
    assert httpx.get(f"{base}/livez", timeout=5).status_code == 200
