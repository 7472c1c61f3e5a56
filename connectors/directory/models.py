"""Results of the directory connector: people, list members and expansions."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

ExpansionKind = Literal["list", "person", "unknown"]


@dataclass(frozen=True)
class Person:
    """A user with a mailbox, as the directory describes them.

    `mailbox` is the primary SMTP address in lower case, and `addresses` contains it
    first, followed by every alias. `groups` contains the DNs of the groups the
    user belongs to, directly or through nested groups, in the order they were
    found. `vip` is True when one of them is a configured VIP group.
    """

    dn: str
    mailbox: str
    addresses: tuple[str, ...]
    display_name: str | None = None
    title: str | None = None
    department: str | None = None
    manager: str | None = None
    groups: tuple[str, ...] = ()
    vip: bool = False


@dataclass(frozen=True)
class Member:
    """A mailbox reached by expanding an address.

    `path` starts with the address that was expanded and ends with `mailbox`. In
    between it names the lists, or an alias's primary address, through which the
    mailbox was reached. A nested group without an address appears by its DN.
    """

    mailbox: str
    dn: str
    display_name: str | None
    path: tuple[str, ...]


@dataclass(frozen=True)
class Expansion:
    """The mailboxes behind one address.

    `kind` is "list" for a distribution list, "person" for a user's own address
    and "unknown" when the directory has neither. Each mailbox appears once, by
    the shortest path found. When a list reaches more than the configured maximum
    of mailboxes, `too_large` is True and `members` contains only the first ones,
    so the caller must not treat them as the whole list. `unresolved` contains
    member DNs that are neither users with an address nor lists, including DNs
    of entries that do not exist.
    """

    address: str
    kind: ExpansionKind
    members: tuple[Member, ...] = ()
    too_large: bool = False
    unresolved: tuple[str, ...] = ()

    @property
    def mailboxes(self) -> tuple[str, ...]:
        """The members' mailboxes, in expansion order."""
        return tuple(member.mailbox for member in self.members)


def encode_person(person: Person) -> dict[str, Any]:
    """Return `person` as a JSON-compatible mapping, which `decode_person` reads."""
    return {
        "dn": person.dn,
        "mailbox": person.mailbox,
        "addresses": list(person.addresses),
        "display_name": person.display_name,
        "title": person.title,
        "department": person.department,
        "manager": person.manager,
        "groups": list(person.groups),
        "vip": person.vip,
    }


def decode_person(data: Mapping[str, Any]) -> Person:
    """Return the Person that `encode_person` wrote.

    Raises KeyError or TypeError when `data` lacks a field or has the wrong type.
    """
    return Person(
        dn=_text(data["dn"]),
        mailbox=_text(data["mailbox"]),
        addresses=tuple(_text(value) for value in data["addresses"]),
        display_name=_optional_text(data.get("display_name")),
        title=_optional_text(data.get("title")),
        department=_optional_text(data.get("department")),
        manager=_optional_text(data.get("manager")),
        groups=tuple(_text(value) for value in data.get("groups", ())),
        vip=bool(data.get("vip", False)),
    )


def encode_expansion(expansion: Expansion) -> dict[str, Any]:
    """Return `expansion` as a JSON-compatible mapping for `decode_expansion`."""
    return {
        "address": expansion.address,
        "kind": expansion.kind,
        "members": [
            {
                "mailbox": member.mailbox,
                "dn": member.dn,
                "display_name": member.display_name,
                "path": list(member.path),
            }
            for member in expansion.members
        ],
        "too_large": expansion.too_large,
        "unresolved": list(expansion.unresolved),
    }


def decode_expansion(data: Mapping[str, Any]) -> Expansion:
    """Return the Expansion that `encode_expansion` wrote.

    Raises KeyError, TypeError or ValueError when `data` lacks a field, has the
    wrong type or an unknown kind.
    """
    kind = data["kind"]
    if kind not in ("list", "person", "unknown"):
        raise ValueError(f"Unknown expansion kind {kind!r}.")
    members = tuple(
        Member(
            mailbox=_text(member["mailbox"]),
            dn=_text(member["dn"]),
            display_name=_optional_text(member.get("display_name")),
            path=tuple(_text(step) for step in member["path"]),
        )
        for member in data["members"]
    )
    return Expansion(
        address=_text(data["address"]),
        kind=kind,
        members=members,
        too_large=bool(data.get("too_large", False)),
        unresolved=tuple(_text(dn) for dn in data.get("unresolved", ())),
    )


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"Expected a string, got {type(value).__name__}.")
    return value


def _optional_text(value: object) -> str | None:
    return None if value is None else _text(value)
