"""Exchange Server 2013 to SE through exchangelib (EWS with impersonation).

A quarantine moves each copy of a message out of the user's mailbox into the central
quarantine mailbox, one folder per incident. The adapter reads the copy's MIME
(GetItem MimeContent) and puts headers in front that name the incident, the original
mailbox, folder and read state. It stores the result while impersonating the
quarantine mailbox, with CreateItem, MimeContent and PR_MESSAGE_FLAGS, so the copy
is no draft. Only after it has found the stored copy again by Message-ID and
headers does it delete the original, with HardDelete. A restore finds the stored
copy by its headers, creates it again in the original folder with its read state,
verifies it, and deletes the stored copy.

ExportItems is not used: its Data is an opaque stream that cannot carry the headers
that make the stored copy findable after a crash.

HardDelete is chosen because the verified copy in the quarantine mailbox is the one
to recover from. MoveToDeletedItems would leave the message in the user's Deleted
Items, where the user still opens it and the next search finds it again, and
SoftDelete lets the user bring it back with Recover Deleted Items.

exchangelib is synchronous, so every EWS request runs in a thread pool, with a
bounded number of requests per mailbox. exchangelib's retry policy belongs to its
protocol object, which every impersonated mailbox shares; it is FailFast here, and
the adapter waits out ErrorServerBusy back-offs and the Retry-After of a 503 per
mailbox itself, so one throttled mailbox does not stop the others. All exchangelib,
requests and transport errors are translated in one place, `map_ews_error`.
"""

from __future__ import annotations

import asyncio
import email.header
import logging
import threading
import weakref
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import requests
from exchangelib import (
    IMPERSONATION,
    Account,
    Build,
    Configuration,
    Credentials,
    ExtendedProperty,
    Message,
    Q,
    Version,
)
from exchangelib import errors as ews_errors
from exchangelib.ewsdatetime import UTC as EWS_UTC
from exchangelib.ewsdatetime import EWSDateTime
from exchangelib.folders import (
    DEEP,
    SHALLOW,
    Folder,
    FolderCollection,
    Inbox,
    MsgFolderRoot,
    Root,
    SentItems,
)
from exchangelib.items import HARD_DELETE, ID_ONLY, SAVE_ONLY
from exchangelib.properties import DistinguishedFolderId, Mailbox
from exchangelib.protocol import FailFast, Protocol
from exchangelib.services import CreateFolder
from exchangelib.transport import BASIC
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

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
from .tracking import TrackingLogDirectory

logger = logging.getLogger(__name__)

T = TypeVar("T")

PLATFORM = "ews"
INCIDENT_HEADER = "X-Autopull-Incident"
ORIGINAL_MAILBOX_HEADER = "X-Autopull-Original-Mailbox"
ORIGINAL_FOLDER_ID_HEADER = "X-Autopull-Original-Folder-Id"
ORIGINAL_FOLDER_HEADER = "X-Autopull-Original-Folder"
ORIGINAL_READ_HEADER = "X-Autopull-Original-Read"
MARKER_HEADERS = (
    INCIDENT_HEADER,
    ORIGINAL_MAILBOX_HEADER,
    ORIGINAL_FOLDER_ID_HEADER,
    ORIGINAL_FOLDER_HEADER,
    ORIGINAL_READ_HEADER,
)
# MSGFLAG_READ of PR_MESSAGE_FLAGS. A stored message whose flags lack MSGFLAG_UNSENT
# (0x8) is no draft.
MSGFLAG_READ = 0x1
COPY_FIELDS = (
    "message_id",
    "is_read",
    "parent_folder_id",
    "subject",
    "datetime_received",
)
STORED_FIELDS = (*COPY_FIELDS, "headers")
# The RuleActionsType fields of an inbox rule that send a message on, as exchangelib
# names them, with the ForwardingRule kind of each.
FORWARDING_ACTIONS = (
    ("redirect", "redirect_to_recipients"),
    ("forward", "forward_to_recipients"),
    ("forward_as_attachment", "forward_as_attachment_to_recipients"),
)
# exchangelib's exceptions for a server that is overloaded or briefly unavailable.
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    ews_errors.ErrorExceededConnectionCount,
    ews_errors.ErrorTooManyObjectsOpened,
    ews_errors.ErrorTimeoutExpired,
    ews_errors.ErrorInternalServerTransientError,
    ews_errors.ErrorInternalServerError,
    ews_errors.ErrorMailboxStoreUnavailable,
    ews_errors.ErrorMailboxMoveInProgress,
    ews_errors.ErrorConnectionFailed,
    ews_errors.ErrorADUnavailable,
    ews_errors.ErrorBatchProcessingStopped,
    ews_errors.ErrorExceededFindCountLimit,
    ews_errors.SessionPoolMinSizeReached,
    ews_errors.SessionPoolMaxSizeReached,
)
MISSING_ERRORS: tuple[type[Exception], ...] = (
    ews_errors.ErrorFolderNotFound,
    ews_errors.ErrorItemNotFound,
)
NOT_FOUND_ERRORS: tuple[type[Exception], ...] = (
    ews_errors.ErrorItemNotFound,
    ews_errors.ErrorFolderNotFound,
    ews_errors.ErrorNonExistentMailbox,
    ews_errors.DoesNotExist,
)
ACCESS_ERRORS: tuple[type[Exception], ...] = (
    ews_errors.UnauthorizedError,
    ews_errors.ErrorAccessDenied,
    ews_errors.ErrorImpersonateUserDenied,
    ews_errors.ErrorImpersonationDenied,
    ews_errors.ErrorImpersonationFailed,
    ews_errors.ErrorAccountDisabled,
    ews_errors.CASError,
)


class EwsSettings(BaseModel):
    """An on-premises Exchange organisation reached through EWS.

    The service account needs the ApplicationImpersonation role for every mailbox,
    the quarantine mailbox included. `server_build` fixes the Exchange build (such
    as 15.1.2507.6 for Exchange 2016), so no request is spent guessing it. Leave it
    empty to let exchangelib probe the server. Copies go to `quarantine_folder` below
    the top of the quarantine mailbox, one subfolder per incident. At most
    `max_concurrency_per_mailbox` requests per mailbox and `max_connections` in all
    run at once. The adapter waits in place for a server-requested back-off or
    Retry-After of up to `max_back_off_wait` seconds, `max_attempts` times per
    request; a longer one raises ThrottledError (TransientError for a 503) with
    the server's wait.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    service_endpoint: str = Field(description="EWS URL, .../EWS/Exchange.asmx.")
    username: str = Field(description="Service account with impersonation rights.")
    password: SecretStr = Field(description="Password of the service account.")
    quarantine_mailbox: str = Field(description="Mailbox that receives the copies.")
    quarantine_folder: str = Field(
        default="Autopull Quarantine",
        min_length=1,
        description="Folder of the quarantine mailbox that holds the incident folders.",
    )
    server_build: str | None = Field(
        default="15.1.2507.6",
        description="Exchange build as major.minor.build.revision; empty to probe.",
    )
    max_connections: int = Field(default=8, ge=1, description="HTTP sessions in all.")
    max_concurrency_per_mailbox: int = Field(
        default=4, ge=1, description="Requests in flight per mailbox."
    )
    max_back_off_wait: float = Field(
        default=30.0, ge=0, description="Maximum back-off waited in place, seconds."
    )
    max_attempts: int = Field(
        default=3, ge=1, description="Tries of one request while throttled."
    )
    request_timeout: float = Field(
        default=120.0, gt=0, description="HTTP timeout of one request, seconds."
    )
    tracking_log_dir: Path | None = Field(
        default=None,
        description="Folder of the message tracking log files (MSGTRK*.LOG or "
        "Get-MessageTrackingLog CSV exports) that forward tracing reads; empty for "
        "none.",
    )

    @field_validator("quarantine_mailbox")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.strip().lower()

    @field_validator("server_build")
    @classmethod
    def _check_build(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        parts = value.strip().split(".")
        if not 2 <= len(parts) <= 4 or not all(part.isdigit() for part in parts):
            raise ValueError(
                f"server_build {value!r} is not major.minor[.build[.revision]]; write "
                "it like 15.1.2507.6 or leave it empty."
            )
        return value.strip()


# --- exchangelib extensions ---------------------------------------------------------


class MessageFlags(ExtendedProperty):
    """PR_MESSAGE_FLAGS (0x0E07); without MSGFLAG_UNSENT a message is no draft."""

    property_tag = 0x0E07
    property_type = "Integer"


def _register_message_flags() -> None:
    # Registration changes exchangelib's Message class for the whole process, once.
    with suppress(ValueError):
        Message.register("message_flags", MessageFlags)


_register_message_flags()


class ServiceUnavailable(ews_errors.ErrorServerBusy):
    """HTTP 503 from Exchange or a proxy, with its Retry-After in `back_off`."""


class FixedPoolProtocol(Protocol):
    """exchangelib's protocol object with a session pool that never shrinks.

    exchangelib 5.6 drops one HTTP session after each ErrorServerBusy, 503 or
    ErrorExceededConnectionCount. It takes the session to drop while it holds the
    pool lock, and when every session is in use and the pool is below its size,
    it tries to add one under the same lock. The thread then waits on itself,
    and every other thread that needs a session waits behind it. The adapter
    limits requests per mailbox and waits out back-offs itself, so the pool keeps
    its sessions instead.
    """

    def decrease_poolsize(self) -> None:
        raise ews_errors.SessionPoolMinSizeReached(
            "The adapter keeps its EWS session pool at max_connections sessions."
        )

    def get_session(self) -> Any:
        """Return a session for the next request, unless its mailbox is paused.

        One step can send several requests (FindItem, then GetItem). A request
        that would go out during a back-off that began after its step started
        raises ErrorServerBusy with the remaining wait instead, before anything
        is sent, so the step runs again after the back-off.
        """
        gate: _Gate | None = getattr(_step_gate, "gate", None)
        remaining = gate.remaining() if gate is not None else 0.0
        if remaining > 0:
            raise ews_errors.ErrorServerBusy(
                f"The mailbox waits {remaining:.3f} s more for a back-off that "
                "Exchange asked for.",
                back_off=remaining,
            )
        return super().get_session()


class FailFastWithRetryAfter(FailFast):
    """exchangelib's FailFast policy, keeping a 503's Retry-After for the adapter.

    FailFast drops the header, and exchangelib then reports a 503 as ErrorServerBusy
    with its own fixed wait. This policy raises `ServiceUnavailable` instead, whose
    `back_off` is the server's Retry-After, or None when the header is missing.
    """

    def raise_response_errors(self, response: requests.Response) -> None:
        try:
            super().raise_response_errors(response)
        except ews_errors.ErrorInternalServerTransientError as exc:
            raise ServiceUnavailable(
                str(exc), back_off=_retry_after(response.headers.get("Retry-After"))
            ) from exc


def _retry_after(value: str | None) -> float | None:
    try:
        seconds = float(value or "")
    except ValueError:
        return None
    return seconds if seconds > 0 else None


# --- error mapping ------------------------------------------------------------------


def map_ews_error(
    exc: BaseException,
    *,
    mailbox: str | None = None,
    message_id: str | None = None,
) -> ConnectorError:
    """Translate any exchangelib, requests or transport error into a connector error.

    ErrorServerBusy (BackOffMilliseconds) is throttling with the server's wait, and
    a 503 is transient with its Retry-After. Busy servers, timeouts and broken
    connections are transient. Missing items, folders and mailboxes are not found.
    Rejected credentials or impersonation are permanent, and so is every other
    error of a response message, because a repeated request gets the same error.
    """
    context: dict[str, Any] = {
        "mailbox": mailbox,
        "message_id": message_id,
        "platform": PLATFORM,
    }
    where = f"mailbox {mailbox}" if mailbox else "Exchange"
    name = type(exc).__name__
    if isinstance(exc, ConnectorError):
        return exc
    if isinstance(exc, ServiceUnavailable):
        return TransientError(
            f"Exchange was unavailable for {where} ({exc}); retry "
            f"{_after(exc.back_off)}.",
            retry_after=exc.back_off,
            **context,
        )
    if isinstance(exc, ews_errors.ErrorServerBusy):
        # NOTE: exchangelib 5.6 also raises ErrorServerBusy, with its own 10 s wait,
        # for a connection error while it holds more than one HTTP session, so such
        # an error is reported as throttling too.
        return ThrottledError(
            f"Exchange is busy and throttled requests for {where} ({exc}); retry "
            f"{_after(exc.back_off)}.",
            retry_after=exc.back_off,
            **context,
        )
    if isinstance(exc, ews_errors.RateLimitError):
        return ThrottledError(
            f"Exchange asked {where} to wait {exc.wait:.1f} s, longer than allowed.",
            retry_after=exc.wait,
            **context,
        )
    if isinstance(exc, TRANSIENT_ERRORS):
        return TransientError(
            f"Exchange failed a request for {where} ({name}: {exc}); it will be "
            "retried.",
            **context,
        )
    if isinstance(exc, NOT_FOUND_ERRORS):
        return NotFoundError(
            f"Exchange found nothing for {where} ({name}).",
            mailbox_missing=isinstance(exc, ews_errors.ErrorNonExistentMailbox),
            **context,
        )
    if isinstance(exc, ACCESS_ERRORS):
        return PermanentError(
            f"Exchange denied access to {where} ({name}: {exc}); check the service "
            "account's password and its ApplicationImpersonation role.",
            **context,
        )
    return _map_other(exc, where, name, context)


def _after(seconds: float | None) -> str:
    return f"after {seconds:g} s" if seconds else "after a back-off"


def _map_other(
    exc: BaseException, where: str, name: str, context: dict[str, Any]
) -> ConnectorError:
    if isinstance(exc, ews_errors.RedirectError | ews_errors.RelativeRedirect):
        return PermanentError(
            f"Exchange redirected a request for {where} ({exc}); set "
            "service_endpoint to the final EWS URL.",
            **context,
        )
    if isinstance(exc, ews_errors.ResponseMessageError):
        return PermanentError(
            f"Exchange rejected a request for {where} ({name}: {exc}); the request "
            "needs fixing, so it is not retried.",
            **context,
        )
    if isinstance(
        exc,
        ews_errors.TransportError
        | requests.ConnectionError
        | requests.Timeout
        | OSError,
    ):
        return TransientError(
            f"A request for {where} failed in transport ({name}: {exc}); it will be "
            "retried.",
            **context,
        )
    return PermanentError(
        f"A request for {where} failed unexpectedly ({name}: {exc}); report this as "
        "a bug if it repeats.",
        **context,
    )


# --- markers ------------------------------------------------------------------------


@dataclass(frozen=True)
class QuarantineMarker:
    """The origin of a quarantined copy, written as headers in front of its MIME."""

    incident: str
    mailbox: str
    folder_id: str
    folder_name: str
    read: bool

    def headers(self) -> bytes:
        """Return the marker header lines, ending in CRLF, to put before the MIME."""
        folder_name = self.folder_name
        if not folder_name.isascii():
            folder_name = email.header.Header(folder_name, "utf-8").encode()
        lines = [
            (INCIDENT_HEADER, self.incident),
            (ORIGINAL_MAILBOX_HEADER, self.mailbox),
            (ORIGINAL_FOLDER_ID_HEADER, self.folder_id),
            (ORIGINAL_FOLDER_HEADER, folder_name),
            (ORIGINAL_READ_HEADER, "true" if self.read else "false"),
        ]
        for _, value in lines:
            _check_header_value(value, "marker header value")
        return "".join(f"{name}: {value}\r\n" for name, value in lines).encode("ascii")

    @classmethod
    def from_headers(
        cls, headers: Iterable[tuple[str, str]]
    ) -> QuarantineMarker | None:
        """Read a marker, or None when a header is missing. First occurrences count."""
        found: dict[str, str] = {}
        for name, value in headers:
            found.setdefault(name.lower(), value.strip())
        try:
            folder_name = str(
                email.header.make_header(
                    email.header.decode_header(found[ORIGINAL_FOLDER_HEADER.lower()])
                )
            )
            return cls(
                incident=found[INCIDENT_HEADER.lower()],
                mailbox=found[ORIGINAL_MAILBOX_HEADER.lower()].lower(),
                folder_id=found[ORIGINAL_FOLDER_ID_HEADER.lower()],
                folder_name=folder_name,
                read=found[ORIGINAL_READ_HEADER.lower()].lower() == "true",
            )
        except (KeyError, LookupError, ValueError):
            return None


def strip_marker_headers(mime: bytes) -> bytes:
    """Remove the first occurrence of each marker header from the top header block.

    Later occurrences stay: they came with the message itself, as a forgery or
    from an earlier quarantine.
    """
    end = mime.find(b"\r\n\r\n")
    if end < 0:
        end = mime.find(b"\n\n")
    head, body = (mime, b"") if end < 0 else (mime[:end], mime[end:])
    lines = head.split(b"\n")
    wanted = {name.lower().encode("ascii") for name in MARKER_HEADERS}
    kept: list[bytes] = []
    skipping = False
    for line in lines:
        if skipping and line[:1] in (b" ", b"\t"):
            continue
        skipping = False
        name = line.split(b":", 1)[0].strip().lower()
        if b":" in line and name in wanted:
            wanted.discard(name)
            skipping = True
            continue
        kept.append(line)
    return b"\n".join(kept) + body


# --- the adapter --------------------------------------------------------------------


@dataclass(frozen=True)
class _Copy:
    """One copy of the message as EWS reports it, with its marker if it has one."""

    item_id: str
    changekey: str | None
    folder_id: str
    folder_name: str
    read: bool
    subject: str | None
    received_at: datetime | None
    marker: QuarantineMarker | None = None

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
        """Describe a quarantined copy as it was before quarantine, from its marker."""
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


@dataclass
class _Job:
    """One quarantine, restore or find: its ids and the retries it needed."""

    mailbox: str
    bare: str
    retries: int = 0


# The gate of the mailbox whose step this worker thread runs.
_step_gate = threading.local()


def _run_step(gate: _Gate, step: Callable[[], T]) -> T:
    _step_gate.gate = gate
    try:
        return step()
    finally:
        _step_gate.gate = None


@dataclass
class _Gate:
    """The requests in flight for one mailbox and the back-off it must wait out.

    `clock` is the event loop's time, so that waits and back-offs agree on one clock.
    """

    slots: asyncio.Semaphore
    clock: Callable[[], float]
    paused_until: float = 0.0

    def remaining(self) -> float:
        return max(0.0, self.paused_until - self.clock())

    def pause(self, seconds: float) -> None:
        self.paused_until = max(self.paused_until, self.clock() + seconds)


@dataclass
class _Mailbox:
    """An impersonated mailbox: its exchangelib account, root and msgfolderroot."""

    account: Any
    root: Any
    top: Any = None


class EwsPlatform(MailPlatform):
    """Find, quarantine and restore messages in Exchange mailboxes through EWS."""

    name = PLATFORM

    def __init__(self, settings: EwsSettings) -> None:
        self.settings = settings
        build = settings.server_build
        version = (
            Version(build=Build(*(int(part) for part in build.split("."))))
            if build
            else None
        )
        self._config = Configuration(
            service_endpoint=settings.service_endpoint,
            credentials=Credentials(
                settings.username, settings.password.get_secret_value()
            ),
            auth_type=BASIC,
            version=version,
            retry_policy=FailFastWithRetryAfter(),
            max_connections=settings.max_connections,
        )
        self._protocol = self._own_protocol()
        self._executor = ThreadPoolExecutor(
            max_workers=settings.max_connections, thread_name_prefix="ews"
        )
        self._gates: dict[str, _Gate] = {}
        self._mailboxes: dict[str, _Mailbox] = {}
        self._quarantine_root: Any = None
        self._incident_folders: dict[str, Any] = {}
        self._incident_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )

    def _own_protocol(self) -> Any:
        """Return a protocol object built from this adapter's configuration.

        exchangelib caches one protocol per endpoint and credentials. A cached one
        from an earlier adapter carries that adapter's policy, so it is replaced.
        """
        protocol = FixedPoolProtocol(config=self._config)
        if protocol.config is not self._config or not isinstance(
            protocol, FixedPoolProtocol
        ):
            with suppress(KeyError):
                del Protocol[self._config]
            protocol = FixedPoolProtocol(config=self._config)
        # An instance attribute, so only this protocol object gets the timeout.
        protocol.TIMEOUT = self.settings.request_timeout
        return protocol

    async def close(self) -> None:
        """Stop the worker threads and close this adapter's HTTP sessions."""
        await asyncio.to_thread(self._executor.shutdown, True, cancel_futures=True)
        self._protocol.close()
        with suppress(KeyError):
            del Protocol[self._config]

    # --- the MailPlatform interface -----------------------------------------------

    async def find(self, mailbox: str, message_id: str) -> list[MessageCopy]:
        """Find every copy in the mailbox's folder tree, deleted items and junk too."""
        job = _Job(mailbox.lower(), required_message_id(message_id, PLATFORM))
        copies = await self._locate(job, job.mailbox)
        return [copy.public(job.mailbox, job.bare) for copy in copies]

    async def search(self, mailbox: str, search: MessageSearch) -> list[MessageCopy]:
        """Find the copies that arrived in the window and match sender and subject.

        FindItem restricts on DateTimeReceived in every mail folder. Exchange
        compares strings without regard to case, so sender and exact subject are
        compared here.
        """
        job = _Job(mailbox.lower(), "")
        box = self._mailbox(job.mailbox)
        return await self._call(
            job, job.mailbox, lambda: _search_window_sync(box, job.mailbox, search)
        )

    async def sent_since(self, mailbox: str, since: datetime) -> list[SentMessage]:
        """List the Sent Items of `mailbox` sent at or after `since`, with MIME."""
        job = _Job(mailbox.lower(), "")
        box = self._mailbox(job.mailbox)
        found = await self._call(job, job.mailbox, partial(_sent_sync, box, since))
        sent = []
        for mime, sent_at in found:
            parsed = sent_message_from_mime(job.mailbox, mime, sent_at)
            if parsed is not None:
                sent.append(parsed)
        logger.info(
            "Listed sent messages mailbox=%s since=%s count=%d",
            job.mailbox,
            since.isoformat(),
            len(sent),
        )
        return sent

    async def message_trace(self, message_id: str, since: datetime) -> list[TraceEvent]:
        """Return the tracking log rows of `message_id` and its rule-made messages.

        The rows come from the files in `tracking_log_dir`; without that setting
        Exchange has no trace to read here.
        """
        folder = self.settings.tracking_log_dir
        if folder is None:
            return []
        logs = TrackingLogDirectory(folder)
        return await asyncio.to_thread(logs.events, message_id, since)

    async def forwarding_rules(self, mailbox: str) -> list[ForwardingRule]:
        """Return the enabled inbox rules of `mailbox` that redirect or forward mail.

        GetInboxRules runs as the impersonated mailbox. Each redirect, forward and
        forward-as-attachment action of an enabled rule gives one ForwardingRule
        with its SMTP targets.
        """
        job = _Job(mailbox.lower(), "")
        box = self._mailbox(job.mailbox)
        rules = await self._call(job, job.mailbox, partial(_rules_sync, box))
        found = [
            forwarding
            for rule in rules
            if rule.is_enabled is not False and rule.actions is not None
            for forwarding in _forwarding_actions(job.mailbox, rule.actions)
        ]
        logger.info(
            "Read inbox rules mailbox=%s rules=%d forwarding=%d",
            job.mailbox,
            len(rules),
            len(found),
        )
        return found

    async def quarantine(
        self, mailbox: str, message_id: str, incident_id: str
    ) -> QuarantineResult:
        """Quarantine every copy of a message in one mailbox.

        Step 1 finds the copies. Step 2 exports each copy's MIME and puts the
        marker headers in front. Step 3 stores it in the incident's folder of the
        quarantine mailbox, unless a copy from that folder is already stored there.
        Step 4 verifies every stored copy by Message-ID and marker, and step 5
        deletes the originals. A crash between steps leaves the original or its
        stored copy or both, so running the quarantine again finishes the work
        without a second copy.
        """
        job = _Job(mailbox.lower(), required_message_id(message_id, PLATFORM))
        _check_header_value(incident_id, "incident id")

        # Step 1: find every copy, and the copies an earlier run stored already.
        originals = await self._locate(job, job.mailbox)
        stored = await self._stored_copies(job, incident_id, create=False)
        if not originals:
            return await self._nothing_left(job, incident_id, stored)

        try:
            # Steps 2 and 3: export each copy that has no stored copy yet, store it.
            pending = _unmatched(originals, stored)
            for copy in pending:
                await self._store_copy(job, copy, incident_id)

            # Step 4: verify that the incident folder holds a copy of each original.
            await self._verify_stored(job, incident_id, originals)
        except NotFoundError as exc:
            # A copy or a cached folder moved or vanished after step 1. A new run
            # finds the copies again and looks the folders up afresh.
            self._forget_folders(job.mailbox, incident_id)
            raise TransientError(
                f"A copy of <{job.bare}> in mailbox {job.mailbox} changed while it "
                "was being quarantined; the quarantine will be retried.",
                mailbox=job.mailbox,
                message_id=job.bare,
                platform=PLATFORM,
            ) from exc

        # Step 5: delete the originals, now that each has a verified copy.
        await self._delete(
            job, job.mailbox, [(c.item_id, c.changekey) for c in originals]
        )
        location = self._evidence_location(incident_id)
        logger.info(
            "Quarantined mailbox=%s message_id=%s incident=%s copies=%d stored=%d "
            "location=%s",
            job.mailbox,
            job.bare,
            incident_id,
            len(originals),
            len(pending),
            location,
        )
        return QuarantineResult(
            mailbox=job.mailbox,
            message_id=job.bare,
            copies=tuple(copy.public(job.mailbox, job.bare) for copy in originals),
            attempts=1 + job.retries,
            evidence_location=location,
        )

    async def restore(
        self, mailbox: str, message_id: str, incident_id: str
    ) -> QuarantineResult:
        """Put the copies this incident quarantined back where they were.

        Step 1 finds the stored copies of this mailbox and incident. Step 2 creates
        each again in its original folder (the inbox when that folder is gone) with
        its read state, unless an interrupted restore already did. Step 3 verifies
        the restored copies and step 4 deletes the stored ones.
        """
        job = _Job(mailbox.lower(), required_message_id(message_id, PLATFORM))

        # Step 1: the stored copies, and what the mailbox holds now.
        stored = await self._stored_copies(job, incident_id, create=False)
        present = await self._locate(job, job.mailbox)
        if not stored:
            if present:
                return QuarantineResult(
                    mailbox=job.mailbox,
                    message_id=job.bare,
                    copies=tuple(c.public(job.mailbox, job.bare) for c in present),
                    already_done=True,
                    attempts=1 + job.retries,
                )
            raise NotFoundError(
                f"Mailbox {job.mailbox} has no copy of <{job.bare}> to restore, and "
                f"incident {incident_id} stored none.",
                mailbox=job.mailbox,
                message_id=job.bare,
                platform=PLATFORM,
            )

        # Steps 2 and 3: recreate what is missing in each folder, then verify.
        restored: list[MessageCopy] = []
        notes: list[str] = []
        try:
            for copies in _by_original_folder(stored).values():
                restored.extend(await self._restore_folder(job, copies, present, notes))
        except NotFoundError as exc:
            self._forget_folders(job.mailbox, incident_id)
            raise TransientError(
                f"A stored copy of <{job.bare}> for mailbox {job.mailbox} changed "
                "while it was being restored; the restore will be retried.",
                mailbox=job.mailbox,
                message_id=job.bare,
                platform=PLATFORM,
            ) from exc

        # Step 4: the restored copies are verified, so the stored ones can go.
        quarantine = self.settings.quarantine_mailbox
        await self._delete(job, quarantine, [(c.item_id, c.changekey) for c in stored])
        logger.info(
            "Restored mailbox=%s message_id=%s incident=%s copies=%d",
            job.mailbox,
            job.bare,
            incident_id,
            len(restored),
        )
        return QuarantineResult(
            mailbox=job.mailbox,
            message_id=job.bare,
            copies=tuple(restored),
            attempts=1 + job.retries,
            notes=tuple(notes),
        )

    # --- finding ------------------------------------------------------------------

    async def _locate(self, job: _Job, mailbox: str) -> list[_Copy]:
        """List every copy in the folder tree below msgfolderroot, with read state."""
        box = self._mailbox(mailbox)
        return await self._call(
            job, mailbox, lambda: _locate_sync(box, job.bare, COPY_FIELDS)
        )

    async def _stored_copies(
        self, job: _Job, incident_id: str, *, create: bool = True
    ) -> list[_Copy]:
        """List the copies of this mailbox stored for the incident, with markers."""
        folder = await self._incident_folder(job, incident_id, create=create)
        if folder is None:
            return []
        box = self._mailbox(self.settings.quarantine_mailbox)
        copies = await self._call(
            job,
            box.account.primary_smtp_address,
            lambda: _search_sync(box, [folder], job.bare, STORED_FIELDS),
        )
        return [
            copy
            for copy in copies
            if copy.marker is not None
            and copy.marker.incident == incident_id
            and copy.marker.mailbox == job.mailbox
        ]

    async def _nothing_left(
        self, job: _Job, incident_id: str, stored: list[_Copy]
    ) -> QuarantineResult:
        """Answer a quarantine that found no original: done before, or not found."""
        if not stored:
            stored = await self._stored_elsewhere(job)
        if not stored:
            raise NotFoundError(
                f"Mailbox {job.mailbox} has no copy of <{job.bare}>, in or out of "
                "quarantine.",
                mailbox=job.mailbox,
                message_id=job.bare,
                platform=PLATFORM,
            )
        logger.info(
            "Already quarantined mailbox=%s message_id=%s incident=%s copies=%d",
            job.mailbox,
            job.bare,
            incident_id,
            len(stored),
        )
        return QuarantineResult(
            mailbox=job.mailbox,
            message_id=job.bare,
            copies=tuple(copy.original(job.mailbox, job.bare) for copy in stored),
            already_done=True,
            attempts=1 + job.retries,
            evidence_location=self._evidence_location(incident_id),
        )

    async def _stored_elsewhere(self, job: _Job) -> list[_Copy]:
        """Find copies of this mailbox stored for any incident.

        NOTE: this searches every incident folder in one FindItem, whose request
        grows with the number of incident folders. It runs only when a quarantine
        finds no original, which is rare.
        """
        box = self._mailbox(self.settings.quarantine_mailbox)
        container = await self._quarantine_container(job)
        copies = await self._call(
            job,
            box.account.primary_smtp_address,
            lambda: _search_below_sync(box, container, job.bare),
        )
        return [c for c in copies if c.marker and c.marker.mailbox == job.mailbox]

    # --- storing and verifying ------------------------------------------------------

    async def _store_copy(self, job: _Job, copy: _Copy, incident_id: str) -> None:
        """Export one original's MIME, mark it and store it in the incident folder."""
        user = self._mailbox(job.mailbox)
        mime = await self._call(
            job, job.mailbox, lambda: _mime_sync(user, copy.item_id, copy.changekey)
        )
        marker = QuarantineMarker(
            incident=incident_id,
            mailbox=job.mailbox,
            folder_id=copy.folder_id,
            folder_name=copy.folder_name,
            read=copy.read,
        )
        folder = await self._incident_folder(job, incident_id, create=True)
        quarantine = self._mailbox(self.settings.quarantine_mailbox)
        await self._call(
            job,
            self.settings.quarantine_mailbox,
            lambda: _create_sync(
                quarantine, folder, marker.headers() + mime, copy.read
            ),
        )
        logger.info(
            "Stored a copy mailbox=%s message_id=%s incident=%s folder=%s",
            job.mailbox,
            job.bare,
            incident_id,
            copy.folder_name,
        )

    async def _verify_stored(
        self, job: _Job, incident_id: str, originals: list[_Copy]
    ) -> None:
        stored = await self._stored_copies(job, incident_id)
        if _unmatched(originals, stored):
            raise TransientError(
                f"The quarantine folder {incident_id!r} of mailbox "
                f"{self.settings.quarantine_mailbox} lacks a stored copy of "
                f"<{job.bare}> from mailbox {job.mailbox}; the originals were not "
                "deleted, and the quarantine will be retried.",
                mailbox=job.mailbox,
                message_id=job.bare,
                platform=PLATFORM,
            )

    async def _delete(
        self, job: _Job, mailbox: str, ids: list[tuple[str, str | None]]
    ) -> None:
        if not ids:
            return
        box = self._mailbox(mailbox)
        await self._call(job, mailbox, lambda: _delete_sync(box, ids))

    # --- restoring ----------------------------------------------------------------

    async def _restore_folder(
        self,
        job: _Job,
        copies: list[_Copy],
        present: list[_Copy],
        notes: list[str],
    ) -> list[MessageCopy]:
        """Recreate the stored copies of one original folder that are missing there."""
        marker = copies[0].marker
        assert marker is not None
        user = self._mailbox(job.mailbox)
        target = await self._call(
            job, job.mailbox, lambda: _folder_or_inbox_sync(user, marker.folder_id)
        )
        if target.id != marker.folder_id:
            notes.append(
                f"Folder {marker.folder_name!r} is gone, so the copy went to the inbox."
            )
        there = sum(1 for copy in present if copy.folder_id == target.id)
        missing = copies[there:]
        quarantine = self._mailbox(self.settings.quarantine_mailbox)
        restored: list[MessageCopy] = []
        for copy in missing:
            mime = await self._call(
                job,
                self.settings.quarantine_mailbox,
                partial(_mime_sync, quarantine, copy.item_id, copy.changekey),
            )
            read = copy.marker.read if copy.marker else False
            item_id = await self._call(
                job,
                job.mailbox,
                partial(_create_sync, user, target, strip_marker_headers(mime), read),
            )
            restored.append(
                MessageCopy(
                    mailbox=job.mailbox,
                    message_id=job.bare,
                    item_id=item_id,
                    folder=str(target.name or marker.folder_name),
                    read=read,
                    subject=copy.subject,
                    received_at=copy.received_at,
                )
            )
        await self._verify_restored(job, target.id, len(copies))
        return restored

    async def _verify_restored(self, job: _Job, folder_id: str, expected: int) -> None:
        present = await self._locate(job, job.mailbox)
        found = sum(1 for copy in present if copy.folder_id == folder_id)
        if found < expected:
            raise TransientError(
                f"Restore of <{job.bare}> in mailbox {job.mailbox} found {found} of "
                f"{expected} copies in their folder; the stored copies were kept, "
                "and the restore will be retried.",
                mailbox=job.mailbox,
                message_id=job.bare,
                platform=PLATFORM,
            )

    # --- folders ------------------------------------------------------------------

    async def _quarantine_container(self, job: _Job) -> Any:
        """Return the quarantine mailbox's folder of incident folders, creating it."""
        if self._quarantine_root is None:
            box = self._mailbox(self.settings.quarantine_mailbox)
            name = self.settings.quarantine_folder
            self._quarantine_root = await self._call(
                job,
                self.settings.quarantine_mailbox,
                lambda: _child_folder_sync(box, None, name, create=True),
            )
        return self._quarantine_root

    async def _incident_folder(
        self, job: _Job, incident_id: str, *, create: bool
    ) -> Any:
        """Return the incident's folder, creating it when `create` is true.

        A lock per incident keeps this process from creating the folder twice;
        another worker that wins the race makes CreateFolder answer
        ErrorFolderExists, and then its folder is used.
        """
        lock = self._incident_locks.get(incident_id)
        if lock is None:
            lock = asyncio.Lock()
            self._incident_locks[incident_id] = lock
        async with lock:
            if incident_id in self._incident_folders:
                return self._incident_folders[incident_id]
            container = await self._quarantine_container(job)
            box = self._mailbox(self.settings.quarantine_mailbox)
            folder = await self._call(
                job,
                self.settings.quarantine_mailbox,
                lambda: _child_folder_sync(box, container, incident_id, create=create),
            )
            if folder is not None:
                self._incident_folders[incident_id] = folder
            return folder

    def _forget_folders(self, mailbox: str, incident_id: str) -> None:
        self._incident_folders.pop(incident_id, None)
        self._quarantine_root = None
        self._mailboxes.pop(mailbox, None)

    def _evidence_location(self, incident_id: str) -> str:
        return (
            f"{self.settings.quarantine_mailbox}/{self.settings.quarantine_folder}/"
            f"{incident_id}"
        )

    def _mailbox(self, address: str) -> _Mailbox:
        """Return the impersonated account of a mailbox; creating one sends nothing."""
        key = address.lower()
        box = self._mailboxes.get(key)
        if box is None:
            try:
                account = Account(
                    primary_smtp_address=key,
                    config=self._config,
                    autodiscover=False,
                    access_type=IMPERSONATION,
                    default_timezone=EWS_UTC,
                    locale="en_US",
                )
            except ValueError as exc:
                raise PermanentError(
                    f"The mailbox {address!r} is not an email address; fix the "
                    "routing or the alert.",
                    mailbox=address,
                    platform=PLATFORM,
                ) from exc
            root = Root(
                account=account,
                _distinguished_id=DistinguishedFolderId(
                    id=Root.DISTINGUISHED_FOLDER_ID,
                    mailbox=Mailbox(email_address=key),
                ),
            )
            box = _Mailbox(account=account, root=root)
            self._mailboxes[key] = box
        return box

    # --- the error boundary -------------------------------------------------------

    def _gate(self, mailbox: str) -> _Gate:
        key = mailbox.lower()
        if key not in self._gates:
            limit = self.settings.max_concurrency_per_mailbox
            clock = asyncio.get_running_loop().time
            self._gates[key] = _Gate(asyncio.Semaphore(limit), clock)
        return self._gates[key]

    async def _call(self, job: _Job, mailbox: str, step: Callable[[], T]) -> T:
        """Run one blocking exchangelib step for a mailbox and map its errors.

        The step runs in the thread pool within the mailbox's request slots. After
        ErrorServerBusy, or a 503 with Retry-After, the mailbox pauses for the
        server's wait. A request that got its slot during a pause waits it out
        before it is sent. The step is tried again after a wait of up to
        `max_back_off_wait`, `max_attempts` times in all, and a longer wait raises
        the mapped error at once.
        """
        gate = self._gate(mailbox)
        loop = asyncio.get_running_loop()
        for attempt in range(1, self.settings.max_attempts + 1):
            async with gate.slots:
                # A pause can begin while this request waits for its slot.
                await self._wait_out_back_off(gate, mailbox, job)
                try:
                    return await loop.run_in_executor(
                        self._executor, _run_step, gate, step
                    )
                except Exception as exc:  # the one place foreign errors are mapped
                    error = self._mapped(exc, mailbox, job)
                    cause = exc
            retry_after = error.retry_after if isinstance(error, TransientError) else 0
            if not retry_after:
                raise error from cause
            gate.pause(retry_after)
            if (
                attempt == self.settings.max_attempts
                or retry_after > self.settings.max_back_off_wait
            ):
                raise error from cause
            job.retries += 1
            logger.warning(
                "Exchange asked to wait mailbox=%s message_id=%s wait=%.3f attempt=%d "
                "error_class=%s",
                mailbox,
                job.bare,
                retry_after,
                attempt,
                type(error).__name__,
            )
        raise AssertionError("unreachable")

    async def _wait_out_back_off(self, gate: _Gate, mailbox: str, job: _Job) -> None:
        # Requests sent before a pause began can extend it while this one sleeps.
        while (remaining := gate.remaining()) > 0:
            if remaining > self.settings.max_back_off_wait:
                raise ThrottledError(
                    f"Mailbox {mailbox} must wait {remaining:.1f} s more before its "
                    "next EWS request, as Exchange asked; the request is parked "
                    "until then.",
                    retry_after=remaining,
                    mailbox=mailbox,
                    message_id=job.bare,
                    platform=PLATFORM,
                )
            await asyncio.sleep(remaining)

    def _mapped(self, exc: Exception, mailbox: str, job: _Job) -> ConnectorError:
        quarantine = self.settings.quarantine_mailbox
        if (
            isinstance(exc, ews_errors.ErrorNonExistentMailbox)
            and mailbox == quarantine
        ):
            return PermanentError(
                f"The quarantine mailbox {quarantine} does not exist on Exchange; "
                "check quarantine_mailbox in the EWS settings.",
                mailbox=quarantine,
                message_id=job.bare,
                platform=PLATFORM,
            )
        return map_ews_error(exc, mailbox=mailbox, message_id=job.bare)


# --- blocking steps, run in the thread pool -----------------------------------------


def _checked(results: Iterable[Any]) -> list[Any]:
    """Collect exchangelib results, raising the first exception object among them."""
    collected = []
    for result in results:
        if isinstance(result, Exception):
            raise result
        collected.append(result)
    return collected


def _is_mail_folder(folder: Any) -> bool:
    folder_class = folder.folder_class
    return folder_class is None or str(folder_class).startswith("IPF.Note")


def _mail_folders_sync(box: _Mailbox) -> list[Any]:
    """Return msgfolderroot and every mail folder below it (FindFolder Deep)."""
    if box.top is None:
        box.top = MsgFolderRoot.get_distinguished(root=box.root)
    below = _checked(
        FolderCollection(account=box.account, folders=[box.top]).find_folders(
            depth=DEEP
        )
    )
    return [box.top, *(f for f in below if _is_mail_folder(f))]


def _locate_sync(box: _Mailbox, bare: str, fields: tuple[str, ...]) -> list[_Copy]:
    return _search_sync(box, _mail_folders_sync(box), bare, fields)


def _search_sync(
    box: _Mailbox, folders: list[Any], bare: str, fields: tuple[str, ...]
) -> list[_Copy]:
    """FindItem over the folders for `<bare>`, then GetItem; exact matches only."""
    names = {str(f.id): str(f.name or "") for f in folders}
    collection = FolderCollection(account=box.account, folders=folders)
    ids = _checked(
        collection.find_items(Q(message_id=f"<{bare}>"), shape=ID_ONLY, depth=SHALLOW)
    )
    if not ids:
        return []
    messages = box.account.fetch(
        ids=ids, folder=Folder(root=box.root), only_fields=list(fields)
    )
    copies = []
    for message in _checked(messages):
        if not _same_message_id(message.message_id, bare):
            continue
        folder_id = str(message.parent_folder_id.id) if message.parent_folder_id else ""
        headers = getattr(message, "headers", None) or []
        copies.append(
            _Copy(
                item_id=str(message.id),
                changekey=message.changekey,
                folder_id=folder_id,
                folder_name=names.get(folder_id, ""),
                read=bool(message.is_read),
                subject=message.subject,
                received_at=message.datetime_received,
                marker=QuarantineMarker.from_headers(
                    (str(h.name), str(h.value or "")) for h in headers
                ),
            )
        )
    return copies


def _search_window_sync(
    box: _Mailbox, mailbox: str, search: MessageSearch
) -> list[MessageCopy]:
    """FindItem over every mail folder for the arrival window, then GetItem."""
    folders = _mail_folders_sync(box)
    names = {str(f.id): str(f.name or "") for f in folders}
    window = Q(
        datetime_received__gte=EWSDateTime.from_datetime(search.received_after)
    ) & Q(datetime_received__lte=EWSDateTime.from_datetime(search.received_before))
    collection = FolderCollection(account=box.account, folders=folders)
    ids = _checked(collection.find_items(window, shape=ID_ONLY, depth=SHALLOW))
    if not ids:
        return []
    fields = [*COPY_FIELDS, "author", "sender"]
    messages = box.account.fetch(
        ids=ids, folder=Folder(root=box.root), only_fields=fields
    )

    copies = []
    for message in _checked(messages):
        sender = _matching_sender(message, search)
        if sender is None:
            continue
        folder_id = str(message.parent_folder_id.id) if message.parent_folder_id else ""
        copies.append(
            MessageCopy(
                mailbox=mailbox,
                message_id=_bare(message.message_id),
                item_id=str(message.id),
                folder=names.get(folder_id, ""),
                read=bool(message.is_read),
                subject=message.subject,
                received_at=message.datetime_received,
                sender=sender,
            )
        )
    return copies


def _matching_sender(message: Any, search: MessageSearch) -> str | None:
    """Return the From or Sender address by which `message` matches, else None."""
    for person in (message.author, message.sender):
        address = (getattr(person, "email_address", None) or "").strip().lower()
        if search.matches(address, message.subject, message.datetime_received):
            return address
    return None


def _bare(message_id: str | None) -> str:
    text = (message_id or "").strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1].strip()
    return text


def _search_below_sync(box: _Mailbox, container: Any, bare: str) -> list[_Copy]:
    below = _checked(
        FolderCollection(account=box.account, folders=[container]).find_folders(
            depth=DEEP
        )
    )
    return _search_sync(box, [container, *below], bare, STORED_FIELDS)


def _sent_sync(box: _Mailbox, since: datetime) -> list[tuple[bytes, datetime | None]]:
    """FindItem in Sent Items on DateTimeSent, then GetItem for each MIME."""
    folder = SentItems.get_distinguished(root=box.root)
    start = since.astimezone(EWS_UTC)
    query = folder.filter(datetime_sent__gte=start).only(
        "mime_content", "datetime_sent"
    )
    found = []
    for item in _checked(query):
        if item.mime_content:
            found.append((bytes(item.mime_content), item.datetime_sent))
    return found


def _rules_sync(box: _Mailbox) -> list[Any]:
    """Read the mailbox's inbox rules with GetInboxRules."""
    return _checked(box.account.rules)


def _forwarding_actions(mailbox: str, actions: Any) -> list[ForwardingRule]:
    """Return one ForwardingRule per action of `actions` that sends mail on.

    NOTE: a target without an @ (routing type EX, a legacy Exchange DN) is
    skipped, because routing and tracing work on SMTP addresses.
    """
    rules = []
    for kind, field_name in FORWARDING_ACTIONS:
        targets = tuple(
            address.email_address.strip().lower()
            for address in getattr(actions, field_name) or []
            if address.email_address and "@" in address.email_address
        )
        if targets:
            rules.append(ForwardingRule(mailbox, targets, kind))
    return rules


def _mime_sync(box: _Mailbox, item_id: str, changekey: str | None) -> bytes:
    """Read one item's MIME with GetItem."""
    folder = Folder(root=box.root)
    items = _checked(
        box.account.fetch(
            ids=[(item_id, changekey)], folder=folder, only_fields=["mime_content"]
        )
    )
    if not items or not items[0].mime_content:
        raise ews_errors.ErrorItemNotFound(f"Item {item_id} returned no MIME content.")
    return bytes(items[0].mime_content)


def _create_sync(box: _Mailbox, folder: Any, mime: bytes, read: bool) -> str:
    """Store MIME as a sent (not draft) message in a folder; return its item id."""
    message = Message(
        account=box.account,
        folder=folder,
        mime_content=mime,
        is_read=read,
        message_flags=MSGFLAG_READ if read else 0,
    )
    results = _checked(
        box.account.bulk_create(
            folder=folder, items=[message], message_disposition=SAVE_ONLY
        )
    )
    return str(results[0].id)


def _delete_sync(box: _Mailbox, ids: list[tuple[str, str | None]]) -> None:
    """HardDelete items; an item that is already gone counts as deleted."""
    results = box.account.bulk_delete(ids=ids, delete_type=HARD_DELETE)
    for result in results:
        if isinstance(result, ews_errors.ErrorItemNotFound):
            continue
        if isinstance(result, Exception):
            raise result


def _child_folder_sync(box: _Mailbox, parent: Any, name: str, *, create: bool) -> Any:
    """Find a child folder by display name, creating it when asked and absent."""
    if parent is None:
        if box.top is None:
            box.top = MsgFolderRoot.get_distinguished(root=box.root)
        parent = box.top
    found = _named_child_sync(box, parent, name)
    if found is not None or not create:
        return found
    draft = Folder(parent=parent, name=name, folder_class="IPF.Note")
    try:
        return CreateFolder(account=box.account).get(
            parent_folder=parent, folders=[draft]
        )
    except ews_errors.ErrorFolderExists:
        # Another worker created it first, so this one uses theirs.
        logger.warning("Folder exists already mailbox=%s folder=%s", box.account, name)
        found = _named_child_sync(box, parent, name)
        if found is None:
            raise
        return found


def _named_child_sync(box: _Mailbox, parent: Any, name: str) -> Any:
    children = _checked(
        FolderCollection(account=box.account, folders=[parent]).find_folders(
            q=Q(name=name), depth=SHALLOW
        )
    )
    for child in children:
        if str(child.name or "").lower() == name.lower():
            return child
    return None


def _folder_or_inbox_sync(box: _Mailbox, folder_id: str) -> Any:
    """Return the folder with that id, or the inbox when it no longer exists."""
    reference = Folder(root=box.root, id=folder_id)
    results = list(FolderCollection(account=box.account, folders=[reference]).resolve())
    if not results or isinstance(results[0], MISSING_ERRORS):
        return Inbox.get_distinguished(root=box.root)
    return _checked(results)[0]


# --- helpers ------------------------------------------------------------------------


def _unmatched(originals: list[_Copy], stored: list[_Copy]) -> list[_Copy]:
    """Return the originals without a stored copy from the same folder."""
    available = Counter(c.marker.folder_id for c in stored if c.marker is not None)
    missing = []
    for copy in originals:
        if available[copy.folder_id] > 0:
            available[copy.folder_id] -= 1
        else:
            missing.append(copy)
    return missing


def _by_original_folder(stored: list[_Copy]) -> dict[str, list[_Copy]]:
    groups: dict[str, list[_Copy]] = {}
    for copy in stored:
        assert copy.marker is not None
        groups.setdefault(copy.marker.folder_id, []).append(copy)
    return groups


def _same_message_id(found: str | None, bare: str) -> bool:
    """Compare a Message-ID from EWS with a bare one, exactly, brackets aside."""
    text = (found or "").strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1].strip()
    return text == bare


def _check_header_value(value: str, what: str) -> None:
    if "\r" in value or "\n" in value or not value.strip() or not value.isascii():
        raise PermanentError(
            f"The {what} {value!r} is empty, not ASCII or contains a line break, so "
            "it cannot go into a mail header; fix the value.",
            platform=PLATFORM,
        )
