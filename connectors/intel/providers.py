"""Online indicator lookups: the `Provider` interface and an HTTP provider.

`HttpProvider` sends `GET <url>?kind=<kind>&value=<value>` to a service and expects
`{"hits": [{"indicator": ..., "confidence": 0-100, "source": ...}]}` (source and
indicator optional) or a 404 for no hits. Responses are cached for `cache_seconds`,
and a circuit breaker stops asking after `failure_threshold` consecutive failures
until `cooldown_seconds` have passed, when one trial request decides whether to
close it again.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Literal, Protocol

import httpx

from autopull.connectors.errors import ConnectorError, PermanentError, TransientError
from autopull.connectors.intel import HttpProviderSettings, IndicatorKind
from autopull.connectors.intel.exceptions import ProviderUnavailableError
from autopull.connectors.intel.feeds import parse_confidence
from autopull.connectors.intel.indicators import IntelHit

logger = logging.getLogger(__name__)

Clock = Callable[[], float]
BreakerState = Literal["closed", "open", "half_open"]


class Provider(Protocol):
    """An online source of indicator verdicts."""

    name: str

    async def lookup(self, kind: IndicatorKind, value: str) -> list[IntelHit]:
        """Return the hits for one value; raise a `ConnectorError` on failure."""
        ...


class TtlCache:
    """Lookup results kept `ttl` seconds, at most `max_entries`, oldest out first."""

    def __init__(self, ttl: float, max_entries: int, clock: Clock) -> None:
        self._ttl = ttl
        self._max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[tuple[str, str], tuple[float, list[IntelHit]]] = (
            OrderedDict()
        )

    def get(self, key: tuple[str, str]) -> list[IntelHit] | None:
        """Return the result stored for `key` unless it expired, else None."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= self._clock():
            del self._entries[key]
            return None
        return list(entry[1])

    def put(self, key: tuple[str, str], hits: list[IntelHit]) -> None:
        """Store a result, dropping the oldest one when full."""
        if self._max_entries == 0 or self._ttl == 0:
            return
        self._entries[key] = (self._clock() + self._ttl, list(hits))
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)


class CircuitBreaker:
    """Closed, open after `threshold` consecutive failures, half-open after cooldown.

    While half-open one trial request is let through: success closes the circuit,
    failure opens it for another cooldown.
    """

    def __init__(self, threshold: int, cooldown: float, clock: Clock) -> None:
        self._threshold = threshold
        self._cooldown = cooldown
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._trial_running = False

    @property
    def state(self) -> BreakerState:
        """Return closed, open or half_open."""
        if self._opened_at is None:
            return "closed"
        if self._clock() - self._opened_at >= self._cooldown:
            return "half_open"
        return "open"

    def seconds_until_trial(self) -> float:
        """Return the seconds until a trial request is allowed (0 when it is)."""
        if self._opened_at is None:
            return 0.0
        return max(0.0, self._opened_at + self._cooldown - self._clock())

    def allow(self) -> bool:
        """Return True when a request may go out now; a half-open circuit allows one."""
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and not self._trial_running:
            self._trial_running = True
            return True
        return False

    def record_success(self) -> None:
        """Close the circuit."""
        self._failures = 0
        self._opened_at = None
        self._trial_running = False

    def abandon_trial(self) -> None:
        """Free the trial slot after a trial request that ended without a result."""
        self._trial_running = False

    def record_failure(self) -> None:
        """Count a failure; open at the threshold or after a failed trial."""
        self._failures += 1
        if self._trial_running or self._failures >= self._threshold:
            self._opened_at = self._clock()
        self._trial_running = False


class HttpProvider:
    """A `Provider` reached over HTTP with httpx (see the module for the protocol)."""

    def __init__(
        self,
        settings: HttpProviderSettings,
        *,
        client: httpx.AsyncClient | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self.name = settings.name
        self._settings = settings
        self._client = client or httpx.AsyncClient(timeout=settings.timeout_seconds)
        self._owns_client = client is None
        self._cache = TtlCache(settings.cache_seconds, settings.cache_entries, clock)
        self.breaker = CircuitBreaker(
            settings.failure_threshold, settings.cooldown_seconds, clock
        )

    async def aclose(self) -> None:
        """Close the HTTP client if this provider created it."""
        if self._owns_client:
            await self._client.aclose()

    async def lookup(self, kind: IndicatorKind, value: str) -> list[IntelHit]:
        """Return the provider's hits for one value, from the cache when fresh.

        Raises `ProviderUnavailableError` while the circuit is open, and
        `TransientError` or `PermanentError` when the request fails.
        """
        cached = self._cache.get((kind, value))
        if cached is not None:
            return cached
        if not self.breaker.allow():
            wait = self.breaker.seconds_until_trial()
            raise ProviderUnavailableError(
                f"The intel provider {self.name!r} is not asked after repeated "
                f"failures; the next trial request follows in {wait:.0f} s.",
                retry_after=wait,
                platform=self.name,
            )

        try:
            hits = await self._request(kind, value)
        except ConnectorError:
            self.breaker.record_failure()
            raise
        except BaseException:
            # Cancelled or broken by a bug: neither a verdict on the provider.
            self.breaker.abandon_trial()
            raise
        self.breaker.record_success()
        self._cache.put((kind, value), hits)
        return hits

    async def _request(self, kind: IndicatorKind, value: str) -> list[IntelHit]:
        headers = {}
        if self._settings.api_key is not None:
            headers["Authorization"] = (
                f"Bearer {self._settings.api_key.get_secret_value()}"
            )
        try:
            response = await self._client.get(
                self._settings.url,
                params={"kind": kind, "value": value},
                headers=headers,
                timeout=self._settings.timeout_seconds,
            )
        except httpx.TimeoutException as error:
            raise self._transient(
                f"timed out after {self._settings.timeout_seconds} s"
            ) from error
        except httpx.HTTPError as error:
            raise self._transient(f"failed: {error!r}") from error

        if response.status_code == 404:
            return []
        if response.status_code == 429 or response.status_code >= 500:
            raise self._transient(f"returned HTTP {response.status_code}")
        if response.status_code != 200:
            raise PermanentError(
                f"The intel provider {self.name!r} returned HTTP "
                f"{response.status_code}; check its URL and API key.",
                platform=self.name,
            )
        return self._parse(kind, value, response)

    def _parse(
        self, kind: IndicatorKind, value: str, response: httpx.Response
    ) -> list[IntelHit]:
        try:
            items = response.json()["hits"]
            return [self._hit(kind, value, item) for item in items]
        except (ValueError, KeyError, TypeError) as error:
            raise self._transient(
                f"returned a body that is not the expected JSON: {error}"
            ) from error

    def _hit(self, kind: IndicatorKind, value: str, item: Any) -> IntelHit:
        return {
            "indicator": str(item.get("indicator") or value),
            "kind": kind,
            "source": str(item.get("source") or self.name),
            "confidence": parse_confidence(item.get("confidence", 50)),
        }

    def _transient(self, problem: str) -> TransientError:
        return TransientError(
            f"The intel request to provider {self.name!r} {problem}; it is retried on "
            "a later lookup.",
            platform=self.name,
        )
