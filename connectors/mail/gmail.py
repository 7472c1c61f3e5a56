"""The Gmail adapter: the Gmail API through google-api-python-client.

The adapter signs in as a service account with domain-wide delegation: google-auth
signs a JWT with the account's private key, names the mailbox as `sub`, and trades
it at `token_uri` for a token that works for that one mailbox.

A quarantine records how each copy was labelled, copies the message into the
quarantine mailbox, verifies the copy, then trashes or deletes the original. Gmail
has no cross-mailbox move, and a label carries no data, so the record is a hidden
label in the user's mailbox whose name carries the incident, a digest of the
Message-ID and the original label ids with the read state (UNREAD), for example
`Autopull INC-7 3f2a9c1b2d4e INBOX,STARRED,UNREAD`. The label sits on the original
while it is in the trash and survives a delete, so a restore, or a retry after a
crash, finds what was done on the platform itself. The quarantine mailbox gets one
imported copy per distinct message and incident, labelled `Autopull/INC-7`, with
headers that name the incident and the first original mailbox.

google-api-python-client is synchronous (httplib2), so requests run in a thread
pool, each thread with its own connection, and with a bounded number of requests
per mailbox. Every error of googleapiclient, google-auth and httplib2 is translated
in one place, `map_gmail_error`, and no foreign exception leaves this module.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.utils
import hashlib
import http.client
import itertools
import json
import logging
import math
import re
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from typing import Any, Literal

import google.auth.exceptions
import google_auth_httplib2
import httplib2
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from google.oauth2 import service_account
from googleapiclient import errors as api_errors
from googleapiclient.discovery import build
from googleapiclient.http import BatchHttpRequest, HttpRequest
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
)

from ..errors import (
    AlreadyDoneError,
    ConnectorError,
    NotFoundError,
    PermanentError,
    ThrottledError,
    TransientError,
)
from .base import (
    MailPlatform,
    MessageCopy,
    MessageSearch,
    QuarantineResult,
    SentMessage,
    required_message_id,
)
from .mime import sent_message_from_mime

logger = logging.getLogger(__name__)

PLATFORM = "gmail"
INCIDENT_HEADER = "X-Autopull-Incident"
ORIGINAL_MAILBOX_HEADER = "X-Autopull-Original-Mailbox"
# Gmail refuses batchModify and batchDelete with more than 1000 ids.
MAX_BATCH_IDS = 1000
# Reasons of 403 and 429 responses that mean "slow down", not "denied".
RATE_LIMIT_REASONS = frozenset(
    {
        "rateLimitExceeded",
        "userRateLimitExceeded",
        "quotaExceeded",
        "dailyLimitExceeded",
    }
)
SYSTEM_LABELS = frozenset(
    {
        "INBOX",
        "SPAM",
        "TRASH",
        "UNREAD",
        "STARRED",
        "IMPORTANT",
        "SENT",
        "DRAFT",
        "CHAT",
        "CATEGORY_PERSONAL",
        "CATEGORY_SOCIAL",
        "CATEGORY_PROMOTIONS",
        "CATEGORY_UPDATES",
        "CATEGORY_FORUMS",
    }
)
_RETRY_AT = re.compile(r"Retry after (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z)")
# Stands for an empty label set (an archived, read copy) in a record label's name.
NO_LABELS = "-"
_INCIDENT_SHAPE = re.compile(r"[^\s,/\"]+")

# Gmail's published limits that size a burst: an HTTP batch takes at most 100
# parts, and one project may spend 1,200,000 quota units a minute.
MAX_BATCH_PARTS = 100
PROJECT_UNITS_PER_MINUTE = 1_200_000
# A burst spends per mailbox: messages.list 5, labels.list 1, messages.get 5,
# labels.create 5, messages.modify 5, messages.trash 5 and messages.get 5.
BURST_UNITS_PER_MAILBOX = 31
# A phase sends at most 2 parts per mailbox. These threads send the largest phase
# of the mailboxes one minute of project quota covers (38,709) at once, in
# batches of 100. A larger burst would run out of project quota anyway.
DEFAULT_THREADS = math.ceil(
    PROJECT_UNITS_PER_MINUTE / BURST_UNITS_PER_MAILBOX * 2 / MAX_BATCH_PARTS
)


class GmailSettings(BaseModel):
    """Settings of the Gmail adapter: a service account with domain-wide delegation.

    The account's numeric `client_id` must be allowed the `scopes` in the Google
    Workspace admin console. A throttled or failed request is retried
    `request_retries` times, after the Retry-After wait when that is at most
    `max_retry_wait` seconds. A longer wait goes to the pull, which parks the
    command.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    api_url: str = Field(
        default="https://gmail.googleapis.com/",
        description="Base URL of the Gmail API (or a simulator).",
    )
    token_uri: str = Field(
        default="https://oauth2.googleapis.com/token",
        description="OAuth2 token endpoint the signed JWT is sent to.",
    )
    service_account_email: str = Field(description="The service account's address.")
    client_id: str = Field(
        description="The service account's numeric client id that domain-wide "
        "delegation is granted to."
    )
    private_key: SecretStr = Field(
        description="The service account's PEM private key (from its JSON key file)."
    )
    private_key_id: str | None = Field(
        default=None, description="Id of the private key, sent as the JWT's kid."
    )
    scopes: list[str] = Field(
        default_factory=lambda: ["https://mail.google.com/"],
        description="OAuth2 scopes requested; deleting originals needs "
        "https://mail.google.com/.",
    )
    quarantine_mailbox: str = Field(
        description="Mailbox that receives one copy of each quarantined message."
    )
    label_prefix: str = Field(
        default="Autopull",
        pattern=r"^[^\s,/]+$",
        description="First word of the labels the adapter creates.",
    )
    original_action: Literal["trash", "delete"] = Field(
        default="trash",
        description="What happens to an original after its copy is verified: "
        "trash (Gmail purges it after 30 days) or delete for good.",
    )
    max_concurrency_per_mailbox: int = Field(
        default=4, ge=1, description="Requests in flight per mailbox."
    )
    max_threads: int = Field(
        default=DEFAULT_THREADS,
        ge=1,
        description="Threads that run Gmail requests, each with its own connection, "
        "started as needed; a burst sends one HTTP batch per thread at once. The "
        "default sends a burst phase of up to "
        f"{DEFAULT_THREADS * MAX_BATCH_PARTS // 2:,} mailboxes at once, about as "
        f"many as Gmail's per-project quota of {PROJECT_UNITS_PER_MINUTE:,} units "
        f"a minute covers at {BURST_UNITS_PER_MAILBOX} units a mailbox.",
    )
    request_timeout: float = Field(
        default=30.0, gt=0, description="Timeout of one HTTP request, in seconds."
    )
    request_retries: int = Field(
        default=3, ge=0, description="Retries of a throttled or failed request."
    )
    max_retry_wait: float = Field(
        default=30.0,
        ge=0,
        description="Longest Retry-After waited out per request, in seconds.",
    )
    page_size: int = Field(
        default=100, ge=1, le=500, description="maxResults of each messages.list page."
    )
    batch_size: int = Field(
        default=50,
        ge=1,
        le=MAX_BATCH_PARTS,
        description="Requests per HTTP batch when many mailboxes are pulled at once; "
        "Gmail takes at most 100 and advises 50. A burst phase with more batches "
        "than max_threads packs up to 100 requests into each.",
    )

    @field_validator("private_key")
    @classmethod
    def _loadable_key(cls, key: SecretStr) -> SecretStr:
        # Checked when the settings load, so a worker with a broken key does not
        # start and report ready only to fail every pull. The error never quotes
        # the key.
        try:
            serialization.load_pem_private_key(
                key.get_secret_value().encode(), password=None
            )
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise ValueError(
                "private_key is not an unencrypted PEM private key; set it to the "
                "private_key value of the service account's JSON key file"
            ) from None
        return key


# --- error mapping --------------------------------------------------------------------


def map_gmail_error(
    exc: BaseException,
    *,
    mailbox: str | None = None,
    message_id: str | None = None,
    client_id: str | None = None,
) -> ConnectorError:
    """Translate any error of googleapiclient, google-auth or httplib2.

    Gmail responses are classified by status and reason. 429, and 403 with a rate
    limit reason, are throttling with the wait Gmail requests. 5xx and 408 are
    transient, 401 and other 403s permanent, 404 is not found, and 409 means the
    thing exists already. A rejected token request is permanent unless google-auth
    marks it retryable. Transport errors and timeouts are transient.
    """
    context: dict[str, Any] = {
        "mailbox": mailbox,
        "message_id": message_id,
        "platform": PLATFORM,
    }
    where = f"mailbox {mailbox}" if mailbox else "Gmail"
    if isinstance(exc, ConnectorError):
        return exc
    if isinstance(exc, api_errors.HttpError):
        return _map_http_error(exc, where, context)
    if isinstance(exc, google.auth.exceptions.RefreshError):
        return _map_refresh_error(exc, where, context, client_id)
    if isinstance(exc, google.auth.exceptions.TransportError | TimeoutError):
        return TransientError(
            f"A Gmail request for {where} failed in transport or timed out "
            f"({type(exc).__name__}); it will be retried.",
            **context,
        )
    if isinstance(exc, google.auth.exceptions.GoogleAuthError):
        return PermanentError(
            f"The service account credentials for {where} are unusable "
            f"({type(exc).__name__}); check service_account_email and private_key.",
            **context,
        )
    if isinstance(exc, httplib2.RelativeURIError):
        return PermanentError(
            f"A Gmail request for {where} could not be sent ({type(exc).__name__}); "
            "check api_url.",
            **context,
        )
    if isinstance(
        exc, httplib2.HttpLib2Error | http.client.HTTPException | ConnectionError
    ):
        return TransientError(
            f"A Gmail request for {where} failed in transport ({type(exc).__name__}: "
            f"{exc}); it will be retried.",
            **context,
        )
    if isinstance(exc, OSError):
        return TransientError(
            f"A Gmail request for {where} failed in transport ({type(exc).__name__}: "
            f"{exc}); it will be retried.",
            **context,
        )
    if isinstance(exc, api_errors.Error):
        return PermanentError(
            f"google-api-python-client rejected a request for {where} "
            f"({type(exc).__name__}: {exc}); the request needs fixing.",
            **context,
        )
    return PermanentError(
        f"A Gmail request for {where} failed unexpectedly ({type(exc).__name__}: "
        f"{exc}); report this as a bug if it repeats.",
        **context,
    )


def _map_http_error(
    exc: api_errors.HttpError, where: str, context: dict[str, Any]
) -> ConnectorError:
    status = int(exc.resp.status)
    reason, text = _reason_of(exc)
    retry_after = _retry_after_of(exc, text)
    detail = f"{status} {reason}: {text}" if reason else f"{status}: {text}"

    if status == 429 or (status == 403 and reason in RATE_LIMIT_REASONS):
        return ThrottledError(
            f"Gmail throttled requests for {where} ({detail}); retry after "
            f"{retry_after if retry_after is not None else 'a back-off'} s.",
            retry_after=retry_after,
            **context,
        )
    if status >= 500 or status == 408:
        error_class = ThrottledError if retry_after is not None else TransientError
        return error_class(
            f"Gmail failed a request for {where} ({detail}); it will be retried.",
            retry_after=retry_after,
            **context,
        )
    if status == 401:
        return PermanentError(
            f"Gmail rejected the access token for {where} ({detail}); check the "
            "service account and its domain-wide delegation.",
            **context,
        )
    if status == 403:
        return PermanentError(
            f"Gmail denied access to {where} ({detail}); grant the service account "
            "the needed scope through domain-wide delegation, and check that the "
            "mailbox belongs to the delegated domain.",
            **context,
        )
    if status == 404:
        return NotFoundError(f"Gmail found nothing for {where} ({detail}).", **context)
    if status == 409:
        return AlreadyDoneError(
            f"Gmail reports a conflict for {where} ({detail}).", **context
        )
    return PermanentError(
        f"Gmail rejected a request for {where} ({detail}); the request needs fixing, "
        "so it is not retried.",
        **context,
    )


def _map_refresh_error(
    exc: google.auth.exceptions.RefreshError,
    where: str,
    context: dict[str, Any],
    client_id: str | None,
) -> ConnectorError:
    # The first argument is "error: description" from the token endpoint; the
    # signed assertion is never part of it.
    summary = str(exc.args[0]) if exc.args else type(exc).__name__
    if getattr(exc, "retryable", False):
        return TransientError(
            f"The token endpoint failed for {where} ({summary}); it will be retried.",
            **context,
        )
    return PermanentError(
        f"The token endpoint rejected the token request for {where} ({summary}). "
        "Check that the "
        f"service account with client id {client_id or 'unknown'} has domain-wide "
        "delegation for the configured scopes and that the mailbox exists.",
        **context,
    )


def _reason_of(exc: api_errors.HttpError) -> tuple[str | None, str]:
    try:
        body = json.loads(exc.content)
        error = body["error"]
        reasons = [str(e.get("reason")) for e in error.get("errors", []) if e]
        return (reasons[0] if reasons else None), str(error.get("message", ""))
    except (ValueError, KeyError, TypeError, AttributeError):
        content = exc.content[:200] if isinstance(exc.content, bytes) else b""
        return None, content.decode("utf-8", errors="replace")


def _retry_after_of(exc: api_errors.HttpError, text: str) -> float | None:
    return parse_retry_after(exc.resp.get("retry-after"), text)


def parse_retry_after(
    header: str | None, message: str = "", now: datetime | None = None
) -> float | None:
    """Return the wait Gmail requests, in seconds, or None when it names none.

    The Retry-After header (seconds or an HTTP date) wins over a "Retry after
    <time>" in the error message.
    """
    reference = now or datetime.now(UTC)
    if header is not None and header.strip():
        text = header.strip()
        try:
            return max(0.0, float(text))
        except ValueError:
            pass
        try:
            moment = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError):
            moment = None
        if moment is not None:
            moment = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
            return max(0.0, (moment - reference).total_seconds())
    match = _RETRY_AT.search(message)
    if match is not None:
        moment = datetime.fromisoformat(match.group(1).replace("Z", "+00:00"))
        return max(0.0, (moment - reference).total_seconds())
    return None


# --- the copies of a message ----------------------------------------------------------


@dataclass(frozen=True)
class RecordLabel:
    """A hidden label that records how the copies it marks were labelled."""

    label_id: str
    incident: str
    digest: str
    labels: tuple[str, ...]

    @property
    def read(self) -> bool:
        return "UNREAD" not in self.labels


@dataclass(frozen=True)
class _Copy:
    gmail_id: str
    labels: tuple[str, ...]
    received_at: datetime | None
    subject: str | None


@dataclass
class _Located:
    """The copies of one message in one mailbox, and the mailbox's labels."""

    copies: list[_Copy]
    label_names: dict[str, str]
    records: list[RecordLabel] = field(default_factory=list)

    def marked_by(self, record: RecordLabel) -> list[_Copy]:
        return [c for c in self.copies if record.label_id in c.labels]


def message_digest(bare: str) -> str:
    """Return the 12 hex digits that name a Message-ID in record labels."""
    return hashlib.sha256(bare.encode("utf-8")).hexdigest()[:12]


def record_label_name(
    prefix: str, incident: str, bare: str, labels: Iterable[str]
) -> str:
    """Name the record label of an incident, a message and a label set.

    NOTE: the Gmail API reference does not state a limit on label name length.
    A copy with very many user labels may exceed it, and then its quarantine fails
    permanently with the 400 that Gmail returns.
    """
    listed = ",".join(sorted(labels)) or NO_LABELS
    return f"{prefix} {incident} {message_digest(bare)} {listed}"


def parse_record_label(prefix: str, label_id: str, name: str) -> RecordLabel | None:
    """Read a record label's name; None for any other label."""
    parts = name.split(" ")
    if len(parts) != 4 or parts[0] != prefix:
        return None
    listed = "" if parts[3] == NO_LABELS else parts[3]
    labels = tuple(label for label in listed.split(",") if label)
    return RecordLabel(label_id, parts[1], parts[2], labels)


def search_query(bare: str) -> str:
    """Build the `rfc822msgid:` search for a bare Message-ID.

    Gmail's search syntax gives parentheses, quotes and white space a meaning, so
    an id with any of them goes inside double quotes. A double quote cannot be
    escaped inside one, so an id with both a quote and such characters is rejected.
    """
    if not re.search(r'[\s()"{}]', bare):
        return f"rfc822msgid:{bare}"
    if '"' in bare:
        raise PermanentError(
            f"The Message-ID <{bare}> contains a double quote and characters that "
            "Gmail search reads as syntax, so it cannot be searched for.",
            message_id=bare,
            platform=PLATFORM,
        )
    return f'rfc822msgid:"{bare}"'


def _header(headers: Sequence[dict[str, str]], name: str) -> str | None:
    # The first occurrence wins: the adapter puts its own headers before any forged
    # copies the message itself carries.
    for header in headers:
        if str(header.get("name", "")).lower() == name.lower():
            return str(header.get("value", ""))
    return None


def _bare(message_id: str | None) -> str:
    text = (message_id or "").strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1].strip()
    return text


def _chunks(ids: Sequence[str]) -> Iterable[list[str]]:
    for start in range(0, len(ids), MAX_BATCH_IDS):
        yield list(ids[start : start + MAX_BATCH_IDS])


# --- the adapter ----------------------------------------------------------------------


class GmailPlatform(MailPlatform):
    """Find, quarantine and restore messages in Google Workspace mailboxes."""

    name = PLATFORM

    def __init__(self, settings: GmailSettings) -> None:
        self.settings = settings
        info = {
            "type": "service_account",
            "client_email": settings.service_account_email,
            "client_id": settings.client_id,
            "private_key": settings.private_key.get_secret_value(),
            "private_key_id": settings.private_key_id or "",
            "token_uri": settings.token_uri,
        }
        try:
            load = service_account.Credentials.from_service_account_info
            self._credentials = load(info, scopes=settings.scopes)  # type: ignore[no-untyped-call]
        except (ValueError, google.auth.exceptions.GoogleAuthError) as exc:
            # The exception text may quote the key, so only its type is kept.
            raise PermanentError(
                f"The private key of service account {settings.service_account_email} "
                f"could not be loaded ({type(exc).__name__}); set private_key to the "
                "PEM key from the account's JSON key file.",
                platform=PLATFORM,
            ) from None
        self._service = build(
            "gmail",
            "v1",
            http=httplib2.Http(timeout=settings.request_timeout),
            client_options={"api_endpoint": settings.api_url},
            cache_discovery=False,
            static_discovery=True,
        )
        self._threads = ThreadPoolExecutor(
            max_workers=settings.max_threads, thread_name_prefix="gmail"
        )
        self._local = threading.local()
        self._subjects: dict[str, service_account.Credentials] = {}
        self._slots: dict[str, asyncio.Semaphore] = {}
        # Event loop time before which no request goes to a mailbox, because
        # Gmail named a wait for it.
        self._paused_until: dict[str, float] = {}
        self._evidence_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )
        self._incident_labels: dict[str, str] = {}
        # The number of the last check that verified the quarantine copy of each
        # (bare Message-ID, incident id). Later quarantines of the same message skip
        # the quarantine mailbox, which has the request limits of any other
        # mailbox. Repeated pulls are the exception (see `_ensure_evidence`).
        self._evidence_checked: dict[tuple[str, str], int] = {}
        self._evidence_checks = itertools.count(1)

    async def close(self) -> None:
        # The threads finish their requests off the event loop, which may still
        # have to serve them (a simulator in the same process does).
        await asyncio.to_thread(self._threads.shutdown, wait=True)

    # --- the MailPlatform interface ---------------------------------------------------

    async def find(self, mailbox: str, message_id: str) -> list[MessageCopy]:
        """Find every copy in every label, SPAM and TRASH included, with read state."""
        bare = required_message_id(message_id, PLATFORM)
        located = await self._locate(mailbox, bare)
        return [self._public(mailbox, bare, c, located) for c in located.copies]

    async def search(self, mailbox: str, search: MessageSearch) -> list[MessageCopy]:
        """Find the copies that arrived in the window and match sender and subject.

        The query names only the time window, SPAM and TRASH included, because
        Gmail's `from:` and `subject:` match words and `from:` ignores the Sender
        header. The sender and the exact subject are compared here.
        """
        mailbox = mailbox.strip().lower()
        # after: and before: take epoch seconds and leave the bounds out, so the
        # window is widened by a second on each side and checked exactly below.
        after = math.floor(search.received_after.timestamp()) - 1
        before = math.ceil(search.received_before.timestamp()) + 1
        ids = await self._list_ids(mailbox, None, f"after:{after} before:{before}")
        label_names = await self._label_names(mailbox, None)
        located = _Located([], label_names, [])
        copies = []
        for gmail_id in ids:
            message = await self._get_metadata(
                mailbox, "", gmail_id, ["Message-ID", "From", "Sender", "Subject"]
            )
            if message is None:
                continue
            headers = message.get("payload", {}).get("headers", [])
            subject = _header(headers, "Subject")
            received_at = _internal_date(message)
            sender = None
            for name in ("From", "Sender"):
                address = email.utils.parseaddr(_header(headers, name) or "")[1].lower()
                if search.matches(address, subject, received_at):
                    sender = address
                    break
            if sender is None:
                continue
            copy = _Copy(
                gmail_id=str(message["id"]),
                labels=tuple(message.get("labelIds", [])),
                received_at=received_at,
                subject=subject,
            )
            bare = _bare(_header(headers, "Message-ID"))
            found = self._public(mailbox, bare, copy, located)
            copies.append(replace(found, sender=sender))
        return copies

    async def quarantine(
        self, mailbox: str, message_id: str, incident_id: str
    ) -> QuarantineResult:
        """Quarantine every copy of a message in one mailbox.

        Step 1 finds the copies. Step 2 records each copy's labels and read state in
        a record label put on the copy. Step 3 makes sure the quarantine mailbox
        contains one verified copy for the incident. Step 4 trashes or deletes the
        originals, and step 5 verifies that none is left in place. A crash between
        steps leaves the original or the verified copy, and the record label, so
        running the quarantine again finishes the work. A quarantine found done
        already still checks that the quarantine mailbox contains one copy.
        """
        bare = required_message_id(message_id, PLATFORM)
        mailbox = mailbox.strip().lower()
        _check_incident(incident_id)

        # Step 1: every copy, and what earlier runs recorded.
        located = await self._locate(mailbox, bare, incident_id)
        recorded_ids = {r.label_id for r in located.records}
        fresh = [c for c in located.copies if not recorded_ids & set(c.labels)]
        pending = [c for c in located.copies if c not in fresh and self._in_place(c)]
        # A record label of this incident means that an earlier run, maybe on a
        # worker that died since, got past step 2 and may have imported a copy.
        repeated = bool(located.records)
        if not fresh and not pending:
            if not located.records:
                raise NotFoundError(
                    f"Mailbox {mailbox} has no copy of <{bare}>, in or out of "
                    "quarantine.",
                    mailbox=mailbox,
                    message_id=bare,
                    platform=PLATFORM,
                )
            logger.info(
                "Already quarantined mailbox=%s message_id=%s incident=%s",
                mailbox,
                bare,
                incident_id,
            )
            # The run that finished may have raced a worker that died after its
            # import, so the quarantine mailbox is checked here too.
            marked = [c for c in located.copies if recorded_ids & set(c.labels)]
            evidence = await self._ensure_evidence(
                mailbox,
                bare,
                marked[0].gmail_id if marked else None,
                incident_id,
                repeated=True,
            )
            return QuarantineResult(
                mailbox=mailbox,
                message_id=bare,
                copies=self._recorded_copies(mailbox, bare, located),
                already_done=True,
                evidence_location=evidence,
            )

        # Step 2: record the labels of each fresh copy on the copy itself.
        records = await self._record(mailbox, bare, incident_id, fresh, located)

        # Step 3: one verified copy in the quarantine mailbox.
        source = (fresh or pending)[0]
        evidence = await self._ensure_evidence(
            mailbox, bare, source.gmail_id, incident_id, repeated=repeated
        )

        # Step 4: the originals leave the user's reach.
        handled = [c.gmail_id for c in [*fresh, *pending]]
        await self._remove_originals(mailbox, bare, handled)

        # Step 5: verify that none of them is left in place.
        await self._verify_removed(mailbox, bare, handled)
        logger.info(
            "Quarantined mailbox=%s message_id=%s incident=%s copies=%d action=%s "
            "evidence=%s",
            mailbox,
            bare,
            incident_id,
            len(handled),
            self.settings.original_action,
            evidence,
        )
        copies = [
            self._public(mailbox, bare, c, located, records.get(c.gmail_id))
            for c in [*fresh, *pending]
        ]
        return QuarantineResult(
            mailbox=mailbox,
            message_id=bare,
            copies=tuple(copies),
            evidence_location=evidence,
        )

    async def restore(
        self, mailbox: str, message_id: str, incident_id: str
    ) -> QuarantineResult:
        """Put the copies this incident quarantined back with their labels.

        Step 1 finds the record labels of the incident and message. Step 2 gives
        each trashed original its recorded labels and read state again. Where the
        original is gone (deleted, or purged from the trash), it imports the
        quarantine copy back with those labels. Step 3 verifies, and step 4 deletes
        the record labels, which also takes them off the messages.
        """
        bare = required_message_id(message_id, PLATFORM)
        mailbox = mailbox.strip().lower()
        _check_incident(incident_id)

        # Step 1: what the quarantine recorded.
        located = await self._locate(mailbox, bare, incident_id)
        if not located.records:
            if located.copies:
                return QuarantineResult(
                    mailbox=mailbox,
                    message_id=bare,
                    copies=tuple(
                        self._public(mailbox, bare, c, located) for c in located.copies
                    ),
                    already_done=True,
                )
            raise NotFoundError(
                f"Mailbox {mailbox} has no copy of <{bare}> to restore, and incident "
                f"{incident_id} recorded none.",
                mailbox=mailbox,
                message_id=bare,
                platform=PLATFORM,
            )

        # Step 2: relabel the originals, or import the quarantine copy again.
        notes: list[str] = []
        for record in located.records:
            wanted = [
                x
                for x in record.labels
                if x in located.label_names or x in SYSTEM_LABELS
            ]
            if len(wanted) < len(record.labels):
                notes.append(
                    f"Labels {sorted(set(record.labels) - set(wanted))} no longer "
                    "exist in the mailbox, so the copy came back without them."
                )
            marked = located.marked_by(record)
            if marked:
                await self._relabel(mailbox, bare, marked, wanted, record.label_id)
            else:
                await self._import_back(
                    mailbox, bare, incident_id, wanted, record.label_id
                )
                notes.append(
                    "The original was gone, so the quarantine copy was imported back."
                )

        # Step 3: every record has a copy with its labels again.
        await self._verify_restored(mailbox, bare, incident_id)

        # Step 4: the records are done with.
        for record in located.records:
            with contextlib.suppress(NotFoundError):
                await self._call(mailbox, bare, "labels", "delete", id=record.label_id)
        logger.info(
            "Restored mailbox=%s message_id=%s incident=%s records=%d",
            mailbox,
            bare,
            incident_id,
            len(located.records),
        )
        copies = self._recorded_copies(mailbox, bare, located)
        return QuarantineResult(
            mailbox=mailbox, message_id=bare, copies=copies, notes=tuple(notes)
        )

    async def quarantine_many(
        self, pulls: Sequence[tuple[str, str, str]]
    ) -> list[QuarantineResult | ConnectorError]:
        """Quarantine many pulls as one burst of HTTP batches (see gmail_burst).

        An unexpected error in the burst is logged, and the pulls then run one
        mailbox at a time, so a fault in the burst code loses no pull.
        """
        from .gmail_burst import quarantine_burst

        try:
            return await quarantine_burst(self, pulls)
        except Exception:
            logger.exception(
                "Gmail burst failed, quarantining one mailbox at a time pulls=%d",
                len(pulls),
            )
            return await super().quarantine_many(pulls)

    async def batch(
        self, calls: Sequence[tuple[str, str, str, dict[str, Any]]]
    ) -> list[Any]:
        """Run (mailbox, resource, method, parameters) calls in HTTP batches.

        Returns each call's response, or its `ConnectorError`, in order. The batches
        (`batch_parts` parts each) run concurrently on the thread pool, and every
        part carries its own mailbox's token. Nothing is retried here, but a wait
        that Gmail names for a part pauses the one-mailbox requests to its mailbox.
        """
        size = batch_parts(
            len(calls), self.settings.batch_size, self.settings.max_threads
        )
        chunks = [
            list(calls[start : start + size]) for start in range(0, len(calls), size)
        ]
        loop = asyncio.get_running_loop()
        answers = await asyncio.gather(
            *(
                loop.run_in_executor(self._threads, self._execute_batch, chunk)
                for chunk in chunks
            )
        )
        flat = [answer for chunk in answers for answer in chunk]
        for (mailbox, *_), answer in zip(calls, flat, strict=True):
            if isinstance(answer, TransientError) and answer.retry_after:
                self._pause(mailbox, answer.retry_after)
        return flat

    async def sent_since(self, mailbox: str, since: datetime) -> list[SentMessage]:
        """List what `mailbox` sent since `since`, with the headers tracing matches on
        and the SHA-256 of each attachment's decoded bytes.
        """
        mailbox = mailbox.strip().lower()
        moment = since if since.tzinfo else since.replace(tzinfo=UTC)
        query = f"after:{int(moment.timestamp())}"
        ids = await self._list_ids(mailbox, None, query, label_ids=["SENT"])
        sent = []
        for gmail_id in ids:
            message = await self._call(
                mailbox, None, "messages", "get", id=gmail_id, format="raw"
            )
            raw = message.get("raw")
            if not isinstance(raw, str):
                continue
            parsed = sent_message_from_mime(
                mailbox, _b64url_decode(raw), _internal_date(message)
            )
            if parsed is not None and parsed.sent_at >= moment:
                sent.append(parsed)
        return sent

    # --- finding ----------------------------------------------------------------------

    async def _locate(
        self, mailbox: str, bare: str, incident_id: str | None = None
    ) -> _Located:
        """List every copy with its labels, and the record labels of the incident."""
        label_names = await self._label_names(mailbox, bare)
        messages = []
        for gmail_id in await self._list_ids(mailbox, bare, search_query(bare)):
            message = await self._get_metadata(mailbox, bare, gmail_id, ["Message-ID"])
            if message is not None:
                messages.append(message)
        return self.located_from(bare, incident_id, label_names, messages)

    def located_from(
        self,
        bare: str,
        incident_id: str | None,
        label_names: dict[str, str],
        messages: list[dict[str, Any]],
    ) -> _Located:
        """Build the copies of `bare` from messages.get answers in metadata format."""
        copies: list[_Copy] = []
        for message in messages:
            headers = message.get("payload", {}).get("headers", [])
            if _bare(_header(headers, "Message-ID")) != bare:
                continue
            copies.append(
                _Copy(
                    gmail_id=str(message["id"]),
                    labels=tuple(message.get("labelIds", [])),
                    received_at=_internal_date(message),
                    subject=None,
                )
            )
        records = []
        if incident_id is not None:
            digest = message_digest(bare)
            for label_id, name in label_names.items():
                record = parse_record_label(self.settings.label_prefix, label_id, name)
                if (
                    record
                    and record.incident == incident_id
                    and record.digest == digest
                ):
                    records.append(record)
        return _Located(copies, label_names, records)

    async def _list_ids(
        self,
        mailbox: str,
        bare: str | None,
        query: str,
        *,
        label_ids: list[str] | None = None,
    ) -> list[str]:
        ids: list[str] = []
        token: str | None = None
        while True:
            page = await self._call(
                mailbox,
                bare,
                "messages",
                "list",
                q=query,
                includeSpamTrash=True,
                maxResults=self.settings.page_size,
                pageToken=token,
                labelIds=label_ids,
            )
            # Gmail leaves out the messages key when nothing matches.
            ids.extend(str(m["id"]) for m in page.get("messages", []))
            token = page.get("nextPageToken")
            if not token:
                return ids

    async def _get_metadata(
        self, mailbox: str, bare: str, gmail_id: str, headers: list[str]
    ) -> dict[str, Any] | None:
        try:
            message: dict[str, Any] = await self._call(
                mailbox,
                bare,
                "messages",
                "get",
                id=gmail_id,
                format="metadata",
                metadataHeaders=headers,
            )
        except NotFoundError:
            return None  # deleted between the list and the get
        return message

    async def _label_names(self, mailbox: str, bare: str | None) -> dict[str, str]:
        body = await self._call(mailbox, bare, "labels", "list")
        return {
            str(x["id"]): str(x.get("name", x["id"])) for x in body.get("labels", [])
        }

    def in_place(self, copy: _Copy) -> bool:
        """Return whether an original still sits where the user reaches it."""
        return self._in_place(copy)

    def _in_place(self, copy: _Copy) -> bool:
        """Return whether an original still sits where the user reaches it."""
        return self.settings.original_action == "delete" or "TRASH" not in copy.labels

    def public(
        self,
        mailbox: str,
        bare: str,
        copy: _Copy,
        located: _Located,
        record: RecordLabel | None = None,
    ) -> MessageCopy:
        """Describe a copy with its labels, or with those its record label names."""
        return self._public(mailbox, bare, copy, located, record)

    def _public(
        self,
        mailbox: str,
        bare: str,
        copy: _Copy,
        located: _Located,
        record: RecordLabel | None = None,
    ) -> MessageCopy:
        labels = record.labels if record else copy.labels
        visible = tuple(
            x for x in labels if x != "UNREAD" and self._is_user_facing(x, located)
        )
        names = [located.label_names.get(x, x) for x in visible]
        return MessageCopy(
            mailbox=mailbox,
            message_id=bare,
            item_id=copy.gmail_id,
            folder=", ".join(names) or "All Mail",
            read="UNREAD" not in labels,
            subject=copy.subject,
            received_at=copy.received_at,
            labels=visible,
        )

    def _is_user_facing(self, label_id: str, located: _Located) -> bool:
        name = located.label_names.get(label_id, "")
        return parse_record_label(self.settings.label_prefix, label_id, name) is None

    def recorded_copies(
        self, mailbox: str, bare: str, located: _Located
    ) -> tuple[MessageCopy, ...]:
        """Describe the copies as their record labels say they were."""
        return self._recorded_copies(mailbox, bare, located)

    def _recorded_copies(
        self, mailbox: str, bare: str, located: _Located
    ) -> tuple[MessageCopy, ...]:
        copies: list[MessageCopy] = []
        for record in located.records:
            marked = located.marked_by(record) or [_Copy("", record.labels, None, None)]
            copies.extend(
                self._public(mailbox, bare, c, located, record) for c in marked
            )
        return tuple(copies)

    # --- recording --------------------------------------------------------------------

    async def _record(
        self,
        mailbox: str,
        bare: str,
        incident_id: str,
        copies: list[_Copy],
        located: _Located,
    ) -> dict[str, RecordLabel]:
        """Put on each copy the record label of its label set; return them by copy."""
        groups: dict[tuple[str, ...], list[_Copy]] = {}
        for copy in copies:
            groups.setdefault(tuple(sorted(copy.labels)), []).append(copy)
        by_copy: dict[str, RecordLabel] = {}
        for labels, group in groups.items():
            name = record_label_name(
                self.settings.label_prefix, incident_id, bare, labels
            )
            label_id = await self._ensure_label(
                mailbox, bare, name, located.label_names
            )
            await self._modify(
                mailbox, bare, [c.gmail_id for c in group], add=[label_id]
            )
            record = RecordLabel(label_id, incident_id, message_digest(bare), labels)
            by_copy.update((c.gmail_id, record) for c in group)
        return by_copy

    async def _ensure_label(
        self, mailbox: str, bare: str, name: str, known: dict[str, str]
    ) -> str:
        """Return the id of the label `name`, creating it hidden if it is missing."""
        for label_id, label_name in known.items():
            if label_name.lower() == name.lower():
                return label_id
        body = {
            "name": name,
            "labelListVisibility": "labelHide",
            "messageListVisibility": "hide",
        }
        try:
            created = await self._call(
                mailbox, bare, "labels", "create", retry=False, body=body
            )
        except AlreadyDoneError:
            # Another worker, or an earlier attempt, created it first.
            known.update(await self._label_names(mailbox, bare))
            for label_id, label_name in known.items():
                if label_name.lower() == name.lower():
                    return label_id
            raise TransientError(
                f"Label {name!r} of mailbox {mailbox} exists but was not listed; the "
                "request will be retried.",
                mailbox=mailbox,
                platform=PLATFORM,
            ) from None
        label_id = str(created["id"])
        known[label_id] = name
        logger.info("Created label mailbox=%s label=%s id=%s", mailbox, name, label_id)
        return label_id

    async def _modify(
        self,
        mailbox: str,
        bare: str,
        ids: Sequence[str],
        *,
        add: Sequence[str] = (),
        remove: Sequence[str] = (),
    ) -> None:
        """Change labels of messages: modify for one, batchModify for more."""
        body: dict[str, Any] = {
            "addLabelIds": list(add),
            "removeLabelIds": list(remove),
        }
        if len(ids) == 1:
            await self._call(mailbox, bare, "messages", "modify", id=ids[0], body=body)
            return
        for chunk in _chunks(ids):
            await self._call(
                mailbox, bare, "messages", "batchModify", body={**body, "ids": chunk}
            )

    # --- evidence ---------------------------------------------------------------------

    def begin_evidence_check(self) -> int:
        """Number a check of the quarantine mailbox, or a call, that begins now.

        Numbers grow with time, so a check numbered above a call's number began
        after that call.
        """
        return next(self._evidence_checks)

    def note_evidence(self, bare: str, incident_id: str, check: int) -> None:
        """Note that check number `check` verified the quarantine copy.

        The highest number noted for a message and incident is kept.
        """
        key = (bare, incident_id)
        self._evidence_checked[key] = max(check, self._evidence_checked.get(key, 0))

    def forget_evidence(self, bare: str, incident_id: str) -> None:
        """Forget a verified quarantine copy, so the next quarantine checks again."""
        self._evidence_checked.pop((bare, incident_id), None)

    async def _ensure_evidence(
        self,
        mailbox: str,
        bare: str,
        source_id: str | None,
        incident_id: str,
        *,
        repeated: bool,
    ) -> str | None:
        """Ensure the quarantine mailbox contains one verified copy for the incident.

        `source_id` is the copy in `mailbox` to import from. Without one, a missing
        copy cannot be made, and None is returned. A lock per Message-ID keeps
        quarantines of one message in this process from importing it twice, and a
        copy verified once is not searched for again.

        A repeated pull is the exception: a worker that died after the pull's
        record label was stored may have imported a copy after this adapter's last
        check, and no one checks after a dead worker. So a repeated pull checks
        again, unless a check began after this call did. The check keeps the copy
        with the smallest id and deletes the others.

        NOTE: two worker processes can still each import one copy at the same
        moment. Each checks after its import and deletes the doubles it finds. A
        worker killed before that check leaves its copy until a repeated pull
        checks, so an import that Gmail carries out only after the retry's check
        stays until the next repeated pull of the message.
        """
        quarantine = self.settings.quarantine_mailbox.lower()
        label_name = f"{self.settings.label_prefix}/{incident_id}"
        location = f"{quarantine}/{label_name}"
        key = (bare, incident_id)
        began = self.begin_evidence_check()
        if self._evidence_current(key, began, repeated):
            return location
        lock = self._evidence_locks.get(bare)
        if lock is None:
            lock = asyncio.Lock()
            self._evidence_locks[bare] = lock
        async with lock:
            if self._evidence_current(key, began, repeated):
                return location
            check = self.begin_evidence_check()
            label_id = await self._incident_label(incident_id, bare)
            found = await self._evidence_ids(bare, incident_id, label_id)
            if not found:
                if source_id is None:
                    logger.warning(
                        "No quarantine copy and no original to import it from "
                        "mailbox=%s message_id=%s incident=%s",
                        quarantine,
                        bare,
                        incident_id,
                    )
                    return None
                await self._import_evidence(
                    mailbox, bare, source_id, incident_id, label_id
                )
                found = await self._evidence_ids(bare, incident_id, label_id)
                if not found:
                    raise TransientError(
                        f"The copy of <{bare}> imported for incident {incident_id} "
                        f"was not found in mailbox {quarantine}; the originals were "
                        "not touched, and the quarantine will be retried.",
                        mailbox=quarantine,
                        message_id=bare,
                        platform=PLATFORM,
                    )
            # Duplicates found before an import come from an earlier attempt, such as
            # a burst whose batch httplib2 sent twice, or a worker that died.
            await self._delete_doubles(bare, incident_id, found)
            self.note_evidence(bare, incident_id, check)
        return location

    def _evidence_current(
        self, key: tuple[str, str], began: int, repeated: bool
    ) -> bool:
        """Return whether a verified copy needs no new check for a call.

        `began` is the number that the call took from `begin_evidence_check`.
        """
        checked = self._evidence_checked.get(key)
        if checked is None:
            return False
        return not repeated or checked > began

    async def _delete_doubles(
        self, bare: str, incident_id: str, ids: list[str]
    ) -> None:
        """Delete all but the smallest id of the copies imported for the incident.

        httplib2 sends a request again, once, when the connection drops before the
        response, so one import can store two copies. Every process keeps the same
        copy, the smallest id, so processes that race agree. A process deletes a
        copy only when its search found one with a smaller id, so the copy with
        the smallest id of all is never deleted and one copy always remains.
        """
        quarantine = self.settings.quarantine_mailbox.lower()
        for gmail_id in sorted(ids)[1:]:
            with contextlib.suppress(NotFoundError):
                await self._call(quarantine, bare, "messages", "delete", id=gmail_id)
            logger.warning(
                "Deleted a second quarantine copy mailbox=%s message_id=%s "
                "incident=%s id=%s",
                quarantine,
                bare,
                incident_id,
                gmail_id,
            )

    async def _incident_label(self, incident_id: str, bare: str) -> str:
        if incident_id not in self._incident_labels:
            quarantine = self.settings.quarantine_mailbox.lower()
            names = await self._label_names(quarantine, bare)
            name = f"{self.settings.label_prefix}/{incident_id}"
            self._incident_labels[incident_id] = await self._ensure_label(
                quarantine, bare, name, names
            )
        return self._incident_labels[incident_id]

    async def _evidence_ids(
        self, bare: str, incident_id: str, label_id: str
    ) -> list[str]:
        """List the copies in the quarantine mailbox that carry the incident."""
        quarantine = self.settings.quarantine_mailbox.lower()
        found = []
        ids = await self._list_ids(
            quarantine, bare, search_query(bare), label_ids=[label_id]
        )
        for gmail_id in ids:
            message = await self._get_metadata(
                quarantine, bare, gmail_id, ["Message-ID", INCIDENT_HEADER]
            )
            if message is None:
                continue
            headers = message.get("payload", {}).get("headers", [])
            if (
                _bare(_header(headers, "Message-ID")) == bare
                and (_header(headers, INCIDENT_HEADER) or "").strip() == incident_id
            ):
                found.append(gmail_id)
        return found

    async def _import_evidence(
        self, mailbox: str, bare: str, source_id: str, incident_id: str, label_id: str
    ) -> None:
        """Import the original's MIME with the incident headers put first."""
        quarantine = self.settings.quarantine_mailbox.lower()
        raw = await self._raw(mailbox, bare, source_id)
        headers = (
            f"{INCIDENT_HEADER}: {incident_id}\r\n"
            f"{ORIGINAL_MAILBOX_HEADER}: {mailbox}\r\n"
        ).encode("ascii")
        await self._import(quarantine, bare, headers + raw, [label_id])
        logger.info(
            "Imported quarantine copy mailbox=%s message_id=%s incident=%s",
            quarantine,
            bare,
            incident_id,
        )

    async def _raw(self, mailbox: str, bare: str, gmail_id: str) -> bytes:
        message = await self._call(
            mailbox, bare, "messages", "get", id=gmail_id, format="raw"
        )
        raw = message.get("raw")
        if not isinstance(raw, str) or not raw:
            raise TransientError(
                f"Gmail returned no raw content for message {gmail_id} of mailbox "
                f"{mailbox}; the request will be retried.",
                mailbox=mailbox,
                message_id=bare,
                platform=PLATFORM,
            )
        return _b64url_decode(raw)

    async def _import(
        self, mailbox: str, bare: str, mime: bytes, label_ids: list[str]
    ) -> str:
        """Import MIME through the JSON `raw` field, not a media upload.

        googleapiclient sends media uploads to https on the api_url's host, so the
        JSON form keeps one URL for every request. NOTE: Gmail limits a message to
        35 MB through the JSON form and 50 MB through a media upload.
        """
        body = {"raw": _b64url(mime), "labelIds": label_ids}
        # An import that timed out may have happened, so it is not repeated here:
        # the caller searches again before another import.
        created = await self._call(
            mailbox,
            bare,
            "messages",
            "import_",
            retry=False,
            body=body,
            neverMarkSpam=True,
            internalDateSource="dateHeader",
        )
        return str(created.get("id", ""))

    # --- removing and restoring originals ---------------------------------------------

    async def _remove_originals(self, mailbox: str, bare: str, ids: list[str]) -> None:
        if self.settings.original_action == "trash":
            if len(ids) == 1:
                await self._call(mailbox, bare, "messages", "trash", id=ids[0])
            else:
                await self._modify(mailbox, bare, ids, add=["TRASH"])
            return
        try:
            if len(ids) == 1:
                await self._call(mailbox, bare, "messages", "delete", id=ids[0])
                return
            for chunk in _chunks(ids):
                await self._call(
                    mailbox, bare, "messages", "batchDelete", body={"ids": chunk}
                )
        except NotFoundError:
            pass  # deleted already, by an attempt whose answer was lost

    async def _verify_removed(self, mailbox: str, bare: str, ids: list[str]) -> None:
        located = await self._locate(mailbox, bare)
        handled = set(ids)
        left = [
            c for c in located.copies if c.gmail_id in handled and self._in_place(c)
        ]
        if left:
            raise TransientError(
                f"Quarantine of <{bare}> in mailbox {mailbox} is not complete: "
                f"{len(left)} originals are still in place; run the quarantine again.",
                mailbox=mailbox,
                message_id=bare,
                platform=PLATFORM,
            )

    async def _relabel(
        self,
        mailbox: str,
        bare: str,
        copies: list[_Copy],
        wanted: list[str],
        record_id: str,
    ) -> None:
        """Give trashed originals their recorded labels; the record label stays."""
        changes: dict[tuple[tuple[str, ...], tuple[str, ...]], list[str]] = {}
        for copy in copies:
            add = tuple(x for x in wanted if x not in copy.labels)
            remove = tuple(x for x in copy.labels if x not in wanted and x != record_id)
            if add or remove:
                changes.setdefault((add, remove), []).append(copy.gmail_id)
        for (add, remove), ids in changes.items():
            await self._modify(mailbox, bare, ids, add=add, remove=remove)

    async def _import_back(
        self,
        mailbox: str,
        bare: str,
        incident_id: str,
        wanted: list[str],
        record_id: str,
    ) -> None:
        """Import the quarantine copy into the mailbox, without the incident headers.

        The record label goes on the new copy too, so a retry after a crash finds it
        and does not import a second one.

        NOTE: a record label stands for all copies with the same labels, so after
        a delete, two copies of one message with identical labels in one mailbox
        come back as one.
        """
        quarantine = self.settings.quarantine_mailbox.lower()
        label_id = await self._incident_label(incident_id, bare)
        evidence = await self._evidence_ids(bare, incident_id, label_id)
        if not evidence:
            raise PermanentError(
                f"The original of <{bare}> in mailbox {mailbox} is gone and mailbox "
                f"{quarantine} holds no copy for incident {incident_id}, so it cannot "
                "be restored.",
                mailbox=mailbox,
                message_id=bare,
                platform=PLATFORM,
            )
        raw = _strip_incident_headers(await self._raw(quarantine, bare, evidence[0]))
        await self._import(mailbox, bare, raw, [*wanted, record_id])

    async def _verify_restored(self, mailbox: str, bare: str, incident_id: str) -> None:
        located = await self._locate(mailbox, bare, incident_id)
        missing = []
        for record in located.records:
            wanted = {x for x in record.labels if x in located.label_names}
            if not any(wanted <= set(c.labels) for c in located.marked_by(record)):
                missing.append(record.label_id)
        if missing:
            raise TransientError(
                f"Restore of <{bare}> in mailbox {mailbox} is not complete: "
                f"{len(missing)} recorded copies are not back with their labels; run "
                "the restore again.",
                mailbox=mailbox,
                message_id=bare,
                platform=PLATFORM,
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
        resource: Literal["messages", "labels"],
        method: str,
        *,
        retry: bool = True,
        **params: Any,
    ) -> Any:
        """Run `users.<resource>.<method>` for the mailbox in its slot, mapping errors.

        A transient failure is retried up to `request_retries` times, after the
        Retry-After wait when Gmail gives one no longer than `max_retry_wait`.
        A longer wait goes up to the caller at once. With `retry` false, for
        requests that must not run twice, the first failure goes up.
        """
        settings = self.settings

        def should_retry(exc: BaseException) -> bool:
            if not retry or not isinstance(exc, TransientError):
                return False
            return exc.retry_after is None or exc.retry_after <= settings.max_retry_wait

        def wait(state: RetryCallState) -> float:
            error = state.outcome.exception() if state.outcome else None
            requested: float | None = getattr(error, "retry_after", None)
            if requested is not None:
                return requested
            backoff: float = 0.5 * 2 ** (state.attempt_number - 1)
            return min(settings.max_retry_wait, backoff)

        def before_sleep(state: RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            logger.warning(
                "Retrying a Gmail request mailbox=%s method=%s.%s attempt=%d "
                "wait=%.3f error=%s",
                mailbox,
                resource,
                method,
                state.attempt_number,
                state.upcoming_sleep,
                error,
            )

        retrying = AsyncRetrying(
            retry=retry_if_exception(should_retry),
            stop=stop_after_attempt(settings.request_retries + 1),
            wait=wait,
            before_sleep=before_sleep,
            reraise=True,
        )
        request = partial(self._execute, mailbox, resource, method, params)
        async with self._slot(mailbox):
            async for attempt in retrying:
                with attempt:
                    return await self._run(mailbox, bare, request)
        raise AssertionError("unreachable")

    async def _run(
        self, mailbox: str, bare: str | None, request: Callable[[], Any]
    ) -> Any:
        """Send one request once the mailbox's pause is over.

        A wait that Gmail names pauses every later request to that mailbox, not
        only the failed one.
        """
        loop = asyncio.get_running_loop()
        await self._wait_out_pause(mailbox, bare)
        try:
            return await loop.run_in_executor(self._threads, request)
        except Exception as exc:  # the one place foreign errors are mapped
            error = map_gmail_error(
                exc, mailbox=mailbox, message_id=bare, client_id=self.settings.client_id
            )
            if isinstance(error, TransientError) and error.retry_after:
                self._pause(mailbox, error.retry_after)
            if error is exc:
                raise
            raise error from exc

    def _pause(self, mailbox: str, seconds: float) -> None:
        key = mailbox.lower()
        until = asyncio.get_running_loop().time() + seconds
        self._paused_until[key] = max(self._paused_until.get(key, 0.0), until)

    async def _wait_out_pause(self, mailbox: str, bare: str | None) -> None:
        loop = asyncio.get_running_loop()
        key = mailbox.lower()
        # Requests sent before a pause began can extend it while this one sleeps.
        while (remaining := self._paused_until.get(key, 0.0) - loop.time()) > 0:
            if remaining > self.settings.max_retry_wait:
                raise ThrottledError(
                    f"Mailbox {mailbox} must wait {remaining:.1f} s more before its "
                    "next Gmail request, as Gmail asked; the request is parked until "
                    "then.",
                    retry_after=remaining,
                    mailbox=mailbox,
                    message_id=bare,
                    platform=PLATFORM,
                )
            await asyncio.sleep(remaining)

    def _execute(
        self, mailbox: str, resource: str, method: str, params: dict[str, Any]
    ) -> Any:
        """Send one request on this thread's connection, as the mailbox's user."""
        connection = self._connection()
        key = mailbox.lower()
        authorized = google_auth_httplib2.AuthorizedHttp(
            self._subject(key), http=connection
        )
        collection = getattr(self._service.users(), resource)()
        request: HttpRequest = getattr(collection, method)(userId=key, **params)
        return request.execute(http=authorized, num_retries=0)

    def _execute_batch(
        self, calls: list[tuple[str, str, str, dict[str, Any]]]
    ) -> list[Any]:
        """Send one HTTP batch on this thread's connection; map every error.

        googleapiclient refreshes the token of every part's credentials on each
        batch, so the parts carry Authorization headers set here from credentials
        that refresh only when their token expires.
        """
        connection = self._connection()
        uri = self.settings.api_url.rstrip("/") + "/batch"
        batch = BatchHttpRequest(batch_uri=uri)
        answers: list[Any] = [None] * len(calls)

        def store(request_id: str, response: Any, exception: Any) -> None:
            index = int(request_id)
            mailbox = calls[index][0]
            status = getattr(getattr(exception, "resp", None), "status", None)
            if status == 401:
                # The part's token was rejected: forget it, and let the caller
                # retry on the one-mailbox path, which fetches a new one.
                self._subjects.pop(mailbox.lower(), None)
                answers[index] = TransientError(
                    f"Gmail rejected the token of mailbox {mailbox} in a batch; the "
                    "request will be retried with a new token.",
                    mailbox=mailbox,
                    platform=PLATFORM,
                )
            elif exception is not None:
                answers[index] = map_gmail_error(
                    exception, mailbox=mailbox, client_id=self.settings.client_id
                )
            else:
                answers[index] = response

        parts = 0
        try:
            for index, (mailbox, resource, method, params) in enumerate(calls):
                key = mailbox.lower()
                collection = getattr(self._service.users(), resource)()
                request = getattr(collection, method)(userId=key, **params)
                # A plain connection has no credentials, so googleapiclient leaves
                # the Authorization header below alone.
                request.http = connection
                try:
                    self._subject(key).before_request(  # type: ignore[no-untyped-call]
                        google_auth_httplib2.Request(connection),
                        request.method,
                        request.uri,
                        request.headers,
                    )
                except Exception as exc:
                    # No token for this mailbox (outside the delegated domain, say):
                    # only its own calls fail, and the batch goes on without them.
                    answers[index] = map_gmail_error(
                        exc, mailbox=mailbox, client_id=self.settings.client_id
                    )
                    continue
                batch.add(request, callback=store, request_id=str(index))
                parts += 1
            if parts:
                batch.execute(http=connection)
        except Exception as exc:  # the batch as a whole failed
            error = map_gmail_error(exc, client_id=self.settings.client_id)
            return [answer or error for answer in answers]
        return answers

    def _connection(self) -> httplib2.Http:
        connection = getattr(self._local, "http", None)
        if connection is None:
            connection = httplib2.Http(timeout=self.settings.request_timeout)
            self._local.http = connection
        return connection

    def _subject(self, key: str) -> service_account.Credentials:
        credentials = self._subjects.get(key)
        if credentials is None:
            credentials = self._credentials.with_subject(key)
            self._subjects[key] = credentials
        return credentials


# --- helpers --------------------------------------------------------------------------


def batch_parts(calls: int, preferred: int, threads: int) -> int:
    """Return the parts per HTTP batch that send `calls` calls in one round.

    `preferred` parts while `threads` threads carry all the batches at once, and
    more, up to Gmail's 100, when they would not. Beyond 100 parts times
    `threads` calls, the batches take more than one round.
    """
    return max(preferred, min(MAX_BATCH_PARTS, math.ceil(calls / threads)))


def _check_incident(incident_id: str) -> None:
    if not _INCIDENT_SHAPE.fullmatch(incident_id):
        raise PermanentError(
            f"The incident id {incident_id!r} is empty or contains white space, a "
            "comma, a slash or a quote, so it cannot name a Gmail label; fix the id.",
            platform=PLATFORM,
        )


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii")


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _internal_date(message: dict[str, Any]) -> datetime | None:
    try:
        return datetime.fromtimestamp(int(message["internalDate"]) / 1000, UTC)
    except (KeyError, ValueError, TypeError):
        return None


def _strip_incident_headers(mime: bytes) -> bytes:
    """Remove the incident headers the adapter put in front, and only those."""
    for name in (INCIDENT_HEADER, ORIGINAL_MAILBOX_HEADER):
        prefix = f"{name}:".encode("ascii")
        if mime[: len(prefix)].lower() == prefix.lower():
            end = mime.find(b"\n")
            mime = mime[end + 1 :] if end >= 0 else b""
    return mime
