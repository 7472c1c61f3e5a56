"""Results of the directory connector: people, list members and expansions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

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
