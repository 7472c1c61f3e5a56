"""Directory settings: flavor defaults, partial attribute maps and checks."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from autopull.connectors.directory import (
    ACTIVE_DIRECTORY_ATTRIBUTES,
    OPENLDAP_ATTRIBUTES,
    AttributeMap,
    DirectorySettings,
)

REQUIRED: dict[str, Any] = {"url": "ldap://127.0.0.1:389", "base_dn": "dc=corp,dc=test"}


def test_default_flavor_is_active_directory() -> None:
    settings = DirectorySettings(**REQUIRED)

    assert settings.flavor == "active_directory"
    assert settings.attributes == ACTIVE_DIRECTORY_ATTRIBUTES
    assert settings.attributes.entry_dn == "distinguishedName"
    assert settings.user_filter == "(&(objectCategory=person)(objectClass=user))"
    assert settings.group_object_class == "group"


def test_openldap_flavor_defaults() -> None:
    settings = DirectorySettings(**REQUIRED, flavor="openldap")

    assert settings.attributes == OPENLDAP_ATTRIBUTES
    assert settings.attributes.department == "departmentNumber"
    assert settings.attributes.entry_dn == "entryDN"
    assert settings.user_filter == "(objectClass=inetOrgPerson)"
    assert settings.group_object_class == "groupOfNames"


def test_partial_attribute_map_keeps_flavor_defaults() -> None:
    settings = DirectorySettings(
        **REQUIRED, flavor="openldap", attributes={"department": "ou", "title": ""}
    )

    assert settings.attributes.department == "ou"
    assert settings.attributes.title == ""
    assert settings.attributes.entry_dn == "entryDN"
    assert settings.attributes.proxy_addresses == "proxyAddresses"


def test_attribute_map_instance_is_used_as_given() -> None:
    attributes = AttributeMap(mail="email", proxy_addresses="")

    settings = DirectorySettings(**REQUIRED, flavor="openldap", attributes=attributes)

    assert settings.attributes == attributes


def test_explicit_filter_overrides_flavor() -> None:
    settings = DirectorySettings(
        **REQUIRED, flavor="openldap", user_filter="(objectClass=person)"
    )

    assert settings.user_filter == "(objectClass=person)"
    assert settings.group_object_class == "groupOfNames"


def test_unknown_attribute_name_rejected() -> None:
    with pytest.raises(ValidationError, match="mial"):
        DirectorySettings(**REQUIRED, attributes={"mial": "mail"})


def test_unknown_flavor_rejected() -> None:
    with pytest.raises(ValidationError, match="flavor"):
        DirectorySettings(**REQUIRED, flavor="eDirectory")


@pytest.mark.parametrize(
    "url",
    [
        "http://dc1.corp.test",
        "dc1.corp.test:389",
        "ldapi:///run/slapd.sock",
        "ldap://",
        "ldap://dc1.corp.test:abc",
        "ldaps://dc1.corp.test:70000",
    ],
)
def test_invalid_url_rejected(url: str) -> None:
    with pytest.raises(ValidationError, match="not an LDAP URL"):
        DirectorySettings(url=url, base_dn="dc=corp,dc=test")


@pytest.mark.parametrize(
    "url", ["ldap://dc1.corp.test", "LDAPS://dc1.corp.test:636/", "ldap://[::1]:3890"]
)
def test_ldap_url_accepted(url: str) -> None:
    assert DirectorySettings(url=url, base_dn="dc=corp,dc=test").url == url


@pytest.mark.parametrize(
    "user_filter",
    ["objectClass=user", "(objectClass=user", "(a=1)(b=2)", "(a=1))(", "(a=1"],
)
def test_unbalanced_user_filter_rejected(user_filter: str) -> None:
    with pytest.raises(ValidationError, match="not one LDAP filter"):
        DirectorySettings(**REQUIRED, user_filter=user_filter)


@pytest.mark.parametrize(
    "user_filter", ["(objectClass=user)", "(&(a=1)(|(b=2)(c=\\28x\\29)))"]
)
def test_balanced_user_filter_accepted(user_filter: str) -> None:
    assert DirectorySettings(**REQUIRED, user_filter=user_filter).user_filter


def test_bind_dn_without_password_rejected() -> None:
    with pytest.raises(ValidationError, match="without a password"):
        DirectorySettings(**REQUIRED, bind_dn="cn=reader,dc=corp,dc=test")


def test_password_hidden_in_repr() -> None:
    settings = DirectorySettings(
        **REQUIRED, bind_dn="cn=reader,dc=corp,dc=test", password="s3cret"
    )

    assert "s3cret" not in repr(settings)
    assert settings.password is not None
    assert settings.password.get_secret_value() == "s3cret"


def test_settings_are_frozen() -> None:
    settings = DirectorySettings(**REQUIRED)

    with pytest.raises(ValidationError):
        settings.max_list_members = 10  # type: ignore[misc]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("max_list_members", 0),
        ("paged_size", 0),
        ("paged_size", 1001),
        ("pool_size", 0),
        ("receive_timeout_seconds", 0),
        ("max_attempts", 0),
    ],
)
def test_out_of_range_numbers_rejected(name: str, value: int) -> None:
    with pytest.raises(ValidationError, match=name):
        DirectorySettings(**REQUIRED, **{name: value})
