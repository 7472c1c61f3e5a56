"""Filters, addresses and entries, parsed without a server."""

from __future__ import annotations

import pytest

from autopull.connectors.directory import (
    ACTIVE_DIRECTORY_ATTRIBUTES,
    OPENLDAP_ATTRIBUTES,
    AttributeMap,
    DirectorySettings,
)
from autopull.connectors.directory.parse import (
    Entry,
    address_filter,
    any_of_filter,
    entry_from_raw,
    entry_label,
    extend_path,
    is_group,
    normalize_address,
    normalize_dn,
    primary_address,
    smtp_addresses,
    user_or_group_filter,
)


def entry(dn: str = "uid=a,dc=t", **values: tuple[str, ...]) -> Entry:
    return Entry(dn=dn, attributes={name.lower(): v for name, v in values.items()})


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("Alice@Corp.Test", "alice@corp.test"),
        ("  bob@corp.test\t", "bob@corp.test"),
        ("smtp:Carol@corp.test", "carol@corp.test"),
        ("SMTP: dave@corp.test", "dave@corp.test"),
        ("x500:/o=corp/cn=a", "x500:/o=corp/cn=a"),
        ("*)(uid=*", "*)(uid=*"),
        ("ÄLICE@corp.test", "älice@corp.test"),
        ("", None),
        ("   ", None),
        ("smtp:", None),
        ("a" * 255, None),
        ("alice@corp.test\udc80", None),
    ],
)
def test_normalize_address(address: str, expected: str | None) -> None:
    assert normalize_address(address) == expected


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        (
            "alice@corp.test",
            "(|(mail=alice@corp.test)(proxyAddresses=smtp:alice@corp.test))",
        ),
        ("*", "(|(mail=\\2a)(proxyAddresses=smtp:\\2a))"),
        (
            "*)(uid=*",
            "(|(mail=\\2a\\29\\28uid=\\2a)(proxyAddresses=smtp:\\2a\\29\\28uid=\\2a))",
        ),
        ("a\\b", "(|(mail=a\\5cb)(proxyAddresses=smtp:a\\5cb))"),
        ("a\x00b", "(|(mail=a\\00b)(proxyAddresses=smtp:a\\00b))"),
        ("ä@corp.test", "(|(mail=ä@corp.test)(proxyAddresses=smtp:ä@corp.test))"),
    ],
)
def test_address_filter_escapes_values(address: str, expected: str) -> None:
    assert address_filter(address, ACTIVE_DIRECTORY_ATTRIBUTES) == expected


def test_address_filter_without_proxy_attribute() -> None:
    attributes = AttributeMap(proxy_addresses="")

    assert address_filter("a@t", attributes) == "(|(mail=a@t))"


def test_any_of_filter_escapes_dns() -> None:
    dns = ["cn=Smith\\, John,dc=t", "cn=(x)*,dc=t"]

    assert any_of_filter("member", dns) == (
        "(|(member=cn=Smith\\5c, John,dc=t)(member=cn=\\28x\\29\\2a,dc=t))"
    )


def test_user_or_group_filter_combines_settings() -> None:
    settings = DirectorySettings(url="ldap://h", base_dn="dc=t", flavor="openldap")

    assert user_or_group_filter(settings) == (
        "(|(objectClass=inetOrgPerson)(objectClass=groupOfNames))"
    )


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        # SMTP: marks the primary, whatever mail holds.
        (
            {
                "mail": ("old@t",),
                "proxyAddresses": ("smtp:old@t", "SMTP:New@T", "smtp:Alias@t"),
            },
            ("new@t", "old@t", "alias@t"),
        ),
        # Without SMTP:, mail is the primary.
        ({"mail": ("Mail@t",), "proxyAddresses": ("smtp:a@t",)}, ("mail@t", "a@t")),
        # Without both, the first alias is.
        ({"proxyAddresses": ("smtp:a@t", "smtp:b@t")}, ("a@t", "b@t")),
        # Other address types are left out.
        (
            {"proxyAddresses": ("X500:/o=t/cn=a", "SIP:a@t", "SMTP:a@t", "smtp:")},
            ("a@t",),
        ),
        ({"cn": ("no address",)}, ()),
    ],
)
def test_smtp_addresses_primary_first(
    values: dict[str, tuple[str, ...]], expected: tuple[str, ...]
) -> None:
    assert smtp_addresses(entry(**values), ACTIVE_DIRECTORY_ATTRIBUTES) == expected


def test_primary_address_none_without_address() -> None:
    assert primary_address(entry(cn=("x",)), OPENLDAP_ATTRIBUTES) is None


def test_entry_label_falls_back_to_dn() -> None:
    group = entry("cn=vip,dc=t", cn=("vip",))

    assert entry_label(group, OPENLDAP_ATTRIBUTES) == "cn=vip,dc=t"


def test_entry_from_raw_decodes_and_lowercases_names() -> None:
    parsed = entry_from_raw(
        "uid=a,dc=t",
        {"displayName": [b"Ren\xc3\xa9e"], "proxyAddresses": [b"SMTP:a@t"]},
    )

    assert parsed.values("displayname") == ("Renée",)
    assert parsed.first("ProxyAddresses") == "SMTP:a@t"
    assert parsed.values("title") == ()
    assert parsed.first("title") is None


def test_entry_from_raw_replaces_invalid_utf8() -> None:
    parsed = entry_from_raw("uid=a,dc=t", {"cn": [b"\xff"]})

    assert parsed.values("cn") == ("\ufffd",)


def test_entry_from_raw_prefers_merged_range() -> None:
    # ldap3 merges ranged values under the plain name and keeps the first range.
    parsed = entry_from_raw(
        "cn=big,dc=t",
        {"member;range=0-1": [b"a", b"b"], "member": [b"a", b"b", b"c"]},
    )

    assert parsed.values("member") == ("a", "b", "c")


def test_entry_from_raw_uses_range_without_plain_name() -> None:
    parsed = entry_from_raw("cn=big,dc=t", {"member;range=0-*": [b"a"]})

    assert parsed.values("member") == ("a",)


@pytest.mark.parametrize(
    ("left", "right"),
    [
        ("uid=Alice,OU=People,dc=T", "uid=alice,ou=people,dc=t"),
        ("uid=alice, ou=people, dc=t", "uid=alice,ou=people,dc=t"),
        ("not a dn", "NOT A DN"),
    ],
)
def test_normalize_dn_equal_forms(left: str, right: str) -> None:
    assert normalize_dn(left) == normalize_dn(right)


def test_normalize_dn_keeps_different_values_apart() -> None:
    assert normalize_dn("uid=alice,dc=t") != normalize_dn("uid=alicia,dc=t")


@pytest.mark.parametrize(
    ("classes", "expected"),
    [(("top", "groupOfNames"), True), (("GROUPOFNAMES",), True), (("person",), False)],
)
def test_is_group_by_object_class(classes: tuple[str, ...], expected: bool) -> None:
    settings = DirectorySettings(url="ldap://h", base_dn="dc=t", flavor="openldap")

    assert is_group(entry(objectClass=classes), settings) is expected


@pytest.mark.parametrize(
    ("path", "step", "expected"),
    [
        ((), "a", ("a",)),
        (("a",), "b", ("a", "b")),
        (("a", "b"), "b", ("a", "b")),
    ],
)
def test_extend_path_skips_repeat(
    path: tuple[str, ...], step: str, expected: tuple[str, ...]
) -> None:
    assert extend_path(path, step) == expected
