"""Threat-intelligence lookups for the enrich agent, from the configured feeds."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from autopull.streams.settings import Settings

if TYPE_CHECKING:
    from autopull.connectors.intel.index import IntelIndex

log = logging.getLogger(__name__)


class IntelLookups:
    """Lookups over an `IntelIndex` that hand the enrich agent plain hit records."""

    def __init__(self, index: IntelIndex) -> None:
        self.index = index

    def lookup_alert(self, alert: dict[str, Any]) -> list[dict[str, Any]]:
        """Return the IntelHit records of every indicator the alert names."""
        return [dict(hit) for hit in self.index.lookup_alert(alert)]


def load_intel(settings: Settings) -> IntelLookups | None:
    """Load the configured feeds once; None when no feed is configured.

    A feed that cannot be read is reported in the log and leaves the others in
    service, so enrichment goes on with what is known.
    """
    if not settings.intel.feeds:
        return None

    from autopull.connectors.intel.index import IntelIndex

    index = IntelIndex.from_settings(settings.intel)
    for report in index.load():
        log.info("Loaded intel feed report=%s", report)
    if index.last_error is not None:
        log.warning("An intel feed could not be read error=%s", index.last_error)
    return IntelLookups(index)


def watch_feeds(pipe_app: Any, lookups: IntelLookups, reload_seconds: float) -> None:
    """Reload changed feed files from a task of the Faust app, without a restart."""
    from autopull.connectors.intel.index import FeedWatcher

    @pipe_app.task
    async def watch_intel_feeds() -> None:
        FeedWatcher(lookups.index, reload_seconds).start()
