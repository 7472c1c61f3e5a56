"""A Microsoft Graph mail simulator over the mail world, served by aiohttp.

It handles the requests msgraph-sdk (kiota) sends for mail work the way Graph v1.0
does. It serves an OAuth2 client-credentials token endpoint and
`/v1.0/users/{u}/messages` with OData `$filter`, `$select`, `$top`, `$skip`,
`$orderby` and `$expand` of single-value extended properties. It also serves mail
folders (well-known names, child folders, hidden folders), raw MIME (`$value`),
PATCH, move and copy (201 with a new id), delete, and MIME upload, which makes a
draft. Path segments, query names and query values are percent-decoded, and a raw
`+` in the query string is decoded as a space, as web servers do. Errors are OData
error bodies. Each mailbox gets Graph's per-mailbox throttling: at most
`concurrency_limit` requests in flight and `window_requests` requests per
`window_seconds`, with 429 and Retry-After beyond either, and the app as a whole
gets `app_window_requests` per `app_window_seconds`. JSON `$batch` (at most 20
requests, fully parallel or one `dependsOn` chain) runs each inner request through
the same limits, so the fifth parallel request to one mailbox gets its own 429.

Throttling windows, Retry-After and latency follow the running event loop's
clock, so under `autopull.sim.clock.VirtualTimeLoop` long waits pass at once.

Paths under `/_sim/` are the simulator's own admin API, not Graph: reset, fault
injection, the request log, settings, and views of the state for tests and the demo.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import logging
import math
import random
import re
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, NoReturn, TypeVar, cast
from urllib.parse import parse_qsl, quote, unquote, unquote_plus

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from .graph_batch import BatchError, BatchItem, parse_batch
from .world import (
    RECOVERABLE_FOLDER,
    ROOT_FOLDER,
    Folder,
    FolderExistsError,
    FolderNotFoundError,
    ForwardingRuleSpec,
    Item,
    ItemNotFoundError,
    TenantSpec,
    UnknownMailboxError,
    World,
    WorldError,
    load_scenario,
    make_id,
    summarize_mime,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Well-known folder names Graph accepts wherever a folder id is expected.
GRAPH_WELL_KNOWN_NAMES = frozenset(
    {
        "archive",
        "clutter",
        "conflicts",
        "conversationhistory",
        "deleteditems",
        "drafts",
        "inbox",
        "junkemail",
        "localfailures",
        "msgfolderroot",
        "outbox",
        "recoverableitemsdeletions",
        "scheduled",
        "searchfolders",
        "sentitems",
        "serverfailures",
        "syncissues",
    }
)
GRAPH_AUDIENCES = frozenset(
    {"https://graph.microsoft.com", "00000003-0000-0000-c000-000000000000"}
)
READ_PERMISSIONS = frozenset({"Mail.Read", "Mail.ReadWrite", "Mail.ReadBasic.All"})
WRITE_PERMISSIONS = frozenset({"Mail.ReadWrite"})
_ID_SHAPE = re.compile(r"^[A-Za-z0-9_\-+/=]{16,}$")
_EXTENDED_ID = re.compile(
    r"^(?P<type>\w+)\s+(?:(?P<guid>\{[0-9A-Fa-f-]{36}\})\s+(?P<kind>Name|Id)\s+"
    r"(?P<name>\S+)|(?P<tag>0x[0-9A-Fa-f]{1,4}))$"
)
JSON_CONTENT_TYPE = (
    "application/json;odata.metadata=minimal;odata.streaming=true;"
    "IEEE754Compatible=false;charset=utf-8"
)


@dataclass
class GraphSimSettings:
    """Behaviour knobs; the admin API can change them while the simulator runs.

    `latency_ms` delays every Graph request, inner requests of a batch included.
    `concurrency_limit`, `window_requests` and `window_seconds` are the per-mailbox
    limits, and `app_window_requests` per `app_window_seconds` the limit of the app
    across all mailboxes (Graph publishes 130,000 requests per 10 seconds).
    `page_size` is the default page of a collection. `folder_exists_status` is 400
    or 409, because Graph has been seen to send both for a duplicate folder name.
    Request bodies above `max_request_bytes` get 413, and Microsoft support gives
    Graph's limit as about 4 MB.
    """

    latency_ms: float = 0.0
    concurrency_limit: int = 4
    concurrency_retry_after: int = 1
    window_requests: int = 10_000
    window_seconds: float = 600.0
    app_window_requests: int = 130_000
    app_window_seconds: float = 10.0
    max_batch_requests: int = 20
    page_size: int = 10
    max_page_size: int = 1000
    token_lifetime: int = 3599
    folder_exists_status: int = 400
    max_request_bytes: int = 4 * 1024 * 1024
    request_log_size: int = 10_000


class GraphError(Exception):
    """An error response: an HTTP status and an OData error code and message."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


class TokenError(Exception):
    """An OAuth2 error response of the token endpoint."""

    def __init__(self, status: int, error: str, code: int, description: str) -> None:
        super().__init__(description)
        self.status = status
        self.error = error
        self.code = code
        self.description = description


class _DropConnection(Exception):
    """Close the connection without a response."""


def bad_request(message: str) -> GraphError:
    return GraphError(400, "BadRequest", message)


def item_not_found() -> GraphError:
    return GraphError(
        404, "ErrorItemNotFound", "The specified object was not found in the store."
    )


def id_malformed() -> GraphError:
    return GraphError(400, "ErrorInvalidIdMalformed", "Id is malformed.")


# --- OData: entity types --------------------------------------------------------------


@dataclass(frozen=True)
class EntityType:
    """The properties of an OData entity type that $filter, $select, $orderby know."""

    name: str
    properties: dict[str, str]

    def canonical(self, name: str) -> str:
        """Return the property's canonical spelling; names are case-insensitive."""
        for known in self.properties:
            if known.lower() == name.lower():
                return known
        raise bad_request(
            f"Could not find a property named '{name}' on type '{self.name}'."
        )


MESSAGE_TYPE = EntityType(
    "microsoft.graph.message",
    {
        "id": "Edm.String",
        "createdDateTime": "Edm.DateTimeOffset",
        "lastModifiedDateTime": "Edm.DateTimeOffset",
        "changeKey": "Edm.String",
        "categories": "Collection(Edm.String)",
        "receivedDateTime": "Edm.DateTimeOffset",
        "sentDateTime": "Edm.DateTimeOffset",
        "hasAttachments": "Edm.Boolean",
        "internetMessageId": "Edm.String",
        "subject": "Edm.String",
        "bodyPreview": "Edm.String",
        "importance": "Edm.String",
        "parentFolderId": "Edm.String",
        "conversationId": "Edm.String",
        "isRead": "Edm.Boolean",
        "isDraft": "Edm.Boolean",
        "body": "microsoft.graph.itemBody",
        "sender": "microsoft.graph.recipient",
        "from": "microsoft.graph.recipient",
        "from/emailAddress/address": "Edm.String",
        "sender/emailAddress/address": "Edm.String",
        "toRecipients": "Collection(microsoft.graph.recipient)",
        "ccRecipients": "Collection(microsoft.graph.recipient)",
        "bccRecipients": "Collection(microsoft.graph.recipient)",
        "replyTo": "Collection(microsoft.graph.recipient)",
        "flag": "microsoft.graph.followupFlag",
        "internetMessageHeaders": "Collection(microsoft.graph.internetMessageHeader)",
        "singleValueExtendedProperties": "Collection(microsoft.graph.extendedProperty)",
    },
)
FOLDER_TYPE = EntityType(
    "microsoft.graph.mailFolder",
    {
        "id": "Edm.String",
        "displayName": "Edm.String",
        "parentFolderId": "Edm.String",
        "childFolderCount": "Edm.Int32",
        "unreadItemCount": "Edm.Int32",
        "totalItemCount": "Edm.Int32",
        "sizeInBytes": "Edm.Int64",
        "isHidden": "Edm.Boolean",
    },
)
MESSAGE_TRACE_TYPE = EntityType(
    "microsoft.graph.exchangeMessageTrace",
    {
        "id": "Edm.String",
        "messageId": "Edm.String",
        "senderAddress": "Edm.String",
        "recipientAddress": "Edm.String",
        "receivedDateTime": "Edm.DateTimeOffset",
        "subject": "Edm.String",
        "status": "Edm.String",
        "size": "Edm.Int32",
        "fromIP": "Edm.String",
        "toIP": "Edm.String",
    },
)
# Graph accepts message trace queries over at most 10 days each.
MESSAGE_TRACE_WINDOW = timedelta(days=10)
TRACE_PERMISSIONS = frozenset({"ExchangeMessageTrace.Read.All"})
EXTENDED_PROPERTY_TYPE = EntityType(
    "microsoft.graph.singleValueLegacyExtendedProperty",
    {"id": "Edm.String", "value": "Edm.String"},
)
# Properties a message shows only when $select names them.
_SELECT_ONLY = frozenset({"internetMessageHeaders", "singleValueExtendedProperties"})
_SCALAR_TYPES = frozenset(
    {"Edm.String", "Edm.Boolean", "Edm.DateTimeOffset", "Edm.Int32", "Edm.Int64"}
)


# --- OData: $filter -------------------------------------------------------------------


@dataclass(frozen=True)
class _Token:
    kind: str  # string, number, datetime, name, symbol, end
    text: str
    value: Any
    position: int


_OPERATORS = {
    "eq": "Equal",
    "ne": "NotEqual",
    "gt": "GreaterThan",
    "ge": "GreaterThanOrEqual",
    "lt": "LessThan",
    "le": "LessThanOrEqual",
}
_FUNCTIONS = frozenset({"startswith", "endswith", "contains"})
_DATETIME_LITERAL = re.compile(
    r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:\d{2})$"
)


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    position = 0
    while position < len(text):
        char = text[position]
        if char.isspace():
            position += 1
        elif char == "'":
            value, position = _read_string(text, position)
            tokens.append(_Token("string", "'", value, position))
        elif char in "(),":
            tokens.append(_Token("symbol", char, char, position))
            position += 1
        elif char.isalpha() or char == "_":
            match = re.compile(r"[A-Za-z_][A-Za-z0-9_/]*").match(text, position)
            assert match is not None
            tokens.append(_Token("name", match.group(), match.group(), position))
            position = match.end()
        elif char.isdigit() or (
            char == "-" and text[position + 1 : position + 2].isdigit()
        ):
            match = re.compile(r"-?[0-9][0-9A-Za-z:.+\-]*").match(text, position)
            assert match is not None
            tokens.append(_literal_token(match.group(), position, text))
            position = match.end()
        else:
            raise bad_request(
                f"Invalid filter clause: Syntax error: character '{char}' is not valid "
                f"at position {position} in '{text}'."
            )
    tokens.append(_Token("end", "", None, len(text)))
    return tokens


def _read_string(text: str, start: int) -> tuple[str, int]:
    chars: list[str] = []
    position = start + 1
    while position < len(text):
        if text[position] == "'":
            if text[position + 1 : position + 2] == "'":
                chars.append("'")
                position += 2
                continue
            return "".join(chars), position + 1
        chars.append(text[position])
        position += 1
    raise bad_request(
        f"Invalid filter clause: There is an unterminated string literal at position "
        f"{start} in '{text}'."
    )


def _literal_token(word: str, position: int, text: str) -> _Token:
    if _DATETIME_LITERAL.match(word):
        moment = datetime.fromisoformat(word.replace("Z", "+00:00"))
        return _Token("datetime", word, moment.astimezone(UTC), position)
    if re.fullmatch(r"-?\d+", word):
        return _Token("number", word, int(word), position)
    raise bad_request(
        f"Invalid filter clause: Syntax error at position {position} in '{text}': "
        f"'{word}' is not a valid literal."
    )


Getter = Callable[[str], Any]


class FilterNode:
    """A parsed $filter expression."""

    def matches(self, get: Getter) -> bool:
        raise NotImplementedError


@dataclass(frozen=True)
class _Compare(FilterNode):
    prop: str
    operator: str
    literal: Any

    def matches(self, get: Getter) -> bool:
        return _compare(get(self.prop), self.operator, self.literal)


@dataclass(frozen=True)
class _Call(FilterNode):
    function: str
    prop: str
    literal: str

    def matches(self, get: Getter) -> bool:
        value = get(self.prop)
        if not isinstance(value, str):
            return False
        haystack, needle = value.lower(), self.literal.lower()
        if self.function == "startswith":
            return haystack.startswith(needle)
        if self.function == "endswith":
            return haystack.endswith(needle)
        return needle in haystack


@dataclass(frozen=True)
class _Logical(FilterNode):
    operator: str
    left: FilterNode
    right: FilterNode

    def matches(self, get: Getter) -> bool:
        if self.operator == "and":
            return self.left.matches(get) and self.right.matches(get)
        return self.left.matches(get) or self.right.matches(get)


@dataclass(frozen=True)
class _Not(FilterNode):
    operand: FilterNode

    def matches(self, get: Getter) -> bool:
        return not self.operand.matches(get)


def _compare(value: Any, operator: str, literal: Any) -> bool:
    # Exchange compares strings without regard to case.
    if isinstance(value, str) and isinstance(literal, str):
        value, literal = value.lower(), literal.lower()
    if operator == "eq":
        return bool(value == literal)
    if operator == "ne":
        return bool(value != literal)
    if value is None or literal is None:
        return False
    if operator == "gt":
        return bool(value > literal)
    if operator == "ge":
        return bool(value >= literal)
    if operator == "lt":
        return bool(value < literal)
    return bool(value <= literal)


class FilterParser:
    """A recursive-descent parser for the OData $filter subset Graph mail uses.

    Grammar: `or` of `and` of [`not`] primary, where a primary is a parenthesized
    expression, `prop op literal`, `literal op prop`, a boolean property, or
    `startswith|endswith|contains(prop, 'text')`. String literals double `'`.
    """

    def __init__(self, text: str, entity: EntityType) -> None:
        self.text = text
        self.entity = entity
        self.tokens = _tokenize(text)
        self.index = 0

    def parse(self) -> FilterNode:
        node = self._or()
        if self._peek().kind != "end":
            self._fail(self._peek())
        return node

    def _peek(self) -> _Token:
        return self.tokens[self.index]

    def _take(self) -> _Token:
        token = self.tokens[self.index]
        self.index += 1
        return token

    def _fail(self, token: _Token) -> NoReturn:
        shown = token.text or "end of input"
        raise bad_request(
            f"Invalid filter clause: Syntax error at position {token.position} in "
            f"'{self.text}': unexpected '{shown}'."
        )

    def _keyword(self, word: str) -> bool:
        token = self._peek()
        if token.kind == "name" and token.text == word:
            self.index += 1
            return True
        return False

    def _or(self) -> FilterNode:
        node = self._and()
        while self._keyword("or"):
            node = _Logical("or", node, self._and())
        return node

    def _and(self) -> FilterNode:
        node = self._unary()
        while self._keyword("and"):
            node = _Logical("and", node, self._unary())
        return node

    def _unary(self) -> FilterNode:
        if self._keyword("not"):
            return _Not(self._unary())
        return self._primary()

    def _primary(self) -> FilterNode:
        token = self._peek()
        if token.kind == "symbol" and token.text == "(":
            self._take()
            node = self._or()
            self._expect(")")
            return node
        if token.kind == "name" and token.text in _FUNCTIONS:
            return self._call()
        return self._comparison()

    def _call(self) -> FilterNode:
        function = self._take().text
        self._expect("(")
        prop = self._property(self._take())
        self._expect(",")
        literal = self._take()
        self._expect(")")
        if literal.kind != "string" or self.entity.properties[prop] != "Edm.String":
            raise bad_request(
                f"Invalid filter clause: {function} needs a string property and a "
                f"string literal in '{self.text}'."
            )
        return _Call(function, prop, literal.value)

    def _comparison(self) -> FilterNode:
        left = self._take()
        operator = self._peek()
        if operator.kind != "name" or operator.text not in _OPERATORS:
            if left.kind == "name" and self._is_boolean_property(left.text):
                return _Compare(self.entity.canonical(left.text), "eq", True)
            self._fail(operator)
        self._take()
        right = self._take()
        if left.kind == "name" and left.text not in ("true", "false", "null"):
            prop_token, literal_token = left, right
        elif right.kind == "name" and right.text not in ("true", "false", "null"):
            prop_token, literal_token = right, left
        else:
            self._fail(left)
        prop = self._property(prop_token)
        literal = self._literal(literal_token)
        self._check_types(prop, operator.text, literal_token, literal)
        return _Compare(prop, operator.text, literal)

    def _expect(self, symbol: str) -> None:
        token = self._take()
        if token.kind != "symbol" or token.text != symbol:
            self._fail(token)

    def _property(self, token: _Token) -> str:
        if token.kind != "name":
            self._fail(token)
        return self.entity.canonical(token.text)

    def _is_boolean_property(self, name: str) -> bool:
        try:
            return self.entity.properties[self.entity.canonical(name)] == "Edm.Boolean"
        except GraphError:
            return False

    def _literal(self, token: _Token) -> Any:
        if token.kind in ("string", "number", "datetime"):
            return token.value
        if token.kind == "name" and token.text in ("true", "false"):
            return token.text == "true"
        if token.kind == "name" and token.text == "null":
            return None
        self._fail(token)

    def _check_types(
        self, prop: str, operator: str, token: _Token, literal: Any
    ) -> None:
        prop_type = self.entity.properties[prop]
        if prop_type not in _SCALAR_TYPES:
            raise bad_request(
                f"Invalid filter clause: the property '{prop}' cannot be compared with "
                f"'{operator}'."
            )
        literal_type = {
            "string": "Edm.String",
            "number": "Edm.Int32",
            "datetime": "Edm.DateTimeOffset",
        }.get(token.kind, "Edm.Boolean" if isinstance(literal, bool) else "null")
        compatible = (
            literal_type == "null"
            or literal_type == prop_type
            or (literal_type == "Edm.Int32" and prop_type == "Edm.Int64")
        )
        if not compatible:
            raise bad_request(
                "A binary operator with incompatible types was detected. Found operand "
                f"types '{prop_type}' and '{literal_type}' for operator kind "
                f"'{_OPERATORS[operator]}'."
            )


def parse_filter(text: str, entity: EntityType) -> FilterNode:
    """Parse a $filter value, raising 400 BadRequest for errors as Graph does."""
    if not text.strip():
        raise bad_request("Invalid filter clause: the filter is empty.")
    return FilterParser(text, entity).parse()


# --- OData: query options -------------------------------------------------------------


@dataclass
class QueryOptions:
    """The decoded OData system query options of one request."""

    params: dict[str, str]
    filter: FilterNode | None = None
    select: list[str] | None = None
    expand_extended: FilterNode | None = None
    expand_all_extended: bool = False
    orderby: list[tuple[str, bool]] = field(default_factory=list)
    top: int | None = None
    skip: int = 0
    count: bool = False


_KNOWN_OPTIONS = frozenset(
    {"$filter", "$select", "$expand", "$orderby", "$top", "$skip", "$count", "$search"}
)


def parse_query_string(raw: str) -> dict[str, str]:
    """Decode a raw query string: names and values are percent-decoded, `+` is a space.

    System query option names (`$filter`, also sent as `%24filter`) are matched
    without regard to case; a name given twice is rejected as Graph does.
    """
    params: dict[str, str] = {}
    for part in raw.split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        name = unquote_plus(name)
        value = unquote_plus(value)
        if name.startswith("$"):
            name = name.lower()
        if name in params:
            raise bad_request(
                f"Query option '{name}' was specified more than once, but it must be "
                "specified at most once."
            )
        params[name] = value
    return params


def build_query_options(params: dict[str, str], entity: EntityType) -> QueryOptions:
    """Validate the system query options for a collection or an entity of `entity`."""
    options = QueryOptions(params)
    for name in params:
        if name.startswith("$") and name not in _KNOWN_OPTIONS:
            raise bad_request(f"The query parameter '{name}' is not supported.")
    if "$search" in params:
        raise bad_request("The simulator does not support $search; use $filter.")
    if "$filter" in params:
        options.filter = parse_filter(params["$filter"], entity)
    if "$select" in params:
        options.select = [
            entity.canonical(name.strip())
            for name in params["$select"].split(",")
            if name
        ]
    if "$expand" in params:
        _parse_expand(params["$expand"], entity, options)
    if "$orderby" in params:
        options.orderby = _parse_orderby(params["$orderby"], entity)
    if "$top" in params:
        options.top = _parse_count(params["$top"], "$top")
    if "$skip" in params:
        options.skip = _parse_count(params["$skip"], "$skip")
    if "$count" in params:
        if params["$count"] not in ("true", "false"):
            raise bad_request(f"Invalid value '{params['$count']}' for $count.")
        options.count = params["$count"] == "true"
    return options


def _parse_count(text: str, name: str) -> int:
    if not re.fullmatch(r"\d+", text):
        raise bad_request(
            f"Invalid value '{text}' for {name} query option found. The {name} query "
            "option requires a non-negative integer value."
        )
    return int(text)


def _parse_orderby(text: str, entity: EntityType) -> list[tuple[str, bool]]:
    order: list[tuple[str, bool]] = []
    for clause in text.split(","):
        words = clause.split()
        if (
            not words
            or len(words) > 2
            or (len(words) == 2 and words[1] not in ("asc", "desc"))
        ):
            raise bad_request(f"Invalid $orderby clause '{clause.strip()}'.")
        prop = entity.canonical(words[0])
        if entity.properties[prop] not in _SCALAR_TYPES:
            raise bad_request(f"The property '{prop}' cannot be used in $orderby.")
        order.append((prop, len(words) == 2 and words[1] == "desc"))
    return order


def _parse_expand(text: str, entity: EntityType, options: QueryOptions) -> None:
    match = re.fullmatch(r"\s*(\w+)\s*(?:\((.*)\))?\s*", text, re.DOTALL)
    if match is None:
        raise bad_request(f"Invalid $expand clause '{text}'.")
    name = entity.canonical(match.group(1))
    if name != "singleValueExtendedProperties":
        raise bad_request(f"The simulator cannot expand '{name}'.")
    inner = match.group(2)
    if inner is None:
        options.expand_all_extended = True
        return
    option, _, value = inner.partition("=")
    if option.strip().lower() != "$filter":
        raise bad_request(
            f"Invalid $expand clause '{text}': only $filter is supported."
        )
    options.expand_extended = parse_filter(value, EXTENDED_PROPERTY_TYPE)


def normalize_extended_id(raw: str) -> str:
    """Return an extended property id in the form Graph sends back.

    The type keeps its case, a property-set GUID is lowercased, and the name stays
    as given: `String {00020329-...-000000000046} Name AutopullQuarantine`.
    """
    match = _EXTENDED_ID.match(raw.strip())
    if match is None:
        raise GraphError(
            400,
            "ErrorInvalidProperty",
            f"The extended property id '{raw}' is not valid. Use "
            "'{type} {guid} Name {name}' or '{type} 0x{tag}'.",
        )
    if match.group("tag"):
        return f"{match.group('type')} {match.group('tag').lower()}"
    return (
        f"{match.group('type')} {match.group('guid').lower()} "
        f"{match.group('kind')} {match.group('name')}"
    )


# --- rendering ------------------------------------------------------------------------


def _iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _recipient(pair: tuple[str, str]) -> dict[str, Any]:
    name, address = pair
    return {"emailAddress": {"name": name or address, "address": address}}


def _change_key(item_id: str, version: int) -> str:
    digest = hashlib.sha256(f"{item_id}:{version}".encode()).digest()
    return "CQAAABYAAA" + base64.b64encode(digest[:24]).decode("ascii")


def _preview(item: Item) -> str:
    text = item.summary.body
    if item.summary.body_type == "html":
        text = re.sub(r"<[^>]+>", " ", text)
    return " ".join(text.split())[:255]


def message_value(item: Item, world: World, prop: str) -> Any:
    """Return one message property as Graph's JSON shows it."""
    summary = item.summary
    change_key = _change_key(item.item_id, item.version)
    values: dict[str, Callable[[], Any]] = {
        "id": lambda: item.item_id,
        "createdDateTime": lambda: _iso(item.created_at),
        "lastModifiedDateTime": lambda: _iso(item.modified_at),
        "changeKey": lambda: change_key,
        "categories": lambda: list(item.categories),
        "receivedDateTime": lambda: _iso(item.received_at),
        "sentDateTime": lambda: _iso(summary.sent_at or item.received_at),
        "hasAttachments": lambda: summary.has_attachments,
        "internetMessageId": lambda: summary.internet_message_id,
        "subject": lambda: summary.subject,
        "bodyPreview": lambda: _preview(item),
        "importance": lambda: item.importance,
        "parentFolderId": lambda: item.folder_id,
        "conversationId": lambda: make_id(
            "conversation", item.mailbox, summary.subject.lower()
        ),
        "isRead": lambda: item.is_read,
        "isDraft": lambda: item.is_draft,
        "body": lambda: {"contentType": summary.body_type, "content": summary.body},
        "sender": lambda: _recipient(summary.sender) if summary.sender else None,
        "from": lambda: _recipient(summary.sender) if summary.sender else None,
        "toRecipients": lambda: [_recipient(pair) for pair in summary.to],
        "ccRecipients": lambda: [_recipient(pair) for pair in summary.cc],
        "bccRecipients": lambda: [],
        "replyTo": lambda: [],
        "flag": lambda: {"flagStatus": item.flag_status},
        "internetMessageHeaders": lambda: [
            {"name": name, "value": value} for name, value in summary.headers
        ],
    }
    return values[prop]()


def message_filter_value(item: Item, world: World, prop: str) -> Any:
    """Return a message property as $filter and $orderby compare it."""
    summary = item.summary
    if prop == "from/emailAddress/address" or prop == "sender/emailAddress/address":
        return summary.sender[1] if summary.sender else None
    if prop in ("receivedDateTime", "createdDateTime", "lastModifiedDateTime"):
        moment = {
            "receivedDateTime": item.received_at,
            "createdDateTime": item.created_at,
            "lastModifiedDateTime": item.modified_at,
        }[prop]
        return moment
    if prop == "sentDateTime":
        return summary.sent_at or item.received_at
    return message_value(item, world, prop)


def message_json(item: Item, world: World, options: QueryOptions) -> dict[str, Any]:
    """Render a message with the $select and $expand of the request."""
    change_key = _change_key(item.item_id, item.version)
    data: dict[str, Any] = {"@odata.etag": f'W/"{change_key}"', "id": item.item_id}
    selected = options.select or [
        name
        for name, kind in MESSAGE_TYPE.properties.items()
        if name not in _SELECT_ONLY and "/" not in name
    ]
    for prop in selected:
        if prop == "singleValueExtendedProperties" or "/" in prop:
            continue
        data[prop] = message_value(item, world, prop)
    if options.expand_all_extended or options.expand_extended is not None:
        data["singleValueExtendedProperties"] = _expanded_properties(item, options)
    return data


def _expanded_properties(item: Item, options: QueryOptions) -> list[dict[str, str]]:
    rows = []
    for prop_id, value in item.extended_properties.items():
        row = {"id": prop_id, "value": value}
        node = options.expand_extended
        if node is not None and not node.matches(partial(_extended_field, row)):
            continue
        rows.append(row)
    return rows


def _extended_field(row: dict[str, str], name: str) -> str:
    if name == "id":
        return normalize_extended_id(row["id"]).lower()
    return row[name]


_RULE_ACTIONS = {
    "redirect": "redirectTo",
    "forward": "forwardTo",
    "forward_as_attachment": "forwardAsAttachmentTo",
}


_TRACE_BOUND = re.compile(
    r"receivedDateTime\s+(ge|le)\s+(\d{4}-\d\d-\d\dT[\d:.]+Z)", re.IGNORECASE
)


def _check_trace_window(text: str) -> None:
    """Reject a message trace filter without both receivedDateTime bounds, or wider."""
    bounds = {
        operator.lower(): datetime.fromisoformat(value.replace("Z", "+00:00"))
        for operator, value in _TRACE_BOUND.findall(text)
    }
    if set(bounds) != {"ge", "le"}:
        raise bad_request(
            "A message trace query needs receivedDateTime ge and le in $filter."
        )
    if bounds["le"] - bounds["ge"] > MESSAGE_TRACE_WINDOW:
        raise bad_request("The receivedDateTime range must not exceed 10 days.")


def _get(row: dict[str, Any], prop: str) -> Any:
    return row.get(prop)


def message_rule_json(index: int, rule: ForwardingRuleSpec) -> dict[str, Any]:
    """Render a forwarding rule of the scenario as a Graph messageRule."""
    recipients = [
        {"emailAddress": {"name": address, "address": address}}
        for address in rule.forward_to
    ]
    actions: dict[str, Any] = {_RULE_ACTIONS[rule.kind]: recipients}
    if not rule.keep_copy:
        actions["delete"] = True
    return {
        "id": make_id("rule", rule.mailbox.lower(), str(index)),
        "displayName": f"{rule.kind} to {', '.join(rule.forward_to)}",
        "sequence": index + 1,
        "isEnabled": rule.enabled,
        "hasError": False,
        "isReadOnly": False,
        "conditions": {},
        "actions": actions,
    }


def folder_value(folder: Folder, world: World, prop: str) -> Any:
    """Return one mailFolder property as Graph's JSON shows it."""
    items = list(world.items_of(folder.mailbox, folder.folder_id))
    children = world.children(folder.mailbox, folder.folder_id)
    parent = folder.parent_id or make_id("folder", folder.mailbox, "root")
    values: dict[str, Callable[[], Any]] = {
        "id": lambda: folder.folder_id,
        "displayName": lambda: folder.display_name,
        "parentFolderId": lambda: parent,
        "childFolderCount": lambda: len(children),
        "unreadItemCount": lambda: sum(1 for item in items if not item.is_read),
        "totalItemCount": lambda: len(items),
        "sizeInBytes": lambda: sum(len(item.mime) for item in items),
        "isHidden": lambda: folder.hidden,
    }
    return values[prop]()


def folder_json(folder: Folder, world: World, options: QueryOptions) -> dict[str, Any]:
    """Render a mailFolder with the $select of the request."""
    data: dict[str, Any] = {"id": folder.folder_id}
    for prop in options.select or list(FOLDER_TYPE.properties):
        data[prop] = folder_value(folder, world, prop)
    return data


# --- authentication -------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class TokenIssuer:
    """Issues and checks app-only access tokens (JWTs signed with HS256).

    The signing key comes from the tenant's client secret, so tokens stay valid
    across simulator restarts, as Entra ID tokens do, until they expire.
    """

    def __init__(self, world: World, wall_clock: Callable[[], float]) -> None:
        self.world = world
        self.wall_clock = wall_clock

    def graph_tenants(self) -> list[TenantSpec]:
        return [t for t in self.world.tenants.values() if t.platform == "graph"]

    def find_tenant(self, ref: str) -> TenantSpec | None:
        for tenant in self.graph_tenants():
            if ref.lower() in (tenant.domain.lower(), (tenant.tenant_id or "").lower()):
                return tenant
        return None

    def issue(
        self, tenant_ref: str, form: dict[str, str], lifetime: int
    ) -> dict[str, Any]:
        """Issue a token for a client-credentials request, or raise TokenError."""
        tenant = self._check_request(tenant_ref, form)
        scope = form["scope"]
        now = int(self.wall_clock())
        claims = {
            "aud": scope.removesuffix("/.default"),
            "iss": f"https://sts.windows.net/{tenant.tenant_id}/",
            "iat": now,
            "nbf": now,
            "exp": now + lifetime,
            "appid": tenant.client_id,
            "tid": tenant.tenant_id,
            "roles": list(tenant.permissions),
        }
        return {
            "token_type": "Bearer",
            "expires_in": lifetime,
            "ext_expires_in": lifetime,
            "access_token": self._sign(tenant, claims),
        }

    def _check_request(self, tenant_ref: str, form: dict[str, str]) -> TenantSpec:
        """Check tenant, grant type, client id, secret and scope, as Entra ID does."""
        tenant = self.find_tenant(tenant_ref)
        if tenant is None:
            raise TokenError(
                400,
                "invalid_request",
                90002,
                f"AADSTS90002: Tenant '{tenant_ref}' not found. Check to make sure you "
                "have the correct tenant ID and are signing into the correct cloud.",
            )
        if form.get("grant_type") != "client_credentials":
            raise TokenError(
                400,
                "unsupported_grant_type",
                70003,
                "AADSTS70003: The app requested an unsupported grant type "
                f"'{form.get('grant_type', '')}'.",
            )
        client_id = form.get("client_id", "")
        if not client_id or client_id != tenant.client_id:
            raise TokenError(
                400,
                "unauthorized_client",
                700016,
                f"AADSTS700016: Application with identifier '{client_id}' was not "
                f"found in the directory '{tenant_ref}'.",
            )
        secret = form.get("client_secret", "")
        if not tenant.client_secret or not hmac.compare_digest(
            secret, tenant.client_secret
        ):
            raise TokenError(
                401,
                "invalid_client",
                7000215,
                "AADSTS7000215: Invalid client secret provided. Ensure the secret "
                "being sent in the request is the client secret value, not the client "
                f"secret ID, for a secret added to app '{client_id}'.",
            )
        scope = form.get("scope", "")
        if not scope.endswith("/.default") or " " in scope.strip():
            raise TokenError(
                400,
                "invalid_scope",
                1002012,
                f"AADSTS1002012: The provided value for scope {scope} is not valid. "
                "Client credential flows must have a scope value with /.default "
                "suffixed to the resource identifier (application ID URI).",
            )
        return tenant

    def _sign(self, tenant: TenantSpec, claims: dict[str, Any]) -> str:
        header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        payload = _b64url(json.dumps(claims, separators=(",", ":")).encode())
        signature = hmac.new(
            self._key(tenant), f"{header}.{payload}".encode(), hashlib.sha256
        ).digest()
        return f"{header}.{payload}.{_b64url(signature)}"

    @staticmethod
    def _key(tenant: TenantSpec) -> bytes:
        secret = tenant.client_secret or ""
        return hashlib.sha256(
            f"graph-sim:{tenant.tenant_id}:{secret}".encode()
        ).digest()

    def validate(self, authorization: str | None) -> tuple[TenantSpec, dict[str, Any]]:
        """Check a bearer token; return its tenant and claims or raise a 401."""
        if not authorization or not authorization.lower().startswith("bearer "):
            raise _unauthorized("Access token is empty.")
        token = authorization[7:].strip()
        try:
            header, payload, signature = token.split(".")
            claims = json.loads(_b64url_decode(payload))
        except (ValueError, binascii.Error):
            raise _unauthorized("IDX14100: JWT is not well formed.") from None
        tenant = self.find_tenant(str(claims.get("tid", "")))
        if tenant is None:
            raise _unauthorized("Access token validation failure. Invalid issuer.")
        expected = hmac.new(
            self._key(tenant), f"{header}.{payload}".encode(), hashlib.sha256
        ).digest()
        try:
            valid = hmac.compare_digest(_b64url_decode(signature), expected)
        except (ValueError, binascii.Error):
            valid = False
        if not valid:
            raise _unauthorized("Access token validation failure. Invalid signature.")
        if claims.get("aud") not in GRAPH_AUDIENCES:
            raise _unauthorized("Access token validation failure. Invalid audience.")
        if float(claims.get("exp", 0)) <= self.wall_clock():
            raise _unauthorized("Lifetime validation failed, the token is expired.")
        return tenant, claims


def _unauthorized(message: str) -> GraphError:
    return GraphError(
        401,
        "InvalidAuthenticationToken",
        message,
        headers={"WWW-Authenticate": 'Bearer realm="", error="invalid_token"'},
    )


# --- throttling, faults, request log --------------------------------------------------


class LimitError(GraphError):
    """A 429 from one of the simulated limits; `limit` names which one."""

    def __init__(self, limit: str, message: str, retry_after: int) -> None:
        super().__init__(
            429,
            "ApplicationThrottled",
            message,
            headers={"Retry-After": str(retry_after)},
        )
        self.limit = limit


class MailboxThrottle:
    """Graph's limits: per mailbox, concurrent requests and requests per window, and
    requests per window for the app as a whole."""

    def __init__(self, settings: GraphSimSettings, clock: Callable[[], float]) -> None:
        self.settings = settings
        self.clock = clock
        self.in_flight: dict[str, int] = {}
        self.peak_in_flight: dict[str, int] = {}
        self.windows: dict[str, deque[float]] = {}
        self.app_window: deque[float] = deque()

    def acquire(self, mailbox: str) -> None:
        """Take a slot for one request, or raise a 429 `LimitError`."""
        if self.in_flight.get(mailbox, 0) >= self.settings.concurrency_limit:
            raise LimitError(
                "concurrency",
                "Application is over its MailboxConcurrency limit.",
                self.settings.concurrency_retry_after,
            )
        now = self.clock()
        window = self.windows.setdefault(mailbox, deque())
        _expire(window, now - self.settings.window_seconds)
        if len(window) >= self.settings.window_requests:
            wait = window[0] + self.settings.window_seconds - now
            raise LimitError(
                "mailbox_window",
                "Application is over its MailboxRequests limit of "
                f"{self.settings.window_requests} requests per "
                f"{self.settings.window_seconds:g} seconds.",
                max(1, math.ceil(wait)),
            )
        _expire(self.app_window, now - self.settings.app_window_seconds)
        if len(self.app_window) >= self.settings.app_window_requests:
            wait = self.app_window[0] + self.settings.app_window_seconds - now
            raise LimitError(
                "app_window",
                "Application is over its limit of "
                f"{self.settings.app_window_requests} requests per "
                f"{self.settings.app_window_seconds:g} seconds.",
                max(1, math.ceil(wait)),
            )
        window.append(now)
        self.app_window.append(now)
        self.in_flight[mailbox] = self.in_flight.get(mailbox, 0) + 1
        self.peak_in_flight[mailbox] = max(
            self.peak_in_flight.get(mailbox, 0), self.in_flight[mailbox]
        )

    def release(self, mailbox: str) -> None:
        self.in_flight[mailbox] -= 1

    def reset(self) -> None:
        self.in_flight.clear()
        self.peak_in_flight.clear()
        self.windows.clear()
        self.app_window.clear()


def _expire(window: deque[float], before: float) -> None:
    while window and window[0] <= before:
        window.popleft()


def loop_time() -> float:
    """Return the running event loop's clock, or monotonic time outside a loop."""
    try:
        return asyncio.get_running_loop().time()
    except RuntimeError:
        return time.monotonic()


_FAULT_DEFAULTS = {
    429: ("ApplicationThrottled", "Application is over its MailboxConcurrency limit."),
    500: ("InternalServerError", "An internal server error occurred."),
    502: ("BadGateway", "The gateway received an invalid response."),
    503: ("ServiceUnavailable", "The service is temporarily unavailable."),
    504: ("GatewayTimeout", "The gateway timed out."),
}


@dataclass
class FaultRule:
    """A fault for the next `count` requests whose decoded path matches `path`.

    `path` is a regular expression searched in the percent-decoded path. With
    `message_id`, only requests whose path names a message with that Message-ID
    (brackets optional) match.

    The response is `status` with an OData error (or an empty body). With `drop`,
    the connection is closed and no response is sent at all. A rule with a
    `probability` below 1 hits each matching request with that chance, and a rule
    with `until` stops at that time on the simulator's clock, so a storm of faults
    can cover a share of the requests for a while. With `hold`, the request waits
    until the rules are cleared and then gets the fault, so a test can stop a
    client at that request and kill it there. With `after`, the request is carried
    out first and only its response is held or replaced. `held` counts the
    requests waiting on the rule, and `reached` is set once the first one waits, so
    an in-process test can await it.
    """

    path: str
    count: int = 1
    method: str | None = None
    message_id: str | None = None
    status: int = 503
    retry_after: str | None = None
    code: str | None = None
    message: str | None = None
    empty_body: bool = False
    drop: bool = False
    probability: float = 1.0
    until: float | None = None
    hold: bool = False
    after: bool = False
    held: int = 0
    rule_id: int = 0
    released: asyncio.Event = field(
        default_factory=asyncio.Event, repr=False, compare=False
    )
    reached: asyncio.Event = field(
        default_factory=asyncio.Event, repr=False, compare=False
    )

    def matches(
        self, method: str, path: str, now: float, message_id: str | None = None
    ) -> bool:
        if self.count <= 0:
            return False
        if self.until is not None and now >= self.until:
            return False
        if self.method is not None and self.method.upper() != method:
            return False
        if self.message_id is not None and (
            message_id is None
            or self.message_id.strip().strip("<>") != message_id.strip().strip("<>")
        ):
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

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, seed: int = 0
    ) -> None:
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
        if "retry_after" in data and data["retry_after"] is not None:
            data = {**data, "retry_after": str(data["retry_after"])}
        rule = FaultRule(**data, rule_id=self._next_id)
        self._next_id += 1
        self.rules.append(rule)
        return rule

    def take(
        self, method: str, path: str, message_id: str | None = None
    ) -> FaultRule | None:
        now = self._clock()
        for rule in self.rules:
            if not rule.matches(method, path, now, message_id):
                continue
            if rule.probability < 1 and self._random.random() >= rule.probability:
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
    """One request as the simulator saw it, for tests and the demo."""

    seq: int
    time: str
    method: str
    raw_target: str
    path: str
    query: dict[str, str]
    mailbox: str | None = None
    status: int | None = None
    code: str | None = None
    retry_attempt: str | None = None
    content_type: str | None = None
    duration_ms: float | None = None
    # Seconds on the simulator's clock when the request arrived.
    at: float | None = None
    # The seq of the $batch request that carried this one.
    batch: int | None = None
    # The id of the fault rule that produced the response, or the limit behind a 429.
    fault: int | None = None
    limit: str | None = None


# --- the simulator --------------------------------------------------------------------


@dataclass
class GraphRequest:
    """One Graph request after decoding: path segments, query options, caller."""

    request: web.Request
    segments: list[str]
    params: dict[str, str]
    tenant: TenantSpec | None = None
    claims: dict[str, Any] = field(default_factory=dict)
    mailbox: str | None = None

    @property
    def method(self) -> str:
        return self.request.method


Handler = Callable[[GraphRequest, list[str]], Awaitable[web.StreamResponse]]


class _InnerRequest:
    """One request of a $batch, with the attributes of `web.Request` handlers use."""

    def __init__(
        self,
        method: str,
        target: str,
        headers: CIMultiDict[str],
        body: bytes,
        outer: web.Request,
    ) -> None:
        self.method = method
        self.raw_path = target
        self.headers = CIMultiDictProxy(headers)
        self._body = body
        self.scheme = outer.scheme
        self.host = outer.host
        self.transport = None
        self.content_length = len(body)
        self.content_type = (
            headers.get("Content-Type", "application/octet-stream")
            .split(";")[0]
            .strip()
        )

    async def read(self) -> bytes:
        return self._body

    async def json(self) -> Any:
        return json.loads(self._body)


class GraphSimulator:
    """The Graph simulator: an aiohttp application over a `World`.

    `clock` is monotonic time for throttling windows (by default the running
    event loop's clock) and `wall_clock` is epoch seconds for token lifetimes; both
    can be replaced to test long waits quickly.
    """

    ROUTES: ClassVar[list[tuple[str, tuple[str, ...], str]]] = [
        ("GET", ("users", "*", "messages"), "_list_messages"),
        ("POST", ("users", "*", "messages"), "_create_message"),
        ("GET", ("users", "*", "messages", "*"), "_get_message"),
        ("PATCH", ("users", "*", "messages", "*"), "_update_message"),
        ("DELETE", ("users", "*", "messages", "*"), "_delete_message"),
        ("GET", ("users", "*", "messages", "*", "$value"), "_get_mime"),
        ("POST", ("users", "*", "messages", "*", "move"), "_move_message"),
        ("POST", ("users", "*", "messages", "*", "copy"), "_copy_message"),
        ("POST", ("users", "*", "messages", "*", "permanentdelete"), "_purge_message"),
        ("GET", ("users", "*", "mailfolders"), "_list_root_folders"),
        ("POST", ("users", "*", "mailfolders"), "_create_root_folder"),
        ("GET", ("users", "*", "mailfolders", "*"), "_get_folder"),
        (
            "GET",
            ("users", "*", "mailfolders", "*", "childfolders"),
            "_list_child_folders",
        ),
        (
            "POST",
            ("users", "*", "mailfolders", "*", "childfolders"),
            "_create_child_folder",
        ),
        (
            "GET",
            ("users", "*", "mailfolders", "*", "messages"),
            "_list_folder_messages",
        ),
        (
            "POST",
            ("users", "*", "mailfolders", "*", "messages"),
            "_create_folder_message",
        ),
        (
            "GET",
            ("users", "*", "mailfolders", "*", "messages", "*"),
            "_get_folder_message",
        ),
        (
            "GET",
            ("users", "*", "mailfolders", "*", "messagerules"),
            "_list_message_rules",
        ),
        (
            "GET",
            ("admin", "exchange", "tracing", "messagetraces"),
            "_list_message_traces",
        ),
    ]

    def __init__(
        self,
        world: World,
        settings: GraphSimSettings | None = None,
        *,
        scenario_path: Path | None = None,
        clock: Callable[[], float] = loop_time,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.world = world
        self.settings = settings or GraphSimSettings()
        self.scenario_path = scenario_path
        self.clock = clock
        self.wall_clock = wall_clock
        self.tokens = TokenIssuer(world, wall_clock)
        self.throttle = MailboxThrottle(self.settings, clock)
        self.faults = FaultInjector(clock)
        self.log: deque[LoggedRequest] = deque(maxlen=self.settings.request_log_size)
        self._seq = 0
        self._runner: web.AppRunner | None = None
        self.base_url: str | None = None

    # --- lifecycle --------------------------------------------------------------------

    def make_app(self) -> web.Application:
        """Build the aiohttp application; every path goes through one dispatcher."""
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on host:port (0 picks a free port) and return the base URL."""
        self._runner = web.AppRunner(self.make_app(), access_log=None)
        await self._runner.setup()
        # A burst opens many connections at once; the default backlog of 128 would
        # drop connection attempts beyond it until TCP retransmits them.
        site = web.TCPSite(self._runner, host, port, backlog=2048)
        await site.start()
        self.base_url = f"http://{host}:{site.port}"
        logger.info("Graph simulator started url=%s", self.base_url)
        return self.base_url

    async def stop(self) -> None:
        """Stop serving. The state file already contains every change."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            logger.info("Graph simulator stopped url=%s", self.base_url)

    def reset(self) -> None:
        """Start again from the scenario file: state, faults, limits and log."""
        if self.scenario_path is not None:
            self.world.scenario = load_scenario(self.scenario_path)
            self.world.tenants = {
                t.domain.lower(): t for t in self.world.scenario.tenants
            }
        self.world.populate()
        self.world.save()
        self.faults.clear()
        self.throttle.reset()
        self.log.clear()

    # --- dispatch ---------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path, _, raw_query = request.raw_path.partition("?")
        segments = [unquote(part) for part in path.split("/")[1:]]
        if segments and segments[0] == "_sim":
            return await self._admin(request, segments[1:])

        entry = self._log_request(request, "/" + "/".join(segments))
        try:
            return await self._answer(
                request, entry, raw_query, partial(self._serve, request, segments)
            )
        except _DropConnection:
            # Status 0 in the log marks a dropped connection. aiohttp treats a
            # cancelled handler as a lost client and sends nothing more.
            entry.status = 0
            if request.transport is not None:
                request.transport.close()
            raise asyncio.CancelledError() from None

    async def _answer(
        self,
        request: web.Request,
        entry: LoggedRequest,
        raw_query: str,
        serve: Callable[[LoggedRequest], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        """Run `serve` and turn every error it raises into a Graph error response."""
        started = self.clock()
        try:
            entry.query = parse_query_string(raw_query)
            response = await serve(entry)
        except GraphError as exc:
            response = self._error_response(request, exc)
            entry.code = exc.code
            entry.limit = exc.limit if isinstance(exc, LimitError) else None
        except WorldError as exc:
            response = self._error_response(request, item_not_found())
            entry.code = "ErrorItemNotFound"
            logger.info(
                "Graph simulator found nothing path=%s error=%s", entry.path, exc
            )
        except _DropConnection:
            raise
        except Exception as exc:
            logger.exception(
                "Graph simulator failed a request method=%s path=%s",
                request.method,
                entry.path,
            )
            error = GraphError(500, "InternalServerError", f"Simulator error: {exc!r}")
            response = self._error_response(request, error)
            entry.code = error.code
        entry.status = response.status
        entry.duration_ms = round((self.clock() - started) * 1000, 3)
        return response

    def _log_request(
        self, request: web.Request, path: str, *, batch: int | None = None
    ) -> LoggedRequest:
        self._seq += 1
        entry = LoggedRequest(
            seq=self._seq,
            time=_iso(datetime.fromtimestamp(self.wall_clock(), UTC)) or "",
            method=request.method,
            raw_target=request.raw_path,
            path=path,
            query={},
            retry_attempt=request.headers.get("Retry-Attempt"),
            content_type=request.headers.get("Content-Type"),
            at=self.clock(),
            batch=batch,
        )
        self.log.append(entry)
        return entry

    async def _serve(
        self, request: web.Request, segments: list[str], entry: LoggedRequest
    ) -> web.StreamResponse:
        if len(segments) > 2 and [s.lower() for s in segments[:2]] == ["v1.0", "users"]:
            entry.mailbox = segments[2].lower()
        fault = self.faults.take(
            request.method, entry.path, self._named_message_id(segments)
        )
        if fault is not None:
            entry.fault = fault.rule_id
        if fault is not None and not fault.after:
            if fault.hold:
                await fault.wait_for_release()
            return self._fault_response(request, fault)
        response = await self._serve_request(request, segments, entry)
        if fault is not None:
            if fault.hold:
                await fault.wait_for_release()
                return response
            return self._fault_response(request, fault)
        return response

    def _named_message_id(self, segments: list[str]) -> str | None:
        """Return the Message-ID of the message a `users/{u}/messages/{id}` names."""
        if len(segments) < 5:
            return None
        if segments[1].lower() != "users" or segments[3].lower() != "messages":
            return None
        try:
            item = self.world.item(segments[2], segments[4])
        except (WorldError, KeyError):
            return None
        return item.summary.internet_message_id

    async def _serve_request(
        self, request: web.Request, segments: list[str], entry: LoggedRequest
    ) -> web.StreamResponse:

        if len(segments) == 4 and [s.lower() for s in segments[1:]] == [
            "oauth2",
            "v2.0",
            "token",
        ]:
            return await self._token(request, segments[0])
        if not segments or segments[0].lower() != "v1.0":
            raise bad_request(f"Invalid version: {segments[0] if segments else ''}")

        if (request.content_length or 0) > self.settings.max_request_bytes:
            raise GraphError(
                413,
                "RequestEntityTooLarge",
                f"The request body of {request.content_length} bytes is larger than "
                f"the limit of {self.settings.max_request_bytes} bytes.",
            )
        call = GraphRequest(request, segments[1:], entry.query)
        call.tenant, call.claims = self.tokens.validate(
            request.headers.get("Authorization")
        )
        if [segment.lower() for segment in call.segments] == ["$batch"]:
            if request.method != "POST":
                raise GraphError(
                    405, "Request_BadRequest", "Use POST for $batch requests."
                )
            return await self._batch(call, entry)
        return await self._run(call, entry)

    async def _run(
        self, call: GraphRequest, entry: LoggedRequest
    ) -> web.StreamResponse:
        """Route one authenticated request and run it within the mailbox's limits."""
        handler, params = self._route(call)
        if call.segments[0].lower() != "users" or len(call.segments) < 2:
            return await handler(call, params)

        call.mailbox = self._check_mailbox(call, params[0])
        entry.mailbox = call.mailbox
        self._check_permission(call)
        self.throttle.acquire(call.mailbox)
        try:
            if self.settings.latency_ms > 0:
                await asyncio.sleep(self.settings.latency_ms / 1000)
            return await handler(call, params)
        finally:
            self.throttle.release(call.mailbox)

    # --- $batch -----------------------------------------------------------------------

    async def _batch(self, call: GraphRequest, entry: LoggedRequest) -> web.Response:
        """Run a JSON batch: every request in parallel, or one chain in order.

        In a chain, a request whose predecessor failed is not run and gets 424.
        Each inner request is logged, limited and faulted like a request of its own.
        """
        try:
            plan = parse_batch(
                await self._json_body(call), self.settings.max_batch_requests
            )
        except BatchError as exc:
            raise bad_request(str(exc)) from None

        if not plan.sequential:
            responses = await asyncio.gather(
                *(self._run_inner(call, item, entry.seq) for item in plan.items)
            )
            return self._json(call.request, {"responses": list(responses)})

        results: list[dict[str, Any]] = []
        failed: str | None = None
        for item in plan.items:
            if failed is not None:
                results.append(_failed_dependency(item, failed))
                continue
            result = await self._run_inner(call, item, entry.seq)
            if int(result["status"]) >= 400:
                failed = item.request_id
            results.append(result)
        return self._json(call.request, {"responses": results})

    async def _run_inner(
        self, outer: GraphRequest, item: BatchItem, batch_seq: int
    ) -> dict[str, Any]:
        """Run one request of a batch and describe its response as Graph does."""
        url = item.url if item.url.startswith("/") else "/" + item.url
        target = "/v1.0" + url
        path, _, raw_query = target.partition("?")
        headers = CIMultiDict(outer.request.headers)
        for name in ("Content-Length", "Content-Type"):
            headers.popall(name, None)
        headers.update(item.headers)
        request = cast(
            web.Request,
            _InnerRequest(
                item.method, target, headers, item.body or b"", outer.request
            ),
        )
        segments = [unquote(part) for part in path.split("/")[1:]]
        entry = self._log_request(request, "/" + "/".join(segments), batch=batch_seq)

        async def serve(entry: LoggedRequest) -> web.StreamResponse:
            if "://" in item.url:
                raise bad_request(
                    f"Resource not found for the segment '{item.url.split('/')[0]}'; "
                    "a batch request url is relative to the API version."
                )
            if len(segments) > 2 and segments[1].lower() == "users":
                entry.mailbox = segments[2].lower()
            fault = self.faults.take(
                item.method, entry.path, self._named_message_id(segments)
            )
            if fault is not None:
                entry.fault = fault.rule_id
            if fault is not None and not fault.after:
                return await self._inner_fault(request, fault)
            call = GraphRequest(
                request, segments[1:], entry.query, outer.tenant, outer.claims
            )
            response = await self._run(call, entry)
            if fault is not None and fault.hold:
                await fault.wait_for_release()
                return response
            if fault is not None:
                return await self._inner_fault(request, fault)
            return response

        response = await self._answer(request, entry, raw_query, serve)
        return _batch_response(item.request_id, response)

    async def _inner_fault(
        self, request: web.Request, fault: FaultRule
    ) -> web.StreamResponse:
        """Answer a batch request with its fault, after its hold if it has one."""
        if fault.hold and not fault.after:
            await fault.wait_for_release()
        if fault.drop:
            raise GraphError(504, "GatewayTimeout", "The gateway timed out.")
        return self._fault_response(request, fault)

    def _route(self, call: GraphRequest) -> tuple[Handler, list[str]]:
        lowered = [segment.lower() for segment in call.segments]
        path_matched = False
        for method, pattern, name in self.ROUTES:
            if len(pattern) != len(lowered):
                continue
            params = []
            for want, got, original in zip(
                pattern, lowered, call.segments, strict=True
            ):
                if want == "*":
                    params.append(original)
                elif want != got:
                    break
            else:
                path_matched = True
                if method == call.method:
                    handler: Handler = getattr(self, name)
                    return handler, params
        if path_matched:
            raise GraphError(
                405,
                "Request_BadRequest",
                "Specified HTTP method is not allowed for the request target.",
            )
        unknown = call.segments[-1] if call.segments else ""
        raise bad_request(f"Resource not found for the segment '{unknown}'.")

    def _check_mailbox(self, call: GraphRequest, user: str) -> str:
        if user.lower() == "me":
            raise bad_request(
                "/me request is only valid with delegated authentication flow."
            )
        tenant = self.world.tenant_for(user)
        box = self.world.mailboxes.get(user.lower())
        if (
            box is None
            or tenant is None
            or call.tenant is None
            or tenant.tenant_id != call.tenant.tenant_id
        ):
            raise GraphError(
                404, "ErrorInvalidUser", f"The requested user '{user}' is invalid."
            )
        if self.world.platform_of(user) != "graph":
            raise GraphError(
                404,
                "MailboxNotEnabledForRESTAPI",
                "The mailbox is either inactive, soft-deleted, or is hosted "
                "on-premise.",
            )
        return box.address

    def _check_permission(self, call: GraphRequest) -> None:
        roles = set(call.claims.get("roles", []))
        needed = READ_PERMISSIONS if call.method == "GET" else WRITE_PERMISSIONS
        if not roles & needed:
            raise GraphError(
                403,
                "ErrorAccessDenied",
                "Access is denied. Check credentials and try again.",
            )

    # --- responses --------------------------------------------------------------------

    def _json(self, request: web.Request, data: Any, status: int = 200) -> web.Response:
        return web.Response(
            status=status,
            body=json.dumps(data).encode("utf-8"),
            headers={
                "Content-Type": JSON_CONTENT_TYPE,
                "request-id": str(uuid.uuid4()),
                "client-request-id": request.headers.get("client-request-id", ""),
            },
        )

    def _error_response(self, request: web.Request, exc: GraphError) -> web.Response:
        body = {
            "error": {
                "code": exc.code,
                "message": exc.message,
                "innerError": {
                    "date": _iso(datetime.fromtimestamp(self.wall_clock(), UTC)),
                    "request-id": str(uuid.uuid4()),
                    "client-request-id": request.headers.get("client-request-id", ""),
                },
            }
        }
        response = self._json(request, body, exc.status)
        response.headers.update(exc.headers)
        return response

    def _fault_response(self, request: web.Request, fault: FaultRule) -> web.Response:
        if fault.drop:
            raise _DropConnection()
        code, message = _FAULT_DEFAULTS.get(
            fault.status, ("UnknownError", "Injected fault.")
        )
        headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
        if fault.empty_body:
            return web.Response(status=fault.status, headers=headers)
        error = GraphError(
            fault.status, fault.code or code, fault.message or message, headers=headers
        )
        return self._error_response(request, error)

    async def _token(self, request: web.Request, tenant_ref: str) -> web.Response:
        if request.method != "POST":
            raise GraphError(
                405, "Request_BadRequest", "Use POST for the token endpoint."
            )
        form = dict(
            parse_qsl((await request.read()).decode("utf-8"), keep_blank_values=True)
        )
        try:
            token = self.tokens.issue(tenant_ref, form, self.settings.token_lifetime)
        except TokenError as exc:
            body = {
                "error": exc.error,
                "error_description": exc.description,
                "error_codes": [exc.code],
                "timestamp": datetime.fromtimestamp(self.wall_clock(), UTC).isoformat(),
                "trace_id": str(uuid.uuid4()),
                "correlation_id": str(uuid.uuid4()),
            }
            return web.json_response(body, status=exc.status)
        return web.json_response(token)

    # --- messages ---------------------------------------------------------------------

    def _context(self, call: GraphRequest, suffix: str) -> str:
        user = quote(call.mailbox or "")
        return f"{self._base(call)}/v1.0/$metadata#users('{user}')/{suffix}"

    @staticmethod
    def _base(call: GraphRequest) -> str:
        return f"{call.request.scheme}://{call.request.host}"

    async def _list_messages(
        self, call: GraphRequest, params: list[str]
    ) -> web.Response:
        options = build_query_options(call.params, MESSAGE_TYPE)
        assert call.mailbox is not None
        box = self.world.mailbox(call.mailbox)
        searchable = {
            folder_id
            for folder_id, folder in box.folders.items()
            if folder.well_known != RECOVERABLE_FOLDER
        }
        items = [
            i for i in self.world.items_of(call.mailbox) if i.folder_id in searchable
        ]
        return self._message_page(call, items, options, "messages")

    async def _list_folder_messages(
        self, call: GraphRequest, params: list[str]
    ) -> web.Response:
        options = build_query_options(call.params, MESSAGE_TYPE)
        folder = self._folder(call, params[1])
        items = list(self.world.items_of(folder.mailbox, folder.folder_id))
        return self._message_page(call, items, options, "messages")

    def _message_page(
        self, call: GraphRequest, items: list[Item], options: QueryOptions, suffix: str
    ) -> web.Response:
        # Graph lists messages newest first unless $orderby sets another order.
        default_order = [("receivedDateTime", True)]
        items = filter_and_sort(items, self._message_field, options, default_order)
        rows = [message_json(item, self.world, options) for item in items]
        return self._page(call, rows, options, suffix)

    def _page(
        self,
        call: GraphRequest,
        rows: list[dict[str, Any]],
        options: QueryOptions,
        suffix: str,
    ) -> web.Response:
        top = options.top if options.top is not None else self.settings.page_size
        if top > self.settings.max_page_size:
            raise bad_request(
                f"The value of $top must not exceed {self.settings.max_page_size}."
            )
        page = rows[options.skip : options.skip + top]
        data: dict[str, Any] = {"@odata.context": self._context(call, suffix)}
        if options.count:
            data["@odata.count"] = len(rows)
        data["value"] = page
        if options.skip + top < len(rows):
            data["@odata.nextLink"] = self._next_link(call, options.skip + top, top)
        return self._json(call.request, data)

    def _next_link(self, call: GraphRequest, skip: int, top: int) -> str:
        params = dict(call.params)
        params["$top"] = str(top)
        params["$skip"] = str(skip)
        query = "&".join(
            f"{quote(name, safe='')}={quote(value, safe='')}"
            for name, value in params.items()
        )
        path = "/".join(quote(segment, safe="") for segment in call.segments)
        return f"{self._base(call)}/v1.0/{path}?{query}"

    async def _get_message(self, call: GraphRequest, params: list[str]) -> web.Response:
        options = build_query_options(call.params, MESSAGE_TYPE)
        item = self._item(call, params[1])
        return self._json(call.request, message_json(item, self.world, options))

    async def _get_folder_message(
        self, call: GraphRequest, params: list[str]
    ) -> web.Response:
        folder = self._folder(call, params[1])
        item = self._item(call, params[2])
        if item.folder_id != folder.folder_id:
            raise item_not_found()
        options = build_query_options(call.params, MESSAGE_TYPE)
        return self._json(call.request, message_json(item, self.world, options))

    async def _get_mime(self, call: GraphRequest, params: list[str]) -> web.Response:
        item = self._item(call, params[1])
        return web.Response(
            body=item.mime,
            headers={"Content-Type": "message/rfc822", "request-id": str(uuid.uuid4())},
        )

    async def _update_message(
        self, call: GraphRequest, params: list[str]
    ) -> web.Response:
        item = self._item(call, params[1])
        body = await self._json_body(call)
        changes = _MessagePatch.parse(body, item)
        changes.apply(item, self._now())
        self.world.save()
        options = build_query_options(call.params, MESSAGE_TYPE)
        return self._json(call.request, message_json(item, self.world, options))

    async def _move_message(
        self, call: GraphRequest, params: list[str]
    ) -> web.Response:
        item = self._item(call, params[1])
        destination = self._destination(call, await self._json_body(call))
        moved = self.world.move_item(
            item.mailbox, item.item_id, destination.folder_id, self._now()
        )
        self.world.save()
        options = build_query_options(call.params, MESSAGE_TYPE)
        return self._json(call.request, message_json(moved, self.world, options), 201)

    async def _copy_message(
        self, call: GraphRequest, params: list[str]
    ) -> web.Response:
        item = self._item(call, params[1])
        destination = self._destination(call, await self._json_body(call))
        copy = self.world.copy_item(
            item.mailbox, item.item_id, destination.folder_id, self._now()
        )
        self.world.save()
        options = build_query_options(call.params, MESSAGE_TYPE)
        return self._json(call.request, message_json(copy, self.world, options), 201)

    async def _delete_message(
        self, call: GraphRequest, params: list[str]
    ) -> web.Response:
        # A delete moves the item to Recoverable Items (Deletions), out of /messages.
        item = self._item(call, params[1])
        deletions = self.world.folder(item.mailbox, RECOVERABLE_FOLDER)
        if item.folder_id == deletions.folder_id:
            self.world.remove_item(item.mailbox, item.item_id)
        else:
            self.world.move_item(
                item.mailbox, item.item_id, deletions.folder_id, self._now()
            )
        self.world.save()
        return web.Response(status=204)

    async def _purge_message(
        self, call: GraphRequest, params: list[str]
    ) -> web.Response:
        item = self._item(call, params[1])
        self.world.remove_item(item.mailbox, item.item_id)
        self.world.save()
        return web.Response(status=204)

    async def _create_message(
        self, call: GraphRequest, params: list[str]
    ) -> web.Response:
        assert call.mailbox is not None
        drafts = self.world.folder(call.mailbox, "drafts")
        return await self._create_in_folder(call, drafts, mime_allowed=True)

    async def _create_folder_message(
        self, call: GraphRequest, params: list[str]
    ) -> web.Response:
        folder = self._folder(call, params[1])
        return await self._create_in_folder(call, folder, mime_allowed=False)

    async def _create_in_folder(
        self, call: GraphRequest, folder: Folder, *, mime_allowed: bool
    ) -> web.Response:
        content_type = call.request.content_type.lower()
        if content_type == "text/plain":
            if not mime_allowed:
                raise GraphError(
                    400,
                    "RequestBodyRead",
                    "MIME content is only accepted when creating a message under "
                    "/messages, not in a folder.",
                )
            mime = _decode_mime_upload(await call.request.read())
        else:
            mime = _mime_from_json(await self._json_body(call), call.mailbox or "")
        now = self._now()
        # Graph stores every created message as a draft, MIME uploads included.
        item = self.world.add_item(
            folder.mailbox,
            folder.folder_id,
            mime,
            received_at=now,
            is_draft=True,
            is_read=True,
        )
        self.world.save()
        options = build_query_options(call.params, MESSAGE_TYPE)
        return self._json(call.request, message_json(item, self.world, options), 201)

    # --- folders ----------------------------------------------------------------------

    async def _list_root_folders(
        self, call: GraphRequest, params: list[str]
    ) -> web.Response:
        assert call.mailbox is not None
        root = self.world.folder(call.mailbox, ROOT_FOLDER)
        return self._folder_page(call, root, "mailFolders")

    async def _list_child_folders(
        self, call: GraphRequest, params: list[str]
    ) -> web.Response:
        parent = self._folder(call, params[1])
        return self._folder_page(
            call, parent, f"mailFolders('{parent.folder_id}')/childFolders"
        )

    def _folder_page(
        self, call: GraphRequest, parent: Folder, suffix: str
    ) -> web.Response:
        options = build_query_options(call.params, FOLDER_TYPE)
        include_hidden = call.params.get("includeHiddenFolders", "").lower() == "true"
        folders = [
            folder
            for folder in self.world.children(parent.mailbox, parent.folder_id)
            if include_hidden or not folder.hidden
        ]
        folders = filter_and_sort(folders, self._folder_field, options, [])
        rows = [folder_json(folder, self.world, options) for folder in folders]
        return self._page(call, rows, options, suffix)

    async def _list_message_traces(
        self, call: GraphRequest, params: list[str]
    ) -> web.Response:
        # One row per delivery of a scenario message into a mailbox of the tenant.
        roles = set(call.claims.get("roles", []))
        if not roles & TRACE_PERMISSIONS:
            raise GraphError(
                403,
                "Forbidden",
                "Missing role permissions on the request. API requires one of "
                "'ExchangeMessageTrace.Read.All'.",
            )
        _check_trace_window(call.params.get("$filter", ""))
        options = build_query_options(call.params, MESSAGE_TRACE_TYPE)
        rows = [
            row
            for row in self._trace_rows(call)
            if options.filter is None or options.filter.matches(partial(_get, row))
        ]
        page = [
            {**row, "receivedDateTime": _iso(row["receivedDateTime"])} for row in rows
        ]
        return self._page(call, page, options, "admin/exchange/tracing/messageTraces")

    def _trace_rows(self, call: GraphRequest) -> list[dict[str, Any]]:
        tenant = call.tenant
        rows = []
        for item in self.world.items.values():
            if tenant is None or self.world.tenant_for(item.mailbox) != tenant:
                continue
            if self.world.platform_of(item.mailbox) != "graph":
                continue
            summary = item.summary
            well_known = self.world.mailbox(item.mailbox).folders[item.folder_id]
            if well_known.well_known in ("sentitems", "drafts") or item.is_draft:
                continue
            rows.append(
                {
                    "id": make_id("trace", item.item_id),
                    "messageId": summary.internet_message_id,
                    "senderAddress": summary.sender[1] if summary.sender else "",
                    "recipientAddress": item.mailbox,
                    "receivedDateTime": item.received_at,
                    "subject": summary.subject,
                    "status": "delivered",
                    "size": len(item.mime),
                    "fromIP": None,
                    "toIP": None,
                }
            )
        return rows

    async def _list_message_rules(
        self, call: GraphRequest, params: list[str]
    ) -> web.Response:
        # Graph keeps inbox rules on the Inbox only; other folders list none.
        folder = self._folder(call, params[1])
        rows = []
        if folder.well_known == "inbox":
            rows = [
                message_rule_json(index, rule)
                for index, rule in enumerate(self.world.scenario.forwarding_rules)
                if rule.mailbox.lower() == folder.mailbox
            ]
        return self._json(
            call.request,
            {"@odata.context": self._context(call, "messageRules"), "value": rows},
        )

    async def _get_folder(self, call: GraphRequest, params: list[str]) -> web.Response:
        folder = self._folder(call, params[1])
        options = build_query_options(call.params, FOLDER_TYPE)
        return self._json(call.request, folder_json(folder, self.world, options))

    async def _create_root_folder(
        self, call: GraphRequest, params: list[str]
    ) -> web.Response:
        assert call.mailbox is not None
        root = self.world.folder(call.mailbox, ROOT_FOLDER)
        return await self._create_folder(call, root)

    async def _create_child_folder(
        self, call: GraphRequest, params: list[str]
    ) -> web.Response:
        return await self._create_folder(call, self._folder(call, params[1]))

    async def _create_folder(self, call: GraphRequest, parent: Folder) -> web.Response:
        body = await self._json_body(call)
        name = _member(body, "displayName")
        hidden = _member(body, "isHidden", False)
        if not isinstance(name, str) or not name.strip():
            raise GraphError(
                400, "ErrorInvalidRequest", "The displayName of a folder is required."
            )
        if not isinstance(hidden, bool):
            raise GraphError(400, "RequestBodyRead", "isHidden must be true or false.")
        try:
            folder = self.world.create_folder(
                parent.mailbox, parent.folder_id, name, hidden=hidden
            )
        except FolderExistsError:
            raise GraphError(
                self.settings.folder_exists_status,
                "ErrorFolderExists",
                "A folder with the specified name already exists.",
            ) from None
        self.world.save()
        options = build_query_options({}, FOLDER_TYPE)
        return self._json(call.request, folder_json(folder, self.world, options), 201)

    # --- lookups and bodies -----------------------------------------------------------

    def _folder(self, call: GraphRequest, ref: str) -> Folder:
        assert call.mailbox is not None
        if ref.lower() in GRAPH_WELL_KNOWN_NAMES:
            try:
                return self.world.folder(call.mailbox, ref.lower())
            except FolderNotFoundError:
                raise item_not_found() from None
        if not _ID_SHAPE.match(ref):
            raise id_malformed()
        box = self.world.mailbox(call.mailbox)
        folder = box.folders.get(ref)
        if folder is None:
            raise item_not_found()
        return folder

    def _item(self, call: GraphRequest, item_id: str) -> Item:
        assert call.mailbox is not None
        if not _ID_SHAPE.match(item_id):
            raise id_malformed()
        try:
            return self.world.item(call.mailbox, item_id)
        except ItemNotFoundError:
            raise item_not_found() from None

    def _destination(self, call: GraphRequest, body: dict[str, Any]) -> Folder:
        destination = _member(body, "destinationId")
        if not isinstance(destination, str) or not destination:
            raise GraphError(
                400,
                "ErrorInvalidRequest",
                "The request body must contain destinationId.",
            )
        return self._folder(call, destination)

    async def _json_body(self, call: GraphRequest) -> dict[str, Any]:
        raw = await call.request.read()
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            raise GraphError(
                400, "RequestBodyRead", "The request body is not valid JSON."
            ) from None
        if not isinstance(body, dict):
            raise GraphError(
                400, "RequestBodyRead", "The request body must be a JSON object."
            )
        return body

    def _message_field(self, item: Item, prop: str) -> Any:
        return message_filter_value(item, self.world, prop)

    def _folder_field(self, folder: Folder, prop: str) -> Any:
        return folder_value(folder, self.world, prop)

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.wall_clock(), UTC)

    # --- admin API --------------------------------------------------------------------

    async def _admin(self, request: web.Request, segments: list[str]) -> web.Response:
        try:
            return await self._admin_route(request, segments)
        except (ValueError, KeyError, TypeError, re.error) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        except (UnknownMailboxError, FolderNotFoundError) as exc:
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

        routes: dict[tuple[str, str], Callable[[web.Request], Awaitable[Any]]] = {
            ("GET", "health"): self._admin_health,
            ("POST", "reset"): self._admin_reset,
            ("GET", "mailboxes"): self._admin_mailboxes,
            ("GET", "catalog"): self._admin_catalog,
            ("GET", "requests"): self._admin_requests,
            ("DELETE", "requests"): self._admin_clear_requests,
            ("GET", "faults"): self._admin_faults,
            ("POST", "faults"): self._admin_add_fault,
            ("DELETE", "faults"): self._admin_clear_faults,
            ("GET", "throttle"): self._admin_throttle,
            ("GET", "settings"): self._admin_settings,
            ("PATCH", "settings"): self._admin_update_settings,
        }
        path = "/".join(segments)
        handler = routes.get((request.method, path))
        if handler is None:
            message = f"No admin route {request.method} /_sim/{path}."
            return web.json_response({"error": message}, status=404)
        body = await handler(request)
        status = 201 if request.method == "POST" and segments == ["faults"] else 200
        return web.json_response(body, status=status)

    def _admin_mailbox(self, address: str, view: str) -> web.Response:
        if view == "messages":
            return web.json_response(self.world.snapshot(address))
        if view == "folders":
            return web.json_response(self.world.folders_snapshot(address))
        return web.json_response(
            {"error": f"No mailbox view {view!r}; use messages or folders."}, status=404
        )

    async def _admin_health(self, request: web.Request) -> Any:
        return {"status": "ok"}

    async def _admin_reset(self, request: web.Request) -> Any:
        self.reset()
        return {"status": "reset"}

    async def _admin_mailboxes(self, request: web.Request) -> Any:
        return sorted(self.world.mailboxes)

    async def _admin_catalog(self, request: web.Request) -> Any:
        return self._catalog(request.query.get("mime") == "1")

    async def _admin_requests(self, request: web.Request) -> Any:
        since = int(request.query.get("since", "0"))
        return [asdict(entry) for entry in self.log if entry.seq > since]

    async def _admin_clear_requests(self, request: web.Request) -> Any:
        self.log.clear()
        return {"status": "cleared"}

    async def _admin_faults(self, request: web.Request) -> Any:
        return [rule.view() for rule in self.faults.rules]

    async def _admin_add_fault(self, request: web.Request) -> Any:
        return self.faults.add(await request.json()).view()

    async def _admin_clear_faults(self, request: web.Request) -> Any:
        self.faults.clear()
        return {"status": "cleared"}

    async def _admin_throttle(self, request: web.Request) -> Any:
        return {
            "in_flight": self.throttle.in_flight,
            "peak_in_flight": self.throttle.peak_in_flight,
        }

    async def _admin_settings(self, request: web.Request) -> Any:
        return asdict(self.settings)

    async def _admin_update_settings(self, request: web.Request) -> Any:
        self._update_settings(await request.json())
        return asdict(self.settings)

    def _catalog(self, with_mime: bool) -> list[dict[str, Any]]:
        rows = []
        for entry in self.world.catalog.values():
            row: dict[str, Any] = {
                "key": entry.key,
                "internet_message_id": entry.internet_message_id,
                "delivered_to": entry.delivered_to,
                "malicious": entry.malicious,
                "verdict": entry.verdict,
                "note": entry.note,
            }
            if with_mime:
                row["mime"] = entry.mime.decode("utf-8", errors="replace")
            rows.append(row)
        return rows

    def _update_settings(self, changes: dict[str, Any]) -> None:
        known = {f.name: f for f in fields(GraphSimSettings)}
        for name, value in changes.items():
            if name not in known:
                raise ValueError(
                    f"Unknown setting {name!r}; use one of {sorted(known)}."
                )
            current = getattr(self.settings, name)
            setattr(self.settings, name, type(current)(value))


class _MessagePatch:
    """The changes of a PATCH to a message, validated before any is applied."""

    UPDATABLE: ClassVar[frozenset[str]] = frozenset(
        {"isRead", "singleValueExtendedProperties", "categories", "importance", "flag"}
    )
    DRAFT_ONLY: ClassVar[frozenset[str]] = frozenset(
        {"subject", "body", "toRecipients", "ccRecipients", "bccRecipients", "replyTo"}
    )

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    @classmethod
    def parse(cls, body: dict[str, Any], item: Item) -> _MessagePatch:
        patch = cls()
        for name, value in body.items():
            if name.startswith("@odata."):
                continue
            canonical = next(
                (p for p in MESSAGE_TYPE.properties if p.lower() == name.lower()), None
            )
            if canonical is None:
                raise GraphError(
                    400,
                    "RequestBodyRead",
                    f"The property '{name}' does not exist on type "
                    "'microsoft.graph.message'. Make sure to only use property names "
                    "that are defined by the type or mark the type as open type.",
                )
            if canonical in cls.DRAFT_ONLY:
                raise GraphError(
                    400,
                    "ErrorInvalidPropertyUpdateSentMessage",
                    f"The property '{canonical}' can only be updated on a draft, and "
                    "the simulator does not update draft content.",
                )
            if canonical not in cls.UPDATABLE:
                raise GraphError(
                    400,
                    "ErrorInvalidProperty",
                    f"The property '{canonical}' is read-only.",
                )
            patch.values[canonical] = cls._check(canonical, value)
        return patch

    @staticmethod
    def _check(name: str, value: Any) -> Any:
        if name == "isRead" and not isinstance(value, bool):
            raise GraphError(400, "RequestBodyRead", "isRead must be true or false.")
        if name == "singleValueExtendedProperties":
            if not isinstance(value, list):
                raise GraphError(
                    400,
                    "RequestBodyRead",
                    "singleValueExtendedProperties must be a list.",
                )
            checked = {}
            for entry in value:
                if not isinstance(entry, dict) or not isinstance(
                    entry.get("value"), str
                ):
                    raise GraphError(
                        400,
                        "RequestBodyRead",
                        "Each extended property needs an id and a string value.",
                    )
                checked[normalize_extended_id(str(entry.get("id", "")))] = entry[
                    "value"
                ]
            return checked
        if name == "categories" and not (
            isinstance(value, list) and all(isinstance(v, str) for v in value)
        ):
            raise GraphError(
                400, "RequestBodyRead", "categories must be a list of strings."
            )
        if name == "importance" and value not in ("low", "normal", "high"):
            raise GraphError(
                400, "RequestBodyRead", "importance must be low, normal or high."
            )
        if name == "flag" and not (isinstance(value, dict) and "flagStatus" in value):
            raise GraphError(400, "RequestBodyRead", "flag must carry a flagStatus.")
        return value

    def apply(self, item: Item, now: datetime) -> None:
        for name, value in self.values.items():
            if name == "isRead":
                item.is_read = value
            elif name == "singleValueExtendedProperties":
                item.extended_properties.update(value)
            elif name == "categories":
                item.categories = list(value)
            elif name == "importance":
                item.importance = value
            elif name == "flag":
                item.flag_status = str(value["flagStatus"])
        item.modified_at = now
        item.version += 1


def _decode_mime_upload(raw: bytes) -> bytes:
    try:
        mime = base64.b64decode(b"".join(raw.split()), validate=True)
    except (binascii.Error, ValueError):
        raise GraphError(
            400,
            "ErrorMimeContentInvalidBase64String",
            "Invalid base64 string for MIME content.",
        ) from None
    if not mime.strip() or summarize_mime(mime).headers == ():
        raise GraphError(400, "ErrorMimeContentInvalid", "The MIME content is invalid.")
    return mime


def _mime_from_json(body: dict[str, Any], mailbox: str) -> bytes:
    subject = str(body.get("subject", ""))
    content = body.get("body") or {}
    text = str(content.get("content", "")) if isinstance(content, dict) else ""
    recipients = [
        r.get("emailAddress", {}).get("address", "")
        for r in body.get("toRecipients", []) or []
        if isinstance(r, dict)
    ]
    message_id = f"<{uuid.uuid4().hex}@{mailbox.rsplit('@', 1)[-1]}>"
    lines = [
        f"Message-ID: {message_id}",
        f"From: {mailbox}",
        f"To: {', '.join(recipients)}",
        f"Subject: {subject}",
        "MIME-Version: 1.0",
        'Content-Type: text/plain; charset="utf-8"',
        "",
        text,
    ]
    return "\r\n".join(lines).encode("utf-8")


def filter_and_sort(
    entities: list[T],
    value_of: Callable[[T, str], Any],
    options: QueryOptions,
    default_order: list[tuple[str, bool]],
) -> list[T]:
    """Apply $filter, then $orderby (or `default_order`), to a collection."""
    node = options.filter
    if node is not None:
        entities = [
            entity for entity in entities if node.matches(partial(value_of, entity))
        ]
    for prop, descending in reversed(options.orderby or default_order):
        entities.sort(key=partial(_sort_value, value_of, prop=prop), reverse=descending)
    return entities


def _sort_value(value_of: Callable[[T, str], Any], entity: T, *, prop: str) -> Any:
    return _sort_key(value_of(entity, prop))


def _member(body: dict[str, Any], name: str, default: Any = None) -> Any:
    # Graph reads JSON member names without regard to case: msgraph-sdk sends the
    # move and copy parameter as "DestinationId".
    for key, value in body.items():
        if key.lower() == name.lower():
            return value
    return default


def _sort_key(value: Any) -> tuple[int, Any]:
    # None sorts first, then values of one type compare among themselves.
    if value is None:
        return (0, "")
    if isinstance(value, str):
        return (1, value.lower())
    return (1, value)


def _batch_response(request_id: str, response: web.StreamResponse) -> dict[str, Any]:
    """Describe an inner response: status, headers and a JSON or base64 body."""
    headers = {
        name: value
        for name, value in response.headers.items()
        if name.lower() not in ("content-length", "request-id", "client-request-id")
    }
    result: dict[str, Any] = {
        "id": request_id,
        "status": response.status,
        "headers": headers,
    }
    raw = response.body if isinstance(response, web.Response) else None
    if isinstance(raw, bytes) and raw:
        if "json" in headers.get("Content-Type", ""):
            result["body"] = json.loads(raw)
        else:
            result["body"] = base64.b64encode(raw).decode("ascii")
    return result


def _failed_dependency(item: BatchItem, failed: str) -> dict[str, Any]:
    return {
        "id": item.request_id,
        "status": 424,
        "headers": {"Content-Type": "application/json"},
        "body": {
            "error": {
                "code": "FailedDependency",
                "message": f"The request depends on request {failed}, which failed.",
            }
        },
    }
