"""The Microsoft 365 adapter: Microsoft Graph through msgraph-sdk (kiota).

Graph cannot move or copy a message across mailboxes, and a MIME upload becomes a
draft. So a quarantine keeps the original in its own mailbox and moves it into a
hidden folder there, because a move keeps every property. Before the move, the
adapter records the original folder and read state in a single-value extended
property on the message itself. One evidence copy of each distinct message goes to
the central quarantine mailbox, in a folder named for the incident. A restore reads
the marker and moves the copy back.

Graph errors, kiota errors and httpx errors are translated in one place,
`map_graph_error`, and no foreign exception leaves this module.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.utils
import itertools
import json
import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
from kiota_abstractions.api_error import APIError
from kiota_abstractions.authentication import (
    AccessTokenProvider,
    AllowedHostsValidator,
    BaseBearerTokenAuthenticationProvider,
)
from kiota_abstractions.base_request_configuration import RequestConfiguration
from kiota_abstractions.method import Method
from kiota_abstractions.request_information import RequestInformation
from msgraph.generated.admin.exchange.tracing.message_traces.message_traces_request_builder import (  # noqa: E501
    MessageTracesRequestBuilder,
)
from msgraph.generated.models.exchange_message_trace import ExchangeMessageTrace
from msgraph.generated.models.mail_folder import MailFolder
from msgraph.generated.models.message import Message
from msgraph.generated.models.o_data_errors.o_data_error import ODataError
from msgraph.generated.models.single_value_legacy_extended_property import (
    SingleValueLegacyExtendedProperty,
)
from msgraph.generated.users.item.mail_folders.item.mail_folder_item_request_builder import (  # noqa: E501
    MailFolderItemRequestBuilder,
)
from msgraph.generated.users.item.mail_folders.mail_folders_request_builder import (
    MailFoldersRequestBuilder,
)
from msgraph.generated.users.item.messages.item.move.move_post_request_body import (
    MovePostRequestBody,
)
from msgraph.generated.users.item.messages.messages_request_builder import (
    MessagesRequestBuilder,
)
from msgraph.graph_request_adapter import GraphRequestAdapter
from msgraph.graph_service_client import GraphServiceClient
from msgraph_core import GraphClientFactory
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from ..errors import (
    ConnectorError,
    NotFoundError,
    PermanentError,
    ThrottledError,
    TransientError,
)
from .base import (
    ForwardingRule,
    MailPlatform,
    MessageCopy,
    MessageSearch,
    QuarantineResult,
    SentMessage,
    TraceEvent,
    required_message_id,
)
from .mime import sent_message_from_mime

logger = logging.getLogger(__name__)

T = TypeVar("T")

PLATFORM = "graph"
# Message trace requests share one slot key, because they name no mailbox.
TRACE_SLOT = "admin/exchange/tracing"
TRACE_WINDOW = timedelta(days=10)
# PS_PUBLIC_STRINGS, the MAPI property set of named string properties.
PUBLIC_STRINGS_GUID = "{00020329-0000-0000-C000-000000000046}"
MARKER_PROPERTY_ID = f"String {PUBLIC_STRINGS_GUID} Name AutopullQuarantine"
INCIDENT_HEADER = "X-Autopull-Incident"
ORIGINAL_MAILBOX_HEADER = "X-Autopull-Original-Mailbox"
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
# Kiota's retry handler already retried 429, 503 and 504 before an error reaches us.
THROTTLING_CODES = frozenset(
    {"ApplicationThrottled", "TooManyRequests", "ErrorServerBusy"}
)
NOT_FOUND_CODES = frozenset(
    {"ErrorItemNotFound", "ResourceNotFound", "ErrorFolderNotFound"}
)
TRANSIENT_STATUSES = frozenset({408, 409, 412, 423, 425})
MESSAGE_FIELDS = ["id", "internetMessageId", "parentFolderId", "isRead", "subject"]


# Graph's published limits that size a burst: a JSON batch contains at most 20
# requests, and one app may send 130,000 requests in any 10 seconds.
MAX_BATCH_REQUESTS = 20
APP_REQUESTS_PER_WINDOW = 130_000
# As many batches as one window of the app limit admits. So every batch of a phase
# is in flight at once for phases of up to 130,000 requests (65,000 mailboxes at
# 2 requests each), and more batches in flight could only be throttled.
DEFAULT_BATCHES_IN_FLIGHT = APP_REQUESTS_PER_WINDOW // MAX_BATCH_REQUESTS
# Connections kept beyond the batches in flight for single requests: the evidence
# copies and the pulls retried alone.
SINGLE_REQUEST_CONNECTIONS = 100


class GraphSettings(BaseModel):
    """Settings of the Microsoft 365 adapter.

    `graph_url` and `authority_url` point at Graph and Entra ID (or a simulator);
    the token is requested for `token_scope` with the client-credentials grant.
    `hidden_folder_name` is the hidden folder each mailbox gets for quarantined
    copies; `quarantine_mailbox` receives one evidence copy per message. Requests
    per mailbox are capped at `max_concurrency_per_mailbox` (Graph allows 4), and
    each HTTP request times out after `request_timeout` seconds. A burst of
    quarantines sends JSON batches, at most `max_batches_in_flight` at once over at
    most `connection_limit` connections, and retries a throttled request of a batch
    alone up to `batch_max_attempts` times.

    NOTE: the adapter does not count the app's requests per 10 seconds. A burst
    sends about 6 requests per mailbox within a few latencies, so one of more than
    about 21,000 mailboxes gets 429 responses, which it retries after their
    Retry-After.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    graph_url: str = "https://graph.microsoft.com/v1.0"
    authority_url: str = "https://login.microsoftonline.com"
    # A scope URL, not a password.
    token_scope: str = "https://graph.microsoft.com/.default"  # noqa: S105
    tenant_id: str
    client_id: str
    client_secret: SecretStr
    quarantine_mailbox: str
    hidden_folder_name: str = "Autopull Quarantine"
    max_concurrency_per_mailbox: int = Field(default=4, ge=1)
    request_timeout: float = Field(default=30.0, gt=0)
    page_size: int = Field(default=50, ge=1, le=1000)
    max_connections: int | None = Field(
        default=None,
        ge=1,
        description="HTTP connections to Graph in all; unset means "
        f"max_batches_in_flight + {SINGLE_REQUEST_CONNECTIONS}, so that single "
        "requests never wait behind a burst's batches. Each connection holds a "
        "file descriptor of the worker.",
    )
    max_batches_in_flight: int = Field(
        default=DEFAULT_BATCHES_IN_FLIGHT,
        ge=1,
        description="JSON batches of a burst in flight at once. The default is as "
        f"many batches of {MAX_BATCH_REQUESTS} as Graph's limit of "
        f"{APP_REQUESTS_PER_WINDOW:,} requests per app in 10 seconds admits, so "
        "a phase of up to that many requests goes out in one round.",
    )
    batch_max_attempts: int = Field(default=5, ge=1)

    @model_validator(mode="after")
    def _room_beside_batches(self) -> GraphSettings:
        if (
            self.max_connections is not None
            and self.max_connections <= self.max_batches_in_flight
        ):
            raise ValueError(
                f"graph.max_connections ({self.max_connections}) must exceed "
                f"graph.max_batches_in_flight ({self.max_batches_in_flight}), or "
                "the evidence copy's requests wait behind a burst's batches; raise "
                "it or leave it unset"
            )
        return self

    @property
    def connection_limit(self) -> int:
        """The HTTP connections the adapter opens at most."""
        if self.max_connections is not None:
            return self.max_connections
        return self.max_batches_in_flight + SINGLE_REQUEST_CONNECTIONS


# --- authentication -------------------------------------------------------------------


class ClientCredentialsTokenProvider(AccessTokenProvider):
    """Fetches app-only tokens with the OAuth2 client-credentials grant, with httpx.

    The token is cached until shortly before it expires. It is sent only to the
    Graph host, and only over https unless that host is a loopback address.
    """

    def __init__(
        self,
        settings: GraphSettings,
        *,
        http_client: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._http = http_client or httpx.AsyncClient(timeout=settings.request_timeout)
        self._clock = clock
        self._token: str | None = None
        self._refresh_at = 0.0
        self._lock = asyncio.Lock()
        graph_host = urlsplit(settings.graph_url).hostname or ""
        self._validator = AllowedHostsValidator([graph_host])
        authority = settings.authority_url.rstrip("/")
        self.token_url = f"{authority}/{settings.tenant_id}/oauth2/v2.0/token"

    def get_allowed_hosts_validator(self) -> AllowedHostsValidator:
        return self._validator

    async def get_authorization_token(
        self,
        uri: str,
        additional_authentication_context: dict[str, Any] | None = None,
    ) -> str:
        """Return a bearer token for `uri`, or "" for a host that must not get one."""
        if not self._validator.is_url_host_valid(uri):
            return ""
        parts = urlsplit(uri)
        if parts.scheme != "https" and parts.hostname not in LOOPBACK_HOSTS:
            raise PermanentError(
                f"Refusing to send a Graph token over {parts.scheme} to "
                f"{parts.hostname}; set graph_url to an https address.",
                platform=PLATFORM,
            )
        async with self._lock:
            if self._token is None or self._clock() >= self._refresh_at:
                await self._fetch()
            assert self._token is not None
            return self._token

    def invalidate(self) -> None:
        """Forget the cached token, so the next request fetches a new one."""
        self._token = None

    async def close(self) -> None:
        await self._http.aclose()

    async def _fetch(self) -> None:
        form = {
            "grant_type": "client_credentials",
            "client_id": self._settings.client_id,
            "client_secret": self._settings.client_secret.get_secret_value(),
            "scope": self._settings.token_scope,
        }
        try:
            response = await self._http.post(self.token_url, data=form)
        except httpx.HTTPError as exc:
            raise TransientError(
                f"The token endpoint {self.token_url} could not be reached "
                f"({type(exc).__name__}); the request will be retried.",
                platform=PLATFORM,
            ) from exc

        if response.status_code != 200:
            raise self._token_error(response)
        try:
            body = response.json()
            token = str(body["access_token"])
            lifetime = float(body.get("expires_in", 3599))
        except (ValueError, KeyError, TypeError) as exc:
            raise TransientError(
                f"The token endpoint {self.token_url} returned 200 without a usable "
                "access_token; the request will be retried.",
                platform=PLATFORM,
            ) from exc
        # Refresh five minutes early, or after half the lifetime of a short token.
        self._refresh_at = self._clock() + lifetime - min(300.0, lifetime / 2)
        self._token = token
        logger.info(
            "Fetched a Graph token tenant=%s client_id=%s expires_in=%s",
            self._settings.tenant_id,
            self._settings.client_id,
            int(lifetime),
        )

    def _token_error(self, response: httpx.Response) -> ConnectorError:
        try:
            body = response.json()
            error = str(body.get("error", "unknown_error"))
            description = str(body.get("error_description", "")).splitlines()[0]
        except (ValueError, AttributeError, IndexError):
            error, description = "unknown_error", ""
        detail = f"{response.status_code} {error}: {description}".rstrip(": ")
        if response.status_code == 429 or response.status_code >= 500:
            return TransientError(
                f"The token endpoint {self.token_url} failed ({detail}); the request "
                "will be retried.",
                retry_after=parse_retry_after(response.headers.get("Retry-After")),
                platform=PLATFORM,
            )
        return PermanentError(
            f"Entra ID rejected the client credentials of client id "
            f"{self._settings.client_id} in tenant {self._settings.tenant_id} "
            f"({detail}). Check tenant_id, client_id and client_secret.",
            platform=PLATFORM,
        )


# --- error mapping --------------------------------------------------------------------


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Read a Retry-After header: seconds, or an HTTP date; None when absent or bad."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    try:
        moment = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    reference = now or datetime.now(UTC)
    return max(0.0, (moment - reference).total_seconds())


def map_graph_error(
    exc: BaseException,
    *,
    mailbox: str | None = None,
    message_id: str | None = None,
) -> ConnectorError:
    """Translate any error from msgraph-sdk, kiota or httpx into a connector error.

    Graph errors are classified by HTTP status and OData code: throttling (429,
    ApplicationThrottled) and 503/504 are transient with the server's Retry-After,
    401 and 403 are permanent, 404 and ErrorItemNotFound are not found, other 5xx
    are transient, other 4xx permanent. Transport errors and timeouts are transient.
    """
    context: dict[str, Any] = {
        "mailbox": mailbox,
        "message_id": message_id,
        "platform": PLATFORM,
    }
    where = f"mailbox {mailbox}" if mailbox else "Graph"
    if isinstance(exc, ConnectorError):
        return exc
    if isinstance(exc, APIError):
        return _map_api_error(exc, where, context)
    if isinstance(exc, httpx.TimeoutException | TimeoutError):
        return TransientError(
            f"A Graph request for {where} timed out ({type(exc).__name__}); it will "
            "be retried.",
            **context,
        )
    if isinstance(exc, httpx.UnsupportedProtocol | httpx.LocalProtocolError):
        return PermanentError(
            f"A Graph request for {where} could not be sent ({type(exc).__name__}: "
            f"{exc}); check graph_url.",
            **context,
        )
    if isinstance(exc, httpx.HTTPError):
        return TransientError(
            f"A Graph request for {where} failed in transport ({type(exc).__name__}: "
            f"{exc}); it will be retried.",
            **context,
        )
    return PermanentError(
        f"A Graph request for {where} failed unexpectedly ({type(exc).__name__}: "
        f"{exc}); report this as a bug if it repeats.",
        **context,
    )


def _map_api_error(
    exc: APIError, where: str, context: dict[str, Any]
) -> ConnectorError:
    status = exc.response_status_code
    code, text = _odata_code(exc)
    headers = exc.response_headers or {}
    retry_after = parse_retry_after(_header(headers, "Retry-After"))
    detail = f"{status} {code}: {text}" if code else f"{status}: {text}"

    if status == 429 or code in THROTTLING_CODES:
        return ThrottledError(
            f"Graph throttled requests for {where} ({detail}); retry after "
            f"{retry_after if retry_after is not None else 'a back-off'} s.",
            retry_after=retry_after,
            **context,
        )
    if status in (503, 504):
        error_class = ThrottledError if retry_after is not None else TransientError
        return error_class(
            f"Graph was unavailable for {where} ({detail}); it will be retried.",
            retry_after=retry_after,
            **context,
        )
    if status in (401, 403):
        return PermanentError(
            f"Graph denied access to {where} ({detail}); check the app's "
            "credentials and its Mail.ReadWrite application permission.",
            **context,
        )
    if code == "MailboxNotEnabledForRESTAPI":
        return PermanentError(
            f"Graph cannot reach {where} ({detail}); the mailbox is inactive or "
            "hosted on-premises, so route it to the Exchange (EWS) platform.",
            **context,
        )
    if code == "ErrorInvalidUser":
        # No such user in the tenant: a routing or address problem, not a message
        # that is simply gone, so the pull fails and the incident stays open.
        return PermanentError(
            f"Graph found no user for {where} in this tenant ({detail}); check the "
            "address, the routing table, or whether it is a list to expand.",
            mailbox_missing=True,
            **context,
        )
    if status == 404 or code in NOT_FOUND_CODES:
        return NotFoundError(f"Graph found nothing for {where} ({detail}).", **context)
    if status is None or status >= 500 or status in TRANSIENT_STATUSES:
        return TransientError(
            f"Graph failed a request for {where} ({detail}); it will be retried.",
            retry_after=retry_after,
            **context,
        )
    return PermanentError(
        f"Graph rejected a request for {where} ({detail}); the request needs fixing, "
        "so it is not retried.",
        **context,
    )


def _odata_code(exc: APIError) -> tuple[str | None, str]:
    if isinstance(exc, ODataError) and exc.error is not None:
        return exc.error.code, exc.error.message or ""
    return None, exc.message or type(exc).__name__


def _header(headers: Any, name: str) -> str | None:
    # kiota hands over httpx.Headers (case-insensitive) or a plain dict.
    value = headers.get(name)
    if value is None and isinstance(headers, dict):
        for key, candidate in headers.items():
            if key.lower() == name.lower():
                return str(candidate)
    return None if value is None else str(value)


# --- the adapter ----------------------------------------------------------------------


class _ExpectedGraphError(PermanentError):
    """An OData error code the calling step handles itself, such as a name clash."""

    def __init__(self, code: str, mailbox: str) -> None:
        super().__init__(
            f"Graph returned {code} for mailbox {mailbox}.",
            mailbox=mailbox,
            platform=PLATFORM,
        )
        self.code = code


@dataclass(frozen=True)
class QuarantineMarker:
    """The original folder and read state of a copy, stored on the message itself."""

    incident: str
    folder_id: str
    folder_name: str
    read: bool

    def to_json(self) -> str:
        return json.dumps(
            {
                "incident": self.incident,
                "folder_id": self.folder_id,
                "folder_name": self.folder_name,
                "read": self.read,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str | None) -> QuarantineMarker | None:
        """Parse a marker; None for an empty (cleared) or unreadable value."""
        if not text:
            return None
        try:
            data = json.loads(text)
            return cls(
                str(data["incident"]),
                str(data["folder_id"]),
                str(data["folder_name"]),
                bool(data["read"]),
            )
        except (ValueError, KeyError, TypeError):
            return None


@dataclass(frozen=True)
class _Copy:
    item_id: str
    folder_id: str
    folder_name: str
    read: bool
    subject: str | None
    received_at: datetime | None
    marker: QuarantineMarker | None

    def public(self, mailbox: str, message_id: str) -> MessageCopy:
        return MessageCopy(
            mailbox=mailbox,
            message_id=message_id,
            item_id=self.item_id,
            folder=self.folder_name,
            read=self.read,
            subject=self.subject,
            received_at=self.received_at,
        )

    def original(self, mailbox: str, message_id: str) -> MessageCopy:
        """Describe the copy as it was before quarantine, from its marker."""
        if self.marker is None:
            return self.public(mailbox, message_id)
        return MessageCopy(
            mailbox=mailbox,
            message_id=message_id,
            item_id=self.item_id,
            folder=self.marker.folder_name,
            read=self.marker.read,
            subject=self.subject,
            received_at=self.received_at,
        )


@dataclass(frozen=True)
class EvidenceSource:
    """The mailbox and the copy that an evidence copy is made from.

    `repeated` is true when a copy of the pull already carried the incident's
    marker. An earlier run of the pull then got past its marking step, maybe on a
    worker that died afterwards, and may have written an evidence copy after this
    adapter last checked the quarantine mailbox.
    """

    mailbox: str
    copy: _Copy
    repeated: bool = False


@dataclass(frozen=True)
class _Located:
    visible: list[_Copy]
    quarantined: list[_Copy]


@dataclass(frozen=True)
class _FolderInfo:
    folder_id: str
    name: str
    hidden: bool


class _ObservedTransport(httpx.AsyncHTTPTransport):
    """The HTTP transport under msgraph's middleware, which sees every response.

    Kiota's retry handler retries 429, 503 and 504 inside the client, so only the
    transport below it sees each throttled attempt.
    """

    def __init__(
        self, observe: Callable[[httpx.Response], None], **options: Any
    ) -> None:
        super().__init__(**options)
        self._observe = observe

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await super().handle_async_request(request)
        self._observe(response)
        return response


class GraphPlatform(MailPlatform):
    """Find, quarantine and restore messages in Microsoft 365 mailboxes."""

    name = PLATFORM

    def __init__(self, settings: GraphSettings) -> None:
        self.settings = settings
        self._tokens = ClientCredentialsTokenProvider(settings)
        # NOTE: msgraph-core 1.5.2 wraps the client's transport in an
        # AsyncGraphTransport that has no aclose, so closing the client leaves the
        # connection pool open. The adapter keeps the transport and closes it itself.
        limits = httpx.Limits(
            max_connections=settings.connection_limit,
            max_keepalive_connections=settings.connection_limit,
        )
        self._transport = _ObservedTransport(self._observe, limits=limits)
        client = httpx.AsyncClient(
            transport=self._transport, timeout=settings.request_timeout
        )
        http = GraphClientFactory.create_with_default_middleware(client=client)
        self._adapter = GraphRequestAdapter(
            BaseBearerTokenAuthenticationProvider(self._tokens), client=http
        )
        self._adapter.base_url = settings.graph_url.rstrip("/")
        self._graph = GraphServiceClient(request_adapter=self._adapter)
        self._http = http
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._evidence_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )
        self._hidden_folders: dict[str, str] = {}
        self._incident_folders: dict[str, str] = {}
        # The number of the last check that verified the evidence copy of each
        # (incident id, bare Message-ID). Later quarantines of the same message
        # skip the quarantine mailbox, because it has the request limits of any
        # other mailbox. Repeated pulls are the exception (see `_ensure_evidence`).
        self._evidence_checked: dict[tuple[str, str], int] = {}
        self._evidence_checks = itertools.count(1)
        self._incident_lookups: dict[str, asyncio.Future[str]] = {}

    def _observe(self, response: httpx.Response) -> None:
        # Graph throttles with 429, and with 503 and Retry-After when the service
        # itself is busy.
        status = response.status_code
        if status == 429 or (status == 503 and "Retry-After" in response.headers):
            self.report_throttled()

    async def close(self) -> None:
        await self._http.aclose()
        await self._transport.aclose()
        await self._tokens.close()

    # --- the MailPlatform interface ---------------------------------------------------

    async def find(self, mailbox: str, message_id: str) -> list[MessageCopy]:
        """Find the copies the user can see, in every folder and on every page.

        Copies already in the hidden quarantine folder are left out; see
        `find_quarantined`.
        """
        bare = required_message_id(message_id, PLATFORM)
        located = await self._locate(mailbox, bare)
        return [copy.public(mailbox, bare) for copy in located.visible]

    async def find_quarantined(
        self, mailbox: str, message_id: str
    ) -> list[MessageCopy]:
        """Find the copies that sit in the mailbox's hidden quarantine folder."""
        bare = required_message_id(message_id, PLATFORM)
        located = await self._locate(mailbox, bare)
        return [copy.public(mailbox, bare) for copy in located.quarantined]

    async def search(self, mailbox: str, search: MessageSearch) -> list[MessageCopy]:
        """Find the copies that arrived in the window and match sender and subject.

        The $filter names only receivedDateTime. Graph compares strings without
        regard to case, so the sender and the exact subject are compared here, on
        every page of the window.
        """
        builder = self._graph.users.by_user_id(mailbox).messages
        query = MessagesRequestBuilder.MessagesRequestBuilderGetQueryParameters(
            filter=received_window_filter(search),
            select=[*MESSAGE_FIELDS, "receivedDateTime", "from", "sender"],
            top=self.settings.page_size,
        )
        config = RequestConfiguration(query_parameters=query)
        page = await self._call(mailbox, None, lambda: builder.get(config))
        matches: list[Message] = []
        while page is not None:
            matches.extend(
                message
                for message in page.value or []
                if _matching_address(message, search) is not None
            )
            if not page.odata_next_link:
                break
            page = await self._call(
                mailbox, None, partial(_next_page, builder, page.odata_next_link)
            )

        folders: dict[str, _FolderInfo] = {}
        copies = []
        for message in matches:
            folder_id = message.parent_folder_id or ""
            if folder_id not in folders:
                folders[folder_id] = await self._folder_info(mailbox, "", folder_id)
            copies.append(
                MessageCopy(
                    mailbox=mailbox,
                    message_id=_bare(message.internet_message_id),
                    item_id=message.id or "",
                    folder=folders[folder_id].name,
                    read=bool(message.is_read),
                    subject=message.subject,
                    received_at=message.received_date_time,
                    sender=_matching_address(message, search),
                )
            )
        return copies

    async def quarantine(
        self, mailbox: str, message_id: str, incident_id: str
    ) -> QuarantineResult:
        """Quarantine every visible copy of a message in one mailbox.

        Step 1 finds the copies. Step 2 marks each with its incident, folder and
        read state. Step 3 makes sure the quarantine mailbox has one verified
        evidence copy for the incident. Step 4 moves each copy into the mailbox's
        hidden folder, and step 5 verifies that no visible copy is left. A crash
        between steps leaves the message findable and the marker in place, so
        running the quarantine again finishes the work.
        """
        bare = required_message_id(message_id, PLATFORM)
        _check_header_value(incident_id, "incident id")

        # Step 1: find every copy.
        located = await self._locate(mailbox, bare)
        if not located.visible and not located.quarantined:
            raise NotFoundError(
                f"Mailbox {mailbox} has no copy of <{bare}>, in or out of quarantine.",
                mailbox=mailbox,
                message_id=bare,
                platform=PLATFORM,
            )
        if not located.visible:
            logger.info(
                "Already quarantined mailbox=%s message_id=%s incident=%s copies=%d",
                mailbox,
                bare,
                incident_id,
                len(located.quarantined),
            )
            # A burst moves copies before its evidence copy is done, so a retry of
            # this incident's pull makes sure the evidence exists.
            marked = [c for c in located.quarantined if _marked_for(c, incident_id)]
            evidence = None
            if marked:
                evidence = await self._ensure_evidence(
                    EvidenceSource(mailbox, marked[0], repeated=True),
                    bare,
                    incident_id,
                )
            return QuarantineResult(
                mailbox=mailbox,
                message_id=bare,
                copies=tuple(c.original(mailbox, bare) for c in located.quarantined),
                already_done=True,
                evidence_location=evidence,
            )

        # A marker of this incident means that an earlier run got past step 2.
        repeated = any(_marked_for(c, incident_id) for c in located.visible)
        try:
            # Step 2: record where each copy is, on the copy itself.
            for copy in located.visible:
                marker = QuarantineMarker(
                    incident_id, copy.folder_id, copy.folder_name, copy.read
                )
                await self._set_marker(mailbox, bare, copy.item_id, marker.to_json())

            # Step 3: one verified evidence copy in the quarantine mailbox.
            source = EvidenceSource(mailbox, located.visible[0], repeated)
            evidence = await self._ensure_evidence(source, bare, incident_id)

            # Step 4: move each copy into the hidden folder; each gets a new id.
            folder_id = await self._hidden_folder(mailbox, bare)
            moved_ids = []
            for copy in located.visible:
                moved_ids.append(
                    await self._move(mailbox, bare, copy.item_id, folder_id)
                )
        except NotFoundError as exc:
            # A copy or a cached folder moved or vanished after step 1. A new search
            # finds the copy again, and the folders are looked up afresh.
            self._hidden_folders.pop(mailbox.lower(), None)
            self._incident_folders.pop(incident_id, None)
            self._evidence_checked.pop((incident_id, bare), None)
            raise TransientError(
                f"A copy of <{bare}> in mailbox {mailbox} changed while it was being "
                "quarantined; the quarantine will be retried.",
                mailbox=mailbox,
                message_id=bare,
                platform=PLATFORM,
            ) from exc

        # Step 5: verify that every copy arrived and none is left in sight.
        await self._verify_quarantined(mailbox, bare, moved_ids)
        logger.info(
            "Quarantined mailbox=%s message_id=%s incident=%s copies=%d evidence=%s",
            mailbox,
            bare,
            incident_id,
            len(moved_ids),
            evidence,
        )
        return QuarantineResult(
            mailbox=mailbox,
            message_id=bare,
            copies=tuple(copy.public(mailbox, bare) for copy in located.visible),
            evidence_location=evidence,
        )

    async def quarantine_many(
        self, pulls: Sequence[tuple[str, str, str]]
    ) -> list[QuarantineResult | ConnectorError]:
        """Quarantine many (mailbox, Message-ID, incident id) pulls as one burst.

        The burst sends JSON batches in phases (finds, then marks, then moves, then
        verifications) and one evidence copy per distinct message. It returns one
        result or connector error per pull, in the order given.
        """
        # Imported here because the burst module builds on this one.
        from .graph_burst import quarantine_burst

        return await quarantine_burst(self, pulls)

    async def restore(
        self, mailbox: str, message_id: str, incident_id: str
    ) -> QuarantineResult:
        """Put the copies this incident quarantined back where they were.

        Each copy in the hidden folder whose marker names the incident moves back
        to its original folder, or to the inbox if that folder is gone. Then its
        read state is restored and its marker cleared. Copies that an interrupted
        restore already moved back only get this second part.
        """
        bare = required_message_id(message_id, PLATFORM)
        located = await self._locate(mailbox, bare)
        if not located.visible and not located.quarantined:
            raise NotFoundError(
                f"Mailbox {mailbox} has no copy of <{bare}> to restore.",
                mailbox=mailbox,
                message_id=bare,
                platform=PLATFORM,
            )
        pending = [c for c in located.quarantined if _marked_for(c, incident_id)]
        half_done = [c for c in located.visible if _marked_for(c, incident_id)]
        if not pending and not half_done:
            return QuarantineResult(
                mailbox=mailbox,
                message_id=bare,
                copies=tuple(copy.public(mailbox, bare) for copy in located.visible),
                already_done=True,
            )

        restored: list[MessageCopy] = []
        notes: list[str] = []
        try:
            for copy in pending:
                restored.append(await self._restore_copy(mailbox, bare, copy, notes))
            for copy in half_done:
                restored.append(await self._finish_copy(mailbox, bare, copy))
        except NotFoundError as exc:
            raise TransientError(
                f"A copy of <{bare}> in mailbox {mailbox} changed while it was being "
                "restored; the restore will be retried.",
                mailbox=mailbox,
                message_id=bare,
                platform=PLATFORM,
            ) from exc
        await self._verify_restored(mailbox, bare, incident_id)
        logger.info(
            "Restored mailbox=%s message_id=%s incident=%s copies=%d",
            mailbox,
            bare,
            incident_id,
            len(restored),
        )
        return QuarantineResult(
            mailbox=mailbox, message_id=bare, copies=tuple(restored), notes=tuple(notes)
        )

    # --- finding ----------------------------------------------------------------------

    async def sent_since(self, mailbox: str, since: datetime) -> list[SentMessage]:
        """List the Sent Items of `mailbox` sent at or after `since`, with their MIME.

        Each message's MIME is read ($value) so the matcher gets attachments,
        attached messages and every header. Messages without a Message-ID are
        left out, because no later search could find their copies.
        """
        builder = (
            self._graph.users.by_user_id(mailbox)
            .mail_folders.by_mail_folder_id("sentitems")
            .messages
        )
        moment = since.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        query = MessagesRequestBuilder.MessagesRequestBuilderGetQueryParameters(
            filter=f"sentDateTime ge {moment}",
            select=["id", "sentDateTime"],
            top=self.settings.page_size,
        )
        config = RequestConfiguration(query_parameters=query)
        page = await self._call(mailbox, None, lambda: builder.get(config))
        listed: list[Message] = []
        while page is not None:
            listed.extend(page.value or [])
            if not page.odata_next_link:
                break
            page = await self._call(
                mailbox, None, partial(_next_page, builder, page.odata_next_link)
            )

        sent = []
        for message in listed:
            content = self._graph.users.by_user_id(mailbox).messages.by_message_id(
                message.id or ""
            )
            mime = await self._call(mailbox, None, content.content.get)
            parsed = sent_message_from_mime(
                mailbox, mime or b"", message.sent_date_time
            )
            if parsed is not None:
                sent.append(parsed)
        logger.info(
            "Listed sent messages mailbox=%s since=%s count=%d",
            mailbox,
            moment,
            len(sent),
        )
        return sent

    async def message_trace(self, message_id: str, since: datetime) -> list[TraceEvent]:
        """Return the deliveries of `message_id` from Graph's message trace.

        Graph accepts at most 10 days per query (receivedDateTime ge and le), so
        the query covers the 10 days from `since`. Each row is one recipient; a
        row with status delivered or expanded becomes a DELIVER or EXPAND event.
        NOTE: redirect details (getDetailsByRecipient) are not read, so the
        sender of a redirected copy shows as the message's sender.
        """
        bare = required_message_id(message_id, PLATFORM)
        start = since.astimezone(UTC)
        end = start + TRACE_WINDOW
        query = (
            MessageTracesRequestBuilder.MessageTracesRequestBuilderGetQueryParameters(
                filter=(
                    f"messageId eq {odata_string(f'<{bare}>')} and receivedDateTime ge "
                    f"{start:%Y-%m-%dT%H:%M:%SZ} and receivedDateTime le "
                    f"{end:%Y-%m-%dT%H:%M:%SZ}"
                ),
            )
        )
        builder = self._graph.admin.exchange.tracing.message_traces
        config = RequestConfiguration(query_parameters=query)
        try:
            page = await self._call(TRACE_SLOT, bare, lambda: builder.get(config))
        except PermanentError as error:
            raise PermanentError(
                f"Graph rejected the message trace query for {bare}: {error} The "
                "app needs the ExchangeMessageTrace.Read.All application permission "
                "for message traces.",
                message_id=bare,
                platform=PLATFORM,
            ) from error
        events = []
        while page is not None:
            for row in page.value or []:
                event = _trace_event(row, bare)
                if event is not None:
                    events.append(event)
            if not page.odata_next_link:
                break
            page = await self._call(
                TRACE_SLOT, bare, partial(_next_page, builder, page.odata_next_link)
            )
        return events

    async def forwarding_rules(self, mailbox: str) -> list[ForwardingRule]:
        """Return the enabled inbox rules of `mailbox` that redirect or forward mail."""
        builder = (
            self._graph.users.by_user_id(mailbox)
            .mail_folders.by_mail_folder_id("inbox")
            .message_rules
        )
        page = await self._call(mailbox, None, builder.get)
        rules = []
        for rule in (page.value or []) if page is not None else []:
            if rule.is_enabled is False or rule.actions is None:
                continue
            for kind, recipients in (
                ("redirect", rule.actions.redirect_to),
                ("forward", rule.actions.forward_to),
                ("forward_as_attachment", rule.actions.forward_as_attachment_to),
            ):
                targets = tuple(
                    recipient.email_address.address.lower()
                    for recipient in recipients or []
                    if recipient.email_address and recipient.email_address.address
                )
                if targets:
                    rules.append(ForwardingRule(mailbox.lower(), targets, kind))
        return rules

    async def _locate(self, mailbox: str, bare: str) -> _Located:
        """List every copy with its folder, read state and marker, page by page."""
        messages = await self._search(mailbox, bare, MESSAGE_FIELDS)
        folders: dict[str, _FolderInfo] = {}
        visible: list[_Copy] = []
        quarantined: list[_Copy] = []
        for message in messages:
            folder_id = message.parent_folder_id or ""
            if folder_id not in folders:
                folders[folder_id] = await self._folder_info(mailbox, bare, folder_id)
            folder = folders[folder_id]
            copy = _Copy(
                item_id=message.id or "",
                folder_id=folder_id,
                folder_name=folder.name,
                read=bool(message.is_read),
                subject=message.subject,
                received_at=message.received_date_time,
                marker=_marker_of(message),
            )
            in_quarantine = (
                folder.hidden and folder.name == self.settings.hidden_folder_name
            )
            (quarantined if in_quarantine else visible).append(copy)
        return _Located(visible, quarantined)

    async def _search(
        self, mailbox: str, bare: str, select: list[str]
    ) -> list[Message]:
        """Query `internetMessageId eq '<id>'` and keep exact matches from all pages."""
        builder = self._graph.users.by_user_id(mailbox).messages
        query = MessagesRequestBuilder.MessagesRequestBuilderGetQueryParameters(
            filter=internet_message_id_filter(bare),
            select=[*select, "receivedDateTime"],
            top=self.settings.page_size,
            expand=[
                f"singleValueExtendedProperties($filter=id eq '{MARKER_PROPERTY_ID}')"
            ],
        )
        config = RequestConfiguration(query_parameters=query)
        page = await self._call(mailbox, bare, lambda: builder.get(config))
        found: list[Message] = []
        while page is not None:
            found.extend(
                message
                for message in page.value or []
                if _same_message_id(message.internet_message_id, bare)
            )
            next_link = page.odata_next_link
            if not next_link:
                break
            page = await self._call(
                mailbox, bare, partial(_next_page, builder, next_link)
            )
        return found

    async def _folder_info(
        self, mailbox: str, bare: str, folder_id: str
    ) -> _FolderInfo:
        query = (
            MailFolderItemRequestBuilder.MailFolderItemRequestBuilderGetQueryParameters(
                select=["id", "displayName", "isHidden"]
            )
        )
        builder = self._graph.users.by_user_id(mailbox).mail_folders.by_mail_folder_id(
            folder_id
        )
        folder = await self._call(
            mailbox,
            bare,
            lambda: builder.get(RequestConfiguration(query_parameters=query)),
        )
        if folder is None:
            raise TransientError(
                f"Graph returned no body for folder {folder_id} of mailbox {mailbox}; "
                "the request will be retried.",
                mailbox=mailbox,
                message_id=bare,
                platform=PLATFORM,
            )
        return _FolderInfo(folder_id, folder.display_name or "", bool(folder.is_hidden))

    # --- changing messages ------------------------------------------------------------

    async def _set_marker(
        self, mailbox: str, bare: str, item_id: str, value: str
    ) -> None:
        body = Message(
            single_value_extended_properties=[
                SingleValueLegacyExtendedProperty(id=MARKER_PROPERTY_ID, value=value)
            ]
        )
        builder = self._graph.users.by_user_id(mailbox).messages.by_message_id(item_id)
        await self._call(mailbox, bare, lambda: builder.patch(body))

    async def _finish_restore(
        self, mailbox: str, bare: str, item_id: str, read: bool
    ) -> None:
        # An empty value clears the marker: `QuarantineMarker.from_json` reads it as
        # no marker at all.
        body = Message(
            is_read=read,
            single_value_extended_properties=[
                SingleValueLegacyExtendedProperty(id=MARKER_PROPERTY_ID, value="")
            ],
        )
        builder = self._graph.users.by_user_id(mailbox).messages.by_message_id(item_id)
        await self._call(mailbox, bare, lambda: builder.patch(body))

    async def _move(self, mailbox: str, bare: str, item_id: str, folder_id: str) -> str:
        """Move a message and return its new id (Graph gives moved items new ids)."""
        builder = self._graph.users.by_user_id(mailbox).messages.by_message_id(item_id)
        body = MovePostRequestBody(destination_id=folder_id)
        moved = await self._call(mailbox, bare, lambda: builder.move.post(body))
        if moved is None or not moved.id:
            raise TransientError(
                f"Graph moved message {item_id} of mailbox {mailbox} without returning "
                "its new id; the next attempt finds it by Message-ID.",
                mailbox=mailbox,
                message_id=bare,
                platform=PLATFORM,
            )
        return str(moved.id)

    async def _restore_copy(
        self, mailbox: str, bare: str, copy: _Copy, notes: list[str]
    ) -> MessageCopy:
        """Move a quarantined copy back to its original folder, then finish it."""
        marker = copy.marker
        assert marker is not None
        try:
            item_id = await self._move(mailbox, bare, copy.item_id, marker.folder_id)
            folder_name = marker.folder_name
        except NotFoundError:
            # The original folder is gone, so the copy goes to the inbox. If the copy
            # itself is gone, this move fails too and the error goes up.
            item_id = await self._move(mailbox, bare, copy.item_id, "inbox")
            folder_name = "Inbox"
            notes.append(
                f"Folder {marker.folder_name!r} no longer exists, so the copy was "
                "restored to the Inbox."
            )
        moved = _Copy(
            item_id, "", folder_name, copy.read, copy.subject, copy.received_at, marker
        )
        return await self._finish_copy(mailbox, bare, moved)

    async def _finish_copy(self, mailbox: str, bare: str, copy: _Copy) -> MessageCopy:
        """Restore the read state of a copy that is back in place, clear its marker."""
        marker = copy.marker
        assert marker is not None
        await self._finish_restore(mailbox, bare, copy.item_id, marker.read)
        return MessageCopy(
            mailbox=mailbox,
            message_id=bare,
            item_id=copy.item_id,
            folder=copy.folder_name,
            read=marker.read,
            subject=copy.subject,
            received_at=copy.received_at,
        )

    # --- verification -----------------------------------------------------------------

    async def _verify_quarantined(
        self, mailbox: str, bare: str, moved_ids: list[str]
    ) -> None:
        located = await self._locate(mailbox, bare)
        arrived = {copy.item_id for copy in located.quarantined}
        missing = [item_id for item_id in moved_ids if item_id not in arrived]
        if located.visible or missing:
            raise TransientError(
                f"Quarantine of <{bare}> in mailbox {mailbox} is not complete: "
                f"{len(located.visible)} copies still visible and {len(missing)} moved "
                "copies not found in the hidden folder; run the quarantine again.",
                mailbox=mailbox,
                message_id=bare,
                platform=PLATFORM,
            )

    async def _verify_restored(self, mailbox: str, bare: str, incident_id: str) -> None:
        located = await self._locate(mailbox, bare)
        left = [
            c
            for c in [*located.quarantined, *located.visible]
            if _marked_for(c, incident_id)
        ]
        if left:
            raise TransientError(
                f"Restore of <{bare}> in mailbox {mailbox} is not complete: "
                f"{len(left)} copies still carry the marker of incident "
                f"{incident_id}; run the restore again.",
                mailbox=mailbox,
                message_id=bare,
                platform=PLATFORM,
            )

    # --- folders ----------------------------------------------------------------------

    async def _hidden_folder(self, mailbox: str, bare: str) -> str:
        """Return the id of the mailbox's hidden quarantine folder, creating it."""
        key = mailbox.lower()
        if key not in self._hidden_folders:
            folder = await self._find_or_create_folder(
                mailbox, bare, self.settings.hidden_folder_name, hidden=True
            )
            self._hidden_folders[key] = folder
        return self._hidden_folders[key]

    async def _find_or_create_folder(
        self, mailbox: str, bare: str, name: str, *, hidden: bool
    ) -> str:
        existing = await self._top_folder(mailbox, bare, name)
        if existing is None:
            builder = self._graph.users.by_user_id(mailbox).mail_folders
            body = MailFolder(display_name=name, is_hidden=hidden)
            try:
                created = await self._call(
                    mailbox,
                    bare,
                    lambda: builder.post(body),
                    expected_codes=frozenset({"ErrorFolderExists"}),
                )
            except _ExpectedGraphError:
                # Another worker created it first, so this one uses theirs.
                logger.warning(
                    "Folder exists already mailbox=%s folder=%s", mailbox, name
                )
                existing = await self._top_folder(mailbox, bare, name)
            else:
                if created is None or not created.id:
                    raise TransientError(
                        f"Graph created folder {name!r} in mailbox {mailbox} without "
                        "returning its id; the request will be retried.",
                        mailbox=mailbox,
                        platform=PLATFORM,
                    )
                logger.info(
                    "Created folder mailbox=%s folder=%s hidden=%s",
                    mailbox,
                    name,
                    hidden,
                )
                return str(created.id)
        if existing is None:
            raise TransientError(
                f"Folder {name!r} of mailbox {mailbox} exists but was not listed; "
                "the request will be retried.",
                mailbox=mailbox,
                platform=PLATFORM,
            )
        if existing.hidden != hidden:
            raise PermanentError(
                f"Mailbox {mailbox} has a {'visible' if hidden else 'hidden'} folder "
                f"named {name!r}; rename it or choose another folder name in the "
                "Graph settings.",
                mailbox=mailbox,
                platform=PLATFORM,
            )
        return existing.folder_id

    async def _top_folder(
        self, mailbox: str, bare: str, name: str
    ) -> _FolderInfo | None:
        """Find a folder by name at the top of the mailbox, hidden or not."""
        builder = self._graph.users.by_user_id(mailbox).mail_folders
        query = MailFoldersRequestBuilder.MailFoldersRequestBuilderGetQueryParameters(
            filter=f"displayName eq {odata_string(name)}",
            include_hidden_folders="true",
            select=["id", "displayName", "isHidden"],
            top=self.settings.page_size,
        )
        config = RequestConfiguration(query_parameters=query)
        page = await self._call(mailbox, bare, lambda: builder.get(config))
        while page is not None:
            for folder in page.value or []:
                if (folder.display_name or "").lower() == name.lower() and folder.id:
                    return _FolderInfo(
                        folder.id, folder.display_name or "", bool(folder.is_hidden)
                    )
            if not page.odata_next_link:
                break
            page = await self._call(
                mailbox, bare, partial(_next_page, builder, page.odata_next_link)
            )
        return None

    # --- evidence ---------------------------------------------------------------------

    async def _ensure_evidence(
        self,
        source: EvidenceSource | Awaitable[EvidenceSource],
        bare: str,
        incident_id: str,
        source_read: asyncio.Event | None = None,
        marked: Awaitable[bool] | None = None,
    ) -> str:
        """Ensure one evidence copy for the incident in the quarantine mailbox.

        A lock per Message-ID keeps two quarantines of the same message in this
        process from uploading two copies. Two worker processes can still each
        upload and file one at the same moment, so the check afterwards removes
        doubles. The incident folder, the search for an existing copy and the
        source's MIME content are fetched at once. `source` is the copy to copy
        from, or an awaitable of it, so that a burst can start the quarantine
        mailbox's lookups before it has found a source. `source_read` is set as
        soon as the source copy is no longer needed, so a caller may move it.
        `marked`, when given, is awaited before the first write and returns
        whether the marker of a pull of this message has been stored.

        Once verified, the copy is remembered for the life of the adapter, so only
        the first quarantine of a message costs requests in the quarantine mailbox.
        A repeated pull is the exception. A worker that died after its pull's
        marker was stored may have uploaded or filed a copy after this adapter's
        last check, and no one checks after a dead worker. So a repeated pull
        checks again, unless a check began after the pull's own call began.

        NOTE: an evidence copy deleted by hand after it was verified is uploaded
        again only by a repeated pull or after the adapter restarts.
        """
        quarantine = self.settings.quarantine_mailbox
        key = (incident_id, bare)
        began = next(self._evidence_checks)
        lock = self._evidence_locks.get(bare)
        if lock is None:
            lock = asyncio.Lock()
            self._evidence_locks[bare] = lock
        try:
            if key in self._evidence_checked:
                # Whether the pull repeats an earlier run is known only from its
                # source, which a burst settles after its first phase.
                source = await _resolved(source)
            async with lock:
                checked = self._evidence_checked.get(key)
                if checked is not None:
                    source = await _resolved(source)
                    if not source.repeated or checked > began:
                        return f"{quarantine}/{incident_id}"
                check = next(self._evidence_checks)
                await self._check_evidence(
                    source, bare, incident_id, source_read, marked
                )
                self._evidence_checked[key] = check
        finally:
            if source_read is not None:
                source_read.set()
        return f"{quarantine}/{incident_id}"

    async def _check_evidence(
        self,
        source: EvidenceSource | Awaitable[EvidenceSource],
        bare: str,
        incident_id: str,
        source_read: asyncio.Event | None,
        marked: Awaitable[bool] | None,
    ) -> None:
        """Find, upload or reuse, file and verify the incident's evidence copy."""
        quarantine = self.settings.quarantine_mailbox
        select = [*MESSAGE_FIELDS, "internetMessageHeaders"]
        folder_id, copies, (mailbox, mime) = await _gather_or_raise(
            self._incident_folder(incident_id, bare),
            self._search(quarantine, bare, select),
            self._source_mime(source, bare),
        )
        if source_read is not None:
            source_read.set()
        for attempt in (1, 2):
            if any(copy.parent_folder_id == folder_id for copy in copies):
                break
            if marked is not None:
                if not await marked:
                    raise TransientError(
                        f"No copy of <{bare}> carries the marker of incident "
                        f"{incident_id}, so no evidence copy is written; the "
                        "quarantine will be retried.",
                        mailbox=quarantine,
                        message_id=bare,
                        platform=PLATFORM,
                    )
                marked = None
            # A copy that an interrupted run uploaded is reused, not doubled.
            strays = _stray_evidence(copies, incident_id, folder_id)
            item_id = strays[0] if strays else None
            if item_id is None:
                item_id = await self._upload_evidence(mailbox, bare, mime, incident_id)
            try:
                await self._move(quarantine, bare, item_id, folder_id)
                break
            except NotFoundError as error:
                if attempt == 2:
                    raise
                # Another worker filed or deleted the copy, or the folder is gone,
                # so search again before writing anything more.
                logger.warning(
                    "Evidence move found no copy or folder, searching again "
                    "mailbox=%s message_id=%s incident=%s item_id=%s error=%s",
                    quarantine,
                    bare,
                    incident_id,
                    item_id,
                    error,
                )
                self._incident_folders.pop(incident_id, None)
                folder_id, copies = await _gather_or_raise(
                    self._incident_folder(incident_id, bare),
                    self._search(quarantine, bare, select),
                )
        await self._verify_evidence(bare, incident_id, folder_id)

    async def _incident_folder(self, incident_id: str, bare: str) -> str:
        """Return the incident's folder id; concurrent callers share one lookup."""
        if incident_id in self._incident_folders:
            return self._incident_folders[incident_id]
        lookup = self._incident_lookups.get(incident_id)
        if lookup is None:
            lookup = asyncio.ensure_future(
                self._find_or_create_folder(
                    self.settings.quarantine_mailbox, bare, incident_id, hidden=False
                )
            )
            self._incident_lookups[incident_id] = lookup
        try:
            folder_id = await asyncio.shield(lookup)
        finally:
            if lookup.done():
                self._incident_lookups.pop(incident_id, None)
        self._incident_folders[incident_id] = folder_id
        return folder_id

    async def _source_mime(
        self, source: EvidenceSource | Awaitable[EvidenceSource], bare: str
    ) -> tuple[str, bytes]:
        resolved = await _resolved(source)
        mailbox, copy = resolved.mailbox, resolved.copy
        mime = await self._call(
            mailbox,
            bare,
            lambda: (
                self._graph.users.by_user_id(mailbox)
                .messages.by_message_id(copy.item_id)
                .content.get()
            ),
        )
        if not mime:
            raise TransientError(
                f"Graph returned no MIME content for message {copy.item_id} of "
                f"mailbox {mailbox}; the request will be retried.",
                mailbox=mailbox,
                message_id=bare,
                platform=PLATFORM,
            )
        return mailbox, bytes(mime)

    async def _upload_evidence(
        self, mailbox: str, bare: str, mime: bytes, incident_id: str
    ) -> str:
        """Upload the original's MIME with the incident headers; return the draft id.

        The headers go first, before any forged copies of them that the message
        itself may carry, because the first occurrence is the one that counts.
        """
        quarantine = self.settings.quarantine_mailbox
        _check_header_value(mailbox, "mailbox")
        headers = (
            f"{INCIDENT_HEADER}: {incident_id}\r\n"
            f"{ORIGINAL_MAILBOX_HEADER}: {mailbox}\r\n"
        ).encode("ascii")
        created = await self._post_mime(quarantine, bare, headers + mime)
        logger.info(
            "Uploaded evidence copy mailbox=%s message_id=%s incident=%s",
            quarantine,
            bare,
            incident_id,
        )
        return created

    async def _post_mime(self, mailbox: str, bare: str, mime: bytes) -> str:
        """POST base64 MIME to /users/{mailbox}/messages; Graph stores it as a draft.

        NOTE: Graph returns 413 for request bodies above about 4 MB (Microsoft
        support's figure for sendMail, assumed to hold here), so a message above
        about 3 MB cannot be copied this way and its quarantine fails permanently.
        Graph's mailbox import API would lift that limit.
        """
        builder = self._graph.users.by_user_id(mailbox).messages
        info = RequestInformation(
            Method.POST, builder.url_template, builder.path_parameters
        )
        info.headers.try_add("Accept", "application/json")
        info.set_stream_content(base64.b64encode(mime), "text/plain")
        errors: dict[str, Any] = {"XXX": ODataError}
        created = await self._call(
            mailbox,
            bare,
            lambda: self._adapter.send_async(info, Message, errors),
        )
        if not isinstance(created, Message) or not created.id:
            raise TransientError(
                f"Graph stored a MIME message in mailbox {mailbox} without returning "
                "its id; the next attempt finds it by Message-ID.",
                mailbox=mailbox,
                message_id=bare,
                platform=PLATFORM,
            )
        return str(created.id)

    async def _verify_evidence(
        self, bare: str, incident_id: str, folder_id: str
    ) -> None:
        """Check that the incident folder holds the evidence copy; remove doubles.

        Every process keeps the filed copy with the smallest id and deletes the
        other filed copies, so processes that race agree on the copy that stays.
        The incident's copies outside the folder, such as a draft that a killed
        worker uploaded and never filed, are deleted too. Nothing is deleted
        unless a filed copy was found, and the filed copy with the smallest id is
        never deleted, so one copy always remains.
        """
        quarantine = self.settings.quarantine_mailbox
        messages = await self._search(
            quarantine, bare, [*MESSAGE_FIELDS, "internetMessageHeaders"]
        )
        filed = sorted(
            str(m.id) for m in messages if m.id and m.parent_folder_id == folder_id
        )
        if not filed:
            raise TransientError(
                f"The evidence copy of <{bare}> for incident {incident_id} is not in "
                f"folder {incident_id!r} of mailbox {quarantine}; the originals were "
                "not moved, and the quarantine will be retried.",
                mailbox=quarantine,
                message_id=bare,
                platform=PLATFORM,
            )
        for item_id in filed[1:]:
            await self._delete_evidence(bare, incident_id, item_id)
        for item_id in _stray_evidence(messages, incident_id, folder_id):
            await self._delete_evidence(bare, incident_id, item_id)

    async def _delete_evidence(self, bare: str, incident_id: str, item_id: str) -> None:
        quarantine = self.settings.quarantine_mailbox
        builder = (
            self._graph.users.by_user_id(quarantine)
            .messages.by_message_id(item_id)
            .permanent_delete
        )
        try:
            await self._call(quarantine, bare, lambda: builder.post())
        except NotFoundError:
            return  # another process deleted it first
        logger.info(
            "Deleted a second evidence copy mailbox=%s message_id=%s incident=%s "
            "item_id=%s",
            quarantine,
            bare,
            incident_id,
            item_id,
        )

    # --- the error boundary -----------------------------------------------------------

    def _slot(self, mailbox: str) -> asyncio.Semaphore:
        key = mailbox.lower()
        if key not in self._slots:
            self._slots[key] = asyncio.Semaphore(
                self.settings.max_concurrency_per_mailbox
            )
        return self._slots[key]

    async def _call(
        self,
        mailbox: str,
        bare: str | None,
        operation: Callable[[], Awaitable[T]],
        *,
        expected_codes: frozenset[str] = frozenset(),
        limited: bool = True,
    ) -> T:
        """Run one Graph request in the mailbox's slot and map every error it raises.

        A 401 is retried once with a new token, because the cached one may have been
        revoked; a second 401 is permanent. An OData error whose code is in
        `expected_codes` raises `_ExpectedGraphError` for the caller to handle.
        With `limited` false the request takes no slot, for a `$batch` whose inner
        requests hold their own slots.
        """
        slot = self._slot(mailbox) if limited else contextlib.nullcontext()
        async with slot:
            for attempt in (1, 2):
                try:
                    return await operation()
                except Exception as exc:  # the one place foreign errors are mapped
                    code = _odata_code(exc)[0] if isinstance(exc, APIError) else None
                    if code is not None and code in expected_codes:
                        raise _ExpectedGraphError(code, mailbox) from exc
                    error = map_graph_error(exc, mailbox=mailbox, message_id=bare)
                    if attempt == 1 and _status_of(exc) == 401:
                        logger.warning(
                            "Graph returned 401, fetching a new token mailbox=%s",
                            mailbox,
                        )
                        self._tokens.invalidate()
                        continue
                    if error.mailbox is None:
                        error.mailbox = mailbox
                    if error is exc:
                        raise
                    raise error from exc
        raise AssertionError("unreachable")


# --- helpers --------------------------------------------------------------------------


def _trace_event(row: ExchangeMessageTrace, bare: str) -> TraceEvent | None:
    status = row.status.value if row.status is not None else ""
    event = {"delivered": "DELIVER", "expanded": "EXPAND"}.get(status.lower())
    if event is None or not row.recipient_address or row.received_date_time is None:
        return None
    return TraceEvent(
        message_id=bare,
        event=event,
        at=row.received_date_time,
        source="GRAPH",
        sender=(row.sender_address or "").lower(),
        recipients=(row.recipient_address.lower(),),
        subject=row.subject,
    )


def odata_string(value: str) -> str:
    """Quote a value as an OData string literal: `'` is written twice."""
    return "'" + value.replace("'", "''") + "'"


def internet_message_id_filter(bare: str) -> str:
    """Build the $filter for a Message-ID, with the brackets Graph stores put back."""
    return f"internetMessageId eq {odata_string(f'<{bare}>')}"


def received_window_filter(search: MessageSearch) -> str:
    """Build the $filter for messages that arrived inside the search's window."""
    after = search.received_after.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    before = search.received_before.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"receivedDateTime ge {after} and receivedDateTime le {before}"


def _matching_address(message: Message, search: MessageSearch) -> str | None:
    """Return the From or Sender address by which `message` matches, else None."""
    for recipient in (message.from_, message.sender):
        address = recipient.email_address.address if recipient else None
        email_address = (address or "").strip().lower()
        if search.matches(email_address, message.subject, message.received_date_time):
            return email_address
    return None


def _bare(message_id: str | None) -> str:
    text = (message_id or "").strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1].strip()
    return text


def _next_page(builder: Any, link: str) -> Awaitable[Any]:
    return builder.with_url(link).get()  # type: ignore[no-any-return]


def _same_message_id(found: str | None, bare: str) -> bool:
    """Compare a Message-ID from Graph with a bare one, exactly, brackets aside."""
    text = (found or "").strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1].strip()
    return text == bare


def _marker_of(message: Message) -> QuarantineMarker | None:
    for prop in message.single_value_extended_properties or []:
        if (prop.id or "").lower() == MARKER_PROPERTY_ID.lower():
            return QuarantineMarker.from_json(prop.value)
    return None


def _marked_for(copy: _Copy, incident_id: str) -> bool:
    return copy.marker is not None and copy.marker.incident == incident_id


def _stray_evidence(
    messages: Sequence[Message], incident_id: str, folder_id: str
) -> list[str]:
    """List, smallest first, the ids of the incident's copies outside its folder.

    The adapter's own incident header names the incident of a copy.

    NOTE: it is unverified whether Graph returns internetMessageHeaders for a
    draft made from MIME. If it does not, no stray is found: a retry uploads a
    second copy, and an interrupted upload stays behind in Drafts.
    """
    return sorted(
        str(message.id)
        for message in messages
        if message.id
        and message.parent_folder_id != folder_id
        and _incident_of(message) == incident_id
    )


async def _resolved(
    source: EvidenceSource | Awaitable[EvidenceSource],
) -> EvidenceSource:
    return source if isinstance(source, EvidenceSource) else await source


def _incident_of(message: Message) -> str | None:
    # The first header wins: the adapter puts its own before any in the message.
    for header in message.internet_message_headers or []:
        if (header.name or "").lower() == INCIDENT_HEADER.lower():
            return (header.value or "").strip()
    return None


def _check_header_value(value: str, what: str) -> None:
    if "\r" in value or "\n" in value or not value.strip():
        raise PermanentError(
            f"The {what} {value!r} is empty or contains a line break, so it cannot go "
            "into a mail header; fix the value.",
            platform=PLATFORM,
        )


def _status_of(exc: BaseException) -> int | None:
    return exc.response_status_code if isinstance(exc, APIError) else None


async def _gather_or_raise(*steps: Awaitable[Any]) -> list[Any]:
    """Await steps concurrently; raise the first error once all have finished.

    Unlike a bare gather, no step is left running in the background after another
    step failed.
    """
    results = await asyncio.gather(*steps, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return list(results)
