"""Hostile input through the ingest functions and the webhook of a running worker.

Every malformed or adversarial body must end as a 4xx reply, a refusal by ingest for
its size, or a dead letter on alerts.dead that carries its exact bytes. Good alerts
sent between them must still be pulled, and the worker must keep running.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from confluent_kafka import Consumer
from pydantic import SecretStr

from autopull.connectors.sources.detect import parse_alert
from autopull.connectors.sources.exceptions import InvalidAlertError
from autopull.schemas import AvroCodec
from autopull.streams.ingest import IngestError, Input, RawSender, raw_alert, read_input
from autopull.streams.settings import Settings
from autopull.streams.topics import ensure_topics, full_name
from autopull.streams.webhook import WebhookSettings

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = REPO_ROOT / "examples" / "alerts"
GENERIC_TOKEN = "generic-token-" + uuid.uuid4().hex
DETECTOR_TOKEN = "detector-token-" + uuid.uuid4().hex
FIREEYE_SECRET = "fireeye-secret-" + uuid.uuid4().hex
WORKER_START_TIMEOUT = 90.0
M1 = "20261201093000.1234.invoice@billing-example.net"
M2 = "CAH7x+q/Lk=Zp'8#w%41&r@mail.example.net"
M4 = "20261201120000.5521.invoice@billing-example.net"
EXPECTED_OUTCOMES = {
    ("alice@example.com", M1),
    ("bob@example.com", M1),
    ("carol@example.com", M1),
    ("dave@example.com", M2),
    ("frank@example.com", M4),
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def worker_environment(settings: Settings) -> dict[str, str]:
    """Return the AUTOPULL_* variables of `settings`, secrets unmasked."""
    env: dict[str, str] = {}
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

    webhook = settings.webhook
    env["AUTOPULL_WEBHOOK__TOKENS"] = json.dumps(
        {name: token.get_secret_value() for name, token in webhook.tokens.items()}
    )
    env["AUTOPULL_WEBHOOK__HMAC_SECRETS"] = json.dumps(
        {name: key.get_secret_value() for name, key in webhook.hmac_secrets.items()}
    )
    if settings.graph is not None:
        secret = settings.graph.client_secret.get_secret_value()
        env["AUTOPULL_GRAPH__CLIENT_SECRET"] = secret
    return env


@dataclass
class Worker:
    """A worker process with its web server, and the settings it runs with."""

    settings: Settings
    url: str
    process: subprocess.Popen[bytes]
    log: Path


@pytest.fixture
def webhook_worker(
    pipeline_settings: Settings, graph_sim: Any, tmp_path: Path
) -> Iterator[Worker]:
    """Start a worker whose web server listens on a free port with three sources."""
    port = free_port()
    webhook = WebhookSettings(
        tokens={
            "generic": SecretStr(GENERIC_TOKEN),
            "detector": SecretStr(DETECTOR_TOKEN),
        },
        hmac_secrets={"fireeye": SecretStr(FIREEYE_SECRET)},
    )
    settings = pipeline_settings.model_copy(
        update={"web_enabled": True, "web_port": port, "webhook": webhook}
    )
    ensure_topics(settings)

    log = tmp_path / "worker.log"
    environment = os.environ | worker_environment(settings)
    environment.pop("AUTOPULL_CONFIG", None)
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "autopull.streams.cli", "worker"],
            env=environment,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    worker = Worker(settings, f"http://127.0.0.1:{port}", process, log)
    try:
        wait_for_webhook(worker)
        yield worker
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_for_webhook(worker: Worker) -> None:
    """Wait until the webhook is up, which an unknown source's 404 shows."""
    deadline = time.monotonic() + WORKER_START_TIMEOUT
    while time.monotonic() < deadline:
        if worker.process.poll() is not None:
            break
        try:
            response = httpx.post(f"{worker.url}/alerts/nobody", content=b"{}")
            if response.status_code == 404:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(
        "The worker's webhook did not come up:\n" + worker.log.read_text()[-5000:],
        pytrace=False,
    )


# Building bodies.


def example(name: str) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((EXAMPLES / name).read_text())
    return document


def replaced(document: dict[str, Any], path: str, value: object) -> dict[str, Any]:
    """Return a copy with the member at a dotted path (list indexes allowed) set."""
    copy: dict[str, Any] = json.loads(json.dumps(document))
    target: Any = copy
    keys = path.split(".")
    for key in keys[:-1]:
        target = target[int(key)] if isinstance(target, list) else target[key]
    target[keys[-1]] = value
    return copy


def encoded(document: object) -> bytes:
    return json.dumps(document).encode()


INJECTIONS = [
    "a@example.com\r\nBcc: x@example.com",
    "a@example.com\nBcc: x@example.com",
    "a@example.com\rX-Injected: 1",
    "a@example.com\x00",
    "a@example.com\u2028Bcc: x@example.com",
]
WRONG_TYPES: list[object] = [7, 2.5, False, ["x"], {"x": 1}]


def generic_hostile() -> list[bytes]:
    """Malformed generic alerts, each invalid for a different reason."""
    base = example("generic-full.json")
    bodies: list[bytes] = []
    for value in WRONG_TYPES:
        for path in (
            "email.subject",
            "email.message_id",
            "json_version",
            "classification",
            "severity",
        ):
            bodies.append(encoded(replaced(base, path, value)))

    # A line break in the subject is replaced with U+FFFD, so it is no invalid body.
    for value in INJECTIONS:
        for path in ("email.recipient", "email.sender"):
            bodies.append(encoded(replaced(base, path, value)))

    for key in ("json_version", "classification", "email"):
        bodies.append(encoded({k: v for k, v in base.items() if k != key}))
    bodies.append(encoded(replaced(base, "email.recipient", [])))
    # Values that are no mail addresses, among valid ones, and look-alikes.
    for value in (
        "../users/bob@example.com",
        "bob@example.com/messages",
        "?x=1",
        "#frag",
        "%2f",
        "bob@example.com.",
        "b\u043eb@example.com",
        "\uff42\uff4f\uff42@example.com",
    ):
        recipients = ["alice@example.com", value]
        bodies.append(encoded(replaced(base, "email.recipient", recipients)))
    huge_id = "<" + "a" * 100_000 + "@example.com>"
    bodies.append(encoded(replaced(base, "email.message_id", huge_id)))
    bodies.append(encoded(replaced(base, "email.delivery_time", "2024-03-10T01:30")))
    bodies.append(encoded(replaced(base, "custom_fields.nested", {"a": 1})))
    bodies.append(encoded(base).replace(b"97", b"NaN"))
    bodies.append(encoded(base).replace(b"97", b"1e400"))
    bodies.append(encoded(base).replace(b"SOC-2291", b"\\ud800"))
    bodies.append(encoded(base).replace(b"SOC-2291", b"\xff\xfe"))
    # The last of two duplicate keys wins in the decoder, and it is invalid here.
    bodies.append(encoded(base)[:-1] + b', "email": "alice@example.com"}')
    nested: object = "x"
    for _ in range(300):
        nested = {"a": nested}
    bodies.append(encoded({**base, "target": nested}))
    return bodies


def fireeye_hostile() -> list[bytes]:
    """Malformed FireEye JSON alerts."""
    base = example("fireeye-notification.json")
    bodies: list[bytes] = []
    for value in WRONG_TYPES:
        for path in ("alert.occurred", "alert.uuid", "alert.smtp-message.subject"):
            bodies.append(encoded(replaced(base, path, value)))
    for value in INJECTIONS:
        bodies.append(encoded(replaced(base, "alert.dst.smtp-to", value)))
        bodies.append(encoded(replaced(base, "alert.smtp-message.id", f"<{value}.x>")))
    bodies.append(encoded(replaced(base, "alert.dst", {})))
    bodies.append(encoded(replaced(base, "alert.occurred", "2024-03-10 01:30:00")))
    bodies.append(encoded({"alert": [None]}))
    # Only the invalid alert of each listing is kept, because the valid alerts of a
    # listing are processed even when another alert in it is invalid.
    wsapi = example("fireeye-wsapi.json")
    bad_uuid = replaced(wsapi, "alert.0.uuid", 4.5)
    bad_uuid["alert"] = bad_uuid["alert"][:1]
    bodies.append(encoded(bad_uuid))
    bad_recipients = replaced(wsapi, "alert.1.dst.smtpTo", [1, 2])
    bad_recipients["alert"] = bad_recipients["alert"][1:]
    bodies.append(encoded(bad_recipients))
    return bodies


def lol_entities() -> bytes:
    declarations = [b'<!ENTITY a0 "aaaaaaaaaa">']
    for level in range(1, 10):
        reference = b"&a%d;" % (level - 1)
        declarations.append(b'<!ENTITY a%d "%s">' % (level, reference * 10))
    return b"".join(declarations)


XML_ALERT = (
    b"<alerts><alert uuid='u'><dst><smtp-to>alice@example.com</smtp-to></dst>"
    b"<action>notified</action></alert></alerts>"
)


def xml_hostile() -> list[bytes]:
    """XML bombs, external entities and broken XML."""
    return [
        b'<?xml version="1.0"?><!DOCTYPE alerts [' + lol_entities() + b"]>"
        b"<alerts><alert uuid='&a9;'/></alerts>",
        b'<!DOCTYPE alerts [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
        b"<alerts><alert uuid='u'><smtp-message><subject>&x;</subject>"
        b"</smtp-message></alert></alerts>",
        b'<!DOCTYPE alerts SYSTEM "http://127.0.0.1:9/a.dtd">' + XML_ALERT,
        b'<!DOCTYPE alerts [<!ENTITY % p SYSTEM "http://127.0.0.1:9/p.dtd"> %p;]>'
        b"<alerts/>",
        b"<alerts>" + b"<a>" * 20_000 + b"</a>" * 20_000 + b"</alerts>",
        XML_ALERT[:-12],
        XML_ALERT.replace(b"alice@", b"al\xffice@"),
        XML_ALERT.replace(b"alice@example.com", b"alice@example.com&#13;&#10;X: y"),
        b"<report><alert/></report>",
    ]


def shape_hostile() -> list[bytes]:
    """Bodies of the wrong shape, for format detection."""
    return [
        b"null",
        b"[]",
        b"42",
        b'"alert"',
        b'{"foo": 1}',
        b"[" * 100_000,
        b'{"a":' * 50_000,
        b"\xef\xbb\xbf{}",
        bytes(range(256)),
        b'{"alert": ' + b"9" * 5000 + b"}",
        b'{"GUID": "g", "messageTime": "2026-12-01T09:30:00Z", "recipient": 5}',
    ]


def good_alerts() -> dict[str, bytes]:
    """Alerts that must be pulled, one per (mailbox, message) of EXPECTED_OUTCOMES."""
    generic = example("generic-full.json")
    wsapi = example("fireeye-wsapi.json")
    frank = replaced(wsapi, "alert.0.dst.smtpTo", ["frank@example.com"])
    frank = replaced(frank, "alert.0.smtpMessage.id", f"<{M4}>")
    frank["alert"] = frank["alert"][:1]
    return {
        "generic-alice-bob": encoded(
            replaced(
                generic, "email.recipient", ["alice@example.com", "bob@example.com"]
            )
        ),
        "fireeye-dave": (EXAMPLES / "fireeye-notification.json").read_bytes(),
        "generic-carol": encoded(
            replaced(generic, "email.recipient", "carol@example.com")
        ),
        "fireeye-frank": encoded(frank),
    }


def assert_all_invalid(bodies: list[bytes], format_name: str | None) -> None:
    """Fail early, naming the body, when the corpus contains a usable alert."""
    received_at = datetime.now(UTC)
    for body in bodies:
        with pytest.raises(InvalidAlertError):
            parse_alert(body, received_at=received_at, format_name=format_name)


# Sending.


class Client:
    """Posts bodies to the worker's webhook and keeps what was accepted."""

    def __init__(self, worker: Worker) -> None:
        self.http = httpx.Client(base_url=worker.url, timeout=30)
        self.accepted: list[bytes] = []
        self.replies: list[tuple[int, dict[str, Any]]] = []

    def post(
        self,
        source: str,
        body: bytes | Iterator[bytes],
        headers: dict[str, str],
    ) -> int:
        response = self.http.post(f"/alerts/{source}", content=body, headers=headers)
        reply = response.json()
        self.replies.append((response.status_code, reply))
        if response.status_code == 202:
            assert isinstance(body, bytes)
            assert reply["id"] == hashlib.sha256(body).hexdigest()
            self.accepted.append(body)
        return response.status_code


def token(value: str, content_type: str = "application/json") -> dict[str, str]:
    return {"Authorization": f"Bearer {value}", "Content-Type": content_type}


def signature(body: bytes, content_type: str = "application/json") -> dict[str, str]:
    digest = hmac.new(FIREEYE_SECRET.encode(), body, hashlib.sha256).hexdigest()
    return {"X-Autopull-Signature": f"sha256={digest}", "Content-Type": content_type}


def ingest(settings: Settings, bodies: list[bytes]) -> None:
    sender = RawSender(settings)
    for index, body in enumerate(bodies):
        sender.send(raw_alert(Input(f"hostile-{index}", body), None, "test"))
    sender.flush()


def read_topic(
    settings: Settings,
    topic: str,
    done: Callable[[list[bytes]], bool],
    timeout: float = 60.0,
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
    deadline = time.monotonic() + timeout
    try:
        while not done(values) and time.monotonic() < deadline:
            for message in consumer.consume(num_messages=500, timeout=0.5):
                if message.error() is None and message.value() is not None:
                    values.append(message.value())
    finally:
        consumer.close()
    return values


def test_hostile_input_refused_or_dead_lettered(
    webhook_worker: Worker, tmp_path: Path
) -> None:
    settings = webhook_worker.settings
    limit = settings.ingest_max_bytes
    generic, fireeye, xml = generic_hostile(), fireeye_hostile(), xml_hostile()
    shapes = shape_hostile()
    assert_all_invalid(generic, "generic")
    assert_all_invalid(fireeye, "fireeye")
    assert_all_invalid(generic + fireeye + xml + shapes, None)
    assert len(generic + fireeye + xml + shapes) >= 100
    good = good_alerts()
    client = Client(webhook_worker)
    ingested: list[bytes] = []

    # Step 1: a good alert, then the generic bodies by webhook and by ingest.
    ingest(settings, [good["generic-alice-bob"]])
    for body in generic:
        assert client.post("generic", body, token(GENERIC_TOKEN)) == 202
    ingest(settings, generic)
    ingested += generic

    # Step 2: a signed good alert, then FireEye JSON and XML, signed.
    dave = good["fireeye-dave"]
    assert client.post("fireeye", dave, signature(dave)) == 202
    for body in fireeye:
        assert client.post("fireeye", body, signature(body)) == 202
    for body in xml:
        headers = signature(body, "application/xml")
        assert client.post("fireeye", body, headers) == 202
    ingest(settings, fireeye + xml)
    ingested += fireeye + xml

    # Step 3: a good alert whose format is detected, then bodies of no format.
    assert client.post("detector", good["generic-carol"], token(DETECTOR_TOKEN)) == 202
    for body in shapes:
        assert client.post("detector", body, token(DETECTOR_TOKEN)) == 202
    ingest(settings, shapes)
    ingested += shapes

    # Step 4: requests refused at the door, none of which reaches Kafka.
    huge = b'{"json_version": "2.0", "summary": "' + b"x" * (10 * 1024 * 1024) + b'"}'
    small = generic[0]
    refused = [
        client.post("generic", huge, token(GENERIC_TOKEN)),
        client.post("generic", iter([huge[:65536]] * 40), token(GENERIC_TOKEN)),
        client.post("generic", small, token(GENERIC_TOKEN, "text/plain")),
        client.post("generic", small, token(GENERIC_TOKEN, "multipart/form-data")),
        client.post("generic", small, token("wrong")),
        client.post("generic", small, {"Content-Type": "application/json"}),
        client.post("generic", small, {"Authorization": f"Basic {GENERIC_TOKEN}"}),
        client.post("fireeye", small, signature(small + b" ")),
        client.post("fireeye", small, token(GENERIC_TOKEN)),
        client.post("unknown-source", small, token(GENERIC_TOKEN)),
        client.post("generic", b"", token(GENERIC_TOKEN)),
    ]
    assert refused == [413, 413, 415, 415, 401, 401, 401, 401, 401, 404, 400]
    huge_file = tmp_path / "huge.json"
    huge_file.write_bytes(huge)
    with pytest.raises(IngestError, match=f"above the ingest limit of {limit:,} bytes"):
        read_input(str(huge_file), limit)

    # Step 5: the last good alert.
    ingest(settings, [good["fireeye-frank"]])

    for status, reply in client.replies:
        if status != 202:
            assert set(reply) == {"error"}
            assert reply["error"]["code"]
            assert reply["error"]["message"]

    hostile_accepted = [b for b in client.accepted if b not in good.values()]
    expected = Counter(hostile_accepted + ingested)
    codec = AvroCodec("DeadLetter")
    values = read_topic(settings, "alerts.dead", lambda v: len(v) >= expected.total())
    letters = [codec.loads(value) for value in values]
    assert Counter(bytes(letter["body"]) for letter in letters) == expected
    assert {letter["stage"] for letter in letters} == {"normalize"}
    assert all(letter["reason"] for letter in letters)

    outcome_codec = AvroCodec("PullOutcome")

    def all_outcomes(values: list[bytes]) -> bool:
        seen = {
            (o["mailbox"], o["message_id"]) for o in map(outcome_codec.loads, values)
        }
        return seen >= EXPECTED_OUTCOMES

    outcomes = read_topic(settings, "pull.outcomes", all_outcomes)
    seen = {(o["mailbox"], o["message_id"]) for o in map(outcome_codec.loads, outcomes)}
    assert seen == EXPECTED_OUTCOMES
    assert webhook_worker.process.poll() is None
