"""slapd stopped during a whole pipeline run on the real broker, against Graph.

The alert names two aliases that only the directory resolves: robert.brown@ and
alice@ (dev/slapd/directory.ldif), whose mailboxes are bob.brown@ and
alice.archer@. While slapd is down the alert must wait: no pull, no dead letter,
and above all no pull from the alias addresses. Once slapd is back, both mailboxes
are quarantined.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from slapdkit import Slapd, read_all

from autopull.streams.ingest import Input, RawSender, raw_alert
from autopull.streams.settings import Settings
from autopull.streams.topics import ensure_topics

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO = REPO_ROOT / "examples" / "worlds" / "demo.json"
MESSAGE_ID = "dir-outage-1@billing-example.net"
MAILBOXES = ["alice.archer@autopull.test", "bob.brown@autopull.test"]
ALIASES = ["alice@autopull.test", "robert.brown@autopull.test"]
OUTAGE_SECONDS = 20.0


@pytest.fixture
def slapd(tmp_path: Path) -> Iterator[Slapd]:
    instance = Slapd(tmp_path / "slapd")
    instance.run("start")
    yield instance
    instance.run("stop")


@pytest.fixture
def graph_world(tmp_path: Path) -> Path:
    """Return the demo world plus the tenant autopull.test and two of its users."""
    world: dict[str, Any] = json.loads(DEMO.read_text())
    tenant = dict(world["tenants"][0], domain="autopull.test")
    world["tenants"].append(tenant)
    world["mailboxes"] += [{"address": address} for address in MAILBOXES]
    world["messages"].append(
        {
            "key": "D1",
            "verdict": "phishing",
            "malicious": True,
            "message_id": f"<{MESSAGE_ID}>",
            "from": "Billing <billing@example.net>",
            "to": ALIASES,
            "subject": "Invoice 9001 overdue",
            "date": "2026-12-01T09:30:00Z",
            "body": "Pay at http://billing-example.net/pay/9001\n",
            "deliveries": [
                {"mailbox": mailbox, "folder": "inbox", "read": False}
                for mailbox in MAILBOXES
            ],
        }
    )
    path = tmp_path / "world.json"
    path.write_text(json.dumps(world))
    return path


def alert_body() -> bytes:
    return json.dumps(
        {
            "json_version": "2.0",
            "classification": "phish",
            "email": {
                "message_id": f"<{MESSAGE_ID}>",
                "sender": "billing@example.net",
                "recipient": ALIASES,
                "subject": "Invoice 9001 overdue",
            },
        }
    ).encode()


def test_slapd_outage_alert_waits_then_pulls(
    pipeline_settings: Settings,
    graph_sim: Any,
    start_worker: Any,
    slapd: Slapd,
    tmp_path: Path,
) -> None:
    settings = pipeline_settings.model_copy(update={"directory": slapd.settings()})
    ensure_topics(settings)
    start_worker(settings)
    # The worker's first lookups must meet a running slapd only after the outage.
    slapd.run("stop")
    sender = RawSender(settings)
    sender.send(raw_alert(Input("alert.json", alert_body()), None, "test"))
    sender.flush()

    time.sleep(OUTAGE_SECONDS)
    assert read_all(settings, "pull.outcomes", "PullOutcome") == []
    assert read_all(settings, "alerts.dead", "DeadLetter") == []
    assert read_all(settings, "alerts.enriched", "EnrichedAlert") == []
    logs = "".join(path.read_text() for path in tmp_path.glob("worker-*.log"))
    assert "Enrichment failed, retrying" in logs

    slapd.run("start")
    deadline = time.monotonic() + 120
    outcomes: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        outcomes = read_all(settings, "pull.outcomes", "PullOutcome")
        if len(outcomes) >= len(MAILBOXES):
            break
        time.sleep(1)

    assert sorted(o["mailbox"] for o in outcomes) == MAILBOXES
    assert {o["status"] for o in outcomes} == {"quarantined"}
    assert {o["message_id"] for o in outcomes} == {MESSAGE_ID}
    enriched = read_all(settings, "alerts.enriched", "EnrichedAlert")
    assert len(enriched) == 1
    assert sorted(r["mailbox"] for r in enriched[0]["recipients"]) == MAILBOXES
    assert {r["recipient_type"] for r in enriched[0]["recipients"]} == {"alias"}
    for mailbox in MAILBOXES:
        folders = [
            m["folder"]
            for m in graph_sim.messages(mailbox)
            if m["internet_message_id"] == f"<{MESSAGE_ID}>"
        ]
        assert folders == ["Autopull Quarantine"], mailbox
