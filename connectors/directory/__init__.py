"""Directory lookups: recipients to mailboxes, user attributes, list expansion."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, SecretStr


class DirectorySettings(BaseModel):
    """An LDAP directory, Active Directory or OpenLDAP."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str = Field(description="LDAP URL, e.g. ldap://127.0.0.1:389.")
    bind_dn: str = Field(
        default="", description="DN to bind as; empty binds anonymously."
    )
    password: SecretStr | None = Field(default=None, description="Bind password.")
    base_dn: str = Field(description="Search base of users and groups.")
