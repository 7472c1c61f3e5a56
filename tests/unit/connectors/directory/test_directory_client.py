"""The asynchronous Directory client on the mock directory: cache, retries, errors."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
from directory_fakes import MockDirectory, openldap_settings
from ldap3.core import exceptions as ldap_errors

from autopull.connectors.directory import DirectorySettings
from autopull.connectors.directory.client import Directory
from autopull.connectors.directory.ldap import LdapSession
from autopull.connectors.errors import PermanentError, TransientError


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Sleeps:
    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


def failing_opener(
    error: Exception, failures: int, then: Callable[[DirectorySettings], LdapSession]
) -> tuple[Callable[[DirectorySettings], LdapSession], list[int]]:
    calls: list[int] = []

    def open_session(settings: DirectorySettings) -> LdapSession:
        calls.append(1)
        if len(calls) <= failures:
            raise error
        return then(settings)

    return open_session, calls


async def test_resolve_cached_until_ttl(corp: MockDirectory) -> None:
    clock = Clock()
    settings = openldap_settings(cache_ttl_seconds=60)
    async with Directory(settings, clock=clock, opener=corp.opener()) as client:
        first = await client.resolve("alice@corp.test")
        searches = corp.searches
        clock.now = 59.9
        cached = await client.resolve("ALICE@corp.test")
        searches_within_ttl = corp.searches
        clock.now = 60
        again = await client.resolve("alice@corp.test")

    assert first is not None
    assert cached == first
    assert again == first
    assert searches_within_ttl == searches
    assert corp.searches > searches


async def test_resolve_unknown_cached_for_negative_ttl(corp: MockDirectory) -> None:
    clock = Clock()
    settings = openldap_settings(cache_ttl_seconds=600, negative_cache_ttl_seconds=10)
    async with Directory(settings, clock=clock, opener=corp.opener()) as client:
        assert await client.resolve("new@corp.test") is None
        searches = corp.searches
        clock.now = 9
        assert await client.resolve("new@corp.test") is None
        searches_within_ttl = corp.searches
        clock.now = 10
        assert await client.resolve("new@corp.test") is None

    assert searches_within_ttl == searches
    assert corp.searches > searches


async def test_clear_cache_forgets_answers(corp: MockDirectory) -> None:
    async with Directory(openldap_settings(), opener=corp.opener()) as client:
        await client.resolve("bob@corp.test")
        searches = corp.searches
        client.clear_cache()
        await client.resolve("bob@corp.test")

    assert corp.searches > searches


async def test_expand_cached_until_ttl(corp: MockDirectory) -> None:
    clock = Clock()
    settings = openldap_settings(cache_ttl_seconds=30)
    async with Directory(settings, clock=clock, opener=corp.opener()) as client:
        first = await client.expand("staff@corp.test")
        searches = corp.searches
        second = await client.expand("Staff@corp.test")

    assert second is first
    assert corp.searches == searches


async def test_transient_failure_retried_with_backoff(corp: MockDirectory) -> None:
    sleeps = Sleeps()
    opener, calls = failing_opener(
        ldap_errors.LDAPSocketOpenError("refused"), failures=2, then=corp.opener()
    )
    settings = openldap_settings(max_attempts=3, retry_backoff_seconds=0.5)
    async with Directory(settings, sleep=sleeps, opener=opener) as client:
        found = await client.resolve("bob@corp.test")

    assert found is not None
    assert len(calls) == 3
    assert sleeps.waits == [0.5, 1.0]


async def test_transient_failure_exhausts_attempts(
    corp: MockDirectory, caplog: pytest.LogCaptureFixture
) -> None:
    sleeps = Sleeps()
    opener, calls = failing_opener(
        ldap_errors.LDAPSocketOpenError("refused"), failures=99, then=corp.opener()
    )
    settings = openldap_settings(
        max_attempts=4, retry_backoff_seconds=1, max_retry_wait_seconds=3
    )
    caplog.set_level(logging.WARNING)

    async with Directory(settings, sleep=sleeps, opener=opener) as client:
        with pytest.raises(TransientError) as raised:
            await client.expand("staff@corp.test")

    assert len(calls) == 4
    assert sleeps.waits == [1, 2, 3]
    assert isinstance(raised.value.__cause__, ldap_errors.LDAPSocketOpenError)
    assert caplog.text.count("retrying action=expand") == 3


async def test_bad_credentials_not_retried(corp: MockDirectory) -> None:
    sleeps = Sleeps()
    error = ldap_errors.LDAPOperationResult(result=49, description="invalidCredentials")
    opener, calls = failing_opener(error, failures=99, then=corp.opener())

    async with Directory(openldap_settings(), sleep=sleeps, opener=opener) as client:
        with pytest.raises(PermanentError, match="rejected the bind credentials"):
            await client.resolve("bob@corp.test")

    assert len(calls) == 1
    assert sleeps.waits == []


async def test_errors_are_not_cached(corp: MockDirectory) -> None:
    opener, calls = failing_opener(
        ldap_errors.LDAPSocketOpenError("refused"), failures=1, then=corp.opener()
    )
    settings = openldap_settings(max_attempts=1)
    async with Directory(settings, opener=opener) as client:
        with pytest.raises(TransientError):
            await client.resolve("bob@corp.test")
        found = await client.resolve("bob@corp.test")

    assert found is not None
    assert len(calls) == 2


@pytest.mark.parametrize("address", ["", "  ", "x@t\udc80", "a" * 300])
async def test_unusable_address_skips_server(address: str) -> None:
    opener, calls = failing_opener(
        AssertionError("no session expected"),
        failures=99,
        then=MockDirectory().opener(),
    )
    async with Directory(openldap_settings(), opener=opener) as client:
        person_found = await client.resolve(address)
        expansion = await client.expand(address)

    assert person_found is None
    assert expansion.kind == "unknown"
    assert calls == []


async def test_closed_client_raises(corp: MockDirectory) -> None:
    client = Directory(openldap_settings(), opener=corp.opener())
    await client.close()

    with pytest.raises(RuntimeError, match="is closed"):
        await client.resolve("bob@corp.test")


def test_plain_ldap_password_warning(caplog: pytest.LogCaptureFixture) -> None:
    settings: dict[str, Any] = {
        "bind_dn": "cn=reader,dc=t",
        "password": "s3cret",
        "base_dn": "dc=t",
    }

    Directory(DirectorySettings(url="ldap://dc1.corp.test", **settings))
    Directory(DirectorySettings(url="ldaps://dc1.corp.test", **settings))
    Directory(DirectorySettings(url="ldap://127.0.0.1:3890", **settings))

    warnings = [r for r in caplog.records if "unencrypted" in r.getMessage()]
    assert len(warnings) == 1
    assert "s3cret" not in caplog.text


async def test_resolve_list_answered_from_expansion(corp: MockDirectory) -> None:
    clock = Clock()
    settings = openldap_settings(cache_ttl_seconds=600, negative_cache_ttl_seconds=10)
    async with Directory(settings, clock=clock, opener=corp.opener()) as client:
        assert await client.resolve("staff@corp.test") is None
        expansion = await client.expand("staff@corp.test")
        searches = corp.searches
        clock.now = 300
        person = await client.resolve("staff@corp.test")

    assert expansion.kind == "list"
    assert person is None
    assert corp.searches == searches
