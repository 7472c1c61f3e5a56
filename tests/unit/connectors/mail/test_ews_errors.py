"""Every exchangelib error the EWS adapter can see maps to one connector error."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import requests
from exchangelib import errors as ews_errors

from autopull.connectors.errors import (
    ConnectorError,
    NotFoundError,
    PermanentError,
    ThrottledError,
    TransientError,
)
from autopull.connectors.mail.ews import (
    FailFastWithRetryAfter,
    ServiceUnavailable,
    map_ews_error,
)

MAILBOX = "dave@example.com"
MESSAGE_ID = "CAH7x+q/Lk=Zp'8#w%41&r@mail.example.net"

# Classes whose constructors take more than a message.
SPECIAL: dict[type[BaseException], Callable[[], BaseException]] = {
    ews_errors.RateLimitError: lambda: ews_errors.RateLimitError("Gave up", wait=900),
    ews_errors.RedirectError: lambda: ews_errors.RedirectError(
        url="https://mail.example.com/EWS/Exchange.asmx"
    ),
    ews_errors.CASError: lambda: ews_errors.CASError(
        cas_error="MailboxNotFound", response=None
    ),
    ews_errors.InvalidEnumValue: lambda: ews_errors.InvalidEnumValue(
        "delete_type", "Purge", {"HardDelete"}
    ),
    ews_errors.InvalidTypeError: lambda: ews_errors.InvalidTypeError("folder", 1, str),
    ews_errors.NaiveDateTimeNotAllowed: lambda: ews_errors.NaiveDateTimeNotAllowed(
        None
    ),
}
EXCHANGELIB_ERRORS = sorted(
    (
        value
        for value in vars(ews_errors).values()
        if isinstance(value, type)
        and issubclass(value, Exception)
        and value.__module__ == ews_errors.__name__
    ),
    key=lambda cls: cls.__name__,
)


def make(cls: type[BaseException]) -> BaseException:
    factory = SPECIAL.get(cls)
    return factory() if factory is not None else cls("Exchange said no.")


def mapped(exc: BaseException) -> ConnectorError:
    return map_ews_error(exc, mailbox=MAILBOX, message_id=MESSAGE_ID)


@pytest.mark.parametrize("cls", EXCHANGELIB_ERRORS, ids=lambda cls: cls.__name__)
def test_every_exchangelib_error_maps(cls: type[BaseException]) -> None:
    error = mapped(make(cls))

    assert isinstance(error, ConnectorError)
    assert error.platform == "ews"
    assert error.mailbox == MAILBOX
    assert error.message_id == MESSAGE_ID
    assert str(error).endswith(".")


def test_exchangelib_error_list_is_complete() -> None:
    names = {cls.__name__ for cls in EXCHANGELIB_ERRORS}

    assert len(names) > 300
    assert {"ErrorServerBusy", "ErrorImpersonateUserDenied", "TransportError"} <= names


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (ews_errors.ErrorServerBusy("Busy."), ThrottledError),
        (ews_errors.RateLimitError("Gave up", wait=900), ThrottledError),
        (ServiceUnavailable("Caused by HTTP 503 response"), TransientError),
        (ews_errors.ErrorTimeoutExpired("Reraised from Timeout"), TransientError),
        (ews_errors.ErrorExceededConnectionCount("Too many."), TransientError),
        (ews_errors.ErrorTooManyObjectsOpened("Too many."), TransientError),
        (ews_errors.ErrorInternalServerTransientError("503"), TransientError),
        (ews_errors.ErrorInternalServerError("Failed."), TransientError),
        (ews_errors.ErrorMailboxStoreUnavailable("Down."), TransientError),
        (ews_errors.TransportError("Reset."), TransientError),
        (ews_errors.SOAPError("Bad SOAP response."), TransientError),
        (ews_errors.MalformedResponseError("502 from a proxy."), TransientError),
        (requests.ConnectionError("refused"), TransientError),
        (requests.Timeout("read timed out"), TransientError),
        (ConnectionResetError(104, "reset"), TransientError),
        (TimeoutError("timed out"), TransientError),
        (ews_errors.ErrorImpersonateUserDenied("Denied."), PermanentError),
        (ews_errors.ErrorImpersonationDenied("Denied."), PermanentError),
        (ews_errors.ErrorAccessDenied("Denied."), PermanentError),
        (ews_errors.UnauthorizedError("Invalid credentials."), PermanentError),
        (ews_errors.ErrorAccountDisabled("Disabled."), PermanentError),
        (ews_errors.ErrorNonExistentMailbox("No mailbox."), NotFoundError),
        (ews_errors.ErrorItemNotFound("Not found."), NotFoundError),
        (ews_errors.ErrorFolderNotFound("Not found."), NotFoundError),
        (ews_errors.ErrorInvalidIdMalformed("Id is malformed."), PermanentError),
        (ews_errors.ErrorSchemaValidation("Schema."), PermanentError),
        (SPECIAL[ews_errors.RedirectError](), PermanentError),
        (ValueError("bad value"), PermanentError),
        (SPECIAL[ews_errors.InvalidTypeError](), PermanentError),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, Exception) else "",
)
def test_error_maps_to_class(exc: BaseException, expected: type[Any]) -> None:
    assert type(mapped(exc)) is expected


def test_non_existent_mailbox_marks_mailbox_missing() -> None:
    missing = mapped(ews_errors.ErrorNonExistentMailbox("No mailbox."))
    item = mapped(ews_errors.ErrorItemNotFound("Not found."))

    assert missing.mailbox_missing is True
    assert item.mailbox_missing is False


def test_server_busy_carries_back_off() -> None:
    error = mapped(ews_errors.ErrorServerBusy("Busy.", back_off=2.5))

    assert isinstance(error, ThrottledError)
    assert error.retry_after == 2.5


def test_server_busy_without_back_off_has_none() -> None:
    assert mapped(ews_errors.ErrorServerBusy("Busy.")).retry_after is None


def test_rate_limit_carries_wait() -> None:
    assert mapped(ews_errors.RateLimitError("Gave up", wait=900)).retry_after == 900


def test_service_unavailable_carries_retry_after() -> None:
    error = mapped(ServiceUnavailable("Caused by HTTP 503 response", back_off=7.0))

    assert type(error) is TransientError
    assert error.retry_after == 7.0


def test_connector_error_passes_through() -> None:
    original = NotFoundError("Gone.", mailbox=MAILBOX)

    assert mapped(original) is original


def response(status: int, headers: dict[str, str] | None = None) -> requests.Response:
    result = requests.Response()
    result.status_code = status
    result.headers.update(headers or {})
    result._content = b"Service Unavailable"
    result.url = "http://127.0.0.1:8080/EWS/Exchange.asmx"
    return result


def test_policy_keeps_retry_after_of_503() -> None:
    with pytest.raises(ServiceUnavailable) as caught:
        FailFastWithRetryAfter().raise_response_errors(
            response(503, {"Retry-After": "7"})
        )

    assert caught.value.back_off == 7.0
    assert caught.value.__cause__ is not None


def test_policy_503_without_header_has_no_back_off() -> None:
    with pytest.raises(ServiceUnavailable) as caught:
        FailFastWithRetryAfter().raise_response_errors(response(503))

    assert caught.value.back_off is None


def test_policy_401_is_unauthorized() -> None:
    with pytest.raises(ews_errors.UnauthorizedError):
        FailFastWithRetryAfter().raise_response_errors(response(401))


def test_policy_passes_200() -> None:
    assert FailFastWithRetryAfter().raise_response_errors(response(200)) is None
