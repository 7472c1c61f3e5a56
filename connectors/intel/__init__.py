"""Threat-intelligence indicator stores, feeds and lookups.

This module holds only the settings, so that loading the worker's settings does not
import the feed parsers. The parts live in their own modules:

- `indicators`: indicator kinds, validation and normalization of values,
- `urls`: URL normalization,
- `store`: the indicator store and its lookups,
- `observables`: what an alert's lookup covers,
- `feeds`, `stix`, `misp`: feed file readers,
- `index`: the reloadable index over the configured feeds and its `FeedWatcher`,
- `providers`: online lookup providers, and `enricher`: local and online together.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

FeedFormat = Literal["auto", "csv", "stix", "misp", "list"]
IndicatorKind = Literal["ip", "host", "url", "hash"]

__all__ = [
    "FeedFormat",
    "FeedSettings",
    "HttpProviderSettings",
    "IndicatorKind",
    "IntelSettings",
]


class FeedSettings(BaseModel):
    """One indicator feed file and how to read it."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    path: Path = Field(description="Feed file to read.")
    format: FeedFormat = Field(
        default="auto",
        description="csv, stix (STIX 2.1 bundle), misp (MISP event JSON), list (one "
        "indicator a line) or auto: .csv is CSV, .json is STIX or MISP by its "
        "content, anything else is a list.",
    )
    source: str = Field(
        default="",
        description="Source name given to hits when the feed names none; empty "
        "means the file name without its suffix.",
    )
    confidence: int = Field(
        default=50,
        ge=0,
        le=100,
        description="Confidence (0 to 100) of indicators that carry none.",
    )
    kind: IndicatorKind | None = Field(
        default=None,
        description="Kind of every line of a list feed; unset guesses it per line.",
    )
    misp_to_ids_only: bool = Field(
        default=True,
        description="Use only MISP attributes flagged to_ids.",
    )

    @property
    def source_name(self) -> str:
        """Return the source name of this feed's indicators."""
        return self.source or self.path.stem


class HttpProviderSettings(BaseModel):
    """An online indicator lookup service reached over HTTP."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    name: str = Field(description="Provider name, reported when it is unavailable.")
    url: str = Field(
        description="Lookup URL; the request adds the query parameters kind and value."
    )
    api_key: SecretStr | None = Field(
        default=None, description="Bearer token sent in the Authorization header."
    )
    timeout_seconds: float = Field(
        default=2.0, gt=0, description="Time limit of one request, in seconds."
    )
    cache_seconds: float = Field(
        default=300.0, ge=0, description="How long a response is reused, in seconds."
    )
    cache_entries: int = Field(
        default=10_000, ge=0, description="Maximum number of responses kept."
    )
    failure_threshold: int = Field(
        default=5,
        ge=1,
        description="Consecutive failures after which the provider is not asked.",
    )
    cooldown_seconds: float = Field(
        default=30.0,
        gt=0,
        description="Seconds before one trial request follows an opened circuit.",
    )


class IntelSettings(BaseModel):
    """Indicator feeds loaded from files, and online providers."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    feeds: list[FeedSettings] = Field(
        default_factory=list,
        description="Feed files: CSV, STIX 2.1, MISP, lists. A plain path is a feed "
        "with the default settings.",
    )
    reload_seconds: float = Field(
        default=30.0, gt=0, description="How often feed files are checked for changes."
    )
    providers: list[HttpProviderSettings] = Field(
        default_factory=list,
        description="Online lookup providers, asked besides the feeds.",
    )

    @field_validator("feeds", mode="before")
    @classmethod
    def _paths_to_feeds(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        return [
            {"path": item} if isinstance(item, str | Path) else item for item in value
        ]
