"""The directory client against a real OpenLDAP slapd on 127.0.0.1.

The directory is dev/slapd/directory.ldif. slapd gives a bound user at most 10
entries per search unless the search pages, and several tests read more than that.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any, Protocol

import pytest

from autopull.connectors.directory import DirectorySettings, Expansion
from autopull.connectors.directory.client import Directory
from autopull.connectors.errors import PermanentError, TransientError

pytestmark = pytest.mark.integration


class SlapdInstance(Protocol):
    """The slapd fixtures of tests/integration/conftest.py."""

    @property
    def url(self) -> str: ...

    @property
    def base_dn(self) -> str: ...

    @property
    def bind_dn(self) -> str: ...

    @property
    def password(self) -> str: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


SUFFIX = "dc=autopull,dc=test"
PEOPLE = f"ou=people,{SUFFIX}"
GROUPS = f"ou=groups,{SUFFIX}"
VIP_GROUP = f"cn=vip,{GROUPS}"
CLIENT_MODULE = "autopull.connectors.directory.client"

INJECTION_ATTEMPTS = [
    "*",
    "*)(uid=*",
    "*)(|(mail=*",
    "alice*",
    "*@autopull.test",
    "bob@autopull.test)(mail=*",
    "carol\x00@autopull.test",
    "\x00",
    "\\",
    "\\2a",
    "alice\\@autopull.test",
    "(",
    ")",
    "()",
    "älice@autopull.test",
    "ロボット@autopull.test",
    "alice@autopull.test\udc80",
]


def settings_for(instance: SlapdInstance, **overrides: Any) -> DirectorySettings:
    values: dict[str, Any] = {
        "url": instance.url,
        "bind_dn": instance.bind_dn,
        "password": instance.password,
        "base_dn": instance.base_dn,
        "flavor": "openldap",
        "vip_groups": (VIP_GROUP,),
        # Pages smaller than slapd's limit of 10, and batches larger than it.
        "paged_size": 4,
        "member_batch_size": 25,
        "pool_size": 2,
        "connect_timeout_seconds": 2.0,
        "receive_timeout_seconds": 5,
        "max_attempts": 3,
        "retry_backoff_seconds": 0.01,
        "max_retry_wait_seconds": 0.05,
    }
    values.update(overrides)
    return DirectorySettings(**values)


@pytest.fixture
async def directory(slapd: SlapdInstance) -> AsyncIterator[Directory]:
    async with Directory(settings_for(slapd)) as client:
        yield client


def retry_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        record
        for record in caplog.records
        if record.name == CLIENT_MODULE and "retrying" in record.getMessage()
    ]


def paths_by_mailbox(expansion: Expansion) -> dict[str, tuple[str, ...]]:
    return {member.mailbox: member.path for member in expansion.members}


# --- resolve ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "alice@autopull.test",
        "ALICE@AUTOPULL.TEST",
        "Alice@autopull.test",
        "aa@old.autopull.test",
        "smtp:alice@autopull.test",
        "SMTP:Alice.Archer@autopull.test",
        "  alice.archer@autopull.test ",
    ],
)
async def test_resolve_alias_returns_primary_mailbox(
    directory: Directory, address: str
) -> None:
    person = await directory.resolve(address)

    assert person is not None
    assert person.mailbox == "alice.archer@autopull.test"
    assert person.dn == f"uid=alice,{PEOPLE}"


async def test_resolve_primary_returns_attributes(directory: Directory) -> None:
    person = await directory.resolve("alice.archer@autopull.test")

    assert person is not None
    assert person.mailbox == "alice.archer@autopull.test"
    assert person.addresses == (
        "alice.archer@autopull.test",
        "alice@autopull.test",
        "aa@old.autopull.test",
    )
    assert person.display_name == "Alice Archer"
    assert person.title == "Chief Financial Officer"
    assert person.department == "Finance"
    assert person.manager == f"uid=carol,{PEOPLE}"


async def test_resolve_prefers_smtp_primary_over_mail(directory: Directory) -> None:
    person = await directory.resolve("grace@autopull.test")

    assert person is not None
    assert person.mailbox == "grace.green@autopull.test"


async def test_resolve_user_without_proxy_addresses(directory: Directory) -> None:
    person = await directory.resolve("Dave.Dunn@autopull.test")

    assert person is not None
    assert person.mailbox == "dave.dunn@autopull.test"
    assert person.addresses == ("dave.dunn@autopull.test",)
    assert person.display_name is None
    assert person.manager == f"uid=alice,{PEOPLE}"


@pytest.mark.parametrize(
    "address",
    [
        "nobody@autopull.test",
        "alice@elsewhere.test",
        # A list's address is not a person.
        "all-staff@autopull.test",
        # Proxy addresses of other types than SMTP are not mail addresses.
        "/o=Autopull/ou=Exchange/cn=Recipients/cn=alice",
        "x500:/o=Autopull/ou=Exchange/cn=Recipients/cn=alice",
        "",
        "   ",
    ],
)
async def test_resolve_unknown_address_returns_none(
    directory: Directory, address: str
) -> None:
    assert await directory.resolve(address) is None


async def test_resolve_collects_nested_groups(directory: Directory) -> None:
    person = await directory.resolve("alice@autopull.test")

    assert person is not None
    groups = set(person.groups)
    assert f"cn=executives,{GROUPS}" in groups
    assert f"cn=finance,{GROUPS}" in groups
    # vip contains executives, and loop-b contains loop-a.
    assert VIP_GROUP in groups
    assert f"cn=loop-b,{GROUPS}" in groups
    assert len(person.groups) == len(groups)


@pytest.mark.parametrize(
    ("address", "vip"),
    [
        ("carol@autopull.test", True),  # direct member of vip
        ("alice@autopull.test", True),  # member of executives, which is in vip
        ("bob@autopull.test", False),
        ("dave.dunn@autopull.test", False),
    ],
)
async def test_resolve_detects_vip(
    directory: Directory, address: str, vip: bool
) -> None:
    person = await directory.resolve(address)

    assert person is not None
    assert person.vip is vip


# --- expand -------------------------------------------------------------------------


async def test_expand_nested_lists_reaches_each_mailbox_once(
    directory: Directory,
) -> None:
    expansion = await directory.expand("all-staff@autopull.test")

    assert expansion.kind == "list"
    assert expansion.too_large is False
    assert sorted(expansion.mailboxes) == [
        "alice.archer@autopull.test",
        "bob.brown@autopull.test",
        "carol.chen@autopull.test",
        "dave.dunn@autopull.test",
        "erin.evans@autopull.test",
        "grace.green@autopull.test",
    ]
    assert len(expansion.mailboxes) == len(set(expansion.mailboxes))


async def test_expand_records_shortest_paths(directory: Directory) -> None:
    expansion = await directory.expand("all-staff@autopull.test")
    paths = paths_by_mailbox(expansion)

    # bob is a direct member and also a member of engineering.
    assert paths["bob.brown@autopull.test"] == (
        "all-staff@autopull.test",
        "bob.brown@autopull.test",
    )
    assert paths["erin.evans@autopull.test"] == (
        "all-staff@autopull.test",
        "engineering@autopull.test",
        "erin.evans@autopull.test",
    )
    # alice is in executives and in finance; executives comes first by DN.
    assert paths["alice.archer@autopull.test"] == (
        "all-staff@autopull.test",
        "executives@autopull.test",
        "alice.archer@autopull.test",
    )
    assert paths["dave.dunn@autopull.test"] == (
        "all-staff@autopull.test",
        "finance@autopull.test",
        "dave.dunn@autopull.test",
    )


async def test_expand_reports_members_without_mailbox(directory: Directory) -> None:
    expansion = await directory.expand("all-staff@autopull.test")

    assert set(expansion.unresolved) == {
        f"uid=frank,{PEOPLE}",  # has no address
        f"uid=ghost,{PEOPLE}",  # does not exist
    }


async def test_expand_list_alias_starts_path_with_alias(directory: Directory) -> None:
    expansion = await directory.expand("EVERYONE@autopull.test")
    paths = paths_by_mailbox(expansion)

    assert expansion.address == "everyone@autopull.test"
    assert paths["grace.green@autopull.test"] == (
        "everyone@autopull.test",
        "all-staff@autopull.test",
        "grace.green@autopull.test",
    )


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        (
            "loop-a@autopull.test",
            {
                "alice.archer@autopull.test": (
                    "loop-a@autopull.test",
                    "alice.archer@autopull.test",
                ),
                "bob.brown@autopull.test": (
                    "loop-a@autopull.test",
                    "loop-b@autopull.test",
                    "bob.brown@autopull.test",
                ),
            },
        ),
        (
            "loop-b@autopull.test",
            {
                "bob.brown@autopull.test": (
                    "loop-b@autopull.test",
                    "bob.brown@autopull.test",
                ),
                "alice.archer@autopull.test": (
                    "loop-b@autopull.test",
                    "loop-a@autopull.test",
                    "alice.archer@autopull.test",
                ),
            },
        ),
    ],
)
async def test_expand_cycle_ends_with_each_mailbox_once(
    directory: Directory,
    caplog: pytest.LogCaptureFixture,
    address: str,
    expected: dict[str, tuple[str, ...]],
) -> None:
    caplog.set_level(logging.WARNING, logger="autopull.connectors.directory")

    expansion = await asyncio.wait_for(directory.expand(address), timeout=10)

    assert expansion.kind == "list"
    assert len(expansion.members) == 2
    assert paths_by_mailbox(expansion) == expected
    assert expansion.unresolved == ()
    # The walk ended because every list was expanded, not at the depth limit.
    assert [record.getMessage() for record in caplog.records] == []


async def test_expand_large_list_pages_past_server_limit(
    directory: Directory,
) -> None:
    expansion = await directory.expand("big-list@autopull.test")

    assert expansion.too_large is False
    assert len(expansion.members) == 30
    assert expansion.mailboxes[0] == "user01@autopull.test"
    assert expansion.mailboxes[-1] == "user30@autopull.test"


async def test_expand_over_member_limit_is_too_large(slapd: SlapdInstance) -> None:
    async with Directory(settings_for(slapd, max_list_members=20)) as client:
        expansion = await client.expand("big-list@autopull.test")

    assert expansion.kind == "list"
    assert expansion.too_large is True
    assert len(expansion.members) == 20
    assert expansion.mailboxes[-1] == "user20@autopull.test"


async def test_expand_at_member_limit_is_complete(slapd: SlapdInstance) -> None:
    async with Directory(settings_for(slapd, max_list_members=30)) as client:
        expansion = await client.expand("big-list@autopull.test")

    assert expansion.too_large is False
    assert len(expansion.members) == 30


async def test_expand_person_alias_returns_mailbox(directory: Directory) -> None:
    expansion = await directory.expand("robert.brown@autopull.test")

    assert expansion.kind == "person"
    assert expansion.mailboxes == ("bob.brown@autopull.test",)
    assert expansion.members[0].path == (
        "robert.brown@autopull.test",
        "bob.brown@autopull.test",
    )


async def test_expand_unknown_address_is_unknown(directory: Directory) -> None:
    expansion = await directory.expand("nobody@autopull.test")

    assert expansion.kind == "unknown"
    assert expansion.members == ()


async def test_expand_depth_limit_stops_nesting(slapd: SlapdInstance) -> None:
    async with Directory(settings_for(slapd, max_nesting_depth=1)) as client:
        expansion = await client.expand("all-staff@autopull.test")

    # Only all-staff's direct members; the nested lists are not expanded.
    assert sorted(expansion.mailboxes) == [
        "bob.brown@autopull.test",
        "grace.green@autopull.test",
    ]


# --- hostile input ------------------------------------------------------------------


@pytest.mark.parametrize("address", INJECTION_ATTEMPTS)
async def test_resolve_injection_finds_nothing(
    directory: Directory, address: str
) -> None:
    assert await directory.resolve(address) is None


@pytest.mark.parametrize("address", INJECTION_ATTEMPTS)
async def test_expand_injection_finds_nothing(
    directory: Directory, address: str
) -> None:
    expansion = await directory.expand(address)

    assert expansion.kind == "unknown"
    assert expansion.members == ()


# --- errors, reconnects and the cache -----------------------------------------------


async def test_wrong_password_raises_permanent_without_retry(
    slapd: SlapdInstance, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(slapd, password="wrong-password")
    caplog.set_level(logging.WARNING, logger=CLIENT_MODULE)

    async with Directory(settings) as client:
        with pytest.raises(PermanentError) as raised:
            await client.resolve("alice@autopull.test")

    assert "rejected the bind credentials" in str(raised.value)
    assert "wrong-password" not in str(raised.value)
    assert retry_records(caplog) == []


async def test_missing_base_dn_raises_permanent(slapd: SlapdInstance) -> None:
    settings = settings_for(slapd, base_dn="ou=nowhere,dc=autopull,dc=test")

    async with Directory(settings) as client:
        with pytest.raises(PermanentError) as raised:
            await client.resolve("alice@autopull.test")

    assert "directory.base_dn" in str(raised.value)


async def test_stopped_server_raises_transient_after_retries(
    own_slapd: SlapdInstance, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=CLIENT_MODULE)
    settings = settings_for(
        own_slapd, cache_ttl_seconds=0, negative_cache_ttl_seconds=0
    )

    async with Directory(settings) as client:
        assert await client.resolve("bob@autopull.test") is not None
        own_slapd.stop()

        with pytest.raises(TransientError):
            await asyncio.wait_for(client.resolve("bob@autopull.test"), timeout=20)
        assert len(retry_records(caplog)) == settings.max_attempts - 1
        with pytest.raises(TransientError):
            await asyncio.wait_for(client.expand("loop-a@autopull.test"), timeout=20)

        own_slapd.start()
        person = await client.resolve("bob@autopull.test")
        expansion = await client.expand("loop-a@autopull.test")

    assert person is not None
    assert person.mailbox == "bob.brown@autopull.test"
    assert len(expansion.members) == 2


async def test_restarted_server_reconnects_without_error(
    own_slapd: SlapdInstance, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="autopull.connectors.directory")
    settings = settings_for(own_slapd, cache_ttl_seconds=0, pool_size=1)

    async with Directory(settings) as client:
        assert await client.resolve("carol@autopull.test") is not None
        own_slapd.stop()
        own_slapd.start()
        # The pooled connection was closed by the old slapd process.
        person = await client.resolve("carol@autopull.test")

    assert person is not None
    assert person.mailbox == "carol.chen@autopull.test"
    assert retry_records(caplog) == []
    assert any("reconnecting" in record.getMessage() for record in caplog.records)


async def test_cached_answer_survives_server_stop(own_slapd: SlapdInstance) -> None:
    async with Directory(settings_for(own_slapd)) as client:
        first = await client.resolve("erin.evans@autopull.test")
        unknown = await client.resolve("nobody@autopull.test")
        own_slapd.stop()
        cached = await client.resolve("ERIN.EVANS@autopull.test")
        cached_unknown = await client.resolve("nobody@autopull.test")
        client.clear_cache()
        with pytest.raises(TransientError):
            await client.resolve("erin.evans@autopull.test")

    assert first is not None
    assert cached == first
    assert unknown is None
    assert cached_unknown is None


async def test_concurrent_lookups_share_the_pool(directory: Directory) -> None:
    addresses = [f"user{number:02d}@autopull.test" for number in range(1, 31)]

    people = await asyncio.gather(*(directory.resolve(a) for a in addresses))

    assert [person.mailbox if person else None for person in people] == addresses
