"""A worker with online intel providers: one responds, one cannot be reached."""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from confluent_kafka import Consumer

from autopull.connectors.intel import IntelSettings
from autopull.schemas import AvroCodec
from autopull.streams.ingest import Input, RawSender, raw_alert
from autopull.streams.settings import Settings
from autopull.streams.topics import ensure_topics, full_name

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

REPO_ROOT = Path(__file__).resolve().parents[2]
PHISH_ALERT = REPO_ROOT / "examples" / "alerts" / "tap-delivered-phish.json"
PHISH_ID = "20261201093000.1234.invoice@billing-example.net"
PHISH_URL = "http://billing-example.net/pay/4471"
RECIPIENTS = ["alice@example.com", "bob@example.com", "carol@example.com"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class LookupHandler(BaseHTTPRequestHandler):
    """Return a hit for the phish URL and 404 (no hits) for everything else."""

    requests: list[tuple[str, str]] = []

    def do_GET(self) -> None:
        query = parse_qs(urlsplit(self.path).query)
        kind, value = query["kind"][0], query["value"][0]
        self.requests.append((kind, value))
        if kind == "url" and value == PHISH_URL:
            body = json.dumps({"hits": [{"confidence": 95}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        """Keep the test output free of request lines."""


@pytest.fixture
def lookup_service() -> Iterator[str]:
    """Serve lookups on 127.0.0.1 from a thread and return the lookup URL."""
    LookupHandler.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), LookupHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/lookup"
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


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


def test_worker_enriches_from_providers(
    pipeline_settings: Settings,
    graph_sim: Any,
    start_worker: Any,
    lookup_service: str,
) -> None:
    closed_port = free_port()
    intel = IntelSettings(
        providers=[
            {"name": "answering", "url": lookup_service},
            {
                "name": "unreachable",
                "url": f"http://127.0.0.1:{closed_port}/lookup",
                "timeout_seconds": 1,
            },
        ]
    )
    settings = pipeline_settings.model_copy(update={"intel": intel})
    ensure_topics(settings)
    start_worker(settings)
    sender = RawSender(settings)
    sender.send(raw_alert(Input("phish.json", PHISH_ALERT.read_bytes()), None, "test"))
    sender.flush()

    enriched_codec = AvroCodec("EnrichedAlert")
    values = read_topic(settings, "alerts.enriched", lambda v: len(v) >= 1)
    enriched = [enriched_codec.loads(value) for value in values]
    assert len(enriched) == 1
    assert enriched[0]["unavailable"] == ["unreachable"]
    assert {
        "indicator": PHISH_URL,
        "kind": "url",
        "source": "answering",
        "confidence": 95,
    } in enriched[0]["intel_hits"]
    assert ("url", PHISH_URL) in LookupHandler.requests
    assert ("ip", "192.0.2.44") in LookupHandler.requests

    outcome_codec = AvroCodec("PullOutcome")
    values = read_topic(settings, "pull.outcomes", lambda v: len(v) >= 3)
    outcomes = [outcome_codec.loads(value) for value in values]
    assert sorted(o["mailbox"] for o in outcomes) == RECIPIENTS
    assert {o["status"] for o in outcomes} == {"quarantined"}
    assert {o["message_id"] for o in outcomes} == {PHISH_ID}
