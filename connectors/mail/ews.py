"""Exchange Server 2013 to SE through exchangelib (EWS with impersonation)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, SecretStr


class EwsSettings(BaseModel):
    """An on-premises Exchange organisation reached through EWS."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    service_endpoint: str = Field(description="EWS URL, .../EWS/Exchange.asmx.")
    username: str = Field(description="Service account with impersonation rights.")
    password: SecretStr = Field(description="Password of the service account.")
    quarantine_mailbox: str = Field(description="Mailbox that receives the copies.")
