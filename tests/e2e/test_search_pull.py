"""FireEye alerts with a made-up Message-ID through the whole pipeline.

The demo world gives tara@ the reported message (M7) and three near misses: the
same sender with another subject, the same subject from another sender, and the
same sender and subject a day earlier. Only M7 may move.
"""

from __future__ import annotations

import copy
import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer

from autopull.schemas import AvroCodec
from autopull.streams.ingest import Input, RawSender, raw_alert
from autopull.streams.settings import Settings
from autopull.streams.topics import ensure_topics, full_name

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

REPO_ROOT = Path(__file__).resolve().parents[2]
WSAPI_ALERT = REPO_ROOT / "examples" / "alerts" / "fireeye-wsapi.json"
SYNTHETIC = "queue-id-7Q2@no-message-id"
UNMATCHED = "queue-id-9Z9@no-message-id"
M7 = "<20240310093000.41.invoice@billing-example.net>"
HIDDEN_FOLDER = "Autopull Quarantine"


def read_topic(
    settings: Settings, topic: str, done: Callable[[list[bytes]], bool]
) -> list[bytes]:
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"{settings.topic_prefix}reader-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([full_name(settings, topic)])
    values: list[bytes] = []
    deadline = time.monotonic() + 120
    try:
        while not done(values) and time.monotonic() < deadline:
            for message in consumer.consume(num_messages=100, timeout=0.5):
                if message.error() is None and message.value() is not None:
                    values.append(message.value())
    finally:
        consumer.close()
    return values


def unmatched_alert() -> bytes:
    """Return the tara@ alert with a subject no message of hers has."""
    document: dict[str, Any] = json.loads(WSAPI_ALERT.read_text())
    alert = copy.deepcopy(document["alert"][0])
    alert["uuid"] = "5d1f7b93-2e6a-4c08-9b3d-7f1e2a4c6d80"
    alert["id"] = 7009
    alert["smtpMessage"] = {"subject": "Invoice 9999", "id": UNMATCHED}
    return json.dumps({"alert": [alert], "alertsCount": 1}).encode()


def test_made_up_message_id_found_by_search(
    pipeline_settings: Settings, graph_sim: Any, start_worker: Any
) -> None:
    ensure_topics(pipeline_settings)
    start_worker()
    sender = RawSender(pipeline_settings)
    sender.send(raw_alert(Input("wsapi.json", WSAPI_ALERT.read_bytes()), None, "test"))
    sender.send(raw_alert(Input("unmatched.json", unmatched_alert()), None, "test"))
    sender.flush()

    codec = AvroCodec("PullOutcome")

    def both_outcomes(values: list[bytes]) -> bool:
        return {codec.loads(v)["message_id"] for v in values} >= {SYNTHETIC, UNMATCHED}

    values = read_topic(pipeline_settings, "pull.outcomes", both_outcomes)
    outcomes = {o["message_id"]: o for o in map(codec.loads, values)}
    assert set(outcomes) == {SYNTHETIC, UNMATCHED}

    found = outcomes[SYNTHETIC]
    assert found["mailbox"] == "tara@example.com"
    assert found["status"] == "quarantined"
    assert found["resolved_message_id"] == M7.strip("<>")
    assert found["copies"] == 1

    missing = outcomes[UNMATCHED]
    assert missing["status"] == "held"
    assert missing["candidates"] == []
    assert "Invoice 9999" in missing["error"]

    tara = {m["key"]: m for m in graph_sim.messages("tara@example.com")}
    assert tara["M7"]["folder"] == HIDDEN_FOLDER
    for key in ("B-tara-1", "B-tara-2", "B-tara-3"):
        assert tara[key]["folder"] == "Inbox", key

    incident_codec = AvroCodec("Incident")

    def held_recorded(values: list[bytes]) -> bool:
        return any(
            entry["message_id"] == UNMATCHED and entry["status"] == "held"
            for value in values
            for entry in incident_codec.loads(value)["pulls"]
        )

    incidents = read_topic(pipeline_settings, "incidents", held_recorded)
    entries = [
        entry
        for value in incidents
        for entry in incident_codec.loads(value)["pulls"]
        if entry["message_id"] == UNMATCHED
    ]
    assert entries[-1]["action"] == "hold"
    assert entries[-1]["rule"] == "search.not-unique"
    assert entries[-1]["search"]["subject"] == "Invoice 9999"
