"""Analyst commands through the whole pipeline: retry a failed pull, pick a candidate.

Both tests run a worker against the Graph simulator and give the command through
`run_command`, as `autopull retry --wait` and `autopull approve --message-id
--wait` do.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from autopull.streams.ingest import Input, RawSender, raw_alert
from autopull.streams.operate import load_incidents, run_command
from autopull.streams.records import Record
from autopull.streams.settings import Settings
from autopull.streams.topics import ensure_topics

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_WORLD = REPO_ROOT / "examples" / "worlds" / "demo.json"
PHISH_ALERT = REPO_ROOT / "examples" / "alerts" / "tap-delivered-phish.json"
WSAPI_ALERT = REPO_ROOT / "examples" / "alerts" / "fireeye-wsapi.json"
HIDDEN_FOLDER = "Autopull Quarantine"
SYNTHETIC = "queue-id-7Q2@no-message-id"
# A second invoice from the same sender with the same subject, a minute after M7,
# so the search for the FireEye alert that names tara@ finds two messages.
TWIN = "20240310093100.42.invoice@billing-example.net"


def wait_for(check: Callable[[], Any], what: str, timeout: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.5)
    raise AssertionError(f"Timed out after {timeout:g} s waiting for {what}.")


def send_alert(settings: Settings, path: Path) -> None:
    sender = RawSender(settings)
    sender.send(raw_alert(Input(path.name, path.read_bytes()), None, "test"))
    sender.flush()


def entries_of(incident: Record, mailbox: str) -> list[Record]:
    return [entry for entry in incident["pulls"] if entry["mailbox"] == mailbox]


def incident_where(
    settings: Settings, found: Callable[[Record], bool], what: str
) -> Record:
    def check() -> Record | None:
        matching = [i for i in load_incidents(settings).values() if found(i)]
        return matching[0] if matching else None

    incident: Record = wait_for(check, what)
    return incident


@pytest.fixture
def graph_world(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """Return the demo world, with M7's twin for the candidate test."""
    if request.node.name != "test_approve_picks_one_candidate":
        return DEMO_WORLD
    world = json.loads(DEMO_WORLD.read_text())
    m7 = next(message for message in world["messages"] if message["key"] == "M7")
    twin = json.loads(json.dumps(m7))
    twin.update(
        key="M7-twin",
        malicious=False,
        verdict="benign",
        message_id=f"<{TWIN}>",
        date="2024-03-10T09:30:58Z",
    )
    twin["deliveries"][0]["received"] = "2024-03-10T09:31:03Z"
    twin.pop("note", None)
    world["messages"].append(twin)
    path = tmp_path / "world-with-twin.json"
    path.write_text(json.dumps(world))
    return path


def test_retry_pulls_failed_copy(
    pipeline_settings: Settings, graph_sim: Any, start_worker: Any
) -> None:
    settings = pipeline_settings
    ensure_topics(settings)
    # Graph rejects every request for bob's mailbox with 403 until the fault is
    # cleared, and the adapter reports that as a permanent error.
    denied = {
        "path": "/users/bob@example.com/",
        "count": 1000,
        "status": 403,
        "code": "ErrorAccessDenied",
        "message": "Access is denied. Check credentials and try again.",
    }
    httpx.post(f"{graph_sim.url}/_sim/faults", json=denied).raise_for_status()
    start_worker()
    send_alert(settings, PHISH_ALERT)

    def bob_failed(incident: Record) -> bool:
        return any(
            e["status"] == "failed" for e in entries_of(incident, "bob@example.com")
        )

    incident = incident_where(settings, bob_failed, "bob's pull to fail")
    incident_id = incident["incident_id"]
    bob = entries_of(incident, "bob@example.com")[0]
    assert "denied" in (bob["error"] or "").lower()
    assert [m["folder"] for m in phish_copies(graph_sim, "bob@example.com")] == [
        "Inbox"
    ]

    httpx.delete(f"{graph_sim.url}/_sim/faults").raise_for_status()
    out = io.StringIO()
    code = run_command(
        settings, incident_id, "retry", actor="carol", wait=True, timeout=120, out=out
    )
    assert code == 0, out.getvalue()
    assert "All 1 copies are done." in out.getvalue()

    incident = load_incidents(settings)[incident_id]
    bob = entries_of(incident, "bob@example.com")[0]
    assert bob["status"] == "quarantined"
    assert bob["rule"] == "retried"
    assert bob["error"] is None
    assert [m["folder"] for m in phish_copies(graph_sim, "bob@example.com")] == [
        HIDDEN_FOLDER
    ]
    assert incident["state"] == "contained"
    assert any(
        item["what"] == "retry" and item["actor"] == "carol"
        for item in incident["history"]
    )

    # A second retry finds nothing left to retry and is not sent.
    out = io.StringIO()
    code = run_command(settings, incident_id, "retry", wait=True, out=out)
    assert code == 2
    assert "nothing to retry" in out.getvalue()
    assert "Sent retry" not in out.getvalue()


def phish_copies(graph_sim: Any, mailbox: str) -> list[dict[str, Any]]:
    phish = json.loads(PHISH_ALERT.read_text())
    header = phish["messagesDelivered"][0]["messageID"]
    return [
        m for m in graph_sim.messages(mailbox) if m["internet_message_id"] == header
    ]


def test_approve_picks_one_candidate(
    pipeline_settings: Settings, graph_sim: Any, start_worker: Any
) -> None:
    settings = pipeline_settings
    ensure_topics(settings)
    start_worker()
    send_alert(settings, WSAPI_ALERT)

    def tara_held(incident: Record) -> bool:
        return any(
            e["status"] == "held" and len(e["candidates"]) == 2
            for e in entries_of(incident, "tara@example.com")
        )

    incident = incident_where(settings, tara_held, "tara's copy held by its search")
    incident_id = incident["incident_id"]
    held = entries_of(incident, "tara@example.com")[0]
    assert held["message_id"] == SYNTHETIC
    assert {c["message_id"] for c in held["candidates"]} == {
        TWIN,
        "20240310093000.41.invoice@billing-example.net",
    }

    # An id that the search did not offer is rejected before anything is sent.
    out = io.StringIO()
    code = run_command(
        settings,
        incident_id,
        "approve",
        mailbox="tara@example.com",
        message_id="<other@billing-example.net>",
        out=out,
    )
    assert code == 2
    assert "other@billing-example.net" in out.getvalue()
    assert TWIN in out.getvalue()

    out = io.StringIO()
    code = run_command(
        settings,
        incident_id,
        "approve",
        mailbox="tara@example.com",
        message_id=f"<{TWIN}>",
        actor="carol",
        wait=True,
        timeout=120,
        out=out,
    )
    assert code == 0, out.getvalue()

    tara = {m["key"]: m for m in graph_sim.messages("tara@example.com")}
    assert tara["M7-twin"]["folder"] == HIDDEN_FOLDER
    assert tara["M7"]["folder"] == "Inbox"
    entry = entries_of(load_incidents(settings)[incident_id], "tara@example.com")[0]
    assert entry["status"] == "quarantined"
    assert entry["resolved_message_id"] == TWIN
    assert entry["reason"] == f"Approved by carol for {TWIN}."
