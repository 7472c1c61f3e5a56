"""Intelligence for one alert: the local feeds and the online providers together."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from autopull.connectors.errors import ConnectorError
from autopull.connectors.intel.index import IntelIndex
from autopull.connectors.intel.indicators import IntelHit
from autopull.connectors.intel.observables import Observable, alert_observables
from autopull.connectors.intel.providers import Provider

logger = logging.getLogger(__name__)


@dataclass
class IntelResult:
    """Hits for an alert, and the providers that could not be asked.

    The fields match `intel_hits` and `unavailable` of the EnrichedAlert record.
    """

    hits: list[IntelHit] = field(default_factory=list)
    unavailable: list[str] = field(default_factory=list)


class IntelEnricher:
    """Looks an alert up in the feed index and in every provider."""

    def __init__(self, index: IntelIndex, providers: Sequence[Provider] = ()) -> None:
        self._index = index
        self._providers = tuple(providers)

    async def lookup_alert(self, alert: dict[str, Any]) -> IntelResult:
        """Return the hits of everything the alert names, from feeds and providers.

        A provider that fails or whose circuit is open is named in `unavailable`,
        and the hits found elsewhere are returned all the same.
        """
        observables = alert_observables(alert)
        hits = self._index.store.lookup_observables(observables)
        if not self._providers:
            return IntelResult(hits=hits)

        answers = await asyncio.gather(
            *(self._ask(provider, observables) for provider in self._providers)
        )
        unavailable = []
        for provider, (provider_hits, failed) in zip(
            self._providers, answers, strict=True
        ):
            hits.extend(provider_hits)
            if failed:
                unavailable.append(provider.name)
        return IntelResult(hits=_unique(hits), unavailable=unavailable)

    async def _ask(
        self, provider: Provider, observables: list[Observable]
    ) -> tuple[list[IntelHit], bool]:
        results = await asyncio.gather(
            *(provider.lookup(kind, value) for kind, value in observables),
            return_exceptions=True,
        )
        hits: list[IntelHit] = []
        errors: list[ConnectorError] = []
        for result in results:
            if isinstance(result, ConnectorError):
                errors.append(result)
            elif isinstance(result, BaseException):
                raise result
            else:
                hits.extend(result)

        if errors:
            logger.warning(
                "Intel provider failed: provider=%s failed=%d of=%d error=%s",
                provider.name,
                len(errors),
                len(results),
                errors[0],
            )
        return hits, bool(errors)


def _unique(hits: list[IntelHit]) -> list[IntelHit]:
    best: dict[tuple[str, str, str], IntelHit] = {}
    for hit in hits:
        key = (hit["kind"], hit["indicator"], hit["source"])
        if key not in best or hit["confidence"] > best[key]["confidence"]:
            best[key] = hit
    return list(best.values())
