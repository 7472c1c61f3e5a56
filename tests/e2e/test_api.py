"""The REST API, probes and metrics of a running worker, on the real broker."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from autopull.streams.ingest import Input, RawSender, raw_alert
from autopull.streams.settings import Settings
from autopull.streams.topics import ensure_topics

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

REPO_ROOT = Path(__file__).resolve().parents[2]
PHISH_ALERT = REPO_ROOT / "examples" / "alerts" / "tap-delivered-phish.json"
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


def test_api_release_restores_one_copy(
    api_settings: Settings, graph_sim: Any, start_api_worker: Any
) -> None:
    ensure_topics(api_settings)
    start_api_worker(api_settings)
    base = f"http://127.0.0.1:{api_settings.web_port}"
    wait_for(lambda: httpx.get(f"{base}/readyz").status_code == 200, what="readiness")

    sender = RawSender(api_settings)
    sender.send(raw_alert(Input("phish.json", PHISH_ALERT.read_bytes()), None, "t"))
    sender.flush()

    def contained() -> dict[str, Any] | None:
        listing = httpx.get(
            f"{base}/api/incidents?state=contained", headers=auth("reader")
        )
        incidents = listing.json()["incidents"]
        return incidents[0] if incidents else None

    incident = wait_for(contained, what="a contained incident")
    incident_id = incident["incident_id"]
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
    accepted = httpx.post(release, json=body, headers=auth("analyst"))
    assert accepted.status_code == 202

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
    bad_time = httpx.get(
        f"{base}/api/incidents?since=yesterday", headers=auth("reader")
    )
    assert bad_time.status_code == 400
    assert "since" in bad_time.json()["error"]["message"]
    assert httpx.get(f"{base}/livez").json() == {"status": "alive"}
    bad_state = httpx.get(f"{base}/api/incidents?state=bogus", headers=auth("reader"))
    assert bad_state.status_code == 400
    assert "contained" in bad_state.json()["error"]["message"]

    command = f"{base}/api/incidents/INC-NOPE/comment"
    cases = [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"mailbox": 5, "comment": "x"}', "'mailbox' must be a string"),
        (b'{"comment": {"nested": [1]}}', "'comment' must be a string"),
    ]
    for body, message in cases:
        response = httpx.post(command, content=body, headers=auth("analyst"))
        assert response.status_code == 400, body
        assert message in response.json()["error"]["message"], body
