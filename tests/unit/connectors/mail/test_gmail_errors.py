"""Every error the Gmail adapter can meet maps to one connector error class."""

from __future__ import annotations

import http.client
import json
from datetime import UTC, datetime
from typing import Any

import google.auth.exceptions
import httplib2
import pytest
from googleapiclient import errors as api_errors

from autopull.connectors.errors import (
    AlreadyDoneError,
    ConnectorError,
    NotFoundError,
    PermanentError,
    ThrottledError,
    TransientError,
)
from autopull.connectors.mail.gmail import (
    NO_LABELS,
    map_gmail_error,
    parse_record_label,
    parse_retry_after,
    record_label_name,
    search_query,
)


def http_error(
    status: int, reason: str | None = None, *, retry_after: str | None = None
) -> api_errors.HttpError:
    headers: dict[str, Any] = {"status": status}
    if retry_after is not None:
        headers["retry-after"] = retry_after
    errors = [{"domain": "global", "reason": reason, "message": "m"}] if reason else []
    body = {"error": {"code": status, "message": f"failed {reason}", "errors": errors}}
    return api_errors.HttpError(
        httplib2.Response(headers), json.dumps(body).encode(), uri="http://x/"
    )


UPSTREAM: list[tuple[str, BaseException, type[ConnectorError]]] = [
    ("429", http_error(429, "rateLimitExceeded", retry_after="3"), ThrottledError),
    ("403 rate", http_error(403, "rateLimitExceeded"), ThrottledError),
    ("403 user rate", http_error(403, "userRateLimitExceeded"), ThrottledError),
    ("403 quota", http_error(403, "quotaExceeded"), ThrottledError),
    ("403 daily", http_error(403, "dailyLimitExceeded"), ThrottledError),
    ("403 scope", http_error(403, "insufficientPermissions"), PermanentError),
    ("403 delegation", http_error(403, "forbidden"), PermanentError),
    ("401", http_error(401, "authError"), PermanentError),
    ("404", http_error(404, "notFound"), NotFoundError),
    ("409", http_error(409, "duplicate"), AlreadyDoneError),
    ("400", http_error(400, "invalidArgument"), PermanentError),
    ("400 precondition", http_error(400, "failedPrecondition"), PermanentError),
    ("408", http_error(408), TransientError),
    ("500", http_error(500, "backendError"), TransientError),
    ("503 retry", http_error(503, "backendError", retry_after="7"), ThrottledError),
    (
        "html body",
        api_errors.HttpError(httplib2.Response({"status": 502}), b"<html>bad</html>"),
        TransientError,
    ),
    (
        "refresh retryable",
        google.auth.exceptions.RefreshError("server_error: x", retryable=True),
        TransientError,
    ),
    (
        "refresh refused",
        google.auth.exceptions.RefreshError("unauthorized_client: Client is ..."),
        PermanentError,
    ),
    ("auth transport", google.auth.exceptions.TransportError("down"), TransientError),
    ("auth malformed", google.auth.exceptions.MalformedError("bad"), PermanentError),
    (
        "auth default",
        google.auth.exceptions.DefaultCredentialsError("none"),
        PermanentError,
    ),
    # A name that does not resolve may be a passing DNS failure.
    ("dns", httplib2.ServerNotFoundError("no host"), TransientError),
    ("relative", httplib2.RelativeURIError("x"), PermanentError),
    ("httplib2", httplib2.HttpLib2Error("x"), TransientError),
    (
        "redirects",
        httplib2.RedirectLimit("loop", httplib2.Response({"status": 302}), b""),
        TransientError,
    ),
    ("timeout", TimeoutError("timed out"), TransientError),
    ("refused", ConnectionRefusedError(111, "refused"), TransientError),
    ("reset", ConnectionResetError(104, "reset"), TransientError),
    ("remote closed", http.client.RemoteDisconnected("closed"), TransientError),
    ("bad status", http.client.BadStatusLine("x"), TransientError),
    ("os", OSError(113, "no route"), TransientError),
    ("unknown api", api_errors.UnknownApiNameOrVersion("gmail v9"), PermanentError),
    ("bad json", api_errors.InvalidJsonError("x"), PermanentError),
    ("bug", ValueError("odd"), PermanentError),
]


@pytest.mark.parametrize(
    ("upstream", "expected"),
    [(error, expected) for _, error, expected in UPSTREAM],
    ids=[name for name, _, _ in UPSTREAM],
)
def test_upstream_error_maps(
    upstream: BaseException, expected: type[ConnectorError]
) -> None:
    mapped = map_gmail_error(
        upstream, mailbox="alice@example.org", message_id="m@x", client_id="1045"
    )

    assert type(mapped) is expected
    assert mapped.mailbox == "alice@example.org"
    assert mapped.message_id == "m@x"
    assert mapped.platform == "gmail"
    assert "alice@example.org" in str(mapped)


def test_connector_error_passes_through() -> None:
    original = NotFoundError("gone")

    assert map_gmail_error(original) is original


def test_throttle_carries_retry_after() -> None:
    mapped = map_gmail_error(http_error(429, "rateLimitExceeded", retry_after="3"))

    assert isinstance(mapped, ThrottledError)
    assert mapped.retry_after == 3.0


def test_refused_token_names_client_id() -> None:
    refused = google.auth.exceptions.RefreshError("unauthorized_client: Client is x")

    mapped = map_gmail_error(refused, mailbox="kate@example.org", client_id="1045")

    assert "1045" in str(mapped)
    assert "domain-wide delegation" in str(mapped)


def test_retry_after_forms() -> None:
    now = datetime(2030, 1, 1, 10, 0, 0, tzinfo=UTC)
    message = "User-rate limit exceeded.  Retry after 2030-01-01T10:00:05.000Z"

    assert parse_retry_after("4", now=now) == 4.0
    assert parse_retry_after("Tue, 01 Jan 2030 10:00:09 GMT", now=now) == 9.0
    assert parse_retry_after(None, message, now=now) == 5.0
    assert parse_retry_after("soon", now=now) is None
    assert parse_retry_after(None, now=now) is None


def test_record_label_round_trip() -> None:
    name = record_label_name("Autopull", "INC-7", "a@b", ["UNREAD", "INBOX"])
    empty = record_label_name("Autopull", "INC-7", "a@b", [])

    record = parse_record_label("Autopull", "Label_1", name)
    archived = parse_record_label("Autopull", "Label_2", empty)

    assert name.endswith(" INBOX,UNREAD")
    assert empty.endswith(f" {NO_LABELS}")
    assert record is not None
    assert record.labels == ("INBOX", "UNREAD")
    assert record.read is False
    assert archived is not None
    assert archived.labels == ()
    assert parse_record_label("Autopull", "Label_3", "Projects") is None


def test_search_query_quotes_syntax() -> None:
    assert (
        search_query("CAH7x+q/Lk=Zp'8#w%41&r@x")
        == "rfc822msgid:CAH7x+q/Lk=Zp'8#w%41&r@x"
    )
    assert search_query("a (b)@x") == 'rfc822msgid:"a (b)@x"'
    with pytest.raises(PermanentError):
        search_query('a "(b)@x')
