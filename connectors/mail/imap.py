"""IBM Domino, Dovecot and other IMAP servers, through a master user."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, SecretStr


class ImapSettings(BaseModel):
    """An IMAP server reached as each user through a master login."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = Field(description="IMAP server host.")
    port: int = Field(default=993, ge=1, le=65535, description="IMAP server port.")
    master_user: str = Field(description="Master user that logs in as each user.")
    master_password: SecretStr = Field(description="Password of the master user.")
    quarantine_mailbox: str = Field(description="User whose folder holds the copies.")
