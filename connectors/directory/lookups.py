"""Recipient resolution and list expansion as blocking searches on one session.

These functions run in a worker thread of `Directory`. Each takes a `Searcher`,
the one search method of an `LdapSession`, so the walks over nested groups can be
read without any connection handling around them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Protocol

from .models import Expansion, Member, Person
from .parse import (
    Entry,
    address_filter,
    any_of_filter,
    entry_label,
    extend_path,
    group_filter,
    is_group,
    normalize_dn,
    primary_address,
    smtp_addresses,
    user_or_group_filter,
)
from .settings import AttributeMap, DirectorySettings

logger = logging.getLogger(__name__)

Path = tuple[str, ...]


class Searcher(Protocol):
    """Anything that runs a paged subtree search and returns whole entries."""

    def search(
        self, base: str, search_filter: str, attributes: Sequence[str]
    ) -> list[Entry]: ...


def person_attributes(settings: DirectorySettings) -> list[str]:
    """Return the attributes read for a user."""
    names = settings.attributes
    attribute_names = [
        "objectClass",
        names.mail,
        names.proxy_addresses,
        names.display_name,
        names.title,
        names.department,
        names.manager,
    ]
    return [name for name in attribute_names if name]


def member_attributes(settings: DirectorySettings) -> list[str]:
    """Return the attributes read for an entry met while expanding a list."""
    names = settings.attributes
    attribute_names = [
        "objectClass",
        names.mail,
        names.proxy_addresses,
        names.display_name,
        names.member,
    ]
    return [name for name in attribute_names if name]


def find_person(
    searcher: Searcher, settings: DirectorySettings, address: str
) -> Person | None:
    """Return the user whose mail or SMTP proxy address is `address`, or None.

    `address` must already be normalized (see `parse.normalize_address`).
    """
    names = settings.attributes
    search_filter = f"(&{settings.user_filter}{address_filter(address, names)})"
    entries = searcher.search(
        settings.base_dn, search_filter, person_attributes(settings)
    )
    entry = _choose(entries, address, settings)
    if entry is None:
        return None
    addresses = smtp_addresses(entry, names)
    if not addresses:
        return None

    groups = collect_groups(searcher, settings, entry.dn)
    vip_groups = {normalize_dn(dn) for dn in settings.vip_groups}
    return Person(
        dn=entry.dn,
        mailbox=addresses[0],
        addresses=addresses,
        display_name=entry.first(names.display_name),
        title=entry.first(names.title),
        department=entry.first(names.department),
        manager=entry.first(names.manager),
        groups=groups,
        vip=any(normalize_dn(group) in vip_groups for group in groups),
    )


def collect_groups(
    searcher: Searcher, settings: DirectorySettings, dn: str
) -> tuple[str, ...]:
    """Return the DNs of the groups that contain `dn`, directly or nested.

    One search per level finds the groups whose member is any DN of the level
    below. Each group is followed once, so a cycle of groups ends the walk.
    """
    found: list[str] = []
    seen = {normalize_dn(dn)}
    level = [dn]
    for _ in range(settings.max_nesting_depth):
        parents: list[str] = []
        for batch in _batches(level, settings.member_batch_size):
            member_of = any_of_filter(settings.attributes.member, batch)
            search_filter = f"(&{group_filter(settings)}{member_of})"
            for entry in searcher.search(settings.base_dn, search_filter, []):
                key = normalize_dn(entry.dn)
                if key not in seen:
                    seen.add(key)
                    parents.append(entry.dn)
        found.extend(parents)
        level = parents
        if not level:
            return tuple(found)

    logger.warning(
        "Stopped collecting groups at max_nesting_depth=%d; outer groups, if "
        "any, were not followed dn=%s",
        settings.max_nesting_depth,
        dn,
    )
    return tuple(found)


def expand_address(
    searcher: Searcher, settings: DirectorySettings, address: str
) -> Expansion:
    """Return the mailboxes behind `address`: a list's members, or a user alone.

    `address` must already be normalized (see `parse.normalize_address`).
    """
    names = settings.attributes
    search_filter = (
        f"(&{user_or_group_filter(settings)}{address_filter(address, names)})"
    )
    entries = searcher.search(
        settings.base_dn, search_filter, member_attributes(settings)
    )
    entry = _choose(entries, address, settings)
    if entry is None:
        return Expansion(address=address, kind="unknown")
    if is_group(entry, settings):
        return _ListExpander(searcher, settings, address).expand(entry)

    mailbox = primary_address(entry, names)
    if mailbox is None:
        return Expansion(address=address, kind="unknown")
    member = Member(
        mailbox=mailbox,
        dn=entry.dn,
        display_name=entry.first(names.display_name),
        path=extend_path((address,), mailbox),
    )
    return Expansion(address=address, kind="person", members=(member,))


class _ListExpander:
    """A breadth-first walk down one list, level by level.

    Breadth first means each mailbox keeps the shortest path to it. Members are
    visited in DN order, so the same directory always gives the same paths. Each
    list is expanded once, which ends cycles and skips lists reached twice.
    """

    def __init__(
        self, searcher: Searcher, settings: DirectorySettings, address: str
    ) -> None:
        self._searcher = searcher
        self._settings = settings
        self._address = address
        self._members: list[Member] = []
        self._mailboxes: set[str] = set()
        self._unresolved: dict[str, None] = {}
        self._expanded_lists: set[str] = set()
        self._too_large = False

    def expand(self, root: Entry) -> Expansion:
        self._expanded_lists.add(normalize_dn(root.dn))
        root_path = extend_path((self._address,), entry_label(root, self._names))
        level = [(root, root_path)]
        for _ in range(self._settings.max_nesting_depth):
            level = self._expand_level(level)
            if not level or self._too_large:
                break
        else:
            logger.warning(
                "List nesting is deeper than max_nesting_depth=%d; inner lists "
                "were not expanded address=%s",
                self._settings.max_nesting_depth,
                self._address,
            )

        return Expansion(
            address=self._address,
            kind="list",
            members=tuple(self._members),
            too_large=self._too_large,
            unresolved=tuple(self._unresolved),
        )

    @property
    def _names(self) -> AttributeMap:
        return self._settings.attributes

    def _expand_level(
        self, level: list[tuple[Entry, Path]]
    ) -> list[tuple[Entry, Path]]:
        pairs = [
            (path, member_dn)
            for entry, path in level
            for member_dn in sorted(entry.values(self._names.member), key=normalize_dn)
        ]
        entries = self._read_entries(list(dict.fromkeys(dn for _, dn in pairs)))

        next_level: list[tuple[Entry, Path]] = []
        for path, member_dn in pairs:
            entry = entries.get(normalize_dn(member_dn))
            if entry is None:
                self._unresolved[member_dn] = None
            elif is_group(entry, self._settings):
                key = normalize_dn(entry.dn)
                if key not in self._expanded_lists:
                    self._expanded_lists.add(key)
                    label = entry_label(entry, self._names)
                    next_level.append((entry, extend_path(path, label)))
            elif not self._add_member(entry, path):
                break
        return next_level

    def _add_member(self, entry: Entry, path: Path) -> bool:
        """Add the entry's mailbox if it is new; return False once the list is full."""
        mailbox = primary_address(entry, self._names)
        if mailbox is None:
            self._unresolved[entry.dn] = None
            return True
        if mailbox in self._mailboxes:
            return True
        if len(self._members) >= self._settings.max_list_members:
            self._too_large = True
            return False

        self._mailboxes.add(mailbox)
        self._members.append(
            Member(
                mailbox=mailbox,
                dn=entry.dn,
                display_name=entry.first(self._names.display_name),
                path=extend_path(path, mailbox),
            )
        )
        return True

    def _read_entries(self, dns: list[str]) -> dict[str, Entry]:
        """Return the users and groups among `dns`, keyed by normalized DN."""
        found: dict[str, Entry] = {}
        attributes = member_attributes(self._settings)
        for batch in _batches(dns, self._settings.member_batch_size):
            by_dn = any_of_filter(self._names.entry_dn, batch)
            search_filter = f"(&{user_or_group_filter(self._settings)}{by_dn})"
            for entry in self._searcher.search(
                self._settings.base_dn, search_filter, attributes
            ):
                found[normalize_dn(entry.dn)] = entry
        return found


def _choose(
    entries: list[Entry], address: str, settings: DirectorySettings
) -> Entry | None:
    """Return the entry that owns `address` when the search found several.

    An address on two entries is a directory error. The entry whose primary
    address it is wins, and otherwise the first by DN, with a warning either way.
    """
    if len(entries) <= 1:
        return entries[0] if entries else None
    ordered = sorted(entries, key=lambda entry: normalize_dn(entry.dn))
    owners = [
        entry
        for entry in ordered
        if primary_address(entry, settings.attributes) == address
    ]
    chosen = (owners or ordered)[0]
    logger.warning(
        "Address is held by %d directory entries; using dn=%s address=%s others=%s",
        len(entries),
        chosen.dn,
        address,
        ";".join(entry.dn for entry in ordered if entry is not chosen),
    )
    return chosen


def _batches(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
