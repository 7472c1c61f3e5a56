"""Client of the Proofpoint TAP SIEM API."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, SecretStr


class TapSettings(BaseModel):
    """Settings of the TAP SIEM API poller."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = Field(default=False, description="Poll the TAP SIEM API.")
    url: str = Field(
        default="https://tap-api-v2.proofpoint.com",
        description="Base URL of the TAP API.",
    )
    principal: SecretStr | None = Field(
        default=None, description="Service principal of the TAP credentials."
    )
    secret: SecretStr | None = Field(
        default=None, description="Secret of the TAP credentials."
    )
