"""The alert ingest webhook: `POST /alerts/{source}` on the worker's web server."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, SecretStr


class WebhookSettings(BaseModel):
    """Credentials of the ingest webhook, one per source."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tokens: dict[str, SecretStr] = Field(
        default_factory=dict, description="Bearer token of each source."
    )
    hmac_secrets: dict[str, SecretStr] = Field(
        default_factory=dict,
        description="HMAC-SHA256 signing secret of each source.",
    )
