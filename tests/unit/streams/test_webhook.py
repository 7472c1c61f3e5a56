from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from pydantic import SecretStr, ValidationError

from autopull.streams.records import Record
from autopull.streams.webhook import (
    ROUTE,
    AlertReceiver,
    Rejection,
    WebhookSettings,
    register_webhook,
)

REPO = Path(__file__).resolve().parents[3]
EXAMPLES = REPO / "examples" / "alerts"
TOKEN = "token-4f1c9a7e2b"
SECRET = "hmac-secret-8d2e6b0c"
LIMIT = 4096
GENERIC = json.dumps(
    {
        "json_version": "2.0",
        "classification": "phish",
        "email": {"message_id": "a@example.net", "recipient": "alice@example.com"},
    }
).encode()
JSON = {"Content-Type": "application/json"}


def settings(**changes: Any) -> WebhookSettings:
    values: dict[str, Any] = {
        "tokens": {"detector": SecretStr(TOKEN), "both": SecretStr(TOKEN)},
        "hmac_secrets": {"signed": SecretStr(SECRET), "both": SecretStr(SECRET)},
    }
    values.update(changes)
    return WebhookSettings(**values)


def bearer(token: str = TOKEN) -> dict[str, str]:
    return {**JSON, "Authorization": f"Bearer {token}"}


def signed(body: bytes, secret: str = SECRET) -> dict[str, str]:
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return {**JSON, "X-Autopull-Signature": f"sha256={digest}"}


class Recorder:
    """A stand-in for Kafka that records sends, optionally waiting or failing."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Record]] = []
        self.gate: asyncio.Event | None = None
        self.error: Exception | None = None

    async def __call__(self, key: bytes, record: Record) -> None:
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        self.sent.append((key, record))


@asynccontextmanager
async def serve(
    webhook: WebhookSettings | None = None, max_bytes: int = LIMIT
) -> AsyncIterator[tuple[TestClient[Any, Any], Recorder]]:
    """Serve an AlertReceiver on a loopback port with a recording send."""
    recorder = Recorder()
    receiver = AlertReceiver(webhook or settings(), max_bytes, recorder)

    async def handle(request: web.Request) -> web.Response:
        return await receiver.receive(request, request.match_info["source"])

    app = web.Application()
    app.router.add_post(ROUTE, handle)
    async with TestClient(TestServer(app)) as client:
        yield client, recorder


async def error_of(response: Any) -> dict[str, str]:
    body = await response.json()
    error: dict[str, str] = body["error"]
    return error


# Accepted alerts.


async def test_webhook_token_accepted_202_with_id() -> None:
    async with serve() as (client, recorder):
        response = await client.post("/alerts/detector", data=GENERIC, headers=bearer())

        assert response.status == 202
        assert await response.json() == {
            "accepted": True,
            "id": hashlib.sha256(GENERIC).hexdigest(),
        }
        assert len(recorder.sent) == 1


async def test_webhook_sends_raw_alert_unchanged() -> None:
    async with serve() as (client, recorder):
        await client.post("/alerts/detector", data=GENERIC, headers=bearer())

    key, record = recorder.sent[0]
    digest = hashlib.sha256(GENERIC).hexdigest()
    assert record["body"] == GENERIC
    assert record["source"] == "generic"
    assert record["source_alert_id"] == digest
    assert record["content_type"] == "application/json"
    assert record["received_at"].tzinfo is not None
    assert record["transport"]["transport"] == "webhook"
    assert record["transport"]["name"] == "detector"
    assert record["transport"]["authentication"] == "token"
    assert record["transport"]["remote"] == "127.0.0.1"
    assert key == f"generic:{digest}".encode()


async def test_webhook_signature_accepted() -> None:
    async with serve() as (client, recorder):
        response = await client.post(
            "/alerts/signed", data=GENERIC, headers=signed(GENERIC)
        )

        assert response.status == 202
        assert recorder.sent[0][1]["transport"]["authentication"] == "signature"


async def test_webhook_uppercase_signature_accepted() -> None:
    headers = signed(GENERIC)
    headers["X-Autopull-Signature"] = (
        "sha256=" + headers["X-Autopull-Signature"].removeprefix("sha256=").upper()
    )

    async with serve() as (client, _):
        response = await client.post("/alerts/signed", data=GENERIC, headers=headers)

        assert response.status == 202


@pytest.mark.parametrize("headers", [bearer(), signed(GENERIC)], ids=["token", "hmac"])
async def test_webhook_source_with_both_accepts_either(headers: dict[str, str]) -> None:
    async with serve() as (client, _):
        response = await client.post("/alerts/both", data=GENERIC, headers=headers)

        assert response.status == 202


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json; charset=utf-8",
        "Application/JSON",
        "application/xml",
        "text/xml",
    ],
)
async def test_webhook_accepted_media_types(content_type: str) -> None:
    headers = bearer() | {"Content-Type": content_type}

    async with serve() as (client, recorder):
        response = await client.post("/alerts/detector", data=GENERIC, headers=headers)

        assert response.status == 202
        assert recorder.sent[0][1]["content_type"] == content_type.split(";")[0].lower()


async def test_webhook_body_at_limit_accepted() -> None:
    body = b" " * (LIMIT - len(GENERIC)) + GENERIC

    async with serve() as (client, recorder):
        response = await client.post("/alerts/detector", data=body, headers=bearer())

        assert response.status == 202
        assert recorder.sent[0][1]["body"] == body


async def test_webhook_reply_waits_for_acknowledgement() -> None:
    async with serve() as (client, recorder):
        recorder.gate = asyncio.Event()
        request = asyncio.create_task(
            client.post("/alerts/detector", data=GENERIC, headers=bearer())
        )
        await asyncio.sleep(0.2)

        assert not request.done()
        recorder.gate.set()
        response = await request
        assert response.status == 202


# Naming the alert format.


@pytest.mark.parametrize(
    ("file", "content_type", "expected"),
    [
        ("tap-delivered-phish.json", "application/json", "tap"),
        ("fireeye-notification.json", "application/json", "fireeye"),
        ("fireeye-wsapi.json", "application/json", "fireeye"),
        ("generic-full.json", "application/json", "generic"),
        ("fireeye-xml.xml", "application/xml", "fireeye"),
    ],
)
async def test_webhook_detects_format(
    file: str, content_type: str, expected: str
) -> None:
    body = (EXAMPLES / file).read_bytes()
    headers = bearer() | {"Content-Type": content_type}

    async with serve(max_bytes=1 << 20) as (client, recorder):
        await client.post("/alerts/detector", data=body, headers=headers)

    assert recorder.sent[0][1]["source"] == expected


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"not json", "application/json"),
        (b'{"foo": 1}', "application/json"),
        (b"<report/>", "application/xml"),
    ],
)
async def test_webhook_undetected_body_named_by_source(
    body: bytes, content_type: str
) -> None:
    headers = bearer() | {"Content-Type": content_type}

    async with serve() as (client, recorder):
        response = await client.post("/alerts/detector", data=body, headers=headers)

        assert response.status == 202
        assert recorder.sent[0][1]["source"] == "detector"
        assert recorder.sent[0][1]["body"] == body


async def test_webhook_configured_format_wins() -> None:
    webhook = settings(formats={"detector": "fireeye"})

    async with serve(webhook) as (client, recorder):
        await client.post("/alerts/detector", data=GENERIC, headers=bearer())

    assert recorder.sent[0][1]["source"] == "fireeye"


async def test_webhook_source_named_as_format_forces_it() -> None:
    webhook = settings(tokens={"tap": SecretStr(TOKEN)})

    async with serve(webhook) as (client, recorder):
        await client.post("/alerts/tap", data=GENERIC, headers=bearer())

    assert recorder.sent[0][1]["source"] == "tap"


# Rejected requests.


async def test_webhook_unknown_source_404() -> None:
    async with serve() as (client, recorder):
        response = await client.post("/alerts/nobody", data=GENERIC, headers=bearer())

        assert response.status == 404
        assert (await error_of(response))["code"] == "unknown_source"
        assert recorder.sent == []


@pytest.mark.parametrize(
    "headers",
    [
        JSON,
        bearer("wrong"),
        bearer(TOKEN + "x"),
        {**JSON, "Authorization": f"Basic {TOKEN}"},
        {**JSON, "Authorization": "Bearer "},
        {**JSON, "Authorization": TOKEN},
        signed(GENERIC),
    ],
    ids=["none", "wrong", "longer", "basic", "empty", "no-scheme", "hmac-unconfigured"],
)
async def test_webhook_token_source_bad_credentials_401(
    headers: dict[str, str],
) -> None:
    async with serve() as (client, recorder):
        response = await client.post("/alerts/detector", data=GENERIC, headers=headers)

        assert response.status == 401
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert (await error_of(response))["code"] == "unauthorized"
        assert recorder.sent == []


@pytest.mark.parametrize(
    "headers",
    [
        JSON,
        bearer(),
        signed(GENERIC, secret="other"),
        signed(GENERIC + b" "),
        {**JSON, "X-Autopull-Signature": signed(GENERIC)["X-Autopull-Signature"][7:]},
        {**JSON, "X-Autopull-Signature": "sha256="},
        {**JSON, "X-Autopull-Signature": "sha256=zz\u00e9"},
    ],
    ids=[
        "none",
        "token-unconfigured",
        "other-secret",
        "other-body",
        "no-prefix",
        "empty",
        "not-hex",
    ],
)
async def test_webhook_signed_source_bad_signature_401(headers: dict[str, str]) -> None:
    async with serve() as (client, recorder):
        response = await client.post("/alerts/signed", data=GENERIC, headers=headers)

        assert response.status == 401
        assert (await error_of(response))["code"] == "unauthorized"
        assert recorder.sent == []


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "multipart/form-data; boundary=x", "application/jsonx"],
)
async def test_webhook_other_media_type_415(content_type: str | None) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    if content_type is not None:
        headers["Content-Type"] = content_type

    async with serve() as (client, recorder):
        response = await client.post(
            "/alerts/detector",
            data=GENERIC,
            headers=headers,
            skip_auto_headers=["Content-Type"],
        )

        assert response.status == 415
        assert (await error_of(response))["code"] == "unsupported_media_type"
        assert recorder.sent == []


async def test_webhook_body_over_limit_413() -> None:
    async with serve() as (client, recorder):
        response = await client.post(
            "/alerts/detector", data=b"x" * (LIMIT + 1), headers=bearer()
        )

        assert response.status == 413
        error = await error_of(response)
        assert error["code"] == "too_large"
        assert str(LIMIT) in error["message"]
        assert recorder.sent == []


async def test_webhook_chunked_body_over_limit_413() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(16):
            yield b"x" * 1024

    async with serve() as (client, recorder):
        response = await client.post(
            "/alerts/detector", data=chunks(), headers=bearer()
        )

        assert response.status == 413
        assert recorder.sent == []


async def test_webhook_declared_length_over_limit_413_without_body() -> None:
    async with serve() as (client, _):
        assert client.port is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
        writer.write(
            b"POST /alerts/detector HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            + f"Authorization: Bearer {TOKEN}\r\n".encode()
            + b"Content-Type: application/json\r\nContent-Length: 10000000\r\n\r\n"
        )
        await writer.drain()

        status_line = await asyncio.wait_for(reader.readline(), timeout=5)

        assert status_line.startswith(b"HTTP/1.1 413")
        writer.close()
        await writer.wait_closed()


async def test_webhook_empty_body_400() -> None:
    async with serve() as (client, recorder):
        response = await client.post("/alerts/detector", data=b"", headers=bearer())

        assert response.status == 400
        assert (await error_of(response))["code"] == "empty_body"
        assert recorder.sent == []


async def test_webhook_send_failure_503() -> None:
    async with serve() as (client, recorder):
        recorder.error = RuntimeError("broker down")
        response = await client.post("/alerts/detector", data=GENERIC, headers=bearer())

        assert response.status == 503
        assert (await error_of(response))["code"] == "unavailable"


async def test_webhook_acknowledgement_timeout_503() -> None:
    async with serve(settings(ack_timeout_seconds=0.1)) as (client, recorder):
        recorder.gate = asyncio.Event()
        response = await client.post("/alerts/detector", data=GENERIC, headers=bearer())

        assert response.status == 503
        assert "0.1 s" in (await error_of(response))["message"]


async def test_webhook_never_logs_credentials(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)

    async with serve() as (client, _):
        await client.post("/alerts/detector", data=GENERIC, headers=bearer())
        await client.post("/alerts/detector", data=GENERIC, headers=bearer(TOKEN + "x"))
        await client.post("/alerts/signed", data=GENERIC, headers=signed(GENERIC))

    assert caplog.records
    assert TOKEN not in caplog.text
    assert SECRET not in caplog.text


async def test_webhook_unknown_source_logged_quoted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)

    async with serve() as (client, _):
        await client.post("/alerts/a%0Ab", data=GENERIC, headers=bearer())

    assert "source='a\\nb'" in caplog.text


# Reading the body.


class EndlessContent:
    """A request body that never ends, counting the bytes read."""

    def __init__(self) -> None:
        self.read_bytes = 0

    async def read(self, size: int) -> bytes:
        self.read_bytes += size
        return b"x" * size


class FakeRequest:
    def __init__(self) -> None:
        self.content = EndlessContent()


async def test_read_body_stops_one_byte_past_limit() -> None:
    receiver = AlertReceiver(settings(), LIMIT, Recorder())
    request = FakeRequest()

    with pytest.raises(Rejection) as caught:
        await receiver._read_body(request)  # type: ignore[arg-type]

    assert caught.value.status == 413
    assert request.content.read_bytes == LIMIT + 1


# Settings.


@pytest.mark.parametrize(
    "changes",
    [
        {"tokens": {"": SecretStr(TOKEN)}},
        {"tokens": {"a/b": SecretStr(TOKEN)}},
        {"tokens": {"x" * 65: SecretStr(TOKEN)}},
        {"tokens": {"detector": SecretStr("")}},
        {"hmac_secrets": {"signed": SecretStr("")}},
        {"formats": {"detector": "syslog"}},
        {"ack_timeout_seconds": 0},
    ],
)
def test_webhook_settings_invalid_rejected(changes: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        settings(**changes)


def test_webhook_settings_sources_union() -> None:
    assert settings().sources() == {"detector", "signed", "both"}


def test_webhook_settings_repr_hides_secrets() -> None:
    assert TOKEN not in repr(settings())
    assert SECRET not in repr(settings())


# Registration on the Faust app.


class FakeTopic:
    """Records sends and returns futures that the test resolves to acknowledge."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.acknowledged: asyncio.Future[str] | None = None

    async def send(self, **kwargs: Any) -> asyncio.Future[str]:
        self.sent.append(kwargs)
        self.acknowledged = asyncio.get_running_loop().create_future()
        return self.acknowledged


@pytest.fixture
def pipe(tmp_path: Path) -> Any:
    from autopull.streams.app import Pipeline
    from autopull.streams.settings import Settings

    return Pipeline(
        Settings(
            topic_prefix="unit.",
            store="memory://",
            data_dir=tmp_path,
            web_enabled=False,
            webhook=settings(),
        )
    )


def test_register_webhook_adds_post_route(pipe: Any) -> None:
    register_webhook(pipe)

    routes = [
        (route.method, route.resource.canonical)
        for route in pipe.app.web.web_app.router.routes()
        if route.resource is not None
    ]
    assert ("POST", "/alerts/{source}") in routes


async def test_register_webhook_send_awaits_acknowledgement(pipe: Any) -> None:
    topic = FakeTopic()
    pipe.topics["alerts.raw"] = topic
    receiver = register_webhook(pipe)
    record = {
        "source": "generic",
        "source_alert_id": "id",
        "received_at": datetime.now(UTC),
        "content_type": "application/json",
        "transport": {},
        "body": GENERIC,
    }

    sending = asyncio.create_task(receiver.send(b"generic:id", record))
    await asyncio.sleep(0.05)

    assert not sending.done()
    assert topic.sent[0]["key"] == b"generic:id"
    assert topic.sent[0]["force"] is True
    assert pipe.codecs["alerts.raw"].loads(topic.sent[0]["value"])["body"] == GENERIC
    assert topic.acknowledged is not None
    topic.acknowledged.set_result("metadata")
    await asyncio.wait_for(sending, timeout=1)
