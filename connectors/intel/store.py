"""The indicator store: immutable lookup tables built once per feed load.

A `StoreBuilder` collects normalized indicators and `build()` hands its tables to an
`IndicatorStore`, which is never changed afterwards, so readers need no lock and a
reload swaps a whole new store in. Layout, chosen for lookup speed and memory:

- IP addresses and CIDR ranges: one dict per prefix length and IP version, keyed by
  the network bits as an int. A lookup tries each prefix length present, longest
  first, so its cost grows with the number of distinct prefix lengths (at most 33
  for IPv4 and 129 for IPv6), not with the number of ranges.
- host names, normalized URLs: dicts keyed by the normalized text.
- hashes: one dict keyed by the digest bytes (16, 20 or 32 bytes, so MD5, SHA-1 and
  SHA-256 keys never collide).

Each key maps to a tuple of `Listing`s, one per source. Listings and their tuples are
interned while building: a feed's indicators usually share source, confidence and
expiry, so a million keys share a handful of tuples.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from autopull.connectors.intel import IndicatorKind
from autopull.connectors.intel.exceptions import InvalidIndicatorError
from autopull.connectors.intel.indicators import (
    IntelHit,
    IpNetwork,
    IpVersion,
    format_network,
    hash_key,
    is_public_suffix,
    normalize_host,
    parse_address,
    parse_network,
    registrable_domain,
)
from autopull.connectors.intel.observables import Observable, alert_observables
from autopull.connectors.intel.urls import normalize_url

logger = logging.getLogger(__name__)

Clock = Callable[[], float]
_BITS: dict[IpVersion, int] = {4: 32, 6: 128}


@dataclass(frozen=True, slots=True)
class Listing:
    """One source's entry for an indicator; `expires` is in epoch seconds."""

    source: str
    confidence: int
    expires: float | None

    def stronger(self, other: Listing) -> Listing:
        """Merge two entries of one source: top confidence, later expiry."""
        if self.expires is None or other.expires is None:
            expires = None
        else:
            expires = max(self.expires, other.expires)
        return Listing(self.source, max(self.confidence, other.confidence), expires)


Listings = tuple[Listing, ...]
# Per prefix length, longest first: (prefix length, shift, network bits -> listings).
IpLevels = list[tuple[int, int, dict[int, Listings]]]


class StoreBuilder:
    """Collects indicators, then builds an `IndicatorStore` once."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._networks: dict[IpVersion, dict[int, dict[int, Listings]]] = {4: {}, 6: {}}
        self._hosts: dict[str, Listings] = {}
        self._urls: dict[str, Listings] = {}
        self._hashes: dict[bytes, Listings] = {}
        self._listings: dict[tuple[str, int, float | None], Listing] = {}
        self._interned: dict[Any, Any] = {}

    def add(
        self,
        kind: IndicatorKind,
        value: str,
        *,
        source: str,
        confidence: int,
        expires: float | None = None,
    ) -> IndicatorKind:
        """Validate, normalize and add one indicator; return the kind it was stored as.

        A host name that is an IP address or range is stored as an IP. Raises
        `InvalidIndicatorError` for an invalid value, a confidence outside 0 to 100,
        or a host name that is a public suffix.
        """
        if not 0 <= confidence <= 100:
            raise InvalidIndicatorError(
                f"The confidence {confidence} of {value!r} is outside 0 to 100.",
                kind=kind,
                value=value,
            )
        listing = self._listings.get((source, confidence, expires))
        if listing is None:
            listing = Listing(source, confidence, expires)
            self._listings[(source, confidence, expires)] = listing

        if kind == "host" and _looks_numeric(value):
            try:
                self._add_network(parse_network(value), listing)
            except InvalidIndicatorError:
                pass
            else:
                return "ip"
        if kind == "ip":
            self._add_network(parse_network(value), listing)
        elif kind == "host":
            self._add_host(value, listing)
        elif kind == "url":
            self._put(self._urls, normalize_url(value), listing)
        else:
            self._put(self._hashes, hash_key(value), listing)
        return kind

    def build(self, clock: Clock = time.time) -> IndicatorStore:
        """Return the store over everything added, and start the builder afresh."""
        store = IndicatorStore(
            ipv4=_levels(self._networks[4], 32),
            ipv6=_levels(self._networks[6], 128),
            hosts=self._hosts,
            urls=self._urls,
            hashes=self._hashes,
            clock=clock,
        )
        self._reset()
        return store

    def _add_network(self, network: IpNetwork, listing: Listing) -> None:
        shift = _BITS[network.version] - network.prefix
        table = self._networks[network.version].setdefault(network.prefix, {})
        self._put(table, network.address >> shift, listing)

    def _add_host(self, value: str, listing: Listing) -> None:
        host = normalize_host(value)
        if is_public_suffix(host):
            raise InvalidIndicatorError(
                f"{value!r} is a public suffix, so listing it would match every "
                "domain registered under it; list the registrable domains instead.",
                kind="host",
                value=value,
            )
        self._put(self._hosts, host, listing)

    def _put(self, table: dict[Any, Listings], key: Any, listing: Listing) -> None:
        existing = table.get(key)
        if existing is None:
            table[key] = self._intern((listing,))
            return

        merged = [item for item in existing if item.source != listing.source]
        for item in existing:
            if item.source == listing.source:
                listing = self._intern(item.stronger(listing))
        merged.append(listing)
        table[key] = self._intern(tuple(merged))

    def _intern(self, item: Any) -> Any:
        return self._interned.setdefault(item, item)


def _levels(tables: dict[int, dict[int, Listings]], bits: int) -> IpLevels:
    return [(prefix, bits - prefix, tables[prefix]) for prefix in sorted(tables)[::-1]]


def _looks_numeric(value: str) -> bool:
    text = value.strip().rstrip(".")
    return text[-1:].isdigit() or text.startswith("[") or text.count(":") > 1


class IndicatorStore:
    """Immutable indicator tables with their lookups.

    Lookups return `IntelHit` dicts for every unexpired listing that matches, and
    raise `InvalidIndicatorError` for input that is not a value of the kind asked.
    `clock` returns the current time in epoch seconds; tests pass their own.
    """

    def __init__(
        self,
        *,
        ipv4: IpLevels,
        ipv6: IpLevels,
        hosts: dict[str, Listings],
        urls: dict[str, Listings],
        hashes: dict[bytes, Listings],
        clock: Clock = time.time,
    ) -> None:
        self._ipv4 = ipv4
        self._ipv6 = ipv6
        self._hosts = hosts
        self._urls = urls
        self._hashes = hashes
        self._clock = clock

    @classmethod
    def empty(cls, clock: Clock = time.time) -> IndicatorStore:
        """Return a store without indicators."""
        return StoreBuilder().build(clock)

    def counts(self) -> dict[IndicatorKind, int]:
        """Return the number of distinct indicators of each kind."""
        networks = sum(len(table) for _, _, table in self._ipv4 + self._ipv6)
        return {
            "ip": networks,
            "host": len(self._hosts),
            "url": len(self._urls),
            "hash": len(self._hashes),
        }

    def lookup_ip(self, value: str) -> list[IntelHit]:
        """Return the hits of an IP address: the address and every range holding it."""
        version, address = parse_address(value)
        levels = self._ipv4 if version == 4 else self._ipv6
        hits: list[IntelHit] = []
        for prefix, shift, table in levels:
            listings = table.get(address >> shift)
            if listings is not None:
                network = IpNetwork(version, address >> shift << shift, prefix)
                self._add_hits(hits, listings, format_network(network), "ip")
        return hits

    def lookup_host(self, value: str) -> list[IntelHit]:
        """Return the hits of a host name: the name and its listed parent domains.

        Parents are matched up to the registrable domain and never above it, so a
        listed `example.com` matches `a.example.com` but not `example.com.evil.net`,
        and a listed `amazonaws.com` does not match `b.s3.amazonaws.com`, whose
        registrable domain is itself. An IP address is looked up as an IP.
        """
        if _looks_numeric(value):
            try:
                return self.lookup_ip(value.strip().rstrip("."))
            except InvalidIndicatorError:
                pass

        host = normalize_host(value)
        hits: list[IntelHit] = []
        listings = self._hosts.get(host)
        if listings is not None:
            self._add_hits(hits, listings, host, "host")

        dot = host.find(".")
        while dot != -1:
            parent = host[dot + 1 :]
            listings = self._hosts.get(parent)
            if listings is not None and _within_registrable(host, parent):
                self._add_hits(hits, listings, parent, "host")
            dot = host.find(".", dot + 1)
        return hits

    def lookup_url(self, value: str) -> list[IntelHit]:
        """Return the hits of a URL, compared in normalized form."""
        url = normalize_url(value)
        hits: list[IntelHit] = []
        listings = self._urls.get(url)
        if listings is not None:
            self._add_hits(hits, listings, url, "url")
        return hits

    def lookup_hash(self, value: str) -> list[IntelHit]:
        """Return the hits of an MD5, SHA-1 or SHA-256 hash in hex."""
        key = hash_key(value)
        hits: list[IntelHit] = []
        listings = self._hashes.get(key)
        if listings is not None:
            self._add_hits(hits, listings, key.hex(), "hash")
        return hits

    def lookup(self, kind: IndicatorKind, value: str) -> list[IntelHit]:
        """Return the hits of `value` looked up as `kind`."""
        if kind == "ip":
            return self.lookup_ip(value)
        if kind == "host":
            return self.lookup_host(value)
        if kind == "url":
            return self.lookup_url(value)
        return self.lookup_hash(value)

    def lookup_alert(self, alert: dict[str, Any]) -> list[IntelHit]:
        """Return the hits of everything a NormalizedAlert names, without repeats.

        See `observables.alert_observables` for what is looked up. Values that are
        not valid indicators are skipped.
        """
        return self.lookup_observables(alert_observables(alert))

    def lookup_observables(self, observables: Iterable[Observable]) -> list[IntelHit]:
        """Return the hits of (kind, value) pairs without repeats, skipping invalid."""
        hits: dict[tuple[str, str, str], IntelHit] = {}
        for kind, value in observables:
            try:
                found = self.lookup(kind, value)
            except InvalidIndicatorError as error:
                logger.debug("Skipped an observable: kind=%s reason=%s", kind, error)
                continue
            for hit in found:
                key = (hit["kind"], hit["indicator"], hit["source"])
                if key not in hits or hit["confidence"] > hits[key]["confidence"]:
                    hits[key] = hit
        return list(hits.values())

    def _add_hits(
        self,
        hits: list[IntelHit],
        listings: Listings,
        indicator: str,
        kind: IndicatorKind,
    ) -> None:
        now = self._clock()
        for listing in listings:
            if listing.expires is None or listing.expires > now:
                hits.append(
                    {
                        "indicator": indicator,
                        "kind": kind,
                        "source": listing.source,
                        "confidence": listing.confidence,
                    }
                )


def _within_registrable(host: str, parent: str) -> bool:
    registrable = registrable_domain(host)
    return registrable is not None and len(parent) >= len(registrable)
