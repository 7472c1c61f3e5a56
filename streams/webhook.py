"""The alert ingest webhook: `POST /alerts/{source}` on the worker's web server.

Each configured source authenticates with a bearer token or an HMAC-SHA256
signature of the raw body. An accepted body goes to alerts.raw exactly as it
arrived, and the reply is 202 only after Kafka acknowledged the record with
acks=all, so a client that got 202 can forget the alert. Parsing is left to the
normalize agent, which turns an unusable body into a dead letter with its bytes.

Replies other than 202 carry `{"error": {"code": ..., "message": ...}}`:

| status | code | when |
| --- | --- | --- |
| 400 | empty_body | the body is empty |
| 401 | unauthorized | no valid token or signature for the source |
| 404 | unknown_source | no credentials are configured for the source |
| 413 | too_large | the body is larger than `ingest_max_bytes` |
| 415 | unsupported_media_type | the body is neither JSON nor XML |
| 503 | unavailable | Kafka did not acknowledge the record in time |
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from autopull.connectors.sources import fireeye
from autopull.connectors.sources.common import load_json, shorten
from autopull.connectors.sources.detect import detect_format, format_names
from autopull.connectors.sources.exceptions import InvalidAlertError
from autopull.streams.records import Record, utcnow
from autopull.streams.web_errors import json_error

if TYPE_CHECKING:
    from autopull.streams.app import Pipeline

log = logging.getLogger(__name__)

ROUTE = "/alerts/{source}"
JSON_TYPES = frozenset({"application/json"})
XML_TYPES = frozenset({"application/xml", "text/xml"})
SIGNATURE_PREFIX = "sha256="
READ_CHUNK_BYTES = 64 * 1024
SOURCE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

Authentication = Literal["token", "signature"]
# Sends one encoded RawAlert keyed by `key` and returns once Kafka acknowledged it.
SendRaw = Callable[[bytes, Record], Awaitable[None]]


class WebhookSettings(BaseModel):
    """Credentials of the ingest webhook, one per source.

    A source exists when it has a token, an HMAC secret or both. With both, a
    request authenticated by either is accepted.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    tokens: dict[str, SecretStr] = Field(
        default_factory=dict, description="Bearer token of each source."
    )
    hmac_secrets: dict[str, SecretStr] = Field(
        default_factory=dict,
        description="HMAC-SHA256 signing secret of each source.",
    )
    signature_header: str = Field(
        default="X-Autopull-Signature",
        min_length=1,
        description="Header that carries sha256=<hex HMAC of the raw body>.",
    )
    formats: dict[str, str] = Field(
        default_factory=dict,
        description="Alert format of each source (tap, fireeye, generic). A source "
        "without one uses its own name when that is a format, else detection.",
    )
    ack_timeout_seconds: float = Field(
        default=30.0,
        gt=0,
        description="Maximum wait for Kafka to acknowledge an alert before the "
        "webhook replies 503, in seconds.",
    )

    @field_validator("tokens", "hmac_secrets")
    @classmethod
    def _check_credentials(cls, value: dict[str, SecretStr]) -> dict[str, SecretStr]:
        for source, secret in value.items():
            _check_source_name(source)
            if not secret.get_secret_value():
                raise ValueError(
                    f"The credential of webhook source {source!r} is empty. Set a "
                    "long random value."
                )
        return value

    @field_validator("formats")
    @classmethod
    def _check_formats(cls, value: dict[str, str]) -> dict[str, str]:
        known = format_names()
        for source, name in value.items():
            _check_source_name(source)
            if name not in known:
                raise ValueError(
                    f"The format {name!r} of webhook source {source!r} is unknown. "
                    f"Use one of: {', '.join(known)}."
                )
        return value

    def sources(self) -> frozenset[str]:
        """Return the names of the configured sources."""
        return frozenset(self.tokens) | frozenset(self.hmac_secrets)


def _check_source_name(name: str) -> None:
    if not SOURCE_NAME.match(name):
        raise ValueError(
            f"The webhook source name {name!r} is not valid. Use 1 to 64 letters, "
            "digits, dots, dashes or underscores, starting with a letter or digit."
        )


class Rejection(Exception):
    """A request that the webhook rejects, with the status and code of its reply."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def response(self) -> web.Response:
        """Return the JSON error reply."""
        return json_error(self.status, self.code, self.message)


class AlertReceiver:
    """The request handling of `POST /alerts/{source}`, apart from the web server.

    `send` writes the RawAlert record, so tests can replace Kafka.
    """

    def __init__(self, settings: WebhookSettings, max_bytes: int, send: SendRaw):
        self.settings = settings
        self.max_bytes = max_bytes
        self.send = send

    async def receive(self, request: web.Request, source: str) -> web.Response:
        """Check, read and forward one alert, and return the reply."""
        remote = request.remote or ""
        try:
            alert_id = await self._accept(request, source, remote)
        except Rejection as rejection:
            # The source comes from the URL, so it is logged quoted and cut short.
            log.info(
                "Rejected alert source=%s status=%d code=%s remote=%s",
                shorten(source),
                rejection.status,
                rejection.code,
                remote,
            )
            return rejection.response()
        return web.json_response({"accepted": True, "id": alert_id}, status=202)

    async def _accept(self, request: web.Request, source: str, remote: str) -> str:
        """Run the checks in order, send the alert and return its id.

        Step 1 checks the source and its credentials, and a signature is verified
        once the body is read. Step 2 checks the media type and the declared size.
        Step 3 reads the body, at most one byte past the limit. Step 4 sends it.
        """
        method = self._authenticate(request, source)
        media_type = self._media_type(request)
        declared = request.content_length
        if declared is not None and declared > self.max_bytes:
            raise self._too_large(f"{declared} bytes")

        body = await self._read_body(request)
        if method == "signature":
            self._verify_signature(request, source, body)
        if not body:
            raise Rejection(
                400, "empty_body", "The request has no body. Send one alert."
            )

        record = self._raw_alert(source, body, media_type, remote, method)
        await self._send(record)
        log.info(
            "Accepted alert source=%s format=%s id=%s bytes=%d remote=%s",
            source,
            record["source"],
            record["source_alert_id"],
            len(body),
            remote,
        )
        return str(record["source_alert_id"])

    def _authenticate(self, request: web.Request, source: str) -> Authentication:
        """Check the bearer token, or the presence of a signature to verify later."""
        if source not in self.settings.sources():
            raise Rejection(
                404,
                "unknown_source",
                f"No webhook source is called {shorten(source)}. Configure its token "
                "or HMAC secret, or post to a configured source.",
            )

        token = self.settings.tokens.get(source)
        presented = _bearer_token(request.headers.get("Authorization", ""))
        if token is not None and presented is not None:
            secret = token.get_secret_value().encode("utf-8")
            if hmac.compare_digest(presented.encode("utf-8"), secret):
                return "token"

        header = self.settings.signature_header
        signed = source in self.settings.hmac_secrets
        if signed and header in request.headers:
            return "signature"

        expected = "'Authorization: Bearer <token>'" if token is not None else ""
        if signed:
            signature = f"the {header} header with the body's HMAC-SHA256"
            expected = f"{expected} or {signature}" if expected else signature
        raise Rejection(
            401,
            "unauthorized",
            f"The request for source {source!r} has no valid credentials. Send "
            f"{expected}.",
        )

    def _media_type(self, request: web.Request) -> str:
        raw = request.headers.get("Content-Type", "")
        media_type = raw.partition(";")[0].strip().lower()
        if media_type not in JSON_TYPES | XML_TYPES:
            received_type = media_type or "none"
            raise Rejection(
                415,
                "unsupported_media_type",
                f"The content type {received_type!r} is not accepted. Send "
                "application/json, application/xml or text/xml.",
            )
        return media_type

    async def _read_body(self, request: web.Request) -> bytes:
        """Read the body up to one byte past the limit, whatever Content-Length says."""
        chunks: list[bytes] = []
        size = 0
        while size <= self.max_bytes:
            request_size = min(READ_CHUNK_BYTES, self.max_bytes + 1 - size)
            chunk = await request.content.read(request_size)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            size += len(chunk)
        raise self._too_large(f"more than {self.max_bytes} bytes")

    def _too_large(self, size: str) -> Rejection:
        return Rejection(
            413,
            "too_large",
            f"The body is {size}, larger than the ingest limit of {self.max_bytes} "
            "bytes. "
            "Split the alert or raise AUTOPULL_INGEST_MAX_BYTES.",
        )

    def _verify_signature(self, request: web.Request, source: str, body: bytes) -> None:
        header = self.settings.signature_header
        presented = request.headers.get(header, "").strip()
        secret = self.settings.hmac_secrets[source].get_secret_value().encode("utf-8")
        expected = SIGNATURE_PREFIX + hmac.new(secret, body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(
            presented.lower().encode("utf-8"), expected.encode()
        ):
            raise Rejection(
                401,
                "unauthorized",
                f"The {header} header does not match the body. Sign the raw body "
                f"with HMAC-SHA256 and send {SIGNATURE_PREFIX}<hex digest>.",
            )

    def _raw_alert(
        self,
        source: str,
        body: bytes,
        media_type: str,
        remote: str,
        method: Authentication,
    ) -> Record:
        return {
            "source": self._format_name(source, body, media_type),
            "source_alert_id": hashlib.sha256(body).hexdigest(),
            "received_at": utcnow(),
            "content_type": media_type,
            "transport": {
                "transport": "webhook",
                "name": source,
                "remote": remote,
                "authentication": method,
            },
            "body": body,
        }

    def _format_name(self, source: str, body: bytes, media_type: str) -> str:
        """Return the alert format, or the webhook source name when none is recognized.

        The normalize agent forces a format that the name matches and detects one
        otherwise, so an undetected body still becomes a dead letter there.
        """
        configured = self.settings.formats.get(source)
        if configured:
            return configured
        if source in format_names():
            return source
        if media_type in XML_TYPES:
            return fireeye.SOURCE if fireeye.looks_like_fireeye_xml(body) else source
        try:
            return detect_format(load_json(body)).name
        except InvalidAlertError:
            return source

    async def _send(self, record: Record) -> None:
        key = f"{record['source']}:{record['source_alert_id']}".encode()
        timeout = self.settings.ack_timeout_seconds
        try:
            await asyncio.wait_for(self.send(key, record), timeout)
        except TimeoutError as error:
            log.error(
                "Kafka did not acknowledge alert id=%s within timeout_s=%s",
                record["source_alert_id"],
                timeout,
            )
            raise _unavailable(f"within {timeout} s") from error
        except Exception as error:
            log.exception("Sending alert failed id=%s", record["source_alert_id"])
            raise _unavailable(f"({type(error).__name__})") from error


def _unavailable(detail: str) -> Rejection:
    return Rejection(
        503,
        "unavailable",
        f"Kafka did not acknowledge the alert {detail}. Send it again later, "
        "because a repeated alert is recognized as a replay.",
    )


def _bearer_token(header: str) -> str | None:
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def register_webhook(pipe: Pipeline) -> AlertReceiver:
    """Add `POST /alerts/{source}` to the web server and return its handler."""
    from autopull.streams.web_views import RouteView

    topic = pipe.topics["alerts.raw"]
    codec = pipe.codecs["alerts.raw"]

    async def send(key: bytes, record: Record) -> None:
        # Topic.send returns once the record is queued, with a future that resolves
        # to its RecordMetadata when the broker acknowledged it (the app's acks=-1).
        # The shield keeps a timeout from cancelling that future, whose Faust
        # callback fails on a cancelled one.
        pending = await topic.send(key=key, value=codec.dumps(record), force=True)
        await asyncio.shield(pending)

    receiver = AlertReceiver(
        pipe.settings.webhook, pipe.settings.ingest_max_bytes, send
    )

    @pipe.app.page(ROUTE)
    class AlertsView(RouteView):
        async def post(self, request: web.Request, source: str) -> Any:
            return await receiver.receive(request, source)

    return receiver
