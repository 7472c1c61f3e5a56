"""Threat-intelligence lookups for the enrich agent: feeds and online providers."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from autopull.streams.settings import Settings

if TYPE_CHECKING:
    from autopull.connectors.intel.enricher import IntelEnricher
    from autopull.connectors.intel.index import IntelIndex
    from autopull.connectors.intel.providers import HttpProvider

log = logging.getLogger(__name__)


@dataclass
class IntelAnswer:
    """The IntelHit records of one alert, and the providers that could not be asked."""

    hits: list[dict[str, Any]] = field(default_factory=list)
    unavailable: list[str] = field(default_factory=list)


class IntelLookups:
    """Lookups over an `IntelIndex` and the online providers, as plain records."""

    def __init__(
        self, index: IntelIndex, providers: tuple[HttpProvider, ...] = ()
    ) -> None:
        from autopull.connectors.intel.enricher import IntelEnricher

        self.index = index
        self.providers = providers
        self._enricher: IntelEnricher = IntelEnricher(index, providers)

    async def lookup_alert(self, alert: dict[str, Any]) -> IntelAnswer:
        """Return the hits of every indicator the alert names, from all sources.

        A provider that fails, times out or has an open circuit costs its own hits
        only: it is named in `unavailable` and the other hits are returned.
        """
        result = await self._enricher.lookup_alert(alert)
        return IntelAnswer(
            hits=[dict(hit) for hit in result.hits],
            unavailable=list(result.unavailable),
        )

    async def aclose(self) -> None:
        """Close the HTTP clients of the providers."""
        for provider in self.providers:
            await provider.aclose()


def load_intel(settings: Settings) -> IntelLookups | None:
    """Load the configured feeds once and set up the providers.

    Returns None when neither a feed nor a provider is configured. A feed that
    cannot be read is reported in the log and leaves the others in service, so
    enrichment goes on with what is known.
    """
    if not settings.intel.feeds and not settings.intel.providers:
        return None

    from autopull.connectors.intel.index import IntelIndex
    from autopull.connectors.intel.providers import HttpProvider

    index = IntelIndex.from_settings(settings.intel)
    if settings.intel.feeds:
        for report in index.load():
            log.info("Loaded intel feed report=%s", report)
    if index.last_error is not None:
        log.warning("An intel feed could not be read error=%s", index.last_error)

    providers = tuple(HttpProvider(item) for item in settings.intel.providers)
    for provider_settings in settings.intel.providers:
        log.info(
            "Intel provider configured provider=%s timeout_seconds=%g",
            provider_settings.name,
            provider_settings.timeout_seconds,
        )
    return IntelLookups(index, providers)


def watch_feeds(pipe_app: Any, lookups: IntelLookups, reload_seconds: float) -> None:
    """Reload changed feed files from a task of the Faust app, without a restart."""
    from autopull.connectors.intel.index import FeedWatcher

    @pipe_app.task
    async def watch_intel_feeds() -> None:
        FeedWatcher(lookups.index, reload_seconds).start()
