"""A Gmail API simulator over the mail world, served by aiohttp.

It serves the requests google-api-python-client sends for `gmail/v1` the way the
Gmail API does: `users.messages` list (with the search operators below), get in the
formats minimal, metadata, full and raw, insert, import, modify, batchModify, trash,
untrash, delete and batchDelete, `users.labels` list, get, create and delete, and
the HTTP batch endpoint, whose parts run as requests of their own.
An OAuth2 token endpoint takes the JWT-bearer grant of a service account with
domain-wide delegation: it checks the assertion's RS256 signature with the public key
of the tenant's service account, its audience, lifetime and scopes, and binds the
token to the `sub` it impersonates, which must be a mailbox of that tenant's domain.

The mail world stores one folder per copy, and this simulator shows folders as
labels: Inbox is INBOX, Junk Email is SPAM, Deleted Items is TRASH, Sent Items is
SENT, Drafts is DRAFT, every other folder below the top is a user label named by its
path, and the rest (the top, Archive) stand for "All Mail" without a label. Other
labels of a copy, such as STARRED, live in `Item.labels`, and UNREAD is the read flag.
Message ids are 16 hex digits that stay the same through label changes, as Gmail's do.

Each user has Gmail's quota: every method costs its units (`QUOTA_UNITS`) from a
budget of `user_quota_units` per `quota_window_seconds`, and at most
`concurrency_limit` requests run at once. Beyond either, the answer is 429 with
reason userRateLimitExceeded or rateLimitExceeded and a Retry-After header. With
`time_scale` above 1 the simulator's clock runs that many times faster than real
time: latency, quota windows and Retry-After (in real seconds, with decimals) all
shrink, so a benchmark replays long waits quickly.

Paths under `/_sim/` are the simulator's own admin API, not Gmail: reset, fault
injection, the request log, quota use, settings and a view of each mailbox.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import email.utils
import hashlib
import json
import logging
import math
import random
import re
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from email import message_from_bytes
from email.message import Message
from email.parser import BytesParser, HeaderParser
from email.policy import compat32
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import parse_qsl, unquote, unquote_plus

from aiohttp import web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from multidict import CIMultiDict

from .clock import serving_thread
from .world import (
    ROOT_FOLDER,
    Folder,
    FolderExistsError,
    FolderNotFoundError,
    Item,
    TenantSpec,
    UnknownMailboxError,
    World,
    WorldError,
    load_scenario,
)

logger = logging.getLogger(__name__)

FULL_SCOPE = "https://mail.google.com/"
MODIFY_SCOPE = "https://www.googleapis.com/auth/gmail.modify"
READONLY_SCOPE = "https://www.googleapis.com/auth/gmail.readonly"
INSERT_SCOPE = "https://www.googleapis.com/auth/gmail.insert"
LABELS_SCOPE = "https://www.googleapis.com/auth/gmail.labels"
METADATA_SCOPE = "https://www.googleapis.com/auth/gmail.metadata"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
GOOGLE_TOKEN_URL = "https://oauth2.googleapis.com/token"  # noqa: S105 - a URL

# Quota units per method, from the Gmail API's usage-limits page.
QUOTA_UNITS: dict[str, int] = {
    "messages.list": 5,
    "messages.get": 5,
    "messages.insert": 25,
    "messages.import": 25,
    "messages.modify": 5,
    "messages.batchModify": 50,
    "messages.trash": 5,
    "messages.untrash": 5,
    "messages.delete": 10,
    "messages.batchDelete": 50,
    "labels.list": 1,
    "labels.get": 1,
    "labels.create": 5,
    "labels.delete": 5,
}
_READ = frozenset({FULL_SCOPE, MODIFY_SCOPE, READONLY_SCOPE})
_WRITE = frozenset({FULL_SCOPE, MODIFY_SCOPE})
_LABELS = frozenset({FULL_SCOPE, MODIFY_SCOPE, LABELS_SCOPE})
# Any one of these scopes allows the method; delete needs the full mail scope.
METHOD_SCOPES: dict[str, frozenset[str]] = {
    "messages.list": _READ | {METADATA_SCOPE},
    "messages.get": _READ | {METADATA_SCOPE},
    "messages.insert": _WRITE | {INSERT_SCOPE},
    "messages.import": _WRITE | {INSERT_SCOPE},
    "messages.modify": _WRITE,
    "messages.batchModify": _WRITE,
    "messages.trash": _WRITE,
    "messages.untrash": _WRITE,
    "messages.delete": frozenset({FULL_SCOPE}),
    "messages.batchDelete": frozenset({FULL_SCOPE}),
    "labels.list": _LABELS | _READ | {METADATA_SCOPE},
    "labels.get": _LABELS | _READ | {METADATA_SCOPE},
    "labels.create": _LABELS,
    "labels.delete": _LABELS,
}

# Folders of the world that Gmail shows as system labels.
FOLDER_LABELS = {
    "inbox": "INBOX",
    "junkemail": "SPAM",
    "deleteditems": "TRASH",
    "sentitems": "SENT",
    "drafts": "DRAFT",
}
LABEL_FOLDERS = {label: folder for folder, label in FOLDER_LABELS.items()}
# When a copy has several of these labels, the first decides its folder.
LOCATION_ORDER = ("TRASH", "SPAM", "INBOX", "SENT", "DRAFT")
SYSTEM_LABELS = (
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
)
# System labels that modify, batchModify, insert and import may not change.
FIXED_LABELS = frozenset({"SENT", "DRAFT", "CHAT"})
FORMATS = frozenset({"minimal", "metadata", "full", "raw"})
STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ALREADY_EXISTS",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
_FAULT_REASONS = {
    403: "rateLimitExceeded",
    429: "rateLimitExceeded",
    500: "backendError",
    502: "backendError",
    503: "backendError",
    504: "backendError",
}


@dataclass
class GmailSimSettings:
    """Behaviour knobs; the admin API can change them while the simulator runs.

    `latency_ms` delays every Gmail request, in simulated milliseconds.
    `user_quota_units` per `quota_window_seconds` and `concurrency_limit` requests
    in flight are the per-user limits. Gmail documents 15,000 units a minute; its
    limit on concurrent requests per user is not published, so 10 is a guess.
    """

    latency_ms: float = 0.0
    user_quota_units: int = 15_000
    quota_window_seconds: float = 60.0
    concurrency_limit: int = 10
    time_scale: float = 1.0
    token_lifetime: int = 3599
    max_batch_ids: int = 1000
    max_batch_parts: int = 100
    max_results: int = 500
    default_results: int = 100
    request_log_size: int = 10_000
    # Close every connection after its response (Connection: close). On the
    # virtual clock this leaves no keep-alive timer of an idle connection
    # pending, which a jump could expire under a thread about to reuse it.
    close_connections: bool = False


class GmailError(Exception):
    """An error response: HTTP status, reason and message, as Google APIs send them."""

    def __init__(
        self,
        status: int,
        reason: str,
        message: str,
        *,
        domain: str = "global",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.domain = domain
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "code": self.status,
                "message": self.message,
                "errors": [
                    {
                        "message": self.message,
                        "domain": self.domain,
                        "reason": self.reason,
                    }
                ],
                "status": STATUS_NAMES.get(self.status, "UNKNOWN"),
            }
        }


class TokenError(Exception):
    """An OAuth2 error response of the token endpoint."""

    def __init__(self, status: int, error: str, description: str) -> None:
        super().__init__(description)
        self.status = status
        self.error = error
        self.description = description


class _DropConnection(Exception):
    """Close the connection without a response."""


def invalid(message: str) -> GmailError:
    return GmailError(400, "invalidArgument", message)


def not_found() -> GmailError:
    return GmailError(404, "notFound", "Requested entity was not found.")


# --- time -----------------------------------------------------------------------------


class SimClock:
    """Simulated time that runs `scale` times faster than real time."""

    def __init__(
        self,
        scale: float = 1.0,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.scale = scale
        self._monotonic = monotonic
        self._start = monotonic()
        self._wall_start = wall()

    def now(self) -> float:
        """Return simulated seconds since the epoch."""
        return self._wall_start + (self._monotonic() - self._start) * self.scale

    async def sleep(self, seconds: float) -> None:
        """Wait `seconds` of simulated time."""
        await asyncio.sleep(seconds / self.scale)

    def real_seconds(self, seconds: float) -> str:
        """Format a simulated wait as a Retry-After value in real seconds."""
        if self.scale == 1.0:
            return str(max(1, math.ceil(seconds)))
        return f"{max(0.001, seconds / self.scale):.3f}"


# --- tokens ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Grant:
    """The rights of an access token: one user of one tenant, with scopes."""

    domain: str
    subject: str
    scopes: frozenset[str]
    expires_at: float


class TokenIssuer:
    """The JWT-bearer token endpoint and the bearer tokens it issued.

    A JWT's `iat` and `exp` come from the client's real clock, so they are checked
    against `wall` (real time), while issued tokens expire on the simulated clock.
    """

    MAX_LIFETIME = 3600
    CLOCK_SKEW = 60

    def __init__(
        self,
        world: World,
        clock: SimClock,
        settings: GmailSimSettings,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.world = world
        self.clock = clock
        self.settings = settings
        self.wall = wall
        self.grants: dict[str, Grant] = {}

    def issue(self, form: dict[str, str], audience: str) -> dict[str, Any]:
        """Check a token request and return the token response body."""
        if form.get("grant_type") != JWT_BEARER:
            raise TokenError(
                400,
                "unsupported_grant_type",
                f"Invalid grant_type: {form.get('grant_type', '')}",
            )
        claims = self._verify(form.get("assertion", ""), audience)
        tenant = claims.pop("_tenant")
        scopes = frozenset(str(claims.get("scope", "")).split())
        subject = str(claims.get("sub") or "")
        if not scopes:
            raise TokenError(
                400, "invalid_scope", "Empty or missing scope not allowed."
            )
        denied = scopes - set(tenant.delegated_scopes)
        if not subject or subject.rpartition("@")[2].lower() != tenant.domain.lower():
            denied = scopes
        if denied:
            raise TokenError(
                401,
                "unauthorized_client",
                "Client is unauthorized to retrieve access tokens using this method, "
                "or client not authorized for any of the scopes requested.",
            )
        if self.world.platform_of(subject) != "gmail":
            raise TokenError(400, "invalid_grant", "Invalid email or User ID")
        token = "ya29.sim-" + secrets.token_urlsafe(24)
        lifetime = self.settings.token_lifetime
        self.grants[token] = Grant(
            tenant.domain.lower(), subject.lower(), scopes, self.clock.now() + lifetime
        )
        return {"access_token": token, "expires_in": lifetime, "token_type": "Bearer"}

    def _verify(self, assertion: str, audience: str) -> dict[str, Any]:
        parts = assertion.split(".")
        if len(parts) != 3:
            raise TokenError(400, "invalid_request", "Invalid JWT: not three segments.")
        try:
            header = json.loads(_b64url_decode(parts[0]))
            claims = json.loads(_b64url_decode(parts[1]))
            signature = _b64url_decode(parts[2])
        except (ValueError, binascii.Error):
            raise TokenError(
                400, "invalid_grant", "Invalid JWT: segments are not base64url JSON."
            ) from None
        if not isinstance(header, dict) or header.get("alg") != "RS256":
            raise TokenError(400, "invalid_grant", "Invalid JWT: alg must be RS256.")
        if not isinstance(claims, dict):
            raise TokenError(400, "invalid_grant", "Invalid JWT: claims not an object.")
        tenant = self._tenant_of(str(claims.get("iss", "")))
        key = serialization.load_pem_public_key(
            (tenant.public_key_pem or "").encode("ascii")
        )
        if not isinstance(key, rsa.RSAPublicKey):
            raise TokenError(
                400, "invalid_client", "The service account key is not RSA."
            )
        try:
            key.verify(
                signature,
                f"{parts[0]}.{parts[1]}".encode("ascii"),
                padding.PKCS1v15(),
                hashes.SHA256(),
            )
        except InvalidSignature:
            raise TokenError(400, "invalid_grant", "Invalid JWT Signature.") from None
        # google-auth (2.63) always names Google's token endpoint as the audience,
        # whatever token_uri it posts to, so that audience is accepted too.
        if claims.get("aud") not in (audience, GOOGLE_TOKEN_URL):
            raise TokenError(
                400,
                "invalid_grant",
                f"Invalid JWT: aud must be {GOOGLE_TOKEN_URL} or {audience}.",
            )
        now = self.wall()
        issued, expires = claims.get("iat"), claims.get("exp")
        if not isinstance(issued, int | float) or not isinstance(expires, int | float):
            raise TokenError(400, "invalid_grant", "Invalid JWT: iat and exp required.")
        if (
            issued > now + self.CLOCK_SKEW
            or expires <= now - self.CLOCK_SKEW
            or expires - issued > self.MAX_LIFETIME
        ):
            raise TokenError(
                400,
                "invalid_grant",
                "Invalid JWT: Token must be a short-lived token (60 minutes) and in "
                "a reasonable timeframe. Check your iat and exp values.",
            )
        claims["_tenant"] = tenant
        return claims

    def _tenant_of(self, issuer: str) -> TenantSpec:
        for tenant in self.world.scenario.tenants:
            if (
                tenant.platform == "gmail"
                and tenant.service_account
                and tenant.service_account.lower() == issuer.lower()
                and tenant.public_key_pem
            ):
                return tenant
        raise TokenError(401, "invalid_client", "The OAuth client was not found.")

    def validate(self, authorization: str | None) -> Grant:
        """Return the grant of a bearer token, or raise a 401 GmailError."""
        scheme, _, token = (authorization or "").partition(" ")
        grant = self.grants.get(token.strip()) if scheme.lower() == "bearer" else None
        if grant is None or grant.expires_at <= self.clock.now():
            raise GmailError(
                401,
                "authError",
                "Request had invalid authentication credentials. Expected OAuth 2 "
                "access token, login cookie or other valid authentication credential.",
                headers={
                    "WWW-Authenticate": 'Bearer realm="https://accounts.google.com/"'
                },
            )
        return grant


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii")


# --- per-user limits, faults, request log ---------------------------------------------


class UserLimits:
    """Gmail's per-user limits: quota units in a sliding window, requests in flight."""

    def __init__(self, settings: GmailSimSettings, clock: SimClock) -> None:
        self.settings = settings
        self.clock = clock
        self.in_flight: dict[str, int] = {}
        self.peak_in_flight: dict[str, int] = {}
        self.spent: dict[str, deque[tuple[float, int]]] = {}
        self.units_total: dict[str, int] = {}

    def units_in_window(self, user: str) -> int:
        window = self._window(user)
        return sum(units for _, units in window)

    def acquire(self, user: str, units: int) -> None:
        """Charge `units` and take a request slot, or raise a 429 GmailError."""
        if self.in_flight.get(user, 0) >= self.settings.concurrency_limit:
            raise GmailError(
                429,
                "rateLimitExceeded",
                "Too many concurrent requests for user.",
                domain="usageLimits",
                headers={"Retry-After": self.clock.real_seconds(1.0)},
            )
        window = self._window(user)
        used = sum(spent for _, spent in window)
        if used + units > self.settings.user_quota_units:
            wait = self._wait_for(window, used + units - self.settings.user_quota_units)
            retry_at = datetime.fromtimestamp(self.clock.now() + wait, UTC)
            raise GmailError(
                429,
                "userRateLimitExceeded",
                "User-rate limit exceeded.  Retry after "
                f"{retry_at.strftime('%Y-%m-%dT%H:%M:%S.')}"
                f"{retry_at.microsecond // 1000:03d}Z",
                domain="usageLimits",
                headers={"Retry-After": self.clock.real_seconds(wait)},
            )
        window.append((self.clock.now(), units))
        self.units_total[user] = self.units_total.get(user, 0) + units
        self.in_flight[user] = self.in_flight.get(user, 0) + 1
        self.peak_in_flight[user] = max(
            self.peak_in_flight.get(user, 0), self.in_flight[user]
        )

    def release(self, user: str) -> None:
        self.in_flight[user] -= 1

    def reset(self) -> None:
        self.in_flight.clear()
        self.peak_in_flight.clear()
        self.spent.clear()
        self.units_total.clear()

    def _window(self, user: str) -> deque[tuple[float, int]]:
        window = self.spent.setdefault(user, deque())
        cutoff = self.clock.now() - self.settings.quota_window_seconds
        while window and window[0][0] <= cutoff:
            window.popleft()
        return window

    def _wait_for(self, window: deque[tuple[float, int]], excess: int) -> float:
        """Return the simulated seconds until `excess` units leave the window."""
        freed = 0
        for moment, units in window:
            freed += units
            if freed >= excess:
                return max(
                    0.0, moment + self.settings.quota_window_seconds - self.clock.now()
                )
        return self.settings.quota_window_seconds


@dataclass
class FaultRule:
    """A fault for the next `count` requests whose decoded path matches `path`.

    `path` is a regular expression searched in the percent-decoded path; `method`
    narrows it, and so does `query`, a regular expression searched in the decoded
    query string of the URL. `skip` lets that many matching requests through first.
    The response is `status` with a Google error body whose reason is `reason`, or
    no response at all with `drop`. `delay_ms` waits that long (real time) first,
    which makes a client time out. With `after_effect` the request is carried out
    first and only its response is replaced: the client sees a failure of a change
    that happened.

    With `hold`, a matching request waits without a response until the rules are
    cleared or the simulator stops, so a test can stop a client at that request
    and kill it there. A held request then gets the fault, or, with
    `after_effect`, the response of the change that already happened. `held`
    counts the requests waiting on the rule, and `reached` is set once the first
    one waits, so an in-process test can await it.

    A rule with a `probability` below 1 hits each matching request with that
    chance, and a rule with `until` stops at that time on the simulator's clock
    (`SimClock.now`), so a storm of faults can cover a share of the requests for a
    while.
    """

    path: str
    count: int = 1
    method: str | None = None
    query: str | None = None
    skip: int = 0
    status: int = 503
    reason: str | None = None
    message: str | None = None
    retry_after: str | None = None
    drop: bool = False
    delay_ms: float = 0.0
    after_effect: bool = False
    hold: bool = False
    held: int = 0
    probability: float = 1.0
    until: float | None = None
    rule_id: int = 0
    released: asyncio.Event = field(
        default_factory=asyncio.Event, repr=False, compare=False
    )
    reached: asyncio.Event = field(
        default_factory=asyncio.Event, repr=False, compare=False
    )

    def matches(self, method: str, path: str, now: float, query: str = "") -> bool:
        if self.count <= 0:
            return False
        if self.until is not None and now >= self.until:
            return False
        if self.method is not None and self.method.upper() != method:
            return False
        if self.query is not None and re.search(self.query, query) is None:
            return False
        return re.search(self.path, path) is not None

    def view(self) -> dict[str, Any]:
        """Return the rule as JSON data for the admin API."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.repr}

    async def wait_for_release(self) -> None:
        """Wait, counted in `held`, until the rules are cleared."""
        self.held += 1
        self.reached.set()
        try:
            await self.released.wait()
        finally:
            self.held -= 1


class FaultInjector:
    """The fault rules set through the admin API, used in the order they were added."""

    def __init__(self, clock: Callable[[], float] = time.time, seed: int = 0) -> None:
        self.rules: list[FaultRule] = []
        self._next_id = 1
        self._clock = clock
        # Seeded, so that a storm of faults hits the same requests on every run.
        self._random = random.Random(seed)  # noqa: S311 - test faults, not secrets

    def add(self, data: dict[str, Any]) -> FaultRule:
        allowed = {f.name for f in fields(FaultRule)} - {
            "rule_id",
            "held",
            "released",
            "reached",
        }
        unknown = set(data) - allowed
        if unknown:
            raise ValueError(
                f"Unknown fault fields {sorted(unknown)}; use {sorted(allowed)}."
            )
        if "path" not in data:
            raise ValueError("A fault needs a 'path' regular expression.")
        re.compile(str(data["path"]))
        if data.get("query") is not None:
            re.compile(str(data["query"]))
        probability = data.get("probability", 1.0)
        if not isinstance(probability, int | float) or not 0 < probability <= 1:
            raise ValueError(
                f"The fault probability {probability!r} is outside (0, 1]; give the "
                "share of matching requests to fail, such as 0.4."
            )
        if data.get("retry_after") is not None:
            data = {**data, "retry_after": str(data["retry_after"])}
        rule = FaultRule(**data, rule_id=self._next_id)
        self._next_id += 1
        self.rules.append(rule)
        return rule

    def take(self, method: str, path: str, query: str = "") -> FaultRule | None:
        now = self._clock()
        for rule in self.rules:
            if not rule.matches(method, path, now, query):
                continue
            if rule.probability < 1 and self._random.random() >= rule.probability:
                continue
            if rule.skip > 0:
                rule.skip -= 1
                continue
            rule.count -= 1
            return rule
        return None

    def clear(self) -> None:
        """Remove every rule and release the requests that held rules keep waiting."""
        for rule in self.rules:
            rule.released.set()
        self.rules.clear()


@dataclass
class LoggedRequest:
    """One request as the simulator saw it, for tests and benchmarks.

    `time` is `SimClock.now` at arrival, `retry_after` the Retry-After header of
    the response, if it had one, and `fault_rule` the id of the fault rule that
    replaced the response.
    """

    seq: int
    time: float
    method: str
    path: str
    query: dict[str, list[str]]
    api_method: str | None = None
    mailbox: str | None = None
    units: int = 0
    status: int | None = None
    reason: str | None = None
    body: Any = None
    retry_after: str | None = None
    fault_rule: int | None = None


# --- the search language --------------------------------------------------------------


_TOKEN = re.compile(r'\s*(\(|\)|-?[A-Za-z_]+:"[^"]*"|-?"[^"]*"|-?[^\s()"]+)')


@dataclass(frozen=True)
class _Term:
    operator: str | None
    value: str
    negated: bool = False


# A parsed query: a list of OR branches, each a list of terms and nested Nodes
# that must all match.
Node = list[list[Any]]


class SearchQuery:
    """A parsed `q`: terms joined by AND (space) and OR, `-` negation, groups.

    Operators: rfc822msgid, in, label, is, from, to, subject, after, before, has;
    other words match the subject and body. Syntax errors raise a 400 GmailError.
    """

    OPERATORS: ClassVar[frozenset[str]] = frozenset(
        {
            "rfc822msgid",
            "in",
            "label",
            "is",
            "from",
            "to",
            "subject",
            "after",
            "before",
            "has",
        }
    )

    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = self._tokenize(text)
        self.position = 0
        self.tree = self._or()
        if self.position != len(self.tokens):
            raise invalid(f"Invalid query: unexpected ')' in {text!r}.")

    def _tokenize(self, text: str) -> list[str]:
        if text.count('"') % 2:
            raise invalid(f"Invalid query: unbalanced quote in {text!r}.")
        tokens = []
        position = 0
        while position < len(text):
            if text[position:].strip() == "":
                break
            match = _TOKEN.match(text, position)
            if match is None:
                raise invalid(f"Invalid query: cannot read {text[position:]!r}.")
            tokens.append(match.group(1))
            position = match.end()
        return tokens

    def _or(self) -> Node:
        groups: Node = [self._and()]
        while self.position < len(self.tokens) and self.tokens[self.position] == "OR":
            self.position += 1
            groups.append(self._and())
        return groups

    def _and(self) -> list[Any]:
        terms: list[Any] = []
        while self.position < len(self.tokens):
            word = self.tokens[self.position]
            if word in (")", "OR"):
                break
            self.position += 1
            if word == "(":
                terms.append(self._or())
                if (
                    self.position >= len(self.tokens)
                    or self.tokens[self.position] != ")"
                ):
                    raise invalid(f"Invalid query: unbalanced '(' in {self.text!r}.")
                self.position += 1
            else:
                terms.append(self._term(word))
        if not terms:
            raise invalid(f"Invalid query: empty expression in {self.text!r}.")
        return terms

    def _term(self, token: str) -> _Term:
        negated = token.startswith("-") and len(token) > 1
        if negated:
            token = token[1:]
        operator, colon, value = token.partition(":")
        if colon and operator.lower() in self.OPERATORS:
            value = value.strip('"')
            if not value:
                raise invalid(f"Invalid query: {operator}: needs a value.")
            return _Term(operator.lower(), value, negated)
        return _Term(None, token.strip('"'), negated)

    def names_location(self) -> bool:
        """Return whether the query names SPAM or TRASH itself (in:spam, in:trash)."""
        return bool(
            re.search(r"\b(in|label):(spam|trash|anywhere)\b", self.text, re.IGNORECASE)
        )


# --- the simulator --------------------------------------------------------------------


class InnerRequest:
    """One part of a batch request, with the attributes the dispatcher reads."""

    def __init__(
        self,
        method: str,
        raw_path: str,
        headers: dict[str, str],
        body: bytes,
        transport: asyncio.BaseTransport | None,
    ) -> None:
        self.method = method
        self.raw_path = raw_path
        self.headers = CIMultiDict(headers)
        self.transport = transport
        self._body = body

    async def read(self) -> bytes:
        return self._body

    async def text(self) -> str:
        return self._body.decode("utf-8", errors="replace")

    async def post(self) -> dict[str, str]:
        return dict(parse_qsl(await self.text(), keep_blank_values=True))


AnyRequest = web.Request | InnerRequest


@dataclass
class GmailCall:
    """One Gmail request after decoding: caller, mailbox and parameters."""

    request: AnyRequest
    grant: Grant
    mailbox: str
    params: list[str]
    query: dict[str, list[str]]
    body: dict[str, Any] = field(default_factory=dict)

    def arg(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else default

    def flag(self, name: str) -> bool:
        return (self.arg(name) or "false").lower() == "true"


Handler = Callable[[GmailCall], Awaitable[web.Response]]


class GmailSimulator:
    """The Gmail simulator: an aiohttp application over a `World`."""

    ROUTES: ClassVar[list[tuple[str, tuple[str, ...], str]]] = [
        ("GET", ("messages",), "messages.list"),
        ("POST", ("messages",), "messages.insert"),
        ("POST", ("messages", "import"), "messages.import"),
        ("POST", ("messages", "batchModify"), "messages.batchModify"),
        ("POST", ("messages", "batchDelete"), "messages.batchDelete"),
        ("GET", ("messages", "*"), "messages.get"),
        ("DELETE", ("messages", "*"), "messages.delete"),
        ("POST", ("messages", "*", "modify"), "messages.modify"),
        ("POST", ("messages", "*", "trash"), "messages.trash"),
        ("POST", ("messages", "*", "untrash"), "messages.untrash"),
        ("GET", ("labels",), "labels.list"),
        ("POST", ("labels",), "labels.create"),
        ("GET", ("labels", "*"), "labels.get"),
        ("DELETE", ("labels", "*"), "labels.delete"),
    ]

    def __init__(
        self,
        world: World,
        settings: GmailSimSettings | None = None,
        *,
        scenario_path: Path | None = None,
        clock: SimClock | None = None,
    ) -> None:
        self.world = world
        self.settings = settings or GmailSimSettings()
        self.scenario_path = scenario_path
        self.clock = clock or SimClock(self.settings.time_scale)
        self.tokens = TokenIssuer(world, self.clock, self.settings)
        self.limits = UserLimits(self.settings, self.clock)
        self.faults = FaultInjector(self.clock.now)
        self.log: deque[LoggedRequest] = deque(maxlen=self.settings.request_log_size)
        self._seq = 0
        self._ids: dict[str, str] = {}
        # Item ids by mailbox, built on first use, because a world keeps one flat
        # dict of items and a benchmark world holds thousands of mailboxes.
        self._index: dict[str, list[str]] | None = None
        self._runner: web.AppRunner | None = None
        self.base_url: str | None = None

    # --- lifecycle --------------------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on host:port (0 picks a free port) and return the base URL."""
        self._runner = web.AppRunner(
            self.make_app(),
            access_log=None,
            keepalive_timeout=0 if self.settings.close_connections else 75,
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self.base_url = f"http://{host}:{site.port}"
        logger.info("Gmail simulator started url=%s", self.base_url)
        return self.base_url

    async def stop(self) -> None:
        """Release the held requests, then stop serving."""
        self.faults.clear()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            logger.info("Gmail simulator stopped url=%s", self.base_url)

    def reset(self) -> None:
        """Start again from the scenario file: state, faults, limits, tokens and log."""
        if self.scenario_path is not None:
            self.world.scenario = load_scenario(self.scenario_path)
            self.world.tenants = {
                t.domain.lower(): t for t in self.world.scenario.tenants
            }
        self.world.populate()
        self.world.save()
        self.faults.clear()
        self.limits.reset()
        self.tokens.grants.clear()
        self.log.clear()
        self._ids.clear()
        self._index = None

    @property
    def token_url(self) -> str:
        return f"{self.base_url}/token"

    # --- dispatch ---------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        # Gmail's client library is synchronous and runs in threads, which block
        # on the response once the whole request is read. On a virtual
        # clock that wait lets the clock jump.
        await request.read()
        with serving_thread():
            return await self._dispatch(request)

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        path = request.raw_path.partition("?")[0]
        segments = [unquote(part) for part in path.split("/")[1:]]
        if segments and segments[0] == "_sim":
            return await self._admin(request, segments[1:])
        if request.method == "POST" and segments[:1] == ["batch"]:
            response = await self._batch(request)
        else:
            response = await self._process(request)
        if self.settings.close_connections:
            response.force_close()
        return response

    async def _process(self, request: AnyRequest) -> web.Response:
        """Serve one request, or one part of a batch, and log it."""
        path, _, raw_query = request.raw_path.partition("?")
        segments = [unquote(part) for part in path.split("/")[1:]]
        self._seq += 1
        entry = LoggedRequest(
            self._seq,
            self.clock.now(),
            request.method,
            "/" + "/".join(segments),
            _query_lists(raw_query),
        )
        self.log.append(entry)
        try:
            response = await self._serve(request, segments, entry)
        except GmailError as exc:
            response = self._error(exc)
            entry.reason = exc.reason
        except TokenError as exc:
            response = web.json_response(
                {"error": exc.error, "error_description": exc.description},
                status=exc.status,
            )
            entry.reason = exc.error
        except _DropConnection:
            entry.status = 0
            if request.transport is not None:
                request.transport.close()
            raise asyncio.CancelledError() from None
        except Exception as exc:
            logger.exception(
                "Gmail simulator failed a request method=%s path=%s",
                request.method,
                entry.path,
            )
            response = self._error(
                GmailError(500, "backendError", f"Simulator error: {exc!r}")
            )
        entry.status = response.status
        entry.retry_after = response.headers.get("Retry-After")
        return response

    async def _serve(
        self, request: AnyRequest, segments: list[str], entry: LoggedRequest
    ) -> web.Response:
        is_token = segments == ["token"] and request.method == "POST"
        is_api = len(segments) >= 4 and segments[:3] == ["gmail", "v1", "users"]
        if is_api:
            method, api_method, params = self._route(request, segments[4:], entry)
            entry.api_method = api_method
            entry.mailbox = segments[3].lower()
        query = unquote_plus(request.raw_path.partition("?")[2])
        fault = self.faults.take(request.method, entry.path, query)
        if fault is not None:
            entry.fault_rule = fault.rule_id
        if fault is not None and fault.delay_ms > 0:
            await asyncio.sleep(fault.delay_ms / 1000)
        if fault is not None and not fault.after_effect:
            if fault.hold:
                await fault.wait_for_release()
            return self._fault(fault)

        if is_token:
            form = dict(await request.post())
            body = self.tokens.issue(
                {k: str(v) for k, v in form.items()}, self.token_url
            )
            return web.json_response(body)
        if not is_api:
            raise GmailError(404, "notFound", f"Not Found: {entry.path}")

        grant = self.tokens.validate(request.headers.get("Authorization"))
        mailbox = self._check_user(grant, segments[3])
        entry.mailbox = mailbox
        if not grant.scopes & METHOD_SCOPES[api_method]:
            raise GmailError(
                403,
                "insufficientPermissions",
                "Request had insufficient authentication scopes.",
            )
        call = GmailCall(request, grant, mailbox, params, entry.query)
        if method == "GET" and request.method == "POST":
            # A long URL sent as POST with X-HTTP-Method-Override: GET.
            for name, value in parse_qsl(await request.text(), keep_blank_values=True):
                call.query.setdefault(name, []).append(value)
        elif request.method == "POST":
            call.body = await self._json_body(request)
            entry.body = _loggable(call.body)

        units = QUOTA_UNITS[api_method]
        self.limits.acquire(mailbox, units)
        entry.units = units
        try:
            if self.settings.latency_ms > 0:
                await self.clock.sleep(self.settings.latency_ms / 1000)
            handler: Handler = getattr(self, "_" + api_method.replace(".", "_"))
            response = await handler(call)
        finally:
            self.limits.release(mailbox)
        if fault is not None and fault.hold:
            await fault.wait_for_release()
        elif fault is not None:
            return self._fault(fault)
        return response

    def _route(
        self, request: AnyRequest, rest: list[str], entry: LoggedRequest
    ) -> tuple[str, str, list[str]]:
        method = request.method
        override = request.headers.get("X-HTTP-Method-Override")
        if method == "POST" and override:
            method = override.upper()
        for want_method, pattern, api_method in self.ROUTES:
            if len(pattern) != len(rest) or want_method != method:
                continue
            params = []
            for want, got in zip(pattern, rest, strict=True):
                if want == "*":
                    params.append(got)
                elif want != got:
                    break
            else:
                return method, api_method, params
        raise GmailError(404, "notFound", f"Not Found: {request.method} {entry.path}")

    def _check_user(self, grant: Grant, user_id: str) -> str:
        if user_id == "me" or user_id.lower() == grant.subject:
            return grant.subject
        raise GmailError(
            403,
            "forbidden",
            f"Delegation denied for {grant.subject}",
        )

    async def _json_body(self, request: AnyRequest) -> dict[str, Any]:
        raw = await request.read()
        if not raw:
            return {}
        try:
            body = json.loads(raw)
        except ValueError:
            raise invalid("Invalid JSON payload received.") from None
        if not isinstance(body, dict):
            raise invalid("Invalid JSON payload received. Expected an object.")
        return body

    def _error(self, exc: GmailError) -> web.Response:
        return web.json_response(exc.body(), status=exc.status, headers=exc.headers)

    def _fault(self, fault: FaultRule) -> web.Response:
        if fault.drop:
            raise _DropConnection()
        headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
        reason = fault.reason or _FAULT_REASONS.get(fault.status, "backendError")
        message = fault.message or f"Injected fault ({reason})."
        domain = (
            "usageLimits" if "RateLimit" in reason or "quota" in reason else "global"
        )
        return self._error(
            GmailError(fault.status, reason, message, domain=domain, headers=headers)
        )

    # --- the batch endpoint ---------------------------------------------------------

    async def _batch(self, request: web.Request) -> web.Response:
        """Serve a multipart/mixed batch: every part runs as its own request.

        The parts run concurrently, each with its own token, quota units, latency
        and faults, and the answer holds one application/http part per request
        with the Content-ID `response-<id>`. More than `max_batch_parts` parts, or
        a body that is no multipart/mixed message, get 400 for the whole batch.
        """
        self._seq += 1
        entry = LoggedRequest(self._seq, self.clock.now(), "POST", "/batch", {})
        self.log.append(entry)
        entry.api_method = "batch"
        try:
            parts = _batch_parts(
                request.headers.get("Content-Type", ""), await request.read()
            )
            if len(parts) > self.settings.max_batch_parts:
                raise invalid(
                    f"A batch may contain at most {self.settings.max_batch_parts} "
                    f"requests; this one contains {len(parts)}."
                )
        except GmailError as exc:
            entry.status = exc.status
            entry.reason = exc.reason
            return self._error(exc)

        inner = [
            InnerRequest(method, target, headers, body, request.transport)
            for _, method, target, headers, body in parts
        ]
        responses = await asyncio.gather(*(self._process(r) for r in inner))
        boundary = f"batch_{secrets.token_hex(12)}"
        chunks = []
        for (content_id, *_), response in zip(parts, responses, strict=True):
            payload = response.body if isinstance(response.body, bytes) else b""
            reason = response.reason or ""
            head = (
                f"--{boundary}\r\nContent-Type: application/http\r\n"
                f"Content-ID: <response-{content_id}>\r\n\r\n"
                f"HTTP/1.1 {response.status} {reason}\r\n"
                f"Content-Type: {response.content_type}; charset=UTF-8\r\n"
                f"{_passed_headers(response)}"
                f"Content-Length: {len(payload)}\r\n\r\n"
            )
            chunks.append(head.encode("utf-8") + payload + b"\r\n")
        chunks.append(f"--{boundary}--\r\n".encode("ascii"))
        entry.status = 200
        return web.Response(
            body=b"".join(chunks),
            status=200,
            headers={"Content-Type": f"multipart/mixed; boundary={boundary}"},
        )

    # --- labels as the world stores them ----------------------------------------------

    def _user_labels(self, mailbox: str) -> dict[str, Folder]:
        """Return the user labels of a mailbox by label id."""
        box = self.world.mailbox(mailbox)
        labels = {}
        for folder in box.folders.values():
            if folder.well_known is None:
                labels[_label_id(folder)] = folder
        return labels

    def _label_name(self, folder: Folder) -> str:
        return self.world.folder_path(folder)

    def _labels_of(self, item: Item) -> list[str]:
        folder = self.world.mailbox(item.mailbox).folders[item.folder_id]
        labels: list[str] = []
        if folder.well_known in FOLDER_LABELS:
            labels.append(FOLDER_LABELS[folder.well_known])
        elif folder.well_known is None:
            labels.append(_label_id(folder))
        labels.extend(label for label in item.labels if label not in labels)
        if not item.is_read:
            labels.append("UNREAD")
        return labels

    def _set_labels(self, item: Item, labels: list[str]) -> None:
        """Store a label set: one label picks the folder, the rest go to `labels`."""
        wanted = list(dict.fromkeys(labels))
        item.is_read = "UNREAD" not in wanted
        rest = [label for label in wanted if label != "UNREAD"]
        user = self._user_labels(item.mailbox)
        folder_label = next((label for label in LOCATION_ORDER if label in rest), None)
        if folder_label is None:
            folder_label = next((label for label in rest if label in user), None)
        if folder_label is None:
            folder = self.world.folder(item.mailbox, "archive")
        elif folder_label in LABEL_FOLDERS:
            folder = self.world.folder(item.mailbox, LABEL_FOLDERS[folder_label])
        else:
            folder = user[folder_label]
        item.folder_id = folder.folder_id
        item.labels = [label for label in rest if label != folder_label]
        item.version += 1
        item.modified_at = datetime.fromtimestamp(self.clock.now(), UTC)

    def _check_labels(
        self, mailbox: str, labels: Any, *, fixed_allowed: bool = False
    ) -> list[str]:
        if labels is None:
            return []
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise invalid("Label ids must be a list of strings.")
        user = self._user_labels(mailbox)
        for label in labels:
            if label not in SYSTEM_LABELS and label not in user:
                raise invalid(f"Invalid label: {label}")
            if label in FIXED_LABELS and not fixed_allowed:
                raise invalid(f"Invalid label: {label} cannot be added or removed.")
        return list(labels)

    def _change_labels(self, item: Item, add: list[str], remove: list[str]) -> None:
        labels = [label for label in self._labels_of(item) if label not in remove]
        # SPAM and TRASH exclude each other, because a copy is in at most one of them.
        if "TRASH" in add:
            labels = [label for label in labels if label != "SPAM"]
        if "SPAM" in add:
            labels = [label for label in labels if label != "TRASH"]
        labels.extend(label for label in add if label not in labels)
        self._set_labels(item, labels)

    # --- messages as the world stores them --------------------------------------------

    def _items_of(self, mailbox: str) -> list[Item]:
        if self._index is None:
            index: dict[str, list[str]] = {}
            for item in self.world.items.values():
                index.setdefault(item.mailbox, []).append(item.item_id)
            self._index = index
        items = self.world.items
        return [items[i] for i in self._index.get(mailbox, []) if i in items]

    def _gmail_id(self, item: Item) -> str:
        gmail_id = hashlib.sha256(item.item_id.encode("utf-8")).hexdigest()[:16]
        self._ids[gmail_id] = item.item_id
        return gmail_id

    def _item(self, mailbox: str, gmail_id: str) -> Item:
        if not re.fullmatch(r"[0-9a-f]{16}", gmail_id):
            raise invalid("Invalid id value")
        item_id = self._ids.get(gmail_id)
        if item_id is None:
            for candidate in self._items_of(mailbox):
                self._gmail_id(candidate)
            item_id = self._ids.get(gmail_id)
        item = self.world.items.get(item_id or "")
        if item is None or item.mailbox != mailbox:
            raise not_found()
        return item

    def _thread_id(self, item: Item) -> str:
        headers = {name.lower(): value for name, value in item.summary.headers}
        references = headers.get("references", "").split()
        root = references[0] if references else item.summary.internet_message_id or ""
        digest = hashlib.sha256(f"{item.mailbox}\x1f{root}".encode()).hexdigest()
        return digest[:16]

    def _message_json(
        self, item: Item, message_format: str, metadata_headers: list[str]
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self._gmail_id(item),
            "threadId": self._thread_id(item),
            "labelIds": self._labels_of(item),
            "snippet": " ".join(item.summary.body.split())[:200],
            "historyId": str(1000 + item.version),
            "internalDate": str(int(item.received_at.timestamp() * 1000)),
            "sizeEstimate": len(item.mime),
        }
        if message_format == "raw":
            body["raw"] = _b64url(item.mime)
        elif message_format == "metadata":
            wanted = {name.lower() for name in metadata_headers}
            headers = [
                {"name": name, "value": value}
                for name, value in item.summary.headers
                if not wanted or name.lower() in wanted
            ]
            message = message_from_bytes(item.mime, policy=compat32)
            body["payload"] = {
                "partId": "",
                "mimeType": message.get_content_type(),
                "filename": "",
                "headers": headers,
            }
        elif message_format == "full":
            message = message_from_bytes(item.mime, policy=compat32)
            body["payload"] = _part_json(message, "", self._gmail_id(item))
        return body

    def _short(self, item: Item) -> dict[str, Any]:
        return {
            "id": self._gmail_id(item),
            "threadId": self._thread_id(item),
            "labelIds": self._labels_of(item),
        }

    def _matches(self, item: Item, node: Node) -> bool:
        return any(
            all(
                self._term_matches(item, term)
                if isinstance(term, _Term)
                else self._matches(item, term)
                for term in group
            )
            for group in node
        )

    def _term_matches(self, item: Item, term: _Term) -> bool:
        return self._term_value(item, term) != term.negated

    def _term_value(self, item: Item, term: _Term) -> bool:
        summary = item.summary
        value = term.value
        labels = self._labels_of(item)
        if term.operator == "rfc822msgid":
            found = (summary.internet_message_id or "").strip()
            return _bare(found) == _bare(value)
        if term.operator in ("in", "label", "is"):
            wanted = value.upper().replace("-", "_")
            aliases = {"READ": None, "DRAFTS": "DRAFT", "CHATS": "CHAT"}
            if wanted == "ANYWHERE":
                return True
            if wanted == "READ":
                return "UNREAD" not in labels
            wanted = aliases.get(wanted, wanted) or wanted
            if wanted in labels:
                return True
            user = self._user_labels(item.mailbox)
            names = {
                self._label_name(user[label]).lower()
                for label in labels
                if label in user
            }
            return value.lower() in names
        if term.operator in ("from", "to"):
            addresses = (
                [summary.sender] if term.operator == "from" and summary.sender else []
            )
            if term.operator == "to":
                addresses = [*summary.to, *summary.cc]
            return any(
                value.lower() in f"{name} {address}".lower()
                for name, address in addresses
                if address
            )
        if term.operator == "subject":
            return value.lower() in summary.subject.lower()
        if term.operator in ("after", "before"):
            moment = _query_time(value)
            received = item.received_at.timestamp()
            return received >= moment if term.operator == "after" else received < moment
        if term.operator == "has":
            return value.lower() == "attachment" and summary.has_attachments
        text = f"{summary.subject}\n{summary.body}".lower()
        return value.lower() in text

    # --- users.messages ---------------------------------------------------------------

    async def _messages_list(self, call: GmailCall) -> web.Response:
        text = call.arg("q")
        query = SearchQuery(text) if text and text.strip() else None
        if query is not None and call.grant.scopes <= {METADATA_SCOPE}:
            raise GmailError(
                403,
                "forbidden",
                "Metadata scope does not support 'q' parameter",
            )
        label_ids = self._check_labels(
            call.mailbox, call.query.get("labelIds"), fixed_allowed=True
        )
        include_spam_trash = call.flag("includeSpamTrash")
        if query is not None and query.names_location():
            include_spam_trash = True
        limit = _bounded_int(
            call.arg("maxResults"),
            self.settings.default_results,
            self.settings.max_results,
        )
        offset = _page_offset(call.arg("pageToken"))

        found = []
        for item in self._items_of(call.mailbox):
            labels = self._labels_of(item)
            if not include_spam_trash and ("SPAM" in labels or "TRASH" in labels):
                continue
            if any(label not in labels for label in label_ids):
                continue
            if query is not None and not self._matches(item, query.tree):
                continue
            found.append(item)
        found.sort(key=lambda i: (i.received_at, i.item_id), reverse=True)
        page = found[offset : offset + limit]
        body: dict[str, Any] = {"resultSizeEstimate": len(found)}
        if page:
            body["messages"] = [
                {"id": self._gmail_id(i), "threadId": self._thread_id(i)} for i in page
            ]
        if offset + limit < len(found):
            body["nextPageToken"] = _b64url(str(offset + limit).encode())
        return web.json_response(body)

    async def _messages_get(self, call: GmailCall) -> web.Response:
        message_format = call.arg("format", "full") or "full"
        if message_format not in FORMATS:
            raise invalid(f"Invalid value at 'format' ({message_format}).")
        if call.grant.scopes <= {METADATA_SCOPE} and message_format in ("full", "raw"):
            raise GmailError(
                403,
                "forbidden",
                f"Metadata scope doesn't allow format {message_format.upper()}",
            )
        item = self._item(call.mailbox, call.params[0])
        headers = call.query.get("metadataHeaders", [])
        return web.json_response(self._message_json(item, message_format, headers))

    async def _messages_import(self, call: GmailCall) -> web.Response:
        return self._store(call, default_date_source="dateHeader")

    async def _messages_insert(self, call: GmailCall) -> web.Response:
        return self._store(call, default_date_source="receivedTime")

    def _store(self, call: GmailCall, *, default_date_source: str) -> web.Response:
        """Store a message from a JSON `raw` body with the labels of `labelIds`."""
        raw = call.body.get("raw")
        if not isinstance(raw, str) or not raw:
            raise invalid(
                "'raw' RFC822 payload message string or uploading message via "
                "/upload/* URL required"
            )
        try:
            mime = _b64url_decode(raw.strip())
        except (binascii.Error, ValueError):
            raise invalid(
                "Invalid value for ByteString: raw is not base64url."
            ) from None
        message = message_from_bytes(mime, policy=compat32)
        if not message.keys():
            raise invalid("Invalid RFC822 message: no headers.")

        labels = self._check_labels(
            call.mailbox, call.body.get("labelIds"), fixed_allowed=True
        )
        source = call.arg("internalDateSource", default_date_source)
        received = datetime.fromtimestamp(self.clock.now(), UTC)
        if source == "dateHeader" and message.get("Date"):
            with contextlib.suppress(TypeError, ValueError):
                received = email.utils.parsedate_to_datetime(str(message["Date"]))

        archive = self.world.folder(call.mailbox, "archive")
        item = self.world.add_item(
            call.mailbox, archive.folder_id, mime, received_at=received, is_read=True
        )
        if self._index is not None:
            self._index.setdefault(item.mailbox, []).append(item.item_id)
        self._set_labels(item, labels)
        self.world.save()
        logger.info(
            "Gmail simulator stored a message mailbox=%s id=%s labels=%s",
            call.mailbox,
            self._gmail_id(item),
            labels,
        )
        return web.json_response(self._short(item))

    async def _messages_modify(self, call: GmailCall) -> web.Response:
        item = self._item(call.mailbox, call.params[0])
        add, remove = self._label_changes(call)
        self._change_labels(item, add, remove)
        self.world.save()
        return web.json_response(self._short(item))

    async def _messages_batchModify(self, call: GmailCall) -> web.Response:
        items = self._batch_items(call)
        add, remove = self._label_changes(call)
        for item in items:
            self._change_labels(item, add, remove)
        self.world.save()
        return web.Response(status=204)

    async def _messages_trash(self, call: GmailCall) -> web.Response:
        item = self._item(call.mailbox, call.params[0])
        self._change_labels(item, ["TRASH"], [])
        self.world.save()
        return web.json_response(self._short(item))

    async def _messages_untrash(self, call: GmailCall) -> web.Response:
        item = self._item(call.mailbox, call.params[0])
        self._change_labels(item, [], ["TRASH"])
        self.world.save()
        return web.json_response(self._short(item))

    async def _messages_delete(self, call: GmailCall) -> web.Response:
        item = self._item(call.mailbox, call.params[0])
        self.world.remove_item(call.mailbox, item.item_id)
        self.world.save()
        return web.Response(status=204)

    async def _messages_batchDelete(self, call: GmailCall) -> web.Response:
        for item in self._batch_items(call):
            self.world.remove_item(call.mailbox, item.item_id)
        self.world.save()
        return web.Response(status=204)

    def _label_changes(self, call: GmailCall) -> tuple[list[str], list[str]]:
        add = self._check_labels(call.mailbox, call.body.get("addLabelIds"))
        remove = self._check_labels(call.mailbox, call.body.get("removeLabelIds"))
        both = set(add) & set(remove)
        if both:
            raise invalid(
                f"Labels {sorted(both)} cannot be both added and removed in one "
                "request."
            )
        return add, remove

    def _batch_items(self, call: GmailCall) -> list[Item]:
        ids = call.body.get("ids")
        if (
            not isinstance(ids, list)
            or not ids
            or not all(isinstance(i, str) for i in ids)
        ):
            raise invalid("ids must be a non-empty list of message ids.")
        if len(ids) > self.settings.max_batch_ids:
            raise invalid(
                f"Too many ids: {len(ids)} given, at most "
                f"{self.settings.max_batch_ids} allowed per request."
            )
        items = []
        for gmail_id in dict.fromkeys(ids):
            try:
                items.append(self._item(call.mailbox, gmail_id))
            except GmailError:
                raise invalid(f"Invalid id value: {gmail_id}") from None
        return items

    # --- users.labels -----------------------------------------------------------------

    def _label_json(self, label_id: str, folder: Folder | None) -> dict[str, Any]:
        if folder is None:
            return {
                "id": label_id,
                "name": label_id,
                "type": "system",
                "messageListVisibility": "show",
                "labelListVisibility": "labelShow",
            }
        return {
            "id": label_id,
            "name": self._label_name(folder),
            "type": "user",
            "messageListVisibility": "hide" if folder.hidden else "show",
            "labelListVisibility": "labelHide" if folder.hidden else "labelShow",
        }

    async def _labels_list(self, call: GmailCall) -> web.Response:
        labels = [self._label_json(label, None) for label in SYSTEM_LABELS]
        labels.extend(
            self._label_json(label_id, folder)
            for label_id, folder in self._user_labels(call.mailbox).items()
        )
        return web.json_response({"labels": labels})

    async def _labels_get(self, call: GmailCall) -> web.Response:
        label_id = call.params[0]
        if label_id in SYSTEM_LABELS:
            return web.json_response(self._label_json(label_id, None))
        folder = self._user_labels(call.mailbox).get(label_id)
        if folder is None:
            raise not_found()
        return web.json_response(self._label_json(label_id, folder))

    async def _labels_create(self, call: GmailCall) -> web.Response:
        name = call.body.get("name")
        if not isinstance(name, str) or not name.strip():
            raise invalid("Invalid label name: a label needs a name.")
        name = name.strip()
        taken = {label.lower() for label in SYSTEM_LABELS}
        taken |= {
            self._label_name(folder).lower()
            for folder in self._user_labels(call.mailbox).values()
        }
        if name.lower() in taken:
            raise GmailError(409, "duplicate", "Label name exists or conflicts")
        hidden = call.body.get("labelListVisibility") == "labelHide"
        root = self.world.folder(call.mailbox, ROOT_FOLDER)
        try:
            folder = self.world.create_folder(
                call.mailbox, root.folder_id, name, hidden=hidden
            )
        except FolderExistsError:
            raise GmailError(
                409, "duplicate", "Label name exists or conflicts"
            ) from None
        self.world.save()
        return web.json_response(self._label_json(_label_id(folder), folder))

    async def _labels_delete(self, call: GmailCall) -> web.Response:
        label_id = call.params[0]
        if label_id in SYSTEM_LABELS:
            raise invalid("Invalid delete request: system labels cannot be deleted.")
        folder = self._user_labels(call.mailbox).get(label_id)
        if folder is None:
            raise not_found()
        for item in list(self._items_of(call.mailbox)):
            labels = self._labels_of(item)
            if label_id in labels:
                self._set_labels(item, [label for label in labels if label != label_id])
        del self.world.mailbox(call.mailbox).folders[folder.folder_id]
        self.world.save()
        return web.Response(status=204)

    # --- admin API --------------------------------------------------------------------

    async def _admin(self, request: web.Request, segments: list[str]) -> web.Response:
        try:
            return await self._admin_route(request, segments)
        except (ValueError, KeyError, TypeError, re.error) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        except (UnknownMailboxError, FolderNotFoundError, WorldError) as exc:
            return web.json_response({"error": str(exc)}, status=404)

    async def _admin_route(
        self, request: web.Request, segments: list[str]
    ) -> web.Response:
        if (
            request.method == "GET"
            and len(segments) == 3
            and segments[0] == "mailboxes"
        ):
            if segments[2] != "messages":
                raise ValueError(f"No mailbox view {segments[2]!r}; use messages.")
            return web.json_response(self.snapshot(segments[1]))
        path = "/".join(segments)
        if (request.method, path) == ("GET", "health"):
            return web.json_response({"status": "ok"})
        if (request.method, path) == ("POST", "reset"):
            self.reset()
            return web.json_response({"status": "reset"})
        if (request.method, path) == ("GET", "requests"):
            since = int(request.query.get("since", "0"))
            return web.json_response([asdict(e) for e in self.log if e.seq > since])
        if (request.method, path) == ("DELETE", "requests"):
            self.log.clear()
            return web.json_response({"status": "cleared"})
        if (request.method, path) == ("GET", "faults"):
            return web.json_response([rule.view() for rule in self.faults.rules])
        if (request.method, path) == ("POST", "faults"):
            rule = self.faults.add(await request.json())
            return web.json_response(rule.view(), status=201)
        if (request.method, path) == ("DELETE", "faults"):
            self.faults.clear()
            return web.json_response({"status": "cleared"})
        if (request.method, path) == ("GET", "quota"):
            return web.json_response(
                {
                    "units_total": self.limits.units_total,
                    "peak_in_flight": self.limits.peak_in_flight,
                }
            )
        if (request.method, path) == ("GET", "settings"):
            return web.json_response(asdict(self.settings))
        if (request.method, path) == ("PATCH", "settings"):
            self.update_settings(await request.json())
            return web.json_response(asdict(self.settings))
        return web.json_response(
            {"error": f"No admin route {request.method} /_sim/{path}."}, status=404
        )

    def update_settings(self, changes: dict[str, Any]) -> None:
        """Change settings by name; an unknown name raises ValueError."""
        known = {f.name for f in fields(GmailSimSettings)}
        for name, value in changes.items():
            if name not in known:
                raise ValueError(
                    f"Unknown setting {name!r}; use one of {sorted(known)}."
                )
            current = getattr(self.settings, name)
            setattr(self.settings, name, type(current)(value))
        self.clock.scale = self.settings.time_scale

    def snapshot(self, mailbox: str) -> list[dict[str, Any]]:
        """Describe every message of a mailbox as Gmail shows it, for tests."""
        box = self.world.mailbox(mailbox)
        user = self._user_labels(box.address)
        rows = []
        for item in sorted(self._items_of(box.address), key=lambda i: i.received_at):
            labels = self._labels_of(item)
            rows.append(
                {
                    "id": self._gmail_id(item),
                    "key": item.key,
                    "internet_message_id": item.summary.internet_message_id,
                    "labels": labels,
                    "label_names": [
                        self._label_name(user[label]) if label in user else label
                        for label in labels
                    ],
                    "marker_headers": {
                        name: value
                        for name, value in item.summary.headers
                        if name.lower().startswith("x-autopull-")
                    },
                }
            )
        return rows


# --- helpers --------------------------------------------------------------------------


def _label_id(folder: Folder) -> str:
    digest = hashlib.sha256(folder.folder_id.encode("utf-8")).hexdigest()
    return f"Label_{int(digest[:15], 16)}"


def _bare(message_id: str) -> str:
    text = message_id.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1].strip()
    return text


def _query_lists(raw_query: str) -> dict[str, list[str]]:
    # Gmail reads `+` in a query string as a space, as web servers do.
    query: dict[str, list[str]] = {}
    for name, value in parse_qsl(raw_query, keep_blank_values=True):
        query.setdefault(name, []).append(value)
    return query


def _bounded_int(text: str | None, default: int, maximum: int) -> int:
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise invalid(f"Invalid value '{text}': an integer is required.") from None
    if value < 1:
        raise invalid(f"Invalid value '{text}': it must be at least 1.")
    return min(value, maximum)


def _page_offset(token: str | None) -> int:
    if not token:
        return 0
    try:
        return int(_b64url_decode(token).decode("ascii"))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise invalid(f"Invalid pageToken {token!r}.") from None


def _query_time(value: str) -> float:
    """Read an after:/before: value: epoch seconds or a date as YYYY/MM/DD."""
    if value.isdigit():
        return float(value)
    try:
        moment = datetime.strptime(value.replace("-", "/"), "%Y/%m/%d")
    except ValueError:
        raise invalid(f"Invalid query: {value!r} is not a valid date.") from None
    return moment.replace(tzinfo=UTC).timestamp()


def _part_json(part: Message, part_id: str, message_id: str) -> dict[str, Any]:
    headers = [{"name": k, "value": str(v)} for k, v in part.items()]
    body: dict[str, Any] = {
        "partId": part_id,
        "mimeType": part.get_content_type(),
        "filename": part.get_filename() or "",
        "headers": headers,
    }
    if part.is_multipart():
        children = part.get_payload()
        assert isinstance(children, list)
        body["body"] = {"size": 0}
        body["parts"] = [
            _part_json(child, f"{part_id}.{n}" if part_id else str(n), message_id)
            for n, child in enumerate(children)
        ]
        return body
    payload = part.get_payload(decode=True)
    data = payload if isinstance(payload, bytes) else b""
    if part.get_filename() or part.get_content_disposition() == "attachment":
        digest = hashlib.sha256(f"{message_id}\x1f{part_id}".encode()).hexdigest()
        body["body"] = {"attachmentId": f"ANGjdJ{digest[:40]}", "size": len(data)}
    else:
        body["body"] = {"size": len(data), "data": _b64url(data)}
    return body


def _loggable(body: dict[str, Any]) -> Any:
    # The raw MIME is left out of the log; its length is kept.
    if "raw" in body and isinstance(body["raw"], str):
        return {**body, "raw": f"<{len(body['raw'])} characters>"}
    return body


def _batch_parts(
    content_type: str, body: bytes
) -> list[tuple[str, str, str, dict[str, str], bytes]]:
    """Split a batch body into (Content-ID, method, target, headers, body) parts."""
    if not content_type.lower().startswith("multipart/mixed"):
        raise invalid("A batch request must be multipart/mixed.")
    message = BytesParser(policy=compat32).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode("latin-1") + body
    )
    if not message.is_multipart():
        raise invalid("The batch body is not a multipart/mixed message.")
    parts = []
    for part in message.get_payload():
        assert isinstance(part, Message)
        content_id = str(part.get("Content-ID", "")).strip().strip("<>")
        payload = part.get_payload(decode=False)
        text = payload if isinstance(payload, str) else ""
        request_line, _, rest = text.lstrip("\r\n").partition("\n")
        words = request_line.strip().split(" ")
        if len(words) != 3 or not words[1].startswith("/"):
            raise invalid(f"Invalid batch part {content_id!r}: no request line.")
        head, _, inner_body = rest.replace("\r\n", "\n").partition("\n\n")
        headers = {
            name: str(value)
            for name, value in HeaderParser(policy=compat32).parsestr(head).items()
        }
        parts.append(
            (
                content_id,
                words[0].upper(),
                words[1],
                headers,
                inner_body.encode("utf-8"),
            )
        )
    return parts


def _passed_headers(response: web.Response) -> str:
    """Return the headers of a part's response that a client acts on."""
    names = ("Retry-After", "WWW-Authenticate")
    return "".join(
        f"{name}: {response.headers[name]}\r\n"
        for name in names
        if name in response.headers
    )
