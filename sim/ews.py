"""An Exchange Web Services (EWS) simulator over the mail world, served by aiohttp.

It serves SOAP requests on `POST /EWS/Exchange.asmx` as Exchange Server 2016 does,
for the operations exchangelib sends in mail work: ConvertId, GetFolder,
FindFolder, CreateFolder, FindItem, GetItem, CreateItem, UpdateItem, MoveItem,
CopyItem, DeleteItem, ExportItems, UploadItems and GetInboxRules. Every body starts
with the XML declaration, every response carries a ServerVersionInfo header, and an
operation answers with one response message per input item or folder, in request
order. GetInboxRules puts its result in the response element itself, as Exchange
does.

Callers authenticate with HTTP Basic as a service account and act on a mailbox
through the ExchangeImpersonation header; a deny list refuses chosen mailboxes. Only
mailboxes whose platform is `ews` exist here. Each budget (the target mailbox, or the
service account) allows `max_concurrency` requests in flight, as EWSMaxConcurrency
does. An injected ErrorServerBusy fault with BackOffMilliseconds keeps refusing the
same budget until the back-off has passed, and the request log marks every request
that arrived too early.

Paths under `/_sim/` are the simulator's own admin API, not EWS: reset, fault
injection, the request log, settings, and views of the state for tests and the demo.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
import operator
import random
import re
import signal
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal
from urllib.parse import unquote
from xml.etree import ElementTree as ET
from xml.etree.ElementTree import Element, SubElement

from aiohttp import web
from defusedxml import ElementTree as SafeET

from .clock import serving_thread
from .world import (
    RECOVERABLE_FOLDER,
    ROOT_FOLDER,
    WELL_KNOWN_FOLDERS,
    Folder,
    FolderExistsError,
    FolderNotFoundError,
    ForwardingRuleSpec,
    Item,
    UnknownMailboxError,
    World,
    WorldError,
    load_scenario,
    make_id,
    summarize_mime,
)

if TYPE_CHECKING:
    from typing import TypeAlias

    Node: TypeAlias = Element[str]

logger = logging.getLogger(__name__)

SOAP_NS = "http://schemas.xmlsoap.org/soap/envelope/"
MESSAGES_NS = "http://schemas.microsoft.com/exchange/services/2006/messages"
TYPES_NS = "http://schemas.microsoft.com/exchange/services/2006/types"
ERRORS_NS = "http://schemas.microsoft.com/exchange/services/2006/errors"
for _prefix, _uri in (("s", SOAP_NS), ("m", MESSAGES_NS), ("t", TYPES_NS)):
    ET.register_namespace(_prefix, _uri)

EWS_PATH = "/ews/exchange.asmx"
# Exchange Server 2016 CU23, the build exchangelib maps to API version Exchange2016.
SERVER_VERSION = {
    "MajorVersion": "15",
    "MinorVersion": "1",
    "MajorBuildNumber": "2507",
    "MinorBuildNumber": "6",
    "Version": "Exchange2016",
}
# RequestServerVersion values an Exchange 2016 server accepts.
API_VERSIONS = frozenset(
    {
        "Exchange2007",
        "Exchange2007_SP1",
        "Exchange2010",
        "Exchange2010_SP1",
        "Exchange2010_SP2",
        "Exchange2013",
        "Exchange2013_SP1",
        "Exchange2015",
        "Exchange2015_SP1",
        "Exchange2016",
    }
)
ROOT = "root"
# Operations that act on the server, not on a mailbox, so they need no impersonation.
PROTOCOL_OPERATIONS = frozenset({"ConvertId", "ResolveNames", "ExpandDL"})
# Operations whose response element carries ResponseClass and ResponseCode itself,
# with no ResponseMessages list (GetInboxRulesResponse in Messages.xsd).
UNWRAPPED_OPERATIONS = frozenset({"GetInboxRules"})
# The RuleActionsType element of each scenario rule kind. The schema orders the
# actions Delete, ForwardAsAttachmentToRecipients, ForwardToRecipients, ...,
# RedirectToRecipients, so each rule writes Delete first.
RULE_ACTIONS = {
    "forward_as_attachment": "ForwardAsAttachmentToRecipients",
    "forward": "ForwardToRecipients",
    "redirect": "RedirectToRecipients",
}
# PR_MESSAGE_FLAGS and two of its bits: MSGFLAG_READ and MSGFLAG_UNSENT (a draft).
MESSAGE_FLAGS_TAG = 0x0E07
MSGFLAG_READ = 0x1
MSGFLAG_UNSENT = 0x8
_ID_SHAPE = re.compile(r"^[A-Za-z0-9_\-+/=]{16,}$")

ERROR_TEXTS = {
    "ErrorAccessDenied": "Access is denied. Check credentials and try again.",
    "ErrorExceededConnectionCount": (
        "You have exceeded the available concurrent connections for your account. "
        "Try again once your other requests have completed."
    ),
    "ErrorFolderExists": "A folder with the specified name already exists.",
    "ErrorFolderNotFound": "The specified folder could not be found in the store.",
    "ErrorImpersonateUserDenied": (
        "The account does not have permission to impersonate the requested user."
    ),
    "ErrorImpersonationDenied": (
        "The server to which the application is connected cannot impersonate the "
        "requested user due to insufficient permission."
    ),
    "ErrorInternalServerError": (
        "An internal server error occurred. The operation failed."
    ),
    "ErrorInvalidIdMalformed": "Id is malformed.",
    "ErrorInvalidServerVersion": "The specified server version is invalid.",
    "ErrorItemNotFound": "The specified object was not found in the store.",
    "ErrorNonExistentMailbox": "The SMTP address has no mailbox associated with it.",
    "ErrorServerBusy": (
        "The server cannot service this request right now. Try again later."
    ),
}


@dataclass
class EwsSimSettings:
    """Behaviour knobs; the admin API can change them while the simulator runs.

    `service_accounts` maps each Basic-auth user name to its password.
    `impersonators` lists the accounts with the ApplicationImpersonation role (empty:
    every service account has it), and no account may impersonate a mailbox in
    `impersonation_denied`. A principal in `full_access` may open every mailbox's
    folders and items by id, which cross-mailbox requests need. `budget_key` chooses
    whose budget a request spends: the target `mailbox`, or the `caller` (the service
    account). Exchange documents EWSMaxConcurrency per user and gives a service
    account that impersonates its own budget; `max_concurrency` is that limit.
    `find_count_limit` caps a page (EWSFindCountLimit). `enforce_back_off` keeps
    refusing a budget until an injected back-off has passed.
    """

    latency_ms: float = 0.0
    service_accounts: dict[str, str] = field(default_factory=dict)
    impersonators: list[str] = field(default_factory=list)
    impersonation_denied: list[str] = field(default_factory=list)
    full_access: list[str] = field(default_factory=list)
    max_concurrency: int = 27
    budget_key: Literal["mailbox", "caller"] = "mailbox"
    enforce_back_off: bool = True
    find_count_limit: int = 1000
    max_request_bytes: int = 64 * 1024 * 1024
    request_log_size: int = 10_000


class SoapFault(Exception):
    """A request refused as a whole: a SOAP fault, which Exchange sends with 500."""

    def __init__(
        self, code: str, message: str | None = None, *, back_off_ms: int | None = None
    ) -> None:
        text = message or ERROR_TEXTS.get(code, code)
        super().__init__(text)
        self.code = code
        self.text = text
        self.back_off_ms = back_off_ms


class ResponseError(Exception):
    """The error of one response message: a response code and its text."""

    def __init__(
        self,
        code: str,
        text: str | None = None,
        *,
        values: dict[str, str] | None = None,
    ) -> None:
        message = text or ERROR_TEXTS.get(code, code)
        super().__init__(message)
        self.code = code
        self.text = message
        self.values = values or {}


class _Unauthorized(Exception):
    """The request has no valid Basic credentials of a service account."""


class _DropConnection(Exception):
    """Close the connection without a response."""


# --- XML helpers ------------------------------------------------------------------


def _m(name: str) -> str:
    return f"{{{MESSAGES_NS}}}{name}"


def _t(name: str) -> str:
    return f"{{{TYPES_NS}}}{name}"


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _add(parent: Node, tag: str, text: str | None = None, **attrs: str) -> Node:
    child = SubElement(parent, tag, attrs)
    if text is not None:
        child.text = text
    return child


def _children(parent: Node | None, tag: str) -> list[Node]:
    return [] if parent is None else list(parent.findall(tag))


def _text(parent: Node | None, tag: str) -> str | None:
    if parent is None:
        return None
    found = parent.find(tag)
    return None if found is None else (found.text or "")


def _flag(value: str | None) -> bool | None:
    if value is None:
        return None
    lowered = value.strip().lower()
    if lowered in ("true", "1"):
        return True
    if lowered in ("false", "0"):
        return False
    raise SoapFault(
        "ErrorSchemaValidation",
        f"The request failed schema validation: '{value}' is not a valid boolean.",
    )


def _ews_time(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(text: str) -> datetime:
    moment = datetime.fromisoformat(text.strip())
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def _change_key(object_id: str, version: int) -> str:
    digest = hashlib.sha256(f"{object_id}:{version}".encode()).digest()
    return "CQAAABYAAA" + base64.b64encode(digest[:15]).decode("ascii")


def _root_id(address: str) -> str:
    return make_id("folder", address, "ews-root")


def _header_value(item: Item, name: str) -> str | None:
    for header, value in item.summary.headers:
        if header.lower() == name.lower():
            return value
    return None


def _message_flags(item: Item) -> int:
    flags = MSGFLAG_READ if item.is_read else 0
    return flags | (MSGFLAG_UNSENT if item.is_draft else 0)


def _property_tag(uri: Node) -> int | None:
    tag = uri.get("PropertyTag")
    if tag is None:
        return None
    try:
        return int(tag, 16) if tag.lower().startswith("0x") else int(tag)
    except ValueError:
        return None


# --- entity values for restrictions and shapes --------------------------------------


ITEM_FIELDS: dict[str, str] = {
    "message:InternetMessageId": "string",
    "item:Subject": "string",
    "message:From": "string",
    "message:Sender": "string",
    "item:DateTimeReceived": "datetime",
    "item:DateTimeSent": "datetime",
    "item:DateTimeCreated": "datetime",
    "message:IsRead": "bool",
    "item:IsDraft": "bool",
    "item:HasAttachments": "bool",
    "item:ItemClass": "string",
    "message:References": "string",
    "item:InReplyTo": "string",
    "item:Size": "int",
    "item:Importance": "string",
}
FOLDER_FIELDS: dict[str, str] = {
    "folder:DisplayName": "string",
    "folder:FolderClass": "string",
    "folder:TotalCount": "int",
    "folder:ChildFolderCount": "int",
    "folder:UnreadCount": "int",
}


def item_value(item: Item, uri: str) -> Any:
    """Return the value of a FieldURI of an item, as restrictions compare it."""
    summary = item.summary
    sender = summary.sender[1] if summary.sender else None
    values: dict[str, Any] = {
        "message:InternetMessageId": summary.internet_message_id,
        "item:Subject": summary.subject,
        "message:From": sender,
        "message:Sender": sender,
        "item:DateTimeReceived": item.received_at,
        "item:DateTimeSent": summary.sent_at,
        "item:DateTimeCreated": item.created_at or item.received_at,
        "message:IsRead": item.is_read,
        "item:IsDraft": item.is_draft,
        "item:HasAttachments": summary.has_attachments,
        "item:ItemClass": "IPM.Note",
        "message:References": _header_value(item, "References"),
        "item:InReplyTo": _header_value(item, "In-Reply-To"),
        "item:Size": len(item.mime),
        "item:Importance": item.importance.title(),
    }
    return values[uri]


# --- restrictions -------------------------------------------------------------------


Getter = Callable[[str], Any]
Predicate = Callable[[Getter], bool]
_COMPARISONS: dict[str, Callable[[Any, Any], Any]] = {
    "IsEqualTo": operator.eq,
    "IsNotEqualTo": operator.ne,
    "IsGreaterThan": operator.gt,
    "IsGreaterThanOrEqualTo": operator.ge,
    "IsLessThan": operator.lt,
    "IsLessThanOrEqualTo": operator.le,
}


def parse_restriction(node: Node, kinds: dict[str, str]) -> Predicate:
    """Compile a restriction (And, Or, Not, comparisons, Exists, Contains).

    Strings compare without regard to case, as Exchange's default collation does.
    A path the entity does not have raises ErrorUnsupportedPathForQuery.
    """
    name = _local(node.tag)
    operands = list(node)
    if name in ("And", "Or"):
        parts = [parse_restriction(child, kinds) for child in operands]
        if name == "And":
            return lambda get: all(part(get) for part in parts)
        return lambda get: any(part(get) for part in parts)
    if name == "Not":
        if len(operands) != 1:
            raise _schema_error("Not takes exactly one search expression.")
        inner = parse_restriction(operands[0], kinds)
        return lambda get: not inner(get)
    if name == "Exists":
        path = _path(operands, kinds)
        return lambda get: get(path) is not None
    if name == "Contains":
        return _contains(node, operands, kinds)
    if name in _COMPARISONS:
        return _comparison(name, operands, kinds)
    raise ResponseError(
        "ErrorUnsupportedPathForQuery",
        f"The restriction element {name} is not supported by the simulator.",
    )


def _path(operands: list[Node], kinds: dict[str, str]) -> str:
    for operand in operands:
        if _local(operand.tag) == "FieldURI":
            uri = operand.get("FieldURI", "")
            if uri not in kinds:
                raise ResponseError(
                    "ErrorUnsupportedPathForQuery",
                    f"The property {uri} can not be used with this type of "
                    "restriction.",
                )
            return uri
        if _local(operand.tag) in ("IndexedFieldURI", "ExtendedFieldURI"):
            raise ResponseError(
                "ErrorUnsupportedPathForQuery",
                f"The simulator does not restrict on {_local(operand.tag)} paths.",
            )
    raise _schema_error("A search expression needs a FieldURI.")


def _constant(operands: list[Node]) -> str:
    for operand in operands:
        if _local(operand.tag) == "FieldURIOrConstant":
            constant = operand.find(_t("Constant"))
            if constant is not None:
                return constant.get("Value", "")
        if _local(operand.tag) == "Constant":
            return operand.get("Value", "")
    raise _schema_error("A comparison needs a Constant value.")


def _typed(kind: str, text: str) -> Any:
    try:
        if kind == "datetime":
            return _parse_time(text)
        if kind == "bool":
            return _flag(text)
        if kind == "int":
            return int(text)
    except ValueError:
        raise ResponseError(
            "ErrorInvalidValueForProperty",
            f"The value '{text}' is not valid for a {kind} property.",
        ) from None
    return text.lower()


def _comparison(name: str, operands: list[Node], kinds: dict[str, str]) -> Predicate:
    path = _path(operands, kinds)
    kind = kinds[path]
    literal = _typed(kind, _constant(operands))
    compare = _COMPARISONS[name]

    def matches(get: Getter) -> bool:
        value = get(path)
        if value is None:
            return name == "IsNotEqualTo"
        if isinstance(value, str):
            value = value.lower()
        return bool(compare(value, literal))

    return matches


def _contains(node: Node, operands: list[Node], kinds: dict[str, str]) -> Predicate:
    path = _path(operands, kinds)
    needle = _constant(operands)
    mode = node.get("ContainmentMode", "Substring")
    ignore_case = node.get("ContainmentComparison", "Exact") != "Exact"

    def matches(get: Getter) -> bool:
        value = get(path)
        if not isinstance(value, str):
            return False
        haystack, wanted = value, needle
        if ignore_case:
            haystack, wanted = haystack.lower(), wanted.lower()
        if mode == "FullString":
            return haystack == wanted
        if mode == "Prefixed":
            return haystack.startswith(wanted)
        if mode in ("PrefixOnWords", "ExactPhrase"):
            return any(word.startswith(wanted) for word in haystack.split()) or (
                wanted in haystack
            )
        return wanted in haystack

    return matches


def _schema_error(detail: str) -> SoapFault:
    return SoapFault(
        "ErrorSchemaValidation", f"The request failed schema validation: {detail}"
    )


# --- shapes -------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """The fields an ItemShape or FolderShape requests: a base shape and added paths."""

    base: str
    paths: frozenset[str]
    extended_tags: frozenset[int]
    include_mime: bool = False

    @classmethod
    def parse(cls, node: Node | None) -> Shape:
        """Read a shape. Unknown FieldURIs are kept here and ignored when building."""
        if node is None:
            return cls("Default", frozenset(), frozenset())
        base = _text(node, _t("BaseShape")) or "Default"
        paths: set[str] = set()
        tags: set[int] = set()
        for uri in _children(node.find(_t("AdditionalProperties")), "*"):
            kind = _local(uri.tag)
            if kind == "FieldURI":
                paths.add(uri.get("FieldURI", ""))
            elif kind == "ExtendedFieldURI":
                tag = _property_tag(uri)
                if tag is not None:
                    tags.add(tag)
        include_mime = bool(_flag(_text(node, _t("IncludeMimeContent"))))
        return cls(base, frozenset(paths), frozenset(tags), include_mime)

    def wants(self, path: str, default: frozenset[str]) -> bool:
        if path in self.paths or self.base == "AllProperties":
            return True
        return self.base == "Default" and path in default


_ITEM_DEFAULT = frozenset(
    {
        "item:ParentFolderId",
        "item:ItemClass",
        "item:Subject",
        "item:DateTimeReceived",
        "item:Size",
        "item:HasAttachments",
        "item:DateTimeSent",
        "message:From",
        "message:IsRead",
    }
)
_FOLDER_DEFAULT = frozenset(
    {
        "folder:DisplayName",
        "folder:TotalCount",
        "folder:ChildFolderCount",
        "folder:UnreadCount",
    }
)


# --- throttling, faults, request log ------------------------------------------------


class Budgets:
    """Requests in flight per budget and the back-off each budget must wait out."""

    def __init__(self, settings: EwsSimSettings, clock: Callable[[], float]) -> None:
        self.settings = settings
        self.clock = clock
        self.in_flight: dict[str, int] = {}
        self.peak_in_flight: dict[str, int] = {}
        self.busy_until: dict[str, float] = {}

    def remaining_back_off(self, key: str) -> float:
        """Return the seconds the budget must still wait, 0 when it is free."""
        until = self.busy_until.get(key)
        if until is None:
            return 0.0
        left = until - self.clock()
        if left <= 0:
            del self.busy_until[key]
            return 0.0
        return left

    def back_off(self, key: str, milliseconds: int) -> None:
        until = self.clock() + milliseconds / 1000
        self.busy_until[key] = max(self.busy_until.get(key, 0.0), until)

    def acquire(self, key: str) -> None:
        """Take a slot, or raise ErrorExceededConnectionCount past the limit."""
        if self.in_flight.get(key, 0) >= self.settings.max_concurrency:
            raise SoapFault("ErrorExceededConnectionCount")
        self.in_flight[key] = self.in_flight.get(key, 0) + 1
        self.peak_in_flight[key] = max(
            self.peak_in_flight.get(key, 0), self.in_flight[key]
        )

    def release(self, key: str) -> None:
        self.in_flight[key] -= 1

    def reset(self) -> None:
        self.in_flight.clear()
        self.peak_in_flight.clear()
        self.busy_until.clear()


FAULT_KINDS = frozenset(
    {
        "server_busy",
        "server_busy_inner",
        "fault",
        "error",
        "unavailable",
        "status",
        "drop",
    }
)


@dataclass
class EwsFaultRule:
    """A fault for the next `count` requests of `operation` for `mailbox`.

    `operation` and `mailbox` match exactly (case-insensitive); None matches any.
    Kinds: `server_busy` is HTTP 500 with an ErrorServerBusy fault that carries
    `back_off_ms` in BackOffMilliseconds when set. `server_busy_inner` is HTTP 200
    with ErrorInternalServerError in every response message and ErrorServerBusy as
    its InnerErrorResponseCode. `fault` is HTTP 500 with a fault of `code`. `error`
    is HTTP 200 with `code` in every response message. `unavailable` is HTTP 503
    with `retry_after` seconds in Retry-After. `status` is an empty answer with
    `status`. `drop` closes the connection. With `after`, the operation runs first
    and only its response is replaced, as when a reply is lost on the way.

    A rule with a `probability` below 1 hits each matching request with that
    chance, and a rule with `until` stops at that time on the simulator's clock, so
    a storm of faults can cover a share of the requests for a while.

    With `contains`, only requests whose raw body contains that text match, and
    `skip` lets that many matching requests through first. With `hold`, the request
    waits until the rules are cleared, so a test can stop a client at that request
    and kill it there. A held request then gets the fault, or, with `after`, the
    response of the operation that already ran. `held` counts the waiting requests.
    """

    kind: str = "server_busy"
    operation: str | None = None
    mailbox: str | None = None
    count: int = 1
    back_off_ms: int | None = None
    retry_after: int | None = None
    code: str | None = None
    message: str | None = None
    status: int = 500
    after: bool = False
    contains: str | None = None
    skip: int = 0
    probability: float = 1.0
    until: float | None = None
    hold: bool = False
    held: int = 0
    rule_id: int = 0
    released: asyncio.Event = field(
        default_factory=asyncio.Event, repr=False, compare=False
    )

    def view(self) -> dict[str, Any]:
        """Return the rule as JSON data for the admin API."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.repr}

    async def wait_for_release(self) -> None:
        """Wait, counted in `held`, until the rules are cleared."""
        self.held += 1
        try:
            await self.released.wait()
        finally:
            self.held -= 1

    def matches(
        self, operation: str, mailbox: str | None, now: float, body: bytes = b""
    ) -> bool:
        if self.count <= 0:
            return False
        if self.until is not None and now >= self.until:
            return False
        if self.contains is not None and self.contains.encode() not in body:
            return False
        if self.operation is not None and self.operation.lower() != operation.lower():
            return False
        if self.mailbox is None:
            return True
        return mailbox is not None and self.mailbox.lower() == mailbox.lower()


class FaultInjector:
    """The fault rules set through the admin API, used in the order they were added."""

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, seed: int = 0
    ) -> None:
        self.rules: list[EwsFaultRule] = []
        self._next_id = 1
        self._clock = clock
        # Seeded, so that a storm of faults hits the same requests on every run.
        self._random = random.Random(seed)  # noqa: S311 - test faults, not secrets

    def add(self, data: dict[str, Any]) -> EwsFaultRule:
        allowed = {f.name for f in fields(EwsFaultRule)} - {
            "rule_id",
            "held",
            "released",
        }
        unknown = set(data) - allowed
        if unknown:
            raise ValueError(
                f"Unknown fault fields {sorted(unknown)}; use {sorted(allowed)}."
            )
        kind = data.get("kind", "server_busy")
        if kind not in FAULT_KINDS:
            raise ValueError(f"Unknown fault kind {kind!r}; use {sorted(FAULT_KINDS)}.")
        probability = data.get("probability", 1.0)
        if not isinstance(probability, int | float) or not 0 < probability <= 1:
            raise ValueError(
                f"The fault probability {probability!r} is outside (0, 1]; give the "
                "share of matching requests to fail, such as 0.4."
            )
        rule = EwsFaultRule(**data, rule_id=self._next_id)
        self._next_id += 1
        self.rules.append(rule)
        return rule

    def take(
        self, operation: str, mailbox: str | None, body: bytes = b""
    ) -> EwsFaultRule | None:
        now = self._clock()
        for rule in self.rules:
            if not rule.matches(operation, mailbox, now, body):
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
class EwsLoggedRequest:
    """One request as the simulator saw it, for tests and the demo.

    `at` is the simulator clock in seconds. `early` marks a request that arrived
    while its budget still had to wait out a back-off. `back_off_ms` is the
    BackOffMilliseconds of an ErrorServerBusy response, and `retry_after` the
    Retry-After seconds of a 503 response.
    """

    seq: int
    time: str
    at: float
    operation: str | None = None
    caller: str | None = None
    mailbox: str | None = None
    impersonated: bool = False
    items: int = 0
    status: int | None = None
    code: str | None = None
    early: bool = False
    fault_rule: int | None = None
    back_off_ms: int | None = None
    retry_after: int | None = None
    duration_ms: float | None = None


@dataclass
class EwsCall:
    """One decoded EWS request: who calls, for which mailbox, and what."""

    request: web.Request
    operation: str
    body: Node
    caller: str
    mailbox: str | None
    impersonated: bool
    changed: bool = False

    @property
    def actor(self) -> str:
        """Return the identity whose rights apply: the impersonated user or caller."""
        if self.impersonated and self.mailbox is not None:
            return self.mailbox
        return self.caller


Handler = Callable[[EwsCall], list["Node"]]


# --- the simulator ------------------------------------------------------------------


class EwsSimulator:
    """The EWS simulator: an aiohttp application over a `World`.

    `clock` is monotonic time for back-offs and the request log; `wall_clock` is epoch
    seconds for item times. Both can be replaced to test long waits quickly.
    """

    OPERATIONS: ClassVar[dict[str, str]] = {
        "ConvertId": "_convert_id",
        "GetFolder": "_get_folder",
        "FindFolder": "_find_folder",
        "CreateFolder": "_create_folder",
        "FindItem": "_find_item",
        "GetItem": "_get_item",
        "CreateItem": "_create_item",
        "UpdateItem": "_update_item",
        "MoveItem": "_move_item",
        "CopyItem": "_copy_item",
        "DeleteItem": "_delete_item",
        "ExportItems": "_export_items",
        "UploadItems": "_upload_items",
        "GetInboxRules": "_get_inbox_rules",
    }
    # The element of each operation whose children are the inputs it answers.
    INPUT_LISTS: ClassVar[dict[str, tuple[str, ...]]] = {
        "ConvertId": (_m("SourceIds"),),
        "GetFolder": (_m("FolderIds"),),
        "FindFolder": (_m("ParentFolderIds"),),
        "CreateFolder": (_m("Folders"),),
        "FindItem": (_m("ParentFolderIds"),),
        "GetItem": (_m("ItemIds"),),
        "CreateItem": (_m("Items"),),
        "UpdateItem": (_m("ItemChanges"),),
        "MoveItem": (_m("ItemIds"),),
        "CopyItem": (_m("ItemIds"),),
        "DeleteItem": (_m("ItemIds"),),
        "ExportItems": (_m("ItemIds"),),
        "UploadItems": (_m("Items"),),
    }

    def __init__(
        self,
        world: World,
        settings: EwsSimSettings | None = None,
        *,
        scenario_path: Path | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.world = world
        self.settings = settings or EwsSimSettings()
        self.scenario_path = scenario_path
        self.clock = clock
        self.wall_clock = wall_clock
        self.budgets = Budgets(self.settings, clock)
        self.faults = FaultInjector(clock)
        self.log: deque[EwsLoggedRequest] = deque(maxlen=self.settings.request_log_size)
        # Export blobs carry only MIME here, so the read state of recent exports is
        # kept aside for the uploads that bring them back.
        self._exports: OrderedDict[str, bool] = OrderedDict()
        self._seq = 0
        self._runner: web.AppRunner | None = None
        self.base_url: str | None = None

    # --- lifecycle ----------------------------------------------------------------

    def make_app(self) -> web.Application:
        """Build the aiohttp application; every path goes through one dispatcher."""
        app = web.Application(client_max_size=self.settings.max_request_bytes)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on host:port (0 picks a free port) and return the base URL."""
        self._runner = web.AppRunner(self.make_app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self.base_url = f"http://{host}:{site.port}"
        logger.info("EWS simulator started url=%s", self.base_url)
        return self.base_url

    @property
    def endpoint(self) -> str:
        """Return the EWS endpoint URL, as Exchange spells it."""
        if self.base_url is None:
            raise RuntimeError("The EWS simulator is not started; call start first.")
        return f"{self.base_url}/EWS/Exchange.asmx"

    async def stop(self) -> None:
        """Stop serving. The state file already contains every change."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            logger.info("EWS simulator stopped url=%s", self.base_url)

    def reset(self) -> None:
        """Start again from the scenario file: state, faults, budgets and log."""
        if self.scenario_path is not None:
            self.world.scenario = load_scenario(self.scenario_path)
            self.world.tenants = {
                t.domain.lower(): t for t in self.world.scenario.tenants
            }
        self.world.populate()
        self.world.save()
        self.faults.clear()
        self.budgets.reset()
        self.log.clear()
        self._exports.clear()

    # --- dispatch -----------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        # exchangelib is synchronous and runs in threads, which block on the
        # response once the whole request is read. On a virtual clock that wait
        # lets the clock jump.
        await request.read()
        with serving_thread():
            return await self._dispatch(request)

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        path = request.raw_path.partition("?")[0]
        segments = [unquote(part) for part in path.split("/")[1:]]
        if segments and segments[0] == "_sim":
            return await self._admin(request, segments[1:])
        if path.lower() != EWS_PATH:
            return web.Response(status=404, text=f"No EWS endpoint at {path}.")
        if request.method != "POST":
            return web.Response(status=405, headers={"Allow": "POST"})

        started = self.clock()
        entry = self._log_request()
        try:
            response = await self._serve(request, entry)
        except _Unauthorized:
            response = web.Response(
                status=401, headers={"WWW-Authenticate": 'Basic realm="127.0.0.1"'}
            )
        except SoapFault as fault:
            response = self._fault_response(fault)
            entry.code = fault.code
            entry.back_off_ms = fault.back_off_ms
        except _DropConnection:
            # Status 0 in the log marks a dropped connection. aiohttp treats a
            # cancelled handler as a lost client and sends nothing more.
            entry.status = 0
            if request.transport is not None:
                request.transport.close()
            raise asyncio.CancelledError() from None
        except Exception as exc:
            logger.exception(
                "EWS simulator failed a request operation=%s", entry.operation
            )
            failure = SoapFault("ErrorInternalServerError", f"Simulator error: {exc!r}")
            response = self._fault_response(failure)
            entry.code = failure.code
        entry.status = response.status
        if response.status == 503 and "Retry-After" in response.headers:
            entry.retry_after = int(response.headers["Retry-After"])
        entry.duration_ms = round((self.clock() - started) * 1000, 3)
        return response

    def _log_request(self) -> EwsLoggedRequest:
        self._seq += 1
        moment = datetime.fromtimestamp(self.wall_clock(), UTC)
        entry = EwsLoggedRequest(
            seq=self._seq, time=_ews_time(moment) or "", at=self.clock()
        )
        self.log.append(entry)
        return entry

    async def _serve(
        self, request: web.Request, entry: EwsLoggedRequest
    ) -> web.Response:
        entry.caller = self._authenticate(request.headers.get("Authorization"))
        raw = await request.read()
        envelope = self._parse(raw)
        header = envelope.find(f"{{{SOAP_NS}}}Header")
        body = envelope.find(f"{{{SOAP_NS}}}Body")
        if body is None or len(body) == 0:
            raise _schema_error("The SOAP envelope has no Body with an operation.")
        operation_node = body[0]
        entry.operation = _local(operation_node.tag)
        self._check_version(header)

        call = self._call(request, entry, header, operation_node)
        entry.items = self._input_count(call)
        key = self._budget_key(call)
        left = self.budgets.remaining_back_off(key)
        if left > 0 and self.settings.enforce_back_off:
            entry.early = True
            raise SoapFault("ErrorServerBusy", back_off_ms=max(1, round(left * 1000)))

        rule = self.faults.take(call.operation, call.mailbox, raw)
        if rule is not None:
            entry.fault_rule = rule.rule_id
            if not rule.after:
                if rule.hold:
                    await rule.wait_for_release()
                return self._apply_fault(rule, call, key)

        self.budgets.acquire(key)
        try:
            if self.settings.latency_ms > 0:
                await asyncio.sleep(self.settings.latency_ms / 1000)
            messages = self._run(call)
        finally:
            self.budgets.release(key)
        if rule is not None and rule.hold:
            await rule.wait_for_release()
        elif rule is not None:
            return self._apply_fault(rule, call, key)
        return self._envelope_response(call.operation, messages)

    def _authenticate(self, authorization: str | None) -> str:
        scheme, _, encoded = (authorization or "").partition(" ")
        if scheme.lower() != "basic":
            raise _Unauthorized()
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise _Unauthorized() from None
        username, _, password = decoded.partition(":")
        username = username.split("\\")[-1].lower()
        for account, secret in self.settings.service_accounts.items():
            if account.lower() == username and hmac.compare_digest(secret, password):
                return username
        raise _Unauthorized()

    def _parse(self, raw: bytes) -> Node:
        try:
            envelope: Node = SafeET.fromstring(raw)
        except (ET.ParseError, ValueError) as exc:
            raise _schema_error(
                f"the request is not well-formed XML ({exc})."
            ) from None
        if envelope.tag != f"{{{SOAP_NS}}}Envelope":
            raise _schema_error("the root element is not a SOAP 1.1 Envelope.")
        return envelope

    def _check_version(self, header: Node | None) -> None:
        requested = (
            header.find(_t("RequestServerVersion")) if header is not None else None
        )
        if requested is None:
            return
        if requested.get("Version") not in API_VERSIONS:
            raise SoapFault("ErrorInvalidServerVersion")

    def _call(
        self,
        request: web.Request,
        entry: EwsLoggedRequest,
        header: Node | None,
        operation: Node,
    ) -> EwsCall:
        """Decode who acts on which mailbox, checking impersonation rights."""
        caller = entry.caller or ""
        name = _local(operation.tag)
        impersonation = (
            header.find(_t("ExchangeImpersonation")) if header is not None else None
        )
        mailbox: str | None = None
        if impersonation is not None and name not in PROTOCOL_OPERATIONS:
            mailbox = self._impersonate(caller, impersonation)
        elif self.world.mailboxes.get(caller) is not None:
            mailbox = self.world.mailbox(caller).address
        entry.mailbox = mailbox
        entry.impersonated = impersonation is not None and mailbox is not None
        if name not in PROTOCOL_OPERATIONS and mailbox is None:
            raise SoapFault(
                "ErrorNonExistentMailbox",
                f"The account {caller} has no mailbox; impersonate a mailbox with the "
                "ExchangeImpersonation header.",
            )
        return EwsCall(
            request=request,
            operation=name,
            body=operation,
            caller=caller,
            mailbox=mailbox,
            impersonated=entry.impersonated,
        )

    def _impersonate(self, caller: str, impersonation: Node) -> str:
        sid = impersonation.find(_t("ConnectingSID"))
        target = None
        for tag in ("PrimarySmtpAddress", "SmtpAddress", "PrincipalName"):
            value = _text(sid, _t(tag))
            if value:
                target = value.strip().lower()
                break
        if target is None:
            raise SoapFault(
                "ErrorNonExistentMailbox",
                "The ConnectingSID has no SMTP address or principal name that the "
                "simulator can resolve.",
            )
        allowed = [name.lower() for name in self.settings.impersonators]
        if allowed and caller not in allowed:
            raise SoapFault("ErrorImpersonationDenied")
        denied = {address.lower() for address in self.settings.impersonation_denied}
        if target in denied:
            raise SoapFault("ErrorImpersonateUserDenied")
        if target not in self.world.mailboxes or (
            self.world.platform_of(target) != "ews"
        ):
            raise SoapFault("ErrorNonExistentMailbox")
        return self.world.mailbox(target).address

    def _budget_key(self, call: EwsCall) -> str:
        if self.settings.budget_key == "caller" or call.mailbox is None:
            return call.caller
        return call.mailbox

    def _input_count(self, call: EwsCall) -> int:
        for tag in self.INPUT_LISTS.get(call.operation, ()):
            found = call.body.find(tag)
            if found is not None:
                return len(found)
        return 1

    def _run(self, call: EwsCall) -> list[Node]:
        method = self.OPERATIONS.get(call.operation)
        if method is None:
            raise _schema_error(
                f"the operation {call.operation} is not one the simulator serves."
            )
        handler: Handler = getattr(self, method)
        try:
            return handler(call)
        finally:
            if call.changed:
                self.world.save()

    # --- responses ----------------------------------------------------------------

    def _envelope(self) -> tuple[Node, Node]:
        envelope = Element(f"{{{SOAP_NS}}}Envelope")
        header = _add(envelope, f"{{{SOAP_NS}}}Header")
        _add(header, _t("ServerVersionInfo"), **SERVER_VERSION)
        return envelope, _add(envelope, f"{{{SOAP_NS}}}Body")

    def _xml_response(self, envelope: Node, status: int = 200) -> web.Response:
        data = ET.tostring(envelope, encoding="utf-8", xml_declaration=True)
        return web.Response(
            status=status, body=data, content_type="text/xml", charset="utf-8"
        )

    def _envelope_response(self, operation: str, messages: list[Node]) -> web.Response:
        envelope, body = self._envelope()
        if operation in UNWRAPPED_OPERATIONS:
            body.extend(messages)
            return self._xml_response(envelope)
        response = _add(body, _m(f"{operation}Response"))
        holder = _add(response, _m("ResponseMessages"))
        holder.extend(messages)
        return self._xml_response(envelope)

    def _fault_response(self, fault: SoapFault) -> web.Response:
        envelope, body = self._envelope()
        soap_fault = _add(body, f"{{{SOAP_NS}}}Fault")
        code = _add(soap_fault, "faultcode", f"t:{fault.code}")
        code.set("xmlns:t", TYPES_NS)
        _add(soap_fault, "faultstring", fault.text)
        detail = _add(soap_fault, "detail")
        _add(detail, f"{{{ERRORS_NS}}}ResponseCode", fault.code)
        _add(detail, f"{{{ERRORS_NS}}}Message", fault.text)
        if fault.back_off_ms is not None:
            message_xml = _add(detail, _t("MessageXml"))
            _add(
                message_xml,
                _t("Value"),
                str(fault.back_off_ms),
                Name="BackOffMilliseconds",
            )
        return self._xml_response(envelope, status=500)

    def _message(self, call: EwsCall, container: str | None = None) -> Node:
        """Start a successful response message, with its container if it has one."""
        message = Element(_message_tag(call.operation))
        message.set("ResponseClass", "Success")
        _add(message, _m("ResponseCode"), "NoError")
        if container is not None:
            _add(message, container)
        return message

    def _error(
        self, call: EwsCall, error: ResponseError, container: str | None = None
    ) -> Node:
        message = Element(_message_tag(call.operation))
        message.set("ResponseClass", "Error")
        _add(message, _m("MessageText"), error.text)
        _add(message, _m("ResponseCode"), error.code)
        _add(message, _m("DescriptiveLinkKey"), "0")
        if error.values:
            message_xml = _add(message, _m("MessageXml"))
            for name, value in error.values.items():
                _add(message_xml, _t("Value"), value, Name=name)
        if container is not None:
            _add(message, container)
        return message

    def _apply_fault(self, rule: EwsFaultRule, call: EwsCall, key: str) -> web.Response:
        logger.info(
            "EWS simulator injects a fault kind=%s operation=%s mailbox=%s rule=%s",
            rule.kind,
            call.operation,
            call.mailbox,
            rule.rule_id,
        )
        if rule.kind == "drop":
            raise _DropConnection()
        if rule.kind == "unavailable":
            headers = {}
            if rule.retry_after is not None:
                headers["Retry-After"] = str(rule.retry_after)
            return web.Response(status=503, text="Service Unavailable", headers=headers)
        if rule.kind == "status":
            return web.Response(status=rule.status)
        if rule.kind in ("server_busy", "server_busy_inner") and rule.back_off_ms:
            self.budgets.back_off(key, rule.back_off_ms)
        if rule.kind == "server_busy":
            raise SoapFault(
                "ErrorServerBusy", rule.message, back_off_ms=rule.back_off_ms
            )
        if rule.kind == "fault":
            raise SoapFault(rule.code or "ErrorInternalServerError", rule.message)
        return self._error_everywhere(rule, call)

    def _error_everywhere(self, rule: EwsFaultRule, call: EwsCall) -> web.Response:
        if rule.kind == "server_busy_inner":
            values = {
                "InnerErrorResponseCode": "ErrorServerBusy",
                "InnerErrorMessageText": ERROR_TEXTS["ErrorServerBusy"],
            }
            if rule.back_off_ms is not None:
                values["BackOffMilliseconds"] = str(rule.back_off_ms)
            error = ResponseError("ErrorInternalServerError", values=values)
        else:
            error = ResponseError(rule.code or "ErrorInternalServerError", rule.message)
        count = max(1, self._input_count(call))
        messages = [self._error(call, error) for _ in range(count)]
        return self._envelope_response(call.operation, messages)

    # --- folders ------------------------------------------------------------------

    def _root(self, address: str) -> Folder:
        box = self.world.mailbox(address)
        return Folder(_root_id(box.address), box.address, "Root", None, ROOT)

    def _parent_id(self, folder: Folder) -> str | None:
        if folder.well_known == ROOT:
            return None
        return folder.parent_id or _root_id(folder.mailbox)

    def _child_folders(self, folder: Folder) -> list[Folder]:
        if folder.well_known == ROOT:
            box = self.world.mailbox(folder.mailbox)
            return [f for f in box.folders.values() if f.parent_id is None]
        return self.world.children(folder.mailbox, folder.folder_id)

    def _descendants(self, folder: Folder) -> Iterator[Folder]:
        for child in self._child_folders(folder):
            yield child
            yield from self._descendants(child)

    def _check_access(self, call: EwsCall, address: str) -> None:
        if address == call.mailbox:
            return
        principals = {p.lower() for p in self.settings.full_access}
        if call.actor not in principals:
            raise ResponseError(
                "ErrorAccessDenied",
                f"{call.actor} has no access to mailbox {address}. Check credentials "
                "and try again.",
            )

    def _target_mailbox(self, call: EwsCall, node: Node) -> str:
        explicit = _text(node.find(_t("Mailbox")), _t("EmailAddress"))
        if not explicit:
            assert call.mailbox is not None
            return call.mailbox
        address = explicit.strip().lower()
        if address not in self.world.mailboxes or (
            self.world.platform_of(address) != "ews"
        ):
            raise ResponseError("ErrorNonExistentMailbox")
        self._check_access(call, address)
        return self.world.mailbox(address).address

    def _folder(self, call: EwsCall, node: Node) -> Folder:
        """Resolve a FolderId or DistinguishedFolderId element, checking access."""
        kind = _local(node.tag)
        if kind == "DistinguishedFolderId":
            address = self._target_mailbox(call, node)
            name = node.get("Id", "").lower()
            if name == ROOT:
                return self._root(address)
            if name not in WELL_KNOWN_FOLDERS:
                raise ResponseError("ErrorFolderNotFound")
            try:
                return self.world.folder(address, name)
            except FolderNotFoundError:
                raise ResponseError("ErrorFolderNotFound") from None
        if kind != "FolderId":
            raise ResponseError(
                "ErrorInvalidOperation", f"{kind} folder ids are not supported."
            )
        folder_id = node.get("Id", "")
        if not _ID_SHAPE.match(folder_id):
            raise ResponseError("ErrorInvalidIdMalformed")
        folder = self._folder_by_id(folder_id)
        if folder is None:
            raise ResponseError("ErrorFolderNotFound")
        self._check_access(call, folder.mailbox)
        return folder

    def _folder_by_id(self, folder_id: str) -> Folder | None:
        for box in self.world.mailboxes.values():
            if folder_id == _root_id(box.address):
                return self._root(box.address)
            found = box.folders.get(folder_id)
            if found is not None:
                return found
        return None

    def _folder_value(self, folder: Folder, path: str) -> Any:
        items = (
            []
            if folder.well_known == ROOT
            else list(self.world.items_of(folder.mailbox, folder.folder_id))
        )
        values: dict[str, Any] = {
            "folder:DisplayName": folder.display_name,
            "folder:FolderClass": self._folder_class(folder),
            "folder:TotalCount": len(items),
            "folder:ChildFolderCount": len(self._child_folders(folder)),
            "folder:UnreadCount": sum(1 for item in items if not item.is_read),
        }
        return values[path]

    @staticmethod
    def _folder_class(folder: Folder) -> str | None:
        if folder.well_known in (ROOT, ROOT_FOLDER, RECOVERABLE_FOLDER):
            return None
        return "IPF.Note"

    def _folder_xml(self, folder: Folder, shape: Shape) -> Node:
        node = Element(_t("Folder"))
        _add(
            node,
            _t("FolderId"),
            Id=folder.folder_id,
            ChangeKey=_change_key(folder.folder_id, 1),
        )
        parent_id = self._parent_id(folder)
        if parent_id is not None and shape.wants("folder:ParentFolderId", frozenset()):
            _add(
                node,
                _t("ParentFolderId"),
                Id=parent_id,
                ChangeKey=_change_key(parent_id, 1),
            )
        folder_class = self._folder_class(folder)
        if folder_class is not None and shape.wants("folder:FolderClass", frozenset()):
            _add(node, _t("FolderClass"), folder_class)
        for path in (
            "folder:DisplayName",
            "folder:TotalCount",
            "folder:ChildFolderCount",
            "folder:UnreadCount",
        ):
            if shape.wants(path, _FOLDER_DEFAULT):
                _add(
                    node,
                    _t(path.split(":", 1)[1]),
                    str(self._folder_value(folder, path)),
                )
        return node

    def _get_folder(self, call: EwsCall) -> list[Node]:
        shape = Shape.parse(call.body.find(_m("FolderShape")))
        messages = []
        for node in _children(call.body.find(_m("FolderIds")), "*"):
            try:
                folder = self._folder(call, node)
            except ResponseError as error:
                messages.append(self._error(call, error, _m("Folders")))
                continue
            message = self._message(call, _m("Folders"))
            message[-1].append(self._folder_xml(folder, shape))
            messages.append(message)
        return messages

    def _find_folder(self, call: EwsCall) -> list[Node]:
        traversal = call.body.get("Traversal", "Shallow")
        if traversal not in ("Shallow", "Deep", "SoftDeleted"):
            raise _schema_error(f"'{traversal}' is not a valid folder traversal.")
        shape = Shape.parse(call.body.find(_m("FolderShape")))
        view = call.body.find(_m("IndexedPageFolderView"))
        messages = []
        for node in _children(call.body.find(_m("ParentFolderIds")), "*"):
            try:
                parent = self._folder(call, node)
                found = self._folders_below(parent, traversal)
                found = self._restricted(call, found, FOLDER_FIELDS, self._folder_value)
            except ResponseError as error:
                messages.append(self._error(call, error))
                continue
            page, message, root = self._page(call, found, view)
            folders = _add(root, _t("Folders"))
            folders.extend(self._folder_xml(folder, shape) for folder in page)
            messages.append(message)
        return messages

    def _folders_below(self, parent: Folder, traversal: str) -> list[Folder]:
        if traversal == "Deep":
            return list(self._descendants(parent))
        if traversal == "Shallow":
            return self._child_folders(parent)
        return []

    def _create_folder(self, call: EwsCall) -> list[Node]:
        parent_node = next(
            iter(_children(call.body.find(_m("ParentFolderId")), "*")), None
        )
        if parent_node is None:
            raise _schema_error("CreateFolder needs a ParentFolderId.")
        messages = []
        for spec in _children(call.body.find(_m("Folders")), "*"):
            try:
                parent = self._folder(call, parent_node)
                folder = self._new_folder(parent, spec)
            except ResponseError as error:
                messages.append(self._error(call, error, _m("Folders")))
                continue
            call.changed = True
            message = self._message(call, _m("Folders"))
            node = _add(message[-1], _t(_local(spec.tag)))
            _add(
                node,
                _t("FolderId"),
                Id=folder.folder_id,
                ChangeKey=_change_key(folder.folder_id, 1),
            )
            messages.append(message)
        return messages

    def _new_folder(self, parent: Folder, spec: Node) -> Folder:
        name = (_text(spec, _t("DisplayName")) or "").strip()
        if not name:
            raise ResponseError(
                "ErrorFolderSave", "A folder needs a DisplayName to be created."
            )
        if parent.well_known == ROOT:
            raise ResponseError(
                "ErrorInvalidOperation",
                "The simulator creates folders only below msgfolderroot or one of "
                "its descendants, not below the root folder.",
            )
        try:
            return self.world.create_folder(parent.mailbox, parent.folder_id, name)
        except FolderExistsError:
            raise ResponseError("ErrorFolderExists") from None

    # --- paging and restrictions --------------------------------------------------

    def _restricted(
        self,
        call: EwsCall,
        entities: list[Any],
        kinds: dict[str, str],
        value_of: Callable[[Any, str], Any],
    ) -> list[Any]:
        restriction = call.body.find(_m("Restriction"))
        if restriction is None or len(restriction) == 0:
            return entities
        predicate = parse_restriction(restriction[0], kinds)
        return [entity for entity in entities if predicate(partial(value_of, entity))]

    def _page(
        self, call: EwsCall, entities: list[Any], view: Node | None
    ) -> tuple[list[Any], Node, Node]:
        """Cut one page; return it, its response message and the RootFolder element."""
        total = len(entities)
        limit = self.settings.find_count_limit
        offset = 0
        if view is not None:
            limit = min(limit, int(view.get("MaxEntriesReturned", str(limit))))
            offset = int(view.get("Offset", "0"))
            if view.get("BasePoint", "Beginning") == "End":
                offset = max(0, total - offset - limit)
        page = entities[offset : offset + limit]
        end = offset + len(page)
        message = self._message(call)
        root = _add(message, _m("RootFolder"))
        root.set("IndexedPagingOffset", str(end))
        root.set("TotalItemsInView", str(total))
        root.set("IncludesLastItemInRange", "true" if end >= total else "false")
        return page, message, root

    # --- items --------------------------------------------------------------------

    def _item(self, call: EwsCall, node: Node | None) -> Item:
        """Resolve an ItemId element, checking access to its mailbox."""
        if node is None or _local(node.tag) != "ItemId":
            kind = "none" if node is None else _local(node.tag)
            raise ResponseError(
                "ErrorInvalidOperation",
                f"The simulator reads ItemId elements, not {kind}.",
            )
        item_id = node.get("Id", "")
        if not _ID_SHAPE.match(item_id):
            raise ResponseError("ErrorInvalidIdMalformed")
        item = self.world.items.get(item_id)
        if item is None:
            raise ResponseError("ErrorItemNotFound")
        self._check_access(call, item.mailbox)
        return item

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.wall_clock(), UTC)

    def _item_xml(self, item: Item, shape: Shape) -> Node:
        """Build a t:Message with the fields the shape asks for, in schema order."""
        node = Element(_t("Message"))
        summary = item.summary
        if shape.include_mime or "item:MimeContent" in shape.paths:
            mime = base64.b64encode(item.mime).decode("ascii")
            _add(node, _t("MimeContent"), mime, CharacterSet="UTF-8")
        _add(
            node,
            _t("ItemId"),
            Id=item.item_id,
            ChangeKey=_change_key(item.item_id, item.version),
        )

        def wants(path: str) -> bool:
            return shape.wants(path, _ITEM_DEFAULT)

        if wants("item:ParentFolderId"):
            _add(
                node,
                _t("ParentFolderId"),
                Id=item.folder_id,
                ChangeKey=_change_key(item.folder_id, 1),
            )
        if wants("item:ItemClass"):
            _add(node, _t("ItemClass"), "IPM.Note")
        if wants("item:Subject"):
            _add(node, _t("Subject"), summary.subject)
        if wants("item:Body"):
            body_type = "HTML" if summary.body_type == "html" else "Text"
            _add(node, _t("Body"), summary.body, BodyType=body_type)
        if wants("item:DateTimeReceived"):
            _add(node, _t("DateTimeReceived"), _ews_time(item.received_at))
        if wants("item:Size"):
            _add(node, _t("Size"), str(len(item.mime)))
        if wants("item:Categories") and item.categories:
            categories = _add(node, _t("Categories"))
            for category in item.categories:
                _add(categories, _t("String"), category)
        if wants("item:Importance"):
            _add(node, _t("Importance"), item.importance.title())
        in_reply_to = _header_value(item, "In-Reply-To")
        if wants("item:InReplyTo") and in_reply_to:
            _add(node, _t("InReplyTo"), in_reply_to)
        if wants("item:IsDraft"):
            _add(node, _t("IsDraft"), "true" if item.is_draft else "false")
        if wants("item:InternetMessageHeaders"):
            headers = _add(node, _t("InternetMessageHeaders"))
            for name, value in summary.headers:
                _add(headers, _t("InternetMessageHeader"), value, HeaderName=name)
        if wants("item:DateTimeSent") and summary.sent_at is not None:
            _add(node, _t("DateTimeSent"), _ews_time(summary.sent_at))
        if wants("item:DateTimeCreated"):
            created = item.created_at or item.received_at
            _add(node, _t("DateTimeCreated"), _ews_time(created))
        if wants("item:HasAttachments"):
            has = "true" if summary.has_attachments else "false"
            _add(node, _t("HasAttachments"), has)
        if MESSAGE_FLAGS_TAG in shape.extended_tags:
            prop = _add(node, _t("ExtendedProperty"))
            _add(
                prop,
                _t("ExtendedFieldURI"),
                PropertyTag=hex(MESSAGE_FLAGS_TAG),
                PropertyType="Integer",
            )
            _add(prop, _t("Value"), str(_message_flags(item)))
        if wants("item:LastModifiedTime"):
            modified = item.modified_at or item.received_at
            _add(node, _t("LastModifiedTime"), _ews_time(modified))
        self._message_fields(node, item, wants)
        return node

    def _message_fields(
        self, node: Node, item: Item, wants: Callable[[str], bool]
    ) -> None:
        summary = item.summary
        if wants("message:Sender") and summary.sender:
            _mailbox_xml(_add(node, _t("Sender")), summary.sender)
        for path, addresses in (
            ("message:ToRecipients", summary.to),
            ("message:CcRecipients", summary.cc),
        ):
            if wants(path) and addresses:
                holder = _add(node, _t(path.split(":", 1)[1]))
                for address in addresses:
                    _mailbox_xml(holder, address)
        if wants("message:From") and summary.sender:
            _mailbox_xml(_add(node, _t("From")), summary.sender)
        if wants("message:InternetMessageId") and summary.internet_message_id:
            _add(node, _t("InternetMessageId"), summary.internet_message_id)
        if wants("message:IsRead"):
            _add(node, _t("IsRead"), "true" if item.is_read else "false")
        references = _header_value(item, "References")
        if wants("message:References") and references:
            _add(node, _t("References"), references)

    def _items_in(self, folder: Folder, traversal: str) -> list[Item]:
        # NOTE: soft-deleted items lose their origin folder in the mail world, so a
        # SoftDeleted traversal finds nothing; search recoverableitemsdeletions.
        if folder.well_known == ROOT or traversal != "Shallow":
            return []
        return list(self.world.items_of(folder.mailbox, folder.folder_id))

    def _sorted(self, call: EwsCall, items: list[Item]) -> list[Item]:
        order: list[tuple[str, bool]] = []
        for field_order in _children(call.body.find(_m("SortOrder")), _t("FieldOrder")):
            uri = field_order.find(_t("FieldURI"))
            path = "" if uri is None else uri.get("FieldURI", "")
            if path not in ITEM_FIELDS:
                raise ResponseError(
                    "ErrorUnsupportedPathForQuery",
                    f"The simulator does not sort on {path or 'that path'}.",
                )
            order.append((path, field_order.get("Order") == "Descending"))
        if not order:
            order = [("item:DateTimeReceived", True)]
        for path, descending in reversed(order):
            items.sort(key=partial(_item_sort_key, path=path), reverse=descending)
        return items

    def _find_item(self, call: EwsCall) -> list[Node]:
        traversal = call.body.get("Traversal", "Shallow")
        if traversal not in ("Shallow", "SoftDeleted", "Associated"):
            raise _schema_error(f"'{traversal}' is not a valid item traversal.")
        shape = Shape.parse(call.body.find(_m("ItemShape")))
        view = call.body.find(_m("IndexedPageItemView"))
        unsupported = [
            name
            for name in ("FractionalPageItemView", "CalendarView", "ContactsView")
            if call.body.find(_m(name)) is not None
        ]
        if call.body.find(_m("QueryString")) is not None:
            unsupported.append("QueryString")
        messages = []
        for node in _children(call.body.find(_m("ParentFolderIds")), "*"):
            try:
                if unsupported:
                    raise ResponseError(
                        "ErrorInvalidOperation",
                        f"The simulator does not serve {', '.join(unsupported)}.",
                    )
                folder = self._folder(call, node)
                items = self._items_in(folder, traversal)
                items = self._restricted(call, items, ITEM_FIELDS, item_value)
                items = self._sorted(call, items)
            except ResponseError as error:
                messages.append(self._error(call, error))
                continue
            page, message, root = self._page(call, items, view)
            container = _add(root, _t("Items"))
            container.extend(self._item_xml(item, shape) for item in page)
            messages.append(message)
        return messages

    def _get_item(self, call: EwsCall) -> list[Node]:
        shape = Shape.parse(call.body.find(_m("ItemShape")))
        messages = []
        for node in _children(call.body.find(_m("ItemIds")), "*"):
            try:
                item = self._item(call, node)
            except ResponseError as error:
                messages.append(self._error(call, error, _m("Items")))
                continue
            message = self._message(call, _m("Items"))
            message[-1].append(self._item_xml(item, shape))
            messages.append(message)
        return messages

    def _create_item(self, call: EwsCall) -> list[Node]:
        disposition = call.body.get("MessageDisposition")
        saved = next(
            iter(_children(call.body.find(_m("SavedItemFolderId")), "*")), None
        )
        messages = []
        for spec in _children(call.body.find(_m("Items")), "*"):
            try:
                item = self._new_item(call, spec, disposition, saved)
            except ResponseError as error:
                messages.append(self._error(call, error, _m("Items")))
                continue
            message = self._message(call, _m("Items"))
            if item is not None:
                call.changed = True
                created = _add(message[-1], _t("Message"))
                _add(
                    created,
                    _t("ItemId"),
                    Id=item.item_id,
                    ChangeKey=_change_key(item.item_id, item.version),
                )
            messages.append(message)
        return messages

    def _new_item(
        self,
        call: EwsCall,
        spec: Node,
        disposition: str | None,
        saved: Node | None,
    ) -> Item | None:
        """Store one CreateItem message; None when it is sent without a copy.

        A saved message is a draft unless PR_MESSAGE_FLAGS is set without
        MSGFLAG_UNSENT. IsRead, or else MSGFLAG_READ, gives its read state.

        NOTE: sending is not simulated. SendOnly stores nothing and SendAndSaveCopy
        only stores the copy in Sent Items; no recipient receives the message.
        """
        if _local(spec.tag) not in ("Message", "Item"):
            raise ResponseError(
                "ErrorInvalidOperation",
                f"The simulator creates messages, not {_local(spec.tag)} items.",
            )
        if disposition not in ("SaveOnly", "SendOnly", "SendAndSaveCopy"):
            raise ResponseError(
                "ErrorMessageDispositionRequired",
                "MessageDisposition is required for messages: SaveOnly, SendOnly or "
                "SendAndSaveCopy.",
            )
        assert call.mailbox is not None
        mime = self._mime_of(spec, call.mailbox)
        if disposition == "SendOnly":
            return None
        if saved is not None:
            folder = self._folder(call, saved)
        else:
            default = "drafts" if disposition == "SaveOnly" else "sentitems"
            folder = self.world.folder(call.mailbox, default)
        if folder.well_known == ROOT:
            raise ResponseError(
                "ErrorInvalidOperation", "The simulator stores no items in the root."
            )

        flags = _extended_flags(spec)
        is_read = _flag(_text(spec, _t("IsRead")))
        if disposition == "SaveOnly":
            is_draft = flags is None or bool(flags & MSGFLAG_UNSENT)
        else:
            is_draft = False
        if is_read is None:
            is_read = bool(flags & MSGFLAG_READ) if flags is not None else True
        return self.world.add_item(
            folder.mailbox,
            folder.folder_id,
            mime,
            received_at=self._now(),
            is_draft=is_draft,
            is_read=is_read,
        )

    def _mime_of(self, spec: Node, mailbox: str) -> bytes:
        encoded = _text(spec, _t("MimeContent"))
        if encoded is None:
            return _compose_mime(spec, mailbox, self._now())
        try:
            mime = base64.b64decode("".join(encoded.split()), validate=True)
        except (binascii.Error, ValueError):
            raise ResponseError(
                "ErrorMimeContentInvalidBase64String",
                "Invalid base64 string for MIME content.",
            ) from None
        if not mime.strip() or summarize_mime(mime).headers == ():
            raise ResponseError(
                "ErrorMimeContentConversionFailed",
                "The MIME content of the item could not be converted.",
            )
        return mime

    def _update_item(self, call: EwsCall) -> list[Node]:
        messages = []
        for change in _children(call.body.find(_m("ItemChanges")), _t("ItemChange")):
            try:
                item = self._item(call, change.find(_t("ItemId")))
                for update in _children(change.find(_t("Updates")), "*"):
                    _apply_update(item, update)
            except ResponseError as error:
                messages.append(self._error(call, error, _m("Items")))
                continue
            item.version += 1
            item.modified_at = self._now()
            call.changed = True
            message = self._message(call, _m("Items"))
            updated = _add(message[-1], _t("Message"))
            _add(
                updated,
                _t("ItemId"),
                Id=item.item_id,
                ChangeKey=_change_key(item.item_id, item.version),
            )
            conflicts = _add(message, _m("ConflictResults"))
            _add(conflicts, _t("Count"), "0")
            messages.append(message)
        return messages

    def _move_item(self, call: EwsCall) -> list[Node]:
        return self._transfer(call, move=True)

    def _copy_item(self, call: EwsCall) -> list[Node]:
        return self._transfer(call, move=False)

    def _transfer(self, call: EwsCall, *, move: bool) -> list[Node]:
        """Move or copy items; across mailboxes the response carries no new id."""
        target_node = next(iter(_children(call.body.find(_m("ToFolderId")), "*")), None)
        if target_node is None:
            raise _schema_error(f"{call.operation} needs a ToFolderId.")
        messages = []
        for node in _children(call.body.find(_m("ItemIds")), "*"):
            try:
                target = self._folder(call, target_node)
                item = self._item(call, node)
                if target.well_known == ROOT:
                    raise ResponseError(
                        "ErrorInvalidOperation",
                        "The simulator stores no items in the root folder.",
                    )
                result = self._transfer_one(item, target, move=move)
            except ResponseError as error:
                messages.append(self._error(call, error, _m("Items")))
                continue
            call.changed = True
            message = self._message(call, _m("Items"))
            if result is not None:
                moved = _add(message[-1], _t("Message"))
                _add(
                    moved,
                    _t("ItemId"),
                    Id=result.item_id,
                    ChangeKey=_change_key(result.item_id, result.version),
                )
            messages.append(message)
        return messages

    def _transfer_one(self, item: Item, target: Folder, *, move: bool) -> Item | None:
        now = self._now()
        if target.mailbox == item.mailbox:
            if move:
                return self.world.move_item(
                    item.mailbox, item.item_id, target.folder_id, now
                )
            return self.world.copy_item(
                item.mailbox, item.item_id, target.folder_id, now
            )
        self.world.add_item(
            target.mailbox,
            target.folder_id,
            item.mime,
            received_at=item.received_at,
            is_draft=item.is_draft,
            is_read=item.is_read,
        )
        if move:
            self.world.remove_item(item.mailbox, item.item_id)
        return None

    def _delete_item(self, call: EwsCall) -> list[Node]:
        delete_type = call.body.get("DeleteType")
        if delete_type not in ("HardDelete", "SoftDelete", "MoveToDeletedItems"):
            raise _schema_error(f"'{delete_type}' is not a valid DeleteType.")
        messages = []
        for node in _children(call.body.find(_m("ItemIds")), "*"):
            try:
                item = self._item(call, node)
            except ResponseError as error:
                messages.append(self._error(call, error))
                continue
            self._delete_one(item, delete_type)
            call.changed = True
            messages.append(self._message(call))
        return messages

    def _delete_one(self, item: Item, delete_type: str) -> None:
        if delete_type == "HardDelete":
            self.world.remove_item(item.mailbox, item.item_id)
            return
        trash = self.world.folder(item.mailbox, "deleteditems")
        target = trash
        if delete_type == "SoftDelete" or item.folder_id == trash.folder_id:
            target = self.world.folder(item.mailbox, RECOVERABLE_FOLDER)
        self.world.move_item(item.mailbox, item.item_id, target.folder_id, self._now())

    def _export_items(self, call: EwsCall) -> list[Node]:
        """Export items; the simulator's opaque Data is the base64 of the MIME."""
        messages = []
        for node in _children(call.body.find(_m("ItemIds")), "*"):
            try:
                item = self._item(call, node)
            except ResponseError as error:
                messages.append(self._error(call, error))
                continue
            self._remember_export(item)
            message = self._message(call)
            _add(
                message,
                _m("ItemId"),
                Id=item.item_id,
                ChangeKey=_change_key(item.item_id, item.version),
            )
            _add(message, _m("Data"), base64.b64encode(item.mime).decode("ascii"))
            messages.append(message)
        return messages

    def _remember_export(self, item: Item) -> None:
        digest = hashlib.sha256(item.mime).hexdigest()
        self._exports[digest] = item.is_read
        self._exports.move_to_end(digest)
        while len(self._exports) > self.settings.request_log_size:
            self._exports.popitem(last=False)

    def _upload_items(self, call: EwsCall) -> list[Node]:
        messages = []
        for spec in _children(call.body.find(_m("Items")), _t("Item")):
            try:
                item = self._upload_one(call, spec)
            except ResponseError as error:
                messages.append(self._error(call, error))
                continue
            call.changed = True
            message = self._message(call)
            _add(
                message,
                _m("ItemId"),
                Id=item.item_id,
                ChangeKey=_change_key(item.item_id, item.version),
            )
            messages.append(message)
        return messages

    def _upload_one(self, call: EwsCall, spec: Node) -> Item:
        """Create or update one item from its Data, the base64 MIME of an export.

        NOTE: real Data blobs carry every property; these carry MIME only, so the
        read state comes from the export that produced the blob (unread otherwise).
        """
        parent_node = spec.find(_t("ParentFolderId"))
        if parent_node is None:
            raise ResponseError(
                "ErrorInvalidOperation", "Each item needs a ParentFolderId."
            )
        parent_node = Element(_t("FolderId"), {"Id": parent_node.get("Id", "")})
        folder = self._folder(call, parent_node)
        try:
            mime = base64.b64decode("".join((_text(spec, _t("Data")) or "").split()))
        except (binascii.Error, ValueError):
            raise ResponseError(
                "ErrorInvalidBase64String", "The Data element is not valid base64."
            ) from None
        if not mime.strip():
            raise ResponseError("ErrorInvalidOperation", "The Data element is empty.")

        action = spec.get("CreateAction", "CreateNew")
        existing_node = spec.find(_t("ItemId"))
        if action in ("Update", "UpdateOrCreate") and existing_node is not None:
            try:
                existing = self._item(call, existing_node)
            except ResponseError:
                if action == "Update":
                    raise
            else:
                existing.mime = mime
                existing.__dict__.pop("summary", None)  # drop the cached parse
                existing.version += 1
                return existing
        read = self._exports.get(hashlib.sha256(mime).hexdigest(), False)
        return self.world.add_item(
            folder.mailbox,
            folder.folder_id,
            mime,
            received_at=self._now(),
            is_read=read,
        )

    # --- inbox rules --------------------------------------------------------------

    def _get_inbox_rules(self, call: EwsCall) -> list[Node]:
        """List a mailbox's inbox rules from the world's forwarding rules.

        `MailboxSmtpAddress` names the mailbox, the acting one when it is absent.
        Another mailbox needs the acting identity in `full_access`.

        NOTE: without rules the response has no InboxRules element. exchangelib 5.6
        handles that case on purpose, but Microsoft's documented sample shows only a
        response with one rule, so the empty form is an inference.
        """
        requested = (_text(call.body, _m("MailboxSmtpAddress")) or "").strip().lower()
        try:
            address = self._rules_mailbox(call, requested)
        except ResponseError as error:
            return [self._error(call, error)]

        message = self._message(call)
        _add(message, _m("OutlookRuleBlobExists"), "false")
        rules = [
            rule
            for rule in self.world.scenario.forwarding_rules
            if rule.mailbox.lower() == address
        ]
        if rules:
            holder = _add(message, _m("InboxRules"))
            for priority, rule in enumerate(rules, start=1):
                holder.append(self._rule_xml(address, priority, rule))
        return [message]

    def _rules_mailbox(self, call: EwsCall, requested: str) -> str:
        assert call.mailbox is not None
        if not requested:
            return call.mailbox
        if requested not in self.world.mailboxes or (
            self.world.platform_of(requested) != "ews"
        ):
            raise ResponseError("ErrorNonExistentMailbox")
        self._check_access(call, requested)
        return self.world.mailbox(requested).address

    def _rule_xml(self, address: str, priority: int, rule: ForwardingRuleSpec) -> Node:
        """Render one rule as a t:Rule (RuleType), its children in schema order."""
        node = Element(_t("Rule"))
        digest = hashlib.sha256(f"{address}\x1f{priority}".encode()).digest()
        _add(node, _t("RuleId"), base64.b64encode(digest[:8]).decode("ascii"))
        targets = ", ".join(rule.forward_to)
        _add(node, _t("DisplayName"), f"{rule.kind} to {targets}")
        _add(node, _t("Priority"), str(priority))
        _add(node, _t("IsEnabled"), "true" if rule.enabled else "false")
        actions = _add(node, _t("Actions"))
        if not rule.keep_copy:
            _add(actions, _t("Delete"), "true")
        recipients = _add(actions, _t(RULE_ACTIONS[rule.kind]))
        for target in rule.forward_to:
            self._address_xml(recipients, target.strip().lower())
        return node

    def _address_xml(self, parent: Node, address: str) -> None:
        """Add a t:Address (EmailAddressType); world mailboxes are of type Mailbox."""
        box = self.world.mailboxes.get(address)
        node = _add(parent, _t("Address"))
        _add(node, _t("Name"), box.display_name if box is not None else address)
        _add(node, _t("EmailAddress"), address)
        _add(node, _t("RoutingType"), "SMTP")
        _add(node, _t("MailboxType"), "Mailbox" if box is not None else "OneOff")

    def _convert_id(self, call: EwsCall) -> list[Node]:
        """Convert ids between formats; simulator ids look alike in every format."""
        destination = call.body.get("DestinationFormat", "EwsId")
        messages = []
        for node in _children(call.body.find(_m("SourceIds")), "*"):
            object_id = node.get("Id", "")
            owner = self._owner_of(object_id)
            if owner is None:
                messages.append(
                    self._error(call, ResponseError("ErrorInvalidIdMalformed"))
                )
                continue
            message = self._message(call)
            _add(
                message,
                _m("AlternateId"),
                Format=destination,
                Id=object_id,
                Mailbox=owner,
            )
            messages.append(message)
        return messages

    def _owner_of(self, object_id: str) -> str | None:
        item = self.world.items.get(object_id)
        if item is not None:
            return item.mailbox
        folder = self._folder_by_id(object_id)
        return None if folder is None else folder.mailbox

    # --- admin API ----------------------------------------------------------------

    async def _admin(self, request: web.Request, segments: list[str]) -> web.Response:
        try:
            return await self._admin_route(request, segments)
        except (ValueError, KeyError, TypeError) as exc:
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
            return self._admin_mailbox(segments[1], segments[2])

        path = "/".join(segments)
        method = request.method
        if (method, path) == ("GET", "health"):
            return web.json_response({"status": "ok"})
        if (method, path) == ("POST", "reset"):
            self.reset()
            return web.json_response({"status": "reset"})
        if (method, path) == ("GET", "mailboxes"):
            return web.json_response(sorted(self.world.mailboxes))
        if (method, path) == ("GET", "requests"):
            since = int(request.query.get("since", "0"))
            return web.json_response([asdict(e) for e in self.log if e.seq > since])
        if (method, path) == ("DELETE", "requests"):
            self.log.clear()
            return web.json_response({"status": "cleared"})
        if (method, path) == ("GET", "faults"):
            return web.json_response([rule.view() for rule in self.faults.rules])
        if (method, path) == ("POST", "faults"):
            rule = self.faults.add(await request.json())
            return web.json_response(rule.view(), status=201)
        if (method, path) == ("DELETE", "faults"):
            self.faults.clear()
            return web.json_response({"status": "cleared"})
        if (method, path) == ("GET", "throttle"):
            return web.json_response(self._throttle_view())
        if (method, path) == ("GET", "settings"):
            return web.json_response(self._settings_view())
        if (method, path) == ("PATCH", "settings"):
            self._update_settings(await request.json())
            return web.json_response(self._settings_view())
        message = f"No admin route {method} /_sim/{path}."
        return web.json_response({"error": message}, status=404)

    def _admin_mailbox(self, address: str, view: str) -> web.Response:
        if view == "messages":
            return web.json_response(self.world.snapshot(address))
        if view == "folders":
            return web.json_response(self.world.folders_snapshot(address))
        return web.json_response(
            {"error": f"No mailbox view {view!r}; use messages or folders."}, status=404
        )

    def _throttle_view(self) -> dict[str, Any]:
        return {
            "in_flight": dict(self.budgets.in_flight),
            "peak_in_flight": dict(self.budgets.peak_in_flight),
            "back_off_seconds": {
                key: round(self.budgets.remaining_back_off(key), 3)
                for key in list(self.budgets.busy_until)
            },
        }

    def _settings_view(self) -> dict[str, Any]:
        view = asdict(self.settings)
        # The passwords stay inside; only the account names are shown.
        view["service_accounts"] = sorted(self.settings.service_accounts)
        return view

    def _update_settings(self, changes: dict[str, Any]) -> None:
        known = {f.name: f for f in fields(EwsSimSettings)}
        for name, value in changes.items():
            if name not in known:
                raise ValueError(
                    f"Unknown setting {name!r}; use one of {sorted(known)}."
                )
            current = getattr(self.settings, name)
            if isinstance(current, dict | list):
                if not isinstance(value, type(current)):
                    raise ValueError(
                        f"Setting {name!r} takes a {type(current).__name__}."
                    )
                setattr(self.settings, name, value)
            elif name == "budget_key":
                if value not in ("mailbox", "caller"):
                    raise ValueError(
                        "Setting 'budget_key' takes 'mailbox' or 'caller'."
                    )
                self.settings.budget_key = value
            else:
                setattr(self.settings, name, type(current)(value))


# --- module helpers -----------------------------------------------------------------


def _message_tag(operation: str) -> str:
    if operation in UNWRAPPED_OPERATIONS:
        return _m(f"{operation}Response")
    return _m(f"{operation}ResponseMessage")


def _mailbox_xml(parent: Node, address: tuple[str, str]) -> None:
    name, email_address = address
    mailbox = _add(parent, _t("Mailbox"))
    _add(mailbox, _t("Name"), name or email_address)
    _add(mailbox, _t("EmailAddress"), email_address)
    _add(mailbox, _t("RoutingType"), "SMTP")
    _add(mailbox, _t("MailboxType"), "OneOff")


def _extended_flags(spec: Node) -> int | None:
    for prop in _children(spec, _t("ExtendedProperty")):
        uri = prop.find(_t("ExtendedFieldURI"))
        if uri is not None and _property_tag(uri) == MESSAGE_FLAGS_TAG:
            try:
                return int((_text(prop, _t("Value")) or "0").strip())
            except ValueError:
                raise ResponseError(
                    "ErrorInvalidValueForProperty",
                    "PR_MESSAGE_FLAGS needs an integer value.",
                ) from None
    return None


def _compose_mime(spec: Node, mailbox: str, now: datetime) -> bytes:
    """Build MIME from the Subject, Body and recipients of a message element."""
    subject = _text(spec, _t("Subject")) or ""
    body = _text(spec, _t("Body")) or ""
    recipients = [
        _text(box, _t("EmailAddress")) or ""
        for box in _children(spec.find(_t("ToRecipients")), _t("Mailbox"))
    ]
    from_node = spec.find(_t("From"))
    sender_box = from_node.find(_t("Mailbox")) if from_node is not None else None
    sender = _text(sender_box, _t("EmailAddress"))
    domain = mailbox.rsplit("@", 1)[-1]
    lines = [
        f"Message-ID: <{uuid.uuid4().hex}@{domain}>",
        f"Date: {now.strftime('%a, %d %b %Y %H:%M:%S +0000')}",
        f"From: {sender or mailbox}",
        f"To: {', '.join(recipients)}",
        f"Subject: {subject}",
        "MIME-Version: 1.0",
        'Content-Type: text/plain; charset="utf-8"',
        "",
        body,
    ]
    return "\r\n".join(lines).encode("utf-8")


def _apply_update(item: Item, update: Node) -> None:
    """Apply one SetItemField or DeleteItemField of an UpdateItem change."""
    kind = _local(update.tag)
    uri = next(
        (child for child in update if _local(child.tag).endswith("FieldURI")), None
    )
    if uri is None:
        raise _schema_error(f"{kind} needs a FieldURI or ExtendedFieldURI.")
    path = uri.get("FieldURI") or ""
    carrier = next((c for c in update if not _local(c.tag).endswith("FieldURI")), None)
    if (
        _local(uri.tag) == "ExtendedFieldURI"
        and _property_tag(uri) == MESSAGE_FLAGS_TAG
    ):
        flags = _extended_flags(carrier) if carrier is not None else None
        if flags is not None:
            item.is_read = bool(flags & MSGFLAG_READ)
        return
    if path == "message:IsRead" and kind == "SetItemField":
        value = _flag(_text(carrier, _t("IsRead")))
        if value is None:
            raise _schema_error(
                "SetItemField for message:IsRead needs an IsRead value."
            )
        item.is_read = value
        return
    if path == "item:Categories":
        strings = _children(
            carrier.find(_t("Categories")) if carrier is not None else None,
            _t("String"),
        )
        item.categories = (
            [] if kind == "DeleteItemField" else [s.text or "" for s in strings]
        )
        return
    if path == "item:Importance" and kind == "SetItemField":
        item.importance = (_text(carrier, _t("Importance")) or "Normal").lower()
        return
    raise ResponseError(
        "ErrorInvalidPropertySet",
        f"The simulator does not update {path or 'that property'} with {kind}.",
    )


def _item_sort_key(item: Item, *, path: str) -> tuple[int, Any]:
    return _sort_key(item_value(item, path))


def _sort_key(value: Any) -> tuple[int, Any]:
    # None sorts first, then values of one type compare among themselves.
    if value is None:
        return (0, "")
    if isinstance(value, str):
        return (1, value.lower())
    return (1, value)


# --- command line -------------------------------------------------------------------


def add_ews_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the EWS simulator's options, the mail world's among them."""
    parser.add_argument(
        "--world", type=Path, required=True, help="scenario file (JSON) to start from"
    )
    parser.add_argument(
        "--state",
        type=Path,
        required=True,
        help="state file (JSON); loaded when it exists, written after every change",
    )
    parser.add_argument(
        "--reset",
        action="store_true",
        help="start from the scenario even when the state file exists",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)"
    )
    parser.add_argument("--port", type=int, required=True, help="TCP port to listen on")
    parser.add_argument(
        "--latency-ms",
        type=float,
        default=0.0,
        help="delay added to every request, in milliseconds (default 0)",
    )
    parser.add_argument(
        "--service-account",
        action="append",
        required=True,
        metavar="USER:PASSWORD",
        help="a Basic-auth service account; repeat for more than one",
    )
    parser.add_argument(
        "--deny-impersonation",
        action="append",
        default=[],
        metavar="ADDRESS",
        help="a mailbox no service account may impersonate; repeat for more",
    )
    parser.add_argument(
        "--full-access",
        action="append",
        default=[],
        metavar="PRINCIPAL",
        help="an account or mailbox that may open every mailbox by id; repeatable",
    )
    defaults = EwsSimSettings()
    parser.add_argument(
        "--max-concurrency",
        type=int,
        default=defaults.max_concurrency,
        help="requests in flight per budget before ErrorExceededConnectionCount "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--budget-key",
        choices=("mailbox", "caller"),
        default=defaults.budget_key,
        help="whose budget a request spends: the target mailbox or the service "
        "account (default %(default)s)",
    )


def run_ews(args: argparse.Namespace) -> int:
    """Serve the EWS simulator until SIGINT or SIGTERM."""
    accounts: dict[str, str] = {}
    for spec in args.service_account:
        user, separator, password = str(spec).partition(":")
        if not separator or not user:
            logger.error(
                "Cannot start the EWS simulator: --service-account %r is not "
                "USER:PASSWORD.",
                spec,
            )
            return 2
        accounts[user.lower()] = password
    settings = EwsSimSettings(
        latency_ms=args.latency_ms,
        service_accounts=accounts,
        impersonation_denied=[str(a).lower() for a in args.deny_impersonation],
        full_access=[str(a).lower() for a in args.full_access],
        max_concurrency=args.max_concurrency,
        budget_key=args.budget_key,
    )
    world = World.open(args.world, args.state, reset=args.reset)
    simulator = EwsSimulator(world, settings, scenario_path=args.world)
    asyncio.run(_serve_until_stopped(simulator, args.host, args.port))
    return 0


async def _serve_until_stopped(simulator: EwsSimulator, host: str, port: int) -> None:
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopped.set)
    await simulator.start(host, port)
    print(f"EWS simulator listening on {simulator.endpoint}", flush=True)
    try:
        await stopped.wait()
    finally:
        await simulator.stop()
