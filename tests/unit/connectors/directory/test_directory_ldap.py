"""The ldap3 error mapping, paged searches on the mock, and the session pool."""

from __future__ import annotations

import inspect
import ssl
from typing import Any

import pytest
from directory_fakes import BASE, MockDirectory, openldap_settings, people_dn, person
from ldap3.core import exceptions as ldap_errors
from ldap3.core.results import RESULT_SIZE_LIMIT_EXCEEDED

from autopull.connectors.directory.ldap import (
    LdapSession,
    SessionPool,
    map_ldap_error,
)
from autopull.connectors.errors import PermanentError, TransientError

URL = "ldap://dc1.corp.test:389"

LDAP3_ERRORS = sorted(
    (
        cls
        for _, cls in inspect.getmembers(ldap_errors, inspect.isclass)
        if issubclass(cls, ldap_errors.LDAPException)
    ),
    key=lambda cls: cls.__name__,
)
# Besides LDAPCommunicationError and its subclasses.
TRANSIENT_ERRORS = {
    ldap_errors.LDAPTimeLimitExceededResult,
    ldap_errors.LDAPBusyResult,
    ldap_errors.LDAPUnavailableResult,
    ldap_errors.LDAPResponseTimeoutError,
    ldap_errors.LDAPMaximumRetriesError,
}


def make_error(cls: type[ldap_errors.LDAPException]) -> ldap_errors.LDAPException:
    if issubclass(cls, ldap_errors.LDAPOperationResult):
        return cls(description="someResult", message="detail from the server")
    return cls("detail from ldap3")


@pytest.mark.parametrize("cls", LDAP3_ERRORS, ids=lambda cls: cls.__name__)
def test_every_ldap3_error_is_mapped(cls: type[ldap_errors.LDAPException]) -> None:
    mapped = map_ldap_error(make_error(cls), URL)

    expected = PermanentError
    if issubclass(cls, ldap_errors.LDAPCommunicationError) or cls in TRANSIENT_ERRORS:
        expected = TransientError
    assert type(mapped) is expected
    assert URL in str(mapped)
    assert cls.__name__ in str(mapped)
    assert mapped.platform == "ldap"


@pytest.mark.parametrize(
    ("error", "expected_class", "advice"),
    [
        (
            ldap_errors.LDAPOperationResult(
                result=49, description="invalidCredentials"
            ),
            PermanentError,
            "directory.bind_dn and directory.password",
        ),
        (
            ldap_errors.LDAPOperationResult(result=32, description="noSuchObject"),
            PermanentError,
            "directory.base_dn",
        ),
        (
            ldap_errors.LDAPOperationResult(
                result=8, description="strongerAuthRequired"
            ),
            PermanentError,
            "ldaps://",
        ),
        (
            ldap_errors.LDAPOperationResult(result=4, description="sizeLimitExceeded"),
            PermanentError,
            "directory.paged_size",
        ),
        (
            ldap_errors.LDAPOperationResult(result=51, description="busy"),
            TransientError,
            "retried",
        ),
        (
            ldap_errors.LDAPSocketOpenError("socket connection error"),
            TransientError,
            "new connection",
        ),
        (ConnectionResetError("reset by peer"), TransientError, "new connection"),
        (ValueError("not an LDAP error"), PermanentError, "Check the settings"),
    ],
)
def test_map_ldap_error_table(
    error: BaseException, expected_class: type[Exception], advice: str
) -> None:
    mapped = map_ldap_error(error, URL)

    assert type(mapped) is expected_class
    assert advice in str(mapped)


def test_certificate_failure_is_permanent() -> None:
    # ldap3 raises a class that is both its socket error and the ssl error.
    merged = ldap_errors.communication_exception_factory(
        ldap_errors.LDAPSocketOpenError,
        ssl.SSLCertVerificationError("certificate verify failed"),
    )

    mapped = map_ldap_error(merged("socket ssl wrapping error"), URL)

    assert type(mapped) is PermanentError
    assert "directory.ca_file" in str(mapped)


def test_refused_connection_is_transient() -> None:
    merged = ldap_errors.communication_exception_factory(
        ldap_errors.LDAPSocketOpenError, ConnectionRefusedError("refused")
    )

    assert type(map_ldap_error(merged("socket connection error"), URL)) is (
        TransientError
    )


# --- paged searches -----------------------------------------------------------------


def test_search_pages_through_all_entries() -> None:
    directory = MockDirectory()
    for number in range(7):
        directory.add(people_dn(f"u{number}"), person(f"u{number}"))
    settings = openldap_settings(paged_size=2)

    entries = directory.session(settings).search(
        BASE, "(objectClass=inetOrgPerson)", ["mail"]
    )

    assert sorted(entry.first("mail") or "" for entry in entries) == [
        f"u{number}@corp.test" for number in range(7)
    ]


class PartialResultConnection:
    """Returns one entry and sizeLimitExceeded for every search, as ldap3 does."""

    closed = False

    def __init__(self) -> None:
        self.result: dict[str, Any] = {}
        self.response: list[dict[str, Any]] = []

    def search(self, **_: Any) -> bool:
        self.result = {"result": RESULT_SIZE_LIMIT_EXCEEDED, "description": "x"}
        self.response = [
            {"type": "searchResEntry", "dn": "uid=a,dc=t", "raw_attributes": {}}
        ]
        return True

    def unbind(self) -> None:
        self.closed = True


def test_search_raises_on_partial_result() -> None:
    session = LdapSession(PartialResultConnection(), openldap_settings())

    with pytest.raises(ldap_errors.LDAPSizeLimitExceededResult):
        session.search(BASE, "(objectClass=*)", [])


# --- the session pool ---------------------------------------------------------------


class FakeSession:
    def __init__(self, number: int) -> None:
        self.number = number
        self.closed = False
        self.close_calls = 0

    def close(self) -> None:
        self.closed = True
        self.close_calls += 1


class FakeOpener:
    def __init__(self) -> None:
        self.sessions: list[FakeSession] = []

    def __call__(self, _: Any) -> Any:
        session = FakeSession(len(self.sessions))
        self.sessions.append(session)
        return session


def number_of(session: Any) -> int:
    number: int = session.number
    return number


def test_pool_reuses_idle_session() -> None:
    opener = FakeOpener()
    pool = SessionPool(openldap_settings(), opener)

    first = pool.run(number_of)
    second = pool.run(number_of)

    assert (first, second) == (0, 0)
    assert len(opener.sessions) == 1


def test_pool_discards_session_after_error() -> None:
    opener = FakeOpener()
    pool = SessionPool(openldap_settings(), opener)

    def fail(_: Any) -> int:
        raise ldap_errors.LDAPOperationResult(result=51, description="busy")

    with pytest.raises(ldap_errors.LDAPBusyResult):
        pool.run(fail)
    number = pool.run(number_of)

    assert opener.sessions[0].close_calls == 1
    assert number == 1


def test_pool_reconnects_once_when_reused_session_is_lost() -> None:
    opener = FakeOpener()
    pool = SessionPool(openldap_settings(), opener)
    pool.run(number_of)

    def lost_on_first_session(session: Any) -> int:
        if session.number == 0:
            raise ldap_errors.LDAPSessionTerminatedByServerError("closed")
        return number_of(session)

    assert pool.run(lost_on_first_session) == 1
    assert opener.sessions[0].closed is True


def test_pool_new_session_lost_raises() -> None:
    opener = FakeOpener()
    pool = SessionPool(openldap_settings(), opener)

    def lost(_: Any) -> int:
        raise ldap_errors.LDAPSocketReceiveError("connection reset")

    with pytest.raises(ldap_errors.LDAPSocketReceiveError):
        pool.run(lost)
    assert len(opener.sessions) == 1


def test_pool_skips_closed_idle_session() -> None:
    opener = FakeOpener()
    pool = SessionPool(openldap_settings(), opener)
    pool.run(number_of)
    opener.sessions[0].closed = True

    assert pool.run(number_of) == 1


def test_pool_close_closes_idle_and_returned_sessions() -> None:
    opener = FakeOpener()
    pool = SessionPool(openldap_settings(), opener)
    pool.run(number_of)

    pool.close()
    pool.run(number_of)

    assert opener.sessions[0].close_calls == 1
    assert opener.sessions[1].close_calls == 1
