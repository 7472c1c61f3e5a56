"""Known secret values put in every secret setting never leave the worker."""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from confluent_kafka import Consumer
from confluent_kafka.admin import AdminClient
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from autopull.streams.settings import Settings
from autopull.streams.topics import ensure_topics

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_WORLD = REPO_ROOT / "examples" / "worlds" / "demo.json"
PHISH_ALERT = REPO_ROOT / "examples" / "alerts" / "tap-delivered-phish.json"
SECRETS = {
    "graph": "graph-Secret-7f3a9c1e5b",
    "api_key": "api-Secret-2d8e4b6a0c",
    "webhook_token": "hook-Secret-9b1f3d5e7a",
    "hmac": "hmac-Secret-4c6e8a0b2d",
    "tap_principal": "tapp-Secret-1a3c5e7f9b",
    "tap_secret": "taps-Secret-8e0a2c4b6d",
    "ews": "ews-Secret-5f7b9d1a3c",
    "imap": "imap-Secret-0c2e4a6b8d",
}
GMAIL_KEY = (
    rsa.generate_private_key(public_exponent=65537, key_size=2048)
    .private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    .decode("ascii")
)
# One line of the key's base64 body stands for the whole key.
SECRETS["gmail"] = GMAIL_KEY.splitlines()[1]


@pytest.fixture
def graph_world(tmp_path: Path) -> Path:
    world = json.loads(DEMO_WORLD.read_text())
    world["tenants"][0]["client_secret"] = SECRETS["graph"]
    path = tmp_path / "secret-world.json"
    path.write_text(json.dumps(world))
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def secret_settings(base: Settings) -> Settings:
    key_hash = hashlib.sha256(SECRETS["api_key"].encode()).hexdigest()
    values = base.model_dump(mode="python")
    values["graph"]["client_secret"] = SECRETS["graph"]
    values.update(
        web_enabled=True,
        web_port=free_port(),
        api_keys={"ops": {"sha256": key_hash, "role": "admin"}},
        webhook={
            "tokens": {"tap": SECRETS["webhook_token"]},
            "hmac_secrets": {"generic": SECRETS["hmac"]},
        },
        tap={"principal": SECRETS["tap_principal"], "secret": SECRETS["tap_secret"]},
        ews={
            "service_endpoint": "http://127.0.0.1:9/EWS/Exchange.asmx",
            "username": "svc",
            "password": SECRETS["ews"],
            "quarantine_mailbox": "quarantine@corp.example.com",
        },
        imap={
            "host": "127.0.0.1",
            "port": 9,
            "security": "none",
            "master_user": "admin",
            "master_password": SECRETS["imap"],
            "quarantine_mailbox": "quarantine@mail.example.org",
        },
        gmail={
            "api_url": "http://127.0.0.1:9/",
            "token_uri": "http://127.0.0.1:9/token",
            "service_account_email": "svc@autopull-test.iam.gserviceaccount.com",
            "client_id": "104512345678901234567",
            "private_key": GMAIL_KEY,
            "quarantine_mailbox": "quarantine@gmail.example.org",
        },
        routing={
            "example.com": "graph",
            "corp.example.com": "ews",
            "mail.example.org": "imap",
            "gmail.example.org": "gmail",
        },
    )
    values["graph"]["client_secret"] = SECRETS["graph"]
    return Settings(**values)


def all_topic_bytes(settings: Settings) -> bytes:
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    topics = [
        name
        for name in admin.list_topics(timeout=10).topics
        if name.startswith(settings.topic_prefix) or name.startswith(settings.faust_id)
    ]
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"secret-scan-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
        }
    )
    consumer.subscribe(topics)
    data = bytearray()
    idle = 0
    while idle < 6:
        messages = consumer.consume(num_messages=500, timeout=0.5)
        idle = idle + 1 if not messages else 0
        for message in messages:
            if message.error() is None:
                data += message.key() or b""
                data += message.value() or b""
    consumer.close()
    return bytes(data)


# The webhook answers only once Kafka acknowledged the alert, or after its own
# 30-second wait, so the client waits longer than that.
WEBHOOK_TIMEOUT_SECONDS = 60.0


def test_secrets_never_leave_the_worker(
    pipeline_settings: Settings, graph_sim: Any, start_api_worker: Any, tmp_path: Path
) -> None:
    settings = secret_settings(pipeline_settings)
    ensure_topics(settings)
    start_api_worker(settings)
    base = f"http://127.0.0.1:{settings.web_port}"
    headers = {"Authorization": f"Bearer {SECRETS['api_key']}"}
    seen: list[str] = []

    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/readyz").status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)

    body = PHISH_ALERT.read_bytes()
    good = httpx.post(
        f"{base}/alerts/tap",
        content=body,
        headers={
            "Authorization": f"Bearer {SECRETS['webhook_token']}",
            "Content-Type": "application/json",
        },
        timeout=WEBHOOK_TIMEOUT_SECONDS,
    )
    assert good.status_code == 202
    wrong = httpx.post(
        f"{base}/alerts/generic",
        content=b"{}",
        headers={
            "X-Autopull-Signature": "sha256="
            + hmac.new(b"wrong", b"{}", hashlib.sha256).hexdigest(),
            "Content-Type": "application/json",
        },
    )
    seen += [good.text, wrong.text]

    incidents: list[dict[str, Any]] = []
    while time.monotonic() < deadline + 60 and not incidents:
        listing = httpx.get(f"{base}/api/incidents?state=contained", headers=headers)
        seen.append(listing.text)
        incidents = listing.json()["incidents"]
        time.sleep(0.5)
    assert incidents, "the alert did not reach a contained incident"
    detail = httpx.get(
        f"{base}/api/incidents/{incidents[0]['incident_id']}", headers=headers
    )
    seen += [detail.text, httpx.get(f"{base}/metrics").text]
    seen.append(httpx.get(f"{base}/api/incidents", headers={"Authorization": "x"}).text)

    logs = "".join(path.read_text() for path in tmp_path.glob("api-worker-*.log"))
    topics = all_topic_bytes(settings)
    for name, secret in SECRETS.items():
        assert secret not in logs, f"{name} appears in the worker log"
        assert secret.encode() not in topics, f"{name} appears on a topic"
        for text in seen:
            assert secret not in text, f"{name} appears in an HTTP response"
