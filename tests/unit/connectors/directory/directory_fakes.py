"""An in-memory directory on ldap3's MOCK_SYNC strategy, for tests without a server.

The test modules import this file by name, which works because pytest puts the
folder of a test module without __init__.py on sys.path.

The mock evaluates filters and pages results, but compares values as stored, so
addresses are kept in lower case here. Each entry carries its DN in the attribute
the settings name as `entry_dn`, as OpenLDAP (entryDN) and Active Directory
(distinguishedName) supply it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ldap3 import MOCK_SYNC, Connection, Server

from autopull.connectors.directory import DirectorySettings
from autopull.connectors.directory.ldap import LdapSession
from autopull.connectors.directory.parse import Entry

BASE = "dc=corp,dc=test"
BIND_DN = f"cn=reader,{BASE}"
BIND_PASSWORD = "reader-secret"

Attributes = Mapping[str, str | Sequence[str]]


def openldap_settings(**overrides: Any) -> DirectorySettings:
    values: dict[str, Any] = {
        "url": "ldap://127.0.0.1:3890",
        "bind_dn": BIND_DN,
        "password": BIND_PASSWORD,
        "base_dn": BASE,
        "flavor": "openldap",
        "paged_size": 2,
        "member_batch_size": 3,
    }
    values.update(overrides)
    return DirectorySettings(**values)


def person(uid: str, *proxy_addresses: str, **attributes: str) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "objectClass": ["inetOrgPerson"],
        "uid": uid,
        "mail": f"{uid}@corp.test",
        **attributes,
    }
    if proxy_addresses:
        entry["proxyAddresses"] = list(proxy_addresses)
    return entry


def group(cn: str, *members: str, mail: str | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "objectClass": ["groupOfNames"],
        "cn": cn,
        "member": list(members),
    }
    if mail:
        entry["mail"] = mail
    return entry


def people_dn(uid: str) -> str:
    return f"uid={uid},ou=people,{BASE}"


def group_dn(cn: str) -> str:
    return f"cn={cn},ou=groups,{BASE}"


class CountingSession(LdapSession):
    """An LdapSession that counts its searches in its MockDirectory."""

    def __init__(
        self, connection: Any, settings: DirectorySettings, directory: MockDirectory
    ) -> None:
        super().__init__(connection, settings)
        self._directory = directory

    def search(
        self, base: str, search_filter: str, attributes: Sequence[str]
    ) -> list[Entry]:
        self._directory.searches += 1
        return super().search(base, search_filter, attributes)


@dataclass
class MockDirectory:
    """A mock DIT, with counts of the sessions opened on it and their searches.

    A session reads the entries present when it was opened.
    """

    entry_dn_attribute: str = "entryDN"
    entries: dict[str, Attributes] = field(default_factory=dict)
    opened: int = 0
    searches: int = 0

    def add(self, dn: str, attributes: Attributes) -> None:
        self.entries[dn] = attributes

    def connection(self) -> Any:
        connection = Connection(
            Server("mock"),
            user=BIND_DN,
            password=BIND_PASSWORD,
            client_strategy=MOCK_SYNC,
            raise_exceptions=True,
        )
        connection.strategy.add_entry(BIND_DN, {"userPassword": BIND_PASSWORD})
        for dn, attributes in self.entries.items():
            connection.strategy.add_entry(
                dn, {**attributes, self.entry_dn_attribute: dn}
            )
        connection.bind()
        return connection

    def session(self, settings: DirectorySettings) -> LdapSession:
        return CountingSession(self.connection(), settings, self)

    def opener(self) -> Callable[[DirectorySettings], LdapSession]:
        def open_session(settings: DirectorySettings) -> LdapSession:
            self.opened += 1
            return self.session(settings)

        return open_session


def build_corp() -> MockDirectory:
    """Return a directory with nested lists, a cycle, a VIP group and odd members."""
    directory = MockDirectory()
    add = directory.add
    add(
        people_dn("alice"),
        person(
            "alice",
            "SMTP:alice.archer@corp.test",
            "smtp:alice@corp.test",
            "X500:/o=corp/cn=alice",
            displayName="Alice Archer",
            title="Chief Financial Officer",
            departmentNumber="Finance",
            manager=people_dn("carol"),
        ),
    )
    add(people_dn("bob"), person("bob", "SMTP:bob@corp.test", "smtp:robert@corp.test"))
    add(people_dn("carol"), person("carol", title="Chief Executive Officer"))
    add(people_dn("dave"), person("dave"))
    add(people_dn("frank"), {"objectClass": ["inetOrgPerson"], "uid": "frank"})
    add(group_dn("vip"), group("vip", people_dn("carol"), group_dn("executives")))
    add(
        group_dn("executives"),
        group("executives", people_dn("alice"), mail="executives@corp.test"),
    )
    add(
        group_dn("staff"),
        group(
            "staff",
            group_dn("executives"),
            group_dn("loop-a"),
            people_dn("bob"),
            people_dn("dave"),
            people_dn("frank"),
            people_dn("ghost"),
            mail="staff@corp.test",
        ),
    )
    add(
        group_dn("loop-a"),
        group(
            "loop-a", group_dn("loop-b"), people_dn("carol"), mail="loop-a@corp.test"
        ),
    )
    add(
        group_dn("loop-b"),
        group("loop-b", group_dn("loop-a"), people_dn("bob"), mail="loop-b@corp.test"),
    )
    return directory
