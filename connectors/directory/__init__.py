"""Directory lookups: recipients to mailboxes, user attributes, list expansion.

The settings and result types live here and need no LDAP library. The client,
`autopull.connectors.directory.client.Directory`, imports ldap3.
"""

from __future__ import annotations

from .models import Expansion, ExpansionKind, Member, Person
from .settings import (
    ACTIVE_DIRECTORY_ATTRIBUTES,
    OPENLDAP_ATTRIBUTES,
    AttributeMap,
    DirectorySettings,
    Flavor,
)

__all__ = [
    "ACTIVE_DIRECTORY_ATTRIBUTES",
    "OPENLDAP_ATTRIBUTES",
    "AttributeMap",
    "DirectorySettings",
    "Expansion",
    "ExpansionKind",
    "Flavor",
    "Member",
    "Person",
]
