"""Sending alert files to alerts.raw, exactly as they are.

Nothing is parsed here beyond detecting the source: an alert that cannot be used
still goes to Kafka, where the normalize agent turns it into a dead letter with a
reason, so no input is lost. Only input over the size limit, an empty input and
an unknown format name are rejected at the door.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka import KafkaError, Message, Producer

from autopull.connectors.sources.common import load_json
from autopull.connectors.sources.detect import detect_format, get_format
from autopull.connectors.sources.exceptions import (
    InvalidAlertError,
    UnknownFormatError,
)
from autopull.schemas import AvroCodec
from autopull.streams.commands import KAFKA_PARTITIONER
from autopull.streams.records import utcnow
from autopull.streams.settings import Settings
from autopull.streams.topics import client_config, full_name

log = logging.getLogger(__name__)

STDIN_NAME = "<stdin>"


class IngestError(Exception):
    """An input that is refused before it reaches Kafka."""


@dataclass(frozen=True)
class Input:
    """One alert body and where it came from."""

    name: str
    body: bytes


def read_input(path: str, limit: int) -> Input:
    """Read one file (or `-` for standard input), rejecting bodies over `limit` bytes.

    An empty body is rejected too, as the webhook rejects an empty request.
    """
    name = STDIN_NAME if path == "-" else path
    if path == "-":
        body = sys.stdin.buffer.read(limit + 1)
    else:
        file = Path(path)
        if file.is_dir():
            raise IngestError(
                f"{path}: this is a directory, not an alert file. Name the files in "
                f"it, such as {file / '*.json'}."
            )
        if not file.is_file():
            raise IngestError(
                f"{path}: the file was not found. Check the path and its permissions."
            )
        size = file.stat().st_size
        if size > limit:
            raise IngestError(
                f"{path}: the file is {size:,} bytes, above the ingest limit of "
                f"{limit:,} bytes; split it or raise AUTOPULL_INGEST_MAX_BYTES."
            )
        body = file.read_bytes()
    if len(body) > limit:
        raise IngestError(
            f"{name}: the input is larger than the ingest limit of {limit:,} bytes; "
            "split it or raise AUTOPULL_INGEST_MAX_BYTES."
        )
    if not body:
        raise IngestError(f"{name}: the input is empty. Send one alert.")
    return Input(path, body)


def detect_source(body: bytes) -> str:
    """Return the name of the alert format of `body`, or "unknown".

    An unusable body still goes to Kafka as "unknown", where the normalize agent
    turns it into a dead letter with the reason.
    """
    try:
        return detect_format(load_json(body)).name
    except InvalidAlertError:
        return "unknown"


def raw_alert(item: Input, source: str | None, transport: str) -> dict[str, object]:
    """Build the RawAlert record for one input."""
    detected = source or detect_source(item.body)
    digest = hashlib.sha256(item.body).hexdigest()
    return {
        "source": detected,
        "source_alert_id": digest,
        "received_at": utcnow(),
        "content_type": "application/json",
        "transport": {"transport": transport, "name": item.name},
        "body": item.body,
    }


class RawSender:
    """A Kafka producer for alerts.raw that waits for acks=all on every flush."""

    def __init__(self, settings: Settings) -> None:
        self.topic = full_name(settings, "alerts.raw")
        self.codec = AvroCodec(
            "RawAlert",
            registry=settings.schema_registry_url,
            subject=f"{self.topic}-value",
        )
        self.producer = Producer(
            client_config(
                settings,
                {
                    "acks": "all",
                    "enable.idempotence": True,
                    "partitioner": KAFKA_PARTITIONER,
                    "message.max.bytes": settings.ingest_max_bytes * 4,
                },
            )
        )
        self.errors: list[str] = []

    def send(self, record: dict[str, object]) -> None:
        """Queue one RawAlert record."""
        key = f"{record['source']}:{record['source_alert_id']}".encode()
        self.producer.produce(
            self.topic, key=key, value=self.codec.dumps(record), on_delivery=self._done
        )
        self.producer.poll(0)

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until every queued alert is acknowledged; raise on any failure."""
        remaining = self.producer.flush(timeout)
        if remaining:
            raise IngestError(
                f"{remaining} alerts were not acknowledged by Kafka within "
                f"{timeout} s; check that the broker is reachable and send them again."
            )
        if self.errors:
            raise IngestError("Kafka refused alerts: " + "; ".join(self.errors))

    def _done(self, error: KafkaError | None, message: Message) -> None:
        if error is not None:
            self.errors.append(error.str())


def run_ingest(paths: list[str], settings: Settings, source: str | None) -> int:
    """Send every input to alerts.raw; return the process exit code.

    `source` must name a registered alert format, or be None to detect it per input.
    An unknown name gives exit code 2 before anything is read or sent.
    """
    if source is not None:
        try:
            get_format(source)
        except UnknownFormatError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    sender = RawSender(settings)
    failed = 0
    sent = 0
    for path in paths or ["-"]:
        try:
            item = read_input(path, settings.ingest_max_bytes)
        except IngestError as error:
            print(f"error: {error}", file=sys.stderr)
            failed += 1
            continue
        sender.send(raw_alert(item, source, "ingest"))
        sent += 1
    try:
        sender.flush()
    except IngestError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    noun = "alert" if sent == 1 else "alerts"
    print(f"Sent {sent} {noun} to {sender.topic}.", file=sys.stderr)
    return 1 if failed else 0
