"""Settings of the LDAP directory connector, with defaults per directory flavor."""

from __future__ import annotations

from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

Flavor = Literal["active_directory", "openldap"]


class AttributeMap(BaseModel):
    """LDAP attribute names the connector reads, one field per fact about an entry.

    `proxy_addresses` contains every address with its type, as Active Directory keeps
    it: `SMTP:` before the primary address and `smtp:` before each alias. An empty
    name turns that lookup off. `entry_dn` is an attribute whose equality filter
    matches an entry's own DN, so members are read in batches of one filter each.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    mail: str = Field(default="mail", min_length=1)
    proxy_addresses: str = "proxyAddresses"
    display_name: str = "displayName"
    title: str = "title"
    department: str = "department"
    manager: str = "manager"
    member: str = Field(default="member", min_length=1)
    entry_dn: str = Field(default="distinguishedName", min_length=1)


ACTIVE_DIRECTORY_ATTRIBUTES = AttributeMap()
OPENLDAP_ATTRIBUTES = AttributeMap(department="departmentNumber", entry_dn="entryDN")

# Per flavor: the attribute map, the filter that selects users, and the object
# class of groups and distribution lists.
FLAVOR_DEFAULTS: dict[Flavor, dict[str, Any]] = {
    "active_directory": {
        "attributes": ACTIVE_DIRECTORY_ATTRIBUTES,
        "user_filter": "(&(objectCategory=person)(objectClass=user))",
        "group_object_class": "group",
    },
    "openldap": {
        "attributes": OPENLDAP_ATTRIBUTES,
        "user_filter": "(objectClass=inetOrgPerson)",
        "group_object_class": "groupOfNames",
    },
}


class DirectorySettings(BaseModel):
    """An LDAP directory, Active Directory or OpenLDAP.

    `flavor` picks the defaults of `attributes`, `user_filter` and
    `group_object_class`. Each of them can still be set, and `attributes` may name
    only the fields that differ from the flavor's map.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    url: str = Field(description="LDAP URL, e.g. ldap://127.0.0.1:389.")
    bind_dn: str = Field(
        default="", description="DN to bind as; empty binds anonymously."
    )
    password: SecretStr | None = Field(default=None, description="Bind password.")
    base_dn: str = Field(description="Search base of users and groups.")
    flavor: Flavor = Field(
        default="active_directory",
        description="Directory product, which sets the defaults of the attribute "
        "map, the user filter and the group object class.",
    )
    attributes: AttributeMap = Field(
        default=ACTIVE_DIRECTORY_ATTRIBUTES,
        description="Attribute names; fields left out keep the flavor's default.",
    )
    user_filter: str = Field(
        default="",
        description="LDAP filter, in parentheses, that selects the entries of users.",
    )
    group_object_class: str = Field(
        default="",
        description="Object class of groups and distribution lists.",
    )
    vip_groups: tuple[str, ...] = Field(
        default=(),
        description="DNs of the groups whose members are VIPs, directly or through "
        "nested groups.",
    )
    max_list_members: int = Field(
        default=500,
        ge=1,
        description="Mailboxes one list expansion may reach; a larger list is "
        "returned flagged too_large.",
    )
    max_nesting_depth: int = Field(
        default=10,
        ge=1,
        description="Levels of nested groups followed, down in an expansion and up "
        "when collecting a user's groups.",
    )
    paged_size: int = Field(
        default=500,
        ge=1,
        le=1000,
        description="Entries per page of a paged search; Active Directory serves at "
        "most 1000 (MaxPageSize).",
    )
    member_batch_size: int = Field(
        default=50,
        ge=1,
        le=500,
        description="DNs looked up by one search filter while expanding lists.",
    )
    start_tls: bool = Field(
        default=False, description="Send StartTLS before binding on ldap:// URLs."
    )
    ca_file: str | None = Field(
        default=None,
        description="PEM file of the CAs that sign the server certificate; empty "
        "uses the system store.",
    )
    pool_size: int = Field(
        default=4,
        ge=1,
        le=64,
        description="LDAP connections, and threads that run the blocking ldap3 calls.",
    )
    connect_timeout_seconds: float = Field(
        default=5.0, gt=0, description="Timeout of opening a connection, in seconds."
    )
    receive_timeout_seconds: int = Field(
        default=15,
        ge=1,
        description="Timeout of one server response, in whole seconds (ldap3 sets "
        "it as a socket option that takes whole seconds).",
    )
    max_attempts: int = Field(
        default=3,
        ge=1,
        description="Attempts of one lookup while the server is down or times out.",
    )
    retry_backoff_seconds: float = Field(
        default=0.5,
        ge=0,
        description="Wait before the second attempt, in seconds; it doubles for each "
        "further attempt.",
    )
    max_retry_wait_seconds: float = Field(
        default=8.0, ge=0, description="Maximum wait between two attempts, in seconds."
    )
    cache_ttl_seconds: float = Field(
        default=900.0,
        ge=0,
        description="Seconds a found user or expansion is reused, 0 to turn caching "
        "off. The longest TTL is also the retention of the worker's directory_cache "
        "changelog.",
    )
    negative_cache_ttl_seconds: float = Field(
        default=60.0,
        ge=0,
        description="Seconds an address that was not found stays unknown.",
    )
    cache_max_entries: int = Field(
        default=10_000,
        ge=1,
        description="Entries of each kind an in-memory cache keeps before evicting. "
        "The worker's table cache is bounded by the TTLs instead.",
    )

    @model_validator(mode="before")
    @classmethod
    def _apply_flavor_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        flavor = data.get("flavor", "active_directory")
        defaults = FLAVOR_DEFAULTS.get(flavor)
        if defaults is None:
            return data  # the field validator reports the unknown flavor

        data = dict(data)
        attributes = data.get("attributes")
        if attributes is None:
            data["attributes"] = defaults["attributes"]
        elif isinstance(attributes, dict):
            merged = {**defaults["attributes"].model_dump(), **attributes}
            data["attributes"] = AttributeMap.model_validate(merged)
        for name in ("user_filter", "group_object_class"):
            if not data.get(name):
                data[name] = defaults[name]
        return data

    @model_validator(mode="after")
    def _check_values(self) -> DirectorySettings:
        if not _is_ldap_url(self.url):
            raise ValueError(
                f"The directory URL {self.url!r} is not an LDAP URL with a host "
                "and a valid port; set directory.url to ldap://host:389 or "
                "ldaps://host:636."
            )
        if not _is_parenthesized(self.user_filter):
            raise ValueError(
                f"The user filter {self.user_filter!r} is not one LDAP filter in "
                "parentheses; set directory.user_filter to e.g. "
                "(objectClass=inetOrgPerson)."
            )
        if self.bind_dn and self.password is None:
            raise ValueError(
                f"A bind DN {self.bind_dn!r} is set without a password; set "
                "directory.password, or clear directory.bind_dn to bind anonymously."
            )
        return self


def _is_ldap_url(url: str) -> bool:
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:  # not a number, or out of range
        return False
    if parts.scheme.lower() not in ("ldap", "ldaps") or not parts.hostname:
        return False
    return port != 0


def _is_parenthesized(text: str) -> bool:
    """Return True if `text` is one balanced group of parentheses.

    Escaped parentheses (written \\28 and \\29 in a filter) contain no parenthesis
    character, so counting is enough. The server still checks the full syntax.
    """
    if not (text.startswith("(") and text.endswith(")")):
        return False
    depth = 0
    for position, character in enumerate(text):
        if character == "(":
            depth += 1
        elif character == ")":
            depth -= 1
        if depth == 0 and position != len(text) - 1:
            return False
    return depth == 0
