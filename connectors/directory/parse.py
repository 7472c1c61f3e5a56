"""Search filters and entry parsing, without a server.

Every value placed in a filter goes through RFC 4515 escaping
(`ldap3.utils.conv.escape_filter_chars`), so an address such as `*)(uid=*` is
searched for as that literal text.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ldap3.core.exceptions import LDAPInvalidDnError
from ldap3.utils.conv import escape_filter_chars
from ldap3.utils.dn import parse_dn

from .settings import AttributeMap, DirectorySettings

# RFC 5321 limits a forward path to 256 octets, so a mailbox address is at most 254.
MAX_ADDRESS_LENGTH = 254
SMTP_PREFIX = "smtp:"


@dataclass(frozen=True)
class Entry:
    """One search result: its DN and its values, keyed by lower-case attribute name."""

    dn: str
    attributes: Mapping[str, tuple[str, ...]]

    def values(self, name: str) -> tuple[str, ...]:
        """Return every value of attribute `name`, or () when the entry has none."""
        return self.attributes.get(name.lower(), ())

    def first(self, name: str) -> str | None:
        """Return the first value of attribute `name`, or None."""
        values = self.values(name)
        return values[0] if values else None


def entry_from_raw(dn: str, raw_attributes: Mapping[str, Iterable[bytes]]) -> Entry:
    """Build an Entry from the raw values ldap3 returns, decoding them as UTF-8.

    Active Directory returns a long multi-valued attribute in ranges such as
    `member;range=0-1499`. ldap3 collects the ranges under the plain name, so a
    name with options is used only when the plain name is absent.
    """
    plain_names = {name.lower() for name in raw_attributes if ";" not in name}
    attributes: dict[str, tuple[str, ...]] = {}
    for name, values in raw_attributes.items():
        plain, _, options = name.partition(";")
        if options and plain.lower() in plain_names:
            continue
        decoded = tuple(bytes(value).decode("utf-8", "replace") for value in values)
        attributes[plain.lower()] = decoded
    return Entry(dn=dn, attributes=attributes)


def normalize_address(address: str) -> str | None:
    """Return `address` trimmed, without an `smtp:` prefix and in lower case.

    Returns None for an empty or overlong address, or one that UTF-8 cannot encode
    (a lone surrogate), since no directory entry can carry it.
    """
    text = address.strip()
    if text[: len(SMTP_PREFIX)].lower() == SMTP_PREFIX:
        text = text[len(SMTP_PREFIX) :].strip()
    if not text or len(text) > MAX_ADDRESS_LENGTH:
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return text.lower()


def normalize_dn(dn: str) -> str:
    """Return a comparable form of `dn`: attribute types and values in lower case.

    DNs that ldap3 cannot parse are compared by their lower-case text.
    """
    try:
        parts = parse_dn(dn, escape=False, strip=True)
    except LDAPInvalidDnError:
        return dn.strip().lower()
    return ",".join(f"{name.lower()}={value.lower()}" for name, value, _ in parts)


def address_filter(address: str, attributes: AttributeMap) -> str:
    """Return a filter that matches `address` as the mail or an SMTP proxy address.

    proxyAddresses matches without regard to case, so `smtp:` finds the primary
    `SMTP:` value as well as the aliases.
    """
    value = escape_filter_chars(address)
    terms = [f"({attributes.mail}={value})"]
    if attributes.proxy_addresses:
        terms.append(f"({attributes.proxy_addresses}={SMTP_PREFIX}{value})")
    return f"(|{''.join(terms)})"


def any_of_filter(attribute: str, values: Iterable[str]) -> str:
    """Return a filter that matches entries whose `attribute` equals any value."""
    terms = "".join(f"({attribute}={escape_filter_chars(value)})" for value in values)
    return f"(|{terms})"


def user_or_group_filter(settings: DirectorySettings) -> str:
    """Return a filter that matches users and groups, the entries lists may contain."""
    group = f"(objectClass={escape_filter_chars(settings.group_object_class)})"
    return f"(|{settings.user_filter}{group})"


def group_filter(settings: DirectorySettings) -> str:
    """Return a filter that matches groups."""
    return f"(objectClass={escape_filter_chars(settings.group_object_class)})"


def is_group(entry: Entry, settings: DirectorySettings) -> bool:
    """Return True if `entry` has the configured group object class."""
    group_class = settings.group_object_class.lower()
    return any(value.lower() == group_class for value in entry.values("objectClass"))


def smtp_addresses(entry: Entry, attributes: AttributeMap) -> tuple[str, ...]:
    """Return the entry's SMTP addresses in lower case, the primary one first.

    The primary address is the `SMTP:` proxy address. Without one, it is the first
    `mail` value, and without that, the first `smtp:` alias. Proxy addresses of
    other types (X500:, SIP:) are left out.
    """
    primary: list[str] = []
    aliases: list[str] = []
    for value in entry.values(attributes.proxy_addresses):
        kind, _, address = value.partition(":")
        if kind.lower() != "smtp" or not address.strip():
            continue
        target = primary if kind == "SMTP" else aliases
        target.append(address.strip().lower())
    mails = [value.strip().lower() for value in entry.values(attributes.mail)]

    ordered = primary + mails + aliases
    return tuple(dict.fromkeys(address for address in ordered if address))


def primary_address(entry: Entry, attributes: AttributeMap) -> str | None:
    """Return the entry's primary SMTP address in lower case, or None."""
    addresses = smtp_addresses(entry, attributes)
    return addresses[0] if addresses else None


def entry_label(entry: Entry, attributes: AttributeMap) -> str:
    """Return the entry's primary address, or its DN when it has none."""
    return primary_address(entry, attributes) or entry.dn


def extend_path(path: tuple[str, ...], step: str) -> tuple[str, ...]:
    """Return `path` followed by `step`, unless `path` already ends with it."""
    if path and path[-1] == step:
        return path
    return (*path, step)
