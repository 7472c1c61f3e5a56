"""Threat-intelligence indicator stores, feeds and lookups."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class IntelSettings(BaseModel):
    """Indicator feeds loaded from files."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    feeds: list[Path] = Field(
        default_factory=list, description="Feed files: CSV, STIX 2.1, MISP, lists."
    )
    reload_seconds: float = Field(
        default=30.0, gt=0, description="How often feed files are checked for changes."
    )
