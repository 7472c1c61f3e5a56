"""Directory lookups: recipients to mailboxes, user attributes, list expansion.

The settings and result types live here and need no LDAP library. The client,
`autopull.connectors.directory.client.Directory`, imports ldap3.
"""

from __future__ import annotations

from .cache import MISSING, DirectoryCache, MemoryCache, Missing
from .models import (
    Expansion,
    ExpansionKind,
    Member,
    Person,
    decode_expansion,
    decode_person,
    encode_expansion,
    encode_person,
)
from .settings import (
    ACTIVE_DIRECTORY_ATTRIBUTES,
    OPENLDAP_ATTRIBUTES,
    AttributeMap,
    DirectorySettings,
    Flavor,
)

__all__ = [
    "ACTIVE_DIRECTORY_ATTRIBUTES",
    "MISSING",
    "OPENLDAP_ATTRIBUTES",
    "AttributeMap",
    "DirectoryCache",
    "DirectorySettings",
    "Expansion",
    "ExpansionKind",
    "Flavor",
    "Member",
    "MemoryCache",
    "Missing",
    "Person",
    "decode_expansion",
    "decode_person",
    "encode_expansion",
    "encode_person",
]
