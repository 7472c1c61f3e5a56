"""Alerts to very many recipients through the whole pipeline.

An alert to 20,000 mailboxes makes an incident of several MiB, above the broker's
default record size, and a worker must store and publish it. An incident above
`incident_max_bytes` must not stop the worker: the event goes to alerts.dead and
the next alert is handled as usual. A command that would make an incident too
large is rejected by the REST API and the CLI before it is sent.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from confluent_kafka import Consumer

from autopull.schemas import AvroCodec
from autopull.streams.ingest import Input, RawSender, raw_alert
from autopull.streams.operate import load_incidents, run_command
from autopull.streams.records import Record
from autopull.streams.settings import MIB, Settings
from autopull.streams.topics import ensure_topics, full_name

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


def campaign_alert(message_id: str, recipients: list[str]) -> bytes:
    """Return a generic alert about one message delivered to `recipients`."""
    alert = {
        "json_version": "2.0",
        "classification": "phish",
        "email": {"message_id": f"<{message_id}>", "recipient": recipients},
    }
    return json.dumps(alert).encode()


def send(settings: Settings, name: str, body: bytes) -> None:
    sender = RawSender(settings)
    sender.send(raw_alert(Input(name, body), None, "test"))
    sender.flush()


def wait_for(check: Callable[[], Any], what: str, timeout: float = 180.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(1.0)
    raise AssertionError(f"Timed out after {timeout:g} s waiting for {what}.")


def incident_with(settings: Settings, message_id: str) -> Record | None:
    for incident in load_incidents(settings).values():
        if message_id in incident["message_ids"]:
            return incident
    return None


def dead_letters(settings: Settings) -> list[Record]:
    codec = AvroCodec("DeadLetter")
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"{settings.topic_prefix}dead-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([full_name(settings, "alerts.dead")])
    letters = []
    idle_until = time.monotonic() + 5
    try:
        while time.monotonic() < idle_until:
            for message in consumer.consume(num_messages=100, timeout=0.5):
                if message.error() is None and message.value() is not None:
                    letters.append(codec.loads(message.value()))
                    idle_until = time.monotonic() + 2
    finally:
        consumer.close()
    return letters


def test_incident_of_many_mailboxes_is_stored(
    pipeline_settings: Settings, start_worker: Any
) -> None:
    settings = pipeline_settings
    ensure_topics(settings)
    worker = start_worker()
    recipients = [f"user{number:05d}@example.com" for number in range(20_000)]
    send(settings, "many.json", campaign_alert("many@evil.example", recipients))

    incident = wait_for(
        lambda: incident_with(settings, "many@evil.example"),
        "the incident of 20,000 mailboxes",
    )
    assert len(incident["pulls"]) == 20_000
    assert len(AvroCodec("Incident").dumps(incident)) > 4 * MIB
    # The default policy holds a pull of that many mailboxes for approval.
    assert {entry["status"] for entry in incident["pulls"]} == {"held"}
    assert worker.poll() is None


def test_oversized_incident_goes_to_dead_letters(
    pipeline_settings: Settings, start_worker: Any
) -> None:
    settings = pipeline_settings.model_copy(update={"incident_max_bytes": MIB})
    ensure_topics(settings)
    worker = start_worker(settings)
    recipients = [f"user{number:05d}@example.com" for number in range(8_000)]
    send(settings, "too-many.json", campaign_alert("big@evil.example", recipients))
    send(
        settings,
        "small.json",
        campaign_alert("small@evil.example", ["alice@example.com"]),
    )

    small = wait_for(
        lambda: incident_with(settings, "small@evil.example"),
        "the small incident after the oversized one",
    )
    assert [entry["mailbox"] for entry in small["pulls"]] == ["alice@example.com"]
    assert incident_with(settings, "big@evil.example") is None
    letters = [
        letter for letter in dead_letters(settings) if letter["stage"] == "incident"
    ]
    assert len(letters) == 1
    reason = letters[0]["reason"]
    assert "RecordTooLargeError" in reason
    assert f"above the maximum of {MIB:,}" in reason
    assert "AUTOPULL_INCIDENT_MAX_BYTES" in reason
    assert b"big@evil.example" in letters[0]["body"]
    assert worker.poll() is None


ANALYST_KEY = "large-incident-analyst-key"


def test_command_over_limit_rejected_before_sending(
    pipeline_settings: Settings,
    start_worker: Any,
    pick_port: Callable[[], int],
) -> None:
    keys = {
        "analyst": {
            "sha256": hashlib.sha256(ANALYST_KEY.encode()).hexdigest(),
            "role": "analyst",
        }
    }
    settings = pipeline_settings.model_copy(
        update={
            "incident_max_bytes": MIB,
            "web_enabled": True,
            "web_port": pick_port(),
            "api_keys": Settings(api_keys=keys).api_keys,
        }
    )
    ensure_topics(settings)
    worker = start_worker(settings)
    recipients = [f"user{number:05d}@example.com" for number in range(1_000)]
    send(settings, "held.json", campaign_alert("held@evil.example", recipients))
    incident = wait_for(
        lambda: incident_with(settings, "held@evil.example"),
        "the incident of 1,000 held mailboxes",
    )
    incident_id = incident["incident_id"]
    size = len(AvroCodec("Incident").dumps(incident))
    assert size < MIB // 2

    base = f"http://127.0.0.1:{settings.web_port}"
    headers = {"Authorization": f"Bearer {ANALYST_KEY}"}

    def served() -> bool:
        url = f"{base}/api/incidents/{incident_id}"
        try:
            return httpx.get(url, headers=headers, timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(served, "the incident in the REST API's read model")
    # A reject writes its 1,000 bytes of text into the reason of each held copy.
    text = "Not a phish, the sender is our payroll provider. " * 20
    url = f"{base}/api/incidents/{incident_id}"
    rejected = httpx.post(
        f"{url}/reject", json={"comment": text}, headers=headers, timeout=30
    )
    assert rejected.status_code == 413, rejected.text
    error = rejected.json()["error"]
    assert error["code"] == "too_large"
    assert f"above the maximum of {MIB:,} bytes" in error["message"]
    assert "AUTOPULL_INCIDENT_MAX_BYTES" in error["message"]

    out = io.StringIO()
    code = run_command(
        settings, incident_id, "reject", text=text, actor="carol", out=out
    )
    assert code == 2
    assert f"above the maximum of {MIB:,} bytes" in out.getvalue()
    assert "AUTOPULL_INCIDENT_MAX_BYTES" in out.getvalue()

    # The same text as one comment fits, and the incident agent applies it.
    commented = httpx.post(
        f"{url}/comment", json={"comment": text}, headers=headers, timeout=30
    )
    assert commented.status_code == 202, commented.text
    updated = wait_for(
        lambda: next(
            (
                found
                for found in [incident_with(settings, "held@evil.example")]
                if found and found["history"][-1]["what"] == "comment"
            ),
            None,
        ),
        "the comment in the incident's history",
    )
    assert updated["history"][-1]["detail"] == text
    assert {entry["status"] for entry in updated["pulls"]} == {"held"}
    letters = [
        letter for letter in dead_letters(settings) if letter["stage"] == "incident"
    ]
    assert letters == []
    assert worker.poll() is None
