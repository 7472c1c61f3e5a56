"""`autopull incident show` lists the candidates of held searches."""

from __future__ import annotations

import io
from datetime import UTC, datetime

import pytest

from autopull.streams import operate
from autopull.streams.incidents import apply_alert, new_incident
from autopull.streams.settings import Settings

RECEIVED = datetime(2024, 3, 10, 9, 30, tzinfo=UTC)


class Held:
    mailbox = "tara@example.com"
    message_id = "queue-id-7Q2@no-message-id"
    action = "hold"
    reason = "Two messages match."
    rule = "search.not-unique"


def held_incident() -> dict:
    incident = new_incident("INC-1", "campaign-1", RECEIVED)
    alert = {
        "alert_id": "fireeye:1",
        "source": "fireeye",
        "message_id": Held.message_id,
        "recipients": [Held.mailbox],
        "sender": "billing@example.net",
        "sender_ip": None,
        "subject": "Invoice 4471",
        "classification": "phish",
        "threat_status": "active",
        "received_at": RECEIVED,
    }
    enriched = {
        "alert": alert,
        "campaign_key": "campaign-1",
        "recipients": [{"mailbox": Held.mailbox}],
    }
    apply_alert(incident, enriched, lambda alert, recipients: [Held()])
    incident["pulls"][0]["candidates"] = [
        {
            "message_id": "first@billing-example.net",
            "folder": "Inbox",
            "subject": "Invoice 4471",
            "sender": "billing@example.net",
            "received_at": RECEIVED,
        },
        {
            "message_id": "",
            "folder": "Archive",
            "subject": "Invoice 4471",
            "sender": "billing@example.net",
            "received_at": RECEIVED,
        },
    ]
    return incident


def test_show_lists_held_candidates(monkeypatch: pytest.MonkeyPatch) -> None:
    incident = held_incident()
    monkeypatch.setattr(operate, "load_incidents", lambda settings: {"INC-1": incident})
    out = io.StringIO()

    code = operate.run_show(
        Settings(kafka_bootstrap="127.0.0.1:9"), "INC-1", as_json=False, out=out
    )

    text = out.getvalue()
    assert code == 0
    assert "tara@example.com: held with 2 candidates" in text
    assert "first@billing-example.net  Inbox  2024-03-10T09:30:00Z" in text
    assert "(no Message-ID)  Archive" in text
